//! `RL.PLAN.*`: hash-shaped plans, validated as a whole.

use crate::harness::*;
use redis::Value;

#[test]
fn plans_are_set_read_listed_and_deleted_like_hashes() {
    let server = Server::start();
    let mut con = server.client();
    assert_eq!(
        int(
            &mut con,
            &[
                "RL.PLAN.SET",
                "free",
                "rpm",
                "sliding 10/1m",
                "rpd",
                "fixed 200/1d"
            ]
        ),
        2
    );
    assert_eq!(
        int(
            &mut con,
            &[
                "RL.PLAN.SET",
                "free",
                "rpm",
                "sliding 20/1m",
                "tpm",
                "bucket 2000 token/1m"
            ]
        ),
        1
    );
    assert_eq!(
        int(&mut con, &["RL.PLAN.SET", "pro", "rpm", "sliding 60/1m"]),
        1
    );
    let fields = map_of(&run(&mut con, &["RL.PLAN.GET", "free"]));
    assert_eq!(fields.len(), 3);
    assert_eq!(text(&fields["rpm"]), "sliding 20/1m");
    assert_eq!(text(&fields["tpm"]), "bucket 2000 token/1m");
    assert_eq!(
        run(&mut con, &["RL.PLAN.LIST"]),
        Value::Array(vec![
            Value::BulkString(b"free".to_vec()),
            Value::BulkString(b"pro".to_vec()),
        ])
    );
    assert_eq!(int(&mut con, &["RL.PLAN.DEL", "free", "rpd", "nosuch"]), 1);
    assert_eq!(map_of(&run(&mut con, &["RL.PLAN.GET", "free"])).len(), 2);
    assert_eq!(int(&mut con, &["RL.PLAN.DEL", "pro"]), 1);
    assert_eq!(int(&mut con, &["RL.PLAN.DEL", "pro"]), 0);
    assert_eq!(run(&mut con, &["RL.PLAN.GET", "pro"]), Value::Array(vec![]));
    // RESP3 gets a real map.
    let mut con3 = server.client_resp3();
    assert!(matches!(run(&mut con3, &["RL.PLAN.GET", "free"]), Value::Map(ref m) if m.len() == 2));
}

#[test]
fn a_bad_field_is_refused_with_plan_field_and_reason_and_changes_nothing() {
    let server = Server::start();
    let mut con = server.client();
    assert_eq!(
        int(&mut con, &["RL.PLAN.SET", "free", "rpm", "sliding 10/1m"]),
        1
    );
    for (args, expected) in [
        (
            vec!["RL.PLAN.SET", "free", "rpd", "fixed 200/1d", "tpm", "bucket lots/1m"],
            "ERR plan 'free' field 'tpm': amount 'lots' is not a non-negative integer",
        ),
        (vec!["RL.PLAN.SET", "free", "x", "fixed 1/1y"], "ERR plan 'free' field 'x': duration '1y' has unknown unit 'y' (expected ms, s, m, h, d, w or mo)"),
        (vec!["RL.PLAN.SET", "free", "x", "sliding 1/1mo"], "ERR plan 'free' field 'x': 'mo' windows are calendar months and only fixed windows have them, not sliding"),
        (vec!["RL.PLAN.SET", "free", "mode", "loud"], "ERR plan 'free' field 'mode': mode 'loud' must be enforce or shadow"),
        (vec!["RL.PLAN.SET", "free", "fallback", "free"], "ERR plan 'free' field 'fallback': a plan cannot fall back to itself"),
        (vec!["RL.PLAN.SET", "free", "bad name", "cap 1"], "ERR plan 'free' field 'bad name': is not a valid limit name (1-64 of A-Z a-z 0-9 _ - . : / @ #)"),
        (vec!["RL.PLAN.SET", "*", "x", "cap 1"], "ERR plan '*': is not a valid plan name (1-64 of A-Z a-z 0-9 _ - . : / @ #)"),
        (vec!["RL.PLAN.SET", "free", "x", "fixed 1/1m warn 120%"], "ERR plan 'free' field 'x': warn '120%' must be between 1% and 100%"),
    ] {
        assert_eq!(err(&mut con, &args), expected, "{args:?}");
    }
    let fields = map_of(&run(&mut con, &["RL.PLAN.GET", "free"]));
    assert_eq!(fields.len(), 1, "nothing changed");
    assert!(err(&mut con, &["RL.PLAN.SET", "free", "rpm"]).contains("wrong number of arguments"));
    assert!(err(&mut con, &["RL.PLAN.SET", "free"]).contains("wrong number of arguments"));
    assert!(err(&mut con, &["RL.PLAN.GET"]).contains("wrong number of arguments"));
    assert!(err(&mut con, &["RL.PLAN.LIST", "x"]).contains("wrong number of arguments"));
}

#[test]
fn fallback_cycles_are_refused_even_when_closed_later() {
    let server = Server::start();
    let mut con = server.client();
    assert_eq!(int(&mut con, &["RL.PLAN.SET", "a", "fallback", "b"]), 1);
    assert_eq!(int(&mut con, &["RL.PLAN.SET", "b", "fallback", "c"]), 1);
    assert_eq!(
        err(
            &mut con,
            &["RL.PLAN.SET", "c", "rpm", "fixed 1/1s", "fallback", "a"]
        ),
        "ERR plan 'c' field 'fallback': fallback chain would loop: c -> a -> b -> c"
    );
    assert_eq!(run(&mut con, &["RL.PLAN.GET", "c"]), Value::Array(vec![]));
}

#[test]
fn the_default_plan_cannot_be_deleted_from_under_star() {
    let server = Server::start();
    let mut con = server.client();
    int(&mut con, &["RL.PLAN.SET", "a", "rpm", "fixed 5/1m"]);
    run(&mut con, &["RL.PLAN.DEFAULT", "a"]);
    assert_eq!(
        err(&mut con, &["RL.PLAN.DEL", "a"]),
        "ERR plan 'a': is the default plan: set another default (RL.PLAN.DEFAULT) first"
    );
    assert!(decision(&mut con, &["RL.ACQUIRE", "k", "*"]).allowed());
}

#[test]
fn a_fallback_counting_a_limit_in_another_unit_is_refused_and_changes_nothing() {
    let server = Server::start();
    let mut con = server.client();
    let list = |con: &mut redis::Connection| match run(con, &["RL.PLAN.LIST"]) {
        Value::Array(names) => names.iter().map(text).collect::<Vec<_>>(),
        other => panic!("RL.PLAN.LIST: {other:?}"),
    };
    assert_eq!(
        int(
            &mut con,
            &["RL.PLAN.SET", "small", "daily", "fixed 100 token/1d"]
        ),
        1
    );
    // A new plan falling back to one that counts `daily` in another unit.
    assert_eq!(
        err(
            &mut con,
            &[
                "RL.PLAN.SET",
                "big",
                "daily",
                "fixed 5 usd/1d",
                "fallback",
                "small"
            ]
        ),
        "ERR plan 'big' field 'fallback': limit 'daily' counts usd in plan 'big' but token \
         in its fallback 'small': one limit name is one budget; rename one of them"
    );
    assert_eq!(run(&mut con, &["RL.PLAN.GET", "big"]), Value::Array(vec![]));
    assert_eq!(list(&mut con), ["small"]);
    // A plan falling back to a plan not made yet is fine...
    assert_eq!(
        int(
            &mut con,
            &[
                "RL.PLAN.SET",
                "pro",
                "daily",
                "fixed 5 usd/1d",
                "fallback",
                "later"
            ]
        ),
        2
    );
    // ...but making that plan with `daily` in another unit closes the bad chain.
    assert_eq!(
        err(
            &mut con,
            &["RL.PLAN.SET", "later", "daily", "fixed 100 token/1d"]
        ),
        "ERR plan 'later' field 'fallback': limit 'daily' counts usd in plan 'pro' but token \
         in its fallback 'later': one limit name is one budget; rename one of them"
    );
    assert_eq!(
        run(&mut con, &["RL.PLAN.GET", "later"]),
        Value::Array(vec![])
    );
    // Changing the unit of a limit a chain already shares is refused too.
    assert_eq!(
        int(
            &mut con,
            &["RL.PLAN.SET", "later", "daily", "fixed 9 usd/1d"]
        ),
        1
    );
    assert_eq!(
        err(
            &mut con,
            &["RL.PLAN.SET", "later", "daily", "fixed 100 token/1d"]
        ),
        "ERR plan 'later' field 'fallback': limit 'daily' counts usd in plan 'pro' but token \
         in its fallback 'later': one limit name is one budget; rename one of them"
    );
    assert_eq!(
        text(&map_of(&run(&mut con, &["RL.PLAN.GET", "later"]))["daily"]),
        "fixed 9 usd/1d",
        "the refused change left the plan as it was"
    );
    let pro = map_of(&run(&mut con, &["RL.PLAN.GET", "pro"]));
    assert_eq!(pro.len(), 2);
    assert_eq!(text(&pro["daily"]), "fixed 5 usd/1d");
    assert_eq!(list(&mut con), ["later", "pro", "small"]);
}
