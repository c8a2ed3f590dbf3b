//! Function names for stack addresses, with blazesym.
//!
//! User addresses are turned into (file, file offset) here, from our own snapshot of the
//! target's /proc/PID/maps, and only then handed to blazesym as ELF file offsets: a stall is
//! often printed after the fact, and by then the target may have exited, taking its maps and
//! its /proc/PID/root with it. The files are opened (and kept open by blazesym) when the
//! snapshot is taken, so names still come out afterwards.
use std::{collections::HashMap, path::PathBuf};

use blazesym::{
    Pid,
    symbolize::{
        Input, Symbolized, Symbolizer, cache,
        source::{Elf, Kernel, Process, Source},
    },
};

use super::{
    perfmap::PerfMap,
    unwind::{Mapping, read_maps},
};

/// Names for user and kernel addresses. Holds one blazesym `Symbolizer` (which caches every
/// file it parsed) and the last maps snapshot of every process it was asked about; keep one
/// for the whole run. Not `Send`: blazesym's caches are single-threaded.
pub struct Symbols {
    symbolizer: Symbolizer,
    processes: HashMap<u32, Vec<Region>>,
    /// JIT code names, for addresses outside every file.
    perf_maps: HashMap<u32, PerfMap>,
    /// Where our own vDSO starts: the kernel maps the same one into every (64-bit) process,
    /// so a target's vDSO address is named by ours at the same offset.
    own_vdso: Option<u64>,
}

/// A mapping of a snapshot, with the path that opens its file from here.
struct Region {
    map: Mapping,
    path: Option<PathBuf>,
}

/// Where a user address falls.
enum Place {
    /// In a mapped file (its path from here when it is code we can symbolize), at this offset.
    File { path: Option<PathBuf>, basename: String, offset: u64 },
    /// In memory of another kind ("[vdso]", "[heap]", anonymous), this far into the mapping.
    Other { name: String, offset: u64 },
    /// In no mapping we know of.
    Unknown,
}

impl Symbols {
    pub fn new() -> Self {
        let symbolizer = Symbolizer::builder()
            .enable_demangling(true) // Rust and C++ names as written in the source
            // Only the function name is printed; skipping line tables keeps lookups cheap.
            .enable_code_info(false)
            .enable_inlined_fns(false)
            .build();
        let own_vdso = read_maps(std::process::id()).ok().and_then(|maps| maps.iter().find(|m| m.name == VDSO).map(|m| m.start));
        Self { symbolizer, processes: HashMap::new(), perf_maps: HashMap::new(), own_vdso }
    }

    /// Takes (or refreshes) the snapshot of `pid`'s maps now and opens its executable files.
    /// `user` does this by itself when needed; calling it at attach time makes sure names can
    /// be given even if the target exits before its first stack is symbolized.
    pub fn snapshot(&mut self, pid: u32) {
        let Ok(maps) = read_maps(pid) else { return }; // gone: keep the last snapshot
        let regions: Vec<Region> = maps
            .into_iter()
            .map(|map| {
                let path = if map.exec { map.open_path(pid) } else { None };
                Region { map, path }
            })
            .collect();
        for path in regions.iter().filter_map(|r| r.path.as_ref()) {
            // Pins the open file in blazesym's cache: later lookups by this path use it without
            // a fresh stat, which would fail once /proc/PID is gone. Non-ELF files just fail.
            let _ = self.symbolizer.cache(&cache::Elf::new(path.clone()).into());
        }
        self.processes.insert(pid, regions);
        self.perf_maps.entry(pid).or_insert_with(|| PerfMap::new(pid)).refresh();
    }

    /// One name per address: "function" when known (from its ELF file, or the perf map for JIT
    /// code), else "module_basename+0xfileoffset"
    /// ("[vdso]+0x..." for special mappings, "0x..." for an address in no mapping).
    pub fn user(&mut self, pid: u32, addrs: &[u64]) -> Vec<String> {
        if self.needs_snapshot(pid, addrs) {
            self.snapshot(pid);
        }
        let regions = self.processes.get(&pid).map(Vec::as_slice).unwrap_or_default();
        let places: Vec<Place> = addrs.iter().map(|&addr| place(regions, addr)).collect();
        let mut names = self.function_names(&places);
        self.jit_names(pid, addrs, &places, &mut names);
        self.vdso_names(&places, &mut names);
        for ((name, place), addr) in names.iter_mut().zip(&places).zip(addrs) {
            if name.is_none() {
                *name = Some(fallback_name(place, *addr));
            }
        }
        names.into_iter().flatten().collect()
    }

    /// Names from the target's perf map for addresses in anonymous memory, where a JIT puts
    /// its code (not the vDSO or the uprobes page, which have names of their own).
    fn jit_names(&mut self, pid: u32, addrs: &[u64], places: &[Place], names: &mut [Option<String>]) {
        if !places.iter().any(is_anonymous) {
            return;
        }
        let map = self.perf_maps.entry(pid).or_insert_with(|| PerfMap::new(pid));
        // Code compiled since the last look is appended to the file.
        map.refresh();
        for ((name, place), &addr) in names.iter_mut().zip(places).zip(addrs) {
            if name.is_none() && is_anonymous(place) {
                *name = map.name(addr).map(str::to_string);
            }
        }
    }

    /// Names for addresses in the vDSO (`clock_gettime` and friends, under every timestamp).
    fn vdso_names(&self, places: &[Place], names: &mut [Option<String>]) {
        let Some(own) = self.own_vdso else { return };
        let (indices, addrs): (Vec<usize>, Vec<u64>) = (places.iter().enumerate())
            .filter_map(|(i, p)| match p {
                Place::Other { name, offset } if name == VDSO => Some((i, own + offset)),
                _ => None,
            })
            .unzip();
        if indices.is_empty() {
            return;
        }
        let mut ours = Process::new(Pid::Slf);
        (ours.debug_syms, ours.perf_map, ours.map_files, ours.vdso) = (false, false, false, true);
        let Ok(found) = self.symbolizer.symbolize(&Source::Process(ours), Input::AbsAddr(&addrs)) else { return };
        for (&i, symbolized) in indices.iter().zip(&found) {
            names[i] = names[i].take().or_else(|| sym_name(symbolized));
        }
    }

    /// The basename of the file each user address is in, from the snapshot `user` used.
    pub fn modules(&self, pid: u32, addrs: &[u64]) -> Vec<Option<&str>> {
        let regions = self.processes.get(&pid).map(Vec::as_slice).unwrap_or_default();
        let module = |addr| region_at(regions, addr).filter(|r| r.map.is_file()).map(|r| r.map.basename());
        addrs.iter().map(|&addr| module(addr)).collect()
    }

    /// Kernel addresses (e.g. from a BPF stack map) to function names, from vmlinux when one
    /// is found, else /proc/kallsyms; "0x..." when neither knows the address.
    pub fn kernel(&mut self, addrs: &[u64]) -> Vec<String> {
        let source = Source::Kernel(Kernel::default());
        let found = self.symbolizer.symbolize(&source, Input::AbsAddr(addrs)).unwrap_or_default();
        (addrs.iter().enumerate())
            .map(|(i, addr)| found.get(i).and_then(sym_name).unwrap_or_else(|| format!("{addr:#x}")))
            .collect()
    }

    /// A first look at a process, or addresses its last snapshot does not cover (dlopen since).
    fn needs_snapshot(&self, pid: u32, addrs: &[u64]) -> bool {
        match self.processes.get(&pid) {
            None => true,
            Some(regions) => addrs.iter().any(|&addr| region_at(regions, addr).is_none()),
        }
    }

    /// blazesym's names for the places in files, asked one file at a time (it works in batches).
    fn function_names(&self, places: &[Place]) -> Vec<Option<String>> {
        let mut by_file: HashMap<&PathBuf, Vec<usize>> = HashMap::new();
        for (i, place) in places.iter().enumerate() {
            if let Place::File { path: Some(path), .. } = place {
                by_file.entry(path).or_default().push(i);
            }
        }
        let mut names = vec![None; places.len()];
        for (path, indices) in by_file {
            let offsets: Vec<u64> = indices.iter().map(|&i| file_offset(&places[i])).collect();
            let source = Source::Elf(Elf::new(path.clone()));
            // An unreadable file leaves its addresses to the module+offset fallback.
            let Ok(found) = self.symbolizer.symbolize(&source, Input::FileOffset(&offsets)) else { continue };
            for (&i, symbolized) in indices.iter().zip(&found) {
                names[i] = sym_name(symbolized);
            }
        }
        names
    }
}

impl Default for Symbols {
    fn default() -> Self {
        Self::new()
    }
}

fn region_at(regions: &[Region], addr: u64) -> Option<&Region> {
    let i = regions.partition_point(|r| r.map.start <= addr).checked_sub(1)?;
    let region = &regions[i];
    (addr < region.map.end).then_some(region)
}

fn place(regions: &[Region], addr: u64) -> Place {
    let Some(Region { map, path }) = region_at(regions, addr) else { return Place::Unknown };
    let into = addr - map.start;
    if map.is_file() {
        Place::File { path: path.clone(), basename: map.basename().to_string(), offset: map.offset + into }
    } else {
        Place::Other { name: map.name.clone(), offset: into }
    }
}

/// Anonymous memory (named by `prctl(PR_SET_VMA_ANON_NAME)` or not), or a mapping newer than
/// the snapshot.
fn is_anonymous(place: &Place) -> bool {
    match place {
        Place::Other { name, .. } => name.is_empty() || name.starts_with("[anon:"),
        Place::Unknown => true,
        Place::File { .. } => false,
    }
}

fn file_offset(place: &Place) -> u64 {
    match place {
        Place::File { offset, .. } => *offset,
        _ => unreachable!("only file places are looked up in files"),
    }
}

/// The page the kernel maps for uprobes: return trampolines and out-of-line copies of probed
/// instructions. Time a sampler finds there is a probe's own overhead (stalltrace's or another
/// tracer's), not the target's code, and the reader should be told so.
const UPROBES_MAPPING: &str = "[uprobes]";

const VDSO: &str = "[vdso]";

fn fallback_name(place: &Place, addr: u64) -> String {
    match place {
        Place::File { basename, offset, .. } => format!("{basename}+{offset:#x}"),
        Place::Other { name, offset } if name == UPROBES_MAPPING => format!("uprobe overhead ({name}+{offset:#x})"),
        Place::Other { name, offset } if !name.is_empty() => format!("{name}+{offset:#x}"),
        Place::Other { .. } | Place::Unknown => format!("{addr:#x}"),
    }
}

fn sym_name(symbolized: &Symbolized<'_>) -> Option<String> {
    symbolized.as_sym().map(|sym| public_name(&sym.name).to_string()).filter(|name| !name.is_empty())
}

/// glibc gives many functions a hidden internal alias at the same address (`__GI_madvise`);
/// the name people know is the one without the prefix.
fn public_name(name: &str) -> &str {
    name.strip_prefix("__GI_").unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The address of a function of this process and the file offset it has in our binary.
    #[test]
    fn names_a_function_of_this_process() {
        let addr = names_a_function_of_this_process as fn() as usize as u64;
        let names = Symbols::new().user(std::process::id(), &[addr, 0x10]);
        assert!(names[0].ends_with("names_a_function_of_this_process"), "{names:?}");
        assert_eq!(names[1], "0x10");
    }

    /// Every timestamp a server takes goes through the vDSO.
    #[test]
    fn names_the_vdsos_functions() {
        let pid = std::process::id();
        let vdso = read_maps(pid).unwrap().into_iter().find(|m| m.name == VDSO).expect("a vDSO");
        let addrs: Vec<u64> = (vdso.start..vdso.end).step_by(16).collect();
        let names = Symbols::new().user(pid, &addrs);
        assert!(names.iter().any(|n| n.ends_with("clock_gettime")), "{names:?}");
    }

    #[test]
    fn falls_back_to_module_and_file_offset() {
        let place = Place::File { path: None, basename: "libc.so.6".into(), offset: 0x2a1ca };
        assert_eq!(fallback_name(&place, 0x7f00_0002_a1ca), "libc.so.6+0x2a1ca");
        let vdso = Place::Other { name: "[vdso]".into(), offset: 0x9b0 };
        assert_eq!(fallback_name(&vdso, 0x7ffd_0000_09b0), "[vdso]+0x9b0");
        assert_eq!(fallback_name(&Place::Other { name: String::new(), offset: 8 }, 0x1008), "0x1008");
        let trampoline = Place::Other { name: "[uprobes]".into(), offset: 0x85 };
        assert_eq!(fallback_name(&trampoline, 0x7fff_f000_0085), "uprobe overhead ([uprobes]+0x85)");
    }

    #[test]
    fn names_a_kernel_function_from_kallsyms() {
        let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap();
        let schedule = kallsyms.lines().find_map(|line| {
            let mut cols = line.split_whitespace();
            let addr = u64::from_str_radix(cols.next()?, 16).ok()?;
            (cols.next()? == "T" && cols.next()? == "schedule").then_some(addr)
        });
        // Without privilege kallsyms shows zeros: nothing to check against.
        let Some(addr) = schedule.filter(|&a| a != 0) else { return };
        assert_eq!(Symbols::new().kernel(&[addr + 1]), ["schedule"]);
    }
}
