//! The thin, safe face of the Redis module API that the commands use.
//!
//! Every raw call goes through here. Each API pointer is checked once at load
//! ([`missing_api`]); the calls below still branch on `Option` rather than unwrap, so
//! a missing symbol degrades to a no-op instead of aborting the server.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::ptr;

use redis_module::native_types::RedisType;
use redis_module::raw;

/// Calls a module API function if the server provides it, else yields `$default`.
macro_rules! api {
    ($name:ident ( $($arg:expr),* $(,)? ) else $default:expr) => {{
        // SAFETY: the function pointers are set once by RedisModule_Init, before any
        // module code runs, and only read afterwards.
        let function = unsafe { raw::$name };
        match function {
            // SAFETY: every caller passes pointers Redis gave it for this call (or
            // that it owns), valid for the duration of the call.
            Some(f) => unsafe { f($($arg),*) },
            None => $default,
        }
    }};
}
pub(crate) use api;

/// Names of required API functions the server does not provide (checked at load).
pub fn missing_api() -> Vec<&'static str> {
    let mut missing = Vec::new();
    macro_rules! need {
        ($($name:ident),* $(,)?) => {
            // SAFETY: read once at load, after RedisModule_Init set the pointers.
            $( if unsafe { raw::$name }.is_none() { missing.push(stringify!($name)); } )*
        };
    }
    need!(
        RedisModule_CreateCommand,
        RedisModule_GetCommand,
        RedisModule_SetCommandInfo,
        RedisModule_StringPtrLen,
        RedisModule_OpenKey,
        RedisModule_CloseKey,
        RedisModule_KeyType,
        RedisModule_ModuleTypeGetType,
        RedisModule_ModuleTypeGetValue,
        RedisModule_ModuleTypeSetValue,
        RedisModule_DeleteKey,
        RedisModule_GetAbsExpire,
        RedisModule_SetAbsExpire,
        RedisModule_SetExpire,
        RedisModule_SignalModifiedKey,
        RedisModule_Replicate,
        RedisModule_ReplicateVerbatim,
        RedisModule_ReplyWithMap,
        RedisModule_ReplyWithArray,
        RedisModule_ReplyWithLongLong,
        RedisModule_ReplyWithStringBuffer,
        RedisModule_ReplyWithCString,
        RedisModule_ReplyWithNull,
        RedisModule_ReplyWithError,
        RedisModule_ReplyWithSimpleString,
        RedisModule_WrongArity,
        RedisModule_Milliseconds,
        RedisModule_GetContextFlags,
        RedisModule_EmitAOF,
        RedisModule_SaveStringBuffer,
        RedisModule_LoadStringBuffer,
        RedisModule_DigestAddStringBuffer,
        RedisModule_DigestEndSequence,
        RedisModule_Free,
        RedisModule_SetModuleOptions,
        RedisModule_NotifyKeyspaceEvent,
        RedisModule_GetSelectedDb,
        RedisModule_SelectDb,
        RedisModule_BlockClientOnKeys,
        RedisModule_GetBlockedClientPrivateData,
        RedisModule_SignalKeyAsReady,
        RedisModule_CreateTimer,
        RedisModule_CreateString,
        RedisModule_FreeString,
        RedisModule_IsIOError,
        RedisModule_SaveUnsigned,
        RedisModule_LoadUnsigned,
        RedisModule_InfoAddSection,
        RedisModule_InfoAddFieldCString,
        RedisModule_InfoAddFieldULongLong,
        RedisModule_RegisterInfoFunc,
        RedisModule_SubscribeToServerEvent,
    );
    missing
}

pub type RawString = *mut raw::RedisModuleString;

/// Whether the server lets modules put commands in ACL categories (Redis 7.2+).
pub fn supports_acl_categories() -> bool {
    // SAFETY: the API pointers are set once by RedisModule_Init, before any command,
    // and only read afterwards.
    unsafe { raw::RedisModule_SetCommandACLCategories }.is_some()
}

/// The bytes of a module string (valid while the string is).
pub fn bytes_of<'a>(s: RawString) -> &'a [u8] {
    let mut len: usize = 0;
    let ptr = api!(RedisModule_StringPtrLen(s, &mut len) else ptr::null());
    if ptr.is_null() {
        return &[];
    }
    // SAFETY: Redis guarantees `len` readable bytes at `ptr` for the string's lifetime,
    // and command arguments outlive the command call.
    unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) }
}

/// The context of one command call (or callback).
#[derive(Clone, Copy)]
pub struct Ctx(pub *mut raw::RedisModuleCtx);

impl Ctx {
    /// The server clock, in milliseconds since the epoch (read once per command).
    pub fn now_ms(&self) -> u64 {
        let ms = api!(RedisModule_Milliseconds() else 0);
        u64::try_from(ms).unwrap_or(0)
    }

    pub fn reply_integer(&self, v: i64) {
        api!(RedisModule_ReplyWithLongLong(self.0, v) else 0);
    }

    /// A reply field name or other static text, as a bulk string.
    pub fn reply_cstr(&self, s: &CStr) {
        self.reply_bulk(s.to_bytes());
    }

    pub fn reply_bulk(&self, s: &[u8]) {
        api!(RedisModule_ReplyWithStringBuffer(self.0, s.as_ptr().cast::<c_char>(), s.len()) else 0);
    }

    pub fn reply_simple(&self, s: &CStr) {
        api!(RedisModule_ReplyWithSimpleString(self.0, s.as_ptr()) else 0);
    }

    pub fn reply_null(&self) {
        api!(RedisModule_ReplyWithNull(self.0) else 0);
    }

    pub fn reply_array(&self, len: usize) {
        api!(RedisModule_ReplyWithArray(self.0, len as std::os::raw::c_long) else 0);
    }

    /// A map in RESP3, a flat key/value array in RESP2.
    pub fn reply_map(&self, len: usize) {
        api!(RedisModule_ReplyWithMap(self.0, len as std::os::raw::c_long) else 0);
    }

    /// An error reply; `message` starts with its code (`ERR ...`).
    pub fn reply_error(&self, message: &str) {
        let mut text: Vec<u8> = message
            .bytes()
            .filter(|&b| b != 0 && b != b'\r' && b != b'\n')
            .collect();
        text.push(0);
        api!(RedisModule_ReplyWithError(self.0, text.as_ptr().cast::<c_char>()) else 0);
    }

    pub fn reply_wrong_arity(&self) {
        api!(RedisModule_WrongArity(self.0) else 0);
    }

    /// Propagates `cmd key payload` to replicas and the AOF (in the call's MULTI).
    pub fn replicate(&self, cmd: &CStr, key: RawString, payload: &[u8]) {
        api!(RedisModule_Replicate(
            self.0,
            cmd.as_ptr(),
            c"sb".as_ptr(),
            key,
            payload.as_ptr().cast::<c_char>(),
            payload.len()
        ) else 0);
    }

    pub fn replicate_verbatim(&self) {
        api!(RedisModule_ReplicateVerbatim(self.0) else 0);
    }

    /// Wakes clients blocked on `key` (they re-check whether they can go ahead).
    pub fn signal_ready(&self, key: RawString) {
        api!(RedisModule_SignalKeyAsReady(self.0, key) else ());
    }

    pub fn signal_modified(&self, key: RawString) {
        api!(RedisModule_SignalModifiedKey(self.0, key) else 0);
    }

    /// Raises a keyspace notification of the module class (`event` on `key`).
    pub fn notify(&self, event: &CStr, key: RawString) {
        api!(RedisModule_NotifyKeyspaceEvent(self.0, raw::NotifyEvent::MODULE.bits(), event.as_ptr(), key) else 0);
    }

    /// The context's `REDISMODULE_CTX_FLAGS_*`.
    pub fn flags(&self) -> u32 {
        api!(RedisModule_GetContextFlags(self.0) else 0) as u32
    }

    /// Whether the command comes from the primary's replication link or an AOF load
    /// (where `RL.APPLY` is obeyed).
    pub fn is_replicated_or_loading(&self) -> bool {
        self.flags() & (raw::REDISMODULE_CTX_FLAGS_REPLICATED | raw::REDISMODULE_CTX_FLAGS_LOADING)
            != 0
    }

    pub fn in_cluster(&self) -> bool {
        self.flags() & raw::REDISMODULE_CTX_FLAGS_CLUSTER != 0
    }

    /// Whether the calling user's ACL lets it write key `name` (a key Redis did not
    /// check itself because the command does not declare it). True where the server
    /// cannot say (no ACL API, or no user: replication, AOF, timers).
    pub fn may_write_key(&self, name: RawString) -> bool {
        self.may_access_key(name, true)
    }

    /// Whether the calling user's ACL lets it read (and, with `write`, update) key
    /// `name`; see [`Ctx::may_write_key`].
    pub fn may_access_key(&self, name: RawString, write: bool) -> bool {
        let user_name = api!(RedisModule_GetCurrentUserName(self.0) else ptr::null_mut());
        if user_name.is_null() {
            return true;
        }
        let user = api!(RedisModule_GetModuleUserFromUserName(user_name) else ptr::null_mut());
        api!(RedisModule_FreeString(self.0, user_name) else ());
        if user.is_null() {
            return true;
        }
        let flags = if write {
            raw::REDISMODULE_CMD_KEY_ACCESS | raw::REDISMODULE_CMD_KEY_UPDATE
        } else {
            raw::REDISMODULE_CMD_KEY_ACCESS
        };
        let status = api!(RedisModule_ACLCheckKeyPermissions(user, name, flags as c_int) else raw::REDISMODULE_OK as c_int);
        api!(RedisModule_FreeModuleUser(user) else ());
        status == raw::REDISMODULE_OK as c_int
    }

    pub fn open_key(&self, name: RawString, write: bool) -> Key {
        let mode = if write {
            raw::REDISMODULE_READ | raw::REDISMODULE_WRITE
        } else {
            raw::REDISMODULE_READ
        };
        let ptr = api!(RedisModule_OpenKey(self.0, name, mode as c_int) else ptr::null_mut());
        Key {
            ptr: ptr.cast(),
            held: std::cell::Cell::new(None),
        }
    }
}

/// A module string that outlives the command (created without a context).
pub struct HeldString(RawString);

impl HeldString {
    /// The module string, valid while `self` is.
    pub fn raw(&self) -> RawString {
        self.0
    }

    pub fn new(bytes: &[u8]) -> Option<HeldString> {
        let s = api!(RedisModule_CreateString(ptr::null_mut(), bytes.as_ptr().cast::<c_char>(), bytes.len()) else ptr::null_mut());
        (!s.is_null()).then_some(HeldString(s))
    }
}

impl Drop for HeldString {
    fn drop(&mut self) {
        api!(RedisModule_FreeString(ptr::null_mut(), self.0) else ());
    }
}

/// Logs a warning as `<tollgate> message` (from any callback, with or without a ctx).
pub fn log_warning(message: &str) {
    redis_module::MODULE_CONTEXT.log_warning(message);
}

/// A value of one of the module's data types: ties the Rust type to its Redis type,
/// so a key handle can only ever hand out the type Redis stored.
pub trait ModuleValue: Sized {
    fn redis_type() -> &'static RedisType;
}

/// What a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Empty,
    /// A value of the given module type.
    Ours,
    Other,
}

/// An open key; closed on drop. What the key holds is looked up once (type and
/// value pointer) and remembered until the handle changes it.
pub struct Key {
    ptr: *mut raw::RedisModuleKey,
    /// The type looked up, what the key held, and its value pointer.
    held: std::cell::Cell<Option<(*mut raw::RedisModuleType, KeyKind, *mut c_void)>>,
}

impl Drop for Key {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            api!(RedisModule_CloseKey(self.ptr) else ());
        }
    }
}

fn type_ptr(ty: &RedisType) -> *mut raw::RedisModuleType {
    ty.raw_type.try_borrow().map_or(ptr::null_mut(), |t| *t)
}

impl Key {
    /// What the key holds, and the value pointer when it is a `T`.
    fn look_up<T: ModuleValue>(&self) -> (KeyKind, *mut c_void) {
        let ty = type_ptr(T::redis_type());
        if let Some((cached_ty, kind, value)) = self.held.get() {
            if cached_ty == ty {
                return (kind, value);
            }
        }
        let (kind, value) = if self.ptr.is_null() {
            (KeyKind::Empty, ptr::null_mut())
        } else {
            let kind =
                api!(RedisModule_KeyType(self.ptr) else raw::REDISMODULE_KEYTYPE_EMPTY as c_int);
            if kind == raw::REDISMODULE_KEYTYPE_EMPTY as c_int {
                (KeyKind::Empty, ptr::null_mut())
            } else if kind == raw::REDISMODULE_KEYTYPE_MODULE as c_int
                && api!(RedisModule_ModuleTypeGetType(self.ptr) else ptr::null_mut()) == ty
            {
                let value = api!(RedisModule_ModuleTypeGetValue(self.ptr) else ptr::null_mut());
                (KeyKind::Ours, value)
            } else {
                (KeyKind::Other, ptr::null_mut())
            }
        };
        self.held.set(Some((ty, kind, value)));
        (kind, value)
    }

    pub fn kind<T: ModuleValue>(&self) -> KeyKind {
        self.look_up::<T>().0
    }

    fn raw_value<T: ModuleValue>(&self) -> *mut T {
        self.look_up::<T>().1.cast::<T>()
    }

    /// The value, if the key holds a `T`.
    pub fn value<T: ModuleValue>(&self) -> Option<&T> {
        // SAFETY: a key of `T::redis_type()` always holds a `Box<T>` pointer stored by
        // `set_value::<T>` (or by that type's load/copy callbacks); it lives while the
        // key is open, and `&self` forbids a `&mut` to it for the borrow.
        unsafe { self.raw_value::<T>().as_ref() }
    }

    /// The value, mutably, if the key holds a `T`.
    pub fn value_mut<T: ModuleValue>(&mut self) -> Option<&mut T> {
        // SAFETY: as in `value`; `&mut self` makes this the only reference through
        // this handle, and callers never open two handles on one key (calls naming a
        // key twice are refused before keys are opened).
        unsafe { self.raw_value::<T>().as_mut() }
    }

    /// Stores `value` (replacing and freeing any old value; this drops the key's TTL,
    /// so set the expiry afterwards).
    pub fn set_value<T: ModuleValue>(&mut self, value: Box<T>) -> bool {
        let raw_value = Box::into_raw(value);
        self.held.set(None);
        let ok = api!(RedisModule_ModuleTypeSetValue(self.ptr, type_ptr(T::redis_type()), raw_value.cast::<c_void>()) else 1);
        if ok != raw::REDISMODULE_OK as c_int {
            // SAFETY: Redis did not take ownership; we still own the allocation.
            drop(unsafe { Box::from_raw(raw_value) });
            return false;
        }
        true
    }

    /// The key's absolute expiry, if it has one.
    pub fn expire_at(&self) -> Option<u64> {
        let at = api!(RedisModule_GetAbsExpire(self.ptr) else -1);
        u64::try_from(at).ok()
    }

    pub fn set_expire_at(&mut self, at_ms: u64) {
        let at = i64::try_from(at_ms).unwrap_or(i64::MAX);
        api!(RedisModule_SetAbsExpire(self.ptr, at) else 0);
    }

    pub fn persist(&mut self) {
        api!(RedisModule_SetExpire(self.ptr, raw::REDISMODULE_NO_EXPIRE as i64) else 0);
    }

    pub fn delete(&mut self) {
        self.held.set(None);
        api!(RedisModule_DeleteKey(self.ptr) else 0);
    }
}
