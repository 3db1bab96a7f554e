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
    #[error("--root: {0}")]
    Root(String),
    #[error("--python {}: {why}", .path.display())]
    Python { path: PathBuf, why: String },
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
    /// Root's own repository is missing (a new node, or one from before it existed).
    new_node_repo: bool,
    remotes: Vec<(String, String)>,
    /// Settings of the shared repo, and of root's own.
    config: Vec<(&'static str, String)>,
    node_config: Vec<(&'static str, String)>,
    /// Local remotes root itself named (seed or flags), recorded in node.git's config.
    node_remotes: Vec<(String, String)>,
    /// The shared repo's objects/info/alternates, to write.
    alternates: Option<String>,
    /// The shared repo's HEAD, when it does not name the branch.
    repo_head: Option<String>,
    make_key: bool,
    /// No remote needs the key: it is made while the first pull fetches.
    key_waits: bool,
    files: Vec<(PathBuf, String, u32)>,
    create_group: bool,
    admins: Vec<String>,
    /// Admins whose accounts do not exist yet, when the seed named admins: each pull adds
    /// those that exist by then.
    pending_admins: Option<Vec<String>>,
    /// Hooks to (re)write in the repo: name and script.
    hooks: Vec<(&'static str, String)>,
    /// Mark the repo safe for every user in the system git config.
    trust: bool,
    /// The seed's proxy, when the system git config does not already say it.
    proxy: Option<String>,
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

/// troops-pull.service's start timeout, above everything a pull may take by the settings
/// (its fetches, a deploy twice over for the venv build before it, ten minutes of slack):
/// systemd stops a pull that hangs where troops' own bounds do not reach.
pub fn pull_service_dropin(fetch_timeout: u64, deploy_timeout: u64) -> String {
    let seconds = fetch_timeout
        .saturating_add(deploy_timeout.saturating_mul(2))
        .saturating_add(600);
    format!(
        "# Written by `troops init` from `fetch_timeout` and `deploy_timeout` in /etc/troops/troops.toml.\n[Service]\nTimeoutStartSec={seconds}s\n"
    )
}

/// troops.socket's group from the settings: members of the admin group reach the daemon.
pub fn socket_dropin(group: &str) -> String {
    format!(
        "# Written by `troops init` from `admin_group` in /etc/troops/troops.toml.\n[Socket]\nSocketGroup={group}\n"
    )
}

/// `'…'` for sh, whatever the path holds.
/// The hook scripts: each hands the push to `troops hook`, under this node's root.
pub fn hook_script(exe: &Path, root: &Path, which: &str) -> String {
    format!(
        "#!/bin/sh\n# Installed by `troops init`, which rewrites it: a push to this node goes through troops.\nexec {} --root {} hook {which}\n",
        keys::shell_quote(exe),
        keys::shell_quote(root)
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
        // Re-init is how an operator repairs a settings file that was lost or cut short.
        Err(
            SettingsError::NotInitialised(_)
            | SettingsError::Empty(_)
            | SettingsError::Truncated(_),
        ) => None,
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
        // Said now, not at the first deploy, minutes later on a node nobody watches.
        check_python(p)?;
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
    let node_path = layout.node_repo();
    let node_repo = match node_path.join("HEAD").exists() {
        true => Some(Repo::open(&node_path)?),
        false => None,
    };
    let new_node_repo = node_repo.is_none();
    if new_node_repo {
        changes.push(format!(
            "repository: create {} (root's own)",
            node_path.display()
        ));
    }
    let current: Vec<(String, String)> = match &existing {
        Some(_) => crate::repo::remote_urls(&repo_path.join("config"))?,
        None => Vec::new(),
    };
    // Secrets never stay in a URL on disk: the shared repo's config is read by every member.
    let mut store = fs::read_to_string(layout.credentials()).unwrap_or_default();
    let old_store = store.clone();
    let mut remotes = Vec::new();
    let mut node_remotes = Vec::new();
    for (name, given) in &seed.remotes {
        let url = match crate::credentials::Entry::from_url(given) {
            Some((entry, bare)) => {
                store = crate::credentials::with_entry(&store, &entry);
                bare
            }
            None => given.clone(),
        };
        // The same parser the fetch uses: a URL that cannot be fetched stops init here.
        crate::repo::check_url(name, &url)?;
        // A local repository root names is read with root's rights, and a host root names
        // gets the system git config's unscoped secrets; one a member names gets neither.
        // Root's own list is in node.git's config.
        if node_repo
            .as_ref()
            .and_then(|r| r.config_value(&format!("remote.{name}.url")))
            .as_deref()
            != Some(url.as_str())
        {
            node_remotes.push((name.clone(), url.clone()));
        }
        let shown = crate::repo::redact_url(given);
        match current.iter().find(|(n, _)| n == name) {
            Some((_, u)) if *u == url => {}
            Some((_, u)) => {
                changes.push(format!(
                    "remote {name}: {} -> {shown}",
                    crate::repo::redact_url(u)
                ));
                remotes.push((name.clone(), url));
            }
            None => {
                changes.push(format!("remote {name}: add {shown}"));
                remotes.push((name.clone(), url));
            }
        }
    }
    if current.is_empty() && remotes.is_empty() {
        return Err(InitError::NoRemotes);
    }

    let ssh_dir = layout.ssh_dir();
    keys::check_root(&ssh_dir).map_err(InitError::Root)?;
    let wanted = |repo: Option<&Repo>, is_new: bool, pairs: Vec<(&'static str, String)>| {
        let mut out = Vec::new();
        let mut said = Vec::new();
        for (key, value) in pairs {
            if repo.and_then(|r| r.config_value(key)).as_deref() != Some(value.as_str()) {
                if !is_new {
                    said.push(format!("repository: set {key} = {value}"));
                }
                out.push((key, value));
            }
        }
        (out, said)
    };
    let (config, said) = wanted(
        existing.as_ref(),
        new_repo,
        vec![("core.sharedRepository", "group".to_string())],
    );
    changes.extend(said);
    // Only root's own repository names a program for root to run.
    let (node_config, said) = wanted(
        node_repo.as_ref(),
        new_node_repo,
        vec![("core.sshCommand", keys::ssh_command(&ssh_dir))],
    );
    changes.extend(said);

    let make_key = !keys::private_key(&ssh_dir).exists();
    if make_key {
        keys::check_keygen()?;
    }
    let key_waits = make_key
        && !current
            .iter()
            .chain(&remotes)
            .any(|(_, url)| crate::names::needs_ssh_key(url));
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
    // A re-init that does not restate known_hosts never weakens what a seed pinned.
    let pinned = seed.known_hosts.is_some() || keys::is_pinned(&ssh_dir);
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
    want_file(
        layout.pull_service_dropin(),
        pull_service_dropin(settings.fetch_timeout, settings.deploy_timeout),
        0o644,
        "pull timeout",
    );
    if store != old_store {
        want_file(layout.credentials(), store, 0o600, "credentials");
    }
    want_file(
        layout.socket_dropin(),
        socket_dropin(&settings.admin_group),
        0o644,
        "socket group",
    );
    if let Some(pem) = &seed.ca_certs {
        let pem = match pem.ends_with('\n') {
            true => pem.clone(),
            false => format!("{pem}\n"),
        };
        want_file(layout.ca_certs(), pem, 0o644, "ca_certs");
    }
    if let Some(lines) = &seed.allowed_signers {
        want_file(
            layout.allowed_signers(),
            lines.join("\n") + "\n",
            0o644,
            "allowed_signers",
        );
    }

    // A clone of either repository checks out HEAD: it names the node's branch, also after
    // a re-init that changed it.
    let head = format!("ref: refs/heads/{}\n", settings.branch);
    let stale_head =
        |repo: &Path| fs::read_to_string(repo.join("HEAD")).ok().as_deref() != Some(head.as_str());
    let repo_head = (!new_repo && stale_head(&repo_path)).then(|| head.clone());
    if !new_node_repo && stale_head(&node_path) {
        files.push((node_path.join("HEAD"), head.clone(), 0o644));
    }
    if repo_head.is_some() || (!new_node_repo && stale_head(&node_path)) {
        changes.push(format!(
            "repository: HEAD -> refs/heads/{}",
            settings.branch
        ));
    }

    // Pushers' receive-pack must see the commits root fetched.
    let alternates = format!("{}\n", node_path.join("objects").display());
    let alternates = (fs::read_to_string(repo_path.join("objects/info/alternates")).ok()
        != Some(alternates.clone()))
    .then(|| {
        if !new_repo {
            changes.push(format!(
                "repository: borrow objects from {}",
                node_path.display()
            ));
        }
        alternates
    });
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

    // The seed's proxy goes where git and every fetch read it: the node's system git config.
    let proxy = match &seed.proxy {
        Some(p) => {
            let now = crate::repo::system_config(&layout.system_gitconfig())?
                .entries
                .into_iter()
                .rfind(|e| e.key().eq_ignore_ascii_case("http.proxy"))
                .and_then(|e| e.value);
            (now.as_deref() != Some(p.as_str())).then(|| {
                changes.push(format!(
                    "git: http.proxy = {} in {}",
                    crate::repo::redact_url(p),
                    layout.system_gitconfig().display()
                ));
                p.clone()
            })
        }
        None => None,
    };

    let group = settings.admin_group.clone();
    let create_group = accounts::group_gid(&group)?.is_none();
    if create_group {
        changes.push(format!("group {group}: create"));
    }
    let mut admins = Vec::new();
    let mut pending = Vec::new();
    for a in seed.admins.iter().flatten() {
        if !accounts::user_exists(a)? {
            // On EC2 troops may read the user data before cloud-init made the user.
            pending.push(a.clone());
            continue;
        }
        if create_group || !accounts::is_member(a, &group)? {
            changes.push(format!("admin {a}: add to group {group}"));
            admins.push(a.clone());
        }
    }

    let pending_admins = seed.admins.as_ref().map(|_| pending);
    if let Some(p) = &pending_admins {
        let old = crate::admins::pending(layout);
        for a in p.iter().filter(|a| !old.contains(a)) {
            changes.push(format!(
                "admin {a}: pending (no such user yet; added to group {group} by the first pull after it exists)"
            ));
        }
        if old.iter().any(|a| !p.contains(a)) {
            changes.push(format!("pending admins: {}", list(p)));
        }
    }

    Ok(Plan {
        changes,
        settings,
        write_settings,
        new_repo,
        new_node_repo,
        remotes,
        config,
        node_config,
        node_remotes,
        alternates,
        repo_head,
        make_key,
        key_waits,
        files,
        create_group,
        admins,
        pending_admins,
        hooks,
        trust,
        proxy,
    })
}

/// A file written and synced beside its destination; `commit` renames it into place.
/// Every step goes through a directory handle opened beneath a trusted anchor, and the temp
/// file is created exclusively under an unpredictable name: in the members' repository a
/// symlink planted for the temp name, the destination or a parent is never written through.
struct StagedFile {
    dir: cap_std::fs::Dir,
    tmp: String,
    name: std::ffi::OsString,
    dest: PathBuf,
}

impl StagedFile {
    fn write(dest: &Path, contents: &[u8], mode: u32) -> Result<StagedFile, InitError> {
        let dir = dest.parent().unwrap_or(Path::new("/"));
        fsutil::create_dirs(dir, 0o755).map_err(io_err(dir))?;
        StagedFile::write_beneath(
            dir,
            Path::new(dest.file_name().unwrap_or_default()),
            contents,
            mode,
        )
    }

    /// `anchor/rel`, where `anchor` is root's and what is below it may be anyone's.
    fn write_beneath(
        anchor: &Path,
        rel: &Path,
        contents: &[u8],
        mode: u32,
    ) -> Result<StagedFile, InitError> {
        use cap_std::fs::OpenOptionsExt;
        use std::io::Write;
        let dest = anchor.join(rel);
        let top = cap_std::fs::Dir::open_ambient_dir(anchor, cap_std::ambient_authority())
            .map_err(io_err(anchor))?;
        let dir = match rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(p) => {
                top.create_dir_all(p).map_err(io_err(&dest))?;
                top.open_dir(p).map_err(io_err(&dest))?
            }
            None => top,
        };
        let name = rel.file_name().unwrap_or_default().to_owned();
        let mut attempt = 0u32;
        let (tmp, mut f) = loop {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let tmp = format!(
                ".{}.init-{}-{nanos:x}{attempt}",
                name.to_string_lossy(),
                std::process::id()
            );
            match dir.open_with(
                &tmp,
                cap_std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode),
            ) {
                Ok(f) => break (tmp, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => {
                    attempt += 1;
                }
                Err(e) => return Err(io_err(&dest)(e)),
            }
        };
        let staged = StagedFile {
            dir,
            tmp,
            name,
            dest: dest.clone(),
        };
        f.write_all(contents)
            .and_then(|_| {
                f.set_permissions(cap_std::fs::Permissions::from_std(
                    fs::Permissions::from_mode(mode),
                ))
            })
            .and_then(|_| f.sync_all())
            .map_err(io_err(&dest))?;
        Ok(staged)
    }

    fn commit(&self) -> Result<(), InitError> {
        self.dir
            .rename(&self.tmp, &self.dir, &self.name)
            .map_err(io_err(&self.dest))?;
        self.dir
            .open(".")
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dest))
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        let _ = self.dir.remove_file(&self.tmp);
    }
}

/// What the admin group may do in a repository.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum GroupAccess {
    /// main.git: members push to it, as `git init --shared=group` would allow.
    Write,
    /// node.git: members read root's state (the pre-receive hook does); nobody else does.
    Read,
}

/// Give the admin group `access` to the repo: group ownership, setgid directories so new
/// files keep the group; with `Read`, no group write and nothing for others.
///
/// Members write in the shared repo, so every entry is opened (O_NOFOLLOW, beneath its
/// parent's handle) and changed through its descriptor: a path swapped for a symlink
/// between a look and a chown is never followed out of the repository.
pub fn share_with_group(repo: &Path, gid: u32, access: GroupAccess) -> Result<bool, InitError> {
    use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};
    let open = |dir: &Dir, name: &std::ffi::OsStr| {
        dir.open_with(
            name,
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK),
        )
        .map(cap_std::fs::File::into_std)
    };
    let fix = |file: &fs::File, path: &Path| -> Result<bool, InitError> {
        let meta = file.metadata().map_err(io_err(path))?;
        let mut changed = false;
        if meta.gid() != gid {
            std::os::unix::fs::fchown(file, None, Some(gid)).map_err(io_err(path))?;
            changed = true;
        }
        let mode = meta.permissions().mode() & 0o7777;
        let want = match access {
            GroupAccess::Write if meta.is_dir() => mode | 0o2070,
            GroupAccess::Write if mode & 0o200 != 0 => mode | 0o060,
            GroupAccess::Write => mode | 0o040,
            GroupAccess::Read if meta.is_dir() => (mode & !0o027) | 0o2050,
            GroupAccess::Read => (mode & !0o027) | 0o040,
        };
        if want != mode {
            file.set_permissions(fs::Permissions::from_mode(want))
                .map_err(io_err(path))?;
            changed = true;
        }
        Ok(changed)
    };
    let top = fs::File::open(repo).map_err(io_err(repo))?;
    let mut changed = fix(&top, repo)?;
    let mut stack = vec![(Dir::from_std_file(top), repo.to_owned())];
    while let Some((dir, path)) = stack.pop() {
        for entry in dir.entries().map_err(io_err(&path))? {
            let name = entry.map_err(io_err(&path))?.file_name();
            let here = path.join(&name);
            // Gone, a symlink (ELOOP), a socket: nothing of ours to fix.
            let Ok(file) = open(&dir, &name) else {
                continue;
            };
            let kind = file.metadata().map_err(io_err(&here))?.file_type();
            if !kind.is_dir() && !kind.is_file() {
                continue;
            }
            changed |= fix(&file, &here)?;
            if kind.is_dir() {
                stack.push((Dir::from_std_file(file), here));
            }
        }
    }
    Ok(changed)
}

/// Carry out `plan`. `key_comment` names the key (`troops@host`). What is left running
/// (the key, when no remote needs it; the shared pip) is the caller's to `finish`, after the
/// first pull if there is one.
pub fn apply(layout: &Layout, plan: Plan, key_comment: &str) -> Result<Background, InitError> {
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

type Warm = std::thread::JoinHandle<Result<PathBuf, crate::deploy::venv::VenvError>>;
type KeyJob = std::thread::JoinHandle<Result<(), KeyError>>;

/// init's slow work that the first fetch need not wait for: the node's key (RSA, half a
/// second or so) when no remote is reached over ssh, and unpacking and compiling the shared
/// pip (which the first deploy waits for only if it installs requirements). The key is put
/// in place as soon as it is made and init's files are committed, while the fetch runs.
#[must_use = "finish() says whether the key was made"]
pub struct Background {
    key: Option<KeyJob>,
    /// Tells the key's thread that init committed (true) or failed (false).
    verdict: Option<std::sync::mpsc::Sender<bool>>,
    warm: Option<Warm>,
}

impl Background {
    fn commit(&mut self, ok: bool) {
        if let Some(tx) = self.verdict.take() {
            let _ = tx.send(ok);
        }
    }

    /// Wait for it all: whether the key was made and put in place.
    pub fn finish(mut self) -> Result<(), InitError> {
        if let Some(warm) = self.warm.take() {
            match warm.join() {
                Ok(Err(e)) => tracing::debug!("could not prepare the shared pip yet: {e}"),
                Err(_) => tracing::debug!("preparing the shared pip panicked"),
                Ok(Ok(_)) => {}
            }
        }
        if let Some(job) = self.key.take() {
            job.join().unwrap_or_else(|_| {
                Err(KeyError::Keygen {
                    path: PathBuf::from("id_rsa"),
                    message: "making the key panicked".into(),
                })
            })?;
        }
        Ok(())
    }
}

impl Drop for Background {
    /// Not finished (init failed, or a panic): the threads end before the process does, and
    /// a key made meanwhile is removed with its staging directory.
    fn drop(&mut self) {
        self.commit(false);
        if let Some(warm) = self.warm.take() {
            let _ = warm.join();
        }
        if let Some(job) = self.key.take() {
            let _ = job.join();
        }
    }
}

/// A directory built aside and renamed into place; removed if it never gets there.
struct StagedDir {
    path: PathBuf,
    done: bool,
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Owner root, the admin group, `mode`: what an existing node is brought to on every init.
fn own(path: &Path, gid: u32, mode: u32) -> Result<(), InitError> {
    fsutil::create_dirs(path, mode).map_err(io_err(path))?;
    std::os::unix::fs::lchown(path, Some(0).filter(|_| is_root()), Some(gid))
        .map_err(io_err(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn stage_and_commit(
    layout: &Layout,
    plan: &Plan,
    key_comment: &str,
    group: &str,
) -> Result<Background, InitError> {
    // The interpreter's shared pip is unpacked and compiled in the background, so that the
    // first deploy does not pay for it. It is a cache: if init fails, one it made is
    // removed again, and if this fails the deploy does it.
    if plan.make_key {
        // Before anything else writes there: the key's directory is root's alone.
        let ssh_dir = layout.ssh_dir();
        fsutil::create_dirs(&ssh_dir, 0o700).map_err(io_err(&ssh_dir))?;
    }
    let shared = layout.shared_pip();
    // What to remove if init fails: the outermost directory the warm-up may create.
    let created = shared
        .ancestors()
        .take_while(|d| !d.exists())
        .last()
        .map(Path::to_path_buf);
    let python = plan.settings.python.clone();
    let warm = {
        let shared = shared.clone();
        std::thread::spawn(move || {
            crate::deploy::venv::prepare_shared(&python, &shared, &mut |_| {})
        })
    };
    let (verdict, told) = std::sync::mpsc::channel::<bool>();
    let key = (plan.make_key && plan.key_waits).then(|| {
        let (ssh_dir, comment) = (layout.ssh_dir(), key_comment.to_owned());
        std::thread::spawn(move || {
            let staged = keys::generate(&ssh_dir, &comment)?;
            // In place only once init has committed the node; dropped (and removed) if not.
            match told.recv() {
                Ok(true) => staged.commit(),
                _ => Ok(()),
            }
        })
    });
    let mut background = Background {
        key,
        verdict: Some(verdict),
        warm: Some(warm),
    };
    match stage_and_commit_all(layout, plan, key_comment, group) {
        Ok(()) => {
            background.commit(true);
            Ok(background)
        }
        Err(e) => {
            drop(background);
            if let Some(dir) = &created {
                let _ = fs::remove_dir_all(dir);
            }
            Err(e)
        }
    }
}

fn stage_and_commit_all(
    layout: &Layout,
    plan: &Plan,
    key_comment: &str,
    group: &str,
) -> Result<(), InitError> {
    let gid = accounts::group_gid(group)?.ok_or_else(|| AccountError::Failed {
        command: format!("getent group {group}"),
        message: "the group vanished".into(),
    })?;
    // Stage: everything that can fail is done aside, before anything is replaced.
    let key = if plan.make_key && !plan.key_waits {
        Some(keys::generate(&layout.ssh_dir(), key_comment)?)
    } else {
        None
    };
    let mut staged = Vec::new();
    for (path, contents, mode) in &plan.files {
        staged.push(StagedFile::write(path, contents.as_bytes(), *mode)?);
    }
    if !plan.new_repo {
        // The members' repository: written beneath it, never through what they put there.
        for (which, script) in &plan.hooks {
            staged.push(StagedFile::write_beneath(
                &layout.repo(),
                &Path::new("hooks").join(which),
                script.as_bytes(),
                0o755,
            )?);
        }
        if let Some(text) = &plan.alternates {
            staged.push(StagedFile::write_beneath(
                &layout.repo(),
                Path::new("objects/info/alternates"),
                text.as_bytes(),
                0o644,
            )?);
        }
        if let Some(text) = &plan.repo_head {
            staged.push(StagedFile::write_beneath(
                &layout.repo(),
                Path::new("HEAD"),
                text.as_bytes(),
                0o644,
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
    fsutil::create_dirs(layout.repo().parent().unwrap(), 0o755).map_err(io_err(&layout.repo()))?;
    let aside = |path: PathBuf| StagedDir {
        path: path.with_extension(format!("git.init-{}", std::process::id())),
        done: false,
    };
    let config: Vec<(&str, &str)> = plan.config.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut new_repo = None;
    if plan.new_repo {
        let dir = aside(layout.repo());
        let _ = fs::remove_dir_all(&dir.path);
        let mut repo = Repo::create(&dir.path, &plan.settings.branch)?;
        repo.configure(&plan.remotes, &config)?;
        for (which, script) in &plan.hooks {
            let path = dir.path.join("hooks").join(which);
            fsutil::create_dirs(&dir.path.join("hooks"), 0o755).map_err(io_err(&path))?;
            StagedFile::write(&path, script.as_bytes(), 0o755)?.commit()?;
        }
        if let Some(text) = &plan.alternates {
            StagedFile::write(
                &dir.path.join("objects/info/alternates"),
                text.as_bytes(),
                0o644,
            )?
            .commit()?;
        }
        share_with_group(&dir.path, gid, GroupAccess::Write)?;
        // Members work in it; nobody else has any business there.
        fs::set_permissions(&dir.path, fs::Permissions::from_mode(0o2770))
            .map_err(io_err(&dir.path))?;
        new_repo = Some(dir);
    }
    let node_config: Vec<(&str, &str)> = plan
        .node_config
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    let mut new_node_repo = None;
    if plan.new_node_repo {
        let dir = aside(layout.node_repo());
        let _ = fs::remove_dir_all(&dir.path);
        let mut repo = Repo::create(&dir.path, &plan.settings.branch)?;
        repo.configure(&plan.node_remotes, &node_config)?;
        // Root runs no hooks; an empty hooks directory says so to whoever looks.
        let hooks = dir.path.join("hooks");
        fs::remove_dir_all(&hooks).map_err(io_err(&hooks))?;
        fsutil::create_dirs(&hooks, 0o755).map_err(io_err(&hooks))?;
        new_node_repo = Some(dir);
    }

    // The existing shared repo's config, staged in its lock file like everything else.
    let shared_config =
        match &new_repo {
            None if !plan.remotes.is_empty() || !config.is_empty() => Some(
                crate::repo::stage_config(&layout.repo(), &plan.remotes, &config)?,
            ),
            _ => None,
        };

    // Commit: the members' config first (the one write they could have contended), then
    // renames.
    if let Some(c) = shared_config {
        c.commit()?;
    }
    if let Some(k) = key {
        k.commit()?;
    }
    for f in &staged {
        f.commit()?;
    }
    if let Some(mut dir) = new_node_repo {
        fs::rename(&dir.path, layout.node_repo()).map_err(io_err(&layout.node_repo()))?;
        dir.done = true;
    } else if !node_config.is_empty() || !plan.node_remotes.is_empty() {
        Repo::open(&layout.node_repo())?.configure(&plan.node_remotes, &node_config)?;
    }
    match new_repo {
        Some(mut dir) => {
            fs::rename(&dir.path, layout.repo()).map_err(io_err(&layout.repo()))?;
            dir.done = true;
        }
        None => {
            share_with_group(&layout.repo(), gid, GroupAccess::Write)?;
        }
    }
    // Root's state: the admin group reads it (status, logs, pushes), nobody else does.
    own(&layout.state_dir(), gid, 0o2750)?;
    for dir in [layout.runs(), layout.work()] {
        own(&dir, gid, 0o2750)?;
    }
    share_with_group(&layout.node_repo(), gid, GroupAccess::Read)?;
    own(&layout.venvs(), 0, 0o700)?;
    fsutil::create_dirs(&layout.ssh_dir(), 0o700).map_err(io_err(&layout.ssh_dir()))?;
    if plan.trust {
        crate::repo::trust_for_all(&layout.system_gitconfig(), &layout.repo())?;
    }
    if let Some(p) = &plan.proxy {
        crate::repo::set_system_value(&layout.system_gitconfig(), "http.proxy", p)?;
    }
    for a in &plan.admins {
        accounts::add_member(a, group)?;
    }
    if let Some(p) = &plan.pending_admins {
        crate::admins::set_pending(layout, p).map_err(io_err(&layout.pending_admins()))?;
    }
    // Settings last: a node with settings is a node that finished init.
    if let Some(f) = settings_file {
        f.commit()?;
    }
    Ok(())
}

/// The interpreter deploys will build venvs from: an absolute path to an executable file.
fn check_python(path: &Path) -> Result<(), InitError> {
    use std::os::unix::fs::PermissionsExt;
    let bad = |why: &str| InitError::Python {
        path: path.to_owned(),
        why: why.to_owned(),
    };
    if !path.is_absolute() {
        return Err(bad("not an absolute path"));
    }
    match fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(bad("no such file")),
        Err(e) => Err(bad(&e.to_string())),
        Ok(m) if !m.is_file() => Err(bad("not a file")),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Err(bad("not executable")),
        Ok(_) => Ok(()),
    }
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
