//! Loop group: an iteration is the busy time from an epoll wait's return to the next wait.
//!
//! Only the wait's entry is probed: a syscall tracepoint costs ~50 ns of dispatch besides
//! the program, paid by every process's epoll calls. The return is inferred: the first program
//! that sees a loop thread running outside epoll_wait (registers say which syscall it is in)
//! begins its iteration at the time it last got back on CPU (`resume`), and the next entry
//! ends it. Where the registers cannot be read, `epoll_exit` begins iterations instead.
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::{fentry, map, tracepoint, uprobe},
    maps::PerCpuArray,
    programs::{FEntryContext, ProbeContext, TracePointContext},
};
use tracer_common::{
    Components, SWITCHES_UNKNOWN, StallEvent, TASK_COMM_LEN, ThreadState, counter, hist_slot,
    thread_flag::{IN_EPOLL, PURGE_AT_SITE},
};

use crate::{
    state::{
        STALLS, THREADS, claim_histogram, count, current_tid, global, histograms, now, other_process, thread,
        threshold_ns,
    },
    task::{self, Task},
};

#[unsafe(no_mangle)]
static LAZY_BEGIN: u64 = 0;
#[unsafe(no_mangle)]
static EPOLL_SYSCALLS: [u64; 3] = [u64::MAX; 3];

/// CPU time a thread needs after its wait's uprobe to have entered the syscall, returned and
/// left the wrapper: the trap's return and a dozen instructions take ~1 us on this project's
/// VMs (see `resumed_with`).
const WRAPPER_CPU_NS: u64 = 20_000;

/// The thread each CPU last put back on CPU inside its epoll wait, and when. sched_switch
/// writes this slot instead of looking the thread up, as it holds the runqueue lock (see
/// sched.rs). A running thread got to its CPU by its last switch-in, so the programs that
/// later want that time run on the same CPU and find it here, unless it is stale: older
/// than the wait's entry, when the wait returned without sleeping.
#[map]
static RESUMED: PerCpuArray<Resumed> = PerCpuArray::with_max_entries(1, 0);

#[derive(Clone, Copy)]
#[repr(C)]
struct Resumed {
    tid: u64,
    ns: u64,
    /// The thread's context switches then (`task::switches`).
    switches: u64,
}

/// On the target's libc epoll_wait, epoll_pwait and epoll_pwait2 (see `probes::wrappers` in
/// userspace): the iteration ends here.
#[uprobe]
pub fn epoll_call(_ctx: ProbeContext) -> u32 {
    wait_entered(true)
}

/// The same on sys_enter_epoll_wait, _pwait and _pwait2, for a target whose wrappers were
/// not found (a static binary, raw syscalls).
#[tracepoint]
pub fn epoll_enter(_ctx: TracePointContext) -> u32 {
    wait_entered(false)
}

/// The same on the kernel function all three epoll wait syscalls call, where the kernel
/// allows fentry: a trampoline call instead of the uprobe's trap (~1 us on this project's
/// VMs), and no slow path for the host's other syscalls as with the tracepoints.
#[fentry(function = "do_epoll_wait")]
pub fn epoll_fentry(_ctx: FEntryContext) -> u32 {
    wait_entered(false)
}

/// `before_syscall`: a uprobe on the wrapper, which runs before the syscall is entered.
#[inline(always)]
fn wait_entered(before_syscall: bool) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    if other_process(tgid) {
        return 0;
    }
    let now = now();
    let current = task::current();
    let switches = task::switches(current);
    let Some(s) = thread(tid).filter(|s| s.tgid == tgid) else {
        // The first wait of this thread, or a recycled tid. A slot is claimed only for a
        // tracked thread (an untracked one comes back here at every wait), and from here, not
        // in track_thread: the two stack frames together exceed BPF's 512 bytes.
        if track_thread(tgid, tid, now, switches) {
            if let Some(s) = thread(tid) {
                s.hist = claim_histogram(tgid, tid);
            }
        }
        return 0;
    };
    let start = if s.iter_start_ns != 0 { s.iter_start_ns } else { begin_ns(s, tid, switches).unwrap_or(0) };
    if start != 0 {
        let duration = now.saturating_sub(start);
        if s.hist == 0 {
            // A thread userspace found waiting at attach: its histogram starts here.
            s.hist = claim_histogram(tgid, tid);
        }
        record_histogram(s, duration);
        if duration >= threshold_ns() {
            emit_stall(s, tid, start, duration);
        }
    }
    wait(s, now, switches);
    s.wait_runtime_ns = if before_syscall { task::runtime(current).max(1) } else { 0 };
    0
}

/// Attached to the epoll exits only where `LAZY_BEGIN` is off.
#[tracepoint]
pub fn epoll_exit(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    if other_process((id >> 32) as u32) {
        return 0;
    }
    if let Some(s) = thread(id as u32) {
        s.iter_start_ns = now();
        s.flags &= !IN_EPOLL;
    }
    0
}

/// The thread enters a wait: the next iteration starts from nothing.
#[inline(always)]
fn wait(s: &mut ThreadState, now: u64, switches: u64) {
    let begun = s.iter_start_ns != 0;
    s.flags = (s.flags | IN_EPOLL) & !PURGE_AT_SITE;
    s.iter_start_ns = 0;
    s.resume_ns = now;
    s.switches = switches;
    // No call is in flight across an epoll wait: a marker left over is a missed exit (a
    // program the kernel skipped), and would silence the next iteration's accounting.
    s.sys_start_ns = 0;
    s.purge_start_ns = 0;
    s.alloc_depth = 0;
    s.alloc_start_ns = 0;
    s.off_start_ns = 0;
    s.call_sp = 0;
    s.call_ret = 0;
    // Programs add to the components only inside a begun iteration, so an iteration no
    // program saw left them clean: most of a busy server's, and they span cold cache lines.
    if begun {
        s.parts = Components::default();
    }
}

/// Whether a loop thread found outside an iteration has in fact left its epoll wait; if so,
/// its iteration begins, at the time it last got back on CPU. `observed`: the caller saw the
/// thread from outside (the sampler) rather than at a call it makes, which proves it left.
#[inline(always)]
pub fn resumed(s: &mut ThreadState, observed: bool) -> bool {
    resumed_with(s, || task::switches(task::current()), observed)
}

/// `resumed`, for a thread whose context switches before the one going on now are
/// `switches()`: read only once the cheap checks say the thread has left its wait.
///
/// A uprobe on the wrapper marks the wait a few instructions before its syscall; a thread
/// observed in between (preempted on the way back from the probe's trap) has no syscall in
/// its registers yet, and beginning its iteration then would put the wait's sleep inside it.
/// So an observed thread that has run less than `WRAPPER_CPU_NS` since the probe is taken to
/// be still on its way in: a later program begins the iteration (at a switch-in meanwhile, if
/// any: off-CPU time in that first stretch is not counted).
#[inline(always)]
pub fn resumed_with(s: &mut ThreadState, switches: impl FnOnce() -> u64, observed: bool) -> bool {
    if global(&LAZY_BEGIN) == 0 || s.flags & IN_EPOLL == 0 || in_wait() {
        return false;
    }
    if observed && s.wait_runtime_ns != 0 && task::runtime(task::current()).wrapping_sub(s.wait_runtime_ns) < WRAPPER_CPU_NS {
        return false;
    }
    let begin = match begin_ns(s, current_tid(), switches()) {
        Some(0) => return false,
        Some(ns) => ns,
        // Later than the truth, but the thread is running now.
        None => now(),
    };
    s.iter_start_ns = begin;
    s.flags &= !IN_EPOLL;
    true
}

/// Whether the current thread is inside an epoll wait, by its saved registers (false where
/// they cannot be read).
#[inline(always)]
pub fn in_wait() -> bool {
    task_in_wait(task::current())
}

#[inline(always)]
pub fn task_in_wait(t: Task) -> bool {
    task::syscall(t).is_some_and(|nr| global(&EPOLL_SYSCALLS).contains(&nr))
}

/// sched_switch puts a thread back on CPU inside its epoll wait.
#[inline(always)]
pub fn resumed_in_wait(tid: u32, ts: u64, switches: u64) {
    if let Some(r) = RESUMED.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; sched_switch does not nest.
        unsafe { *r = Resumed { tid: tid as u64, ns: ts, switches } };
    }
}

/// When the thread's iteration began: when it entered its wait or, if later, got back on CPU
/// inside it. None if it was switched out since and sched_switch never showed it back in (a
/// thread's context-switch count only moves at a switch-out, so a count that moved since the
/// last switch-in seen means one).
#[inline(always)]
fn begin_ns(s: &ThreadState, tid: u32, switches: u64) -> Option<u64> {
    let (ns, seen) = match RESUMED.get(0) {
        Some(r) if r.tid == tid as u64 && r.ns > s.resume_ns => (r.ns, r.switches),
        _ => (s.resume_ns, s.switches),
    };
    if seen != SWITCHES_UNKNOWN && seen != switches {
        count(counter::LATE_BEGIN);
        return None;
    }
    Some(ns)
}

/// sched_switch puts a loop thread back on CPU: if it is still in its wait, its iteration
/// can start no earlier than now.
#[inline(always)]
pub fn on_cpu(s: &mut ThreadState, ts: u64, switches: u64) {
    if s.iter_start_ns == 0 && s.flags & IN_EPOLL != 0 {
        s.resume_ns = ts;
        s.switches = switches;
    }
}

#[inline(never)]
fn track_thread(tgid: u32, tid: u32, now: u64, switches: u64) -> bool {
    let state = ThreadState {
        tgid,
        flags: IN_EPOLL,
        resume_ns: now,
        switches,
        ..ThreadState::default()
    };
    if THREADS.insert(tid, state, 0).is_err() {
        count(counter::THREADS_FULL);
        return false;
    }
    true
}

#[inline(always)]
fn record_histogram(s: &ThreadState, duration: u64) {
    let Some(h) = histograms(s) else { return };
    if let Some(c) = h.iter.get_mut(hist_slot(duration)) {
        *c += 1;
    }
    if duration > h.iter_max_ns {
        h.iter_max_ns = duration;
    }
}

#[inline(never)]
fn emit_stall(s: &ThreadState, tid: u32, start: u64, duration: u64) {
    let Some(mut entry) = STALLS.reserve::<StallEvent>(0) else {
        count(counter::LOST_STALLS);
        return;
    };
    entry.write(StallEvent {
        pid: s.tgid,
        tid,
        comm: bpf_get_current_comm().unwrap_or([0; TASK_COMM_LEN]),
        start_ns: start,
        duration_ns: duration,
        parts: s.parts,
    });
    entry.submit(0);
}

/// sched_process_exit runs in the exiting thread: forget it so a recycled tid starts clean.
/// Its histogram stays for the summary.
#[tracepoint]
pub fn thread_exit(_ctx: TracePointContext) -> u32 {
    let _ = THREADS.remove(bpf_get_current_pid_tgid() as u32);
    0
}
