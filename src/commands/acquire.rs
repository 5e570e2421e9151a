//! `RL.ACQUIRE`, `RL.PEEK`, `RL.USAGE` and `RL.THROTTLE`: deciding calls.

use tollgate_core::decide::{self, Call, Costs, Pair};
use tollgate_core::subject::Subject;
use tollgate_core::throttle::Throttle;

use crate::args::{Args, CmdError, CmdResult};
use crate::call::attempt;
use crate::parse::{parse_call, parse_usage, Accept, CallArgs};
use crate::reply;
use crate::server::Ctx;
use crate::state::{State, STATE};
use crate::store::{open, write_subject};

/// `RL.ACQUIRE key plan [units] [COST ...] [ENDPOINT e] [ID id] [TTL ms] [WAIT ms
/// [PRIORITY p]] [CREDITS key n] [COMPACT] [ALSO count key plan ...]`
pub fn acquire(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    let parsed = parse_call(&args, Accept::Acquire, crate::config::max_also())?;
    STATE
        .with(|state| run_call(ctx, state, &parsed, true))
        .map_err(CmdError::err)?
}

/// `RL.PEEK key plan [units] [COST ...] [ENDPOINT e] [COMPACT] [ALSO ...]`
pub fn peek(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    let parsed = parse_call(&args, Accept::Peek, crate::config::max_also())?;
    STATE
        .with(|state| run_call(ctx, state, &parsed, false))
        .map_err(CmdError::err)?
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
        attempted.record(ctx, &mut state.stats, &parsed.keys());
    }
    attempted.reply(ctx, parsed, false);
    Ok(())
}

/// `RL.USAGE key plan [ENDPOINT name]`: how the subject stands now, charging and
/// assuming nothing.
pub fn usage(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    let parsed = parse_usage(&args)?;
    let key = open::<Subject>(ctx, parsed.key, false)?;
    let subject = key.value::<Subject>();
    STATE
        .with(|state| {
            let plan = state
                .plans
                .resolve(parsed.plan, subject.and_then(Subject::assigned))
                .map_err(crate::call::resolve_error)?;
            let part = decide::usage(plan, subject, parsed.endpoint, ctx.now_ms());
            reply::usage(ctx, &part);
            Ok(())
        })
        .map_err(CmdError::err)?
}

/// `RL.THROTTLE key max_burst count period [quantity]`: redis-cell's `CL.THROTTLE`.
/// Replies `[limited, limit, remaining, retry_after_s, reset_after_s]`.
pub fn throttle(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() != 5 && args.len() != 6 {
        return Err(CmdError::WrongArity);
    }
    let name = args.raw(1).ok_or(CmdError::WrongArity)?;
    let throttle = Throttle::new(
        args.u64(2, "max_burst")?,
        args.u64(3, "count")?,
        args.u64(4, "period")?,
    )
    .map_err(CmdError::err)?;
    let quantity = if args.len() == 6 {
        args.u64(5, "quantity")?
    } else {
        1
    };
    STATE
        .with(|state| {
            let State {
                plans,
                interner,
                throttle_plans,
                stats,
                payload,
                ..
            } = state;
            let plan = throttle_plans
                .plan(throttle, interner)
                .map_err(CmdError::err)?;
            let mut key = open::<Subject>(ctx, name, true)?;
            let call = Call {
                costs: Costs {
                    request: quantity,
                    units: &[],
                },
                ..Call::default()
            };
            let settings = crate::config::settings();
            let now = ctx.now_ms();
            let pairs = [Pair {
                subject: key.value::<Subject>(),
                plan: &plan,
            }];
            let decision = decide::decide(plans, &pairs, &call, None, now, &settings);
            stats.calls += 1;
            if decision.admitted() {
                stats.admitted += 1;
                let committed =
                    decide::commit(&decision, &pairs, &call, &[], &settings, interner, &|_| {
                        false
                    })
                    .map_err(|e| CmdError::err(format_args!("cannot charge the key: {e:?}")))?;
                for change in committed.changes {
                    write_subject(ctx, &mut key, name, change, payload)?;
                }
            } else {
                stats.denied += 1;
                stats.denied_bucket += 1;
            }
            let reply = throttle.reply(&decision);
            ctx.reply_array(reply.len());
            for value in reply {
                ctx.reply_integer(value);
            }
            Ok(())
        })
        .map_err(CmdError::err)?
}
