//! Purge group: madvise, munmap and mremap, the syscalls through which an allocator hands
//! memory back. Their time inside an iteration is the primary purge signal; allocator uprobes
//! only refine it.
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::bpf_probe_read_user,
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::HashMap,
    programs::{ProbeContext, RetProbeContext, TracePointContext, tracing::StackIdContext},
};
use tracer_common::{
    PurgeCaller, ThreadState, counter, hist_slot, purge_kind, purge_site, stack_kind, thread_flag::PURGE_AT_SITE, tp,
};

use crate::{
    stacks,
    state::{count, cookie, current_iteration, current_thread, current_tid, histograms, now},
};

/// Return addresses of loop threads' purge calls that no call-site probe started, for
/// userspace to probe (`probes::callsites`). An allocator reaches its purges from a handful
/// of places; a full map only leaves later sites unlearned.
#[map]
static PURGE_CALLERS: HashMap<u64, PurgeCaller> = HashMap::with_max_entries(256, 0);

#[tracepoint]
pub fn madvise_enter(ctx: TracePointContext) -> u32 {
    // madvise(addr, len, advice)
    let len = unsafe { ctx.read_at::<u64>(tp::SYS_ENTER_ARG1) }.unwrap_or(0);
    purge_enter(purge_kind::MADVISE, len);
    0
}

#[tracepoint]
pub fn munmap_enter(ctx: TracePointContext) -> u32 {
    // munmap(addr, len)
    let len = unsafe { ctx.read_at::<u64>(tp::SYS_ENTER_ARG1) }.unwrap_or(0);
    purge_enter(purge_kind::MUNMAP, len);
    0
}

#[tracepoint]
pub fn mremap_enter(ctx: TracePointContext) -> u32 {
    // mremap(old_addr, old_len, new_len, ...): only a shrink releases memory.
    let old_len = unsafe { ctx.read_at::<u64>(tp::SYS_ENTER_ARG1) }.unwrap_or(0);
    let new_len = unsafe { ctx.read_at::<u64>(tp::SYS_ENTER_ARG2) }.unwrap_or(0);
    purge_enter(purge_kind::MREMAP, old_len.saturating_sub(new_len));
    0
}

/// On the target's libc madvise, munmap and mremap; the attach cookie says which
/// (`purge_kind`). Stepped where the wrapper has no emulated instruction before its syscall,
/// and then only until call-site probes start its calls (`purge_site`).
#[uprobe]
pub fn purge_call(ctx: ProbeContext) -> u32 {
    let Some(s) = current_iteration() else { return 0 };
    // A call-site probe started this call a jump ago.
    if s.flags & PURGE_AT_SITE != 0 {
        return 0;
    }
    let kind = cookie(&ctx);
    purge_start(s, kind, purge_len(&ctx, kind));
    stacks::remember_call(s);
    0
}

/// On a `call` of a purge wrapper that userspace learned from `PURGE_CALLERS`: the arguments
/// are in their registers already.
#[uprobe]
pub fn purge_site(ctx: ProbeContext) -> u32 {
    let Some(s) = current_iteration() else { return 0 };
    let kind = cookie(&ctx);
    purge_start(s, kind, purge_len(&ctx, kind));
    s.flags |= PURGE_AT_SITE;
    0
}

#[uretprobe]
pub fn purge_return(ctx: RetProbeContext) -> u32 {
    let Some(s) = current_thread() else { return 0 };
    purge_done(&ctx, s, true)
}

/// On a wrapper's first emulated instruction after its syscall (see `purge_site` in
/// tracer-common): the call is over, and the wrapper has not moved the stack pointer, so
/// the return address is at it. A call no call-site probe started is learned here.
#[uprobe]
pub fn purge_returned(ctx: ProbeContext) -> u32 {
    let Some(s) = current_thread() else { return 0 };
    if s.flags & PURGE_AT_SITE == 0 {
        learn_caller(&ctx);
        if s.purge_start_ns != 0 {
            count(counter::STEPPED_PURGES);
        } else if s.iter_start_ns != 0 {
            count(counter::UNTIMED_PURGES);
        }
    }
    s.flags &= !PURGE_AT_SITE;
    purge_done(&ctx, s, false)
}

/// Shared by the three sys_exit tracepoints: the entry remembered which call it was.
#[tracepoint]
pub fn purge_exit(ctx: TracePointContext) -> u32 {
    let Some(s) = current_thread() else { return 0 };
    // Still inside the syscall: the user registers are those of the madvise call site.
    purge_done(&ctx, s, true)
}

/// The bytes a purge call releases: `len` of madvise and munmap, what a mremap shrinks by.
#[inline(always)]
fn purge_len(ctx: &ProbeContext, kind: u64) -> u64 {
    let arg = |n| ctx.arg::<u64>(n).unwrap_or(0);
    if kind == purge_kind::MREMAP { arg(1).saturating_sub(arg(2)) } else { arg(1) }
}

#[inline(always)]
fn learn_caller(ctx: &ProbeContext) {
    // SAFETY: a uprobe's context is the user registers at the probe.
    let (sp, ip) = unsafe { ((*ctx.regs).rsp, (*ctx.regs).rip) };
    let Ok(ret) = (unsafe { bpf_probe_read_user(sp as *const u64) }) else { return };
    if unsafe { PURGE_CALLERS.get(&ret) }.is_some() {
        return;
    }
    let c = cookie(ctx);
    let caller = PurgeCaller { wrapper: ip.wrapping_sub(purge_site::offset(c)), kind: purge_site::kind(c) };
    let _ = PURGE_CALLERS.insert(&ret, &caller, BPF_NOEXIST as u64);
}

/// `at_call`: the registers are no longer the wrapper's (a uretprobe's trampoline, a
/// tracepoint in the kernel), so a stack is unwound from the call remembered at entry.
#[inline(always)]
fn purge_done<C: EbpfContext + StackIdContext>(ctx: &C, s: &mut ThreadState, at_call: bool) -> u32 {
    if s.purge_start_ns == 0 {
        return 0;
    }
    let elapsed = now().saturating_sub(s.purge_start_ns);
    s.purge_start_ns = 0;
    let p = &mut s.parts;
    let (calls, ns, bytes) = match s.purge_kind {
        purge_kind::MUNMAP => (&mut p.munmap_calls, &mut p.munmap_ns, &mut p.munmap_bytes),
        purge_kind::MREMAP => (&mut p.mremap_calls, &mut p.mremap_ns, &mut p.mremap_bytes),
        _ => (&mut p.madvise_calls, &mut p.madvise_ns, &mut p.madvise_bytes),
    };
    *calls += 1;
    *ns += elapsed;
    *bytes += s.purge_len;
    if let Some(h) = histograms(s) {
        if let Some(c) = h.purge.get_mut(hist_slot(elapsed)) {
            *c += 1;
        }
        h.purge_bytes += s.purge_len;
    }
    if stacks::slow(elapsed) {
        stacks::capture(ctx, s, current_tid(), stack_kind::PURGE, elapsed, at_call);
    }
    stacks::forget_call(s);
    0
}

/// Starts timing a purge call inside an iteration; the thread's state, if it did.
#[inline(always)]
fn purge_enter(kind: u64, len: u64) -> Option<&'static mut ThreadState> {
    let s = current_iteration()?;
    purge_start(s, kind, len);
    Some(s)
}

#[inline(always)]
fn purge_start(s: &mut ThreadState, kind: u64, len: u64) {
    s.purge_len = len;
    s.purge_kind = kind;
    s.purge_start_ns = now();
}
