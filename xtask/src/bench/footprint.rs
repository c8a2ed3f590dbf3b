//! Section 6: the tracers' own CPU and memory, attached to an idle Redis and (from section 1's
//! runs) to a Redis under redis-benchmark load.
use std::{thread, time::Duration};

use anyhow::Result;

use super::{
    Ctx,
    procs,
    redis::Redis,
    redis_cost::LoadFootprint,
    report::{self, Section, Table},
    tracers::{self, Variant},
};

const WINDOW: Duration = Duration::from_secs(1);
const IDLE_VARIANTS: [Variant; 3] = [Variant::Stalltrace("default"), Variant::Daemon, Variant::Bpftrace];

pub fn measure(ctx: &Ctx, load: Option<&LoadFootprint>) -> Result<Section> {
    let redis = Redis::start()?;
    let mut table = Table::new(&["tracer", "target", "CPU % of one CPU (median)", "RSS MiB (median)", "RSS MiB (max)"]);
    let mut raw = Vec::new();
    for v in IDLE_VARIANTS {
        let samples = idle(ctx, &redis, v)?;
        raw.extend(samples.iter().map(|(cpu, rss)| format!("{} | idle redis | {cpu:.3}% | {rss} KiB", v.label())));
        table.row(row(&v.label(), "idle redis", &samples));
    }
    for v in crate::bench::redis_cost::VARIANTS.into_iter().filter(|v| *v != Variant::Untraced) {
        let samples = load.and_then(|l| l.get(&v.label()));
        match samples {
            Some(s) => table.row(row(&v.label(), "redis under redis-benchmark", s)),
            None => {
                let missing = "not measured (run the redis section)";
                table.row(vec![v.label(), "redis under redis-benchmark".into(), missing.into(), "–".into(), "–".into()])
            }
        }
    }
    Ok(Section {
        title: "Footprint".into(),
        method: format!(
            "CPU is the tracer's on-CPU time (sum of /proc/PID/task/*/schedstat) over a window, as \
             a percentage of one CPU; RSS is VmRSS from /proc/PID/status at the end of the window. \
             Idle: attached to a fresh, idle redis-server, {} windows of {} s each. Under load: \
             every redis-benchmark run of section 1 is a window.",
            ctx.idle_windows,
            WINDOW.as_secs()
        ),
        commands: vec!["stalltrace -p PID > /dev/null".into()],
        tables: vec![table],
        raw,
    })
}

/// (CPU %, RSS KiB) per window, the tracer attached to an idle `redis`.
fn idle(ctx: &Ctx, redis: &Redis, v: Variant) -> Result<Vec<(f64, u64)>> {
    let tracer = v.attach(&ctx.stalltrace, redis.pid())?.expect("a tracer");
    let mut samples = Vec::new();
    for _ in 0..ctx.idle_windows {
        let before = procs::cpu_ns(tracer.pid())?;
        thread::sleep(WINDOW);
        let cpu = (procs::cpu_ns(tracer.pid())? - before) as f64 / 1e9;
        samples.push((100.0 * cpu / WINDOW.as_secs_f64(), procs::rss_kib(tracer.pid())?));
    }
    tracers::stop(tracer)?;
    Ok(samples)
}

fn row(tracer: &str, target: &str, samples: &[(f64, u64)]) -> Vec<String> {
    let cpu: Vec<f64> = samples.iter().map(|s| s.0).collect();
    let rss: Vec<f64> = samples.iter().map(|s| s.1 as f64 / 1024.0).collect();
    vec![
        tracer.to_string(),
        target.to_string(),
        report::num(report::median(&cpu), 2),
        report::num(report::median(&rss), 1),
        report::num(report::max(&rss), 1),
    ]
}
