//! Every tunable of `herald serve`, with its default, flag and environment variable.
//!
//! Owns names, defaults and validation of settings; it must not start anything. The binary
//! parses it with clap (flags win over `HERALD_*` environment variables, which win over the
//! defaults); tests build it with [`Config::for_tests`].

use std::net::SocketAddr;
use std::time::Duration;

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// A network (`10.0.0.0/8`) or a single address (`10.0.0.7`).
fn ip_net(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is neither an IP address nor a network like 10.0.0.0/8"))
}

/// A setting that must never appear in logs or debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A key herald verifies signatures with: any non-empty text, never shown in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret(String);

impl SigningSecret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecret(..)")
    }
}

impl std::str::FromStr for SigningSecret {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("must not be empty");
        }
        Ok(Self(s.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Short tokens are guessable over a network; 16 characters is the least to accept.
        if s.len() < 16 {
            return Err("a token must be at least 16 characters");
        }
        Ok(Self(s.to_owned()))
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// TOML file of settings, keyed like the flags with underscores (`max_message_bytes = 64000`,
    /// `idle_timeout = "90s"`). Flags and HERALD_* variables win over it.
    #[arg(long, env = "HERALD_CONFIG")]
    pub config: Option<std::path::PathBuf>,

    /// Address of the WebSocket listener (every shard binds it with SO_REUSEPORT).
    #[arg(long, env = "HERALD_LISTEN", default_value = "0.0.0.0:9505")]
    pub listen: SocketAddr,

    /// Address of the admin HTTP listener (publish API, health, metrics, the dashboard page).
    /// Keep it private: a non-loopback address needs --admin-token.
    #[arg(long, env = "HERALD_ADMIN", default_value = "127.0.0.1:9506")]
    pub admin: SocketAddr,

    /// Bearer token the admin API requires on `POST /v1/events`, `/metrics` and `/v1/stats`
    /// (`Authorization: Bearer TOKEN`); `/healthz`, `/readyz` and the dashboard page (which
    /// holds no data) stay open. Required when --admin binds a non-loopback address.
    #[arg(long, env = "HERALD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,

    /// Secret that verifies HS256 JWTs (`jwt` URL parameter, `x-appwrite-jwt` header, or an
    /// `authentication` message with `jwt`): Appwrite's _APP_OPENSSL_KEY_V1, so tokens from
    /// `account.createJWT()` work unchanged, or the application's own.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<SigningSecret>,

    /// PEM file of a public key (RSA, EC or Ed25519) that verifies JWTs signed by the
    /// application's own backend.
    #[arg(long, env = "HERALD_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<std::path::PathBuf>,

    /// The application's session resolver: herald POSTs `{"project", "session"}` as JSON for
    /// every Appwrite session a client presents (cookie, `x-appwrite-session`,
    /// `x-fallback-cookies`, or the `authentication` message) and expects
    /// `{"userId", "roles", "verified", "user"}` or 401/403 (see the README).
    #[arg(long, env = "HERALD_AUTH_URL", conflicts_with = "appwrite_endpoint")]
    pub auth_url: Option<String>,

    /// Resolve Appwrite sessions with Appwrite itself: `GET /account` and the user's team
    /// memberships at this API endpoint (e.g. `https://appwrite.example.com/v1`), building
    /// Appwrite's role set.
    #[arg(long, env = "HERALD_APPWRITE_ENDPOINT")]
    pub appwrite_endpoint: Option<String>,

    /// Longest a session resolution may take; past it the client stays a guest.
    #[arg(long, env = "HERALD_AUTH_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub auth_timeout: Duration,

    /// How long a resolved session (or a refusal) is reused for the same session value; at
    /// most an hour. A permission change makes cached answers for that user stale at once.
    #[arg(long, env = "HERALD_AUTH_CACHE_TTL", default_value = "60s", value_parser = duration)]
    pub auth_cache_ttl: Duration,

    /// Session resolutions in flight at once (all shards together); the rest wait, up to
    /// 4,096, beyond which clients are told to retry.
    #[arg(long, env = "HERALD_AUTH_CONCURRENCY", default_value_t = 64)]
    pub auth_concurrency: usize,

    /// Number of shards (event-loop threads). Default: one per CPU core.
    #[arg(long, env = "HERALD_SHARDS")]
    pub shards: Option<usize>,

    /// How the shards do their I/O: `epoll`, or `uring` (io_uring: multishot receive into
    /// shared buffers, a fan-out's sends in one submission). Where io_uring cannot
    /// be set up (an old kernel, `kernel.io_uring_disabled`, a seccomp profile) herald says so
    /// and runs on epoll.
    #[arg(long, env = "HERALD_IO", value_enum, default_value_t = IoDriver::Epoll)]
    pub io: IoDriver,

    /// Most connections this process holds (all shards together). Default: what the open-file
    /// limit allows, keeping a reserve for the admin listener and the bus.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Connections one source address may hold at once; more get HTTP 429. 0: no limit.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS_PER_IP", default_value_t = 1000)]
    pub max_connections_per_ip: u32,

    /// New connections one source address may open per second, with bursts of ten seconds'
    /// worth; more get HTTP 429. 0: no limit.
    #[arg(long, env = "HERALD_HANDSHAKES_PER_IP", default_value_t = 100)]
    pub handshakes_per_ip: u32,

    /// Proxies (addresses or networks, comma-separated, e.g. 10.0.0.0/8,192.168.1.7) whose
    /// connections are counted under the client address they forward in X-Forwarded-For
    /// (rightmost untrusted entry) instead of their own.
    #[arg(long, env = "HERALD_TRUSTED_PROXIES", value_delimiter = ',', value_parser = ip_net)]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Project used when a client or publisher names none (Appwrite uses "console").
    #[arg(long, env = "HERALD_DEFAULT_PROJECT", default_value = "console")]
    pub default_project: String,

    /// Largest inbound WebSocket message on realtime connections; bigger ones close with 1009.
    #[arg(long, env = "HERALD_MAX_MESSAGE_BYTES", default_value_t = 64_000)]
    pub max_message_bytes: usize,

    /// Largest upgrade request head; bigger ones get HTTP 431.
    #[arg(long, env = "HERALD_MAX_HANDSHAKE_BYTES", default_value_t = 64_000)]
    pub max_handshake_bytes: usize,

    /// Time a client has to complete its upgrade request before it is dropped.
    #[arg(long, env = "HERALD_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub handshake_timeout: Duration,

    /// Time a client has to finish a WebSocket frame or fragmented message once it has begun
    /// sending it; then the connection is closed with 1008 and what was held is freed.
    #[arg(long, env = "HERALD_MESSAGE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub message_timeout: Duration,

    /// Browser origins allowed to open realtime connections, comma-separated: exact
    /// (`https://app.example.com`) or any subdomain (`https://*.example.com`). Other origins get
    /// HTTP 403; requests without an `Origin` header (non-browser clients) are allowed. Default:
    /// every origin.
    #[arg(long, env = "HERALD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<crate::origin::OriginPattern>,

    /// Client messages allowed per window (Appwrite: 32 per minute); 0 disables the limit.
    #[arg(long, env = "HERALD_MESSAGE_RATE", default_value_t = 32)]
    pub message_rate: u32,

    /// Bytes of client messages allowed per window, so that what a connection can make a shard
    /// parse is bounded in bytes as well as in messages (32 messages of 64 KB would be 2 MB a
    /// minute); beyond it messages get `error` 1013. 0 disables the limit.
    #[arg(long, env = "HERALD_MESSAGE_BYTES_RATE", default_value_t = 256 * 1024)]
    pub message_bytes_rate: u32,

    /// Window of the client message rate limit.
    #[arg(long, env = "HERALD_MESSAGE_RATE_WINDOW", default_value = "60s", value_parser = duration)]
    pub message_rate_window: Duration,

    /// A connection silent for this long gets a WebSocket ping, unless its TCP has just
    /// acknowledged everything sent to it (a client receiving events is heard that way).
    #[arg(long, env = "HERALD_PING_INTERVAL", default_value = "30s", value_parser = duration)]
    pub ping_interval: Duration,

    /// The kernel probes a silent connection with TCP keepalive shortly before
    /// --ping-interval (27 s of 30 s), and a client whose TCP answers is heard without a
    /// WebSocket ping: no wake-up of herald or the client (a million idle connections would
    /// otherwise take 33,000 pings and pongs a second). Clients behind a trusted proxy, and
    /// those whose TCP does not answer, are still pinged. Off by default: with no bytes on an
    /// idle connection, a proxy herald is not told about (nginx, a cloud load balancer) closes
    /// it at its own idle timeout, and a hung client whose machine answers is kept.
    #[arg(long, env = "HERALD_TCP_KEEPALIVE", default_value_t = false, action = clap::ArgAction::Set)]
    pub tcp_keepalive: bool,

    /// A connection silent for this long (no message, no pong, no acknowledgement of what it
    /// was sent) is closed; "0s" disables.
    #[arg(long, env = "HERALD_IDLE_TIMEOUT", default_value = "90s", value_parser = duration)]
    pub idle_timeout: Duration,

    /// Outbound bytes queued for one connection before it is closed as a slow consumer (1013).
    #[arg(long, env = "HERALD_MAX_OUTBOUND_BYTES", default_value_t = 1 << 20)]
    pub max_outbound_bytes: usize,

    /// Bytes all connections together may hold in queued output, unfinished messages and
    /// request heads, and events held for resumes (split evenly between shards). Over it, the
    /// largest holders are closed first (1009 for an unfinished message, 1013 for queued
    /// output). Default: a quarter of the machine's (or the cgroup's) memory; 0: no cap.
    #[arg(long, env = "HERALD_MAX_BUFFERED_BYTES")]
    pub max_buffered_bytes: Option<u64>,

    /// On SIGTERM/SIGINT, how long to wait for clients to finish the close handshake.
    #[arg(long, env = "HERALD_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub drain_timeout: Duration,

    /// Largest body accepted by POST /v1/events; bigger ones get HTTP 413.
    #[arg(long, env = "HERALD_MAX_PUBLISH_BYTES", default_value_t = 256 * 1024)]
    pub max_publish_bytes: usize,

    /// Subscriptions one connection may hold.
    #[arg(long, env = "HERALD_MAX_SUBSCRIPTIONS", default_value_t = 100)]
    pub max_subscriptions: usize,

    /// Distinct channels one connection may listen to over all its subscriptions: what its
    /// index entries cost in memory and every subscribe costs in shard time.
    #[arg(
        long,
        env = "HERALD_MAX_CHANNELS_PER_CONNECTION",
        default_value_t = 1000
    )]
    pub max_channels_per_connection: usize,

    /// SO_SNDBUF of client sockets, so that a client that stops reading holds at most about
    /// twice this in the kernel (Linux doubles it) before its own outbound queue fills and it
    /// is closed as a slow consumer. 0: the kernel's autotuning (up to net.ipv4.tcp_wmem's
    /// maximum, 4 MiB by default, per connection).
    #[arg(long, env = "HERALD_SEND_BUFFER_BYTES", default_value_t = 128 * 1024)]
    pub send_buffer_bytes: usize,

    /// Redis URL: use Redis Streams as the bus (many nodes, replay across restarts) instead of the
    /// embedded one, e.g. redis://127.0.0.1:6379.
    #[arg(long, env = "HERALD_REDIS")]
    pub redis: Option<String>,

    /// Redis Sentinels (host:port, comma-separated) to find the Redis primary through, instead
    /// of --redis: on every reconnect herald asks them where the primary is, so after a
    /// failover it continues on the new primary from the last event it delivered.
    #[arg(
        long,
        env = "HERALD_REDIS_SENTINEL",
        value_delimiter = ',',
        conflicts_with = "redis"
    )]
    pub redis_sentinel: Vec<String>,

    /// Redis Cluster nodes (host:port, comma-separated; any of them will do) to use as the bus
    /// instead of --redis: the stream is split over --stream-shards streams, by project, whose
    /// keys spread over the cluster's masters.
    #[arg(long, env = "HERALD_REDIS_CLUSTER", value_delimiter = ',',
          conflicts_with_all = ["redis", "redis_sentinel"])]
    pub redis_cluster: Vec<String>,

    /// Streams the events are split over, by project (each project's events stay in order in
    /// one of them). More than one spreads ingestion over a Redis Cluster's masters; every
    /// node reads them all. Changing it moves projects between streams: change it together with
    /// --stream (a new, empty stream), since resumes across the change are not supported.
    #[arg(long, env = "HERALD_STREAM_SHARDS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub stream_shards: u16,

    /// The name the Sentinels monitor the primary under (`sentinel monitor NAME ...`).
    #[arg(long, env = "HERALD_REDIS_MASTER", default_value = "mymaster")]
    pub redis_master: String,

    /// Replicas that must hold a published event before the publish API answers 200 (Redis
    /// WAIT after the XADD). 0: answer once the primary has it, which a failover can lose
    /// (replication is asynchronous). When fewer confirm within --publish-replicas-timeout
    /// the answer is 503 with the event's id: it is in the stream, but not safe yet.
    #[arg(long, env = "HERALD_PUBLISH_REPLICAS", default_value_t = 0)]
    pub publish_replicas: u32,

    /// How long a publish waits for --publish-replicas replicas.
    #[arg(long, env = "HERALD_PUBLISH_REPLICAS_TIMEOUT", default_value = "1s",
          value_parser = duration)]
    pub publish_replicas_timeout: Duration,

    /// Redis stream every node reads and publishes to.
    #[arg(long, env = "HERALD_STREAM", default_value = "herald:events")]
    pub stream: String,

    /// Approximate number of entries the stream retains (XADD MAXLEN ~).
    #[arg(long, env = "HERALD_STREAM_MAXLEN", default_value_t = 1_000_000)]
    pub stream_maxlen: usize,

    /// Also deliver Appwrite's Redis pub/sub messages (channel --appwrite-channel), so herald can
    /// stand in for Appwrite's realtime container. Requires --redis.
    #[arg(long, env = "HERALD_APPWRITE_PUBSUB")]
    pub appwrite_pubsub: bool,

    /// Appwrite's pub/sub channel.
    #[arg(long, env = "HERALD_APPWRITE_CHANNEL", default_value = "realtime")]
    pub appwrite_channel: String,

    /// Most events replayed to one resuming connection; further back it is told to resync.
    #[arg(long, env = "HERALD_REPLAY_MAX_EVENTS", default_value_t = 1000)]
    pub replay_max_events: usize,

    /// Most bytes replayed to one resuming connection.
    #[arg(long, env = "HERALD_REPLAY_MAX_BYTES", default_value_t = 512 * 1024)]
    pub replay_max_bytes: usize,

    /// Most stream entries one resume may read from Redis looking for its events (beyond the
    /// in-memory history); further back it is told to resync (4010), whatever it matched.
    #[arg(long, env = "HERALD_REPLAY_MAX_SCAN", default_value_t = 100_000,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub replay_max_scan: usize,

    /// Recent events kept in memory for replay (the embedded bus's whole history; with
    /// --stream-shards, shared equally by the streams, as are --history-bytes).
    #[arg(long, env = "HERALD_HISTORY_EVENTS", default_value_t = 10_000)]
    pub history_events: usize,

    /// Bytes of recent events kept in memory for replay.
    #[arg(long, env = "HERALD_HISTORY_BYTES", default_value_t = 64 << 20)]
    pub history_bytes: usize,

    /// Serve an echo endpoint at this path, for RFC 6455 conformance testing only (Autobahn).
    #[arg(long, env = "HERALD_ECHO_PATH")]
    pub echo_path: Option<String>,

    /// Largest message on the echo endpoint (Autobahn sends up to 16 MiB).
    #[arg(long, env = "HERALD_ECHO_MAX_MESSAGE_BYTES", default_value_t = 64 << 20)]
    pub echo_max_message_bytes: usize,
}

/// A shard's I/O driver (`--io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoDriver {
    Epoll,
    Uring,
}

impl std::fmt::Display for IoDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoDriver::Epoll => "epoll",
            IoDriver::Uring => "io_uring",
        })
    }
}

/// Loads a TOML config file into `HERALD_*` environment variables that are not set yet, so that
/// clap's precedence becomes: flags, then environment, then the file, then defaults.
///
/// Must run before any other thread starts (it changes the process environment).
pub fn load_file_into_env(path: &std::path::Path) -> Result<(), ConfigError> {
    use clap::CommandFactory;
    #[derive(clap::Parser)]
    struct Wrap {
        #[command(flatten)]
        config: Config,
    }
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.display().to_string(),
        source: e,
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    let cmd = Wrap::command();
    let known: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_long().map(|l| l.replace('-', "_")))
        .filter(|k| k != "config")
        .collect();
    for (key, value) in table {
        if !known.contains(&key) {
            return Err(ConfigError::UnknownKey {
                path: path.display().to_string(),
                key,
                known: known.join(", "),
            });
        }
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(_) | toml::Value::Boolean(_) | toml::Value::Float(_) => {
                value.to_string()
            }
            _ => {
                return Err(ConfigError::Parse {
                    path: path.display().to_string(),
                    message: format!("{key} must be a string, number or boolean"),
                });
            }
        };
        let var = format!("HERALD_{}", key.to_uppercase());
        if std::env::var_os(&var).is_none() {
            // SAFETY: called from `main` before any thread exists, as documented above.
            unsafe { std::env::set_var(var, value) };
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("unknown setting `{key}` in {path}; known settings: {known}")]
    UnknownKey {
        path: String,
        key: String,
        known: String,
    },
}

impl Config {
    pub fn shard_count(&self) -> usize {
        self.shards
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// The cap on buffered bytes across all shards (`--max-buffered-bytes`), `None` for no cap.
    pub fn buffered_cap(&self) -> Option<u64> {
        match self.max_buffered_bytes {
            Some(0) => None,
            Some(n) => Some(n),
            None => Some(crate::limits::memory_bytes().map_or(4 << 30, |m| m / 4)),
        }
    }

    /// Defaults with both listeners on ephemeral loopback ports.
    pub fn for_tests() -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            config: Config,
        }
        let mut c = Wrap::parse_from(["herald"]).config;
        c.listen = "127.0.0.1:0".parse().expect("valid address");
        c.admin = "127.0.0.1:0".parse().expect("valid address");
        c
    }
}
