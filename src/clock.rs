//! The wall clock, read the one way troops reads it. A node whose clock reads before 1970
//! or after 9999 (a dead RTC battery, a bad NTP answer) gets an error naming the time it
//! read, never a panic; times are shown without ever failing to format.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;

/// 9999-12-31T23:59:59Z, the last second RFC 3339 can write.
pub const LAST: u64 = 253_402_300_799;

#[derive(Debug, Error)]
#[error(
    "the system clock reads {0}, outside 1970-01-01..9999-12-31; set the clock (rollout schedules and retries are read against it)"
)]
pub struct ClockError(String);

/// Seconds since 1970 now, if the clock is within what troops can read and write.
pub fn unix_now() -> Result<u64, ClockError> {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) if d.as_secs() <= LAST => Ok(d.as_secs()),
        Ok(d) => Err(ClockError(format!("{} seconds after 1970", d.as_secs()))),
        Err(e) => Err(ClockError(format!(
            "{} seconds before 1970",
            e.duration().as_secs()
        ))),
    }
}

/// `secs` since 1970 as RFC 3339 (UTC, seconds), or `unix time N` past year 9999.
pub fn rfc3339(secs: u64) -> String {
    if secs > LAST {
        return format!("unix time {secs}");
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// Now as RFC 3339, or what the clock reads when it is out of range.
pub fn now_rfc3339() -> String {
    match unix_now() {
        Ok(secs) => rfc3339(secs),
        Err(ClockError(what)) => format!("(clock reads {what})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_at_and_past_the_last_second_format_without_failing() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(LAST), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(LAST + 1), "unix time 253402300800");
        assert_eq!(rfc3339(u64::MAX), format!("unix time {}", u64::MAX));
    }
}
