//! tracefs: where tracepoints are attached by name, and where their record layouts are told.
use std::{fs, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};

const TRACEFS: &str = "/sys/kernel/tracing";

/// Makes sure tracefs is mounted: minimal hosts and fresh VMs often leave it unmounted, and
/// every tracepoint attach goes through it.
pub fn ensure_mounted() -> Result<()> {
    if Path::new(TRACEFS).join("events").exists()
        || Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", TRACEFS])
        .status()
        .context("running mount for tracefs")?;
    if !status.success() || !Path::new(TRACEFS).join("events").exists() {
        bail!("tracefs is not mounted and mounting it at {TRACEFS} failed");
    }
    Ok(())
}

/// Offset of `field` in the record of tracepoint `category/name`, from its format file.
pub fn field_offset(category: &str, name: &str, field: &str) -> Result<u64> {
    let path = format!("{TRACEFS}/events/{category}/{name}/format");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_offset(&text, field).ok_or_else(|| anyhow!("field {field} not found in {path}"))
}

pub fn exists(category: &str, name: &str) -> bool {
    Path::new(TRACEFS).join("events").join(category).join(name).exists()
}

fn parse_offset(format: &str, field: &str) -> Option<u64> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let ident = decl.split_whitespace().last()?;
        let ident = ident.split('[').next()?;
        if ident != field {
            return None;
        }
        rest.trim().strip_prefix("offset:")?.split(';').next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::parse_offset;

    #[test]
    fn parses_sched_switch_format() {
        let f = "\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
                 \tfield:long prev_state;\toffset:32;\tsize:8;\tsigned:1;\n\
                 \tfield:pid_t next_pid;\toffset:56;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_offset(f, "prev_state"), Some(32));
        assert_eq!(parse_offset(f, "next_pid"), Some(56));
        assert_eq!(parse_offset(f, "prev_comm"), Some(8));
        assert_eq!(parse_offset(f, "next_prio"), None);
    }
}
