//! Leases and reservations: `ID`, `TTL`, `RL.RELEASE` with actual costs, `RL.TOUCH`,
//! per-key bounds, notifications and `INFO`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::harness::*;
use redis::Value;

fn release(con: &mut redis::Connection, args: &[&str]) -> std::collections::HashMap<String, Value> {
    let mut full = vec!["RL.RELEASE"];
    full.extend_from_slice(args);
    map_of(&run(con, &full))
}

fn info_field(con: &mut redis::Connection, field: &str) -> i64 {
    let info = string(con, &["INFO", "tollgate"]);
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("tollgate_{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {info}"))
}

#[test]
fn a_concurrency_limit_hands_out_leases_with_generated_ids() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "p",
            "jobs",
            "concurrency 2 ttl 60s",
            "rpd",
            "fixed 100/1d",
        ],
    );
    let a = decision(&mut con, &["RL.ACQUIRE", "u", "p"]);
    let b = decision(&mut con, &["RL.ACQUIRE", "u", "p", "ID", "my-request"]);
    assert!(a.allowed() && b.allowed());
    let a_id = a.str("id").expect("a generated id");
    assert_eq!(b.str("id").as_deref(), Some("my-request"));
    assert_eq!(b.remaining("jobs"), 0);
    let c = decision(&mut con, &["RL.ACQUIRE", "u", "p"]);
    assert!(!c.allowed());
    assert_eq!(c.str("denied_by").as_deref(), Some("jobs"));
    assert!(
        (59_000..=60_000).contains(&c.retry_after_ms()),
        "{}",
        c.retry_after_ms()
    );
    // A denied call registers nothing: no id.
    assert_eq!(c.str("id"), None);
    let released = release(&mut con, &["u", &a_id]);
    assert_eq!(released["released"], Value::Int(1));
    assert_eq!(text(&released["plan"]), "p");
    assert!(matches!(&released["limits"], Value::Array(l) if l.len() == 2));
    // Releasing again, or an id never seen, is harmless and says so.
    assert_eq!(release(&mut con, &["u", &a_id])["released"], Value::Int(0));
    assert_eq!(
        release(&mut con, &["u", "never-seen"])["released"],
        Value::Int(0)
    );
    assert_eq!(
        release(&mut con, &["nokey", "x"])["released"],
        Value::Int(0)
    );
    assert!(decision(&mut con, &["RL.ACQUIRE", "u", "p"]).allowed());
}

#[test]
fn a_retried_acquire_with_a_live_id_answers_the_original_decision_and_charges_nothing() {
    let server = Server::start();
    let mut con = server.client();
    int(&mut con, &["RL.PLAN.SET", "p", "rpd", "fixed 100/1d"]);
    let first = decision(&mut con, &["RL.ACQUIRE", "u", "p", "ID", "r1"]);
    assert!(first.allowed());
    let retried = decision(&mut con, &["RL.ACQUIRE", "u", "p", "ID", "r1"]);
    assert!(retried.allowed());
    assert_eq!(retried.str("id").as_deref(), Some("r1"));
    assert_eq!(retried.remaining("rpd"), 99, "the retry charged nothing");
    assert_eq!(
        decision(&mut con, &["RL.PEEK", "u", "p", "0"]).remaining("rpd"),
        99
    );
    // Once released, the id makes a new request.
    run(&mut con, &["RL.RELEASE", "u", "r1"]);
    assert_eq!(
        decision(&mut con, &["RL.ACQUIRE", "u", "p", "ID", "r1"]).remaining("rpd"),
        98
    );
}

#[test]
fn settlement_refunds_and_charges_the_difference() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "llm",
            "tpd",
            "fixed 10000 token/1d",
            "tph",
            "bucket 5000 token/1h",
            "rpd",
            "fixed 100/1d",
        ],
    );
    // Admit on the estimate (prompt + max_tokens), settle on what was used.
    let d = decision(
        &mut con,
        &[
            "RL.ACQUIRE",
            "u",
            "llm",
            "1",
            "COST",
            "token",
            "4000",
            "ID",
            "chat-1",
        ],
    );
    assert!(d.allowed());
    assert_eq!(d.remaining("tpd"), 6000);
    let r = release(&mut con, &["u", "chat-1", "COST", "token", "1200"]);
    assert_eq!(r["released"], Value::Int(1));
    let after = Decision::from(&Value::Map(vec![
        (Value::BulkString(b"allowed".to_vec()), Value::Int(1)),
        (Value::BulkString(b"limits".to_vec()), r["limits"].clone()),
    ]));
    assert_eq!(after.remaining("tpd"), 8800);
    assert_eq!(after.remaining("tph"), 3800);
    assert_eq!(
        after.remaining("rpd"),
        99,
        "request units are only settled when named"
    );
    // An overrun is charged, never refused, and may leave a limit past capacity.
    assert!(decision(
        &mut con,
        &[
            "RL.ACQUIRE",
            "u",
            "llm",
            "1",
            "COST",
            "token",
            "100",
            "ID",
            "chat-2"
        ]
    )
    .allowed());
    assert_eq!(
        release(&mut con, &["u", "chat-2", "COST", "token", "9000"])["released"],
        Value::Int(1)
    );
    let d = decision(&mut con, &["RL.ACQUIRE", "u", "llm", "0"]);
    assert!(!d.allowed());
    assert_eq!(d.remaining("tpd"), 0);
    assert_eq!(d.str("denied_by").as_deref(), Some("tpd"));
}

#[test]
fn touch_extends_a_live_lease_only() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &["RL.PLAN.SET", "p", "jobs", "concurrency 1 ttl 300ms"],
    );
    let d = decision(&mut con, &["RL.ACQUIRE", "u", "p", "ID", "long-job"]);
    assert!(d.allowed());
    assert_eq!(int(&mut con, &["RL.TOUCH", "u", "long-job", "60000"]), 1);
    std::thread::sleep(Duration::from_millis(400));
    // Still held past its 300 ms: the heartbeat moved its expiry (a minute away, so a
    // slow machine's pauses cannot reach it).
    let d = decision(&mut con, &["RL.ACQUIRE", "u", "p"]);
    assert!(!d.allowed());
    assert!(d.retry_after_ms() > 1_000, "{}", d.retry_after_ms());
    assert_eq!(int(&mut con, &["RL.TOUCH", "u", "nope", "5000"]), 0);
    assert_eq!(int(&mut con, &["RL.TOUCH", "missing-key", "x", "5000"]), 0);
    assert_eq!(
        err(&mut con, &["RL.TOUCH", "u", "long-job", "0"]),
        "ERR ttl-ms must be between 1 and 315360000000"
    );
    assert_eq!(
        err(&mut con, &["RL.TOUCH", "u", "long-job", "x"]),
        "ERR ttl-ms must be a non-negative integer, got 'x'"
    );
    assert!(err(&mut con, &["RL.TOUCH", "u", "long-job"]).contains("wrong number of arguments"));
}

#[test]
fn a_client_that_vanishes_frees_its_slot_after_the_ttl() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &["RL.PLAN.SET", "p", "jobs", "concurrency 1 ttl 2s"],
    );
    {
        let mut crashed = server.client();
        assert!(decision(&mut crashed, &["RL.ACQUIRE", "u", "p"]).allowed());
        // The connection drops here without a release.
    }
    // Held until its TTL passes (2 s: room for a slow machine between the calls).
    let d = decision(&mut con, &["RL.ACQUIRE", "u", "p"]);
    assert!(!d.allowed());
    assert!((1..=2_000).contains(&d.retry_after_ms()));
    std::thread::sleep(Duration::from_millis(d.retry_after_ms() as u64 + 20));
    assert!(decision(&mut con, &["RL.ACQUIRE", "u", "p"]).allowed());
}

#[test]
fn eight_clients_never_hold_more_leases_than_the_limit() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &["RL.PLAN.SET", "p", "jobs", "concurrency 3 ttl 30s"],
    );
    let held = AtomicUsize::new(0);
    let peak = AtomicUsize::new(0);
    let admitted = AtomicUsize::new(0);
    let port = server.port;
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
                let mut con = client.get_connection().unwrap();
                for _ in 0..60 {
                    let d = decision(&mut con, &["RL.ACQUIRE", "shared", "p"]);
                    if d.allowed() {
                        let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        admitted.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_micros(300));
                        held.fetch_sub(1, Ordering::SeqCst);
                        let id = d.str("id").unwrap();
                        assert_eq!(
                            release(&mut con, &["shared", &id])["released"],
                            Value::Int(1)
                        );
                    }
                }
            });
        }
    });
    assert!(
        peak.load(Ordering::SeqCst) <= 3,
        "peak {}",
        peak.load(Ordering::SeqCst)
    );
    assert!(admitted.load(Ordering::SeqCst) > 3);
    // PEEK answers what an acquire would: it would take one of the three leases.
    assert_eq!(
        decision(&mut con, &["RL.PEEK", "shared", "p", "0"]).remaining("jobs"),
        2
    );
    assert_eq!(info_field(&mut con, "requests_in_flight"), 0);
}

#[test]
fn requests_per_key_are_capped_by_config() {
    let server = Server::start();
    let mut con = server.client();
    assert_eq!(
        string(
            &mut con,
            &["CONFIG", "SET", "tollgate.max-requests-per-key", "3"]
        ),
        "OK"
    );
    int(&mut con, &["RL.PLAN.SET", "p", "jobs", "concurrency 100"]);
    for _ in 0..3 {
        assert!(decision(&mut con, &["RL.ACQUIRE", "u", "p"]).allowed());
    }
    assert_eq!(
        err(&mut con, &["RL.ACQUIRE", "u", "p"]),
        "ERR key 'u' already holds 3 requests in flight (tollgate.max-requests-per-key)"
    );
    assert_eq!(info_field(&mut con, "requests_in_flight"), 3);
    assert_eq!(int(&mut con, &["DEL", "u"]), 1);
    assert_eq!(info_field(&mut con, "requests_in_flight"), 0);
    assert!(err(
        &mut con,
        &["CONFIG", "SET", "tollgate.max-requests-per-key", "0"]
    )
    .contains("must be between"));
}

#[test]
fn denials_and_warnings_raise_keyspace_notifications() {
    let server = Server::start();
    let mut con = server.client();
    assert_eq!(
        string(&mut con, &["CONFIG", "SET", "notify-keyspace-events", "Ed"]),
        "OK"
    );
    int(
        &mut con,
        &["RL.PLAN.SET", "p", "rpd", "fixed 2/1d warn 50%"],
    );
    let mut sub_con = server.client();
    let mut pubsub = sub_con.as_pubsub();
    pubsub
        .subscribe(&["__keyevent@0__:rl.denied", "__keyevent@0__:rl.warn"])
        .unwrap();
    pubsub
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(decision(&mut con, &["RL.ACQUIRE", "alice", "p"]).allowed());
    assert!(decision(&mut con, &["RL.ACQUIRE", "alice", "p"]).allowed());
    assert!(!decision(&mut con, &["RL.ACQUIRE", "alice", "p"]).allowed());
    let mut events = Vec::new();
    for _ in 0..2 {
        let msg = pubsub.get_message().unwrap();
        let payload: String = msg.get_payload().unwrap();
        events.push((msg.get_channel_name().to_string(), payload));
    }
    assert_eq!(
        events,
        [
            ("__keyevent@0__:rl.warn".to_string(), "alice".to_string()),
            ("__keyevent@0__:rl.denied".to_string(), "alice".to_string()),
        ]
    );
    assert_eq!(info_field(&mut con, "warn_crossed"), 1);
}

#[test]
fn info_counts_calls_admissions_denials_and_releases() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "p",
            "rpd",
            "fixed 1/1d",
            "jobs",
            "concurrency 5",
        ],
    );
    let d = decision(&mut con, &["RL.ACQUIRE", "u", "p"]);
    assert!(!decision(&mut con, &["RL.ACQUIRE", "u", "p"]).allowed());
    assert!(!decision(&mut con, &["RL.ACQUIRE", "u", "p", "ENDPOINT", "x"]).allowed());
    release(&mut con, &["u", &d.str("id").unwrap()]);
    release(&mut con, &["u", "unknown"]);
    assert_eq!(info_field(&mut con, "calls"), 3);
    assert_eq!(info_field(&mut con, "admitted"), 1);
    assert_eq!(info_field(&mut con, "denied"), 2);
    assert_eq!(info_field(&mut con, "denied_fixed"), 2);
    assert_eq!(info_field(&mut con, "releases"), 1);
    assert_eq!(info_field(&mut con, "releases_unknown"), 1);
    assert_eq!(info_field(&mut con, "plans"), 1);
}

#[test]
fn release_rejects_bad_input() {
    let server = Server::start();
    let mut con = server.client();
    for (args, expected) in [
        (
            vec!["RL.RELEASE", "u", ""],
            "ERR request id must be 1 to 256 bytes",
        ),
        (
            vec!["RL.RELEASE", "u", "id", "BOGUS"],
            "ERR unexpected argument 'BOGUS' (expected COST)",
        ),
        (
            vec!["RL.RELEASE", "u", "id", "COST"],
            "ERR COST needs at least one unit and amount",
        ),
        (
            vec!["RL.RELEASE", "u", "id", "COST", "token", "-5"],
            "ERR COST amount must be a non-negative integer, got '-5'",
        ),
        (
            vec![
                "RL.RELEASE",
                "u",
                "id",
                "COST",
                "token",
                "5",
                "ENDPOINT",
                "x",
            ],
            "ERR unexpected argument 'ENDPOINT' after COST",
        ),
    ] {
        assert_eq!(err(&mut con, &args), expected, "{args:?}");
    }
    assert!(err(&mut con, &["RL.RELEASE", "u"]).contains("wrong number of arguments"));
}

#[test]
fn a_retried_release_says_the_request_was_released() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &["RL.PLAN.SET", "c", "jobs", "concurrency 2 ttl 30s"],
    );
    assert!(decision(&mut con, &["RL.ACQUIRE", "u", "c", "ID", "a"]).allowed());
    let first = map_of(&run(&mut con, &["RL.RELEASE", "u", "a"]));
    assert_eq!(first.get("released"), Some(&Value::Int(1)));
    // The reply was lost; the client releases again: the key remembers why.
    let again = map_of(&run(&mut con, &["RL.RELEASE", "u", "a"]));
    assert_eq!(again.get("released"), Some(&Value::Int(0)));
    assert_eq!(text(&again["reason"]), "released");
    let never = map_of(&run(&mut con, &["RL.RELEASE", "u", "zz"]));
    assert_eq!(text(&never["reason"]), "unknown");
}
