//! Child processes for the benchmarks: every one is stopped by its PID and reaped, every wait
//! has a deadline, and every pipe is drained so that no child ever blocks on a full one.
use std::{
    io::{BufRead as _, BufReader, Read},
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

/// A child that is SIGKILLed and reaped when dropped, unless it was stopped first.
pub struct Proc {
    child: Child,
    name: String,
    reaped: bool,
}

/// How a stopped child ended, and the CPU it used (user + system, from wait4).
pub struct Exit {
    pub success: bool,
    pub cpu_secs: f64,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        let child = cmd.spawn().with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Self { child, name: name.to_string(), reaped: false })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn take_stdout(&mut self) -> impl Read + Send + 'static {
        self.child.stdout.take().expect("stdout was piped")
    }

    pub fn take_stderr(&mut self) -> impl Read + Send + 'static {
        self.child.stderr.take().expect("stderr was piped")
    }

    pub fn stdin(&mut self) -> &mut std::process::ChildStdin {
        self.child.stdin.as_mut().expect("stdin was piped")
    }

    /// Sends `sig` (SIGINT lets a tracer print its summary and detach), waits up to `timeout`,
    /// then SIGKILLs. An error if the child needed the SIGKILL.
    pub fn stop(&mut self, sig: i32, timeout: Duration) -> Result<Exit> {
        unsafe { libc::kill(self.pid() as i32, sig) };
        self.wait(timeout)
    }

    /// Waits up to `timeout` for the child to exit on its own, then SIGKILLs.
    pub fn wait(&mut self, timeout: Duration) -> Result<Exit> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.try_reap()? {
                return Ok(exit);
            }
            if Instant::now() > deadline {
                self.kill();
                bail!("{} (PID {}) did not exit within {timeout:?}; killed", self.name, self.pid());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// wait4 rather than `Child::wait`: its rusage is the child's exact CPU time.
    fn try_reap(&mut self) -> Result<Option<Exit>> {
        if self.reaped {
            bail!("{} already reaped", self.name);
        }
        let (mut status, mut ru) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
        let r = unsafe { libc::wait4(self.pid() as i32, &mut status, libc::WNOHANG, &mut ru) };
        if r < 0 {
            bail!("wait4 {}: {}", self.name, std::io::Error::last_os_error());
        }
        if r == 0 {
            return Ok(None);
        }
        self.reaped = true;
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        let success = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        Ok(Some(Exit { success, cpu_secs: secs(ru.ru_utime) + secs(ru.ru_stime) }))
    }

    fn kill(&mut self) {
        if !self.reaped {
            unsafe {
                libc::kill(self.pid() as i32, libc::SIGKILL);
                libc::waitpid(self.pid() as i32, std::ptr::null_mut(), 0);
            }
            self.reaped = true;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One line of a child's output and the CLOCK_MONOTONIC time it was read.
pub struct Line {
    pub at_ns: u64,
    pub text: String,
}

/// Reads `r` line by line on a thread of its own. The thread keeps reading after the
/// receiver is gone, so the child never blocks writing.
pub fn lines(r: impl Read + Send + 'static) -> Receiver<Line> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for text in BufReader::new(r).lines().map_while(Result::ok) {
            let _ = tx.send(Line { at_ns: monotonic_ns(), text });
        }
    });
    rx
}

/// The first line containing `needle`, or an error after `timeout` (or at EOF).
pub fn wait_for_line(rx: &Receiver<Line>, needle: &str, timeout: Duration, what: &str) -> Result<Line> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.text.contains(needle) => return Ok(line),
            Ok(line) => seen.push(line.text),
            Err(_) => bail!("{what}: no {needle:?} within {timeout:?}; output: {:?}", seen.join(" | ")),
        }
    }
}

/// Runs a command to completion within `timeout`; returns its stdout, or an error carrying
/// its stderr.
pub fn output_within(name: &str, cmd: &mut Command, timeout: Duration) -> Result<String> {
    let mut proc = Proc::spawn(name, cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))?;
    let out = read_all(proc.take_stdout());
    let err = read_all(proc.take_stderr());
    let exit = proc.wait(timeout)?;
    let stdout = out.recv_timeout(Duration::from_secs(5)).map_err(|_| anyhow!("{name}: stdout not closed"))?;
    if !exit.success {
        let stderr = err.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
        bail!("{name} failed: {}", stderr.trim());
    }
    Ok(stdout)
}

fn read_all(mut r: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    rx
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A port nobody listens on right now.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// On-CPU nanoseconds of every live thread of `pid` (schedstat: ns resolution, where
/// /proc/PID/stat counts 10 ms ticks).
pub fn cpu_ns(pid: u32) -> Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("schedstat")).unwrap_or_default();
        total += stat.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    }
    Ok(total)
}

/// Resident set size in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for PID {pid}"))
}
