//! What the views show, kept apart from how they draw it: stalls as they arrive, and the
//! kernel's histograms and in-progress iterations as of the last refresh.
use std::{
    collections::{BTreeMap, VecDeque},
    time::Instant,
};

use crate::{
    attribution::{Stall, Verdict},
    histogram::Histogram,
    net::{Sample, storm::Storm},
    starvation::Starvation,
};

/// Stalls kept for the views; the summary counts every one.
const KEEP_STALLS: usize = 10_000;

pub struct ThreadView {
    pub tid: u32,
    pub comm: String,
    pub iter: Histogram,
    pub purge: Histogram,
    pub alloc: Histogram,
    pub purge_bytes: u64,
}

/// An iteration already longer than the threshold that has not ended yet.
#[derive(Clone, Debug)]
pub struct InProgress {
    pub tid: u32,
    pub comm: String,
    /// When its iteration began (CLOCK_MONOTONIC).
    pub start_ns: u64,
    /// How long it had lasted when last looked at.
    pub elapsed_ns: u64,
    /// The innermost frame of the latest stack taken in it ("" before the first).
    pub at: String,
}

impl InProgress {
    /// ", now in FRAME" for the views, or nothing before the first stack.
    pub fn now_in(&self) -> String {
        if self.at.is_empty() { String::new() } else { format!(", now in {}", self.at) }
    }
}

/// How far back the live view's connection-rate sparkline reaches.
pub const RATE_HISTORY_NS: u64 = 6_000_000_000;

/// A listening socket as the live view shows it.
pub struct ListenerView {
    pub name: String,
    pub queue: u32,
    pub backlog: u32,
    /// Overflows and new connections over the history shown.
    pub overflows: u64,
    /// New connections per 100 ms, oldest first.
    pub rates: Vec<u64>,
}

pub struct App {
    pub pid: u32,
    pub comm: String,
    pub threshold_ns: u64,
    pub started: Instant,
    pub stalls: VecDeque<Stall>,
    pub by_verdict: BTreeMap<Verdict, u64>,
    pub threads: Vec<ThreadView>,
    pub in_progress: Vec<InProgress>,
    pub lost: u64,
    /// Stack samples the ring buffer could not take, and those received.
    pub lost_stacks: u64,
    pub stacks_received: u64,
    /// Loop threads the kernel could not track (its thread table was full): their stalls are
    /// not seen, which the summary must say.
    pub untracked_threads: u64,
    /// Loop threads traced without a histogram (every slot was claimed): their iterations are
    /// missing from the histograms, which the summary must say.
    pub threads_without_histogram: u64,
    /// Iterations whose start the kernel did not show (a switch back into the epoll wait that
    /// sched_switch never reported): timed from later than they began, or not at all.
    pub late_begins: u64,
    /// Purge calls inside iterations made from a call site not probed yet, after the stepped
    /// probe on their wrapper was retired: counted, not timed.
    pub untimed_purges: u64,
    /// How far the purge wrappers' call sites are learned, where they are.
    pub purge_sites: Option<crate::probes::callsites::SiteCounts>,
    pub storms: Vec<Storm>,
    pub listeners: Vec<ListenerView>,
    /// The starvation going on now, if any, and how many have been seen.
    pub starving: Option<Starvation>,
    pub starvations: u64,
}

impl App {
    pub fn new(pid: u32, comm: String, threshold_ns: u64) -> Self {
        Self {
            pid,
            comm,
            threshold_ns,
            started: Instant::now(),
            stalls: VecDeque::new(),
            by_verdict: BTreeMap::new(),
            threads: Vec::new(),
            in_progress: Vec::new(),
            lost: 0,
            lost_stacks: 0,
            stacks_received: 0,
            untracked_threads: 0,
            threads_without_histogram: 0,
            late_begins: 0,
            untimed_purges: 0,
            purge_sites: None,
            storms: Vec::new(),
            listeners: Vec::new(),
            starving: None,
            starvations: 0,
        }
    }

    pub fn starvation(&mut self, s: Starvation) {
        if s.state == "start" {
            self.starvations += 1;
        }
        self.starving = (s.state != "end").then_some(s);
    }

    pub fn record(&mut self, stall: Stall) {
        *self.by_verdict.entry(stall.verdict).or_default() += 1;
        if self.stalls.len() == KEEP_STALLS {
            self.stalls.pop_front();
        }
        self.stalls.push_back(stall);
    }

    pub fn stall_count(&self) -> u64 {
        self.by_verdict.values().sum()
    }

    pub fn iterations(&self) -> u64 {
        self.threads.iter().map(|t| t.iter.total()).sum()
    }

    /// Sum over the target's loop threads.
    pub fn combined(&self, pick: impl Fn(&ThreadView) -> &Histogram) -> Histogram {
        let mut h = Histogram::default();
        for t in &self.threads {
            h.add(pick(t));
        }
        h
    }

    pub fn purge_bytes(&self) -> u64 {
        self.threads.iter().map(|t| t.purge_bytes).sum()
    }
}

/// Listener views from the recent samples: queue now, and attempts per 100 ms.
pub fn listener_views(samples: &[Sample]) -> Vec<ListenerView> {
    let Some(last) = samples.last() else { return Vec::new() };
    last.listeners
        .iter()
        .map(|l| {
            let series: Vec<_> = samples.iter().filter_map(|s| s.listeners.iter().find(|o| o.key == l.key)).collect();
            let first = series.first().copied().unwrap_or(l);
            let rates = series
                .chunks(10)
                .map(|c| {
                    let (a, b) = (c[0], c[c.len() - 1]);
                    b.counters.established.saturating_sub(a.counters.established) + b.drops.saturating_sub(a.drops)
                })
                .collect();
            ListenerView {
                name: l.key.to_string(),
                queue: l.queue,
                backlog: l.backlog,
                overflows: l.drops.saturating_sub(first.drops),
                rates,
            }
        })
        .collect()
}
