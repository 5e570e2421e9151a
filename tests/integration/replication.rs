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
fn rl_apply_rejects_garbage_and_changes_nothing() {
    let server = Server::start();
    let mut con = server.client();
    assert!(
        err(&mut con, &["RL.APPLY", "k", "garbage"]).starts_with("ERR invalid RL.APPLY payload")
    );
    assert!(err(&mut con, &["RL.APPLY", "k", ""]).starts_with("ERR invalid RL.APPLY payload"));
    assert_eq!(int(&mut con, &["EXISTS", "k"]), 0);
}
