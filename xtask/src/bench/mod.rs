//! `cargo xtask bench`: what stalltrace costs the traced program, the kernel and the machine,
//! written to BENCHMARKS.md.
//!
//! Sections: redis (throughput under each tracer), kernel (BPF run time per request), probes
//! (cost per probe hit), ingest (records/s at threshold 0), latency (stall end to record),
//! footprint (tracer CPU and memory). `--only a,b` runs some, `--quick` runs them briefly,
//! `--rounds N` overrides the rounds, `--redis-rounds N` those of the Redis section alone (its
//! -P 16 rows need many to resolve 1% on a noisy host), `--redis-secs S` the length of a Redis run. Only a full run writes BENCHMARKS.md; a partial or quick
//! one writes target/BENCHMARKS.dev.md (or `--out PATH`), so development never replaces it.
mod bpfstats;
mod footprint;
mod host_speed;
mod hotloop;
mod idle;
mod ingest;
mod kernel_cost;
mod latency;
mod probe_cost;
mod procs;
mod quiet;
mod redis;
mod redis_cost;
mod report;
mod tracers;
mod trap_cost;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{setup, workspace_root};

/// Only the benchmarks need these; `cargo xtask setup` does not install them.
const BENCH_PACKAGES: &[&str] = &["bpftrace", "bpftool"];

const SECTIONS: [&str; 6] = ["redis", "kernel", "probes", "ingest", "latency", "footprint"];

/// What every section needs: the binaries, and how long and how often to measure.
pub struct Ctx {
    pub stalltrace: PathBuf,
    pub hotloop: PathBuf,
    /// Runs of every variant; each table cell is a median over them.
    pub rounds: usize,
    /// The same for the Redis throughput section, whose ratios are the noisiest.
    pub redis_rounds: usize,
    /// Target length of one redis-benchmark invocation.
    pub redis_secs: f64,
    pub hotloop_secs: f64,
    pub ingest_secs: f64,
    pub latency_samples: usize,
    pub idle_windows: usize,
    /// Runs repeated because other processes disturbed them.
    pub tally: quiet::Tally,
}

struct Options {
    quick: bool,
    rounds: Option<usize>,
    redis_rounds: Option<usize>,
    /// Seconds an untraced redis-benchmark invocation is calibrated to take: longer runs
    /// average out more of a shared VM's noise.
    redis_secs: Option<f64>,
    only: Vec<String>,
    out: Option<PathBuf>,
}

pub fn run(args: &[String]) -> Result<()> {
    let opts = Options::parse(args)?;
    setup::apt_install(BENCH_PACKAGES)?;
    ensure_tracefs()?;
    let ctx = opts.ctx();
    let started = Instant::now();
    let load_before = loadavg();
    let mut neighbours = Neighbours::default();
    let idle = idle::hold();
    let sections = measure(&ctx, &opts, &mut neighbours)?;
    neighbours.check();
    let command = std::iter::once("cargo xtask bench").chain(args.iter().map(String::as_str)).collect::<Vec<_>>().join(" ");
    let header = header(&ctx, &command, started.elapsed(), &load_before, &neighbours, &idle.description)?;
    let full = !opts.quick && opts.only.is_empty();
    let out = opts.out.clone().unwrap_or_else(|| {
        workspace_root().join(if full { "BENCHMARKS.md" } else { "target/BENCHMARKS.dev.md" })
    });
    std::fs::write(&out, report::markdown(&header, &sections)).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("xtask bench: wrote {} in {:.1} min", out.display(), started.elapsed().as_secs_f64() / 60.0);
    Ok(())
}

fn measure(ctx: &Ctx, opts: &Options, neighbours: &mut Neighbours) -> Result<Vec<report::Section>> {
    let mut progress = |what: &str| {
        eprintln!("xtask bench: {what}");
        neighbours.check();
    };
    let mut sections = Vec::new();
    let mut load = None;
    if opts.wants("redis") || opts.wants("kernel") {
        let redis = redis::Redis::start()?;
        progress("calibrating redis-benchmark");
        let ns = redis::calibrate(&redis, ctx.redis_secs)?;
        if opts.wants("redis") {
            let labels: Vec<String> = redis_cost::VARIANTS.iter().map(|v| v.label()).collect();
            progress(&format!("redis throughput: {}", labels.join(", ")));
            let (section, footprint) = redis_cost::measure(ctx, &redis, &ns)?;
            sections.push(section);
            load = Some(footprint);
        }
        if opts.wants("kernel") {
            progress("kernel-side cost (bpf_stats_enabled)");
            sections.push(kernel_cost::measure(ctx, &redis, &ns)?);
        }
    }
    if opts.wants("probes") {
        progress("cost per probe hit (hotloop)");
        sections.push(probe_cost::measure(ctx)?);
    }
    if opts.wants("ingest") {
        progress("ingest at threshold 0");
        sections.push(ingest::measure(ctx)?);
    }
    if opts.wants("latency") {
        progress("detection latency");
        sections.push(latency::measure(ctx)?);
    }
    if opts.wants("footprint") {
        progress("footprint");
        sections.push(footprint::measure(ctx, load.as_ref())?);
    }
    Ok(sections)
}

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let mut opts =
            Options { quick: false, rounds: None, redis_rounds: None, redis_secs: None, only: Vec::new(), out: None };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--quick" => opts.quick = true,
                "--rounds" => opts.rounds = Some(value()?.parse().context("--rounds")?),
                "--redis-rounds" => opts.redis_rounds = Some(value()?.parse().context("--redis-rounds")?),
                "--redis-secs" => opts.redis_secs = Some(value()?.parse().context("--redis-secs")?),
                "--only" => opts.only = value()?.split(',').map(str::to_string).collect(),
                "--out" => opts.out = Some(PathBuf::from(value()?)),
                other => {
                    bail!(
                        "unknown bench option {other:?} (--quick, --rounds N, --redis-rounds N, --redis-secs S, --only {}, --out PATH)",
                        SECTIONS.join(",")
                    )
                }
            }
        }
        if let Some(bad) = opts.only.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
            bail!("unknown section {bad:?} (one of {})", SECTIONS.join(", "));
        }
        Ok(opts)
    }

    fn wants(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }

    fn ctx(&self) -> Ctx {
        let q = self.quick;
        let release = workspace_root().join("target/release");
        let rounds = self.rounds.unwrap_or(if q { 3 } else { 5 }).max(1);
        Ctx {
            stalltrace: release.join("stalltrace"),
            hotloop: release.join("hotloop"),
            rounds,
            redis_rounds: self.redis_rounds.unwrap_or(rounds).max(1),
            redis_secs: self.redis_secs.unwrap_or(if q { 0.5 } else { 3.0 }),
            hotloop_secs: if q { 0.3 } else { 1.0 },
            ingest_secs: if q { 2.0 } else { 5.0 },
            latency_samples: if q { 5 } else { 20 },
            idle_windows: if q { 2 } else { 5 },
            tally: quiet::Tally::default(),
        }
    }
}

/// stalltrace mounts tracefs itself, but bpftrace needs it mounted first.
fn ensure_tracefs() -> Result<()> {
    if std::path::Path::new("/sys/kernel/tracing/events").exists() {
        return Ok(());
    }
    crate::run_cmd(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
}

/// Tracing programs that other processes load run on the workloads' events too, untraced
/// runs included, so the bench looks for them before every section and at the end.
#[derive(Default)]
struct Neighbours {
    checks: usize,
    busy: usize,
    names: BTreeSet<String>,
}

impl Neighbours {
    fn check(&mut self) {
        self.checks += 1;
        match bpfstats::tracing_programs() {
            Ok(names) if names.is_empty() => {}
            Ok(names) => {
                eprintln!("xtask bench: warning: other processes have tracing BPF programs loaded; they weigh on every run");
                self.busy += 1;
                self.names.extend(names);
            }
            Err(e) => eprintln!("xtask bench: warning: could not list BPF programs: {e:#}"),
        }
    }

    fn describe(&self) -> String {
        if self.busy == 0 {
            format!("none at any of {} checks (before each section and at the end)", self.checks)
        } else {
            let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
            format!("**present at {} of {} checks**: {}", self.busy, self.checks, names.join(", "))
        }
    }
}

fn header(ctx: &Ctx, command: &str, took: Duration, load_before: &str, neighbours: &Neighbours, idle: &str) -> Result<String> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    Ok(format!(
        "# Benchmarks\n\n\
         Generated by `{command}` on {date} ({rounds} rounds{redis_rounds}; the run took {mins:.1} min). \
         Do not edit by hand: rerun the command.\n\n\
         - Kernel: `{kernel}` (uname -r)\n\
         - CPU: {cpu}, {nproc} CPUs (nproc)\n\
         - stalltrace: `target/release/stalltrace` (the commands below call it `stalltrace`), git {rev}\n\
         - {redis}; {bpftrace}\n\
         - Load average before / after: {load_before} / {load_after}\n\
         - Idle CPUs: {idle}\n\
         - Tracing BPF programs of other processes: {neighbours}\n\
         - Disturbed runs: {repeated} repeated because other processes used more than {limit}% of a \
         CPU meanwhile, or a fixed spin on some CPU right after took more than {host_limit}x \
         the fastest of the session (the host under this VM busy elsewhere: it reports no steal \
         time); {kept} kept although still disturbed (marked DISTURBED in the appendix)\n\n\
         A shared, noisy virtual machine: compare columns within a table (measured in the same \
         rounds, in rotated order), not with numbers from another machine or run.\n",
        date = first_line(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]),
        rounds = ctx.rounds,
        redis_rounds = if ctx.redis_rounds == ctx.rounds { String::new() } else { format!(", {} in section 1", ctx.redis_rounds) },
        mins = took.as_secs_f64() / 60.0,
        kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
        rev = git_rev(),
        redis = first_line(&["redis-server", "--version"]),
        bpftrace = first_line(&["bpftrace", "--version"]),
        load_after = loadavg(),
        neighbours = neighbours.describe(),
        repeated = ctx.tally.repeated.get(),
        limit = quiet::LIMIT_PCT,
        host_limit = host_speed::LIMIT,
        kept = ctx.tally.kept_disturbed.get(),
    ))
}

fn git_rev() -> String {
    let rev = first_line(&["git", "-C", &workspace_root().to_string_lossy(), "rev-parse", "--short", "HEAD"]);
    let dirty = Command::new("git")
        .args(["-C", &workspace_root().to_string_lossy(), "status", "--porcelain", "--untracked-files=no"])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if dirty { format!("{rev} with uncommitted changes") } else { rev }
}

fn first_line(cmd: &[&str]) -> String {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_string))
        .unwrap_or_else(|| format!("({} unavailable)", cmd[0]))
}

fn loadavg() -> String {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}
