//! Fields of a `struct task_struct`, at offsets userspace read from BTF (the sched tp_btf
//! programs hand over task pointers), and the syscall the current task is inside.
use aya_ebpf::helpers::{bpf_get_current_task_btf, bpf_task_pt_regs};

use crate::state::global;

#[unsafe(no_mangle)]
static TASK_TGID_OFF: u64 = 0;
#[unsafe(no_mangle)]
static TASK_PID_OFF: u64 = 0;
#[unsafe(no_mangle)]
static TASK_STATE_OFF: u64 = 0;
#[unsafe(no_mangle)]
static TASK_NVCSW_OFF: u64 = 0;
#[unsafe(no_mangle)]
static TASK_NIVCSW_OFF: u64 = 0;
#[unsafe(no_mangle)]
static TASK_RUNTIME_OFF: u64 = 0;
#[unsafe(no_mangle)]
static PT_REGS_SYSNR_OFF: u64 = u64::MAX;
#[unsafe(no_mangle)]
static PT_REGS_RET_OFF: u64 = u64::MAX;

/// x86's syscall entry parks -ENOSYS in the return register until the call returns; an
/// exception frame holds whatever user code had there, which tells a page fault's error code
/// (stored where the syscall number goes) from a syscall number.
const ENOSYS: i64 = 38;

pub type Task = *const u8;

/// A field at a load-time offset from `base`, a BTF-typed kernel pointer (a task from a
/// tp_btf argument or the current task, or its saved registers). The offset is a frozen
/// global, so the verifier knows it and checks the field's type: a plain load instead of a
/// probe-read helper call. sched_switch makes these reads while the task being switched out
/// still holds its CPU, and a waker on another CPU spins until it lets go, so they are on
/// the traced server's request path.
#[inline(always)]
pub fn read<T>(base: *const u8, off: &u64) -> T {
    // SAFETY: the verifier checks the access; the JIT turns a fault into a zero.
    unsafe { core::ptr::read_volatile(base.add(global(off) as usize).cast::<T>()) }
}

#[inline(always)]
pub fn tgid(t: Task) -> u32 {
    read(t, &TASK_TGID_OFF)
}

/// The kernel's pid: the thread id.
#[inline(always)]
pub fn tid(t: Task) -> u32 {
    read(t, &TASK_PID_OFF)
}

/// Whether a task being switched out without preemption is going to sleep: any state but
/// TASK_RUNNING (0), which a yield or a wakeup racing with schedule() leaves.
#[inline(always)]
pub fn sleeping(t: Task) -> bool {
    read::<u32>(t, &TASK_STATE_OFF) != 0
}

/// How many times the task has been switched out, voluntarily or not. schedule() counts a
/// switch before it reports it, so at sched_switch the count already includes it.
#[inline(always)]
pub fn switches(t: Task) -> u64 {
    read::<u64>(t, &TASK_NVCSW_OFF).wrapping_add(read::<u64>(t, &TASK_NIVCSW_OFF))
}

/// The task's CPU time in ns, as of its last scheduler update: exact at sched_switch (the
/// task switched out has just been charged), up to a tick old elsewhere.
#[inline(always)]
pub fn runtime(t: Task) -> u64 {
    read(t, &TASK_RUNTIME_OFF)
}

#[inline(always)]
pub fn current() -> Task {
    // SAFETY: a helper on the current task, always valid in a tracing program.
    unsafe { bpf_get_current_task_btf() as Task }
}

/// The user registers a task saved at the top of its kernel stack on entering the kernel (a
/// syscall, an interrupt or a fault).
#[inline(always)]
pub fn regs(t: Task) -> *const u8 {
    // SAFETY: `t` is a BTF task pointer (the verifier insists).
    unsafe { bpf_task_pt_regs(t as *mut _) as *const u8 }
}

#[inline(always)]
pub fn current_regs() -> *const u8 {
    regs(current())
}

#[inline(always)]
pub fn current_syscall() -> Option<u64> {
    syscall(current())
}

/// The number of the syscall a task is inside (or, off CPU, went to sleep in), read from the
/// registers saved at the top of its kernel stack: None in user code, an interrupt or a fault.
#[inline(always)]
pub fn syscall(t: Task) -> Option<u64> {
    if global(&PT_REGS_SYSNR_OFF) == u64::MAX {
        return None;
    }
    let regs = regs(t);
    let nr: i32 = read(regs, &PT_REGS_SYSNR_OFF);
    if nr < 0 {
        return None;
    }
    if global(&PT_REGS_RET_OFF) != u64::MAX && read::<i64>(regs, &PT_REGS_RET_OFF) != -ENOSYS {
        return None;
    }
    Some(nr as u64)
}
