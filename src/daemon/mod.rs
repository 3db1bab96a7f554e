//! `troops serve`: the root daemon that runs deploys and pulls for the admin group's members
//! (a pusher's post-receive hook, `troops deploy` run by a non-root admin). One socket,
//! `/run/troops/troops.sock` (root:troops, 0660), socket-activated by systemd or bound here;
//! peer credentials checked on every connection; each connection on its own thread, so a
//! slow client never holds up another; every run under the node lock, like the timer's.

pub mod client;
pub mod protocol;

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::accounts;
use crate::node::Node;
use crate::paths::Layout;
use protocol::{MAX_REQUEST, Reply, Request};

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("another daemon already listens on {0}")]
    Running(PathBuf),
    #[error("admin group {0:?} does not exist (run `troops init`)")]
    NoGroup(String),
    #[error(transparent)]
    Account(#[from] accounts::AccountError),
}

pub fn socket_path(layout: &Layout) -> PathBuf {
    layout.run_dir().join("troops.sock")
}

/// The socket systemd passed (LISTEN_FDS, for troops.socket), if it passed one to us.
fn activated() -> Option<UnixListener> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: i32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || fds < 1 {
        return None;
    }
    // SAFETY: fd 3 is the first passed socket, ours by the sd_listen_fds protocol; nothing
    // else in this process owns it.
    let listener = unsafe { UnixListener::from_raw_fd(3) };
    // SAFETY: single-threaded at this point; children must not think the socket is theirs.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    Some(listener)
}

/// The listening socket: systemd's, or one bound at `socket_path` for root and `group`.
pub fn listen(layout: &Layout, group: &str) -> Result<(UnixListener, bool), DaemonError> {
    if let Some(l) = activated() {
        return Ok((l, true));
    }
    let path = socket_path(layout);
    let io_err = |source| DaemonError::Io {
        path: path.clone(),
        source,
    };
    let gid = accounts::group_gid(group)?.ok_or_else(|| DaemonError::NoGroup(group.to_owned()))?;
    crate::fsutil::create_dirs(&layout.run_dir(), 0o755).map_err(io_err)?;
    if path.exists() {
        if UnixStream::connect(&path).is_ok() {
            return Err(DaemonError::Running(path));
        }
        // Left by a daemon that died: nobody answers on it.
        std::fs::remove_file(&path).map_err(io_err)?;
    }
    let listener = UnixListener::bind(&path).map_err(io_err)?;
    std::os::unix::fs::chown(&path, Some(0), Some(gid)).map_err(io_err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).map_err(io_err)?;
    Ok((listener, false))
}

/// Who is on the other end: uid from SO_PEERCRED, which the kernel vouches for.
fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is that big.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// How long a client has to send its whole request line.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// One client slot, given back when the connection's thread ends.
struct Slot(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Serve forever. `exe` is this program (for the pull's fetch workers).
pub fn serve(listener: UnixListener, root: PathBuf, exe: PathBuf) -> ! {
    // Clients served at once (`max_clients`); beyond it a new one is told `error busy` and
    // closed, so a flood of idle connections costs threads and descriptors up to here and
    // no further.
    let max_clients = Node::open(&root)
        .map(|n| n.settings.max_clients)
        .unwrap_or(crate::settings::Settings::default().max_clients) as usize;
    let clients = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        // Between clients, now and then: a package upgrade replaced this program. Leave
        // once idle; the socket starts the new one for the next client. Decided here, on
        // the thread that accepts, so no client is accepted and then dropped.
        if !readable(&listener, Duration::from_secs(1)) {
            if clients.load(std::sync::atomic::Ordering::SeqCst) == 0 && replaced() {
                tracing::info!("this program was upgraded; exiting for the new one");
                std::process::exit(0);
            }
            continue;
        }
        match listener.accept().map(|(s, _)| s) {
            Ok(mut stream) => {
                if clients.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= max_clients {
                    clients.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                    send(&mut stream, &Reply::Error("busy".into()));
                    continue;
                }
                let slot = Slot(clients.clone());
                let (root, exe) = (root.clone(), exe.clone());
                std::thread::spawn(move || {
                    let _slot = slot;
                    handle(stream, &root, &exe)
                });
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Whether a client is waiting to be accepted, within `wait`.
fn readable(listener: &UnixListener, wait: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes only the one pollfd given.
    let n = unsafe { libc::poll(&mut fd, 1, wait.as_millis() as libc::c_int) };
    n > 0
}

/// Whether the file this process was started from has been replaced (dpkg unlinks the old
/// one and renames the new into place): the kernel then says so in /proc/self/exe.
fn replaced() -> bool {
    std::fs::read_link("/proc/self/exe").is_ok_and(|p| p.to_string_lossy().ends_with(" (deleted)"))
}

/// Read the request line, refusing more than MAX_REQUEST bytes and a client that has not
/// sent all of it within REQUEST_DEADLINE (a byte now and then does not keep it open).
fn read_request(mut stream: &UnixStream) -> Result<Request, String> {
    let deadline = std::time::Instant::now() + REQUEST_DEADLINE;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no request: not sent within {}s",
                REQUEST_DEADLINE.as_secs()
            ));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match std::io::Read::read(&mut stream, &mut byte) {
            Ok(0) => break,
            Ok(_) => line.push(byte[0]),
            // A read timed out: the loop's deadline check says so, in its own words.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("no request: {e}")),
        }
        if line.len() > MAX_REQUEST {
            return Err(format!("request too long (at most {MAX_REQUEST} bytes)"));
        }
    }
    let text = std::str::from_utf8(&line).map_err(|_| "request is not UTF-8".to_string())?;
    if !text.ends_with('\n') {
        return Err("request must end with a newline".into());
    }
    Request::parse(text)
}

fn send(stream: &mut UnixStream, reply: &Reply) -> bool {
    stream.write_all(reply.encode().as_bytes()).is_ok()
}

fn handle(mut stream: UnixStream, root: &Path, exe: &Path) {
    let uid = match peer_uid(&stream) {
        Ok(uid) => uid,
        Err(e) => {
            tracing::warn!("refused a connection: no peer credentials: {e}");
            return;
        }
    };
    let node = match Node::open(root) {
        Ok(n) => n,
        Err(e) => {
            send(&mut stream, &Reply::Error(e.to_string()));
            return;
        }
    };
    let group = node.settings.admin_group.clone();
    let user = accounts::user_name(uid)
        .ok()
        .flatten()
        .unwrap_or_else(|| format!("uid {uid}"));
    let allowed = uid == 0 || accounts::is_member(&user, &group).unwrap_or(false);
    if !allowed {
        tracing::warn!(
            uid,
            "refused {user} (uid {uid}): not root and not in group {group}"
        );
        send(
            &mut stream,
            &Reply::Error(format!("{user} is not in group {group}")),
        );
        return;
    }
    let request = match read_request(&stream) {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!(uid, "bad request from {user}: {why}");
            send(&mut stream, &Reply::Error(why));
            return;
        }
    };
    tracing::info!(uid, "{} requested by {user}", request.name());
    run_request(stream, node, request, &user, exe);
}

/// What the daemon holds for one client that has not read it yet, at most. Output beyond
/// it is skipped for that client (and said), never kept: a slow reader still gets how the
/// run ended, and `troops log N` has every line.
const CLIENT_BUFFER: usize = 1 << 20;

/// How long one write to a client may block before the client counts as gone (two
/// keepalive periods, at least 5 s): one that stops reading altogether is dropped, and the
/// run goes on and is recorded as usual.
fn client_stall(keepalive: Duration) -> Duration {
    (keepalive * 2).max(Duration::from_secs(5))
}

/// The run's side of one client: replies go to the writer thread; output lines only while
/// the client is less than [`CLIENT_BUFFER`] behind.
struct Relay {
    tx: mpsc::Sender<String>,
    queued: Arc<AtomicUsize>,
    dropped: Arc<AtomicBool>,
    skipped: std::sync::atomic::AtomicU64,
}

impl Relay {
    fn send(&self, reply: &Reply) {
        if self.dropped.load(Ordering::SeqCst) {
            return;
        }
        let wire = reply.encode();
        if matches!(reply, Reply::Out(_)) {
            if self.queued.load(Ordering::SeqCst) + wire.len() > CLIENT_BUFFER {
                self.skipped.fetch_add(1, Ordering::SeqCst);
                return;
            }
            let skipped = self.skipped.swap(0, Ordering::SeqCst);
            if skipped > 0 {
                self.queue(
                    Reply::Info(format!(
                        "{skipped} lines of output skipped: this connection fell behind (troops log has them all)"
                    ))
                    .encode(),
                );
            }
        }
        self.queue(wire);
    }

    fn queue(&self, wire: String) {
        self.queued.fetch_add(wire.len(), Ordering::SeqCst);
        let _ = self.tx.send(wire);
    }
}

/// Run the request on this thread; a writer thread relays its output and keeps the line
/// alive. A client that hangs up or stops reading does not stop a run that has begun.
fn run_request(stream: UnixStream, node: Node, request: Request, user: &str, exe: &Path) {
    let (tx, rx) = mpsc::channel::<String>();
    let queued = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicBool::new(false));
    let relay = Relay {
        tx,
        queued: queued.clone(),
        dropped: dropped.clone(),
        skipped: std::sync::atomic::AtomicU64::new(0),
    };
    // Lines keep flowing at least this often, so ssh and git keep a long deploy's session.
    let keepalive = Duration::from_secs(node.settings.keepalive);
    let who = user.to_owned();
    let writer = std::thread::spawn(move || {
        let mut stream = stream;
        let _ = stream.set_write_timeout(Some(client_stall(keepalive)));
        let started = Instant::now();
        let write = |stream: &mut UnixStream, wire: &str| {
            let ok = stream.write_all(wire.as_bytes()).is_ok();
            if !ok {
                dropped.store(true, Ordering::SeqCst);
                tracing::warn!(
                    "{who} stopped reading or hung up; dropped the connection (the run goes on)"
                );
            }
            ok
        };
        loop {
            match rx.recv_timeout(keepalive) {
                Ok(wire) => {
                    let last = wire.starts_with("done ");
                    let ok = write(&mut stream, &wire);
                    queued.fetch_sub(wire.len(), Ordering::SeqCst);
                    if last || !ok {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let info =
                        Reply::Info(format!("still running ({}s)", started.elapsed().as_secs()));
                    if !write(&mut stream, &info.encode()) {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    });
    let result = {
        let lock = crate::lock::acquire(&node.layout.lock_file(), || {
            relay.send(&Reply::Info(
                "waiting for another troops run to finish".into(),
            ));
        });
        let mut out = |line: &str| relay.send(&Reply::Out(line.to_owned()));
        match lock {
            Err(e) => Err(format!(
                "failed to lock {}: {e}",
                node.layout.lock_file().display()
            )),
            Ok(_lock) => match request {
                Request::Deploy => {
                    crate::pull::deploy_head(&node, &format!("deploy by {user}"), &mut out)
                        .map(|run| run.verdict())
                        .map_err(|e| format!("{e:#}"))
                }
                Request::Push => crate::pull::take_push_and_deploy(
                    &node,
                    exe,
                    &format!("push by {user}"),
                    &mut out,
                )
                .map_err(|e| format!("{e:#}")),
                Request::Pull => crate::clock::unix_now()
                    .map_err(crate::pull::PullError::from)
                    .and_then(|now| {
                        crate::pull::pull(
                            &node,
                            exe,
                            &format!("pull by {user}"),
                            now as i64,
                            &mut out,
                        )
                    })
                    .map(|o| o.verdict())
                    .map_err(|e| e.to_string()),
                Request::Status => status_line(&node),
            },
        }
    };
    let (code, summary) = result.unwrap_or_else(|e| (1, e));
    relay.send(&Reply::Done { code, summary });
    drop(relay);
    let _ = writer.join();
}

fn status_line(node: &Node) -> Result<(u8, String), String> {
    let repo = crate::repo::Repo::open(&node.layout.node_repo()).map_err(|e| e.to_string())?;
    let branch = &node.settings.branch;
    let head = repo
        .ref_target(&format!("refs/heads/{branch}"))
        .map_err(|e| e.to_string())?;
    let deployed = repo
        .ref_target(crate::deploy::DEPLOYED_REF)
        .map_err(|e| e.to_string())?;
    let short = |c: Option<crate::repo::CommitId>| c.map_or("(none)".into(), |c| c.short());
    Ok((
        0,
        format!(
            "branch {branch} at {}, deployed {}",
            short(head),
            short(deployed)
        ),
    ))
}
