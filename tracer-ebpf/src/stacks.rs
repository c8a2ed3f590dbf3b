//! Stacks group: where a stall's time goes, captured only when it is already known to matter
//! (a slow call has returned, or the iteration is past its threshold), so normal iterations
//! cost nothing. Distro binaries have no frame pointers, so the kernel sends registers and the
//! top of the user stack, and userspace unwinds them from .eh_frame.
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_probe_read_user, bpf_probe_read_user_buf},
    macros::{map, perf_event},
    maps::{RingBuf, StackTrace},
    programs::{PerfEventContext, tracing::StackIdContext},
};
use tracer_common::{STACK_BYTES, StackEvent, ThreadState, counter, stack_kind};

use crate::{
    state::{count, current_tid, global, now, observed_iteration, threshold_ns},
    syscalls, task,
};

/// 16 KiB records, a few per slow call or sampled stall, drained every 100 ms: 4 MiB (256
/// records) rides out a burst.
#[map]
pub static STACK_EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

#[map]
pub static KSTACKS: StackTrace = StackTrace::with_max_entries(4096, 0);

#[unsafe(no_mangle)]
static STACKS_ON: u64 = 0;
#[unsafe(no_mangle)]
static STACK_MIN_NS: u64 = 1_000_000;
#[unsafe(no_mangle)]
static SAMPLE_PERIOD_NS: u64 = 10_000_000;
#[unsafe(no_mangle)]
static STACK_EVERY_NS: u64 = 10_000_000;
#[unsafe(no_mangle)]
static PT_REGS_IP_OFF: u64 = 128;
#[unsafe(no_mangle)]
static PT_REGS_SP_OFF: u64 = 152;
#[unsafe(no_mangle)]
static PT_REGS_BP_OFF: u64 = 32;


/// Whether a call that took `ns` deserves a stack.
#[inline(always)]
pub fn slow(ns: u64) -> bool {
    global(&STACKS_ON) != 0 && ns >= global(&STACK_MIN_NS)
}

/// The timer-driven sampler on every CPU. For a loop thread inside an iteration it feeds the
/// syscalls group (which syscall the thread is in), and once the iteration is past its
/// target's threshold it sends a stack every STACK_EVERY_NS. Every other tick ends at the
/// tgid compare.
#[perf_event]
pub fn stall_sample(ctx: PerfEventContext) -> u32 {
    let Some(s) = observed_iteration() else { return 0 };
    let other = syscalls::current_other(s);
    if let Some(nr) = other {
        syscalls::sampled(s, nr, global(&SAMPLE_PERIOD_NS));
    }
    if global(&STACKS_ON) == 0 {
        return 0;
    }
    let ts = now();
    let every = global(&STACK_EVERY_NS);
    // Ticks jitter: half a period of slack keeps one stack per STACK_EVERY_NS, not one per two.
    let due = every.saturating_sub(global(&SAMPLE_PERIOD_NS) / 2);
    if ts.saturating_sub(s.iter_start_ns) < threshold_ns() || ts.saturating_sub(s.last_stack_ns) < due {
        return 0;
    }
    s.last_stack_ns = ts;
    // Userspace splits the unexplained time by where such samples land (the allocator or not).
    let measured = other.is_some() || s.purge_start_ns != 0 || s.sys_start_ns != 0;
    let kind = if measured { stack_kind::SAMPLE_MEASURED } else { stack_kind::SAMPLE };
    capture(&ctx, s, current_tid(), kind, every, false);
    0
}

/// At a uprobe on a wrapper whose return a uretprobe times: where the call came from (see
/// `ThreadState::call_ret`).
#[inline(always)]
pub fn remember_call(s: &mut ThreadState) {
    let regs = task::current_regs();
    let sp: u64 = task::read(regs, &PT_REGS_SP_OFF);
    // The probe sits before anything moves the stack pointer (userspace checks), so the
    // return address is at it.
    s.call_ret = unsafe { bpf_probe_read_user(sp as *const u64) }.unwrap_or(0);
    s.call_ip = task::read(regs, &PT_REGS_IP_OFF);
    s.call_bp = task::read(regs, &PT_REGS_BP_OFF);
    s.call_sp = sp;
}

/// The wrapper call is over.
#[inline(always)]
pub fn forget_call(s: &mut ThreadState) {
    s.call_sp = 0;
    s.call_ret = 0;
}

/// Sends the calling thread's user registers, the top of its user stack and its kernel stack.
#[inline(never)]
/// `at_call`: unwind from where the in-flight wrapper call was made (at its uretprobe the
/// registers are the trampoline's) rather than from where the thread is now.
pub fn capture<C: EbpfContext + StackIdContext>(
    ctx: &C,
    s: &ThreadState,
    tid: u32,
    kind: u32,
    weight_ns: u64,
    at_call: bool,
) {
    let Some(mut entry) = STACK_EVENTS.reserve::<StackEvent>(0) else {
        count(counter::LOST_STACKS);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved record; every field is written before submit (the
    // record is too big to build on the 512-byte BPF stack and copy).
    unsafe {
        (*ev).pid = s.tgid;
        (*ev).tid = tid;
        (*ev).iter_start_ns = s.iter_start_ns;
        (*ev).weight_ns = weight_ns;
        (*ev).kind = kind;
        // At a syscall's exit the kernel stack is only the exit path; a timer sample that
        // lands in the kernel shows where the kernel spends the stall.
        (*ev).kstack_id = if kind >= stack_kind::SAMPLE { ctx.get_stackid(&KSTACKS, 0).map_or(-1, |id| id as i32) } else { -1 };
        if at_call && s.call_sp != 0 {
            ((*ev).ip, (*ev).sp, (*ev).bp) = (s.call_ip, s.call_sp, s.call_bp);
        } else {
            // The user registers, wherever the thread is now (in a syscall, or interrupted).
            let regs = task::current_regs();
            (*ev).ip = task::read(regs, &PT_REGS_IP_OFF);
            (*ev).sp = task::read(regs, &PT_REGS_SP_OFF);
            (*ev).bp = task::read(regs, &PT_REGS_BP_OFF);
        }
        (*ev).stack_len = copy_stack((*ev).sp, &mut (*ev).stack);
        put_back_return(s, (*ev).sp, (*ev).stack_len, &mut (*ev).stack);
    }
    entry.submit(0);
    count(counter::STACKS);
}

/// Writes the in-flight wrapper's real return address over its uretprobe trampoline's in a
/// copied stack, where the copy holds that slot: else the unwinder stops at the trampoline.
#[inline(always)]
fn put_back_return(s: &ThreadState, sp: u64, len: u64, buf: &mut [u8; STACK_BYTES]) {
    if s.call_sp == 0 || s.call_ret == 0 {
        return;
    }
    let off = s.call_sp.wrapping_sub(sp);
    if off.saturating_add(8) > len {
        return;
    }
    let bytes = s.call_ret.to_le_bytes();
    let mut i = 0;
    while i < 8 {
        // The mask changes nothing (checked above) but shows the verifier the bound.
        buf[(off as usize + i) & (STACK_BYTES - 1)] = bytes[i];
        i += 1;
    }
}

/// Copies as much of the stack as exists: a read that crosses the top of the stack mapping
/// fails whole, so smaller sizes are tried in turn.
#[inline(always)]
unsafe fn copy_stack(sp: u64, buf: &mut [u8; STACK_BYTES]) -> u64 {
    let src = sp as *const u8;
    for len in [STACK_BYTES, STACK_BYTES / 2, STACK_BYTES / 4, STACK_BYTES / 8, STACK_BYTES / 16] {
        if unsafe { bpf_probe_read_user_buf(src, &mut buf[..len]) }.is_ok() {
            return len as u64;
        }
    }
    0
}
