//! `troops init`: find the seed, plan, show or apply, then the first pull.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use troops::init::{self, Request};
use troops::names;
use troops::paths::Layout;
use troops::seed::{self, Seed, SeedError};
use troops::settings::{Settings, SettingsError};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A git remote to pull from, NAME=URL; repeat for more. Overrides the seed's.
    #[arg(long = "remote", value_name = "NAME=URL")]
    remotes: Vec<String>,
    /// A role of this node; repeat for more. Replaces the seed's roles.
    #[arg(long = "role", value_name = "ROLE")]
    roles: Vec<String>,
    /// The branch to follow.
    #[arg(long)]
    branch: Option<String>,
    /// A user to add to the admin group; repeat for more.
    #[arg(long = "admin", value_name = "USER")]
    admins: Vec<String>,
    /// The interpreter virtualenvs are made from.
    #[arg(long)]
    python: Option<PathBuf>,
    /// The host group whose members may push and trigger deploys.
    #[arg(long)]
    group: Option<String>,
    /// Read the seed from this file (cloud-config, JSON, MIME, gzip).
    #[arg(long, value_name = "FILE")]
    seed: Option<PathBuf>,
    /// Read the seed from this d-i preseed file.
    #[arg(long, value_name = "FILE")]
    preseed: Option<PathBuf>,
    /// Ask this IMDS endpoint for user data even where DMI does not say EC2.
    #[arg(long, value_name = "URL")]
    imds: Option<String>,
    /// Print what would be done and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not pull and deploy after init.
    #[arg(long)]
    no_pull: bool,
    /// Where no seed is found on a node not set up yet, say so and succeed: first boot
    /// (troops-init.service) on a machine nobody seeded is not a failure.
    #[arg(long)]
    if_seeded: bool,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// The seed: given files, else flags alone if they name remotes, else the first source
/// that has one; flags override what it says. `None`: no seed, and `--if-seeded` says that
/// is fine.
fn find_seed(
    layout: &Layout,
    args: &Args,
    old: Option<&Settings>,
    flags: Seed,
) -> Result<Option<(Seed, String)>> {
    let initialised = layout.repo().join("HEAD").exists();
    let imds = args
        .imds
        .clone()
        .or_else(|| old.and_then(|s| s.imds.clone()))
        .map(|url| {
            (
                url,
                Duration::from_secs(old.map_or(120, |s| s.imds_deadline)),
            )
        });
    let explicit = args.seed.is_some() || args.preseed.is_some();
    if !explicit && !flags.remotes.is_empty() {
        return Ok(Some((flags, "the command line".into())));
    }
    let sources = if explicit {
        let mut s = Vec::new();
        s.extend(args.seed.clone().map(seed::SourceKind::File));
        s.extend(args.preseed.clone().map(seed::SourceKind::PreseedFile));
        s
    } else {
        seed::sources(layout.root(), None, None, imds)
    };
    match seed::discover(layout.root(), &sources) {
        Ok((found, origin)) => Ok(Some((found.merged(flags), origin))),
        // An initialised node re-run without a seed keeps what it has.
        Err(SeedError::NotFound(_)) if initialised && !explicit => {
            Ok(Some((flags, "the command line".into())))
        }
        Err(SeedError::NotFound(places)) if args.if_seeded && !explicit => {
            println!(
                "troops: no seed found, nothing to do (looked at: {}); run `troops init` with one to set this node up",
                places.join("; ")
            );
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

pub fn run(root: &Path, args: &Args, stdout_is_journal: bool) -> Result<u8> {
    let layout = Layout::new(root);
    // Everything is checked before anything is written.
    let remotes = args
        .remotes
        .iter()
        .map(|r| names::parse_remote_spec(r))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, (name, _)) in remotes.iter().enumerate() {
        if remotes[..i].iter().any(|(n, _)| n == name) {
            anyhow::bail!("--remote {name}=… is given twice: give each remote once");
        }
    }
    let mut flags = init::flags_seed(&remotes, &args.roles, args.branch.as_deref());
    if !args.admins.is_empty() {
        // Typed by a person: a name that is not a user is a mistake to say now. An admin a
        // seed names may be made later by cloud-init, and waits (admins.rs).
        for a in &args.admins {
            if !troops::accounts::user_exists(a)? {
                anyhow::bail!("--admin {a}: no such user on this machine");
            }
        }
        flags.admins = Some(args.admins.clone());
    }
    flags.validate("the command line")?;
    let old = match Settings::load(&layout.settings_file()) {
        Ok(s) => Some(s),
        Err(
            SettingsError::NotInitialised(_)
            | SettingsError::Empty(_)
            | SettingsError::Truncated(_),
        ) => None,
        Err(e) => return Err(e.into()),
    };
    let Some((seed, origin)) = find_seed(&layout, args, old.as_ref(), flags)? else {
        return Ok(0);
    };
    seed.validate(&origin)?;
    let request = Request {
        seed,
        python: args.python.clone(),
        group: args.group.clone(),
        imds: args.imds.clone(),
        exe: std::env::current_exe().context("failed to find this program for the repo's hooks")?,
    };

    let plan = init::plan(&layout, &request)?;
    if args.dry_run {
        println!("troops: seed from {origin}; a real init would:");
        for c in &plan.changes {
            println!("  {c}");
        }
        if plan.is_empty() {
            println!("  change nothing");
        }
        return Ok(0);
    }
    // Locked only now: a plan that fails must not leave even a lock file on a fresh node.
    let lock = super::lock_node(&layout)?;
    let changes = plan.changes.clone();
    if changes.is_empty() {
        println!(
            "troops: node at {} is up to date (seed from {origin}); nothing changed",
            root.display()
        );
    } else {
        // Said before the work (the key takes a moment): the journal's timestamps then show
        // what the seed and what init's own work cost.
        println!("troops: seed from {origin}");
    }
    let background = init::apply(&layout, plan, &format!("troops@{}", hostname()))
        .context("init failed; the node is as it was")?;
    for c in changes {
        println!("troops: {c}");
    }
    enable_timer(root);
    if args.no_pull {
        background.finish().context(
            "the node is set up, but its key could not be made; run `troops init` again",
        )?;
        return Ok(0);
    }
    drop(lock);
    // The first pull may well fail (the git server does not know the node's key yet); init
    // itself succeeded, and the timer will pull again.
    let hint =
        "authorise the node's key (`troops key`) if the remote needs it; the timer pulls again";
    match super::pull::run(root, None, stdout_is_journal) {
        Ok(0) => {}
        Ok(_) => eprintln!("troops: the first pull did not deploy; {hint}"),
        Err(e) => eprintln!("troops: the first pull failed: {e:#}; {hint}"),
    }
    // Made while the first pull fetched, when no remote needed it (and in place by now,
    // unless making it failed).
    background
        .finish()
        .context("the node is set up, but its key could not be made; run `troops init` again")?;
    Ok(0)
}

/// Start pulling on the timer when systemd runs this machine and the package's units are
/// installed; a node under another root (a test, an image being built) is left alone.
fn enable_timer(root: &Path) {
    if root != Path::new("/") || !Path::new("/run/systemd/system").is_dir() {
        return;
    }
    if !Path::new("/usr/lib/systemd/system/troops-pull.timer").exists() {
        return;
    }
    // The interval drop-in may have changed.
    let _ = std::process::Command::new("systemctl")
        .arg("daemon-reload")
        .status();
    let status = std::process::Command::new("systemctl")
        .args(["enable", "--now", "troops-pull.timer"])
        .status();
    if !status.is_ok_and(|s| s.success()) {
        eprintln!("troops: could not enable troops-pull.timer; enable it with systemctl");
    }
}
