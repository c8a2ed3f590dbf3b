//! Pool starvation: a group of worker threads all asleep, nobody waking them, while work
//! piles up on the process's sockets. The second incident had no slow event loop at all:
//! 400 workers each held connections from some pools and waited forever for another.
//!
//! Every poll reads the target's threads from /proc (name, state, the syscall and futex
//! address they wait in) and the kernel's `PARKED` map (since when each sleeps, the last
//! wakeup sent to it and by whom); threads asleep before we attached have no kernel record
//! and count as asleep since the attach. Only threads with namesakes, the ones that can
//! starve as a group, are in `PARKED`.
use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    fs,
};

use anyhow::Result;
use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use serde::Serialize;
use tracer_common::ParkState;

use crate::{
    attribution::{comm_str, syscall_name},
    net::{diag::Diag, socket_inodes},
    report::clock_ns,
    stacks::{parked, symbolize::Symbols, unwind::Unwinder},
};

#[derive(Clone, Debug)]
pub struct StarveConfig {
    /// Share of a group that must be asleep.
    pub share: f64,
    /// How long they must all have slept, with no wakeup sent to any of them.
    pub threshold_ns: u64,
    /// Groups smaller than this are not pools (a lone helper thread asleep is normal).
    pub min_threads: usize,
    /// While starvation lasts, a record this often.
    pub repeat_ns: u64,
}

impl Default for StarveConfig {
    fn default() -> Self {
        Self { share: 0.9, threshold_ns: 2_000_000_000, min_threads: 2, repeat_ns: 5_000_000_000 }
    }
}

/// What the threads of one wait object have in common.
#[derive(Clone, Debug, Serialize)]
pub struct Wait {
    /// "futex:0x7f3a2c0011c8" for a futex wait (a lock or condition), else the syscall's name.
    pub wait: String,
    pub threads: usize,
    pub tids: Vec<u32>,
    /// One of the waiters' stacks, root first.
    pub stack: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Wakeup {
    pub ns_ago: u64,
    pub by_tid: u32,
    pub by_pid: u32,
    pub by_comm: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Group {
    /// Thread name with digit runs folded: "pool-worker-*".
    pub name: String,
    pub threads: usize,
    pub parked: usize,
    /// How long the most recently parked of them has slept.
    pub parked_for_ns: u64,
    pub waits: Vec<Wait>,
    pub last_wakeup: Option<Wakeup>,
    /// No thread outside the parked set has woken any of them since they parked: they wait
    /// on each other (hold and wait) or on something that will never come.
    pub closed_cycle: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Work {
    pub unread_bytes: u64,
    pub unread_growth: i64,
    pub accept_queue: u64,
}

/// A `{"type":"starvation",...}` record.
#[derive(Clone, Debug, Serialize)]
pub struct Starvation {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// "start", "ongoing" or "end".
    pub state: &'static str,
    pub pid: u32,
    pub since_ns: u64,
    pub duration_ns: u64,
    pub groups: Vec<Group>,
    pub work: Work,
}

/// One thread as this poll saw it.
struct ThreadNow {
    tid: u32,
    comm: String,
    asleep: bool,
    since_ns: u64,
    park: ParkState,
}

pub struct StarvationMonitor {
    pid: u32,
    config: StarveConfig,
    parked: BpfHashMap<MapData, u32, ParkState>,
    /// `PARK_WATCHED`: how many threads `PARKED` holds, for the kernel's sake.
    watched: Array<MapData, u32>,
    /// The threads in `PARKED`.
    tracked: HashSet<u32>,
    /// For threads asleep since before the attach: when we first saw them asleep.
    seen_asleep: HashMap<u32, u64>,
    diag: Diag,
    /// (time, unread bytes) for the growth test.
    unread: VecDeque<(u64, u64)>,
    active: Option<(u64, u64)>,
    unwinder: Unwinder,
    symbols: Symbols,
}

impl StarvationMonitor {
    pub fn new(
        pid: u32,
        parked: BpfHashMap<MapData, u32, ParkState>,
        watched: Array<MapData, u32>,
        config: StarveConfig,
    ) -> Result<Self> {
        Ok(Self {
            pid,
            config,
            parked,
            watched,
            tracked: HashSet::new(),
            seen_asleep: HashMap::new(),
            diag: Diag::open(pid)?,
            unread: VecDeque::new(),
            active: None,
            unwinder: Unwinder::new(pid),
            symbols: Symbols::new(),
        })
    }

    /// One look at the process; returns a record when starvation starts, repeats or ends.
    pub fn poll(&mut self) -> Option<Starvation> {
        let now = clock_ns(libc::CLOCK_MONOTONIC);
        let threads = self.threads(now);
        // The socket walk is most of a poll's cost, and nothing reads it unless a group could
        // starve or a starvation is open (its end record carries the work).
        if self.active.is_none() && !self.could_starve(&threads) {
            return None;
        }
        let work = self.work(now);
        let starved: Vec<Group> = if work_waiting(&work) { self.starved_groups(&threads, now) } else { Vec::new() };
        self.transition(starved, work, now)
    }

    fn transition(&mut self, groups: Vec<Group>, work: Work, now: u64) -> Option<Starvation> {
        let record = |state, since: u64, groups| Starvation {
            kind: "starvation",
            state,
            pid: self.pid,
            since_ns: since,
            duration_ns: now.saturating_sub(since),
            groups,
            work: work.clone(),
        };
        match (self.active, groups.is_empty()) {
            (None, true) => None,
            (None, false) => {
                let since = now.saturating_sub(groups.iter().map(|g| g.parked_for_ns).min().unwrap_or(0));
                self.active = Some((since, now));
                Some(record("start", since, groups))
            }
            (Some((since, _)), true) => {
                self.active = None;
                Some(record("end", since, Vec::new()))
            }
            (Some((since, last)), false) if now >= last + self.config.repeat_ns => {
                self.active = Some((since, now));
                Some(record("ongoing", since, groups))
            }
            (Some(_), false) => None,
        }
    }

    fn threads(&mut self, now: u64) -> Vec<ThreadNow> {
        let tids: Vec<u32> = fs::read_dir(format!("/proc/{}/task", self.pid))
            .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
            .unwrap_or_default();
        let mut threads: Vec<ThreadNow> = tids.into_iter().filter_map(|tid| self.thread(tid)).collect();
        self.watch(&threads);
        let asleep: HashSet<u32> = threads.iter().filter(|t| t.asleep).map(|t| t.tid).collect();
        self.seen_asleep.retain(|tid, _| asleep.contains(tid));
        for t in &mut threads {
            if self.tracked.contains(&t.tid) {
                t.park = self.parked.get(&t.tid, 0).unwrap_or_default();
            }
            t.since_ns = match (t.asleep, t.park.parked_since_ns) {
                (false, _) => now,
                (true, 0) => *self.seen_asleep.entry(t.tid).or_insert(now),
                (true, since) => since,
            };
        }
        threads
    }

    /// One thread's name and state from /proc; its kernel record is added by `threads`.
    fn thread(&self, tid: u32) -> Option<ThreadNow> {
        let stat = fs::read_to_string(format!("/proc/{}/task/{tid}/stat", self.pid)).ok()?;
        let state = stat.rsplit(')').next()?.split_whitespace().next()?;
        let asleep = matches!(state, "S" | "D");
        let comm = fs::read_to_string(format!("/proc/{}/task/{tid}/comm", self.pid)).ok()?.trim_end().to_string();
        Some(ThreadNow { tid, comm, asleep, since_ns: 0, park: ParkState::default() })
    }

    /// Puts in `PARKED` the threads that could starve as a group (at least `min_threads` of
    /// one folded name) and no others. The kernel's sched programs run in the request path
    /// and skip every lookup while `PARKED` is empty, as it stays for a lone event loop.
    fn watch(&mut self, threads: &[ThreadNow]) {
        let mut sizes: HashMap<String, usize> = HashMap::new();
        for t in threads {
            *sizes.entry(fold_name(&t.comm)).or_default() += 1;
        }
        let want: HashSet<u32> =
            threads.iter().filter(|t| sizes[&fold_name(&t.comm)] >= self.config.min_threads).map(|t| t.tid).collect();
        if want == self.tracked {
            return;
        }
        for &tid in want.difference(&self.tracked) {
            let _ = self.parked.insert(tid, ParkState::default(), 0);
        }
        for &tid in self.tracked.difference(&want) {
            let _ = self.parked.remove(&tid);
        }
        self.tracked = want;
        let _ = self.watched.set(0, self.tracked.len() as u32, 0);
    }

    /// Whether some group has enough threads asleep to be starved now or within the threshold.
    /// A thread parked that long by then has been asleep at every poll in between, so this
    /// holds at each of them and `unread` keeps every entry the growth test will look at.
    fn could_starve(&self, threads: &[ThreadNow]) -> bool {
        let need = self.config.share * self.config.min_threads as f64;
        let mut asleep: HashMap<String, usize> = HashMap::new();
        for t in threads.iter().filter(|t| t.asleep) {
            *asleep.entry(fold_name(&t.comm)).or_default() += 1;
        }
        need <= 0.0 || asleep.values().any(|&n| n as f64 >= need)
    }

    fn work(&mut self, now: u64) -> Work {
        let inodes = socket_inodes(self.pid);
        let sum = |socks: Vec<crate::net::diag::ListenSocket>| -> u64 {
            socks.iter().filter(|s| inodes.contains(&s.inode)).map(|s| u64::from(s.queue)).sum()
        };
        let unread = self.diag.connections().map(sum).unwrap_or(0);
        let accept_queue = self.diag.listeners().map(sum).unwrap_or(0);
        self.unread.push_back((now, unread));
        while self.unread.front().is_some_and(|&(t, _)| t + self.config.threshold_ns < now) {
            self.unread.pop_front();
        }
        let first = self.unread.front().map_or(unread, |&(_, u)| u);
        Work { unread_bytes: unread, unread_growth: unread as i64 - first as i64, accept_queue }
    }

    fn starved_groups(&mut self, threads: &[ThreadNow], now: u64) -> Vec<Group> {
        let mut by_name: BTreeMap<String, Vec<&ThreadNow>> = BTreeMap::new();
        for t in threads {
            by_name.entry(fold_name(&t.comm)).or_default().push(t);
        }
        let asleep_set: HashSet<u32> = threads.iter().filter(|t| t.asleep).map(|t| t.tid).collect();
        let mut out = Vec::new();
        for (name, members) in by_name {
            if let Some(g) = self.starved(name, &members, &asleep_set, now) {
                out.push(g);
            }
        }
        out
    }

    fn starved(&mut self, name: String, members: &[&ThreadNow], asleep_set: &HashSet<u32>, now: u64) -> Option<Group> {
        let threshold = self.config.threshold_ns;
        if members.len() < self.config.min_threads {
            return None;
        }
        let parked: Vec<&&ThreadNow> =
            members.iter().filter(|t| t.asleep && now.saturating_sub(t.since_ns) >= threshold).collect();
        if (parked.len() as f64) < self.config.share * members.len() as f64 {
            return None;
        }
        let last = members.iter().max_by_key(|t| t.park.last_wakeup_ns).filter(|t| t.park.last_wakeup_ns > 0);
        if last.is_some_and(|t| now.saturating_sub(t.park.last_wakeup_ns) < threshold) {
            return None;
        }
        let parked_for_ns = parked.iter().map(|t| now.saturating_sub(t.since_ns)).min().unwrap_or(0);
        let since = now - parked_for_ns;
        // A wakeup since they parked from a thread outside the sleeping set opens the cycle.
        let closed_cycle = members.iter().all(|t| {
            t.park.last_wakeup_ns < since || (t.park.waker_tgid == self.pid && asleep_set.contains(&t.park.waker_tid))
        });
        Some(Group {
            name,
            threads: members.len(),
            parked: parked.len(),
            parked_for_ns,
            waits: self.waits(&parked),
            last_wakeup: last.map(|t| Wakeup {
                ns_ago: now.saturating_sub(t.park.last_wakeup_ns),
                by_tid: t.park.waker_tid,
                by_pid: t.park.waker_tgid,
                by_comm: comm_str(&t.park.waker_comm),
            }),
            closed_cycle,
        })
    }

    /// Parked threads by what they wait on, with one stack per wait object. Read only for a
    /// starved group: every poll reading every sleeping thread's registers was most of
    /// stalltrace's own CPU on a quiet server.
    fn waits(&mut self, parked: &[&&ThreadNow]) -> Vec<Wait> {
        let mut by_wait: BTreeMap<String, (Option<parked::Blocked>, Vec<u32>)> = BTreeMap::new();
        for t in parked {
            let blocked = parked::blocked(self.pid, t.tid);
            let wait = blocked.map_or_else(|| "unknown".to_string(), |b| wait_name(&b));
            by_wait.entry(wait).or_insert((blocked, Vec::new())).1.push(t.tid);
        }
        by_wait
            .into_iter()
            .map(|(wait, (blocked, tids))| {
                let stack =
                    blocked.map(|b| parked::stack(self.pid, &b, &mut self.unwinder, &mut self.symbols)).unwrap_or_default();
                Wait { wait, threads: tids.len(), tids, stack }
            })
            .collect()
    }
}

fn work_waiting(w: &Work) -> bool {
    w.accept_queue > 0 || w.unread_growth > 0
}

fn wait_name(b: &parked::Blocked) -> String {
    if b.nr == libc::SYS_futex as u64 {
        format!("futex:{:#x}", b.arg0)
    } else {
        syscall_name(b.nr)
    }
}

/// "pool-worker-12" and "pool-worker-3" are one pool: digit runs fold to '*'.
pub fn fold_name(comm: &str) -> String {
    let mut out = String::with_capacity(comm.len());
    let mut in_digits = false;
    for c in comm.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('*');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_names_fold_their_numbers() {
        assert_eq!(fold_name("pool-worker-12"), "pool-worker-*");
        assert_eq!(fold_name("DubboServerHand"), "DubboServerHand");
        assert_eq!(fold_name("http-nio-8080-e"), "http-nio-*-e");
    }
}
