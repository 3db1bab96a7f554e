//! Command-line parsing and one module per subcommand. Only this layer knows about the
//! terminal.

pub mod deploy;
pub mod fetch_worker;
pub mod generate;
pub mod hook;
pub mod init;
pub mod key;
pub mod log;
pub mod pull;
pub mod run;
pub mod serve;
pub mod status;

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "troops",
    version,
    about = "Make this machine deploy itself from git"
)]
pub struct Cli {
    /// Prefix for every node path (/etc/troops, /var/lib/troops, /run/troops), like dpkg --root.
    #[arg(long, global = true, env = "TROOPS_ROOT", default_value = "/")]
    pub root: PathBuf,

    /// Read rollout schedules against this clock (unix seconds) instead of the real one.
    #[arg(long, global = true, hide = true, value_name = "UNIX_SECONDS")]
    pub now: Option<i64>,

    /// Log more (-v: debug, -vv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Set the node up from its seed (or flags): key, repo, remotes, settings; then the
    /// first pull. Safe to run again.
    Init(init::Args),
    /// Print the node's public SSH key, to authorise it on the git server.
    Key,
    /// Fetch every remote, fast-forward the branch, deploy if it moved.
    Pull,
    /// Run deploy.py for the current branch head now.
    Deploy,
    /// What the node has, what it deployed, and what its remotes said.
    Status(status::Args),
    /// Past runs, newest first; `log RUN` prints one run's output.
    Log(log::Args),
    /// Run a working copy's deploy.py locally, with no node state.
    Run(run::Args),
    /// The daemon that runs deploys for the admin group (socket-activated by troops.socket).
    Serve,
    /// What the bare repo's hooks run for a git push.
    Hook(hook::Args),
    #[command(name = "__assets", hide = true)]
    Assets(generate::Args),
    #[command(name = "__fetch", hide = true)]
    Fetch(fetch_worker::Args),
}

/// Where a run's output goes when a person is watching: stdout, a line at a time. When
/// stdout is already the journal (under systemd) the journal layer has it, so nothing.
pub fn terminal(stdout_is_journal: bool) -> Box<dyn troops::output::Output> {
    if stdout_is_journal {
        return Box::new(troops::output::Discard);
    }
    Box::new(|line: &str| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    })
}

/// Take the node lock, saying so if another run holds it.
pub fn lock_node(layout: &troops::paths::Layout) -> anyhow::Result<troops::lock::NodeLock> {
    use anyhow::Context;
    let path = layout.lock_file();
    troops::lock::acquire(&path, || {
        eprintln!(
            "troops: another troops run holds {}; waiting for it to finish",
            path.display()
        )
    })
    .with_context(|| format!("failed to lock {}", path.display()))
}

/// One line about a run, as `status` and `log` show it.
pub fn run_summary(r: &troops::deploy::record::RunRecord) -> String {
    format!(
        "run {} {} {} at {} ({}, {:.1}s){}",
        r.id,
        r.result,
        r.commit.short(),
        r.started,
        r.trigger,
        r.duration_ms as f64 / 1000.0,
        r.error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default()
    )
}

/// The exit status for a finished run, saying why on stderr when it failed.
pub fn run_exit(run: &troops::deploy::record::RunRecord) -> u8 {
    let (code, summary) = run.verdict();
    if code != 0 {
        eprintln!("troops: error: {summary}");
    }
    code
}

/// Whether this process may run a deploy itself; everyone else asks the root daemon.
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}
