//! `herald-bench`: a lean load generator for herald.
//!
//! Owns client-side load. `idle` opens many realtime WebSocket connections at a controlled rate
//! (spread over many source addresses, so loopback runs do not exhaust ephemeral ports), waits
//! for each one's `connected` message, answers the server's pings, holds the connections, and
//! reports: progress once a second on stderr, a JSON summary on stdout.
//!
//! It must stay cheap per connection, so one process can hold ~19,000 connections while herald's
//! own memory is measured: one mio event loop, one slab entry (under 100 bytes) per connection and
//! one shared read buffer. A connection owns heap memory only while a server frame or one of its
//! own writes is split. Client frames are built with herald's codec ([`encode_client_frame`],
//! masked); server frames are unmasked, which herald's server-side header parser refuses, so
//! their few header bytes are parsed here. It must not know herald's internals beyond that codec
//! and [`herald::limits`]: anything that speaks the Appwrite Realtime protocol can be loaded.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream as StdTcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde_json::{Value, json};
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};

use herald::ws::decoder::encode_client_frame;
use herald::ws::frame::{close_payload, parse_close_payload};

/// Shared read buffer: one per process, never per connection.
const SCRATCH_BYTES: usize = 64 * 1024;
/// Largest upgrade response head accepted.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Largest server frame buffered; bigger ones end the connection as a protocol error.
const MAX_FRAME: usize = 16 << 20;
/// Distinct failure reasons kept in the summary; the rest are counted under `other`.
const MAX_REASONS: usize = 32;
/// Characters of an HTTP refusal body quoted in a failure reason.
const MAX_BODY_QUOTE: usize = 300;
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How long the start-up probe waits for the target.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Linux's errno for a non-blocking connect under way (std has no stable `ErrorKind` for it).
const EINPROGRESS: i32 = 115;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

#[derive(Parser)]
#[command(
    name = "herald-bench",
    version,
    about = "Load generator for herald (WebSocket, Appwrite Realtime protocol)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open idle subscribed connections, answer pings, hold them, print a JSON summary.
    ///
    /// Exit status: 0 when every connection opened, 1 when some failed, 2 on a setup error.
    Idle(IdleArgs),
}

#[derive(clap::Args)]
struct IdleArgs {
    /// WebSocket URL, e.g. ws://127.0.0.1:9505/v1/realtime?project=p&channels[]=files
    #[arg(long)]
    target: String,
    /// Connections to open (one process holds at most its open-file limit minus 64).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// New connections started per second.
    #[arg(long, default_value_t = 5000)]
    rate: u32,
    /// Upgrades in flight at once (connect to `connected`).
    #[arg(long, default_value_t = 1000)]
    max_inflight: usize,
    /// How long to hold the connections once every one of them opened or failed.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Time from connect to the `connected` message before a connection counts as failed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// Local IPv4 addresses to bind, round robin: ranges and lists, e.g.
    /// 127.0.0.2-127.0.0.60 or 127.0.0.2,127.0.0.3. Default: the kernel's choice.
    #[arg(long)]
    source_ips: Option<String>,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Idle(args) => match idle(&args) {
            Ok(summary) => {
                println!("{summary}");
                let all_open = summary["connected"] == summary["requested"];
                ExitCode::from(if all_open { 0 } else { 1 })
            }
            Err(e) => {
                eprintln!("herald-bench: error: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}

/// Where to connect and what to send there.
#[derive(Debug)]
struct Target {
    url: String,
    addr: SocketAddr,
    /// The upgrade request, the same bytes for every connection.
    request: Vec<u8>,
    /// The `Sec-WebSocket-Accept` value the server must answer with.
    accept: String,
}

impl Target {
    fn parse(url: &str) -> anyhow::Result<Self> {
        if url.starts_with("wss://") {
            bail!("{url}: TLS (wss://) is not supported; point herald-bench at a ws:// listener");
        }
        let Some(rest) = url.strip_prefix("ws://") else {
            bail!("{url}: the target must be a ws:// URL");
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        ensure!(!authority.is_empty(), "{url}: no host");
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .with_context(|| format!("{url}: cannot resolve {with_port}"))?
            .find(SocketAddr::is_ipv4)
            .with_context(|| format!("{url}: {with_port} has no IPv4 address"))?;
        // One key per process: herald needs nothing per connection from it, and the answer is
        // still checked on every connection.
        let key = tungstenite::handshake::client::generate_key();
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nUser-Agent: herald-bench\r\n\r\n"
        )
        .into_bytes();
        Ok(Self {
            url: url.to_owned(),
            addr,
            request,
            accept,
        })
    }
}

/// Parses `127.0.0.2-127.0.0.60,127.0.1.1` into a list of addresses.
fn parse_source_ips(spec: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        let first: Ipv4Addr = first
            .trim()
            .parse()
            .with_context(|| format!("--source-ips: {first:?} is not an IPv4 address"))?;
        let last: Ipv4Addr = last
            .trim()
            .parse()
            .with_context(|| format!("--source-ips: {last:?} is not an IPv4 address"))?;
        let (a, b) = (u32::from(first), u32::from(last));
        ensure!(a <= b, "--source-ips: range {part} runs backwards");
        ensure!(b - a < 65_536, "--source-ips: range {part} is too large");
        out.extend((a..=b).map(Ipv4Addr::from));
    }
    ensure!(!out.is_empty(), "--source-ips: no address given");
    Ok(out)
}

/// Resident memory of this process, from /proc (0 where unavailable).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Makes sure this process may open `connections` sockets, or says how to split the load.
fn check_fd_limit(connections: usize) -> anyhow::Result<()> {
    let limit = herald::limits::raise_nofile().context("cannot read or raise RLIMIT_NOFILE")?;
    let capacity = usize::try_from(limit.capacity()).unwrap_or(usize::MAX);
    if connections > capacity {
        let processes = connections.div_ceil(capacity.max(1));
        bail!(
            "--connections {connections} needs more file descriptors than this process may open: \
             the open-file limit is {} (hard limit {}), so one herald-bench process holds at most \
             {capacity} connections. Split the load into {processes} or more herald-bench \
             processes of at most {capacity} connections each (give each its own --source-ips \
             range), or raise the hard limit",
            limit.soft,
            limit.hard
        );
    }
    Ok(())
}

/// Checks every source address can be bound, so a typo fails before the load starts.
fn check_source_ips(ips: &[Ipv4Addr]) -> anyhow::Result<()> {
    for ip in ips {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        s.bind(&SocketAddr::new(IpAddr::V4(*ip), 0).into())
            .with_context(|| {
                format!(
                    "source address {ip} cannot be bound (on loopback any 127.x.y.z works; other \
                 addresses must be configured on an interface)"
                )
            })?;
    }
    Ok(())
}

/// One blocking upgrade before the load starts, so an unreachable target or a refused upgrade
/// is reported plainly instead of as thousands of identical failures.
fn probe(target: &Target, source: Option<Ipv4Addr>) -> anyhow::Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    if let Some(ip) = source {
        socket.bind(&SocketAddr::new(IpAddr::V4(ip), 0).into())?;
    }
    socket
        .connect_timeout(&target.addr.into(), PROBE_TIMEOUT)
        .with_context(|| {
            format!(
                "cannot reach {} ({}): is the server running?",
                target.url, target.addr
            )
        })?;
    let mut stream: StdTcpStream = socket.into();
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    stream
        .write_all(&target.request)
        .with_context(|| format!("cannot send the upgrade request to {}", target.addr))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match parse_response(&buf, &target.accept) {
            Response::Upgraded(_) => return Ok(()),
            Response::Refused(reason) => {
                bail!("{} refused the WebSocket upgrade: {reason}", target.url)
            }
            Response::Incomplete => {}
        }
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                bail!(
                    "{} did not answer the upgrade request within {PROBE_TIMEOUT:?}",
                    target.url
                )
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading the upgrade response from {}", target.url));
            }
        };
        if n == 0 {
            let reason = refusal_at_eof(&buf);
            bail!("{} refused the WebSocket upgrade: {reason}", target.url);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The server's answer to the upgrade request, as far as it has arrived.
#[derive(Debug, PartialEq, Eq)]
enum Response {
    Incomplete,
    /// 101 with the right accept key; the head is this many bytes long.
    Upgraded(usize),
    /// Anything else, with a reason naming the HTTP status and quoting the body.
    Refused(String),
}

fn header<'a>(headers: &'a [httparse::Header<'_>], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

fn refusal(code: u16, reason: &str, body: &[u8]) -> String {
    let body = String::from_utf8_lossy(body);
    let body = body.trim();
    let quoted: String = body.chars().take(MAX_BODY_QUOTE).collect();
    let cut = if quoted.len() < body.len() { "..." } else { "" };
    format!("HTTP {code} {reason}: {quoted}{cut}")
}

fn parse_response(buf: &[u8], accept: &str) -> Response {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
            return Response::Refused(format!("response head over {MAX_RESPONSE_HEAD} bytes"));
        }
        Ok(httparse::Status::Partial) => return Response::Incomplete,
        Err(e) => return Response::Refused(format!("invalid HTTP response: {e}")),
    };
    let code = resp.code.unwrap_or(0);
    if code == 101 {
        return match header(resp.headers, "sec-websocket-accept") {
            Some(v) if v == accept.as_bytes() => Response::Upgraded(head_len),
            _ => Response::Refused("HTTP 101 without the expected Sec-WebSocket-Accept".into()),
        };
    }
    let length = header(resp.headers, "content-length")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(len) if buf.len() >= head_len + len => Response::Refused(refusal(
            code,
            resp.reason.unwrap_or(""),
            &buf[head_len..head_len + len],
        )),
        // The body is still coming (or ends at EOF without a length).
        _ => Response::Incomplete,
    }
}

/// Why a connection closed during the upgrade: the refusal it got, if a head arrived.
fn refusal_at_eof(buf: &[u8]) -> String {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            refusal(resp.code.unwrap_or(0), resp.reason.unwrap_or(""), &buf[n..])
        }
        _ if buf.is_empty() => "connection closed before any response".into(),
        _ => "connection closed in the middle of the response head".into(),
    }
}

/// The header of an unmasked server-to-client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ServerFrame {
    fin: bool,
    opcode: u8,
    header_len: usize,
    payload_len: usize,
}

/// Parses a server frame header from the start of `buf`; `Ok(None)` until it is complete.
fn parse_server_frame(buf: &[u8]) -> Result<Option<ServerFrame>, String> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err("server frame with reserved bits set".into());
    }
    if b1 & 0x80 != 0 {
        return Err("masked server frame".into());
    }
    let (len, header_len) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                (u64::from_be_bytes(a), 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let payload_len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or_else(|| {
            format!("server frame of {len} bytes (herald-bench buffers at most {MAX_FRAME})")
        })?;
    Ok(Some(ServerFrame {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0F,
        header_len,
        payload_len,
    }))
}

/// Where a connection is in its life; everything before `Open` counts as in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Upgrading,
    AwaitConnected,
    Open,
}

impl Phase {
    fn waiting_for(self) -> &'static str {
        match self {
            Self::Connecting => "the TCP connection",
            Self::Upgrading => "the upgrade response",
            Self::AwaitConnected => "the connected message",
            Self::Open => "nothing",
        }
    }
}

/// One client connection: the whole per-connection cost of herald-bench.
struct Conn {
    stream: TcpStream,
    phase: Phase,
    /// Microseconds since the run's start when the connect began.
    started_us: u64,
    /// Bytes of a response head or frame that has not fully arrived; empty (no heap) when idle.
    inbuf: Vec<u8>,
    /// Bytes the socket would not take yet; empty (no heap) when idle.
    unsent: Vec<u8>,
}

/// How handling a connection's input ended.
enum Step {
    Continue,
    /// The connection never opened (or broke the protocol); the reason goes in the summary.
    Fail(String),
    /// The server sent a close frame (code, if any).
    ServerClosed(Option<u16>),
}

#[derive(Default)]
struct Stats {
    opened: usize,
    inflight: usize,
    open: usize,
    connected: usize,
    failed: usize,
    failures: BTreeMap<String, u64>,
    latencies_us: Vec<u32>,
    pings_answered: u64,
    messages: u64,
    /// Open connections the server ended, by how: `close 1001`, `eof`, `io: ...`.
    lost: BTreeMap<String, u64>,
}

fn bump(map: &mut BTreeMap<String, u64>, key: String) {
    let key = if map.len() >= MAX_REASONS && !map.contains_key(&key) {
        "other".to_owned()
    } else {
        key
    };
    *map.entry(key).or_default() += 1;
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
    fn on_bytes(&mut self, data: &[u8], accept: &str, now_us: u64, stats: &mut Stats) -> Step {
        if self.inbuf.is_empty() {
            let (used, step) = self.consume(data, accept, now_us, stats);
            if matches!(step, Step::Continue) && used < data.len() {
                self.inbuf.extend_from_slice(&data[used..]);
            }
            return step;
        }
        let mut buf = std::mem::take(&mut self.inbuf);
        buf.extend_from_slice(data);
        let (used, step) = self.consume(&buf, accept, now_us, stats);
        if matches!(step, Step::Continue) && used < buf.len() {
            buf.drain(..used);
            self.inbuf = buf;
        }
        step
    }

    /// Consumes every complete response head and frame at the start of `buf`.
    fn consume(
        &mut self,
        buf: &[u8],
        accept: &str,
        now_us: u64,
        stats: &mut Stats,
    ) -> (usize, Step) {
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
                Phase::Upgrading => match parse_response(rest, accept) {
                    Response::Incomplete => return (pos, Step::Continue),
                    Response::Refused(reason) => return (pos, Step::Fail(reason)),
                    Response::Upgraded(len) => {
                        pos += len;
                        self.phase = Phase::AwaitConnected;
                    }
                },
                Phase::AwaitConnected | Phase::Open => {
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
                    let step = self.on_frame(frame, payload, now_us, stats);
                    if !matches!(step, Step::Continue) {
                        return (pos, step);
                    }
                }
            }
        }
    }

    fn on_frame(
        &mut self,
        frame: ServerFrame,
        payload: &[u8],
        now_us: u64,
        stats: &mut Stats,
    ) -> Step {
        let io_fail = |e: io::Error| Step::Fail(format!("write: {e}"));
        match frame.opcode {
            OP_PING => {
                let pong = encode_client_frame(true, OP_PONG, payload, mask());
                if let Err(e) = self.send(&pong) {
                    return io_fail(e);
                }
                stats.pings_answered += 1;
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
                match first_message(payload) {
                    Ok(()) => {
                        self.phase = Phase::Open;
                        stats.inflight -= 1;
                        stats.open += 1;
                        stats.connected += 1;
                        let us = now_us.saturating_sub(self.started_us);
                        stats
                            .latencies_us
                            .push(u32::try_from(us).unwrap_or(u32::MAX));
                        Step::Continue
                    }
                    Err(reason) => Step::Fail(reason),
                }
            }
            OP_TEXT | OP_BINARY | OP_CONTINUATION if self.phase == Phase::AwaitConnected => {
                Step::Fail("the first message was not a single text frame".into())
            }
            OP_TEXT | OP_BINARY | OP_CONTINUATION => {
                if frame.fin {
                    stats.messages += 1;
                }
                Step::Continue
            }
            other => Step::Fail(format!("protocol error: unknown opcode {other:#x}")),
        }
    }
}

/// Checks the first message is `connected`; otherwise says what came instead.
fn first_message(payload: &[u8]) -> Result<(), String> {
    let v: Value = serde_json::from_slice(payload).map_err(|_| {
        let text = String::from_utf8_lossy(payload);
        format!(
            "first message is not JSON: {}",
            text.chars().take(MAX_BODY_QUOTE).collect::<String>()
        )
    })?;
    match v.get("type").and_then(Value::as_str) {
        Some("connected") => Ok(()),
        Some("error") => Err(format!("error instead of connected: {}", v["data"])),
        other => Err(format!(
            "first message has type {other:?}, not \"connected\""
        )),
    }
}

fn mask() -> [u8; 4] {
    rand::random::<u32>().to_ne_bytes()
}

/// Writes as much of `bytes` as the socket takes now.
fn write_some(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < bytes.len() {
        match stream.write(&bytes[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// Starts a non-blocking connect from `source` (if any).
fn start_connect(addr: SocketAddr, source: Option<Ipv4Addr>) -> Result<TcpStream, String> {
    let socket = Socket::new(
        Domain::IPV4,
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(ip) = source {
        socket
            .bind(&SocketAddr::new(IpAddr::V4(ip), 0).into())
            .map_err(|e| format!("bind: {e}"))?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        // EINPROGRESS: the usual answer of a non-blocking connect.
        Err(e)
            if e.raw_os_error() == Some(EINPROGRESS) || e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(format!("connect: {e}")),
    }
    // Pongs are tiny and must not wait for Nagle.
    let _ = socket.set_tcp_nodelay(true);
    Ok(TcpStream::from_std(socket.into()))
}

/// Whether a non-blocking connect finished: `Ok(false)` while it is still in progress.
fn connect_done(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

/// The `idle` run: the event loop and its connections.
struct Engine {
    poll: Poll,
    conns: Slab<Conn>,
    scratch: Box<[u8]>,
    target: Target,
    sources: Vec<Ipv4Addr>,
    next_source: usize,
    stats: Stats,
    epoch: Instant,
}

impl Engine {
    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn open_one(&mut self) {
        self.stats.opened += 1;
        let started_us = self.now_us();
        let source = (!self.sources.is_empty()).then(|| {
            let ip = self.sources[self.next_source % self.sources.len()];
            self.next_source += 1;
            ip
        });
        let mut stream = match start_connect(self.target.addr, source) {
            Ok(s) => s,
            Err(reason) => {
                self.stats.failed += 1;
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
            bump(&mut self.stats.failures, format!("epoll register: {e}"));
            return;
        }
        entry.insert(Conn {
            stream,
            phase: Phase::Connecting,
            started_us,
            inbuf: Vec::new(),
            unsent: Vec::new(),
        });
        self.stats.inflight += 1;
    }

    /// Drops connection `k` and books why.
    fn finish(&mut self, k: usize, step: Step) {
        let Some(mut c) = self.conns.try_remove(k) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.stream);
        let opened = c.phase == Phase::Open;
        if opened {
            self.stats.open -= 1;
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

    fn on_event(&mut self, k: usize, ev: &mio::event::Event) {
        let Some(c) = self.conns.get_mut(k) else {
            return;
        };
        if c.phase == Phase::Connecting {
            match connect_done(&c.stream) {
                Ok(false) => return,
                Ok(true) => {
                    c.phase = Phase::Upgrading;
                    if let Err(e) = c.send(&self.target.request) {
                        return self.finish(k, Step::Fail(format!("write: {e}")));
                    }
                }
                Err(e) => return self.finish(k, Step::Fail(format!("connect: {e}"))),
            }
        } else if ev.is_writable()
            && let Err(e) = c.flush()
        {
            return self.finish(k, Step::Fail(format!("write: {e}")));
        }
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            self.read(k);
        }
    }

    /// Reads until the socket would block (epoll is edge-triggered).
    fn read(&mut self, k: usize) {
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
                    let step = c.on_bytes(
                        &self.scratch[..n],
                        &self.target.accept,
                        now_us,
                        &mut self.stats,
                    );
                    if !matches!(step, Step::Continue) {
                        return self.finish(k, step);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.finish(k, Step::Fail(format!("read: {e}"))),
            }
        }
    }

    /// Fails connections that have been in flight for longer than `timeout`.
    fn expire(&mut self, timeout: Duration) {
        if self.stats.inflight == 0 {
            return;
        }
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

    fn progress(&self, requested: usize) {
        let s = &self.stats;
        eprintln!(
            "herald-bench: {:6.1}s started {}/{requested} open {} in-flight {} failed {} lost {} pings {} rss {:.1} MiB",
            self.epoch.elapsed().as_secs_f64(),
            s.opened,
            s.open,
            s.inflight,
            s.failed,
            s.lost.values().sum::<u64>(),
            s.pings_answered,
            rss_bytes() as f64 / (1 << 20) as f64,
        );
    }
}

fn percentile_ms(sorted_us: &[u32], p: f64) -> Option<f64> {
    if sorted_us.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted_us.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted_us.len()) - 1;
    Some(f64::from(sorted_us[i]) / 1000.0)
}

fn idle(args: &IdleArgs) -> anyhow::Result<Value> {
    ensure!(args.connections > 0, "--connections must be at least 1");
    ensure!(args.rate > 0, "--rate must be at least 1");
    ensure!(args.max_inflight > 0, "--max-inflight must be at least 1");
    let target = Target::parse(&args.target)?;
    let sources = match &args.source_ips {
        Some(spec) => parse_source_ips(spec)?,
        None => Vec::new(),
    };
    check_fd_limit(args.connections)?;
    check_source_ips(&sources)?;
    probe(&target, sources.first().copied())?;

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())
            .context("cannot install a signal handler")?;
    }

    let mut engine = Engine {
        poll: Poll::new().context("cannot create an epoll instance")?,
        conns: Slab::with_capacity(args.connections),
        scratch: vec![0u8; SCRATCH_BYTES].into_boxed_slice(),
        target,
        sources,
        next_source: 0,
        stats: Stats {
            latencies_us: Vec::with_capacity(args.connections),
            ..Stats::default()
        },
        epoch: Instant::now(),
    };
    let rss_before = rss_bytes();
    let mut events = Events::with_capacity(1024);
    let mut next_progress = engine.epoch + PROGRESS_EVERY;
    let mut settled: Option<(Instant, u64)> = None;
    let mut interrupted = false;
    loop {
        if stop.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        let now = Instant::now();
        match settled {
            None => {
                let elapsed = now.duration_since(engine.epoch).as_secs_f64();
                let due = ((elapsed * f64::from(args.rate)) as usize + 1).min(args.connections);
                while engine.stats.opened < due && engine.stats.inflight < args.max_inflight {
                    engine.open_one();
                }
                if engine.stats.opened == args.connections && engine.stats.inflight == 0 {
                    let rss = rss_bytes();
                    settled = Some((now, rss));
                    eprintln!(
                        "herald-bench: settled: {} open, {} failed after {:.1}s; rss {:.1} MiB; holding for {:?}",
                        engine.stats.open,
                        engine.stats.failed,
                        elapsed,
                        rss as f64 / (1 << 20) as f64,
                        args.hold
                    );
                }
            }
            Some((at, _)) if now >= at + args.hold => break,
            Some(_) => {}
        }
        let wake_at = match settled {
            None if engine.stats.opened < args.connections => now + Duration::from_millis(5),
            None => next_progress,
            Some((at, _)) => next_progress.min(at + args.hold),
        };
        let timeout = wake_at.saturating_duration_since(now);
        if let Err(e) = engine.poll.poll(&mut events, Some(timeout)) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("epoll_wait failed");
        }
        for ev in events.iter() {
            engine.on_event(ev.token().0, ev);
        }
        if Instant::now() >= next_progress {
            next_progress += PROGRESS_EVERY;
            engine.expire(args.handshake_timeout);
            engine.progress(args.connections);
        }
    }

    let rss_end = rss_bytes();
    let elapsed = engine.epoch.elapsed();
    let stats = &mut engine.stats;
    stats.latencies_us.sort_unstable();
    let l = &stats.latencies_us;
    let (settled_after, rss_settled) = settled.map_or((None, None), |(at, rss)| {
        (
            Some(at.duration_since(engine.epoch).as_secs_f64()),
            Some(rss),
        )
    });
    let per_conn = rss_settled
        .filter(|_| stats.connected > 0)
        .map(|rss| rss.saturating_sub(rss_before) as f64 / stats.connected as f64);
    Ok(json!({
        "target": engine.target.url,
        "requested": args.connections,
        "connected": stats.connected,
        "open_at_end": stats.open,
        "failed": {"total": stats.failed, "reasons": stats.failures},
        "lost_after_open": stats.lost,
        "handshake_latency_ms": {
            "p50": percentile_ms(l, 50.0),
            "p90": percentile_ms(l, 90.0),
            "p99": percentile_ms(l, 99.0),
            "max": percentile_ms(l, 100.0),
        },
        "settled_after_s": settled_after,
        "pings_answered": stats.pings_answered,
        "messages_received": stats.messages,
        "interrupted": interrupted,
        "duration_s": elapsed.as_secs_f64(),
        "rss_bytes": {
            "before_connecting": rss_before,
            "settled": rss_settled,
            "end": rss_end,
            "per_connection": per_conn,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t =
            Target::parse("ws://127.0.0.1:9505/v1/realtime?project=p&channels[]=files").unwrap();
        assert_eq!(t.addr, "127.0.0.1:9505".parse().unwrap());
        let req = String::from_utf8(t.request).unwrap();
        assert!(req.starts_with(
            "GET /v1/realtime?project=p&channels[]=files HTTP/1.1\r\nHost: 127.0.0.1:9505\r\n"
        ));
        let t = Target::parse("ws://127.0.0.1?project=p").unwrap();
        assert_eq!(t.addr.port(), 80);
        assert!(
            String::from_utf8(t.request)
                .unwrap()
                .starts_with("GET /?project=p HTTP/1.1")
        );
        assert!(
            Target::parse("wss://x/")
                .unwrap_err()
                .to_string()
                .contains("TLS")
        );
        assert!(Target::parse("http://x/").is_err());
    }

    #[test]
    fn parses_source_ranges() {
        let ips = parse_source_ips("127.0.0.2-127.0.0.4, 127.0.1.1").unwrap();
        assert_eq!(ips.len(), 4);
        assert_eq!(ips[3], Ipv4Addr::new(127, 0, 1, 1));
        assert!(parse_source_ips("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_source_ips("nope").is_err());
    }

    #[test]
    fn upgrade_responses() {
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: abc\r\n\r\n\x81\x00";
        assert_eq!(parse_response(ok, "abc"), Response::Upgraded(ok.len() - 2));
        assert!(matches!(parse_response(ok, "xyz"), Response::Refused(_)));
        assert_eq!(parse_response(&ok[..20], "abc"), Response::Incomplete);
        let refused = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\n{\"x\":404}";
        assert_eq!(
            parse_response(refused, "abc"),
            Response::Refused("HTTP 404 Not Found: {\"x\":404}".into())
        );
        assert_eq!(
            parse_response(&refused[..refused.len() - 1], "abc"),
            Response::Incomplete
        );
        assert_eq!(
            refusal_at_eof(b"HTTP/1.1 503 Busy\r\n\r\ntry later"),
            "HTTP 503 Busy: try later"
        );
    }

    #[test]
    fn server_frames() {
        assert_eq!(parse_server_frame(&[0x89]), Ok(None));
        let f = parse_server_frame(&[0x89, 0x00]).unwrap().unwrap();
        assert_eq!(
            (f.opcode, f.fin, f.header_len, f.payload_len),
            (OP_PING, true, 2, 0)
        );
        let f = parse_server_frame(&[0x81, 126, 1, 0]).unwrap().unwrap();
        assert_eq!((f.header_len, f.payload_len), (4, 256));
        assert_eq!(parse_server_frame(&[0x81, 127, 0, 0]), Ok(None));
        assert!(parse_server_frame(&[0x81, 0x85]).is_err(), "masked");
        assert!(parse_server_frame(&[0xC1, 0x00]).is_err(), "reserved bits");
    }

    #[test]
    fn first_message_must_be_connected() {
        assert!(first_message(br#"{"type":"connected","data":{}}"#).is_ok());
        let e = first_message(br#"{"type":"error","data":{"code":1008}}"#).unwrap_err();
        assert!(e.contains("1008"));
        assert!(first_message(b"nope").is_err());
    }

    #[test]
    fn conn_state_is_small() {
        // The per-connection promise of this tool: far below 2 KiB including the slab entry.
        assert!(
            std::mem::size_of::<Conn>() <= 80,
            "{}",
            std::mem::size_of::<Conn>()
        );
    }
}
