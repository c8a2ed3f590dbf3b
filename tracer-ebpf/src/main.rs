//! stalltrace's kernel programs. Each module is one probe group (see `tracer_common::group`);
//! `state` holds the maps and the per-thread bookkeeping they share.
#![no_std]
#![no_main]

mod alloc;
mod iteration;
mod listen;
mod park;
mod purge;
mod sched;
mod stacks;
mod state;
mod syscalls;
mod task;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
