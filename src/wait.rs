//! `RL.ACQUIRE ... WAIT ms [PRIORITY p]`: a denied caller blocks (the server and every
//! other client keep going) until it is admitted or `ms` pass.
//!
//! - Waiters block on every subject key of their call (`BlockClientOnKeys`), so
//!   failover and resharding redirect or unblock them as Redis does for any blocked
//!   client, and a change to any of the keys wakes them.
//! - The order is `tollgate_core::queue`'s: a waiter may be admitted only when it heads
//!   the queue of each of its keys (priority, then arrival).
//! - Wake-ups: releases and replicated writes signal the key; a timer at the head's
//!   `retry_after_ms` signals it for refills and lease expiry. A waiter denied by its
//!   credits key is answered at once, so grants need not wake anyone.
//! - Keys are kept alive until their last waiter's deadline (Redis only serves clients
//!   blocked on keys that exist); a key deleted under waiters (`DEL`, `FLUSHALL`, ...)
//!   is recreated empty so they are served at once instead of at their timeout.
//! - Inside MULTI/EXEC, scripts, or any context that forbids blocking, and with
//!   `tollgate.max-waiters-per-key` 0, WAIT is 0.

use std::cell::Cell;
use std::os::raw::{c_char, c_int, c_void};
use std::panic::AssertUnwindSafe;
use std::ptr;

use redis_module::raw;
use smallvec::SmallVec;
use tollgate_core::limits::Admission;
use tollgate_core::queue::Place;

use crate::args::{CmdError, INTERNAL_ERROR};
use crate::call::{attempt, Attempted};
use crate::parse::{CallArgs, CostList};
use crate::server::{api, bytes_of, Ctx, HeldString, RawString};
use crate::state::{KeyId, State, STATE};

/// What a blocked client carries: its call, owned, and its place in the queue.
struct Waiter {
    /// The subject keys, first key first, and their ids (any of them wakes it).
    keys: Vec<HeldString>,
    key_ids: Vec<KeyId>,
    /// The queue it has a place in: its first key's. (Waiters of different first keys
    /// that share an ALSO key do not queue behind each other there: one user waiting
    /// for its own limit must not hold up the rest of its organisation.)
    queue: [KeyId; 1],
    place: Place,
    plans: Vec<String>,
    request: Option<u64>,
    units: Vec<(String, u64)>,
    endpoint: Option<String>,
    id: Option<Vec<u8>>,
    ttl_ms: Option<u64>,
    credits: Option<(HeldString, u64)>,
    compact: bool,
    has_also: bool,
}

impl Waiter {
    /// Runs `f` on the call as the parser would have produced it.
    fn with_call<R>(&self, f: impl FnOnce(&CallArgs<'_>) -> R) -> R {
        let units: Vec<(&str, u64)> = self.units.iter().map(|(u, n)| (u.as_str(), *n)).collect();
        let (first_plan, also_plans) = self
            .plans
            .split_first()
            .map_or(("", &[][..]), |(f, r)| (f.as_str(), r));
        let also = self
            .keys
            .iter()
            .skip(1)
            .zip(also_plans)
            .map(|(k, p)| (k.raw(), p.as_str()))
            .collect();
        let call = CallArgs {
            key: self.keys.first().map_or(ptr::null_mut(), |k| k.raw()),
            plan: first_plan,
            costs: CostList::from_parts(self.request, &units),
            endpoint: self.endpoint.as_deref(),
            id: self.id.as_deref(),
            ttl_ms: self.ttl_ms,
            wait_ms: None,
            priority: 0,
            credits: self.credits.as_ref().map(|(k, n)| (k.raw(), *n)),
            compact: self.compact,
            also,
            has_also: self.has_also,
        };
        f(&call)
    }

    fn raw_keys(&self) -> SmallVec<[RawString; 4]> {
        self.keys.iter().map(|k| k.raw()).collect()
    }
}

fn held(bytes: &[u8]) -> Result<HeldString, CmdError> {
    HeldString::new(bytes).ok_or_else(|| CmdError::err("out of memory"))
}

/// Whether this context may block (not inside MULTI/EXEC, a script, or a context
/// that forbids it).
pub fn can_block(ctx: &Ctx) -> bool {
    ctx.flags()
        & (raw::REDISMODULE_CTX_FLAGS_MULTI
            | raw::REDISMODULE_CTX_FLAGS_LUA
            | raw::REDISMODULE_CTX_FLAGS_DENY_BLOCKING)
        == 0
}

fn key_id(ctx: &Ctx, key: RawString) -> KeyId {
    let db = api!(RedisModule_GetSelectedDb(ctx.0) else 0);
    (db, bytes_of(key).into())
}

/// Whether a call is over for a waiter: admitted, or never admissible.
fn settled(attempted: &Attempted) -> bool {
    attempted.decision.admitted()
        || attempted.decision.admission == Admission::Never
        || attempted.decision.verdict == tollgate_core::decide::Verdict::Credits
}

/// Runs `RL.ACQUIRE ... WAIT` (`wait_ms > 0`, blocking allowed): answers at once when
/// admitted or never admissible, else blocks the client.
pub fn acquire_or_wait(
    ctx: &Ctx,
    state: &mut State,
    parsed: &CallArgs<'_>,
    wait_ms: u64,
) -> Result<(), CmdError> {
    let names = parsed.keys();
    let key_ids: Vec<KeyId> = names.iter().map(|&k| key_id(ctx, k)).collect();
    let queue = [key_ids.first().cloned().unwrap_or_default()];
    // Waiters ahead of this call on its first key keep their turn: it queues behind.
    let queued = state.waiters.has_waiters(&queue[0]);
    if !queued {
        let attempted = attempt(ctx, state, parsed, true)?;
        if settled(&attempted) {
            attempted.record(ctx, &mut state.stats, &names);
            attempted.reply(ctx, parsed, false);
            return Ok(());
        }
    }
    let per_key = key_ids
        .iter()
        .map(|k| state.waiters.len(k))
        .max()
        .unwrap_or(0);
    if per_key >= crate::config::max_waiters_per_key() {
        return Err(CmdError::err(format_args!(
            "{per_key} clients already wait on this key (tollgate.max-waiters-per-key)"
        )));
    }
    if state.waiters.total() >= crate::config::max_waiters() {
        return Err(CmdError::err(format_args!(
            "{} clients already wait on this server (tollgate.max-waiters)",
            state.waiters.total()
        )));
    }
    let deadline = ctx.now_ms().saturating_add(wait_ms);
    for &name in &names {
        crate::store::keep_alive(ctx, name, deadline, &mut state.payload)?;
    }
    let waiter = Waiter {
        keys: names
            .iter()
            .map(|&k| held(bytes_of(k)))
            .collect::<Result<_, _>>()?,
        key_ids: key_ids.clone(),
        queue: queue.clone(),
        place: (0, 0),
        plans: parsed.plans().iter().map(|p| p.to_string()).collect(),
        request: parsed.costs.request,
        units: parsed
            .costs
            .units()
            .iter()
            .map(|(u, n)| (u.to_string(), *n))
            .collect(),
        endpoint: parsed.endpoint.map(str::to_string),
        id: parsed.id.map(<[u8]>::to_vec),
        ttl_ms: parsed.ttl_ms,
        credits: match parsed.credits {
            Some((k, n)) => Some((held(bytes_of(k))?, n)),
            None => None,
        },
        compact: parsed.compact,
        has_also: parsed.has_also,
    };
    let place = state.waiters.enqueue(&queue, parsed.priority, deadline);
    let waiter = Waiter { place, ..waiter };
    state.stats.waits_blocked += 1;
    let mut keys = waiter.raw_keys();
    let privdata = Box::into_raw(Box::new(waiter));
    let blocked = api!(RedisModule_BlockClientOnKeys(
        ctx.0,
        Some(on_ready),
        Some(on_timeout),
        Some(free_waiter),
        i64::try_from(wait_ms).unwrap_or(i64::MAX),
        keys.as_mut_ptr(),
        c_int::try_from(keys.len()).unwrap_or(1),
        privdata.cast::<c_void>()
    ) else ptr::null_mut());
    if blocked.is_null() {
        // SAFETY: Redis did not take the private data; we still own it.
        drop(unsafe { Box::from_raw(privdata) });
        state.waiters.remove(&queue, place);
        return Err(CmdError::err("this client cannot block here"));
    }
    // Whatever is ahead may already be able to go; and refills need a timer.
    wake_now(ctx, &key_ids);
    Ok(())
}

/// Signals `keys` ready, to re-run their waiters (needs a context with a client: a
/// command or a blocked client).
fn wake_now(ctx: &Ctx, keys: &[KeyId]) {
    for key in keys {
        if let Some(name) = HeldString::new(&key.1) {
            ctx.signal_ready(name.raw());
        }
    }
}

/// Signals `key` ready `after_ms` (> 0) from now, unless a timer fires sooner.
fn wake_later(ctx: &Ctx, state: &mut State, key: &KeyId, after_ms: u64) {
    let now = ctx.now_ms();
    if !state
        .waiters
        .needs_timer(key, now.saturating_add(after_ms), now)
    {
        return;
    }
    if !start_timer(ctx, key, after_ms, on_timer) {
        state.waiters.forget_timer(key);
    }
}

type TimerFn = unsafe extern "C" fn(*mut raw::RedisModuleCtx, *mut c_void);

/// Starts a timer calling `callback` with `key` after `after_ms`; false if it could
/// not be set.
fn start_timer(ctx: &Ctx, key: &KeyId, after_ms: u64, callback: TimerFn) -> bool {
    let data = Box::into_raw(Box::new(key.clone()));
    let id = api!(RedisModule_CreateTimer(ctx.0, i64::try_from(after_ms).unwrap_or(i64::MAX), Some(callback), data.cast::<c_void>()) else 0);
    if id == 0 {
        // SAFETY: no timer holds the data.
        drop(unsafe { Box::from_raw(data) });
        return false;
    }
    true
}

/// Takes back the `KeyId` a timer was started with.
///
/// # Safety
/// `data` is the box `start_timer` leaked for this timer, taken once.
unsafe fn timer_key(data: *mut c_void) -> Option<Box<KeyId>> {
    // SAFETY: as the function's contract says.
    (!data.is_null()).then(|| unsafe { Box::from_raw(data.cast::<KeyId>()) })
}

unsafe extern "C" fn on_timer(ctx: *mut raw::RedisModuleCtx, data: *mut c_void) {
    // SAFETY: this is the callback `wake_later` started with such a box.
    let Some(key) = (unsafe { timer_key(data) }) else {
        return;
    };
    let _ = std::panic::catch_unwind(|| {
        let now = Ctx(ctx).now_ms();
        let _ = STATE.with(|state| state.waiters.timer_fired(&key, now));
        api!(RedisModule_SelectDb(ctx, key.0) else 0);
        if let Some(name) = HeldString::new(&key.1) {
            Ctx(ctx).signal_ready(name.raw());
        }
    });
}

fn waiter_of<'a>(ctx: *mut raw::RedisModuleCtx) -> Option<&'a Waiter> {
    let data = api!(RedisModule_GetBlockedClientPrivateData(ctx) else ptr::null_mut());
    // SAFETY: the private data of our blocked clients is always a `Waiter` box, alive
    // until `free_waiter`.
    unsafe { data.cast::<Waiter>().as_ref() }
}

/// A key is ready: admit the waiter if it heads its queues and the call is admitted
/// now; otherwise keep waiting (and set a timer for its next chance).
unsafe extern "C" fn on_ready(
    ctx: *mut raw::RedisModuleCtx,
    _argv: *mut RawString,
    _argc: c_int,
) -> c_int {
    let keep_waiting = raw::REDISMODULE_ERR as c_int;
    let done = raw::REDISMODULE_OK as c_int;
    // Set before any reply starts: a panic after it must not add a second reply.
    let replying = Cell::new(false);
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        let ctx = Ctx(ctx);
        let Some(waiter) = waiter_of(ctx.0) else {
            return done;
        };
        let served = STATE.with(|state| {
            if !state.waiters.heads_all(&waiter.queue, waiter.place) {
                return false;
            }
            waiter.with_call(|call| {
                let attempted = match attempt(&ctx, state, call, true) {
                    Ok(a) => a,
                    Err(e) => {
                        replying.set(true);
                        reply_error(&ctx, &e);
                        state.waiters.remove(&waiter.queue, waiter.place);
                        wake_now(&ctx, &waiter.key_ids);
                        return true;
                    }
                };
                if settled(&attempted) {
                    if attempted.decision.admitted() {
                        state.stats.waits_admitted += 1;
                    }
                    attempted.record(&ctx, &mut state.stats, &waiter.raw_keys());
                    replying.set(true);
                    attempted.reply(&ctx, call, false);
                    state.waiters.remove(&waiter.queue, waiter.place);
                    // The next in line may fit too.
                    wake_now(&ctx, &waiter.key_ids);
                    return true;
                }
                if let (Admission::After(ms), Some(first)) =
                    (attempted.decision.admission, waiter.key_ids.first())
                {
                    wake_later(&ctx, state, first, ms.max(1));
                }
                false
            })
        });
        match served {
            Ok(true) => done,
            _ => keep_waiting,
        }
    }))
    .unwrap_or_else(|_| {
        // A bug: answer (once) rather than leave the client hanging.
        if !replying.get() {
            Ctx(ctx).reply_error(INTERNAL_ERROR);
        }
        done
    })
}

/// `WAIT` ran out: answer with the call's standing, `allowed` 0.
unsafe extern "C" fn on_timeout(
    ctx: *mut raw::RedisModuleCtx,
    _argv: *mut RawString,
    _argc: c_int,
) -> c_int {
    let replying = Cell::new(false);
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let ctx = Ctx(ctx);
        let Some(waiter) = waiter_of(ctx.0) else {
            replying.set(true);
            ctx.reply_null();
            return;
        };
        let replied = STATE.with(|state| {
            state.waiters.remove(&waiter.queue, waiter.place);
            state.stats.waits_timed_out += 1;
            waiter.with_call(|call| match attempt(&ctx, state, call, false) {
                Ok(attempted) => {
                    // It ends denied, whatever the limits would say now.
                    state.stats.calls += 1;
                    state.stats.denied += 1;
                    crate::call::count_denial(&mut state.stats, &attempted.decision);
                    if let Some(first) = waiter.keys.first() {
                        ctx.notify(c"rl.denied", first.raw());
                    }
                    replying.set(true);
                    attempted.reply(&ctx, call, true);
                }
                Err(e) => {
                    replying.set(true);
                    reply_error(&ctx, &e);
                }
            });
            wake_now(&ctx, &waiter.key_ids);
        });
        if replied.is_err() {
            replying.set(true);
            ctx.reply_error("ERR tollgate internal error (module state busy)");
        }
    }));
    if outcome.is_err() && !replying.get() {
        Ctx(ctx).reply_error(INTERNAL_ERROR);
    }
    raw::REDISMODULE_OK as c_int
}

fn reply_error(ctx: &Ctx, e: &CmdError) {
    match e {
        CmdError::WrongArity => ctx.reply_error("ERR wrong number of arguments"),
        CmdError::WrongType => {
            ctx.reply_error("WRONGTYPE Operation against a key holding the wrong kind of value")
        }
        CmdError::Reply(text) => ctx.reply_error(text),
    }
}

/// The client is done waiting (answered, timed out, or gone): forget it.
unsafe extern "C" fn free_waiter(ctx: *mut raw::RedisModuleCtx, data: *mut c_void) {
    if data.is_null() {
        return;
    }
    // SAFETY: `data` is the `Waiter` box given to `BlockClientOnKeys`, freed once here.
    let waiter = unsafe { Box::from_raw(data.cast::<Waiter>()) };
    let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let _ = STATE.with(|state| {
            if state.waiters.remove(&waiter.queue, waiter.place) && !ctx.is_null() {
                // It left the queue by disconnecting: whoever is next may go. This
                // context has no client (so no selected db) to signal with: a timer has.
                for key in &waiter.key_ids {
                    wake_later(&Ctx(ctx), state, key, 1);
                }
            }
        });
    }));
}

/// Keyspace events that remove a key: `DEL`, `UNLINK`, renames and moves away,
/// expiry and eviction. A removed key with waiters is brought back (empty, kept
/// alive) so they are served now.
pub unsafe extern "C" fn on_key_removed(
    ctx: *mut raw::RedisModuleCtx,
    _type: c_int,
    event: *const c_char,
    key: RawString,
) -> c_int {
    let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
        if event.is_null() {
            return;
        }
        // SAFETY: Redis passes the event name as a NUL-terminated string.
        let event = unsafe { std::ffi::CStr::from_ptr(event) }.to_bytes();
        if !matches!(
            event,
            b"del" | b"rename_from" | b"move_from" | b"expired" | b"evicted"
        ) {
            return;
        }
        let ctx = Ctx(ctx);
        let id = key_id(&ctx, key);
        let _ = STATE.with(|state| {
            if state.waiters.has_waiters(&id) {
                // Writes are not allowed inside a notification: a timer does it.
                start_timer(&ctx, &id, 0, revive);
            }
        });
    }));
    raw::REDISMODULE_OK as c_int
}

/// `FLUSHDB` / `FLUSHALL` emptied db `db` (-1: all): bring back every key with waiters.
pub fn on_flush(ctx: &Ctx, db: c_int) {
    let _ = STATE.with(|state| {
        let keys: Vec<KeyId> = state
            .waiters
            .keys()
            .filter(|(d, _)| db == -1 || *d == db)
            .cloned()
            .collect();
        for key in keys {
            start_timer(ctx, &key, 0, revive);
        }
    });
}

/// Recreates a removed key that clients wait on, kept alive until their deadline,
/// and wakes them.
unsafe extern "C" fn revive(ctx: *mut raw::RedisModuleCtx, data: *mut c_void) {
    // SAFETY: this is the callback `on_key_removed`/`on_flush` started with such a box.
    let Some(key) = (unsafe { timer_key(data) }) else {
        return;
    };
    let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let ctx = Ctx(ctx);
        api!(RedisModule_SelectDb(ctx.0, key.0) else 0);
        let _ = STATE.with(|state| {
            let Some(until) = state.waiters.deadline(&key) else {
                return;
            };
            if let Some(name) = HeldString::new(&key.1) {
                let _ = crate::store::keep_alive(&ctx, name.raw(), until, &mut state.payload);
                ctx.signal_ready(name.raw());
            }
        });
    }));
}
