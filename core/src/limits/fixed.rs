//! Fixed windows: one counter per aligned window (see [`FixedWindow`]).
//!
//! State: one word, the usage of the window that holds the subject's `updated`
//! instant. A later window starts from zero.

use super::Admission;
use crate::time::FixedWindow;

/// Usage at `now` of a slot last normalized at `updated`.
pub fn used_at(words: &[u64], window: FixedWindow, updated: u64, now: u64) -> u64 {
    if window.index(updated) == window.index(now) {
        words.first().copied().unwrap_or(0)
    } else {
        0
    }
}

/// Whether `cost` fits with `used` already counted this window.
pub fn admission(used: u64, cost: u64, capacity: u64, window: FixedWindow, now: u64) -> Admission {
    if cost > capacity {
        Admission::Never
    } else if used
        .checked_add(cost)
        .is_some_and(|total| total <= capacity)
    {
        Admission::Now
    } else {
        // The next window starts empty and cost <= capacity.
        Admission::After(window.end_of(now).saturating_sub(now))
    }
}

/// Time until the window is back to full capacity.
pub fn reset_ms(used: u64, window: FixedWindow, now: u64) -> u64 {
    if used == 0 {
        0
    } else {
        window.end_of(now).saturating_sub(now)
    }
}

/// Moves the state from `updated` to `now` (a new window starts at zero).
pub fn normalize(words: &mut [u64], window: FixedWindow, updated: u64, now: u64) {
    if window.index(updated) != window.index(now) {
        words.fill(0);
    }
}

/// Adds `amount` (already normalized to now). Saturates: an overrun may exceed
/// capacity but never wraps.
pub fn charge(words: &mut [u64], amount: u64) {
    if let Some(used) = words.first_mut() {
        *used = used.saturating_add(amount);
    }
}

/// Removes up to `amount` from the current window.
pub fn refund(words: &mut [u64], amount: u64) {
    if let Some(used) = words.first_mut() {
        *used = used.saturating_sub(amount);
    }
}

/// The instant from which the slot is all zeros again.
pub fn idle_at(words: &[u64], window: FixedWindow, updated: u64) -> Option<u64> {
    match words.first() {
        Some(&used) if used > 0 => Some(window.end_of(updated)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Span;

    const MINUTE: FixedWindow = FixedWindow::Millis {
        len: 60_000,
        offset: 0,
    };

    #[test]
    fn table_of_admissions() {
        let t = 60_000 * 10 + 15_000; // 15 s into a minute
        for (used, cost, capacity, expected) in [
            (0, 0, 10, Admission::Now),
            (10, 0, 10, Admission::Now),
            (11, 0, 10, Admission::After(45_000)),
            (0, 10, 10, Admission::Now),
            (1, 10, 10, Admission::After(45_000)),
            (0, 11, 10, Admission::Never),
            (0, 1, 0, Admission::Never),
            (0, 0, 0, Admission::Now),
            (u64::MAX, 1, u64::MAX, Admission::After(45_000)),
            (u64::MAX - 1, 1, u64::MAX, Admission::Now),
            (0, u64::MAX, u64::MAX, Admission::Now),
        ] {
            assert_eq!(
                admission(used, cost, capacity, MINUTE, t),
                expected,
                "used {used} cost {cost} cap {capacity}"
            );
        }
    }

    #[test]
    fn usage_belongs_to_its_window() {
        let words = [7];
        assert_eq!(used_at(&words, MINUTE, 60_000, 119_999), 7);
        assert_eq!(used_at(&words, MINUTE, 60_000, 120_000), 0);
        let mut w = words;
        normalize(&mut w, MINUTE, 60_000, 120_000);
        assert_eq!(w, [0]);
    }

    #[test]
    fn reset_and_idle_are_the_window_end() {
        assert_eq!(reset_ms(0, MINUTE, 61_000), 0);
        assert_eq!(reset_ms(3, MINUTE, 61_000), 59_000);
        assert_eq!(idle_at(&[3], MINUTE, 61_000), Some(120_000));
        assert_eq!(idle_at(&[0], MINUTE, 61_000), None);
        let month = FixedWindow::new(Span::Months(1));
        assert!(idle_at(&[1], month, 0).is_some_and(|t| t == 31 * 86_400_000));
    }

    #[test]
    fn charges_saturate_and_refunds_floor_at_zero() {
        let mut w = [u64::MAX - 1];
        charge(&mut w, 5);
        assert_eq!(w, [u64::MAX]);
        refund(&mut w, u64::MAX);
        assert_eq!(w, [0]);
        refund(&mut w, 1);
        assert_eq!(w, [0]);
    }
}
