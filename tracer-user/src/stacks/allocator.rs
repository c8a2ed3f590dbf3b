//! Which stack frames belong to the allocator. The alloc group's default mode learns the
//! allocator's share of a stall from the CPU sampler's stacks instead of a uprobe pair on every
//! call (~0.9 us each, what bpftrace's realloc probe costs too): a stall is sampled every
//! 10 ms, a busy server calls realloc a million times a second.
use crate::probes::alloc::AllocSymbol;

/// The allocator's public entry points, and glibc's internal ones (named when libc's symbols
/// are installed). A frame inside any of them means the time is the allocator's.
const API: &[&str] = &[
    "malloc", "calloc", "realloc", "reallocarray", "free", "cfree", "posix_memalign", "aligned_alloc",
    "memalign", "valloc", "pvalloc", "malloc_trim", "mallocx", "rallocx", "xallocx", "sallocx", "dallocx",
    "sdallocx", "nallocx", "mallctl", "_int_malloc", "_int_realloc", "_int_free", "_int_memalign",
    "malloc_consolidate", "sysmalloc", "systrim", "mtrim",
];

/// Prefixes allocators give their entry points beside or instead of the plain names.
const API_PREFIXES: &[&str] = &["__libc_", "je_", "tc_", "mi_", "rp"];

/// Namespaces every function of an allocator linked into the program lives under
/// (`je_arena_ralloc`, `_mi_page_malloc`, `tcmalloc::PageHeap::New`).
const NAMESPACES: &[&str] = &["je_", "mi_", "_mi_", "tcmalloc::", "rpmalloc"];

pub struct AllocatorFrames {
    /// Basenames of libraries that are the allocator through and through (libjemalloc.so.2).
    modules: Vec<String>,
    /// The functions the user named (--alloc-funcs).
    names: Vec<String>,
}

impl AllocatorFrames {
    /// `symbols`: where the target's allocator entry points were found.
    pub fn new(symbols: &[AllocSymbol], funcs: &[String]) -> Self {
        let mut modules: Vec<String> = symbols
            .iter()
            .filter(|s| s.dedicated)
            .filter_map(|s| s.object.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect();
        modules.dedup();
        Self { modules, names: funcs.to_vec() }
    }

    /// Whether a frame (its function name, and the basename of the file it is in) is the
    /// allocator's.
    pub fn matches(&self, module: Option<&str>, name: &str) -> bool {
        if module.is_some_and(|m| self.modules.iter().any(|a| a == m)) || self.names.iter().any(|n| n == name) {
            return true;
        }
        let base = API_PREFIXES.iter().find_map(|p| name.strip_prefix(p)).unwrap_or(name);
        API.contains(&base) || NAMESPACES.iter().any(|ns| name.starts_with(ns))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn jemalloc() -> AllocatorFrames {
        let lib = PathBuf::from("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2");
        let sym = AllocSymbol { object: lib.clone(), open_path: lib, symbol: "realloc".into(), address: 0x1000, dedicated: true };
        AllocatorFrames::new(&[sym], &["realloc".to_string()])
    }

    #[test]
    fn a_dedicated_library_is_the_allocator_throughout() {
        let a = jemalloc();
        assert!(a.matches(Some("libjemalloc.so.2"), "libjemalloc.so.2+0x1dc8c"));
        assert!(!a.matches(Some("redis-check-rdb"), "zrealloc"), "the application's wrapper is its own code");
        assert!(!a.matches(Some("libc.so.6"), "memcpy"));
    }

    #[test]
    fn allocator_names_in_libc_and_in_the_program() {
        let a = jemalloc();
        assert!(a.matches(Some("libc.so.6"), "realloc"));
        assert!(a.matches(Some("libc.so.6"), "__libc_free"));
        assert!(a.matches(Some("libc.so.6"), "_int_realloc"));
        assert!(a.matches(Some("redis-server"), "je_arena_ralloc"));
        assert!(a.matches(Some("node"), "tcmalloc::PageHeap::New"));
        assert!(!a.matches(Some("libc.so.6"), "read"));
    }
}
