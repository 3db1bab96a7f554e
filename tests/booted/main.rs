//! The package on booted Debian nodes: systemd as PID 1 (systemd-nspawn), the .deb
//! installed by cloud-init, by dpkg with preseeded debconf answers, and with user data from
//! a fake IMDSv2, on bookworm and on trixie; a git server node the nodes pull from over ssh;
//! the pull timer; an admin pushing over ssh. Needs root, debootstrap, systemd-nspawn and
//! the .deb in TROOPS_E2E_DEB (dev/test builds it first).

#[path = "../imds_fake.rs"]
#[allow(dead_code)]
mod imds_fake;
mod lab;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lab::{Lab, Node, NodeSpec, image, run, wait_for};

fn the_deb() -> PathBuf {
    let deb = std::env::var_os("TROOPS_E2E_DEB").map(PathBuf::from).expect(
        "TROOPS_E2E_DEB must name the .deb under test: run dev/test, or packaging/build-deb and export its output",
    );
    assert!(
        deb.is_file(),
        "TROOPS_E2E_DEB={}: no such file",
        deb.display()
    );
    deb
}

fn example(name: &str) -> String {
    fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("cloud-init")
            .join(name),
    )
    .unwrap()
}

/// Replace text that must be there: an example that changed shape fails here, loudly.
fn must_replace(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "the example no longer contains {from:?}"
    );
    text.replace(from, to)
}

/// The operator's checkout of the deployment repository.
struct Work {
    dir: PathBuf,
}

impl Work {
    fn git(&self, args: &[&str]) -> String {
        let out = run(Command::new("git")
            .arg("-C")
            .arg(&self.dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "Operator")
            .env("GIT_AUTHOR_EMAIL", "op@lab")
            .env("GIT_COMMITTER_NAME", "Operator")
            .env("GIT_COMMITTER_EMAIL", "op@lab")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1"));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn commit(&self, message: &str) -> String {
        fs::write(self.dir.join("version"), message).unwrap();
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "-m", message]);
        self.git(&["rev-parse", "HEAD"])
    }

    /// `git push` over ssh as the operator; what git printed (stdout and stderr).
    fn push(&self, lab: &Lab, url: &str) -> String {
        let out = run(Command::new("git")
            .arg("-C")
            .arg(&self.dir)
            .args(["push", url, "master"])
            .env("GIT_SSH_COMMAND", lab.ssh_command())
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1"));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

/// deploy.py: leaves what it saw where the test can read it, and says so on stdout.
const DEPLOY_PY: &str = r#"import json, os, sys, time
import troops

os.makedirs("/var/lib/e2e", exist_ok=True)
# A commit carrying `slow` deploys slowly: the package upgrade happens while it runs.
if os.path.exists("slow"):
    print("e2e: slow deploy of", troops.commit, flush=True)
    time.sleep(float(open("slow").read()))
seen = {
    "commit": troops.commit,
    "hostname": troops.hostname(),
    "roles": sorted(troops.roles),
    "python": "%d.%d" % sys.version_info[:2],
}
with open("/var/lib/e2e/deployed.json.tmp", "w") as f:
    json.dump(seen, f)
os.replace("/var/lib/e2e/deployed.json.tmp", "/var/lib/e2e/deployed.json")
print("e2e: deployed", troops.commit, "on", troops.hostname())
"#;

/// `deb` repacked with a higher version, as the next release would be: (path, version).
fn newer_deb(deb: &Path, dir: &Path) -> (PathBuf, String) {
    let tree = dir.join("newer-deb");
    let _ = fs::remove_dir_all(&tree);
    run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree));
    let control = tree.join("DEBIAN/control");
    let text = fs::read_to_string(&control).unwrap();
    let old = text
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .expect("a Version field")
        .to_owned();
    let version = format!("{old}+newer1");
    fs::write(
        &control,
        text.replace(&format!("Version: {old}"), &format!("Version: {version}")),
    )
    .unwrap();
    let out = dir.join("troops-newer.deb");
    run(Command::new("dpkg-deb")
        .args(["-b", "--root-owner-group"])
        .arg(&tree)
        .arg(&out));
    (out, version)
}

fn deployed(node: &Node) -> Option<serde_json::Value> {
    let text = fs::read_to_string(node.path("/var/lib/e2e/deployed.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn wait_deployed(node: &Node, commit: &str) -> serde_json::Value {
    wait_for(
        Duration::from_secs(300),
        &format!("{} to deploy {commit}", node.name),
        || deployed(node).filter(|d| d["commit"] == commit),
    )
}

/// The run record of the deploy of `commit`: it must say it succeeded. deploy.py leaves its
/// file before the agent finishes the record, so wait for the record a little. (On failure
/// the lab prints each node's `troops log`.)
fn record_of(node: &Node, commit: &str, trigger: &str) -> serde_json::Value {
    let runs = node.path("/var/lib/troops/runs");
    let find = || {
        fs::read_dir(&runs)
            .ok()?
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| {
                serde_json::from_slice::<serde_json::Value>(&fs::read(e.path()).ok()?).ok()
            })
            .filter(|r| r["commit"] == commit)
            .filter(|r| r["trigger"].as_str().is_some_and(|t| t.contains(trigger)))
            .find(|r| r["result"] == "success")
    };
    wait_for(
        Duration::from_secs(60),
        &format!(
            "a successful run record on {} for {commit} by {trigger:?}",
            node.name
        ),
        find,
    )
}

/// From the journal: how long after troops-init.service started the seed was read, and the
/// first deploy started and ended. Printed for the README's first-boot figures; asserted
/// only to have happened in that order, within troops-init.
fn first_boot_timing(node: &Node, commit: &str) {
    let lines = wait_for(
        Duration::from_secs(180),
        "the first deploy within troops-init on cloud",
        || {
            let j = node.ok("journalctl -u troops-init.service -o short-unix --no-pager");
            j.contains(&format!("e2e: deployed {commit}")).then_some(j)
        },
    );
    let at = |what: &dyn Fn(&str) -> bool| -> f64 {
        let line = lines
            .lines()
            .find(|l| what(l))
            .unwrap_or_else(|| panic!("not in troops-init's journal:\n{lines}"));
        line.split_whitespace().next().unwrap().parse().unwrap()
    };
    let start = at(&|l| l.contains("Starting troops-init.service"));
    let seed = at(&|l| l.contains("troops: seed from"));
    let made = at(&|l| l.contains("troops: ssh key: make"));
    let deploying = at(&|l| l.contains(&format!("deploying {}", &commit[..12])));
    let deployed = at(&|l| l.contains(&format!("e2e: deployed {commit}")));
    assert!(start <= seed && seed <= made && made <= deploying && deploying <= deployed);
    println!(
        "booted: first boot on {}: seed read {:.2} s after troops-init started; init's files and repositories written by {:.2} s; first deploy started at {:.2} s, deploy.py done at {:.2} s",
        node.name,
        seed - start,
        made - start,
        deploying - start,
        deployed - start
    );
}

/// The node's key, authorised for the git account on the server.
fn authorise(lab: &Lab, node: &Node) {
    let key = node.ok("troops key");
    assert!(
        key.starts_with("ssh-rsa "),
        "troops key on {}: {key}",
        node.name
    );
    lab.node("gitsrv")
        .ok_with_input("cat >> /home/git/.ssh/authorized_keys", &key);
}

#[test]
fn nodes_boot_install_the_package_and_deploy_themselves() {
    let deb = the_deb();
    let (bookworm, trixie) = std::thread::scope(|s| {
        let b = s.spawn(|| image("bookworm"));
        let t = s.spawn(|| image("trixie"));
        (b.join().unwrap(), t.join().unwrap())
    });
    let mut lab = Lab::new();
    let operator = lab.operator_key();

    let work = Work {
        dir: lab.dir.join("work"),
    };
    fs::create_dir_all(&work.dir).unwrap();
    work.git(&["init", "-q", "-b", "master"]);
    fs::write(work.dir.join("deploy.py"), DEPLOY_PY).unwrap();
    let c1 = work.commit("first");

    // The git server: a plain sshd with a git account the operator and the nodes use.
    lab.boot(NodeSpec {
        name: "gitsrv",
        image: &bookworm,
        nocloud: None,
        imds: None,
        deb: None,
        prepare: &format!(
            "useradd -m -s /bin/sh git
             install -d -m700 /home/git/.ssh
             echo '{operator}' > /home/git/.ssh/authorized_keys
             git init -q --bare -b master /home/git/deploy
             chown -R git:git /home/git"
        ),
        mirror: None,
    });
    let gitsrv_ip = lab.node("gitsrv").ip.clone();
    work.push(&lab, &format!("git@{gitsrv_ip}:deploy"));
    let host_key = lab
        .node("gitsrv")
        .ok("cat /etc/ssh/ssh_host_ed25519_key.pub");
    let host_key: Vec<&str> = host_key.split_whitespace().take(2).collect();
    let known_host = format!("gitsrv {}", host_key.join(" "));

    // The examples operators copy, with this lab's names and keys in them.
    let personalise = |text: &str| {
        let text = must_replace(
            text,
            "repos.example.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
            &known_host,
        );
        let text = must_replace(&text, "git@repos.example.com:deploy", "git@gitsrv:deploy");
        let text = must_replace(
            &text,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN0tAReaLKeyReplaceWithTheOperatorsOwnKey0000 ops@example.com",
            &operator,
        );
        // The test may shorten the interval through settings: ten seconds, not two minutes.
        must_replace(&text, "interval = 120", "interval = 10")
    };

    // 1. cloud-init installs the package from a NoCloud seed (the YAML example), with a
    // mirror baked into the image beside the git server: the first deploy needs no key, so
    // it happens within troops-init, and its timing is the first-boot figure.
    let mirror = lab.dir.join("mirror.git");
    run(Command::new("git")
        .args(["clone", "-q", "--bare"])
        .arg(&work.dir)
        .arg(&mirror));
    lab.boot(NodeSpec {
        name: "cloud",
        image: &bookworm,
        nocloud: Some(must_replace(
            &personalise(&example("user-data.yaml")),
            "        origin: \"git@gitsrv:deploy\"\n",
            "        origin: \"git@gitsrv:deploy\"\n        mirror: \"file:///srv/mirror.git\"\n",
        )),
        imds: None,
        deb: Some(&deb),
        prepare: "",
        mirror: Some(&mirror),
    });
    first_boot_timing(lab.node("cloud"), &c1);
    // 6. The same .deb on trixie, from the MIME example.
    lab.boot(NodeSpec {
        name: "trixie",
        image: &trixie,
        nocloud: Some(personalise(&example("user-data.mime"))),
        imds: None,
        deb: Some(&deb),
        prepare: "",
        mirror: None,
    });
    for name in ["cloud", "trixie"] {
        let node = lab.node(name);
        let init = node.journal("troops-init.service");
        assert!(
            init.contains("troops: seed from /etc/troops/seed.yaml"),
            "{name}: troops-init.service did not take the seed cloud-init wrote:\n{init}\n{}",
            node.journal("cloud-final.service")
        );
        assert!(
            node.path("/var/lib/troops/.init-done").exists(),
            "{name}: no init marker"
        );
        assert!(
            node.ok("id -nG ops")
                .split_whitespace()
                .any(|g| g == "troops"),
            "{name}: ops is no admin"
        );
        // The schema-clean seed: cloud-init finds nothing to complain about.
        let status = node.sh("cloud-init status --wait --long");
        let text = String::from_utf8_lossy(&status.stdout);
        assert!(
            status.status.success() && text.contains("status: done") && !text.contains("degraded"),
            "{name}: cloud-init status:\n{text}"
        );
        let schema = node.sh("cloud-init schema --system 2>&1");
        assert!(
            schema.status.success(),
            "{name}: cloud-init schema --system:\n{}",
            String::from_utf8_lossy(&schema.stdout)
        );
        let timer = node.ok("systemctl is-enabled troops-pull.timer; systemctl is-active troops-pull.timer; systemctl cat troops-pull.timer");
        assert!(timer.starts_with("enabled\nactive\n"), "{name}: {timer}");
        assert!(
            timer.contains("OnUnitActiveSec=10s"),
            "{name}: the interval did not reach the timer:\n{timer}"
        );
    }

    // Every example passes trixie's cloud-init schema as written (the MIME one is what the
    // trixie node was seeded with, checked by `schema --system` above).
    let trixie_node = lab.node("trixie");
    fs::create_dir_all(trixie_node.path("/var/tmp/examples")).unwrap();
    for name in ["user-data.yaml", "user-data.json"] {
        fs::write(
            trixie_node.path(&format!("/var/tmp/examples/{name}")),
            example(name),
        )
        .unwrap();
        let out = trixie_node.sh(&format!(
            "cloud-init schema -c /var/tmp/examples/{name} 2>&1"
        ));
        assert!(
            out.status.success(),
            "cloud-init schema -c {name}:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // 4. dpkg with preseeded debconf answers.
    lab.boot(NodeSpec {
        name: "preseed",
        image: &bookworm,
        nocloud: None,
        imds: None,
        deb: Some(&deb),
        prepare: "mkdir -p /etc/troops; echo 'interval = 10' > /etc/troops/troops.toml",
        mirror: None,
    });
    let answers = format!(
        "troops troops/remotes string origin=git@gitsrv:deploy\n\
         troops troops/roles string db\n\
         troops troops/branch string master\n\
         troops troops/known_hosts string {known_host}\n"
    );
    let preseed = lab.node("preseed");
    preseed.ok_with_input("debconf-set-selections", &answers);
    let installed = preseed.ok("DEBIAN_FRONTEND=noninteractive dpkg -i /var/tmp/troops.deb 2>&1");
    assert!(
        installed.contains("troops: seed from"),
        "the postinst did not init from the answers:\n{installed}"
    );
    let settings = fs::read_to_string(preseed.path("/etc/troops/troops.toml")).unwrap();
    assert!(
        settings.contains("\"db\""),
        "roles from debconf did not land: {settings}"
    );

    // 5. User data from a fake IMDSv2 at EC2's address, inside the node's own namespace,
    // named by the imds setting (the JSON example).
    let imds_user_data = must_replace(
        &personalise(&example("user-data.json")),
        "roles: [web]",
        "roles: [web, imds]",
    );
    lab.boot(NodeSpec {
        name: "imds",
        image: &bookworm,
        nocloud: None,
        imds: Some(imds_user_data.into_bytes()),
        deb: Some(&deb),
        // On EC2 cloud-init would make the user from this same user data; here cloud-init
        // has no EC2 datasource, so the image has it already.
        prepare: "useradd -m ops; mkdir -p /etc/troops
                  printf 'imds = \"http://169.254.169.254\"\\ninterval = 10\\n' > /etc/troops/troops.toml",
        mirror: None,
    });
    let imds = lab.node("imds");
    imds.ok("DEBIAN_FRONTEND=noninteractive dpkg -i /var/tmp/troops.deb");
    let plan = imds.sh("troops init --dry-run 2>&1");
    let plan = String::from_utf8_lossy(&plan.stdout);
    assert!(plan.contains("EC2 user data"), "{plan}");
    let init = wait_for(
        Duration::from_secs(120),
        "troops-init.service on imds",
        || {
            let j = imds.journal("troops-init.service");
            // "seed from" comes as init starts its work; this once the key is made.
            j.contains("troops: ssh key: make").then_some(j)
        },
    );
    assert!(
        init.contains("troops: seed from EC2 user data (http://169.254.169.254)"),
        "{init}"
    );
    let asked = imds.imds.as_ref().unwrap().log();
    assert!(
        asked.iter().any(|r| r == "PUT /latest/api/token"),
        "{asked:?}"
    );
    assert!(
        asked.iter().any(|r| r == "GET /latest/user-data"),
        "{asked:?}"
    );

    // Until the git server knows a node's key its pulls fail; once it does, the timer
    // deploys with no one touching the node.
    let nodes = ["cloud", "trixie", "preseed", "imds"];
    for name in nodes {
        authorise(&lab, lab.node(name));
    }
    for name in nodes {
        let node = lab.node(name);
        let seen = wait_deployed(node, &c1);
        assert_eq!(seen["hostname"], name);
        let record = record_of(node, &c1, "");
        let journal = node.journal("troops-init.service -u troops-pull.service");
        assert!(
            journal.contains(&format!("e2e: deployed {c1} on {name}")),
            "{name}: deploy.py's output is not in the journal:\n{journal}"
        );
        let roles = match name {
            "preseed" => vec!["db"],
            "imds" => vec!["imds", "web"],
            _ => vec!["web"],
        };
        assert_eq!(seen["roles"], serde_json::json!(roles), "{name}");
        assert_eq!(record["roles"], serde_json::json!(roles), "{name}");
    }
    assert_eq!(deployed(lab.node("trixie")).unwrap()["python"], "3.13");
    assert_eq!(deployed(lab.node("cloud")).unwrap()["python"], "3.11");

    // 2. A new commit on the server: the timer picks it up everywhere.
    let c2 = work.commit("second");
    work.push(&lab, &format!("git@{gitsrv_ip}:deploy"));
    for name in nodes {
        let node = lab.node(name);
        wait_deployed(node, &c2);
        let record = record_of(node, &c2, "");
        assert_eq!(record["previous"], c1.as_str(), "{name}");
        let pulls = node.journal("troops-pull.service");
        assert!(
            pulls.contains(&format!("e2e: deployed {c2} on {name}")),
            "{name}: the deploy of {c2} was not the timer's:\n{pulls}"
        );
        // deploy.py's lines carry the commit and run id as journal fields, so that
        // `journalctl COMMIT=…` finds a deploy's output.
        let by_field = node.ok(&format!(
            "journalctl -u troops-pull.service -o cat --no-pager COMMIT={c2} RUN_ID={}",
            record["id"]
        ));
        assert!(
            by_field.contains(&format!("e2e: deployed {c2} on {name}")),
            "{name}: no journal entry with COMMIT={c2}:\n{by_field}"
        );
    }

    // 3. The admin the seed named pushes to the node over ssh and sees the deploy.
    let c3 = work.commit("third");
    let cloud = lab.node("cloud");
    // With a 10 s timer, a pull may start between the push and its hook and deploy the
    // commit itself; the pusher then sees that run's output (faults.rs tests that case).
    // Here the push is to be the one that deploys, so the timer is stopped first.
    cloud.ok(
        "systemctl stop troops-pull.timer; \
         while [ \"$(systemctl show -P ActiveState troops-pull.service)\" = activating ]; do sleep 0.2; done",
    );
    let said = work.push(
        &lab,
        &format!("ops@{}:/var/lib/troops/repo/main.git", cloud.ip),
    );
    assert!(
        said.contains(&format!("remote: e2e: deployed {c3} on cloud")),
        "the pusher did not see the deploy:\n{said}"
    );
    wait_deployed(cloud, &c3);
    record_of(cloud, &c3, "push by ops");

    // 4. unattended-upgrades installs a newer .deb (this tree, a higher version) while a
    // slow deploy runs: the deploy finishes and is recorded a success, nothing else starts,
    // settings, key, venvs and run history are as they were.
    let imds = lab.node("imds");
    let newer = newer_deb(&deb, &lab.dir);
    fs::copy(&newer.0, imds.path("/var/tmp/troops-newer.deb")).unwrap();
    fs::write(work.dir.join("slow"), "20").unwrap();
    let c4 = work.commit("slow");
    work.push(&lab, &format!("git@{gitsrv_ip}:deploy"));
    wait_for(
        Duration::from_secs(120),
        &format!("imds to start the slow deploy of {c4}"),
        || {
            let out = imds.sh(&format!(
                "grep -l 'e2e: slow deploy of {c4}' /var/lib/troops/runs/*.log"
            ));
            out.status.success().then_some(())
        },
    );
    let state = "sha256sum /etc/troops/troops.toml /var/lib/troops/ssh/id_rsa; \
                 ls /var/lib/troops/venvs; ls /var/lib/troops/runs | grep -E '^[0-9]+\\.json$'";
    let before = imds.ok(state);
    imds.ok("DEBIAN_FRONTEND=noninteractive dpkg -i /var/tmp/troops-newer.deb");
    assert_eq!(
        imds.ok("dpkg-query -W -f '${Version}' troops"),
        newer.1,
        "the upgrade did not install"
    );
    assert_eq!(
        imds.ok("systemctl show -P ActiveState troops-pull.service")
            .trim(),
        "activating",
        "the upgrade stopped the deploy in progress"
    );
    wait_deployed(imds, &c4);
    let record = record_of(imds, &c4, "pull");
    assert_eq!(record["result"], "success", "{record}");
    // A few timer periods later: no run the upgrade started, nothing changed.
    std::thread::sleep(Duration::from_secs(25));
    assert_eq!(
        imds.ok(state),
        before,
        "the upgrade changed the node's state"
    );
    let upgrade_log = imds.journal("troops-pull.service");
    assert!(
        !upgrade_log.contains("interrupted"),
        "a run was interrupted:\n{upgrade_log}"
    );

    // Purge takes what the package made in /etc and its units, and keeps the node's key
    // and repository.
    let preseed = lab.node("preseed");
    preseed.ok("DEBIAN_FRONTEND=noninteractive dpkg --purge troops");
    for gone in [
        "/etc/troops",
        "/etc/systemd/system/troops-pull.timer.d",
        "/lib/systemd/system/troops-pull.timer",
        "/etc/systemd/system/timers.target.wants/troops-pull.timer",
        "/usr/bin/troops",
    ] {
        assert!(!preseed.path(gone).exists(), "purge left {gone}");
    }
    let gitconfig = fs::read_to_string(preseed.path("/etc/gitconfig")).unwrap_or_default();
    assert!(
        !gitconfig.contains("/var/lib/troops"),
        "purge left {gitconfig}"
    );
    assert!(
        preseed.path("/var/lib/troops/ssh/id_rsa").exists(),
        "purge took the node's key"
    );
    assert!(preseed.path("/var/lib/troops/repo/main.git/HEAD").exists());
}
