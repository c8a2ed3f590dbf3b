//! Command-line surface: flags, subcommands and the small parsers they need.
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use tracer_common::group;
use crate::probes::SyscallProbes;

#[derive(Parser, Debug)]
#[command(name = "stalltrace", version, about = "Finds event-loop stalls in a running process and says why they happened.")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub trace: TraceArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a built-in event-loop server that stalls on purpose, and trace it.
    Demo(DemoArgs),
    /// Run always on: attach to every process a TOML config names, journal and metrics.
    Daemon(DaemonArgs),
    /// Render a flame graph from a recorded `--json` run.
    Flame(FlameArgs),
    /// The demo's event-loop server on its own (used by the demo and the tests).
    #[command(hide = true)]
    DemoServer(DemoServerArgs),
}

#[derive(Args, Debug)]
pub struct TraceArgs {
    /// Process to trace.
    #[arg(short, long)]
    pub pid: Option<u32>,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Report iterations at least this long (e.g. 10ms, 1.5s, 500us).
    #[arg(short, long, default_value = "10ms", value_parser = parse_duration)]
    pub threshold: Duration,
    /// Stop after this long (default: until Ctrl-C or the target exits).
    #[arg(short, long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// JSON lines on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// Plain text even on a terminal (the live view is the default there).
    #[arg(long)]
    pub no_tui: bool,
    /// At exit, write the stalls as folded stacks (Brendan Gregg's format, microseconds).
    #[arg(long, value_name = "FILE")]
    pub folded: Option<std::path::PathBuf>,
    /// At exit, write the stalls as a flame graph SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub flame: Option<std::path::PathBuf>,
    /// In text mode, print iteration histograms this often.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Probe groups: a comma list of loop, purge, sched, syscalls, net, stacks, park, alloc; or "default", "all".
    #[arg(long, default_value = "default", value_parser = parse_groups)]
    pub probes: u32,
    /// A thread group this long asleep with nobody waking it, while work waits, is starved.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub starve_after: Duration,
    /// Share of a thread group that must be asleep for starvation.
    #[arg(long, default_value_t = 0.9)]
    pub starve_share: f64,
    /// Connection attempts per second on one listener that make a storm (any overflow does too).
    #[arg(long, default_value_t = 1000)]
    pub storm_rate: u64,
    /// Allocator functions the alloc group looks for (wherever the target's allocator defines
    /// them; default realloc): their object's frames, and theirs, are the allocator's.
    #[arg(long, value_delimiter = ',')]
    pub alloc_funcs: Option<Vec<String>>,
    /// Time every call of the allocator functions with a uprobe pair (exact per-call latency,
    /// ~0.9 us a call) instead of sampling stalled stacks. Implies the alloc group.
    #[arg(long)]
    pub alloc_calls: bool,
    /// How the loop, purge and net groups see epoll_wait, madvise, accept and the like: uprobes
    /// on the target's libc wrappers (no cost to other processes), or syscall tracepoints (every
    /// syscall on the host takes the kernel's slow path meanwhile). auto: the wrappers where the
    /// target has them, tracepoints elsewhere; libc: only the wrappers.
    #[arg(long, value_enum, default_value_t = SyscallProbes::Auto)]
    pub syscall_probes: SyscallProbes,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// The TOML config ([[target]] comm/exe/pid + threshold, [journal], [metrics], [flame]).
    #[arg(long)]
    pub config: std::path::PathBuf,
}

#[derive(Args, Debug)]
pub struct FlameArgs {
    /// JSON lines written by `stalltrace --json`.
    pub input: std::path::PathBuf,
    /// The SVG to write.
    #[arg(short, long)]
    pub output: std::path::PathBuf,
    /// Also write the folded stacks here.
    #[arg(long)]
    pub folded: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct DemoServerArgs {
    /// Port on 127.0.0.1 to listen on (0: any free port, printed on stdout).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// listen(2) backlog: the accept queue's length (capped by net.core.somaxconn).
    #[arg(long, default_value_t = 511)]
    pub backlog: i32,
    /// The process name (comm) it takes.
    #[arg(long, default_value = "demo-loop")]
    pub name: String,
}

/// Default groups: all but syscalls (its samples are coarse: 10 ms, and the sampler then
/// runs in every iteration, not only stalled ones).
pub const DEFAULT_GROUPS: u32 =
    group::LOOP | group::PURGE | group::SCHED | group::NET | group::STACKS | group::PARK | group::ALLOC;
pub const ALL_GROUPS: u32 = DEFAULT_GROUPS | group::SYSCALLS;

pub fn parse_groups(s: &str) -> Result<u32> {
    let mut groups = group::LOOP;
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        groups |= match name {
            "default" => DEFAULT_GROUPS,
            "all" => ALL_GROUPS,
            "loop" => group::LOOP,
            "purge" => group::PURGE,
            "sched" => group::SCHED,
            "syscalls" => group::SYSCALLS,
            "alloc" => group::ALLOC,
            "net" => group::NET,
            "stacks" => group::STACKS,
            "park" => group::PARK,
            other => bail!("unknown probe group {other:?} (loop, purge, sched, syscalls, net, stacks, park, alloc, default, all)"),
        };
    }
    Ok(groups)
}

/// "10ms", "1.5s", "500us", "250ns", "2m"; a bare number is milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| anyhow!("invalid duration {s:?} (try 10ms, 1.5s)"))?;
    let scale = match unit.trim() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "" | "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        other => bail!("unknown duration unit {other:?} in {s:?} (ns, us, ms, s, m)"),
    };
    Ok(Duration::from_secs_f64(value * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10ms").unwrap(), Duration::from_millis(10));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("500us").unwrap(), Duration::from_micros(500));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5h").is_err());
    }

    #[test]
    fn groups() {
        assert_eq!(parse_groups("default").unwrap(), DEFAULT_GROUPS);
        assert_eq!(parse_groups("purge").unwrap(), group::LOOP | group::PURGE);
        assert_eq!(parse_groups("default,syscalls,alloc").unwrap(), ALL_GROUPS);
        assert!(parse_groups("kprobes").is_err());
    }
}
