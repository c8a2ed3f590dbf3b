//! Keeps every CPU out of idle halts while the bench runs.
//!
//! On a VM a halted vCPU is a VM exit, and waking it costs 70-120 us, as much as the host
//! pleases: at -P 1 Redis and its client each go idle many thousands of times a second, and
//! untraced 1 s runs of set,get varied by 4-5% (sd), more than the cost being measured.
//! With /dev/cpu_dma_latency held at 0, as tuned's latency-performance profile does, idle
//! CPUs poll instead and the same runs varied by 1%. Traced and untraced runs alike.
use std::{fs::File, io::Write as _};

/// The PM QoS request lasts as long as the file stays open.
pub struct PollIdle {
    _request: Option<File>,
    pub description: String,
}

pub fn hold() -> PollIdle {
    let request = File::options().write(true).open("/dev/cpu_dma_latency").and_then(|mut f| {
        f.write_all(&0i32.to_ne_bytes())?;
        Ok(f)
    });
    match request {
        Ok(f) => PollIdle {
            _request: Some(f),
            description: "polling, not halting: /dev/cpu_dma_latency held at 0 for the whole run, as tuned's \
                          latency-performance profile does (a halted vCPU's wakeup costs this VM 70-120 us, \
                          as the host pleases, and made untraced runs vary 4-5% instead of 1%)"
                .into(),
        },
        Err(e) => {
            eprintln!("xtask bench: warning: cannot hold /dev/cpu_dma_latency at 0 ({e}); idle CPUs halt, runs vary more");
            PollIdle { _request: None, description: format!("halting as usual (/dev/cpu_dma_latency: {e})") }
        }
    }
}
