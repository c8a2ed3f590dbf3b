//! Connection storms: a burst of connection attempts (completed opens plus drops) on one
//! listener, found from the 10 ms samples. A storm starts when 100 ms hold more attempts than
//! the rate threshold allows, or any overflow; it ends after 500 ms without either.
use std::collections::{BTreeMap, VecDeque};

use super::{ListenerKey, ListenerSample, NetDelta, Sample, listener_delta};

const WINDOW_NS: u64 = 100_000_000;
const QUIET_NS: u64 = 500_000_000;
/// TCP retries a dropped SYN after one second (TCP_TIMEOUT_INIT): a storm that starts within
/// that long after a stall's storm is a wave of its retries.
const RETRY_WAVE_NS: u64 = 1_000_000_000;

/// A finished storm on one listener, before its cause is known.
#[derive(Clone, Debug)]
pub struct StormSpan {
    pub key: ListenerKey,
    pub backlog: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Attempts per second over the busiest 100 ms.
    pub peak_rate: u64,
    pub delta: NetDelta,
}

struct Step {
    /// Sample times bounding this step's activity, and the listener before it.
    from_ns: u64,
    to_ns: u64,
    before: ListenerSample,
    attempts: u64,
    overflows: u64,
}

struct Active {
    start_ns: u64,
    start: ListenerSample,
    end_ns: u64,
    end: ListenerSample,
    peak_rate: u64,
    max_queue: u32,
}

#[derive(Default)]
struct ListenerState {
    prev: Option<(u64, ListenerSample)>,
    window: VecDeque<Step>,
    active: Option<Active>,
}

pub struct StormDetector {
    rate_per_s: u64,
    counts_syns: bool,
    listeners: BTreeMap<ListenerKey, ListenerState>,
}

impl StormDetector {
    pub fn new(rate_per_s: u64, counts_syns: bool) -> Self {
        Self { rate_per_s, counts_syns, listeners: BTreeMap::new() }
    }

    /// Feeds one sample; returns the storms it ended.
    pub fn feed(&mut self, sample: &Sample) -> Vec<StormSpan> {
        let mut ended = Vec::new();
        for l in &sample.listeners {
            let state = self.listeners.entry(l.key.clone()).or_default();
            if let Some((prev_ns, prev)) = state.prev.replace((sample.t_ns, l.clone())) {
                let d = listener_delta(&prev, l, self.counts_syns);
                let step = Step {
                    from_ns: prev_ns,
                    to_ns: sample.t_ns,
                    before: prev,
                    attempts: d.new_connections + d.overflows,
                    overflows: d.overflows,
                };
                ended.extend(advance(state, step, l, self.rate_per_s, self.counts_syns));
            }
        }
        ended
    }

    /// Ends every storm still going (the session is over).
    pub fn flush(&mut self) -> Vec<StormSpan> {
        let counts_syns = self.counts_syns;
        self.listeners.values_mut().filter_map(|s| s.active.take().map(|a| finish(a, counts_syns))).collect()
    }
}

fn advance(state: &mut ListenerState, step: Step, now: &ListenerSample, rate: u64, counts_syns: bool) -> Option<StormSpan> {
    let t = step.to_ns;
    let busy = step.attempts > 0;
    state.window.push_back(step);
    while state.window.front().is_some_and(|s| s.to_ns + WINDOW_NS <= t) {
        state.window.pop_front();
    }
    let attempts: u64 = state.window.iter().map(|s| s.attempts).sum();
    let overflows: u64 = state.window.iter().map(|s| s.overflows).sum();
    let window_rate = attempts * 1_000_000_000 / WINDOW_NS;
    let hot = window_rate >= rate || overflows > 0;
    match &mut state.active {
        None if hot => {
            // The storm began with the first busy step still in the window.
            let first = state.window.iter().find(|s| s.attempts > 0).expect("a hot window has a busy step");
            state.active = Some(Active {
                start_ns: first.from_ns,
                start: first.before.clone(),
                end_ns: t,
                end: now.clone(),
                peak_rate: window_rate,
                max_queue: now.queue,
            });
            None
        }
        None => None,
        Some(a) => {
            if busy {
                a.end_ns = t;
                a.end = now.clone();
            }
            a.peak_rate = a.peak_rate.max(window_rate);
            a.max_queue = a.max_queue.max(now.queue);
            if !hot && t.saturating_sub(a.end_ns) >= QUIET_NS {
                return state.active.take().map(|a| finish(a, counts_syns));
            }
            None
        }
    }
}

fn finish(a: Active, counts_syns: bool) -> StormSpan {
    let mut delta = listener_delta(&a.start, &a.end, counts_syns);
    delta.max_queue = a.max_queue;
    StormSpan {
        key: a.end.key.clone(),
        backlog: a.end.backlog,
        start_ns: a.start_ns,
        end_ns: a.end_ns,
        peak_rate: a.peak_rate,
        delta,
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use tracer_common::ListenerCounters;

    fn at(t_ms: u64, drops: u64, established: u64) -> Sample {
        let key = ListenerKey { addr: IpAddr::from([127, 0, 0, 1]), port: 6379 };
        let counters = ListenerCounters { established, ..Default::default() };
        let l = ListenerSample { key, backlog: 8, queue: 0, drops, counters };
        Sample { t_ns: t_ms * 1_000_000, listeners: vec![l], ..Default::default() }
    }

    fn run(samples: &[Sample]) -> Vec<StormSpan> {
        let mut d = StormDetector::new(1000, false);
        let mut out: Vec<_> = samples.iter().flat_map(|s| d.feed(s)).collect();
        out.extend(d.flush());
        out
    }

    #[test]
    fn a_quiet_listener_has_no_storm() {
        let samples: Vec<_> = (0..200).map(|i| at(i * 10, 0, i / 20)).collect();
        assert!(run(&samples).is_empty());
    }

    #[test]
    fn overflows_then_a_burst_make_one_storm() {
        let mut samples: Vec<_> = (0..50).map(|i| at(i * 10, 0, 0)).collect();
        // 500..600 ms: 30 drops; 600..650 ms: 64 connections complete; then quiet for a second.
        samples.extend((50..60).map(|i| at(i * 10, (i - 49) * 3, 0)));
        samples.extend((60..65).map(|i| at(i * 10, 30, (i - 59) * 13)));
        samples.extend((65..170).map(|i| at(i * 10, 30, 65)));
        let storms = run(&samples);
        assert_eq!(storms.len(), 1, "{storms:?}");
        let s = &storms[0];
        assert_eq!(s.start_ns, 490_000_000);
        assert_eq!(s.end_ns, 640_000_000);
        assert_eq!((s.delta.overflows, s.delta.new_connections), (30, 65));
        assert!(s.peak_rate >= 650, "{s:?}");
    }
}

/// What a storm is blamed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// It began inside a stall of the target or within 500 ms after one, or within a second
    /// after a storm the stall caused (the kernel retries a dropped SYN a second later).
    Stall,
    External,
}

/// The stall a storm is linked to.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StallLink {
    pub tid: u32,
    pub start_ns: u64,
    pub duration_ns: u64,
}

/// A `{"type":"storm",...}` record.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Storm {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub pid: u32,
    pub listener: String,
    pub backlog: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub duration_ns: u64,
    pub peak_rate: u64,
    #[serde(flatten)]
    pub net: NetDelta,
    pub cause: Cause,
    pub stall: Option<StallLink>,
}

impl Storm {
    /// Links `span` to the stall (start, end, tid) it began in or right after, or to the stall
    /// behind an earlier storm it is a retry wave of.
    pub fn new(pid: u32, span: StormSpan, stalls: &[(u64, u64, u32)], earlier: &[Storm]) -> Self {
        let direct = stalls
            .iter()
            .filter(|&&(start, end, _)| start <= span.start_ns && span.start_ns <= end + super::AFTER_STALL_NS)
            .max_by_key(|&&(start, _, _)| start)
            .map(|&(start, end, tid)| StallLink { tid, start_ns: start, duration_ns: end - start });
        let wave = || {
            earlier
                .iter()
                .rev()
                .find(|s| s.listener == span.key.to_string() && s.end_ns + RETRY_WAVE_NS >= span.start_ns)
                .and_then(|s| s.stall.clone())
        };
        let linked = direct.or_else(wave);
        Storm {
            kind: "storm",
            pid,
            listener: span.key.to_string(),
            backlog: span.backlog,
            start_ns: span.start_ns,
            end_ns: span.end_ns,
            duration_ns: span.end_ns.saturating_sub(span.start_ns),
            peak_rate: span.peak_rate,
            net: span.delta,
            cause: if linked.is_some() { Cause::Stall } else { Cause::External },
            stall: linked,
        }
    }
}
