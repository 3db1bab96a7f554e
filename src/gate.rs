//! What may stop a node short of the commit its remotes offer: staged rollout (pulls only)
//! and signature checks (pulls and pushes). The node advances to the newest commit on the
//! way that both allow.

use serde::{Deserialize, Serialize};

use crate::node::Node;
use crate::repo::{CommitId, Repo, RepoError};
use crate::rollout::{self, Step};
use crate::settings::Verify;
use crate::verify::{Verifier, VerifyError};

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
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
/// `now`, and what holds back the one after it.
pub fn narrow(
    node: &Node,
    repo: &Repo,
    local: Option<CommitId>,
    target: CommitId,
    now: i64,
    rollout: Rollout,
) -> Result<(Option<CommitId>, Option<Held>), GateError> {
    let line = repo.first_parent_line(target, local)?;
    let steps: Vec<Step<CommitId>> = line
        .iter()
        .map(|c| Step {
            id: c.id,
            time: c.time,
            trailer: rollout::trailer(&c.message),
        })
        .collect();
    let (take, hold) = match rollout {
        Rollout::Applies => rollout::admit(&steps, bucket(node), now),
        Rollout::Off => (line.last().map(|c| c.id), None),
    };
    let rollout_hold = hold.map(|h| Held {
        kind: HoldKind::Rollout,
        commit: h.commit,
        reason: h.reason,
        eligible_at: h.eligible_at,
    });
    let verify = node.settings.verify;
    if verify == Verify::None {
        return Ok((take, rollout_hold));
    }

    // Of the commits rollout admits, the newest that signatures allow: with `tip` the commit
    // landed on must verify; with `all` every commit on the way must.
    let admitted = take
        .and_then(|t| line.iter().position(|c| c.id == t))
        .map_or(0, |i| i + 1);
    let verifier = verifier(node, Some(repo.path()))?;
    let mut take = None;
    let mut signature_hold: Option<Held> = None;
    let mut prev = local;
    for c in &line[..admitted] {
        let to_check = match verify {
            Verify::All => repo.commits_between(c.id, prev)?,
            _ => vec![c.id],
        };
        let mut failure = None;
        for id in to_check {
            if let Err(why) = verifier.check(id)? {
                failure = Some(why);
                break;
            }
        }
        prev = Some(c.id);
        match failure {
            None => {
                take = Some(c.id);
                signature_hold = None;
            }
            Some(why) => {
                if signature_hold.is_none() {
                    signature_hold = Some(Held {
                        kind: HoldKind::Signature,
                        commit: c.id,
                        reason: why,
                        eligible_at: None,
                    });
                }
                if verify == Verify::All {
                    break;
                }
            }
        }
    }
    Ok((take, signature_hold.or(rollout_hold)))
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
