//! A real redis-server on CPU 0 and redis-benchmark on CPU 1, so the server's single loop has
//! a core to itself and the client never competes with it.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::procs::{self, Proc};

pub const SERVER_CPU: &str = "0";
pub const CLIENT_CPU: &str = "1";
const CLIENTS: &str = "50";

pub struct Redis {
    proc: Proc,
    pub port: u16,
}

impl Redis {
    /// Starts an empty server without persistence, pinned, and waits until it answers.
    pub fn start() -> Result<Self> {
        let port = procs::free_port()?;
        let proc = Proc::spawn(
            "redis-server",
            Command::new("taskset")
                .args(["-c", SERVER_CPU, "redis-server"])
                .args(Self::args(port))
                .args(["--daemonize", "no", "--logfile", ""])
                .stdout(Stdio::null()),
        )?;
        let redis = Self { proc, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.command(&["PING"]).is_err() {
            if Instant::now() > deadline {
                bail!("redis-server did not answer PING within 10s");
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(redis)
    }

    fn args(port: u16) -> Vec<String> {
        ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            .map(String::from)
            .to_vec()
    }

    /// The command line, as BENCHMARKS.md shows it.
    pub fn command_line() -> String {
        format!("taskset -c {SERVER_CPU} redis-server --port P --bind 127.0.0.1 --save '' --appendonly no")
    }

    /// taskset execs redis-server, so this is the server's own PID.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// One command on a fresh connection; the raw reply.
    pub fn command(&self, args: &[&str]) -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req += &format!("${}\r\n{a}\r\n", a.len());
        }
        s.write_all(req.as_bytes())?;
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf)?;
        let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
        if reply.starts_with('-') {
            bail!("redis: {}", reply.trim());
        }
        Ok(reply)
    }

    /// Empties the server, so that every run starts from the same (empty) data set and the
    /// lists do not grow from run to run.
    pub fn flush(&self) -> Result<()> {
        self.command(&["FLUSHALL"]).map(drop)
    }
}

/// One redis-benchmark invocation shape: which tests, and how many requests per round trip.
#[derive(Clone, Copy)]
pub struct Workload {
    pub tests: &'static str,
    pub pipeline: u32,
}

pub const WORKLOADS: [Workload; 4] = [
    Workload { tests: "set,get", pipeline: 1 },
    Workload { tests: "set,get", pipeline: 16 },
    Workload { tests: "lpush,rpush", pipeline: 1 },
    Workload { tests: "lpush,rpush", pipeline: 16 },
];

impl Workload {
    pub fn label(&self) -> String {
        format!("{} -P {}", self.tests, self.pipeline)
    }

    fn test_count(&self) -> u64 {
        self.tests.split(',').count() as u64
    }

    fn args(&self, port: &str, n: u64) -> Vec<String> {
        let (n, p) = (n.to_string(), self.pipeline.to_string());
        ["-p", port, "-c", CLIENTS, "-n", &n, "-t", self.tests, "-P", &p, "--csv", "-q"].map(String::from).to_vec()
    }

    /// The command line, as BENCHMARKS.md shows it.
    pub fn command_line(&self, n: u64) -> String {
        format!("taskset -c {CLIENT_CPU} redis-benchmark {}", self.args("P", n).join(" "))
    }
}

/// What one invocation measured: requests/s per test ("SET", "GET", ...).
pub struct BenchRun {
    pub rps: Vec<(String, f64)>,
    pub wall_secs: f64,
    /// Requests over all tests.
    pub requests: u64,
}

pub fn run_benchmark(port: u16, w: &Workload, n: u64) -> Result<BenchRun> {
    let t = Instant::now();
    let out = procs::output_within(
        "redis-benchmark",
        Command::new("taskset").args(["-c", CLIENT_CPU, "redis-benchmark"]).args(w.args(&port.to_string(), n)),
        Duration::from_secs(120),
    )?;
    let rps = parse_csv(&out);
    if rps.len() as u64 != w.test_count() {
        bail!("redis-benchmark {}: expected {} results, got: {out}", w.label(), w.test_count());
    }
    Ok(BenchRun { rps, wall_secs: t.elapsed().as_secs_f64(), requests: n * w.test_count() })
}

/// `"SET","142857.14",...` lines (after the header) to (test, requests/s).
fn parse_csv(out: &str) -> Vec<(String, f64)> {
    out.lines()
        .filter_map(|l| {
            let mut cells = l.split(',').map(|c| c.trim_matches('"'));
            let (test, rps) = (cells.next()?, cells.next()?.parse().ok()?);
            Some((test.to_string(), rps))
        })
        .collect()
}

/// Requests per test so that one untraced invocation of each workload takes about `secs`:
/// one short run each measures the rate (and warms the server up).
pub fn calibrate(redis: &Redis, secs: f64) -> Result<Vec<u64>> {
    WORKLOADS
        .iter()
        .map(|w| {
            redis.flush()?;
            let probe = run_benchmark(redis.port, w, 50_000 * w.pipeline as u64)?;
            let secs_per_request: f64 = probe.rps.iter().map(|(_, r)| 1.0 / r).sum();
            let n = (secs / secs_per_request / 10_000.0).round().max(1.0) as u64 * 10_000;
            Ok(n)
        })
        .collect::<Result<_>>()
        .context("calibrating redis-benchmark")
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_redis_benchmark_csv() {
        let out = "\"test\",\"rps\",\"avg_latency_ms\"\n\"SET\",\"142857.14\",\"0.206\"\n\"GET\",\"118063.76\",\"0.2\"\n";
        let rps = super::parse_csv(out);
        assert_eq!(rps, vec![("SET".to_string(), 142857.14), ("GET".to_string(), 118063.76)]);
    }
}
