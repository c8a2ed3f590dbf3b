//! Driving tests/src/bin/hotloop.rs: a tight epoll loop, pinned, that starts its measured
//! loop only when told, so that a tracer can attach first.
use std::{
    io::Write as _,
    process::{Command, Stdio},
    sync::mpsc::Receiver,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};

use super::{
    Ctx,
    procs::{self, Line, Proc},
};

pub const CPU: &str = "0";

pub struct Hotloop {
    proc: Proc,
    stdout: Receiver<Line>,
    secs: f64,
}

/// What the measured loop did.
pub struct HotRun {
    pub iterations: u64,
    pub ops: u64,
    pub elapsed_ns: u64,
}

impl Hotloop {
    /// Starts `hotloop MODE K SECS` on CPU 0 and waits until it is ready.
    pub fn start(ctx: &Ctx, mode: &str, k: u32, secs: f64) -> Result<Self> {
        let mut proc = Proc::spawn(
            "hotloop",
            Command::new("taskset")
                .args(["-c", CPU])
                .arg(&ctx.hotloop)
                .args([mode, &k.to_string(), &secs.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        )?;
        let stdout = procs::lines(proc.take_stdout());
        procs::wait_for_line(&stdout, "ready", Duration::from_secs(10), "hotloop")?;
        Ok(Self { proc, stdout, secs })
    }

    pub fn command_line(mode: &str, k: u32, secs: f64) -> String {
        format!("taskset -c {CPU} hotloop {mode} {k} {secs}")
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Starts the warm-up and then the measured loop.
    pub fn go(&mut self) -> Result<()> {
        writeln!(self.proc.stdin(), "go").context("starting hotloop")
    }

    /// Waits for the measured loop's result, then for the process to exit.
    pub fn finish(mut self) -> Result<HotRun> {
        let timeout = Duration::from_secs_f64(self.secs + 30.0);
        let line = procs::wait_for_line(&self.stdout, "iterations=", timeout, "hotloop")?;
        self.proc.wait(Duration::from_secs(10))?;
        parse(&line.text).ok_or_else(|| anyhow!("hotloop printed {:?}", line.text))
    }
}

/// `iterations=I ops=O elapsed_ns=E`.
fn parse(line: &str) -> Option<HotRun> {
    let field = |key: &str| {
        line.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse::<u64>().ok())
    };
    Some(HotRun { iterations: field("iterations")?, ops: field("ops")?, elapsed_ns: field("elapsed_ns")? })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_the_result_line() {
        let r = super::parse("iterations=10 ops=1000 elapsed_ns=5000").unwrap();
        assert_eq!((r.iterations, r.ops, r.elapsed_ns), (10, 1000, 5000));
    }
}
