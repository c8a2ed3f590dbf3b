//! The tracers a workload runs under: nothing, stalltrace with some probe groups, or bpftrace
//! with a script doing much of what stalltrace's probes do. Each starts attached or not at all.
use std::{
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::procs::{self, Proc};

const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// Detaching waits for RCU grace periods, one or more per probe, which a busy VM stretches.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
const SLOW_STOP: Duration = Duration::from_secs(5);

/// Every group, with the allocator timed per call by uprobes rather than sampled.
pub const ALL_ALLOC_CALLS: &str = "all --alloc-calls";
/// The default groups on syscall tracepoints, as before they moved to the libc wrappers.
pub const DEFAULT_TRACEPOINTS: &str = "default --syscall-probes tracepoints";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Untraced,
    /// `stalltrace -p PID --probes <groups> [more options]`.
    Stalltrace(&'static str),
    Bpftrace,
    /// `stalltrace daemon` with a config naming the PID.
    Daemon,
}

impl Variant {
    pub fn label(self) -> String {
        match self {
            Variant::Untraced => "untraced".into(),
            Variant::Stalltrace("default") => "stalltrace".into(),
            Variant::Stalltrace(groups) => format!("stalltrace --probes {groups}"),
            Variant::Bpftrace => "bpftrace".into(),
            Variant::Daemon => "stalltrace daemon".into(),
        }
    }

    /// Attaches to `pid` and returns once the probes are live (None: nothing to attach).
    pub fn attach(self, stalltrace: &Path, pid: u32) -> Result<Option<Proc>> {
        match self {
            Variant::Untraced => Ok(None),
            Variant::Stalltrace(groups) => {
                // JSON to a file: its summary says whether any record was lost under the load.
                let out = std::fs::File::create(json_path(pid, groups)).context("stalltrace's output file")?;
                let mut cmd = Command::new(stalltrace);
                cmd.args(["-p", &pid.to_string(), "--probes"]).args(groups.split_whitespace()).arg("--json").stdout(out);
                start_stalltrace(cmd).map(Some)
            }
            Variant::Bpftrace => start_bpftrace(pid).map(Some),
            Variant::Daemon => start_daemon(stalltrace, pid).map(Some),
        }
    }
}

fn json_path(pid: u32, groups: &str) -> std::path::PathBuf {
    let name: String = groups.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    std::env::temp_dir().join(format!("stalltrace-bench-{pid}-{name}.jsonl"))
}

impl Variant {
    /// The summary record of this stalltrace variant's last session on `pid`, once stopped.
    pub fn summary(self, pid: u32) -> Option<serde_json::Value> {
        let Variant::Stalltrace(groups) = self else { return None };
        let path = json_path(pid, groups);
        let text = std::fs::read_to_string(&path).ok()?;
        let _ = std::fs::remove_file(&path);
        text.lines().rev().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find(|v| v["type"] == "summary")
    }
}

/// The daemon with a config that names `pid`; its journal and metrics stay in a temp dir.
fn start_daemon(stalltrace: &Path, pid: u32) -> Result<Proc> {
    let dir = std::env::temp_dir().join(format!("stalltrace-bench-daemon-{pid}"));
    std::fs::create_dir_all(&dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let config = format!(
        "[[target]]\npid = {pid}\nthreshold = \"50ms\"\n[journal]\npath = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
        dir.join("stalls.jsonl").display()
    );
    std::fs::write(dir.join("stalltrace.toml"), config)?;
    let mut cmd = Command::new(stalltrace);
    cmd.args(["daemon", "--config"]).arg(dir.join("stalltrace.toml")).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut proc = Proc::spawn("stalltrace daemon", &mut cmd)?;
    let stderr = procs::lines(proc.take_stderr());
    procs::wait_for_line(&stderr, "attached to PID", ATTACH_TIMEOUT, "stalltrace daemon")?;
    // The daemon has read its config and holds its journal open: the names can go now.
    let _ = std::fs::remove_dir_all(&dir);
    Ok(proc)
}

/// Spawns a stalltrace command and waits until it is attached.
pub fn start_stalltrace(mut cmd: Command) -> Result<Proc> {
    let mut proc = Proc::spawn("stalltrace", cmd.stderr(Stdio::piped()))?;
    wait_attached(&mut proc)?;
    Ok(proc)
}

/// Waits for stalltrace's banner, printed on stderr (which must be piped) once every probe
/// is attached. The rest of stderr is drained in the background.
pub fn wait_attached(stalltrace: &mut Proc) -> Result<()> {
    let stderr = procs::lines(stalltrace.take_stderr());
    procs::wait_for_line(&stderr, "tracing PID", ATTACH_TIMEOUT, "stalltrace").map(drop)
}

/// SIGINT, as Ctrl-C: the tracer prints its summary and detaches.
pub fn stop(mut proc: Proc) -> Result<procs::Exit> {
    let t = Instant::now();
    let exit = proc.stop(libc::SIGINT, STOP_TIMEOUT)?;
    if !exit.success {
        bail!("{} exited with an error", proc.name());
    }
    if t.elapsed() > SLOW_STOP {
        eprintln!("xtask bench: {} took {:.1}s to detach and exit", proc.name(), t.elapsed().as_secs_f64());
    }
    Ok(exit)
}

fn start_bpftrace(pid: u32) -> Result<Proc> {
    let script = std::env::temp_dir().join(format!("stalltrace-bench-{pid}.bt"));
    let text = bpftrace_script(&pid.to_string(), &allocator_object(pid)?);
    std::fs::write(&script, text).context("writing the bpftrace script")?;
    let mut proc = Proc::spawn(
        "bpftrace",
        Command::new("bpftrace").arg(&script).stdout(Stdio::piped()).stderr(Stdio::null()),
    )?;
    let stdout = procs::lines(proc.take_stdout());
    procs::wait_for_line(&stdout, "Attaching", ATTACH_TIMEOUT, "bpftrace")?;
    // "Attaching N probes..." comes before the last probes are live.
    thread::sleep(Duration::from_secs(1));
    let _ = std::fs::remove_file(&script);
    Ok(proc)
}

/// The object in `pid`'s address space that defines `realloc`: an allocator library (Debian's
/// redis-server links libjemalloc.so.2) if one is mapped, else libc.
fn allocator_object(pid: u32) -> Result<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let paths: Vec<&str> = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).collect();
    let find = |name: &str| paths.iter().find(|p| p.contains(name)).map(|p| p.to_string());
    find("jemalloc")
        .or_else(|| find("tcmalloc"))
        .or_else(|| find("mimalloc"))
        .or_else(|| find("/libc.so"))
        .with_context(|| format!("PID {pid} maps no allocator library"))
}

/// Much of what stalltrace's probes do, as bpftrace: madvise and epoll_wait durations per
/// thread (parts of the purge and loop groups), the realloc uprobe pair (alloc) and off-CPU
/// time (sched).
pub fn bpftrace_script(pid: &str, allocator: &str) -> String {
    format!(
        r#"tracepoint:syscalls:sys_enter_madvise /pid == {pid}/ {{ @madvise_start[tid] = nsecs; }}
tracepoint:syscalls:sys_exit_madvise /pid == {pid} && @madvise_start[tid]/ {{
  @madvise_ns[tid] = sum(nsecs - @madvise_start[tid]); delete(@madvise_start[tid]);
}}
uprobe:{allocator}:realloc /pid == {pid}/ {{ @realloc_start[tid] = nsecs; }}
uretprobe:{allocator}:realloc /pid == {pid} && @realloc_start[tid]/ {{
  @realloc_ns[tid] = sum(nsecs - @realloc_start[tid]); delete(@realloc_start[tid]);
}}
tracepoint:syscalls:sys_enter_epoll_wait /pid == {pid}/ {{ @epoll_start[tid] = nsecs; }}
tracepoint:syscalls:sys_exit_epoll_wait /pid == {pid} && @epoll_start[tid]/ {{
  @epoll_ns[tid] = sum(nsecs - @epoll_start[tid]); delete(@epoll_start[tid]);
}}
tracepoint:sched:sched_switch {{
  if (pid == {pid}) {{ @off_start[tid] = nsecs; }}
  if (@off_start[args->next_pid]) {{
    @off_cpu_ns[args->next_pid] = sum(nsecs - @off_start[args->next_pid]);
    delete(@off_start[args->next_pid]);
  }}
}}
"#
    )
}
