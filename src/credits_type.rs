//! The `rlcredits` data type: one prepaid balance per key (see `tollgate_core::credits`),
//! with every callback Redis needs. The RDB value is one string: the versioned encoding
//! of [`Credits::encode`], validated on load.

use std::os::raw::{c_int, c_void};
use std::ptr;

use redis_module::native_types::RedisType;
use redis_module::raw;
use tollgate_core::codec::Writer;
use tollgate_core::credits::Credits;
use tollgate_core::delta::{CreditsDeltaWriter, KeyExpiry};

use crate::rdb::{digest_bytes, emit_apply, guarded, load_buffer, save_buffer};
use crate::server::{log_warning, ModuleValue};

/// Version of the credits encoding (passed back to `rdb_load`).
pub const CREDITS_ENCODING: i32 = 1;

pub static CREDITS_TYPE: RedisType = RedisType::new(
    "rlcredits",
    CREDITS_ENCODING,
    raw::RedisModuleTypeMethods {
        version: raw::REDISMODULE_TYPE_METHOD_VERSION as u64,
        rdb_load: Some(rdb_load),
        rdb_save: Some(rdb_save),
        aof_rewrite: Some(aof_rewrite),
        mem_usage: Some(mem_usage),
        digest: Some(digest),
        free: Some(free),
        aux_load: None,
        aux_save: None,
        aux_save_triggers: 0,
        free_effort: None,
        unlink: None,
        copy: Some(copy),
        defrag: None,
        mem_usage2: None,
        free_effort2: None,
        unlink2: None,
        copy2: None,
        aux_save2: None,
    },
);

impl ModuleValue for Credits {
    fn redis_type() -> &'static RedisType {
        &CREDITS_TYPE
    }
}

fn encode(credits: &Credits) -> Vec<u8> {
    let mut w = Writer::new();
    credits.encode(&mut w);
    w.into_inner()
}

/// # Safety
/// `value` is a `Credits` this module created.
unsafe fn credits_ref<'a>(value: *const c_void) -> Option<&'a Credits> {
    // SAFETY: values of this type are always `Box<Credits>` pointers.
    unsafe { value.cast::<Credits>().as_ref() }
}

unsafe extern "C" fn rdb_load(io: *mut raw::RedisModuleIO, encver: c_int) -> *mut c_void {
    guarded(ptr::null_mut(), || {
        if encver != CREDITS_ENCODING {
            log_warning(&format!(
                "cannot load rlcredits encoding {encver} (this build reads {CREDITS_ENCODING})"
            ));
            return ptr::null_mut();
        }
        let Some(bytes) = load_buffer(io) else {
            return ptr::null_mut();
        };
        match Credits::decode(&bytes) {
            Ok(credits) => Box::into_raw(Box::new(credits)).cast::<c_void>(),
            Err(e) => {
                log_warning(&format!("refusing a corrupt rlcredits value: {e}"));
                ptr::null_mut()
            }
        }
    })
}

unsafe extern "C" fn rdb_save(io: *mut raw::RedisModuleIO, value: *mut c_void) {
    guarded((), || {
        // SAFETY: Redis hands this callback a value of this type, which this module made.
        if let Some(credits) = unsafe { credits_ref(value) } {
            save_buffer(io, &encode(credits));
        }
    })
}

unsafe extern "C" fn aof_rewrite(
    io: *mut raw::RedisModuleIO,
    key: *mut raw::RedisModuleString,
    value: *mut c_void,
) {
    guarded((), || {
        // SAFETY: Redis hands this callback a value of this type, which this module made.
        if let Some(credits) = unsafe { credits_ref(value) } {
            let mut delta = CreditsDeltaWriter::new(Vec::new());
            delta.full(credits).expiry(KeyExpiry::Keep);
            emit_apply(io, key, &delta.finish());
        }
    })
}

unsafe extern "C" fn mem_usage(value: *const c_void) -> usize {
    guarded(0, || {
        // SAFETY: Redis hands this callback a value of this type, which this module made.
        unsafe { credits_ref(value) }.map_or(0, Credits::mem_usage)
    })
}

unsafe extern "C" fn digest(md: *mut raw::RedisModuleDigest, value: *mut c_void) {
    guarded((), || {
        // SAFETY: Redis hands this callback a value of this type, which this module made.
        if let Some(credits) = unsafe { credits_ref(value) } {
            digest_bytes(md, &encode(credits));
        }
    })
}

unsafe extern "C" fn free(value: *mut c_void) {
    if !value.is_null() {
        // SAFETY: values of this type are `Box<Credits>` pointers, freed exactly once.
        guarded((), || {
            // SAFETY: Redis frees each value once, and values of this type are `Box`es this module made.
            drop(unsafe { Box::from_raw(value.cast::<Credits>()) })
        });
    }
}

unsafe extern "C" fn copy(
    _from: *mut raw::RedisModuleString,
    _to: *mut raw::RedisModuleString,
    value: *const c_void,
) -> *mut c_void {
    // SAFETY: Redis hands this callback a value of this type, which this module made.
    guarded(ptr::null_mut(), || match unsafe { credits_ref(value) } {
        Some(credits) => Box::into_raw(Box::new(credits.clone())).cast::<c_void>(),
        None => ptr::null_mut(),
    })
}
