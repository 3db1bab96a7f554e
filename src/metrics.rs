//! The node's state for Prometheus, as a textfile for node_exporter's textfile collector:
//! no server of ours, nothing new on the network. Rendered from the same `Status` as
//! `troops status --json`, written after every pull and every run.
//!
//! Labels carry commits, remote names, results and hold reasons, never a URL (URLs may
//! carry tokens) and never a growing set: one commit label per series.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::node::Node;
use crate::status::Status;

/// Where node_exporter's textfile collector looks on Debian (prometheus-node-exporter).
pub const DEBIAN_TEXTFILE_DIR: &str = "var/lib/prometheus/node-exporter";

/// The textfile path for this node, under its root: the setting `metrics_file` if given
/// (empty: none), else `troops.prom` in Debian's collector directory when it exists.
pub fn path(node: &Node) -> Option<PathBuf> {
    let root = node.layout.root();
    match &node.settings.metrics_file {
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) => Some(root.join(p.strip_prefix("/").unwrap_or(p))),
        None => {
            let dir = root.join(DEBIAN_TEXTFILE_DIR);
            dir.is_dir().then(|| dir.join("troops.prom"))
        }
    }
}

/// Write the node's metrics if it exports any. Failing to is logged, never fatal: a
/// full disk under /var/lib/prometheus must not stop a deploy.
pub fn refresh(node: &Node) {
    let Some(path) = path(node) else { return };
    let text = match crate::status::gather(node) {
        Ok(status) => render(&status),
        Err(e) => {
            tracing::warn!("metrics: failed to read the node's state: {e}");
            return;
        }
    };
    let written = match path.parent() {
        Some(dir) => crate::fsutil::create_dirs(dir, 0o755),
        None => Ok(()),
    }
    .and_then(|()| crate::fsutil::write_atomic(&path, text.as_bytes(), 0o644));
    if let Err(e) = written {
        tracing::warn!("metrics: failed to write {}: {e}", path.display());
    }
}

/// A label value in the exposition format: backslash, double quote and newline escaped.
fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn start(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "{name}");
        if !labels.is_empty() {
            let inner: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", inner.join(","));
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family with one unlabelled sample, or nothing when there is no value.
    fn gauge(&mut self, name: &str, help: &str, value: Option<impl std::fmt::Display>) {
        if let Some(v) = value {
            self.start(name, "gauge", help);
            self.sample(name, &[], v);
        }
    }
}

fn unix(rfc3339: &str) -> Option<f64> {
    let t = humantime::parse_rfc3339(rfc3339).ok()?;
    Some(
        t.duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs_f64()
            .floor(),
    )
}

/// A hold's reason as a label: its first line, at most 120 characters. The text may come
/// from a commit message (a malformed trailer), and a scraper may refuse long labels.
fn short_reason(reason: &str) -> String {
    let line = reason.lines().next().unwrap_or_default();
    match line.char_indices().nth(120) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_owned(),
    }
}

fn bool01(b: bool) -> u8 {
    b as u8
}

/// The textfile for `status`.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    if let Some(c) = status.deployed {
        f.start(
            "troops_deployed_info",
            "gauge",
            "The commit this node has deployed, and the branch it follows.",
        );
        f.sample(
            "troops_deployed_info",
            &[("commit", &c.to_string()), ("branch", &status.branch)],
            1,
        );
    }
    if let Some(c) = status.head {
        f.start(
            "troops_branch_info",
            "gauge",
            "The commit the node accepted as its target (its branch).",
        );
        f.sample("troops_branch_info", &[("commit", &c.to_string())], 1);
    }
    f.gauge(
        "troops_up_to_date",
        "1 when the deployed commit is the branch's.",
        Some(bool01(status.up_to_date())),
    );
    if let Some(run) = &status.last_run {
        let started = unix(&run.started);
        f.gauge(
            "troops_last_run_timestamp_seconds",
            "When the last run finished, in unix seconds.",
            started.map(|s| s + (run.duration_ms / 1000) as f64),
        );
        f.gauge(
            "troops_last_run_duration_seconds",
            "How long the last run took.",
            Some(run.duration_ms as f64 / 1000.0),
        );
        f.gauge(
            "troops_last_run_success",
            "1 when the last run deployed its commit.",
            Some(bool01(
                run.result == crate::deploy::record::Outcome::Success,
            )),
        );
    }
    f.start(
        "troops_runs_total",
        "counter",
        "Finished runs since the node began, by result.",
    );
    for result in ["success", "failed", "interrupted"] {
        let n = status.runs_total.get(result).copied().unwrap_or(0);
        f.sample("troops_runs_total", &[("result", result)], n);
    }
    if let Some(pull) = &status.last_pull {
        f.gauge(
            "troops_last_pull_timestamp_seconds",
            "When the last pull finished, in unix seconds.",
            unix(&pull.time),
        );
        if !pull.remotes.is_empty() {
            f.start(
                "troops_remote_up",
                "gauge",
                "1 when the remote answered the last pull (with or without the branch).",
            );
            for r in &pull.remotes {
                let up = matches!(r.fetch.as_str(), "tip" | "no-branch");
                f.sample("troops_remote_up", &[("remote", &r.name)], bool01(up));
            }
        }
        if pull.remotes.iter().any(|r| r.tip.is_some()) {
            f.start(
                "troops_remote_tip_info",
                "gauge",
                "Each remote's tip at the last pull and how the node stands to it.",
            );
            for r in &pull.remotes {
                if let Some(tip) = r.tip {
                    f.sample(
                        "troops_remote_tip_info",
                        &[
                            ("remote", &r.name),
                            ("commit", &tip.to_string()),
                            ("standing", r.standing.as_deref().unwrap_or("")),
                        ],
                        1,
                    );
                }
            }
        }
        // Not `troops_rollout_bucket`: a `_bucket` suffix means a histogram's buckets.
        f.gauge(
            "troops_rollout_bucket_id",
            "This node's rollout bucket, 0 to 99: a commit rolled out to N% reaches buckets below N.",
            Some(pull.bucket),
        );
        f.gauge(
            "troops_held",
            "1 when rollout or signatures hold the node before a newer commit.",
            Some(bool01(pull.held.is_some())),
        );
        if let Some(h) = &pull.held {
            f.start(
                "troops_held_info",
                "gauge",
                "The commit the node is held before, and why.",
            );
            f.sample(
                "troops_held_info",
                &[
                    ("commit", &h.commit.to_string()),
                    ("reason", &short_reason(&h.reason)),
                ],
                1,
            );
        }
    }
    f.gauge(
        "troops_pull_interval_seconds",
        "Seconds between pulls by the timer: a node silent for a few of these is stale.",
        Some(status.interval),
    );
    f.gauge(
        "troops_pending_admins",
        "Admins the seed named whose accounts do not exist yet.",
        Some(status.pending_admins.len() as u64),
    );
    f.gauge(
        "troops_retry_at_timestamp_seconds",
        "When a failed deploy is next tried, in unix seconds, while one waits.",
        status.retry_at,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn an_empty_node_still_says_it_is_not_up_to_date() {
        let status = Status {
            root: "/".into(),
            branch: "master".into(),
            head: None,
            deployed: None,
            roles: vec![],
            remotes: vec![],
            last_run: None,
            last_pull: None,
            damage: vec![],
            retry_at: None,
            runs_total: Default::default(),
            interval: 300,
            pending_admins: vec!["ops".into()],
        };
        let text = render(&status);
        assert!(text.contains("troops_pending_admins 1\n"), "{text}");
        assert!(text.contains("troops_up_to_date 0\n"), "{text}");
        assert!(
            text.contains("troops_runs_total{result=\"failed\"} 0\n"),
            "{text}"
        );
        assert!(!text.contains("troops_deployed_info"), "{text}");
    }
}
