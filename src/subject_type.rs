//! The `rlsubject` data type: one subject's state per key, with every callback Redis
//! needs (RDB, AOF rewrite, DUMP/RESTORE, COPY, MEMORY USAGE, DEBUG DIGEST), plus the
//! module's plans carried as RDB aux data.
//!
//! The RDB value is one string: the versioned encoding of [`Subject::encode`]. Loading
//! validates everything and returns NULL on any error (with `handle-io-errors`), so a
//! corrupt payload fails the load or the RESTORE instead of crashing the server.

use std::os::raw::{c_int, c_void};
use std::ptr;

use redis_module::native_types::RedisType;
use redis_module::raw;
use tollgate_core::codec::{Reader, Writer};
use tollgate_core::plan::Plans;
use tollgate_core::subject::{Subject, ENCODING_VERSION};

use crate::rdb::{digest_bytes, emit_apply, guarded, load_buffer, save_buffer};
use crate::server::{api, ModuleValue};
use crate::state::{requests_len, track_requests, STATE};

/// Version of the subject encoding (passed back to `rdb_load`): version 2 writes,
/// versions 1 and 2 load.
pub const SUBJECT_ENCODING: i32 = ENCODING_VERSION as i32;
/// Version of the plans aux encoding: 2 carries versions and tombstones (see
/// `tollgate_core::registry`); 1 (no versions) still loads.
const PLANS_ENCODING: c_int = 2;

pub static SUBJECT_TYPE: RedisType = RedisType::new(
    "rlsubject",
    SUBJECT_ENCODING,
    raw::RedisModuleTypeMethods {
        version: raw::REDISMODULE_TYPE_METHOD_VERSION as u64,
        rdb_load: Some(rdb_load),
        rdb_save: Some(rdb_save),
        aof_rewrite: Some(aof_rewrite),
        mem_usage: Some(mem_usage),
        digest: Some(digest),
        free: Some(free),
        aux_load: Some(aux_load),
        aux_save: Some(aux_save),
        aux_save_triggers: raw::REDISMODULE_AUX_BEFORE_RDB as c_int,
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

impl ModuleValue for Subject {
    fn redis_type() -> &'static RedisType {
        &SUBJECT_TYPE
    }
}

fn encode(subject: &Subject) -> Vec<u8> {
    let mut w = Writer::new();
    subject.encode(&mut w);
    w.into_inner()
}

unsafe extern "C" fn rdb_load(io: *mut raw::RedisModuleIO, encver: c_int) -> *mut c_void {
    guarded(ptr::null_mut(), || {
        let Some(version) = u8::try_from(encver)
            .ok()
            .filter(|v| (1..=ENCODING_VERSION).contains(v))
        else {
            crate::server::log_warning(&format!(
                "cannot load rlsubject encoding {encver} (this build reads 1 to {SUBJECT_ENCODING})"
            ));
            return ptr::null_mut();
        };
        let Some(bytes) = load_buffer(io) else {
            return ptr::null_mut();
        };
        let decoded = STATE.with(|s| Subject::decode(&bytes, &mut s.interner, version));
        match decoded {
            Ok(Ok(subject)) => {
                track_requests(0, requests_len(Some(&subject)));
                Box::into_raw(Box::new(subject)).cast::<c_void>()
            }
            Ok(Err(e)) => {
                crate::server::log_warning(&format!("refusing a corrupt rlsubject value: {e}"));
                ptr::null_mut()
            }
            Err(e) => {
                crate::server::log_warning(&format!("cannot load rlsubject: {e}"));
                ptr::null_mut()
            }
        }
    })
}

/// # Safety
/// `value` is a `Subject` this module created.
unsafe fn subject_ref<'a>(value: *const c_void) -> Option<&'a Subject> {
    // SAFETY: values of this type are always `Box<Subject>` pointers.
    unsafe { value.cast::<Subject>().as_ref() }
}

unsafe extern "C" fn rdb_save(io: *mut raw::RedisModuleIO, value: *mut c_void) {
    guarded((), || {
        // SAFETY: Redis hands this callback a value of this type, which this module made.
        if let Some(subject) = unsafe { subject_ref(value) } {
            save_buffer(io, &encode(subject));
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
        if let Some(subject) = unsafe { subject_ref(value) } {
            // Redis appends the key's PEXPIREAT itself after this command.
            let mut w = Writer::new();
            tollgate_core::change::encode_full(subject, &mut w);
            emit_apply(io, key, &w.into_inner());
        }
    })
}

unsafe extern "C" fn mem_usage(value: *const c_void) -> usize {
    guarded(0, || {
        // SAFETY: Redis hands this callback a value of this type, which this module made.
        unsafe { subject_ref(value) }.map_or(0, Subject::mem_usage)
    })
}

unsafe extern "C" fn digest(md: *mut raw::RedisModuleDigest, value: *mut c_void) {
    guarded((), || {
        // SAFETY: Redis hands this callback a value of this type, which this module made.
        if let Some(subject) = unsafe { subject_ref(value) } {
            digest_bytes(md, &encode(subject));
        }
    })
}

unsafe extern "C" fn free(value: *mut c_void) {
    if !value.is_null() {
        // SAFETY: values of this type are `Box<Subject>` pointers, freed exactly once.
        guarded((), || {
            // SAFETY: Redis frees each value once, and values of this type are `Box`es this module made.
            let subject = unsafe { Box::from_raw(value.cast::<Subject>()) };
            track_requests(requests_len(Some(&subject)), 0);
        });
    }
}

unsafe extern "C" fn copy(
    _from: *mut raw::RedisModuleString,
    _to: *mut raw::RedisModuleString,
    value: *const c_void,
) -> *mut c_void {
    // SAFETY: Redis hands this callback a value of this type, which this module made.
    guarded(ptr::null_mut(), || match unsafe { subject_ref(value) } {
        Some(subject) => {
            track_requests(0, requests_len(Some(subject)));
            Box::into_raw(Box::new(subject.clone())).cast::<c_void>()
        }
        None => ptr::null_mut(),
    })
}

unsafe extern "C" fn aux_save(io: *mut raw::RedisModuleIO, when: c_int) {
    guarded((), || {
        if when != raw::REDISMODULE_AUX_BEFORE_RDB as c_int {
            return;
        }
        let bytes = STATE.with(|s| {
            let mut w = Writer::new();
            s.plans.encode(&mut w);
            w.into_inner()
        });
        match bytes {
            Ok(bytes) => {
                api!(RedisModule_SaveUnsigned(io, PLANS_ENCODING as u64) else ());
                save_buffer(io, &bytes);
            }
            Err(e) => crate::server::log_warning(&format!("cannot save plans: {e}")),
        }
    })
}

unsafe extern "C" fn aux_load(io: *mut raw::RedisModuleIO, _encver: c_int, when: c_int) -> c_int {
    let err = raw::REDISMODULE_ERR as c_int;
    guarded(err, || {
        if when != raw::REDISMODULE_AUX_BEFORE_RDB as c_int {
            return err;
        }
        let version = api!(RedisModule_LoadUnsigned(io) else 0);
        if api!(RedisModule_IsIOError(io) else 0) != 0 || !matches!(version, 1 | 2) {
            crate::server::log_warning(&format!("unknown plans encoding {version}"));
            return err;
        }
        let Some(bytes) = load_buffer(io) else {
            return err;
        };
        let loaded = STATE.with(|s| {
            let mut r = Reader::new(&bytes);
            let plans = if version == 1 {
                Plans::decode_v1(&mut r, &mut s.interner)
            } else {
                Plans::decode(&mut r, &mut s.interner)
            };
            let plans = plans.and_then(|p| r.finish().map(|()| p))?;
            for (name, error) in plans.unusable() {
                crate::server::log_warning(&format!(
                    "plan '{name}' is loaded but cannot be used by this build: {error}"
                ));
            }
            s.plans = plans;
            Ok::<(), tollgate_core::codec::DecodeError>(())
        });
        match loaded {
            Ok(Ok(())) => raw::REDISMODULE_OK as c_int,
            Ok(Err(e)) => {
                crate::server::log_warning(&format!("refusing corrupt plans: {e}"));
                err
            }
            Err(e) => {
                crate::server::log_warning(&format!("cannot load plans: {e}"));
                err
            }
        }
    })
}
