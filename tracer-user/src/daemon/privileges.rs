//! What the daemon needs from the kernel, checked before anything is loaded, and what it can
//! give up once running. It keeps loading programs for processes that start later, so it keeps
//! what loading and inspecting them takes and drops everything else.
use anyhow::{Result, bail};
use caps::{CapSet, Capability};

/// Loading and attaching programs, reading other processes' memory maps and stacks, and
/// joining their network namespaces for sock_diag.
pub const NEEDED: &[Capability] = &[
    Capability::CAP_BPF,
    Capability::CAP_PERFMON,
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_SYS_PTRACE,
    Capability::CAP_DAC_READ_SEARCH,
];

/// Kept when present: kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
const KEPT_IF_PRESENT: &[Capability] = &[Capability::CAP_SYS_RESOURCE, Capability::CAP_IPC_LOCK];

/// Refuses to start without the capabilities above, naming the missing ones.
pub fn check() -> Result<()> {
    let have = caps::read(None, CapSet::Effective)?;
    let missing: Vec<String> = NEEDED.iter().filter(|c| !have.contains(c)).map(|c| c.to_string()).collect();
    if !missing.is_empty() {
        bail!("stalltrace daemon needs {} (run as root or grant them, e.g. systemd's AmbientCapabilities)", missing.join(", "));
    }
    Ok(())
}

/// Drops every capability but the needed ones from the effective, permitted, inheritable and
/// bounding sets: what remains cannot be regained, even by exec.
pub fn drop_unneeded() -> Result<Vec<String>> {
    let unneeded: Vec<Capability> =
        caps::all().into_iter().filter(|c| !NEEDED.contains(c) && !KEPT_IF_PRESENT.contains(c)).collect();
    // The bounding set first: dropping from it takes CAP_SETPCAP, itself among the unneeded.
    for &cap in &unneeded {
        let _ = caps::drop(None, CapSet::Bounding, cap);
    }
    let mut dropped = Vec::new();
    for cap in unneeded {
        if caps::has_cap(None, CapSet::Permitted, cap).unwrap_or(false) {
            dropped.push(cap.to_string());
        }
        for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
            caps::drop(None, set, cap)?;
        }
    }
    Ok(dropped)
}
