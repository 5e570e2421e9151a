//! `RL.THROTTLE`: a drop-in for redis-cell's `CL.THROTTLE`.

use crate::harness::*;
use redis::Value;

fn throttle(con: &mut redis::Connection, args: &[&str]) -> Vec<i64> {
    let mut full = vec!["RL.THROTTLE"];
    full.extend_from_slice(args);
    match run(con, &full) {
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::Int(n) => *n,
                other => panic!("non-integer {other:?}"),
            })
            .collect(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn answers_like_redis_cell() {
    let server = Server::start();
    let mut con = server.client();
    // redis-cell's README: 15 max burst, 30 per 60 s.
    assert_eq!(
        throttle(&mut con, &["user123", "15", "30", "60"]),
        [0, 16, 15, -1, 2]
    );
    for i in 0..15 {
        assert_eq!(
            throttle(&mut con, &["user123", "15", "30", "60"])[..3],
            [0, 16, 14 - i]
        );
    }
    let limited = throttle(&mut con, &["user123", "15", "30", "60"]);
    assert_eq!(limited[..3], [1, 16, 0]);
    assert_eq!(limited[3], 2, "retry after one 2 s interval, rounded up");
    assert_eq!(limited[4], 32);
    // More than the burst can never pass.
    assert_eq!(
        throttle(&mut con, &["other", "15", "30", "60", "17"]),
        [1, 16, 16, -1, 0]
    );
    // Quantity 0 peeks.
    assert_eq!(
        throttle(&mut con, &["other", "15", "30", "60", "0"]),
        [0, 16, 16, -1, 0]
    );
}

#[test]
fn refuses_what_redis_cell_would_crash_or_wrap_on() {
    let server = Server::start();
    let mut con = server.client();
    for (args, expected) in [
        (
            vec!["RL.THROTTLE", "k", "-1", "30", "60"],
            "ERR max_burst must be a non-negative integer, got '-1'",
        ),
        (
            vec!["RL.THROTTLE", "k", "1", "0", "60"],
            "ERR count must be at least 1",
        ),
        (
            vec!["RL.THROTTLE", "k", "1", "1", "0"],
            "ERR period must be between 1 and 315360000 seconds",
        ),
        (
            vec!["RL.THROTTLE", "k", "18446744073709551615", "1", "1"],
            "ERR max_burst is larger than 18446744073709551614",
        ),
        (
            vec!["RL.THROTTLE", "k", "1", "1", "1", "x"],
            "ERR quantity must be a non-negative integer, got 'x'",
        ),
    ] {
        assert_eq!(err(&mut con, &args), expected);
    }
    assert!(err(&mut con, &["RL.THROTTLE", "k", "1", "1"]).contains("wrong number of arguments"));
    assert_eq!(int(&mut con, &["EXISTS", "k"]), 0);
}
