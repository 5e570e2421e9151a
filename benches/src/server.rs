//! Starting redis-server processes for the bench, and reading what they report.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl Server {
    /// Nanoseconds the server's main thread has spent on a CPU (`/proc/<pid>/schedstat`):
    /// unlike `usec_per_call`, which is wall time inside each command, it does not
    /// grow when the server is descheduled on a busy machine, and it counts what a
    /// call costs outside the command too (reading, parsing, writing the reply).
    pub fn cpu_ns(&self) -> Option<u64> {
        let pid = self.child.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/schedstat"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts redis-server on a free loopback port with `modules` loaded (absolute
/// paths) and `extra` arguments; waits until it answers.
pub fn start_node(modules: &[String], extra: &[&str]) -> Server {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"));
    let dir = std::env::temp_dir().join(format!("tollgate-bench-{}-{port}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let mut command = Command::new("redis-server");
    command
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
        .args(extra);
    for module in modules {
        command.args(["--loadmodule", module]);
    }
    let child = command
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

pub fn connect(port: u16) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))?.get_connection()
}

pub fn cmd(con: &mut redis::Connection, args: &[&str]) -> redis::Value {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query(con).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

pub fn info(con: &mut redis::Connection, section: &str) -> String {
    match cmd(con, &["INFO", section]) {
        redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        redis::Value::VerbatimString { text, .. } => text,
        other => panic!("INFO gave {other:?}"),
    }
}

pub fn info_field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
}

/// `(calls, usec)` of `command` since the last `CONFIG RESETSTAT` (zeros if none).
pub fn command_stat(con: &mut redis::Connection, command: &str) -> (u64, u64) {
    let stats = info(con, "commandstats");
    let line = info_field(&stats, &format!("cmdstat_{command}:")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        line.split(',')
            .find_map(|kv| kv.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("calls="), field("usec="))
}

/// `usec_per_call` of `command` since the last `CONFIG RESETSTAT`.
pub fn usec_per_call(con: &mut redis::Connection, command: &str) -> f64 {
    match command_stat(con, command) {
        (0, _) => f64::NAN,
        (calls, usec) => usec as f64 / calls as f64,
    }
}

/// `used_memory` in bytes.
pub fn used_memory(con: &mut redis::Connection) -> f64 {
    info_field(&info(con, "memory"), "used_memory:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

pub fn redis_version(con: &mut redis::Connection) -> String {
    info_field(&info(con, "server"), "redis_version:").unwrap_or_default()
}

/// Requests per second `redis-benchmark` reports for `args` (CSV output), 50 clients,
/// with `__rand_int__` drawn from `0..range` (zero-padded to 12 digits).
pub fn redis_benchmark(port: u16, pipeline: u32, requests: u64, range: u64, args: &[&str]) -> f64 {
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
