//! Syscalls group: on-CPU time in every syscall other than epoll and the purge group's (those
//! have programs of their own), with the costliest syscalls of the iteration by wall time.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use tracer_common::{Components, SKIP_SYSCALLS_LEN, TOP_SYSCALLS, tp};

use crate::state::{current_iteration, current_thread, now};

/// Syscall numbers of this architecture left to other groups; filled in by userspace,
/// u64::MAX marks an unused slot.
#[unsafe(no_mangle)]
static SKIP_SYSCALLS: [u64; SKIP_SYSCALLS_LEN] = [u64::MAX; SKIP_SYSCALLS_LEN];

#[tracepoint]
pub fn sys_enter(ctx: TracePointContext) -> u32 {
    let Some(s) = current_iteration() else { return 0 };
    let Ok(nr) = (unsafe { ctx.read_at::<u64>(tp::RAW_SYS_ID) }) else { return 0 };
    if skipped(nr) {
        return 0;
    }
    s.sys_nr = nr;
    s.sys_off_ns = 0;
    s.sys_start_ns = now();
    0
}

#[tracepoint]
pub fn sys_exit(_ctx: TracePointContext) -> u32 {
    let Some(s) = current_thread() else { return 0 };
    if s.sys_start_ns == 0 {
        return 0;
    }
    let wall = now().saturating_sub(s.sys_start_ns);
    s.sys_start_ns = 0;
    s.parts.syscall_calls += 1;
    // Off-CPU time inside the call is the sched group's; the ranking keeps it so the syscall
    // a thread slept in is named.
    s.parts.syscall_ns += wall.saturating_sub(s.sys_off_ns);
    add_top(&mut s.parts, s.sys_nr, wall);
    0
}

#[inline(always)]
fn skipped(nr: u64) -> bool {
    let skip = unsafe { core::ptr::read_volatile(&SKIP_SYSCALLS) };
    let mut i = 0;
    while i < SKIP_SYSCALLS_LEN {
        if skip[i] == nr {
            return true;
        }
        i += 1;
    }
    false
}

/// Adds to the syscall's slot, takes a free one, or evicts the cheapest if this call alone
/// costs more: a bounded table, so the verifier sees a fixed loop.
#[inline(always)]
fn add_top(p: &mut Components, nr: u64, ns: u64) {
    let key = nr as u32 + 1;
    let mut cheapest = 0;
    let mut i = 0;
    while i < TOP_SYSCALLS {
        if p.top_nr[i] == key || p.top_nr[i] == 0 {
            p.top_nr[i] = key;
            p.top_ns[i] += ns;
            return;
        }
        if p.top_ns[i] < p.top_ns[cheapest] {
            cheapest = i;
        }
        i += 1;
    }
    if ns > p.top_ns[cheapest] {
        p.top_nr[cheapest] = key;
        p.top_ns[cheapest] = ns;
    }
}
