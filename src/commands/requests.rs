//! `RL.RELEASE` and `RL.TOUCH`: ending and extending in-flight requests (leases and
//! reservations), settling estimates against actual costs — on the call's first key
//! and on every key the same call charged (`ALSO`).

use tollgate_core::decide::{self, NotReleased, Part};
use tollgate_core::limits::Admission;
use tollgate_core::subject::Subject;

use crate::args::{Args, CmdError, CmdResult};
use crate::parse::parse_release;
use crate::reply::{self, Released};
use crate::server::{Ctx, HeldString, RawString};
use crate::state::{State, STATE};
use crate::store::{open, write_subject};

fn busy(e: &str) -> CmdError {
    CmdError::err(e)
}

/// What releasing a request on one key did.
struct ReleasedOne {
    /// Its plan and limits after settlement (`None` if the plan is gone).
    part: Option<Part>,
    plan: Box<str>,
    /// The other keys the same call charged.
    links: Vec<Box<[u8]>>,
}

/// Releases request `id` on key `name` with `actual` costs, or says why nothing was
/// released.
fn release_one(
    ctx: &Ctx,
    state: &mut State,
    name: RawString,
    id: &[u8],
    actual: &[(&str, u64)],
) -> Result<Result<ReleasedOne, NotReleased>, CmdError> {
    let mut key = open::<Subject>(ctx, name, true)?;
    let now = ctx.now_ms();
    let settled = decide::settle(key.value::<Subject>(), id, actual, now);
    let (settled, change) = match settled {
        Ok(done) => done,
        Err(why) => return Ok(Err(why)),
    };
    write_subject(ctx, &mut key, name, change, &mut state.payload)?;
    ctx.signal_ready(name);
    let part = state.plans.get(&settled.plan).map(|plan| Part {
        plan: std::sync::Arc::clone(plan),
        now: settled.now,
        admission: Admission::Now,
        denied_by: None,
        admitted: true,
        outcomes: decide::report(plan, key.value::<Subject>(), settled.now),
    });
    Ok(Ok(ReleasedOne {
        part,
        plan: settled.plan.as_ref().into(),
        links: settled.links,
    }))
}

/// `RL.RELEASE key request-id [COST unit actual ...]` → `{released, plan, limits[,
/// also]}`, or `{released 0, reason}`.
pub fn release(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    let parsed = parse_release(&args)?;
    let actual: Vec<(&str, u64)> = parsed.actual.pairs().collect();
    STATE
        .with(|state| {
            let ReleasedOne { part, plan, links } =
                match release_one(ctx, state, parsed.key, parsed.id, &actual)? {
                    Ok(done) => done,
                    Err(why) => {
                        state.stats.releases_unknown += 1;
                        reply::not_released(ctx, why.as_str());
                        return Ok(());
                    }
                };
            state.stats.releases += 1;
            let mut also = Vec::with_capacity(links.len());
            for link in &links {
                let held = HeldString::new(link).ok_or_else(|| CmdError::err("out of memory"))?;
                let part = match release_one(ctx, state, held.raw(), parsed.id, &actual)? {
                    Ok(one) => one.part,
                    Err(_) => None,
                };
                also.push((link, part));
            }
            let also: Vec<Released<'_>> = also
                .into_iter()
                .map(|(key, part)| Released { key, part })
                .collect();
            match part {
                Some(part) => reply::released(ctx, &part, &also),
                None => reply::released_without_plan(ctx, &plan),
            }
            Ok(())
        })
        .map_err(busy)?
}

/// Extends live request `id` on key `name`; returns its links if it was live.
fn touch_one(
    ctx: &Ctx,
    state: &mut State,
    name: RawString,
    id: &[u8],
    ttl: u64,
) -> Result<Option<Vec<Box<[u8]>>>, CmdError> {
    let mut key = open::<Subject>(ctx, name, true)?;
    let now = ctx.now_ms();
    let subject = key.value::<Subject>();
    let links = subject
        .and_then(|s| s.live_request(id, s.effective_now(now)))
        .map(|r| r.links.clone());
    let Ok((_, change)) = decide::touch(subject, id, ttl, now) else {
        return Ok(None);
    };
    write_subject(ctx, &mut key, name, change, &mut state.payload)?;
    Ok(links)
}

/// `RL.TOUCH key request-id ttl-ms` → 1 if the live request (and those the same call
/// made on its other keys) now expires `ttl-ms` from now, 0 if there is no such live
/// request.
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
            let links = touch_one(ctx, state, name, id, ttl)?;
            if let Some(links) = &links {
                for link in links {
                    let held =
                        HeldString::new(link).ok_or_else(|| CmdError::err("out of memory"))?;
                    touch_one(ctx, state, held.raw(), id, ttl)?;
                }
            }
            state.stats.touches += u64::from(links.is_some());
            ctx.reply_integer(i64::from(links.is_some()));
            Ok(())
        })
        .map_err(busy)?
}
