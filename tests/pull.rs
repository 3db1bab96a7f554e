//! Choosing the target: three file:// remotes, fast-forward only.

use std::path::PathBuf;

use crate::util::*;

struct Fleet {
    world: World,
    up: Upstream,
    remotes: Vec<PathBuf>,
    node: Node,
}

/// Three remotes holding the same first commit, and an initialised node.
fn fleet() -> Fleet {
    let world = World::new();
    let up = world.upstream("src");
    up.write("deploy.py", &simple_deploy("one"));
    up.commit("one");
    let remotes: Vec<PathBuf> = ["a", "b", "c"].iter().map(|n| world.bare(n)).collect();
    for r in &remotes {
        up.push(r);
    }
    let node = world.node("n1");
    node.init(
        &[("a", &remotes[0]), ("b", &remotes[1]), ("c", &remotes[2])],
        &["web"],
    );
    Fleet {
        world,
        up,
        remotes,
        node,
    }
}

#[test]
fn first_pull_deploys_and_a_noop_pull_runs_nothing() {
    let f = fleet();
    let head = f.up.head();
    let out = f.node.troops(&["pull"]).ok();
    assert!(out.stdout.contains("deploying one"), "{}", out.stdout);
    assert_eq!(f.node.read("out/deployed").as_deref(), Some(head.as_str()));
    assert_eq!(f.node.head().as_deref(), Some(head.as_str()));
    assert_eq!(f.node.deployed().as_deref(), Some(head.as_str()));
    let runs = f.node.runs();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["result"], "success");
    assert_eq!(runs[0]["commit"], head.as_str());
    assert_eq!(runs[0]["previous"], serde_json::Value::Null);
    for r in ["a", "b", "c"] {
        assert_eq!(f.node.remote_report(r)["standing"], "current");
    }

    let venvs = std::fs::read_dir(f.node.path("var/lib/troops/venvs"))
        .unwrap()
        .count();
    let out = f.node.troops(&["pull"]).ok();
    assert!(out.stdout.contains("up to date"), "{}", out.stdout);
    assert!(!out.stdout.contains("deploying"), "{}", out.stdout);
    assert_eq!(f.node.runs().len(), 1, "a no-op pull made a run");
    assert_eq!(
        std::fs::read_dir(f.node.path("var/lib/troops/venvs"))
            .unwrap()
            .count(),
        venvs
    );
    for r in ["a", "b", "c"] {
        assert_eq!(f.node.remote_report(r)["standing"], "current");
    }
}

#[test]
fn a_new_commit_on_one_remote_is_taken() {
    let f = fleet();
    f.node.troops(&["pull"]).ok();
    f.up.write("deploy.py", &simple_deploy("two"));
    let two = f.up.commit("two");
    f.up.push(&f.remotes[1]);
    f.node.troops(&["pull"]).ok();
    assert_eq!(f.node.deployed().as_deref(), Some(two.as_str()));
    assert_eq!(f.node.read("out/tag").as_deref(), Some("two"));
    assert_eq!(f.node.remote_report("b")["standing"], "current");
    // The others lag behind: stale, not a problem.
    let a = f.node.remote_report("a");
    assert_eq!(a["standing"], "behind");
    assert!(a.get("problem").is_none(), "{a}");
    let runs = f.node.runs();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1]["previous"], runs[0]["commit"]);
}

#[test]
fn a_force_pushed_older_commit_is_ignored_and_reported() {
    let f = fleet();
    let one = f.up.head();
    f.up.write("deploy.py", &simple_deploy("two"));
    let two = f.up.commit("two");
    for r in &f.remotes {
        f.up.push(r);
    }
    f.node.troops(&["pull"]).ok();
    assert_eq!(f.node.deployed().as_deref(), Some(two.as_str()));

    f.up.force_push(&f.remotes[0], &one);
    f.node.troops(&["pull"]).ok();
    assert_eq!(
        f.node.head().as_deref(),
        Some(two.as_str()),
        "the node rewound"
    );
    assert_eq!(f.node.read("out/tag").as_deref(), Some("two"));
    let a = f.node.remote_report("a");
    assert_eq!(
        a["standing"],
        "rewound",
        "{}\none={one} two={two}\n{}",
        f.node.status(),
        git(&f.node.state_repo(), &["for-each-ref"])
    );
    assert!(a["problem"].as_str().unwrap().contains("backwards"), "{a}");
    let human = f.node.troops(&["status"]).ok().stdout;
    assert!(human.contains("PROBLEM: went backwards"), "{human}");
    // Still reported on the next pull, until the remote catches up.
    f.node.troops(&["pull"]).ok();
    assert_eq!(f.node.remote_report("a")["standing"], "rewound");
    f.up.push(&f.remotes[0]);
    f.node.troops(&["pull"]).ok();
    assert_eq!(f.node.remote_report("a")["standing"], "current");
    assert_eq!(f.node.runs().len(), 1);
}

#[test]
fn a_remote_rewritten_to_a_diverging_history_is_ignored() {
    let f = fleet();
    let one = f.up.head();
    f.up.write("deploy.py", &simple_deploy("two"));
    let two = f.up.commit("two");
    f.up.push(&f.remotes[0]);
    f.node.troops(&["pull"]).ok();
    assert_eq!(f.node.head().as_deref(), Some(two.as_str()));
    // c is rewritten to a sibling of what the node runs.
    f.up.reset_hard(&one);
    f.up.write("deploy.py", &simple_deploy("rewritten"));
    f.up.commit("rewritten");
    f.up.force_push(&f.remotes[2], "HEAD");
    f.node.troops(&["pull"]).ok();
    assert_eq!(f.node.head().as_deref(), Some(two.as_str()));
    assert_eq!(f.node.read("out/tag").as_deref(), Some("two"));
    let c = f.node.remote_report("c");
    assert_eq!(c["standing"], "diverged");
    assert!(
        c["problem"].as_str().unwrap().contains("does not contain"),
        "{c}"
    );
    assert_eq!(f.node.remote_report("a")["standing"], "current");
}

#[test]
fn remotes_that_diverge_from_each_other_keep_the_node_where_it_is() {
    let f = fleet();
    f.node.troops(&["pull"]).ok();
    let one = f.up.head();
    f.up.write("deploy.py", &simple_deploy("left"));
    f.up.commit("left");
    f.up.push(&f.remotes[0]);
    f.up.reset_hard(&one);
    f.up.write("deploy.py", &simple_deploy("right"));
    f.up.commit("right");
    f.up.push(&f.remotes[1]);

    let out = f.node.troops(&["pull"]).failed();
    assert!(
        out.stderr.contains("remotes a and b disagree"),
        "{}",
        out.all()
    );
    assert_eq!(f.node.head().as_deref(), Some(one.as_str()));
    assert_eq!(f.node.read("out/tag").as_deref(), Some("one"));
    let status = f.node.status();
    assert_eq!(
        status["last_pull"]["disagree"],
        serde_json::json!(["a", "b"])
    );
    let human = f.node.troops(&["status"]).ok().stdout;
    assert!(human.contains("remotes a and b disagree"), "{human}");
    assert_eq!(f.node.runs().len(), 1);
}

#[test]
fn a_missing_and_a_hanging_remote_do_not_stop_the_others() {
    let f = fleet();
    // d's path does not exist; e is an ssh remote whose ssh never answers.
    let fake_ssh = f.world.path("fake-ssh");
    // Not exec'd, so the script's own path (unique to this test) shows in ps while it hangs.
    std::fs::write(&fake_ssh, "#!/bin/sh\nsleep 600\n").unwrap();
    let marker = fake_ssh.display().to_string();
    std::process::Command::new("chmod")
        .arg("755")
        .arg(&fake_ssh)
        .status()
        .unwrap();
    let missing = format!("d=file://{}", f.world.path("nowhere.git").display());
    f.node
        .troops(&[
            "init",
            "--no-pull",
            "--group",
            &f.node.group,
            "--remote",
            &missing,
            "--remote",
            "e=ssh://git@hang.invalid/x.git",
        ])
        .ok();
    git(
        &f.node.state_repo(),
        &["config", "core.sshCommand", &fake_ssh.display().to_string()],
    );
    f.node.set("fetch_timeout", "5");

    f.up.write("deploy.py", &simple_deploy("two"));
    let two = f.up.commit("two");
    f.up.push(&f.remotes[2]);
    let started = std::time::Instant::now();
    let out = f.node.troops(&["pull"]).ok();
    assert!(
        started.elapsed().as_secs() < 60,
        "pull waited on the hanging remote"
    );
    assert_eq!(
        f.node.deployed().as_deref(),
        Some(two.as_str()),
        "{}",
        out.all()
    );
    assert_eq!(f.node.remote_report("d")["fetch"], "failed");
    assert_eq!(f.node.remote_report("e")["fetch"], "timed-out");
    assert!(
        out.stderr.contains("remote e") && out.stderr.contains("no answer within 5s"),
        "{}",
        out.stderr
    );
    // The hung transport was killed with its fetch, not left behind.
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&ps.stdout).contains(&marker),
        "a hung fetch survived the pull"
    );
}

#[test]
fn two_pulls_at_once_deploy_each_commit_once() {
    let f = fleet();
    f.up.write(
        "deploy.py",
        "import time, troops\nprint('slow deploy', flush=True)\ntime.sleep(1)\n",
    );
    let head = f.up.commit("slow");
    for r in &f.remotes {
        f.up.push(r);
    }
    let a = f.node.spawn(&["pull"]);
    let b = f.node.command(&["pull"]).output().unwrap();
    let a = a.wait_with_output().unwrap();
    let (a, b): (Run, Run) = (a.into(), b.into());
    assert_eq!(a.code, 0, "{}", a.all());
    assert_eq!(b.code, 0, "{}", b.all());
    let runs = f.node.runs();
    assert_eq!(
        runs.len(),
        1,
        "two pulls deployed one commit twice: {runs:?}"
    );
    assert_eq!(runs[0]["commit"], head.as_str());
    assert!(
        a.stderr.contains("waiting") || b.stderr.contains("waiting"),
        "neither pull said it waited:\n{}\n{}",
        a.all(),
        b.all()
    );
}

#[test]
fn mirrors_sending_the_same_pack_at_once_all_fetch_cleanly() {
    // Identical remotes send byte-identical packs with identical names; fetched in parallel
    // into one repo they used to trip over each other's .keep files.
    let f = fleet();
    for i in 0..30 {
        let node = f.world.node(&format!("m{i}"));
        node.init(
            &[
                ("a", &f.remotes[0]),
                ("b", &f.remotes[1]),
                ("c", &f.remotes[2]),
            ],
            &[],
        );
        // The deploy is beside the point here: make it fail fast.
        node.set("python", "\"/bin/false\"");
        node.troops(&["pull"]);
        for r in ["a", "b", "c"] {
            let report = node.remote_report(r);
            assert_eq!(report["fetch"], "tip", "node m{i}: {report}");
        }
    }
}

#[test]
fn packs_do_not_pile_up() {
    // gix never repacks; after pulls that bring commits, git gc --auto does, at git's own
    // thresholds (made small here).
    let f = fleet();
    git(&f.node.state_repo(), &["config", "gc.autoPackLimit", "4"]);
    let packs = || {
        std::fs::read_dir(f.node.state_repo().join("objects/pack"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "pack")
            })
            .count()
    };
    for i in 0..8 {
        f.up.write("n.txt", &i.to_string());
        f.up.commit(&format!("c{i}"));
        f.up.push(&f.remotes[0]);
        f.node.troops(&["pull"]).ok();
    }
    assert!(packs() <= 5, "{} packs after 8 pulls", packs());
    f.node.fsck();
    assert_eq!(f.node.deployed().as_deref(), Some(f.up.head().as_str()));
}
