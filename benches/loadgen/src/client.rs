//! The client engine: one mio event loop holding many WebSocket (or plain TCP) connections.
//!
//! Owns connection lifecycles (connect, upgrade, `connected`, optional Gen C subscribe, pings,
//! close), the open rate and in-flight bound, and, when events are tracked, every connection's
//! sequence check and the process-wide latency figures of the current phase. It must stay cheap
//! per connection: one slab entry of about 100 bytes; a connection owns heap memory only while a
//! server frame or one of its own writes is split across reads or writes.
//!
//! Events are recognised without parsing JSON: the payload field `"hb":"P.G.C.S.T"` (phase,
//! index within the phase, channel, sequence within the channel, send time in unix
//! microseconds) is found with memmem wherever the server put it.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use memchr::memmem::Finder;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use herald::ws::decoder::encode_client_frame;
use herald::ws::frame::{close_payload, parse_close_payload};

use crate::messages::{HistCounts, Percentiles, PhaseReport};
use crate::reasons::bump;
use crate::socket::{connect_done, explain, start_connect, write_some};
use crate::system::{rss_bytes, unix_us};
use crate::target::Target;
use crate::wire::{
    MAX_BODY_QUOTE, Message, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
    Response, ServerFrame, classify, first_message, mask, parse_response, parse_server_frame,
    refusal_at_eof,
};

/// Shared read buffer: one per process, never per connection.
const SCRATCH_BYTES: usize = 64 * 1024;

/// "No sequence number yet".
pub(crate) const NONE: u32 = u32::MAX;
/// Events per phase whose per-event figures (time to first and last subscriber) are kept.
pub(crate) const MAX_TRACKED_EVENTS: usize = 1 << 20;
/// The token of the waker that interrupts `poll` (a worker's command arrived).
pub(crate) const WAKER: Token = Token(usize::MAX);
/// Highest latency the histograms hold exactly (longer ones are recorded as this).
const HIST_MAX_US: u64 = 120_000_000;

/// Which target and channel a connection belongs to; a replacement keeps its slot's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Slot {
    pub target: u16,
    pub chan: u16,
    /// Subscribes with the run's query (`fanout --query-fraction`).
    pub filtered: bool,
}

pub(crate) struct EngineOptions {
    /// New connections started per second; infinity: as fast as `max_inflight` allows.
    pub rate: f64,
    pub max_inflight: usize,
    pub handshake_timeout: Duration,
    /// Gen C: per channel the `subscribe` message sent after `connected` (the connection counts
    /// as open once the server confirms it), then per channel the one with the run's query for
    /// filtered slots, if any. `None`: Gen A, channels in the URL.
    pub subscribe: Option<Vec<String>>,
    pub track_events: bool,
    /// `connect` mode: close each connection as soon as it is open and record it.
    pub close_on_open: bool,
}

/// Where a connection is in its life; everything before `Open` counts as in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Upgrading,
    AwaitConnected,
    AwaitSubscribed,
    /// Plain TCP target: waiting for its first byte.
    AwaitByte,
    Open,
}

impl Phase {
    fn waiting_for(self) -> &'static str {
        match self {
            Self::Connecting => "the TCP connection",
            Self::Upgrading => "the upgrade response",
            Self::AwaitConnected => "the connected message",
            Self::AwaitSubscribed => "the subscribe response",
            Self::AwaitByte => "the first byte",
            Self::Open => "nothing",
        }
    }
}

/// A connection's sequence check within the current phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Track {
    pub phase_id: u32,
    /// Unix microseconds when the connection became subscribed: events sent later must arrive.
    pub connected_unix: u64,
    pub first: u32,
    pub next: u32,
    pub got: u32,
    pub gaps: u32,
    pub dups: u32,
}

impl Track {
    fn new(phase_id: u32, connected_unix: u64) -> Self {
        Self {
            phase_id,
            connected_unix,
            first: NONE,
            next: 0,
            got: 0,
            gaps: 0,
            dups: 0,
        }
    }

    fn on_seq(&mut self, s: u32) {
        self.got += 1;
        if self.first == NONE {
            self.first = s;
            self.next = s + 1;
        } else if s == self.next {
            self.next += 1;
        } else if s > self.next {
            self.gaps += s - self.next;
            self.next = s + 1;
        } else {
            self.dups += 1;
        }
    }
}

/// How a connection's phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Open at the end of the phase: must have every event sent after it subscribed.
    Live,
    /// Closed by herald-bench (churn) at this unix time: must have every event sent after it
    /// subscribed and more than `grace` before it closed.
    ClosedByUs(u64),
    /// Closed by the server: everything after the last event it got counts as missing.
    ClosedByServer,
}

/// One connection's verdict: (expected, unique events received, missing).
pub(crate) fn judge(t: &Track, times: &[u64], end: End, grace_us: u64) -> (u64, u64, u64) {
    let count = times.len() as u32;
    let lo = times.partition_point(|&s| s <= t.connected_unix) as u32;
    let hi = match end {
        End::Live | End::ClosedByServer => count,
        End::ClosedByUs(at) => times.partition_point(|&s| s + grace_us < at) as u32,
    };
    let unique = u64::from(t.got - t.dups);
    let missing = if t.first == NONE {
        u64::from(hi.saturating_sub(lo))
    } else {
        let head = t.first.saturating_sub(lo);
        let tail = hi.saturating_sub(t.next);
        u64::from(t.gaps) + u64::from(head) + u64::from(tail)
    };
    (unique + missing, unique, missing)
}

/// One client connection: the whole per-connection cost of herald-bench.
struct Conn {
    stream: TcpStream,
    phase: Phase,
    chan: u16,
    target: u16,
    filtered: bool,
    slot: u32,
    /// Microseconds since the engine's start when the connect began.
    started_us: u64,
    /// Bytes of a response head or frame that has not fully arrived; empty (no heap) when idle.
    inbuf: Vec<u8>,
    /// Bytes the socket would not take yet; empty (no heap) when idle.
    unsent: Vec<u8>,
    track: Track,
}

/// How handling a connection's input ended.
enum Step {
    Continue,
    /// The connection never opened (or broke the protocol); the reason goes in the summary.
    Fail(String),
    /// The server sent a close frame (code, if any).
    ServerClosed(Option<u16>),
}

pub(crate) struct Stats {
    pub opened: usize,
    pub inflight: usize,
    pub open: usize,
    pub connected: usize,
    pub failed: usize,
    pub failures: BTreeMap<String, u64>,
    pub handshake_us: Histogram<u64>,
    pub pings_answered: u64,
    /// Data messages received after `connected` (events and anything else).
    pub messages: u64,
    /// Open connections the server ended, by how: `close 1001`, `eof`, `io: ...`.
    pub lost: BTreeMap<String, u64>,
    pub closed_by_us: u64,
    /// Non-event messages after `connected`, by type (errors with their data).
    pub other_messages: BTreeMap<String, u64>,
    /// Events of no current phase (late ones, or sent while no phase ran).
    pub stray: u64,
    pub first_open_unix: u64,
    pub last_connected_unix: u64,
    /// Bench events accepted into a phase, over all phases (never reset).
    pub events: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            opened: 0,
            inflight: 0,
            open: 0,
            connected: 0,
            failed: 0,
            failures: BTreeMap::new(),
            handshake_us: new_hist(),
            pings_answered: 0,
            messages: 0,
            lost: BTreeMap::new(),
            closed_by_us: 0,
            other_messages: BTreeMap::new(),
            stray: 0,
            first_open_unix: 0,
            last_connected_unix: 0,
            events: 0,
        }
    }
}

pub(crate) fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

/// p50/p90/p99/p99.9/max in milliseconds (nulls when empty).
pub(crate) fn percentiles_ms(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    let q = |p: f64| Some(h.value_at_quantile(p) as f64 / 1000.0);
    Percentiles {
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        p999: q(0.999),
        max: Some(h.max() as f64 / 1000.0),
        mean: Some(h.mean() / 1000.0),
        count: h.len(),
    }
}

/// A histogram as `[[value_us, count], ...]`, for merging in another process.
pub(crate) fn hist_counts(h: &Histogram<u64>) -> HistCounts {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

pub(crate) fn hist_merge(h: &mut Histogram<u64>, counts: &HistCounts) {
    for &(value, count) in counts {
        let _ = h.record_n(value.clamp(1, HIST_MAX_US), count);
    }
}

/// Per-event figures within a phase: how many subscribers got it, and the first and last
/// latency (microseconds).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EvAgg {
    pub count: u32,
    pub min_us: u32,
    pub max_us: u32,
}

/// What this process saw of the current phase.
pub(crate) struct PhaseAcc {
    pub id: u32,
    pub hist: Histogram<u64>,
    pub delivered: u64,
    pub stray: u64,
    pub misrouted: u64,
    pub first_recv_unix: u64,
    pub last_recv_unix: u64,
    pub per_event: Vec<EvAgg>,
    /// Connections the server closed during the phase.
    pub lost: u64,
}

impl PhaseAcc {
    fn new(id: u32) -> Self {
        Self {
            id,
            hist: new_hist(),
            delivered: 0,
            stray: 0,
            misrouted: 0,
            first_recv_unix: 0,
            last_recv_unix: 0,
            per_event: Vec::new(),
            lost: 0,
        }
    }
}

/// A connection that ended during the phase, kept until the phase is judged.
struct Closed {
    chan: u16,
    track: Track,
    end: End,
}

/// Everything a connection's input handler may touch besides the connection.
struct Ctx<'a> {
    target: &'a Target,
    subscribe: Option<&'a [String]>,
    now_us: u64,
    now_unix: u64,
    stats: &'a mut Stats,
    acc: Option<&'a mut PhaseAcc>,
    finder: Option<&'a Finder<'static>>,
}

/// Finds the `"hb":"P.G.C.S.T"` field of a bench event and returns its five numbers.
pub(crate) fn parse_hb(finder: &Finder<'_>, msg: &[u8]) -> Option<[u64; 5]> {
    let at = finder.find(msg)? + finder.needle().len();
    let mut out = [0u64; 5];
    let mut i = 0;
    let mut cur: u64 = 0;
    let mut digits = 0;
    for &b in &msg[at..] {
        match b {
            b'0'..=b'9' if digits < 19 => {
                cur = cur * 10 + u64::from(b - b'0');
                digits += 1;
            }
            b'.' | b'"' if digits > 0 && i < 5 => {
                out[i] = cur;
                i += 1;
                cur = 0;
                digits = 0;
                if b == b'"' {
                    return (i == 5).then_some(out);
                }
            }
            _ => return None,
        }
    }
    None
}

pub(crate) fn hb_finder() -> Finder<'static> {
    Finder::new(b"\"hb\":\"")
}

impl Conn {
    /// Writes `bytes` after anything already queued; queues what the socket does not take.
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        if !self.unsent.is_empty() {
            self.unsent.extend_from_slice(bytes);
            return Ok(());
        }
        let written = write_some(&mut self.stream, bytes)?;
        if written < bytes.len() {
            self.unsent.extend_from_slice(&bytes[written..]);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.unsent.is_empty() {
            return Ok(());
        }
        let written = write_some(&mut self.stream, &self.unsent)?;
        if written == self.unsent.len() {
            self.unsent = Vec::new();
        } else {
            self.unsent.drain(..written);
        }
        Ok(())
    }

    /// Handles bytes just read, keeping whatever is incomplete.
    fn on_bytes(&mut self, data: &[u8], ctx: &mut Ctx<'_>) -> Step {
        if self.inbuf.is_empty() {
            let (used, step) = self.consume(data, ctx);
            if matches!(step, Step::Continue) && used < data.len() {
                self.inbuf.extend_from_slice(&data[used..]);
            }
            return step;
        }
        let mut buf = std::mem::take(&mut self.inbuf);
        buf.extend_from_slice(data);
        let (used, step) = self.consume(&buf, ctx);
        if matches!(step, Step::Continue) && used < buf.len() {
            buf.drain(..used);
            self.inbuf = buf;
        }
        step
    }

    /// Consumes every complete response head and frame at the start of `buf`.
    fn consume(&mut self, buf: &[u8], ctx: &mut Ctx<'_>) -> (usize, Step) {
        let mut pos = 0;
        loop {
            let rest = &buf[pos..];
            match self.phase {
                Phase::Connecting => {
                    return (
                        pos,
                        Step::Fail("data before the connection was established".into()),
                    );
                }
                Phase::AwaitByte => {
                    if rest.is_empty() {
                        return (pos, Step::Continue);
                    }
                    self.opened(ctx);
                    // A plain TCP target's bytes mean nothing beyond "accepted".
                    return (buf.len(), Step::Continue);
                }
                Phase::Upgrading => match parse_response(rest, &ctx.target.accept) {
                    Response::Incomplete => return (pos, Step::Continue),
                    Response::Refused(reason) => return (pos, Step::Fail(reason)),
                    Response::Upgraded(len) => {
                        pos += len;
                        self.phase = Phase::AwaitConnected;
                    }
                },
                Phase::AwaitConnected | Phase::AwaitSubscribed | Phase::Open => {
                    if self.phase == Phase::Open && ctx.target.tcp {
                        return (buf.len(), Step::Continue);
                    }
                    let frame = match parse_server_frame(rest) {
                        Ok(Some(f)) => f,
                        Ok(None) => return (pos, Step::Continue),
                        Err(e) => return (pos, Step::Fail(format!("protocol error: {e}"))),
                    };
                    let total = frame.header_len + frame.payload_len;
                    if rest.len() < total {
                        return (pos, Step::Continue);
                    }
                    pos += total;
                    let payload = &rest[frame.header_len..total];
                    let step = self.on_frame(frame, payload, ctx);
                    if !matches!(step, Step::Continue) {
                        return (pos, step);
                    }
                }
            }
        }
    }

    /// The connection is subscribed: count it and start its sequence check.
    fn opened(&mut self, ctx: &mut Ctx<'_>) {
        self.phase = Phase::Open;
        let stats = &mut *ctx.stats;
        stats.inflight -= 1;
        stats.open += 1;
        stats.connected += 1;
        stats.last_connected_unix = ctx.now_unix;
        let _ = stats.handshake_us.record(
            ctx.now_us
                .saturating_sub(self.started_us)
                .clamp(1, HIST_MAX_US),
        );
        let phase_id = ctx.acc.as_ref().map_or(0, |a| a.id);
        self.track = Track::new(phase_id, ctx.now_unix);
    }

    fn on_frame(&mut self, frame: ServerFrame, payload: &[u8], ctx: &mut Ctx<'_>) -> Step {
        let io_fail = |e: io::Error| Step::Fail(format!("write: {e}"));
        match frame.opcode {
            OP_PING => {
                let pong = encode_client_frame(true, OP_PONG, payload, mask());
                if let Err(e) = self.send(&pong) {
                    return io_fail(e);
                }
                ctx.stats.pings_answered += 1;
                Step::Continue
            }
            OP_PONG => Step::Continue,
            OP_CLOSE => {
                let code = parse_close_payload(payload).ok().and_then(|c| c.code);
                let reply = code.map(|c| close_payload(c, "")).unwrap_or_default();
                // The socket is closed right after; a failed reply changes nothing.
                let _ = self.send(&encode_client_frame(true, OP_CLOSE, &reply, mask()));
                Step::ServerClosed(code)
            }
            OP_TEXT if self.phase == Phase::AwaitConnected && frame.fin => {
                if let Err(reason) = first_message(payload) {
                    return Step::Fail(reason);
                }
                match ctx.subscribe {
                    None => self.opened(ctx),
                    Some(messages) => {
                        let half = if self.filtered { messages.len() / 2 } else { 0 };
                        let text = &messages[usize::from(self.chan) + half];
                        let frame = encode_client_frame(true, OP_TEXT, text.as_bytes(), mask());
                        if let Err(e) = self.send(&frame) {
                            return io_fail(e);
                        }
                        self.phase = Phase::AwaitSubscribed;
                    }
                }
                Step::Continue
            }
            OP_TEXT if self.phase == Phase::AwaitSubscribed && frame.fin => {
                match classify(payload) {
                    Ok(Message::Subscribed) => {
                        self.opened(ctx);
                        Step::Continue
                    }
                    Ok(Message::Error(data)) => Step::Fail(format!("subscribe refused: {data}")),
                    // Anything else before the response (an event of another subscription
                    // cannot exist yet): ignore it.
                    Ok(_) => Step::Continue,
                    Err(reason) => Step::Fail(reason),
                }
            }
            OP_TEXT | OP_BINARY | OP_CONTINUATION if self.phase != Phase::Open => {
                Step::Fail(format!(
                    "a fragmented or binary message while waiting for {}",
                    self.phase.waiting_for()
                ))
            }
            OP_TEXT | OP_BINARY | OP_CONTINUATION => {
                if frame.fin {
                    ctx.stats.messages += 1;
                    if let Some(finder) = ctx.finder {
                        self.on_message(payload, finder, ctx);
                    }
                }
                Step::Continue
            }
            other => Step::Fail(format!("protocol error: unknown opcode {other:#x}")),
        }
    }

    /// An application message on an open connection, with event tracking on.
    fn on_message(&mut self, payload: &[u8], finder: &Finder<'_>, ctx: &mut Ctx<'_>) {
        let Some([ph, g, c, s, sent]) = parse_hb(finder, payload) else {
            let kind = match classify(payload) {
                Ok(Message::Error(data)) => {
                    format!(
                        "error {}",
                        data.chars().take(MAX_BODY_QUOTE).collect::<String>()
                    )
                }
                Ok(Message::Other(Some(t))) => t,
                Ok(m) => format!("{m:?}"),
                Err(e) => e,
            };
            bump(&mut ctx.stats.other_messages, kind);
            return;
        };
        let Some(acc) = ctx.acc.as_deref_mut() else {
            ctx.stats.stray += 1;
            return;
        };
        if ph != u64::from(acc.id) {
            acc.stray += 1;
            return;
        }
        if c != u64::from(self.chan) {
            acc.misrouted += 1;
            return;
        }
        if self.track.phase_id != acc.id {
            self.track = Track::new(acc.id, self.track.connected_unix);
        }
        self.track.on_seq(u32::try_from(s).unwrap_or(NONE - 1));
        let latency = ctx.now_unix.saturating_sub(sent);
        let _ = acc.hist.record(latency.clamp(1, HIST_MAX_US));
        acc.delivered += 1;
        ctx.stats.events += 1;
        if acc.first_recv_unix == 0 {
            acc.first_recv_unix = ctx.now_unix;
        }
        acc.last_recv_unix = acc.last_recv_unix.max(ctx.now_unix);
        if let Ok(g) = usize::try_from(g)
            && g < MAX_TRACKED_EVENTS
        {
            if acc.per_event.len() <= g {
                acc.per_event.resize(g + 1, EvAgg::default());
            }
            let lat = u32::try_from(latency).unwrap_or(u32::MAX);
            let e = &mut acc.per_event[g];
            if e.count == 0 {
                e.min_us = lat;
                e.max_us = lat;
            } else {
                e.min_us = e.min_us.min(lat);
                e.max_us = e.max_us.max(lat);
            }
            e.count += 1;
        }
    }
}

/// How far one readiness event is read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reads {
    None,
    /// Until a read comes back shorter than the buffer: the socket held no more then, and
    /// bytes that arrive later raise a new edge. One `read` per message instead of two: a
    /// million deliveries are a million system calls fewer.
    UntilShort,
    /// Until the socket would block: the peer's FIN or an error raises no new edge, so a short
    /// read must not end it.
    UntilBlocked,
}

/// The event loop and its connections.
pub(crate) struct Engine {
    poll: Poll,
    events: Events,
    conns: Slab<Conn>,
    scratch: Box<[u8]>,
    targets: Vec<Target>,
    slots: Vec<Slot>,
    sources: Vec<Ipv4Addr>,
    next_source: usize,
    /// Slots waiting for a connection, in order.
    pending: VecDeque<u32>,
    /// Slots whose connection failed or was lost (not retried until `refill`).
    vacant: Vec<u32>,
    /// Open-rate bucket: since when, and how many started since then.
    bucket: (Instant, u64),
    opts: EngineOptions,
    finder: Finder<'static>,
    pub stats: Stats,
    pub epoch: Instant,
    pub acc: Option<PhaseAcc>,
    closed: Vec<Closed>,
    /// The waker fired during the last `poll`.
    pub woken: bool,
}

impl Engine {
    pub fn new(
        targets: Vec<Target>,
        sources: Vec<Ipv4Addr>,
        slots: Vec<Slot>,
        opts: EngineOptions,
    ) -> anyhow::Result<Self> {
        let now = Instant::now();
        Ok(Self {
            poll: Poll::new().context("cannot create an epoll instance")?,
            events: Events::with_capacity(1024),
            conns: Slab::with_capacity(slots.len()),
            scratch: vec![0u8; SCRATCH_BYTES].into_boxed_slice(),
            targets,
            slots,
            sources,
            next_source: 0,
            pending: VecDeque::new(),
            vacant: Vec::new(),
            bucket: (now, 0),
            opts,
            finder: hb_finder(),
            stats: Stats::default(),
            epoch: now,
            acc: None,
            closed: Vec::new(),
            woken: false,
        })
    }

    /// A waker that interrupts `poll` from another thread.
    pub fn waker(&self) -> anyhow::Result<Waker> {
        Waker::new(self.poll.registry(), WAKER).context("cannot create a waker")
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Queues a connection for every slot.
    pub fn queue_all(&mut self) {
        for slot in 0..self.slots.len() as u32 {
            self.queue(slot);
        }
    }

    fn queue(&mut self, slot: u32) {
        if self.pending.is_empty() {
            self.bucket = (Instant::now(), 0);
        }
        self.pending.push_back(slot);
    }

    /// Queues a new connection for every slot whose connection failed or was lost.
    pub fn refill(&mut self) -> usize {
        let slots = std::mem::take(&mut self.vacant);
        let n = slots.len();
        for slot in slots {
            self.queue(slot);
        }
        n
    }

    pub fn set_rate(&mut self, rate: f64) {
        self.opts.rate = rate;
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Nothing waiting and nothing in flight.
    pub fn settled(&self) -> bool {
        self.pending.is_empty() && self.stats.inflight == 0
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Starts as many queued connections as the rate and the in-flight bound allow.
    pub fn start_due(&mut self, now: Instant) {
        if self.pending.is_empty() {
            return;
        }
        let allowed = if self.opts.rate.is_finite() {
            let due = (now.duration_since(self.bucket.0).as_secs_f64() * self.opts.rate) as u64 + 1;
            due.saturating_sub(self.bucket.1)
        } else {
            u64::MAX
        };
        let mut started = 0;
        while started < allowed && self.stats.inflight < self.opts.max_inflight {
            let Some(slot) = self.pending.pop_front() else {
                break;
            };
            self.open_one(slot);
            started += 1;
        }
        self.bucket.1 += started;
    }

    fn open_one(&mut self, slot: u32) {
        self.stats.opened += 1;
        if self.stats.first_open_unix == 0 {
            self.stats.first_open_unix = unix_us();
        }
        let started_us = self.now_us();
        let source = (!self.sources.is_empty()).then(|| {
            let ip = self.sources[self.next_source % self.sources.len()];
            self.next_source += 1;
            ip
        });
        let Slot {
            target,
            chan,
            filtered,
        } = self.slots[slot as usize];
        let mut stream = match start_connect(self.targets[usize::from(target)].addr, source) {
            Ok(s) => s,
            Err(reason) => {
                self.stats.failed += 1;
                self.vacant.push(slot);
                bump(&mut self.stats.failures, reason);
                return;
            }
        };
        let entry = self.conns.vacant_entry();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(entry.key()),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.stats.failed += 1;
            self.vacant.push(slot);
            bump(&mut self.stats.failures, format!("epoll register: {e}"));
            return;
        }
        entry.insert(Conn {
            stream,
            phase: Phase::Connecting,
            chan,
            target,
            filtered,
            slot,
            started_us,
            inbuf: Vec::new(),
            unsent: Vec::new(),
            track: Track::new(0, 0),
        });
        self.stats.inflight += 1;
    }

    /// Drops connection `k` after the server ended it or it failed, and books why.
    fn finish(&mut self, k: usize, step: Step) {
        let Some(mut c) = self.conns.try_remove(k) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.stream);
        self.vacant.push(c.slot);
        let opened = c.phase == Phase::Open;
        if opened {
            self.stats.open -= 1;
            if let Some(acc) = &mut self.acc {
                acc.lost += 1;
                self.closed.push(Closed {
                    chan: c.chan,
                    track: c.track,
                    end: End::ClosedByServer,
                });
            }
        } else {
            self.stats.inflight -= 1;
            self.stats.failed += 1;
        }
        let reason = match step {
            Step::Continue => return,
            Step::Fail(reason) => reason,
            Step::ServerClosed(code) => {
                let code = code.map_or_else(|| "without a code".to_owned(), |c| c.to_string());
                format!("closed by the server ({code})")
            }
        };
        if opened {
            bump(&mut self.stats.lost, reason);
        } else {
            bump(&mut self.stats.failures, reason);
        }
    }

    /// Closes open connection `k` on herald-bench's initiative (a close frame first when
    /// `polite`), and queues a replacement when `reopen`.
    fn close_by_us(&mut self, k: usize, polite: bool, reopen: bool) {
        let Some(mut c) = self.conns.try_remove(k) else {
            return;
        };
        if !polite {
            // A reset instead of a FIN: neither side keeps a TIME_WAIT socket (connect mode).
            let _ = socket2::SockRef::from(&c.stream).set_linger(Some(Duration::ZERO));
        } else if !self.targets[usize::from(c.target)].tcp {
            let _ = c.send(&encode_client_frame(
                true,
                OP_CLOSE,
                &close_payload(1000, ""),
                mask(),
            ));
        }
        let _ = self.poll.registry().deregister(&mut c.stream);
        if c.phase == Phase::Open {
            self.stats.open -= 1;
        } else {
            self.stats.inflight -= 1;
        }
        self.stats.closed_by_us += 1;
        if c.phase == Phase::Open
            && let Some(acc) = &self.acc
            && c.track.phase_id == acc.id
        {
            self.closed.push(Closed {
                chan: c.chan,
                track: c.track,
                end: End::ClosedByUs(unix_us()),
            });
        }
        if reopen {
            self.queue(c.slot);
        } else {
            self.vacant.push(c.slot);
        }
    }

    /// Closes `n` open connections picked at random and queues their replacements.
    pub fn churn(&mut self, n: usize) -> usize {
        let cap = self.conns.capacity().max(1);
        let mut closed = 0;
        let mut tries = 0;
        while closed < n && tries < n * 8 + 64 {
            tries += 1;
            let k = rand::random_range(0..cap);
            if self.conns.get(k).is_some_and(|c| c.phase == Phase::Open) {
                self.close_by_us(k, true, true);
                closed += 1;
            }
        }
        closed
    }

    /// Closes every connection and forgets queued ones.
    pub fn close_all(&mut self) {
        self.pending.clear();
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for k in keys {
            self.close_by_us(k, true, false);
        }
    }

    /// Waits for socket events up to `timeout` and handles them.
    pub fn poll(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.woken = false;
        if let Err(e) = self.poll.poll(&mut self.events, Some(timeout)) {
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(e).context("epoll_wait failed");
        }
        let ready: Vec<(usize, bool, Reads)> = self
            .events
            .iter()
            .map(|ev| {
                let reads = if ev.is_read_closed() || ev.is_error() {
                    Reads::UntilBlocked
                } else if ev.is_readable() {
                    Reads::UntilShort
                } else {
                    Reads::None
                };
                (ev.token().0, ev.is_writable(), reads)
            })
            .collect();
        for (k, writable, reads) in ready {
            if Token(k) == WAKER {
                self.woken = true;
                continue;
            }
            self.on_event(k, writable, reads);
        }
        Ok(())
    }

    fn on_event(&mut self, k: usize, writable: bool, reads: Reads) {
        let Some(c) = self.conns.get_mut(k) else {
            return;
        };
        if c.phase == Phase::Connecting {
            match connect_done(&c.stream) {
                Ok(false) => return,
                Ok(true) => {
                    let target = &self.targets[usize::from(c.target)];
                    if target.tcp {
                        c.phase = Phase::AwaitByte;
                    } else {
                        c.phase = Phase::Upgrading;
                        if let Err(e) = c.send(&target.requests[usize::from(c.chan)]) {
                            return self.finish(k, Step::Fail(format!("write: {e}")));
                        }
                    }
                }
                Err(e) => {
                    return self.finish(k, Step::Fail(explain("connect", &e, None)));
                }
            }
        } else if writable && let Err(e) = c.flush() {
            return self.finish(k, Step::Fail(format!("write: {e}")));
        }
        if reads != Reads::None {
            self.read(k, reads);
        }
    }

    /// Reads what the event announced (epoll is edge-triggered, so nothing may be left behind
    /// that no new edge will announce).
    fn read(&mut self, k: usize, reads: Reads) {
        loop {
            let now_us = self.now_us();
            let Some(c) = self.conns.get_mut(k) else {
                return;
            };
            match c.stream.read(&mut self.scratch) {
                Ok(0) => {
                    let reason = match c.phase {
                        Phase::Open => "closed by the server without a close frame".to_owned(),
                        Phase::Upgrading => refusal_at_eof(&c.inbuf),
                        phase => format!(
                            "connection closed while waiting for {}",
                            phase.waiting_for()
                        ),
                    };
                    return self.finish(k, Step::Fail(reason));
                }
                Ok(n) => {
                    let mut ctx = Ctx {
                        target: &self.targets[usize::from(c.target)],
                        subscribe: self.opts.subscribe.as_deref(),
                        now_us,
                        now_unix: unix_us(),
                        stats: &mut self.stats,
                        acc: self.acc.as_mut(),
                        finder: self.opts.track_events.then_some(&self.finder),
                    };
                    let step = c.on_bytes(&self.scratch[..n], &mut ctx);
                    if !matches!(step, Step::Continue) {
                        return self.finish(k, step);
                    }
                    if self.opts.close_on_open && c.phase == Phase::Open {
                        return self.close_by_us(k, false, true);
                    }
                    if reads == Reads::UntilShort && n < self.scratch.len() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.finish(k, Step::Fail(format!("read: {e}"))),
            }
        }
    }

    /// Fails connections that have been in flight for longer than the handshake timeout.
    pub fn expire(&mut self) {
        if self.stats.inflight == 0 {
            return;
        }
        let timeout = self.opts.handshake_timeout;
        let timeout_us = u64::try_from(timeout.as_micros()).unwrap_or(u64::MAX);
        let cutoff = self.now_us().saturating_sub(timeout_us);
        let late: Vec<(usize, Phase)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.phase != Phase::Open && c.started_us < cutoff)
            .map(|(k, c)| (k, c.phase))
            .collect();
        for (k, phase) in late {
            let reason = format!(
                "timeout: no answer within {timeout:?} while waiting for {}",
                phase.waiting_for()
            );
            self.finish(k, Step::Fail(reason));
        }
    }

    pub fn status_line(&self, requested: usize) -> String {
        let s = &self.stats;
        format!(
            "{:6.1}s started {}/{requested} open {} in-flight {} failed {} lost {} pings {} rss {:.1} MiB",
            self.epoch.elapsed().as_secs_f64(),
            s.opened,
            s.open,
            s.inflight,
            s.failed,
            s.lost.values().sum::<u64>(),
            s.pings_answered,
            rss_bytes() as f64 / (1 << 20) as f64,
        )
    }

    /// Starts phase `id`: every open connection's sequence check starts over.
    pub fn begin_phase(&mut self, id: u32) {
        self.acc = Some(PhaseAcc::new(id));
        self.closed.clear();
        for (_, c) in &mut self.conns {
            if c.phase == Phase::Open {
                c.track = Track::new(id, c.track.connected_unix);
            }
        }
    }

    /// Ends the current phase and judges every connection against what was published: per
    /// channel, the send time of each sequence number. `grace_us`: how long before a churn
    /// close an event must have been sent to be owed to that connection.
    /// `None` when no phase is running.
    pub fn end_phase(
        &mut self,
        times: &[Vec<u64>],
        grace_us: u64,
        max_events: usize,
    ) -> Option<PhaseReport> {
        let acc = self.acc.take()?;
        let empty = Vec::new();
        let times_of = |chan: u16| times.get(usize::from(chan)).unwrap_or(&empty);
        let mut totals = [0u64; 3];
        let mut dups = 0u64;
        let mut judged = 0u64;
        let mut with_loss = 0u64;
        let mut examples = Vec::new();
        let mut add = |chan: u16, t: &Track, end: End| {
            let (expected, unique, missing) = judge(t, times_of(chan), end, grace_us);
            judged += 1;
            totals[0] += expected;
            totals[1] += unique;
            totals[2] += missing;
            dups += u64::from(t.dups);
            if missing > 0 {
                with_loss += 1;
                if examples.len() < 5 {
                    examples.push(format!(
                        "channel {chan} ({end:?}): first {} next {} got {} gaps {} of {} sent, subscribed at {}",
                        if t.first == NONE { -1 } else { i64::from(t.first) },
                        t.next,
                        t.got,
                        t.gaps,
                        times_of(chan).len(),
                        t.connected_unix
                    ));
                }
            }
        };
        for (_, c) in &self.conns {
            if c.phase == Phase::Open {
                add(c.chan, &c.track, End::Live);
            }
        }
        for c in &self.closed {
            add(c.chan, &c.track, c.end);
        }
        self.closed.clear();
        let events = acc
            .per_event
            .iter()
            .take(max_events)
            .map(|e| (e.count, e.min_us, e.max_us))
            .collect();
        Some(PhaseReport {
            id: acc.id,
            connections_judged: judged,
            expected: totals[0],
            unique: totals[1],
            missing: totals[2],
            duplicates: dups,
            delivered: acc.delivered,
            stray: acc.stray,
            misrouted: acc.misrouted,
            lost_connections: acc.lost,
            connections_with_loss: with_loss,
            loss_examples: examples,
            first_recv_unix: acc.first_recv_unix,
            last_recv_unix: acc.last_recv_unix,
            latency_hist: hist_counts(&acc.hist),
            events,
            error: None,
        })
    }
}

/// Open connections per channel.
pub(crate) fn subscribers_per_channel(engine: &Engine, channels: usize) -> Vec<u64> {
    let mut out = vec![0u64; channels];
    for (_, c) in &engine.conns {
        if c.phase == Phase::Open
            && let Some(n) = out.get_mut(usize::from(c.chan))
        {
            *n += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hb_is_found_anywhere() {
        let f = hb_finder();
        let msg = br#"{"type":"event","data":{"payload":{"hb":"3.17.2.9.1700000000123456","pad":"x"},"id":"1-0"}}"#;
        assert_eq!(
            parse_hb(&f, msg),
            Some([3, 17, 2, 9, 1_700_000_000_123_456])
        );
        assert_eq!(
            parse_hb(&f, br#"{"payload":{"pad":"x","hb":"1.2.3.4.5"}}"#),
            Some([1, 2, 3, 4, 5])
        );
        assert_eq!(parse_hb(&f, br#"{"hb":"1.2.3.4"}"#), None);
        assert_eq!(parse_hb(&f, br#"{"hb":"1.2.3.4.5.6"}"#), None);
        assert_eq!(parse_hb(&f, br#"{"hb":"1..3.4.5"}"#), None);
        assert_eq!(parse_hb(&f, br#"{"type":"connected"}"#), None);
        assert_eq!(parse_hb(&f, br#"{"hb":"1.2.3.4.5"#), None);
    }

    #[test]
    fn sequence_check() {
        let mut t = Track::new(1, 0);
        for s in [0, 1, 2, 5, 6, 6, 3] {
            t.on_seq(s);
        }
        assert_eq!((t.first, t.next, t.got, t.gaps, t.dups), (0, 7, 7, 2, 2));
    }

    #[test]
    fn judging() {
        let times: Vec<u64> = (0..10).map(|i| 1000 + i * 100).collect(); // 1000..1900
        // Subscribed before everything, got all.
        let mut t = Track::new(1, 500);
        (0..10).for_each(|s| t.on_seq(s));
        assert_eq!(judge(&t, &times, End::Live, 0), (10, 10, 0));
        // Missed the last two.
        let mut t = Track::new(1, 500);
        (0..8).for_each(|s| t.on_seq(s));
        assert_eq!(judge(&t, &times, End::Live, 0), (10, 8, 2));
        // Joined at 1450: owed 5..9; got 4..9 (one bonus event from before), nothing missing.
        let mut t = Track::new(1, 1450);
        (4..10).for_each(|s| t.on_seq(s));
        assert_eq!(judge(&t, &times, End::Live, 0).2, 0);
        // Joined at 1450 but first got 7: 5 and 6 missing.
        let mut t = Track::new(1, 1450);
        (7..10).for_each(|s| t.on_seq(s));
        assert_eq!(judge(&t, &times, End::Live, 0).2, 2);
        // Closed by us at 1650 with 100 us grace: owed up to events sent before 1550 (0..5).
        let mut t = Track::new(1, 500);
        (0..6).for_each(|s| t.on_seq(s));
        assert_eq!(judge(&t, &times, End::ClosedByUs(1650), 100).2, 0);
        let mut t = Track::new(1, 500);
        (0..4).for_each(|s| t.on_seq(s));
        assert_eq!(judge(&t, &times, End::ClosedByUs(1650), 100).2, 2);
        // Got nothing at all.
        let t = Track::new(1, 500);
        assert_eq!(judge(&t, &times, End::ClosedByServer, 0), (10, 0, 10));
        // Joined after the last event: owed nothing.
        let t = Track::new(1, 5000);
        assert_eq!(judge(&t, &times, End::Live, 0), (0, 0, 0));
    }

    #[test]
    fn histogram_round_trip() {
        let mut h = new_hist();
        for v in [5u64, 10, 10, 2000, 1_000_000] {
            h.record(v).unwrap();
        }
        let mut m = new_hist();
        hist_merge(&mut m, &hist_counts(&h));
        hist_merge(&mut m, &hist_counts(&h));
        assert_eq!(m.len(), 10);
        assert_eq!(m.max(), h.max());
    }

    #[test]
    fn conn_state_is_small() {
        // The per-connection promise of this tool: far below 2 KiB including the slab entry.
        let size = std::mem::size_of::<Conn>();
        assert!(size <= 120, "{size}");
    }
}
