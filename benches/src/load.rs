//! A small pipelined load generator speaking raw RESP2.
//!
//! Every row of the server-side cost tables is driven by this one client, so rows
//! differ only in the commands they send: single commands, several commands per
//! logical call (sequential single-key acquires) or a script. Replies are read
//! fully and checked: an error reply, or a decision other than the expected one
//! (a denial would measure another path), stops the bench.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Appends one command, RESP-encoded, to `buf`.
pub fn push(buf: &mut Vec<u8>, args: &[&[u8]]) {
    buf.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        buf.extend_from_slice(a);
        buf.extend_from_slice(b"\r\n");
    }
}

/// Writes the commands of one logical call on `subject` into `buf`; returns how many
/// commands it wrote.
pub type Gen = dyn Fn(u64, &mut Vec<u8>) -> usize + Sync;

/// Which subjects the calls go to.
#[derive(Clone, Copy)]
pub enum Order {
    /// Each subject `0..subjects` once, in order (to create every key).
    Each,
    /// `calls` subjects drawn uniformly from `0..subjects`.
    Random { calls: u64, seed: u64 },
}

/// How the load is spread.
#[derive(Clone, Copy)]
pub struct Load {
    pub port: u16,
    pub connections: u64,
    /// Logical calls per round trip on each connection.
    pub pipeline: u64,
    pub subjects: u64,
}

impl Load {
    /// Sends the calls `gen` makes and reads every reply. `expect`: the first integer
    /// every reply must carry (`allowed` = 1 for a decision, `limited` = 0 for
    /// `CL.THROTTLE`), or `None` for any. Returns the wall time taken.
    pub fn run(&self, order: Order, gen: &Gen, expect: Option<i64>, what: &str) -> Duration {
        let start = Instant::now();
        std::thread::scope(|scope| {
            for t in 0..self.connections {
                scope.spawn(move || self.connection(t, order, gen, expect, what));
            }
        });
        start.elapsed()
    }

    fn connection(&self, t: u64, order: Order, gen: &Gen, expect: Option<i64>, what: &str) {
        let stream = TcpStream::connect(("127.0.0.1", self.port))
            .unwrap_or_else(|e| panic!("{what}: cannot connect: {e}"));
        let _ = stream.set_nodelay(true);
        let mut writer = stream.try_clone().unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut reader = BufReader::with_capacity(1 << 16, stream);
        let (mut next, end, mut rng) = match order {
            Order::Each => {
                let per = self.subjects.div_ceil(self.connections);
                let first = (t * per).min(self.subjects);
                (first, (first + per).min(self.subjects), 0)
            }
            Order::Random { calls, seed } => {
                let per = calls / self.connections;
                (
                    0,
                    per,
                    seed ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
                )
            }
        };
        let mut buf = Vec::with_capacity(1 << 16);
        let mut scratch = Vec::new();
        while next < end {
            buf.clear();
            let mut commands = 0;
            for _ in 0..self.pipeline {
                if next >= end {
                    break;
                }
                let subject = match order {
                    Order::Each => next,
                    Order::Random { .. } => {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng % self.subjects
                    }
                };
                commands += gen(subject, &mut buf);
                next += 1;
            }
            writer
                .write_all(&buf)
                .unwrap_or_else(|e| panic!("{what}: write: {e}"));
            for _ in 0..commands {
                let first =
                    reply(&mut reader, &mut scratch).unwrap_or_else(|e| panic!("{what}: {e}"));
                if let Some(want) = expect {
                    if first != Some(want) {
                        panic!(
                            "{what}: a reply's first integer is {first:?}, not {want}: \
                             the bench's limits must never deny"
                        );
                    }
                }
            }
        }
    }
}

/// Reads one reply; returns the first integer in it (depth first), if any.
fn reply<R: BufRead>(r: &mut R, scratch: &mut Vec<u8>) -> Result<Option<i64>, String> {
    let mut line = Vec::with_capacity(32);
    r.read_until(b'\n', &mut line)
        .map_err(|e| format!("read: {e}"))?;
    if line.len() < 3 {
        return Err("connection closed".into());
    }
    let body = &line[1..line.len() - 2];
    let number = || -> Result<i64, String> {
        std::str::from_utf8(body)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad reply line {:?}", String::from_utf8_lossy(&line)))
    };
    match line[0] {
        b'-' => Err(format!(
            "error reply: {}",
            String::from_utf8_lossy(body).trim_end()
        )),
        b':' => Ok(Some(number()?)),
        b'+' => Ok(None),
        b'$' => {
            let n = number()?;
            if n >= 0 {
                scratch.resize(n as usize + 2, 0);
                r.read_exact(scratch).map_err(|e| format!("read: {e}"))?;
            }
            Ok(None)
        }
        b'*' => {
            let n = number()?;
            let mut first = None;
            for _ in 0..n.max(0) {
                let inner = reply(r, scratch)?;
                first = first.or(inner);
            }
            Ok(first)
        }
        other => Err(format!("unexpected RESP2 type byte {:?}", other as char)),
    }
}
