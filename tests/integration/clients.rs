//! The `redis` crate as applications use it (docs/clients.md): its cluster
//! connections, sync and async, route every keyed `RL.*` call by argument 1, so a
//! stream of 100 application calls costs exactly 100 commands on a 3+3 cluster —
//! no `MOVED`, no `COMMAND GETKEYS`, nothing else (counted with `INFO commandstats`
//! and `INFO errorstats` on every node) — and `WAIT` needs an async connection of its
//! own. The Rust snippets of docs/clients.md are checked to be in this file verbatim.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::harness::*;
use redis::Value;

/// The plan the call stream uses: large enough never to deny.
const CLIENTS_PLAN: [&str; 6] = [
    "rpm",
    "fixed 1000000/1m",
    "tpm",
    "fixed 100000000 token/1m",
    "jobs",
    "concurrency 10000 ttl 60s",
];

fn set_plan_everywhere(nodes: &[&Server], plan: &str, fields: &[&str]) {
    let mut args = vec!["RL.PLAN.SET", plan];
    args.extend_from_slice(fields);
    let first = nodes
        .iter()
        .find(|n| {
            let role = run(&mut n.client(), &["ROLE"]);
            matches!(&role, Value::Array(items) if text(&items[0]) == "master")
        })
        .expect("a primary");
    int(&mut first.client(), &args);
    // In a cluster the plan reaches every node by itself.
    wait_until(5, "the plan on every node", || {
        nodes.iter().all(|n| {
            let got = map_of(&run(&mut n.client(), &["RL.PLAN.GET", plan]));
            got.len() * 2 == fields.len()
        })
    });
}

/// (args, what to check) for ten calls on each of ten subjects: every command an
/// application sends, the credits ones included.
fn call_stream(tag: &str) -> Vec<Vec<String>> {
    let mut calls = Vec::new();
    for i in 0..10 {
        let user = format!("{{{tag}:{i}}}:user");
        let credits = format!("{{{tag}:{i}}}:credits");
        let thr = format!("{{{tag}:{i}}}:thr");
        let raw: [&[&str]; 10] = [
            &[
                "RL.ACQUIRE",
                &user,
                "clients",
                "COST",
                "token",
                "100",
                "ID",
                "r",
                "CREDITS",
                &credits,
                "2",
            ],
            &["RL.PEEK", &user, "clients"],
            &["RL.USAGE", &user, "clients"],
            &["RL.TOUCH", &user, "r", "30000"],
            &["RL.RELEASE", &user, "r", "COST", "token", "60"],
            &["RL.THROTTLE", &thr, "10", "100", "60"],
            &["RL.CREDITS.DEDUCT", &credits, "3", "ID", "d"],
            &["RL.CREDITS.REFUND", &credits, "d"],
            &["RL.CREDITS.BALANCE", &credits],
            &["RL.CREDITS.BLOCKS", &credits],
        ];
        calls.extend(
            raw.iter()
                .map(|args| args.iter().map(|a| a.to_string()).collect()),
        );
    }
    calls
}

/// Before counting: credits granted, each subject created by a call settled at once
/// (the first `ACQUIRE ... CREDITS` on a new subject costs the node an internal
/// `CLUSTER NODES`), and 40 keyed calls that open a connection to every primary.
fn setup_calls(tag: &str) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    for i in 0..10 {
        let user = format!("{{{tag}:{i}}}:user");
        let credits = format!("{{{tag}:{i}}}:credits");
        out.push(vec!["RL.CREDITS.GRANT".into(), credits, "100".into()]);
        out.push(
            ["RL.ACQUIRE", &user, "clients", "ID", "setup"]
                .map(String::from)
                .to_vec(),
        );
        out.push(["RL.RELEASE", &user, "setup"].map(String::from).to_vec());
    }
    for n in 0..40 {
        out.push(vec![
            "RL.PEEK".into(),
            format!("warm:{n}"),
            "clients".into(),
        ]);
    }
    out
}

fn command(args: &[String]) -> redis::Cmd {
    let mut cmd = redis::cmd(&args[0]);
    for a in &args[1..] {
        cmd.arg(a);
    }
    cmd
}

/// Checks the replies of `call_stream`.
fn check_replies(calls: &[Vec<String>], replies: &[Value]) {
    assert_eq!(calls.len(), replies.len());
    for (args, reply) in calls.iter().zip(replies) {
        let ok = match args[0].as_str() {
            "RL.ACQUIRE" | "RL.PEEK" => Decision::from(reply).allowed(),
            "RL.RELEASE" => map_of(reply)["released"] == Value::Int(1),
            "RL.TOUCH" => *reply == Value::Int(1),
            "RL.CREDITS.BALANCE" => *reply == Value::Int(98),
            "RL.CREDITS.REFUND" => *reply == Value::Array(vec![Value::Int(3), Value::Int(98)]),
            _ => true,
        };
        assert!(ok, "{args:?}: {reply:?}");
    }
}

/// What the nodes ran for clients: `INFO commandstats` (calls + rejected calls) and
/// `INFO errorstats` of every node, less replication traffic and the measuring
/// connection's own commands.
struct Traffic {
    connections: Vec<(redis::Connection, bool)>,
}

impl Traffic {
    fn new(nodes: &[&Server]) -> Traffic {
        let connections = nodes
            .iter()
            .map(|n| {
                let mut con = n.client();
                let role = run(&mut con, &["ROLE"]);
                let replica = !matches!(&role, Value::Array(items) if text(&items[0]) == "master");
                (con, replica)
            })
            .collect();
        Traffic { connections }
    }

    fn reset(&mut self) {
        for (con, _) in &mut self.connections {
            assert_eq!(string(con, &["CONFIG", "RESETSTAT"]), "OK");
        }
    }

    fn read(&mut self) -> BTreeMap<String, i64> {
        let mut seen = BTreeMap::new();
        for (con, replica) in &mut self.connections {
            for line in string(con, &["INFO", "commandstats"]).lines() {
                let Some((name, stats)) = line
                    .strip_prefix("cmdstat_")
                    .and_then(|l| l.split_once(':'))
                else {
                    continue;
                };
                let skip = ["info", "config|resetstat", "replconf", "role"].contains(&name)
                    || name == "rl.apply"
                    || name == "rl.plan.merge"
                    || (*replica && !name.starts_with("rl.") && !name.starts_with("cluster"));
                if skip {
                    continue;
                }
                let field = |f: &str| -> i64 {
                    stats
                        .split(',')
                        .find_map(|kv| kv.strip_prefix(&format!("{f}=")))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                };
                *seen.entry(name.to_string()).or_insert(0) +=
                    field("calls") + field("rejected_calls");
            }
            for line in string(con, &["INFO", "errorstats"]).lines() {
                if let Some((name, stats)) = line.split_once(':') {
                    if name.starts_with("errorstat_") {
                        let count: i64 = stats
                            .strip_prefix("count=")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        *seen.entry(name.to_string()).or_insert(0) += count;
                    }
                }
            }
        }
        seen
    }
}

fn expected_commands() -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for args in call_stream("x") {
        *out.entry(args[0].to_lowercase()).or_insert(0) += 1;
    }
    out
}

fn start_cluster() -> Cluster {
    let cluster = Cluster::start(3);
    let nodes: Vec<&Server> = cluster.nodes.iter().collect();
    set_plan_everywhere(&nodes, "clients", &CLIENTS_PLAN);
    set_plan_everywhere(&nodes, "gate", &["jobs", "concurrency 1 ttl 60s"]);
    cluster
}

#[test]
fn a_sync_cluster_connection_sends_each_call_to_its_node_in_one_round_trip() {
    let cluster = start_cluster();
    let nodes: Vec<&Server> = cluster.nodes.iter().collect();
    let client = redis::cluster::ClusterClient::new(vec![cluster.seed_url()]).unwrap();
    let mut con = client.get_connection().unwrap();
    for args in setup_calls("sync") {
        command(&args).query::<Value>(&mut con).unwrap();
    }
    let calls = call_stream("sync");
    let mut traffic = Traffic::new(&nodes);
    traffic.reset();
    let replies: Vec<Value> = calls
        .iter()
        .map(|args| command(args).query(&mut con).unwrap())
        .collect();
    let seen = traffic.read();
    check_replies(&calls, &replies);
    assert_eq!(seen, expected_commands(), "{seen:?}");
}

#[test]
fn an_async_cluster_connection_routes_in_one_round_trip_and_wait_needs_its_own_connection() {
    let cluster = start_cluster();
    let nodes: Vec<&Server> = cluster.nodes.iter().collect();
    let mut traffic = Traffic::new(&nodes);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (calls, replies, seen) = runtime.block_on(async {
        let client = redis::cluster::ClusterClient::new(vec![cluster.seed_url()]).unwrap();
        let mut con = client.get_async_connection().await.unwrap();
        for args in setup_calls("async") {
            command(&args).query_async::<Value>(&mut con).await.unwrap();
        }
        let calls = call_stream("async");
        traffic.reset();
        let mut replies = Vec::new();
        for args in &calls {
            replies.push(command(args).query_async::<Value>(&mut con).await.unwrap());
        }
        let seen = traffic.read();

        // WAIT: on the shared connection (or a clone) it holds the later calls to
        // that node; on a connection of its own (get_async_connection) it does not.
        let holder = cluster.primary_for("{w}:a");
        for own in [false, true] {
            hold(holder, "{w}:a");
            let mut waiting = if own {
                client.get_async_connection().await.unwrap()
            } else {
                con.clone()
            };
            let waiter = async move {
                redis::cmd("RL.ACQUIRE")
                    .arg("{w}:a")
                    .arg("gate")
                    .arg("WAIT")
                    .arg(2000)
                    .query_async::<Value>(&mut waiting)
                    .await
                    .unwrap()
            };
            let unrelated = async {
                tokio::time::sleep(Duration::from_millis(150)).await;
                let started = Instant::now();
                redis::cmd("RL.PEEK")
                    .arg("{w}:b")
                    .arg("clients")
                    .query_async::<Value>(&mut con)
                    .await
                    .unwrap();
                let elapsed = started.elapsed();
                release(holder, "{w}:a");
                elapsed
            };
            let (waited, elapsed) = tokio::join!(waiter, unrelated);
            if own {
                assert!(elapsed < Duration::from_millis(1000), "{elapsed:?}");
                let reply = Decision::from(&waited);
                assert!(reply.allowed());
                let id = reply.str("id").unwrap();
                run(&mut holder.client(), &["RL.RELEASE", "{w}:a", &id]);
            } else {
                assert!(elapsed >= Duration::from_millis(1500), "{elapsed:?}");
                assert!(!Decision::from(&waited).allowed());
            }
        }
        (calls, replies, seen)
    });
    check_replies(&calls, &replies);
    assert_eq!(seen, expected_commands(), "{seen:?}");
}

/// docs/clients.md, `rust-cluster`, verbatim.
fn docs_cluster_snippet(url: &str) -> redis::RedisResult<(Value, u64)> {
    // url: a node's address, e.g. "redis://127.0.0.1:7100/"
    let client = redis::cluster::ClusterClient::new(vec![url])?;
    let mut con = client.get_connection()?;
    let reply: redis::Value = redis::cmd("RL.ACQUIRE")
        .arg("{acct:45}:user")
        .arg("pro")
        .arg("ID")
        .arg("chat-1")
        .query(&mut con)?;
    let balance: u64 = redis::cmd("RL.CREDITS.BALANCE")
        .arg("{acct:45}:credits")
        .query(&mut con)?;
    Ok((reply, balance))
}

/// docs/clients.md, `rust-wait`, verbatim inside a function.
async fn acquire_waiting(
    client: &redis::Client,
    key: &str,
    plan: &str,
    wait_ms: u64,
) -> redis::RedisResult<Value> {
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(std::time::Duration::from_millis(wait_ms + 1000)));
    let mut own = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let reply: redis::Value = redis::cmd("RL.ACQUIRE")
        .arg(key)
        .arg(plan)
        .arg("WAIT")
        .arg(wait_ms)
        .query_async(&mut own)
        .await?;
    Ok(reply)
}

/// Asserts that the code block after `<!-- test: name -->` in docs/clients.md is in
/// this file, line for line (indentation aside).
fn assert_snippet_is_in_this_file(name: &str) {
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/clients.md"),
    )
    .unwrap();
    let marker = format!("<!-- test: {name} -->\n```rust\n");
    let start = docs
        .find(&marker)
        .unwrap_or_else(|| panic!("no snippet {name}"))
        + marker.len();
    let end = start + docs[start..].find("```").unwrap();
    let snippet: Vec<&str> = docs[start..end].lines().map(str::trim).collect();
    let this: Vec<&str> = include_str!("clients.rs").lines().map(str::trim).collect();
    assert!(
        this.windows(snippet.len()).any(|w| w == snippet.as_slice()),
        "docs/clients.md snippet {name} is not in tests/integration/clients.rs:\n{}",
        snippet.join("\n")
    );
}

#[test]
fn the_docs_rust_snippets_are_the_ones_tested_here() {
    assert_snippet_is_in_this_file("rust-cluster");
    assert_snippet_is_in_this_file("rust-wait");
}

#[test]
fn the_docs_cluster_snippet_routes_by_the_first_key() {
    let cluster = Cluster::start(3);
    let plans = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/plans.json");
    let (code, out, err) = cli(&[
        "--url",
        &cluster.seed_url(),
        "--cluster",
        "plans",
        "apply",
        plans.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let nodes: Vec<&Server> = cluster.nodes.iter().collect();
    let mut traffic = Traffic::new(&nodes);
    traffic.reset();
    let (reply, balance) = docs_cluster_snippet(&cluster.seed_url()).unwrap();
    let seen = traffic.read();
    assert!(Decision::from(&reply).allowed());
    assert_eq!(balance, 0);
    assert_eq!(seen.get("rl.acquire"), Some(&1), "{seen:?}");
    assert_eq!(seen.get("rl.credits.balance"), Some(&1), "{seen:?}");
    assert!(!seen
        .keys()
        .any(|k| k == "errorstat_MOVED" || k == "command|getkeys"));
}

/// Holds the one lease of `gate` on `key` with a plain connection.
fn hold(server: &Server, key: &str) {
    let d = decision(
        &mut server.client(),
        &["RL.ACQUIRE", key, "gate", "ID", "holder"],
    );
    assert!(d.allowed());
}

fn release(server: &Server, key: &str) {
    run(&mut server.client(), &["RL.RELEASE", key, "holder"]);
}

#[test]
fn wait_on_a_shared_multiplexed_connection_holds_other_calls_and_on_its_own_it_does_not() {
    let server = Server::start();
    set_plan_everywhere(&[&server], "gate", &["jobs", "concurrency 1 ttl 60s"]);
    set_plan_everywhere(&[&server], "clients", &CLIENTS_PLAN);
    let client = redis::Client::open(format!("redis://127.0.0.1:{}/", server.port)).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // The multiplexed connection's default response timeout (500 ms) fails a
        // longer WAIT.
        hold(&server, "w:default");
        let mut default = client.get_multiplexed_async_connection().await.unwrap();
        let e = redis::cmd("RL.ACQUIRE")
            .arg("w:default")
            .arg("gate")
            .arg("WAIT")
            .arg(2000)
            .query_async::<Value>(&mut default)
            .await
            .unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        release(&server, "w:default");

        // Without a timeout, a WAIT on a shared connection holds every later call on it.
        hold(&server, "w:shared");
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let mut shared = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap();
        let mut clone = shared.clone();
        let waiter = async move {
            redis::cmd("RL.ACQUIRE")
                .arg("w:shared")
                .arg("gate")
                .arg("WAIT")
                .arg(2000)
                .query_async::<Value>(&mut clone)
                .await
        };
        let unrelated = async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let started = Instant::now();
            redis::cmd("RL.PEEK")
                .arg("w:other")
                .arg("clients")
                .query_async::<Value>(&mut shared)
                .await
                .unwrap();
            started.elapsed()
        };
        let (waited, elapsed) = tokio::join!(waiter, unrelated);
        assert!(elapsed >= Duration::from_millis(1500), "{elapsed:?}");
        assert!(!Decision::from(&waited.unwrap()).allowed());
        release(&server, "w:shared");

        // The docs' way: the WAIT on its own connection; the shared one stays free.
        hold(&server, "w:own");
        let waiter = acquire_waiting(&client, "w:own", "gate", 2000);
        let unrelated = async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let started = Instant::now();
            redis::cmd("RL.PEEK")
                .arg("w:other")
                .arg("clients")
                .query_async::<Value>(&mut shared)
                .await
                .unwrap();
            let elapsed = started.elapsed();
            release(&server, "w:own");
            elapsed
        };
        let (waited, elapsed) = tokio::join!(waiter, unrelated);
        assert!(elapsed < Duration::from_millis(1000), "{elapsed:?}");
        assert!(Decision::from(&waited.unwrap()).allowed());
    });
}
