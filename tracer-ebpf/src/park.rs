//! Park group: for every thread of a watched process, when it went to sleep and the last
//! wakeup it was sent. A pool whose workers are all asleep and nobody is waking them is
//! starved (or deadlocked); that is decided in userspace from this state.
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap},
    programs::BtfTracePointContext,
};
use tracer_common::{ParkState, TASK_COMM_LEN};

use crate::{
    state::{global, now, other_process},
    task::{self, Task},
};

#[map]
pub static PARKED: HashMap<u32, ParkState> = HashMap::with_max_entries(65536, 0);

/// How many entries `PARKED` holds, kept by userspace. A lone event loop has no namesake
/// to starve with, so a process like Redis has none, and this one array read (inlined by the
/// verifier) spares the hash lookups in sched_switch and sched_waking: both run in the
/// request path (see `task::read`).
#[map]
pub static PARK_WATCHED: Array<u32> = Array::with_max_entries(1, 0);

#[unsafe(no_mangle)]
static PARK_ON: u64 = 0;

#[inline(always)]
fn entry(tid: u32) -> Option<&'static mut ParkState> {
    // SAFETY: each field is a plain store; a torn read in userspace is corrected next poll.
    PARKED.get_ptr_mut(tid).map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub fn enabled() -> bool {
    global(&PARK_ON) != 0 && PARK_WATCHED.get(0).is_some_and(|n| *n != 0)
}

/// From sched_switch, for a thread of the target: it goes to sleep (or is preempted).
#[inline(always)]
pub fn on_switch_out(tid: u32, sleeps: bool, ts: u64) {
    if let Some(p) = entry(tid) {
        p.parked_since_ns = if sleeps { ts } else { 0 };
    }
}

/// From sched_switch, for a thread of the target: it runs.
#[inline(always)]
pub fn on_switch_in(tid: u32) {
    if let Some(p) = entry(tid) {
        p.parked_since_ns = 0;
    }
}

/// sched_waking(struct task_struct *p) runs in the waker's context: the current task is who
/// sent the wakeup. A tp_btf program for the same reason as sched_switch: it fires for every
/// wakeup on the host.
#[btf_tracepoint(function = "sched_waking")]
pub fn thread_waking(ctx: BtfTracePointContext) -> u32 {
    if !enabled() {
        return 0;
    }
    let wakee: Task = ctx.arg(0);
    if other_process(task::tgid(wakee)) {
        return 0;
    }
    let Some(p) = entry(task::tid(wakee)) else { return 0 };
    let id = bpf_get_current_pid_tgid();
    p.last_wakeup_ns = now();
    // A thread is mostly woken by the same few: copy the name only when the waker changes.
    if p.waker_tid != id as u32 || p.wakeups == 0 {
        p.waker_tid = id as u32;
        p.waker_tgid = (id >> 32) as u32;
        p.waker_comm = bpf_get_current_comm().unwrap_or([0; TASK_COMM_LEN]);
    }
    p.wakeups += 1;
    0
}
