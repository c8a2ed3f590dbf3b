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

/// The name the `jitloop` workload's perf map gives the code it generates, in V8's style.
pub const JIT_NAME: &str = "LazyCompile:*jittedSpin generated.js:1";

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
        Self::start_with(Command::new(stalltrace_bin()), jemalloc, &[])
    }

    /// In the namespace, with the given listen backlog.
    pub fn start_in(ns: &Netns, backlog: u32) -> Result<Self> {
        Self::start_with(ns.command(stalltrace_bin()), false, &["--backlog", &backlog.to_string()])
    }

    /// With a process name of its own, for tests that find it by name.
    pub fn start_named(name: &str) -> Result<Self> {
        Self::start_with(Command::new(stalltrace_bin()), false, &["--name", name])
    }

    fn start_with(mut cmd: Command, jemalloc: bool, extra: &[&str]) -> Result<Self> {
        cmd.args(["demo-server", "--port", "0"]).args(extra).stdout(Stdio::piped());
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
    /// Lines `wait_for` read, for `stop` to return with the rest.
    read: Vec<String>,
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
        Ok(Self { proc, stdout_rx, read: Vec::new() })
    }

    /// The first record, while the tracer runs, that `pred` accepts.
    pub fn wait_for(&mut self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.stdout_rx.recv_timeout(left).map_err(|_| anyhow!("no such record within {timeout:?}"))?;
            let record: Value = serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?;
            self.read.push(line);
            if pred(&record) {
                return Ok(record);
            }
        }
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
        let mut lines = std::mem::take(&mut self.read);
        while let Ok(line) = self.stdout_rx.recv_timeout(Duration::from_secs(2)) {
            lines.push(line);
        }
        let mut records = Vec::new();
        for line in lines {
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
    /// The namespace's file when Redis runs in one: its commands are sent from there.
    netns: Option<PathBuf>,
}

impl Redis {
    /// Starts `redis-server` with `extra` config arguments (`--name value` pairs) and `env`.
    pub fn start(extra: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        Self::start_with(Command::new("redis-server"), free_port(), None, extra, env)
    }

    /// In the namespace (its own, so the default port is free).
    pub fn start_in(ns: &Netns, extra: &[&str]) -> Result<Self> {
        Self::start_with(ns.command("redis-server"), 6379, Some(ns.path()), extra, &[])
    }

    fn start_with(
        mut cmd: Command,
        port: u16,
        netns: Option<PathBuf>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let child = cmd
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--enable-debug-command", "yes", "--logfile", ""])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server (cargo xtask setup installs it)")?;
        let redis = Self { proc: Proc { child }, port, netns };
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
        in_netns(self.netns.as_deref(), || self.cmd_here(args))
    }

    fn cmd_here(&self, args: &[&str]) -> Result<String> {
        Self::cmd_on(self.port, args)
    }

    /// `cmd` to the Redis on `port` (of this namespace), from any thread.
    pub fn cmd_on(port: u16, args: &[&str]) -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
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

/// A private network namespace with loopback up, held open by a `sleep` we stop by PID:
/// kernel counters such as TcpExtListenOverflows are then the test's alone.
pub struct Netns {
    holder: Proc,
}

impl Netns {
    pub fn new() -> Result<Self> {
        let child = Command::new("unshare").args(["-n", "--", "sleep", "600"]).spawn().context("unshare -n")?;
        let holder = Proc { child };
        let ours = std::fs::read_link("/proc/self/ns/net")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{}/ns/net", holder.pid())).ok().as_ref() == Some(&ours) {
            if Instant::now() > deadline {
                bail!("unshare did not make a new network namespace");
            }
            thread::sleep(Duration::from_millis(10));
        }
        let ns = Self { holder };
        ns.run("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command that runs inside the namespace (nsenter execs it: the PID is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.holder.pid().to_string(), "-n", "--"]).arg(program);
        cmd
    }

    pub fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let status = self.command(program).args(args).status()?;
        if !status.success() {
            bail!("{program} {args:?} in the namespace failed: {status}");
        }
        Ok(())
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.holder.pid()))
    }

    /// Runs `f` on a thread that joined the namespace: sockets it makes live there.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(Some(&self.path()), f)
    }

    /// TcpExtListenOverflows of this namespace.
    pub fn listen_overflows(&self) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/net/netstat", self.holder.pid())).expect("netstat");
        let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
        let (names, values) = (lines.next().expect("names"), lines.next().expect("values"));
        let idx = names.split_whitespace().position(|n| n == "ListenOverflows").expect("ListenOverflows");
        values.split_whitespace().nth(idx).and_then(|v| v.parse().ok()).expect("a number")
    }
}

/// Runs `f` here, or on a thread that joined the network namespace at `ns`.
pub fn in_netns<T: Send>(ns: Option<&Path>, f: impl FnOnce() -> T + Send) -> T {
    let Some(ns) = ns else { return f() };
    thread::scope(|s| {
        s.spawn(|| {
            join_netns(ns);
            f()
        })
        .join()
        .expect("netns thread")
    })
}

fn join_netns(ns: &Path) {
    let file = std::fs::File::open(ns).expect("netns file");
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Raises this process's descriptor limit to its hard limit (bursts of connections need it).
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Clients that behave like a connection pool with short timeouts: each keeps one
/// connection, sends a request every 50 ms, and on a 100 ms read timeout drops it and opens a
/// new one, giving up on a connect after 200 ms (before the kernel would retry the SYN) to
/// try again at once. A stalled server makes them reconnect all at once, over and over.
pub struct Pool {
    threads: Vec<thread::JoinHandle<()>>,
}

impl Pool {
    /// `request` is one request in the server's protocol; any reply counts.
    pub fn start(ns: &Netns, port: u16, clients: usize, request: &'static [u8], run_for: Duration) -> Self {
        let deadline = Instant::now() + run_for;
        let threads = (0..clients)
            .map(|i| {
                let path = ns.path();
                thread::spawn(move || {
                    join_netns(&path);
                    // Staggered, so that filling the pool is not itself a storm.
                    thread::sleep(Duration::from_millis(15 * i as u64));
                    pool_client(port, request, deadline);
                })
            })
            .collect();
        Self { threads }
    }

    /// Waits until the namespace's overflow counter has held still for a second.
    pub fn settle(ns: &Netns) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = ns.listen_overflows();
        let mut since = Instant::now();
        while since.elapsed() < Duration::from_secs(1) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
            let now = ns.listen_overflows();
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
    }

    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn pool_client(port: u16, request: &[u8], deadline: Instant) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut conn: Option<TcpStream> = None;
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        if conn.is_none() {
            conn = TcpStream::connect_timeout(&addr, left.min(Duration::from_millis(200))).ok();
            if let Some(c) = &conn {
                let _ = c.set_read_timeout(Some(Duration::from_millis(100)));
            }
            continue;
        }
        let c = conn.as_mut().expect("connected");
        if c.write_all(request).is_err() || !matches!(c.read(&mut buf), Ok(n) if n > 0) {
            conn = None;
            continue;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Driving Redis into purging resident query buffers from clientsCron (see the test).
pub mod redis_purge {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
        thread,
        time::{Duration, Instant},
    };

    use anyhow::{Result, bail};
    use crate::{Redis, resp};

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

/// The stall's heaviest stack, root first.
pub fn stack(stall: &Value) -> Vec<String> {
    stall["stack"].as_array().map(|a| a.iter().filter_map(|f| f.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

/// Panics unless the stall's heaviest stack holds a frame for each of `names`, in this order
/// from root to leaf; an entry may list alternatives separated by '|'.
pub fn assert_stack_order(stall: &Value, names: &[&str]) {
    let frames = stack(stall);
    let mut at = 0;
    for want in names {
        let found = frames[at..].iter().position(|f| want.split('|').any(|w| f == w || f.starts_with(&format!("{w}+"))));
        match found {
            Some(i) => at += i + 1,
            None => panic!("no {want} after frame {at} of the stack {frames:#?}\nin {stall}"),
        }
    }
}
