//! The JSON-lines journal: every stall, storm and starvation record, rotated by size. A record
//! is never dropped: when it would not fit, the file is rotated first.
use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

/// Journal and summary files are readable by the owner's group, not by everyone.
pub const FILE_MODE: u32 = 0o640;

pub struct Journal {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: File,
    size: u64,
    pub written: u64,
}

impl Journal {
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(Self { path: path.to_path_buf(), max_bytes, keep, file, size, written: 0 })
    }

    pub fn write(&mut self, line: &str) -> Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
        }
        writeln!(self.file, "{line}").with_context(|| format!("writing {}", self.path.display()))?;
        self.size += len;
        self.written += 1;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.file.sync_data().with_context(|| format!("syncing {}", self.path.display()))
    }

    /// stalls.jsonl -> stalls.jsonl.1 -> ... -> stalls.jsonl.<keep>; the oldest goes.
    fn rotate(&mut self) -> Result<()> {
        self.file.sync_data()?;
        for i in (1..self.keep).rev() {
            let from = numbered(&self.path, i);
            if from.exists() {
                fs::rename(&from, numbered(&self.path, i + 1))?;
            }
        }
        if self.keep > 0 {
            fs::rename(&self.path, numbered(&self.path, 1))?;
        } else {
            fs::remove_file(&self.path)?;
        }
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

fn numbered(path: &Path, i: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

fn open_append(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    // An existing file keeps its mode on open: make it ours.
    file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_every_record_within_keep_files() {
        let dir = std::env::temp_dir().join(format!("stalltrace-journal-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("stalls.jsonl");
        let mut j = Journal::open(&path, 1024, 100).unwrap();
        for i in 0..500 {
            j.write(&format!("{{\"type\":\"stall\",\"n\":{i}}}")).unwrap();
        }
        j.flush().unwrap();
        let mut lines = 0;
        for entry in fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            assert!(fs::metadata(&p).unwrap().len() <= 1024, "{} too big", p.display());
            assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, FILE_MODE);
            lines += fs::read_to_string(&p).unwrap().lines().count();
        }
        assert_eq!(lines, 500);
        let _ = fs::remove_dir_all(&dir);
    }
}
