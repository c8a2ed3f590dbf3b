//! The target's syscall wrappers (libc's epoll_wait, madvise, accept4...) and where on each
//! a uprobe costs least.
//!
//! A syscall tracepoint makes every syscall of every process on the host take the kernel's
//! slow path: ~75 ns a syscall on this project's VMs, and redis-benchmark makes seven per
//! request (BENCHMARKS.md). A uprobe on the target's own wrapper costs nothing outside the
//! target. What it costs the target depends on the probed instruction: x86 emulates a branch
//! (~1 us a hit on this project's VMs) but single-steps anything else out of line, a second
//! trap (~12 us there). glibc's cancellable wrappers open with a rip-relative compare (stepped)
//! and a conditional jump every call passes (emulated): the probe goes on that jump.
use std::{fs, path::Path};

use anyhow::{Context as _, Result};
use object::{Object as _, ObjectSection as _};

use super::symbols::{self, Binding};
use crate::target::Target;

/// Where one wrapper gets its probe.
#[derive(Clone, Debug)]
pub struct Site {
    pub binding: Binding,
    /// Bytes past the symbol: the first instruction every call runs that the kernel emulates.
    pub offset: u64,
    /// Whether the kernel emulates the probed instruction (false: 0, stepped out of line).
    pub emulated: bool,
    /// Bytes past the symbol of the first emulated instruction after the syscall, where a
    /// wrapper that has none before it can be probed at its return instead (`purge_site`
    /// in tracer-common); None where the stack pointer moves before it.
    pub returned: Option<u64>,
}

impl Site {
    /// For the startup banner: `libc.so.6:epoll_wait+0xa`, `libc.so.6:madvise` where the
    /// site is after the syscall, or `libc.so.6:mremap (stepped)` where x86 emulates no
    /// instruction on the way to the syscall or after it (fine for calls made rarely).
    pub fn describe(&self) -> String {
        let object = &self.binding.object;
        let file = object.file_name().map_or_else(|| object.display().to_string(), |f| f.to_string_lossy().into_owned());
        match (self.emulated, self.returned) {
            (true, _) => format!("{file}:{}+{:#x}", self.binding.symbol, self.offset),
            (false, Some(_)) => format!("{file}:{}", self.binding.symbol),
            (false, None) => format!("{file}:{} (stepped)", self.binding.symbol),
        }
    }
}

/// The wrappers among `funcs` that the target's calls reach, each with its probe site.
pub fn sites(target: &Target, funcs: &[&str]) -> Result<Vec<Site>> {
    let names: Vec<String> = funcs.iter().map(|f| f.to_string()).collect();
    Ok(symbols::resolve(target, &names, &[])?
        .into_iter()
        .map(|binding| {
            let code = prologue(&binding.open_path, binding.address).unwrap_or_default();
            let offset = emulated_offset(&code, binding.address);
            let returned = returned_offset(&code, binding.address);
            Site { binding, offset: offset.unwrap_or(0), emulated: offset.is_some(), returned }
        })
        .collect())
}

/// How many of a function's first bytes are looked at: its straight-line prologue.
const PROLOGUE_BYTES: usize = 64;

/// A function's first `PROLOGUE_BYTES`; empty off x86-64, where nothing here applies.
fn prologue(path: &Path, address: u64) -> Result<Vec<u8>> {
    if !cfg!(target_arch = "x86_64") {
        return Ok(Vec::new());
    }
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = object::File::parse(&*data)?;
    let Some(section) = file.sections().find(|s| s.address() <= address && address < s.address() + s.size()) else {
        return Ok(Vec::new());
    };
    let bytes = section.data()?;
    let start = (address - section.address()) as usize;
    let end = bytes.len().min(start + PROLOGUE_BYTES);
    Ok(bytes.get(start..end).unwrap_or_default().to_vec())
}

/// The offset of the first instruction in `code` (a function's first bytes, at `ip`) that
/// every call executes and x86's uprobes emulate, if the straight-line code before it leaves
/// untouched what the programs read at the probe: the argument registers and the stack
/// pointer (a return probe finds the return address at the stack pointer).
pub fn emulated_offset(code: &[u8], ip: u64) -> Option<u64> {
    use iced_x86::{Decoder, DecoderOptions, FlowControl, InstructionInfoFactory};
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            return None;
        }
        let at = (insn.ip() - ip) as usize;
        if emulated(&code[at..at + insn.len()]) {
            return Some(at as u64);
        }
        // Past a branch not every call runs the next instruction.
        if insn.flow_control() != FlowControl::Next || clobbers_probe_state(info.info(&insn)) {
            return None;
        }
    }
    None
}

/// The offset of the first emulated instruction after the syscall in `code` (a wrapper's
/// first bytes, at `ip`), if every call runs straight to it and nothing before it moves the
/// stack pointer: there the call is over and its return address is at the stack pointer.
pub fn returned_offset(code: &[u8], ip: u64) -> Option<u64> {
    use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, InstructionInfoFactory, OpAccess, Register};
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    let mut after_syscall = false;
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            return None;
        }
        let at = (insn.ip() - ip) as usize;
        if after_syscall && emulated(&code[at..at + insn.len()]) {
            return Some(at as u64);
        }
        let moves_sp = info.info(&insn).used_registers().iter().any(|r| {
            r.register().full_register() == Register::RSP && !matches!(r.access(), OpAccess::Read | OpAccess::None)
        });
        if insn.code() == Code::Syscall {
            after_syscall = true;
        } else if insn.flow_control() != FlowControl::Next || moves_sp {
            return None;
        }
    }
    None
}

/// Instructions arch/x86/kernel/uprobes.c emulates without stepping: relative jumps, calls
/// and conditional jumps, and a plain nop. Any prefix (0x66 is refused for branches) sends
/// an instruction to the out-of-line step, so only bare encodings count.
fn emulated(bytes: &[u8]) -> bool {
    matches!(
        bytes,
        [0x90] | [0x70..=0x7f | 0xeb, _] | [0xe8 | 0xe9, _, _, _, _] | [0x0f, 0x80..=0x8f, _, _, _, _]
    )
}

fn clobbers_probe_state(info: &iced_x86::InstructionInfo) -> bool {
    use iced_x86::{OpAccess, Register};
    const KEPT: [Register; 7] =
        [Register::RSP, Register::RDI, Register::RSI, Register::RDX, Register::RCX, Register::R8, Register::R9];
    let writes = |a: OpAccess| !matches!(a, OpAccess::None | OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess);
    info.used_registers().iter().any(|r| writes(r.access()) && KEPT.contains(&r.register().full_register()))
        || info.used_memory().iter().any(|m| writes(m.access()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: u64 = 0x108ee0;

    #[test]
    fn glibc_cancellable_wrapper_probes_the_jump() {
        // epoll_wait: cmpb $0,__libc_single_threaded(%rip); mov %ecx,%r10d; je; mov $0xe8,%eax; syscall
        let code = [
            0x80, 0x3d, 0xf1, 0x26, 0x0d, 0x00, 0x00, 0x41, 0x89, 0xca, 0x74, 0x14, 0xb8, 0xe8, 0x00, 0x00, 0x00, 0x0f,
            0x05,
        ];
        assert_eq!(emulated_offset(&code, IP), Some(10));
    }

    #[test]
    fn plain_wrapper_has_no_emulated_site_before_its_syscall() {
        // shutdown: mov $0x30,%eax; syscall; cmp; jae
        let code = [0xb8, 0x30, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, 0x73, 0x01];
        assert_eq!(emulated_offset(&code, IP), None);
    }

    #[test]
    fn plain_wrapper_is_probed_on_the_jump_after_its_syscall() {
        // madvise: mov $0x1c,%eax; syscall; cmp $-4095,%rax; jae; ret
        let code = [0xb8, 0x1c, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, 0x73, 0x01, 0xc3];
        assert_eq!(returned_offset(&code, IP), Some(13));
    }

    #[test]
    fn a_wrapper_with_a_frame_has_no_return_site() {
        // mremap: sub $0x58,%rsp; ...; mov $0x19,%eax; syscall; cmp; ja
        let code = [
            0x48, 0x83, 0xec, 0x58, 0xb8, 0x19, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x3d, 0x00, 0xf0, 0xff, 0xff, 0x77,
            0x58,
        ];
        assert_eq!(returned_offset(&code, IP), None);
        // a branch before the syscall: not every call reaches it
        assert_eq!(returned_offset(&[0x74, 0x14, 0x0f, 0x05, 0x73, 0x01], IP), None);
    }

    #[test]
    fn a_moved_stack_pointer_or_argument_rules_a_site_out() {
        // sub $0x58,%rsp; ja
        assert_eq!(emulated_offset(&[0x48, 0x83, 0xec, 0x58, 0x77, 0x5a], IP), None);
        // mov %rdx,%rsi; je
        assert_eq!(emulated_offset(&[0x48, 0x89, 0xd6, 0x74, 0x14], IP), None);
        // a store; je
        assert_eq!(emulated_offset(&[0x48, 0x89, 0x44, 0x24, 0x18, 0x74, 0x14], IP), None);
    }

    #[test]
    fn prefixed_branches_are_stepped() {
        // 66 e9: jmp with an operand-size prefix
        assert_eq!(emulated_offset(&[0x66, 0xe9, 0x00, 0x00], IP), None);
        // bnd jmp
        assert_eq!(emulated_offset(&[0xf2, 0xe9, 0, 0, 0, 0], IP), None);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn this_machines_epoll_wait_gets_an_emulated_site() {
        let me = Target::open(std::process::id()).unwrap();
        let found = sites(&me, &["epoll_wait", "epoll_pwait"]).unwrap();
        assert!(!found.is_empty(), "no epoll wrappers in this process");
        for site in &found {
            assert!(site.emulated && site.offset > 0, "{site:?}");
        }
    }
}
