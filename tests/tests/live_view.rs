//! `stalltrace demo` in a real terminal (tmux): the live view shows its panels and an
//! allocator_purge stall, `q` quits, and the terminal comes back as it was.
use std::{
    fs,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use tests::stalltrace_bin;

/// A private tmux server, killed when the test ends however it ends.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Self {
        Self { socket: format!("stalltrace-test-{}", std::process::id()) }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").arg("-L").arg(&self.socket).args(args).output().expect("tmux runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "demo"])
    }

    fn wait_for(&self, what: &str, timeout: Duration, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if ok(&screen) {
                return screen;
            }
            assert!(Instant::now() < deadline, "no {what} within {timeout:?}; screen:\n{screen}");
            thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

/// (pid, comm, ppid) of every process.
fn processes() -> Vec<(u32, String, u32)> {
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (open, close) = (stat.find('(')?, stat.rfind(')')?);
            let ppid = stat[close + 2..].split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, stat[open + 1..close].to_string(), ppid))
        })
        .collect()
}

/// The demo's server: the demo-loop process whose parent is the pane's stalltrace.
fn demo_server(pane_pid: u32) -> Option<u32> {
    let procs = processes();
    let tracer = procs.iter().find(|(_, comm, ppid)| comm == "stalltrace" && *ppid == pane_pid)?.0;
    procs.iter().find(|(_, comm, ppid)| comm == "demo-loop" && *ppid == tracer).map(|p| p.0)
}

#[test]
fn demo_live_view_shows_a_purge_and_quits_cleanly() {
    let tmux = Tmux::new();
    let cmd = format!("{} demo; echo demo-exit=$?; sleep 60", stalltrace_bin().display());
    tmux.run(&["new-session", "-d", "-s", "demo", "-x", "80", "-y", "24", "sh", "-c", &cmd]);
    let screen = tmux.wait_for("allocator_purge row", Duration::from_secs(40), |s| {
        s.lines().any(|l| l.contains("allocator_purge") && l.contains("madvise"))
    });
    for panel in ["Iteration latency", "Stall causes", "Memory handed back", "Stalls ("] {
        assert!(screen.contains(panel), "no {panel} panel:\n{screen}");
    }
    assert!(screen.contains("p99"), "{screen}");
    let pane: u32 = tmux.run(&["display", "-p", "-t", "demo", "#{pane_pid}"]).trim().parse().unwrap();
    let server = demo_server(pane).expect("the demo's server runs under it");
    tmux.run(&["send-keys", "-t", "demo", "q"]);
    let after = tmux.wait_for("exit", Duration::from_secs(20), |s| s.contains("demo-exit="));
    assert!(after.contains("demo-exit=0"), "{after}");
    // The summary may have scrolled: read the pane's history too.
    let history = tmux.run(&["capture-pane", "-p", "-S", "-500", "-t", "demo"]);
    assert!(history.contains("stalltrace summary"), "no summary on the normal screen:\n{history}");
    assert_eq!(tmux.run(&["display", "-p", "-t", "demo", "#{alternate_on}"]).trim(), "0", "alternate screen left on");
    let alive = fs::read_to_string(format!("/proc/{server}/comm")).is_ok_and(|c| c.trim() == "demo-loop");
    assert!(!alive, "the demo's server {server} outlived it");
}

#[test]
fn the_live_view_shows_a_stall_while_it_lasts_and_where_it_is() {
    let server = tests::LoopServer::start(false).unwrap();
    let mut client = server.client().unwrap();
    let tmux = Tmux::new();
    let cmd = format!("{} -p {} -t 50ms", stalltrace_bin().display(), server.proc.pid());
    tmux.run(&["new-session", "-d", "-s", "demo", "-x", "120", "-y", "24", "sh", "-c", &cmd]);
    tmux.wait_for("live view", Duration::from_secs(30), |s| s.contains("Iteration latency"));
    client.call("PING").unwrap();
    let sleeper = thread::spawn(move || client.call("SLEEP 5000"));
    let screen = tmux.wait_for("in-progress banner naming the sleep", Duration::from_secs(4), |s| {
        s.lines().any(|l| l.contains("STALL IN PROGRESS") && l.contains("now in") && l.contains("sleep"))
    });
    assert!(!sleeper.is_finished(), "the stall ended before the live view showed it:\n{screen}");
    sleeper.join().unwrap().unwrap();
    tmux.wait_for("the banner to go", Duration::from_secs(3), |s| !s.contains("STALL IN PROGRESS"));
    tmux.run(&["send-keys", "-t", "demo", "q"]);
}
