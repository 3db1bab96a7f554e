//! The node's own SSH identity and how ssh is run for fetches: `/var/lib/troops/ssh/id_rsa`
//! (RSA 3072, OpenSSH format, made once, never replaced), `known_hosts`, and an ssh config
//! that pins both, so a fetch uses exactly these whatever the caller's environment.
//!
//! Keys are made by `ssh-keygen`: openssh-client is a hard dependency anyway (gix runs `ssh`
//! for ssh remotes), and it writes the exact format ssh reads back.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::fsutil;

pub const KEY_BITS: u32 = 3072;

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("failed to run ssh-keygen: {0} (is openssh-client installed?)")]
    Spawn(io::Error),
    #[error("ssh-keygen failed making {path}: {message}")]
    Keygen { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the node has no SSH key yet: {0} is missing (run `troops init`)")]
    Missing(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KeyError {
    let path = path.to_owned();
    move |source| KeyError::Io { path, source }
}

pub fn private_key(ssh_dir: &Path) -> PathBuf {
    ssh_dir.join("id_rsa")
}

/// The public key, one OpenSSH line.
pub fn public_key(ssh_dir: &Path) -> Result<String, KeyError> {
    let path = ssh_dir.join("id_rsa.pub");
    match fs::read_to_string(&path) {
        Ok(s) => Ok(s.trim().to_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(KeyError::Missing(path)),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// A key made but not yet in place: `commit` moves it there; dropping it removes it.
pub struct StagedKey {
    tmp: PathBuf,
    ssh_dir: PathBuf,
}

/// Make a new key pair beside `ssh_dir/id_rsa`, without touching what is there.
pub fn generate(ssh_dir: &Path, comment: &str) -> Result<StagedKey, KeyError> {
    fsutil::create_dirs(ssh_dir, 0o700).map_err(io_err(ssh_dir))?;
    let tmp = ssh_dir.join(format!(".new-key-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fsutil::create_dirs(&tmp, 0o700).map_err(io_err(&tmp))?;
    let staged = StagedKey {
        tmp: tmp.clone(),
        ssh_dir: ssh_dir.to_owned(),
    };
    let out = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "rsa",
            "-b",
            &KEY_BITS.to_string(),
            "-N",
            "",
            "-C",
            comment,
            "-f",
        ])
        .arg(tmp.join("id_rsa"))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .map_err(KeyError::Spawn)?;
    if !out.status.success() {
        return Err(KeyError::Keygen {
            path: tmp.join("id_rsa"),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    for f in ["id_rsa", "id_rsa.pub"] {
        let p = tmp.join(f);
        fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&p))?;
    }
    Ok(staged)
}

impl StagedKey {
    /// Put the key in place: the public half first, so a crash in between leaves no private
    /// key without its public one (and the next init makes a fresh pair). Under the ssh
    /// directory's own lock, and never over a key another init put there meanwhile: the key
    /// is made once, and a printed key stays the node's.
    pub fn commit(self) -> Result<(), KeyError> {
        let lock_path = self.ssh_dir.join("lock");
        let _lock = crate::lock::acquire(&lock_path, || {}).map_err(io_err(&lock_path))?;
        sweep_dead(&self.ssh_dir);
        if private_key(&self.ssh_dir).exists() {
            return Ok(());
        }
        for f in ["id_rsa.pub", "id_rsa"] {
            let dest = self.ssh_dir.join(f);
            fs::rename(self.tmp.join(f), &dest).map_err(io_err(&dest))?;
        }
        fsutil::sync_dir(&self.ssh_dir).map_err(io_err(&self.ssh_dir))
    }
}

/// Whether ssh-keygen is where `generate` runs it from: said at plan time, before init
/// changes anything, even when the key is made later beside the first pull.
pub fn check_keygen() -> Result<(), KeyError> {
    match ["/usr/bin/ssh-keygen", "/bin/ssh-keygen"]
        .iter()
        .any(|p| Path::new(p).exists())
    {
        true => Ok(()),
        false => Err(KeyError::Spawn(io::Error::new(
            io::ErrorKind::NotFound,
            "no ssh-keygen in /usr/bin or /bin",
        ))),
    }
}

/// Remove what a killed init left half-made: `.new-key-<pid>` directories whose process is
/// gone (Drop never ran for them). Another live init's directory is its own business.
fn sweep_dead(ssh_dir: &Path) {
    let Ok(entries) = fs::read_dir(ssh_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(".new-key-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !crate::procs::exists(pid) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

impl Drop for StagedKey {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.tmp);
    }
}

/// A path as ssh_config(5) reads it: in double quotes, with `%` doubled because
/// IdentityFile and UserKnownHostsFile expand `%` tokens. `check_root` has refused what
/// cannot be quoted here.
fn quote(p: &Path) -> String {
    format!("\"{}\"", p.display().to_string().replace('%', "%%"))
}

/// A path for the shell (`core.sshCommand`, the repository's hooks): single quotes expand
/// nothing, so a root holding `$(…)` or a space stays one literal word.
pub fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// Whether ssh's config can name files under `dir`: it has no escape for a double quote
/// or `${` (IdentityFile expands environment variables), unescapes backslashes inside
/// quotes, and ends a line at a newline.
pub fn check_root(dir: &Path) -> Result<(), String> {
    match dir.to_str() {
        None => Err(format!("{}: not UTF-8", dir.display())),
        Some(s)
            if s.contains(['"', '\\']) || s.contains("${") || s.chars().any(char::is_control) =>
        {
            Err(format!(
                "{s:?}: a double quote, backslash, `${{` or control character in the node's root cannot be written in ssh's config"
            ))
        }
        Some(_) => Ok(()),
    }
}

/// Whether the ssh config in `ssh_dir` refuses unknown host keys: a re-init that does not
/// restate known_hosts keeps what an earlier seed pinned.
pub fn is_pinned(ssh_dir: &Path) -> bool {
    fs::read_to_string(ssh_dir.join("config")).is_ok_and(|c| {
        c.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["StrictHostKeyChecking", "yes"])
    })
}

/// The ssh config every fetch runs with. `pinned`: the seed gave known_hosts, so an unknown
/// host key is refused; otherwise the first key seen is kept (accept-new).
pub fn ssh_config(ssh_dir: &Path, pinned: bool) -> String {
    format!(
        "# Written by `troops init`: how the node's fetches run ssh.\n\
         Host *\n\
         \x20   IdentityFile {key}\n\
         \x20   IdentitiesOnly yes\n\
         \x20   IdentityAgent none\n\
         \x20   BatchMode yes\n\
         \x20   StrictHostKeyChecking {strict}\n\
         \x20   UserKnownHostsFile {known}\n\
         \x20   GlobalKnownHostsFile /dev/null\n\
         \x20   ConnectTimeout 30\n\
         \x20   ServerAliveInterval 15\n",
        key = quote(&private_key(ssh_dir)),
        strict = if pinned { "yes" } else { "accept-new" },
        known = quote(&ssh_dir.join("known_hosts")),
    )
}

/// The command git and gix run for ssh remotes of this node.
pub fn ssh_command(ssh_dir: &Path) -> String {
    format!("ssh -F {}", shell_quote(&ssh_dir.join("config")))
}
