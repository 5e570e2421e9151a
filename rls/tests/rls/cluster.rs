//! Redis Cluster (3 primaries, 3 replicas): a tenant's keys share one slot; a global
//! limit in another slot is decided in a separate step that never over-admits; a
//! primary's failover is ridden out by the failure mode and the promoted replica.

use crate::harness::*;
use std::time::Duration;

const CONFIG: &str = r#"
domain: c
tollgate:
  tenant_key: org
descriptors:
  - key: org
    rate_limit: {unit: hour, requests_per_unit: 50}
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 4}
  - key: global
    rate_limit: {unit: hour, requests_per_unit: 30}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_keys_share_a_slot_and_failover_is_survived() {
    let mut cluster = Cluster::start();
    let rls = Rls::start(
        &cluster.seeds(),
        CONFIG,
        &[
            "--cluster",
            "--failure-mode",
            "deny",
            "--redis-timeout-ms",
            "500",
        ],
    );
    let mut c = rls.client().await;
    let tenant = |org: &str, user: &str| {
        request(
            "c",
            vec![desc(&[("org", org)]), desc(&[("org", org), ("user", user)])],
        )
    };
    // One org: its user limit (4) rejects the 5th; the org counter holds exactly 4.
    for i in 0..6 {
        let r = ask(&mut c, tenant("acme", "u1")).await;
        assert_eq!(ok(&r), i < 4, "request {i}: {r:?}");
    }
    let check = |org: &str| request("c", vec![with_hits(desc(&[("org", org)]), 0)]);
    let r = ask(&mut c, check("acme")).await;
    assert_eq!(r.statuses[0].limit_remaining, 46);

    // Tenant and global limits live in different slots: decided in separate steps,
    // never over-admitting the global limit.
    let mut admitted = 0;
    for i in 0..40 {
        let org = format!("org{}", i % 10);
        let r = ask(
            &mut c,
            request(
                "c",
                vec![desc(&[("org", &org)]), desc(&[("global", "all")])],
            ),
        )
        .await;
        if ok(&r) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 30, "the global limit admits exactly 30");

    // Fail over the primary that holds {acme}: the service answers by its failure
    // mode meanwhile, then decides again on the promoted replica, counters intact
    // (as far as replication had carried them).
    let primary = cluster.primary_for("{acme}");
    let synced: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut cluster.nodes[primary].client())
        .unwrap();
    assert_eq!(
        synced, 1,
        "the replica has the usage before the primary dies"
    );
    cluster.nodes[primary].kill();
    cluster.wait_healthy();
    let live = cluster.nodes.iter().find(|n| n.is_alive()).unwrap();
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query(&mut live.client())
        .unwrap();
    let mut recovered = false;
    for _ in 0..400 {
        let r = ask(&mut c, check("acme")).await;
        if ok(&r) && r.statuses[0].current_limit.is_some() {
            assert!(r.statuses[0].limit_remaining <= 50);
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "decisions resume after the failover:\n{nodes}\n{}",
        rls.log()
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let r = ask(&mut c, tenant("acme", "u2")).await;
    assert!(ok(&r), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_limit_in_another_slot_never_over_admits_under_concurrency() {
    let cluster = Cluster::start();
    let rls = Rls::start(&cluster.seeds(), CONFIG, &["--cluster"]);
    let global = "rls:c:global_all";
    let org_key = |n: usize| format!("rls:{{org{n}}}:c:org_org{n}");
    // Every request spans two slots, most of them two nodes.
    let slot = |k: &str| tollgate_rls::backend::slot(k.as_bytes());
    assert!((0..10).all(|n| slot(&org_key(n)) != slot(global)));
    assert!((0..10).any(|n| cluster.primary_for(&org_key(n)) != cluster.primary_for(global)));
    let req = |n: usize| {
        request(
            "c",
            vec![
                desc(&[("org", &format!("org{n}"))]),
                desc(&[("global", "all")]),
            ],
        )
    };
    // 16 streams, 64 requests for a global limit of 30: each admission was checked
    // against both limits, each denial refunded what its other slot charged.
    let mut tasks = Vec::new();
    for t in 0..16usize {
        let mut c = rls.client().await;
        tasks.push(tokio::spawn(async move {
            let mut admitted = [0u32; 10];
            for i in 0..4 {
                let n = (t * 4 + i) % 10;
                if ok(&ask(&mut c, req(n)).await) {
                    admitted[n] += 1;
                }
            }
            admitted
        }));
    }
    let mut per_org = [0u32; 10];
    for t in tasks {
        for (n, a) in t.await.unwrap().into_iter().enumerate() {
            per_org[n] += a;
        }
    }
    let concurrent: u32 = per_org.iter().sum();
    assert!(concurrent <= 30, "over-admitted: {concurrent} > 30");
    let used = |key: &str, plan: &str| {
        usage_used(&cluster.nodes[cluster.primary_for(key)], key, plan, "rate")
    };
    assert_eq!(
        used(global, "rls:c:global"),
        i64::from(concurrent),
        "the global counter holds exactly the admissions"
    );
    for (n, &a) in per_org.iter().enumerate() {
        assert_eq!(
            used(&org_key(n), "rls:c:org"),
            i64::from(a),
            "org{n}: charged only for admitted requests (denials refunded)"
        );
    }
    // Nothing leaked: what the concurrent phase under-admitted (requests in flight
    // seeing each other's charges before their refunds) is still there to take, and
    // no more.
    let mut c = rls.client().await;
    let mut more = 0;
    while ok(&ask(&mut c, req(more as usize % 10)).await) {
        more += 1;
        assert!(concurrent + more <= 30, "over-admitted sequentially");
    }
    assert_eq!(
        concurrent + more,
        30,
        "concurrent {concurrent} + sequential {more}"
    );
    assert_eq!(used(global, "rls:c:global"), 30);
}
