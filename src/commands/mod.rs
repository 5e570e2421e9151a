//! Command registration, and the boundary every command call crosses.
//!
//! Each command is a plain function `fn(&Ctx, Args) -> CmdResult` that either replies
//! itself and returns `Ok`, or returns an error before changing anything. The
//! trampoline turns errors into replies and catches panics, so no panic ever unwinds
//! into Redis (which would abort the server).

use std::ffi::{CStr, CString};
use std::os::raw::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};

use redis_module::raw;

use crate::args::{Args, CmdError, CmdResult, INTERNAL_ERROR};
use crate::server::{api, Ctx, RawString};

pub mod acquire;
pub mod apply;
pub mod assign;
pub mod credits;
pub mod plans;
pub mod requests;

pub type Handler = fn(&Ctx, Args<'_>) -> CmdResult;

/// Runs a handler for one call: errors become replies, panics become `ERR`.
pub fn run(
    ctx: *mut raw::RedisModuleCtx,
    argv: *mut RawString,
    argc: c_int,
    handler: Handler,
) -> c_int {
    let ctx = Ctx(ctx);
    let argv: &[RawString] = match usize::try_from(argc) {
        // SAFETY: Redis passes `argc` valid string pointers at `argv` for this call.
        Ok(n) if !argv.is_null() => unsafe { std::slice::from_raw_parts(argv, n) },
        _ => &[],
    };
    match catch_unwind(AssertUnwindSafe(|| handler(&ctx, Args::new(argv)))) {
        Ok(Ok(())) => {}
        Ok(Err(CmdError::WrongArity)) => ctx.reply_wrong_arity(),
        Ok(Err(CmdError::WrongType)) => {
            ctx.reply_error("WRONGTYPE Operation against a key holding the wrong kind of value")
        }
        Ok(Err(CmdError::Reply(text))) => ctx.reply_error(&text),
        Err(_) => ctx.reply_error(INTERNAL_ERROR),
    }
    raw::REDISMODULE_OK as c_int
}

/// Defines the `extern "C"` entry point of a command.
macro_rules! entry {
    ($name:ident => $handler:path) => {
        unsafe extern "C" fn $name(
            ctx: *mut redis_module::raw::RedisModuleCtx,
            argv: *mut $crate::server::RawString,
            argc: std::os::raw::c_int,
        ) -> std::os::raw::c_int {
            $crate::commands::run(ctx, argv, argc, $handler)
        }
    };
}

entry!(acquire_entry => acquire::acquire);
entry!(peek_entry => acquire::peek);
entry!(usage_entry => acquire::usage);
entry!(throttle_entry => acquire::throttle);
entry!(plan_set_entry => plans::set);
entry!(plan_get_entry => plans::get);
entry!(plan_del_entry => plans::del);
entry!(plan_list_entry => plans::list);
entry!(apply_entry => apply::apply);
entry!(release_entry => requests::release);
entry!(touch_entry => requests::touch);
entry!(grant_entry => credits::grant);
entry!(assign_entry => assign::assign);
entry!(unassign_entry => assign::unassign);
entry!(plan_default_entry => plans::default);
entry!(plan_merge_entry => crate::plansync::merge_command);
entry!(deduct_entry => credits::deduct);
entry!(refund_entry => credits::refund);
entry!(balance_entry => credits::balance);
entry!(blocks_entry => credits::blocks);
entry!(revoke_entry => credits::revoke);

/// Where a command's keys are.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    /// Keyless (plan commands): any node of a cluster answers.
    None,
    /// The first argument. (`RL.ACQUIRE`/`RL.PEEK` may name more keys — `ALSO` pairs
    /// and a `CREDITS` key — in the first key's slot: they are not declared, so every
    /// cluster client routes the call by its first key in one round trip, and the
    /// module checks them itself; see `crate::cluster`.)
    First,
}

/// Who may run a command, for ACL categories (on servers that support them).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Application clients: deciding, settling, reading.
    App,
    /// Administrators: plans, grants and revocations, internal replication.
    Admin,
}

type Entry = unsafe extern "C" fn(*mut raw::RedisModuleCtx, *mut RawString, c_int) -> c_int;

/// One registered command.
pub struct Command {
    pub name: &'static str,
    entry: Entry,
    pub flags: &'static str,
    /// Which arguments are keys (for cluster routing, ACL key patterns, COMMAND GETKEYS).
    pub keys: Keys,
    /// Argument count, Redis-style: exact if positive, a minimum if negative.
    pub arity: c_int,
    pub audience: Audience,
    pub summary: &'static CStr,
    pub complexity: &'static CStr,
}

/// One row of the command table.
#[allow(clippy::too_many_arguments)]
const fn command(
    name: &'static str,
    entry: Entry,
    flags: &'static str,
    keys: Keys,
    arity: c_int,
    audience: Audience,
    summary: &'static CStr,
    complexity: &'static CStr,
) -> Command {
    Command {
        name,
        entry,
        flags,
        keys,
        arity,
        audience,
        summary,
        complexity,
    }
}

use Audience::{Admin, App};
use Keys::{First, None as Keyless};

// Flags: state-freeing commands (release, touch, refund, revoke, unassign, plan
// deletion) carry no `deny-oom`, so leases can be returned under `maxmemory`.
pub const COMMANDS: &[Command] = &[
    command("rl.acquire", acquire_entry, "write deny-oom", First, -3, App,
        c"Admit and charge a call if every limit of its plans (and ALSO pairs) admits it.",
        c"O(L) for the L limits of the call's plans (and their fallbacks)"),
    command("rl.peek", peek_entry, "readonly fast", First, -3, App,
        c"Answer what RL.ACQUIRE would, without charging anything.",
        c"O(L) for the L limits of the call's plans"),
    command("rl.usage", usage_entry, "readonly fast", First, -3, App,
        c"How a subject stands under a plan now, charging and assuming nothing.",
        c"O(L) for the L limits of the plan"),
    command("rl.throttle", throttle_entry, "write deny-oom fast", First, -5, App,
        c"GCRA throttle with redis-cell's CL.THROTTLE arguments and reply.",
        c"O(1)"),
    command("rl.release", release_entry, "write fast", First, -3, App,
        c"End a request: free its leases and settle its reservation with actual costs.",
        c"O(L + log R) for the L limits charged and the R requests in flight, per key"),
    command("rl.touch", touch_entry, "write fast", First, 4, App,
        c"Extend a live lease or reservation (a heartbeat for long jobs).",
        c"O(log R) for the R requests in flight, per key"),
    command("rl.plan.set", plan_set_entry, "write deny-oom", Keyless, -4, Admin,
        c"Set limits of a plan (validated as a whole).",
        c"O(L) for the L limits of the plan"),
    command("rl.plan.get", plan_get_entry, "readonly fast", Keyless, 2, App,
        c"Get the fields of a plan, like HGETALL.",
        c"O(L) for the L limits of the plan"),
    command("rl.plan.del", plan_del_entry, "write", Keyless, -2, Admin,
        c"Delete a plan, or some of its fields.",
        c"O(L) for the L limits of the plan"),
    command("rl.plan.list", plan_list_entry, "readonly", Keyless, 1, App,
        c"List plan names.",
        c"O(P log P) for the P plans"),
    command("rl.assign", assign_entry, "write deny-oom fast", First, -2, Admin,
        c"Set (or, without a plan, show) the plan a subject's '*' resolves to.",
        c"O(1)"),
    command("rl.unassign", unassign_entry, "write fast", First, 2, Admin,
        c"Remove a subject's assigned plan.",
        c"O(1)"),
    command("rl.plan.default", plan_default_entry, "write deny-oom", Keyless, -1, Admin,
        c"Set (or show) the default plan '*' resolves to when a subject has none assigned.",
        c"O(1)"),
    command("rl.credits.grant", grant_entry, "write deny-oom fast", First, -3, Admin,
        c"Add a block of credits, optionally expiring; idempotent with ID.",
        c"O(log B) for the B blocks of the key"),
    command("rl.credits.deduct", deduct_entry, "write deny-oom fast", First, -3, App,
        c"Take credits, earliest-expiring blocks first; all or nothing unless PARTIAL; idempotent with ID.",
        c"O(K log B) for the K blocks it takes from"),
    command("rl.credits.refund", refund_entry, "write fast", First, 3, App,
        c"Return a deduction made with ID to the blocks it came from, once.",
        c"O(K log B) for the K blocks it came from"),
    command("rl.credits.balance", balance_entry, "readonly fast", First, -2, App,
        c"The live balance, or 1/0 whether it is at least MIN.",
        c"O(1), plus O(E) for E expired blocks not yet dropped"),
    command("rl.credits.blocks", blocks_entry, "readonly", First, 2, App,
        c"List the live blocks in consumption order.",
        c"O(B) for the B blocks of the key"),
    command("rl.credits.revoke", revoke_entry, "write fast", First, 3, Admin,
        c"Remove a block; returns what it still held.",
        c"O(log B)"),
    command("rl.plan.merge", plan_merge_entry, "write", Keyless, 2, Admin,
        c"Internal: merge stamped plan changes (from the replication link and AOF loading only).",
        c"O(L) for the L limits of the plans changed"),
    command("rl.apply", apply_entry, "write", First, 3, Admin,
        c"Internal: apply replicated state (from the replication link and AOF loading only).",
        c"O(S) for the size S of the payload"),
];

/// `CL.THROTTLE`, registered only when `cl-throttle-alias yes` is set at load.
pub const CL_THROTTLE: Command = command(
    "cl.throttle",
    throttle_entry,
    "write deny-oom fast",
    First,
    -5,
    App,
    c"Alias of RL.THROTTLE (redis-cell's CL.THROTTLE).",
    c"O(1)",
);

/// The module's own ACL category, where the server can add one (Redis 7.4+).
pub const ACL_CATEGORY: &CStr = c"ratelimit";

/// Declares the module's ACL category, if the server supports module categories.
/// Must run in `OnLoad`, before the commands are created.
pub fn add_acl_category(ctx: *mut raw::RedisModuleCtx) -> bool {
    api!(RedisModule_AddACLCategory(ctx, ACL_CATEGORY.as_ptr()) else raw::REDISMODULE_ERR as c_int)
        == raw::REDISMODULE_OK as c_int
}

/// Registers every command; logs and fails on the first that cannot be created.
pub fn register(ctx: *mut raw::RedisModuleCtx) -> Result<(), String> {
    let alias = crate::config::CL_THROTTLE_ALIAS.load(std::sync::atomic::Ordering::Relaxed);
    let own_category = add_acl_category(ctx);
    for command in COMMANDS.iter().chain(alias.then_some(&CL_THROTTLE)) {
        let name = CString::new(command.name).map_err(|e| e.to_string())?;
        let flags = CString::new(command.flags).map_err(|e| e.to_string())?;
        let (first, last, step) = if command.keys == Keys::None {
            (0, 0, 0)
        } else {
            (1, 1, 1)
        };
        let status = api!(RedisModule_CreateCommand(
            ctx,
            name.as_ptr(),
            Some(command.entry),
            flags.as_ptr(),
            first,
            last,
            step
        ) else raw::REDISMODULE_ERR as c_int);
        if status != raw::REDISMODULE_OK as c_int {
            return Err(format!("cannot create command {}", command.name));
        }
        set_info(ctx, &name, command)?;
        set_acl_categories(ctx, &name, command, own_category);
    }
    Ok(())
}

/// Puts `command` in ACL categories where the server supports it (Redis 7.2+,
/// Valkey): the module's own `@ratelimit` (7.4+), and `@admin @dangerous` for plan,
/// grant and internal commands, so `-@admin` keeps them from application users. On
/// Redis 7.0 ACL rules name the commands instead (see docs/operating.md).
fn set_acl_categories(ctx: *mut raw::RedisModuleCtx, name: &CStr, command: &Command, own: bool) {
    let handle = api!(RedisModule_GetCommand(ctx, name.as_ptr()) else std::ptr::null_mut());
    if handle.is_null() {
        return;
    }
    let categories = match (command.audience, own) {
        (Audience::Admin, true) => c"ratelimit admin dangerous",
        (Audience::Admin, false) => c"admin dangerous",
        (Audience::App, true) => c"ratelimit",
        (Audience::App, false) => return,
    };
    let status = api!(RedisModule_SetCommandACLCategories(handle, categories.as_ptr()) else raw::REDISMODULE_ERR as c_int);
    if status != raw::REDISMODULE_OK as c_int && crate::server::supports_acl_categories() {
        crate::server::log_warning(&format!(
            "cannot set the ACL categories of {}",
            command.name
        ));
    }
}

/// Sets the summary, complexity and arity shown by `COMMAND DOCS` / `COMMAND INFO`.
fn set_info(ctx: *mut raw::RedisModuleCtx, name: &CStr, command: &Command) -> Result<(), String> {
    let handle = api!(RedisModule_GetCommand(ctx, name.as_ptr()) else std::ptr::null_mut());
    if handle.is_null() {
        return Err(format!("cannot find command {}", command.name));
    }
    let version = raw::RedisModuleCommandInfoVersion {
        version: 1,
        sizeof_historyentry: std::mem::size_of::<raw::RedisModuleCommandHistoryEntry>(),
        sizeof_keyspec: std::mem::size_of::<raw::RedisModuleCommandKeySpec>(),
        sizeof_arg: std::mem::size_of::<raw::RedisModuleCommandArg>(),
    };
    let mut specs = key_specs(command);
    let info = raw::RedisModuleCommandInfo {
        version: &version,
        summary: command.summary.as_ptr(),
        complexity: command.complexity.as_ptr(),
        since: c"1.0.0".as_ptr(),
        history: std::ptr::null_mut(),
        tips: std::ptr::null(),
        arity: command.arity,
        key_specs: if specs.is_empty() {
            std::ptr::null_mut()
        } else {
            specs.as_mut_ptr()
        },
        args: std::ptr::null_mut(),
    };
    let status = api!(RedisModule_SetCommandInfo(handle, &info) else raw::REDISMODULE_ERR as c_int);
    if status != raw::REDISMODULE_OK as c_int {
        return Err(format!("cannot set the command info of {}", command.name));
    }
    Ok(())
}

/// The key specs of `command`, terminated by a zeroed spec (empty if keyless).
fn key_specs(command: &Command) -> Vec<raw::RedisModuleCommandKeySpec> {
    // SAFETY: the key spec is a plain C struct (integers, pointers, unions of them);
    // all-zero is its documented terminator and a valid starting point.
    let zeroed = || -> raw::RedisModuleCommandKeySpec { unsafe { std::mem::zeroed() } };
    let readonly = command.flags.split(' ').any(|f| f == "readonly");
    let first_flags = if readonly {
        raw::REDISMODULE_CMD_KEY_RO | raw::REDISMODULE_CMD_KEY_ACCESS
    } else {
        raw::REDISMODULE_CMD_KEY_RW
            | raw::REDISMODULE_CMD_KEY_ACCESS
            | raw::REDISMODULE_CMD_KEY_UPDATE
    };
    let range = |spec: &mut raw::RedisModuleCommandKeySpec| {
        spec.find_keys_type = raw::RedisModuleKeySpecFindKeysType_REDISMODULE_KSPEC_FK_RANGE;
        spec.fk.range = raw::RedisModuleCommandKeySpec__bindgen_ty_2__bindgen_ty_1 {
            lastkey: 0,
            keystep: 1,
            limit: 0,
        };
    };
    let mut specs = Vec::new();
    if command.keys == Keys::None {
        return specs;
    }
    let mut first = zeroed();
    first.flags = u64::from(first_flags);
    first.begin_search_type = raw::RedisModuleKeySpecBeginSearchType_REDISMODULE_KSPEC_BS_INDEX;
    first.bs.index = raw::RedisModuleCommandKeySpec__bindgen_ty_1__bindgen_ty_1 { pos: 1 };
    range(&mut first);
    specs.push(first);
    specs.push(zeroed());
    specs
}
