//! `troops run DIR`: a working copy's deploy.py, run here and now, with a venv cached under
//! the user's cache dir and no node state read or written.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use troops::deploy::{module, python, venv};
use troops::settings::Installer;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The working copy holding deploy.py.
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// A role to run with; repeat for more.
    #[arg(long = "role", value_name = "ROLE")]
    roles: Vec<String>,
    /// The interpreter the venv is made from.
    #[arg(long, default_value = "/usr/bin/python3")]
    python: PathBuf,
    /// The fully qualified host name deploy.py sees.
    #[arg(long)]
    hostname: Option<String>,
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("troops")
}

pub fn run(root: &Path, args: &Args) -> Result<u8> {
    for role in &args.roles {
        troops::names::check_role(role)?;
    }
    let dir = std::fs::canonicalize(&args.dir)
        .with_context(|| format!("failed to open {}", args.dir.display()))?;
    if !dir.join("deploy.py").is_file() {
        bail!("{} has no deploy.py", dir.display());
    }
    let requirements = std::fs::read(dir.join("requirements.txt")).ok();
    let mut local_ids = Vec::new();
    if let Some(r) = &requirements {
        for p in venv::local_paths(&String::from_utf8_lossy(r)) {
            let id = venv::disk_id(&dir.join(&p)).unwrap_or_else(|_| "missing".into());
            local_ids.push((p, id));
        }
    }
    let cache = cache_dir();
    let spec = venv::VenvSpec {
        python: args.python.clone(),
        requirements,
        local_ids,
        module_dir: module::locate(&cache.join("python"))?,
        installer: Installer::Auto,
        timeout: std::time::Duration::from_secs(
            troops::settings::Settings::default().deploy_timeout,
        ),
        shared: cache.join("shared-pip"),
        cache: cache.join("downloads"),
    };
    let mut print = |l: &str| println!("{l}");
    let (venv_dir, _) = venv::ensure(&cache.join("venvs"), &spec, &dir, &mut print)?;
    let context = python::Context {
        roles: args.roles.clone(),
        commit: None,
        previous_commit: None,
        settings: serde_json::json!({ "roles": args.roles }),
        hostname: Some(args.hostname.clone().unwrap_or_else(troops::hostname::fqdn)),
        root: root.display().to_string(),
    };
    let scratch = tempfile::tempdir().context("failed to make a scratch dir")?;
    let outcome = python::run_deploy_py(
        &venv_dir,
        &dir,
        &context,
        &scratch.path().join("run"),
        // A developer's own run, watched: only a bound against forgetting it.
        std::time::Duration::from_secs(86_400),
        spec.installer_env(),
        &mut print,
    )?;
    if let Some(r) = &outcome.results {
        for d in &r.deployables {
            println!("troops: deployable {}: {}", d.name, d.status);
        }
    }
    Ok(if outcome.succeeded() { 0 } else { 1 })
}
