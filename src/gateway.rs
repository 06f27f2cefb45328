//! Start-up wiring: the one place that knows every part.
//!
//! Owns the order of start-up and shutdown: raise the fd limit, bind the shards' listeners,
//! start shard threads, choose the bus, start the control plane (tokio: admin HTTP, signals),
//! then wait. Nothing else in the crate constructs shards or buses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;

use crate::admin::{AdminState, router};
use crate::admission::IpLimits;
use crate::bus::Bus;
use crate::bus::embedded::EmbeddedBus;
use crate::bus::redis::{Primary, RedisBus, RedisSettings};
use crate::config::{Config, IoDriver};
use crate::hub::Hub;
use crate::identity::JwtVerifier;
use crate::limits::{self, FdLimit};
use crate::mailbox::{
    REPLAY_QUEUE_CAPACITY, RESOLVE_QUEUE_CAPACITY, ReplaySender, ResolveReceiver, ShardHandle,
    replay_channel, request_channel,
};
use crate::metrics::Metrics;
use crate::replay::ReplayBell;
use crate::resolver::{Backend, ResolveBell, Resolver, ResolverSettings};
use crate::shard::{Common, ConnectionLimit, Shard};

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set TCP keepalive on the listener (--tcp-keepalive false goes without): {0}")]
    Keepalive(std::io::Error),
    #[error("cannot start shard {shard}: {source}")]
    Shard {
        shard: usize,
        source: std::io::Error,
    },
    #[error("cannot start the control plane: {0}")]
    ControlPlane(std::io::Error),
    #[error("invalid Redis settings: {0}")]
    Redis(String),
    #[error(
        "--admin {0} is not a loopback address: anyone who reaches it could publish; set \
         --admin-token (HERALD_ADMIN_TOKEN) or bind 127.0.0.1"
    )]
    AdminUnprotected(SocketAddr),
    #[error(transparent)]
    Jwt(crate::identity::KeyError),
    #[error("cannot set up the session resolver: {0}")]
    Resolver(String),
    #[error("shard {0} stopped unexpectedly")]
    ShardDied(usize),
    #[error("interrupted by a second signal before connections were closed")]
    Interrupted,
    #[error("shard threads did not finish within {0:?} of the shutdown request")]
    DrainTimedOut(Duration),
}

/// Listen backlog per shard; the kernel caps it at net.core.somaxconn (see sysctl/herald.conf).
pub const LISTEN_BACKLOG: i32 = 65_535;

/// A non-blocking listener on `addr` that other sockets may join (`SO_REUSEPORT`), as every
/// shard binds it; the benchmark baselines bind theirs the same way.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// How long a connection is silent before the kernel probes it (`--tcp-keepalive`): a tenth of
/// the ping interval (at least a second) before an idle ping would be due, so that the answer
/// is in by then even over a slow link, and no sooner, since at a million connections every
/// second shorter is more probes (30 s: one every 27 s).
pub fn keepalive_idle(config: &Config) -> Option<Duration> {
    // In whole seconds rounded up, as the connection counts the ping interval.
    let ping = u64::from(crate::conn::secs(config.ping_interval));
    let idle = ping
        .saturating_sub((ping / 10).max(1))
        .clamp(1, KEEPALIVE_MAX_SECS);
    (config.tcp_keepalive && ping > 0).then(|| Duration::from_secs(idle))
}

/// The longest TCP_KEEPIDLE and TCP_KEEPINTVL Linux accepts.
const KEEPALIVE_MAX_SECS: u64 = 32_767;

/// TCP keepalive on a listener, which every connection it accepts inherits: a peer whose TCP
/// answers the probe has acknowledged everything, which is what the idle ping asks
/// ([`crate::liveness`]), at no cost to either application.
fn probe_idle_peers(listener: &std::net::TcpListener, idle: Duration) -> std::io::Result<()> {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(idle);
    socket2::SockRef::from(listener).set_tcp_keepalive(&keepalive)
}

/// What a running gateway reports about itself.
#[derive(Debug, Clone)]
pub struct StartupInfo {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub shards: usize,
    pub fd_limit: Option<FdLimit>,
    /// Connections this process will hold before it stops accepting.
    pub capacity: usize,
    pub bus: &'static str,
    /// The shards' I/O driver, after any fallback.
    pub io: IoDriver,
}

impl std::fmt::Display for StartupInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "herald listening on ws://{}/v1/realtime ({} shards on {}, capacity {} connections, bus: {}); admin on http://{}",
            self.listen, self.shards, self.io, self.capacity, self.bus, self.admin
        )
    }
}

/// Runs a gateway until SIGTERM/SIGINT and a graceful drain. `on_start` is called once
/// everything listens.
pub fn run(mut config: Config, on_start: impl FnOnce(&StartupInfo)) -> Result<(), GatewayError> {
    if config.io == IoDriver::Uring
        && let Err(why) = crate::uring::probe()
    {
        tracing::warn!("--io uring: io_uring cannot be used here ({why}); running on epoll");
        config.io = IoDriver::Epoll;
    }
    let on_redis = config.redis.is_some()
        || !config.redis_sentinel.is_empty()
        || !config.redis_cluster.is_empty();
    if !config.redis_cluster.is_empty() && (config.publish_replicas > 0 || config.appwrite_pubsub) {
        return Err(GatewayError::Redis(
            "--redis-cluster does not support --publish-replicas or --appwrite-pubsub yet \
             (WAIT and pub/sub would have to follow each stream's master)"
                .into(),
        ));
    }
    if config.stream_shards > 1 && !on_redis {
        return Err(GatewayError::Redis(
            "--stream-shards needs a Redis bus (--redis-cluster, --redis or --redis-sentinel)"
                .into(),
        ));
    }
    if config.appwrite_pubsub && !on_redis {
        return Err(GatewayError::Redis(
            "--appwrite-pubsub needs --redis (Appwrite's pub/sub lives in Redis)".into(),
        ));
    }
    if config.publish_replicas > 0 && !on_redis {
        return Err(GatewayError::Redis(
            "--publish-replicas needs --redis or --redis-sentinel (the embedded bus has no \
             replicas)"
                .into(),
        ));
    }
    if !config.admin.ip().is_loopback() && config.admin_token.is_none() {
        return Err(GatewayError::AdminUnprotected(config.admin));
    }
    let metrics = Metrics::new();
    let fd_limit = raise_fd_limit(&metrics);
    let capacity = capacity(config.max_connections, fd_limit);
    match config.buffered_cap() {
        Some(cap) => tracing::info!(
            bytes = cap,
            "connections may hold {} MiB of queued output and unfinished messages in total \
             (--max-buffered-bytes); the largest holders are closed beyond it",
            cap >> 20
        ),
        None => tracing::warn!("--max-buffered-bytes 0: no cap on what connections may hold"),
    }
    let (listen, listeners) = bind_listeners(config.listen, config.shard_count())?;
    if let Some(idle) = keepalive_idle(&config) {
        for listener in &listeners {
            probe_idle_peers(listener, idle).map_err(GatewayError::Keepalive)?;
        }
    }

    let bell = Arc::new(ReplayBell::default());
    let (replay_tx, replay_rx) = replay_channel(bell.clone(), REPLAY_QUEUE_CAPACITY);
    let jwt = JwtVerifier::new(
        config.jwt_secret.as_ref().map(|s| s.expose()),
        config.jwt_public_key.as_deref(),
    )
    .map_err(GatewayError::Jwt)?;
    let backend = session_backend(&config)?;
    let resolve_bell = Arc::new(ResolveBell::default());
    let (resolve_tx, resolve_rx) = match &backend {
        Some(_) => {
            let (tx, rx) = request_channel(resolve_bell.clone(), RESOLVE_QUEUE_CAPACITY);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let common = Common {
        limit: Arc::new(ConnectionLimit::new(capacity)),
        ip_limits: Arc::new(IpLimits::new(
            config.max_connections_per_ip,
            config.handshakes_per_ip,
            config.trusted_proxies.clone(),
        )),
        jwt: Arc::new(jwt),
        resolve_tx,
    };
    let (handles, threads) = start_shards(listeners, &config, &metrics, &common, replay_tx)?;
    let hub = Arc::new(Hub::new(handles));
    let ChosenBus { bus, redis } = choose_bus(&config, &hub, &metrics)?;
    crate::replay::spawn(replay_rx, bell, bus.clone(), hub.clone(), metrics.clone())
        .map_err(GatewayError::ControlPlane)?;
    start_resolver(backend, resolve_rx, resolve_bell, &config, &hub, &metrics)?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("herald-control")
        .build()
        .map_err(GatewayError::ControlPlane)?;
    let admin_listener = runtime
        .block_on(tokio::net::TcpListener::bind(config.admin))
        .map_err(|source| GatewayError::Bind {
            addr: config.admin,
            source,
        })?;
    let admin = admin_listener
        .local_addr()
        .map_err(GatewayError::ControlPlane)?;
    on_start(&StartupInfo {
        listen,
        admin,
        shards: threads.len(),
        fd_limit,
        capacity,
        bus: bus.name(),
        io: config.io,
    });

    let state = AdminState {
        bus: bus.clone(),
        metrics: metrics.clone(),
        default_project: config.default_project.clone(),
        max_publish_bytes: config.max_publish_bytes,
        token: config.admin_token.clone().map(Arc::new),
        hub: hub.clone(),
    };
    let drain = config.drain_timeout;
    let outcome = runtime.block_on(async move {
        tokio::spawn(crate::doorbell::give_back_when_quiet());
        if let Some(r) = &redis {
            r.spawn_workers();
        }
        tokio::spawn(release_startup_code(bus.clone()));
        let mut signals = StopSignals::new();
        // The admin API keeps serving through the drain: /readyz answers 503 ("draining") so
        // load balancers send no one new, /metrics shows the connections going; it stops with
        // the runtime once the shards have.
        let mut admin = tokio::spawn(axum::serve(admin_listener, router(state)).into_future());
        let stop = wait_for_stop(&mut admin, &hub, &mut signals).await;
        tracing::info!(?drain, "shutting down: closing connections with 1001");
        hub.shutdown(drain);
        tokio::select! {
            () = signals.next() => {
                tracing::warn!("second signal: exiting without waiting for connections to close");
                return Err(GatewayError::Interrupted);
            }
            ended = wait_for_threads(&threads, drain + SHUTDOWN_GRACE) => {
                if !ended {
                    return Err(GatewayError::DrainTimedOut(drain + SHUTDOWN_GRACE));
                }
            }
        }
        stop
    });
    outcome?;
    tracing::info!("herald stopped");
    Ok(())
}

/// The session resolver `--auth-url` or `--appwrite-endpoint` names, checked.
fn session_backend(config: &Config) -> Result<Option<Arc<dyn Backend>>, GatewayError> {
    for (flag, url) in [
        ("--auth-url", &config.auth_url),
        ("--appwrite-endpoint", &config.appwrite_endpoint),
    ] {
        if let Some(url) = url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(GatewayError::Resolver(format!(
                "{flag} {url:?} must be an http:// or https:// URL"
            )));
        }
    }
    if config.auth_cache_ttl > crate::resolver::MAX_CACHE_TTL {
        return Err(GatewayError::Resolver(
            "--auth-cache-ttl must be at most 1h".into(),
        ));
    }
    crate::resolver::backend(
        config.auth_url.as_deref(),
        config.appwrite_endpoint.as_deref(),
        config.auth_timeout,
    )
    .map_err(|e| GatewayError::Resolver(e.to_string()))
}

/// Starts the resolver thread when a backend is configured.
fn start_resolver(
    backend: Option<Arc<dyn Backend>>,
    requests: Option<ResolveReceiver>,
    bell: Arc<ResolveBell>,
    config: &Config,
    hub: &Arc<Hub>,
    metrics: &Metrics,
) -> Result<(), GatewayError> {
    let (Some(backend), Some(requests)) = (backend, requests) else {
        return Ok(());
    };
    let settings = ResolverSettings {
        timeout: config.auth_timeout,
        cache_ttl: config.auth_cache_ttl,
        concurrency: config.auth_concurrency,
    };
    let resolver = Arc::new(Resolver::new(
        backend,
        settings,
        hub.clone(),
        metrics.clone(),
    ));
    tracing::info!(
        backend = resolver.backend_name(),
        timeout = ?config.auth_timeout,
        cache_ttl = ?config.auth_cache_ttl,
        concurrency = config.auth_concurrency,
        "Appwrite sessions are resolved off the shards"
    );
    if config.allowed_origins.is_empty() {
        tracing::warn!(
            "sessions in cookies are resolved but any web page may connect: a page on another \
             site could open connections with its visitors' cookies; set --allowed-origins"
        );
    }
    resolver
        .spawn(requests, bell)
        .map_err(GatewayError::ControlPlane)
}

/// Beyond the drain timeout, how long shard threads get to finish before herald exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Waits until every thread has ended (true) or `limit` has passed (false).
async fn wait_for_threads(threads: &[JoinHandle<()>], limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !threads.iter().all(JoinHandle::is_finished) {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Once the bus is connected (or has had ten seconds to), start-up is over: its code need not
/// stay mapped ([`crate::memory::release_startup_code`]).
async fn release_startup_code(bus: Arc<dyn Bus>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !bus.ready() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What the first second of serving runs (the first accepts, the admin API's first request)
    // would come straight back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    crate::memory::release_startup_code();
}

fn raise_fd_limit(metrics: &Metrics) -> Option<FdLimit> {
    match limits::raise_nofile() {
        Ok(l) => {
            metrics
                .fd_limit
                .set(i64::try_from(l.soft).unwrap_or(i64::MAX));
            Some(l)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise RLIMIT_NOFILE");
            None
        }
    }
}

/// Connections this process holds before it stops accepting.
fn capacity(max_connections: Option<usize>, fd_limit: Option<FdLimit>) -> usize {
    let fd_capacity = fd_limit.map(|l| usize::try_from(l.capacity()).unwrap_or(usize::MAX));
    match (max_connections, fd_capacity) {
        (Some(max), Some(fds)) if max > fds => {
            tracing::warn!(
                max_connections = max,
                fd_capacity = fds,
                "--max-connections exceeds what the open-file limit allows; accepts will fail with EMFILE before it is reached"
            );
            max
        }
        (Some(max), _) => max,
        (None, Some(fds)) => fds,
        (None, None) => usize::MAX,
    }
}

/// One `SO_REUSEPORT` listener per shard, all on the same address; returns that address.
fn bind_listeners(
    addr: SocketAddr,
    shards: usize,
) -> Result<(SocketAddr, Vec<std::net::TcpListener>), GatewayError> {
    let bind_error = |addr| move |source| GatewayError::Bind { addr, source };
    let first = bind_reuseport(addr).map_err(bind_error(addr))?;
    // With port 0 the kernel picks a port; the other shards must join that same port.
    let listen = first.local_addr().map_err(bind_error(addr))?;
    let mut listeners = vec![first];
    for _ in 1..shards {
        listeners.push(bind_reuseport(listen).map_err(bind_error(listen))?);
    }
    Ok((listen, listeners))
}

type Shards = (Vec<ShardHandle>, Vec<JoinHandle<()>>);

/// Starts one shard thread per listener; returns their handles and threads.
fn start_shards(
    listeners: Vec<std::net::TcpListener>,
    config: &Config,
    metrics: &Metrics,
    common: &Common,
    replay_tx: ReplaySender,
) -> Result<Shards, GatewayError> {
    let mut handles = Vec::with_capacity(listeners.len());
    let mut threads = Vec::with_capacity(listeners.len());
    for (id, listener) in listeners.into_iter().enumerate() {
        let (shard, handle) = Shard::new(
            id,
            listener,
            config,
            metrics.clone(),
            common.clone(),
            replay_tx.clone(),
        )
        .map_err(|source| GatewayError::Shard { shard: id, source })?;
        handles.push(handle);
        let t = std::thread::Builder::new()
            .name(format!("herald-shard-{id}"))
            .spawn(move || shard.run())
            .map_err(|source| GatewayError::Shard { shard: id, source })?;
        threads.push(t);
    }
    Ok((handles, threads))
}

/// The bus every source publishes through, and the Redis bus again by its own type when it is
/// the one (its workers start on the runtime).
struct ChosenBus {
    bus: Arc<dyn Bus>,
    redis: Option<Arc<RedisBus>>,
}

/// The Redis bus when `--redis` is set, the embedded bus otherwise.
fn choose_bus(
    config: &Config,
    hub: &Arc<Hub>,
    metrics: &Metrics,
) -> Result<ChosenBus, GatewayError> {
    let primary = match &config.redis {
        Some(url) => Primary::Url(url.clone()),
        None if !config.redis_cluster.is_empty() => Primary::Cluster(config.redis_cluster.clone()),
        None if !config.redis_sentinel.is_empty() => Primary::Sentinel {
            addresses: config.redis_sentinel.clone(),
            master: config.redis_master.clone(),
        },
        None => {
            let embedded = EmbeddedBus::new(
                hub.clone(),
                metrics.clone(),
                config.history_events,
                config.history_bytes,
            );
            return Ok(ChosenBus {
                bus: Arc::new(embedded),
                redis: None,
            });
        }
    };
    let settings = RedisSettings {
        primary,
        stream_shards: config.stream_shards,
        publish_replicas: config.publish_replicas,
        publish_replicas_timeout: config.publish_replicas_timeout,
        stream: config.stream.clone(),
        maxlen: config.stream_maxlen,
        default_project: config.default_project.clone(),
        appwrite_channel: config
            .appwrite_pubsub
            .then(|| config.appwrite_channel.clone()),
        history_events: config.history_events,
        history_bytes: config.history_bytes,
        replay_max_scan: config.replay_max_scan,
    };
    let redis = RedisBus::new(settings, hub.clone(), metrics.clone())
        .map_err(|e| GatewayError::Redis(e.to_string()))?;
    Ok(ChosenBus {
        bus: redis.clone(),
        redis: Some(redis),
    })
}

/// Waits for SIGTERM/SIGINT or the admin server's end (`Ok`), or for a shard thread to die
/// (`Err`: the process must exit non-zero so that a supervisor restarts it).
async fn wait_for_stop(
    admin: &mut tokio::task::JoinHandle<std::io::Result<()>>,
    hub: &Hub,
    signals: &mut StopSignals,
) -> Result<(), GatewayError> {
    let dead_shard = async {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if let Some(id) = hub.dead_shard() {
                return id;
            }
        }
    };
    tokio::select! {
        r = admin => {
            match r {
                Ok(Err(e)) => tracing::error!(error = %e, "admin listener failed"),
                Err(e) => tracing::error!(error = %e, "admin listener panicked"),
                Ok(Ok(())) => {}
            }
            Ok(())
        }
        () = signals.next() => Ok(()),
        id = dead_shard => {
            tracing::error!(shard = id, "a shard thread stopped unexpectedly; shutting down");
            Err(GatewayError::ShardDied(id))
        }
    }
}

/// SIGTERM and SIGINT, registered once so that a second one is seen too.
struct StopSignals {
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl StopSignals {
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let streams = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Some((term, int)),
            _ => None,
        };
        Self { streams }
    }

    async fn next(&mut self) {
        let Some((term, int)) = self.streams.as_mut() else {
            // Without signal handlers the process can still be stopped, just not gracefully.
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_probes_come_shortly_before_a_ping_is_due() {
        let mut c = Config::for_tests();
        let idle = |c: &Config| keepalive_idle(c).map(|d| d.as_secs());
        assert_eq!(idle(&c), None, "off by default");
        c.tcp_keepalive = true;
        assert_eq!(idle(&c), Some(27), "the default 30 s ping interval");
        c.ping_interval = Duration::from_millis(1500);
        assert_eq!(idle(&c), Some(1), "2 s, as the connection rounds it");
        c.ping_interval = Duration::from_secs(86_400);
        assert_eq!(idle(&c), Some(32_767), "the kernel's most");
        c.ping_interval = Duration::from_secs(3);
        assert_eq!(idle(&c), Some(2));
        c.ping_interval = Duration::from_secs(1);
        assert_eq!(idle(&c), Some(1));
        c.ping_interval = Duration::ZERO;
        assert_eq!(idle(&c), None, "no pings, no probes");
        c.ping_interval = Duration::from_secs(30);
        c.tcp_keepalive = false;
        assert_eq!(idle(&c), None);
    }
}
