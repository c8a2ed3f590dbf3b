//! Is the host giving us whole CPUs? The host under a VM can run other work on our CPUs
//! without the guest seeing it (this one reports no steal time): every process here just runs
//! slower, traced or not, for minutes at a time. A fixed spin on each CPU before and after
//! every run, timed against the fastest spin of the session, shows it.
use std::{cell::RefCell, hint::black_box, time::Instant};

/// How long one spin takes on a quiet host: long enough to span several timer ticks, short
/// enough to repeat around every run.
const SPIN_NS: f64 = 10e6;
/// A spin this much slower than the session's fastest on that CPU means a busy host.
pub const LIMIT: f64 = 1.03;
/// Spins per CPU when the session starts, so that the first runs meet a settled best.
const WARMUP: usize = 5;

pub struct HostSpeed {
    iterations: u64,
    best_ns: RefCell<Vec<f64>>,
}

impl Default for HostSpeed {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let probe = 1_000_000;
        let ns = spin_on(0, probe);
        let host = Self { iterations: (probe as f64 * SPIN_NS / ns) as u64, best_ns: RefCell::new(vec![f64::MAX; cpus]) };
        for _ in 0..WARMUP {
            host.slowdown();
        }
        host
    }
}

impl HostSpeed {
    /// The slowest CPU's spin now against its fastest this session: 1.0 is as fast as ever.
    pub fn slowdown(&self) -> f64 {
        let mut best = self.best_ns.borrow_mut();
        let mut worst: f64 = 1.0;
        for (cpu, best) in best.iter_mut().enumerate() {
            let ns = spin_on(cpu, self.iterations);
            *best = best.min(ns);
            worst = worst.max(ns / *best);
        }
        worst
    }
}

/// Wall time of `iterations` steps of a dependent chain on `cpu`.
fn spin_on(cpu: usize, iterations: u64) -> f64 {
    std::thread::scope(|s| {
        s.spawn(|| {
            pin(cpu);
            let start = Instant::now();
            black_box(xorshift(black_box(iterations)));
            start.elapsed().as_nanos() as f64
        })
        .join()
        .expect("the spin thread does not panic")
    })
}

/// Each step needs the last: no vectorising or folding, the same instructions every time.
fn xorshift(iterations: u64) -> u64 {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..iterations {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; 0 is the calling thread.
    unsafe {
        let mut set = std::mem::zeroed::<libc::cpu_set_t>();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
