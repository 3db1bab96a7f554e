//! `troops __fetch REMOTE BRANCH`: one remote's fetch, run by `pull` in its own process
//! group so that a hung transport can be killed with everything it started.

use std::path::Path;

use anyhow::Result;
use troops::fetch::wire;
use troops::paths::Layout;
use troops::repo::{Repo, RepoError};

#[derive(Debug, clap::Args)]
pub struct Args {
    remote: String,
    branch: String,
}

pub fn run(root: &Path, args: &Args) -> Result<u8> {
    let repo = Repo::open(&Layout::new(root).repo())?;
    match repo.fetch_branch(&args.remote, &args.branch) {
        Ok(tip) => {
            println!("{}", wire::tip(tip));
            Ok(0)
        }
        // The parent reports it beside the remote's name and URL: just what went wrong.
        Err(RepoError::Fetch { message, .. }) => {
            eprintln!("{message}");
            Ok(1)
        }
        Err(e) => Err(e.into()),
    }
}
