//! Test harness shared by herald's tests and the load generator's (benches/loadgen/tests):
//! starts servers that print herald's startup line (herald or a baseline) and Redis on loopback
//! (one redis-server, or a Redis Cluster of three), and talks to them as clients do. Must not
//! name a binary of either package: each crate's tests start their own (`CARGO_BIN_EXE_*` exists
//! only in the package that builds it).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Lets this test process open thousands of client sockets.
pub fn raise_fd_limit() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
}

/// A server process (herald, or a baseline printing the same startup line) on ephemeral
/// loopback ports.
pub struct Server {
    pub child: Child,
    pub ws: SocketAddr,
    pub admin: SocketAddr,
    pub startup_line: String,
}

impl Server {
    /// Starts `cmd` (herald or a baseline that prints the same startup line) and reads its
    /// addresses from that line.
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read startup line");
        let grab = |marker: &str| -> SocketAddr {
            let start = line
                .find(marker)
                .unwrap_or_else(|| panic!("no {marker} in {line:?}"))
                + marker.len();
            let rest = &line[start..];
            let end = rest
                .find(|c: char| c == '/' || c.is_whitespace())
                .unwrap_or(rest.len());
            rest[..end].parse().expect("address")
        };
        let ws = grab("ws://");
        let admin = grab("admin on http://");
        Self {
            child,
            ws,
            admin,
            startup_line: line,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.ws, path_and_query)
    }

    /// POSTs a JSON body to /v1/events; returns the status and the JSON reply.
    pub fn publish_raw(&self, body: &str) -> (u16, Value) {
        let mut resp = ureq::post(&format!("http://{}/v1/events", self.admin))
            .config()
            .http_status_as_error(false)
            .build()
            .header("content-type", "application/json")
            .send(body)
            .expect("admin reachable");
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Publishes an event and returns its id, panicking unless the gateway accepted it.
    pub fn publish(&self, body: Value) -> String {
        let (status, reply) = self.publish_raw(&body.to_string());
        assert_eq!(status, 200, "publish failed: {reply}");
        reply["id"].as_str().expect("id").to_owned()
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let mut resp = ureq::get(&format!("http://{}{}", self.admin, path))
            .config()
            .http_status_as_error(false)
            .build()
            .call()
            .expect("admin reachable");
        (
            resp.status().as_u16(),
            resp.body_mut().read_to_string().expect("body"),
        )
    }

    /// Sum of a metric over all its label sets, from /metrics.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn metric_with(&self, name: &str, label: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok);
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// User + system CPU seconds used so far, from /proc.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("stat");
        let after = &stat[stat.rfind(')').expect("comm") + 2..];
        let f: Vec<&str> = after.split(' ').collect();
        let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
        ticks / 100.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects a WebSocket client and returns it with the `connected` message.
pub async fn connect(url: &str) -> (Ws, Value) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let connected = next_json(&mut ws).await;
    assert_eq!(connected["type"], "connected", "{connected}");
    (ws, connected)
}

pub async fn connect_with_header(url: &str, name: &'static str, value: &str) -> (Ws, Value) {
    let mut req = url.into_client_request().expect("request");
    req.headers_mut()
        .insert(name, value.parse().expect("header"));
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("connect");
    let connected = next_json(&mut ws).await;
    (ws, connected)
}

/// The next JSON text message (pings and pongs skipped), failing after 10 s.
pub async fn next_json(ws: &mut Ws) -> Value {
    next_json_within(ws, Duration::from_secs(10))
        .await
        .expect("a message within the timeout")
}

pub async fn next_json_within(ws: &mut Ws, timeout: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.ok()??;
        match msg.expect("websocket error") {
            Message::Text(t) => return Some(serde_json::from_str(&t).expect("json")),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected message {other:?}"),
        }
    }
}

pub async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.into())).await.expect("send");
}

/// Reads until the server's close frame and returns its code.
pub async fn expect_close(ws: &mut Ws, timeout: Duration) -> u16 {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("close within the timeout");
        match msg {
            Some(Ok(Message::Close(Some(CloseFrame { code, .. })))) => return code.into(),
            Some(Ok(Message::Close(None))) => panic!("close frame without code"),
            Some(Ok(_)) => continue,
            other => panic!("connection ended without a close frame: {other:?}"),
        }
    }
}

/// A client that speaks raw bytes, for what well-behaved libraries refuse to send.
pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    pub fn tcp(addr: SocketAddr) -> Self {
        Self::from_stream(TcpStream::connect(addr).expect("tcp connect"))
    }

    /// Connects from the local address `source` (e.g. "127.0.0.2"), another client as far as
    /// per-IP limits go.
    pub fn tcp_from(addr: SocketAddr, source: &str) -> Self {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let local: SocketAddr = format!("{source}:0").parse().expect("source address");
        socket.bind(&local.into()).expect("bind");
        socket.connect(&addr.into()).expect("connect");
        Self::from_stream(socket.into())
    }

    /// Connects with a receive buffer of `bytes`: a client that holds little of what it does
    /// not read.
    pub fn tcp_with_recv_buffer(addr: SocketAddr, bytes: usize) -> Self {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        socket.connect(&addr.into()).expect("connect");
        Self::from_stream(socket.into())
    }

    pub fn from_stream(stream: TcpStream) -> Self {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and upgrades; returns the client once the 101 has been read.
    pub fn upgrade(addr: SocketAddr, path_and_query: &str) -> Self {
        let mut c = Self::tcp(addr);
        c.send_upgrade(path_and_query);
        let head = c.read_http_head();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        c
    }

    pub fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Reads an HTTP response head (and, for non-101 responses, the rest until EOF).
    pub fn read_http_head(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end + 4]).into_owned();
                self.buf.drain(..end + 4);
                return head;
            }
            if !self.fill() {
                return String::from_utf8_lossy(&self.buf).into_owned();
            }
        }
    }

    /// Waits up to `timeout` for an HTTP response head; None if none arrived in time.
    pub fn poll_http_head(&mut self, timeout: Duration) -> Option<String> {
        self.stream
            .set_read_timeout(Some(timeout))
            .expect("timeout");
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 4096];
        let head = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end + 4]).into_owned();
                self.buf.drain(..end + 4);
                break Some(head);
            }
            if Instant::now() >= deadline {
                break None;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => break None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break None;
                }
                Err(e) => panic!("read failed: {e}"),
            }
        };
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        head
    }

    /// Sends an upgrade request without waiting for the answer.
    pub fn send_upgrade(&mut self, path_and_query: &str) {
        let addr = self.stream.peer_addr().expect("peer");
        self.write(
            format!(
                "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            .as_bytes(),
        );
    }

    /// Reads what arrives until EOF; returns everything buffered.
    pub fn read_to_end(&mut self) -> Vec<u8> {
        while self.fill() {}
        std::mem::take(&mut self.buf)
    }

    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 65536];
        match self.stream.read(&mut chunk) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            // A read timeout ends the wait like EOF: the caller asserts on what it got.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                ) =>
            {
                false
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }

    /// The next server frame as (opcode, payload); None at EOF.
    pub fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let op = self.buf[0] & 0x0F;
                let len7 = (self.buf[1] & 0x7F) as usize;
                let (len, hl) = match len7 {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(&self.buf[2..10]);
                        (u64::from_be_bytes(a) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n, 2),
                };
                if len != usize::MAX && self.buf.len() >= hl + len {
                    let payload = self.buf[hl..hl + len].to_vec();
                    self.buf.drain(..hl + len);
                    return Some((op, payload));
                }
            }
            if !self.fill() {
                return None;
            }
        }
    }

    /// Skips frames until a close frame; returns its code (None if the stream just ended).
    pub fn read_close_code(&mut self) -> Option<u16> {
        while let Some((op, payload)) = self.read_frame() {
            if op == 8 {
                return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
        None
    }

    /// The next text frame as JSON, skipping control frames.
    pub fn read_json(&mut self) -> Value {
        loop {
            let (op, payload) = self.read_frame().expect("a frame");
            if op == 1 {
                return serde_json::from_slice(&payload).expect("json");
            }
        }
    }

    pub fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let f = herald::ws::decoder::encode_client_frame(
            fin,
            opcode,
            payload,
            [0x12, 0x34, 0x56, 0x78],
        );
        self.write(&f);
    }
}

/// A redis-server of the test's own, on a free loopback port, in its own directory.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    pub dir: std::path::PathBuf,
    extra: Vec<String>,
}

/// A free loopback port for a server a test starts (redis-server, haproxy, herald).
///
/// It is taken outside the kernel's ephemeral range (`ip_local_port_range`), below it or, where
/// too little is left below, above it: a port from `bind(0)` is free only until the server
/// binds it, and in between any outgoing connection (a cluster bus link, a client) may get it
/// as its source port. The kernel never hands out ports outside that range by itself, so only
/// another test could take it; the walk starts at a place of this process's own and never
/// repeats a port within it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, span) = outside_ephemeral_range();
    let start = std::process::id().wrapping_mul(7919) % span;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(
            n < span,
            "every loopback port in {low}..{} was handed out",
            low + span
        );
        let port = (low + (start + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The first port and the number of ports [`free_port`] walks: 10000 up to the kernel's
/// ephemeral range, or the ports above it when fewer than 1,000 are left below.
fn outside_ephemeral_range() -> (u32, u32) {
    const LOWEST: u32 = 10_000;
    const ENOUGH: u32 = 1_000;
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let mut bounds = range
        .iter()
        .flat_map(|s| s.split_whitespace())
        .filter_map(|n| n.parse::<u32>().ok());
    let (first, last) = (
        bounds.next().unwrap_or(32_768),
        bounds.next().unwrap_or(60_999),
    );
    if first.saturating_sub(LOWEST) >= ENOUGH {
        (LOWEST, first - LOWEST)
    } else {
        assert!(
            65_535u32.saturating_sub(last) >= ENOUGH,
            "ip_local_port_range {first} {last} leaves fewer than {ENOUGH} ports outside it for test servers"
        );
        (last + 1, 65_535 - last)
    }
}

impl RedisServer {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_on(free_port(), extra)
    }

    /// Starts it on `port` (free, picked by the caller).
    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("herald-redis-{}-{port}", std::process::id()));
        // A fresh server: nothing left from an earlier one (a cluster node's nodes.conf above all).
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("redis dir");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = Self::spawn(port, &dir, &extra);
        Self {
            child,
            port,
            dir,
            extra,
        }
    }

    fn spawn(port: u16, dir: &std::path::Path, extra: &[String]) -> Child {
        let mut child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
            ])
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server is not installed: run ./scripts/test, which installs it");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
                panic!("redis-server on port {port} exited at start ({status}); its log:\n{log}");
            }
            if let Ok(c) = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                && let Ok(mut conn) = c.get_connection()
                && redis::cmd("PING").query::<String>(&mut conn).is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .expect("client")
            .get_connection()
            .expect("connect to redis")
    }

    /// XADDs an entry with raw fields, as any publisher would; returns its id.
    pub fn xadd(&self, stream: &str, fields: &[(&str, &str)]) -> String {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        cmd.query(&mut self.conn()).expect("XADD")
    }

    /// Stops the server abruptly (no final save).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and directory (AOF, when enabled, restores the data).
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(self.port, &self.dir, &self.extra);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` distinct free loopback ports ([`free_port`] never repeats one within a process).
pub fn free_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| free_port()).collect()
}

/// A Redis Cluster of the test's own: three redis-server masters on free loopback ports, each
/// in its own directory (a [`RedisServer`] each), with no replicas, the slots split evenly.
/// Each node's cluster bus port is a free port of its own too (`--cluster-port`), not port +
/// 10000, which may be past 65535. Every node writes its AOF with `appendfsync always`, so a
/// SIGKILL loses no acknowledged write, and `nodes.conf` (in its directory) records the cluster:
/// after [`RedisCluster::restart_all`] the same nodes on the same ports form the same cluster
/// with the same data, without `--cluster create`.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// The cluster connection [`RedisCluster::xadd`] and [`RedisCluster::query`] use, made on
    /// first use and dropped when the cluster is killed.
    conn: std::sync::Mutex<Option<redis::cluster::ClusterConnection>>,
}

/// How long a new or restarted cluster may take to report `cluster_state:ok` on every node.
const CLUSTER_OK_TIMEOUT: Duration = Duration::from_secs(30);

impl RedisCluster {
    pub fn start() -> Self {
        // Each node's client port and cluster bus port, all six distinct.
        let ports = free_ports(6);
        let nodes: Vec<RedisServer> = ports
            .chunks(2)
            .map(|pair| {
                let bus = pair[1].to_string();
                RedisServer::start_on(
                    pair[0],
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "5000",
                        "--cluster-port",
                        &bus,
                        "--appendonly",
                        "yes",
                        "--appendfsync",
                        "always",
                    ],
                )
            })
            .collect();
        let cluster = Self {
            nodes,
            conn: std::sync::Mutex::new(None),
        };
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(cluster.addresses().split(','))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli is not installed: run ./scripts/test, which installs it");
        assert!(
            out.status.success(),
            "redis-cli --cluster create {} failed: {}{}",
            cluster.addresses(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok();
        cluster
    }

    /// The nodes' ports, in the order the cluster was created (the first holds slots 0-5460).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// "127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3", as `--redis-cluster` takes them.
    pub fn addresses(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The nodes' URLs (redis://127.0.0.1:P), as a cluster client takes them.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// A new cluster connection: routes each command to the master of its key's slot.
    pub fn conn(&self) -> redis::cluster::ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls())
            .expect("cluster client")
            .get_connection()
            .expect("connect to the Redis Cluster")
    }

    /// Runs `cmd` on the master of its key's slot; panics on an error.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let mut cached = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let conn = cached.get_or_insert_with(|| self.conn());
        match cmd.query(conn) {
            Ok(value) => value,
            Err(e) => {
                // The next call starts from a new connection, whatever state this one is in.
                *cached = None;
                panic!("Redis Cluster command failed: {e}")
            }
        }
    }

    /// XADDs an entry with raw fields to `key`, as any publisher would; returns its id.
    pub fn xadd(&self, key: &str, fields: &[(&str, &str)]) -> String {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(key).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        self.query(&cmd)
    }

    /// One node's `CLUSTER INFO` (empty when it does not answer).
    pub fn cluster_info(&self, port: u16) -> String {
        let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
            return String::new();
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
            return String::new();
        };
        redis::cmd("CLUSTER")
            .arg("INFO")
            .query::<String>(&mut conn)
            .unwrap_or_default()
    }

    /// Waits until every node says `cluster_state:ok` and knows all three nodes.
    fn wait_ok(&self) {
        let deadline = Instant::now() + CLUSTER_OK_TIMEOUT;
        loop {
            let infos: Vec<(u16, String)> = self
                .ports()
                .into_iter()
                .map(|p| (p, self.cluster_info(p)))
                .collect();
            let ok = |info: &str| {
                let has = |line: &str| info.lines().any(|l| l.trim() == line);
                has("cluster_state:ok") && has("cluster_known_nodes:3")
            };
            if infos.iter().all(|(_, info)| ok(info)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster on {} did not report cluster_state:ok on every node within \
                 {CLUSTER_OK_TIMEOUT:?}: {infos:?}",
                self.addresses()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops every node abruptly (SIGKILL): the whole cluster is gone.
    pub fn kill_all(&mut self) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
        for node in &mut self.nodes {
            node.kill();
        }
    }

    /// Starts every node again on its port and directory (killing any still running first):
    /// nodes.conf and the AOF bring back the same cluster and data. Returns once every node
    /// says `cluster_state:ok` again.
    pub fn restart_all(&mut self) {
        self.kill_all();
        for node in &mut self.nodes {
            node.restart();
        }
        self.wait_ok();
    }
}

impl Drop for RedisCluster {
    /// Kills every node; each node's own drop then removes its directory.
    fn drop(&mut self) {
        self.kill_all();
    }
}

impl Server {
    /// SIGKILL: a node failure.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
