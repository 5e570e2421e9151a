//! A real 3-primary / 3-replica Redis Cluster: plans on every node through the CLI
//! (applied on one primary, propagated to the others), routing, failover and
//! resharding. Plan propagation itself is tested in `plansync`.

use std::process::Command;

use crate::harness::*;
use redis::Value;

const PLANS: &str = r#"{
  "default": "free",
  "plans": {
    "free": { "rpd": "fixed 3/1d", "tpm": "bucket 1000 token/1m" },
    "pro":  { "rpd": "fixed 100/1d", "fallback": "free" }
  }
}"#;

fn apply_plans(cluster: &Cluster) {
    let file = cluster.nodes[0].dir.join("plans.json");
    std::fs::write(&file, PLANS).unwrap();
    let (code, out, err) = cli(&[
        "--cluster",
        "--url",
        &cluster.seed_url(),
        "plans",
        "apply",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("6 nodes report plan-set digest"), "{out}");
    // Applied on one primary, the plans reached the two others by themselves.
    assert_eq!(out.matches("up to date (propagated)").count(), 2, "{out}");
}

fn cluster_connection(cluster: &Cluster) -> redis::cluster::ClusterConnection {
    let seeds: Vec<String> = cluster
        .nodes
        .iter()
        .filter(|n| n.is_alive())
        .map(|n| format!("redis://127.0.0.1:{}", n.port))
        .collect();
    redis::cluster::ClusterClient::new(seeds)
        .unwrap()
        .get_connection()
        .unwrap()
}

fn cdecision(con: &mut redis::cluster::ClusterConnection, args: &[&str]) -> Decision {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    Decision::from(
        &cmd.query::<Value>(con)
            .unwrap_or_else(|e| panic!("{args:?}: {e}")),
    )
}

#[test]
fn a_cluster_gets_plans_everywhere_routes_calls_survives_failover_and_resharding() {
    let cluster = Cluster::start(3);
    apply_plans(&cluster);
    // Every node, replicas included, holds the plans.
    let digests: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| {
            let info = string(&mut n.client(), &["INFO", "tollgate"]);
            info.lines()
                .find_map(|l| l.strip_prefix("tollgate_plans_digest:"))
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");

    // 1,000 subjects over all slots, through a cluster-aware client: exactly 3 each.
    let mut con = cluster_connection(&cluster);
    let mut admitted = 0;
    for i in 0..1_000 {
        let key = format!("subject:{i}");
        for _ in 0..4 {
            admitted += usize::from(cdecision(&mut con, &["RL.ACQUIRE", &key, "free"]).allowed());
        }
    }
    assert_eq!(admitted, 3_000);

    // A node that does not serve the slot redirects, from the command's key metadata.
    let key = "subject:7";
    let owner = cluster.primary_for(key);
    let other = cluster.nodes.iter().find(|n| n.port != owner.port).unwrap();
    let slot = int(&mut other.client(), &["CLUSTER", "KEYSLOT", key]);
    let moved = err(&mut other.client(), &["RL.ACQUIRE", key, "free"]);
    assert!(moved.starts_with(&format!("MOVED {slot} ")), "{moved}");
    assert!(moved.ends_with(&format!(":{}", owner.port)), "{moved}");
    let keys = run(
        &mut other.client(),
        &[
            "COMMAND",
            "GETKEYS",
            "RL.ACQUIRE",
            key,
            "free",
            "CREDITS",
            "{x}c",
            "1",
        ],
    );
    // Only the first key is declared: it routes the call (the module checks the
    // CREDITS key shares its slot).
    assert_eq!(keys, Value::Array(vec![Value::BulkString(key.into())]));

    // Resharding with redis-cli: it moves the source's lowest slots; put a subject
    // and a credits key (one hash tag, one slot) among them.
    let source = cluster.primary_for("subject:1");
    let source_id = string(&mut source.client(), &["CLUSTER", "MYID"]);
    let first_slot = {
        let nodes = string(&mut source.client(), &["CLUSTER", "NODES"]);
        let me = nodes
            .lines()
            .find(|l| l.contains("myself"))
            .unwrap()
            .to_string();
        me.split_whitespace()
            .nth(8)
            .unwrap()
            .split('-')
            .next()
            .unwrap()
            .parse::<i64>()
            .unwrap()
    };
    let tag = (0..100_000)
        .map(|i| format!("tenant:{i}"))
        .find(|t| {
            let slot = int(&mut source.client(), &["CLUSTER", "KEYSLOT", t]);
            (first_slot..first_slot + 100).contains(&slot)
        })
        .unwrap();
    let subject = format!("{{{tag}}}:rl");
    let credits = format!("{{{tag}}}:credits");
    for _ in 0..2 {
        assert!(cdecision(
            &mut con,
            &[
                "RL.ACQUIRE",
                &subject,
                "pro",
                "1",
                "COST",
                "token",
                "50",
                "ID",
                &format!("r{}", next_request_id())
            ]
        )
        .allowed());
    }
    redis::cmd("RL.CREDITS.GRANT")
        .arg(&credits)
        .arg(500)
        .query::<i64>(&mut con)
        .unwrap();
    let before = cdecision(&mut con, &["RL.PEEK", &subject, "pro", "0"]);
    let target = cluster
        .nodes
        .iter()
        .find(|n| {
            n.port != source.port
                && matches!(&run(&mut n.client(), &["ROLE"]), Value::Array(items) if text(&items[0]) == "master")
        })
        .unwrap();
    let target_id = string(&mut target.client(), &["CLUSTER", "MYID"]);
    let out = Command::new("redis-cli")
        .args([
            "--cluster",
            "reshard",
            &format!("127.0.0.1:{}", source.port),
        ])
        .args([
            "--cluster-from",
            &source_id,
            "--cluster-to",
            &target_id,
            "--cluster-slots",
            "100",
            "--cluster-yes",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "reshard: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    cluster.wait_healthy(3);
    let mut con = cluster_connection(&cluster);
    assert_eq!(
        cluster.primary_for(&subject).port,
        target.port,
        "the slot moved"
    );
    let after = cdecision(&mut con, &["RL.PEEK", &subject, "pro", "0"]);
    assert_eq!(after.remaining("rpd"), before.remaining("rpd"));
    assert_eq!(
        redis::cmd("RL.CREDITS.BALANCE")
            .arg(&credits)
            .query::<i64>(&mut con)
            .unwrap(),
        500
    );
    assert_eq!(
        redis::cmd("TYPE")
            .arg(&subject)
            .query::<String>(&mut con)
            .unwrap(),
        "rlsubject"
    );
    assert!(
        redis::cmd("PTTL")
            .arg(&subject)
            .query::<i64>(&mut con)
            .unwrap()
            > 0
    );

    // Failover: kill a primary; its replica takes over with the usage it replicated.
    let victim_key = "subject:42";
    let before = cdecision(&mut con, &["RL.PEEK", victim_key, "free", "0"]);
    let victim = cluster.primary_for(victim_key);
    let victim_index = cluster.index_of(victim);
    // Usage reaches the replica asynchronously: wait for the replica to have it.
    assert_eq!(int(&mut victim.client(), &["WAIT", "1", "5000"]), 1);
    let replica_of_victim: Vec<u16> = {
        let victim_id = string(&mut victim.client(), &["CLUSTER", "MYID"]);
        let nodes = string(&mut victim.client(), &["CLUSTER", "NODES"]);
        nodes
            .lines()
            .filter(|l| l.split_whitespace().nth(3) == Some(victim_id.as_str()))
            .filter_map(|l| {
                l.split_whitespace()
                    .nth(1)?
                    .split('@')
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    assert_eq!(replica_of_victim.len(), 1);
    let mut cluster = cluster;
    cluster.nodes[victim_index].kill9();
    let promoted = cluster
        .nodes
        .iter()
        .find(|n| n.port == replica_of_victim[0])
        .unwrap();
    wait_until(
        30,
        "the replica to be promoted",
        || matches!(&run(&mut promoted.client(), &["ROLE"]), Value::Array(items) if text(&items[0]) == "master"),
    );
    cluster.wait_healthy(3);
    let mut con = cluster_connection(&cluster);
    let after = cdecision(&mut con, &["RL.PEEK", victim_key, "free", "0"]);
    assert_eq!(after.remaining("rpd"), before.remaining("rpd"));
    assert!(
        !cdecision(&mut con, &["RL.ACQUIRE", victim_key, "free"]).allowed(),
        "still 3 a day after failover"
    );
}

/// A distinct request id per call within one test run.
fn next_request_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
