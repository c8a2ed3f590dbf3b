//! Was the machine ours during a run? On a shared 2-CPU machine a compile or a test suite
//! next door halves Redis's throughput for minutes, in whatever variant happens to be running,
//! and no number of rounds medians that away; so does a busy host under the VM. So every run
//! measures the CPU that processes other than the bench and its children used meanwhile, and
//! the host's speed right after (`host_speed`), and a disturbed run is repeated.
use std::{
    cell::Cell,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{
    host_speed::{self, HostSpeed},
    procs,
};

/// Other processes' CPU, in % of one CPU over the run, above which a run is repeated.
pub const LIMIT_PCT: f64 = 10.0;
const ATTEMPTS: usize = 4;
/// Pause before a repeat, so that a burst next door can end.
const BACKOFF: Duration = Duration::from_secs(5);

/// The host's speed, how many runs were repeated, and how many were kept although still
/// disturbed.
#[derive(Default)]
pub struct Tally {
    pub host: HostSpeed,
    pub repeated: Cell<u32>,
    pub kept_disturbed: Cell<u32>,
}

/// A run's result, the foreign CPU (% of one CPU) during it, and how much slower than its
/// best the host was right after it.
pub struct Quiet<T> {
    pub value: T,
    pub foreign_pct: f64,
    pub host_slowdown: f64,
    /// The CPUs' cache-line round trip right before and right after it, against the
    /// session's fastest (`HostSpeed::placement`).
    pub placement: [f64; 2],
}

impl<T> Quiet<T> {
    /// Whether the vCPUs were placed apart for the whole run (Some(true)), together (Some(false)),
    /// or moved during it (None).
    pub fn placed_apart(&self) -> Option<bool> {
        let [before, after] = self.placement.map(|p| p > host_speed::PLACEMENT_LIMIT);
        (before == after).then_some(before)
    }

    fn disturbed(&self) -> bool {
        self.foreign_pct > LIMIT_PCT || self.host_slowdown > host_speed::LIMIT
    }

    fn why(&self) -> String {
        format!(
            "others used {:.1}% CPU, host {:.3}x its best, CPU 0-1 round trip {:.1}x/{:.1}x its best before/after",
            self.foreign_pct, self.host_slowdown, self.placement[0], self.placement[1]
        )
    }

    /// For raw lines.
    pub fn note(&self) -> String {
        if self.disturbed() { format!(" | DISTURBED: {}", self.why()) } else { format!(" | {}", self.why()) }
    }
}

/// Runs `f` until a run is quiet, at most ATTEMPTS times; the last run is kept either way
/// (and counted in `tally`). `what` names the run in the messages.
pub fn run<T>(tally: &Tally, what: &str, mut f: impl FnMut() -> Result<T>) -> Result<Quiet<T>> {
    for attempt in 1.. {
        let placed = tally.host.placement();
        let before = CpuClock::now()?;
        let value = f()?;
        let foreign_pct = before.foreign_pct()?;
        let host_slowdown = tally.host.slowdown();
        let quiet = Quiet { value, foreign_pct, host_slowdown, placement: [placed, tally.host.placement()] };
        if !quiet.disturbed() {
            return Ok(quiet);
        }
        if attempt == ATTEMPTS {
            eprintln!("xtask bench: {what}: {} in all {ATTEMPTS} attempts; keeping the last", quiet.why());
            tally.kept_disturbed.set(tally.kept_disturbed.get() + 1);
            return Ok(quiet);
        }
        eprintln!("xtask bench: {what}: {}; repeating", quiet.why());
        tally.repeated.set(tally.repeated.get() + 1);
        thread::sleep(BACKOFF * attempt as u32);
    }
    unreachable!("the loop returns by its last attempt")
}

/// Machine-wide busy CPU time, and the part of it that was ours.
struct CpuClock {
    at: Instant,
    busy_ns: u64,
    ours_ns: u64,
}

impl CpuClock {
    fn now() -> Result<Self> {
        Ok(Self { at: Instant::now(), busy_ns: machine_busy_ns()?, ours_ns: our_cpu_ns()? })
    }

    /// CPU used since `self` by everything but us (steal time included: the host taking the
    /// CPU away disturbs a run as much), in % of one CPU.
    fn foreign_pct(&self) -> Result<f64> {
        let busy = machine_busy_ns()?.saturating_sub(self.busy_ns);
        let ours = our_cpu_ns()?.saturating_sub(self.ours_ns);
        Ok(100.0 * busy.saturating_sub(ours) as f64 / self.at.elapsed().as_nanos() as f64)
    }
}

/// Every non-idle column of /proc/stat's "cpu" line: user, nice, system, irq, softirq and
/// steal. Ticks that land in interrupts are charged to the interrupted task too (this kernel
/// has no IRQ time accounting), so irq and softirq belong to the comparison.
fn machine_busy_ns() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| ticks.get(i)).sum();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(busy * 1_000_000_000 / hz)
}

/// The bench's CPU, its reaped children's (wait4 adds them to RUSAGE_CHILDREN) and its live
/// children's (redis-server, the tracers, hotloop).
fn our_cpu_ns() -> Result<u64> {
    let rusage_ns = |who| {
        let mut ru = unsafe { std::mem::zeroed::<libc::rusage>() };
        unsafe { libc::getrusage(who, &mut ru) };
        let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        (us(ru.ru_utime) + us(ru.ru_stime)) * 1000
    };
    let mut total = rusage_ns(libc::RUSAGE_SELF) + rusage_ns(libc::RUSAGE_CHILDREN);
    for pid in live_children()? {
        total += procs::cpu_ns(pid).unwrap_or(0);
    }
    Ok(total)
}

fn live_children() -> Result<Vec<u32>> {
    let me = std::process::id();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The fields after the parenthesised comm: state, ppid, ...
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(me) {
            out.push(pid);
        }
    }
    Ok(out)
}
