//! `troops serve`: the daemon (socket-activated by troops.socket, or binding the socket).

use std::path::Path;

use anyhow::{Context, Result};
use troops::daemon;
use troops::node::Node;

pub fn run(root: &Path) -> Result<u8> {
    let node = Node::open(root)?;
    let (listener, activated) = daemon::listen(&node.layout, &node.settings.admin_group)?;
    let how = if activated {
        "socket from systemd"
    } else {
        "bound"
    };
    tracing::info!(
        "serving on {} ({how}) for root and group {}",
        daemon::socket_path(&node.layout).display(),
        node.settings.admin_group
    );
    let exe = std::env::current_exe().context("failed to find this program")?;
    daemon::serve(listener, root.to_owned(), exe)
}
