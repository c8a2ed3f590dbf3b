//! stalltrace: attach to a running event-loop process and say why its iterations stall.
mod app;
mod attribution;
mod cli;
mod daemon;
mod demo;
mod flame;
mod histogram;
mod net;
mod ongoing;
mod probes;
mod report;
mod session;
mod stacks;
mod starvation;
mod target;
mod tui;

use std::{
    io::IsTerminal as _,
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use anyhow::{Result, bail};
use clap::Parser as _;

use crate::{
    cli::{Cli, Command, CommonArgs},
    probes::ProbeConfig,
    report::Format,
    session::{Session, TraceOptions},
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // clap explains over several lines; a script or a tired human wants one.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("stalltrace: {first}");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes joined by ": ".
            eprintln!("stalltrace: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::Demo(args)) => demo::run(&args.common),
        Some(Command::DemoServer(args)) => demo::server::serve(args.port, args.backlog, &args.name),
        Some(Command::Daemon(args)) => daemon::run(&args.config),
        Some(Command::Flame(args)) => flame::from_jsonl(&args.input, &args.output, args.folded.as_deref()),
        None => {
            let Some(pid) = cli.trace.pid else {
                bail!("no target process: give -p PID (or try `stalltrace demo`)");
            };
            trace(pid, &cli.trace.common)
        }
    }
}

pub fn trace(pid: u32, common: &CommonArgs) -> Result<()> {
    let opts = TraceOptions {
        pid,
        threshold_ns: common.threshold.as_nanos() as u64,
        duration: common.duration,
        probes: ProbeConfig::new(common.probes, common.alloc_funcs.clone(), common.alloc_calls)
            .with_syscall_probes(common.syscall_probes),
        storm_rate: common.storm_rate,
        starvation: starvation::StarveConfig {
            share: common.starve_share,
            threshold_ns: common.starve_after.as_nanos() as u64,
            ..Default::default()
        },
    };
    // SIGHUP too: a closed terminal or ssh session must detach cleanly, not kill us mid-way.
    let mut session = Session::attach(&opts, stop_on_signals(&[SIGINT, SIGTERM, SIGHUP])?)?;
    if common.json {
        report::run(&mut session, Format::Json, None)?;
    } else if !common.no_tui && std::io::stdout().is_terminal() {
        tui::run(&mut session)?;
        // The live view is gone with the alternate screen: leave the summary behind.
        report::Reporter::new(Format::Human).summary(&session);
    } else {
        report::run(&mut session, Format::Human, Some(common.interval))?;
    }
    write_flames(&session.app, common)
    // Dropping the session detaches every link and unloads the programs.
}

/// A flag set by any of `signals`.
pub fn stop_on_signals(signals: &[i32]) -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for &sig in signals {
        signal_hook::flag::register(sig, Arc::clone(&flag))?;
    }
    Ok(flag)
}

fn write_flames(app: &app::App, common: &CommonArgs) -> Result<()> {
    if common.folded.is_none() && common.flame.is_none() {
        return Ok(());
    }
    let records: Vec<serde_json::Value> = app.stalls.iter().filter_map(|s| serde_json::to_value(s).ok()).collect();
    let lines = flame::folded(&records);
    if let Some(path) = &common.folded {
        flame::write_folded(path, &lines)?;
    }
    if let Some(path) = &common.flame {
        flame::write_svg(path, &lines, &format!("stalltrace: PID {} ({})", app.pid, app.comm))?;
    }
    Ok(())
}
