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
    ($name:ident ( $($arg:expr),* $(,)? ) else $default:expr) => {
        // SAFETY: the function pointers are set by RedisModule_Init and never change;
        // arguments are valid for the duration of the call (see each caller).
        match unsafe { raw::$name } {
            Some(f) => unsafe { f($($arg),*) },
            None => $default,
        }
    };
}
pub(crate) use api;

/// Names of required API functions the server does not provide (checked at load).
pub fn missing_api() -> Vec<&'static str> {
    let mut missing = Vec::new();
    macro_rules! need {
        ($($name:ident),* $(,)?) => {
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
        RedisModule_IsKeysPositionRequest,
        RedisModule_KeyAtPos,
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

    /// Whether Redis is asking for key positions (`getkeys-api`) rather than running.
    pub fn is_keys_position_request(&self) -> bool {
        api!(RedisModule_IsKeysPositionRequest(self.0) else 0) != 0
    }

    /// Reports argument `i` as a key (answering a key position request).
    pub fn key_at(&self, i: usize) {
        api!(RedisModule_KeyAtPos(self.0, i as std::os::raw::c_int) else ());
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

    pub fn open_key(&self, name: RawString, write: bool) -> Key {
        let mode = if write {
            raw::REDISMODULE_READ | raw::REDISMODULE_WRITE
        } else {
            raw::REDISMODULE_READ
        };
        let ptr = api!(RedisModule_OpenKey(self.0, name, mode as c_int) else ptr::null_mut());
        Key { ptr: ptr.cast() }
    }
}

/// Logs a warning as `<tollgate> message` (from any callback, with or without a ctx).
pub fn log_warning(message: &str) {
    redis_module::MODULE_CONTEXT.log_warning(message);
}

/// What a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Empty,
    /// A value of the given module type.
    Ours,
    Other,
}

/// An open key; closed on drop.
pub struct Key {
    ptr: *mut raw::RedisModuleKey,
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
    pub fn kind(&self, ty: &RedisType) -> KeyKind {
        if self.ptr.is_null() {
            return KeyKind::Empty;
        }
        let kind = api!(RedisModule_KeyType(self.ptr) else raw::REDISMODULE_KEYTYPE_EMPTY as c_int);
        if kind == raw::REDISMODULE_KEYTYPE_EMPTY as c_int {
            KeyKind::Empty
        } else if kind == raw::REDISMODULE_KEYTYPE_MODULE as c_int
            && api!(RedisModule_ModuleTypeGetType(self.ptr) else ptr::null_mut()) == type_ptr(ty)
        {
            KeyKind::Ours
        } else {
            KeyKind::Other
        }
    }

    /// The value, if the key holds one of type `ty`. The caller must have checked
    /// [`Key::kind`] is `Ours` and must not hold two references at once.
    #[allow(clippy::mut_from_ref)]
    pub fn value_mut<T>(&self, ty: &RedisType) -> Option<&mut T> {
        if self.kind(ty) != KeyKind::Ours {
            return None;
        }
        let v = api!(RedisModule_ModuleTypeGetValue(self.ptr) else ptr::null_mut());
        // SAFETY: values of our type are always `Box<T>` pointers set by `set_value`
        // with the `T` that belongs to `ty`; the key is open for the borrow's lifetime.
        unsafe { v.cast::<T>().as_mut() }
    }

    /// Stores `value` (replacing and freeing any old value; this drops the key's TTL,
    /// so set the expiry afterwards).
    pub fn set_value<T>(&self, ty: &RedisType, value: Box<T>) -> bool {
        let raw_value = Box::into_raw(value);
        let ok = api!(RedisModule_ModuleTypeSetValue(self.ptr, type_ptr(ty), raw_value.cast::<c_void>()) else 1);
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

    pub fn set_expire_at(&self, at_ms: u64) {
        let at = i64::try_from(at_ms).unwrap_or(i64::MAX);
        api!(RedisModule_SetAbsExpire(self.ptr, at) else 0);
    }

    pub fn persist(&self) {
        api!(RedisModule_SetExpire(self.ptr, raw::REDISMODULE_NO_EXPIRE as i64) else 0);
    }

    pub fn delete(&self) {
        api!(RedisModule_DeleteKey(self.ptr) else 0);
    }
}
