//! Alloc group: uprobes on the allocator's entry points (realloc and friends) in whichever
//! object really defines them for the target. Userspace finds that object; these programs only
//! time the outermost call and subtract the syscall time nested in it.
use aya_ebpf::{
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{ThreadState, hist_slot, stack_kind};

use crate::{
    stacks,
    state::{current_iteration, current_thread, current_tid, histograms, now},
};

#[uprobe]
pub fn alloc_enter(_ctx: ProbeContext) -> u32 {
    // User code runs only once epoll has returned: this may begin the iteration.
    let Some(s) = current_iteration() else { return 0 };
    s.alloc_depth += 1;
    if s.alloc_depth == 1 {
        s.alloc_nested_at_entry_ns = nested_ns(s);
        s.alloc_start_ns = now();
    }
    0
}

#[uretprobe]
pub fn alloc_exit(ctx: RetProbeContext) -> u32 {
    let Some(s) = current_thread() else { return 0 };
    if s.alloc_depth == 0 {
        return 0;
    }
    s.alloc_depth -= 1;
    if s.alloc_depth != 0 || s.alloc_start_ns == 0 {
        return 0;
    }
    let wall = now().saturating_sub(s.alloc_start_ns);
    let nested = nested_ns(s).saturating_sub(s.alloc_nested_at_entry_ns);
    s.alloc_start_ns = 0;
    let own = wall.saturating_sub(nested);
    s.parts.alloc_calls += 1;
    s.parts.alloc_ns += own;
    if let Some(c) = histograms(s).and_then(|h| h.alloc.get_mut(hist_slot(own))) {
        *c += 1;
    }
    if stacks::slow(own) {
        // At the return the allocator's frames are gone: the stack starts at its caller.
        stacks::capture(&ctx, s, current_tid(), stack_kind::ALLOC, own, false);
    }
    0
}

/// Time already accounted to syscalls; what of it accrues during an allocator call is not the
/// allocator's own.
#[inline(always)]
fn nested_ns(s: &ThreadState) -> u64 {
    s.parts.madvise_ns + s.parts.munmap_ns + s.parts.mremap_ns + s.parts.syscall_ns
}
