//! `stalltrace daemon --config FILE`: always on, attached to every process the config names,
//! as they come and go; records to a rotated journal, metrics to an OpenMetrics endpoint.
//!
//! Each traced process gets a session of its own (its own programs and maps): simple isolation
//! and a clean detach when it exits, at the price of one program set per target, which is fine
//! for the handful of servers a host runs.
mod config;
mod journal;
mod metrics;
mod privileges;
mod targets;

pub use metrics::TargetMetrics;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, atomic::{AtomicBool, Ordering}},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use self::{
    config::Config,
    journal::Journal,
    metrics::Metrics,
    targets::Live,
};
use crate::{
    report::clock_ns,
    session::Event,
};

/// How often records move to the journal: a record waits at most this long, and a wakeup
/// costs this VM ~0.1 ms of CPU.
const TICK: Duration = Duration::from_millis(100);
const SCAN_EVERY: Duration = Duration::from_secs(1);
/// Metrics are refreshed once a second: a refresh walks every target's kernel maps, and a
/// scraper reads at most that often.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

pub fn run(config_path: &Path) -> Result<()> {
    crate::target::check_btf()?;
    privileges::check()?;
    let mut config = Config::load(config_path)?;
    let stop = crate::stop_on_signals(&[SIGINT, SIGTERM])?;
    let reload = crate::stop_on_signals(&[SIGHUP])?;
    let metrics = Metrics::default();
    metrics::serve(config.metrics.listen, metrics.clone())?;
    let mut journal = Journal::open(&config.journal.path, config.journal.max_bytes, config.journal.keep)?;
    // Held for the daemon's life: the kernel counts programs' run time while it is open.
    let _stats = config.metrics.bpf_stats.then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime).ok());
    let dropped = privileges::drop_unneeded()?;
    log(&format!(
        "watching {} target(s); journal {}; metrics http://{}/metrics; dropped {} capabilities",
        config.targets.len(),
        config.journal.path.display(),
        config.metrics.listen,
        dropped.len()
    ));
    let mut daemon = Daemon { live: Vec::new(), totals: BTreeMap::new(), flame_due: Instant::now() };
    let mut next_scan = Instant::now();
    let mut next_publish = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if reload.swap(false, Ordering::Relaxed) {
            config = reload_config(config_path, config, &mut daemon);
        }
        if Instant::now() >= next_scan {
            daemon.scan(&config, &stop);
            next_scan = Instant::now() + SCAN_EVERY;
        }
        daemon.pump(&mut journal)?;
        if Instant::now() >= next_publish {
            daemon.publish(&metrics, &journal);
            next_publish = Instant::now() + PUBLISH_EVERY;
        }
        daemon.flames(&config)?;
        thread::sleep(TICK);
    }
    daemon.shutdown(&mut journal)?;
    log(&format!("stopped: {} records in the journal, every program detached", journal.written));
    Ok(())
}

fn log(msg: &str) {
    eprintln!("stalltrace daemon: {msg}");
}

fn reload_config(path: &Path, old: Config, daemon: &mut Daemon) -> Config {
    match Config::load(path) {
        Ok(new) => {
            // Targets whose spec changed are detached; the next scan attaches them anew.
            daemon.live.retain(|l| new.targets.contains(&l.spec));
            log(&format!("reloaded {}: {} target(s)", path.display(), new.targets.len()));
            new
        }
        Err(e) => {
            log(&format!("reload failed, keeping the old config: {e:#}"));
            old
        }
    }
}

struct Daemon {
    live: Vec<Live>,
    /// Per target name: what its ended sessions counted, so counters survive restarts.
    totals: BTreeMap<String, TargetMetrics>,
    flame_due: Instant,
}

impl Daemon {
    /// Lets go of exited (or exec'd) processes and attaches to new matches.
    fn scan(&mut self, config: &Config, stop: &Arc<AtomicBool>) {
        let mut ended = Vec::new();
        self.live.retain_mut(|l| {
            let keep = l.session.finished().is_none() && !l.replaced();
            if !keep {
                ended.push((l.spec.name(), l.pid, l.session.metrics()));
            }
            keep
        });
        for (name, pid, m) in ended {
            log(&format!("detached from PID {pid} ({name})"));
            self.totals.entry(name).or_default().absorb(&m);
        }
        for spec in &config.targets {
            for pid in targets::matching(spec) {
                if self.live.iter().any(|l| l.pid == pid) {
                    continue;
                }
                match Live::attach(spec, pid, Arc::clone(stop)) {
                    Ok(l) => {
                        log(&format!("attached to PID {pid} ({}), stalls >= {}", spec.name(), spec.threshold));
                        self.live.push(l);
                    }
                    Err(e) => log(&format!("cannot attach to PID {pid} ({}): {e:#}", spec.name())),
                }
            }
        }
    }

    /// Moves every ready record into the journal.
    fn pump(&mut self, journal: &mut Journal) -> Result<()> {
        for l in &mut self.live {
            for e in l.session.drain(false) {
                journal.write(&event_json(&e))?;
            }
        }
        Ok(())
    }

    fn publish(&mut self, metrics: &Metrics, journal: &Journal) {
        let mut snap = metrics.0.lock().expect("metrics snapshot");
        snap.targets = self.totals.clone();
        let (mut run_ns, mut runs) = (0, 0);
        for l in &mut self.live {
            let _ = l.session.refresh();
            let m = l.session.metrics();
            let t = snap.targets.entry(l.spec.name()).or_default();
            t.absorb(&m);
            t.pid = l.pid;
            t.stalled_for_ns = m.stalled_for_ns;
            let (ns, n) = l.session.bpf_run_stats();
            run_ns += ns;
            runs += n;
        }
        snap.bpf_run_seconds = run_ns as f64 / 1e9;
        snap.bpf_runs = runs;
        let (cpu, rss) = targets::own_usage();
        snap.cpu_seconds = cpu;
        snap.rss_bytes = rss;
        snap.journal_records = journal.written;
    }

    /// Every `flame.every`, each target's stalls so far as folded stacks and an SVG.
    fn flames(&mut self, config: &Config) -> Result<()> {
        let Some(dir) = &config.flame.dir else { return Ok(()) };
        if Instant::now() < self.flame_due {
            return Ok(());
        }
        self.flame_due = Instant::now() + crate::cli::parse_duration(&config.flame.every)?;
        for l in &self.live {
            write_flame(dir, l)?;
        }
        Ok(())
    }

    fn shutdown(&mut self, journal: &mut Journal) -> Result<()> {
        for mut l in self.live.drain(..) {
            for e in l.session.drain(true) {
                journal.write(&event_json(&e))?;
            }
            // Iterations the kernel never showed waking are not timed: say how many.
            if l.session.refresh().is_ok() {
                log(&format!("detached from PID {}: {} late begins (iterations not timed)", l.pid, l.session.app.late_begins));
            }
            // Dropping the session detaches its links and unloads its programs.
        }
        journal.flush()
    }
}

fn write_flame(dir: &Path, l: &Live) -> Result<()> {
    let records: Vec<serde_json::Value> = l.session.app.stalls.iter().filter_map(|s| serde_json::to_value(s).ok()).collect();
    let lines = crate::flame::folded(&records);
    if lines.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stem: PathBuf = dir.join(format!("{}-{}", l.spec.name().replace('/', "_"), l.pid));
    let (folded, svg) = (stem.with_extension("folded"), stem.with_extension("svg"));
    crate::flame::write_folded(&folded, &lines)?;
    crate::flame::write_svg(&svg, &lines, &format!("stalltrace: {} PID {}", l.spec.name(), l.pid))?;
    for p in [folded, svg] {
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(journal::FILE_MODE))?;
    }
    Ok(())
}

fn event_json(e: &Event) -> String {
    let mut v = match e {
        Event::Stall(s) => serde_json::to_value(s),
        Event::Storm(s) => serde_json::to_value(s),
        Event::Starvation(s) => serde_json::to_value(s),
        Event::Ongoing(o) => serde_json::to_value(o),
    }
    .expect("records serialize");
    // The journal outlives boots: wall-clock time beside the monotonic one.
    v["logged_at_ns"] = serde_json::json!(clock_ns(libc::CLOCK_REALTIME));
    v.to_string()
}

