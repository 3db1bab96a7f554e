//! Staged rollout ("green/blue"): a commit may carry
//!
//! ```text
//! Troops-Rollout: 10%
//! Troops-Rollout: 10%, 50% after 1h, 100% after 6h
//! ```
//!
//! Each node has a stable bucket in [0, 100). Which trailers govern a commit, and so which
//! commit a node takes, is decided in `advance` with the other gates. Everything here is
//! pure: trailers, schedules, buckets.

use std::time::Duration;

use sha2::{Digest, Sha256};

pub const TRAILER: &str = "Troops-Rollout";

/// A schedule: `(seconds after the commit, percent of the fleet)`, times non-decreasing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub steps: Vec<(u64, u8)>,
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let mut steps = Vec::new();
        for (i, raw) in text.split(',').enumerate() {
            let step = raw.trim();
            let (pct, after) = match step.split_once(" after ") {
                Some((p, a)) => (p.trim(), Some(a.trim())),
                None => (step, None),
            };
            let number = pct
                .strip_suffix('%')
                .ok_or_else(|| format!("step {:?}: expected a percentage like 10%", step))?;
            let percent: u8 = number
                .trim()
                .parse()
                .ok()
                .filter(|p| *p <= 100)
                .ok_or_else(|| {
                    format!("step {step:?}: {pct} is not a whole percentage from 0% to 100%")
                })?;
            let offset = match after {
                None if i == 0 => 0,
                None => {
                    return Err(format!(
                        "step {step:?}: every step after the first needs `after <duration>`"
                    ));
                }
                Some(d) => humantime::parse_duration(d)
                    .map_err(|e| {
                        format!("step {step:?}: {d:?} is not a duration like 30m, 1h or 2d ({e})")
                    })?
                    .as_secs(),
            };
            if let Some(&(prev_offset, prev_pct)) = steps.last() {
                if offset < prev_offset {
                    return Err(format!(
                        "step {step:?} comes earlier than the step before it"
                    ));
                }
                if percent < prev_pct {
                    return Err(format!(
                        "step {step:?} shrinks the rollout; a schedule only grows"
                    ));
                }
            }
            steps.push((offset, percent));
        }
        Ok(Schedule { steps })
    }

    /// The share admitted `elapsed` seconds after the commit (0 before its first step).
    pub fn percent_at(&self, elapsed: u64) -> u8 {
        self.steps
            .iter()
            .filter(|(offset, _)| *offset <= elapsed)
            .map(|(_, p)| *p)
            .max()
            .unwrap_or(0)
    }

    /// Seconds after the commit when `bucket` is first admitted; `None`: never.
    pub fn admits_after(&self, bucket: u8) -> Option<u64> {
        self.steps
            .iter()
            .find(|(_, p)| bucket < *p)
            .map(|(offset, _)| *offset)
    }
}

/// The `Troops-Rollout` trailer of a commit message: `None` without one, `Some(Err)` when it
/// is malformed (which holds the commit: a typo must never release to everyone).
pub fn trailer(message: &str) -> Option<Result<Schedule, String>> {
    // Trailers live in the message's last paragraph.
    let last = message.trim_end().rsplit("\n\n").next().unwrap_or("");
    let values: Vec<&str> = last
        .lines()
        .filter_map(|l| {
            let (key, value) = l.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(TRAILER)
                .then_some(value.trim())
        })
        .collect();
    match values.as_slice() {
        [] => None,
        [one] => Some(Schedule::parse(one).map_err(|e| format!("{TRAILER}: {e}"))),
        _ => Some(Err(format!(
            "{TRAILER} appears {} times; give one schedule",
            values.len()
        ))),
    }
}

/// A node's stable bucket in [0, 100), from its /etc/machine-id.
pub fn bucket(machine_id: &str) -> u8 {
    let digest = Sha256::digest(format!("troops-rollout\0{}", machine_id.trim()).as_bytes());
    let n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    (n % 100) as u8
}

/// When a hold lifts, for people: `from <RFC 3339>`, or `never` past what a calendar date
/// can show (year 9999; a schedule of `100% after 1000000y` or a commit dated year 10000).
pub fn eligible_text(at: i64) -> String {
    match u64::try_from(at) {
        _ if at > crate::clock::LAST as i64 => "never".into(),
        Ok(secs) => format!("from {}", crate::clock::rfc3339(secs)),
        Err(_) => "now".into(),
    }
}

pub fn human_delay(seconds: i64) -> String {
    humantime::format_duration(Duration::from_secs(seconds.max(0) as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailer_grammar() {
        assert_eq!(Schedule::parse("10%").unwrap().steps, vec![(0, 10)]);
        assert_eq!(
            Schedule::parse("10%, 50% after 1h, 100% after 6h")
                .unwrap()
                .steps,
            vec![(0, 10), (3600, 50), (21600, 100)]
        );
        assert_eq!(Schedule::parse("0%").unwrap().steps, vec![(0, 0)]);
        for bad in [
            "10",
            "110%",
            "ten%",
            "10%, 50%",
            "10%, 50% after soon",
            "50%, 10% after 1h",
            "10%, 50% after 2h, 60% after 1h",
            "",
            "-5%",
        ] {
            assert!(Schedule::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn trailers_in_messages() {
        let m = "Deploy nginx 1.26\n\nLonger text.\n\nTroops-Rollout: 10%, 100% after 1h\nSigned-off-by: x\n";
        assert_eq!(
            trailer(m).unwrap().unwrap().steps,
            vec![(0, 10), (3600, 100)]
        );
        assert!(trailer("Fix\n\nNo trailer here\n").is_none());
        // A trailer-looking line in the body, not the last paragraph, is not a trailer.
        assert!(trailer("Fix\n\nTroops-Rollout: 10%\n\nMore text\n").is_none());
        assert!(
            trailer("Fix\n\nTroops-Rollout: 10 percent\n")
                .unwrap()
                .is_err()
        );
        assert!(
            trailer("Fix\n\nTroops-Rollout: 10%\nTroops-Rollout: 20%\n")
                .unwrap()
                .is_err()
        );
    }

    #[test]
    fn schedule_over_time() {
        let s = Schedule::parse("10%, 50% after 1h, 100% after 6h").unwrap();
        assert_eq!(s.percent_at(0), 10);
        assert_eq!(s.percent_at(3599), 10);
        assert_eq!(s.percent_at(3600), 50);
        assert_eq!(s.percent_at(100_000), 100);
        assert_eq!(s.admits_after(5), Some(0));
        assert_eq!(s.admits_after(30), Some(3600));
        assert_eq!(s.admits_after(99), Some(21600));
        assert_eq!(Schedule::parse("0%").unwrap().admits_after(0), None);
    }

    /// 1,000 synthetic machine ids: at each step of a schedule the admitted share is within
    /// 3 points of the target, and nodes once admitted stay admitted as the share grows.
    #[test]
    fn buckets_spread_evenly_and_grow_monotonically() {
        // Random 128-bit ids in machine-id's format, from a fixed xorshift seed.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let buckets: Vec<u8> = (0..1000)
            .map(|_| bucket(&format!("{:016x}{:016x}", next(), next())))
            .collect();
        let s = Schedule::parse(
            "1%, 10% after 1h, 25% after 2h, 50% after 3h, 75% after 4h, 100% after 5h",
        )
        .unwrap();
        let mut before: Vec<bool> = vec![false; buckets.len()];
        for &(offset, pct) in &s.steps {
            let admitted: Vec<bool> = buckets.iter().map(|b| *b < s.percent_at(offset)).collect();
            let share = admitted.iter().filter(|a| **a).count() as f64 / 10.0;
            assert!(
                (share - pct as f64).abs() <= 3.0,
                "{pct}%: {share}% admitted"
            );
            assert!(
                before.iter().zip(&admitted).all(|(b, a)| !b || *a),
                "a node left the rollout at {pct}%"
            );
            before = admitted;
        }
        assert_eq!(
            bucket("abc\n"),
            bucket("abc"),
            "machine-id's newline does not move the bucket"
        );
    }

    #[test]
    fn eligibility_text_never_panics() {
        assert_eq!(eligible_text(0), "from 1970-01-01T00:00:00Z");
        assert_eq!(eligible_text(253_402_300_799), "from 9999-12-31T23:59:59Z");
        assert_eq!(eligible_text(253_402_300_800), "never");
        assert_eq!(eligible_text(i64::MAX), "never");
        assert_eq!(eligible_text(-5), "now");
    }
}
