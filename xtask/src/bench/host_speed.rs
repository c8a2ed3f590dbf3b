//! Is the host giving us whole CPUs? The host under a VM can run other work on our CPUs
//! without the guest seeing it (this one reports no steal time): every process here just runs
//! slower, traced or not, for minutes at a time. A fixed spin on each CPU right after every
//! run, timed against the fastest of the session, shows it. A spin is timed in its thread's
//! CPU time: a task of this machine that shares the CPU (a tracer reading the run's records)
//! does not count, the host does, as the guest cannot tell its CPU was taken. Each probe is
//! the median of a few short spins. Not before a run: a vCPU that was idle runs up to 2-3x
//! slower for its first tens of ms (the host gives its core back late), which says nothing
//! of the minutes to come.
//!
//! The spin misses one thing: where the host puts the two vCPUs. A cache line passes between
//! them in ~35 ns when they share a last-level cache and ~170 ns when they do not (another
//! CCX of this EPYC), and the host moves them for stretches of 5-30 s. Redis on one and
//! redis-benchmark on the other trade every request's socket buffers, so the far placement
//! costs Redis ~17% of its CPU a request: bimodal runs the spin calls equal. So the round
//! trip between the bench's CPUs is timed too, before and after every run, and a traced run
//! is compared only with untraced neighbours placed as it was (`redis_cost`). The far
//! placement can last for minutes, so waiting it out or repeating runs is no cure.
//! Unlike the spin, the round trip is fine to time before a run: the bench keeps idle vCPUs
//! polling (`idle`), and a first slow trip is outvoted by the median of three probes.
use std::{
    cell::{Cell, RefCell},
    hint::black_box,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

/// How long one spin takes on a quiet host, and spins per probe of a CPU: short enough to
/// repeat around every run.
const SPIN_NS: f64 = 4e6;
const SPINS: usize = 3;
/// Spins thrown away first, in case the CPU idled since the run.
const WARM_SPINS: usize = 1;
/// A probe this much slower than the session's fastest on that CPU means a busy host. Probes
/// right after a run vary by ~5% against their minimum on a quiet host.
pub const LIMIT: f64 = 1.15;
/// Spins per CPU when the session starts, so that the first runs meet a settled best.
const WARMUP: usize = 5;

/// A round trip this much slower than the session's fastest means the far placement: the two
/// placements differ ~5x, and the near one varies by up to ~1.5x.
pub const PLACEMENT_LIMIT: f64 = 2.0;
/// Round trips per probe: a few ms near, tens far.
const ROUND_TRIPS: u64 = 50_000;

pub struct HostSpeed {
    iterations: u64,
    best_ns: RefCell<Vec<f64>>,
    best_trip_ns: Cell<f64>,
}

impl Default for HostSpeed {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let probe = 1_000_000;
        let ns = spin_on(0, probe);
        let host = Self {
            iterations: (probe as f64 * SPIN_NS / ns) as u64,
            best_ns: RefCell::new(vec![f64::MAX; cpus]),
            best_trip_ns: Cell::new(f64::MAX),
        };
        for _ in 0..WARMUP {
            host.slowdown();
            host.placement();
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
            let mut spins: Vec<f64> = (0..WARM_SPINS + SPINS).map(|_| spin_on(cpu, self.iterations)).skip(WARM_SPINS).collect();
            spins.sort_by(f64::total_cmp);
            let ns = spins[SPINS / 2];
            *best = best.min(ns);
            worst = worst.max(ns / *best);
        }
        worst
    }

    /// The round trip of a cache line between CPUs 0 and 1 now against its fastest this
    /// session: 1.0 is the near placement (also with one CPU, where there is none).
    pub fn placement(&self) -> f64 {
        if self.best_ns.borrow().len() < 2 {
            return 1.0;
        }
        let mut trips: Vec<f64> = (0..3).map(|_| round_trip_ns(ROUND_TRIPS)).collect();
        trips.sort_by(f64::total_cmp);
        let ns = trips[1];
        self.best_trip_ns.set(self.best_trip_ns.get().min(ns));
        ns / self.best_trip_ns.get()
    }
}

/// Mean ns for a cache line to go from CPU 0 to CPU 1 and back, over `trips` trips.
fn round_trip_ns(trips: u64) -> f64 {
    let line = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            pin(1);
            for i in 0..trips {
                while line.load(Ordering::Acquire) != 2 * i + 1 {
                    std::hint::spin_loop();
                }
                line.store(2 * i + 2, Ordering::Release);
            }
        });
        s.spawn(|| {
            pin(0);
            let start = Instant::now();
            for i in 0..trips {
                line.store(2 * i + 1, Ordering::Release);
                while line.load(Ordering::Acquire) != 2 * i + 2 {
                    std::hint::spin_loop();
                }
            }
            start.elapsed().as_nanos() as f64 / trips as f64
        })
        .join()
        .expect("the round-trip thread does not panic")
    })
}

/// CPU time of `iterations` steps of a dependent chain on `cpu`.
fn spin_on(cpu: usize, iterations: u64) -> f64 {
    std::thread::scope(|s| {
        s.spawn(|| {
            pin(cpu);
            let start = thread_cpu_ns();
            black_box(xorshift(black_box(iterations)));
            thread_cpu_ns() - start
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

fn thread_cpu_ns() -> f64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 * 1e9 + t.tv_nsec as f64
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; 0 is the calling thread.
    unsafe {
        let mut set = std::mem::zeroed::<libc::cpu_set_t>();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
