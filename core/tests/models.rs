//! Property tests: each algorithm against a deliberately naive model, on random
//! sequences of time steps and costs.

#![allow(clippy::indexing_slicing)] // test helpers, where a panic is a failed test

mod common;

use common::Harness;
use proptest::prelude::*;
use tollgate_core::time::MS_PER_DAY;

const START: u64 = 1_763_769_600_000;

/// One step of a run: wait `dt` ms, then ask for `cost`.
fn steps(max_dt: u64, max_cost: u64) -> impl Strategy<Value = Vec<(u64, u64)>> {
    proptest::collection::vec((0..=max_dt, 0..=max_cost), 1..120)
}

/// After a denial with `retry_after_ms = d`, the same call is denied at `d - 1` and
/// admitted at `d` (exact, never early), provided nothing else is charged.
fn check_retry_is_exact(
    h: &mut Harness,
    plan: &str,
    cost: u64,
    retry: i64,
) -> Result<(), TestCaseError> {
    if retry <= 0 {
        return Ok(());
    }
    let now = h.clock.now_ms_value();
    h.set_clock(now + retry as u64 - 1);
    prop_assert!(
        !h.peek(plan, cost).allowed(),
        "admitted 1 ms before retry_after"
    );
    h.set_clock(now + retry as u64);
    prop_assert!(h.peek(plan, cost).allowed(), "still denied at retry_after");
    h.set_clock(now);
    Ok(())
}

trait ClockValue {
    fn now_ms_value(&self) -> u64;
}

impl ClockValue for tollgate_core::time::ManualClock {
    fn now_ms_value(&self) -> u64 {
        tollgate_core::time::Clock::now_ms(self)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Sliding: never more than `n` in any closed trailing window; a denial means the
    /// naive count over the window plus one slice is full; retries are exact.
    #[test]
    fn sliding_never_exceeds_and_is_conservative_by_at_most_one_slice(
        n in 1u64..20,
        window_ms in 10u64..5_000,
        precision in 1u32..12,
        run in steps(1_500, 8),
    ) {
        prop_assume!(u64::from(precision) <= window_ms);
        let mut h = Harness::new(START);
        h.plan("p", &[("s", &format!("sliding {n}/{window_ms}ms precision {precision}"))]);
        let slice = window_ms.div_ceil(u64::from(precision));
        let mut log: Vec<(u64, u64)> = Vec::new();
        for (dt, cost) in run {
            h.advance(dt);
            let t = h.clock.now_ms_value();
            let r = h.acquire("p", cost);
            if r.allowed() {
                log.push((t, cost));
                prop_assert!(in_window(&log, t.saturating_sub(window_ms)) <= n, "over the limit at {}", t);
            } else if cost <= n {
                prop_assert!(in_window(&log, t.saturating_sub(window_ms + slice)) + cost > n, "denied with room at {}", t);
                check_retry_is_exact(&mut h, "p", cost, r.retry_after_ms())?;
            } else {
                prop_assert_eq!(r.retry_after_ms(), -1);
            }
            // Remaining lies between the exact answer and the one-slice-conservative one.
            let remaining = r.remaining("s");
            prop_assert!(remaining <= n.saturating_sub(in_window(&log, t.saturating_sub(window_ms))));
            prop_assert!(remaining >= n.saturating_sub(in_window(&log, t.saturating_sub(window_ms + slice))));
        }
    }

    /// Bucket: the same decisions and remaining units as a naive token bucket that
    /// refills continuously (kept exactly, scaled by the window).
    #[test]
    fn bucket_matches_a_naive_token_bucket(
        rate in 1u64..50,
        window_ms in 1u64..5_000,
        burst in 1u64..30,
        run in steps(2_000, 12),
    ) {
        let mut h = Harness::new(START);
        h.plan("p", &[("b", &format!("bucket {rate}/{window_ms}ms burst {burst}"))]);
        let full = u128::from(burst) * u128::from(window_ms);
        let mut tokens = full; // scaled by window_ms
        for (dt, cost) in run {
            h.advance(dt);
            tokens = (tokens + u128::from(dt) * u128::from(rate)).min(full);
            let want = u128::from(cost) * u128::from(window_ms);
            let r = h.acquire("p", cost);
            prop_assert_eq!(r.allowed(), tokens >= want, "decision differs");
            if r.allowed() {
                tokens -= want;
            } else if cost <= burst {
                check_retry_is_exact(&mut h, "p", cost, r.retry_after_ms())?;
            } else {
                prop_assert_eq!(r.retry_after_ms(), -1);
            }
            prop_assert_eq!(u128::from(r.remaining("b")), tokens / u128::from(window_ms));
        }
    }

    /// Fixed: the same decisions as a naive counter per window, calendar months
    /// included (months computed by walking the calendar day by day).
    #[test]
    fn fixed_matches_a_naive_counter(
        n in 0u64..10,
        window in prop_oneof![Just("1s"), Just("7s"), Just("1m"), Just("1d"), Just("1w"), Just("1mo")],
        run in steps(3 * MS_PER_DAY, 4),
    ) {
        let mut h = Harness::new(START);
        h.plan("p", &[("f", &format!("fixed {n}/{window}"))]);
        let mut counts: std::collections::HashMap<u64, u64> = Default::default();
        for (dt, cost) in run {
            h.advance(dt);
            let t = h.clock.now_ms_value();
            let key = naive_window(window, t);
            let used = counts.get(&key).copied().unwrap_or(0);
            let r = h.acquire("p", cost);
            prop_assert_eq!(r.allowed(), used + cost <= n, "decision differs at {}", t);
            if r.allowed() {
                counts.insert(key, used + cost);
            } else if cost <= n {
                check_retry_is_exact(&mut h, "p", cost, r.retry_after_ms())?;
            }
        }
    }
}

/// Units admitted at or after `from`.
fn in_window(log: &[(u64, u64)], from: u64) -> u64 {
    log.iter()
        .filter(|(at, _)| *at >= from)
        .map(|(_, c)| c)
        .sum()
}

/// A window number computed the slow, obvious way.
fn naive_window(window: &str, t: u64) -> u64 {
    match window {
        "1s" => t / 1_000,
        "7s" => t / 7_000,
        "1m" => t / 60_000,
        "1d" => t / MS_PER_DAY,
        // Weeks start on Monday; 1970-01-05 was the first Monday.
        "1w" => (t / MS_PER_DAY + 3) / 7,
        _ => {
            let mut days = t / MS_PER_DAY;
            let (mut year, mut month) = (1970u64, 0u64);
            loop {
                let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
                let lengths = [
                    31,
                    if leap { 29 } else { 28 },
                    31,
                    30,
                    31,
                    30,
                    31,
                    31,
                    30,
                    31,
                    30,
                    31,
                ];
                let len = lengths[month as usize % 12];
                if days < len {
                    return (year - 1970) * 12 + month;
                }
                days -= len;
                month += 1;
                if month == 12 {
                    month = 0;
                    year += 1;
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
enum LeaseOp {
    Acquire,
    Release(usize),
    Touch(usize, u64),
    Advance(u64),
}

fn lease_ops() -> impl Strategy<Value = Vec<LeaseOp>> {
    proptest::collection::vec(
        prop_oneof![
            3 => Just(LeaseOp::Acquire),
            2 => (0usize..8).prop_map(LeaseOp::Release),
            1 => (0usize..8, 1u64..3_000).prop_map(|(i, t)| LeaseOp::Touch(i, t)),
            2 => (0u64..1_500).prop_map(LeaseOp::Advance),
        ],
        1..150,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Leases: for any interleaving of acquire, release, touch and time steps, the
    /// leases in flight never exceed the limit, an acquire is admitted exactly when a
    /// naive list of live leases has room, and every slot frees once its TTL passes.
    #[test]
    fn leases_never_exceed_the_limit_and_always_free(max in 1u64..5, ttl in 1u64..2_000, ops in lease_ops()) {
        let mut h = Harness::new(START);
        h.plan("p", &[("jobs", &format!("concurrency {max} ttl {ttl}ms"))]);
        // The model: (id, expires_at) of every lease handed out and not released.
        let mut held: Vec<(String, u64)> = Vec::new();
        for op in ops {
            let now = h.clock.now_ms_value();
            match op {
                LeaseOp::Acquire => {
                    let live = held.iter().filter(|(_, at)| *at > now).count() as u64;
                    let r = h.acquire("p", 1);
                    prop_assert_eq!(r.allowed(), live < max, "live {} max {}", live, max);
                    if r.allowed() {
                        held.push((r.id.clone().unwrap_or_default(), now + ttl));
                    } else {
                        check_retry_is_exact(&mut h, "p", 1, r.retry_after_ms())?;
                    }
                }
                LeaseOp::Release(i) => {
                    if held.is_empty() { continue; }
                    let (id, at) = held.remove(i % held.len());
                    let released = h.release(&id, &[]).is_some();
                    prop_assert_eq!(released, at > now, "release of a lease live={}", at > now);
                }
                LeaseOp::Touch(i, extend) => {
                    if held.is_empty() { continue; }
                    let i = i % held.len();
                    let live = held[i].1 > now;
                    let touched = h.touch(&held[i].0, extend);
                    prop_assert_eq!(touched, live);
                    if live {
                        held[i].1 = now + extend;
                    }
                }
                LeaseOp::Advance(dt) => h.advance(dt),
            }
        }
        // Once every TTL has passed, every slot is free again.
        h.advance(3_000);
        for _ in 0..max {
            prop_assert!(h.acquire("p", 1).allowed());
        }
    }
}
