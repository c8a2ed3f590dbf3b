//! Which processes the config names, and one tracing session per matching process.
use std::{
    fs,
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
};

use anyhow::Result;

use super::config::TargetSpec;
use crate::{
    cli::{DEFAULT_GROUPS, parse_groups},
    probes::ProbeConfig,
    session::{Session, TraceOptions},
    starvation::StarveConfig,
};

/// A process being traced, and how to tell that it is no longer the one we attached to.
pub struct Live {
    pub spec: TargetSpec,
    pub pid: u32,
    exe: Option<PathBuf>,
    start_time: Option<u64>,
    pub session: Session,
}

impl Live {
    pub fn attach(spec: &TargetSpec, pid: u32, stop: Arc<AtomicBool>) -> Result<Self> {
        let groups = match &spec.probes {
            Some(p) => parse_groups(p)?,
            None => DEFAULT_GROUPS,
        };
        let opts = TraceOptions {
            pid,
            threshold_ns: spec.threshold()?.as_nanos() as u64,
            duration: None,
            probes: ProbeConfig::new(groups, None, spec.alloc_calls),
            storm_rate: 1000,
            starvation: StarveConfig::default(),
        };
        let session = Session::attach(&opts, stop)?;
        Ok(Self { spec: spec.clone(), pid, exe: exe_of(pid), start_time: start_time(pid), session })
    }

    /// The PID now runs another program (exec) or belongs to another process (reuse).
    pub fn replaced(&self) -> bool {
        exe_of(self.pid) != self.exe || start_time(self.pid) != self.start_time
    }
}

/// PIDs of the live processes `spec` names, ours excepted.
pub fn matching(spec: &TargetSpec) -> Vec<u32> {
    let me = std::process::id();
    let wanted_exe = spec.exe.as_ref().map(|e| fs::canonicalize(e).unwrap_or_else(|_| e.clone()));
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| match (&spec.comm, &wanted_exe, spec.pid) {
            (Some(comm), _, _) => comm_of(pid).as_deref() == Some(comm.as_str()),
            (_, Some(exe), _) => exe_of(pid).as_deref() == Some(exe.as_path()),
            (_, _, Some(p)) => p == pid,
            _ => false,
        })
        .filter(|&pid| crate::target::Target::open(pid).is_ok())
        .collect()
}

fn comm_of(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|c| c.trim_end().to_string())
}

fn exe_of(pid: u32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.split_whitespace().nth(19)?.parse().ok()
}

/// The daemon's own CPU seconds and resident bytes.
pub fn own_usage() -> (f64, u64) {
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let f: Vec<u64> = s.rsplit(')').next()?.split_whitespace().skip(11).take(2).filter_map(|x| x.parse().ok()).collect();
            Some(f.iter().sum::<u64>() as f64 / ticks)
        })
        .unwrap_or(0.0);
    let rss = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()))
        .unwrap_or(0);
    (cpu, rss * 1024)
}

