//! `RL.ACQUIRE` and `RL.PEEK` against a live server.

use std::time::Duration;

use crate::harness::*;
use redis::Value;

fn setup(server: &Server) -> redis::Connection {
    let mut con = server.client();
    assert_eq!(
        int(
            &mut con,
            &[
                "RL.PLAN.SET",
                "free",
                "rpm",
                "sliding 10/1h",
                "rpd",
                "fixed 200/1d",
                "tpm",
                "bucket 2000 token/1h burst 4000",
                "big",
                "cap 3000 token",
                "spend",
                "fixed 1000000 usd_micros/1mo warn 80%",
            ]
        ),
        5
    );
    con
}

#[test]
fn the_reply_carries_every_field_in_resp2_and_resp3() {
    let server = Server::start();
    let _ = setup(&server);
    for (mut con, resp3) in [(server.client(), false), (server.client_resp3(), true)] {
        let reply = run(
            &mut con,
            &["RL.ACQUIRE", "user:1", "free", "1", "COST", "token", "500"],
        );
        match (&reply, resp3) {
            (Value::Map(_), true) | (Value::Array(_), false) => {}
            (other, _) => panic!("resp3={resp3}: unexpected reply shape {other:?}"),
        }
        let d = Decision::from(&reply);
        assert!(d.allowed());
        assert_eq!(d.retry_after_ms(), 0);
        assert_eq!(d.str("denied_by"), None);
        assert_eq!(d.str("plan").as_deref(), Some("free"));
        assert!(!d.fields.contains_key("id"), "no reservation, no id");
        let names: Vec<String> = d.limits.iter().map(|l| text(&l["name"])).collect();
        assert_eq!(names, ["rpm", "rpd", "tpm", "big", "spend"]);
        for limit in &d.limits {
            for field in [
                "name",
                "kind",
                "unit",
                "limit",
                "remaining",
                "reset_ms",
                "window_ms",
                "warn",
            ] {
                assert!(
                    limit.contains_key(field),
                    "limit without {field}: {limit:?}"
                );
            }
        }
        assert_eq!(text(&d.limits[2]["unit"]), "token");
        let kinds: Vec<String> = d.limits.iter().map(|l| text(&l["kind"])).collect();
        assert_eq!(kinds[0], "sliding", "{kinds:?}");
        assert_eq!(d.limit("tpm", "limit"), 4000);
        assert_eq!(d.limit("big", "remaining"), 3000);
    }
    let mut con = server.client();
    let d = decision(&mut con, &["RL.PEEK", "user:1", "free", "0"]);
    assert_eq!(d.remaining("rpm"), 8);
    assert_eq!(d.remaining("tpm"), 3000);
    // 1000 tokens at 2000/h drain in 30 min.
    assert!((1_790_000..=1_800_000).contains(&d.limit("tpm", "reset_ms")));
}

#[test]
fn each_limit_is_charged_in_its_own_unit() {
    let server = Server::start();
    let mut con = setup(&server);
    let d = decision(
        &mut con,
        &[
            "RL.ACQUIRE",
            "u",
            "free",
            "3",
            "COST",
            "token",
            "100",
            "usd_micros",
            "250000",
        ],
    );
    assert!(d.allowed());
    assert_eq!(d.remaining("rpm"), 7);
    assert_eq!(d.remaining("rpd"), 197);
    assert_eq!(d.remaining("tpm"), 3900);
    assert_eq!(d.remaining("spend"), 750000);
    // COST request n is the same as the positional units.
    let d = decision(
        &mut con,
        &["RL.ACQUIRE", "u", "free", "COST", "request", "2"],
    );
    assert_eq!(d.remaining("rpm"), 5);
}

#[test]
fn all_or_nothing_and_never_for_costs_past_capacity() {
    let server = Server::start();
    let mut con = setup(&server);
    let d = decision(
        &mut con,
        &["RL.ACQUIRE", "u", "free", "1", "COST", "token", "3001"],
    );
    assert!(!d.allowed());
    assert_eq!(d.retry_after_ms(), -1);
    assert_eq!(d.str("denied_by").as_deref(), Some("big"));
    assert_eq!(
        int(&mut con, &["EXISTS", "u"]),
        0,
        "a denied call on a new subject creates no key"
    );
    assert!(decision(&mut con, &["RL.ACQUIRE", "u", "free", "9"]).allowed());
    let d = decision(
        &mut con,
        &["RL.ACQUIRE", "u", "free", "2", "COST", "token", "10"],
    );
    assert!(!d.allowed());
    assert_eq!(d.str("denied_by").as_deref(), Some("rpm"));
    assert!(d.retry_after_ms() > 3_000_000, "{}", d.retry_after_ms());
    // Nothing was charged: tokens and the daily count are as before.
    let d = decision(&mut con, &["RL.PEEK", "u", "free", "0"]);
    assert_eq!(d.remaining("tpm"), 4000);
    assert_eq!(d.remaining("rpd"), 191);
}

#[test]
fn retry_after_is_exact_and_rounded_up() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &["RL.PLAN.SET", "slow", "b", "bucket 1/1h burst 1"],
    );
    assert!(decision(&mut con, &["RL.ACQUIRE", "k", "slow"]).allowed());
    let d = decision(&mut con, &["RL.ACQUIRE", "k", "slow"]);
    assert!(!d.allowed());
    let retry = d.retry_after_ms();
    assert!((3_590_000..=3_600_000).contains(&retry), "{retry}");
    assert_eq!(d.limit("b", "reset_ms"), retry);
}

#[test]
fn endpoints_scope_limits_and_form_an_access_list() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "p",
            "chat",
            "fixed 1/1d for chat",
            "images",
            "fixed 2/1d for images,edits",
            "all",
            "fixed 10/1d",
        ],
    );
    let d = decision(&mut con, &["RL.ACQUIRE", "u", "p", "ENDPOINT", "chat"]);
    assert!(d.allowed());
    assert_eq!(d.limits.len(), 2);
    assert!(!decision(&mut con, &["RL.ACQUIRE", "u", "p", "ENDPOINT", "chat"]).allowed());
    assert!(decision(&mut con, &["RL.ACQUIRE", "u", "p", "ENDPOINT", "edits"]).allowed());
    let d = decision(&mut con, &["RL.ACQUIRE", "u", "p", "ENDPOINT", "video"]);
    assert!(!d.allowed());
    assert_eq!(d.str("denied_by").as_deref(), Some("endpoint"));
    assert_eq!(d.retry_after_ms(), -1);
    let d = decision(&mut con, &["RL.ACQUIRE", "u", "p"]);
    assert!(d.allowed());
    assert_eq!(d.limits.len(), 1);
    assert_eq!(d.remaining("all"), 7);
}

#[test]
fn shadow_mode_admits_and_reports_what_it_would_have_denied() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &["RL.PLAN.SET", "new", "rpd", "fixed 1/1d", "mode", "shadow"],
    );
    let d = decision(&mut con, &["RL.ACQUIRE", "u", "new"]);
    assert!(d.allowed());
    assert_eq!(d.str("shadow_denied_by"), None);
    let d = decision(&mut con, &["RL.ACQUIRE", "u", "new"]);
    assert!(d.allowed());
    assert_eq!(d.retry_after_ms(), 0);
    assert_eq!(d.str("denied_by"), None);
    assert_eq!(d.str("shadow_denied_by").as_deref(), Some("rpd"));
    assert!(string(&mut con, &["INFO", "tollgate"]).contains("tollgate_shadow_denied:1"));
}

#[test]
fn warn_turns_on_at_the_threshold() {
    let server = Server::start();
    let mut con = setup(&server);
    let d = decision(
        &mut con,
        &[
            "RL.ACQUIRE",
            "u",
            "free",
            "0",
            "COST",
            "usd_micros",
            "799999",
        ],
    );
    assert_eq!(d.limit("spend", "warn"), 0);
    let d = decision(
        &mut con,
        &["RL.ACQUIRE", "u", "free", "0", "COST", "usd_micros", "1"],
    );
    assert_eq!(d.limit("spend", "warn"), 1);
}

#[test]
fn a_changed_plan_applies_at_the_next_call_and_keeps_usage() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "tier",
            "rpm",
            "sliding 2/1h",
            "tpd",
            "fixed 100 token/1d",
        ],
    );
    assert!(decision(
        &mut con,
        &["RL.ACQUIRE", "u", "tier", "2", "COST", "token", "40"]
    )
    .allowed());
    assert!(!decision(&mut con, &["RL.ACQUIRE", "u", "tier"]).allowed());
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "tier",
            "rpm",
            "sliding 60/1h",
            "tpd",
            "fixed 1000 token/1d",
        ],
    );
    let d = decision(&mut con, &["RL.ACQUIRE", "u", "tier"]);
    assert!(d.allowed());
    assert_eq!(d.remaining("rpm"), 57);
    assert_eq!(d.remaining("tpd"), 960);
    // A new window length carries the usage over: one limit name is one budget.
    int(
        &mut con,
        &["RL.PLAN.SET", "tier", "tpd", "fixed 1000 token/2d"],
    );
    assert_eq!(
        decision(&mut con, &["RL.PEEK", "u", "tier", "0"]).remaining("tpd"),
        960
    );
}

#[test]
fn peek_charges_nothing_and_creates_no_key() {
    let server = Server::start();
    let mut con = setup(&server);
    let d = decision(&mut con, &["RL.PEEK", "fresh", "free", "5"]);
    assert!(d.allowed());
    assert_eq!(d.remaining("rpm"), 5);
    assert_eq!(int(&mut con, &["EXISTS", "fresh"]), 0);
    assert!(decision(&mut con, &["RL.ACQUIRE", "fresh", "free", "5"]).allowed());
    let d = decision(&mut con, &["RL.PEEK", "fresh", "free", "6"]);
    assert!(!d.allowed());
    assert_eq!(
        decision(&mut con, &["RL.PEEK", "fresh", "free", "0"]).remaining("rpm"),
        5
    );
}

#[test]
fn bad_input_gets_one_clear_error_and_changes_nothing() {
    let server = Server::start();
    let mut con = setup(&server);
    assert_eq!(string(&mut con, &["SET", "str", "x"]), "OK");
    for (args, expected) in [
        (
            vec!["RL.ACQUIRE", "u", "nosuch"],
            "ERR unknown plan 'nosuch'",
        ),
        (
            vec!["RL.ACQUIRE", "str", "free"],
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        ),
        (
            vec!["RL.PEEK", "str", "free"],
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        ),
        (
            vec!["RL.USAGE", "u", "free", "FOO"],
            "ERR unexpected argument 'FOO' (expected ENDPOINT)",
        ),
        (vec!["RL.USAGE", "u", "free", "ENDPOINT"], "ERR ENDPOINT needs a value"),
        (
            vec!["RL.USAGE", "u", "free", "ENDPOINT", "a", "ENDPOINT", "b"],
            "ERR ENDPOINT given twice",
        ),
        (
            vec!["RL.USAGE", "u", "free", "ENDPOINT", "a", "b"],
            "ERR unexpected argument 'b' (expected ENDPOINT)",
        ),
        (
            vec!["RL.ACQUIRE", "u", "free", "-1"],
            "ERR unexpected argument '-1' (expected COST, ENDPOINT, ID, TTL, WAIT, PRIORITY, CREDITS, COMPACT or ALSO)",
        ),
        (
            vec!["RL.ACQUIRE", "u", "free", "18446744073709551616"],
            "ERR units is larger than 18446744073709551615",
        ),
        (
            vec!["RL.ACQUIRE", "u", "free", "COST"],
            "ERR COST needs at least one unit and amount",
        ),
        (
            vec!["RL.ACQUIRE", "u", "free", "COST", "token"],
            "ERR COST unit 'token' has no amount",
        ),
        (
            vec!["RL.ACQUIRE", "u", "free", "COST", "token", "1.5"],
            "ERR COST amount must be a non-negative integer, got '1.5'",
        ),
        (
            vec![
                "RL.ACQUIRE",
                "u",
                "free",
                "COST",
                "token",
                "1",
                "token",
                "2",
            ],
            "ERR COST unit 'token' given twice",
        ),
        (
            vec!["RL.ACQUIRE", "u", "free", "2", "COST", "request", "2"],
            "ERR the request cost is given twice (units and COST request)",
        ),
        (
            vec!["RL.ACQUIRE", "u", "free", "COST", "to ken", "1"],
            "ERR COST unit 'to ken' is not a valid name (1-64 of A-Z a-z 0-9 _ - . : / @ #)",
        ),
        (
            vec!["RL.ACQUIRE", "u", "free", "ENDPOINT"],
            "ERR ENDPOINT needs a value",
        ),
        (
            vec!["RL.ACQUIRE", "u", "free", "ENDPOINT", "a", "ENDPOINT", "b"],
            "ERR ENDPOINT given twice",
        ),
        (
            vec!["RL.ACQUIRE", "u", "free", "TTL", "0"],
            "ERR TTL must be between 1 and 315360000000 ms",
        ),
        (
            vec!["RL.ACQUIRE", "u", "free", "ID", ""],
            "ERR ID must be 1 to 256 bytes",
        ),
        (
            vec!["RL.ACQUIRE", "u", "free", "BOGUS"],
            "ERR unexpected argument 'BOGUS' (expected COST, ENDPOINT, ID, TTL, WAIT, PRIORITY, CREDITS, COMPACT or ALSO)",
        ),
        (
            vec!["RL.PEEK", "u", "free", "ID", "x"],
            "ERR unexpected argument 'ID' (expected COST, ENDPOINT, COMPACT or ALSO)",
        ),
        (
            vec!["RL.ACQUIRE", "u", "*"],
            "ERR plan '*': the subject has no assigned plan and no default plan is set",
        ),
    ] {
        assert_eq!(err(&mut con, &args), expected, "{args:?}");
    }
    assert!(err(&mut con, &["RL.ACQUIRE", "u"]).contains("wrong number of arguments"));
    assert_eq!(
        int(&mut con, &["EXISTS", "u"]),
        0,
        "no error created the key"
    );
    assert_eq!(string(&mut con, &["GET", "str"]), "x");
    // Non-UTF-8 plan names are refused by name.
    let reply = redis::cmd("RL.ACQUIRE")
        .arg("u")
        .arg(&b"\xff\xfe"[..])
        .query::<Value>(&mut con);
    assert!(reply.is_err_and(|e| e.to_string().contains("plan is not valid UTF-8")));
}

#[test]
fn eight_concurrent_clients_admit_exactly_the_limit() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "p",
            "rpd",
            "fixed 100/1d",
            "tpm",
            "sliding 300 token/1h",
        ],
    );
    let port = server.port;
    let admitted: usize = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(move || {
                    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
                    let mut con = client.get_connection().unwrap();
                    (0..50)
                        .filter(|_| {
                            decision(
                                &mut con,
                                &["RL.ACQUIRE", "shared", "p", "1", "COST", "token", "2"],
                            )
                            .allowed()
                        })
                        .count()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    // 400 attempts: rpd admits 100, tpm would admit 150.
    assert_eq!(admitted, 100);
    assert_eq!(
        decision(&mut con, &["RL.PEEK", "shared", "p", "0"]).remaining("tpm"),
        100
    );
}

#[test]
fn idle_keys_expire_by_themselves() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "fast",
            "rps",
            "sliding 5/500ms precision 5",
            "b",
            "bucket 10/1s",
        ],
    );
    assert!(decision(&mut con, &["RL.ACQUIRE", "k", "fast", "3"]).allowed());
    // Idle within 500 ms; the key's expiry is rounded up to the next second (-2: a
    // slow machine paused long enough for it to expire already).
    let pttl = int(&mut con, &["PTTL", "k"]);
    assert!(pttl == -2 || (1..=1_500).contains(&pttl), "pttl {pttl}");
    std::thread::sleep(Duration::from_millis(1_600));
    assert_eq!(int(&mut con, &["EXISTS", "k"]), 0);
    // A long window keeps the key until the window ends.
    int(&mut con, &["RL.PLAN.SET", "daily", "rpd", "fixed 5/1d"]);
    assert!(decision(&mut con, &["RL.ACQUIRE", "d", "daily"]).allowed());
    let pttl = int(&mut con, &["PTTL", "d"]);
    assert!((1..=86_400_000).contains(&pttl));
    // A zero-cost call on a new subject leaves nothing behind.
    assert!(decision(&mut con, &["RL.ACQUIRE", "z", "daily", "0"]).allowed());
    assert_eq!(int(&mut con, &["EXISTS", "z"]), 0);
    assert_eq!(string(&mut con, &["TYPE", "d"]), "rlsubject");
}

fn ints(v: Value) -> Vec<i64> {
    match v {
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::Int(n) => n,
                other => panic!("not an integer: {other:?}"),
            })
            .collect(),
        other => panic!("not an array: {other:?}"),
    }
}

#[test]
fn compact_replies_are_integers_that_say_which_plan_decided() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "cheap",
            "rpm",
            "sliding 100/1m",
            "x",
            "fixed 7/1h",
        ],
    );
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "main",
            "rpm",
            "sliding 1/1m",
            "fallback",
            "cheap",
        ],
    );
    // [allowed, retry_after_ms, denied index, hops, (remaining, reset_ms) per limit]
    let first = ints(run(&mut con, &["RL.ACQUIRE", "u", "main", "COMPACT"]));
    assert_eq!(&first[..5], &[1, 0, -1, 0, 0], "{first:?}");
    assert_eq!(first.len(), 6);
    let second = ints(run(&mut con, &["RL.ACQUIRE", "u", "main", "COMPACT"]));
    assert_eq!(&second[..4], &[1, 0, -1, 1], "one fallback: cheap decided");
    assert_eq!(second.len(), 4 + 2 * 2, "cheap's two limits: {second:?}");
    assert_eq!(second[4], 98, "rpm is one budget across both plans");
    assert_eq!(second[6], 6);
    // The same in RESP3.
    let mut resp3 = server.client_resp3();
    let third = ints(run(&mut resp3, &["RL.PEEK", "u", "main", "COMPACT"]));
    assert_eq!(&third[..4], &[1, 0, -1, 1]);
}

#[test]
fn compact_needs_an_id_when_a_plan_holds_leases() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &["RL.PLAN.SET", "t", "jobs", "concurrency 2 ttl 30s"],
    );
    assert_eq!(
        err(&mut con, &["RL.ACQUIRE", "u", "t", "COMPACT"]),
        "ERR COMPACT needs an ID when a plan holds leases (the reply cannot carry a generated id)"
    );
    assert_eq!(int(&mut con, &["EXISTS", "u"]), 0, "nothing charged");
    let r = ints(run(
        &mut con,
        &["RL.ACQUIRE", "u", "t", "ID", "j1", "COMPACT"],
    ));
    assert_eq!(&r[..5], &[1, 0, -1, 0, 1]);
}
