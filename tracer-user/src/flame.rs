//! Flame-style summaries: stalls as folded stacks (Brendan Gregg's format, values in
//! microseconds of stall time, one root frame per verdict) and their SVG rendering.
use std::{collections::BTreeMap, fs::File, io::BufWriter, path::Path};

use anyhow::{Context as _, Result};

use crate::attribution::Stall;

/// Folds stalls into `frame;frame;... value` lines, summing equal stacks.
pub fn folded<'a>(stalls: impl IntoIterator<Item = &'a Stall>) -> Vec<String> {
    let mut sums: BTreeMap<String, u64> = BTreeMap::new();
    for s in stalls {
        for (stack, ns) in stall_stacks(s) {
            *sums.entry(stack).or_default() += ns / 1000;
        }
    }
    sums.into_iter().filter(|(_, us)| *us > 0).map(|(k, us)| format!("{k} {us}")).collect()
}

/// One stall's time, split by component under its verdict's root frame.
fn stall_stacks(s: &Stall) -> Vec<(String, u64)> {
    let root = format!("{};{}", s.verdict.as_str(), s.comm);
    let mut out = Vec::new();
    let mut push = |leaf: &str, ns: u64| {
        if ns > 0 {
            out.push((format!("{root};{leaf}"), ns));
        }
    };
    push("madvise", s.madvise.ns);
    push("munmap", s.munmap.ns);
    push("mremap", s.mremap.ns);
    push("allocator", s.alloc.ns);
    push("off_cpu;runnable", s.off_cpu.runnable_ns);
    push("off_cpu;blocked", s.off_cpu.blocked_ns);
    // by_name is wall time; the syscall component is on-CPU time, shared out in proportion.
    let wall: u64 = s.syscalls.by_name.iter().map(|(_, n)| n).sum();
    for (name, ns) in &s.syscalls.by_name {
        let on_cpu = if wall == 0 { 0 } else { (u128::from(s.syscalls.ns) * u128::from(*ns) / u128::from(wall)) as u64 };
        push(&format!("syscall;{name}"), on_cpu);
    }
    push("app_code", s.app_code_ns);
    out
}

pub fn write_folded(path: &Path, lines: &[String]) -> Result<()> {
    std::fs::write(path, lines.join("\n") + "\n").with_context(|| format!("writing {}", path.display()))
}

pub fn write_svg(path: &Path, lines: &[String], title: &str) -> Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = title.to_string();
    opts.count_name = "us of stall time".to_string();
    inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), BufWriter::new(file))
        .with_context(|| format!("rendering {}", path.display()))
}
