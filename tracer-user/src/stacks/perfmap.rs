//! Names for JIT-compiled code, from the perf map a runtime writes (`/tmp/perf-PID.map`).
//!
//! V8 (`node --perf-basic-prof`), HotSpot (`jcmd PID Compiler.perfmap`), LuaJIT, .NET and
//! others put generated code in anonymous memory no ELF file describes, and list it in this
//! file, one `START SIZE NAME` line (hex, with or without `0x`) per code object, the same
//! convention perf and bpftrace read. Without it a stall in a Node handler is a column of
//! bare addresses.
//!
//! Runtimes append as they compile, so the file is read on from where the last read stopped;
//! a later line for the same start wins (code moved or recompiled). The path is resolved
//! through /proc/PID/root with the PID the target sees, so a target in a container is found.
//!
//! The file is the target's to write and we read it as root, so, as perf does, only a regular
//! file owned by the target's user (or root) is read, never through a symlink, and a FIFO
//! put there cannot block us.
use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::PathBuf,
};

/// Node appends to its map for as long as it runs (hundreds of MB over weeks); past this much a
/// long-running daemon stops reading, keeping ~20 MB of names a target. A server's hot code is
/// compiled early, so the names that matter are read first.
const MAX_BYTES: u64 = 16 << 20;

/// One process's perf map, as far as it has been read.
pub struct PerfMap {
    path: PathBuf,
    /// The target's uid: the file must be its (or root's).
    owner: Option<u32>,
    /// Bytes consumed: up to the end of the last complete line.
    read: u64,
    /// Code start -> (end, name).
    code: BTreeMap<u64, (u64, String)>,
}

impl PerfMap {
    pub fn new(pid: u32) -> Self {
        let ns_pid = ns_pid(pid).unwrap_or(pid);
        let path = PathBuf::from(format!("/proc/{pid}/root/tmp/perf-{ns_pid}.map"));
        let owner = std::fs::metadata(format!("/proc/{pid}")).map(|m| m.uid()).ok();
        Self { path, owner, read: 0, code: BTreeMap::new() }
    }

    #[cfg(test)]
    fn at(path: PathBuf) -> Self {
        Self { path, owner: None, read: 0, code: BTreeMap::new() }
    }

    fn open(&self) -> Option<(File, u64)> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&self.path)
            .ok()?;
        let meta = file.metadata().ok()?;
        let owned = self.owner.is_none_or(|uid| meta.uid() == uid || meta.uid() == 0);
        (meta.is_file() && owned).then_some((file, meta.len()))
    }

    /// Reads what was appended since the last call; starts over if the file was rewritten
    /// shorter. A missing file (no JIT, or the target is gone) keeps what was read before.
    pub fn refresh(&mut self) {
        let Some((mut file, len)) = self.open() else { return };
        if len < self.read {
            self.read = 0;
            self.code.clear();
        }
        if len == self.read || self.read >= MAX_BYTES || file.seek(SeekFrom::Start(self.read)).is_err() {
            return;
        }
        let mut tail = Vec::new();
        if file.take(MAX_BYTES - self.read).read_to_end(&mut tail).is_err() {
            return;
        }
        // A line the runtime is still writing is left for the next read.
        let Some(complete) = tail.iter().rposition(|&b| b == b'\n').map(|i| i + 1) else { return };
        for line in String::from_utf8_lossy(&tail[..complete]).lines() {
            if let Some((start, size, name)) = parse_line(line) {
                self.code.insert(start, (start.saturating_add(size), name.to_string()));
            }
        }
        self.read += complete as u64;
    }

    /// The name of the code object holding `addr`, if the map lists one.
    pub fn name(&self, addr: u64) -> Option<&str> {
        let (_, (end, name)) = self.code.range(..=addr).next_back()?;
        (addr < *end).then_some(name.as_str())
    }
}

fn parse_line(line: &str) -> Option<(u64, u64, &str)> {
    let mut parts = line.trim_end().splitn(3, ' ');
    let start = hex(parts.next()?)?;
    let size = hex(parts.next()?)?;
    let name = parts.next()?.trim();
    (size > 0 && !name.is_empty()).then_some((start, size, name))
}

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.strip_prefix("0x").unwrap_or(s), 16).ok()
}

/// The PID the target has in its own (innermost) PID namespace: the number its runtime
/// puts in the file name.
fn ns_pid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn parses_v8_and_hotspot_lines() {
        assert_eq!(parse_line("3ef1b1c04000 1a LazyCompile:~handler /app/server.js:12"),
            Some((0x3ef1b1c04000, 0x1a, "LazyCompile:~handler /app/server.js:12")));
        assert_eq!(parse_line("0x00007f30a8941000 0x0000000000000100 Interpreter"),
            Some((0x7f30a8941000, 0x100, "Interpreter")));
        assert_eq!(parse_line("7f00 0 empty"), None);
        assert_eq!(parse_line("garbage"), None);
    }

    #[test]
    fn reads_appended_lines_and_later_entries_win() {
        let path = std::env::temp_dir().join(format!("stalltrace-perfmap-test-{}.map", std::process::id()));
        let mut file = File::create(&path).unwrap();
        write!(file, "1000 100 first\n2000 10 second\n3000 10 unfinish").unwrap();
        let mut map = PerfMap::at(path.clone());
        map.refresh();
        assert_eq!(map.name(0x1050), Some("first"));
        assert_eq!(map.name(0x1100), None);
        assert_eq!(map.name(0x3000), None, "a line still being written is not read");
        write!(file, "ed\n1000 80 recompiled\n").unwrap();
        map.refresh();
        assert_eq!(map.name(0x3005), Some("unfinished"));
        assert_eq!(map.name(0x1050), Some("recompiled"));
        assert_eq!(map.name(0x2005), Some("second"));
        std::fs::remove_file(&path).unwrap();
        map.refresh();
        assert_eq!(map.name(0x2005), Some("second"), "a vanished file keeps what was read");
    }

    /// The target writes the file and we read it as root.
    #[test]
    fn a_fifo_or_a_symlink_in_its_place_is_not_read() {
        let dir = std::env::temp_dir().join(format!("stalltrace-perfmap-refused-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (fifo, real, link) = (dir.join("fifo.map"), dir.join("real.map"), dir.join("link.map"));
        let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
        let mut map = PerfMap::at(fifo);
        map.refresh(); // returns at once instead of waiting for a writer
        assert_eq!(map.name(0x1000), None);
        std::fs::write(&real, "1000 10 real\n").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let mut map = PerfMap::at(link);
        map.refresh();
        assert_eq!(map.name(0x1000), None);
        let mut map = PerfMap::at(real);
        map.refresh();
        assert_eq!(map.name(0x1000), Some("real"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
