//! `RL.ACQUIRE`, `RL.PEEK` and `RL.THROTTLE`: decide a call against a plan and, for
//! an admitted acquire, charge it — in one atomic step, with the server clock read once.

use std::sync::Arc;

use tollgate_core::decide::{self, Call, Costs, Decided, Denial, Outcome};
use tollgate_core::limits::Admission;
use tollgate_core::plan::{Mode, Plan, Plans};
use tollgate_core::requests::MAX_ID_LEN;
use tollgate_core::spec::{Rule, DEFAULT_UNIT};
use tollgate_core::subject::Subject;
use tollgate_core::time::MAX_WINDOW_MS;

use crate::args::{is_integer, printable, Args, CmdError, CmdResult};
use crate::server::{Ctx, RawString};
use crate::state::{State, Stats, STATE};
use crate::store::{open_subject, subject_in, write_back, Change};

/// Most `COST` units one call may name.
pub const MAX_COST_UNITS: usize = 16;

const KEYWORDS: [&str; 7] = [
    "COST", "ENDPOINT", "ID", "TTL", "WAIT", "PRIORITY", "CREDITS",
];

/// A parsed `RL.ACQUIRE` / `RL.PEEK`.
struct CallArgs<'a> {
    key: RawString,
    plan: &'a str,
    request: u64,
    units: [(&'a str, u64); MAX_COST_UNITS],
    nunits: usize,
    endpoint: Option<&'a str>,
    id: Option<&'a [u8]>,
    ttl_ms: Option<u64>,
}

impl<'a> CallArgs<'a> {
    fn call(&'a self) -> Call<'a> {
        Call {
            costs: Costs {
                request: self.request,
                units: self.units.get(..self.nunits).unwrap_or(&[]),
            },
            endpoint: self.endpoint,
            id: self.id,
            ttl_ms: self.ttl_ms,
        }
    }
}

fn is_keyword(args: &Args<'_>, i: usize) -> bool {
    KEYWORDS.iter().any(|k| args.is(i, k))
}

/// The index of the value following keyword `i`, or an error naming the keyword.
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

/// Parses `key plan [units] [COST unit n ...] [ENDPOINT e] [ID id] [TTL ms]`;
/// `acquire` allows the options only `RL.ACQUIRE` takes.
fn parse_call<'a>(args: &Args<'a>, acquire: bool) -> Result<CallArgs<'a>, CmdError> {
    if args.len() < 3 {
        return Err(CmdError::WrongArity);
    }
    let key = args.raw(1).ok_or(CmdError::WrongArity)?;
    let plan = args.str(2, "plan")?;
    let mut parsed = CallArgs {
        key,
        plan,
        request: 1,
        units: [("", 0); MAX_COST_UNITS],
        nunits: 0,
        endpoint: None,
        id: None,
        ttl_ms: None,
    };
    let mut i = 3;
    let mut request_given = false;
    if args.bytes(i).is_some_and(is_integer) {
        parsed.request = args.u64(i, "units")?;
        request_given = true;
        i += 1;
    }
    let mut cost_given = false;
    while i < args.len() {
        if args.is(i, "COST") {
            if cost_given {
                return Err(twice("COST"));
            }
            cost_given = true;
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
                let amount = args.u64(i + 1, "COST amount")?;
                if unit == DEFAULT_UNIT {
                    if request_given {
                        return Err(CmdError::err(
                            "the request cost is given twice (units and COST request)",
                        ));
                    }
                    request_given = true;
                    parsed.request = amount;
                } else {
                    let taken = parsed.units.get(..parsed.nunits).unwrap_or(&[]);
                    if taken.iter().any(|(u, _)| *u == unit) {
                        return Err(CmdError::err(format_args!(
                            "COST unit '{unit}' given twice"
                        )));
                    }
                    let slot = parsed.units.get_mut(parsed.nunits).ok_or_else(|| {
                        CmdError::err(format_args!("COST names more than {MAX_COST_UNITS} units"))
                    })?;
                    *slot = (unit, amount);
                    parsed.nunits += 1;
                }
                i += 2;
            }
        } else if args.is(i, "ENDPOINT") {
            if parsed.endpoint.is_some() {
                return Err(twice("ENDPOINT"));
            }
            parsed.endpoint = Some(args.name(value_at(args, i)?, "ENDPOINT")?);
            i += 2;
        } else if acquire && args.is(i, "ID") {
            if parsed.id.is_some() {
                return Err(twice("ID"));
            }
            let id = args.bytes(value_at(args, i)?).unwrap_or(b"");
            if id.is_empty() || id.len() > MAX_ID_LEN {
                return Err(CmdError::err(format_args!(
                    "ID must be 1 to {MAX_ID_LEN} bytes"
                )));
            }
            parsed.id = Some(id);
            i += 2;
        } else if acquire && args.is(i, "TTL") {
            if parsed.ttl_ms.is_some() {
                return Err(twice("TTL"));
            }
            let ttl = args.u64(value_at(args, i)?, "TTL")?;
            if ttl == 0 || ttl > MAX_WINDOW_MS {
                return Err(CmdError::err(format_args!(
                    "TTL must be between 1 and {MAX_WINDOW_MS} ms"
                )));
            }
            parsed.ttl_ms = Some(ttl);
            i += 2;
        } else {
            return Err(CmdError::err(format_args!(
                "unexpected argument '{}' (expected {})",
                printable(args.bytes(i).unwrap_or(b"")),
                if acquire {
                    "COST, ENDPOINT, ID or TTL"
                } else {
                    "COST or ENDPOINT"
                }
            )));
        }
    }
    Ok(parsed)
}

/// The plan a call names: a plan name, or `*` for the subject's assigned plan, else
/// the default plan.
pub fn resolve_plan(
    plans: &Plans,
    name: &str,
    subject: Option<&Subject>,
) -> Result<Arc<Plan>, CmdError> {
    let resolved = if name == "*" {
        subject
            .and_then(Subject::assigned)
            .or(plans.default_plan())
            .ok_or_else(|| {
                CmdError::err(
                    "plan '*': the subject has no assigned plan and no default plan is set",
                )
            })?
    } else {
        name
    };
    plans.get(resolved).cloned().ok_or_else(|| {
        CmdError::err(format_args!(
            "unknown plan '{}'",
            printable(resolved.as_bytes())
        ))
    })
}

fn count_denial(stats: &mut Stats, decided: &Decided) {
    match decided.verdict.denied_by {
        Some(Denial::Endpoint) => stats.denied_endpoint += 1,
        Some(Denial::Limit(i)) => match decided.plan.limits.get(i).map(|l| &l.spec.rule) {
            Some(Rule::Fixed { .. }) => stats.denied_fixed += 1,
            Some(Rule::Sliding { .. }) => stats.denied_sliding += 1,
            Some(Rule::Bucket { .. }) => stats.denied_bucket += 1,
            Some(Rule::Concurrency { .. }) => stats.denied_concurrency += 1,
            Some(Rule::Cap { .. }) | None => stats.denied_cap += 1,
        },
        None => {}
    }
}

fn denial_name(decided: &Decided) -> Option<&str> {
    match decided.verdict.denied_by? {
        Denial::Endpoint => Some("endpoint"),
        Denial::Limit(i) => decided.plan.limits.get(i).map(|l| &*l.name),
    }
}

/// Writes the reply of `RL.ACQUIRE` / `RL.PEEK`.
fn reply_decision(ctx: &Ctx, decided: &Decided, outcomes: &[Outcome], id: Option<&[u8]>) {
    let verdict = &decided.verdict;
    let plan = &decided.plan;
    let shadow = plan.mode == Mode::Shadow;
    let enforced_denial = !verdict.admitted;
    ctx.reply_map(5 + usize::from(id.is_some()) + usize::from(shadow));
    ctx.reply_cstr(c"allowed");
    ctx.reply_integer(i64::from(verdict.admitted));
    ctx.reply_cstr(c"retry_after_ms");
    ctx.reply_integer(if enforced_denial {
        verdict.admission.retry_after_ms()
    } else {
        0
    });
    ctx.reply_cstr(c"denied_by");
    match denial_name(decided).filter(|_| enforced_denial) {
        Some(name) => ctx.reply_bulk(name.as_bytes()),
        None => ctx.reply_null(),
    }
    if shadow {
        ctx.reply_cstr(c"shadow_denied_by");
        match denial_name(decided)
            .filter(|_| verdict.admitted && verdict.admission != Admission::Now)
        {
            Some(name) => ctx.reply_bulk(name.as_bytes()),
            None => ctx.reply_null(),
        }
    }
    ctx.reply_cstr(c"plan");
    ctx.reply_bulk(plan.name.as_bytes());
    if let Some(id) = id {
        ctx.reply_cstr(c"id");
        ctx.reply_bulk(id);
    }
    ctx.reply_cstr(c"limits");
    reply_limits(ctx, plan, outcomes);
}

/// The `limits` array: one map per limit.
pub fn reply_limits(ctx: &Ctx, plan: &Plan, outcomes: &[Outcome]) {
    ctx.reply_array(outcomes.len());
    for outcome in outcomes {
        let Some(limit) = plan.limits.get(outcome.limit) else {
            ctx.reply_null();
            continue;
        };
        ctx.reply_map(6);
        ctx.reply_cstr(c"name");
        ctx.reply_bulk(limit.name.as_bytes());
        ctx.reply_cstr(c"unit");
        ctx.reply_bulk(limit.spec.unit.as_bytes());
        ctx.reply_cstr(c"limit");
        ctx.reply_integer(clamp(limit.spec.rule.capacity()));
        ctx.reply_cstr(c"remaining");
        ctx.reply_integer(clamp(outcome.remaining));
        ctx.reply_cstr(c"reset_ms");
        ctx.reply_integer(clamp(outcome.reset_ms));
        ctx.reply_cstr(c"warn");
        ctx.reply_integer(i64::from(outcome.warn));
    }
}

/// RESP integers are signed: amounts past `i64::MAX` are shown as `i64::MAX`.
pub fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn busy(e: &str) -> CmdError {
    CmdError::err(e)
}

/// `RL.ACQUIRE key plan [units] [COST unit n ...] [ENDPOINT name] [ID id] [TTL ms]`
pub fn acquire(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    let parsed = parse_call(&args, true)?;
    STATE
        .with(|state| run_call(ctx, state, &parsed, true))
        .map_err(busy)?
}

/// `RL.PEEK key plan [units] [COST unit n ...] [ENDPOINT name]`
pub fn peek(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    let parsed = parse_call(&args, false)?;
    STATE
        .with(|state| run_call(ctx, state, &parsed, false))
        .map_err(busy)?
}

fn run_call(ctx: &Ctx, state: &mut State, parsed: &CallArgs<'_>, charge: bool) -> CmdResult {
    let State {
        plans,
        interner,
        stats,
        settings,
        outcomes,
        payload,
    } = state;
    let key = open_subject(ctx, parsed.key, charge)?;
    let subject = subject_in(&key);
    let requested = resolve_plan(plans, parsed.plan, subject.as_deref())?;
    let call = parsed.call();
    let clock = ctx.now_ms();
    let decided = decide::decide(
        plans,
        &requested,
        subject.as_deref(),
        &call,
        clock,
        settings,
        outcomes,
    );
    let verdict = decided.verdict;
    if !charge {
        reply_decision(ctx, &decided, outcomes, None);
        return Ok(());
    }
    if verdict.admitted && verdict.takes_request {
        if let (Some(id), Some(s)) = (call.id, subject.as_deref()) {
            if s.requests()
                .and_then(|t| t.get(id))
                .is_some_and(|r| r.expires_at > verdict.now)
            {
                return Err(CmdError::err(format_args!(
                    "request id '{}' is already in flight on this key",
                    printable(id)
                )));
            }
        }
    }
    stats.calls += 1;
    let mut id = None;
    if verdict.admitted {
        stats.admitted += 1;
        if !verdict.admission.is_now() {
            stats.shadow_denied += 1;
        }
        if !Arc::ptr_eq(&decided.plan, &requested) {
            stats.fallback_admitted += 1;
        }
        let had_requests = subject.as_deref().is_some_and(|s| s.requests().is_some());
        let mut fresh: Option<Box<Subject>> = None;
        let target: &mut Subject = match subject {
            Some(s) => s,
            None => fresh.insert(Box::new(Subject::new(
                Arc::clone(&decided.plan.layout),
                verdict.now,
            ))),
        };
        id = decide::commit(&decided.plan, target, &call, &verdict, interner);
        let change = Change {
            purged_at: had_requests.then_some(verdict.now),
            put: id.as_deref(),
            seq: id.is_some() && call.id.is_none(),
            ..Change::default()
        };
        write_back(ctx, &key, parsed.key, fresh, change, payload)?;
    } else {
        stats.denied += 1;
        count_denial(stats, &decided);
    }
    // Operators who enable module keyspace events (notify-keyspace-events with `d`)
    // see denials, shadow denials included, and first crossings of warn thresholds.
    if !verdict.admission.is_now() {
        ctx.notify(c"rl.denied", parsed.key);
    }
    if verdict.admitted && outcomes.iter().any(|o| o.warn_crossed) {
        stats.warn_crossed += 1;
        ctx.notify(c"rl.warn", parsed.key);
    }
    reply_decision(ctx, &decided, outcomes, id.as_deref());
    Ok(())
}

/// `RL.THROTTLE key max_burst count period [quantity]`: redis-cell's `CL.THROTTLE`.
/// Replies `[limited, limit, remaining, retry_after_s, reset_after_s]`.
pub fn throttle(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() != 5 && args.len() != 6 {
        return Err(CmdError::WrongArity);
    }
    let key_name = args.raw(1).ok_or(CmdError::WrongArity)?;
    let max_burst = args.u64(2, "max_burst")?;
    let count = args.u64(3, "count")?;
    let period = args.u64(4, "period")?;
    let quantity = if args.len() == 6 {
        args.u64(5, "quantity")?
    } else {
        1
    };
    if count == 0 {
        return Err(CmdError::err("count must be at least 1"));
    }
    let burst = max_burst
        .checked_add(1)
        .ok_or_else(|| CmdError::err("max_burst is larger than 18446744073709551614"))?;
    let window_ms = period
        .checked_mul(1_000)
        .filter(|&ms| (1..=MAX_WINDOW_MS).contains(&ms))
        .ok_or_else(|| {
            CmdError::err(format_args!(
                "period must be between 1 and {} seconds",
                MAX_WINDOW_MS / 1_000
            ))
        })?;
    STATE
        .with(|state| {
            // A one-limit plan built from the arguments (interned, so its layout is
            // shared by every key throttled with the same period).
            let fields = [(
                "throttle",
                format!("bucket {count}/{window_ms}ms burst {burst}"),
            )];
            let pairs: Vec<(Box<str>, Box<str>)> = fields
                .iter()
                .map(|(f, v)| (Box::<str>::from(*f), Box::<str>::from(v.as_str())))
                .collect();
            let plan =
                Plan::compile("rl.throttle", pairs, &mut state.interner).map_err(CmdError::err)?;
            let plan = Arc::new(plan);
            let key = open_subject(ctx, key_name, true)?;
            let subject = subject_in(&key);
            let call = Call {
                costs: Costs {
                    request: quantity,
                    units: &[],
                },
                ..Call::default()
            };
            let verdict = decide::evaluate(
                &plan,
                subject.as_deref(),
                &call,
                ctx.now_ms(),
                &state.settings,
                &mut state.outcomes,
            );
            let outcome = state.outcomes.first().copied();
            state.stats.calls += 1;
            if verdict.admitted {
                state.stats.admitted += 1;
                let mut fresh: Option<Box<Subject>> = None;
                let target: &mut Subject = match subject {
                    Some(s) => s,
                    None => fresh.insert(Box::new(Subject::new(
                        Arc::clone(&plan.layout),
                        verdict.now,
                    ))),
                };
                decide::commit(&plan, target, &call, &verdict, &mut state.interner);
                write_back(
                    ctx,
                    &key,
                    key_name,
                    fresh,
                    Change::default(),
                    &mut state.payload,
                )?;
            } else {
                state.stats.denied += 1;
                state.stats.denied_bucket += 1;
            }
            let (remaining, reset_ms) = outcome.map_or((0, 0), |o| (o.remaining, o.reset_ms));
            let secs = |ms: u64| clamp(ms.div_ceil(1_000));
            ctx.reply_array(5);
            ctx.reply_integer(i64::from(!verdict.admitted));
            ctx.reply_integer(clamp(burst));
            ctx.reply_integer(clamp(remaining));
            ctx.reply_integer(match verdict.admission {
                _ if verdict.admitted => -1,
                Admission::After(ms) => secs(ms),
                Admission::Now | Admission::Never => -1,
            });
            ctx.reply_integer(secs(reset_ms));
            Ok(())
        })
        .map_err(busy)?
}
