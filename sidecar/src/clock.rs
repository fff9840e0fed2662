//! Time as Airlock records it: milliseconds since the Unix epoch, and their RFC 3339
//! form for people and agents. Pure apart from reading the system clock; every module
//! that stamps or shows a time uses these two functions.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now: the clock of the queue, the run log and
/// the targets' ledgers. A clock before 1970 reads 0; one past `i64::MAX` ms saturates.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Milliseconds since the epoch as RFC 3339 UTC with milliseconds
/// (`2026-01-02T03:04:05.006Z`); negative values read as the epoch.
pub fn timestamp(ms: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(-5), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(1_767_323_045_006), "2026-01-02T03:04:05.006Z");
    }

    #[test]
    fn now_is_after_the_epoch() {
        assert!(now_ms() > 0);
    }
}
