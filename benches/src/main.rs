//! `make bench`: the end-to-end benchmark driver.
//!
//! Starts its own redis-server with the release module on a free loopback port, then
//! reports, from one run:
//! - server-side cost (`usec_per_call` from `INFO commandstats`) of each scenario and
//!   of `INCR`, and their ratio;
//! - `redis-benchmark` throughput of each scenario with `-P 1` and `-P 16` over
//!   100,000 random subjects;
//! - memory per active subject (`used_memory` delta / subjects).
//!
//! Speed targets live here, never in tests: the figures vary with the machine.

// A benchmark driver, not module code: stopping loudly on any failure is the point.
#![allow(
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SUBJECTS: u64 = 100_000;

struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_server(module: &str) -> Server {
    start_node(module, &[])
}

fn start_node(module: &str, extra: &[&str]) -> Server {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"));
    let dir = std::env::temp_dir().join(format!("tollgate-bench-{}-{port}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&dir)
        .args(extra)
        .args(["--loadmodule", module])
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start redis-server: {e}"));
    let server = Server { child, port, dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if connect(port).is_ok() {
            return server;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("redis-server did not start");
}

fn connect(port: u16) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))?.get_connection()
}

fn cmd(con: &mut redis::Connection, args: &[&str]) -> redis::Value {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query(con).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn info(con: &mut redis::Connection, section: &str) -> String {
    match cmd(con, &["INFO", section]) {
        redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        redis::Value::VerbatimString { text, .. } => text,
        other => panic!("INFO gave {other:?}"),
    }
}

fn info_field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
}

/// `usec_per_call` of `command` since the last `CONFIG RESETSTAT`.
fn usec_per_call(con: &mut redis::Connection, command: &str) -> f64 {
    let stats = info(con, "commandstats");
    let line = info_field(&stats, &format!("cmdstat_{command}:")).unwrap_or_default();
    line.split(',')
        .find_map(|kv| kv.strip_prefix("usec_per_call="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Requests per second `redis-benchmark` reports for `args` (CSV output), with
/// `__rand_int__` drawn from the random subjects.
fn throughput(port: u16, pipeline: u32, requests: u64, args: &[&str]) -> f64 {
    throughput_over(port, pipeline, requests, SUBJECTS, args)
}

/// Like [`throughput`], with `__rand_int__` drawn from `0..range`.
fn throughput_over(port: u16, pipeline: u32, requests: u64, range: u64, args: &[&str]) -> f64 {
    let output = Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-c",
            "50",
            "--csv",
            "-r",
            &range.to_string(),
        ])
        .args(["-n", &requests.to_string(), "-P", &pipeline.to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-benchmark: {e}"));
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .filter(|l| !l.starts_with("\"test\""))
        .find_map(|l| {
            l.split(',')
                .nth(1)
                .map(|v| v.trim_matches('"').parse::<f64>().unwrap_or(f64::NAN))
        })
        .unwrap_or(f64::NAN)
}

struct Scenario {
    name: &'static str,
    /// The command as `redis-benchmark` sends it (`__rand_int__` picks a subject).
    args: Vec<&'static str>,
    /// The `cmdstat_` name its server-side cost is read from.
    stat: &'static str,
    /// Whether to measure memory per subject.
    memory: bool,
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let cluster_mode = args.first().is_some_and(|a| a == "cluster");
    if cluster_mode {
        args.remove(0);
    }
    let module = args
        .first()
        .cloned()
        .unwrap_or_else(|| "target/release/libtollgate.so".to_string());
    // redis-server changes into --dir before loading modules: pass an absolute path.
    let module = std::fs::canonicalize(&module)
        .unwrap_or_else(|e| panic!("module {module}: {e} (run `make release` first)"))
        .display()
        .to_string();
    if cluster_mode {
        cluster_bench(&module);
        return;
    }
    let server = start_server(&module);
    let port = server.port;
    let mut con = connect(port).unwrap_or_else(|e| panic!("{e}"));
    for (plan, fields) in [
        ("one", vec!["rpm", "sliding 100000000/1m"]),
        (
            "three",
            vec![
                "rpm",
                "sliding 100000000/1m",
                "rpd",
                "fixed 1000000000/1d",
                "tpm",
                "bucket 1000000000 token/1m",
            ],
        ),
    ] {
        let mut args = vec!["RL.PLAN.SET", plan];
        args.extend(fields);
        cmd(&mut con, &args);
    }
    let scenarios = [
        Scenario {
            name: "INCR",
            args: vec!["INCR", "counter:__rand_int__"],
            stat: "incr",
            memory: false,
        },
        Scenario {
            name: "SET EX (reference: any key with a TTL)",
            args: vec!["SET", "plain:__rand_int__", "1", "EX", "3600"],
            stat: "set",
            memory: true,
        },
        Scenario {
            name: "RL.ACQUIRE, 1 limit (sliding)",
            args: vec!["RL.ACQUIRE", "one:__rand_int__", "one"],
            stat: "rl.acquire",
            memory: true,
        },
        Scenario {
            name: "RL.ACQUIRE, 3 limits (sliding+fixed+bucket)",
            args: vec![
                "RL.ACQUIRE",
                "three:__rand_int__",
                "three",
                "1",
                "COST",
                "token",
                "100",
            ],
            stat: "rl.acquire",
            memory: true,
        },
    ];
    let requests: u64 = std::env::var("TOLLGATE_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    println!(
        "Tollgate end-to-end bench: redis-server {}, module {module}",
        redis_version(&mut con)
    );
    println!("{requests} requests per run, 50 clients, {SUBJECTS} random subjects\n");
    let mut costs = Vec::new();
    for s in &scenarios {
        cmd(&mut con, &["FLUSHALL"]);
        cmd(&mut con, &["CONFIG", "RESETSTAT"]);
        let p1 = throughput(port, 1, requests, &s.args);
        let usec = usec_per_call(&mut con, s.stat);
        let p16 = throughput(port, 16, requests * 3, &s.args);
        let bytes = if s.memory {
            Some(bytes_per_subject(&mut con, &s.args))
        } else {
            None
        };
        costs.push((s.name, usec, p1, p16, bytes));
    }
    let incr = costs.first().map_or(f64::NAN, |c| c.1);
    let incr_p1 = costs.first().map_or(f64::NAN, |c| c.2);
    let incr_p16 = costs.first().map_or(f64::NAN, |c| c.3);
    println!(
        "{:<46} {:>9} {:>7} {:>12} {:>7} {:>12} {:>7} {:>10}",
        "scenario", "usec/call", "x INCR", "rps -P 1", "x INCR", "rps -P 16", "x INCR", "B/subject"
    );
    for (name, usec, p1, p16, bytes) in &costs {
        println!(
            "{:<46} {:>9.3} {:>7.2} {:>12.0} {:>7.2} {:>12.0} {:>7.2} {:>10}",
            name,
            usec,
            usec / incr,
            p1,
            p1 / incr_p1,
            p16,
            p16 / incr_p16,
            bytes.map_or("-".to_string(), |b| format!("{b:.0}"))
        );
    }
    println!("\nTargets: 3-limit RL.ACQUIRE <= 1.5x INCR server-side; <= 200 bytes per subject.");
    leases(&mut con, port, incr);
    credits(&mut con, port, incr);
    waiters(&mut con, port, incr);
    drop(server);
}

/// `RL.CREDITS.DEDUCT` (plain and with an `ID`) and `RL.ACQUIRE ... CREDITS` on a
/// credits key holding 1, 100 and 10,000 blocks: server-side cost against `INCR`.
fn credits(con: &mut redis::Connection, port: u16, incr: f64) {
    let scenarios: [(&str, Vec<&str>, &str); 3] = [
        (
            "RL.CREDITS.DEDUCT",
            vec!["RL.CREDITS.DEDUCT", "{acct}:credits", "1"],
            "rl.credits.deduct",
        ),
        (
            "RL.CREDITS.DEDUCT ... ID",
            vec![
                "RL.CREDITS.DEDUCT",
                "{acct}:credits",
                "1",
                "ID",
                "d-__rand_int__",
            ],
            "rl.credits.deduct",
        ),
        (
            "RL.ACQUIRE 3 limits ... CREDITS",
            vec![
                "RL.ACQUIRE",
                "{acct}:rl:__rand_int__",
                "three",
                "1",
                "COST",
                "token",
                "100",
                "CREDITS",
                "{acct}:credits",
                "1",
            ],
            "rl.acquire",
        ),
    ];
    println!("\nCredits: one credits key holding N blocks (each deduction takes from the soonest-expiring)");
    println!(
        "{:<34} {:>8} {:>10} {:>7} {:>12}",
        "command", "blocks", "usec/call", "x INCR", "rps -P 16"
    );
    for (name, args, stat) in &scenarios {
        for blocks in [1u64, 100, 10_000] {
            cmd(con, &["FLUSHALL"]);
            let mut pipe = redis::pipe();
            for i in 0..blocks {
                // Distinct expiries keep the blocks apart; all far in the future.
                pipe.cmd("RL.CREDITS.GRANT")
                    .arg("{acct}:credits")
                    .arg(1_000_000_000_000u64)
                    .arg("TTL")
                    .arg(86_400_000 + i)
                    .ignore();
            }
            let _: () = pipe.query(con).unwrap_or_else(|e| panic!("{e}"));
            cmd(con, &["CONFIG", "RESETSTAT"]);
            let rate = throughput_over(port, 16, 200_000, 1_000_000_000, args);
            let usec = usec_per_call(con, stat);
            println!(
                "{:<34} {:>8} {:>10.3} {:>7.2} {:>12.0}",
                name,
                blocks,
                usec,
                usec / incr,
                rate
            );
        }
    }
    println!("Target: each <= 1.5x INCR server-side, flat in the number of blocks.");
}

/// A non-waiting 3-limit `RL.ACQUIRE` with no client waiting, then with 1,000 clients
/// blocked in `WAIT` on other keys.
fn waiters(con: &mut redis::Connection, port: u16, incr: f64) {
    use std::io::Write;
    cmd(
        con,
        &["RL.PLAN.SET", "gate", "jobs", "concurrency 1 ttl 1h"],
    );
    let args = [
        "RL.ACQUIRE",
        "three:__rand_int__",
        "three",
        "1",
        "COST",
        "token",
        "100",
    ];
    println!("\nWAIT: a non-waiting RL.ACQUIRE (3 limits) while other clients wait on other keys");
    println!(
        "{:<34} {:>10} {:>7} {:>12}",
        "clients waiting", "usec/call", "x INCR", "rps -P 16"
    );
    let mut blocked = Vec::new();
    for waiting in [0usize, 1_000] {
        cmd(con, &["FLUSHALL"]);
        blocked.clear();
        for i in 0..waiting {
            let key = format!("gate:{i}");
            cmd(con, &["RL.ACQUIRE", &key, "gate"]);
            let mut stream =
                std::net::TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("{e}"));
            let parts = ["RL.ACQUIRE", key.as_str(), "gate", "WAIT", "600000"];
            let mut resp = format!("*{}\r\n", parts.len());
            for part in parts {
                resp.push_str(&format!("${}\r\n{part}\r\n", part.len()));
            }
            stream
                .write_all(resp.as_bytes())
                .unwrap_or_else(|e| panic!("{e}"));
            blocked.push(stream);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while info_field(&info(con, "tollgate"), "tollgate_waiting_clients:")
            .and_then(|v| v.parse::<usize>().ok())
            != Some(waiting)
        {
            assert!(Instant::now() < deadline, "{waiting} clients never blocked");
            std::thread::sleep(Duration::from_millis(20));
        }
        cmd(con, &["CONFIG", "RESETSTAT"]);
        let rate = throughput(port, 16, 600_000, &args);
        let usec = usec_per_call(con, "rl.acquire");
        println!(
            "{:<34} {:>10.3} {:>7.2} {:>12.0}",
            waiting,
            usec,
            usec / incr,
            rate
        );
    }
    drop(blocked);
    println!("WAIT is not a compile-time option: a call without WAIT only tests that the");
    println!("option is absent, so the first row is the cost without the feature.");
}

/// A 4-limit plan (sliding + fixed + bucket + concurrency) taken with `ID` and settled
/// with `RL.RELEASE ... COST`: server-side cost of both, throughput of the pair, and
/// the cost with 1, 100 and 10,000 leases already live on the key.
fn leases(con: &mut redis::Connection, port: u16, incr: f64) {
    cmd(
        con,
        &[
            "RL.PLAN.SET",
            "four",
            "rpm",
            "sliding 100000000/1m",
            "rpd",
            "fixed 1000000000/1d",
            "tpm",
            "bucket 1000000000 token/1m",
            "jobs",
            "concurrency 100000000 ttl 1h",
        ],
    );
    cmd(
        con,
        &["CONFIG", "SET", "tollgate.max-requests-per-key", "100000"],
    );
    println!("\nLeases: RL.ACQUIRE key four 1 COST token 100 ID <id>, then RL.RELEASE key <id> COST token 80");
    println!(
        "{:<46} {:>12} {:>7} {:>12} {:>7} {:>14}",
        "keys", "acquire usec", "x INCR", "release usec", "x INCR", "pairs/s (-P16)"
    );
    cmd(con, &["FLUSHALL"]);
    cmd(con, &["CONFIG", "RESETSTAT"]);
    let rate = lease_cycles(port, None, 60_000);
    report_pair(con, &format!("{SUBJECTS} random subjects"), incr, rate);
    for live in [1u64, 100, 10_000] {
        cmd(con, &["FLUSHALL"]);
        let mut pipe = redis::pipe();
        for i in 0..live.saturating_sub(1) {
            pipe.cmd("RL.ACQUIRE")
                .arg("hot")
                .arg("four")
                .arg("ID")
                .arg(format!("held-{i}"))
                .ignore();
        }
        if live > 1 {
            let _: () = pipe.query(con).unwrap_or_else(|e| panic!("{e}"));
        }
        cmd(con, &["CONFIG", "RESETSTAT"]);
        let rate = lease_cycles(port, Some("hot"), 20_000);
        report_pair(con, &format!("one key with {live} live leases"), incr, rate);
    }
    println!("Target: each <= 1.5x INCR server-side, flat in the number of live leases.");
}

fn report_pair(con: &mut redis::Connection, name: &str, incr: f64, rate: f64) {
    let acquire = usec_per_call(con, "rl.acquire");
    let release = usec_per_call(con, "rl.release");
    println!(
        "{:<46} {:>12.3} {:>7.2} {:>12.3} {:>7.2} {:>14.0}",
        name,
        acquire,
        acquire / incr,
        release,
        release / incr,
        rate
    );
}

/// Runs acquire/release pairs from 4 connections, 16 commands per round trip;
/// returns pairs per second. `key`: one key for all, else random subjects.
fn lease_cycles(port: u16, key: Option<&str>, pairs: u64) -> f64 {
    let threads = 4u64;
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            scope.spawn(move || {
                let mut con = connect(port).unwrap_or_else(|e| panic!("{e}"));
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                let mut n = 0;
                while n < pairs / threads {
                    let mut pipe = redis::pipe();
                    for _ in 0..8 {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let subject =
                            key.map_or_else(|| format!("lease:{}", rng % SUBJECTS), str::to_string);
                        let id = format!("t{t}-{n}");
                        pipe.cmd("RL.ACQUIRE")
                            .arg(&subject)
                            .arg("four")
                            .arg(1)
                            .arg("COST")
                            .arg("token")
                            .arg(100)
                            .arg("ID")
                            .arg(&id)
                            .ignore();
                        pipe.cmd("RL.RELEASE")
                            .arg(&subject)
                            .arg(&id)
                            .arg("COST")
                            .arg("token")
                            .arg(80)
                            .ignore();
                        n += 1;
                    }
                    let _: () = pipe.query(&mut con).unwrap_or_else(|e| panic!("{e}"));
                }
            });
        }
    });
    (pairs / threads * threads) as f64 / start.elapsed().as_secs_f64()
}

fn redis_version(con: &mut redis::Connection) -> String {
    info_field(&info(con, "server"), "redis_version:").unwrap_or_default()
}

/// `used_memory` growth per subject after creating `SUBJECTS` subjects with `args`.
fn bytes_per_subject(con: &mut redis::Connection, args: &[&str]) -> f64 {
    cmd(con, &["FLUSHALL"]);
    let used = |con: &mut redis::Connection| -> f64 {
        info_field(&info(con, "memory"), "used_memory:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let before = used(con);
    let mut pipe = redis::pipe();
    for i in 0..SUBJECTS {
        let key = args[1].replace("__rand_int__", &format!("{i:012}"));
        let mut c = redis::cmd(args[0]);
        c.arg(key);
        for a in &args[2..] {
            c.arg(*a);
        }
        pipe.add_command(c).ignore();
        if i % 1_000 == 999 {
            let _: () = pipe.query(con).unwrap_or_else(|e| panic!("{e}"));
            pipe = redis::pipe();
        }
    }
    let after = used(con);
    (after - before) / SUBJECTS as f64
}

/// `make bench-cluster`: aggregate RL.ACQUIRE throughput of 1, 2 and 3 primaries under
/// the same client load, and each node's server-side cost.
fn cluster_bench(module: &str) {
    let requests: u64 = std::env::var("TOLLGATE_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600_000);
    println!("Tollgate cluster bench: RL.ACQUIRE on a 3-limit plan, redis-benchmark --cluster, 50 clients, -P 16, {requests} requests\n");
    println!(
        "{:<10} {:>14} {:>40}",
        "primaries", "total rps", "usec_per_call per node"
    );
    for primaries in 1..=3usize {
        let nodes: Vec<Server> = (0..primaries)
            .map(|_| {
                start_node(
                    module,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                    ],
                )
            })
            .collect();
        let per = 16384 / primaries;
        for (i, node) in nodes.iter().enumerate() {
            let mut con = connect(node.port).unwrap_or_else(|e| panic!("{e}"));
            let first = i * per;
            let last = if i + 1 == primaries {
                16383
            } else {
                first + per - 1
            };
            cmd(
                &mut con,
                &[
                    "CLUSTER",
                    "ADDSLOTSRANGE",
                    &first.to_string(),
                    &last.to_string(),
                ],
            );
            cmd(
                &mut con,
                &[
                    "RL.PLAN.SET",
                    "three",
                    "rpm",
                    "sliding 100000000/1m",
                    "rpd",
                    "fixed 1000000000/1d",
                    "tpm",
                    "bucket 1000000000 token/1m",
                ],
            );
        }
        let mut seed = connect(nodes[0].port).unwrap_or_else(|e| panic!("{e}"));
        for node in &nodes[1..] {
            cmd(
                &mut seed,
                &["CLUSTER", "MEET", "127.0.0.1", &node.port.to_string()],
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ok = nodes.iter().all(|n| {
                connect(n.port)
                    .map(|mut c| {
                        let info = match cmd(&mut c, &["CLUSTER", "INFO"]) {
                            redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                            redis::Value::VerbatimString { text, .. } => text,
                            _ => String::new(),
                        };
                        info.contains("cluster_state:ok")
                            && info.contains(&format!("cluster_known_nodes:{primaries}"))
                    })
                    .unwrap_or(false)
            });
            if ok {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // redis-benchmark refuses a one-node cluster: drive that node directly.
        let (mode, key): (&[&str], &str) = if primaries == 1 {
            (&[], "s:__rand_int__")
        } else {
            (&["--cluster"], "s:{tag}:__rand_int__")
        };
        let output = Command::new("redis-benchmark")
            .args(mode)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &nodes[0].port.to_string(),
                "-c",
                "50",
                "-P",
                "16",
                "--csv",
            ])
            .args(["-r", &SUBJECTS.to_string(), "-n", &requests.to_string()])
            .args(["RL.ACQUIRE", key, "three", "1", "COST", "token", "100"])
            .output()
            .unwrap_or_else(|e| panic!("redis-benchmark: {e}"));
        let text = String::from_utf8_lossy(&output.stdout);
        let rps = text
            .lines()
            .filter(|l| !l.starts_with("\"test\""))
            .find_map(|l| {
                l.split(',')
                    .nth(1)
                    .map(|v| v.trim_matches('"').parse::<f64>().unwrap_or(f64::NAN))
            })
            .unwrap_or(f64::NAN);
        let costs: Vec<String> = nodes
            .iter()
            .map(|n| {
                let mut c = connect(n.port).unwrap_or_else(|e| panic!("{e}"));
                format!("{:.2}", usec_per_call(&mut c, "rl.acquire"))
            })
            .collect();
        println!("{:<10} {:>14.0} {:>40}", primaries, rps, costs.join(" "));
    }
    println!("\nOn this 2-core machine the server processes and redis-benchmark share two cores,");
    println!("so aggregate throughput cannot scale; per-node cost is what carries over (docs/design.md).");
}
