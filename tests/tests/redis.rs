//! A real Debian redis-server, traced with the real programs.
use std::{thread, time::Duration};

use tests::{Redis, Tracer, stalls, summary};

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
}
