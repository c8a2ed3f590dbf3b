//! Syscalls group: on-CPU time in every syscall other than epoll and the purge group's (those
//! have programs of their own), with the costliest syscalls of the iteration by wall time.
use aya_ebpf::{
    macros::{map, tracepoint},
    maps::PerCpuHashMap,
    programs::TracePointContext,
};
use tracer_common::{
    CONN_SYSCALLS_LEN, Components, SKIP_SYSCALLS_LEN, TOP_SYSCALLS, TargetStats, ThreadState, stack_kind, tp,
};

use crate::{
    stacks,
    state::{current_iteration, current_thread, current_tid, global, now},
};

/// Syscall numbers of this architecture left to other groups; filled in by userspace,
/// u64::MAX marks an unused slot.
#[unsafe(no_mangle)]
static SKIP_SYSCALLS: [u64; SKIP_SYSCALLS_LEN] = [u64::MAX; SKIP_SYSCALLS_LEN];

/// Connection set-up and tear-down syscalls, accounted apart from the others.
#[unsafe(no_mangle)]
static CONN_SYSCALLS: [u64; CONN_SYSCALLS_LEN] = [u64::MAX; CONN_SYSCALLS_LEN];

#[unsafe(no_mangle)]
static ACCEPT_SYSCALLS: [u64; 2] = [u64::MAX; 2];

/// Accepts per target, for the accept rate; userspace inserts the entry.
#[map]
pub static TARGET_STATS: PerCpuHashMap<u32, TargetStats> = PerCpuHashMap::with_max_entries(1024, 0);

/// raw_syscalls:sys_enter: every syscall (the syscalls group).
#[tracepoint]
pub fn sys_enter(ctx: TracePointContext) -> u32 {
    let Some(s) = current_iteration() else { return 0 };
    let Ok(nr) = (unsafe { ctx.read_at::<u64>(tp::RAW_SYS_ID) }) else { return 0 };
    if !skipped(nr) {
        begin(s, nr);
    }
    0
}

/// syscalls:sys_enter_<accept4, close, epoll_ctl...>: only the connection syscalls, so the
/// net group accounts them without paying for every syscall on the host.
#[tracepoint]
pub fn conn_enter(ctx: TracePointContext) -> u32 {
    let Some(s) = current_iteration() else { return 0 };
    if let Ok(nr) = unsafe { ctx.read_at::<i32>(tp::SYS_NR) } {
        begin(s, nr as u64);
    }
    0
}

#[inline(always)]
fn begin(s: &mut ThreadState, nr: u64) {
    s.sys_nr = nr;
    s.sys_off_ns = 0;
    s.sys_start_ns = now();
}

/// raw_syscalls:sys_exit, and the connection syscalls' own exits (same record layout).
#[tracepoint]
pub fn sys_exit(ctx: TracePointContext) -> u32 {
    let Some(s) = current_thread() else { return 0 };
    if s.sys_start_ns == 0 {
        return 0;
    }
    let wall = now().saturating_sub(s.sys_start_ns);
    s.sys_start_ns = 0;
    // Off-CPU time inside the call is the sched group's; the ranking keeps it so the syscall
    // a thread slept in is named.
    let on_cpu = wall.saturating_sub(s.sys_off_ns);
    let nr = s.sys_nr;
    if contains(&global(&CONN_SYSCALLS), nr) {
        s.parts.conn_calls += 1;
        s.parts.conn_ns += on_cpu;
        let accepted = unsafe { ctx.read_at::<i64>(tp::SYS_EXIT_RET) }.is_ok_and(|fd| fd >= 0);
        if accepted && contains(&global(&ACCEPT_SYSCALLS), nr) {
            s.parts.accepts += 1;
            count_accept(s.tgid);
        }
    } else {
        s.parts.syscall_calls += 1;
        s.parts.syscall_ns += on_cpu;
    }
    add_top(&mut s.parts, nr, wall);
    if stacks::slow(wall) {
        stacks::capture(&ctx, s, current_tid(), stack_kind::SYSCALL, wall);
    }
    0
}

#[inline(always)]
fn count_accept(tgid: u32) {
    if let Some(t) = TARGET_STATS.get_ptr_mut(tgid) {
        // SAFETY: per-CPU value.
        unsafe { (*t).accepts += 1 };
    }
}

#[inline(always)]
fn skipped(nr: u64) -> bool {
    contains(&global(&SKIP_SYSCALLS), nr)
}

#[inline(always)]
fn contains<const N: usize>(set: &[u64; N], nr: u64) -> bool {
    let mut i = 0;
    while i < N {
        if set[i] == nr {
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
