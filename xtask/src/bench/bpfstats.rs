//! Kernel-side cost of the BPF programs: `kernel.bpf_stats_enabled` makes the kernel count
//! every program's runs and run time.
use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::procs;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns the kernel's BPF run-time statistics on, and back to what they were when dropped.
pub struct StatsEnabled {
    old: String,
}

impl StatsEnabled {
    pub fn enable() -> Result<Self> {
        let old = std::fs::read_to_string(SYSCTL).context("reading kernel.bpf_stats_enabled")?;
        std::fs::write(SYSCTL, "1").context("sysctl -w kernel.bpf_stats_enabled=1")?;
        Ok(Self { old: old.trim().to_string() })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(SYSCTL, &self.old) {
            eprintln!("xtask bench: could not restore kernel.bpf_stats_enabled={}: {e}", self.old);
        }
    }
}

/// Cumulative (runs, run ns) of one program.
#[derive(Clone, Copy, Default)]
pub struct Counts {
    pub runs: u64,
    pub ns: u64,
}

/// Counters of the programs a process holds, by program name.
pub type Snapshot = BTreeMap<String, Counts>;

/// The programs `pid` has loaded. This bpftool has no "pids" field, so the program IDs come
/// from the process's own fds (/proc/PID/fdinfo, which also carries the counters) and their
/// names from `bpftool prog show`.
pub struct Programs {
    pid: u32,
    names: BTreeMap<u64, String>,
    /// Names of the programs on uprobes. Their hits cost the target a trap that run_time_ns
    /// does not include (uprobes and kprobes are one program type; stalltrace has no kprobe).
    pub uprobes: BTreeSet<String>,
}

impl Programs {
    pub fn of(pid: u32) -> Result<Self> {
        let ids: Vec<u64> = fdinfo_counters(pid)?.into_keys().collect();
        let ours: Vec<Value> = bpftool_programs()?.into_iter().filter(|p| p["id"].as_u64().is_some_and(|id| ids.contains(&id))).collect();
        let name = |p: &Value| p["name"].as_str().map(str::to_string);
        let names: BTreeMap<u64, String> = ours.iter().filter_map(|p| Some((p["id"].as_u64()?, name(p)?))).collect();
        if names.is_empty() {
            bail!("PID {pid} holds no BPF programs bpftool knows");
        }
        let uprobes = ours.iter().filter(|p| p["type"] == "kprobe").filter_map(name).collect();
        Ok(Self { pid, names, uprobes })
    }

    pub fn snapshot(&self) -> Result<Snapshot> {
        let counters = fdinfo_counters(self.pid)?;
        Ok(self.names.iter().map(|(id, name)| (name.clone(), counters.get(id).copied().unwrap_or_default())).collect())
    }
}

/// What happened between two snapshots.
pub fn delta(before: &Snapshot, after: &Snapshot) -> Snapshot {
    after
        .iter()
        .map(|(name, a)| {
            let b = before.get(name).copied().unwrap_or_default();
            (name.clone(), Counts { runs: a.runs.saturating_sub(b.runs), ns: a.ns.saturating_sub(b.ns) })
        })
        .collect()
}

/// prog_id -> counters, for every BPF program fd of `pid` (link fds name a prog_id too, but
/// carry no counters, so only program fds are kept).
fn fdinfo_counters(pid: u32) -> Result<BTreeMap<u64, Counts>> {
    let mut out = BTreeMap::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).with_context(|| format!("PID {pid} fdinfo"))? {
        let info = std::fs::read_to_string(fd?.path()).unwrap_or_default();
        let field = |key: &str| {
            info.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(runs), Some(ns)) = (field("prog_id:"), field("run_cnt:"), field("run_time_ns:")) {
            out.insert(id, Counts { runs, ns });
        }
    }
    Ok(out)
}

/// Names of the tracing programs loaded right now. Between sections the bench has none of its
/// own, so any listed belong to someone else and run on the workloads' events too.
pub fn tracing_programs() -> Result<Vec<String>> {
    let tracing = ["tracepoint", "kprobe", "raw_tracepoint", "tracing", "perf_event"];
    Ok(bpftool_programs()?
        .iter()
        .filter(|p| p["type"].as_str().is_some_and(|t| tracing.contains(&t)))
        .map(|p| p["name"].as_str().unwrap_or("?").to_string())
        .collect())
}

/// Every loaded program, as `bpftool prog show -j` describes it.
fn bpftool_programs() -> Result<Vec<Value>> {
    let listing = procs::output_within(
        "bpftool",
        Command::new("bpftool").args(["prog", "show", "-j"]),
        Duration::from_secs(30),
    )?;
    match serde_json::from_str(&listing).context("bpftool prog show -j output")? {
        Value::Array(progs) => Ok(progs),
        other => bail!("bpftool prog show -j printed {other}"),
    }
}
