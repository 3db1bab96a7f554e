//! `troops key`: the node's public key, to authorise it on the git server.

use std::path::Path;

use anyhow::Result;
use troops::keys;
use troops::paths::Layout;

pub fn run(root: &Path) -> Result<u8> {
    println!("{}", keys::public_key(&Layout::new(root).ssh_dir())?);
    Ok(0)
}
