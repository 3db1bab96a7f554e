//! The checkout a deploy runs in, `work/<commit>`: exactly the commit's tree, nothing else.
//!
//! A fresh checkout of a large tree costs more than the rest of a deploy, so the last
//! checkout is kept with a manifest of what was written into it: each file's blob id and
//! the stat data it had right after. The next deploy brings that checkout to the new commit
//! the way `git reset --hard` and `git clean -fdx` would: whatever the last run added is
//! removed, whatever it touched (its ctime moved) is written again, and of the rest only
//! the files that differ between the two commits are rewritten. Without a manifest (a run
//! that died mid-update leaves none) the tree is checked out afresh.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::repo::{CommitId, FileKind, Repo, TreeFile};

const MANIFEST: &str = ".manifest.json";

/// ext4 and tmpfs stamp ctime from a coarse clock, and some filesystems only to the second:
/// a file changed within this long of the manifest could keep the ctime it had, so its
/// contents are compared instead (git's "racily clean" entries).
const RACY_NS: i64 = 2_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    path: String,
    exec: bool,
    symlink: bool,
    id: String,
    size: u64,
    ino: u64,
    ctime_ns: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    commit: String,
    entries: Vec<Entry>,
}

/// How the checkout came to be, for the run log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Made {
    Fresh,
    /// Updated in place from the previous checkout: files written or removed, and what
    /// the last run had added to it (removed).
    Updated {
        changed: usize,
        removed: usize,
    },
}

/// Make `work/<commit>`. Checkouts other than the one reused are moved aside at once and
/// deleted by the returned thread while the deploy runs.
pub fn materialise(
    repo: &Repo,
    commit: CommitId,
    work: &Path,
) -> Result<(PathBuf, Made, std::thread::JoinHandle<()>), String> {
    fsutil::create_dirs(work, 0o750).map_err(|e| format!("{}: {e}", work.display()))?;
    let dest = work.join(commit.to_string());
    let manifest_path = work.join(MANIFEST);
    let previous = read_manifest(&manifest_path);
    // The manifest describes one checkout at a time: gone before anything changes, so a
    // run that dies from here on can never trust a half-updated tree.
    let _ = fs::remove_file(&manifest_path);
    let reusable = previous.and_then(|(m, taken_ns)| {
        let dir = work.join(&m.commit);
        let left = reconcile(&dir, &m, taken_ns, repo).ok()?;
        Some((dir, m, left))
    });

    let keep = reusable.as_ref().map(|(dir, _, _)| dir.clone());
    let mut doomed = Vec::new();
    for entry in fs::read_dir(work).into_iter().flatten().flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if Some(&path) == keep.as_ref() {
            continue;
        }
        if name.starts_with(".trash-") {
            doomed.push(path);
            continue;
        }
        let aside = work.join(format!(".trash-{name}-{}", std::process::id()));
        match fs::rename(&path, &aside) {
            Ok(()) => doomed.push(aside),
            Err(_) => doomed.push(path),
        }
    }
    let cleaner = std::thread::spawn(move || {
        for d in doomed {
            let _ = fs::remove_dir_all(&d).or_else(|_| fs::remove_file(&d));
        }
    });

    let files = repo.files(commit).map_err(|e| e.to_string())?;
    // Trees with submodules are always checked out fresh, and get no manifest.
    let plain = files.iter().all(|f| f.kind != FileKind::Other);
    let (made, written) = match reusable {
        Some((dir, old, left)) if plain => {
            let changed = update_in_place(repo, &dir, &old, &files, &left.stale)
                .map_err(|e| format!("{}: failed to update in place: {e}", dir.display()))?;
            if dir != dest {
                fs::rename(&dir, &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
            }
            let made = Made::Updated {
                changed: changed.len(),
                removed: left.removed,
            };
            (made, Some((old, changed)))
        }
        other => {
            if let Some((dir, _, _)) = other {
                let _ = fs::remove_dir_all(dir);
            }
            let tmp = work.join(format!(".tmp-{commit}"));
            let _ = fs::remove_dir_all(&tmp);
            repo.checkout(commit, &tmp).map_err(|e| e.to_string())?;
            fs::rename(&tmp, &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
            (Made::Fresh, None)
        }
    };
    fsutil::sync_dir(work).map_err(|e| format!("{}: {e}", work.display()))?;

    if plain {
        let entries = match written {
            // Only what was rewritten needs a new stat; the rest is as it was.
            Some((old, changed)) => {
                let old: BTreeMap<&str, &Entry> =
                    old.entries.iter().map(|e| (e.path.as_str(), e)).collect();
                files
                    .iter()
                    .map(|f| match old.get(f.path.as_str()) {
                        Some(e) if !changed.contains(&f.path) => Ok((*e).clone()),
                        _ => entry_for(&dest, f),
                    })
                    .collect::<io::Result<Vec<_>>>()
            }
            None => files.iter().map(|f| entry_for(&dest, f)).collect(),
        };
        // Without a manifest the next deploy checks out fresh: slower, never wrong.
        if let Ok(entries) = entries {
            let manifest = Manifest {
                commit: commit.to_string(),
                entries,
            };
            if let Ok(json) = serde_json::to_vec(&manifest) {
                let _ = fsutil::write_atomic(&manifest_path, &json, 0o644);
            }
        }
    }
    Ok((dest, made, cleaner))
}

fn read_manifest(path: &Path) -> Option<(Manifest, i64)> {
    let bytes = fs::read(path).ok()?;
    let taken = fs::symlink_metadata(path).ok()?;
    let manifest = serde_json::from_slice(&bytes).ok()?;
    Some((manifest, taken.mtime() * 1_000_000_000 + taken.mtime_nsec()))
}

fn entry_for(root: &Path, f: &TreeFile) -> io::Result<Entry> {
    let meta = fs::symlink_metadata(root.join(&f.path))?;
    Ok(Entry {
        path: f.path.clone(),
        exec: f.kind == FileKind::Executable,
        symlink: f.kind == FileKind::Symlink,
        id: f.id.clone(),
        size: meta.size(),
        ino: meta.ino(),
        ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
    })
}

/// What the last run left in `dir` beside the manifest's files.
struct Leftovers {
    /// Tracked files that are gone or were touched: to be written again.
    stale: BTreeSet<String>,
    /// Files and directories the tree does not have, now removed.
    removed: usize,
}

/// Remove from `dir` what the manifest does not list and find the listed files that are
/// no longer as written. An error means the checkout cannot be trusted.
fn reconcile(dir: &Path, manifest: &Manifest, taken_ns: i64, repo: &Repo) -> io::Result<Leftovers> {
    let expected: BTreeMap<&str, &Entry> = manifest
        .entries
        .iter()
        .map(|e| (e.path.as_str(), e))
        .collect();
    let mut dirs: BTreeSet<&str> = BTreeSet::new();
    for path in expected.keys() {
        let mut p = *path;
        while let Some((parent, _)) = p.rsplit_once('/') {
            if !dirs.insert(parent) {
                break;
            }
            p = parent;
        }
    }
    let mut out = Leftovers {
        stale: BTreeSet::new(),
        removed: 0,
    };
    let mut intact: BTreeSet<&str> = BTreeSet::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, rel)) = stack.pop() {
        for entry in fs::read_dir(&path)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let rel = if rel.is_empty() {
                name.into_owned()
            } else {
                format!("{rel}/{name}")
            };
            // Never follows a symlink: a link the last run left is removed, not entered.
            let meta = entry.metadata()?;
            if meta.is_dir() {
                if dirs.contains(rel.as_str()) {
                    stack.push((entry.path(), rel));
                } else {
                    fs::remove_dir_all(entry.path())?;
                    out.removed += 1;
                }
                continue;
            }
            let Some((key, e)) = expected.get_key_value(rel.as_str()) else {
                fs::remove_file(entry.path())?;
                out.removed += 1;
                continue;
            };
            let ctime_ns = meta.ctime() * 1_000_000_000 + meta.ctime_nsec();
            let as_written = meta.ino() == e.ino
                && meta.size() == e.size
                && ctime_ns == e.ctime_ns
                && meta.file_type().is_symlink() == e.symlink
                && (e.ctime_ns + RACY_NS < taken_ns || same_content(&entry.path(), e, repo));
            if as_written {
                intact.insert(key);
            } else {
                fs::remove_file(entry.path())?;
                out.stale.insert(rel);
            }
        }
    }
    for path in expected.keys() {
        if !intact.contains(path) {
            out.stale.insert((*path).to_owned());
        }
    }
    Ok(out)
}

fn same_content(path: &Path, e: &Entry, repo: &Repo) -> bool {
    let data = if e.symlink {
        match fs::read_link(path) {
            Ok(t) => t.into_os_string().into_encoded_bytes(),
            Err(_) => return false,
        }
    } else {
        match fs::read(path) {
            Ok(d) => d,
            Err(_) => return false,
        }
    };
    repo.blob_id(&data) == e.id
}

/// Rewrite the files that differ between the old manifest and `files`; the paths touched.
fn update_in_place(
    repo: &Repo,
    dir: &Path,
    old: &Manifest,
    files: &[TreeFile],
    stale: &BTreeSet<String>,
) -> io::Result<BTreeSet<String>> {
    let new: BTreeMap<&str, &TreeFile> = files.iter().map(|f| (f.path.as_str(), f)).collect();
    let same = |e: &Entry, f: &TreeFile| {
        e.id == f.id
            && e.exec == (f.kind == FileKind::Executable)
            && e.symlink == (f.kind == FileKind::Symlink)
    };
    let mut touched = BTreeSet::new();
    // Removals first: a file may give way to a directory of the same name.
    for e in &old.entries {
        if new.get(e.path.as_str()).is_none_or(|f| !same(e, f)) {
            let path = dir.join(&e.path);
            remove_if_there(&path)?;
            touched.insert(e.path.clone());
            let mut parent = path.parent();
            while let Some(p) = parent.filter(|p| *p != dir) {
                if fs::remove_dir(p).is_err() {
                    break;
                }
                parent = p.parent();
            }
        }
    }
    let old: BTreeMap<&str, &Entry> = old.entries.iter().map(|e| (e.path.as_str(), e)).collect();
    for f in files {
        if old.get(f.path.as_str()).is_some_and(|e| same(e, f)) && !stale.contains(&f.path) {
            continue;
        }
        let path = dir.join(&f.path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        // Never write through whatever is there (a symlink the last run made, say).
        remove_if_there(&path)?;
        let data = repo
            .blob(&f.id)
            .map_err(|e| io::Error::other(e.to_string()))?;
        if f.kind == FileKind::Symlink {
            let target = std::ffi::OsString::from_vec(data);
            std::os::unix::fs::symlink(target, &path)?;
        } else {
            fs::write(&path, &data)?;
            let mode = if f.kind == FileKind::Executable {
                0o755
            } else {
                0o644
            };
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        }
        touched.insert(f.path.clone());
    }
    Ok(touched)
}

/// Remove a file (or symlink) that may already be gone.
fn remove_if_there(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}
