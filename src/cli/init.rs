use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use troops::names;
use troops::paths::Layout;
use troops::repo::Repo;
use troops::settings::{Settings, SettingsError};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A git remote to pull from, NAME=URL; repeat for more.
    #[arg(long = "remote", value_name = "NAME=URL")]
    remotes: Vec<String>,
    /// A role of this node; repeat for more. Replaces the roles set before.
    #[arg(long = "role", value_name = "ROLE")]
    roles: Vec<String>,
    /// The branch to follow.
    #[arg(long)]
    branch: Option<String>,
    /// The interpreter virtualenvs are made from.
    #[arg(long)]
    python: Option<PathBuf>,
}

pub fn run(root: &Path, args: &Args) -> Result<u8> {
    let layout = Layout::new(root);
    // Everything is checked before anything is written.
    let remotes = args
        .remotes
        .iter()
        .map(|r| names::parse_remote_spec(r))
        .collect::<Result<Vec<_>, _>>()?;
    let settings_path = layout.settings_file();
    let old = match Settings::load(&settings_path) {
        Ok(s) => Some(s),
        Err(SettingsError::NotInitialised(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let mut settings = old.clone().unwrap_or_default();
    if !args.roles.is_empty() {
        settings.roles = args.roles.clone();
    }
    if let Some(b) = &args.branch {
        settings.branch = b.clone();
    }
    if let Some(p) = &args.python {
        settings.python = p.clone();
    }
    settings.validate(&settings_path)?;

    let _lock = super::lock_node(&layout)?;
    for dir in [
        layout.etc(),
        layout.state_dir(),
        layout.runs(),
        layout.work(),
        layout.venvs(),
    ] {
        troops::fsutil::create_dirs(&dir, 0o755)
            .with_context(|| format!("failed to create {}", dir.display()))?;
    }
    let mut repo = Repo::open_or_init(&layout.repo())?;
    let existing = repo.remotes();
    let mut changes = Vec::new();
    for (name, url) in &remotes {
        match existing.iter().find(|(n, _)| n == name) {
            Some((_, u)) if u == url => {}
            Some((_, u)) => {
                repo.set_remote(name, url)?;
                changes.push(format!("remote {name}: {u} -> {url}"));
            }
            None => {
                repo.set_remote(name, url)?;
                changes.push(format!("remote {name}: added {url}"));
            }
        }
    }
    if old.as_ref() != Some(&settings) {
        settings.save(&settings_path)?;
        changes.push(match old {
            None => format!("settings: wrote {}", settings_path.display()),
            Some(_) => format!("settings: updated {}", settings_path.display()),
        });
    }
    if changes.is_empty() {
        println!(
            "troops: node at {} is up to date; nothing changed",
            root.display()
        );
    }
    for c in changes {
        println!("troops: {c}");
    }
    Ok(0)
}
