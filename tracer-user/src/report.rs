//! What stalltrace prints: a line (or a JSON object) per stall, and a summary at exit.
use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    time::{Duration, Instant},
};

use anyhow::Result;
use serde::Serialize;

use crate::{
    app::App,
    attribution::{Stall, Verdict},
    histogram::{Bucket, Histogram, Percentiles, human_bytes, human_ns},
    net::{ListenerSample, NetDelta, storm::Storm},
    ongoing::Ongoing,
    session::{Event, Session},
    starvation::Starvation,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Human,
    Json,
}

#[derive(Serialize)]
struct ThreadSummary<'a> {
    tid: u32,
    comm: &'a str,
    iterations: u64,
    percentiles: Percentiles,
    histogram: Vec<Bucket>,
}

#[derive(Serialize)]
struct Summary<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    pid: u32,
    traced_ns: u64,
    iterations: u64,
    stalls: u64,
    by_verdict: &'a BTreeMap<Verdict, u64>,
    storms: usize,
    lost: u64,
    stacks: u64,
    starvations: u64,
    lost_stacks: u64,
    untracked_threads: u64,
    threads_without_histogram: u64,
    late_begins: u64,
    untimed_purges: u64,
    /// Where purge wrappers are probed at their return: their call sites probed, refused,
    /// and the wrappers whose stepped entry probe is still on.
    #[serde(skip_serializing_if = "Option::is_none")]
    purge_sites: Option<crate::probes::callsites::SiteCounts>,
    threads: Vec<ThreadSummary<'a>>,
    listeners: Vec<ListenerSummary>,
    /// TcpExtListenOverflows of the target's namespace over the session: the cross-check for
    /// the listeners' overflows.
    #[serde(skip_serializing_if = "Option::is_none")]
    netns_listen_overflows: Option<u64>,
}

#[derive(Serialize)]
struct ListenerSummary {
    listener: String,
    backlog: u32,
    #[serde(flatten)]
    totals: NetDelta,
}

fn listener_summaries(per: &[(ListenerSample, NetDelta)]) -> Vec<ListenerSummary> {
    per.iter()
        .map(|(l, d)| ListenerSummary { listener: l.key.to_string(), backlog: l.backlog, totals: d.clone() })
        .collect()
}

fn net_text(net: Option<&(Vec<(ListenerSample, NetDelta)>, u64)>) -> String {
    let Some((per, netns)) = net else { return String::new() };
    let mut out = String::new();
    for (l, d) in per {
        out += &format!(
            "\n   listener {} (backlog {}): {} new connections, {} overflows ({} SYN, {} final ACK), {} RSTs sent, {} received, queue max {}\n",
            l.key, l.backlog, d.new_connections, d.overflows, d.syn_drops, d.ack_overflows, d.rst_sent, d.rst_received, d.max_queue
        );
    }
    if !per.is_empty() {
        out += &format!("   the namespace's TcpExtListenOverflows rose by {netns}\n");
    }
    out
}

/// The line-oriented front end: a record per stall as it arrives, text histograms every
/// `interval` (text only), and the summary when the session ends.
pub fn run(session: &mut Session, format: Format, interval: Option<Duration>) -> Result<()> {
    let reporter = Reporter::new(format);
    reporter.note(&session.banner());
    let mut last = Vec::new();
    let mut next_tick = interval.map(|i| Instant::now() + i);
    let reason = loop {
        session.wait(Duration::from_millis(100));
        for e in session.drain(false) {
            reporter.event(&e);
        }
        if let Some(reason) = session.finished() {
            break reason;
        }
        if let (Some(tick), Some(every)) = (next_tick, interval)
            && Instant::now() >= tick
        {
            session.refresh()?;
            reporter.interval(&session.app, &last);
            last = snapshot(&session.app);
            next_tick = Some(tick + every);
        }
    };
    session.refresh_all()?;
    for e in session.drain(true) {
        reporter.event(&e);
    }
    reporter.note(&format!("stopping: {reason}"));
    reporter.summary(session);
    Ok(())
}

/// Per-thread iteration histograms at one moment, to print the next interval's difference.
fn snapshot(app: &App) -> Vec<(u32, Histogram)> {
    app.threads.iter().map(|t| (t.tid, t.iter.clone())).collect()
}

pub struct Reporter {
    format: Format,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, to print kernel timestamps as wall-clock times.
    wall_offset_ns: i128,
}

impl Reporter {
    pub fn new(format: Format) -> Self {
        Self { format, wall_offset_ns: clock_ns(libc::CLOCK_REALTIME) as i128 - clock_ns(libc::CLOCK_MONOTONIC) as i128 }
    }

    pub fn event(&self, e: &Event) {
        let line = match (self.format, e) {
            (Format::Json, Event::Stall(s)) => serde_json::to_string(s).expect("stall serializes"),
            (Format::Json, Event::Storm(s)) => serde_json::to_string(s).expect("storm serializes"),
            (Format::Human, Event::Stall(s)) => self.stall_line(s),
            (Format::Human, Event::Storm(s)) => self.storm_line(s),
            (Format::Json, Event::Starvation(s)) => serde_json::to_string(s).expect("starvation serializes"),
            (Format::Human, Event::Starvation(s)) => self.starvation_text(s),
            (Format::Json, Event::Ongoing(o)) => serde_json::to_string(o).expect("ongoing serializes"),
            (Format::Human, Event::Ongoing(o)) => self.ongoing_line(o),
        };
        print_line(&line);
    }

    /// "HH:MM:SS.mmm comm[pid/tid]" at an iteration's start: how stall lines begin.
    fn iteration_prefix(&self, start_ns: u64, comm: &str, pid: u32, tid: u32) -> String {
        format!("{} {comm}[{pid}/{tid}]", wall_clock((start_ns as i128 + self.wall_offset_ns) as u64))
    }

    fn ongoing_line(&self, o: &Ongoing) -> String {
        let mut line = format!(
            "{} STALLING: one iteration running for {} so far (its record follows when it ends)",
            self.iteration_prefix(o.start_ns, &o.comm, o.pid, o.tid),
            human_ns(o.elapsed_ns)
        );
        // Leaf first: where it is stuck, then who called it.
        if !o.stack.is_empty() {
            line += &format!("\n   in {}", o.stack.iter().rev().take(6).map(String::as_str).collect::<Vec<_>>().join(" <- "));
        }
        line
    }

    fn starvation_text(&self, s: &Starvation) -> String {
        let wall = wall_clock((s.since_ns as i128 + s.duration_ns as i128 + self.wall_offset_ns) as u64);
        if s.state == "end" {
            return format!("{wall} STARVATION ended after {}", human_ns(s.duration_ns));
        }
        let mut out = format!(
            "{wall} STARVATION {} for {}: unread bytes {} ({:+} in the window), accept queue {}",
            s.state,
            human_ns(s.duration_ns),
            s.work.unread_bytes,
            s.work.unread_growth,
            s.work.accept_queue
        );
        for g in &s.groups {
            out += &format!(
                "\n   {}: {}/{} threads asleep for {}{}; last wakeup {}",
                g.name,
                g.parked,
                g.threads,
                human_ns(g.parked_for_ns),
                if g.closed_cycle { ", a closed wait cycle (they wait on each other)" } else { "" },
                g.last_wakeup.as_ref().map_or("never seen".into(), |w| format!("{} ago from {} [{}]", human_ns(w.ns_ago), w.by_comm, w.by_tid)),
            );
            for w in &g.waits {
                out += &format!("\n      {} threads on {} {:?}", w.threads, w.wait, w.tids);
                let frames = &w.stack[w.stack.len().saturating_sub(6)..];
                if !frames.is_empty() {
                    out += &format!("\n         at {}", frames.join(" > "));
                }
            }
        }
        out
    }

    fn storm_line(&self, s: &Storm) -> String {
        let wall = (s.start_ns as i128 + self.wall_offset_ns) as u64;
        let cause = match &s.stall {
            Some(st) => format!("caused by the stall of thread {} ({})", st.tid, human_ns(st.duration_ns)),
            None => "external".to_string(),
        };
        format!(
            "{} STORM on {} for {}: peak {}/s, {} new connections, {} overflows ({} SYNs dropped), {} RSTs sent, queue max {}/{} | {cause}",
            wall_clock(wall),
            s.listener,
            human_ns(s.duration_ns),
            s.peak_rate,
            s.net.new_connections,
            s.net.overflows,
            s.net.syn_drops,
            s.net.rst_sent,
            s.net.max_queue,
            s.backlog
        )
    }

    pub fn note(&self, msg: &str) {
        // Notes go to stderr so that --json output stays parseable.
        eprintln!("stalltrace: {msg}");
    }

    fn stall_line(&self, s: &Stall) -> String {
        let mut line = format!(
            "{} stall {} {} {:.0}% |",
            self.iteration_prefix(s.start_ns, &s.comm, s.pid, s.tid),
            human_ns(s.duration_ns),
            s.verdict.as_str(),
            s.explained_pct
        );
        if s.madvise.calls > 0 {
            line += &format!(" madvise {} ({}x, {})", human_ns(s.madvise.ns), s.madvise.calls, human_bytes(s.madvise.bytes));
        }
        if s.munmap.calls > 0 {
            line += &format!(" munmap {} ({}x, {})", human_ns(s.munmap.ns), s.munmap.calls, human_bytes(s.munmap.bytes));
        }
        if s.mremap.calls > 0 {
            line += &format!(" mremap {} ({}x, {} released)", human_ns(s.mremap.ns), s.mremap.calls, human_bytes(s.mremap.bytes));
        }
        if let Some(alloc) = s.alloc.describe() {
            line += &format!(" alloc {alloc}");
        }
        line += &format!(
            " off-cpu {} run/{} blk syscalls {}",
            human_ns(s.off_cpu.runnable_ns),
            human_ns(s.off_cpu.blocked_ns),
            human_ns(s.syscalls.ns)
        );
        if let Some(top) = &s.syscalls.top {
            line += &format!(" (top {top})");
        }
        if s.connections.accepts > 0 {
            line += &format!(" conns {} ({} accepted)", human_ns(s.connections.ns), s.connections.accepts);
        }
        line += &format!(" app {}", human_ns(s.app_code_ns));
        let user: Vec<&str> = s.stack.iter().filter(|f| !f.starts_with("[k] ")).map(String::as_str).collect();
        if !user.is_empty() {
            line += &format!(" | at {}", user[user.len().saturating_sub(6)..].join(" > "));
        }
        if let Some(net) = &s.net
            && (net.during.overflows + net.after.overflows + net.during.new_connections + net.after.new_connections) > 0
        {
            line += &format!(
                " | net: {} overflows, {} new conns during; {} overflows, {} new conns in 500ms after",
                net.during.overflows, net.during.new_connections, net.after.overflows, net.after.new_connections
            );
        }
        line
    }

    /// Text mode's periodic view: each thread's iterations since the previous interval.
    fn interval(&self, app: &App, last: &[(u32, Histogram)]) {
        if self.format != Format::Human {
            return;
        }
        let mut out = format!("\n-- {} iterations by thread, last interval", wall_clock(clock_ns(libc::CLOCK_REALTIME)));
        for t in &app.threads {
            let delta = match last.iter().find(|(tid, _)| *tid == t.tid) {
                Some((_, before)) => t.iter.since(before),
                None => t.iter.clone(),
            };
            out += &format!("\n   thread {} ({}):\n", t.tid, t.comm);
            out += &delta.render("iteration time", "   ");
        }
        for p in &app.in_progress {
            out += &format!("   IN PROGRESS: thread {} ({}) in one iteration for {}{}\n", p.tid, p.comm, human_ns(p.elapsed_ns), p.now_in());
        }
        print_line(&out);
    }

    pub fn summary(&self, session: &Session) {
        let app = &session.app;
        let net = session.net_totals();
        let traced_ns = app.started.elapsed().as_nanos() as u64;
        match self.format {
            Format::Json => {
                let threads = app
                    .threads
                    .iter()
                    .map(|t| ThreadSummary {
                        tid: t.tid,
                        comm: &t.comm,
                        iterations: t.iter.total(),
                        percentiles: t.iter.percentiles(),
                        histogram: t.iter.buckets(),
                    })
                    .collect();
                let listeners = net.as_ref().map(|(per, _)| listener_summaries(per)).unwrap_or_default();
                let s = Summary {
                    kind: "summary",
                    pid: app.pid,
                    traced_ns,
                    iterations: app.iterations(),
                    stalls: app.stall_count(),
                    by_verdict: &app.by_verdict,
                    storms: app.storms.len(),
                    lost: app.lost,
                    stacks: app.stacks_received,
                    starvations: app.starvations,
                    lost_stacks: app.lost_stacks,
                    untracked_threads: app.untracked_threads,
                    threads_without_histogram: app.threads_without_histogram,
                    late_begins: app.late_begins,
                    untimed_purges: app.untimed_purges,
                    purge_sites: app.purge_sites.clone(),
                    threads,
                    listeners,
                    netns_listen_overflows: net.as_ref().map(|(_, n)| *n),
                };
                print_line(&serde_json::to_string(&s).expect("summary serializes"));
            }
            Format::Human => print_line(&(summary_text(app, traced_ns) + &net_text(net.as_ref()))),
        }
    }
}

fn summary_text(app: &App, traced_ns: u64) -> String {
    let mut out = format!(
        "\n== stalltrace summary: PID {} ({}) traced {}, {} iterations, {} stalls, {} lost records; {} stacks, {} lost\n",
        app.pid,
        app.comm,
        human_ns(traced_ns),
        app.iterations(),
        app.stall_count(),
        app.lost,
        app.stacks_received,
        app.lost_stacks
    );
    for (verdict, n) in &app.by_verdict {
        out += &format!("   {:<16} {n}\n", verdict.as_str());
    }
    if app.untracked_threads > 0 {
        out += &format!("   {} loop threads not traced: the kernel's thread table was full\n", app.untracked_threads);
    }
    if app.threads_without_histogram > 0 {
        out += &format!(
            "   {} loop threads without a histogram (the kernel's histogram table was full): their stalls are reported, their iterations are not in the histograms\n",
            app.threads_without_histogram
        );
    }
    if app.late_begins > 0 {
        out += &format!(
            "   {} iterations timed from later than they began, or not timed: the kernel showed the thread leaving its epoll wait but not coming back\n",
            app.late_begins
        );
    }
    if app.untimed_purges > 0 {
        out += &format!(
            "   {} purge calls counted but not timed: made from a call site not yet probed\n",
            app.untimed_purges
        );
    }
    if let Some(c) = app.purge_sites.as_ref().filter(|c| c.probed + c.refused > 0) {
        let stepped = if c.stepped.is_empty() { "none".to_string() } else { c.stepped.join(", ") };
        out += &format!(
            "   purge call sites: {} probed, {} refused (not a direct call); wrappers still probed stepped: {stepped}\n",
            c.probed, c.refused
        );
    }
    if app.threads.is_empty() {
        out += "   no event-loop thread seen (no thread returned from epoll_wait/epoll_pwait)\n";
    }
    for t in &app.threads {
        let p = t.iter.percentiles();
        out += &format!(
            "\n   thread {} ({}): p50 {} p99 {} p99.9 {} max {}\n",
            t.tid,
            t.comm,
            human_ns(p.p50_ns),
            human_ns(p.p99_ns),
            human_ns(p.p999_ns),
            human_ns(p.max_ns)
        );
        out += &t.iter.render("iteration time", "   ");
    }
    out
}

fn print_line(line: &str) {
    let mut out = io::stdout().lock();
    // A closed pipe (| head) is not an error worth a panic.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// HH:MM:SS.mmm in local time.
fn wall_clock(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as libc::time_t;
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe { libc::localtime_r(&secs, &mut tm) };
    format!("{:02}:{:02}:{:02}.{:03}", tm.tm_hour, tm.tm_min, tm.tm_sec, (ns / 1_000_000) % 1000)
}
