//! The `ts` field of every JSON event the program prints: when it happened, by the system
//! clock, as RFC 3339 in UTC with milliseconds (`2026-12-06T05:08:53.123Z`).

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Adds `ts` (now) to a JSON event object, unless it has one (a line relayed from another
/// process keeps that process's time).
pub(crate) fn stamp(event: &mut Value) {
    if let Some(map) = event.as_object_mut() {
        if !map.contains_key("ts") {
            map.insert("ts".into(), rfc3339(SystemTime::now()).into());
        }
    }
}

/// `at` as RFC 3339 in UTC with milliseconds; a time before 1970 reads as the epoch.
pub(crate) fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn formats_utc_with_milliseconds() {
        let at = |secs: u64, ms: u64| {
            rfc3339(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day of a century divisible by 400) 23:59:59.999.
        assert_eq!(at(951_868_799, 999), "2000-02-29T23:59:59.999Z");
        assert_eq!(at(1_700_000_000, 42), "2023-11-14T22:13:20.042Z");
        // 2100 is no leap year: 28 February is followed by 1 March.
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000Z");
        let mut event = serde_json::json!({ "event": "x" });
        stamp(&mut event);
        assert!(event["ts"].as_str().is_some_and(|t| t.ends_with('Z')));
        let mut relayed = serde_json::json!({ "ts": "then" });
        stamp(&mut relayed);
        assert_eq!(relayed["ts"], "then");
    }
}
