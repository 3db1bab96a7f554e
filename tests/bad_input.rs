//! Bad input: an error that names the thing, a non-zero exit, and the node as it was.

use crate::util::*;

/// The last line of stderr: the error a user reads.
fn error_line(run: &Run) -> String {
    run.stderr.lines().last().unwrap_or_default().to_owned()
}

fn tree(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    fn walk(base: &std::path::Path, dir: &std::path::Path, out: &mut Vec<(String, Vec<u8>)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push((
                    p.strip_prefix(base).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap_or_default(),
                ));
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn init_refuses_bad_remotes_names_and_branches_and_writes_nothing() {
    let world = World::new();
    let fresh = world.node("fresh");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--remote", "x=ext::sh -c touch% /tmp/pwned"],
            "remote \"x\": unsupported URL \"ext::sh -c touch% /tmp/pwned\": remote helper transports (like ext::) are not allowed",
        ),
        (
            &["--remote", "y=ftp://example.com/r.git"],
            "the scheme must be ssh, https, http, git or file",
        ),
        (
            &["--remote", "bad name=file:///srv/a.git"],
            "invalid remote name \"bad name\"",
        ),
        (&["--remote", "noequals"], "expected NAME=URL"),
        (
            &["--role", "web server"],
            "invalid role name \"web server\"",
        ),
        (&["--branch", "a..b"], "invalid branch name \"a..b\""),
        (
            &["--remote", "z=https://git.example.com/\u{202e}tig.evil"],
            "bidirectional-text control character",
        ),
        (
            &["--remote", "z=https://git.example.com/\u{fffd}.git"],
            "U+FFFD",
        ),
        (
            &[
                "--remote",
                "o=file:///srv/a.git",
                "--remote",
                "o=file:///srv/b.git",
            ],
            "--remote o=… is given twice",
        ),
        (
            &[
                "--remote",
                "o=file:///srv/a.git",
                "--python",
                "/nonexistent/python3",
            ],
            "--python /nonexistent/python3: no such file",
        ),
        (
            &["--remote", "o=file:///srv/a.git", "--python", "python3"],
            "--python python3: not an absolute path",
        ),
        (
            &[
                "--remote",
                "o=file:///srv/a.git",
                "--admin",
                "no-such-user-troops",
            ],
            "--admin no-such-user-troops: no such user",
        ),
    ];
    for (args, expect) in cases {
        let mut all = vec!["init", "--no-pull", "--group", &world.group];
        all.extend_from_slice(args);
        let out = fresh.troops(&all).failed();
        let line = error_line(&out);
        assert!(
            line.starts_with("troops: error:") && line.contains(expect),
            "{args:?}: {line}"
        );
        assert!(
            !fresh.root.exists(),
            "{args:?} wrote {}",
            fresh.root.display()
        );
    }

    // An existing node is left exactly as it was.
    let remote = world.bare("origin");
    let node = world.node("n");
    node.init(&[("origin", &remote)], &["web"]);
    let before = tree(&node.root);
    for (args, _) in cases {
        let mut all = vec!["init", "--no-pull", "--group", &world.group];
        all.extend_from_slice(args);
        node.troops(&all).failed();
    }
    assert_eq!(tree(&node.root), before, "a failed init changed the node");
}

#[test]
fn init_twice_changes_nothing_and_says_so() {
    let world = World::new();
    let remote = world.bare("origin");
    let node = world.node("n");
    node.init(&[("origin", &remote)], &["web"]);
    let before = tree(&node.root);
    let out = node.init(&[("origin", &remote)], &["web"]);
    assert!(out.stdout.contains("nothing changed"), "{}", out.stdout);
    assert_eq!(tree(&node.root), before);
    let other = world.bare("other");
    let out = node.init(&[("origin", &other)], &["db"]);
    assert!(
        out.stdout.contains("troops: remote origin: file://"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("setting roles: [\"web\"] -> [\"db\"]"),
        "{}",
        out.stdout
    );
    assert_eq!(
        git(&node.repo(), &["remote", "get-url", "origin"]),
        format!("file://{}", other.display())
    );
}

#[test]
fn a_broken_settings_file_is_named_with_its_line() {
    let world = World::new();
    let node = world.node("n");
    node.init(&[("origin", &world.bare("origin"))], &[]);
    node.set("rolez", "[\"web\"]");
    let out = node.troops(&["pull"]).failed();
    let line = error_line(&out);
    assert!(
        line.contains("etc/troops/troops.toml: line") && line.contains("rolez"),
        "{line}"
    );
}

#[test]
fn an_uninitialised_node_says_so() {
    let world = World::new();
    let node = world.node("nothing");
    for cmd in ["pull", "status", "deploy"] {
        let line = error_line(&node.troops(&[cmd]).failed());
        assert!(
            line.contains("not initialised") && line.contains("troops init"),
            "{cmd}: {line}"
        );
    }
    let line = error_line(&node.troops(&["log", "7"]).failed());
    assert!(line.contains("no run 7"), "{line}");
}

/// A node at a good commit, then a bad commit pushed: the pull fails with `expect` in one
/// line, nothing moves but the branch, and the run log has the detail `detail`.
fn bad_commit(files: &[(&str, &str)], expect: &str, detail: &str) {
    let one = one_remote(&[]);
    let (up, node) = (&one.up, &one.node);
    up.write("deploy.py", &simple_deploy("good"));
    let good = one.ship("good");
    node.troops(&["pull"]).ok();

    for (path, contents) in files {
        if contents.is_empty() {
            up.remove(path);
        } else {
            up.write(path, contents);
        }
    }
    let bad = one.ship("bad");
    let out = node.troops(&["pull"]).failed();
    let line = error_line(&out);
    assert!(
        line.starts_with("troops: error: run 2:") && line.contains(expect),
        "{line}\n{}",
        out.all()
    );
    assert!(
        line.contains(&bad[..12]),
        "the error names the commit: {line}"
    );
    assert_eq!(node.deployed().as_deref(), Some(good.as_str()));
    assert_eq!(node.read("out/tag").as_deref(), Some("good"));
    let run = &node.runs()[1];
    assert_eq!(run["result"], "failed");
    assert!(run["error"].as_str().unwrap().contains(expect));
    let log = node.run_log(2);
    assert!(log.contains(detail), "the run log lacks {detail:?}:\n{log}");
    node.fsck();
}

#[test]
fn a_commit_without_deploy_py() {
    bad_commit(
        &[("deploy.py", ""), ("README", "x")],
        "has no deploy.py",
        "has no deploy.py",
    );
}

#[test]
fn a_syntax_error_in_deploy_py() {
    bad_commit(
        &[("deploy.py", "def broken(:\n    pass\n")],
        "SyntaxError",
        "line 1",
    );
}

#[test]
fn requirements_that_fail_to_install() {
    bad_commit(
        &[(
            "requirements.txt",
            "--no-index\nno-such-package-troops-test==1.0\n",
        )],
        "requirements.txt failed to install with pip",
        "no-such-package-troops-test",
    );
}

#[test]
fn a_seed_url_that_is_not_utf8_is_named_not_mangled() {
    let world = World::new();
    let node = world.node("latin1");
    let seed = world.path("seed.yaml");
    // A Latin-1 editor's é in the URL: not UTF-8.
    let mut bytes =
        b"#cloud-config\ntroops:\n  remotes: {origin: \"https://git.example.com/caf".to_vec();
    bytes.extend_from_slice(b"\xe9.git\"}\n");
    std::fs::write(&seed, &bytes).unwrap();
    let out = node
        .troops(&[
            "init",
            "--no-pull",
            "--group",
            &world.group,
            "--seed",
            seed.to_str().unwrap(),
        ])
        .failed();
    assert!(out.stderr.contains("not UTF-8 (at byte"), "{}", out.stderr);
    assert!(!node.root.exists());
}

#[test]
fn a_new_nodes_repositories_name_its_branch_as_head() {
    let world = World::new();
    let remote = world.bare("origin");
    let node = world.node("head");
    node.init(&[("origin", &remote)], &["web"]);
    for repo in [
        "var/lib/troops/repo/main.git",
        "var/lib/troops/repo/node.git",
    ] {
        assert_eq!(
            git(&node.path(repo), &["symbolic-ref", "HEAD"]),
            "refs/heads/master",
            "{repo}"
        );
    }
}
