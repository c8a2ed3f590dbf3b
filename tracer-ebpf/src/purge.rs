//! Purge group: madvise and munmap, the syscalls through which an allocator hands memory back.
//! Their time inside an iteration is the primary purge signal; allocator uprobes only refine it.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use tracer_common::tp;

use crate::state::{current_iteration, current_thread, now};

#[tracepoint]
pub fn madvise_enter(ctx: TracePointContext) -> u32 {
    purge_enter(&ctx, false)
}

#[tracepoint]
pub fn munmap_enter(ctx: TracePointContext) -> u32 {
    purge_enter(&ctx, true)
}

/// Shared by sys_exit_madvise and sys_exit_munmap: the entry remembered which one it was.
#[tracepoint]
pub fn purge_exit(_ctx: TracePointContext) -> u32 {
    let Some(s) = current_thread() else { return 0 };
    if s.purge_start_ns == 0 {
        return 0;
    }
    let elapsed = now().saturating_sub(s.purge_start_ns);
    s.purge_start_ns = 0;
    let p = &mut s.parts;
    if s.purge_is_munmap != 0 {
        p.munmap_calls += 1;
        p.munmap_ns += elapsed;
        p.munmap_bytes += s.purge_len;
    } else {
        p.madvise_calls += 1;
        p.madvise_ns += elapsed;
        p.madvise_bytes += s.purge_len;
    }
    0
}

#[inline(always)]
fn purge_enter(ctx: &TracePointContext, munmap: bool) -> u32 {
    let Some(s) = current_iteration() else { return 0 };
    // Both syscalls take (addr, len, ...): the length is the second argument.
    s.purge_len = unsafe { ctx.read_at::<u64>(tp::SYS_ENTER_ARG1) }.unwrap_or(0);
    s.purge_is_munmap = munmap as u64;
    s.purge_start_ns = now();
    0
}
