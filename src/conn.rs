//! One client connection's state machine: upgrade, open WebSocket, close handshake.
//!
//! Owns what happens to a connection's bytes: the upgrade request, WebSocket messages, the
//! realtime protocol reply, rate limits, idle pings, the close sequence, and the decision of
//! which live events it receives and with which `subscriptions` tail. It does no system calls
//! and knows no sockets or event loop: its driver (the shard) feeds it bytes, time and events,
//! and hands [`Connection::transmit`] a writer. That boundary is what lets an io_uring driver
//! reuse it, and what its unit tests drive without a socket.
//!
//! # Driver contract
//!
//! The driver owns one [`Shared`] per shard and, per connection, a `Connection` and a socket.
//! Every call that takes a [`Context`] (made by [`Shared::context`] with the connection's key)
//! may leave frames in [`Shared::out`]; the driver must call [`Connection::transmit`] for that
//! same connection before it makes a context for another one, and act on what it answers:
//!
//! 1. On accept: [`Connection::new`]. Register for readability only.
//! 2. Bytes read: [`Connection::on_read`]; end of stream or a read error: remove. When the
//!    connection came from a trusted proxy, the upgrade may leave the forwarded client's
//!    per-IP count in [`Shared::admitted`]: the driver takes it and releases it at removal.
//! 3. Once a second: [`Connection::on_tick`] (deadlines, idle pings, the idle timeout), with
//!    a probe of the socket's acknowledgements ([`crate::liveness`]) that it calls only when
//!    a ping is due.
//! 4. Shutdown: [`Connection::on_shutdown`].
//! 5. Fan-out: [`Connection::offer`] per live event, which answers with a [`Verdict`]; the
//!    driver stages and writes delivered frames itself (the batch), unless the connection
//!    [`is_backlogged`](Connection::is_backlogged), in which case it appends them to
//!    [`Shared::out`] and transmits. Frames a socket did not take go back through
//!    [`Connection::queue_unsent`], followed by `transmit`.
//! 6. Resumes: after any call, the keys in [`Shared::resumes`] started one; the driver sends
//!    [`Connection::replay_query`] to the control plane and hands the answer to
//!    [`Connection::on_replay_answer`] (which ignores answers for an earlier connection of the
//!    same key: compare [`Connection::serial`]). Likewise the requests in
//!    [`Shared::resolves`] (Appwrite sessions to resolve) go to the resolver, and its answer to
//!    [`Connection::on_identity_answer`], which checks the serial itself; then `transmit`. A
//!    connection waiting for its upgrade's session does not want input until it is answered
//!    (step 7's read pause). On a permission change the driver calls
//!    [`Connection::on_permissions_changed`] for each connection.
//! 7. After `transmit`: [`Next::Blocked`] means wait for writability (register for it),
//!    [`Next::Idle`] means stop waiting for it, [`Next::HalfClose`] means shut the socket's
//!    write side, [`Next::Drop`] means remove the connection now. A write error also removes it.
//! 8. Before removing: [`Connection::unindex`].
//! 9. Memory: after each `transmit` the driver reads [`Connection::held_bytes`] and keeps the
//!    shard's total; over its cap it calls [`Connection::shed`] on the largest holders, then
//!    `transmit`.
//!
//! Memory: an idle open connection holds no buffers, only this struct and its session.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use smallvec::SmallVec;

use crate::admission::{IpLimits, IpTicket};
use crate::batch::Verdict;
use crate::config::Config;
use crate::event::{EncodedEvent, EventId, is_valid_name, write_tail};
use crate::filter::{Filter, FilterLimits};
use crate::identity::{Identity, JwtVerifier, SessionSecret};
use crate::mailbox::{
    Cancellation, IdentityAnswer, IdentityRequest, ReplayError, ReplayQuery, ResolveError,
    ResolvePurpose,
};
use crate::origin::OriginPolicy;
use crate::outbox::{OutFrame, Outbox, Overflow};
use crate::protocol::{self, Session, SessionLimits, UrlId};
use crate::registry::Registry;
use crate::ws::decoder::{Decoder, Message};
use crate::ws::frame::{Opcode, ProtocolError, close_code, close_payload};
use crate::ws::handshake::{self, Request};

/// How long a closing connection waits for the peer's close frame, or for its last bytes to
/// drain, before it is dropped.
pub const CLOSE_TIMEOUT_SECS: u32 = 5;

/// Settings a connection needs, derived once per shard from [`Config`].
#[derive(Debug, Clone)]
pub struct ConnConfig {
    pub max_message: usize,
    pub echo_max_message: usize,
    pub max_handshake: usize,
    pub handshake_timeout_secs: u32,
    pub message_timeout_secs: u32,
    pub message_rate: u32,
    pub message_bytes_rate: u32,
    pub message_rate_window_secs: u32,
    pub ping_interval_secs: u32,
    pub idle_timeout_secs: u32,
    pub max_outbound: usize,
    pub default_project: String,
    pub echo_path: Option<String>,
    pub origins: Arc<OriginPolicy>,
    pub limits: SessionLimits,
    /// The identity every connection starts with.
    pub guest: Arc<Identity>,
    pub jwt: Arc<JwtVerifier>,
    /// A session resolver is configured (`--auth-url`, `--appwrite-endpoint`).
    pub resolver: bool,
    /// How long an upgrade waits for its session to resolve before going on as a guest.
    pub resolve_timeout_secs: u32,
    pub replay_max_events: usize,
    pub replay_max_bytes: usize,
    /// This shard's random key for the ids of URL subscriptions ([`UrlId`]); set by
    /// [`Shared::new`].
    pub id_key: u64,
}

pub(crate) fn secs(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_secs() + u64::from(d.subsec_nanos() > 0)).unwrap_or(u32::MAX)
}

impl ConnConfig {
    pub fn from_config(c: &Config) -> Self {
        Self {
            max_message: c.max_message_bytes,
            echo_max_message: c.echo_max_message_bytes,
            max_handshake: c.max_handshake_bytes,
            handshake_timeout_secs: secs(c.handshake_timeout).max(1),
            message_timeout_secs: secs(c.message_timeout).max(1),
            message_rate: c.message_rate,
            message_bytes_rate: c.message_bytes_rate,
            message_rate_window_secs: secs(c.message_rate_window).max(1),
            ping_interval_secs: secs(c.ping_interval),
            idle_timeout_secs: secs(c.idle_timeout),
            max_outbound: c.max_outbound_bytes,
            default_project: c.default_project.clone(),
            echo_path: c.echo_path.clone(),
            origins: Arc::new(OriginPolicy::new(c.allowed_origins.clone())),
            limits: SessionLimits {
                max_subscriptions: c.max_subscriptions,
                max_total_channels: c.max_channels_per_connection,
                ..SessionLimits::default()
            },
            guest: Arc::new(Identity::guest()),
            jwt: Arc::new(JwtVerifier::none()),
            resolver: c.auth_url.is_some() || c.appwrite_endpoint.is_some(),
            resolve_timeout_secs: secs(c.auth_timeout).max(1),
            replay_max_events: c.replay_max_events,
            replay_max_bytes: c.replay_max_bytes,
            id_key: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the HTTP upgrade request.
    Handshake,
    /// The request is complete and carries an Appwrite session: the upgrade waits (not
    /// reading) for the resolver, then goes on as the user or, failing that, a guest.
    Resolving,
    /// A WebSocket carrying realtime or echo traffic.
    Open,
    /// herald sent a close frame and waits for the peer's.
    Closing,
    /// The close handshake is complete: drop once the outbox is written.
    FlushThenDrop,
    /// Send what is queued, then half-close and wait for the peer to hang up (so the last bytes
    /// are not destroyed by a reset).
    FlushThenLinger,
    /// Half-closed; discarding input until EOF or the deadline.
    Lingering,
    /// A deadline passed, or shutdown came before the upgrade: drop now, sending nothing.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Realtime,
    Echo,
}

/// Per-shard counters a connection bumps; the driver turns them into metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub rate_limited: u64,
    pub idle_closed: u64,
    /// Busy states let go at the tick: memory the allocator can give back.
    pub busy_released: u64,
    /// Idle pings sent, and those the peer's acknowledgements made unnecessary.
    pub pings_sent: u64,
    pub pings_saved: u64,
}

/// What a shard's connections share: settings, the channel index, the clock, and the scratch
/// space calls leave their results in. Owned by the driver, lent to one connection at a time
/// through [`Shared::context`].
#[derive(Debug)]
pub struct Shared {
    pub cfg: ConnConfig,
    pub registry: Registry,
    /// Seconds since the shard started.
    pub now: u32,
    /// The last event this shard has processed in each stream shard (by its index): a resume
    /// starting now replays up to it.
    pub positions: Vec<Option<EventId>>,
    pub counters: Counters,
    /// Frames the last call produced, for [`Connection::transmit`].
    pub out: Vec<OutFrame>,
    /// Keys of connections that started a resume; the driver takes them (contract, step 6).
    pub resumes: Vec<u32>,
    /// Sessions connections need resolved; the driver sets `shard` and sends them (step 6).
    pub resolves: Vec<IdentityRequest>,
    /// The process's per-IP limits, for clients behind a trusted proxy (counted at upgrade).
    pub ip_limits: Arc<IpLimits>,
    /// The time of `now`, for the per-IP handshake rate.
    pub instant: Instant,
    /// The count a connection behind a trusted proxy took at its upgrade, under the forwarded
    /// client address; the driver keeps it with the connection (contract, step 2).
    pub admitted: Option<IpTicket>,
}

impl Shared {
    pub fn new(mut cfg: ConnConfig, ip_limits: Arc<IpLimits>) -> Self {
        cfg.id_key = rand::random();
        Self {
            cfg,
            ip_limits,
            instant: Instant::now(),
            admitted: None,
            registry: Registry::default(),
            now: 0,
            positions: Vec::new(),
            counters: Counters::default(),
            out: Vec::new(),
            resumes: Vec::new(),
            resolves: Vec::new(),
        }
    }

    /// What the connection with slab key `key` may touch during one call.
    pub fn context(&mut self, key: u32) -> Context<'_> {
        Context {
            cfg: &self.cfg,
            registry: &mut self.registry,
            key,
            now: self.now,
            out: &mut self.out,
            counters: &mut self.counters,
            resumes: &mut self.resumes,
            resolves: &mut self.resolves,
            positions: &self.positions,
            ip_limits: &self.ip_limits,
            instant: self.instant,
            admitted: &mut self.admitted,
        }
    }
}

/// One connection's borrowed view of its shard's [`Shared`] state.
pub struct Context<'a> {
    cfg: &'a ConnConfig,
    registry: &'a mut Registry,
    key: u32,
    now: u32,
    out: &'a mut Vec<OutFrame>,
    counters: &'a mut Counters,
    resumes: &'a mut Vec<u32>,
    resolves: &'a mut Vec<IdentityRequest>,
    positions: &'a [Option<EventId>],
    ip_limits: &'a IpLimits,
    instant: Instant,
    admitted: &'a mut Option<IpTicket>,
}

impl Context<'_> {
    /// The last event the shard has processed in stream shard `shard`.
    fn position(&self, shard: u16) -> Option<EventId> {
        self.positions.get(usize::from(shard)).copied().flatten()
    }
}

/// Longest `lastEventId` quoted back in an error (an event id is at most 47 characters: a
/// shard of up to five digits, a colon, and two 20-digit numbers joined by a dash).
const MAX_LAST_EVENT_ID_BYTES: usize = 64;

/// How long a resume waits for its history before the client is told it is unavailable (4010)
/// and gets the live events held meanwhile.
const REPLAY_TIMEOUT_SECS: u32 = 30;

/// What one live event held for a resume costs the connection (its body is shared).
const HELD_EVENT_BYTES: usize = 64;

/// Error code for a `lastEventId` that is not an event id (README: Resume).
pub const INVALID_LAST_EVENT_ID: u16 = 4011;

/// A resume in progress. While the history is being fetched, live events for the connection
/// wait here, so replayed and live events join without a gap or a duplicate.
#[derive(Debug)]
struct Replay {
    after: EventId,
    /// The shard's position when the resume began: history covers `(after, upto]`, live
    /// delivery everything later.
    upto: Option<EventId>,
    /// The history answer is outstanding. Once it arrived the state only remains while this
    /// shard has not yet passed `after`, to skip live events the client already has.
    waiting: bool,
    buffered: VecDeque<Arc<EncodedEvent>>,
    buffered_bytes: usize,
    overflowed: bool,
    /// Tells the control plane that nobody waits for the history any more.
    cancellation: Cancellation,
    /// When the resume began, for [`REPLAY_TIMEOUT_SECS`].
    started: u32,
}

impl Drop for Replay {
    fn drop(&mut self) {
        if self.waiting {
            self.cancellation.cancel();
        }
    }
}

/// What the driver must do after [`Connection::transmit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Everything is written.
    Idle,
    /// Output waits for the socket to become writable.
    Blocked,
    /// Everything is written: shut the socket's write side and wait for the peer to hang up.
    HalfClose,
    /// Remove the connection now.
    Drop,
}

/// The answer of [`Connection::transmit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub next: Next,
    /// The outbound bound was exceeded: the connection is being closed as a slow consumer.
    pub slow_consumer: bool,
}

/// The frame of `event` for `session`: the shared prefix plus this connection's matching ids.
fn event_frame(session: &Session, event: &EncodedEvent, url_id: &UrlId) -> Option<OutFrame> {
    let mut ids = session.matching(event, url_id).peekable();
    ids.peek()?;
    let mut tail = SmallVec::new();
    write_tail(&mut tail, ids);
    Some(OutFrame::event(event.prefix.clone(), tail))
}

/// Slot numbers, and per slot its channels and compiled queries.
type UrlSlots = (Vec<u32>, Vec<(Vec<String>, Option<Filter>)>);

/// Gen B: the URL's query slots as subscriptions. Each slot, in increasing order, holds the URL
/// channels that name it (`<channel with . as _>[<slot>][]=<query>`) and the queries of the
/// first of them (the SDK repeats a slot's queries under each of its channels); channels that
/// name no slot form a last subscription that takes everything. `None` without slots. An
/// error is the text Appwrite answers with (1008, then close).
fn url_slots(
    q: &crate::query::RealtimeQuery,
    limits: &SessionLimits,
) -> Result<Option<UrlSlots>, String> {
    if q.slot_queries.is_empty() {
        return Ok(None);
    }
    if q.too_many_slot_queries {
        return Err(format!(
            "Too many queries in the URL: at most {}",
            crate::query::MAX_SLOT_QUERIES
        ));
    }
    // slot -> (the key whose queries it takes, channels, queries)
    let mut slots: std::collections::BTreeMap<u32, (String, Vec<String>, Vec<String>)> =
        std::collections::BTreeMap::new();
    let mut unslotted = Vec::new();
    for channel in &q.channels {
        let key = channel.replace('.', "_");
        let mut named = false;
        for (k, slot, query) in q.slot_queries.iter().filter(|(k, _, _)| *k == key) {
            named = true;
            let entry = slots
                .entry(*slot)
                .or_insert_with(|| (k.clone(), Vec::new(), Vec::new()));
            if !entry.1.contains(channel) {
                entry.1.push(channel.clone());
            }
            if entry.0 == *k {
                entry.2.push(query.clone());
            }
        }
        if !named {
            unslotted.push(channel.clone());
        }
    }
    let mut numbers = Vec::with_capacity(slots.len() + 1);
    let mut out = Vec::with_capacity(slots.len() + 1);
    let mut weight = 0;
    for (slot, (_, channels, queries)) in slots {
        let filter =
            Filter::compile(&queries, &FilterLimits::default()).map_err(|e| e.to_string())?;
        weight += filter.weight();
        numbers.push(slot);
        out.push((channels, Some(filter)));
    }
    if weight > limits.max_query_weight {
        return Err(format!(
            "Too many queries in the URL: at most {} queries and values in all",
            limits.max_query_weight
        ));
    }
    if !unslotted.is_empty() {
        numbers.push(numbers.last().map_or(0, |n| n.saturating_add(1)));
        out.push((unslotted, None));
    }
    Ok(Some((numbers, out)))
}

/// Who the upgrade request says the client is: a JWT (URL `jwt` or `x-appwrite-jwt`) verified
/// here, or a guest. Refusals are (error code, message, metric reason), as Appwrite answers.
fn handshake_identity(
    req: &Request,
    url_jwt: Option<&str>,
    project: &str,
    cx: &mut Context<'_>,
) -> Result<Arc<Identity>, (u16, String, &'static str)> {
    let Some(token) = url_jwt.or(req.jwt.as_deref()) else {
        return Ok(cx.cfg.guest.clone());
    };
    if req.session {
        let msg = "Cannot use a JWT and a session cookie at the same time.".to_owned();
        return Err((403, msg, "jwt_and_cookie"));
    }
    let registry = &mut *cx.registry;
    match cx
        .cfg
        .jwt
        .verify(token, project, &mut |r| registry.intern(r))
    {
        Ok(identity) => {
            let identity = identity.share_roles(|roles| registry.intern_roles(roles));
            Ok(registry.share_identity(Arc::new(identity)))
        }
        Err(e) => Err((401, e.to_string(), "jwt")),
    }
}

/// Who a resolved session is: the identity and the Account object the resolver returned, for
/// `connected.user` and the `authentication` response.
#[derive(Debug)]
struct Resolution {
    identity: Arc<Identity>,
    account: Option<serde_json::Value>,
}

/// The identity a resolver's answer makes, with its roles interned by the shard.
fn resolution(
    outcome: &Result<Arc<crate::identity::Resolved>, ResolveError>,
    session: &SessionSecret,
    cx: &mut Context<'_>,
) -> Result<Resolution, ResolveError> {
    let r = outcome.as_ref().map_err(Clone::clone)?;
    let registry = &mut *cx.registry;
    let identity = Identity::resolved(r, session.clone(), &mut |x| registry.intern(x))
        .share_roles(|roles| registry.intern_roles(roles));
    Ok(Resolution {
        identity: registry.share_identity(Arc::new(identity)),
        account: r.account.clone(),
    })
}

/// Outcome of a protocol error or handshake refusal, for the shard's metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incident {
    Rejected(&'static str),
    ProtocolError(u16),
}

#[derive(Debug)]
pub struct Connection {
    /// Tells this connection apart from a later one reusing its slab slot.
    serial: u32,
    phase: Phase,
    kind: Kind,
    ping_outstanding: bool,
    /// Its peer is a trusted proxy: that TCP's acknowledgements are the proxy's, not the
    /// client's, for as long as the connection lives.
    behind_proxy: bool,
    /// The client behind the proxy is yet to be counted (once, at the upgrade, which runs again
    /// after a session is resolved).
    forwarded_uncounted: bool,
    /// When the peer last showed it is there: a whole message, or its TCP acknowledging all
    /// that was sent (asked only when a ping is due).
    last_heard: u32,
    deadline: u32,
    /// Numbers `authentication` messages: only the answer to the latest counts.
    auth_seq: u8,
    /// A session of an `authentication` is being resolved (one at a time per connection).
    auth_pending: bool,
    /// Numbers permission-change resolutions likewise.
    refresh_seq: u8,
    /// Inline, not in the busy state: clients that send a message every window (the SDKs'
    /// `ping` every 20 s) would otherwise keep that state for good.
    rate: Rate,
    /// What only a busy connection holds; `None` on an idle one.
    busy: Option<Box<Busy>>,
    session: Option<Session>,
}

/// What a connection holds only while it is doing something: a request head split across
/// reads, an unfinished message, queued output, a resume. Kept apart so that an idle
/// connection pays one pointer for all of it; dropped at the tick once it is all empty again
/// ([`Busy::is_idle`]).
#[derive(Debug, Default)]
struct Busy {
    handshake: Option<Vec<u8>>,
    decoder: Decoder,
    outbox: Outbox,
    /// Boxed: rare, and large next to the rest.
    replay: Option<Box<Replay>>,
}

/// A connection's client messages and pings in the current rate window.
#[derive(Debug, Default)]
struct Rate {
    window_start: u32,
    messages: u16,
    pings: u16,
    /// Bytes of client messages.
    bytes: u32,
}

impl Rate {
    /// Starts a new window once the current one has passed.
    fn roll(&mut self, now: u32, window_secs: u32) {
        if now.saturating_sub(self.window_start) >= window_secs {
            *self = Self {
                window_start: now,
                ..Self::default()
            };
        }
    }
}

impl Busy {
    /// Nothing held.
    fn is_idle(&self) -> bool {
        self.handshake.is_none()
            && self.decoder.is_idle()
            && self.outbox.is_empty()
            && self.replay.is_none()
    }
}

impl Connection {
    /// A connection just accepted. `behind_proxy`: its peer is a trusted proxy
    /// ([`IpTicket::FORWARDED`]), so the client address, counted at the upgrade, comes with the
    /// request.
    pub fn new(serial: u32, now: u32, cfg: &ConnConfig, behind_proxy: bool) -> Self {
        Self {
            behind_proxy,
            forwarded_uncounted: behind_proxy,
            serial,
            phase: Phase::Handshake,
            kind: Kind::Realtime,
            ping_outstanding: false,
            last_heard: now,
            auth_seq: 0,
            auth_pending: false,
            refresh_seq: 0,
            deadline: now.saturating_add(cfg.handshake_timeout_secs),
            rate: Rate {
                window_start: now,
                ..Rate::default()
            },
            busy: None,
            session: None,
        }
    }

    /// A connection refused at accept (per-IP limits): answers `status` with `message` right
    /// away, without waiting for its request, then half-closes.
    pub fn refuse_at_accept(
        &mut self,
        status: u16,
        message: &str,
        reason: &'static str,
        cx: &mut Context<'_>,
    ) -> Incident {
        self.reject(status, message, cx, reason);
        // Refused sockets still hold a slot: let them go sooner than the usual close timeout.
        self.deadline = cx.now.saturating_add(1);
        Incident::Rejected(reason)
    }

    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// The outbound bound for this connection (the echo endpoint must hold whole echoed messages).
    fn outbound_limit(&self, cfg: &ConnConfig) -> usize {
        match self.kind {
            Kind::Realtime => cfg.max_outbound,
            Kind::Echo => cfg.max_outbound.max(cfg.echo_max_message.saturating_mul(2)),
        }
    }

    /// The id of this connection's URL subscription.
    fn url_id(&self, cfg: &ConnConfig) -> UrlId {
        UrlId::new(cfg.id_key, self.serial)
    }

    /// The busy state, made when first needed.
    fn busy(&mut self) -> &mut Busy {
        self.busy.get_or_insert_with(Box::default)
    }

    fn decoder_is_idle(&self) -> bool {
        self.busy.as_ref().is_none_or(|b| b.decoder.is_idle())
    }

    /// Lets go of an unfinished message.
    fn clear_decoder(&mut self) {
        if let Some(b) = &mut self.busy {
            b.decoder = Decoder::default();
        }
    }

    fn replay(&self) -> Option<&Replay> {
        self.busy.as_ref()?.replay.as_deref()
    }

    /// A resume whose history arrived is kept only while this shard has not passed the point
    /// the client resumed from (to skip live events it already has); once it has, it ends
    /// here too, not only when the next live event comes.
    fn end_finished_replay(&mut self, cx: &Context<'_>) {
        if self
            .replay()
            .is_some_and(|r| !r.waiting && cx.position(r.after.shard).is_some_and(|p| p >= r.after))
        {
            self.end_replay();
        }
    }

    fn end_replay(&mut self) {
        if let Some(b) = &mut self.busy {
            b.replay = None;
        }
    }

    /// Takes the outbox out to write it ([`Self::put_outbox`] puts it back), so that a
    /// connection whose output all fits the socket never makes its busy state.
    fn take_outbox(&mut self) -> Outbox {
        self.busy
            .as_mut()
            .map(|b| std::mem::take(&mut b.outbox))
            .unwrap_or_default()
    }

    fn put_outbox(&mut self, outbox: Outbox) {
        if !outbox.is_empty() {
            self.busy().outbox = outbox;
        }
    }

    /// True for an open realtime connection, the only kind events go to.
    fn receives_events(&self) -> bool {
        self.phase == Phase::Open && self.kind == Kind::Realtime
    }

    /// Memory a client can make this connection hold alone, for the shard's cap on the total:
    /// queued output (without the event bodies all subscribers share), an unfinished message
    /// or request head, live events held for a resume (a reference each).
    pub fn held_bytes(&self) -> usize {
        self.busy.as_ref().map_or(0, |b| {
            b.outbox.own_bytes()
                + b.decoder.held_bytes()
                + b.handshake.as_ref().map_or(0, Vec::capacity)
                + b.replay
                    .as_ref()
                    .map_or(0, |r| r.buffered.len() * HELD_EVENT_BYTES)
        })
    }

    /// Whether [`Connection::shed`] would let go of anything: not once it is closing (what it
    /// still holds goes at its close deadline, which shedding again would only push back).
    pub fn sheddable(&self) -> bool {
        matches!(
            self.phase,
            Phase::Open | Phase::Handshake | Phase::Resolving
        )
    }

    /// The shard holds more than its cap and this connection is among the largest holders:
    /// lets go of what it holds and closes (contract, step 9) with 1009 when most of it was an
    /// unfinished message, 1013 when it was output or held events. Answers the close code, none
    /// for a connection that was not a WebSocket yet (it is just dropped).
    pub fn shed(&mut self, cx: &mut Context<'_>) -> Option<u16> {
        let unfinished = self.busy.as_ref().map_or(0, |b| {
            b.decoder.held_bytes() + b.handshake.as_ref().map_or(0, Vec::capacity)
        });
        let code = if unfinished * 2 >= self.held_bytes() {
            close_code::TOO_BIG
        } else {
            close_code::TRY_AGAIN_LATER
        };
        if let Some(b) = &mut self.busy {
            b.decoder = Decoder::default();
            b.outbox.discard_unstarted();
            b.replay = None;
        }
        match self.phase {
            Phase::Handshake | Phase::Resolving => {
                if let Some(b) = &mut self.busy {
                    b.handshake = None;
                }
                self.phase = Phase::Done;
                return None;
            }
            Phase::Open => {
                let reason = if code == close_code::TOO_BIG {
                    "server memory cap: unfinished message dropped"
                } else {
                    "server memory cap: queued output dropped"
                };
                cx.out.push(OutFrame::new(
                    Opcode::Close,
                    Bytes::from(close_payload(code, reason)),
                    SmallVec::new(),
                ));
                self.enter(Phase::FlushThenLinger, cx.now);
            }
            _ => self.enter(Phase::FlushThenDrop, cx.now),
        }
        Some(code)
    }

    /// Whether the driver should read from this connection now: not while its queued output is
    /// over half its bound. A client that does not read what it asks for is not read from, and
    /// TCP slows it down, instead of its requests piling up answers until it is cut off.
    pub fn wants_input(&self, cfg: &ConnConfig) -> bool {
        let queued = self.busy.as_ref().map_or(0, |b| b.outbox.held_bytes());
        self.phase != Phase::Resolving && queued <= self.outbound_limit(cfg) / 2
    }

    /// Output is queued: new frames must go behind it, through [`Shared::out`] and transmit.
    pub fn is_backlogged(&self) -> bool {
        self.busy.as_ref().is_some_and(|b| !b.outbox.is_empty())
    }

    /// Handles bytes just read from the socket. `data` is the driver's scratch buffer; it may
    /// be changed (unmasked in place).
    pub fn on_read(&mut self, data: &mut [u8], cx: &mut Context<'_>) -> Option<Incident> {
        match self.phase {
            Phase::Handshake => self.on_handshake_bytes(data, cx),
            Phase::Open | Phase::Closing => self.on_ws_bytes(data, cx),
            Phase::Resolving
            | Phase::FlushThenDrop
            | Phase::FlushThenLinger
            | Phase::Lingering
            | Phase::Done => None,
        }
    }
    fn on_handshake_bytes(&mut self, data: &mut [u8], cx: &mut Context<'_>) -> Option<Incident> {
        let mut held = self.busy.as_mut().and_then(|b| b.handshake.take());
        let buf: &mut [u8] = match held.as_mut() {
            Some(h) => {
                h.extend_from_slice(data);
                &mut h[..]
            }
            None => data,
        };
        match handshake::parse_request(buf, cx.cfg.max_handshake) {
            Err(e) => self.reject(e.status(), &e.to_string(), cx, "malformed"),
            Ok(None) => {
                let kept = held.unwrap_or_else(|| data.to_vec());
                self.busy().handshake = Some(kept);
                None
            }
            Ok(Some((req, len))) => {
                let incident = self.upgrade(&req, None, cx);
                if self.phase == Phase::Resolving {
                    // Kept whole (with anything after the head) until the session resolves.
                    let kept = held.unwrap_or_else(|| data.to_vec());
                    self.busy().handshake = Some(kept);
                    return incident;
                }
                if self.phase == Phase::Open && buf.len() > len {
                    return self.on_ws_bytes(&mut buf[len..], cx).or(incident);
                }
                incident
            }
        }
    }

    /// The upgrade's session resolved (or failed, or timed out): the upgrade goes on with the
    /// request kept, as that user or as a guest.
    fn finish_upgrade(&mut self, identity: Resolution, cx: &mut Context<'_>) -> Option<Incident> {
        let mut held = self.busy.as_mut()?.handshake.take()?;
        self.phase = Phase::Handshake;
        let buf = &mut held[..];
        let Ok(Some((req, len))) = handshake::parse_request(buf, usize::MAX) else {
            self.phase = Phase::Done;
            return None;
        };
        let incident = self.upgrade(&req, Some(identity), cx);
        if self.phase == Phase::Open && buf.len() > len {
            return self.on_ws_bytes(&mut buf[len..], cx).or(incident);
        }
        incident
    }

    fn reject(
        &mut self,
        status: u16,
        message: &str,
        cx: &mut Context<'_>,
        reason: &'static str,
    ) -> Option<Incident> {
        cx.out
            .push(OutFrame::raw(Bytes::from(handshake::error_response(
                status, message,
            ))));
        self.enter(Phase::FlushThenLinger, cx.now);
        Some(Incident::Rejected(reason))
    }

    /// `resolved`: the upgrade already waited for its session (second pass, after
    /// [`Phase::Resolving`]).
    fn upgrade(
        &mut self,
        req: &Request,
        resolved: Option<Resolution>,
        cx: &mut Context<'_>,
    ) -> Option<Incident> {
        let realtime = req.path == "/v1/realtime" || req.path.starts_with("/v1/realtime/");
        let echo = cx.cfg.echo_path.as_deref() == Some(req.path.as_str());
        if !realtime && !echo {
            return self.reject(
                404,
                "Not found: realtime clients connect to /v1/realtime",
                cx,
                "not_found",
            );
        }
        let key = match req.websocket_key() {
            Ok(k) => k,
            Err(r) => return self.reject(r.status, r.message, cx, "not_websocket"),
        };
        if realtime && !cx.cfg.origins.allows(req.origin.as_deref()) {
            return self.reject(
                403,
                "Forbidden: this origin may not connect (see --allowed-origins)",
                cx,
                "origin",
            );
        }
        if self.forwarded_uncounted {
            self.forwarded_uncounted = false;
            let forwarded = req.forwarded_for.as_deref();
            match cx.ip_limits.admit_forwarded(forwarded, cx.instant) {
                Ok(ticket) => *cx.admitted = Some(ticket),
                Err(refusal) => {
                    let incident = self.reject(429, refusal.message(), cx, refusal.reason());
                    // Like a refusal at accept: a flood of them must not hold slots for long.
                    self.deadline = cx.now.saturating_add(1);
                    return incident;
                }
            }
        }
        if realtime
            && resolved.is_none()
            && let Some(request) = self.session_to_resolve(req, cx)
        {
            self.phase = Phase::Resolving;
            self.deadline = cx
                .now
                .saturating_add(cx.cfg.resolve_timeout_secs.saturating_add(1));
            cx.resolves.push(request);
            return None;
        }
        cx.out
            .push(OutFrame::raw(Bytes::from(handshake::accept_response(key))));
        self.phase = Phase::Open;
        self.last_heard = cx.now;
        if echo && !realtime {
            self.kind = Kind::Echo;
            return None;
        }
        self.open_session(req, resolved, cx)
    }

    /// The Appwrite session an upgrade must wait for: one the request carries for its project,
    /// with a resolver configured and no JWT (a JWT is verified here; with a cookie too it is
    /// refused later, as Appwrite does).
    fn session_to_resolve(&self, req: &Request, cx: &Context<'_>) -> Option<IdentityRequest> {
        if !cx.cfg.resolver || !req.session || req.jwt.is_some() {
            return None;
        }
        let q = crate::query::parse(&req.query, cx.cfg.limits.max_channels);
        if q.jwt.is_some() {
            return None;
        }
        let project = req
            .project
            .as_deref()
            .or(q.project.as_deref())
            .unwrap_or(&cx.cfg.default_project);
        if !crate::event::is_valid_id(project) {
            return None;
        }
        let session = crate::identity::request_session(
            req.cookie.as_deref(),
            req.appwrite_session.as_deref(),
            req.fallback_cookies.as_deref(),
            project,
        )?;
        Some(IdentityRequest {
            shard: 0,
            key: cx.key,
            serial: self.serial,
            purpose: ResolvePurpose::Handshake,
            project: project.into(),
            session: SessionSecret::new(&session),
        })
    }

    /// The resolver answered (contract, step 6). Answers for an earlier connection in this
    /// slot, for an upgrade that stopped waiting, or for an `authentication` that a later one
    /// replaced, are ignored.
    pub fn on_identity_answer(
        &mut self,
        answer: IdentityAnswer,
        cx: &mut Context<'_>,
    ) -> Option<Incident> {
        if answer.serial != self.serial {
            return None;
        }
        let resolved = resolution(&answer.outcome, &answer.session, cx);
        match answer.purpose {
            ResolvePurpose::Handshake if self.phase == Phase::Resolving => {
                let guest = Resolution {
                    identity: cx.cfg.guest.clone(),
                    account: None,
                };
                self.finish_upgrade(resolved.unwrap_or(guest), cx)
            }
            ResolvePurpose::Authentication(seq) if seq == self.auth_seq => {
                self.auth_pending = false;
                if self.receives_events() {
                    self.on_authentication_answer(resolved, cx);
                }
                None
            }
            ResolvePurpose::Refresh(seq) if seq == self.refresh_seq && self.receives_events() => {
                self.on_refresh_answer(&answer.session, resolved, cx);
                None
            }
            _ => None,
        }
    }

    /// An `authentication` with a session resolved: the connection becomes the user, keeping
    /// its project and subscription ids; or it is told why not and stays as it was.
    fn on_authentication_answer(
        &mut self,
        resolved: Result<Resolution, ResolveError>,
        cx: &mut Context<'_>,
    ) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        match resolved {
            Ok(r) => {
                let before = session.channels();
                let registry = &mut *cx.registry;
                session.authenticate(r.identity, &mut *registry);
                cx.registry
                    .update(session.project(), cx.key, &before, &session.channels());
                let user = r.account.unwrap_or_else(|| session.identity.user_json());
                cx.out
                    .push(OutFrame::text(protocol::authentication_response(&user)));
            }
            Err(e) => {
                let code = match e {
                    ResolveError::Denied => close_code::UNSUPPORTED_DATA,
                    ResolveError::Unavailable(_) => close_code::TRY_AGAIN_LATER,
                };
                cx.out.push(OutFrame::text(protocol::error_message(
                    code,
                    &e.to_string(),
                )));
            }
        }
    }

    /// A permission change re-resolved this connection's session: its subscriptions are
    /// re-keyed under the new roles. A session that is no longer valid leaves a guest; one
    /// that cannot be resolved now closes the connection with 1013, so that the client
    /// reconnects and is resolved afresh: a connection never keeps roles that may have been
    /// taken away, and never silently loses its user over a passing failure.
    fn on_refresh_answer(
        &mut self,
        secret: &SessionSecret,
        resolved: Result<Resolution, ResolveError>,
        cx: &mut Context<'_>,
    ) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        if session.identity.session() != Some(secret) {
            // Authenticated again meanwhile: that answer decides.
            return;
        }
        let identity = match resolved {
            Ok(r) => r.identity,
            Err(ResolveError::Denied) => cx.cfg.guest.clone(),
            Err(e @ ResolveError::Unavailable(_)) => {
                let code = close_code::TRY_AGAIN_LATER;
                cx.out.push(OutFrame::text(protocol::error_message(
                    code,
                    &e.to_string(),
                )));
                self.close(code, "permissions changed; reconnect", cx);
                return;
            }
        };
        let before = session.channels();
        let registry = &mut *cx.registry;
        session.authenticate(identity, &mut *registry);
        cx.registry
            .update(session.project(), cx.key, &before, &session.channels());
    }

    /// `user`'s permissions changed in `project`: a connection of that user whose identity
    /// came from a session asks for it to be resolved again. A JWT's roles are the token's:
    /// they change when the client presents a new one.
    pub fn on_permissions_changed(&mut self, project: &str, user: &str, cx: &mut Context<'_>) {
        let Some(session) = self.session.as_ref().filter(|_| self.receives_events()) else {
            return;
        };
        if **session.project() != *project || session.identity.user_id() != Some(user) {
            return;
        }
        let Some(secret) = session.identity.session() else {
            return;
        };
        self.refresh_seq = self.refresh_seq.wrapping_add(1);
        cx.resolves.push(IdentityRequest {
            shard: 0,
            key: cx.key,
            serial: self.serial,
            purpose: ResolvePurpose::Refresh(self.refresh_seq),
            project: session.project().clone(),
            session: secret.clone(),
        });
    }

    /// The realtime session of a just-upgraded connection: project, URL channels, a resume.
    /// Names are checked before anything is interned or indexed.
    fn open_session(
        &mut self,
        req: &Request,
        resolved: Option<Resolution>,
        cx: &mut Context<'_>,
    ) -> Option<Incident> {
        let limits = cx.cfg.limits;
        let q = crate::query::parse(&req.query, limits.max_channels);
        let project = req
            .project
            .as_deref()
            .or(q.project.as_deref())
            .unwrap_or(&cx.cfg.default_project);
        if !crate::event::is_valid_id(project) {
            let msg = format!("Invalid project: a project id is {}", crate::event::ID_RULE);
            return Some(self.refuse_session(close_code::POLICY, &msg, "invalid_project", cx));
        }
        let bad_channel = |c: &String| c.len() > limits.max_channel_len || !is_valid_name(c);
        if q.too_many_channels || q.channels.iter().any(bad_channel) {
            let msg = format!(
                "Too many or invalid channels: at most {} channels, each {} (at most {} bytes here)",
                limits.max_channels,
                crate::event::NAME_RULE,
                limits.max_channel_len
            );
            return Some(self.refuse_session(close_code::POLICY, &msg, "invalid_channels", cx));
        }
        let (identity, account) = match resolved {
            Some(r) => (r.identity, r.account),
            None => match handshake_identity(req, q.jwt.as_deref(), project, cx) {
                Ok(identity) => (identity, None),
                Err((code, msg, reason)) => {
                    return Some(self.refuse_session(code, &msg, reason, cx));
                }
            },
        };
        let slots = match url_slots(&q, &limits) {
            Ok(slots) => slots,
            Err(msg) => return Some(self.refuse_session(close_code::POLICY, &msg, "query", cx)),
        };
        let project = cx.registry.intern(project);
        let registry = &mut *cx.registry;
        let (session, numbers) = match slots {
            None => (Session::new(project, identity, &q.channels, registry), None),
            Some((numbers, slots)) => (
                Session::with_slots(project, identity, slots, registry),
                Some(numbers),
            ),
        };
        let url_id = self.url_id(cx.cfg);
        cx.out.push(OutFrame::text(session.connected_message(
            numbers.as_deref(),
            account.as_ref(),
            &url_id,
        )));
        cx.registry
            .update(session.project(), cx.key, &[], &session.channels());
        self.session = Some(session);
        if let Some(after) = q.last_event_id {
            self.start_replay(&after, cx);
        }
        None
    }

    /// Tells a just-upgraded client why it cannot stay (an `error` with `code`), then closes
    /// with 1008 so that SDKs stop reconnecting.
    fn refuse_session(
        &mut self,
        code: u16,
        message: &str,
        reason: &'static str,
        cx: &mut Context<'_>,
    ) -> Incident {
        cx.out
            .push(OutFrame::text(protocol::error_message(code, message)));
        self.close(close_code::POLICY, reason, cx);
        Incident::Rejected(reason)
    }

    /// Begins a resume after `raw` (a client-supplied `lastEventId`).
    fn start_replay(&mut self, raw: &str, cx: &mut Context<'_>) {
        let message = match raw.parse::<EventId>() {
            // Echoing a long value back would let a client make herald send what it likes.
            Err(_) if raw.len() > MAX_LAST_EVENT_ID_BYTES => format!(
                "Invalid lastEventId: an event id is at most {MAX_LAST_EVENT_ID_BYTES} characters"
            ),
            Err(e) => format!("Invalid lastEventId {raw:?}: {e}"),
            Ok(_) if self.replay().is_some_and(|r| r.waiting) => {
                "Invalid lastEventId: a replay is already in progress on this connection".to_owned()
            }
            Ok(after) => {
                self.busy().replay = Some(Box::new(Replay {
                    after,
                    upto: cx.position(after.shard),
                    waiting: true,
                    buffered: VecDeque::new(),
                    buffered_bytes: 0,
                    overflowed: false,
                    cancellation: Cancellation::default(),
                    started: cx.now,
                }));
                cx.resumes.push(cx.key);
                return;
            }
        };
        cx.out.push(OutFrame::text(protocol::error_message(
            INVALID_LAST_EVENT_ID,
            &message,
        )));
    }

    fn on_ws_bytes(&mut self, data: &mut [u8], cx: &mut Context<'_>) -> Option<Incident> {
        let max = match self.kind {
            Kind::Realtime => cx.cfg.max_message,
            Kind::Echo => cx.cfg.echo_max_message,
        };
        // Taken out for the feed (the busy state is made only if a message stays unfinished).
        let mut decoder = self
            .busy
            .as_mut()
            .map(|b| std::mem::take(&mut b.decoder))
            .unwrap_or_default();
        let was_idle = decoder.is_idle();
        // A data message completed in this read: what is still buffered is a new message. Control
        // frames do not count, so pings cannot keep a fragmented message alive.
        let mut completed = false;
        let result = decoder.feed(data, max, |m| {
            completed |= matches!(m, Message::Text(_) | Message::Binary(_));
            self.on_message(m, cx)
        });
        let unfinished = !decoder.is_idle();
        if unfinished {
            self.busy().decoder = decoder;
        }
        if (was_idle || completed) && unfinished && self.phase == Phase::Open {
            // While open, `deadline` is when the message now begun must be complete.
            self.deadline = cx.now.saturating_add(cx.cfg.message_timeout_secs);
        }
        match result {
            Ok(()) => None,
            Err(e) => Some(self.fail(&e, cx)),
        }
    }

    fn fail(&mut self, e: &ProtocolError, cx: &mut Context<'_>) -> Incident {
        // Nothing more will be decoded, so the partial state can go now.
        self.clear_decoder();
        let code = e.close_code();
        if self.phase == Phase::Open {
            // RFC 6455 section 7.1.7, _Fail the WebSocket Connection_: send a close frame, then
            // end the TCP connection without waiting for the peer's close frame. A peer whose own
            // close frame was malformed would never send another, so waiting (Closing) only held
            // the socket until the timeout. The half-close after the flush keeps the close frame
            // from being destroyed by a reset.
            cx.out.push(OutFrame::new(
                Opcode::Close,
                Bytes::from(close_payload(code, &e.to_string())),
                SmallVec::new(),
            ));
            self.enter(Phase::FlushThenLinger, cx.now);
        } else {
            self.enter(Phase::FlushThenDrop, cx.now);
        }
        Incident::ProtocolError(code)
    }

    fn on_message(&mut self, m: Message<'_>, cx: &mut Context<'_>) -> ControlFlow<()> {
        // Only whole messages are activity: a byte now and then keeps no connection alive.
        self.last_heard = cx.now;
        let open = self.phase == Phase::Open;
        match m {
            Message::Ping(p) if open && self.answers_ping(cx) => cx.out.push(OutFrame::new(
                Opcode::Pong,
                Bytes::copy_from_slice(p),
                SmallVec::new(),
            )),
            Message::Pong(_) => self.ping_outstanding = false,
            Message::Close(c) => {
                if open {
                    // Echo the peer's code, as RFC 6455 section 5.5.1 asks.
                    let payload = c
                        .code
                        .map(|code| close_payload(code, ""))
                        .unwrap_or_default();
                    cx.out.push(OutFrame::new(
                        Opcode::Close,
                        Bytes::from(payload),
                        SmallVec::new(),
                    ));
                }
                self.clear_decoder();
                self.enter(Phase::FlushThenDrop, cx.now);
                return ControlFlow::Break(());
            }
            Message::Text(t) if open => match self.kind {
                Kind::Echo => cx.out.push(OutFrame::new(
                    Opcode::Text,
                    Bytes::copy_from_slice(t.as_bytes()),
                    SmallVec::new(),
                )),
                Kind::Realtime => return self.on_text(t, cx),
            },
            Message::Binary(b) if open => match self.kind {
                Kind::Echo => cx.out.push(OutFrame::new(
                    Opcode::Binary,
                    Bytes::copy_from_slice(b),
                    SmallVec::new(),
                )),
                // Counted like text: answering costs a queued frame.
                Kind::Realtime => {
                    let (code, words) = match self.over_message_rate(b.len(), cx) {
                        Some(refusal) => {
                            cx.counters.rate_limited += 1;
                            (close_code::TRY_AGAIN_LATER, refusal)
                        }
                        None => (close_code::UNSUPPORTED_DATA, protocol::errors::BINARY),
                    };
                    cx.out
                        .push(OutFrame::text(protocol::error_message(code, words)));
                }
            },
            // Data after herald started closing is ignored, as RFC 6455 allows.
            _ => {}
        }
        ControlFlow::Continue(())
    }

    /// Starts a new rate window for messages and pings once the current one has passed.
    /// Counts a client message of `len` bytes; says why it is refused when it goes over
    /// `--message-rate` or `--message-bytes-rate` in the current window.
    fn over_message_rate(&mut self, len: usize, cx: &Context<'_>) -> Option<&'static str> {
        let (count_limit, bytes_limit) = (cx.cfg.message_rate, cx.cfg.message_bytes_rate);
        if count_limit == 0 && bytes_limit == 0 {
            return None;
        }
        let rate = &mut self.rate;
        rate.roll(cx.now, cx.cfg.message_rate_window_secs);
        rate.messages = rate.messages.saturating_add(1);
        if count_limit > 0 && u32::from(rate.messages) > count_limit {
            return Some(protocol::errors::TOO_MANY_MESSAGES);
        }
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        if bytes_limit > 0 && rate.bytes.saturating_add(len) > bytes_limit {
            return Some(protocol::errors::TOO_MANY_MESSAGE_BYTES);
        }
        rate.bytes = rate.bytes.saturating_add(len);
        None
    }

    /// Whether a client ping gets its pong: realtime clients may ping twice as often as they
    /// may send messages; beyond that pings are ignored (each pong is a queued frame).
    fn answers_ping(&mut self, cx: &mut Context<'_>) -> bool {
        if self.kind == Kind::Echo || cx.cfg.message_rate == 0 {
            return true;
        }
        let rate = &mut self.rate;
        rate.roll(cx.now, cx.cfg.message_rate_window_secs);
        rate.pings = rate.pings.saturating_add(1);
        if u32::from(rate.pings) > cx.cfg.message_rate.saturating_mul(2) {
            cx.counters.rate_limited += 1;
            return false;
        }
        true
    }

    fn on_text(&mut self, text: &str, cx: &mut Context<'_>) -> ControlFlow<()> {
        if let Some(refusal) = self.over_message_rate(text.len(), cx) {
            cx.counters.rate_limited += 1;
            cx.out.push(OutFrame::text(protocol::error_message(
                close_code::TRY_AGAIN_LATER,
                refusal,
            )));
            return ControlFlow::Continue(());
        }
        let Some(session) = self.session.as_mut() else {
            return ControlFlow::Continue(());
        };
        let before = session.channels();
        let registry = &mut *cx.registry;
        let verifiers = protocol::Verifiers {
            jwt: &cx.cfg.jwt,
            sessions: cx.cfg.resolver,
        };
        let url_id = UrlId::new(cx.cfg.id_key, self.serial);
        let reply = session.handle_text(text, &cx.cfg.limits, verifiers, registry, &url_id);
        if reply.authentication && reply.resolve_session.is_some() && self.auth_pending {
            // One resolution per connection at a time: a client cannot fill the resolver's
            // queue for everyone else.
            cx.out.push(OutFrame::text(protocol::error_message(
                close_code::TRY_AGAIN_LATER,
                "Another authentication is in progress on this connection.",
            )));
            return ControlFlow::Continue(());
        }
        if reply.authentication {
            // A later `authentication` wins over an earlier one still resolving.
            self.auth_seq = self.auth_seq.wrapping_add(1);
            self.auth_pending = reply.resolve_session.is_some();
            // A token's roles, shared per shard like those of a token at the handshake (the
            // identity was just made, so it is held only here).
            let registry = &mut *cx.registry;
            if let Some(identity) = Arc::get_mut(&mut session.identity) {
                identity.share_roles_in_place(|roles| registry.intern_roles(roles));
            }
            session.identity = registry.share_identity(session.identity.clone());
        }
        if let Some(secret) = &reply.resolve_session {
            cx.resolves.push(IdentityRequest {
                shard: 0,
                key: cx.key,
                serial: self.serial,
                purpose: ResolvePurpose::Authentication(self.auth_seq),
                project: session.project().clone(),
                session: SessionSecret::new(secret),
            });
        }
        if reply.subscriptions_changed {
            cx.registry
                .update(session.project(), cx.key, &before, &session.channels());
        }
        if let Some(frame) = reply.frame {
            cx.out.push(OutFrame::text(frame));
        }
        if let Some(after) = reply.resume_after {
            self.start_replay(&after, cx);
        }
        if let Some(code) = reply.close {
            self.close(code, "", cx);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    /// Starts the close handshake: sends a close frame and waits for the peer's.
    fn close(&mut self, code: u16, reason: &str, cx: &mut Context<'_>) {
        cx.out.push(OutFrame::new(
            Opcode::Close,
            Bytes::from(close_payload(code, reason)),
            SmallVec::new(),
        ));
        self.enter(Phase::Closing, cx.now);
    }

    fn enter(&mut self, phase: Phase, now: u32) {
        self.phase = phase;
        if let Some(b) = &mut self.busy {
            b.handshake = None;
        }
        if phase != Phase::Open {
            self.deadline = now.saturating_add(CLOSE_TIMEOUT_SECS);
        }
    }

    /// Decides what happens to live `event` (contract, step 5). `continues`: this connection
    /// got the previous event of the batch, which has the same project, channels and roles, so
    /// it matches and its tail is the same. `tails` receives the tail of a [`Verdict::Deliver`]
    /// (and may receive one for other answers, which the caller drops, as
    /// [`crate::batch::Batch::offer`] does).
    pub fn offer(
        &mut self,
        event: &Arc<EncodedEvent>,
        continues: bool,
        tails: &mut Vec<u8>,
        cfg: &ConnConfig,
    ) -> Verdict {
        if !self.receives_events() {
            return Verdict::NotSubscribed;
        }
        let Some(session) = self.session.as_ref() else {
            return Verdict::NotSubscribed;
        };
        // With queries, events of one route may match differently: each is judged on its own.
        let filtered = session.has_filters();
        let continues = continues && !filtered;
        if !continues {
            // Matched once (queries can be costly): the tail is written now, and the caller
            // drops it unless the answer is `Deliver`.
            let url_id = UrlId::new(cfg.id_key, self.serial);
            let mut ids = session.matching(event, &url_id).peekable();
            if ids.peek().is_none() {
                return if filtered {
                    Verdict::Skip
                } else {
                    Verdict::NotSubscribed
                };
            }
            write_tail(tails, ids);
        }
        match self.replay_verdict(event, cfg.max_outbound) {
            Some(v) => v,
            None if continues => Verdict::Extend,
            None => Verdict::Deliver,
        }
    }

    /// What a resume in progress does with a matched live event; `None`: deliver it.
    fn replay_verdict(&mut self, event: &Arc<EncodedEvent>, max_held: usize) -> Option<Verdict> {
        let r = self.busy.as_mut()?.replay.as_mut()?;
        if r.waiting {
            if r.overflowed {
                return Some(Verdict::Skip);
            }
            r.buffered_bytes += event.frame_bytes();
            if r.buffered_bytes > max_held {
                r.overflowed = true;
                r.buffered = VecDeque::new();
                r.buffered_bytes = 0;
                return Some(Verdict::Skip);
            }
            r.buffered.push_back(event.clone());
            return Some(Verdict::Hold);
        }
        match event.position {
            // Another stream shard's position says nothing about what the client has.
            Some(p) if p.shard == r.after.shard && p <= r.after => Some(Verdict::Skip),
            Some(_) => {
                self.end_replay();
                None
            }
            None => None,
        }
    }

    /// The history the resume this connection started needs, and the flag that is set if the
    /// connection goes away before it arrives (contract, step 6).
    pub fn replay_query(&self, cfg: &ConnConfig) -> Option<(ReplayQuery, Cancellation)> {
        let (session, replay) = (self.session.as_ref()?, self.replay()?);
        let query = replay.waiting.then(|| ReplayQuery {
            after: replay.after,
            upto: replay.upto,
            project: session.project().to_string(),
            subscriptions: session
                .subscriptions(&self.url_id(cfg))
                .map(|s| crate::mailbox::ReplaySubscription {
                    channels: s.channels.iter().map(|c| c.to_string()).collect(),
                    filter: s.filter.cloned(),
                })
                .collect(),
            identity: session.identity.clone(),
            max_events: cfg.replay_max_events,
            max_bytes: cfg.replay_max_bytes,
        })?;
        Some((query, replay.cancellation.clone()))
    }

    /// The history for a resume arrived: sends it, then the live events held meanwhile. An
    /// answer for another `serial` (an earlier connection in this slot) is ignored.
    pub fn on_replay_answer(
        &mut self,
        serial: u32,
        outcome: Result<Vec<Arc<EncodedEvent>>, ReplayError>,
        cx: &mut Context<'_>,
    ) {
        if serial != self.serial || !self.receives_events() {
            return;
        }
        let Some(r) = self.busy.as_mut().and_then(|b| b.replay.as_mut()) else {
            return;
        };
        if !r.waiting {
            // Already answered (or timed out): a late answer must not send history twice.
            return;
        }
        let Some(mut r) = self.busy.as_mut().and_then(|b| b.replay.take()) else {
            return;
        };
        // Answered: dropping it now or later cancels nothing.
        r.waiting = false;
        let Some(session) = self.session.as_ref() else {
            return;
        };
        let url_id = self.url_id(cx.cfg);
        let keep_skipping = match &outcome {
            Ok(events) => {
                cx.out.extend(
                    events
                        .iter()
                        .filter_map(|e| event_frame(session, e, &url_id)),
                );
                true
            }
            Err(e) => {
                cx.out.push(OutFrame::text(protocol::error_message(
                    e.code(),
                    &e.to_string(),
                )));
                // After "ahead" the client's id means nothing here: skip nothing.
                !matches!(e, ReplayError::Ahead(_))
            }
        };
        if r.overflowed {
            let e = ReplayError::Truncated(format!(
                "more than {} bytes of live events arrived during the replay",
                cx.cfg.max_outbound
            ));
            cx.out.push(OutFrame::text(protocol::error_message(
                e.code(),
                &e.to_string(),
            )));
        }
        cx.out.extend(
            r.buffered
                .drain(..)
                .filter_map(|e| event_frame(session, &e, &url_id)),
        );
        if keep_skipping && cx.position(r.after.shard).is_none_or(|h| h < r.after) {
            r.buffered = VecDeque::new();
            r.buffered_bytes = 0;
            self.busy().replay = Some(r);
        }
    }

    /// Periodic check: handshake and close deadlines, idle pings and the idle timeout; the busy
    /// state goes once it holds nothing.
    ///
    /// `peer_acked` is asked only when an idle ping is due: the seconds since the peer's TCP
    /// last acknowledged data, when it has acknowledged everything sent (the driver reads
    /// [`crate::liveness::peer_acked_secs_ago`]). A recent answer counts as hearing from the
    /// peer and saves the ping: a client that receives events and acknowledges them is there,
    /// and one that stops reading backs up into the slow-consumer bound instead.
    pub fn on_tick(
        &mut self,
        cx: &mut Context<'_>,
        peer_acked: impl FnOnce() -> Option<u32>,
    ) -> Option<Incident> {
        self.end_finished_replay(cx);
        if self.busy.as_ref().is_some_and(|b| b.is_idle()) {
            self.busy = None;
            cx.counters.busy_released += 1;
        }
        match self.phase {
            Phase::Open => {
                let idle = cx.now.saturating_sub(self.last_heard);
                let cfg = cx.cfg;
                if self.replay().is_some_and(|r| {
                    r.waiting && cx.now >= r.started.saturating_add(REPLAY_TIMEOUT_SECS)
                }) {
                    let late = ReplayError::Unavailable(format!(
                        "the history did not arrive within {REPLAY_TIMEOUT_SECS} s"
                    ));
                    self.on_replay_answer(self.serial, Err(late), cx);
                }
                if !self.decoder_is_idle() && cx.now >= self.deadline {
                    // Whatever was held for the unfinished message goes now.
                    self.clear_decoder();
                    self.close(close_code::POLICY, "message not completed in time", cx);
                    return Some(Incident::ProtocolError(close_code::POLICY));
                }
                if cfg.idle_timeout_secs > 0 && idle >= cfg.idle_timeout_secs {
                    cx.counters.idle_closed += 1;
                    self.close(close_code::GOING_AWAY, "idle timeout", cx);
                } else if cfg.ping_interval_secs > 0
                    && idle >= cfg.ping_interval_secs
                    && !self.ping_outstanding
                {
                    self.ping_or_hear(peer_acked, cx);
                }
                None
            }
            Phase::Done => None,
            Phase::Resolving if cx.now >= self.deadline => {
                // The resolver answers within its timeout; this is the backstop.
                let guest = Resolution {
                    identity: cx.cfg.guest.clone(),
                    account: None,
                };
                self.finish_upgrade(guest, cx)
            }
            phase if cx.now >= self.deadline => {
                self.phase = Phase::Done;
                (phase == Phase::Handshake).then_some(Incident::Rejected("timeout"))
            }
            _ => None,
        }
    }

    /// A due idle ping, unless the peer's TCP has just acknowledged all that was sent to it.
    fn ping_or_hear(&mut self, peer_acked: impl FnOnce() -> Option<u32>, cx: &mut Context<'_>) {
        let interval = cx.cfg.ping_interval_secs;
        // Behind a proxy the acknowledgements are the proxy's, not the client's.
        let acked = (!self.is_backlogged() && !self.behind_proxy)
            .then(peer_acked)
            .flatten()
            .filter(|&ago| ago < interval);
        match acked {
            Some(ago) => {
                self.last_heard = cx.now.saturating_sub(ago);
                cx.counters.pings_saved += 1;
            }
            None => {
                self.ping_outstanding = true;
                cx.counters.pings_sent += 1;
                cx.out
                    .push(OutFrame::new(Opcode::Ping, Bytes::new(), SmallVec::new()));
            }
        }
    }

    /// Starts a graceful close for shutdown: 1001 for a WebSocket; a connection that never
    /// became one is simply dropped.
    pub fn on_shutdown(&mut self, cx: &mut Context<'_>) {
        match self.phase {
            Phase::Handshake | Phase::Resolving => self.phase = Phase::Done,
            Phase::Open => self.close(close_code::GOING_AWAY, "server shutting down", cx),
            _ => {}
        }
    }

    /// Queues frames a direct write did not finish: `frames[0]` is on the wire up to `offset`.
    /// The driver calls [`Self::transmit`] next, which applies the outbound bound.
    pub fn queue_unsent(&mut self, frames: Vec<OutFrame>, offset: usize) {
        self.busy().outbox.queue_unsent(frames, offset);
    }

    /// Writes [`Shared::out`] and the queued output to `w` as far as it takes them, applies the
    /// slow-consumer rule and moves the close sequence along (contract, step 7). On an error
    /// the driver removes the connection.
    pub fn transmit<W: Write>(&mut self, w: &mut W, cx: &mut Context<'_>) -> io::Result<Transmit> {
        let result = self.write_out(w, cx);
        if result.is_err() {
            cx.out.clear();
        }
        result
    }

    fn write_out<W: Write>(&mut self, w: &mut W, cx: &mut Context<'_>) -> io::Result<Transmit> {
        let mut t = Transmit {
            next: Next::Idle,
            slow_consumer: false,
        };
        if self.phase == Phase::Done {
            cx.out.clear();
            t.next = Next::Drop;
            return Ok(t);
        }
        let limit = self.outbound_limit(cx.cfg);
        let mut outbox = self.take_outbox();
        let sent = self.send_out(&mut outbox, w, limit, cx);
        self.put_outbox(outbox);
        t.slow_consumer = sent?;
        t.next = if self.is_backlogged() {
            Next::Blocked
        } else {
            match self.phase {
                Phase::FlushThenDrop => Next::Drop,
                Phase::FlushThenLinger => {
                    // The peer hangs up after reading everything; a reset would destroy the tail.
                    // A shorter deadline set before (a refusal at accept) stays.
                    let deadline = self.deadline;
                    self.enter(Phase::Lingering, cx.now);
                    self.deadline = self.deadline.min(deadline.max(cx.now));
                    Next::HalfClose
                }
                _ => Next::Idle,
            }
        };
        Ok(t)
    }

    /// Writes `cx.out` behind `outbox`; on overflow closes as a slow consumer and answers true.
    fn send_out<W: Write>(
        &mut self,
        outbox: &mut Outbox,
        w: &mut W,
        limit: usize,
        cx: &mut Context<'_>,
    ) -> io::Result<bool> {
        if let Err(Overflow) = outbox.send(w, cx.out, limit)? {
            // Drop what the peer has not started to receive and tell it why.
            outbox.discard_unstarted();
            self.close(
                close_code::TRY_AGAIN_LATER,
                "slow consumer: outbound queue full",
                cx,
            );
            let _ = outbox.send(w, cx.out, usize::MAX)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Removes this connection from the shard's channel index (before its slot is reused).
    pub fn unindex(&self, registry: &mut Registry, key: u32) {
        if let Some(s) = &self.session {
            registry.update(s.project(), key, &s.channels(), &[]);
        }
    }
}

/// The connection driven by a fake driver: bytes in, bytes out through a throttled writer, time
/// and events handed in by hand; no socket anywhere.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{Batch, Written};
    use crate::event::Event;
    use crate::outbox::testing::Throttled;
    use crate::ws::decoder::encode_client_frame;

    const KEY: u32 = 7;
    const SERIAL: u32 = 41;
    const TEXT: u8 = 0x1;
    const CLOSE: u8 = 0x8;
    const PING: u8 = 0x9;

    /// What the shard does for one connection, reduced to the contract in the module header.
    struct Driver {
        shared: Shared,
        conn: Connection,
        /// What the peer would read; its budget plays the socket's send buffer.
        wire: Throttled,
        /// Bytes of `wire.out` already parsed by [`Self::frames`].
        seen: usize,
        next: Next,
        slow: bool,
        /// What the socket would say of the peer's acknowledgements when a ping is due.
        peer_acked: Option<u32>,
        /// Whether the connection asked.
        asked_peer: bool,
    }

    impl Driver {
        fn new(cfg: ConnConfig) -> Self {
            let conn = Connection::new(SERIAL, 0, &cfg, false);
            Self {
                shared: Shared::new(cfg, Arc::new(IpLimits::new(0, 0, Vec::new()))),
                conn,
                wire: Throttled::new(usize::MAX),
                seen: 0,
                next: Next::Idle,
                slow: false,
                peer_acked: None,
                asked_peer: false,
            }
        }

        fn defaults() -> Self {
            Self::new(ConnConfig::from_config(&Config::for_tests()))
        }

        /// A realtime connection past its upgrade in project `p`, with `query` in its URL.
        fn open(query: &str) -> Self {
            Self::open_with(ConnConfig::from_config(&Config::for_tests()), query)
        }

        fn open_with(cfg: ConnConfig, query: &str) -> Self {
            let mut d = Self::new(cfg);
            d.read(&upgrade(&format!("/v1/realtime?project=p&{query}")));
            assert!(d.http_head().starts_with("HTTP/1.1 101"));
            assert_eq!(json(&d.text())["type"], "connected");
            d
        }

        /// An open connection pinged after 2 idle seconds and closed after 5.
        fn pinged_early() -> Self {
            let mut cfg = ConnConfig::from_config(&Config::for_tests());
            cfg.ping_interval_secs = 2;
            cfg.idle_timeout_secs = 5;
            Self::open_with(cfg, "channels[]=a")
        }

        fn transmit(&mut self) -> Transmit {
            let mut cx = self.shared.context(KEY);
            let t = self.conn.transmit(&mut self.wire, &mut cx).unwrap();
            self.next = t.next;
            self.slow |= t.slow_consumer;
            t
        }

        fn read(&mut self, bytes: &[u8]) -> Option<Incident> {
            let mut data = bytes.to_vec();
            let mut cx = self.shared.context(KEY);
            let incident = self.conn.on_read(&mut data, &mut cx);
            self.transmit();
            incident
        }

        fn send(&mut self, opcode: u8, payload: &[u8]) -> Option<Incident> {
            self.read(&encode_client_frame(true, opcode, payload, [1, 2, 3, 4]))
        }

        fn tick(&mut self, now: u32) -> Option<Incident> {
            self.shared.now = now;
            let mut cx = self.shared.context(KEY);
            let acked = self.peer_acked;
            let asked = &mut self.asked_peer;
            let incident = self.conn.on_tick(&mut cx, || {
                *asked = true;
                acked
            });
            self.transmit();
            incident
        }

        /// One fan-out of `events`, staged and written the way the shard does it.
        fn deliver(&mut self, events: &[Arc<EncodedEvent>]) -> Vec<Verdict> {
            let mut batch = Batch::default();
            for e in events {
                batch.push_event(e.clone());
            }
            let mut verdicts = Vec::new();
            let cfg = self.shared.cfg.clone();
            let mut start = 0;
            while (start as usize) < batch.len() {
                let end = batch.route_end(start);
                for i in start..end {
                    verdicts.push(batch.offer(KEY, i, start, |ev, continues, tails| {
                        self.conn.offer(ev, continues, tails, &cfg)
                    }));
                }
                start = end;
            }
            let touched = batch.take_touched();
            if !touched.is_empty() {
                if self.conn.is_backlogged() {
                    batch.frames_of(KEY, &mut self.shared.out);
                    self.transmit();
                } else if let Written::Blocked { rest, offset } =
                    batch.write(KEY, &mut self.wire).unwrap()
                {
                    self.conn.queue_unsent(rest, offset);
                    self.transmit();
                }
            }
            batch.clear(touched);
            verdicts
        }

        /// The HTTP response head at the start of the wire.
        fn http_head(&mut self) -> String {
            let out = &self.wire.out[self.seen..];
            let end = out
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .expect("a complete response head")
                + 4;
            self.seen += end;
            String::from_utf8(out[..end].to_vec()).unwrap()
        }

        /// Every complete server frame written since the last call: (opcode, payload).
        fn frames(&mut self) -> Vec<(u8, Vec<u8>)> {
            let mut frames = Vec::new();
            loop {
                let buf = &self.wire.out[self.seen..];
                if buf.len() < 2 {
                    return frames;
                }
                assert_eq!(buf[1] & 0x80, 0, "server frames are never masked");
                let (len, head) = match buf[1] & 0x7f {
                    126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
                    127 if buf.len() >= 10 => {
                        let b: [u8; 8] = buf[2..10].try_into().unwrap();
                        (u64::from_be_bytes(b) as usize, 10)
                    }
                    126 | 127 => return frames,
                    n => (usize::from(n), 2),
                };
                if buf.len() < head + len {
                    return frames;
                }
                assert_eq!(buf[0] & 0x80, 0x80, "herald sends no fragments");
                frames.push((buf[0] & 0x0f, buf[head..head + len].to_vec()));
                self.seen += head + len;
            }
        }

        /// The one text frame written since the last call.
        fn text(&mut self) -> String {
            let frames = self.frames();
            assert_eq!(frames.len(), 1, "{frames:?}");
            assert_eq!(frames[0].0, TEXT);
            String::from_utf8(frames[0].1.clone()).unwrap()
        }

        fn subscribers(&mut self, channel: &str) -> Vec<u32> {
            let mut out = Vec::new();
            self.shared.registry.collect("p", &[channel], &mut out);
            out
        }
    }

    fn upgrade(target: &str) -> Vec<u8> {
        format!(
            "GET {target} HTTP/1.1\r\nHost: herald\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .into_bytes()
    }

    fn event(id: &str, channel: &str) -> Arc<EncodedEvent> {
        EncodedEvent::encode(&Event {
            id: id.into(),
            project: "p".into(),
            channels: vec![channel.into()],
            events: vec!["e".into()],
            roles: vec![],
            timestamp: "t".into(),
            payload: serde_json::json!({ "id": id }),
        })
    }

    fn close_code_of(payload: &[u8]) -> u16 {
        u16::from_be_bytes([payload[0], payload[1]])
    }

    fn json(text: &str) -> serde_json::Value {
        serde_json::from_str(text).unwrap()
    }

    /// A driver whose config has a session resolver.
    fn resolving() -> Driver {
        let mut cfg = ConnConfig::from_config(&Config::for_tests());
        cfg.resolver = true;
        cfg.resolve_timeout_secs = 2;
        Driver::new(cfg)
    }

    /// An upgrade request with the cookie of project `p`'s session `value`, followed at once by
    /// `then` (bytes a client pipelined after the head).
    fn upgrade_with_session(value: &str, then: &[u8]) -> Vec<u8> {
        let mut req = String::from_utf8(upgrade("/v1/realtime?project=p&channels[]=a")).unwrap();
        req.truncate(req.len() - 2);
        req.push_str(&format!("Cookie: theme=dark; a_session_p={value}\r\n\r\n"));
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(then);
        bytes
    }

    fn answer(
        purpose: ResolvePurpose,
        outcome: Result<crate::identity::Resolved, ResolveError>,
    ) -> IdentityAnswer {
        IdentityAnswer {
            key: KEY,
            serial: SERIAL,
            purpose,
            project: "p".into(),
            session: SessionSecret::new("s%3D"),
            fetched: Instant::now(),
            outcome: outcome.map(Arc::new),
        }
    }

    fn ann() -> crate::identity::Resolved {
        crate::identity::Resolved {
            user_id: "ann".into(),
            verified: Some(true),
            roles: vec!["team:t1".into()],
            account: Some(serde_json::json!({"$id": "ann", "name": "Ann"})),
        }
    }

    #[test]
    fn an_upgrade_with_a_session_waits_for_it_without_reading_then_opens_as_the_user() {
        let mut d = resolving();
        let ping = encode_client_frame(true, TEXT, br#"{"type":"ping"}"#, [1, 2, 3, 4]);
        d.read(&upgrade_with_session("s%3D", &ping));
        assert!(
            d.wire.out.is_empty(),
            "nothing is answered before the session resolves"
        );
        assert!(!d.conn.wants_input(&d.shared.cfg));
        let asked: Vec<_> = std::mem::take(&mut d.shared.resolves);
        assert_eq!(asked.len(), 1);
        assert_eq!(asked[0].purpose, ResolvePurpose::Handshake);
        // Appwrite's cookies arrive URL-encoded; the session is the decoded value.
        assert_eq!(asked[0].session.expose(), "s=");
        assert!(d.conn.held_bytes() > 0, "the request is held, and counted");
        // An answer for an earlier connection in the slot changes nothing.
        let mut stale = answer(ResolvePurpose::Handshake, Ok(ann()));
        stale.serial = SERIAL - 1;
        let mut cx = d.shared.context(KEY);
        d.conn.on_identity_answer(stale, &mut cx);
        d.transmit();
        assert!(d.wire.out.is_empty());
        let mut cx = d.shared.context(KEY);
        d.conn
            .on_identity_answer(answer(ResolvePurpose::Handshake, Ok(ann())), &mut cx);
        d.transmit();
        assert!(d.http_head().starts_with("HTTP/1.1 101"));
        let frames = d.frames();
        let text = |i: usize| json(std::str::from_utf8(&frames[i].1).unwrap());
        assert_eq!(
            text(0)["data"]["user"],
            serde_json::json!({"$id": "ann", "name": "Ann"})
        );
        // The message pipelined after the head is handled once the connection is open.
        assert_eq!(text(1)["type"], "pong");
        assert_eq!(frames.len(), 2);
        assert!(d.conn.wants_input(&d.shared.cfg));
        assert_eq!(d.subscribers("a"), vec![KEY]);
        let identity = d.conn.session.as_ref().unwrap().identity.clone();
        assert!(identity.has_role("team:t1") && identity.has_role("users/verified"));
    }

    #[test]
    fn a_session_that_does_not_resolve_in_time_opens_as_a_guest() {
        let mut d = resolving();
        d.read(&upgrade_with_session("s", b""));
        assert_eq!(d.shared.resolves.len(), 1);
        d.tick(1);
        assert!(d.wire.out.is_empty());
        d.tick(3);
        assert!(d.http_head().starts_with("HTTP/1.1 101"));
        assert_eq!(json(&d.text())["data"]["user"], serde_json::Value::Null);
        // The late answer is ignored.
        let mut cx = d.shared.context(KEY);
        d.conn
            .on_identity_answer(answer(ResolvePurpose::Handshake, Ok(ann())), &mut cx);
        d.transmit();
        assert!(d.frames().is_empty());
    }

    #[test]
    fn a_connection_waiting_for_its_session_is_dropped_by_shutdown_and_shedding() {
        let mut d = resolving();
        d.read(&upgrade_with_session("s", b""));
        let mut cx = d.shared.context(KEY);
        d.conn.on_shutdown(&mut cx);
        assert_eq!(d.transmit().next, Next::Drop);
        let mut d = resolving();
        d.read(&upgrade_with_session("s", b""));
        assert!(d.conn.sheddable());
        let mut cx = d.shared.context(KEY);
        assert_eq!(d.conn.shed(&mut cx), None);
        assert_eq!(d.transmit().next, Next::Drop);
    }

    #[test]
    fn only_the_latest_session_authentication_counts_and_one_resolves_at_a_time() {
        let mut cfg = ConnConfig::from_config(&Config::for_tests());
        cfg.resolver = true;
        let mut d = Driver::open_with(cfg, "channels[]=a");
        let auth = |s: &str| format!(r#"{{"type":"authentication","data":{{"session":"{s}"}}}}"#);
        d.send(TEXT, auth("one").as_bytes());
        assert!(d.frames().is_empty(), "answered once resolved");
        d.send(TEXT, auth("two").as_bytes());
        let busy = json(&d.text());
        assert_eq!(busy["data"]["code"], 1013, "{busy}");
        let asked = std::mem::take(&mut d.shared.resolves);
        assert_eq!(asked.len(), 1);
        let ResolvePurpose::Authentication(seq) = asked[0].purpose else {
            panic!("{:?}", asked[0].purpose)
        };
        // A JWT authentication meanwhile supersedes it: the session's answer is dropped.
        d.send(TEXT, br#"{"type":"authentication","data":{"jwt":"x"}}"#);
        assert_eq!(json(&d.text())["type"], "error");
        let mut cx = d.shared.context(KEY);
        d.conn.on_identity_answer(
            answer(ResolvePurpose::Authentication(seq), Ok(ann())),
            &mut cx,
        );
        d.transmit();
        assert!(d.frames().is_empty());
        // The next one is answered, with the Account object.
        d.send(TEXT, auth("three").as_bytes());
        let asked = std::mem::take(&mut d.shared.resolves);
        let mut cx = d.shared.context(KEY);
        d.conn
            .on_identity_answer(answer(asked[0].purpose, Ok(ann())), &mut cx);
        d.transmit();
        let ok = json(&d.text());
        assert_eq!(ok["data"]["user"]["name"], "Ann", "{ok}");
    }

    #[test]
    fn a_permission_change_rekeys_or_ends_a_session_users_connection() {
        let mut cfg = ConnConfig::from_config(&Config::for_tests());
        cfg.resolver = true;
        let mut d = Driver::new(cfg);
        d.read(&upgrade_with_session("s%3D", b""));
        let mut cx = d.shared.context(KEY);
        d.conn
            .on_identity_answer(answer(ResolvePurpose::Handshake, Ok(ann())), &mut cx);
        d.transmit();
        d.http_head();
        d.text();
        d.shared.resolves.clear();
        let change = |d: &mut Driver, user: &str| {
            let mut cx = d.shared.context(KEY);
            d.conn.on_permissions_changed("p", user, &mut cx);
            std::mem::take(&mut d.shared.resolves)
        };
        assert!(change(&mut d, "bob").is_empty(), "another user's change");
        let first = change(&mut d, "ann");
        let second = change(&mut d, "ann");
        assert_eq!(second.len(), 1);
        // The newer answer wins: the older one, arriving last, is ignored.
        let mut left = ann();
        left.roles.clear();
        let mut cx = d.shared.context(KEY);
        d.conn
            .on_identity_answer(answer(second[0].purpose, Ok(left)), &mut cx);
        d.conn
            .on_identity_answer(answer(first[0].purpose, Ok(ann())), &mut cx);
        let identity = d.conn.session.as_ref().unwrap().identity.clone();
        assert!(!identity.has_role("team:t1"));
        assert!(identity.has_role("user:ann"));
        assert!(d.frames().is_empty(), "the client is not told");
        // A resolver that cannot answer ends the connection (the client reconnects).
        let third = change(&mut d, "ann");
        let failed = Err(ResolveError::Unavailable("test".into()));
        let mut cx = d.shared.context(KEY);
        d.conn
            .on_identity_answer(answer(third[0].purpose, failed), &mut cx);
        d.transmit();
        let frames = d.frames();
        assert_eq!(
            json(std::str::from_utf8(&frames[0].1).unwrap())["data"]["code"],
            1013
        );
        assert_eq!(frames[1].0, CLOSE);
        assert_eq!(close_code_of(&frames[1].1), 1013);
    }

    #[test]
    fn upgrade_split_across_reads_answers_101_then_connected_and_indexes_the_channels() {
        let mut d = Driver::defaults();
        let request = upgrade("/v1/realtime?project=p&channels[]=a&channels[]=b");
        assert_eq!(d.read(&request[..20]), None);
        assert!(
            d.wire.out.is_empty(),
            "nothing is answered before the head is complete"
        );
        assert_eq!(d.read(&request[20..]), None);
        let head = d.http_head();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
        let connected = json(&d.text());
        assert_eq!(connected["type"], "connected");
        assert_eq!(connected["data"]["channels"], serde_json::json!(["a", "b"]));
        assert_eq!(d.subscribers("a"), vec![KEY]);
        assert_eq!(d.subscribers("b"), vec![KEY]);
        assert_eq!(d.next, Next::Idle);

        d.conn.unindex(&mut d.shared.registry, KEY);
        assert!(d.subscribers("a").is_empty());
    }

    #[test]
    fn an_unknown_path_gets_404_then_a_half_close() {
        let mut d = Driver::defaults();
        assert_eq!(
            d.read(&upgrade("/elsewhere")),
            Some(Incident::Rejected("not_found"))
        );
        assert!(d.http_head().starts_with("HTTP/1.1 404"));
        assert_eq!(d.next, Next::HalfClose);
        // Lingering: input is discarded until the peer hangs up or the deadline passes.
        assert_eq!(d.send(TEXT, b"late"), None);
        assert_eq!(d.next, Next::Idle);
        assert_eq!(d.tick(CLOSE_TIMEOUT_SECS), None);
        assert_eq!(d.next, Next::Drop);
    }

    #[test]
    fn messages_are_answered_and_the_subscription_index_follows_them() {
        let mut d = Driver::open("channels[]=a");
        d.send(TEXT, br#"{"type":"ping"}"#);
        assert_eq!(d.text(), r#"{"type":"pong"}"#);
        d.send(TEXT, b"not json");
        assert_eq!(json(&d.text())["data"]["code"], 1003);
        d.send(
            TEXT,
            br#"{"type":"subscribe","data":[{"subscriptionId":"s1","channels":["b"]}]}"#,
        );
        let reply = d.text();
        assert!(reply.contains("s1"), "{reply}");
        assert_eq!(d.subscribers("b"), vec![KEY]);
        d.send(PING, b"hi");
        assert_eq!(d.frames(), vec![(0xA, b"hi".to_vec())]);
    }

    #[test]
    fn an_idle_connection_stays_within_its_memory_budget() {
        // benches/RESULTS.md, "Lean connections": the slab slot of an idle connection is 80
        // bytes; every field added here is paid a million times.
        assert!(std::mem::size_of::<Connection>() <= 64);
        let mut d = Driver::open("channels[]=a");
        assert!(d.conn.busy.is_none(), "nothing held");
        assert!(!d.conn.is_backlogged());
        // A client that pings the way the SDKs do (a message every 20 s) holds nothing either.
        for n in 1..=3 {
            d.send(TEXT, br#"{"type":"ping"}"#);
            assert_eq!(d.text(), r#"{"type":"pong"}"#);
            d.tick(20 * n);
            assert!(d.conn.busy.is_none(), "nothing held after ping {n}");
        }
        // A message split over two reads is held only until it is complete, then let go.
        let frame = encode_client_frame(true, TEXT, br#"{"type":"ping"}"#, [1, 2, 3, 4]);
        d.read(&frame[..5]);
        assert!(d.conn.busy.is_some());
        d.read(&frame[5..]);
        assert_eq!(d.text(), r#"{"type":"pong"}"#);
        d.tick(70);
        assert!(d.conn.busy.is_none(), "let go at the tick");
    }

    #[test]
    fn pings_beyond_twice_the_message_rate_get_no_pong() {
        let mut d = Driver::open("channels[]=a");
        let allowed = d.shared.cfg.message_rate * 2;
        for _ in 0..allowed {
            d.send(PING, b"x");
        }
        assert_eq!(d.frames().len(), allowed as usize);
        d.send(PING, b"x");
        assert!(d.frames().is_empty());
        assert_eq!(d.shared.counters.rate_limited, 1);
        // A new window answers again.
        d.shared.now += d.shared.cfg.message_rate_window_secs;
        d.send(PING, b"x");
        assert_eq!(d.frames().len(), 1);
    }

    #[test]
    fn a_client_close_is_echoed_then_dropped() {
        let mut d = Driver::open("channels[]=a");
        d.send(CLOSE, &close_payload(1000, "bye"));
        let frames = d.frames();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].0, CLOSE);
        assert_eq!(close_code_of(&frames[0].1), 1000);
        assert_eq!(d.next, Next::Drop);
    }

    #[test]
    fn a_protocol_error_fails_the_connection_with_a_close_frame_and_half_close() {
        let mut d = Driver::open("channels[]=a");
        // Unmasked client frame.
        assert_eq!(
            d.read(&[0x81, 0x02, b'h', b'i']),
            Some(Incident::ProtocolError(close_code::PROTOCOL_ERROR))
        );
        let frames = d.frames();
        assert_eq!(frames.len(), 1);
        assert_eq!(close_code_of(&frames[0].1), close_code::PROTOCOL_ERROR);
        assert_eq!(d.next, Next::HalfClose);
    }

    #[test]
    fn events_reach_matching_subscriptions_with_their_ids_and_runs_share_a_tail() {
        let mut d = Driver::open("channels[]=a");
        let connected = d.subscribers("a");
        assert_eq!(connected, vec![KEY]);
        let verdicts = d.deliver(&[event("1-0", "a"), event("2-0", "a"), event("3-0", "z")]);
        assert_eq!(
            verdicts,
            vec![Verdict::Deliver, Verdict::Extend, Verdict::NotSubscribed]
        );
        let frames = d.frames();
        assert_eq!(frames.len(), 2);
        for (frame, id) in frames.iter().zip(["1-0", "2-0"]) {
            let v: serde_json::Value = serde_json::from_slice(&frame.1).unwrap();
            assert_eq!(v["type"], "event");
            assert_eq!(v["data"]["id"], id);
            assert_eq!(v["data"]["subscriptions"].as_array().unwrap().len(), 1);
        }
    }

    #[test]
    fn messages_beyond_the_byte_budget_of_the_window_get_1013() {
        let mut cfg = ConnConfig::from_config(&Config::for_tests());
        cfg.message_bytes_rate = 100;
        let mut d = Driver::open_with(cfg, "channels[]=a");
        let ping = br#"{"type":"ping"}"#;
        for _ in 0..6 {
            d.send(TEXT, ping);
            assert_eq!(json(&d.text())["type"], "pong");
        }
        d.send(TEXT, ping);
        let refused = json(&d.text());
        assert_eq!(refused["data"]["code"], 1013, "{refused}");
        assert_eq!(
            refused["data"]["message"],
            protocol::errors::TOO_MANY_MESSAGE_BYTES
        );
        // A new window has a new budget (the idle ping the tick brings is skipped).
        d.tick(61);
        d.frames();
        d.send(TEXT, ping);
        assert_eq!(json(&d.text())["type"], "pong");
    }

    #[test]
    fn a_shed_connection_lets_go_of_what_it_holds_and_says_why() {
        // An unfinished message: 1009, and its bytes go at once.
        let mut d = Driver::open("channels[]=a");
        let frame = crate::ws::decoder::encode_client_frame(true, 1, &[b'x'; 30_000], [1; 4]);
        assert_eq!(d.read(&frame[..20_000]), None);
        assert!(d.conn.held_bytes() >= 20_000);
        let code = d.conn.shed(&mut d.shared.context(KEY));
        assert_eq!(code, Some(close_code::TOO_BIG));
        d.transmit();
        let frames = d.frames();
        assert_eq!(frames.last().map(|f| f.0), Some(CLOSE));
        assert_eq!(
            close_code_of(&frames.last().unwrap().1),
            close_code::TOO_BIG
        );
        assert_eq!(d.conn.held_bytes(), 0);
        assert_eq!(
            d.deliver(&[event("1-0", "a")]),
            vec![Verdict::NotSubscribed]
        );

        // Queued output: 1013 after the frame already on the wire, the rest dropped.
        let mut d = Driver::open("channels[]=a");
        d.wire.budget = 100;
        for n in 0..20 {
            d.deliver(&[event(&format!("{n}-0"), "a")]);
        }
        assert!(d.conn.held_bytes() > 1_000);
        let code = d.conn.shed(&mut d.shared.context(KEY));
        assert_eq!(code, Some(close_code::TRY_AGAIN_LATER));
        d.wire.budget = usize::MAX;
        d.transmit();
        let frames = d.frames();
        assert_eq!(frames.len(), 2, "the started event, then the close");
        assert_eq!(close_code_of(&frames[1].1), close_code::TRY_AGAIN_LATER);

        // Not a WebSocket yet: dropped without an answer.
        let mut d = Driver::defaults();
        d.read(b"GET /v1/realtime?project=p HTTP/1.1\r\nHost: h\r\n");
        assert!(d.conn.held_bytes() > 0);
        assert_eq!(d.conn.shed(&mut d.shared.context(KEY)), None);
        assert_eq!(d.transmit().next, Next::Drop);
    }

    #[test]
    fn a_reader_that_stops_is_closed_as_a_slow_consumer_with_whole_frames_then_1013() {
        let mut cfg = ConnConfig::from_config(&Config::for_tests());
        cfg.max_outbound = 4096;
        let mut d = Driver::open_with(cfg, "channels[]=a");
        d.wire.budget = 700;
        let mut sent = 0;
        while !d.slow {
            assert!(sent < 1000, "the bound never closed the connection");
            d.deliver(&[event(&format!("{sent}-0"), "a")]);
            sent += 1;
        }
        assert_eq!(d.next, Next::Blocked);
        // Nothing is offered to a closing connection.
        assert_eq!(
            d.deliver(&[event("9999-0", "a")]),
            vec![Verdict::NotSubscribed]
        );
        d.wire.budget = usize::MAX;
        d.transmit();
        let frames = d.frames();
        let (last, events) = frames.split_last().unwrap();
        assert_eq!(last.0, CLOSE);
        assert_eq!(close_code_of(&last.1), close_code::TRY_AGAIN_LATER);
        assert!(!events.is_empty() && events.len() < sent);
        for (n, (op, payload)) in events.iter().enumerate() {
            assert_eq!(*op, TEXT);
            let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
            assert_eq!(v["data"]["id"], format!("{n}-0"), "a prefix, in order");
        }
        assert_eq!(
            d.seen,
            d.wire.out.len(),
            "no partial frame before the close"
        );
        assert_eq!(d.next, Next::Idle, "waits for the peer's close frame");
    }

    #[test]
    fn a_resume_holds_live_events_until_the_history_then_sends_both_in_order() {
        let mut d = Driver::open("channels[]=a&lastEventId=1-0");
        assert_eq!(d.shared.resumes, vec![KEY]);
        let (query, cancellation) = d.conn.replay_query(&d.shared.cfg).unwrap();
        assert!(!cancellation.is_cancelled());
        assert_eq!(query.after, "1-0".parse().unwrap());
        assert_eq!(query.subscriptions.len(), 1);
        assert_eq!(query.subscriptions[0].channels, vec!["a".to_owned()]);
        assert_eq!(query.project, "p");

        assert_eq!(d.deliver(&[event("4-0", "a")]), vec![Verdict::Hold]);
        assert!(d.frames().is_empty());

        let mut cx = d.shared.context(KEY);
        // An answer meant for an earlier connection in this slot changes nothing.
        d.conn
            .on_replay_answer(SERIAL + 1, Ok(vec![event("2-0", "a")]), &mut cx);
        d.conn.on_replay_answer(
            SERIAL,
            Ok(vec![event("2-0", "a"), event("3-0", "a")]),
            &mut cx,
        );
        d.transmit();
        let ids: Vec<String> = d
            .frames()
            .iter()
            .map(|(_, p)| {
                let v: serde_json::Value = serde_json::from_slice(p).unwrap();
                v["data"]["id"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(ids, ["2-0", "3-0", "4-0"]);
        assert!(d.conn.replay_query(&d.shared.cfg).is_none());
        assert!(!cancellation.is_cancelled(), "answered, not cancelled");

        // The shard had not passed the client's id: what it already has is skipped once.
        assert_eq!(d.deliver(&[event("1-0", "a")]), vec![Verdict::Skip]);
        assert_eq!(d.deliver(&[event("5-0", "a")]), vec![Verdict::Deliver]);
        assert_eq!(d.frames().len(), 1);
    }

    #[test]
    fn a_connection_that_goes_away_cancels_its_pending_replay() {
        let d = Driver::open("channels[]=a&lastEventId=1-0");
        let (_, cancellation) = d.conn.replay_query(&d.shared.cfg).unwrap();
        drop(d);
        assert!(cancellation.is_cancelled());
    }

    #[test]
    fn a_replay_that_never_answers_times_out_and_a_late_answer_changes_nothing() {
        let mut d = Driver::open("channels[]=a&lastEventId=1-0");
        assert_eq!(d.deliver(&[event("4-0", "a")]), vec![Verdict::Hold]);
        d.tick(REPLAY_TIMEOUT_SECS - 1);
        assert!(d.frames().is_empty());
        d.tick(REPLAY_TIMEOUT_SECS);
        // (The idle ping of the same tick aside.)
        let frames: Vec<_> = d
            .frames()
            .into_iter()
            .filter(|(op, _)| *op == TEXT)
            .collect();
        assert_eq!(frames.len(), 2, "an error, then what was held");
        let error: serde_json::Value = serde_json::from_slice(&frames[0].1).unwrap();
        assert_eq!(error["data"]["code"], 4010);
        let mut cx = d.shared.context(KEY);
        d.conn
            .on_replay_answer(SERIAL, Ok(vec![event("2-0", "a")]), &mut cx);
        d.transmit();
        assert!(d.frames().is_empty(), "the late history is not sent");
    }

    #[test]
    fn a_client_that_does_not_read_is_not_read_from_until_its_output_drains() {
        let mut cfg = ConnConfig::from_config(&Config::for_tests());
        cfg.max_outbound = 64 * 1024;
        let mut d = Driver::open_with(cfg, "channels[]=a");
        d.wire.budget = 0;
        let payload = "x".repeat(1000);
        let mut n = 0;
        while d.conn.wants_input(&d.shared.cfg) {
            assert!(n < 1000, "the output never paused input");
            let ev = EncodedEvent::encode(&Event {
                id: format!("{n}-0"),
                project: "p".into(),
                channels: vec!["a".into()],
                events: vec![],
                roles: vec![],
                timestamp: "t".into(),
                payload: serde_json::json!({ "x": payload }),
            });
            d.deliver(&[ev]);
            n += 1;
        }
        assert!(!d.slow, "paused well before the bound");
        d.wire.budget = usize::MAX;
        d.transmit();
        assert!(d.conn.wants_input(&d.shared.cfg));
        assert_eq!(d.frames().len(), n);
    }

    #[test]
    fn a_busy_stream_of_messages_split_across_reads_is_never_timed_out() {
        let mut d = Driver::open("channels[]=a");
        let timeout = d.shared.cfg.message_timeout_secs;
        let ping = br#"{"type":"ping"}"#;
        let frame = encode_client_frame(true, TEXT, ping, [1, 2, 3, 4]);
        // Every read completes one message and begins the next, for twice the timeout.
        d.read(&frame[..5]);
        for second in 1..=2 * timeout {
            let mut bytes = frame[5..].to_vec();
            bytes.extend_from_slice(&frame[..5]);
            d.shared.now = second;
            d.read(&bytes);
            d.tick(second);
            assert_eq!(d.next, Next::Idle);
        }
        let frames = d.frames();
        assert_eq!(
            frames.len() as u32,
            2 * timeout,
            "every ping answered, no close"
        );
        assert!(frames.iter().all(|(op, _)| *op == TEXT));
    }

    #[test]
    fn a_failed_replay_tells_the_client_then_sends_what_was_held() {
        let mut d = Driver::open("channels[]=a&lastEventId=1-0");
        d.deliver(&[event("4-0", "a")]);
        let mut cx = d.shared.context(KEY);
        let gone = ReplayError::Unavailable("the control plane is gone".into());
        d.conn.on_replay_answer(SERIAL, Err(gone), &mut cx);
        d.transmit();
        let frames = d.frames();
        assert_eq!(frames.len(), 2);
        let error: serde_json::Value = serde_json::from_slice(&frames[0].1).unwrap();
        assert_eq!(error["data"]["code"], 4010);
        let live: serde_json::Value = serde_json::from_slice(&frames[1].1).unwrap();
        assert_eq!(live["data"]["id"], "4-0");
    }

    #[test]
    fn an_idle_connection_is_pinged_once_then_closed_with_1001_then_dropped() {
        let mut d = Driver::pinged_early();
        d.tick(1);
        assert!(d.frames().is_empty());
        d.tick(2);
        assert_eq!(d.frames(), vec![(PING, Vec::new())]);
        d.tick(3);
        assert!(d.frames().is_empty(), "one ping until the peer answers");
        d.tick(5);
        let frames = d.frames();
        assert_eq!(frames[0].0, CLOSE);
        assert_eq!(close_code_of(&frames[0].1), close_code::GOING_AWAY);
        assert_eq!(d.shared.counters.idle_closed, 1);
        assert_eq!(d.next, Next::Idle);
        d.tick(5 + CLOSE_TIMEOUT_SECS);
        assert_eq!(d.next, Next::Drop);
    }

    #[test]
    fn a_peer_acknowledging_what_it_was_sent_is_heard_without_a_ping() {
        let mut d = Driver::pinged_early();
        d.tick(1);
        assert!(!d.asked_peer, "the socket is asked only when a ping is due");
        // Its TCP acknowledged everything a second ago: no ping, and the idle clock restarts.
        // Its TCP acknowledged everything just now: no ping, and the idle clock restarts.
        d.peer_acked = Some(0);
        d.tick(2);
        assert!(d.asked_peer);
        assert!(d.frames().is_empty());
        assert_eq!(d.shared.counters.pings_saved, 1);
        d.asked_peer = false;
        d.tick(3);
        assert!(!d.asked_peer, "not idle long enough to ask again");
        // Once the acknowledgements are old (or data is unacknowledged), a ping goes out.
        d.peer_acked = Some(2);
        d.tick(4);
        assert_eq!(d.frames(), vec![(PING, Vec::new())]);
        assert_eq!(d.shared.counters.pings_sent, 1);
        // Unanswered, it is the idle timeout as ever: 5 s after the peer was last heard.
        d.peer_acked = None;
        d.tick(6);
        assert!(d.frames().is_empty());
        d.tick(7);
        let frames = d.frames();
        assert_eq!(close_code_of(&frames[0].1), close_code::GOING_AWAY);
    }

    #[test]
    fn a_client_behind_a_trusted_proxy_is_pinged_whatever_the_proxy_acknowledges() {
        let mut cfg = ConnConfig::from_config(&Config::for_tests());
        cfg.ping_interval_secs = 2;
        cfg.idle_timeout_secs = 5;
        let mut d = Driver::new(cfg.clone());
        d.conn = Connection::new(SERIAL, 0, &cfg, true);
        d.read(&upgrade("/v1/realtime?project=p&channels[]=a"));
        assert!(d.http_head().starts_with("HTTP/1.1 101"));
        assert_eq!(json(&d.text())["type"], "connected");
        d.peer_acked = Some(0);
        d.tick(2);
        assert!(!d.asked_peer, "the proxy's TCP answers for the proxy");
        assert_eq!(d.frames(), vec![(PING, Vec::new())]);
        assert_eq!(d.shared.counters.pings_sent, 1);
    }

    #[test]
    fn a_backlogged_connection_is_pinged_whatever_its_socket_says() {
        let mut d = Driver::pinged_early();
        d.wire.budget = 0;
        d.peer_acked = Some(0);
        d.deliver(&[event("1-0", "a")]);
        assert!(d.conn.is_backlogged());
        d.asked_peer = false;
        d.tick(2);
        assert!(!d.asked_peer);
        assert_eq!(d.shared.counters.pings_sent, 1);
    }

    #[test]
    fn reading_keeps_a_connection_alive_and_a_pong_allows_the_next_ping() {
        let mut d = Driver::pinged_early();
        d.tick(2);
        assert_eq!(d.frames().len(), 1);
        d.shared.now = 4;
        d.send(0xA, b"");
        d.tick(6);
        assert_eq!(d.frames(), vec![(PING, Vec::new())]);
        assert_eq!(d.next, Next::Idle);
    }

    #[test]
    fn a_message_trickled_in_is_closed_with_1008_and_its_bytes_are_no_activity() {
        let mut cfg = ConnConfig::from_config(&Config::for_tests());
        cfg.ping_interval_secs = 2;
        let mut d = Driver::open_with(cfg, "channels[]=a");
        let timeout = d.shared.cfg.message_timeout_secs;
        assert!(timeout < d.shared.cfg.idle_timeout_secs);
        let frame = encode_client_frame(true, TEXT, &[b'x'; 1000], [1, 2, 3, 4]);
        d.shared.now = 1;
        d.read(&frame[..10]);
        d.shared.now = 2;
        d.read(&frame[10..11]);
        // Pinged at 2 s of silence: the partial bytes did not count as activity.
        d.tick(2);
        assert_eq!(d.frames(), vec![(PING, Vec::new())]);
        assert_eq!(
            d.tick(timeout),
            None,
            "the deadline runs from the first byte"
        );
        assert_eq!(
            d.tick(1 + timeout),
            Some(Incident::ProtocolError(close_code::POLICY))
        );
        let frames = d.frames();
        assert_eq!(frames[0].0, CLOSE);
        assert_eq!(close_code_of(&frames[0].1), close_code::POLICY);
        assert!(d.conn.decoder_is_idle(), "the partial message was freed");
    }

    #[test]
    fn a_handshake_that_never_completes_times_out() {
        let mut d = Driver::defaults();
        d.read(b"GET /v1/realtime HTTP/1.1\r\n");
        let timeout = d.shared.cfg.handshake_timeout_secs;
        assert_eq!(d.tick(timeout - 1), None);
        assert_eq!(d.next, Next::Idle);
        assert_eq!(d.tick(timeout), Some(Incident::Rejected("timeout")));
        assert_eq!(d.next, Next::Drop);
        assert!(d.wire.out.is_empty());
    }

    #[test]
    fn shutdown_closes_websockets_with_1001_and_drops_half_open_handshakes() {
        let mut d = Driver::open("channels[]=a");
        let mut cx = d.shared.context(KEY);
        d.conn.on_shutdown(&mut cx);
        d.transmit();
        let frames = d.frames();
        assert_eq!(close_code_of(&frames[0].1), close_code::GOING_AWAY);
        assert_eq!(d.next, Next::Idle);

        let mut h = Driver::defaults();
        let mut cx = h.shared.context(KEY);
        h.conn.on_shutdown(&mut cx);
        h.transmit();
        assert_eq!(h.next, Next::Drop);
    }
}
