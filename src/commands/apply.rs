//! `RL.APPLY key payload`: applies the effects a primary decided (see
//! `tollgate_core::change` and `tollgate_core::delta`) to a subject or credits key.
//! Only the primary's replication link and AOF loading may send it — from any other
//! client it is an error, so no client can forge usage or credits. It never reads the
//! clock, so every copy reaches the primary's state. The payload is validated whole,
//! against the key it applies to, before anything changes.

use tollgate_core::change::Delta;
use tollgate_core::credits::Credits;
use tollgate_core::delta::{payload_kind, CreditsDelta, KeyExpiry, CREDITS_DELTA};
use tollgate_core::subject::Subject;

use crate::args::{Args, CmdError, CmdResult};
use crate::server::{Ctx, Key, RawString};
use crate::state::{requests_len, track_requests, STATE};
use crate::store::{open, set_key_expiry};

fn invalid(e: impl std::fmt::Display) -> CmdError {
    CmdError::err(format_args!("invalid RL.APPLY payload: {e}"))
}

pub fn apply(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() != 3 {
        return Err(CmdError::WrongArity);
    }
    if !ctx.is_replicated_or_loading() {
        return Err(CmdError::err(
            "RL.APPLY is internal: only the primary's replication link and AOF loading \
             may send it",
        ));
    }
    let name = args.raw(1).ok_or(CmdError::WrongArity)?;
    let payload = args.bytes(2).ok_or(CmdError::WrongArity)?;
    let (mut key, expiry) = if payload_kind(payload) == Some(CREDITS_DELTA) {
        apply_credits(ctx, name, payload)?
    } else {
        apply_subject(ctx, name, payload)?
    };
    set_key_expiry(&mut key, expiry);
    ctx.replicate_verbatim();
    ctx.signal_modified(name);
    ctx.signal_ready(name);
    ctx.reply_simple(c"OK");
    Ok(())
}

fn apply_credits(ctx: &Ctx, name: RawString, payload: &[u8]) -> Result<(Key, KeyExpiry), CmdError> {
    let mut key = open::<Credits>(ctx, name, true)?;
    let delta = CreditsDelta::decode(payload).map_err(invalid)?;
    let expiry = delta.expiry;
    match key.value_mut::<Credits>() {
        Some(credits) => delta.apply(credits),
        None => {
            if let Some(credits) = delta.into_new() {
                if !key.set_value(Box::new(credits)) {
                    return Err(CmdError::err("cannot store the credits key"));
                }
            }
        }
    }
    Ok((key, expiry))
}

fn apply_subject(ctx: &Ctx, name: RawString, payload: &[u8]) -> Result<(Key, KeyExpiry), CmdError> {
    let mut key = open::<Subject>(ctx, name, true)?;
    STATE
        .with(|s| -> Result<KeyExpiry, CmdError> {
            let delta =
                Delta::decode(payload, &mut s.interner, key.value::<Subject>()).map_err(invalid)?;
            let expiry = delta.expiry;
            match key.value_mut::<Subject>() {
                Some(subject) => {
                    let before = requests_len(Some(subject));
                    delta.apply(subject);
                    track_requests(before, requests_len(Some(subject)));
                }
                None => {
                    if let Some(subject) = delta.into_new(&mut s.interner) {
                        let requests = requests_len(Some(&subject));
                        if !key.set_value(Box::new(subject)) {
                            return Err(CmdError::err("cannot store the subject key"));
                        }
                        track_requests(0, requests);
                    }
                }
            }
            Ok(expiry)
        })
        .map_err(CmdError::err)?
        .map(|expiry| (key, expiry))
}
