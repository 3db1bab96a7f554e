//! Writes that must survive a power cut: temp file, fsync, rename, fsync the directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Replace `path` with `contents` so that a reader sees either the old file or the new one,
/// never a half-written one, even across a crash.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    // Created exclusively and never through a symlink: in a directory another user can
    // write (node_exporter's textfile directory), a link planted at the temp name must not
    // make root truncate whatever it points at. One left by a dead process of the same pid
    // is removed (the link itself, not its target) and the create tried once more.
    let create = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(&tmp)
    };
    let result = (|| {
        let mut f = match create() {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                fs::remove_file(&tmp)?;
                create()?
            }
            other => other?,
        };
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Whether `name` is one of [`write_atomic`]'s temp files.
pub fn is_temp(name: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(".tmp-")
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Remove the temp files a killed [`write_atomic`] left in `dir`. Call only while nothing
/// else writes there (troops holds the node lock). The names removed.
pub fn sweep_temps(dir: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_temp(&name) && file && fs::remove_file(entry.path()).is_ok() {
            removed.push(name);
        }
    }
    removed
}

/// Make a rename or creation inside `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `mkdir -p` with a mode for every directory it creates.
pub fn create_dirs(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
}

#[cfg(test)]
mod temp_tests {
    #[test]
    fn only_write_atomic_temps_are_temps() {
        assert!(super::is_temp(".pull.json.tmp-4242"));
        assert!(!super::is_temp("pull.json.tmp-4242"));
        assert!(!super::is_temp(".pull.json.tmp-"));
        assert!(!super::is_temp(".x.tmp-12a"));
        assert!(!super::is_temp(".troops-ready"));
    }
}

#[cfg(test)]
mod planted {
    use super::*;

    #[test]
    fn a_symlink_at_the_temp_name_is_replaced_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let dest = dir.path().join("troops.prom");
        let tmp = dir
            .path()
            .join(format!(".troops.prom.tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        write_atomic(&dest, b"metrics", 0o644).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(fs::read_to_string(&dest).unwrap(), "metrics");
    }
}
