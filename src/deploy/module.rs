//! Where the `troops` Python module is. The package installs it once as
//! /usr/lib/troops/python/troops.abi3.so (never under the root prefix: it is part of the
//! program, not of the node's state). A development build has it beside the binary as
//! cargo names a cdylib, `libtroops.so`, which Python cannot import under that name, so it is
//! copied next to the node's state as `troops.abi3.so`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::fsutil;

pub const INSTALLED_DIR: &str = "/usr/lib/troops/python";
const FILE: &str = "troops.abi3.so";

/// The directory to put on every venv's path. `copy_dir` receives a development build's
/// module.
pub fn locate(copy_dir: &Path) -> io::Result<PathBuf> {
    let installed = Path::new(INSTALLED_DIR);
    if installed.join(FILE).is_file() {
        return Ok(installed.to_owned());
    }
    let exe = std::env::current_exe()?;
    let beside = exe.parent().unwrap_or(Path::new("/"));
    if beside.join(FILE).is_file() {
        return Ok(beside.to_owned());
    }
    let built = beside.join("libtroops.so");
    if built.is_file() {
        let bytes = fs::read(&built)?;
        let dest = copy_dir.join(FILE);
        if fs::read(&dest).ok().as_deref() != Some(&bytes[..]) {
            fsutil::create_dirs(copy_dir, 0o755)?;
            fsutil::write_atomic(&dest, &bytes, 0o644)?;
        }
        return Ok(copy_dir.to_owned());
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "the troops Python module is missing: looked for {}/{FILE}, {}/{FILE} and {}",
            INSTALLED_DIR,
            beside.display(),
            built.display()
        ),
    ))
}
