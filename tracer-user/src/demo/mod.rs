//! `stalltrace demo`: start the built-in event-loop server under the allocator a Redis
//! deployment would use, drive it into stalls of each kind, and trace it.
pub mod server;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};

use crate::{cli::CommonArgs, target};

/// Where Debian and Fedora put jemalloc; the demo preloads it to behave like Redis.
const JEMALLOC: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
];

/// The load's script: each step is a command and how long to idle after it. `STORM` is the
/// client's own step: a burst of connections opened at once, as pools refilling do.
const SCRIPT: &[(&str, u64)] = &[
    ("FILL 512", 400),
    ("SHRINK", 800),
    ("SLEEP 120", 800),
    ("CHURN 150", 800),
    ("STORM", 800),
    ("PING", 500),
];

const STORM_CONNECTIONS: usize = 2000;

pub fn run(common: &CommonArgs) -> Result<()> {
    target::check_privileges()?;
    server::raise_fd_limit();
    let (mut server, port) = start_server()?;
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || drive(port, &stop))
    };
    let result = crate::trace(server.id(), common);
    stop.store(true, Ordering::Relaxed);
    let _ = server.kill();
    let _ = server.wait();
    let _ = load.join();
    result
}

fn start_server() -> Result<(Child, u16)> {
    let exe = std::env::current_exe().context("locating the stalltrace binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["demo-server", "--port", "0"]).stdout(Stdio::piped()).env("STALLTRACE_DEMO_CHILD", "1");
    // Its own process group: Ctrl-C stops the tracer, which then stops the server.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    match JEMALLOC.iter().find(|p| Path::new(p).exists()) {
        Some(lib) => {
            // dirty_decay_ms:0 makes jemalloc purge freed pages at once, as Redis' huge
            // allocations are: the purge lands on the loop thread.
            cmd.env("LD_PRELOAD", lib).env("MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0");
            eprintln!("stalltrace: demo server runs on {lib}");
        }
        None => eprintln!("stalltrace: jemalloc not found, demo server runs on glibc malloc (purges via munmap)"),
    }
    let mut child = cmd.spawn().context("starting the demo server")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("demo server has no stdout"))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let port = line.trim().parse().with_context(|| format!("demo server said {line:?}, not a port"))?;
    Ok((child, port))
}

/// Sends the script in a loop until told to stop or the server goes away.
fn drive(port: u16, stop: &AtomicBool) {
    // Give the tracer time to attach before the first stall.
    thread::sleep(Duration::from_millis(800));
    let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) else { return };
    let mut reader = BufReader::new(stream.try_clone().expect("clone socket"));
    let mut writer = stream;
    while !stop.load(Ordering::Relaxed) {
        for (cmd, pause_ms) in SCRIPT {
            let mut reply = String::new();
            if *cmd == "STORM" {
                storm(port);
            } else if writeln!(writer, "{cmd}").is_err() || reader.read_line(&mut reply).unwrap_or(0) == 0 {
                return;
            }
            thread::sleep(Duration::from_millis(*pause_ms));
            if stop.load(Ordering::Relaxed) {
                return;
            }
        }
    }
}

/// Opens many connections at once, pings on each, and closes them all.
fn storm(port: u16) {
    let conns: Vec<TcpStream> =
        (0..STORM_CONNECTIONS).filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok()).collect();
    for mut c in &conns {
        let _ = writeln!(c, "PING");
    }
    for c in &conns {
        let mut reply = String::new();
        let _ = BufReader::new(c).read_line(&mut reply);
    }
}
