//! Real servers for the integration tests.
//!
//! Each test starts its own `redis-server` (or `valkey-server`, see
//! `TOLLGATE_SERVER`) with the module, on a free loopback port and in its own
//! directory; the server is killed and the directory removed on drop. The module
//! (and the CLI) are built first, once per test process, so `cargo test --test
//! integration` right after a change to `src/` tests that change; `TOLLGATE_MODULE`
//! and `TOLLGATE_CLI` name other builds instead. A missing server binary or a failed
//! build fails the test loudly — nothing is skipped.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use redis::{Connection, Value};

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// The server binary under test: `$TOLLGATE_SERVER`, else `redis-server` on the PATH.
pub fn server_binary() -> String {
    std::env::var("TOLLGATE_SERVER").unwrap_or_else(|_| "redis-server".to_string())
}

/// The module under test: `$TOLLGATE_MODULE`, else this checkout's module, built
/// first in the test binary's own profile so a test never loads a stale module.
pub fn module_path() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    artifact("TOLLGATE_MODULE", &BUILT, "tollgate", "libtollgate.so")
}

/// `$variable` if set (it must exist), else `file` of `package` built by
/// `cargo build -p package` once per test process (the commands `make build` runs, so
/// under `make test` they find everything up to date). A failed build fails every
/// test that needs it, with cargo's output.
fn artifact(
    variable: &str,
    built: &OnceLock<Result<PathBuf, String>>,
    package: &str,
    file: &str,
) -> PathBuf {
    if let Ok(path) = std::env::var(variable) {
        let path = PathBuf::from(path);
        assert!(
            path.exists(),
            "{variable}={} does not exist",
            path.display()
        );
        return path;
    }
    match built.get_or_init(|| cargo_build(package, file)) {
        Ok(path) => path.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// Runs `cargo build -p package` with the profile this test binary was built with
/// (its directory: `target/debug/deps/integration-*` is the dev profile) and returns
/// the path of `file` in that profile's directory.
fn cargo_build(package: &str, file: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("the test binary's path: {e}"))?;
    let profile_dir = exe
        .parent()
        .filter(|deps| deps.ends_with("deps"))
        .and_then(Path::parent)
        .ok_or_else(|| format!("{} is not in a cargo deps directory", exe.display()))?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .arg("-p")
        .arg(package);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.arg("--profile").arg(other);
        }
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run '{cargo} build -p {package}': {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "'{cargo} build -p {package}' failed ({}), so the tests cannot run:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let path = profile_dir.join(file);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "'{cargo} build -p {package}' succeeded but {} does not exist",
            path.display()
        ))
    }
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    listener.local_addr().expect("local address").port()
}

/// A fresh, empty directory for one server.
fn new_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-test-{}-{}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the server directory");
    dir
}

/// A running server; killed on drop.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    args: Vec<String>,
    keep_dir: bool,
}

impl Server {
    /// A server with the module and the default test configuration.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// A server with extra `--name value` arguments.
    pub fn start_with(extra: &[&str]) -> Server {
        Server::start_in(new_dir(), extra)
    }

    /// A server that starts from a copy of the RDB file `rdb` (loaded at start-up).
    pub fn start_from_rdb(rdb: &Path, extra: &[&str]) -> Server {
        let dir = new_dir();
        std::fs::copy(rdb, dir.join("dump.rdb"))
            .unwrap_or_else(|e| panic!("copy {}: {e}", rdb.display()));
        Server::start_in(dir, extra)
    }

    /// Starts with `appendonly yes` on a copy of the multi-part AOF directory `aof`
    /// (its manifest, base and increments), so the server replays it as it loads.
    pub fn start_from_aof(aof: &Path, extra: &[&str]) -> Server {
        let dir = new_dir();
        let target = dir.join("appendonlydir");
        std::fs::create_dir_all(&target).unwrap_or_else(|e| panic!("{}: {e}", target.display()));
        let files = std::fs::read_dir(aof).unwrap_or_else(|e| panic!("{}: {e}", aof.display()));
        for file in files.flatten() {
            std::fs::copy(file.path(), target.join(file.file_name()))
                .unwrap_or_else(|e| panic!("copy {}: {e}", file.path().display()));
        }
        let mut args = vec!["--appendonly", "yes"];
        args.extend_from_slice(extra);
        Server::start_in(dir, &args)
    }

    fn start_in(dir: PathBuf, extra: &[&str]) -> Server {
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Server::launch(dir, args)
    }

    fn launch(dir: PathBuf, args: Vec<String>) -> Server {
        Server::launch_on(dir, args, None)
    }

    /// Starts on `port` if given (one attempt), else on a free port (a few attempts).
    fn launch_on(dir: PathBuf, args: Vec<String>, port: Option<u16>) -> Server {
        let binary = server_binary();
        let module = module_path();
        let mut last_error = String::new();
        for _attempt in 0..if port.is_some() { 1 } else { 5 } {
            let port = port.unwrap_or_else(free_port);
            let mut cmd = Command::new(&binary);
            cmd.arg("--port")
                .arg(port.to_string())
                .arg("--bind")
                .arg("127.0.0.1")
                .arg("--save")
                .arg("")
                .arg("--dir")
                .arg(&dir)
                .arg("--logfile")
                .arg(dir.join("server.log"))
                .arg("--enable-debug-command")
                .arg("yes")
                .arg("--repl-diskless-sync-delay")
                .arg("0")
                .arg("--loadmodule")
                .arg(&module)
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let child = cmd.spawn().unwrap_or_else(|e| {
                panic!(
                    "cannot start '{binary}': {e} (install redis-server, or set TOLLGATE_SERVER)"
                )
            });
            let mut server = Server {
                child: Some(child),
                port,
                dir: dir.clone(),
                args: args.clone(),
                keep_dir: false,
            };
            match server.wait_ready() {
                Ok(()) => return server,
                Err(e) => {
                    last_error = e;
                    server.keep_dir = true;
                    server.kill();
                }
            }
        }
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        panic!("server did not start: {last_error}\n--- server.log ---\n{log}");
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("server exited: {status}"));
                }
            }
            if let Ok(mut con) = self.try_client() {
                let pong: redis::RedisResult<String> = redis::cmd("PING").query(&mut con);
                if pong.is_ok() {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err("timed out waiting for PING".into())
    }

    fn try_client(&self) -> redis::RedisResult<Connection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))?;
        client.get_connection_with_timeout(Duration::from_secs(5))
    }

    /// A RESP2 connection.
    pub fn client(&self) -> Connection {
        self.try_client().expect("connect to the test server")
    }

    /// A RESP3 connection.
    pub fn client_resp3(&self) -> Connection {
        let client =
            redis::Client::open(format!("redis://127.0.0.1:{}/?protocol=resp3", self.port))
                .expect("client");
        client
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect with RESP3")
    }

    /// Kills the server with SIGKILL (no shutdown save), keeping its directory.
    pub fn kill9(&mut self) {
        self.keep_dir = true;
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a new server on the same directory and arguments (after `kill9`).
    pub fn restart(mut self) -> Server {
        self.kill();
        self.keep_dir = true;
        let dir = self.dir.clone();
        let args = self.args.clone();
        drop(self);
        Server::launch(dir, args)
    }

    /// Like [`Server::restart`], on the same port (a cluster node keeps its address).
    pub fn restart_same_port(mut self) -> Server {
        self.kill();
        self.keep_dir = true;
        let (dir, args, port) = (self.dir.clone(), self.args.clone(), self.port);
        drop(self);
        Server::launch_on(dir, args, Some(port))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs a command and returns its reply or its error.
pub fn try_run(con: &mut Connection, args: &[&str]) -> Result<Value, String> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query::<Value>(con).map_err(|e| error_text(&e))
}

/// The reply text of a command error, e.g. `ERR unknown plan 'x'`.
pub fn error_text(e: &redis::RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        (Some(code), None) => code.to_string(),
        _ => e.to_string(),
    }
}

/// Runs a command that must succeed.
pub fn run(con: &mut Connection, args: &[&str]) -> Value {
    try_run(con, args).unwrap_or_else(|e| panic!("{args:?} failed: {e}"))
}

/// Runs a command that must fail and returns its error text.
pub fn err(con: &mut Connection, args: &[&str]) -> String {
    match try_run(con, args) {
        Err(e) => e,
        Ok(v) => panic!("{args:?}: expected an error, got {v:?}"),
    }
}

pub fn int(con: &mut Connection, args: &[&str]) -> i64 {
    match run(con, args) {
        Value::Int(n) => n,
        other => panic!("{args:?}: expected an integer, got {other:?}"),
    }
}

pub fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Okay => "OK".into(),
        Value::Nil => "(nil)".into(),
        Value::Int(n) => n.to_string(),
        other => panic!("expected a string, got {other:?}"),
    }
}

pub fn string(con: &mut Connection, args: &[&str]) -> String {
    text(&run(con, args))
}

/// A reply map (RESP3 map or RESP2 flat array) by field name.
pub fn map_of(v: &Value) -> HashMap<String, Value> {
    match v {
        Value::Map(pairs) => pairs.iter().map(|(k, v)| (text(k), v.clone())).collect(),
        Value::Array(items) if items.len() % 2 == 0 => items
            .chunks(2)
            .map(|kv| (text(&kv[0]), kv[1].clone()))
            .collect(),
        other => panic!("expected a map, got {other:?}"),
    }
}

/// A decoded `RL.ACQUIRE` / `RL.PEEK` reply.
#[derive(Debug, Clone)]
pub struct Decision {
    pub fields: HashMap<String, Value>,
    pub limits: Vec<HashMap<String, Value>>,
}

impl Decision {
    pub fn from(v: &Value) -> Decision {
        let fields = map_of(v);
        let limits = match fields.get("limits") {
            Some(Value::Array(items)) => items.iter().map(map_of).collect(),
            other => panic!("decision without limits: {other:?}"),
        };
        Decision { fields, limits }
    }

    pub fn allowed(&self) -> bool {
        self.int("allowed") == 1
    }

    pub fn int(&self, field: &str) -> i64 {
        match self.fields.get(field) {
            Some(Value::Int(n)) => *n,
            other => panic!("field {field}: expected an integer, got {other:?}"),
        }
    }

    pub fn str(&self, field: &str) -> Option<String> {
        match self.fields.get(field) {
            None | Some(Value::Nil) => None,
            Some(v) => Some(text(v)),
        }
    }

    pub fn retry_after_ms(&self) -> i64 {
        self.int("retry_after_ms")
    }

    /// A field of the limit named `name`.
    pub fn limit(&self, name: &str, field: &str) -> i64 {
        let limit = self
            .limits
            .iter()
            .find(|l| l.get("name").map(text).as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no limit {name} in {:?}", self.limits));
        match limit.get(field) {
            Some(Value::Int(n)) => *n,
            other => panic!("limit {name} field {field}: {other:?}"),
        }
    }

    pub fn remaining(&self, name: &str) -> i64 {
        self.limit(name, "remaining")
    }
}

pub fn decision(con: &mut Connection, args: &[&str]) -> Decision {
    Decision::from(&run(con, args))
}

/// `DEBUG DIGEST` of the whole dataset.
pub fn digest(con: &mut Connection) -> String {
    string(con, &["DEBUG", "DIGEST"])
}

/// Waits until `f` holds, or panics with `what` after `secs` seconds.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

/// Makes `replica` replicate `primary` and waits for the link and the initial sync.
pub fn attach_replica(primary: &Server, replica: &Server) {
    let mut r = replica.client();
    assert_eq!(
        string(
            &mut r,
            &["REPLICAOF", "127.0.0.1", &primary.port.to_string()]
        ),
        "OK"
    );
    wait_until(20, "master_link_status:up", || {
        string(&mut r, &["INFO", "replication"]).contains("master_link_status:up")
    });
}

/// Waits until the replica has processed everything the primary sent.
pub fn wait_in_sync(primary: &Server, replica: &Server) {
    let mut p = primary.client();
    let mut r = replica.client();
    wait_until(20, "replica offset to catch up", || {
        let offset = |info: String| -> i64 {
            info.lines()
                .find_map(|l| l.strip_prefix("master_repl_offset:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(-1)
        };
        let primary_offset = offset(string(&mut p, &["INFO", "replication"]));
        let replica_offset = offset(string(&mut r, &["INFO", "replication"]));
        primary_offset >= 0 && primary_offset == replica_offset
    });
}

/// The `tollgate` CLI under test: `$TOLLGATE_CLI`, else this checkout's CLI, built
/// first like the module (see `module_path`).
pub fn cli_path() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    artifact("TOLLGATE_CLI", &BUILT, "tollgate-cli", "tollgate")
}

/// Runs the CLI; returns (exit code, stdout, stderr).
pub fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cli_path())
        .args(args)
        .output()
        .expect("run the tollgate CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A Redis Cluster of real servers on loopback: `primaries` primaries, each with one
/// replica, created with `redis-cli --cluster create`.
pub struct Cluster {
    pub nodes: Vec<Server>,
}

impl Cluster {
    pub fn start(primaries: usize) -> Cluster {
        Cluster::start_with(primaries, &[])
    }

    /// The arguments every cluster node gets.
    pub const NODE_ARGS: [&'static str; 8] = [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "1500",
        "--appendonly",
        "yes",
    ];

    /// A cluster whose nodes also get `extra` arguments.
    pub fn start_with(primaries: usize, extra: &[&str]) -> Cluster {
        let args: Vec<&str> = Cluster::NODE_ARGS.iter().chain(extra).copied().collect();
        let nodes: Vec<Server> = (0..primaries * 2)
            .map(|_| Server::start_with(&args))
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create (install redis-tools)");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Cluster { nodes };
        cluster.wait_healthy(primaries);
        cluster
    }

    /// Waits until every live node says the cluster is ok and the expected number of
    /// primaries each have a replica.
    pub fn wait_healthy(&self, primaries: usize) {
        wait_until(30, "a healthy cluster", || {
            self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                n.try_client()
                    .ok()
                    .map(|mut con| {
                        let info = string(&mut con, &["CLUSTER", "INFO"]);
                        info.contains("cluster_state:ok")
                            && info.contains(&format!("cluster_size:{primaries}"))
                    })
                    .unwrap_or(false)
            })
        });
    }

    pub fn seed_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[0].port)
    }

    /// The node serving `key` as primary.
    pub fn primary_for(&self, key: &str) -> &Server {
        let mut con = self.nodes[0].client();
        let slot = int(&mut con, &["CLUSTER", "KEYSLOT", key]);
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .find(|n| {
                let mut c = n.client();
                let role = run(&mut c, &["ROLE"]);
                let primary = matches!(&role, Value::Array(items) if text(&items[0]) == "master");
                primary && {
                    let shards = string(&mut c, &["CLUSTER", "NODES"]);
                    shards
                        .lines()
                        .filter(|l| l.contains("myself"))
                        .any(|l| owns_slot(l, slot))
                }
            })
            .expect("a primary owns the slot")
    }

    pub fn index_of(&self, server: &Server) -> usize {
        self.nodes
            .iter()
            .position(|n| n.port == server.port)
            .unwrap()
    }
}

/// Whether a `CLUSTER NODES` line lists `slot` among its ranges.
fn owns_slot(line: &str, slot: i64) -> bool {
    line.split_whitespace()
        .skip(8)
        .any(|range| match range.split_once('-') {
            Some((a, b)) => {
                a.parse::<i64>().is_ok_and(|a| a <= slot)
                    && b.parse::<i64>().is_ok_and(|b| slot <= b)
            }
            None => range.parse::<i64>() == Ok(slot),
        })
}

impl Server {
    pub fn is_alive(&self) -> bool {
        self.child.is_some()
    }
}
