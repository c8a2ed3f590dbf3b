//! Pool starvation: four workers that each hold one pool's connection and wait forever for
//! the other's (the hold-and-wait incident), against healthy and idle pools.
use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{Proc, Tracer};

struct PoolServer {
    proc: Proc,
    port: u16,
    /// Where each pool's waiters sleep: its condition variable's address and size.
    pools: [(u64, u64); 2],
}

fn pool_server(mode: &str) -> PoolServer {
    let mut child =
        Command::new(env!("WORKLOAD_POOL_SERVER")).arg(mode).stdout(Stdio::piped()).spawn().expect("pool_server");
    let stdout = child.stdout.take().expect("stdout");
    let proc = Proc { child };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("banner");
    let f: Vec<&str> = line.split_whitespace().collect();
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("an address");
    let size: u64 = f[7].parse().expect("a size");
    PoolServer { proc, port: f[1].parse().expect("a port"), pools: [(hex(f[3]), size), (hex(f[5]), size)] }
}

/// Sends one request byte every `every` for `run_for`, on a thread of its own.
fn client(port: u16, every: Duration, run_for: Duration) -> thread::JoinHandle<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    thread::spawn(move || {
        let end = Instant::now() + run_for;
        while Instant::now() < end {
            if s.write_all(b"r").is_err() {
                return;
            }
            thread::sleep(every.min(end.saturating_duration_since(Instant::now())));
        }
    })
}

fn starvations(records: &[Value]) -> Vec<&Value> {
    records.iter().filter(|r| r["type"] == "starvation").collect()
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn worker_tids(pid: u32) -> Vec<u64> {
    let mut tids: Vec<u64> = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|tid: &u64| {
            fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).is_ok_and(|c| c.starts_with("pool-worker-"))
        })
        .collect();
    tids.sort();
    tids
}

/// Runs `mode` under the tracer with a client sending every `every`, returns the records.
fn trace(mode: &str, every: Duration, run_for: Duration) -> (PoolServer, Vec<Value>, u64) {
    let server = pool_server(mode);
    let tracer = Tracer::start(server.proc.pid(), &[]).unwrap();
    let started = now_ns();
    let load = client(server.port, every, run_for);
    load.join().unwrap();
    let records = tracer.stop().unwrap();
    (server, records, started)
}

#[test]
fn a_hold_and_wait_deadlock_is_flagged_within_5s_with_its_threads_and_wait_addresses() {
    let (server, records, started) = trace("deadlock", Duration::from_millis(20), Duration::from_secs(6));
    let found = starvations(&records);
    let starts: Vec<_> = found.iter().filter(|r| r["state"] == "start").collect();
    assert_eq!(starts.len(), 1, "{records:#?}");
    let rec = starts[0];
    eprintln!("starvation record: {rec}");
    let flagged_at = rec["since_ns"].as_u64().unwrap() + rec["duration_ns"].as_u64().unwrap();
    assert!(flagged_at - started <= 5_000_000_000, "flagged {}ms after the load began", (flagged_at - started) / 1_000_000);
    let group = &rec["groups"][0];
    assert_eq!(group["name"], "pool-worker-*", "{rec}");
    assert_eq!((group["threads"].as_u64(), group["parked"].as_u64()), (Some(4), Some(4)), "{rec}");
    assert_eq!(group["closed_cycle"], true, "{rec}");
    // Every waiter sleeps inside one of the two pools' condition variables, both pools named.
    let mut tids = Vec::new();
    let mut pools_seen = [false; 2];
    for w in group["waits"].as_array().unwrap() {
        let addr = u64::from_str_radix(w["wait"].as_str().unwrap().trim_start_matches("futex:0x"), 16).unwrap();
        let pool = server.pools.iter().position(|&(base, size)| (base..base + size).contains(&addr));
        assert!(pool.is_some(), "{} is in neither pool: {rec}", w["wait"]);
        pools_seen[pool.unwrap()] = true;
        tids.extend(w["tids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()));
        assert!(w["stack"].as_array().unwrap().iter().any(|f| f == "take"), "no pool frame in {w}");
    }
    tids.sort();
    assert_eq!(tids, worker_tids(server.proc.pid()), "{rec}");
    assert_eq!(pools_seen, [true, true], "{rec}");
}

#[test]
fn with_a_borrow_timeout_there_is_no_starvation() {
    let (_server, records, _) = trace("timeout", Duration::from_millis(20), Duration::from_secs(6));
    assert!(starvations(&records).is_empty(), "{records:#?}");
}

#[test]
fn a_healthy_queue_fed_steadily_is_not_starved() {
    let (_server, records, _) = trace("queue", Duration::from_millis(20), Duration::from_secs(5));
    assert!(starvations(&records).is_empty(), "{records:#?}");
}

#[test]
fn an_idle_pool_fed_once_a_minute_is_not_starved() {
    // One request, then nothing: the workers sleep with no wakeups, but no work waits.
    let (_server, records, _) = trace("queue", Duration::from_secs(60), Duration::from_secs(5));
    assert!(starvations(&records).is_empty(), "{records:#?}");
}
