//! `connect`: the handshake rate ceiling, and `accept-loop`: the plain TCP baseline for it.
//!
//! `connect` keeps `--max-inflight` handshakes under way for `--duration`: connect, upgrade,
//! wait for `connected` (for a `tcp://` target: wait for the first byte), close with a reset
//! (so neither side collects TIME_WAIT sockets), start the next. `accept-loop` accepts, writes
//! one byte and closes, on as many threads as asked: the least a server can do per connection.

use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};

use crate::client::{Engine, EngineOptions, Slot, percentiles_ms};
use crate::messages::{ConnectServer, ConnectSummary, ConnectTimeline};
use crate::system::{fd_capacity, machine, proc_cpu_seconds, stop_flag, unix_us};
use crate::target::{Target, check_source_ips, parse_source_ips, probe};

#[derive(clap::Args)]
pub(crate) struct ConnectArgs {
    /// ws://HOST:PORT/path?query (WebSocket upgrade plus `connected`) or tcp://HOST:PORT (first
    /// byte, e.g. from `herald-bench accept-loop`).
    #[arg(long)]
    target: String,
    /// How long to keep connecting.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Handshakes under way at once.
    #[arg(long, default_value_t = 128)]
    max_inflight: usize,
    /// Stop after this many handshakes even if `--duration` has not passed.
    #[arg(long, default_value_t = 2_000_000)]
    max_connections: usize,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// Local IPv4 addresses to bind, e.g. 127.0.0.2-127.0.0.60.
    #[arg(long)]
    source_ips: Option<String>,
    /// Server process(es) whose CPU time is read from /proc (repeatable).
    #[arg(long)]
    server_pid: Vec<u32>,
    #[arg(long, default_value = "server")]
    label: String,
}

#[derive(clap::Args)]
pub(crate) struct AcceptLoopArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Threads calling accept on the shared listener.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Exit after this long (it is meant to be stopped by its caller much earlier).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    max_time: Duration,
}

fn server_cpu(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| proc_cpu_seconds(&p.to_string())).sum()
}

pub(crate) fn run(args: &ConnectArgs) -> anyhow::Result<u8> {
    ensure!(args.max_inflight > 0, "--max-inflight must be at least 1");
    let target = Target::parse(&args.target)?;
    let sources = match &args.source_ips {
        Some(spec) => parse_source_ips(spec)?,
        None => Vec::new(),
    };
    check_source_ips(&sources)?;
    let capacity = fd_capacity()?;
    ensure!(
        args.max_inflight < capacity,
        "--max-inflight {} exceeds the {capacity} sockets this process may open",
        args.max_inflight
    );
    probe(&target, sources.first().copied())?;
    let stop = stop_flag()?;
    let url = target.url.clone();
    let mut engine = Engine::new(
        vec![target],
        sources,
        vec![Slot::default(); args.max_inflight],
        EngineOptions {
            rate: f64::INFINITY,
            max_inflight: args.max_inflight,
            handshake_timeout: args.handshake_timeout,
            subscribe: None,
            track_events: false,
            close_on_open: true,
        },
    )?;
    // Let the probe's connection go before measuring.
    std::thread::sleep(Duration::from_millis(200));
    let cpu_before = server_cpu(&args.server_pid);
    engine.queue_all();
    let start = Instant::now();
    let end = start + args.duration;
    let mut next_sample = start;
    let mut next_status = start + Duration::from_secs(1);
    let (mut t, mut completed_samples) = (Vec::new(), Vec::<u64>::new());
    while Instant::now() < end
        && engine.stats.connected < args.max_connections
        && !stop.load(Ordering::Relaxed)
    {
        let now = Instant::now();
        // Failed handshakes free their slot for the next attempt.
        engine.refill();
        engine.start_due(now);
        if now >= next_sample {
            next_sample += Duration::from_millis(250);
            t.push(now.duration_since(start).as_secs_f64());
            completed_samples.push(engine.stats.connected as u64);
        }
        if now >= next_status {
            next_status += Duration::from_secs(1);
            engine.expire();
            eprintln!(
                "herald-bench connect [{}] {:.1}s: {} handshakes ({:.0}/s), {} failed",
                args.label,
                now.duration_since(start).as_secs_f64(),
                engine.stats.connected,
                engine.stats.connected as f64 / now.duration_since(start).as_secs_f64(),
                engine.stats.failed
            );
            // Nothing works: stop instead of spinning on the same error.
            if engine.stats.failed > 1000 && engine.stats.failed > 10 * engine.stats.connected {
                break;
            }
        }
        engine.poll(Duration::from_millis(5).min(end.saturating_duration_since(now)))?;
    }
    let secs = start.elapsed().as_secs_f64();
    engine.close_all();
    let cpu = match (cpu_before, server_cpu(&args.server_pid)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let s = &engine.stats;
    let rate = s.connected as f64 / secs;
    eprintln!(
        "herald-bench connect [{}]: {} handshakes in {secs:.1}s = {rate:.0}/s, {} failed",
        args.label, s.connected, s.failed
    );
    let completed = s.connected as u64;
    let summary = ConnectSummary {
        kind: "connect".into(),
        label: args.label.clone(),
        target: url,
        max_inflight: args.max_inflight,
        duration_s: secs,
        completed,
        failed: s.failed as u64,
        failures: s.failures.clone(),
        rate_per_s: rate,
        handshake_ms: percentiles_ms(&s.handshake_us),
        server: ConnectServer {
            cpu_s: cpu,
            cpu_ms_per_1000: cpu
                .filter(|_| completed > 0)
                .map(|c| c * 1e6 / completed as f64),
        },
        timeline: ConnectTimeline {
            t,
            completed: completed_samples,
        },
        machine: machine(),
        date_unix: unix_us() / 1_000_000,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    println!("{}", serde_json::to_string(&summary)?);
    Ok(u8::from(s.connected == 0 || s.failed > s.connected / 100))
}

pub(crate) fn accept_loop(args: &AcceptLoopArgs) -> anyhow::Result<u8> {
    ensure!(args.threads > 0, "--threads must be at least 1");
    let listener = TcpListener::bind(&args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!(
        "accept-loop listening on tcp://{addr} ({} threads)",
        args.threads
    );
    std::io::stdout().flush()?;
    for _ in 0..args.threads {
        let listener = listener.try_clone()?;
        std::thread::spawn(move || {
            loop {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.write_all(b"x");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
    }
    let stop = stop_flag()?;
    let end = Instant::now() + args.max_time;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(0)
}
