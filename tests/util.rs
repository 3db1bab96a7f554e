//! Helpers for the integration tests: real git repositories, real remotes, and nodes under
//! temporary roots driven through the real `troops` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const TROOPS: &str = env!("CARGO_BIN_EXE_troops");

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=Test",
            "-c",
            "user.email=test@example.com",
            "-c",
            "init.defaultBranch=master",
        ])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A scratch directory for one test, removed afterwards, and the throwaway admin group its
/// nodes use (removed too).
pub struct World {
    dir: tempfile::TempDir,
    pub group: String,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

static WORLDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl World {
    pub fn new() -> World {
        let module = Path::new(TROOPS).with_file_name("libtroops.so");
        assert!(
            module.exists(),
            "{} is missing: build the workspace first (cargo build --workspace)",
            module.display()
        );
        let n = WORLDS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = tempfile::Builder::new()
            .prefix("troops-test-")
            .tempdir()
            .unwrap();
        // Nodes read local remotes with the admin group's rights only (as nobody): the
        // world's remotes must be reachable by others, as a real local mirror would be.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        World {
            dir,
            group: format!("trt{}x{n}", std::process::id()),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A bare repository to serve as a remote.
    pub fn bare(&self, name: &str) -> PathBuf {
        let p = self.path(&format!("remotes/{name}.git"));
        std::fs::create_dir_all(&p).unwrap();
        git(&p, &["init", "-q", "--bare"]);
        p
    }

    pub fn upstream(&self, name: &str) -> Upstream {
        let p = self.path(&format!("upstream/{name}"));
        std::fs::create_dir_all(&p).unwrap();
        git(&p, &["init", "-q"]);
        Upstream { dir: p }
    }

    pub fn node(&self, name: &str) -> Node {
        Node {
            root: self.path(&format!("nodes/{name}")),
            group: self.group.clone(),
            exe: PathBuf::from(TROOPS),
        }
    }

    /// Open the world to other users (tempdirs are 0700) and put a copy of the binary and
    /// the Python module where they can run it: for tests with real non-root users.
    pub fn shared_binary(&self) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = self.path("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy(TROOPS, bin.join("troops")).unwrap();
        std::fs::copy(
            Path::new(TROOPS).with_file_name("libtroops.so"),
            bin.join("libtroops.so"),
        )
        .unwrap();
        bin.join("troops")
    }
}

/// A working repository where the tests make commits, then push them to bare remotes.
pub struct Upstream {
    pub dir: PathBuf,
}

impl Upstream {
    pub fn write(&self, rel: &str, contents: &str) -> &Self {
        let p = self.dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, contents).unwrap();
        self
    }

    pub fn remove(&self, rel: &str) -> &Self {
        git(&self.dir, &["rm", "-q", "-r", rel]);
        self
    }

    /// Commit everything; returns the new commit's id.
    pub fn commit(&self, message: &str) -> String {
        git(&self.dir, &["add", "-A"]);
        git(&self.dir, &["commit", "-q", "--allow-empty", "-m", message]);
        self.head()
    }

    pub fn head(&self) -> String {
        git(&self.dir, &["rev-parse", "HEAD"])
    }

    pub fn push(&self, bare: &Path) {
        git(
            &self.dir,
            &[
                "push",
                "-q",
                &bare.display().to_string(),
                "HEAD:refs/heads/master",
            ],
        );
    }

    pub fn force_push(&self, bare: &Path, rev: &str) {
        git(
            &self.dir,
            &[
                "push",
                "-q",
                "-f",
                &bare.display().to_string(),
                &format!("{rev}:refs/heads/master"),
            ],
        );
    }

    pub fn reset_hard(&self, rev: &str) {
        git(&self.dir, &["reset", "-q", "--hard", rev]);
    }
}

pub struct Node {
    pub root: PathBuf,
    /// The admin group, passed to every init so the host's own `troops` is never touched.
    pub group: String,
    /// The binary this node is driven with (and its hooks run).
    pub exe: PathBuf,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "troops failed:\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    pub fn failed(self) -> Run {
        assert_ne!(
            self.code, 0,
            "troops should have failed:\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Node {
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        c.arg("--root")
            .arg(&self.root)
            .args(args)
            .env_remove("TROOPS_ROOT")
            .env_remove("JOURNAL_STREAM");
        c
    }

    /// `troops` started in the background, its output collected for `wait_with_output`.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        self.command(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("troops starts")
    }

    /// Wait until run `id`'s log holds `text`: a deploy has got that far.
    pub fn wait_for_log(&self, id: u64, text: &str) {
        let log = self.path(&format!("var/lib/troops/runs/{id}.log"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(text)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "run {id} never printed {text:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn troops(&self, args: &[&str]) -> Run {
        self.command(args).output().expect("troops runs").into()
    }

    /// `troops` with PATH set to `path`.
    pub fn troops_with_path(&self, args: &[&str], path: &str) -> Run {
        self.command(args)
            .env("PATH", path)
            .output()
            .expect("troops runs")
            .into()
    }

    /// `troops init` with `remotes` as (name, bare path) and the given roles.
    pub fn init(&self, remotes: &[(&str, &Path)], roles: &[&str]) -> Run {
        let mut args: Vec<String> = vec![
            "init".into(),
            "--no-pull".into(),
            "--group".into(),
            self.group.clone(),
        ];
        for (name, path) in remotes {
            args.push("--remote".into());
            args.push(format!("{name}=file://{}", path.display()));
        }
        for r in roles {
            args.push("--role".into());
            args.push(r.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.troops(&args).ok()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.path(rel)).ok()
    }

    /// The group-writable repo members push to: input, never root's state.
    pub fn repo(&self) -> PathBuf {
        self.path("var/lib/troops/repo/main.git")
    }

    /// Root's own repo: what it accepted, verified and deployed.
    pub fn state_repo(&self) -> PathBuf {
        self.path("var/lib/troops/repo/node.git")
    }

    /// Set `key = value` (a TOML value) in troops.toml.
    pub fn set(&self, key: &str, value: &str) {
        let p = self.path("etc/troops/troops.toml");
        let s = std::fs::read_to_string(&p).unwrap();
        let mut lines: Vec<String> = s
            .lines()
            .filter(|l| !l.starts_with(&format!("{key} =")))
            .map(String::from)
            .collect();
        // Top-level keys go before any table.
        let at = lines
            .iter()
            .position(|l| l.starts_with('['))
            .unwrap_or(lines.len());
        lines.insert(at, format!("{key} = {value}"));
        std::fs::write(p, lines.join("\n") + "\n").unwrap();
    }

    fn rev(&self, name: &str) -> Option<String> {
        rev_in(&self.state_repo(), name)
    }

    /// The shared repo's branch: what members last pushed, whether or not root took it.
    pub fn pushed(&self) -> Option<String> {
        rev_in(&self.repo(), "refs/heads/master")
    }

    pub fn head(&self) -> Option<String> {
        self.rev("refs/heads/master")
    }

    pub fn deployed(&self) -> Option<String> {
        self.rev("refs/troops/deployed")
    }

    /// Every run record, oldest first.
    pub fn runs(&self) -> Vec<serde_json::Value> {
        let out = self.troops(&["log", "--json"]).ok();
        let mut v: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
        v.reverse();
        v
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.troops(&["status", "--json"]).ok().stdout).unwrap()
    }

    pub fn run_log(&self, id: u64) -> String {
        self.troops(&["log", &id.to_string()]).ok().stdout
    }

    pub fn remote_report(&self, name: &str) -> serde_json::Value {
        self.status()["last_pull"]["remotes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no remote {name} in the last pull report"))
    }

    pub fn fsck(&self) {
        let out = Command::new("git")
            .arg("--git-dir")
            .arg(self.state_repo())
            .args(["fsck", "--strict"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git fsck: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn rev_in(repo: &Path, name: &str) -> Option<String> {
    let out = Command::new("git")
        .arg("--git-dir")
        .arg(repo)
        .args(["rev-parse", "--verify", "-q", name])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A deploy.py that records what it deployed under the node's root.
pub fn simple_deploy(tag: &str) -> String {
    format!(
        r#"import pathlib, troops
print("deploying {tag}")
p = pathlib.Path(troops.root, "out")
p.mkdir(exist_ok=True)
(p / "deployed").write_text(troops.commit)
(p / "tag").write_text("{tag}")
"#
    )
}

/// One upstream, one remote, one initialised node: the usual test.
pub struct One {
    pub world: World,
    pub up: Upstream,
    pub remote: PathBuf,
    pub node: Node,
}

pub fn one_remote(roles: &[&str]) -> One {
    let world = World::new();
    let up = world.upstream("src");
    let remote = world.bare("origin");
    let node = world.node("n1");
    node.init(&[("origin", &remote)], roles);
    One {
        world,
        up,
        remote,
        node,
    }
}

impl One {
    /// Commit everything and push it to the remote.
    pub fn ship(&self, message: &str) -> String {
        let c = self.up.commit(message);
        self.up.push(&self.remote);
        c
    }
}

/// A throwaway local user (in `group` if given), removed afterwards: an admin-group member
/// or an outsider, acting with its own uid through runuser.
pub struct Member {
    pub name: String,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-KILL", "-u", &self.name])
            .output();
        let _ = Command::new("userdel").args(["-f", &self.name]).output();
    }
}

static MEMBERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Member {
    pub fn new(group: Option<&str>) -> Member {
        let n = MEMBERS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("trm{}x{n}", std::process::id());
        let made = Command::new("useradd")
            .args(["-M", "-s", "/bin/sh", &name])
            .status()
            .unwrap();
        assert!(made.success(), "useradd {name}");
        let member = Member { name };
        if let Some(g) = group {
            let added = Command::new("gpasswd")
                .args(["-a", &member.name, g])
                .output()
                .unwrap();
            assert!(added.status.success(), "gpasswd -a {} {g}", member.name);
        }
        member
    }

    /// `program args` as this user, with a clean HOME (none of root's config).
    pub fn command(&self, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("runuser");
        c.args(["-u", &self.name, "--", "env", "HOME=/nonexistent"])
            .arg(program)
            .args(args)
            .env_remove("TROOPS_ROOT")
            .env_remove("JOURNAL_STREAM");
        c
    }

    pub fn run(&self, program: &Path, args: &[&str]) -> Run {
        self.command(program, args).output().unwrap().into()
    }

    /// git in `repo` as this user: what a member can do to the shared repo by hand.
    pub fn git(&self, repo: &Path, args: &[&str]) -> Run {
        let mut all = vec![
            "-c",
            "safe.directory=*",
            "--git-dir",
            repo.to_str().unwrap(),
        ];
        all.extend(args);
        self.run(Path::new("git"), &all)
    }
}
