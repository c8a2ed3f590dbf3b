//! The contract between the kernel programs (`tracer-ebpf`) and userspace (`tracer-user`).
//!
//! Everything that crosses the boundary lives here: the ring-buffer records, the per-thread
//! state userspace polls, the names of globals and maps, and the bit layout of the probe groups.
//! Layouts are `#[repr(C)]` with explicit padding so both compilers agree byte for byte.
#![cfg_attr(not(test), no_std)]

pub const TASK_COMM_LEN: usize = 16;

/// Latency histograms: each power of two of nanoseconds is split into `HIST_SUB` linear
/// buckets (a bucket's width is at most 25% of its lower bound), up to 2^40 ns (18 minutes).
/// Both sides use `hist_slot`/`slot_lower`, so the layout is defined once, here.
pub const HIST_SUB: usize = 4;
pub const HIST_OCTAVES: usize = 40;
pub const HIST_SLOTS: usize = HIST_OCTAVES * HIST_SUB;

/// floor(log2(v)) for v > 0, in compare-and-shift steps (BPF has no count-leading-zeros).
#[inline(always)]
pub fn log2(mut v: u64) -> u32 {
    let mut r = 0;
    let mut shift = 32;
    while shift > 0 {
        if v >= 1u64 << shift {
            v >>= shift;
            r += shift;
        }
        shift >>= 1;
    }
    r
}

/// The bucket of a duration in ns: 0..3 exactly, then 4 per power of two.
#[inline(always)]
pub fn hist_slot(ns: u64) -> usize {
    if ns < HIST_SUB as u64 {
        return ns as usize;
    }
    let l = log2(ns);
    let sub = (ns >> (l - 2)) & (HIST_SUB as u64 - 1);
    let slot = (l as usize - 1) * HIST_SUB + sub as usize;
    if slot < HIST_SLOTS { slot } else { HIST_SLOTS - 1 }
}

/// Smallest duration that falls in `slot`.
pub const fn slot_lower(slot: usize) -> u64 {
    if slot < HIST_SUB {
        return slot as u64;
    }
    let l = slot / HIST_SUB + 1;
    let sub = (slot % HIST_SUB) as u64;
    (HIST_SUB as u64 + sub) << (l - 2)
}

/// Slots of the per-iteration "which syscalls cost the most" table.
pub const TOP_SYSCALLS: usize = 4;

/// Probe groups, switched on and off from userspace through the `GROUPS` global.
pub mod group {
    /// epoll enter/exit: iteration boundaries. Everything else needs it.
    pub const LOOP: u32 = 1 << 0;
    /// madvise and munmap: the kernel half of an allocator purge.
    pub const PURGE: u32 = 1 << 1;
    /// sched_switch: off-CPU time, runnable vs blocked.
    pub const SCHED: u32 = 1 << 2;
    /// Time in every other syscall, with no probe on any syscall: the sampler reads which
    /// syscall a loop thread is in (on CPU), and sched_switch which one it slept in.
    pub const SYSCALLS: u32 = 1 << 3;
    /// uprobes on the allocator's entry points.
    pub const ALLOC: u32 = 1 << 4;
    /// Listening sockets: new connections, resets, accept-queue overflows.
    pub const NET: u32 = 1 << 5;
    /// User and kernel stacks where a stall's time goes: slow purge calls, slow syscalls, slow
    /// allocator calls, and timed samples of a loop thread already past its threshold.
    pub const STACKS: u32 = 1 << 6;
    /// Parked threads: when each of the target's threads went to sleep, and the last wakeup
    /// sent to it and by whom (pool starvation).
    pub const PARK: u32 = 1 << 7;
}

/// Names of the globals userspace overrides at load time.
pub mod globals {
    /// u32 tgid of the traced process: a program set traces one process, and every other
    /// process leaves the hot programs after one compare.
    pub const TARGET_TGID: &str = "TARGET_TGID";
    /// u64 iterations at least this long (ns) are sent as stall records.
    pub const THRESHOLD_NS: &str = "THRESHOLD_NS";
    /// u64 offsets of `tgid`, `pid` and `__state` (`state` before 5.14) in `struct
    /// task_struct`, from BTF: the raw sched tracepoints hand over task pointers.
    pub const TASK_TGID_OFF: &str = "TASK_TGID_OFF";
    pub const TASK_PID_OFF: &str = "TASK_PID_OFF";
    pub const TASK_STATE_OFF: &str = "TASK_STATE_OFF";
    /// u64 offsets of `nvcsw` and `nivcsw` (voluntary and involuntary context switches) in
    /// `struct task_struct`, from BTF.
    pub const TASK_NVCSW_OFF: &str = "TASK_NVCSW_OFF";
    pub const TASK_NIVCSW_OFF: &str = "TASK_NIVCSW_OFF";
    /// u64 offset of `se.sum_exec_runtime` in `struct task_struct`: a thread's CPU time.
    pub const TASK_RUNTIME_OFF: &str = "TASK_RUNTIME_OFF";
    /// u64 1 when an iteration's start is inferred (no program at epoll's return): the
    /// registers tell whether a loop thread is still inside epoll_wait.
    pub const LAZY_BEGIN: &str = "LAZY_BEGIN";
    /// u64 syscall numbers of epoll_wait, epoll_pwait and epoll_pwait2 (u64::MAX where absent).
    pub const EPOLL_SYSCALLS: &str = "EPOLL_SYSCALLS";
    /// u64 1 when the syscalls group runs.
    pub const SYSCALLS_ON: &str = "SYSCALLS_ON";
    /// u64 syscall numbers of this architecture the syscalls group leaves to other groups.
    pub const SKIP_SYSCALLS: &str = "SKIP_SYSCALLS";
    /// u64 syscall numbers that set up or tear down connections (accept, close, epoll_ctl...).
    pub const CONN_SYSCALLS: &str = "CONN_SYSCALLS";
    /// u64 syscall numbers of accept and accept4 (u64::MAX where absent).
    pub const ACCEPT_SYSCALLS: &str = "ACCEPT_SYSCALLS";
    /// u64 offset of `skc_num` (the local port) in `struct sock`, from BTF.
    pub const SKC_NUM_OFF: &str = "SKC_NUM_OFF";
    /// u64 offsets of `sk_ack_backlog` and `sk_max_ack_backlog` in `struct sock`, from BTF.
    pub const SK_ACK_BACKLOG_OFF: &str = "SK_ACK_BACKLOG_OFF";
    pub const SK_MAX_ACK_BACKLOG_OFF: &str = "SK_MAX_ACK_BACKLOG_OFF";
    /// u64 value of SKB_DROP_REASON_TCP_LISTEN_OVERFLOW on this kernel, and the offsets of
    /// `reason` and `rx_sk` in the kfree_skb record (all from tracefs: they vary by kernel).
    pub const LISTEN_OVERFLOW_REASON: &str = "LISTEN_OVERFLOW_REASON";
    pub const KFREE_REASON_OFF: &str = "KFREE_REASON_OFF";
    pub const KFREE_RX_SK_OFF: &str = "KFREE_RX_SK_OFF";
    /// u64 offset of the local port in the tcp_send_reset record, and whether it is a
    /// network-order port inside a sockaddr (1) or a host-order `sport` field (0).
    pub const RST_SPORT_OFF: &str = "RST_SPORT_OFF";
    pub const RST_SPORT_IN_SOCKADDR: &str = "RST_SPORT_IN_SOCKADDR";
    /// u64 1 when the park group runs (sched_switch then also tracks parked threads).
    pub const PARK_ON: &str = "PARK_ON";
    /// u64 1 when the stacks group runs (programs that capture stacks check it).
    pub const STACKS_ON: &str = "STACKS_ON";
    /// u64 calls at least this long (ns) get their stack captured.
    pub const STACK_MIN_NS: &str = "STACK_MIN_NS";
    /// u64 period of the sampler, the weight of one syscall sample.
    pub const SAMPLE_PERIOD_NS: &str = "SAMPLE_PERIOD_NS";
    /// u64 at most one sampled stack per this many ns of a stalled iteration (its weight).
    pub const STACK_EVERY_NS: &str = "STACK_EVERY_NS";
    /// u64 offsets of the instruction, stack and frame pointers in `struct pt_regs` (BTF).
    pub const PT_REGS_IP_OFF: &str = "PT_REGS_IP_OFF";
    pub const PT_REGS_SP_OFF: &str = "PT_REGS_SP_OFF";
    pub const PT_REGS_BP_OFF: &str = "PT_REGS_BP_OFF";
    /// u64 offsets of the syscall number (`orig_ax`) and return value (`ax`) in `struct
    /// pt_regs`; u64::MAX where this architecture has no such pair (the group then sees none).
    pub const PT_REGS_SYSNR_OFF: &str = "PT_REGS_SYSNR_OFF";
    pub const PT_REGS_RET_OFF: &str = "PT_REGS_RET_OFF";
}

/// Map names.
pub mod maps {
    pub const THREADS: &str = "THREADS";
    pub const ITER_HIST: &str = "ITER_HIST";
    pub const HIST_USED: &str = "HIST_USED";
    pub const STALLS: &str = "STALLS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const LISTENERS: &str = "LISTENERS";
    pub const STACK_EVENTS: &str = "STACK_EVENTS";
    pub const PARKED: &str = "PARKED";
    pub const PARK_WATCHED: &str = "PARK_WATCHED";
    pub const KSTACKS: &str = "KSTACKS";
    pub const TARGET_STATS: &str = "TARGET_STATS";
    pub const PURGE_CALLERS: &str = "PURGE_CALLERS";
}

/// Number of syscall numbers in `SKIP_SYSCALLS`.
pub const SKIP_SYSCALLS_LEN: usize = 24;
/// Number of syscall numbers in `CONN_SYSCALLS`.
pub const CONN_SYSCALLS_LEN: usize = 12;

/// Indices of the per-CPU `COUNTERS` array.
pub mod counter {
    /// A stall record that did not fit in the ring buffer.
    pub const LOST_STALLS: u32 = 0;
    /// A thread that could not be tracked because `THREADS` was full.
    pub const THREADS_FULL: u32 = 1;
    /// A stack sample that did not fit in the ring buffer.
    pub const LOST_STACKS: u32 = 2;
    /// Stack samples taken.
    pub const STACKS: u32 = 3;
    /// Iterations whose start is not known: the thread was switched out inside its epoll wait
    /// and sched_switch never showed it coming back (about one sleep in a few thousand on
    /// Linux 6.18). Such an iteration is timed from the first program that sees the thread
    /// running, or, if none did, not timed at all.
    pub const LATE_BEGIN: u32 = 4;
    /// Purge calls inside an iteration that no probe timed: made from a call site not yet
    /// probed, after the wrapper's stepped entry probe was retired (`purge_site`).
    pub const UNTIMED_PURGES: u32 = 5;
    /// Purge calls only the wrapper's stepped entry probe timed: while any are made, it stays.
    pub const STEPPED_PURGES: u32 = 6;
    /// Loop threads left without a histogram because every `ITER_HIST` slot was claimed:
    /// their stalls are still reported.
    pub const HISTS_FULL: u32 = 7;
    pub const LEN: u32 = 8;
}

/// How many slots past `HIST_USED` a histogram claim tries, and so how far past it userspace
/// reads: a claim racing another can leave `HIST_USED` short of the slots claimed.
pub const CLAIM_TRIES: u32 = 8;

/// Fixed offsets of syscall tracepoint records (`syscalls:sys_{enter,exit}_*` and
/// `raw_syscalls:*`): part of the tracepoint ABI, stable across kernels.
pub mod tp {
    /// syscalls:sys_{enter,exit}_*: the syscall number (i32).
    pub const SYS_NR: usize = 8;
    pub const SYS_ENTER_ARG0: usize = 16;
    pub const SYS_ENTER_ARG1: usize = 24;
    pub const SYS_ENTER_ARG2: usize = 32;
    pub const RAW_SYS_ID: usize = 8;
    /// inet_sock_set_state: oldstate, newstate (i32), sport, protocol (u16, host order).
    pub const SET_STATE_OLDSTATE: usize = 16;
    pub const SET_STATE_NEWSTATE: usize = 20;
    pub const SET_STATE_SPORT: usize = 24;
    pub const SET_STATE_PROTOCOL: usize = 30;
    /// tcp_receive_reset: sport (u16, host order).
    pub const RECV_RESET_SPORT: usize = 16;

    pub const SYS_EXIT_RET: usize = 16;
    pub const PROCESS_EXIT_PID: usize = 24;
}

/// `ThreadState::purge_kind` values.
pub mod purge_kind {
    pub const MADVISE: u64 = 0;
    pub const MUNMAP: u64 = 1;
    pub const MREMAP: u64 = 2;
}

/// Purge wrappers with no instruction x86 emulates before their syscall (glibc's madvise,
/// munmap and mremap: `mov $nr,%eax; syscall`) are probed after it instead, on the error
/// check's jump, and their calls are timed from probes on the `call` instructions that reach
/// them (emulated too), which userspace learns at run time from `PURGE_CALLERS`: two ~1 us
/// probes instead of a stepped entry probe's ~13 us.
pub mod purge_site {
    /// The return probe's attach cookie: the call's `purge_kind` and the probe's offset in
    /// the wrapper, from which the program finds the wrapper's address.
    pub const fn cookie(kind: u64, offset: u64) -> u64 {
        kind | offset << 8
    }

    pub const fn kind(cookie: u64) -> u64 {
        cookie & 0xff
    }

    pub const fn offset(cookie: u64) -> u64 {
        cookie >> 8
    }
}

/// A value of `PURGE_CALLERS`, keyed by the return address of a purge call no call-site
/// probe timed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PurgeCaller {
    /// The wrapper's address in the target.
    pub wrapper: u64,
    pub kind: u64,
}

/// Where one iteration's time went. Components are disjoint, so their sum never exceeds the
/// iteration's duration; what is left is on-CPU time in the application's own code.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Components {
    pub madvise_calls: u64,
    /// Wall time inside madvise, off-CPU time within it included: a purge that waits on
    /// mmap_lock is still the purge's fault.
    pub madvise_ns: u64,
    pub madvise_bytes: u64,
    pub munmap_calls: u64,
    pub munmap_ns: u64,
    pub munmap_bytes: u64,
    /// mremap: glibc shrinks a large block in place with it. Bytes are those released.
    pub mremap_calls: u64,
    pub mremap_ns: u64,
    pub mremap_bytes: u64,
    pub alloc_calls: u64,
    /// Wall time in allocator calls minus the purge and other syscall time nested in them.
    pub alloc_ns: u64,
    /// Off-CPU while runnable (preempted), outside purge syscalls and allocator calls.
    pub runnable_ns: u64,
    /// Off-CPU while blocked (sleeping, waiting for I/O or a lock), same exclusions.
    pub blocked_ns: u64,
    /// Sampler ticks that found the thread on CPU inside another syscall.
    pub syscall_samples: u64,
    /// On-CPU time in syscalls other than epoll, the purge group's and the connection ones:
    /// the samples times the sampler's period (no per-syscall probe: see `group::SYSCALLS`).
    pub syscall_ns: u64,
    /// Connection set-up and tear-down syscalls (accept, close, epoll_ctl, setsockopt...):
    /// calls, on-CPU time, and connections accepted.
    pub conn_calls: u64,
    pub conn_ns: u64,
    pub accepts: u64,
    /// Syscall number + 1 (0: empty slot) of the costliest other syscalls: sampled on-CPU
    /// time plus the exact off-CPU time spent inside them, so the syscall a thread slept in
    /// shows up.
    pub top_nr: [u32; TOP_SYSCALLS],
    pub top_ns: [u64; TOP_SYSCALLS],
}

/// A ring-buffer record: one iteration that took at least the target's threshold.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StallEvent {
    pub pid: u32,
    pub tid: u32,
    pub comm: [u8; TASK_COMM_LEN],
    /// CLOCK_MONOTONIC (bpf_ktime_get_ns) at the return of epoll that began the iteration.
    pub start_ns: u64,
    pub duration_ns: u64,
    pub parts: Components,
}

/// Per-listening-port counters, keyed by local port in the per-CPU `LISTENERS` map (userspace
/// inserts the target's ports; the kernel only counts). Monotonic: userspace takes deltas.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerCounters {
    /// Passive opens that completed (SYN_RECV -> ESTABLISHED).
    pub established: u64,
    pub rst_sent: u64,
    pub rst_received: u64,
    /// Final ACKs dropped because the accept queue was full (kfree_skb TCP_LISTEN_OVERFLOW).
    pub ack_overflows: u64,
    /// SYNs that reached the listener, and those dropped on a full accept queue: only where
    /// fentry on tcp_conn_request is allowed.
    pub syns: u64,
    pub syn_overflows: u64,
}

/// Per-target counters, keyed by tgid in the per-CPU `TARGET_STATS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TargetStats {
    /// Successful accept/accept4 calls by the target's loop threads.
    pub accepts: u64,
}

/// Per-thread sleep and wakeup bookkeeping, keyed by tid in `PARKED`. Userspace inserts the
/// threads that could starve as a group (those with namesakes) and keeps their number in
/// `PARK_WATCHED[0]`; the kernel only updates entries that exist, and looks for none while
/// that number is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ParkState {
    /// When the thread last went to sleep (switched out not runnable); 0 while it runs or is
    /// runnable, and before the first switch seen.
    pub parked_since_ns: u64,
    /// The last wakeup sent to it (sched_waking), and who sent it.
    pub last_wakeup_ns: u64,
    pub waker_tid: u32,
    pub waker_tgid: u32,
    pub waker_comm: [u8; TASK_COMM_LEN],
    /// Wakeups received since tracking began.
    pub wakeups: u64,
}

/// Bytes of user stack copied from the stack pointer up: enough for deep C call chains,
/// small enough that a sample costs one 16 KiB copy.
pub const STACK_BYTES: usize = 16 * 1024;

/// Why a stack was captured (`StackEvent::kind`).
pub mod stack_kind {
    /// A madvise/munmap/mremap call at least STACK_MIN_NS long, captured at its return.
    pub const PURGE: u32 = 0;
    /// Any other syscall at least STACK_MIN_NS long (a sleep, a blocking read...).
    pub const SYSCALL: u32 = 1;
    /// An allocator call at least STACK_MIN_NS long, captured at its return (caller's frames).
    pub const ALLOC: u32 = 2;
    /// A timed sample of a thread whose current iteration is already past the threshold, in
    /// time no probe accounts for (user code, a page fault, an unmeasured syscall).
    pub const SAMPLE: u32 = 3;
    /// The same, in a call whose time is already measured (a purge or connection syscall, or
    /// one the syscalls group counted): not a share of the unexplained rest.
    pub const SAMPLE_MEASURED: u32 = 4;
}

/// A user stack snapshot (registers plus the stack's top bytes, unwound in userspace from
/// .eh_frame) and a kernel stack id, tied to one iteration of one thread.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StackEvent {
    pub pid: u32,
    pub tid: u32,
    /// The iteration this stack belongs to: matches `StallEvent::start_ns`.
    pub iter_start_ns: u64,
    /// Stall time this stack stands for: the call's duration, or one sampling period.
    pub weight_ns: u64,
    pub kind: u32,
    /// Kernel stack in `KSTACKS`, or negative when there is none.
    pub kstack_id: i32,
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Valid bytes in `stack`, which starts at address `sp`.
    pub stack_len: u64,
    pub stack: [u8; STACK_BYTES],
}

/// `ThreadState::flags` bits.
pub mod thread_flag {
    /// The thread is inside an epoll wait: between iterations.
    pub const IN_EPOLL: u32 = 1 << 0;
    /// The thread was switched out while runnable (preempted or yielded).
    pub const OFF_RUNNABLE: u32 = 1 << 1;
    /// The purge call in flight was started by a probe on its call site.
    pub const PURGE_AT_SITE: u32 = 1 << 2;
}

/// `ThreadState::switches` of an entry userspace made: its first wait is trusted as before.
pub const SWITCHES_UNKNOWN: u64 = u64::MAX;

/// Per-thread accounting, keyed by tid in `THREADS`. Only threads of a target that have
/// called epoll_wait at least once get an entry: threads that never wait there are not event
/// loops and cost one failed lookup per event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadState {
    pub tgid: u32,
    pub flags: u32,
    /// The thread's slot in `ITER_HIST` plus one; 0 until the kernel claims one (an entry
    /// userspace made for a thread found waiting at attach starts without).
    pub hist: u32,
    pub _pad: u32,
    /// Start of the current iteration; 0 while waiting in epoll, and until a program first
    /// sees the thread running after the wait (see `resume_ns`).
    pub iter_start_ns: u64,
    /// When the thread entered its last epoll wait, or was last put back on CPU inside it:
    /// no program runs at the wait's return, so an iteration is found to have begun later,
    /// and begun at this time.
    pub resume_ns: u64,
    /// The thread's context switches (nvcsw + nivcsw) as of `resume_ns`: a count that moved
    /// since, with no switch-in seen, means the thread slept and woke unseen (`LATE_BEGIN`).
    /// `SWITCHES_UNKNOWN` in an entry userspace made for a thread found waiting at attach.
    pub switches: u64,
    /// Current "other" syscall: number, start, and off-CPU time spent inside it so far.
    pub sys_nr: u64,
    pub sys_start_ns: u64,
    pub sys_off_ns: u64,
    /// Current purge-group call: start time, bytes released, and which `purge_kind` it is.
    pub purge_start_ns: u64,
    pub purge_len: u64,
    pub purge_kind: u64,
    /// Outermost allocator call: start, nesting depth and the nested syscall time at entry.
    pub alloc_start_ns: u64,
    pub alloc_depth: u64,
    pub alloc_nested_at_entry_ns: u64,
    /// When the thread was switched out (0: on CPU or not tracked), and the syscall number + 1
    /// it went off CPU in (0: none, or the syscalls group is off).
    pub off_start_ns: u64,
    pub off_syscall: u64,
    /// When the sampler last sent this thread's stack.
    pub last_stack_ns: u64,
    /// The thread's CPU time at its wait's uprobe, which runs a few instructions before the
    /// syscall (0: a tracepoint saw the wait, inside the syscall). See `iteration::resumed_with`.
    pub wait_runtime_ns: u64,
    /// A wrapper call a uprobe and uretprobe time (purge, connection), as at its uprobe: the
    /// user instruction, stack and frame pointers, and the return address the uretprobe
    /// replaced on the stack with its trampoline's (`call_sp` 0: none in flight). Stacks taken
    /// during the call or at its return are unwound with the real address put back.
    pub call_ip: u64,
    pub call_sp: u64,
    pub call_bp: u64,
    pub call_ret: u64,
    pub parts: Components,
}

/// Per-thread latency histograms in the array `ITER_HIST` (slot `ThreadState::hist - 1`;
/// `HIST_USED` counts the slots claimed): every iteration, and every purge-group syscall and
/// allocator call made inside an iteration. A slot outlives its thread, for the summary.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IterHist {
    pub tgid: u32,
    pub tid: u32,
    pub comm: [u8; TASK_COMM_LEN],
    pub iter_max_ns: u64,
    pub purge_bytes: u64,
    pub iter: [u64; HIST_SLOTS],
    pub purge: [u64; HIST_SLOTS],
    pub alloc: [u64; HIST_SLOTS],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data: #[repr(C)], integers only, no implicit padding.
    unsafe impl aya::Pod for super::Components {}
    unsafe impl aya::Pod for super::StallEvent {}
    unsafe impl aya::Pod for super::ThreadState {}
    unsafe impl aya::Pod for super::IterHist {}
    unsafe impl aya::Pod for super::ListenerCounters {}
    unsafe impl aya::Pod for super::TargetStats {}
    unsafe impl aya::Pod for super::StackEvent {}
    unsafe impl aya::Pod for super::ParkState {}
    unsafe impl aya::Pod for super::PurgeCaller {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_the_bucket_whose_bounds_hold_it() {
        let mut v = 0u64;
        while v < 1 << 41 {
            let s = hist_slot(v);
            assert!(slot_lower(s) <= v, "{v} in slot {s} below {}", slot_lower(s));
            if s + 1 < HIST_SLOTS {
                assert!(v < slot_lower(s + 1), "{v} beyond slot {s}");
            }
            v = v * 9 / 8 + 1;
        }
        assert_eq!(hist_slot(u64::MAX), HIST_SLOTS - 1);
        assert_eq!(log2(1), 0);
        assert_eq!(log2(1 << 40), 40);
    }
}
