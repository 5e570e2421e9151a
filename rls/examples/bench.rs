//! `make bench-rls`: decisions per second and p50/p99 latency of `ShouldRateLimit`
//! with 1 and 3 descriptors at a fixed concurrency, against calling the module
//! directly (the same decisions as one `RL.ACQUIRE`) in the same run, on one
//! redis-server with the release module and the release `tollgate-rls`.
//!
//! Usage: `cargo run --release -p tollgate-rls --example bench -- path/to/libtollgate.so`
//! (`BENCH_SECS`, `BENCH_CONCURRENCY`, `BENCH_CONNECTIONS` override the defaults 5 s,
//! 32 in flight and 4 gRPC connections).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_rls::proto::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::Entry, RateLimitDescriptor,
};
use tollgate_rls::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tollgate_rls::proto::envoy::service::ratelimit::v3::RateLimitRequest;

const CONFIG: &str = r#"
domain: bench
tollgate:
  tenant_key: org
descriptors:
  - key: org
    rate_limit: {unit: hour, requests_per_unit: 4000000000}
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 4000000000}
        tollgate: {algorithm: sliding}
      - key: model
        rate_limit: {unit: minute, requests_per_unit: 4000000000}
        tollgate: {algorithm: bucket, cost_unit: token}
"#;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn descriptor(entries: &[(&str, String)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.clone(),
            })
            .collect(),
        ..RateLimitDescriptor::default()
    }
}

fn request(n: usize, i: u64) -> RateLimitRequest {
    let org = format!("o{}", i % 64);
    let user = format!("u{}", i % 4096);
    let mut descriptors = vec![descriptor(&[("org", org.clone()), ("user", user)])];
    if n == 3 {
        descriptors.push(descriptor(&[("org", org.clone())]));
        let mut model = descriptor(&[("org", org), ("model", "gpt".to_string())]);
        model.hits_addend = Some(300);
        descriptors.push(model);
    }
    RateLimitRequest {
        domain: "bench".into(),
        descriptors,
        hits_addend: 0,
    }
}

struct Result {
    per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

fn summarize(mut lat: Vec<Duration>, elapsed: Duration) -> Result {
    lat.sort();
    let q = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1e6;
    Result {
        per_sec: lat.len() as f64 / elapsed.as_secs_f64(),
        p50_us: q(0.50),
        p99_us: q(0.99),
    }
}

async fn run_load<F, Fut>(concurrency: usize, secs: u64, make: F) -> Result
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let make = Arc::new(make);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = t as u64 * 1_000_003;
            while Instant::now() < deadline {
                let s = Instant::now();
                make(i).await;
                lat.push(s.elapsed());
                i += 1;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    summarize(all, start.elapsed())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let module = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/release/libtollgate.so".into());
    assert!(
        std::path::Path::new(&module).exists(),
        "module {module} not found (make release)"
    );
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let concurrency: usize = std::env::var("BENCH_CONCURRENCY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let connections: usize = std::env::var("BENCH_CONNECTIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let dir = std::env::temp_dir().join(format!("tollgate-rls-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("config")).unwrap();
    std::fs::write(dir.join("config/bench.yaml"), CONFIG).unwrap();

    let redis_port = free_port();
    let _redis = Kill(
        Command::new(std::env::var("TOLLGATE_SERVER").unwrap_or_else(|_| "redis-server".into()))
            .args([
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&dir)
            .arg("--loadmodule")
            .arg(&module)
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server"),
    );
    let url = format!("redis://127.0.0.1:{redis_port}");
    let client = redis::Client::open(url.clone()).unwrap();
    let mut con = loop {
        if let Ok(c) = client.get_multiplexed_async_connection().await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let binary = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("tollgate-rls"))
        .unwrap();
    assert!(
        binary.exists(),
        "{} not found (cargo build --release -p tollgate-rls)",
        binary.display()
    );
    let grpc_port = free_port();
    let _rls = Kill(
        Command::new(&binary)
            .arg("--config-dir")
            .arg(dir.join("config"))
            .args(["--redis-url", &url])
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc_port}")])
            .args(["--http-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--log-level", "warn"])
            .stderr(Stdio::null())
            .spawn()
            .expect("start tollgate-rls"),
    );
    let _listening = loop {
        if let Ok(c) =
            RateLimitServiceClient::connect(format!("http://127.0.0.1:{grpc_port}")).await
        {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Wait until the plans are applied, and learn the keys and plans the service
    // uses so that the direct calls make the very same decisions.
    let config =
        tollgate_rls::config::from_sources(&[("bench.yaml".into(), CONFIG.into())], false).unwrap();
    let rule = |entries: &[(&str, &str)]| config.lookup("bench", entries).unwrap().rule;
    let user_rule = rule(&[("org", "o"), ("user", "u")]);
    let org_rule = rule(&[("org", "o")]);
    let model_rule = rule(&[("org", "o"), ("model", "gpt")]);
    loop {
        let plans: Vec<String> = redis::cmd("RL.PLAN.LIST")
            .query_async(&mut con)
            .await
            .unwrap_or_default();
        if plans.contains(&model_rule.plan) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let also: bool = redis::cmd("RL.PEEK")
        .arg("probe:a")
        .arg(&org_rule.plan)
        .arg("ALSO")
        .arg(1)
        .arg("probe:b")
        .arg(&user_rule.plan)
        .query_async::<redis::Value>(&mut con)
        .await
        .is_ok();

    println!(
        "tollgate-rls bench: concurrency {concurrency} ({connections} gRPC connections), {secs} s per scenario, redis-server and tollgate-rls on this machine ({} cores); ALSO on the server: {also}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!(
        "{:<46} {:>12} {:>10} {:>10}",
        "scenario", "decisions/s", "p50 us", "p99 us"
    );
    let mut rows = Vec::new();
    for n in [1usize, 3] {
        // Direct: the same decision as one module call (what the service sends).
        let (u, o, m) = (user_rule.clone(), org_rule.clone(), model_rule.clone());
        let c2 = con.clone();
        let direct = run_load(concurrency, secs, move |i| {
            let mut c = c2.clone();
            let (u, o, m) = (u.clone(), o.clone(), m.clone());
            async move {
                let org = format!("o{}", i % 64);
                let user = format!("u{}", i % 4096);
                let ukey = tollgate_rls::service::subject_key(
                    "bench",
                    Some(&org),
                    &[("org".into(), org.clone()), ("user".into(), user)],
                );
                let mut cmd = redis::cmd("RL.ACQUIRE");
                cmd.arg(&ukey)
                    .arg(&u.plan)
                    .arg("COST")
                    .arg(&u.unit_id)
                    .arg(1);
                if n == 3 {
                    let okey = tollgate_rls::service::subject_key(
                        "bench",
                        Some(&org),
                        &[("org".into(), org.clone())],
                    );
                    let mkey = tollgate_rls::service::subject_key(
                        "bench",
                        Some(&org),
                        &[("org".into(), org.clone()), ("model".into(), "gpt".into())],
                    );
                    cmd.arg(&o.unit_id).arg(1).arg(&m.unit_id).arg(300);
                    if also {
                        cmd.arg("ALSO")
                            .arg(2)
                            .arg(&okey)
                            .arg(&o.plan)
                            .arg(&mkey)
                            .arg(&m.plan);
                        let _: redis::Value = cmd.query_async(&mut c).await.unwrap();
                    } else {
                        let _: redis::Value = cmd.query_async(&mut c).await.unwrap();
                        let mut p = redis::pipe();
                        p.cmd("RL.ACQUIRE")
                            .arg(&okey)
                            .arg(&o.plan)
                            .arg("COST")
                            .arg(&o.unit_id)
                            .arg(1);
                        p.cmd("RL.ACQUIRE")
                            .arg(&mkey)
                            .arg(&m.plan)
                            .arg("COST")
                            .arg(&m.unit_id)
                            .arg(300);
                        let _: redis::Value = p.query_async(&mut c).await.unwrap();
                    }
                } else {
                    let _: redis::Value = cmd.query_async(&mut c).await.unwrap();
                }
            }
        })
        .await;
        // Several HTTP/2 connections, as a fleet of Envoys would open.
        let mut clients = Vec::new();
        for _ in 0..connections {
            clients.push(
                RateLimitServiceClient::connect(format!("http://127.0.0.1:{grpc_port}"))
                    .await
                    .unwrap(),
            );
        }
        let clients = Arc::new(clients);
        let via = run_load(concurrency, secs, move |i| {
            let mut c = clients[(i % clients.len() as u64) as usize].clone();
            async move {
                let r = c
                    .should_rate_limit(request(n, i))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(r.statuses.len(), n);
            }
        })
        .await;
        let label_direct = if n == 3 && !also {
            "module directly, 3 keys (3 calls, no ALSO)".to_string()
        } else {
            format!(
                "module directly, {n} key{}",
                if n == 1 { "" } else { "s (one call)" }
            )
        };
        for (label, r) in [
            (label_direct, &direct),
            (
                format!(
                    "ShouldRateLimit, {n} descriptor{}",
                    if n == 1 { "" } else { "s" }
                ),
                &via,
            ),
        ] {
            println!(
                "{label:<46} {:>12.0} {:>10.0} {:>10.0}",
                r.per_sec, r.p50_us, r.p99_us
            );
        }
        rows.push((
            n,
            via.p50_us - direct.p50_us,
            via.p99_us - direct.p99_us,
            via.per_sec,
        ));
    }
    println!();
    for (n, p50, p99, rate) in rows {
        println!(
            "{n} descriptor(s): the service adds {p50:.0} us at p50, {p99:.0} us at p99; {rate:.0} decisions/s (targets: < 100 us at p99, >= 20,000/s)"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
