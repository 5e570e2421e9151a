//! Table tests of whole decisions on a manual clock.

mod common;

use common::Harness;
use tollgate_core::decide::{Call, Costs};
use tollgate_core::time::{days_from_civil, MS_PER_DAY, MS_PER_MINUTE};

/// 2026-11-22 00:00:00 UTC, a minute boundary.
const T: u64 = 1_763_769_600_000;

#[test]
fn zero_cost_is_admitted_even_when_the_limit_is_full() {
    let mut h = Harness::new(T);
    h.plan("p", &[("rpm", "fixed 2/1m")]);
    assert!(h.acquire("p", 2).allowed());
    let r = h.acquire("p", 0);
    assert!(r.allowed());
    assert_eq!(r.remaining("rpm"), 0);
}

#[test]
fn cost_equal_to_capacity_is_admitted_once() {
    let mut h = Harness::new(T + 15_000);
    h.plan("p", &[("rpm", "fixed 10/1m")]);
    let r = h.acquire("p", 10);
    assert!(r.allowed());
    assert_eq!((r.remaining("rpm"), r.outcome("rpm").reset_ms), (0, 45_000));
    let r = h.acquire("p", 1);
    assert!(!r.allowed());
    assert_eq!(r.retry_after_ms(), 45_000);
    assert_eq!(r.denied_by().as_deref(), Some("rpm"));
}

#[test]
fn cost_above_capacity_is_denied_forever_and_charges_nothing() {
    let mut h = Harness::new(T);
    h.plan(
        "p",
        &[("rpm", "sliding 10/1m"), ("tpm", "bucket 100 token/1m")],
    );
    let r = h.acquire_costs("p", 1, &[("token", 101)]);
    assert!(!r.allowed());
    assert_eq!(r.retry_after_ms(), -1);
    assert_eq!(r.denied_by().as_deref(), Some("tpm"));
    assert_eq!(r.remaining("rpm"), 10);
    assert!(h.subject.is_none(), "a denied call creates no state");
}

#[test]
fn all_or_nothing_across_limits() {
    let mut h = Harness::new(T);
    h.plan(
        "p",
        &[("rpm", "fixed 10/1m"), ("tpm", "bucket 100 token/1m")],
    );
    assert!(h.acquire_costs("p", 1, &[("token", 90)]).allowed());
    let r = h.acquire_costs("p", 1, &[("token", 20)]);
    assert!(!r.allowed());
    assert_eq!(r.denied_by().as_deref(), Some("tpm"));
    // 10 tokens more needed at 100/min: 6 s.
    assert_eq!(r.retry_after_ms(), 6_000);
    // rpm was not charged by the denied call.
    assert_eq!(r.remaining("rpm"), 9);
    assert_eq!(h.acquire("p", 0).remaining("rpm"), 9);
}

#[test]
fn the_latest_limit_names_the_denial_and_sets_the_retry() {
    let mut h = Harness::new(T);
    h.plan("p", &[("rps", "fixed 1/1s"), ("rpm", "fixed 2/1m")]);
    assert!(h.acquire("p", 1).allowed());
    h.advance(1_000);
    assert!(h.acquire("p", 1).allowed());
    h.advance(1_000);
    let r = h.acquire("p", 1);
    assert_eq!(r.denied_by().as_deref(), Some("rpm"));
    assert_eq!(r.retry_after_ms(), 58_000);
}

#[test]
fn a_clock_stepping_back_never_admits_more() {
    let mut h = Harness::new(T + 59_000);
    h.plan(
        "p",
        &[
            ("rpm", "fixed 3/1m"),
            ("rps", "sliding 3/10s"),
            ("b", "bucket 3/1m"),
        ],
    );
    assert!(h.acquire("p", 3).allowed());
    // Back into the previous minute: the subject's high-water mark still holds.
    h.set_clock(T - 10 * MS_PER_MINUTE);
    let r = h.acquire("p", 1);
    assert!(!r.allowed());
    assert_eq!(r.decision.parts[0].now, T + 59_000);
    assert_eq!(r.remaining("rpm"), 0);
    // Forward again past the window: admitted.
    h.set_clock(T + 60_000 + 10_000 + 60_000);
    assert!(h.acquire("p", 1).allowed());
}

#[test]
fn u64_extremes_neither_wrap_nor_panic() {
    let mut h = Harness::new(T);
    h.plan(
        "p",
        &[
            ("f", "fixed 18446744073709551615/1d"),
            ("s", "sliding 18446744073709551615/1d"),
            ("b", "bucket 18446744073709551615/3650d"),
            ("c", "cap 18446744073709551615"),
        ],
    );
    let r = h.acquire("p", u64::MAX);
    assert!(r.allowed());
    assert_eq!(r.remaining("f"), 0);
    let r = h.acquire("p", 1);
    assert!(!r.allowed());
    assert!(r.retry_after_ms() > 0);
    assert!(h.acquire("p", 0).allowed());
}

#[test]
fn peek_answers_what_acquire_would_without_charging() {
    let mut h = Harness::new(T);
    h.plan(
        "p",
        &[("rpm", "sliding 5/1m"), ("tpm", "bucket 10 token/1m")],
    );
    assert!(h.acquire("p", 2).allowed());
    let peek = h.peek("p", 2);
    let acquire = h.acquire("p", 2);
    assert_eq!(
        peek.decision.parts[0].outcomes,
        acquire.decision.parts[0].outcomes
    );
    assert_eq!(peek.decision.admission, acquire.decision.admission);
    let peek = h.peek("p", 2);
    assert!(!peek.allowed());
    assert_eq!(h.peek("p", 0).remaining("rpm"), 1);
}

#[test]
fn endpoint_scoping_and_the_access_list() {
    let mut h = Harness::new(T);
    h.plan(
        "p",
        &[
            ("chat", "fixed 1/1m for chat"),
            ("img", "fixed 1/1m for images"),
            ("all", "fixed 5/1m"),
        ],
    );
    let call = |endpoint| Call {
        costs: Costs {
            request: 1,
            units: &[],
        },
        endpoint,
        ..Call::default()
    };
    let r = h.call("p", call(Some("chat")), true);
    assert!(r.allowed());
    assert_eq!(
        r.decision.parts[0].outcomes.len(),
        2,
        "only chat and the unscoped limit apply"
    );
    assert!(!h.call("p", call(Some("chat")), true).allowed());
    assert!(h.call("p", call(Some("images")), true).allowed());
    let r = h.call("p", call(Some("video")), true);
    assert!(!r.allowed());
    assert_eq!(
        (r.denied_by().as_deref(), r.retry_after_ms()),
        (Some("endpoint"), -1)
    );
    // A call naming no endpoint meets the unscoped limits only.
    let r = h.call("p", call(None), true);
    assert!(r.allowed());
    assert_eq!(r.remaining("all"), 2);
}

#[test]
fn shadow_mode_admits_and_charges_but_reports_the_denial() {
    let mut h = Harness::new(T);
    h.plan("p", &[("rpm", "fixed 1/1m"), ("mode", "shadow")]);
    assert!(h.acquire("p", 1).allowed());
    let r = h.acquire("p", 1);
    assert!(r.allowed());
    assert!(r.decision.shadow_denied());
    assert_eq!(r.denied_by(), None);
    assert_eq!(r.decision.parts[0].denial_name(), Some("rpm"));
    assert_eq!(r.remaining("rpm"), 0);
    assert_eq!(h.subject.as_ref().map(|s| s.words()[0]), Some(2));
}

#[test]
fn warn_is_raised_once_per_crossing() {
    let mut h = Harness::new(T);
    h.plan("p", &[("spend", "fixed 100 usd/1mo warn 80%")]);
    let usd = |n| [("usd", n)];
    let r = h.acquire_costs("p", 0, &usd(79));
    assert!(!r.outcome("spend").warn);
    let r = h.acquire_costs("p", 0, &usd(1));
    assert!(r.outcome("spend").warn && r.outcome("spend").warn_crossed);
    let r = h.acquire_costs("p", 0, &usd(1));
    assert!(r.outcome("spend").warn && !r.outcome("spend").warn_crossed);
}

#[test]
fn an_upgrade_keeps_usage_and_gives_the_new_capacity_at_once() {
    let mut h = Harness::new(T);
    h.plan(
        "p",
        &[("rpm", "sliding 10/1m"), ("tpm", "bucket 100 token/1m")],
    );
    assert!(h.acquire_costs("p", 10, &[("token", 100)]).allowed());
    assert!(!h.acquire("p", 1).allowed());
    h.plan(
        "p",
        &[("rpm", "sliding 60/1m"), ("tpm", "bucket 1000 token/1m")],
    );
    let r = h.acquire("p", 1);
    assert!(r.allowed());
    assert_eq!(r.remaining("rpm"), 49);
    assert_eq!(r.remaining("tpm"), 900);
}

#[test]
fn a_changed_window_carries_the_usage_into_the_new_one() {
    let mut h = Harness::new(T);
    h.plan("p", &[("rpm", "fixed 1/1m"), ("daily", "fixed 5/1d")]);
    assert!(h.acquire("p", 1).allowed());
    // One budget: the request already counted fills the new 30-second window too.
    h.plan("p", &[("rpm", "fixed 1/30s"), ("daily", "fixed 5/1d")]);
    let r = h.acquire("p", 1);
    assert!(!r.allowed());
    assert_eq!(r.retry_after_ms(), 30_000);
    assert_eq!(r.remaining("daily"), 4);
    // Conservatively, the old minute's usage counts until that minute ends.
    h.advance(30_000);
    assert!(!h.acquire("p", 1).allowed());
    h.advance(30_000);
    assert_eq!(h.acquire("p", 1).remaining("daily"), 3);
}

#[test]
fn month_windows_reset_on_the_first_including_leap_february() {
    let feb_29 = days_from_civil(2028, 2, 29) * MS_PER_DAY;
    let mut h = Harness::new(feb_29 + MS_PER_DAY - 1);
    h.plan("p", &[("m", "fixed 1/1mo")]);
    let r = h.acquire("p", 1);
    assert_eq!(r.outcome("m").reset_ms, 1);
    let r = h.acquire("p", 1);
    assert_eq!(r.retry_after_ms(), 1);
    h.advance(1);
    assert!(h.acquire("p", 1).allowed());
    let r = h.acquire("p", 1);
    assert_eq!(r.retry_after_ms() as u64, 31 * MS_PER_DAY);
}

#[test]
fn leases_bound_in_flight_requests_and_expire() {
    let mut h = Harness::new(T);
    h.plan("p", &[("jobs", "concurrency 2 ttl 10s")]);
    let a = h.acquire("p", 1);
    let b = h.acquire("p", 1);
    assert!(a.allowed() && b.allowed());
    assert_ne!(a.id, b.id);
    assert!(a
        .id
        .as_deref()
        .is_some_and(|id| id.starts_with(&T.to_string())));
    h.advance(4_000);
    let c = h.acquire("p", 1);
    assert!(!c.allowed());
    assert_eq!(c.retry_after_ms(), 6_000);
    assert_eq!(
        h.release(a.id.as_deref().unwrap_or_default(), &[])
            .as_deref(),
        Some("p")
    );
    assert_eq!(
        h.release(a.id.as_deref().unwrap_or_default(), &[]),
        None,
        "released once"
    );
    assert!(h.acquire("p", 1).allowed());
    // b expires at T + 10 s and frees its slot by itself.
    h.set_clock(T + 10_000);
    assert!(h.acquire("p", 1).allowed());
    assert!(!h.acquire("p", 1).allowed());
}

#[test]
fn settlement_refunds_and_overruns_in_the_charged_window_only() {
    let mut h = Harness::new(T);
    h.plan(
        "p",
        &[("tpm", "fixed 1000 token/1m"), ("rpm", "sliding 10/1m")],
    );
    let call = Call {
        costs: Costs {
            request: 1,
            units: &[("token", 600)],
        },
        id: Some(b"r1"),
        ..Call::default()
    };
    assert!(h.call("p", call, true).allowed());
    assert_eq!(h.release("r1", &[("token", 100)]).as_deref(), Some("p"));
    assert_eq!(h.acquire("p", 0).remaining("tpm"), 900);
    // An overrun is charged even past capacity, and then blocks.
    let call = Call {
        costs: Costs {
            request: 1,
            units: &[("token", 100)],
        },
        id: Some(b"r2"),
        ..Call::default()
    };
    assert!(h.call("p", call, true).allowed());
    assert!(h.release("r2", &[("token", 1_500)]).is_some());
    let r = h.acquire("p", 0);
    assert!(!r.allowed());
    assert_eq!(r.remaining("tpm"), 0);
    // A refund for a window that has passed changes nothing.
    h.set_clock(T + MS_PER_MINUTE);
    let call = Call {
        costs: Costs {
            request: 1,
            units: &[("token", 500)],
        },
        id: Some(b"r3"),
        ttl_ms: Some(3 * MS_PER_MINUTE),
        ..Call::default()
    };
    assert!(h.call("p", call, true).allowed());
    h.set_clock(T + 2 * MS_PER_MINUTE);
    assert!(h.acquire_costs("p", 0, &[("token", 10)]).allowed());
    assert!(h.release("r3", &[("token", 0)]).is_some());
    assert_eq!(h.acquire("p", 0).remaining("tpm"), 990);
}

#[test]
fn a_fallback_admits_what_the_plan_denies_but_not_past_a_shared_budget() {
    let mut h = Harness::new(T);
    h.plan(
        "small",
        &[("rpm", "fixed 100/1m"), ("daily", "fixed 3 usd/1d")],
    );
    h.plan(
        "big",
        &[
            ("rpm", "fixed 1/1m"),
            ("daily", "fixed 3 usd/1d"),
            ("fallback", "small"),
        ],
    );
    let r = h.acquire_costs("big", 1, &[("usd", 1)]);
    assert_eq!(&*r.plan().name, "big");
    let r = h.acquire_costs("big", 1, &[("usd", 1)]);
    assert!(r.allowed());
    assert_eq!(&*r.plan().name, "small");
    // Both plans count `rpm` as one counter and `daily` as one budget.
    assert_eq!(r.remaining("rpm"), 98);
    assert!(h.acquire_costs("big", 1, &[("usd", 1)]).allowed());
    let r = h.acquire_costs("big", 1, &[("usd", 1)]);
    assert!(!r.allowed());
    assert_eq!(&*r.plan().name, "big");
    // The shared daily budget (3 usd) is spent: it stops the fallback too, until midnight.
    assert_eq!(r.denied_by().as_deref(), Some("daily"));
    assert_eq!(r.retry_after_ms() as u64, MS_PER_DAY);
}

#[test]
fn switching_between_plans_that_count_a_name_differently_keeps_one_budget() {
    let mut h = Harness::new(T);
    h.plan("a", &[("rpm", "fixed 5/1m")]);
    h.plan("b", &[("rpm", "sliding 5/1m")]);
    assert_eq!(h.acquire("a", 3).remaining("rpm"), 2);
    // b counts `rpm` another way: the 3 used carry over into its window...
    assert_eq!(h.acquire("b", 1).remaining("rpm"), 1);
    // ...and back again: switching never opens a second budget.
    assert_eq!(h.acquire("a", 1).remaining("rpm"), 0);
    assert!(!h.acquire("b", 1).allowed());
    assert!(!h.acquire("a", 1).allowed());
}

#[test]
fn alternating_throttle_periods_share_one_budget_like_redis_cell() {
    // Issue 9: periods of 60..64 s with burst 1 (max_burst 0), count 1, on one key.
    let mut h = Harness::new(T);
    let mut admitted = 0;
    for i in 0..20u64 {
        let plan = format!("t{}", 60 + i % 5);
        h.plan(
            &plan,
            &[("throttle", &format!("bucket 1/{}s burst 1", 60 + i % 5))],
        );
        admitted += u32::from(h.acquire(&plan, 1).allowed());
        h.advance(100);
    }
    assert_eq!(admitted, 1);
}

#[test]
fn a_generated_id_never_replaces_a_live_request() {
    let mut h = Harness::new(T);
    h.plan("p", &[("jobs", "concurrency 3")]);
    let chosen = format!("{T}-1");
    let call = Call {
        id: Some(chosen.as_bytes()),
        ..Call::default()
    };
    assert!(h.call("p", call, true).allowed());
    let generated = h.acquire("p", 1);
    assert!(generated.allowed());
    assert_ne!(generated.id.as_deref(), Some(&*chosen));
    assert_eq!(generated.remaining("jobs"), 1);
    assert!(h.release(&chosen, &[]).is_some());
    assert_eq!(h.peek("p", 1).remaining("jobs"), 1);
}

#[test]
fn reusing_a_live_id_replaces_its_request_and_frees_its_lease() {
    let mut h = Harness::new(T);
    h.plan("p", &[("jobs", "concurrency 2")]);
    let call = Call {
        id: Some(b"x"),
        ..Call::default()
    };
    assert_eq!(h.call("p", call, true).remaining("jobs"), 1);
    assert_eq!(h.call("p", call, true).remaining("jobs"), 1);
    assert!(h.release("x", &[]).is_some());
    assert_eq!(h.peek("p", 1).remaining("jobs"), 1, "peek takes one itself");
    assert!(h.release("x", &[]).is_none());
}

#[test]
fn settling_after_a_plan_change_refunds_nothing_into_the_new_shape() {
    let mut h = Harness::new(T);
    h.plan("p", &[("tpm", "fixed 1000 token/1m")]);
    let call = Call {
        costs: Costs {
            request: 1,
            units: &[("token", 600)],
        },
        id: Some(b"r1"),
        ..Call::default()
    };
    assert!(h.call("p", call, true).allowed());
    // The plan now counts `tpm` over 30 s: the 600 carry into the new window.
    h.plan("p", &[("tpm", "fixed 1000 token/30s")]);
    assert_eq!(
        h.acquire_costs("p", 0, &[("token", 50)]).remaining("tpm"),
        350
    );
    // The reservation was charged in the old shape: settling releases it, and
    // refunds nothing into a window it was never charged in.
    assert!(h.release("r1", &[("token", 100)]).is_some());
    assert_eq!(h.peek("p", 0).remaining("tpm"), 350);
}

#[test]
fn refilled_buckets_of_other_plans_do_not_pile_up() {
    let mut h = Harness::new(T);
    for i in 1..=300u64 {
        let name = format!("b{i}");
        h.plan(&name, &[("tb", &*format!("bucket 10/{i}s"))]);
        assert!(h.acquire(&name, 1).allowed(), "call {i}");
        h.advance(i * 1_000);
    }
    let held = h.subject.as_ref().map_or(0, |s| s.layout().len());
    assert!(held <= 2, "the subject holds {held} slots");
}

#[test]
fn a_fallback_that_concurrent_changes_made_count_a_limit_in_another_unit_is_not_followed() {
    use tollgate_core::registry::{Author, Plans};
    // Two primaries each accept one change; merged, the chain `ua -> ub` counts
    // `d` in usd and in token, which RL.PLAN.SET refuses on one node.
    let mut h = Harness::new(T);
    h.plan("ua", &[("d", "fixed 10 usd/1d")]);
    h.plan("ub", &[("d", "fixed 10 usd/1d")]);
    let mut other = h.plans.clone();
    let at = |origin| Author { origin, now_ms: T };
    let (_, to_token) = other
        .set_by(
            at("b"),
            "ub",
            &[("d", "fixed 10 token/1d")],
            &mut h.interner,
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
    let (_, fallback) = h
        .plans
        .set_by(at("a"), "ua", &[("fallback", "ub")], &mut h.interner)
        .unwrap_or_else(|e| unreachable!("{e}"));
    let mut merged: Plans = h.plans.clone();
    merged.merge(&to_token, T, &mut h.interner);
    other.merge(&fallback, T, &mut h.interner);
    assert_eq!(merged.sync_digest(), other.sync_digest());
    assert!(merged.fallback_unit_conflict("ub").is_some());
    h.plans = merged;
    let r = h.acquire_costs("ua", 1, &[("usd", 10), ("token", 10)]);
    assert!(r.allowed());
    let r = h.acquire_costs("ua", 1, &[("usd", 10), ("token", 10)]);
    assert!(
        !r.allowed(),
        "the usd budget is spent: ub's token budget must not admit"
    );
    assert_eq!(&*r.plan().name, "ua");
}

/// docs/operating.md, "Clocks", for leases: a call is decided at `max(clock, the
/// subject's latest instant)`.
#[test]
fn leases_follow_clock_steps_as_the_operating_guide_documents() {
    let mut h = Harness::new(T);
    h.plan("p", &[("jobs", "concurrency 2 ttl 10s")]);
    assert!(h.acquire("p", 1).allowed(), "a: expires at T + 10 s");
    h.set_clock(T + 4_000);
    assert!(h.acquire("p", 1).allowed(), "b: expires at T + 14 s");
    assert!(!h.acquire("p", 1).allowed());

    // Back by a minute: time stands still at T + 4 s for this subject, so no lease
    // expires until the clock catches up with a's expiry.
    h.set_clock(T - MS_PER_MINUTE);
    let r = h.acquire("p", 1);
    assert!(!r.allowed());
    assert_eq!(r.decision.parts[0].now, T + 4_000);
    h.set_clock(T + 9_999);
    assert!(!h.acquire("p", 1).allowed());
    h.set_clock(T + 10_000);
    assert!(
        h.acquire("p", 1).allowed(),
        "c: a expired; c expires at T + 20 s"
    );

    // Forward by d = 5 s (to T + 15 s instead of T + 10 s): b, due within d, expires
    // at once and frees its slot early; c, which a correct clock keeps 10 s more
    // (longer than d), is kept.
    h.set_clock(T + 15_000);
    assert!(h.acquire("p", 1).allowed(), "d: took b's slot");
    assert!(!h.acquire("p", 1).allowed(), "c and d hold");

    // The clock comes back to the correct reading: the subject touched while ahead
    // keeps T + 15 s and waits for it; c still expires when the clock reads T + 20 s.
    h.set_clock(T + 10_001);
    let r = h.acquire("p", 1);
    assert!(!r.allowed());
    assert_eq!(r.decision.parts[0].now, T + 15_000);
    h.set_clock(T + 19_999);
    assert!(!h.acquire("p", 1).allowed());
    h.set_clock(T + 20_000);
    assert!(h.acquire("p", 1).allowed(), "c expired");

    // A subject first touched after a step back runs on the clock as it is.
    h.subject = None;
    h.set_clock(T - MS_PER_MINUTE);
    let r = h.acquire("p", 1);
    assert!(r.allowed());
    assert_eq!(r.decision.parts[0].now, T - MS_PER_MINUTE);
    assert!(h.acquire("p", 1).allowed());
    h.set_clock(T - MS_PER_MINUTE + 9_999);
    assert!(!h.acquire("p", 1).allowed());
    h.set_clock(T - MS_PER_MINUTE + 10_000);
    assert!(
        h.acquire("p", 1).allowed(),
        "its leases expire by the clock"
    );
}
