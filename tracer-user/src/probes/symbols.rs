//! Which object's definition of a function a process really calls, and at what address.
//!
//! The dynamic linker binds a name to the first definition in its search order: the
//! executable, then LD_PRELOAD, then the libraries, libc last among them here (a library
//! other than libc that defines `realloc` is there to replace malloc). Names with a prefix
//! (`je_realloc` in Redis built from source) are called directly and are found wherever they
//! are defined.
use std::{
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use object::{Object as _, ObjectSymbol as _, SymbolKind};

use crate::target::Target;

/// One function in one object the target maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The object as the target names it (for messages).
    pub object: PathBuf,
    /// The same object reached through the target's root, for reading and attaching.
    pub open_path: PathBuf,
    pub symbol: String,
    /// The symbol's value in the object (a virtual address before relocation).
    pub address: u64,
}

/// An executable object mapped by the target, with the wanted symbols it defines.
struct MappedObject {
    path: PathBuf,
    open_path: PathBuf,
    defined: Vec<(String, u64)>,
}

impl MappedObject {
    fn address_of(&self, name: &str) -> Option<u64> {
        self.defined.iter().find(|(n, _)| n == name).map(|&(_, a)| a)
    }
}

/// Each of `funcs` where the target's calls reach it, and each `prefix`+func wherever defined.
pub fn resolve(target: &Target, funcs: &[String], prefixes: &[&str]) -> Result<Vec<Binding>> {
    let wanted: Vec<String> = funcs
        .iter()
        .flat_map(|f| std::iter::once(f.clone()).chain(prefixes.iter().map(move |p| format!("{p}{f}"))))
        .collect();
    let objects = mapped_objects(target, &wanted)?;
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    for func in funcs {
        if let Some((obj, addr)) = binding_for(&objects, func, target) {
            push_unique(&mut found, &mut seen, obj, func, addr);
        }
        for prefix in prefixes {
            let name = format!("{prefix}{func}");
            for obj in &objects {
                if let Some(addr) = obj.address_of(&name) {
                    push_unique(&mut found, &mut seen, obj, &name, addr);
                }
            }
        }
    }
    Ok(found)
}

pub fn is_libc(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.starts_with("libc.so") || name.starts_with("libc-") || name.starts_with("ld-linux")
}

pub fn exe_path(target: &Target) -> PathBuf {
    fs::read_link(format!("/proc/{}/exe", target.pid)).unwrap_or_default()
}

fn push_unique(found: &mut Vec<Binding>, seen: &mut HashSet<(PathBuf, u64)>, obj: &MappedObject, symbol: &str, address: u64) {
    // Aliases (realloc and je_realloc at one address) would count every call twice.
    if seen.insert((obj.path.clone(), address)) {
        found.push(Binding {
            object: obj.path.clone(),
            open_path: obj.open_path.clone(),
            symbol: symbol.to_string(),
            address,
        });
    }
}

/// The object the dynamic linker binds an unprefixed `func` to.
fn binding_for<'a>(objects: &'a [MappedObject], func: &str, target: &Target) -> Option<(&'a MappedObject, u64)> {
    let preload = preloaded(target);
    let exe = exe_path(target);
    let rank = |o: &MappedObject| -> u8 {
        if o.path == exe {
            0
        } else if preload.iter().any(|p| p == &o.path || p.file_name() == o.path.file_name()) {
            1
        } else if is_libc(&o.path) {
            3
        } else {
            2
        }
    };
    objects
        .iter()
        .filter_map(|o| o.address_of(func).map(|a| (o, a)))
        .min_by_key(|(o, _)| rank(o))
}

/// LD_PRELOAD entries from the target's environment (space- or colon-separated).
fn preloaded(target: &Target) -> Vec<PathBuf> {
    let Ok(env) = fs::read(format!("/proc/{}/environ", target.pid)) else { return Vec::new() };
    env.split(|&b| b == 0)
        .filter_map(|kv| kv.strip_prefix(b"LD_PRELOAD="))
        .flat_map(|v| String::from_utf8_lossy(v).split([' ', ':']).map(PathBuf::from).collect::<Vec<_>>())
        .filter(|p| !p.as_os_str().is_empty())
        .collect()
}

/// Executable file mappings of the target, in /proc/PID/maps order, with their symbols.
fn mapped_objects(target: &Target, wanted: &[String]) -> Result<Vec<MappedObject>> {
    let maps = fs::read_to_string(format!("/proc/{}/maps", target.pid))
        .with_context(|| format!("reading /proc/{}/maps", target.pid))?;
    let mut seen = HashSet::new();
    let mut objects = Vec::new();
    for path in executable_paths(&maps) {
        if !seen.insert(path.clone()) {
            continue;
        }
        let open_path = target.root().join(path.strip_prefix("/").unwrap_or(&path));
        let defined = defined_symbols(&open_path, wanted).unwrap_or_default();
        objects.push(MappedObject { path, open_path, defined });
    }
    Ok(objects)
}

fn executable_paths(maps: &str) -> impl Iterator<Item = PathBuf> + '_ {
    maps.lines().filter_map(|line| {
        let mut cols = line.split_whitespace();
        let perms = cols.nth(1)?;
        let path = cols.nth(3)?;
        (perms.contains('x') && path.starts_with('/')).then(|| PathBuf::from(path))
    })
}

/// Function symbols among `wanted` that `path` defines, from .dynsym and .symtab.
fn defined_symbols(path: &Path, wanted: &[String]) -> Result<Vec<(String, u64)>> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = object::File::parse(&*data).with_context(|| format!("parsing {}", path.display()))?;
    let mut out = Vec::new();
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        if sym.is_undefined() || sym.kind() != SymbolKind::Text || sym.address() == 0 {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        // glibc versions its exports (realloc@@GLIBC_2.2.5); the base name is what callers bind.
        let base = name.split('@').next().unwrap_or(name);
        if wanted.iter().any(|w| w == base) && !out.iter().any(|(n, _)| n == base) {
            out.push((base.to_string(), sym.address()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_executable_file_mappings() {
        let maps = "\
55d0-55d1 r--p 00000000 08:01 1 /usr/bin/redis-check-rdb
55d1-55d2 r-xp 00001000 08:01 1 /usr/bin/redis-check-rdb
7f00-7f01 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2
7f02-7f03 rw-p 00000000 00:00 0
7ffd-7ffe r-xp 00000000 00:00 0 [vdso]";
        let paths: Vec<_> = executable_paths(maps).collect();
        assert_eq!(
            paths,
            [PathBuf::from("/usr/bin/redis-check-rdb"), PathBuf::from("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")]
        );
    }

    #[test]
    fn finds_epoll_wait_in_this_process() {
        let me = Target::open(std::process::id()).unwrap();
        let found = resolve(&me, &["epoll_wait".to_string()], &[]).unwrap();
        assert!(found.iter().any(|b| b.symbol == "epoll_wait" && is_libc(&b.object)), "{found:?}");
    }
}
