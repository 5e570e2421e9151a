//! Module-global state: the plans, the layout interner, counters for `INFO`, the
//! queues of waiting clients, and a scratch buffer reused by every call.
//!
//! Redis runs module commands, callbacks and persistence hooks on its main thread
//! (or in a forked child, which has its own copy), so the state lives in a
//! [`MainThread`] cell rather than behind a lock.

use std::cell::RefCell;
use std::os::raw::c_int;
use std::sync::atomic::{AtomicU64, Ordering};

use tollgate_core::layout::LayoutInterner;
use tollgate_core::plan::Plans;
use tollgate_core::queue::Queues;
use tollgate_core::subject::Subject;
use tollgate_core::throttle::ThrottlePlans;

/// Counters reported by `INFO tollgate`.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub calls: u64,
    pub admitted: u64,
    pub denied: u64,
    pub denied_fixed: u64,
    pub denied_sliding: u64,
    pub denied_bucket: u64,
    pub denied_concurrency: u64,
    pub denied_cap: u64,
    pub denied_endpoint: u64,
    pub denied_credits: u64,
    /// `WAIT`s that ran out while the limits would admit: waiters ahead kept the turn.
    pub denied_queue: u64,
    pub shadow_denied: u64,
    pub fallback_admitted: u64,
    pub releases: u64,
    pub releases_unknown: u64,
    pub touches: u64,
    pub warn_crossed: u64,
    pub waits_blocked: u64,
    pub waits_admitted: u64,
    pub waits_timed_out: u64,
}

/// A key clients wait on: its db and name.
pub type KeyId = (c_int, Box<[u8]>);

pub struct State {
    pub plans: Plans,
    pub interner: LayoutInterner,
    pub stats: Stats,
    /// Reused for every replicated payload.
    pub payload: Vec<u8>,
    /// Clients blocked in `RL.ACQUIRE ... WAIT`.
    pub waiters: Queues<KeyId>,
    /// `RL.THROTTLE`'s one-limit plans.
    pub throttle_plans: ThrottlePlans,
}

/// A value only touched from Redis's main thread.
pub struct MainThread<T>(RefCell<Option<T>>);

// SAFETY: Redis calls module commands, key-type callbacks, aux load/save and events
// on its main thread only (a forked child is a separate process with its own copy).
unsafe impl<T> Sync for MainThread<T> {}

impl<T> MainThread<T> {
    pub const fn new() -> Self {
        MainThread(RefCell::new(None))
    }

    pub fn init(&self, value: T) {
        if let Ok(mut slot) = self.0.try_borrow_mut() {
            *slot = Some(value);
        }
    }

    /// Runs `f` on the value. Re-entrant use is a bug; it fails instead of aliasing.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Result<R, &'static str> {
        let mut guard = self
            .0
            .try_borrow_mut()
            .map_err(|_| "module state is busy (re-entrant call)")?;
        let value = guard.as_mut().ok_or("module state is not initialised")?;
        Ok(f(value))
    }
}

pub static STATE: MainThread<State> = MainThread::new();

pub fn init() {
    STATE.init(State {
        plans: Plans::new(),
        interner: LayoutInterner::new(),
        stats: Stats::default(),
        payload: Vec::with_capacity(256),
        waiters: Queues::default(),
        throttle_plans: ThrottlePlans::default(),
    });
}

/// In-flight requests (leases and reservations) held in this node's keys, expired ones
/// not yet purged included. Kept exactly: creation, load and copy add a key's count,
/// writes add their difference, and freeing a key subtracts what it held.
pub static IN_FLIGHT: AtomicU64 = AtomicU64::new(0);

/// How many requests a subject holds (for the in-flight counter).
pub fn requests_len(subject: Option<&Subject>) -> usize {
    subject.and_then(Subject::requests).map_or(0, |t| t.len())
}

/// Records that a key's request count went from `before` to `after`.
pub fn track_requests(before: usize, after: usize) {
    if after >= before {
        IN_FLIGHT.fetch_add((after - before) as u64, Ordering::Relaxed);
    } else {
        let gone = (before - after) as u64;
        let _ = IN_FLIGHT.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            Some(n.saturating_sub(gone))
        });
    }
}
