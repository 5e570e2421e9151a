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

use crate::args::{Args, CmdError, CmdResult};
use crate::server::{api, Ctx, RawString};

pub mod apply;
pub mod assign;
pub mod credits;
pub mod limits;
pub mod parse;
pub mod plans;
pub mod requests;

/// What a client gets when a command panics (caught at the boundary; a bug).
pub const INTERNAL_ERROR: &str = "ERR tollgate internal error (a bug: see the server log)";

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
    if ctx.is_keys_position_request() {
        // Cluster routing asks where the keys are (commands flagged `getkeys-api`).
        let _ = catch_unwind(AssertUnwindSafe(|| {
            ctx.key_at(1);
            if let Some(i) = parse::credits_key_position(&Args::new(argv)) {
                ctx.key_at(i);
            }
        }));
        return raw::REDISMODULE_OK as c_int;
    }
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

entry!(acquire_entry => limits::acquire);
entry!(peek_entry => limits::peek);
entry!(throttle_entry => limits::throttle);
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
    /// The first argument.
    First,
    /// The first argument, and the argument after the `CREDITS` keyword if present
    /// (both must be in one cluster slot: use a hash tag).
    FirstAndCredits,
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
    pub summary: &'static CStr,
    pub complexity: &'static CStr,
}

pub const COMMANDS: &[Command] = &[
    Command {
        name: "rl.acquire",
        entry: acquire_entry,
        flags: "write deny-oom getkeys-api",
        keys: Keys::FirstAndCredits,
        arity: -3,
        summary: c"Admit and charge a call if every limit of the plan admits it.",
        complexity: c"O(L) for the L limits of the plan (and its fallbacks)",
    },
    Command {
        name: "rl.peek",
        entry: peek_entry,
        flags: "readonly fast",
        keys: Keys::First,
        arity: -3,
        summary: c"Answer what RL.ACQUIRE would, without charging anything.",
        complexity: c"O(L) for the L limits of the plan",
    },
    Command {
        name: "rl.throttle",
        entry: throttle_entry,
        flags: "write deny-oom fast",
        keys: Keys::First,
        arity: -5,
        summary: c"GCRA throttle with redis-cell's CL.THROTTLE arguments and reply.",
        complexity: c"O(1)",
    },
    Command {
        name: "rl.release",
        entry: release_entry,
        flags: "write deny-oom fast",
        keys: Keys::First,
        arity: -3,
        summary: c"End a request: free its lease and settle its reservation with actual costs.",
        complexity: c"O(L + log R) for the L limits charged and the R requests in flight",
    },
    Command {
        name: "rl.touch",
        entry: touch_entry,
        flags: "write deny-oom fast",
        keys: Keys::First,
        arity: 4,
        summary: c"Extend a live lease or reservation (a heartbeat for long jobs).",
        complexity: c"O(L + log R) for the L limits and the R requests in flight",
    },
    Command {
        name: "rl.plan.set",
        entry: plan_set_entry,
        flags: "write deny-oom",
        keys: Keys::None,
        arity: -4,
        summary: c"Set limits of a plan (validated as a whole).",
        complexity: c"O(L) for the L limits of the plan",
    },
    Command {
        name: "rl.plan.get",
        entry: plan_get_entry,
        flags: "readonly fast",
        keys: Keys::None,
        arity: 2,
        summary: c"Get the fields of a plan, like HGETALL.",
        complexity: c"O(L) for the L limits of the plan",
    },
    Command {
        name: "rl.plan.del",
        entry: plan_del_entry,
        flags: "write",
        keys: Keys::None,
        arity: -2,
        summary: c"Delete a plan, or some of its fields.",
        complexity: c"O(L) for the L limits of the plan",
    },
    Command {
        name: "rl.plan.list",
        entry: plan_list_entry,
        flags: "readonly",
        keys: Keys::None,
        arity: 1,
        summary: c"List plan names.",
        complexity: c"O(P log P) for the P plans",
    },
    Command {
        name: "rl.assign",
        entry: assign_entry,
        flags: "write deny-oom fast",
        keys: Keys::First,
        arity: -2,
        summary: c"Set (or, without a plan, show) the plan a subject's '*' resolves to.",
        complexity: c"O(1)",
    },
    Command {
        name: "rl.unassign",
        entry: unassign_entry,
        flags: "write fast",
        keys: Keys::First,
        arity: 2,
        summary: c"Remove a subject's assigned plan.",
        complexity: c"O(1)",
    },
    Command {
        name: "rl.plan.default",
        entry: plan_default_entry,
        flags: "write deny-oom",
        keys: Keys::None,
        arity: -1,
        summary: c"Set (or show) the default plan '*' resolves to when a subject has none assigned.",
        complexity: c"O(1)",
    },
    Command {
        name: "rl.credits.grant",
        entry: grant_entry,
        flags: "write deny-oom fast",
        keys: Keys::First,
        arity: -3,
        summary: c"Add a block of credits, optionally expiring; idempotent with ID.",
        complexity: c"O(log B) for the B blocks of the key",
    },
    Command {
        name: "rl.credits.deduct",
        entry: deduct_entry,
        flags: "write deny-oom fast",
        keys: Keys::First,
        arity: -3,
        summary: c"Take credits, earliest-expiring blocks first; all or nothing unless PARTIAL; idempotent with ID.",
        complexity: c"O(K log B) for the K blocks it takes from",
    },
    Command {
        name: "rl.credits.refund",
        entry: refund_entry,
        flags: "write deny-oom fast",
        keys: Keys::First,
        arity: 3,
        summary: c"Return a deduction made with ID to the blocks it came from, once.",
        complexity: c"O(K log B) for the K blocks it came from",
    },
    Command {
        name: "rl.credits.balance",
        entry: balance_entry,
        flags: "readonly fast",
        keys: Keys::First,
        arity: -2,
        summary: c"The live balance, or 1/0 whether it is at least MIN.",
        complexity: c"O(1), plus O(E) for E expired blocks not yet dropped",
    },
    Command {
        name: "rl.credits.blocks",
        entry: blocks_entry,
        flags: "readonly",
        keys: Keys::First,
        arity: 2,
        summary: c"List the live blocks in consumption order.",
        complexity: c"O(B) for the B blocks of the key",
    },
    Command {
        name: "rl.credits.revoke",
        entry: revoke_entry,
        flags: "write fast",
        keys: Keys::First,
        arity: 3,
        summary: c"Remove a block; returns what it still held.",
        complexity: c"O(log B)",
    },
    Command {
        name: "rl.plan.merge",
        entry: plan_merge_entry,
        flags: "write",
        keys: Keys::None,
        arity: 2,
        summary: c"Internal: merge stamped plan changes (sent by primaries and the AOF).",
        complexity: c"O(L) for the L limits of the plans changed",
    },
    Command {
        name: "rl.apply",
        entry: apply_entry,
        flags: "write deny-oom",
        keys: Keys::First,
        arity: 3,
        summary: c"Internal: apply replicated subject state (sent by primaries and the AOF).",
        complexity: c"O(S) for the size S of the payload",
    },
];

/// `CL.THROTTLE`, registered only when `cl-throttle-alias yes` is set at load.
pub const CL_THROTTLE: Command = Command {
    name: "cl.throttle",
    entry: throttle_entry,
    flags: "write deny-oom fast",
    keys: Keys::First,
    arity: -5,
    summary: c"Alias of RL.THROTTLE (redis-cell's CL.THROTTLE).",
    complexity: c"O(1)",
};

/// Registers every command; logs and fails on the first that cannot be created.
pub fn register(ctx: *mut raw::RedisModuleCtx) -> Result<(), String> {
    let alias = crate::config::CL_THROTTLE_ALIAS.load(std::sync::atomic::Ordering::Relaxed);
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
    }
    Ok(())
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
    if command.keys == Keys::FirstAndCredits {
        let mut credits = zeroed();
        credits.notes = c"The credits key of CREDITS credits-key amount.".as_ptr();
        // INCOMPLETE: the keyword search would also match an `ENDPOINT credits` or an
        // id spelled "credits"; Redis then asks the command (`getkeys-api`), which
        // walks the grammar.
        credits.flags = u64::from(
            raw::REDISMODULE_CMD_KEY_RW
                | raw::REDISMODULE_CMD_KEY_UPDATE
                | raw::REDISMODULE_CMD_KEY_INCOMPLETE,
        );
        credits.begin_search_type =
            raw::RedisModuleKeySpecBeginSearchType_REDISMODULE_KSPEC_BS_KEYWORD;
        credits.bs.keyword = raw::RedisModuleCommandKeySpec__bindgen_ty_1__bindgen_ty_2 {
            keyword: c"CREDITS".as_ptr(),
            startfrom: 3,
        };
        range(&mut credits);
        specs.push(credits);
    }
    specs.push(zeroed());
    specs
}
