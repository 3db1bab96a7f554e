//! The node's settings, `/etc/troops/troops.toml`. Remotes are not here: they live in the bare
//! repo's git config, as in plain git, so `git remote add` works against it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::fsutil;
use crate::names::{self, NameError};

#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Invalid { path: PathBuf, source: NameError },
    #[error("{path}: {key} must be {expected}")]
    Value {
        path: PathBuf,
        key: &'static str,
        expected: &'static str,
    },
    #[error("failed to write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0}: the file is empty; refusing to run on defaults (restore it, or run `troops init` again)"
    )]
    Empty(PathBuf),
    #[error(
        "{0}: the file ends before `troops init`'s last line, so it was cut short; refusing to run on part of it (restore it, or run `troops init` again)"
    )]
    Truncated(PathBuf),
    #[error("this node is not initialised: {0} is missing (run `troops init`)")]
    NotInitialised(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Installer {
    /// uv when it is on PATH, else pip.
    #[default]
    Auto,
    Uv,
    Pip,
}

/// Whether commits must be signed (DESIGN.md, "Signatures").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Verify {
    #[default]
    None,
    Tip,
    All,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The branch every remote is followed on.
    pub branch: String,
    pub roles: Vec<String>,
    /// The interpreter venvs are made from: Debian's, never whatever is first on PATH.
    pub python: PathBuf,
    pub installer: Installer,
    /// Seconds one remote may take to fetch before it is given up for this pull.
    pub fetch_timeout: u64,
    /// Seconds before the first retry of a failed deploy; doubled on every failure.
    pub retry_min: u64,
    pub retry_max: u64,
    /// Run records kept in /var/lib/troops/runs.
    pub keep_runs: usize,
    /// Virtualenvs kept besides the one in use: those of the last this many deployed
    /// commits.
    pub keep_venvs: usize,
    /// The fully qualified name deploy.py sees; unset means the machine's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The host group whose members may push and trigger deploys.
    pub admin_group: String,
    pub verify: Verify,
    /// An IMDS endpoint to ask for user data even where DMI does not say EC2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub imds: Option<String>,
    /// Seconds IMDS may take, retries included, before init gives up on it.
    pub imds_deadline: u64,
    /// Whether a push may update refs other than the followed branch.
    pub allow_other_refs: bool,
    /// Seconds between pulls by troops-pull.timer (init writes the timer's drop-in).
    pub interval: u64,
    /// This node's rollout bucket in [0, 100); unset: derived from /etc/machine-id. A node
    /// pinned to 0 is a permanent canary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<u8>,
    /// Seconds a pusher may go without a line from a running deploy before the daemon sends
    /// a keepalive, so ssh and git keep the session.
    pub keepalive: u64,
    /// Seconds deploy.py may run; then it and everything it started are stopped.
    pub deploy_timeout: u64,
    /// Remotes fetched at once, at most.
    pub fetch_jobs: u64,
    /// Seconds a git lock file in the node's repository must have been left before troops,
    /// holding the node lock, removes it as stale (a crash left it).
    pub stale_lock: u64,
    /// Clients the daemon serves at once; read when it starts.
    pub max_clients: u64,
    /// Bytes of a run's output its log keeps, at most: the tail, after a line saying how
    /// much was dropped.
    pub log_max: u64,
    /// The Prometheus textfile written after every pull and run (under the root); empty:
    /// none; unset: `/var/lib/prometheus/node-exporter/troops.prom` when that directory
    /// exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_file: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            branch: "master".into(),
            roles: Vec::new(),
            python: "/usr/bin/python3".into(),
            installer: Installer::Auto,
            fetch_timeout: 60,
            retry_min: 60,
            retry_max: 3600,
            keep_runs: 100,
            keep_venvs: 3,
            hostname: None,
            admin_group: "troops".into(),
            verify: Verify::None,
            imds: None,
            imds_deadline: 120,
            allow_other_refs: false,
            keepalive: 30,
            deploy_timeout: 3600,
            fetch_jobs: 8,
            max_clients: 64,
            stale_lock: 600,
            log_max: 64 << 20,
            interval: 300,
            bucket: None,
            metrics_file: None,
        }
    }
}

const HEADER: &str = "# Written by `troops init`; see troops(1).";
/// init's last line: a file that starts with init's first line and lacks this was cut short.
const FOOTER: &str = "# End of troops.toml.";

impl Settings {
    /// Settings fail closed: no text, or text cut short, is never "all defaults".
    pub fn parse(text: &str, path: &Path) -> Result<Settings, SettingsError> {
        let blank = |l: &str| l.trim().is_empty() || l.trim_start().starts_with('#');
        if text.lines().all(blank) {
            return Err(SettingsError::Empty(path.to_owned()));
        }
        if text.starts_with(HEADER) && !text.lines().any(|l| l.trim() == FOOTER) {
            return Err(SettingsError::Truncated(path.to_owned()));
        }
        let settings: Settings = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {column}: ")
            });
            SettingsError::Parse {
                path: path.to_owned(),
                message: format!("{}{}", at.unwrap_or_default(), e.message()),
            }
        })?;
        settings.validate(path)?;
        Ok(settings)
    }

    pub fn validate(&self, path: &Path) -> Result<(), SettingsError> {
        let invalid = |source| SettingsError::Invalid {
            path: path.to_owned(),
            source,
        };
        names::check_branch(&self.branch).map_err(invalid)?;
        for role in &self.roles {
            names::check_role(role).map_err(invalid)?;
        }
        names::check_user(&self.admin_group).map_err(invalid)?;
        let value = |key, expected| {
            Err(SettingsError::Value {
                path: path.to_owned(),
                key,
                expected,
            })
        };
        if !self.python.is_absolute() {
            return value("python", "an absolute path");
        }
        if let Some(m) = &self.metrics_file
            && !m.as_os_str().is_empty()
            && (!m.is_absolute() || m.file_name().is_none())
        {
            return value("metrics_file", "an absolute file path, or \"\" for none");
        }
        // Upper bounds too: every duration here is added to a clock somewhere, and a value
        // nobody means (9223372036854775807) must be an error naming the key, not a panic.
        const DAY: u64 = 86_400;
        if !(1..=DAY).contains(&self.fetch_timeout) {
            return value("fetch_timeout", "from 1 to 86400 (seconds)");
        }
        if self.retry_min == 0 || self.retry_max < self.retry_min || self.retry_max > 30 * DAY {
            return value(
                "retry_min/retry_max",
                "1 <= retry_min <= retry_max <= 2592000 (seconds)",
            );
        }
        if let Some(url) = &self.imds
            && !url.starts_with("http://")
        {
            return value("imds", "an http:// URL");
        }
        if self.bucket.is_some_and(|b| b >= 100) {
            return value("bucket", "a whole number from 0 to 99");
        }
        if !(10..=7 * DAY).contains(&self.interval) {
            return value("interval", "from 10 to 604800 (seconds)");
        }
        if !(1..=3600).contains(&self.keepalive) {
            return value("keepalive", "from 1 to 3600 (seconds)");
        }
        // At least 1: the deployed commit's venv (its services may run its python) is the
        // last successful run's.
        if !(1..=1000).contains(&self.keep_venvs) {
            return value("keep_venvs", "from 1 to 1000");
        }
        if !(1..=100_000).contains(&self.keep_runs) {
            return value("keep_runs", "from 1 to 100000");
        }
        if !(1..=64).contains(&self.fetch_jobs) {
            return value("fetch_jobs", "from 1 to 64");
        }
        if self.stale_lock > DAY {
            return value("stale_lock", "at most 86400 (seconds)");
        }
        if !(1..=4096).contains(&self.max_clients) {
            return value("max_clients", "from 1 to 4096");
        }
        if !((64 << 10)..=(1 << 40)).contains(&self.log_max) {
            return value("log_max", "from 65536 to 1099511627776 (bytes)");
        }
        if !(1..=7 * DAY).contains(&self.deploy_timeout) {
            return value("deploy_timeout", "from 1 to 604800 (seconds)");
        }
        if self.imds_deadline > DAY {
            return value("imds_deadline", "at most 86400 (seconds)");
        }
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Settings, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                SettingsError::NotInitialised(path.to_owned())
            } else {
                SettingsError::Read {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        Settings::parse(&text, path)
    }

    pub fn to_toml(&self) -> String {
        // Serialising a struct of plain fields cannot fail.
        let body = toml::to_string(self).expect("settings serialise");
        format!("{HEADER}\n{body}{FOOTER}\n")
    }

    pub fn save(&self, path: &Path) -> Result<(), SettingsError> {
        let write = |source| SettingsError::Write {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            fsutil::create_dirs(dir, 0o755).map_err(write)?;
        }
        fsutil::write_atomic(path, self.to_toml().as_bytes(), 0o644).map_err(write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_defaults() {
        let p = Path::new("/etc/troops/troops.toml");
        let s = Settings::parse("roles = [\"web\"]\n", p).unwrap();
        assert_eq!(s.branch, "master");
        assert_eq!(s.roles, vec!["web"]);
        assert_eq!(Settings::parse(&s.to_toml(), p).unwrap(), s);
    }

    #[test]
    fn empty_or_cut_short_is_never_defaults() {
        let p = Path::new("/x/troops.toml");
        for text in ["", "\n  \n", "# only a comment\n"] {
            let e = Settings::parse(text, p).unwrap_err().to_string();
            assert!(e.starts_with("/x/troops.toml: the file is empty"), "{e}");
        }
        let full = Settings {
            verify: Verify::All,
            ..Settings::default()
        }
        .to_toml();
        assert_eq!(Settings::parse(&full, p).unwrap().verify, Verify::All);
        // Every cut of init's file that still parses is refused.
        for cut in 1..full.len() - FOOTER.len() - 1 {
            if let Ok(s) = Settings::parse(&full[..cut], p) {
                panic!("cut at {cut} parsed as {s:?}");
            }
        }
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let p = Path::new("/x/troops.toml");
        let e = Settings::parse("rolez = []\n", p).unwrap_err().to_string();
        assert!(e.contains("/x/troops.toml") && e.contains("rolez"), "{e}");
        let e = Settings::parse("branch = \"a\"\nbranch = \"b\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/x/troops.toml: line 2, column 1: duplicate key"),
            "{e}"
        );
        let e = Settings::parse("roles = [\"a b\"]\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid role name"), "{e}");
        for huge in [
            "fetch_timeout = 9223372036854775807\n",
            "retry_max = 99999999999\n",
            "interval = 18446744073709551615\n",
        ] {
            let key = huge.split(' ').next().unwrap();
            let e = Settings::parse(huge, p).unwrap_err().to_string();
            assert!(e.contains(key.split('_').next().unwrap()), "{huge}: {e}");
        }
        let e = Settings::parse("fetch_timeout = 0\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("fetch_timeout"), "{e}");
        let e = Settings::parse("python = \"python3\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("absolute"), "{e}");
    }
}
