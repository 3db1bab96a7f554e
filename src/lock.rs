//! The one node lock: an flock under /var/lib/troops that serialises every pull and deploy,
//! whoever asked. The kernel drops it when the holder dies, so a killed run never wedges the
//! node.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use crate::fsutil;

#[derive(Debug)]
pub struct NodeLock {
    _file: File,
}

/// Whether a run holds the lock now; `None` when that cannot be told (no lock file, or
/// none this user may open).
pub fn is_held(path: &Path) -> Option<bool> {
    let file = File::open(path).ok()?;
    match file.try_lock_shared() {
        Ok(()) => Some(false),
        Err(std::fs::TryLockError::WouldBlock) => Some(true),
        Err(std::fs::TryLockError::Error(_)) => None,
    }
}

/// Take the lock, calling `on_wait` once if another run holds it, then waiting for it.
pub fn acquire(path: &Path, on_wait: impl FnOnce()) -> io::Result<NodeLock> {
    if let Some(dir) = path.parent() {
        fsutil::create_dirs(dir, 0o755)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            on_wait();
            file.lock()?;
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(e),
    }
    Ok(NodeLock { _file: file })
}
