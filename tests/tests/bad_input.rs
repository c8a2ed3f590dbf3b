//! Bad input: one clear line on stderr and a non-zero exit, before anything is loaded.
use std::fs;

use tests::{LoopServer, run_stalltrace};

fn assert_one_line_error(args: &[&str], uid: Option<u32>, needle: &str) {
    let (ok, stderr) = run_stalltrace(args, uid).unwrap();
    assert!(!ok, "stalltrace {args:?} succeeded");
    assert_eq!(stderr.lines().count(), 1, "want one line, got {stderr:?}");
    assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
}

#[test]
fn no_pid() {
    assert_one_line_error(&[], None, "no target process");
}

#[test]
fn a_pid_that_does_not_exist() {
    // pid_max is at most 2^22: this PID can never exist.
    assert_one_line_error(&["-p", "4194305"], None, "no process with PID 4194305");
}

#[test]
fn a_kernel_thread() {
    let kthread = (1..1000u32)
        .find(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().nth(6)).map(str::to_owned))
                .and_then(|f| f.parse::<u64>().ok())
                .is_some_and(|flags| flags & 0x0020_0000 != 0)
        })
        .expect("a kernel thread below PID 1000");
    assert_one_line_error(&["-p", &kthread.to_string()], None, "kernel thread");
}

#[test]
fn not_root() {
    let server = LoopServer::start(false).unwrap();
    assert_one_line_error(&["-p", &server.proc.pid().to_string()], Some(65534), "must run as root");
}

#[test]
fn a_binary_without_the_symbol() {
    let server = LoopServer::start(false).unwrap();
    let pid = server.proc.pid().to_string();
    assert_one_line_error(
        &["-p", &pid, "--probes", "alloc", "--alloc-funcs", "no_such_allocator_fn", "-d", "1s"],
        None,
        "no object defining no_such_allocator_fn",
    );
}

#[test]
fn a_bad_threshold() {
    assert_one_line_error(&["-p", "1", "-t", "soon"], None, "invalid duration");
}
