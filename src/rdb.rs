//! Helpers shared by the module's data types: panic guards for callbacks, RDB string
//! buffers, AOF emission and digests.

use std::os::raw::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use redis_module::raw;

use crate::server::api;

/// Runs `f`, turning a panic into `fallback` (a panic must never unwind into Redis).
pub fn guarded<R>(fallback: R, f: impl FnOnce() -> R) -> R {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

/// Reads one string buffer from an RDB stream.
pub fn load_buffer(io: *mut raw::RedisModuleIO) -> Option<Vec<u8>> {
    let mut len: usize = 0;
    let ptr = api!(RedisModule_LoadStringBuffer(io, &mut len) else ptr::null_mut());
    if ptr.is_null() || api!(RedisModule_IsIOError(io) else 0) != 0 {
        if !ptr.is_null() {
            api!(RedisModule_Free(ptr.cast::<c_void>()) else ());
        }
        return None;
    }
    // SAFETY: Redis returned `len` bytes at `ptr`, which we copy and then free.
    let bytes = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) }.to_vec();
    api!(RedisModule_Free(ptr.cast::<c_void>()) else ());
    Some(bytes)
}

pub fn save_buffer(io: *mut raw::RedisModuleIO, bytes: &[u8]) {
    api!(RedisModule_SaveStringBuffer(io, bytes.as_ptr().cast::<c_char>(), bytes.len()) else ());
}

/// Emits `RL.APPLY key payload` into an AOF rewrite (Redis adds the key's PEXPIREAT).
pub fn emit_apply(io: *mut raw::RedisModuleIO, key: *mut raw::RedisModuleString, payload: &[u8]) {
    api!(RedisModule_EmitAOF(
        io,
        c"RL.APPLY".as_ptr(),
        c"sb".as_ptr(),
        key,
        payload.as_ptr().cast::<c_char>(),
        payload.len()
    ) else ());
}

/// Adds one value's canonical bytes to a `DEBUG DIGEST`.
pub fn digest_bytes(md: *mut raw::RedisModuleDigest, bytes: &[u8]) {
    api!(RedisModule_DigestAddStringBuffer(md, bytes.as_ptr().cast::<c_char>(), bytes.len()) else ());
    api!(RedisModule_DigestEndSequence(md) else ());
}
