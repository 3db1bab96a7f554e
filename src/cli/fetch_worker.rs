//! `troops __fetch REMOTE BRANCH`: one remote's fetch into root's repository, run by `pull`
//! in its own process group so that a hung transport can be killed with everything it
//! started.

use std::path::Path;

use anyhow::Result;
use troops::fetch::{self, wire};
use troops::paths::Layout;
use troops::repo::{Repo, RepoError};

#[derive(Debug, clap::Args)]
pub struct Args {
    remote: String,
    branch: String,
}

pub fn run(root: &Path, args: &Args) -> Result<u8> {
    let layout = Layout::new(root);
    let repo = Repo::open(&layout.node_repo())?;
    let url = match fetch::remote_url(&layout, &args.remote) {
        Ok(u) => u,
        Err(why) => {
            eprintln!("{why}");
            return Ok(1);
        }
    };
    // A URL that carries its own password uses it; otherwise the root-only store answers.
    let account = match troops::repo::split_credentials(&url) {
        Some(_) => None,
        None => troops::credentials::lookup(&layout.credentials(), &url),
    };
    let tracking = fetch::tracking_ref(&args.remote, &args.branch);
    // A local repository is read with root's rights only when root named it (init records
    // those in its own repo's config); the shared repo and members' local remotes are read
    // with the admin group's rights.
    let root_named = repo
        .config_value(&format!("remote.{}.url", args.remote))
        .is_some_and(|u| u == url);
    let fetched = match fetch::is_local(&url) && !root_named {
        true => {
            let node = troops::node::Node::open(root)?;
            let group = &node.settings.admin_group;
            let gid = troops::accounts::group_gid(group)?
                .ok_or_else(|| anyhow::anyhow!("the admin group {group:?} does not exist"))?;
            // What members pushed is checked object by object as it arrives.
            let fsck = args.remote == fetch::PUSHED;
            repo.fetch_local_as_group(&args.remote, &url, &args.branch, &tracking, gid, fsck)
                .map(|tip| troops::repo::Fetch {
                    tip,
                    moved_to: None,
                })
        }
        false => {
            // The system git config is read for HTTP only: a broken one says so there, and
            // never stops an ssh fetch, which takes nothing from it.
            let config = match troops::hosting::is_http(&url) {
                true => troops::repo::system_config(&layout.system_gitconfig())?,
                false => Default::default(),
            };
            let bare = troops::repo::without_credentials(&url);
            let env = troops::hosting::Env::from_process();
            let mut plan = troops::hosting::plan(&config, &env, &args.remote, &bare, root_named);
            plan.extra_roots = Some(layout.ca_certs()).filter(|p| p.exists());
            repo.fetch_branch(&args.remote, &url, &args.branch, &tracking, account, &plan)
        }
    };
    match fetched {
        Ok(fetched) => {
            print!("{}", wire::fetched(&fetched));
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
