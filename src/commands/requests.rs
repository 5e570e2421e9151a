//! `RL.RELEASE` and `RL.TOUCH`: ending and extending in-flight requests (leases and
//! reservations), settling estimates against actual costs — on the call's first key
//! and on every key the same call charged (`ALSO`).
//!
//! Both work in two steps: first every change is computed and every key it reaches
//! checked, then all are written, so a command that fails changes nothing.

use std::sync::Arc;

use tollgate_core::change::Change;
use tollgate_core::decide::{self, Part};
use tollgate_core::keyslot::key_slot;
use tollgate_core::plan::Plans;
use tollgate_core::subject::Subject;

use crate::args::{Args, CmdError, CmdResult};
use crate::parse::parse_release;
use crate::reply::{self, Released};
use crate::server::{bytes_of, Ctx, HeldString, Key, KeyKind, RawString};
use crate::state::STATE;
use crate::store::{open, write_subject};

/// A linked key this call reaches, opened.
struct Link {
    name: HeldString,
    key: Key,
}

/// Opens the keys `links` names that this call should reach: those in the first key's
/// slot (a request's links are made there, but a restored value could name others),
/// that the caller may write, and that hold a subject; others are left alone and not
/// shown. While the slot migrates, a link missing here asks the client to retry.
fn open_links(ctx: &Ctx, first: RawString, links: &[Box<[u8]>]) -> Result<Vec<Link>, CmdError> {
    let first_name = bytes_of(first);
    let slot = key_slot(first_name);
    let mut opened: Vec<Link> = Vec::with_capacity(links.len());
    for link in links {
        let name: &[u8] = link;
        let seen = name == first_name || opened.iter().any(|l| bytes_of(l.name.raw()) == name);
        if seen || (ctx.in_cluster() && key_slot(name) != slot) {
            continue;
        }
        let held = HeldString::new(name).ok_or_else(|| CmdError::err("out of memory"))?;
        if !ctx.may_write_key(held.raw()) {
            continue;
        }
        let key = ctx.open_key(held.raw(), true);
        match key.kind::<Subject>() {
            KeyKind::Other => continue,
            KeyKind::Empty if ctx.in_cluster() && crate::cluster::slot_in_migration(ctx, slot) => {
                return Err(CmdError::Reply(
                    "TRYAGAIN Multiple keys request during rehashing of slot".into(),
                ));
            }
            KeyKind::Empty | KeyKind::Ours => opened.push(Link { name: held, key }),
        }
    }
    Ok(opened)
}

/// How a plan's limits stand after a release (`None` if the plan is gone).
fn report(plans: &Plans, plan: &str, subject: Option<&Subject>, now: u64) -> Option<Part> {
    plans
        .get(plan)
        .map(|plan| decide::usage(plan, subject, None, now))
}

/// `RL.RELEASE key request-id [COST unit actual ...]` → `{released, plan, limits[,
/// also]}`, or `{released 0, reason}`.
pub fn release(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    let parsed = parse_release(&args)?;
    let actual: Vec<(&str, u64)> = parsed.actual.pairs().collect();
    STATE
        .with(|state| {
            let now = ctx.now_ms();
            let mut first = open::<Subject>(ctx, parsed.key, true)?;
            let (settled, change) =
                match decide::settle(first.value::<Subject>(), parsed.id, &actual, now) {
                    Ok(done) => done,
                    Err(why) => {
                        state.stats.releases_unknown += 1;
                        reply::not_released(ctx, why.as_str());
                        return Ok(());
                    }
                };
            let mut links = open_links(ctx, parsed.key, &settled.links)?;
            let link_changes: Vec<Option<(Arc<str>, Change)>> = links
                .iter()
                .map(|link| {
                    decide::settle(link.key.value::<Subject>(), parsed.id, &actual, now)
                        .ok()
                        .map(|(s, change)| (s.plan, change))
                })
                .collect();
            // Everything is checked: now write.
            write_subject(ctx, &mut first, parsed.key, change, &mut state.payload)?;
            ctx.signal_ready(parsed.key);
            let mut also = Vec::with_capacity(links.len());
            for (link, change) in links.iter_mut().zip(link_changes) {
                let part = match change {
                    Some((plan, change)) => {
                        write_subject(
                            ctx,
                            &mut link.key,
                            link.name.raw(),
                            change,
                            &mut state.payload,
                        )?;
                        ctx.signal_ready(link.name.raw());
                        report(&state.plans, &plan, link.key.value::<Subject>(), now)
                    }
                    None => None,
                };
                also.push(Released {
                    key: bytes_of(link.name.raw()),
                    part,
                });
            }
            state.stats.releases += 1;
            match report(&state.plans, &settled.plan, first.value::<Subject>(), now) {
                Some(part) => reply::released(ctx, &part, &also),
                None => reply::released_without_plan(ctx, &settled.plan),
            }
            Ok(())
        })
        .map_err(CmdError::err)?
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
            let now = ctx.now_ms();
            let mut first = open::<Subject>(ctx, name, true)?;
            let subject = first.value::<Subject>();
            let links = subject
                .and_then(|s| s.live_request(id, s.effective_now(now)))
                .map(|r| r.links.clone())
                .unwrap_or_default();
            let Ok((_, change)) = decide::touch(subject, id, ttl, now) else {
                ctx.reply_integer(0);
                return Ok(());
            };
            let mut opened = open_links(ctx, name, &links)?;
            let link_changes: Vec<Option<Change>> = opened
                .iter()
                .map(|link| {
                    decide::touch(link.key.value::<Subject>(), id, ttl, now)
                        .ok()
                        .map(|(_, change)| change)
                })
                .collect();
            write_subject(ctx, &mut first, name, change, &mut state.payload)?;
            for (link, change) in opened.iter_mut().zip(link_changes) {
                if let Some(change) = change {
                    write_subject(
                        ctx,
                        &mut link.key,
                        link.name.raw(),
                        change,
                        &mut state.payload,
                    )?;
                }
            }
            state.stats.touches += 1;
            ctx.reply_integer(1);
            Ok(())
        })
        .map_err(CmdError::err)?
}
