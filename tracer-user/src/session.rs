//! One tracing session: attach to a target, turn ring-buffer records into reported stalls
//! until told to stop, then print the summary and detach.
use std::{
    collections::BTreeMap,
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData, RingBuf};
use tracer_common::{IterHist, StallEvent, maps};

use crate::{
    attribution::{self, Verdict, comm_str},
    histogram::{Log2Hist, human_ns},
    probes::{ProbeConfig, Probes},
    report::{Reporter, SummaryData, ThreadHist},
    target::{self, Target},
};

pub struct TraceOptions {
    pub pid: u32,
    pub threshold_ns: u64,
    pub duration: Option<Duration>,
    pub probes: ProbeConfig,
}

/// Traces until SIGINT/SIGTERM, the end of `duration`, or the target's exit.
pub fn run(opts: &TraceOptions, reporter: &Reporter) -> Result<()> {
    target::check_privileges()?;
    target::check_btf()?;
    let target = Target::open(opts.pid)?;
    let mut probes = Probes::load(&opts.probes)?;
    probes.add_target(target.pid, opts.threshold_ns)?;
    probes.attach(&opts.probes, &target)?;
    reporter.note(&format!(
        "tracing PID {} ({}), stalls >= {}; probes: {}",
        target.pid,
        target.comm,
        human_ns(opts.threshold_ns),
        probes.attached.join(", ")
    ));
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("installing signal handler")?;
    }
    let mut ring = RingBuf::try_from(probes.ebpf.take_map(maps::STALLS).context("STALLS map")?)?;
    let started = Instant::now();
    let mut by_verdict = BTreeMap::new();
    loop {
        wait_readable(ring.as_raw_fd(), Duration::from_millis(100));
        drain(&mut ring, reporter, &mut by_verdict);
        if stop.load(Ordering::Relaxed) || opts.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        if !target.is_alive() {
            reporter.note(&format!("PID {} exited", target.pid));
            break;
        }
    }
    drain(&mut ring, reporter, &mut by_verdict);
    let summary = SummaryData {
        pid: target.pid,
        traced_ns: started.elapsed().as_nanos() as u64,
        by_verdict,
        lost: probes.lost_stalls(),
        threads: thread_histograms(&probes, target.pid)?,
    };
    reporter.summary(&summary);
    // Dropping `probes` detaches every link and unloads the programs.
    Ok(())
}

fn drain(ring: &mut RingBuf<MapData>, reporter: &Reporter, by_verdict: &mut BTreeMap<Verdict, u64>) {
    while let Some(item) = ring.next() {
        if item.len() < size_of::<StallEvent>() {
            continue;
        }
        // SAFETY: the kernel wrote a whole StallEvent; the ring buffer only guarantees 8-byte
        // alignment, so read it unaligned.
        let ev = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<StallEvent>()) };
        let stall = attribution::attribute(&ev);
        *by_verdict.entry(stall.verdict).or_default() += 1;
        reporter.stall(&stall);
    }
}

fn thread_histograms(probes: &Probes, pid: u32) -> Result<Vec<ThreadHist>> {
    let map: HashMap<_, u32, IterHist> =
        HashMap::try_from(probes.ebpf.map(maps::ITER_HIST).context("ITER_HIST map")?)?;
    let mut threads: Vec<ThreadHist> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, h)| h.tgid == pid)
        .map(|(tid, h)| ThreadHist { tid, comm: comm_str(&h.comm), hist: Log2Hist::new(&h.slots) })
        .collect();
    threads.sort_by_key(|t| t.tid);
    Ok(threads)
}

/// Sleeps until the ring buffer has data or `timeout` passes; a signal also wakes it.
fn wait_readable(fd: i32, timeout: Duration) {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
}
