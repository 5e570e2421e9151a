//! Several subjects in one decision (`ALSO`), against a deliberately naive reference.
//!
//! Four subject keys — an org, a team and two users — each with its own random plan
//! (fixed, sliding, bucket and concurrency limits in `request` or `token`). Random
//! sequences of multi-level acquires (random subsets of the keys in random order,
//! with or without an `ID`, a `TTL`, estimates), peeks, releases with actual costs on
//! the first key (reaching the linked keys) or on one key alone, touches and time
//! steps run through the core's public API exactly as the module drives it: decide,
//! commit, apply each `Change` to its subject; settle/touch the first key, then each
//! key its request links.
//!
//! The reference keeps, per level and limit, a log of every charge (time, estimate,
//! actual once settled) and every lease, and answers each limit's question the slow
//! way: a counter per fixed window (exact), the log over the trailing window (sliding:
//! a lower bound, and over one more slice an upper bound), a bucket replayed from the
//! log (with actual costs at charge time: a lower bound; with estimates and overruns
//! at settlement: an upper bound), the list of live leases (exact). Checked:
//! - a call is never admitted when any level's reference would deny it, and always
//!   when every level's upper bound admits it; its decision is the conjunction of
//!   each pair decided alone, and its `retry_after_ms` the longest of theirs (exact:
//!   denied 1 ms before, admitted at it);
//! - an admitted call changes every subject (all); a denied one, or one whose id is
//!   in flight on another key, changes none (nothing);
//! - after every step, every level's usage lies within the reference's bounds (exact
//!   for fixed windows and leases): settlement and expiry free every level, and no
//!   level ever holds more than its reference says;
//! - the request is registered on every key with one expiry, links only on the
//!   first key, a retry with a live id is answered admitted and charges nothing.

#![allow(
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used
)] // test code: a panic is a failed test

use std::sync::Arc;

use proptest::prelude::*;
use tollgate_core::decide::{self, Call, CommitError, Costs, Decision, Pair, Settings, Verdict};
use tollgate_core::layout::LayoutInterner;
use tollgate_core::plan::{Plan, Plans};
use tollgate_core::subject::Subject;

const START: u64 = 1_763_769_600_000;
const KEYS: [&str; 4] = [
    "{acme}",
    "{acme}:team:research",
    "{acme}:user:1",
    "{acme}:user:2",
];
const PLANS: [&str; 4] = ["org", "team", "user1", "user2"];
const DEFAULT_TTL_MS: u64 = 60_000;

#[derive(Debug, Clone, Copy)]
enum Rule {
    Fixed {
        n: u64,
        window_ms: u64,
    },
    Sliding {
        n: u64,
        window_ms: u64,
        precision: u64,
    },
    Bucket {
        rate: u64,
        window_ms: u64,
        burst: u64,
    },
    Concurrency {
        max: u64,
        ttl_ms: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy)]
struct LimitSpec {
    rule: Rule,
    /// Counts `token` (else `request`).
    token: bool,
}

impl LimitSpec {
    fn spec(&self) -> String {
        let unit = if self.token { " token" } else { "" };
        match self.rule {
            Rule::Fixed { n, window_ms } => format!("fixed {n}{unit}/{window_ms}ms"),
            Rule::Sliding {
                n,
                window_ms,
                precision,
            } => format!("sliding {n}{unit}/{window_ms}ms precision {precision}"),
            Rule::Bucket {
                rate,
                window_ms,
                burst,
            } => format!("bucket {rate}{unit}/{window_ms}ms burst {burst}"),
            Rule::Concurrency { max, ttl_ms } => match ttl_ms {
                Some(t) => format!("concurrency {max} ttl {t}ms"),
                None => format!("concurrency {max}"),
            },
        }
    }
}

fn limit_spec() -> impl Strategy<Value = LimitSpec> {
    prop_oneof![
        (
            1u64..40,
            prop::sample::select(vec![1_000u64, 1_500, 7_000]),
            any::<bool>()
        )
            .prop_map(|(n, window_ms, token)| LimitSpec {
                rule: Rule::Fixed {
                    n: if token { n } else { n / 6 + 1 },
                    window_ms
                },
                token,
            }),
        (1u64..40, 200u64..4_000, 1u64..8, any::<bool>()).prop_map(
            |(n, window_ms, precision, token)| LimitSpec {
                rule: Rule::Sliding {
                    n: if token { n } else { n / 6 + 1 },
                    window_ms,
                    precision
                },
                token,
            }
        ),
        (1u64..20, 100u64..3_000, 1u64..30, any::<bool>()).prop_map(
            |(rate, window_ms, burst, token)| LimitSpec {
                rule: Rule::Bucket {
                    rate,
                    window_ms,
                    burst: if token { burst } else { burst / 6 + 1 }
                },
                token,
            }
        ),
        (1u64..4, prop::option::of(100u64..3_000)).prop_map(|(max, ttl_ms)| LimitSpec {
            rule: Rule::Concurrency { max, ttl_ms },
            token: false,
        }),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    /// A call over `keys` (indexes into `KEYS`, first key first).
    Acquire {
        keys: Vec<usize>,
        request: u64,
        token: u64,
        id: Option<usize>,
        ttl_ms: Option<u64>,
        peek: bool,
    },
    /// `RL.RELEASE` of a request made earlier, on the key at position `at` of its call.
    Release {
        pick: usize,
        at: usize,
        request: Option<u64>,
        token: Option<u64>,
    },
    /// `RL.TOUCH` of a request made earlier, on its first key.
    Touch {
        pick: usize,
        ttl_ms: u64,
    },
    Advance(u64),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let acquire = (
        prop::sample::subsequence(vec![0usize, 1, 2, 3], 1..=4).prop_shuffle(),
        0u64..3,
        0u64..16,
        prop::option::of(0usize..4),
        prop::option::weighted(0.3, 50u64..3_000),
        prop::bool::weighted(0.15),
    )
        .prop_map(|(keys, request, token, id, ttl_ms, peek)| Op::Acquire {
            keys,
            request,
            token,
            id,
            ttl_ms,
            peek,
        });
    let release = (
        any::<usize>(),
        prop::sample::select(vec![0usize, 0, 0, 1, 2, 3]),
        prop::option::weighted(0.3, 0u64..4),
        prop::option::weighted(0.8, 0u64..24),
    )
        .prop_map(|(pick, at, request, token)| Op::Release {
            pick,
            at,
            request,
            token,
        });
    let touch = (any::<usize>(), 1u64..3_000).prop_map(|(pick, ttl_ms)| Op::Touch { pick, ttl_ms });
    let advance = prop_oneof![
        4 => (0u64..400).prop_map(Op::Advance),
        1 => (0u64..5_000).prop_map(Op::Advance),
    ];
    proptest::collection::vec(
        prop_oneof![5 => acquire, 2 => release, 1 => touch, 3 => advance],
        1..120,
    )
}

/// One charge of one limit, as the reference remembers it.
#[derive(Debug, Clone)]
struct Entry {
    t: u64,
    est: u64,
    actual: Option<u64>,
    settled_at: Option<u64>,
}

/// The reference for one limit of one level.
#[derive(Debug, Clone)]
struct LimitModel {
    spec: LimitSpec,
    /// Charges (not concurrency).
    entries: Vec<Entry>,
    /// Leases: (request, position of this level in its call).
    leases: Vec<(usize, usize)>,
}

/// One request (a call that registered an id), across the keys of its call.
#[derive(Debug, Clone)]
struct ReqModel {
    id: String,
    keys: Vec<usize>,
    expires: Vec<u64>,
    ended: Vec<bool>,
    /// Per position, per limit of that level: the entry the call charged.
    entries: Vec<Vec<Option<usize>>>,
}

impl ReqModel {
    fn live(&self, pos: usize, now: u64) -> bool {
        !self.ended[pos] && self.expires[pos] > now
    }
}

/// What the reference says about one limit now: the lowest usage the limit may show
/// and the highest, and whether a cost fits under each.
struct Bounds {
    low: u128,
    high: u128,
    /// Usage of the lower bound plus the cost fits (else the call must be denied).
    low_fits: bool,
    /// Usage of the upper bound plus the cost fits (then the call must be admitted).
    high_fits: bool,
}

fn bucket_debt(mut events: Vec<(u64, u64)>, rate: u64, window_ms: u64, now: u64) -> u128 {
    events.sort_by_key(|e| e.0);
    let mut debt: u128 = 0;
    let mut last = events.first().map_or(now, |e| e.0);
    for (t, amount) in events {
        debt = debt.saturating_sub(u128::from(rate) * u128::from(t - last));
        debt += u128::from(amount) * u128::from(window_ms);
        last = t;
    }
    debt.saturating_sub(u128::from(rate) * u128::from(now - last))
}

impl LimitModel {
    fn cost(&self, request: u64, token: u64) -> u64 {
        match self.spec.rule {
            Rule::Concurrency { .. } => 1,
            _ if self.spec.token => token,
            _ => request,
        }
    }

    fn bounds(&self, reqs: &[ReqModel], now: u64, cost: u64) -> Bounds {
        let fits = |used: u128, cap: u64| cost <= cap && used + u128::from(cost) <= u128::from(cap);
        match self.spec.rule {
            Rule::Fixed { n, window_ms } => {
                let w = now / window_ms;
                let used: u128 = self
                    .entries
                    .iter()
                    .filter(|e| e.t / window_ms == w)
                    .map(|e| match (e.actual, e.settled_at) {
                        (Some(a), Some(s)) if s / window_ms == e.t / window_ms => u128::from(a),
                        _ => u128::from(e.est),
                    })
                    .sum();
                Bounds {
                    low: used,
                    high: used,
                    low_fits: fits(used, n),
                    high_fits: fits(used, n),
                }
            }
            Rule::Sliding {
                n,
                window_ms,
                precision,
            } => {
                let slice = window_ms.div_ceil(precision);
                let low: u128 = self
                    .entries
                    .iter()
                    .filter(|e| e.t >= now.saturating_sub(window_ms))
                    .map(|e| u128::from(e.actual.unwrap_or(e.est)))
                    .sum();
                let high: u128 = self
                    .entries
                    .iter()
                    .filter(|e| e.t >= now.saturating_sub(window_ms + slice))
                    .map(|e| u128::from(e.est.max(e.actual.unwrap_or(0))))
                    .sum();
                Bounds {
                    low,
                    high,
                    low_fits: fits(low, n),
                    high_fits: fits(high, n),
                }
            }
            Rule::Bucket {
                rate,
                window_ms,
                burst,
            } => {
                let settled_up_front = self
                    .entries
                    .iter()
                    .map(|e| (e.t, e.actual.unwrap_or(e.est)))
                    .collect();
                let mut estimates_then_overruns: Vec<(u64, u64)> =
                    self.entries.iter().map(|e| (e.t, e.est)).collect();
                for e in &self.entries {
                    if let (Some(a), Some(s)) = (e.actual, e.settled_at) {
                        if a > e.est {
                            estimates_then_overruns.push((s, a - e.est));
                        }
                    }
                }
                let low_debt = bucket_debt(settled_up_front, rate, window_ms, now);
                let high_debt = bucket_debt(estimates_then_overruns, rate, window_ms, now);
                let full = u128::from(burst) * u128::from(window_ms);
                let need = u128::from(cost) * u128::from(window_ms);
                Bounds {
                    low: low_debt.div_ceil(u128::from(window_ms)),
                    high: high_debt.div_ceil(u128::from(window_ms)),
                    low_fits: cost <= burst && low_debt + need <= full,
                    high_fits: cost <= burst && high_debt + need <= full,
                }
            }
            Rule::Concurrency { max, .. } => {
                let live = self
                    .leases
                    .iter()
                    .filter(|&&(r, pos)| reqs[r].live(pos, now))
                    .count() as u128;
                Bounds {
                    low: live,
                    high: live,
                    low_fits: live < u128::from(max),
                    high_fits: live < u128::from(max),
                }
            }
        }
    }
}

struct Model {
    plans: Plans,
    interner: LayoutInterner,
    plan: Vec<Arc<Plan>>,
    subjects: Vec<Option<Subject>>,
    limits: Vec<Vec<LimitModel>>,
    reqs: Vec<ReqModel>,
    settings: Settings,
    now: u64,
}

fn names(level: &[LimitSpec]) -> Vec<(String, String)> {
    level
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("l{i}"), l.spec()))
        .collect()
}

impl Model {
    fn new(levels: &[Vec<LimitSpec>; 4]) -> Model {
        let mut plans = Plans::new();
        let mut interner = LayoutInterner::new();
        let mut plan = Vec::new();
        for (name, level) in PLANS.iter().zip(levels) {
            let fields = names(level);
            let refs: Vec<(&str, &str)> = fields
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            plans
                .set(name, &refs, &mut interner)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            plan.push(Arc::clone(plans.get(name).unwrap()));
        }
        Model {
            plans,
            interner,
            plan,
            subjects: vec![None, None, None, None],
            limits: levels
                .iter()
                .map(|level| {
                    level
                        .iter()
                        .map(|&spec| LimitModel {
                            spec,
                            entries: Vec::new(),
                            leases: Vec::new(),
                        })
                        .collect()
                })
                .collect(),
            reqs: Vec::new(),
            settings: Settings::default(),
            now: START,
        }
    }

    fn decide(&self, keys: &[usize], call: &Call<'_>, at: u64) -> Decision {
        let pairs: Vec<Pair<'_>> = keys
            .iter()
            .map(|&k| Pair {
                subject: self.subjects[k].as_ref(),
                plan: &self.plan[k],
            })
            .collect();
        decide::decide(&self.plans, &pairs, call, None, at, &self.settings)
    }

    /// The live request holding `id` on key `key`: (request, position).
    fn holder(&self, key: usize, id: &str) -> Option<(usize, usize)> {
        self.reqs.iter().enumerate().rev().find_map(|(r, req)| {
            let pos = req.keys.iter().position(|&k| k == key)?;
            (req.id == id && req.live(pos, self.now)).then_some((r, pos))
        })
    }

    /// Every level's usage lies within its reference's bounds.
    fn check_standing(&self) -> Result<(), TestCaseError> {
        for (k, key) in KEYS.iter().enumerate() {
            let part = decide::usage(&self.plan[k], self.subjects[k].as_ref(), None, self.now);
            for (i, limit) in self.limits[k].iter().enumerate() {
                let b = limit.bounds(&self.reqs, self.now, 0);
                let used = u128::from(part.outcomes[i].used);
                prop_assert!(
                    b.low <= used && used <= b.high,
                    "{} limit l{i} ({}) at +{}: used {used}, reference {}..={}",
                    key,
                    limit.spec.spec(),
                    self.now - START,
                    b.low,
                    b.high
                );
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn acquire(
        &mut self,
        keys: &[usize],
        request: u64,
        token: u64,
        id: Option<usize>,
        ttl_ms: Option<u64>,
        peek: bool,
    ) -> Result<(), TestCaseError> {
        let id_text = id.map(|i| format!("r{i}"));
        let units = [("token", token)];
        let call = Call {
            costs: Costs {
                request,
                units: &units,
            },
            id: if peek {
                None
            } else {
                id_text.as_deref().map(str::as_bytes)
            },
            ttl_ms,
            ..Call::default()
        };
        let now = self.now;
        let decision = self.decide(keys, &call, now);
        prop_assert_eq!(decision.parts.len(), keys.len());
        // The first key holds a live request under this id: a retry.
        let replay = !peek
            && id_text
                .as_deref()
                .is_some_and(|id| self.holder(keys[0], id).is_some());
        if replay {
            prop_assert!(
                decision.replayed && decision.admitted(),
                "a retry with a live id"
            );
        } else {
            prop_assert!(!decision.replayed);
            // Each level against its reference.
            let mut all_high_fit = true;
            for &k in keys {
                for limit in &self.limits[k] {
                    let b = limit.bounds(&self.reqs, now, limit.cost(request, token));
                    if decision.admitted() {
                        prop_assert!(
                            b.low_fits,
                            "admitted although {} limit {} would deny (usage at least {})",
                            KEYS[k],
                            limit.spec.spec(),
                            b.low
                        );
                    }
                    all_high_fit &= b.high_fits;
                }
            }
            if all_high_fit {
                prop_assert!(decision.admitted(), "denied although every level admits");
            }
            // The conjunction of each pair alone; the retry is the longest wait.
            let alone: Vec<Decision> = keys
                .iter()
                .map(|&k| self.decide(&[k], &Call { id: None, ..call }, now))
                .collect();
            prop_assert_eq!(decision.admitted(), alone.iter().all(Decision::admitted));
            if !decision.admitted() {
                let longest = alone
                    .iter()
                    .filter(|d| !d.admitted())
                    .map(|d| d.retry_after_ms())
                    .fold(0i64, |a, b| if a == -1 || b == -1 { -1 } else { a.max(b) });
                prop_assert_eq!(decision.retry_after_ms(), longest);
                let Verdict::Limits { part } = decision.verdict else {
                    return Err(TestCaseError::fail("denied without a limit"));
                };
                prop_assert!(!alone[part].admitted(), "denied_key admits alone");
                let retry = decision.retry_after_ms();
                if retry > 0 && !peek {
                    let probe = Call { id: None, ..call };
                    let at = now + retry as u64;
                    prop_assert!(
                        !self.decide(keys, &probe, at - 1).admitted(),
                        "admitted 1 ms before retry_after_ms"
                    );
                    prop_assert!(
                        self.decide(keys, &probe, at).admitted(),
                        "denied at retry_after_ms"
                    );
                }
            }
        }
        if peek {
            return Ok(());
        }
        let before = self.subjects.clone();
        let pairs: Vec<Pair<'_>> = keys
            .iter()
            .map(|&k| Pair {
                subject: self.subjects[k].as_ref(),
                plan: &self.plan[k],
            })
            .collect();
        let links: Vec<&[u8]> = keys[1..].iter().map(|&k| KEYS[k].as_bytes()).collect();
        let committed = decide::commit(
            &decision,
            &pairs,
            &call,
            &links,
            &self.settings,
            &mut self.interner,
            &|_| false,
        );
        drop(pairs);
        if replay || !decision.admitted() {
            let committed = committed.map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            prop_assert!(
                committed.changes.is_empty(),
                "a retry or denial changes nothing"
            );
            return Ok(());
        }
        // An id in flight on another key of the call: refused whole.
        let in_flight = id_text.as_deref().and_then(|id| {
            keys.iter()
                .skip(1)
                .position(|&k| self.holder(k, id).is_some())
                .map(|p| p + 1)
        });
        if let Some(part) = in_flight {
            prop_assert_eq!(committed.err(), Some(CommitError::IdInFlight { part }));
            prop_assert_eq!(&self.subjects, &before);
            return Ok(());
        }
        let committed = committed.map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        prop_assert_eq!(
            committed.changes.len(),
            keys.len(),
            "every level is charged"
        );
        for (change, &k) in committed.changes.into_iter().zip(keys) {
            change.apply_to(&mut self.subjects[k]);
        }
        let takes_request = id.is_some()
            || keys.iter().any(|&k| {
                self.limits[k]
                    .iter()
                    .any(|l| matches!(l.spec.rule, Rule::Concurrency { .. }))
            });
        prop_assert_eq!(committed.id.is_some(), takes_request);
        let r = self.reqs.len();
        let mut entries = Vec::new();
        for (pos, &k) in keys.iter().enumerate() {
            let mut level_entries = Vec::new();
            for limit in &mut self.limits[k] {
                let cost = limit.cost(request, token);
                if let Rule::Concurrency { .. } = limit.spec.rule {
                    if takes_request {
                        limit.leases.push((r, pos));
                    }
                    level_entries.push(None);
                } else {
                    limit.entries.push(Entry {
                        t: now,
                        est: cost,
                        actual: None,
                        settled_at: None,
                    });
                    level_entries.push(Some(limit.entries.len() - 1));
                }
            }
            entries.push(level_entries);
        }
        if let Some(id) = committed.id {
            let id = String::from_utf8(id.into_vec()).unwrap();
            // One expiry on every key; links on the first key only.
            let mut expires = Vec::new();
            for (pos, &k) in keys.iter().enumerate() {
                let subject = self.subjects[k].as_ref().unwrap();
                let request = subject.live_request(id.as_bytes(), now).unwrap();
                let want: Vec<&[u8]> = if pos == 0 { links.clone() } else { Vec::new() };
                let got: Vec<&[u8]> = request.links.iter().map(|l| &**l).collect();
                prop_assert_eq!(got, want);
                expires.push(request.expires_at);
            }
            prop_assert!(expires.windows(2).all(|w| w[0] == w[1]), "{:?}", expires);
            // The TTL: the call's, else derived from the plans' concurrency limits.
            let conc_ttls: Vec<u64> = keys
                .iter()
                .flat_map(|&k| &self.limits[k])
                .filter_map(|l| match l.spec.rule {
                    Rule::Concurrency { ttl_ms, .. } => Some(ttl_ms.unwrap_or(DEFAULT_TTL_MS)),
                    _ => None,
                })
                .collect();
            let per_plan_ttl = keys
                .iter()
                .map(|&k| {
                    self.limits[k]
                        .iter()
                        .filter_map(|l| match l.spec.rule {
                            Rule::Concurrency { ttl_ms, .. } => {
                                Some(ttl_ms.unwrap_or(DEFAULT_TTL_MS))
                            }
                            _ => None,
                        })
                        .max()
                        .unwrap_or(DEFAULT_TTL_MS)
                })
                .max()
                .unwrap_or(DEFAULT_TTL_MS);
            let (low, high) = match ttl_ms {
                Some(t) => (t, t),
                None => (
                    conc_ttls.iter().copied().max().unwrap_or(DEFAULT_TTL_MS),
                    per_plan_ttl,
                ),
            };
            let ttl = expires[0] - now;
            prop_assert!(
                low <= ttl && ttl <= high,
                "ttl {} not in {}..={}",
                ttl,
                low,
                high
            );
            self.reqs.push(ReqModel {
                id,
                keys: keys.to_vec(),
                expires,
                ended: vec![false; keys.len()],
                entries,
            });
        }
        Ok(())
    }

    /// Settles request `r` at position `pos` in the reference.
    fn settle_model(&mut self, r: usize, pos: usize, actual: &[(&str, u64)]) {
        let now = self.now;
        let k = self.reqs[r].keys[pos];
        self.reqs[r].ended[pos] = true;
        for (i, limit) in self.limits[k].iter_mut().enumerate() {
            let Some(e) = self.reqs[r].entries[pos][i] else {
                continue;
            };
            let unit = if limit.spec.token { "token" } else { "request" };
            if let Some(&(_, a)) = actual.iter().find(|(u, _)| *u == unit) {
                limit.entries[e].actual = Some(a);
                limit.entries[e].settled_at = Some(now);
            }
        }
    }

    fn release(
        &mut self,
        pick: usize,
        at: usize,
        request: Option<u64>,
        token: Option<u64>,
    ) -> Result<(), TestCaseError> {
        if self.reqs.is_empty() {
            return Ok(());
        }
        let picked = &self.reqs[pick % self.reqs.len()];
        let id = picked.id.clone();
        let key = picked.keys[at % picked.keys.len()];
        let mut actual: Vec<(&str, u64)> = Vec::new();
        if let Some(n) = request {
            actual.push(("request", n));
        }
        if let Some(n) = token {
            actual.push(("token", n));
        }
        let now = self.now;
        let holder = self.holder(key, &id);
        let settled = decide::settle(self.subjects[key].as_ref(), id.as_bytes(), &actual, now);
        let Some((r, pos)) = holder else {
            prop_assert!(
                settled.is_err(),
                "released an id the reference holds no live request for"
            );
            return Ok(());
        };
        let (settled, change) = settled.map_err(|e| {
            TestCaseError::fail(format!("{} {id}: live in the reference, {e:?}", KEYS[key]))
        })?;
        change.apply_to(&mut self.subjects[key]);
        self.settle_model(r, pos, &actual);
        let want: Vec<Box<[u8]>> = if pos == 0 {
            self.reqs[r].keys[1..]
                .iter()
                .map(|&k| KEYS[k].as_bytes().into())
                .collect()
        } else {
            Vec::new()
        };
        prop_assert_eq!(&settled.links, &want);
        // As RL.RELEASE does: each linked key in turn.
        for link in settled.links {
            let k = KEYS
                .iter()
                .position(|name| name.as_bytes() == &*link)
                .unwrap();
            let holder = self.holder(k, &id);
            let result = decide::settle(self.subjects[k].as_ref(), id.as_bytes(), &actual, now);
            match (holder, result) {
                (Some((r, pos)), Ok((_, change))) => {
                    change.apply_to(&mut self.subjects[k]);
                    self.settle_model(r, pos, &actual);
                }
                (None, Err(_)) => {}
                (h, res) => {
                    return Err(TestCaseError::fail(format!(
                        "link {}: reference {h:?}, settle {:?}",
                        KEYS[k],
                        res.map(|_| ())
                    )))
                }
            }
        }
        Ok(())
    }

    fn touch(&mut self, pick: usize, ttl_ms: u64) -> Result<(), TestCaseError> {
        if self.reqs.is_empty() {
            return Ok(());
        }
        let picked = &self.reqs[pick % self.reqs.len()];
        let (id, first) = (picked.id.clone(), picked.keys[0]);
        let now = self.now;
        // As RL.TOUCH does: the first key, then the keys its request links.
        let links = self.subjects[first]
            .as_ref()
            .and_then(|s| s.live_request(id.as_bytes(), s.effective_now(now)))
            .map(|r| r.links.clone())
            .unwrap_or_default();
        for (n, k) in std::iter::once(first)
            .chain(links.iter().map(|l| {
                KEYS.iter()
                    .position(|name| name.as_bytes() == &**l)
                    .unwrap()
            }))
            .enumerate()
        {
            let holder = self.holder(k, &id);
            let result = decide::touch(self.subjects[k].as_ref(), id.as_bytes(), ttl_ms, now);
            match (holder, result) {
                (Some((r, pos)), Ok((expires_at, change))) => {
                    prop_assert_eq!(expires_at, now + ttl_ms);
                    change.apply_to(&mut self.subjects[k]);
                    self.reqs[r].expires[pos] = expires_at;
                    if n == 0 {
                        let want: Vec<Box<[u8]>> = if pos == 0 {
                            self.reqs[r].keys[1..]
                                .iter()
                                .map(|&k| KEYS[k].as_bytes().into())
                                .collect()
                        } else {
                            Vec::new()
                        };
                        prop_assert_eq!(&links, &want);
                    }
                }
                (None, Err(_)) => {}
                (h, res) => {
                    return Err(TestCaseError::fail(format!(
                        "touch {} {id}: reference {h:?}, touch {:?}",
                        KEYS[k],
                        res.map(|_| ())
                    )))
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_multi_level_call_admits_only_what_every_level_admits_and_charges_all_or_nothing(
        levels in prop::array::uniform4(prop::collection::vec(limit_spec(), 1..=3)),
        ops in ops(),
    ) {
        let mut m = Model::new(&levels);
        for op in ops {
            match op {
                Op::Acquire { keys, request, token, id, ttl_ms, peek } => {
                    m.acquire(&keys, request, token, id, ttl_ms, peek)?;
                }
                Op::Release { pick, at, request, token } => m.release(pick, at, request, token)?,
                Op::Touch { pick, ttl_ms } => m.touch(pick, ttl_ms)?,
                Op::Advance(dt) => m.now += dt,
            }
            m.check_standing()?;
        }
        // Expiry frees every level: once every request has expired, no lease is held
        // anywhere.
        let last = m.reqs.iter().flat_map(|r| r.expires.iter().copied()).max().unwrap_or(0);
        m.now = m.now.max(last);
        m.check_standing()?;
        for (k, key) in KEYS.iter().enumerate() {
            let part = decide::usage(&m.plan[k], m.subjects[k].as_ref(), None, m.now);
            for (i, limit) in m.limits[k].iter().enumerate() {
                if let Rule::Concurrency { .. } = limit.spec.rule {
                    prop_assert_eq!(part.outcomes[i].used, 0, "{} still holds leases", key);
                }
            }
        }
    }
}
