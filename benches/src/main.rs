//! `make bench`: the end-to-end benchmark driver.
//!
//! Starts its own redis-server processes (the release module, and redis-cell built
//! from crates.io by `cell.rs`) on free loopback ports and prints, from one run:
//! - server-side cost per call (`INFO commandstats`) of `INCR`, redis-cell's
//!   `CL.THROTTLE`, `RL.THROTTLE`, `RL.ACQUIRE` (1 and 3 limits, map and `COMPACT`),
//!   the same 3-limit policy as one Lua script, and `RL.APPLY` on a replica;
//! - hierarchies: `RL.ACQUIRE ... ALSO` over 1-4 levels against sequential
//!   single-key calls and one Lua script over the same keys;
//! - `redis-benchmark` throughput at `-P 1` and `-P 16` over 100,000 random subjects;
//! - memory per subject and where it goes, and `MEMORY USAGE` of a large credits key;
//! - the targets of issues 14 and 12 next to the measured ratios (met or not);
//! - leases, credits and waiting clients (earlier issues).
//!
//! Speed targets live here, never in tests: the figures vary with the machine.
//! `TOLLGATE_BENCH_CALLS` (default 50,000 calls per row and round) and
//! `TOLLGATE_BENCH_ROUNDS` (default 5) trade time for steadier figures.

// A benchmark driver, not module code: stopping loudly on any failure is the point.
#![allow(
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used
)]

mod cell;
mod compare;
mod load;
mod memory;
mod server;

use std::process::Command;
use std::time::{Duration, Instant};

use server::{
    cmd, connect, info, info_field, redis_benchmark, redis_version, start_node, usec_per_call,
    Server,
};

const SUBJECTS: u64 = compare::SUBJECTS;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn throughput(port: u16, pipeline: u32, requests: u64, args: &[&str]) -> f64 {
    redis_benchmark(port, pipeline, requests, SUBJECTS, args)
}

fn throughput_over(port: u16, pipeline: u32, requests: u64, range: u64, args: &[&str]) -> f64 {
    redis_benchmark(port, pipeline, requests, range, args)
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
    let started = Instant::now();
    // target/release/tollgate-bench -> target/
    let target_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(std::path::Path::to_path_buf))
        .unwrap_or_else(|| std::path::PathBuf::from("target"));
    println!(
        "Building redis-cell {} from crates.io into {} ...",
        cell::VERSION,
        target_dir.join("redis-cell").display()
    );
    let cell = cell::build(&target_dir).map(|p| p.display().to_string());
    let settings = compare::Settings {
        calls: env_or("TOLLGATE_BENCH_CALLS", 50_000).max(1_000),
        rounds: env_or("TOLLGATE_BENCH_ROUNDS", 5).max(1) as usize,
    };
    {
        let probe = start_node(std::slice::from_ref(&module), &[]);
        let mut con = connect(probe.port).unwrap_or_else(|e| panic!("{e}"));
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!(
            "Tollgate end-to-end bench: redis-server {}, module {module}",
            redis_version(&mut con)
        );
        match &cell {
            Ok(path) => println!("redis-cell {} (crates.io; GitHub's 0.5.0 is unpublished, same GCRA and key handling): {path}", cell::VERSION),
            Err(why) => println!("redis-cell: skipped, {why}"),
        }
        println!(
            "{} CPUs, load average {} at start (a shared machine: medians of {} interleaved rounds, {} calls per row and round)\n",
            std::thread::available_parallelism().map_or(0, usize::from),
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            settings.rounds,
            settings.calls
        );
    }
    let mut figures = compare::run(&module, &cell, &settings);
    let mut clock = Instant::now();
    let bytes_three = memory::run(&module, cell.as_ref().ok().map(String::as_str));
    figures.phases.push(("memory", clock.elapsed()));
    clock = Instant::now();
    compare::targets(&figures, bytes_three, true);

    println!("\nOther figures (earlier issues), on a fresh server with the module alone");
    let server = start_node(std::slice::from_ref(&module), &[]);
    let port = server.port;
    let mut con = connect(port).unwrap_or_else(|e| panic!("{e}"));
    compare::set_plans(&mut con);
    let incr = figures.usec("incr");
    leases(&mut con, port, incr);
    credits(&mut con, port, incr);
    waiters(&mut con, port, incr);
    drop(server);
    figures.phases.push(("other", clock.elapsed()));
    let phases: Vec<String> = figures
        .phases
        .iter()
        .map(|(name, d)| format!("{name} {:.0}", d.as_secs_f64()))
        .collect();
    println!(
        "\nbench took {:.0} s ({} s)",
        started.elapsed().as_secs_f64(),
        phases.join(", ")
    );
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
            let rate = throughput_over(port, 16, 100_000, 1_000_000_000, args);
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
        let rate = throughput(port, 16, 300_000, &args);
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
                    &[module.to_string()],
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
