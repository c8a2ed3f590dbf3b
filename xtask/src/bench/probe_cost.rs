//! Section 3: what each probe group costs per hit, measured on the hotloop workload: the same
//! operation timed with and without stalltrace attached with only that group (and the loop
//! group, which is always on).
use std::collections::BTreeMap;

use anyhow::Result;

use super::{
    Ctx,
    hotloop::{HotRun, Hotloop},
    quiet,
    report::{self, Section, Table},
    tracers::{self, Variant},
};

/// Operations per loop iteration: the per-iteration epoll_wait adds only 1/K of its cost
/// to each operation.
const K: u32 = 100;

/// (hotloop mode, probe groups, what the difference measures). Each syscall the groups time
/// is measured both ways: a uprobe on the target's libc wrapper (the default) and its syscall
/// tracepoint (`--syscall-probes tracepoints`, which every other process pays for too).
const CASES: [(&str, &str, &str); 9] = [
    ("epoll", "loop", "one loop iteration: `epoll_wait(0)` returning one event (uprobe on libc's wrapper, emulated)"),
    ("epoll", "loop --syscall-probes tracepoints", "the same with the syscall tracepoint"),
    // No program runs on getppid: what is left is what the loop group costs every other
    // syscall, and with a syscall tracepoint attached that is the kernel's slower syscall
    // path, switched on for every task on the host.
    ("getppid", "loop", "`getppid` with no probe on it (and no syscall tracepoint)"),
    ("getppid", "loop --syscall-probes tracepoints", "`getppid` with no probe on it, a syscall tracepoint attached (the slow path)"),
    // The syscalls group probes no syscall: this is what remains of it per call.
    ("getppid", "loop,syscalls", "`getppid` with the syscalls group (sampled, no probe per call)"),
    ("madvise", "loop,purge", "`madvise(MADV_NORMAL)` on one page, called through the GOT (rustc), so libc's wrapper keeps its stepped entry probe; probed again after its syscall"),
    ("madvise", "loop,purge --syscall-probes tracepoints", "the same with the purge tracepoints"),
    ("realloc", "loop,alloc", "libc `realloc` 64 <-> 128 bytes (alloc group: sampled, no probe per call)"),
    ("realloc", "loop,alloc --alloc-calls", "libc `realloc` 64 <-> 128 bytes (--alloc-calls: uprobe + uretprobe)"),
];

/// ns per unit (iteration for epoll, operation otherwise) by (case index, traced).
type Samples = BTreeMap<(usize, bool), Vec<f64>>;

pub fn measure(ctx: &Ctx) -> Result<Section> {
    let mut samples = Samples::new();
    let mut raw = Vec::new();
    for round in 0..ctx.rounds {
        for (ci, &(mode, groups, _)) in CASES.iter().enumerate() {
            for traced in report::rotated(&[false, true], round) {
                let label = if traced { format!("--probes {groups}") } else { "untraced".into() };
                let run = quiet::run(&ctx.tally, &format!("hotloop {mode} {label}"), || {
                    run_once(ctx, mode, traced.then_some(groups))
                })?;
                let note = run.note();
                let HotRun { iterations, ops, elapsed_ns } = run.value;
                let units = if mode == "epoll" { iterations } else { ops };
                let ns = elapsed_ns as f64 / units as f64;
                raw.push(format!(
                    "round {} | {mode:<8} | {label:<24} | {units} units in {elapsed_ns} ns | {ns:.1} ns/unit{note}",
                    round + 1
                ));
                samples.entry((ci, traced)).or_default().push(ns);
            }
        }
    }
    Ok(section(ctx, &samples, raw))
}

/// One hotloop run, under stalltrace with `groups` if given.
fn run_once(ctx: &Ctx, mode: &str, groups: Option<&'static str>) -> Result<HotRun> {
    let mut hot = Hotloop::start(ctx, mode, k_for(mode), ctx.hotloop_secs)?;
    let tracer = match groups {
        Some(g) => Variant::Stalltrace(g).attach(&ctx.stalltrace, hot.pid())?,
        None => None,
    };
    hot.go()?;
    let run = hot.finish()?;
    if let Some(t) = tracer {
        tracers::stop(t)?;
    }
    Ok(run)
}

/// The epoll case measures the bare loop.
fn k_for(mode: &str) -> u32 {
    if mode == "epoll" { 0 } else { K }
}

fn section(ctx: &Ctx, samples: &Samples, raw: Vec<String>) -> Section {
    let mut table =
        Table::new(&["cost of", "probes", "untraced ns", "traced ns", "Δ ns per hit", "untraced /s", "traced /s"]);
    for (ci, &(_, groups, what)) in CASES.iter().enumerate() {
        let med = |traced| report::median(samples.get(&(ci, traced)).map_or(&[][..], Vec::as_slice));
        let (off, on) = (med(false), med(true));
        table.row(vec![
            what.to_string(),
            format!("`{groups}`"),
            report::num(off, 1),
            report::num(on, 1),
            report::num(on - off, 1),
            report::int(1e9 / off),
            report::int(1e9 / on),
        ]);
    }
    Section {
        title: "Cost per probe hit (hotloop)".into(),
        method: format!(
            "`hotloop` (tests/src/bin/hotloop.rs) is a real epoll loop pinned to CPU 0: each \
             iteration calls `epoll_wait(timeout 0)` on an always-readable eventfd, then does \
             K={K} operations. It runs {:.1} s after a 0.2 s warm-up, untraced or under `stalltrace \
             -p PID --probes GROUPS`, alternating which goes first, {} rounds; medians. The first \
             row is per loop iteration (K=0); the others per operation, each including 1/{K} of \
             an iteration. Δ = traced − untraced: the probe's cost per hit, plus, where a \
             syscall tracepoint is attached, the slower syscall path every syscall on the host \
             takes meanwhile (the fourth row measures that alone).",
            ctx.hotloop_secs, ctx.rounds
        ),
        commands: CASES
            .iter()
            .map(|&(mode, groups, _)| {
                let hot = Hotloop::command_line(mode, k_for(mode), ctx.hotloop_secs);
                format!("{hot}   # alone, and with: stalltrace -p PID --probes {groups}")
            })
            .collect(),
        tables: vec![table],
        raw,
    }
}
