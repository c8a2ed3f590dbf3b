//! Section 5: how soon a reader of stalltrace's output learns of a stall: the notice while it
//! lasts (what the live view shows at the same moment), and the record after it ends.
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

const STALL_MS: u64 = 300;
const THRESHOLD_MS: u64 = 50;
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
    let mut samples = Samples::default();
    for i in 0..ctx.latency_samples {
        // stalltrace looks for stalls every 100 ms: spread the stalls' starts over that period
        // rather than let them lock to its phase.
        std::thread::sleep(Duration::from_millis((i as u64 * 37) % 100));
        client.call(&format!("SLEEP {STALL_MS}"))?;
        let notice = procs::wait_for_line(&records, r#""type":"stall_ongoing""#, Duration::from_secs(5), "stalltrace")?;
        let line = procs::wait_for_line(&records, r#""type":"stall""#, Duration::from_secs(5), "stalltrace")?;
        let rec: Value = serde_json::from_str(&line.text)?;
        let start = rec["start_ns"].as_u64().context("start_ns")?;
        let end = start + rec["duration_ns"].as_u64().context("duration_ns")?;
        let noticed: Value = serde_json::from_str(&notice.text)?;
        if noticed["start_ns"].as_u64() != Some(start) {
            bail!("a notice for another stall: {} then {}", notice.text, line.text);
        }
        let (after_start, after_end) = (notice.at_ns as f64 - start as f64, line.at_ns as f64 - end as f64);
        samples.raw.push(format!(
            "sample {:>2} | stall {} | notice {} after its start | record {} after its end",
            i + 1,
            report::dur_ns((end - start) as f64),
            report::dur_ns(after_start),
            report::dur_ns(after_end)
        ));
        samples.after_start.push(after_start);
        samples.after_end.push(after_end);
    }
    tracers::stop(tracer)?;
    drop(server);
    Ok(section(ctx, samples))
}

#[derive(Default)]
struct Samples {
    /// From the iteration's start to its `stall_ongoing` notice, and from its end to its record.
    after_start: Vec<f64>,
    after_end: Vec<f64>,
    raw: Vec<String>,
}

fn section(ctx: &Ctx, samples: Samples) -> Section {
    let mut table = Table::new(&["from", "to", "samples", "median", "min", "max"]);
    let threshold_ns = (THRESHOLD_MS * 1_000_000) as f64;
    let past_threshold: Vec<f64> = samples.after_start.iter().map(|ns| ns - threshold_ns).collect();
    let rows = [
        ("the stall's start", "its `stall_ongoing` notice (and the live view)", &samples.after_start),
        ("its crossing the threshold", "the notice", &past_threshold),
        ("the stall's end", "its `stall` record", &samples.after_end),
    ];
    for (from, to, v) in rows {
        table.row(vec![
            from.into(),
            to.into(),
            v.len().to_string(),
            report::dur_ns(report::median(v)),
            report::dur_ns(v.iter().copied().fold(f64::NAN, f64::min)),
            report::dur_ns(report::max(v)),
        ]);
    }
    Section {
        title: "Detection latency".into(),
        method: format!(
            "The demo server stalls {STALL_MS} ms on `SLEEP {STALL_MS}`; stalltrace traces it with \
             `--json -t {THRESHOLD}`. The bench reads stalltrace's stdout line by line and stamps \
             each line with CLOCK_MONOTONIC as it is read. While a stall lasts, stalltrace \
             announces it once with a `stall_ongoing` record as soon as it sees the iteration past \
             the threshold: it looks every 100 ms, and the live view shows the iteration in \
             progress from the same look (the stalls start at spread phases of that period). Its latency is that stamp − start_ns. When the stall \
             ends its `stall` record follows, with the verdict: latency = stamp − (start_ns + \
             duration_ns), from the epoll call that ends the stall to the record in the reader's \
             hands. That record waits for the 500 ms after the stall, in which the net group \
             counts the connections refused and opened (a storm after a stall is its \
             consequence), plus up to the 100 ms the front end sleeps between reads of the ring \
             buffer. {} samples, one stall at a time.",
            ctx.latency_samples
        ),
        commands: vec![
            "stalltrace demo-server --port 0".into(),
            format!("stalltrace -p PID --json -t {THRESHOLD}"),
            format!("printf 'SLEEP {STALL_MS}\\n' to the server, {} times", ctx.latency_samples),
        ],
        tables: vec![table],
        raw: samples.raw,
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
