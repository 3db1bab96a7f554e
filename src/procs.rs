//! What troops knows about the processes it starts, read from /proc: which of them are
//! still there, and ties that end them with the agent.
//!
//! Written by hand over /proc rather than with a crate: it is one file per process
//! (`stat`) and three of its fields, and procfs crates bring far more than that.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// One process as /proc/PID/stat shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    pub pgrp: i32,
    pub comm: String,
    /// Exited, waiting for its parent to collect its status.
    pub zombie: bool,
}

/// Parse one /proc/PID/stat: "pid (comm) state ppid pgrp ...", where comm may hold spaces
/// and parentheses.
pub fn parse_stat(stat: &str) -> Option<Proc> {
    let (head, rest) = stat.rsplit_once(')')?;
    let (pid, comm) = head.split_once(" (")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Proc {
        pid: pid.trim().parse().ok()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        comm: comm.to_owned(),
        zombie: fields.first() == Some(&"Z"),
    })
}

/// Every process visible now. One that exits while being read is simply not listed.
pub fn snapshot() -> Vec<Proc> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<i32>().is_ok())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|s| parse_stat(&s))
        .collect()
}

/// Whether a process `pid` is there now (a zombie counts: its pid is not yet free).
pub fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// `roots` and every process descending from one of them, in `procs`.
pub fn tree<'a>(procs: &'a [Proc], roots: &[i32]) -> Vec<&'a Proc> {
    let mut found: Vec<&Proc> = procs.iter().filter(|p| roots.contains(&p.pid)).collect();
    let mut at = 0;
    while at < found.len() {
        let parent = found[at].pid;
        for p in procs.iter().filter(|p| p.ppid == parent) {
            if !found.iter().any(|f| f.pid == p.pid) {
                found.push(p);
            }
        }
        at += 1;
    }
    found
}

/// The value of `name` in the environment `pid` was started with (readable by root, or by
/// the process's own user).
pub fn env_var(pid: i32, name: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ.split(|b| *b == 0).find_map(|kv| {
        let kv = std::str::from_utf8(kv).ok()?;
        kv.strip_prefix(name)?.strip_prefix('=').map(str::to_owned)
    })
}

/// The control group `pid` is in (cgroup v2's one line, or v1's lines whole).
pub fn cgroup(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()
}

/// Make this process the one that inherits its orphaned descendants, instead of init: a
/// daemon that a deploy started with `setsid` and a double fork is still found as ours once
/// its parents have exited.
pub fn adopt_orphans() {
    // SAFETY: prctl with these arguments changes only a flag of this process.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// Collect the exit status of `pid`, a child of this process, if it has exited.
pub fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid on one pid with WNOHANG writes only `status`.
    unsafe {
        libc::waitpid(pid, &mut status, libc::WNOHANG);
    }
}

/// Have the kernel send `signal` to the child started from `cmd` when the thread that
/// started it ends: an agent killed with SIGKILL leaves no worker running on unobserved.
/// A child whose parent died before the signal was armed leaves at once.
pub fn die_with_parent(cmd: &mut Command, signal: i32) {
    let parent = std::process::id() as i32;
    // SAFETY: prctl, getppid and _exit are async-signal-safe and touch no memory of the
    // parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: i32, ppid: i32) -> Proc {
        Proc {
            pid,
            ppid,
            pgrp: pid,
            comm: format!("p{pid}"),
            zombie: false,
        }
    }

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let p = parse_stat("4242 (a (b) c) S 1 4242 4242 0 -1 4194560 0").unwrap();
        assert_eq!((p.pid, p.ppid, p.pgrp), (4242, 1, 4242));
        assert_eq!(p.comm, "a (b) c");
        assert!(!p.zombie);
        assert!(parse_stat("7 (x) Z 3 7 7").unwrap().zombie);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn a_tree_holds_its_roots_and_every_descendant_once() {
        let procs = [p(1, 0), p(10, 1), p(11, 10), p(12, 11), p(20, 1), p(21, 12)];
        let mut pids: Vec<i32> = tree(&procs, &[10]).iter().map(|p| p.pid).collect();
        pids.sort();
        assert_eq!(pids, [10, 11, 12, 21]);
        assert!(tree(&procs, &[99]).is_empty());
    }
}
