//! Plan sync: how a plan change made on any primary of a cluster reaches every node by
//! itself, and how nodes that were down or joined later catch up. The protocol and the
//! merge rules are pure and live in `tollgate_core::plansync` and
//! `tollgate_core::registry`; this file carries them over Redis.
//!
//! - A local change (`RL.PLAN.SET/DEL/DEFAULT`) is stamped by this node and replicated
//!   to its replicas and AOF as `RL.PLAN.MERGE <change>` (never verbatim: the stamp
//!   must be the primary's). On a cluster primary it is also broadcast on the cluster
//!   bus at once.
//! - Only primaries act on bus messages: they merge the changes (a late or repeated one
//!   changes nothing) and replicate what won as `RL.PLAN.MERGE`. Replicas ignore the
//!   bus: they follow their primary through replication, like everything else.
//! - A timer, armed at load on every node, runs every second: every node prunes expired
//!   tombstones; a cluster primary broadcasts its summary. A primary whose summary
//!   differs asks that peer for the differing buckets (at most once a second) and merges
//!   the answer. Timers run on replicas too, so the tick checks the role each time, and
//!   a promoted replica starts syncing on its next tick.
//! - `RL.PLAN.MERGE` is obeyed only from the replication link and while loading the
//!   AOF, so no client can forge a stamp (a stamp far in the future would make a plan
//!   impossible to change).
//!
//! What must hold: nothing here fails a merge or replies to the bus; every callback is
//! panic-guarded; messages are bounded (see `tollgate_core::plansync`).

use std::os::raw::{c_char, c_int, c_uchar, c_void};
use std::ptr;

use redis_module::raw;
use tollgate_core::decide::MAX_FALLBACK_DEPTH;
use tollgate_core::plansync::{self, Message};
use tollgate_core::registry::{Author, Change, Merged, Summary, Want};

use crate::args::{Args, CmdError, CmdResult};
use crate::rdb::guarded;
use crate::server::{api, log_warning, Ctx};
use crate::state::{MainThread, STATE};

/// This module's one cluster-bus message type (the bus scopes types per module).
const MSG_TYPE: u8 = 1;
/// How often primaries broadcast their summary (and every node prunes tombstones).
const TICK_MS: i64 = 1_000;
/// A primary asks a peer for entries at most this often.
const REQUEST_INTERVAL_MS: u64 = 1_000;
/// Length of a cluster node id (not NUL-terminated where Redis hands it out).
const NODE_ID_LEN: usize = raw::REDISMODULE_NODE_ID_LEN as usize;

/// Counters for `INFO tollgate`, and the request pacing.
#[derive(Debug, Default, Clone)]
pub struct SyncStats {
    /// Bus messages sent (changes, summaries, requests, answers).
    pub sent: u64,
    /// Bus messages received and acted on (primaries only).
    pub received: u64,
    /// Changes merged from the bus or the replication link that won.
    pub applied: u64,
    /// Changes that arrived late or twice and changed nothing.
    pub stale: u64,
    /// Requests for entries sent to a peer whose summary differed.
    pub requests: u64,
    /// Messages refused (malformed, or another protocol version).
    pub refused: u64,
    last_request_ms: u64,
}

static SYNC: MainThread<SyncStats> = MainThread::new();

fn flags(ctx: &Ctx) -> u32 {
    api!(RedisModule_GetContextFlags(ctx.0) else 0) as u32
}

fn has(flags: u32, flag: u32) -> bool {
    flags & flag != 0
}

/// Whether this node takes part in the cluster exchange now: a cluster primary that is
/// not loading.
fn syncing(ctx: &Ctx) -> bool {
    let f = flags(ctx);
    has(f, raw::REDISMODULE_CTX_FLAGS_CLUSTER)
        && has(f, raw::REDISMODULE_CTX_FLAGS_MASTER)
        && !has(f, raw::REDISMODULE_CTX_FLAGS_LOADING)
}

/// Registers the bus receiver (in a cluster) and arms the tick timer. Fails the load
/// only if the server is a cluster node without the bus API.
pub fn init(ctx: &Ctx) -> Result<(), String> {
    SYNC.init(SyncStats::default());
    if has(flags(ctx), raw::REDISMODULE_CTX_FLAGS_CLUSTER) {
        // SAFETY: copies of function pointers set once by RedisModule_Init.
        let missing = unsafe { raw::RedisModule_RegisterClusterMessageReceiver }.is_none()
            || unsafe { raw::RedisModule_SendClusterMessage }.is_none()
            || unsafe { raw::RedisModule_GetMyClusterID }.is_none();
        if missing {
            return Err("this cluster node lacks the cluster message API plans sync needs".into());
        }
        api!(RedisModule_RegisterClusterMessageReceiver(ctx.0, MSG_TYPE, Some(on_message)) else ());
    }
    arm_timer(ctx);
    Ok(())
}

fn arm_timer(ctx: &Ctx) {
    let id = api!(RedisModule_CreateTimer(ctx.0, TICK_MS, Some(on_tick), ptr::null_mut()) else 0);
    if id == 0 {
        log_warning("cannot arm the plan-sync timer: plans will not be pruned or synced");
    }
}

/// This node's cluster id, or "" on a standalone server: the origin of its changes.
pub fn node_id(ctx: &Ctx) -> String {
    if !has(flags(ctx), raw::REDISMODULE_CTX_FLAGS_CLUSTER) {
        return String::new();
    }
    let id = api!(RedisModule_GetMyClusterID() else ptr::null());
    if id.is_null() {
        return String::new();
    }
    // SAFETY: a cluster node id is NODE_ID_LEN bytes, not NUL-terminated.
    let bytes = unsafe { std::slice::from_raw_parts(id.cast::<u8>(), NODE_ID_LEN) };
    String::from_utf8_lossy(bytes).into_owned()
}

/// Who makes a local change now, on this node.
pub fn author<'a>(ctx: &Ctx, origin: &'a str) -> Author<'a> {
    Author {
        origin,
        now_ms: ctx.now_ms(),
    }
}

/// Propagates `RL.PLAN.MERGE payload` to replicas and the AOF.
fn replicate_merge(ctx: &Ctx, payload: &[u8]) {
    api!(RedisModule_Replicate(
        ctx.0,
        c"RL.PLAN.MERGE".as_ptr(),
        c"b".as_ptr(),
        payload.as_ptr().cast::<c_char>(),
        payload.len()
    ) else 0);
}

/// Sends a bus message to one node (`to`, an id of NODE_ID_LEN bytes) or to all.
fn send(ctx: &Ctx, to: Option<&[u8; NODE_ID_LEN]>, payload: &[u8]) {
    let Ok(len) = u32::try_from(payload.len()) else {
        return;
    };
    let mut target = [0u8; NODE_ID_LEN + 1];
    let target_ptr = match to {
        Some(id) => {
            if let Some(head) = target.get_mut(..NODE_ID_LEN) {
                head.copy_from_slice(id);
            }
            target.as_ptr().cast::<c_char>()
        }
        None => ptr::null(),
    };
    let status = api!(RedisModule_SendClusterMessage(ctx.0, target_ptr, MSG_TYPE, payload.as_ptr().cast::<c_char>(), len) else raw::REDISMODULE_ERR as c_int);
    if status == raw::REDISMODULE_OK as c_int {
        let _ = SYNC.with(|s| s.sent += 1);
    }
}

/// After a local change: replicate it (stamped) and, on a cluster primary, broadcast it.
pub fn publish(ctx: &Ctx, change: &Change) {
    let broadcast = syncing(ctx) && !has(flags(ctx), raw::REDISMODULE_CTX_FLAGS_REPLICATED);
    for payload in plansync::pack([change]) {
        replicate_merge(ctx, &payload);
        if broadcast {
            send(ctx, None, &payload);
        }
    }
}

/// Merges changes from a peer or the replication link. Returns the changes that won,
/// after logging what operators must know (unusable plans, fallback loops).
fn merge_all<'a>(ctx: &Ctx, changes: &'a [Change]) -> Vec<&'a Change> {
    let now = ctx.now_ms();
    let mut won = Vec::new();
    let mut stale = 0;
    let mut notes = Vec::new();
    let _ = STATE.with(|s| {
        for change in changes {
            match s.plans.merge(change, now, &mut s.interner) {
                Merged::Applied => won.push(change),
                Merged::Unusable(e) => {
                    notes.push(format!(
                        "plan change from node '{}' stored but not usable by this build: {e}",
                        change.stamp().origin
                    ));
                    won.push(change);
                }
                Merged::Stale => stale += 1,
            }
        }
        for change in &won {
            if let Some(name) = change.target() {
                if let Some(cycle) = s.plans.fallback_loop(name) {
                    notes.push(format!(
                        "changes made at the same time on different nodes closed a fallback \
                         loop ({} -> {}); calls follow it at most {MAX_FALLBACK_DEPTH} plans \
                         deep. Break it with RL.PLAN.DEL <plan> fallback",
                        cycle.join(" -> "),
                        cycle.first().copied().unwrap_or("")
                    ));
                }
                if let Some(conflict) = s.plans.fallback_unit_conflict(name) {
                    notes.push(format!(
                        "changes made at the same time on different nodes made a fallback \
                         chain count one limit name in two units ({conflict}); calls stop \
                         following fallbacks before the plan that counts it in another unit"
                    ));
                }
            }
            if let Some(missing) = s.plans.default_plan().filter(|d| s.plans.is_deleted(d)) {
                if change.target().is_none() || change.target() == Some(missing) {
                    notes.push(format!(
                        "changes made at the same time on different nodes left the default \
                         plan '{missing}' deleted: calls with plan '*' fail until it is \
                         created again or another default is set (RL.PLAN.DEFAULT)"
                    ));
                }
            }
        }
    });
    let _ = SYNC.with(|s| {
        s.applied += won.len() as u64;
        s.stale += stale;
    });
    for note in notes {
        log_warning(&note);
    }
    won
}

unsafe extern "C" fn on_message(
    ctx: *mut raw::RedisModuleCtx,
    sender: *const c_char,
    kind: u8,
    payload: *const c_uchar,
    len: u32,
) {
    guarded((), || {
        let ctx = Ctx(ctx);
        if kind != MSG_TYPE || sender.is_null() || !syncing(&ctx) {
            // Replicas follow their primary; a loading node is replaced by what it loads.
            return;
        }
        let mut from = [0u8; NODE_ID_LEN];
        // SAFETY: Redis passes the sender's NODE_ID_LEN-byte id.
        from.copy_from_slice(unsafe {
            std::slice::from_raw_parts(sender.cast::<u8>(), NODE_ID_LEN)
        });
        let bytes: &[u8] = match usize::try_from(len) {
            // SAFETY: Redis passes `len` readable bytes at `payload` for this call.
            Ok(n) if !payload.is_null() => unsafe { std::slice::from_raw_parts(payload, n) },
            _ => &[],
        };
        let message = match Message::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                let first = SYNC
                    .with(|s| {
                        s.refused += 1;
                        s.refused == 1
                    })
                    .unwrap_or(false);
                if first {
                    log_warning(&format!(
                        "ignoring a plan-sync message from node {}: {e} (further ones are only \
                         counted in INFO)",
                        String::from_utf8_lossy(&from)
                    ));
                }
                return;
            }
        };
        let _ = SYNC.with(|s| s.received += 1);
        match message {
            Message::Changes(changes) => {
                let won = merge_all(&ctx, &changes);
                for payload in plansync::pack(won) {
                    replicate_merge(&ctx, &payload);
                }
            }
            Message::Summary(theirs) => on_summary(&ctx, &theirs, &from),
            Message::Request(want) => answer(&ctx, &want, &from),
        }
    });
}

fn on_summary(ctx: &Ctx, theirs: &Summary, from: &[u8; NODE_ID_LEN]) {
    let Ok(Some(want)) = STATE.with(|s| s.plans.wanted(theirs)) else {
        return;
    };
    let now = ctx.now_ms();
    let due = SYNC
        .with(|s| {
            let due = now.saturating_sub(s.last_request_ms) >= REQUEST_INTERVAL_MS
                || now < s.last_request_ms;
            if due {
                s.last_request_ms = now;
                s.requests += 1;
            }
            due
        })
        .unwrap_or(false);
    if due {
        send(ctx, Some(from), &Message::Request(want).encode());
    }
}

fn answer(ctx: &Ctx, want: &Want, to: &[u8; NODE_ID_LEN]) {
    let Ok(messages) = STATE.with(|s| plansync::respond(&s.plans, want)) else {
        return;
    };
    for message in messages {
        send(ctx, Some(to), &message);
    }
}

unsafe extern "C" fn on_tick(ctx: *mut raw::RedisModuleCtx, _data: *mut c_void) {
    let ctx = Ctx(ctx);
    guarded((), || {
        let now = ctx.now_ms();
        let _ = STATE.with(|s| s.plans.prune(now));
        if syncing(&ctx) {
            if let Ok(summary) = STATE.with(|s| s.plans.summary()) {
                send(&ctx, None, &Message::Summary(Box::new(summary)).encode());
            }
        }
    });
    arm_timer(&ctx);
}

/// `RL.PLAN.MERGE payload`: merges stamped plan changes. Internal: primaries replicate
/// their plan changes this way; obeyed only from the replication link and while
/// loading the AOF.
pub fn merge_command(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() != 2 {
        return Err(CmdError::WrongArity);
    }
    let f = flags(ctx);
    if !has(f, raw::REDISMODULE_CTX_FLAGS_REPLICATED) && !has(f, raw::REDISMODULE_CTX_FLAGS_LOADING)
    {
        return Err(CmdError::err(
            "RL.PLAN.MERGE is internal: only a primary's replication link and AOF loading may send it",
        ));
    }
    let payload = args.bytes(1).ok_or(CmdError::WrongArity)?;
    let changes = match Message::decode(payload) {
        Ok(Message::Changes(changes)) => changes,
        Ok(_) => {
            return Err(CmdError::err(
                "invalid RL.PLAN.MERGE payload: not plan changes",
            ))
        }
        Err(e) => {
            return Err(CmdError::err(format_args!(
                "invalid RL.PLAN.MERGE payload: {e}"
            )))
        }
    };
    merge_all(ctx, &changes);
    ctx.replicate_verbatim();
    ctx.reply_simple(c"OK");
    Ok(())
}

/// Sync counters and registry health for `INFO tollgate` (plans section).
pub fn stats() -> SyncStats {
    SYNC.with(|s| s.clone()).unwrap_or_default()
}
