use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds the kernel programs with the nightly toolchain and bpf-linker; the object lands in
/// OUT_DIR and `include_bytes_aligned!` embeds it in the binary.
fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "tracer-ebpf")
        .ok_or_else(|| anyhow!("tracer-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?
        .as_str();
    // The programs share tracer-common's layouts; aya-build only watches tracer-ebpf itself.
    println!("cargo:rerun-if-changed=../tracer-common/src");
    aya_build::build_ebpf(
        [Package { name: "tracer-ebpf", root_dir, ..Default::default() }],
        Toolchain::Nightly,
    )
}
