//! Stacks of threads that are asleep right now, without BPF: while a thread is blocked in a
//! syscall, /proc/PID/task/TID/syscall holds its user stack and instruction pointers, and the
//! stack itself can be read with process_vm_readv. Cheap enough for a few threads a report.
use std::fs;

use super::{symbolize::Symbols, unwind::Unwinder};

/// A thread blocked in a syscall: which one, its first argument, and its user registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub nr: u64,
    pub arg0: u64,
    pub sp: u64,
    pub pc: u64,
}

/// What /proc says `tid` is blocked in, or None while it runs (or is gone).
pub fn blocked(pid: u32, tid: u32) -> Option<Blocked> {
    let text = fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    parse_syscall(&text)
}

/// "nr arg1 .. arg6 sp pc" (numbers after nr in hex); "running" or "-1 sp pc" otherwise.
fn parse_syscall(text: &str) -> Option<Blocked> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    if fields.len() != 9 {
        return None;
    }
    let hex = |i: usize| u64::from_str_radix(fields[i].trim_start_matches("0x"), 16).ok();
    Some(Blocked { nr: fields[0].parse().ok()?, arg0: hex(1)?, sp: hex(7)?, pc: hex(8)? })
}

/// The blocked thread's stack, root first, or an empty list when it cannot be read.
pub fn stack(pid: u32, b: &Blocked, unwinder: &mut Unwinder, symbols: &mut Symbols) -> Vec<String> {
    let bytes = read_stack(pid, b.sp);
    if bytes.is_empty() {
        return Vec::new();
    }
    let addrs = unwinder.unwind(b.pc, b.sp, 0, &bytes);
    let mut names = symbols.user(pid, &addrs);
    names.reverse();
    names
}

/// Up to 16 KiB from `sp`, halving while the read crosses the end of the stack mapping.
pub(super) fn read_stack(pid: u32, sp: u64) -> Vec<u8> {
    let mut len = tracer_common::STACK_BYTES;
    while len >= 512 {
        let mut buf = vec![0u8; len];
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: len };
        let remote = libc::iovec { iov_base: sp as *mut libc::c_void, iov_len: len };
        // SAFETY: both iovecs describe `len` bytes; the local one is our own buffer.
        if unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) } == len as isize {
            return buf;
        }
        len /= 2;
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_syscall_lines() {
        let b = parse_syscall("202 0x55d0c0a048 0x80 0x0 0x0 0x0 0x0 0x7ffc1000 0x7f0012345678\n").unwrap();
        assert_eq!(b, Blocked { nr: 202, arg0: 0x55d0c0a048, sp: 0x7ffc1000, pc: 0x7f0012345678 });
        assert_eq!(parse_syscall("running\n"), None);
        assert_eq!(parse_syscall("-1 0x7ffc1000 0x7f0012345678\n"), None);
    }
}
