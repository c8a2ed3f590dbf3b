//! Section 2: what stalltrace's programs cost in the kernel while Redis is under load, from
//! the kernel's own BPF statistics. A pass of its own: the statistics add two clock reads to
//! every program run, which must not weigh on section 1's throughput numbers.
use std::collections::BTreeMap;

use anyhow::Result;

use super::{
    Ctx,
    bpfstats::{self, Programs, StatsEnabled},
    quiet,
    redis::{self, Redis, WORKLOADS},
    report::{self, Section, Table},
    tracers::{self, Variant},
};

const VARIANTS: [Variant; 3] =
    [Variant::Stalltrace("default"), Variant::Stalltrace("all"), Variant::Stalltrace(tracers::ALL_ALLOC_CALLS)];

/// Our programs in the order they are listed; any others follow.
const PROGRAM_ORDER: [&str; 13] = [
    "epoll_enter", "epoll_exit", "thread_exit", "madvise_enter", "munmap_enter", "mremap_enter",
    "purge_exit", "sched_switch", "thread_waking", "stall_sample", "alloc_enter", "alloc_exit", "conn_enter",
];

/// Per run: requests, wall seconds, and each program's (runs, ns) over the run.
struct Run {
    requests: u64,
    wall_secs: f64,
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
    let mut raw = Vec::new();
    for round in 0..ctx.rounds {
        for v in report::rotated(&VARIANTS, round) {
            let tracer = v.attach(&ctx.stalltrace, redis.pid())?.expect("a stalltrace variant");
            let programs = Programs::of(tracer.pid())?;
            for (wi, (w, &n)) in WORKLOADS.iter().zip(ns).enumerate() {
                // Others' syscalls run these programs too: a disturbed run is repeated.
                let run = quiet::run(&ctx.tally, &format!("{} {} (bpf stats)", v.label(), w.label()), || {
                    redis.flush()?;
                    let before = programs.snapshot()?;
                    let bench = redis::run_benchmark(redis.port, w, n)?;
                    let delta = bpfstats::delta(&before, &programs.snapshot()?);
                    Ok(Run { requests: bench.requests, wall_secs: bench.wall_secs, programs: delta })
                })?;
                raw.push(raw_line(round, &v.label(), &w.label(), &run.value) + &run.note());
                runs.entry((v.label(), wi)).or_default().push(run.value);
            }
            tracers::stop(tracer)?;
        }
    }
    Ok(section(ctx, &runs, raw))
}

fn raw_line(round: usize, variant: &str, workload: &str, run: &Run) -> String {
    let progs: Vec<String> = run.programs.iter().map(|(name, c)| format!("{name} {}/{}ns", c.runs, c.ns)).collect();
    let (n, secs) = (run.requests, run.wall_secs);
    format!("round {} | {variant:<24} | {workload:<17} | {n} req | {secs:.2}s | {}", round + 1, progs.join(", "))
}

fn section(ctx: &Ctx, runs: &Runs, raw: Vec<String>) -> Section {
    let mut tables: Vec<Table> = VARIANTS.iter().map(|v| program_table(runs, &v.label())).collect();
    tables.push(totals_table(runs));
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
             (runs per million requests, ns per run), then the totals.",
            ctx.rounds
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
