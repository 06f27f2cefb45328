//! A shard: one OS thread running one epoll event loop (mio) over the connections it accepted.
//!
//! Owns its `SO_REUSEPORT` listener, its connections (in a slab), its channel index and its
//! scratch buffers, and is the only thread that touches them: no locks on the hot path. It
//! receives events and shutdown through a bounded crossbeam channel plus a mio waker. It must
//! not know about HTTP, Redis or the bus; everything protocol-level is delegated to `conn.rs`.

use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::batch::{Batch, Written};
use crate::bus::{ReplayError, ReplayQuery};
use crate::config::Config;
use crate::conn::{ConnConfig, Connection, Counters, Env, Incident, Live, Phase};
use crate::event::{EncodedEvent, EventId, write_tail};
use crate::metrics::Metrics;
use crate::outbox::OutFrame;
use crate::registry::Registry;
use crate::replay::ReplayRequest;

/// What a connection may touch, borrowed field by field so the slab entry can stay borrowed.
macro_rules! conn_env {
    ($shard:ident, $key:expr) => {
        Env {
            cfg: &$shard.cfg,
            registry: &mut $shard.registry,
            key: $key as u32,
            now: $shard.now,
            out: &mut $shard.out,
            counters: &mut $shard.counters,
            replays: &mut $shard.replays,
            position: $shard.position,
        }
    };
}

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
/// Events taken from the inbound queue before frames are flushed and sockets polled again.
const COMMAND_BATCH: usize = 256;
/// Connections accepted per loop iteration, so an accept storm cannot starve delivery.
const ACCEPT_BATCH: usize = 512;
/// Socket reads per readable event: enough for normal traffic, bounded against floods.
const READS_PER_EVENT: usize = 16;
const SCRATCH_BYTES: usize = 64 * 1024;
/// Inbound queue capacity per shard, in events.
pub const QUEUE_CAPACITY: usize = 65_536;
/// Replay answers waiting per shard; the control plane holds the rest back.
const ANSWER_CAPACITY: usize = 1024;
/// Replay answers written per loop iteration, after live events.
const ANSWERS_PER_ITERATION: usize = 16;
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const TICK: Duration = Duration::from_secs(1);

enum AcceptRefusal {
    ConnectionLimit,
    FdLimit,
    Other(io::Error),
}

/// What the control plane sends a shard.
#[derive(Debug)]
pub enum Command {
    Event(Arc<EncodedEvent>),
    /// Stop accepting, close every connection with 1001, exit once drained or at the deadline.
    Shutdown {
        drain: Duration,
    },
}

/// The history a resuming connection asked for. Answers travel in their own queue, served after
/// live events and a few per loop iteration, so a mass reconnect never delays live delivery.
#[derive(Debug)]
pub struct ReplayAnswer {
    pub key: u32,
    pub serial: u32,
    pub outcome: Result<Vec<Arc<EncodedEvent>>, ReplayError>,
}

/// Why a replay answer could not be queued.
#[derive(Debug)]
pub enum AnswerRefused {
    /// The shard's answer queue is full: try again shortly.
    Full(ReplayAnswer),
    /// The shard has stopped.
    Gone,
}

/// The control plane's end of a shard.
#[derive(Clone)]
pub struct ShardHandle {
    tx: Sender<Command>,
    answers: Sender<ReplayAnswer>,
    waker: Arc<Waker>,
    wake_pending: Arc<AtomicBool>,
}

impl ShardHandle {
    /// Queues a command without blocking and wakes the shard; gives it back when the queue is
    /// full.
    pub fn try_send(&self, cmd: Command) -> Result<(), Command> {
        self.try_send_quiet(cmd)?;
        self.wake();
        Ok(())
    }

    /// Queues a command without waking the shard: for batches, followed by one [`Self::wake`].
    pub fn try_send_quiet(&self, cmd: Command) -> Result<(), Command> {
        self.tx
            .try_send(cmd)
            .map_err(|(TrySendError::Full(c) | TrySendError::Disconnected(c))| c)
    }

    /// Queues a replay answer and wakes the shard.
    pub fn try_send_answer(&self, answer: ReplayAnswer) -> Result<(), AnswerRefused> {
        match self.answers.try_send(answer) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(TrySendError::Full(a)) => Err(AnswerRefused::Full(a)),
            Err(TrySendError::Disconnected(_)) => Err(AnswerRefused::Gone),
        }
    }

    /// Free slots in the inbound queue.
    pub fn room(&self) -> usize {
        QUEUE_CAPACITY.saturating_sub(self.tx.len())
    }

    /// Wakes the loop, at most once per batch: a wake already pending covers this send.
    pub fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            // A failed wake means the shard is gone; its queue is then drained by nobody.
            let _ = self.waker.wake();
        }
    }
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
}

struct Slot {
    stream: TcpStream,
    conn: Connection,
}

/// Per-shard metric handles, taken once so the loop only touches atomics.
struct ShardMetrics {
    metrics: Metrics,
    connections: prometheus::IntGauge,
    accepted: prometheus::IntCounter,
    delivered: prometheus::IntCounter,
    slow: prometheus::IntCounter,
    rate_limited: prometheus::IntCounter,
    idle_closed: prometheus::IntCounter,
    queue: prometheus::IntGauge,
}

pub struct Shard {
    id: usize,
    poll: Poll,
    listener: Option<TcpListener>,
    slab: Slab<Slot>,
    registry: Registry,
    rx: Receiver<Command>,
    answers: Receiver<ReplayAnswer>,
    wake_pending: Arc<AtomicBool>,
    cfg: ConnConfig,
    scratch: Box<[u8]>,
    out: Vec<OutFrame>,
    batch: Batch,
    candidates: Vec<u32>,
    counters: Counters,
    epoch: Instant,
    now: u32,
    next_tick: Instant,
    accept_paused_until: Option<Instant>,
    accept_more: bool,
    commands_more: bool,
    drain_deadline: Option<Instant>,
    last_fd_warning: Option<Instant>,
    limit: Arc<ConnectionLimit>,
    next_serial: u32,
    /// The last event processed, as a history position.
    position: Option<EventId>,
    replays: Vec<u32>,
    /// Scratch list of occupied slab keys for the once-a-second sweep.
    sweep_keys: Vec<usize>,
    /// Connections whose socket still held data after their share of reads.
    unfinished_reads: Vec<usize>,
    replay_tx: tokio::sync::mpsc::UnboundedSender<ReplayRequest>,
    replay_max_events: usize,
    replay_max_bytes: usize,
    m: ShardMetrics,
}

impl Shard {
    /// Builds shard `id` around an already bound, non-blocking listener.
    pub fn new(
        id: usize,
        listener: std::net::TcpListener,
        config: &Config,
        metrics: Metrics,
        limit: Arc<ConnectionLimit>,
        replay_tx: tokio::sync::mpsc::UnboundedSender<ReplayRequest>,
    ) -> io::Result<(Self, ShardHandle)> {
        let poll = Poll::new()?;
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_CAPACITY);
        let (answers_tx, answers) = crossbeam_channel::bounded(ANSWER_CAPACITY);
        let wake_pending = Arc::new(AtomicBool::new(false));
        let label = id.to_string();
        let m = ShardMetrics {
            connections: metrics.connections.with_label_values(&[&label]),
            accepted: metrics.accepted.with_label_values(&[&label]),
            delivered: metrics.events_delivered.with_label_values(&[&label]),
            slow: metrics.slow_consumers.with_label_values(&[&label]),
            rate_limited: metrics.rate_limited.with_label_values(&[&label]),
            idle_closed: metrics.idle_closed.with_label_values(&[&label]),
            queue: metrics.shard_queue.with_label_values(&[&label]),
            metrics,
        };
        let now = Instant::now();
        let shard = Self {
            id,
            poll,
            listener: Some(listener),
            // Reserved up front: growing by doubling leaves the old arrays resident (about 150
            // bytes per connection), while untouched reserved pages cost only address space.
            // SO_REUSEPORT does not split evenly, hence the headroom.
            slab: Slab::with_capacity(
                ((limit.max / config.shard_count().max(1)).saturating_mul(5) / 4).min(1 << 20),
            ),
            registry: Registry::default(),
            rx,
            answers,
            wake_pending: wake_pending.clone(),
            cfg: ConnConfig::from_config(config),
            scratch: vec![0u8; SCRATCH_BYTES].into_boxed_slice(),
            out: Vec::new(),
            batch: Batch::default(),
            candidates: Vec::new(),
            counters: Counters::default(),
            epoch: now,
            now: 0,
            next_tick: now + TICK,
            accept_paused_until: None,
            accept_more: false,
            commands_more: false,
            drain_deadline: None,
            last_fd_warning: None,
            limit,
            next_serial: 0,
            position: None,
            replays: Vec::new(),
            unfinished_reads: Vec::new(),
            sweep_keys: Vec::new(),
            replay_tx,
            replay_max_events: config.replay_max_events,
            replay_max_bytes: config.replay_max_bytes,
            m,
        };
        let handle = ShardHandle {
            tx,
            answers: answers_tx,
            waker,
            wake_pending,
        };
        Ok((shard, handle))
    }

    /// Runs the event loop until shutdown completes.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(shard = self.id, error = %e, "epoll failed; shard stops");
                return;
            }
            self.now = u32::try_from(self.epoch.elapsed().as_secs()).unwrap_or(u32::MAX);
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(k) => {
                        let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                        self.on_socket_event(k, readable, ev.is_writable());
                    }
                }
            }
            for k in std::mem::take(&mut self.unfinished_reads) {
                self.on_socket_event(k, true, false);
            }
            self.drain_commands();
            if !self.replays.is_empty() {
                self.request_replays();
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
                for k in self.take_occupied_keys() {
                    self.remove(k);
                }
                tracing::debug!(shard = self.id, left, "shard drained");
                return;
            }
        }
    }

    fn poll_timeout(&self) -> Duration {
        if self.commands_more || self.accept_more || !self.unfinished_reads.is_empty() {
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
        self.accept_more = false;
        if self.accept_paused_until.is_some() {
            return;
        }
        let Some(listener) = self.listener.as_ref() else {
            return;
        };
        for _ in 0..ACCEPT_BATCH {
            // At the cap, connections wait in the kernel's backlog until others close.
            if !self.limit.try_acquire() {
                self.on_accept_refused(AcceptRefusal::ConnectionLimit);
                return;
            }
            match listener.accept() {
                Ok((mut stream, _)) => {
                    // Event frames are latency-sensitive and already batched by writev.
                    let _ = stream.set_nodelay(true);
                    let entry = self.slab.vacant_entry();
                    let key = entry.key();
                    if u32::try_from(key).is_err()
                        || self
                            .poll
                            .registry()
                            .register(&mut stream, Token(key), Interest::READABLE)
                            .is_err()
                    {
                        self.limit.release();
                        continue;
                    }
                    self.next_serial = self.next_serial.wrapping_add(1);
                    entry.insert(Slot {
                        stream,
                        conn: Connection::new(self.next_serial, self.now, &self.cfg),
                    });
                    self.m.accepted.inc();
                    self.m.connections.inc();
                }
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

    fn on_socket_event(&mut self, k: usize, readable: bool, writable: bool) {
        if writable && self.slab.contains(k) {
            self.settle(k);
        }
        if !readable {
            return;
        }
        for _ in 0..READS_PER_EVENT {
            let Some(slot) = self.slab.get_mut(k) else {
                return;
            };
            match slot.stream.read(&mut self.scratch) {
                Ok(0) => {
                    self.remove(k);
                    return;
                }
                Ok(n) => {
                    let mut env = conn_env!(self, k);
                    let incident = slot.conn.on_data(&mut self.scratch[..n], &mut env);
                    if let Some(i) = incident {
                        self.record(i);
                    }
                    if !self.settle(k) {
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

    fn record(&self, incident: Incident) {
        match incident {
            Incident::Rejected(reason) => self
                .m
                .metrics
                .handshake_rejected
                .with_label_values(&[reason])
                .inc(),
            Incident::ProtocolError(code) => self
                .m
                .metrics
                .protocol_errors
                .with_label_values(&[&code.to_string()])
                .inc(),
        }
    }

    /// Writes `self.out` and the outbox of connection `k`, applies the slow-consumer rule and
    /// the close sequence, and keeps epoll interest in sync. Returns false if `k` was dropped.
    fn settle(&mut self, k: usize) -> bool {
        let Some(slot) = self.slab.get_mut(k) else {
            self.out.clear();
            return false;
        };
        let limit = slot.conn.outbound_limit(&self.cfg);
        match slot
            .conn
            .outbox
            .send(&mut slot.stream, &mut self.out, limit)
        {
            Err(_) => {
                self.out.clear();
                self.remove(k);
                return false;
            }
            Ok(Err(_overflow)) => {
                self.m.slow.inc();
                let mut env = conn_env!(self, k);
                slot.conn.slow_consumer(&mut env);
                if slot
                    .conn
                    .outbox
                    .send(&mut slot.stream, &mut self.out, usize::MAX)
                    .is_err()
                {
                    self.out.clear();
                    self.remove(k);
                    return false;
                }
            }
            Ok(Ok(_)) => {}
        }
        if slot.conn.outbox.is_empty() {
            if slot.conn.after_flush(self.now) {
                self.remove(k);
                return false;
            }
            if slot.conn.phase == Phase::Lingering {
                // The peer hangs up after reading everything; a reset would destroy the tail.
                let _ = slot.stream.shutdown(Shutdown::Write);
            }
        }
        let want_write = !slot.conn.outbox.is_empty();
        if want_write != slot.conn.wants_write {
            let interest = if want_write {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            if self
                .poll
                .registry()
                .reregister(&mut slot.stream, Token(k), interest)
                .is_err()
            {
                self.remove(k);
                return false;
            }
            slot.conn.wants_write = want_write;
        }
        true
    }

    fn remove(&mut self, k: usize) {
        if let Some(mut slot) = self.slab.try_remove(k) {
            slot.conn.unindex(&mut self.registry, k as u32);
            let _ = self.poll.registry().deregister(&mut slot.stream);
            self.m.connections.dec();
            self.limit.release();
        }
    }

    fn drain_commands(&mut self) {
        self.wake_pending.store(false, Ordering::Release);
        self.commands_more = false;
        let mut taken = 0;
        while taken < COMMAND_BATCH {
            let Ok(cmd) = self.rx.try_recv() else { break };
            taken += 1;
            match cmd {
                Command::Event(ev) => {
                    if ev.position.is_some() {
                        self.position = self.position.max(ev.position);
                    }
                    self.batch.push_event(ev);
                }
                Command::Shutdown { drain } => {
                    self.fan_out();
                    self.begin_shutdown(drain);
                }
            }
        }
        if taken == COMMAND_BATCH {
            self.commands_more = true;
        }
        if taken > 0 {
            self.m.queue.set(self.rx.len() as i64);
            self.fan_out();
        }
        for _ in 0..ANSWERS_PER_ITERATION {
            let Ok(a) = self.answers.try_recv() else {
                return;
            };
            self.finish_replay(a.key as usize, a.serial, a.outcome);
        }
        if !self.answers.is_empty() {
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
            self.stage(start, end);
            start = end;
        }
        let touched = self.batch.take_touched();
        for &k in &touched {
            let Some(slot) = self.slab.get_mut(k as usize) else {
                continue;
            };
            if !slot.conn.receives_events() {
                continue;
            }
            if !slot.conn.outbox.is_empty() {
                // Behind what is already queued, so it goes through the outbox.
                self.batch.frames_of(k, &mut self.out);
                self.settle(k as usize);
                continue;
            }
            match self.batch.write(k, &mut slot.stream) {
                Ok(Written::All) => {}
                Ok(Written::Blocked { rest, offset }) => {
                    slot.conn.outbox.queue_unsent(rest, offset);
                    self.settle(k as usize);
                }
                Err(_) => self.remove(k as usize),
            }
        }
        self.batch.clear(touched);
    }

    /// Stages batch events `start..end`, which share project, channels and roles (one route),
    /// for every subscriber, connection by connection: the matching and the tail are worked out
    /// once per connection and reused by each following event it receives.
    fn stage(&mut self, start: u32, end: u32) {
        let ev = self.batch.event(start);
        self.registry
            .collect(&ev.project, &ev.channels, &mut self.candidates);
        let mut staged = 0;
        for &k in &self.candidates {
            let Some(slot) = self.slab.get_mut(k as usize) else {
                continue;
            };
            if !slot.conn.receives_events() {
                continue;
            }
            for i in start..end {
                let ev = self.batch.event(i);
                if i > start && self.batch.extends(k, i) {
                    if slot.conn.offer_live(ev, self.cfg.max_outbound) == Live::Deliver {
                        self.batch.extend(k, i);
                        staged += 1;
                    }
                    continue;
                }
                let matched = slot
                    .conn
                    .session
                    .as_ref()
                    .is_some_and(|s| s.matching(ev).next().is_some());
                if !matched {
                    // The same route matches the same way for every event of the group.
                    break;
                }
                if slot.conn.offer_live(ev, self.cfg.max_outbound) == Live::Deliver
                    && let Some(session) = slot.conn.session.as_ref()
                {
                    self.batch
                        .stage(k, i, |buf, ev| write_tail(buf, session.matching(ev)));
                    staged += 1;
                }
            }
        }
        self.m.delivered.inc_by(staged);
    }

    fn finish_replay(
        &mut self,
        k: usize,
        serial: u32,
        outcome: Result<Vec<Arc<EncodedEvent>>, ReplayError>,
    ) {
        let Some(slot) = self.slab.get_mut(k) else {
            return;
        };
        if slot.conn.serial != serial || !slot.conn.receives_events() {
            return;
        }
        let mut env = conn_env!(self, k);
        slot.conn.finish_replay(outcome, self.position, &mut env);
        self.settle(k);
    }

    /// Hands the resumes started in this iteration to the control plane.
    fn request_replays(&mut self) {
        let mut keys = std::mem::take(&mut self.replays);
        for k in keys.drain(..) {
            let Some(slot) = self.slab.get(k as usize) else {
                continue;
            };
            let (Some(session), Some(replay)) = (&slot.conn.session, &slot.conn.replay) else {
                continue;
            };
            let request = ReplayRequest {
                shard: self.id,
                key: k,
                serial: slot.conn.serial,
                query: ReplayQuery {
                    after: replay.after,
                    upto: replay.upto,
                    project: session.project.to_string(),
                    channels: session.channels().iter().map(|c| c.to_string()).collect(),
                    roles: session.roles.to_vec(),
                    max_events: self.replay_max_events,
                    max_bytes: self.replay_max_bytes,
                },
            };
            if self.replay_tx.send(request).is_err() {
                let serial = slot.conn.serial;
                let outcome = Err(ReplayError::Unavailable("the control plane is gone".into()));
                self.finish_replay(k as usize, serial, outcome);
            }
        }
        self.replays = keys;
    }

    fn tick(&mut self) {
        let keys = self.take_occupied_keys();
        for &k in &keys {
            let Some(slot) = self.slab.get_mut(k) else {
                continue;
            };
            let mut env = conn_env!(self, k);
            if slot.conn.on_tick(&mut env) {
                if slot.conn.phase == Phase::Handshake {
                    self.m
                        .metrics
                        .handshake_rejected
                        .with_label_values(&["timeout"])
                        .inc();
                }
                self.out.clear();
                self.remove(k);
            } else if !self.out.is_empty() {
                self.settle(k);
            }
        }
        self.sweep_keys = keys;
        let c = std::mem::take(&mut self.counters);
        self.m.rate_limited.inc_by(c.rate_limited);
        self.m.idle_closed.inc_by(c.idle_closed);
        self.registry.collect_garbage();
    }

    /// The keys of every connection, in a reused buffer (hand it back with `sweep_keys`). The
    /// slab is reserved far beyond its use, so walking its capacity would cost more.
    fn take_occupied_keys(&mut self) -> Vec<usize> {
        let mut keys = std::mem::take(&mut self.sweep_keys);
        keys.clear();
        keys.extend(self.slab.iter().map(|(k, _)| k));
        keys
    }

    fn begin_shutdown(&mut self, drain: Duration) {
        if self.drain_deadline.is_some() {
            return;
        }
        self.drain_deadline = Some(Instant::now() + drain);
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.accept_more = false;
        self.accept_paused_until = None;
        let keys = self.take_occupied_keys();
        for &k in &keys {
            let Some(slot) = self.slab.get_mut(k) else {
                continue;
            };
            let mut env = conn_env!(self, k);
            if slot.conn.shutdown(&mut env) {
                self.out.clear();
                self.remove(k);
            } else {
                self.settle(k);
            }
        }
        self.sweep_keys = keys;
    }
}
