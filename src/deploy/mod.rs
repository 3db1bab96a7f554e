//! The deploy pipeline (DESIGN.md, "Deploy"): materialise the commit, find or build its venv,
//! run deploy.py, move `refs/troops/deployed` on success, and record the run either way.
//! The caller holds the node lock.

mod log;
pub mod module;
pub mod python;
pub mod record;
pub mod runner;
pub mod venv;
mod worktree;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use thiserror::Error;

use crate::fsutil;
use crate::node::Node;
use crate::output::Output;
use crate::repo::{CommitId, Repo, RepoError};
use record::{Outcome, RunRecord, RunStore};

pub const DEPLOYED_REF: &str = "refs/troops/deployed";

/// Problems that stop a run from even being recorded. Everything else (no deploy.py, a venv
/// that won't build, deploy.py failing) is a failed run with a one-line error.
#[derive(Debug, Error)]
pub enum DeployError {
    #[error("failed to write the run record in {path}: {source}")]
    Record { path: PathBuf, source: io::Error },
}

/// Streams a run's output to its log file, the journal and whoever is attached.
struct RunLog<'a> {
    file: Option<log::BoundedLog>,
    out: &'a mut dyn Output,
    commit: String,
    run_id: u64,
    /// The last line a child printed: what a one-line error quotes.
    last: Option<String>,
}

impl RunLog<'_> {
    fn line(&mut self, line: &str) {
        if !line.trim().is_empty() && !line.starts_with("troops: ") {
            self.last = Some(line.trim().to_owned());
        }
        if let Some(f) = &mut self.file {
            let _ = f.line(line);
        }
        tracing::info!(target: "troops::output", commit = %self.commit, run_id = self.run_id, "{line}");
        self.out.line(line);
    }

    /// The run's last line when it failed: at error priority in the journal.
    fn failure(&mut self, line: &str) {
        if let Some(f) = &mut self.file {
            let _ = f.line(line);
        }
        tracing::error!(target: "troops::output", commit = %self.commit, run_id = self.run_id, "{line}");
        self.out.line(line);
    }
}

/// The ids of repo-local paths requirements.txt names, from the commit's tree.
fn local_ids(
    repo: &Repo,
    commit: CommitId,
    requirements: &str,
) -> Result<Vec<(String, String)>, RepoError> {
    let mut ids = Vec::new();
    for path in venv::local_paths(requirements) {
        let id = match venv::in_repo(&path) {
            Some(p) => repo
                .entry_id(commit, &p)?
                .unwrap_or_else(|| "missing".into()),
            // Outside the repository: nothing to track it by but its name.
            None => "outside".into(),
        };
        ids.push((path, id));
    }
    Ok(ids)
}

/// Deploy `commit` now. Returns the run's record; a failed deploy is `Ok` with
/// `result: Failed`.
pub fn deploy(
    node: &Node,
    repo: &Repo,
    commit: CommitId,
    trigger: &str,
    out: &mut dyn Output,
) -> Result<RunRecord, DeployError> {
    let layout = &node.layout;
    let settings = &node.settings;
    let store = RunStore::new(layout.runs());
    let record_err = |source| DeployError::Record {
        path: layout.runs(),
        source,
    };
    fsutil::create_dirs(&layout.runs(), 0o750).map_err(record_err)?;
    store.mark_interrupted().map_err(record_err)?;
    let mut swept: Vec<String> = store
        .sweep_scratch()
        .into_iter()
        .map(|f| format!("troops: removed {f}, left by an interrupted run"))
        .collect();
    swept.extend(
        venv::sweep_unfinished(&layout.venvs())
            .into_iter()
            .map(|v| {
                format!("troops: removed the unfinished virtualenv {v}, left by an interrupted run")
            }),
    );
    let previous = repo.ref_target(DEPLOYED_REF).ok().flatten();
    let id = store.next_id();
    let started = Instant::now();
    let mut record = RunRecord {
        id,
        commit,
        previous,
        trigger: trigger.to_owned(),
        started: crate::clock::now_rfc3339(),
        duration_ms: 0,
        result: Outcome::Running,
        exit_code: None,
        error: None,
        roles: settings.roles.clone(),
        deployables: Vec::new(),
        venv: None,
        output: store.log_path(id),
    };
    store.save(&record).map_err(record_err)?;
    let file = log::BoundedLog::create(&store.log_path(id), settings.log_max).ok();
    let mut log = RunLog {
        file,
        out,
        commit: commit.to_string(),
        run_id: id,
        last: None,
    };
    log.line(&format!(
        "troops: run {id}: deploying {} (was {})",
        commit.short(),
        previous.map_or("nothing".into(), |p| p.short())
    ));
    for line in &swept {
        log.line(line);
    }

    let result = run_steps(node, repo, commit, previous, &mut record, &mut log);
    record.duration_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok(()) => record.result = Outcome::Success,
        Err(e) => {
            record.result = Outcome::Failed;
            record.error = Some(e);
        }
    }
    match (&record.result, &record.error) {
        (Outcome::Success, _) => log.line(&format!(
            "troops: run {id}: deployed {} in {:.1}s",
            commit.short(),
            record.duration_ms as f64 / 1000.0
        )),
        (_, Some(e)) => log.failure(&format!("troops: run {id}: FAILED: {e}")),
        _ => {}
    }
    if let Some(f) = &log.file {
        let _ = f.sync();
    }
    // The record is finished before `deployed` moves: a success that could not be recorded
    // (a full disk) is reported as a failure and tried again, never left "running" with the
    // node believing it done.
    if let Err(source) = store.save(&record) {
        log.failure(&format!(
            "troops: run {id}: FAILED: could not record the run in {}: {source}",
            layout.runs().display()
        ));
        return Err(record_err(source));
    }
    if record.result == Outcome::Success
        && let Err(e) = repo.update_ref(
            DEPLOYED_REF,
            commit,
            previous,
            &format!("troops: deployed (run {id})"),
        )
    {
        record.result = Outcome::Failed;
        record.error = Some(e.to_string());
        log.failure(&format!("troops: run {id}: FAILED: {e}"));
        store.save(&record).map_err(record_err)?;
    }
    store.count(&record).map_err(record_err)?;
    store.prune(settings.keep_runs);
    crate::metrics::refresh(node);
    Ok(record)
}

fn run_steps(
    node: &Node,
    repo: &Repo,
    commit: CommitId,
    previous: Option<CommitId>,
    record: &mut RunRecord,
    log: &mut RunLog<'_>,
) -> Result<(), String> {
    let short = commit.short();
    if repo
        .read_file(commit, "deploy.py")
        .map_err(|e| e.to_string())?
        .is_none()
    {
        return Err(format!(
            "commit {short} has no deploy.py at the top of its tree"
        ));
    }
    let (checkout, made, cleaner) = worktree::materialise(repo, commit, &node.layout.work())?;
    if let worktree::Made::Updated { changed, removed } = made {
        let mut line = format!(
            "updated the last checkout in place ({changed} file{} changed",
            if changed == 1 { "" } else { "s" }
        );
        if removed > 0 {
            line.push_str(&format!(", {removed} left by the last run removed"));
        }
        log.line(&(line + ")"));
    }
    let result = deploy_checkout(node, repo, commit, previous, &checkout, record, log);
    let _ = cleaner.join();
    result
}

fn deploy_checkout(
    node: &Node,
    repo: &Repo,
    commit: CommitId,
    previous: Option<CommitId>,
    checkout: &Path,
    record: &mut RunRecord,
    log: &mut RunLog<'_>,
) -> Result<(), String> {
    let layout = &node.layout;
    let settings = &node.settings;
    let short = commit.short();

    let requirements = repo
        .read_file(commit, "requirements.txt")
        .map_err(|e| e.to_string())?;
    let local = match &requirements {
        Some(r) => {
            local_ids(repo, commit, &String::from_utf8_lossy(r)).map_err(|e| e.to_string())?
        }
        None => Vec::new(),
    };
    let module_dir = module::locate(&layout.python_module_copy()).map_err(|e| e.to_string())?;
    let spec = venv::VenvSpec {
        python: settings.python.clone(),
        requirements,
        local_ids: local,
        module_dir,
        installer: settings.installer,
        timeout: std::time::Duration::from_secs(settings.deploy_timeout),
        shared: layout.shared_pip(),
        cache: layout.cache(),
    };
    let (venv_dir, built) = venv::ensure(&layout.venvs(), &spec, checkout, &mut |l| log.line(l))
        .map_err(|e| with_last(format!("commit {short}: {e}"), log))?;
    let venv_key = venv_dir
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    if !built {
        log.line(&format!("troops: reusing virtualenv {venv_key}"));
    }
    record.venv = Some(venv_key);

    let context = python::Context {
        roles: settings.roles.clone(),
        commit: Some(commit.to_string()),
        previous_commit: previous.map(|p| p.to_string()),
        settings: serde_json::to_value(settings).unwrap_or_default(),
        // As `hostname --fqdn` says, unless the settings name it: deploy.py gets it made.
        hostname: Some(
            settings
                .hostname
                .clone()
                .unwrap_or_else(crate::hostname::fqdn),
        ),
        root: layout.root().display().to_string(),
    };
    let scratch = layout.runs().join(record.id.to_string());
    log.last = None;
    let timeout = std::time::Duration::from_secs(node.settings.deploy_timeout);
    let outcome = python::run_deploy_py(
        &venv_dir,
        checkout,
        &context,
        &scratch,
        timeout,
        spec.installer_env(),
        &mut |l| log.line(l),
    )
    .map_err(|e| {
        format!(
            "failed to run deploy.py with {}: {e}",
            venv_dir.join("bin/python").display()
        )
    })?;
    record.exit_code = outcome.exit_code;
    if let Some(r) = &outcome.results {
        record.roles = r.roles.clone();
        record.deployables = r.deployables.clone();
        for d in &r.deployables {
            log.line(&format!(
                "troops: deployable {}: {}{}",
                d.name,
                d.status,
                d.detail
                    .as_deref()
                    .map(|x| format!(" ({x})"))
                    .unwrap_or_default()
            ));
        }
    }
    // The venvs of the last `keep_venvs` deployed commits, and this run's.
    let mut keep: Vec<String> = record::RunStore::new(layout.runs())
        .list()
        .into_iter()
        .filter(|r| r.result == record::Outcome::Success)
        .filter_map(|r| r.venv)
        .fold(Vec::new(), |mut acc, v| {
            if !acc.contains(&v) && acc.len() < settings.keep_venvs {
                acc.push(v);
            }
            acc
        });
    keep.extend(record.venv.clone());
    for name in venv::prune(&layout.venvs(), &keep) {
        log.line(&format!("troops: removed the old virtualenv {name}"));
    }
    if outcome.succeeded() {
        return Ok(());
    }
    let failed: Vec<&str> = outcome
        .results
        .iter()
        .flat_map(|r| &r.deployables)
        .filter(|d| d.status == "failed")
        .map(|d| d.name.as_str())
        .collect();
    let message = match (outcome.exit_code, failed.as_slice()) {
        (_, [_, ..])
            if outcome
                .results
                .as_ref()
                .is_some_and(|r| r.top_level == "ok") =>
        {
            format!(
                "commit {short}: deploy.py deployable {} failed",
                failed.join(", ")
            )
        }
        (Some(code), _) => format!("commit {short}: deploy.py exited with status {code}"),
        (None, _) => format!("commit {short}: deploy.py was killed by a signal"),
    };
    Err(with_last(message, log))
}

/// Quote the last line the child printed, usually the exception: the one line an operator
/// needs; the whole output is in the run log.
fn with_last(message: String, log: &RunLog<'_>) -> String {
    match &log.last {
        Some(last) => format!("{message}: {}", quote(last)),
        None => message,
    }
}

/// At most [`QUOTE_MAX`] bytes of `line` (cut at a character boundary, marked `...`): a
/// summary and a record stay one short line whatever deploy.py printed.
fn quote(line: &str) -> String {
    if line.len() <= QUOTE_MAX {
        return line.to_owned();
    }
    let mut end = QUOTE_MAX;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}... ({} bytes in all; see the run log)",
        &line[..end],
        line.len()
    )
}

const QUOTE_MAX: usize = 300;
