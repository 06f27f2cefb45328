//! The `fanout` coordinator: subscribers in worker processes, the publisher here, phases.
//!
//! Owns the run's plan and its merged results. Workers are split by the open-file limit (one
//! process holds at most its hard limit minus 64 sockets); each gets every `W`-th global
//! connection index and its own slice of the source addresses. Phases run one after another:
//! every phase waits for the previous one's deliveries to stop, restores lost connections,
//! publishes on an absolute schedule, waits for the deliveries (until everything expected
//! arrived, nothing arrived for a second, or `--drain-timeout`), then has every worker judge
//! its connections against the send times of every event, and merges their answers.
//!
//! Phases: `--rates` (fixed), `--find-max` (doubling, then bisection, for the highest rate
//! that every subscriber keeps up with; a failed rate is run once more, `--ramp-retries`),
//! `--burst` (events back to back), `--single` (one at a time: time from publish to the last
//! subscriber), `--churn` (connections closing and reopening while events flow), then
//! `--settle` and `--close-at-end` (server memory after).

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::client::{hist_merge_json, new_hist, percentiles_ms};
use crate::publish::{Job, Pool, Sink, SinkArgs};
use crate::worker::{WorkerSpec, zipf_cdf};
use crate::{
    Target, bump_n, check_source_ips, fd_capacity, parse_source_ips, probe, proc_cpu_seconds,
    proc_rss_bytes, unix_us,
};

const SAMPLE_EVERY: Duration = Duration::from_millis(250);
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// Deliveries count as finished once none arrived for this long (a server may stage a whole
/// batch of events for every connection before it writes anything).
/// Phases whose expected count is known end as soon as it arrived; this only bounds the wait
/// when something is missing.
const QUIET: Duration = Duration::from_secs(10);
const CHURN_QUIET: Duration = Duration::from_secs(2);
/// Per-event figures kept per phase (time to first and last subscriber).
const MAX_EVENTS_REPORTED: usize = 20_000;
/// Percentiles of the latency curves in the report.
const CURVE: [f64; 14] = [
    0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99995, 0.99999, 1.0,
];

#[derive(clap::Args)]
pub(crate) struct FanoutArgs {
    /// WebSocket URL without channels (each connection adds its own `channels[]=`), e.g.
    /// ws://127.0.0.1:9505/v1/realtime?project=p. Repeatable: connections alternate.
    #[arg(long, required = true)]
    target: Vec<String>,
    #[command(flatten)]
    sink: SinkArgs,
    /// Project of the published events (must match the targets' project).
    #[arg(long, default_value = "p")]
    project: String,
    /// Subscriber connections in total.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// New connections started per second (all workers together).
    #[arg(long, default_value_t = 5000.0)]
    connect_rate: f64,
    /// Upgrades in flight at once (all workers together).
    #[arg(long, default_value_t = 1000)]
    max_inflight: usize,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// Local IPv4 addresses to bind, e.g. 127.0.0.2-127.0.0.60 (split between workers).
    #[arg(long)]
    source_ips: Option<String>,
    /// Channels; connections are spread over them with Zipf popularity.
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Channel name (one channel) or prefix (NAME-0, NAME-1, ...).
    #[arg(long, default_value = "bench")]
    channel_name: String,
    /// Zipf exponent of channel popularity, for connections and events alike (0: uniform).
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Subscribe with a Gen C `subscribe` message after `connected` instead of URL channels.
    #[arg(long)]
    subscribe_message: bool,
    /// Fixed-rate phases, events per second, e.g. 10,50,100.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// Search for the highest rate every subscriber keeps up with (doubling, then bisection).
    #[arg(long)]
    find_max: bool,
    #[arg(long, default_value_t = 4.0)]
    ramp_start: f64,
    #[arg(long, default_value_t = 2.0)]
    ramp_factor: f64,
    /// Stop the search once the highest good and lowest bad rate are this close (relative).
    #[arg(long, default_value_t = 0.15)]
    ramp_precision: f64,
    #[arg(long, default_value_t = 14)]
    ramp_max_phases: usize,
    /// Run a rate that failed again this many times before taking it as failed: on a shared
    /// machine one noisy phase should not end the search (every server gets the same chance).
    #[arg(long, default_value_t = 1)]
    ramp_retries: usize,
    #[arg(long, default_value_t = 100_000.0)]
    max_rate: f64,
    /// Length of each rate phase.
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    phase_time: Duration,
    /// A rate is kept up with when nothing is lost or duplicated, the publisher kept its
    /// schedule, the time from publish to the last subscriber did not grow during the phase
    /// (median of the last quarter of events at most 1.25 x that of the second quarter + 50 ms),
    /// and the last delivery came at most this long after the last publish.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    max_drain: Duration,
    /// Abandon a rate phase once deliveries fall this far behind the publish schedule (it did
    /// not keep up; a server that buffers without bound would otherwise build a backlog that
    /// takes minutes to drain).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    max_lag: Duration,
    /// Upper bound on waiting for deliveries after the last publish of a phase.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// A burst phase: this many events back to back.
    #[arg(long, default_value_t = 0)]
    burst: usize,
    /// A single-event phase: this many events one at a time, each once the previous one
    /// reached every subscriber (time from publish to the last subscriber).
    #[arg(long, default_value_t = 0)]
    single: usize,
    /// Pause before each single event once every subscriber has the previous one.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    single_gap: Duration,
    /// A churn phase: this fraction of the connections closes and reopens every second.
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    churn_time: Duration,
    /// Events per second during churn.
    #[arg(long, default_value_t = 10.0)]
    churn_rate: f64,
    /// Hold the connections this long after the phases, without events (server memory).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Close every connection at the end and measure the server's memory again after `--settle`.
    #[arg(long)]
    close_at_end: bool,
    /// Publisher connections (threads); each channel always uses the same one, so events of a
    /// channel stay in order.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Payload padding in bytes; several values (e.g. 0,256,2048) make a random mix.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pad: Vec<usize>,
    /// Server process(es) whose RSS and CPU time are read from /proc (repeatable).
    #[arg(long)]
    server_pid: Vec<u32>,
    /// Name of the server under test in the report.
    #[arg(long, default_value = "server")]
    label: String,
    /// Worker processes (default: as few as the open-file limit allows).
    #[arg(long)]
    workers: Option<usize>,
    /// Write a self-contained HTML report here.
    #[arg(long)]
    html: Option<PathBuf>,
    /// Upper bound on the whole run.
    #[arg(long, default_value = "20m", value_parser = humantime::parse_duration)]
    max_time: Duration,
}

/// What a phase does.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// `rate` events per second for `secs`; `search`: part of the search (not a pass/fail check).
    Rate {
        rate: f64,
        search: bool,
    },
    Burst,
    Single,
    Churn,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Rate { search: true, .. } => "search",
            Self::Rate { .. } => "rate",
            Self::Burst => "burst",
            Self::Single => "single",
            Self::Churn => "churn",
        }
    }
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
}

/// The latest progress report of a worker.
#[derive(Default, Clone, Copy)]
struct Progress {
    open: u64,
    inflight: u64,
    failed: u64,
    lost: u64,
    phase_delivered: u64,
    received: u64,
    /// Bench events over all phases.
    events: u64,
    closed_by_us: u64,
}

/// Samples over the whole run, for the report's charts.
#[derive(Default)]
struct Timeline {
    t: Vec<f64>,
    open: Vec<u64>,
    /// Events delivered (all phases, cumulative).
    delivered: Vec<u64>,
    server_rss: Vec<u64>,
    server_cpu: Vec<f64>,
}

struct Coordinator<'a> {
    args: &'a FanoutArgs,
    workers: Vec<Worker>,
    rx: mpsc::Receiver<(usize, Value)>,
    inbox: VecDeque<(usize, Value)>,
    progress: Vec<Progress>,
    timeline: Timeline,
    start: Instant,
    deadline: Instant,
    next_sample: Instant,
    next_status: Instant,
    channel_names: Vec<String>,
    cdf: Vec<f64>,
    /// Subscribers per channel as reported by the workers when they were ready.
    subscribers: Vec<u64>,
    sink: Sink,
    pool: Pool,
    stop: Arc<AtomicBool>,
    phases: Vec<Value>,
    next_phase: u32,
    status: String,
    rng: SplitMix,
}

/// A small deterministic generator, so every server gets the same event sequence.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Server figures at one moment.
#[derive(Clone, Copy, Default)]
struct ServerSample {
    rss: u64,
    cpu: f64,
}

pub(crate) fn run(args: &FanoutArgs) -> anyhow::Result<u8> {
    ensure!(args.connections > 0, "--connections must be at least 1");
    ensure!(args.connect_rate > 0.0, "--connect-rate must be positive");
    ensure!(args.channels >= 1, "--channels must be at least 1");
    ensure!(
        args.channels <= usize::from(u16::MAX),
        "--channels must be at most {}",
        u16::MAX
    );
    ensure!(args.target.len() <= 1000, "too many --target URLs");
    ensure!(
        args.rates.iter().all(|r| *r > 0.0),
        "--rates must be positive"
    );
    let channel_names: Vec<String> = if args.channels == 1 {
        vec![args.channel_name.clone()]
    } else {
        (0..args.channels)
            .map(|i| format!("{}-{i}", args.channel_name))
            .collect()
    };
    // Fail early and plainly: bad targets, bad sources, unreachable or refusing servers.
    let sources = match &args.source_ips {
        Some(spec) => parse_source_ips(spec)?,
        None => Vec::new(),
    };
    check_source_ips(&sources)?;
    for url in &args.target {
        let t = if args.subscribe_message {
            Target::parse(url)?
        } else {
            Target::with_channels(url, &channel_names[..1])?
        };
        ensure!(!t.tcp, "{url}: fanout needs a ws:// target");
        probe(&t, sources.first().copied())?;
    }
    let mut sink = args.sink.connect()?;
    // A publish nobody subscribes to: checks the publish path before any connection opens.
    sink.publish_retrying(
        &args.project,
        "herald-bench-probe",
        r#"{"probe":true}"#,
        Instant::now() + Duration::from_secs(5),
    )
    .context("the publish probe failed")?;

    let names = Arc::new(channel_names.clone());
    let make_sink = || args.sink.connect();
    let pool = Pool::new(args.publishers, &make_sink, &args.project, names)?;
    let capacity = fd_capacity()?.saturating_sub(16).max(1);
    let needed = args.connections.div_ceil(capacity);
    let workers = args.workers.unwrap_or(1).max(needed);
    ensure!(
        workers <= 256,
        "{} connections need {workers} worker processes at {capacity} per process: raise the \
         open-file hard limit (ulimit -Hn)",
        args.connections
    );
    let stop = crate::stop_flag()?;
    let start = Instant::now();
    let mut c = Coordinator {
        args,
        workers: Vec::new(),
        rx: mpsc::channel().1,
        inbox: VecDeque::new(),
        progress: vec![Progress::default(); workers],
        timeline: Timeline::default(),
        start,
        deadline: start + args.max_time,
        next_sample: start,
        next_status: start + STATUS_EVERY,
        cdf: zipf_cdf(args.channels, args.zipf),
        channel_names,
        subscribers: vec![0; args.channels],
        sink,
        pool,
        stop,
        phases: Vec::new(),
        next_phase: 1,
        status: "starting".into(),
        rng: SplitMix(0x5EED),
    };
    let result = c.run_all(workers, &sources);
    c.shutdown();
    let summary = result?;
    println!("{summary}");
    if let Some(path) = &args.html {
        let html = crate::report::html(&[(args.label.clone(), summary.clone())], None);
        std::fs::write(path, html).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("herald-bench: report written to {}", path.display());
    }
    let ok = summary["connect"]["connected"] == summary["connect"]["requested"]
        && summary["checks_failed"]
            .as_array()
            .is_some_and(Vec::is_empty);
    Ok(u8::from(!ok))
}

impl Coordinator<'_> {
    fn run_all(&mut self, workers: usize, sources: &[std::net::Ipv4Addr]) -> anyhow::Result<Value> {
        let args = self.args;
        let server_start = self.server_sample();
        self.spawn(workers, sources)?;
        self.status = "connecting".into();
        let ready = self.wait_all("ready", self.connect_timeout())?;
        let connect = self.merge_connect(&ready);
        let after_connect = self.settled_server_sample();

        let mut checks_failed: Vec<String> = Vec::new();
        let connected = connect["connected"].as_u64().unwrap_or(0);
        if connected < args.connections as u64 {
            checks_failed.push(format!(
                "connect: {connected} of {} connections opened",
                args.connections
            ));
        }
        let mut search: Option<Value> = None;
        // The lightest phases first: the search ends above what the server keeps up with.
        if connected > 0 {
            if args.single > 0 {
                self.phase(Kind::Single, args.single as u64)?;
            }
            if args.burst > 0 {
                self.phase(Kind::Burst, args.burst as u64)?;
            }
            for &rate in &args.rates {
                self.phase(
                    Kind::Rate {
                        rate,
                        search: false,
                    },
                    (rate * args.phase_time.as_secs_f64()).ceil() as u64,
                )?;
            }
            if args.find_max {
                search = Some(self.find_max()?);
            }
        }
        let mut memory = json!({
            "server_at_start": sample_json(server_start),
            "server_connected": sample_json(after_connect),
        });
        if connected > 0 && args.churn > 0.0 {
            memory["server_before_churn"] = sample_json(self.settled_server_sample());
            let events = (args.churn_rate * args.churn_time.as_secs_f64()).ceil() as u64;
            self.phase(Kind::Churn, events)?;
            self.refill()?;
            self.hold(args.settle)?;
            memory["server_after_churn"] = sample_json(self.settled_server_sample());
        } else if !args.settle.is_zero() {
            self.hold(args.settle)?;
            memory["server_settled"] = sample_json(self.settled_server_sample());
        }
        if args.close_at_end {
            self.status = "closing".into();
            self.send_all(&json!({"cmd": "close"}))?;
            self.wait_all("closed", Duration::from_secs(30))?;
            self.hold(args.settle.max(Duration::from_millis(500)))?;
            memory["server_after_close"] = sample_json(self.settled_server_sample());
        }
        for p in &self.phases {
            if p["checked"] == true && p["clean"] != true {
                checks_failed.push(format!(
                    "{} phase {}: {} missing, {} duplicates, {} misrouted, {} connections lost{}",
                    p["kind"].as_str().unwrap_or("?"),
                    p["id"],
                    p["missing"],
                    p["duplicates"],
                    p["misrouted"],
                    p["lost_connections"],
                    p["error"]
                        .as_str()
                        .map_or(String::new(), |e| format!(", {e}"))
                ));
            }
        }
        self.status = "finishing".into();
        self.send_all(&json!({"cmd": "quit"}))?;
        let finals = self.wait_all("final", Duration::from_secs(30))?;
        let bench_rss: u64 = finals.iter().map(|f| f["rss"].as_u64().unwrap_or(0)).sum();
        let mut other = BTreeMap::new();
        let mut lost = BTreeMap::new();
        for f in &finals {
            for (map, key) in [(&mut other, "other_messages"), (&mut lost, "lost")] {
                for (k, v) in f[key].as_object().into_iter().flatten() {
                    bump_n(map, k.clone(), v.as_u64().unwrap_or(0));
                }
            }
        }
        if search.is_none() {
            // No search: the best fixed rate every subscriber kept up with.
            search = self
                .phases
                .iter()
                .filter(|p| p["kind"] == "rate" && p["sustained"] == true)
                .max_by(|a, b| {
                    let r = |p: &Value| p["rate"].as_f64().unwrap_or(0.0);
                    r(a).total_cmp(&r(b))
                })
                .map(sustained_json);
        }
        let single = self
            .phases
            .iter()
            .rev()
            .find(|p| p["kind"] == "single")
            .map(|p| {
                json!({
                    "time_to_last_subscriber_ms": p["time_to_last_subscriber_ms"],
                    "time_to_first_subscriber_ms": p["time_to_first_subscriber_ms"],
                    "events": p["published"],
                    "incomplete_events": p["incomplete_events"],
                })
            });
        let burst = self
            .phases
            .iter()
            .rev()
            .find(|p| p["kind"] == "burst")
            .map(|p| {
                json!({"events": p["published"], "delivered_per_s": p["delivered_per_s"],
                "latency_ms": p["latency_ms"], "clean": p["clean"]})
            });
        Ok(json!({
            "label": args.label,
            "date_unix": unix_us() / 1_000_000,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "machine": machine(),
            "targets": args.target,
            "publisher": self.sink.describe(),
            "connections": args.connections,
            "channels": args.channels,
            "zipf": args.zipf,
            "subscribe_message": args.subscribe_message,
            "pad": args.pad,
            "workers": workers,
            "subscribers_per_channel_top": self.subscribers.iter().take(10).collect::<Vec<_>>(),
            "connect": connect,
            "phases": self.phases,
            "max_sustained": search,
            "single": single,
            "burst": burst,
            "memory": memory,
            "bench": {
                "rss_total": bench_rss,
                "rss_per_connection": bench_rss as f64 / args.connections as f64,
                "other_messages": other,
                "lost_connections": lost,
            },
            "timeline": {
                "t": self.timeline.t,
                "open": self.timeline.open,
                "delivered": self.timeline.delivered,
                "server_rss": self.timeline.server_rss,
                "server_cpu": self.timeline.server_cpu,
            },
            "duration_s": self.start.elapsed().as_secs_f64(),
            "checks_failed": checks_failed,
        }))
    }

    fn connect_timeout(&self) -> Duration {
        let args = self.args;
        Duration::from_secs_f64(args.connections as f64 / args.connect_rate)
            + args.handshake_timeout
            + Duration::from_secs(30)
    }

    fn spawn(&mut self, workers: usize, sources: &[std::net::Ipv4Addr]) -> anyhow::Result<()> {
        let args = self.args;
        let exe = std::env::current_exe().context("cannot find herald-bench's own executable")?;
        let (tx, rx) = mpsc::channel();
        self.rx = rx;
        for index in 0..workers {
            let mine: Vec<String> = if sources.len() >= workers {
                let (lo, hi) = (
                    index * sources.len() / workers,
                    (index + 1) * sources.len() / workers,
                );
                sources[lo..hi].iter().map(ToString::to_string).collect()
            } else {
                sources.iter().map(ToString::to_string).collect()
            };
            let spec = WorkerSpec {
                index,
                workers,
                total: args.connections,
                targets: args.target.clone(),
                channels: self.channel_names.clone(),
                zipf: args.zipf,
                subscribe_message: args.subscribe_message,
                rate: args.connect_rate / workers as f64,
                max_inflight: args.max_inflight.div_ceil(workers),
                handshake_timeout_ms: args.handshake_timeout.as_millis() as u64,
                sources: mine,
            };
            let mut child = Command::new(&exe)
                .arg("worker")
                .arg("--spec")
                .arg(serde_json::to_string(&spec)?)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("cannot start a worker process")?;
            let stdout = child.stdout.take().context("worker stdout")?;
            let stdin = child.stdin.take().context("worker stdin")?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let v = serde_json::from_str(&line)
                        .unwrap_or_else(|_| json!({"k": "garbage", "line": line}));
                    if tx.send((index, v)).is_err() {
                        return;
                    }
                }
                let _ = tx.send((index, json!({"k": "eof"})));
            });
            self.workers.push(Worker { child, stdin });
        }
        Ok(())
    }

    /// Stops every worker: they exit on `quit` or when their stdin closes; killed after 5 s.
    fn shutdown(&mut self) {
        for w in &mut self.workers {
            let _ = writeln!(w.stdin, r#"{{"cmd":"quit"}}"#);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for w in &mut self.workers {
            loop {
                match w.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = w.child.kill();
                        let _ = w.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }

    fn send_all(&mut self, cmd: &Value) -> anyhow::Result<()> {
        let line = cmd.to_string();
        for (i, w) in self.workers.iter_mut().enumerate() {
            writeln!(w.stdin, "{line}")
                .and_then(|()| w.stdin.flush())
                .with_context(|| format!("worker {i} is gone"))?;
        }
        Ok(())
    }

    /// Handles worker messages and samples until `until`; keeps non-progress messages.
    fn pump(&mut self, until: Instant) -> anyhow::Result<()> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            // Whatever arrived, even when the caller is already late (a publisher behind its
            // schedule must still see current progress).
            while let Ok((i, v)) = self.rx.try_recv() {
                self.handle(i, v);
            }
            let now = Instant::now();
            if now >= self.deadline {
                bail!("the run exceeded --max-time {:?}", self.args.max_time);
            }
            // No catching up after a stall: samples close together make no rate.
            if now >= self.next_sample {
                self.next_sample = now + SAMPLE_EVERY;
                self.sample();
            }
            if now >= self.next_status {
                self.next_status = now + STATUS_EVERY;
                self.print_status();
            }
            if now >= until {
                return Ok(());
            }
            let wait = until
                .min(self.next_sample)
                .min(self.next_status)
                .saturating_duration_since(now);
            match self.rx.recv_timeout(wait) {
                Ok((i, v)) => self.handle(i, v),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // Every worker is gone; their last words are in the inbox.
                Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
            }
        }
    }

    /// Books one worker message: progress is kept, everything else waits in the inbox.
    fn handle(&mut self, i: usize, v: Value) {
        if v["k"] == "p" {
            let u = |k: &str| v[k].as_u64().unwrap_or(0);
            self.progress[i] = Progress {
                open: u("open"),
                inflight: u("inflight"),
                failed: u("failed"),
                lost: u("lost"),
                phase_delivered: u("pd"),
                received: u("rx"),
                events: u("ev"),
                closed_by_us: u("closed_by_us"),
            };
        } else {
            self.inbox.push_back((i, v));
        }
    }

    /// Waits for a message of kind `k` from every worker.
    fn wait_all(&mut self, k: &str, timeout: Duration) -> anyhow::Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        let mut got: Vec<Option<Value>> = vec![None; self.workers.len()];
        loop {
            while let Some(pos) = self.inbox.iter().position(|(_, v)| v["k"] == k) {
                let (i, v) = self.inbox.remove(pos).expect("position is valid");
                got[i] = Some(v);
            }
            if got.iter().all(Option::is_some) {
                return Ok(got.into_iter().flatten().collect());
            }
            if let Some(&(i, _)) = self
                .inbox
                .iter()
                .find(|(i, v)| v["k"] == "eof" && got[*i].is_none())
            {
                let status = self.workers[i].child.try_wait().ok().flatten();
                bail!(
                    "worker {i} stopped unexpectedly ({status:?}) while {k:?} was awaited; see its error above"
                );
            }
            if Instant::now() >= deadline {
                let missing: Vec<usize> = (0..got.len()).filter(|&i| got[i].is_none()).collect();
                bail!("workers {missing:?} did not report {k:?} within {timeout:?}");
            }
            self.pump((Instant::now() + Duration::from_millis(50)).min(deadline))?;
        }
    }

    fn hold(&mut self, d: Duration) -> anyhow::Result<()> {
        self.status = format!("holding {d:?}");
        self.pump(Instant::now() + d)
    }

    fn server_sample(&self) -> Option<ServerSample> {
        if self.args.server_pid.is_empty() {
            return None;
        }
        let mut s = ServerSample::default();
        for pid in &self.args.server_pid {
            let pid = pid.to_string();
            s.rss += proc_rss_bytes(&pid)?;
            s.cpu += proc_cpu_seconds(&pid)?;
        }
        Some(s)
    }

    /// The server's figures once its RSS is stable (two samples 0.5 s apart within 64 KiB,
    /// at most 10 s).
    fn settled_server_sample(&mut self) -> Option<ServerSample> {
        let mut prev = self.server_sample()?;
        for _ in 0..20 {
            if self
                .pump(Instant::now() + Duration::from_millis(500))
                .is_err()
            {
                break;
            }
            let cur = self.server_sample()?;
            if cur.rss.abs_diff(prev.rss) < 64 * 1024 {
                return Some(cur);
            }
            prev = cur;
        }
        Some(prev)
    }

    fn totals(&self) -> Progress {
        self.progress
            .iter()
            .fold(Progress::default(), |a, p| Progress {
                open: a.open + p.open,
                inflight: a.inflight + p.inflight,
                failed: a.failed + p.failed,
                lost: a.lost + p.lost,
                phase_delivered: a.phase_delivered + p.phase_delivered,
                received: a.received + p.received,
                events: a.events + p.events,
                closed_by_us: a.closed_by_us + p.closed_by_us,
            })
    }

    fn sample(&mut self) {
        let t = self.totals();
        let s = self.server_sample().unwrap_or_default();
        let tl = &mut self.timeline;
        tl.t.push(self.start.elapsed().as_secs_f64());
        tl.open.push(t.open);
        tl.delivered.push(t.events);
        tl.server_rss.push(s.rss);
        tl.server_cpu.push(s.cpu);
    }

    fn print_status(&self) {
        let t = self.totals();
        let server = self.server_sample().map_or(String::new(), |s| {
            format!(
                " | server rss {:.1} MiB cpu {:.1}s",
                s.rss as f64 / f64::from(1 << 20),
                s.cpu
            )
        });
        eprintln!(
            "herald-bench [{}] {:6.1}s {}: open {} in-flight {} failed {} lost {} delivered {}{server}",
            self.args.label,
            self.start.elapsed().as_secs_f64(),
            self.status,
            t.open,
            t.inflight,
            t.failed,
            t.lost,
            t.phase_delivered,
        );
    }

    fn merge_connect(&mut self, ready: &[Value]) -> Value {
        let mut hist = new_hist();
        let mut failures = BTreeMap::new();
        let (mut connected, mut failed) = (0u64, 0u64);
        let (mut first, mut last) = (u64::MAX, 0u64);
        let mut bench_rss = 0;
        self.subscribers = vec![0; self.args.channels];
        for r in ready {
            connected += r["connected"].as_u64().unwrap_or(0);
            failed += r["failed"].as_u64().unwrap_or(0);
            hist_merge_json(&mut hist, &r["handshake_hist"]);
            for (k, v) in r["failures"].as_object().into_iter().flatten() {
                bump_n(&mut failures, k.clone(), v.as_u64().unwrap_or(0));
            }
            if let Some(f) = r["first_open_unix"].as_u64().filter(|&f| f > 0) {
                first = first.min(f);
            }
            last = last.max(r["last_connected_unix"].as_u64().unwrap_or(0));
            bench_rss += r["rss"].as_u64().unwrap_or(0);
            for (i, n) in r["subscribers"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                if let Some(s) = self.subscribers.get_mut(i) {
                    *s += n.as_u64().unwrap_or(0);
                }
            }
        }
        let secs = (last.saturating_sub(first)) as f64 / 1e6;
        if !failures.is_empty() {
            eprintln!("herald-bench: connection failures: {failures:?}");
        }
        json!({
            "requested": self.args.connections,
            "connected": connected,
            "failed": failed,
            "failures": failures,
            "duration_s": secs,
            "rate_per_s": if secs > 0.0 { connected as f64 / secs } else { 0.0 },
            "handshake_ms": percentiles_ms(&hist),
            "bench_rss": bench_rss,
        })
    }

    /// Waits until no worker receives anything for a while (deliveries of an earlier phase),
    /// at most 30 s.
    fn quiesce(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = self.totals().received;
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline {
            self.pump(Instant::now() + Duration::from_millis(250))?;
            let now = self.totals().received;
            if now != last {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= Duration::from_millis(500) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Reopens connections that failed or were lost, so every phase starts complete.
    fn refill(&mut self) -> anyhow::Result<()> {
        let t = self.totals();
        if t.open >= self.args.connections as u64 {
            return Ok(());
        }
        self.status = "reopening lost connections".into();
        self.send_all(&json!({"cmd": "refill"}))?;
        self.wait_all("refilled", self.connect_timeout())?;
        Ok(())
    }

    /// Runs one phase of `events` events and records its merged result.
    fn phase(&mut self, kind: Kind, events: u64) -> anyhow::Result<Value> {
        let args = self.args;
        let id = self.next_phase;
        self.next_phase += 1;
        self.status = format!("phase {id} ({}): settling", kind.name());
        self.quiesce()?;
        self.refill()?;
        let open_at_start = self.totals().open;
        let closed_at_start = self.totals().closed_by_us;
        let before = self.server_sample();
        let churn = if kind == Kind::Churn { args.churn } else { 0.0 };
        self.send_all(&json!({"cmd": "begin", "id": id, "churn": churn}))?;
        // Let every worker start the phase before its first event can arrive.
        self.pump(Instant::now() + Duration::from_millis(100))?;

        let (rate, gap) = match kind {
            Kind::Rate { rate, .. } => (rate, Duration::from_secs_f64(1.0 / rate)),
            Kind::Churn => (
                args.churn_rate,
                Duration::from_secs_f64(1.0 / args.churn_rate),
            ),
            // Paced by deliveries, not by the clock.
            Kind::Single => (f64::INFINITY, Duration::ZERO),
            Kind::Burst => (f64::INFINITY, Duration::ZERO),
        };
        let label = match kind {
            Kind::Rate { rate, .. } => format!("{} events/s", fmt_rate(rate)),
            Kind::Churn => format!("{:.0}%/s churn", args.churn * 100.0),
            Kind::Single => format!(
                "one event at a time ({:?} after the previous one reached everyone)",
                args.single_gap
            ),
            Kind::Burst => "burst".into(),
        };
        let mut abandoned: Option<String> = None;
        let max_lag = match kind {
            Kind::Rate { rate, .. } => {
                // Subscribers per event on average: events pick channels by the same Zipf law.
                let per_event: f64 = self
                    .cdf
                    .iter()
                    .zip(&self.subscribers)
                    .scan(0.0, |prev, (&c, &subs)| {
                        let p = c - *prev;
                        *prev = c;
                        Some(p * subs as f64)
                    })
                    .sum();
                Some((rate * args.max_lag.as_secs_f64() * per_event).max(1.0) as u64)
            }
            _ => None,
        };
        let mut channel_of: Vec<u16> = Vec::with_capacity(events as usize);
        let publish_start = Instant::now();
        let first_sent = unix_us();
        let mut book = Published::new(args.channels, first_sent, publish_start);
        // How long one event may take to publish: a busy server answers slowly.
        let per_event = match kind {
            Kind::Single => args.single_gap + Duration::from_secs(10),
            Kind::Burst => Duration::from_millis(500),
            _ => gap,
        };
        let phase_deadline =
            publish_start + per_event.mul_f64(events as f64) + Duration::from_secs(30);
        let mut submitted = 0u64;
        self.pool.set_phase(id);
        for k in 0..events {
            if kind == Kind::Single {
                // One event at a time: the next once every subscriber has the previous one
                // (at most 10 s), after a pause in which the server has nothing to do.
                let wait_until = Instant::now() + Duration::from_secs(10);
                while k > 0
                    && (book.completed < submitted || self.totals().phase_delivered < book.owed)
                    && Instant::now() < wait_until
                    && book.error.is_none()
                {
                    self.pump(Instant::now() + Duration::from_millis(2))?;
                    self.collect_published(&mut book);
                }
                self.pump(Instant::now() + args.single_gap)?;
            } else {
                let due = publish_start + gap.mul_f64(k as f64);
                if due > Instant::now() {
                    self.pump(due)?;
                } else if k % 64 == 0 {
                    self.pump(Instant::now())?;
                }
            }
            self.collect_published(&mut book);
            if book.error.is_some() {
                break;
            }
            if k % 16 == 0 {
                self.status = format!(
                    "phase {id} ({label}): published {}/{events}",
                    book.completed
                );
            }
            if let Some(limit) = max_lag {
                let behind = book.owed.saturating_sub(self.totals().phase_delivered);
                if behind > limit {
                    let msg = format!(
                        "abandoned after {k} events: {behind} deliveries behind (more than {:?} of the offered load)",
                        args.max_lag
                    );
                    eprintln!("herald-bench [{}] phase {id}: {msg}", args.label);
                    abandoned = Some(msg);
                    break;
                }
            }
            let chan = if args.channels == 1 {
                0
            } else {
                let u = self.rng.unit();
                self.cdf.partition_point(|&c| c < u).min(args.channels - 1)
            };
            let pad = if args.pad.len() == 1 {
                args.pad[0]
            } else {
                args.pad[(self.rng.next() % args.pad.len() as u64) as usize]
            };
            let seq = book.times[chan].len() as u64;
            // Filled in with the send time when the publisher thread is done with it.
            book.times[chan].push(u64::MAX);
            channel_of.push(chan as u16);
            self.pool.submit(Job {
                phase: id,
                index: k,
                chan,
                seq,
                pad,
                deadline: phase_deadline,
            })?;
            submitted += 1;
        }
        // Every submitted event is published (or failed) before the phase goes on.
        while book.completed < submitted
            && Instant::now() < phase_deadline + Duration::from_secs(10)
        {
            self.pump(Instant::now() + Duration::from_millis(5))?;
            self.collect_published(&mut book);
        }
        // Whatever is still queued is dropped unpublished.
        self.pool.set_phase(0);
        if book.completed < submitted {
            book.error.get_or_insert_with(|| {
                format!(
                    "{} events were never confirmed by the publisher",
                    submitted - book.completed
                )
            });
        }
        let published = book.completed;
        let publish_secs = book.last_done.duration_since(publish_start).as_secs_f64();
        if kind == Kind::Churn {
            self.send_all(&json!({"cmd": "churn", "frac": 0}))?;
        }

        // Deliveries: until all expected arrived, none for a second, or the drain timeout.
        let expected: u64 = if kind == Kind::Churn {
            u64::MAX
        } else {
            book.times
                .iter()
                .zip(&self.subscribers)
                .map(|(t, s)| t.len() as u64 * s)
                .sum()
        };
        self.status = format!("phase {id} ({label}): draining");
        let drain_deadline = Instant::now() + args.drain_timeout;
        // Churn has no exact count to wait for: its deliveries end with the events, since no
        // batch is large there.
        let quiet = if kind == Kind::Churn {
            CHURN_QUIET
        } else {
            QUIET
        };
        let mut last_count = self.totals().phase_delivered;
        let mut quiet_since = Instant::now();
        loop {
            let now = self.totals().phase_delivered;
            if now >= expected || Instant::now() >= drain_deadline {
                break;
            }
            if now != last_count {
                last_count = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= quiet {
                break;
            }
            self.pump(Instant::now() + Duration::from_millis(50))?;
        }
        let after = self.server_sample();
        let closed_by_us = self.totals().closed_by_us - closed_at_start;
        self.status = format!("phase {id} ({label}): judging");
        self.send_all(&json!({
            "cmd": "end", "id": id, "times": book.times,
            "grace_us": 2_000_000, "max_events": MAX_EVENTS_REPORTED,
        }))?;
        let results = self.wait_all("result", Duration::from_secs(60))?;

        // Merge.
        let sum = |k: &str| {
            results
                .iter()
                .map(|r| r[k].as_u64().unwrap_or(0))
                .sum::<u64>()
        };
        let (exp, unique, missing, dups) = (
            sum("expected"),
            sum("unique"),
            sum("missing"),
            sum("duplicates"),
        );
        let (misrouted, lost, with_loss, judged) = (
            sum("misrouted"),
            sum("lost_connections"),
            sum("connections_with_loss"),
            sum("connections_judged"),
        );
        let last_recv = results
            .iter()
            .map(|r| r["last_recv_unix"].as_u64().unwrap_or(0))
            .max()
            .unwrap_or(0);
        let mut latency = new_hist();
        let mut examples = Vec::new();
        let mut per_event: Vec<(u64, u64, u64)> = Vec::new();
        for r in &results {
            hist_merge_json(&mut latency, &r["latency_hist"]);
            examples.extend(
                r["loss_examples"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .take(3)
                    .cloned(),
            );
            for (g, e) in r["events"].as_array().into_iter().flatten().enumerate() {
                if per_event.len() <= g {
                    per_event.resize(g + 1, (0, u64::MAX, 0));
                }
                let (count, lo, hi) = (
                    e[0].as_u64().unwrap_or(0),
                    e[1].as_u64().unwrap_or(0),
                    e[2].as_u64().unwrap_or(0),
                );
                if count > 0 {
                    let p = &mut per_event[g];
                    p.0 += count;
                    p.1 = p.1.min(lo);
                    p.2 = p.2.max(hi);
                }
            }
        }
        // Time to the first and the last subscriber, over events every subscriber got.
        let mut ttl = new_hist();
        let mut ttf = new_hist();
        let mut incomplete = 0u64;
        // Time to the last subscriber of each event, in publish order (None: incomplete).
        let mut ttl_seq: Vec<Option<u64>> = Vec::with_capacity(channel_of.len());
        for (g, &chan) in channel_of.iter().enumerate().take(MAX_EVENTS_REPORTED) {
            let want = self.subscribers[usize::from(chan)];
            let (count, lo, hi) = per_event.get(g).copied().unwrap_or((0, 0, 0));
            if kind != Kind::Churn && count < want {
                incomplete += 1;
                ttl_seq.push(None);
                continue;
            }
            ttl_seq.push(Some(hi));
            if count > 0 {
                let _ = ttl.record(hi.max(1));
                let _ = ttf.record(lo.max(1));
            }
        }
        let (ttl_q2, ttl_q4) = quarter_medians(&ttl_seq);
        let backlog_grew = match (ttl_q2, ttl_q4) {
            (Some(q2), Some(q4)) => q4 as f64 > 1.25 * q2 as f64 + 50_000.0,
            _ => false,
        };
        let deliver_secs = (last_recv.saturating_sub(first_sent)) as f64 / 1e6;
        let drain_s = if last_recv > 0 {
            (last_recv as f64 - book.last_sent as f64) / 1e6
        } else {
            0.0
        };
        let achieved = if publish_secs > 0.0 {
            published as f64 / publish_secs
        } else {
            0.0
        };
        let clean =
            missing == 0 && dups == 0 && misrouted == 0 && lost == 0 && book.error.is_none();
        let kept_schedule = match kind {
            Kind::Rate { rate, .. } => published == events && achieved >= 0.95 * rate,
            _ => published == events,
        } && abandoned.is_none();
        let sustained =
            clean && kept_schedule && !backlog_grew && drain_s <= args.max_drain.as_secs_f64();
        let cpu = match (before, after) {
            (Some(b), Some(a)) => Some(a.cpu - b.cpu),
            _ => None,
        };
        let delivered_per_s = if deliver_secs > 0.0 {
            unique as f64 / deliver_secs
        } else {
            0.0
        };
        let result = json!({
            "id": id,
            "kind": kind.name(),
            "label": label,
            "checked": !matches!(kind, Kind::Rate { search: true, .. }),
            "rate": if rate.is_finite() { json!(rate) } else { Value::Null },
            "requested_events": events,
            "published": published,
            "publish_secs": publish_secs,
            "achieved_rate": achieved,
            "busy_retries": book.retries,
            "publish_latency_ms": percentiles_ms(&book.hist),
            "error": book.error,
            "abandoned": abandoned,
            "connections_at_start": open_at_start,
            "closed_by_us": closed_by_us,
            "connections_judged": judged,
            "expected": exp,
            "delivered": unique,
            "missing": missing,
            "duplicates": dups,
            "misrouted": misrouted,
            "lost_connections": lost,
            "connections_with_loss": with_loss,
            "loss_examples": examples,
            "delivered_per_s": delivered_per_s,
            "drain_s": drain_s,
            "latency_ms": percentiles_ms(&latency),
            "latency_curve": curve(&latency),
            "time_to_last_subscriber_ms": percentiles_ms(&ttl),
            "time_to_first_subscriber_ms": percentiles_ms(&ttf),
            "incomplete_events": incomplete,
            "ttl_median_ms_q2_q4": [ttl_q2.map(|v| v as f64 / 1000.0), ttl_q4.map(|v| v as f64 / 1000.0)],
            "backlog_grew": backlog_grew,
            "stray": sum("stray"),
            "clean": clean,
            "sustained": sustained,
            "start_s": publish_start.duration_since(self.start).as_secs_f64(),
            "server": {
                "rss_start": before.map(|s| s.rss),
                "rss_end": after.map(|s| s.rss),
                "cpu_s": cpu,
                "cpu_s_per_million_delivered": cpu.filter(|_| unique > 0).map(|c| c * 1e6 / unique as f64),
            },
        });
        eprintln!(
            "herald-bench [{}] phase {id} {label}: published {published} ({achieved:.1}/s), delivered {unique}/{exp} ({missing} missing, {dups} dup, {lost} conns lost), {:.0} msg/s, drain {:.3}s, latency p50 {} p99 {} ms, last subscriber p50 {} ms (2nd/4th quarter {}/{}){}",
            args.label,
            delivered_per_s,
            drain_s,
            fmt_ms(&result["latency_ms"]["p50"]),
            fmt_ms(&result["latency_ms"]["p99"]),
            fmt_ms(&result["time_to_last_subscriber_ms"]["p50"]),
            fmt_ms(&result["ttl_median_ms_q2_q4"][0]),
            fmt_ms(&result["ttl_median_ms_q2_q4"][1]),
            if matches!(kind, Kind::Rate { .. }) {
                if sustained {
                    " -> kept up"
                } else {
                    " -> did not keep up"
                }
            } else {
                ""
            }
        );
        self.phases.push(result.clone());
        Ok(result)
    }

    /// Books the publisher threads' answers: send times, latency, retries, errors.
    fn collect_published(&mut self, book: &mut Published) {
        while let Some(d) = self.pool.try_done() {
            if d.phase != self.next_phase - 1 {
                // Published for a phase that already ended.
                continue;
            }
            book.completed += 1;
            book.last_done = Instant::now();
            if let Some(e) = d.error {
                if book.error.is_none() {
                    eprintln!(
                        "herald-bench [{}]: {e}; ending the phase early",
                        self.args.label
                    );
                }
                book.error.get_or_insert(e);
                continue;
            }
            book.times[d.chan][d.seq as usize] = d.sent;
            book.owed += self.subscribers[d.chan];
            book.retries += d.retries;
            let _ = book.hist.record(d.latency_us);
            book.last_sent = book.last_sent.max(d.sent);
        }
    }

    /// Doubles the rate until a phase does not keep up, then bisects.
    fn find_max(&mut self) -> anyhow::Result<Value> {
        let args = self.args;
        let mut rate = args.ramp_start;
        let mut best: Option<Value> = None;
        let mut best_rate = 0.0;
        let mut fail_rate: Option<f64> = None;
        for _ in 0..args.ramp_max_phases {
            let events = (rate * args.phase_time.as_secs_f64()).ceil().max(1.0) as u64;
            let mut r = self.phase(Kind::Rate { rate, search: true }, events)?;
            for _ in 0..args.ramp_retries {
                if r["sustained"] == true {
                    break;
                }
                eprintln!(
                    "   herald-bench [{}] {} events/s failed: trying it again",
                    args.label,
                    fmt_rate(rate)
                );
                r = self.phase(Kind::Rate { rate, search: true }, events)?;
            }
            if r["sustained"] == true {
                best_rate = rate;
                best = Some(r);
                rate = match fail_rate {
                    None => rate * args.ramp_factor,
                    Some(f) => (rate + f) / 2.0,
                };
            } else {
                fail_rate = Some(rate);
                rate = (best_rate + rate) / 2.0;
            }
            if let Some(f) = fail_rate {
                if best_rate > 0.0 && f / best_rate <= 1.0 + args.ramp_precision {
                    break;
                }
                if best_rate == 0.0 && rate < 0.25 {
                    break;
                }
            }
            if rate > args.max_rate {
                break;
            }
        }
        Ok(match best {
            Some(r) => {
                let mut v = sustained_json(&r);
                v["first_failing_rate"] = json!(fail_rate);
                v
            }
            None => json!({"rate": null, "first_failing_rate": fail_rate}),
        })
    }
}

/// What the publisher threads reported during one phase.
struct Published {
    /// Per channel, each event's send time (`u64::MAX` until the publisher is done with it).
    times: Vec<Vec<u64>>,
    /// Deliveries owed so far (subscribers of each published event's channel).
    owed: u64,
    /// Events the publisher is done with (published or failed).
    completed: u64,
    retries: u64,
    hist: Histogram<u64>,
    error: Option<String>,
    last_sent: u64,
    last_done: Instant,
}

impl Published {
    fn new(channels: usize, first_sent: u64, start: Instant) -> Self {
        Self {
            times: vec![Vec::new(); channels],
            owed: 0,
            completed: 0,
            retries: 0,
            hist: new_hist(),
            error: None,
            last_sent: first_sent,
            last_done: start,
        }
    }
}

/// Medians of the second and the last quarter of a sequence (events every subscriber got).
fn quarter_medians(seq: &[Option<u64>]) -> (Option<u64>, Option<u64>) {
    let n = seq.len();
    if n < 8 {
        return (None, None);
    }
    let median = |part: &[Option<u64>]| {
        let mut v: Vec<u64> = part.iter().flatten().copied().collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied()
    };
    (median(&seq[n / 4..n / 2]), median(&seq[3 * n / 4..]))
}

/// The figures of the phase at the highest rate kept up with.
fn sustained_json(r: &Value) -> Value {
    json!({
        "rate": r["rate"],
        "first_failing_rate": null,
        "phase": r["id"],
        "delivered_per_s": r["delivered_per_s"],
        "latency_ms": r["latency_ms"],
        "time_to_last_subscriber_ms": r["time_to_last_subscriber_ms"],
        "cpu_s_per_million_delivered": r["server"]["cpu_s_per_million_delivered"],
    })
}

fn fmt_rate(r: f64) -> String {
    if r.fract() == 0.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.2}")
    }
}

fn fmt_ms(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.2}"))
}

fn sample_json(s: Option<ServerSample>) -> Value {
    s.map_or(Value::Null, |s| json!({"rss": s.rss, "cpu_s": s.cpu}))
}

/// The latency distribution as `[[percentile, ms], ...]`.
fn curve(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!([]);
    }
    Value::Array(
        CURVE
            .iter()
            .map(|&q| json!([q * 100.0, h.value_at_quantile(q) as f64 / 1000.0]))
            .collect(),
    )
}

/// What the run ran on.
pub(crate) fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
    });
    let mem = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .map(|l| l.trim().to_owned())
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_owned());
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "cpu": cpu,
        "memory": mem,
        "kernel": kernel,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarters() {
        let flat: Vec<Option<u64>> = (0..16).map(|_| Some(100)).collect();
        assert_eq!(quarter_medians(&flat), (Some(100), Some(100)));
        let growing: Vec<Option<u64>> = (0..16).map(|i| Some(i * 10)).collect();
        assert_eq!(quarter_medians(&growing), (Some(60), Some(140)));
        assert_eq!(quarter_medians(&growing[..4]), (None, None));
    }

    #[test]
    fn splitmix_is_deterministic_and_uniform() {
        let mut a = SplitMix(1);
        let mut b = SplitMix(1);
        assert_eq!(a.next(), b.next());
        let mean: f64 = (0..10_000).map(|_| a.unit()).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02);
    }
}
