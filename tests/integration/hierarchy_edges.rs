//! Reproductions of `ALSO` defects found by the hierarchy tests (see
//! /work/also-findings.md). Each fails until the module is fixed; then it stays as
//! a regression test (and moves into `hierarchy.rs`).

use std::time::Duration;

use crate::harness::*;
use redis::Value;

fn leases(con: &mut redis::Connection, key: &str, plan: &str) -> i64 {
    let reply = map_of(&run(con, &["RL.USAGE", key, plan]));
    let Value::Array(limits) = &reply["limits"] else {
        panic!("{reply:?}");
    };
    let jobs = map_of(&limits[0]);
    match jobs["used"] {
        Value::Int(n) => n,
        ref other => panic!("{other:?}"),
    }
}

/// Finding 2. SPEC: "A command that fails part-way changes nothing and replicates
/// nothing." RL.RELEASE (and RL.TOUCH) on the first key change it, then open each
/// linked key; a linked key that now holds another type makes the command answer
/// WRONGTYPE after the first key was released (and replicated). The client sees an
/// error, retries, and is told `released 0`.
#[test]
fn a_release_that_answers_an_error_has_released_nothing() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &["RL.PLAN.SET", "u", "jobs", "concurrency 5 ttl 60s"],
    );
    int(
        &mut con,
        &["RL.PLAN.SET", "o", "spend", "fixed 1000 usd_micros/1d"],
    );
    for id in ["r", "t"] {
        let d = decision(
            &mut con,
            &[
                "RL.ACQUIRE",
                "{f}:u",
                "u",
                "ID",
                id,
                "ALSO",
                "1",
                "{f}",
                "o",
            ],
        );
        assert!(d.allowed());
    }
    // An operator reuses the org's key name for something else.
    run(&mut con, &["DEL", "{f}"]);
    run(&mut con, &["SET", "{f}", "not a subject"]);
    match try_run(&mut con, &["RL.RELEASE", "{f}:u", "r"]) {
        Err(e) => assert_eq!(
            leases(&mut con, "{f}:u", "u"),
            2,
            "RL.RELEASE answered '{e}' but released the first key"
        ),
        Ok(reply) => assert_eq!(map_of(&reply)["released"], Value::Int(1)),
    }
    // RL.TOUCH alike: an error must mean nothing was extended.
    let before = int(&mut con, &["PTTL", "{f}:u"]);
    std::thread::sleep(Duration::from_millis(20));
    match try_run(&mut con, &["RL.TOUCH", "{f}:u", "t", "3600000"]) {
        Err(e) => assert!(
            int(&mut con, &["PTTL", "{f}:u"]) <= before,
            "RL.TOUCH answered '{e}' but extended the first key"
        ),
        Ok(reply) => assert_eq!(reply, Value::Int(1)),
    }
}

/// Finding 3. A waiter denied by its *own* level holds its place in the org key's
/// queue, and a WAIT call that finds waiters on any of its keys queues without
/// trying: every other user's waiting call of the org then waits until that waiter
/// is admitted or times out — although the org has room and their own levels too.
/// Here user 2 (its own job free, 9 of the org's 10 slots free) waits the whole of
/// user 1's WAIT.
#[test]
fn a_waiter_denied_by_its_own_level_does_not_hold_up_other_users_of_the_org() {
    let server = Server::start_with(&["--hz", "100"]);
    let mut con = server.client();
    int(
        &mut con,
        &["RL.PLAN.SET", "org", "inflight", "concurrency 10 ttl 60s"],
    );
    int(
        &mut con,
        &["RL.PLAN.SET", "user", "jobs", "concurrency 1 ttl 60s"],
    );
    let held = decision(
        &mut con,
        &[
            "RL.ACQUIRE",
            "{h}:user:1",
            "user",
            "ID",
            "a",
            "ALSO",
            "1",
            "{h}",
            "org",
        ],
    );
    assert!(held.allowed());
    // User 1 waits for its own job slot (held by `a`), for 8 s.
    let port = server.port;
    let user1 = std::thread::spawn(move || {
        let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .unwrap()
            .get_connection()
            .unwrap();
        try_run(
            &mut con,
            &[
                "RL.ACQUIRE",
                "{h}:user:1",
                "user",
                "ID",
                "b",
                "WAIT",
                "8000",
                "ALSO",
                "1",
                "{h}",
                "org",
            ],
        )
    });
    wait_until(10, "user 1 to wait", || {
        string(&mut con, &["INFO", "tollgate"]).contains("tollgate_waiting_clients:1")
    });
    // User 2 could go at once: it must not wait for user 1's turn.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .unwrap()
            .get_connection()
            .unwrap();
        let _ = tx.send(try_run(
            &mut con,
            &[
                "RL.ACQUIRE",
                "{h}:user:2",
                "user",
                "ID",
                "c",
                "WAIT",
                "8000",
                "ALSO",
                "1",
                "{h}",
                "org",
            ],
        ));
    });
    let user2 = rx.recv_timeout(Duration::from_secs(4));
    let still_waiting =
        string(&mut con, &["INFO", "tollgate"]).contains("tollgate_waiting_clients:1");
    let _ = user1.join();
    let user2 = user2.expect("user 2 waited for user 1's WAIT to run out");
    assert!(Decision::from(&user2.unwrap()).allowed());
    assert!(
        still_waiting,
        "user 1 was still waiting when user 2 was admitted"
    );
}

/// Finding 5. RL.PEEK is read-only and needs only read access to its first key; with
/// ALSO the module checks the other keys for *write* access, so a read-only user
/// (`%R~*`, e.g. a dashboard) cannot peek a hierarchy.
#[test]
fn a_read_only_user_may_peek_with_also() {
    let server = Server::start();
    let mut con = server.client();
    int(&mut con, &["RL.PLAN.SET", "p", "rpm", "fixed 10/1m"]);
    run(
        &mut con,
        &["ACL", "SETUSER", "dashboard", "on", ">pw", "%R~*", "+@all"],
    );
    run(&mut con, &["AUTH", "dashboard", "pw"]);
    let alone = decision(&mut con, &["RL.PEEK", "{r}:u", "p"]);
    assert!(alone.allowed());
    let both = try_run(
        &mut con,
        &["RL.PEEK", "{r}:u", "p", "ALSO", "1", "{r}", "p"],
    );
    assert!(both.is_ok(), "{both:?}");
    // It still may not charge.
    assert!(err(&mut con, &["RL.ACQUIRE", "{r}:u", "p"]).starts_with("NOPERM"));
}

/// Finding 6. RL.RELEASE and RL.TOUCH follow the links stored in the first key's
/// request without checking that the caller may access the linked keys. A user
/// confined to `~{t}:*` (with RESTORE, which ACL patterns allow on its own keys)
/// restores a subject whose request links to another tenant's key, then releases it:
/// the other tenant's lease is freed, and the reply shows that key's limits.
#[test]
fn release_and_touch_reach_only_linked_keys_the_caller_may_write() {
    let server = Server::start();
    let mut admin = server.client();
    int(
        &mut admin,
        &["RL.PLAN.SET", "p", "jobs", "concurrency 1 ttl 600s"],
    );
    // A subject whose request X links to {v}:victim, made where that was allowed.
    assert!(decision(
        &mut admin,
        &[
            "RL.ACQUIRE",
            "{t}:a",
            "p",
            "ID",
            "X",
            "ALSO",
            "1",
            "{v}:victim",
            "p"
        ]
    )
    .allowed());
    let payload = match run(&mut admin, &["DUMP", "{t}:a"]) {
        Value::BulkString(b) => b,
        other => panic!("{other:?}"),
    };
    run(&mut admin, &["DEL", "{t}:a", "{v}:victim"]);
    // The victim holds its own request X (ids are guessable: generated ones are
    // `<ms>-<seq>`).
    assert!(decision(&mut admin, &["RL.ACQUIRE", "{v}:victim", "p", "ID", "X"]).allowed());
    run(
        &mut admin,
        &[
            "ACL",
            "SETUSER",
            "tenant",
            "on",
            ">pw",
            "resetkeys",
            "~{t}:*",
            "+@all",
        ],
    );
    let mut tenant = server.client();
    run(&mut tenant, &["AUTH", "tenant", "pw"]);
    assert!(err(&mut tenant, &["RL.USAGE", "{v}:victim", "p"]).starts_with("NOPERM"));
    redis::cmd("RESTORE")
        .arg("{t}:a")
        .arg(0)
        .arg(payload)
        .query::<()>(&mut tenant)
        .unwrap();
    // A touch of 1 s would cut the victim's 600 s lease short.
    let _ = try_run(&mut tenant, &["RL.TOUCH", "{t}:a", "X", "1000"]);
    let reset = jobs_reset_ms(&mut admin, "{v}:victim");
    assert!(
        reset > 500_000,
        "the tenant cut the victim's lease to {reset} ms"
    );
    let reply = try_run(&mut tenant, &["RL.RELEASE", "{t}:a", "X"]);
    assert_eq!(
        usage_jobs(&mut admin, "{v}:victim"),
        1,
        "the tenant released the victim's lease ({reply:?})"
    );
    if let Ok(reply) = reply {
        assert!(
            !map_of(&reply).contains_key("also"),
            "the reply shows the victim's limits"
        );
    }
}

fn jobs_reset_ms(con: &mut redis::Connection, key: &str) -> i64 {
    let reply = map_of(&run(con, &["RL.USAGE", key, "p"]));
    let Value::Array(limits) = &reply["limits"] else {
        panic!("{reply:?}");
    };
    match map_of(&limits[0])["reset_ms"] {
        Value::Int(n) => n,
        ref other => panic!("{other:?}"),
    }
}

fn usage_jobs(con: &mut redis::Connection, key: &str) -> i64 {
    leases(con, key, "p")
}

/// Finding 7. SPEC: "Every value the module accepts ... it can save and load again; a
/// value it cannot load is refused when offered, never written." An `ALSO` key longer
/// than 4,096 bytes (`requests::MAX_LINK_LEN`) is accepted and stored as a link of
/// the first key's request, which no decoder accepts: a replica refuses the delta,
/// and `DEBUG RELOAD` (or a restart from the RDB or AOF) fails to load the dataset.
#[test]
fn a_call_with_a_long_also_key_is_refused_or_survives_a_reload_and_reaches_replicas() {
    let primary = Server::start();
    let replica = Server::start();
    attach_replica(&primary, &replica);
    let mut p = primary.client();
    int(&mut p, &["RL.PLAN.SET", "p", "rpm", "fixed 10/1m"]);
    let long = format!("{{L}}{}", "x".repeat(5_000));
    let accepted = try_run(
        &mut p,
        &[
            "RL.ACQUIRE",
            "{L}:u",
            "p",
            "ID",
            "x",
            "ALSO",
            "1",
            &long,
            "p",
        ],
    );
    let Ok(_) = accepted else {
        return; // refused when offered: fine
    };
    wait_in_sync(&primary, &replica);
    let before = digest(&mut p);
    assert_eq!(
        digest(&mut replica.client()),
        before,
        "the replica diverged"
    );
    assert_eq!(
        try_run(&mut p, &["DEBUG", "RELOAD"]).map(|v| text(&v)),
        Ok("OK".to_string())
    );
    assert_eq!(digest(&mut p), before);
}

/// Finding 8. While a slot migrates, RL.ACQUIRE with ALSO answers TRYAGAIN when some
/// of its keys already left (`check_not_split`), but RL.RELEASE and RL.TOUCH on the
/// first key skip a linked key that is not here: the release answers `released 1`
/// (the moved key simply missing from `also`), and the org's lease and estimate stay
/// held on the importing node until the request's TTL.
#[test]
fn a_release_during_a_slot_migration_does_not_silently_skip_a_moved_level() {
    let cluster = Cluster::start(3);
    let source = cluster.primary_for("{m}");
    let target = cluster
        .nodes
        .iter()
        .find(|n| {
            n.port != source.port
                && matches!(&run(&mut n.client(), &["ROLE"]), Value::Array(r) if text(&r[0]) == "master")
        })
        .unwrap();
    let mut s = source.client();
    let mut t = target.client();
    int(
        &mut s,
        &["RL.PLAN.SET", "p", "jobs", "concurrency 5 ttl 600s"],
    );
    wait_until(20, "the plan on the target", || {
        run(&mut t, &["RL.PLAN.GET", "p"]) != Value::Array(vec![])
            && run(&mut t, &["RL.PLAN.GET", "p"]) != Value::Map(vec![])
    });
    assert!(decision(
        &mut s,
        &[
            "RL.ACQUIRE",
            "{m}:u",
            "p",
            "ID",
            "r",
            "ALSO",
            "1",
            "{m}",
            "p"
        ]
    )
    .allowed());
    let slot = int(&mut s, &["CLUSTER", "KEYSLOT", "{m}"]).to_string();
    let source_id = string(&mut s, &["CLUSTER", "MYID"]);
    let target_id = string(&mut t, &["CLUSTER", "MYID"]);
    run(
        &mut t,
        &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source_id],
    );
    run(
        &mut s,
        &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id],
    );
    // The org key has moved; the user key has not yet.
    run(
        &mut s,
        &[
            "MIGRATE",
            "127.0.0.1",
            &target.port.to_string(),
            "",
            "0",
            "5000",
            "KEYS",
            "{m}",
        ],
    );
    let released = try_run(&mut s, &["RL.RELEASE", "{m}:u", "r"]);
    run(&mut t, &["ASKING"]);
    let org = map_of(&run(&mut t, &["RL.USAGE", "{m}", "p"]));
    let Value::Array(limits) = &org["limits"] else {
        panic!("{org:?}");
    };
    let org_leases = map_of(&limits[0])["used"].clone();
    match released {
        // Refused (TRYAGAIN/ASK): nothing may have changed on the source.
        Err(_) => assert_eq!(
            int(&mut s, &["EXISTS", "{m}:u"]),
            1,
            "the user's part was released although the command failed"
        ),
        // Released: then on every level.
        Ok(reply) => assert_eq!(
            org_leases,
            Value::Int(0),
            "RL.RELEASE answered {reply:?} but the org's lease is still held"
        ),
    }
}
