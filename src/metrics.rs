//! Prometheus metrics: what operators watch (connections, deliveries, drops, errors).
//!
//! Owns metric names and registration. Shards take per-shard handles once at start and bump
//! plain atomics; nothing here may block or allocate on the hot path.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

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
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let events_published = IntCounter::new(
            "herald_events_published_total",
            "Events accepted from the bus",
        )
        .expect("valid metric");
        registry
            .register(Box::new(events_published.clone()))
            .expect("unique metric");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
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
        let fd_limit = IntGauge::new(
            "herald_fd_limit",
            "RLIMIT_NOFILE soft limit after start-up (upper bound on connections)",
        )
        .expect("valid metric");
        registry
            .register(Box::new(fd_limit.clone()))
            .expect("unique metric");
        Self {
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
            stream_entries_skipped,
            bus_reconnects,
            stream_gaps,
            publish_unreplicated,
            fd_limit,
            registry,
        }
    }

    /// The text exposition format served on /metrics.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        // Encoding into a String only fails on invalid metric families, which register() refuses.
        let _ = encoder.encode_utf8(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
