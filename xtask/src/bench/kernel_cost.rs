//! Section 2: what stalltrace's programs cost in the kernel while Redis is under load, from
//! the kernel's own BPF statistics. A pass of its own: the statistics add two clock reads to
//! every program run, which must not weigh on section 1's throughput numbers.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;

use super::{
    Ctx,
    bpfstats::{self, Programs, StatsEnabled},
    procs, quiet,
    redis::{self, Redis, WORKLOADS},
    report::{self, Section, Table},
    tracers::{self, Variant},
    trap_cost,
};

const VARIANTS: [Variant; 3] =
    [Variant::Stalltrace("default"), Variant::Stalltrace("all"), Variant::Stalltrace(tracers::ALL_ALLOC_CALLS)];

/// Our programs in the order they are listed; any others follow.
const PROGRAM_ORDER: [&str; 13] = [
    "epoll_enter", "epoll_exit", "thread_exit", "madvise_enter", "munmap_enter", "mremap_enter",
    "purge_exit", "sched_switch", "thread_waking", "stall_sample", "alloc_enter", "alloc_exit", "conn_enter",
];

/// Per run: requests, wall seconds, Redis' CPU ns, and each program's (runs, ns) over the run.
struct Run {
    requests: u64,
    wall_secs: f64,
    redis_ns: u64,
    programs: bpfstats::Snapshot,
}

impl Run {
    fn counts(&self, program: &str) -> bpfstats::Counts {
        self.programs.get(program).copied().unwrap_or_default()
    }
}

/// Runs by (variant label, workload index).
type Runs = BTreeMap<(String, usize), Vec<Run>>;

pub fn measure(ctx: &Ctx, redis: &Redis, ns: &[u64]) -> Result<Section> {
    let _stats = StatsEnabled::enable()?;
    let mut runs = Runs::new();
    let mut uprobes = BTreeSet::new();
    let (trap_ns, mut raw) = trap_cost::measure(ctx)?;
    for round in 0..ctx.rounds {
        for v in report::rotated(&VARIANTS, round) {
            let tracer = v.attach(&ctx.stalltrace, redis.pid())?.expect("a stalltrace variant");
            let programs = Programs::of(tracer.pid())?;
            uprobes.extend(programs.uprobes.iter().cloned());
            for (wi, (w, &n)) in WORKLOADS.iter().zip(ns).enumerate() {
                // Others' syscalls run these programs too: a disturbed run is repeated.
                let run = quiet::run(&ctx.tally, &format!("{} {} (bpf stats)", v.label(), w.label()), || {
                    redis.flush()?;
                    let before = programs.snapshot()?;
                    let redis_before = procs::cpu_ns(redis.pid())?;
                    let bench = redis::run_benchmark(redis.port, w, n)?;
                    let redis_ns = procs::cpu_ns(redis.pid())? - redis_before;
                    let delta = bpfstats::delta(&before, &programs.snapshot()?);
                    Ok(Run { requests: bench.requests, wall_secs: bench.wall_secs, redis_ns, programs: delta })
                })?;
                raw.push(raw_line(round, &v.label(), &w.label(), &run.value) + &run.note());
                runs.entry((v.label(), wi)).or_default().push(run.value);
            }
            tracers::stop(tracer)?;
        }
    }
    Ok(section(ctx, &runs, &Accounting { uprobes, trap_ns }, raw))
}

/// What turns the counters into a cost to Redis: which programs trap, and what a trap costs.
struct Accounting {
    uprobes: BTreeSet<String>,
    trap_ns: f64,
}

fn raw_line(round: usize, variant: &str, workload: &str, run: &Run) -> String {
    let progs: Vec<String> = run.programs.iter().map(|(name, c)| format!("{name} {}/{}ns", c.runs, c.ns)).collect();
    let (n, secs) = (run.requests, run.wall_secs);
    format!("round {} | {variant:<24} | {workload:<17} | {n} req | {secs:.2}s | {}", round + 1, progs.join(", "))
}

fn section(ctx: &Ctx, runs: &Runs, acc: &Accounting, raw: Vec<String>) -> Section {
    let mut tables: Vec<Table> = VARIANTS.iter().map(|v| program_table(runs, &v.label())).collect();
    tables.push(totals_table(runs));
    tables.push(accounted_table(runs, acc));
    Section {
        title: "Kernel-side cost of stalltrace's BPF programs (Redis load)".into(),
        method: format!(
            "The same redis-server and redis-benchmark runs as section 1 (same N), in a pass of \
             their own with `kernel.bpf_stats_enabled=1` (restored afterwards), stalltrace variants \
             only, {} rounds, order rotated. Before and after each redis-benchmark run the bench \
             reads run_cnt and run_time_ns of every BPF program the stalltrace process holds (IDs and \
             counters from /proc/PID/fdinfo, names from `bpftool prog show -j`). Programs see every \
             process's events, the client's syscalls included, which is why runs per request \
             exceed what Redis alone does. Medians over the rounds. One table per variant \
             (runs per million requests, ns per run), then the totals.\n\n\
             The last table accounts what the probes cost Redis, with far less noise than \
             section 1's throughput. A uprobe hit costs the target its program plus a trap into \
             the kernel and back, which run_time_ns does not include. The trap was measured \
             here: hotloop's epoll loop under `--probes loop` minus untraced, minus the \
             program's run_time_ns a hit, {} pairs, median {:.0} ns. Per request: uprobe hits \
             times that, plus every program's run time (the client's events included, so this \
             overstates Redis' share), over Redis' own CPU ns a request in the same run. Where \
             Redis is CPU-bound (here at -P 16) its throughput keeps 1 minus that share.",
            ctx.rounds,
            ctx.rounds,
            acc.trap_ns
        ),
        commands: vec![
            "sysctl -w kernel.bpf_stats_enabled=1".into(),
            "grep -E 'prog_id|run_cnt|run_time_ns' /proc/STALLTRACE_PID/fdinfo/*   # before and after each run".into(),
            "bpftool prog show -j   # program names".into(),
        ],
        tables,
        raw,
    }
}

fn program_table(runs: &Runs, variant: &str) -> Table {
    let mut header = vec![format!("{variant}: program")];
    for w in &WORKLOADS {
        header.push(format!("{} runs/Mreq", w.label()));
        header.push("ns/run".into());
    }
    let mut table = Table::new(&header.iter().map(String::as_str).collect::<Vec<_>>());
    for name in program_names(runs, variant) {
        let mut row = vec![format!("`{name}`")];
        for wi in 0..WORKLOADS.len() {
            let rs = runs.get(&(variant.to_string(), wi)).map_or(&[][..], Vec::as_slice);
            let per_mreq: Vec<f64> = rs.iter().map(|r| per_million(r.counts(&name).runs, r.requests)).collect();
            let per_run: Vec<f64> =
                rs.iter().map(|r| r.counts(&name)).filter(|c| c.runs > 0).map(ns_per_run).collect();
            row.push(report::int(report::median(&per_mreq)));
            row.push(report::num(report::median(&per_run), 0));
        }
        table.row(row);
    }
    table
}

/// Total BPF time per million requests, per request, and as a share of one CPU over the run.
fn totals_table(runs: &Runs) -> Table {
    let mut table = Table::new(&["variant", "workload", "BPF ns/Mreq", "BPF ns/request", "BPF % of one CPU"]);
    for v in VARIANTS {
        for (wi, w) in WORKLOADS.iter().enumerate() {
            let rs = runs.get(&(v.label(), wi)).map_or(&[][..], Vec::as_slice);
            let total = |r: &Run| r.programs.values().map(|c| c.ns).sum::<u64>();
            let per_mreq: Vec<f64> = rs.iter().map(|r| per_million(total(r), r.requests)).collect();
            let cpu: Vec<f64> = rs.iter().map(|r| 100.0 * total(r) as f64 / 1e9 / r.wall_secs).collect();
            let med = report::median(&per_mreq);
            let cpu = report::median(&cpu);
            table.row(vec![v.label(), w.label(), report::int(med), report::num(med / 1e6, 0), report::num(cpu, 2)]);
        }
    }
    table
}

/// Per request: uprobe hits, their traps' ns, all programs' ns, Redis' CPU ns, and the
/// share of Redis' CPU the probes account for.
fn accounted_table(runs: &Runs, acc: &Accounting) -> Table {
    let mut table = Table::new(&[
        "variant",
        "workload",
        "uprobe hits/request",
        "trap ns/request",
        "BPF ns/request",
        "Redis CPU ns/request",
        "probes' share of Redis CPU",
    ]);
    for v in VARIANTS {
        for (wi, w) in WORKLOADS.iter().enumerate() {
            let rs = runs.get(&(v.label(), wi)).map_or(&[][..], Vec::as_slice);
            let per_request = |f: &dyn Fn(&Run) -> f64| report::median(&rs.iter().map(|r| f(r) / r.requests as f64).collect::<Vec<_>>());
            let hits = |r: &Run| r.programs.iter().filter(|(n, _)| acc.uprobes.contains(*n)).map(|(_, c)| c.runs).sum::<u64>() as f64;
            let bpf = |r: &Run| r.programs.values().map(|c| c.ns).sum::<u64>() as f64;
            let share = |r: &Run| (hits(r) * acc.trap_ns + bpf(r)) / r.redis_ns.max(1) as f64;
            let shares: Vec<f64> = rs.iter().map(share).collect();
            table.row(vec![
                v.label(),
                w.label(),
                report::num(per_request(&hits), 4),
                report::num(per_request(&hits) * acc.trap_ns, 1),
                report::num(per_request(&bpf), 1),
                report::int(per_request(&|r: &Run| r.redis_ns as f64)),
                format!("{}%", report::num(100.0 * report::median(&shares), 2)),
            ]);
        }
    }
    table
}

fn program_names(runs: &Runs, variant: &str) -> Vec<String> {
    let mut names: Vec<String> = runs
        .iter()
        .filter(|((v, _), _)| v == variant)
        .flat_map(|(_, rs)| rs.iter().flat_map(|r| r.programs.keys().cloned()))
        .collect();
    names.sort_by_key(|n| (PROGRAM_ORDER.iter().position(|p| p == n).unwrap_or(usize::MAX), n.clone()));
    names.dedup();
    names
}

fn per_million(x: u64, requests: u64) -> f64 {
    x as f64 * 1e6 / requests as f64
}

fn ns_per_run(c: bpfstats::Counts) -> f64 {
    c.ns as f64 / c.runs as f64
}
