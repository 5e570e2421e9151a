//! `WAIT` and `PRIORITY`: blocking acquires admitted by releases and refills, in
//! priority-then-arrival order; fallback plans; assignment and the default plan.
//!
//! Timing holds on a busy machine: what the server did is read from the server
//! (`INFO tollgate` wait counters, the sequence in generated request ids), never
//! from how fast replies came back. Wall-clock bounds are lower bounds only ("not
//! before"); `GUARD` only stops a hung test.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::harness::*;
use redis::Value;

/// How long a test waits for a reply before calling it hung: not a timing claim.
const GUARD: Duration = Duration::from_secs(60);

/// A counter of `INFO tollgate` (`tollgate_<name>`), -1 if absent.
fn counter(con: &mut redis::Connection, name: &str) -> i64 {
    let info = string(con, &["INFO", "tollgate"]);
    let prefix = format!("tollgate_{name}:");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1)
}

fn waiting(con: &mut redis::Connection) -> i64 {
    counter(con, "waiting_clients")
}

/// The server's wait counters: (admitted after waiting, timed out).
fn waits(con: &mut redis::Connection) -> (i64, i64) {
    (
        counter(con, "waits_admitted"),
        counter(con, "waits_timed_out"),
    )
}

/// The server's admission sequence number in a generated request id
/// (`<ms>-<sequence>`, the sequence counting up per key as calls are admitted).
fn admission_sequence(id: &str) -> u64 {
    id.rsplit_once('-')
        .and_then(|(_, seq)| seq.parse().ok())
        .unwrap_or_else(|| panic!("generated id '{id}' is not '<ms>-<sequence>'"))
}

fn wait_for_waiters(con: &mut redis::Connection, n: i64) {
    wait_until(10, &format!("{n} waiting clients"), || waiting(con) == n);
}

fn start() -> Server {
    // hz 100: WAIT timeouts are checked ten times as often as by default.
    Server::start_with(&["--hz", "100"])
}

#[test]
fn a_waiter_is_admitted_when_a_lease_is_released_and_not_before() {
    let server = start();
    let mut con = server.client();
    int(
        &mut con,
        &["RL.PLAN.SET", "p", "jobs", "concurrency 1 ttl 60s"],
    );
    let holder = decision(&mut con, &["RL.ACQUIRE", "k", "p"]);
    let rx = spawn_acquire(server.port, &["RL.ACQUIRE", "k", "p", "WAIT", "10000"]);
    wait_for_waiters(&mut con, 1);
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "admitted before the release"
    );
    assert_eq!(
        string(&mut con, &["PING"]),
        "PONG",
        "the server answers while a client waits"
    );
    run(&mut con, &["RL.RELEASE", "k", &holder.str("id").unwrap()]);
    let (reply, _) = rx.recv_timeout(GUARD).expect("woken by the release");
    assert!(Decision::from(&reply.unwrap()).allowed());
    assert_eq!(waiting(&mut con), 0);
}

#[test]
fn a_waiter_is_admitted_on_refill_and_times_out_denied() {
    let server = start();
    let mut con = server.client();
    int(&mut con, &["RL.PLAN.SET", "p", "b", "bucket 2/1s burst 1"]);
    // Measured from before the first call, so a stall anywhere only makes it longer.
    let started = Instant::now();
    assert!(decision(&mut con, &["RL.ACQUIRE", "k", "p"]).allowed());
    let d = decision(&mut con, &["RL.ACQUIRE", "k", "p", "WAIT", "60000"]);
    // Admitted (a timed-out waiter is answered denied), and not before the refill:
    // one token every 500 ms.
    assert!(d.allowed());
    assert!(started.elapsed() >= Duration::from_millis(450));
    assert_eq!(waits(&mut con).1, 0, "nothing timed out");
    // A refill a minute away: a 200 ms wait runs out first.
    int(
        &mut con,
        &["RL.PLAN.SET", "slow", "b", "bucket 1/1m burst 1"],
    );
    assert!(decision(&mut con, &["RL.ACQUIRE", "s", "slow"]).allowed());
    let started = Instant::now();
    let d = decision(&mut con, &["RL.ACQUIRE", "s", "slow", "WAIT", "200"]);
    assert!(!d.allowed());
    assert!(started.elapsed() >= Duration::from_millis(190));
    assert_eq!(waits(&mut con).1, 1, "the call timed out");
    assert_eq!(d.str("denied_by").as_deref(), Some("b"));
    assert!(d.retry_after_ms() > 0);
    // The timed-out call counts as a denial by its bucket: the reasons add up.
    assert_eq!(
        (
            counter(&mut con, "denied"),
            counter(&mut con, "denied_bucket")
        ),
        (1, 1)
    );
}

#[test]
fn a_call_that_can_never_pass_is_answered_at_once() {
    let server = start();
    let mut con = server.client();
    int(&mut con, &["RL.PLAN.SET", "p", "rpd", "fixed 5/1d"]);
    let d = decision(&mut con, &["RL.ACQUIRE", "k", "p", "6", "WAIT", "5000"]);
    assert!(!d.allowed());
    assert_eq!(d.retry_after_ms(), -1);
    assert_eq!(waits(&mut con), (0, 0), "answered without waiting");
}

#[test]
fn wait_inside_multi_or_a_script_answers_at_once() {
    let server = start();
    let mut con = server.client();
    int(&mut con, &["RL.PLAN.SET", "p", "jobs", "concurrency 1"]);
    assert!(decision(&mut con, &["RL.ACQUIRE", "k", "p"]).allowed());
    let replies: Vec<Value> = redis::pipe()
        .atomic()
        .cmd("RL.ACQUIRE")
        .arg("k")
        .arg("p")
        .arg("WAIT")
        .arg(5000)
        .query(&mut con)
        .unwrap();
    assert!(!Decision::from(&replies[0]).allowed());
    let reply = run(
        &mut con,
        &[
            "EVAL",
            "return redis.call('RL.ACQUIRE', KEYS[1], 'p', 'WAIT', 5000)",
            "1",
            "k",
        ],
    );
    assert!(!Decision::from(&reply).allowed());
    assert_eq!(waits(&mut con), (0, 0), "answered without waiting");
    assert_eq!(waiting(&mut con), 0);
}

/// Starts `RL.ACQUIRE args...` on its own connection; the channel gets the reply (or
/// the error text) and how long it took.
fn spawn_acquire(
    port: u16,
    args: &'static [&'static str],
) -> mpsc::Receiver<(Result<Value, String>, Duration)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .unwrap()
            .get_connection()
            .unwrap();
        let started = Instant::now();
        let reply = try_run(&mut con, args);
        let _ = tx.send((reply, started.elapsed()));
    });
    rx
}

/// Starts a waiter thread; returns a receiver of its decision.
fn spawn_waiter(
    port: u16,
    key: &str,
    plan: &str,
    priority: i64,
    wait_ms: u64,
) -> mpsc::Receiver<Decision> {
    let (tx, rx) = mpsc::channel();
    let (key, plan) = (key.to_string(), plan.to_string());
    std::thread::spawn(move || {
        let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .unwrap()
            .get_connection()
            .unwrap();
        let d = decision(
            &mut con,
            &[
                "RL.ACQUIRE",
                &key,
                &plan,
                "WAIT",
                &wait_ms.to_string(),
                "PRIORITY",
                &priority.to_string(),
            ],
        );
        let _ = tx.send(d);
    });
    rx
}

#[test]
fn waiters_are_admitted_by_priority_then_arrival() {
    let server = start();
    let mut con = server.client();
    int(
        &mut con,
        &["RL.PLAN.SET", "p", "jobs", "concurrency 1 ttl 60s"],
    );
    let mut lease = decision(&mut con, &["RL.ACQUIRE", "k", "p"])
        .str("id")
        .unwrap();
    let mut waiters = Vec::new();
    for (n, priority) in [2, 1, 0].into_iter().enumerate() {
        waiters.push((
            priority,
            spawn_waiter(server.port, "k", "p", priority, 20_000),
        ));
        wait_for_waiters(&mut con, n as i64 + 1);
    }
    let mut order = Vec::new();
    for _ in 0..3 {
        // One slot: each release admits exactly one waiter, so the order replies come
        // back in is the server's admission order.
        run(&mut con, &["RL.RELEASE", "k", &lease]);
        let deadline = Instant::now() + GUARD;
        let (priority, d) = loop {
            if let Some((p, d)) = waiters
                .iter()
                .find_map(|(p, rx)| rx.try_recv().ok().map(|d| (*p, d)))
            {
                break (p, d);
            }
            assert!(Instant::now() < deadline, "no waiter admitted");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(d.allowed());
        order.push(priority);
        lease = d.str("id").unwrap();
    }
    assert_eq!(order, [0, 1, 2]);
}

#[test]
fn a_waiter_that_disconnects_leaves_nothing_behind() {
    let server = start();
    let mut con = server.client();
    int(
        &mut con,
        &["RL.PLAN.SET", "p", "jobs", "concurrency 1 ttl 60s"],
    );
    let lease = decision(&mut con, &["RL.ACQUIRE", "k", "p"])
        .str("id")
        .unwrap();
    let mut first = server.client();
    let mut cmd = redis::cmd("RL.ACQUIRE");
    cmd.arg("k")
        .arg("p")
        .arg("WAIT")
        .arg(20_000)
        .arg("PRIORITY")
        .arg(0);
    let _ = first.send_packed_command(&cmd.get_packed_command());
    wait_for_waiters(&mut con, 1);
    let second = spawn_waiter(server.port, "k", "p", 5, 20_000);
    wait_for_waiters(&mut con, 2);
    drop(first);
    wait_for_waiters(&mut con, 1);
    run(&mut con, &["RL.RELEASE", "k", &lease]);
    let d = second
        .recv_timeout(GUARD)
        .expect("the second waiter moved up");
    assert!(d.allowed());
    assert_eq!(waiting(&mut con), 0);
}

#[test]
fn fifty_waiters_share_two_slots_in_order() {
    let server = start();
    let mut con = server.client();
    int(
        &mut con,
        &["RL.PLAN.SET", "p", "jobs", "concurrency 2 ttl 60s"],
    );
    let leases: Vec<String> = (0..2)
        .map(|_| {
            decision(&mut con, &["RL.ACQUIRE", "k", "p"])
                .str("id")
                .unwrap()
        })
        .collect();
    let held = std::sync::Arc::new(AtomicUsize::new(0));
    let peak = std::sync::Arc::new(AtomicUsize::new(0));
    // (server admission sequence, priority, arrival), from each waiter's generated id.
    let admitted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for i in 0..50usize {
        let priority = (i % 3) as i64;
        let (held, peak, admitted) = (held.clone(), peak.clone(), admitted.clone());
        let port = server.port;
        handles.push(std::thread::spawn(move || {
            let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                .unwrap()
                .get_connection()
                .unwrap();
            let d = decision(
                &mut con,
                &[
                    "RL.ACQUIRE",
                    "k",
                    "p",
                    "WAIT",
                    "60000",
                    "PRIORITY",
                    &priority.to_string(),
                ],
            );
            assert!(d.allowed());
            let id = d.str("id").unwrap();
            // Held from the client's view: between the reply and the release, a window
            // inside the server's, so it can never exceed what the server allowed.
            let now = held.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            admitted
                .lock()
                .unwrap()
                .push((admission_sequence(&id), priority, i));
            std::thread::sleep(Duration::from_millis(10));
            held.fetch_sub(1, Ordering::SeqCst);
            run(&mut con, &["RL.RELEASE", "k", &id]);
        }));
        wait_for_waiters(&mut con, i as i64 + 1);
    }
    for lease in leases {
        run(&mut con, &["RL.RELEASE", "k", &lease]);
    }
    for h in handles {
        h.join().unwrap();
    }
    assert!(peak.load(Ordering::SeqCst) <= 2);
    assert_eq!(waits(&mut con), (50, 0));
    // The order the server admitted them in (its id sequence), whatever order the
    // client threads saw their replies in: priority first, then arrival.
    let mut admitted = admitted.lock().unwrap().clone();
    assert_eq!(admitted.len(), 50);
    admitted.sort();
    let order: Vec<(i64, usize)> = admitted.iter().map(|&(_, p, i)| (p, i)).collect();
    let mut expected = order.clone();
    expected.sort();
    assert_eq!(order, expected, "admission order (priority, arrival)");
}

#[test]
fn waiters_per_key_are_capped() {
    let server = start();
    let mut con = server.client();
    assert_eq!(
        string(
            &mut con,
            &["CONFIG", "SET", "tollgate.max-waiters-per-key", "1"]
        ),
        "OK"
    );
    int(
        &mut con,
        &["RL.PLAN.SET", "p", "jobs", "concurrency 1 ttl 60s"],
    );
    assert!(decision(&mut con, &["RL.ACQUIRE", "k", "p"]).allowed());
    let _first = spawn_waiter(server.port, "k", "p", 0, 3_000);
    wait_for_waiters(&mut con, 1);
    assert_eq!(
        err(&mut con, &["RL.ACQUIRE", "k", "p", "WAIT", "1000"]),
        "ERR 1 clients already wait on this key (tollgate.max-waiters-per-key)"
    );
    assert_eq!(
        err(&mut con, &["RL.ACQUIRE", "k", "p", "PRIORITY", "1"]),
        "ERR PRIORITY only applies with WAIT"
    );
    assert_eq!(
        err(&mut con, &["RL.ACQUIRE", "k", "p", "WAIT", "99999999999"]),
        "ERR WAIT must be at most 86400000 ms"
    );
}

#[test]
fn a_replica_reaches_the_primary_digest_after_waits() {
    let primary = start();
    let replica = start();
    attach_replica(&primary, &replica);
    let mut con = primary.client();
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "p",
            "jobs",
            "concurrency 1 ttl 60s",
            "b",
            "bucket 10/1s",
        ],
    );
    let lease = decision(&mut con, &["RL.ACQUIRE", "k", "p"])
        .str("id")
        .unwrap();
    let waiters: Vec<_> = (0..3)
        .map(|i| spawn_waiter(primary.port, "k", "p", i, 10_000))
        .collect();
    wait_for_waiters(&mut con, 3);
    run(&mut con, &["RL.RELEASE", "k", &lease]);
    for rx in &waiters {
        let d = rx.recv_timeout(GUARD).unwrap();
        run(&mut con, &["RL.RELEASE", "k", &d.str("id").unwrap()]);
    }
    wait_in_sync(&primary, &replica);
    assert_eq!(digest(&mut replica.client()), digest(&mut con));
}

#[test]
fn fallback_chains_degrade_instead_of_denying() {
    let server = start();
    let mut con = server.client();
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "mini",
            "rpd",
            "fixed 100/1d",
            "daily",
            "fixed 1000 usd/1d",
        ],
    );
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "small",
            "rpm",
            "fixed 1/1d",
            "daily",
            "fixed 1000 usd/1d",
            "fallback",
            "mini",
        ],
    );
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "big",
            "rpm",
            "fixed 1/1d",
            "daily",
            "fixed 1000 usd/1d",
            "fallback",
            "small",
        ],
    );
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "gpt4",
            "gpm",
            "fixed 1/1d",
            "fallback",
            "gpt4-mini",
        ],
    );
    int(&mut con, &["RL.PLAN.SET", "gpt4-mini", "gpm", "fixed 1/1d"]);
    // A chain of one: the second call degrades to the fallback plan.
    assert_eq!(
        decision(&mut con, &["RL.ACQUIRE", "u", "gpt4"])
            .str("plan")
            .as_deref(),
        Some("gpt4")
    );
    assert_eq!(
        decision(&mut con, &["RL.ACQUIRE", "v", "gpt4"])
            .str("plan")
            .as_deref(),
        Some("gpt4")
    );
    // Same limit name, same counter: gpt4-mini's `gpm` is gpt4's, so no escape here.
    let d = decision(&mut con, &["RL.ACQUIRE", "u", "gpt4"]);
    assert!(!d.allowed());
    // A chain of three: big -> small -> mini; rpm is shared by big and small.
    let plans: Vec<String> = (0..3)
        .map(|_| {
            decision(
                &mut con,
                &["RL.ACQUIRE", "w", "big", "1", "COST", "usd", "300"],
            )
            .str("plan")
            .unwrap()
        })
        .collect();
    assert_eq!(plans, ["big", "mini", "mini"]);
    // The shared daily dollar budget stops every plan of the chain.
    let d = decision(
        &mut con,
        &["RL.ACQUIRE", "w", "big", "1", "COST", "usd", "300"],
    );
    assert!(!d.allowed());
    assert_eq!(d.str("plan").as_deref(), Some("big"));
    assert!(string(&mut con, &["INFO", "tollgate"]).contains("tollgate_fallback_admitted:2"));
}

#[test]
fn assigned_plans_and_the_default_plan() {
    let server = start();
    let mut con = server.client();
    int(&mut con, &["RL.PLAN.SET", "free", "rpd", "fixed 2/1d"]);
    int(&mut con, &["RL.PLAN.SET", "pro", "rpd", "fixed 100/1d"]);
    assert!(err(&mut con, &["RL.ACQUIRE", "alice", "*"]).contains("no default plan"));
    assert_eq!(string(&mut con, &["RL.PLAN.DEFAULT", "free"]), "OK");
    assert_eq!(string(&mut con, &["RL.PLAN.DEFAULT"]), "free");
    assert_eq!(
        err(&mut con, &["RL.PLAN.DEFAULT", "nosuch"]),
        "ERR unknown plan 'nosuch'"
    );
    assert_eq!(
        decision(&mut con, &["RL.ACQUIRE", "alice", "*"])
            .str("plan")
            .as_deref(),
        Some("free")
    );
    assert_eq!(string(&mut con, &["RL.ASSIGN", "bob", "pro"]), "OK");
    assert_eq!(string(&mut con, &["RL.ASSIGN", "bob"]), "pro");
    assert_eq!(run(&mut con, &["RL.ASSIGN", "alice"]), Value::Nil);
    assert_eq!(
        err(&mut con, &["RL.ASSIGN", "bob", "nosuch"]),
        "ERR unknown plan 'nosuch'"
    );
    assert_eq!(
        int(&mut con, &["PTTL", "bob"]),
        -1,
        "an assigned subject keeps its key"
    );
    assert_eq!(
        decision(&mut con, &["RL.ACQUIRE", "bob", "*"])
            .str("plan")
            .as_deref(),
        Some("pro")
    );
    assert_eq!(string(&mut con, &["DEBUG", "RELOAD"]), "OK");
    assert_eq!(string(&mut con, &["RL.ASSIGN", "bob"]), "pro");
    assert_eq!(string(&mut con, &["RL.PLAN.DEFAULT"]), "free");
    assert_eq!(
        decision(&mut con, &["RL.PEEK", "bob", "*", "0"]).remaining("rpd"),
        99
    );
    assert_eq!(int(&mut con, &["RL.UNASSIGN", "bob"]), 1);
    assert_eq!(int(&mut con, &["RL.UNASSIGN", "bob"]), 0);
    assert!(
        int(&mut con, &["PTTL", "bob"]) > 0,
        "unassigned, the key expires with its state"
    );
    assert_eq!(
        decision(&mut con, &["RL.ACQUIRE", "bob", "*"])
            .str("plan")
            .as_deref(),
        Some("free")
    );
}

#[test]
fn a_waiter_whose_call_fails_passes_the_turn_on() {
    let server = start();
    let mut con = server.client();
    int(&mut con, &["RL.PLAN.SET", "gone", "jobs", "concurrency 1"]);
    int(&mut con, &["RL.PLAN.SET", "p", "jobs", "concurrency 1"]);
    let holder = decision(&mut con, &["RL.ACQUIRE", "k", "p"]);
    let first = spawn_acquire(server.port, &["RL.ACQUIRE", "k", "gone", "WAIT", "20000"]);
    wait_for_waiters(&mut con, 1);
    let second = spawn_acquire(server.port, &["RL.ACQUIRE", "k", "p", "WAIT", "20000"]);
    wait_for_waiters(&mut con, 2);
    // The head's plan disappears: when woken, its call is an error...
    int(&mut con, &["RL.PLAN.DEL", "gone"]);
    run(&mut con, &["RL.RELEASE", "k", &holder.str("id").unwrap()]);
    let (reply, _) = first.recv_timeout(GUARD).unwrap();
    assert!(
        reply.as_ref().is_err_and(|e| e.contains("unknown plan")),
        "{reply:?}"
    );
    // ...and the next in line is admitted when the turn passes, not at its timeout.
    let (reply, _) = second.recv_timeout(GUARD).unwrap();
    assert!(Decision::from(&reply.unwrap()).allowed());
    assert_eq!(waits(&mut con), (1, 0), "admitted, nothing timed out");
    assert_eq!(waiting(&mut con), 0);
}

#[test]
fn max_waiters_zero_turns_wait_off() {
    let server = start();
    let mut con = server.client();
    int(&mut con, &["RL.PLAN.SET", "p", "jobs", "concurrency 1"]);
    assert!(decision(&mut con, &["RL.ACQUIRE", "k", "p"]).allowed());
    for config in ["tollgate.max-waiters-per-key", "tollgate.max-waiters"] {
        run(&mut con, &["CONFIG", "SET", config, "0"]);
        let d = decision(&mut con, &["RL.ACQUIRE", "k", "p", "WAIT", "5000"]);
        assert!(!d.allowed());
        assert_eq!(
            waits(&mut con),
            (0, 0),
            "{config} 0: answered without waiting"
        );
        run(&mut con, &["CONFIG", "SET", config, "1000"]);
    }
}

#[test]
fn a_wait_that_runs_out_behind_an_earlier_waiter_is_denied_by_the_queue() {
    let server = start();
    let mut con = server.client();
    int(
        &mut con,
        &["RL.PLAN.SET", "p", "b", "bucket 10/4s burst 10"],
    );
    assert!(decision(&mut con, &["RL.ACQUIRE", "k", "p", "10"]).allowed());
    // The head needs the full bucket (4 s away); the next needs one token (0.4 s away).
    let head = spawn_acquire(
        server.port,
        &["RL.ACQUIRE", "k", "p", "10", "WAIT", "20000"],
    );
    wait_for_waiters(&mut con, 1);
    let started = Instant::now();
    let d = decision(&mut con, &["RL.ACQUIRE", "k", "p", "1", "WAIT", "1500"]);
    assert!(started.elapsed() >= Duration::from_millis(1400));
    // Its token was there, but the head keeps its turn.
    assert!(!d.allowed());
    assert_eq!(d.str("denied_by").as_deref(), Some("queue"));
    assert_eq!(
        (
            counter(&mut con, "denied"),
            counter(&mut con, "denied_queue")
        ),
        (1, 1)
    );
    let (reply, _) = head.recv_timeout(GUARD).unwrap();
    assert!(Decision::from(&reply.unwrap()).allowed());
}
