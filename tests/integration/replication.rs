//! Replicas and AOF replay reach exactly the primary's state, whatever their clocks.

use std::time::Duration;

use crate::harness::*;
use crate::persistence::workload;

#[test]
fn a_replica_reaches_the_primary_digest() {
    let primary = Server::start();
    let replica = Server::start();
    let mut p = primary.client();
    // Some state before the replica attaches (full sync), some after (the stream).
    workload(&mut p);
    attach_replica(&primary, &replica);
    std::thread::sleep(Duration::from_millis(30));
    workload(&mut p);
    for i in 0..200 {
        let key = format!("stream:{}", i % 13);
        let _ = run(
            &mut p,
            &["RL.ACQUIRE", &key, "free", "1", "COST", "token", "7"],
        );
        if i % 50 == 0 {
            int(
                &mut p,
                &[
                    "RL.PLAN.SET",
                    "free",
                    "rpd",
                    &format!("fixed {}/1d", 200 + i),
                ],
            );
        }
    }
    wait_in_sync(&primary, &replica);
    let mut r = replica.client();
    assert_eq!(digest(&mut r), digest(&mut p));
    assert_eq!(
        run(&mut r, &["RL.PLAN.GET", "free"]),
        run(&mut p, &["RL.PLAN.GET", "free"])
    );
    // Replicas refuse writes from clients; reads work.
    assert!(err(&mut r, &["RL.ACQUIRE", "x", "free"]).starts_with("READONLY"));
    assert_eq!(
        decision(&mut r, &["RL.PEEK", "stream:1", "free", "0"]).remaining("rpm"),
        decision(&mut p, &["RL.PEEK", "stream:1", "free", "0"]).remaining("rpm")
    );
}

#[test]
fn rl_apply_from_an_ordinary_client_is_refused_and_changes_nothing() {
    let server = Server::start();
    let mut con = server.client();
    int(&mut con, &["RL.PLAN.SET", "p", "rpd", "fixed 5/1d"]);
    run(&mut con, &["RL.ACQUIRE", "u", "p", "5"]);
    // A client replaying a payload (here a valid one, taken from a DUMP-free source:
    // the module's own AOF rewrite format) could reset its usage or mint credits.
    for payload in ["garbage", "", "\x03\x08\x03"] {
        assert_eq!(
            err(&mut con, &["RL.APPLY", "u", payload]),
            "ERR RL.APPLY is internal: only the primary's replication link and AOF loading may send it"
        );
    }
    assert_eq!(
        err(&mut con, &["RL.APPLY", "credits", "\x02"]),
        "ERR RL.APPLY is internal: only the primary's replication link and AOF loading may send it"
    );
    assert!(!decision(&mut con, &["RL.ACQUIRE", "u", "p"]).allowed());
    assert_eq!(int(&mut con, &["EXISTS", "credits"]), 0);
    // Inside MULTI and from Lua it is refused alike.
    let lua = redis::cmd("EVAL")
        .arg("return redis.call('RL.APPLY', KEYS[1], ARGV[1])")
        .arg(1)
        .arg("u")
        .arg("x")
        .query::<redis::Value>(&mut con);
    assert!(lua.is_err(), "{lua:?}");
}

#[test]
fn throttles_and_plan_switches_on_keys_with_requests_keep_replicas_exact() {
    let primary = Server::start();
    let replica = Server::start();
    attach_replica(&primary, &replica);
    let mut p = primary.client();
    int(&mut p, &["RL.PLAN.SET", "leases", "jobs", "concurrency 5"]);
    int(&mut p, &["RL.PLAN.SET", "fixed", "rpm", "fixed 10/1m"]);
    int(&mut p, &["RL.PLAN.SET", "sliding", "rpm", "sliding 10/1m"]);
    for i in 0..10 {
        let key = format!("k{i}");
        let id = format!("r{i}");
        run(
            &mut p,
            &["RL.ACQUIRE", &key, "leases", "ID", &id, "TTL", "20"],
        );
        run(&mut p, &["RL.ACQUIRE", &key, "fixed", "ID", "keep"]);
    }
    std::thread::sleep(Duration::from_millis(50));
    for i in 0..10 {
        let key = format!("k{i}");
        // The lease has expired: the primary purges it while charging, and the
        // replica must drop it too.
        if i % 2 == 0 {
            run(&mut p, &["RL.THROTTLE", &key, "5", "10", "60"]);
        } else {
            run(&mut p, &["RL.ACQUIRE", &key, "sliding"]);
        }
    }
    wait_in_sync(&primary, &replica);
    let mut r = replica.client();
    assert_eq!(digest(&mut r), digest(&mut p));
    // Plans that count `rpm` differently share one budget: both calls count.
    assert_eq!(
        decision(&mut p, &["RL.PEEK", "k1", "fixed", "0"]).remaining("rpm"),
        8
    );
    assert_eq!(
        decision(&mut r, &["RL.PEEK", "k1", "sliding", "0"]).remaining("rpm"),
        8
    );
}
