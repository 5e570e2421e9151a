//! Several subjects in one decision (`ALSO`): an org, its teams, users and API keys,
//! each its own subject key with its own plan, decided and charged in one atomic
//! step, settled and released together — on real servers, replicas, AOF and a
//! cluster.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;
use redis::Value;

/// The issue's worked example: org `{acme}` (monthly dollars, warn 80%, 200 in
/// flight), team `research` (daily tokens), user 42 (RPM/TPM), API key k1 (RPM).
const ORG: &str = "{acme}";
const TEAM: &str = "{acme}:team:research";
const USER: &str = "{acme}:user:42";
const APIKEY: &str = "{acme}:key:k1";

fn worked_example_plans(con: &mut redis::Connection) {
    int(
        con,
        &[
            "RL.PLAN.SET",
            "org",
            "spend",
            "fixed 100000000 usd_micros/1mo warn 80%",
            "inflight",
            "concurrency 200",
        ],
    );
    int(
        con,
        &["RL.PLAN.SET", "team", "tpd", "fixed 1000000 token/1d"],
    );
    int(
        con,
        &[
            "RL.PLAN.SET",
            "user",
            "rpm",
            "sliding 60/1m",
            "tpm",
            "bucket 40000 token/1m",
        ],
    );
    int(con, &["RL.PLAN.SET", "key", "rpm", "sliding 30/1m"]);
}

/// `RL.ACQUIRE` (or `RL.PEEK`) arguments for the worked example: user first, then
/// the API key, the team and the org.
fn example_call<'a>(command: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![command, USER, "user"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["ALSO", "3", APIKEY, "key", TEAM, "team", ORG, "org"]);
    args
}

/// One pair of a reply's `also`.
#[derive(Debug, Clone, PartialEq)]
struct AlsoPair {
    key: String,
    plan: String,
    /// Limit name -> its map.
    limits: Vec<HashMap<String, Value>>,
}

impl AlsoPair {
    fn field(&self, limit: &str, field: &str) -> i64 {
        let l = self
            .limits
            .iter()
            .find(|l| l.get("name").map(text).as_deref() == Some(limit))
            .unwrap_or_else(|| panic!("no limit {limit} in {self:?}"));
        match l.get(field) {
            Some(Value::Int(n)) => *n,
            other => panic!("{limit}.{field}: {other:?}"),
        }
    }

    fn remaining(&self, limit: &str) -> i64 {
        self.field(limit, "remaining")
    }
}

fn also_of(fields: &HashMap<String, Value>) -> Vec<AlsoPair> {
    match fields.get("also") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                let m = map_of(item);
                AlsoPair {
                    key: text(&m["key"]),
                    plan: text(&m["plan"]),
                    limits: match &m["limits"] {
                        Value::Array(ls) => ls.iter().map(map_of).collect(),
                        other => panic!("limits: {other:?}"),
                    },
                }
            })
            .collect(),
        other => panic!("no also in the reply: {other:?}"),
    }
}

/// `RL.USAGE key plan`: limit name -> (used, remaining).
fn usage(con: &mut redis::Connection, key: &str, plan: &str) -> HashMap<String, (i64, i64)> {
    let reply = map_of(&run(con, &["RL.USAGE", key, plan]));
    let Value::Array(limits) = &reply["limits"] else {
        panic!("RL.USAGE without limits: {reply:?}");
    };
    limits
        .iter()
        .map(|l| {
            let l = map_of(l);
            let n = |f: &str| match &l[f] {
                Value::Int(n) => *n,
                other => panic!("{f}: {other:?}"),
            };
            (text(&l["name"]), (n("used"), n("remaining")))
        })
        .collect()
}

fn used(con: &mut redis::Connection, key: &str, plan: &str, limit: &str) -> i64 {
    usage(con, key, plan)[limit].0
}

/// Every level of the worked example as `RL.USAGE` shows it, but the user's token
/// bucket (which refills as time passes: see `tpm_used`).
fn example_standing(con: &mut redis::Connection) -> Vec<HashMap<String, (i64, i64)>> {
    let mut user = usage(con, USER, "user");
    user.remove("tpm");
    vec![
        user,
        usage(con, APIKEY, "key"),
        usage(con, TEAM, "team"),
        usage(con, ORG, "org"),
    ]
}

fn tpm_used(con: &mut redis::Connection) -> i64 {
    used(con, USER, "user", "tpm")
}

#[test]
fn the_worked_example_charges_every_level_in_one_step_and_settles_on_the_actual_cost() {
    let server = Server::start();
    let mut con = server.client_resp3();
    worked_example_plans(&mut con);

    // Admit on the estimate: 2,000 tokens and 3 cents.
    let d = decision(
        &mut con,
        &example_call(
            "RL.ACQUIRE",
            &[
                "1",
                "COST",
                "token",
                "2000",
                "usd_micros",
                "30000",
                "ID",
                "chat-1",
            ],
        ),
    );
    assert!(d.allowed());
    assert_eq!(d.str("denied_by"), None);
    assert_eq!(d.str("denied_key"), None);
    assert_eq!(d.str("plan").as_deref(), Some("user"));
    assert_eq!(d.str("id").as_deref(), Some("chat-1"));
    assert_eq!(d.remaining("rpm"), 59);
    assert_eq!(d.remaining("tpm"), 38_000);
    let also = also_of(&d.fields);
    let keys: Vec<&str> = also.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, [APIKEY, TEAM, ORG], "the pairs in call order");
    let plans: Vec<&str> = also.iter().map(|p| p.plan.as_str()).collect();
    assert_eq!(plans, ["key", "team", "org"]);
    assert_eq!(also[0].remaining("rpm"), 29);
    assert_eq!(also[1].remaining("tpd"), 998_000);
    assert_eq!(also[2].remaining("spend"), 99_970_000);
    assert_eq!(also[2].remaining("inflight"), 199);
    assert_eq!(also[2].field("spend", "warn"), 0);
    for key in [USER, APIKEY, TEAM, ORG] {
        assert_eq!(string(&mut con, &["TYPE", key]), "rlsubject");
    }
    assert_eq!(used(&mut con, ORG, "org", "inflight"), 1);

    // Settle on the actual: 1,200 tokens and 1.8 cents, on every level at once.
    let released = map_of(&run(
        &mut con,
        &[
            "RL.RELEASE",
            USER,
            "chat-1",
            "COST",
            "token",
            "1200",
            "usd_micros",
            "18000",
        ],
    ));
    assert_eq!(released["released"], Value::Int(1));
    let also = also_of(&released);
    let keys: Vec<&str> = also.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, [APIKEY, TEAM, ORG]);
    assert_eq!(also[1].remaining("tpd"), 1_000_000 - 1_200);
    assert_eq!(also[2].remaining("spend"), 100_000_000 - 18_000);
    assert_eq!(also[2].remaining("inflight"), 200);
    let standing = example_standing(&mut con);
    // The bucket gave back what of the estimate was still counted: at most the 800
    // tokens not used, never more.
    assert!(tpm_used(&mut con) <= 1_200);
    assert_eq!(standing[2]["tpd"].0, 1_200);
    assert_eq!(standing[3]["spend"].0, 18_000);
    assert_eq!(standing[3]["inflight"].0, 0);
    assert_eq!(standing[0]["rpm"].0, 1);
    assert_eq!(standing[1]["rpm"].0, 1);

    // A big call overruns its estimate: the org passes 80% and says so.
    let d = decision(
        &mut con,
        &example_call(
            "RL.ACQUIRE",
            &["COST", "usd_micros", "79000000", "ID", "big-1"],
        ),
    );
    assert!(d.allowed());
    assert_eq!(also_of(&d.fields)[2].field("spend", "warn"), 0);
    run(
        &mut con,
        &[
            "RL.RELEASE",
            USER,
            "big-1",
            "COST",
            "usd_micros",
            "80500000",
        ],
    );
    assert_eq!(used(&mut con, ORG, "org", "spend"), 80_518_000);
    let d = decision(
        &mut con,
        &example_call("RL.PEEK", &["COST", "usd_micros", "1"]),
    );
    assert_eq!(also_of(&d.fields)[2].field("spend", "warn"), 1);

    // The org's budget denies a call that would pass it: nothing is charged anywhere,
    // and the wait runs to the first of next month.
    let before = example_standing(&mut con);
    let tpm_before = tpm_used(&mut con);
    let d = decision(
        &mut con,
        &example_call(
            "RL.ACQUIRE",
            &[
                "COST",
                "token",
                "100",
                "usd_micros",
                "20000000",
                "ID",
                "chat-2",
            ],
        ),
    );
    assert!(!d.allowed());
    assert_eq!(d.str("denied_by").as_deref(), Some("spend"));
    assert_eq!(d.str("denied_key").as_deref(), Some(ORG));
    assert_eq!(d.str("id"), None);
    let retry = d.retry_after_ms();
    assert!(retry > 0 && retry <= 31 * 86_400_000, "{retry}");
    assert_eq!(
        example_standing(&mut con),
        before,
        "a denied call charges nothing"
    );
    assert!(tpm_used(&mut con) <= tpm_before, "the bucket only refilled");
    assert_eq!(
        map_of(&run(&mut con, &["RL.RELEASE", USER, "chat-2"]))["released"],
        Value::Int(0)
    );

    // The API key's 30 a minute deny at the 31st call (the user's 60 would not): the
    // denial names the key, and a call through another key of the same user passes.
    let mut admitted_on_k1 = 2; // chat-1 and big-1
    let denied = loop {
        let d = decision(
            &mut con,
            &example_call("RL.ACQUIRE", &["COST", "usd_micros", "1"]),
        );
        if !d.allowed() {
            break d;
        }
        // The org's concurrency limit gave the call a lease (and an id): end it.
        let id = d.str("id").expect("a generated id");
        run(&mut con, &["RL.RELEASE", USER, &id]);
        admitted_on_k1 += 1;
        assert!(
            admitted_on_k1 <= 30,
            "the key's rpm let a 31st call through"
        );
    };
    assert_eq!(admitted_on_k1, 30);
    assert_eq!(denied.str("denied_by").as_deref(), Some("rpm"));
    assert_eq!(denied.str("denied_key").as_deref(), Some(APIKEY));
    assert!(denied.retry_after_ms() > 0);
    assert_eq!(used(&mut con, USER, "user", "rpm"), 30);
    let d = decision(
        &mut con,
        &[
            "RL.ACQUIRE",
            USER,
            "user",
            "ALSO",
            "3",
            "{acme}:key:k2",
            "key",
            TEAM,
            "team",
            ORG,
            "org",
        ],
    );
    assert!(d.allowed());
    run(&mut con, &["RL.RELEASE", USER, &d.str("id").unwrap()]);
    assert_eq!(used(&mut con, USER, "user", "rpm"), 31);
    // Nothing is left in flight.
    assert_eq!(used(&mut con, ORG, "org", "inflight"), 0);
}

/// A tiny deterministic generator (xorshift), so runs are reproducible per seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn sixteen_users_of_one_org_never_exceed_its_budget_or_concurrency_and_it_counts_exactly_their_charges(
) {
    const BUDGET: i64 = 1_500_000;
    const INFLIGHT: i64 = 6;
    let server = Server::start();
    let mut con = server.client();
    // Windows of ten years: no boundary passes during the test.
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "org",
            "spend",
            &format!("fixed {BUDGET} usd_micros/3650d"),
            "inflight",
            &format!("concurrency {INFLIGHT} ttl 60s"),
        ],
    );
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "user",
            "spend",
            "fixed 1000000000 usd_micros/3650d",
            "rpm",
            "sliding 100000/1m",
        ],
    );
    let held = Arc::new(AtomicI64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    // A watcher reads the org's leases as the server counts them, all along.
    let watcher = {
        let (done, port) = (Arc::clone(&done), server.port);
        std::thread::spawn(move || {
            let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                .unwrap()
                .get_connection()
                .unwrap();
            let (mut samples, mut most) = (0, 0);
            while !done.load(Ordering::SeqCst) {
                let n = used(&mut con, "{org:1}", "org", "inflight");
                assert!(n <= INFLIGHT, "the org holds {n} leases");
                most = most.max(n);
                samples += 1;
            }
            (samples, most)
        })
    };
    let clients: Vec<_> = (0..16u64)
        .map(|i| {
            let (held, port) = (Arc::clone(&held), server.port);
            std::thread::spawn(move || {
                let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                    .unwrap()
                    .get_connection()
                    .unwrap();
                let user = format!("{{org:1}}:user:{i}");
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (i + 1));
                let (mut spent, mut by_spend, mut by_inflight, mut admitted) = (0i64, 0, 0, 0);
                for n in 0.. {
                    let estimate = 5_000 + rng.below(35_000) as i64;
                    let id = format!("u{i}-{n}");
                    let d = decision(
                        &mut con,
                        &[
                            "RL.ACQUIRE",
                            &user,
                            "user",
                            "COST",
                            "usd_micros",
                            &estimate.to_string(),
                            "ID",
                            &id,
                            "ALSO",
                            "1",
                            "{org:1}",
                            "org",
                        ],
                    );
                    if !d.allowed() {
                        // The users' own budgets are ample: only the org denies.
                        assert_eq!(d.str("denied_key").as_deref(), Some("{org:1}"));
                        match d.str("denied_by").as_deref() {
                            Some("spend") => by_spend += 1,
                            Some("inflight") => by_inflight += 1,
                            other => panic!("denied by {other:?}"),
                        }
                        if by_spend >= 5 {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(rng.below(3)));
                        continue;
                    }
                    admitted += 1;
                    // Counted after the admission, uncounted before the release: never
                    // more than the server holds.
                    let now_held = held.fetch_add(1, Ordering::SeqCst) + 1;
                    assert!(now_held <= INFLIGHT, "{now_held} calls in flight at once");
                    std::thread::sleep(Duration::from_millis(rng.below(4)));
                    // Settled for at most the estimate, so the budget is a hard cap.
                    let actual = estimate * rng.below(101) as i64 / 100;
                    held.fetch_sub(1, Ordering::SeqCst);
                    let released = map_of(&run(
                        &mut con,
                        &[
                            "RL.RELEASE",
                            &user,
                            &id,
                            "COST",
                            "usd_micros",
                            &actual.to_string(),
                        ],
                    ));
                    assert_eq!(released["released"], Value::Int(1));
                    spent += actual;
                }
                (spent, admitted, by_spend, by_inflight)
            })
        })
        .collect();
    let results: Vec<(i64, i64, i64, i64)> =
        clients.into_iter().map(|c| c.join().unwrap()).collect();
    done.store(true, Ordering::SeqCst);
    let (samples, most) = watcher.join().unwrap();
    let spent: i64 = results.iter().map(|r| r.0).sum();
    let admitted: i64 = results.iter().map(|r| r.1).sum();
    let by_inflight: i64 = results.iter().map(|r| r.3).sum();
    let org = usage(&mut con, "{org:1}", "org");
    // The org counter is exactly the sum of what its users were charged, as the
    // clients settled it and as each user's own counter says.
    assert_eq!(org["spend"].0, spent);
    let users: i64 = (0..16)
        .map(|i| used(&mut con, &format!("{{org:1}}:user:{i}"), "user", "spend"))
        .sum();
    assert_eq!(users, spent);
    assert!(spent <= BUDGET, "the org spent {spent} of {BUDGET}");
    assert_eq!(org["inflight"].0, 0, "every lease was released");
    // The test did what it says: the budget ran out (every client was denied by it
    // five times) and most of it was spent.
    assert!(spent > BUDGET / 2, "spent only {spent}");
    assert!(admitted >= 60, "only {admitted} calls admitted");
    assert!(samples > 10, "the watcher sampled {samples} times");
    eprintln!(
        "16 users: {admitted} admitted, {by_inflight} denied by the org's concurrency \
         (most seen {most}), {spent} of {BUDGET} spent"
    );
}

#[test]
fn release_and_touch_on_the_first_key_reach_every_level_and_each_level_expires_by_itself() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "lu",
            "jobs",
            "concurrency 2 ttl 60s",
            "tokens",
            "fixed 100000 token/3650d",
        ],
    );
    int(
        &mut con,
        &["RL.PLAN.SET", "lt", "tpd", "fixed 100000 token/3650d"],
    );
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "lo",
            "inflight",
            "concurrency 5",
            "spend",
            "fixed 100000 usd_micros/3650d",
        ],
    );
    let (user, team, org) = ("{x}:user:1", "{x}:team", "{x}");
    let call = |id: &str, ttl: &str| -> Vec<String> {
        [
            "RL.ACQUIRE",
            user,
            "lu",
            "COST",
            "token",
            "100",
            "usd_micros",
            "500",
            "ID",
            id,
            "TTL",
            ttl,
            "ALSO",
            "2",
            team,
            "lt",
            org,
            "lo",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let acquire = |con: &mut redis::Connection, id: &str, ttl: &str| {
        let args = call(id, ttl);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let d = decision(con, &refs);
        assert!(d.allowed(), "{:?}", d.fields);
    };
    let leases = |con: &mut redis::Connection| {
        (
            used(con, user, "lu", "jobs"),
            used(con, org, "lo", "inflight"),
        )
    };

    // A touch on the first key extends the request on every key: past the call's
    // 400 ms TTL, both leases are still held.
    acquire(&mut con, "r1", "400");
    assert_eq!(int(&mut con, &["RL.TOUCH", user, "r1", "60000"]), 1);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(leases(&mut con), (1, 1), "the touch reached every key");

    // A release on the first key settles and frees every level.
    let released = map_of(&run(
        &mut con,
        &[
            "RL.RELEASE",
            user,
            "r1",
            "COST",
            "token",
            "40",
            "usd_micros",
            "200",
        ],
    ));
    assert_eq!(released["released"], Value::Int(1));
    assert_eq!(leases(&mut con), (0, 0));
    assert_eq!(used(&mut con, user, "lu", "tokens"), 40);
    assert_eq!(used(&mut con, team, "lt", "tpd"), 40);
    assert_eq!(used(&mut con, org, "lo", "spend"), 200);
    for key in [user, org] {
        let again = map_of(&run(&mut con, &["RL.RELEASE", key, "r1"]));
        assert_eq!(again["released"], Value::Int(0));
        assert_eq!(text(&again["reason"]), "released", "{key}");
    }

    // Unreleased, the request expires on every key by itself: leases free, the
    // estimates stay charged (expiry settles nothing).
    acquire(&mut con, "r2", "300");
    assert_eq!(leases(&mut con), (1, 1));
    wait_until(10, "the leases to expire", || leases(&mut con) == (0, 0));
    assert_eq!(used(&mut con, user, "lu", "tokens"), 140);
    assert_eq!(used(&mut con, team, "lt", "tpd"), 140);
    assert_eq!(used(&mut con, org, "lo", "spend"), 700);
    let late = map_of(&run(
        &mut con,
        &["RL.RELEASE", user, "r2", "COST", "token", "0"],
    ));
    assert_eq!(late["released"], Value::Int(0));
    assert_eq!(text(&late["reason"]), "expired");
    assert_eq!(
        used(&mut con, team, "lt", "tpd"),
        140,
        "an expired request settles nothing"
    );

    // A release on one of the other keys ends the request there only; the first key
    // then releases the rest (and says which keys it reached).
    acquire(&mut con, "r3", "60000");
    let on_org = map_of(&run(
        &mut con,
        &["RL.RELEASE", org, "r3", "COST", "usd_micros", "0"],
    ));
    assert_eq!(on_org["released"], Value::Int(1));
    assert_eq!(text(&on_org["plan"]), "lo");
    assert!(!on_org.contains_key("also"), "{on_org:?}");
    assert_eq!(leases(&mut con), (1, 0));
    assert_eq!(used(&mut con, org, "lo", "spend"), 700);
    let on_user = map_of(&run(&mut con, &["RL.RELEASE", user, "r3"]));
    assert_eq!(on_user["released"], Value::Int(1));
    let reached: Vec<String> = also_of(&on_user).into_iter().map(|p| p.key).collect();
    assert_eq!(reached, [team], "the org's part was released already");
    assert_eq!(leases(&mut con), (0, 0));
    // A touch on one of the other keys extends that key only.
    acquire(&mut con, "r4", "300");
    assert_eq!(int(&mut con, &["RL.TOUCH", org, "r4", "60000"]), 1);
    wait_until(10, "the user's lease to expire", || {
        used(&mut con, user, "lu", "jobs") == 0
    });
    assert_eq!(used(&mut con, org, "lo", "inflight"), 1);
    assert_eq!(int(&mut con, &["RL.TOUCH", user, "r4", "60000"]), 0);
    run(&mut con, &["RL.RELEASE", org, "r4"]);

    // Each key holds only its own state and goes away by itself once idle.
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "su",
            "jobs",
            "concurrency 1 ttl 1s",
            "rps",
            "fixed 10/1s",
        ],
    );
    int(&mut con, &["RL.PLAN.SET", "so", "rps", "fixed 100/1s"]);
    let d = decision(
        &mut con,
        &[
            "RL.ACQUIRE",
            "{y}:user",
            "su",
            "ID",
            "e",
            "TTL",
            "200",
            "ALSO",
            "1",
            "{y}",
            "so",
        ],
    );
    assert!(d.allowed());
    assert_eq!(int(&mut con, &["EXISTS", "{y}:user", "{y}"]), 2);
    wait_until(10, "both keys to expire by themselves", || {
        int(&mut con, &["EXISTS", "{y}:user", "{y}"]) == 0
    });
}

/// Runs a command on a new connection in a thread; the receiver gets its reply.
fn spawn(port: u16, args: Vec<String>) -> std::sync::mpsc::Receiver<Result<Value, String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .unwrap()
            .get_connection()
            .unwrap();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let _ = tx.send(try_run(&mut con, &refs));
    });
    rx
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `tollgate_<name>` of `INFO tollgate`.
fn info_counter(con: &mut redis::Connection, name: &str) -> i64 {
    let info = string(con, &["INFO", "tollgate"]);
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("tollgate_{name}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1)
}

#[test]
fn a_waiter_on_a_user_key_is_woken_by_a_release_on_the_org_key() {
    let server = Server::start_with(&["--hz", "100"]);
    let mut con = server.client();
    int(
        &mut con,
        &["RL.PLAN.SET", "org", "inflight", "concurrency 1 ttl 60s"],
    );
    int(
        &mut con,
        &["RL.PLAN.SET", "user", "jobs", "concurrency 1 ttl 60s"],
    );
    // User a holds the org's only slot (and its own).
    let a = decision(
        &mut con,
        &[
            "RL.ACQUIRE",
            "{o}:user:a",
            "user",
            "ID",
            "a-1",
            "ALSO",
            "1",
            "{o}",
            "org",
        ],
    );
    assert!(a.allowed());
    // User b has room of its own but waits on the org.
    let rx = spawn(
        server.port,
        strings(&[
            "RL.ACQUIRE",
            "{o}:user:b",
            "user",
            "ID",
            "b-1",
            "WAIT",
            "30000",
            "ALSO",
            "1",
            "{o}",
            "org",
        ]),
    );
    wait_until(10, "b to wait", || {
        info_counter(&mut con, "waiting_clients") == 1
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "b was admitted while the org's slot was held"
    );
    // The release names the org key alone: it frees the org's slot, which wakes b.
    let released = map_of(&run(&mut con, &["RL.RELEASE", "{o}", "a-1"]));
    assert_eq!(released["released"], Value::Int(1));
    let reply = rx.recv_timeout(Duration::from_secs(60)).expect("b woken");
    let b = Decision::from(&reply.unwrap());
    assert!(b.allowed(), "{:?}", b.fields);
    assert_eq!(b.str("id").as_deref(), Some("b-1"));
    assert_eq!(info_counter(&mut con, "waits_admitted"), 1);
    assert_eq!(used(&mut con, "{o}", "org", "inflight"), 1);
    // a's user key still holds its part (the release named the org key only).
    assert_eq!(used(&mut con, "{o}:user:a", "user", "jobs"), 1);
    assert_eq!(used(&mut con, "{o}:user:b", "user", "jobs"), 1);
    // b-2 waits on both levels (b's own job and the org's slot are held by b-1): a
    // release on b's key, its first key, frees both and wakes it.
    let rx = spawn(
        server.port,
        strings(&[
            "RL.ACQUIRE",
            "{o}:user:b",
            "user",
            "ID",
            "b-2",
            "WAIT",
            "30000",
            "ALSO",
            "1",
            "{o}",
            "org",
        ]),
    );
    wait_until(10, "b-2 to wait", || {
        info_counter(&mut con, "waiting_clients") == 1
    });
    let released = map_of(&run(&mut con, &["RL.RELEASE", "{o}:user:b", "b-1"]));
    assert_eq!(released["released"], Value::Int(1));
    let b2 = Decision::from(&rx.recv_timeout(Duration::from_secs(60)).unwrap().unwrap());
    assert!(b2.allowed());
    assert_eq!(info_counter(&mut con, "waits_admitted"), 2);
}

#[test]
fn compact_with_also_lists_every_pair_in_call_order_and_counts_the_denied_index_across_them() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "u",
            "rpm",
            "fixed 10/1m",
            "tpm",
            "fixed 1000 token/1m",
        ],
    );
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "t",
            "tpd",
            "fixed 500 token/1d",
            "web",
            "fixed 5/1d for web",
        ],
    );
    int(
        &mut con,
        &["RL.PLAN.SET", "o", "spend", "fixed 300 token/1d"],
    );
    let compact = |con: &mut redis::Connection, command: &str, tokens: &str, endpoint: bool| {
        let mut args = vec![command, "{c}:u", "u", "COST", "token", tokens];
        if endpoint {
            args.extend_from_slice(&["ENDPOINT", "web"]);
        }
        args.extend_from_slice(&["COMPACT", "ALSO", "2", "{c}:t", "t", "{c}", "o"]);
        match run(con, &args) {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::Int(n) => *n,
                    other => panic!("{other:?}"),
                })
                .collect::<Vec<i64>>(),
            other => panic!("{other:?}"),
        }
    };
    // allowed, retry, denied index, then per pair the fallbacks taken and (remaining,
    // reset) of its limits: u (hops, rpm, tpm), t (hops, tpd, web: -1, -1 as it applies
    // to ENDPOINT web only), o (hops, spend).
    let r = compact(&mut con, "RL.ACQUIRE", "200", false);
    assert_eq!(r.len(), 3 + 3 + 2 * 5, "{r:?}");
    assert_eq!(&r[..3], &[1, 0, -1]);
    assert_eq!(r[3], 0, "u decided by the plan asked for");
    assert_eq!(r[4], 9);
    assert_eq!(r[6], 800);
    assert_eq!(r[8], 0);
    assert_eq!(r[9], 300);
    assert_eq!(&r[11..13], &[-1, -1]);
    assert_eq!(r[13], 0);
    assert_eq!(r[14], 100);
    // The org's spend (index 4 counting limits across the pairs) denies 200 more.
    let r = compact(&mut con, "RL.ACQUIRE", "200", false);
    assert_eq!(&r[..1], &[0]);
    assert!(r[1] > 0);
    assert_eq!(r[2], 4, "{r:?}");
    assert_eq!(r[14], 100, "nothing charged");
    // With ENDPOINT web, the team's `web` limit applies, and the same shape.
    let r = compact(&mut con, "RL.PEEK", "10", true);
    assert_eq!(&r[..3], &[1, 0, -1]);
    assert_eq!(r[11], 4);
    // The same call as a map says the same.
    let d = decision(
        &mut con,
        &[
            "RL.PEEK", "{c}:u", "u", "COST", "token", "200", "ALSO", "2", "{c}:t", "t", "{c}", "o",
        ],
    );
    assert!(!d.allowed());
    assert_eq!(d.str("denied_by").as_deref(), Some("spend"));
    assert_eq!(d.str("denied_key").as_deref(), Some("{c}"));
}

#[test]
fn peek_with_also_answers_what_acquire_would_and_charges_nothing() {
    let server = Server::start();
    let mut con = server.client();
    worked_example_plans(&mut con);
    let peek = example_call("RL.PEEK", &["COST", "token", "500", "usd_micros", "7000"]);
    // Nothing exists yet; a peek creates nothing.
    let d = decision(&mut con, &peek);
    assert!(d.allowed());
    assert_eq!(int(&mut con, &["EXISTS", USER, APIKEY, TEAM, ORG]), 0);
    assert_eq!(digest(&mut con), "0".repeat(40));
    // On existing keys it changes nothing either (same digest), and answers exactly
    // what the acquire then does.
    let acquire = example_call(
        "RL.ACQUIRE",
        &["COST", "token", "500", "usd_micros", "7000", "ID", "p-1"],
    );
    assert!(decision(&mut con, &acquire).allowed());
    let before = digest(&mut con);
    let peeked = decision(&mut con, &peek);
    assert_eq!(digest(&mut con), before);
    assert_eq!(int(&mut con, &["DBSIZE"]), 4);
    let acquire = example_call(
        "RL.ACQUIRE",
        &["COST", "token", "500", "usd_micros", "7000", "ID", "p-2"],
    );
    let acquired = decision(&mut con, &acquire);
    assert_eq!(peeked.allowed(), acquired.allowed());
    assert_eq!(peeked.remaining("rpm"), acquired.remaining("rpm"));
    // The bucket refills between the two calls (40,000 a minute: ~1 a 1.5 ms).
    let (p, a) = (peeked.remaining("tpm"), acquired.remaining("tpm"));
    assert!(p <= a && a <= p + 200, "peeked {p}, acquired {a}");
    let (p, a) = (also_of(&peeked.fields), also_of(&acquired.fields));
    assert_eq!(p[1].remaining("tpd"), a[1].remaining("tpd"));
    assert_eq!(p[2].remaining("spend"), a[2].remaining("spend"));
    assert_eq!(p[2].remaining("inflight"), a[2].remaining("inflight"));
    // PEEK takes no ID (it registers nothing).
    assert_eq!(
        err(
            &mut con,
            &["RL.PEEK", USER, "user", "ID", "x", "ALSO", "1", ORG, "org"]
        ),
        "ERR unexpected argument 'ID' (expected COST, ENDPOINT, COMPACT or ALSO)"
    );
}

#[test]
fn bad_also_input_gets_one_clear_error_and_changes_nothing() {
    let server = Server::start_with(&["--tollgate.max-also", "3"]);
    let mut con = server.client();
    worked_example_plans(&mut con);
    // Some state to keep unchanged.
    assert!(decision(
        &mut con,
        &example_call("RL.ACQUIRE", &["COST", "token", "10", "ID", "keep"])
    )
    .allowed());
    let before = digest(&mut con);
    let calls = info_counter(&mut con, "calls");
    let cases: &[(&[&str], &str)] = &[
        (
            &["ALSO", "0", ORG, "org"],
            "ERR ALSO count must be between 1 and 3 (tollgate.max-also)",
        ),
        (
            &["ALSO", "4", ORG, "org", TEAM, "team", APIKEY, "key", "{acme}:k9", "key"],
            "ERR ALSO count must be between 1 and 3 (tollgate.max-also)",
        ),
        (
            &["ALSO", "-1", ORG, "org"],
            "ERR ALSO count must be a non-negative integer, got '-1'",
        ),
        (
            &["ALSO", "two", ORG, "org"],
            "ERR ALSO count must be a non-negative integer, got 'two'",
        ),
        (&["ALSO"], "ERR ALSO needs a value"),
        (&["ALSO", "1"], "ERR ALSO 1 needs 1 key and plan pairs"),
        (
            &["ALSO", "2", ORG, "org", TEAM],
            "ERR ALSO 2 needs 2 key and plan pairs",
        ),
        (
            &["ALSO", "1", ORG, "org", TEAM, "team"],
            "ERR unexpected argument '{acme}:team:research' (expected COST, ENDPOINT, ID, TTL, WAIT, PRIORITY, CREDITS, COMPACT or ALSO)",
        ),
        (
            &["ALSO", "1", "{acme}:fresh", "user"],
            "ERR key '{acme}:fresh' is named twice in one call",
        ),
        (
            &["ALSO", "2", ORG, "org", ORG, "org"],
            "ERR key '{acme}' is named twice in one call",
        ),
        (
            &["CREDITS", ORG, "5", "ALSO", "1", ORG, "org"],
            "ERR key '{acme}' is named twice in one call",
        ),
        (
            &["ALSO", "1", ORG, "org", "ALSO", "1", TEAM, "team"],
            "ERR ALSO given twice",
        ),
        (&["ALSO", "1", ORG, "nosuch"], "ERR unknown plan 'nosuch'"),
        (
            &["ALSO", "2", TEAM, "team", ORG, "nosuch"],
            "ERR unknown plan 'nosuch'",
        ),
        (
            &["ID", "keep", "ALSO", "1", "{acme}:other", "team"],
            "ERR the request id is in flight on key '{acme}:other' for another call; use a new id",
        ),
    ];
    // The last case needs `keep` live on a key that is not first: make it so, then
    // measure from there.
    assert!(decision(
        &mut con,
        &["RL.ACQUIRE", "{acme}:other", "team", "ID", "keep"]
    )
    .allowed());
    let before_other = digest(&mut con);
    assert_ne!(before_other, before);
    let before = before_other;
    for (extra, expected) in cases {
        let mut args = vec!["RL.ACQUIRE", "{acme}:fresh", "user"];
        args.extend_from_slice(extra);
        assert_eq!(&err(&mut con, &args), expected, "{args:?}");
        assert_eq!(digest(&mut con), before, "{args:?} changed something");
    }
    // The same errors on RL.PEEK (without ID/CREDITS).
    assert_eq!(
        err(
            &mut con,
            &["RL.PEEK", USER, "user", "ALSO", "1", USER, "user"]
        ),
        "ERR key '{acme}:user:42' is named twice in one call"
    );
    assert_eq!(
        err(
            &mut con,
            &["RL.PEEK", USER, "user", "ALSO", "9", ORG, "org"]
        ),
        "ERR ALSO count must be between 1 and 3 (tollgate.max-also)"
    );
    // A subject key holding another type.
    run(&mut con, &["SET", "{acme}:str", "x"]);
    let before = digest(&mut con);
    assert_eq!(
        err(
            &mut con,
            &[
                "RL.ACQUIRE",
                USER,
                "user",
                "ALSO",
                "2",
                ORG,
                "org",
                "{acme}:str",
                "team"
            ]
        ),
        "WRONGTYPE Operation against a key holding the wrong kind of value"
    );
    assert_eq!(digest(&mut con), before);
    // An error is no call: nothing counted.
    assert_eq!(info_counter(&mut con, "calls"), calls + 1);
    // max-also is a runtime setting.
    run(&mut con, &["CONFIG", "SET", "tollgate.max-also", "1"]);
    assert_eq!(
        err(
            &mut con,
            &[
                "RL.ACQUIRE",
                USER,
                "user",
                "ALSO",
                "2",
                ORG,
                "org",
                TEAM,
                "team"
            ]
        ),
        "ERR ALSO count must be between 1 and 1 (tollgate.max-also)"
    );
}

#[test]
fn a_retried_acquire_with_a_live_id_and_also_answers_the_original_decision_and_charges_nothing() {
    let server = Server::start();
    let mut con = server.client();
    worked_example_plans(&mut con);
    let call = example_call(
        "RL.ACQUIRE",
        &[
            "COST",
            "token",
            "2000",
            "usd_micros",
            "30000",
            "ID",
            "chat-9",
        ],
    );
    let first = decision(&mut con, &call);
    assert!(first.allowed());
    let before = example_standing(&mut con);
    let tpm_before = tpm_used(&mut con);
    let digest_before = digest(&mut con);
    for _ in 0..3 {
        let again = decision(&mut con, &call);
        assert!(again.allowed());
        assert_eq!(again.str("id").as_deref(), Some("chat-9"));
        assert_eq!(again.str("plan").as_deref(), Some("user"));
        assert_eq!(again.str("denied_key"), None);
        // Limits as they stand now: the bucket refilled a little since, no more.
        assert!(again.remaining("tpm") >= first.remaining("tpm"));
        let (a, f) = (also_of(&again.fields), also_of(&first.fields));
        assert_eq!(
            a.iter().map(|p| (&p.key, &p.plan)).collect::<Vec<_>>(),
            f.iter().map(|p| (&p.key, &p.plan)).collect::<Vec<_>>()
        );
        assert_eq!(a[2].remaining("spend"), f[2].remaining("spend"));
        assert_eq!(a[2].remaining("inflight"), f[2].remaining("inflight"));
    }
    assert_eq!(
        example_standing(&mut con),
        before,
        "a retry charges nothing"
    );
    assert!(tpm_used(&mut con) <= tpm_before);
    assert_eq!(digest(&mut con), digest_before);
    // Released once, on every level.
    let released = map_of(&run(&mut con, &["RL.RELEASE", USER, "chat-9"]));
    assert_eq!(also_of(&released).len(), 3);
    assert_eq!(used(&mut con, ORG, "org", "inflight"), 0);
}

/// A multi-level workload: org, teams, users and keys under several orgs, with ids,
/// estimates settled on actual costs (on the first key and on other keys), touches,
/// denials, retries and expiring leases.
fn hierarchy_workload(con: &mut redis::Connection, seed: u64) {
    int(
        con,
        &[
            "RL.PLAN.SET",
            "w-org",
            "spend",
            "fixed 5000000 usd_micros/1mo warn 80%",
            "inflight",
            "concurrency 6 ttl 60s",
        ],
    );
    int(
        con,
        &[
            "RL.PLAN.SET",
            "w-team",
            "tpd",
            "fixed 200000 token/1d",
            "tpm",
            "bucket 30000 token/1m",
        ],
    );
    int(
        con,
        &[
            "RL.PLAN.SET",
            "w-user",
            "rpm",
            "sliding 40/1m",
            "tpm",
            "bucket 8000 token/1m",
            "jobs",
            "concurrency 2 ttl 60s",
        ],
    );
    int(
        con,
        &["RL.PLAN.SET", "w-key", "rpm", "sliding 25/1m precision 20"],
    );
    let mut rng = Rng(seed);
    let mut live: Vec<(String, String)> = Vec::new();
    for n in 0..400 {
        let org = format!("{{w{}}}", rng.below(3));
        let user = format!("{org}:user:{}", rng.below(4));
        let team = format!("{org}:team:{}", rng.below(2));
        let key = format!("{org}:key:{}", rng.below(3));
        let id = format!("w{seed}-{n}");
        let tokens = (100 + rng.below(3_000)).to_string();
        let usd = (1_000 + rng.below(90_000)).to_string();
        let mut args = vec![
            "RL.ACQUIRE",
            &user,
            "w-user",
            "COST",
            "token",
            &tokens,
            "usd_micros",
            &usd,
            "ID",
            &id,
        ];
        let ttl = "300";
        if rng.below(8) == 0 {
            args.extend_from_slice(&["TTL", ttl]);
        }
        args.extend_from_slice(&["ALSO", "3", &key, "w-key", &team, "w-team", &org, "w-org"]);
        let d = decision(con, &args);
        if d.allowed() {
            live.push((user.clone(), id.clone()));
            if rng.below(10) == 0 {
                // A retry of the same call: answered, not charged.
                assert!(decision(con, &args).allowed());
            }
        }
        match rng.below(6) {
            0..=2 if !live.is_empty() => {
                let (user, id) = live.remove(rng.below(live.len() as u64) as usize);
                let actual_tokens = rng.below(4_000).to_string();
                let actual_usd = rng.below(120_000).to_string();
                // Mostly on the first key (every level); sometimes on the org alone.
                let target = if rng.below(5) == 0 {
                    user.split(':').next().unwrap().to_string()
                } else {
                    user.clone()
                };
                run(
                    con,
                    &[
                        "RL.RELEASE",
                        &target,
                        &id,
                        "COST",
                        "token",
                        &actual_tokens,
                        "usd_micros",
                        &actual_usd,
                    ],
                );
            }
            3 if !live.is_empty() => {
                let (user, id) = &live[rng.below(live.len() as u64) as usize];
                int(con, &["RL.TOUCH", user, id, "90000"]);
            }
            _ => {}
        }
    }
}

#[test]
fn a_replica_and_an_aof_replay_reach_the_primary_digest_after_a_multi_level_workload() {
    let mut primary = Server::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let replica = Server::start();
    let mut p = primary.client();
    // Part before the replica attaches (full sync), part after (the stream).
    hierarchy_workload(&mut p, 7);
    attach_replica(&primary, &replica);
    hierarchy_workload(&mut p, 11);
    // Some requests expire (their leases freed on the next write of each key).
    std::thread::sleep(Duration::from_millis(400));
    hierarchy_workload(&mut p, 13);
    assert!(int(&mut p, &["DBSIZE"]) >= 20);
    wait_in_sync(&primary, &replica);
    let mut r = replica.client();
    let primary_digest = digest(&mut p);
    assert_eq!(digest(&mut r), primary_digest, "replica digest");
    // The replica answers as the primary does, on every level.
    for key in ["{w0}", "{w1}", "{w2}"] {
        assert_eq!(usage(&mut r, key, "w-org"), usage(&mut p, key, "w-org"));
    }
    // kill -9 and restart from the AOF alone.
    primary.kill9();
    let primary = primary.restart();
    let mut p = primary.client();
    assert_eq!(digest(&mut p), primary_digest, "AOF replay digest");
    for key in ["{w0}", "{w1}", "{w2}"] {
        assert_eq!(usage(&mut p, key, "w-org"), usage(&mut r, key, "w-org"));
    }
}

const CLUSTER_PLANS: &str = r#"{
  "plans": {
    "c-org":  { "spend": "fixed 400000 usd_micros/3650d", "inflight": "concurrency 50" },
    "c-team": { "tpd": "fixed 1000000 token/3650d" },
    "c-user": { "rpm": "sliding 1000/1m", "spend": "fixed 1000000000 usd_micros/3650d" }
  }
}"#;

#[test]
fn a_cluster_decides_several_orgs_each_in_one_step_and_refuses_keys_of_two_slots() {
    let cluster = Cluster::start(3);
    let file = cluster.nodes[0].dir.join("plans.json");
    std::fs::write(&file, CLUSTER_PLANS).unwrap();
    let (code, out, stderr) = cli(&[
        "--cluster",
        "--url",
        &cluster.seed_url(),
        "plans",
        "apply",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {stderr}");
    let seeds: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("redis://127.0.0.1:{}", n.port))
        .collect();
    let mut con = redis::cluster::ClusterClient::new(seeds)
        .unwrap()
        .get_connection()
        .unwrap();
    let query = |con: &mut redis::cluster::ClusterConnection, args: &[&str]| {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query::<Value>(con).map_err(|e| error_text(&e))
    };
    // Eight orgs over the three shards; each org's users and team share its slot.
    let orgs: Vec<String> = (0..8).map(|i| format!("{{org{i}}}")).collect();
    let mut shards = std::collections::HashSet::new();
    for org in &orgs {
        shards.insert(cluster.primary_for(org).port);
    }
    assert_eq!(shards.len(), 3, "the orgs cover every shard");
    let mut spent: HashMap<String, i64> = HashMap::new();
    let mut denied = 0;
    let mut rng = Rng(42);
    for n in 0..600 {
        let org = &orgs[n % orgs.len()];
        let user = format!("{org}:user:{}", rng.below(5));
        let team = format!("{org}:team:{}", rng.below(2));
        let usd = 2_000 + rng.below(20_000) as i64;
        let id = format!("c{n}");
        let reply = query(
            &mut con,
            &[
                "RL.ACQUIRE",
                &user,
                "c-user",
                "COST",
                "usd_micros",
                &usd.to_string(),
                "token",
                "100",
                "ID",
                &id,
                "ALSO",
                "2",
                &team,
                "c-team",
                org,
                "c-org",
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let d = Decision::from(&reply);
        if !d.allowed() {
            assert_eq!(d.str("denied_key").as_deref(), Some(org.as_str()));
            assert_eq!(d.str("denied_by").as_deref(), Some("spend"));
            denied += 1;
            continue;
        }
        let actual = usd / 2 + rng.below(usd as u64 / 2) as i64;
        query(
            &mut con,
            &[
                "RL.RELEASE",
                &user,
                &id,
                "COST",
                "usd_micros",
                &actual.to_string(),
            ],
        )
        .unwrap();
        *spent.entry(org.clone()).or_default() += actual;
    }
    assert!(denied > 0, "the orgs' budgets ran out");
    for org in &orgs {
        let node = cluster.primary_for(org);
        let mut c = node.client();
        let org_usage = usage(&mut c, org, "c-org");
        assert_eq!(org_usage["spend"].0, spent[org], "{org}");
        assert!(org_usage["spend"].0 <= 400_000);
        assert_eq!(org_usage["inflight"].0, 0);
        let users: i64 = (0..5)
            .map(|u| used(&mut c, &format!("{org}:user:{u}"), "c-user", "spend"))
            .sum();
        assert_eq!(
            users, spent[org],
            "{org}: the users' charges add up to the org's"
        );
    }
    // Keys of two slots: refused by the node serving the first key, nothing charged.
    let (a, b) = ("{org0}:user:9", "{org1}");
    let node = cluster.primary_for(a);
    let mut c = node.client();
    assert_ne!(
        int(&mut c, &["CLUSTER", "KEYSLOT", a]),
        int(&mut c, &["CLUSTER", "KEYSLOT", b])
    );
    let before = digest(&mut c);
    assert_eq!(
        err(
            &mut c,
            &[
                "RL.ACQUIRE",
                a,
                "c-user",
                "ID",
                "x",
                "ALSO",
                "1",
                b,
                "c-org"
            ]
        ),
        "CROSSSLOT Keys in request don't hash to the same slot"
    );
    assert_eq!(
        err(&mut c, &["RL.PEEK", a, "c-user", "ALSO", "1", b, "c-org"]),
        "CROSSSLOT Keys in request don't hash to the same slot"
    );
    assert_eq!(
        query(
            &mut con,
            &["RL.ACQUIRE", a, "c-user", "ALSO", "1", b, "c-org"]
        )
        .unwrap_err(),
        "CROSSSLOT Keys in request don't hash to the same slot"
    );
    assert_eq!(digest(&mut c), before, "nothing charged");
    assert_eq!(int(&mut c, &["EXISTS", a]), 0);
    // Every replica holds exactly what its primary holds.
    for node in &cluster.nodes {
        let mut c = node.client();
        if let Value::Array(role) = run(&mut c, &["ROLE"]) {
            if text(&role[0]) == "master" {
                assert_eq!(int(&mut c, &["WAIT", "1", "5000"]), 1);
            }
        }
    }
    let mut by_shard: HashMap<String, Vec<String>> = HashMap::new();
    for node in &cluster.nodes {
        let mut c = node.client();
        let nodes = string(&mut c, &["CLUSTER", "NODES"]);
        let me = nodes.lines().find(|l| l.contains("myself")).unwrap();
        let fields: Vec<&str> = me.split_whitespace().collect();
        let shard = if fields[3] == "-" {
            fields[0]
        } else {
            fields[3]
        };
        by_shard
            .entry(shard.to_string())
            .or_default()
            .push(digest(&mut c));
    }
    assert_eq!(by_shard.len(), 3);
    for (shard, digests) in by_shard {
        assert_eq!(digests.len(), 2, "{shard}");
        assert_eq!(digests[0], digests[1], "shard {shard}: replica digest");
    }
}

#[test]
fn each_pair_resolves_its_own_plan_and_fallback_while_the_other_levels_still_hold() {
    let server = Server::start();
    let mut con = server.client();
    // The user's pro plan falls back to free; one `rpm` budget on the key (2, then 4).
    int(&mut con, &["RL.PLAN.SET", "u-free", "rpm", "fixed 4/1d"]);
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "u-pro",
            "rpm",
            "fixed 2/1d",
            "fallback",
            "u-free",
        ],
    );
    int(&mut con, &["RL.PLAN.SET", "o", "calls", "fixed 5/1d"]);
    // The org's plan is assigned to its key: `*` resolves per key.
    assert_eq!(string(&mut con, &["RL.ASSIGN", "{f}", "o"]), "OK");
    let call = |con: &mut redis::Connection, user: &str| {
        decision(con, &["RL.ACQUIRE", user, "u-pro", "ALSO", "1", "{f}", "*"])
    };
    let plans = |d: &Decision| {
        let also = also_of(&d.fields);
        (d.str("plan").unwrap(), also[0].plan.clone())
    };
    for expected in ["u-pro", "u-pro", "u-free", "u-free"] {
        let d = call(&mut con, "{f}:user:1");
        assert!(d.allowed());
        assert_eq!(plans(&d), (expected.to_string(), "o".to_string()));
    }
    // The fallback does not escape the shared budget...
    let d = call(&mut con, "{f}:user:1");
    assert!(!d.allowed());
    assert_eq!(d.str("denied_by").as_deref(), Some("rpm"));
    assert_eq!(d.str("denied_key").as_deref(), Some("{f}:user:1"));
    assert_eq!(
        used(&mut con, "{f}", "o", "calls"),
        4,
        "the org was not charged"
    );
    // ...and the org's budget holds whatever plan a user ends up under.
    assert!(call(&mut con, "{f}:user:2").allowed());
    let d = call(&mut con, "{f}:user:2");
    assert!(!d.allowed());
    assert_eq!(d.str("denied_by").as_deref(), Some("calls"));
    assert_eq!(d.str("denied_key").as_deref(), Some("{f}"));
    assert_eq!(used(&mut con, "{f}:user:2", "u-pro", "rpm"), 1);
    // INFO counts each call once, and the fallback admissions.
    assert_eq!(info_counter(&mut con, "calls"), 7);
    assert_eq!(info_counter(&mut con, "admitted"), 5);
    assert_eq!(info_counter(&mut con, "fallback_admitted"), 2);
}

/// The scheme docs/commands.md gives for an org too hot for one shard: the org level
/// in its own slot, decided in a step of its own before the user's levels, and given
/// back when they deny.
#[test]
fn a_hot_org_decided_in_its_own_step_is_given_back_what_a_denied_call_took() {
    let server = Server::start();
    let mut con = server.client();
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "org",
            "spend",
            "fixed 100000 usd_micros/3650d",
            "rpd",
            "fixed 1000/3650d",
        ],
    );
    int(&mut con, &["RL.PLAN.SET", "user", "rpm", "fixed 1/1d"]);
    int(&mut con, &["RL.PLAN.SET", "apikey", "rpm", "fixed 10/1d"]);
    let step = |con: &mut redis::Connection, user: &str, id: &str, usd: &str| -> bool {
        let org = decision(
            con,
            &[
                "RL.ACQUIRE",
                "{acme}",
                "org",
                "COST",
                "usd_micros",
                usd,
                "ID",
                id,
            ],
        );
        if !org.allowed() {
            return false;
        }
        let users = decision(
            con,
            &[
                "RL.ACQUIRE",
                &format!("{{{user}}}:user"),
                "user",
                "ID",
                id,
                "ALSO",
                "1",
                &format!("{{{user}}}:key:k1"),
                "apikey",
            ],
        );
        if !users.allowed() {
            let back = map_of(&run(
                con,
                &[
                    "RL.RELEASE",
                    "{acme}",
                    id,
                    "COST",
                    "usd_micros",
                    "0",
                    "request",
                    "0",
                ],
            ));
            assert_eq!(back["released"], Value::Int(1));
            return false;
        }
        true
    };
    assert!(step(&mut con, "acme:u1", "a", "30000"));
    assert_eq!(used(&mut con, "{acme}", "org", "spend"), 30_000);
    // u1's own rpm denies the second call: the org gets back what it took.
    assert!(!step(&mut con, "acme:u1", "b", "30000"));
    assert_eq!(used(&mut con, "{acme}", "org", "spend"), 30_000);
    assert_eq!(used(&mut con, "{acme}", "org", "rpd"), 1);
    // The org's budget still never overspends: 30,000 + 50,000 fit, 30,000 more not.
    assert!(step(&mut con, "acme:u2", "c", "50000"));
    assert!(!step(&mut con, "acme:u3", "d", "30000"));
    assert_eq!(used(&mut con, "{acme}", "org", "spend"), 80_000);
    assert_eq!(used(&mut con, "{acme:u3}:user", "user", "rpm"), 0);
    // Settling: one release per slot, with the actual costs.
    for (user, id) in [("acme:u1", "a"), ("acme:u2", "c")] {
        run(
            &mut con,
            &["RL.RELEASE", "{acme}", id, "COST", "usd_micros", "10000"],
        );
        let released = map_of(&run(
            &mut con,
            &["RL.RELEASE", &format!("{{{user}}}:user"), id],
        ));
        assert_eq!(also_of(&released).len(), 1);
    }
    assert_eq!(used(&mut con, "{acme}", "org", "spend"), 20_000);
}

#[test]
fn notifications_name_the_first_key_for_a_denial_and_each_key_that_crossed_its_warning() {
    let server = Server::start();
    let mut con = server.client();
    assert_eq!(
        string(&mut con, &["CONFIG", "SET", "notify-keyspace-events", "Ed"]),
        "OK"
    );
    int(&mut con, &["RL.PLAN.SET", "u", "rpd", "fixed 10/1d"]);
    int(
        &mut con,
        &["RL.PLAN.SET", "o", "calls", "fixed 2/1d warn 50%"],
    );
    let mut sub_con = server.client();
    let mut pubsub = sub_con.as_pubsub();
    pubsub
        .subscribe(&["__keyevent@0__:rl.denied", "__keyevent@0__:rl.warn"])
        .unwrap();
    pubsub
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let call = ["RL.ACQUIRE", "{n}:u", "u", "ALSO", "1", "{n}", "o"];
    assert!(decision(&mut con, &call).allowed());
    assert!(decision(&mut con, &call).allowed());
    let denied = decision(&mut con, &call);
    assert_eq!(denied.str("denied_key").as_deref(), Some("{n}"));
    let mut events = Vec::new();
    for _ in 0..2 {
        let msg = pubsub.get_message().unwrap();
        let payload: String = msg.get_payload().unwrap();
        events.push((msg.get_channel_name().to_string(), payload));
    }
    assert_eq!(
        events,
        [
            ("__keyevent@0__:rl.warn".to_string(), "{n}".to_string()),
            ("__keyevent@0__:rl.denied".to_string(), "{n}:u".to_string()),
        ]
    );
    assert_eq!(info_counter(&mut con, "calls"), 3);
    assert_eq!(info_counter(&mut con, "denied"), 1);
    assert_eq!(info_counter(&mut con, "requests_in_flight"), 0);
}

#[test]
fn credits_with_also_are_charged_once_when_every_level_admits_and_never_when_one_denies() {
    let server = Server::start();
    let mut con = server.client();
    const CREDITS: &str = "{acme}:credits";
    int(&mut con, &["RL.PLAN.SET", "u", "rpd", "fixed 2/1d"]);
    int(&mut con, &["RL.PLAN.SET", "o", "spend", "fixed 100 usd/1d"]);
    assert_eq!(int(&mut con, &["RL.CREDITS.GRANT", CREDITS, "10"]), 10);
    let call = |con: &mut redis::Connection, id: &str, usd: &str, credits: &str| {
        decision(
            con,
            &[
                "RL.ACQUIRE",
                USER,
                "u",
                "COST",
                "usd",
                usd,
                "ID",
                id,
                "CREDITS",
                CREDITS,
                credits,
                "ALSO",
                "1",
                ORG,
                "o",
            ],
        )
    };
    let standing = |con: &mut redis::Connection| {
        (
            int(con, &["RL.CREDITS.BALANCE", CREDITS]),
            used(con, USER, "u", "rpd"),
            used(con, ORG, "o", "spend"),
        )
    };
    // Admitted: every level charged, the credits once (4, not 4 per level).
    let d = call(&mut con, "r1", "30", "4");
    assert!(d.allowed(), "{:?}", d.fields);
    assert_eq!(d.int("credits"), 6);
    assert_eq!(standing(&mut con), (6, 1, 30));
    let before = digest(&mut con);
    // The org denies: no credits and no level charged.
    let d = call(&mut con, "r2", "80", "4");
    assert!(!d.allowed());
    assert_eq!(d.str("denied_key").as_deref(), Some(ORG));
    assert_eq!(d.str("denied_by").as_deref(), Some("spend"));
    assert_eq!(standing(&mut con), (6, 1, 30));
    assert_eq!(digest(&mut con), before);
    // Not enough credits: nothing charged on any level.
    let d = call(&mut con, "r3", "10", "7");
    assert!(!d.allowed());
    assert_eq!(d.str("denied_by").as_deref(), Some("credits"));
    assert_eq!(d.retry_after_ms(), -1);
    assert_eq!(standing(&mut con), (6, 1, 30));
    assert_eq!(digest(&mut con), before);
    // Admitted again, taking the balance to 0.
    let d = call(&mut con, "r4", "10", "6");
    assert!(d.allowed(), "{:?}", d.fields);
    assert_eq!(standing(&mut con), (0, 2, 40));
    // The first key denies (its 2 a day are used): the org and the credits keep theirs.
    assert_eq!(int(&mut con, &["RL.CREDITS.GRANT", CREDITS, "5"]), 5);
    let before = digest(&mut con);
    let d = call(&mut con, "r5", "1", "1");
    assert!(!d.allowed());
    assert_eq!(d.str("denied_key").as_deref(), Some(USER));
    assert_eq!(d.str("denied_by").as_deref(), Some("rpd"));
    assert_eq!(standing(&mut con), (5, 2, 40));
    assert_eq!(digest(&mut con), before);
    // Only the admitted calls deducted: the denied ids have nothing to refund.
    for id in ["r2", "r3", "r5"] {
        assert_eq!(
            run(&mut con, &["RL.CREDITS.REFUND", CREDITS, id]),
            Value::Array(vec![Value::Int(0), Value::Int(5)]),
            "{id}"
        );
    }
    assert_eq!(
        run(&mut con, &["RL.CREDITS.REFUND", CREDITS, "r1"]),
        Value::Array(vec![Value::Int(4), Value::Int(9)])
    );
}

#[test]
fn an_also_or_credits_key_outside_the_callers_acl_is_noperm_and_charges_nothing() {
    let server = Server::start();
    let mut admin = server.client();
    int(&mut admin, &["RL.PLAN.SET", "p", "rpd", "fixed 10/1d"]);
    int(
        &mut admin,
        &["RL.PLAN.SET", "orgplan", "spend", "fixed 100/1d"],
    );
    run(
        &mut admin,
        &[
            "ACL",
            "SETUSER",
            "app",
            "on",
            ">pw",
            "~{acme}:user:*",
            "+@all",
        ],
    );
    // State on both levels, so "nothing charged" compares usage, not existence.
    assert!(decision(
        &mut admin,
        &[
            "RL.ACQUIRE",
            "{acme}:user:1",
            "p",
            "1",
            "ALSO",
            "1",
            ORG,
            "orgplan"
        ]
    )
    .allowed());
    int(&mut admin, &["RL.CREDITS.GRANT", "{acme}:credits", "10"]);
    let mut app = server.client();
    run(&mut app, &["AUTH", "app", "pw"]);
    // Its own key alone: allowed.
    assert!(decision(&mut app, &["RL.ACQUIRE", "{acme}:user:1", "p", "1"]).allowed());
    let before = digest(&mut admin);
    let noperm = "NOPERM this user has no permissions to access one of the keys used as arguments";
    for args in [
        &[
            "RL.ACQUIRE",
            "{acme}:user:1",
            "p",
            "1",
            "ALSO",
            "1",
            ORG,
            "orgplan",
        ][..],
        &[
            "RL.PEEK",
            "{acme}:user:1",
            "p",
            "1",
            "ALSO",
            "1",
            ORG,
            "orgplan",
        ],
        &[
            "RL.ACQUIRE",
            "{acme}:user:1",
            "p",
            "1",
            "CREDITS",
            "{acme}:credits",
            "1",
        ],
    ] {
        assert_eq!(err(&mut app, args), noperm, "{args:?}");
    }
    assert_eq!(digest(&mut admin), before, "nothing charged");
    assert_eq!(used(&mut admin, "{acme}:user:1", "p", "rpd"), 2);
    assert_eq!(used(&mut admin, ORG, "orgplan", "spend"), 1);
    assert_eq!(
        int(&mut admin, &["RL.CREDITS.BALANCE", "{acme}:credits"]),
        10
    );
}
