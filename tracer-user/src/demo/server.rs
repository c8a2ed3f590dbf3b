//! A small single-threaded epoll server, shaped like Redis: one loop, line commands, and a big
//! buffer it can fill and shrink so the allocator hands memory back on the loop thread.
//!
//! Commands (one per line, each answered with `OK <ns>`: the time the command itself took):
//! `PING`, `FILL <MiB>` (allocate and touch a buffer), `SHRINK` (realloc it down to 4 KiB),
//! `SPIN <ms>` (burn CPU), `SLEEP <ms>` (block), `ZERO <ms>` (on CPU inside read(2) of
//! /dev/zero: kernel time), `CHURN <ms>` (malloc and free small blocks: allocator time on CPU),
//! `QUIT` (exit).
use std::{
    collections::HashMap,
    io::{ErrorKind, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

const LISTENER: u64 = u64::MAX;

pub fn serve(port: u16, backlog: i32, name: &str) -> Result<()> {
    // A name of its own, so stall lines and `ps` tell the server from the tracer.
    let name = std::ffi::CString::new(name).context("a process name without NUL bytes")?;
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    // The demo's server must not outlive the demo, however the demo ends.
    if std::env::var_os("STALLTRACE_DEMO_CHILD").is_some() {
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
    }
    raise_fd_limit();
    let listener = listen(port, backlog)?;
    listener.set_nonblocking(true)?;
    println!("{}", listener.local_addr()?.port());
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        bail!("epoll_create1: {}", std::io::Error::last_os_error());
    }
    watch(ep, listener.as_raw_fd(), LISTENER)?;
    let mut state = State::default();
    let mut conns: HashMap<u64, (TcpStream, Vec<u8>)> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    loop {
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                continue;
            }
            bail!("epoll_wait: {}", std::io::Error::last_os_error());
        }
        for ev in &events[..n as usize] {
            let token = ev.u64;
            if token == LISTENER {
                accept_all(ep, &listener, &mut conns)?;
            } else if !serve_conn(&mut conns, token, &mut state) {
                conns.remove(&token);
            }
        }
    }
}

/// A listener with the backlog asked for (std's bind always asks for 128).
fn listen(port: u16, backlog: i32) -> Result<TcpListener> {
    let listener = TcpListener::bind(("127.0.0.1", port)).context("binding 127.0.0.1")?;
    if unsafe { libc::listen(listener.as_raw_fd(), backlog) } != 0 {
        bail!("listen: {}", std::io::Error::last_os_error());
    }
    Ok(listener)
}

/// Bursts of thousands of connections need as many descriptors.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[derive(Default)]
struct State {
    ballast: Vec<u8>,
}

fn watch(ep: i32, fd: i32, token: u64) -> Result<()> {
    let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
    if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        bail!("epoll_ctl: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn accept_all(ep: i32, listener: &TcpListener, conns: &mut HashMap<u64, (TcpStream, Vec<u8>)>) -> Result<()> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(true)?;
                let token = stream.as_raw_fd() as u64;
                watch(ep, stream.as_raw_fd(), token)?;
                conns.insert(token, (stream, Vec::new()));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads what is there and runs every complete line; false when the connection is done.
fn serve_conn(conns: &mut HashMap<u64, (TcpStream, Vec<u8>)>, token: u64, state: &mut State) -> bool {
    let Some((stream, buf)) = conns.get_mut(&token) else { return false };
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(_) => return false,
        }
    }
    while let Some(end) = buf.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = buf.drain(..=end).collect();
        let reply = run_command(String::from_utf8_lossy(&line).trim(), state);
        // Replies are tiny; a client that does not read them loses them.
        let _ = stream.write_all(reply.as_bytes());
    }
    true
}

fn run_command(line: &str, state: &mut State) -> String {
    let mut words = line.split_whitespace();
    let cmd = words.next().unwrap_or("").to_ascii_uppercase();
    let arg: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
    let t = Instant::now();
    match cmd.as_str() {
        "PING" => {}
        // Every byte written, so every page is resident and a purge has real work to do.
        "FILL" => state.ballast = vec![0x5a; (arg as usize) << 20],
        "SHRINK" => {
            state.ballast.truncate(4096);
            state.ballast.shrink_to_fit();
        }
        "SPIN" => spin(Duration::from_millis(arg)),
        "SLEEP" => std::thread::sleep(Duration::from_millis(arg)),
        "ZERO" => read_zero(Duration::from_millis(arg)),
        "CHURN" => churn(Duration::from_millis(arg)),
        "QUIT" => std::process::exit(0),
        _ => return format!("ERR unknown command {cmd:?}\n"),
    }
    format!("OK {}\n", t.elapsed().as_nanos())
}

/// Kernel time on CPU: each 1 MiB read is the kernel clearing a buffer.
fn read_zero(d: Duration) {
    let Ok(mut f) = std::fs::File::open("/dev/zero") else { return };
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    while t.elapsed() < d {
        let _ = f.read(&mut buf);
    }
}

/// Time inside the allocator and no syscall: small blocks (slab and bin sizes in jemalloc and
/// glibc alike), never touched, each replacing another at random. malloc and free are called
/// directly so that little else runs, even in a debug build.
fn churn(d: Duration) {
    let t = Instant::now();
    let mut slots = [std::ptr::null_mut::<libc::c_void>(); 256];
    let mut x = 1u64;
    while t.elapsed() < d {
        for _ in 0..1000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let slot = &mut slots[(x >> 40) as usize % 256];
            // SAFETY: every pointer in `slots` is null or from malloc, and freed exactly once.
            unsafe {
                libc::free(*slot);
                *slot = libc::malloc(16 << (x >> 61));
            }
        }
    }
    // SAFETY: as above.
    slots.iter().for_each(|&p| unsafe { libc::free(p) });
}

fn spin(d: Duration) {
    let t = Instant::now();
    let mut x = 0u64;
    while t.elapsed() < d {
        for i in 0..1000 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
    }
}
