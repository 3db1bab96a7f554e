//! Faults a node meets in the field (issue "never stuck"): each one ends with the node
//! working, not stuck. Real processes, real git, throwaway roots.

use std::process::Command;

use crate::util::*;

#[test]
fn a_report_into_a_closed_pipe_ends_quietly() {
    let t = one_remote(&[]);
    t.up.write(
        "deploy.py",
        "for i in range(200000):\n    print('line', i)\n",
    );
    t.ship("chatty");
    t.node.troops(&["pull"]).ok();
    for args in ["log 1", "status", "log"] {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "set -o pipefail; {} --root {} {args} | head -1; echo \"status=${{PIPESTATUS[0]}}\" >&2",
                t.node.exe.display(),
                t.node.root.display()
            ))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args}: {stderr}");
        // Killed by SIGPIPE like any Unix tool (141), or done before the reader left.
        assert!(
            stderr.contains("status=141") || stderr.contains("status=0"),
            "{args}: {stderr}"
        );
    }
}

#[test]
fn out_of_range_settings_are_errors_naming_the_key() {
    let t = one_remote(&[]);
    for (key, value) in [
        ("fetch_timeout", "9223372036854775807"),
        ("retry_max", "99999999999"),
        ("interval", "18446744073709551615"),
    ] {
        let saved = std::fs::read_to_string(t.node.path("etc/troops/troops.toml")).unwrap();
        t.node.set(key, value);
        let out = t.node.troops(&["pull"]);
        assert_eq!(out.code, 1, "{key}: {}", out.all());
        assert!(
            out.stderr.contains(key.split('_').next().unwrap()),
            "{}",
            out.stderr
        );
        std::fs::write(t.node.path("etc/troops/troops.toml"), saved).unwrap();
    }
}

#[test]
fn output_without_newlines_is_bounded_and_so_is_the_error_it_quotes() {
    let t = one_remote(&[]);
    // 8 MiB on one line, then a failure whose last line is 1 MiB.
    t.up.write(
        "deploy.py",
        "import sys\nsys.stdout.write('x' * (8 << 20))\nsys.stdout.flush()\nprint()\nprint('y' * (1 << 20))\nsys.exit(3)\n",
    );
    t.ship("huge");
    let out = t.node.troops(&["pull"]).failed();
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(last.len() < 1000, "the summary quotes {} bytes", last.len());
    assert!(last.contains("bytes in all"), "{last}");
    let record = &t.node.runs()[0];
    assert!(record["error"].as_str().unwrap().len() < 1000);
    let log = std::fs::read_to_string(t.node.path("var/lib/troops/runs/1.log")).unwrap();
    assert!(
        log.lines().all(|l| l.len() <= 64 * 1024 + 64),
        "a log line longer than the limit"
    );
    assert!(
        log.len() >= 9 << 20,
        "nothing was lost: {} bytes",
        log.len()
    );
}

#[test]
fn stale_git_locks_left_by_a_crash_are_removed_and_said() {
    let t = one_remote(&[]);
    t.up.write("deploy.py", &simple_deploy("one"));
    t.ship("one");
    t.node.troops(&["pull"]).ok();
    let repo = t.node.state_repo();
    let locks = [
        "refs/heads/master.lock",
        "refs/troops/deployed.lock",
        "packed-refs.lock",
    ];
    for l in locks {
        std::fs::write(repo.join(l), "").unwrap();
        let touched = Command::new("touch")
            .args(["-d", "20 minutes ago"])
            .arg(repo.join(l))
            .status()
            .unwrap();
        assert!(touched.success());
    }
    t.up.write("deploy.py", &simple_deploy("two"));
    let two = t.ship("two");
    let out = t.node.troops(&["pull"]).ok();
    assert!(out.stderr.contains("stale git lock"), "{}", out.stderr);
    assert_eq!(t.node.deployed().as_ref(), Some(&two));
    assert_eq!(t.node.read("out/tag").as_deref(), Some("two"));
    let human = t.node.troops(&["status"]).ok().stdout;
    for l in locks {
        assert!(!repo.join(l).exists(), "{l}");
        assert!(human.contains(l), "{human}");
    }
    // A fresh lock (a git that is running right now) is left alone.
    std::fs::write(repo.join("refs/heads/master.lock"), "").unwrap();
    t.node.troops(&["pull"]).ok();
    assert!(repo.join("refs/heads/master.lock").exists());
}

#[test]
fn a_foreign_record_with_the_largest_id_does_not_make_runs_wrap() {
    let t = one_remote(&[]);
    t.up.write("deploy.py", &simple_deploy("one"));
    t.ship("one");
    t.node.troops(&["pull"]).ok();
    std::fs::write(
        t.node.path("var/lib/troops/runs/18446744073709551615.json"),
        "{}",
    )
    .unwrap();
    t.up.write("deploy.py", &simple_deploy("two"));
    t.ship("two");
    let out = t.node.troops(&["pull"]).ok();
    assert!(out.stdout.contains("run 2: deployed"), "{}", out.stdout);
}

#[test]
fn a_push_of_what_a_pull_already_deployed_is_not_deployed_again() {
    use std::io::{Read, Write};
    let t = one_remote(&[]);
    t.up.write("deploy.py", &simple_deploy("one"));
    let one = t.ship("one");
    // The push landed while a pull held the lock; the pull deployed it.
    git(
        &t.up.dir,
        &[
            "push",
            "-q",
            t.node.repo().to_str().unwrap(),
            "HEAD:refs/heads/master",
        ],
    );
    t.node.troops(&["pull"]).ok();
    let _daemon = crate::push::serve(&t.node);
    let mut c =
        std::os::unix::net::UnixStream::connect(t.node.path("run/troops/troops.sock")).unwrap();
    c.write_all(b"troops/1 push\n").unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    assert!(
        reply.contains(&format!("{} already deployed by run 1", &one[..12])),
        "{reply}"
    );
    // The pusher still sees what deploying their commit printed, and how it ended: the
    // pull that won the race ran it, not nobody.
    assert!(reply.contains("deploying one"), "{reply}");
    assert!(reply.contains("by run 1 (pull, "), "{reply}");
    assert_eq!(t.node.runs().len(), 1);
}

/// Whether a process whose command line holds `marker` is alive.
fn alive(marker: &str) -> bool {
    Command::new("pgrep")
        .args(["-f", marker])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn what_a_finished_deploy_left_running_is_stopped_and_named() {
    let t = one_remote(&[]);
    // A background child that inherits stdout and would hold the run open for 4242 s.
    t.up.write(
        "deploy.py",
        "import subprocess\nsubprocess.Popen(['sleep', '4242'])\nprint('started a helper')\n",
    );
    t.ship("leaves a child");
    let out = t.node.troops(&["pull"]).ok();
    assert!(!alive("sleep 4242"), "the child outlived the run");
    assert!(
        out.stdout.contains("troops: left running: pid ") && out.stdout.contains("sleep; stopped"),
        "{}",
        out.stdout
    );
    assert_eq!(t.node.runs()[0]["result"], "success");
}

#[test]
fn a_deploy_past_its_timeout_is_stopped_with_everything_it_started() {
    let t = one_remote(&[]);
    t.node.set("deploy_timeout", "3");
    t.up.write(
        "deploy.py",
        "import subprocess, time\nsubprocess.Popen(['sleep', '4343'])\nprint('working', flush=True)\ntime.sleep(4444)\n",
    );
    let c = t.ship("hangs");
    let out = t.node.troops(&["pull"]).failed();
    assert!(out.stderr.contains("timed out after 3s"), "{}", out.stderr);
    assert!(!alive("sleep 4343"), "something outlived the timeout");
    let record = &t.node.runs()[0];
    assert_eq!(record["result"], "failed");
    assert_ne!(t.node.deployed().as_ref(), Some(&c));
    // Backoff applies: the next pull waits instead of hanging again at once.
    let again = t.node.troops(&["pull"]);
    assert!(
        again.all().contains("next attempt after"),
        "{}",
        again.all()
    );
}

#[test]
fn a_slow_mirror_costs_only_its_own_timeout() {
    let world = World::new();
    let up = world.upstream("src");
    let healthy = world.bare("healthy");
    let slow = world.bare("slow");
    up.write("deploy.py", &simple_deploy("one"));
    let one = up.commit("one");
    up.push(&healthy);
    // The slow mirror is ahead with a large commit it sends at 2 KB/s.
    // Random, so it does not compress: about 200 KB on the wire, 100 s at 2 KB/s.
    let mut random = vec![0u8; 150_000];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").unwrap(),
        &mut random,
    )
    .unwrap();
    let noise: String = random.iter().map(|b| format!("{b:02x}")).collect();
    up.write("big.txt", &noise);
    up.commit("big");
    up.push(&slow);
    // ssh that runs the remote command locally: the slow mirror's output throttled from the
    // start, the healthy one's handshake a moment late (so the slow one is first to the
    // pack-writing stage either way).
    let throttle = world.path("throttle.py");
    std::fs::write(
        &throttle,
        r#"import subprocess, sys, time
args = sys.argv[1:]
at = next(i for i, a in enumerate(args) if "git-upload-pack" in a)
cmd = " ".join(args[at:])
slow = "slow.git" in cmd
if not slow:
    time.sleep(2)
p = subprocess.Popen(["sh", "-c", cmd], stdout=subprocess.PIPE)
out = sys.stdout.buffer
while True:
    chunk = p.stdout.read1(512) if slow else p.stdout.read1(65536)
    if not chunk:
        break
    out.write(chunk)
    out.flush()
    if slow:
        time.sleep(0.25)
sys.exit(p.wait())
"#,
    )
    .unwrap();
    let ssh = world.path("fake-ssh");
    std::fs::write(
        &ssh,
        format!(
            "#!/bin/sh\nexec /usr/bin/python3 {} \"$@\"\n",
            throttle.display()
        ),
    )
    .unwrap();
    Command::new("chmod").arg("755").arg(&ssh).status().unwrap();
    let node = world.node("n1");
    node.troops(&[
        "init",
        "--no-pull",
        "--group",
        &node.group,
        "--remote",
        &format!("slow=ssh://git@mirror.invalid{}", slow.display()),
        "--remote",
        &format!("healthy=ssh://git@mirror.invalid{}", healthy.display()),
    ])
    .ok();
    git(
        &node.state_repo(),
        &["config", "core.sshCommand", ssh.to_str().unwrap()],
    );
    node.set("fetch_timeout", "10");
    let out = node.troops(&["pull"]);
    assert_eq!(
        node.deployed().as_ref(),
        Some(&one),
        "{}\n{}",
        out.all(),
        node.status()
    );
    assert_eq!(node.remote_report("healthy")["fetch"], "tip");
    assert_eq!(node.remote_report("slow")["fetch"], "timed-out");
}

#[test]
fn no_more_than_fetch_jobs_remotes_are_fetched_at_once() {
    let world = World::new();
    let running = world.path("running");
    std::fs::create_dir_all(&running).unwrap();
    let counts = world.path("counts");
    // An ssh that stays a moment, notes how many of it are running, and fails.
    let ssh = world.path("fake-ssh");
    std::fs::write(
        &ssh,
        format!(
            "#!/bin/sh\ntouch {r}/$$\nls {r} | wc -l >> {c}\nsleep 1\nrm {r}/$$\nexit 1\n",
            r = running.display(),
            c = counts.display()
        ),
    )
    .unwrap();
    Command::new("chmod").arg("755").arg(&ssh).status().unwrap();
    let node = world.node("n1");
    let mut args: Vec<String> = vec![
        "init".into(),
        "--no-pull".into(),
        "--group".into(),
        node.group.clone(),
    ];
    for i in 0..6 {
        args.push("--remote".into());
        args.push(format!("r{i}=ssh://git@mirror{i}.invalid/x.git"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    node.troops(&args).ok();
    git(
        &node.state_repo(),
        &["config", "core.sshCommand", ssh.to_str().unwrap()],
    );
    node.set("fetch_jobs", "2");
    node.troops(&["pull"]).failed();
    let seen: Vec<usize> = std::fs::read_to_string(&counts)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert!(seen.len() >= 6, "every remote was tried: {seen:?}");
    assert!(
        seen.iter().all(|n| *n <= 2),
        "more than 2 at once: {seen:?}"
    );
    for i in 0..6 {
        assert_eq!(node.remote_report(&format!("r{i}"))["fetch"], "failed");
    }
}

#[test]
fn a_virtualenv_that_deploy_py_broke_is_built_again() {
    let t = one_remote(&[]);
    // deploy.py removes the troops module's .pth from its own venv.
    t.up.write(
        "deploy.py",
        "import glob, os, sys\nfor p in glob.glob(os.path.join(sys.prefix, 'lib', 'python*', 'site-packages', 'troops.pth')):\n    os.remove(p)\nprint('broke it')\n",
    );
    t.ship("breaks its venv");
    t.node.troops(&["pull"]).ok();
    t.up.write("deploy.py", &simple_deploy("after"));
    let after = t.ship("after");
    let out = t.node.troops(&["pull"]).ok();
    assert!(
        out.stdout
            .contains("is broken (it cannot find the troops module); building it again"),
        "{}",
        out.stdout
    );
    assert_eq!(t.node.deployed().as_ref(), Some(&after));
    assert_eq!(t.node.read("out/tag").as_deref(), Some("after"));
}

#[test]
fn the_daemon_serves_a_bounded_number_of_clients_and_drops_one_that_trickles() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let t = one_remote(&[]);
    t.node.set("max_clients", "5");
    let _daemon = crate::push::serve(&t.node);
    let socket = t.node.path("run/troops/troops.sock");
    // Idle clients take every slot (and serve()'s own probe connection has come and gone).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let idle: Vec<UnixStream> = (0..5)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut extra = UnixStream::connect(&socket).unwrap();
    let mut reply = String::new();
    extra.read_to_string(&mut reply).unwrap();
    assert_eq!(reply.trim(), "error busy");
    drop(idle);
    std::thread::sleep(std::time::Duration::from_millis(500));
    // A byte every two seconds never completes a request: dropped at the deadline.
    let mut slow = UnixStream::connect(&socket).unwrap();
    for _ in 0..7 {
        let _ = slow.write_all(b"t");
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    let mut reply = String::new();
    let _ = slow.read_to_string(&mut reply);
    assert!(reply.contains("not sent within 10s"), "{reply:?}");
    // And the daemon still answers.
    let mut c = UnixStream::connect(&socket).unwrap();
    c.write_all(b"troops/1 status\n").unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("done 0"), "{reply}");
}

#[test]
fn the_pull_unit_is_bounded_above_what_a_pull_may_take() {
    let t = one_remote(&[]);
    let dropin = t
        .node
        .path("etc/systemd/system/troops-pull.service.d/troops-timeout.conf");
    let text = std::fs::read_to_string(&dropin).unwrap();
    // fetch_timeout 60 + 2 x deploy_timeout 3600 + 600.
    assert!(text.contains("TimeoutStartSec=7860s\n"), "{text}");
    let units = t.world.path("units");
    let d = units.join("troops-pull.service.d");
    std::fs::create_dir_all(&d).unwrap();
    let packaged = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging/units/troops-pull/troops-pull.service");
    // The packaged unit runs /usr/bin/troops; here the binary under test stands in.
    let unit = std::fs::read_to_string(&packaged)
        .unwrap()
        .replace("/usr/bin/troops", t.node.exe.to_str().unwrap());
    std::fs::write(units.join("troops-pull.service"), unit).unwrap();
    std::fs::copy(&dropin, d.join("troops-timeout.conf")).unwrap();
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(units.join("troops-pull.service"))
        .env("SYSTEMD_UNIT_PATH", format!("{}:", units.display()))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn what_a_deploy_started_in_a_new_session_is_stopped_too() {
    let t = one_remote(&[]);
    // Out of deploy.py's process group and session, output closed: nothing ties these to
    // the run but their ancestry. One stays a child of deploy.py, one is double-forked.
    t.up.write(
        "deploy.py",
        "import subprocess\n\
         subprocess.Popen(['setsid', 'sleep', '4545'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n\
         subprocess.run(['setsid', 'sh', '-c', 'sleep 4546 </dev/null >/dev/null 2>&1 &'])\n\
         print('started two daemons')\n",
    );
    t.ship("escapes");
    let out = t.node.troops(&["pull"]).ok();
    let gone = |m: &str| {
        (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            !alive(m)
        })
    };
    assert!(gone("sleep 4545"), "a setsid child outlived the run");
    assert!(
        gone("sleep 4546"),
        "a double-forked daemon outlived the run"
    );
    assert!(
        out.stdout.contains("troops: left running: pid ") && out.stdout.contains("sleep"),
        "{}",
        out.stdout
    );
}

#[test]
fn a_killed_agent_leaves_no_fetch_worker_behind() {
    let world = World::new();
    let node = world.node("n1");
    // An ssh that never answers: the fetch worker waits on it.
    let ssh = world.path("hung-ssh");
    std::fs::write(&ssh, "#!/bin/sh\nexec sleep 4747\n").unwrap();
    Command::new("chmod").arg("755").arg(&ssh).status().unwrap();
    node.troops(&[
        "init",
        "--no-pull",
        "--group",
        &node.group,
        "--remote",
        "hung=ssh://git@mirror.invalid/x.git",
    ])
    .ok();
    git(
        &node.state_repo(),
        &["config", "core.sshCommand", ssh.to_str().unwrap()],
    );
    let mut agent = node.spawn(&["pull"]);
    let worker = format!("{} __fetch hung", node.root.display());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !alive(&worker) {
        assert!(
            std::time::Instant::now() < deadline,
            "no fetch worker started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    agent.kill().unwrap();
    agent.wait().unwrap();
    let gone = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        !alive(&worker)
    });
    let _ = Command::new("pkill").args(["-f", "sleep 4747"]).status();
    assert!(
        gone,
        "the fetch worker outlived the agent killed with SIGKILL"
    );
}

#[test]
fn a_deploy_whose_record_cannot_be_written_fails_and_is_tried_again() {
    let t = one_remote(&[]);
    // deploy.py succeeds, having filled the disk the run records live on (and kept a link
    // to its context file, whose removal would otherwise free a page again). Only a small
    // disk, the test's tmpfs: the second pull runs it on the real one.
    t.up.write(
        "deploy.py",
        r#"import os, pathlib, troops
runs = pathlib.Path(troops.root, "var/lib/troops/runs")
st = os.statvfs(runs)
if st.f_blocks * st.f_frsize < 16 << 20:
    for c in runs.glob("*.context.json"):
        os.link(c, runs / ("kept-" + c.name))
    f = open(runs / "filler", "wb", buffering=0)
    for size in (65536, 512, 1):
        try:
            while True:
                f.write(b"x" * size)
        except OSError:
            pass
print("deployed, disk full")
"#,
    );
    let c = t.ship("fills the disk");
    let runs = t.node.path("var/lib/troops/runs");
    std::fs::create_dir_all(&runs).unwrap();
    // A small tmpfs over the records, in a mount namespace of this command's own.
    let out: Run = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=2m tmpfs {} && exec \"$@\"",
            runs.display()
        ))
        .arg("sh")
        .args(t.node.command(&["pull"]).get_program().to_str())
        .args(t.node.command(&["pull"]).get_args())
        .output()
        .unwrap()
        .into();
    let out = out.failed();
    assert!(
        out.all().contains("could not record the run") && out.all().contains("No space left"),
        "{}",
        out.all()
    );
    assert_ne!(
        t.node.deployed().as_ref(),
        Some(&c),
        "deployed moved unrecorded"
    );
    // With room again, the next pull deploys it and records it.
    t.node.troops(&["pull"]).ok();
    assert_eq!(t.node.deployed().as_ref(), Some(&c));
    assert_eq!(t.node.runs()[0]["result"], "success");
}

#[test]
fn what_an_interrupted_run_left_is_swept_at_the_next_start() {
    let t = one_remote(&[]);
    t.up.write("deploy.py", &simple_deploy("one"));
    t.ship("one");
    // What a kill -9 leaves: a half-built venv (no ready marker), a run's context and
    // results files, a record still saying "running".
    let half = t.node.path("var/lib/troops/venvs/0123456789abcdef01234567");
    std::fs::create_dir_all(half.join("lib/python3/site-packages")).unwrap();
    std::fs::write(
        half.join("lib/python3/site-packages/big"),
        vec![0u8; 1 << 20],
    )
    .unwrap();
    let runs = t.node.path("var/lib/troops/runs");
    std::fs::create_dir_all(&runs).unwrap();
    std::fs::write(runs.join("7.context.json"), "{}").unwrap();
    std::fs::write(runs.join("7.results.json"), "[]").unwrap();
    let out = t.node.troops(&["pull"]).ok();
    assert!(!half.exists(), "the unfinished venv was kept");
    assert!(!runs.join("7.context.json").exists());
    assert!(!runs.join("7.results.json").exists());
    assert!(
        out.all()
            .contains("removed the unfinished virtualenv 0123456789abcdef01234567"),
        "{}",
        out.all()
    );
    // Only what was unfinished: the venv this run built is kept.
    let venvs: Vec<_> = std::fs::read_dir(t.node.path("var/lib/troops/venvs"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(venvs.len(), 1);
    assert!(venvs[0].path().join(".troops-ready").exists());
}

/// A client of the daemon that asks for a deploy of 40 MB of output and reads nothing until
/// `idle` after the run has ended. Another process, as a stuck ssh session would be. What
/// it got: (bytes, whether it was told lines were skipped, whether it got `done 0`).
fn a_client_behind_a_loud_deploy(
    keepalive: Option<&str>,
    idle: std::time::Duration,
) -> (u64, bool, bool) {
    let t = one_remote(&[]);
    if let Some(k) = keepalive {
        t.node.set("keepalive", k);
    }
    // Loud (40 MB) once the marker exists; the first deploy is quiet.
    t.up.write(
        "deploy.py",
        r#"import os, sys, troops
if os.path.exists(os.path.join(troops.root, "loud")):
    line = "x" * 1000 + "\n"
    for _ in range(40000):
        sys.stdout.write(line)
print("the end")
"#,
    );
    let c = t.ship("loud");
    t.node.troops(&["pull"]).ok();
    std::fs::write(t.node.path("loud"), "").unwrap();
    let _daemon = crate::push::serve(&t.node);
    let ended = t.node.path("ended");
    let client = Command::new("/usr/bin/python3")
        .args([
            "-c",
            r#"import os, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"troops/1 deploy\n")
while not os.path.exists(sys.argv[2]):
    time.sleep(0.1)
got = b""
while True:
    b = s.recv(1 << 20)
    if not b:
        break
    got += b
sys.stdout.write("%d %s %s" % (len(got), b"lines of output skipped" in got, b"\ndone 0 " in got))
"#,
        ])
        .arg(t.node.path("run/troops/troops.sock"))
        .arg(&ended)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    // runs() is oldest first: run 2 is the daemon's.
    while !(t.node.runs().len() == 2 && t.node.runs()[1]["result"] != "running") {
        assert!(
            std::time::Instant::now() < deadline,
            "the deploy never ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let record = &t.node.runs()[1];
    assert_eq!(record["result"], "success", "{record}");
    assert_eq!(record["commit"], c.as_str());
    std::thread::sleep(idle);
    std::fs::write(&ended, "").unwrap();
    let got = String::from_utf8(client.wait_with_output().unwrap().stdout).unwrap();
    let mut words = got.split(' ');
    let mut next = || {
        words
            .next()
            .unwrap_or_else(|| panic!("client said {got:?}"))
    };
    (next().parse().unwrap(), next() == "True", next() == "True")
}

#[test]
fn a_client_that_falls_behind_gets_no_backlog_but_still_the_verdict() {
    let (bytes, skipped, done) = a_client_behind_a_loud_deploy(None, std::time::Duration::ZERO);
    // Not 40 MB kept for it: what fit in its buffer, a line saying the rest was skipped,
    // and how the run ended.
    assert!(bytes < 8 << 20, "{bytes} bytes were kept for the client");
    assert!(skipped, "the client was not told lines were skipped");
    assert!(done, "the client did not get the verdict");
}

#[test]
fn a_client_that_stops_reading_altogether_is_dropped_and_the_deploy_goes_on() {
    // Two keepalive periods (5 s at least) without taking a write: gone.
    let (bytes, _, done) =
        a_client_behind_a_loud_deploy(Some("1"), std::time::Duration::from_secs(8));
    // Dropped: what was in flight, then the end of the connection.
    assert!(bytes < 8 << 20, "{bytes} bytes were kept for the client");
    assert!(!done, "the client was kept to the end");
}

#[test]
fn a_run_log_keeps_its_tail_within_log_max() {
    let t = one_remote(&[]);
    t.node.set("log_max", "65536");
    t.up.write(
        "deploy.py",
        "for i in range(3000):\n    print('line %04d ' % i + 'y' * 100)\n",
    );
    t.ship("chatty");
    let out = t.node.troops(&["pull"]).ok();
    // Whoever is attached sees everything; the log keeps the tail.
    assert!(out.stdout.contains("line 0000 "));
    let log = std::fs::read_to_string(t.node.path("var/lib/troops/runs/1.log")).unwrap();
    assert!(log.len() <= 65536 + 200, "the log is {} bytes", log.len());
    let first = log.lines().next().unwrap();
    assert!(
        first.starts_with("troops: ") && first.contains("bytes of earlier output were dropped"),
        "{first}"
    );
    assert!(!log.contains("line 0000 "));
    assert!(log.contains("line 2999 "));
    assert!(log.contains("troops: run 1: deployed"));
    // Every kept line is whole.
    assert!(
        log.lines().skip(1).all(|l| !l.starts_with('y')),
        "a line was cut"
    );
}

/// The node repository's packs, with their index files.
fn packs(node: &Node) -> Vec<std::path::PathBuf> {
    let dir = node.state_repo().join("objects/pack");
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .collect();
    v.sort();
    v
}

fn a_damaged_object_store_is_repaired_from_the_remotes(damage: fn(&std::path::Path)) {
    let t = one_remote(&[]);
    t.up.write("deploy.py", &simple_deploy("one"));
    t.ship("one");
    t.node.troops(&["pull"]).ok();
    let found = packs(&t.node);
    assert!(!found.is_empty(), "the fetch left no pack");
    for p in &found {
        damage(p);
    }
    // Status still reports, and says what is wrong.
    let status = t.node.troops(&["status"]);
    assert_eq!(status.code, 0, "{}", status.all());
    assert!(status.stdout.contains("DAMAGED "), "{}", status.all());
    t.up.write("deploy.py", &simple_deploy("two"));
    let two = t.ship("two");
    let out = t.node.troops(&["pull"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.all().contains("repaired"), "{}", out.all());
    assert_eq!(t.node.deployed().as_ref(), Some(&two));
    assert_eq!(t.node.read("out/tag").as_deref(), Some("two"));
    let status = t.node.troops(&["status"]).ok();
    assert!(!status.stdout.contains("DAMAGED"), "{}", status.stdout);
    t.node.fsck();
}

#[test]
fn a_truncated_pack_is_repaired_from_the_remotes() {
    a_damaged_object_store_is_repaired_from_the_remotes(|pack| {
        let len = std::fs::metadata(pack).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(pack).unwrap();
        f.set_len(len / 2).unwrap();
    });
}

#[test]
fn a_lost_pack_index_is_repaired_from_the_remotes() {
    a_damaged_object_store_is_repaired_from_the_remotes(|pack| {
        std::fs::remove_file(pack.with_extension("idx")).unwrap();
    });
}

#[test]
fn a_clock_before_1970_or_after_9999_is_survived() {
    let t = one_remote(&[]);
    t.up.write(
        "deploy.py",
        "raise SystemExit('fails, so a retry time is written')\n",
    );
    t.ship("fails");
    // faketime(1) runs troops with its clock set; the test's own clock is untouched.
    let at_time = |at: &str, args: &[&str]| -> Run {
        let mut c = Command::new("faketime");
        c.arg("-f")
            .arg(at)
            .arg(&t.node.exe)
            .arg("--root")
            .arg(&t.node.root);
        c.args(args)
            .env_remove("TROOPS_ROOT")
            .env_remove("JOURNAL_STREAM");
        c.output().unwrap().into()
    };
    // Before 1970, and about year 10005.
    for at in ["@1969-07-20 20:17:40", "+7980y"] {
        let out = at_time(at, &["pull"]);
        assert!(!out.all().contains("panicked"), "{at}:\n{}", out.all());
        assert_eq!(out.code, 1, "{at}:\n{}", out.all());
        assert!(
            out.stderr.contains("the system clock reads"),
            "{at}:\n{}",
            out.all()
        );
        let status = at_time(at, &["status"]);
        assert_eq!(status.code, 0, "{at}:\n{}", status.all());
    }
    // With the clock right again, the node works as before.
    t.up.write("deploy.py", &simple_deploy("fine"));
    let fine = t.ship("fine");
    t.node.troops(&["pull"]).ok();
    assert_eq!(t.node.deployed().as_ref(), Some(&fine));
}

#[test]
fn a_run_killed_with_the_agent_is_reported_interrupted_at_once() {
    let t = one_remote(&[]);
    t.up.write(
        "deploy.py",
        "import time\nprint('working', flush=True)\ntime.sleep(4848)\n",
    );
    t.ship("slow");
    let mut agent = t.node.spawn(&["pull"]);
    t.node.wait_for_log(1, "working");
    agent.kill().unwrap();
    agent.wait().unwrap();
    // Nobody holds the node lock: the run is over, whatever its record last said.
    let status = t.node.status();
    assert_eq!(status["last_run"]["result"], "interrupted", "{status}");
    assert_eq!(t.node.runs()[0]["result"], "interrupted");
    let text = t.node.troops(&["status"]).ok().stdout;
    assert!(text.contains("run 1 interrupted"), "{text}");
    let _ = Command::new("pkill")
        .args(["-f", "time.sleep(4848)"])
        .status();
}

/// Files under `dir` (recursively) whose names say they were left half-done.
fn leftovers_under(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                // Checkouts hold what deploy.py wrote, venvs what pip did (checked apart);
                // objects are git's.
                if !["work", "venvs", "objects"].contains(&name.as_str()) {
                    stack.push(p);
                }
                continue;
            }
            let half = name.contains(".tmp-")
                || name.ends_with(".tmp")
                || name.ends_with(".context.json")
                || name.ends_with(".results.json")
                || (name.ends_with(".lock") && name != "troops-fetch.lock");
            if half {
                found.push(p.display().to_string());
            }
        }
    }
    found
}

#[test]
fn fifty_kills_at_random_moments_leave_a_node_that_deploys_the_head_once() {
    let t = one_remote(&[]);
    // Every git lock found under the node lock counts as stale here: the kills leave them.
    t.node.set("stale_lock", "0");
    let mut seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill loop seed {seed}");
    let mut random = move |below: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % below
    };
    let deploy = r#"import pathlib, troops
out = pathlib.Path(troops.root, "out")
out.mkdir(exist_ok=True)
with open(out / "deploys", "a") as f:
    f.write(troops.commit + "\n")
print("deployed", troops.commit)
"#;
    t.up.write("deploy.py", deploy);
    for round in 0..50 {
        // Now and then a new requirements.txt, so that some kills land in a venv build.
        if round % 10 == 0 {
            t.up.write("requirements.txt", &format!("# round {round}\n"));
        }
        t.ship(&format!("round {round}"));
        let mut agent = t.node.spawn(&["pull"]);
        std::thread::sleep(std::time::Duration::from_millis(random(1500)));
        let _ = agent.kill();
        let _ = agent.wait();
    }
    let head = t.up.head();
    let before = t.node.runs().len();
    let out = t.node.troops(&["pull"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(t.node.deployed().as_ref(), Some(&head));
    assert_eq!(t.node.head().as_ref(), Some(&head));
    let runs = t.node.runs();
    assert!(runs.len() <= before + 1, "more than one run for the head");
    // Once: the next pull has nothing to do.
    t.node.troops(&["pull"]).ok();
    assert_eq!(t.node.runs().len(), runs.len());
    assert!(runs.iter().all(|r| r["result"] != "running"), "{runs:?}");
    let deploys = t.node.read("out/deploys").unwrap_or_default();
    assert!(deploys.lines().filter(|l| *l == head).count() >= 1);
    // Nothing stale: processes, half-built venvs, scratch and temp files, git locks.
    let root = t.node.root.display().to_string();
    assert!(!alive(&root), "a process of the node outlived the kills");
    for v in std::fs::read_dir(t.node.path("var/lib/troops/venvs"))
        .unwrap()
        .flatten()
    {
        assert!(
            v.path().join(".troops-ready").exists(),
            "{} is half-built",
            v.path().display()
        );
    }
    let left = leftovers_under(&t.node.path("var/lib/troops"));
    assert!(left.is_empty(), "left behind: {left:#?}");
    t.node.fsck();
}

#[test]
fn an_upgraded_daemon_leaves_once_idle_for_the_new_program() {
    use std::io::{Read, Write};
    let t = one_remote(&[]);
    // The daemon runs from a copy that an "upgrade" replaces the way dpkg does: a new file
    // renamed over the old.
    let bin = t.node.path("usr-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("troops");
    std::fs::copy(&t.node.exe, &exe).unwrap();
    let mut daemon = Command::new(&exe)
        .arg("--root")
        .arg(&t.node.root)
        .arg("serve")
        .env_remove("TROOPS_ROOT")
        .spawn()
        .unwrap();
    let socket = t.node.path("run/troops/troops.sock");
    let ask = || {
        let mut c = std::os::unix::net::UnixStream::connect(&socket).ok()?;
        c.write_all(b"troops/1 status\n").ok()?;
        let mut reply = String::new();
        c.read_to_string(&mut reply).ok()?;
        Some(reply)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while ask().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not come up"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Not upgraded: it stays.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "the daemon left unasked"
    );
    std::fs::copy(&t.node.exe, bin.join("troops.new")).unwrap();
    std::fs::rename(bin.join("troops.new"), &exe).unwrap();
    let reply = ask().expect("the upgraded daemon still answers its next client");
    assert!(reply.starts_with("done 0"), "{reply}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = daemon.kill();
            panic!("the daemon kept running the replaced program");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn a_deploy_that_never_stops_printing_still_times_out() {
    let t = one_remote(&[]);
    t.node.set("deploy_timeout", "3");
    t.up.write(
        "deploy.py",
        "import time\nwhile True:\n    print('still waiting for a lock', flush=True)\n    time.sleep(0.02)\n",
    );
    let c = t.ship("chatty and hung");
    let out = t.node.troops(&["pull"]).failed();
    assert!(out.stderr.contains("timed out after 3s"), "{}", out.all());
    assert_ne!(t.node.deployed().as_ref(), Some(&c));
}

#[test]
fn an_installer_that_stalls_is_stopped_at_the_timeout() {
    let t = one_remote(&[]);
    t.node.set("deploy_timeout", "3");
    // An index that accepts connections and never answers.
    let index = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = index.local_addr().unwrap().port();
    let _held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in index.incoming() {
            conns.push(c);
        }
    });
    t.up.write(
        "requirements.txt",
        &format!("--index-url http://127.0.0.1:{port}/simple\nsomething-that-never-comes\n"),
    );
    t.up.write("deploy.py", &simple_deploy("never"));
    let c = t.ship("stalls");
    let out = t.node.troops(&["pull"]).failed();
    assert!(out.all().contains("timed out after 3s"), "{}", out.all());
    assert_ne!(t.node.deployed().as_ref(), Some(&c));
}

#[test]
fn losing_only_the_oldest_pack_is_repaired_too() {
    let t = one_remote(&[]);
    t.up.write("deploy.py", &simple_deploy("one"));
    // Enough history that the first pack holds what later commits stand on.
    for i in 0..20 {
        t.up.write(&format!("data/{i}.txt"), &format!("file {i}\n"));
    }
    t.ship("one");
    t.node.troops(&["pull"]).ok();
    let first = packs(&t.node);
    t.up.write("deploy.py", &simple_deploy("two"));
    t.ship("two");
    t.node.troops(&["pull"]).ok();
    let oldest = first.first().expect("a pack from the first pull").clone();
    assert!(
        packs(&t.node).len() >= 2,
        "the second pull made no pack of its own"
    );
    std::fs::remove_file(oldest.with_extension("idx")).unwrap();
    t.up.write("deploy.py", &simple_deploy("three"));
    let three = t.ship("three");
    let out = t.node.troops(&["pull"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(t.node.deployed().as_ref(), Some(&three));
    assert_eq!(t.node.read("out/tag").as_deref(), Some("three"));
    t.node.fsck();
}

#[test]
fn a_lost_branch_commit_no_remote_has_holds_the_node() {
    let t = one_remote(&[]);
    t.up.write("deploy.py", &simple_deploy("one"));
    let one = t.ship("one");
    t.node.troops(&["pull"]).ok();
    // The remote's history is rewritten (a new root), and the node's copy of the old one
    // is lost: nothing can tell whether the remote's tip is ahead of the branch or behind.
    git(&t.up.dir, &["checkout", "-q", "--orphan", "rewritten"]);
    t.up.write("deploy.py", &simple_deploy("rewritten"));
    git(&t.up.dir, &["add", "-A"]);
    git(&t.up.dir, &["commit", "-q", "-m", "rewritten"]);
    git(
        &t.up.dir,
        &[
            "push",
            "-q",
            "-f",
            t.remote.to_str().unwrap(),
            "HEAD:refs/heads/master",
        ],
    );
    git(&t.remote, &["gc", "-q", "--prune=now"]);
    for p in packs(&t.node) {
        std::fs::remove_file(p.with_extension("idx")).unwrap();
    }
    let runs = t.node.runs().len();
    let out = t.node.troops(&["pull"]).failed();
    assert!(
        out.stderr.contains(&format!("was at {one}"))
            && out
                .stderr
                .contains("the node holds rather than move the branch"),
        "{}",
        out.all()
    );
    assert_eq!(t.node.runs().len(), runs, "something was deployed");
    // Again: still held, and said in status.
    t.node.troops(&["pull"]).failed();
    let status = t.node.troops(&["status"]).ok();
    assert!(status.stdout.contains("DAMAGED"), "{}", status.stdout);
    assert_eq!(t.node.runs().len(), runs, "something was deployed");
}
