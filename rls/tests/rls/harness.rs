//! Real processes for the service tests: `redis-server` (or `$TOLLGATE_SERVER`) with
//! the module built from this source (`cargo build -p tollgate` first; `make test`
//! does), a 3+3 cluster, and the `tollgate-rls` binary, each on free loopback ports
//! and killed on drop. A missing binary or module fails loudly — nothing is skipped.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tollgate_rls::proto::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::{Entry, RateLimitOverride},
    RateLimitDescriptor,
};
use tollgate_rls::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use tollgate_rls::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tollgate_rls::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::transport::Channel;

static NEXT: AtomicUsize = AtomicUsize::new(0);

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn module_path() -> PathBuf {
    let path = std::env::var("TOLLGATE_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join("target/debug/libtollgate.so"));
    assert!(
        path.exists(),
        "module {} not found: build it first (`cargo build -p tollgate`; `make test` does)",
        path.display()
    );
    path
}

pub fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-rls-{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    dir
}

pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out waiting for {what}");
}

/// A redis-server with the module; killed on drop.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    args: Vec<String>,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Server {
        let dir = temp_dir("redis");
        let cluster = extra.contains(&"--cluster-enabled");
        let port = loop {
            // A cluster node also listens on port + 10000 (its bus).
            let p = free_port();
            if !cluster || (p <= 55_535 && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok()) {
                break p;
            }
        };
        Server::launch(dir, port, extra.iter().map(|s| s.to_string()).collect())
    }

    fn launch(dir: PathBuf, port: u16, args: Vec<String>) -> Server {
        let binary = std::env::var("TOLLGATE_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&binary)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(dir.join("server.log"))
            .arg("--loadmodule")
            .arg(module_path())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start '{binary}': {e} (install redis-server)"));
        let mut server = Server {
            child: Some(child),
            port,
            dir,
            args,
        };
        wait_until(20, "redis-server to answer PING", || {
            if let Some(Ok(Some(status))) = server.child.as_mut().map(|c| c.try_wait()) {
                let log =
                    std::fs::read_to_string(server.dir.join("server.log")).unwrap_or_default();
                panic!("redis-server exited ({status}):\n{log}");
            }
            server.ping()
        });
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn ping(&self) -> bool {
        self.try_client()
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    }

    fn try_client(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(2))
    }

    pub fn client(&self) -> redis::Connection {
        self.try_client().expect("connect to redis")
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A fresh server on the same port and directory (nothing persisted: `--save ""`).
    pub fn restart(&mut self) {
        self.kill();
        let s = Server::launch(self.dir.clone(), self.port, self.args.clone());
        let mut s = std::mem::ManuallyDrop::new(s);
        self.child = s.child.take();
    }

    pub fn is_alive(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A 3-primary / 3-replica cluster made with `redis-cli --cluster create`.
pub struct Cluster {
    pub nodes: Vec<Server>,
}

impl Cluster {
    pub fn start() -> Cluster {
        let nodes: Vec<Server> = (0..6)
            .map(|_| {
                Server::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    // Long enough that a loaded machine does not fail nodes over by
                    // itself; the failover test kills a primary outright.
                    "--cluster-node-timeout",
                    "3000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create (install redis-tools)");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let c = Cluster { nodes };
        c.wait_healthy();
        wait_until(30, "every primary to have a synced replica", || {
            c.nodes.iter().all(|n| {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut n.client())
                    .unwrap_or_default();
                info.contains("role:slave") && info.contains("master_link_status:up")
                    || info.contains("role:master") && info.contains("connected_slaves:1")
            })
        });
        c
    }

    pub fn wait_healthy(&self) {
        wait_until(30, "a healthy cluster", || {
            self.nodes.iter().filter(|n| n.is_alive()).all(|n| {
                n.try_client()
                    .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut c))
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            })
        });
    }

    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .take(3)
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node serving `key` as primary.
    pub fn primary_for(&self, key: &str) -> usize {
        let live = self
            .nodes
            .iter()
            .position(|n| n.is_alive())
            .expect("a live node");
        let mut con = self.nodes[live].client();
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut con)
            .unwrap();
        let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut con).unwrap();
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let owns = f.iter().skip(8).any(|r| match r.split_once('-') {
                Some((a, b)) => a.parse::<i64>().unwrap() <= slot && slot <= b.parse().unwrap(),
                None => r.parse::<i64>() == Ok(slot),
            });
            if owns {
                let port: u16 = f[1]
                    .split(['@', ','])
                    .next()
                    .unwrap()
                    .rsplit_once(':')
                    .unwrap()
                    .1
                    .parse()
                    .unwrap();
                return self.nodes.iter().position(|n| n.port == port).unwrap();
            }
        }
        panic!("no primary owns slot {slot}");
    }
}

/// The `tollgate-rls` binary under test.
pub fn rls_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tollgate-rls"))
}

/// A running `tollgate-rls`; killed on drop.
pub struct Rls {
    child: Option<Child>,
    pub grpc_port: u16,
    pub http_port: u16,
    pub config_dir: PathBuf,
    pub log: PathBuf,
}

impl Rls {
    /// Starts the service on `redis_url` with `config` as `config.yaml` and waits
    /// until it serves (plans applied).
    pub fn start(redis_url: &str, config: &str, extra: &[&str]) -> Rls {
        let dir = temp_dir("config");
        std::fs::write(dir.join("config.yaml"), config).expect("write the config");
        Rls::start_dir(redis_url, dir, extra, true)
    }

    pub fn start_dir(
        redis_url: &str,
        config_dir: PathBuf,
        extra: &[&str],
        wait_ready: bool,
    ) -> Rls {
        let grpc_port = free_port();
        let http_port = free_port();
        let log = config_dir.with_extension("log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(rls_binary())
            .arg("--config-dir")
            .arg(&config_dir)
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc_port}")])
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .args(["--redis-url", redis_url])
            .args(["--log-level", "info"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start tollgate-rls");
        let rls = Rls {
            child: Some(child),
            grpc_port,
            http_port,
            config_dir,
            log,
        };
        if wait_ready {
            wait_until(30, "tollgate-rls to serve", || {
                rls.http("/healthcheck")
                    .is_some_and(|(code, _)| code == 200)
            });
        }
        rls
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// (status, body) of a GET on the HTTP port.
    pub fn http(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((code, body))
    }

    /// The value of one metric series (0 when absent).
    pub fn metric(&self, name_and_labels: &str) -> u64 {
        let (_, body) = self.http("/metrics").expect("scrape /metrics");
        body.lines()
            .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or(0)
    }

    pub async fn client(&self) -> RateLimitServiceClient<Channel> {
        let url = format!("http://127.0.0.1:{}", self.grpc_port);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match RateLimitServiceClient::connect(url.clone()).await {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("connect to tollgate-rls: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Rls {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.config_dir);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A descriptor from `key=value` entries.
pub fn desc(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        ..RateLimitDescriptor::default()
    }
}

pub fn with_hits(mut d: RateLimitDescriptor, hits: u64) -> RateLimitDescriptor {
    d.hits_addend = Some(hits);
    d
}

pub fn negative(mut d: RateLimitDescriptor, hits: u64) -> RateLimitDescriptor {
    d.hits_addend = Some(hits);
    d.is_negative_hits = true;
    d
}

pub fn with_limit(
    mut d: RateLimitDescriptor,
    requests_per_unit: u32,
    unit: i32,
) -> RateLimitDescriptor {
    d.limit = Some(RateLimitOverride {
        requests_per_unit,
        unit,
    });
    d
}

pub fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors,
        hits_addend: 0,
    }
}

pub async fn ask(
    client: &mut RateLimitServiceClient<Channel>,
    req: RateLimitRequest,
) -> RateLimitResponse {
    client
        .should_rate_limit(req)
        .await
        .unwrap_or_else(|e| panic!("ShouldRateLimit failed: {e}"))
        .into_inner()
}

pub fn ok(r: &RateLimitResponse) -> bool {
    r.overall_code == Code::Ok as i32
}

pub fn over(r: &RateLimitResponse) -> bool {
    r.overall_code == Code::OverLimit as i32
}

pub const OK: i32 = Code::Ok as i32;
pub const OVER_LIMIT: i32 = Code::OverLimit as i32;

/// `used` of limit `limit` of `key` under `plan`, from `RL.USAGE` (which charges
/// nothing): what the module holds, independent of what the service answered.
pub fn usage_used(server: &Server, key: &str, plan: &str, limit: &str) -> i64 {
    let v: redis::Value = redis::cmd("RL.USAGE")
        .arg(key)
        .arg(plan)
        .query(&mut server.client())
        .unwrap_or_else(|e| panic!("RL.USAGE {key} {plan}: {e}"));
    let field = |v: &redis::Value, name: &str| -> Option<redis::Value> {
        tollgate_rls::reply::map_entries(v)
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let Some(redis::Value::Array(limits)) = field(&v, "limits") else {
        panic!("RL.USAGE {key} {plan}: no limits in {v:?}");
    };
    let found = limits.iter().find(|l| {
        field(l, "name")
            .and_then(|n| tollgate_rls::reply::text(&n))
            .as_deref()
            == Some(limit)
    });
    match found.and_then(|l| field(l, "used")) {
        Some(redis::Value::Int(n)) => n,
        other => panic!("RL.USAGE {key} {plan}: limit {limit} used = {other:?} in {v:?}"),
    }
}
