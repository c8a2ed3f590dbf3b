//! User stacks without frame pointers: DWARF CFI unwinding of a stack snapshot with framehop.
//!
//! Debian builds redis-server, libjemalloc and libc without frame pointers, so `rbp` means
//! nothing there; the call frames can only be recovered from the `.eh_frame` unwind tables of
//! the mapped objects. The kernel hands us ip/sp/bp and a copy of the stack starting at `sp`;
//! the objects come from the target's /proc/PID/maps, parsed once per process and refreshed
//! when an address shows up that the last snapshot of the maps did not cover (dlopen).
use std::{
    collections::HashMap,
    fs::{self, File},
    io,
    ops::Range,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
};

use framehop::{
    ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder as _,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use object::{Object as _, ObjectSection as _, ObjectSegment as _, SegmentFlags, read::ReadCache};

/// Deeper stacks are cut here: a stall's cause is near the leaf, and a bad unwind that loops
/// between garbage addresses must end somewhere.
const MAX_FRAMES: usize = 128;

/// x86_64 pages; ELF segments are mapped at this granularity.
const PAGE_SIZE: u64 = 4096;

/// Unwinds the stacks of one target process; parsed unwind tables are kept between calls.
pub struct Unwinder {
    pid: u32,
    framehop: UnwinderX86_64<Vec<u8>>,
    cache: CacheX86_64,
    /// The last snapshot of /proc/PID/maps, sorted by address.
    maps: Vec<Mapping>,
    /// Objects handed to framehop, by the start of their executable range.
    loaded: HashMap<u64, ObjectKey>,
}

impl Unwinder {
    /// Nothing is read until the first `unwind`, so this cannot fail; for a process that is
    /// gone by then, only framehop's frame-pointer fallback is left.
    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            framehop: UnwinderX86_64::new(),
            cache: CacheX86_64::new(),
            maps: Vec::new(),
            loaded: HashMap::new(),
        }
    }

    /// Return addresses from leaf (ip) to root, already adjusted for symbol lookup (return
    /// addresses minus one, so that a call at the very end of a function is not attributed to
    /// the next one). `stack` holds the bytes at `sp..sp + stack.len()`; the walk stops where
    /// a frame needs bytes outside it, so a short copy gives a stack cut short, not a wrong one.
    pub fn unwind(&mut self, ip: u64, sp: u64, bp: u64, stack: &[u8]) -> Vec<u64> {
        let mut rescanned = false;
        if self.maps.is_empty() {
            self.rescan();
            rescanned = true;
        }
        let mut read = |addr| read_stack(stack, sp, addr);
        let mut regs = UnwindRegsX86_64::new(ip, sp, bp);
        let mut frame = FrameAddress::from_instruction_pointer(ip);
        let mut frames = Vec::new();
        while frames.len() < MAX_FRAMES {
            let pc = frame.address_for_lookup();
            frames.push(pc);
            // The module must be known before framehop unwinds out of this frame.
            if !rescanned && !self.is_mapped(pc) {
                self.rescan();
                rescanned = true;
            }
            let next = self.framehop.unwind_frame(frame, &mut regs, &mut self.cache, &mut read);
            // Ok(None) is the root (CFI marks _start's return address undefined); an error is
            // a read outside the snapshot or a rule that made no sense: keep what we have.
            match next.ok().flatten().and_then(FrameAddress::from_return_address) {
                Some(caller) => frame = caller,
                None => break,
            }
        }
        frames
    }

    /// Whether the last maps snapshot covers `addr`. Addresses in anonymous memory (JIT code)
    /// or the vDSO are covered but have no module; framehop falls back to frame pointers there.
    fn is_mapped(&self, addr: u64) -> bool {
        mapping_at(&self.maps, addr).is_some()
    }

    /// Re-reads the maps and brings framehop's module list in line with them: objects
    /// mapped since are parsed, objects unmapped since are dropped.
    fn rescan(&mut self) {
        let Ok(maps) = read_maps(self.pid) else { return }; // gone: keep what we knew
        let objects = mapped_objects(&maps);
        self.maps = maps;

        let stale: Vec<u64> = (self.loaded.iter())
            .filter(|(start, key)| !objects.iter().any(|o| o.avma.start == **start && o.key == **key))
            .map(|(start, _)| *start)
            .collect();
        for start in stale {
            self.framehop.remove_module(start);
            self.loaded.remove(&start);
        }
        for object in objects {
            if self.loaded.contains_key(&object.avma.start) {
                continue;
            }
            // An object we cannot read or parse stays unloaded; its frames use frame pointers.
            if let Some(module) = load_module(self.pid, &object) {
                self.framehop.add_module(module);
            }
            // Remembered even when it failed, so that it is not retried on every rescan.
            self.loaded.insert(object.avma.start, object.key);
        }
    }
}

/// Eight stack bytes at `addr`, if the snapshot (which starts at `sp`) holds them.
fn read_stack(stack: &[u8], sp: u64, addr: u64) -> Result<u64, ()> {
    let offset = usize::try_from(addr.checked_sub(sp).ok_or(())?).map_err(|_| ())?;
    let bytes = stack.get(offset..offset.checked_add(8).ok_or(())?).ok_or(())?;
    Ok(u64::from_le_bytes(bytes.try_into().expect("eight bytes")))
}

/// One line of /proc/PID/maps.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Mapping {
    pub start: u64,
    pub end: u64,
    pub exec: bool,
    /// Offset in the file of the byte mapped at `start`.
    pub offset: u64,
    pub dev: String,
    pub inode: u64,
    /// As the kernel prints it: a path, "[vdso]", "[heap]", "/x (deleted)", or empty.
    pub name: String,
}

impl Mapping {
    /// Mapped from a file (as opposed to anonymous memory or a kernel-provided region).
    pub fn is_file(&self) -> bool {
        self.name.starts_with('/')
    }

    /// The file this mapping shows, as a path that opens it from here: through the target's
    /// root (containers, symlinks) when that path still leads to the mapped inode, else through
    /// /proc/PID/map_files (deleted or replaced files, e.g. after a package upgrade).
    pub fn open_path(&self, pid: u32) -> Option<PathBuf> {
        if !self.is_file() {
            return None;
        }
        let rooted = PathBuf::from(format!("/proc/{pid}/root{}", self.name));
        if fs::metadata(&rooted).is_ok_and(|m| m.ino() == self.inode) {
            return Some(rooted);
        }
        let by_range = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", self.start, self.end));
        by_range.exists().then_some(by_range)
    }

    /// The file name for display: "libc.so.6" from "/usr/lib/x86_64-linux-gnu/libc.so.6".
    pub fn basename(&self) -> &str {
        let name = self.name.strip_suffix(" (deleted)").unwrap_or(&self.name);
        name.rsplit('/').next().unwrap_or(name)
    }
}

/// The target's memory map, sorted by address.
pub(crate) fn read_maps(pid: u32) -> io::Result<Vec<Mapping>> {
    Ok(parse_maps(&fs::read_to_string(format!("/proc/{pid}/maps"))?))
}

fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_maps_line).collect()
}

/// "start-end perms offset dev inode   name": the name may hold spaces, so it is the rest of
/// the line after the fifth field.
fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut rest = line;
    let mut field = || {
        rest = rest.trim_start();
        let end = rest.find(' ').unwrap_or(rest.len());
        let (field, tail) = rest.split_at(end);
        rest = tail;
        field
    };
    let (start, end) = field().split_once('-')?;
    let perms = field();
    let offset = field();
    let dev = field().to_string();
    let inode = field().parse().ok()?;
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        exec: perms.as_bytes().get(2) == Some(&b'x'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev,
        inode,
        name: rest.trim_start().to_string(),
    })
}

/// The mapping that holds `addr`, in maps sorted by address.
pub(crate) fn mapping_at(maps: &[Mapping], addr: u64) -> Option<&Mapping> {
    let i = maps.partition_point(|m| m.start <= addr).checked_sub(1)?;
    let m = &maps[i];
    (addr < m.end).then_some(m)
}

/// What identifies a mapped object: the same range re-used by another file is a new object.
#[derive(Clone, Debug, PartialEq)]
struct ObjectKey {
    name: String,
    dev: String,
    inode: u64,
}

/// One mapped instance of an ELF file that has executable code.
#[derive(Debug)]
struct MappedObject {
    key: ObjectKey,
    /// From the start of its first executable mapping to the end of its last.
    avma: Range<u64>,
    /// The mapping of the file's first page (ELF header and first PT_LOAD), if still mapped.
    head: Option<Mapping>,
    /// Its first executable mapping.
    exec: Mapping,
}

/// The objects with executable mappings. A file's mappings follow one another in the maps;
/// one that maps file offset 0 begins a new instance of the file.
fn mapped_objects(maps: &[Mapping]) -> Vec<MappedObject> {
    let mut groups: Vec<(ObjectKey, Vec<&Mapping>)> = Vec::new();
    for m in maps.iter().filter(|m| m.is_file()) {
        let key = ObjectKey { name: m.name.clone(), dev: m.dev.clone(), inode: m.inode };
        match groups.iter_mut().rev().find(|(k, _)| *k == key) {
            Some((_, group)) if m.offset != 0 => group.push(m),
            _ => groups.push((key, vec![m])),
        }
    }
    groups.into_iter().filter_map(|(key, group)| mapped_object(key, &group)).collect()
}

fn mapped_object(key: ObjectKey, group: &[&Mapping]) -> Option<MappedObject> {
    let mut execs = group.iter().filter(|m| m.exec);
    let exec = (*execs.next()?).clone();
    let end = execs.next_back().map_or(exec.end, |m| m.end);
    let head = group.iter().find(|m| m.offset == 0).map(|m| (*m).clone());
    Some(MappedObject { key, avma: exec.start..end, head, exec })
}

/// Reads the object's unwind tables and tells framehop where it is loaded.
fn load_module(pid: u32, object: &MappedObject) -> Option<Module<Vec<u8>>> {
    let file = File::open(object.exec.open_path(pid)?).ok()?;
    // Read on demand: only headers and the unwind sections, never the (possibly huge) debug info.
    let data = ReadCache::new(file);
    let elf = object::File::parse(&data).ok()?;
    let segments = load_segments(&elf);
    let base_svma = align_down(segments.iter().map(|s| s.vaddr).min()?);
    let bias = load_bias(object, &segments)?;
    Some(Module::new(
        object.key.name.clone(),
        object.avma.clone(),
        base_svma.wrapping_add(bias),
        section_info(&elf, base_svma),
    ))
}

/// An object file parsed from a file read on demand.
type ElfFile<'a> = object::File<'a, &'a ReadCache<File>>;

/// A PT_LOAD program header.
struct LoadSegment {
    vaddr: u64,
    offset: u64,
    filesz: u64,
    exec: bool,
}

fn load_segments(elf: &ElfFile<'_>) -> Vec<LoadSegment> {
    // object lists only PT_LOAD headers as segments of an ELF file.
    (elf.segments())
        .filter_map(|s| {
            let (offset, filesz) = s.file_range();
            let exec = matches!(s.flags(), SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0);
            Some(LoadSegment { vaddr: s.address(), offset, filesz, exec }).filter(|_| filesz > 0)
        })
        .collect()
}

/// Where the object sits in the process relative to the addresses its headers state (actual
/// minus stated). The first page is mapped where the lowest segment asked to be, moved by the
/// bias; when that mapping is gone, the executable mapping's own segment says the same.
fn load_bias(object: &MappedObject, segments: &[LoadSegment]) -> Option<u64> {
    if let Some(head) = &object.head {
        let lowest = align_down(segments.iter().map(|s| s.vaddr).min()?);
        return Some(head.start.wrapping_sub(lowest));
    }
    let m = &object.exec;
    let seg = segments.iter().find(|s| s.exec && align_down(s.offset) <= m.offset && m.offset < s.offset + s.filesz)?;
    // mmap keeps vaddr and offset congruent modulo the page, so the mapping's start minus its
    // offset is the segment's (vaddr - offset) moved by the bias.
    Some(m.start.wrapping_sub(m.offset).wrapping_sub(seg.vaddr.wrapping_sub(seg.offset)))
}

/// The sections framehop reads, at the addresses the file states.
fn section_info(elf: &ElfFile<'_>, base_svma: u64) -> ExplicitModuleSectionInfo<Vec<u8>> {
    let range = |name| elf.section_by_name(name).map(|s| s.address()..s.address() + s.size());
    let bytes = |name| elf.section_by_name(name).and_then(|s| s.data().ok()).map(<[u8]>::to_vec);
    let eh_frame = bytes(".eh_frame");
    // framehop reads .debug_frame only when there is no .eh_frame; don't copy it for nothing.
    let debug_frame = if eh_frame.is_none() { debug_frame(elf) } else { None };
    ExplicitModuleSectionInfo {
        base_svma,
        // Only the range: it is the base of text-relative CFI pointers. framehop 0.16 analyses
        // instruction bytes for Mach-O compact unwind info only, never for ELF, whose CFI covers
        // prologues and epilogues; copying .text would cost megabytes per library for nothing.
        text_svma: range(".text"),
        got_svma: range(".got"),
        eh_frame_svma: range(".eh_frame"),
        eh_frame,
        eh_frame_hdr_svma: range(".eh_frame_hdr"),
        eh_frame_hdr: bytes(".eh_frame_hdr"),
        debug_frame,
        ..Default::default()
    }
}

fn debug_frame(elf: &ElfFile<'_>) -> Option<Vec<u8>> {
    // uncompressed_data fails on a compressed section (object is built without decompression).
    let section = elf.section_by_name(".debug_frame")?;
    section.uncompressed_data().ok().map(|d| d.into_owned())
}

fn align_down(addr: u64) -> u64 {
    addr & !(PAGE_SIZE - 1)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        net::TcpStream,
        path::Path,
        process::{Child, Command, Stdio},
        sync::mpsc,
        thread,
        time::{Duration, Instant},
    };

    use super::*;
    use crate::stacks::{parked, symbolize::Symbols};

    #[test]
    fn parses_maps_lines_with_spaces_and_without_names() {
        let maps = parse_maps(
            "55d0a000-55d0b000 r-xp 00001000 fe:01 1234                       /opt/my app/bin\n\
             7f0000000000-7f0000001000 rw-p 00000000 00:00 0 \n\
             7ffd0000-7ffd2000 r-xp 00000000 00:00 0                          [vdso]\n",
        );
        assert_eq!(maps.len(), 3);
        assert_eq!(
            maps[0],
            Mapping {
                start: 0x55d0a000,
                end: 0x55d0b000,
                exec: true,
                offset: 0x1000,
                dev: "fe:01".into(),
                inode: 1234,
                name: "/opt/my app/bin".into(),
            }
        );
        assert_eq!(maps[1].name, "");
        assert!(!maps[2].is_file() && maps[2].exec);
        assert_eq!(mapping_at(&maps, 0x55d0afff).map(|m| m.inode), Some(1234));
        assert_eq!(mapping_at(&maps, 0x55d0b000), None);
    }

    #[test]
    fn stack_reads_stay_inside_the_snapshot() {
        let stack: Vec<u8> = (0..16).collect();
        let sp = 0x7000;
        assert_eq!(read_stack(&stack, sp, sp), Ok(u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7])));
        assert_eq!(read_stack(&stack, sp, sp + 8), Ok(u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15])));
        assert_eq!(read_stack(&stack, sp, sp + 9), Err(()), "crosses the end");
        assert_eq!(read_stack(&stack, sp, sp - 8), Err(()), "below sp");
        assert_eq!(read_stack(&stack, sp, u64::MAX), Err(()));
    }

    #[test]
    fn bias_from_the_exec_mapping_when_the_first_page_is_unmapped() {
        let exec = Mapping {
            start: 0x7f00_0000_1000,
            end: 0x7f00_0000_3000,
            exec: true,
            offset: 0x1000,
            dev: "fe:01".into(),
            inode: 1,
            name: "/lib/x.so".into(),
        };
        let key = ObjectKey { name: exec.name.clone(), dev: exec.dev.clone(), inode: 1 };
        let object = MappedObject { key, avma: exec.start..exec.end, head: None, exec };
        let segments = [
            LoadSegment { vaddr: 0, offset: 0, filesz: 0x800, exec: false },
            LoadSegment { vaddr: 0x1040, offset: 0x1040, filesz: 0x1800, exec: true },
        ];
        assert_eq!(load_bias(&object, &segments), Some(0x7f00_0000_0000));
    }

    /// The workload, killed (by PID) and reaped when dropped, with its build directory.
    struct Server {
        child: Child,
        dir: PathBuf,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    /// Builds tests/workloads/chain_server.c as the test asks of real targets: optimised, no
    /// frame pointers, no debug info. Returns the server and its port.
    fn start_chain_server() -> (Server, u16) {
        let dir = std::env::temp_dir().join(format!("stalltrace-unwind-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/workloads/chain_server.c");
        let binary = dir.join("chain_server");
        let status = Command::new("cc")
            .args(["-O2", "-fomit-frame-pointer", "-o"])
            .arg(&binary)
            .arg(&source)
            .status()
            .expect("running cc");
        assert!(status.success(), "cc failed on {}", source.display());
        let mut child = Command::new(&binary).stdout(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let server = Server { child, dir };
        let line = read_line_within(stdout, Duration::from_secs(10));
        (server, line.trim().parse().unwrap_or_else(|_| panic!("chain_server printed {line:?}")))
    }

    fn read_line_within(out: impl io::Read + Send + 'static, limit: Duration) -> String {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        rx.recv_timeout(limit).expect("no line from chain_server in time")
    }

    /// (pc, sp) of the server's main thread once it is blocked in nanosleep/clock_nanosleep.
    fn registers_in_sleep(pid: u32, limit: Duration) -> (u64, u64) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(b) = parked::blocked(pid, pid).filter(|b| matches!(b.nr, 35 | 230)) {
                return (b.pc, b.sp);
            }
            assert!(Instant::now() < deadline, "chain_server never blocked in nanosleep");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// "chain_e" for "chain_e" and for GCC clones such as "chain_e.constprop.0".
    fn base_name(name: &str) -> &str {
        name.split('.').next().unwrap_or(name)
    }

    fn position(names: &[String], wanted: &str, from: usize) -> Option<usize> {
        names.iter().skip(from).position(|n| base_name(n) == wanted).map(|i| i + from)
    }

    #[test]
    fn unwinds_and_symbolizes_a_frame_pointerless_binary() {
        let (mut server, port) = start_chain_server();
        let pid = server.child.id();
        let mut conn = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5)).unwrap();
        conn.write_all(b"SLEEP 3000\n").unwrap();

        let (pc, sp) = registers_in_sleep(pid, Duration::from_millis(2500));
        let stack = parked::read_stack(pid, sp);
        assert!(!stack.is_empty(), "could not read the stack of {pid} at {sp:#x}");
        // bp = 0: nothing may depend on frame pointers, which this binary does not keep.
        let addrs = Unwinder::new(pid).unwind(pc, sp, 0, &stack);
        let mut symbols = Symbols::new();
        let names = symbols.user(pid, &addrs);
        let shown = || format!("stack ({} bytes copied): {names:?}", stack.len());

        let mut at = 0;
        for wanted in ["chain_e", "chain_d", "chain_c", "chain_b", "chain_a", "main"] {
            at = position(&names, wanted, at).unwrap_or_else(|| panic!("no {wanted} in order in {}", shown()));
        }
        let chain_e = position(&names, "chain_e", 0).unwrap();
        assert_eq!(
            names[chain_e..chain_e + 5].iter().map(|n| base_name(n)).collect::<Vec<_>>(),
            ["chain_e", "chain_d", "chain_c", "chain_b", "chain_a"],
            "{}",
            shown()
        );

        // A shorter copy cuts the walk short where a frame needs bytes past its end; what
        // comes out is a prefix of the full stack, never a made-up frame.
        let short = Unwinder::new(pid).unwind(pc, sp, 0, &stack[..256]);
        assert!(addrs.starts_with(&short) && short.len() < addrs.len(), "{short:x?} vs {addrs:x?}");

        // The same addresses still resolve once the target is gone (stalls get printed after
        // the fact, and the target may exit first).
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        assert_eq!(symbols.user(pid, &addrs), names);
    }
}
