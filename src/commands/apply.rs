//! `RL.APPLY key payload`: applies the effects a primary decided (see
//! `tollgate_core::delta`) to a subject or credits key. Replicas and AOF replay run it;
//! it never reads the clock, so every copy reaches the primary's state. The payload is
//! validated whole before anything changes.

use tollgate_core::delta::{payload_kind, CreditsDelta, Delta, KeyExpiry, CREDITS_DELTA};

use crate::args::{Args, CmdError, CmdResult};
use crate::credits_type::CREDITS_TYPE;
use crate::server::{Ctx, Key, RawString};
use crate::state::{track_requests, STATE};
use crate::store::{
    credits_in, open_credits, open_subject, requests_len, set_key_expiry, subject_in,
};
use crate::subject_type::SUBJECT_TYPE;

/// The most requests, blocks or ids a replicated key may hold (the primary enforces
/// its own, configured caps).
const APPLY_MAX_ENTRIES: usize = 10_000_000;

fn invalid(e: impl std::fmt::Display) -> CmdError {
    CmdError::err(format_args!("invalid RL.APPLY payload: {e}"))
}

pub fn apply(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() != 3 {
        return Err(CmdError::WrongArity);
    }
    let name = args.raw(1).ok_or(CmdError::WrongArity)?;
    let payload = args.bytes(2).ok_or(CmdError::WrongArity)?;
    let (key, expiry) = if payload_kind(payload) == Some(CREDITS_DELTA) {
        apply_credits(ctx, name, payload)?
    } else {
        apply_subject(ctx, name, payload)?
    };
    set_key_expiry(&key, expiry);
    ctx.replicate_verbatim();
    ctx.signal_modified(name);
    ctx.signal_ready(name);
    ctx.reply_simple(c"OK");
    Ok(())
}

fn apply_credits(ctx: &Ctx, name: RawString, payload: &[u8]) -> Result<(Key, KeyExpiry), CmdError> {
    let key = open_credits(ctx, name, true)?;
    let delta = CreditsDelta::decode(payload, APPLY_MAX_ENTRIES).map_err(invalid)?;
    let expiry = delta.expiry;
    match credits_in(&key) {
        Some(credits) => delta.apply(credits),
        None => {
            if let Some(credits) = delta.into_new() {
                if !key.set_value(&CREDITS_TYPE, Box::new(credits)) {
                    return Err(CmdError::err("cannot store the credits key"));
                }
            }
        }
    }
    Ok((key, expiry))
}

fn apply_subject(ctx: &Ctx, name: RawString, payload: &[u8]) -> Result<(Key, KeyExpiry), CmdError> {
    let key = open_subject(ctx, name, true)?;
    let delta = STATE
        .with(|s| Delta::decode(payload, &mut s.interner, APPLY_MAX_ENTRIES))
        .map_err(CmdError::err)?
        .map_err(invalid)?;
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
    Ok((key, expiry))
}
