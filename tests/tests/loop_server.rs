//! The demo's epoll server as a workload with known ground truth: each command says how long
//! it took, and the stall record must agree.
use std::{
    io::Write as _,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use serde_json::Value;
use tests::{LoopServer, Proc, Tracer, stalls, summary};

fn only_stall<'a>(records: &'a [Value], verdict: &str) -> &'a Value {
    let found: Vec<_> = stalls(records).into_iter().filter(|s| s["verdict"] == verdict).collect();
    assert_eq!(found.len(), 1, "want one {verdict} stall, got {records:#?}");
    found[0]
}

fn ms(v: &Value) -> f64 {
    v.as_u64().expect("integer ns") as f64 / 1e6
}

/// `syscall_probes`: libc (uprobes on the wrappers, an error where there are none) or
/// tracepoints (the fallback for targets without them).
fn jemalloc_shrink_is_an_allocator_purge_with_the_workloads_madvise_time(syscall_probes: &str) {
    let server = LoopServer::start(true).unwrap();
    let mut client = server.client().unwrap();
    // Filling is its own (app_code) stall; the shrink comes in a later iteration.
    client.call("FILL 512").unwrap();
    let tracer = Tracer::start(server.proc.pid(), &["--syscall-probes", syscall_probes]).unwrap();
    let shrink_ns = client.call("SHRINK").unwrap();
    thread::sleep(Duration::from_millis(300));
    let records = tracer.stop().unwrap();
    let stall = only_stall(&records, "allocator_purge");
    let madvise_ns = stall["madvise"]["ns"].as_u64().unwrap() as f64;
    let err = (madvise_ns - shrink_ns as f64).abs() / shrink_ns as f64;
    assert!(err <= 0.10, "madvise {madvise_ns}ns vs workload's realloc {shrink_ns}ns: {stall}");
    assert!(stall["madvise"]["bytes"].as_u64().unwrap() >= 500 << 20, "{stall}");
    assert_eq!(stall["tid"], stall["pid"], "the loop is the main thread");
    assert_eq!(summary(&records)["lost"], 0);
}

#[test]
fn jemalloc_shrink_is_an_allocator_purge_through_the_libc_wrappers() {
    jemalloc_shrink_is_an_allocator_purge_with_the_workloads_madvise_time("libc");
}

#[test]
fn jemalloc_shrink_is_an_allocator_purge_through_the_syscall_tracepoints() {
    jemalloc_shrink_is_an_allocator_purge_with_the_workloads_madvise_time("tracepoints");
}

#[test]
fn alloc_calls_times_realloc_in_the_preloaded_jemalloc() {
    let server = LoopServer::start(true).unwrap();
    let mut client = server.client().unwrap();
    client.call("FILL 512").unwrap();
    let tracer = Tracer::start(server.proc.pid(), &["--probes", "all", "--alloc-calls"]).unwrap();
    client.call("SHRINK").unwrap();
    thread::sleep(Duration::from_millis(300));
    let records = tracer.stop().unwrap();
    let stall = only_stall(&records, "allocator_purge");
    assert!(stall["alloc"]["calls"].as_u64().unwrap() >= 1, "{stall}");
    // madvise nested in realloc is counted once, as madvise.
    let total = stall["madvise"]["ns"].as_u64().unwrap() + stall["alloc"]["ns"].as_u64().unwrap();
    assert!(total <= stall["duration_ns"].as_u64().unwrap(), "{stall}");
}

/// CHURN mallocs and frees small blocks for 600 ms: no syscall, no probe on the allocator,
/// only the sampler's stacks can tell its time from the loop's own. Long enough for several
/// unmeasured samples: jemalloc at decay 0 madvises thousands of times in it, and where the
/// madvise probe is stepped (~13 us a call here) those calls, measured and so left out of
/// the split, took up to 80% of a 300 ms churn.
fn churn_is_sampled_into_the_allocator(jemalloc: bool) {
    let server = LoopServer::start(jemalloc).unwrap();
    let mut client = server.client().unwrap();
    let tracer = Tracer::start(server.proc.pid(), &[]).unwrap();
    client.call("CHURN 600").unwrap();
    client.call("SPIN 100").unwrap();
    thread::sleep(Duration::from_millis(200));
    let records = tracer.stop().unwrap();
    let found = stalls(&records);
    assert_eq!(found.len(), 2, "{records:#?}");
    let (churn, spin) = (found[0], found[1]);
    // Other tests share the CPUs: part of either stall may be runnable (off_cpu).
    assert!(["allocator_purge", "off_cpu"].contains(&churn["verdict"].as_str().unwrap()), "{churn}");
    let alloc = &churn["alloc"];
    let (samples, inside) = (alloc["samples"].as_u64().unwrap(), alloc["samples_in_allocator"].as_u64().unwrap());
    assert!(samples >= 5 && inside * 2 >= samples, "most samples in malloc/free: {churn}");
    assert_eq!(alloc["calls"], 0, "no uprobe timed a call: {churn}");
    // jemalloc purging at once (decay 0) adds madvise calls: measured, so not the samples'.
    assert!(alloc["ns"].as_u64().unwrap() > churn["app_code_ns"].as_u64().unwrap(), "{churn}");
    assert!(spin["alloc"]["samples"].as_u64().unwrap() >= 1, "{spin}");
    assert_eq!(spin["alloc"]["samples_in_allocator"], 0, "{spin}");
    assert_eq!(spin["alloc"]["ns"], 0, "{spin}");
}

#[test]
fn jemalloc_churn_is_sampled_into_the_allocator() {
    churn_is_sampled_into_the_allocator(true);
}

#[test]
fn glibc_churn_is_sampled_into_the_allocator() {
    churn_is_sampled_into_the_allocator(false);
}

/// jemalloc reaches libc's madvise through its PLT, a `call` x86's uprobes emulate: once that
/// site is learned and probed, the stepped probe on madvise's entry (two traps a call) is
/// detached, and the calls are still timed.
#[test]
fn purge_call_sites_are_learned_and_the_stepped_probe_retired() {
    let server = LoopServer::start(true).unwrap();
    let mut client = server.client().unwrap();
    let tracer = Tracer::start(server.proc.pid(), &[]).unwrap();
    client.call("CHURN 200").unwrap();
    // Retired after a second in which no call needed it.
    thread::sleep(Duration::from_millis(2000));
    client.call("CHURN 200").unwrap();
    thread::sleep(Duration::from_millis(200));
    let records = tracer.stop().unwrap();
    let sites = &summary(&records)["purge_sites"];
    assert!(sites["probed"].as_u64().unwrap() >= 1, "{sites}");
    assert!(!sites["stepped"].as_array().unwrap().iter().any(|w| w == "madvise"), "{sites}");
    let last = *stalls(&records).last().expect("the churns stall");
    let madvise = &last["madvise"];
    assert!(madvise["calls"].as_u64().unwrap() >= 100 && madvise["ns"].as_u64().unwrap() > 0, "{last}");
}

/// Runs `hotloop ARGS` under stalltrace's defaults, started once the tracer is live, and
/// returns the session's records after `wait`.
fn traced_hotloop(args: &[&str], wait: Duration) -> Vec<Value> {
    let child = Command::new(env!("CARGO_BIN_EXE_hotloop")).args(args).stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let mut hot = Proc { child };
    let tracer = Tracer::start(hot.pid(), &[]).unwrap();
    writeln!(hot.child.stdin.as_mut().unwrap(), "go").unwrap();
    thread::sleep(wait);
    tracer.stop().unwrap()
}

/// rustc calls libc through the GOT (`call *madvise@GOTPCREL(%rip)`), which x86's uprobes
/// step out of line wherever it is probed: such a site is refused, and the stepped probe on
/// madvise stays to time its calls.
#[test]
fn a_call_through_the_got_keeps_the_stepped_probe() {
    // Its loop runs 1.7 s, then it exits, which ends the session.
    let records = traced_hotloop(&["madvise", "4", "1.5"], Duration::from_millis(2500));
    let sites = &summary(&records)["purge_sites"];
    assert!(sites["refused"].as_u64().unwrap() >= 1, "{sites}");
    assert_eq!(sites["probed"], 0, "{sites}");
    assert!(sites["stepped"].as_array().unwrap().iter().any(|w| w == "madvise"), "{sites}");
}

/// Loop threads whose first waits race on every CPU each claim a histogram slot of their own
/// (the kernel claims one with an atomic insert, as BPF has no fetch-and-add Rust emits).
#[test]
fn loop_threads_starting_at_once_get_a_histogram_each() {
    const THREADS: usize = 6;
    // Its loops run 0.5 s, then it exits, which ends the session.
    let records = traced_hotloop(&["epoll", "0", "0.3", &THREADS.to_string()], Duration::from_millis(1500));
    let s = summary(&records);
    let threads = s["threads"].as_array().unwrap();
    let tids: std::collections::BTreeSet<u64> = threads.iter().map(|t| t["tid"].as_u64().unwrap()).collect();
    assert_eq!((threads.len(), tids.len()), (THREADS, THREADS), "{s}");
    assert!(threads.iter().all(|t| t["iterations"].as_u64().unwrap() > 1000), "{s}");
    assert_eq!(s["threads_without_histogram"], 0, "{s}");
}

#[test]
fn glibc_shrink_purges_through_mremap_or_munmap() {
    let server = LoopServer::start(false).unwrap();
    let mut client = server.client().unwrap();
    client.call("FILL 512").unwrap();
    let tracer = Tracer::start(server.proc.pid(), &[]).unwrap();
    client.call("SHRINK").unwrap();
    thread::sleep(Duration::from_millis(300));
    let records = tracer.stop().unwrap();
    let stall = only_stall(&records, "allocator_purge");
    // glibc serves 512 MiB with mmap and shrinks it in place with mremap (or frees it).
    let released = stall["munmap"]["bytes"].as_u64().unwrap() + stall["mremap"]["bytes"].as_u64().unwrap();
    assert!(released >= 500 << 20, "{stall}");
}

#[test]
fn spinning_is_app_code() {
    let server = LoopServer::start(false).unwrap();
    let mut client = server.client().unwrap();
    let tracer = Tracer::start(server.proc.pid(), &[]).unwrap();
    client.call("SPIN 200").unwrap();
    thread::sleep(Duration::from_millis(200));
    let records = tracer.stop().unwrap();
    let stall = only_stall(&records, "app_code");
    assert!((195.0..400.0).contains(&ms(&stall["duration_ns"])), "{stall}");
    // On a busy machine part of the spin waits for a CPU (runnable), but it never blocks.
    let (app, runnable) = (stall["shares"]["app_code"].as_f64().unwrap(), stall["shares"]["off_cpu"].as_f64().unwrap());
    assert!(app + runnable >= 95.0, "{stall}");
    assert!(ms(&stall["off_cpu"]["blocked_ns"]) < 5.0, "{stall}");
    assert_eq!(stalls(&records).len(), 1, "{records:#?}");
}

#[test]
fn sleeping_is_off_cpu_blocked() {
    let server = LoopServer::start(false).unwrap();
    let mut client = server.client().unwrap();
    // The syscalls group (off by default) names the syscall the thread slept in.
    let tracer = Tracer::start(server.proc.pid(), &["--probes", "default,syscalls"]).unwrap();
    client.call("SLEEP 200").unwrap();
    thread::sleep(Duration::from_millis(200));
    let records = tracer.stop().unwrap();
    let stall = only_stall(&records, "off_cpu");
    assert!(ms(&stall["off_cpu"]["blocked_ns"]) >= 195.0, "{stall}");
    // The syscall it slept in is named, whichever sleep call this libc uses.
    assert!(stall["syscalls"]["top"].as_str().unwrap().contains("nanosleep"), "{stall}");
    assert_eq!(stalls(&records).len(), 1, "{records:#?}");
}

#[test]
fn on_cpu_syscall_time_is_sampled_and_named() {
    let server = LoopServer::start(false).unwrap();
    let mut client = server.client().unwrap();
    let tracer = Tracer::start(server.proc.pid(), &["--probes", "default,syscalls"]).unwrap();
    client.call("ZERO 200").unwrap();
    thread::sleep(Duration::from_millis(200));
    let records = tracer.stop().unwrap();
    let stall = only_stall(&records, "syscall");
    // 10 ms samples of 200 ms mostly in read(2): the user-space share of the loop is small,
    // and a busy machine may take a few ticks away as runnable time.
    let sys = ms(&stall["syscalls"]["ns"]);
    assert!((140.0..=230.0).contains(&sys), "{stall}");
    assert!(stall["syscalls"]["samples"].as_u64().unwrap() >= 14, "{stall}");
    assert_eq!(stall["syscalls"]["top"].as_str(), Some("read"), "{stall}");
    assert_eq!(stalls(&records).len(), 1, "{records:#?}");
}

#[test]
fn an_idle_loop_reports_no_stalls_but_counts_its_iterations() {
    let server = LoopServer::start(false).unwrap();
    let mut client = server.client().unwrap();
    let tracer = Tracer::start(server.proc.pid(), &[]).unwrap();
    for _ in 0..20 {
        client.call("PING").unwrap();
        thread::sleep(Duration::from_millis(50));
    }
    let records = tracer.stop().unwrap();
    assert!(stalls(&records).is_empty(), "{records:#?}");
    let s = summary(&records);
    assert!(s["iterations"].as_u64().unwrap() >= 20, "{s}");
    assert_eq!(s["threads"][0]["tid"], server.proc.pid(), "{s}");
}

#[test]
fn a_stall_is_announced_while_it_lasts() {
    let server = LoopServer::start(false).unwrap();
    let mut client = server.client().unwrap();
    let mut tracer = Tracer::start(server.proc.pid(), &["-t", "50ms"]).unwrap();
    client.call("PING").unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let sleeper = thread::spawn(move || {
        let r = client.call("SLEEP 1500");
        done_tx.send(()).unwrap();
        r
    });
    let notice = tracer.wait_for(|r| r["type"] == "stall_ongoing", Duration::from_secs(5)).unwrap();
    assert!(done_rx.try_recv().is_err(), "announced only once the stall had ended: {notice}");
    sleeper.join().unwrap().unwrap();
    thread::sleep(Duration::from_millis(700));
    let records = tracer.stop().unwrap();
    // Seen at the watch's next look (every 100 ms) after the iteration passed 50 ms.
    assert!((50.0..1000.0).contains(&ms(&notice["elapsed_ns"])), "{notice}");
    assert_eq!(notice["tid"], server.proc.pid(), "{notice}");
    assert_eq!(notice["comm"], "demo-loop", "{notice}");
    // Where it is stuck, while it is: the sleep, read from /proc as the thread sleeps.
    let frames: Vec<&str> = notice["stack"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(frames.iter().any(|f| f.contains("sleep")), "{notice}");
    let stall = only_stall(&records, "off_cpu");
    assert_eq!(stall["start_ns"], notice["start_ns"], "the notice names the stall that followed: {records:#?}");
    assert!(ms(&stall["duration_ns"]) >= 1500.0, "{stall}");
    let notices = records.iter().filter(|r| r["type"] == "stall_ongoing").count();
    assert_eq!(notices, 1, "one notice a stall: {records:#?}");
}
