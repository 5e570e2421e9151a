//! Property tests of the plan registry as a replicated set: simulated nodes make local
//! changes, a lossy network delivers them late, twice or never, and the catch-up
//! exchange runs over the encoded messages. Every run must end with all nodes holding
//! the same registry, equal to a naive model (each register holds the greatest version
//! ever made), and no register may ever go back to an older version on any node.

#![allow(clippy::indexing_slicing, clippy::panic)] // test code: a panic is a failed test

use std::collections::HashMap;

use proptest::prelude::*;
use tollgate_core::layout::LayoutInterner;
use tollgate_core::plansync::{respond, Message};
use tollgate_core::registry::{Author, Change, Merged, Plans, Stamp, Version};

const NODES: usize = 3;
const ORIGINS: [&str; NODES] = ["node-a", "node-b", "node-c"];
const PLANS: [&str; 4] = ["p", "q", "r", "s"];
const FIELDS: [&str; 3] = ["x", "y", "MODE"];
const SPECS: [&str; 4] = ["cap 1", "cap 2", "fixed 5/1s", "sliding 3/1m"];

#[derive(Debug, Clone)]
enum Op {
    Set {
        node: usize,
        plan: usize,
        field: usize,
        spec: usize,
    },
    Fallback {
        node: usize,
        plan: usize,
        to: usize,
    },
    DeletePlan {
        node: usize,
        plan: usize,
    },
    DeleteField {
        node: usize,
        plan: usize,
        field: usize,
    },
    Default {
        node: usize,
        plan: usize,
    },
    /// Deliver the pending change at `pick` (mod the queue) to `node`.
    Deliver {
        node: usize,
        pick: usize,
    },
    /// Let `node`'s wall clock run `ms` ahead.
    Tick {
        node: usize,
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let node = 0..NODES;
    prop_oneof![
        3 => (node.clone(), 0..PLANS.len(), 0..FIELDS.len(), 0..SPECS.len())
            .prop_map(|(node, plan, field, spec)| Op::Set { node, plan, field, spec }),
        1 => (node.clone(), 0..PLANS.len(), 0..PLANS.len())
            .prop_map(|(node, plan, to)| Op::Fallback { node, plan, to }),
        1 => (node.clone(), 0..PLANS.len()).prop_map(|(node, plan)| Op::DeletePlan { node, plan }),
        1 => (node.clone(), 0..PLANS.len(), 0..FIELDS.len())
            .prop_map(|(node, plan, field)| Op::DeleteField { node, plan, field }),
        1 => (node.clone(), 0..PLANS.len()).prop_map(|(node, plan)| Op::Default { node, plan }),
        4 => (node.clone(), any::<usize>()).prop_map(|(node, pick)| Op::Deliver { node, pick }),
        1 => (node, 0..50u64).prop_map(|(node, ms)| Op::Tick { node, ms }),
    ]
}

/// How the network treats one change on its way to one node: dropped, once, or twice.
fn fates() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(0..3u8, 64)
}

struct Node {
    plans: Plans,
    now_ms: u64,
    /// Versions seen per register (`None` = the default): they may only grow.
    seen: HashMap<Option<String>, Version>,
    pending: Vec<Change>,
}

impl Node {
    fn check_monotonic(&mut self) -> Result<(), TestCaseError> {
        let mut now: Vec<(Option<String>, Version)> = PLANS
            .iter()
            .filter_map(|p| {
                self.plans
                    .plan_version(p)
                    .map(|v| (Some(p.to_string()), v.clone()))
            })
            .collect();
        if let Some(v) = self.plans.default_version() {
            now.push((None, v.clone()));
        }
        for (register, version) in now {
            if let Some(before) = self.seen.get(&register) {
                prop_assert!(
                    &version >= before,
                    "{register:?} went back from {before:?} to {version:?}"
                );
            }
            self.seen.insert(register, version);
        }
        Ok(())
    }
}

fn catch_up(nodes: &mut [Node], interner: &mut LayoutInterner) {
    for _round in 0..4 {
        let mut quiet = true;
        for i in 0..NODES {
            for j in 0..NODES {
                if i == j {
                    continue;
                }
                let theirs = nodes[j].plans.summary();
                // The summary travels encoded, like everything else.
                let Ok(Message::Summary(theirs)) =
                    Message::decode(&Message::Summary(Box::new(theirs)).encode())
                else {
                    panic!("summary did not round-trip");
                };
                let Some(want) = nodes[i].plans.wanted(&theirs) else {
                    continue;
                };
                quiet = false;
                let Ok(Message::Request(want)) = Message::decode(&Message::Request(want).encode())
                else {
                    panic!("request did not round-trip");
                };
                for bytes in respond(&nodes[j].plans, &want) {
                    let Ok(Message::Changes(changes)) = Message::decode(&bytes) else {
                        panic!("answer did not decode");
                    };
                    let now = nodes[i].now_ms;
                    for c in &changes {
                        nodes[i].plans.merge(c, now, interner);
                    }
                }
            }
        }
        if quiet {
            return;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn nodes_converge_to_the_greatest_version_of_every_register(
        ops in proptest::collection::vec(op(), 1..80),
        fates in fates(),
        skews in proptest::collection::vec(0..1_000u64, NODES),
    ) {
        let mut interner = LayoutInterner::new();
        let mut nodes: Vec<Node> = (0..NODES)
            .map(|i| Node { plans: Plans::new(), now_ms: 1_000 + skews[i], seen: HashMap::new(), pending: Vec::new() })
            .collect();
        let mut made: Vec<Change> = Vec::new();
        let mut fate = fates.iter().cycle();
        for op in &ops {
            let (node, change) = match *op {
                Op::Set { node, plan, field, spec } => {
                    let value = if FIELDS[field] == "MODE" { "shadow" } else { SPECS[spec] };
                    let author = Author { origin: ORIGINS[node], now_ms: nodes[node].now_ms };
                    let r = nodes[node].plans.set_by(author, PLANS[plan], &[(FIELDS[field], value)], &mut interner);
                    (node, r.ok().map(|(_, c)| c))
                }
                Op::Fallback { node, plan, to } => {
                    let author = Author { origin: ORIGINS[node], now_ms: nodes[node].now_ms };
                    let r = nodes[node].plans.set_by(author, PLANS[plan], &[("fallback", PLANS[to])], &mut interner);
                    (node, r.ok().map(|(_, c)| c))
                }
                Op::DeletePlan { node, plan } => {
                    let author = Author { origin: ORIGINS[node], now_ms: nodes[node].now_ms };
                    let r = nodes[node].plans.delete_by(author, PLANS[plan], &[], &mut interner);
                    (node, r.ok().and_then(|(_, c)| c))
                }
                Op::DeleteField { node, plan, field } => {
                    let author = Author { origin: ORIGINS[node], now_ms: nodes[node].now_ms };
                    let r = nodes[node].plans.delete_by(author, PLANS[plan], &[FIELDS[field]], &mut interner);
                    (node, r.ok().and_then(|(_, c)| c))
                }
                Op::Default { node, plan } => {
                    let author = Author { origin: ORIGINS[node], now_ms: nodes[node].now_ms };
                    let r = nodes[node].plans.set_default_by(author, Some(PLANS[plan]));
                    (node, r.ok())
                }
                Op::Deliver { node, pick } => {
                    let n = &mut nodes[node];
                    if !n.pending.is_empty() {
                        let c = n.pending.remove(pick % n.pending.len());
                        let now = n.now_ms;
                        n.plans.merge(&c, now, &mut interner);
                    }
                    (node, None)
                }
                Op::Tick { node, ms } => {
                    nodes[node].now_ms += ms;
                    (node, None)
                }
            };
            nodes[node].check_monotonic()?;
            if let Some(change) = change {
                // The local change is newer than everything the node had seen.
                if let Some(v) = change.target().map_or(nodes[node].plans.default_version(), |t| nodes[node].plans.plan_version(t)) {
                    prop_assert_eq!(v, &change.version());
                }
                for (other, n) in nodes.iter_mut().enumerate() {
                    if other != node {
                        for _ in 0..*fate.next().unwrap_or(&1) {
                            n.pending.push(change.clone());
                        }
                    }
                }
                made.push(change);
            }
        }
        // Whatever is still in flight arrives late, in reverse order.
        for node in &mut nodes {
            while let Some(c) = node.pending.pop() {
                let now = node.now_ms;
                node.plans.merge(&c, now, &mut interner);
            }
            node.check_monotonic()?;
        }
        catch_up(&mut nodes, &mut interner);
        for node in &mut nodes {
            node.check_monotonic()?;
        }
        // All nodes agree...
        let first = &nodes[0].plans;
        for node in &nodes[1..] {
            prop_assert_eq!(node.plans.sync_digest(), first.sync_digest());
            prop_assert_eq!(node.plans.digest(), first.digest());
            prop_assert_eq!(node.plans.names(), first.names());
            prop_assert_eq!(node.plans.default_plan(), first.default_plan());
            prop_assert_eq!(node.plans.fallback_loops(), first.fallback_loops());
        }
        // ...on the greatest version of every register.
        let mut best: HashMap<Option<&str>, &Change> = HashMap::new();
        for c in &made {
            let slot = best.entry(c.target()).or_insert(c);
            if c.version() > slot.version() {
                *slot = c;
            }
        }
        for plan in PLANS {
            let held = first.get(plan).map(|p| p.fields().to_vec());
            let want = match best.get(&Some(plan)) {
                Some(Change::Plan { fields, .. }) => fields.clone(),
                _ => None,
            };
            prop_assert_eq!(held, want, "plan {}", plan);
        }
        let want_default = match best.get(&None) {
            Some(Change::Default { plan, .. }) => plan.as_deref(),
            _ => None,
        };
        prop_assert_eq!(first.default_plan(), want_default);
    }

    #[test]
    fn merging_is_order_and_repetition_independent(
        changes in proptest::collection::vec(change(), 1..40),
        order in proptest::collection::vec(any::<usize>(), 0..80),
    ) {
        let mut interner = LayoutInterner::new();
        let mut forward = Plans::new();
        for c in &changes {
            forward.merge(c, 0, &mut interner);
        }
        // Another order, with repeats, and every change at least once.
        let mut shuffled = Plans::new();
        let mut versions: HashMap<Option<String>, Version> = HashMap::new();
        let picks = order.iter().map(|i| &changes[i % changes.len()]).chain(changes.iter().rev());
        for c in picks {
            let merged = shuffled.merge(c, 0, &mut interner);
            let register = c.target().map(str::to_string);
            let now = match c.target() {
                Some(t) => shuffled.plan_version(t).cloned(),
                None => shuffled.default_version().cloned(),
            };
            if let Some(now) = now {
                if let Some(before) = versions.get(&register) {
                    prop_assert!(&now >= before);
                    prop_assert_eq!(merged == Merged::Stale, &now == before || c.version() <= *before);
                }
                versions.insert(register, now);
            }
        }
        let (mut a, mut b) = (tollgate_core::codec::Writer::new(), tollgate_core::codec::Writer::new());
        forward.encode(&mut a);
        shuffled.encode(&mut b);
        prop_assert_eq!(a.buf, b.buf);
        prop_assert_eq!(forward.sync_digest(), shuffled.sync_digest());
    }
}

/// Changes drawn from few names, counters and origins, so that ties are common.
fn change() -> impl Strategy<Value = Change> {
    let stamp = (0..4u64, 0..3usize).prop_map(|(counter, o)| Stamp {
        counter,
        origin: ["", "a", "b"][o].into(),
    });
    prop_oneof![
        (
            0..PLANS.len(),
            stamp.clone(),
            proptest::option::of(0..SPECS.len())
        )
            .prop_map(|(p, stamp, spec)| Change::Plan {
                name: PLANS[p].into(),
                stamp,
                fields: spec.map(|s| vec![("x".into(), SPECS[s].into())]),
            }),
        (stamp, proptest::option::of(0..PLANS.len())).prop_map(|(stamp, p)| Change::Default {
            stamp,
            plan: p.map(|p| PLANS[p].into()),
        }),
    ]
}
