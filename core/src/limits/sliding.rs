//! Sliding windows kept as `precision` slices.
//!
//! Time is cut into slices of `window / precision` (slice `x` begins at
//! `ceil(x * window / precision)`). At instant `t` in slice `s`, usage is the total of
//! slices `s - precision ..= s`: `precision + 1` slices that together cover at least
//! the trailing window `[t - window, t]`. So no trailing window ever holds more than
//! the capacity, and a denial is conservative by at most the one oldest slice.
//!
//! State: a ring of `precision + 1` words; slice `x` lives at `x % (precision + 1)`,
//! and the newest slice is the one holding the subject's `updated` instant.

use super::{div_ceil, to_u64, Admission};

/// The geometry of one sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slices {
    pub window_ms: u64,
    pub precision: u32,
}

impl Slices {
    fn ring_len(&self) -> u64 {
        u64::from(self.precision) + 1
    }

    /// The slice holding instant `t`.
    pub fn slice_of(&self, t: u64) -> u64 {
        let k = u64::from(self.precision.max(1));
        let window = self.window_ms.max(1);
        if window.is_multiple_of(k) {
            // Whole-millisecond slices (the usual case): one 64-bit division.
            t / (window / k)
        } else {
            to_u64(u128::from(t) * u128::from(k) / u128::from(window))
        }
    }

    /// The instant slice `x` begins.
    pub fn slice_start(&self, x: u64) -> u64 {
        let k = u64::from(self.precision.max(1));
        if self.window_ms.is_multiple_of(k) {
            x.saturating_mul(self.window_ms / k)
        } else {
            to_u64(div_ceil(
                u128::from(x) * u128::from(self.window_ms),
                u128::from(k),
            ))
        }
    }

    /// The recorded slices still counted at `now`, newest first, as `(slice, total)`.
    /// The newest recorded slice is the one holding `updated`; slices after it are
    /// empty, and at most `precision + 1` slices (none before slice 0) are counted.
    fn counted<'w>(
        &self,
        words: &'w [u64],
        updated: u64,
        now: u64,
    ) -> impl DoubleEndedIterator<Item = (u64, u64)> + 'w {
        let ring = self.ring_len() as usize;
        let newest = self.slice_of(updated);
        let shift = self.slice_of(now).saturating_sub(newest);
        let k = u64::from(self.precision);
        let count = if shift > k {
            0
        } else {
            (k - shift).min(newest) + 1
        };
        let top = usize::try_from(newest % self.ring_len()).unwrap_or(0);
        (0..count as usize).map(move |j| {
            // Walk the ring backwards from the newest slice, wrapping once.
            let i = if j <= top { top - j } else { top + ring - j };
            (newest - j as u64, words.get(i).copied().unwrap_or(0))
        })
    }

    /// Usage at `now` of a slot last normalized at `updated`.
    pub fn used_at(&self, words: &[u64], updated: u64, now: u64) -> u128 {
        self.counted(words, updated, now)
            .map(|(_, total)| u128::from(total))
            .sum()
    }

    /// Whether `cost` fits on top of `used` (the usage at `now`), and if not, when the
    /// oldest slices will have slid out far enough for it to fit.
    pub fn admission(
        &self,
        words: &[u64],
        updated: u64,
        now: u64,
        used: u128,
        cost: u64,
        capacity: u64,
    ) -> Admission {
        if cost > capacity {
            return Admission::Never;
        }
        let (cost, capacity) = (u128::from(cost), u128::from(capacity));
        if used + cost <= capacity {
            return Admission::Now;
        }
        // Slice y stops counting when slice y + precision + 1 begins; drop oldest first.
        let mut left = used;
        let mut last_drop = None;
        for (y, total) in self.counted(words, updated, now).rev() {
            left -= u128::from(total);
            if left + cost <= capacity {
                last_drop = Some(y);
                break;
            }
        }
        match last_drop {
            Some(y) => Admission::After(self.slice_start(y + self.ring_len()).saturating_sub(now)),
            // Unreachable with cost <= capacity: with every slice gone, usage is zero.
            None => Admission::Never,
        }
    }

    /// Time until every counted slice (plus `pending` about to be charged now) has slid out.
    pub fn reset_ms(&self, words: &[u64], updated: u64, now: u64, pending: u64) -> u64 {
        let last_used = if pending > 0 {
            Some(self.slice_of(now))
        } else {
            self.counted(words, updated, now)
                .find(|&(_, total)| total > 0)
                .map(|(y, _)| y)
        };
        match last_used {
            Some(y) => self.slice_start(y + self.ring_len()).saturating_sub(now),
            None => 0,
        }
    }

    /// Moves the ring from `updated` to `now`, clearing slices that have slid out.
    pub fn normalize(&self, words: &mut [u64], updated: u64, now: u64) {
        let (from, to) = (self.slice_of(updated), self.slice_of(now));
        let shift = to.saturating_sub(from);
        if shift == 0 {
            return;
        }
        if shift >= self.ring_len() {
            words.fill(0);
            return;
        }
        let ring = words.len();
        let mut i = usize::try_from(from % self.ring_len()).unwrap_or(0);
        for _ in 0..shift {
            i = if i + 1 == ring { 0 } else { i + 1 };
            if let Some(w) = words.get_mut(i) {
                *w = 0;
            }
        }
    }

    /// Adds `amount` to the slice of `now` (the ring is normalized to `now`).
    pub fn charge(&self, words: &mut [u64], now: u64, amount: u64) {
        self.add_to_slice(words, self.slice_of(now), amount, true);
    }

    /// Takes up to `amount` back from slice `x`, if it is still counted at `now`
    /// (the ring is normalized to `now`). A slice that has slid out changes nothing.
    pub fn refund(&self, words: &mut [u64], now: u64, x: u64, amount: u64) {
        let s_now = self.slice_of(now);
        if x <= s_now && s_now - x <= u64::from(self.precision) {
            self.add_to_slice(words, x, amount, false);
        }
    }

    /// Adds an overrun to slice `x` if it is still counted at `now`.
    pub fn overrun(&self, words: &mut [u64], now: u64, x: u64, amount: u64) {
        let s_now = self.slice_of(now);
        if x <= s_now && s_now - x <= u64::from(self.precision) {
            self.add_to_slice(words, x, amount, true);
        }
    }

    fn add_to_slice(&self, words: &mut [u64], x: u64, amount: u64, add: bool) {
        if let Some(w) = usize::try_from(x % self.ring_len())
            .ok()
            .and_then(|i| words.get_mut(i))
        {
            *w = if add {
                w.saturating_add(amount)
            } else {
                w.saturating_sub(amount)
            };
        }
    }

    /// The instant from which every slice recorded up to `updated` has slid out.
    pub fn idle_at(&self, words: &[u64], updated: u64) -> Option<u64> {
        self.counted(words, updated, updated)
            .find(|&(_, total)| total > 0)
            .map(|(y, _)| self.slice_start(y + self.ring_len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10 per minute in 6 slices of 10 s.
    const S: Slices = Slices {
        window_ms: 60_000,
        precision: 6,
    };
    const T0: u64 = 6_000_000; // a slice boundary (slice 600)

    fn fresh() -> Vec<u64> {
        vec![0; 7]
    }

    #[test]
    fn admits_up_to_capacity_then_waits_for_the_oldest_slice() {
        let mut w = fresh();
        S.charge(&mut w, T0 + 1_000, 4); // slice 600
        S.normalize(&mut w, T0 + 1_000, T0 + 25_000);
        S.charge(&mut w, T0 + 25_000, 6); // slice 602
        let now = T0 + 25_000;
        assert_eq!(S.used_at(&w, now, now), 10);
        assert_eq!(
            S.admission(&w, now, now, S.used_at(&w, now, now), 0, 10),
            Admission::Now
        );
        // Slice 600 stops counting when slice 607 begins (at T0 + 70 s).
        assert_eq!(
            S.admission(&w, now, now, S.used_at(&w, now, now), 1, 10),
            Admission::After(45_000)
        );
        assert_eq!(
            S.admission(&w, now, now, S.used_at(&w, now, now), 4, 10),
            Admission::After(45_000)
        );
        // Five needs slice 602 gone too, at T0 + 90 s.
        assert_eq!(
            S.admission(&w, now, now, S.used_at(&w, now, now), 5, 10),
            Admission::After(65_000)
        );
        assert_eq!(
            S.admission(&w, now, now, S.used_at(&w, now, now), 11, 10),
            Admission::Never
        );
        assert_eq!(S.reset_ms(&w, now, now, 0), 65_000);
        assert_eq!(S.idle_at(&w, now), Some(T0 + 90_000));
        // At T0 + 70 s, the first four have slid out.
        assert_eq!(S.used_at(&w, now, T0 + 70_000), 6);
        assert_eq!(S.used_at(&w, now, T0 + 69_999), 10);
    }

    #[test]
    fn normalizing_far_ahead_clears_the_ring() {
        let mut w = fresh();
        S.charge(&mut w, T0, 3);
        S.normalize(&mut w, T0, T0 + 10 * 60_000);
        assert_eq!(w, fresh());
        assert_eq!(S.idle_at(&w, T0 + 600_000), None);
    }

    #[test]
    fn refunds_only_reach_slices_still_counted() {
        let mut w = fresh();
        S.charge(&mut w, T0, 5);
        let later = T0 + 80_000;
        S.normalize(&mut w, T0, later);
        S.refund(&mut w, later, S.slice_of(T0), 5);
        assert_eq!(S.used_at(&w, later, later), 0);
        let mut w = fresh();
        S.charge(&mut w, T0, 5);
        S.normalize(&mut w, T0, T0 + 30_000);
        S.refund(&mut w, T0 + 30_000, S.slice_of(T0), 2);
        assert_eq!(S.used_at(&w, T0 + 30_000, T0 + 30_000), 3);
        S.overrun(&mut w, T0 + 30_000, S.slice_of(T0), 9);
        assert_eq!(S.used_at(&w, T0 + 30_000, T0 + 30_000), 12);
    }

    #[test]
    fn uneven_slices_round_their_starts_up() {
        let s = Slices {
            window_ms: 1_000,
            precision: 3,
        };
        assert_eq!(s.slice_start(1), 334);
        assert_eq!(s.slice_of(333), 0);
        assert_eq!(s.slice_of(334), 1);
        assert_eq!(s.slice_start(3), 1_000);
    }

    #[test]
    fn instants_near_the_epoch_have_no_negative_slices() {
        let mut w = fresh();
        S.charge(&mut w, 0, 10);
        assert_eq!(S.used_at(&w, 0, 0), 10);
        assert_eq!(
            S.admission(&w, 0, 0, S.used_at(&w, 0, 0), 1, 10),
            Admission::After(70_000)
        );
    }

    #[test]
    fn extreme_amounts_do_not_overflow() {
        let mut w = fresh();
        for _ in 0..7 {
            S.charge(&mut w, T0, u64::MAX);
        }
        assert_eq!(S.used_at(&w, T0, T0), u128::from(u64::MAX));
        assert_eq!(
            S.admission(&w, T0, T0, S.used_at(&w, T0, T0), u64::MAX, u64::MAX),
            Admission::After(70_000)
        );
        let huge = Slices {
            window_ms: crate::time::MAX_WINDOW_MS,
            precision: 600,
        };
        let words = [u64::MAX; 601];
        let used = huge.used_at(&words, u64::MAX / 2, u64::MAX / 2);
        let _ = huge.admission(&words, u64::MAX / 2, u64::MAX / 2, used, 1, 1);
    }
}
