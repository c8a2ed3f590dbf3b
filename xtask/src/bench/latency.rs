//! Section 5: how soon after a stall ends its record reaches a reader of stalltrace's output.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::{
    Ctx,
    procs::{self, Proc},
    report::{self, Section, Table},
    tracers,
};

const STALL_MS: u64 = 100;
const THRESHOLD: &str = "50ms";

pub fn measure(ctx: &Ctx) -> Result<Section> {
    let mut server = Proc::spawn(
        "demo-server",
        Command::new(&ctx.stalltrace).args(["demo-server", "--port", "0"]).stdout(Stdio::piped()),
    )?;
    let server_out = procs::lines(server.take_stdout());
    let port_line = procs::wait_for_line(&server_out, "", Duration::from_secs(10), "demo-server")?;
    let port: u16 = port_line.text.trim().parse().with_context(|| format!("demo-server printed {:?}", port_line.text))?;

    let mut tracer = Proc::spawn(
        "stalltrace",
        Command::new(&ctx.stalltrace)
            .args(["-p", &server.pid().to_string(), "--json", "-t", THRESHOLD])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    // Timestamped by the reader thread the moment each line is read.
    let records = procs::lines(tracer.take_stdout());
    tracers::wait_attached(&mut tracer)?;

    let mut client = Client::connect(port)?;
    // The loop thread is tracked from its first epoll return after attach.
    client.call("PING")?;
    let mut latencies = Vec::new();
    let mut raw = Vec::new();
    for i in 0..ctx.latency_samples {
        client.call(&format!("SLEEP {STALL_MS}"))?;
        let line = procs::wait_for_line(&records, r#""type":"stall""#, Duration::from_secs(5), "stalltrace")?;
        let rec: Value = serde_json::from_str(&line.text)?;
        let end = rec["start_ns"].as_u64().context("start_ns")? + rec["duration_ns"].as_u64().context("duration_ns")?;
        let latency = line.at_ns as f64 - end as f64;
        let stall = report::dur_ns(rec["duration_ns"].as_f64().unwrap_or(0.0));
        raw.push(format!("sample {:>2} | stall {stall} | read {} after its end", i + 1, report::dur_ns(latency)));
        latencies.push(latency);
    }
    tracers::stop(tracer)?;
    drop(server);
    Ok(section(ctx, &latencies, raw))
}

fn section(ctx: &Ctx, latencies: &[f64], raw: Vec<String>) -> Section {
    let mut table = Table::new(&["samples", "median", "min", "max"]);
    let min = latencies.iter().copied().fold(f64::NAN, f64::min);
    table.row(vec![
        latencies.len().to_string(),
        report::dur_ns(report::median(latencies)),
        report::dur_ns(min),
        report::dur_ns(report::max(latencies)),
    ]);
    Section {
        title: "Detection latency".into(),
        method: format!(
            "The demo server stalls {STALL_MS} ms on `SLEEP {STALL_MS}`; stalltrace traces it with \
             `--json -t {THRESHOLD}`. The bench reads stalltrace's stdout line by line and stamps \
             each line with CLOCK_MONOTONIC as it is read; latency = that stamp − (start_ns + \
             duration_ns), i.e. from the epoll call that ends the stall to the record in the \
             reader's hands. {} samples, one stall at a time.",
            ctx.latency_samples
        ),
        commands: vec![
            "stalltrace demo-server --port 0".into(),
            format!("stalltrace -p PID --json -t {THRESHOLD}"),
            format!("printf 'SLEEP {STALL_MS}\\n' to the server, {} times", ctx.latency_samples),
        ],
        tables: vec![table],
        raw,
    }
}

/// The demo server's line protocol: each command is answered `OK <ns>`.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(port: u16) -> Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self { reader: BufReader::new(stream.try_clone()?), writer: stream })
    }

    fn call(&mut self, cmd: &str) -> Result<()> {
        writeln!(self.writer, "{cmd}")?;
        let mut reply = String::new();
        self.reader.read_line(&mut reply)?;
        if !reply.starts_with("OK ") {
            bail!("demo server answered {cmd:?} with {reply:?}");
        }
        Ok(())
    }
}
