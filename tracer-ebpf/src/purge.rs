//! Purge group: madvise, munmap and mremap, the syscalls through which an allocator hands
//! memory back. Their time inside an iteration is the primary purge signal; allocator uprobes
//! only refine it.
use aya_ebpf::{
    EbpfContext,
    macros::{tracepoint, uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext, TracePointContext, tracing::StackIdContext},
};
use tracer_common::{ThreadState, hist_slot, purge_kind, stack_kind, tp};

use crate::{
    stacks,
    state::{cookie, current_iteration, current_thread, current_tid, histograms, now},
};

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
/// (`purge_kind`).
#[uprobe]
pub fn purge_call(ctx: ProbeContext) -> u32 {
    let kind = cookie(&ctx);
    let arg = |n| ctx.arg::<u64>(n).unwrap_or(0);
    let len = if kind == purge_kind::MREMAP { arg(1).saturating_sub(arg(2)) } else { arg(1) };
    if let Some(s) = purge_enter(kind, len) {
        stacks::remember_call(s);
    }
    0
}

#[uretprobe]
pub fn purge_return(ctx: RetProbeContext) -> u32 {
    purge_done(&ctx)
}

/// Shared by the three sys_exit tracepoints: the entry remembered which call it was.
#[tracepoint]
pub fn purge_exit(ctx: TracePointContext) -> u32 {
    // Still inside the syscall: the user registers are those of the madvise call site.
    purge_done(&ctx)
}

#[inline(always)]
fn purge_done<C: EbpfContext + StackIdContext>(ctx: &C) -> u32 {
    let Some(s) = current_thread() else { return 0 };
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
    if let Some(h) = histograms(current_tid()) {
        if let Some(c) = h.purge.get_mut(hist_slot(elapsed)) {
            *c += 1;
        }
        h.purge_bytes += s.purge_len;
    }
    if stacks::slow(elapsed) {
        stacks::capture(ctx, s, current_tid(), stack_kind::PURGE, elapsed, true);
    }
    stacks::forget_call(s);
    0
}

/// Starts timing a purge call inside an iteration; the thread's state, if it did.
#[inline(always)]
fn purge_enter(kind: u64, len: u64) -> Option<&'static mut ThreadState> {
    let s = current_iteration()?;
    s.purge_len = len;
    s.purge_kind = kind;
    s.purge_start_ns = now();
    Some(s)
}
