//! The process being traced: checks that turn bad input into one clear line, and what
//! /proc says about it.
use std::{fs, path::PathBuf};

use anyhow::{Result, bail};

/// A live user-space process we can trace.
#[derive(Clone, Debug)]
pub struct Target {
    pub pid: u32,
    pub comm: String,
}

impl Target {
    /// Validates `pid`: it must exist and be a user-space process (kernel threads have no
    /// memory map, so there is no event loop or allocator to probe).
    pub fn open(pid: u32) -> Result<Self> {
        if pid == 0 {
            bail!("PID 0 is not a process");
        }
        let stat = match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => s,
            Err(_) => bail!("no process with PID {pid}"),
        };
        if is_kernel_thread(&stat) {
            bail!("PID {pid} is a kernel thread; stalltrace traces user-space processes");
        }
        let comm = fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim_end().to_string())
            .unwrap_or_default();
        Ok(Self { pid, comm })
    }

    pub fn is_alive(&self) -> bool {
        // A zombie still has a /proc entry but will never run its loop again.
        match fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Ok(stat) => stat_field(&stat, 3).is_some_and(|s| s != "Z" && s != "X"),
            Err(_) => false,
        }
    }

    /// The target's root directory as seen from here: paths in its maps are relative to it,
    /// which matters when it runs in a container.
    pub fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid))
    }
}

/// PF_KTHREAD in the flags field (9th) of /proc/PID/stat.
fn is_kernel_thread(stat: &str) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    stat_field(stat, 9)
        .and_then(|f| f.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

/// Field `n` (1-based, as in proc(5)) of /proc/PID/stat; comm may hold spaces and parentheses,
/// so fields are counted from the last ')'.
fn stat_field(stat: &str, n: usize) -> Option<&str> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n.checked_sub(3)?)
}

/// Refuses to go on without the privileges loading and attaching need, saying which.
pub fn check_privileges() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("stalltrace must run as root (it loads eBPF programs: CAP_BPF, CAP_PERFMON, CAP_SYS_RESOURCE)");
    }
    Ok(())
}

/// BTF is how the loader learns this kernel's types; without it nothing portable can load.
pub fn check_btf() -> Result<()> {
    const BTF: &str = "/sys/kernel/btf/vmlinux";
    if !std::path::Path::new(BTF).exists() {
        bail!("this kernel exposes no BTF ({BTF} is missing): stalltrace needs CONFIG_DEBUG_INFO_BTF=y");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_survive_odd_comms() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 2097216 0 0";
        assert_eq!(stat_field(stat, 3), Some("S"));
        assert_eq!(stat_field(stat, 9), Some("2097216"));
        assert!(is_kernel_thread(stat));
    }

    #[test]
    fn this_process_is_a_user_process() {
        let me = Target::open(std::process::id()).unwrap();
        assert!(me.is_alive());
    }
}
