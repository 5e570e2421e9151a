//! `RL.ACQUIRE`, `RL.PEEK` and `RL.THROTTLE`: decide a call against a plan and, for
//! an admitted acquire, charge it — in one atomic step, with the server clock read once.

use std::sync::Arc;

use tollgate_core::credits::Touched;
use tollgate_core::decide::{self, Call, CommitError, Costs, Decided, Denial};
use tollgate_core::layout::{LayoutInterner, MAX_SLOTS};
use tollgate_core::limits::Admission;
use tollgate_core::plan::{Plan, Plans};
use tollgate_core::spec::Rule;
use tollgate_core::subject::Subject;
use tollgate_core::time::MAX_WINDOW_MS;

use super::parse::{parse_call, Accept, CallArgs};
use crate::args::{printable, Args, CmdError, CmdResult};
use crate::reply::{clamp, reply_decision, Extras};
use crate::server::{Ctx, Key, RawString};
use crate::state::{track_requests, State, Stats, STATE};
use crate::store::{
    credits_in, open_credits, open_subject, requests_len, subject_in, subject_or_new, write_back,
    write_back_credits, Change,
};

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

/// Refuses a new request whose id is already in flight, or past the per-key cap.
fn check_room_for_request(subject: Option<&Subject>, id: Option<&[u8]>, now: u64) -> CmdResult {
    let Some(requests) = subject.and_then(Subject::requests) else {
        return Ok(());
    };
    if let Some(id) = id {
        if requests.get(id).is_some_and(|r| r.expires_at > now) {
            return Err(CmdError::err(format_args!(
                "request id '{}' is already in flight on this key",
                printable(id)
            )));
        }
    }
    let max = crate::config::max_requests_per_key();
    // Cheap unless the table is near the cap: expired requests do not count.
    if requests.len() >= max && requests.len() - requests.expired(now).count() >= max {
        return Err(CmdError::err(format_args!(
            "this key already holds {max} requests in flight (tollgate.max-requests-per-key)"
        )));
    }
    Ok(())
}

fn busy(e: &str) -> CmdError {
    CmdError::err(e)
}

/// `RL.ACQUIRE key plan [units] [COST unit n ...] [ENDPOINT name] [ID id] [TTL ms]`
pub fn acquire(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    let parsed = parse_call(&args, Accept::Acquire)?;
    STATE
        .with(|state| run_call(ctx, state, &parsed, true))
        .map_err(busy)?
}

/// `RL.PEEK key plan [units] [COST unit n ...] [ENDPOINT name]`
pub fn peek(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    let parsed = parse_call(&args, Accept::Peek)?;
    STATE
        .with(|state| run_call(ctx, state, &parsed, false))
        .map_err(busy)?
}

fn run_call(ctx: &Ctx, state: &mut State, parsed: &CallArgs<'_>, charge: bool) -> CmdResult {
    if let Some(wait_ms) = parsed.wait_ms.filter(|&w| {
        w > 0
            && charge
            && crate::wait::can_block(ctx)
            && crate::config::max_waiters_per_key() > 0
            && crate::config::max_waiters() > 0
    }) {
        return crate::wait::acquire_or_wait(ctx, state, parsed, wait_ms);
    }
    let attempted = attempt(ctx, state, parsed, charge)?;
    if charge {
        attempted.record(ctx, &mut state.stats, parsed.key);
    }
    attempted.reply(ctx, &state.outcomes);
    Ok(())
}

/// One decision on a call, charged if admitted and `charge` is set. The per-limit
/// outcomes are left in `state.outcomes` for the reply.
pub struct Attempted {
    pub decided: Decided,
    pub id: Option<Box<[u8]>>,
    /// The credits balance after the call (calls with `CREDITS`).
    pub credits: Option<u64>,
    /// The limits admitted the call but the credits key could not pay for it.
    pub credits_denied: bool,
    /// A fallback plan admitted the call.
    pub by_fallback: bool,
    /// The call took a limit past its warn threshold.
    pub warn_crossed: bool,
}

impl Attempted {
    pub fn admitted(&self) -> bool {
        self.decided.verdict.admitted && !self.credits_denied
    }

    /// Counts the final outcome of a call in `INFO` and raises its notifications
    /// (operators who enable module keyspace events see `rl.denied`, shadow denials
    /// included, and `rl.warn` on first crossings of warn thresholds).
    pub fn record(&self, ctx: &Ctx, stats: &mut Stats, key: RawString) {
        stats.calls += 1;
        let verdict = &self.decided.verdict;
        if self.admitted() {
            stats.admitted += 1;
            stats.shadow_denied += u64::from(!verdict.admission.is_now());
            stats.fallback_admitted += u64::from(self.by_fallback);
        } else {
            stats.denied += 1;
            if self.credits_denied {
                stats.denied_credits += 1;
            } else {
                count_denial(stats, &self.decided);
            }
        }
        if !verdict.admission.is_now() || self.credits_denied {
            ctx.notify(c"rl.denied", key);
        }
        if self.warn_crossed {
            stats.warn_crossed += 1;
            ctx.notify(c"rl.warn", key);
        }
    }

    pub fn reply(&self, ctx: &Ctx, outcomes: &[tollgate_core::decide::Outcome]) {
        let extras = Extras {
            id: self.id.as_deref(),
            credits: self.credits,
            credits_denied: self.credits_denied,
        };
        reply_decision(ctx, &self.decided, outcomes, extras);
    }
}

/// Decides `parsed` (the subject key, its plan and fallbacks, and the credits key if
/// named) at the server clock and, for an admitted `charge`, charges the limits and
/// the credits in one step, then stores, replicates and signals both keys.
pub fn attempt(
    ctx: &Ctx,
    state: &mut State,
    parsed: &CallArgs<'_>,
    charge: bool,
) -> Result<Attempted, CmdError> {
    let State {
        plans,
        interner,
        settings,
        outcomes,
        payload,
        ..
    } = state;
    *settings = crate::config::settings();
    let key = open_subject(ctx, parsed.key, charge)?;
    let credits_key = match parsed.credits {
        Some((name, amount)) => Some((open_credits(ctx, name, charge)?, name, amount)),
        None => None,
    };
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
    let mut attempted = Attempted {
        decided,
        id: None,
        credits: None,
        credits_denied: false,
        by_fallback: false,
        warn_crossed: false,
    };
    if let Some((ckey, _, amount)) = &credits_key {
        let balance = credits_in(ckey).map_or(0, |c| c.balance(c.effective_now(clock)));
        attempted.credits = Some(balance);
        if verdict.admitted && balance < *amount {
            // Credits are money: shadow mode does not waive them.
            attempted.credits_denied = true;
            decide::standing(
                &attempted.decided.plan,
                subject.as_deref(),
                &call,
                clock,
                outcomes,
            );
        }
    }
    if !charge {
        return Ok(attempted);
    }
    if attempted.admitted() && verdict.takes_request {
        check_room_for_request(subject.as_deref(), call.id, verdict.now)?;
    }
    if let (Some((ckey, _, _)), Some(id)) = (&credits_key, call.id) {
        // The id names the credits deduction too: a remembered one would make the
        // deduction a no-op repeat, admitting the call for free.
        if credits_in(ckey).is_some_and(|c| c.remembers_deduction(id, clock)) {
            return Err(CmdError::err(format_args!(
                "request id '{}' was already used for a deduction on the credits key \
                 (ids are remembered for tollgate.idempotency-window-ms); use a new id",
                printable(id)
            )));
        }
    }
    let decided = &attempted.decided;
    attempted.by_fallback = !Arc::ptr_eq(&decided.plan, &requested);
    if attempted.admitted() {
        let id = charge_subject(ctx, (&key, parsed.key), decided, &call, interner, payload)?;
        if let Some((ckey, name, amount)) = &credits_key {
            attempted.credits = Some(charge_credits(
                ctx, ckey, *name, *amount, call.id, clock, payload,
            )?);
        }
        attempted.id = id;
        attempted.warn_crossed = outcomes.iter().any(|o| o.warn_crossed);
    }
    Ok(attempted)
}

/// Charges an admitted call to its subject (created if the key is empty), then
/// stores, replicates and signals the key. Returns the request id it registered.
/// The one path every charging command takes, so that what the primary changed
/// (expired requests purged, the id sequence) is always what it replicates.
fn charge_subject(
    ctx: &Ctx,
    (key, name): (&Key, RawString),
    decided: &Decided,
    call: &Call<'_>,
    interner: &mut LayoutInterner,
    payload: &mut Vec<u8>,
) -> Result<Option<Box<[u8]>>, CmdError> {
    let verdict = &decided.verdict;
    let mut fresh: Option<Box<Subject>> = None;
    let target = subject_or_new(
        key,
        &mut fresh,
        || Arc::clone(&decided.plan.layout),
        verdict.now,
    );
    let had_requests = target.requests().is_some();
    let before = requests_len(Some(target));
    let id = decide::commit(&decided.plan, target, call, verdict, interner).map_err(
        |CommitError::TooManySlots| {
            CmdError::err(format_args!(
                "this key holds usage in {MAX_SLOTS} differently counted limits; \
                 wait for some to go idle or use another key"
            ))
        },
    )?;
    track_requests(before, requests_len(Some(target)));
    let change = Change {
        purged_at: had_requests.then_some(verdict.now),
        put: id.as_deref(),
        seq: id.is_some() && call.id.is_none(),
        ..Change::default()
    };
    write_back(ctx, key, name, fresh, change, payload)?;
    Ok(id)
}

/// Deducts `amount` from the credits key of an admitted call (known to cover it),
/// with the call's request id as the deduction id so it can be refunded.
fn charge_credits(
    ctx: &Ctx,
    key: &Key,
    name: RawString,
    amount: u64,
    id: Option<&[u8]>,
    clock: u64,
    payload: &mut Vec<u8>,
) -> Result<u64, CmdError> {
    let settings = crate::config::credit_settings();
    let mut touched = Touched::default();
    let (_, balance) = match credits_in(key) {
        Some(credits) => credits.deduct(amount, false, id, clock, &settings, &mut touched),
        // Only a zero amount is covered by a missing key: nothing to store.
        None => return Ok(0),
    };
    write_back_credits(ctx, key, name, None, &touched, payload)?;
    Ok(balance)
}

/// Most distinct `RL.THROTTLE` parameter sets kept compiled; past it the cache starts
/// over (a client cycling through parameters costs a compile per call, nothing more).
const MAX_THROTTLE_PLANS: usize = 1_024;

/// The one-limit plan of `RL.THROTTLE` with these parameters, compiled once.
fn throttle_plan(
    state: &mut State,
    count: u64,
    window_ms: u64,
    burst: u64,
) -> Result<Arc<Plan>, CmdError> {
    let params = (count, window_ms, burst);
    if let Some(plan) = state.throttle_plans.get(&params) {
        return Ok(Arc::clone(plan));
    }
    let fields = vec![(
        Box::<str>::from("throttle"),
        format!("bucket {count}/{window_ms}ms burst {burst}").into_boxed_str(),
    )];
    let plan =
        Arc::new(Plan::compile("rl.throttle", fields, &mut state.interner).map_err(CmdError::err)?);
    if state.throttle_plans.len() >= MAX_THROTTLE_PLANS {
        state.throttle_plans.clear();
    }
    state.throttle_plans.insert(params, Arc::clone(&plan));
    Ok(plan)
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
            let plan = throttle_plan(state, count, window_ms, burst)?;
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
                let decided = Decided { plan, verdict };
                charge_subject(
                    ctx,
                    (&key, key_name),
                    &decided,
                    &call,
                    &mut state.interner,
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
