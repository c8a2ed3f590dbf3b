//! What a uprobe hit costs the target beyond its program: the trap into the kernel and back,
//! which run_time_ns does not include. A hotloop iteration under the loop group takes longer
//! than untraced by the trap plus the epoll program, whose share the BPF statistics give.
use anyhow::Result;

use super::{
    Ctx,
    bpfstats::{self, Programs},
    hotloop::Hotloop,
    quiet, report,
    tracers::Variant,
};

/// One run's ns per iteration, and the uprobe programs' run ns per hit (0 untraced).
struct Iteration {
    ns: f64,
    bpf_ns: f64,
}

/// The median trap, in ns a hit, over `ctx.rounds` pairs of runs, and their raw lines. Must
/// run with the BPF statistics on.
pub fn measure(ctx: &Ctx) -> Result<(f64, Vec<String>)> {
    let mut traps = Vec::new();
    let mut raw = Vec::new();
    for round in 0..ctx.rounds {
        let mut pair = [0.0, 0.0];
        for traced in report::rotated(&[false, true], round) {
            let run = quiet::run(&ctx.tally, "hotloop epoll (trap)", || iteration(ctx, traced))?;
            raw.push(format!(
                "round {} | trap | hotloop epoll {} | {:.1} ns/iteration, {:.1} of them BPF{}",
                round + 1,
                if traced { "--probes loop" } else { "untraced" },
                run.value.ns,
                run.value.bpf_ns,
                run.note()
            ));
            pair[traced as usize] = run.value.ns - run.value.bpf_ns;
        }
        traps.push(pair[1] - pair[0]);
    }
    Ok((report::median(&traps), raw))
}

fn iteration(ctx: &Ctx, traced: bool) -> Result<Iteration> {
    let mut hot = Hotloop::start(ctx, "epoll", 0, ctx.hotloop_secs)?;
    let tracer = if traced { Variant::Stalltrace("loop").attach(&ctx.stalltrace, hot.pid())? } else { None };
    let programs = tracer.as_ref().map(|t| Programs::of(t.pid())).transpose()?;
    let before = programs.as_ref().map(Programs::snapshot).transpose()?;
    hot.go()?;
    let run = hot.finish()?;
    let bpf_ns = match (&programs, before) {
        (Some(p), Some(b)) => {
            // Per hit, not over the measured iterations: the counters include the warm-up's.
            let delta = bpfstats::delta(&b, &p.snapshot()?);
            let (runs, ns) = delta
                .iter()
                .filter(|(name, _)| p.uprobes.contains(*name))
                .fold((0, 0), |(r, n), (_, c)| (r + c.runs, n + c.ns));
            ns as f64 / runs.max(1) as f64
        }
        _ => 0.0,
    };
    if let Some(t) = tracer {
        super::tracers::stop(t)?;
    }
    Ok(Iteration { ns: run.elapsed_ns as f64 / run.iterations.max(1) as f64, bpf_ns })
}
