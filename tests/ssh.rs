//! Fetching over real ssh: a real sshd on a loopback port serves the remote, the node logs in
//! with its own key, and a pinned known_hosts refuses a host whose key it does not hold.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// An sshd on 127.0.0.1 for one test, letting each user in with the keys authorised for it.
pub struct Sshd {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sshd {
    pub fn start(world: &World) -> Sshd {
        Sshd::start_with(world, None)
    }

    /// With `system_gitconfig`, sessions read it as git's system config: a node under a test
    /// root keeps its /etc/gitconfig there, where init marks its repo safe for pushers.
    pub fn start_with(world: &World, system_gitconfig: Option<&Path>) -> Sshd {
        let sshd = Path::new("/usr/sbin/sshd");
        assert!(
            sshd.exists(),
            "openssh-server is needed: ./dev/test installs it"
        );
        let dir = world.path("sshd");
        std::fs::create_dir_all(&dir).unwrap();
        // The privilege-separation directory sshd insists on.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let hostkey = dir.join("hostkey");
        let made = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&hostkey)
            .status()
            .unwrap();
        assert!(made.success());
        std::fs::create_dir_all(dir.join("authorized_keys")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {pid}\nAuthorizedKeysFile {ak}/%u\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nLogLevel VERBOSE\n{setenv}",
            hk = hostkey.display(),
            pid = dir.join("sshd.pid").display(),
            ak = dir.join("authorized_keys").display(),
            setenv = system_gitconfig
                .map(|c| format!("SetEnv GIT_CONFIG_SYSTEM={}\n", c.display()))
                .unwrap_or_default(),
        );
        std::fs::write(dir.join("sshd_config"), config).unwrap();
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not come up: {}",
                std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Sshd { child, port, dir }
    }

    /// The line a known_hosts file pins this server with.
    pub fn known_hosts_line(&self) -> String {
        let pubkey = std::fs::read_to_string(self.dir.join("hostkey.pub")).unwrap();
        let mut fields = pubkey.split_whitespace();
        format!(
            "[127.0.0.1]:{} {} {}",
            self.port,
            fields.next().unwrap(),
            fields.next().unwrap()
        )
    }

    /// Let `public_key` log in as `user`.
    pub fn authorize(&self, user: &str, public_key: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.dir.join("authorized_keys").join(user))
            .unwrap();
        writeln!(f, "{}", public_key.trim()).unwrap();
    }

    /// `ssh://root@…` to a repository on this server.
    pub fn url(&self, repo: &Path) -> String {
        format!("ssh://root@127.0.0.1:{}{}", self.port, repo.display())
    }
}

fn seeded_node(world: &World, name: &str, url: &str, known_hosts: Option<&str>) -> Node {
    let node = world.node(name);
    let seed = world.path(&format!("{name}.json"));
    let pinned = known_hosts
        .map(|k| format!(r#", "known_hosts": ["{k}"]"#))
        .unwrap_or_default();
    std::fs::write(
        &seed,
        format!(r#"{{"troops": {{"remotes": {{"origin": "{url}"}}{pinned}}}}}"#),
    )
    .unwrap();
    node.troops(&[
        "init",
        "--no-pull",
        "--group",
        &node.group,
        "--seed",
        seed.to_str().unwrap(),
    ])
    .ok();
    node
}

#[test]
fn a_node_fetches_over_ssh_with_its_own_key_and_pinned_host_key() {
    let world = World::new();
    let sshd = Sshd::start(&world);
    let remote = world.bare("origin");
    let up = world.upstream("src");
    up.write("deploy.py", &simple_deploy("over-ssh"));
    let head = up.commit("one");
    up.push(&remote);
    let url = sshd.url(&remote);

    let node = seeded_node(&world, "pinned", &url, Some(&sshd.known_hosts_line()));
    // Not yet authorised on the server: the fetch fails, and says so.
    let out = node.troops(&["pull"]).failed();
    assert!(
        out.stderr.contains("no remote offered branch"),
        "{}",
        out.all()
    );
    assert!(
        node.remote_report("origin")["problem"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("permission denied"),
        "{}",
        node.status()
    );

    sshd.authorize("root", &node.troops(&["key"]).ok().stdout);
    // The caller's environment does not change how ssh runs.
    let out: Run = node
        .command(&["pull"])
        .env("GIT_SSH_COMMAND", "false")
        .env("GIT_SSH", "/bin/false")
        .env("SSH_AUTH_SOCK", "/nonexistent")
        .output()
        .unwrap()
        .into();
    out.ok();
    assert_eq!(node.deployed().as_deref(), Some(head.as_str()));
    assert_eq!(node.read("out/tag").as_deref(), Some("over-ssh"));
}

#[test]
fn a_host_whose_key_is_not_pinned_is_refused() {
    let world = World::new();
    let sshd = Sshd::start(&world);
    let remote = world.bare("origin");
    let up = world.upstream("src");
    up.write("deploy.py", &simple_deploy("x"));
    up.commit("one");
    up.push(&remote);
    // Pinned to some other host key.
    let other = world.path("otherkey");
    Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .unwrap();
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let mut f = other_pub.split_whitespace();
    let wrong = format!(
        "[127.0.0.1]:{} {} {}",
        sshd.port,
        f.next().unwrap(),
        f.next().unwrap()
    );
    let node = seeded_node(&world, "wrong-pin", &sshd.url(&remote), Some(&wrong));
    sshd.authorize("root", &node.troops(&["key"]).ok().stdout);
    node.troops(&["pull"]).failed();
    let problem = node.remote_report("origin")["problem"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        problem.contains("Host key verification failed")
            || problem.to_lowercase().contains("host key"),
        "{problem}"
    );
    assert_eq!(node.deployed(), None);

    // With nothing pinned, the first key seen is accepted and remembered.
    let node = seeded_node(&world, "tofu", &sshd.url(&remote), None);
    sshd.authorize("root", &node.troops(&["key"]).ok().stdout);
    node.troops(&["pull"]).ok();
    let known = node.read("var/lib/troops/ssh/known_hosts").unwrap();
    assert!(
        known.contains(&format!("[127.0.0.1]:{}", sshd.port)),
        "{known}"
    );
}

#[test]
fn an_ssh_fetch_runs_ssh_once_without_a_feature_probe() {
    let world = World::new();
    let sshd = Sshd::start(&world);
    let remote = world.bare("origin");
    let up = world.upstream("src");
    up.write("deploy.py", &simple_deploy("one-ssh"));
    let head = up.commit("one");
    up.push(&remote);
    let node = seeded_node(
        &world,
        "probe",
        &sshd.url(&remote),
        Some(&sshd.known_hosts_line()),
    );
    sshd.authorize("root", &node.troops(&["key"]).ok().stdout);
    // An ssh on PATH that logs how it was called, then is the real one.
    let bin = world.path("logged-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = world.path("ssh-calls");
    let wrapper = bin.join("ssh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\nexec /usr/bin/ssh \"$@\"\n",
            log.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display());
    node.troops_with_path(&["pull"], &path).ok();
    assert_eq!(node.deployed().as_deref(), Some(head.as_str()));
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(calls.lines().count(), 1, "one ssh per fetch: {calls}");
    assert!(!calls.contains(" -G "), "probed first: {calls}");
}

#[test]
fn a_re_init_without_a_seed_keeps_the_pinned_host_key() {
    let world = World::new();
    let sshd = Sshd::start(&world);
    let remote = world.bare("origin");
    let up = world.upstream("src");
    up.write("deploy.py", &simple_deploy("x"));
    up.commit("one");
    up.push(&remote);
    let url = sshd.url(&remote);
    // Pinned to a key the server does not have: every fetch must be refused.
    let wrong = format!(
        "[127.0.0.1]:{} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
        sshd.port
    );
    let node = seeded_node(&world, "repin", &url, Some(&wrong));
    sshd.authorize("root", &node.troops(&["key"]).ok().stdout);
    // The operator re-runs init by hand, with the user data long gone.
    node.troops(&[
        "init",
        "--no-pull",
        "--group",
        &node.group,
        "--remote",
        &format!("origin={url}"),
    ])
    .ok();
    let config = node.read("var/lib/troops/ssh/config").unwrap();
    assert!(
        config.contains("StrictHostKeyChecking yes"),
        "re-init weakened host-key checking:\n{config}"
    );
    assert_eq!(
        node.read("var/lib/troops/ssh/known_hosts").unwrap().trim(),
        wrong
    );
    node.troops(&["pull"]).failed();
    assert_eq!(node.deployed(), None, "a host with another key was trusted");
}

#[test]
fn a_root_holding_shell_text_or_a_space_is_never_run_by_ssh() {
    let world = World::new();
    let marker = world.path("pwned");
    let mut node = world.node("plain");
    node.root = world.path(&format!("nodes/a b$(touch {})", marker.display()));
    // Nothing listens on port 1: ssh must get as far as connecting, with the config found.
    node.troops(&[
        "init",
        "--no-pull",
        "--group",
        &node.group,
        "--remote",
        "origin=ssh://git@127.0.0.1:1/x.git",
    ])
    .ok();
    node.troops(&["pull"]).failed();
    assert!(!marker.exists(), "the root's shell text ran");
    let problem = node.remote_report("origin")["problem"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        problem.to_lowercase().contains("connection refused"),
        "{problem}"
    );
}
