//! Fetch the followed branch from every remote at once, each within its own deadline.
//!
//! Each remote is fetched by a child process (the agent's own binary, `troops __fetch`) in a
//! process group of its own. gix's blocking transport cannot be interrupted while it waits
//! on `ssh` or `git-upload-pack`, and an abandoned thread would leave those children behind;
//! killing the group on timeout takes the whole fetch down with nothing left running.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::paths::Layout;
use crate::repo::CommitId;

/// The name the shared repo's branch is fetched under: what members pushed. A `:` cannot
/// be part of a remote's name, so it never clashes with one.
pub const PUSHED: &str = ":pushed";

/// Where a fetch of `branch` from `remote` lands in root's repository.
pub fn tracking_ref(remote: &str, branch: &str) -> String {
    match remote {
        PUSHED => "refs/troops/pushed".into(),
        _ => format!("refs/remotes/{remote}/{branch}"),
    }
}

/// The shared repo's `branch` as its loose ref file says, read as data (no symlink, a few
/// bytes): only to see whether it moved since root last fetched it. None: fetch to know.
pub fn shared_tip(layout: &Layout, branch: &str) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(layout.repo().join("refs/heads").join(branch))
        .ok()?;
    let mut text = String::new();
    file.take(128).read_to_string(&mut text).ok()?;
    let id = text.trim();
    (id.len() == 40 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

/// The home directory of the user troops runs as (root's, on a node), from the password
/// database: the unit's environment has no HOME.
pub fn home() -> std::path::PathBuf {
    // SAFETY: getpwuid returns a pointer into static storage or null; it is read at once,
    // before anything else in this thread could call it again.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if !pw.is_null() && !(*pw).pw_dir.is_null() {
            let dir = std::ffi::CStr::from_ptr((*pw).pw_dir);
            use std::os::unix::ffi::OsStrExt;
            return std::path::PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes()));
        }
    }
    "/".into()
}

/// A repository on this machine (a path or file:// URL): read with the admin group's rights.
pub fn is_local(url: &str) -> bool {
    url.starts_with('/') || url.starts_with("file://")
}

/// The URL to fetch `remote` from: the shared repo itself for `PUSHED`, else its
/// `remote.<name>.url`. The shared repo may borrow objects from root's repository and
/// from nowhere else: an alternates file a member pointed elsewhere would have root copy
/// objects from any repository on the machine into one members can read.
pub fn remote_url(layout: &Layout, remote: &str) -> Result<String, String> {
    let shared = layout.repo();
    if remote == PUSHED {
        let alternates = shared.join("objects/info/alternates");
        let ours = layout.node_repo().join("objects");
        match std::fs::symlink_metadata(&alternates) {
            Err(_) => {}
            Ok(m) if m.is_file() => {
                let text = std::fs::read_to_string(&alternates).unwrap_or_default();
                if text.lines().any(|l| Path::new(l.trim()) != ours) {
                    return Err(format!(
                        "{} names another object store; refused (only {} may be named)",
                        alternates.display(),
                        ours.display()
                    ));
                }
            }
            Ok(_) => {
                return Err(format!(
                    "{} is not a regular file; refused",
                    alternates.display()
                ));
            }
        }
        return Ok(shared.display().to_string());
    }
    crate::repo::remote_urls(&shared.join("config"))
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|(n, _)| n == remote)
        .map(|(_, url)| url)
        .ok_or_else(|| format!("no remote named {remote:?} in {}", shared.display()))
        // Members write these with `git remote add`: the same rules as a seed's remotes,
        // so no ext:: transport, no option-like URL, no name that escapes refs/remotes.
        .and_then(|url| {
            crate::names::check_remote_name(remote)
                .and_then(|()| crate::names::check_url(remote, &url))
                .map(|()| url)
                .map_err(|e| e.to_string())
        })
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Fetched {
    Tip {
        tip: CommitId,
    },
    /// The remote answered but has no such branch.
    NoBranch,
    Failed {
        error: String,
    },
    TimedOut {
        seconds: u64,
    },
}

#[derive(Debug, Clone)]
pub struct FetchResult {
    pub remote: String,
    pub url: String,
    pub fetched: Fetched,
    /// Where the server redirected the repository to, redacted.
    pub moved_to: Option<String>,
}

/// A worker's stderr on one line: what ssh said (gix does not capture it, and "Host key
/// verification failed" is the part an operator needs), then the worker's own error.
fn summarise(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let mut out = lines.join("; ");
    let chars = out.chars().count();
    if chars > 600 {
        out = format!("...{}", out.chars().skip(chars - 600).collect::<String>());
    }
    out
}

/// What a `__fetch` worker prints on stdout, and how the parent reads it back.
pub mod wire {
    use super::*;

    /// The tip (or `no-branch`) on the first line; `moved URL` on the next if redirected.
    pub fn fetched(f: &crate::repo::Fetch) -> String {
        let mut out = match f.tip {
            Some(t) => format!("tip {t}\n"),
            None => "no-branch\n".into(),
        };
        if let Some(url) = &f.moved_to {
            out.push_str(&format!("moved {url}\n"));
        }
        out
    }

    pub fn parse(stdout: &str) -> Option<(Fetched, Option<String>)> {
        let mut lines = stdout.lines().map(str::trim);
        let line = lines.next()?;
        let fetched = match line {
            "no-branch" => Fetched::NoBranch,
            _ => Fetched::Tip {
                tip: line.strip_prefix("tip ")?.parse().ok()?,
            },
        };
        let moved = lines.find_map(|l| l.strip_prefix("moved ").map(str::to_owned));
        Some((fetched, moved))
    }
}

/// Fetch `branch` from each of `remotes` in parallel with `exe --root ROOT __fetch NAME BRANCH`.
/// The worker looks the URL up itself (nothing secret on a command line); `url` is only
/// for reports, and is kept redacted.
pub fn fetch_all(
    exe: &Path,
    root: &Path,
    remotes: &[(String, String)],
    branch: &str,
    timeout: Duration,
    jobs: usize,
) -> Vec<FetchResult> {
    let (tx, rx) = mpsc::channel();
    // Start remote `i`'s worker; its result arrives on the channel.
    let start = |i: usize| -> Option<u32> {
        let name = &remotes[i].0;
        let mut cmd = Command::new(exe);
        // Killed with the agent: a worker nobody waits for would hold the remote for nothing.
        crate::procs::die_with_parent(&mut cmd, libc::SIGKILL);
        let spawned = cmd
            .arg("--root")
            .arg(root)
            .args(["__fetch", name, branch])
            // Whatever the caller's environment says about ssh or git (GIT_SSH_COMMAND, an
            // agent, GIT_CONFIG_*), fetches use the node's own key and settings; only the
            // proxy and CA conventions pass, as the unit's environment set them.
            .env_clear()
            .envs(crate::hosting::Env::from_process().vars)
            // Credential helpers (store, cache) find root's files from HOME.
            .env("HOME", crate::fetch::home())
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send((
                    i,
                    Fetched::Failed {
                        error: format!("failed to start {}: {e}", exe.display()),
                    },
                    None,
                ));
                return None;
            }
        };
        let pid = child.id();
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut out = String::new();
            let mut err = String::new();
            if let Some(mut s) = child.stdout.take() {
                let _ = s.read_to_string(&mut out);
            }
            if let Some(mut s) = child.stderr.take() {
                let _ = s.read_to_string(&mut err);
            }
            let status = child.wait();
            let (fetched, moved) = match (status, wire::parse(&out)) {
                (Ok(s), Some(f)) if s.success() => f,
                (Ok(s), _) => (
                    Fetched::Failed {
                        error: match summarise(&err) {
                            e if e.is_empty() => format!("fetch exited with {s}"),
                            e => e,
                        },
                    },
                    None,
                ),
                (Err(e), _) => (
                    Fetched::Failed {
                        error: e.to_string(),
                    },
                    None,
                ),
            };
            let _ = tx.send((i, fetched, moved));
        });
        Some(pid)
    };

    // At most `jobs` workers at once; each remote gets its own `timeout` from its start.
    let jobs = jobs.max(1);
    let mut results: Vec<Option<(Fetched, Option<String>)>> = vec![None; remotes.len()];
    let mut running: Vec<(usize, Option<u32>, Instant)> = Vec::new();
    let mut next = 0;
    let mut done = 0;
    while done < remotes.len() {
        while running.len() < jobs && next < remotes.len() {
            running.push((next, start(next), Instant::now() + timeout));
            next += 1;
        }
        let first_deadline = running
            .iter()
            .map(|r| r.2)
            .min()
            .unwrap_or_else(Instant::now);
        let left = first_deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, f, moved)) => {
                if results[i].is_none() {
                    results[i] = Some((f, moved));
                    done += 1;
                }
                running.retain(|r| r.0 != i);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                for &(i, pid, _) in running.iter().filter(|r| r.2 <= now) {
                    if let Some(pid) = pid {
                        // SAFETY: kill(2) on a process group we created; no memory involved.
                        unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
                    }
                    if results[i].is_none() {
                        results[i] = Some((
                            Fetched::TimedOut {
                                seconds: timeout.as_secs(),
                            },
                            None,
                        ));
                        done += 1;
                    }
                }
                running.retain(|r| r.2 > now);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    remotes
        .iter()
        .zip(results)
        .map(|((name, url), f)| {
            let (fetched, moved_to) = f.unwrap_or((
                Fetched::Failed {
                    error: "fetch worker vanished".into(),
                },
                None,
            ));
            FetchResult {
                remote: name.clone(),
                url: crate::repo::redact_url(url),
                fetched,
                moved_to,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip() {
        use crate::repo::Fetch;
        let t: CommitId = "0123456789abcdef0123456789abcdef01234567".parse().unwrap();
        let moved = Some("https://new/x.git".to_owned());
        assert_eq!(
            wire::parse(&wire::fetched(&Fetch {
                tip: Some(t),
                moved_to: moved.clone()
            })),
            Some((Fetched::Tip { tip: t }, moved))
        );
        assert_eq!(
            wire::parse(&wire::fetched(&Fetch {
                tip: None,
                moved_to: None
            })),
            Some((Fetched::NoBranch, None))
        );
        assert_eq!(wire::parse("garbage"), None);
        assert_eq!(wire::parse(""), None);
    }
}
