//! Net group: what happens on the target's listening sockets. Userspace puts the target's
//! listening ports in `LISTENERS`; these programs count per port and never allocate entries.
//!
//! Tracepoints work everywhere: completed passive opens (inet_sock_set_state), resets sent and
//! received, and final ACKs dropped on a full accept queue (kfree_skb with reason
//! TCP_LISTEN_OVERFLOW). SYNs dropped on a full queue leave no tracepoint on loopback; where
//! the kernel allows fentry, `syn_request` on tcp_conn_request counts them exactly, and
//! elsewhere userspace derives them from the listener's drop counter (sock_diag).
use aya_ebpf::{
    macros::{fentry, map, tracepoint},
    maps::PerCpuHashMap,
    programs::{FEntryContext, TracePointContext},
};
use tracer_common::{ListenerCounters, tp};

use crate::state::global;

#[map]
pub static LISTENERS: PerCpuHashMap<u16, ListenerCounters> = PerCpuHashMap::with_max_entries(256, 0);

#[unsafe(no_mangle)]
static SKC_NUM_OFF: u64 = 14;
#[unsafe(no_mangle)]
static SK_ACK_BACKLOG_OFF: u64 = 0;
#[unsafe(no_mangle)]
static SK_MAX_ACK_BACKLOG_OFF: u64 = 0;
#[unsafe(no_mangle)]
static LISTEN_OVERFLOW_REASON: u64 = u64::MAX;
#[unsafe(no_mangle)]
static KFREE_REASON_OFF: u64 = 36;
#[unsafe(no_mangle)]
static KFREE_RX_SK_OFF: u64 = 24;
#[unsafe(no_mangle)]
static RST_SPORT_OFF: u64 = 32;
#[unsafe(no_mangle)]
static RST_SPORT_IN_SOCKADDR: u64 = 1;

const IPPROTO_TCP: u16 = 6;
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_RECV: i32 = 3;


#[inline(always)]
fn counters(port: u16) -> Option<&'static mut ListenerCounters> {
    // SAFETY: a per-CPU value, and these programs do not nest on one CPU.
    LISTENERS.get_ptr_mut(port).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn sock_port(sk: *const u8) -> Option<u16> {
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel(sk.add(global(&SKC_NUM_OFF) as usize).cast::<u16>()) }.ok()
}

#[tracepoint]
pub fn conn_state(ctx: TracePointContext) -> u32 {
    let read = |off| unsafe { ctx.read_at::<i32>(off) }.unwrap_or(0);
    if read(tp::SET_STATE_OLDSTATE) != TCP_SYN_RECV || read(tp::SET_STATE_NEWSTATE) != TCP_ESTABLISHED {
        return 0;
    }
    if unsafe { ctx.read_at::<u16>(tp::SET_STATE_PROTOCOL) } != Ok(IPPROTO_TCP) {
        return 0;
    }
    let Ok(port) = (unsafe { ctx.read_at::<u16>(tp::SET_STATE_SPORT) }) else { return 0 };
    if let Some(c) = counters(port) {
        c.established += 1;
    }
    0
}

#[tracepoint]
pub fn rst_sent(ctx: TracePointContext) -> u32 {
    let Ok(raw) = (unsafe { ctx.read_at::<u16>(global(&RST_SPORT_OFF) as usize) }) else { return 0 };
    let port = if global(&RST_SPORT_IN_SOCKADDR) != 0 { u16::from_be(raw) } else { raw };
    if let Some(c) = counters(port) {
        c.rst_sent += 1;
    }
    0
}

#[tracepoint]
pub fn rst_received(ctx: TracePointContext) -> u32 {
    let Ok(port) = (unsafe { ctx.read_at::<u16>(tp::RECV_RESET_SPORT) }) else { return 0 };
    if let Some(c) = counters(port) {
        c.rst_received += 1;
    }
    0
}

/// skb:kfree_skb fires for every dropped packet on the host: the reason is checked first.
#[tracepoint]
pub fn listen_drop(ctx: TracePointContext) -> u32 {
    let reason = unsafe { ctx.read_at::<u32>(global(&KFREE_REASON_OFF) as usize) }.unwrap_or(0);
    if u64::from(reason) != global(&LISTEN_OVERFLOW_REASON) {
        return 0;
    }
    let Ok(sk) = (unsafe { ctx.read_at::<u64>(global(&KFREE_RX_SK_OFF) as usize) }) else { return 0 };
    if sk == 0 {
        return 0;
    }
    if let Some(c) = sock_port(sk as *const u8).and_then(counters) {
        c.ack_overflows += 1;
    }
    0
}

/// fentry on tcp_conn_request(rsk_ops, af_ops, sk, skb): every SYN a listener sees, and
/// whether its accept queue was already full (the kernel's own sk_acceptq_is_full test).
#[fentry(function = "tcp_conn_request")]
pub fn syn_request(ctx: FEntryContext) -> u32 {
    let sk: *const u8 = ctx.arg(2);
    let Some(c) = sock_port(sk).and_then(counters) else { return 0 };
    c.syns += 1;
    let read = |off: &u64| unsafe { aya_ebpf::helpers::bpf_probe_read_kernel(sk.add(global(off) as usize).cast::<u32>()) }.unwrap_or(0);
    if read(&SK_ACK_BACKLOG_OFF) > read(&SK_MAX_ACK_BACKLOG_OFF) {
        c.syn_overflows += 1;
    }
    0
}
