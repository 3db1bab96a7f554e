//! First boot: seeds in every format and from every source, the node's key, IMDSv2, and
//! what a second init does.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use crate::imds_fake::{FakeImds, Mode};
use crate::util::*;

fn init(node: &Node, args: &[&str]) -> Run {
    let mut all = vec!["init", "--no-pull", "--group", &node.group];
    all.extend_from_slice(args);
    node.troops(&all)
}

fn cloud_config(remote: &str) -> String {
    format!(
        "#cloud-config\npackages: [git]\nruncmd:\n  - [troops, init]\ntroops:\n  remotes: {{origin: \"file://{remote}\"}}\n  branch: master\n  roles: [web, cache]\n  verify: none\n"
    )
}

fn json(remote: &str) -> String {
    format!(
        r#"{{"packages": ["git"], "troops": {{"remotes": {{"origin": "file://{remote}"}}, "roles": ["web", "cache"]}}}}"#
    )
}

fn mime(body: &str) -> String {
    format!(
        "Content-Type: multipart/mixed; boundary=\"==B==\"\nMIME-Version: 1.0\n\n--==B==\nContent-Type: text/x-shellscript; charset=\"us-ascii\"\nContent-Disposition: attachment; filename=\"setup.sh\"\n\n#!/bin/sh\necho hello\n\n--==B==\nContent-Type: text/cloud-config; charset=\"us-ascii\"\nContent-Disposition: attachment; filename=\"troops.yaml\"\n\n{body}\n--==B==--\n"
    )
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b).unwrap();
    child.wait_with_output().unwrap().stdout
}

/// The node took the seed: its remote, its roles, a key, a shared repo.
fn assert_seeded(node: &Node, remote: &str) {
    assert_eq!(
        git(&node.repo(), &["remote", "get-url", "origin"]),
        format!("file://{remote}")
    );
    let settings = node.read("etc/troops/troops.toml").unwrap();
    assert!(
        settings.contains("roles = [\"web\", \"cache\"]"),
        "{settings}"
    );
    assert!(node.path("var/lib/troops/ssh/id_rsa").exists());
}

/// The same troops section in every user-data format.
fn formats(remote: &str) -> Vec<(&'static str, Vec<u8>)> {
    let yaml = cloud_config(remote);
    vec![
        ("cloud-config", yaml.clone().into_bytes()),
        ("json", json(remote).into_bytes()),
        ("mime", mime(&yaml).into_bytes()),
        ("gzip-cloud-config", gzip(yaml.as_bytes())),
        ("gzip-json", gzip(json(remote).as_bytes())),
        ("gzip-mime", gzip(mime(&yaml).as_bytes())),
    ]
}

#[test]
fn every_user_data_format_through_init_seed() {
    let world = World::new();
    let remote = world.bare("origin");
    let r = remote.display().to_string();
    for (name, bytes) in formats(&r) {
        let node = world.node(name);
        let seed = world.path(&format!("{name}.seed"));
        std::fs::write(&seed, bytes).unwrap();
        let out = init(&node, &["--seed", seed.to_str().unwrap()]).ok();
        assert!(
            out.stdout
                .contains(&format!("seed from {}", seed.display())),
            "{name}: {}",
            out.stdout
        );
        assert_seeded(&node, &r);
    }
}

#[test]
fn every_user_data_format_through_a_nocloud_seed_dir() {
    let world = World::new();
    let remote = world.bare("origin");
    let r = remote.display().to_string();
    for (name, bytes) in formats(&r) {
        let node = world.node(name);
        let dir = node.path("var/lib/cloud/seed/nocloud");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("meta-data"), "instance-id: iid-test\n").unwrap();
        std::fs::write(dir.join("user-data"), bytes).unwrap();
        let out = init(&node, &[]).ok();
        assert!(
            out.stdout.contains("nocloud/user-data"),
            "{name}: {}",
            out.stdout
        );
        assert_seeded(&node, &r);
    }
}

#[test]
fn the_cloud_init_copy_and_debconf_answers_are_found() {
    let world = World::new();
    let remote = world.bare("origin");
    let r = remote.display().to_string();

    let node = world.node("cloud-init-copy");
    let copy = node.path("var/lib/cloud/instance/user-data.txt");
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    std::fs::write(&copy, gzip(json(&r).as_bytes())).unwrap();
    let out = init(&node, &[]).ok();
    assert!(out.stdout.contains("user-data.txt"), "{}", out.stdout);
    assert_seeded(&node, &r);

    let node = world.node("debconf");
    let db = node.path("var/cache/debconf/config.dat");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    std::fs::write(
        &db,
        format!("Name: troops/remotes\nTemplate: troops/remotes\nValue: origin=file://{r}\nOwners: troops\n\nName: troops/roles\nTemplate: troops/roles\nValue: web cache\nOwners: troops\n"),
    )
    .unwrap();
    let out = init(&node, &[]).ok();
    assert!(out.stdout.contains("debconf answers"), "{}", out.stdout);
    assert_seeded(&node, &r);
}

#[test]
fn a_preseed_file_and_flags_over_it() {
    let world = World::new();
    let remote = world.bare("origin");
    let r = remote.display().to_string();
    let node = world.node("preseed");
    let preseed = world.path("preseed.cfg");
    std::fs::write(
        &preseed,
        format!("d-i pkgsel/include string troops\ntroops troops/remotes string origin=file://{r}\ntroops troops/roles string web, cache\ntroops troops/branch string release\n"),
    )
    .unwrap();
    init(
        &node,
        &["--preseed", preseed.to_str().unwrap(), "--branch", "master"],
    )
    .ok();
    assert_seeded(&node, &r);
    let settings = node.read("etc/troops/troops.toml").unwrap();
    assert!(
        settings.contains("branch = \"master\""),
        "the flag did not win: {settings}"
    );
}

#[test]
fn no_seed_anywhere_lists_the_places_looked() {
    let world = World::new();
    let node = world.node("bare");
    let out = init(&node, &[]).failed();
    let err = out.stderr.lines().last().unwrap();
    for place in [
        "no seed found",
        "config.dat",
        "user-data.txt",
        "nocloud",
        "EC2 IMDS (not asked",
    ] {
        assert!(err.contains(place), "{place} missing from: {err}");
    }
    assert!(!node.root.join("etc").exists());
    // First boot on a machine nobody seeded (troops-init.service) is no failure, and still
    // writes nothing.
    let out = init(&node, &["--if-seeded"]).ok();
    assert!(
        out.stdout.contains("no seed found, nothing to do"),
        "{}",
        out.stdout
    );
    assert!(!node.root.join("etc").exists() && !node.root.join("var").exists());
    // User data that is there but has no troops section says so.
    let copy = node.path("var/lib/cloud/instance/user-data.txt");
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    std::fs::write(&copy, "#!/bin/sh\necho not for troops\n").unwrap();
    let err = init(&node, &[]).failed().stderr;
    assert!(
        err.contains("user-data.txt (user data without a troops section)"),
        "{err}"
    );
}

#[test]
fn malformed_seeds_say_where() {
    let world = World::new();
    let node = world.node("m");
    let cases: &[(&[u8], &str)] = &[
        (
            b"#cloud-config\ntroops:\n  remotes: {origin: x\n",
            "invalid YAML: line",
        ),
        (
            b"#cloud-config\ntroops:\n  rolez: [web]\n",
            "unknown field `rolez`",
        ),
        (b"{\"troops\": {\"remotes\": }", "invalid JSON"),
        (
            b"#cloud-config\ntroops:\n  remotes: {o: \"ftp://h/x\"}\n",
            "troops.remotes",
        ),
        (b"\x1f\x8b\x08\x00garbage", "bad gzip"),
    ];
    for (bytes, expect) in cases {
        let seed = world.path("bad.seed");
        std::fs::write(&seed, bytes).unwrap();
        let out = init(&node, &["--seed", seed.to_str().unwrap()]).failed();
        let err = out.stderr.lines().last().unwrap();
        assert!(
            err.contains("bad.seed") && err.contains(expect),
            "{expect}: {err}"
        );
        assert!(
            !node.root.exists(),
            "a bad seed wrote {}",
            node.root.display()
        );
    }
}

#[test]
fn the_key_is_made_once_with_the_right_modes_and_matches_its_public_half() {
    let world = World::new();
    let remote = world.bare("origin");
    let node = world.node("k");
    init(
        &node,
        &["--remote", &format!("origin=file://{}", remote.display())],
    )
    .ok();
    let dir = node.path("var/lib/troops/ssh");
    let key = dir.join("id_rsa");
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let derived = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(&key)
        .output()
        .unwrap();
    let derived = String::from_utf8_lossy(&derived.stdout);
    let public = node.troops(&["key"]).ok().stdout;
    assert_eq!(
        derived.split_whitespace().take(2).collect::<Vec<_>>(),
        public.split_whitespace().take(2).collect::<Vec<_>>()
    );
    let bits = Command::new("ssh-keygen")
        .arg("-l")
        .arg("-f")
        .arg(&key)
        .output()
        .unwrap();
    let bits: u32 = String::from_utf8_lossy(&bits.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(bits >= 3072, "{bits}-bit key");
    assert!(
        std::fs::read_to_string(&key)
            .unwrap()
            .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----")
    );

    // A later init, even with another seed, keeps it.
    let before = std::fs::read(&key).unwrap();
    init(
        &node,
        &["--remote", "origin=file:///elsewhere.git", "--role", "db"],
    )
    .ok();
    assert_eq!(std::fs::read(&key).unwrap(), before);

    // The repository is shared with the admin group.
    let gid = Command::new("getent")
        .args(["group", &node.group])
        .output()
        .unwrap();
    let gid: u32 = String::from_utf8_lossy(&gid.stdout)
        .split(':')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    let repo = std::fs::metadata(node.repo()).unwrap();
    assert_eq!(repo.gid(), gid);
    assert_eq!(
        repo.permissions().mode() & 0o2070,
        0o2070,
        "repo dir not setgid + group rwx"
    );
    assert_eq!(
        git(&node.repo(), &["config", "core.sharedRepository"]),
        "group"
    );
    // Root's ssh command lives in root's own repo; a member-writable config never names a
    // program root runs.
    assert!(git(&node.state_repo(), &["config", "core.sshCommand"]).contains("ssh -F"));
    let member_config = std::fs::read_to_string(node.repo().join("config")).unwrap();
    assert!(!member_config.contains("sshCommand"), "{member_config}");
}

#[test]
fn init_again_changes_nothing_and_a_changed_seed_is_reported() {
    let world = World::new();
    let remote = world.bare("origin");
    let r = remote.display().to_string();
    let node = world.node("again");
    let seed = world.path("seed.yaml");
    std::fs::write(&seed, cloud_config(&r)).unwrap();
    init(&node, &["--seed", seed.to_str().unwrap()]).ok();
    let out = init(&node, &["--seed", seed.to_str().unwrap()]).ok();
    assert!(out.stdout.contains("nothing changed"), "{}", out.stdout);

    let other = world.bare("other");
    std::fs::write(
        &seed,
        cloud_config(&other.display().to_string()).replace("[web, cache]", "[db]"),
    )
    .unwrap();
    let dry = init(&node, &["--seed", seed.to_str().unwrap(), "--dry-run"]).ok();
    assert!(
        dry.stdout.contains("remote origin:") && dry.stdout.contains("setting roles"),
        "{}",
        dry.stdout
    );
    assert_eq!(
        git(&node.repo(), &["remote", "get-url", "origin"]),
        format!("file://{r}"),
        "--dry-run changed the node"
    );
    let out = init(&node, &["--seed", seed.to_str().unwrap()]).ok();
    assert!(
        out.stdout.contains(&format!(
            "remote origin: file://{r} -> file://{}",
            other.display()
        )),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("setting roles: [\"web\",\"cache\"] -> [\"db\"]"),
        "{}",
        out.stdout
    );
}

#[test]
fn an_init_that_fails_leaves_the_node_and_the_host_as_they_were() {
    let world = World::new();
    let remote = world.bare("origin");
    let node = world.node("f");
    let out = init(
        &node,
        &[
            "--remote",
            &format!("origin=file://{}", remote.display()),
            "--python",
            "/nonexistent/python3",
        ],
    )
    .failed();
    assert!(
        out.stderr
            .contains("--python /nonexistent/python3: no such file"),
        "{}",
        out.stderr
    );
    assert!(!node.root.exists());
    let group = Command::new("getent")
        .args(["group", &node.group])
        .output()
        .unwrap();
    assert!(
        !group.status.success(),
        "the failed init left group {} behind",
        node.group
    );
}

#[test]
fn admins_named_in_the_seed_join_the_group() {
    let world = World::new();
    let remote = world.bare("origin");
    let user = format!("tru{}", std::process::id());
    let made = Command::new("useradd")
        .args(["--no-create-home", &user])
        .status()
        .unwrap();
    assert!(made.success());
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("userdel").args(["-f", &self.0]).status();
        }
    }
    let _cleanup = Cleanup(user.clone());
    let node = world.node("a");
    let seed = world.path("seed.json");
    std::fs::write(
        &seed,
        format!(
            r#"{{"troops": {{"remotes": {{"origin": "file://{}"}}, "admins": ["{user}"]}}}}"#,
            remote.display()
        ),
    )
    .unwrap();
    let out = init(&node, &["--seed", seed.to_str().unwrap()]).ok();
    assert!(
        out.stdout
            .contains(&format!("admin {user}: add to group {}", node.group)),
        "{}",
        out.stdout
    );
    let members = Command::new("getent")
        .args(["group", &node.group])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&members.stdout).contains(&user));
    let again = init(&node, &["--seed", seed.to_str().unwrap()]).ok();
    assert!(again.stdout.contains("nothing changed"), "{}", again.stdout);
}

fn imds_node(world: &World, mode: Mode, user_data: &[u8], deadline: u64) -> (Node, FakeImds, Run) {
    let fake = FakeImds::start(mode, user_data);
    let node = world.node(&format!("imds-{mode:?}").replace(['(', ')'], ""));
    // The setting that names an endpoint, written before init the way an image would.
    std::fs::create_dir_all(node.path("etc/troops")).unwrap();
    std::fs::write(
        node.path("etc/troops/troops.toml"),
        format!(
            "imds = \"{}\"\nimds_deadline = {deadline}\nadmin_group = \"{}\"\n",
            fake.url, node.group
        ),
    )
    .unwrap();
    let out = init(&node, &[]);
    (node, fake, out)
}

#[test]
fn imds_v2_user_data_with_tokens_stale_tokens_and_retries() {
    let world = World::new();
    let remote = world.bare("origin");
    let r = remote.display().to_string();
    let ud = cloud_config(&r);

    let (node, fake, out) = imds_node(&world, Mode::Normal, ud.as_bytes(), 20);
    let out = out.ok();
    assert!(out.stdout.contains("EC2 user data"), "{}", out.stdout);
    assert_seeded(&node, &r);
    assert_eq!(
        fake.log(),
        vec!["PUT /latest/api/token", "GET /latest/user-data"]
    );

    let (node, fake, out) = imds_node(&world, Mode::StaleTokenOnce, ud.as_bytes(), 20);
    out.ok();
    assert_seeded(&node, &r);
    assert_eq!(
        fake.log().iter().filter(|l| l.starts_with("PUT")).count(),
        2,
        "{:?}",
        fake.log()
    );

    let (node, fake, out) = imds_node(
        &world,
        Mode::Unavailable(2),
        gzip(ud.as_bytes()).as_slice(),
        20,
    );
    out.ok();
    assert_seeded(&node, &r);
    assert!(fake.log().len() >= 4, "{:?}", fake.log());
}

#[test]
fn imds_disabled_empty_or_unreachable() {
    let world = World::new();
    let (_, fake, out) = imds_node(&world, Mode::Disabled, b"", 20);
    let err = out.failed().stderr;
    assert!(
        err.contains("no seed found") && err.contains("EC2 user data"),
        "{err}"
    );
    assert_eq!(
        fake.log().len(),
        1,
        "kept asking a disabled IMDS: {:?}",
        fake.log()
    );

    let (_, _, out) = imds_node(&world, Mode::NoUserData, b"", 20);
    assert!(out.failed().stderr.contains("no seed found"));

    let started = std::time::Instant::now();
    let (_, _, out) = imds_node(&world, Mode::Slow, b"", 3);
    let err = out.failed().stderr;
    assert!(err.contains("unreachable within 3s"), "{err}");
    assert!(
        started.elapsed().as_secs() < 20,
        "the deadline was not kept"
    );
}

#[test]
fn parsers_never_panic_on_arbitrary_bytes() {
    // A bounded run of the fuzz target's idea in the normal suite: random and mutated seeds
    // through init --seed and --preseed must end in a clean error or success, never a panic.
    let world = World::new();
    let node = world.node("fuzz");
    let seeds: [&[u8]; 4] = [
        b"#cloud-config\ntroops:\n  remotes: {origin: \"git@h:x\"}\n  roles: [web]\n",
        b"{\"troops\": {\"remotes\": {\"o\": \"git@h:x\"}}}",
        b"Content-Type: multipart/mixed; boundary=\"b\"\n\n--b\nContent-Type: text/cloud-config\n\n#cloud-config\ntroops: {}\n--b--\n",
        b"troops troops/remotes string o=git@h:x\ntroops troops/roles string web\n",
    ];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..120 {
        let mut bytes = seeds[i % seeds.len()].to_vec();
        for _ in 0..(next() % 8 + 1) {
            let at = (next() as usize) % bytes.len().max(1);
            match next() % 3 {
                0 => bytes[at] = next() as u8,
                1 => bytes.insert(at, next() as u8),
                _ => {
                    bytes.remove(at);
                }
            }
        }
        let path = world.path("fuzz.seed");
        std::fs::write(&path, &bytes).unwrap();
        for flag in ["--seed", "--preseed"] {
            let out = init(&node, &[flag, path.to_str().unwrap(), "--dry-run"]);
            assert!(
                out.code == 0 || out.code == 1,
                "{flag} {bytes:?}: exit {}\n{}",
                out.code,
                out.stderr
            );
            assert!(
                !out.stderr.contains("panicked"),
                "{flag} {bytes:?}:\n{}",
                out.stderr
            );
        }
    }
}

#[test]
fn init_pulls_and_deploys_unless_told_not_to() {
    let world = World::new();
    let remote = world.bare("origin");
    let up = world.upstream("src");
    up.write("deploy.py", &simple_deploy("first-boot"));
    let head = up.commit("one");
    up.push(&remote);
    let node = world.node("n");
    let seed = world.path("seed.yaml");
    std::fs::write(&seed, cloud_config(&remote.display().to_string())).unwrap();
    let out = node
        .troops(&[
            "init",
            "--group",
            &node.group,
            "--seed",
            seed.to_str().unwrap(),
        ])
        .ok();
    assert!(
        out.stdout.contains("deploying first-boot"),
        "{}",
        out.stdout
    );
    assert_eq!(node.deployed().as_deref(), Some(head.as_str()));
}

#[test]
fn the_pull_interval_comes_from_the_settings() {
    let world = World::new();
    let remote = world.bare("origin");
    let node = world.node("timer");
    node.init(&[("origin", &remote)], &[]);
    let dropin = node.path("etc/systemd/system/troops-pull.timer.d/troops-interval.conf");
    assert!(
        node.read("etc/systemd/system/troops-pull.timer.d/troops-interval.conf")
            .unwrap()
            .contains("OnUnitActiveSec=300s")
    );
    node.set("interval", "60");
    let out = node.init(&[], &[]);
    assert!(out.stdout.contains("pull timer: write"), "{}", out.stdout);
    let text = std::fs::read_to_string(&dropin).unwrap();
    // The reset clears every monotonic trigger: the first run must be restated after it, or
    // the timer never fires (seen on a booted node).
    assert!(
        text.contains("OnUnitActiveSec=\nOnActiveSec=1min\nOnUnitActiveSec=60s\n")
            && text.contains("RandomizedDelaySec=60s"),
        "{text}"
    );
    // systemd accepts it over the packaged timer.
    let units = world.path("units");
    std::fs::create_dir_all(units.join("troops-pull.timer.d")).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/units/troops-pull/troops-pull.timer"),
        units.join("troops-pull.timer"),
    )
    .unwrap();
    std::fs::write(
        units.join("troops-pull.service"),
        "[Service]\nType=oneshot\nExecStart=/bin/true\n",
    )
    .unwrap();
    std::fs::copy(
        &dropin,
        units.join("troops-pull.timer.d/troops-interval.conf"),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "./troops-pull.timer"])
        .current_dir(&units)
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[test]
fn imds_that_refuses_every_token_is_asked_a_bounded_number_of_times() {
    let world = World::new();
    let (_, fake, out) = imds_node(&world, Mode::Unauthorized, b"", 20);
    let err = out.failed().stderr;
    assert!(err.contains("401") && err.contains("token"), "{err}");
    let log = fake.log();
    assert!(
        log.iter().filter(|l| l.starts_with("PUT")).count() <= 3 && log.len() <= 8,
        "kept re-tokening: {} requests: {log:?}",
        log.len()
    );

    let (_, fake, out) = imds_node(&world, Mode::EmptyToken, b"", 20);
    let err = out.failed().stderr;
    assert!(err.contains("empty token"), "{err}");
    assert!(fake.log().len() <= 3, "{:?}", fake.log());
}

#[test]
fn imds_failures_name_their_cause_and_report_while_waiting() {
    let world = World::new();
    // Nothing listens: the error says so, and a status line came while init waited.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let node = world.node("imds-nothing");
    std::fs::create_dir_all(node.path("etc/troops")).unwrap();
    std::fs::write(
        node.path("etc/troops/troops.toml"),
        format!(
            "imds = \"http://127.0.0.1:{port}\"\nimds_deadline = 11\nadmin_group = \"{}\"\n",
            node.group
        ),
    )
    .unwrap();
    let out = init(&node, &[]).failed();
    assert!(
        out.stderr.to_lowercase().contains("connection refused"),
        "the cause is not named:\n{}",
        out.all()
    );
    assert!(
        out.all().contains("waiting for EC2 metadata at") && out.all().contains("attempt"),
        "no status line while waiting:\n{}",
        out.all()
    );
    // In the one style people read, not tracing's level column.
    assert!(
        out.stderr
            .lines()
            .any(|l| l.starts_with("troops: warning: waiting for EC2 metadata at")),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains(" WARN "), "{}", out.stderr);

    // The token PUT hangs while GETs answer: the hop limit, named.
    let (_, _, out) = imds_node(&world, Mode::SlowToken, b"", 20);
    let err = out.failed().stderr;
    assert!(err.contains("hop limit"), "{err}");

    // IMDS disabled: said, and no fallback to IMDSv1.
    let (_, _, out) = imds_node(&world, Mode::Disabled, b"", 20);
    let err = out.failed().stderr;
    assert!(
        err.contains("disabled or blocked") && err.contains("IMDSv1"),
        "{err}"
    );
}

/// The schema-clean form: the troops section as the file cloud-init's write_files writes.
fn write_files_seed(remote: &str) -> String {
    format!(
        "#cloud-config\npackages: [git]\nwrite_files:\n  - path: /etc/motd\n    content: hello\n  - path: /etc/troops/seed.yaml\n    permissions: \"0600\"\n    content: |\n      remotes: {{origin: \"file://{remote}\"}}\n      roles: [web, cache]\n"
    )
}

#[test]
fn the_schema_clean_seed_through_seed_file_nocloud_imds_and_the_node() {
    let world = World::new();
    let remote = world.bare("origin");
    let r = remote.display().to_string();
    let ud = write_files_seed(&r);

    let node = world.node("wf-seed");
    let seed = world.path("wf.yaml");
    std::fs::write(&seed, &ud).unwrap();
    init(&node, &["--seed", seed.to_str().unwrap()]).ok();
    assert_seeded(&node, &r);

    let node = world.node("wf-nocloud");
    std::fs::create_dir_all(node.path("var/lib/cloud/seed/nocloud")).unwrap();
    std::fs::write(node.path("var/lib/cloud/seed/nocloud/user-data"), &ud).unwrap();
    init(&node, &[]).ok();
    assert_seeded(&node, &r);

    let (node, _, out) = imds_node(&world, Mode::Normal, ud.as_bytes(), 20);
    out.ok();
    assert_seeded(&node, &r);

    // On a node, cloud-init has written the file itself: troops reads it before cloud-init's
    // copy of the user data (which, schema-clean, has no troops key).
    let node = world.node("wf-on-node");
    std::fs::create_dir_all(node.path("etc/troops")).unwrap();
    std::fs::write(
        node.path("etc/troops/seed.yaml"),
        format!("remotes: {{origin: \"file://{r}\"}}\nroles: [web, cache]\n"),
    )
    .unwrap();
    std::fs::create_dir_all(node.path("var/lib/cloud/instance")).unwrap();
    std::fs::write(node.path("var/lib/cloud/instance/user-data.txt"), &ud).unwrap();
    let out = init(&node, &[]).ok();
    assert!(
        out.stdout.contains("etc/troops/seed.yaml"),
        "{}",
        out.stdout
    );
    assert_seeded(&node, &r);
}

#[test]
fn user_data_cloud_init_reads_never_stops_the_search() {
    let world = World::new();
    let remote = world.bare("origin");
    let r = remote.display().to_string();
    // cloud-init's copy holds what PyYAML reads and troops used to refuse, without a troops
    // section; the NoCloud seed has one.
    for (name, other) in [
        (
            "dup",
            "#cloud-config\napt: {preserve_sources_list: true}\napt: {sources: {}}\n",
        ),
        ("nullkey", "#cloud-config\n~: x\nruncmd: [ls]\n"),
        (
            "binary",
            "#cloud-config\nwrite_files:\n - path: /x.gz\n   encoding: gzip\n   content: !!binary |\n     H4sIAAAAAAAA/ytJLS4BAKHIa9gEAAAA\n",
        ),
        ("broken", "#cloud-config\nruncmd: [\n"),
    ] {
        let node = world.node(&format!("search-{name}"));
        std::fs::create_dir_all(node.path("var/lib/cloud/instance")).unwrap();
        std::fs::write(node.path("var/lib/cloud/instance/user-data.txt"), other).unwrap();
        std::fs::create_dir_all(node.path("var/lib/cloud/seed/nocloud")).unwrap();
        std::fs::write(
            node.path("var/lib/cloud/seed/nocloud/user-data"),
            cloud_config(&r),
        )
        .unwrap();
        let out = init(&node, &[]);
        assert_eq!(out.code, 0, "{name}: {}", out.all());
        assert_seeded(&node, &r);
    }
    // With nothing anywhere, --if-seeded says why it found nothing, and succeeds.
    let node = world.node("search-unreadable");
    std::fs::create_dir_all(node.path("var/lib/cloud/instance")).unwrap();
    std::fs::write(
        node.path("var/lib/cloud/instance/user-data.txt"),
        "#cloud-config\nruncmd: [\n",
    )
    .unwrap();
    let out = init(&node, &["--if-seeded"]).ok();
    assert!(
        out.stdout
            .contains("no troops section: unreadable: invalid YAML: line 2"),
        "{}",
        out.stdout
    );
}

#[test]
fn user_data_is_sniffed_as_cloud_init_sniffs_it() {
    let world = World::new();
    let remote = world.bare("origin");
    let r = remote.display().to_string();
    let yaml = cloud_config(&r);
    for (name, ud) in [
        (
            "subject-first",
            format!("Subject: web node\n{}", mime(&yaml)),
        ),
        ("bom", format!("\u{feff}{yaml}")),
        (
            "upper-header",
            yaml.replace("#cloud-config", "#Cloud-Config"),
        ),
        ("untyped-header", mime(&yaml.replace("#cloud-config\n", ""))),
    ] {
        let node = world.node(&format!("sniff-{name}"));
        let seed = world.path(&format!("{name}.ud"));
        std::fs::write(&seed, &ud).unwrap();
        let out = init(&node, &["--seed", seed.to_str().unwrap()]);
        assert_eq!(out.code, 0, "{name}: {}", out.all());
        assert_seeded(&node, &r);
    }
    let node = world.node("sniff-jinja");
    let seed = world.path("jinja.ud");
    std::fs::write(&seed, format!("## template: jinja\n{yaml}")).unwrap();
    let err = init(&node, &["--seed", seed.to_str().unwrap()])
        .failed()
        .stderr;
    assert!(err.contains("not supported: a jinja template"), "{err}");
    assert!(!err.contains("without a troops section"), "{err}");
}

#[test]
fn an_admin_who_does_not_exist_yet_joins_at_the_first_pull_after_it_exists() {
    let world = World::new();
    let remote = world.bare("origin");
    let up = world.upstream("src");
    up.write("deploy.py", "print('hi')\n");
    up.commit("one");
    up.push(&remote);
    let user = format!("pend{}", std::process::id());
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("userdel").args(["-f", &self.0]).status();
        }
    }
    let _cleanup = Cleanup(user.clone());
    let node = world.node("later-admin");
    let seed = world.path("seed.yaml");
    std::fs::write(
        &seed,
        format!(
            "#cloud-config\ntroops:\n  remotes: {{origin: \"file://{}\"}}\n  admins: [{user}]\n",
            remote.display()
        ),
    )
    .unwrap();
    // The EC2 path: troops reads the user data before cloud-init has made the user.
    let out = init(&node, &["--seed", seed.to_str().unwrap()]).ok();
    assert!(
        out.stdout.contains(&format!("admin {user}: pending")),
        "{}",
        out.stdout
    );
    let status = node.troops(&["status"]).ok().stdout;
    assert!(
        status.contains(&format!("pending   admin {user}")),
        "{status}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&node.troops(&["status", "--json"]).ok().stdout).unwrap();
    assert_eq!(json["pending_admins"], serde_json::json!([user]));
    node.troops(&["pull"]).ok();
    assert!(
        node.troops(&["status"])
            .ok()
            .stdout
            .contains("pending   admin")
    );

    assert!(
        Command::new("useradd")
            .args(["--no-create-home", &user])
            .status()
            .unwrap()
            .success()
    );
    node.troops(&["pull"]).ok();
    let members = Command::new("getent")
        .args(["group", &node.group])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&members.stdout).contains(&user),
        "{} was not added",
        user
    );
    let status = node.troops(&["status"]).ok().stdout;
    assert!(!status.contains("pending   admin"), "{status}");
    assert!(!node.path("var/lib/troops/pending-admins").exists());
}

#[test]
fn the_seed_file_on_the_node_is_read_only_as_root_wrote_it() {
    let world = World::new();
    let remote = world.bare("origin");
    let r = remote.display().to_string();
    let seed_text = format!("remotes: {{origin: \"file://{r}\"}}\nroles: [web, cache]\n");
    let write = |node: &Node, text: &str, mode: u32| {
        std::fs::create_dir_all(node.path("etc/troops")).unwrap();
        let p = node.path("etc/troops/seed.yaml");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };

    // Writable by others: whoever wrote it could choose what root fetches and runs.
    let node = world.node("seed-0666");
    write(&node, &seed_text, 0o666);
    let err = init(&node, &[]).failed().stderr;
    assert!(err.contains("only root may write it"), "{err}");
    assert!(!node.path("var/lib/troops").exists());

    // A symlink to a file someone else controls.
    let node = world.node("seed-link");
    std::fs::create_dir_all(node.path("etc/troops")).unwrap();
    let elsewhere = world.path("elsewhere.yaml");
    std::fs::write(&elsewhere, &seed_text).unwrap();
    std::os::unix::fs::symlink(&elsewhere, node.path("etc/troops/seed.yaml")).unwrap();
    let err = init(&node, &[]).failed().stderr;
    assert!(err.contains("is a symlink"), "{err}");

    // Left from the image: it disagrees with this instance's user data, and says so.
    let node = world.node("seed-stale");
    write(&node, "remotes: {origin: \"file:///srv/old.git\"}\n", 0o600);
    std::fs::create_dir_all(node.path("var/lib/cloud/instance")).unwrap();
    std::fs::write(
        node.path("var/lib/cloud/instance/user-data.txt"),
        write_files_seed(&r),
    )
    .unwrap();
    let err = init(&node, &[]).failed().stderr;
    assert!(err.contains("differs from the troops seed"), "{err}");

    // Empty (a write_files entry without content): no seed there, the search goes on.
    let node = world.node("seed-empty");
    write(&node, "# nothing yet\n", 0o600);
    std::fs::create_dir_all(node.path("var/lib/cloud/seed/nocloud")).unwrap();
    std::fs::write(
        node.path("var/lib/cloud/seed/nocloud/user-data"),
        cloud_config(&r),
    )
    .unwrap();
    init(&node, &[]).ok();
    assert_seeded(&node, &r);
}

#[test]
fn a_node_whose_remotes_need_no_key_deploys_while_its_key_is_made() {
    let world = World::new();
    let remote = world.bare("origin");
    let up = world.upstream("src");
    up.write("deploy.py", "print('deployed at first boot')\n");
    let head = up.commit("one");
    up.push(&remote);
    let node = world.node("keyless");
    // What an init killed while ssh-keygen ran leaves: its process is gone (no pid is this
    // high), so the next init removes it.
    let stale = node.path("var/lib/troops/ssh/.new-key-4194305");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("id_rsa"), "half a key").unwrap();
    // init with its first pull: the key is made beside the fetch, and in place when init
    // returns.
    let out = node
        .troops(&[
            "init",
            "--group",
            &node.group,
            "--remote",
            &format!("origin=file://{}", remote.display()),
        ])
        .ok();
    assert!(
        out.stdout.contains("deployed at first boot"),
        "{}",
        out.all()
    );
    assert_eq!(node.deployed().as_deref(), Some(head.as_str()));
    for f in ["id_rsa", "id_rsa.pub"] {
        assert!(
            node.path(&format!("var/lib/troops/ssh/{f}")).exists(),
            "{f}"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(node.path("var/lib/troops/ssh"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".new-key"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    node.troops(&["key"]).ok();
}
