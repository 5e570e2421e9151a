//! `RL.CREDITS.*` and `RL.ACQUIRE ... CREDITS` against a live server.

use std::time::Duration;

use crate::harness::*;
use redis::Value;

fn pair(con: &mut redis::Connection, args: &[&str]) -> (i64, i64) {
    match run(con, args) {
        Value::Array(items) => match items.as_slice() {
            [Value::Int(a), Value::Int(b)] => (*a, *b),
            other => panic!("{args:?}: {other:?}"),
        },
        other => panic!("{args:?}: {other:?}"),
    }
}

fn blocks(con: &mut redis::Connection, key: &str) -> Vec<(String, i64)> {
    match run(con, &["RL.CREDITS.BLOCKS", key]) {
        Value::Array(items) => items
            .iter()
            .map(|b| {
                let m = map_of(b);
                (
                    text(&m["id"]),
                    match m["left"] {
                        Value::Int(n) => n,
                        _ => -1,
                    },
                )
            })
            .collect(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn grants_deductions_refunds_and_revocations() {
    let server = Server::start();
    let mut con = server.client();
    assert_eq!(
        int(
            &mut con,
            &["RL.CREDITS.GRANT", "acct", "100", "ID", "forever"]
        ),
        100
    );
    assert_eq!(
        int(
            &mut con,
            &[
                "RL.CREDITS.GRANT",
                "acct",
                "50",
                "TTL",
                "3600000",
                "ID",
                "late"
            ]
        ),
        150
    );
    assert_eq!(
        int(
            &mut con,
            &[
                "RL.CREDITS.GRANT",
                "acct",
                "30",
                "TTL",
                "600000",
                "ID",
                "soon"
            ]
        ),
        180
    );
    // Earliest expiry first, never-expiring last.
    assert_eq!(
        blocks(&mut con, "acct"),
        [
            ("soon".into(), 30),
            ("late".into(), 50),
            ("forever".into(), 100)
        ]
    );
    assert_eq!(
        pair(
            &mut con,
            &["RL.CREDITS.DEDUCT", "acct", "40", "ID", "req-1"]
        ),
        (40, 140)
    );
    assert_eq!(
        blocks(&mut con, "acct"),
        [("late".into(), 40), ("forever".into(), 100)]
    );
    // All or nothing, unless PARTIAL.
    assert_eq!(
        pair(&mut con, &["RL.CREDITS.DEDUCT", "acct", "1000"]),
        (0, 140)
    );
    assert_eq!(
        int(&mut con, &["RL.CREDITS.BALANCE", "acct", "MIN", "140"]),
        1
    );
    assert_eq!(
        int(&mut con, &["RL.CREDITS.BALANCE", "acct", "MIN", "141"]),
        0
    );
    // A refund returns the deduction to its blocks, once.
    assert_eq!(
        pair(&mut con, &["RL.CREDITS.REFUND", "acct", "req-1"]),
        (40, 180)
    );
    assert_eq!(
        pair(&mut con, &["RL.CREDITS.REFUND", "acct", "req-1"]),
        (0, 180)
    );
    assert_eq!(
        pair(&mut con, &["RL.CREDITS.REFUND", "acct", "never"]),
        (0, 180)
    );
    assert_eq!(int(&mut con, &["RL.CREDITS.REVOKE", "acct", "late"]), 50);
    assert_eq!(int(&mut con, &["RL.CREDITS.REVOKE", "acct", "late"]), 0);
    assert_eq!(
        pair(&mut con, &["RL.CREDITS.DEDUCT", "acct", "1000", "PARTIAL"]),
        (130, 0)
    );
    assert_eq!(int(&mut con, &["RL.CREDITS.BALANCE", "nobody"]), 0);
    assert_eq!(
        run(&mut con, &["RL.CREDITS.BLOCKS", "nobody"]),
        Value::Array(vec![])
    );
    assert_eq!(string(&mut con, &["TYPE", "acct"]), "rlcredits");
}

#[test]
fn repeated_ids_change_nothing() {
    let server = Server::start();
    let mut con = server.client();
    assert_eq!(
        int(
            &mut con,
            &["RL.CREDITS.GRANT", "acct", "100", "ID", "stripe-evt-1"]
        ),
        100
    );
    assert_eq!(
        int(
            &mut con,
            &["RL.CREDITS.GRANT", "acct", "100", "ID", "stripe-evt-1"]
        ),
        100,
        "a retried webhook"
    );
    assert_eq!(
        pair(&mut con, &["RL.CREDITS.DEDUCT", "acct", "30", "ID", "r"]),
        (30, 70)
    );
    assert_eq!(
        pair(&mut con, &["RL.CREDITS.DEDUCT", "acct", "30", "ID", "r"]),
        (30, 70),
        "a retried request"
    );
    assert_eq!(int(&mut con, &["RL.CREDITS.BALANCE", "acct"]), 70);
}

#[test]
fn blocks_expire_by_themselves() {
    let server = Server::start();
    let mut con = server.client();
    assert_eq!(
        int(&mut con, &["RL.CREDITS.GRANT", "acct", "10", "TTL", "300"]),
        10
    );
    let at = match &run(&mut con, &["RL.CREDITS.BLOCKS", "acct"]) {
        Value::Array(items) => match map_of(&items[0])["expires_at"] {
            Value::Int(n) => n,
            _ => 0,
        },
        _ => 0,
    };
    assert!(at > 0);
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(int(&mut con, &["RL.CREDITS.BALANCE", "acct"]), 0);
    assert_eq!(pair(&mut con, &["RL.CREDITS.DEDUCT", "acct", "1"]), (0, 0));
    // An absolute expiry in the past is refused.
    assert_eq!(
        err(
            &mut con,
            &["RL.CREDITS.GRANT", "acct", "5", "EXPIREAT", "1000"]
        ),
        "ERR the block would already be expired"
    );
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let server = Server::start();
    let mut con = server.client();
    assert_eq!(
        int(
            &mut con,
            &["RL.CREDITS.GRANT", "acct", "18446744073709551615"]
        ),
        i64::MAX,
        "replies clamp to i64"
    );
    for (args, expected) in [
        (
            vec!["RL.CREDITS.GRANT", "acct", "1"],
            "ERR the balance would exceed 18446744073709551615",
        ),
        (
            vec!["RL.CREDITS.GRANT", "b", "0"],
            "ERR amount must be at least 1",
        ),
        (
            vec!["RL.CREDITS.GRANT", "b", "-5"],
            "ERR amount must be a non-negative integer, got '-5'",
        ),
        (
            vec!["RL.CREDITS.GRANT", "b", "1.5"],
            "ERR amount must be a non-negative integer, got '1.5'",
        ),
        (
            vec!["RL.CREDITS.GRANT", "b", "18446744073709551616"],
            "ERR amount is larger than 18446744073709551615",
        ),
        (
            vec!["RL.CREDITS.GRANT", "b", "5", "TTL", "0"],
            "ERR TTL must be between 1 and 315360000000 ms",
        ),
        (
            vec![
                "RL.CREDITS.GRANT",
                "b",
                "5",
                "TTL",
                "10",
                "EXPIREAT",
                "99999999999999",
            ],
            "ERR give at most one of TTL and EXPIREAT, and one ID",
        ),
        (
            vec!["RL.CREDITS.GRANT", "b", "5", "ID"],
            "ERR ID needs a value",
        ),
        (
            vec!["RL.CREDITS.GRANT", "b", "5", "FOO", "1"],
            "ERR unexpected argument 'FOO' (expected TTL, EXPIREAT or ID)",
        ),
        (
            vec!["RL.CREDITS.DEDUCT", "b", "5", "EVERYTHING"],
            "ERR unexpected argument 'EVERYTHING' (expected PARTIAL or ID)",
        ),
        (
            vec!["RL.CREDITS.BALANCE", "b", "AT", "5"],
            "ERR unexpected argument 'AT' (expected MIN)",
        ),
        (
            vec!["RL.CREDITS.REFUND", "b", ""],
            "ERR request id must be 1 to 256 bytes",
        ),
    ] {
        assert_eq!(err(&mut con, &args), expected, "{args:?}");
    }
    assert_eq!(int(&mut con, &["EXISTS", "b"]), 0);
    assert!(
        err(&mut con, &["RL.CREDITS.BALANCE", "b", "MIN"]).contains("wrong number of arguments")
    );
    assert_eq!(string(&mut con, &["SET", "s", "x"]), "OK");
    assert_eq!(
        err(&mut con, &["RL.CREDITS.DEDUCT", "s", "1"]),
        "WRONGTYPE Operation against a key holding the wrong kind of value"
    );
    int(&mut con, &["RL.PLAN.SET", "p", "rpd", "fixed 5/1d"]);
    assert_eq!(
        err(&mut con, &["RL.ACQUIRE", "u", "p", "CREDITS", "s", "1"]),
        "WRONGTYPE Operation against a key holding the wrong kind of value"
    );
    assert_eq!(
        err(&mut con, &["RL.ACQUIRE", "u", "p", "CREDITS", "c"]),
        "ERR CREDITS needs a key and an amount"
    );
    assert_eq!(int(&mut con, &["EXISTS", "u"]), 0);
}

#[test]
fn acquire_with_credits_charges_both_or_neither() {
    let server = Server::start();
    let mut con = server.client();
    int(&mut con, &["RL.PLAN.SET", "images", "ipm", "fixed 3/1d"]);
    assert_eq!(
        int(&mut con, &["RL.CREDITS.GRANT", "{acct:42}:credits", "25"]),
        25
    );
    let d = decision(
        &mut con,
        &[
            "RL.ACQUIRE",
            "{acct:42}:rl",
            "images",
            "CREDITS",
            "{acct:42}:credits",
            "10",
            "ID",
            "img-1",
        ],
    );
    assert!(d.allowed());
    assert_eq!(d.int("credits"), 15);
    assert_eq!(d.remaining("ipm"), 2);
    // Not enough credits: nothing is charged, the limits included.
    let d = decision(
        &mut con,
        &[
            "RL.ACQUIRE",
            "{acct:42}:rl",
            "images",
            "CREDITS",
            "{acct:42}:credits",
            "20",
        ],
    );
    assert!(!d.allowed());
    assert_eq!(d.str("denied_by").as_deref(), Some("credits"));
    assert_eq!(d.retry_after_ms(), -1);
    assert_eq!(d.remaining("ipm"), 2);
    assert_eq!(
        int(&mut con, &["RL.CREDITS.BALANCE", "{acct:42}:credits"]),
        15
    );
    // Denied by a limit: the credits are not charged.
    assert!(decision(&mut con, &["RL.ACQUIRE", "{acct:42}:rl", "images", "2"]).allowed());
    let d = decision(
        &mut con,
        &[
            "RL.ACQUIRE",
            "{acct:42}:rl",
            "images",
            "CREDITS",
            "{acct:42}:credits",
            "1",
        ],
    );
    assert_eq!(d.str("denied_by").as_deref(), Some("ipm"));
    assert_eq!(
        int(&mut con, &["RL.CREDITS.BALANCE", "{acct:42}:credits"]),
        15
    );
    // The acquire's ID is the deduction's id: a failed image gets its credits back.
    assert_eq!(
        pair(
            &mut con,
            &["RL.CREDITS.REFUND", "{acct:42}:credits", "img-1"]
        ),
        (10, 25)
    );
    // The deduction id is remembered: reusing the request id (its reservation long
    // settled) would repeat the deduction for free, so it is refused.
    run(&mut con, &["RL.RELEASE", "{acct:42}:rl", "img-1"]);
    int(&mut con, &["RL.PLAN.SET", "other", "rpm", "fixed 100/1m"]);
    let before = digest(&mut con);
    let e = err(
        &mut con,
        &[
            "RL.ACQUIRE",
            "{acct:42}:rl",
            "other",
            "CREDITS",
            "{acct:42}:credits",
            "10",
            "ID",
            "img-1",
        ],
    );
    assert!(e.contains("already used for a deduction"), "{e}");
    assert_eq!(digest(&mut con), before, "nothing changed");
}

#[test]
fn eight_concurrent_clients_never_overdraw() {
    let server = Server::start();
    let mut con = server.client();
    assert_eq!(int(&mut con, &["RL.CREDITS.GRANT", "acct", "1000"]), 1000);
    let port = server.port;
    let deducted: i64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                scope.spawn(move || {
                    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
                    let mut con = client.get_connection().unwrap();
                    let mut total = 0;
                    for i in 0..60 {
                        let amount = ((t * 7 + i) % 9 + 1).to_string();
                        let (got, balance) =
                            pair(&mut con, &["RL.CREDITS.DEDUCT", "acct", &amount]);
                        assert!(balance >= 0);
                        total += got;
                    }
                    total
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let balance = int(&mut con, &["RL.CREDITS.BALANCE", "acct"]);
    assert_eq!(
        deducted,
        1000 - balance,
        "deducted exactly the balance drop"
    );
    assert!(deducted <= 1000);
}

#[test]
fn concurrent_retries_with_one_id_charge_once() {
    let server = Server::start();
    let mut con = server.client();
    assert_eq!(int(&mut con, &["RL.CREDITS.GRANT", "acct", "1000"]), 1000);
    let port = server.port;
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(move || {
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
                let mut con = client.get_connection().unwrap();
                for i in 0..20 {
                    let id = format!("req-{i}");
                    assert_eq!(
                        pair(&mut con, &["RL.CREDITS.DEDUCT", "acct", "5", "ID", &id]).0,
                        5
                    );
                    assert!(
                        int(
                            &mut con,
                            &["RL.CREDITS.GRANT", "acct", "3", "ID", &format!("pay-{i}")]
                        ) > 0
                    );
                }
            });
        }
    });
    // 20 distinct deductions of 5, 20 distinct grants of 3: each charged once.
    assert_eq!(
        int(&mut con, &["RL.CREDITS.BALANCE", "acct"]),
        1000 - 100 + 60
    );
}

#[test]
fn a_kill_9_keeps_the_balance_to_the_unit_and_replicas_agree() {
    let mut primary = Server::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let replica = Server::start();
    attach_replica(&primary, &replica);
    let mut con = primary.client();
    assert_eq!(
        int(&mut con, &["RL.CREDITS.GRANT", "acct", "1000", "ID", "g1"]),
        1000
    );
    assert_eq!(
        int(
            &mut con,
            &["RL.CREDITS.GRANT", "acct", "500", "TTL", "3600000"]
        ),
        1500
    );
    for i in 0..50 {
        let _ = run(
            &mut con,
            &["RL.CREDITS.DEDUCT", "acct", "7", "ID", &format!("r{i}")],
        );
    }
    let _ = run(&mut con, &["RL.CREDITS.REFUND", "acct", "r3"]);
    let _ = run(&mut con, &["RL.CREDITS.REVOKE", "acct", "g1"]);
    int(&mut con, &["RL.PLAN.SET", "p", "rpd", "fixed 100/1d"]);
    let _ = run(
        &mut con,
        &["RL.ACQUIRE", "{a}u", "p", "CREDITS", "{a}c", "0"],
    );
    wait_in_sync(&primary, &replica);
    let mut r = replica.client();
    assert_eq!(digest(&mut r), digest(&mut con));
    let balance = int(&mut con, &["RL.CREDITS.BALANCE", "acct"]);
    let before = digest(&mut con);
    primary.kill9();
    let primary = primary.restart();
    let mut con = primary.client();
    assert_eq!(int(&mut con, &["RL.CREDITS.BALANCE", "acct"]), balance);
    assert_eq!(digest(&mut con), before);
}

#[test]
fn keys_in_different_slots_are_refused_with_crossslot_in_a_cluster() {
    let server = Server::start_with(&[
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
    ]);
    let mut con = server.client();
    assert_eq!(
        string(&mut con, &["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]),
        "OK"
    );
    wait_until(10, "cluster state ok", || {
        string(&mut con, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
    });
    int(&mut con, &["RL.PLAN.SET", "p", "rpd", "fixed 100/1d"]);
    assert_eq!(
        int(&mut con, &["RL.CREDITS.GRANT", "{acct:42}:credits", "10"]),
        10
    );
    let crossslot = err(
        &mut con,
        &[
            "RL.ACQUIRE",
            "user:1",
            "p",
            "CREDITS",
            "{acct:42}:credits",
            "1",
        ],
    );
    assert!(crossslot.starts_with("CROSSSLOT"), "{crossslot}");
    let d = decision(
        &mut con,
        &[
            "RL.ACQUIRE",
            "{acct:42}:rl",
            "p",
            "CREDITS",
            "{acct:42}:credits",
            "1",
        ],
    );
    assert!(d.allowed());
    assert_eq!(d.int("credits"), 9);
}
