//! `INFO tollgate`: counters of calls, admissions and denials by reason, plus plans.

use std::ffi::CString;
use std::os::raw::c_char;

use redis_module::raw;

use crate::server::api;
use crate::state::STATE;

fn field(ctx: *mut raw::RedisModuleInfoCtx, name: &str, value: u64) {
    if let Ok(name) = CString::new(name) {
        api!(RedisModule_InfoAddFieldULongLong(ctx, name.as_ptr(), value) else 0);
    }
}

/// The `INFO` callback (registered at load).
pub unsafe extern "C" fn info(
    ctx: *mut raw::RedisModuleInfoCtx,
    _for_crash_report: std::os::raw::c_int,
) {
    let _ = std::panic::catch_unwind(|| {
        let snapshot = STATE.with(|s| {
            let waiting = s.waiters.total() as u64;
            let default = s.plans.default_plan().unwrap_or("").to_string();
            let health = [
                ("plans_tombstones", s.plans.tombstones() as u64),
                ("plans_unusable", s.plans.unusable().len() as u64),
                ("plans_fallback_loops", s.plans.fallback_loops() as u64),
            ];
            (
                s.stats.clone(),
                s.plans.len() as u64,
                s.plans.newest(),
                (s.plans.digest(), s.plans.sync_digest()),
                waiting,
                default,
                health,
            )
        });
        let Ok((stats, plans, version, (digest, sync_digest), waiting, default, health)) = snapshot
        else {
            return;
        };
        api!(RedisModule_InfoAddSection(ctx, c"stats".as_ptr().cast_mut()) else 0);
        field(ctx, "calls", stats.calls);
        field(ctx, "admitted", stats.admitted);
        field(ctx, "denied", stats.denied);
        field(ctx, "denied_fixed", stats.denied_fixed);
        field(ctx, "denied_sliding", stats.denied_sliding);
        field(ctx, "denied_bucket", stats.denied_bucket);
        field(ctx, "denied_concurrency", stats.denied_concurrency);
        field(ctx, "denied_cap", stats.denied_cap);
        field(ctx, "denied_endpoint", stats.denied_endpoint);
        field(ctx, "denied_credits", stats.denied_credits);
        field(ctx, "denied_queue", stats.denied_queue);
        field(ctx, "shadow_denied", stats.shadow_denied);
        field(ctx, "fallback_admitted", stats.fallback_admitted);
        field(ctx, "warn_crossed", stats.warn_crossed);
        field(ctx, "releases", stats.releases);
        field(ctx, "releases_unknown", stats.releases_unknown);
        field(ctx, "touches", stats.touches);
        field(
            ctx,
            "requests_in_flight",
            crate::state::IN_FLIGHT.load(std::sync::atomic::Ordering::Relaxed),
        );
        field(ctx, "waiting_clients", waiting);
        field(ctx, "waits_admitted", stats.waits_admitted);
        field(ctx, "waits_timed_out", stats.waits_timed_out);
        api!(RedisModule_InfoAddSection(ctx, c"plans".as_ptr().cast_mut()) else 0);
        field(ctx, "plans", plans);
        field(ctx, "plans_version", version);
        if let Ok(name) = CString::new(default) {
            api!(RedisModule_InfoAddFieldCString(ctx, c"plans_default".as_ptr().cast_mut(), name.as_ptr().cast_mut() as *mut c_char) else 0);
        }
        if let Ok(hex) = CString::new(format!("{digest:016x}")) {
            api!(RedisModule_InfoAddFieldCString(ctx, c"plans_digest".as_ptr().cast_mut(), hex.as_ptr().cast_mut() as *mut c_char) else 0);
        }
        if let Ok(hex) = CString::new(format!("{sync_digest:016x}")) {
            api!(RedisModule_InfoAddFieldCString(ctx, c"plans_sync_digest".as_ptr().cast_mut(), hex.as_ptr().cast_mut() as *mut c_char) else 0);
        }
        for (name, value) in health {
            field(ctx, name, value);
        }
        let sync = crate::plansync::stats();
        field(ctx, "plans_sync_sent", sync.sent);
        field(ctx, "plans_sync_received", sync.received);
        field(ctx, "plans_sync_applied", sync.applied);
        field(ctx, "plans_sync_stale", sync.stale);
        field(ctx, "plans_sync_requests", sync.requests);
        field(ctx, "plans_sync_refused", sync.refused);
    });
}
