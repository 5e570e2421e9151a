//! `RL.RELEASE` and `RL.TOUCH`: ending and extending in-flight requests (leases and
//! reservations), settling estimates against actual costs.

use tollgate_core::decide;

use super::parse::parse_release;
use crate::args::{Args, CmdError, CmdResult};
use crate::reply::reply_limits;
use crate::server::Ctx;
use crate::state::{track_requests, State, STATE};
use crate::store::{open_subject, requests_len, subject_in, write_back, Change};

fn busy(e: &str) -> CmdError {
    CmdError::err(e)
}

/// `RL.RELEASE key request-id [COST unit actual ...]` → `{released, plan, limits}`.
pub fn release(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    let parsed = parse_release(&args)?;
    STATE
        .with(|state| {
            let State {
                plans,
                stats,
                outcomes,
                payload,
                ..
            } = state;
            let key = open_subject(ctx, parsed.key, true)?;
            let Some(subject) = subject_in(&key) else {
                stats.releases_unknown += 1;
                return reply_unreleased(ctx);
            };
            let before = requests_len(Some(subject));
            let had_requests = subject.requests().is_some();
            let actual: Vec<(&str, u64)> = parsed.actual.pairs().collect();
            let Some(settled) = decide::release(subject, parsed.id, &actual, ctx.now_ms()) else {
                stats.releases_unknown += 1;
                return reply_unreleased(ctx);
            };
            stats.releases += 1;
            track_requests(before, requests_len(Some(subject)));
            let plan = plans.get(&settled.plan).cloned();
            if let Some(plan) = plan.as_deref() {
                decide::report(plan, Some(subject), settled.now, outcomes);
            } else {
                outcomes.clear();
            }
            let change = Change {
                purged_at: had_requests.then_some(settled.now),
                removed: Some(parsed.id),
                ..Change::default()
            };
            write_back(ctx, &key, parsed.key, None, change, payload)?;
            ctx.signal_ready(parsed.key);
            ctx.reply_map(3);
            ctx.reply_cstr(c"released");
            ctx.reply_integer(1);
            ctx.reply_cstr(c"plan");
            ctx.reply_bulk(settled.plan.as_bytes());
            ctx.reply_cstr(c"limits");
            match plan {
                Some(plan) => reply_limits(ctx, &plan, outcomes),
                None => ctx.reply_array(0),
            }
            Ok(())
        })
        .map_err(busy)?
}

fn reply_unreleased(ctx: &Ctx) -> CmdResult {
    ctx.reply_map(1);
    ctx.reply_cstr(c"released");
    ctx.reply_integer(0);
    Ok(())
}

/// `RL.TOUCH key request-id ttl-ms` → 1 if the live request now expires `ttl-ms` from
/// now, 0 if there is no such live request.
pub fn touch(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() != 4 {
        return Err(CmdError::WrongArity);
    }
    let name = args.raw(1).ok_or(CmdError::WrongArity)?;
    let id = args.bytes(2).unwrap_or(b"");
    if id.is_empty() || id.len() > tollgate_core::requests::MAX_ID_LEN {
        return Err(CmdError::err(format_args!(
            "request id must be 1 to {} bytes",
            tollgate_core::requests::MAX_ID_LEN
        )));
    }
    let ttl = args.u64(3, "ttl-ms")?;
    if ttl == 0 || ttl > tollgate_core::time::MAX_WINDOW_MS {
        return Err(CmdError::err(format_args!(
            "ttl-ms must be between 1 and {}",
            tollgate_core::time::MAX_WINDOW_MS
        )));
    }
    STATE
        .with(|state| {
            let key = open_subject(ctx, name, true)?;
            let touched = match subject_in(&key) {
                Some(subject) => {
                    let before = requests_len(Some(subject));
                    let had_requests = subject.requests().is_some();
                    let expires = decide::touch(subject, id, ttl, ctx.now_ms());
                    if expires.is_some() {
                        track_requests(before, requests_len(Some(subject)));
                        let now = subject.updated_ms;
                        let change = Change {
                            purged_at: had_requests.then_some(now),
                            put: Some(id),
                            ..Change::default()
                        };
                        write_back(ctx, &key, name, None, change, &mut state.payload)?;
                    }
                    expires.is_some()
                }
                None => false,
            };
            state.stats.touches += u64::from(touched);
            ctx.reply_integer(i64::from(touched));
            Ok(())
        })
        .map_err(busy)?
}
