//! The `troops` Python module, as deploy.py sees it: through the agent, by hand, and in
//! `troops run`.

use std::process::Command;

use serde_json::Value;

use crate::util::*;

const API_PROBE: &str = r#"
import json, os, pathlib, subprocess, sys
import troops

seen = {}
order = []
# Roles given by host name, at the top level; settings pre-filled "base".
seen["web"] = troops.define_role("web", hosts=["web-*"])          # short name pattern
seen["dc1"] = troops.define_role("dc1", hosts=["*.dc1.example.com"])  # FQDN pattern
seen["exact"] = troops.define_role("exact", hosts=["web-3.dc1.example.com"])
seen["db"] = troops.define_role("db", hosts=["db-*", "other"])
seen["roles_is_set"] = type(troops.roles) is set
seen["have_base"] = troops.have_role("base")
seen["have_db"] = troops.have_role("db")
seen["hostname"] = troops.hostname()
seen["commit"] = troops.commit
seen["previous_commit"] = troops.previous_commit
seen["settings_branch"] = troops.settings["branch"]
seen["executable"] = sys.executable
seen["prefix"] = sys.prefix
seen["base_prefix"] = sys.base_prefix
seen["sub"] = subprocess.run([sys.executable, "-c", "import sys, troops; print(sys.prefix)"],
                             capture_output=True, text=True, check=True).stdout.strip()
# A python started by deploy.py imports troops too, but must not report for it.
seen["results_after_child"] = os.path.exists(os.environ["TROOPS_RESULTS"])
import pip
seen["pip"] = pip.main(["list", "--disable-pip-version-check"])
seen["env_path"] = os.environ["PATH"]
seen["stdin_empty"] = sys.stdin.read() == ""

@troops.deployable
def first():
    order.append("first")

@troops.deployable(roles=["late"])
def needs_late():
    order.append("needs_late")

@troops.deployable(roles=["db"])
def needs_db():
    order.append("needs_db")

@troops.deployable(roles="web")
def needs_web():
    order.append("needs_web")

@troops.deployable
def write_out():
    seen["order"] = order
    seen["roles"] = sorted(troops.roles)
    pathlib.Path(troops.root, "api.json").write_text(json.dumps(seen))

# Added after the deployables were defined: still counts, they run after the top level.
troops.roles.add("late")
"#;

#[test]
fn the_api_as_deploy_py_sees_it() {
    let world = World::new();
    let up = world.upstream("src");
    let remote = world.bare("origin");
    let node = world.node("web-3");
    node.init(&[("origin", &remote)], &["base"]);
    node.set("hostname", "\"web-3.dc1.example.com\"");
    up.write("deploy.py", API_PROBE);
    let first = up.commit("probe");
    up.push(&remote);
    node.troops(&["pull"]).ok();
    let seen: Value = serde_json::from_str(
        &node
            .read("api.json")
            .unwrap_or_else(|| panic!("deploy.py wrote no api.json:\n{}", node.run_log(1))),
    )
    .unwrap();

    assert_eq!(seen["web"], true);
    assert_eq!(seen["dc1"], true);
    assert_eq!(seen["exact"], true);
    assert_eq!(seen["db"], false);
    assert_eq!(seen["roles_is_set"], true);
    assert_eq!(seen["have_base"], true);
    assert_eq!(seen["have_db"], false);
    assert_eq!(seen["hostname"], "web-3.dc1.example.com");
    assert_eq!(seen["commit"], first.as_str());
    assert_eq!(seen["previous_commit"], Value::Null);
    assert_eq!(seen["settings_branch"], "master");
    let venv = node.runs()[0]["venv"].as_str().unwrap().to_owned();
    let venv_dir = node.path(&format!("var/lib/troops/venvs/{venv}"));
    assert_eq!(
        seen["executable"],
        venv_dir.join("bin/python").display().to_string()
    );
    assert_eq!(seen["prefix"], venv_dir.display().to_string());
    assert_eq!(
        seen["sub"],
        venv_dir.display().to_string(),
        "subprocess of sys.executable"
    );
    assert_eq!(
        seen["base_prefix"], "/usr",
        "the venv is not made from Debian's python"
    );
    assert_eq!(
        seen["results_after_child"], false,
        "a child python wrote the run's results"
    );
    assert_eq!(seen["pip"], 0, "pip.main failed inside deploy.py");
    assert!(
        seen["env_path"]
            .as_str()
            .unwrap()
            .starts_with(&venv_dir.join("bin").display().to_string())
    );
    assert_eq!(seen["stdin_empty"], true);
    assert_eq!(
        seen["order"],
        serde_json::json!(["first", "needs_late", "needs_web"])
    );
    assert_eq!(
        seen["roles"],
        serde_json::json!(["base", "dc1", "exact", "late", "web"])
    );

    let run = &node.runs()[0];
    let statuses: Vec<(String, String)> = run["deployables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().into(),
                d["status"].as_str().unwrap().into(),
            )
        })
        .collect();
    let expect = [
        ("first", "ran"),
        ("needs_late", "ran"),
        ("needs_db", "skipped"),
        ("needs_web", "ran"),
        ("write_out", "ran"),
    ];
    assert_eq!(
        statuses,
        expect.map(|(a, b)| (a.to_string(), b.to_string()))
    );
    assert_eq!(
        run["roles"],
        serde_json::json!(["base", "dc1", "exact", "late", "web"])
    );

    // A second commit sees the first as its previous commit.
    up.write("deploy.py", "import pathlib, troops\npathlib.Path(troops.root, 'prev').write_text(troops.previous_commit)\n");
    up.commit("second");
    up.push(&remote);
    node.troops(&["pull"]).ok();
    assert_eq!(node.read("prev").as_deref(), Some(first.as_str()));
}

#[test]
fn a_failing_deployable_fails_the_run_and_stops_the_rest() {
    let t = one_remote(&[]);
    t.up.write(
        "deploy.py",
        "import troops\n@troops.deployable\ndef one():\n    print('one ran')\n@troops.deployable\ndef two():\n    raise RuntimeError('disk on fire')\n@troops.deployable\ndef three():\n    print('three ran')\n",
    );
    t.ship("x");
    let out = t.node.troops(&["pull"]).failed();
    assert!(
        out.stderr.contains("deployable two failed") && out.stderr.contains("disk on fire"),
        "{}",
        out.stderr
    );
    assert!(
        out.stdout.contains("one ran") && !out.stdout.contains("three ran"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("Traceback"), "{}", out.stdout);
    let run = &t.node.runs()[0];
    assert_eq!(run["result"], "failed");
    let d = run["deployables"].as_array().unwrap();
    assert_eq!(d[0]["status"], "ran");
    assert_eq!(d[1]["status"], "failed");
    assert_eq!(d[2]["status"], "skipped");
    assert_eq!(t.node.deployed(), None);
}

#[test]
fn an_exception_at_the_top_level_skips_every_deployable() {
    let t = one_remote(&[]);
    t.up.write("deploy.py", "import troops\n@troops.deployable\ndef never():\n    print('NEVER')\n\nx = {}\nx['missing']\n");
    t.ship("x");
    let out = t.node.troops(&["pull"]).failed();
    assert!(!out.stdout.contains("NEVER"), "{}", out.stdout);
    assert!(
        out.stderr.contains("KeyError: 'missing'"),
        "the one-line error quotes the exception: {}",
        out.stderr
    );
    // The traceback points at deploy.py's own line.
    assert!(
        t.node.run_log(1).contains("deploy.py\", line 7"),
        "{}",
        t.node.run_log(1)
    );
    assert_eq!(t.node.runs()[0]["deployables"][0]["status"], "skipped");
}

#[test]
fn by_hand_the_module_reads_the_node_and_runs_deployables_at_exit() {
    let t = one_remote(&["web", "cache"]);
    t.up.write(
        "deploy.py",
        "import sys, troops\nprint('roles', sorted(troops.roles), 'commit', troops.commit)\n@troops.deployable(roles=['web'])\ndef web():\n    print('web deployable ran')\n@troops.deployable(roles=['db'])\ndef db():\n    print('db ran')\n",
    );
    let head = t.ship("x");
    t.node.troops(&["pull"]).ok();
    let venv = t.node.runs()[0]["venv"].as_str().unwrap().to_owned();
    let python = t
        .node
        .path(&format!("var/lib/troops/venvs/{venv}/bin/python"));
    let out = Command::new(python)
        .arg("deploy.py")
        .current_dir(t.node.path(&format!("var/lib/troops/work/{head}")))
        .env_clear()
        .env("TROOPS_ROOT", &t.node.root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("roles ['cache', 'web'] commit None"),
        "{stdout}"
    );
    assert!(stdout.contains("web deployable ran"), "{stdout}");
    assert!(
        stdout.contains("troops: deployable db: skipped (needs role db)"),
        "{stdout}"
    );
    assert!(!stdout.contains("db ran"), "{stdout}");
}

#[test]
fn troops_run_uses_a_working_copy_and_no_node_state() {
    let world = World::new();
    let up = world.upstream("wc");
    up.write("deploy.py", "import troops\nprint('roles', sorted(troops.roles), 'host', troops.hostname())\n@troops.deployable(roles=['web'])\ndef web():\n    print('web ran')\n");
    let root = world.path("untouched");
    let out: Run = Command::new(TROOPS)
        .args(["--root", root.to_str().unwrap(), "run"])
        .arg(&up.dir)
        .args(["--role", "web", "--hostname", "web-1.example.com"])
        .env("XDG_CACHE_HOME", world.path("cache"))
        .output()
        .unwrap()
        .into();
    let out = out.ok();
    assert!(
        out.stdout.contains("roles ['web'] host web-1.example.com"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("web ran"), "{}", out.stdout);
    assert!(!root.exists(), "troops run wrote node state");
}

/// `troops pull` in a mount and UTS namespace of its own, with `hostname` as the machine's
/// name and `hosts` bind-mounted over /etc/hosts: the host's own files are never touched.
fn pull_as_host(node: &Node, hostname: &str, hosts: &str, dir: &std::path::Path) -> Run {
    let file = dir.join(format!("hosts-{hostname}"));
    std::fs::write(&file, hosts).unwrap();
    let script = format!(
        "hostname {hostname} && mount --bind {} /etc/hosts && exec {} --root {} pull",
        file.display(),
        node.exe.display(),
        node.root.display()
    );
    std::process::Command::new("unshare")
        .args([
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ])
        .output()
        .expect("unshare runs")
        .into()
}

#[test]
fn hostname_is_what_hostname_fqdn_says_even_when_localhost_comes_first() {
    let t = one_remote(&[]);
    t.up.write(
        "deploy.py",
        "import pathlib, troops\nweb = troops.define_role('web', hosts=['web-*'])\npathlib.Path(troops.root, 'seen').write_text(f'{troops.hostname()} {web}')\n",
    );
    t.ship("who am i");
    // The common container/VM layout: 127.0.0.1 names localhost first, then the machine.
    pull_as_host(
        &t.node,
        "web-7",
        "127.0.0.1 localhost\n127.0.0.1 web-7\n",
        &t.world.path(""),
    )
    .ok();
    assert_eq!(t.node.read("seen").as_deref(), Some("web-7 True"));
    // Debian's layout: the FQDN on 127.0.1.1.
    t.up.write("x", "2");
    t.ship("again");
    pull_as_host(
        &t.node,
        "web-7",
        "127.0.0.1 localhost\n127.0.1.1 web-7.example.com web-7\n",
        &t.world.path(""),
    )
    .ok();
    assert_eq!(
        t.node.read("seen").as_deref(),
        Some("web-7.example.com True")
    );
    // The setting still wins.
    t.node.set("hostname", "\"db-1.example.com\"");
    t.up.write("x", "3");
    t.ship("named");
    pull_as_host(
        &t.node,
        "web-7",
        "127.0.0.1 localhost web-7\n",
        &t.world.path(""),
    )
    .ok();
    assert_eq!(
        t.node.read("seen").as_deref(),
        Some("db-1.example.com False")
    );
}
