use std::path::Path;

use anyhow::Result;
use troops::node::Node;

pub fn run(root: &Path, stdout_is_journal: bool) -> Result<u8> {
    let node = Node::open(root)?;
    if !super::is_root() {
        // A member of the admin group: the root daemon runs it, the same run the timer would.
        let socket = troops::daemon::socket_path(&node.layout);
        return super::hook::relay(&socket, troops::daemon::protocol::Request::Deploy);
    }
    let _lock = super::lock_node(&node.layout)?;
    let mut out = super::terminal(stdout_is_journal);
    let run = troops::pull::deploy_head(&node, "deploy", out.as_mut())?;
    Ok(super::run_exit(&run))
}
