//! A shard: one OS thread running one event loop over the connections it accepted, on epoll
//! (mio) or on io_uring (`--io uring`, [`uring`]).
//!
//! Owns its `SO_REUSEPORT` listener, its connections (in a slab), its channel index and its
//! scratch buffers, and is the only thread that touches them: no locks on the hot path. It
//! receives events, permission changes, shutdown and answers through its [`ShardInbox`]
//! (crossbeam channels plus a mio waker) and asks for replays and session resolutions through a
//! [`ReplaySender`] and a [`ResolveSender`]. It is the I/O driver of
//! `conn.rs` (see the contract there): it does the system calls and keeps epoll interest (or
//! io_uring requests), and makes no protocol decision (who receives an event, with what tail, when to close). It must
//! not know about HTTP, Redis or the bus.

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::admission::{IpLimits, IpTicket, Refusal};
use crate::batch::{Batch, Verdict, Written};
use crate::config::{Config, IoDriver};
use crate::conn::{ConnConfig, Connection, Context, Incident, Next, Shared};
use crate::identity::JwtVerifier;
use crate::mailbox::{
    Answer, Command, IdentityAnswer, Refused, ReplayAnswer, ReplayError, ReplayRequest,
    ReplaySender, ResolveError, ResolveSender, ShardHandle, ShardInbox, shard_mailbox,
};
use crate::memory::AfterWork;
use crate::metrics::Metrics;

mod uring;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
/// Events taken from the inbound queue before frames are flushed and sockets polled again.
const COMMAND_BATCH: usize = 256;
// The io_uring driver sends a connection's frames of one batch as one SENDMSG of 2k + 1
// vectors (`batch::Staged`), with no split: Linux takes at most 1024 (UIO_MAXIOV).
const _: () = assert!(2 * COMMAND_BATCH < 1024);
/// Connections accepted per loop iteration, so an accept storm cannot starve delivery.
const ACCEPT_BATCH: usize = 512;
/// Socket reads per readable event: enough for normal traffic, bounded against floods.
const READS_PER_EVENT: usize = 16;

/// How far a readiness event's reads go (edge-triggered epoll reports new arrivals only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reads {
    None,
    /// A read shorter than the buffer ends them: the socket was drained, and epoll reports
    /// whatever comes after. (TCP urgent data also stops a read short with more queued; no
    /// WebSocket client sends it, and one that does only stalls its own connection until it
    /// sends again.)
    UntilShort,
    /// Until the socket says it would block: data or a FIN may be waiting that raised its
    /// edge before (a resumed read, or an event that already reported the FIN or an error).
    UntilBlocked,
}
const SCRATCH_BYTES: usize = 64 * 1024;
/// Replay answers written per loop iteration, after live events.
const ANSWERS_PER_ITERATION: usize = 16;
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const TICK: Duration = Duration::from_secs(1);
/// How long a shard keeps delivering the events already queued once shutdown is requested,
/// before it closes its connections.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(1);
/// Connections refused at accept (429) that may linger at once per shard, so that a flood of
/// them holds at most this many of the process's connection slots.
const REFUSED_LINGERING_MAX: usize = 256;

enum AcceptRefusal {
    ConnectionLimit,
    FdLimit,
    Other(io::Error),
}

/// The process-wide connection cap, shared by all shards. Touched once per accept and once per
/// close, never per message.
#[derive(Debug)]
pub struct ConnectionLimit {
    max: usize,
    open: AtomicUsize,
}

impl ConnectionLimit {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: AtomicUsize::new(0),
        }
    }

    fn try_acquire(&self) -> bool {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    /// Connections that may still be taken.
    fn room(&self) -> usize {
        self.max.saturating_sub(self.open.load(Ordering::Acquire))
    }
}

struct Slot {
    stream: TcpStream,
    conn: Connection,
    /// The source address's count this connection holds, handed back at close.
    ip: IpTicket,
    /// The connection's [`Connection::held_bytes`] as last counted in the shard's total.
    held: u32,
    /// The driver's flags (`FLAG_*`), one byte: with five bools the slot grew by 8 bytes a
    /// connection.
    flags: u8,
}

/// Registered for writability (epoll), or a writability poll armed (io_uring): the
/// connection's output is blocked.
const FLAG_WANTS_WRITE: u8 = 1;
/// Reading stopped for back-pressure; `settle` resumes it once the output drains.
const FLAG_READ_PAUSED: u8 = 2;
/// Refused at accept (429) and lingering until the peer reads the answer.
const FLAG_REFUSED: u8 = 4;
/// io_uring: a multishot receive is armed.
const FLAG_RECV_ARMED: u8 = 8;
/// io_uring: a send is in flight; output waits behind it.
const FLAG_SENDING: u8 = 16;

macro_rules! slot_flags {
    ($($get:ident, $set:ident, $flag:ident;)*) => {
        impl Slot {
            $(
                fn $get(&self) -> bool {
                    self.flags & $flag != 0
                }

                fn $set(&mut self, on: bool) {
                    if on {
                        self.flags |= $flag;
                    } else {
                        self.flags &= !$flag;
                    }
                }
            )*
        }
    };
}

slot_flags! {
    wants_write, set_wants_write, FLAG_WANTS_WRITE;
    read_paused, set_read_paused, FLAG_READ_PAUSED;
    refused, set_refused, FLAG_REFUSED;
    recv_armed, set_recv_armed, FLAG_RECV_ARMED;
    sending, set_sending, FLAG_SENDING;
}

/// What every shard of the process shares, handed to [`Shard::new`].
#[derive(Debug, Clone)]
pub struct Common {
    pub limit: Arc<ConnectionLimit>,
    pub ip_limits: Arc<IpLimits>,
    pub jwt: Arc<JwtVerifier>,
    /// Where sessions are resolved, when a resolver is configured.
    pub resolve_tx: Option<ResolveSender>,
}

/// How long a shard remembers a permission change for answers fetched before it: far longer
/// than an answer can be on its way (the resolver's timeout plus its queue).
const RECENT_CHANGE_MEMORY: Duration = Duration::from_secs(600);

/// Per-shard metric handles, taken once so the loop only touches atomics.
struct ShardMetrics {
    metrics: Metrics,
    connections: prometheus::IntGauge,
    accepted: prometheus::IntCounter,
    delivered: prometheus::IntCounter,
    slow: prometheus::IntCounter,
    buffered: prometheus::IntGauge,
    rate_limited: prometheus::IntCounter,
    idle_closed: prometheus::IntCounter,
    pings_sent: prometheus::IntCounter,
    pings_saved: prometheus::IntCounter,
    queue: prometheus::IntGauge,
    fanout_latency: prometheus::Histogram,
}

impl ShardMetrics {
    fn new(id: usize, metrics: Metrics) -> Self {
        let label = id.to_string();
        Self {
            connections: metrics.connections.with_label_values(&[&label]),
            accepted: metrics.accepted.with_label_values(&[&label]),
            delivered: metrics.events_delivered.with_label_values(&[&label]),
            slow: metrics.slow_consumers.with_label_values(&[&label]),
            buffered: metrics.buffered_bytes.with_label_values(&[&label]),
            rate_limited: metrics.rate_limited.with_label_values(&[&label]),
            idle_closed: metrics.idle_closed.with_label_values(&[&label]),
            pings_sent: metrics.idle_pings.with_label_values(&["sent"]),
            pings_saved: metrics.idle_pings.with_label_values(&["saved"]),
            queue: metrics.shard_queue.with_label_values(&[&label]),
            fanout_latency: metrics.fanout_latency.with_label_values(&[&label]),
            metrics,
        }
    }

    fn record(&self, incident: Incident) {
        match incident {
            Incident::Rejected(reason) => self
                .metrics
                .handshake_rejected
                .with_label_values(&[reason])
                .inc(),
            Incident::ProtocolError(code) => self
                .metrics
                .protocol_errors
                .with_label_values(&[&code.to_string()])
                .inc(),
        }
    }
}

/// How a shard does its I/O.
enum Io {
    Epoll {
        poll: Poll,
        listener: Option<TcpListener>,
    },
    Uring(Box<uring::UringIo>),
}

pub struct Shard {
    id: usize,
    io: Io,
    slab: Slab<Slot>,
    /// What connections share: settings, channel index, clock, scratch output.
    shared: Shared,
    inbox: ShardInbox,
    scratch: Box<[u8]>,
    batch: Batch,
    candidates: Vec<u32>,
    /// Batch event ranges that reached at least one subscriber, for the fan-out latency.
    reached: Vec<(u32, u32)>,
    epoch: Instant,
    next_tick: Instant,
    accept_paused_until: Option<Instant>,
    accept_more: bool,
    commands_more: bool,
    drain_deadline: Option<Instant>,
    /// When this shard first saw the shutdown request.
    shutdown_seen: Option<Instant>,
    last_fd_warning: Option<Instant>,
    limit: Arc<ConnectionLimit>,
    ip_limits: Arc<IpLimits>,
    next_serial: u32,
    /// One past the highest slab key ever used: the once-a-second sweep walks up to it.
    key_high_water: usize,
    /// Connections whose socket still held data after their share of reads.
    unfinished_reads: Vec<usize>,
    replay_tx: ReplaySender,
    resolve_tx: Option<ResolveSender>,
    /// Whether this tick's second saw a fan-out, accepted or closed connections (see
    /// `give_back_memory`).
    worked_since_tick: bool,
    after_work: AfterWork,
    /// Permission changes seen lately, by (project, user), for answers fetched before them.
    recent_changes: rustc_hash::FxHashMap<(Arc<str>, Arc<str>), Instant>,
    /// What the connections hold in total (their `Slot::held`), and this shard's share of
    /// `--max-buffered-bytes`.
    held_total: usize,
    held_cap: usize,
    last_shed_warning: Option<Instant>,
    /// Connections refused at accept that still linger (see `refuse_at_accept`).
    refused_lingering: usize,
    /// SO_SNDBUF for accepted sockets (`--send-buffer-bytes`), 0 for the kernel's choice.
    send_buffer: usize,
    m: ShardMetrics,
}

fn epoll_io(poll: Poll, listener: std::net::TcpListener) -> io::Result<Io> {
    let mut listener = TcpListener::from_std(listener);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    Ok(Io::Epoll {
        poll,
        listener: Some(listener),
    })
}

impl Shard {
    /// Builds shard `id` around an already bound, non-blocking listener.
    pub fn new(
        id: usize,
        listener: std::net::TcpListener,
        config: &Config,
        metrics: Metrics,
        common: Common,
        replay_tx: ReplaySender,
    ) -> io::Result<(Self, ShardHandle)> {
        let Common {
            limit,
            ip_limits,
            jwt,
            resolve_tx,
        } = common;
        let mut conn_config = ConnConfig::from_config(config);
        conn_config.jwt = jwt;
        let poll = Poll::new()?;
        let (handle, inbox) = shard_mailbox(Waker::new(poll.registry(), WAKER)?);
        let io = match config.io {
            IoDriver::Uring => Io::Uring(Box::new(uring::UringIo::new(poll, listener))),
            IoDriver::Epoll => epoll_io(poll, listener)?,
        };
        let now = Instant::now();
        let shard = Self {
            id,
            io,
            // Reserved up front: growing by doubling leaves the old arrays resident (about 150
            // bytes per connection), while untouched reserved pages cost only address space.
            // SO_REUSEPORT does not split evenly, hence the headroom.
            slab: Slab::with_capacity(
                ((limit.max / config.shard_count().max(1)).saturating_mul(5) / 4).min(1 << 20),
            ),
            shared: Shared::new(conn_config, ip_limits.clone()),
            inbox,
            scratch: vec![0u8; SCRATCH_BYTES].into_boxed_slice(),
            batch: Batch::default(),
            candidates: Vec::new(),
            reached: Vec::new(),
            epoch: now,
            next_tick: now + TICK,
            accept_paused_until: None,
            accept_more: false,
            commands_more: false,
            drain_deadline: None,
            shutdown_seen: None,
            last_fd_warning: None,
            limit,
            ip_limits,
            next_serial: 0,
            unfinished_reads: Vec::new(),
            key_high_water: 0,
            replay_tx,
            resolve_tx,
            worked_since_tick: false,
            after_work: AfterWork::default(),
            recent_changes: Default::default(),
            held_total: 0,
            held_cap: config.buffered_cap().map_or(usize::MAX, |cap| {
                usize::try_from(cap / config.shard_count().max(1) as u64).unwrap_or(usize::MAX)
            }),
            last_shed_warning: None,
            refused_lingering: 0,
            send_buffer: config.send_buffer_bytes,
            m: ShardMetrics::new(id, metrics),
        };
        Ok((shard, handle))
    }

    /// Runs the event loop until shutdown completes.
    pub fn run(mut self) {
        if matches!(self.io, Io::Uring(_)) {
            self.run_uring();
        } else {
            self.run_epoll();
        }
    }

    fn run_epoll(&mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            let Io::Epoll { poll, .. } = &mut self.io else {
                return;
            };
            if let Err(e) = poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(shard = self.id, error = %e, "epoll failed; shard stops");
                return;
            }
            self.set_clock();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(k) => {
                        let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                        // A FIN or an error already there when epoll looked raises no new
                        // edge: only then must the reads go on to the end.
                        let short_read_drains = !(ev.is_read_closed() || ev.is_error());
                        let reads = match readable {
                            false => Reads::None,
                            true if short_read_drains => Reads::UntilShort,
                            true => Reads::UntilBlocked,
                        };
                        self.on_socket_event(k, reads, ev.is_writable());
                    }
                }
            }
            for k in std::mem::take(&mut self.unfinished_reads) {
                // What was there before the last event raises no edge again.
                self.on_socket_event(k, Reads::UntilBlocked, false);
            }
            if self.after_io() {
                return;
            }
        }
    }

    fn set_clock(&mut self) {
        self.shared.instant = Instant::now();
        self.shared.now = u32::try_from(self.shared.instant.duration_since(self.epoch).as_secs())
            .unwrap_or(u32::MAX);
    }

    /// What every loop iteration does once the I/O it was woken for is handled: commands and
    /// fan-out, requests to the control plane, the memory cap, accepts, the tick, the end of a
    /// drain. Answers whether the shard is done.
    fn after_io(&mut self) -> bool {
        {
            self.drain_commands();
            if !self.shared.resumes.is_empty() {
                self.request_replays();
            }
            if !self.shared.resolves.is_empty() {
                self.request_resolves();
            }
            if self.held_with_sends() > self.held_cap {
                self.shed_largest();
            }
            let now = Instant::now();
            if self.accept_more || self.accept_paused_until.is_some_and(|until| now >= until) {
                self.accept_paused_until = None;
                self.accept();
            }
            if now >= self.next_tick {
                self.next_tick = now + TICK;
                self.tick();
            }
            if let Some(deadline) = self.drain_deadline
                && (self.slab.is_empty() || now >= deadline)
            {
                let left = self.slab.len();
                for k in 0..self.key_high_water {
                    if self.slab.contains(k) {
                        self.remove(k);
                    }
                }
                tracing::debug!(shard = self.id, left, "shard drained");
                return true;
            }
        }
        false
    }

    fn poll_timeout(&self) -> Duration {
        if self.commands_more
            || self.accept_more
            || !self.unfinished_reads.is_empty()
            || !self.shared.resumes.is_empty()
            || !self.shared.resolves.is_empty()
        {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let mut until = self.next_tick;
        if let Some(p) = self.accept_paused_until {
            until = until.min(p);
        }
        until.saturating_duration_since(now)
    }

    fn accept(&mut self) {
        if matches!(self.io, Io::Uring(_)) {
            self.accept_uring();
        } else {
            self.accept_epoll();
        }
    }

    fn accept_epoll(&mut self) {
        self.accept_more = false;
        self.worked_since_tick = true;
        if self.accept_paused_until.is_some() {
            return;
        }
        for _ in 0..ACCEPT_BATCH {
            let Io::Epoll {
                listener: Some(listener),
                ..
            } = &self.io
            else {
                return;
            };
            // At the cap, connections wait in the kernel's backlog until others close.
            if !self.limit.try_acquire() {
                self.on_accept_refused(AcceptRefusal::ConnectionLimit);
                return;
            }
            match listener.accept() {
                Ok((stream, peer)) => self.adopt(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.limit.release();
                    return;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    self.limit.release();
                }
                Err(e) => {
                    self.limit.release();
                    // EMFILE (24): this process's limit; ENFILE (23): the system-wide one.
                    let refusal = if matches!(e.raw_os_error(), Some(23 | 24)) {
                        AcceptRefusal::FdLimit
                    } else {
                        AcceptRefusal::Other(e)
                    };
                    self.on_accept_refused(refusal);
                    return;
                }
            }
        }
        self.accept_more = true;
    }

    /// Takes an accepted connection (its slot in the connection limit already acquired):
    /// per-IP admission, socket options, a slab slot, the driver's interest, the state machine.
    fn adopt(&mut self, mut stream: TcpStream, peer: std::net::SocketAddr) {
        let admission = self.ip_limits.admit(peer.ip(), Instant::now());
        if let Err(refusal) = admission
            && self.refused_lingering >= REFUSED_LINGERING_MAX
        {
            self.refuse_at_once(&mut stream, refusal);
            return;
        }
        // Event frames are latency-sensitive and already batched by writev.
        let _ = stream.set_nodelay(true);
        if self.send_buffer > 0 {
            let _ = socket2::SockRef::from(&stream).set_send_buffer_size(self.send_buffer);
        }
        let entry = self.slab.vacant_entry();
        let key = entry.key();
        self.key_high_water = self.key_high_water.max(key + 1);
        self.next_serial = self.next_serial.wrapping_add(1);
        let serial = self.next_serial;
        let registered = u32::try_from(key).is_ok()
            && match &mut self.io {
                Io::Epoll { poll, .. } => poll
                    .registry()
                    .register(&mut stream, Token(key), Interest::READABLE)
                    .is_ok(),
                Io::Uring(u) => u.arm_recv(stream.as_raw_fd(), key as u32, serial),
            };
        if !registered {
            self.limit.release();
            if let Ok(ticket) = admission {
                self.ip_limits.release(ticket);
            }
            return;
        }
        let ip = *admission.as_ref().unwrap_or(&IpTicket::UNCOUNTED);
        let conn = Connection::new(
            serial,
            self.shared.now,
            &self.shared.cfg,
            ip == IpTicket::FORWARDED,
        );
        entry.insert(Slot {
            stream,
            conn,
            ip,
            held: 0,
            flags: if matches!(self.io, Io::Uring(_)) {
                FLAG_RECV_ARMED
            } else {
                0
            },
        });
        self.m.accepted.inc();
        self.m.connections.inc();
        if let Err(refusal) = admission {
            self.refuse_at_accept(key, refusal);
        }
    }

    /// Out of connections or descriptors: keep serving what is open and retry after a pause,
    /// never in a tight loop.
    fn on_accept_refused(&mut self, refusal: AcceptRefusal) {
        let kind = match refusal {
            AcceptRefusal::ConnectionLimit => "connection_limit",
            AcceptRefusal::FdLimit => "fd_limit",
            AcceptRefusal::Other(_) => "other",
        };
        self.m
            .metrics
            .accept_errors
            .with_label_values(&[kind])
            .inc();
        let now = Instant::now();
        self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
        if self
            .last_fd_warning
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(10))
        {
            return;
        }
        self.last_fd_warning = Some(now);
        match refusal {
            AcceptRefusal::ConnectionLimit => tracing::warn!(
                shard = self.id,
                max = self.limit.max,
                "connection limit reached: new connections wait in the backlog until others close \
                 (see --max-connections and the open-file limit)"
            ),
            AcceptRefusal::FdLimit => tracing::warn!(
                shard = self.id,
                open = self.slab.len(),
                "cannot accept: the open-file limit (RLIMIT_NOFILE) is reached; existing connections \
                 keep being served and accepts resume when descriptors free up (raise the hard limit \
                 or run more processes)"
            ),
            AcceptRefusal::Other(e) => {
                tracing::warn!(shard = self.id, error = %e, "accept failed; retrying shortly");
            }
        }
    }

    fn on_socket_event(&mut self, k: usize, reads: Reads, writable: bool) {
        if writable && self.slab.contains(k) {
            self.settle(k);
        }
        if reads == Reads::None {
            return;
        }
        for _ in 0..READS_PER_EVENT {
            let Some(slot) = self.slab.get_mut(k) else {
                return;
            };
            if !slot.conn.wants_input(&self.shared.cfg) {
                // Epoll will not report this data again (edge-triggered): `settle` resumes.
                slot.set_read_paused(true);
                return;
            }
            match slot.stream.read(&mut self.scratch) {
                Ok(0) => {
                    self.remove(k);
                    return;
                }
                Ok(n) => {
                    let mut cx = self.shared.context(k as u32);
                    if let Some(i) = slot.conn.on_read(&mut self.scratch[..n], &mut cx) {
                        self.m.record(i);
                    }
                    if let Some(ticket) = self.shared.admitted.take() {
                        slot.ip = ticket;
                    }
                    if !self.settle(k) {
                        return;
                    }
                    // Less than asked for: the socket held no more. Whatever arrives later,
                    // the FIN included, raises a new edge, so a read that would only find
                    // nothing (one per pong, one per handshake) is spared.
                    if reads == Reads::UntilShort && n < self.scratch.len() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.remove(k);
                    return;
                }
            }
        }
        // Still readable after a full batch. Epoll will not report it again (edge-triggered), so
        // it goes on the list served after everyone else's events in this iteration.
        self.unfinished_reads.push(k);
    }

    /// Transmits connection `k`'s output and does what it answers: half-close, drop, or keep
    /// epoll's write interest in sync. Returns false if `k` was dropped.
    fn settle(&mut self, k: usize) -> bool {
        let Some(slot) = self.slab.get_mut(k) else {
            self.shared.out.clear();
            return false;
        };
        let mut cx = self.shared.context(k as u32);
        let fd = slot.stream.as_raw_fd();
        let sent = match &self.io {
            Io::Epoll { .. } => slot.conn.transmit(&mut slot.stream, &mut cx),
            Io::Uring(_) if slot.sending() => {
                slot.conn.transmit(&mut crate::uring::Behind, &mut cx)
            }
            Io::Uring(_) => slot.conn.transmit(&mut crate::uring::DontWait(fd), &mut cx),
        };
        let t = match sent {
            Ok(t) => t,
            Err(_) => {
                self.remove(k);
                return false;
            }
        };
        if t.slow_consumer {
            self.m.slow.inc();
        }
        match t.next {
            Next::Drop => {
                self.remove(k);
                return false;
            }
            Next::HalfClose => {
                let _ = slot.stream.shutdown(Shutdown::Write);
            }
            Next::Idle | Next::Blocked => {}
        }
        let want_write = t.next == Next::Blocked;
        match &mut self.io {
            Io::Epoll { poll, .. } if want_write != slot.wants_write() => {
                let interest = if want_write {
                    Interest::READABLE | Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                if poll
                    .registry()
                    .reregister(&mut slot.stream, Token(k), interest)
                    .is_err()
                {
                    self.remove(k);
                    return false;
                }
                slot.set_wants_write(want_write);
            }
            // A send in flight settles again when it completes.
            Io::Uring(u) if want_write && !slot.wants_write() && !slot.sending() => {
                u.arm_writable(fd, k as u32, slot.conn.serial());
                slot.set_wants_write(true);
            }
            _ => {}
        }
        if slot.read_paused() && slot.conn.wants_input(&self.shared.cfg) {
            slot.set_read_paused(false);
            self.unfinished_reads.push(k);
        }
        let held = u32::try_from(slot.conn.held_bytes()).unwrap_or(u32::MAX);
        self.held_total = self.held_total - slot.held as usize + held as usize;
        slot.held = held;
        true
    }

    /// What the connections hold, and on io_uring what their sends in flight hold too (the
    /// kernel still reads it; the connections' own counts let go of it when it went out).
    fn held_with_sends(&self) -> usize {
        let sending = match &self.io {
            Io::Uring(u) => u.sending_bytes(),
            Io::Epoll { .. } => 0,
        };
        self.held_total + sending
    }

    /// Over the cap on held bytes: closes the largest holders first until the total is back
    /// under three quarters of it, so that a shard under pressure does not shed on every event.
    fn shed_largest(&mut self) {
        // Sends in flight go only when the kernel is done with them: what they hold is left
        // out of what shedding can bring down.
        let target =
            (self.held_cap / 4 * 3).saturating_sub(self.held_with_sends() - self.held_total);
        let mut holders: Vec<(u32, usize)> = self
            .slab
            .iter()
            .filter(|(_, slot)| slot.held > 0 && slot.conn.sheddable())
            .map(|(k, slot)| (slot.held, k))
            .collect();
        holders.sort_unstable_by_key(|&(held, _)| std::cmp::Reverse(held));
        let (before, mut shed) = (self.held_total, 0usize);
        for (_, k) in holders {
            if self.held_total <= target {
                break;
            }
            let Some(slot) = self.slab.get_mut(k) else {
                continue;
            };
            let mut cx = self.shared.context(k as u32);
            let code = slot.conn.shed(&mut cx).unwrap_or(0);
            self.m
                .metrics
                .memory_shed
                .with_label_values(&[&code.to_string()])
                .inc();
            shed += 1;
            self.settle(k);
        }
        let now = Instant::now();
        if self
            .last_shed_warning
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
        {
            self.last_shed_warning = Some(now);
            tracing::warn!(
                shard = self.id,
                before,
                after = self.held_total,
                cap = self.held_cap,
                closed = shed,
                "connections held more than this shard's share of --max-buffered-bytes; \
                 closed the largest holders"
            );
        }
    }

    /// A flood of refusals: the 429 goes out in one write and the socket is closed, without
    /// registering it or giving it a slot.
    fn refuse_at_once(&mut self, stream: &mut TcpStream, refusal: Refusal) {
        use std::io::Write;
        // Without waiting: a socket of the io_uring driver is blocking.
        let fd = stream.as_raw_fd();
        let _ = crate::uring::DontWait(fd).write(&crate::ws::handshake::error_response(
            429,
            refusal.message(),
        ));
        let _ = stream.shutdown(Shutdown::Write);
        // Reading what the request sent keeps the close from turning into a reset that could
        // destroy the answer before the client reads it.
        let _ = crate::uring::read_now(fd, &mut self.scratch);
        self.limit.release();
        self.m.accepted.inc();
        self.m.record(Incident::Rejected(refusal.reason()));
    }

    /// Answers a connection over its source's limits with 429 and lets it go. The answer is
    /// written at once; the socket then lingers briefly so the peer reads it before the close,
    /// but only up to [`REFUSED_LINGERING_MAX`] at a time: a flood of refused connections is
    /// closed at once rather than holding slots others could use.
    fn refuse_at_accept(&mut self, k: usize, refusal: Refusal) {
        let Some(slot) = self.slab.get_mut(k) else {
            return;
        };
        let mut cx = self.shared.context(k as u32);
        let incident =
            slot.conn
                .refuse_at_accept(429, refusal.message(), refusal.reason(), &mut cx);
        self.m.record(incident);
        if !self.settle(k) {
            return;
        }
        if self.refused_lingering >= REFUSED_LINGERING_MAX {
            self.remove(k);
        } else if let Some(slot) = self.slab.get_mut(k) {
            slot.set_refused(true);
            self.refused_lingering += 1;
        }
    }

    fn remove(&mut self, k: usize) {
        if let Some(mut slot) = self.slab.try_remove(k) {
            self.worked_since_tick = true;
            self.held_total -= slot.held as usize;
            self.refused_lingering -= usize::from(slot.refused());
            self.ip_limits.release(slot.ip);
            slot.conn.unindex(&mut self.shared.registry, k as u32);
            match &mut self.io {
                Io::Epoll { poll, .. } => {
                    let _ = poll.registry().deregister(&mut slot.stream);
                }
                Io::Uring(u) => u.close(k, slot.stream),
            }
            self.m.connections.dec();
            self.limit.release();
        }
    }

    fn drain_commands(&mut self) {
        self.inbox.rearm();
        self.commands_more = false;
        let mut taken = 0;
        while taken < COMMAND_BATCH {
            let Some(cmd) = self.inbox.try_command() else {
                break;
            };
            taken += 1;
            match cmd {
                Command::Event(ev) => {
                    if let Some(p) = ev.position {
                        let at = usize::from(p.shard);
                        let positions = &mut self.shared.positions;
                        if positions.len() <= at {
                            positions.resize(at + 1, None);
                        }
                        positions[at] = positions[at].max(Some(p));
                    }
                    self.batch.push_event(ev);
                }
                Command::PermissionsChanged { project, user } => {
                    // Events before it go out under the roles they were published for.
                    self.fan_out();
                    self.on_permissions_changed(project, user);
                }
            }
        }
        if taken == COMMAND_BATCH {
            self.commands_more = true;
        }
        if taken > 0 {
            self.m.queue.set(self.inbox.pending_commands() as i64);
            self.fan_out();
        }
        if let Some(drain) = self.inbox.shutdown_requested()
            && self.drain_deadline.is_none()
        {
            // Events queued before the signal go out before the 1001, for a bounded time that
            // counts against the drain.
            let seen = *self.shutdown_seen.get_or_insert_with(Instant::now);
            if !self.commands_more || seen.elapsed() >= SHUTDOWN_FLUSH.min(drain / 2) {
                self.begin_shutdown(drain.saturating_sub(seen.elapsed()));
            }
        }
        for _ in 0..ANSWERS_PER_ITERATION {
            match self.inbox.try_answer() {
                None => return,
                Some(Answer::Replay(a)) => self.finish_replay(a),
                Some(Answer::Identity(a)) => self.finish_resolve(a),
            }
        }
        if self.inbox.has_answers() {
            self.commands_more = true;
        }
    }

    /// Delivers the batch: stages every subscriber's frames, then writes each connection's
    /// frames with one vectored write.
    fn fan_out(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let mut start = 0;
        while (start as usize) < self.batch.len() {
            let end = self.batch.route_end(start);
            if self.stage(start, end) > 0 {
                self.reached.push((start, end));
            }
            start = end;
        }
        let touched = self.batch.take_touched();
        // io_uring's sends hold the batch's events until the kernel is done with them.
        let mut bodies = None;
        for &k in &touched {
            let Some(slot) = self.slab.get_mut(k as usize) else {
                continue;
            };
            if slot.conn.is_backlogged() {
                // Behind what is already queued, so it goes through the connection's output.
                self.batch.frames_of(k, &mut self.shared.out);
                self.settle(k as usize);
                continue;
            }
            if let Io::Uring(u) = &mut self.io {
                if slot.sending() {
                    self.batch.frames_of(k, &mut self.shared.out);
                    self.settle(k as usize);
                } else {
                    let batch = &self.batch;
                    let bodies = bodies.get_or_insert_with(|| batch.bodies());
                    u.send(slot.stream.as_raw_fd(), k, slot.conn.serial(), |staged| {
                        batch.stage_send(k, bodies, staged)
                    });
                    slot.set_sending(true);
                }
                continue;
            }
            match self.batch.write(k, &mut slot.stream) {
                Ok(Written::All) => {}
                Ok(Written::Blocked { rest, offset }) => {
                    slot.conn.queue_unsent(rest, offset);
                    self.settle(k as usize);
                }
                Err(_) => self.remove(k as usize),
            }
        }
        self.observe_fanout();
        self.batch.clear(touched);
    }

    /// Records how long the events that reached someone took from intake to here.
    fn observe_fanout(&mut self) {
        let now = Instant::now();
        for (start, end) in self.reached.drain(..) {
            for i in start..end {
                let took = now.saturating_duration_since(self.batch.event(i).received);
                self.m.fanout_latency.observe(took.as_secs_f64());
            }
        }
    }

    /// Stages batch events `start..end`, which share project, channels and roles (one route),
    /// for every subscriber, connection by connection: each connection decides, and a
    /// connection that got the previous event reuses its tail.
    fn stage(&mut self, start: u32, end: u32) -> u64 {
        let ev = self.batch.event(start);
        self.shared
            .registry
            .collect(&ev.project, &ev.channels, &mut self.candidates);
        let cfg = &self.shared.cfg;
        let mut staged = 0;
        for &k in &self.candidates {
            let Some(slot) = self.slab.get_mut(k as usize) else {
                continue;
            };
            for i in start..end {
                let verdict = self.batch.offer(k, i, start, |ev, continues, tails| {
                    slot.conn.offer(ev, continues, tails, cfg)
                });
                match verdict {
                    Verdict::Deliver | Verdict::Extend => staged += 1,
                    Verdict::Hold | Verdict::Skip => {}
                    // The same route matches the same way for every event of the group.
                    Verdict::NotSubscribed => break,
                }
            }
        }
        self.m.delivered.inc_by(staged);
        self.worked_since_tick |= staged > 0;
        staged
    }

    fn finish_replay(&mut self, answer: ReplayAnswer) {
        let k = answer.key as usize;
        let Some(slot) = self.slab.get_mut(k) else {
            return;
        };
        let mut cx = self.shared.context(answer.key);
        slot.conn
            .on_replay_answer(answer.serial, answer.outcome, &mut cx);
        self.settle(k);
    }

    /// Every connection of `user` in `project` with a session asks for it to be resolved
    /// again. A walk over the shard's connections (no output, so no transmit): permission
    /// changes are rare next to events. The change is remembered for answers already on
    /// their way, fetched before it.
    fn on_permissions_changed(&mut self, project: Arc<str>, user: Arc<str>) {
        for (k, slot) in self.slab.iter_mut() {
            let mut cx = self.shared.context(k as u32);
            slot.conn.on_permissions_changed(&project, &user, &mut cx);
        }
        let now = Instant::now();
        if self.recent_changes.len() >= 10_000 {
            self.recent_changes
                .retain(|_, at| now.duration_since(*at) < RECENT_CHANGE_MEMORY);
        }
        self.recent_changes.insert((project, user), now);
    }

    fn finish_resolve(&mut self, answer: IdentityAnswer) {
        let k = answer.key as usize;
        let Some(slot) = self.slab.get_mut(k) else {
            return;
        };
        // Fetched before a permission change this shard has seen since: once applied, it is
        // resolved again.
        let stale = answer.outcome.as_ref().ok().and_then(|r| {
            let key = (answer.project.clone(), Arc::<str>::from(r.user_id.as_str()));
            let at = self.recent_changes.get(&key)?;
            (*at >= answer.fetched).then_some(key)
        });
        let mut cx = self.shared.context(answer.key);
        if let Some(i) = slot.conn.on_identity_answer(answer, &mut cx) {
            self.m.record(i);
        }
        if let Some((project, user)) = stale {
            slot.conn.on_permissions_changed(&project, &user, &mut cx);
        }
        if let Some(ticket) = self.shared.admitted.take() {
            slot.ip = ticket;
        }
        self.settle(k);
    }

    /// Hands the session resolutions asked for in this iteration to the resolver; when it
    /// cannot take them, the connections get their answer (unavailable) at once.
    fn request_resolves(&mut self) {
        let requests = std::mem::take(&mut self.shared.resolves);
        for mut request in requests {
            request.shard = self.id;
            let refused = match &self.resolve_tx {
                Some(tx) => tx.send(request).err(),
                None => Some((Refused::Gone, request)),
            };
            let Some((why, request)) = refused else {
                continue;
            };
            let words = match why {
                Refused::Busy => "too many sign-ins are waiting; try again shortly",
                Refused::Gone => "no session resolver is running",
            };
            self.m
                .metrics
                .resolutions
                .with_label_values(&["unavailable", "false"])
                .inc();
            self.finish_resolve(IdentityAnswer {
                key: request.key,
                serial: request.serial,
                purpose: request.purpose,
                project: request.project,
                session: request.session,
                fetched: Instant::now(),
                outcome: Err(ResolveError::Unavailable(words.to_owned())),
            });
        }
    }

    /// Hands the resumes started in this iteration to the control plane.
    fn request_replays(&mut self) {
        let mut keys = std::mem::take(&mut self.shared.resumes);
        for key in keys.drain(..) {
            let Some(slot) = self.slab.get(key as usize) else {
                continue;
            };
            let Some((query, cancellation)) = slot.conn.replay_query(&self.shared.cfg) else {
                continue;
            };
            let serial = slot.conn.serial();
            let request = ReplayRequest {
                shard: self.id,
                key,
                serial,
                query,
                cancellation,
            };
            if let Err((refused, _)) = self.replay_tx.send(request) {
                self.m.metrics.replays.with_label_values(&["refused"]).inc();
                let words = match refused {
                    Refused::Busy => {
                        "too many resumes are waiting for history; reconnect with lastEventId shortly"
                    }
                    Refused::Gone => "the control plane is gone",
                };
                let outcome = Err(ReplayError::Unavailable(words.to_owned()));
                self.finish_replay(ReplayAnswer {
                    key,
                    serial,
                    outcome,
                });
            }
        }
        self.shared.resumes = keys;
    }

    fn tick(&mut self) {
        self.for_each_connection(|conn, fd, cx| {
            conn.on_tick(cx, || crate::liveness::peer_acked_secs_ago(fd))
        });
        if let Io::Uring(u) = &mut self.io {
            u.trim();
        }
        self.give_back_memory();
        let c = std::mem::take(&mut self.shared.counters);
        self.worked_since_tick |= c.busy_released > 0;
        self.m.rate_limited.inc_by(c.rate_limited);
        self.m.idle_closed.inc_by(c.idle_closed);
        self.m.pings_sent.inc_by(c.pings_sent);
        self.m.pings_saved.inc_by(c.pings_saved);
        self.m
            .buffered
            .set(i64::try_from(self.held_with_sends()).unwrap_or(i64::MAX));
        self.shared.registry.collect_garbage();
        // One shard is enough to keep the process-wide table small.
        if self.id == 0 {
            self.ip_limits.sweep(Instant::now());
        }
    }

    /// After a burst of fan-out, connections or closes (or start-up), once a second passes
    /// with none, hands the pages it freed in this thread's heap back to the system: the
    /// allocator would otherwise keep them resident (a burst to 19,000 subscribers left about
    /// 2 MiB per process, and each handshake leaves its buffers behind).
    fn give_back_memory(&mut self) {
        let worked = std::mem::take(&mut self.worked_since_tick);
        if self.after_work.period(worked) {
            // The fan-out's scratch space is sized by the last burst; the next one grows it
            // again.
            self.batch.release();
            self.candidates = Vec::new();
            if let Io::Uring(u) = &mut self.io {
                u.release();
            }
            // Once every client has left, the slots they used go too: a fresh reservation
            // costs address space only, where the old one keeps every slot ever touched.
            if self.slab.is_empty() && self.key_high_water > 0 {
                self.slab = Slab::with_capacity(self.slab.capacity());
                self.key_high_water = 0;
            }
            crate::memory::give_back();
        }
    }

    /// Calls `visit` for every connection, then transmits what it produced.
    fn for_each_connection(
        &mut self,
        mut visit: impl FnMut(&mut Connection, RawFd, &mut Context<'_>) -> Option<Incident>,
    ) {
        // Up to the highest key used rather than a list of keys: that list would cost 8 bytes
        // per connection, and the slab's reservation is far beyond its use.
        for k in 0..self.key_high_water {
            let Some(slot) = self.slab.get_mut(k) else {
                continue;
            };
            let mut cx = self.shared.context(k as u32);
            if let Some(i) = visit(&mut slot.conn, slot.stream.as_raw_fd(), &mut cx) {
                self.m.record(i);
            }
            self.settle(k);
        }
    }

    fn begin_shutdown(&mut self, drain: Duration) {
        if self.drain_deadline.is_some() {
            return;
        }
        self.drain_deadline = Some(Instant::now() + drain);
        match &mut self.io {
            Io::Epoll { poll, listener } => {
                if let Some(mut l) = listener.take() {
                    let _ = poll.registry().deregister(&mut l);
                }
            }
            Io::Uring(u) => u.stop_accepting(),
        }
        self.accept_more = false;
        self.accept_paused_until = None;
        self.for_each_connection(|conn, _, cx| {
            conn.on_shutdown(cx);
            None
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_wastes_no_word_and_its_flags_are_independent() {
        // Every idle connection pays for its slot: the connection (64 B) and the socket (4 B
        // in a release build; mio adds a selector id in debug builds), its IP ticket, its held
        // count and one byte of flags, with no padding beyond the last word: 80 B released.
        use std::mem::size_of;
        let parts = size_of::<Connection>() + size_of::<TcpStream>() + 4 + 4 + 1;
        assert!(
            size_of::<Slot>() <= parts.next_multiple_of(8),
            "{}",
            size_of::<Slot>()
        );
        let mut flags = Slot {
            stream: TcpStream::from_std(
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| std::net::TcpStream::connect(l.local_addr()?))
                    .unwrap(),
            ),
            conn: Connection::new(1, 0, &ConnConfig::from_config(&Config::for_tests()), false),
            ip: IpTicket::UNCOUNTED,
            held: 0,
            flags: 0,
        };
        flags.set_sending(true);
        flags.set_read_paused(true);
        flags.set_read_paused(false);
        assert!(flags.sending() && !flags.read_paused() && !flags.wants_write());
        assert!(!flags.refused() && !flags.recv_armed());
    }
}
