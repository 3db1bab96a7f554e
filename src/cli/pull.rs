use std::path::Path;

use anyhow::{Context, Result};
use troops::node::Node;

pub fn run(root: &Path, stdout_is_journal: bool) -> Result<u8> {
    let node = Node::open(root)?;
    let _lock = super::lock_node(&node.layout)?;
    let exe = std::env::current_exe().context("failed to find this program to fetch with")?;
    let mut out = super::terminal(stdout_is_journal);
    let outcome = troops::pull::pull(&node, &exe, out.as_mut())?;
    let report = &outcome.report;
    if report.all_remotes_failed() {
        eprintln!(
            "troops: error: no remote offered branch {} (unreachable, or no such branch); see `troops status`",
            report.branch
        );
        return Ok(1);
    }
    if let Some(run) = &outcome.run {
        if super::run_exit(run) != 0 {
            return Ok(1);
        }
    } else if outcome.report.waiting.is_none() && report.disagree.is_empty() {
        println!(
            "troops: up to date at {}",
            report.from.map_or("nothing".into(), |c| c.short())
        );
    }
    if !report.disagree.is_empty() {
        return Ok(1);
    }
    Ok(0)
}
