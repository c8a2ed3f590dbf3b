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
use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read as _, Seek as _, SeekFrom},
    path::PathBuf,
};

/// Node appends to its map for as long as it runs (hundreds of MB over weeks); past this much a
/// long-running daemon stops reading, keeping ~20 MB of names a target. A server's hot code is
/// compiled early, so the names that matter are read first.
const MAX_BYTES: u64 = 16 << 20;

/// One process's perf map, as far as it has been read.
pub struct PerfMap {
    path: PathBuf,
    /// Bytes consumed: up to the end of the last complete line.
    read: u64,
    /// Code start -> (end, name).
    code: BTreeMap<u64, (u64, String)>,
}

impl PerfMap {
    pub fn new(pid: u32) -> Self {
        let ns_pid = ns_pid(pid).unwrap_or(pid);
        let path = PathBuf::from(format!("/proc/{pid}/root/tmp/perf-{ns_pid}.map"));
        Self::at(path)
    }

    fn at(path: PathBuf) -> Self {
        Self { path, read: 0, code: BTreeMap::new() }
    }

    /// Reads what was appended since the last call; starts over if the file was rewritten
    /// shorter. A missing file (no JIT, or the target is gone) keeps what was read before.
    pub fn refresh(&mut self) {
        let Ok(mut file) = File::open(&self.path) else { return };
        let Ok(len) = file.metadata().map(|m| m.len()) else { return };
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
}
