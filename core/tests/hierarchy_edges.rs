//! Reproductions of `ALSO` defects found by the hierarchy tests (see
//! /work/also-findings.md). Each fails until the core is fixed; then it stays as a
//! regression test (and moves into `hierarchy_model.rs`).

#![allow(
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used
)] // test code: a panic is a failed test

use std::sync::Arc;

use tollgate_core::decide::{self, Call, Costs, Pair, Settings};
use tollgate_core::layout::LayoutInterner;
use tollgate_core::plan::{Plan, Plans};
use tollgate_core::subject::Subject;

const NOW: u64 = 1_763_769_600_000;

fn plans(defs: &[(&str, &[(&str, &str)])]) -> (Plans, LayoutInterner, Vec<Arc<Plan>>) {
    let mut interner = LayoutInterner::new();
    let mut plans = Plans::new();
    for (name, fields) in defs {
        plans.set(name, fields, &mut interner).unwrap();
    }
    let list = defs
        .iter()
        .map(|(name, _)| Arc::clone(plans.get(name).unwrap()))
        .collect();
    (plans, interner, list)
}

/// Acquires `ID r` over the user and the org at `NOW`; returns the decision's
/// `reset_ms` of the user's `jobs` limit and the expiry of the request on each key.
fn acquire_user_and_org(org_fields: &[(&str, &str)]) -> (u64, u64, u64) {
    let (plans, mut interner, list) = plans(&[
        ("user", &[("jobs", "concurrency 5 ttl 10s")]),
        ("org", org_fields),
    ]);
    let call = Call {
        costs: Costs {
            request: 1,
            units: &[],
        },
        id: Some(b"r"),
        ..Call::default()
    };
    let settings = Settings::default();
    let mut subjects: [Option<Subject>; 2] = [None, None];
    let pairs = [
        Pair {
            subject: None,
            plan: &list[0],
        },
        Pair {
            subject: None,
            plan: &list[1],
        },
    ];
    let decision = decide::decide(&plans, &pairs, &call, None, NOW, &settings);
    assert!(decision.admitted());
    let reset_ms = decision.parts[0].outcomes[0].reset_ms;
    let committed = decide::commit(
        &decision,
        &pairs,
        &call,
        &[b"{acme}"],
        &settings,
        &mut interner,
        &|_| false,
    )
    .unwrap();
    for (change, slot) in committed.changes.into_iter().zip(subjects.iter_mut()) {
        change.apply_to(slot);
    }
    let expiry = |s: &Option<Subject>| {
        s.as_ref()
            .unwrap()
            .live_request(b"r", NOW)
            .unwrap()
            .expires_at
    };
    (reset_ms, expiry(&subjects[0]), expiry(&subjects[1]))
}

/// Finding 1a. Alone, the user's lease lives its `ttl 10s`. With `ALSO` an org level
/// that holds no leases (a budget only), the request takes the default TTL (60 s)
/// from the org's plan: a crashed client now holds the user's only slots six times
/// longer. docs/commands.md: "TTL ms: ... default: the largest `ttl` of the plan's
/// concurrency limits, else tollgate.default-ttl-ms" — with ALSO, the largest of the
/// call's concurrency limits.
#[test]
fn a_level_without_leases_does_not_lengthen_the_lease_of_another() {
    let (_, user, org) = acquire_user_and_org(&[("spend", "fixed 1000000 usd_micros/1mo")]);
    assert_eq!(user - NOW, 10_000, "the user's lease TTL");
    assert_eq!(org, user, "one expiry for the whole call");
}

/// Finding 1b. The reply's `reset_ms` of a concurrency limit is when the lease this
/// call took frees — but it is computed from the pair's own TTL, while the request
/// is registered with the longest TTL of all pairs: here the reply says 10 s and the
/// lease lives 60 s (the org's `concurrency 200` has the default TTL).
#[test]
fn the_reply_says_when_the_lease_the_call_took_frees() {
    let (reset_ms, user, _) = acquire_user_and_org(&[("inflight", "concurrency 200")]);
    assert_eq!(
        reset_ms,
        user - NOW,
        "reply reset_ms vs the lease registered"
    );
}
