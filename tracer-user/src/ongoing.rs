//! Stalls announced while they last: an iteration past the threshold gets a record as soon
//! as userspace sees it, once, so whoever watches the output (an alert, an SRE) learns of a
//! freeze while it is still going on instead of after it ends. The stall's own record, with
//! its verdict, follows when the iteration ends.
use std::collections::HashSet;

use serde::Serialize;

/// A `{"type":"stall_ongoing",...}` record.
#[derive(Clone, Debug, Serialize)]
pub struct Ongoing {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// When the iteration began (CLOCK_MONOTONIC, as a stall's `start_ns`).
    pub start_ns: u64,
    /// How long it had run when userspace saw it.
    pub elapsed_ns: u64,
    /// The latest stack taken in it (a CPU sample, or /proc for a thread asleep), root first,
    /// as a stall's `stack`; empty without the stacks group or before the first sample.
    pub stack: Vec<String>,
}

/// Which stalled iterations have been announced.
#[derive(Default)]
pub struct OngoingWatch {
    /// (tid, iteration start) of the iterations announced and still seen stalled.
    announced: HashSet<(u32, u64)>,
}

impl OngoingWatch {
    /// `stalled`: (tid, start, elapsed) of every iteration past the threshold now; `ended`:
    /// (tid, start) of the stall records just read, whose iterations a slightly stale view of
    /// the threads may still show. Returns the ones not announced before.
    pub fn observe(&mut self, stalled: &[(u32, u64, u64)], ended: &[(u32, u64)]) -> Vec<(u32, u64, u64)> {
        let live: Vec<_> = stalled.iter().copied().filter(|&(tid, start, _)| !ended.contains(&(tid, start))).collect();
        // An iteration that ended leaves the set, so the thread's next stall is announced too.
        self.announced.retain(|key| live.iter().any(|&(tid, start, _)| (tid, start) == *key));
        live.into_iter().filter(|&(tid, start, _)| self.announced.insert((tid, start))).collect()
    }
}

/// The thread's name, or `fallback` once the thread is gone.
pub fn thread_comm(pid: u32, tid: u32, fallback: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(|_| fallback.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_is_announced_once_while_it_lasts() {
        let mut w = OngoingWatch::default();
        assert_eq!(w.observe(&[(7, 100, 60)], &[]), vec![(7, 100, 60)]);
        assert!(w.observe(&[(7, 100, 160)], &[]).is_empty());
        assert!(w.observe(&[(7, 100, 260)], &[]).is_empty());
    }

    #[test]
    fn the_same_threads_next_stall_is_announced_again() {
        let mut w = OngoingWatch::default();
        w.observe(&[(7, 100, 60)], &[]);
        assert!(w.observe(&[], &[]).is_empty());
        assert_eq!(w.observe(&[(7, 900, 55)], &[]), vec![(7, 900, 55)]);
    }

    #[test]
    fn a_stall_whose_record_just_arrived_is_not_announced() {
        let mut w = OngoingWatch::default();
        assert!(w.observe(&[(7, 100, 60), (8, 50, 70)], &[(7, 100)]) == vec![(8, 50, 70)]);
    }
}
