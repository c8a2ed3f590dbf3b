//! Helpers for the integration tests: start workloads (and stop them by PID), run stalltrace
//! against them, and read its JSON lines. Every wait here has a deadline.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;

pub const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";

pub fn stalltrace_bin() -> PathBuf {
    std::env::var_os("STALLTRACE_BIN").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/stalltrace")
    })
}

/// A child process that is killed (by PID) and reaped when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The demo's event-loop server, optionally on jemalloc with immediate purging.
pub struct LoopServer {
    pub proc: Proc,
    pub port: u16,
}

impl LoopServer {
    pub fn start(jemalloc: bool) -> Result<Self> {
        let mut cmd = Command::new(stalltrace_bin());
        cmd.args(["demo-server", "--port", "0"]).stdout(Stdio::piped());
        if jemalloc {
            cmd.env("LD_PRELOAD", JEMALLOC).env("MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0");
        }
        let mut child = cmd.spawn().context("starting demo-server")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let proc = Proc { child };
        let line = read_line_within(stdout, Duration::from_secs(10))?;
        let port = line.trim().parse().with_context(|| format!("demo-server printed {line:?}"))?;
        Ok(Self { proc, port })
    }

    pub fn client(&self) -> Result<LineClient> {
        LineClient::connect(self.port)
    }
}

/// Line protocol client for the loop server: each command answers `OK <ns>`.
pub struct LineClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl LineClient {
    pub fn connect(port: u16) -> Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        Ok(Self { reader: BufReader::new(stream.try_clone()?), writer: stream })
    }

    /// Sends a command and returns the nanoseconds the server says it took.
    pub fn call(&mut self, cmd: &str) -> Result<u64> {
        writeln!(self.writer, "{cmd}")?;
        let mut reply = String::new();
        self.reader.read_line(&mut reply)?;
        reply
            .trim()
            .strip_prefix("OK ")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow!("{cmd}: server replied {reply:?}"))
    }
}

/// A running `stalltrace -p PID --json`, attached and ready when `start` returns.
pub struct Tracer {
    proc: Proc,
    stdout_rx: mpsc::Receiver<String>,
}

impl Tracer {
    pub fn start(pid: u32, extra: &[&str]) -> Result<Self> {
        let mut child = Command::new(stalltrace_bin())
            .args(["-p", &pid.to_string(), "--json", "-d", "60s"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting stalltrace")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let proc = Proc { child };
        let (tx, stdout_rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // stalltrace says "tracing PID ..." on stderr once every probe is attached.
        let banner = read_line_within(stderr, Duration::from_secs(30))?;
        if !banner.contains("tracing PID") {
            bail!("stalltrace did not attach: {banner}");
        }
        Ok(Self { proc, stdout_rx })
    }

    /// SIGINT (as Ctrl-C would), then every JSON record it printed, summary last.
    pub fn stop(mut self) -> Result<Vec<Value>> {
        unsafe { libc::kill(self.proc.pid() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.proc.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("stalltrace did not exit within 20s of SIGINT");
            }
            thread::sleep(Duration::from_millis(20));
        }
        let status = self.proc.child.wait()?;
        if !status.success() {
            bail!("stalltrace exited with {status}");
        }
        let mut records = Vec::new();
        while let Ok(line) = self.stdout_rx.recv_timeout(Duration::from_secs(2)) {
            records.push(serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?);
        }
        Ok(records)
    }
}

pub fn stalls(records: &[Value]) -> Vec<&Value> {
    records.iter().filter(|r| r["type"] == "stall").collect()
}

pub fn summary(records: &[Value]) -> &Value {
    records.iter().rfind(|r| r["type"] == "summary").expect("a summary record")
}

/// Reads one line from `r` or fails after `timeout` (a hung child must not hang the test).
fn read_line_within(r: impl std::io::Read + Send + 'static, timeout: Duration) -> Result<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(r);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        // Keep draining so the child never blocks on a full pipe.
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink);
    });
    rx.recv_timeout(timeout).map_err(|_| anyhow!("no output within {timeout:?}"))
}

/// A port nobody listens on right now, for servers that need one given.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// Runs stalltrace to completion with `args`; returns (exit success, stderr).
pub fn run_stalltrace(args: &[&str], uid: Option<u32>) -> Result<(bool, String)> {
    let mut cmd = Command::new(stalltrace_bin());
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    if let Some(uid) = uid {
        std::os::unix::process::CommandExt::uid(&mut cmd, uid);
    }
    let child = cmd.spawn()?;
    let proc = Proc { child };
    let out = wait_output(proc, Duration::from_secs(30))?;
    Ok(out)
}

fn wait_output(mut proc: Proc, timeout: Duration) -> Result<(bool, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = proc.child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = proc.child.stderr.take() {
                e.read_to_string(&mut err)?;
            }
            return Ok((status.success(), err));
        }
        if Instant::now() > deadline {
            bail!("stalltrace still running after {timeout:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A real redis-server on loopback, with persistence off, stopped by PID when dropped.
pub struct Redis {
    pub proc: Proc,
    pub port: u16,
}

impl Redis {
    /// Starts `redis-server` with `extra` config arguments (`--name value` pairs) and `env`.
    pub fn start(extra: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--enable-debug-command", "yes", "--logfile", ""])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server (cargo xtask setup installs it)")?;
        let redis = Self { proc: Proc { child }, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.cmd(&["PING"]).is_err() {
            if Instant::now() > deadline {
                bail!("redis-server did not answer PING within 10s");
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(redis)
    }

    /// Sends one command on a new connection and returns the raw reply.
    pub fn cmd(&self, args: &[&str]) -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(&resp(args))?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf)?;
        let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
        if reply.starts_with('-') {
            bail!("redis: {}", reply.trim());
        }
        Ok(reply)
    }
}

/// A command in RESP, the Redis wire format.
pub fn resp(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}
