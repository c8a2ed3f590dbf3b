//! The connection side of a stall: the target's listening sockets sampled every 10 ms
//! (accept queue, drops, and the kernel's per-port counters), the net activity around each
//! stall, and connection storms with what caused them.
pub mod diag;
pub mod storm;

use std::{
    collections::{HashSet, VecDeque},
    fs,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::Result;
use aya::maps::{MapData, PerCpuHashMap, PerCpuValues};
use serde::Serialize;
use tracer_common::{ListenerCounters, TargetStats};

use crate::report::clock_ns;

pub const SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// Samples kept: at least two minutes, enough for any stall's window and the live view.
const KEEP_SAMPLES: usize = 12_000;
/// While nothing moves on the target's listeners (empty accept queues, no counter changing)
/// a sample every 100 ms instead: the counters are cumulative, so a window's deltas stay
/// exact, and a wakeup costs this VM ~0.1 ms of CPU: the sampler's were most of
/// stalltrace's own CPU on an idle or steady server.
const QUIET_EVERY: Duration = Duration::from_millis(100);
/// How often the target's socket inodes are re-read and its listeners found by a full dump:
/// listeners opened later are picked up. Between rescans each known listener is looked up on
/// its own, which does not walk the kernel's whole listening table.
const RESCAN_NS: u64 = 1_000_000_000;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    pub addr: IpAddr,
    pub port: u16,
}

impl std::fmt::Display for ListenerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

/// One listener at one sample: diag's view plus the kernel counters for its port.
#[derive(Clone, Debug)]
pub struct ListenerSample {
    pub key: ListenerKey,
    pub backlog: u32,
    pub queue: u32,
    pub drops: u64,
    pub counters: ListenerCounters,
}

#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub t_ns: u64,
    pub listeners: Vec<ListenerSample>,
    pub accepts: u64,
    /// TcpExtListenOverflows of the target's namespace: the cross-check.
    pub netns_overflows: u64,
}

/// Net activity over a time window, summed over the target's listeners.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetDelta {
    /// SYNs and final ACKs dropped because an accept queue was full.
    pub overflows: u64,
    pub syn_drops: u64,
    pub ack_overflows: u64,
    pub new_connections: u64,
    pub rst_sent: u64,
    pub rst_received: u64,
    /// The process's accepts in the window, over all its listeners (accept(2) does not say
    /// which listener a connection came from without its fd).
    pub accepts: u64,
    pub max_queue: u32,
}

impl NetDelta {
    /// Adds another listener's counts (accepts and queue are the caller's to set).
    fn add_counts(&mut self, d: &NetDelta) {
        self.overflows += d.overflows;
        self.syn_drops += d.syn_drops;
        self.ack_overflows += d.ack_overflows;
        self.new_connections += d.new_connections;
        self.rst_sent += d.rst_sent;
        self.rst_received += d.rst_received;
    }
}

/// A stall's `"net"` object: during it, and in the 500 ms after.
#[derive(Clone, Debug, Serialize)]
pub struct StallNet {
    #[serde(flatten)]
    pub during: NetDelta,
    pub after: NetDelta,
}

pub const AFTER_STALL_NS: u64 = 500_000_000;

#[derive(Default)]
struct Shared {
    samples: VecDeque<Sample>,
}

/// Handle to the sampler thread.
pub struct NetMonitor {
    pid: u32,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    counts_syns: bool,
    baseline: Option<Sample>,
}

impl NetMonitor {
    pub fn start(
        pid: u32,
        listeners: PerCpuHashMap<MapData, u16, ListenerCounters>,
        stats: PerCpuHashMap<MapData, u32, TargetStats>,
        counts_syns: bool,
    ) -> Result<Self> {
        let diag = diag::Diag::open(pid)?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut sampler = Sampler {
            pid,
            diag,
            listeners,
            stats,
            inodes: HashSet::new(),
            watched: HashSet::new(),
            known: Vec::new(),
            has_v6: false,
            dump_always: false,
            netns_overflows: 0,
        };
        // The first sample is taken before returning: it is every window's starting point.
        let first = sampler.sample(true)?;
        shared.lock().expect("net state").samples.push_back(first.clone());
        let thread = {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
            thread::Builder::new().name("net-sampler".into()).spawn(move || sampler.run(&shared, &stop))?
        };
        Ok(Self { pid, shared, stop, thread: Some(thread), counts_syns, baseline: Some(first) })
    }

    /// The newest sample's time.
    pub fn latest_ns(&self) -> u64 {
        self.shared.lock().expect("net state").samples.back().map_or(0, |s| s.t_ns)
    }

    /// Samples newer than `after_ns`, oldest first.
    pub fn samples_since(&self, after_ns: u64) -> Vec<Sample> {
        let s = self.shared.lock().expect("net state");
        s.samples.iter().filter(|x| x.t_ns > after_ns).cloned().collect()
    }

    pub fn stall_net(&self, start_ns: u64, end_ns: u64) -> StallNet {
        let s = self.shared.lock().expect("net state");
        StallNet {
            during: window(&s.samples, start_ns, end_ns, self.counts_syns),
            after: window(&s.samples, end_ns, end_ns + AFTER_STALL_NS, self.counts_syns),
        }
    }

    pub fn accepts_between(&self, from: u64, to: u64) -> u64 {
        window(&self.shared.lock().expect("net state").samples, from, to, self.counts_syns).accepts
    }

    /// Per-listener totals since attach, and the namespace's ListenOverflows delta.
    pub fn totals(&self) -> (Vec<(ListenerSample, NetDelta)>, u64) {
        // Samples carry the namespace counter from the last rescan, up to a second old: the
        // cross-check against the listeners' drops wants it as of now.
        let overflows_now = netns_listen_overflows(self.pid);
        let s = self.shared.lock().expect("net state");
        let (Some(first), Some(last)) = (self.baseline.as_ref(), s.samples.back()) else { return (Vec::new(), 0) };
        let per = last
            .listeners
            .iter()
            .map(|l| {
                let before = s.samples.iter().find_map(|x| x.listeners.iter().find(|o| o.key == l.key));
                let max_queue = s.samples.iter().flat_map(|x| &x.listeners).filter(|o| o.key == l.key).map(|o| o.queue).max();
                let mut d = listener_delta(before.unwrap_or(l), l, self.counts_syns);
                d.max_queue = max_queue.unwrap_or(0);
                d.accepts = last.accepts.saturating_sub(first.accepts);
                (l.clone(), d)
            })
            .collect();
        let overflows = overflows_now.unwrap_or(last.netns_overflows);
        (per, overflows.saturating_sub(first.netns_overflows))
    }
}

impl Drop for NetMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sums the change of every listener between the last sample at or before `from` and the
/// first at or after `to` (a listener first seen in between counts from its first sample).
pub fn window(samples: &VecDeque<Sample>, from: u64, to: u64, counts_syns: bool) -> NetDelta {
    let Some(start) = samples.iter().rev().find(|s| s.t_ns <= from).or(samples.front()) else {
        return NetDelta::default();
    };
    let Some(end) = samples.iter().find(|s| s.t_ns >= to).or(samples.back()) else { return NetDelta::default() };
    let mut total = NetDelta::default();
    for l in &end.listeners {
        let before = start.listeners.iter().find(|o| o.key == l.key).unwrap_or(l);
        total.add_counts(&listener_delta(before, l, counts_syns));
    }
    total.accepts = end.accepts.saturating_sub(start.accepts);
    total.max_queue = samples
        .iter()
        .filter(|s| s.t_ns >= start.t_ns && s.t_ns <= end.t_ns)
        .flat_map(|s| s.listeners.iter().map(|l| l.queue))
        .max()
        .unwrap_or(0);
    total
}

pub fn listener_delta(a: &ListenerSample, b: &ListenerSample, counts_syns: bool) -> NetDelta {
    let (ca, cb) = (&a.counters, &b.counters);
    let overflows = b.drops.saturating_sub(a.drops);
    let ack_overflows = cb.ack_overflows.saturating_sub(ca.ack_overflows);
    NetDelta {
        overflows,
        // Without fentry the SYN stage has no hook: the listener's drops minus the final-ACK
        // drops kfree_skb saw are the SYNs it dropped.
        syn_drops: if counts_syns {
            cb.syn_overflows.saturating_sub(ca.syn_overflows)
        } else {
            overflows.saturating_sub(ack_overflows)
        },
        ack_overflows,
        new_connections: cb.established.saturating_sub(ca.established),
        rst_sent: cb.rst_sent.saturating_sub(ca.rst_sent),
        rst_received: cb.rst_received.saturating_sub(ca.rst_received),
        accepts: 0,
        max_queue: b.queue,
    }
}

struct Sampler {
    pid: u32,
    diag: diag::Diag,
    listeners: PerCpuHashMap<MapData, u16, ListenerCounters>,
    stats: PerCpuHashMap<MapData, u32, TargetStats>,
    inodes: HashSet<u64>,
    watched: HashSet<u16>,
    /// The target's listeners as the last full dump found them.
    known: Vec<diag::ListenSocket>,
    has_v6: bool,
    /// Exact lookups cannot be trusted (a SO_REUSEPORT group, or listeners they miss): a full
    /// dump every sample.
    dump_always: bool,
    /// TcpExtListenOverflows as of the last rescan.
    netns_overflows: u64,
}

impl Sampler {
    fn run(mut self, shared: &Mutex<Shared>, stop: &AtomicBool) {
        let mut last_rescan = clock_ns(libc::CLOCK_MONOTONIC);
        let mut quiet = false;
        while !stop.load(Ordering::Relaxed) {
            thread::sleep(if quiet { QUIET_EVERY } else { SAMPLE_EVERY });
            let rescan = clock_ns(libc::CLOCK_MONOTONIC).saturating_sub(last_rescan) >= RESCAN_NS;
            if rescan {
                last_rescan = clock_ns(libc::CLOCK_MONOTONIC);
            }
            // A failed sample means the target or its namespace is gone; the session notices
            // that and ends, so the gap is not worth a report of its own.
            if let Ok(sample) = self.sample(rescan) {
                let mut s = shared.lock().expect("net state");
                quiet = s.samples.back().is_some_and(|prev| still(prev, &sample));
                if s.samples.len() == KEEP_SAMPLES {
                    s.samples.pop_front();
                }
                s.samples.push_back(sample);
            }
        }
    }

    fn sample(&mut self, rescan: bool) -> Result<Sample> {
        if rescan {
            // Only the end-of-run cross-check uses it, and totals() reads it afresh.
            self.netns_overflows = netns_listen_overflows(self.pid).unwrap_or(self.netns_overflows);
        }
        // Until the target has a socket its fds are read every sample, so that its first
        // listener shows at once.
        let full = rescan || self.inodes.is_empty();
        if full {
            self.inodes = socket_inodes(self.pid);
        }
        let t_ns = clock_ns(libc::CLOCK_MONOTONIC);
        let ours = match (self.inodes.is_empty(), full) {
            (true, _) => Vec::new(),
            (false, true) => self.dump_ours(true)?,
            (false, false) => self.look_up_ours()?,
        };
        let mut listeners = Vec::with_capacity(ours.len());
        for s in ours {
            self.watch(s.port)?;
            let counters = self.port_counters(s.port);
            listeners.push(ListenerSample {
                key: ListenerKey { addr: s.addr, port: s.port },
                backlog: s.backlog,
                queue: s.queue,
                drops: s.drops,
                counters,
            });
        }
        let accepts = self.stats.get(&self.pid, 0).map(|v| v.iter().map(|s| s.accepts).sum()).unwrap_or(0);
        Ok(Sample { t_ns, listeners, accepts, netns_overflows: self.netns_overflows })
    }

    /// The target's listeners from a full dump. Between rescans the IPv6 table is skipped
    /// when the target had no IPv6 listener.
    fn dump_ours(&mut self, all_families: bool) -> Result<Vec<diag::ListenSocket>> {
        let mut found = self.diag.listeners_in(libc::AF_INET)?;
        if all_families || self.has_v6 {
            found.extend(self.diag.listeners_in(libc::AF_INET6)?);
        }
        found.retain(|s| self.inodes.contains(&s.inode));
        self.has_v6 = found.iter().any(|s| s.addr.is_ipv6());
        // Once exact lookups cannot be trusted they stay off until a rescan tries them again.
        self.dump_always = (self.dump_always && !all_families) || shares_address(&found);
        self.known.clone_from(&found);
        Ok(found)
    }

    /// Each known listener looked up on its own; a full dump instead when one is gone.
    fn look_up_ours(&mut self) -> Result<Vec<diag::ListenSocket>> {
        if self.dump_always {
            return self.dump_ours(false);
        }
        let mut found = Vec::with_capacity(self.known.len());
        for known in &self.known {
            match self.diag.listener(known) {
                Ok(Some(s)) => found.push(s),
                _ => return self.redump(),
            }
        }
        Ok(found)
    }

    /// A lookup missed: the listener closed, or the kernel's lookup does not find it (an
    /// address only a dump matches). In the second case the dump shows the same listeners,
    /// and dumps continue until the next rescan rather than each sample paying for both.
    fn redump(&mut self) -> Result<Vec<diag::ListenSocket>> {
        let mut before: Vec<u64> = self.known.iter().map(|s| s.inode).collect();
        let found = self.dump_ours(false)?;
        let mut after: Vec<u64> = found.iter().map(|s| s.inode).collect();
        before.sort_unstable();
        after.sort_unstable();
        self.dump_always |= before == after;
        Ok(found)
    }

    fn watch(&mut self, port: u16) -> Result<()> {
        if self.watched.insert(port) {
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
            self.listeners.insert(port, PerCpuValues::try_from(vec![ListenerCounters::default(); cpus])?, 0)?;
        }
        Ok(())
    }

    fn port_counters(&self, port: u16) -> ListenerCounters {
        let Ok(values) = self.listeners.get(&port, 0) else { return ListenerCounters::default() };
        values.iter().fold(ListenerCounters::default(), |mut a, v| {
            a.established += v.established;
            a.rst_sent += v.rst_sent;
            a.rst_received += v.rst_received;
            a.ack_overflows += v.ack_overflows;
            a.syns += v.syns;
            a.syn_overflows += v.syn_overflows;
            a
        })
    }
}

/// Nothing happened on the target's listeners between two samples: no connection waits to be
/// accepted, none was accepted, dropped, opened or reset.
fn still(before: &Sample, now: &Sample) -> bool {
    before.accepts == now.accepts
        && before.listeners.len() == now.listeners.len()
        && before.listeners.iter().zip(&now.listeners).all(|(a, b)| {
            a.key == b.key && b.queue == 0 && a.drops == b.drops && a.counters == b.counters
        })
}

/// Whether two listeners share family, address and port (a SO_REUSEPORT group): an exact
/// lookup only ever finds one socket of such a group.
fn shares_address(listeners: &[diag::ListenSocket]) -> bool {
    let mut seen = HashSet::new();
    !listeners.iter().all(|s| seen.insert((s.addr, s.port)))
}

/// Inodes of the target's sockets, from /proc/PID/fd links such as `socket:[12345]`.
pub fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else { return HashSet::new() };
    dir.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter_map(|link| link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect()
}

/// TcpExtListenOverflows of the namespace the target lives in (/proc/PID/net is its view).
pub fn netns_listen_overflows(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/net/netstat")).ok()?;
    netstat_value(&text, "TcpExt:", "ListenOverflows")
}

fn netstat_value(text: &str, prefix: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let (names, values) = (lines.next()?, lines.next()?);
    let idx = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(idx)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_netstat_columns() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 17 19\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(netstat_value(text, "TcpExt:", "ListenOverflows"), Some(17));
        assert_eq!(netstat_value(text, "TcpExt:", "Nope"), None);
    }

    #[test]
    fn reuseport_groups_share_an_address() {
        let at = |inode, port| diag::ListenSocket {
            inode,
            addr: IpAddr::from([127, 0, 0, 1]),
            port,
            queue: 0,
            backlog: 8,
            drops: 0,
        };
        assert!(!shares_address(&[at(1, 80), at(2, 81)]));
        assert!(shares_address(&[at(1, 80), at(2, 81), at(3, 80)]));
    }

    fn sample(t_ns: u64, drops: u64, established: u64) -> Sample {
        let counters = ListenerCounters { established, ..Default::default() };
        let key = ListenerKey { addr: IpAddr::from([127, 0, 0, 1]), port: 80 };
        Sample { t_ns, listeners: vec![ListenerSample { key, backlog: 8, queue: 0, drops, counters }], ..Default::default() }
    }

    #[test]
    fn sampling_slows_only_while_nothing_moves() {
        assert!(still(&sample(0, 3, 7), &sample(10, 3, 7)));
        assert!(!still(&sample(0, 3, 7), &sample(10, 4, 7)), "a drop");
        assert!(!still(&sample(0, 3, 7), &sample(10, 3, 8)), "a new connection");
        let mut queued = sample(10, 3, 7);
        queued.listeners[0].queue = 1;
        assert!(!still(&sample(0, 3, 7), &queued), "a connection waiting to be accepted");
    }

    #[test]
    fn windows_take_the_samples_around_them() {
        let samples: VecDeque<_> = [sample(0, 0, 0), sample(10, 2, 1), sample(20, 5, 4), sample(30, 5, 9)].into();
        let d = window(&samples, 5, 20, false);
        assert_eq!((d.overflows, d.syn_drops, d.new_connections), (5, 5, 4));
        let after = window(&samples, 20, 100, false);
        assert_eq!((after.overflows, after.new_connections), (0, 5));
    }
}
