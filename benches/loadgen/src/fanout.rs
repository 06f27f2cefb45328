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
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use hdrhistogram::Histogram;

use crate::client::{hist_merge, new_hist, percentiles_ms};
use crate::messages::{
    BenchFigures, BurstSummary, ConnectMerged, FanoutSummary, Final, MaxSustained, PhaseReport,
    PhaseResult, PhaseServer, Progress, Ready, ServerSample, SingleSummary, Timeline,
    WorkerCommand, WorkerReport, WorkerSpec,
};
use crate::publish::{Job, Pool, Sink, SinkArgs};
use crate::reasons::bump_n;
use crate::report::Run;
use crate::system::{fd_capacity, machine, proc_cpu_seconds, proc_rss_bytes, stop_flag, unix_us};
use crate::target::{Target, check_source_ips, parse_source_ips, probe};
use crate::worker::zipf_cdf;

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
    /// This fraction of the connections subscribes with `--query` (needs
    /// `--subscribe-message`), spread evenly over channels and workers.
    #[arg(long, default_value_t = 0.0)]
    query_fraction: f64,
    /// The Appwrite query of filtered subscriptions. The default matches every bench event
    /// (each payload carries `"kind":"bench"`), so filtered and unfiltered runs deliver alike.
    #[arg(
        long,
        default_value = r#"{"method":"equal","attribute":"kind","values":["bench"]}"#
    )]
    query: String,
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

/// What a worker's stdout reader passes on.
enum FromWorker {
    Report(WorkerReport),
    /// A line that is no report (kept, never awaited).
    Garbage,
    /// Its stdout closed: the worker is gone.
    Eof,
}

struct Coordinator<'a> {
    args: &'a FanoutArgs,
    workers: Vec<Worker>,
    rx: mpsc::Receiver<(usize, FromWorker)>,
    inbox: VecDeque<(usize, FromWorker)>,
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
    phases: Vec<PhaseResult>,
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

pub(crate) fn run(args: &FanoutArgs) -> anyhow::Result<u8> {
    validate(args)?;
    let channel_names: Vec<String> = if args.channels == 1 {
        vec![args.channel_name.clone()]
    } else {
        (0..args.channels)
            .map(|i| format!("{}-{i}", args.channel_name))
            .collect()
    };
    let sources = preflight(args, &channel_names)?;
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
    let stop = stop_flag()?;
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
    println!("{}", serde_json::to_string(&summary)?);
    let ok = summary.connect.connected == summary.connect.requested as u64
        && summary.checks_failed.is_empty();
    if let Some(path) = &args.html {
        let html = crate::report::html(
            &[(args.label.clone(), Run::Fanout(Box::new(summary)))],
            None,
        );
        std::fs::write(path, html).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("herald-bench: report written to {}", path.display());
    }
    Ok(u8::from(!ok))
}

/// The `project` a target URL's query names, if any.
fn url_project(url: &str) -> Option<&str> {
    let query = url.split_once('?')?.1;
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("project="))
        .filter(|p| !p.is_empty())
}

fn validate(args: &FanoutArgs) -> anyhow::Result<()> {
    ensure!(args.connections > 0, "--connections must be at least 1");
    for url in &args.target {
        match url_project(url) {
            Some(p) => ensure!(
                p == args.project,
                "--project is {:?} but the target {url} connects to project {p:?}: every event \
                 would go to another project and reach nobody; pass --project {p}",
                args.project
            ),
            None => anyhow::bail!(
                "the target {url} names no project, so the server puts its connections in its \
                 default one (herald's is \"console\") while events go to --project {:?} and \
                 would reach nobody; add project={} to the URL",
                args.project,
                args.project
            ),
        }
    }
    ensure!(args.connect_rate > 0.0, "--connect-rate must be positive");
    ensure!(args.channels >= 1, "--channels must be at least 1");
    ensure!(
        (0.0..=1.0).contains(&args.query_fraction),
        "--query-fraction is a fraction from 0 to 1"
    );
    ensure!(
        args.query_fraction == 0.0 || args.subscribe_message,
        "--query-fraction needs --subscribe-message (queries ride on Gen C subscribe rows)"
    );
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
    Ok(())
}

/// Fails early and plainly: bad targets, bad sources, unreachable or refusing servers.
fn preflight(args: &FanoutArgs, channel_names: &[String]) -> anyhow::Result<Vec<Ipv4Addr>> {
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
    Ok(sources)
}

/// How a phase began: what it is compared with at its end.
struct PhaseStart {
    open: u64,
    closed_by_us: u64,
    server: Option<ServerSample>,
}

/// How a phase publishes: pace, description, and when to give up.
struct PhasePlan {
    /// Events per second offered (infinite: paced by deliveries or back to back).
    rate: f64,
    gap: Duration,
    label: String,
    /// Deliveries the subscribers may fall behind the schedule before the phase is abandoned.
    max_lag: Option<u64>,
    /// How long one event may take to publish: a busy server answers slowly.
    per_event: Duration,
}

/// The publishing part of a phase, as it went.
struct Publishing {
    book: Published,
    /// The channel of every event, in publish order.
    channel_of: Vec<u16>,
    start: Instant,
    first_sent: u64,
    deadline: Instant,
    submitted: u64,
    abandoned: Option<String>,
}

/// The workers' verdicts on a phase, added up.
#[derive(Default)]
struct Merged {
    expected: u64,
    unique: u64,
    missing: u64,
    duplicates: u64,
    misrouted: u64,
    lost: u64,
    with_loss: u64,
    judged: u64,
    stray: u64,
    last_recv: u64,
    latency: Option<Histogram<u64>>,
    examples: Vec<String>,
    /// Per event: subscribers that got it, the first and the last latency.
    per_event: Vec<(u64, u64, u64)>,
}

impl Merged {
    fn of(results: &[PhaseReport]) -> Self {
        let mut m = Merged::default();
        let mut latency = new_hist();
        for r in results {
            m.expected += r.expected;
            m.unique += r.unique;
            m.missing += r.missing;
            m.duplicates += r.duplicates;
            m.misrouted += r.misrouted;
            m.lost += r.lost_connections;
            m.with_loss += r.connections_with_loss;
            m.judged += r.connections_judged;
            m.stray += r.stray;
            m.last_recv = m.last_recv.max(r.last_recv_unix);
            hist_merge(&mut latency, &r.latency_hist);
            m.examples.extend(r.loss_examples.iter().take(3).cloned());
            for (g, &(count, lo, hi)) in r.events.iter().enumerate() {
                if m.per_event.len() <= g {
                    m.per_event.resize(g + 1, (0, u64::MAX, 0));
                }
                if count > 0 {
                    let p = &mut m.per_event[g];
                    p.0 += u64::from(count);
                    p.1 = p.1.min(u64::from(lo));
                    p.2 = p.2.max(u64::from(hi));
                }
            }
        }
        m.latency = Some(latency);
        m
    }
}

/// Time to the first and the last subscriber, over events every subscriber got.
struct Spread {
    ttl: Histogram<u64>,
    ttf: Histogram<u64>,
    incomplete: u64,
    /// Medians of the time to the last subscriber in the second and the last quarter.
    ttl_q2: Option<u64>,
    ttl_q4: Option<u64>,
}

impl Coordinator<'_> {
    fn run_all(&mut self, workers: usize, sources: &[Ipv4Addr]) -> anyhow::Result<FanoutSummary> {
        let args = self.args;
        let server_start = self.server_sample();
        self.spawn(workers, sources)?;
        self.status = "connecting".into();
        let ready = self.wait_all("ready", self.connect_timeout(), |r| match r {
            WorkerReport::Ready(r) => Some(r),
            _ => None,
        })?;
        let connect = self.merge_connect(&ready);
        let after_connect = self.settled_server_sample();

        let mut checks_failed: Vec<String> = Vec::new();
        if connect.connected < args.connections as u64 {
            checks_failed.push(format!(
                "connect: {} of {} connections opened",
                connect.connected, args.connections
            ));
        }
        let connected = connect.connected > 0;
        let search = if connected { self.run_phases()? } else { None };
        let mut memory = BTreeMap::from([
            ("server_at_start".to_owned(), server_start),
            ("server_connected".to_owned(), after_connect),
        ]);
        self.churn_settle_close(connected, &mut memory)?;
        checks_failed.extend(self.failed_checks());
        self.status = "finishing".into();
        self.send_all(&WorkerCommand::Quit)?;
        let finals = self.wait_all("final", Duration::from_secs(30), |r| match r {
            WorkerReport::Final(f) => Some(f),
            _ => None,
        })?;
        // No search: the best fixed rate every subscriber kept up with.
        let max_sustained = search.or_else(|| {
            self.phases
                .iter()
                .filter(|p| p.kind == "rate" && p.sustained)
                .max_by(|a, b| a.rate.unwrap_or(0.0).total_cmp(&b.rate.unwrap_or(0.0)))
                .map(sustained)
        });
        Ok(FanoutSummary {
            label: args.label.clone(),
            date_unix: unix_us() / 1_000_000,
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine: machine(),
            targets: args.target.clone(),
            publisher: self.sink.describe(),
            connections: args.connections,
            channels: args.channels,
            zipf: args.zipf,
            subscribe_message: args.subscribe_message,
            pad: args.pad.clone(),
            workers,
            subscribers_per_channel_top: self.subscribers.iter().take(10).copied().collect(),
            connect,
            max_sustained,
            single: self.single_summary(),
            burst: self.burst_summary(),
            phases: self.phases.clone(),
            memory,
            bench: bench_figures(&finals, args.connections),
            timeline: std::mem::take(&mut self.timeline),
            duration_s: self.start.elapsed().as_secs_f64(),
            checks_failed,
        })
    }

    /// The event phases, lightest first: the search ends above what the server keeps up with.
    fn run_phases(&mut self) -> anyhow::Result<Option<MaxSustained>> {
        let args = self.args;
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
            return Ok(Some(self.find_max()?));
        }
        Ok(None)
    }

    /// Churn (then settle), or just settle, then close everything: server figures after each.
    fn churn_settle_close(
        &mut self,
        connected: bool,
        memory: &mut BTreeMap<String, Option<ServerSample>>,
    ) -> anyhow::Result<()> {
        let args = self.args;
        if connected && args.churn > 0.0 {
            memory.insert("server_before_churn".into(), self.settled_server_sample());
            let events = (args.churn_rate * args.churn_time.as_secs_f64()).ceil() as u64;
            self.phase(Kind::Churn, events)?;
            self.refill()?;
            self.hold(args.settle)?;
            memory.insert("server_after_churn".into(), self.settled_server_sample());
        } else if !args.settle.is_zero() {
            self.hold(args.settle)?;
            memory.insert("server_settled".into(), self.settled_server_sample());
        }
        if args.close_at_end {
            self.status = "closing".into();
            self.send_all(&WorkerCommand::Close)?;
            self.wait_all("closed", Duration::from_secs(30), |r| match r {
                WorkerReport::Closed => Some(()),
                _ => None,
            })?;
            self.hold(args.settle.max(Duration::from_millis(500)))?;
            memory.insert("server_after_close".into(), self.settled_server_sample());
        }
        Ok(())
    }

    /// Checked phases that lost, duplicated or misrouted anything.
    fn failed_checks(&self) -> Vec<String> {
        self.phases
            .iter()
            .filter(|p| p.checked && !p.clean)
            .map(|p| {
                format!(
                    "{} phase {}: {} missing, {} duplicates, {} misrouted, {} connections lost{}",
                    p.kind,
                    p.id,
                    p.missing,
                    p.duplicates,
                    p.misrouted,
                    p.lost_connections,
                    p.error
                        .as_deref()
                        .map_or(String::new(), |e| format!(", {e}"))
                )
            })
            .collect()
    }

    fn single_summary(&self) -> Option<SingleSummary> {
        let p = self.phases.iter().rev().find(|p| p.kind == "single")?;
        Some(SingleSummary {
            time_to_last_subscriber_ms: p.time_to_last_subscriber_ms.clone(),
            time_to_first_subscriber_ms: p.time_to_first_subscriber_ms.clone(),
            events: p.published,
            incomplete_events: p.incomplete_events,
        })
    }

    fn burst_summary(&self) -> Option<BurstSummary> {
        let p = self.phases.iter().rev().find(|p| p.kind == "burst")?;
        Some(BurstSummary {
            events: p.published,
            delivered_per_s: p.delivered_per_s,
            latency_ms: p.latency_ms.clone(),
            clean: p.clean,
        })
    }

    /// How long the connect phase may take before anything is heard of it: the time the
    /// requested rate needs, plus slack. While connections keep opening, [`Self::wait_all`]
    /// waits longer (the measured rate may be below the requested one).
    fn connect_timeout(&self) -> Duration {
        let args = self.args;
        Duration::from_secs_f64(args.connections as f64 / args.connect_rate)
            + args.handshake_timeout
            + Duration::from_secs(30)
    }

    fn spawn(&mut self, workers: usize, sources: &[Ipv4Addr]) -> anyhow::Result<()> {
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
                query_fraction: args.query_fraction,
                query: args.query.clone(),
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
                    let msg =
                        serde_json::from_str(&line).map_or(FromWorker::Garbage, FromWorker::Report);
                    if tx.send((index, msg)).is_err() {
                        return;
                    }
                }
                let _ = tx.send((index, FromWorker::Eof));
            });
            self.workers.push(Worker { child, stdin });
        }
        Ok(())
    }

    /// Stops every worker: they exit on `quit` or when their stdin closes; killed after 5 s.
    fn shutdown(&mut self) {
        let quit = serde_json::to_string(&WorkerCommand::Quit).unwrap_or_default();
        for w in &mut self.workers {
            let _ = writeln!(w.stdin, "{quit}");
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

    fn send_all(&mut self, cmd: &WorkerCommand) -> anyhow::Result<()> {
        let line = serde_json::to_string(cmd)?;
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
            while let Ok((i, msg)) = self.rx.try_recv() {
                self.handle(i, msg);
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
                Ok((i, msg)) => self.handle(i, msg),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // Every worker is gone; their last words are in the inbox.
                Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
            }
        }
    }

    /// Books one worker message: progress is kept, everything else waits in the inbox.
    fn handle(&mut self, i: usize, msg: FromWorker) {
        if let FromWorker::Report(WorkerReport::Progress(p)) = msg {
            self.progress[i] = p;
        } else {
            self.inbox.push_back((i, msg));
        }
    }

    /// Waits for a report of kind `kind` from every worker; `pick` takes the contents out of a
    /// report of that kind.
    fn wait_all<T>(
        &mut self,
        kind: &str,
        timeout: Duration,
        pick: impl Fn(WorkerReport) -> Option<T>,
    ) -> anyhow::Result<Vec<T>> {
        let started = Instant::now();
        let mut deadline = started + timeout;
        let mut got: Vec<Option<T>> = (0..self.workers.len()).map(|_| None).collect();
        // While connecting, connections still opening or failing are progress: the wait goes
        // on while their count grows (the measured rate may be below the requested one), up
        // to three times the planned wait.
        let connecting = matches!(kind, "ready" | "refilled");
        let settled = |p: Progress| p.open + p.failed;
        let mut seen = settled(self.totals());
        let grace = self.args.handshake_timeout + Duration::from_secs(30);
        let cap = started + timeout * 3;
        loop {
            let now_settled = settled(self.totals());
            if connecting && now_settled > seen {
                seen = now_settled;
                deadline = deadline.max((Instant::now() + grace).min(cap));
            }
            let mut kept = VecDeque::with_capacity(self.inbox.len());
            for (i, msg) in std::mem::take(&mut self.inbox) {
                match msg {
                    FromWorker::Report(r) if r.kind() == kind => got[i] = pick(r),
                    other => kept.push_back((i, other)),
                }
            }
            self.inbox = kept;
            if got.iter().all(Option::is_some) {
                return Ok(got.into_iter().flatten().collect());
            }
            if let Some(&(i, _)) = self
                .inbox
                .iter()
                .find(|(i, msg)| matches!(msg, FromWorker::Eof) && got[*i].is_none())
            {
                let status = self.workers[i].child.try_wait().ok().flatten();
                bail!(
                    "worker {i} stopped unexpectedly ({status:?}) while {kind:?} was awaited; see its error above"
                );
            }
            if Instant::now() >= deadline {
                let missing: Vec<usize> = (0..got.len()).filter(|&i| got[i].is_none()).collect();
                let waited = started.elapsed();
                bail!("workers {missing:?} did not report {kind:?} within {waited:.0?}");
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

    /// The server's figures once its RSS is stable (two samples 1.5 s apart within 64 KiB,
    /// at most 15 s). Longer apart than herald's one quiet second after which a shard gives
    /// memory back: two closer samples can both fall inside it and catch a burst's memory.
    fn settled_server_sample(&mut self) -> Option<ServerSample> {
        let mut prev = self.server_sample()?;
        for _ in 0..10 {
            if self
                .pump(Instant::now() + Duration::from_millis(1500))
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
            .fold(Progress::default(), |a, &p| a.plus(p))
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

    fn merge_connect(&mut self, ready: &[Ready]) -> ConnectMerged {
        let mut hist = new_hist();
        let mut failures = BTreeMap::new();
        let (mut connected, mut failed) = (0u64, 0u64);
        let (mut first, mut last) = (u64::MAX, 0u64);
        let mut bench_rss = 0;
        self.subscribers = vec![0; self.args.channels];
        for r in ready {
            connected += r.connected;
            failed += r.failed;
            hist_merge(&mut hist, &r.handshake_hist);
            for (k, &v) in &r.failures {
                bump_n(&mut failures, k.clone(), v);
            }
            if r.first_open_unix > 0 {
                first = first.min(r.first_open_unix);
            }
            last = last.max(r.last_connected_unix);
            bench_rss += r.rss;
            for (s, n) in self.subscribers.iter_mut().zip(&r.subscribers) {
                *s += n;
            }
        }
        let secs = (last.saturating_sub(first)) as f64 / 1e6;
        if !failures.is_empty() {
            eprintln!("herald-bench: connection failures: {failures:?}");
            let timeouts: u64 = failures
                .iter()
                .filter(|(k, _)| k.starts_with("timeout"))
                .map(|(_, v)| v)
                .sum();
            if timeouts > 0 {
                eprintln!(
                    "herald-bench: {timeouts} connections got no answer in time. A server that is \
                     full (herald: its connection capacity or open-file limit, see \
                     herald_accept_errors_total) leaves new connections waiting in its backlog \
                     until they time out: spread the load over more server processes, or raise \
                     the limits"
                );
            }
        }
        ConnectMerged {
            requested: self.args.connections,
            connected,
            failed,
            failures,
            duration_s: secs,
            rate_per_s: if secs > 0.0 {
                connected as f64 / secs
            } else {
                0.0
            },
            handshake_ms: percentiles_ms(&hist),
            bench_rss,
        }
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
        self.send_all(&WorkerCommand::Refill)?;
        self.wait_all("refilled", self.connect_timeout(), |r| match r {
            r @ WorkerReport::Refilled { .. } => Some(r),
            _ => None,
        })?;
        Ok(())
    }

    /// Runs one phase of `events` events and records its merged result.
    fn phase(&mut self, kind: Kind, events: u64) -> anyhow::Result<PhaseResult> {
        let id = self.next_phase;
        self.next_phase += 1;
        let start = self.start_phase(id, kind)?;
        let plan = self.plan(kind);
        let mut run = self.publish_all(id, kind, events, &plan)?;
        self.await_publisher(&mut run)?;
        if kind == Kind::Churn {
            self.send_all(&WorkerCommand::Churn)?;
        }
        self.drain(id, kind, &plan.label, &run.book)?;
        let after = self.server_sample();
        let closed_by_us = self.totals().closed_by_us - start.closed_by_us;
        self.status = format!("phase {id} ({}): judging", plan.label);
        self.send_all(&WorkerCommand::End {
            id,
            times: run.book.times.clone(),
            grace_us: 2_000_000,
            max_events: MAX_EVENTS_REPORTED,
        })?;
        let results = self.wait_all("result", Duration::from_secs(60), |r| match r {
            WorkerReport::Result(r) => Some(r),
            _ => None,
        })?;
        let merged = Merged::of(&results);
        let spread = self.spread(kind, &run.channel_of, &merged.per_event);
        let result = self.verdict(
            id,
            kind,
            events,
            &plan,
            &run,
            &start,
            after,
            closed_by_us,
            merged,
            spread,
        );
        print_phase_line(&self.args.label, kind, &result);
        self.phases.push(result.clone());
        Ok(result)
    }

    /// Settles, restores lost connections and tells the workers a phase begins.
    fn start_phase(&mut self, id: u32, kind: Kind) -> anyhow::Result<PhaseStart> {
        self.status = format!("phase {id} ({}): settling", kind.name());
        self.quiesce()?;
        self.refill()?;
        let start = PhaseStart {
            open: self.totals().open,
            closed_by_us: self.totals().closed_by_us,
            server: self.server_sample(),
        };
        let churn = if kind == Kind::Churn {
            self.args.churn
        } else {
            0.0
        };
        self.send_all(&WorkerCommand::Begin { id, churn })?;
        // Let every worker start the phase before its first event can arrive.
        self.pump(Instant::now() + Duration::from_millis(100))?;
        Ok(start)
    }

    fn plan(&self, kind: Kind) -> PhasePlan {
        let args = self.args;
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
        let per_event = match kind {
            Kind::Single => args.single_gap + Duration::from_secs(10),
            Kind::Burst => Duration::from_millis(500),
            _ => gap,
        };
        PhasePlan {
            rate,
            gap,
            label,
            max_lag,
            per_event,
        }
    }

    /// Hands the phase's events to the publisher threads on their schedule (or, for single
    /// events, each once the previous one reached every subscriber).
    fn publish_all(
        &mut self,
        id: u32,
        kind: Kind,
        events: u64,
        plan: &PhasePlan,
    ) -> anyhow::Result<Publishing> {
        let args = self.args;
        let start = Instant::now();
        let first_sent = unix_us();
        let mut run = Publishing {
            book: Published::new(args.channels, first_sent, start),
            channel_of: Vec::with_capacity(events as usize),
            start,
            first_sent,
            deadline: start + plan.per_event.mul_f64(events as f64) + Duration::from_secs(30),
            submitted: 0,
            abandoned: None,
        };
        self.pool.set_phase(id);
        for k in 0..events {
            self.wait_turn(kind, k, plan, &mut run)?;
            self.collect_published(&mut run.book);
            if run.book.error.is_some() {
                break;
            }
            if k.is_multiple_of(16) {
                self.status = format!(
                    "phase {id} ({}): published {}/{events}",
                    plan.label, run.book.completed
                );
            }
            if let Some(limit) = plan.max_lag {
                let behind = run.book.owed.saturating_sub(self.totals().phase_delivered);
                if behind > limit {
                    let msg = format!(
                        "abandoned after {k} events: {behind} deliveries behind (more than {:?} of the offered load)",
                        args.max_lag
                    );
                    eprintln!("herald-bench [{}] phase {id}: {msg}", args.label);
                    run.abandoned = Some(msg);
                    break;
                }
            }
            self.submit(id, k, &mut run)?;
        }
        Ok(run)
    }

    /// Waits until event `k` is due.
    fn wait_turn(
        &mut self,
        kind: Kind,
        k: u64,
        plan: &PhasePlan,
        run: &mut Publishing,
    ) -> anyhow::Result<()> {
        if kind == Kind::Single {
            // One event at a time: the next once every subscriber has the previous one
            // (at most 10 s), after a pause in which the server has nothing to do.
            let wait_until = Instant::now() + Duration::from_secs(10);
            while k > 0
                && (run.book.completed < run.submitted
                    || self.totals().phase_delivered < run.book.owed)
                && Instant::now() < wait_until
                && run.book.error.is_none()
            {
                self.pump(Instant::now() + Duration::from_millis(2))?;
                self.collect_published(&mut run.book);
            }
            self.pump(Instant::now() + self.args.single_gap)?;
        } else {
            let due = run.start + plan.gap.mul_f64(k as f64);
            if due > Instant::now() {
                self.pump(due)?;
            } else if k.is_multiple_of(64) {
                self.pump(Instant::now())?;
            }
        }
        Ok(())
    }

    /// Picks event `k`'s channel and padding and hands it to the publisher threads.
    fn submit(&mut self, id: u32, k: u64, run: &mut Publishing) -> anyhow::Result<()> {
        let args = self.args;
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
        let seq = run.book.times[chan].len() as u64;
        // Filled in with the send time when the publisher thread is done with it.
        run.book.times[chan].push(u64::MAX);
        run.channel_of.push(chan as u16);
        self.pool.submit(Job {
            phase: id,
            index: k,
            chan,
            seq,
            pad,
            deadline: run.deadline,
        })?;
        run.submitted += 1;
        Ok(())
    }

    /// Every submitted event is published (or failed) before the phase goes on; whatever is
    /// still queued after the deadline is dropped unpublished.
    fn await_publisher(&mut self, run: &mut Publishing) -> anyhow::Result<()> {
        while run.book.completed < run.submitted
            && Instant::now() < run.deadline + Duration::from_secs(10)
        {
            self.pump(Instant::now() + Duration::from_millis(5))?;
            self.collect_published(&mut run.book);
        }
        self.pool.set_phase(0);
        if run.book.completed < run.submitted {
            let never = run.submitted - run.book.completed;
            run.book.error.get_or_insert_with(|| {
                format!("{never} events were never confirmed by the publisher")
            });
        }
        Ok(())
    }

    /// Deliveries: until all expected arrived, none for a while, or the drain timeout.
    fn drain(&mut self, id: u32, kind: Kind, label: &str, book: &Published) -> anyhow::Result<()> {
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
        let drain_deadline = Instant::now() + self.args.drain_timeout;
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
                return Ok(());
            }
            if now != last_count {
                last_count = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= quiet {
                return Ok(());
            }
            self.pump(Instant::now() + Duration::from_millis(50))?;
        }
    }

    /// Time to the first and the last subscriber of each event (in publish order).
    fn spread(&self, kind: Kind, channel_of: &[u16], per_event: &[(u64, u64, u64)]) -> Spread {
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
        Spread {
            ttl,
            ttf,
            incomplete,
            ttl_q2,
            ttl_q4,
        }
    }

    /// The phase's merged result and whether it kept up.
    #[allow(clippy::too_many_arguments)]
    fn verdict(
        &self,
        id: u32,
        kind: Kind,
        events: u64,
        plan: &PhasePlan,
        run: &Publishing,
        start: &PhaseStart,
        after: Option<ServerSample>,
        closed_by_us: u64,
        merged: Merged,
        spread: Spread,
    ) -> PhaseResult {
        let book = &run.book;
        let published = book.completed;
        let publish_secs = book.last_done.duration_since(run.start).as_secs_f64();
        let backlog_grew = match (spread.ttl_q2, spread.ttl_q4) {
            (Some(q2), Some(q4)) => q4 as f64 > 1.25 * q2 as f64 + 50_000.0,
            _ => false,
        };
        let deliver_secs = (merged.last_recv.saturating_sub(run.first_sent)) as f64 / 1e6;
        let drain_s = if merged.last_recv > 0 {
            (merged.last_recv as f64 - book.last_sent as f64) / 1e6
        } else {
            0.0
        };
        let achieved = if publish_secs > 0.0 {
            published as f64 / publish_secs
        } else {
            0.0
        };
        let clean = merged.missing == 0
            && merged.duplicates == 0
            && merged.misrouted == 0
            && merged.lost == 0
            && book.error.is_none();
        let kept_schedule = match kind {
            Kind::Rate { rate, .. } => published == events && achieved >= 0.95 * rate,
            _ => published == events,
        } && run.abandoned.is_none();
        let sustained =
            clean && kept_schedule && !backlog_grew && drain_s <= self.args.max_drain.as_secs_f64();
        let cpu = match (start.server, after) {
            (Some(b), Some(a)) => Some(a.cpu - b.cpu),
            _ => None,
        };
        let unique = merged.unique;
        let delivered_per_s = if deliver_secs > 0.0 {
            unique as f64 / deliver_secs
        } else {
            0.0
        };
        let latency = merged.latency.unwrap_or_else(new_hist);
        let ms = |us: Option<u64>| us.map(|v| v as f64 / 1000.0);
        PhaseResult {
            id,
            kind: kind.name().into(),
            label: plan.label.clone(),
            checked: !matches!(kind, Kind::Rate { search: true, .. }),
            rate: plan.rate.is_finite().then_some(plan.rate),
            requested_events: events,
            published,
            publish_secs,
            achieved_rate: achieved,
            busy_retries: book.retries,
            publish_latency_ms: percentiles_ms(&book.hist),
            error: book.error.clone(),
            abandoned: run.abandoned.clone(),
            connections_at_start: start.open,
            closed_by_us,
            connections_judged: merged.judged,
            expected: merged.expected,
            delivered: unique,
            missing: merged.missing,
            duplicates: merged.duplicates,
            misrouted: merged.misrouted,
            lost_connections: merged.lost,
            connections_with_loss: merged.with_loss,
            loss_examples: merged.examples,
            delivered_per_s,
            drain_s,
            latency_ms: percentiles_ms(&latency),
            latency_curve: curve(&latency),
            time_to_last_subscriber_ms: percentiles_ms(&spread.ttl),
            time_to_first_subscriber_ms: percentiles_ms(&spread.ttf),
            incomplete_events: spread.incomplete,
            ttl_median_ms_q2_q4: (ms(spread.ttl_q2), ms(spread.ttl_q4)),
            backlog_grew,
            stray: merged.stray,
            clean,
            sustained,
            start_s: run.start.duration_since(self.start).as_secs_f64(),
            server: PhaseServer {
                rss_start: start.server.map(|s| s.rss),
                rss_end: after.map(|s| s.rss),
                cpu_s: cpu,
                cpu_s_per_million_delivered: cpu
                    .filter(|_| unique > 0)
                    .map(|c| c * 1e6 / unique as f64),
            },
        }
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
    fn find_max(&mut self) -> anyhow::Result<MaxSustained> {
        let args = self.args;
        let mut rate = args.ramp_start;
        let mut best: Option<PhaseResult> = None;
        let mut best_rate = 0.0;
        let mut fail_rate: Option<f64> = None;
        for _ in 0..args.ramp_max_phases {
            let events = (rate * args.phase_time.as_secs_f64()).ceil().max(1.0) as u64;
            let mut r = self.phase(Kind::Rate { rate, search: true }, events)?;
            for _ in 0..args.ramp_retries {
                if r.sustained {
                    break;
                }
                eprintln!(
                    "   herald-bench [{}] {} events/s failed: trying it again",
                    args.label,
                    fmt_rate(rate)
                );
                r = self.phase(Kind::Rate { rate, search: true }, events)?;
            }
            if r.sustained {
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
            Some(r) => MaxSustained {
                first_failing_rate: fail_rate,
                ..sustained(&r)
            },
            None => MaxSustained {
                first_failing_rate: fail_rate,
                ..MaxSustained::default()
            },
        })
    }
}

/// herald-bench's own memory and what its connections saw besides events, over all workers.
fn bench_figures(finals: &[Final], connections: usize) -> BenchFigures {
    let rss_total: u64 = finals.iter().map(|f| f.rss).sum();
    let mut other_messages = BTreeMap::new();
    let mut lost_connections = BTreeMap::new();
    for f in finals {
        for (k, &v) in &f.other_messages {
            bump_n(&mut other_messages, k.clone(), v);
        }
        for (k, &v) in &f.lost {
            bump_n(&mut lost_connections, k.clone(), v);
        }
    }
    BenchFigures {
        rss_total,
        rss_per_connection: rss_total as f64 / connections as f64,
        other_messages,
        lost_connections,
    }
}

/// The one line per phase on stderr.
fn print_phase_line(run_label: &str, kind: Kind, r: &PhaseResult) {
    let verdict = match kind {
        Kind::Rate { .. } if r.sustained => " -> kept up",
        Kind::Rate { .. } => " -> did not keep up",
        _ => "",
    };
    eprintln!(
        "herald-bench [{run_label}] phase {} {}: published {} ({:.1}/s), delivered {}/{} ({} missing, {} dup, {} conns lost), {:.0} msg/s, drain {:.3}s, latency p50 {} p99 {} ms, last subscriber p50 {} ms (2nd/4th quarter {}/{}){verdict}",
        r.id,
        r.label,
        r.published,
        r.achieved_rate,
        r.delivered,
        r.expected,
        r.missing,
        r.duplicates,
        r.lost_connections,
        r.delivered_per_s,
        r.drain_s,
        fmt_ms(r.latency_ms.p50),
        fmt_ms(r.latency_ms.p99),
        fmt_ms(r.time_to_last_subscriber_ms.p50),
        fmt_ms(r.ttl_median_ms_q2_q4.0),
        fmt_ms(r.ttl_median_ms_q2_q4.1),
    );
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
fn sustained(r: &PhaseResult) -> MaxSustained {
    MaxSustained {
        rate: r.rate,
        first_failing_rate: None,
        phase: Some(r.id),
        delivered_per_s: Some(r.delivered_per_s),
        latency_ms: Some(r.latency_ms.clone()),
        time_to_last_subscriber_ms: Some(r.time_to_last_subscriber_ms.clone()),
        cpu_s_per_million_delivered: r.server.cpu_s_per_million_delivered,
    }
}

fn fmt_rate(r: f64) -> String {
    if r.fract() == 0.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.2}")
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.2}"))
}

/// The latency distribution as `[[percentile, ms], ...]`.
fn curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    CURVE
        .iter()
        .map(|&q| (q * 100.0, h.value_at_quantile(q) as f64 / 1000.0))
        .collect()
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

    #[test]
    fn the_project_of_a_target_url() {
        assert_eq!(
            url_project("ws://h:1/v1/realtime?project=bench"),
            Some("bench")
        );
        assert_eq!(
            url_project("ws://h:1/v1/realtime?a=1&project=p&b=2"),
            Some("p")
        );
        assert_eq!(url_project("ws://h:1/v1/realtime"), None);
        assert_eq!(url_project("ws://h:1/v1/realtime?project="), None);
    }
}
