//! Opening subject and credits keys, and writing what the core decided back: the value,
//! the key's absolute expiry, the replicated payload (`RL.APPLY key <delta>`), and the
//! keyspace signal.
//!
//! Every write to a subject goes through [`write_subject`] and every write to a credits
//! key through [`write_credits`], so persistence, expiry and replication are decided in
//! one place. Both apply a change the core computed and validated before: nothing
//! here can fail after the stored value has been touched.

use std::sync::Arc;

use tollgate_core::change::Change;
use tollgate_core::codec::Writer;
use tollgate_core::credits::{Credits, Touched};
use tollgate_core::delta::{write_expiry, CreditsDeltaWriter, KeyExpiry};
use tollgate_core::layout::Layout;
use tollgate_core::subject::{Expiry, Subject};

use crate::args::CmdError;
use crate::server::{Ctx, Key, KeyKind, ModuleValue, RawString};
use crate::state::requests_len;

/// Opens key `name` (for writing if `write`); `WRONGTYPE` if it holds something other
/// than a `T`.
pub fn open<T: ModuleValue>(ctx: &Ctx, name: RawString, write: bool) -> Result<Key, CmdError> {
    let key = ctx.open_key(name, write);
    match key.kind::<T>() {
        KeyKind::Other => Err(CmdError::WrongType),
        KeyKind::Empty | KeyKind::Ours => Ok(key),
    }
}

/// A key's expiry, rounded up to the next whole second: the key outlives its state by
/// under a second, and a busy subject rewrites its TTL once a second rather than on
/// every call (a token bucket's idle instant moves with every charge).
fn expiry_second(at_ms: u64) -> u64 {
    at_ms.div_ceil(1_000).saturating_mul(1_000)
}

fn key_expiry(expiry: Expiry) -> KeyExpiry {
    match expiry {
        Expiry::Idle => KeyExpiry::Delete,
        Expiry::At(at) => KeyExpiry::At(expiry_second(at)),
        Expiry::Never => KeyExpiry::Persist,
    }
}

/// Applies `change` to the subject in `key` (a new, empty one if the key is empty —
/// exactly what a replica starts from), then sets the key's expiry from the subject's
/// state, replicates the change and signals the key as modified. `payload` is a
/// reusable buffer.
pub fn write_subject(
    ctx: &Ctx,
    key: &mut Key,
    name: RawString,
    change: Change,
    payload: &mut Vec<u8>,
) -> Result<(), CmdError> {
    let mut w = Writer::with_buffer(std::mem::take(payload));
    change.encode_ops(&mut w);
    let expiry = match key.value_mut::<Subject>() {
        Some(subject) => {
            let before = requests_len(Some(subject));
            let expiry = change.apply_for_expiry(subject);
            crate::state::track_requests(before, requests_len(Some(subject)));
            key_expiry(expiry)
        }
        None => {
            // A replica creates the key from the same delta on the same empty subject
            // (its instant and layout come from the change, if it has a limit part).
            let mut subject = Box::new(Subject::new(Arc::new(Layout::empty()), 0));
            let expiry = key_expiry(change.apply_for_expiry(&mut subject));
            if expiry == KeyExpiry::Delete {
                // Nothing to remember (e.g. a zero-cost call on a new subject).
                *payload = w.into_inner();
                return Ok(());
            }
            let requests = requests_len(Some(&subject));
            if !key.set_value(subject) {
                *payload = w.into_inner();
                return Err(CmdError::err("cannot store the subject key"));
            }
            crate::state::track_requests(0, requests);
            expiry
        }
    };
    write_expiry(&mut w, expiry);
    let bytes = w.into_inner();
    ctx.replicate(c"RL.APPLY", name, &bytes);
    *payload = bytes;
    set_key_expiry(key, expiry);
    ctx.signal_modified(name);
    Ok(())
}

/// Like [`write_subject`] for a credits key: stores `fresh` into an empty key, sets
/// the expiry, replicates what `touched` names, and signals the key.
pub fn write_credits(
    ctx: &Ctx,
    key: &mut Key,
    name: RawString,
    fresh: Option<Box<Credits>>,
    touched: &Touched,
    payload: &mut Vec<u8>,
) -> Result<(), CmdError> {
    if *touched == Touched::default() {
        return Ok(());
    }
    if let Some(credits) = fresh {
        if credits.expiry() == Expiry::Idle {
            return Ok(());
        }
        if !key.set_value(credits) {
            return Err(CmdError::err("cannot store the credits key"));
        }
    }
    let Some(credits) = key.value::<Credits>() else {
        return Ok(());
    };
    let expiry = key_expiry(credits.expiry());
    let mut delta = CreditsDeltaWriter::new(std::mem::take(payload));
    delta.changes(credits, touched).expiry(expiry);
    let bytes = delta.finish();
    ctx.replicate(c"RL.APPLY", name, &bytes);
    *payload = bytes;
    set_key_expiry(key, expiry);
    ctx.signal_modified(name);
    Ok(())
}

pub fn set_key_expiry(key: &mut Key, expiry: KeyExpiry) {
    match expiry {
        // Reading the expiry is one lookup; setting it is two and a write.
        KeyExpiry::At(at) if key.expire_at() != Some(at) => key.set_expire_at(at),
        KeyExpiry::At(_) | KeyExpiry::Keep => {}
        KeyExpiry::Persist => key.persist(),
        KeyExpiry::Delete => key.delete(),
    }
}

/// Keeps subject key `name` alive until at least `until` (clients wait on it; Redis
/// only serves clients blocked on keys that exist). Creates it empty if missing.
pub fn keep_alive(
    ctx: &Ctx,
    name: RawString,
    until: u64,
    payload: &mut Vec<u8>,
) -> Result<(), CmdError> {
    let mut key = open::<Subject>(ctx, name, true)?;
    let kept = key
        .value::<Subject>()
        .and_then(|s| s.extra.as_deref())
        .map_or(0, |e| e.keep_until);
    if kept >= until {
        return Ok(());
    }
    let change = Change {
        keep_until: Some(until),
        ..Change::default()
    };
    write_subject(ctx, &mut key, name, change, payload)
}
