//! A fuzz driver against live servers: random command sequences over a small key
//! space, with valid and hostile arguments (amounts near 2^63 and 2^64, ids shared
//! across commands, empty and oversized strings, wrong types, MULTI/EXEC, scripts,
//! RESP3), and hostile `RESTORE` payloads (real `DUMP`s of the module's values, mutated
//! and re-sealed with a valid checksum), on a primary with `appendfsync always` and an
//! attached replica.
//!
//! Every reply must be a value or an error reply with a known code; "internal error",
//! a dropped connection, a hang or a panic in a server log is a failure. A `RESTORE`
//! of a `DUMP` must be accepted; a hostile one must be refused, or leave a key that
//! every command then serves. After every batch of commands: each credits key's
//! balance is the sum of its blocks, `DEBUG RELOAD` keeps the digest, `DBSIZE` and
//! plans, and the replica reaches the primary's digest and plans. Every 12th batch
//! and at the end, a `kill -9` and a restart from the AOF keep the digest, and the
//! replica's full sync from the restarted primary reaches it.
//!
//! `TOLLGATE_FUZZ_SECONDS` sets the length (default 20; `make fuzz` runs 10 minutes),
//! `TOLLGATE_FUZZ_SEED` the seed (`random` picks one; unset: a fixed one, so `make
//! test` is repeatable). After a failure the driver starts fresh servers and goes on
//! until the time is up, and fails with every distinct failure found: each with the
//! seed, the last commands (quoted for `redis-cli`), the server logs, and the failing
//! sequence minimized by replaying it on fresh servers (`TOLLGATE_FUZZ_MINIMIZE`
//! seconds per failure, default 60, 0 to skip).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::{Connection, Value};

use crate::harness::*;

const DEFAULT_SECONDS: f64 = 20.0;
const DEFAULT_SEED: u64 = 0x7011_6a7e;
/// Commands kept for the failure report.
const HISTORY: usize = 80;
/// A key whose TTL ends within this many ms is waited out before a check.
const QUIET_MS: i64 = 1_500;

// ---------------------------------------------------------------------------------
// Randomness

/// xorshift64*, seeded through splitmix64: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// True `percent` times out of 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

// ---------------------------------------------------------------------------------
// Argument pools

const SUBJECTS: &[&str] = &["s:0", "s:1", "s:2", "s:3", "s:4"];
const CREDITS: &[&str] = &["c:0", "c:1", "c:2", "cr"];
/// A string, a hash, spare names for COPY/RENAME/RESTORE targets.
const OTHERS: &[&str] = &["str", "h", "x:0", "x:1", "r:0", "r:1"];

const PLANS: &[&str] = &["free", "pro", "ep", "shadow", "huge", "tiny", "fast"];
const BASE_PLANS: &[(&str, &[(&str, &str)])] = &[
    (
        "free",
        &[
            ("rpm", "sliding 10/1h precision 12"),
            ("rpd", "fixed 200/1d"),
            ("tpm", "bucket 2000 token/1h burst 4000"),
            ("jobs", "concurrency 4 ttl 1h"),
            ("big", "cap 2000 token"),
            ("spend", "fixed 1000000 usd/1mo warn 80%"),
        ],
    ),
    (
        "pro",
        &[
            ("rpm", "sliding 60/1h"),
            ("rpd", "fixed 2000/1d"),
            ("tpm", "bucket 100000 token/1h"),
            ("jobs", "concurrency 20 ttl 2h"),
            ("fallback", "free"),
        ],
    ),
    (
        "ep",
        &[
            ("chat", "fixed 50/1d for chat"),
            ("emb", "sliding 1000 token/10m precision 600 for embed,chat"),
            ("all", "fixed 1000/1h warn 90%"),
            ("fallback", "pro"),
        ],
    ),
    (
        "shadow",
        &[
            ("rpm", "fixed 2/1h"),
            ("tpm", "bucket 10 token/1h burst 10"),
            ("mode", "shadow"),
            ("fallback", "free"),
        ],
    ),
    (
        "huge",
        &[
            ("rpd", "fixed 18446744073709551615/3650d"),
            (
                "tpm",
                "bucket 18446744073709551615 token/1h burst 18446744073709551615",
            ),
            ("c", "cap 18446744073709551615 token"),
            ("spend", "sliding 18446744073709551615 usd/1h precision 600"),
            ("jobs", "concurrency 18446744073709551615 ttl 1h"),
        ],
    ),
    (
        "tiny",
        &[
            ("rpm", "sliding 1/1h precision 600"),
            ("b", "bucket 1 token/1h burst 1"),
            ("conc", "concurrency 1 ttl 1h"),
            ("month", "fixed 3 usd/1mo"),
            ("c", "cap 1 token"),
        ],
    ),
    (
        "fast",
        &[
            ("rps", "sliding 1000/1s precision 10"),
            ("tps", "bucket 5 token/1s burst 50"),
            ("day", "fixed 100000/1d"),
            ("ms", "fixed 3/10ms"),
        ],
    ),
];

const SMALL: &[&str] = &[
    "0", "1", "1", "1", "2", "3", "5", "7", "10", "50", "100", "500", "1000", "2000", "4000",
];
const EXTREME: &[&str] = &[
    "4294967295",
    "4294967296",
    "9007199254740993",
    "9223372036854775806",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551613",
    "18446744073709551614",
    "18446744073709551614",
    "18446744073709551615",
    "18446744073709551615",
];
const GARBAGE_NUMBERS: &[&str] = &[
    "18446744073709551616",
    "99999999999999999999999",
    "-1",
    "-9223372036854775808",
    "1.5",
    "1e3",
    "+1",
    "0x10",
    " 1",
    "",
    "abc",
    "00000000000000000000001",
];
const IDS: &[&str] = &["A", "B", "C", "d1", "d2", "r1", "r2", "job-1"];
const UNITS: &[&str] = &["request", "token", "usd", "token", "lease", "image"];
const ENDPOINTS: &[&str] = &["chat", "embed", "image"];
const LIMIT_NAMES: &[&str] = &[
    "rpm", "rpd", "tpm", "jobs", "big", "spend", "chat", "b", "c", "x", "Rpm",
];
const SPECS: &[&str] = &[
    "fixed 10/1h",
    "fixed 200/1d",
    "fixed 2 token/1d",
    "fixed 1000000 usd/1mo warn 80%",
    "fixed 5/1d for chat",
    "fixed 18446744073709551615/3650d",
    "fixed 1 token/120mo",
    "fixed 3/10ms",
    "sliding 10/1h precision 12",
    "sliding 100 token/1h precision 600",
    "sliding 60/10m precision 600",
    "sliding 3/1h precision 1",
    "sliding 18446744073709551615/1h",
    "sliding 100/1s",
    "bucket 2000 token/1h burst 4000",
    "bucket 1/1h burst 1",
    "bucket 18446744073709551615 token/1ms burst 18446744073709551615",
    "bucket 10/1s burst 100000",
    "bucket 100/1h warn 50%",
    "bucket 3 usd/1d burst 0",
    "concurrency 4 ttl 1h",
    "concurrency 1",
    "concurrency 18446744073709551615 ttl 10ms",
    "concurrency 0 ttl 1h",
    "cap 2000 token",
    "cap 0",
    "cap 18446744073709551615 usd",
    "fixed 10 token/1h for embed,image",
    // hostile
    "fixed 0/0s",
    "sliding 10/1h precision 0",
    "sliding 10/1h precision 601",
    "bucket 1/0ms",
    "fixed 10/1mo for",
    "fixed 18446744073709551616/1h",
    "concurrency -1",
    "bogus",
    "",
    "fixed 10 lease/1h",
    "fixed 10/3651d",
    "fixed 1/1ms warn 0%",
    "fixed 1/1ms warn 101%",
    "sliding 5 COST/1h",
    "sliding 5/1mo",
];

// ---------------------------------------------------------------------------------
// Commands and replies

type Args = Vec<Vec<u8>>;

fn args(items: &[&str]) -> Args {
    items.iter().map(|s| s.as_bytes().to_vec()).collect()
}

/// An argument as `redis-cli` accepts it: bare when plain, else double-quoted with
/// `\xHH` escapes; a long run of one byte is shown as `'c'*n`.
fn quote(arg: &[u8]) -> String {
    if arg.len() > 16 && arg.iter().all(|&b| b == arg[0]) {
        return format!("{}*{}", quote(&arg[..1]), arg.len());
    }
    let plain = !arg.is_empty()
        && arg
            .iter()
            .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\'' && b != b'\\');
    if plain {
        return String::from_utf8_lossy(arg).into_owned();
    }
    let mut out = String::from("\"");
    for &b in arg {
        if b.is_ascii_graphic() && b != b'"' && b != b'\\' || b == b' ' {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out.push('"');
    out
}

fn command_line(args: &[Vec<u8>]) -> String {
    args.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
}

/// A compact rendering of a reply for the history.
fn render(v: &Value) -> String {
    let mut s = match v {
        Value::Nil => "nil".to_string(),
        Value::Int(n) => n.to_string(),
        Value::BulkString(b) => quote(b),
        Value::SimpleString(s) => s.clone(),
        Value::Okay => "OK".into(),
        Value::Array(items) | Value::Set(items) => {
            format!(
                "[{}]",
                items.iter().map(render).collect::<Vec<_>>().join(" ")
            )
        }
        Value::Map(pairs) => format!(
            "{{{}}}",
            pairs
                .iter()
                .map(|(k, v)| format!("{}: {}", render(k), render(v)))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Value::ServerError(e) => format!("(error) {} {}", e.code(), e.details().unwrap_or("")),
        other => format!("{other:?}"),
    };
    if s.len() > 300 {
        let mut cut = 300;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// An error reply nested in a reply (`EXEC`, scripts) that is a failure.
fn bad_nested_error(v: &Value) -> Option<String> {
    match v {
        Value::ServerError(e) => {
            let text = format!("{} {}", e.code(), e.details().unwrap_or(""));
            bad_error(&text).then_some(text)
        }
        Value::Array(items) | Value::Set(items) => items.iter().find_map(bad_nested_error),
        Value::Map(pairs) => pairs
            .iter()
            .find_map(|(k, v)| bad_nested_error(k).or_else(|| bad_nested_error(v))),
        _ => None,
    }
}

/// Error replies a command may give: Redis's and the module's ordinary codes. Anything
/// else, and any "internal error", is a failure.
fn bad_error(text: &str) -> bool {
    let code = text.split(' ').next().unwrap_or("");
    let known = ["ERR", "WRONGTYPE", "BUSYKEY", "EXECABORT"].contains(&code);
    !known || text.contains("internal error")
}

enum Reply {
    Value(Value),
    Error(String),
}

impl Reply {
    fn bytes(&self) -> Option<Vec<u8>> {
        match self {
            Reply::Value(Value::BulkString(b)) => Some(b.clone()),
            _ => None,
        }
    }

    fn is_ok(&self) -> bool {
        matches!(self, Reply::Value(_))
    }
}

// ---------------------------------------------------------------------------------
// DUMP payloads: parse, mutate, re-seal

/// Redis's CRC-64 (Jones polynomial, reflected, init 0), as `DUMP` uses.
fn crc64(data: &[u8]) -> u64 {
    let mut crc = 0u64;
    for &b in data {
        crc ^= u64::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x95ac_9329_ac4b_c9b5
            } else {
                crc >> 1
            };
        }
    }
    crc
}

fn take<'a>(b: &'a [u8], pos: &mut usize, n: usize) -> Option<&'a [u8]> {
    let out = b.get(*pos..pos.checked_add(n)?)?;
    *pos += n;
    Some(out)
}

/// An RDB length: the value and whether it is a special string encoding.
fn read_len(b: &[u8], pos: &mut usize) -> Option<(u64, bool)> {
    let first = *take(b, pos, 1)?.first()?;
    match first >> 6 {
        0 => Some((u64::from(first & 0x3f), false)),
        1 => {
            let second = *take(b, pos, 1)?.first()?;
            Some(((u64::from(first & 0x3f) << 8) | u64::from(second), false))
        }
        2 => match first {
            0x80 => Some((
                u64::from(u32::from_be_bytes(take(b, pos, 4)?.try_into().ok()?)),
                false,
            )),
            0x81 => Some((u64::from_be_bytes(take(b, pos, 8)?.try_into().ok()?), false)),
            _ => None,
        },
        _ => Some((u64::from(first & 0x3f), true)),
    }
}

fn write_len(out: &mut Vec<u8>, len: u64) {
    if len < 64 {
        out.push(len as u8);
    } else if len < 16_384 {
        out.push(0x40 | (len >> 8) as u8);
        out.push(len as u8);
    } else if let Ok(len) = u32::try_from(len) {
        out.push(0x80);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(0x81);
        out.extend_from_slice(&len.to_be_bytes());
    }
}

fn lzf_decompress(input: &[u8], out_len: usize) -> Option<Vec<u8>> {
    let mut out: Vec<u8> = Vec::with_capacity(out_len);
    let mut i = 0;
    while i < input.len() {
        let ctrl = usize::from(input[i]);
        i += 1;
        if ctrl < 32 {
            out.extend_from_slice(input.get(i..i + ctrl + 1)?);
            i += ctrl + 1;
        } else {
            let mut len = ctrl >> 5;
            if len == 7 {
                len += usize::from(*input.get(i)?);
                i += 1;
            }
            let back = ((ctrl & 0x1f) << 8) + usize::from(*input.get(i)?) + 1;
            i += 1;
            let start = out.len().checked_sub(back)?;
            for k in 0..len + 2 {
                let b = *out.get(start + k)?;
                out.push(b);
            }
        }
    }
    (out.len() == out_len).then_some(out)
}

fn read_string(b: &[u8], pos: &mut usize) -> Option<Vec<u8>> {
    let (len, encoded) = read_len(b, pos)?;
    if !encoded {
        return Some(take(b, pos, usize::try_from(len).ok()?)?.to_vec());
    }
    match len {
        0 => Some((take(b, pos, 1)?[0] as i8).to_string().into_bytes()),
        1 => Some(
            i16::from_le_bytes(take(b, pos, 2)?.try_into().ok()?)
                .to_string()
                .into_bytes(),
        ),
        2 => Some(
            i32::from_le_bytes(take(b, pos, 4)?.try_into().ok()?)
                .to_string()
                .into_bytes(),
        ),
        3 => {
            let (clen, _) = read_len(b, pos)?;
            let (ulen, _) = read_len(b, pos)?;
            let data = take(b, pos, usize::try_from(clen).ok()?)?;
            lzf_decompress(data, usize::try_from(ulen).ok()?)
        }
        _ => None,
    }
}

/// A module value's `DUMP`: the type byte and module id, the string buffers the
/// module saved, and the RDB version of the footer.
#[derive(Clone)]
struct Dump {
    head: Vec<u8>,
    strings: Vec<Vec<u8>>,
    version: [u8; 2],
}

const RDB_TYPE_MODULE_2: u8 = 7;
const MODULE_OPCODE_EOF: u64 = 0;
const MODULE_OPCODE_STRING: u64 = 5;

impl Dump {
    fn parse(payload: &[u8]) -> Option<Dump> {
        let body_len = payload.len().checked_sub(10)?;
        let body = &payload[..body_len];
        let version = [payload[body_len], payload[body_len + 1]];
        if *body.first()? != RDB_TYPE_MODULE_2 {
            return None;
        }
        let mut pos = 1;
        read_len(body, &mut pos)?;
        let head = body[..pos].to_vec();
        let mut strings = Vec::new();
        loop {
            match read_len(body, &mut pos)? {
                (MODULE_OPCODE_EOF, false) => break,
                (MODULE_OPCODE_STRING, false) => strings.push(read_string(body, &mut pos)?),
                _ => return None,
            }
        }
        (pos == body.len()).then_some(Dump {
            head,
            strings,
            version,
        })
    }

    fn seal(&self) -> Vec<u8> {
        let mut out = self.head.clone();
        for s in &self.strings {
            write_len(&mut out, MODULE_OPCODE_STRING);
            write_len(&mut out, s.len() as u64);
            out.extend_from_slice(s);
        }
        write_len(&mut out, MODULE_OPCODE_EOF);
        seal(out, self.version)
    }
}

/// Appends the RDB version and the CRC-64 of everything before it.
fn seal(mut body: Vec<u8>, version: [u8; 2]) -> Vec<u8> {
    body.extend_from_slice(&version);
    let crc = crc64(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    body
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    out
}

/// Where LEB128 varints start if the buffer is read as nothing but varints: exact
/// up to the first byte string, and realigned soon after it.
fn varint_starts(s: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, &b) in s.iter().enumerate() {
        if b & 0x80 == 0 {
            out.push((start, i + 1 - start));
            start = i + 1;
        }
    }
    out
}

fn extreme_value(rng: &mut Rng) -> u64 {
    let now = now_ms();
    let values = [
        0,
        1,
        2,
        127,
        128,
        255,
        u64::from(u32::MAX),
        1 << 32,
        1 << 53,
        i64::MAX as u64,
        1 << 63,
        u64::MAX - 1,
        u64::MAX,
        u64::MAX,
        now,
        now + 1,
        now - 3_600_000,
        now + 3_600_000,
        rng.next(),
        rng.next() >> 40,
    ];
    values[rng.below(values.len())]
}

/// Mutates a module's saved bytes; returns what was done.
fn mutate_bytes(rng: &mut Rng, s: &mut Vec<u8>, donor: &[u8]) -> String {
    let mut done = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let len = s.len();
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                let bit = rng.below(8);
                s[i] ^= 1 << bit;
                done.push(format!("flip byte {i} bit {bit}"));
            }
            1 if len > 0 => {
                let i = rng.below(len);
                s[i] = rng.next() as u8;
                done.push(format!("set byte {i}"));
            }
            2 => {
                let at = rng.below(len + 1);
                s.truncate(at);
                done.push(format!("truncate at {at}"));
            }
            3 if !donor.is_empty() => {
                let from = rng.below(donor.len());
                let n = 1 + rng.below(donor.len() - from);
                let at = rng.below(len + 1);
                let cut = rng.below(len - at + 1).min(n);
                s.splice(at..at + cut, donor[from..from + n].iter().copied());
                done.push(format!("splice {n} donor bytes at {at} over {cut}"));
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below(len - at);
                s.drain(at..at + n);
                done.push(format!("delete {n} at {at}"));
            }
            5 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below(len - at);
                let copy: Vec<u8> = s[at..at + n].to_vec();
                let to = rng.below(len + 1);
                s.splice(to..to, copy);
                done.push(format!("duplicate {n} at {at} to {to}"));
            }
            6 if !donor.is_empty() => {
                *s = donor.to_vec();
                done.push("replace with the donor".into());
            }
            _ => {
                let starts = varint_starts(s);
                if starts.is_empty() {
                    continue;
                }
                // Early varints are the header fields (times, sequences, counts).
                let which = if rng.chance(50) {
                    rng.below(starts.len().min(8))
                } else {
                    rng.below(starts.len())
                };
                let (at, n) = starts[which];
                let value = extreme_value(rng);
                s.splice(at..at + n, varint(value));
                done.push(format!("varint #{which} at {at} = {value}"));
            }
        }
    }
    done.join(", ")
}

// ---------------------------------------------------------------------------------
// The driver

#[derive(Default, Debug)]
struct Stats {
    commands: u64,
    errors: u64,
    batches: u64,
    reloads: u64,
    rewrites: u64,
    aof_restarts: u64,
    restores_hostile: u64,
    restores_accepted: u64,
    /// `RL.APPLY` calls with a payload the primary wrote to its AOF.
    forged_applies: u64,
    quiet_wait_ms: u64,
}

/// Surface added by later SPEC revisions, found at start-up.
#[derive(Default, Debug)]
struct Features {
    compact: bool,
    usage: bool,
    also: bool,
    /// `RL.APPLY` is refused from ordinary clients (then the driver sends it, with
    /// real payloads taken from the AOF, and every call must fail).
    apply_refused: bool,
}

struct Fuzzer {
    seed: u64,
    rng: Rng,
    primary: Option<Server>,
    replica: Server,
    p: Connection,
    /// A RESP3 connection to the primary, for some of the commands.
    p3: Connection,
    /// Send the next command on `p3`.
    resp3: bool,
    r: Connection,
    history: VecDeque<String>,
    stats: Stats,
    features: Features,
    /// How much of each server log was already checked for panics.
    log_seen: (usize, usize),
    started: Instant,
    /// Every step sent so far outside the checks, for the minimizer.
    trace: Vec<Step>,
    /// The commands of a MULTI/EXEC being sent, traced as one step.
    group: Option<Vec<Args>>,
    /// What the driver is doing, which names the kind of a failure.
    phase: Kind,
    /// `RL.APPLY` (key, payload) pairs the primary wrote to its AOF.
    applies: Vec<(Vec<u8>, Vec<u8>)>,
    /// Error replies by command and message, to see what the generator spends on.
    error_counts: BTreeMap<String, u64>,
}

/// What failed, which says how a replay shows it again.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// A reply: internal error, unknown error code, lost connection, or a RESTORE of
    /// an intact DUMP refused.
    Reply,
    /// A panic or crash report in a server log.
    Log,
    /// `DEBUG RELOAD` failed or changed the dataset or plans.
    Reload,
    /// The replica's dataset or plans differ from the primary's.
    Replica,
    /// A restart from the AOF changed the dataset or plans.
    Aof,
    /// A credits key's balance is not the sum of its blocks.
    Credits,
}

/// Commands the minimizer keeps or drops together (a MULTI/EXEC is one step).
#[derive(Clone, Debug)]
struct Step {
    commands: Vec<Args>,
    /// `DUMP` then `RESTORE` of what it gave: replays restore what the `DUMP` gives
    /// then, and a refusal is a failure.
    copy: bool,
    /// Sent on a RESP3 connection.
    resp3: bool,
    /// Must be refused (`RL.APPLY` from a client).
    refused: bool,
}

/// Sends one command: a value, an ordinary error reply, or a failure (a bad error
/// reply or a lost connection), with the line for the history.
fn send(con: &mut Connection, args: &[Vec<u8>]) -> (String, Result<Reply, String>) {
    let line = command_line(args);
    let mut cmd = redis::cmd(std::str::from_utf8(&args[0]).unwrap_or("?"));
    for a in &args[1..] {
        cmd.arg(a.as_slice());
    }
    match cmd.query::<Value>(con) {
        Ok(v) => {
            let shown = format!("{line}  -> {}", render(&v));
            match bad_nested_error(&v) {
                Some(e) => (
                    shown,
                    Err(format!("{line} answered an error inside its reply: {e}")),
                ),
                None => (shown, Ok(Reply::Value(v))),
            }
        }
        Err(e) if e.code().is_some() => {
            let text = error_text(&e);
            let shown = format!("{line}  -> (error) {text}");
            if bad_error(&text) {
                (shown, Err(format!("{line} answered: {text}")))
            } else {
                (shown, Ok(Reply::Error(text)))
            }
        }
        Err(e) => (
            format!("{line}  -> CONNECTION FAILURE {e}"),
            Err(format!("{line} lost the connection: {e}")),
        ),
    }
}

/// A primary with the AOF on and a replica attached to it.
fn fresh_servers() -> (Server, Server, Connection, Connection) {
    let primary = Server::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let replica = Server::start();
    attach_replica(&primary, &replica);
    let p = connect(&primary);
    let r = connect(&replica);
    (primary, replica, p, r)
}

fn connect_resp3(server: &Server) -> Connection {
    let con = server.client_resp3();
    con.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set a read timeout");
    con
}

fn connect(server: &Server) -> Connection {
    let con = server.client();
    con.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set a read timeout");
    con
}

fn keys_of(v: &Value) -> Vec<Vec<u8>> {
    match v {
        Value::Array(items) | Value::Set(items) => items
            .iter()
            .filter_map(|i| match i {
                Value::BulkString(b) => Some(b.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

type Check = Result<(), String>;

impl Fuzzer {
    fn start(seed: u64) -> Fuzzer {
        let (primary, replica, p, r) = fresh_servers();
        let p3 = connect_resp3(&primary);
        Fuzzer {
            seed,
            rng: Rng::new(seed),
            primary: Some(primary),
            replica,
            p,
            p3,
            resp3: false,
            r,
            history: VecDeque::new(),
            stats: Stats::default(),
            features: Features::default(),
            log_seen: (0, 0),
            started: Instant::now(),
            trace: Vec::new(),
            group: None,
            phase: Kind::Reply,
            applies: Vec::new(),
            error_counts: BTreeMap::new(),
        }
    }

    /// New servers after a failure, to look for the next one.
    fn restart_servers(&mut self) {
        self.primary = None;
        let (primary, replica, p, r) = fresh_servers();
        self.p3 = connect_resp3(&primary);
        self.primary = Some(primary);
        self.replica = replica;
        self.p = p;
        self.r = r;
        self.log_seen = (0, 0);
        self.trace.clear();
        self.group = None;
        self.history.clear();
        self.phase = Kind::Reply;
    }

    /// What tells one failure from another, so each is reported once.
    fn signature(&self, reason: &str) -> String {
        let norm = |s: &str| -> String {
            let mut out = String::new();
            for c in s.chars().take(160) {
                if c.is_ascii_digit() {
                    if !out.ends_with('#') {
                        out.push('#');
                    }
                } else {
                    out.push(c);
                }
            }
            out
        };
        let log = self.primary.as_ref().map(|p| p.log()).unwrap_or_default();
        let new_log = log.get(self.log_seen.0..).unwrap_or("");
        // Hostile RESTOREs log refusals all the time: the last one is the relevant.
        let refusal = new_log
            .lines()
            .rev()
            .find(|l| l.contains("refusing") || l.contains("cannot load"))
            .and_then(|l| l.split("<tollgate> ").nth(1))
            .map(norm);
        let panic_at = new_log
            .split("panicked at ")
            .nth(1)
            .and_then(|rest| rest.lines().next())
            .map(|line| line.trim_end_matches(':').to_string());
        let first = reason.lines().next().unwrap_or("");
        let command = first.split(' ').next().unwrap_or("");
        let phase = self.phase;
        match (phase, panic_at, refusal) {
            (Kind::Reply, Some(at), _) => format!("Reply: {command} panicked at {at}"),
            (_, Some(at), _) => format!("{phase:?}: panicked at {at}"),
            (Kind::Reply, None, Some(refusal)) if first.starts_with("RESTORE of an intact") => {
                format!("Reply: RESTORE of an intact DUMP refused: {refusal}")
            }
            (Kind::Reload | Kind::Aof | Kind::Replica, None, Some(refusal)) => {
                format!("{phase:?}: {refusal}")
            }
            (Kind::Reply, None, _) => {
                let what = first
                    .split_once(" answered")
                    .or_else(|| first.split_once(" lost the connection"))
                    .map_or(first, |(_, rest)| rest);
                format!("Reply: {command} {}", norm(what))
            }
            (Kind::Credits, None, _) => "Credits: the balance is not the sum of the blocks".into(),
            (Kind::Replica, None, None) => "Replica: the digest differs".into(),
            _ => format!("{phase:?}: {}", norm(first)),
        }
    }

    fn primary(&self) -> &Server {
        self.primary.as_ref().expect("the primary")
    }

    fn note(&mut self, line: String) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(line);
    }

    /// Runs one command on the primary: a value, an ordinary error, or a failure.
    fn call(&mut self, args: &[Vec<u8>]) -> Result<Reply, String> {
        self.stats.commands += 1;
        if self.phase == Kind::Reply {
            match self.group.as_mut() {
                Some(group) => group.push(args.to_vec()),
                None => self.trace.push(Step {
                    commands: vec![args.to_vec()],
                    copy: false,
                    resp3: self.resp3,
                    refused: false,
                }),
            }
        }
        let (shown, result) = if std::mem::take(&mut self.resp3) {
            let (shown, result) = send(&mut self.p3, args);
            (format!("(resp3) {shown}"), result)
        } else {
            send(&mut self.p, args)
        };
        self.note(shown);
        if let Ok(Reply::Error(e)) = &result {
            self.stats.errors += 1;
            let command = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
            let what: String = e.chars().take(48).filter(|c| !c.is_ascii_digit()).collect();
            *self
                .error_counts
                .entry(format!("{command}: {what}"))
                .or_insert(0) += 1;
        }
        result
    }

    fn call_str(&mut self, items: &[&str]) -> Result<Reply, String> {
        self.call(&args(items))
    }

    /// A command that must succeed (setup and checks).
    fn must(&mut self, items: &[&str]) -> Result<Value, String> {
        match self.call_str(items)? {
            Reply::Value(v) => Ok(v),
            Reply::Error(e) => Err(format!("{} failed: {e}", command_line(&args(items)))),
        }
    }

    fn must_string(&mut self, items: &[&str]) -> Result<String, String> {
        let v = self.must(items)?;
        Ok(match &v {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            Value::SimpleString(s) => s.clone(),
            Value::Okay => "OK".into(),
            Value::Int(n) => n.to_string(),
            other => render(other),
        })
    }

    fn install_plans(&mut self) -> Check {
        // Drop every plan first: edited plans may hold fallbacks and limits that the
        // base plans would conflict with. The default plan cannot be deleted, so a
        // placeholder is the default meanwhile.
        self.must(&["RL.PLAN.SET", "fuzz:default", "rpd", "fixed 100/1d"])?;
        self.must(&["RL.PLAN.DEFAULT", "fuzz:default"])?;
        let listed = self.must(&["RL.PLAN.LIST"])?;
        for plan in keys_of(&listed) {
            if plan != b"fuzz:default" {
                self.call(&[b"RL.PLAN.DEL".to_vec(), plan])?;
            }
        }
        for (plan, fields) in BASE_PLANS {
            let mut items = vec!["RL.PLAN.SET", *plan];
            for (field, spec) in *fields {
                items.push(field);
                items.push(spec);
            }
            self.must(&items)?;
        }
        self.must(&["RL.PLAN.DEFAULT", "free"])?;
        self.must(&["RL.PLAN.DEL", "fuzz:default"])?;
        Ok(())
    }

    fn setup(&mut self) -> Check {
        self.install_plans()?;
        self.must(&["SET", "str", "x"])?;
        self.must(&["HSET", "h", "f", "v"])?;
        self.must(&["RL.ASSIGN", "s:0", "pro"])?;
        self.must(&["RL.CREDITS.GRANT", "c:0", "1000", "ID", "A"])?;
        self.must(&["RL.CREDITS.GRANT", "c:1", "500", "TTL", "3600000"])?;
        self.must(&["RL.ACQUIRE", "s:1", "free", "1", "COST", "token", "10"])?;
        // Surface of later SPEC revisions, when this build has it.
        self.features.compact = self
            .call_str(&["RL.PEEK", "s:1", "free", "COMPACT"])?
            .is_ok();
        self.features.usage = self.call_str(&["RL.USAGE", "s:1", "free"])?.is_ok();
        self.features.also = self
            .call_str(&["RL.PEEK", "s:1", "free", "ALSO", "1", "s:2", "pro"])?
            .is_ok();
        self.features.apply_refused = match self.call_str(&["RL.APPLY", "s:1", "x"])? {
            Reply::Error(e) => !e.contains("invalid RL.APPLY payload"),
            Reply::Value(_) => false,
        };
        Ok(())
    }

    // --- generators -------------------------------------------------------------

    fn subject_key(&mut self) -> &'static str {
        match self.rng.below(10) {
            0 => self.rng.pick(CREDITS),
            1 => self.rng.pick(OTHERS),
            _ => self.rng.pick(SUBJECTS),
        }
    }

    fn credits_key(&mut self) -> &'static str {
        match self.rng.below(10) {
            0 => self.rng.pick(SUBJECTS),
            1 => self.rng.pick(OTHERS),
            _ => self.rng.pick(CREDITS),
        }
    }

    fn any_key(&mut self) -> &'static str {
        match self.rng.below(3) {
            0 => self.rng.pick(SUBJECTS),
            1 => self.rng.pick(CREDITS),
            _ => self.rng.pick(OTHERS),
        }
    }

    fn plan(&mut self) -> String {
        match self.rng.below(20) {
            0 => "*".into(),
            1 => "nosuch".into(),
            2 => "".into(),
            _ => self.rng.pick(PLANS).into(),
        }
    }

    /// An amount: mostly small, often extreme, sometimes not a number at all.
    fn amount(&mut self, extreme_percent: u64) -> String {
        if self.rng.chance(extreme_percent) {
            self.rng.pick(EXTREME).into()
        } else if self.rng.chance(8) {
            self.rng.pick(GARBAGE_NUMBERS).into()
        } else {
            self.rng.pick(SMALL).into()
        }
    }

    fn id(&mut self) -> Vec<u8> {
        match self.rng.below(30) {
            0 => Vec::new(),
            1 => vec![b'i'; 256],
            2 => vec![b'i'; 257],
            3 => b"\x00\xff id".to_vec(),
            4 => b"COST".to_vec(),
            _ => self.rng.pick(IDS).as_bytes().to_vec(),
        }
    }

    fn ttl_ms(&mut self) -> String {
        self.rng
            .pick(&[
                "1",
                "20",
                "100",
                "60000",
                "3600000",
                "86400000",
                "315360000000",
                "315360000001",
                "0",
                "-1",
                "18446744073709551615",
                "abc",
            ])
            .into()
    }

    fn costs(&mut self, a: &mut Args) {
        a.push(b"COST".to_vec());
        for _ in 0..1 + self.rng.below(3) {
            let unit = if self.rng.chance(5) {
                self.rng.pick(&["", "COST", "Token", "ID", "u\x00"])
            } else {
                self.rng.pick(UNITS)
            };
            a.push(unit.into());
            if !self.rng.chance(3) {
                a.push(self.amount(20).into_bytes());
            }
        }
    }

    fn also(&mut self, a: &mut Args) {
        let pairs = 1 + self.rng.below(3);
        let count = if self.rng.chance(10) {
            self.rng
                .pick(&["0", "-1", "3", "18446744073709551615", "x"])
                .into()
        } else {
            pairs.to_string()
        };
        a.push(b"ALSO".to_vec());
        a.push(count.into_bytes());
        for _ in 0..pairs {
            let key = self.subject_key();
            let plan = self.plan();
            a.push(key.into());
            a.push(plan.into_bytes());
        }
    }

    /// `RL.ACQUIRE` or `RL.PEEK` with random options, in random order.
    fn decision_command(&mut self, name: &str) -> Args {
        let mut a = args(&[name, self.subject_key()]);
        let plan = self.plan();
        a.push(plan.into_bytes());
        if self.rng.chance(50) {
            let units = self.amount(10);
            a.push(units.into_bytes());
        }
        let acquire = name == "RL.ACQUIRE";
        let mut options: Vec<Args> = Vec::new();
        if self.rng.chance(50) {
            let mut o = Vec::new();
            self.costs(&mut o);
            options.push(o);
        }
        if self.rng.chance(25) {
            let e = if self.rng.chance(10) {
                "nope"
            } else {
                self.rng.pick(ENDPOINTS)
            };
            options.push(args(&["ENDPOINT", e]));
        }
        if acquire && self.rng.chance(50) {
            let id = self.id();
            options.push(vec![b"ID".to_vec(), id]);
        }
        if acquire && self.rng.chance(15) {
            let ttl = self.ttl_ms();
            options.push(vec![b"TTL".to_vec(), ttl.into_bytes()]);
        }
        if acquire && self.rng.chance(5) {
            // Never a valid wait above 0: the driver must not block.
            let wait = self.rng.pick(&["0", "0", "-1", "86400001", "abc"]);
            let mut o = args(&["WAIT", wait]);
            if self.rng.chance(50) {
                let p = self.rng.pick(&["0", "-5", "1000000", "1000001", "x"]);
                o.extend(args(&["PRIORITY", p]));
            }
            options.push(o);
        }
        if acquire && self.rng.chance(20) {
            let key = self.credits_key();
            let n = self.amount(25);
            options.push(args(&["CREDITS", key, &n]));
        }
        if self.features.compact && self.rng.chance(15) {
            options.push(args(&["COMPACT"]));
        }
        if self.features.also && self.rng.chance(15) {
            let mut o = Vec::new();
            self.also(&mut o);
            options.push(o);
        }
        while !options.is_empty() {
            let i = self.rng.below(options.len());
            a.extend(options.swap_remove(i));
        }
        a
    }

    fn plan_command(&mut self) -> Args {
        let plan = if self.rng.chance(80) {
            self.rng.pick(PLANS)
        } else {
            self.rng.pick(&["new", "x", "", "free:gpt-4o"])
        };
        match self.rng.below(10) {
            0..=4 => {
                let mut a = args(&["RL.PLAN.SET", plan]);
                for _ in 0..1 + self.rng.below(3) {
                    match self.rng.below(12) {
                        0 => {
                            let target = self
                                .rng
                                .pick(&["free", "pro", "ep", "tiny", "nosuch", plan]);
                            a.extend(args(&["fallback", target]));
                        }
                        1 => {
                            let mode = self.rng.pick(&["shadow", "enforce", "bogus"]);
                            a.extend(args(&["mode", mode]));
                        }
                        _ => {
                            let name = self.rng.pick(LIMIT_NAMES);
                            let spec = self.rng.pick(SPECS);
                            a.extend(args(&[name, spec]));
                        }
                    }
                }
                a
            }
            5 | 6 => {
                let mut a = args(&["RL.PLAN.DEL", plan]);
                if self.rng.chance(70) {
                    let field = self.rng.pick(LIMIT_NAMES);
                    a.push(field.into());
                    if self.rng.chance(20) {
                        a.push(b"fallback".to_vec());
                    }
                }
                a
            }
            7 => {
                if self.rng.chance(50) {
                    args(&["RL.PLAN.DEFAULT"])
                } else {
                    args(&["RL.PLAN.DEFAULT", plan])
                }
            }
            8 => args(&["RL.PLAN.GET", plan]),
            _ => args(&["RL.PLAN.LIST"]),
        }
    }

    fn credits_command(&mut self) -> Args {
        let key = self.credits_key();
        match self.rng.below(20) {
            0..=5 => {
                let amount = self.amount(40);
                let mut a = args(&["RL.CREDITS.GRANT", key, &amount]);
                match self.rng.below(6) {
                    0 => {
                        let ttl = self.ttl_ms();
                        a.extend(args(&["TTL", &ttl]));
                    }
                    1 => {
                        let at = match self.rng.below(5) {
                            0 => "1".to_string(),
                            1 => (now_ms() + 3_600_000).to_string(),
                            2 => "9999999999999".to_string(),
                            3 => "18446744073709551615".to_string(),
                            _ => (now_ms() + 86_400_000).to_string(),
                        };
                        a.extend(args(&["EXPIREAT", &at]));
                    }
                    _ => {}
                }
                if self.rng.chance(60) {
                    a.push(b"ID".to_vec());
                    a.push(self.id());
                }
                a
            }
            6..=11 => {
                let amount = self.amount(40);
                let mut a = args(&["RL.CREDITS.DEDUCT", key, &amount]);
                if self.rng.chance(30) {
                    a.push(b"PARTIAL".to_vec());
                }
                if self.rng.chance(60) {
                    a.push(b"ID".to_vec());
                    a.push(self.id());
                }
                a
            }
            12..=15 => {
                let mut a = args(&["RL.CREDITS.REFUND", key]);
                a.push(self.id());
                a
            }
            16 => {
                let mut a = args(&["RL.CREDITS.BALANCE", key]);
                if self.rng.chance(50) {
                    let min = self.amount(30);
                    a.extend(args(&["MIN", &min]));
                }
                a
            }
            17 => args(&["RL.CREDITS.BLOCKS", key]),
            _ => {
                let mut a = args(&["RL.CREDITS.REVOKE", key]);
                a.push(self.id());
                a
            }
        }
    }

    /// A key of the same kind as `key` mostly (so names keep their type and commands
    /// reach the module's logic), any key sometimes.
    fn kin(&mut self, key: &str) -> &'static str {
        if self.rng.chance(20) {
            self.any_key()
        } else if SUBJECTS.contains(&key) {
            self.rng.pick(SUBJECTS)
        } else if CREDITS.contains(&key) {
            self.rng.pick(CREDITS)
        } else {
            self.rng.pick(OTHERS)
        }
    }

    fn key_command(&mut self) -> Args {
        let key = self.any_key();
        let other = self.kin(key);
        match self.rng.below(18) {
            0 | 1 => {
                if self.rng.chance(70) {
                    args(&["COPY", key, other, "REPLACE"])
                } else {
                    args(&["COPY", key, other])
                }
            }
            2 => args(&["RENAME", key, other]),
            3 => args(&["DEL", key]),
            4 => {
                let secs = self.rng.pick(&["3600", "86400", "0", "-1"]);
                args(&["EXPIRE", key, secs])
            }
            5 => {
                let ms = self.rng.pick(&["7200000", "20", "9223372036854775807"]);
                args(&["PEXPIRE", key, ms])
            }
            6 => args(&["PERSIST", key]),
            7 => args(&["TYPE", key]),
            8 => args(&["MEMORY", "USAGE", key]),
            9 => args(&["DEBUG", "DIGEST-VALUE", key]),
            10 => args(&["SET", "str", "x"]),
            11 => args(&["HSET", "h", "f", "v"]),
            12 => args(&["RL.ASSIGN", key]),
            13 => args(&["UNLINK", key]),
            // Values moving between databases, and whole databases freed (ASYNC: in
            // a background thread).
            14 => args(&["MOVE", key, "1"]),
            15 if self.rng.chance(30) => args(&["SWAPDB", "0", "1"]),
            16 if self.rng.chance(5) => {
                let how = self.rng.pick(&["FLUSHDB", "FLUSHALL"]);
                if self.rng.chance(50) {
                    args(&[how, "ASYNC"])
                } else {
                    args(&[how])
                }
            }
            _ => args(&["EXISTS", key]),
        }
    }

    /// One random command (not a DUMP/RESTORE: see `restore_step`).
    fn command(&mut self) -> Args {
        let mut a = match self.rng.below(100) {
            0..=24 => self.decision_command("RL.ACQUIRE"),
            25..=31 => self.decision_command("RL.PEEK"),
            32..=40 => {
                let key = self.subject_key();
                let mut a = args(&["RL.RELEASE", key]);
                a.push(self.id());
                if self.rng.chance(60) {
                    self.costs(&mut a);
                }
                a
            }
            41..=43 => {
                let key = self.subject_key();
                let mut a = args(&["RL.TOUCH", key]);
                a.push(self.id());
                let ttl = self.ttl_ms();
                a.push(ttl.into_bytes());
                a
            }
            44..=47 => {
                let key = self.subject_key();
                let burst = self.amount(10);
                let count = self.amount(10);
                let period =
                    self.rng
                        .pick(&["60", "3600", "86400", "1", "0", "315360000", "315360001"]);
                let mut a = args(&["RL.THROTTLE", key, &burst, &count, period]);
                if self.rng.chance(50) {
                    let q = self.amount(15);
                    a.push(q.into_bytes());
                }
                a
            }
            48..=50 => {
                let key = self.subject_key();
                match self.rng.below(3) {
                    0 => args(&["RL.UNASSIGN", key]),
                    1 => args(&["RL.ASSIGN", key]),
                    _ => {
                        let plan = self.plan();
                        args(&["RL.ASSIGN", key, &plan])
                    }
                }
            }
            51..=55 => self.plan_command(),
            56..=83 => self.credits_command(),
            87 | 88 if self.features.apply_refused => {
                // A forgery: a real effect the primary replicated, or garbage.
                match self.applies.len() {
                    0 => {
                        let key = self.any_key();
                        args(&["RL.APPLY", key, "\x01\x02"])
                    }
                    n => {
                        self.stats.forged_applies += 1;
                        let (key, payload) = self.applies[self.rng.below(n)].clone();
                        let key = if self.rng.chance(50) {
                            key
                        } else {
                            self.any_key().into()
                        };
                        vec![b"RL.APPLY".to_vec(), key, payload]
                    }
                }
            }
            84..=86 if self.features.usage => {
                let key = self.subject_key();
                let plan = self.plan();
                let mut a = args(&["RL.USAGE", key, &plan]);
                if self.rng.chance(30) {
                    let e = self.rng.pick(ENDPOINTS);
                    a.extend(args(&["ENDPOINT", e]));
                }
                a
            }
            _ => self.key_command(),
        };
        // Arity: sometimes one argument short or one too many.
        if self.rng.chance(3) {
            if self.rng.chance(50) && a.len() > 1 {
                a.pop();
            } else {
                let junk = self.rng.pick(&["x", "ID", "COST", "18446744073709551615"]);
                a.push(junk.into());
            }
        }
        a
    }

    /// Several commands in MULTI/EXEC, or one in a script.
    fn wrapped_step(&mut self) -> Check {
        if self.rng.chance(50) {
            let n = 1 + self.rng.below(4);
            let commands: Vec<Args> = (0..n).map(|_| self.command()).collect();
            self.group = Some(Vec::new());
            self.call_str(&["MULTI"])?;
            for c in &commands {
                self.call(c)?;
            }
            self.call_str(&["EXEC"])?;
            if let Some(group) = self.group.take() {
                self.trace.push(Step {
                    commands: group,
                    copy: false,
                    resp3: false,
                    refused: false,
                });
            }
        } else {
            let inner = self.command();
            let mut a = args(&["EVAL", "return redis.pcall(unpack(ARGV))", "0"]);
            a.extend(inner);
            self.call(&a)?;
        }
        Ok(())
    }

    /// `DUMP` of a key, then `RESTORE` of it, intact or mutated. Returns whether a
    /// mutated value was accepted (the batch then ends with a full check).
    fn restore_step(&mut self) -> Result<bool, String> {
        let source = if self.rng.chance(50) {
            self.rng.pick(SUBJECTS)
        } else {
            self.rng.pick(CREDITS)
        };
        let donor_key = self.any_key();
        let target = if self.rng.chance(60) {
            self.rng.pick(&["r:0", "r:1"])
        } else {
            self.kin(source)
        };
        let hostile = self.rng.chance(75);
        // Mutations draw from their own generator, so the command sequence does not
        // depend on what the server's values look like.
        let mut mrng = Rng::new(self.rng.next());
        let Some(payload) = self.call_str(&["DUMP", source])?.bytes() else {
            return Ok(false);
        };
        if !hostile {
            let reply = self.call(&[
                b"RESTORE".to_vec(),
                target.into(),
                b"0".to_vec(),
                payload,
                b"REPLACE".to_vec(),
            ])?;
            if self.phase == Kind::Reply && self.trace.len() >= 2 {
                let restore = self.trace.pop().map(|s| s.commands).unwrap_or_default();
                if let Some(dump) = self.trace.last_mut() {
                    dump.commands.extend(restore);
                    dump.copy = true;
                }
            }
            if let Reply::Error(e) = reply {
                return Err(format!(
                    "RESTORE of an intact DUMP of {source} was refused: {e}"
                ));
            }
            return Ok(false);
        }
        if payload.first() != Some(&RDB_TYPE_MODULE_2) {
            // Not a module value: nothing of ours to mutate.
            return Ok(false);
        }
        let Some(dump) = Dump::parse(&payload) else {
            return Err(format!(
                "cannot parse the DUMP of {source}: {}",
                quote(&payload)
            ));
        };
        let donor = self
            .call_str(&["DUMP", donor_key])?
            .bytes()
            .and_then(|d| Dump::parse(&d))
            .and_then(|d| d.strings.first().cloned())
            .unwrap_or_default();
        let mut mutated = dump.clone();
        let what = match mrng.below(10) {
            // The envelope: module id and encoding version, opcodes.
            0 => {
                let mut body = dump.head.clone();
                match mrng.below(3) {
                    0 => {
                        let i = 1 + mrng.below(body.len() - 1);
                        body[i] ^= 1 << mrng.below(8);
                    }
                    1 => {
                        for s in dump.strings.iter().chain(dump.strings.iter()) {
                            write_len(&mut body, MODULE_OPCODE_STRING);
                            write_len(&mut body, s.len() as u64);
                            body.extend_from_slice(s);
                        }
                    }
                    _ => {
                        write_len(&mut body, 2);
                        write_len(&mut body, mrng.next() >> 8);
                    }
                }
                if mrng.chance(80) {
                    write_len(&mut body, MODULE_OPCODE_EOF);
                }
                let sealed = seal(body, dump.version);
                self.stats.restores_hostile += 1;
                return self.hostile_restore(target, sealed, "envelope".into());
            }
            _ => match mutated.strings.first_mut() {
                Some(s) => mutate_bytes(&mut mrng, s, &donor),
                None => return Ok(false),
            },
        };
        if mutated.strings == dump.strings {
            return Ok(false);
        }
        self.stats.restores_hostile += 1;
        let sealed = mutated.seal();
        self.hostile_restore(target, sealed, what)
    }

    fn hostile_restore(
        &mut self,
        target: &str,
        payload: Vec<u8>,
        what: String,
    ) -> Result<bool, String> {
        self.note(format!("# hostile RESTORE: {what}"));
        let reply = self.call(&[
            b"RESTORE".to_vec(),
            target.into(),
            b"0".to_vec(),
            payload,
            b"REPLACE".to_vec(),
        ])?;
        if !reply.is_ok() {
            return Ok(false);
        }
        self.stats.restores_accepted += 1;
        self.probe(target)?;
        Ok(true)
    }

    /// Every command on a key that a hostile RESTORE created must answer normally.
    fn probe(&mut self, key: &str) -> Check {
        let kind = self.must_string(&["TYPE", key])?;
        let mut commands: Vec<Vec<&str>> = vec![
            vec!["MEMORY", "USAGE", key],
            vec!["DEBUG", "DIGEST-VALUE", key],
            vec!["PTTL", key],
            vec!["COPY", key, "x:probe", "REPLACE"],
            vec!["DEL", "x:probe"],
        ];
        if kind == "rlsubject" {
            for plan in PLANS {
                commands.push(vec!["RL.PEEK", key, plan, "0"]);
            }
            commands.extend([
                vec![
                    "RL.ACQUIRE",
                    key,
                    "free",
                    "1",
                    "COST",
                    "token",
                    "5",
                    "usd",
                    "3",
                ],
                vec!["RL.ACQUIRE", key, "tiny", "ID", "probe", "TTL", "1000"],
                vec!["RL.ACQUIRE", key, "huge", "18446744073709551615"],
                vec!["RL.ACQUIRE", key, "fast", "ID", "probe2"],
                vec!["RL.RELEASE", key, "probe", "COST", "token", "0"],
                vec!["RL.RELEASE", key, "probe2"],
                vec![
                    "RL.RELEASE",
                    key,
                    "A",
                    "COST",
                    "request",
                    "18446744073709551615",
                ],
                vec!["RL.TOUCH", key, "r1", "1000"],
                vec!["RL.THROTTLE", key, "5", "10", "60"],
                vec!["RL.ASSIGN", key],
                vec!["RL.ASSIGN", key, "pro"],
                vec!["RL.ACQUIRE", key, "*", "ENDPOINT", "chat"],
                vec!["RL.UNASSIGN", key],
            ]);
            if self.features.usage {
                commands.push(vec!["RL.USAGE", key, "free"]);
            }
        } else if kind == "rlcredits" {
            commands.extend([
                vec!["RL.CREDITS.BALANCE", key],
                vec!["RL.CREDITS.BALANCE", key, "MIN", "1"],
                vec!["RL.CREDITS.BLOCKS", key],
                vec!["RL.CREDITS.GRANT", key, "1"],
                vec![
                    "RL.CREDITS.GRANT",
                    key,
                    "5",
                    "TTL",
                    "3600000",
                    "ID",
                    "probe",
                ],
                vec!["RL.CREDITS.DEDUCT", key, "2", "ID", "probe-d"],
                vec!["RL.CREDITS.REFUND", key, "probe-d"],
                vec!["RL.CREDITS.REFUND", key, "d1"],
                vec!["RL.CREDITS.REVOKE", key, "A"],
                vec!["RL.CREDITS.DEDUCT", key, "18446744073709551615", "PARTIAL"],
                vec![
                    "RL.ACQUIRE",
                    "s:probe",
                    "free",
                    "CREDITS",
                    key,
                    "1",
                    "ID",
                    "probe-a",
                ],
                vec!["RL.CREDITS.REFUND", key, "probe-a"],
                vec![
                    "RL.CREDITS.GRANT",
                    key,
                    "18446744073709551615",
                    "ID",
                    "probe-max",
                ],
            ]);
        }
        for c in commands {
            self.call_str(&c)?;
        }
        Ok(())
    }

    // --- checks -----------------------------------------------------------------

    fn check_logs(&mut self) -> Check {
        self.phase = Kind::Log;
        let plog = self.primary().log();
        let rlog = self.replica.log();
        let (mut ps, mut rs) = self.log_seen;
        let result = check_log(&plog, &mut ps, "primary")
            .and_then(|()| check_log(&rlog, &mut rs, "replica"));
        self.log_seen = (ps, rs);
        result
    }

    fn digest_p(&mut self) -> Result<String, String> {
        digest_of(&mut self.p)
    }

    fn rewrite_aof(&mut self) -> Check {
        self.phase = Kind::Aof;
        self.stats.rewrites += 1;
        self.note("# BGREWRITEAOF".into());
        rewrite_aof(&mut self.p)
    }

    fn check_batch(&mut self) -> Check {
        self.stats.batches += 1;
        self.check_logs()?;
        self.phase = Kind::Credits;
        check_credits(&mut self.p)?;
        self.phase = Kind::Reload;
        self.stats.quiet_wait_ms += quiet(&mut self.p, QUIET_MS)?;
        self.stats.reloads += 1;
        self.note("# DEBUG RELOAD".into());
        check_reload(&mut self.p)?;
        self.phase = Kind::Replica;
        check_replica(&mut self.p, &mut self.r)?;
        self.check_logs()?;
        self.phase = Kind::Reply;
        Ok(())
    }

    /// `kill -9` and a restart from the AOF keep the dataset and plans; then the
    /// replica, pointed at the restarted primary, reaches it by a full sync.
    fn aof_restart(&mut self) -> Check {
        self.phase = Kind::Aof;
        self.stats.aof_restarts += 1;
        self.stats.quiet_wait_ms += quiet(&mut self.p, 2 * QUIET_MS)?;
        let before = self.digest_p()?;
        let plans = plans_of(&mut self.p)?;
        let replica = digest_of(&mut self.r)?;
        self.note("# kill -9 of the primary, restart from its AOF".into());
        let mut primary = self.primary.take().expect("the primary");
        primary.kill9();
        let primary = primary.restart();
        self.p = connect(&primary);
        self.p3 = connect_resp3(&primary);
        self.primary = Some(primary);
        self.log_seen.0 = 0;
        let after = self.digest_p()?;
        let plans_after = plans_of(&mut self.p)?;
        if after != before || after != replica {
            return Err(format!(
                "the AOF restart changed the dataset: digest {before} -> {after} \
                 (replica {replica})"
            ));
        }
        if plans_after != plans {
            return Err(format!(
                "the AOF restart changed the plans:\n{plans}\n--- after ---\n{plans_after}"
            ));
        }
        self.note("# the replica follows the restarted primary (full sync)".into());
        self.phase = Kind::Replica;
        attach_replica(self.primary(), &self.replica);
        check_replica(&mut self.p, &mut self.r)?;
        self.check_logs()?;
        self.phase = Kind::Reply;
        Ok(())
    }

    fn finish(&mut self) -> Check {
        self.rewrite_aof()?;
        self.phase = Kind::Reply;
        self.call_str(&["RL.ACQUIRE", "s:1", "free", "1", "COST", "token", "7"])?;
        self.check_batch()?;
        self.aof_restart()
    }

    fn run(&mut self, length: Duration) -> Check {
        self.setup()?;
        self.check_batch()?;
        let mut batches = 0u64;
        while self.started.elapsed() < length {
            self.phase = Kind::Reply;
            if self.rng.chance(30) {
                self.install_plans()?;
            }
            if self.features.apply_refused {
                self.applies = aof_applies(&self.primary().dir);
            }
            let size = 100 + self.rng.below(500);
            for _ in 0..size {
                let roll = self.rng.below(100);
                if roll < 6 {
                    if self.restore_step()? {
                        break;
                    }
                } else if roll < 9 {
                    self.wrapped_step()?;
                } else {
                    let c = self.command();
                    self.resp3 = self.rng.chance(15);
                    let reply = self.call(&c)?;
                    if c[0] == b"RL.APPLY" {
                        if let Some(step) = self.trace.last_mut() {
                            step.refused = true;
                        }
                        if reply.is_ok() {
                            return Err(format!(
                                "RL.APPLY from an ordinary client was obeyed: {}",
                                command_line(&c)
                            ));
                        }
                    }
                }
            }
            self.check_batch()?;
            batches += 1;
            // Every 8th batch an AOF rewrite, every 12th a kill -9 and AOF restart.
            if batches.rem_euclid(8) == 0 {
                self.rewrite_aof()?;
            }
            if batches.rem_euclid(12) == 0 {
                self.aof_restart()?;
            }
        }
        self.finish()
    }

    fn report(&self, reason: &str) -> String {
        let mut out = format!(
            "fuzz failure ({:?}; replay: TOLLGATE_FUZZ_SEED={}, after {:.1} s, batch {}, \
             {} commands)\n{reason}\n\nlast commands (oldest first):\n",
            self.phase,
            self.seed,
            self.started.elapsed().as_secs_f64(),
            self.stats.batches,
            self.stats.commands
        );
        for line in &self.history {
            let _ = writeln!(out, "  {line}");
        }
        if let Some(primary) = &self.primary {
            let _ = writeln!(out, "\nprimary log (last lines):");
            for l in log_tail(&primary.log(), 25) {
                let _ = writeln!(out, "  {l}");
            }
        }
        let _ = writeln!(out, "\nreplica log (last lines):");
        for l in log_tail(&self.replica.log(), 10) {
            let _ = writeln!(out, "  {l}");
        }
        out
    }
}

/// The `RL.APPLY` commands (key, payload) in a server's AOF, the last 64.
fn aof_applies(dir: &std::path::Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir.join("appendonlydir")) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.to_string_lossy().ends_with(".incr.aof") {
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let mut pos = 0;
        while let Some(command) = resp_command(&bytes, &mut pos) {
            if let [name, key, payload] = command.as_slice() {
                if name.eq_ignore_ascii_case(b"RL.APPLY") {
                    found.push((key.clone(), payload.clone()));
                }
            }
        }
    }
    let skip = found.len().saturating_sub(64);
    found.split_off(skip)
}

/// One command (`*n` of `$len` strings) of an AOF.
fn resp_command(b: &[u8], pos: &mut usize) -> Option<Vec<Vec<u8>>> {
    let line = |pos: &mut usize, prefix: u8| -> Option<usize> {
        let rest = b.get(*pos..)?;
        let end = rest.windows(2).position(|w| w == b"\r\n")?;
        let text = std::str::from_utf8(rest.get(1..end)?).ok()?;
        (*rest.first()? == prefix).then_some(())?;
        *pos += end + 2;
        text.parse().ok()
    };
    let n = line(pos, b'*')?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = line(pos, b'$')?;
        out.push(take(b, pos, len)?.to_vec());
        *pos += 2;
    }
    Some(out)
}

fn log_tail(log: &str, n: usize) -> Vec<&str> {
    let mut tail: Vec<&str> = log.lines().rev().take(n).collect();
    tail.reverse();
    tail
}

fn digest_of(con: &mut Connection) -> Result<String, String> {
    redis::cmd("DEBUG")
        .arg("DIGEST")
        .query::<String>(con)
        .map_err(|e| format!("DEBUG DIGEST: {}", error_text(&e)))
}

fn query(con: &mut Connection, items: &[&str]) -> Result<Value, String> {
    let mut cmd = redis::cmd(items[0]);
    for a in &items[1..] {
        cmd.arg(*a);
    }
    cmd.query::<Value>(con)
        .map_err(|e| format!("{}: {}", items.join(" "), error_text(&e)))
}

fn query_string(con: &mut Connection, items: &[&str]) -> Result<String, String> {
    let v = query(con, items)?;
    Ok(match &v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Okay => "OK".into(),
        Value::VerbatimString { text, .. } => text.clone(),
        other => render(other),
    })
}

/// Panics and crash reports in a server log since `seen`.
fn check_log(log: &str, seen: &mut usize, who: &str) -> Check {
    let new = log.get(*seen..).unwrap_or("");
    *seen = log.len();
    let bad: Vec<&str> = new
        .lines()
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            lower.contains("panic")
                || lower.contains("bug report")
                || lower.contains("crashed by signal")
                || lower.contains("short read")
        })
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("the {who} logged:\n  {}", bad.join("\n  ")))
    }
}

/// Every key, by `SCAN`, which (unlike `KEYS`) deletes keys that have expired but
/// are still held, replicating the `DEL`.
fn all_keys(con: &mut Connection) -> Result<Vec<Vec<u8>>, String> {
    let mut cursor = "0".to_string();
    let mut keys = Vec::new();
    loop {
        let reply = query(con, &["SCAN", &cursor, "COUNT", "1000"])?;
        let Value::Array(parts) = reply else {
            return Err(format!("SCAN answered {}", render(&reply)));
        };
        cursor = parts.first().map(render).unwrap_or_default();
        if let Some(found) = parts.get(1) {
            keys.extend(keys_of(found));
        }
        if cursor == "0" {
            break;
        }
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// Waits out keys whose TTL ends within `horizon_ms`, and has the primary delete
/// them (a lookup expires them and replicates the DEL), so the checks that follow do
/// not race expiry. Covers databases 1 (where MOVE and SWAPDB put keys) and 0, and
/// returns the ms waited.
fn quiet(con: &mut Connection, horizon_ms: i64) -> Result<u64, String> {
    query(con, &["SELECT", "1"])?;
    let waited = quiet_db(con, horizon_ms);
    query(con, &["SELECT", "0"])?;
    Ok(waited? + quiet_db(con, horizon_ms)?)
}

fn quiet_db(con: &mut Connection, horizon_ms: i64) -> Result<u64, String> {
    let started = Instant::now();
    loop {
        let mut near: Vec<(Vec<u8>, i64)> = Vec::new();
        for key in all_keys(con)? {
            let ttl = redis::cmd("PTTL")
                .arg(key.as_slice())
                .query::<i64>(con)
                .map_err(|e| format!("PTTL: {}", error_text(&e)))?;
            if (0..=horizon_ms).contains(&ttl) {
                near.push((key, ttl));
            }
        }
        if std::env::var("FUZZ_DEBUG_QUIET").is_ok() {
            for (k, t) in &near {
                let ty = redis::cmd("TYPE")
                    .arg(k.as_slice())
                    .query::<String>(con)
                    .unwrap_or_default();
                eprintln!("QUIET {} {ty} {t}", quote(k));
            }
        }
        let Some(longest) = near.iter().map(|(_, t)| *t).max() else {
            return Ok(started.elapsed().as_millis() as u64);
        };
        if started.elapsed() > Duration::from_millis(horizon_ms as u64 * 3 + 5_000) {
            return Err(format!(
                "keys keep expiring soon: {:?}",
                near.iter()
                    .map(|(k, t)| format!("{} {t} ms", quote(k)))
                    .collect::<Vec<_>>()
            ));
        }
        std::thread::sleep(Duration::from_millis(longest as u64 + 5));
        for (key, _) in near {
            redis::cmd("EXISTS")
                .arg(key.as_slice())
                .query::<i64>(con)
                .map_err(|e| format!("EXISTS: {}", error_text(&e)))?;
        }
    }
}

fn digests_of(con: &mut Connection, keys: &[Vec<u8>]) -> BTreeMap<String, String> {
    keys.iter()
        .map(|k| {
            let d = redis::cmd("DEBUG")
                .arg("DIGEST-VALUE")
                .arg(k.as_slice())
                .query::<Value>(con)
                .map(|v| render(&v))
                .unwrap_or_else(|e| error_text(&e));
            (quote(k), d)
        })
        .collect()
}

/// Every plan as `RL.PLAN.GET` shows it, and the default plan.
fn plans_of(con: &mut Connection) -> Result<String, String> {
    let list = query(con, &["RL.PLAN.LIST"])?;
    let mut out = render(&list);
    for plan in keys_of(&list) {
        let v = redis::cmd("RL.PLAN.GET")
            .arg(plan.as_slice())
            .query::<Value>(con)
            .map_err(|e| error_text(&e))?;
        let _ = write!(out, "\n{} {}", quote(&plan), render(&v));
    }
    let info = query_string(con, &["INFO", "tollgate"])?;
    if let Some(line) = info.lines().find(|l| l.contains("default")) {
        let _ = write!(out, "\n{}", line.trim());
    }
    Ok(out)
}

/// Every credits key's balance is the sum of what its blocks have left, and no block
/// has more left than it was granted (keys with a block expiring within 5 s, or
/// amounts too large for a RESP integer, are skipped).
fn check_credits(con: &mut Connection) -> Check {
    let horizon = now_ms() as i64 + 5_000;
    for key in all_keys(con)? {
        let kind: String = redis::cmd("TYPE")
            .arg(key.as_slice())
            .query(con)
            .map_err(|e| error_text(&e))?;
        if kind != "rlcredits" {
            continue;
        }
        let blocks = redis::cmd("RL.CREDITS.BLOCKS")
            .arg(key.as_slice())
            .query::<Value>(con)
            .map_err(|e| format!("RL.CREDITS.BLOCKS {}: {}", quote(&key), error_text(&e)))?;
        let balance = redis::cmd("RL.CREDITS.BALANCE")
            .arg(key.as_slice())
            .query::<i64>(con)
            .map_err(|e| format!("RL.CREDITS.BALANCE {}: {}", quote(&key), error_text(&e)))?;
        let Value::Array(items) = &blocks else {
            return Err(format!(
                "RL.CREDITS.BLOCKS {} answered {}",
                quote(&key),
                render(&blocks)
            ));
        };
        let mut sum: i128 = 0;
        let mut comparable = true;
        for item in items {
            let block = map_of(item);
            let field = |name: &str| match block.get(name) {
                Some(Value::Int(n)) => Some(*n),
                _ => None,
            };
            let (Some(left), Some(granted), Some(expires_at)) =
                (field("left"), field("granted"), field("expires_at"))
            else {
                return Err(format!("a block of {} reads {}", quote(&key), render(item)));
            };
            if left > granted || left <= 0 {
                return Err(format!(
                    "a block of {} has {left} left of {granted} granted: {}",
                    quote(&key),
                    render(&blocks)
                ));
            }
            if (expires_at != -1 && expires_at < horizon) || granted == i64::MAX {
                comparable = false;
            }
            sum += i128::from(left);
        }
        let expected = sum.min(i128::from(i64::MAX));
        if comparable && i128::from(balance) != expected {
            return Err(format!(
                "{} has balance {balance} but its blocks hold {sum}: {}",
                quote(&key),
                render(&blocks)
            ));
        }
    }
    Ok(())
}

/// `DEBUG RELOAD` keeps every key, its digest and the plans.
fn check_reload(con: &mut Connection) -> Check {
    let keys = all_keys(con)?;
    let before = digest_of(con)?;
    let size = query_string(con, &["DBSIZE"])?;
    let values = digests_of(con, &keys);
    let plans = plans_of(con)?;
    query(con, &["DEBUG", "RELOAD"]).map_err(|e| format!("DEBUG RELOAD failed: {e}"))?;
    let after = digest_of(con)?;
    let size_after = query_string(con, &["DBSIZE"])?;
    let plans_after = plans_of(con)?;
    if after != before || size != size_after {
        let values_after = digests_of(con, &keys);
        let changed: Vec<String> = values
            .iter()
            .filter(|(k, v)| values_after.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}: {v} -> {:?}", values_after.get(k)))
            .collect();
        return Err(format!(
            "DEBUG RELOAD changed the dataset: digest {before} -> {after}, \
             DBSIZE {size} -> {size_after}; changed keys: {changed:?}"
        ));
    }
    if plans != plans_after {
        return Err(format!(
            "DEBUG RELOAD changed the plans:\n{plans}\n--- after ---\n{plans_after}"
        ));
    }
    Ok(())
}

fn offset(con: &mut Connection) -> Result<i64, String> {
    let info = query_string(con, &["INFO", "replication"])?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("master_repl_offset:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1))
}

/// Waits until the replica processed everything the primary sent.
fn wait_replica(p: &mut Connection, r: &mut Connection) -> Check {
    query(p, &["WAIT", "1", "5000"])?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let primary = offset(p)?;
        let replica = offset(r).map_err(|e| format!("the replica: {e}"))?;
        if primary >= 0 && primary == replica {
            return Ok(());
        }
        if Instant::now() > deadline {
            let info = query_string(r, &["INFO", "replication"]).unwrap_or_default();
            return Err(format!(
                "the replica did not catch up (offsets {primary} / {replica}):\n{info}"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The replica holds exactly the primary's dataset and plans.
fn check_replica(p: &mut Connection, r: &mut Connection) -> Check {
    let mut last = String::new();
    for _ in 0..3 {
        wait_replica(p, r)?;
        let primary = digest_of(p)?;
        let replica = digest_of(r).map_err(|e| format!("the replica: {e}"))?;
        if primary == replica {
            let pp = plans_of(p)?;
            let rp = plans_of(r)?;
            if pp != rp {
                return Err(format!(
                    "the replica's plans differ:\n{pp}\n--- replica ---\n{rp}"
                ));
            }
            return Ok(());
        }
        // The primary may have changed in between (a timer): look again.
        last = replica_difference(p, r)?;
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "the replica's digest differs from the primary's: {last}"
    ))
}

fn replica_difference(p: &mut Connection, r: &mut Connection) -> Result<String, String> {
    let mut keys = all_keys(p)?;
    keys.extend(all_keys(r).unwrap_or_default());
    keys.sort();
    keys.dedup();
    let pd = digests_of(p, &keys);
    let rd = digests_of(r, &keys);
    let mut out = String::new();
    for key in &keys {
        let k = quote(key);
        if pd.get(&k) != rd.get(&k) {
            let dump = |con: &mut Connection| {
                redis::cmd("DUMP")
                    .arg(key.as_slice())
                    .query::<Value>(con)
                    .map(|v| render(&v))
                    .unwrap_or_else(|e| error_text(&e))
            };
            let _ = write!(
                out,
                "\n  key {k}: primary {:?} DUMP {}\n    replica {:?} DUMP {}",
                pd.get(&k),
                dump(p),
                rd.get(&k),
                dump(r)
            );
        }
    }
    Ok(out)
}

fn rewrite_aof(con: &mut Connection) -> Check {
    query(con, &["BGREWRITEAOF"])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = query_string(con, &["INFO", "persistence"])?;
        if info.contains("aof_rewrite_in_progress:0") && info.contains("aof_rewrite_scheduled:0") {
            if info.contains("aof_last_bgrewrite_status:ok") {
                return Ok(());
            }
            return Err(format!("BGREWRITEAOF failed:\n{info}"));
        }
        if Instant::now() > deadline {
            return Err("BGREWRITEAOF did not finish in 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------
// Replay and minimization

/// Replays `steps` on fresh servers and says whether the failure `kind` shows again.
fn reproduces(steps: &[Step], kind: Kind) -> bool {
    let mut primary = match kind {
        Kind::Aof => Server::start_with(&["--appendonly", "yes", "--appendfsync", "always"]),
        _ => Server::start(),
    };
    let replica = (kind == Kind::Replica).then(|| {
        let replica = Server::start();
        attach_replica(&primary, &replica);
        replica
    });
    let mut con = connect(&primary);
    let mut con3 = connect_resp3(&primary);
    for step in steps {
        if step.copy {
            let (Some(dump), Some(restore)) = (step.commands.first(), step.commands.get(1)) else {
                continue;
            };
            match send(&mut con, dump).1 {
                Err(_) => return kind == Kind::Reply,
                Ok(Reply::Value(Value::BulkString(payload))) => {
                    let mut restore = restore.clone();
                    restore[3] = payload;
                    match send(&mut con, &restore).1 {
                        Err(_) | Ok(Reply::Error(_)) => return kind == Kind::Reply,
                        Ok(_) => {}
                    }
                }
                Ok(_) => {}
            }
            continue;
        }
        let on = if step.resp3 { &mut con3 } else { &mut con };
        for command in &step.commands {
            match send(on, command).1 {
                Err(_) => return kind == Kind::Reply,
                Ok(Reply::Value(_)) if step.refused => return kind == Kind::Reply,
                Ok(_) => {}
            }
        }
    }
    match kind {
        Kind::Reply => false,
        Kind::Log => check_log(&primary.log(), &mut 0, "primary").is_err(),
        Kind::Credits => check_credits(&mut con).is_err(),
        Kind::Reload => quiet(&mut con, QUIET_MS).is_ok() && check_reload(&mut con).is_err(),
        Kind::Replica => {
            let Some(replica) = &replica else {
                return false;
            };
            let mut r = connect(replica);
            if quiet(&mut con, QUIET_MS).is_err() {
                return false;
            }
            if check_replica(&mut con, &mut r).is_err() {
                return true;
            }
            // A full sync of the state as it ends.
            let late = Server::start();
            attach_replica(&primary, &late);
            let mut l = connect(&late);
            check_replica(&mut con, &mut l).is_err()
        }
        Kind::Aof => {
            if quiet(&mut con, 2 * QUIET_MS).is_err() {
                return false;
            }
            let Ok(before) = digest_of(&mut con) else {
                return false;
            };
            primary.kill9();
            let restarted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let primary = primary.restart();
                let mut con = connect(&primary);
                digest_of(&mut con)
            }));
            !matches!(restarted, Ok(Ok(after)) if after == before)
        }
    }
}

/// Delta debugging: drops chunks of steps while the failure still shows, until no
/// single step can go or the time is up.
fn minimize(steps: Vec<Step>, kind: Kind, budget: Duration) -> (Vec<Step>, bool, u32) {
    let deadline = Instant::now() + budget;
    let mut trials = 0;
    if !reproduces(&steps, kind) {
        return (steps, false, 1);
    }
    let mut items = steps;
    let mut chunks = 2;
    while items.len() > 1 && Instant::now() < deadline {
        let size = items.len().div_ceil(chunks);
        let mut reduced = false;
        let mut start = 0;
        while start < items.len() && Instant::now() < deadline {
            let end = (start + size).min(items.len());
            let candidate: Vec<Step> = items[..start]
                .iter()
                .chain(&items[end..])
                .cloned()
                .collect();
            trials += 1;
            if reproduces(&candidate, kind) {
                items = candidate;
                chunks = (chunks - 1).max(2);
                reduced = true;
                break;
            }
            start = end;
        }
        if !reduced {
            if chunks >= items.len() {
                break;
            }
            chunks = (chunks * 2).min(items.len());
        }
    }
    (items, true, trials)
}

fn show_steps(steps: &[Step]) -> String {
    let mut out = String::new();
    for step in steps {
        if let (true, Some(dump), Some(restore)) =
            (step.copy, step.commands.first(), step.commands.get(1))
        {
            let _ = writeln!(out, "  {}", command_line(dump));
            let mut restore = restore.clone();
            restore[3] = format!("<the DUMP of {}>", quote(&dump[1])).into_bytes();
            let _ = writeln!(out, "  {}  (must succeed)", command_line(&restore));
            continue;
        }
        let resp3 = if step.resp3 {
            "  (on a RESP3 connection)"
        } else {
            ""
        };
        for command in &step.commands {
            let _ = writeln!(out, "  {}{resp3}", command_line(command));
        }
    }
    out
}

#[test]
fn crc64_is_redis_crc64() {
    assert_eq!(crc64(b"123456789"), 0xe9c6_d914_c4b8_d9ca);
}

#[test]
fn random_commands_and_hostile_restores_keep_reload_replica_and_aof_exact() {
    let seconds: f64 = std::env::var("TOLLGATE_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SECONDS);
    let seed = match std::env::var("TOLLGATE_FUZZ_SEED").ok().as_deref() {
        None | Some("") => DEFAULT_SEED,
        Some("random") => now_ms() ^ u64::from(std::process::id()) << 40,
        Some(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("TOLLGATE_FUZZ_SEED={s}: not a u64")),
    };
    let minimize_for: u64 = std::env::var("TOLLGATE_FUZZ_MINIMIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let length = Duration::from_secs_f64(seconds);
    println!("fuzz: seed {seed}, {seconds} s (replay: TOLLGATE_FUZZ_SEED={seed})");
    let mut fuzzer = Fuzzer::start(seed);
    // Each distinct failure once: (signature, times seen, report).
    let mut failures: Vec<(String, u32, String)> = Vec::new();
    while let Err(reason) = fuzzer.run(length) {
        let signature = fuzzer.signature(&reason);
        if let Some(seen) = failures.iter_mut().find(|f| f.0 == signature) {
            seen.1 += 1;
        } else {
            let mut report = fuzzer.report(&reason);
            if minimize_for > 0 {
                let mut trace = std::mem::take(&mut fuzzer.trace);
                if let Some(group) = fuzzer.group.take() {
                    trace.push(Step {
                        commands: group,
                        copy: false,
                        resp3: false,
                        refused: false,
                    });
                }
                let total = trace.len();
                let (steps, shown, trials) =
                    minimize(trace, fuzzer.phase, Duration::from_secs(minimize_for));
                if shown {
                    let _ = write!(
                        report,
                        "\nminimized ({:?}, {trials} replays, {} of {total} steps):\n{}",
                        fuzzer.phase,
                        steps.len(),
                        show_steps(&steps)
                    );
                } else {
                    let _ = write!(
                        report,
                        "\na replay of the {total} steps on fresh servers did not show it again\n"
                    );
                }
            }
            eprintln!("==== {signature}\n{report}");
            failures.push((signature, 1, report));
        }
        if fuzzer.started.elapsed() >= length {
            break;
        }
        fuzzer.restart_servers();
    }
    println!(
        "fuzz: seed {seed} ran {:.1} s: {:?} {:?}",
        fuzzer.started.elapsed().as_secs_f64(),
        fuzzer.stats,
        fuzzer.features
    );
    let mut common: Vec<(&String, &u64)> = fuzzer.error_counts.iter().collect();
    common.sort_by(|a, b| b.1.cmp(a.1));
    for (what, n) in common.iter().take(12) {
        println!("fuzz: {n:>7} x {what}");
    }
    if !failures.is_empty() {
        let mut summary = format!(
            "{} distinct fuzz failure(s) with TOLLGATE_FUZZ_SEED={seed} (reports above):\n",
            failures.len()
        );
        for (signature, times, _) in &failures {
            let _ = writeln!(summary, "  {times}x {signature}");
        }
        panic!("{summary}");
    }
}
