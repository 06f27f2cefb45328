//! The Redis Streams bus: one stream that every node publishes to and reads from.
//!
//! Owns the stream entry format, the reader (XREAD BLOCK from the last delivered id, reconnecting
//! with back-off, so an outage shorter than the stream's retention loses nothing), publishing
//! (XADD with MAXLEN ~), history for resumes (memory first, then XRANGE), and the optional
//! Appwrite pub/sub source. A node delivers its own publishes only when it reads them back, so
//! every node delivers every event in stream order. Must not touch connections or shards.
//!
//! The primary is one address (`--redis`) or found through Redis Sentinel (`--redis-sentinel`),
//! asked again on every reconnect, so that after a failover the reader continues from the last
//! id it delivered on the new primary. With `--publish-replicas N`, a publish answers only once
//! `WAIT` confirms the entry on N replicas.
//!
//! Entry fields (what any publisher writes with plain XADD):
//! - `channels`: JSON array of strings, required
//! - `payload`: JSON object as text, required
//! - `project`: string, optional (the default project)
//! - `events`: JSON array of strings, optional
//! - `roles`: JSON array of strings, optional (`["any"]`)
//! - `permissionsChanged` (`true`) with `userId`: that user's permissions changed; every node
//!   resolves the sessions of its connections again. `channels` may then be `[]` (or absent):
//!   a permission change alone, with no event.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use redis::{AsyncConnectionConfig, RedisResult};
use serde_json::Value;

use super::lag::{Progress, Snapshot};
use super::streams::StreamShards;
use super::{
    BoxFuture, Bus, BusError, NewEvent, Outlet, PermissionChange, PublishRequest, select_replay,
};
use crate::event::{
    EncodedEvent, Event, EventId, EventIdGenerator, timestamp_from_ms, timestamp_now,
};
use crate::history::History;
use crate::hub::Hub;
use crate::mailbox::{ReplayError, ReplayQuery};
use crate::metrics::Metrics;

/// Entries per XREAD / XRANGE call.
const BATCH: usize = 1000;
/// How long one XREAD waits for new entries.
const BLOCK: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a resume waits for a reader that has not reached its stream yet.
const START_WAIT: Duration = Duration::from_secs(5);
/// How often the readers' lag is sampled.
const LAG_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub primary: Primary,
    pub stream: String,
    pub maxlen: usize,
    pub default_project: String,
    pub appwrite_channel: Option<String>,
    pub history_events: usize,
    pub history_bytes: usize,
    /// Most stream entries one replay reads (`--replay-max-scan`).
    pub replay_max_scan: usize,
    /// Replicas that must confirm an entry before a publish answers (`--publish-replicas`).
    pub publish_replicas: u32,
    /// How long a publish waits for them (`--publish-replicas-timeout`).
    pub publish_replicas_timeout: Duration,
    /// Streams the events are split over (`--stream-shards`), by project.
    pub stream_shards: u16,
}

/// How to reach the Redis primary.
#[derive(Debug, Clone)]
pub enum Primary {
    /// One fixed address (`--redis`).
    Url(String),
    /// Whichever server these Sentinels (`host:port` or `redis://host:port`) name as the
    /// primary of `master`.
    Sentinel {
        addresses: Vec<String>,
        master: String,
    },
    /// A Redis Cluster, found through any of these nodes; each stream shard lives on the master
    /// of its key's slot.
    Cluster(Vec<String>),
}

/// `host:port` as a Redis URL; URLs stay as they are.
fn redis_url(address: &str) -> String {
    match address.contains("://") {
        true => address.to_owned(),
        false => format!("redis://{address}"),
    }
}

/// Where the Redis primary is: one fixed address, wherever the Sentinels say it is now, or a
/// cluster.
enum Endpoint {
    Direct(redis::Client),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    Cluster(Vec<String>),
}

/// A connection to the primary or to the cluster; both multiplex commands and are cheap to
/// clone.
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// One stream shard as this node reads it.
struct StreamState {
    key: String,
    history: Mutex<History>,
    /// Where the reader started: the stream's last id when this node first connected.
    start: OnceLock<EventId>,
    up: AtomicBool,
    progress: Mutex<Progress>,
}

impl Endpoint {
    fn new(settings: &RedisSettings) -> RedisResult<Self> {
        let (addresses, master) = match &settings.primary {
            Primary::Url(url) => return Ok(Self::Direct(redis::Client::open(url.as_str())?)),
            Primary::Cluster(nodes) => {
                let urls = nodes.iter().map(|a| redis_url(a)).collect();
                return Ok(Self::Cluster(urls));
            }
            Primary::Sentinel { addresses, master } => (addresses, master),
        };
        let urls = addresses.iter().map(|a| redis_url(a)).collect::<Vec<_>>();
        let client = SentinelClient::build(urls, master.clone(), None, SentinelServerType::Master)?;
        Ok(Self::Sentinel(tokio::sync::Mutex::new(client)))
    }

    /// A client for the primary as of now (Sentinel checks that it answers ROLE as master).
    async fn primary(&self) -> RedisResult<redis::Client> {
        match self {
            Self::Direct(client) => Ok(client.clone()),
            Self::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await,
            Self::Cluster(_) => Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "a Redis Cluster has no single primary",
            ))),
        }
    }

    /// A new connection; `response_timeout` bounds every answer (a blocking XREAD's too).
    async fn connect(&self, response_timeout: Duration) -> RedisResult<Conn> {
        if let Self::Cluster(urls) = self {
            let client = ClusterClient::builder(urls.clone())
                .connection_timeout(Duration::from_secs(2))
                .response_timeout(response_timeout)
                .build()?;
            return Ok(Conn::Cluster(client.get_async_connection().await?));
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(response_timeout));
        let conn = self
            .primary()
            .await?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(Conn::Single(conn))
    }
}

pub struct RedisBus {
    endpoint: Endpoint,
    settings: RedisSettings,
    outlet: Outlet,
    metrics: Metrics,
    /// Connection for commands that answer at once (XADD, XRANGE, XINFO).
    commands: tokio::sync::Mutex<Option<Conn>>,
    /// Connection for replays (XRANGE, XINFO), made by the replay thread's runtime.
    replay_commands: tokio::sync::Mutex<Option<Conn>>,
    shards: StreamShards,
    /// One per stream shard, in shard order.
    streams: Vec<StreamState>,
    pubsub_up: AtomicBool,
    /// Publishes waiting for replicas, committed in batches by one task (`--publish-replicas`).
    replicated: tokio::sync::mpsc::Sender<Pending>,
    replicated_rx: Mutex<Option<tokio::sync::mpsc::Receiver<Pending>>>,
}

/// A publish whose answer waits for its entry to reach the replicas.
struct Pending {
    xadd: redis::Cmd,
    shard: u16,
    answer: tokio::sync::oneshot::Sender<Result<String, BusError>>,
}

/// Publishes waiting for replicas at most; more are answered 503 ("overloaded").
const REPLICATED_QUEUE: usize = 10_000;
/// Publishes one `WAIT` covers at most.
const REPLICATED_BATCH: usize = 512;

/// The fields a stream entry may have (the module header says what each holds).
const ENTRY_FIELDS: [&str; 7] = [
    "channels",
    "payload",
    "project",
    "events",
    "roles",
    "permissionsChanged",
    "userId",
];

/// What one stream entry or pub/sub message carries: an event, a permission change, or both.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub event: Option<Event>,
    pub permissions_changed: Option<PermissionChange>,
}

impl Parsed {
    fn new(event: NewEvent, id: String, timestamp: String) -> Self {
        let permissions_changed = event.permissions_changed.clone();
        Self {
            event: event.is_event().then(|| event.into_event(id, timestamp)),
            permissions_changed,
        }
    }
}

/// An entry that violates the format; it is skipped and counted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadEntry(String);

/// Parses an entry of a single stream: its event gets the entry id.
pub fn parse_entry(entry: &StreamId, default_project: &str) -> Result<Parsed, BadEntry> {
    parse_shard_entry(entry, default_project, &StreamShards::new("", 1), 0)
}

/// Parses an entry of stream shard `shard`: its event gets the entry id in that shard, and its
/// project must belong there (its resumes would look in the other stream).
pub fn parse_shard_entry(
    entry: &StreamId,
    default_project: &str,
    shards: &StreamShards,
    shard: u16,
) -> Result<Parsed, BadEntry> {
    let id: EventId = entry
        .id
        .parse::<EventId>()
        .ok()
        .filter(|id| id.shard == 0)
        .ok_or_else(|| BadEntry(format!("entry id {} is not a stream id", entry.id)))?
        .in_shard(shard);
    let text = |field: &str| -> Result<Option<String>, BadEntry> {
        match entry.map.get(field) {
            None => Ok(None),
            Some(v) => redis::from_redis_value_ref::<String>(v)
                .map(Some)
                .map_err(|_| BadEntry(format!("field {field} is not text"))),
        }
    };
    let list = |field: &str| -> Result<Option<Vec<String>>, BadEntry> {
        match text(field)? {
            None => Ok(None),
            Some(t) => serde_json::from_str::<Vec<String>>(&t)
                .map(Some)
                .map_err(|e| {
                    BadEntry(format!("field {field} is not a JSON array of strings: {e}"))
                }),
        }
    };
    // Like unknown fields in the publish API: a typo (`role` for `roles`) must not silently
    // make an event public.
    if let Some(unknown) = entry
        .map
        .keys()
        .find(|k| !ENTRY_FIELDS.contains(&k.as_str()))
    {
        return Err(BadEntry(format!(
            "unknown field {unknown:?} (known: {})",
            ENTRY_FIELDS.join(", ")
        )));
    }
    let permissions_changed = match text("permissionsChanged")?.as_deref() {
        None | Some("false" | "0") => false,
        Some("true" | "1") => true,
        Some(_) => {
            return Err(BadEntry(
                "field permissionsChanged is not true or false".into(),
            ));
        }
    };
    let channels = match list("channels")? {
        Some(c) => c,
        None if permissions_changed => Vec::new(),
        None => return Err(BadEntry("missing field channels".into())),
    };
    let payload = match text("payload")? {
        Some(p) => {
            serde_json::from_str(&p).map_err(|e| BadEntry(format!("payload is not JSON: {e}")))?
        }
        None if channels.is_empty() => Value::Null,
        None => return Err(BadEntry("missing field payload".into())),
    };
    let request = PublishRequest {
        project: text("project")?,
        channels,
        events: list("events")?.unwrap_or_default(),
        roles: list("roles")?,
        payload,
        permissions_changed,
        user_id: text("userId")?,
    };
    let event = request
        .validate(default_project)
        .map_err(|e| BadEntry(e.to_string()))?;
    let home = shards.shard_of(&event.project);
    if home != shard {
        return Err(BadEntry(format!(
            "project {} belongs in stream {}, not in stream shard {shard}",
            event.project,
            shards.key(home).unwrap_or_default()
        )));
    }
    // The id as the stream wrote it, prefixed with the stream shard beyond the first. The
    // entry id carries the time of the XADD, so every node stamps the same time.
    let shown = match shard {
        0 => entry.id.clone(),
        k => format!("{k}:{}", entry.id),
    };
    Ok(Parsed::new(event, shown, timestamp_from_ms(id.ms)))
}

impl RedisBus {
    pub fn new(
        settings: RedisSettings,
        hub: Arc<Hub>,
        metrics: Metrics,
    ) -> Result<Arc<Self>, redis::RedisError> {
        let endpoint = Endpoint::new(&settings)?;
        let shards = StreamShards::new(&settings.stream, settings.stream_shards);
        let keys = shards.keys().len();
        let streams = shards
            .keys()
            .iter()
            .map(|key| StreamState {
                key: key.clone(),
                // The memory bound holds for the node, not per stream.
                history: Mutex::new(History::new(
                    EventId::ZERO,
                    settings.history_events.div_ceil(keys),
                    settings.history_bytes / keys,
                )),
                start: OnceLock::new(),
                up: AtomicBool::new(false),
                progress: Mutex::new(Progress::default()),
            })
            .collect();
        let (replicated, replicated_rx) = tokio::sync::mpsc::channel(REPLICATED_QUEUE);
        Ok(Arc::new(Self {
            endpoint,
            settings,
            outlet: Outlet::new(hub, metrics.clone()),
            metrics,
            commands: tokio::sync::Mutex::new(None),
            replay_commands: tokio::sync::Mutex::new(None),
            shards,
            streams,
            pubsub_up: AtomicBool::new(false),
            replicated,
            replicated_rx: Mutex::new(Some(replicated_rx)),
        }))
    }

    /// Starts the stream reader (and the Appwrite pub/sub listener) on the current runtime.
    pub fn spawn_workers(self: &Arc<Self>) {
        for shard in 0..self.shards.count() {
            let me = self.clone();
            tokio::spawn(async move { me.run_reader(shard).await });
            let me = self.clone();
            tokio::spawn(async move { me.run_lag(shard).await });
        }
        if let Some(channel) = self.settings.appwrite_channel.clone() {
            let me = self.clone();
            tokio::spawn(async move { me.run_pubsub(channel).await });
        }
        let pending = self.replicated_rx.lock().ok().and_then(|mut rx| rx.take());
        if let Some(pending) = pending.filter(|_| self.settings.publish_replicas > 0) {
            let me = self.clone();
            tokio::spawn(async move { me.run_replicated(pending).await });
        }
    }

    /// Runs a command on the shared command connection, reconnecting once if it broke.
    async fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> RedisResult<T> {
        self.command_on(&self.commands, cmd).await
    }

    /// Runs a replay's command on its own connection, so that history reads never queue ahead
    /// of publishing.
    async fn replay_command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> RedisResult<T> {
        self.command_on(&self.replay_commands, cmd).await
    }

    async fn command_on<T: redis::FromRedisValue>(
        &self,
        slot: &tokio::sync::Mutex<Option<Conn>>,
        cmd: &redis::Cmd,
    ) -> RedisResult<T> {
        let mut conn = self.shared(slot).await?;
        let result = cmd.query_async(&mut conn).await;
        Self::forget_if_broken(slot, &result).await;
        result
    }

    /// The connection in `slot`, connecting first if there is none. The lock only guards
    /// connecting; commands run on a clone, so they pipeline on the one connection instead of
    /// waiting for each other.
    async fn shared(&self, slot: &tokio::sync::Mutex<Option<Conn>>) -> RedisResult<Conn> {
        let mut guard = slot.lock().await;
        Ok(match guard.as_ref() {
            Some(c) => c.clone(),
            // WAIT holds its answer back for up to the replicas' timeout.
            None => {
                let timeout = Duration::from_secs(2) + self.settings.publish_replicas_timeout;
                guard.insert(self.endpoint.connect(timeout).await?).clone()
            }
        })
    }

    async fn forget_if_broken<T>(slot: &tokio::sync::Mutex<Option<Conn>>, result: &RedisResult<T>) {
        // READONLY: the primary was demoted by a failover; ask for the new one.
        if result.as_ref().is_err_and(|e| {
            e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        }) {
            *slot.lock().await = None;
        }
    }

    /// XADD; with `--publish-replicas`, the entry's id only once enough replicas hold it.
    async fn append(&self, xadd: redis::Cmd, shard: u16) -> Result<String, BusError> {
        if self.settings.publish_replicas == 0 {
            return self
                .command::<String>(&xadd)
                .await
                .map(|id| in_shard(id, shard))
                .map_err(unavailable);
        }
        let (answer, answered) = tokio::sync::oneshot::channel();
        let pending = Pending {
            xadd,
            shard,
            answer,
        };
        self.replicated
            .try_send(pending)
            .map_err(|_| BusError::Overloaded)?;
        answered
            .await
            .unwrap_or_else(|_| Err(BusError::Unavailable("the publisher stopped".into())))
    }

    /// Commits waiting publishes in batches on a connection of their own: their XADDs, then one
    /// `WAIT`, in one round trip. Redis answers nothing else on a connection while it waits
    /// there, so one `WAIT` per publish would make publishes wait for each other.
    async fn run_replicated(self: Arc<Self>, mut pending: tokio::sync::mpsc::Receiver<Pending>) {
        let slot = tokio::sync::Mutex::new(None);
        while let Some(first) = pending.recv().await {
            let mut batch = vec![first];
            while batch.len() < REPLICATED_BATCH {
                match pending.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            self.commit(&slot, batch).await;
        }
    }

    async fn commit(&self, slot: &tokio::sync::Mutex<Option<Conn>>, batch: Vec<Pending>) {
        let wanted = self.settings.publish_replicas;
        let waited = self.settings.publish_replicas_timeout;
        let mut pipe = redis::pipe();
        for p in &batch {
            pipe.add_command(p.xadd.clone());
        }
        pipe.cmd("WAIT")
            .arg(wanted)
            .arg(waited.as_millis().max(1) as u64);
        let result: RedisResult<Vec<redis::Value>> = match self.shared(slot).await {
            Ok(mut conn) => pipe.query_async(&mut conn).await,
            Err(e) => Err(e),
        };
        Self::forget_if_broken(slot, &result).await;
        let mut values = match result {
            Ok(values) if values.len() == batch.len() + 1 => values,
            other => {
                let why = match other {
                    Err(e) => format!("Redis: {e}"),
                    Ok(_) => "Redis answered the publish pipeline with too few replies".into(),
                };
                for p in batch {
                    let _ = p.answer.send(Err(BusError::Unavailable(why.clone())));
                }
                return;
            }
        };
        let acked =
            redis::from_redis_value::<u64>(values.pop().unwrap_or(redis::Value::Nil)).unwrap_or(0);
        for (p, id) in batch.into_iter().zip(values) {
            let answer = match redis::from_redis_value::<String>(id) {
                Err(e) => Err(BusError::Unavailable(format!("Redis: {e}"))),
                Ok(id) if acked < u64::from(wanted) => {
                    self.metrics.publish_unreplicated.inc();
                    Err(BusError::Unreplicated {
                        id: in_shard(id, p.shard),
                        acked,
                        wanted,
                        waited,
                    })
                }
                Ok(id) => Ok(in_shard(id, p.shard)),
            };
            let _ = p.answer.send(answer);
        }
    }

    async fn run_reader(self: Arc<Self>, shard: u16) {
        let mut last: Option<EventId> = None;
        let mut backoff = Duration::from_millis(100);
        let stream = &self.streams[usize::from(shard)];
        loop {
            let err = self.read_stream(shard, &mut last, &mut backoff).await;
            if stream.up.swap(false, Ordering::AcqRel) {
                self.metrics.bus_reconnects.inc();
            }
            tracing::warn!(
                stream = %stream.key,
                error = %err,
                resume_after = %last.map_or("-".to_owned(), |l| l.to_string()),
                retry_in = ?backoff,
                "lost the Redis stream; reconnecting (no event is lost while the stream retains it)"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Reads stream shard `shard` until an error; `last` is the id of the last entry handed to
    /// the shards.
    async fn read_stream(
        &self,
        shard: u16,
        last: &mut Option<EventId>,
        backoff: &mut Duration,
    ) -> redis::RedisError {
        let stream = &self.streams[usize::from(shard)];
        // No response timeout would hang forever on a silently dead peer; BLOCK bounds the wait.
        let mut conn = match self.endpoint.connect(BLOCK + Duration::from_secs(5)).await {
            Ok(c) => c,
            Err(e) => return e,
        };
        let after = match *last {
            Some(l) => {
                if let Err(e) = self.check_for_gap(shard, &mut conn, l).await {
                    return e;
                }
                l
            }
            None => match stream_start(&mut conn, &stream.key).await {
                Ok(StreamStart {
                    last_entry,
                    last_generated,
                    added,
                }) => {
                    let start = last_entry.in_shard(shard);
                    // Entries deleted after the last one will never be read: not a lag.
                    let read_to = last_entry.max(last_generated).in_shard(shard);
                    lock(&stream.progress).start(read_to, added);
                    // History first: a resume that sees `start` must find it reset.
                    self.lock_history(shard).reset(start);
                    let _ = stream.start.set(start);
                    *last = Some(start);
                    start
                }
                Err(e) => return e,
            },
        };
        stream.up.store(true, Ordering::Release);
        *backoff = Duration::from_millis(100);
        tracing::info!(stream = %stream.key, after = %after, "reading the Redis stream");
        let mut cursor = after;
        loop {
            let reply: RedisResult<Option<StreamReadReply>> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(BATCH)
                .arg("BLOCK")
                .arg(BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&stream.key)
                .arg(cursor.stream_id())
                .query_async(&mut conn)
                .await;
            let reply = match reply {
                Ok(r) => r,
                Err(e) => return e,
            };
            let mut batch = Vec::new();
            let mut read = 0;
            for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                read += 1;
                let Ok(id) = entry.id.parse::<EventId>() else {
                    continue;
                };
                let parsed =
                    parse_shard_entry(&entry, &self.settings.default_project, &self.shards, shard);
                match parsed {
                    Ok(parsed) => {
                        if let Some(change) = &parsed.permissions_changed {
                            // In stream order: the events before it first.
                            self.deliver(shard, std::mem::take(&mut batch)).await;
                            self.change_permissions(change).await;
                        }
                        batch.extend(parsed.event.map(|ev| EncodedEvent::encode(&ev)));
                    }
                    Err(e) => {
                        self.metrics.stream_entries_skipped.inc();
                        tracing::warn!(stream = %stream.key, id = %entry.id, error = %e, "skipping a malformed stream entry");
                    }
                }
                cursor = id.in_shard(shard);
            }
            self.deliver(shard, batch).await;
            *last = Some(cursor);
            lock(&stream.progress).advance(cursor, read);
        }
    }

    /// Samples how far the reader of stream shard `shard` is behind, once a second, into
    /// `herald_bus_lag_entries` and `herald_bus_lag_seconds`.
    async fn run_lag(self: Arc<Self>, shard: u16) {
        let stream = &self.streams[usize::from(shard)];
        let entries = self
            .metrics
            .bus_lag_entries
            .with_label_values(&[&stream.key]);
        let seconds = self
            .metrics
            .bus_lag_seconds
            .with_label_values(&[&stream.key]);
        let mut every = tokio::time::interval(LAG_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            // Also while the reader is away: how far behind it falls is the point then.
            let Some(snapshot) = self.snapshot(shard).await else {
                continue;
            };
            let lag = lock(&stream.progress).sample(&snapshot);
            if let Some(lag) = lag {
                entries.set(
                    lag.entries
                        .map_or(0, |e| i64::try_from(e).unwrap_or(i64::MAX)),
                );
                seconds.set(lag.seconds);
            }
        }
    }

    /// What the lag sampler needs of stream shard `shard` now; `None` before the reader started,
    /// while there is no stream, or when Redis does not answer (the figures stay as they were).
    async fn snapshot(&self, shard: u16) -> Option<Snapshot> {
        let stream = &self.streams[usize::from(shard)];
        let at = lock(&stream.progress).at()?;
        let info: redis::Value = self
            .command(redis::cmd("XINFO").arg("STREAM").arg(&stream.key))
            .await
            .ok()?;
        let last: EventId = info_field(&info, "last-generated-id")?.parse().ok()?;
        let last = last.in_shard(shard);
        let oldest_unread_ms = if at < last {
            let next: Option<StreamRangeReply> = self
                .command(
                    redis::cmd("XRANGE")
                        .arg(&stream.key)
                        .arg(at.next().stream_id())
                        .arg("+")
                        .arg("COUNT")
                        .arg(1),
                )
                .await
                .ok()?;
            next.and_then(|r| r.ids.first().and_then(|e| e.id.parse::<EventId>().ok()))
                .map(|id| id.ms)
        } else {
            None
        };
        Some(Snapshot {
            last,
            added: info_field(&info, "entries-added").and_then(|a| a.parse().ok()),
            oldest_unread_ms,
            now_ms: crate::event::now_ms(),
        })
    }

    /// After a reconnect: were entries after `last` trimmed while the reader was away? They are
    /// lost for this node's subscribers; say so, count it, and make resumes from before the gap
    /// answer 4010 instead of silently skipping it. Redis tells only where the stream now begins,
    /// so a trim that removed nothing this node had not delivered yet can be reported too.
    async fn check_for_gap(
        &self,
        shard: u16,
        conn: &mut Conn,
        last: EventId,
    ) -> Result<(), redis::RedisError> {
        let key = &self.streams[usize::from(shard)].key;
        let info: redis::Value = match redis::cmd("XINFO")
            .arg("STREAM")
            .arg(key)
            .query_async(conn)
            .await
        {
            Ok(info) => info,
            // No stream yet: nothing was trimmed.
            Err(e)
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) =>
            {
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if let Some(deleted) = deleted_after(&info, last) {
            self.metrics.stream_gaps.inc();
            tracing::error!(
                stream = %key,
                last_delivered = %last,
                deleted_through = %deleted,
                "entries were trimmed from the stream while this node was disconnected: events \
                 between the last one delivered here and {deleted} may not have been delivered \
                 (raise --stream-maxlen); resumes from before {deleted} get 4010"
            );
            self.lock_history(shard).forget_through(deleted);
        }
        Ok(())
    }

    fn lock_history(&self, shard: u16) -> std::sync::MutexGuard<'_, History> {
        self.streams[usize::from(shard)]
            .history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the shards that a user's permissions changed, waiting while their queues are full.
    async fn change_permissions(&self, change: &PermissionChange) {
        while self.outlet.permissions_changed(change).is_err() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Hands events of stream shard `shard` to the shards in one batch, waiting while their
    /// queues are full (the stream holds everything meanwhile, so back-pressure costs latency,
    /// never events).
    async fn deliver(&self, shard: u16, events: Vec<Arc<EncodedEvent>>) {
        if events.is_empty() {
            return;
        }
        loop {
            let handed = self
                .outlet
                .deliver(&mut self.lock_history(shard), &events)
                .is_ok();
            if handed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn open_pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        self.endpoint.primary().await?.get_async_pubsub().await
    }

    async fn run_pubsub(self: Arc<Self>, channel: String) {
        let mut ids = EventIdGenerator::default();
        let mut backoff = Duration::from_millis(100);
        loop {
            let err = match self.open_pubsub().await {
                Err(e) => e,
                Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                    Err(e) => e,
                    Ok(()) => {
                        self.pubsub_up.store(true, Ordering::Release);
                        backoff = Duration::from_millis(100);
                        tracing::info!(%channel, "listening to Appwrite's realtime pub/sub");
                        let mut messages = pubsub.on_message();
                        while let Some(msg) = messages.next().await {
                            match parse_appwrite(
                                msg.get_payload_bytes(),
                                &self.settings.default_project,
                            ) {
                                Ok(parsed) => {
                                    if let Some(change) = &parsed.permissions_changed {
                                        self.change_permissions(change).await;
                                    }
                                    if let Some(mut ev) = parsed.event {
                                        // Pub/sub has no history: these ids are not positions.
                                        ev.id = format!("appwrite-{}", ids.next_id());
                                        self.deliver(0, vec![EncodedEvent::encode(&ev)]).await;
                                    }
                                }
                                Err(e) => {
                                    self.metrics.stream_entries_skipped.inc();
                                    tracing::warn!(error = %e, "skipping a malformed Appwrite pub/sub message");
                                }
                            }
                        }
                        redis::RedisError::from((redis::ErrorKind::Io, "pub/sub connection closed"))
                    }
                },
            };
            self.pubsub_up.store(false, Ordering::Release);
            tracing::warn!(error = %err, retry_in = ?backoff, "lost Appwrite's pub/sub; reconnecting");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Where `stream`'s reader started, waiting a little for a node that is still connecting:
    /// right after a restart, a load balancer may send resuming clients before the first
    /// health check says the node is not ready, and answering them "resync" would make every
    /// client of a rolling restart refetch everything.
    async fn started(stream: &StreamState) -> Result<EventId, ReplayError> {
        let deadline = tokio::time::Instant::now() + START_WAIT;
        loop {
            if let Some(start) = stream.start.get() {
                return Ok(*start);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ReplayError::Unavailable(format!(
                    "not connected to Redis after {START_WAIT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn replay_from(&self, q: ReplayQuery) -> Result<Vec<Arc<EncodedEvent>>, ReplayError> {
        let unavailable = |e: redis::RedisError| ReplayError::Unavailable(format!("Redis: {e}"));
        let shard = q.after.shard;
        let home = self.shards.shard_of(&q.project);
        if shard != home {
            return Err(ReplayError::Truncated(format!(
                "lastEventId {} is not from the stream that holds project {}'s events (shard \
                 {home} of {})",
                q.after,
                q.project,
                self.shards.count()
            )));
        }
        let stream = &self.streams[usize::from(shard)];
        let start = Self::started(stream).await?;
        let upto = q.upto.filter(|u| u.shard == shard).unwrap_or(start);
        let (newest, cached) = {
            let h = self.lock_history(shard);
            (h.newest(), h.range(q.after, upto))
        };
        if q.after > newest {
            // Ahead of this node is fine (another node read further); ahead of the stream is not.
            let last: EventId = self
                .replay_command::<Option<StreamRangeReply>>(
                    redis::cmd("XREVRANGE")
                        .arg(&stream.key)
                        .arg("+")
                        .arg("-")
                        .arg("COUNT")
                        .arg(1),
                )
                .await
                .map_err(unavailable)?
                .and_then(|r| r.ids.first().and_then(|e| e.id.parse::<EventId>().ok()))
                .unwrap_or(EventId::ZERO)
                .in_shard(shard);
            if q.after > last {
                return Err(ReplayError::Ahead(q.after));
            }
            return Ok(Vec::new());
        }
        let mut selected = Vec::new();
        let mut bytes = 0;
        if let Some(events) = cached {
            select_replay(events, &q, &mut selected, &mut bytes)?;
            return Ok(selected);
        }
        // Older than memory reaches: read the stream, unless it was trimmed past `after`.
        let info: redis::Value = self
            .replay_command(redis::cmd("XINFO").arg("STREAM").arg(&stream.key))
            .await
            .map_err(unavailable)?;
        if let Some(reason) = trimmed_past(&info, q.after) {
            return Err(ReplayError::Truncated(format!(
                "lastEventId {} is older than the stream retains ({reason})",
                q.after
            )));
        }
        let mut from = q.after.next();
        let mut scanned = 0;
        while from <= upto {
            if scanned >= self.settings.replay_max_scan {
                return Err(ReplayError::Truncated(format!(
                    "more than {} stream entries to search (--replay-max-scan)",
                    self.settings.replay_max_scan
                )));
            }
            scanned += BATCH;
            let page: StreamRangeReply = self
                .replay_command(
                    redis::cmd("XRANGE")
                        .arg(&stream.key)
                        .arg(from.stream_id())
                        .arg(upto.stream_id())
                        .arg("COUNT")
                        .arg(BATCH),
                )
                .await
                .map_err(unavailable)?;
            let Some(last) = page.ids.last().and_then(|e| e.id.parse::<EventId>().ok()) else {
                break;
            };
            let last = last.in_shard(shard);
            let project = &self.settings.default_project;
            let events = page
                .ids
                .iter()
                .filter_map(|e| {
                    parse_shard_entry(e, project, &self.shards, shard)
                        .ok()?
                        .event
                })
                .map(|e| EncodedEvent::encode(&e));
            select_replay(events, &q, &mut selected, &mut bytes)?;
            if page.ids.len() < BATCH {
                break;
            }
            from = last.next();
        }
        Ok(selected)
    }
}

fn unavailable(e: redis::RedisError) -> BusError {
    BusError::Unavailable(format!("Redis: {e}"))
}

/// A stream id XADD answered, as the event id of stream shard `shard`.
fn in_shard(id: String, shard: u16) -> String {
    match id.parse::<EventId>() {
        Ok(parsed) => parsed.in_shard(shard).to_string(),
        Err(_) => id,
    }
}

/// Where a stream stands when a reader first reaches it, read in one command so that the
/// figures agree.
struct StreamStart {
    /// The id of its last entry (0-0 when it is empty or missing).
    last_entry: EventId,
    /// `last-generated-id`: past entries deleted after the last one.
    last_generated: EventId,
    /// How many entries it ever had (Redis 7 and later).
    added: Option<u64>,
}

async fn stream_start(conn: &mut Conn, stream: &str) -> RedisResult<StreamStart> {
    let info: redis::Value = match redis::cmd("XINFO")
        .arg("STREAM")
        .arg(stream)
        .query_async(conn)
        .await
    {
        Ok(info) => info,
        Err(e) if is_no_such_key(&e) => {
            return Ok(StreamStart {
                last_entry: EventId::ZERO,
                last_generated: EventId::ZERO,
                added: Some(0),
            });
        }
        // Any other refusal (a renamed command, a proxy): starting at 0-0 would send the whole
        // stream to live subscribers as new events.
        Err(e) => return Err(e),
    };
    let unreadable = |what: &str| {
        redis::RedisError::from((
            redis::ErrorKind::Parse,
            "XINFO STREAM answered without a readable field",
            what.to_owned(),
        ))
    };
    let last_entry = match info_value(&info, "last-entry") {
        Some(redis::Value::Array(entry)) => entry
            .first()
            .and_then(|id| redis::from_redis_value_ref::<String>(id).ok())
            .and_then(|id| id.parse().ok())
            .ok_or_else(|| unreadable("last-entry"))?,
        Some(redis::Value::Nil) => EventId::ZERO,
        _ => return Err(unreadable("last-entry")),
    };
    let last_generated = info_field(&info, "last-generated-id")
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| unreadable("last-generated-id"))?;
    Ok(StreamStart {
        last_entry,
        last_generated,
        added: info_field(&info, "entries-added").and_then(|a| a.parse().ok()),
    })
}

/// Redis's answer to XINFO STREAM on a key that does not exist.
fn is_no_such_key(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
        && e.to_string().to_ascii_lowercase().contains("no such key")
}

/// Whether entries after `after` may have been removed, judged from XINFO STREAM: trimming
/// (MAXLEN) moves the first entry, XDEL moves `max-deleted-entry-id`.
/// Whether entries after `last` may be gone, by the same rule a resume from `last` is judged
/// by ([`trimmed_past`]), and the id through which history must be forgotten.
fn deleted_after(info: &redis::Value, last: EventId) -> Option<EventId> {
    trimmed_past(info, last)?;
    let id = |name: &str| {
        let id = info_field(info, name)?.parse::<EventId>().ok()?;
        Some(id.in_shard(last.shard))
    };
    let deleted = id("max-deleted-entry-id").filter(|&d| d > last);
    let first = id("recorded-first-entry-id").filter(|&f| f > last);
    deleted.max(first).or(Some(last.next()))
}

fn trimmed_past(info: &redis::Value, after: EventId) -> Option<String> {
    let id = |name: &str| {
        let id = info_field(info, name)?.parse::<EventId>().ok()?;
        Some(id.in_shard(after.shard))
    };
    let number = |name: &str| info_field(info, name).and_then(|s| s.parse::<u64>().ok());
    if let Some(deleted) = id("max-deleted-entry-id")
        && after < deleted
    {
        return Some(format!("entries up to {deleted} were deleted"));
    }
    let removed = match (number("entries-added"), number("length")) {
        (Some(added), Some(len)) => added > len,
        // Before Redis 7 the counters are missing: assume trimming happened.
        _ => true,
    };
    let first = id("recorded-first-entry-id")?;
    (removed && after < first).then(|| format!("the oldest retained entry is {first}"))
}

/// A text field of an XINFO STREAM reply (a flat key/value array in RESP2, a map in RESP3).
fn info_field(info: &redis::Value, name: &str) -> Option<String> {
    redis::from_redis_value_ref(info_value(info, name)?).ok()
}

/// A field of an XINFO STREAM reply, as Redis sent it.
fn info_value<'a>(info: &'a redis::Value, name: &str) -> Option<&'a redis::Value> {
    let pairs: Vec<(&redis::Value, &redis::Value)> = match info {
        redis::Value::Array(items) => items.chunks_exact(2).map(|p| (&p[0], &p[1])).collect(),
        redis::Value::Map(items) => items.iter().map(|(k, v)| (k, v)).collect(),
        _ => return None,
    };
    pairs.into_iter().find_map(|(k, v)| {
        let key: String = redis::from_redis_value_ref(k).ok()?;
        (key == name).then_some(v)
    })
}

/// Locks a mutex that a panicking holder cannot leave inconsistent (plain figures).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Maps one of Appwrite's `PUBLISH realtime` messages onto an event (id assigned by the caller)
/// and, with `permissionsChanged: true`, a permission change of its `userId`.
pub fn parse_appwrite(bytes: &[u8], default_project: &str) -> Result<Parsed, BadEntry> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| BadEntry(format!("not JSON: {e}")))?;
    let strings = |field: &str, v: Option<&Value>| -> Result<Option<Vec<String>>, BadEntry> {
        let Some(v) = v else { return Ok(None) };
        let list = v.as_array().and_then(|a| {
            a.iter()
                .map(|s| s.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
        });
        list.map(Some)
            .ok_or_else(|| BadEntry(format!("{field} must be an array of strings")))
    };
    let data = v
        .get("data")
        .ok_or_else(|| BadEntry("missing data".into()))?;
    // Appwrite always names the roles; without them an event must not become public.
    let roles =
        strings("roles", v.get("roles"))?.ok_or_else(|| BadEntry("missing field roles".into()))?;
    let request = PublishRequest {
        project: v.get("project").and_then(Value::as_str).map(str::to_owned),
        channels: strings("data.channels", data.get("channels"))?.unwrap_or_default(),
        events: strings("data.events", data.get("events"))?.unwrap_or_default(),
        roles: Some(roles),
        payload: data.get("payload").cloned().unwrap_or(Value::Null),
        permissions_changed: v.get("permissionsChanged") == Some(&Value::Bool(true)),
        user_id: v.get("userId").and_then(Value::as_str).map(str::to_owned),
    };
    let timestamp = data
        .get("timestamp")
        .and_then(Value::as_str)
        .map_or_else(timestamp_now, str::to_owned);
    let event = request
        .validate(default_project)
        .map_err(|e| BadEntry(e.to_string()))?;
    // The caller assigns the id.
    Ok(Parsed::new(event, String::new(), timestamp))
}

impl Bus for RedisBus {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn publish(&self, event: NewEvent) -> BoxFuture<'_, Result<String, BusError>> {
        Box::pin(async move {
            let json = |v: &[String]| serde_json::to_string(v).unwrap_or_else(|_| "[]".to_owned());
            let shard = self.shards.shard_of(&event.project);
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&self.streams[usize::from(shard)].key)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.settings.maxlen)
                .arg("*")
                .arg("project")
                .arg(&event.project)
                .arg("channels")
                .arg(json(&event.channels))
                .arg("events")
                .arg(json(&event.events))
                .arg("roles")
                .arg(json(&event.roles))
                .arg("payload")
                .arg(event.payload.to_string());
            if let Some(change) = &event.permissions_changed {
                cmd.arg("permissionsChanged")
                    .arg("true")
                    .arg("userId")
                    .arg(&change.user);
            }
            self.append(cmd, shard).await
        })
    }

    fn replay(
        &self,
        query: ReplayQuery,
    ) -> BoxFuture<'_, Result<Vec<Arc<EncodedEvent>>, ReplayError>> {
        Box::pin(self.replay_from(query))
    }

    fn ready(&self) -> bool {
        self.streams.iter().all(|s| s.up.load(Ordering::Acquire))
            && (self.settings.appwrite_channel.is_none() || self.pubsub_up.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> StreamId {
        StreamId {
            id: "1795393049647-3".into(),
            map: fields
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        redis::Value::BulkString(v.as_bytes().to_vec()),
                    )
                })
                .collect(),
            milliseconds_elapsed_from_delivery: None,
            delivered_count: None,
        }
    }

    #[test]
    fn entry_format() {
        let ev = parse_entry(
            &entry(&[("channels", r#"["files"]"#), ("payload", r#"{"a":1}"#)]),
            "console",
        )
        .unwrap()
        .event
        .unwrap();
        assert_eq!(ev.project, "console");
        assert_eq!(ev.roles, vec!["any"]);
        assert_eq!(ev.id, "1795393049647-3");
        assert_eq!(ev.timestamp, "2026-11-23T00:17:29.647+00:00");
        for bad in [
            vec![("payload", "{}")],
            vec![("channels", "files"), ("payload", "{}")],
            vec![("channels", r#"["files"]"#), ("payload", "not json")],
            vec![("channels", r#"["files"]"#)],
            vec![("channels", "[]"), ("payload", "{}")],
            vec![("channels", r#"["a"]"#), ("payload", "{}"), ("roles", "[]")],
            vec![
                ("channels", r#"["a"]"#),
                ("payload", "{}"),
                ("role", r#"["x"]"#),
            ],
        ] {
            assert!(parse_entry(&entry(&bad), "console").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_entry_of_a_stream_shard_names_it_and_must_belong_there() {
        let shards = StreamShards::new("s", 3);
        let project = (0..)
            .map(|n| format!("p{n}"))
            .find(|p| shards.shard_of(p) == 2)
            .unwrap();
        let fields = [
            ("channels", r#"["c"]"#),
            ("payload", "{}"),
            ("project", project.as_str()),
        ];
        let ev = parse_shard_entry(&entry(&fields), "console", &shards, 2)
            .unwrap()
            .event
            .unwrap();
        assert_eq!(ev.id, "2:1795393049647-3");
        assert!(parse_shard_entry(&entry(&fields), "console", &shards, 1).is_err());
        // The stream's own text of the id, even where it is not canonical.
        let mut odd = entry(&[("channels", r#"["c"]"#), ("payload", "{}")]);
        odd.id = "0001-0".into();
        assert_eq!(
            parse_entry(&odd, "console").unwrap().event.unwrap().id,
            "0001-0"
        );
    }

    #[test]
    fn appwrite_messages() {
        let ev = parse_appwrite(
            br#"{"project":"p1","roles":["any"],"permissionsChanged":false,"userId":null,"data":{"events":["e"],"channels":["documents"],"timestamp":"2026-08-21T12:00:00.123+00:00","payload":{"$id":"d"}}}"#,
            "console",
        )
        .unwrap()
        .event
        .unwrap();
        assert_eq!(ev.project, "p1");
        assert_eq!(ev.channels, vec!["documents"]);
        assert_eq!(ev.timestamp, "2026-08-21T12:00:00.123+00:00");
        assert!(parse_appwrite(br#"{"data":{"channels":["a"],"payload":{}}}"#, "c").is_err());
        let change = parse_appwrite(
            br#"{"project":"p1","roles":["team:t"],"permissionsChanged":true,"userId":"ann","data":{"events":["teams.t.memberships.m.delete"],"channels":["teams"],"payload":{"$id":"m"}}}"#,
            "console",
        )
        .unwrap();
        assert_eq!(
            change.permissions_changed,
            Some(PermissionChange {
                project: "p1".into(),
                user: "ann".into()
            })
        );
        assert!(change.event.is_some());
    }

    #[test]
    fn a_permission_change_alone_is_an_entry_without_an_event() {
        let parsed = parse_entry(
            &entry(&[("permissionsChanged", "true"), ("userId", "ann")]),
            "console",
        )
        .unwrap();
        assert_eq!(parsed.event, None);
        assert_eq!(
            parsed.permissions_changed.map(|c| (c.project, c.user)),
            Some(("console".into(), "ann".into()))
        );
        for bad in [
            vec![("permissionsChanged", "true")],
            vec![("permissionsChanged", "yes"), ("userId", "ann")],
            vec![("permissionsChanged", "false"), ("userId", "ann")],
        ] {
            assert!(parse_entry(&entry(&bad), "console").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_source_refuses_the_same_event_with_the_same_words() {
        let api = |json: &str| {
            serde_json::from_str::<PublishRequest>(json)
                .unwrap()
                .validate("c")
                .unwrap_err()
                .to_string()
        };
        let stream = |fields: &[(&str, &str)]| parse_entry(&entry(fields), "c").unwrap_err().0;
        let appwrite = |json: &str| parse_appwrite(json.as_bytes(), "c").unwrap_err().0;
        let cases = [
            (
                api(r#"{"channels":[],"payload":{}}"#),
                stream(&[("channels", "[]"), ("payload", "{}")]),
                appwrite(r#"{"roles":["any"],"data":{"channels":[],"payload":{}}}"#),
            ),
            (
                api(r#"{"channels":["a"],"payload":[1]}"#),
                stream(&[("channels", r#"["a"]"#), ("payload", "[1]")]),
                appwrite(r#"{"roles":["any"],"data":{"channels":["a"],"payload":[1]}}"#),
            ),
            (
                api(r#"{"channels":["a"],"payload":{},"roles":[""]}"#),
                stream(&[
                    ("channels", r#"["a"]"#),
                    ("payload", "{}"),
                    ("roles", r#"[""]"#),
                ]),
                appwrite(r#"{"roles":[""],"data":{"channels":["a"],"payload":{}}}"#),
            ),
        ];
        for (api, stream, appwrite) in cases {
            assert_eq!(api, stream);
            assert_eq!(api, appwrite);
        }
    }
}
