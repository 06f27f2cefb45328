//! One client connection's state machine: upgrade, open WebSocket, close handshake.
//!
//! Owns what happens to a connection's bytes: the upgrade request, WebSocket messages, the
//! realtime protocol reply, rate limits, idle pings, and the close sequence. It does no system
//! calls: the shard's I/O driver reads into a scratch buffer, calls in here, and writes whatever
//! lands in `Env::out` and the [`Outbox`]. That boundary is what lets an io_uring driver reuse it.
//!
//! Memory: an idle open connection holds no buffers, only this struct and its session.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::Arc;

use bytes::Bytes;
use smallvec::SmallVec;

use crate::bus::ReplayError;
use crate::config::Config;
use crate::event::{EncodedEvent, EventId, write_tail};
use crate::outbox::{OutFrame, Outbox};
use crate::protocol::{self, Session, SessionLimits};
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
    pub message_rate: u32,
    pub message_rate_window_secs: u32,
    pub ping_interval_secs: u32,
    pub idle_timeout_secs: u32,
    pub max_outbound: usize,
    pub default_project: String,
    pub echo_path: Option<String>,
    pub limits: SessionLimits,
    pub guest_roles: Arc<[Box<str>]>,
}

fn secs(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_secs() + u64::from(d.subsec_nanos() > 0)).unwrap_or(u32::MAX)
}

impl ConnConfig {
    pub fn from_config(c: &Config) -> Self {
        Self {
            max_message: c.max_message_bytes,
            echo_max_message: c.echo_max_message_bytes,
            max_handshake: c.max_handshake_bytes,
            handshake_timeout_secs: secs(c.handshake_timeout).max(1),
            message_rate: c.message_rate,
            message_rate_window_secs: secs(c.message_rate_window).max(1),
            ping_interval_secs: secs(c.ping_interval),
            idle_timeout_secs: secs(c.idle_timeout),
            max_outbound: c.max_outbound_bytes,
            default_project: c.default_project.clone(),
            echo_path: c.echo_path.clone(),
            limits: SessionLimits {
                max_subscriptions: c.max_subscriptions,
                ..SessionLimits::default()
            },
            guest_roles: Arc::from(vec![Box::<str>::from("guests")]),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the HTTP upgrade request.
    Handshake,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Realtime,
    Echo,
}

/// Per-shard counters a connection bumps.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub rate_limited: u64,
    pub idle_closed: u64,
}

/// What a connection needs from its shard while handling bytes or timers.
pub struct Env<'a> {
    pub cfg: &'a ConnConfig,
    pub registry: &'a mut Registry,
    pub key: u32,
    pub now: u32,
    /// Frames to send, in order; the driver appends them to the outbox.
    pub out: &'a mut Vec<OutFrame>,
    pub counters: &'a mut Counters,
    /// Connections that started a resume; the shard asks the control plane for their history.
    pub replays: &'a mut Vec<u32>,
    /// The last event this shard has processed: a resume starting now replays up to it.
    pub position: Option<EventId>,
}

/// Error code for a `lastEventId` that is not an event id (README: Resume).
pub const INVALID_LAST_EVENT_ID: u16 = 4011;

/// A resume in progress. While the history is being fetched, live events for the connection
/// wait here, so replayed and live events join without a gap or a duplicate.
#[derive(Debug)]
pub struct Replay {
    pub after: EventId,
    /// The shard's position when the resume began: history covers `(after, upto]`, live
    /// delivery everything later.
    pub upto: Option<EventId>,
    /// The history answer is outstanding. Once it arrived the state only remains while this
    /// shard has not yet passed `after`, to skip live events the client already has.
    waiting: bool,
    buffered: VecDeque<Arc<EncodedEvent>>,
    buffered_bytes: usize,
    overflowed: bool,
}

/// What to do with a live event for a connection that matched it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    Deliver,
    /// Held until the replay finishes.
    Held,
    /// The client already has it (or lost it to an overflow it will be told about).
    Skip,
}

/// The frame of `event` for `session`: the shared prefix plus this connection's matching ids.
pub fn event_frame(session: &Session, event: &EncodedEvent) -> Option<OutFrame> {
    let mut ids = session.matching(event).peekable();
    ids.peek()?;
    let mut tail = SmallVec::new();
    write_tail(&mut tail, ids);
    Some(OutFrame::new(Opcode::Text, event.prefix.clone(), tail))
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
    pub serial: u32,
    pub phase: Phase,
    kind: Kind,
    pub ping_outstanding: bool,
    /// The driver registered interest in writability (the outbox is non-empty).
    pub wants_write: bool,
    rate_count: u16,
    rate_window_start: u32,
    pub last_read: u32,
    pub deadline: u32,
    /// A request head split across reads. Boxed so the common case (no split) costs one
    /// pointer in every connection instead of a 24-byte `Vec`.
    #[allow(clippy::box_collection)]
    handshake: Option<Box<Vec<u8>>>,
    decoder: Decoder,
    pub outbox: Outbox,
    pub session: Option<Session>,
    pub replay: Option<Box<Replay>>,
}

impl Connection {
    pub fn new(serial: u32, now: u32, cfg: &ConnConfig) -> Self {
        Self {
            serial,
            phase: Phase::Handshake,
            kind: Kind::Realtime,
            ping_outstanding: false,
            wants_write: false,
            rate_count: 0,
            rate_window_start: now,
            last_read: now,
            deadline: now.saturating_add(cfg.handshake_timeout_secs),
            handshake: None,
            decoder: Decoder::default(),
            outbox: Outbox::default(),
            session: None,
            replay: None,
        }
    }

    /// The outbound bound for this connection (the echo endpoint must hold whole echoed messages).
    pub fn outbound_limit(&self, cfg: &ConnConfig) -> usize {
        match self.kind {
            Kind::Realtime => cfg.max_outbound,
            Kind::Echo => cfg.max_outbound.max(cfg.echo_max_message.saturating_mul(2)),
        }
    }

    /// True for an open realtime connection, the only kind events go to.
    pub fn receives_events(&self) -> bool {
        self.phase == Phase::Open && self.kind == Kind::Realtime
    }

    /// Handles bytes just read from the socket. `data` is the shard's scratch buffer.
    pub fn on_data(&mut self, data: &mut [u8], env: &mut Env<'_>) -> Option<Incident> {
        self.last_read = env.now;
        match self.phase {
            Phase::Handshake => self.on_handshake_bytes(data, env),
            Phase::Open | Phase::Closing => self.on_ws_bytes(data, env),
            Phase::FlushThenDrop | Phase::FlushThenLinger | Phase::Lingering => None,
        }
    }

    fn on_handshake_bytes(&mut self, data: &mut [u8], env: &mut Env<'_>) -> Option<Incident> {
        let mut held = self.handshake.take();
        let buf: &mut [u8] = match held.as_mut() {
            Some(h) => {
                h.extend_from_slice(data);
                &mut h[..]
            }
            None => data,
        };
        match handshake::parse_request(buf, env.cfg.max_handshake) {
            Err(e) => self.reject(e.status(), &e.to_string(), env, "malformed"),
            Ok(None) => {
                let kept = match held {
                    Some(h) => h,
                    None => Box::new(data.to_vec()),
                };
                self.handshake = Some(kept);
                None
            }
            Ok(Some((req, len))) => {
                let incident = self.upgrade(&req, env);
                if self.phase == Phase::Open && buf.len() > len {
                    return self.on_ws_bytes(&mut buf[len..], env).or(incident);
                }
                incident
            }
        }
    }

    fn reject(
        &mut self,
        status: u16,
        message: &str,
        env: &mut Env<'_>,
        reason: &'static str,
    ) -> Option<Incident> {
        env.out
            .push(OutFrame::raw(Bytes::from(handshake::error_response(
                status, message,
            ))));
        self.enter(Phase::FlushThenLinger, env.now);
        Some(Incident::Rejected(reason))
    }

    fn upgrade(&mut self, req: &Request, env: &mut Env<'_>) -> Option<Incident> {
        let realtime = req.path == "/v1/realtime" || req.path.starts_with("/v1/realtime/");
        let echo = env.cfg.echo_path.as_deref() == Some(req.path.as_str());
        if !realtime && !echo {
            return self.reject(
                404,
                "Not found: realtime clients connect to /v1/realtime",
                env,
                "not_found",
            );
        }
        let key = match req.websocket_key() {
            Ok(k) => k,
            Err(r) => return self.reject(r.status, r.message, env, "not_websocket"),
        };
        env.out
            .push(OutFrame::raw(Bytes::from(handshake::accept_response(key))));
        self.phase = Phase::Open;
        if echo && !realtime {
            self.kind = Kind::Echo;
            return None;
        }
        let q = crate::query::parse(&req.query);
        let project = req
            .project
            .as_deref()
            .or(q.project.as_deref())
            .unwrap_or(&env.cfg.default_project);
        let limits = env.cfg.limits;
        if q.channels.len() > limits.max_channels
            || q.channels.iter().any(|c| c.len() > limits.max_channel_len)
        {
            let msg = format!(
                "Too many or too long channels: at most {} channels of at most {} bytes",
                limits.max_channels, limits.max_channel_len
            );
            env.out.push(OutFrame::text(protocol::error_message(
                close_code::POLICY,
                &msg,
            )));
            self.close(close_code::POLICY, "invalid channels", env);
            return Some(Incident::Rejected("invalid_channels"));
        }
        let project = env.registry.intern(project);
        let registry = &mut *env.registry;
        let session = Session::new(
            project,
            env.cfg.guest_roles.clone(),
            &q.channels,
            &mut |c| registry.intern(c),
        );
        env.out.push(OutFrame::text(session.connected_message()));
        env.registry
            .update(&session.project, env.key, &[], &session.channels());
        self.session = Some(session);
        if let Some(after) = q.last_event_id {
            self.start_replay(&after, env);
        }
        None
    }

    /// Begins a resume after `raw` (a client-supplied `lastEventId`).
    fn start_replay(&mut self, raw: &str, env: &mut Env<'_>) {
        let message = match raw.parse::<EventId>() {
            Err(e) => format!("Invalid lastEventId {raw:?}: {e}"),
            Ok(_) if self.replay.as_ref().is_some_and(|r| r.waiting) => {
                "Invalid lastEventId: a replay is already in progress on this connection".to_owned()
            }
            Ok(after) => {
                self.replay = Some(Box::new(Replay {
                    after,
                    upto: env.position,
                    waiting: true,
                    buffered: VecDeque::new(),
                    buffered_bytes: 0,
                    overflowed: false,
                }));
                env.replays.push(env.key);
                return;
            }
        };
        env.out.push(OutFrame::text(protocol::error_message(
            INVALID_LAST_EVENT_ID,
            &message,
        )));
    }

    /// Decides what happens to a live event this connection's session matched.
    pub fn offer_live(&mut self, event: &Arc<EncodedEvent>, max_held: usize) -> Live {
        let Some(r) = self.replay.as_mut() else {
            return Live::Deliver;
        };
        if r.waiting {
            if r.overflowed {
                return Live::Skip;
            }
            r.buffered_bytes += event.frame_bytes();
            if r.buffered_bytes > max_held {
                r.overflowed = true;
                r.buffered = VecDeque::new();
                return Live::Skip;
            }
            r.buffered.push_back(event.clone());
            return Live::Held;
        }
        match event.position {
            Some(p) if p <= r.after => Live::Skip,
            Some(_) => {
                self.replay = None;
                Live::Deliver
            }
            None => Live::Deliver,
        }
    }

    /// The history for a resume arrived: sends it, then the live events held meanwhile.
    /// `shard_position` is the last event this shard has processed.
    pub fn finish_replay(
        &mut self,
        outcome: Result<Vec<Arc<EncodedEvent>>, ReplayError>,
        shard_position: Option<EventId>,
        env: &mut Env<'_>,
    ) {
        let Some(mut r) = self.replay.take() else {
            return;
        };
        let Some(session) = self.session.as_ref() else {
            return;
        };
        let keep_skipping = match &outcome {
            Ok(events) => {
                env.out
                    .extend(events.iter().filter_map(|e| event_frame(session, e)));
                true
            }
            Err(e) => {
                env.out.push(OutFrame::text(protocol::error_message(
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
                env.cfg.max_outbound
            ));
            env.out.push(OutFrame::text(protocol::error_message(
                e.code(),
                &e.to_string(),
            )));
        }
        env.out.extend(
            r.buffered
                .drain(..)
                .filter_map(|e| event_frame(session, &e)),
        );
        if keep_skipping && shard_position.is_none_or(|h| h < r.after) {
            r.waiting = false;
            r.buffered = VecDeque::new();
            self.replay = Some(r);
        }
    }

    fn on_ws_bytes(&mut self, data: &mut [u8], env: &mut Env<'_>) -> Option<Incident> {
        let max = match self.kind {
            Kind::Realtime => env.cfg.max_message,
            Kind::Echo => env.cfg.echo_max_message,
        };
        let mut decoder = std::mem::take(&mut self.decoder);
        let result = decoder.feed(data, max, |m| self.on_message(m, env));
        self.decoder = decoder;
        match result {
            Ok(()) => None,
            Err(e) => Some(self.fail(&e, env)),
        }
    }

    fn fail(&mut self, e: &ProtocolError, env: &mut Env<'_>) -> Incident {
        // Nothing more will be decoded, so the partial state can go now.
        self.decoder = Decoder::default();
        let code = e.close_code();
        if self.phase == Phase::Open {
            // RFC 6455 section 7.1.7, _Fail the WebSocket Connection_: send a close frame, then
            // end the TCP connection without waiting for the peer's close frame. A peer whose own
            // close frame was malformed would never send another, so waiting (Closing) only held
            // the socket until the timeout. The half-close after the flush keeps the close frame
            // from being destroyed by a reset.
            env.out.push(OutFrame::new(
                Opcode::Close,
                Bytes::from(close_payload(code, &e.to_string())),
                SmallVec::new(),
            ));
            self.enter(Phase::FlushThenLinger, env.now);
        } else {
            self.enter(Phase::FlushThenDrop, env.now);
        }
        Incident::ProtocolError(code)
    }

    fn on_message(&mut self, m: Message<'_>, env: &mut Env<'_>) -> ControlFlow<()> {
        let open = self.phase == Phase::Open;
        match m {
            Message::Ping(p) if open => env.out.push(OutFrame::new(
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
                    env.out.push(OutFrame::new(
                        Opcode::Close,
                        Bytes::from(payload),
                        SmallVec::new(),
                    ));
                }
                self.decoder = Decoder::default();
                self.enter(Phase::FlushThenDrop, env.now);
                return ControlFlow::Break(());
            }
            Message::Text(t) if open => match self.kind {
                Kind::Echo => env.out.push(OutFrame::new(
                    Opcode::Text,
                    Bytes::copy_from_slice(t.as_bytes()),
                    SmallVec::new(),
                )),
                Kind::Realtime => return self.on_text(t, env),
            },
            Message::Binary(b) if open => match self.kind {
                Kind::Echo => env.out.push(OutFrame::new(
                    Opcode::Binary,
                    Bytes::copy_from_slice(b),
                    SmallVec::new(),
                )),
                Kind::Realtime => env.out.push(OutFrame::text(protocol::error_message(
                    close_code::UNSUPPORTED_DATA,
                    protocol::errors::BINARY,
                ))),
            },
            // Data after herald started closing is ignored, as RFC 6455 allows.
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn on_text(&mut self, text: &str, env: &mut Env<'_>) -> ControlFlow<()> {
        if env.cfg.message_rate > 0 {
            if env.now.saturating_sub(self.rate_window_start) >= env.cfg.message_rate_window_secs {
                self.rate_window_start = env.now;
                self.rate_count = 0;
            }
            self.rate_count = self.rate_count.saturating_add(1);
            if u32::from(self.rate_count) > env.cfg.message_rate {
                env.counters.rate_limited += 1;
                env.out.push(OutFrame::text(protocol::error_message(
                    close_code::TRY_AGAIN_LATER,
                    protocol::errors::TOO_MANY_MESSAGES,
                )));
                return ControlFlow::Continue(());
            }
        }
        let Some(session) = self.session.as_mut() else {
            return ControlFlow::Continue(());
        };
        let before = session.channels();
        let registry = &mut *env.registry;
        let reply = session.handle_text(text, &env.cfg.limits, &mut |c| registry.intern(c));
        if reply.subscriptions_changed {
            env.registry
                .update(&session.project, env.key, &before, &session.channels());
        }
        if let Some(frame) = reply.frame {
            env.out.push(OutFrame::text(frame));
        }
        if let Some(after) = reply.resume_after {
            self.start_replay(&after, env);
        }
        if let Some(code) = reply.close {
            self.close(code, "", env);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    /// Starts the close handshake: sends a close frame and waits for the peer's.
    pub fn close(&mut self, code: u16, reason: &str, env: &mut Env<'_>) {
        env.out.push(OutFrame::new(
            Opcode::Close,
            Bytes::from(close_payload(code, reason)),
            SmallVec::new(),
        ));
        self.enter(Phase::Closing, env.now);
    }

    fn enter(&mut self, phase: Phase, now: u32) {
        self.phase = phase;
        self.handshake = None;
        if phase != Phase::Open {
            self.deadline = now.saturating_add(CLOSE_TIMEOUT_SECS);
        }
    }

    /// Called when the outbox is empty, to move a finishing connection along. Returns true when
    /// the connection should be dropped now, and sets `Lingering` when it should half-close.
    pub fn after_flush(&mut self, now: u32) -> bool {
        match self.phase {
            Phase::FlushThenDrop => true,
            Phase::FlushThenLinger => {
                self.enter(Phase::Lingering, now);
                false
            }
            _ => false,
        }
    }

    /// Periodic check: handshake and close deadlines, idle pings and the idle timeout. Returns
    /// true when the connection should be dropped now.
    pub fn on_tick(&mut self, env: &mut Env<'_>) -> bool {
        match self.phase {
            Phase::Open => {
                let idle = env.now.saturating_sub(self.last_read);
                let cfg = env.cfg;
                if cfg.idle_timeout_secs > 0 && idle >= cfg.idle_timeout_secs {
                    env.counters.idle_closed += 1;
                    self.close(close_code::GOING_AWAY, "idle timeout", env);
                } else if cfg.ping_interval_secs > 0
                    && idle >= cfg.ping_interval_secs
                    && !self.ping_outstanding
                {
                    self.ping_outstanding = true;
                    env.out
                        .push(OutFrame::new(Opcode::Ping, Bytes::new(), SmallVec::new()));
                }
                false
            }
            _ => env.now >= self.deadline,
        }
    }

    /// Starts a graceful close for shutdown. Returns true when the connection should simply be
    /// dropped (it never became a WebSocket).
    pub fn shutdown(&mut self, env: &mut Env<'_>) -> bool {
        match self.phase {
            Phase::Handshake => true,
            Phase::Open => {
                self.close(close_code::GOING_AWAY, "server shutting down", env);
                false
            }
            _ => false,
        }
    }

    /// The outbox overflowed: drop what the peer has not started to receive and tell it why.
    pub fn slow_consumer(&mut self, env: &mut Env<'_>) {
        self.outbox.discard_unstarted();
        self.close(
            close_code::TRY_AGAIN_LATER,
            "slow consumer: outbound queue full",
            env,
        );
    }

    /// Removes this connection from the shard's channel index (before its slot is reused).
    pub fn unindex(&self, registry: &mut Registry, key: u32) {
        if let Some(s) = &self.session {
            registry.update(&s.project, key, &s.channels(), &[]);
        }
    }
}
