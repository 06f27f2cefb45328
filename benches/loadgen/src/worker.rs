//! A subscriber process under a `fanout` coordinator.
//!
//! Owns its share of the connections (every `workers`-th global connection index from
//! `index`) and talks to the coordinator in JSON lines: commands on stdin (`begin`, `end`,
//! `churn`, `refill`, `close`, `quit`), reports on stdout (`ready`, `p` progress every 200 ms,
//! `result`, `refilled`, `closed`, `final`). It stops by itself when stdin closes, so a
//! coordinator that dies never leaves workers behind.

use std::io::{BufRead, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::client::{self, Engine, EngineOptions, Slot};
use crate::{Target, fd_capacity, parse_source_ips, rss_bytes};

const PROGRESS_EVERY: Duration = Duration::from_millis(200);
const CHURN_TICK: Duration = Duration::from_millis(100);
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

#[derive(clap::Args)]
pub(crate) struct WorkerArgs {
    /// The worker's share of the run, as JSON (written by the coordinator).
    #[arg(long)]
    spec: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WorkerSpec {
    pub index: usize,
    pub workers: usize,
    pub total: usize,
    pub targets: Vec<String>,
    pub channels: Vec<String>,
    pub zipf: f64,
    /// Gen C: subscribe with a message after `connected` instead of URL channels.
    pub subscribe_message: bool,
    pub rate: f64,
    pub max_inflight: usize,
    pub handshake_timeout_ms: u64,
    pub sources: Vec<String>,
}

/// The channel of global connection `i` of `total`: quantiles of a Zipf distribution (exact
/// proportions, the same in every process), connections of one channel spread over workers.
pub(crate) fn slot_of(i: usize, total: usize, targets: usize, cdf: &[f64]) -> Slot {
    let q = (i as f64 + 0.5) / total as f64;
    let chan = cdf.partition_point(|&c| c < q).min(cdf.len() - 1);
    Slot {
        target: (i % targets) as u16,
        chan: chan as u16,
    }
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
        .map(|i| slot_of(i, spec.total, spec.targets.len(), &cdf))
        .collect()
}

/// The `subscribe` message for each channel (Gen C).
pub(crate) fn subscribe_messages(channels: &[String]) -> Vec<String> {
    channels
        .iter()
        .map(|c| {
            json!({"type": "subscribe", "data": [{"subscriptionId": "hb", "channels": [c]}]})
                .to_string()
        })
        .collect()
}

fn emit(v: &Value) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{v}").and_then(|()| out.flush()).is_err() {
        // The coordinator is gone.
        std::process::exit(3);
    }
}

pub(crate) fn run(args: &WorkerArgs) -> anyhow::Result<u8> {
    let spec: WorkerSpec = serde_json::from_str(&args.spec).context("invalid --spec")?;
    let slots = worker_slots(&spec);
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
    let mut engine = Engine::new(
        targets,
        sources,
        slots,
        EngineOptions {
            rate: spec.rate,
            max_inflight: spec.max_inflight,
            handshake_timeout: Duration::from_millis(spec.handshake_timeout_ms),
            subscribe: spec
                .subscribe_message
                .then(|| subscribe_messages(&spec.channels)),
            track_events: true,
            close_on_open: false,
        },
    )?;
    let waker = engine.waker()?;
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
        let _ = tx.send(r#"{"cmd":"quit"}"#.to_owned());
        let _ = waker.wake();
    });

    engine.queue_all();
    let requested = engine.slots().len();
    let channels = spec.channels.len().max(1);
    let rss_before = rss_bytes();
    let mut ready_sent = false;
    let mut refilling = false;
    let mut churn_per_tick = 0.0f64;
    let mut churn_carry = 0.0f64;
    let mut next_progress = Instant::now() + PROGRESS_EVERY;
    let mut next_churn = Instant::now() + CHURN_TICK;
    let mut next_expire = Instant::now() + EXPIRE_EVERY;
    loop {
        let now = Instant::now();
        engine.start_due(now);
        if engine.settled() && !ready_sent {
            ready_sent = true;
            let s = &engine.stats;
            emit(&json!({
                "k": "ready",
                "requested": requested,
                "connected": s.connected,
                "failed": s.failed,
                "failures": s.failures,
                "handshake_hist": client::hist_to_json(&s.handshake_us),
                "first_open_unix": s.first_open_unix,
                "last_connected_unix": s.last_connected_unix,
                "subscribers": client::subscribers_per_channel(&engine, channels),
                "rss_before": rss_before,
                "rss": rss_bytes(),
            }));
        }
        if refilling && engine.settled() {
            refilling = false;
            emit(
                &json!({"k": "refilled", "open": engine.stats.open, "failed": engine.stats.failed,
                "failures": engine.stats.failures}),
            );
        }
        let mut wake_at = next_progress.min(next_expire);
        if churn_per_tick > 0.0 {
            wake_at = wake_at.min(next_churn);
        }
        if engine.has_pending() {
            wake_at = wake_at.min(now + Duration::from_millis(2));
        }
        engine.poll(wake_at.saturating_duration_since(now))?;
        while let Ok(line) = rx.try_recv() {
            let cmd: Value = serde_json::from_str(&line)
                .with_context(|| format!("invalid command from the coordinator: {line}"))?;
            match cmd["cmd"].as_str().unwrap_or("") {
                "begin" => {
                    engine.begin_phase(cmd["id"].as_u64().unwrap_or(0) as u32);
                    churn_per_tick = cmd["churn"].as_f64().unwrap_or(0.0)
                        * requested as f64
                        * CHURN_TICK.as_secs_f64();
                    churn_carry = 0.0;
                    next_churn = Instant::now() + CHURN_TICK;
                }
                "churn" => churn_per_tick = 0.0,
                "end" => {
                    churn_per_tick = 0.0;
                    let times: Vec<Vec<u64>> =
                        serde_json::from_value(cmd["times"].clone()).unwrap_or_default();
                    let grace = cmd["grace_us"].as_u64().unwrap_or(2_000_000);
                    let max_events = cmd["max_events"].as_u64().unwrap_or(100_000) as usize;
                    let mut result = engine.end_phase(&times, grace, max_events);
                    result["k"] = json!("result");
                    emit(&result);
                }
                "refill" => {
                    engine.refill();
                    refilling = true;
                }
                "rate" => engine.set_rate(cmd["rate"].as_f64().unwrap_or(1000.0)),
                "close" => {
                    engine.close_all();
                    emit(&json!({"k": "closed"}));
                }
                "quit" => {
                    let s = &engine.stats;
                    emit(&json!({
                        "k": "final",
                        "rss": rss_bytes(),
                        "rss_before": rss_before,
                        "pings_answered": s.pings_answered,
                        "messages": s.messages,
                        "other_messages": s.other_messages,
                        "lost": s.lost,
                        "failures": s.failures,
                        "closed_by_us": s.closed_by_us,
                        "stray": s.stray,
                    }));
                    return Ok(0);
                }
                other => bail!("unknown command {other:?} from the coordinator"),
            }
        }
        let now = Instant::now();
        if churn_per_tick > 0.0 && now >= next_churn {
            next_churn += CHURN_TICK;
            churn_carry += churn_per_tick;
            let n = churn_carry.floor();
            churn_carry -= n;
            engine.churn(n as usize);
        }
        if now >= next_expire {
            next_expire = now + EXPIRE_EVERY;
            engine.expire();
        }
        if now >= next_progress {
            next_progress = now + PROGRESS_EVERY;
            let s = &engine.stats;
            emit(&json!({
                "k": "p",
                "open": s.open,
                "inflight": s.inflight,
                "failed": s.failed,
                "lost": s.lost.values().sum::<u64>(),
                "pd": engine.acc.as_ref().map_or(0, |a| a.delivered),
                "rx": s.messages,
                "ev": s.events,
                "closed_by_us": s.closed_by_us,
            }));
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
            rate: 1.0,
            max_inflight: 1,
            handshake_timeout_ms: 1,
            sources: vec![],
        };
        let sizes: Vec<usize> = (0..3).map(|i| worker_slots(&spec(i)).len()).collect();
        assert_eq!(sizes, [4, 3, 3]);
    }
}
