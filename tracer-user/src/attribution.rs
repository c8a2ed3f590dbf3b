//! Turns the kernel's per-iteration accounting into a verdict: which cause explains the
//! largest share of a stall, and how much each cause explains.
use serde::Serialize;
use tracer_common::{Components, StallEvent, TOP_SYSCALLS};

use crate::{
    net::StallNet,
    stacks::collect::{AllocSplit, WeightedStack},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// madvise/munmap/mremap and allocator time: memory handed back to the kernel on the loop thread.
    AllocatorPurge,
    /// Off CPU: blocked (sleep, I/O, lock) or runnable but preempted.
    OffCpu,
    /// On CPU inside other syscalls.
    Syscall,
    /// On CPU in the application's own code: what no probe covers.
    AppCode,
    /// Accepting, setting up and closing a burst of connections.
    ConnectionStorm,
}

/// An iteration that accepted at least this many connections was handling a burst: its own
/// code's time is taken to be connection set-up.
pub const BURST_ACCEPTS: u64 = 32;

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::AllocatorPurge => "allocator_purge",
            Verdict::OffCpu => "off_cpu",
            Verdict::Syscall => "syscall",
            Verdict::AppCode => "app_code",
            Verdict::ConnectionStorm => "connection_storm",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Purge {
    pub calls: u64,
    pub ns: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Alloc {
    /// Calls timed by the uprobes (--alloc-calls); 0 when sampled.
    pub calls: u64,
    pub ns: u64,
    /// Sampled mode: the stall's samples in unexplained time, and how many were inside the
    /// allocator. `ns` is then that share of the unexplained time (an estimate, 10 ms steps).
    pub samples: u64,
    pub samples_in_allocator: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct OffCpu {
    pub runnable_ns: u64,
    pub blocked_ns: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Syscalls {
    /// Sampler ticks (one per 10 ms) that found the thread on CPU in one of them: no probe
    /// counts calls, so a count of calls is not known.
    pub samples: u64,
    pub ns: u64,
    /// Name of the syscall with the most wall time (off-CPU included) in this stall.
    pub top: Option<String>,
    /// The costliest syscalls by name and wall time, most expensive first.
    pub by_name: Vec<(String, u64)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Connections {
    /// accept, close, epoll_ctl, setsockopt... calls and their on-CPU time.
    pub calls: u64,
    pub ns: u64,
    pub accepts: u64,
}

/// Percent of the stall each cause explains; they add up to 100 (app_code is the remainder).
#[derive(Clone, Debug, Serialize)]
pub struct Shares {
    pub allocator_purge: f64,
    pub off_cpu: f64,
    pub syscall: f64,
    pub connection_storm: f64,
    pub app_code: f64,
}

/// One attributed stall: the record the CLI prints and the JSON schema.
#[derive(Clone, Debug, Serialize)]
pub struct Stall {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub start_ns: u64,
    pub duration_ns: u64,
    pub verdict: Verdict,
    pub explained_pct: f64,
    pub madvise: Purge,
    pub munmap: Purge,
    pub mremap: Purge,
    pub alloc: Alloc,
    pub off_cpu: OffCpu,
    pub syscalls: Syscalls,
    pub connections: Connections,
    pub app_code_ns: u64,
    pub shares: Shares,
    /// The target's listeners during the stall and just after; set once the window is sampled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net: Option<StallNet>,
    /// The heaviest stack (root first, leaf last), and the heaviest few with their weights.
    pub stack: Vec<String>,
    pub stacks: Vec<WeightedStack>,
}

impl Alloc {
    /// "12.0ms in 3 calls" (timed) or "~12.0ms, 7/9 samples" (sampled); None when neither saw it.
    pub fn describe(&self) -> Option<String> {
        if self.calls > 0 {
            Some(format!("{} in {} calls", crate::histogram::human_ns(self.ns), self.calls))
        } else if self.samples_in_allocator > 0 {
            Some(format!("~{}, {}/{} samples", crate::histogram::human_ns(self.ns), self.samples_in_allocator, self.samples))
        } else {
            None
        }
    }
}

impl Stall {
    /// The innermost user frame of the heaviest stack: where the time was going.
    pub fn top_frame(&self) -> Option<&str> {
        self.stack.iter().rev().find(|f| !f.starts_with("[k] ")).map(String::as_str)
    }
}

/// `split`: how the stall's samples of unexplained time fell, when the alloc group samples.
pub fn attribute(ev: &StallEvent, split: AllocSplit) -> Stall {
    let p = &with_sampled_alloc(ev, split);
    let duration = ev.duration_ns.max(1);
    let (purge, off_cpu) = (purge_ns(p), off_cpu_ns(p));
    let measured = measured_ns(p);
    let mut app = duration.saturating_sub(measured);
    let mut conn = p.conn_ns;
    if p.accepts >= BURST_ACCEPTS {
        conn += app;
        app = 0;
    }
    let covered = measured.max(purge + off_cpu + p.syscall_ns + conn);
    let candidates = [
        (Verdict::AllocatorPurge, purge),
        (Verdict::OffCpu, off_cpu),
        (Verdict::Syscall, p.syscall_ns),
        (Verdict::ConnectionStorm, conn),
        (Verdict::AppCode, app),
    ];
    // Ties go to the first listed: a measured cause beats the unexplained remainder.
    let (verdict, explained) = candidates
        .iter()
        .copied()
        .fold((Verdict::AppCode, 0), |best, c| if c.1 > best.1 { c } else { best });
    let pct = |ns: u64| round1(ns as f64 * 100.0 / duration.max(covered) as f64);
    let by_name = top_syscalls(&p.top_nr, &p.top_ns);
    Stall {
        kind: "stall",
        pid: ev.pid,
        tid: ev.tid,
        comm: comm_str(&ev.comm),
        start_ns: ev.start_ns,
        duration_ns: ev.duration_ns,
        verdict,
        explained_pct: pct(explained),
        madvise: Purge { calls: p.madvise_calls, ns: p.madvise_ns, bytes: p.madvise_bytes },
        munmap: Purge { calls: p.munmap_calls, ns: p.munmap_ns, bytes: p.munmap_bytes },
        mremap: Purge { calls: p.mremap_calls, ns: p.mremap_ns, bytes: p.mremap_bytes },
        alloc: Alloc {
            calls: p.alloc_calls,
            ns: p.alloc_ns,
            samples: split.samples,
            samples_in_allocator: split.in_allocator,
        },
        off_cpu: OffCpu { runnable_ns: p.runnable_ns, blocked_ns: p.blocked_ns },
        syscalls: Syscalls {
            samples: p.syscall_samples,
            ns: p.syscall_ns,
            top: by_name.first().map(|(n, _)| n.clone()),
            by_name,
        },
        connections: Connections { calls: p.conn_calls, ns: p.conn_ns, accepts: p.accepts },
        app_code_ns: app,
        shares: Shares {
            allocator_purge: pct(purge),
            off_cpu: pct(off_cpu),
            syscall: pct(p.syscall_ns),
            connection_storm: pct(conn),
            app_code: pct(app),
        },
        net: None,
        stack: Vec::new(),
        stacks: Vec::new(),
    }
}

/// The parts with the allocator's sampled share of the time no probe measured added to its
/// measured time: the sampler ran only once the iteration was past the threshold, so the
/// share is taken to hold for the whole of that time.
fn with_sampled_alloc(ev: &StallEvent, split: AllocSplit) -> Components {
    let mut p = ev.parts;
    if split.samples == 0 {
        return p;
    }
    let unexplained = ev.duration_ns.saturating_sub(measured_ns(&p));
    p.alloc_ns += (u128::from(unexplained) * u128::from(split.in_allocator) / u128::from(split.samples)) as u64;
    p
}

fn purge_ns(p: &Components) -> u64 {
    p.madvise_ns + p.munmap_ns + p.mremap_ns + p.alloc_ns
}

fn off_cpu_ns(p: &Components) -> u64 {
    p.runnable_ns + p.blocked_ns
}

/// Time some probe accounts for; the rest of a stall is the application's own code.
fn measured_ns(p: &Components) -> u64 {
    purge_ns(p) + off_cpu_ns(p) + p.syscall_ns + p.conn_ns
}

fn top_syscalls(nrs: &[u32; TOP_SYSCALLS], ns: &[u64; TOP_SYSCALLS]) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = nrs
        .iter()
        .zip(ns)
        .filter(|(nr, _)| **nr != 0)
        .map(|(nr, ns)| (syscall_name(u64::from(*nr - 1)), *ns))
        .collect();
    v.sort_by_key(|&(_, ns)| std::cmp::Reverse(ns));
    v
}

pub fn syscall_name(nr: u64) -> String {
    syscalls::Sysno::new(nr as usize).map_or_else(|| format!("syscall_{nr}"), |s| s.name().to_string())
}

pub fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(duration_ns: u64, parts: Components) -> StallEvent {
        StallEvent { pid: 1, tid: 1, comm: *b"redis-server\0\0\0\0", start_ns: 0, duration_ns, parts }
    }

    #[test]
    fn purge_dominates() {
        let s = attribute(&event(100, Components { madvise_ns: 80, alloc_ns: 5, madvise_calls: 1, ..Default::default() }), AllocSplit::default());
        assert_eq!(s.verdict, Verdict::AllocatorPurge);
        assert_eq!(s.explained_pct, 85.0);
        assert_eq!(s.app_code_ns, 15);
        assert_eq!(s.comm, "redis-server");
    }

    #[test]
    fn sampled_allocator_share_of_the_unexplained_time() {
        let parts = Components { blocked_ns: 200, ..Default::default() };
        let s = attribute(&event(1000, parts), AllocSplit { samples: 10, in_allocator: 7 });
        assert_eq!(s.verdict, Verdict::AllocatorPurge);
        assert_eq!(s.alloc.ns, 560, "7 of 10 samples of the 800 ns nothing measured");
        assert_eq!(s.app_code_ns, 240);
        assert_eq!(s.alloc.samples_in_allocator, 7);
    }

    #[test]
    fn unexplained_time_is_app_code() {
        let s = attribute(&event(1000, Components { blocked_ns: 100, syscall_ns: 50, ..Default::default() }), AllocSplit::default());
        assert_eq!(s.verdict, Verdict::AppCode);
        assert_eq!(s.explained_pct, 85.0);
    }

    #[test]
    fn a_burst_of_accepts_is_a_connection_storm() {
        let parts = Components { conn_ns: 400, accepts: 5000, syscall_ns: 100, ..Default::default() };
        let s = attribute(&event(1000, parts), AllocSplit::default());
        assert_eq!(s.verdict, Verdict::ConnectionStorm);
        assert_eq!(s.explained_pct, 90.0, "connection syscalls plus the loop's own code");
        let few = attribute(&event(1000, Components { conn_ns: 400, accepts: 3, ..Default::default() }), AllocSplit::default());
        assert_eq!(few.verdict, Verdict::AppCode);
    }

    #[test]
    fn sleep_is_off_cpu_and_names_top_syscall() {
        let mut parts = Components { blocked_ns: 900, syscall_ns: 10, ..Default::default() };
        parts.top_nr[0] = 35 + 1;
        parts.top_ns[0] = 10;
        let s = attribute(&event(1000, parts), AllocSplit::default());
        assert_eq!(s.verdict, Verdict::OffCpu);
        assert_eq!(s.syscalls.top.as_deref(), Some(syscall_name(35).as_str()));
    }
}
