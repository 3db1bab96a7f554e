//! Pushing to a node: a real sshd, real non-root users in (and out of) the admin group, the
//! daemon running as root, and git's own receive-pack running the hooks.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::ssh::Sshd;
use crate::util::*;

/// A throwaway user, removed afterwards.
struct User {
    name: String,
    key: PathBuf,
}

impl Drop for User {
    fn drop(&mut self) {
        // Its ssh sessions may outlive the test by a moment; end them, then remove it.
        let _ = Command::new("pkill")
            .args(["-KILL", "-u", &self.name])
            .output();
        let _ = Command::new("userdel").args(["-f", &self.name]).output();
    }
}

fn user(world: &World, sshd: &Sshd, tag: &str, group: Option<&str>) -> User {
    let name = format!("tr{tag}{}", std::process::id());
    // "*": no password, but not locked: sshd without PAM refuses locked accounts even to keys.
    let made = Command::new("useradd")
        .args(["-M", "-s", "/bin/sh", "-p", "*", &name])
        .status()
        .unwrap();
    assert!(made.success(), "useradd {name}");
    let user = User {
        name: name.clone(),
        key: world.path(&format!("keys/{name}")),
    };
    if let Some(g) = group {
        assert!(
            Command::new("gpasswd")
                .args(["-a", &name, g])
                .output()
                .unwrap()
                .status
                .success()
        );
    }
    std::fs::create_dir_all(user.key.parent().unwrap()).unwrap();
    Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&user.key)
        .status()
        .unwrap();
    sshd.authorize(
        &name,
        &std::fs::read_to_string(user.key.with_extension("pub")).unwrap(),
    );
    user
}

/// `troops serve` as root for a node, stopped afterwards.
pub(crate) struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn serve(node: &Node) -> Daemon {
    let child = node.command(&["serve"]).spawn().unwrap();
    let socket = node.path("run/troops/troops.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon(child)
}

fn ssh_command(sshd: &Sshd, user: &User) -> String {
    format!(
        "ssh -i {} -p {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        user.key.display(),
        sshd.port
    )
}

/// `git push` as `user`, from `up`, of HEAD to master (forced if asked).
fn push(sshd: &Sshd, user: &User, up: &Upstream, node: &Node, force: bool) -> Run {
    let url = format!(
        "ssh://{}@127.0.0.1:{}{}",
        user.name,
        sshd.port,
        node.repo().display()
    );
    let mut args = vec!["push"];
    if force {
        args.push("--force");
    }
    args.extend([url.as_str(), "HEAD:refs/heads/master"]);
    Command::new("git")
        .arg("-C")
        .arg(&up.dir)
        .args(&args)
        .env("GIT_SSH_COMMAND", ssh_command(sshd, user))
        .output()
        .unwrap()
        .into()
}

/// `ssh user@node <troops> --root R <args>`.
fn remote_troops(sshd: &Sshd, user: &User, node: &Node, args: &str) -> Run {
    let cmd = format!(
        "{} --root {} {args}",
        node.exe.display(),
        node.root.display()
    );
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} {}@127.0.0.1 '{cmd}'",
            ssh_command(sshd, user),
            user.name
        ))
        .output()
        .unwrap()
        .into()
}

struct Setup {
    world: World,
    sshd: Sshd,
    node: Node,
    up: Upstream,
}

fn setup() -> Setup {
    let world = World::new();
    let exe = world.shared_binary();
    let mut node = world.node("pushed");
    let sshd = Sshd::start_with(&world, Some(&node.path("etc/gitconfig")));
    node.exe = exe;
    let remote = world.bare("origin");
    node.init(&[("origin", &remote)], &[]);
    let up = world.upstream("src");
    Setup {
        world,
        sshd,
        node,
        up,
    }
}

#[test]
fn an_admin_pushes_and_sees_the_deploy() {
    let s = setup();
    let _daemon = serve(&s.node);
    let alice = user(&s.world, &s.sshd, "a", Some(&s.node.group));
    s.up.write(
        "deploy.py",
        "import troops\nprint('hello from deploy.py', flush=True)\n",
    );
    let one = s.up.commit("one");
    let out = push(&s.sshd, &alice, &s.up, &s.node, false);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stderr.contains("remote: hello from deploy.py"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains(&format!("remote: troops: run 1: deployed {}", &one[..12])),
        "{}",
        out.stderr
    );
    assert_eq!(s.node.deployed().as_deref(), Some(one.as_str()));
    assert_eq!(
        s.node.runs()[0]["trigger"],
        format!("push by {}", alice.name)
    );

    // A failing deploy.py: the push lands, the summary says the deploy failed.
    s.up.write("deploy.py", "raise SystemExit('the database is down')\n");
    let two = s.up.commit("two");
    let out = push(&s.sshd, &alice, &s.up, &s.node, false);
    assert!(
        out.stderr.contains("remote: the database is down"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("remote: troops: FAILED: run 2:"),
        "{}",
        out.stderr
    );
    assert_eq!(s.node.head().as_deref(), Some(two.as_str()));
    assert_eq!(s.node.deployed().as_deref(), Some(one.as_str()));

    // Not a fast-forward: refused, with the reason.
    s.up.reset_hard(&one);
    s.up.write("deploy.py", "print('rewritten')\n");
    s.up.commit("rewritten");
    let out = push(&s.sshd, &alice, &s.up, &s.node, true);
    assert_ne!(out.code, 0, "{}", out.all());
    assert!(
        out.stderr.contains("troops: refused: refs/heads/master:")
            && out.stderr.contains("not a fast-forward"),
        "{}",
        out.stderr
    );
    assert_eq!(s.node.head().as_deref(), Some(two.as_str()));

    // Other refs are refused unless settings allow them.
    let url = format!(
        "ssh://{}@127.0.0.1:{}{}",
        alice.name,
        s.sshd.port,
        s.node.repo().display()
    );
    let out: Run = Command::new("git")
        .arg("-C")
        .arg(&s.up.dir)
        .args(["push", &url, "HEAD:refs/heads/other"])
        .env("GIT_SSH_COMMAND", ssh_command(&s.sshd, &alice))
        .output()
        .unwrap()
        .into();
    assert!(
        out.stderr.contains("only refs/heads/master may be pushed"),
        "{}",
        out.stderr
    );
}

#[test]
fn ssh_troops_deploy_streams_a_run_and_outsiders_are_kept_out() {
    let s = setup();
    let _daemon = serve(&s.node);
    let alice = user(&s.world, &s.sshd, "b", Some(&s.node.group));
    let mallory = user(&s.world, &s.sshd, "c", None);
    s.up.write(
        "deploy.py",
        "import troops\nprint('deploying for', troops.commit, flush=True)\n",
    );
    let head = s.up.commit("one");
    push(&s.sshd, &alice, &s.up, &s.node, false);

    let out = remote_troops(&s.sshd, &alice, &s.node, "deploy");
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout.contains(&format!("deploying for {head}")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("troops: run 2: deployed"),
        "{}",
        out.stdout
    );
    assert_eq!(
        s.node.runs()[1]["trigger"],
        format!("deploy by {}", alice.name)
    );

    // Someone outside the group can neither ask the daemon nor push.
    let out = remote_troops(&s.sshd, &mallory, &s.node, "deploy");
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("permission denied"), "{}", out.all());
    s.up.write("deploy.py", "print('mallory was here')\n");
    s.up.commit("mallory");
    let out = push(&s.sshd, &mallory, &s.up, &s.node, false);
    assert_ne!(out.code, 0, "an outsider pushed: {}", out.all());
    assert_eq!(s.node.head().as_deref(), Some(head.as_str()));
    assert_eq!(s.node.runs().len(), 2);
}

#[test]
fn runs_from_pushes_deploys_and_the_timer_take_turns_and_none_is_lost() {
    let s = setup();
    s.node.set("keepalive", "1");
    let _daemon = serve(&s.node);
    let alice = user(&s.world, &s.sshd, "d", Some(&s.node.group));
    // Slow enough to overlap, quiet enough to need keepalives.
    s.up.write(
        "deploy.py",
        "import time\nprint('start', flush=True)\ntime.sleep(2.5)\nprint('end', flush=True)\n",
    );
    s.up.commit("slow");
    let remote = s.world.path("remotes/origin.git");
    s.up.push(&remote);

    // A pull by the timer (root) is running when the push and a deploy arrive.
    let pull = s.node.spawn(&["pull"]);
    s.node.wait_for_log(1, "start");
    s.up.write("later.txt", "x");
    let pushed = s.up.commit("pushed during the pull");
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| push(&s.sshd, &alice, &s.up, &s.node, false));
        let b = scope.spawn(|| remote_troops(&s.sshd, &alice, &s.node, "deploy"));
        (a.join().unwrap(), b.join().unwrap())
    });
    let pull: Run = pull.wait_with_output().unwrap().into();
    pull.ok();
    assert_eq!(a.code, 0, "{}", a.all());
    assert_eq!(b.code, 0, "{}", b.all());
    assert!(
        a.stderr
            .contains("remote: troops: waiting for another troops run")
            || b.stderr.contains("troops: waiting for another troops run"),
        "nobody said they waited:\n{}\n{}",
        a.all(),
        b.all()
    );
    assert!(
        a.stderr.contains("still running") || b.stderr.contains("still running"),
        "no keepalive:\n{}\n{}",
        a.all(),
        b.all()
    );

    let runs = s.node.runs();
    assert_eq!(runs.len(), 3, "{runs:#?}");
    assert!(runs.iter().all(|r| r["result"] == "success"), "{runs:#?}");
    assert_eq!(s.node.deployed().as_deref(), Some(pushed.as_str()));
    // One at a time: each run starts after the one before has ended.
    let spans: Vec<(u64, u64)> = runs
        .iter()
        .map(|r| {
            let started = humantime_secs(r["started"].as_str().unwrap());
            (started, started + r["duration_ms"].as_u64().unwrap() / 1000)
        })
        .collect();
    for w in spans.windows(2) {
        assert!(w[1].0 >= w[0].1, "runs overlapped: {spans:?}");
    }
}

/// Seconds of an RFC 3339 UTC time like 2026-11-25T13:00:00Z (whole seconds are enough).
fn humantime_secs(t: &str) -> u64 {
    let out = Command::new("date")
        .args(["-u", "-d", t, "+%s"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn the_daemon_refuses_bad_requests_and_keeps_serving() {
    let s = setup();
    s.up.write("deploy.py", "print('ok')\n");
    s.up.commit("one");
    s.up.push(&s.world.path("remotes/origin.git"));
    let _daemon = serve(&s.node);
    let socket = s.node.path("run/troops/troops.sock");
    let ask = |bytes: &[u8]| -> String {
        let mut c = UnixStream::connect(&socket).unwrap();
        let _ = c.write_all(bytes);
        let mut reply = String::new();
        let _ = c.read_to_string(&mut reply);
        reply
    };
    assert!(
        ask(b"hello\n").starts_with("error malformed request"),
        "{}",
        ask(b"hello\n")
    );
    assert!(ask(b"troops/9 deploy\n").starts_with("error unsupported protocol"));
    assert!(ask(b"troops/1 launch-missiles\n").starts_with("error unknown request"));
    let huge = vec![b'x'; 100_000];
    assert!(
        ask(&huge).starts_with("error request too long"),
        "{}",
        ask(&huge)
    );
    // A client that says nothing does not hold up the others.
    let _silent = UnixStream::connect(&socket).unwrap();
    let reply = ask(b"troops/1 pull\n");
    assert!(
        reply.contains("out ok")
            && reply
                .trim_end()
                .ends_with(|c: char| c.is_ascii_alphanumeric()),
        "{reply}"
    );
    assert!(
        reply
            .lines()
            .last()
            .unwrap()
            .starts_with("done 0 run 1: deployed"),
        "{reply}"
    );
    let status = ask(b"troops/1 status\n");
    assert!(status.starts_with("done 0 branch master at"), "{status}");
    let socket_mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(socket_mode & 0o777, 0o660);
}

#[test]
fn with_no_daemon_the_push_lands_and_says_the_next_pull_deploys() {
    let s = setup();
    let alice = user(&s.world, &s.sshd, "e", Some(&s.node.group));
    s.up.write("deploy.py", "print('later')\n");
    let one = s.up.commit("one");
    let out = push(&s.sshd, &alice, &s.up, &s.node, false);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stderr
            .contains("the deploy will happen at the next pull"),
        "{}",
        out.stderr
    );
    // It landed in the shared repo; root takes it (and checks it) at the next pull.
    assert_eq!(s.node.pushed().as_deref(), Some(one.as_str()));
    assert_eq!(s.node.head(), None);
    assert_eq!(s.node.deployed(), None);
    // The remote has no branch yet, which the pull still reports; the push deploys anyway.
    let pull = s.node.troops(&["pull"]).failed();
    assert!(pull.stderr.contains("no remote offered"), "{}", pull.stderr);
    assert!(
        pull.stdout
            .contains(&format!("troops: run 1: deployed {}", &one[..12])),
        "{}",
        pull.stdout
    );
    assert_eq!(s.node.deployed().as_deref(), Some(one.as_str()));
}

#[test]
fn the_daemon_takes_a_socket_from_systemd() {
    // systemd-socket-activate binds the socket and starts the daemon with it as fd 3
    // (LISTEN_FDS/LISTEN_PID), the way troops.socket does.
    let activate = std::path::Path::new("/usr/bin/systemd-socket-activate");
    assert!(
        activate.exists(),
        "systemd is needed for this test (systemd-socket-activate)"
    );
    let s = setup();
    s.up.write("deploy.py", "print('activated')\n");
    s.up.commit("one");
    s.up.push(&s.world.path("remotes/origin.git"));
    let socket = s.world.path("activated.sock");
    let mut child = Command::new(activate)
        .arg("-l")
        .arg(&socket)
        .arg(&s.node.exe)
        .args(["--root", s.node.root.to_str().unwrap(), "serve"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = UnixStream::connect(&socket).unwrap();
    c.write_all(b"troops/1 pull\n").unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(reply.contains("out activated"), "{reply}");
    assert!(
        reply.lines().last().unwrap().starts_with("done 0 "),
        "{reply}"
    );
    // The daemon served the passed socket; it bound none of its own.
    assert!(!s.node.path("run/troops/troops.sock").exists());
}

#[test]
fn init_keeps_the_hooks_current() {
    let s = setup();
    let hook = s.node.repo().join("hooks/post-receive");
    let script = std::fs::read_to_string(&hook).unwrap();
    assert!(
        script.contains(&format!("'{}' --root", s.node.exe.display()))
            && script.contains("hook post-receive"),
        "{script}"
    );
    std::fs::write(&hook, "#!/bin/sh\nexit 0\n").unwrap();
    let out = s.node.init(&[], &[]);
    assert!(
        out.stdout.contains("install hook post-receive"),
        "{}",
        out.stdout
    );
    assert_eq!(std::fs::read_to_string(&hook).unwrap(), script);
}
