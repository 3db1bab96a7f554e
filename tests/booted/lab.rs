//! A lab of booted Debian nodes: systemd as PID 1 under systemd-nspawn, each in its own
//! network namespace on a private bridge, each on an overlay over a cached base image.
//! Everything made here (bridge, namespaces, veths, mounts, cgroups, processes) is undone
//! when the lab is dropped, whether the test passed or not.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::imds_fake::{FakeImds, Mode};

/// Cached base images and lab scratch space live here, between runs.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("TROOPS_E2E_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/troops-e2e"))
}

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// The base image for a Debian suite: built by tests/booted/image.sh once, and again
/// whenever that recipe changes (the directory is named for its hash).
pub fn image(suite: &str) -> PathBuf {
    let recipe = manifest().join("tests/booted/image.sh");
    let hash = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(fs::read(&recipe).unwrap());
        h.update(suite.as_bytes());
        format!("{:x}", h.finalize())
    };
    let cache = cache_dir();
    fs::create_dir_all(&cache).unwrap();
    let dest = cache.join(format!("{suite}-{}", &hash[..16]));
    // Two test runs at once build an image once.
    let lock = fs::File::create(cache.join(format!("{suite}.lock"))).unwrap();
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    if !dest.join("etc/os-release").exists() {
        for old in fs::read_dir(&cache).unwrap().flatten() {
            let name = old.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{suite}-")) && old.path() != dest {
                let _ = fs::remove_dir_all(old.path());
            }
        }
        let started = Instant::now();
        run(Command::new("bash").arg(&recipe).arg(suite).arg(&dest));
        eprintln!(
            "booted: built the {suite} image in {:.0?}",
            started.elapsed()
        );
    }
    dest
}

/// The private network: a bridge in the host namespace with the lab's /24 on it.
pub struct Lab {
    pub dir: PathBuf,
    bridge: String,
    pub net: String,
    nodes: Vec<Node>,
    /// The operator's ssh key: root of nothing, owner of the admin and git accounts.
    pub key: PathBuf,
}

pub struct Node {
    pub name: String,
    pub ip: String,
    dir: PathBuf,
    netns: String,
    veth: String,
    nspawn: Option<Child>,
    pub leader: u32,
    pub imds: Option<FakeImds>,
}

pub struct NodeSpec<'a> {
    pub name: &'a str,
    pub image: &'a Path,
    /// A NoCloud seed: the user-data; meta-data is made here.
    pub nocloud: Option<String>,
    /// User data served by a fake IMDSv2 at 169.254.169.254 inside the node's namespace.
    pub imds: Option<Vec<u8>>,
    /// Copied to /var/tmp/troops.deb before the node boots.
    pub deb: Option<&'a Path>,
    /// Run in the node's root (chrooted) before it boots.
    pub prepare: &'a str,
    /// A bare repository copied to /srv/mirror.git before the node boots: a mirror baked
    /// into the image, which needs no key.
    pub mirror: Option<&'a Path>,
}

/// What a killed test run left behind (no Drop runs on SIGKILL): its nodes' processes,
/// mounts, namespaces, links and cgroups, found by the pid in their names.
fn sweep_dead_labs() {
    let Ok(entries) = fs::read_dir(cache_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("run-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("booted: cleaning up after a dead run (pid {pid})");
        for h in cgroup_roots() {
            let top = h.join(format!("troops-e2e-{pid}"));
            let procs = Command::new("find")
                .arg(&top)
                .args(["-name", "cgroup.procs", "-exec", "cat", "{}", "+"])
                .output();
            for p in procs.iter().flat_map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .into_owned()
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            }) {
                if let Ok(p) = p.parse::<i32>() {
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        for node in fs::read_dir(entry.path()).into_iter().flatten().flatten() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(node.path().join("root"))
                .output();
        }
        let netns = Command::new("ip").args(["netns", "list"]).output();
        for line in netns.iter().flat_map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        }) {
            let ns = line.split_whitespace().next().unwrap_or("");
            if ns.starts_with(&format!("troops-e2e-{pid}-")) {
                let _ = Command::new("ip").args(["netns", "del", ns]).output();
            }
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("trb{}", pid % 1_000_000)])
            .output();
        remove_cgroups(pid);
        let _ = fs::remove_dir_all(entry.path());
    }
}

impl Lab {
    pub fn new() -> Lab {
        sweep_dead_labs();
        let pid = std::process::id();
        let dir = cache_dir().join(format!("run-{pid}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let key = dir.join("operator");
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "operator@lab", "-f"])
            .arg(&key));
        let net = format!("10.77.{}", pid % 250);
        let lab = Lab {
            dir,
            bridge: format!("trb{}", pid % 1_000_000),
            net,
            nodes: Vec::new(),
            key,
        };
        ip(&["link", "add", &lab.bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("{}.1/24", lab.net),
            "dev",
            &lab.bridge,
        ]);
        ip(&["link", "set", &lab.bridge, "up"]);
        lab
    }

    pub fn operator_key(&self) -> String {
        fs::read_to_string(self.key.with_extension("pub"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// ssh as the operator, trusting whatever host key a fresh node made.
    pub fn ssh_command(&self) -> String {
        format!(
            "ssh -F /dev/null -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=10",
            self.key.display()
        )
    }

    /// Node addresses are fixed by name, so every node's /etc/hosts names all of them.
    fn address(&self, name: &str) -> String {
        let idx = NAMES
            .iter()
            .position(|n| *n == name)
            .unwrap_or_else(|| panic!("no address for node {name}"));
        format!("{}.{}", self.net, 10 + idx)
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    pub fn boot(&mut self, spec: NodeSpec) -> &Node {
        let pid = std::process::id();
        let idx = NAMES.iter().position(|n| *n == spec.name).unwrap();
        let dir = self.dir.join(spec.name);
        let root = dir.join("root");
        for d in ["upper", "work", "root"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        let (netns, veth, node_ip) = (
            format!("troops-e2e-{pid}-{}", spec.name),
            format!("tv{}n{idx}", pid % 1_000_000),
            self.address(spec.name),
        );
        // Kept from the start, so that a failure from here on still tears down what was made
        // (teardown ignores what was never made).
        self.nodes.push(Node {
            name: spec.name.to_owned(),
            ip: node_ip.clone(),
            dir: dir.clone(),
            netns: netns.clone(),
            veth: veth.clone(),
            nspawn: None,
            leader: 0,
            imds: None,
        });
        let i = self.nodes.len() - 1;
        run(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                spec.image.display(),
                dir.join("upper").display(),
                dir.join("work").display()
            ))
            .arg(&root));
        fs::write(root.join("etc/hostname"), format!("{}\n", spec.name)).unwrap();
        let mut hosts = format!(
            "127.0.0.1 localhost\n127.0.1.1 {}\n{}.1 labhost\n",
            spec.name, self.net
        );
        for n in NAMES {
            hosts.push_str(&format!("{} {n}\n", self.address(n)));
        }
        fs::write(root.join("etc/hosts"), hosts).unwrap();
        if let Some(user_data) = &spec.nocloud {
            let seed = root.join("var/lib/cloud/seed/nocloud");
            fs::create_dir_all(&seed).unwrap();
            fs::write(
                seed.join("meta-data"),
                format!(
                    "instance-id: iid-{}-{pid}\nlocal-hostname: {}\n",
                    spec.name, spec.name
                ),
            )
            .unwrap();
            fs::write(seed.join("user-data"), user_data).unwrap();
        }
        if let Some(deb) = spec.deb {
            fs::copy(deb, root.join("var/tmp/troops.deb")).unwrap();
        }
        if let Some(mirror) = spec.mirror {
            run(Command::new("cp")
                .arg("-a")
                .arg(mirror)
                .arg(root.join("srv/mirror.git")));
        }
        if !spec.prepare.is_empty() {
            run(Command::new("chroot")
                .arg(&root)
                .args(["sh", "-euc", spec.prepare]));
        }

        // The node's network: eth0 on the lab bridge, no default route, so that anything
        // meant for outside the lab fails at once.
        ip(&["netns", "add", &netns]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]);
        ip(&["link", "set", &veth, "master", &self.bridge, "up"]);
        let ns = |args: &[&str]| {
            let mut all = vec!["-n", netns.as_str()];
            all.extend_from_slice(args);
            ip(&all);
        };
        ns(&["link", "set", "lo", "up"]);
        ns(&["addr", "add", &format!("{node_ip}/24"), "dev", "eth0"]);
        ns(&["link", "set", "eth0", "up"]);
        if let Some(user_data) = &spec.imds {
            // The link-local address EC2 uses, on an empty bridge (this kernel has no dummy
            // links), inside this node's namespace only.
            ns(&["link", "add", "imds0", "type", "bridge"]);
            ns(&["addr", "add", "169.254.169.254/32", "dev", "imds0"]);
            ns(&["link", "set", "imds0", "up"]);
            let listener = listen_in(&netns, "169.254.169.254:80");
            self.nodes[i].imds = Some(FakeImds::start_on(listener, Mode::Normal, user_data));
        }

        // Its own cgroup in each hierarchy nspawn uses, or two nodes would share one payload
        // cgroup. The shell moves itself there, then becomes nspawn.
        let cgroups: Vec<PathBuf> = cgroup_roots()
            .iter()
            .map(|h| h.join(format!("troops-e2e-{pid}")).join(spec.name))
            .collect();
        let mut script = String::new();
        for cg in &cgroups {
            fs::create_dir_all(cg).unwrap();
            script.push_str(&format!("echo $$ > {}/cgroup.procs; ", cg.display()));
        }
        script.push_str("exec systemd-nspawn \"$@\"");
        let console = fs::File::create(dir.join("console.log")).unwrap();
        let child = Command::new("sh")
            .args(["-c", &script, "sh", "-q", "-D"])
            .arg(&root)
            .arg(format!("--machine={}", spec.name))
            .args(["--boot", "--register=no", "--keep-unit", "--console=pipe"])
            .arg(format!("--network-namespace-path=/run/netns/{netns}"))
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console)
            .spawn()
            .expect("failed to start systemd-nspawn");
        let nspawn_pid = child.id();
        let node = &mut self.nodes[i];
        node.nspawn = Some(child);

        // PID 1 of the node, as the host sees it: nspawn's child.
        node.leader = wait_for(Duration::from_secs(60), "the node's init to start", || {
            fs::read_to_string(format!("/proc/{nspawn_pid}/task/{nspawn_pid}/children"))
                .ok()
                .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
        });
        let state = node.sh("timeout 240 systemctl is-system-running --wait || true");
        let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
        assert!(
            state == "running" || state == "degraded",
            "{} did not boot: {state}\n{}",
            node.name,
            node.journal("")
        );
        node
    }
}

/// Names in the order of their addresses.
const NAMES: [&str; 5] = ["gitsrv", "cloud", "preseed", "imds", "trixie"];

/// The cgroup hierarchies systemd-nspawn makes its cgroups in: the unified one, and the
/// named systemd one where the host runs hybrid cgroups.
fn cgroup_roots() -> Vec<PathBuf> {
    ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.join("cgroup.procs").exists())
        .collect::<Vec<_>>()
        .into_iter()
        .chain(
            // Pure cgroup2 hosts.
            Some(PathBuf::from("/sys/fs/cgroup"))
                .filter(|p| p.join("cgroup.controllers").exists() && !p.join("unified").exists()),
        )
        .collect()
}

/// The cgroups of the lab run `pid` made, deepest first: a cgroup goes only once its
/// children have.
fn remove_cgroups(pid: u32) {
    for h in cgroup_roots() {
        let top = h.join(format!("troops-e2e-{pid}"));
        if top.exists() {
            let _ = Command::new("find")
                .arg(&top)
                .args(["-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
                .output();
        }
    }
}

/// A socket bound inside another network namespace: a thread enters it, binds, and ends;
/// the socket stays where it was made.
fn listen_in(netns: &str, addr: &str) -> TcpListener {
    let path = format!("/run/netns/{netns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = fs::File::open(&path).unwrap();
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr} in {netns}: {e}"))
        })
        .join()
        .unwrap()
    })
}

/// Poll until `f` says something, or fail naming what never happened.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "gave up after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

impl Node {
    /// A shell command inside the booted node: every namespace of its PID 1.
    pub fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Like `sh`, but it must succeed; its stdout.
    pub fn ok(&self, script: &str) -> String {
        self.succeeded(script, self.sh(script))
    }

    fn succeeded(&self, script: &str, out: Output) -> String {
        assert!(
            out.status.success(),
            "on {}: {script:?} failed ({}):\n{}{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Feed `input` to a command inside the node.
    pub fn ok_with_input(&self, script: &str, input: &str) -> String {
        let mut child = Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "sh", "-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        self.succeeded(script, child.wait_with_output().unwrap())
    }

    /// The node's journal for this boot, for one unit or (empty) all of it.
    pub fn journal(&self, unit: &str) -> String {
        let filter = if unit.is_empty() {
            String::new()
        } else {
            format!("-u {unit}")
        };
        String::from_utf8_lossy(
            &self
                .sh(&format!("journalctl -b --no-pager -o cat {filter}"))
                .stdout,
        )
        .into_owned()
    }

    /// Where the host sees the node's files.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join("root").join(rel.trim_start_matches('/'))
    }

    fn teardown(&mut self) {
        if let Some(mut child) = self.nspawn.take() {
            if self.leader != 0 {
                let _ = Command::new("nsenter")
                    .args([
                        "-t",
                        &self.leader.to_string(),
                        "-a",
                        "systemctl",
                        "poweroff",
                    ])
                    .output();
            }
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none()
                && start.elapsed() < Duration::from_secs(20)
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            if child.try_wait().ok().flatten().is_none() {
                // Killing PID 1 of the node's PID namespace kills everything in it.
                if self.leader != 0 {
                    unsafe { libc::kill(self.leader as i32, libc::SIGKILL) };
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        if !self.netns.is_empty() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.netns])
                .output();
        }
        let root = self.dir.join("root");
        if Command::new("mountpoint")
            .arg("-q")
            .arg(&root)
            .status()
            .is_ok_and(|s| s.success())
        {
            let _ = Command::new("umount").arg(&root).status();
            let _ = Command::new("umount").arg("-l").arg(&root).output();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in &self.nodes {
                if n.leader != 0 {
                    let j = n.journal("");
                    let tail: Vec<&str> = j.lines().rev().take(80).collect();
                    eprintln!("---- journal of {} (last 80 lines)", n.name);
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                    let units = n.sh("systemctl list-timers --all --no-pager; systemctl status --no-pager -n 20 troops-init.service troops-pull.timer troops-pull.service troops.socket; troops log");
                    eprintln!(
                        "---- units of {}\n{}",
                        n.name,
                        String::from_utf8_lossy(&units.stdout)
                    );
                }
            }
        }
        for n in &mut self.nodes {
            n.teardown();
        }
        remove_cgroups(std::process::id());
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
