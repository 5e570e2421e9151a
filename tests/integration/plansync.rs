//! Plans as a replicated registry: versions and tombstones persist (and the encoding-1
//! file of earlier builds still loads), replication and AOF replay reach the same
//! registry, and in a cluster a change made on any primary reaches every node by
//! itself — including nodes that were down or joined later — and never rolls back.

use std::path::Path;

use crate::harness::*;
use redis::Value;

/// A field of `INFO tollgate`, without its `tollgate_` prefix.
pub fn info_field(con: &mut redis::Connection, field: &str) -> String {
    let info = string(con, &["INFO", "tollgate"]);
    let prefix = format!("tollgate_{field}:");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {field} in {info}"))
        .trim()
        .to_string()
}

/// A plan's fields as `field=spec` strings, in `RL.PLAN.GET` order.
pub fn plan_fields(con: &mut redis::Connection, plan: &str) -> Vec<String> {
    let reply = run(con, &["RL.PLAN.GET", plan]);
    let pairs: Vec<(String, String)> = match reply {
        Value::Array(items) => items
            .chunks(2)
            .map(|kv| (text(&kv[0]), text(&kv[1])))
            .collect(),
        Value::Map(items) => items.iter().map(|(k, v)| (text(k), text(v))).collect(),
        other => panic!("RL.PLAN.GET {plan}: {other:?}"),
    };
    pairs.into_iter().map(|(f, v)| format!("{f}={v}")).collect()
}

pub fn plan_names(con: &mut redis::Connection) -> Vec<String> {
    match run(con, &["RL.PLAN.LIST"]) {
        Value::Array(items) => items.iter().map(text).collect(),
        other => panic!("RL.PLAN.LIST: {other:?}"),
    }
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn plans_saved_in_encoding_1_still_load_and_are_saved_again_in_encoding_2() {
    let server = Server::start_from_rdb(&fixture("plans-v1.rdb"), &[]);
    let mut con = server.client();
    assert!(
        server.log().contains("DB loaded from disk"),
        "{}",
        server.log()
    );
    let check = |con: &mut redis::Connection| {
        assert_eq!(plan_names(con), ["beta", "free", "pro"]);
        assert_eq!(
            plan_fields(con, "pro"),
            [
                "rpm=sliding 60/1m",
                "tpm=bucket 100000 token/1m",
                "fallback=free"
            ]
        );
        assert_eq!(plan_fields(con, "gone"), Vec::<String>::new());
        assert_eq!(string(con, &["RL.PLAN.DEFAULT"]), "free");
        // The digest that the server which saved the file reported.
        assert_eq!(info_field(con, "plans_digest"), "36d816f7b0d0d1bd");
    };
    check(&mut con);
    assert_eq!(info_field(&mut con, "plans_version"), "6");
    assert!(decision(&mut con, &["RL.ACQUIRE", "user:1", "*"]).allowed());
    // Saved again (now in encoding 2) and loaded back: the same plans.
    assert_eq!(string(&mut con, &["DEBUG", "RELOAD"]), "OK");
    check(&mut con);
    assert!(!server.log().contains("cannot"), "{}", server.log());
}

#[test]
fn versions_and_deletions_survive_a_reload() {
    let server = Server::start();
    let mut con = server.client();
    assert_eq!(int(&mut con, &["RL.PLAN.SET", "p", "x", "cap 1"]), 1);
    assert_eq!(int(&mut con, &["RL.PLAN.SET", "gone", "x", "cap 1"]), 1);
    assert_eq!(int(&mut con, &["RL.PLAN.DEL", "gone"]), 1);
    let version = info_field(&mut con, "plans_version");
    let digest = info_field(&mut con, "plans_digest");
    assert_eq!(string(&mut con, &["DEBUG", "RELOAD"]), "OK");
    assert_eq!(info_field(&mut con, "plans_version"), version);
    assert_eq!(info_field(&mut con, "plans_digest"), digest);
    assert_eq!(plan_names(&mut con), ["p"]);
    // The next change is newer than everything loaded.
    assert_eq!(int(&mut con, &["RL.PLAN.SET", "p", "y", "cap 2"]), 1);
    assert!(
        info_field(&mut con, "plans_version")
            .parse::<u64>()
            .unwrap()
            > version.parse().unwrap()
    );
}
