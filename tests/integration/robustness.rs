//! Random argument lists against every command leave the server alive and every
//! reply well-formed.

use crate::harness::*;
use redis::Value;

/// A small deterministic generator (xorshift64*), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a [u8]]) -> &'a [u8] {
        items[self.below(items.len())]
    }
}

const COMMANDS: &[&str] = &[
    "RL.ACQUIRE",
    "RL.PEEK",
    "RL.THROTTLE",
    "RL.RELEASE",
    "RL.TOUCH",
    "RL.PLAN.SET",
    "RL.PLAN.GET",
    "RL.PLAN.DEL",
    "RL.PLAN.LIST",
    "RL.PLAN.DEFAULT",
    "RL.ASSIGN",
    "RL.UNASSIGN",
    "RL.APPLY",
    "RL.CREDITS.GRANT",
    "RL.CREDITS.DEDUCT",
    "RL.CREDITS.REFUND",
    "RL.CREDITS.BALANCE",
    "RL.CREDITS.BLOCKS",
    "RL.CREDITS.REVOKE",
];

const TOKENS: &[&[u8]] = &[
    b"free",
    b"pro",
    b"*",
    b"user:1",
    b"user:2",
    b"str",
    b"COST",
    b"cost",
    b"ENDPOINT",
    b"ID",
    b"TTL",
    b"WAIT",
    b"PRIORITY",
    b"CREDITS",
    b"token",
    b"request",
    b"usd",
    b"chat",
    b"0",
    b"1",
    b"2",
    b"60",
    b"-1",
    b"1.5",
    b"18446744073709551615",
    b"18446744073709551616",
    b"99999999999999999999999",
    b"",
    b" ",
    b"\xff\xfe\x00",
    b"\r\n",
    b"rpm",
    b"mode",
    b"fallback",
    b"shadow",
    b"sliding 10/1m",
    b"fixed 0/1s",
    b"bucket 1/1ms burst 18446744073709551615",
    b"concurrency 3 ttl 1s",
    b"cap 5 token",
    b"PARTIAL",
    b"MIN",
    b"EXPIREAT",
    b"credits:1",
    b"{user:1}c",
    b"r-1",
    b"5000",
    b"-9223372036854775808",
    b"\x02\x09\x01\x01",
    b"fixed 18446744073709551615/3650d",
    b"sliding 1/1ms precision 1",
    b"fixed 1 usd/1mo warn 100% for chat",
    b"bogus spec",
    b"\x01\x02\x02\x00",
    b"\x01\x07\x00",
];

#[test]
fn ten_thousand_random_calls_leave_the_server_alive() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "free",
            "rpm",
            "sliding 10/1m",
            "tpm",
            "bucket 100 token/1m",
            "c",
            "cap 50 token",
        ],
    );
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "pro",
            "rpd",
            "fixed 5/1d for chat",
            "fallback",
            "free",
        ],
    );
    assert_eq!(string(&mut con, &["SET", "str", "x"]), "OK");
    let seed = std::env::var("TOLLGATE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_u64);
    let mut rng = Rng(seed | 1);
    for round in 0..10_000 {
        let command = COMMANDS[rng.below(COMMANDS.len())];
        let mut cmd = redis::cmd(command);
        let len = rng.below(11);
        let mut shown = vec![command.to_string()];
        for i in 0..len {
            let arg: Vec<u8> = if command == "RL.APPLY" && i == 1 {
                (0..rng.below(40))
                    .map(|_| (rng.next() % 12) as u8)
                    .collect()
            } else {
                rng.pick(TOKENS).to_vec()
            };
            shown.push(String::from_utf8_lossy(&arg).into_owned());
            cmd.arg(arg);
        }
        let reply: redis::RedisResult<Value> = cmd.query(&mut con);
        if let Err(e) = &reply {
            let is_reply_error = e.code().is_some();
            assert!(
                is_reply_error,
                "round {round} {shown:?}: connection-level failure {e}"
            );
        }
    }
    assert_eq!(string(&mut con, &["PING"]), "PONG");
    let log = server.log();
    assert!(!log.contains("panic"), "a command panicked:\n{log}");
    assert!(!log.contains("crashed"), "{log}");
}
