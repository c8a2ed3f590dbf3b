//! `cargo xtask`: everything a fresh machine needs, behind one command each.
//!
//! setup  installs what building and testing need (idempotent: seconds when nothing is missing)
//! build  builds the workspace, kernel programs included
//! demo   setup + build, then `stalltrace demo` with any further arguments
//! test   setup + build, then every test, as root, one integration test at a time
//! bench  setup + release build, then the benchmarks; writes BENCHMARKS.md
mod bench;
mod setup;

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = args.split_first().map(|(c, r)| (c.as_str(), r)).unwrap_or(("help", &[]));
    match cmd {
        "setup" => setup::run(),
        "build" => {
            setup::run()?;
            build()
        }
        "demo" => {
            setup::run()?;
            build()?;
            run_cmd(Command::new(stalltrace_bin()).arg("demo").args(rest))
        }
        "test" => {
            setup::run()?;
            build()?;
            test(rest)
        }
        "bench" => {
            setup::run()?;
            build_release()?;
            bench::run(rest)
        }
        _ => {
            eprintln!("usage: cargo xtask <setup|build|demo|test|bench> [args]");
            if cmd == "help" { Ok(()) } else { bail!("unknown command {cmd:?}") }
        }
    }
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn stalltrace_bin() -> std::path::PathBuf {
    workspace_root().join("target/debug/stalltrace")
}

fn build() -> Result<()> {
    run_cmd(Command::new("cargo").args(["build", "--bins"]).current_dir(workspace_root()))
}

/// Benchmarks measure optimised code: stalltrace and the hotloop workload.
fn build_release() -> Result<()> {
    run_cmd(Command::new("cargo").args(["build", "--release", "--bins"]).current_dir(workspace_root()))
}

fn test(extra: &[String]) -> Result<()> {
    // Default members only: tracer-ebpf builds for the BPF target alone. Integration tests
    // trace real processes: one at a time, so that their timing is not another test's noise.
    let mut child = Command::new("cargo")
        .args(["test"])
        .args(extra)
        .args(["--", "--test-threads=1"])
        .env("STALLTRACE_BIN", stalltrace_bin())
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = parse_result(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    // cargo ends on the (empty) doc-test run; this total is the line that says what ran.
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

/// (passed, failed) from a libtest line such as "test result: ok. 6 passed; 0 failed; ...".
fn parse_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split(';')
            .find_map(|part| part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(word))
            .and_then(|n| n.trim().parse().ok())
    };
    Some((count(" passed")?, count(" failed")?))
}

pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_result;

    #[test]
    fn reads_libtest_totals() {
        assert_eq!(parse_result("test result: ok. 6 passed; 0 failed; 0 ignored; 0 measured"), Some((6, 0)));
        assert_eq!(parse_result("test result: FAILED. 5 passed; 1 failed; 0 ignored"), Some((5, 1)));
        assert_eq!(parse_result("running 6 tests"), None);
    }
}
