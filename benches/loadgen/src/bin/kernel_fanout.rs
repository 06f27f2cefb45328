//! `kernel_fanout`: a benchmark baseline, the kernel's limit for WebSocket fan-out.
//!
//! Owns one thing: measuring what fan-out costs when the server does nothing but the system
//! calls (issue 4), so herald's numbers can be read as a ratio to it. It is never shipped. Per
//! shard thread (`--shards N`, each with its own SO_REUSEPORT listener and mio/epoll loop):
//!
//! - reads the upgrade request head (httparse), answers 101 with the right
//!   `Sec-WebSocket-Accept`, and in the same write a `connected` frame encoded once at start;
//! - discards everything a client sends afterwards (no frame parsing, no pings, no pongs) and
//!   closes the socket on EOF;
//! - on each publish writes ONE frame, encoded once by the admin thread (the event JSON with a
//!   fixed `subscriptions` list), with plain `write()` to every open connection. Publishes that
//!   queued up while the shard was busy are joined once (per shard, up to 256) and written with
//!   one `write()` per connection, as herald coalesces them into one `writev`; otherwise herald
//!   would beat its own ceiling under bursts. What a socket does not take is kept in that
//!   connection's buffer and flushed when it becomes writable, so every event is delivered;
//!   only a connection whose buffer passes `--max-outbound-bytes` is closed (counted and
//!   printed at exit).
//!
//! By default the URL's project and channels are not read: every connection gets the same
//! `connected` frame (channels from `--channel`, default `files`, and one subscription id minted
//! at start) and every event. With `--by-channel` (the ceiling of the many-channels scenario)
//! a connection is subscribed to its URL's `channels[]`, its `connected` frame lists them, and
//! it gets only the events of those channels: per wake, the frames each connection is owed are
//! written with one `writev`, straight from the shared pre-encoded frames (no copy, no
//! encoding), as herald writes a connection's share of a batch with one `writev`.
//!
//! The admin listener is a blocking thread per HTTP/1.1 connection (keep-alive): `POST
//! /v1/events` frames the event, hands it to every shard over a crossbeam channel and wakes the
//! shard (mio `Waker`), and replies `{"id":"<ms>-<seq>"}`; `GET /healthz`.
//! With `--redis URL` it also reads events from a Redis stream (`--stream`, entries as herald's
//! publish API writes them), like a herald node: many processes then share one event source, as
//! herald's fleet does in the million-connection benchmark.
//! SIGTERM/SIGINT: each shard sends close 1001 to every connection, waits up to 2 s for the
//! clients to hang up, and the process exits 0.
//!
//! The `connected` message and the event JSON come from herald's library (`Session`,
//! `EncodedEvent`, `write_tail`), so the bytes a client gets cannot drift from herald's.
//!
//! Run: `cargo build --release -p herald-loadgen && target/release/kernel_fanout --listen
//! 127.0.0.1:0 --admin 127.0.0.1:0 --shards 2`. A leading `serve` argument is accepted and
//! ignored, so scripts written for `herald serve` work unchanged.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener as StdTcpListener, TcpStream as StdTcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use crossbeam_channel::{Receiver, Sender};
use herald::event::{EncodedEvent, Event, EventIdGenerator, timestamp_now, write_tail};
use herald::protocol::{Session, mint_id};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use serde::Deserialize;
use serde_json::{Value, json};
use slab::Slab;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX);
/// Descriptors kept for listeners, epoll and the admin listener, as herald reports capacity.
const RESERVED_FDS: u64 = 64;
/// Largest upgrade request head; bigger ones get HTTP 431.
const MAX_HEAD: usize = 16 * 1024;
/// Largest publish request body.
const MAX_BODY: usize = 256 * 1024;
/// Publishes joined into one write per connection at most (herald takes 256 per wake).
const MAX_BATCH: usize = 256;
// `--by-channel` names a batch's frames by `u16` index.
const _: () = assert!(MAX_BATCH <= 1 << 16);
/// How long shutdown waits for clients to hang up after the close frame.
const DRAIN: Duration = Duration::from_secs(2);
/// An idle admin connection is dropped after this long.
const ADMIN_IDLE: Duration = Duration::from_secs(30);

#[derive(Parser)]
#[command(
    name = "kernel_fanout",
    about = "Benchmark baseline: the least work a WebSocket fan-out server can do (mio, one frame for all)"
)]
struct Cli {
    /// Address of the WebSocket listener (every shard binds it with SO_REUSEPORT).
    #[arg(long, default_value = "0.0.0.0:9505")]
    listen: SocketAddr,
    /// Address of the admin HTTP listener (publish API, health).
    #[arg(long, default_value = "127.0.0.1:9506")]
    admin: SocketAddr,
    /// Number of shards (event-loop threads). Default: one per CPU core.
    #[arg(long)]
    shards: Option<usize>,
    /// Channels listed in the `connected` frame every connection gets (repeat for several).
    #[arg(long = "channel", default_value = "files")]
    channels: Vec<String>,
    /// Unsent bytes one connection may hold before it is closed (and counted).
    #[arg(long, default_value_t = 64 << 20)]
    max_outbound_bytes: usize,
    /// Also deliver the entries of this Redis stream (from its end at start).
    #[arg(long)]
    redis: Option<String>,
    #[arg(long, default_value = "herald:events")]
    stream: String,
    /// Send each event only to the connections whose URL named one of its channels
    /// (`channels[]=`), one `writev` per connection per batch of the frames it is owed.
    #[arg(long)]
    by_channel: bool,
}

/// One event as a shard queues it: its pre-encoded frame and its channels.
type Published = (Arc<[u8]>, Arc<[String]>);

/// What the admin side and the signal handler send to a shard.
enum Command {
    /// One pre-encoded WebSocket frame for every connection (with `--by-channel`: for the
    /// connections subscribed to one of these channels).
    Frame(Arc<[u8]>, Arc<[String]>),
    Shutdown,
}

struct ShardHandle {
    tx: Sender<Command>,
    waker: Arc<Waker>,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    /// Event frames written or queued, summed over connections.
    frames_written: AtomicU64,
    /// write() calls that started a fan-out to one connection.
    writes: AtomicU64,
    /// Fan-outs (one per wake with publishes queued, or per MAX_BATCH of them).
    batches: AtomicU64,
    overflow_closed: AtomicU64,
    would_block: AtomicU64,
}

fn main() -> anyhow::Result<()> {
    // `kernel_fanout serve --listen ...` works like `herald serve --listen ...`.
    let args = std::env::args_os()
        .enumerate()
        .filter(|(i, a)| !(*i == 1 && a == "serve"))
        .map(|(_, a)| a);
    let cli = Cli::parse_from(args);
    let shards = cli
        .shards
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let soft = rlimit::Resource::NOFILE
        .get()
        .and_then(|(_, hard)| rlimit::increase_nofile_limit(hard))
        .unwrap_or(1024);

    // Bind everything before the startup line, so a client may connect as soon as it is printed.
    let first = herald::gateway::bind_reuseport(cli.listen)?;
    let listen = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..shards {
        listeners.push(herald::gateway::bind_reuseport(listen)?);
    }
    let admin = StdTcpListener::bind(cli.admin)?;
    let admin_addr = admin.local_addr()?;

    // herald's own `connected` message for a guest on these channels, so the two cannot differ.
    let session = Session::new(
        Arc::from("console"),
        Arc::new(herald::identity::Identity::guest()),
        &cli.channels,
        &mut herald::registry::Registry::default(),
    );
    let url_id = herald::protocol::UrlId::new(rand::random(), 0);
    let subscription = session
        .subscriptions(&url_id)
        .next()
        .map_or_else(mint_id, |s| s.id.into())
        .to_string();
    let connected = text_frame(session.connected_message(None, None, &url_id).as_bytes());
    let counters = Arc::new(Counters::default());
    let mut handles = Vec::new();
    let mut threads = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        handles.push(ShardHandle { tx, waker });
        let mut shard = Shard {
            poll,
            listener: TcpListener::from_std(listener),
            conns: Slab::new(),
            rx,
            connected: connected.clone(),
            max_outbound: cli.max_outbound_bytes,
            counters: counters.clone(),
            accept_paused: false,
            draining: None,
            index: cli.by_channel.then(|| ChannelIndex::new(url_id)),
        };
        threads.push(
            std::thread::Builder::new()
                .name(format!("shard-{i}"))
                .spawn(move || shard.run())?,
        );
    }
    let handles = Arc::new(handles);
    let publisher = Arc::new(Publisher {
        shards: handles.clone(),
        ids: Mutex::new(EventIdGenerator::default()),
        subscription,
    });
    if let Some(url) = cli.redis.clone() {
        let (stream, publisher) = (cli.stream.clone(), publisher.clone());
        std::thread::Builder::new()
            .name("redis".into())
            .spawn(move || {
                // Like a herald node: a lost connection is retried, from the last entry read.
                let mut last = None;
                loop {
                    if let Err(e) = redis_loop(&url, &stream, &publisher, &mut last) {
                        eprintln!("kernel_fanout: lost the Redis stream ({e:#}); retrying in 1 s");
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            })?;
    }
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || admin_loop(admin, publisher))?;

    // Before the startup line: a SIGTERM right after it must still stop the server cleanly.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    println!(
        "kernel_fanout listening on ws://{listen}/v1/realtime ({shards} shards, capacity {} connections, bus: channel); admin on http://{admin_addr}",
        soft.saturating_sub(RESERVED_FDS)
    );

    let _ = signals.forever().next();
    for h in handles.iter() {
        let _ = h.tx.send(Command::Shutdown);
        let _ = h.waker.wake();
    }
    let mut left = 0;
    for t in threads {
        left += t.join().unwrap_or(0);
    }
    eprintln!(
        "kernel_fanout: stopped; accepted {} connections, wrote {} event frames in {} fan-outs and {} writes ({} would block), closed {} over --max-outbound-bytes, {} still open at exit",
        counters.accepted.load(Ordering::Relaxed),
        counters.frames_written.load(Ordering::Relaxed),
        counters.batches.load(Ordering::Relaxed),
        counters.writes.load(Ordering::Relaxed),
        counters.would_block.load(Ordering::Relaxed),
        counters.overflow_closed.load(Ordering::Relaxed),
        left
    );
    Ok(())
}

/// A server-to-client frame (final, unmasked) with opcode `op`.
fn frame(op: u8, payload: &[u8]) -> Arc<[u8]> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(0x80 | op);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out.into()
}

fn text_frame(payload: &[u8]) -> Arc<[u8]> {
    frame(0x1, payload)
}

/// Close 1001 ("going away").
fn close_frame() -> Arc<[u8]> {
    frame(0x8, &1001u16.to_be_bytes())
}

// ---------------------------------------------------------------------------------------------
// Shards: the data plane.

enum Phase {
    /// Reading the upgrade request head (kept here until complete).
    Upgrading(Vec<u8>),
    Open,
    /// Close frame queued; the write side shuts once it is flushed.
    Closing,
}

struct Conn {
    stream: TcpStream,
    phase: Phase,
    /// Bytes the socket did not take yet; empty (no heap) while it keeps up.
    unsent: Vec<u8>,
    write_shut: bool,
    /// `--by-channel`: the URL's channels (empty otherwise).
    channels: Vec<String>,
}

/// `--by-channel`: each channel's connections, and what one batch owes each of them.
struct ChannelIndex {
    /// Names the URL subscription in `connected`, as the events' subscription id does.
    url_id: herald::protocol::UrlId,
    subscribers: HashMap<String, Vec<usize>>,
    /// Interns channel names for the `connected` messages, as a herald shard does.
    registry: herald::registry::Registry,
    /// Per connection key, the indices of the batch's frames it is owed (kept for reuse).
    owed: Vec<Vec<u16>>,
    /// Keys whose `owed` is not empty.
    touched: Vec<usize>,
}

impl ChannelIndex {
    fn new(url_id: herald::protocol::UrlId) -> Self {
        Self {
            url_id,
            subscribers: HashMap::new(),
            registry: herald::registry::Registry::default(),
            owed: Vec::new(),
            touched: Vec::new(),
        }
    }

    /// herald's `connected` message for a guest on `channels`, as a frame.
    fn connected_frame(&mut self, channels: &[String]) -> Arc<[u8]> {
        let session = Session::new(
            Arc::from("console"),
            Arc::new(herald::identity::Identity::guest()),
            channels,
            &mut self.registry,
        );
        text_frame(
            session
                .connected_message(None, None, &self.url_id)
                .as_bytes(),
        )
    }

    fn subscribe(&mut self, k: usize, channels: &[String]) {
        for c in channels {
            self.subscribers.entry(c.clone()).or_default().push(k);
        }
    }

    fn unsubscribe(&mut self, k: usize, channels: &[String]) {
        for c in channels {
            if let Some(keys) = self.subscribers.get_mut(c)
                && let Some(at) = keys.iter().position(|&x| x == k)
            {
                keys.swap_remove(at);
                if keys.is_empty() {
                    self.subscribers.remove(c);
                }
            }
        }
    }

    /// Fills `owed` and `touched` with who gets which of `batch`'s frames, each at most once.
    fn route(&mut self, batch: &[Published]) {
        for (i, (_, channels)) in batch.iter().enumerate() {
            let i = i as u16;
            for c in channels.iter() {
                let Some(keys) = self.subscribers.get(c) else {
                    continue;
                };
                for &k in keys {
                    if self.owed.len() <= k {
                        self.owed.resize_with(k + 1, Vec::new);
                    }
                    let owed = &mut self.owed[k];
                    if owed.last() == Some(&i) {
                        continue;
                    }
                    if owed.is_empty() {
                        self.touched.push(k);
                    }
                    owed.push(i);
                }
            }
        }
    }
}

/// What became of a connection after handling it.
enum Fate {
    Keep,
    Drop,
}

struct Shard {
    poll: Poll,
    listener: TcpListener,
    conns: Slab<Conn>,
    rx: Receiver<Command>,
    connected: Arc<[u8]>,
    max_outbound: usize,
    counters: Arc<Counters>,
    /// Accepting failed (most likely EMFILE): retry on a timer instead of the next edge.
    accept_paused: bool,
    /// Set once shutdown began: the deadline for clients to hang up.
    draining: Option<Instant>,
    /// `--by-channel`: events go to their channels' connections only.
    index: Option<ChannelIndex>,
}

impl Shard {
    /// Runs until shutdown has drained; returns the connections still open then.
    fn run(&mut self) -> usize {
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut self.listener, LISTENER, Interest::READABLE)
        {
            eprintln!("kernel_fanout: cannot register the listener: {e}");
            return 0;
        }
        let mut events = Events::with_capacity(1024);
        let mut scratch = vec![0u8; 64 * 1024];
        loop {
            let timeout = match self.draining {
                Some(deadline) => {
                    let now = Instant::now();
                    if self.conns.is_empty() || now >= deadline {
                        return self.conns.len();
                    }
                    Some(deadline - now)
                }
                None if self.accept_paused => Some(Duration::from_millis(10)),
                None => None,
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                eprintln!("kernel_fanout: poll: {e}");
                return self.conns.len();
            }
            if self.accept_paused && self.draining.is_none() {
                self.accept();
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => self.commands(),
                    Token(k) => {
                        let Some(conn) = self.conns.get_mut(k) else {
                            continue;
                        };
                        let mut fate = Fate::Keep;
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            fate = self.on_readable(k, &mut scratch);
                        } else if ev.is_writable() {
                            fate = flush(conn);
                        }
                        if matches!(fate, Fate::Keep)
                            && ev.is_writable()
                            && let Some(conn) = self.conns.get_mut(k)
                        {
                            fate = flush(conn);
                        }
                        if matches!(fate, Fate::Drop) {
                            self.close(k);
                        }
                    }
                }
            }
        }
    }

    fn accept(&mut self) {
        self.accept_paused = false;
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let entry = self.conns.vacant_entry();
                    let token = Token(entry.key());
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                        .is_err()
                    {
                        continue;
                    }
                    entry.insert(Conn {
                        stream,
                        phase: Phase::Upgrading(Vec::new()),
                        unsent: Vec::new(),
                        write_shut: false,
                        channels: Vec::new(),
                    });
                    self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(_) => {
                    self.accept_paused = true;
                    return;
                }
            }
        }
    }

    /// Takes every queued publish (up to [`MAX_BATCH`] at a time) and writes them together:
    /// one write per connection per wake, as herald coalesces queued events into one `writev`.
    /// A lone publish is written as is; several are joined once per shard, never per connection.
    fn commands(&mut self) {
        let mut batch: Vec<Published> = Vec::new();
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Command::Frame(frame, channels) => {
                    batch.push((frame, channels));
                    if batch.len() == MAX_BATCH {
                        self.fan_out_batch(&mut batch);
                    }
                }
                Command::Shutdown => {
                    self.fan_out_batch(&mut batch);
                    self.shutdown();
                }
            }
        }
        self.fan_out_batch(&mut batch);
    }

    fn fan_out_batch(&mut self, batch: &mut Vec<Published>) {
        match batch.len() {
            0 => {}
            _ if self.index.is_some() => self.fan_out_by_channel(batch),
            1 => self.fan_out(&batch[0].0, 1),
            n => {
                let mut joined = Vec::with_capacity(batch.iter().map(|(f, _)| f.len()).sum());
                for (f, _) in batch.iter() {
                    joined.extend_from_slice(f);
                }
                self.fan_out(&joined, n as u64);
            }
        }
        batch.clear();
    }

    /// `--by-channel`: each connection gets the frames of its channels' events, in order, with
    /// one `writev` of the shared frames.
    fn fan_out_by_channel(&mut self, batch: &[Published]) {
        let Some(index) = self.index.as_mut() else {
            return;
        };
        index.route(batch);
        // Ascending keys, the order a herald shard writes a batch in.
        index.touched.sort_unstable();
        let (mut delivered, mut writes, mut blocked) = (0u64, 0u64, 0u64);
        let mut dead = Vec::new();
        let mut frames: Vec<&[u8]> = Vec::with_capacity(MAX_BATCH);
        for &k in &index.touched {
            let owed = &mut index.owed[k];
            frames.clear();
            frames.extend(owed.iter().map(|&i| &*batch[usize::from(i)].0));
            owed.clear();
            let Some(conn) = self.conns.get_mut(k) else {
                continue;
            };
            if !matches!(conn.phase, Phase::Open) {
                continue;
            }
            match send_frames(conn, &frames, self.max_outbound) {
                Sent::All => writes += 1,
                Sent::Partly => {
                    writes += 1;
                    blocked += 1;
                }
                Sent::Behind => {}
                Sent::Dead => {
                    dead.push(k);
                    continue;
                }
            }
            delivered += frames.len() as u64;
        }
        index.touched.clear();
        self.count_fan_out(delivered, writes, blocked, dead);
    }

    /// The whole point: the same bytes (`frames` pre-encoded frames) to every open connection.
    fn fan_out(&mut self, bytes: &[u8], frames: u64) {
        let mut dead = Vec::new();
        let mut delivered = 0u64;
        let mut writes = 0u64;
        let mut blocked = 0u64;
        for (k, conn) in self.conns.iter_mut() {
            if !matches!(conn.phase, Phase::Open) {
                continue;
            }
            if !conn.unsent.is_empty() {
                conn.unsent.extend_from_slice(bytes);
                if conn.unsent.len() > self.max_outbound {
                    dead.push(k);
                } else {
                    delivered += frames;
                }
                continue;
            }
            writes += 1;
            match write_some(&mut conn.stream, bytes) {
                Ok(n) if n == bytes.len() => delivered += frames,
                Ok(n) => {
                    blocked += 1;
                    delivered += frames;
                    conn.unsent.extend_from_slice(&bytes[n..]);
                }
                Err(_) => dead.push(k),
            }
        }
        self.count_fan_out(delivered, writes, blocked, dead);
    }

    fn count_fan_out(&mut self, delivered: u64, writes: u64, blocked: u64, dead: Vec<usize>) {
        let c = Arc::clone(&self.counters);
        c.frames_written.fetch_add(delivered, Ordering::Relaxed);
        c.writes.fetch_add(writes, Ordering::Relaxed);
        c.would_block.fetch_add(blocked, Ordering::Relaxed);
        c.batches.fetch_add(1, Ordering::Relaxed);
        for k in dead {
            if self.conns[k].unsent.len() > self.max_outbound {
                c.overflow_closed.fetch_add(1, Ordering::Relaxed);
            }
            self.close(k);
        }
    }

    fn shutdown(&mut self) {
        if self.draining.is_some() {
            return;
        }
        self.draining = Some(Instant::now() + DRAIN);
        let _ = self.poll.registry().deregister(&mut self.listener);
        let close = close_frame();
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for k in keys {
            let conn = &mut self.conns[k];
            if !matches!(conn.phase, Phase::Open) {
                self.close(k);
                continue;
            }
            conn.phase = Phase::Closing;
            conn.unsent.extend_from_slice(&close);
            if matches!(flush(conn), Fate::Drop) {
                self.close(k);
            }
        }
    }

    fn on_readable(&mut self, k: usize, scratch: &mut [u8]) -> Fate {
        let conn = &mut self.conns[k];
        loop {
            let n = match conn.stream.read(scratch) {
                Ok(0) => return Fate::Drop,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Fate::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Fate::Drop,
            };
            let Phase::Upgrading(head) = &mut conn.phase else {
                // Client frames (pings, closes, messages) are read and discarded.
                continue;
            };
            head.extend_from_slice(&scratch[..n]);
            match upgrade_response(head, self.index.is_some()) {
                Upgrade::Incomplete if head.len() > MAX_HEAD => {
                    let _ = conn
                        .stream
                        .write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    return Fate::Drop;
                }
                Upgrade::Incomplete => {}
                Upgrade::Refuse(response) => {
                    let _ = conn.stream.write_all(response.as_bytes());
                    return Fate::Drop;
                }
                Upgrade::Accept(response, channels) => {
                    // Anything after the head is a client frame: discarded.
                    conn.phase = Phase::Open;
                    let mut bytes = response.into_bytes();
                    match self.index.as_mut() {
                        Some(index) => {
                            bytes.extend_from_slice(&index.connected_frame(&channels));
                            index.subscribe(k, &channels);
                            conn.channels = channels;
                        }
                        None => bytes.extend_from_slice(&self.connected),
                    }
                    match write_some(&mut conn.stream, &bytes) {
                        Ok(w) if w == bytes.len() => {}
                        Ok(w) => conn.unsent.extend_from_slice(&bytes[w..]),
                        Err(_) => return Fate::Drop,
                    }
                }
            }
        }
    }

    fn close(&mut self, k: usize) {
        if let Some(mut conn) = self.conns.try_remove(k) {
            let _ = self.poll.registry().deregister(&mut conn.stream);
            if let Some(index) = self.index.as_mut() {
                index.unsubscribe(k, &conn.channels);
            }
        }
    }
}

/// Writes what the socket takes of `unsent`; shuts the write side after a flushed close frame.
fn flush(conn: &mut Conn) -> Fate {
    if !conn.unsent.is_empty() {
        match write_some(&mut conn.stream, &conn.unsent) {
            Ok(n) if n == conn.unsent.len() => conn.unsent = Vec::new(),
            Ok(n) => {
                conn.unsent.drain(..n);
                return Fate::Keep;
            }
            Err(_) => return Fate::Drop,
        }
    }
    if matches!(conn.phase, Phase::Closing) && !conn.write_shut {
        conn.write_shut = true;
        let _ = conn.stream.shutdown(std::net::Shutdown::Write);
    }
    Fate::Keep
}

/// What [`send_frames`] did with a connection's frames.
enum Sent {
    /// The socket took them all.
    All,
    /// Written in part; the rest waits in the connection's buffer.
    Partly,
    /// Queued behind bytes already waiting; nothing written.
    Behind,
    /// The socket failed, or the buffer passed `max_outbound`.
    Dead,
}

/// Writes `frames` with `writev` until the socket takes no more (behind whatever already
/// waits), keeping the rest.
fn send_frames(conn: &mut Conn, frames: &[&[u8]], max_outbound: usize) -> Sent {
    let outcome = if conn.unsent.is_empty() {
        match write_frames(&mut conn.stream, frames) {
            Ok(written) if written == frames.iter().map(|f| f.len()).sum::<usize>() => {
                return Sent::All;
            }
            Ok(written) => {
                let mut skip_total = written;
                for f in frames {
                    let skip = skip_total.min(f.len());
                    skip_total -= skip;
                    conn.unsent.extend_from_slice(&f[skip..]);
                }
                Sent::Partly
            }
            Err(_) => return Sent::Dead,
        }
    } else {
        for f in frames {
            conn.unsent.extend_from_slice(f);
        }
        Sent::Behind
    };
    if conn.unsent.len() > max_outbound {
        Sent::Dead
    } else {
        outcome
    }
}

/// Writes as much of `frames` as the socket takes now, as `write_some` does for one buffer.
fn write_frames(stream: &mut TcpStream, frames: &[&[u8]]) -> io::Result<usize> {
    let mut slices: Vec<io::IoSlice<'_>> = frames.iter().map(|f| io::IoSlice::new(f)).collect();
    let mut rest = &mut slices[..];
    let mut written = 0;
    while !rest.is_empty() {
        match stream.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                written += n;
                io::IoSlice::advance_slices(&mut rest, n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// The `channels[]` (or `channels`) values of a request path's query.
fn url_channels(path: &str) -> Vec<String> {
    let query = path.split_once('?').map_or("", |(_, q)| q);
    form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "channels[]" || k == "channels")
        .map(|(_, v)| v.into_owned())
        .collect()
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

enum Upgrade {
    Incomplete,
    /// The 101 answer, and the URL's channels.
    Accept(String, Vec<String>),
    Refuse(String),
}

/// The answer to an upgrade request head, once it is complete.
fn upgrade_response(head: &[u8], by_channel: bool) -> Upgrade {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let refuse = |status: &str| {
        Upgrade::Refuse(format!(
            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        ))
    };
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Upgrade::Incomplete,
        Err(_) => return refuse("400 Bad Request"),
    }
    let Some(path) = req.path.filter(|p| p.starts_with("/v1/realtime")) else {
        return refuse("404 Not Found");
    };
    let channels = if by_channel {
        url_channels(path)
    } else {
        Vec::new()
    };
    let key = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
        .map(|h| h.value);
    let Some(key) = key else {
        return refuse("426 Upgrade Required");
    };
    let accept = tungstenite::handshake::derive_accept_key(key);
    Upgrade::Accept(
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        ),
        channels,
    )
}

// ---------------------------------------------------------------------------------------------
// Admin: blocking HTTP/1.1, one thread per connection.

struct Publisher {
    shards: Arc<Vec<ShardHandle>>,
    /// Held while an event goes to the shards, so ids and delivery order agree.
    ids: Mutex<EventIdGenerator>,
    subscription: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    #[allow(dead_code)]
    project: Option<String>,
    channels: Vec<String>,
    #[serde(default)]
    events: Vec<String>,
    #[allow(dead_code)]
    roles: Option<Vec<String>>,
    payload: Value,
}

impl Publisher {
    /// Returns the HTTP status and JSON body of the reply.
    fn publish(&self, body: &[u8]) -> (u16, Value) {
        let bad = |message: String| (400, json!({"code": 400, "message": message}));
        let body: PublishBody = match serde_json::from_slice(body) {
            Ok(b) => b,
            Err(e) => return bad(format!("invalid body: {e}")),
        };
        if body.channels.is_empty() {
            return bad("channels must not be empty".into());
        }
        if !body.payload.is_object() {
            return bad("payload must be a JSON object".into());
        }
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        let id = ids.next_id().to_string();
        // herald's encoder: the shared prefix plus this server's one subscription id.
        let event = Event {
            id: id.clone(),
            project: String::new(),
            channels: body.channels,
            events: body.events,
            roles: Vec::new(),
            timestamp: timestamp_now(),
            payload: body.payload,
        };
        let encoded = EncodedEvent::encode(&event);
        let channels: Arc<[String]> = event.channels.into();
        let mut message = encoded.prefix.to_vec();
        write_tail(&mut message, std::iter::once(self.subscription.as_str()));
        let frame = text_frame(&message);
        for shard in self.shards.iter() {
            let _ = shard
                .tx
                .send(Command::Frame(frame.clone(), channels.clone()));
            let _ = shard.waker.wake();
        }
        drop(ids);
        (200, json!({"id": id}))
    }
}

/// Reads `stream` after `last` (from its end the first time), publishing each entry as
/// `POST /v1/events` would, until an error.
fn redis_loop(
    url: &str,
    stream: &str,
    publisher: &Publisher,
    last: &mut Option<String>,
) -> anyhow::Result<()> {
    use redis::streams::{StreamRangeReply, StreamReadReply};
    let mut con = redis::Client::open(url)?.get_connection()?;
    if last.is_none() {
        let newest: StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query(&mut con)?;
        *last = Some(
            newest
                .ids
                .first()
                .map_or_else(|| "0-0".to_owned(), |e| e.id.clone()),
        );
    }
    let last = last.get_or_insert_with(|| "0-0".to_owned());
    loop {
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1000)
            .arg("BLOCK")
            .arg(5000)
            .arg("STREAMS")
            .arg(stream)
            .arg(&*last)
            .query(&mut con)?;
        for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            *last = entry.id.clone();
            let field = |name: &str| -> Value {
                entry
                    .map
                    .get(name)
                    .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or(Value::Null)
            };
            let body = json!({
                "channels": field("channels"),
                "events": field("events").as_array().cloned().unwrap_or_default(),
                "payload": field("payload"),
            });
            let (status, reply) = publisher.publish(body.to_string().as_bytes());
            if status != 200 {
                eprintln!("kernel_fanout: skipping stream entry {}: {reply}", entry.id);
            }
        }
    }
}

fn admin_loop(listener: StdTcpListener, publisher: Arc<Publisher>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let publisher = publisher.clone();
        let _ = std::thread::Builder::new()
            .name("admin-conn".into())
            .spawn(move || {
                let _ = admin_conn(stream, &publisher);
            });
    }
}

/// Serves HTTP/1.1 requests on one connection until it closes or idles out.
fn admin_conn(mut stream: StdTcpStream, publisher: &Publisher) -> io::Result<()> {
    stream.set_read_timeout(Some(ADMIN_IDLE))?;
    let _ = stream.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        // Read one request head.
        let (head_len, method, path, content_length, expect_continue, keep_alive) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let header = |name: &str| {
                        req.headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name))
                            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
                    };
                    if header("transfer-encoding").is_some() {
                        respond(
                            &mut stream,
                            411,
                            &json!({"code": 411, "message": "send a content-length"}),
                            false,
                        )?;
                        return Ok(());
                    }
                    let Some(length) = header("content-length")
                        .map(|v| v.trim().parse::<usize>())
                        .transpose()
                        .ok()
                    else {
                        respond(
                            &mut stream,
                            400,
                            &json!({"code": 400, "message": "bad content-length"}),
                            false,
                        )?;
                        return Ok(());
                    };
                    let close = header("connection").is_some_and(|v| v.contains("close"))
                        || req.version == Some(0);
                    break (
                        len,
                        req.method.unwrap_or("").to_owned(),
                        req.path.unwrap_or("").to_owned(),
                        length.unwrap_or(0),
                        header("expect").is_some_and(|v| v.contains("100-continue")),
                        !close,
                    );
                }
                Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => {}
                _ => {
                    respond(
                        &mut stream,
                        400,
                        &json!({"code": 400, "message": "bad request"}),
                        false,
                    )?;
                    return Ok(());
                }
            }
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        buf.drain(..head_len);
        if content_length > MAX_BODY {
            respond(
                &mut stream,
                413,
                &json!({"code": 413, "message": format!("request body exceeds {MAX_BODY} bytes")}),
                false,
            )?;
            return Ok(());
        }
        if expect_continue && buf.len() < content_length {
            stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        while buf.len() < content_length {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body: Vec<u8> = buf.drain(..content_length).collect();
        let path = path.split('?').next().unwrap_or("");
        let (status, reply) = match (method.as_str(), path) {
            ("POST", "/v1/events") => publisher.publish(&body),
            ("GET", "/healthz") => (200, json!({"status": "ok"})),
            _ => (
                404,
                json!({"code": 404, "message": "no such admin endpoint"}),
            ),
        };
        respond(&mut stream, status, &reply, keep_alive)?;
        if !keep_alive {
            return Ok(());
        }
    }
}

fn respond(
    stream: &mut StdTcpStream,
    status: u16,
    body: &Value,
    keep_alive: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        411 => "Length Required",
        500 => "Internal Server Error",
        413 => "Payload Too Large",
        _ => "",
    };
    let body = body.to_string();
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: {connection}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(channels: &[&str]) -> Published {
        let channels: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
        (text_frame(b"{}"), channels.into())
    }

    #[test]
    fn url_channels_reads_both_spellings_and_escapes() {
        assert_eq!(
            url_channels("/v1/realtime?project=p&channels[]=a&channels%5B%5D=b%20c&channels=d"),
            ["a", "b c", "d"]
        );
        assert!(url_channels("/v1/realtime").is_empty());
    }

    #[test]
    fn a_batch_owes_each_subscriber_its_channels_events_once_and_in_order() {
        let mut index = ChannelIndex::new(herald::protocol::UrlId::new(1, 0));
        index.subscribe(0, &["a".into()]);
        index.subscribe(3, &["a".into(), "b".into()]);
        index.subscribe(5, &["c".into()]);
        let batch = [
            event(&["b"]),
            event(&["a", "b"]),
            event(&["x"]),
            event(&["a"]),
        ];
        index.route(&batch);
        assert_eq!(
            index.touched,
            [3, 0],
            "in the order first owed; sorted before writing"
        );
        assert_eq!(index.owed[3], [0, 1, 3]);
        assert_eq!(index.owed[0], [1, 3]);
        assert!(index.owed.get(5).is_none_or(|o| o.is_empty()));

        index.unsubscribe(3, &["a".into(), "b".into()]);
        assert_eq!(index.subscribers["a"], [0]);
        assert!(!index.subscribers.contains_key("b"));
    }
}
