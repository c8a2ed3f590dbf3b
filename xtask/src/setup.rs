//! Fresh-machine bootstrap. Every step first checks whether it is needed, so a second run
//! changes nothing and takes seconds.
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::run_cmd;

/// Debian packages: LLVM 22 for bpf-linker, the C toolchain for test workloads, and the real
/// servers and tools the tests drive.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "gcc",
    "libjemalloc2",
    "redis-server",
    "redis-tools",
    "iproute2",
    "tmux",
    "bpftool",
    "prometheus",
];

const BPF_LINKER_VERSION: &str = "0.13";

pub fn run() -> Result<()> {
    apt_install(APT_PACKAGES)?;
    nightly()?;
    bpf_linker()?;
    inferno()?;
    Ok(())
}

/// inferno's flamegraph, the tool users render folded stacks with; the tests check that ours
/// render with it.
fn inferno() -> Result<()> {
    // It has no --version; --help answers when it is installed.
    if Command::new("inferno-flamegraph").arg("--help").output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    eprintln!("xtask setup: installing inferno (inferno-flamegraph)");
    run_cmd(Command::new("cargo").args(["install", "inferno", "--version", "~0.12", "--locked"]))
}

/// Installs those of `packages` that dpkg does not list as installed (nothing, quickly, when
/// none is missing).
pub(crate) fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask setup: installing {}", missing.join(" "));
    let sudo = if euid_is_root() { None } else { Some("sudo") };
    let apt = |args: &[&str]| {
        let mut cmd = match sudo {
            Some(s) => {
                let mut c = Command::new(s);
                c.arg("apt-get");
                c
            }
            None => Command::new("apt-get"),
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run_cmd(apt(&["update", "-q"]).stdout(Stdio::null()))?;
    run_cmd(apt(&["install", "-y", "-q", "--no-install-recommends"]).args(&missing).stdout(Stdio::null()))
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn euid_is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The kernel programs build with nightly's -Z build-std, which needs rust-src.
fn nightly() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("running rustup")?;
    if installed.status.success() && String::from_utf8_lossy(&installed.stdout).contains("rust-src") {
        return Ok(());
    }
    eprintln!("xtask setup: adding the nightly toolchain's rust-src");
    if !installed.status.success() {
        run_cmd(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker links the BPF object; it must be built against the LLVM nightly rustc uses (22).
fn bpf_linker() -> Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = &version
        && String::from_utf8_lossy(&out.stdout).contains(&format!("bpf-linker {BPF_LINKER_VERSION}"))
    {
        return Ok(());
    }
    eprintln!("xtask setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)");
    let status = Command::new("cargo")
        .args(["install", "bpf-linker", "--version", &format!("~{BPF_LINKER_VERSION}")])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22")
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed: {status}");
    }
    Ok(())
}
