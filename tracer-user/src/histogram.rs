//! Latency histograms as the kernel keeps them (`tracer_common::hist_slot` buckets): folded
//! into log2 rows for BCC-style text and bars, and into an HDR histogram for percentiles.
use std::fmt::Write as _;

use hdrhistogram::Histogram as Hdr;
use serde::Serialize;
use tracer_common::{HIST_SLOTS, HIST_SUB, slot_lower};

#[derive(Clone, Debug)]
pub struct Histogram {
    pub slots: Vec<u64>,
    /// Largest value seen, when the kernel tracks it (0 otherwise).
    pub max_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { slots: vec![0; HIST_SLOTS], max_ns: 0 }
    }
}

#[derive(Serialize)]
pub struct Bucket {
    pub lo_ns: u64,
    pub hi_ns: u64,
    pub count: u64,
}

/// p50/p99/p99.9/max, each within one kernel bucket (at most 25%) of the truth.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

impl Histogram {
    pub fn new(slots: &[u64; HIST_SLOTS], max_ns: u64) -> Self {
        Self { slots: slots.to_vec(), max_ns }
    }

    pub fn total(&self) -> u64 {
        self.slots.iter().sum()
    }

    pub fn add(&mut self, other: &Histogram) {
        for (a, b) in self.slots.iter_mut().zip(&other.slots) {
            *a += b;
        }
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// What `self` gained since `earlier` (for per-interval views).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let slots = self.slots.iter().zip(&earlier.slots).map(|(a, b)| a.saturating_sub(*b)).collect();
        Histogram { slots, max_ns: 0 }
    }

    /// Counts per power of two: row `i` holds [2^i, 2^(i+1)) ns.
    pub fn log2_rows(&self) -> Vec<u64> {
        let mut rows = vec![0u64; HIST_SLOTS / HIST_SUB + 2];
        for (slot, &count) in self.slots.iter().enumerate() {
            let lo = slot_lower(slot);
            let row = if lo == 0 { 0 } else { tracer_common::log2(lo) as usize };
            rows[row] += count;
        }
        rows
    }

    pub fn percentiles(&self) -> Percentiles {
        let mut hdr = Hdr::<u64>::new_with_bounds(1, 1 << 42, 2).expect("valid HDR bounds");
        for (slot, &count) in self.slots.iter().enumerate().filter(|(_, c)| **c > 0) {
            // The bucket's midpoint stands for every value in it.
            let mid = (slot_lower(slot) + slot_lower(slot + 1)) / 2;
            let _ = hdr.record_n(mid.max(1), count);
        }
        let max = if self.max_ns > 0 { self.max_ns } else if hdr.is_empty() { 0 } else { hdr.max() };
        // A bucket's midpoint can exceed the largest value really seen.
        let at = |q: f64| if hdr.is_empty() { 0 } else { hdr.value_at_quantile(q).min(max) };
        Percentiles { count: hdr.len(), p50_ns: at(0.50), p99_ns: at(0.99), p999_ns: at(0.999), max_ns: max }
    }

    /// Non-empty range of log2 rows, for JSON.
    pub fn buckets(&self) -> Vec<Bucket> {
        let rows = self.log2_rows();
        span(&rows)
            .map(|(lo, hi)| (lo..=hi).map(|i| Bucket { lo_ns: 1 << i, hi_ns: 1 << (i + 1), count: rows[i] }).collect())
            .unwrap_or_default()
    }

    /// BCC-style text: one row per power of two from the first to the last non-empty one.
    pub fn render(&self, title: &str, indent: &str) -> String {
        const WIDTH: u64 = 40;
        let rows = self.log2_rows();
        let Some((lo, hi)) = span(&rows) else { return format!("{indent}(no {title})\n") };
        let max = rows[lo..=hi].iter().copied().max().unwrap_or(1).max(1);
        let mut out = format!("{indent}{title:>21} : {:<9} {}\n", "count", "distribution");
        for (i, &count) in rows.iter().enumerate().take(hi + 1).skip(lo) {
            let stars = (count * WIDTH).div_ceil(max) as usize;
            let range = format!("{} -> {}", human_ns(1 << i), human_ns(1 << (i + 1)));
            let _ = writeln!(out, "{indent}{range:>21} : {count:<9} |{:<40}|", "*".repeat(stars));
        }
        out
    }
}

fn span(rows: &[u64]) -> Option<(usize, usize)> {
    Some((rows.iter().position(|&c| c != 0)?, rows.iter().rposition(|&c| c != 0)?))
}

/// Compact duration: 512ns, 16.4us, 1.05ms, 2.15s.
pub fn human_ns(ns: u64) -> String {
    let f = ns as f64;
    match ns {
        0..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => format!("{:.1}us", f / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}ms", f / 1e6),
        _ => format!("{:.2}s", f / 1e9),
    }
}

pub fn human_bytes(b: u64) -> String {
    let f = b as f64;
    match b {
        0..1024 => format!("{b}B"),
        1024..1_048_576 => format!("{:.1}KiB", f / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1}MiB", f / 1_048_576.0),
        _ => format!("{:.2}GiB", f / 1_073_741_824.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::hist_slot;

    fn hist(values: &[(u64, u64)]) -> Histogram {
        let mut h = Histogram::default();
        for &(v, n) in values {
            h.slots[hist_slot(v)] += n;
        }
        h
    }

    #[test]
    fn renders_only_the_occupied_span() {
        let h = hist(&[(1500, 4), (5000, 2)]);
        let text = h.render("iteration time", "");
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(text.contains("1.0us -> 2.0us"), "{text}");
        assert!(text.contains("|****************************************|"), "{text}");
        assert_eq!(h.total(), 6);
        assert_eq!(h.buckets().len(), 3);
    }

    #[test]
    fn percentiles_land_within_a_bucket() {
        let h = hist(&[(100_000, 980), (20_000_000, 15), (300_000_000, 5)]);
        let p = h.percentiles();
        assert_eq!(p.count, 1000);
        assert!((87_500..=125_000).contains(&p.p50_ns), "{p:?}");
        assert!((17_500_000..=25_000_000).contains(&p.p99_ns), "{p:?}");
        assert!((262_000_000..=335_000_000).contains(&p.p999_ns), "{p:?}");
    }

    #[test]
    fn human_units() {
        assert_eq!(human_ns(999), "999ns");
        assert_eq!(human_ns(300_000_000), "300.0ms");
        assert_eq!(human_bytes(512 << 20), "512.0MiB");
    }
}
