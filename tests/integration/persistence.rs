//! State survives `DEBUG RELOAD`, restarts from the AOF, AOF rewrites, and travels
//! with `DUMP`/`RESTORE`/`COPY`.

use std::process::Command;
use std::time::Duration;

use crate::harness::*;
use redis::Value;

/// Plans and a workload touching every kind of limit, with long windows so nothing
/// expires while a test runs.
pub fn workload(con: &mut redis::Connection) {
    int(
        con,
        &[
            "RL.PLAN.SET",
            "free",
            "rpm",
            "sliding 10/1h precision 12",
            "rpd",
            "fixed 200/1d",
            "tpm",
            "bucket 2000 token/1h burst 4000",
            "big",
            "cap 2000 token",
            "spend",
            "fixed 1000000 usd_micros/1mo warn 80%",
        ],
    );
    int(
        con,
        &[
            "RL.PLAN.SET",
            "pro",
            "rpm",
            "sliding 60/1h",
            "rpd",
            "fixed 2000/1d",
            "fallback",
            "free",
        ],
    );
    for i in 0..20 {
        let key = format!("user:{}", i % 7);
        let plan = if i % 3 == 0 { "pro" } else { "free" };
        let tokens = (i * 37 % 500).to_string();
        let _ = run(
            con,
            &[
                "RL.ACQUIRE",
                &key,
                plan,
                "1",
                "COST",
                "token",
                &tokens,
                "usd_micros",
                "1000",
            ],
        );
    }
    let _ = try_run(con, &["RL.THROTTLE", "cell:1", "5", "10", "60", "3"]);
    // Leases and reservations: some settled, some touched, some left in flight.
    int(
        con,
        &[
            "RL.PLAN.SET",
            "jobs",
            "slots",
            "concurrency 5 ttl 1h",
            "tpd",
            "fixed 100000 token/1d",
        ],
    );
    for i in 0..12 {
        let key = format!("worker:{}", i % 3);
        let id = format!("req-{i}");
        let _ = try_run(
            con,
            &[
                "RL.ACQUIRE",
                &key,
                "jobs",
                "1",
                "COST",
                "token",
                "500",
                "ID",
                &id,
            ],
        );
        match i % 4 {
            0 => {
                let _ = try_run(con, &["RL.RELEASE", &key, &id, "COST", "token", "120"]);
            }
            1 => {
                let _ = try_run(con, &["RL.TOUCH", &key, &id, "7200000"]);
            }
            2 => {
                let _ = try_run(con, &["RL.RELEASE", &key, &id, "COST", "token", "900"]);
            }
            _ => {}
        }
    }
    let _ = try_run(con, &["RL.ACQUIRE", "worker:9", "jobs"]);
}

/// What must survive: the dataset digest, the plans, and every limit's remaining.
fn snapshot(con: &mut redis::Connection) -> (String, Value, Vec<Vec<i64>>) {
    let plans = run(con, &["RL.PLAN.GET", "free"]);
    let peeks = (0..7)
        .map(|i| remaining_of(con, &format!("user:{i}")))
        .collect();
    (digest(con), plans, peeks)
}

fn remaining_of(con: &mut redis::Connection, key: &str) -> Vec<i64> {
    let d = decision(con, &["RL.PEEK", key, "free", "0"]);
    ["rpm", "rpd", "tpm", "spend"]
        .iter()
        .map(|l| d.remaining(l))
        .collect()
}

#[test]
fn debug_reload_keeps_plans_state_and_expiry() {
    let server = Server::start();
    let mut con = server.client();
    workload(&mut con);
    let before = snapshot(&mut con);
    let pttl = int(&mut con, &["PTTL", "user:1"]);
    assert_eq!(string(&mut con, &["DEBUG", "RELOAD"]), "OK");
    assert_eq!(snapshot(&mut con).1, before.1);
    assert_eq!(
        snapshot(&mut con).0,
        before.0,
        "dataset digest changed across DEBUG RELOAD"
    );
    let after = int(&mut con, &["PTTL", "user:1"]);
    assert!(after <= pttl && after > pttl - 5_000);
    assert_eq!(
        run(&mut con, &["RL.PLAN.LIST"]),
        Value::Array(vec![
            Value::BulkString(b"free".to_vec()),
            Value::BulkString(b"jobs".to_vec()),
            Value::BulkString(b"pro".to_vec()),
        ])
    );
}

#[test]
fn a_kill_9_with_appendfsync_always_loses_nothing() {
    let mut server = Server::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mut con = server.client();
    workload(&mut con);
    let before = snapshot(&mut con);
    server.kill9();
    let server = server.restart();
    let mut con = server.client();
    assert_eq!(snapshot(&mut con), before);
}

#[test]
fn an_aof_rewrite_keeps_everything() {
    let mut server = Server::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mut con = server.client();
    workload(&mut con);
    assert!(string(&mut con, &["BGREWRITEAOF"]).contains("rewriting"));
    wait_until(20, "the AOF rewrite", || {
        string(&mut con, &["INFO", "persistence"]).contains("aof_rewrite_in_progress:0")
    });
    std::thread::sleep(Duration::from_millis(100));
    // More writes after the rewrite land in the new incremental file.
    let _ = run(&mut con, &["RL.ACQUIRE", "user:1", "free", "2"]);
    let before = snapshot(&mut con);
    server.kill9();
    let server = server.restart();
    let mut con = server.client();
    assert_eq!(snapshot(&mut con), before);
}

#[test]
fn dump_restore_copy_and_memory_usage_work() {
    let server = Server::start();
    let mut con = server.client();
    workload(&mut con);
    let original = remaining_of(&mut con, "user:1");
    let dump = match run(&mut con, &["DUMP", "user:1"]) {
        Value::BulkString(b) => b,
        other => panic!("DUMP gave {other:?}"),
    };
    let restored: Value = redis::cmd("RESTORE")
        .arg("copy:1")
        .arg(0)
        .arg(&dump)
        .query(&mut con)
        .unwrap();
    assert_eq!(restored, Value::Okay);
    assert_eq!(remaining_of(&mut con, "copy:1"), original);
    assert_eq!(int(&mut con, &["COPY", "user:1", "copy:2"]), 1);
    assert_eq!(remaining_of(&mut con, "copy:2"), original);
    let pttl = int(&mut con, &["PTTL", "copy:2"]);
    assert!(pttl > 0, "COPY keeps the expiry");
    assert_eq!(
        run(&mut con, &["DEBUG", "DIGEST-VALUE", "user:1"]),
        run(&mut con, &["DEBUG", "DIGEST-VALUE", "copy:2"])
    );
    let usage = int(&mut con, &["MEMORY", "USAGE", "user:1"]);
    assert!((64..5_000).contains(&usage), "MEMORY USAGE {usage}");
    // A corrupt payload is refused, not loaded.
    let mut bad = dump.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    let refused: redis::RedisResult<Value> = redis::cmd("RESTORE")
        .arg("bad")
        .arg(0)
        .arg(&bad)
        .query(&mut con);
    assert!(refused.is_err());
    assert_eq!(int(&mut con, &["EXISTS", "bad"]), 0);
    assert_eq!(string(&mut con, &["PING"]), "PONG");
}

#[test]
fn refuses_to_load_when_aof_rewrites_would_lose_plans() {
    let dir = std::env::temp_dir().join(format!("tollgate-preamble-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let output = Command::new(server_binary())
        .args([
            "--port",
            &free_port().to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--aof-use-rdb-preamble",
            "no",
        ])
        .arg("--dir")
        .arg(&dir)
        .arg("--loadmodule")
        .arg(module_path())
        .output()
        .expect("run the server");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!output.status.success(), "the server must not start");
    let log = String::from_utf8_lossy(&output.stdout);
    assert!(log.contains("aof-use-rdb-preamble is 'no'"), "log: {log}");
}

/// The encodings saved by the first release (`rlsubject` v1, `rlcredits` v1, plans aux
/// v1), made as tests/fixtures/README.md says, still load and keep working.
#[test]
fn an_rdb_saved_by_encoding_version_1_still_loads() {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/encodings-v1.rdb");
    let server = Server::start_from_rdb(&fixture, &[]);
    assert!(
        server.log().contains("DB loaded from disk"),
        "{}",
        server.log()
    );
    the_saved_session_is_all_there(&mut server.client());
}

/// The AOF of the same session, written by the previous release (its `RL.APPLY`
/// deltas are version 1), replays into the same state.
#[test]
fn an_aof_written_with_version_1_deltas_still_replays() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/aof-v1");
    let server = Server::start_from_aof(&fixture, &[]);
    assert!(
        server.log().contains("DB loaded from append only file"),
        "{}",
        server.log()
    );
    let mut con = server.client();
    the_saved_session_is_all_there(&mut con);
    // Rewritten in the current format, it loads into the same state.
    run(&mut con, &["BGREWRITEAOF"]);
    wait_until(10, "the AOF rewrite", || {
        let info = string(&mut con, &["INFO", "persistence"]);
        info.contains("aof_rewrite_in_progress:0") && info.contains("aof_rewrite_scheduled:0")
    });
    let before = digest(&mut con);
    run(&mut con, &["DEBUG", "LOADAOF"]);
    assert_eq!(digest(&mut con), before);
}

/// What `tests/fixtures/README.md` says the saved session holds.
fn the_saved_session_is_all_there(con: &mut redis::Connection) {
    let plans: Vec<String> = redis::cmd("RL.PLAN.LIST").query(con).unwrap();
    assert_eq!(plans, ["scoped", "tenyear"]);
    assert_eq!(string(con, &["RL.PLAN.DEFAULT"]), "tenyear");
    let scoped = map_of(&run(con, &["RL.PLAN.GET", "scoped"]));
    assert_eq!(text(&scoped["chat"]), "fixed 5/120mo for chat");
    assert_eq!(text(&scoped["fallback"]), "tenyear");
    assert_eq!(string(con, &["RL.ASSIGN", "user:1"]), "tenyear");
    assert_eq!(int(con, &["TTL", "user:1"]), -1);
    // Usage carried by the file: 3 requests, 400 tokens, two leases in flight.
    let d = decision(con, &["RL.PEEK", "user:1", "*", "0"]);
    assert_eq!(d.remaining("rpy"), 97);
    assert_eq!(d.remaining("slide"), 997);
    assert_eq!(d.remaining("tok"), 4600);
    // Settling the reservation made before the save refunds into the same window.
    let released = map_of(&run(
        con,
        &["RL.RELEASE", "user:1", "req-1", "COST", "token", "100"],
    ));
    assert_eq!(int_of(&released["released"]), 1);
    let d = decision(con, &["RL.PEEK", "user:1", "*", "0"]);
    assert_eq!(d.remaining("tok"), 4800);
    let d = decision(con, &["RL.PEEK", "user:2", "scoped", "ENDPOINT", "chat"]);
    assert_eq!(d.remaining("chat"), 3);
    assert_eq!(int(con, &["RL.CREDITS.BALANCE", "credits:1"]), 4490);
    // The remembered deduction can still be refunded, once.
    let refund = run(con, &["RL.CREDITS.REFUND", "credits:1", "ded-1"]);
    assert_eq!(refund, run_value_pair(1200, 5690));
    assert_eq!(
        run(
            con,
            &["RL.CREDITS.GRANT", "credits:1", "700", "ID", "grant-b"]
        ),
        Value::Int(5700),
        "a remembered grant answers its first result"
    );
    assert_eq!(int(con, &["RL.CREDITS.BALANCE", "credits:1"]), 5690);
    // Everything saves and loads again in the current encoding.
    let before = digest(con);
    run(con, &["DEBUG", "RELOAD"]);
    assert_eq!(digest(con), before);
}

fn run_value_pair(a: i64, b: i64) -> Value {
    Value::Array(vec![Value::Int(a), Value::Int(b)])
}

fn int_of(v: &Value) -> i64 {
    match v {
        Value::Int(n) => *n,
        other => panic!("not an integer: {other:?}"),
    }
}
