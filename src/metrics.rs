//! Prometheus metrics: what operators watch (connections, deliveries, drops, errors).
//!
//! Owns metric names and registration. Shards take per-shard handles once at start and bump
//! plain atomics; nothing here may block or allocate on the hot path.

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub connections: IntGaugeVec,
    pub accepted: IntCounterVec,
    pub accept_errors: IntCounterVec,
    pub handshake_rejected: IntCounterVec,
    pub events_published: IntCounter,
    pub events_delivered: IntCounterVec,
    pub slow_consumers: IntCounterVec,
    pub memory_shed: IntCounterVec,
    pub buffered_bytes: IntGaugeVec,
    pub protocol_errors: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub idle_closed: IntCounterVec,
    pub idle_pings: IntCounterVec,
    pub shard_queue: IntGaugeVec,
    pub fd_limit: IntGauge,
    pub replays: IntCounterVec,
    pub resolutions: IntCounterVec,
    pub stream_entries_skipped: IntCounter,
    pub bus_reconnects: IntCounter,
    pub stream_gaps: IntCounter,
    pub publish_unreplicated: IntCounter,
    pub fanout_latency: HistogramVec,
    pub bus_lag_entries: IntGaugeVec,
    pub bus_lag_seconds: GaugeVec,
    pub bus_ready: IntGauge,
    pub resident_memory: IntGauge,
}

/// Buckets of the fan-out latency, in seconds: from a fraction of a millisecond (one event to a
/// few subscribers) to the tens of seconds a million subscribers on a busy machine can take.
const FANOUT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            registered(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            registered(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let events_published = IntCounter::new(
            "herald_events_published_total",
            "Events accepted from the bus",
        )
        .expect("valid metric");
        let events_published = registered(&registry, events_published);
        let counter = |name: &str, help: &str| {
            registered(
                &registry,
                IntCounter::new(name, help).expect("valid metric"),
            )
        };
        let stream_entries_skipped = counter(
            "herald_stream_entries_skipped_total",
            "Redis stream entries that violate the entry format (logged with their id)",
        );
        let stream_gaps = counter(
            "herald_stream_gaps_total",
            "Times the Redis reader found entries trimmed while it was disconnected (their events were not delivered by this node)",
        );
        let publish_unreplicated = counter(
            "herald_publish_unreplicated_total",
            "Publishes answered 503 because fewer than --publish-replicas replicas confirmed the entry in time",
        );
        let bus_reconnects = counter(
            "herald_bus_reconnects_total",
            "Times the bus lost its connection to Redis and reconnected",
        );
        let gauge = |name: &str, help: &str| {
            registered(&registry, IntGauge::new(name, help).expect("valid metric"))
        };
        let fanout_latency = HistogramVec::new(
            HistogramOpts::new(
                "herald_fanout_latency_seconds",
                "Time from herald taking an event in (bus read or publish) to its shard having \
                 written it, or queued it, for every subscriber",
            )
            .buckets(FANOUT_BUCKETS.to_vec()),
            &["shard"],
        )
        .expect("valid metric");
        let fanout_latency = registered(&registry, fanout_latency);
        let bus_lag_seconds = GaugeVec::new(
            Opts::new(
                "herald_bus_lag_seconds",
                "How long the oldest entry of the Redis stream that this node's reader has not \
                 read yet has been waiting (0 when it has read everything)",
            ),
            &["stream"],
        )
        .expect("valid metric");
        let bus_lag_seconds = registered(&registry, bus_lag_seconds);
        let bus_ready = gauge(
            "herald_bus_ready",
            "1 while the event bus is connected (every Redis stream read), else 0",
        );
        let resident_memory = gauge(
            "herald_resident_memory_bytes",
            "Resident memory of this process (RSS), read when the metrics are scraped",
        );
        let fd_limit = IntGauge::new(
            "herald_fd_limit",
            "RLIMIT_NOFILE soft limit after start-up (upper bound on connections)",
        )
        .expect("valid metric");
        let fd_limit = registered(&registry, fd_limit);
        let metrics = Self {
            connections: gauge_vec(
                "herald_connections",
                "Open WebSocket connections",
                &["shard"],
            ),
            accepted: counter_vec(
                "herald_connections_accepted_total",
                "TCP connections accepted",
                &["shard"],
            ),
            accept_errors: counter_vec(
                "herald_accept_errors_total",
                "accept() failures; kind=fd_limit means the open-file limit was reached",
                &["kind"],
            ),
            handshake_rejected: counter_vec(
                "herald_handshake_rejected_total",
                "Upgrade requests refused or dropped",
                &["reason"],
            ),
            events_published,
            events_delivered: counter_vec(
                "herald_event_frames_total",
                "Event frames handed to connections",
                &["shard"],
            ),
            slow_consumers: counter_vec(
                "herald_slow_consumers_total",
                "Connections closed with 1013 because their outbound queue exceeded the limit",
                &["shard"],
            ),
            memory_shed: counter_vec(
                "herald_memory_shed_total",
                "Connections closed because their shard held more than its share of \
                 --max-buffered-bytes, by close code (1009 unfinished message, 1013 output, 0 \
                 before the upgrade)",
                &["code"],
            ),
            buffered_bytes: gauge_vec(
                "herald_buffered_bytes",
                "Bytes a shard's connections hold in queued output, unfinished messages and held \
                 events (capped by --max-buffered-bytes)",
                &["shard"],
            ),
            protocol_errors: counter_vec(
                "herald_protocol_errors_total",
                "Connections closed for WebSocket protocol errors, by close code",
                &["code"],
            ),
            rate_limited: counter_vec(
                "herald_rate_limited_messages_total",
                "Client messages refused by the message rate limit",
                &["shard"],
            ),
            idle_closed: counter_vec(
                "herald_idle_closed_total",
                "Connections closed by the idle timeout",
                &["shard"],
            ),
            idle_pings: counter_vec(
                "herald_idle_pings_total",
                "Idle pings due: sent, or saved because the peer's TCP had just acknowledged all \
                 that was sent to it",
                &["outcome"],
            ),
            shard_queue: gauge_vec(
                "herald_shard_queue_depth",
                "Events waiting in a shard's inbound queue",
                &["shard"],
            ),
            replays: counter_vec(
                "herald_replays_total",
                "Resumes of reconnecting clients, by outcome: ok, truncated, ahead, unavailable, cancelled (the client left first), refused (too many waiting)",
                &["outcome"],
            ),
            resolutions: counter_vec(
                "herald_session_resolutions_total",
                "Appwrite sessions resolved for connections, by outcome: ok, denied (401/403), \
                 unavailable (timeout, error, busy), and whether the answer came from the cache",
                &["outcome", "cached"],
            ),
            bus_lag_entries: gauge_vec(
                "herald_bus_lag_entries",
                "Entries of the Redis stream this node's reader has not read yet",
                &["stream"],
            ),
            fanout_latency,
            bus_lag_seconds,
            bus_ready,
            resident_memory,
            stream_entries_skipped,
            bus_reconnects,
            stream_gaps,
            publish_unreplicated,
            fd_limit,
            registry,
        };
        metrics.with_known_labels();
        metrics
    }

    /// Creates the series whose label values are known up front, at zero: a dashboard then
    /// shows 0 instead of "no data" until the first occurrence, and `rate()` sees the first one.
    fn with_known_labels(&self) {
        for kind in ["fd_limit", "other"] {
            self.accept_errors.with_label_values(&[kind]);
        }
        for outcome in [
            "ok",
            "truncated",
            "ahead",
            "unavailable",
            "cancelled",
            "refused",
        ] {
            self.replays.with_label_values(&[outcome]);
        }
        for code in ["0", "1009", "1013"] {
            self.memory_shed.with_label_values(&[code]);
        }
        for outcome in ["ok", "denied", "unavailable"] {
            for cached in ["true", "false"] {
                self.resolutions.with_label_values(&[outcome, cached]);
            }
        }
    }

    /// The text exposition format served on /metrics.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        // Encoding into a String only fails on invalid metric families, which register() refuses.
        let _ = encoder.encode_utf8(&self.gather(), &mut out);
        out
    }

    /// Every metric as of now (the figures read at scrape time refreshed first).
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.resident_memory
            .set(resident_bytes().map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)));
        self.registry.gather()
    }
}

/// This process's resident set size, from `/proc/self/statm` (pages).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// Registers `metric` and hands it back (registering fails only on a duplicate name).
fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
