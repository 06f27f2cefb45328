//! herald: a realtime WebSocket gateway that speaks the Appwrite Realtime protocol.
//!
//! # Layout
//!
//! Data plane (one thread per shard, no locks, no tokio):
//! - [`shard`]: the event loop of one core and the I/O driver of its connections, on epoll
//!   or on io_uring (`--io`): accepts, reads, writes, interest or requests, timers. No
//!   protocol decisions.
//! - [`conn`]: one connection's state machine (upgrade, messages, which events it receives and
//!   with what tail, close); no system calls. Its module header is the driver contract: what
//!   the driver calls, in which order, and what it must do with each answer.
//! - [`batch`]: one drain's events, offered to each subscriber ([`batch::Verdict`]), staged and
//!   written with one `writev` per connection.
//! - [`outbox`]: outbound frames and the bounded per-connection queue (vectored writes).
//! - [`registry`]: a shard's index from (project, channel) to its connections, and its shared
//!   copies of names, role sets, routes and identities.
//! - [`uring`]: the io_uring mechanics of the second driver (`--io uring`): the ring, its
//!   shared receive buffers, sends in flight; `shard` drives connections with it.
//! - [`liveness`]: whether a peer's TCP has acknowledged what was sent (`TCP_INFO`), asked
//!   before an idle ping.
//! - [`admission`]: per-IP connection counts and handshake rates, shared by the shards.
//!
//! Between the planes:
//! - [`mailbox`]: every message that crosses between the control plane and the shards
//!   (commands, replay requests, answers and errors), both ends of a shard's queues, and their
//!   capacities. Both planes import it; neither imports the other.
//!
//! Pure protocol code (bytes in, bytes out; testable without sockets):
//! - [`ws`]: RFC 6455: [`ws::handshake`], [`ws::frame`], [`ws::decoder`].
//! - [`protocol`]: the Appwrite Realtime messages and a connection's session.
//! - [`query`]: PHP-style URL query parsing.
//! - [`filter`]: a subscription's Appwrite queries, compiled once and matched against event
//!   payloads; knows no connections, sockets or protocol messages.
//! - [`origin`]: which browser origins may connect (`--allowed-origins`).
//! - [`names`]: the id and name rules every input is checked against.
//! - [`distinct`]: short lists with their repeats removed, without a hash table.
//! - [`event`]: events and their encode-once form.
//! - [`identity`]: guests and users, their roles, JWT verification, the `account` channel.
//!
//! Control plane (tokio, its own thread):
//! - [`hub`]: hands each encoded event to every shard.
//! - [`bus`]: event sources behind the [`bus::Bus`] trait ([`bus::embedded`] by default), the
//!   one validation of events, and the [`bus::Outlet`] every bus delivers through.
//! - [`bus::redis`]: Redis Streams, for many nodes and replay after restarts;
//!   [`bus::lag`] counts how far its readers are behind.
//! - [`history`]: recent events in memory, for replay to reconnecting clients.
//! - [`doorbell`]: how a shard's request wakes the control-plane task that serves it.
//! - [`replay`]: serves shards' replay requests from the bus, off the data plane.
//! - [`resolver`]: resolves Appwrite sessions into users (`--auth-url`, `--appwrite-endpoint`)
//!   for shards, off the data plane, with a cache.
//! - [`admin`]: HTTP publish API, health, readiness, metrics, and the live dashboard page
//!   (`GET /`, fed by `/v1/stats`).
//! - [`metrics`]: Prometheus metrics.
//!
//! Wiring: [`gateway`] starts everything in order; [`config`] holds every setting;
//! [`limits`] raises the open-file limit; [`memory`] sets the allocator up and decides when a
//! thread gives freed pages back; [`doctor`] (`herald doctor`) checks a machine's limits for
//! a number of connections and touches nothing else.
//!
//! Dependencies point one way (`tests/layout.rs` checks it): `ws`, `filter`, `origin`, `names`,
//! `distinct` know nothing else; `query` knows `distinct`; `identity` knows `names`; `event` knows `identity`; `registry`
//! knows `identity`; `protocol` knows `event`, `identity`, `distinct` and `registry` (its interning);
//! `mailbox` knows `event`, `identity` and `filter`; `conn` uses those, `batch`, `outbox`
//! and `registry`; `shard` drives `conn` and `batch` and talks to the control plane only
//! through `mailbox`; `hub`, `replay` and `resolver` reach shards only through `mailbox`; buses reach
//! shards only through `hub`; `gateway` wires it all.

pub mod admin;
pub mod admission;
pub mod batch;
pub mod bus;
pub mod config;
pub mod conn;
pub mod distinct;
pub mod doctor;
pub mod doorbell;
pub mod event;
pub mod filter;
pub mod gateway;
pub mod history;
pub mod hub;
pub mod identity;
pub mod limits;
pub mod liveness;
pub mod mailbox;
pub mod memory;
pub mod metrics;
pub mod names;
pub mod origin;
pub mod outbox;
pub mod protocol;
pub mod query;
pub mod registry;
pub mod replay;
pub mod resolver;
pub mod shard;
pub mod uring;
pub mod ws;
