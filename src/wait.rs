//! `RL.ACQUIRE ... WAIT ms [PRIORITY p]`: a denied caller blocks (the server and every
//! other client keep going) until it is admitted or `ms` pass.
//!
//! - Waiters block on their subject key (`BlockClientOnKeys`), so failover and
//!   resharding redirect or unblock them as Redis does for any blocked client.
//! - Each key has a queue ordered by `(priority, arrival)`; only its head may be
//!   admitted, so waiters go strictly by priority (lower first), then arrival.
//! - Wake-ups: releases and replicated writes signal the key; a timer at the head's
//!   `retry_after_ms` signals it for refills and lease expiry (one pending timer per
//!   key: a later one is not set while an earlier one will fire). A waiter denied by
//!   its credits key is answered at once, so grants need not wake anyone.
//! - The subject key is kept alive until the last waiter's deadline (a Redis key
//!   must exist for its blocked clients to be served).
//! - Inside MULTI/EXEC, scripts, or any context that forbids blocking, and with
//!   `tollgate.max-waiters-per-key` 0, WAIT is 0.

use std::cell::Cell;
use std::collections::{BTreeSet, HashMap};
use std::os::raw::{c_char, c_int, c_void};
use std::panic::AssertUnwindSafe;
use std::ptr;

use redis_module::raw;
use tollgate_core::limits::Admission;

use crate::args::CmdError;
use crate::commands::limits::{attempt, Attempted};
use crate::commands::parse::{CallArgs, CostList};
use crate::commands::INTERNAL_ERROR;
use crate::server::{api, bytes_of, Ctx, RawString};
use crate::state::{State, STATE};

/// One waiting key: its db and name.
type KeyId = (c_int, Box<[u8]>);

/// The queues of waiting clients, per key.
#[derive(Default)]
pub struct Waiters {
    queues: HashMap<KeyId, BTreeSet<(i64, u64)>>,
    /// When the pending wake-up timer of each key fires (ms since the epoch).
    timers: HashMap<KeyId, u64>,
    next_seq: u64,
    total: usize,
}

impl Waiters {
    pub fn total(&self) -> usize {
        self.total
    }

    fn is_head(&self, key: &KeyId, place: (i64, u64)) -> bool {
        self.queues.get(key).and_then(|q| q.first()) == Some(&place)
    }

    fn has_waiters(&self, key: &KeyId) -> bool {
        self.queues.get(key).is_some_and(|q| !q.is_empty())
    }

    /// Whether a timer firing at `due` is needed for `key`: not if one fires sooner.
    /// Records `due` when it is.
    fn needs_timer(&mut self, key: &KeyId, due: u64, now: u64) -> bool {
        match self.timers.get(key) {
            Some(&pending) if pending > now && pending <= due => false,
            _ => {
                self.timers.insert(key.clone(), due);
                true
            }
        }
    }

    /// A timer of `key` fired at `now`: forget it unless a later one replaced it.
    fn timer_fired(&mut self, key: &KeyId, now: u64) {
        if self.timers.get(key).is_some_and(|&due| due <= now) {
            self.timers.remove(key);
        }
    }

    fn remove(&mut self, key: &KeyId, place: (i64, u64)) -> bool {
        let Some(queue) = self.queues.get_mut(key) else {
            return false;
        };
        let removed = queue.remove(&place);
        if queue.is_empty() {
            self.queues.remove(key);
            self.timers.remove(key);
        }
        if removed {
            self.total = self.total.saturating_sub(1);
        }
        removed
    }
}

/// A module string that outlives the command (created without a context).
struct HeldString(RawString);

impl HeldString {
    fn new(bytes: &[u8]) -> Option<HeldString> {
        let s = api!(RedisModule_CreateString(ptr::null_mut(), bytes.as_ptr().cast::<c_char>(), bytes.len()) else ptr::null_mut());
        (!s.is_null()).then_some(HeldString(s))
    }
}

impl Drop for HeldString {
    fn drop(&mut self) {
        api!(RedisModule_FreeString(ptr::null_mut(), self.0) else ());
    }
}

/// What a blocked client carries: its call, owned, and its place in the queue.
struct Waiter {
    key: HeldString,
    key_id: KeyId,
    place: (i64, u64),
    plan: String,
    request: Option<u64>,
    units: Vec<(String, u64)>,
    endpoint: Option<String>,
    id: Option<Vec<u8>>,
    ttl_ms: Option<u64>,
    credits: Option<(HeldString, u64)>,
}

impl Waiter {
    /// The call as the parser would have produced it.
    fn view(&self) -> CallArgs<'_> {
        let units: Vec<(&str, u64)> = self.units.iter().map(|(u, n)| (u.as_str(), *n)).collect();
        CallArgs {
            key: self.key.0,
            plan: &self.plan,
            costs: CostList::from_parts(self.request, &units),
            endpoint: self.endpoint.as_deref(),
            id: self.id.as_deref(),
            ttl_ms: self.ttl_ms,
            wait_ms: None,
            priority: 0,
            credits: self.credits.as_ref().map(|(k, n)| (k.0, *n)),
        }
    }
}

/// Whether this context may block (not inside MULTI/EXEC, a script, or a context
/// that forbids it).
pub fn can_block(ctx: &Ctx) -> bool {
    let flags = api!(RedisModule_GetContextFlags(ctx.0) else 0) as u32;
    flags
        & (raw::REDISMODULE_CTX_FLAGS_MULTI
            | raw::REDISMODULE_CTX_FLAGS_LUA
            | raw::REDISMODULE_CTX_FLAGS_DENY_BLOCKING)
        == 0
}

fn key_id(ctx: &Ctx, key: RawString) -> KeyId {
    let db = api!(RedisModule_GetSelectedDb(ctx.0) else 0);
    (db, bytes_of(key).into())
}

/// Runs `RL.ACQUIRE ... WAIT` (`wait_ms > 0`, blocking allowed): answers at once when
/// admitted or never admissible, else blocks the client.
pub fn acquire_or_wait(
    ctx: &Ctx,
    state: &mut State,
    parsed: &CallArgs<'_>,
    wait_ms: u64,
) -> Result<(), CmdError> {
    let key = key_id(ctx, parsed.key);
    // Waiters ahead of this call keep their turn: it queues behind them.
    let queued = state.waiters.has_waiters(&key);
    if !queued {
        let attempted = attempt(ctx, state, parsed, true)?;
        let retry = attempted.decided.verdict.admission;
        if attempted.admitted() || attempted.credits_denied || retry == Admission::Never {
            attempted.record(ctx, &mut state.stats, parsed.key);
            attempted.reply(ctx, &state.outcomes);
            return Ok(());
        }
    }
    let per_key = state.waiters.queues.get(&key).map_or(0, BTreeSet::len);
    if per_key >= crate::config::max_waiters_per_key() {
        return Err(CmdError::err(format_args!(
            "{per_key} clients already wait on this key (tollgate.max-waiters-per-key)"
        )));
    }
    if state.waiters.total >= crate::config::max_waiters() {
        return Err(CmdError::err(format_args!(
            "{} clients already wait on this server (tollgate.max-waiters)",
            state.waiters.total
        )));
    }
    let deadline = ctx.now_ms().saturating_add(wait_ms);
    crate::store::keep_alive(ctx, state, parsed.key, deadline)?;
    state.waiters.next_seq += 1;
    let place = (parsed.priority, state.waiters.next_seq);
    let waiter = Waiter {
        key: HeldString::new(bytes_of(parsed.key)).ok_or_else(|| CmdError::err("out of memory"))?,
        key_id: key.clone(),
        place,
        plan: parsed.plan.to_string(),
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
            Some((k, n)) => Some((
                HeldString::new(bytes_of(k)).ok_or_else(|| CmdError::err("out of memory"))?,
                n,
            )),
            None => None,
        },
    };
    state
        .waiters
        .queues
        .entry(key.clone())
        .or_default()
        .insert(place);
    state.waiters.total += 1;
    state.stats.waits_blocked += 1;
    let mut keys = [parsed.key];
    let privdata = Box::into_raw(Box::new(waiter));
    let blocked = api!(RedisModule_BlockClientOnKeys(
        ctx.0,
        Some(on_ready),
        Some(on_timeout),
        Some(free_waiter),
        i64::try_from(wait_ms).unwrap_or(i64::MAX),
        keys.as_mut_ptr(),
        1,
        privdata.cast::<c_void>()
    ) else ptr::null_mut());
    if blocked.is_null() {
        // SAFETY: Redis did not take the private data; we still own it.
        drop(unsafe { Box::from_raw(privdata) });
        state.waiters.remove(&key, place);
        return Err(CmdError::err("this client cannot block here"));
    }
    // Whatever is ahead may already be able to go; and refills need a timer.
    wake_now(ctx, &key);
    Ok(())
}

/// Signals `key` ready, to re-run its waiters (needs a context with a client: a
/// command or a blocked client).
fn wake_now(ctx: &Ctx, key: &KeyId) {
    if let Some(name) = HeldString::new(&key.1) {
        ctx.signal_ready(name.0);
    }
}

/// Signals `key` ready `after_ms` (> 0) from now, unless a timer fires sooner.
fn wake_later(ctx: &Ctx, waiters: &mut Waiters, key: &KeyId, after_ms: u64) {
    let now = ctx.now_ms();
    if !waiters.needs_timer(key, now.saturating_add(after_ms), now) {
        return;
    }
    let data = Box::into_raw(Box::new(key.clone()));
    let id = api!(RedisModule_CreateTimer(ctx.0, i64::try_from(after_ms).unwrap_or(i64::MAX), Some(on_timer), data.cast::<c_void>()) else 0);
    if id == 0 {
        // SAFETY: no timer holds the data.
        drop(unsafe { Box::from_raw(data) });
        waiters.timers.remove(key);
    }
}

unsafe extern "C" fn on_timer(ctx: *mut raw::RedisModuleCtx, data: *mut c_void) {
    if data.is_null() {
        return;
    }
    // SAFETY: `data` is the `KeyId` box `wake_later` leaked for this timer, used once.
    let key = unsafe { Box::from_raw(data.cast::<KeyId>()) };
    let _ = std::panic::catch_unwind(|| {
        let now = Ctx(ctx).now_ms();
        let _ = STATE.with(|state| state.waiters.timer_fired(&key, now));
        api!(RedisModule_SelectDb(ctx, key.0) else 0);
        if let Some(name) = HeldString::new(&key.1) {
            Ctx(ctx).signal_ready(name.0);
        }
    });
}

fn waiter_of<'a>(ctx: *mut raw::RedisModuleCtx) -> Option<&'a Waiter> {
    let data = api!(RedisModule_GetBlockedClientPrivateData(ctx) else ptr::null_mut());
    // SAFETY: the private data of our blocked clients is always a `Waiter` box, alive
    // until `free_waiter`.
    unsafe { data.cast::<Waiter>().as_ref() }
}

/// The key is ready: admit the waiter if it is the head of its queue and the call is
/// admitted now; otherwise keep waiting (and set a timer for its next chance).
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
            if !state.waiters.is_head(&waiter.key_id, waiter.place) {
                return Ok(false);
            }
            let attempted = match attempt(&ctx, state, &waiter.view(), true) {
                Ok(a) => a,
                Err(e) => {
                    replying.set(true);
                    reply_error(&ctx, &e);
                    state.waiters.remove(&waiter.key_id, waiter.place);
                    wake_now(&ctx, &waiter.key_id);
                    return Ok(true);
                }
            };
            let retry = attempted.decided.verdict.admission;
            if attempted.admitted() || attempted.credits_denied || retry == Admission::Never {
                if attempted.admitted() {
                    state.stats.waits_admitted += 1;
                }
                attempted.record(&ctx, &mut state.stats, waiter.key.0);
                replying.set(true);
                attempted.reply(&ctx, &state.outcomes);
                state.waiters.remove(&waiter.key_id, waiter.place);
                // The next in line may fit too.
                wake_now(&ctx, &waiter.key_id);
                return Ok(true);
            }
            if let Admission::After(ms) = retry {
                wake_later(&ctx, &mut state.waiters, &waiter.key_id, ms.max(1));
            }
            Ok::<bool, CmdError>(false)
        });
        match served {
            Ok(Ok(true)) => done,
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
            state.waiters.remove(&waiter.key_id, waiter.place);
            state.stats.waits_timed_out += 1;
            match attempt(&ctx, state, &waiter.view(), false) {
                Ok(mut attempted) => {
                    // It ends denied, whatever the limits would say now.
                    attempted.decided.verdict.admitted = false;
                    attempted.record(&ctx, &mut state.stats, waiter.key.0);
                    replying.set(true);
                    reply_timed_out(&ctx, &attempted, &state.outcomes);
                }
                Err(e) => {
                    replying.set(true);
                    reply_error(&ctx, &e);
                }
            }
            wake_now(&ctx, &waiter.key_id);
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

fn reply_timed_out(ctx: &Ctx, attempted: &Attempted, outcomes: &[tollgate_core::decide::Outcome]) {
    crate::reply::reply_timed_out(ctx, &attempted.decided, outcomes, attempted.credits);
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
            if state.waiters.remove(&waiter.key_id, waiter.place) && !ctx.is_null() {
                // It left the queue by disconnecting: whoever is next may go. This
                // context has no client (so no selected db) to signal with: a timer has.
                wake_later(&Ctx(ctx), &mut state.waiters, &waiter.key_id, 1);
            }
        });
    }));
}
