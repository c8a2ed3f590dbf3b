//! One tracing session: the attached probes, the ring buffer of stall records, and the
//! refreshes that copy the kernel's histograms and in-progress iterations into the `App`.
use std::{
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData, RingBuf};
use tracer_common::{IterHist, StallEvent, ThreadState, maps};

use crate::{
    app::{App, InProgress, ThreadView},
    attribution::{self, Stall, comm_str},
    histogram::{Histogram, human_ns},
    probes::{ProbeConfig, Probes},
    report::clock_ns,
    target::{self, Target},
};

pub struct TraceOptions {
    pub pid: u32,
    pub threshold_ns: u64,
    pub duration: Option<Duration>,
    pub probes: ProbeConfig,
}

pub struct Session {
    probes: Probes,
    ring: RingBuf<MapData>,
    target: Target,
    pub app: App,
    stop: Arc<AtomicBool>,
    deadline: Option<Instant>,
}

impl Session {
    /// Checks the target and the privileges, then loads and attaches every requested group.
    pub fn attach(opts: &TraceOptions) -> Result<Self> {
        target::check_privileges()?;
        target::check_btf()?;
        let target = Target::open(opts.pid)?;
        let mut probes = Probes::load(&opts.probes)?;
        probes.add_target(target.pid, opts.threshold_ns)?;
        probes.attach(&opts.probes, &target)?;
        let stop = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, Arc::clone(&stop)).context("installing signal handler")?;
        }
        let ring = RingBuf::try_from(probes.ebpf.take_map(maps::STALLS).context("STALLS map")?)?;
        let app = App::new(target.pid, target.comm.clone(), opts.threshold_ns);
        Ok(Self { probes, ring, target, app, stop, deadline: opts.duration.map(|d| Instant::now() + d) })
    }

    pub fn banner(&self) -> String {
        format!(
            "tracing PID {} ({}), stalls >= {}; probes: {}",
            self.target.pid,
            self.target.comm,
            human_ns(self.app.threshold_ns),
            self.probes.attached.join(", ")
        )
    }

    /// Why the session should end now, if it should.
    pub fn finished(&self) -> Option<String> {
        if self.stop.load(Ordering::Relaxed) {
            return Some("interrupted".into());
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Some("duration reached".into());
        }
        if !self.target.is_alive() {
            return Some(format!("PID {} exited", self.target.pid));
        }
        None
    }

    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Sleeps until a stall record arrives or `timeout` passes; a signal also wakes it.
    pub fn wait(&self, timeout: Duration) {
        let mut pfd = libc::pollfd { fd: self.ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    }

    /// Attributes and records every stall waiting in the ring buffer; returns them too.
    pub fn drain(&mut self) -> Vec<Stall> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() < size_of::<StallEvent>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole StallEvent; the ring buffer only guarantees
            // 8-byte alignment, so read it unaligned.
            let ev = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<StallEvent>()) };
            out.push(attribution::attribute(&ev));
        }
        for s in &out {
            self.app.record(s.clone());
        }
        out
    }

    /// Copies the kernel's histograms, in-progress iterations and lost count into the App.
    pub fn refresh(&mut self) -> Result<()> {
        self.app.threads = self.thread_views()?;
        self.app.in_progress = self.in_progress()?;
        self.app.lost = self.probes.lost_stalls();
        Ok(())
    }

    fn thread_views(&self) -> Result<Vec<ThreadView>> {
        let map: HashMap<_, u32, IterHist> =
            HashMap::try_from(self.probes.ebpf.map(maps::ITER_HIST).context("ITER_HIST map")?)?;
        let mut views: Vec<ThreadView> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, h)| h.tgid == self.target.pid)
            .map(|(tid, h)| ThreadView {
                tid,
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

    /// Iterations running longer than the threshold right now: a stall shows while it lasts.
    fn in_progress(&self) -> Result<Vec<InProgress>> {
        let map: HashMap<_, u32, ThreadState> =
            HashMap::try_from(self.probes.ebpf.map(maps::THREADS).context("THREADS map")?)?;
        let now = clock_ns(libc::CLOCK_MONOTONIC);
        let comm_of = |tid: u32| self.app.threads.iter().find(|t| t.tid == tid).map(|t| t.comm.clone());
        Ok(map
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, s)| s.tgid == self.target.pid && s.iter_start_ns != 0)
            .map(|(tid, s)| (tid, now.saturating_sub(s.iter_start_ns)))
            .filter(|&(_, elapsed)| elapsed >= self.app.threshold_ns)
            .map(|(tid, elapsed_ns)| InProgress { tid, comm: comm_of(tid).unwrap_or_default(), elapsed_ns })
            .collect())
    }
}
