//! Repairing the node's repository from its remotes. Everything in it came from them, so a
//! damaged pack (truncated by a full disk or a crash, its index lost) is set aside and what
//! it held is fetched again: refs that name lost objects are taken down before the fetch (a
//! fetch would otherwise offer them as haves and get a pack that builds on what is gone)
//! and put back, unchanged, once their objects are back. The branch never moves in a
//! repair; the refs taken down are written to a file first, so a crash mid-repair loses
//! none of them.
//!
//! The pack check is cheap enough for every pull: a directory listing and two 20-byte
//! reads per pack (a pack's trailing checksum against the copy its index holds).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::fsutil;
use crate::repo::{CommitId, Repo, RepoError};

/// A pack file that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub pack: PathBuf,
    pub why: &'static str,
}

/// SHA-1, the node repository's object format.
const HASH_LEN: u64 = 20;

fn tail(path: &Path, from_end: u64) -> io::Result<[u8; HASH_LEN as usize]> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    if len < from_end {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "too short"));
    }
    f.seek(SeekFrom::Start(len - from_end))?;
    let mut buf = [0u8; HASH_LEN as usize];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

/// The packs in `pack_dir` (a repo's `objects/pack`) that are unusable: no index, or a
/// trailing checksum that is not the one their index was made for (truncated, altered).
pub fn damaged_packs(pack_dir: &Path) -> Vec<Damage> {
    let mut damaged = Vec::new();
    for entry in fs::read_dir(pack_dir).into_iter().flatten().flatten() {
        let pack = entry.path();
        if pack.extension().is_none_or(|x| x != "pack") {
            continue;
        }
        let idx = pack.with_extension("idx");
        let why = if !idx.exists() {
            Some("its index is missing")
        } else {
            // An index ends with the pack's checksum, then its own.
            match (tail(&pack, HASH_LEN), tail(&idx, 2 * HASH_LEN)) {
                (Ok(a), Ok(b)) if a == b => None,
                (Err(_), _) => Some("it is truncated or unreadable"),
                (_, Err(_)) => Some("its index is truncated or unreadable"),
                _ => Some("it does not match its index (truncated or altered)"),
            }
        };
        if let Some(why) = why {
            damaged.push(Damage { pack, why });
        }
    }
    damaged.sort_by(|a, b| a.pack.cmp(&b.pack));
    damaged
}

/// Move `damage`'s pack and every file beside it with the same stem (.idx, .rev, .keep,
/// .bitmap, .mtimes) into `<repo>/damaged/<stamp>/`, kept for inspection. Returns where.
pub fn set_aside(repo: &Path, damage: &[Damage], stamp: u64) -> io::Result<PathBuf> {
    let dest = repo.join("damaged").join(stamp.to_string());
    fsutil::create_dirs(&dest, 0o700)?;
    for d in damage {
        let (Some(dir), Some(stem)) = (d.pack.parent(), d.pack.file_stem()) else {
            continue;
        };
        let stem = stem.to_string_lossy();
        for entry in fs::read_dir(dir)?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name
                .strip_prefix(stem.as_ref())
                .is_some_and(|r| r.starts_with('.'))
            {
                fs::rename(entry.path(), dest.join(name.as_ref()))?;
            }
        }
    }
    fsutil::sync_dir(&repo.join("objects/pack"))?;
    Ok(dest)
}

/// Refs taken down during a repair, saved until they are put back.
fn saved_path(repo: &Path) -> PathBuf {
    repo.join("troops-repair.json")
}

/// Refs a repair took down and could not put back yet: name and the commit it named.
pub fn pending(repo: &Path) -> BTreeMap<String, CommitId> {
    fs::read(saved_path(repo))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save(repo: &Path, refs: &BTreeMap<String, CommitId>) -> Result<(), RepairError> {
    let file = saved_path(repo);
    let bytes = serde_json::to_vec_pretty(refs).expect("refs serialise");
    fsutil::write_atomic(&file, &bytes, 0o600)
        .map_err(|source| RepairError::Io { path: file, source })
}

/// `refs/heads/master at 0123456789ab, ...`
fn listed<'a>(refs: impl IntoIterator<Item = (&'a String, &'a CommitId)>) -> String {
    refs.into_iter()
        .map(|(n, id)| format!("{n} at {}", id.short()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a repair did before a fetch, in words for status and the journal.
#[derive(Debug, Default)]
pub struct Before {
    pub said: Vec<String>,
}

/// Before fetching: set damaged packs aside, take down the refs that name lost objects
/// (saved first). The caller holds the node lock and reopens `Repo` afterwards.
pub fn before_fetch(path: &Path, now: u64) -> Result<Before, RepairError> {
    let mut said = Vec::new();
    let damage = damaged_packs(&path.join("objects/pack"));
    if !damage.is_empty() {
        let dest = set_aside(path, &damage, now).map_err(|source| RepairError::Io {
            path: path.join("objects/pack"),
            source,
        })?;
        for d in &damage {
            said.push(format!(
                "set aside {} ({}) in {}; fetching what it held again",
                d.pack.file_name().unwrap_or_default().to_string_lossy(),
                d.why,
                dest.display()
            ));
        }
    }
    let repo = Repo::open(path)?;
    // After a pack is lost, refs whose own objects survive may still stand on history that
    // went with it: all of them come down, so the fetch asks for everything and offers
    // nothing as a base. Indexes over the old packs go too; git rebuilds them.
    let missing = match damage.is_empty() {
        true => repo.refs_to_missing()?,
        false => {
            for stale in [
                "objects/info/commit-graph",
                "objects/info/commit-graphs",
                "objects/pack/multi-pack-index",
            ] {
                let p = path.join(stale);
                let _ = fs::remove_file(&p).or_else(|_| fs::remove_dir_all(&p));
            }
            repo.all_refs()?
        }
    };
    if missing.is_empty() {
        return Ok(Before { said });
    }
    let mut saved = pending(path);
    for (name, id) in &missing {
        saved.insert(name.clone(), *id);
    }
    save(path, &saved)?;
    for (name, id) in &missing {
        repo.delete_ref(name, *id)?;
    }
    said.push(format!(
        "taken down until a fetch brings their history back: {}",
        listed(missing.iter().map(|(n, id)| (n, id)))
    ));
    Ok(Before { said })
}

/// After fetching: put back every saved ref whose object is here again, unless the ref has
/// been made anew meanwhile. What is still missing stays saved, and is said.
pub fn after_fetch(path: &Path) -> Result<Vec<String>, RepairError> {
    let mut saved = pending(path);
    if saved.is_empty() {
        return Ok(Vec::new());
    }
    let repo = Repo::open(path)?;
    let mut said = Vec::new();
    let mut back = Vec::new();
    for (name, id) in &saved {
        if !repo.has(*id) {
            continue;
        }
        if repo.ref_target(name)?.is_none() {
            repo.update_ref(name, *id, None, "troops: put back after a repair")?;
        }
        back.push(name.clone());
    }
    for name in &back {
        saved.remove(name);
    }
    if !back.is_empty() {
        said.push(format!(
            "repaired: {} put back, its objects fetched again",
            back.join(", ")
        ));
    }
    if saved.is_empty() {
        let file = saved_path(path);
        fs::remove_file(&file).map_err(|source| RepairError::Io { path: file, source })?;
    } else {
        said.push(format!(
            "still missing, no remote has them now: {} (saved in {})",
            listed(&saved),
            saved_path(path).display()
        ));
        save(path, &saved)?;
    }
    Ok(said)
}

/// An error if `reference` (the branch) is among the refs a repair could not put back: the
/// node must not move it while it cannot tell forward from back.
pub fn hold_if_lost(path: &Path, reference: &str) -> Result<(), RepairError> {
    match pending(path).get(reference) {
        None => Ok(()),
        Some(commit) => Err(RepairError::Lost {
            reference: reference.to_owned(),
            commit: commit.to_string(),
            file: saved_path(path),
        }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error(
        "{reference} was at {commit}, which the repository lost and no remote has now; the node holds rather than move the branch where it cannot tell forward from back (if the remotes' history was rewritten on purpose, remove {file}: the branch then takes their tip as at first boot)"
    )]
    Lost {
        reference: String,
        commit: String,
        file: PathBuf,
    },
    #[error("failed to repair {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Repo(#[from] RepoError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, bytes: &[u8]) {
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn packs_are_judged_by_their_index_and_trailing_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let sum = [7u8; 20];
        let mut pack = b"PACK....body....".to_vec();
        pack.extend_from_slice(&sum);
        let mut idx = b"index....".to_vec();
        idx.extend_from_slice(&sum);
        idx.extend_from_slice(&[9u8; 20]);
        write(&d.join("pack-good.pack"), &pack);
        write(&d.join("pack-good.idx"), &idx);
        write(&d.join("pack-short.pack"), &pack[..pack.len() - 5]);
        write(&d.join("pack-short.idx"), &idx);
        write(&d.join("pack-lone.pack"), &pack);
        write(&d.join("pack-tiny.pack"), b"PA");
        write(&d.join("pack-tiny.idx"), &idx);
        let found: Vec<(String, &str)> = damaged_packs(d)
            .into_iter()
            .map(|x| {
                (
                    x.pack.file_name().unwrap().to_string_lossy().into_owned(),
                    x.why,
                )
            })
            .collect();
        assert_eq!(
            found,
            [
                ("pack-lone.pack".to_string(), "its index is missing"),
                (
                    "pack-short.pack".to_string(),
                    "it does not match its index (truncated or altered)"
                ),
                (
                    "pack-tiny.pack".to_string(),
                    "it is truncated or unreadable"
                ),
            ]
        );
    }

    #[test]
    fn setting_aside_takes_every_file_of_the_pack_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path();
        let packs = repo.join("objects/pack");
        fs::create_dir_all(&packs).unwrap();
        for f in [
            "pack-a.pack",
            "pack-a.idx",
            "pack-a.rev",
            "pack-ab.pack",
            "pack-ab.idx",
        ] {
            write(&packs.join(f), b"x");
        }
        let damage = [Damage {
            pack: packs.join("pack-a.pack"),
            why: "test",
        }];
        let dest = set_aside(repo, &damage, 42).unwrap();
        assert_eq!(dest, repo.join("damaged/42"));
        let mut moved: Vec<String> = fs::read_dir(&dest)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        moved.sort();
        assert_eq!(moved, ["pack-a.idx", "pack-a.pack", "pack-a.rev"]);
        assert!(packs.join("pack-ab.pack").exists());
    }
}
