//! Trust boundaries (README, "Security model"): what a member of the admin group, a remote
//! and a repository's content can and cannot make root do. Real users and groups, real git;
//! every hostile step is taken with the member's own uid through runuser.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::push::serve;
use crate::signatures::{commit_ssh, node_verifying, ssh_signer};
use crate::util::*;

/// A script that, if anything ever runs it, leaves a mark; writable marks dir for any uid.
fn trap(world: &World) -> (PathBuf, PathBuf) {
    let marks = world.path("marks");
    std::fs::create_dir_all(&marks).unwrap();
    std::fs::set_permissions(&marks, std::fs::Permissions::from_mode(0o777)).unwrap();
    let script = world.path("trap.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$(id -un) ran $0 $*\" >> {}/ran\ncat >/dev/null 2>&1 </dev/null\nexit 1\n",
            marks.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, marks.join("ran"))
}

#[test]
fn a_member_moving_the_shared_branch_gets_nothing_unsigned_deployed() {
    let t = one_remote(&[]);
    let exe = t.world.shared_binary();
    let ops = ssh_signer(&t.world, "ops");
    let stranger = ssh_signer(&t.world, "stranger");
    node_verifying(&t, "all", &[&ops.line]);
    t.up.write("deploy.py", &simple_deploy("signed"));
    let signed = commit_ssh(&t.up, "signed", Some(&ops.key));
    t.up.push(&t.remote);
    t.node.troops(&["pull"]).ok();
    assert_eq!(t.node.deployed().as_ref(), Some(&signed));

    // The member brings an unsigned commit into the shared repo and moves its branch by
    // hand: no push, so no pre-receive hook.
    t.up.write("deploy.py", &simple_deploy("unsigned"));
    let unsigned = commit_ssh(&t.up, "unsigned", None);
    let m = Member::new(Some(&t.node.group));
    let up = t.up.dir.to_str().unwrap();
    let fetched = m.git(
        &t.node.repo(),
        &[
            "fetch",
            "-q",
            "--upload-pack",
            "git -c safe.directory=* upload-pack",
            up,
            "+HEAD:refs/x/tmp",
        ],
    );
    assert_eq!(fetched.code, 0, "{}", fetched.stderr);
    let moved = m.git(
        &t.node.repo(),
        &["update-ref", "refs/heads/master", &unsigned],
    );
    assert_eq!(moved.code, 0, "{}", moved.stderr);
    assert_eq!(t.node.pushed().as_ref(), Some(&unsigned));

    // Root's pull refuses it, with the reason.
    let out = t.node.troops(&["pull"]).failed();
    assert!(
        out.all().contains(&format!(
            "commit {} was refused: it is not signed",
            &unsigned[..12]
        )),
        "{}",
        out.all()
    );
    assert_eq!(t.node.head().as_ref(), Some(&signed));
    assert_eq!(t.node.deployed().as_ref(), Some(&signed));

    // Through the daemon: what a post-receive hook sends after a push, sent by the member
    // by hand, and `troops deploy`. Neither deploys the unsigned commit.
    let _daemon = serve(&t.node);
    let root = t.node.root.to_str().unwrap();
    let mut hook = m.command(&exe, &["--root", root, "hook", "post-receive"]);
    let hook = hook
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut hook.stdin.as_ref().unwrap(),
        format!("{signed} {unsigned} refs/heads/master\n").as_bytes(),
    )
    .unwrap();
    let hook: Run = hook.wait_with_output().unwrap().into();
    assert_ne!(hook.code, 0, "{}", hook.all());
    assert!(hook.all().contains("not signed"), "{}", hook.all());
    let deploy = m.run(&exe, &["--root", root, "deploy"]);
    assert_eq!(deploy.code, 0, "{}", deploy.all());
    assert_eq!(t.node.deployed().as_ref(), Some(&signed));
    assert_eq!(t.node.read("out/tag").as_deref(), Some("signed"));

    // Keys change (root's own edit): `troops deploy` re-checks the head and refuses it.
    std::fs::write(
        t.node.path("etc/troops/allowed_signers"),
        format!("{}\n", stranger.line),
    )
    .unwrap();
    let deploy = m.run(&exe, &["--root", root, "deploy"]);
    assert_ne!(deploy.code, 0, "{}", deploy.all());
    assert!(
        deploy
            .all()
            .contains(&format!("not deploying {}", &signed[..12]))
            && deploy.all().contains("not trusted here"),
        "{}",
        deploy.all()
    );
    assert_eq!(t.node.runs().len(), 2, "the refused deploy made no run");
}

#[test]
fn root_never_runs_a_hook_or_program_a_member_wrote_into_the_shared_repo() {
    let t = one_remote(&[]);
    t.world.shared_binary();
    let (trap, ran) = trap(&t.world);
    let trap = trap.to_str().unwrap();
    let m = Member::new(Some(&t.node.group));
    let repo = t.node.repo();

    // Hooks in the repo and in a hooks directory of the member's own.
    let own_hooks = t.world.path("member-hooks");
    std::fs::create_dir_all(&own_hooks).unwrap();
    for hook in [
        "pre-auto-gc",
        "reference-transaction",
        "post-checkout",
        "post-merge",
        "post-rewrite",
        "push-to-checkout",
        "fsmonitor-watchman",
    ] {
        for dir in [repo.join("hooks"), own_hooks.clone()] {
            let w = m.run(Path::new("cp"), &[trap, dir.join(hook).to_str().unwrap()]);
            if dir == own_hooks {
                std::fs::copy(trap, dir.join(hook)).unwrap();
            } else {
                assert_eq!(w.code, 0, "the member could not write {hook}: {}", w.stderr);
            }
        }
    }
    // Every config key that names a program, set the way a member would.
    let extra = t.world.path("extra.config");
    std::fs::write(&extra, format!("[core]\n\tsshCommand = {trap}\n")).unwrap();
    for (key, value) in [
        ("core.hooksPath", own_hooks.to_str().unwrap()),
        ("gc.auto", "1"),
        ("gc.autoPackLimit", "1"),
        ("core.sshCommand", trap),
        ("core.fsmonitor", trap),
        ("core.gitProxy", trap),
        ("core.askPass", trap),
        ("core.alternateRefsCommand", trap),
        ("credential.helper", &format!("!{trap}")),
        ("remote.origin.uploadpack", trap),
        ("remote.origin.receivepack", trap),
        ("uploadpack.packObjectsHook", trap),
        ("gpg.program", trap),
        ("gpg.ssh.program", trap),
        ("include.path", extra.to_str().unwrap()),
    ] {
        let set = m.git(&repo, &["config", key, value]);
        assert_eq!(set.code, 0, "{key}: {}", set.stderr);
    }
    // Remotes a member may add: over ssh (a program would be asked to connect) and git's
    // ext:: transport (which is a program).
    for (name, url) in [
        ("viassh", "ssh://git@127.0.0.1:1/x.git".to_owned()),
        ("viaext", format!("ext::{trap} %S")),
    ] {
        let add = m.git(&repo, &["remote", "add", name, &url]);
        assert_eq!(add.code, 0, "{}", add.stderr);
    }

    // Commits arrive (so gc --auto runs), pulls and a deploy happen as root.
    for i in 0..3 {
        t.up.write("deploy.py", &simple_deploy(&format!("v{i}")));
        t.ship(&format!("v{i}"));
        let out = t.node.troops(&["pull"]);
        assert!(
            out.stderr.contains("remote viaext") && out.stderr.contains("ext::"),
            "the ext:: remote is refused and said so: {}",
            out.stderr
        );
    }
    t.node.troops(&["deploy"]).ok();
    assert_eq!(t.node.read("out/tag").as_deref(), Some("v2"));
    assert!(
        !ran.exists(),
        "root ran a member's program: {}",
        std::fs::read_to_string(&ran).unwrap_or_default()
    );
    t.node.fsck();
}

/// A tree git's own tools would flag (two entries named `a`) that points outside the node.
fn hostile_tree(up: &Upstream, outside: &Path) -> String {
    let dir = &up.dir;
    let hash = |args: &[&str], input: &[u8]| -> String {
        let mut c = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(c.stdin.as_mut().unwrap(), input).unwrap();
        drop(c.stdin.take());
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let deploy = hash(
        &["hash-object", "-w", "--stdin"],
        simple_deploy("hostile").as_bytes(),
    );
    let pwned = hash(
        &["hash-object", "-w", "--stdin"],
        b"written through a link\n",
    );
    let link = hash(
        &["hash-object", "-w", "--stdin"],
        outside.to_str().unwrap().as_bytes(),
    );
    let sub = hash(
        &["mktree"],
        format!("100644 blob {pwned}\tpwned\n").as_bytes(),
    );
    let tree = hash(
        &["mktree"],
        format!("120000 blob {link}\ta\n040000 tree {sub}\ta\n100644 blob {deploy}\tdeploy.py\n")
            .as_bytes(),
    );
    let head = up.head();
    let commit = git(
        dir,
        &[
            "commit-tree",
            &tree,
            "-p",
            &head,
            "-m",
            "two entries named a",
        ],
    );
    git(dir, &["update-ref", "refs/heads/master", &commit]);
    commit
}

#[test]
fn a_tree_with_duplicate_entries_is_refused_and_nothing_outside_is_written() {
    let t = one_remote(&[]);
    let outside = t.world.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    // First an ordinary tree with a directory `a`, so the next deploy updates in place.
    t.up.write("deploy.py", &simple_deploy("one"));
    t.up.write("a/keep", "x");
    let one = t.ship("one");
    t.node.troops(&["pull"]).ok();
    assert_eq!(t.node.deployed().as_ref(), Some(&one));

    let hostile = hostile_tree(&t.up, &outside);
    t.up.push(&t.remote);
    let out = t.node.troops(&["pull"]).failed();
    assert!(
        out.all().contains("refusing to check out")
            && out.all().contains("\"a\" is both a file and a directory"),
        "{}",
        out.all()
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "something was written outside the node"
    );
    assert_eq!(t.node.deployed().as_ref(), Some(&one));
    assert_ne!(t.node.deployed().as_ref(), Some(&hostile));
    // The checkout of `one` is still there and still whole.
    assert_eq!(
        std::fs::read_to_string(t.node.path(&format!("var/lib/troops/work/{one}/a/keep"))).unwrap(),
        "x"
    );
}

#[test]
fn a_deploy_that_leaves_symlinks_for_its_work_dirs_never_costs_the_targets() {
    let t = one_remote(&[]);
    let victim = t.world.path("victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("precious"), "keep me").unwrap();
    let victim = victim.to_str().unwrap();
    // One deploy replaces its own checkout with a link to the victim...
    t.up.write(
        "deploy.py",
        &format!(
            "import os, shutil\nhere = os.getcwd()\nos.chdir('/')\nshutil.rmtree(here)\nos.symlink({victim:?}, here)\n"
        ),
    );
    t.up.write("precious", "tracked, so a reuse would rewrite it");
    t.ship("one");
    t.node.troops(&["pull"]).ok();
    // ...the next replaces the whole work directory with one.
    t.up.write(
        "deploy.py",
        &format!(
            "import os, shutil\nwork = os.path.dirname(os.getcwd())\nos.chdir('/')\nshutil.rmtree(work)\nos.symlink({victim:?}, work)\n"
        ),
    );
    t.ship("two");
    t.node.troops(&["pull"]).ok();
    t.up.write("deploy.py", &simple_deploy("three"));
    let three = t.ship("three");
    t.node.troops(&["pull"]).ok();
    assert_eq!(t.node.deployed().as_ref(), Some(&three));
    assert_eq!(
        std::fs::read_to_string(Path::new(victim).join("precious")).unwrap(),
        "keep me"
    );
    assert_eq!(std::fs::read_dir(victim).unwrap().count(), 1, "{victim}");
    let work = t.node.path("var/lib/troops/work");
    assert!(std::fs::symlink_metadata(&work).unwrap().is_dir());
    assert_eq!(std::fs::metadata(&work).unwrap().mode() & 0o7777, 0o2750);
}

#[test]
fn empty_or_truncated_settings_stop_everything() {
    let t = one_remote(&[]);
    let ops = ssh_signer(&t.world, "ops");
    node_verifying(&t, "all", &[&ops.line]);
    t.up.write("deploy.py", &simple_deploy("unsigned"));
    let unsigned = t.ship("unsigned");
    let held = t.node.troops(&["pull"]).failed();
    assert!(held.all().contains("not signed"), "{}", held.all());

    let settings = t.node.path("etc/troops/troops.toml");
    let full = std::fs::read_to_string(&settings).unwrap();
    for (what, text) in [
        ("empty", String::new()),
        ("blank", "\n\n".to_owned()),
        ("truncated", full[..full.len() / 2].to_owned()),
    ] {
        std::fs::write(&settings, &text).unwrap();
        for verb in ["pull", "deploy"] {
            let out = t.node.troops(&[verb]).failed();
            assert!(
                out.stderr.contains(settings.to_str().unwrap()),
                "{what} settings, {verb}: {}",
                out.all()
            );
            assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
        }
        assert_eq!(t.node.deployed(), None, "{what}: {unsigned} ran");
    }
    // Keys the settings name, emptied: the same.
    std::fs::write(&settings, &full).unwrap();
    std::fs::write(t.node.path("etc/troops/allowed_signers"), "").unwrap();
    let out = t.node.troops(&["pull"]).failed();
    assert!(out.stderr.contains("allowed_signers"), "{}", out.stderr);
    assert_eq!(t.node.deployed(), None);
}

/// Every file, directory and link under `root`: mode, owner, contents or target.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, u32, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let body = if meta.file_type().is_symlink() {
            std::fs::read_link(&p)
                .unwrap()
                .into_os_string()
                .into_encoded_bytes()
        } else if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            Vec::new()
        } else {
            std::fs::read(&p).unwrap()
        };
        out.insert(
            p.strip_prefix(root).unwrap().to_owned(),
            (meta.mode(), meta.uid(), meta.gid(), body),
        );
    }
    out
}

#[test]
fn a_failed_init_leaves_every_file_as_it_was() {
    let world = World::new();
    let remote = world.bare("origin");
    let node = world.node("n1");
    // On a fresh root: nothing at all is left behind.
    let bad = node
        .troops(&[
            "init",
            "--no-pull",
            "--group",
            &node.group,
            "--remote",
            &format!("origin=file://{}", remote.display()),
            "--remote",
            "broken=https://[::1/x.git",
        ])
        .failed();
    assert!(bad.stderr.contains("broken"), "{}", bad.stderr);
    let left: Vec<_> = walk(&node.root);
    assert!(
        left.iter()
            .all(|p| std::fs::symlink_metadata(p).unwrap().is_dir()),
        "files left by a failed init: {left:?}"
    );

    node.init(&[("origin", &remote)], &[]);
    let before = snapshot(&node.root);
    let seed = world.path("seed.json");
    for (what, extra) in [
        (
            "a URL the fetch cannot parse",
            r#""broken": "ssh://host:99999999/x""#,
        ),
        ("a URL with a bad host", r#""broken": "https://[::1/x.git""#),
    ] {
        std::fs::write(
            &seed,
            format!(
                r#"{{"troops": {{"remotes": {{"origin": "file://{}", {extra}}}, "verify": "all",
                "allowed_signers": ["ops@example.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"],
                "known_hosts": ["git.example.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"]}}}}"#,
                remote.display()
            ),
        )
        .unwrap();
        let out = node
            .troops(&[
                "init",
                "--no-pull",
                "--group",
                &node.group,
                "--seed",
                seed.to_str().unwrap(),
            ])
            .failed();
        assert!(out.stderr.contains("broken"), "{what}: {}", out.stderr);
        let after = snapshot(&node.root);
        let changed: Vec<_> = before
            .keys()
            .chain(after.keys())
            .filter(|k| before.get(*k) != after.get(*k))
            .collect();
        assert!(changed.is_empty(), "{what}: changed {changed:?}");
    }
    // An interpreter that is not there: refused before anything is written, too. (An admin
    // who does not exist yet is no longer a failure: it is pending.)
    std::fs::write(
        &seed,
        format!(
            r#"{{"troops": {{"remotes": {{"origin": "file://{}"}}, "verify": "all", "allowed_signers": ["ops@example.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"]}}}}"#,
            remote.display(),
        ),
    )
    .unwrap();
    node.troops(&[
        "init",
        "--no-pull",
        "--group",
        &node.group,
        "--seed",
        seed.to_str().unwrap(),
        "--python",
        "/nonexistent/python3",
    ])
    .failed();
    assert_eq!(snapshot(&node.root), before);
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
        out.push(p);
    }
    out
}

/// Every file `user` can read under `root` (paths relative to it), each with whether it
/// holds any of `needles`.
fn readable_by(user: &Member, root: &Path, needles: &[&str]) -> BTreeMap<String, bool> {
    let mut grep = String::from("grep -q -a -F");
    for n in needles {
        grep.push_str(&format!(" -e '{n}'"));
    }
    let script = format!(
        "find \"$1\" -type f -readable -print0 2>/dev/null | while IFS= read -r -d '' f; do if {grep} \"$f\" 2>/dev/null; then echo \"hit $f\"; else echo \"clean $f\"; fi; done"
    );
    let out = user.run(
        Path::new("bash"),
        &["-c", &script, "scan", root.to_str().unwrap()],
    );
    out.stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(verdict, path)| {
            (
                path.strip_prefix(root.to_str().unwrap())
                    .unwrap()
                    .to_owned(),
                verdict == "hit",
            )
        })
        .collect()
}

#[test]
fn a_token_in_a_remote_url_is_never_shown_and_only_root_reads_it() {
    let t = one_remote(&[]);
    t.world.shared_binary();
    const TOKEN: &str = "s3cr3tT0kenXYZ";
    let url = format!("https://deploy:{TOKEN}@127.0.0.1:9/fleet.git");
    let init = t
        .node
        .troops(&[
            "init",
            "--no-pull",
            "--group",
            &t.node.group,
            "--remote",
            &format!("origin=file://{}", t.remote.display()),
            "--remote",
            &format!("hosted={url}"),
        ])
        .ok();
    assert!(!init.all().contains(TOKEN), "{}", init.all());
    assert!(
        init.all().contains("deploy:***@127.0.0.1:9"),
        "{}",
        init.all()
    );

    // Only root's credentials store holds it, readable by root alone.
    let store = t.node.path("etc/troops/credentials");
    assert!(std::fs::read_to_string(&store).unwrap().contains(TOKEN));
    assert_eq!(std::fs::metadata(&store).unwrap().mode() & 0o777, 0o600);
    let config = std::fs::read_to_string(t.node.repo().join("config")).unwrap();
    assert!(!config.contains(TOKEN), "{config}");
    assert!(
        config.contains("url = https://127.0.0.1:9/fleet.git"),
        "{config}"
    );

    // A deploy (so there are run logs and a checkout) and a failing remote (WARN lines).
    t.up.write("deploy.py", "print('deploy output nobody else reads')\n");
    t.ship("one");
    let pull = t.node.troops(&["pull"]);
    assert!(pull.stderr.contains("remote hosted"), "{}", pull.stderr);
    for out in [
        pull,
        t.node.troops(&["status"]).ok(),
        t.node.troops(&["status", "--json"]).ok(),
        t.node.troops(&["log", "1"]).ok(),
    ] {
        assert!(!out.all().contains(TOKEN), "{}", out.all());
    }
    assert!(t.node.runs().len() == 1);

    // Scan every file under the root as an outsider and as a member.
    let outsider = Member::new(None);
    let seen = readable_by(&outsider, &t.node.root, &[TOKEN, "deploy output"]);
    for (path, hit) in &seen {
        assert!(
            !hit,
            "an outsider reads the token or the deploy's output in {path}"
        );
        assert!(
            path.starts_with("/etc/"),
            "an outsider reads {path} (only the node's public settings are world-readable)"
        );
    }
    assert!(seen.contains_key("/etc/troops/troops.toml"), "{seen:?}");
    let member = Member::new(Some(&t.node.group));
    let seen = readable_by(&member, &t.node.root, &[TOKEN]);
    for (path, hit) in &seen {
        assert!(!hit, "a member reads the token in {path}");
    }
    // Members do read the run logs and the last pull: they are who deploys.
    assert!(
        seen.keys().any(|p| p.starts_with("/var/lib/troops/runs/")),
        "{seen:?}"
    );
    assert!(seen.contains_key("/var/lib/troops/pull.json"), "{seen:?}");
}

#[test]
fn the_socket_group_follows_admin_group() {
    let t = one_remote(&[]);
    let dropin = t
        .node
        .path("etc/systemd/system/troops.socket.d/troops-group.conf");
    let text = std::fs::read_to_string(&dropin).unwrap();
    assert!(
        text.lines()
            .any(|l| l == format!("SocketGroup={}", t.node.group)),
        "{text}"
    );
    // systemd reads it beside the packaged unit without a complaint.
    let units = t.world.path("units");
    std::fs::create_dir_all(&units).unwrap();
    let packaged = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/units/troops");
    for unit in ["troops.socket", "troops.service"] {
        std::fs::copy(packaged.join(unit), units.join(unit)).unwrap();
    }
    let d = units.join("troops.socket.d");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(&dropin, d.join("troops-group.conf")).unwrap();
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(units.join("troops.socket"))
        .env("SYSTEMD_UNIT_PATH", format!("{}:", units.display()))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && said.trim().is_empty(), "{said}");

    // Another group at re-init: the drop-in follows.
    let other = format!("{}o", t.node.group);
    t.node
        .troops(&[
            "init",
            "--no-pull",
            "--group",
            &other,
            "--remote",
            &format!("origin=file://{}", t.remote.display()),
        ])
        .ok();
    let _ = Command::new("groupdel").arg(&other).output();
    let text = std::fs::read_to_string(&dropin).unwrap();
    assert!(text.contains(&format!("SocketGroup={other}\n")), "{text}");
}

#[test]
fn deploy_output_cannot_drive_the_terminal_or_pass_for_troops() {
    let t = one_remote(&[]);
    t.up.write(
        "deploy.py",
        "import sys\nprint('\\x1b[2J\\x1b]0;owned\\x07red \\x1b[31malert\\x1b[0m')\nprint('troops: run 7: deployed 0123456789ab in 0.1s')\nsys.stdout.write('\\r\\x1b[1Abell\\x07\\n')\n",
    );
    t.ship("one");
    let pull = t.node.troops(&["pull"]).ok();
    let log = t.node.run_log(1);
    for shown in [&pull.stdout, &log] {
        assert!(
            !shown.contains('\x1b') && !shown.contains('\x07'),
            "{shown:?}"
        );
        assert!(shown.contains("\\x1b[2J\\x1b]0;owned\\x07red"), "{shown}");
        assert!(
            shown.contains("deploy.py: troops: run 7: deployed 0123456789ab"),
            "{shown}"
        );
        assert!(
            !shown.lines().any(|l| l.starts_with("troops: run 7")),
            "{shown}"
        );
    }
    // A run log written raw (by an older troops) is escaped when shown, too.
    let raw = t.node.path("var/lib/troops/runs/1.log");
    std::fs::write(&raw, "old \x1b[31mred\x1b[0m\n").unwrap();
    let shown = t.node.run_log(1);
    assert_eq!(shown, "old \\x1b[31mred\\x1b[0m\n");
}

/// A merge of unrelated old history with the node's commit as its *second* parent: a
/// fast-forward, whose first-parent line leads back to commits the node never had.
fn merge_onto_old_history(t: &One, local: &str, message: &str) -> String {
    let dir = &t.up.dir;
    git(dir, &["checkout", "-q", "--orphan", "old"]);
    git(dir, &["rm", "-rq", "--cached", "."]);
    std::fs::write(dir.join("deploy.py"), simple_deploy("old history")).unwrap();
    git(dir, &["add", "deploy.py"]);
    git(dir, &["commit", "-q", "-m", "old history"]);
    let old = t.up.head();
    let tree = git(dir, &["rev-parse", &format!("{local}^{{tree}}")]);
    let merge = git(
        dir,
        &["commit-tree", &tree, "-p", &old, "-p", local, "-m", message],
    );
    git(dir, &["checkout", "-q", "-f", "master"]);
    git(dir, &["reset", "-q", "--hard", &merge]);
    t.up.push(&t.remote);
    merge
}

#[test]
fn a_merge_never_walks_the_node_back_to_older_history() {
    // With verify = all: the merge is unsigned, and so is the old history it leads to.
    let t = one_remote(&[]);
    let ops = ssh_signer(&t.world, "ops");
    node_verifying(&t, "all", &[&ops.line]);
    t.up.write("deploy.py", &simple_deploy("signed"));
    let signed = commit_ssh(&t.up, "signed", Some(&ops.key));
    t.up.push(&t.remote);
    t.node.troops(&["pull"]).ok();
    let merge = merge_onto_old_history(&t, &signed, "merge");
    let out = t.node.troops(&["pull"]).failed();
    assert!(out.all().contains("not signed"), "{}", out.all());
    assert_eq!(t.node.head().as_ref(), Some(&signed));
    assert_eq!(t.node.deployed().as_ref(), Some(&signed));
    assert_eq!(t.node.read("out/tag").as_deref(), Some("signed"));

    // With verify = none and a rollout that holds the merge: the node waits where it is.
    let t = one_remote(&[]);
    t.up.write("deploy.py", &simple_deploy("new"));
    let new = t.ship("new");
    t.node.troops(&["pull"]).ok();
    merge_onto_old_history(&t, &new, "merge\n\nTroops-Rollout: 0%");
    t.node.troops(&["pull"]).ok();
    assert_eq!(t.node.head().as_ref(), Some(&new));
    assert_eq!(t.node.read("out/tag").as_deref(), Some("new"));
    assert_ne!(merge, new);
}

#[test]
fn a_member_cannot_make_root_copy_a_repository_only_root_reads() {
    let t = one_remote(&[]);
    t.world.shared_binary();
    t.up.write("deploy.py", &simple_deploy("one"));
    t.ship("one");
    // A repository only root can read, with a secret in it.
    let secret = t.world.path("root-only");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    let private = secret.join("private.git");
    git(
        &secret,
        &["init", "-q", "--bare", private.to_str().unwrap()],
    );
    let leak = t.world.upstream("leak");
    leak.write("secret.txt", "SECRET-V1");
    leak.commit("secret");
    leak.push(&private);

    let m = Member::new(Some(&t.node.group));
    // Route one: a remote naming it.
    let add = m.git(
        &t.node.repo(),
        &["remote", "add", "leak", private.to_str().unwrap()],
    );
    assert_eq!(add.code, 0, "{}", add.stderr);
    // Route two: the shared repo's own branch and objects made links into it.
    let shared = t.node.repo();
    for (link, target) in [
        ("refs/heads/master", private.join("refs/heads/master")),
        ("objects/pack", private.join("objects/pack")),
    ] {
        let _ = std::fs::remove_dir_all(shared.join(link));
        let made = m.run(
            Path::new("ln"),
            &[
                "-sfn",
                target.to_str().unwrap(),
                shared.join(link).to_str().unwrap(),
            ],
        );
        assert_eq!(made.code, 0, "{}", made.stderr);
    }
    let pull = t.node.troops(&["pull"]);
    let leaked = leak.head();
    assert_eq!(
        t.node.read("out/tag").as_deref(),
        Some("one"),
        "{}",
        pull.all()
    );
    // Nothing of it reached root's repository, which members read.
    let has = Command::new("git")
        .arg("--git-dir")
        .arg(t.node.state_repo())
        .args(["cat-file", "-e", &leaked])
        .status()
        .unwrap();
    assert!(!has.success(), "root copied {leaked} where members read it");
    assert_eq!(t.node.remote_report("leak")["fetch"], "failed");
}

#[test]
fn init_writes_nothing_through_what_members_planted_in_the_shared_repo() {
    let t = one_remote(&[]);
    t.world.shared_binary();
    let m = Member::new(Some(&t.node.group));
    let shared = t.node.repo();
    let outside = t.world.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o777)).unwrap();
    let reinit = || {
        t.node.troops(&[
            "init",
            "--no-pull",
            "--group",
            &t.node.group,
            "--remote",
            &format!("origin=file://{}", t.remote.display()),
            "--remote",
            "more=https://git.example.com/x.git",
        ])
    };

    // The hooks directory made a link to a directory outside.
    let hooks = shared.join("hooks");
    let moved = m.run(
        Path::new("mv"),
        &[
            hooks.to_str().unwrap(),
            shared.join("old-hooks").to_str().unwrap(),
        ],
    );
    assert_eq!(moved.code, 0, "{}", moved.stderr);
    let linked = m.run(
        Path::new("ln"),
        &["-s", outside.to_str().unwrap(), hooks.to_str().unwrap()],
    );
    assert_eq!(linked.code, 0, "{}", linked.stderr);
    let before = snapshot(&t.node.root);
    reinit().failed();
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    assert_eq!(
        snapshot(&t.node.root),
        before,
        "a failed init changed the node"
    );
    std::fs::remove_file(&hooks).unwrap();
    std::fs::rename(shared.join("old-hooks"), &hooks).unwrap();

    // The config made a link to a root-only file in git's config format.
    let private = t.world.path("private.config");
    std::fs::write(
        &private,
        "[http]\n\textraHeader = Authorization: Bearer ROOTSECRET\n",
    )
    .unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = shared.join("config");
    let saved = std::fs::read(&config).unwrap();
    std::fs::remove_file(&config).unwrap();
    std::os::unix::fs::symlink(&private, &config).unwrap();
    let out = reinit().failed();
    assert!(out.stderr.contains("symlink"), "{}", out.stderr);
    assert_eq!(std::fs::read_link(&config).unwrap(), private);
    std::fs::remove_file(&config).unwrap();
    std::fs::write(&config, &saved).unwrap();

    // A member holding the config's lock: init waits, gives up, and changes nothing.
    let lock = shared.join("config.lock");
    std::fs::write(&lock, "").unwrap();
    let before = snapshot(&t.node.root);
    let out = reinit().failed();
    assert!(out.stderr.contains("config"), "{}", out.stderr);
    assert_eq!(
        snapshot(&t.node.root),
        before,
        "a failed init changed the node"
    );
    std::fs::remove_file(&lock).unwrap();
    reinit().ok();
    assert!(
        !std::fs::read_to_string(&config)
            .unwrap()
            .contains("ROOTSECRET")
    );
}
