//! Builds the C workloads the way distributions build their binaries: optimized and without
//! frame pointers, so that stacks must come from .eh_frame.
use std::{env, path::PathBuf, process::Command};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    for name in ["chain_server", "pool_server"] {
        let src = format!("workloads/{name}.c");
        println!("cargo:rerun-if-changed={src}");
        let bin = out.join(name);
        let status = Command::new("cc")
            .args(["-O2", "-fomit-frame-pointer", "-pthread", "-o"])
            .arg(&bin)
            .arg(&src)
            .status()
            .expect("running cc (cargo xtask setup installs gcc)");
        assert!(status.success(), "cc {src} failed");
        println!("cargo:rustc-env=WORKLOAD_{}={}", name.to_uppercase(), bin.display());
    }
}
