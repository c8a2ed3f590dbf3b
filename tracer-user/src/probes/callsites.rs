//! Call sites of the purge wrappers that are probed at their return (`purge_site` in
//! tracer-common). The kernel reports the return address of every loop-thread call that no
//! call-site probe started; a probe is an int3 written into the target's code, so a site is
//! probed only once the bytes before that address are proven to be a direct `call` of the
//! wrapper, or of a PLT stub that jumps to it. Once the learned sites start every call, the
//! wrapper's stepped entry probe is detached: it costs ~13 us a call, a site probe ~1 us.
use std::{
    collections::HashSet,
    fs::File,
    num::NonZeroU32,
    os::unix::fs::FileExt as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, ensure};
use aya::{
    maps::HashMap,
    programs::uprobe::{UProbeAttachLocation, UProbeLink},
};
use tracer_common::{PurgeCaller, counter, maps, purge_site};

use super::{Probes, wrappers::Site};
use crate::stacks::unwind::{mapping_at, read_maps};

/// How often the reported return addresses are read.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// How long no call may have needed the stepped entry probe before it is detached.
const RETIRE_AFTER: Duration = Duration::from_secs(1);

/// The learning's progress, for the summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SiteCounts {
    /// Call sites probed.
    pub probed: usize,
    /// Reported return addresses not proven to follow a direct call: their calls stay with
    /// the stepped probe.
    pub refused: usize,
    /// The wrappers whose stepped entry probe is still attached.
    pub stepped: Vec<String>,
}

#[derive(Default)]
pub(super) struct Learner {
    seen: HashSet<u64>,
    counts: SiteCounts,
    due: Option<Instant>,
    /// `STEPPED_PURGES` when last read, and since when it has not moved.
    stepped_calls: u64,
    quiet_since: Option<Instant>,
    /// Each wrapper's stepped entry probe, by `purge_kind`: detached once sites of that
    /// kind are probed and they cover every call.
    stepped_links: Vec<(u64, String, UProbeLink)>,
    /// The kinds of the sites probed.
    kinds_probed: HashSet<u64>,
}

/// Where a `call` lives, as a uprobe is attached to it.
struct CallSite {
    open_path: PathBuf,
    file_offset: u64,
}

impl Probes {
    /// Purge probes on `sites` (wrapper, `purge_kind`): on an emulated instruction before the
    /// syscall with a uretprobe where there is one, else stepped at the entry and, where
    /// x86 emulates an instruction after the syscall, probed there (with the call sites to
    /// come), else stepped with a uretprobe.
    pub(super) fn attach_purge_wrappers(&mut self, pid: u32, sites: &[(Site, u64)]) -> Result<()> {
        let pid = NonZeroU32::new(pid).ok_or_else(|| anyhow!("PID 0"))?;
        let mut described = Vec::new();
        for (site, kind) in sites {
            let path = &site.binding.open_path;
            let entry = || UProbeAttachLocation::SymbolOffset(&site.binding.symbol, site.offset);
            let entry_link = self.uprobe("purge_call", path, entry(), *kind, pid)?;
            match site.returned.filter(|_| !site.emulated) {
                Some(off) => {
                    let at = UProbeAttachLocation::SymbolOffset(&site.binding.symbol, off);
                    let link = self.uprobe("purge_returned", path, at, purge_site::cookie(*kind, off), pid)?;
                    self.links.push(Box::new(link));
                    let learner = self.purge_sites.get_or_insert_with(Learner::default);
                    learner.stepped_links.push((*kind, site.binding.symbol.clone(), entry_link));
                    let what = "entry stepped until its callers are probed";
                    described.push(format!("{} (return +{off:#x}; {what})", site.describe()));
                }
                None => {
                    self.links.push(Box::new(entry_link));
                    let link = self.uprobe("purge_return", path, entry(), *kind, pid)?;
                    self.links.push(Box::new(link));
                    described.push(site.describe());
                }
            }
        }
        self.attached.push(format!("purge uprobes {}", described.join(" ")));
        Ok(())
    }

    /// Probes the call sites reported since the last look, and detaches the stepped entry
    /// probes once `RETIRE_AFTER` passed with no call that needed them. Cheap to call often.
    pub fn learn_purge_sites(&mut self, pid: u32) {
        let Some(mut learner) = self.purge_sites.take() else { return };
        if learner.due.is_none_or(|d| Instant::now() >= d) {
            learner.due = Some(Instant::now() + POLL_EVERY);
            for (ret, caller) in self.reported_callers(&learner.seen) {
                learner.seen.insert(ret);
                match self.probe_call_site(pid, ret, caller) {
                    Ok(()) => {
                        learner.counts.probed += 1;
                        learner.kinds_probed.insert(caller.kind);
                    }
                    Err(_) => learner.counts.refused += 1,
                }
            }
            self.retire_stepped(&mut learner);
        }
        self.purge_sites = Some(learner);
    }

    pub fn purge_site_counts(&self) -> Option<SiteCounts> {
        self.purge_sites.as_ref().map(|l| SiteCounts {
            stepped: l.stepped_links.iter().map(|(_, name, _)| name.clone()).collect(),
            ..l.counts.clone()
        })
    }

    fn reported_callers(&self, seen: &HashSet<u64>) -> Vec<(u64, PurgeCaller)> {
        let Some(map) = self.ebpf.map(maps::PURGE_CALLERS) else { return Vec::new() };
        let Ok(map) = HashMap::<_, u64, PurgeCaller>::try_from(map) else { return Vec::new() };
        map.iter().filter_map(Result::ok).filter(|(ret, _)| !seen.contains(ret)).collect()
    }

    fn probe_call_site(&mut self, pid: u32, ret: u64, caller: PurgeCaller) -> Result<()> {
        let site = call_site(pid, ret, caller.wrapper)?;
        let pid = NonZeroU32::new(pid).ok_or_else(|| anyhow!("PID 0"))?;
        let at = UProbeAttachLocation::AbsoluteOffset(site.file_offset);
        let link = self.uprobe("purge_site", &site.open_path, at, caller.kind, pid)?;
        self.links.push(Box::new(link));
        Ok(())
    }

    fn retire_stepped(&mut self, learner: &mut Learner) {
        if learner.stepped_links.is_empty() {
            return;
        }
        let now = Instant::now();
        let calls = self.counter(counter::STEPPED_PURGES).unwrap_or(0);
        if calls != learner.stepped_calls || learner.quiet_since.is_none() {
            learner.stepped_calls = calls;
            learner.quiet_since = Some(now);
            return;
        }
        // A wrapper none of whose calls has been seen keeps its probe: its first call, from
        // wherever, is timed.
        if learner.quiet_since.is_some_and(|t| now.duration_since(t) >= RETIRE_AFTER) {
            let probed = &learner.kinds_probed;
            learner.stepped_links.retain(|(kind, _, _)| !probed.contains(kind));
        }
    }
}

/// The `call` that returns to `ret` in process `pid`, if it calls `wrapper` directly or
/// through a PLT stub.
fn call_site(pid: u32, ret: u64, wrapper: u64) -> Result<CallSite> {
    let mem = File::open(format!("/proc/{pid}/mem")).context("opening the target's memory")?;
    let read = |addr: u64, len: usize| -> Result<Vec<u8>> {
        let mut buf = vec![0; len];
        mem.read_exact_at(&mut buf, addr).with_context(|| format!("reading {addr:#x}"))?;
        Ok(buf)
    };
    let call = ret.checked_sub(5).context("return address below 5")?;
    let target = call_target(&read(call, 5)?, ret).context("not after a direct call")?;
    if target != wrapper {
        let slot = plt_slot(&read(target, 16)?, target).context("the call's target is neither the wrapper nor a PLT stub")?;
        let bound = u64::from_le_bytes(read(slot, 8)?.try_into().expect("eight bytes"));
        ensure!(bound == wrapper, "the PLT stub at {target:#x} leads elsewhere");
    }
    let maps = read_maps(pid)?;
    let m = mapping_at(&maps, call).filter(|m| m.exec).context("the call is not in an executable mapping")?;
    let open_path = m.open_path(pid).context("the call's code is not mapped from a file")?;
    Ok(CallSite { open_path, file_offset: call - m.start + m.offset })
}

/// Where a 5-byte `call rel32` ending at `ret` goes.
fn call_target(code: &[u8], ret: u64) -> Option<u64> {
    match code {
        [0xe8, rel @ ..] => Some(ret.wrapping_add_signed(i32::from_le_bytes(rel.try_into().ok()?) as i64)),
        _ => None,
    }
}

/// The GOT slot a PLT stub at `ip` jumps through: `jmp *disp(%rip)`, after the endbr64 and
/// bnd prefix of an IBT build's .plt.sec where present.
fn plt_slot(code: &[u8], ip: u64) -> Option<u64> {
    let mut at = if code.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) { 4 } else { 0 };
    if code.get(at) == Some(&0xf2) {
        at += 1;
    }
    match code.get(at..at + 6)? {
        [0xff, 0x25, disp @ ..] => {
            let disp = i32::from_le_bytes(disp.try_into().ok()?) as i64;
            Some((ip + at as u64 + 6).wrapping_add_signed(disp))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direct_call_names_its_target() {
        // call .+0x100 ending at 0x1005
        assert_eq!(call_target(&[0xe8, 0x00, 0x01, 0x00, 0x00], 0x1005), Some(0x1105));
        assert_eq!(call_target(&[0xe8, 0xfb, 0xff, 0xff, 0xff], 0x1005), Some(0x1000));
        // the tail of `call *%rax` (ff d0) is no direct call
        assert_eq!(call_target(&[0x48, 0x89, 0xc7, 0xff, 0xd0], 0x1005), None);
    }

    #[test]
    fn plt_stubs_name_their_slot() {
        // jmp *0x2fe2(%rip)
        assert_eq!(plt_slot(&[0xff, 0x25, 0xe2, 0x2f, 0x00, 0x00], 0x1000), Some(0x1000 + 6 + 0x2fe2));
        // endbr64; bnd jmp *0x10(%rip)
        let ibt = [0xf3, 0x0f, 0x1e, 0xfa, 0xf2, 0xff, 0x25, 0x10, 0x00, 0x00, 0x00];
        assert_eq!(plt_slot(&ibt, 0x2000), Some(0x2000 + 11 + 0x10));
        // a function, not a stub
        assert_eq!(plt_slot(&[0x48, 0x83, 0xec, 0x58, 0x00, 0x00], 0x1000), None);
    }
}
