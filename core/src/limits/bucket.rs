//! Token buckets, as GCRA in exact integer arithmetic.
//!
//! A bucket refills `rate` units per `window` and holds at most `burst`. Instead of a
//! fractional theoretical arrival time we keep the *debt*: how far the bucket is below
//! full, in unit-milliseconds scaled by the window (`debt = (burst - tokens) * window`).
//! Charging `c` adds `c * window`; every millisecond drains `rate`. Then
//! `tat - now = debt / rate` exactly, and every comparison is an integer one:
//! a cost `c` is admitted when `debt + c * window <= burst * window`.
//!
//! State: four words — the instant of the last update, the debt as a `u128` (low word
//! first), and the rate it was last charged at. Decisions drain at the plan's current
//! rate (a plan may change it and usage carries over); the stored rate lets the state
//! say when it will be idle, and be settled, without the plan.

use super::{div, div_ceil, to_u64, Admission};

/// The parameters of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub rate: u64,
    pub window_ms: u64,
    pub burst: u64,
}

/// Words a bucket's state takes.
pub const WORDS: usize = 4;

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

impl Bucket {
    fn write(&self, words: &mut [u64], t0: u64, debt: u128) {
        if let [w0, lo, hi, rate, ..] = words {
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

    /// Gives back up to `amount` at `now`; a bucket already full stays full.
    pub fn refund(&self, words: &mut [u64], now: u64, amount: u64) {
        let debt = self.debt_at(words, now);
        self.write(
            words,
            now,
            debt.saturating_sub(u128::from(amount) * u128::from(self.window_ms)),
        );
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
        let mut w = [0u64; 4];
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
        let mut w = [0u64; 4];
        b.charge(&mut w, 0, 1);
        let debt = b.debt_at(&w, 0);
        assert_eq!(b.admission(debt, 1), Admission::After(334));
        assert_eq!(b.admission(b.debt_at(&w, 333), 1), Admission::After(1));
        assert_eq!(b.admission(b.debt_at(&w, 334), 1), Admission::Now);
    }

    #[test]
    fn refunds_and_overruns() {
        let mut w = [0u64; 4];
        B.charge(&mut w, 0, 5);
        B.refund(&mut w, 0, 2);
        assert_eq!(B.remaining(B.debt_at(&w, 0)), 2);
        B.charge(&mut w, 0, 10); // an overrun past the burst
        assert_eq!(B.remaining(B.debt_at(&w, 0)), 0);
        assert_eq!(B.admission(B.debt_at(&w, 0), 0), Admission::After(8_000));
        B.refund(&mut w, 100_000, 100);
        assert_eq!(B.debt_at(&w, 100_000), 0);
    }

    #[test]
    fn extreme_parameters_do_not_overflow() {
        let b = Bucket {
            rate: u64::MAX,
            window_ms: crate::time::MAX_WINDOW_MS,
            burst: u64::MAX,
        };
        let mut w = [0u64; 4];
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
        let mut w = [0u64; 4];
        slow.charge(&mut w, 0, u64::MAX);
        assert_eq!(slow.reset_ms(slow.debt_at(&w, 0)), u64::MAX);
    }
}
