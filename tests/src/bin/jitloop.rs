//! An epoll loop that stalls in machine code it generated at run time, as a JIT-compiled
//! handler (V8, HotSpot, LuaJIT) does, and names that code only in its perf map
//! (`/tmp/perf-PID.map`), as those runtimes do. x86-64 only.
//!
//! `jitloop MS SECS`: prints `ready`, waits for a line on stdin (so a tracer can attach
//! first), then for SECS seconds waits on an empty epoll set (50 ms timeout) and, after each
//! wait, spins MS milliseconds in the generated function named `JIT_NAME` in the map. It
//! removes its perf map when done.
use std::{
    fs,
    io::BufRead as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tests::JIT_NAME;

/// `push rbp; mov rbp, rsp; 1: dec rdi; jnz 1b; pop rbp; ret`: spins `rdi` times, in a
/// frame-pointer frame as JIT code keeps (no unwind tables describe it).
const SPIN: [u8; 11] = [0x55, 0x48, 0x89, 0xe5, 0x48, 0xff, 0xcf, 0x75, 0xfb, 0x5d, 0xc3];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [ms, secs] = args.as_slice() else { bail!("usage: jitloop MS SECS") };
    let spin_for = Duration::from_millis(ms.parse().context("MS")?);
    let run_for = Duration::from_secs_f64(secs.parse().context("SECS")?);
    let spin = generate()?;
    let map = format!("/tmp/perf-{}.map", std::process::id());
    fs::write(&map, format!("{:x} {:x} {JIT_NAME}\n", spin as usize, SPIN.len()))?;
    let per_ms = spins_per_ms(spin);
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        bail!("epoll_create1: {}", std::io::Error::last_os_error());
    }
    println!("ready");
    std::io::stdin().lock().read_line(&mut String::new())?;
    let start = Instant::now();
    while start.elapsed() < run_for {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 1];
        unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 1, 50) };
        spin(per_ms * spin_for.as_millis() as u64);
    }
    fs::remove_file(&map)?;
    Ok(())
}

/// Copies `SPIN` into a fresh page and makes it executable (never writable and executable
/// at once).
fn generate() -> Result<extern "C" fn(u64)> {
    if !cfg!(target_arch = "x86_64") {
        bail!("jitloop generates x86-64 code only");
    }
    unsafe {
        let page = libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
        if page == libc::MAP_FAILED {
            bail!("mmap: {}", std::io::Error::last_os_error());
        }
        std::ptr::copy_nonoverlapping(SPIN.as_ptr(), page.cast::<u8>(), SPIN.len());
        if libc::mprotect(page, 4096, libc::PROT_READ | libc::PROT_EXEC) != 0 {
            bail!("mprotect: {}", std::io::Error::last_os_error());
        }
        Ok(std::mem::transmute::<*mut libc::c_void, extern "C" fn(u64)>(page))
    }
}

fn spins_per_ms(spin: extern "C" fn(u64)) -> u64 {
    const PROBE: u64 = 1 << 24;
    let t = Instant::now();
    spin(PROBE);
    (PROBE as f64 / t.elapsed().as_secs_f64() / 1000.0).max(1.0) as u64
}
