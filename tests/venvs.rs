//! Virtualenvs without ensurepip: pip stays available to deploy.py through one shared,
//! root-owned pip per interpreter; downloads are cached across venvs; old venvs are pruned.

use std::path::Path;
use std::process::Command;

use crate::util::*;

/// A pure-Python wheel `name-version` holding `name/__init__.py` with VALUE = version.
fn make_wheel(dir: &Path, name: &str, version: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let script = r#"
import base64, hashlib, sys, zipfile, os
d, name, version = sys.argv[1:4]
files = {f"{name}/__init__.py": f"VALUE = {version!r}\n".encode(),
         f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
         f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
rec = []
for p, data in files.items():
    h = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    rec.append(f"{p},sha256={h},{len(data)}")
rec.append(f"{name}-{version}.dist-info/RECORD,,")
files[f"{name}-{version}.dist-info/RECORD"] = ("\n".join(rec) + "\n").encode()
with zipfile.ZipFile(os.path.join(d, f"{name}-{version}-py3-none-any.whl"), "w") as z:
    for p, data in files.items():
        z.writestr(p, data)
"#;
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .arg(dir)
        .args([name, version])
        .status()
        .unwrap();
    assert!(ok.success());
}

fn venvs(node: &Node) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(node.path("var/lib/troops/venvs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn pip_from_deploy_py_installs_into_the_venv_in_all_three_forms() {
    let t = one_remote(&[]);
    let wheels = t.world.path("wheels");
    for n in ["alpha", "beta", "gamma"] {
        make_wheel(&wheels, n, "1.0");
    }
    let w = wheels.display();
    t.up.write(
        "deploy.py",
        &format!(
            r#"import importlib, json, pathlib, subprocess, sys, pip, troops
W = "{w}"
codes = [
    pip.main(["install", "-q", "--no-index", "--find-links", W, "alpha"]),
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", W, "beta"]).returncode,
    subprocess.run("python -m pip install -q --no-index --find-links " + W + " gamma", shell=True).returncode,
]
importlib.invalidate_caches()
out = {{n: importlib.import_module(n).__file__ for n in ["alpha", "beta", "gamma"]}}
out.update(codes=codes, prefix=sys.prefix, pip=pip.__file__)
pathlib.Path(troops.root, "out.json").write_text(json.dumps(out))
"#
        ),
    );
    t.ship("pip three ways");
    t.node.troops(&["pull"]).ok();
    let out: serde_json::Value = serde_json::from_str(&t.node.read("out.json").unwrap()).unwrap();
    assert_eq!(out["codes"], serde_json::json!([0, 0, 0]), "{out}");
    let prefix = out["prefix"].as_str().unwrap();
    for n in ["alpha", "beta", "gamma"] {
        assert!(
            out[n].as_str().unwrap().starts_with(prefix),
            "{n} not in the venv: {out}"
        );
    }
    // pip itself is the shared one: the venv holds none of its own.
    let shared = t.node.path("var/lib/troops/pip");
    assert!(
        out["pip"]
            .as_str()
            .unwrap()
            .starts_with(shared.to_str().unwrap()),
        "{out}"
    );
    // And nothing was installed into the shared pip.
    let listing = Command::new("find").arg(&shared).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        !listing.contains("alpha") && !listing.contains("gamma"),
        "{listing}"
    );
}

#[test]
fn a_venv_that_upgrades_its_own_pip_keeps_working_and_the_shared_pip_stays() {
    let t = one_remote(&[]);
    // The interpreter's own pip wheel, as a newer pip would arrive from an index.
    let wheels = t.world.path("wheels");
    std::fs::create_dir_all(&wheels).unwrap();
    let found = Command::new("sh")
        .arg("-c")
        .arg("ls /usr/share/python-wheels/pip-*.whl /usr/lib/python3*/ensurepip/_bundled/pip-*.whl 2>/dev/null | head -1")
        .output()
        .unwrap();
    let pip_wheel = String::from_utf8_lossy(&found.stdout).trim().to_owned();
    assert!(!pip_wheel.is_empty(), "no pip wheel for the interpreter");
    std::fs::copy(
        &pip_wheel,
        wheels.join(Path::new(&pip_wheel).file_name().unwrap()),
    )
    .unwrap();
    make_wheel(&wheels, "alpha", "1.0");
    let w = wheels.display();
    t.up.write(
        "deploy.py",
        &format!(
            r#"import json, pathlib, subprocess, sys, troops
r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-index", "--find-links", "{w}", "pip"])
import pip
pathlib.Path(troops.root, "upgrade.json").write_text(json.dumps({{"code": r.returncode, "prefix": sys.prefix}}))
"#
        ),
    );
    t.ship("upgrade pip");
    t.node.troops(&["pull"]).ok();
    let up: serde_json::Value =
        serde_json::from_str(&t.node.read("upgrade.json").unwrap()).unwrap();
    assert_eq!(up["code"], 0, "{up}");
    // The next run, in the same venv, uses the venv's own pip and it works.
    t.up.write(
        "deploy.py",
        &format!(
            r#"import json, pathlib, sys, pip, troops
code = pip.main(["install", "-q", "--no-index", "--find-links", "{w}", "alpha"])
pathlib.Path(troops.root, "after.json").write_text(json.dumps({{"code": code, "pip": pip.__file__, "prefix": sys.prefix}}))
"#
        ),
    );
    t.ship("use it");
    t.node.troops(&["pull"]).ok();
    let after: serde_json::Value =
        serde_json::from_str(&t.node.read("after.json").unwrap()).unwrap();
    assert_eq!(after["code"], 0, "{after}");
    assert!(
        after["pip"]
            .as_str()
            .unwrap()
            .starts_with(after["prefix"].as_str().unwrap()),
        "the venv's own pip wins: {after}"
    );
    // The shared pip is still whole: a new venv of the same interpreter gets it.
    let shared_pips = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ls -d {}/*/pip/__init__.py",
            t.node.path("var/lib/troops/pip").display()
        ))
        .output()
        .unwrap();
    assert!(
        shared_pips.status.success(),
        "pip uninstalled the shared pip"
    );
}

#[test]
fn a_requirements_change_downloads_nothing_it_already_had() {
    let t = one_remote(&[]);
    let index = t.world.path("index");
    make_wheel(&index, "alpha", "1.0");
    make_wheel(&index, "beta", "1.0");
    // A real HTTP index on loopback, logging every request.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = t.world.path("index.log");
    let mut server = Command::new("/usr/bin/python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(&index)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // uv: it keeps what it downloaded over plain HTTP too (pip caches HTTPS only).
    let path = format!(
        "{}:{}",
        crate::deploy::uv_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // deploy.py reports where its own pip would cache.
    t.up.write(
        "deploy.py",
        "import json, os, pathlib, troops\npathlib.Path(troops.root, 'env.json').write_text(json.dumps({k: os.environ.get(k) for k in ['PIP_CACHE_DIR', 'UV_CACHE_DIR']}))\n",
    );
    t.up.write(
        "requirements.txt",
        &format!("--no-index\n--find-links http://127.0.0.1:{port}/\nalpha\n"),
    );
    t.ship("alpha");
    t.node.troops_with_path(&["pull"], &path).ok();
    let first = std::fs::read_to_string(&log).unwrap().len();
    t.up.write(
        "requirements.txt",
        &format!("--no-index\n--find-links http://127.0.0.1:{port}/\nalpha\nbeta\n"),
    );
    t.ship("alpha and beta");
    let run = t.node.troops_with_path(&["pull"], &path).ok();
    assert!(run.stdout.contains("building virtualenv"), "{}", run.stdout);
    assert!(run.stdout.contains("with uv"), "{}", run.stdout);
    let _ = server.kill();
    let _ = server.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let (before, after) = text.split_at(first);
    let requests = |part: &str, wheel: &str| {
        part.lines()
            .filter(|l| l.contains(&format!("/{wheel}")))
            .count()
    };
    assert!(requests(before, "alpha-1.0") > 0, "{text}");
    assert!(
        requests(after, "beta-1.0") > 0,
        "beta came from the index: {text}"
    );
    assert_eq!(
        requests(after, "alpha-1.0"),
        0,
        "alpha downloaded again: {after}"
    );
    let env: serde_json::Value = serde_json::from_str(&t.node.read("env.json").unwrap()).unwrap();
    let cache = t.node.path("var/cache/troops");
    for k in ["PIP_CACHE_DIR", "UV_CACHE_DIR"] {
        assert!(
            env[k]
                .as_str()
                .unwrap_or_default()
                .starts_with(cache.to_str().unwrap()),
            "{k}: {env}"
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(cache.join("uv"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the cache is root's only");
}

#[test]
fn old_venvs_are_pruned_and_the_run_says_which() {
    let t = one_remote(&[]);
    t.node.set("keep_venvs", "1");
    t.up.write("deploy.py", &simple_deploy("prune"));
    let mut runs = Vec::new();
    for i in 0..3 {
        // A comment is enough to change the venv's key.
        t.up.write("requirements.txt", &format!("# version {i}\n"));
        t.ship(&format!("reqs {i}"));
        runs.push(t.node.troops(&["pull"]).ok().stdout);
    }
    let left = venvs(&t.node);
    assert_eq!(left.len(), 2, "the one in use and one more: {left:?}");
    assert!(
        runs[2].contains("removed the old virtualenv"),
        "{}",
        runs[2]
    );
    // The one in use is among those kept.
    let in_use = t.node.status()["last_run"]["venv"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(left.contains(&in_use), "{left:?} lacks {in_use}");
}
