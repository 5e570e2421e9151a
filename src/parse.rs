//! Parsing the arguments of `RL.ACQUIRE`, `RL.PEEK`, `RL.USAGE` and `RL.RELEASE`: one
//! walk of each command's grammar.
//!
//! Options are case-insensitive keywords. `COST` takes `unit amount` pairs until the
//! next keyword, so unit names cannot be one of the keywords below (plans refuse them:
//! see `tollgate_core::plan::RESERVED_UNITS`).

use tollgate_core::decide::{Call, Costs};
use tollgate_core::requests::{MAX_ID_LEN, MAX_LINK_LEN};
use tollgate_core::spec::DEFAULT_UNIT;
use tollgate_core::time::MAX_WINDOW_MS;

use smallvec::SmallVec;

use crate::args::{is_integer, printable, Args, CmdError};
use crate::server::{bytes_of, RawString};

/// Most `COST` units one call may name.
pub const MAX_COST_UNITS: usize = 16;
/// The longest a caller may `WAIT`, in milliseconds (one day).
pub const MAX_WAIT_MS: u64 = 86_400_000;

const KEYWORDS: [&str; 9] = [
    "COST", "ENDPOINT", "ID", "TTL", "WAIT", "PRIORITY", "CREDITS", "COMPACT", "ALSO",
];

/// Costs per unit, as given by the positional `units` and `COST`.
#[derive(Clone, Copy)]
pub struct CostList<'a> {
    /// The cost in `request`, if given.
    pub request: Option<u64>,
    units: [(&'a str, u64); MAX_COST_UNITS],
    len: usize,
}

impl<'a> CostList<'a> {
    fn new() -> Self {
        CostList {
            request: None,
            units: [("", 0); MAX_COST_UNITS],
            len: 0,
        }
    }

    /// A cost list from its parts (a waiting call rebuilding its arguments).
    pub fn from_parts(request: Option<u64>, units: &[(&'a str, u64)]) -> Self {
        let mut list = CostList::new();
        list.request = request;
        for (slot, &pair) in list.units.iter_mut().zip(units) {
            *slot = pair;
        }
        list.len = units.len().min(MAX_COST_UNITS);
        list
    }

    /// The units other than `request`.
    pub fn units(&self) -> &[(&'a str, u64)] {
        self.units.get(..self.len).unwrap_or(&[])
    }

    fn set(&mut self, unit: &'a str, amount: u64) -> Result<(), CmdError> {
        if unit == DEFAULT_UNIT {
            if self.request.is_some() {
                return Err(CmdError::err(
                    "the request cost is given twice (units and COST request)",
                ));
            }
            self.request = Some(amount);
            return Ok(());
        }
        if self.units().iter().any(|(u, _)| *u == unit) {
            return Err(CmdError::err(format_args!(
                "COST unit '{unit}' given twice"
            )));
        }
        let slot = self.units.get_mut(self.len).ok_or_else(|| {
            CmdError::err(format_args!("COST names more than {MAX_COST_UNITS} units"))
        })?;
        *slot = (unit, amount);
        self.len += 1;
        Ok(())
    }

    /// Every `(unit, amount)` given, `request` included.
    pub fn pairs(&self) -> impl Iterator<Item = (&'a str, u64)> + '_ {
        self.request
            .map(|n| (DEFAULT_UNIT, n))
            .into_iter()
            .chain(self.units().iter().copied())
    }
}

/// A parsed `RL.ACQUIRE` / `RL.PEEK`.
pub struct CallArgs<'a> {
    pub key: RawString,
    pub plan: &'a str,
    pub costs: CostList<'a>,
    pub endpoint: Option<&'a str>,
    pub id: Option<&'a [u8]>,
    pub ttl_ms: Option<u64>,
    pub wait_ms: Option<u64>,
    pub priority: i64,
    /// `CREDITS credits-key amount`.
    pub credits: Option<(RawString, u64)>,
    /// The integer-array reply.
    pub compact: bool,
    /// `ALSO count key plan ...`: the pairs after the first.
    pub also: SmallVec<[(RawString, &'a str); 4]>,
    /// `ALSO` was given (even if its pairs are few).
    pub has_also: bool,
}

impl<'a> CallArgs<'a> {
    pub fn call(&self) -> Call<'_> {
        Call {
            costs: Costs {
                request: self.costs.request.unwrap_or(1),
                units: self.costs.units(),
            },
            endpoint: self.endpoint,
            id: self.id,
            ttl_ms: self.ttl_ms,
        }
    }

    /// Every subject key of the call, first key first.
    pub fn keys(&self) -> SmallVec<[RawString; 4]> {
        std::iter::once(self.key)
            .chain(self.also.iter().map(|(k, _)| *k))
            .collect()
    }

    /// Every plan argument, in key order.
    pub fn plans(&self) -> SmallVec<[&'a str; 4]> {
        std::iter::once(self.plan)
            .chain(self.also.iter().map(|(_, p)| *p))
            .collect()
    }
}

/// Which options a command takes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// `RL.PEEK`: COST and ENDPOINT.
    Peek,
    /// `RL.ACQUIRE`: every option.
    Acquire,
}

fn is_keyword(args: &Args<'_>, i: usize) -> bool {
    // Most arguments are unit names and amounts: the length rules them out cheaply.
    let Some(bytes) = args.bytes(i) else {
        return false;
    };
    (2..=8).contains(&bytes.len())
        && !bytes.first().is_some_and(u8::is_ascii_digit)
        && KEYWORDS
            .iter()
            .any(|k| bytes.eq_ignore_ascii_case(k.as_bytes()))
}

/// The index of the value after keyword `i`, or an error naming the keyword.
fn value_at(args: &Args<'_>, i: usize) -> Result<usize, CmdError> {
    if i + 1 < args.len() {
        Ok(i + 1)
    } else {
        Err(CmdError::err(format_args!(
            "{} needs a value",
            printable(args.bytes(i).unwrap_or(b""))
        )))
    }
}

fn twice(what: &str) -> CmdError {
    CmdError::err(format_args!("{what} given twice"))
}

/// Parses `COST unit amount [unit amount ...]` starting at the `COST` keyword `i`
/// into `costs`; returns the index after the last pair.
fn parse_costs<'a>(
    args: &Args<'a>,
    mut i: usize,
    costs: &mut CostList<'a>,
) -> Result<usize, CmdError> {
    i += 1;
    if i >= args.len() || is_keyword(args, i) {
        return Err(CmdError::err("COST needs at least one unit and amount"));
    }
    while i < args.len() && !is_keyword(args, i) {
        let unit = args.name(i, "COST unit")?;
        if i + 1 >= args.len() {
            return Err(CmdError::err(format_args!(
                "COST unit '{unit}' has no amount"
            )));
        }
        costs.set(unit, args.u64(i + 1, "COST amount")?)?;
        i += 2;
    }
    Ok(i)
}

/// Parses `key plan [units] [COST unit n ...] [ENDPOINT e] [ID id] [TTL ms]
/// [WAIT ms [PRIORITY p]] [CREDITS key n] [COMPACT] [ALSO count key plan ...]`,
/// taking only the options `accept` allows; `max_also` bounds `count`.
pub fn parse_call<'a>(
    args: &Args<'a>,
    accept: Accept,
    max_also: usize,
) -> Result<CallArgs<'a>, CmdError> {
    if args.len() < 3 {
        return Err(CmdError::WrongArity);
    }
    let mut parsed = CallArgs {
        key: args.raw(1).ok_or(CmdError::WrongArity)?,
        plan: args.str(2, "plan")?,
        costs: CostList::new(),
        endpoint: None,
        id: None,
        ttl_ms: None,
        wait_ms: None,
        priority: 0,
        credits: None,
        compact: false,
        also: SmallVec::new(),
        has_also: false,
    };
    let mut i = 3;
    if args.bytes(i).is_some_and(is_integer) {
        parsed.costs.request = Some(args.u64(i, "units")?);
        i += 1;
    }
    let acquire = accept == Accept::Acquire;
    let (mut cost_given, mut priority_given) = (false, false);
    while i < args.len() {
        if args.is(i, "COST") {
            if cost_given {
                return Err(twice("COST"));
            }
            cost_given = true;
            i = parse_costs(args, i, &mut parsed.costs)?;
            continue;
        }
        if args.is(i, "COMPACT") {
            if parsed.compact {
                return Err(twice("COMPACT"));
            }
            parsed.compact = true;
            i += 1;
            continue;
        }
        if args.is(i, "ALSO") {
            if parsed.has_also {
                return Err(twice("ALSO"));
            }
            parsed.has_also = true;
            i = parse_also(args, i, max_also, &mut parsed.also)?;
            continue;
        }
        let v = value_at(args, i);
        if args.is(i, "ENDPOINT") {
            if parsed.endpoint.is_some() {
                return Err(twice("ENDPOINT"));
            }
            parsed.endpoint = Some(args.name(v?, "ENDPOINT")?);
        } else if acquire && args.is(i, "ID") {
            if parsed.id.is_some() {
                return Err(twice("ID"));
            }
            let id = args.bytes(v?).unwrap_or(b"");
            if id.is_empty() || id.len() > MAX_ID_LEN {
                return Err(CmdError::err(format_args!(
                    "ID must be 1 to {MAX_ID_LEN} bytes"
                )));
            }
            parsed.id = Some(id);
        } else if acquire && args.is(i, "TTL") {
            if parsed.ttl_ms.is_some() {
                return Err(twice("TTL"));
            }
            let ttl = args.u64(v?, "TTL")?;
            if ttl == 0 || ttl > MAX_WINDOW_MS {
                return Err(CmdError::err(format_args!(
                    "TTL must be between 1 and {MAX_WINDOW_MS} ms"
                )));
            }
            parsed.ttl_ms = Some(ttl);
        } else if acquire && args.is(i, "WAIT") {
            if parsed.wait_ms.is_some() {
                return Err(twice("WAIT"));
            }
            let wait = args.u64(v?, "WAIT")?;
            if wait > MAX_WAIT_MS {
                return Err(CmdError::err(format_args!(
                    "WAIT must be at most {MAX_WAIT_MS} ms"
                )));
            }
            parsed.wait_ms = Some(wait);
        } else if acquire && args.is(i, "PRIORITY") {
            if priority_given {
                return Err(twice("PRIORITY"));
            }
            priority_given = true;
            let text = args.str(v?, "PRIORITY")?;
            parsed.priority = text
                .parse::<i64>()
                .ok()
                .filter(|p| (-1_000_000..=1_000_000).contains(p))
                .ok_or_else(|| {
                    CmdError::err(format_args!(
                        "PRIORITY must be an integer between -1000000 and 1000000, got '{}'",
                        printable(text.as_bytes())
                    ))
                })?;
        } else if acquire && args.is(i, "CREDITS") {
            if parsed.credits.is_some() {
                return Err(twice("CREDITS"));
            }
            let key = args.raw(v?).ok_or(CmdError::WrongArity)?;
            if i + 2 >= args.len() {
                return Err(CmdError::err("CREDITS needs a key and an amount"));
            }
            parsed.credits = Some((key, args.u64(i + 2, "CREDITS amount")?));
            i += 3;
            continue;
        } else {
            return Err(CmdError::err(format_args!(
                "unexpected argument '{}' (expected {})",
                printable(args.bytes(i).unwrap_or(b"")),
                if acquire {
                    "COST, ENDPOINT, ID, TTL, WAIT, PRIORITY, CREDITS, COMPACT or ALSO"
                } else {
                    "COST, ENDPOINT, COMPACT or ALSO"
                }
            )));
        }
        i += 2;
    }
    if priority_given && parsed.wait_ms.is_none() {
        return Err(CmdError::err("PRIORITY only applies with WAIT"));
    }
    check_distinct_keys(&parsed)?;
    Ok(parsed)
}

/// Parses `ALSO count key plan [key plan ...]` starting at the keyword `i`; returns
/// the index after the last pair.
fn parse_also<'a>(
    args: &Args<'a>,
    i: usize,
    max_also: usize,
    also: &mut SmallVec<[(RawString, &'a str); 4]>,
) -> Result<usize, CmdError> {
    let count_at = value_at(args, i)?;
    let count = args.u64(count_at, "ALSO count")?;
    if count == 0 || count > max_also as u64 {
        return Err(CmdError::err(format_args!(
            "ALSO count must be between 1 and {max_also} (tollgate.max-also)"
        )));
    }
    let count = count as usize;
    let first = count_at + 1;
    if first + 2 * count > args.len() {
        return Err(CmdError::err(format_args!(
            "ALSO {count} needs {count} key and plan pairs"
        )));
    }
    for n in 0..count {
        let key = args.raw(first + 2 * n).ok_or(CmdError::WrongArity)?;
        if bytes_of(key).len() > MAX_LINK_LEN {
            return Err(CmdError::err(format_args!(
                "an ALSO key may be at most {MAX_LINK_LEN} bytes"
            )));
        }
        let plan = args.str(first + 2 * n + 1, "ALSO plan")?;
        also.push((key, plan));
    }
    Ok(first + 2 * count)
}

/// Refuses a call that names one key twice (two pairs, or a pair and the credits
/// key): one key is one subject, charged once.
fn check_distinct_keys(parsed: &CallArgs<'_>) -> Result<(), CmdError> {
    let mut names: SmallVec<[&[u8]; 6]> = parsed.keys().iter().map(|&k| bytes_of(k)).collect();
    if let Some((credits, _)) = parsed.credits {
        names.push(bytes_of(credits));
    }
    for (i, a) in names.iter().enumerate() {
        if names.iter().skip(i + 1).any(|b| b == a) {
            return Err(CmdError::err(format_args!(
                "key '{}' is named twice in one call",
                printable(a)
            )));
        }
    }
    Ok(())
}

/// A parsed `RL.USAGE key plan [ENDPOINT name]`.
pub struct UsageArgs<'a> {
    pub key: RawString,
    pub plan: &'a str,
    pub endpoint: Option<&'a str>,
}

pub fn parse_usage<'a>(args: &Args<'a>) -> Result<UsageArgs<'a>, CmdError> {
    let unexpected = |i: usize| {
        CmdError::err(format_args!(
            "unexpected argument '{}' (expected ENDPOINT)",
            printable(args.bytes(i).unwrap_or(b""))
        ))
    };
    let endpoint = match args.len() {
        0..=2 => return Err(CmdError::WrongArity),
        3 => None,
        _ if !args.is(3, "ENDPOINT") => return Err(unexpected(3)),
        _ => Some(args.name(value_at(args, 3)?, "ENDPOINT")?),
    };
    match args.len() {
        0..=5 => {}
        _ if args.is(5, "ENDPOINT") => return Err(twice("ENDPOINT")),
        _ => return Err(unexpected(5)),
    }
    Ok(UsageArgs {
        key: args.raw(1).ok_or(CmdError::WrongArity)?,
        plan: args.str(2, "plan")?,
        endpoint,
    })
}

/// A parsed `RL.RELEASE key request-id [COST unit actual ...]`.
pub struct ReleaseArgs<'a> {
    pub key: RawString,
    pub id: &'a [u8],
    pub actual: CostList<'a>,
}

pub fn parse_release<'a>(args: &Args<'a>) -> Result<ReleaseArgs<'a>, CmdError> {
    if args.len() < 3 {
        return Err(CmdError::WrongArity);
    }
    let id = args.bytes(2).unwrap_or(b"");
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(CmdError::err(format_args!(
            "request id must be 1 to {MAX_ID_LEN} bytes"
        )));
    }
    let mut actual = CostList::new();
    if args.len() > 3 {
        if !args.is(3, "COST") {
            return Err(CmdError::err(format_args!(
                "unexpected argument '{}' (expected COST)",
                printable(args.bytes(3).unwrap_or(b""))
            )));
        }
        let end = parse_costs(args, 3, &mut actual)?;
        if end < args.len() {
            return Err(CmdError::err(format_args!(
                "unexpected argument '{}' after COST",
                printable(args.bytes(end).unwrap_or(b""))
            )));
        }
    }
    Ok(ReleaseArgs {
        key: args.raw(1).ok_or(CmdError::WrongArity)?,
        id,
        actual,
    })
}
