//! Child processes of a deploy (the installer, deploy.py): a clean, small environment, stdin
//! from /dev/null, stdout and stderr merged into one pipe so lines keep their order, read
//! line by line as they come.
//!
//! What a child prints reaches run logs, the journal and an admin's terminal, so each line
//! is made inert as it is read ([`relay_line`]): control characters are shown escaped, and a
//! line that would pass for one of troops' own (`troops: ...`) is marked as the child's.

use std::io::{self, BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::procs;

pub const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Variables a deploy may need from the agent's environment; everything else is dropped.
const PASS_THROUGH: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
];

pub struct Invocation {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    /// Run as if the venv were activated: its bin first on PATH, VIRTUAL_ENV set.
    pub venv: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    /// Stop it (its whole process group) after this long.
    pub timeout: Option<Duration>,
}

/// How long processes a finished child left behind (holding its output open) get before
/// they are stopped, and how long SIGTERM gets before SIGKILL.
const GRACE: Duration = Duration::from_secs(3);

fn home() -> String {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } == 0 {
        "/root".into()
    } else {
        std::env::var("HOME").unwrap_or_else(|_| "/".into())
    }
}

/// Run `inv`, handing each line of its output to `on_line`, and return its exit status.
pub fn run(inv: &Invocation, on_line: &mut dyn FnMut(&str)) -> io::Result<ExitStatus> {
    let (reader, writer) = io::pipe()?;
    let mut cmd = Command::new(&inv.program);
    cmd.args(&inv.args)
        .current_dir(&inv.cwd)
        .env_clear()
        .env("HOME", home())
        .env("LANG", "C.UTF-8")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer);
    for var in PASS_THROUGH {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    match &inv.venv {
        Some(venv) => {
            cmd.env(
                "PATH",
                format!("{}:{SYSTEM_PATH}", venv.join("bin").display()),
            );
            cmd.env("VIRTUAL_ENV", venv);
        }
        None => {
            cmd.env("PATH", SYSTEM_PATH);
        }
    }
    for (k, v) in &inv.env {
        cmd.env(k, v);
    }
    // Inherited by everything the child starts: what this run left is told apart from
    // other children of this process (a daemon serves other clients meanwhile).
    let mark = run_mark();
    cmd.env(MARK, &mark);
    let parent = std::process::id() as i32;
    // SAFETY: prctl, getppid and setpgid are async-signal-safe. If the agent dies (kill -9),
    // the deploy dies with it instead of running on unobserved; the next pull starts it
    // again (and if it died before the signal was armed, the child sees it and leaves).
    // Its own process group: whatever it starts and leaves behind can be found and stopped.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 || libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    procs::adopt_orphans();
    let mut child = cmd.spawn()?;
    // The parent's copies of the write end must be gone, or the read below never ends.
    drop(cmd);
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    // The pipe is read on its own thread: a process the child left holding it open must
    // not keep this one waiting, and a timeout must be noticed while nothing is printed.
    std::thread::spawn(move || {
        let _ = for_each_line(reader, &mut |line| {
            let _ = tx.send(relay_line(line));
        });
    });
    let started = Instant::now();
    let mut exited: Option<(ExitStatus, Instant)> = None;
    let tick = Duration::from_millis(100);
    let mut checked = Instant::now();
    loop {
        match rx.recv_timeout(tick) {
            Ok(line) => on_line(&line),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        // Whether or not lines keep coming: a process that never stops printing must not
        // outlast its timeout, nor what it left behind its grace.
        if checked.elapsed() < tick {
            continue;
        }
        checked = Instant::now();
        if exited.is_none()
            && let Some(status) = child.try_wait()?
        {
            exited = Some((status, Instant::now()));
        }
        match exited {
            // It exited but something it started still holds its output: stop that.
            Some((_, at)) if at.elapsed() >= GRACE => {
                stop_leftovers(None, &mark, on_line);
                break;
            }
            Some(_) => {}
            None if inv.timeout.is_some_and(|t| started.elapsed() >= t) => {
                let t = inv.timeout.unwrap_or_default();
                on_line(&format!(
                    "troops: still running after {}s (deploy_timeout); stopping it",
                    t.as_secs()
                ));
                stop_leftovers(Some(pid), &mark, on_line);
                let _ = child.wait();
                drain(&rx, on_line);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "timed out after {}s (deploy_timeout) and was stopped",
                        t.as_secs()
                    ),
                ));
            }
            None => {}
        }
    }
    drain(&rx, on_line);
    let status = match exited {
        Some((status, _)) => status,
        None => child.wait()?,
    };
    // Output closed and the child gone (its pid no longer names it); what it started with
    // its output elsewhere (a daemon) may still be running.
    stop_leftovers(None, &mark, on_line);
    Ok(status)
}

/// What is left in the channel, without waiting.
fn drain(rx: &std::sync::mpsc::Receiver<String>, on_line: &mut dyn FnMut(&str)) {
    while let Ok(line) = rx.try_recv() {
        on_line(&line);
    }
}

/// The variable every process of a run inherits, naming the run.
const MARK: &str = "TROOPS_RUN";

/// A name for one run, unique on this host for as long as it matters.
fn run_mark() -> String {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    format!("{}.{n}", std::process::id())
}

/// What a run left running: `child` itself while it has not been reaped (after that its pid
/// may name another process), everything descending from it, and what was orphaned to this
/// process carrying the run's mark (a daemon deploy.py started with `setsid` and a double
/// fork, whose parents have exited). Not what left this cgroup: a unit or scope deploy.py
/// handed to systemd (`systemd-run`, a container's monitor) is systemd's.
fn leftovers(child: Option<i32>, mark: &str) -> Vec<procs::Proc> {
    let me = std::process::id() as i32;
    let all = procs::snapshot();
    let mut roots: Vec<i32> = child.into_iter().collect();
    roots.extend(
        all.iter()
            .filter(|p| p.ppid == me && Some(p.pid) != child && !p.zombie)
            .filter(|p| procs::env_var(p.pid, MARK).as_deref() == Some(mark))
            .map(|p| p.pid),
    );
    let ours = procs::cgroup(me);
    procs::tree(&all, &roots)
        .into_iter()
        .filter(|p| !p.zombie && procs::cgroup(p.pid) == ours)
        .cloned()
        .collect()
}

/// Collect those of `pids` that have exited and are this process's to collect.
fn reap(pids: &[i32]) {
    let me = std::process::id() as i32;
    for p in procs::snapshot() {
        if p.ppid == me && p.zombie && pids.contains(&p.pid) {
            procs::reap(p.pid);
        }
    }
}

/// SIGTERM to everything the run left, SIGKILL to what is left after the grace period; say
/// which processes were stopped.
fn stop_leftovers(child: Option<i32>, mark: &str, on_line: &mut dyn FnMut(&str)) {
    let left = leftovers(child, mark);
    if left.is_empty() {
        return;
    }
    let names: Vec<String> = left
        .iter()
        .map(|p| format!("pid {} {}", p.pid, p.comm))
        .collect();
    // Every pid seen, to collect once they are gone (never `child`: its status belongs to
    // the `Child` that started it).
    let mut seen: Vec<i32> = left
        .iter()
        .map(|p| p.pid)
        .filter(|p| Some(*p) != child)
        .collect();
    let signal_all = |signal: i32, seen: &mut Vec<i32>| {
        for p in leftovers(child, mark) {
            // SAFETY: kill sends a signal; no memory is touched.
            unsafe {
                libc::kill(p.pid, signal);
            }
            if Some(p.pid) != child && !seen.contains(&p.pid) {
                seen.push(p.pid);
            }
        }
    };
    signal_all(libc::SIGTERM, &mut seen);
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline && !leftovers(child, mark).is_empty() {
        reap(&seen);
        std::thread::sleep(Duration::from_millis(50));
    }
    // A few rounds: what forked while being stopped is found and stopped too.
    for _ in 0..5 {
        if leftovers(child, mark).is_empty() {
            break;
        }
        signal_all(libc::SIGKILL, &mut seen);
        std::thread::sleep(Duration::from_millis(20));
        reap(&seen);
    }
    reap(&seen);
    on_line(&format!(
        "troops: left running: {}; stopped (start long-lived services with systemd)",
        names.join(", ")
    ));
}

/// The longest line kept whole: a longer one is passed on in pieces of this size, so that
/// output without newlines (a 3 GB line) never has to fit in memory.
pub const MAX_LINE: usize = 64 * 1024;

/// Hand each line of `input` (without its newline, lossily decoded) to `on_line`, a line
/// longer than [`MAX_LINE`] as several pieces. Memory stays bounded whatever comes in.
pub fn for_each_line(input: impl io::Read, on_line: &mut dyn FnMut(&str)) -> io::Result<()> {
    let mut reader = BufReader::with_capacity(MAX_LINE, input);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let chunk = match reader.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            if !line.is_empty() {
                emit(&line, on_line);
            }
            return Ok(());
        }
        let room = MAX_LINE - line.len();
        let take = chunk.len().min(room);
        match chunk[..take].iter().position(|b| *b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&chunk[..i]);
                reader.consume(i + 1);
                emit(&line, on_line);
                line.clear();
            }
            None => {
                line.extend_from_slice(&chunk[..take]);
                reader.consume(take);
                if line.len() >= MAX_LINE {
                    emit(&line, on_line);
                    line.clear();
                }
            }
        }
    }
}

fn emit(line: &[u8], on_line: &mut dyn FnMut(&str)) {
    let text = String::from_utf8_lossy(line);
    on_line(text.trim_end_matches('\r'));
}

/// Control characters (C0 but tab, DEL, C1) as `\xNN` / `\u{NN}`: a terminal shows them,
/// never obeys them (colours, titles, cursor moves, a fake clear screen).
pub fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\t' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if ('\u{80}'..='\u{9f}').contains(&c) => {
                out.push_str(&format!("\\u{{{:02x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

/// A child's line as troops relays it: escaped, and prefixed `deploy.py: ` when it starts
/// with `troops` so that only troops' own lines ever start that way.
pub fn relay_line(line: &str) -> String {
    let line = escape_controls(line);
    if line.trim_start().to_ascii_lowercase().starts_with("troops") {
        format!("deploy.py: {line}")
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(
            relay_line("\x1b[31mred\x1b[0m \x1b]0;title\x07 tab\tok \u{9b}2J"),
            "\\x1b[31mred\\x1b[0m \\x1b]0;title\\x07 tab\tok \\u{9b}2J"
        );
        assert_eq!(
            relay_line("plain, \u{e9}t\u{e9} \u{2713}"),
            "plain, \u{e9}t\u{e9} \u{2713}"
        );
    }

    #[test]
    fn lines_posing_as_troops_are_marked() {
        assert_eq!(
            relay_line("troops: run 9: deployed 0123456789ab"),
            "deploy.py: troops: run 9: deployed 0123456789ab"
        );
        assert_eq!(relay_line("  TROOPS: x"), "deploy.py:   TROOPS: x");
        // An escape sequence in front does not hide it either.
        assert_eq!(relay_line("\rtroops: ok"), "\\x0dtroops: ok");
        assert_eq!(relay_line("not troops: x"), "not troops: x");
    }

    #[test]
    fn long_lines_come_in_pieces_and_short_ones_whole() {
        let mut input = b"one\r\ntwo\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE * 2 + 10));
        input.extend(b"\nlast");
        let mut lines = Vec::new();
        for_each_line(&input[..], &mut |l| lines.push(l.to_owned())).unwrap();
        let lens: Vec<usize> = lines.iter().map(String::len).collect();
        assert_eq!(lens, vec![3, 3, MAX_LINE, MAX_LINE, 10, 4]);
        assert_eq!(lines[0], "one");
        assert_eq!(lines[5], "last");
    }
}
