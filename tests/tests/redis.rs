//! A real Debian redis-server, traced with the real programs.
use std::{thread, time::Duration};

use tests::{Redis, Tracer, assert_stack_order, redis_purge, stalls, summary};

#[test]
fn debug_sleep_is_one_off_cpu_stall_on_the_main_thread() {
    let redis = Redis::start(&[], &[]).unwrap();
    let tracer = Tracer::start(redis.proc.pid(), &["-t", "50ms"]).unwrap();
    redis.cmd(&["DEBUG", "SLEEP", "0.3"]).unwrap();
    thread::sleep(Duration::from_millis(300));
    let records = tracer.stop().unwrap();
    let found = stalls(&records);
    assert_eq!(found.len(), 1, "{records:#?}");
    let stall = found[0];
    let ms = stall["duration_ns"].as_u64().unwrap() as f64 / 1e6;
    assert!((295.0..400.0).contains(&ms), "{stall}");
    assert_eq!(stall["verdict"], "off_cpu", "{stall}");
    assert_eq!(stall["tid"], redis.proc.pid(), "the main thread runs the loop: {stall}");
    assert_eq!(stall["comm"], "redis-server", "{stall}");
    assert!(stall["off_cpu"]["blocked_ns"].as_u64().unwrap() >= 290_000_000, "{stall}");
    assert_eq!(summary(&records)["lost"], 0);
    eprintln!("DEBUG SLEEP stack: {:#?}", tests::stack(stall));
    assert_stack_order(stall, &["main", "debugCommand"]);
}

/// Redis' own clientsCron shrinks idle query buffers (clientsCronResizeQueryBuffer ->
/// sdsResize -> realloc); when the buffer's pages are resident, jemalloc's huge arena hands
/// them back with madvise on the main thread. Redis runs with its default allocator settings.
///
/// To get a big, resident, mostly empty query buffer: `SET` a 1 GiB value (Redis keeps the
/// filled buffer as the value and gives the client a fresh 1 GiB one), block the client with
/// BLPOP so the next GiB of small PUBLISH commands is read but not run (every page touched),
/// then release it: the backlog runs, the buffer keeps ~1 KB of an unfinished command, and
/// the next cron pass shrinks it.
#[test]
fn idle_query_buffers_shrunk_by_clients_cron_are_an_allocator_purge() {
    let redis = Redis::start(
        &["--hz", "10", "--proto-max-bulk-len", "2gb", "--client-query-buffer-limit", "2gb"],
        &[],
    )
    .unwrap();
    let clients: Vec<_> = (0..2).map(|i| redis_purge::fill_client(&redis, i).unwrap()).collect();
    let tracer = Tracer::start(redis.proc.pid(), &["-t", "15ms"]).unwrap();
    // Kept open until the tracer stops: a closed connection is freed outside clientsCron.
    let _open = redis_purge::release(&redis, clients).unwrap();
    thread::sleep(Duration::from_millis(800));
    let records = tracer.stop().unwrap();
    eprintln!("{}", records.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n"));
    let _ = redis.cmd(&["FLUSHALL", "ASYNC"]);
    let purges: Vec<_> = stalls(&records).into_iter().filter(|s| s["verdict"] == "allocator_purge").collect();
    assert!(!purges.is_empty(), "{records:#?}");
    let stall = purges[0];
    assert_eq!(stall["tid"], redis.proc.pid(), "{stall}");
    // One query buffer of 1 GiB is handed back (the first pages stay: the shrunk buffer).
    assert!(stall["madvise"]["bytes"].as_u64().unwrap() >= 1000 << 20, "{stall}");
    assert!(stall["shares"]["allocator_purge"].as_f64().unwrap() >= 50.0, "{stall}");
    assert_eq!(summary(&records)["lost"], 0);
    eprintln!("purge stack: {:#?}", tests::stack(stall));
    // Debian's redis-server has no frame pointers: these frames come from .eh_frame.
    assert_stack_order(
        stall,
        &["serverCron", "clientsCron", "clientsCronResizeQueryBuffer", "sdsResize|sdsRemoveFreeSpace", "zrealloc"],
    );
}


/// An idle Redis sleeps out its 100 ms cron timeout in epoll_wait: never a stall, from the
/// first wait after attach on, whatever groups run (before epoll_enter was attached last and
/// `loop` alone took in sched_switch, the first waits or every wait came out as app_code).
#[test]
fn an_idle_loops_epoll_timeouts_are_not_stalls() {
    let redis = Redis::start(&["--hz", "10"], &[]).unwrap();
    for probes in ["loop", "default"] {
        let tracer = Tracer::start(redis.proc.pid(), &["-t", "50ms", "--probes", probes]).unwrap();
        thread::sleep(Duration::from_millis(1000));
        let records = tracer.stop().unwrap();
        assert!(stalls(&records).is_empty(), "--probes {probes}: {records:#?}");
        let summary = summary(&records);
        assert_eq!(summary["lost"], 0);
        // Each wait the kernel showed leaving but not coming back is counted, not a stall.
        assert!(summary["late_begins"].as_u64().is_some_and(|n| n <= 2), "{summary}");
    }
}

#[test]
fn a_frozen_redis_is_announced_while_frozen_with_where_it_is_stuck() {
    let redis = Redis::start(&[], &[]).unwrap();
    let mut tracer = Tracer::start(redis.proc.pid(), &["-t", "50ms"]).unwrap();
    let port = redis.port;
    let freeze = thread::spawn(move || {
        let r = Redis::cmd_on(port, &["DEBUG", "SLEEP", "1.5"]);
        (r, std::time::Instant::now())
    });
    let notice = tracer.wait_for(|r| r["type"] == "stall_ongoing", Duration::from_secs(5)).unwrap();
    let noticed_at = std::time::Instant::now();
    let (reply, thawed_at) = freeze.join().unwrap();
    reply.unwrap();
    assert!(noticed_at < thawed_at, "announced only after Redis answered again: {notice}");
    // No frame pointers in Debian's build: these frames come from .eh_frame unwinding.
    let frames: Vec<&str> = notice["stack"].as_array().unwrap().iter().filter_map(|f| f.as_str()).collect();
    assert!(frames.contains(&"debugCommand"), "{notice}");
    thread::sleep(Duration::from_millis(700));
    let records = tracer.stop().unwrap();
    let found = stalls(&records);
    assert_eq!(found.len(), 1, "{records:#?}");
    assert_eq!(found[0]["start_ns"], notice["start_ns"], "{records:#?}");
}
