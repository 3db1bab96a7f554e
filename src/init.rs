//! `troops init`: make or update a node from a seed. Everything is planned first (what would
//! change, checked against the node as it is), then staged (temp files, a key made beside
//! the old, a new repo built aside), then committed by renames, so an init that fails
//! part-way leaves the node as it was. Run again with the same seed, it changes nothing.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::accounts::{self, AccountError};
use crate::fsutil;
use crate::keys::{self, KeyError};
use crate::paths::Layout;
use crate::repo::{Repo, RepoError};
use crate::seed::Seed;
use crate::settings::{Settings, SettingsError};

#[derive(Debug, Error)]
pub enum InitError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Account(#[from] AccountError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no remotes: give one with --remote NAME=URL or in the seed's troops.remotes")]
    NoRemotes,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> InitError {
    let path = path.to_owned();
    move |source| InitError::Io { path, source }
}

/// What an operator asked for: the merged seed and the flags that are not part of a seed.
#[derive(Debug, Default)]
pub struct Request {
    pub seed: Seed,
    pub python: Option<PathBuf>,
    pub group: Option<String>,
    pub imds: Option<String>,
    /// The program the repo's hooks run (this one).
    pub exe: PathBuf,
}

/// What init will do; `changes` says it in words.
pub struct Plan {
    pub changes: Vec<String>,
    settings: Settings,
    write_settings: bool,
    new_repo: bool,
    remotes: Vec<(String, String)>,
    config: Vec<(&'static str, String)>,
    make_key: bool,
    files: Vec<(PathBuf, String, u32)>,
    create_group: bool,
    admins: Vec<String>,
    /// Hooks to (re)write in the repo: name and script.
    hooks: Vec<(&'static str, String)>,
    /// Mark the repo safe for every user in the system git config.
    trust: bool,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// troops-pull.timer's interval and splay from the settings (systemd reads drop-ins over
/// the packaged unit; a stable per-host splay spreads a fleet over one interval).
pub fn timer_dropin(interval: u64) -> String {
    // The empty assignment that drops the packaged interval resets every monotonic trigger
    // of the timer, not only OnUnitActiveSec: the first run (OnActiveSec) must be stated
    // again, or the timer never fires. Found by the booted test.
    format!(
        "# Written by `troops init` from `interval` in /etc/troops/troops.toml.\n[Timer]\nOnUnitActiveSec=\nOnActiveSec=1min\nOnUnitActiveSec={interval}s\nRandomizedDelaySec={interval}s\n"
    )
}

/// `'…'` for sh, whatever the path holds.
fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// The hook scripts: each hands the push to `troops hook`, under this node's root.
pub fn hook_script(exe: &Path, root: &Path, which: &str) -> String {
    format!(
        "#!/bin/sh\n# Installed by `troops init`, which rewrites it: a push to this node goes through troops.\nexec {} --root {} hook {which}\n",
        sh_quote(exe),
        sh_quote(root)
    )
}

fn list(v: &[String]) -> String {
    format!("[{}]", v.join(", "))
}

/// Each key that differs between two settings, as `key: old -> new`.
fn settings_diff(old: &Settings, new: &Settings) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return vec!["settings changed".into()];
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show =
                |v: Option<&serde_json::Value>| v.map_or("(unset)".into(), |v| v.to_string());
            format!("setting {k}: {} -> {}", show(a.get(k)), show(b.get(k)))
        })
        .collect()
}

pub fn plan(layout: &Layout, req: &Request) -> Result<Plan, InitError> {
    let settings_path = layout.settings_file();
    let old = match Settings::load(&settings_path) {
        Ok(s) => Some(s),
        Err(SettingsError::NotInitialised(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let mut settings = old.clone().unwrap_or_default();
    let seed = &req.seed;
    if let Some(roles) = &seed.roles {
        settings.roles = roles.clone();
    }
    if let Some(b) = &seed.branch {
        settings.branch = b.clone();
    }
    if let Some(v) = seed.verify {
        settings.verify = v;
    }
    if let Some(p) = &req.python {
        settings.python = p.clone();
    }
    if let Some(g) = &req.group {
        settings.admin_group = g.clone();
    }
    if let Some(i) = &req.imds {
        settings.imds = Some(i.clone());
    }
    settings.validate(&settings_path)?;

    let mut changes = Vec::new();
    let write_settings = old.as_ref() != Some(&settings);
    match &old {
        None => changes.push(format!(
            "settings: write {} (branch {}, roles {})",
            settings_path.display(),
            settings.branch,
            list(&settings.roles)
        )),
        Some(o) => changes.extend(settings_diff(o, &settings)),
    }

    let repo_path = layout.repo();
    let existing = match repo_path.join("HEAD").exists() {
        true => Some(Repo::open(&repo_path)?),
        false => None,
    };
    let new_repo = existing.is_none();
    if new_repo {
        changes.push(format!("repository: create {}", repo_path.display()));
    }
    let current: Vec<(String, String)> = existing.as_ref().map(|r| r.remotes()).unwrap_or_default();
    let mut remotes = Vec::new();
    for (name, url) in &seed.remotes {
        match current.iter().find(|(n, _)| n == name) {
            Some((_, u)) if u == url => {}
            Some((_, u)) => {
                changes.push(format!("remote {name}: {u} -> {url}"));
                remotes.push((name.clone(), url.clone()));
            }
            None => {
                changes.push(format!("remote {name}: add {url}"));
                remotes.push((name.clone(), url.clone()));
            }
        }
    }
    if current.is_empty() && remotes.is_empty() {
        return Err(InitError::NoRemotes);
    }

    let ssh_dir = layout.ssh_dir();
    let ssh_command = keys::ssh_command(&ssh_dir);
    let mut config = Vec::new();
    for (key, value) in [
        ("core.sshCommand", ssh_command),
        ("core.sharedRepository", "group".to_string()),
    ] {
        if existing
            .as_ref()
            .and_then(|r| r.config_value(key))
            .as_deref()
            != Some(value.as_str())
        {
            if !new_repo {
                changes.push(format!("repository: set {key} = {value}"));
            }
            config.push((key, value));
        }
    }

    let make_key = !keys::private_key(&ssh_dir).exists();
    if make_key {
        changes.push(format!(
            "ssh key: make {} (RSA {})",
            keys::private_key(&ssh_dir).display(),
            keys::KEY_BITS
        ));
    }
    let mut files = Vec::new();
    let mut want_file = |path: PathBuf, contents: String, mode: u32, what: &str| {
        if fs::read_to_string(&path).ok().as_deref() != Some(contents.as_str()) {
            changes.push(format!("{what}: write {}", path.display()));
            files.push((path, contents, mode));
        }
    };
    let pinned = seed.known_hosts.is_some();
    want_file(
        ssh_dir.join("config"),
        keys::ssh_config(&ssh_dir, pinned),
        0o644,
        "ssh config",
    );
    match &seed.known_hosts {
        Some(lines) => want_file(
            ssh_dir.join("known_hosts"),
            lines.join("\n") + "\n",
            0o644,
            "known_hosts",
        ),
        // Nothing pinned: keep what ssh learnt so far, or start empty.
        None if !ssh_dir.join("known_hosts").exists() => want_file(
            ssh_dir.join("known_hosts"),
            String::new(),
            0o644,
            "known_hosts",
        ),
        None => {}
    }
    want_file(
        layout.timer_dropin(),
        timer_dropin(settings.interval),
        0o644,
        "pull timer",
    );
    if let Some(lines) = &seed.allowed_signers {
        want_file(
            layout.allowed_signers(),
            lines.join("\n") + "\n",
            0o644,
            "allowed_signers",
        );
    }

    let mut hooks = Vec::new();
    for which in ["pre-receive", "post-receive"] {
        let script = hook_script(&req.exe, layout.root(), which);
        let path = repo_path.join("hooks").join(which);
        if fs::read_to_string(&path).ok().as_deref() != Some(script.as_str()) {
            if !new_repo {
                changes.push(format!("repository: install hook {which}"));
            }
            hooks.push((which, script));
        }
    }

    let trust = !crate::repo::trusted_for_all(&layout.system_gitconfig(), &repo_path);
    if trust {
        changes.push(format!(
            "git: trust {} for pushers (safe.directory in {})",
            repo_path.display(),
            layout.system_gitconfig().display()
        ));
    }

    let group = settings.admin_group.clone();
    let create_group = accounts::group_gid(&group)?.is_none();
    if create_group {
        changes.push(format!("group {group}: create"));
    }
    let mut admins = Vec::new();
    for a in seed.admins.iter().flatten() {
        if !accounts::user_exists(a)? {
            return Err(AccountError::NoSuchUser(a.clone()).into());
        }
        if create_group || !accounts::is_member(a, &group)? {
            changes.push(format!("admin {a}: add to group {group}"));
            admins.push(a.clone());
        }
    }

    Ok(Plan {
        changes,
        settings,
        write_settings,
        new_repo,
        remotes,
        config,
        make_key,
        files,
        create_group,
        admins,
        hooks,
        trust,
    })
}

/// A file written and synced beside its destination; `commit` renames it into place.
struct StagedFile {
    tmp: PathBuf,
    dest: PathBuf,
}

impl StagedFile {
    fn write(dest: &Path, contents: &[u8], mode: u32) -> Result<StagedFile, InitError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = dest.parent().unwrap_or(Path::new("/"));
        fsutil::create_dirs(dir, 0o755).map_err(io_err(dir))?;
        let tmp = dir.join(format!(
            ".{}.init-{}",
            dest.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(contents)
            .and_then(|_| f.sync_all())
            .map_err(io_err(&tmp))?;
        Ok(StagedFile {
            tmp,
            dest: dest.to_owned(),
        })
    }

    fn commit(&self) -> Result<(), InitError> {
        fs::rename(&self.tmp, &self.dest).map_err(io_err(&self.dest))?;
        fsutil::sync_dir(self.dest.parent().unwrap_or(Path::new("/"))).map_err(io_err(&self.dest))
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Make the repo writable by the admin group, as `git init --shared=group` would: group
/// ownership, group-writable, setgid directories so new files keep the group.
pub fn share_with_group(repo: &Path, gid: u32) -> Result<bool, InitError> {
    let mut changed = false;
    let mut stack = vec![repo.to_owned()];
    while let Some(p) = stack.pop() {
        let meta = fs::symlink_metadata(&p).map_err(io_err(&p))?;
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.gid() != gid {
            std::os::unix::fs::chown(&p, None, Some(gid)).map_err(io_err(&p))?;
            changed = true;
        }
        let mode = meta.permissions().mode() & 0o7777;
        let want = if meta.is_dir() {
            mode | 0o2070
        } else if mode & 0o200 != 0 {
            mode | 0o060
        } else {
            mode | 0o040
        };
        if want != mode {
            fs::set_permissions(&p, fs::Permissions::from_mode(want)).map_err(io_err(&p))?;
            changed = true;
        }
        if meta.is_dir() {
            for e in fs::read_dir(&p).map_err(io_err(&p))? {
                stack.push(e.map_err(io_err(&p))?.path());
            }
        }
    }
    Ok(changed)
}

/// Carry out `plan`. `key_comment` names the key (`troops@host`).
pub fn apply(layout: &Layout, plan: Plan, key_comment: &str) -> Result<(), InitError> {
    let group = plan.settings.admin_group.clone();
    // Host changes first: they can be undone if anything after them fails.
    if plan.create_group {
        accounts::create_group(&group)?;
    }
    let result = stage_and_commit(layout, &plan, key_comment, &group);
    if result.is_err() && plan.create_group {
        let _ = accounts::delete_group(&group);
    }
    result
}

fn stage_and_commit(
    layout: &Layout,
    plan: &Plan,
    key_comment: &str,
    group: &str,
) -> Result<(), InitError> {
    let gid = accounts::group_gid(group)?.ok_or_else(|| AccountError::Failed {
        command: format!("getent group {group}"),
        message: "the group vanished".into(),
    })?;
    for dir in [
        layout.etc(),
        layout.state_dir(),
        layout.runs(),
        layout.work(),
        layout.venvs(),
    ] {
        fsutil::create_dirs(&dir, 0o755).map_err(io_err(&dir))?;
    }
    fsutil::create_dirs(&layout.ssh_dir(), 0o700).map_err(io_err(&layout.ssh_dir()))?;
    fsutil::create_dirs(layout.repo().parent().unwrap(), 0o755).map_err(io_err(&layout.repo()))?;

    // Stage.
    let key = if plan.make_key {
        Some(keys::generate(&layout.ssh_dir(), key_comment)?)
    } else {
        None
    };
    let mut staged = Vec::new();
    for (path, contents, mode) in &plan.files {
        staged.push(StagedFile::write(path, contents.as_bytes(), *mode)?);
    }
    let mut hook_files = Vec::new();
    if !plan.new_repo {
        for (which, script) in &plan.hooks {
            hook_files.push(StagedFile::write(
                &layout.repo().join("hooks").join(which),
                script.as_bytes(),
                0o755,
            )?);
        }
    }
    let settings_file = if plan.write_settings {
        Some(StagedFile::write(
            &layout.settings_file(),
            plan.settings.to_toml().as_bytes(),
            0o644,
        )?)
    } else {
        None
    };
    let config: Vec<(&str, &str)> = plan.config.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let new_repo = if plan.new_repo {
        let aside = layout
            .repo()
            .with_extension(format!("git.init-{}", std::process::id()));
        let _ = fs::remove_dir_all(&aside);
        let mut repo = Repo::create(&aside)?;
        repo.configure(&plan.remotes, &config)?;
        for (which, script) in &plan.hooks {
            let path = aside.join("hooks").join(which);
            fsutil::create_dirs(&aside.join("hooks"), 0o755).map_err(io_err(&path))?;
            StagedFile::write(&path, script.as_bytes(), 0o755)?.commit()?;
        }
        share_with_group(&aside, gid)?;
        Some(aside)
    } else {
        None
    };
    for a in &plan.admins {
        accounts::add_member(a, group)?;
    }

    // Commit: renames, and one locked write of an existing repo's config.
    if let Some(k) = key {
        k.commit()?;
    }
    for f in staged.iter().chain(&hook_files) {
        f.commit()?;
    }
    match new_repo {
        Some(aside) => {
            fs::rename(&aside, layout.repo()).map_err(io_err(&layout.repo()))?;
        }
        None => {
            let mut repo = Repo::open(&layout.repo())?;
            if !plan.remotes.is_empty() || !config.is_empty() {
                repo.configure(&plan.remotes, &config)?;
            }
            share_with_group(&layout.repo(), gid)?;
        }
    }
    if plan.trust {
        crate::repo::trust_for_all(&layout.system_gitconfig(), &layout.repo())?;
    }
    // Settings last: a node with settings is a node that finished init.
    if let Some(f) = settings_file {
        f.commit()?;
    }
    Ok(())
}

/// `NAME=URL`, `--role`, `--branch` as a seed.
pub fn flags_seed(remotes: &[(String, String)], roles: &[String], branch: Option<&str>) -> Seed {
    Seed {
        remotes: remotes.iter().cloned().collect(),
        roles: (!roles.is_empty()).then(|| roles.to_vec()),
        branch: branch.map(String::from),
        ..Seed::default()
    }
}
