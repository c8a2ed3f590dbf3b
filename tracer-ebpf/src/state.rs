//! Maps, globals and the per-thread lookup every program starts with.
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_attach_cookie, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use tracer_common::{CLAIM_TRIES, IterHist, TASK_COMM_LEN, ThreadState, counter};

/// Loop threads of the one target: 4096 is far more than any event-loop server runs, and
/// userspace walks every bucket of it once a second (`probes::sparse`). A thread that does
/// not fit is counted (`THREADS_FULL`) and reported.
#[map]
pub static THREADS: HashMap<u32, ThreadState> = HashMap::with_max_entries(4096, 0);

/// Histograms by slot, not by tid: every loop iteration updates one, and an array lookup is
/// an inlined bounds check where a hash lookup by tid cost ~55 ns an iteration here. Slots are
/// claimed once per thread and never reused, so 4x `THREADS` leaves room for thread churn.
#[map]
pub static ITER_HIST: Array<IterHist> = Array::with_max_entries(HIST_CAPACITY, 0);

/// One more than the highest `ITER_HIST` slot claimed, give or take a racing claim: where
/// the next claim starts looking, and how far userspace reads (plus `CLAIM_TRIES`).
#[map]
pub static HIST_USED: Array<u64> = Array::with_max_entries(1, 0);

/// The thread that claimed each slot. Inserting with BPF_NOEXIST is the claim: it is atomic,
/// and Rust emits no BPF compare-and-swap or fetch-and-add.
#[map]
static HIST_OWNERS: HashMap<u32, u32> = HashMap::with_max_entries(HIST_CAPACITY, 0);

const HIST_CAPACITY: u32 = 16384;

/// Stall records only (~250 bytes): 2 MiB holds 8000, seconds of a reader that fell behind.
#[map]
pub static STALLS: RingBuf = RingBuf::with_byte_size(2 << 20, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

/// The traced process. Userspace always sets it; 0 would match nothing.
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;

/// Iterations at least this long are stalls.
#[unsafe(no_mangle)]
static THRESHOLD_NS: u64 = u64::MAX;

/// A global userspace set at load time. The volatile read keeps the compiler from folding
/// the compiled-in default: the loader rewrites the value in the object, not in our code.
#[inline(always)]
pub fn global<T: Copy>(v: &T) -> T {
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
pub fn threshold_ns() -> u64 {
    global(&THRESHOLD_NS)
}

#[inline(always)]
pub fn now() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn current_tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

#[inline(always)]
pub fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// The calling thread's state, if it is a tracked event-loop thread.
#[inline(always)]
pub fn current_thread() -> Option<&'static mut ThreadState> {
    let id = bpf_get_current_pid_tgid();
    // Hot tracepoints (every syscall and context switch on the host) end here for every other
    // process: one compare instead of a hash lookup.
    if other_process((id >> 32) as u32) {
        return None;
    }
    thread(id as u32)
}

/// Whether `tgid` is not the process this program set traces.
#[inline(always)]
pub fn other_process(tgid: u32) -> bool {
    tgid != global(&TARGET_TGID)
}

#[inline(always)]
pub fn thread(tid: u32) -> Option<&'static mut ThreadState> {
    // SAFETY: a thread's entry is only written by programs running on behalf of that thread
    // (or of the scheduler switching it), which never run concurrently for one thread.
    THREADS.get_ptr_mut(tid).map(|p| unsafe { &mut *p })
}

/// The calling thread's state while it is inside an iteration (which may begin here: see
/// `iteration::resumed`), from a program on a call the thread makes.
#[inline(always)]
pub fn current_iteration() -> Option<&'static mut ThreadState> {
    let s = current_thread()?;
    (s.iter_start_ns != 0 || crate::iteration::resumed(s, false)).then_some(s)
}

/// `current_iteration`, for the sampler, which finds the thread wherever it is.
#[inline(always)]
pub fn observed_iteration() -> Option<&'static mut ThreadState> {
    let s = current_thread()?;
    (s.iter_start_ns != 0 || crate::iteration::resumed(s, true)).then_some(s)
}

/// What userspace attached a program with, where one program serves several functions.
#[inline(always)]
pub fn cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: a helper every program type with attach cookies may call.
    unsafe { bpf_get_attach_cookie(ctx.as_ptr()) }
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, programs do not nest on one CPU for these hooks.
        unsafe { *p += 1 };
    }
}

/// The thread's histograms; only ever updated by the thread itself.
#[inline(always)]
pub fn histograms(s: &ThreadState) -> Option<&'static mut IterHist> {
    // SAFETY: as for `thread`: one writer per slot.
    ITER_HIST.get_ptr_mut(s.hist.checked_sub(1)?).map(|p| unsafe { &mut *p })
}

/// Gives the calling thread a histogram slot: `ThreadState::hist`, 0 if none is left.
#[inline(never)]
pub fn claim_histogram(tgid: u32, tid: u32) -> u32 {
    let Some(used) = HIST_USED.get_ptr_mut(0) else { return 0 };
    // SAFETY: a map value; a claim racing this one on another CPU at worst makes one of the
    // two try the next slot.
    let mut slot = unsafe { core::ptr::read_volatile(used) } as u32;
    for _ in 0..CLAIM_TRIES {
        // Past the last slot: none left.
        let Some(h) = ITER_HIST.get_ptr_mut(slot) else { break };
        if HIST_OWNERS.insert(slot, tid, BPF_NOEXIST as u64).is_ok() {
            // SAFETY: as above; the slot is the calling thread's alone now.
            unsafe { core::ptr::write_volatile(used, u64::from(slot) + 1) };
            let h = unsafe { &mut *h };
            h.tgid = tgid;
            h.tid = tid;
            h.comm = bpf_get_current_comm().unwrap_or([0; TASK_COMM_LEN]);
            return slot + 1;
        }
        slot += 1;
    }
    count(counter::HISTS_FULL);
    0
}
