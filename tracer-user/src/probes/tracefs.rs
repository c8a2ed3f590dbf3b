//! tracefs: where tracepoints are attached by name, and where their record layouts are told.
use std::{fs, path::Path};

use anyhow::{Context as _, Result, bail};

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

/// Offset of `field` in the record of tracepoint `category/name`, from its format file; None
/// when the field does not exist on this kernel.
pub fn optional_field_offset(category: &str, name: &str, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("{TRACEFS}/events/{category}/{name}/format")).ok()?;
    parse_offset(&text, field)
}

/// The numeric value the print format gives a symbolic name, e.g. `{ 40, "TCP_LISTEN_OVERFLOW" }`
/// in kfree_skb's reason table: the values move between kernel versions.
pub fn enum_value(category: &str, name: &str, symbol: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("{TRACEFS}/events/{category}/{name}/format")).ok()?;
    parse_enum_value(&text, symbol)
}

fn parse_enum_value(format: &str, symbol: &str) -> Option<u64> {
    let quoted = format!("\"{symbol}\"");
    let at = format.find(&quoted)?;
    let open = format[..at].rfind('{')?;
    format[open + 1..at].trim().trim_end_matches(',').trim().parse().ok()
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

    #[test]
    fn finds_enum_values_in_print_fmt() {
        let f = r#"print fmt: "reason: %s", __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 40, "TCP_LISTEN_OVERFLOW" }, { 41, "TCP_OLD_SEQUENCE" })"#;
        assert_eq!(super::parse_enum_value(f, "TCP_LISTEN_OVERFLOW"), Some(40));
        assert_eq!(super::parse_enum_value(f, "NOT_SPECIFIED"), Some(2));
        assert_eq!(super::parse_enum_value(f, "NOPE"), None);
    }
}
