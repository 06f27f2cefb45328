//! A subscriber process under a `fanout` coordinator.
//!
//! Owns its share of the connections (every `workers`-th global connection index from
//! `index`) and talks to the coordinator in JSON lines ([`crate::messages`]): commands on stdin
//! ([`WorkerCommand`]: `begin`, `end`, `churn`, `refill`, `rate`, `close`, `quit`), reports on
//! stdout ([`WorkerReport`]: `ready`, `p` progress every 200 ms, `result`, `refilled`,
//! `closed`, `final`). It stops by itself when stdin closes, so a coordinator that dies never
//! leaves workers behind. Must not judge the run: it reports, the coordinator merges.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use crate::client::{self, Engine, EngineOptions, Slot};
use crate::messages::{
    Final, PhaseReport, Progress, Ready, WorkerCommand, WorkerReport, WorkerSpec,
};
use crate::system::{fd_capacity, rss_bytes};
use crate::target::{Target, parse_source_ips};

const PROGRESS_EVERY: Duration = Duration::from_millis(200);
const CHURN_TICK: Duration = Duration::from_millis(100);
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

#[derive(clap::Args)]
pub(crate) struct WorkerArgs {
    /// The worker's share of the run, as JSON (written by the coordinator).
    #[arg(long)]
    spec: String,
}

/// The channel of global connection `i` of `total`: quantiles of a Zipf distribution (exact
/// proportions, the same in every process), connections of one channel spread over workers.
pub(crate) fn slot_of(i: usize, total: usize, targets: usize, cdf: &[f64]) -> Slot {
    let q = (i as f64 + 0.5) / total as f64;
    let chan = cdf.partition_point(|&c| c < q).min(cdf.len() - 1);
    Slot {
        target: (i % targets) as u16,
        chan: chan as u16,
        filtered: false,
    }
}

/// Whether global connection `i` is one of the `fraction` that subscribe with a query: spread
/// evenly over the connections, so over channels and workers too.
pub(crate) fn is_filtered(i: usize, fraction: f64) -> bool {
    fraction > 0.0 && ((i + 1) as f64 * fraction).floor() > (i as f64 * fraction).floor()
}

/// Cumulative Zipf(s) weights over `n` channels (s = 0: uniform).
pub(crate) fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    let mut cdf: Vec<f64> = weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect();
    if let Some(last) = cdf.last_mut() {
        *last = 1.0;
    }
    cdf
}

/// The slots of worker `index`.
pub(crate) fn worker_slots(spec: &WorkerSpec) -> Vec<Slot> {
    let cdf = zipf_cdf(spec.channels.len().max(1), spec.zipf);
    (spec.index..spec.total)
        .step_by(spec.workers)
        .map(|i| Slot {
            filtered: is_filtered(i, spec.query_fraction),
            ..slot_of(i, spec.total, spec.targets.len(), &cdf)
        })
        .collect()
}

/// The `subscribe` message for each channel (Gen C), then, with a `query`, the same with it.
pub(crate) fn subscribe_messages(channels: &[String], query: Option<&str>) -> Vec<String> {
    let plain = channels.iter().map(|c| {
        json!({"type": "subscribe", "data": [{"subscriptionId": "hb", "channels": [c]}]})
            .to_string()
    });
    let filtered = query.into_iter().flat_map(|q| {
        channels.iter().map(move |c| {
            json!({"type": "subscribe", "data": [
                {"subscriptionId": "hb", "channels": [c], "queries": [q]}
            ]})
            .to_string()
        })
    });
    plain.chain(filtered).collect()
}

fn emit(report: &WorkerReport) {
    let mut out = std::io::stdout().lock();
    let written = serde_json::to_writer(&mut out, report)
        .map_err(std::io::Error::from)
        .and_then(|()| writeln!(out))
        .and_then(|()| out.flush());
    if written.is_err() {
        // The coordinator is gone.
        std::process::exit(3);
    }
}

pub(crate) fn run(args: &WorkerArgs) -> anyhow::Result<u8> {
    let spec: WorkerSpec = serde_json::from_str(&args.spec).context("invalid --spec")?;
    let mut worker = Worker::new(&spec)?;
    let commands = worker.read_commands()?;
    worker.engine.queue_all();
    loop {
        worker.step()?;
        while let Ok(line) = commands.try_recv() {
            let cmd: WorkerCommand = serde_json::from_str(&line)
                .with_context(|| format!("invalid command from the coordinator: {line}"))?;
            if worker.handle(cmd).is_break() {
                return Ok(0);
            }
        }
        worker.on_timers();
    }
}

/// The engine and what the command loop keeps between turns.
struct Worker {
    engine: Engine,
    requested: usize,
    channels: usize,
    rss_before: u64,
    ready_sent: bool,
    refilling: bool,
    churn_per_tick: f64,
    churn_carry: f64,
    next_progress: Instant,
    next_churn: Instant,
    next_expire: Instant,
}

impl Worker {
    fn new(spec: &WorkerSpec) -> anyhow::Result<Self> {
        let slots = worker_slots(spec);
        let capacity = fd_capacity()?;
        if slots.len() > capacity {
            bail!(
                "worker {} must hold {} connections but may open only {capacity} sockets",
                spec.index,
                slots.len()
            );
        }
        let targets = spec
            .targets
            .iter()
            .map(|url| {
                if spec.subscribe_message {
                    Target::parse(url)
                } else {
                    Target::with_channels(url, &spec.channels)
                }
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let sources = if spec.sources.is_empty() {
            Vec::new()
        } else {
            parse_source_ips(&spec.sources.join(","))?
        };
        let engine = Engine::new(
            targets,
            sources,
            slots,
            EngineOptions {
                rate: spec.rate,
                max_inflight: spec.max_inflight,
                handshake_timeout: Duration::from_millis(spec.handshake_timeout_ms),
                subscribe: spec.subscribe_message.then(|| {
                    let query = (spec.query_fraction > 0.0).then_some(spec.query.as_str());
                    subscribe_messages(&spec.channels, query)
                }),
                track_events: true,
                close_on_open: false,
            },
        )?;
        let now = Instant::now();
        Ok(Self {
            requested: engine.slots().len(),
            engine,
            channels: spec.channels.len().max(1),
            rss_before: rss_bytes(),
            ready_sent: false,
            refilling: false,
            churn_per_tick: 0.0,
            churn_carry: 0.0,
            next_progress: now + PROGRESS_EVERY,
            next_churn: now + CHURN_TICK,
            next_expire: now + EXPIRE_EVERY,
        })
    }

    /// Command lines from stdin, read on a thread that wakes the engine's poll; a `quit` follows
    /// the last line, so a coordinator that dies stops this process too.
    fn read_commands(&self) -> anyhow::Result<mpsc::Receiver<String>> {
        let waker = self.engine.waker()?;
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    return;
                }
                let _ = waker.wake();
            }
            if let Ok(quit) = serde_json::to_string(&WorkerCommand::Quit) {
                let _ = tx.send(quit);
            }
            let _ = waker.wake();
        });
        Ok(rx)
    }

    /// Starts due connections, reports `ready` and `refilled` once they apply, and waits for
    /// sockets until the next timer (or a command).
    fn step(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        self.engine.start_due(now);
        if self.engine.settled() && !self.ready_sent {
            self.ready_sent = true;
            emit(&WorkerReport::Ready(self.ready()));
        }
        if self.refilling && self.engine.settled() {
            self.refilling = false;
            let s = &self.engine.stats;
            emit(&WorkerReport::Refilled {
                open: s.open as u64,
                failed: s.failed as u64,
                failures: s.failures.clone(),
            });
        }
        let mut wake_at = self.next_progress.min(self.next_expire);
        if self.churn_per_tick > 0.0 {
            wake_at = wake_at.min(self.next_churn);
        }
        if self.engine.has_pending() {
            wake_at = wake_at.min(now + Duration::from_millis(2));
        }
        self.engine.poll(wake_at.saturating_duration_since(now))
    }

    fn ready(&self) -> Ready {
        let s = &self.engine.stats;
        Ready {
            requested: self.requested as u64,
            connected: s.connected as u64,
            failed: s.failed as u64,
            failures: s.failures.clone(),
            handshake_hist: client::hist_counts(&s.handshake_us),
            first_open_unix: s.first_open_unix,
            last_connected_unix: s.last_connected_unix,
            subscribers: client::subscribers_per_channel(&self.engine, self.channels),
            rss_before: self.rss_before,
            rss: rss_bytes(),
        }
    }

    /// Carries out one command; `Break` after `quit`.
    fn handle(&mut self, cmd: WorkerCommand) -> ControlFlow<()> {
        match cmd {
            WorkerCommand::Begin { id, churn } => {
                self.engine.begin_phase(id);
                self.churn_per_tick = churn * self.requested as f64 * CHURN_TICK.as_secs_f64();
                self.churn_carry = 0.0;
                self.next_churn = Instant::now() + CHURN_TICK;
            }
            WorkerCommand::Churn => self.churn_per_tick = 0.0,
            WorkerCommand::End {
                times,
                grace_us,
                max_events,
                ..
            } => {
                self.churn_per_tick = 0.0;
                let result = self
                    .engine
                    .end_phase(&times, grace_us, max_events)
                    .unwrap_or_else(|| PhaseReport {
                        error: Some("no phase is running".into()),
                        ..PhaseReport::default()
                    });
                emit(&WorkerReport::Result(result));
            }
            WorkerCommand::Refill => {
                self.engine.refill();
                self.refilling = true;
            }
            WorkerCommand::Rate { rate } => self.engine.set_rate(rate),
            WorkerCommand::Close => {
                self.engine.close_all();
                emit(&WorkerReport::Closed);
            }
            WorkerCommand::Quit => {
                emit(&WorkerReport::Final(self.final_figures()));
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    fn final_figures(&self) -> Final {
        let s = &self.engine.stats;
        Final {
            rss: rss_bytes(),
            rss_before: self.rss_before,
            pings_answered: s.pings_answered,
            messages: s.messages,
            other_messages: s.other_messages.clone(),
            lost: s.lost.clone(),
            failures: s.failures.clone(),
            closed_by_us: s.closed_by_us,
            stray: s.stray,
        }
    }

    /// Churn, handshake expiry and progress reports, each when its time has come.
    fn on_timers(&mut self) {
        let now = Instant::now();
        if self.churn_per_tick > 0.0 && now >= self.next_churn {
            self.next_churn += CHURN_TICK;
            self.churn_carry += self.churn_per_tick;
            let n = self.churn_carry.floor();
            self.churn_carry -= n;
            self.engine.churn(n as usize);
        }
        if now >= self.next_expire {
            self.next_expire = now + EXPIRE_EVERY;
            self.engine.expire();
        }
        if now >= self.next_progress {
            self.next_progress = now + PROGRESS_EVERY;
            emit(&WorkerReport::Progress(self.progress()));
        }
    }

    fn progress(&self) -> Progress {
        let s = &self.engine.stats;
        Progress {
            open: s.open as u64,
            inflight: s.inflight as u64,
            failed: s.failed as u64,
            lost: s.lost.values().sum(),
            phase_delivered: self.engine.acc.as_ref().map_or(0, |a| a.delivered),
            received: s.messages,
            events: s.events,
            closed_by_us: s.closed_by_us,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_assignment_is_exact_and_shared() {
        let cdf = zipf_cdf(1000, 1.0);
        let n = 19_000;
        let mut counts = vec![0usize; 1000];
        for i in 0..n {
            counts[usize::from(slot_of(i, n, 1, &cdf).chan)] += 1;
        }
        // Channel 1 gets 1/H(1000) = 13.4% of the connections, channel 2 half of that.
        assert!((2500..2580).contains(&counts[0]), "{}", counts[0]);
        assert!((counts[1] as f64 / counts[0] as f64 - 0.5).abs() < 0.01);
        assert_eq!(counts.iter().sum::<usize>(), n);
        let uniform = zipf_cdf(4, 0.0);
        let c: Vec<u16> = (0..8).map(|i| slot_of(i, 8, 1, &uniform).chan).collect();
        assert_eq!(c, [0, 0, 1, 1, 2, 2, 3, 3]);
        // Workers split the global indices between them.
        let spec = |index| WorkerSpec {
            index,
            workers: 3,
            total: 10,
            targets: vec!["ws://x".into()],
            channels: vec!["a".into()],
            zipf: 1.0,
            subscribe_message: false,
            query_fraction: 0.0,
            query: String::new(),
            rate: 1.0,
            max_inflight: 1,
            handshake_timeout_ms: 1,
            sources: vec![],
        };
        let sizes: Vec<usize> = (0..3).map(|i| worker_slots(&spec(i)).len()).collect();
        assert_eq!(sizes, [4, 3, 3]);
    }

    #[test]
    fn a_query_fraction_picks_that_share_of_connections_evenly() {
        let picked: Vec<bool> = (0..6).map(|i| is_filtered(i, 0.5)).collect();
        assert_eq!(picked, [false, true, false, true, false, true]);
        assert_eq!((0..1000).filter(|&i| is_filtered(i, 0.25)).count(), 250);
        assert!((0..1000).all(|i| !is_filtered(i, 0.0)));
        assert!((0..1000).all(|i| is_filtered(i, 1.0)));
        let messages = subscribe_messages(&["a".into(), "b".into()], Some("{}"));
        assert_eq!(messages.len(), 4);
        assert!(messages[3].contains(r#""queries":["{}"]"#) && messages[3].contains(r#"["b"]"#));
    }
}
