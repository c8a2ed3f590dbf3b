//! Finds the allocator a process really uses and where its entry points live.
//!
//! Debian's redis-server links libjemalloc.so.2 to replace malloc, so its `realloc` wins over
//! libc's (`symbols` follows the dynamic linker's order); allocators linked into the
//! executable with a prefix (`je_realloc` in Redis built from source) are probed wherever
//! they are defined.
use std::path::PathBuf;

use anyhow::Result;

use super::symbols;
use crate::target::Target;

/// Prefixes allocators export their API under when they do not replace the libc names.
const PREFIXES: &[&str] = &["je_", "tc_", "mi_", "rp"];

/// One allocator function to put a uprobe on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocSymbol {
    /// The object as the target names it (for messages).
    pub object: PathBuf,
    /// The same object reached through the target's root, for reading and attaching.
    pub open_path: PathBuf,
    pub symbol: String,
    pub address: u64,
    /// The object exists to be the allocator (a library other than libc and the loader, not
    /// the program itself): every frame in it is allocator time.
    pub dedicated: bool,
}

/// Resolves each of `funcs` (e.g. "realloc") to the definitions the target's calls reach.
pub fn resolve(target: &Target, funcs: &[String]) -> Result<Vec<AllocSymbol>> {
    let exe = symbols::exe_path(target);
    Ok(symbols::resolve(target, funcs, PREFIXES)?
        .into_iter()
        .map(|b| AllocSymbol {
            dedicated: b.object != exe && !symbols::is_libc(&b.object),
            object: b.object,
            open_path: b.open_path,
            symbol: b.symbol,
            address: b.address,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_realloc_in_this_process() {
        let me = Target::open(std::process::id()).unwrap();
        let found = resolve(&me, &["realloc".to_string()]).unwrap();
        assert!(found.iter().any(|s| s.symbol == "realloc"), "{found:?}");
    }
}
