//! `herald-bench`: a lean load generator and benchmark driver for herald (and for anything else
//! that speaks the Appwrite Realtime protocol).
//!
//! Subcommands:
//! - `idle`: one process opens N connections at a controlled rate, answers pings, holds them and
//!   prints a JSON summary (used by `benches/idle_memory.sh`).
//! - `fanout`: the full benchmark. Subscribers in worker processes (split automatically by the
//!   open-file limit), a publisher in this process (HTTP `POST /v1/events` with keep-alive, or
//!   Redis `XADD`), and phases: fixed rates, a search for the highest lossless rate, bursts,
//!   single events (time to the last subscriber), churn, settle and close. Every event's payload
//!   carries `"hb":"PHASE.INDEX.CHANNEL.SEQ.SENT_US"`; every client checks its own sequence for
//!   gaps and duplicates and records end-to-end latency. JSON summary on stdout, an optional
//!   self-contained HTML report, a status line every second on stderr.
//! - `publish`: the publisher alone: M events at a rate.
//! - `connect`: the handshake rate ceiling (open, wait for `connected`, close, repeat), also
//!   against a plain TCP target (`tcp://`), for which `accept-loop` is the server.
//! - `compare`: merges result files of several servers into ratios, a summary line and one
//!   HTML report.
//!
//! Modules: [`client`] is the connection engine (one mio loop, under 100 bytes per idle
//! connection plus what the kernel holds); [`worker`] runs it under a coordinator's commands;
//! [`fanout`] is the coordinator; [`publish`] the publisher; [`connect`] the handshake-rate mode
//! and the TCP accept loop; [`report`] the merged results and the HTML report. It must not know
//! herald's internals beyond its client frame codec and [`herald::limits`].

// The phase summaries are large `json!` literals.
#![recursion_limit = "256"]

mod client;
mod connect;
mod fanout;
mod publish;
mod report;
mod worker;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream as StdTcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand};
use mio::net::TcpStream;
use serde_json::{Value, json};
use socket2::{Domain, Protocol, Socket, Type};

use client::{Engine, EngineOptions, Slot};

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

/// Linux errno values std has no stable `ErrorKind` for.
const EINPROGRESS: i32 = 115;
const EADDRINUSE: i32 = 98;
const EADDRNOTAVAIL: i32 = 99;
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

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
    about = "Load generator and benchmark driver for herald (WebSocket, Appwrite Realtime protocol)"
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
    /// Subscribers (in worker processes) plus a publisher: delivery, loss, latency, per phase.
    ///
    /// Exit status: 0 when every connection opened and no checked phase lost, duplicated or
    /// misrouted an event; 1 otherwise; 2 on a setup error.
    Fanout(Box<fanout::FanoutArgs>),
    /// Publish M events at a given rate (HTTP publish API or Redis XADD); JSON summary.
    Publish(publish::PublishArgs),
    /// Handshake rate ceiling: connect, wait for `connected` (or one byte for tcp://), close,
    /// repeat, for a bounded time.
    Connect(connect::ConnectArgs),
    /// A plain TCP accept loop (accept, write one byte, close): the baseline for `connect`.
    AcceptLoop(connect::AcceptLoopArgs),
    /// Merge result files (LABEL=FILE ...) of one scenario: ratios, one summary line, HTML.
    Compare(report::CompareArgs),
    /// Internal: one subscriber process under a `fanout` coordinator (commands on stdin).
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
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
    let result = match Cli::parse().command {
        Command::Idle(args) => idle(&args).map(|summary| {
            println!("{summary}");
            u8::from(summary["connected"] != summary["requested"])
        }),
        Command::Fanout(args) => fanout::run(&args),
        Command::Publish(args) => publish::run(&args),
        Command::Connect(args) => connect::run(&args),
        Command::AcceptLoop(args) => connect::accept_loop(&args),
        Command::Compare(args) => report::compare(&args),
        Command::Worker(args) => worker::run(&args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("herald-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Where to connect and what to send there.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    url: String,
    addr: SocketAddr,
    /// A plain TCP target (`tcp://`): done when the first byte arrives; nothing is sent.
    tcp: bool,
    /// The upgrade request per channel (one for a URL taken as is), the same bytes for every
    /// connection of that channel.
    requests: Vec<Vec<u8>>,
    /// The `Sec-WebSocket-Accept` value the server must answer with.
    accept: String,
}

impl Target {
    /// A target whose URL is used as is (its query names the channels, if any).
    fn parse(url: &str) -> anyhow::Result<Self> {
        Self::with_channels(url, &[])
    }

    /// A target with one upgrade request per channel: `channels[]=NAME` is appended to the URL's
    /// query for each name. No names: the URL as is.
    fn with_channels(url: &str, channels: &[String]) -> anyhow::Result<Self> {
        if let Some(rest) = url.strip_prefix("tcp://") {
            let addr = resolve(url, rest.trim_end_matches('/'))?;
            return Ok(Self {
                url: url.to_owned(),
                addr,
                tcp: true,
                requests: vec![Vec::new()],
                accept: String::new(),
            });
        }
        if url.starts_with("wss://") {
            bail!("{url}: TLS (wss://) is not supported; point herald-bench at a ws:// listener");
        }
        let Some(rest) = url.strip_prefix("ws://") else {
            bail!("{url}: the target must be a ws:// URL (or tcp://HOST:PORT for `connect`)");
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        ensure!(!authority.is_empty(), "{url}: no host");
        let addr = resolve(url, authority)?;
        // One key per process: servers need nothing per connection from it, and the answer is
        // still checked on every connection.
        let key = tungstenite::handshake::client::generate_key();
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let request = |path: &str| {
            format!(
                "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nUser-Agent: herald-bench\r\n\r\n"
            )
            .into_bytes()
        };
        let requests = if channels.is_empty() {
            vec![request(&path)]
        } else {
            let sep = if path.contains('?') { '&' } else { '?' };
            channels
                .iter()
                .map(|c| request(&format!("{path}{sep}channels[]={c}")))
                .collect()
        };
        Ok(Self {
            url: url.to_owned(),
            addr,
            tcp: false,
            requests,
            accept,
        })
    }
}

fn resolve(url: &str, authority: &str) -> anyhow::Result<SocketAddr> {
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    with_port
        .to_socket_addrs()
        .with_context(|| format!("{url}: cannot resolve {with_port}"))?
        .find(SocketAddr::is_ipv4)
        .with_context(|| format!("{url}: {with_port} has no IPv4 address"))
}

/// Parses `127.0.0.2-127.0.0.60,127.0.1.1` into a list of addresses.
pub(crate) fn parse_source_ips(spec: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
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
pub(crate) fn rss_bytes() -> u64 {
    proc_rss_bytes("self").unwrap_or(0)
}

/// `VmRSS` of a process (`"self"` or a PID), in bytes.
pub(crate) fn proc_rss_bytes(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// User plus system CPU seconds of a process and its waited-for children, from
/// `/proc/PID/stat` (Linux reports them in USER_HZ = 100 ticks per second on every platform).
pub(crate) fn proc_cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

pub(crate) fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Makes sure this process may open `connections` sockets, or says how to split the load.
fn check_fd_limit(connections: usize) -> anyhow::Result<()> {
    let capacity = fd_capacity()?;
    if connections > capacity {
        let processes = connections.div_ceil(capacity.max(1));
        bail!(
            "--connections {connections} needs more file descriptors than this process may open: \
             one herald-bench process holds at most {capacity} connections (its open-file hard \
             limit minus 64). Split the load into {processes} or more processes of at most \
             {capacity} connections each (`herald-bench fanout` does this by itself; for `idle`, \
             give each its own --source-ips range), or raise the hard limit (ulimit -Hn)"
        );
    }
    Ok(())
}

/// Connections this process can hold, after raising its soft open-file limit to the hard one.
pub(crate) fn fd_capacity() -> anyhow::Result<usize> {
    let limit = herald::limits::raise_nofile().context("cannot read or raise RLIMIT_NOFILE")?;
    Ok(usize::try_from(limit.capacity()).unwrap_or(usize::MAX))
}

/// Checks every source address can be bound, so a typo fails before the load starts.
pub(crate) fn check_source_ips(ips: &[Ipv4Addr]) -> anyhow::Result<()> {
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
pub(crate) fn probe(target: &Target, source: Option<Ipv4Addr>) -> anyhow::Result<()> {
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
        .write_all(&target.requests[0])
        .with_context(|| format!("cannot send the upgrade request to {}", target.addr))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if target.tcp && !buf.is_empty() {
            return Ok(());
        }
        if !target.tcp {
            match parse_response(&buf, &target.accept) {
                Response::Upgraded(_) => return Ok(()),
                Response::Refused(reason) => {
                    bail!("{} refused the WebSocket upgrade: {reason}", target.url)
                }
                Response::Incomplete => {}
            }
        }
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                bail!("{} did not answer within {PROBE_TIMEOUT:?}", target.url)
            }
            Err(e) => {
                return Err(e).with_context(|| format!("reading the answer of {}", target.url));
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

/// What a server text message is, as far as the client state machine cares.
#[derive(Debug, PartialEq, Eq)]
enum Message {
    Connected,
    /// `response` to a subscribe message.
    Subscribed,
    Error(String),
    Other(Option<String>),
}

/// Classifies a control message (not called for events, which are scanned without parsing).
fn classify(payload: &[u8]) -> Result<Message, String> {
    let v: Value = serde_json::from_slice(payload).map_err(|_| {
        let text = String::from_utf8_lossy(payload);
        format!(
            "message is not JSON: {}",
            text.chars().take(MAX_BODY_QUOTE).collect::<String>()
        )
    })?;
    Ok(match v.get("type").and_then(Value::as_str) {
        Some("connected") => Message::Connected,
        Some("response") if v["data"]["to"] == "subscribe" && v["data"]["success"] == true => {
            Message::Subscribed
        }
        Some("error") => Message::Error(v["data"].to_string()),
        other => Message::Other(other.map(str::to_owned)),
    })
}

/// Checks the first message is `connected`; otherwise says what came instead.
fn first_message(payload: &[u8]) -> Result<(), String> {
    match classify(payload).map_err(|e| format!("first {e}"))? {
        Message::Connected => Ok(()),
        Message::Error(data) => Err(format!("error instead of connected: {data}")),
        Message::Subscribed => Err("first message is a response, not \"connected\"".into()),
        Message::Other(t) => Err(format!("first message has type {t:?}, not \"connected\"")),
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

/// A socket error in words a user can act on.
fn explain(op: &str, e: &io::Error, source: Option<Ipv4Addr>) -> String {
    let from = source.map_or_else(String::new, |ip| format!(" from {ip}"));
    match e.raw_os_error() {
        Some(EADDRINUSE | EADDRNOTAVAIL) => format!(
            "{op}: local port exhaustion{from} ({e}): spread the load over more --source-ips \
             (127.0.0.2-127.0.0.60 gives ~1.6 million ports)"
        ),
        Some(EMFILE) => format!(
            "{op}: out of file descriptors ({e}): the process's open-file limit is too low for \
             this many connections"
        ),
        Some(ENFILE) => format!("{op}: the system-wide file table is full ({e})"),
        _ => format!("{op}: {e}"),
    }
}

/// Starts a non-blocking connect from `source` (if any).
fn start_connect(addr: SocketAddr, source: Option<Ipv4Addr>) -> Result<TcpStream, String> {
    let socket = Socket::new(
        Domain::IPV4,
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )
    .map_err(|e| explain("socket", &e, None))?;
    if let Some(ip) = source {
        socket
            .bind(&SocketAddr::new(IpAddr::V4(ip), 0).into())
            .map_err(|e| explain("bind", &e, source))?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        // EINPROGRESS: the usual answer of a non-blocking connect.
        Err(e)
            if e.raw_os_error() == Some(EINPROGRESS) || e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(explain("connect", &e, source)),
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

/// Installs SIGINT/SIGTERM handlers that set the returned flag.
pub(crate) fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())
            .context("cannot install a signal handler")?;
    }
    Ok(stop)
}

fn idle(args: &IdleArgs) -> anyhow::Result<Value> {
    ensure!(args.connections > 0, "--connections must be at least 1");
    ensure!(args.rate > 0, "--rate must be at least 1");
    ensure!(args.max_inflight > 0, "--max-inflight must be at least 1");
    let target = Target::parse(&args.target)?;
    ensure!(!target.tcp, "idle needs a ws:// target");
    let sources = match &args.source_ips {
        Some(spec) => parse_source_ips(spec)?,
        None => Vec::new(),
    };
    check_fd_limit(args.connections)?;
    check_source_ips(&sources)?;
    probe(&target, sources.first().copied())?;
    let stop = stop_flag()?;

    let url = target.url.clone();
    let slots = vec![Slot::default(); args.connections];
    let mut engine = Engine::new(
        vec![target],
        sources,
        slots,
        EngineOptions {
            rate: f64::from(args.rate),
            max_inflight: args.max_inflight,
            handshake_timeout: args.handshake_timeout,
            subscribe: None,
            track_events: false,
            close_on_open: false,
        },
    )?;
    engine.queue_all();
    let rss_before = rss_bytes();
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
                engine.start_due(now);
                if engine.settled() {
                    let rss = rss_bytes();
                    settled = Some((now, rss));
                    eprintln!(
                        "herald-bench: settled: {} open, {} failed after {:.1}s; rss {:.1} MiB; holding for {:?}",
                        engine.stats.open,
                        engine.stats.failed,
                        now.duration_since(engine.epoch).as_secs_f64(),
                        rss as f64 / (1 << 20) as f64,
                        args.hold
                    );
                }
            }
            Some((at, _)) if now >= at + args.hold => break,
            Some(_) => {}
        }
        let wake_at = match settled {
            None if engine.has_pending() => now + Duration::from_millis(5),
            None => next_progress,
            Some((at, _)) => next_progress.min(at + args.hold),
        };
        engine.poll(wake_at.saturating_duration_since(now))?;
        if Instant::now() >= next_progress {
            next_progress += PROGRESS_EVERY;
            engine.expire();
            eprintln!("herald-bench: {}", engine.status_line(args.connections));
        }
    }

    let rss_end = rss_bytes();
    let elapsed = engine.epoch.elapsed();
    let stats = &engine.stats;
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
        "target": url,
        "requested": args.connections,
        "connected": stats.connected,
        "open_at_end": stats.open,
        "failed": {"total": stats.failed, "reasons": stats.failures},
        "lost_after_open": stats.lost,
        "handshake_latency_ms": client::percentiles_ms(&stats.handshake_us),
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

/// Adds one to a reason's count, folding reasons beyond [`MAX_REASONS`] into `other`.
pub(crate) fn bump(map: &mut BTreeMap<String, u64>, key: String) {
    bump_n(map, key, 1);
}

pub(crate) fn bump_n(map: &mut BTreeMap<String, u64>, key: String, n: u64) {
    let key = if map.len() >= MAX_REASONS && !map.contains_key(&key) {
        "other".to_owned()
    } else {
        key
    };
    *map.entry(key).or_default() += n;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t =
            Target::parse("ws://127.0.0.1:9505/v1/realtime?project=p&channels[]=files").unwrap();
        assert_eq!(t.addr, "127.0.0.1:9505".parse().unwrap());
        let req = String::from_utf8(t.requests[0].clone()).unwrap();
        assert!(req.starts_with(
            "GET /v1/realtime?project=p&channels[]=files HTTP/1.1\r\nHost: 127.0.0.1:9505\r\n"
        ));
        let t = Target::parse("ws://127.0.0.1?project=p").unwrap();
        assert_eq!(t.addr.port(), 80);
        assert!(
            String::from_utf8(t.requests[0].clone())
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
        let t = Target::parse("tcp://127.0.0.1:7000").unwrap();
        assert!(t.tcp);
        let t = Target::with_channels(
            "ws://127.0.0.1:1/v1/realtime?project=p",
            &["a".into(), "b".into()],
        )
        .unwrap();
        assert_eq!(t.requests.len(), 2);
        assert!(
            String::from_utf8(t.requests[1].clone())
                .unwrap()
                .starts_with("GET /v1/realtime?project=p&channels[]=b HTTP/1.1")
        );
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
        assert_eq!(
            classify(br#"{"type":"response","data":{"to":"subscribe","success":true}}"#),
            Ok(Message::Subscribed)
        );
    }

    #[test]
    fn explains_socket_errors() {
        let e = io::Error::from_raw_os_error(EADDRNOTAVAIL);
        assert!(explain("connect", &e, None).contains("port exhaustion"));
        let e = io::Error::from_raw_os_error(EMFILE);
        assert!(explain("socket", &e, None).contains("file descriptors"));
    }

    #[test]
    fn reads_proc() {
        assert!(proc_rss_bytes("self").unwrap() > 0);
        assert!(proc_cpu_seconds("self").is_some());
    }
}
