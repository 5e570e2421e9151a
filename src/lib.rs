//! Tollgate: a Redis module that meters and limits use of expensive APIs per user,
//! tier and unit, atomically in the server.
//!
//! This crate is the thin glue between Redis and `tollgate-core`: command parsing and
//! replies, the `rlsubject` data type, persistence and replication. It is the only
//! crate linked into redis-server (its allocator is Redis's).

use std::os::raw::c_int;

use redis_module::configuration::ConfigurationFlags;
use redis_module::{raw, redis_module, Context, RedisString, RedisValue, Status};

// Layers, each importing only those above it: server (the raw API) · args · state ·
// store (keys and writes) · reply · parse · cluster · call (one decision) · wait ·
// commands. Data types (subject_type, credits_type, rdb), config, info and plansync
// (plans across a cluster) sit beside.
mod args;
mod call;
mod cluster;
mod commands;
mod config;
mod credits_type;
mod info;
mod parse;
mod plansync;
mod rdb;
mod reply;
mod server;
mod state;
mod store;
mod subject_type;
mod wait;

use credits_type::CREDITS_TYPE;
use server::api;
use subject_type::SUBJECT_TYPE;

/// Whether the server writes AOF rewrites without an RDB preamble, which would lose
/// the plans (they live in RDB aux data).
fn aof_preamble_disabled(ctx: &Context) -> bool {
    match ctx.call("CONFIG", &["GET", "aof-use-rdb-preamble"]) {
        Ok(RedisValue::Array(values)) => values.iter().any(|v| {
            matches!(v, RedisValue::SimpleString(s) | RedisValue::BulkString(s) if s.eq_ignore_ascii_case("no"))
                || matches!(v, RedisValue::StringBuffer(b) if b.eq_ignore_ascii_case(b"no"))
        }),
        _ => false,
    }
}

const PREAMBLE_WARNING: &str = "aof-use-rdb-preamble is 'no': an AOF rewrite would lose every \
     plan (plans persist in the RDB preamble). Set 'aof-use-rdb-preamble yes'.";

unsafe extern "C" fn on_config_change(
    ctx: *mut raw::RedisModuleCtx,
    _event: raw::RedisModuleEvent,
    _subevent: u64,
    _data: *mut std::os::raw::c_void,
) {
    let _ = std::panic::catch_unwind(|| {
        let ctx = Context::new(ctx);
        if aof_preamble_disabled(&ctx) {
            ctx.log_warning(PREAMBLE_WARNING);
        }
    });
}

/// `FLUSHDB`/`FLUSHALL` ended: keys that clients wait on come back (see `wait`).
unsafe extern "C" fn on_flush(
    ctx: *mut raw::RedisModuleCtx,
    _event: raw::RedisModuleEvent,
    subevent: u64,
    data: *mut std::os::raw::c_void,
) {
    let _ = std::panic::catch_unwind(|| {
        if subevent != raw::REDISMODULE_SUBEVENT_FLUSHDB_END || data.is_null() {
            return;
        }
        // SAFETY: for the flush event Redis passes a `RedisModuleFlushInfo`.
        let info = unsafe { &*data.cast::<raw::RedisModuleFlushInfo>() };
        wait::on_flush(&server::Ctx(ctx), info.dbnum);
    });
}

fn init(ctx: &Context, _args: &[RedisString]) -> Status {
    let missing = server::missing_api();
    if !missing.is_empty() {
        ctx.log_warning(&format!("this server lacks module API {missing:?}"));
        return Status::Err;
    }
    if aof_preamble_disabled(ctx) {
        ctx.log_warning(&format!("{PREAMBLE_WARNING} Refusing to load."));
        return Status::Err;
    }
    std::panic::set_hook(Box::new(|info| {
        crate::server::log_warning(&format!("panic (the command replied ERR): {info}"));
    }));
    state::init();
    let options = raw::REDISMODULE_OPTIONS_HANDLE_IO_ERRORS
        | raw::REDISMODULE_OPTION_NO_IMPLICIT_SIGNAL_MODIFIED;
    api!(RedisModule_SetModuleOptions(ctx.ctx, options as c_int) else ());
    if let Err(e) = commands::register(ctx.ctx) {
        ctx.log_warning(&e);
        return Status::Err;
    }
    api!(RedisModule_RegisterInfoFunc(ctx.ctx, Some(info::info)) else 0);
    if let Err(e) = plansync::init(&server::Ctx(ctx.ctx)) {
        ctx.log_warning(&e);
        return Status::Err;
    }
    let config_event = raw::RedisModuleEvent {
        id: raw::REDISMODULE_EVENT_CONFIG,
        dataver: 1,
    };
    api!(RedisModule_SubscribeToServerEvent(ctx.ctx, config_event, Some(on_config_change)) else 0);
    let flush_event = raw::RedisModuleEvent {
        id: raw::REDISMODULE_EVENT_FLUSHDB,
        dataver: 1,
    };
    api!(RedisModule_SubscribeToServerEvent(ctx.ctx, flush_event, Some(on_flush)) else 0);
    let removals = raw::NotifyEvent::GENERIC.bits()
        | raw::NotifyEvent::EXPIRED.bits()
        | raw::NotifyEvent::EVICTED.bits();
    api!(RedisModule_SubscribeToKeyspaceEvents(ctx.ctx, removals, Some(wait::on_key_removed)) else 0);
    Status::Ok
}

redis_module! {
    name: "tollgate",
    version: 1,
    allocator: (redis_module::alloc::RedisAlloc, redis_module::alloc::RedisAlloc),
    data_types: [SUBJECT_TYPE, CREDITS_TYPE],
    init: init,
    commands: [],
    configurations: [
        i64: [
            ["default-ttl-ms", &config::DEFAULT_TTL_MS, 60_000, 1, config::MAX_TTL_MS, ConfigurationFlags::DEFAULT, None],
            ["max-requests-per-key", &config::MAX_REQUESTS_PER_KEY, 10_000, 1, tollgate_core::requests::MAX_REQUESTS as i64, ConfigurationFlags::DEFAULT, None],
            ["idempotency-window-ms", &config::IDEMPOTENCY_WINDOW_MS, 86_400_000, 0, config::MAX_TTL_MS, ConfigurationFlags::DEFAULT, None],
            ["max-ids-per-key", &config::MAX_IDS_PER_KEY, 10_000, 0, tollgate_core::credits::MAX_IDS as i64, ConfigurationFlags::DEFAULT, None],
            ["max-blocks-per-key", &config::MAX_BLOCKS_PER_KEY, 100_000, 1, tollgate_core::credits::MAX_BLOCKS as i64, ConfigurationFlags::DEFAULT, None],
            ["max-waiters-per-key", &config::MAX_WAITERS_PER_KEY, 1_000, 0, 1_000_000, ConfigurationFlags::DEFAULT, None],
            ["max-waiters", &config::MAX_WAITERS, 100_000, 0, 10_000_000, ConfigurationFlags::DEFAULT, None],
            ["max-also", &config::MAX_ALSO, 8, 1, tollgate_core::requests::MAX_LINKS as i64, ConfigurationFlags::DEFAULT, None],
        ],
        string: [],
        bool: [
            ["cl-throttle-alias", &config::CL_THROTTLE_ALIAS, false, ConfigurationFlags::IMMUTABLE, None],
            ["strict-units", &config::STRICT_UNITS, false, ConfigurationFlags::DEFAULT, None],
        ],
        enum: [],
        module_args_as_configuration: true,
    ]
}
