//! The deploy pipeline: checkouts, venvs, failures and retries, interruption.

use std::path::{Path, PathBuf};

use std::time::Duration;

use crate::util::*;

/// A local package built by an in-tree PEP 517 backend (no index needed) that counts its
/// builds in `counter`, so a test can tell whether an installer ran.
fn local_package(up: &Upstream, counter: &Path, value: &str) {
    up.write("pkg/pyproject.toml", "[build-system]\nrequires = []\nbuild-backend = \"backend\"\nbackend-path = [\"_build\"]\n\n[project]\nname = \"pkg\"\nversion = \"1.0\"\n");
    up.write("pkg/pkg/__init__.py", &format!("VALUE = {value:?}\n"));
    up.write(
        "pkg/_build/backend.py",
        &format!(
            r#"import os, zipfile, hashlib, base64
def get_requires_for_build_wheel(config_settings=None):
    return []
def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with open({counter:?}, "a") as f:
        f.write("build\n")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = {{"pkg/__init__.py": open(os.path.join(here, "pkg/__init__.py"), "rb").read(),
             "pkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n",
             "pkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}}
    rec = []
    for p, d in files.items():
        h = base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b"=").decode()
        rec.append(f"{{p}},sha256={{h}},{{len(d)}}")
    rec.append("pkg-1.0.dist-info/RECORD,,")
    files["pkg-1.0.dist-info/RECORD"] = ("\n".join(rec) + "\n").encode()
    name = "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as z:
        for p, d in files.items():
            z.writestr(p, d)
    return name
"#,
            counter = counter.display().to_string()
        ),
    );
}

fn builds(counter: &Path) -> usize {
    std::fs::read_to_string(counter).map_or(0, |s| s.lines().count())
}

#[test]
fn venvs_are_reused_rebuilt_and_never_stale() {
    let t = one_remote(&[]);
    let counter = t.world.path("builds");
    local_package(&t.up, &counter, "first");
    t.up.write("requirements.txt", "--no-index\n./pkg\n");
    t.up.write(
        "deploy.py",
        "import pathlib, pkg, troops\nprint('pkg says', pkg.VALUE)\npathlib.Path(troops.root, 'value').write_text(pkg.VALUE)\n",
    );
    t.ship("with a local package");
    t.node.troops(&["pull"]).ok();
    assert_eq!(t.node.read("value").as_deref(), Some("first"));
    assert_eq!(builds(&counter), 1);
    let first_venv = t.node.runs()[0]["venv"].clone();

    // deploy.py changes, requirements do not: same venv, no installer at all.
    t.up.write("deploy.py", "import pathlib, pkg, troops\nprint('again', pkg.VALUE)\npathlib.Path(troops.root, 'value').write_text(pkg.VALUE + '!')\n");
    t.ship("only deploy.py");
    let out = t.node.troops(&["pull"]).ok();
    assert_eq!(t.node.read("value").as_deref(), Some("first!"));
    assert_eq!(
        builds(&counter),
        1,
        "an installer ran for unchanged requirements"
    );
    assert!(out.stdout.contains("reusing virtualenv"), "{}", out.stdout);
    assert!(
        !out.stdout.contains("installing requirements"),
        "{}",
        out.stdout
    );
    assert_eq!(t.node.runs()[1]["venv"], first_venv);

    // The local package changes, requirements.txt does not: a new venv, and the new code runs.
    local_package(&t.up, &counter, "second");
    t.ship("new package code");
    t.node.troops(&["pull"]).ok();
    assert_eq!(t.node.read("value").as_deref(), Some("second!"));
    assert_eq!(builds(&counter), 2);
    assert_ne!(t.node.runs()[2]["venv"], first_venv);

    // requirements.txt itself changes: a new venv again.
    t.up.write("requirements.txt", "--no-index\n./pkg  # pinned by path\n");
    t.ship("requirements change");
    t.node.troops(&["pull"]).ok();
    assert_eq!(builds(&counter), 3);
}

#[test]
fn no_file_of_an_old_checkout_survives() {
    let t = one_remote(&[]);
    t.up.write("deploy.py", "import os\nprint(sorted(os.listdir('.')))\nassert not os.path.exists('old.txt')\nopen('scribble', 'w').write('x')\n");
    t.up.write("new.txt", "n");
    t.ship("one");
    t.node.troops(&["pull"]).ok();
    t.up.write("old.txt", "o");
    t.ship("adds old.txt");
    // deploy.py asserts old.txt is absent: this run fails on purpose.
    t.node.troops(&["pull"]).failed();
    t.up.remove("old.txt");
    let three = t.ship("removes old.txt");
    let out = t.node.troops(&["pull"]).ok();
    assert!(
        !out.stdout.contains("scribble"),
        "a previous run's file leaked: {}",
        out.stdout
    );
    let work: Vec<String> = std::fs::read_dir(t.node.path("var/lib/troops/work"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".manifest.json")
        .collect();
    assert_eq!(work, vec![three], "only the current checkout is kept");
}

/// deploy.py that prints every path under its checkout with its kind, mode and contents:
/// what a checkout holds, to compare an updated one with a fresh one.
const LIST_TREE: &str = r#"import os, stat
def walk(top):
    for root, dirs, files in os.walk(top):
        for name in sorted(dirs + files):
            p = os.path.join(root, name)
            rel = os.path.relpath(p, top)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                yield "%s link %s" % (rel, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                yield "%s dir" % rel
            else:
                yield "%s file %o %s" % (rel, st.st_mode & 0o111, open(p).read().strip())
for line in sorted(set(walk("."))):
    print("tree:", line)
"#;

fn tree_lines(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("tree:")).collect()
}

#[test]
fn the_last_checkout_is_updated_in_place_only_when_untouched() {
    use std::os::unix::fs::PermissionsExt;
    let t = one_remote(&[]);
    let exec = |rel: &str, on: bool| {
        let p = t.up.dir.join(rel);
        let mode = if on { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    t.up.write("deploy.py", LIST_TREE);
    t.up.write("a.txt", "a1")
        .write("sub/b.txt", "b1")
        .write("run.sh", "r1");
    t.up.write("x", "a file that becomes a directory");
    exec("run.sh", true);
    std::os::unix::fs::symlink("a.txt", t.up.dir.join("link")).unwrap();
    t.ship("one");
    let first = t.node.troops(&["pull"]).ok();
    assert!(!first.stdout.contains("in place"), "{}", first.stdout);

    // Every kind of change at once.
    t.up.write("a.txt", "a2").write("new/c.txt", "c1");
    t.up.remove("sub/b.txt").remove("x");
    t.up.write("x/y.txt", "now a directory");
    exec("run.sh", false);
    std::fs::remove_file(t.up.dir.join("link")).unwrap();
    std::os::unix::fs::symlink("new/c.txt", t.up.dir.join("link")).unwrap();
    let two = t.ship("two");
    let updated = t.node.troops(&["pull"]).ok();
    assert!(
        updated
            .stdout
            .contains("updated the last checkout in place"),
        "{}",
        updated.stdout
    );
    // The same tree as a fresh checkout of the same commit gives.
    let fresh = t.world.path("fresh");
    git(
        &t.world.path(""),
        &[
            "clone",
            "-q",
            t.remote.to_str().unwrap(),
            fresh.to_str().unwrap(),
        ],
    );
    std::fs::remove_dir_all(fresh.join(".git")).unwrap();
    let listed = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(LIST_TREE)
        .current_dir(&fresh)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(tree_lines(&updated.stdout), tree_lines(&listed));
    assert!(!listed.contains("tree: sub") && listed.contains("tree: x/y.txt file"));
    assert_eq!(t.node.deployed().as_deref(), Some(two.as_str()));

    // A deploy that changes its checkout (a tracked file rewritten to the same size at
    // once, so only its ctime tells; an untracked file and directory; a tracked file
    // replaced by a symlink): the next checkout holds none of it.
    t.up.write(
        "deploy.py",
        &format!(
            "{LIST_TREE}\nimport os\nopen('a.txt', 'w').write('zz')\nopen('stray', 'w').write('s')\n\
             os.makedirs('junk/deeper')\nos.remove('new/c.txt')\nos.symlink('/etc/hostname', 'new/c.txt')\n"
        ),
    );
    t.ship("scribbles");
    t.node.troops(&["pull"]).ok();
    t.up.write("deploy.py", LIST_TREE);
    t.ship("four");
    let after = t.node.troops(&["pull"]).ok();
    assert!(
        after.stdout.contains("2 left by the last run removed"),
        "{}",
        after.stdout
    );
    for line in ["tree: a.txt file 0 a2", "tree: new/c.txt file 0 c1"] {
        assert!(after.stdout.contains(line), "{line}: {}", after.stdout);
    }
    assert!(!after.stdout.contains("stray"), "{}", after.stdout);
    assert!(!after.stdout.contains("junk"), "{}", after.stdout);
    // Nothing was written through the symlink.
    assert_ne!(
        std::fs::read_to_string("/etc/hostname").unwrap().trim(),
        "c1"
    );
}

#[test]
fn a_failed_deploy_is_retried_with_backoff_and_a_fix_goes_out_at_once() {
    let t = one_remote(&[]);
    t.up.write("deploy.py", &simple_deploy("good"));
    let good = t.ship("good");
    t.node.troops(&["pull"]).ok();

    t.up.write(
        "deploy.py",
        "import sys\nprint('about to fail')\nsys.exit(3)\n",
    );
    let bad = t.ship("bad");
    let out = t.node.troops(&["pull"]).failed();
    assert!(
        out.stderr.contains("deploy.py exited with status 3"),
        "{}",
        out.stderr
    );
    assert_eq!(
        t.node.deployed().as_deref(),
        Some(good.as_str()),
        "a failed deploy moved deployed"
    );
    assert_eq!(t.node.head().as_deref(), Some(bad.as_str()));
    let runs = t.node.runs();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1]["result"], "failed");
    assert_eq!(runs[1]["exit_code"], 3);
    assert!(t.node.run_log(2).contains("about to fail"));

    // Within the backoff: no new attempt, and status says when.
    let out = t.node.troops(&["pull"]).ok();
    assert!(out.stdout.contains("next attempt after"), "{}", out.stdout);
    assert_eq!(t.node.runs().len(), 2);
    assert!(
        t.node
            .troops(&["status"])
            .ok()
            .stdout
            .contains("waiting   deploy of")
    );

    // Once the backoff has passed, it is tried again.
    t.node.set("retry_min", "1");
    std::thread::sleep(Duration::from_millis(1100));
    t.node.troops(&["pull"]).failed();
    assert_eq!(t.node.runs().len(), 3);
    // The second failure doubles the wait: an immediate pull does not retry.
    t.node.troops(&["pull"]).ok();
    assert_eq!(t.node.runs().len(), 3);

    // A newer commit is deployed at once, whatever the backoff.
    t.up.write("deploy.py", &simple_deploy("fixed"));
    let fixed = t.ship("fixed");
    t.node.troops(&["pull"]).ok();
    assert_eq!(t.node.deployed().as_deref(), Some(fixed.as_str()));
    assert_eq!(t.node.read("out/tag").as_deref(), Some("fixed"));
    assert_eq!(t.node.runs().last().unwrap()["result"], "success");
}

#[test]
fn troops_deploy_runs_the_head_again_now() {
    let t = one_remote(&[]);
    t.up.write("deploy.py", "import pathlib, troops\np = pathlib.Path(troops.root, 'count')\np.write_text(str(int(p.read_text()) + 1 if p.exists() else 1))\n");
    t.ship("count");
    t.node.troops(&["pull"]).ok();
    t.node.troops(&["deploy"]).ok();
    assert_eq!(t.node.read("count").as_deref(), Some("2"));
    let runs = t.node.runs();
    assert_eq!(runs[1]["trigger"], "deploy");
    assert_eq!(runs[1]["previous"], runs[1]["commit"]);
}

#[test]
fn a_deploy_killed_mid_run_is_deployed_again_and_nothing_is_corrupt() {
    let t = one_remote(&[]);
    let gate = t.world.path("gate");
    std::fs::write(&gate, "").unwrap();
    t.up.write(
        "deploy.py",
        &format!(
            "import os, time, pathlib, troops\nprint('started', flush=True)\nwhile os.path.exists({gate:?}):\n    time.sleep(0.1)\npathlib.Path(troops.root, 'done').write_text(troops.commit)\n",
            gate = gate.display().to_string()
        ),
    );
    let head = t.ship("slow");
    let mut pull = t.node.spawn(&["pull"]);
    t.node.wait_for_log(1, "started");
    pull.kill().unwrap(); // SIGKILL
    pull.wait().unwrap();
    // deploy.py dies with the agent rather than running on unobserved.
    std::thread::sleep(Duration::from_millis(500));
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&ps.stdout).contains(t.node.root.to_str().unwrap()),
        "deploy.py outlived the agent"
    );
    assert_eq!(t.node.deployed(), None);
    assert_eq!(t.node.read("done"), None);

    std::fs::remove_file(&gate).unwrap();
    t.node.troops(&["pull"]).ok();
    assert_eq!(t.node.deployed().as_deref(), Some(head.as_str()));
    assert_eq!(t.node.read("done").as_deref(), Some(head.as_str()));
    let runs = t.node.runs();
    assert_eq!(runs[0]["result"], "interrupted");
    assert_eq!(runs[1]["result"], "success");
    t.node.fsck();
}

#[test]
fn run_records_are_kept_to_the_limit() {
    let t = one_remote(&[]);
    t.up.write("deploy.py", "print('hi')\n");
    t.ship("one");
    t.node.set("keep_runs", "3");
    t.node.troops(&["pull"]).ok();
    for _ in 0..4 {
        t.node.troops(&["deploy"]).ok();
    }
    let ids: Vec<u64> = t
        .node
        .runs()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![3, 4, 5]);
    assert!(!t.node.path("var/lib/troops/runs/1.log").exists());
    let listing = t.node.troops(&["log"]).ok().stdout;
    assert!(
        listing.lines().next().unwrap().starts_with("run 5 "),
        "newest first: {listing}"
    );
}

/// uv, as dev/test installs it (target/tools), else from PATH.
pub fn uv_dir() -> PathBuf {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin");
    if tools.join("uv").is_file() {
        return tools;
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .find(|d| d.join("uv").is_file())
        .expect("uv is needed for this test: ./dev/test installs it into target/tools")
}

#[test]
fn uv_installs_when_it_is_on_path_unless_settings_say_pip() {
    let t = one_remote(&[]);
    let counter = t.world.path("builds");
    local_package(&t.up, &counter, "via-uv");
    t.up.write("requirements.txt", "--no-index\n./pkg\n");
    t.up.write(
        "deploy.py",
        "import pathlib, pkg, troops\npathlib.Path(troops.root, 'value').write_text(pkg.VALUE)\n",
    );
    t.ship("uv");
    let path = format!(
        "{}:{}",
        uv_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = t.node.troops_with_path(&["pull"], &path).ok();
    assert!(
        out.stdout.contains("installing requirements.txt with uv"),
        "{}",
        out.stdout
    );
    assert_eq!(t.node.read("value").as_deref(), Some("via-uv"));
    assert_eq!(builds(&counter), 1);

    t.node.set("installer", "\"pip\"");
    local_package(&t.up, &counter, "via-pip");
    t.ship("pip");
    let out = t.node.troops_with_path(&["pull"], &path).ok();
    assert!(
        out.stdout.contains("installing requirements.txt with pip"),
        "{}",
        out.stdout
    );
    assert_eq!(t.node.read("value").as_deref(), Some("via-pip"));
}
