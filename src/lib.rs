//! herald: a realtime WebSocket gateway that speaks the Appwrite Realtime protocol.
//!
//! # Layout
//!
//! Data plane (one thread per shard, no locks, no tokio):
//! - [`shard`]: the epoll event loop of one core: accepts, reads, writes, timers.
//! - [`conn`]: one connection's state machine (upgrade, messages, close); no system calls.
//! - [`batch`]: one drain's events, staged per subscriber and written with one `writev` each.
//! - [`outbox`]: outbound frames and the bounded per-connection queue (vectored writes).
//! - [`registry`]: a shard's index from (project, channel) to its connections.
//!
//! Pure protocol code (bytes in, bytes out; testable without sockets):
//! - [`ws`]: RFC 6455: [`ws::handshake`], [`ws::frame`], [`ws::decoder`].
//! - [`protocol`]: the Appwrite Realtime messages and a connection's session.
//! - [`query`]: PHP-style URL query parsing.
//! - [`event`]: events and their encode-once form.
//!
//! Control plane (tokio, its own thread):
//! - [`hub`]: hands each encoded event to every shard.
//! - [`bus`]: event sources behind the [`bus::Bus`] trait ([`bus::embedded`] by default).
//! - [`bus::redis`]: Redis Streams, for many nodes and replay after restarts.
//! - [`history`]: recent events in memory, for replay to reconnecting clients.
//! - [`replay`]: serves shards' replay requests from the bus, off the data plane.
//! - [`admin`]: HTTP publish API, health, readiness, metrics.
//! - [`metrics`]: Prometheus metrics.
//!
//! Wiring: [`gateway`] starts everything in order; [`config`] holds every setting;
//! [`limits`] raises the open-file limit.
//!
//! Dependencies point one way: `ws`, `protocol`, `query`, `event` know nothing else; `conn`
//! uses them; `shard` drives `conn`; `bus` and `admin` reach shards only through `hub`.

pub mod admin;
pub mod batch;
pub mod bus;
pub mod config;
pub mod conn;
pub mod event;
pub mod gateway;
pub mod history;
pub mod hub;
pub mod limits;
pub mod mailbox;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod query;
pub mod registry;
pub mod replay;
pub mod shard;
pub mod ws;
