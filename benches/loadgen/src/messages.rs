//! Every JSON shape herald-bench writes or reads, as serde types shared by both ends.
//!
//! Owns the JSON-lines protocol between the `fanout` coordinator and its worker processes
//! ([`WorkerSpec`], [`WorkerCommand`] on the worker's stdin, [`WorkerReport`] on its stdout) and
//! the summaries written to disk ([`IdleSummary`], [`ConnectSummary`], [`FanoutSummary`],
//! [`AttackSummary`] and their parts), which `compare`, the HTML report and the scripts read
//! back. A renamed field is a compile error on both sides, not a silent zero. The field names are the file format: result files of
//! earlier runs must keep parsing, so a name changes only with a `#[serde(rename)]` to the old
//! one. Must not compute anything: these are plain data.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Failure or loss reasons with their counts (see `reasons`).
pub(crate) type Reasons = BTreeMap<String, u64>;

/// A histogram as `[[value_us, count], ...]`, for merging in another process.
pub(crate) type HistCounts = Vec<(u64, u64)>;

// ---------------------------------------------------------------------------------------------
// Coordinator <-> worker

/// A worker's share of the run, passed as `--spec` JSON.
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
    /// The fraction of connections whose subscribe carries `query` (Gen C only).
    #[serde(default)]
    pub query_fraction: f64,
    #[serde(default)]
    pub query: String,
    pub rate: f64,
    pub max_inflight: usize,
    pub handshake_timeout_ms: u64,
    pub sources: Vec<String>,
}

/// A command line on a worker's stdin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub(crate) enum WorkerCommand {
    /// Start phase `id`: every open connection's sequence check starts over; `churn` is the
    /// fraction of connections to close and reopen per second (0: none).
    Begin { id: u32, churn: f64 },
    /// Stop churning (the phase goes on).
    Churn,
    /// End the phase and judge every connection against the send times of every event.
    End {
        id: u32,
        /// Per channel, each event's send time in unix microseconds.
        times: Vec<Vec<u64>>,
        grace_us: u64,
        max_events: usize,
    },
    /// Reopen connections that failed or were lost.
    Refill,
    /// New connections per second from now on.
    Rate { rate: f64 },
    /// Close every connection.
    Close,
    /// Report the final figures and exit.
    Quit,
}

/// A report line on a worker's stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub(crate) enum WorkerReport {
    /// Every connection opened or failed once.
    Ready(Ready),
    /// Progress, every 200 ms.
    #[serde(rename = "p")]
    Progress(Progress),
    /// The verdict of an `end` command.
    Result(PhaseReport),
    /// A `refill` finished.
    Refilled {
        open: u64,
        failed: u64,
        failures: Reasons,
    },
    /// A `close` finished.
    Closed,
    /// The answer to `quit`.
    Final(Final),
}

impl WorkerReport {
    /// The kind as it appears on the wire (`k`), for messages about missing reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Ready(_) => "ready",
            Self::Progress(_) => "p",
            Self::Result(_) => "result",
            Self::Refilled { .. } => "refilled",
            Self::Closed => "closed",
            Self::Final(_) => "final",
        }
    }
}

/// A worker's connections once every one of them opened or failed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Ready {
    pub requested: u64,
    pub connected: u64,
    pub failed: u64,
    pub failures: Reasons,
    pub handshake_hist: HistCounts,
    pub first_open_unix: u64,
    pub last_connected_unix: u64,
    /// Open connections per channel.
    pub subscribers: Vec<u64>,
    pub rss_before: u64,
    pub rss: u64,
}

/// The latest counters of a worker.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(crate) struct Progress {
    pub open: u64,
    pub inflight: u64,
    pub failed: u64,
    pub lost: u64,
    /// Events delivered in the current phase.
    #[serde(rename = "pd")]
    pub phase_delivered: u64,
    /// Data messages received.
    #[serde(rename = "rx")]
    pub received: u64,
    /// Bench events over all phases.
    #[serde(rename = "ev")]
    pub events: u64,
    pub closed_by_us: u64,
}

impl Progress {
    /// The sum of two workers' counters.
    pub fn plus(self, p: Self) -> Self {
        Self {
            open: self.open + p.open,
            inflight: self.inflight + p.inflight,
            failed: self.failed + p.failed,
            lost: self.lost + p.lost,
            phase_delivered: self.phase_delivered + p.phase_delivered,
            received: self.received + p.received,
            events: self.events + p.events,
            closed_by_us: self.closed_by_us + p.closed_by_us,
        }
    }
}

/// One worker's verdict on a phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct PhaseReport {
    pub id: u32,
    pub connections_judged: u64,
    pub expected: u64,
    pub unique: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub delivered: u64,
    pub stray: u64,
    pub misrouted: u64,
    pub lost_connections: u64,
    pub connections_with_loss: u64,
    pub loss_examples: Vec<String>,
    pub first_recv_unix: u64,
    pub last_recv_unix: u64,
    pub latency_hist: HistCounts,
    /// Per event of the phase (in publish order): subscribers that got it, first and last
    /// latency in microseconds.
    pub events: Vec<(u32, u32, u32)>,
    /// Set when the worker had no phase to judge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A worker's figures at the end of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Final {
    pub rss: u64,
    pub rss_before: u64,
    pub pings_answered: u64,
    pub messages: u64,
    pub other_messages: Reasons,
    pub lost: Reasons,
    pub failures: Reasons,
    pub closed_by_us: u64,
    pub stray: u64,
}

// ---------------------------------------------------------------------------------------------
// Summaries (stdout and result files)

/// What a run ran on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Machine {
    pub cpus: usize,
    pub cpu: Option<String>,
    pub memory: Option<String>,
    pub kernel: Option<String>,
}

/// Latency percentiles in milliseconds; all `None` (and no mean) for an empty histogram.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Percentiles {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<f64>,
    pub count: u64,
}

/// `herald-bench idle`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct IdleSummary {
    pub target: String,
    pub requested: usize,
    pub connected: usize,
    pub open_at_end: usize,
    pub failed: IdleFailures,
    pub lost_after_open: Reasons,
    pub handshake_latency_ms: Percentiles,
    pub settled_after_s: Option<f64>,
    pub pings_answered: u64,
    pub messages_received: u64,
    pub interrupted: bool,
    pub duration_s: f64,
    pub rss_bytes: IdleRss,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct IdleFailures {
    pub total: usize,
    pub reasons: Reasons,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct IdleRss {
    pub before_connecting: u64,
    pub settled: Option<u64>,
    pub end: u64,
    pub per_connection: Option<f64>,
}

/// `herald-bench connect`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ConnectSummary {
    /// Always `connect`: tells these files from fan-out results.
    pub kind: String,
    pub label: String,
    pub target: String,
    pub max_inflight: usize,
    pub duration_s: f64,
    pub completed: u64,
    pub failed: u64,
    pub failures: Reasons,
    pub rate_per_s: f64,
    pub handshake_ms: Percentiles,
    pub server: ConnectServer,
    pub timeline: ConnectTimeline,
    pub machine: Machine,
    pub date_unix: u64,
    pub command: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ConnectServer {
    pub cpu_s: Option<f64>,
    pub cpu_ms_per_1000: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ConnectTimeline {
    pub t: Vec<f64>,
    pub completed: Vec<u64>,
}

/// `herald-bench attack`: what the hostile clients did and got.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct AttackSummary {
    pub kind: String,
    pub target: String,
    /// Connections (slots) requested.
    pub connections: usize,
    pub duration_s: f64,
    /// Stopped by SIGINT/SIGTERM before `--duration`.
    pub interrupted: bool,
    /// When every slot was in place (or the ready timeout passed); `None`: stopped before.
    pub ready_after_s: Option<f64>,
    pub in_place: u64,
    /// TCP connects started, first attempts and reconnects alike.
    pub handshakes_attempted: u64,
    /// HTTP 101 answers.
    pub upgrades: u64,
    /// HTTP status -> count (101 included).
    pub http_statuses: Reasons,
    /// Close code of the server's close frame -> count; `eof` when the server ended the
    /// stream without one, `reset` when it reset it.
    pub close_codes: Reasons,
    /// Connections the server ended while the attacker still held them (after the upgrade, or
    /// during it without any answer).
    pub closed_by_server: u64,
    /// Of those, ended before any HTTP answer (e.g. a handshake timeout).
    pub closed_before_response: u64,
    pub reconnects: u64,
    /// Upgraded connections still open when the attack stopped.
    pub open_at_end: u64,
    pub max_open: u64,
    /// non-reader: connections the server had not closed by the end of the drain.
    pub still_open_after_drain: Option<u64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Client messages or frames of the attack sent (subscribes, pings, partial or bad frames).
    pub messages_sent: u64,
    /// Server text messages by `type`.
    pub messages_received: Reasons,
    /// `code` of the server's `error` messages -> count.
    pub server_error_codes: Reasons,
    /// WebSocket pongs received.
    pub pongs: u64,
    /// garbage: frames sent by variant.
    pub garbage_sent: Reasons,
    /// Failures on the attacker's side, by reason (bounded).
    pub errors: Reasons,
    /// The kind's knobs as run.
    pub settings: BTreeMap<String, String>,
}

/// `herald-bench fanout`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct FanoutSummary {
    pub label: String,
    pub date_unix: u64,
    pub command: String,
    pub machine: Machine,
    pub targets: Vec<String>,
    pub publisher: String,
    pub connections: usize,
    pub channels: usize,
    pub zipf: f64,
    pub subscribe_message: bool,
    pub pad: Vec<usize>,
    pub workers: usize,
    pub subscribers_per_channel_top: Vec<u64>,
    pub connect: ConnectMerged,
    pub phases: Vec<PhaseResult>,
    pub max_sustained: Option<MaxSustained>,
    pub single: Option<SingleSummary>,
    pub burst: Option<BurstSummary>,
    /// Server figures by moment (`server_at_start`, `server_connected`, `server_before_churn`,
    /// ...); a moment is present when the run reached it, null without `--server-pid`.
    pub memory: BTreeMap<String, Option<ServerSample>>,
    pub bench: BenchFigures,
    pub timeline: Timeline,
    pub duration_s: f64,
    pub checks_failed: Vec<String>,
}

/// Server memory and CPU time at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ServerSample {
    pub rss: u64,
    #[serde(rename = "cpu_s")]
    pub cpu: f64,
}

/// The connect step of a fan-out run, merged over the workers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ConnectMerged {
    pub requested: usize,
    pub connected: u64,
    pub failed: u64,
    pub failures: Reasons,
    pub duration_s: f64,
    pub rate_per_s: f64,
    pub handshake_ms: Percentiles,
    pub bench_rss: u64,
}

/// One phase of a fan-out run, merged over the workers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct PhaseResult {
    pub id: u32,
    /// `rate`, `search`, `burst`, `single` or `churn`.
    pub kind: String,
    pub label: String,
    /// Part of the pass/fail checks (every phase but the search).
    pub checked: bool,
    /// Events per second offered; `None` for phases not paced by the clock.
    pub rate: Option<f64>,
    pub requested_events: u64,
    pub published: u64,
    pub publish_secs: f64,
    pub achieved_rate: f64,
    pub busy_retries: u64,
    pub publish_latency_ms: Percentiles,
    pub error: Option<String>,
    pub abandoned: Option<String>,
    pub connections_at_start: u64,
    pub closed_by_us: u64,
    pub connections_judged: u64,
    pub expected: u64,
    pub delivered: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub misrouted: u64,
    pub lost_connections: u64,
    pub connections_with_loss: u64,
    pub loss_examples: Vec<String>,
    pub delivered_per_s: f64,
    pub drain_s: f64,
    pub latency_ms: Percentiles,
    /// `[[percentile, ms], ...]`.
    pub latency_curve: Vec<(f64, f64)>,
    pub time_to_last_subscriber_ms: Percentiles,
    pub time_to_first_subscriber_ms: Percentiles,
    pub incomplete_events: u64,
    /// Median time to the last subscriber in the second and the last quarter of the events.
    pub ttl_median_ms_q2_q4: (Option<f64>, Option<f64>),
    pub backlog_grew: bool,
    pub stray: u64,
    pub clean: bool,
    pub sustained: bool,
    pub start_s: f64,
    pub server: PhaseServer,
}

impl PhaseResult {
    /// A rate phase (fixed or part of the search).
    pub fn is_rate(&self) -> bool {
        self.kind == "rate" || self.kind == "search"
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct PhaseServer {
    pub rss_start: Option<u64>,
    pub rss_end: Option<u64>,
    pub cpu_s: Option<f64>,
    pub cpu_s_per_million_delivered: Option<f64>,
}

/// The highest rate every subscriber kept up with, and how it went.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct MaxSustained {
    pub rate: Option<f64>,
    pub first_failing_rate: Option<f64>,
    /// The phase that ran at `rate`.
    pub phase: Option<u32>,
    pub delivered_per_s: Option<f64>,
    pub latency_ms: Option<Percentiles>,
    pub time_to_last_subscriber_ms: Option<Percentiles>,
    pub cpu_s_per_million_delivered: Option<f64>,
}

/// The last single-event phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct SingleSummary {
    pub time_to_last_subscriber_ms: Percentiles,
    pub time_to_first_subscriber_ms: Percentiles,
    pub events: u64,
    pub incomplete_events: u64,
}

/// The last burst phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct BurstSummary {
    pub events: u64,
    pub delivered_per_s: f64,
    pub latency_ms: Percentiles,
    pub clean: bool,
}

/// herald-bench's own figures over all workers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct BenchFigures {
    pub rss_total: u64,
    pub rss_per_connection: f64,
    pub other_messages: Reasons,
    pub lost_connections: Reasons,
}

/// Samples over the whole run, for the report's charts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Timeline {
    pub t: Vec<f64>,
    pub open: Vec<u64>,
    /// Events delivered (all phases, cumulative).
    pub delivered: Vec<u64>,
    pub server_rss: Vec<u64>,
    pub server_cpu: Vec<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_are_the_old_ones() {
        let begin = serde_json::to_string(&WorkerCommand::Begin { id: 3, churn: 0.0 }).unwrap();
        assert_eq!(begin, r#"{"cmd":"begin","id":3,"churn":0.0}"#);
        let quit: WorkerCommand = serde_json::from_str(r#"{"cmd":"quit"}"#).unwrap();
        assert_eq!(quit, WorkerCommand::Quit);
        let p = WorkerReport::Progress(Progress {
            phase_delivered: 7,
            ..Progress::default()
        });
        let line = serde_json::to_string(&p).unwrap();
        assert!(
            line.starts_with(r#"{"k":"p","#) && line.contains(r#""pd":7"#),
            "{line}"
        );
        let sample = serde_json::to_string(&ServerSample { rss: 1, cpu: 0.5 }).unwrap();
        assert_eq!(sample, r#"{"rss":1,"cpu_s":0.5}"#);
    }

    #[test]
    fn empty_percentiles_have_no_mean() {
        let v = serde_json::to_value(Percentiles::default()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"p50": null, "p90": null, "p99": null, "p999": null, "max": null, "count": 0})
        );
    }
}
