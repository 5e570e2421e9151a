//! Where keys live in a Redis Cluster, for the keys a call names beyond its first.
//!
//! Commands declare only their first key (so every cluster client routes them in one
//! round trip without asking the server where the keys are). A call's other keys —
//! `ALSO` pairs and the `CREDITS` key — must share the first key's slot; the module
//! checks that itself (`CROSSSLOT`, as Redis would), checks the caller's ACL key
//! permissions on them (`NOPERM`), and while their slot is being migrated answers
//! `TRYAGAIN` when one of them is missing here, as Redis does for multi-key commands.

use redis_module::{Context, RedisValue};

use crate::server::Ctx;

/// Whether this node is migrating `slot` away or importing it (then a multi-key call
/// whose keys are not all here must be retried).
pub fn slot_in_migration(ctx: &Ctx, slot: u16) -> bool {
    let context = Context::new(ctx.0);
    let nodes = match context.call("CLUSTER", &["NODES"]) {
        Ok(RedisValue::SimpleString(s) | RedisValue::BulkString(s)) => s,
        Ok(RedisValue::StringBuffer(b)) => String::from_utf8_lossy(&b).into_owned(),
        _ => return false,
    };
    let migrating = format!("[{slot}->-");
    let importing = format!("[{slot}-<-");
    nodes
        .lines()
        .filter(|line| line.split(' ').nth(2).is_some_and(|f| f.contains("myself")))
        .any(|line| line.contains(&migrating) || line.contains(&importing))
}
