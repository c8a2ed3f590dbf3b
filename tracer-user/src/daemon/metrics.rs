//! The OpenMetrics endpoint: latency histograms, stalls by verdict, storms, overflows, lost
//! records, and stalltrace's own CPU and BPF run time. The daemon updates a snapshot; each
//! scrape encodes it (prometheus-client) and a small HTTP server on loopback serves it.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::histogram::Histogram;

/// Per configured target, across the lives of its process.
#[derive(Clone, Debug, Default)]
pub struct TargetMetrics {
    pub pid: u32,
    pub stalls: BTreeMap<&'static str, u64>,
    pub storms: u64,
    pub starvations: u64,
    pub overflows: u64,
    pub lost: u64,
    pub iter: Histogram,
    pub purge: Histogram,
    pub alloc: Histogram,
    /// How long the longest iteration past the threshold has run so far (0: none). The
    /// histograms and counters only learn of a stall when it ends: a server frozen for good
    /// shows only here. The live session's alone: `absorb` leaves it out.
    pub stalled_for_ns: u64,
}

impl TargetMetrics {
    /// Adds another session's counts (a process that exited, or the live one).
    pub fn absorb(&mut self, other: &TargetMetrics) {
        for (verdict, n) in &other.stalls {
            *self.stalls.entry(verdict).or_default() += n;
        }
        self.storms += other.storms;
        self.starvations += other.starvations;
        self.overflows += other.overflows;
        self.lost += other.lost;
        self.iter.add(&other.iter);
        self.purge.add(&other.purge);
        self.alloc.add(&other.alloc);
    }
}

#[derive(Debug, Default)]
pub struct Snapshot {
    pub targets: BTreeMap<String, TargetMetrics>,
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub bpf_run_seconds: f64,
    pub bpf_runs: u64,
    pub journal_records: u64,
}

#[derive(Debug, Default, Clone)]
pub struct Metrics(pub Arc<Mutex<Snapshot>>);

/// Serves `/metrics` on `addr` from a thread of its own.
pub fn serve(addr: SocketAddr, metrics: Metrics) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding the metrics endpoint to {addr}"))?;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(metrics));
    let registry = Arc::new(registry);
    thread::Builder::new().name("metrics".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            // One scrape at a time is plenty for a monitoring system.
            let _ = answer(stream, &registry);
        }
    })?;
    Ok(())
}

fn answer(mut stream: TcpStream, registry: &Registry) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = String::new();
    BufReader::new(&stream).read_line(&mut request)?;
    let (status, body) = if request.starts_with("GET /metrics") {
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, registry).map_err(|_| anyhow::anyhow!("encoding"))?;
        ("200 OK", body)
    } else {
        ("404 Not Found", "try /metrics\n".to_string())
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.lock().expect("metrics snapshot");
        let targets: Vec<(&String, &TargetMetrics)> = s.targets.iter().collect();
        histogram(&mut encoder, "stalltrace_iteration_seconds", "Event-loop iteration times", &targets, |t| &t.iter)?;
        histogram(&mut encoder, "stalltrace_madvise_seconds", "madvise/munmap/mremap calls inside iterations", &targets, |t| &t.purge)?;
        histogram(&mut encoder, "stalltrace_alloc_seconds", "Allocator calls inside iterations (alloc group)", &targets, |t| &t.alloc)?;
        let mut stalls = encoder.encode_descriptor("stalltrace_stalls", "Stalls by verdict", None, MetricType::Counter)?;
        for (name, t) in &targets {
            for (verdict, n) in &t.stalls {
                let labels = [("target", name.as_str()), ("verdict", *verdict)];
                ConstCounter::new(*n).encode(stalls.encode_family(&labels.as_slice())?)?;
            }
        }
        per_target_counter(&mut encoder, "stalltrace_storms", "Connection storms", &targets, |t| t.storms)?;
        per_target_counter(&mut encoder, "stalltrace_starvations", "Pool starvations", &targets, |t| t.starvations)?;
        per_target_counter(&mut encoder, "stalltrace_listen_overflows", "Accept-queue overflows", &targets, |t| t.overflows)?;
        per_target_counter(&mut encoder, "stalltrace_lost_records", "Records the ring buffer could not take", &targets, |t| t.lost)?;
        let mut stalled = encoder.encode_descriptor(
            "stalltrace_stall_in_progress_seconds",
            "How long the longest iteration past the threshold has run so far (0: none)",
            None,
            MetricType::Gauge,
        )?;
        for (name, t) in &targets {
            ConstGauge::new(t.stalled_for_ns as f64 / 1e9).encode(stalled.encode_family(&[("target", name.as_str())].as_slice())?)?;
        }
        let mut attached = encoder.encode_descriptor("stalltrace_attached_pid", "PID traced now (0: none)", None, MetricType::Gauge)?;
        for (name, t) in &targets {
            ConstGauge::new(i64::from(t.pid)).encode(attached.encode_family(&[("target", name.as_str())].as_slice())?)?;
        }
        own(&mut encoder, &s)
    }
}

fn own(encoder: &mut DescriptorEncoder, s: &Snapshot) -> Result<(), std::fmt::Error> {
    let m = encoder.encode_descriptor("stalltrace_cpu_seconds", "stalltrace's own CPU time", None, MetricType::Counter)?;
    ConstCounter::new(s.cpu_seconds).encode(m)?;
    let m = encoder.encode_descriptor("stalltrace_bpf_run_seconds", "Time in stalltrace's BPF programs", None, MetricType::Counter)?;
    ConstCounter::new(s.bpf_run_seconds).encode(m)?;
    let m = encoder.encode_descriptor("stalltrace_bpf_runs", "Runs of stalltrace's BPF programs", None, MetricType::Counter)?;
    ConstCounter::new(s.bpf_runs).encode(m)?;
    let m = encoder.encode_descriptor("stalltrace_resident_bytes", "stalltrace's resident memory", None, MetricType::Gauge)?;
    ConstGauge::new(s.rss_bytes as i64).encode(m)?;
    let m = encoder.encode_descriptor("stalltrace_journal_records", "Records written to the journal", None, MetricType::Counter)?;
    ConstCounter::new(s.journal_records).encode(m)
}

fn per_target_counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    targets: &[(&String, &TargetMetrics)],
    value: impl Fn(&TargetMetrics) -> u64,
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (target, t) in targets {
        ConstCounter::new(value(t)).encode(m.encode_family(&[("target", target.as_str())].as_slice())?)?;
    }
    Ok(())
}

/// A kernel histogram as OpenMetrics buckets: one per power of two from 1 us to 17 s.
fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    targets: &[(&String, &TargetMetrics)],
    pick: impl Fn(&TargetMetrics) -> &Histogram,
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (target, t) in targets {
        let rows = pick(t).log2_rows();
        let (mut cumulative, mut sum, mut buckets) = (0u64, 0f64, Vec::new());
        for (i, &n) in rows.iter().enumerate() {
            cumulative += n;
            // The bucket's midpoint stands for its values in the sum.
            sum += n as f64 * 1.5 * (1u64 << i) as f64 / 1e9;
            if (10..=34).contains(&i) {
                buckets.push(((1u64 << (i + 1)) as f64 / 1e9, cumulative));
            }
        }
        buckets.push((f64::INFINITY, cumulative));
        let labels = [("target", target.as_str())];
        m.encode_family(&labels.as_slice())?.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, cumulative, &buckets, None)?;
    }
    Ok(())
}
