//! The daemon: follows a process by name across restarts, journals every record with
//! rotation, serves metrics a real Prometheus scrapes, and leaves nothing loaded on SIGTERM.
use std::{
    collections::BTreeSet,
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{LoopServer, Proc, free_port, stalltrace_bin};

struct Daemon {
    proc: Proc,
    dir: PathBuf,
    metrics: u16,
}

impl Daemon {
    /// A daemon watching processes named `comm`, its files in a fresh temp dir.
    fn start(comm: &str, threshold: &str, max_bytes: u64) -> Daemon {
        let dir = std::env::temp_dir().join(format!("stalltrace-daemon-{}-{comm}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let metrics = free_port();
        let config = format!(
            "[[target]]\ncomm = \"{comm}\"\nthreshold = \"{threshold}\"\n[journal]\npath = \"{}\"\nmax_bytes = {max_bytes}\nkeep = 10000\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n",
            dir.join("journal/stalls.jsonl").display()
        );
        fs::write(dir.join("stalltrace.toml"), config).unwrap();
        let child = Command::new(stalltrace_bin())
            .args(["daemon", "--config"])
            .arg(dir.join("stalltrace.toml"))
            .stderr(fs::File::create(dir.join("daemon.log")).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon { proc: Proc { child }, dir, metrics };
        d.wait_log("watching", Duration::from_secs(20));
        d
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} in the daemon's log:\n{}", self.log());
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, and the exit status.
    fn stop(mut self) -> (bool, Daemon) {
        unsafe { libc::kill(self.proc.pid() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.proc.child.try_wait().unwrap() {
                return (status.success(), self);
            }
            assert!(Instant::now() < deadline, "the daemon ignored SIGTERM");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every record in every journal file.
    fn records(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.dir.join("journal")).unwrap() {
            let text = fs::read_to_string(e.unwrap().path()).unwrap();
            out.extend(text.lines().map(|l| serde_json::from_str::<Value>(l).expect("a JSON record")));
        }
        out
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// IDs of every loaded BPF program that has the name of one of ours, from bpftool (this
/// bpftool cannot tell which process holds a program, so the test diffs before and after).
fn our_programs() -> BTreeSet<u64> {
    const OURS: &[&str] = &["epoll_enter", "epoll_exit", "thread_exit", "sched_switch", "conn_enter", "conn_exit", "purge_exit"];
    let out = Command::new("bpftool").args(["prog", "show", "--json"]).output().expect("bpftool");
    let progs: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"].as_str().is_some_and(|n| OURS.contains(&n)))
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// A daemon (threshold 50 ms) watching a demo server of its own name, once it has attached.
fn daemon_attached_to_a_server(prefix: &str) -> (Daemon, LoopServer) {
    let name = format!("{prefix}-{}", std::process::id() % 100_000);
    let daemon = Daemon::start(&name, "50ms", 1 << 20);
    let server = LoopServer::start_named(&name).unwrap();
    daemon.wait_log(&format!("attached to PID {}", server.proc.pid()), Duration::from_secs(10));
    (daemon, server)
}

fn stall_once(server: &LoopServer) {
    server.client().unwrap().call("SLEEP 100").unwrap();
}

#[test]
fn follows_a_process_across_restarts_and_leaves_nothing_loaded() {
    let name = format!("dtest-{}", std::process::id() % 100_000);
    let before = our_programs();
    let daemon = Daemon::start(&name, "50ms", 1 << 20);
    let first = LoopServer::start_named(&name).unwrap();
    daemon.wait_log(&format!("attached to PID {}", first.proc.pid()), Duration::from_secs(10));
    stall_once(&first);
    let programs: BTreeSet<u64> = our_programs().difference(&before).copied().collect();
    assert!(!programs.is_empty(), "the daemon loaded no BPF programs");
    let first_pid = first.proc.pid();
    drop(first);
    daemon.wait_log(&format!("detached from PID {first_pid}"), Duration::from_secs(10));
    let second = LoopServer::start_named(&name).unwrap();
    daemon.wait_log(&format!("attached to PID {}", second.proc.pid()), Duration::from_secs(10));
    stall_once(&second);
    thread::sleep(Duration::from_millis(1500));
    let (ok, daemon) = daemon.stop();
    assert!(ok, "the daemon did not exit cleanly:\n{}", daemon.log());
    let pids: Vec<u64> = daemon.records().iter().filter(|r| r["type"] == "stall").filter_map(|r| r["pid"].as_u64()).collect();
    assert!(pids.contains(&u64::from(first_pid)), "no stall from the first life: {pids:?}");
    assert!(pids.contains(&u64::from(second.proc.pid())), "no stall from the second life: {pids:?}");
    let left: Vec<_> = programs.intersection(&our_programs()).copied().collect();
    assert!(left.is_empty(), "programs {left:?} still loaded after SIGTERM");
    for e in fs::read_dir(daemon.dir.join("journal")).unwrap() {
        let mode = fs::metadata(e.unwrap().path()).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o640);
    }
}

#[test]
fn rotation_under_a_burst_keeps_every_record() {
    let name = format!("drot-{}", std::process::id() % 100_000);
    let daemon = Daemon::start(&name, "1ms", 16 * 1024);
    let server = LoopServer::start_named(&name).unwrap();
    daemon.wait_log(&format!("attached to PID {}", server.proc.pid()), Duration::from_secs(10));
    let mut client = server.client().unwrap();
    for _ in 0..300 {
        client.call("SPIN 3").unwrap();
    }
    thread::sleep(Duration::from_millis(1500));
    let (ok, daemon) = daemon.stop();
    assert!(ok, "{}", daemon.log());
    let records = daemon.records();
    let files = fs::read_dir(daemon.dir.join("journal")).unwrap().count();
    // A spin is at least 3 ms long, whatever a busy machine makes of its verdict.
    let spins = records.iter().filter(|r| r["type"] == "stall" && r["duration_ns"].as_u64() >= Some(3_000_000)).count();
    let logged = daemon.log();
    let written: usize = logged
        .split("stopped: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the daemon's closing line");
    eprintln!("{} records in {files} journal files; the daemon wrote {written}; {spins} spin stalls", records.len());
    assert!(files > 10, "the burst should have rotated the journal");
    assert_eq!(records.len(), written, "records lost in rotation");
    // An iteration whose wake-up sched_switch never showed is not timed, only counted.
    let late: usize = logged
        .split(&format!("detached from PID {}: ", server.proc.pid()))
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the daemon's late begins for the server");
    assert!(spins + late >= 300, "300 spins, {spins} stall records, {late} late begins");
}

/// Minimal HTTP GET on loopback, returning the body.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

#[test]
fn a_real_prometheus_scrapes_the_stall_counter() {
    let (daemon, server) = daemon_attached_to_a_server("dprom");
    stall_once(&server);
    let web = free_port();
    let prom_dir: &Path = &daemon.dir.join("prometheus");
    fs::create_dir_all(prom_dir).unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: stalltrace\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
        daemon.metrics
    );
    fs::write(prom_dir.join("prometheus.yml"), config).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", prom_dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", prom_dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (cargo xtask setup installs it)");
    let _prometheus = Proc { child };
    let deadline = Instant::now() + Duration::from_secs(60);
    let value = loop {
        let body = http_get(web, "/api/v1/query?query=sum(stalltrace_stalls_total)").unwrap_or_default();
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let n = v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse::<f64>().ok());
        if let Some(n) = n.filter(|&n| n > 0.0) {
            break n;
        }
        assert!(Instant::now() < deadline, "Prometheus never saw a stall; last answer: {body}");
        thread::sleep(Duration::from_millis(500));
    };
    eprintln!("Prometheus: sum(stalltrace_stalls_total) = {value}");
    let metrics = http_get(daemon.metrics, "/metrics").unwrap();
    for family in ["stalltrace_iteration_seconds_bucket", "stalltrace_madvise_seconds", "stalltrace_lost_records_total", "stalltrace_cpu_seconds_total", "stalltrace_bpf_run_seconds_total"] {
        assert!(metrics.contains(family), "no {family} in\n{metrics}");
    }
    let (ok, daemon) = daemon.stop();
    assert!(ok, "{}", daemon.log());
}

/// The gauge's value for the target, from the endpoint's text.
fn stalled_for(port: u16) -> Option<f64> {
    let metrics = http_get(port, "/metrics")?;
    let line = metrics.lines().find(|l| l.starts_with("stalltrace_stall_in_progress_seconds{"))?;
    line.rsplit(' ').next()?.parse().ok()
}

#[test]
fn a_stall_shows_on_the_gauge_while_it_lasts() {
    let (daemon, server) = daemon_attached_to_a_server("dgauge");
    let mut client = server.client().unwrap();
    client.call("PING").unwrap();
    let sleeper = thread::spawn(move || client.call("SLEEP 4000"));
    // The daemon publishes every second: within 3 s of a 4 s stall it must show.
    let deadline = Instant::now() + Duration::from_secs(3);
    let during = loop {
        let v = stalled_for(daemon.metrics).unwrap_or(0.0);
        if v > 0.0 || Instant::now() > deadline {
            break v;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert!(!sleeper.is_finished(), "the stall ended before the check");
    assert!((0.05..4.0).contains(&during), "stalltrace_stall_in_progress_seconds {during} during a 4 s stall");
    sleeper.join().unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while stalled_for(daemon.metrics) != Some(0.0) {
        assert!(Instant::now() < deadline, "the gauge stayed up after the stall: {:?}", stalled_for(daemon.metrics));
        thread::sleep(Duration::from_millis(200));
    }
    let (ok, daemon) = daemon.stop();
    assert!(ok, "{}", daemon.log());
}
