//! What stalltrace prints: a line (or a JSON object) per stall, and a summary at exit.
use std::{
    collections::BTreeMap,
    io::{self, Write as _},
};

use serde::Serialize;

use crate::{
    attribution::{Stall, Verdict},
    histogram::{Bucket, Log2Hist, human_bytes, human_ns},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Human,
    Json,
}

/// Per-thread iteration histogram, as read from the kernel at exit.
pub struct ThreadHist {
    pub tid: u32,
    pub comm: String,
    pub hist: Log2Hist,
}

#[derive(Serialize)]
struct ThreadSummary<'a> {
    tid: u32,
    comm: &'a str,
    iterations: u64,
    histogram: Vec<Bucket>,
}

#[derive(Serialize)]
struct Summary<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    pid: u32,
    traced_ns: u64,
    iterations: u64,
    stalls: u64,
    by_verdict: &'a BTreeMap<Verdict, u64>,
    lost: u64,
    threads: Vec<ThreadSummary<'a>>,
}

/// Everything the summary needs, gathered while tracing.
pub struct SummaryData {
    pub pid: u32,
    pub traced_ns: u64,
    pub by_verdict: BTreeMap<Verdict, u64>,
    pub lost: u64,
    pub threads: Vec<ThreadHist>,
}

pub struct Reporter {
    format: Format,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, to print kernel timestamps as wall-clock times.
    wall_offset_ns: i128,
}

impl Reporter {
    pub fn new(format: Format) -> Self {
        Self { format, wall_offset_ns: clock_ns(libc::CLOCK_REALTIME) as i128 - clock_ns(libc::CLOCK_MONOTONIC) as i128 }
    }

    pub fn stall(&self, s: &Stall) {
        let line = match self.format {
            Format::Json => serde_json::to_string(s).expect("stall serializes"),
            Format::Human => self.stall_line(s),
        };
        print_line(&line);
    }

    pub fn note(&self, msg: &str) {
        // Notes go to stderr so that --json output stays parseable.
        eprintln!("stalltrace: {msg}");
    }

    fn stall_line(&self, s: &Stall) -> String {
        let wall = (s.start_ns as i128 + self.wall_offset_ns) as u64;
        let mut line = format!(
            "{} {}[{}/{}] stall {} {} {:.0}% |",
            wall_clock(wall),
            s.comm,
            s.pid,
            s.tid,
            human_ns(s.duration_ns),
            s.verdict.as_str(),
            s.explained_pct
        );
        if s.madvise.calls > 0 {
            line += &format!(" madvise {} ({}x, {})", human_ns(s.madvise.ns), s.madvise.calls, human_bytes(s.madvise.bytes));
        }
        if s.munmap.calls > 0 {
            line += &format!(" munmap {} ({}x, {})", human_ns(s.munmap.ns), s.munmap.calls, human_bytes(s.munmap.bytes));
        }
        if s.mremap.calls > 0 {
            line += &format!(" mremap {} ({}x, {} released)", human_ns(s.mremap.ns), s.mremap.calls, human_bytes(s.mremap.bytes));
        }
        if s.alloc.calls > 0 {
            line += &format!(" alloc {} ({}x)", human_ns(s.alloc.ns), s.alloc.calls);
        }
        line += &format!(
            " off-cpu {} run/{} blk syscalls {}",
            human_ns(s.off_cpu.runnable_ns),
            human_ns(s.off_cpu.blocked_ns),
            human_ns(s.syscalls.ns)
        );
        if let Some(top) = &s.syscalls.top {
            line += &format!(" (top {top})");
        }
        line + &format!(" app {}", human_ns(s.app_code_ns))
    }

    pub fn summary(&self, d: &SummaryData) {
        let iterations: u64 = d.threads.iter().map(|t| t.hist.total()).sum();
        let stalls: u64 = d.by_verdict.values().sum();
        match self.format {
            Format::Json => {
                let threads = d
                    .threads
                    .iter()
                    .map(|t| ThreadSummary { tid: t.tid, comm: &t.comm, iterations: t.hist.total(), histogram: t.hist.buckets() })
                    .collect();
                let s = Summary {
                    kind: "summary",
                    pid: d.pid,
                    traced_ns: d.traced_ns,
                    iterations,
                    stalls,
                    by_verdict: &d.by_verdict,
                    lost: d.lost,
                    threads,
                };
                print_line(&serde_json::to_string(&s).expect("summary serializes"));
            }
            Format::Human => print_line(&self.summary_text(d, iterations, stalls)),
        }
    }

    fn summary_text(&self, d: &SummaryData, iterations: u64, stalls: u64) -> String {
        let mut out = format!(
            "\n== stalltrace summary: PID {} traced {}, {} iterations, {} stalls, {} lost records\n",
            d.pid,
            human_ns(d.traced_ns),
            iterations,
            stalls,
            d.lost
        );
        for (verdict, n) in &d.by_verdict {
            out += &format!("   {:<16} {n}\n", verdict.as_str());
        }
        if d.threads.is_empty() {
            out += "   no event-loop thread seen (no thread returned from epoll_wait/epoll_pwait)\n";
        }
        for t in &d.threads {
            out += &format!("\n   thread {} ({}) iteration times:\n", t.tid, t.comm);
            out += &t.hist.render("   ");
        }
        out
    }
}

fn print_line(line: &str) {
    let mut out = io::stdout().lock();
    // A closed pipe (| head) is not an error worth a panic.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// HH:MM:SS.mmm in local time.
fn wall_clock(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as libc::time_t;
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe { libc::localtime_r(&secs, &mut tm) };
    format!("{:02}:{:02}:{:02}.{:03}", tm.tm_hour, tm.tm_min, tm.tm_sec, (ns / 1_000_000) % 1000)
}
