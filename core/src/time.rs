//! Durations as written in plan specs, and the windows they define.
//!
//! All times are milliseconds since the Unix epoch (UTC) as `u64`. Fixed windows of
//! whole days, weeks and months are aligned to what people expect (UTC midnight,
//! Monday, the first of the month); other fixed windows are aligned to multiples of
//! their length since the epoch. Calendar arithmetic is integer-only (no leap seconds,
//! as in Unix time).

use std::fmt;

pub const MS_PER_SECOND: u64 = 1_000;
pub const MS_PER_MINUTE: u64 = 60 * MS_PER_SECOND;
pub const MS_PER_HOUR: u64 = 60 * MS_PER_MINUTE;
pub const MS_PER_DAY: u64 = 24 * MS_PER_HOUR;
pub const MS_PER_WEEK: u64 = 7 * MS_PER_DAY;

/// The longest window a limit may have: ten years. Bounds every product of a window
/// and an amount so that rate math stays inside `u128`.
pub const MAX_WINDOW_MS: u64 = 3_650 * MS_PER_DAY;
/// The longest calendar window: ten years of months.
pub const MAX_WINDOW_MONTHS: u32 = 120;

/// The latest instant the module accepts or stores (9999-12-31T23:59:59.999Z). Every
/// stored instant is at most this, so adding any window, TTL or idempotency period
/// (each at most [`MAX_WINDOW_MS`]) to one never overflows.
pub const MAX_INSTANT_MS: u64 = 253_402_300_799_999;

/// The epoch (1970-01-01) was a Thursday; the first Monday is four days later.
const FIRST_MONDAY_MS: u64 = 4 * MS_PER_DAY;

/// A length of time from a plan spec: milliseconds, or calendar months (`mo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Span {
    Millis(u64),
    Months(u32),
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Span::Months(n) => write!(f, "{n}mo"),
            Span::Millis(ms) => {
                for (unit, len) in [
                    ("w", MS_PER_WEEK),
                    ("d", MS_PER_DAY),
                    ("h", MS_PER_HOUR),
                    ("m", MS_PER_MINUTE),
                    ("s", MS_PER_SECOND),
                ] {
                    if ms >= len && ms % len == 0 {
                        return write!(f, "{}{unit}", ms / len);
                    }
                }
                write!(f, "{ms}ms")
            }
        }
    }
}

/// Parses `<digits><unit>` with unit `ms s m h d w mo` (case-insensitive).
/// Zero, overflow and spans longer than ten years are refused.
pub fn parse_span(text: &str) -> Result<Span, String> {
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration '{text}' has no unit (ms, s, m, h, d, w or mo)"))?;
    let (digits, unit) = text.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!("duration '{text}' must start with a number"));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("duration '{text}' is too large"))?;
    if n == 0 {
        return Err(format!("duration '{text}' must be greater than zero"));
    }
    let unit = unit.to_ascii_lowercase();
    let per = match unit.as_str() {
        "mo" => {
            return u32::try_from(n)
                .ok()
                .filter(|&m| m <= MAX_WINDOW_MONTHS)
                .map(Span::Months)
                .ok_or_else(|| format!("duration '{text}' is longer than {MAX_WINDOW_MONTHS}mo"));
        }
        "ms" => 1,
        "s" => MS_PER_SECOND,
        "m" => MS_PER_MINUTE,
        "h" => MS_PER_HOUR,
        "d" => MS_PER_DAY,
        "w" => MS_PER_WEEK,
        _ => {
            return Err(format!(
                "duration '{text}' has unknown unit '{unit}' (expected ms, s, m, h, d, w or mo)"
            ))
        }
    };
    n.checked_mul(per)
        .filter(|&ms| ms <= MAX_WINDOW_MS)
        .map(Span::Millis)
        .ok_or_else(|| format!("duration '{text}' is longer than 3650d"))
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31), proleptic Gregorian.
/// Howard Hinnant's `civil_from_days`, for non-negative day counts.
pub fn civil_from_days(days: u64) -> (u64, u32, u32) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    // day is in 1..=31 and month in 1..=12 by construction.
    (year, month as u32, day as u32)
}

/// (year >= 1970, month 1..=12, day) to days since 1970-01-01. Inverse of
/// [`civil_from_days`].
pub fn days_from_civil(year: u64, month: u32, day: u32) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let yoe = year - era * 400;
    let m = u64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + u64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Months since January 1970 of the instant `t`.
fn month_number(t: u64) -> u64 {
    let (year, month, _) = civil_from_days(t / MS_PER_DAY);
    (year - 1970) * 12 + u64::from(month) - 1
}

/// The instant at which month number `n` (since January 1970) begins.
fn month_start(n: u64) -> u64 {
    let year = 1970 + n / 12;
    let month = (n % 12) as u32 + 1;
    days_from_civil(year, month, 1).saturating_mul(MS_PER_DAY)
}

/// A fixed window: which window an instant falls in, and where windows begin.
///
/// Windows are numbered from the epoch; two instants share a window exactly when
/// their [`FixedWindow::index`] is equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FixedWindow {
    /// `len` milliseconds, shifted so that windows begin at `t ≡ -offset (mod len)`.
    Millis { len: u64, offset: u64 },
    /// `n` calendar months, beginning on the first of a month at UTC midnight.
    Months(u32),
}

impl FixedWindow {
    pub fn new(span: Span) -> Self {
        match span {
            Span::Months(n) => FixedWindow::Months(n.max(1)),
            Span::Millis(len) => {
                let len = len.max(1);
                // Whole weeks begin on a Monday; whole days (and everything else)
                // on multiples of the length since the epoch, i.e. UTC midnight for days.
                let offset = if len % MS_PER_WEEK == 0 {
                    (len - FIRST_MONDAY_MS % len) % len
                } else {
                    0
                };
                FixedWindow::Millis { len, offset }
            }
        }
    }

    pub fn span(&self) -> Span {
        match *self {
            FixedWindow::Millis { len, .. } => Span::Millis(len),
            FixedWindow::Months(n) => Span::Months(n),
        }
    }

    /// The number of the window holding instant `t`.
    pub fn index(&self, t: u64) -> u64 {
        match *self {
            FixedWindow::Millis { len, offset } => t.saturating_add(offset) / len,
            FixedWindow::Months(n) => month_number(t) / u64::from(n),
        }
    }

    /// The instant window `index` begins.
    pub fn start(&self, index: u64) -> u64 {
        match *self {
            FixedWindow::Millis { len, offset } => index.saturating_mul(len).saturating_sub(offset),
            FixedWindow::Months(n) => month_start(index.saturating_mul(u64::from(n))),
        }
    }

    /// The instant the window holding `t` ends (the next one begins).
    pub fn end_of(&self, t: u64) -> u64 {
        self.start(self.index(t).saturating_add(1))
    }
}

/// Where time comes from. The module reads the server clock; tests use [`ManualClock`].
pub trait Clock {
    fn now_ms(&self) -> u64;
}

/// A clock that only moves when told to (and may be stepped backwards).
#[derive(Debug, Default)]
pub struct ManualClock(std::cell::Cell<u64>);

impl ManualClock {
    pub fn new(now_ms: u64) -> Self {
        ManualClock(std::cell::Cell::new(now_ms))
    }
    pub fn set(&self, now_ms: u64) {
        self.0.set(now_ms);
    }
    pub fn advance(&self, ms: u64) {
        self.0.set(self.0.get().saturating_add(ms));
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(year: u64, month: u32, day: u32, hour: u64) -> u64 {
        days_from_civil(year, month, day) * MS_PER_DAY + hour * MS_PER_HOUR
    }

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_span("250ms"), Ok(Span::Millis(250)));
        assert_eq!(parse_span("1s"), Ok(Span::Millis(1_000)));
        assert_eq!(parse_span("1m"), Ok(Span::Millis(60_000)));
        assert_eq!(parse_span("2H"), Ok(Span::Millis(7_200_000)));
        assert_eq!(parse_span("1d"), Ok(Span::Millis(MS_PER_DAY)));
        assert_eq!(parse_span("1w"), Ok(Span::Millis(MS_PER_WEEK)));
        assert_eq!(parse_span("1mo"), Ok(Span::Months(1)));
        assert_eq!(parse_span("3MO"), Ok(Span::Months(3)));
    }

    #[test]
    fn refuses_bad_durations() {
        for bad in [
            "",
            "m",
            "10",
            "0s",
            "1x",
            "1.5s",
            "-1s",
            "99999999999999999999s",
            "3651d",
            "121mo",
        ] {
            assert!(parse_span(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn spans_print_in_their_largest_whole_unit() {
        assert_eq!(Span::Millis(60_000).to_string(), "1m");
        assert_eq!(Span::Millis(90_000).to_string(), "90s");
        assert_eq!(Span::Millis(MS_PER_WEEK * 2).to_string(), "2w");
        assert_eq!(Span::Millis(1_500).to_string(), "1500ms");
        assert_eq!(Span::Months(1).to_string(), "1mo");
    }

    #[test]
    fn civil_round_trips_over_four_centuries() {
        for days in (0..146_097 * 2).step_by(7) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(days_from_civil(2000, 2, 29)), (2000, 2, 29));
        assert_eq!(
            civil_from_days(days_from_civil(2024, 2, 29) + 1),
            (2024, 3, 1)
        );
        assert_eq!(
            civil_from_days(days_from_civil(2100, 2, 28) + 1),
            (2100, 3, 1)
        );
    }

    #[test]
    fn month_windows_follow_the_calendar_including_leap_years() {
        let month = FixedWindow::new(Span::Months(1));
        let feb_2024 = utc(2024, 2, 10, 5);
        assert_eq!(month.start(month.index(feb_2024)), utc(2024, 2, 1, 0));
        assert_eq!(month.end_of(feb_2024), utc(2024, 3, 1, 0));
        assert_eq!(month.end_of(utc(2023, 2, 28, 23)), utc(2023, 3, 1, 0));
        assert_eq!(month.end_of(utc(2023, 12, 31, 23)), utc(2024, 1, 1, 0));
        // The last millisecond of a month and the first of the next are in different windows.
        let march = utc(2024, 3, 1, 0);
        assert_ne!(month.index(march - 1), month.index(march));
    }

    #[test]
    fn quarter_windows_start_in_january_april_july_october() {
        let quarter = FixedWindow::new(Span::Months(3));
        assert_eq!(
            quarter.start(quarter.index(utc(2025, 5, 17, 0))),
            utc(2025, 4, 1, 0)
        );
        assert_eq!(quarter.end_of(utc(2025, 12, 31, 0)), utc(2026, 1, 1, 0));
    }

    #[test]
    fn day_windows_begin_at_utc_midnight_and_weeks_on_monday() {
        let day = FixedWindow::new(Span::Millis(MS_PER_DAY));
        let t = utc(2026, 11, 22, 15);
        assert_eq!(day.start(day.index(t)), utc(2026, 11, 22, 0));
        let week = FixedWindow::new(Span::Millis(MS_PER_WEEK));
        // 2026-11-22 is a Sunday; its week began on Monday 2026-11-16.
        assert_eq!(week.start(week.index(t)), utc(2026, 11, 16, 0));
        assert_eq!(week.end_of(t), utc(2026, 11, 23, 0));
        let fortnight = FixedWindow::new(Span::Millis(2 * MS_PER_WEEK));
        let start = fortnight.start(fortnight.index(t));
        assert_eq!(
            (start / MS_PER_DAY + 3) % 7,
            0,
            "a fortnight begins on a Monday"
        );
    }

    #[test]
    fn short_windows_align_to_the_epoch() {
        let minute = FixedWindow::new(Span::Millis(MS_PER_MINUTE));
        assert_eq!(minute.index(119_999), 1);
        assert_eq!(minute.start(2), 120_000);
        assert_eq!(minute.end_of(120_000), 180_000);
    }

    #[test]
    fn extreme_instants_do_not_overflow() {
        for w in [
            FixedWindow::new(Span::Millis(MS_PER_WEEK)),
            FixedWindow::new(Span::Millis(MAX_WINDOW_MS)),
            FixedWindow::new(Span::Months(120)),
        ] {
            let _ = w.end_of(u64::MAX / 2);
            let _ = w.end_of(0);
        }
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(5);
        clock.advance(10);
        assert_eq!(clock.now_ms(), 15);
        clock.set(3);
        assert_eq!(clock.now_ms(), 3);
    }
}
