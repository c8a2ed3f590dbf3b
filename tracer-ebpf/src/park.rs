//! Park group: for every thread of a watched process, when it went to sleep and the last
//! wakeup it was sent. A pool whose workers are all asleep and nobody is waking them is
//! starved (or deadlocked); that is decided in userspace from this state.
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use tracer_common::{ParkState, TASK_COMM_LEN};

use crate::state::{global, now};

#[map]
pub static PARKED: HashMap<u32, ParkState> = HashMap::with_max_entries(65536, 0);

#[unsafe(no_mangle)]
static PARK_ON: u64 = 0;
#[unsafe(no_mangle)]
static WAKING_PID_OFF: u64 = 24;

#[inline(always)]
fn entry(tid: u32) -> Option<&'static mut ParkState> {
    // SAFETY: each field is a plain store; a torn read in userspace is corrected next poll.
    PARKED.get_ptr_mut(tid).map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub fn enabled() -> bool {
    global(&PARK_ON) != 0
}

/// From sched_switch: `prev` goes to sleep (or is preempted), `next` runs.
#[inline(always)]
pub fn on_switch(prev: u32, prev_sleeps: bool, next: u32, ts: u64) {
    if let Some(p) = entry(prev) {
        p.parked_since_ns = if prev_sleeps { ts } else { 0 };
    }
    if let Some(n) = entry(next) {
        n.parked_since_ns = 0;
    }
}

/// sched_waking runs in the waker's context: the current task is who sent the wakeup.
#[tracepoint]
pub fn thread_waking(ctx: TracePointContext) -> u32 {
    let off = global(&WAKING_PID_OFF) as usize;
    let Ok(wakee) = (unsafe { ctx.read_at::<u32>(off) }) else { return 0 };
    let Some(p) = entry(wakee) else { return 0 };
    let id = bpf_get_current_pid_tgid();
    p.last_wakeup_ns = now();
    p.waker_tid = id as u32;
    p.waker_tgid = (id >> 32) as u32;
    p.waker_comm = bpf_get_current_comm().unwrap_or([0; TASK_COMM_LEN]);
    p.wakeups += 1;
    0
}
