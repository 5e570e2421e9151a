//! Property test of settlement: a reservation charged an estimate and settled later
//! for its actual cost (never more) must never let more through than charging the
//! actual cost up front would have — for every kind of limit. Each run replays the
//! admitted calls, with their actual costs at their admission instants, through a
//! deliberately naive limiter: it must admit every one of them.

#![allow(clippy::indexing_slicing)] // test code, where a panic is a failed test

mod common;

use common::Harness;
use proptest::prelude::*;
use tollgate_core::decide::{Call, Costs};

const START: u64 = 1_763_769_600_000;
const WINDOW_MS: u64 = 1_000;

#[derive(Debug, Clone)]
enum Op {
    /// Reserve `estimate` tokens; the call will turn out to cost `actual <= estimate`.
    Reserve {
        estimate: u64,
        actual: u64,
    },
    /// A call without a reservation, charged its cost.
    Plain(u64),
    /// Settle the reservation at this index (if it still lives).
    Settle(usize),
    Advance(u64),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        prop_oneof![
            3 => (1u64..60).prop_flat_map(|e| (Just(e), 0..=e))
                .prop_map(|(estimate, actual)| Op::Reserve { estimate, actual }),
            2 => (0u64..40).prop_map(Op::Plain),
            3 => (0usize..16).prop_map(Op::Settle),
            3 => (0u64..700).prop_map(Op::Advance),
        ],
        1..100,
    )
}

/// Whether every admitted `(instant, actual)` fits the limit `spec` names, charged in
/// order: the naive limiter.
fn naive_admits_all(kind: &str, capacity: u64, calls: &[(u64, u64)]) -> Result<(), String> {
    match kind {
        "fixed" => {
            for &(t, _) in calls {
                let window = t / WINDOW_MS;
                let used: u64 = calls
                    .iter()
                    .filter(|(u, _)| *u <= t && u / WINDOW_MS == window)
                    .map(|(_, a)| a)
                    .sum();
                if used > capacity {
                    return Err(format!("window {window} holds {used} > {capacity}"));
                }
            }
        }
        "sliding" => {
            for &(t, _) in calls {
                let used: u64 = calls
                    .iter()
                    .filter(|(u, _)| *u <= t && *u + WINDOW_MS > t)
                    .map(|(_, a)| a)
                    .sum();
                if used > capacity {
                    return Err(format!(
                        "({}, {t}] holds {used} > {capacity}",
                        t.saturating_sub(WINDOW_MS)
                    ));
                }
            }
        }
        _ => {
            // A token bucket refilling `capacity` per window, holding `capacity`; in
            // unit-milliseconds so every step is exact.
            let (rate, full) = (
                u128::from(capacity),
                u128::from(capacity) * u128::from(WINDOW_MS),
            );
            let (mut debt, mut last) = (0u128, START);
            for &(t, a) in calls {
                debt = debt.saturating_sub(rate * u128::from(t - last));
                last = t;
                debt += u128::from(a) * u128::from(WINDOW_MS);
                if debt > full {
                    return Err(format!("at {t} the bucket is {} over", debt - full));
                }
            }
        }
    }
    Ok(())
}

fn run(kind: &str, capacity: u64, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut h = Harness::new(START);
    let spec = match kind {
        "fixed" => format!("fixed {capacity} token/{WINDOW_MS}ms"),
        "sliding" => format!("sliding {capacity} token/{WINDOW_MS}ms precision 10"),
        _ => format!("bucket {capacity} token/{WINDOW_MS}ms"),
    };
    h.plan("p", &[("t", &spec)]);
    // Admitted calls: (instant, cost charged up front had it been known).
    let mut admitted: Vec<(u64, u64)> = Vec::new();
    // Reservations: (id, index into admitted, actual).
    let mut reserved: Vec<(String, usize, u64)> = Vec::new();
    for (n, op) in ops.iter().enumerate() {
        let now = START + h_now(&h);
        match *op {
            Op::Reserve { estimate, actual } => {
                let id = format!("r{n}");
                let tokens = [("token", estimate)];
                let call = Call {
                    costs: Costs {
                        request: 0,
                        units: &tokens,
                    },
                    id: Some(id.as_bytes()),
                    ttl_ms: Some(10 * WINDOW_MS),
                    ..Call::default()
                };
                if h.call("p", call, true).allowed() {
                    admitted.push((now, actual));
                    reserved.push((id, admitted.len() - 1, actual));
                }
            }
            Op::Plain(cost) => {
                if h.acquire_costs("p", 0, &[("token", cost)]).allowed() {
                    admitted.push((now, cost));
                }
            }
            Op::Settle(i) => {
                if reserved.is_empty() {
                    continue;
                }
                let (id, _, actual) = reserved.remove(i % reserved.len());
                h.release(&id, &[("token", actual)]);
            }
            Op::Advance(dt) => h.advance(dt),
        }
    }
    naive_admits_all(kind, capacity, &admitted)
        .map_err(|e| TestCaseError::fail(format!("{kind}: {e}; admitted {admitted:?}")))
}

fn h_now(h: &Harness) -> u64 {
    tollgate_core::time::Clock::now_ms(&h.clock) - START
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn fixed_settlement_never_admits_more_than_actual_costs_up_front(capacity in 1u64..100, ops in ops()) {
        run("fixed", capacity, &ops)?;
    }

    #[test]
    fn sliding_settlement_never_admits_more_than_actual_costs_up_front(capacity in 1u64..100, ops in ops()) {
        run("sliding", capacity, &ops)?;
    }

    #[test]
    fn bucket_settlement_never_admits_more_than_actual_costs_up_front(capacity in 1u64..100, ops in ops()) {
        run("bucket", capacity, &ops)?;
    }
}
