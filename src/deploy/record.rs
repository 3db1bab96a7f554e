//! Run records: one JSON file per run in /var/lib/troops/runs, beside the run's full output.
//! Ids are small increasing numbers so an operator can type `troops log 42`; they are handed
//! out under the node lock.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::repo::CommitId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Running,
    Success,
    Failed,
    /// The run's process died before it could say (killed, power cut).
    Interrupted,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Running => "running",
            Outcome::Success => "success",
            Outcome::Failed => "failed",
            Outcome::Interrupted => "interrupted",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployableResult {
    pub name: String,
    /// ran, skipped or failed.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: u64,
    pub commit: CommitId,
    pub previous: Option<CommitId>,
    /// What started it: `pull`, `deploy`, later `push by <user>`.
    pub trigger: String,
    /// RFC 3339, UTC.
    pub started: String,
    pub duration_ms: u64,
    pub result: Outcome,
    pub exit_code: Option<i32>,
    /// One line saying what went wrong, naming the thing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub roles: Vec<String>,
    pub deployables: Vec<DeployableResult>,
    pub venv: Option<String>,
    pub output: PathBuf,
}

impl RunRecord {
    /// The record as it stands when no run holds the node lock: one still marked running
    /// belongs to an agent that died (kill -9, a power cut), and says so.
    fn settled(mut self) -> Self {
        if self.result == Outcome::Running {
            self.result = Outcome::Interrupted;
            self.error = Some(INTERRUPTED.into());
        }
        self
    }

    /// The exit status and the one line that ends a run: what a pusher sees last.
    pub fn verdict(&self) -> (u8, String) {
        match self.result {
            Outcome::Success => (
                0,
                format!(
                    "run {}: deployed {} in {:.1}s",
                    self.id,
                    self.commit.short(),
                    self.duration_ms as f64 / 1000.0
                ),
            ),
            _ => (
                1,
                format!(
                    "run {}: {}",
                    self.id,
                    self.error.as_deref().unwrap_or("deploy failed")
                ),
            ),
        }
    }
}

const INTERRUPTED: &str = "the run was interrupted before it finished";

/// The largest run id troops counts with (2^53 - 1, exact in JSON readers too).
pub const MAX_ID: u64 = (1 << 53) - 1;

pub struct RunStore {
    dir: PathBuf,
}

impl RunStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        RunStore { dir: dir.into() }
    }

    fn record_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json")?.parse().ok())
            // Past this no node gets (a run a second for 285 million years): a file named
            // 18446744073709551615.json is not ours, and must not make the next run wrap.
            .filter(|id| *id <= MAX_ID)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The next id; call with the node lock held.
    pub fn next_id(&self) -> u64 {
        self.ids().last().map_or(1, |l| l + 1)
    }

    pub fn save(&self, record: &RunRecord) -> std::io::Result<()> {
        fsutil::create_dirs(&self.dir, 0o755)?;
        let json = serde_json::to_vec_pretty(record).expect("run records serialise");
        fsutil::write_atomic(&self.record_path(record.id), &json, 0o640)
    }

    pub fn load(&self, id: u64) -> std::io::Result<RunRecord> {
        let text = fs::read(self.record_path(id))?;
        serde_json::from_slice(&text).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", self.record_path(id).display()),
            )
        })
    }

    /// Newest first.
    pub fn list(&self) -> Vec<RunRecord> {
        self.ids()
            .into_iter()
            .rev()
            .filter_map(|id| self.load(id).ok())
            .collect()
    }

    pub fn latest(&self) -> Option<RunRecord> {
        self.ids()
            .into_iter()
            .rev()
            .find_map(|id| self.load(id).ok())
    }

    /// A record still marked running belongs to a run that died, since the caller holds
    /// the lock: say so instead of leaving it running forever. Runs are one at a time, so
    /// only the newest can be one.
    pub fn mark_interrupted(&self) -> std::io::Result<()> {
        if let Some(r) = self.latest()
            && r.result == Outcome::Running
        {
            let r = r.settled();
            self.save(&r)?;
            self.count(&r)?;
        }
        Ok(())
    }

    fn counts_path(&self) -> PathBuf {
        self.dir.join("counts.json")
    }

    /// Finished runs by result since the node began (records are pruned; these are not).
    /// A node from before the counts were kept starts from the records it still has.
    pub fn counts(&self) -> std::collections::BTreeMap<String, u64> {
        self.counts_except(None)
    }

    fn counts_except(&self, skip: Option<u64>) -> std::collections::BTreeMap<String, u64> {
        // Recounted from the records only when there is no file: an unreadable one is kept
        // as it is (counted on from zero would make a counter go backwards for good).
        match fs::read(self.counts_path()) {
            Ok(b) => return serde_json::from_slice(&b).unwrap_or_default(),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Default::default(),
            Err(_) => {}
        }
        let mut counts = std::collections::BTreeMap::new();
        for r in self.list() {
            if r.result != Outcome::Running && Some(r.id) != skip {
                *counts.entry(r.result.to_string()).or_default() += 1;
            }
        }
        counts
    }

    /// Count `record`, which just finished. Call with the node lock held.
    pub fn count(&self, record: &RunRecord) -> std::io::Result<()> {
        let mut counts = self.counts_except(Some(record.id));
        *counts.entry(record.result.to_string()).or_default() += 1;
        let json = serde_json::to_vec_pretty(&counts).expect("counts serialise");
        fsutil::write_atomic(&self.counts_path(), &json, 0o640)
    }

    /// `record` as it stands now: one read as running whose run no longer holds the node
    /// lock `lock` is read again (it may just have finished) and, still running, is one
    /// whose agent died. Read first, lock after: a run that starts meanwhile holds the lock.
    pub fn settle(&self, record: RunRecord, lock: &Path) -> RunRecord {
        if record.result != Outcome::Running || crate::lock::is_held(lock) != Some(false) {
            return record;
        }
        self.load(record.id).unwrap_or(record).settled()
    }

    /// Remove the scratch files (`N.context.json`, `N.results.json`) runs that died left
    /// behind; the caller holds the lock, so no run is using one. Returns the names removed.
    pub fn sweep_scratch(&self) -> Vec<String> {
        let mut removed = Vec::new();
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let scratch = name.ends_with(".context.json")
                || name.ends_with(".results.json")
                || name.ends_with(".log.tmp")
                || fsutil::is_temp(&name);
            if scratch && fs::remove_file(entry.path()).is_ok() {
                removed.push(name);
            }
        }
        removed
    }

    /// Keep the newest `keep` runs.
    pub fn prune(&self, keep: usize) {
        let ids = self.ids();
        let excess = ids.len().saturating_sub(keep);
        for &id in &ids[..excess] {
            let _ = fs::remove_file(self.record_path(id));
            let _ = fs::remove_file(self.log_path(id));
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_foreign_huge_id_never_makes_the_counter_wrap() {
        let dir = tempfile::tempdir().unwrap();
        let store = RunStore::new(dir.path());
        assert_eq!(store.next_id(), 1);
        std::fs::write(dir.path().join("7.json"), "{}").unwrap();
        std::fs::write(dir.path().join("18446744073709551615.json"), "{}").unwrap();
        assert_eq!(store.next_id(), 8);
    }
}
