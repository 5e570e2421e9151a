//! `MEMORY USAGE` of a credits key is close to what it really holds: the estimate
//! against every byte a counting allocator sees it take, rounded as jemalloc rounds.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use tollgate_core::credits::{CreditSettings, Credits, Touched};
use tollgate_core::mem::allocation;

struct Counting;

static HELD: AtomicIsize = AtomicIsize::new(0);
/// The tests of this file measure one at a time (the count is process-wide).
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

// SAFETY: every call is passed to the system allocator unchanged; only counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(allocation(layout.size()) as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(allocation(layout.size()) as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const SETTINGS: CreditSettings = CreditSettings {
    window_ms: 86_400_000,
    max_ids: 100_000,
    max_blocks: 100_000,
};

/// Bytes held by a boxed credits key built by `build`, and its own estimate.
fn held_and_estimated(build: impl FnOnce(&mut Credits)) -> (f64, f64) {
    let before = HELD.load(Ordering::Relaxed);
    let mut credits = Box::new(Credits::new());
    build(&mut credits);
    let held = HELD.load(Ordering::Relaxed) - before;
    (held as f64, credits.mem_usage() as f64)
}

fn assert_close(what: &str, (held, estimated): (f64, f64)) {
    let ratio = estimated / held;
    assert!(
        (0.8..=1.25).contains(&ratio),
        "{what}: MEMORY USAGE {estimated} for {held} held ({ratio:.2})"
    );
}

#[test]
fn memory_usage_of_a_credits_key_is_within_a_quarter_of_what_it_holds() {
    let _one_at_a_time = MEASURING.lock();
    let now = 1_000_000;
    // Grants in order of expiry and id (how a service usually grants).
    assert_close(
        "1,000 grants in order",
        held_and_estimated(|c| {
            for i in 0..1_000u64 {
                let id = format!("grant-{i:06}");
                let mut touched = Touched::default();
                c.grant(
                    1_000,
                    Some(now + 86_400_000 + i),
                    Some(id.as_bytes()),
                    now,
                    &SETTINGS,
                    &mut touched,
                )
                .unwrap();
            }
        }),
    );
    // Grants out of order, then deductions with ids that each take from a few blocks.
    assert_close(
        "1,000 shuffled grants and 500 deductions",
        held_and_estimated(|c| {
            for i in 0..1_000u64 {
                let n = (i * 7_919) % 1_000;
                let id = format!("g-{n}");
                let mut touched = Touched::default();
                c.grant(
                    100,
                    Some(now + 3_600_000 + n * 1_000),
                    Some(id.as_bytes()),
                    now,
                    &SETTINGS,
                    &mut touched,
                )
                .unwrap();
            }
            for i in 0..500u64 {
                let id = format!("deduction-{i}");
                let mut touched = Touched::default();
                c.deduct(
                    150,
                    false,
                    Some(id.as_bytes()),
                    now,
                    &SETTINGS,
                    &mut touched,
                )
                .unwrap();
            }
        }),
    );
}

#[test]
fn memory_usage_of_a_subject_with_many_requests_in_flight_is_within_a_quarter_of_what_it_holds() {
    use tollgate_core::decide::{Call, Costs};
    let _one_at_a_time = MEASURING.lock();
    let mut h = common::Harness::new(1_000_000);
    h.plan(
        "jobs",
        &[
            ("jobs", "concurrency 5000 ttl 1h"),
            ("tpm", "sliding 100000000 token/1m"),
        ],
    );
    h.acquire("jobs", 1); // the subject exists: what follows is its requests
    let before = HELD.load(Ordering::Relaxed);
    let estimated_before = h.subject.as_ref().map_or(0, |s| s.mem_usage());
    for i in 0..1_000 {
        let id = format!("request-{i:05}");
        let reply = h.call(
            "jobs",
            Call {
                costs: Costs {
                    request: 1,
                    units: &[],
                },
                id: Some(id.as_bytes()),
                ..Call::default()
            },
            true,
        );
        assert!(reply.allowed());
    }
    let held = (HELD.load(Ordering::Relaxed) - before) as f64;
    let estimated = (h.subject.as_ref().map_or(0, |s| s.mem_usage()) - estimated_before) as f64;
    assert_close("1,000 leases", (held, estimated));
}
