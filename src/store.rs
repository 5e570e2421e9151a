//! Reading subjects from keys and writing them back: the key's absolute expiry, the
//! replicated payload (`RL.APPLY key <delta>`), and the keyspace signal.
//!
//! Every write to a subject goes through [`write_back`], so persistence, expiry and
//! replication are decided in one place.

use std::sync::Arc;

use tollgate_core::credits::{Credits, Touched};
use tollgate_core::delta::{CreditsDeltaWriter, DeltaWriter, KeyExpiry};
use tollgate_core::layout::Layout;
use tollgate_core::subject::{Expiry, Subject};

use crate::args::CmdError;
use crate::credits_type::CREDITS_TYPE;
use crate::server::{Ctx, Key, KeyKind, RawString};
use crate::subject_type::SUBJECT_TYPE;

/// Opens `name` for writing and returns the subject it holds, if any.
/// `WRONGTYPE` if it holds something else.
pub fn open_subject(ctx: &Ctx, name: RawString, write: bool) -> Result<Key, CmdError> {
    let key = ctx.open_key(name, write);
    match key.kind(&SUBJECT_TYPE) {
        KeyKind::Other => Err(CmdError::WrongType),
        KeyKind::Empty | KeyKind::Ours => Ok(key),
    }
}

/// The subject in an open key (checked with [`open_subject`]).
pub fn subject_in(key: &Key) -> Option<&mut Subject> {
    key.value_mut::<Subject>(&SUBJECT_TYPE)
}

/// The subject in an open key, or a new one kept in `fresh` (laid out as `layout()`
/// and stored by [`write_back`]) when the key is empty.
pub fn subject_or_new<'a>(
    key: &'a Key,
    fresh: &'a mut Option<Box<Subject>>,
    layout: impl FnOnce() -> Arc<Layout>,
    now: u64,
) -> &'a mut Subject {
    match subject_in(key) {
        Some(s) => s,
        None => fresh.insert(Box::new(Subject::new(layout(), now))),
    }
}

/// How many requests a subject holds (for the in-flight counter).
pub fn requests_len(subject: Option<&Subject>) -> usize {
    subject.and_then(Subject::requests).map_or(0, |t| t.len())
}

/// What a write changed, beyond the limit part (which is always shipped).
#[derive(Debug, Default, Clone, Copy)]
pub struct Change<'a> {
    /// Requests expired at this instant were purged first.
    pub purged_at: Option<u64>,
    /// This request was added or replaced.
    pub put: Option<&'a [u8]>,
    /// This request was removed.
    pub removed: Option<&'a [u8]>,
    /// The id sequence moved.
    pub seq: bool,
    /// The assigned plan changed.
    pub assign: bool,
    /// The keep-alive instant changed.
    pub keep: bool,
}

/// A key's expiry, rounded up to the next whole second: the key outlives its state by
/// under a second, and a busy subject rewrites its TTL once a second rather than on
/// every call (a token bucket's idle instant moves with every charge).
fn expiry_second(at_ms: u64) -> u64 {
    at_ms.div_ceil(1_000).saturating_mul(1_000)
}

/// Stores `fresh` into an empty key (if given), then sets the key's expiry from the
/// subject's state, replicates the change and signals the key as modified.
/// `payload` is a reusable buffer.
pub fn write_back(
    ctx: &Ctx,
    key: &Key,
    name: RawString,
    fresh: Option<Box<Subject>>,
    change: Change<'_>,
    payload: &mut Vec<u8>,
) -> Result<(), CmdError> {
    if let Some(subject) = fresh {
        if subject.expiry() == Expiry::Idle {
            // Nothing to remember (e.g. a zero-cost call on a new subject).
            return Ok(());
        }
        if !key.set_value(&SUBJECT_TYPE, subject) {
            return Err(CmdError::err("cannot store the subject key"));
        }
    }
    let Some(subject) = subject_in(key) else {
        return Ok(());
    };
    // A replica tidies after applying the delta: the primary must hold the same.
    subject.tidy();
    let expiry = match subject.expiry() {
        Expiry::Idle => KeyExpiry::Delete,
        Expiry::At(at) => KeyExpiry::At(expiry_second(at)),
        Expiry::Never => KeyExpiry::Persist,
    };
    let mut delta = DeltaWriter::new(std::mem::take(payload));
    if let Some(at) = change.purged_at {
        delta.purge(at);
    }
    delta.limits(subject);
    if let Some(id) = change.removed {
        delta.remove(id);
    }
    if let Some((id, request)) = change
        .put
        .and_then(|id| subject.requests().and_then(|t| t.get(id)).map(|r| (id, r)))
    {
        delta.put(id, request);
    }
    if change.seq {
        delta.seq(subject.extra.as_deref().map_or(0, |e| e.next_seq));
    }
    if change.assign {
        delta.assign(subject.assigned());
    }
    if change.keep {
        delta.keep_until(subject.extra.as_deref().map_or(0, |e| e.keep_until));
    }
    delta.expiry(expiry);
    let bytes = delta.finish();
    ctx.replicate(c"RL.APPLY", name, &bytes);
    *payload = bytes;
    set_key_expiry(key, expiry);
    ctx.signal_modified(name);
    Ok(())
}

/// Opens a credits key; `WRONGTYPE` if it holds something else.
pub fn open_credits(ctx: &Ctx, name: RawString, write: bool) -> Result<Key, CmdError> {
    let key = ctx.open_key(name, write);
    match key.kind(&CREDITS_TYPE) {
        KeyKind::Other => Err(CmdError::WrongType),
        KeyKind::Empty | KeyKind::Ours => Ok(key),
    }
}

/// The credits in an open key (checked with [`open_credits`]).
pub fn credits_in(key: &Key) -> Option<&mut Credits> {
    key.value_mut::<Credits>(&CREDITS_TYPE)
}

/// Like [`write_back`] for a credits key: stores `fresh` into an empty key, sets the
/// expiry, replicates what `touched` names, and signals the key.
pub fn write_back_credits(
    ctx: &Ctx,
    key: &Key,
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
        if !key.set_value(&CREDITS_TYPE, credits) {
            return Err(CmdError::err("cannot store the credits key"));
        }
    }
    let Some(credits) = credits_in(key) else {
        return Ok(());
    };
    let expiry = match credits.expiry() {
        Expiry::Idle => KeyExpiry::Delete,
        Expiry::At(at) => KeyExpiry::At(expiry_second(at)),
        Expiry::Never => KeyExpiry::Persist,
    };
    let mut delta = CreditsDeltaWriter::new(std::mem::take(payload));
    delta.changes(credits, touched).expiry(expiry);
    let bytes = delta.finish();
    ctx.replicate(c"RL.APPLY", name, &bytes);
    *payload = bytes;
    set_key_expiry(key, expiry);
    ctx.signal_modified(name);
    Ok(())
}

pub fn set_key_expiry(key: &Key, expiry: KeyExpiry) {
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
    state: &mut crate::state::State,
    name: RawString,
    until: u64,
) -> Result<(), CmdError> {
    let key = open_subject(ctx, name, true)?;
    let mut fresh: Option<Box<Subject>> = None;
    let interner = &mut state.interner;
    let subject = subject_or_new(
        &key,
        &mut fresh,
        || interner.intern(Layout::empty()),
        ctx.now_ms(),
    );
    let extra = subject.extra_mut();
    if extra.keep_until >= until {
        return Ok(());
    }
    extra.keep_until = until;
    write_back(
        ctx,
        &key,
        name,
        fresh,
        Change {
            keep: true,
            ..Change::default()
        },
        &mut state.payload,
    )
}
