//! log2 histograms as the kernel keeps them, printed the way BCC's tools print theirs.
use std::fmt::Write as _;

use serde::Serialize;
use tracer_common::HIST_SLOTS;

/// Bucket `i` counts durations in [2^i, 2^(i+1)) ns.
#[derive(Clone, Debug, Default)]
pub struct Log2Hist {
    pub slots: Vec<u64>,
}

#[derive(Serialize)]
pub struct Bucket {
    pub lo_ns: u64,
    pub hi_ns: u64,
    pub count: u64,
}

impl Log2Hist {
    pub fn new(slots: &[u64; HIST_SLOTS]) -> Self {
        Self { slots: slots.to_vec() }
    }

    pub fn total(&self) -> u64 {
        self.slots.iter().sum()
    }

    /// Non-empty range of buckets, for JSON.
    pub fn buckets(&self) -> Vec<Bucket> {
        self.span()
            .map(|(lo, hi)| {
                (lo..=hi).map(|i| Bucket { lo_ns: 1 << i, hi_ns: 1 << (i + 1), count: self.slots[i] }).collect()
            })
            .unwrap_or_default()
    }

    fn span(&self) -> Option<(usize, usize)> {
        let lo = self.slots.iter().position(|&c| c != 0)?;
        let hi = self.slots.iter().rposition(|&c| c != 0)?;
        Some((lo, hi))
    }

    /// BCC-style text: one row per bucket from the first to the last non-empty one.
    pub fn render(&self, indent: &str) -> String {
        const WIDTH: u64 = 40;
        let Some((lo, hi)) = self.span() else { return format!("{indent}(no iterations)\n") };
        let max = self.slots[lo..=hi].iter().copied().max().unwrap_or(1).max(1);
        let mut out = format!("{indent}{:>21} : {:<9} {}\n", "iteration time", "count", "distribution");
        for i in lo..=hi {
            let count = self.slots[i];
            let stars = (count * WIDTH).div_ceil(max) as usize;
            let range = format!("{} -> {}", human_ns(1 << i), human_ns(1 << (i + 1)));
            let _ = writeln!(out, "{indent}{range:>21} : {count:<9} |{:<40}|", "*".repeat(stars));
        }
        out
    }
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

    #[test]
    fn renders_only_the_occupied_span() {
        let mut slots = [0u64; HIST_SLOTS];
        slots[10] = 4;
        slots[12] = 2;
        let h = Log2Hist::new(&slots);
        let text = h.render("");
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(text.contains("1.0us -> 2.0us"), "{text}");
        assert!(text.contains("|****************************************|"), "{text}");
        assert_eq!(h.total(), 6);
        assert_eq!(h.buckets().len(), 3);
    }

    #[test]
    fn human_units() {
        assert_eq!(human_ns(999), "999ns");
        assert_eq!(human_ns(300_000_000), "300.0ms");
        assert_eq!(human_bytes(512 << 20), "512.0MiB");
    }
}
