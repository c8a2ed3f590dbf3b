//! Sched group: off-CPU time inside an iteration, split into runnable (preempted, waiting for a
//! CPU) and blocked (sleeping on I/O, a lock, a timer).
//!
//! sched_switch fires on every context switch of the host, so it is a tp_btf program (no
//! record is formatted for it, and task fields are plain loads) and leaves after two tgid
//! compares unless the target is switching out or in: no map is touched for anybody else.
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use tracer_common::thread_flag::OFF_RUNNABLE;

use crate::{
    iteration, park, syscalls,
    state::{current_tgid, current_thread, current_tid, now, other_process, thread},
    task::{self, Task},
};

/// TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next, ...)
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> u32 {
    // The tracepoint runs in the context of prev, the task being switched out.
    let prev_ours = !other_process(current_tgid());
    let next: Task = ctx.arg(2);
    let next_ours = !other_process(task::tgid(next));
    // This runs under the CPU's runqueue lock, which a wakeup sent to that CPU may wait for.
    // The common case, a loop thread sleeping in its epoll wait and woken in it (between
    // iterations: nothing to account), looks up no hash map.
    if prev_ours {
        let preempt: u64 = ctx.arg(0);
        let sleeps = preempt & 1 == 0 && task::sleeping(ctx.arg(1));
        if !iteration::in_wait() {
            // schedule() has already counted the switch being made.
            switch_out(|| task::switches(ctx.arg(1)).wrapping_sub(1), sleeps, now());
        }
        if park::enabled() {
            park::on_switch_out(current_tid(), sleeps, now());
        }
    }
    if next_ours {
        let tid = task::tid(next);
        let ts = now();
        if iteration::task_in_wait(next) {
            iteration::resumed_in_wait(tid, ts, task::switches(next));
        } else {
            switch_in(next, tid, ts);
        }
        if park::enabled() {
            park::on_switch_in(tid);
        }
    }
    0
}

#[inline(always)]
fn switch_out(switches: impl FnOnce() -> u64, sleeps: bool, ts: u64) {
    let Some(s) = current_thread() else { return };
    if s.iter_start_ns == 0 && !iteration::resumed_with(s, switches, true) {
        return;
    }
    if sleeps {
        s.flags &= !OFF_RUNNABLE;
    } else {
        s.flags |= OFF_RUNNABLE;
    }
    s.off_start_ns = ts;
    s.off_syscall = syscalls::current_other(s).map_or(0, |nr| nr + 1);
}

#[inline(always)]
fn switch_in(next: Task, tid: u32, ts: u64) {
    let Some(s) = thread(tid) else { return };
    iteration::on_cpu(s, ts, task::switches(next));
    if s.off_start_ns == 0 {
        return;
    }
    let off_ns = ts.saturating_sub(s.off_start_ns);
    s.off_start_ns = 0;
    if s.iter_start_ns == 0 {
        return;
    }
    if s.sys_start_ns != 0 {
        s.sys_off_ns += off_ns;
    }
    if s.off_syscall != 0 {
        syscalls::add_top(&mut s.parts, s.off_syscall - 1, off_ns);
        s.off_syscall = 0;
    }
    // Waiting inside madvise or the allocator is theirs to answer for, not the scheduler's.
    if s.purge_start_ns != 0 || s.alloc_depth != 0 {
        return;
    }
    if s.flags & OFF_RUNNABLE != 0 {
        s.parts.runnable_ns += off_ns;
    } else {
        s.parts.blocked_ns += off_ns;
    }
}
