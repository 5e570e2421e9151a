//! Operating the module: ACL confinement of application users, configuration, the
//! CL.THROTTLE alias, command metadata.

use crate::harness::*;
use redis::Value;

#[test]
fn an_application_user_is_confined_to_acquire_release_touch_and_peek() {
    let server = Server::start();
    let mut admin = server.client();
    // Confined by command names (docs/operating.md gives the full recipe real
    // clients connect with; tests/clients runs it with them).
    assert_eq!(
        string(
            &mut admin,
            &[
                "ACL",
                "SETUSER",
                "app",
                "on",
                ">app-secret",
                "~*",
                "resetchannels",
                "-@all",
                "+rl.acquire",
                "+rl.release",
                "+rl.touch",
                "+rl.peek",
            ]
        ),
        "OK"
    );
    int(&mut admin, &["RL.PLAN.SET", "free", "rpd", "fixed 10/1d"]);
    let client =
        redis::Client::open(format!("redis://app:app-secret@127.0.0.1:{}/", server.port)).unwrap();
    let mut app = client.get_connection().unwrap();
    let d = decision(&mut app, &["RL.ACQUIRE", "user:1", "free", "ID", "r1"]);
    assert!(d.allowed());
    assert!(decision(&mut app, &["RL.PEEK", "user:1", "free"]).allowed());
    assert_eq!(
        map_of(&run(&mut app, &["RL.RELEASE", "user:1", "r1"]))["released"],
        Value::Int(1)
    );
    assert_eq!(int(&mut app, &["RL.TOUCH", "user:1", "r1", "1000"]), 0);
    for args in [
        vec!["RL.PLAN.SET", "free", "rpd", "fixed 1000000/1d"],
        vec!["RL.PLAN.DEL", "free"],
        vec!["RL.PLAN.DEFAULT", "free"],
        vec!["RL.CREDITS.GRANT", "acct", "1000000"],
        vec!["RL.ASSIGN", "user:1", "free"],
        vec!["RL.APPLY", "user:1", "x"],
        vec!["DEL", "user:1"],
    ] {
        let e = err(&mut app, &args);
        assert!(e.starts_with("NOPERM"), "{args:?}: {e}");
    }
}

#[test]
fn configs_are_validated() {
    let server = Server::start();
    let mut con = server.client();
    let all = run(&mut con, &["CONFIG", "GET", "tollgate.*"]);
    let names: Vec<String> = match &all {
        Value::Array(items) => items.iter().step_by(2).map(text).collect(),
        Value::Map(items) => items.iter().map(|(k, _)| text(k)).collect(),
        other => panic!("{other:?}"),
    };
    for name in [
        "tollgate.default-ttl-ms",
        "tollgate.max-requests-per-key",
        "tollgate.idempotency-window-ms",
        "tollgate.max-ids-per-key",
        "tollgate.max-blocks-per-key",
        "tollgate.max-waiters-per-key",
        "tollgate.max-waiters",
        "tollgate.cl-throttle-alias",
        "tollgate.max-also",
        "tollgate.strict-units",
    ] {
        assert!(
            names.iter().any(|n| n == name),
            "{name} missing from {names:?}"
        );
    }
    assert_eq!(
        string(
            &mut con,
            &["CONFIG", "SET", "tollgate.default-ttl-ms", "5000"]
        ),
        "OK"
    );
    for (name, value) in [
        ("tollgate.default-ttl-ms", "0"),
        ("tollgate.default-ttl-ms", "-1"),
        ("tollgate.max-requests-per-key", "99999999999"),
        ("tollgate.max-waiters", "lots"),
    ] {
        let e = err(&mut con, &["CONFIG", "SET", name, value]);
        assert!(e.starts_with("ERR"), "{name}={value}: {e}");
    }
    // Immutable after load.
    assert!(err(
        &mut con,
        &["CONFIG", "SET", "tollgate.cl-throttle-alias", "yes"]
    )
    .starts_with("ERR"));
    // A lease takes the configured default TTL.
    int(&mut con, &["RL.PLAN.SET", "p", "jobs", "concurrency 1"]);
    assert!(decision(&mut con, &["RL.ACQUIRE", "u", "p"]).allowed());
    let d = decision(&mut con, &["RL.ACQUIRE", "u", "p"]);
    assert!(
        (1..=5_000).contains(&d.retry_after_ms()),
        "{}",
        d.retry_after_ms()
    );
}

#[test]
fn module_arguments_set_configs_and_register_the_cl_throttle_alias() {
    let server = Server::start_with(&["cl-throttle-alias", "yes", "max-waiters", "7"]);
    let mut con = server.client();
    assert_eq!(
        run(&mut con, &["CL.THROTTLE", "user123", "15", "30", "60"]),
        Value::Array(vec![
            Value::Int(0),
            Value::Int(16),
            Value::Int(15),
            Value::Int(-1),
            Value::Int(2)
        ])
    );
    assert_eq!(
        run(&mut con, &["CONFIG", "GET", "tollgate.max-waiters"]),
        run(&mut con, &["CONFIG", "GET", "tollgate.max-waiters"])
    );
    let got = run(&mut con, &["CONFIG", "GET", "tollgate.max-waiters"]);
    assert!(format!("{got:?}").contains("\"7\""), "{got:?}");
    let plain = Server::start();
    assert!(
        err(&mut plain.client(), &["CL.THROTTLE", "k", "1", "1", "1"]).contains("unknown command")
    );
}

#[test]
fn commands_carry_flags_key_specs_and_docs() {
    let server = Server::start();
    let mut con = server.client();
    let info = format!(
        "{:?}",
        run(
            &mut con,
            &["COMMAND", "INFO", "rl.peek", "rl.acquire", "rl.plan.list"]
        )
    );
    assert!(info.contains("readonly"), "{info}");
    // The first key routes every call: no client has to ask the server where the
    // keys are (`movablekeys` makes redis-py send COMMAND GETKEYS first).
    assert!(!info.contains("movablekeys"), "{info}");
    let docs = format!("{:?}", run(&mut con, &["COMMAND", "DOCS", "rl.acquire"]));
    assert!(docs.contains("Admit and charge"), "{docs}");
    assert_eq!(
        run(
            &mut con,
            &[
                "COMMAND",
                "GETKEYS",
                "RL.ACQUIRE",
                "a",
                "p",
                "1",
                "COST",
                "token",
                "5",
                "CREDITS",
                "c",
                "1"
            ]
        ),
        Value::Array(vec![Value::BulkString(b"a".to_vec())])
    );
    // State-freeing commands run under maxmemory; charging ones do not.
    for (name, deny_oom) in [
        ("rl.release", false),
        ("rl.touch", false),
        ("rl.credits.refund", false),
        ("rl.unassign", false),
        ("rl.acquire", true),
        ("rl.credits.grant", true),
        ("rl.plan.set", true),
    ] {
        let flags = format!("{:?}", run(&mut con, &["COMMAND", "INFO", name]));
        assert_eq!(flags.contains("denyoom"), deny_oom, "{name}: {flags}");
    }
}

#[test]
fn strict_units_refuses_a_cost_unit_no_limit_counts_and_charges_nothing() {
    let server = Server::start();
    let mut con = server.client();
    run(
        &mut con,
        &[
            "RL.PLAN.SET",
            "p",
            "rpm",
            "sliding 10/1m",
            "tpm",
            "sliding 1000 token/1m",
        ],
    );
    // Off (the default): a typo charges nothing of the misspelt unit and is admitted.
    let d = decision(
        &mut con,
        &["RL.ACQUIRE", "k", "p", "1", "COST", "tokens", "5"],
    );
    assert!(d.allowed());
    assert_eq!(d.remaining("tpm"), 1000);
    assert_eq!(
        string(&mut con, &["CONFIG", "SET", "tollgate.strict-units", "yes"]),
        "OK"
    );
    let e = err(
        &mut con,
        &["RL.ACQUIRE", "k", "p", "1", "COST", "tokens", "5"],
    );
    assert!(
        e.starts_with("ERR COST unit 'tokens' is counted by no limit"),
        "{e}"
    );
    let d = decision(&mut con, &["RL.PEEK", "k", "p", "0"]);
    assert_eq!(d.remaining("rpm"), 9, "the refused call charged nothing");
    let d = decision(
        &mut con,
        &["RL.ACQUIRE", "k", "p", "1", "COST", "token", "5"],
    );
    assert!(d.allowed());
    assert_eq!(d.remaining("tpm"), 995);
}

#[test]
fn a_plan_counting_a_reserved_word_as_unit_is_refused() {
    let server = Server::start();
    let mut con = server.client();
    for unit in ["credits", "ID", "ttl", "cost", "compact", "also"] {
        let spec = format!("sliding 10 {unit}/1m");
        let e = err(&mut con, &["RL.PLAN.SET", "p", "lim", &spec]);
        assert!(e.contains("reserved word"), "{unit}: {e}");
    }
    let e = err(&mut con, &["RL.PLAN.SET", "p", "lim", "fixed 10 lease/1h"]);
    assert!(e.contains("reserved word"), "{e}");
    // A lease limit is how concurrency counts: that one is accepted.
    run(&mut con, &["RL.PLAN.SET", "p", "jobs", "concurrency 2"]);
    let plans = run(&mut con, &["RL.PLAN.LIST"]);
    assert!(!format!("{plans:?}").contains("lim"), "{plans:?}");
}
