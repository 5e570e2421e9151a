//! Nothing lost, nothing forged (issue 9): what the module accepts it can save and
//! load, settling never lets more through, memory pressure leaves leases returnable,
//! and waiters are served when their key goes away.

use std::time::Duration;

use crate::harness::*;
use redis::Value;

/// A value beyond what a RESP integer shows (balances are clamped to i64::MAX).
const BIG: &str = "18446744073709551614";

#[test]
fn a_credits_key_the_commands_make_always_loads_and_syncs() {
    // Issue 9's reproduction: the refund used to saturate a balance decode refuses,
    // so DEBUG RELOAD aborted the server and a full sync killed the replica.
    let primary = Server::start();
    let mut con = primary.client();
    run(&mut con, &["RL.CREDITS.GRANT", "cr", BIG, "ID", "A"]);
    run(&mut con, &["RL.CREDITS.DEDUCT", "cr", BIG, "ID", "d1"]);
    run(&mut con, &["RL.CREDITS.GRANT", "cr", BIG, "ID", "B"]);
    assert_eq!(
        run(&mut con, &["RL.CREDITS.REFUND", "cr", "d1"]),
        Value::Array(vec![Value::Int(1), Value::Int(i64::MAX)]),
        "only what fits under the largest balance comes back"
    );
    let before = digest(&mut con);
    run(&mut con, &["DEBUG", "RELOAD"]);
    assert_eq!(digest(&mut con), before);
    let dump: Vec<u8> = redis::cmd("DUMP").arg("cr").query(&mut con).unwrap();
    run(&mut con, &["DEL", "cr2"]);
    let restored: String = redis::cmd("RESTORE")
        .arg("cr2")
        .arg(0)
        .arg(dump)
        .query(&mut con)
        .unwrap();
    assert_eq!(restored, "OK");
    let replica = Server::start();
    attach_replica(&primary, &replica);
    wait_in_sync(&primary, &replica);
    assert_eq!(digest(&mut replica.client()), digest(&mut con));
}

#[test]
fn a_deduction_id_that_was_refunded_is_refused_not_answered_stale() {
    let server = Server::start();
    let mut con = server.client();
    run(&mut con, &["RL.CREDITS.GRANT", "c", "10"]);
    run(&mut con, &["RL.CREDITS.DEDUCT", "c", "4", "ID", "x"]);
    run(&mut con, &["RL.CREDITS.REFUND", "c", "x"]);
    assert_eq!(
        err(&mut con, &["RL.CREDITS.DEDUCT", "c", "4", "ID", "x"]),
        "ERR that deduction id was refunded; a new deduction needs a new id"
    );
    assert_eq!(int(&mut con, &["RL.CREDITS.BALANCE", "c"]), 10);
}

#[test]
fn acquire_with_credits_and_no_id_deducts_under_the_generated_id() {
    let server = Server::start();
    let mut con = server.client();
    int(&mut con, &["RL.PLAN.SET", "gpu", "jobs", "concurrency 2"]);
    run(&mut con, &["RL.CREDITS.GRANT", "{a}c", "100"]);
    let d = decision(
        &mut con,
        &["RL.ACQUIRE", "{a}u", "gpu", "CREDITS", "{a}c", "30"],
    );
    assert!(d.allowed());
    let id = d.str("id").expect("a generated id");
    assert_eq!(int(&mut con, &["RL.CREDITS.BALANCE", "{a}c"]), 70);
    // The id the reply gave refunds the deduction.
    assert_eq!(
        run(&mut con, &["RL.CREDITS.REFUND", "{a}c", &id]),
        Value::Array(vec![Value::Int(30), Value::Int(100)])
    );
}

#[test]
fn settling_a_drained_bucket_charge_never_admits_more_than_the_actual_cost_would() {
    let server = Server::start();
    let mut con = server.client();
    // 50 tokens a second, 100 at most.
    int(
        &mut con,
        &["RL.PLAN.SET", "llm", "tpm", "bucket 100 token/2s burst 100"],
    );
    let cost = |n: &str| ["COST".to_string(), "token".to_string(), n.to_string()];
    let acquire = |con: &mut redis::Connection, n: &str, id: Option<&str>| {
        let mut args = vec![
            "RL.ACQUIRE".to_string(),
            "u".into(),
            "llm".into(),
            "0".into(),
        ];
        args.extend(cost(n));
        if let Some(id) = id {
            args.extend(["ID".to_string(), id.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        decision(con, &args)
    };
    assert!(acquire(&mut con, "100", Some("A")).allowed());
    // Half of A drains; the room it made is taken.
    std::thread::sleep(Duration::from_millis(1_000));
    assert!(acquire(&mut con, "50", None).allowed());
    // A settles for nothing: only the part of A still counted comes back (about 50),
    // not all 100 — the drained half already let the 50 through.
    run(&mut con, &["RL.RELEASE", "u", "A", "COST", "token", "0"]);
    assert!(
        !acquire(&mut con, "100", None).allowed(),
        "charging A's actual 0 up front would leave 50 in use: 100 more cannot fit"
    );
}

#[test]
fn alternating_throttle_periods_share_one_budget_like_redis_cell() {
    let server = Server::start();
    let mut con = server.client();
    let mut admitted = 0;
    for i in 0..20 {
        let period = (60 + i % 5).to_string();
        let reply = run(&mut con, &["RL.THROTTLE", "k", "0", "1", &period]);
        if let Value::Array(v) = reply {
            admitted += i64::from(v.first() == Some(&Value::Int(0)));
        }
    }
    assert_eq!(admitted, 1, "redis-cell's CL.THROTTLE admits 1 of 20 here");
}

#[test]
fn state_freeing_commands_run_under_noeviction_at_maxmemory() {
    let server = Server::start_with(&["--maxmemory-policy", "noeviction"]);
    let mut con = server.client();
    int(
        &mut con,
        &["RL.PLAN.SET", "p", "jobs", "concurrency 5 ttl 1h"],
    );
    let lease = decision(&mut con, &["RL.ACQUIRE", "u", "p", "ID", "job-1"]);
    assert!(lease.allowed());
    run(&mut con, &["RL.CREDITS.GRANT", "c", "100"]);
    run(&mut con, &["RL.CREDITS.DEDUCT", "c", "10", "ID", "d1"]);
    // Hold 2 MB of plain values, then cap memory below that.
    let blob = "x".repeat(64 * 1024);
    for i in 0..32 {
        run(&mut con, &["SET", &format!("fill:{i}"), &blob]);
    }
    run(&mut con, &["CONFIG", "SET", "maxmemory", "1mb"]);
    assert!(err(&mut con, &["RL.ACQUIRE", "v", "p"]).starts_with("OOM"));
    assert!(err(&mut con, &["RL.CREDITS.GRANT", "c", "1"]).starts_with("OOM"));
    // Returning a lease, heartbeating one and refunding credits still work.
    assert_eq!(int(&mut con, &["RL.TOUCH", "u", "job-1", "60000"]), 1);
    let released = map_of(&run(&mut con, &["RL.RELEASE", "u", "job-1"]));
    assert_eq!(released.get("released"), Some(&Value::Int(1)));
    assert_eq!(
        run(&mut con, &["RL.CREDITS.REFUND", "c", "d1"]),
        Value::Array(vec![Value::Int(10), Value::Int(100)])
    );
}

#[test]
fn volatile_eviction_takes_subject_keys_first_and_forgets_their_usage() {
    // Every subject key carries a TTL: under volatile-* policies they are the first
    // candidates, and an evicted subject starts afresh (docs/operating.md says to use
    // noeviction, or allkeys-* on an instance of its own).
    let server = Server::start_with(&["--maxmemory", "3mb", "--maxmemory-policy", "volatile-lru"]);
    let mut con = server.client();
    int(&mut con, &["RL.PLAN.SET", "day", "rpd", "fixed 1/1d"]);
    for i in 0..200 {
        assert!(decision(&mut con, &["RL.ACQUIRE", &format!("user:{i}"), "day"]).allowed());
    }
    let blob = "x".repeat(16 * 1024);
    for i in 0..400 {
        if try_run(&mut con, &["SET", &format!("plain:{i}"), &blob]).is_err() {
            break;
        }
    }
    let evicted = string(&mut con, &["INFO", "stats"])
        .lines()
        .find_map(|l| l.strip_prefix("evicted_keys:").map(str::to_string))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(evicted > 0, "subject keys were evicted");
    let readmitted = (0..200)
        .filter(|i| decision(&mut con, &["RL.PEEK", &format!("user:{i}"), "day"]).allowed())
        .count();
    assert!(
        readmitted > 0,
        "evicted users are admitted again: usage forgotten"
    );
}

#[test]
fn waiters_are_served_when_their_key_is_deleted_or_flushed() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &["RL.PLAN.SET", "p", "jobs", "concurrency 1 ttl 1h"],
    );
    for reset in [&["DEL", "u"][..], &["FLUSHALL"][..]] {
        assert!(decision(&mut con, &["RL.ACQUIRE", "u", "p", "ID", "held"]).allowed());
        let port = server.port;
        let waiter = std::thread::spawn(move || {
            let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                .unwrap()
                .get_connection()
                .unwrap();
            decision(&mut c, &["RL.ACQUIRE", "u", "p", "WAIT", "60000"])
        });
        wait_until(20, "the client waits", || {
            string(&mut con, &["INFO", "clients"]).contains("blocked_clients:1")
        });
        run(&mut con, reset);
        let d = waiter.join().unwrap();
        assert!(
            d.allowed(),
            "{reset:?}: the waiter is admitted, not left to time out"
        );
        run(&mut con, &["DEL", "u"]);
    }
}

#[test]
fn assigning_or_waiting_on_a_new_key_replicates_exactly() {
    let primary = Server::start();
    let replica = Server::start();
    attach_replica(&primary, &replica);
    let mut p = primary.client();
    int(&mut p, &["RL.PLAN.SET", "pro", "rpm", "sliding 60/1h"]);
    run(&mut p, &["RL.ASSIGN", "s:0", "pro"]);
    int(
        &mut p,
        &["RL.PLAN.SET", "one", "jobs", "concurrency 1 ttl 1h"],
    );
    run(&mut p, &["RL.ACQUIRE", "w", "one", "ID", "a"]);
    // A waiter that gives up keeps its key alive until its deadline: a keep-alive on
    // the key, replicated.
    let d = decision(&mut p, &["RL.ACQUIRE", "w", "one", "WAIT", "100"]);
    assert!(!d.allowed());
    wait_in_sync(&primary, &replica);
    let mut r = replica.client();
    assert_eq!(digest(&mut r), digest(&mut p));
}

#[test]
fn application_users_cannot_administer_or_forge_state() {
    let server = Server::start();
    let mut con = server.client();
    int(&mut con, &["RL.PLAN.SET", "p", "rpm", "fixed 5/1m"]);
    let categories = format!("{:?}", run(&mut con, &["ACL", "CAT"]));
    // Where the server has module ACL categories (Redis 7.4+, Valkey), the module's
    // own category and @admin express the split; on Redis 7.0, command names do.
    let rules: &[&str] = if categories.contains("ratelimit") {
        &["+@ratelimit", "-@admin"]
    } else {
        &[
            "+rl.acquire",
            "+rl.peek",
            "+rl.usage",
            "+rl.release",
            "+rl.touch",
            "+rl.credits.deduct",
            "+rl.credits.refund",
            "+rl.credits.balance",
        ]
    };
    let mut setuser = vec!["ACL", "SETUSER", "app", "on", ">pw", "~*"];
    setuser.extend_from_slice(rules);
    run(&mut con, &setuser);
    let mut app = redis::Client::open(format!("redis://app:pw@127.0.0.1:{}/", server.port))
        .unwrap()
        .get_connection()
        .unwrap();
    assert!(decision(&mut app, &["RL.ACQUIRE", "u", "p"]).allowed());
    for forbidden in [
        &["RL.PLAN.SET", "p", "rpm", "fixed 500/1m"][..],
        &["RL.CREDITS.GRANT", "c", "1000"],
        &["RL.APPLY", "u", "\x03"],
        &["RL.PLAN.DEL", "p"],
    ] {
        let e = err(&mut app, forbidden);
        assert!(e.starts_with("NOPERM"), "{forbidden:?}: {e}");
    }
    assert_eq!(
        decision(&mut con, &["RL.PEEK", "u", "p", "0"]).remaining("rpm"),
        4
    );
}
