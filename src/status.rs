//! What a node says about itself, read from its state on disk: one source for `troops
//! status` (text and JSON) and the Prometheus textfile (`metrics.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::deploy::DEPLOYED_REF;
use crate::deploy::record::{RunRecord, RunStore};
use crate::node::Node;
use crate::pull::PullReport;
use crate::repo::{CommitId, Repo, RepoError};

#[derive(Debug, Clone, Serialize)]
pub struct RemoteUrl {
    pub name: String,
    /// Redacted.
    pub url: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub root: PathBuf,
    pub branch: String,
    /// The branch: the commit the node accepted as its target.
    pub head: Option<CommitId>,
    pub deployed: Option<CommitId>,
    pub roles: Vec<String>,
    pub remotes: Vec<RemoteUrl>,
    pub last_run: Option<RunRecord>,
    pub last_pull: Option<PullReport>,
    /// What is wrong with the node's repository, one line each.
    pub damage: Vec<String>,
    /// Unix time of the next attempt at a deploy that failed, while one is pending.
    pub retry_at: Option<u64>,
    /// Finished runs by result since the node began.
    pub runs_total: BTreeMap<String, u64>,
    /// Seconds between pulls by the timer.
    pub interval: u64,
    /// Admins the seed named whose accounts do not exist yet.
    pub pending_admins: Vec<String>,
}

impl Status {
    pub fn up_to_date(&self) -> bool {
        self.head.is_some() && self.head == self.deployed
    }
}

/// The node's status as its files say it now. A damaged repository is reported, not an
/// error: what is wrong is part of the status.
pub fn gather(node: &Node) -> Result<Status, RepoError> {
    // (No error is returned today; the signature leaves room for one that must stop it.)
    let layout = &node.layout;
    let branch = &node.settings.branch;
    let mut damage: Vec<String> =
        crate::repair::damaged_packs(&layout.node_repo().join("objects/pack"))
            .into_iter()
            .map(|d| format!("{}: {}", d.pack.display(), d.why))
            .collect();
    for (name, id) in crate::repair::pending(&layout.node_repo()) {
        damage.push(format!(
            "{name} was at {}, which is lost; the next pull fetches it again",
            id.short()
        ));
    }
    let (head, deployed) =
        match Repo::open(&layout.node_repo()) {
            Ok(repo) => {
                match repo.refs_to_missing() {
                    Ok(missing) => damage.extend(missing.into_iter().map(|(name, id)| {
                        format!("{name} names {}, which is missing", id.short())
                    })),
                    Err(e) => damage.push(e.to_string()),
                }
                let mut read = |name: &str| {
                    repo.ref_id(name).unwrap_or_else(|e| {
                        damage.push(e.to_string());
                        None
                    })
                };
                (read(&format!("refs/heads/{branch}")), read(DEPLOYED_REF))
            }
            Err(e) => {
                damage.push(e.to_string());
                (None, None)
            }
        };
    let store = RunStore::new(layout.runs());
    let last_run = store.latest().map(|r| store.settle(r, &layout.lock_file()));
    // The members' config: one they broke is part of the status, not the end of it.
    let remotes = match crate::repo::remote_urls(&layout.repo().join("config")) {
        Ok(r) => r,
        Err(e) => {
            damage.push(e.to_string());
            Vec::new()
        }
    }
    .into_iter()
    .map(|(name, url)| RemoteUrl {
        name,
        url: crate::repo::redact_url(&url),
    })
    .collect();
    let retry_at = head.filter(|h| Some(*h) != deployed).and_then(|head| {
        let state = crate::pull::load_retry(layout)?;
        let now = crate::clock::unix_now().ok()?;
        crate::backoff::retry_at(
            Some(&state),
            head,
            now,
            node.settings.retry_min,
            node.settings.retry_max,
        )
    });
    Ok(Status {
        root: layout.root().to_owned(),
        branch: branch.clone(),
        head,
        deployed,
        roles: node.settings.roles.clone(),
        remotes,
        last_run,
        last_pull: PullReport::load(&layout.pull_report()),
        damage,
        retry_at,
        runs_total: store.counts(),
        interval: node.settings.interval,
        pending_admins: crate::admins::pending(layout),
    })
}
