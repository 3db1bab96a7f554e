//! `troops __fetch REMOTE BRANCH`: one remote's fetch, run by `pull` in its own process
//! group so that a hung transport can be killed with everything it started.

use std::path::Path;

use anyhow::Result;
use troops::fetch::wire;
use troops::paths::Layout;
use troops::repo::Repo;

#[derive(Debug, clap::Args)]
pub struct Args {
    remote: String,
    branch: String,
}

pub fn run(root: &Path, args: &Args) -> Result<u8> {
    let repo = Repo::open(&Layout::new(root).repo())?;
    let tip = repo.fetch_branch(&args.remote, &args.branch)?;
    println!("{}", wire::tip(tip));
    Ok(0)
}
