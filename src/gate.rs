//! What may stop a node short of the commit its remotes offer: staged rollout (pulls only)
//! and signature checks (pulls and pushes). The node advances to the newest commit on the
//! way that both allow.

use serde::{Deserialize, Serialize};

use crate::node::Node;
use crate::repo::{CommitId, Repo, RepoError};
use std::collections::BTreeMap;

use crate::advance;
use crate::rollout;
use crate::settings::Verify;
use crate::verify::{Verifier, VerifyError};

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("failed to write {path}: {source}")]
    State {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HoldKind {
    /// Staged rollout: normal, and it lifts by itself (or with a `100%` commit).
    Rollout,
    /// A commit failed signature checks: an operator must look.
    Signature,
}

/// A commit the node does not take yet, and why; kept in pull.json for `troops status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub kind: HoldKind,
    pub commit: CommitId,
    pub reason: String,
    /// Unix time this node becomes eligible, for a rollout hold that will lift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eligible_at: Option<i64>,
}

/// The node's rollout bucket: pinned in settings, else from /etc/machine-id (else the host
/// name, on a machine without one).
pub fn bucket(node: &Node) -> u8 {
    if let Some(b) = node.settings.bucket {
        return b;
    }
    let id = std::fs::read_to_string(node.layout.machine_id())
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname"))
        .unwrap_or_default();
    rollout::bucket(&id)
}

pub fn verifier(node: &Node, git_dir: Option<&std::path::Path>) -> Result<Verifier, VerifyError> {
    // Fail closed: `verify` on and no key to verify with is a broken node, not "refuse
    // everything quietly" and never "accept everything".
    let has_keys = |p: &std::path::Path| {
        std::fs::read(p).is_ok_and(|b| b.iter().any(|c| !c.is_ascii_whitespace()))
    };
    let (signers, keyring) = (node.layout.allowed_signers(), node.layout.trusted_keys());
    if !has_keys(&signers) && !has_keys(&keyring) {
        return Err(VerifyError::NoKeys {
            verify: format!("{:?}", node.settings.verify).to_lowercase(),
            signers,
            keyring,
        });
    }
    Verifier::new(
        &node.layout.allowed_signers(),
        &node.layout.trusted_keys(),
        git_dir,
    )
}

/// Whether staged rollout applies: to what remotes offer, not to what is pushed to the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollout {
    Applies,
    Off,
}

/// The newest commit between `local` (exclusive) and `target` that the node may take at
/// `now`, and what holds it below `target` ([`crate::advance`] decides; this gathers).
pub fn narrow(
    node: &Node,
    repo: &Repo,
    local: Option<CommitId>,
    target: CommitId,
    now: i64,
    rollout: Rollout,
) -> Result<(Option<CommitId>, Option<Held>), GateError> {
    let graph: BTreeMap<CommitId, advance::Commit<CommitId>> = repo
        .commit_graph(target, local)?
        .into_iter()
        .map(|c| {
            let commit = advance::Commit {
                parents: c.parents,
                time: c.time,
                seen: None,
                trailer: rollout::trailer(&c.message),
            };
            (c.id, commit)
        })
        .collect();
    // Only commits that contain `local` are places to stop: a merge whose first parent is
    // older history (`local` came in as its second parent) must not offer that history, or
    // the branch would move backwards. Containing it holds for a suffix of the line.
    let mut line = advance::first_parent_line(&graph, target);
    if let Some(local) = local {
        let (mut lo, mut hi) = (0, line.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if repo.is_ancestor(local, line[mid])? {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        line.drain(..lo);
    }
    let signatures = match node.settings.verify {
        Verify::None => advance::Signatures::Off,
        Verify::Tip => advance::Signatures::Tip,
        Verify::All => advance::Signatures::All,
    };
    let rollout = rollout == Rollout::Applies && graph.values().any(|c| c.trailer.is_some());
    let mut graph = graph;
    if rollout {
        note_first_seen(node, &mut graph, now)?;
    }
    if !rollout && signatures == advance::Signatures::Off {
        return Ok((line.last().copied(), None));
    }
    let gates = advance::Gates {
        bucket: bucket(node),
        now,
        rollout,
        signatures,
    };
    let verifier = match signatures {
        advance::Signatures::Off => None,
        _ => Some(verifier(node, Some(repo.path()))?),
    };
    let mut failed = None;
    let (take, hold) = advance::advance(&graph, &line, gates, &mut |id| {
        let Some(v) = &verifier else {
            return Ok(());
        };
        match v.check(id) {
            Ok(verdict) => verdict,
            Err(e) => {
                let why = e.to_string();
                failed.get_or_insert(e);
                Err(why)
            }
        }
    });
    if let Some(e) = failed {
        return Err(e.into());
    }
    Ok((
        take,
        hold.map(|h| Held {
            kind: match h.gate {
                advance::Gate::Rollout => HoldKind::Rollout,
                advance::Gate::Signature => HoldKind::Signature,
            },
            commit: h.commit,
            reason: h.reason,
            eligible_at: h.eligible_at,
        }),
    ))
}

/// Fill in when this node first saw each trailer-carrying commit, recording the ones new to
/// it at `now`. Kept in root's state dir (members cannot make a ramp shorter); only commits
/// still ahead of the node are kept.
fn note_first_seen(
    node: &Node,
    graph: &mut BTreeMap<CommitId, advance::Commit<CommitId>>,
    now: i64,
) -> Result<(), GateError> {
    let path = node.layout.first_seen();
    let old: BTreeMap<String, i64> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut kept = BTreeMap::new();
    for (id, c) in graph.iter_mut().filter(|(_, c)| c.trailer.is_some()) {
        let seen = old.get(&id.to_string()).copied().unwrap_or(now);
        c.seen = Some(seen);
        kept.insert(id.to_string(), seen);
    }
    if kept != old {
        let bytes = serde_json::to_vec_pretty(&kept).expect("a map serialises");
        crate::fsutil::write_atomic(&path, &bytes, 0o640).map_err(|source| GateError::State {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

/// Why `head` may not be deployed now, if it may not: what `verify` requires of it and of
/// every commit since `deployed`, checked against the keys root trusts today (they may have
/// changed since the branch moved).
pub fn refusal(
    node: &Node,
    repo: &Repo,
    deployed: Option<CommitId>,
    head: CommitId,
) -> Result<Option<String>, GateError> {
    let verify = node.settings.verify;
    if verify == Verify::None {
        return Ok(None);
    }
    let verifier = verifier(node, Some(repo.path()))?;
    let since = deployed.filter(|d| *d != head && repo.is_ancestor(*d, head).unwrap_or(false));
    let commits = match verify {
        Verify::All if since.is_some() || deployed.is_none() => {
            repo.commits_between(head, since)?
        }
        _ => vec![head],
    };
    for c in commits {
        if let Err(why) = verifier.check(c)? {
            return Ok(Some(why));
        }
    }
    Ok(None)
}
