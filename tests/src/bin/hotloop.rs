//! A tight epoll loop for measuring what each probe costs per hit (`cargo xtask bench`).
//!
//! `hotloop MODE K SECS [THREADS]`: every iteration is `epoll_wait(timeout 0)` on an
//! always-readable eventfd, then K times one operation:
//!
//! - `epoll`   nothing (K is ignored): the loop alone, what the loop group costs
//! - `getppid` a trivial syscall: what the syscalls group (sampled) costs per call
//! - `madvise` `madvise(MADV_NORMAL)` on one page: the purge group's tracepoints per call
//! - `realloc` libc `realloc` of one buffer between two small sizes: the alloc uprobes per call
//!
//! It prints `ready`, waits for a line on stdin (so a tracer can attach first), loops for a
//! short warm-up, then for SECS seconds, and prints `iterations=I ops=O elapsed_ns=E`.
//! With THREADS, that many threads run a loop each, starting together (their first waits
//! race on every CPU), and I is their sum.
//! stalltrace only accounts threads that have returned from epoll, and only inside an
//! iteration, which is why the operations run inside a real epoll loop.
use std::{
    hint::black_box,
    io::BufRead as _,
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

const WARMUP: Duration = Duration::from_millis(200);
/// Iterations between clock reads: rare enough not to be part of what is measured.
const CLOCK_EVERY: u64 = 16;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Epoll,
    Getppid,
    Madvise,
    Realloc,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, k, secs, threads) = match args.as_slice() {
        [mode, k, secs] => (mode, k, secs, None),
        [mode, k, secs, threads] => (mode, k, secs, Some(threads.parse::<usize>().context("THREADS")?)),
        _ => bail!("usage: hotloop epoll|getppid|madvise|realloc K SECS [THREADS]"),
    };
    let mode = match mode.as_str() {
        "epoll" => Mode::Epoll,
        "getppid" => Mode::Getppid,
        "madvise" => Mode::Madvise,
        "realloc" => Mode::Realloc,
        other => bail!("unknown mode {other:?}"),
    };
    let k: u64 = if mode == Mode::Epoll { 0 } else { k.parse().context("K")? };
    let secs: f64 = secs.parse().context("SECS")?;
    if let Some(n) = threads {
        return run_threads(mode, k, Duration::from_secs_f64(secs), n);
    }
    let mut lp = Loop::new(mode, k)?;
    println!("ready");
    std::io::stdin().lock().read_line(&mut String::new())?;
    lp.run_for(WARMUP);
    let t = Instant::now();
    let iterations = lp.run_for(Duration::from_secs_f64(secs));
    let elapsed = t.elapsed().as_nanos();
    println!("iterations={iterations} ops={} elapsed_ns={elapsed}", iterations * k);
    Ok(())
}

fn run_threads(mode: Mode, k: u64, d: Duration, n: usize) -> Result<()> {
    let start = Arc::new(Barrier::new(n + 1));
    let workers: Vec<_> = (0..n)
        .map(|_| {
            let start = Arc::clone(&start);
            // A loop holds raw pointers, so each thread makes its own.
            thread::spawn(move || {
                let mut lp = Loop::new(mode, k).expect("loop set-up");
                start.wait();
                lp.run_for(WARMUP + d)
            })
        })
        .collect();
    println!("ready");
    std::io::stdin().lock().read_line(&mut String::new())?;
    let t = Instant::now();
    start.wait();
    let iterations: u64 = workers.into_iter().map(|w| w.join().expect("loop thread")).sum();
    println!("iterations={iterations} ops={} elapsed_ns={}", iterations * k, t.elapsed().as_nanos());
    Ok(())
}

struct Loop {
    mode: Mode,
    k: u64,
    ep: i32,
    page: *mut libc::c_void,
    buf: *mut libc::c_void,
    flip: bool,
}

impl Loop {
    fn new(mode: Mode, k: u64) -> Result<Self> {
        let ep = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }, "epoll_create1")?;
        // Counter 1 and never read: level-triggered, so every wait returns one event, as a
        // busy server's would.
        let efd = check(unsafe { libc::eventfd(1, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) }, "eventfd")?;
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 0 };
        check(unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, efd, &mut ev) }, "epoll_ctl")?;
        let page = unsafe {
            libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if page == libc::MAP_FAILED {
            bail!("mmap: {}", std::io::Error::last_os_error());
        }
        let buf = unsafe { libc::malloc(64) };
        Ok(Self { mode, k, ep, page, buf, flip: false })
    }

    /// Loops until `d` has passed; returns the iterations done.
    fn run_for(&mut self, d: Duration) -> u64 {
        let start = Instant::now();
        let mut iterations = 0;
        loop {
            for _ in 0..CLOCK_EVERY {
                self.iteration();
            }
            iterations += CLOCK_EVERY;
            if start.elapsed() >= d {
                return iterations;
            }
        }
    }

    #[inline(always)]
    fn iteration(&mut self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
        black_box(unsafe { libc::epoll_wait(self.ep, events.as_mut_ptr(), 4, 0) });
        for _ in 0..self.k {
            self.op();
        }
    }

    #[inline(always)]
    fn op(&mut self) {
        match self.mode {
            Mode::Epoll => {}
            // Through syscall(2): the libc wrapper's behaviour is not what is measured.
            Mode::Getppid => _ = black_box(unsafe { libc::syscall(libc::SYS_getppid) }),
            Mode::Madvise => _ = black_box(unsafe { libc::madvise(self.page, 4096, libc::MADV_NORMAL) }),
            Mode::Realloc => {
                self.flip = !self.flip;
                let size = if self.flip { 128 } else { 64 };
                self.buf = black_box(unsafe { libc::realloc(self.buf, size) });
            }
        }
    }
}

fn check(ret: i32, what: &str) -> Result<i32> {
    if ret < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(ret)
}
