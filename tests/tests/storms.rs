//! Connection storms, each in a private network namespace so the kernel's counters are the
//! test's alone: overflows must equal TcpExtListenOverflows exactly.
use std::{io::Write as _, net::TcpStream, thread, time::Duration};

use serde_json::Value;
use tests::{LineClient, LoopServer, Netns, Pool, Redis, Tracer, raise_fd_limit, resp, stalls, summary};

fn storms(records: &[Value]) -> Vec<&Value> {
    records.iter().filter(|r| r["type"] == "storm").collect()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// The listener's reported overflows equal the namespace counter's rise, and a storm that
/// began in the stall is linked to it.
fn assert_storm_caused_by(records: &[Value], stall: &Value, kernel_overflows: u64) {
    let s = summary(records);
    eprintln!(
        "overflows: stalltrace {} (netns counter as stalltrace read it {}), TcpExtListenOverflows delta {kernel_overflows}",
        s["listeners"][0]["overflows"], s["netns_listen_overflows"]
    );
    for st in storms(records) {
        eprintln!("storm: {st}");
    }
    // The listener's drop counter also takes final ACKs dropped on a full queue, which
    // TcpExtListenOverflows counted on some runs and not on others (a fresh clone saw 138
    // drops, 5 of them final ACKs, against 133): the kernel's count lies between the SYN
    // drops and all drops.
    let l = &s["listeners"][0];
    assert!(u(&l["syn_drops"]) <= kernel_overflows && kernel_overflows <= u(&l["overflows"]), "{s}");
    assert_eq!(u(&s["netns_listen_overflows"]), kernel_overflows, "{s}");
    let linked: Vec<_> = storms(records).into_iter().filter(|st| st["cause"] == "stall").collect();
    assert!(!linked.is_empty(), "no storm caused by the stall: {records:#?}");
    assert_eq!(linked[0]["stall"]["start_ns"], stall["start_ns"], "{records:#?}");
    assert!(u(&linked[0]["overflows"]) > 0, "{}", linked[0]);
}

#[test]
fn a_stalled_loop_with_backlog_8_overflows_as_the_kernel_counts_and_causes_a_storm() {
    let ns = Netns::new().unwrap();
    let server = LoopServer::start_in(&ns, 8).unwrap();
    let pool = Pool::start(&ns, server.port, 64, b"PING\n", Duration::from_secs(5));
    Pool::settle(&ns);
    let before = ns.listen_overflows();
    let tracer = Tracer::start(server.proc.pid(), &[]).unwrap();
    let slept = ns.within(|| LineClient::connect(server.port).and_then(|mut c| c.call("SLEEP 500"))).unwrap();
    assert!(slept >= 500_000_000);
    pool.join();
    thread::sleep(Duration::from_millis(300));
    let records = tracer.stop().unwrap();
    let overflows = ns.listen_overflows() - before;
    assert!(overflows > 0, "the stall should have overflowed a backlog of 8");
    let stall = stalls(&records).into_iter().find(|s| s["verdict"] == "off_cpu").expect("the 500 ms stall").clone();
    assert!(u(&stall["net"]["overflows"]) > 0, "{stall}");
    assert_storm_caused_by(&records, &stall, overflows);
}

#[test]
fn an_iteration_spent_accepting_5000_connections_is_a_connection_storm() {
    raise_fd_limit();
    let ns = Netns::new().unwrap();
    ns.run("sysctl", &["-q", "-w", "net.core.somaxconn=8192"]).unwrap();
    let server = LoopServer::start_in(&ns, 8192).unwrap();
    let tracer = Tracer::start(server.proc.pid(), &[]).unwrap();
    let conns = ns.within(|| {
        // While the loop sleeps the handshakes complete in the kernel and wait in the queue;
        // the next iteration accepts them all.
        let mut ctl = LineClient::connect(server.port).unwrap();
        let sleeper = thread::spawn(move || ctl.call("SLEEP 1500"));
        thread::sleep(Duration::from_millis(100));
        let conns: Vec<TcpStream> =
            (0..5000).map(|_| TcpStream::connect(("127.0.0.1", server.port)).expect("connect")).collect();
        sleeper.join().unwrap().unwrap();
        conns
    });
    thread::sleep(Duration::from_millis(500));
    drop(conns);
    thread::sleep(Duration::from_millis(700));
    let records = tracer.stop().unwrap();
    let storm = stalls(&records)
        .into_iter()
        .find(|s| s["verdict"] == "connection_storm")
        .unwrap_or_else(|| panic!("no connection_storm stall: {records:#?}"));
    eprintln!("connection_storm stall: {storm}");
    assert!(u(&storm["connections"]["accepts"]) >= 4000, "{storm}");
    assert!(storm["explained_pct"].as_f64().unwrap() >= 50.0, "{storm}");
    assert_eq!(storm["tid"], server.proc.pid());
}

#[test]
fn redis_with_a_small_backlog_and_pool_clients_overflows_in_a_debug_sleep() {
    let ns = Netns::new().unwrap();
    let redis = Redis::start_in(&ns, &["--tcp-backlog", "16"]).unwrap();
    let ping: &'static [u8] = Box::leak(resp(&["PING"]).into_boxed_slice());
    let pool = Pool::start(&ns, redis.port, 64, ping, Duration::from_secs(5));
    Pool::settle(&ns);
    let before = ns.listen_overflows();
    let tracer = Tracer::start(redis.proc.pid(), &["-t", "50ms"]).unwrap();
    ns.within(|| {
        let mut c = TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
        c.write_all(&resp(&["DEBUG", "SLEEP", "0.5"])).unwrap();
        let mut buf = [0u8; 16];
        std::io::Read::read(&mut c, &mut buf).unwrap();
    });
    pool.join();
    thread::sleep(Duration::from_millis(300));
    let records = tracer.stop().unwrap();
    let overflows = ns.listen_overflows() - before;
    assert!(overflows > 0, "64 reconnecting clients should overflow a backlog of 16");
    let stall = stalls(&records).into_iter().find(|s| s["verdict"] == "off_cpu").expect("the DEBUG SLEEP stall").clone();
    let stall_overflows = u(&stall["net"]["overflows"]) + u(&stall["net"]["after"]["overflows"]);
    eprintln!("stall: {stall}");
    // The stall's window ends 500 ms after it, and a SYN it dropped is retried a second
    // later: on a slow run a retry can meet a queue still full and overflow outside the
    // window. Most of the session's drops are the stall's.
    let session = u(&summary(&records)["listeners"][0]["overflows"]);
    assert!(stall_overflows <= session && stall_overflows * 10 >= session * 9, "{stall}");
    assert_storm_caused_by(&records, &stall, overflows);
}
