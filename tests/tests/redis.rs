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
    let clients: Vec<_> = (0..2).map(|i| purge::fill_client(&redis, i).unwrap()).collect();
    let tracer = Tracer::start(redis.proc.pid(), &["-t", "15ms"]).unwrap();
    // Kept open until the tracer stops: a closed connection is freed outside clientsCron.
    let _open = purge::release(&redis, clients).unwrap();
    thread::sleep(Duration::from_millis(800));
    let records = tracer.stop().unwrap();
    eprintln!("{}", records.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n"));
    let _ = redis.cmd(&["FLUSHALL", "ASYNC"]);
    let purges: Vec<_> = stalls(&records).into_iter().filter(|s| s["verdict"] == "allocator_purge").collect();
    assert!(!purges.is_empty(), "{records:#?}");
    let stall = purges[0];
    assert_eq!(stall["tid"], redis.proc.pid(), "{stall}");
    assert!(stall["madvise"]["bytes"].as_u64().unwrap() >= 1 << 30, "{stall}");
    assert!(stall["shares"]["allocator_purge"].as_f64().unwrap() >= 50.0, "{stall}");
    assert_eq!(summary(&records)["lost"], 0);
}

mod purge {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
        thread,
        time::{Duration, Instant},
    };

    use anyhow::{Result, bail};
    use tests::{Redis, resp};

    const BUF: usize = 1 << 30;
    /// Under Redis' 32 KB big-argument limit, so these are parsed from the query buffer.
    const ARG: usize = 30_000;

    fn publish(len: usize, fill: u8) -> Vec<u8> {
        let mut c = format!("*3\r\n$7\r\nPUBLISH\r\n$1\r\nt\r\n${ARG}\r\n").into_bytes();
        c.extend(std::iter::repeat_n(fill, len));
        c
    }

    /// One connection whose query buffer ends up 1 GiB, resident, and full of unrun commands.
    pub fn fill_client(redis: &Redis, i: usize) -> Result<(TcpStream, usize)> {
        let mut s = TcpStream::connect(("127.0.0.1", redis.port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        let name = format!("purge-{i}");
        s.write_all(&resp(&["CLIENT", "SETNAME", &name]))?;
        let key = format!("purge:key:{i}");
        s.write_all(format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${BUF}\r\n", key.len()).as_bytes())?;
        let block = vec![b'v'; 32 << 20];
        for _ in 0..BUF / block.len() {
            s.write_all(&block)?;
        }
        s.write_all(b"\r\n")?;
        s.write_all(&resp(&["BLPOP", &format!("purge:go:{i}"), "15"]))?;
        let mut cmd = publish(ARG, b'p');
        cmd.extend_from_slice(b"\r\n");
        let count = (BUF - (4 << 20)) / cmd.len();
        let chunk = cmd.repeat(1000);
        for _ in 0..count / 1000 {
            s.write_all(&chunk)?;
        }
        for _ in 0..count % 1000 {
            s.write_all(&cmd)?;
        }
        // An unfinished command keeps a little in the buffer, so the shrink is a realloc.
        let tail = publish(1000, b'q');
        s.write_all(&tail)?;
        let expect = count * cmd.len() + tail.len();
        wait_for_qbuf(redis, &name, expect)?;
        Ok((s, count))
    }

    fn wait_for_qbuf(redis: &Redis, name: &str, expect: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let want = format!("name={name} ");
        loop {
            let list = redis.cmd(&["CLIENT", "LIST"])?;
            let qbuf = list
                .lines()
                .find(|l| l.contains(&want))
                .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("qbuf=")))
                .and_then(|v| v.parse::<usize>().ok());
            if qbuf == Some(expect) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{name}: query buffer never reached {expect} bytes (now {qbuf:?})");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wakes every client at once and reads their backlog's replies.
    pub fn release(redis: &Redis, clients: Vec<(TcpStream, usize)>) -> Result<Vec<TcpStream>> {
        let mut ctl = TcpStream::connect(("127.0.0.1", redis.port))?;
        let mut tx = resp(&["MULTI"]);
        for i in 0..clients.len() {
            tx.extend(resp(&["LPUSH", &format!("purge:go:{i}"), "x"]));
        }
        tx.extend(resp(&["EXEC"]));
        ctl.write_all(&tx)?;
        let mut open = vec![ctl];
        for (mut s, count) in clients {
            // "+OK" for SETNAME and SET, the BLPOP pair, then ":0\r\n" per PUBLISH.
            drain_until(&mut s, count * 4)?;
            open.push(s);
        }
        Ok(open)
    }

    fn drain_until(s: &mut TcpStream, at_least: usize) -> Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < at_least {
            let n = s.read(&mut buf)?;
            if n == 0 {
                bail!("redis closed the connection after {got} bytes");
            }
            got += n;
        }
        Ok(())
    }
}
