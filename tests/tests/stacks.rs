//! Stacks from binaries without frame pointers, and the flame graphs made of them.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use tests::{JIT_NAME, LineClient, Proc, Tracer, assert_stack_order, stalls, stalltrace_bin};

/// Our C epoll server built with -O2 -fomit-frame-pointer: FILL touches memory, PURGE runs
/// chain_a -> chain_b -> chain_c -> chain_d -> chain_e -> madvise.
fn chain_server() -> (Proc, u16) {
    let mut child = Command::new(env!("WORKLOAD_CHAIN_SERVER")).stdout(Stdio::piped()).spawn().expect("chain_server");
    let stdout = child.stdout.take().expect("stdout");
    let proc = Proc { child };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("port line");
    (proc, line.trim().parse().expect("a port"))
}

#[test]
fn a_purge_in_a_five_function_chain_without_frame_pointers_has_all_five_in_order() {
    let (server, port) = chain_server();
    let mut client = LineClient::connect(port).unwrap();
    client.call("FILL 512").unwrap();
    let dir = std::env::temp_dir().join(format!("stalltrace-flame-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (svg, folded) = (dir.join("live.svg"), dir.join("live.folded"));
    let tracer = Tracer::start(
        server.pid(),
        &["--flame", svg.to_str().unwrap(), "--folded", folded.to_str().unwrap()],
    )
    .unwrap();
    client.call("PURGE").unwrap();
    thread::sleep(Duration::from_millis(300));
    let records = tracer.stop().unwrap();
    let purge = stalls(&records).into_iter().find(|s| s["madvise"]["calls"].as_u64() > Some(0)).expect("the purge stall");
    eprintln!("chain stack: {:#?}", tests::stack(purge));
    assert_stack_order(purge, &["main", "chain_a", "chain_b", "chain_c", "chain_d", "chain_e", "madvise"]);

    // The live session's flame graph and folded stacks hold the chain too.
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<?xml") && text.trim_end().ends_with("</svg>"), "not an SVG document");
    assert!(text.contains("chain_e") && text.contains("allocator_purge"), "frames missing from the SVG");
    let lines = std::fs::read_to_string(&folded).unwrap();
    assert!(lines.lines().any(|l| l.starts_with("allocator_purge;") && l.contains("chain_a;chain_b;chain_c;chain_d;chain_e")), "{lines}");

    // Brendan Gregg's tooling (inferno's flamegraph) reads the folded file.
    let rendered = Command::new("inferno-flamegraph").arg(&folded).output().expect("inferno-flamegraph (cargo xtask setup installs it)");
    assert!(rendered.status.success());
    assert!(String::from_utf8_lossy(&rendered.stdout).contains("chain_e"));

    // And `stalltrace flame` makes the same picture from a recorded JSON run.
    let jsonl = dir.join("run.jsonl");
    std::fs::write(&jsonl, records.iter().map(|r| r.to_string() + "\n").collect::<String>()).unwrap();
    let offline = dir.join("offline.svg");
    let status = Command::new(stalltrace_bin()).args(["flame"]).arg(&jsonl).arg("-o").arg(&offline).status().unwrap();
    assert!(status.success());
    assert!(std::fs::read_to_string(&offline).unwrap().contains("chain_e"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Code a JIT generated sits in anonymous memory that no ELF file describes: its frames are
/// named from the perf map the runtime writes (as V8 and HotSpot do), and the unwinding goes
/// on past them into the code that called it.
#[test]
fn jit_code_is_named_from_the_targets_perf_map() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_jitloop"))
        .args(["120", "1.0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("jitloop");
    let mut ready = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut ready).expect("ready line");
    let mut jit = Proc { child };
    let map = format!("/tmp/perf-{}.map", jit.pid());
    let tracer = Tracer::start(jit.pid(), &[]).unwrap();
    writeln!(jit.child.stdin.as_mut().unwrap(), "go").unwrap();
    // It loops 1 s, then exits (removing its map), which ends the session.
    thread::sleep(Duration::from_millis(1800));
    let records = tracer.stop().unwrap();
    let _ = std::fs::remove_file(&map);
    let spins: Vec<_> = stalls(&records).into_iter().filter(|s| s["verdict"] == "app_code").collect();
    assert!(!spins.is_empty(), "{records:#?}");
    let named = spins.iter().find(|s| tests::stack(s).iter().any(|f| f == JIT_NAME));
    let stall = named.unwrap_or_else(|| panic!("no stack names {JIT_NAME:?}: {spins:#?}"));
    assert_stack_order(stall, &["jitloop::main", JIT_NAME]);
}
