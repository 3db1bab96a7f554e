//! When a failed deploy may be tried again: the delay doubles from `retry_min` to
//! `retry_max` with every failure of the same commit; a newer commit starts afresh.

use serde::{Deserialize, Serialize};

use crate::repo::CommitId;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryState {
    pub commit: CommitId,
    pub failures: u32,
    /// Unix seconds of the last failure.
    pub last_failure: u64,
}

/// Seconds to wait after the `failures`-th failure.
pub fn delay(failures: u32, min: u64, max: u64) -> u64 {
    let doublings = failures.saturating_sub(1).min(63);
    min.saturating_mul(1u64 << doublings).min(max)
}

/// `None` when `commit` may be deployed at `now`, else the unix time it may be retried.
pub fn retry_at(
    state: Option<&RetryState>,
    commit: CommitId,
    now: u64,
    min: u64,
    max: u64,
) -> Option<u64> {
    let state = state.filter(|s| s.commit == commit)?;
    // A failure recorded while the clock was wrong (a century ahead) must not freeze retries
    // until then: one in the future is retried now, and a retry that fails again is recorded
    // with the clock as it is.
    if state.last_failure > now {
        return None;
    }
    let at = state
        .last_failure
        .saturating_add(delay(state.failures, min, max));
    (now < at).then_some(at)
}

/// The state after a failed attempt at `commit`.
pub fn record_failure(state: Option<&RetryState>, commit: CommitId, now: u64) -> RetryState {
    let failures = match state {
        Some(s) if s.commit == commit => s.failures + 1,
        _ => 1,
    };
    RetryState {
        commit,
        failures,
        last_failure: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: u8) -> CommitId {
        format!("{n:040x}").parse().unwrap()
    }

    #[test]
    fn doubles_up_to_the_cap() {
        let d: Vec<u64> = (1..=8).map(|f| delay(f, 60, 3600)).collect();
        assert_eq!(d, vec![60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(delay(200, 60, 3600), 3600);
    }

    #[test]
    fn same_commit_waits_newer_commit_does_not() {
        let s = record_failure(None, c(1), 1000);
        assert_eq!(retry_at(Some(&s), c(1), 1010, 60, 3600), Some(1060));
        assert_eq!(retry_at(Some(&s), c(1), 1060, 60, 3600), None);
        assert_eq!(retry_at(Some(&s), c(2), 1010, 60, 3600), None);
        let s2 = record_failure(Some(&s), c(1), 1060);
        assert_eq!(s2.failures, 2);
        assert_eq!(retry_at(Some(&s2), c(1), 1100, 60, 3600), Some(1180));
        assert_eq!(record_failure(Some(&s2), c(2), 1100).failures, 1);
    }

    #[test]
    fn a_failure_from_a_clock_far_ahead_is_retried_now() {
        let century = 100 * 365 * 86_400;
        let state = record_failure(None, c(1), 1_000 + century);
        assert_eq!(retry_at(Some(&state), c(1), 1_000, 60, 3600), None);
        let state = RetryState {
            commit: c(1),
            failures: 9,
            last_failure: u64::MAX - 5,
        };
        assert_eq!(retry_at(Some(&state), c(1), 0, 60, 3600), None);
        // An ordinary failure still waits, and no sum overflows.
        let again = record_failure(Some(&state), c(1), 1_000);
        assert_eq!(retry_at(Some(&again), c(1), 1_000, 60, 3600), Some(4_600));
        let first = record_failure(None, c(1), 1_000);
        assert_eq!(retry_at(Some(&first), c(1), 1_000, 60, 3600), Some(1_060));
    }
}
