//! The daemon's TOML configuration: what to watch, where records go, where metrics are served.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::cli::parse_duration;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetSpec>,
    #[serde(default)]
    pub journal: JournalConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub flame: FlameConfig,
}

/// One `[[target]]`: processes are matched by exactly one of comm, exe or pid.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    pub comm: Option<String>,
    pub exe: Option<PathBuf>,
    pub pid: Option<u32>,
    #[serde(default = "default_threshold")]
    pub threshold: String,
    /// Probe groups as for `-p` (`--probes`); the default set when absent.
    pub probes: Option<String>,
    /// Time every allocator call with uprobes, as `--alloc-calls`.
    #[serde(default)]
    pub alloc_calls: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    #[serde(default = "default_journal")]
    pub path: PathBuf,
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    #[serde(default = "default_keep")]
    pub keep: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Switch on the kernel's BPF run-time statistics for stalltrace_bpf_run_seconds. Off by
    /// default: while on, every BPF program on the host pays for the timing (BENCHMARKS.md).
    #[serde(default)]
    pub bpf_stats: bool,
}

/// Periodic flame summaries per target: folded stacks and an SVG of the period's stalls.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlameConfig {
    pub dir: Option<PathBuf>,
    #[serde(default = "default_flame_every")]
    pub every: String,
}

fn default_threshold() -> String {
    "50ms".into()
}
fn default_journal() -> PathBuf {
    "/var/log/stalltrace/stalls.jsonl".into()
}
fn default_max_bytes() -> u64 {
    100 << 20
}
fn default_keep() -> u32 {
    10
}
fn default_listen() -> SocketAddr {
    "127.0.0.1:9436".parse().expect("a literal address")
}
fn default_flame_every() -> String {
    "10m".into()
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self { path: default_journal(), max_bytes: default_max_bytes(), keep: default_keep() }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { listen: default_listen(), bpf_stats: false }
    }
}

impl Default for FlameConfig {
    fn default() -> Self {
        Self { dir: None, every: default_flame_every() }
    }
}

impl TargetSpec {
    /// A label for metrics and logs that stays the same across the process's restarts.
    pub fn name(&self) -> String {
        match (&self.comm, &self.exe, self.pid) {
            (Some(c), _, _) => c.clone(),
            (_, Some(e), _) => e.display().to_string(),
            (_, _, Some(p)) => format!("pid-{p}"),
            _ => "?".into(),
        }
    }

    pub fn threshold(&self) -> Result<Duration> {
        parse_duration(&self.threshold)
    }
}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: Config = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if self.targets.is_empty() {
            bail!("no [[target]] to watch");
        }
        for t in &self.targets {
            let given = usize::from(t.comm.is_some()) + usize::from(t.exe.is_some()) + usize::from(t.pid.is_some());
            if given != 1 {
                bail!("each [[target]] needs exactly one of comm, exe or pid ({t:?})");
            }
            t.threshold().with_context(|| format!("threshold of target {}", t.name()))?;
            if let Some(p) = &t.probes {
                crate::cli::parse_groups(p).with_context(|| format!("probes of target {}", t.name()))?;
            }
        }
        if self.journal.max_bytes < 1024 {
            bail!("journal.max_bytes must be at least 1024");
        }
        parse_duration(&self.flame.every).context("flame.every")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let c: Config = toml::from_str(
            r#"
            [[target]]
            comm = "redis-server"
            threshold = "50ms"
            [[target]]
            exe = "/usr/bin/redis-check-rdb"
            [journal]
            path = "/var/log/stalltrace/stalls.jsonl"
            max_bytes = 104857600
            keep = 10
            [metrics]
            listen = "127.0.0.1:9436"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.targets.len(), 2);
        assert_eq!(c.targets[1].threshold().unwrap(), Duration::from_millis(50));
        assert_eq!(c.journal.keep, 10);
    }

    #[test]
    fn a_target_needs_one_matcher() {
        let c: Config = toml::from_str("[[target]]\nthreshold = \"10ms\"").unwrap();
        assert!(c.validate().is_err());
        assert!(toml::from_str::<Config>("[[target]]\ncomm = \"x\"\nbogus = 1").is_err());
    }
}
