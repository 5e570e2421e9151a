//! One `RL.ACQUIRE` / `RL.PEEK` decision, end to end: open the call's keys once,
//! resolve its plans, let the core decide, and for an admitted acquire apply the
//! changes the core computed (subjects, then credits) — the path shared by commands
//! and waiters woken up (`crate::wait`).

use smallvec::SmallVec;
use tollgate_core::credits::{Credits, Touched};
use tollgate_core::decide::{self, CommitError, Decision, Denial, Pair, Verdict};
use tollgate_core::keyslot::key_slot;
use tollgate_core::spec::Rule;
use tollgate_core::subject::Subject;

use crate::args::{printable, CmdError};
use crate::parse::CallArgs;
use crate::reply::{self, Shown};
use crate::server::{bytes_of, Ctx, Key, RawString};
use crate::state::{State, Stats};
use crate::store::{open, write_credits, write_subject};

/// A decision taken on a call, and what it registered.
pub struct Attempted {
    pub decision: Decision,
    /// The request id registered (given or generated), or the retried one.
    pub id: Option<Box<[u8]>>,
    /// A fallback plan decided some pair.
    pub by_fallback: bool,
}

impl Attempted {
    /// Counts the final outcome of a call in `INFO` and raises its notifications
    /// (operators who enable module keyspace events see `rl.denied`, shadow denials
    /// included, and `rl.warn` on first crossings of warn thresholds).
    pub fn record(&self, ctx: &Ctx, stats: &mut Stats, keys: &[RawString]) {
        let d = &self.decision;
        stats.calls += 1;
        if d.admitted() {
            stats.admitted += 1;
            stats.shadow_denied += u64::from(d.shadow_denied());
            stats.fallback_admitted += u64::from(self.by_fallback);
        } else {
            stats.denied += 1;
            count_denial(stats, d);
        }
        let first = keys.first().copied();
        if let Some(key) = first.filter(|_| !d.admitted() || d.shadow_denied()) {
            ctx.notify(c"rl.denied", key);
        }
        for (part, &key) in d.parts.iter().zip(keys) {
            if d.admitted() && part.warn_crossed() {
                stats.warn_crossed += 1;
                ctx.notify(c"rl.warn", key);
            }
        }
    }

    /// Replies with the decision (`timed_out`: a `WAIT` that ran out).
    pub fn reply(&self, ctx: &Ctx, parsed: &CallArgs<'_>, timed_out: bool) {
        let keys: SmallVec<[&[u8]; 4]> = parsed.keys().iter().map(|&k| bytes_of(k)).collect();
        let shown = Shown {
            id: self.id.as_deref(),
            keys: &keys,
            also: parsed.has_also,
            timed_out,
            compact: parsed.compact,
        };
        reply::decision(ctx, &self.decision, shown);
    }
}

/// Counts a denial by what denied (a `WAIT` that ran out while the limits would admit
/// was denied by the queue).
pub fn count_denial(stats: &mut Stats, d: &Decision) {
    let part = match d.verdict {
        Verdict::Limits { part } => part,
        Verdict::Credits => {
            stats.denied_credits += 1;
            return;
        }
        Verdict::Admitted => {
            stats.denied_queue += 1;
            return;
        }
    };
    let Some(part) = d.parts.get(part) else {
        return;
    };
    match part.denied_by {
        Some(Denial::Endpoint) => stats.denied_endpoint += 1,
        Some(Denial::Limit(i)) => match part.plan.limits.get(i).map(|l| &l.spec.rule) {
            Some(Rule::Fixed { .. }) => stats.denied_fixed += 1,
            Some(Rule::Sliding { .. }) => stats.denied_sliding += 1,
            Some(Rule::Bucket { .. }) => stats.denied_bucket += 1,
            Some(Rule::Concurrency { .. }) => stats.denied_concurrency += 1,
            Some(Rule::Cap { .. }) | None => stats.denied_cap += 1,
        },
        None => {}
    }
}

/// The keys of a call beyond its first share its cluster slot, and the caller may
/// write them (read them, for a PEEK): Redis checks only the declared first key.
fn check_extra_keys(ctx: &Ctx, parsed: &CallArgs<'_>, charge: bool) -> Result<(), CmdError> {
    let extra: SmallVec<[RawString; 4]> = parsed
        .also
        .iter()
        .map(|(k, _)| *k)
        .chain(parsed.credits.map(|(k, _)| k))
        .collect();
    if extra.is_empty() {
        return Ok(());
    }
    if ctx.in_cluster() {
        let slot = key_slot(bytes_of(parsed.key));
        if extra.iter().any(|&k| key_slot(bytes_of(k)) != slot) {
            return Err(CmdError::Reply(
                "CROSSSLOT Keys in request don't hash to the same slot".into(),
            ));
        }
    }
    if extra.iter().any(|&k| !ctx.may_access_key(k, charge)) {
        return Err(CmdError::Reply(
            "NOPERM this user has no permissions to access one of the keys used as arguments"
                .into(),
        ));
    }
    Ok(())
}

/// While a slot migrates, keys of one call may be split between two nodes: like Redis
/// for multi-key commands, ask the client to retry when one of them is not here.
fn check_not_split(
    ctx: &Ctx,
    parsed: &CallArgs<'_>,
    keys: &[Key],
    credits: Option<&Key>,
) -> CmdResult {
    let multi = !parsed.also.is_empty() || parsed.credits.is_some();
    if !multi || !ctx.in_cluster() {
        return Ok(());
    }
    let some_missing = keys.iter().any(|k| k.value::<Subject>().is_none())
        || credits.is_some_and(|k| k.value::<Credits>().is_none());
    if some_missing && crate::cluster::slot_in_migration(ctx, key_slot(bytes_of(parsed.key))) {
        return Err(CmdError::Reply(
            "TRYAGAIN Multiple keys request during rehashing of slot".into(),
        ));
    }
    Ok(())
}

type CmdResult = Result<(), CmdError>;

/// Decides `parsed` at the server clock and, for an admitted `charge`, charges every
/// subject and the credits in one step, then stores, replicates and signals the keys.
pub fn attempt(
    ctx: &Ctx,
    state: &mut State,
    parsed: &CallArgs<'_>,
    charge: bool,
) -> Result<Attempted, CmdError> {
    let State {
        plans,
        interner,
        payload,
        ..
    } = state;
    let settings = crate::config::settings();
    check_extra_keys(ctx, parsed, charge)?;
    let names = parsed.keys();
    let mut keys: SmallVec<[Key; 4]> = SmallVec::new();
    for &name in &names {
        keys.push(open::<Subject>(ctx, name, charge)?);
    }
    let mut credits_key = match parsed.credits {
        Some((name, _)) => Some(open::<Credits>(ctx, name, charge)?),
        None => None,
    };
    check_not_split(ctx, parsed, &keys, credits_key.as_ref())?;
    let plan_args = parsed.plans();
    let mut resolved = SmallVec::<[_; 4]>::new();
    for (key, plan) in keys.iter().zip(&plan_args) {
        let assigned = key.value::<Subject>().and_then(Subject::assigned);
        let plan = plans.resolve(plan, assigned).map_err(resolve_error)?;
        resolved.push(std::sync::Arc::clone(plan));
    }
    let call = parsed.call();
    if crate::config::strict_units() {
        if let Some(unit) = decide::uncounted_unit(&call, plans, resolved.iter()) {
            return Err(CmdError::err(format_args!(
                "COST unit '{unit}' is counted by no limit of the call's plans \
                 (tollgate.strict-units is on)"
            )));
        }
    }
    let clock = ctx.now_ms();
    let credits_value = credits_key.as_ref().map(|k| k.value::<Credits>());
    let credits_arg = parsed
        .credits
        .zip(credits_value)
        .map(|((_, amount), c)| (c, amount));
    let pairs: SmallVec<[Pair<'_>; 4]> = keys
        .iter()
        .zip(&resolved)
        .map(|(key, plan)| Pair {
            subject: key.value::<Subject>(),
            plan,
        })
        .collect();
    let mut decision = decide::decide(plans, &pairs, &call, credits_arg, clock, &settings);
    if charge && parsed.compact && call.id.is_none() && decision.takes_request {
        // The integer reply has no room for a generated id: without it the lease
        // could not be released.
        return Err(CmdError::err(
            "COMPACT needs an ID when a plan holds leases (the reply cannot carry a generated id)",
        ));
    }
    let requested: SmallVec<[&_; 4]> = resolved.iter().collect();
    let by_fallback = decision.by_fallback(&requested);
    if decision.replayed {
        return Ok(Attempted {
            decision,
            id: call.id.map(Box::from),
            by_fallback,
        });
    }
    if !charge || !decision.admitted() {
        return Ok(Attempted {
            decision,
            id: None,
            by_fallback,
        });
    }
    let credits_now = credits_value.flatten();
    if let (Some(credits), Some(id)) = (credits_now, call.id) {
        // The id names the credits deduction too: a remembered one would make the
        // deduction a no-op repeat, admitting the call for free.
        if credits.remembers_deduction(id, clock) {
            return Err(CmdError::err(format_args!(
                "request id '{}' was already used for a deduction on the credits key \
                 (ids are remembered for tollgate.idempotency-window-ms); use a new id",
                printable(id)
            )));
        }
    }
    let links: SmallVec<[&[u8]; 4]> = names.iter().skip(1).map(|&k| bytes_of(k)).collect();
    let taken = |id: &[u8]| credits_now.is_some_and(|c| c.remembers_deduction(id, clock));
    let committed = decide::commit(
        &decision, &pairs, &call, &links, &settings, interner, &taken,
    )
    .map_err(|e| commit_error(e, &names))?;
    drop(pairs);
    for ((change, key), &name) in committed
        .changes
        .into_iter()
        .zip(keys.iter_mut())
        .zip(&names)
    {
        write_subject(ctx, key, name, change, payload)?;
    }
    if let (Some(key), Some((name, amount))) = (credits_key.as_mut(), parsed.credits) {
        let balance = charge_credits(
            ctx,
            key,
            name,
            amount,
            committed.id.as_deref(),
            clock,
            payload,
        )?;
        if let Some(c) = decision.credits.as_mut() {
            c.balance = balance;
        }
    }
    Ok(Attempted {
        decision,
        id: committed.id,
        by_fallback,
    })
}

/// A plan argument that names no plan.
pub fn resolve_error(e: tollgate_core::plan::ResolveError<'_>) -> CmdError {
    match e {
        tollgate_core::plan::ResolveError::Unknown(name) => CmdError::err(format_args!(
            "unknown plan '{}'",
            printable(name.as_bytes())
        )),
        e => CmdError::err(e),
    }
}

fn commit_error(e: CommitError, names: &[RawString]) -> CmdError {
    let key = |part: usize| printable(names.get(part).map_or(&b""[..], |&k| bytes_of(k)));
    match e {
        CommitError::TooManySlots { part } => CmdError::err(format_args!(
            "key '{}' holds usage in {} differently counted limits; wait for some to go \
             idle or use another key",
            key(part),
            tollgate_core::layout::MAX_SLOTS
        )),
        CommitError::TooManyRequests { part, max } => CmdError::err(format_args!(
            "key '{}' already holds {max} requests in flight (tollgate.max-requests-per-key)",
            key(part)
        )),
        CommitError::IdInFlight { part } => CmdError::err(format_args!(
            "the request id is in flight on key '{}' for another call; use a new id",
            key(part)
        )),
    }
}

/// Deducts `amount` from the credits key of an admitted call (known to cover it),
/// with the call's request id as the deduction id so it can be refunded. Returns the
/// balance after it.
fn charge_credits(
    ctx: &Ctx,
    key: &mut Key,
    name: RawString,
    amount: u64,
    id: Option<&[u8]>,
    clock: u64,
    payload: &mut Vec<u8>,
) -> Result<u64, CmdError> {
    let settings = crate::config::credit_settings();
    let mut touched = Touched::default();
    let (_, balance) = match key.value_mut::<Credits>() {
        Some(credits) => credits
            .deduct(amount, false, id, clock, &settings, &mut touched)
            .map_err(CmdError::err)?,
        // Only a zero amount is covered by a missing key: nothing to store.
        None => return Ok(0),
    };
    write_credits(ctx, key, name, None, &touched, payload)?;
    Ok(balance)
}
