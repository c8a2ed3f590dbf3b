//! Flame-style summaries: stalls as folded stacks (Brendan Gregg's format, values in
//! microseconds of stall time, one root frame per verdict) and their SVG rendering. Works on
//! the JSON records, so a live session and a recorded `--json` run fold the same way.
use std::{collections::BTreeMap, fs::File, io::BufWriter, path::Path};

use anyhow::{Context as _, Result};
use serde_json::Value;

/// Folds stall records into `frame;frame;... value` lines, summing equal stacks.
pub fn folded<'a>(records: impl IntoIterator<Item = &'a Value>) -> Vec<String> {
    let mut sums: BTreeMap<String, u64> = BTreeMap::new();
    for r in records.into_iter().filter(|r| r["type"] == "stall") {
        for (stack, ns) in stall_stacks(r) {
            *sums.entry(stack).or_default() += ns / 1000;
        }
    }
    sums.into_iter().filter(|(_, us)| *us > 0).map(|(k, us)| format!("{k} {us}")).collect()
}

fn ns(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// One stall's time: its stacks with their weights, and what no stack covers split by the
/// measured components.
fn stall_stacks(r: &Value) -> Vec<(String, u64)> {
    let root = format!("{};{}", r["verdict"].as_str().unwrap_or("stall"), sanitize(r["comm"].as_str().unwrap_or("?")));
    let mut out = Vec::new();
    let mut covered = 0;
    for s in r["stacks"].as_array().into_iter().flatten() {
        let frames: Vec<String> = s["frames"].as_array().into_iter().flatten().filter_map(|f| f.as_str()).map(sanitize).collect();
        let weight = ns(&s["weight_ns"]).min(ns(&r["duration_ns"]).saturating_sub(covered));
        covered += weight;
        if !frames.is_empty() {
            out.push((format!("{root};{}", frames.join(";")), weight));
        }
    }
    let rest = ns(&r["duration_ns"]).saturating_sub(covered);
    if rest > 0 {
        out.extend(components(r, rest).into_iter().map(|(leaf, v)| (format!("{root};{leaf}"), v)));
    }
    out
}

/// `budget` ns split across the record's components in proportion to their sizes.
fn components(r: &Value, budget: u64) -> Vec<(String, u64)> {
    let parts = [
        ("madvise", ns(&r["madvise"]["ns"])),
        ("munmap", ns(&r["munmap"]["ns"])),
        ("mremap", ns(&r["mremap"]["ns"])),
        ("allocator", ns(&r["alloc"]["ns"])),
        ("off_cpu;runnable", ns(&r["off_cpu"]["runnable_ns"])),
        ("off_cpu;blocked", ns(&r["off_cpu"]["blocked_ns"])),
        ("syscalls", ns(&r["syscalls"]["ns"])),
        ("connections", ns(&r["connections"]["ns"])),
        ("app_code", ns(&r["app_code_ns"])),
    ];
    let total: u64 = parts.iter().map(|p| p.1).sum();
    if total == 0 {
        return vec![("[unattributed]".into(), budget)];
    }
    parts
        .iter()
        .filter(|p| p.1 > 0)
        .map(|&(name, v)| (format!("[{name}]"), (u128::from(budget) * u128::from(v) / u128::from(total)) as u64))
        .collect()
}

/// Folded stacks separate frames with ';' and the value with a space.
fn sanitize(frame: &str) -> String {
    frame.replace(';', ":").replace(' ', "_")
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

/// `stalltrace flame IN.jsonl -o OUT.svg`: the same fold over a recorded run.
pub fn from_jsonl(input: &Path, svg: &Path, folded_out: Option<&Path>) -> Result<()> {
    let text = std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let records: Vec<Value> = text.lines().filter(|l| !l.trim().is_empty()).filter_map(|l| serde_json::from_str(l).ok()).collect();
    let lines = folded(&records);
    if lines.is_empty() {
        anyhow::bail!("{} holds no stall records", input.display());
    }
    if let Some(path) = folded_out {
        write_folded(path, &lines)?;
    }
    write_svg(svg, &lines, &format!("stalltrace: {}", input.display()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn stacks_carry_their_weight_and_the_rest_is_split_by_component() {
        let stall = json!({"type":"stall","verdict":"allocator_purge","comm":"redis-server","duration_ns":30_000_000,
            "madvise":{"ns":20_000_000},"app_code_ns":10_000_000,
            "stacks":[{"frames":["main","serverCron","madvise","[k] zap_pte_range"],"weight_ns":20_000_000}]});
        let lines = folded([&stall]);
        assert!(lines.contains(&"allocator_purge;redis-server;main;serverCron;madvise;[k]_zap_pte_range 20000".to_string()), "{lines:?}");
        assert!(lines.contains(&"allocator_purge;redis-server;[madvise] 6666".to_string()), "{lines:?}");
        assert!(lines.contains(&"allocator_purge;redis-server;[app_code] 3333".to_string()), "{lines:?}");
    }
}
