//! Rollout and signatures together (issue: "a node never takes a commit the rollout did not
//! admit for its bucket"): nodes pinned to buckets 5, 30 and 95, real SSH signing keys.

use std::path::Path;

use crate::signatures::{SshSigner, commit_ssh, gpg_key, ssh_signer};
use crate::util::*;

struct Fleet {
    world: World,
    remote: std::path::PathBuf,
    up: Upstream,
    ops: SshSigner,
    nodes: Vec<(Node, u8)>,
}

/// Three nodes verifying as `verify` says, one base commit (signed) deployed on each.
fn fleet(verify: &str) -> Fleet {
    let world = World::new();
    let remote = world.bare("origin");
    let up = world.upstream("src");
    let ops = ssh_signer(&world, "ops");
    up.write("deploy.py", &simple_deploy("base"));
    commit_ssh(&up, "base", Some(&ops.key));
    up.push(&remote);
    let seed = world.path("seed.json");
    std::fs::write(
        &seed,
        format!(
            r#"{{"troops": {{"remotes": {{"origin": "file://{}"}}, "verify": "{verify}", "allowed_signers": [{:?}]}}}}"#,
            remote.display(),
            ops.line
        ),
    )
    .unwrap();
    let nodes: Vec<(Node, u8)> = [5u8, 30, 95]
        .into_iter()
        .map(|b| {
            let node = world.node(&format!("b{b}"));
            node.troops(&[
                "init",
                "--no-pull",
                "--group",
                &node.group,
                "--seed",
                seed.to_str().unwrap(),
            ])
            .ok();
            node.set("bucket", &b.to_string());
            node.troops(&["pull"]).ok();
            (node, b)
        })
        .collect();
    Fleet {
        world,
        remote,
        up,
        ops,
        nodes,
    }
}

impl Fleet {
    fn signed(&self, message: &str) -> String {
        commit_ssh(&self.up, message, Some(&self.ops.key))
    }
    fn unsigned(&self, message: &str) -> String {
        commit_ssh(&self.up, message, None)
    }
    fn tag(&self, tag: &str) {
        self.up.write("deploy.py", &simple_deploy(tag));
    }
    fn push(&self) {
        self.up.push(&self.remote);
    }
    /// Pull on every node; each one's deployed tag and exit code.
    fn pull(&self) -> Vec<(u8, String, i32)> {
        self.nodes
            .iter()
            .map(|(n, b)| {
                let out = n.troops(&["pull"]);
                (*b, n.read("out/tag").unwrap_or_default(), out.code)
            })
            .collect()
    }
}

fn merge(up: &Upstream, side: &str, message: &str, signer: Option<&Path>) -> String {
    let mut args = vec![
        "-c".to_owned(),
        "user.name=Ops".into(),
        "-c".into(),
        "user.email=ops@example.com".into(),
    ];
    if let Some(k) = signer {
        args.extend([
            "-c".into(),
            "gpg.format=ssh".into(),
            "-c".into(),
            format!("user.signingkey={}", k.display()),
        ]);
    }
    args.extend(["merge".into(), "-q".into(), "--no-ff".into(), "-m".into()]);
    args.push(message.into());
    if signer.is_some() {
        args.push("-S".into());
    }
    args.push(side.into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    git(&up.dir, &args);
    up.head()
}

#[test]
fn under_all_a_canary_never_reaches_late_buckets_past_an_unsigned_commit() {
    let f = fleet("all");
    f.tag("canary");
    f.signed("canary\n\nTroops-Rollout: 10%");
    f.unsigned("unsigned in the middle");
    f.tag("reverted");
    f.signed("revert the canary\n\nTroops-Rollout: 100%");
    f.push();
    for (b, tag, code) in f.pull() {
        let want = if b < 10 { "canary" } else { "base" };
        assert_eq!(tag, want, "bucket {b}");
        // Below the candidate because of a signature: exit 1, part-way or not.
        assert_eq!(code, 1, "bucket {b}");
    }
}

#[test]
fn under_all_a_hold_after_a_canary_keeps_late_buckets_at_base() {
    let f = fleet("all");
    f.tag("canary");
    f.signed("canary\n\nTroops-Rollout: 10%");
    f.signed("hold\n\nTroops-Rollout: 0%");
    f.push();
    for (b, tag, _) in f.pull() {
        let want = if b < 10 { "canary" } else { "base" };
        assert_eq!(tag, want, "bucket {b}");
    }
    // A finish nobody signed: rollout admits it for everyone, signatures refuse it, and
    // late buckets must not settle on the hold (which contains the canary) instead.
    f.tag("finished");
    f.unsigned("finish\n\nTroops-Rollout: 100%");
    f.push();
    for (b, tag, code) in f.pull() {
        let want = if b < 10 { "canary" } else { "base" };
        assert_eq!((tag.as_str(), code), (want, 1), "bucket {b}");
    }
}

#[test]
fn under_tip_a_signed_canary_under_an_unsigned_tip_stays_with_its_share() {
    let f = fleet("tip");
    f.tag("canary");
    f.signed("canary\n\nTroops-Rollout: 10%");
    f.tag("unsigned");
    f.unsigned("everyone\n\nTroops-Rollout: 100%");
    f.push();
    for (b, tag, code) in f.pull() {
        let want = if b < 10 { "canary" } else { "base" };
        assert_eq!(tag, want, "bucket {b}");
        assert_eq!(code, 1, "bucket {b}");
    }
}

#[test]
fn trailers_on_a_merged_side_branch_govern_the_merge() {
    for (pct, admitted) in [("10%", 10u8), ("0%", 0)] {
        let f = fleet("none");
        git(&f.up.dir, &["checkout", "-q", "-b", "side"]);
        f.tag("side");
        f.signed(&format!("side\n\nTroops-Rollout: {pct}"));
        git(&f.up.dir, &["checkout", "-q", "master"]);
        merge(&f.up, "side", "Merge branch 'side'", None);
        f.push();
        for (b, tag, code) in f.pull() {
            let want = if b < admitted { "side" } else { "base" };
            assert_eq!(tag, want, "{pct}, bucket {b}");
            assert_eq!(code, 0, "a rollout hold is not a failure");
        }
        // A merge carrying its own trailer supersedes what it merges.
        git(&f.up.dir, &["checkout", "-q", "-b", "side2"]);
        f.up.write("x.txt", "x");
        f.signed("side2\n\nTroops-Rollout: 0%");
        git(&f.up.dir, &["checkout", "-q", "master"]);
        merge(
            &f.up,
            "side2",
            "Merge side2 for everyone\n\nTroops-Rollout: 100%",
            None,
        );
        f.push();
        for (b, tag, _) in f.pull() {
            assert_eq!(tag, "side", "{pct}, bucket {b}");
        }
        drop(f.world);
    }
}

#[test]
fn a_backdated_ramp_runs_from_when_the_node_first_saw_it() {
    use crate::rollout::{commit_at, head_time};
    let t = one_remote(&[]);
    t.node.set("bucket", "95");
    t.up.write("deploy.py", &simple_deploy("base"));
    t.ship("base");
    t.node.troops(&["pull"]).ok();
    // Made on Friday, reviewed, pushed on Monday.
    let now = head_time(&t.up);
    let friday = now - 3 * 86_400;
    t.up.write("deploy.py", &simple_deploy("ramped"));
    commit_at(
        &t.up,
        "Ramp\n\nTroops-Rollout: 10%, 100% after 6h",
        Some(&format!("@{friday} +0000")),
    );
    t.up.push(&t.remote);
    let at = |secs: i64| {
        t.node
            .troops(&["--now", &(now + secs).to_string(), "pull"])
            .ok()
    };
    at(0);
    assert_eq!(
        t.node.read("out/tag").as_deref(),
        Some("base"),
        "not 100% at once"
    );
    let human = t.node.troops(&["status"]).ok().stdout;
    let eligible = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs((now + 6 * 3600) as u64),
    );
    assert!(
        human.contains(&format!("eligible from {eligible}")),
        "{human}"
    );
    at(6 * 3600 - 60);
    assert_eq!(t.node.read("out/tag").as_deref(), Some("base"));
    at(6 * 3600);
    assert_eq!(t.node.read("out/tag").as_deref(), Some("ramped"));
}

#[test]
fn a_commit_dated_in_the_future_is_held_and_status_never_panics() {
    use crate::rollout::commit_at;
    let t = one_remote(&[]);
    t.node.set("bucket", "5");
    t.up.write("deploy.py", &simple_deploy("base"));
    t.ship("base");
    t.node.troops(&["pull"]).ok();
    t.up.write("deploy.py", &simple_deploy("future"));
    commit_at(
        &t.up,
        "From the future\n\nTroops-Rollout: 100%",
        Some("2035-01-01T00:00:00Z"),
    );
    t.up.push(&t.remote);
    t.node.troops(&["pull"]).ok();
    assert_eq!(t.node.read("out/tag").as_deref(), Some("base"));
    let human = t.node.troops(&["status"]).ok().stdout;
    assert!(human.contains("in the future"), "{human}");

    // A ramp longer than a calendar can show, or than a clock can count: "never".
    for slow in ["1000000y", "10000000000000000000s"] {
        let t = one_remote(&[]);
        t.node.set("bucket", "95");
        t.up.write("deploy.py", &simple_deploy("base"));
        t.ship("base");
        t.node.troops(&["pull"]).ok();
        commit_at(
            &t.up,
            &format!("Slow\n\nTroops-Rollout: 10%, 100% after {slow}"),
            None,
        );
        t.up.push(&t.remote);
        t.node.troops(&["pull"]).ok();
        let human = t.node.troops(&["status"]).ok().stdout;
        assert!(human.contains("eligible never"), "{slow}: {human}");
    }
}

#[test]
fn refusals_say_which_key_problem_in_one_line() {
    use std::process::Command;
    // SSH: a key whose allowed_signers line ended before the commit's date.
    let t = one_remote(&[]);
    let ops = ssh_signer(&t.world, "ops");
    let mut parts = ops.line.splitn(2, ' ');
    let line = format!(
        "{} valid-before=\"20200101\" {}",
        parts.next().unwrap(),
        parts.next().unwrap()
    );
    crate::signatures::node_verifying(&t, "all", &[&line]);
    t.up.write("deploy.py", &simple_deploy("late"));
    commit_ssh(&t.up, "signed too late", Some(&ops.key));
    t.up.push(&t.remote);
    let out = t.node.troops(&["pull"]).failed();
    assert!(
        out.stderr
            .contains("SSH key not valid at the commit's date (valid-before 2020-01-01)"),
        "{}",
        out.stderr
    );

    // GnuPG: a signature made in 2020 by a key that expired a day later; a revoked key.
    for case in ["expired", "revoked"] {
        let t = one_remote(&[]);
        let (home, fpr, wrapper) = gpg_key(
            &t.world,
            case,
            if case == "expired" { "1d" } else { "never" },
            Some("20200101T000000"),
        );
        t.up.write("deploy.py", &simple_deploy(case));
        git(&t.up.dir, &["add", "-A"]);
        let signed = Command::new("git")
            .arg("-C")
            .arg(&t.up.dir)
            .args(["-c", "user.name=Ops", "-c", "user.email=ops@example.com"])
            .arg("-c")
            .arg(format!("gpg.program={}", wrapper.display()))
            .arg("-c")
            .arg(format!("user.signingkey={fpr}"))
            .args(["commit", "-q", "-S", "-m", case])
            .env("GNUPGHOME", &home)
            .env("GIT_COMMITTER_DATE", "2020-01-01T00:00:10Z")
            .output()
            .unwrap();
        assert!(
            signed.status.success(),
            "{}",
            String::from_utf8_lossy(&signed.stderr)
        );
        t.up.push(&t.remote);
        if case == "revoked" {
            let cert = home.join(format!("openpgp-revocs.d/{fpr}.rev"));
            let text = std::fs::read_to_string(&cert).unwrap().replace(
                ":-----BEGIN PGP PUBLIC KEY BLOCK-----",
                "-----BEGIN PGP PUBLIC KEY BLOCK-----",
            );
            std::fs::write(&cert, text).unwrap();
            let imported = Command::new(&wrapper)
                .env("GNUPGHOME", &home)
                .args(["--batch", "--import"])
                .arg(&cert)
                .output()
                .unwrap();
            assert!(
                imported.status.success(),
                "{}",
                String::from_utf8_lossy(&imported.stderr)
            );
        }
        let export = Command::new("gpg")
            .env("GNUPGHOME", &home)
            .args(["--batch", "--export", &fpr])
            .output()
            .unwrap();
        crate::signatures::node_verifying(&t, "all", &[]);
        std::fs::write(t.node.path("etc/troops/trustedkeys.gpg"), export.stdout).unwrap();
        let out = t.node.troops(&["pull"]).failed();
        let want = match case {
            "expired" => "signed by an expired key (".to_owned(),
            _ => "signed by a revoked key (".to_owned(),
        };
        assert!(out.stderr.contains(&want), "{case}: {}", out.stderr);
        assert!(!out.stderr.contains("[GNUPG:]"), "{}", out.stderr);
        if case == "expired" {
            assert!(out.stderr.contains("expired 2020-01-02"), "{}", out.stderr);
        }
    }
}
