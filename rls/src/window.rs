//! Calendar windows in UTC, as the module aligns fixed windows: seconds, minutes and
//! hours since the epoch, days at midnight, weeks on Monday, months on the 1st and
//! years (twelve months) on January 1st. Used for `duration_until_reset` when the
//! module's reply has no running window to report (nothing used yet).

use crate::config::TimeUnit;

const DAY_MS: u64 = 86_400_000;

/// Days since 1970-01-01 to (year, month 1..=12, day), proleptic Gregorian.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + u64::from(month <= 2), month, day)
}

/// (year >= 1970, month 1..=12, day) to days since 1970-01-01.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The instant (unix ms) at which the window holding `now_ms` ends.
pub fn window_end(unit: TimeUnit, now_ms: u64) -> u64 {
    let every = |len: u64| (now_ms / len + 1) * len;
    match unit {
        TimeUnit::Second => every(1000),
        TimeUnit::Minute => every(60_000),
        TimeUnit::Hour => every(3_600_000),
        TimeUnit::Day => every(DAY_MS),
        TimeUnit::Week => {
            // 1970-01-05 was the first Monday.
            let monday = 4 * DAY_MS;
            let week = 7 * DAY_MS;
            if now_ms < monday {
                monday
            } else {
                monday + ((now_ms - monday) / week + 1) * week
            }
        }
        TimeUnit::Month => {
            let (y, m, _) = civil_from_days(now_ms / DAY_MS);
            let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            days_from_civil(y, m, 1) * DAY_MS
        }
        TimeUnit::Year => {
            let (y, _, _) = civil_from_days(now_ms / DAY_MS);
            days_from_civil(y + 1, 1, 1) * DAY_MS
        }
    }
}

/// Now, in unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_windows_end_where_people_expect() {
        // 2026-02-14T10:20:30Z
        let t = days_from_civil(2026, 2, 14) * DAY_MS + 37_230_000;
        assert_eq!(
            window_end(TimeUnit::Day, t),
            days_from_civil(2026, 2, 15) * DAY_MS
        );
        assert_eq!(
            window_end(TimeUnit::Month, t),
            days_from_civil(2026, 3, 1) * DAY_MS
        );
        assert_eq!(
            window_end(TimeUnit::Year, t),
            days_from_civil(2027, 1, 1) * DAY_MS
        );
        // 2026-02-14 is a Saturday: the week ends on Monday the 16th.
        assert_eq!(
            window_end(TimeUnit::Week, t),
            days_from_civil(2026, 2, 16) * DAY_MS
        );
        let dec = days_from_civil(2025, 12, 31) * DAY_MS;
        assert_eq!(
            window_end(TimeUnit::Month, dec),
            days_from_civil(2026, 1, 1) * DAY_MS
        );
        assert_eq!(window_end(TimeUnit::Minute, 61_500), 120_000);
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    }
}
