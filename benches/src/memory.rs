//! Memory per subject: `used_memory` growth over 100,000 subjects against `MEMORY
//! USAGE` of one, where the bytes go, and `MEMORY USAGE` of a large credits key
//! against what it really takes.

use tollgate_core::subject::Subject;

use crate::compare::{acquire, incr, set_ex, subject_key, throttle, SUBJECTS};
use crate::load::{push, Gen, Load, Order};
use crate::server::{cmd, connect, info, info_field, start_node, used_memory};

/// The bytes jemalloc (Redis's allocator) hands out for a request of `n` bytes.
fn jemalloc(n: usize) -> usize {
    if n <= 8 {
        return 8;
    }
    if n <= 128 {
        return n.div_ceil(16) * 16;
    }
    // Four size classes per doubling above 128.
    let group = n.next_power_of_two() / 2;
    let step = group / 4;
    n.div_ceil(step) * step
}

fn memory_usage(con: &mut redis::Connection, key: &str) -> f64 {
    match cmd(con, &["MEMORY", "USAGE", key]) {
        redis::Value::Int(n) => n as f64,
        other => panic!("MEMORY USAGE {key} gave {other:?}"),
    }
}

/// Waits until only `clients` clients are connected (the load's connections are
/// gone, and their buffers with them).
fn settle(con: &mut redis::Connection, clients: &str) {
    for _ in 0..200 {
        if info_field(&info(con, "clients"), "connected_clients:").as_deref() == Some(clients) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// `used_memory` growth per subject when `gen` creates `subjects` subjects.
fn grow(
    con: &mut redis::Connection,
    load: &Load,
    gen: &Gen,
    expect: Option<i64>,
    what: &str,
) -> f64 {
    cmd(con, &["FLUSHALL"]);
    settle(con, "1");
    let before = used_memory(con);
    load.run(Order::Each, gen, expect, what);
    settle(con, "1");
    (used_memory(con) - before) / load.subjects as f64
}

/// Prints the memory table; returns bytes per subject of the 3-limit plan.
pub fn run(tollgate: &str, cell: Option<&str>) -> f64 {
    let mut modules = vec![tollgate.to_string()];
    modules.extend(cell.map(str::to_string));
    let server = start_node(&modules, &[]);
    let mut con = connect(server.port).unwrap_or_else(|e| panic!("{e}"));
    crate::compare::set_plans(&mut con);
    let load = Load {
        port: server.port,
        connections: 4,
        pipeline: 64,
        subjects: SUBJECTS,
    };
    let mut rows: Vec<(&str, Box<Gen>, Option<i64>)> = vec![
        ("SET ... EX 3600 (any key with a TTL)", set_ex("s:"), None),
        ("INCR (no TTL)", incr("s:"), None),
    ];
    if cell.is_some() {
        rows.push((
            "CL.THROTTLE (redis-cell)",
            throttle("CL.THROTTLE", "s:"),
            Some(0),
        ));
    }
    rows.extend([
        ("RL.THROTTLE", throttle("RL.THROTTLE", "s:"), Some(0)),
        ("RL.ACQUIRE 1 limit", acquire("one", true, "s:"), Some(1)),
        ("RL.ACQUIRE 3 limits", acquire("three", true, "s:"), Some(1)),
    ]);
    println!("\nMemory per subject: used_memory growth over {SUBJECTS} subjects, and MEMORY USAGE of one of them");
    println!(
        "{:<38} {:>10} {:>13} {:>17}",
        "keys", "B/subject", "MEMORY USAGE", "MEMORY USAGE/real"
    );
    let mut measured = Vec::new();
    for (label, gen, expect) in &rows {
        let bytes = grow(&mut con, &load, &**gen, *expect, label);
        let usage = memory_usage(&mut con, &subject_key("s:", 0));
        println!(
            "{:<38} {:>10.0} {:>13.0} {:>17.2}",
            label,
            bytes,
            usage,
            usage / bytes
        );
        measured.push((*label, bytes, usage));
    }
    let find = |prefix: &str| {
        measured
            .iter()
            .find(|m| m.0.starts_with(prefix))
            .map_or((f64::NAN, f64::NAN), |m| (m.1, m.2))
    };
    let (set_bytes, set_usage) = find("SET");
    let (three_bytes, three_usage) = find("RL.ACQUIRE 3");
    breakdown(set_bytes, set_usage, three_bytes, three_usage);
    credits(&mut con, server.port);
    three_bytes
}

/// Where a 3-limit subject's bytes go: Redis's per-key cost (what a `SET ... EX` key
/// with a shared value costs), the two objects Redis wraps a module value in, and
/// the module's own allocations (the subject's box, and what the module's
/// `mem_usage` counts outside it).
fn breakdown(set_bytes: f64, set_usage: f64, three_bytes: f64, three_usage: f64) {
    // MEMORY USAGE of `SET k 1 EX n` (a shared integer) = robj 16 + key sds + 24.
    let key_sds = set_usage - 16.0 - 24.0;
    let slots = 2.0 * 8.0 * SUBJECTS.next_power_of_two() as f64 / SUBJECTS as f64;
    // robj (16) pointing to a moduleValue { type, value } (16).
    let wrappers = 32.0;
    let value = three_bytes - set_bytes - wrappers;
    // What the module's mem_usage reports: MEMORY USAGE minus key sds and dictEntry.
    let reported = three_usage - key_sds - 24.0;
    // The box the module keeps as the value, and what its own count adds outside it
    // (spilled state, rarely used parts).
    let boxed = std::mem::size_of::<Subject>();
    let outside = (reported as usize).saturating_sub(boxed);
    println!(
        "Where a 3-limit subject's {three_bytes:.0} B go: Redis key {set_bytes:.0} (what a SET EX key costs: key name {key_sds:.0}, \
         dict entry 32, expire entry 32, hash-table slots {slots:.0}) + robj and moduleValue {wrappers:.0} + module value \
         {value:.0} (Box<Subject> {boxed} B, a {} B allocation, + {outside} B outside it by the module's count). \
         MEMORY USAGE says {three_usage:.0}: the module's {reported:.0} + key name + 24, without the expire entry, the \
         wrappers, the slots and the allocator's rounding.",
        jemalloc(boxed),
    );
}

/// A credits key with 1,000 blocks and 1,000 remembered ids (1,000 grants, each with
/// its own expiry and id): `MEMORY USAGE` against `used_memory` growth, over 20 keys.
fn credits(con: &mut redis::Connection, port: u16) {
    const KEYS: u64 = 20;
    const BLOCKS: u64 = 1_000;
    let load = Load {
        port,
        connections: 1,
        pipeline: 200,
        subjects: KEYS * BLOCKS,
    };
    let gen = |s: u64, buf: &mut Vec<u8>| {
        let key = format!("credits:{:03}", s / BLOCKS);
        let ttl = (86_400_000 + s % BLOCKS).to_string();
        let id = format!("grant-{:06}", s % BLOCKS);
        push(
            buf,
            &[
                b"RL.CREDITS.GRANT",
                key.as_bytes(),
                b"1000",
                b"TTL",
                ttl.as_bytes(),
                b"ID",
                id.as_bytes(),
            ],
        );
        1
    };
    cmd(con, &["FLUSHALL"]);
    settle(con, "1");
    let before = used_memory(con);
    load.run(Order::Each, &gen, None, "credits grants");
    settle(con, "1");
    let real = (used_memory(con) - before) / KEYS as f64;
    let usage = memory_usage(con, "credits:000");
    let blocks = match cmd(con, &["RL.CREDITS.BLOCKS", "credits:000"]) {
        redis::Value::Array(a) => a.len(),
        _ => 0,
    };
    println!(
        "Credits key with {blocks} blocks and {BLOCKS} remembered ids: MEMORY USAGE {usage:.0} B, real {real:.0} B \
         (used_memory growth / {KEYS} keys): MEMORY USAGE / real = {:.2}",
        usage / real
    );
}
