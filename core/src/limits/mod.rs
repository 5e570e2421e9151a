//! The three metering algorithms, as pure functions over a slot's state words.
//!
//! Vocabulary, used the same way everywhere:
//! - *capacity*: the most a limit admits (per window, or the bucket's burst);
//! - *used*: what counts against the capacity at an instant;
//! - *remaining*: `capacity - used`, never below zero;
//! - *retry after*: the shortest wait after which the same call would be admitted if
//!   nothing else were charged — exact, rounded up to the millisecond, never early;
//! - *reset*: the wait until the limit is back to full capacity with no further use;
//! - *idle at*: the instant from which the state words are all zero again, i.e. the
//!   slot can be forgotten (it drives the key's expiry).
//!
//! Every function takes the instant `now` explicitly (the injected clock). Callers
//! guarantee `now >= updated`, the subject's high-water mark, so a clock that steps
//! backwards is seen as time standing still and never admits more.

pub mod bucket;
pub mod fixed;
pub mod sliding;

use crate::layout::Shape;

/// Whether a cost can be admitted, and if not, when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Now,
    /// Admitted after this many milliseconds if nothing else is charged.
    After(u64),
    /// Never, under this limit: the cost exceeds its capacity.
    Never,
}

impl Admission {
    pub fn is_now(self) -> bool {
        self == Admission::Now
    }

    /// The later of two admissions: a call is admitted when every limit admits it.
    pub fn and(self, other: Admission) -> Admission {
        match (self, other) {
            (Admission::Never, _) | (_, Admission::Never) => Admission::Never,
            (Admission::After(a), Admission::After(b)) => Admission::After(a.max(b)),
            (Admission::After(a), Admission::Now) | (Admission::Now, Admission::After(a)) => {
                Admission::After(a)
            }
            (Admission::Now, Admission::Now) => Admission::Now,
        }
    }

    /// Whether `self` admits later than `other` (never is the latest).
    pub fn is_later_than(self, other: Admission) -> bool {
        match (self, other) {
            (Admission::Now, _) | (_, Admission::Never) => false,
            (Admission::Never, _) | (_, Admission::Now) => true,
            (Admission::After(a), Admission::After(b)) => a > b,
        }
    }

    /// `retry_after_ms` as replied: 0 now, -1 never.
    pub fn retry_after_ms(self) -> i64 {
        match self {
            Admission::Now => 0,
            Admission::After(ms) => i64::try_from(ms).unwrap_or(i64::MAX),
            Admission::Never => -1,
        }
    }
}

/// The usage a slot of `shape` holds at `now`, in whole units (a bucket's debt
/// rounded up), as carried into another shape.
pub fn used_units(shape: Shape, words: &[u64], updated: u64, now: u64) -> u64 {
    match shape {
        Shape::Fixed { window } => fixed::used_at(words, window, updated, now),
        Shape::Sliding {
            window_ms,
            precision,
        } => to_u64(
            sliding::Slices {
                window_ms,
                precision,
            }
            .used_at(words, updated, now),
        ),
        Shape::Bucket { window_ms } => {
            let bucket = bucket::Bucket::as_stored(words, window_ms);
            to_u64(bucket.used(bucket.debt_at(words, now)))
        }
        Shape::Concurrency => words.first().copied().unwrap_or(0),
    }
}

/// Adds `units` of usage charged at `now` to words of `shape` (normalized to `now`);
/// a bucket drains at `rate` (its plan's, or the rate it was last charged at).
pub fn add_units(shape: Shape, rate: u64, words: &mut [u64], now: u64, units: u64) {
    match shape {
        Shape::Fixed { .. } | Shape::Concurrency => fixed::charge(words, units),
        Shape::Sliding {
            window_ms,
            precision,
        } => sliding::Slices {
            window_ms,
            precision,
        }
        .charge(words, now, units),
        Shape::Bucket { window_ms } => bucket::Bucket {
            rate: rate.max(1),
            window_ms,
            burst: 0,
        }
        .charge(words, now, units),
    }
}

/// Carries a budget's usage from one shape into another (a plan changed how it
/// counts the budget): `to_words` (zeroed) get the usage the old words hold at `now`,
/// counted as if charged at `now` — conservatively, for the whole of the new window,
/// or draining from now on. So a change of algorithm or window never forgets usage,
/// and never lets more through than either shape would on its own.
pub fn carry_over(
    from: (Shape, &[u64]),
    updated: u64,
    to: (Shape, u64),
    now: u64,
    to_words: &mut [u64],
) {
    let units = used_units(from.0, from.1, updated, now);
    add_units(to.0, to.1, to_words, now, units);
}

/// `used` has reached `pct`% of `capacity` (and something has been used).
pub fn past_warn(used: u128, capacity: u128, pct: Option<u8>) -> bool {
    match pct {
        Some(pct) => {
            used > 0 && used.saturating_mul(100) >= capacity.saturating_mul(u128::from(pct))
        }
        None => false,
    }
}

/// `a / b` (`u128::MAX` for `b == 0`), in 64 bits when both fit: a 128-bit
/// division costs several times more and the operands are almost always small.
pub(crate) fn div(a: u128, b: u128) -> u128 {
    match (u64::try_from(a), u64::try_from(b)) {
        (_, Ok(0)) => u128::MAX,
        (Ok(a), Ok(b)) => u128::from(a / b),
        _ if b == 0 => u128::MAX,
        _ => a / b,
    }
}

/// `ceil(a / b)` (`u128::MAX` for `b == 0`).
pub(crate) fn div_ceil(a: u128, b: u128) -> u128 {
    let q = div(a, b);
    if q == u128::MAX || q.saturating_mul(b) == a {
        q
    } else {
        q + 1
    }
}

/// Clamps a `u128` into `u64`.
pub(crate) fn to_u64(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admissions_combine_to_the_latest() {
        assert_eq!(Admission::Now.and(Admission::After(5)), Admission::After(5));
        assert_eq!(
            Admission::After(9).and(Admission::After(5)),
            Admission::After(9)
        );
        assert_eq!(Admission::After(9).and(Admission::Never), Admission::Never);
        assert_eq!(Admission::Now.and(Admission::Now), Admission::Now);
        assert_eq!(Admission::Never.retry_after_ms(), -1);
        assert_eq!(Admission::After(u64::MAX).retry_after_ms(), i64::MAX);
    }

    #[test]
    fn warn_needs_some_use_and_the_threshold() {
        assert!(!past_warn(0, 0, Some(80)));
        assert!(!past_warn(79, 100, Some(80)));
        assert!(past_warn(80, 100, Some(80)));
        assert!(!past_warn(100, 100, None));
        assert!(past_warn(u128::MAX, u128::MAX, Some(100)));
    }

    #[test]
    fn div_ceil_rounds_up() {
        assert_eq!(div_ceil(10, 5), 2);
        assert_eq!(div_ceil(11, 5), 3);
        assert_eq!(div_ceil(0, 5), 0);
        assert_eq!(div_ceil(1, 0), u128::MAX);
    }
}
