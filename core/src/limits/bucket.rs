//! Token buckets, as GCRA in exact integer arithmetic.
//!
//! A bucket refills `rate` units per `window` and holds at most `burst`. Instead of a
//! fractional theoretical arrival time we keep the *debt*: how far the bucket is below
//! full, in unit-milliseconds scaled by the window (`debt = (burst - tokens) * window`).
//! Charging `c` adds `c * window`; every millisecond drains `rate`. Then
//! `tat - now = debt / rate` exactly, and every comparison is an integer one:
//! a cost `c` is admitted when `debt + c * window <= burst * window`.
//!
//! State: five words — the instant of the last update, the debt as a `u128` (low word
//! first), the rate it was last charged at, and the *refund mark*. Decisions drain at
//! the plan's current rate (a plan may change it and usage carries over); the stored
//! rate lets the state say when it will be idle, and be settled, without the plan.
//!
//! Refunds. A bucket drains first in, first out: a charge of `c` made when the debt was
//! `D` is the top `c * window` of the debt, fully drained once `D + c * window` has,
//! at its *drain instant*. A reservation settled for less than it charged may give back
//! only what of its charge is still counted — never what already drained (that would
//! let more through than charging the actual amount up front). What is still counted
//! is at most `rate * (drain instant - now)`, but refunds of charges *below* it since
//! make it drain sooner. The refund mark counts the units refunded since its epoch, and
//! every charge records the mark it saw: a refund subtracts whatever was refunded after
//! its charge (assuming, conservatively, that all of it was below). A rate change (its
//! drain instants no longer hold) or a mark that would overflow starts a new epoch,
//! after which earlier charges refund nothing.

use super::{div, div_ceil, to_u64, Admission};

/// The parameters of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub rate: u64,
    pub window_ms: u64,
    pub burst: u64,
}

/// Words a bucket's state takes.
pub const WORDS: usize = 5;

/// Bits of the refund mark that count refunded units; the rest count epochs.
const MARK_UNIT_BITS: u32 = 48;
const MARK_UNITS: u64 = (1 << MARK_UNIT_BITS) - 1;

fn read(words: &[u64]) -> (u64, u128) {
    match words {
        [t0, lo, hi, ..] => (*t0, u128::from(*lo) | (u128::from(*hi) << 64)),
        _ => (0, 0),
    }
}

/// The rate a bucket state was last charged at (at least 1).
pub fn stored_rate(words: &[u64]) -> u64 {
    words.get(3).copied().unwrap_or(1).max(1)
}

/// The bucket's refund mark (see the module docs): what a charge records.
pub fn refund_mark(words: &[u64]) -> u64 {
    words.get(4).copied().unwrap_or(0)
}

/// The first mark of the epoch after `mark`'s.
fn next_epoch(mark: u64) -> u64 {
    ((mark >> MARK_UNIT_BITS).wrapping_add(1)) << MARK_UNIT_BITS
}

/// What one reservation charged a bucket, as [`Bucket::charge_reserved`] recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    pub amount: u64,
    /// The instant (rounded down) by which the charge has fully drained.
    pub drains_at: u64,
    /// The refund mark right after the charge.
    pub mark: u64,
}

impl Bucket {
    fn write(&self, words: &mut [u64], t0: u64, debt: u128) {
        if let [w0, lo, hi, rate, mark, ..] = words {
            // A new rate invalidates the drain instants of the charges still counted.
            if *rate != 0 && *rate != self.rate && debt > 0 {
                *mark = next_epoch(*mark);
            }
            *w0 = t0;
            *lo = debt as u64;
            *hi = (debt >> 64) as u64;
            *rate = self.rate;
        }
    }

    fn capacity(&self) -> u128 {
        u128::from(self.burst) * u128::from(self.window_ms)
    }

    /// The debt at `now`, after draining since the last update.
    pub fn debt_at(&self, words: &[u64], now: u64) -> u128 {
        let (t0, debt) = read(words);
        let drained = u128::from(self.rate).saturating_mul(u128::from(now.saturating_sub(t0)));
        debt.saturating_sub(drained)
    }

    pub fn admission(&self, debt: u128, cost: u64) -> Admission {
        if cost > self.burst {
            return Admission::Never;
        }
        let need = debt.saturating_add(u128::from(cost) * u128::from(self.window_ms));
        match need.checked_sub(self.capacity()) {
            None | Some(0) => Admission::Now,
            Some(excess) => Admission::After(to_u64(div_ceil(excess, u128::from(self.rate)))),
        }
    }

    /// Whole units left in the bucket.
    pub fn remaining(&self, debt: u128) -> u64 {
        to_u64(div(
            self.capacity().saturating_sub(debt),
            u128::from(self.window_ms.max(1)),
        ))
    }

    /// Units in use, rounded up (for warn thresholds).
    pub fn used(&self, debt: u128) -> u128 {
        div_ceil(debt, u128::from(self.window_ms.max(1)))
    }

    /// Time until the bucket is full again.
    pub fn reset_ms(&self, debt: u128) -> u64 {
        to_u64(div_ceil(debt, u128::from(self.rate)))
    }

    /// Adds `amount` at `now` (never refused: an overrun may go past the burst).
    pub fn charge(&self, words: &mut [u64], now: u64, amount: u64) {
        let debt = self.debt_at(words, now);
        self.write(
            words,
            now,
            debt.saturating_add(u128::from(amount) * u128::from(self.window_ms)),
        );
    }

    /// Charges a reservation of `amount` at `now` and records what a refund needs.
    pub fn charge_reserved(&self, words: &mut [u64], now: u64, amount: u64) -> Reserved {
        self.charge(words, now, amount);
        let debt = self.debt_at(words, now);
        Reserved {
            amount,
            // Rounded down: a refund may only under-estimate what is still counted.
            drains_at: now.saturating_add(to_u64(div(debt, u128::from(self.rate.max(1))))),
            mark: refund_mark(words),
        }
    }

    /// Gives back up to `units` of the reservation `reserved` at `now` — only what of
    /// its charge is still counted (see the module docs) — and returns the units given
    /// back. Call on [`Bucket::as_stored`] (the rate the state was charged at).
    pub fn refund_reserved(
        &self,
        words: &mut [u64],
        now: u64,
        reserved: Reserved,
        units: u64,
    ) -> u64 {
        let mark = refund_mark(words);
        if mark >> MARK_UNIT_BITS != reserved.mark >> MARK_UNIT_BITS {
            return 0;
        }
        let counted = u128::from(self.rate)
            .saturating_mul(u128::from(reserved.drains_at.saturating_sub(now)));
        let counted_units = to_u64(div(counted, u128::from(self.window_ms.max(1))));
        let refunded_since = (mark & MARK_UNITS).saturating_sub(reserved.mark & MARK_UNITS);
        let back = units
            .min(reserved.amount)
            .min(counted_units.saturating_sub(refunded_since));
        if back == 0 {
            return 0;
        }
        let debt = self.debt_at(words, now);
        self.write(
            words,
            now,
            debt.saturating_sub(u128::from(back) * u128::from(self.window_ms)),
        );
        if let Some(slot) = words.get_mut(4) {
            let units_after = (mark & MARK_UNITS).checked_add(back);
            *slot = match units_after {
                Some(u) if u <= MARK_UNITS => (mark & !MARK_UNITS) | u,
                // Out of room: a new epoch (earlier charges then refund nothing).
                _ => next_epoch(mark),
            };
        }
        back
    }

    /// The bucket a state was last charged as (rate from the state; the burst does not
    /// matter to draining, refunds or overruns).
    pub fn as_stored(words: &[u64], window_ms: u64) -> Bucket {
        Bucket {
            rate: stored_rate(words),
            window_ms,
            burst: 1,
        }
    }

    /// The instant the bucket is full again at the rate it was last charged at.
    pub fn idle_at(words: &[u64]) -> Option<u64> {
        let (t0, debt) = read(words);
        (debt > 0)
            .then(|| t0.saturating_add(to_u64(div_ceil(debt, u128::from(stored_rate(words))))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// redis-cell's example: 1 per second, burst 5.
    const B: Bucket = Bucket {
        rate: 1,
        window_ms: 1_000,
        burst: 5,
    };

    #[test]
    fn a_full_bucket_admits_its_burst_then_one_per_interval() {
        let mut w = [0u64; WORDS];
        let t = 1_000_000;
        for i in 0..5 {
            let debt = B.debt_at(&w, t);
            assert_eq!(B.admission(debt, 1), Admission::Now, "call {i}");
            B.charge(&mut w, t, 1);
        }
        let debt = B.debt_at(&w, t);
        assert_eq!(B.remaining(debt), 0);
        assert_eq!(B.admission(debt, 1), Admission::After(1_000));
        assert_eq!(B.admission(debt, 5), Admission::After(5_000));
        assert_eq!(B.admission(debt, 6), Admission::Never);
        assert_eq!(B.reset_ms(debt), 5_000);
        assert_eq!(Bucket::idle_at(&w), Some(t + 5_000));
        // 2.5 s later, two whole units are back and the third is half way.
        let debt = B.debt_at(&w, t + 2_500);
        assert_eq!(B.remaining(debt), 2);
        assert_eq!(B.admission(debt, 3), Admission::After(500));
        assert_eq!(B.reset_ms(debt), 2_500);
    }

    #[test]
    fn fractional_intervals_are_exact_and_rounded_up() {
        // 3 per second: an interval of 333.33 ms.
        let b = Bucket {
            rate: 3,
            window_ms: 1_000,
            burst: 1,
        };
        let mut w = [0u64; WORDS];
        b.charge(&mut w, 0, 1);
        let debt = b.debt_at(&w, 0);
        assert_eq!(b.admission(debt, 1), Admission::After(334));
        assert_eq!(b.admission(b.debt_at(&w, 333), 1), Admission::After(1));
        assert_eq!(b.admission(b.debt_at(&w, 334), 1), Admission::Now);
    }

    #[test]
    fn refunds_give_back_only_what_is_still_counted() {
        let mut w = [0u64; WORDS];
        let r = B.charge_reserved(&mut w, 0, 5);
        assert_eq!(r.drains_at, 5_000);
        assert_eq!(B.refund_reserved(&mut w, 0, r, 2), 2);
        assert_eq!(B.remaining(B.debt_at(&w, 0)), 2);
        B.charge(&mut w, 0, 10); // an overrun past the burst
        assert_eq!(B.remaining(B.debt_at(&w, 0)), 0);
        assert_eq!(B.admission(B.debt_at(&w, 0), 0), Admission::After(8_000));
        // Long after the charge drained, nothing of it is left to refund.
        let mut w = [0u64; WORDS];
        let r = B.charge_reserved(&mut w, 0, 5);
        assert_eq!(B.refund_reserved(&mut w, 100_000, r, 5), 0);
        assert_eq!(
            B.refund_reserved(&mut w, 3_000, r, 5),
            2,
            "2 of 5 still counted"
        );
    }

    #[test]
    fn a_settled_bucket_never_admits_more_than_the_actual_cost_up_front() {
        // Issue 9: 100 tokens/s, burst 100. A reserves 100; 500 ms later 50 more are
        // admitted; A settles at 0. Only the 50 of A still counted may come back.
        let b = Bucket {
            rate: 100,
            window_ms: 1_000,
            burst: 100,
        };
        let mut w = [0u64; WORDS];
        let a = b.charge_reserved(&mut w, 0, 100);
        assert_eq!(b.admission(b.debt_at(&w, 500), 50), Admission::Now);
        b.charge(&mut w, 500, 50);
        let stored = Bucket::as_stored(&w, 1_000);
        assert_eq!(stored.refund_reserved(&mut w, 500, a, 100), 50);
        assert!(matches!(
            b.admission(b.debt_at(&w, 500), 100),
            Admission::After(_)
        ));
    }

    #[test]
    fn refunds_below_a_charge_make_it_refund_less() {
        // A and B reserve 100 each; A is refunded in full, so B sits at the bottom and
        // drains by 1 s, not 2 s. At 1.5 s, B has nothing left to give back.
        let b = Bucket {
            rate: 100,
            window_ms: 1_000,
            burst: 200,
        };
        let mut w = [0u64; WORDS];
        let a = b.charge_reserved(&mut w, 0, 100);
        let bb = b.charge_reserved(&mut w, 0, 100);
        assert_eq!(b.refund_reserved(&mut w, 0, a, 100), 100);
        b.charge(&mut w, 1_450, 50);
        assert_eq!(b.refund_reserved(&mut w, 1_500, bb, 100), 0);
        assert_eq!(b.remaining(b.debt_at(&w, 1_500)), 155);
    }

    #[test]
    fn a_rate_change_ends_refunds_of_earlier_charges() {
        let mut w = [0u64; WORDS];
        let r = B.charge_reserved(&mut w, 0, 5);
        let faster = Bucket { rate: 5, ..B };
        faster.charge(&mut w, 0, 0);
        assert_eq!(
            Bucket::as_stored(&w, 1_000).refund_reserved(&mut w, 0, r, 5),
            0
        );
        let r = faster.charge_reserved(&mut w, 0, 1);
        assert_eq!(
            Bucket::as_stored(&w, 1_000).refund_reserved(&mut w, 0, r, 1),
            1
        );
    }

    #[test]
    fn extreme_parameters_do_not_overflow() {
        let b = Bucket {
            rate: u64::MAX,
            window_ms: crate::time::MAX_WINDOW_MS,
            burst: u64::MAX,
        };
        let mut w = [0u64; WORDS];
        b.charge(&mut w, 0, u64::MAX);
        b.charge(&mut w, 0, u64::MAX);
        let debt = b.debt_at(&w, 0);
        assert!(matches!(b.admission(debt, u64::MAX), Admission::After(_)));
        assert_eq!(b.debt_at(&w, u64::MAX), 0);
        let slow = Bucket {
            rate: 1,
            window_ms: crate::time::MAX_WINDOW_MS,
            burst: u64::MAX,
        };
        let mut w = [0u64; WORDS];
        slow.charge(&mut w, 0, u64::MAX);
        assert_eq!(slow.reset_ms(slow.debt_at(&w, 0)), u64::MAX);
    }
}
