//! One pull: fetch every remote, choose the target, fast-forward the branch by
//! compare-and-swap, and deploy when the branch is ahead of what was last deployed.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::backoff::{self, RetryState};
use crate::deploy::{self, DEPLOYED_REF, record::RunRecord};
use crate::fetch::{self, Fetched};
use crate::fsutil;
use crate::gate::{Held, Rollout};
use crate::node::Node;
use crate::output::Output;
use crate::paths::Layout;
use crate::repair;
use crate::repo::{CommitId, Repo, RepoError};
use crate::target::{self, Offer, Standing};

#[derive(Debug, Error)]
pub enum PullError {
    #[error(
        "no remotes are configured in {0} (add one with `troops init --remote NAME=URL` or `git remote add`)"
    )]
    NoRemotes(String),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Deploy(#[from] deploy::DeployError),
    #[error(transparent)]
    Gate(#[from] crate::gate::GateError),
    #[error(transparent)]
    Repair(#[from] crate::repair::RepairError),
    #[error(transparent)]
    Clock(#[from] crate::clock::ClockError),
    #[error("refusing to move the branch from {from} to {to}, which does not contain it")]
    NotForward { from: CommitId, to: CommitId },
    #[error("failed to write {path}: {source}")]
    State {
        path: String,
        source: std::io::Error,
    },
}

/// What the last pull saw of one remote; kept in pull.json for `troops status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteReport {
    pub name: String,
    pub url: String,
    /// tip, no-branch, failed or timed-out.
    pub fetch: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tip: Option<CommitId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standing: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Where the server redirected the repository to: the remote works, its URL is old.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PullReport {
    pub time: String,
    pub branch: String,
    pub remotes: Vec<RemoteReport>,
    pub from: Option<CommitId>,
    pub to: Option<CommitId>,
    /// Remotes ahead of the branch that diverge from each other: the node stayed.
    pub disagree: Vec<String>,
    /// This node's rollout bucket.
    pub bucket: u8,
    /// The commit rollout or signatures keep the node from taking, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<crate::gate::Held>,
    /// Why a pending deploy was not attempted this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// What this pull repaired before it began (stale locks), for status and the journal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repaired: Vec<String>,
    /// What the node's git hosting settings put at risk or ignore (`http.sslVerify=false`,
    /// keys troops does not support): said on every pull until fixed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl PullReport {
    pub fn load(path: &Path) -> Option<PullReport> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    pub fn problems(&self) -> impl Iterator<Item = &RemoteReport> {
        self.remotes.iter().filter(|r| r.problem.is_some())
    }

    pub fn all_remotes_failed(&self) -> bool {
        !self.remotes.is_empty() && self.remotes.iter().all(|r| r.tip.is_none())
    }
}

pub struct PullOutcome {
    pub report: PullReport,
    pub run: Option<RunRecord>,
}

impl PullOutcome {
    /// The exit status and one line a person reads: 0 when the node is where it should be.
    pub fn verdict(&self) -> (u8, String) {
        let report = &self.report;
        if report.all_remotes_failed() {
            return (
                1,
                format!(
                    "no remote offered branch {} (unreachable, or no such branch); see `troops status`",
                    report.branch
                ),
            );
        }
        // A signature refusal leaves the node below what its remotes offer: exit 1 even
        // when it moved (and deployed) part of the way. A rollout hold is normal: 0.
        let refused = report
            .held
            .as_ref()
            .filter(|h| h.kind == crate::gate::HoldKind::Signature);
        if let Some(run) = &self.run {
            let (code, line) = run.verdict();
            return match refused {
                Some(h) if code == 0 => (1, format!("{line}; then stopped: {}", h.reason)),
                _ => (code, line),
            };
        }
        if let Some(h) = refused {
            return (1, h.reason.clone());
        }
        let at = report.from.map_or("nothing".into(), |c| c.short());
        if !report.disagree.is_empty() {
            return (
                1,
                format!(
                    "remotes {} disagree; staying at {at}",
                    report.disagree.join(" and ")
                ),
            );
        }
        match (&report.waiting, &report.held) {
            (Some(w), _) => (0, w.clone()),
            (None, Some(h)) => (
                0,
                format!("at {at}; holding before {}: {}", h.commit.short(), h.reason),
            ),
            (None, None) => (0, format!("up to date at {at}")),
        }
    }
}

/// The failures of the commit being retried, if a deploy failed.
pub fn load_retry(layout: &Layout) -> Option<RetryState> {
    serde_json::from_slice(&std::fs::read(layout.retry_state()).ok()?).ok()
}

fn seen_ref(remote: &str) -> String {
    format!("refs/troops/seen/{remote}")
}

/// Take what members pushed to the shared repo, if it is a fast-forward of the branch and
/// signatures allow it: the new branch head, and why the push is held if it is.
fn take_pushed(
    node: &Node,
    repo: &Repo,
    local: Option<CommitId>,
    pushed: Option<Fetched>,
    now: i64,
) -> Result<(Option<CommitId>, Option<Held>), PullError> {
    let tip = match pushed {
        Some(Fetched::Tip { tip }) => tip,
        Some(Fetched::Failed { error }) => {
            tracing::warn!("the shared repository's branch: {error}");
            return Ok((local, None));
        }
        _ => return Ok((local, None)),
    };
    if Some(tip) == local {
        return Ok((local, None));
    }
    if let Some(l) = local
        && !repo.is_ancestor(l, tip).unwrap_or(false)
    {
        // Behind is normal (the remotes moved the branch since); anything else is ignored.
        if !repo.is_ancestor(tip, l).unwrap_or(false) {
            tracing::warn!(
                "the shared repository's branch is at {}, which does not contain {}; ignored, the node never rewinds",
                tip.short(),
                l.short()
            );
        }
        return Ok((local, None));
    }
    let (take, held) = crate::gate::narrow(node, repo, local, tip, now, Rollout::Off)?;
    let branch_ref = format!("refs/heads/{}", node.settings.branch);
    match take.filter(|t| Some(*t) != local) {
        Some(t) => {
            fast_forward(repo, &branch_ref, local, t, "troops: pushed to the node")?;
            Ok((Some(t), held))
        }
        None => Ok((local, held)),
    }
}

/// Move `branch_ref` from `local` to `to`, which must contain it: whatever chose `to`, the
/// branch never moves backwards or sideways.
fn fast_forward(
    repo: &Repo,
    branch_ref: &str,
    local: Option<CommitId>,
    to: CommitId,
    why: &str,
) -> Result<(), PullError> {
    if let Some(l) = local
        && !repo.is_ancestor(l, to)?
    {
        return Err(PullError::NotForward { from: l, to });
    }
    repo.update_ref(branch_ref, to, local, why)?;
    Ok(())
}

/// Take what was just pushed, then deploy the branch head: the daemon's answer to a push,
/// as an exit code and a summary. A head that a pull deployed while the push waited for the
/// lock is not deployed again (`troops deploy`, asked explicitly, still would).
pub fn take_push_and_deploy(
    node: &Node,
    exe: &Path,
    trigger: &str,
    out: &mut dyn Output,
) -> anyhow::Result<(u8, String)> {
    let layout = &node.layout;
    let branch_ref = format!("refs/heads/{}", node.settings.branch);
    repair::hold_if_lost(&layout.node_repo(), &branch_ref)?;
    let repo = Repo::open(&layout.node_repo())?;
    let jobs = [(
        fetch::PUSHED.to_owned(),
        layout.repo().display().to_string(),
    )];
    let mut fetched = fetch::fetch_all(
        exe,
        layout.root(),
        &jobs,
        &node.settings.branch,
        Duration::from_secs(node.settings.fetch_timeout),
        node.settings.fetch_jobs as usize,
    );
    let local = repo.ref_target(&format!("refs/heads/{}", node.settings.branch))?;
    let pushed = fetched.pop().map(|f| f.fetched);
    let now = crate::clock::unix_now()? as i64;
    let (head, held) = take_pushed(node, &repo, local, pushed, now)?;
    if let Some(h) = held {
        anyhow::bail!("{}", h.reason);
    }
    if let Some(head) = head
        && repo.ref_target(DEPLOYED_REF)? == Some(head)
    {
        let store = deploy::record::RunStore::new(layout.runs());
        let Some(run) = store
            .list()
            .into_iter()
            .find(|r| r.commit == head && r.result == deploy::record::Outcome::Success)
        else {
            return Ok((0, format!("{} already deployed", head.short())));
        };
        // A pull that started between the push and its hook took the commit and deployed
        // it. The pusher still gets what they pushed for: that deploy's output and outcome.
        replay(&run, out);
        return Ok((
            0,
            format!(
                "{} already deployed by run {} ({}, {:.1}s); its output is above",
                head.short(),
                run.id,
                run.trigger,
                run.duration_ms as f64 / 1000.0
            ),
        ));
    }
    Ok(deploy_head(node, trigger, out)?.verdict())
}

/// Send a finished run's log to whoever is attached, a bounded piece at a time. A log
/// that cannot be read is said so in one line: the deploy itself is what was asked about.
fn replay(run: &RunRecord, out: &mut dyn Output) {
    let read = std::fs::File::open(&run.output).and_then(|file| {
        deploy::runner::for_each_line(file, &mut |line| {
            out.line(&deploy::runner::escape_controls(line))
        })
    });
    if let Err(e) = read {
        out.line(&format!(
            "(the output of run {} could not be read from {}: {e})",
            run.id,
            run.output.display()
        ));
    }
}

/// What the node's git hosting settings put at risk or leave unused, for each http(s)
/// remote: the same plan its fetch worker follows. Said on every pull.
fn hosting_warnings(
    layout: &crate::paths::Layout,
    repo: &Repo,
    remotes: &[(String, String)],
) -> Vec<String> {
    let config = match crate::repo::system_config(&layout.system_gitconfig()) {
        Ok(c) => c,
        Err(e) => return vec![e.to_string()],
    };
    let env = crate::hosting::Env::from_process();
    let mut warnings: Vec<String> = Vec::new();
    for (name, url) in remotes {
        if !crate::hosting::is_http(url) {
            continue;
        }
        let bare = crate::repo::without_credentials(url);
        let root_named = repo.config_value(&format!("remote.{name}.url")).as_deref() == Some(url);
        for w in crate::hosting::plan(&config, &env, name, &bare, root_named).warnings {
            if !warnings.contains(&w) {
                tracing::warn!("{w}");
                warnings.push(w);
            }
        }
    }
    warnings
}

fn save_json<T: Serialize>(path: &Path, value: &T) -> Result<(), PullError> {
    let bytes = serde_json::to_vec_pretty(value).expect("state serialises");
    fsutil::write_atomic(path, &bytes, 0o640).map_err(|source| PullError::State {
        path: path.display().to_string(),
        source,
    })
}

/// Pull and deploy if needed. `exe` is this program, run once per remote as `__fetch`;
/// `trigger` says who asked, for the run record; `now` (unix seconds) is the clock rollout
/// schedules are read against. The caller holds the node lock.
pub fn pull(
    node: &Node,
    exe: &Path,
    trigger: &str,
    now: i64,
    out: &mut dyn Output,
) -> Result<PullOutcome, PullError> {
    let layout = &node.layout;
    let settings = &node.settings;
    // Retries and repairs are stamped with it: a clock out of range stops here, said.
    let clock = crate::clock::unix_now()?;
    let repo = Repo::open(&layout.node_repo())?;
    let remotes = crate::repo::remote_urls(&layout.repo().join("config"))?;
    if remotes.is_empty() {
        return Err(PullError::NoRemotes(layout.repo().display().to_string()));
    }
    let branch_ref = format!("refs/heads/{}", settings.branch);
    let mut repaired = remove_stale_locks(node, &repo);
    // Admins the seed named before their accounts existed: cheap when there are none.
    match crate::admins::settle(layout, &settings.admin_group) {
        Ok(settled) => {
            for a in settled.added {
                tracing::info!(
                    "admin {a} exists now: added to group {}",
                    settings.admin_group
                );
            }
        }
        Err(e) => tracing::warn!("pending admins: {e}"),
    }
    // What a killed write left half-done, in troops' own state: nothing writes there now.
    for dir in [layout.state_dir(), layout.node_repo()] {
        for name in fsutil::sweep_temps(&dir) {
            repaired.push(format!("removed {name}, left by an interrupted write"));
        }
    }
    // A run the last agent left "running" is said to be over before anything else.
    deploy::record::RunStore::new(layout.runs())
        .mark_interrupted()
        .map_err(|source| PullError::State {
            path: layout.runs().display().to_string(),
            source,
        })?;
    let before = repair::before_fetch(&layout.node_repo(), clock)?;
    // The handle read the packs as they were; what was set aside must not be used.
    let repo = match before.said.is_empty() {
        true => repo,
        false => Repo::open(&layout.node_repo())?,
    };
    repaired.extend(before.said);
    // What members pushed to the shared repo is fetched like one more remote, beside them;
    // unless its branch still names what root fetched from it last time (the usual poll).
    let known = repo.ref_target(&fetch::tracking_ref(fetch::PUSHED, &settings.branch))?;
    let unchanged = known.filter(|k| {
        fetch::shared_tip(layout, &settings.branch).as_deref() == Some(k.to_string().as_str())
    });
    let mut jobs = remotes.clone();
    if unchanged.is_none() {
        jobs.push((
            fetch::PUSHED.to_owned(),
            layout.repo().display().to_string(),
        ));
    }
    let mut fetched = fetch::fetch_all(
        exe,
        layout.root(),
        &jobs,
        &settings.branch,
        Duration::from_secs(settings.fetch_timeout),
        settings.fetch_jobs as usize,
    );
    let pushed = match unchanged {
        Some(tip) => Some(Fetched::Tip { tip }),
        None => fetched.pop().map(|f| f.fetched),
    };
    repaired.extend(repair::after_fetch(&layout.node_repo())?);
    repair::hold_if_lost(&layout.node_repo(), &branch_ref)?;
    for what in &repaired {
        tracing::warn!("{what}");
    }

    let start = repo.ref_target(&branch_ref)?;
    // A push applies at once (no rollout), with the same fast-forward and signature rules.
    let (local, push_held) = take_pushed(node, &repo, start, pushed, now)?;
    let mut offers = Vec::new();
    for f in &fetched {
        if let Fetched::Tip { tip } = f.fetched {
            offers.push(Offer {
                remote: f.remote.clone(),
                tip,
                seen: repo.ref_target(&seen_ref(&f.remote))?,
            });
        }
    }
    let decision = target::choose(local, &offers, |a, b| {
        repo.is_ancestor(a, b).unwrap_or(false)
    });

    for (remote, high) in &decision.seen {
        let old = repo.ref_target(&seen_ref(remote))?;
        if old != Some(*high) {
            repo.update_ref(&seen_ref(remote), *high, old, "troops: newest tip seen")?;
        }
    }

    let mut remotes_report = Vec::new();
    for f in &fetched {
        let standing = decision
            .standings
            .iter()
            .find(|(r, _)| *r == f.remote)
            .map(|(_, s)| *s);
        let (fetch, tip, problem) = match &f.fetched {
            Fetched::Tip { tip } => {
                let problem = match standing {
                    Some(Standing::Rewound) => Some(format!(
                        "went backwards to {}; ignored, the node never rewinds",
                        tip.short()
                    )),
                    Some(Standing::Diverged) => Some(format!(
                        "{} does not contain the branch; ignored (force-pushed?)",
                        tip.short()
                    )),
                    _ => None,
                };
                ("tip", Some(*tip), problem)
            }
            Fetched::NoBranch => (
                "no-branch",
                None,
                Some(format!("has no branch {}", settings.branch)),
            ),
            Fetched::Failed { error } => ("failed", None, Some(error.clone())),
            Fetched::TimedOut { seconds } => (
                "timed-out",
                None,
                Some(format!("no answer within {seconds}s")),
            ),
        };
        if let Some(p) = &problem {
            tracing::warn!(remote = %f.remote, "remote {} ({}): {p}", f.remote, f.url);
        }
        if let Some(to) = &f.moved_to {
            tracing::warn!(remote = %f.remote, "remote {} ({}): moved to {to}; update its URL", f.remote, f.url);
        }
        remotes_report.push(RemoteReport {
            name: f.remote.clone(),
            url: f.url.clone(),
            fetch: fetch.into(),
            tip,
            standing: standing.map(|s| {
                serde_json::to_value(s)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            }),
            problem,
            moved_to: f.moved_to.clone(),
        });
    }

    // Staged rollout and signature checks may hold the node at an older commit on the way.
    let (target, held) = match decision.target {
        Some(t) => crate::gate::narrow(node, &repo, local, t, now, Rollout::Applies)?,
        None => (None, None),
    };
    let held = held.or(push_held);
    let target = target.filter(|t| Some(*t) != local);
    if let Some(h) = &held {
        tracing::warn!(commit = %h.commit, "holding before {}: {}", h.commit.short(), h.reason);
    }
    if let Some(t) = target {
        fast_forward(
            &repo,
            &branch_ref,
            local,
            t,
            "troops: fast-forward from remotes",
        )?;
    }
    let to = target.or(local).filter(|t| Some(*t) != start);
    if let Some(t) = to {
        // Only when something arrived: a no-op poll stays a no-op.
        if let Err(e) = repo.maintain() {
            tracing::warn!("{e}");
        }
        tracing::info!(
            commit = %t,
            "{} moved {} -> {}",
            settings.branch,
            start.map_or("nothing".into(), |l| l.short()),
            t.short()
        );
    }
    let mut report = PullReport {
        time: crate::clock::now_rfc3339(),
        branch: settings.branch.clone(),
        remotes: remotes_report,
        from: start,
        to,
        bucket: crate::gate::bucket(node),
        held,
        disagree: decision.disagree.clone(),
        waiting: None,
        repaired,
        warnings: hosting_warnings(layout, &repo, &remotes),
    };

    let head = repo.ref_target(&branch_ref)?;
    let deployed = repo.ref_target(DEPLOYED_REF)?;
    let mut run = None;
    if let Some(head) = head.filter(|h| Some(*h) != deployed) {
        let retry = load_retry(layout);
        match backoff::retry_at(
            retry.as_ref(),
            head,
            clock,
            settings.retry_min,
            settings.retry_max,
        ) {
            Some(at) => {
                let when = crate::clock::rfc3339(at);
                let msg = format!(
                    "deploy of {} failed {} time(s); next attempt after {when}",
                    head.short(),
                    retry.as_ref().map_or(0, |r| r.failures)
                );
                report.waiting = Some(msg);
            }
            None => {
                run = Some(deploy_tracked(
                    node,
                    &repo,
                    head,
                    trigger,
                    retry.as_ref(),
                    out,
                )?)
            }
        }
    }
    save_json(&layout.pull_report(), &report)?;
    crate::metrics::refresh(node);
    Ok(PullOutcome { report, run })
}

/// Deploy `head` and keep the retry state: cleared on success, one more failure otherwise.
fn deploy_tracked(
    node: &Node,
    repo: &Repo,
    head: CommitId,
    trigger: &str,
    retry: Option<&RetryState>,
    out: &mut dyn Output,
) -> Result<RunRecord, PullError> {
    let layout = &node.layout;
    let record = deploy::deploy(node, repo, head, trigger, out)?;
    if record.result == deploy::record::Outcome::Success {
        let _ = std::fs::remove_file(layout.retry_state());
    } else {
        // A clock out of range counts as 1970: the next pull retries at once.
        let now = crate::clock::unix_now().unwrap_or(0);
        let state = backoff::record_failure(retry, head, now);
        save_json(&layout.retry_state(), &state)?;
    }
    Ok(record)
}

/// Git locks in the node's repository older than `stale_lock`, removed; each said.
fn remove_stale_locks(node: &Node, repo: &Repo) -> Vec<String> {
    repo.remove_stale_locks(Duration::from_secs(node.settings.stale_lock))
        .into_iter()
        .map(|p| format!("removed a stale git lock, {p}, left by an interrupted run"))
        .collect()
}

#[derive(Debug, Error)]
#[error("branch {0} does not exist yet: nothing to deploy (run `troops pull` first)")]
pub struct NothingToDeploy(pub String);

/// Deploy the branch head now, whatever was deployed before and whatever the backoff says:
/// an operator asked. The caller holds the node lock.
pub fn deploy_head(node: &Node, trigger: &str, out: &mut dyn Output) -> anyhow::Result<RunRecord> {
    let layout = &node.layout;
    let repo = Repo::open(&layout.node_repo())?;
    for what in remove_stale_locks(node, &repo) {
        tracing::warn!("{what}");
    }
    let branch = &node.settings.branch;
    let head = repo
        .ref_target(&format!("refs/heads/{branch}"))?
        .ok_or_else(|| NothingToDeploy(branch.clone()))?;
    // The branch was verified when it moved; the keys may have changed since.
    let deployed = repo.ref_target(DEPLOYED_REF)?;
    if let Some(why) = crate::gate::refusal(node, &repo, deployed, head)? {
        anyhow::bail!("not deploying {}: {why}", head.short());
    }
    let retry = load_retry(layout);
    Ok(deploy_tracked(
        node,
        &repo,
        head,
        trigger,
        retry.as_ref(),
        out,
    )?)
}
