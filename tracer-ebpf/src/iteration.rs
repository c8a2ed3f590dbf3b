//! Loop group: an iteration is the busy time from an epoll wait's return to the next wait.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{
    Components, StallEvent, TASK_COMM_LEN, ThreadState, counter, hist_slot,
    thread_flag::IN_EPOLL,
};

use crate::state::{
    ITER_HIST, STALLS, THREADS, ZERO_HIST, count, current_thread, histograms, now, other_process, threshold_ns,
};

/// Attached to sys_enter_epoll_wait, _pwait and _pwait2: the iteration ends here.
#[tracepoint]
pub fn epoll_enter(_ctx: TracePointContext) -> u32 {
    let Some(s) = current_thread() else { return 0 };
    let start = s.iter_start_ns;
    s.iter_start_ns = 0;
    s.flags |= IN_EPOLL;
    if start == 0 {
        return 0;
    }
    let duration = now().saturating_sub(start);
    let tid = bpf_get_current_pid_tgid() as u32;
    record_histogram(tid, duration);
    if duration >= threshold_ns() {
        emit_stall(s, tid, start, duration);
    }
    0
}

/// Attached to sys_exit_epoll_wait, _pwait and _pwait2: the next iteration starts here.
#[tracepoint]
pub fn epoll_exit(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    if other_process(tgid) {
        return 0;
    }
    let now = now();
    match current_thread() {
        Some(s) if s.tgid == tgid => begin_iteration(s, now),
        // The first return for this thread, or a recycled tid.
        _ => track_thread(tgid, tid, now),
    }
    0
}

#[inline(always)]
fn begin_iteration(s: &mut ThreadState, now: u64) {
    s.flags &= !IN_EPOLL;
    s.iter_start_ns = now;
    s.sys_start_ns = 0;
    s.purge_start_ns = 0;
    // epoll is never called from inside the allocator: a depth left over is a missed return.
    s.alloc_depth = 0;
    s.alloc_start_ns = 0;
    s.off_start_ns = 0;
    s.parts = Components::default();
}

#[inline(never)]
fn track_thread(tgid: u32, tid: u32, now: u64) {
    let state = ThreadState {
        tgid,
        iter_start_ns: now,
        ..ThreadState::default()
    };
    if THREADS.insert(tid, state, 0).is_err() {
        count(counter::THREADS_FULL);
        return;
    }
    new_histogram(tgid, tid);
}

/// A histogram does not fit on the 512-byte BPF stack: insert a copy of an all-zero map value
/// and fill in the header in place.
#[inline(never)]
fn new_histogram(tgid: u32, tid: u32) {
    let Some(zero) = ZERO_HIST.get(0) else { return };
    if ITER_HIST.insert(tid, zero, BPF_NOEXIST as u64).is_err() {
        return;
    }
    if let Some(h) = ITER_HIST.get_ptr_mut(tid) {
        // SAFETY: just inserted for the calling thread.
        let h = unsafe { &mut *h };
        h.tgid = tgid;
        h.comm = bpf_get_current_comm().unwrap_or([0; TASK_COMM_LEN]);
    }
}

#[inline(always)]
fn record_histogram(tid: u32, duration: u64) {
    let Some(h) = histograms(tid) else { return };
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
