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
    assert!(
        !alive("sleep 4343"),
        "something outlived the timeout"
    );
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
