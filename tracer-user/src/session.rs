//! One tracing session: the attached probes, the ring buffer of stall records, and the
//! refreshes that copy the kernel's histograms and in-progress iterations into the `App`
//! (the histograms when a front end asks, the in-progress ones at every `drain`).
use std::{
    cell::Cell,
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, MapData, PerCpuHashMap, RingBuf, StackTraceMap};
use tracer_common::{CLAIM_TRIES, IterHist, StallEvent, ThreadState, group, maps};

use crate::{
    app::{App, InProgress, ThreadView},
    attribution::{self, Stall, comm_str},
    histogram::{Histogram, human_ns},
    ongoing::{self, Ongoing, OngoingWatch},
    net::{
        AFTER_STALL_NS, NetDelta, NetMonitor,
        storm::{Storm, StormDetector},
    },
    probes::{ProbeConfig, Probes, sparse::SparseKeys},
    report::clock_ns,
    stacks::{
        allocator::AllocatorFrames,
        collect::{AllocSplit, STACKS_PER_STALL, StackCollector},
    },
    starvation::{StarvationMonitor, StarveConfig, Starvation},
    target::{self, Target},
};

pub struct TraceOptions {
    pub pid: u32,
    pub threshold_ns: u64,
    pub duration: Option<Duration>,
    pub probes: ProbeConfig,
    /// Connection attempts per second on one listener that make a storm.
    pub storm_rate: u64,
    pub starvation: StarveConfig,
}

/// What the front ends print.
// A handful a drain, printed at once: boxing the large stall would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    Stall(Stall),
    Storm(Storm),
    Starvation(Starvation),
    Ongoing(Ongoing),
}

/// How often the process's threads are looked at for starvation.
const STARVE_POLL: Duration = Duration::from_millis(500);
/// How often the loop threads are looked at for iterations past the threshold: to announce
/// them (`ongoing`) and to read a sleeping one's stack.
const WATCH_EVERY: Duration = Duration::from_millis(100);
/// Reading /proc/PID/stat walks the target's threads: twice a second notices an exit soon
/// enough.
const ALIVE_EVERY: Duration = Duration::from_millis(500);

/// The net group's part of a session.
struct Net {
    monitor: NetMonitor,
    storms: StormDetector,
    fed_ns: u64,
    /// Stalls waiting for the 500 ms after them to be sampled.
    pending: Vec<Stall>,
}

pub struct Session {
    probes: Probes,
    ring: RingBuf<MapData>,
    target: Target,
    net: Option<Net>,
    stacks: Option<StackCollector>,
    /// When the loop threads are next looked at for stalled iterations.
    watch_due: Instant,
    ongoing: OngoingWatch,
    starvation: Option<(StarvationMonitor, Instant)>,
    pub app: App,
    stop: Arc<AtomicBool>,
    deadline: Option<Instant>,
    alive_due: Cell<Instant>,
    thread_keys: SparseKeys,
}

impl Session {
    /// Checks the target and the privileges, then loads and attaches every requested group.
    /// `stop` ends the session when set (signal handlers own it).
    pub fn attach(opts: &TraceOptions, stop: Arc<AtomicBool>) -> Result<Self> {
        target::check_privileges()?;
        target::check_btf()?;
        let target = Target::open(opts.pid)?;
        let mut probes = Probes::load(&opts.probes, target.pid, opts.threshold_ns)?;
        probes.attach(&opts.probes, &target)?;
        probes.seed_waiting_threads(target.pid)?;
        let ring = RingBuf::try_from(probes.ebpf.take_map(maps::STALLS).context("STALLS map")?)?;
        let net = if opts.probes.groups & group::NET != 0 { Some(start_net(&mut probes, &target, opts)?) } else { None };
        let stacks = if opts.probes.groups & group::STACKS != 0 { Some(start_stacks(&mut probes, &opts.probes)?) } else { None };
        let starvation = if opts.probes.groups & group::PARK != 0 {
            let parked = HashMap::try_from(probes.ebpf.take_map(maps::PARKED).context("PARKED map")?)?;
            let watched = Array::try_from(probes.ebpf.take_map(maps::PARK_WATCHED).context("PARK_WATCHED map")?)?;
            Some((StarvationMonitor::new(target.pid, parked, watched, opts.starvation.clone())?, Instant::now()))
        } else {
            None
        };
        let app = App::new(target.pid, target.comm.clone(), opts.threshold_ns);
        let deadline = opts.duration.map(|d| Instant::now() + d);
        Ok(Self {
            probes,
            ring,
            target,
            net,
            stacks,
            watch_due: Instant::now(),
            ongoing: OngoingWatch::default(),
            starvation,
            app,
            stop,
            deadline,
            alive_due: Cell::new(Instant::now()),
            thread_keys: SparseKeys::default(),
        })
    }

    pub fn banner(&self) -> String {
        let mut text = format!(
            "tracing PID {} ({}), stalls >= {}; probes: {}",
            self.target.pid,
            self.target.comm,
            human_ns(self.app.threshold_ns),
            self.probes.attached.join(", ")
        );
        for note in &self.probes.notes {
            text += &format!("\nstalltrace: note: {note}");
        }
        text
    }

    /// Why the session should end now, if it should.
    pub fn finished(&self) -> Option<String> {
        if self.stop.load(Ordering::Relaxed) {
            return Some("interrupted".into());
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Some("duration reached".into());
        }
        if Instant::now() < self.alive_due.get() {
            return None;
        }
        self.alive_due.set(Instant::now() + ALIVE_EVERY);
        (!self.target.is_alive()).then(|| format!("PID {} exited", self.target.pid))
    }

    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Sleeps until a stall record arrives or `timeout` passes; a signal also wakes it.
    pub fn wait(&self, timeout: Duration) {
        let mut pfd = libc::pollfd { fd: self.ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    }

    /// Everything ready to report: stalls (with their net window once it is sampled) and
    /// storms that ended. `flush` releases what would otherwise still wait.
    pub fn drain(&mut self, flush: bool) -> Vec<Event> {
        self.probes.learn_purge_sites(self.target.pid);
        let mut events = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() < size_of::<StallEvent>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole StallEvent; the ring buffer only guarantees
            // 8-byte alignment, so read it unaligned.
            events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<StallEvent>()) });
        }
        let noticed = self.watch_stalled(&events);
        // Read after the stalls: an iteration's stacks were submitted before its stall was.
        if let Some(collector) = self.stacks.as_mut() {
            collector.drain(clock_ns(libc::CLOCK_MONOTONIC));
        }
        let stalls: Vec<Stall> = events.iter().map(|ev| self.attribute(ev)).collect();
        let mut events: Vec<Event> = self.ongoing_records(noticed).into_iter().map(Event::Ongoing).collect();
        events.extend(match self.net.as_mut() {
            None => stalls.into_iter().map(Event::Stall).collect(),
            Some(net) => net.advance(stalls, &self.app, self.target.pid, flush),
        });
        if let Some((monitor, next)) = self.starvation.as_mut()
            && Instant::now() >= *next
        {
            *next = Instant::now() + STARVE_POLL;
            events.extend(monitor.poll().map(Event::Starvation));
        }
        for e in &events {
            match e {
                Event::Stall(s) => self.app.record(s.clone()),
                Event::Storm(s) => self.app.storms.push(s.clone()),
                Event::Starvation(s) => self.app.starvation(s.clone()),
                Event::Ongoing(_) => {}
            }
        }
        events
    }

    /// A stall record with its stacks, and the allocator's share of its samples.
    fn attribute(&mut self, ev: &StallEvent) -> Stall {
        let Some(collector) = self.stacks.as_mut() else { return attribution::attribute(ev, AllocSplit::default()) };
        let mut s = attribution::attribute(ev, collector.take_split(ev.tid, ev.start_ns));
        s.stacks = collector.take(s.tid, s.start_ns);
        s.stack = s.stacks.first().map(|w| w.frames.clone()).unwrap_or_default();
        s.stacks.truncate(STACKS_PER_STALL);
        s
    }

    /// This session's counts for the daemon's metrics.
    pub fn metrics(&self) -> crate::daemon::TargetMetrics {
        let app = &self.app;
        crate::daemon::TargetMetrics {
            pid: app.pid,
            stalls: app.by_verdict.iter().map(|(v, n)| (v.as_str(), *n)).collect(),
            storms: app.storms.len() as u64,
            starvations: app.starvations,
            overflows: self.net_totals().map_or(0, |(per, _)| per.iter().map(|(_, d)| d.overflows).sum()),
            lost: app.lost + app.lost_stacks,
            iter: app.combined(|t| &t.iter),
            purge: app.combined(|t| &t.purge),
            alloc: app.combined(|t| &t.alloc),
            stalled_for_ns: app.in_progress.iter().map(|p| p.elapsed_ns).max().unwrap_or(0),
        }
    }

    /// Run time (ns) and runs of this session's programs, while BPF run-time stats are on.
    pub fn bpf_run_stats(&self) -> (u64, u64) {
        self.probes.run_stats()
    }

    /// Per-listener totals and the namespace's ListenOverflows delta, when the net group runs.
    pub fn net_totals(&self) -> Option<(Vec<(crate::net::ListenerSample, NetDelta)>, u64)> {
        self.net.as_ref().map(|n| n.monitor.totals())
    }

    /// `refresh`, sure to see every thread: for a summary.
    pub fn refresh_all(&mut self) -> Result<()> {
        self.thread_keys.forget();
        self.refresh()
    }

    /// Copies the kernel's histograms and lost counts into the App (`drain` keeps its
    /// in-progress iterations, every `WATCH_EVERY`).
    pub fn refresh(&mut self) -> Result<()> {
        self.app.threads = self.thread_views()?;
        self.app.lost = self.probes.lost_stalls();
        self.app.lost_stacks = self.probes.lost_stacks();
        self.app.untracked_threads = self.probes.untracked_threads();
        self.app.threads_without_histogram = self.probes.threads_without_histogram();
        self.app.late_begins = self.probes.late_begins();
        self.app.untimed_purges = self.probes.untimed_purges();
        self.app.purge_sites = self.probes.purge_site_counts();
        self.app.stacks_received = self.stacks.as_ref().map_or(0, |c| c.received);
        self.refresh_listeners();
        Ok(())
    }

    fn refresh_listeners(&mut self) {
        if let Some(net) = &self.net {
            let since = clock_ns(libc::CLOCK_MONOTONIC).saturating_sub(crate::app::RATE_HISTORY_NS);
            self.app.listeners = crate::app::listener_views(&net.monitor.samples_since(since));
        }
    }

    /// Every histogram slot the kernel claimed: a handful of reads, not a walk of the map.
    fn thread_views(&mut self) -> Result<Vec<ThreadView>> {
        let used: Array<_, u64> = Array::try_from(self.probes.ebpf.map(maps::HIST_USED).context("HIST_USED map")?)?;
        let hists: Array<_, IterHist> =
            Array::try_from(self.probes.ebpf.map(maps::ITER_HIST).context("ITER_HIST map")?)?;
        let claimed = (used.get(&0, 0)? + u64::from(CLAIM_TRIES)).min(u64::from(hists.len())) as u32;
        let pid = self.target.pid;
        let mut views: Vec<ThreadView> = (0..claimed)
            .map(|slot| hists.get(&slot, 0))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|h| h.tgid == pid && h.tid != 0)
            .map(|h| ThreadView {
                tid: h.tid,
                comm: comm_str(&h.comm),
                iter: Histogram::new(&h.iter, h.iter_max_ns),
                purge: Histogram::new(&h.purge, 0),
                alloc: Histogram::new(&h.alloc, 0),
                purge_bytes: h.purge_bytes,
            })
            .collect();
        views.sort_by_key(|t| t.tid);
        Ok(views)
    }

    /// Every `WATCH_EVERY`: the stalled iterations not announced yet, as (tid, start,
    /// elapsed), given the stall records just read (`ended`); and, as no probe sees a
    /// syscall's exit, the stacks of loop threads asleep in one, read from /proc (running ones
    /// are sampled in the kernel).
    fn watch_stalled(&mut self, ended: &[StallEvent]) -> Vec<(u32, u64, u64)> {
        if Instant::now() < self.watch_due {
            return Vec::new();
        }
        self.watch_due = Instant::now() + WATCH_EVERY;
        let Ok(stalled) = self.stalled_iterations() else { return Vec::new() };
        // The live view shows them as soon as they are announced.
        self.app.in_progress = self.in_progress_of(&stalled);
        if let Some(collector) = self.stacks.as_mut() {
            for &(tid, start, elapsed) in &stalled {
                collector.sample_blocked(self.target.pid, tid, start, elapsed, self.app.threshold_ns);
            }
        }
        let ended: Vec<(u32, u64)> = ended.iter().map(|e| (e.tid, e.start_ns)).collect();
        self.ongoing.observe(&stalled, &ended)
    }

    /// The notices for newly seen stalls, each with the latest stack taken in it, once the
    /// sampler's records have been read: where the thread is stuck, while it is.
    fn ongoing_records(&self, noticed: Vec<(u32, u64, u64)>) -> Vec<Ongoing> {
        let comm_of = |tid: u32| self.app.in_progress.iter().find(|p| p.tid == tid).map(|p| p.comm.clone());
        noticed
            .into_iter()
            .map(|(tid, start_ns, elapsed_ns)| Ongoing {
                kind: "stall_ongoing",
                pid: self.target.pid,
                tid,
                comm: comm_of(tid).unwrap_or_else(|| self.target.comm.clone()),
                start_ns,
                elapsed_ns,
                stack: self.stacks.as_ref().and_then(|c| c.latest(tid, start_ns)).map(|w| w.frames.clone()).unwrap_or_default(),
            })
            .collect()
    }

    /// (tid, iteration start, elapsed) of every iteration past the threshold right now.
    fn stalled_iterations(&mut self) -> Result<Vec<(u32, u64, u64)>> {
        let map: HashMap<_, u32, ThreadState> =
            HashMap::try_from(self.probes.ebpf.map(maps::THREADS).context("THREADS map")?)?;
        let now = clock_ns(libc::CLOCK_MONOTONIC);
        let pid = self.target.pid;
        Ok(self
            .thread_keys
            .read(&map, |s| s.tgid == pid)
            .into_iter()
            .filter(|(_, s)| s.iter_start_ns != 0)
            .map(|(tid, s)| (tid, s.iter_start_ns, now.saturating_sub(s.iter_start_ns)))
            .filter(|&(_, _, elapsed)| elapsed >= self.app.threshold_ns)
            .collect())
    }

    /// Iterations running longer than the threshold right now: a stall shows while it lasts.
    fn in_progress_of(&self, stalled: &[(u32, u64, u64)]) -> Vec<InProgress> {
        let (pid, comm) = (self.target.pid, &self.target.comm);
        stalled
            .iter()
            .map(|&(tid, start, elapsed_ns)| InProgress {
                tid,
                start_ns: start,
                comm: ongoing::thread_comm(pid, tid, comm),
                elapsed_ns,
                at: self.stacks.as_ref().and_then(|c| c.latest(tid, start)).and_then(|w| w.frames.last().cloned()).unwrap_or_default(),
            })
            .collect()
    }
}

fn start_stacks(probes: &mut Probes, config: &ProbeConfig) -> Result<StackCollector> {
    let ring = RingBuf::try_from(probes.ebpf.take_map(maps::STACK_EVENTS).context("STACK_EVENTS map")?)?;
    let kstacks = StackTraceMap::try_from(probes.ebpf.take_map(maps::KSTACKS).context("KSTACKS map")?)?;
    // With --alloc-calls the uprobes time the allocator exactly: samples must not add to it.
    let sampled = config.groups & group::ALLOC != 0 && !config.alloc_calls;
    let allocator = sampled.then(|| AllocatorFrames::new(&probes.alloc_symbols, config.alloc_funcs.as_deref().unwrap_or_default()));
    Ok(StackCollector::new(ring, kstacks, allocator))
}

fn start_net(probes: &mut Probes, target: &Target, opts: &TraceOptions) -> Result<Net> {
    let take = |probes: &mut Probes, name| probes.ebpf.take_map(name).with_context(|| format!("{name} map"));
    let listeners = PerCpuHashMap::try_from(take(probes, maps::LISTENERS)?)?;
    let stats = PerCpuHashMap::try_from(take(probes, maps::TARGET_STATS)?)?;
    let counts_syns = probes.counts_syns();
    let monitor = NetMonitor::start(target.pid, listeners, stats, counts_syns)?;
    let fed_ns = monitor.latest_ns();
    Ok(Net { monitor, storms: StormDetector::new(opts.storm_rate, counts_syns), fed_ns, pending: Vec::new() })
}

impl Net {
    fn advance(&mut self, new: Vec<Stall>, app: &App, pid: u32, flush: bool) -> Vec<Event> {
        self.pending.extend(new);
        let mut out = Vec::new();
        let samples = self.monitor.samples_since(self.fed_ns);
        let mut spans: Vec<_> = samples.iter().flat_map(|s| self.storms.feed(s)).collect();
        if let Some(last) = samples.last() {
            self.fed_ns = last.t_ns;
        }
        let latest = self.monitor.latest_ns();
        // A stall is reported once the 500 ms after it have been sampled.
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|s| flush || s.start_ns + s.duration_ns + AFTER_STALL_NS <= latest);
        self.pending = waiting;
        for mut s in ready {
            s.net = Some(self.monitor.stall_net(s.start_ns, s.start_ns + s.duration_ns));
            out.push(Event::Stall(s));
        }
        if flush {
            spans.extend(self.storms.flush());
        }
        if !spans.is_empty() {
            let stalls = known_stalls(app, &out, &self.pending);
            let mut storms = app.storms.clone();
            for mut span in spans {
                // Accepts are counted per process, not per listener.
                span.delta.accepts = self.monitor.accepts_between(span.start_ns, span.end_ns);
                let storm = Storm::new(pid, span, &stalls, &storms);
                storms.push(storm.clone());
                out.push(Event::Storm(storm));
            }
        }
        out
    }
}

/// (start, end, tid) of every stall a storm could be linked to: reported, being reported now,
/// waiting for their net window, and still in progress.
fn known_stalls(app: &App, now: &[Event], pending: &[Stall]) -> Vec<(u64, u64, u32)> {
    let reported = app.stalls.iter().chain(pending).chain(now.iter().filter_map(|e| match e {
        Event::Stall(s) => Some(s),
        Event::Storm(_) | Event::Starvation(_) | Event::Ongoing(_) => None,
    }));
    let mut out: Vec<_> = reported.map(|s| (s.start_ns, s.start_ns + s.duration_ns, s.tid)).collect();
    // From the iteration's start, not from now minus the elapsed time last seen: a drain slowed
    // by a loaded host (a second, once) would shift the window past the storm's start.
    let now_ns = clock_ns(libc::CLOCK_MONOTONIC);
    out.extend(app.in_progress.iter().map(|p| (p.start_ns, now_ns, p.tid)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::InProgress;

    /// A storm is linked to a stall still going by the iteration's start, however long ago
    /// the in-progress view was last refreshed.
    #[test]
    fn an_in_progress_stall_spans_from_its_start() {
        let mut app = App::new(1, "x".into(), 10_000_000);
        let start_ns = clock_ns(libc::CLOCK_MONOTONIC) - 1_500_000_000;
        app.in_progress = vec![InProgress { tid: 7, comm: "x".into(), start_ns, elapsed_ns: 100_000_000, at: String::new() }];
        let known = known_stalls(&app, &[], &[]);
        assert_eq!(known.len(), 1);
        let (from, to, tid) = known[0];
        assert_eq!((from, tid), (start_ns, 7));
        assert!(to >= start_ns + 1_500_000_000);
    }
}
