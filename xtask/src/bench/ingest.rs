//! Section 4: how many records stalltrace can take. With threshold 0 every iteration of the
//! hotloop's bare epoll loop is a record: the most the ring buffer and the reader can see.
use std::{
    io::{BufRead as _, BufReader, Read},
    process::{Command, Stdio},
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use serde_json::Value;

use super::{
    Ctx,
    hotloop::Hotloop,
    procs::{self, Proc},
    quiet,
    report::{self, Section, Table},
    tracers,
};

struct Run {
    records: u64,
    lost: u64,
    iterations: u64,
    traced_secs: f64,
    /// stalltrace's CPU between attach and exit, and in all (attach and detach included).
    cpu_tracing_secs: f64,
    cpu_total_secs: f64,
}

pub fn measure(ctx: &Ctx) -> Result<Section> {
    let mut runs = Vec::new();
    let mut raw = Vec::new();
    for round in 0..ctx.rounds {
        let run = quiet::run(&ctx.tally, "ingest", || run_once(ctx))?;
        let r = &run.value;
        raw.push(format!(
            "round {} | {} records, {} lost, {} iterations in {:.3}s | cpu {:.3}s tracing, {:.3}s total{}",
            round + 1,
            r.records,
            r.lost,
            r.iterations,
            r.traced_secs,
            r.cpu_tracing_secs,
            r.cpu_total_secs,
            run.note()
        ));
        runs.push(run.value);
    }
    Ok(section(ctx, &runs, raw))
}

fn run_once(ctx: &Ctx) -> Result<Run> {
    // The loop outlives the tracer's attach and its -d.
    let mut hot = Hotloop::start(ctx, "epoll", 0, ctx.ingest_secs + 30.0)?;
    hot.go()?;
    let mut tracer = Proc::spawn(
        "stalltrace",
        Command::new(&ctx.stalltrace)
            .args(stalltrace_args(&hot.pid().to_string(), ctx.ingest_secs))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    // Read from the start: a full pipe would stall the tracer and count against it.
    let counter = count_records(tracer.take_stdout());
    tracers::wait_attached(&mut tracer)?;
    let cpu_at_attach = procs::cpu_ns(tracer.pid())? as f64 / 1e9;
    let exit = tracer.wait(Duration::from_secs_f64(ctx.ingest_secs + 60.0))?;
    drop(hot);
    let (records, summary) = counter.join().map_err(|_| anyhow!("record counter panicked"))?;
    let summary: Value = serde_json::from_str(&summary.context("stalltrace printed no summary")?)?;
    Ok(Run {
        records,
        lost: summary["lost"].as_u64().context("summary.lost")?,
        iterations: summary["iterations"].as_u64().unwrap_or(0),
        traced_secs: summary["traced_ns"].as_u64().context("summary.traced_ns")? as f64 / 1e9,
        cpu_tracing_secs: exit.cpu_secs - cpu_at_attach,
        cpu_total_secs: exit.cpu_secs,
    })
}

fn stalltrace_args(pid: &str, secs: f64) -> Vec<String> {
    ["-p", pid, "-t", "0", "--json", "-d", &format!("{secs}s")].map(String::from).to_vec()
}

/// Counts stall lines as they come (without parsing them: the reader must not be the
/// bottleneck) and keeps the last other line, the summary.
fn count_records(r: impl Read + Send + 'static) -> JoinHandle<(u64, Option<String>)> {
    thread::spawn(move || {
        let mut reader = BufReader::with_capacity(1 << 20, r);
        let (mut records, mut summary, mut line) = (0, None, Vec::new());
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            if line.starts_with(br#"{"type":"stall""#) {
                records += 1;
            } else if line.starts_with(br#"{"type":"summary""#) {
                summary = Some(String::from_utf8_lossy(&line).into_owned());
            }
            line.clear();
        }
        (records, summary)
    })
}

fn section(ctx: &Ctx, runs: &[Run], raw: Vec<String>) -> Section {
    let med = |f: &dyn Fn(&Run) -> f64| report::median(&runs.iter().map(f).collect::<Vec<_>>());
    let mut table = Table::new(&[
        "records/s received",
        "lost per run",
        "lost % of records",
        "loop iterations/s",
        "stalltrace CPU % (tracing)",
        "CPU s per M records",
        "CPU s per run (incl. attach)",
    ]);
    table.row(vec![
        report::int(med(&|r| r.records as f64 / r.traced_secs)),
        report::int(med(&|r| r.lost as f64)),
        report::num(med(&|r| 100.0 * r.lost as f64 / (r.records + r.lost) as f64), 2),
        report::int(med(&|r| r.iterations as f64 / r.traced_secs)),
        report::num(med(&|r| 100.0 * r.cpu_tracing_secs / r.traced_secs), 1),
        report::num(med(&|r| r.cpu_tracing_secs / r.records as f64 * 1e6), 3),
        report::num(med(&|r| r.cpu_total_secs), 3),
    ]);
    Section {
        title: "Ingest: every iteration a record".into(),
        method: format!(
            "`hotloop epoll` (bare `epoll_wait(0)` loop, CPU 0) traced by stalltrace with threshold \
             0, so that every iteration is a stall record, JSON to a pipe the bench reads and \
             counts as fast as it can, for {} s; {} runs, medians. Lost is the summary's count of \
             records the ring buffer could not take. CPU is stalltrace's user + system time \
             (wait4 rusage) minus what it had used when attached; \"loop iterations/s\" is the \
             summary's count of iterations the kernel saw, over the traced time.",
            ctx.ingest_secs, ctx.rounds
        ),
        commands: vec![
            Hotloop::command_line("epoll", 0, ctx.ingest_secs + 30.0),
            format!("stalltrace {} | (the bench counts lines)", stalltrace_args("PID", ctx.ingest_secs).join(" ")),
        ],
        tables: vec![table],
        raw,
    }
}
