//! Module configuration: `CONFIG GET/SET tollgate.<name>`, also settable as
//! `--loadmodule libtollgate.so <name> <value> ...` or `tollgate.<name>` in redis.conf.
//! Redis validates ranges and replies with its own error past them.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use tollgate_core::credits::CreditSettings;
use tollgate_core::decide::Settings;
use tollgate_core::spec::DEFAULT_LEASE_TTL_MS;
use tollgate_core::time::{MAX_WINDOW_MS, MS_PER_DAY};

/// TTL of leases and reservations when neither the call nor the limit sets one.
pub static DEFAULT_TTL_MS: AtomicI64 = AtomicI64::new(DEFAULT_LEASE_TTL_MS as i64);
/// Most in-flight requests (leases and reservations) one subject key may hold.
pub static MAX_REQUESTS_PER_KEY: AtomicI64 = AtomicI64::new(10_000);
/// How long credits keys remember `GRANT`/`DEDUCT` ids (idempotency window).
pub static IDEMPOTENCY_WINDOW_MS: AtomicI64 = AtomicI64::new(MS_PER_DAY as i64);
/// Most remembered ids per credits key (the oldest are forgotten first).
pub static MAX_IDS_PER_KEY: AtomicI64 = AtomicI64::new(10_000);
/// Most live blocks one credits key may hold.
pub static MAX_BLOCKS_PER_KEY: AtomicI64 = AtomicI64::new(100_000);
/// Most clients waiting (`WAIT`) on one key, and on the whole server.
pub static MAX_WAITERS_PER_KEY: AtomicI64 = AtomicI64::new(1_000);
pub static MAX_WAITERS: AtomicI64 = AtomicI64::new(100_000);
/// Most `ALSO` pairs one call may name.
pub static MAX_ALSO: AtomicI64 = AtomicI64::new(8);
/// Also register `RL.THROTTLE` as `CL.THROTTLE` (load time only).
pub static CL_THROTTLE_ALIAS: AtomicBool = AtomicBool::new(false);
/// Refuse a `COST` unit that no limit of the call's plans counts (a typo would
/// otherwise charge nothing).
pub static STRICT_UNITS: AtomicBool = AtomicBool::new(false);

pub const MAX_TTL_MS: i64 = MAX_WINDOW_MS as i64;

fn read(v: &AtomicI64) -> u64 {
    u64::try_from(v.load(Ordering::Relaxed)).unwrap_or(0)
}

pub fn settings() -> Settings {
    Settings {
        default_ttl_ms: read(&DEFAULT_TTL_MS).max(1),
        max_requests: usize::try_from(read(&MAX_REQUESTS_PER_KEY)).unwrap_or(usize::MAX),
    }
}

pub fn max_also() -> usize {
    usize::try_from(read(&MAX_ALSO)).unwrap_or(0)
}

pub fn strict_units() -> bool {
    STRICT_UNITS.load(Ordering::Relaxed)
}

pub fn credit_settings() -> CreditSettings {
    CreditSettings {
        window_ms: read(&IDEMPOTENCY_WINDOW_MS),
        max_ids: usize::try_from(read(&MAX_IDS_PER_KEY)).unwrap_or(usize::MAX),
        max_blocks: usize::try_from(read(&MAX_BLOCKS_PER_KEY)).unwrap_or(usize::MAX),
    }
}

pub fn max_waiters_per_key() -> usize {
    usize::try_from(read(&MAX_WAITERS_PER_KEY)).unwrap_or(usize::MAX)
}

pub fn max_waiters() -> usize {
    usize::try_from(read(&MAX_WAITERS)).unwrap_or(usize::MAX)
}
