//! Syscalls group: time in every syscall other than epoll, the purge group's and the
//! connection ones (those have programs of their own), with the costliest syscalls of the
//! iteration. A probe on every syscall would cost each syscall of the host ~100 ns, so none
//! is attached: the sampler (`stacks::stall_sample`) reads which syscall a loop thread is in
//! while on CPU, and sched_switch which one it went off CPU in (exact off-CPU time).
use aya_ebpf::{
    EbpfContext,
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::PerCpuHashMap,
    programs::{ProbeContext, RetProbeContext, TracePointContext, tracing::StackIdContext},
};
use tracer_common::{
    CONN_SYSCALLS_LEN, Components, SKIP_SYSCALLS_LEN, TOP_SYSCALLS, TargetStats, ThreadState, stack_kind, tp,
};

use crate::{
    stacks,
    state::{cookie, current_iteration, current_thread, current_tid, global, now},
    task,
};

#[unsafe(no_mangle)]
static SYSCALLS_ON: u64 = 0;

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

/// On the target's libc accept4, close, setsockopt...; the attach cookie is the syscall's
/// number.
#[uprobe]
pub fn conn_call(ctx: ProbeContext) -> u32 {
    let Some(s) = current_iteration() else { return 0 };
    begin(s, cookie(&ctx));
    stacks::remember_call(s);
    0
}

#[uretprobe]
pub fn conn_return(ctx: RetProbeContext) -> u32 {
    // libc returns the new descriptor, or -1 with errno set.
    let accepted = ctx.ret::<i64>() >= 0;
    conn_done(&ctx, accepted)
}

/// syscalls:sys_enter_<accept4, close, setsockopt...>, where the wrappers were not found:
/// only the connection syscalls, so the net group accounts them without a program on every
/// syscall of the host.
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

/// The connection syscalls' exits.
#[tracepoint]
pub fn conn_exit(ctx: TracePointContext) -> u32 {
    let accepted = unsafe { ctx.read_at::<i64>(tp::SYS_EXIT_RET) }.is_ok_and(|fd| fd >= 0);
    conn_done(&ctx, accepted)
}

#[inline(always)]
fn conn_done<C: EbpfContext + StackIdContext>(ctx: &C, accepted: bool) -> u32 {
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
    s.parts.conn_calls += 1;
    s.parts.conn_ns += on_cpu;
    if accepted && contains(&global(&ACCEPT_SYSCALLS), nr) {
        s.parts.accepts += 1;
        count_accept(s.tgid);
    }
    add_top(&mut s.parts, nr, wall);
    if stacks::slow(wall) {
        stacks::capture(ctx, s, current_tid(), stack_kind::SYSCALL, wall, true);
    }
    stacks::forget_call(s);
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
pub fn enabled() -> bool {
    global(&SYSCALLS_ON) != 0
}

/// The syscall the current thread is inside, when it is this group's to account: the group
/// is on, and the call is not another group's (a purge or connection call being timed, or a
/// syscall on the skip list).
#[inline(always)]
pub fn current_other(s: &ThreadState) -> Option<u64> {
    if !enabled() || s.purge_start_ns != 0 || s.sys_start_ns != 0 {
        return None;
    }
    task::current_syscall().filter(|nr| !contains(&global(&SKIP_SYSCALLS), *nr))
}

/// One sampler tick found the thread on CPU in syscall `nr`. The per-request connection
/// calls the net group leaves untimed (epoll_ctl, fcntl...) still count as connection work.
#[inline(always)]
pub fn sampled(s: &mut ThreadState, nr: u64, period_ns: u64) {
    if contains(&global(&CONN_SYSCALLS), nr) {
        s.parts.conn_ns += period_ns;
    } else {
        s.parts.syscall_samples += 1;
        s.parts.syscall_ns += period_ns;
    }
    add_top(&mut s.parts, nr, period_ns);
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
pub fn add_top(p: &mut Components, nr: u64, ns: u64) {
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
