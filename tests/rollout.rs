//! Staged rollout across a fleet of real nodes, each under its own root with its own
//! /etc/machine-id.

use std::process::Command;

use crate::util::*;

/// Commit with a message (and trailer), dated `date` if given (git's date formats).
pub(crate) fn commit_at(up: &Upstream, message: &str, date: Option<&str>) -> String {
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(&up.dir).args([
        "-c",
        "user.name=Ops",
        "-c",
        "user.email=ops@example.com",
        "commit",
        "-q",
        "--allow-empty",
        "-a",
        "-m",
        message,
    ]);
    if let Some(d) = date {
        cmd.env("GIT_COMMITTER_DATE", d);
    }
    assert!(cmd.status().unwrap().success());
    up.head()
}

pub(crate) fn head_time(up: &Upstream) -> i64 {
    git(&up.dir, &["log", "-1", "--format=%ct"])
        .parse()
        .unwrap()
}

#[test]
fn a_ten_percent_commit_reaches_only_its_share_and_a_hundred_percent_commit_finishes_it() {
    let world = World::new();
    let remote = world.bare("origin");
    let up = world.upstream("src");
    up.write("deploy.py", &simple_deploy("base"));
    up.commit("base");
    up.push(&remote);

    let nodes: Vec<(Node, u8)> = (0..20)
        .map(|i| {
            let node = world.node(&format!("n{i:02}"));
            let machine_id = format!(
                "{:032x}",
                (i as u128 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
            );
            std::fs::create_dir_all(node.path("etc")).unwrap();
            std::fs::write(node.path("etc/machine-id"), format!("{machine_id}\n")).unwrap();
            node.init(&[("origin", &remote)], &[]);
            let bucket = troops::rollout::bucket(&machine_id);
            (node, bucket)
        })
        .collect();
    std::thread::scope(|s| {
        for (node, _) in &nodes {
            s.spawn(|| node.troops(&["pull"]).ok());
        }
    });
    let base = up.head();
    let admitted: Vec<bool> = nodes.iter().map(|(_, b)| *b < 10).collect();
    assert!(
        admitted.iter().any(|a| *a) && !admitted.iter().all(|a| *a),
        "the ids give no mix of buckets: {:?}",
        nodes.iter().map(|(_, b)| b).collect::<Vec<_>>()
    );

    up.write("deploy.py", &simple_deploy("canary"));
    let canary = commit_at(&up, "Try the new thing\n\nTroops-Rollout: 10%", None);
    up.push(&remote);
    for (node, b) in &nodes {
        node.troops(&["pull"]).ok();
        let want = if *b < 10 { &canary } else { &base };
        assert_eq!(node.deployed().as_ref(), Some(want), "bucket {b}");
        let status = node.status();
        assert_eq!(status["last_pull"]["bucket"], *b);
        if *b >= 10 {
            let human = node.troops(&["status"]).ok().stdout;
            assert!(
                human.contains("held") && human.contains("rolled out to 10% so far"),
                "{human}"
            );
        }
    }

    // A later commit without a trailer inherits the hold: it does not leak the canary.
    up.write("other.txt", "unrelated");
    let later = commit_at(&up, "Unrelated fix", None);
    up.push(&remote);
    for (node, b) in &nodes {
        node.troops(&["pull"]).ok();
        let want = if *b < 10 { &later } else { &base };
        assert_eq!(node.deployed().as_ref(), Some(want), "bucket {b}");
        assert_eq!(
            node.read("out/tag").as_deref(),
            Some(if *b < 10 { "canary" } else { "base" })
        );
    }

    // An empty 100% commit finishes the rollout everywhere.
    let done = commit_at(&up, "Finish the rollout\n\nTroops-Rollout: 100%", None);
    up.push(&remote);
    for (node, _) in &nodes {
        node.troops(&["pull"]).ok();
        assert_eq!(node.deployed().as_ref(), Some(&done));
        assert_eq!(node.read("out/tag").as_deref(), Some("canary"));
        assert!(node.status()["last_pull"].get("held").is_none());
    }
}

#[test]
fn a_schedule_advances_as_the_clock_passes() {
    let t = one_remote(&[]);
    t.node.set("bucket", "50");
    t.up.write("deploy.py", &simple_deploy("base"));
    t.ship("base");
    t.node.troops(&["pull"]).ok();
    t.up.write("deploy.py", &simple_deploy("ramped"));
    let ramped = commit_at(
        &t.up,
        "Ramp\n\nTroops-Rollout: 10%, 50% after 1h, 100% after 6h",
        None,
    );
    t.up.push(&t.remote);
    let since = head_time(&t.up);

    let at = |secs: i64| {
        t.node
            .troops(&["--now", &(since + secs).to_string(), "pull"])
            .ok()
    };
    // The node sees it the moment it is made: the ramp runs from the commit's date.
    at(0);
    assert_ne!(t.node.deployed().as_ref(), Some(&ramped));
    let human = t.node.troops(&["status"]).ok().stdout;
    let eligible = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs((since + 6 * 3600) as u64),
    )
    .to_string();
    assert!(
        human.contains(&format!("eligible from {eligible}")),
        "bucket 50 waits for the 100% step: {human}"
    );
    at(3 * 3600);
    assert_ne!(
        t.node.deployed().as_ref(),
        Some(&ramped),
        "50% admits buckets 0-49 only"
    );
    at(6 * 3600);
    assert_eq!(t.node.deployed().as_ref(), Some(&ramped));
}

#[test]
fn holding_reverting_and_a_pinned_canary() {
    let world = World::new();
    let remote = world.bare("origin");
    let up = world.upstream("src");
    up.write("deploy.py", &simple_deploy("base"));
    let base = up.commit("base");
    up.push(&remote);
    let canary = world.node("canary");
    let other = world.node("other");
    for (n, bucket) in [(&canary, "0"), (&other, "99")] {
        n.init(&[("origin", &remote)], &[]);
        n.set("bucket", bucket);
        n.troops(&["pull"]).ok();
    }

    // 0% holds everyone, the canary too.
    up.write("deploy.py", &simple_deploy("held"));
    commit_at(&up, "Not yet\n\nTroops-Rollout: 0%", None);
    up.push(&remote);
    for n in [&canary, &other] {
        n.troops(&["pull"]).ok();
        assert_eq!(n.deployed().as_ref(), Some(&base));
    }

    // Release it to 1%: the pinned canary (bucket 0) takes it, the rest do not.
    let one = commit_at(&up, "Canary\n\nTroops-Rollout: 1%", None);
    up.push(&remote);
    canary.troops(&["pull"]).ok();
    other.troops(&["pull"]).ok();
    assert_eq!(canary.deployed().as_ref(), Some(&one));
    assert_eq!(other.deployed().as_ref(), Some(&base));

    // It went wrong: a revert carrying 100% takes everyone back to the old behaviour.
    git(&up.dir, &["revert", "--no-edit", "HEAD~1"]);
    let revert = commit_at(&up, "Revert the canary\n\nTroops-Rollout: 100%", None);
    up.push(&remote);
    for n in [&canary, &other] {
        n.troops(&["pull"]).ok();
        assert_eq!(n.deployed().as_ref(), Some(&revert));
        assert_eq!(n.read("out/tag").as_deref(), Some("base"));
    }
}

#[test]
fn a_malformed_trailer_holds_every_node_and_says_why() {
    let t = one_remote(&[]);
    t.node.set("bucket", "0");
    t.up.write("deploy.py", &simple_deploy("base"));
    let base = t.ship("base");
    t.node.troops(&["pull"]).ok();
    t.up.write("deploy.py", &simple_deploy("typo"));
    commit_at(&t.up, "Typo\n\nTroops-Rollout: 10 percent", None);
    t.up.push(&t.remote);
    let out = t.node.troops(&["pull"]).ok();
    assert!(out.stdout.contains("malformed trailer"), "{}", out.stdout);
    assert_eq!(t.node.deployed().as_ref(), Some(&base));
    let human = t.node.troops(&["status"]).ok().stdout;
    assert!(
        human.contains("malformed trailer") && human.contains("expected a percentage"),
        "{human}"
    );
}
