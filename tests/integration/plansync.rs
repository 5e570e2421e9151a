//! Plans as a replicated registry: versions and tombstones persist (and the encoding-1
//! file of earlier builds still loads), replication and AOF replay reach the same
//! registry, and in a cluster a change made on any primary reaches every node by
//! itself — including nodes that were down or joined later — and never rolls back.

use std::path::Path;
use std::time::{Duration, Instant};

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
    // Loaded plans take the oldest version: any change made since wins over them.
    assert_eq!(info_field(&mut con, "plans_version"), "0");
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

fn is_primary(node: &Server) -> bool {
    matches!(&run(&mut node.client(), &["ROLE"]), Value::Array(items) if text(&items[0]) == "master")
}

fn live(cluster: &Cluster) -> Vec<&Server> {
    cluster.nodes.iter().filter(|n| n.is_alive()).collect()
}

fn primaries(cluster: &Cluster) -> Vec<&Server> {
    live(cluster)
        .into_iter()
        .filter(|n| is_primary(n))
        .collect()
}

/// Polls `f` every 10 ms until it holds; panics with `what` after `ms`. Returns how long
/// it took.
fn within(ms: u64, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    let deadline = start + Duration::from_millis(ms);
    loop {
        if f() {
            return start.elapsed();
        }
        assert!(Instant::now() < deadline, "not within {ms} ms: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What a node holds, as a client sees it: every plan with its fields, and the default.
fn view(con: &mut redis::Connection) -> (Vec<(String, Vec<String>)>, String) {
    let plans = plan_names(con)
        .into_iter()
        .map(|name| {
            let fields = plan_fields(con, &name);
            (name, fields)
        })
        .collect();
    // From INFO: RL.PLAN.DEFAULT is a write command (it also sets), refused by replicas.
    let default = info_field(con, "plans_default");
    (plans, default)
}

/// The plan-sync identity of a node: both digests and the version.
fn sync_state(con: &mut redis::Connection) -> [String; 3] {
    [
        info_field(con, "plans_digest"),
        info_field(con, "plans_sync_digest"),
        info_field(con, "plans_version"),
    ]
}

/// Waits until every live node holds the same registry (versions and tombstones
/// included), then checks that they show the same plans.
fn wait_converged(cluster: &Cluster, ms: u64) {
    let nodes = live(cluster);
    let mut cons: Vec<redis::Connection> = nodes.iter().map(|n| n.client()).collect();
    within(ms, "every node to hold the same registry", || {
        let states: Vec<[String; 3]> = cons.iter_mut().map(sync_state).collect();
        states.windows(2).all(|w| w[0] == w[1])
    });
    let views: Vec<_> = cons.iter_mut().map(view).collect();
    assert!(views.windows(2).all(|w| w[0] == w[1]), "{views:#?}");
}

/// Waits until every node has a live bus link to every other one and every replica has
/// finished its first sync. A cluster reports `ok` once slots agree, which gossip can
/// settle before all links are up, and while replicas still load their primary's data:
/// a change made before then reaches those nodes only on the next summary (~1 s) or
/// once their sync completes.
fn wait_settled(cluster: &Cluster) {
    let nodes = live(cluster);
    within(
        20_000,
        "every bus link up and every replica in sync",
        || {
            nodes.iter().all(|n| {
                let mut con = n.client();
                let listing = string(&mut con, &["CLUSTER", "NODES"]);
                let links_up = listing.lines().count() == nodes.len()
                    && listing.lines().all(|l| {
                        l.contains("myself") || l.split_whitespace().nth(7) == Some("connected")
                    });
                let replication = string(&mut con, &["INFO", "replication"]);
                links_up
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up"))
            })
        },
    );
}

/// No automatic failover in these tests: on a loaded machine a debug build can miss the
/// 1.5 s node timeout, and a primary turned replica mid-test refuses plan changes.
const NO_FAILOVER: [&str; 2] = ["--cluster-replica-no-failover", "yes"];

#[test]
fn a_change_on_one_primary_reaches_all_six_nodes_within_a_second() {
    let cluster = Cluster::start_with(3, &NO_FAILOVER);
    wait_settled(&cluster);
    let ps = primaries(&cluster);
    assert_eq!(ps.len(), 3);
    let mut cons: Vec<redis::Connection> = live(&cluster).iter().map(|n| n.client()).collect();
    let everywhere = |cons: &mut Vec<redis::Connection>,
                      what: &str,
                      check: &dyn Fn(&mut redis::Connection) -> bool| {
        let took = within(1_000, what, || cons.iter_mut().all(check));
        eprintln!("{what}: on all six nodes after {took:?}");
    };
    // A new plan, from the first primary.
    let mut p0 = ps[0].client();
    assert_eq!(
        int(
            &mut p0,
            &[
                "RL.PLAN.SET",
                "gold",
                "rpm",
                "sliding 10/1m",
                "tpm",
                "bucket 100 token/1m"
            ]
        ),
        2
    );
    everywhere(&mut cons, "a new plan", &|c| {
        plan_fields(c, "gold") == ["rpm=sliding 10/1m", "tpm=bucket 100 token/1m"]
    });
    // A field changed and one added, from the second; a field removed, from the third.
    let mut p1 = ps[1].client();
    assert_eq!(
        int(
            &mut p1,
            &[
                "RL.PLAN.SET",
                "gold",
                "rpm",
                "sliding 20/1m",
                "jobs",
                "concurrency 2"
            ]
        ),
        1
    );
    everywhere(&mut cons, "a changed plan", &|c| {
        plan_fields(c, "gold")
            == [
                "rpm=sliding 20/1m",
                "tpm=bucket 100 token/1m",
                "jobs=concurrency 2",
            ]
    });
    let mut p2 = ps[2].client();
    assert_eq!(int(&mut p2, &["RL.PLAN.DEL", "gold", "tpm"]), 1);
    everywhere(&mut cons, "a removed field", &|c| {
        plan_fields(c, "gold") == ["rpm=sliding 20/1m", "jobs=concurrency 2"]
    });
    // The default plan, and a deleted plan.
    assert_eq!(
        int(&mut p2, &["RL.PLAN.SET", "silver", "rpm", "fixed 3/1d"]),
        1
    );
    assert_eq!(text(&run(&mut p2, &["RL.PLAN.DEFAULT", "silver"])), "OK");
    everywhere(&mut cons, "the default plan", &|c| {
        info_field(c, "plans_default") == "silver"
    });
    assert_eq!(int(&mut p0, &["RL.PLAN.DEL", "gold"]), 1);
    everywhere(&mut cons, "a deleted plan", &|c| {
        plan_names(c) == ["silver"]
    });
    wait_converged(&cluster, 5_000);
    let tombstones: Vec<String> = cons
        .iter_mut()
        .map(|c| info_field(c, "plans_tombstones"))
        .collect();
    assert_eq!(tombstones, ["1"; 6]);

    // What a user sees: every subject, on every shard, finds the plan.
    let seeds: Vec<String> = live(&cluster)
        .iter()
        .map(|n| format!("redis://127.0.0.1:{}", n.port))
        .collect();
    let mut con = redis::cluster::ClusterClient::new(seeds)
        .unwrap()
        .get_connection()
        .unwrap();
    for i in 0..300 {
        let reply: Value = redis::cmd("RL.ACQUIRE")
            .arg(format!("user:{i}"))
            .arg("*")
            .query(&mut con)
            .unwrap_or_else(|e| panic!("user:{i}: {e}"));
        assert!(Decision::from(&reply).allowed());
    }
    // A client cannot forge a stamped change.
    assert!(err(&mut p0, &["RL.PLAN.MERGE", "x"]).contains("internal"));
}

/// The port of the replica whose primary listens on `primary_port`.
fn replica_of(cluster: &Cluster, primary_port: u16) -> u16 {
    live(cluster)
        .into_iter()
        .find(|n| {
            matches!(&run(&mut n.client(), &["ROLE"]), Value::Array(items)
                if text(&items[0]) == "slave" && matches!(&items[2], Value::Int(p) if *p == i64::from(primary_port)))
        })
        .map(|n| n.port)
        .expect("a replica of that primary")
}

fn node(cluster: &Cluster, port: u16) -> &Server {
    cluster.nodes.iter().find(|n| n.port == port).unwrap()
}

fn restart(cluster: &mut Cluster, port: u16) {
    let i = cluster.nodes.iter().position(|n| n.port == port).unwrap();
    let server = cluster.nodes.remove(i).restart_same_port();
    cluster.nodes.insert(i, server);
}

#[test]
fn a_node_killed_during_a_series_of_changes_converges_after_restart() {
    // No automatic failover: the killed primary comes back as the primary it was and
    // must catch up over the bus; its replica, which kept running, missed the changes
    // too and gets them from it. A killed replica catches up through replication.
    let mut cluster = Cluster::start_with(3, &NO_FAILOVER);
    let ports: Vec<u16> = primaries(&cluster).iter().map(|n| n.port).collect();
    let (a, victim, c) = (ports[0], ports[1], ports[2]);
    let replica = replica_of(&cluster, c);
    let on =
        |cluster: &Cluster, port: u16, args: &[&str]| run(&mut node(cluster, port).client(), args);
    on(&cluster, a, &["RL.PLAN.SET", "p1", "x", "cap 1"]);
    on(&cluster, a, &["RL.PLAN.SET", "p2", "x", "cap 2"]);
    on(&cluster, c, &["RL.PLAN.DEFAULT", "p1"]);
    wait_converged(&cluster, 5_000);
    let i = cluster.nodes.iter().position(|n| n.port == victim).unwrap();
    cluster.nodes[i].kill9();
    let r = cluster
        .nodes
        .iter()
        .position(|n| n.port == replica)
        .unwrap();
    cluster.nodes[r].kill9();
    on(&cluster, a, &["RL.PLAN.SET", "p1", "x", "cap 10"]);
    on(&cluster, c, &["RL.PLAN.SET", "p3", "x", "cap 3"]);
    on(&cluster, a, &["RL.PLAN.DEL", "p2"]);
    on(&cluster, c, &["RL.PLAN.DEFAULT", "p3"]);
    on(
        &cluster,
        c,
        &["RL.PLAN.SET", "p4", "x", "cap 4", "fallback", "p3"],
    );
    restart(&mut cluster, victim);
    restart(&mut cluster, replica);
    // One more while they come back.
    on(&cluster, a, &["RL.PLAN.SET", "p5", "x", "cap 5"]);
    wait_converged(&cluster, 20_000);
    let mut con = node(&cluster, victim).client();
    let (plans, default) = view(&mut con);
    assert_eq!(
        plans,
        [
            ("p1".to_string(), vec!["x=cap 10".to_string()]),
            ("p3".to_string(), vec!["x=cap 3".to_string()]),
            (
                "p4".to_string(),
                vec!["x=cap 4".to_string(), "fallback=p3".to_string()]
            ),
            ("p5".to_string(), vec!["x=cap 5".to_string()]),
        ]
    );
    assert_eq!(default, "p3");
    assert!(
        info_field(&mut con, "plans_sync_applied")
            .parse::<u64>()
            .unwrap()
            >= 4,
        "the victim caught up over the bus"
    );
    assert!(
        info_field(&mut con, "plans_sync_requests")
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    // Restarted again from their AOF files with nothing in between, they hold the same.
    let before = sync_state(&mut con);
    restart(&mut cluster, victim);
    restart(&mut cluster, replica);
    assert_eq!(sync_state(&mut node(&cluster, victim).client()), before);
    assert_eq!(sync_state(&mut node(&cluster, replica).client()), before);
}

/// `redis-cli --cluster add-node` with extra arguments. Its first step, a check of the
/// cluster, fails while nodes still disagree about the configuration (briefly, on a
/// loaded machine) before it changes anything: that failure is retried.
fn add_node(new: &Server, existing: &Server, extra: &[&str]) {
    for _attempt in 0..20 {
        let out = std::process::Command::new("redis-cli")
            .args(["--cluster", "add-node"])
            .arg(format!("127.0.0.1:{}", new.port))
            .arg(format!("127.0.0.1:{}", existing.port))
            .args(extra)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            return;
        }
        assert!(
            said.contains("don't agree about configuration"),
            "add-node: {said}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("add-node: the cluster never agreed about its configuration");
}

#[test]
fn nodes_added_later_get_the_plans() {
    let mut cluster = Cluster::start_with(3, &NO_FAILOVER);
    let ps: Vec<u16> = primaries(&cluster).iter().map(|n| n.port).collect();
    let mut p0 = node(&cluster, ps[0]).client();
    run(&mut p0, &["RL.PLAN.SET", "free", "rpd", "fixed 3/1d"]);
    run(
        &mut p0,
        &[
            "RL.PLAN.SET",
            "pro",
            "rpd",
            "fixed 100/1d",
            "fallback",
            "free",
        ],
    );
    run(&mut p0, &["RL.PLAN.SET", "old", "rpd", "fixed 1/1d"]);
    run(&mut p0, &["RL.PLAN.DEL", "old"]);
    run(&mut p0, &["RL.PLAN.DEFAULT", "free"]);
    // Many plans, ~3 MB in all: more than one catch-up answer carries (1 MiB).
    let endpoints: Vec<String> = (0..45).map(|i| format!("endpoint-number-{i:03}")).collect();
    let spec = format!("fixed 1/1s for {}", endpoints.join(","));
    // In batches, as an operator's script would: one pipeline of thousands keeps a
    // debug build busy long enough, on a loaded machine, for the cluster (node timeout
    // 1.5 s) to start a failover.
    for batch in 0..30 {
        let mut pipe = redis::pipe();
        for i in batch * 100..(batch + 1) * 100 {
            pipe.cmd("RL.PLAN.SET")
                .arg(format!("tenant-{i}"))
                .arg("rpm")
                .arg(&spec)
                .ignore();
        }
        pipe.query::<()>(&mut p0).unwrap();
    }
    wait_converged(&cluster, 20_000);

    // A new primary (no slots yet) catches up over the bus.
    let new_primary = Server::start_with(&Cluster::NODE_ARGS);
    add_node(&new_primary, node(&cluster, ps[0]), &[]);
    let mut con = new_primary.client();
    let took = within(30_000, "the new primary to get the plans", || {
        sync_state(&mut con) == sync_state(&mut p0)
    });
    eprintln!("new primary has the plans after {took:?}");
    assert_eq!(view(&mut con), view(&mut p0));
    assert_eq!(plan_names(&mut con).len(), 3_002);
    assert!(
        info_field(&mut con, "plans_sync_requests")
            .parse::<u64>()
            .unwrap()
            >= 3
    );
    // A new replica gets them from its primary's full sync.
    let new_replica = Server::start_with(&Cluster::NODE_ARGS);
    // (redis-cli picks the primary with the fewest replicas: the new one.)
    add_node(&new_replica, node(&cluster, ps[0]), &["--cluster-slave"]);
    let mut con = new_replica.client();
    within(15_000, "the new replica to get the plans", || {
        sync_state(&mut con) == sync_state(&mut p0)
    });
    cluster.nodes.push(new_primary);
    cluster.nodes.push(new_replica);
    wait_converged(&cluster, 10_000);
    // And a change made on the new primary reaches all eight nodes.
    let new_primary = &cluster.nodes[6];
    run(
        &mut new_primary.client(),
        &["RL.PLAN.SET", "free", "rpd", "fixed 5/1d"],
    );
    let mut cons: Vec<redis::Connection> = live(&cluster).iter().map(|n| n.client()).collect();
    assert_eq!(cons.len(), 8);
    within(
        1_000,
        "a change from the new primary on all eight nodes",
        || {
            cons.iter_mut()
                .all(|c| plan_fields(c, "free") == ["rpd=fixed 5/1d"])
        },
    );
}

/// Every `RL.PLAN.MERGE` command in an AOF file: its bytes, in file order.
fn aof_merges(aof: &[u8]) -> Vec<Vec<u8>> {
    let head = b"*2\r\n$13\r\nRL.PLAN.MERGE\r\n$";
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(pos) = aof[at..].windows(head.len()).position(|w| w == head) {
        let start = at + pos;
        let len_at = start + head.len();
        let crlf = len_at + aof[len_at..].windows(2).position(|w| w == b"\r\n").unwrap();
        let len: usize = std::str::from_utf8(&aof[len_at..crlf])
            .unwrap()
            .parse()
            .unwrap();
        let end = crlf + 2 + len + 2;
        out.push(aof[start..end].to_vec());
        at = end;
    }
    out
}

fn incr_aof(server: &Server) -> std::path::PathBuf {
    std::fs::read_dir(server.dir.join("appendonlydir"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".incr.aof"))
        .expect("an incremental AOF file")
}

#[test]
fn a_late_or_repeated_change_replayed_from_the_aof_never_rolls_a_plan_back() {
    let server = Server::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mut con = server.client();
    assert_eq!(int(&mut con, &["RL.PLAN.SET", "p", "x", "cap 1"]), 1);
    assert_eq!(int(&mut con, &["RL.PLAN.SET", "p", "x", "cap 2"]), 0);
    assert_eq!(int(&mut con, &["RL.PLAN.SET", "q", "x", "cap 1"]), 1);
    assert_eq!(int(&mut con, &["RL.PLAN.DEL", "q"]), 1);
    let before = sync_state(&mut con);
    // The AOF holds the stamped changes, not the commands.
    let path = incr_aof(&server);
    let mut aof = std::fs::read(&path).unwrap();
    assert!(!String::from_utf8_lossy(&aof).contains("RL.PLAN.SET"));
    let merges = aof_merges(&aof);
    assert_eq!(merges.len(), 4);
    // A client cannot send one, even a genuine one.
    let genuine = {
        let m = &merges[0];
        let body_end = m.len() - 2;
        let body_start = m[..body_end]
            .windows(2)
            .rposition(|w| w == b"\r\n")
            .unwrap()
            + 2;
        m[body_start..body_end].to_vec()
    };
    let refused = redis::cmd("RL.PLAN.MERGE")
        .arg(&genuine)
        .query::<Value>(&mut con)
        .map_err(|e| error_text(&e));
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.starts_with("ERR") && e.contains("internal")),
        "{refused:?}"
    );
    // Replayed after the newer ones: the old set of p, the set of q, and p's latest again.
    for m in [&merges[0], &merges[2], &merges[1]] {
        aof.extend_from_slice(m);
    }
    let mut server = server;
    server.kill9();
    std::fs::write(&path, &aof).unwrap();
    let server = server.restart();
    let mut con = server.client();
    assert_eq!(plan_names(&mut con), ["p"]);
    assert_eq!(plan_fields(&mut con, "p"), ["x=cap 2"]);
    assert_eq!(sync_state(&mut con), before);
    assert_eq!(info_field(&mut con, "plans_sync_stale"), "3");
}

#[test]
fn replicas_and_aof_restarts_hold_the_primary_registry() {
    let primary = Server::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let early = Server::start();
    attach_replica(&primary, &early);
    let mut p = primary.client();
    run(&mut p, &["RL.PLAN.SET", "a", "x", "cap 1"]);
    run(
        &mut p,
        &[
            "RL.PLAN.SET",
            "b",
            "x",
            "cap 2",
            "y",
            "cap 3",
            "fallback",
            "a",
        ],
    );
    run(&mut p, &["RL.PLAN.DEFAULT", "a"]);
    run(&mut p, &["RL.PLAN.DEL", "b", "y"]);
    run(&mut p, &["RL.PLAN.SET", "c", "x", "cap 1"]);
    run(&mut p, &["RL.PLAN.DEL", "c"]);
    // One replica followed the stream, another gets a full sync now.
    let late = Server::start();
    attach_replica(&primary, &late);
    wait_in_sync(&primary, &early);
    wait_in_sync(&primary, &late);
    let want = (sync_state(&mut p), view(&mut p));
    assert_eq!(info_field(&mut p, "plans_tombstones"), "1");
    for replica in [&early, &late] {
        let mut r = replica.client();
        assert_eq!((sync_state(&mut r), view(&mut r)), want);
    }
    let mut primary = primary;
    primary.kill9();
    let primary = primary.restart();
    let mut p = primary.client();
    assert_eq!((sync_state(&mut p), view(&mut p)), want);
}
