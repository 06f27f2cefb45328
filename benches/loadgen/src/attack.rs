//! `herald-bench attack`: hostile clients. Many connections of one kind of misbehaviour (a huge
//! subscribe repeated at the allowed rate, frames or handshakes that never finish, resume floods,
//! ping floods, clients that never read, a handshake flood from one address, malformed frames)
//! held for a bounded time, reconnecting when the server closes them so the pressure stays, then
//! one JSON summary line of what the attacker got: HTTP statuses, close codes, closes by the
//! server, reconnects, bytes sent, error codes, failure reasons.
//!
//! Owns the attack kinds, their pacing and their counts. It is an attacker, not a measuring
//! engine: a task per connection on a single-threaded tokio runtime is plenty. The victims'
//! side (latency, loss) is `fanout`'s; herald's memory is read by `benches/hostile.sh`. Must not
//! know herald's internals beyond its client frame codec.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use memchr::memmem;
use serde_json::{Value, json};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior, sleep, sleep_until, timeout, timeout_at};

use herald::ws::decoder::encode_client_frame;

use crate::messages::{AttackSummary, Reasons};
use crate::reasons::bump;
use crate::socket::explain;
use crate::system::{fd_capacity, stop_flag, unix_us};
use crate::target::{Target, check_source_ips, parse_source_ips};
use crate::wire::{
    OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, Response, mask, parse_response, parse_server_frame,
    refusal_at_eof,
};

/// herald's defaults the attacks are shaped by (README, "Limits" and "Configuration").
pub(crate) const MAX_MESSAGE_BYTES: usize = 64_000;
/// Distinct subscriptions of a big subscribe: 10 x 100 channels is the 1,000 distinct channels a
/// connection may listen to (`--max-channels-per-connection`).
pub(crate) const MAX_SUBSCRIPTIONS: usize = 10;
pub(crate) const MAX_CHANNELS: usize = 100;
/// Largest payload of a control frame (RFC 6455).
const MAX_CONTROL_PAYLOAD: usize = 125;
/// Pause after a local failure (connect refused, no port) so a slot does not spin.
const ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Descriptors kept free besides the attack's own connections.
const FD_RESERVE: usize = 64;
/// Read chunk of one connection (the stack of its task).
const CHUNK: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Kind {
    /// After `connected`, the largest Gen C subscribe the default limits allow (100
    /// subscriptions x 100 channels, under 64,000 bytes), then no-op upserts of it at the allowed
    /// message rate.
    BigSubscribe,
    /// A masked text frame header declaring 64,000 bytes, a few payload bytes, then one byte per
    /// --byte-interval (herald closes with 1008 after its message timeout).
    PartialFrame,
    /// The upgrade request one byte per --byte-interval (herald drops it after its handshake
    /// timeout).
    SlowHandshake,
    /// Connect with `lastEventId` and --channel, read for --resume-wait, close, repeat.
    ResumeFlood,
    /// WebSocket pings at --rate per connection per second.
    PingFlood,
    /// A tiny receive buffer, subscribed to --channel, reads the upgrade and `connected`, then
    /// never again (herald should close it as a slow consumer); no reconnect.
    NonReader,
    /// From the first --source-ips address only: connections as fast as possible, every
    /// upgraded one held until the end.
    HandshakeFlood,
    /// Unmasked frames, frames with reserved bits, oversize frame headers, in rotation.
    Garbage,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::BigSubscribe => "big-subscribe",
            Self::PartialFrame => "partial-frame",
            Self::SlowHandshake => "slow-handshake",
            Self::ResumeFlood => "resume-flood",
            Self::PingFlood => "ping-flood",
            Self::NonReader => "non-reader",
            Self::HandshakeFlood => "handshake-flood",
            Self::Garbage => "garbage",
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct AttackArgs {
    /// The misbehaviour.
    #[arg(long, value_enum)]
    kind: Kind,
    /// WebSocket URL without channels, e.g. ws://127.0.0.1:9505/v1/realtime?project=p
    #[arg(long)]
    target: String,
    /// Hostile connections (slots; each reconnects when the server closes it). For
    /// handshake-flood: handshakes in flight at once.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// How long the attack runs (it then stops by itself; SIGINT/SIGTERM stop it earlier).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Local IPv4 addresses to bind, round robin, e.g. 127.0.1.1-127.0.1.10.
    #[arg(long)]
    source_ips: Option<String>,
    /// The victims' channel: subscribed to by resume-flood, non-reader and (last in every
    /// subscription) big-subscribe.
    #[arg(long, default_value = "bench")]
    channel: String,
    /// Written (JSON) once every connection is in place, or after --ready-timeout.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    ready_timeout: Duration,
    /// First connections started per second (the ramp; reconnects are not paced by it).
    #[arg(long, default_value_t = 2000.0)]
    connect_rate: f64,
    /// ping-flood: pings per connection per second.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// ping-flood: payload bytes of each ping (at most 125).
    #[arg(long, default_value_t = 125)]
    ping_payload: usize,
    /// big-subscribe: messages per --window (herald's --message-rate; at most this many are sent,
    /// evenly spread with a 2% margin).
    #[arg(long, default_value_t = 32)]
    messages_per_window: u32,
    /// big-subscribe: herald's --message-rate-window.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// big-subscribe: leave --channel out of the subscriptions (no events to the attacker).
    #[arg(long)]
    without_channel: bool,
    /// partial-frame and slow-handshake: time between two bytes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    byte_interval: Duration,
    /// resume-flood: how long to read after `connected` before closing.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    resume_wait: Duration,
    /// resume-flood: `lastEventId` is `<ms>-0` for this long ago (never before the attack's
    /// start), so every resume asks for that much history.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    resume_lag: Duration,
    /// resume-flood: a fixed `lastEventId` instead.
    #[arg(long)]
    last_event_id: Option<String>,
    /// Wait before reconnecting after an HTTP 429 (herald says `Retry-After: 1`);
    /// handshake-flood never waits.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    backoff_429: Duration,
    /// Time allowed for a connect, an upgrade or the `connected` message.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    io_timeout: Duration,
    /// non-reader: SO_RCVBUF set before connecting.
    #[arg(long, default_value_t = 4096)]
    rcvbuf: usize,
    /// non-reader: at the end, how long to read what is queued to find out which connections the
    /// server closed.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain_time: Duration,
}

// ---------------------------------------------------------------------------------------------
// Pure parts: messages and frames

/// Channel names of 1 to 3 visible ASCII characters, shortest first, none needing a JSON
/// escape.
fn short_names() -> impl Iterator<Item = String> {
    let alphabet: Vec<char> = (0x21u8..=0x7E)
        .filter(|b| *b != b'"' && *b != b'\\')
        .map(char::from)
        .collect();
    let n = alphabet.len();
    (1..=3u32).flat_map(move |len| {
        let alphabet = alphabet.clone();
        (0..n.pow(len)).map(move |mut i| {
            let mut s = String::with_capacity(len as usize);
            for _ in 0..len {
                s.push(alphabet[i % n]);
                i /= n;
            }
            s
        })
    })
}

/// The largest Gen C subscribe herald's default limits take: `subscriptions` rows (ids `0`,
/// `1`, ...) of `per_row` channels each, all distinct, short names first; with `victim`, that
/// channel is the last of every row (an event on it then has to be matched against every
/// channel of every row). Compact JSON.
pub(crate) fn big_subscribe_message(
    subscriptions: usize,
    per_row: usize,
    victim: Option<&str>,
) -> String {
    let fillers = per_row - usize::from(victim.is_some());
    let mut names = short_names().filter(|n| Some(n.as_str()) != victim);
    let distinct: Vec<Value> = (0..subscriptions)
        .map(|s| {
            let mut channels: Vec<String> = names.by_ref().take(fillers).collect();
            channels.extend(victim.map(str::to_owned));
            json!({"subscriptionId": s.to_string(), "channels": channels})
        })
        .collect();
    // The same subscriptions again and again, as many rows as fit: the most parsing a message
    // within the channel limit can ask for.
    let message = |rows: usize| {
        let rows: Vec<&Value> = distinct.iter().cycle().take(rows).collect();
        json!({"type": "subscribe", "data": rows}).to_string()
    };
    let mut rows = subscriptions;
    while message(rows + 1).len() < MAX_MESSAGE_BYTES {
        rows += 1;
    }
    message(rows)
}

/// The start of a masked text frame declaring `declared` payload bytes, with `sent` of them.
pub(crate) fn partial_frame(declared: usize, sent: &[u8], key: [u8; 4]) -> Vec<u8> {
    let mut out = vec![0x80 | OP_TEXT];
    if declared <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(declared as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(declared as u64).to_be_bytes());
    }
    out.extend_from_slice(&key);
    out.extend(sent.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

/// Malformed client frames, one per rotation step: unmasked, reserved bits set, and a header
/// declaring more than herald's message limit.
pub(crate) fn garbage_frame(step: u64) -> (&'static str, Vec<u8>) {
    match step % 3 {
        0 => ("unmasked", [&[0x80 | OP_TEXT, 5][..], b"hello"].concat()),
        1 => {
            let mut f = encode_client_frame(true, OP_TEXT, br#"{"type":"ping"}"#, mask());
            f[0] |= 0x70;
            ("reserved-bits", f)
        }
        _ => (
            "oversize",
            partial_frame(4 * MAX_MESSAGE_BYTES, b"{\"type\"", mask()),
        ),
    }
}

/// The `type` of a server message without parsing it: herald writes events as
/// `{"type":"event",...` and every other message with its keys sorted (`"type"` last).
pub(crate) fn message_type(payload: &[u8]) -> &'static str {
    const TYPES: [(&str, &[u8]); 5] = [
        ("event", br#""type":"event""#),
        ("response", br#""type":"response""#),
        ("error", br#""type":"error""#),
        ("connected", br#""type":"connected""#),
        ("pong", br#""type":"pong""#),
    ];
    let head = &payload[..payload.len().min(48)];
    let tail = &payload[payload.len().saturating_sub(48)..];
    TYPES
        .iter()
        .find(|(_, pat)| memmem::find(head, pat).is_some() || memmem::find(tail, pat).is_some())
        .map_or("other", |(name, _)| name)
}

/// A channel name that needs no escaping in a URL query or JSON: letters, digits and `-_.:`.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// The HTTP status of a response head, once the status line is complete.
fn status_of(buf: &[u8]) -> Option<u16> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(_) => resp.code,
        Err(_) => None,
    }
}

fn close_code(payload: &[u8]) -> String {
    match payload {
        [a, b, ..] => u16::from_be_bytes([*a, *b]).to_string(),
        _ => "none".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state

#[derive(Default)]
struct Stats {
    handshakes: u64,
    upgrades: u64,
    statuses: BTreeMap<String, u64>,
    close_codes: BTreeMap<String, u64>,
    closed_by_server: u64,
    closed_before_response: u64,
    reconnects: u64,
    bytes_sent: u64,
    bytes_received: u64,
    messages_sent: u64,
    received: BTreeMap<String, u64>,
    server_errors: BTreeMap<String, u64>,
    pongs: u64,
    errors: Reasons,
    open: u64,
    max_open: u64,
    in_place: u64,
    garbage_sent: BTreeMap<String, u64>,
}

struct Ctx {
    args: AttackArgs,
    target: Target,
    sources: Vec<Ipv4Addr>,
    stats: RefCell<Stats>,
    /// Upgraded connections the handshake flood may still hold.
    max_held: u64,
    /// The big subscribe, as text.
    big_subscribe: String,
    start_unix_ms: u64,
}

impl Ctx {
    fn with<R>(&self, f: impl FnOnce(&mut Stats) -> R) -> R {
        f(&mut self.stats.borrow_mut())
    }

    fn error(&self, reason: impl Into<String>) {
        self.with(|s| bump(&mut s.errors, reason.into()));
    }

    fn opened(&self) {
        self.with(|s| {
            s.upgrades += 1;
            s.open += 1;
            s.max_open = s.max_open.max(s.open);
        });
    }

    fn source(&self, slot: usize) -> Option<Ipv4Addr> {
        match self.args.kind {
            Kind::HandshakeFlood => self.sources.first().copied(),
            _ if self.sources.is_empty() => None,
            _ => Some(self.sources[slot % self.sources.len()]),
        }
    }
}

/// An upgraded connection (or one being upgraded) and the bytes read but not yet consumed.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Counted in `open` (upgraded and not yet closed).
    open: bool,
    /// The stream ended with a reset rather than a FIN.
    reset: bool,
}

/// How an attempt ended, and what the slot does next.
enum Next {
    /// Reconnect now.
    Again,
    /// Reconnect after this pause.
    After(Duration),
    /// The slot is done (stopped, or its kind does not reconnect).
    Done,
}

/// What one server frame was.
enum Got {
    Text(&'static str),
    Pong,
    Other,
    /// A close frame (its code recorded) or the end of the stream.
    Closed,
}

impl Conn {
    async fn send(&mut self, ctx: &Ctx, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| explain("write", &e, None))?;
        ctx.with(|s| s.bytes_sent += bytes.len() as u64);
        Ok(())
    }

    /// Reads more bytes into `buf`; `Ok(false)` at the end of the stream (a FIN or a reset by
    /// the server). Cancel-safe.
    async fn fill(&mut self, ctx: &Ctx) -> Result<bool, String> {
        let mut chunk = [0u8; CHUNK];
        let n = match self.stream.read(&mut chunk).await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                self.reset = true;
                0
            }
            Err(e) => return Err(explain("read", &e, None)),
        };
        self.buf.extend_from_slice(&chunk[..n]);
        ctx.with(|s| s.bytes_received += n as u64);
        Ok(n > 0)
    }

    /// Sends the upgrade request and reads the answer; leaves what follows the head in `buf`.
    /// `Ok(None)`: upgraded. `Ok(Some(next))`: refused or dropped, counted.
    async fn upgrade(&mut self, ctx: &Ctx, request: &[u8]) -> Result<Option<Next>, String> {
        if let Err(e) = self.send(ctx, request).await {
            // The server may have answered (429 at accept) and closed before reading it.
            return match self.await_upgrade(ctx).await {
                Ok(Some(next)) if !self.buf.is_empty() => Ok(Some(next)),
                _ => Err(e),
            };
        }
        self.await_upgrade(ctx).await
    }

    async fn await_upgrade(&mut self, ctx: &Ctx) -> Result<Option<Next>, String> {
        loop {
            match parse_response(&self.buf, &ctx.target.accept) {
                Response::Upgraded(head) => {
                    self.buf.drain(..head);
                    ctx.with(|s| bump(&mut s.statuses, "101".into()));
                    ctx.opened();
                    self.open = true;
                    return Ok(None);
                }
                Response::Refused(reason) => return Ok(Some(self.refused(ctx, &reason))),
                Response::Incomplete => {}
            }
            if !self.fill(ctx).await? {
                if self.buf.is_empty() {
                    ctx.with(|s| {
                        s.closed_by_server += 1;
                        s.closed_before_response += 1;
                    });
                    return Ok(Some(Next::Again));
                }
                let reason = refusal_at_eof(&self.buf);
                return Ok(Some(self.refused(ctx, &reason)));
            }
        }
    }

    fn refused(&mut self, ctx: &Ctx, reason: &str) -> Next {
        match status_of(&self.buf) {
            Some(code) => {
                ctx.with(|s| bump(&mut s.statuses, code.to_string()));
                if code == 429 && ctx.args.kind != Kind::HandshakeFlood {
                    Next::After(ctx.args.backoff_429)
                } else {
                    Next::Again
                }
            }
            None => {
                ctx.error(reason);
                Next::After(ERROR_BACKOFF)
            }
        }
    }

    /// The next whole server frame. Cancel-safe (bytes read stay in `buf`).
    async fn frame(&mut self, ctx: &Ctx) -> Result<Option<(u8, Vec<u8>)>, String> {
        loop {
            if let Some(f) = parse_server_frame(&self.buf)? {
                let end = f.header_len + f.payload_len;
                if self.buf.len() >= end {
                    let payload = self.buf[f.header_len..end].to_vec();
                    self.buf.drain(..end);
                    return Ok(Some((f.opcode, payload)));
                }
            }
            if !self.fill(ctx).await? {
                return Ok(None);
            }
        }
    }

    /// Reads one frame and deals with it: answers pings, records close codes, message types
    /// and error codes.
    async fn next(&mut self, ctx: &Ctx) -> Result<Got, String> {
        let Some((opcode, payload)) = self.frame(ctx).await? else {
            self.server_closed(ctx, None);
            return Ok(Got::Closed);
        };
        Ok(match opcode {
            OP_CLOSE => {
                self.server_closed(ctx, Some(close_code(&payload)));
                Got::Closed
            }
            OP_PING => {
                let pong = encode_client_frame(true, OP_PONG, &payload, mask());
                self.send(ctx, &pong).await?;
                Got::Other
            }
            OP_PONG => {
                ctx.with(|s| s.pongs += 1);
                Got::Pong
            }
            OP_TEXT => {
                let t = message_type(&payload);
                let code = (t == "error")
                    .then(|| serde_json::from_slice::<Value>(&payload).ok())
                    .flatten()
                    .map(|v| v["data"]["code"].to_string());
                ctx.with(|s| {
                    bump(&mut s.received, t.into());
                    if let Some(code) = code {
                        bump(&mut s.server_errors, code);
                    }
                });
                Got::Text(t)
            }
            _ => Got::Other,
        })
    }

    fn server_closed(&mut self, ctx: &Ctx, code: Option<String>) {
        ctx.with(|s| {
            s.closed_by_server += 1;
            let end = if self.reset { "reset" } else { "eof" };
            bump(&mut s.close_codes, code.unwrap_or_else(|| end.into()));
        });
        self.close_count(ctx);
    }

    fn close_count(&mut self, ctx: &Ctx) {
        if std::mem::take(&mut self.open) {
            ctx.with(|s| s.open -= 1);
        }
    }

    /// Waits for `connected`, answering pings on the way. `Ok(false)`: closed before it.
    async fn connected(&mut self, ctx: &Ctx) -> Result<bool, String> {
        let wait = async {
            loop {
                match self.next(ctx).await? {
                    Got::Text("connected") => return Ok(true),
                    Got::Closed => return Ok(false),
                    _ => {}
                }
            }
        };
        timeout(ctx.args.io_timeout, wait)
            .await
            .unwrap_or_else(|_| Err("no `connected` within --io-timeout".into()))
    }

    /// Ends the connection with a reset (no TIME_WAIT left on either side).
    fn reset(mut self, ctx: &Ctx) {
        let _ = SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
        self.close_count(ctx);
    }
}

/// A TCP connection from `source`, optionally with a small receive buffer set before the
/// connect (so the window the server sees is small from the first byte).
async fn tcp_connect(
    ctx: &Ctx,
    source: Option<Ipv4Addr>,
    rcvbuf: Option<usize>,
) -> Result<Conn, String> {
    ctx.with(|s| s.handshakes += 1);
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| explain("socket", &e, None))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| explain("socket", &e, None))?;
    if let Some(n) = rcvbuf {
        socket
            .set_recv_buffer_size(n)
            .map_err(|e| explain("SO_RCVBUF", &e, None))?;
    }
    if let Some(ip) = source {
        socket
            .bind(&SocketAddr::new(IpAddr::V4(ip), 0).into())
            .map_err(|e| explain("bind", &e, source))?;
    }
    let socket = TcpSocket::from_std_stream(socket.into());
    let stream = timeout(ctx.args.io_timeout, socket.connect(ctx.target.addr))
        .await
        .map_err(|_| "connect: timed out".to_owned())?
        .map_err(|e| explain("connect", &e, source))?;
    let _ = stream.set_nodelay(true);
    Ok(Conn {
        stream,
        buf: Vec::new(),
        open: false,
        reset: false,
    })
}

// ---------------------------------------------------------------------------------------------
// The kinds

/// One attempt of a slot: connect, attack, until the server closes or the attack is stopped
/// (the caller drops the future then).
async fn attempt(ctx: &Ctx, slot: usize, round: u64, placed: &mut bool) -> Result<Next, String> {
    let kind = ctx.args.kind;
    let rcvbuf = (kind == Kind::NonReader).then_some(ctx.args.rcvbuf);
    let mut conn = tcp_connect(ctx, ctx.source(slot), rcvbuf).await?;
    let mut place = || {
        if !std::mem::replace(placed, true) {
            ctx.with(|s| s.in_place += 1);
        }
    };
    if kind == Kind::SlowHandshake {
        place();
        return slow_handshake(ctx, conn).await;
    }
    let request = match kind {
        Kind::ResumeFlood => resume_request(ctx)?,
        Kind::NonReader => ctx.target.requests[1].clone(),
        _ => ctx.target.requests[0].clone(),
    };
    let upgraded = timeout(ctx.args.io_timeout, conn.upgrade(ctx, &request)).await;
    match upgraded {
        Err(_) => return Err("upgrade: no answer within --io-timeout".into()),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Some(next))) => {
            place();
            return Ok(next);
        }
        Ok(Ok(None)) => {}
    }
    if kind == Kind::HandshakeFlood {
        place();
        // Held until the end; nothing is read from it.
        HELD.with(|h| h.borrow_mut().push(conn));
        return Ok(Next::Again);
    }
    if !conn.connected(ctx).await? {
        place();
        return Ok(Next::Again);
    }
    let next = match kind {
        Kind::BigSubscribe => big_subscribe(ctx, &mut conn, &mut place).await,
        Kind::PartialFrame => {
            place();
            partial(ctx, &mut conn).await
        }
        Kind::ResumeFlood => {
            place();
            resume(ctx, &mut conn).await
        }
        Kind::PingFlood => {
            place();
            ping_flood(ctx, &mut conn).await
        }
        Kind::NonReader => {
            place();
            // Never read again: the caller waits for the end, then drains.
            NON_READERS.with(|h| h.borrow_mut().push(conn));
            return Ok(Next::Done);
        }
        Kind::Garbage => {
            place();
            garbage(ctx, &mut conn, round + slot as u64).await
        }
        Kind::SlowHandshake | Kind::HandshakeFlood => unreachable!("handled above"),
    };
    if kind == Kind::ResumeFlood {
        conn.reset(ctx);
    } else {
        conn.close_count(ctx);
    }
    next
}

thread_local! {
    /// Upgraded handshake-flood connections, held until the end (one runtime thread).
    static HELD: RefCell<Vec<Conn>> = const { RefCell::new(Vec::new()) };
    /// Non-reader connections, left alone until the end.
    static NON_READERS: RefCell<Vec<Conn>> = const { RefCell::new(Vec::new()) };
}

async fn big_subscribe(
    ctx: &Ctx,
    conn: &mut Conn,
    place: &mut impl FnMut(),
) -> Result<Next, String> {
    let per = ctx.args.window.mul_f64(1.02) / ctx.args.messages_per_window.max(1);
    let mut tick = tokio::time::interval(per);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let text = ctx.big_subscribe.as_bytes();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                conn.send(ctx, &encode_client_frame(true, OP_TEXT, text, mask())).await?;
                ctx.with(|s| s.messages_sent += 1);
            }
            got = conn.next(ctx) => match got? {
                Got::Closed => return Ok(Next::Again),
                Got::Text("response" | "error") => place(),
                _ => {}
            },
        }
    }
}

async fn partial(ctx: &Ctx, conn: &mut Conn) -> Result<Next, String> {
    let key = mask();
    let start = br#"{"type":"ping","#;
    conn.send(ctx, &partial_frame(MAX_MESSAGE_BYTES, start, key))
        .await?;
    ctx.with(|s| s.messages_sent += 1);
    let mut offset = start.len();
    let mut tick = tokio::time::interval(ctx.args.byte_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick(), if offset < MAX_MESSAGE_BYTES => {
                conn.send(ctx, &[b' ' ^ key[offset % 4]]).await?;
                offset += 1;
            }
            got = conn.next(ctx) => if let Got::Closed = got? {
                return Ok(Next::Again);
            },
        }
    }
}

async fn slow_handshake(ctx: &Ctx, mut conn: Conn) -> Result<Next, String> {
    let request = ctx.target.requests[0].clone();
    let mut sent = 0;
    let mut tick = tokio::time::interval(ctx.args.byte_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick(), if sent < request.len() => {
                conn.send(ctx, &request[sent..=sent]).await?;
                sent += 1;
            }
            more = conn.fill(ctx) => {
                if more? && matches!(parse_response(&conn.buf, &ctx.target.accept), Response::Incomplete) {
                    continue;
                }
                // An answer (or the end) before the request was complete.
                let next = conn.await_upgrade(ctx).await?;
                if next.is_none() {
                    // Upgraded after all: hold it until herald closes it.
                    while !matches!(conn.next(ctx).await?, Got::Closed) {}
                }
                return Ok(next.unwrap_or(Next::Again));
            }
        }
    }
}

fn resume_request(ctx: &Ctx) -> Result<Vec<u8>, String> {
    let id = ctx.args.last_event_id.clone().unwrap_or_else(|| {
        let lag = u64::try_from(ctx.args.resume_lag.as_millis()).unwrap_or(u64::MAX);
        let ms = (unix_us() / 1000)
            .saturating_sub(lag)
            .max(ctx.start_unix_ms);
        format!("{ms}-0")
    });
    let sep = if ctx.target.url.contains('?') {
        '&'
    } else {
        '?'
    };
    let url = format!("{}{sep}lastEventId={id}", ctx.target.url);
    let t = Target::with_channels(&url, std::slice::from_ref(&ctx.args.channel))
        .map_err(|e| e.to_string())?;
    // The process's key: the accept value checked is the one of `ctx.target`.
    Ok(rekey(&t.requests[0], &ctx.target.requests[0]))
}

async fn resume(ctx: &Ctx, conn: &mut Conn) -> Result<Next, String> {
    let until = Instant::now() + ctx.args.resume_wait;
    let read = async {
        loop {
            if let Got::Closed = conn.next(ctx).await? {
                return Ok::<_, String>(true);
            }
        }
    };
    match timeout_at(until, read).await {
        Ok(Ok(_)) | Err(_) => Ok(Next::Again),
        Ok(Err(e)) => Err(e),
    }
}

async fn ping_flood(ctx: &Ctx, conn: &mut Conn) -> Result<Next, String> {
    let payload = vec![b'p'; ctx.args.ping_payload.min(MAX_CONTROL_PAYLOAD)];
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / ctx.args.rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                conn.send(ctx, &encode_client_frame(true, OP_PING, &payload, mask())).await?;
                ctx.with(|s| s.messages_sent += 1);
            }
            got = conn.next(ctx) => if let Got::Closed = got? {
                return Ok(Next::Again);
            },
        }
    }
}

async fn garbage(ctx: &Ctx, conn: &mut Conn, step: u64) -> Result<Next, String> {
    let (name, frame) = garbage_frame(step);
    conn.send(ctx, &frame).await?;
    ctx.with(|s| {
        s.messages_sent += 1;
        bump(&mut s.garbage_sent, name.into());
    });
    let read = async {
        loop {
            if let Got::Closed = conn.next(ctx).await? {
                return Ok::<_, String>(());
            }
        }
    };
    match timeout(ctx.args.io_timeout, read).await {
        Ok(Ok(())) => Ok(Next::Again),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            ctx.error(format!("{name} frame: still open after --io-timeout"));
            Ok(Next::Again)
        }
    }
}

/// A slot: attempts until stopped (the caller drops this future at the end).
async fn slot(ctx: Rc<Ctx>, slot: usize, start_at: Instant) {
    sleep_until(start_at).await;
    let mut placed = false;
    for round in 0u64.. {
        if round > 0 {
            ctx.with(|s| s.reconnects += 1);
        }
        if ctx.args.kind == Kind::HandshakeFlood
            && HELD.with(|h| h.borrow().len() as u64) >= ctx.max_held
        {
            // Every descriptor this process may spend is held: nothing more to try.
            return;
        }
        let next = match attempt(&ctx, slot, round, &mut placed).await {
            Ok(next) => next,
            Err(e) => {
                if !placed {
                    placed = true;
                    ctx.with(|s| s.in_place += 1);
                }
                // A local failure (no socket, no port, refused) waits a little; the flood
                // retries anything else at once.
                let local = ["socket", "bind", "connect", "SO_RCVBUF"]
                    .iter()
                    .any(|op| e.starts_with(op));
                ctx.error(e);
                if local || ctx.args.kind != Kind::HandshakeFlood {
                    Next::After(ERROR_BACKOFF)
                } else {
                    Next::Again
                }
            }
        };
        match next {
            Next::Again => tokio::task::yield_now().await,
            Next::After(d) => sleep(d).await,
            Next::Done => return,
        }
    }
}

/// Reads what the server queued for each non-reader until it closes or `until`; counts the
/// ones it closed.
async fn drain_non_readers(ctx: &Ctx, until: Instant) -> u64 {
    let conns = NON_READERS.with(|h| std::mem::take(&mut *h.borrow_mut()));
    let mut still_open = 0;
    let drains = conns.into_iter().map(|mut conn| async move {
        let read = async {
            loop {
                match conn.next(ctx).await {
                    Ok(Got::Closed) => return true,
                    Ok(_) => {}
                    Err(e) => {
                        ctx.error(format!("non-reader drain: {e}"));
                        return false;
                    }
                }
            }
        };
        let closed = timeout_at(until, read).await.unwrap_or(false);
        conn.close_count(ctx);
        closed
    });
    for closed in futures_util::future::join_all(drains).await {
        still_open += u64::from(!closed);
    }
    still_open
}

pub(crate) fn run(args: AttackArgs) -> anyhow::Result<AttackSummary> {
    ensure!(args.connections > 0, "--connections must be at least 1");
    ensure!(args.connect_rate > 0.0, "--connect-rate must be positive");
    ensure!(args.rate > 0.0, "--rate must be positive");
    ensure!(
        !args.byte_interval.is_zero(),
        "--byte-interval must be positive"
    );
    ensure!(
        plain_name(&args.channel),
        "--channel {:?} is not a valid channel name",
        args.channel
    );
    let target = Target::with_channels(&args.target, &[])?;
    ensure!(!target.tcp, "attack needs a ws:// target");
    let with_channel = Target::with_channels(&args.target, std::slice::from_ref(&args.channel))?;
    let target = Target {
        requests: vec![
            target.requests[0].clone(),
            // The same key: one accept value for both.
            rekey(&with_channel.requests[0], &target.requests[0]),
        ],
        ..target
    };
    let sources = match &args.source_ips {
        Some(spec) => parse_source_ips(spec)?,
        None => Vec::new(),
    };
    check_source_ips(&sources)?;
    let capacity = fd_capacity()?;
    ensure!(
        args.connections + FD_RESERVE <= capacity,
        "--connections {} is more than this process may open ({capacity})",
        args.connections
    );
    let max_held = (capacity - args.connections - FD_RESERVE) as u64;
    let stop_signal = stop_flag()?;
    let victim = (!args.without_channel).then_some(args.channel.as_str());
    let big_subscribe = if args.kind == Kind::BigSubscribe {
        big_subscribe_message(MAX_SUBSCRIPTIONS, MAX_CHANNELS, victim)
    } else {
        String::new()
    };
    ensure!(
        big_subscribe.len() < MAX_MESSAGE_BYTES,
        "the subscribe message is {} bytes (--channel too long?)",
        big_subscribe.len()
    );
    let ctx = Rc::new(Ctx {
        args,
        target,
        sources,
        stats: RefCell::default(),
        max_held,
        big_subscribe,
        start_unix_ms: unix_us() / 1000,
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, drive(ctx, stop_signal))
}

/// The same request with `key`'s `Sec-WebSocket-Key` line.
fn rekey(request: &[u8], key_from: &[u8]) -> Vec<u8> {
    let line = |r: &[u8]| {
        String::from_utf8_lossy(r)
            .lines()
            .find(|l| l.starts_with("Sec-WebSocket-Key:"))
            .map(str::to_owned)
    };
    match (line(request), line(key_from)) {
        (Some(a), Some(b)) => String::from_utf8_lossy(request)
            .replace(&a, &b)
            .into_bytes(),
        _ => request.to_vec(),
    }
}

async fn drive(
    ctx: Rc<Ctx>,
    stop_signal: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<AttackSummary> {
    let epoch = Instant::now();
    let deadline = epoch + ctx.args.duration;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(ctx.args.connections);
    for i in 0..ctx.args.connections {
        let start_at = epoch + Duration::from_secs_f64(i as f64 / ctx.args.connect_rate);
        let (ctx, mut stop) = (ctx.clone(), stop_rx.clone());
        tasks.push(tokio::task::spawn_local(async move {
            tokio::select! {
                () = slot(ctx, i, start_at) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        }));
    }
    let mut ready_after = None;
    let mut interrupted = false;
    let mut next_status = epoch + Duration::from_secs(1);
    loop {
        let now = Instant::now();
        if stop_signal.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        if now >= deadline {
            break;
        }
        let placed = ctx.with(|s| s.in_place) >= ctx.args.connections as u64;
        if ready_after.is_none() && (placed || now >= epoch + ctx.args.ready_timeout) {
            let after = now.duration_since(epoch).as_secs_f64();
            ready_after = Some(after);
            if !placed {
                eprintln!(
                    "herald-bench attack: only {} of {} connections in place after {:?}; the attack runs anyway",
                    ctx.with(|s| s.in_place),
                    ctx.args.connections,
                    ctx.args.ready_timeout
                );
            }
            if let Some(path) = &ctx.args.ready_file {
                write_ready(path, &ctx, after)?;
            }
        }
        if now >= next_status {
            next_status += Duration::from_secs(1);
            eprintln!(
                "herald-bench attack: {}",
                status_line(&ctx, now.duration_since(epoch))
            );
        }
        sleep(Duration::from_millis(50)).await;
    }
    let stopped_at = Instant::now();
    // Counted before the slots are dropped (a dropped attempt does not uncount its connection).
    let open_at_end = ctx.with(|s| s.open);
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    drop(HELD.with(|h| std::mem::take(&mut *h.borrow_mut())));
    let still_open = if ctx.args.kind == Kind::NonReader {
        Some(drain_non_readers(&ctx, Instant::now() + ctx.args.drain_time).await)
    } else {
        None
    };
    let s = ctx.stats.take();
    Ok(AttackSummary {
        kind: ctx.args.kind.name().into(),
        target: ctx.target.url.clone(),
        connections: ctx.args.connections,
        duration_s: stopped_at.duration_since(epoch).as_secs_f64(),
        interrupted,
        ready_after_s: ready_after,
        in_place: s.in_place,
        handshakes_attempted: s.handshakes,
        upgrades: s.upgrades,
        http_statuses: s.statuses,
        close_codes: s.close_codes,
        closed_by_server: s.closed_by_server,
        closed_before_response: s.closed_before_response,
        reconnects: s.reconnects,
        open_at_end,
        max_open: s.max_open,
        still_open_after_drain: still_open,
        bytes_sent: s.bytes_sent,
        bytes_received: s.bytes_received,
        messages_sent: s.messages_sent,
        messages_received: s.received,
        server_error_codes: s.server_errors,
        pongs: s.pongs,
        garbage_sent: s.garbage_sent,
        errors: s.errors,
        settings: settings(&ctx),
    })
}

fn status_line(ctx: &Ctx, t: Duration) -> String {
    ctx.with(|s| {
        format!(
            "[{:>5.1}s] {} in place {}/{}, open {}, handshakes {}, upgrades {}, closed by server {}, statuses {:?}",
            t.as_secs_f64(),
            ctx.args.kind.name(),
            s.in_place,
            ctx.args.connections,
            s.open,
            s.handshakes,
            s.upgrades,
            s.closed_by_server,
            s.statuses
        )
    })
}

fn write_ready(path: &PathBuf, ctx: &Ctx, after: f64) -> anyhow::Result<()> {
    let body = json!({
        "kind": ctx.args.kind.name(),
        "in_place": ctx.with(|s| s.in_place),
        "connections": ctx.args.connections,
        "after_s": after,
    });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{body}\n"))
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn settings(ctx: &Ctx) -> BTreeMap<String, String> {
    let a = &ctx.args;
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_owned(), v);
    };
    put("source_ips", a.source_ips.clone().unwrap_or_default());
    put("channel", a.channel.clone());
    put("connect_rate", a.connect_rate.to_string());
    match a.kind {
        Kind::BigSubscribe => {
            put("message_bytes", ctx.big_subscribe.len().to_string());
            put(
                "messages_per_window",
                format!("{} per {:?}", a.messages_per_window, a.window),
            );
            put("victim_channel_included", (!a.without_channel).to_string());
        }
        Kind::PartialFrame | Kind::SlowHandshake => {
            put("byte_interval", format!("{:?}", a.byte_interval));
        }
        Kind::ResumeFlood => {
            put("resume_wait", format!("{:?}", a.resume_wait));
            put(
                "last_event_id",
                a.last_event_id
                    .clone()
                    .unwrap_or_else(|| format!("now - {:?}", a.resume_lag)),
            );
        }
        Kind::PingFlood => {
            put("rate_per_connection", a.rate.to_string());
            put(
                "ping_payload",
                a.ping_payload.min(MAX_CONTROL_PAYLOAD).to_string(),
            );
        }
        Kind::NonReader => put("rcvbuf", a.rcvbuf.to_string()),
        Kind::HandshakeFlood => put("max_held", ctx.max_held.to_string()),
        Kind::Garbage => {}
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_big_subscribe_is_the_largest_herald_takes() {
        let msg = big_subscribe_message(MAX_SUBSCRIPTIONS, MAX_CHANNELS, Some("bench"));
        assert!(msg.len() < MAX_MESSAGE_BYTES, "{} bytes", msg.len());
        let v: Value = serde_json::from_str(&msg).unwrap();
        let rows = v["data"].as_array().unwrap();
        assert!(rows.len() > MAX_SUBSCRIPTIONS, "{}", rows.len());
        let mut all = std::collections::HashSet::new();
        for row in rows {
            let channels = row["channels"].as_array().unwrap();
            assert_eq!(channels.len(), MAX_CHANNELS);
            assert_eq!(channels.last().unwrap(), "bench");
            for c in channels {
                let c = c.as_str().unwrap();
                assert!(herald::event::is_valid_name(c), "{c:?}");
                all.insert(c.to_owned());
            }
        }
        assert_eq!(all.len(), MAX_SUBSCRIPTIONS * (MAX_CHANNELS - 1) + 1);
        // herald's own parser takes it whole.
        let intern = &mut herald::registry::Registry::default();
        let guest = std::sync::Arc::new(herald::identity::Identity::guest());
        let mut session = herald::protocol::Session::new("p".into(), guest, &[], intern);
        let limits = herald::protocol::SessionLimits::default();
        let jwt = herald::identity::JwtVerifier::none();
        let reply = session.handle_text(
            &msg,
            &limits,
            herald::protocol::Verifiers {
                jwt: &jwt,
                sessions: false,
            },
            intern,
            &herald::protocol::UrlId::new(1, 1),
        );
        assert!(reply.subscriptions_changed, "{:?}", reply.frame);
        assert_eq!(session.channels().len(), all.len());
        // Without the victim channel: every one of the 1,000 channels is distinct.
        let msg = big_subscribe_message(MAX_SUBSCRIPTIONS, MAX_CHANNELS, None);
        assert!(msg.len() < MAX_MESSAGE_BYTES, "{} bytes", msg.len());
        assert!(!msg.contains("bench"));
    }

    #[test]
    fn partial_and_garbage_frames() {
        let f = partial_frame(64_000, b"abc", [0, 0, 0, 0]);
        assert_eq!(&f[..4], &[0x81, 0xFE, 0xFA, 0x00]);
        assert_eq!(&f[8..], b"abc");
        let f = partial_frame(256_000, b"", [1, 2, 3, 4]);
        assert_eq!(f[1], 0x80 | 127);
        assert_eq!(u64::from_be_bytes(f[2..10].try_into().unwrap()), 256_000);
        assert_eq!(f.len(), 14);
        let names: Vec<&str> = (0..3).map(|i| garbage_frame(i).0).collect();
        assert_eq!(names, ["unmasked", "reserved-bits", "oversize"]);
        assert_eq!(garbage_frame(0).1[1] & 0x80, 0, "no mask bit");
        assert_eq!(garbage_frame(1).1[0] & 0x70, 0x70);
    }

    #[test]
    fn message_types_without_parsing() {
        assert_eq!(message_type(br#"{"type":"event","data":{}}"#), "event");
        assert_eq!(
            message_type(
                br#"{"data":{"code":1013,"message":"Too many messages."},"type":"error"}"#
            ),
            "error"
        );
        let long = format!(
            r#"{{"data":{{"x":"{}"}},"type":"response"}}"#,
            "y".repeat(5000)
        );
        assert_eq!(message_type(long.as_bytes()), "response");
        assert_eq!(message_type(b"{}"), "other");
        assert_eq!(close_code(&[0x03, 0xF0]), "1008");
        assert_eq!(close_code(&[]), "none");
        assert_eq!(status_of(b"HTTP/1.1 429 Too Many Requests\r\n"), Some(429));
        assert_eq!(status_of(b"HTTP/1.1 4"), None);
    }

    #[test]
    fn rekeying_keeps_one_accept_value() {
        let a = b"GET /a HTTP/1.1\r\nSec-WebSocket-Key: AAA\r\n\r\n";
        let b = b"GET /b HTTP/1.1\r\nSec-WebSocket-Key: BBB\r\n\r\n";
        assert_eq!(
            rekey(a, b),
            b"GET /a HTTP/1.1\r\nSec-WebSocket-Key: BBB\r\n\r\n".to_vec()
        );
    }
}
