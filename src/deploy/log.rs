//! A run's log file, kept to at most `log_max` bytes: when it grows past that, its older
//! half is dropped (at a line boundary) and a first line says how much is gone. The tail is
//! what explains a failure; a deploy that prints gigabytes must not fill the disk.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::fsutil;

pub struct BoundedLog {
    path: PathBuf,
    file: File,
    max: u64,
    /// Bytes in the file now.
    written: u64,
    /// Bytes of output dropped so far, and the length of the line that says so.
    dropped: u64,
    marker_len: u64,
}

impl BoundedLog {
    pub fn create(path: &Path, max: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o640)
            .open(path)?;
        Ok(BoundedLog {
            path: path.to_owned(),
            file,
            max,
            written: 0,
            dropped: 0,
            marker_len: 0,
        })
    }

    pub fn line(&mut self, line: &str) -> io::Result<()> {
        self.file.write_all(line.as_bytes())?;
        self.file.write_all(b"\n")?;
        self.written += line.len() as u64 + 1;
        if self.written > self.max {
            // On failure (the disk is full) the log keeps growing as it is, and trying again
            // waits for another `max` bytes rather than costing every line a copy.
            if let Err(e) = self.drop_older_half() {
                let _ = std::fs::remove_file(self.path.with_extension("log.tmp"));
                self.written = 0;
                return Err(e);
            }
        }
        Ok(())
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    /// Rewrite the file as a marker line and its newer half, through a temp file and a
    /// rename: a crash meanwhile leaves the old log whole.
    fn drop_older_half(&mut self) -> io::Result<()> {
        let mut old = File::open(&self.path)?;
        let len = old.metadata()?.len();
        let mut cut = len.saturating_sub(self.max / 2);
        old.seek(SeekFrom::Start(cut))?;
        let mut reader = BufReader::new(old);
        // Lines are at most a few hundred KiB (troops splits longer output), so this ends.
        let mut partial = Vec::new();
        cut += reader.read_until(b'\n', &mut partial)? as u64;
        self.dropped += cut.saturating_sub(self.marker_len);
        let marker = format!(
            "troops: {} bytes of earlier output were dropped (log_max = {})\n",
            self.dropped, self.max
        );
        let tmp = self.path.with_extension("log.tmp");
        let mut new = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o640)
            .open(&tmp)?;
        new.write_all(marker.as_bytes())?;
        io::copy(&mut reader, &mut new)?;
        new.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            fsutil::sync_dir(dir)?;
        }
        self.marker_len = marker.len() as u64;
        self.written = new.metadata()?.len();
        self.file = new;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_past_its_limit_keeps_whole_lines_of_its_tail_and_counts_what_went() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.log");
        let mut log = BoundedLog::create(&path, 1000).unwrap();
        let mut total = 0;
        for i in 0..500 {
            let line = format!("line {i:03}");
            total += line.len() + 1;
            log.line(&line).unwrap();
        }
        log.sync().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() <= 1000 + 100, "{}", text.len());
        let mut lines = text.lines();
        let marker = lines.next().unwrap();
        let kept: Vec<&str> = lines.collect();
        assert!(kept.iter().all(|l| l.len() == 8 && l.starts_with("line ")));
        assert_eq!(kept.last(), Some(&"line 499"));
        let kept_bytes: usize = kept.iter().map(|l| l.len() + 1).sum();
        assert_eq!(
            marker,
            format!(
                "troops: {} bytes of earlier output were dropped (log_max = 1000)",
                total - kept_bytes
            )
        );
    }
}
