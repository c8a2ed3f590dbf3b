//! Sched group: off-CPU time inside an iteration, split into runnable (preempted, waiting for a
//! CPU) and blocked (sleeping on I/O, a lock, a timer).
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use tracer_common::thread_flag::OFF_RUNNABLE;

use crate::{
    park,
    state::{current_iteration, current_tid, global, now, thread},
};

/// Field offsets in the sched_switch record (`tracer_common::globals`), read from tracefs by
/// userspace: they have moved between kernel versions.
#[unsafe(no_mangle)]
static SCHED_PREV_STATE_OFF: u64 = 32;
#[unsafe(no_mangle)]
static SCHED_NEXT_PID_OFF: u64 = 56;

/// prev_state is 0 (TASK_RUNNING) or TASK_REPORT_MAX (0x100, preempted) when the task could
/// still run; TASK_REPORT_IDLE (0x80) and the low bits are sleeping states.
const SLEEPING_STATES: i64 = 0xff;

#[tracepoint]
pub fn sched_switch(ctx: TracePointContext) -> u32 {
    let ts = now();
    let state_off = global(&SCHED_PREV_STATE_OFF) as usize;
    let sleeps = unsafe { ctx.read_at::<i64>(state_off) }.unwrap_or(1) & SLEEPING_STATES != 0;
    let next_off = global(&SCHED_NEXT_PID_OFF) as usize;
    let next = unsafe { ctx.read_at::<u32>(next_off) }.unwrap_or(0);
    switch_out(sleeps, ts);
    switch_in(next, ts);
    if park::enabled() {
        park::on_switch(current_tid(), sleeps, next, ts);
    }
    0
}

#[inline(always)]
fn switch_out(sleeps: bool, ts: u64) {
    // The tracepoint runs in the context of the task being switched out.
    let Some(s) = current_iteration() else { return };
    if sleeps {
        s.flags &= !OFF_RUNNABLE;
    } else {
        s.flags |= OFF_RUNNABLE;
    }
    s.off_start_ns = ts;
}

#[inline(always)]
fn switch_in(next: u32, ts: u64) {
    let Some(s) = thread(next) else { return };
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
