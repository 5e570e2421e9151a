//! `RL.APPLY key payload`: applies the effects a primary decided (see
//! `tollgate_core::delta`). Replicas and AOF replay run it; it never reads the clock,
//! so every copy reaches the primary's state. The payload is validated whole before
//! anything changes.

use tollgate_core::delta::{Delta, KeyExpiry};

use crate::args::{Args, CmdError, CmdResult};
use crate::server::Ctx;
use crate::state::track_requests;
use crate::state::STATE;
use crate::store::{open_subject, requests_len, subject_in};
use crate::subject_type::SUBJECT_TYPE;

/// The most requests a replicated key may hold (the primary enforces its own cap).
const APPLY_MAX_REQUESTS: usize = 10_000_000;

pub fn apply(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() != 3 {
        return Err(CmdError::WrongArity);
    }
    let name = args.raw(1).ok_or(CmdError::WrongArity)?;
    let payload = args.bytes(2).ok_or(CmdError::WrongArity)?;
    let key = open_subject(ctx, name, true)?;
    let delta = STATE
        .with(|s| Delta::decode(payload, &mut s.interner, APPLY_MAX_REQUESTS))
        .map_err(CmdError::err)?
        .map_err(|e| CmdError::err(format_args!("invalid RL.APPLY payload: {e}")))?;
    let expiry = delta.expiry;
    match subject_in(&key) {
        Some(subject) => {
            let before = requests_len(Some(subject));
            delta.apply(subject);
            track_requests(before, requests_len(Some(subject)));
        }
        None => {
            if let Some(subject) = delta.into_new() {
                track_requests(0, requests_len(Some(&subject)));
                if !key.set_value(&SUBJECT_TYPE, Box::new(subject)) {
                    return Err(CmdError::err("cannot store the subject key"));
                }
            }
        }
    }
    match expiry {
        KeyExpiry::At(at) => key.set_expire_at(at),
        KeyExpiry::Persist => key.persist(),
        KeyExpiry::Delete => key.delete(),
        KeyExpiry::Keep => {}
    }
    ctx.replicate_verbatim();
    ctx.signal_modified(name);
    ctx.reply_simple(c"OK");
    Ok(())
}
