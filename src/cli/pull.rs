use std::path::Path;

use anyhow::{Context, Result};
use troops::node::Node;

pub fn run(root: &Path, now: Option<i64>, stdout_is_journal: bool) -> Result<u8> {
    let node = Node::open(root)?;
    if !super::is_root() {
        // A member of the admin group: the root daemon runs it, the same run the timer would.
        let socket = troops::daemon::socket_path(&node.layout);
        return super::hook::relay(&socket, troops::daemon::protocol::Request::Pull);
    }
    let _lock = super::lock_node(&node.layout)?;
    let exe = std::env::current_exe().context("failed to find this program to fetch with")?;
    let mut out = super::terminal(stdout_is_journal);
    let outcome = troops::pull::pull(
        &node,
        &exe,
        "pull",
        now.map_or_else(|| troops::clock::unix_now().map(|s| s as i64), Ok)?,
        out.as_mut(),
    )?;
    let (code, summary) = outcome.verdict();
    match (code, &outcome.run) {
        (0, Some(_)) => {} // the run's own last line said it
        (0, None) => println!("troops: {summary}"),
        _ => eprintln!("troops: error: {summary}"),
    }
    Ok(code)
}
