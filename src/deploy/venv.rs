//! Virtualenvs, content-addressed by what they were built from: the interpreter, the
//! requirements.txt, and the ids of any repo-local paths it names. An unchanged set reuses
//! the venv without running an installer; a changed local package always gets a new one.
//!
//! A venv is not relocatable (pip writes absolute shebangs), so it is built at its final path
//! and only counts once its `.troops-ready` marker exists; a half-built one is removed and
//! built again.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::fsutil;
use crate::settings::Installer;

use super::runner::{self, Invocation};

const READY: &str = ".troops-ready";
/// Bump when the way venvs are made changes, so old ones are not reused.
const RECIPE: &str = "troops-venv-2";

#[derive(Debug, Error)]
pub enum VenvError {
    #[error("interpreter {path}: {source}")]
    Interpreter { path: PathBuf, source: io::Error },
    #[error("failed to create the virtualenv {path}: {message}")]
    Create { path: PathBuf, message: String },
    #[error("requirements.txt failed to install with {installer} (exit {code}); see the run log")]
    Install {
        installer: &'static str,
        code: String,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Everything a venv is built from.
#[derive(Debug, Clone)]
pub struct VenvSpec {
    pub python: PathBuf,
    pub requirements: Option<Vec<u8>>,
    /// `(path as written in requirements.txt, content id)` for every repo-local path.
    pub local_ids: Vec<(String, String)>,
    /// Directory holding `troops.abi3.so`, put on the venv's path by a `.pth` file.
    pub module_dir: PathBuf,
    pub installer: Installer,
    /// How long making the venv and installing into it may take (`deploy_timeout`): an
    /// index that accepts and then stalls must not hold the node for good. Not part of
    /// the key.
    pub timeout: std::time::Duration,
    /// Where the interpreter's shared pip is kept (one per interpreter, built once).
    pub shared: PathBuf,
    /// pip's and uv's download caches live here (`pip/`, `uv/`), shared by every venv.
    pub cache: PathBuf,
}

impl VenvSpec {
    /// The environment installers run with: shared caches, no pip version check (it would
    /// go to PyPI on every run).
    pub fn installer_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "PIP_CACHE_DIR".into(),
                self.cache.join("pip").display().to_string(),
            ),
            (
                "UV_CACHE_DIR".into(),
                self.cache.join("uv").display().to_string(),
            ),
            ("PIP_DISABLE_PIP_VERSION_CHECK".into(), "1".into()),
        ]
    }
}

/// The interpreter's identity without running it: its resolved path, size and mtime change
/// whenever the distribution upgrades it.
fn interpreter_identity(python: &Path) -> Result<String, VenvError> {
    let err = |source| VenvError::Interpreter {
        path: python.to_owned(),
        source,
    };
    let real = fs::canonicalize(python).map_err(err)?;
    let meta = fs::metadata(&real).map_err(err)?;
    Ok(format!(
        "{} {} {}.{}",
        real.display(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    ))
}

pub fn key(spec: &VenvSpec) -> Result<String, VenvError> {
    let mut h = Sha256::new();
    h.update(RECIPE);
    h.update([0]);
    h.update(interpreter_identity(&spec.python)?);
    h.update([0]);
    h.update(spec.module_dir.as_os_str().as_encoded_bytes());
    h.update([0]);
    h.update(spec.requirements.as_deref().unwrap_or(b"\0none"));
    for (path, id) in &spec.local_ids {
        h.update([0]);
        h.update(path);
        h.update([0]);
        h.update(id);
    }
    let digest = h.finalize();
    Ok(digest[..12].iter().map(|b| format!("{b:02x}")).collect())
}

/// Repo-local paths a requirements file names: `./pkg`, `-e ../lib`, `file:./x`,
/// `name @ file:./x`, and the files of `-r`/`-c`. Paths are as written, relative to the
/// repository root (where the installer runs).
pub fn local_paths(requirements: &str) -> Vec<String> {
    let mut paths = Vec::new();
    for raw in requirements.lines() {
        let line = match raw.find(" #") {
            Some(i) => &raw[..i],
            None => raw,
        }
        .trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            // `-r FILE`, `--requirement=FILE`, `-c FILE`: always a path, even without `./`.
            let (names_file, value) = match w {
                "-r" | "--requirement" | "-c" | "--constraint" => (true, words.next()),
                "-e" | "--editable" => (false, words.next()),
                _ => match w.split_once('=') {
                    Some(("--requirement" | "--constraint", v)) => (true, Some(v)),
                    Some(("--editable", v)) => (false, Some(v)),
                    _ => (false, Some(w)),
                },
            };
            let Some(v) = value else { continue };
            let v = v.strip_prefix("file:").unwrap_or(v);
            if v.starts_with("./")
                || v.starts_with("../")
                || v == "."
                || (names_file && !v.contains("://"))
            {
                paths.push(v.to_owned());
            }
        }
    }
    paths.sort();
    paths.dedup();
    paths
}

/// A path as written in requirements.txt, resolved inside the repository; `None` if it
/// leaves it.
pub fn in_repo(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// Find the venv for `spec` in `venvs`, or build it, running the installer in `cwd` (the
/// checkout) with its output sent to `on_line`. Returns the venv's path and whether it was
/// built now.
/// Whether the venv at `dir` still works: its python starts and finds the troops module
/// (found, not imported: importing it reads a node's context).
fn healthy(dir: &Path) -> Result<(), String> {
    let out = Command::new(dir.join("bin/python"))
        .args([
            "-c",
            "import importlib.util, sys; sys.exit(importlib.util.find_spec('troops') is None)",
        ])
        .env_clear()
        .env("PATH", runner::SYSTEM_PATH)
        .env("LANG", "C.UTF-8")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("its python does not start: {e}"))?;
    match out.status.code() {
        Some(0) => Ok(()),
        Some(1) if out.stderr.is_empty() => Err("it cannot find the troops module".into()),
        _ => Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .map_or_else(
                || format!("its python exited with {}", out.status),
                String::from,
            )),
    }
}

pub fn ensure(
    venvs: &Path,
    spec: &VenvSpec,
    cwd: &Path,
    on_line: &mut dyn FnMut(&str),
) -> Result<(PathBuf, bool), VenvError> {
    let key = key(spec)?;
    let dir = venvs.join(&key);
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| VenvError::Io { path, source }
    };
    if dir.join(READY).exists() {
        // Its .pth names the shared pip: a cache someone removed is made again.
        shared_pip(spec, on_line)?;
        match healthy(&dir) {
            Ok(()) => {
                // Touch the marker: pruning keeps the recently used.
                let _ = fs::File::options()
                    .append(true)
                    .open(dir.join(READY))
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                return Ok((dir, false));
            }
            // A deploy.py (or a package upgrade) broke it: build it again, say so.
            Err(why) => {
                on_line(&format!(
                    "troops: the virtualenv {key} is broken ({why}); building it again"
                ));
                tracing::warn!("virtualenv {key} is broken ({why}); rebuilding");
                let _ = fs::remove_file(dir.join(READY));
            }
        }
    }
    fsutil::create_dirs(venvs, 0o755).map_err(io_err(venvs))?;
    if dir.exists() {
        on_line(&format!(
            "troops: removing the unfinished virtualenv {}",
            dir.display()
        ));
        fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    on_line(&format!(
        "troops: building virtualenv {key} with {}",
        spec.python.display()
    ));
    let shared = shared_pip(spec, on_line)?;
    for dir in [spec.cache.join("pip"), spec.cache.join("uv")] {
        fsutil::create_dirs(&dir, 0o700).map_err(io_err(&dir))?;
    }
    // Without ensurepip (seconds, and 25 MB of pip per venv): the interpreter's own pip is
    // shared by every venv through the .pth below, so deploy.py can still `import pip`.
    // Through the runner: its own process group and the timeout.
    let make = Invocation {
        program: spec.python.clone(),
        args: vec![
            "-m".into(),
            "venv".into(),
            "--without-pip".into(),
            dir.display().to_string(),
        ],
        cwd: venvs.to_owned(),
        venv: None,
        env: Vec::new(),
        timeout: Some(spec.timeout),
    };
    let made = runner::run(&make, on_line);
    match made {
        Ok(status) if status.success() => {}
        other => {
            let _ = fs::remove_dir_all(&dir);
            return Err(VenvError::Create {
                path: dir,
                message: match other {
                    Ok(status) => format!("{} -m venv exited with {status}", spec.python.display()),
                    Err(e) => format!("{}: {e}", spec.python.display()),
                },
            });
        }
    }
    let site = site_packages(&dir).map_err(io_err(&dir))?;
    // A .pth's directories come after the venv's own site-packages: a pip the venv installs
    // for itself (an upgrade) wins over the shared one, which pip never touches (it does
    // not uninstall outside the environment).
    let pth = format!("{}\n{}\n", spec.module_dir.display(), shared.display());
    fs::write(site.join("troops.pth"), pth).map_err(io_err(&site))?;

    if spec.requirements.is_some() {
        let python = dir.join("bin/python");
        let (installer, program, args): (&'static str, PathBuf, Vec<String>) =
            match (spec.installer, which("uv")) {
                (Installer::Uv, None) => {
                    return Err(VenvError::Create {
                        path: dir,
                        message: "installer = \"uv\" but uv is not on PATH".into(),
                    });
                }
                (Installer::Auto | Installer::Uv, Some(uv)) => (
                    "uv",
                    uv,
                    vec![
                        "pip".into(),
                        "install".into(),
                        "--python".into(),
                        python.display().to_string(),
                        "-r".into(),
                        "requirements.txt".into(),
                    ],
                ),
                _ => (
                    "pip",
                    python.clone(),
                    [
                        "-m",
                        "pip",
                        "install",
                        "--disable-pip-version-check",
                        "-r",
                        "requirements.txt",
                    ]
                    .map(String::from)
                    .to_vec(),
                ),
            };
        on_line(&format!(
            "troops: installing requirements.txt with {installer}"
        ));
        let inv = Invocation {
            program,
            args,
            cwd: cwd.to_owned(),
            venv: Some(dir.clone()),
            env: spec.installer_env(),
            timeout: Some(spec.timeout),
        };
        let status = runner::run(&inv, on_line).map_err(|source| VenvError::Io {
            path: cwd.to_owned(),
            source,
        })?;
        if !status.success() {
            let _ = fs::remove_dir_all(&dir);
            return Err(VenvError::Install {
                installer,
                code: status
                    .code()
                    .map_or("by a signal".into(), |c| c.to_string()),
            });
        }
    }
    fsutil::write_atomic(&dir.join(READY), key.as_bytes(), 0o644).map_err(io_err(&dir))?;
    Ok((dir, true))
}

fn site_packages(venv: &Path) -> io::Result<PathBuf> {
    for entry in fs::read_dir(venv.join("lib"))? {
        let p = entry?.path().join("site-packages");
        if p.is_dir() {
            return Ok(p);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no lib/python*/site-packages",
    ))
}

/// The interpreter's own pip (and setuptools, where it bundles them, as ensurepip would
/// install), unpacked once from the wheels the interpreter ships, offline, into a
/// directory keyed by the interpreter; every venv of that interpreter puts it on its path.
fn shared_pip(spec: &VenvSpec, on_line: &mut dyn FnMut(&str)) -> Result<PathBuf, VenvError> {
    prepare_shared(&spec.python, &spec.shared, on_line)
}

/// The shared pip of `python` under `shared`, unpacked and byte-compiled if it is not
/// there yet. init starts it in the background, so that the first deploy finds it ready
/// (or waits for it): compiling pip's modules is most of what a cold `pip install` costs.
pub fn prepare_shared(
    python: &Path,
    shared: &Path,
    on_line: &mut dyn FnMut(&str),
) -> Result<PathBuf, VenvError> {
    let spec_python = python;
    let mut h = Sha256::new();
    h.update(RECIPE);
    h.update([0]);
    h.update(interpreter_identity(spec_python)?);
    let id: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = shared.join(&id);
    if dir.join(READY).exists() {
        return Ok(dir);
    }
    let fail = |message: String| VenvError::Create {
        path: dir.clone(),
        message,
    };
    fsutil::create_dirs(shared, 0o755).map_err(|e| fail(e.to_string()))?;
    // init may still be preparing it in the background when the first deploy wants it:
    // one at a time, and the second finds it done.
    let _lock = crate::lock::acquire(&shared.join("lock"), || {
        on_line("troops: waiting for the shared pip, which init is still preparing")
    })
    .map_err(|e| fail(e.to_string()))?;
    if dir.join(READY).exists() {
        return Ok(dir);
    }
    on_line(&format!(
        "troops: unpacking {}'s bundled pip into {}",
        spec_python.display(),
        dir.display()
    ));
    // ensurepip's own wheels: Debian keeps them in /usr/share/python-wheels (its patched
    // ensurepip says where), upstream builds in ensurepip/_bundled.
    const UNPACK: &str = r#"
import ensurepip, glob, os, sys, zipfile
dest = sys.argv[1]
dirs = [d for d in (getattr(ensurepip, "_WHEEL_PKG_DIR", None),
        os.path.join(os.path.dirname(ensurepip.__file__), "_bundled"),
        "/usr/share/python-wheels") if d and os.path.isabs(d)]
found = {}
for d in dirs:
    for name in ("pip", "setuptools"):
        for w in sorted(glob.glob(os.path.join(d, name + "-*.whl"))):
            found.setdefault(name, w)
if "pip" not in found:
    sys.exit("no pip wheel in " + ", ".join(d for d in dirs if d))
for w in found.values():
    zipfile.ZipFile(w).extractall(dest)
import compileall
compileall.compile_dir(dest, quiet=2, workers=0)
# Only a pip that imports from here is marked ready; and only once it is on disk.
sys.path.insert(0, dest)
import pip
os.sync()
print(os.path.basename(found["pip"]))
"#;
    // What an unpack killed halfway left (under the lock: none is running).
    for entry in fs::read_dir(shared).into_iter().flatten().flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!(".{id}."))
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    let tmp = shared.join(format!(".{id}.{}", std::process::id()));
    // From `/`: nothing in whatever directory troops was started from is searched.
    let out = Command::new(spec_python)
        .current_dir("/")
        .args(["-I", "-c", UNPACK])
        .arg(&tmp)
        .env_clear()
        .env("PATH", runner::SYSTEM_PATH)
        .env("LANG", "C.UTF-8")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| fail(format!("{}: {e}", spec_python.display())))?;
    if !out.status.success() {
        let _ = fs::remove_dir_all(&tmp);
        return Err(fail(format!(
            "could not unpack the interpreter's pip: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    fsutil::write_atomic(&tmp.join(READY), &out.stdout, 0o644).map_err(|e| fail(e.to_string()))?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&tmp, &dir).map_err(|e| fail(e.to_string()))?;
    let _ = fsutil::sync_dir(shared);
    Ok(dir)
}

/// Remove every venv without its ready marker: what a run killed while building it left
/// (tens of MB each, and never reused under another key). The caller holds the node lock,
/// so nothing is building one now. Returns the names removed.
pub fn sweep_unfinished(venvs: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(venvs).into_iter().flatten().flatten() {
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && !path.join(READY).exists() && fs::remove_dir_all(&path).is_ok() {
            removed.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    removed
}

/// Remove every ready venv but those in `keep` (the venvs of the last deployed commits and
/// the one in use). Returns the names removed.
pub fn prune(venvs: &Path, keep: &[String]) -> Vec<String> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(venvs).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if path.join(READY).exists() && !keep.contains(&name) && fs::remove_dir_all(&path).is_ok() {
            removed.push(name);
        }
    }
    removed.sort();
    removed
}

/// A content id for a path on disk (a working copy's local package), standing in for the tree
/// id a commit would give: every file's relative path and bytes, in order.
pub fn disk_id(path: &Path) -> io::Result<String> {
    fn walk(base: &Path, dir: &Path, h: &mut Sha256) -> io::Result<()> {
        let meta = fs::symlink_metadata(dir)?;
        if meta.is_file() {
            h.update(fs::read(dir)?);
            return Ok(());
        }
        let mut entries: Vec<PathBuf> = fs::read_dir(dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for p in entries {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            if matches!(name.as_ref(), ".git" | "__pycache__" | "build")
                || name.ends_with(".egg-info")
            {
                continue;
            }
            h.update(
                p.strip_prefix(base)
                    .unwrap_or(&p)
                    .as_os_str()
                    .as_encoded_bytes(),
            );
            h.update([0]);
            if p.is_dir() {
                walk(base, &p, h)?;
            } else {
                h.update(fs::read(&p)?);
            }
        }
        Ok(())
    }
    let mut h = Sha256::new();
    walk(path, path, &mut h)?;
    Ok(h.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_local_paths() {
        let req = "\
--no-index
six==1.16
./pkgs/localpkg
-e ../outside  # a comment
mylib @ file:./libs/mylib
-r extra.txt
--constraint=constraints.txt
https://example.com/x.whl
# ./commented
";
        assert_eq!(
            local_paths(req),
            vec![
                "../outside",
                "./libs/mylib",
                "./pkgs/localpkg",
                "constraints.txt",
                "extra.txt"
            ]
        );
    }

    #[test]
    fn resolves_inside_the_repo() {
        assert_eq!(in_repo("./pkgs/x/").as_deref(), Some("pkgs/x"));
        assert_eq!(in_repo("a/../b").as_deref(), Some("b"));
        assert_eq!(in_repo("../outside"), None);
        assert_eq!(in_repo(".").as_deref(), Some(""));
    }
}
