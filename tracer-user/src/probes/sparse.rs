//! Reading the per-thread hash map THREADS several times a second without
//! walking it each time: a walk asks the kernel for every next key, and each of those scans
//! buckets of a map sized for thousands of threads that holds a handful. That was most of
//! stalltrace's own CPU on an idle or steady server. The keys found are looked up one by one
//! instead, and the map is walked afresh every `REWALK` to find new threads.
use std::time::{Duration, Instant};

use aya::{
    Pod,
    maps::{HashMap, MapData},
};

/// A thread that starts looping shows up within this long.
const REWALK: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct SparseKeys {
    keys: Vec<u32>,
    walked: Option<Instant>,
}

impl SparseKeys {
    /// The entries whose value passes `keep`.
    pub fn read<V: Pod>(&mut self, map: &HashMap<&MapData, u32, V>, keep: impl Fn(&V) -> bool) -> Vec<(u32, V)> {
        if self.walked.is_some_and(|at| at.elapsed() < REWALK) {
            return self.keys.iter().filter_map(|&k| Some((k, map.get(&k, 0).ok()?))).filter(|(_, v)| keep(v)).collect();
        }
        let entries: Vec<(u32, V)> = map.iter().filter_map(Result::ok).filter(|(_, v)| keep(v)).collect();
        self.keys = entries.iter().map(|&(k, _)| k).collect();
        self.walked = Some(Instant::now());
        entries
    }

    /// The next read walks the whole map: for summaries, which must not miss a new thread.
    pub fn forget(&mut self) {
        self.walked = None;
    }
}
