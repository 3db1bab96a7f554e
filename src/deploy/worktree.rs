//! The checkout a deploy runs in, `work/<commit>`: exactly the commit's tree, nothing else.
//!
//! A fresh checkout of a large tree costs more than the rest of a deploy, so the last
//! checkout is kept with a manifest of what was written into it: each file's blob id and
//! the stat data it had right after. The next deploy brings that checkout to the new commit
//! the way `git reset --hard` and `git clean -fdx` would: whatever the last run added is
//! removed, whatever it touched (its ctime moved) is written again, and of the rest only
//! the files that differ between the two commits are rewritten. Without a manifest (a run
//! that died mid-update leaves none) the tree is checked out afresh.
//!
//! Every file operation goes through a `cap_std::fs::Dir` opened on `work` or on the
//! checkout: paths are resolved with openat beneath that directory, so neither a symlink
//! the last deploy.py left (in place of a parent, of the checkout, or of `work` itself)
//! nor a hostile tree can make the update write, follow or delete anything outside it.
//! Trees a fresh checkout could not reproduce faithfully are refused before anything moves.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cap_std::fs::{Dir, MetadataExt, OpenOptions, OpenOptionsExt, Permissions};
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

/// Why a tree cannot be materialised: names a checkout could not write as they are, or
/// that would make it write outside itself. Plain data, so it is decided without I/O.
pub fn check_tree(files: &[TreeFile]) -> Result<(), String> {
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for f in files {
        let path = f.path.as_str();
        for part in path.split('/') {
            if part.is_empty() || part == "." || part == ".." {
                return Err(format!("path {path:?} has a {part:?} component"));
            }
            // git refuses .git in any case (and on case-insensitive filesystems .GIT is it).
            if part.eq_ignore_ascii_case(".git") {
                return Err(format!("path {path:?} names a .git"));
            }
        }
        if !seen.insert(path) {
            return Err(format!("the tree has two entries at {path:?}"));
        }
    }
    for f in files {
        let mut at = f.path.as_str();
        while let Some((parent, _)) = at.rsplit_once('/') {
            if seen.contains(parent) {
                return Err(format!(
                    "{parent:?} is both a file and a directory in the tree"
                ));
            }
            at = parent;
        }
    }
    Ok(())
}

/// Open `work`, a real directory: a symlink left in its place (by a deploy.py, say) is
/// removed, never followed.
fn open_work(work: &Path) -> io::Result<Dir> {
    let (Some(parent), Some(name)) = (work.parent(), work.file_name()) else {
        return Err(io::Error::other("the work directory has no parent"));
    };
    fsutil::create_dirs(parent, 0o750)?;
    let state = Dir::open_ambient_dir(parent, cap_std::ambient_authority())?;
    match state.symlink_metadata(name) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => state.remove_file(name)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    match state.create_dir(name) {
        Ok(()) => state.set_permissions(name, Permissions::from_std(mode(0o2750)))?,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    state.open_dir(name)
}

fn mode(bits: u32) -> std::fs::Permissions {
    std::fs::Permissions::from_mode(bits)
}

/// `name` in `work` as a directory of its own, or None (gone, a file, a symlink).
fn open_checkout(work: &Dir, name: &str) -> Option<Dir> {
    work.symlink_metadata(name)
        .ok()
        .filter(|m| m.is_dir())
        .and_then(|_| work.open_dir(name).ok())
}

/// Remove `name` from `dir`, whatever it is; a symlink is removed, never followed.
fn remove_any(dir: &Dir, name: &str) -> io::Result<()> {
    match dir.symlink_metadata(name) {
        Ok(m) if m.is_dir() => dir.remove_dir_all(name),
        Ok(_) => dir.remove_file(name),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Make `work/<commit>`. Checkouts other than the one reused are moved aside at once and
/// deleted by the returned thread while the deploy runs.
pub fn materialise(
    repo: &Repo,
    commit: CommitId,
    work: &Path,
) -> Result<(PathBuf, Made, std::thread::JoinHandle<()>), String> {
    let at = |e: io::Error| format!("{}: {e}", work.display());
    let files = repo.files(commit).map_err(|e| e.to_string())?;
    check_tree(&files).map_err(|why| format!("refusing to check out {commit}: {why}"))?;
    let work_dir = open_work(work).map_err(at)?;
    let name = commit.to_string();
    let dest = work.join(&name);
    let manifest_path = work.join(MANIFEST);
    let previous = read_manifest(&work_dir);
    // The manifest describes one checkout at a time: gone before anything changes, so a
    // run that dies from here on can never trust a half-updated tree.
    let _ = work_dir.remove_file(MANIFEST);
    let reusable = previous.and_then(|(m, taken_ns)| {
        let dir = open_checkout(&work_dir, &m.commit)?;
        let left = reconcile(&dir, &m, taken_ns, repo).ok()?;
        Some((dir, m, left))
    });

    let keep = reusable.as_ref().map(|(_, m, _)| m.commit.clone());
    let mut doomed = Vec::new();
    for entry in work_dir.entries().map_err(at)?.flatten() {
        let entry_name = entry.file_name().to_string_lossy().into_owned();
        if Some(&entry_name) == keep.as_ref() {
            continue;
        }
        if entry_name.starts_with(".trash-") {
            doomed.push(entry_name);
            continue;
        }
        let aside = format!(".trash-{entry_name}-{}", std::process::id());
        match work_dir.rename(&entry_name, &work_dir, &aside) {
            Ok(()) => doomed.push(aside),
            Err(_) => doomed.push(entry_name),
        }
    }
    let cleaner_dir = work_dir.try_clone().map_err(at)?;
    let cleaner = std::thread::spawn(move || {
        for d in doomed {
            let _ = remove_any(&cleaner_dir, &d);
        }
    });

    // Trees with submodules are always checked out fresh, and get no manifest.
    let plain = files.iter().all(|f| f.kind != FileKind::Other);
    let (made, written) = match reusable {
        Some((dir, old, left)) if plain => {
            let changed = update_in_place(repo, &dir, &old, &files, &left.stale)
                .map_err(|e| format!("{}: failed to update in place: {e}", dest.display()))?;
            if old.commit != name {
                work_dir
                    .rename(&old.commit, &work_dir, &name)
                    .map_err(|e| format!("{}: {e}", dest.display()))?;
            }
            let made = Made::Updated {
                changed: changed.len(),
                removed: left.removed,
            };
            (made, Some((old, changed)))
        }
        other => {
            if let Some((_, old, _)) = other {
                let _ = remove_any(&work_dir, &old.commit);
            }
            let tmp = format!(".tmp-{commit}");
            remove_any(&work_dir, &tmp).map_err(at)?;
            repo.checkout(commit, &work.join(&tmp))
                .map_err(|e| e.to_string())?;
            work_dir
                .rename(&tmp, &work_dir, &name)
                .map_err(|e| format!("{}: {e}", dest.display()))?;
            (Made::Fresh, None)
        }
    };
    fsutil::sync_dir(work).map_err(at)?;

    if plain && let Some(checkout) = open_checkout(&work_dir, &name) {
        let entries = match written {
            // Only what was rewritten needs a new stat; the rest is as it was.
            Some((old, changed)) => {
                let old: BTreeMap<&str, &Entry> =
                    old.entries.iter().map(|e| (e.path.as_str(), e)).collect();
                files
                    .iter()
                    .map(|f| match old.get(f.path.as_str()) {
                        Some(e) if !changed.contains(&f.path) => Ok((*e).clone()),
                        _ => entry_for(&checkout, f),
                    })
                    .collect::<io::Result<Vec<_>>>()
            }
            None => files.iter().map(|f| entry_for(&checkout, f)).collect(),
        };
        // Without a manifest the next deploy checks out fresh: slower, never wrong.
        if let Ok(entries) = entries {
            let manifest = Manifest {
                commit: name,
                entries,
            };
            if let Ok(json) = serde_json::to_vec(&manifest) {
                let _ = fsutil::write_atomic(&manifest_path, &json, 0o640);
            }
        }
    }
    Ok((dest, made, cleaner))
}

fn read_manifest(work: &Dir) -> Option<(Manifest, i64)> {
    let bytes = work.read(MANIFEST).ok()?;
    let taken = work.symlink_metadata(MANIFEST).ok()?;
    let manifest = serde_json::from_slice(&bytes).ok()?;
    Some((manifest, taken.mtime() * 1_000_000_000 + taken.mtime_nsec()))
}

fn entry_for(checkout: &Dir, f: &TreeFile) -> io::Result<Entry> {
    let meta = checkout.symlink_metadata(&f.path)?;
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
fn reconcile(dir: &Dir, manifest: &Manifest, taken_ns: i64, repo: &Repo) -> io::Result<Leftovers> {
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
    let mut stack = vec![(dir.try_clone()?, String::new())];
    while let Some((here, rel)) = stack.pop() {
        for entry in here.entries()? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let rel = if rel.is_empty() {
                name.into_owned()
            } else {
                format!("{rel}/{name}")
            };
            // Never follows a symlink: a link the last run left is removed, not entered.
            let kind = entry.file_type()?;
            if kind.is_dir() {
                if dirs.contains(rel.as_str()) {
                    stack.push((entry.open_dir()?, rel));
                } else {
                    here.remove_dir_all(entry.file_name())?;
                    out.removed += 1;
                }
                continue;
            }
            let Some((key, e)) = expected.get_key_value(rel.as_str()) else {
                entry.remove_file()?;
                out.removed += 1;
                continue;
            };
            let meta = here.symlink_metadata(entry.file_name())?;
            let ctime_ns = meta.ctime() * 1_000_000_000 + meta.ctime_nsec();
            let as_written = meta.ino() == e.ino
                && meta.size() == e.size
                && ctime_ns == e.ctime_ns
                && kind.is_symlink() == e.symlink
                && (e.ctime_ns + RACY_NS < taken_ns
                    || same_content(&here, &entry.file_name(), e, repo));
            if as_written {
                intact.insert(key);
            } else {
                entry.remove_file()?;
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

fn same_content(dir: &Dir, name: &std::ffi::OsStr, e: &Entry, repo: &Repo) -> bool {
    let data = if e.symlink {
        match dir.read_link_contents(name) {
            Ok(t) => t.into_os_string().into_encoded_bytes(),
            Err(_) => return false,
        }
    } else {
        match dir
            .open_with(
                name,
                OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW),
            )
            .and_then(|mut f| {
                let mut data = Vec::new();
                io::Read::read_to_end(&mut f, &mut data).map(|_| data)
            }) {
            Ok(d) => d,
            Err(_) => return false,
        }
    };
    repo.blob_id(&data) == e.id
}

/// Rewrite the files that differ between the old manifest and `files`; the paths touched.
fn update_in_place(
    repo: &Repo,
    dir: &Dir,
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
            remove_if_there(dir, &e.path)?;
            touched.insert(e.path.clone());
            let mut parent = Path::new(&e.path).parent();
            while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
                if dir.remove_dir(p).is_err() {
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
        let path = Path::new(&f.path);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            dir.create_dir_all(parent)?;
        }
        // Never write through whatever is there (a symlink the last run made, say).
        remove_if_there(dir, &f.path)?;
        let data = repo
            .blob(&f.id)
            .map_err(|e| io::Error::other(e.to_string()))?;
        if f.kind == FileKind::Symlink {
            // The link's target is content, as git stores it; it is never resolved here.
            dir.symlink_contents(OsString::from_vec(data), path)?;
        } else {
            let bits = if f.kind == FileKind::Executable {
                0o755
            } else {
                0o644
            };
            // create_new: O_EXCL, so nothing that appeared in the meantime is written through.
            let mut file = dir.open_with(
                path,
                OpenOptions::new().write(true).create_new(true).mode(bits),
            )?;
            file.write_all(&data)?;
            file.set_permissions(Permissions::from_std(mode(bits)))?;
        }
        touched.insert(f.path.clone());
    }
    Ok(touched)
}

/// Remove a file (or symlink) that may already be gone.
fn remove_if_there(dir: &Dir, path: &str) -> io::Result<()> {
    match dir.remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(paths: &[&str]) -> Vec<TreeFile> {
        paths
            .iter()
            .map(|p| TreeFile {
                path: (*p).into(),
                kind: FileKind::Regular,
                id: String::new(),
            })
            .collect()
    }

    #[test]
    fn ordinary_trees_pass() {
        assert_eq!(check_tree(&tree(&["a", "b/c", "b/d/e", "README"])), Ok(()));
        // Distinct names on a case-sensitive filesystem, as a fresh checkout writes them.
        assert_eq!(check_tree(&tree(&["A", "a"])), Ok(()));
    }

    #[test]
    fn trees_that_would_write_outside_or_collide_are_refused() {
        for (paths, why) in [
            (&["a", "a"][..], "two entries"),
            (&["a", "a/x"][..], "both a file and a directory"),
            (&["a/b", "a/b/c"][..], "both a file and a directory"),
            (&["../x"][..], "\"..\" component"),
            (&["a/../../x"][..], "\"..\" component"),
            (&["a//b"][..], "\"\" component"),
            (&["/etc/x"][..], "\"\" component"),
            (&[".git/hooks/post-checkout"][..], ".git"),
            (&["sub/.GIT/config"][..], ".git"),
        ] {
            let err = check_tree(&tree(paths)).unwrap_err();
            assert!(err.contains(why), "{paths:?}: {err}");
        }
    }
}
