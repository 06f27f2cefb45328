//! High-availability drills. Clients connect only through HAProxy, run with the very file
//! docker/compose.yml ships (docker/haproxy/haproxy.cfg), to three herald nodes on one Redis
//! stream, and receive a steady event stream while a node is killed, the fleet is restarted
//! node by node, a node is cut off from Redis, or the Redis primary is lost. Every client checks
//! gaps and duplicates by event id, reconnecting with jittered back-off and `lastEventId`; each
//! drill prints its figures. Needs haproxy, redis-server, redis-sentinel and openssl
//! (./scripts/test installs them). Drills run one at a time: each measures recovery times.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

const STREAM: &str = "herald:events";
const CLIENTS: usize = 150;
/// One event every this often, from the first client connected to the end of the drill.
const EVERY: Duration = Duration::from_millis(5);
static ONE_DRILL_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// HAProxy with the shipped configuration, pointed at local nodes through its variables.
struct Haproxy {
    child: Child,
    ws: SocketAddr,
    stats: SocketAddr,
    dir: PathBuf,
}

impl Haproxy {
    fn start(nodes: &[(u16, u16)]) -> Self {
        let dir =
            std::env::temp_dir().join(format!("herald-ha-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("haproxy dir");
        let pem = dir.join("herald.pem");
        let made = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=localhost", "-keyout"])
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))
            .stderr(Stdio::null())
            .status()
            .expect("openssl is not installed: run ./scripts/test, which installs it");
        assert!(made.success(), "openssl could not make a certificate");
        let mut both = std::fs::read(dir.join("cert.pem")).expect("cert");
        both.extend(std::fs::read(dir.join("key.pem")).expect("key"));
        std::fs::write(&pem, both).expect("pem");

        let ws: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let stats: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db")
            .arg("-f")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/docker/haproxy/haproxy.cfg"
            ))
            .env("HAPROXY_WS_BIND", ws.to_string())
            .env("HAPROXY_WSS_BIND", format!("127.0.0.1:{}", free_port()))
            .env("HAPROXY_CERT", &pem)
            .env("HAPROXY_STATS_BIND", stats.to_string());
        for (i, (ws_port, admin_port)) in nodes.iter().enumerate() {
            cmd.env(
                format!("HERALD{}_WS", i + 1),
                format!("127.0.0.1:{ws_port}"),
            )
            .env(
                format!("HERALD{}_CHECK_PORT", i + 1),
                admin_port.to_string(),
            );
        }
        let log = std::fs::File::create(dir.join("haproxy.log")).expect("log");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("haproxy is not installed: run ./scripts/test, which installs it");
        Self {
            child,
            ws,
            stats,
            dir,
        }
    }

    /// Each herald server's status as HAProxy sees it ("UP", "DOWN", ...), from its stats CSV.
    fn states(&self) -> HashMap<String, String> {
        let Ok(mut resp) = ureq::get(&format!("http://{}/stats;csv", self.stats)).call() else {
            return HashMap::new();
        };
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let mut lines = text.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |name: &str| header.iter().position(|h| *h == name);
        let (Some(px), Some(sv), Some(st)) = (col("pxname"), col("svname"), col("status")) else {
            return HashMap::new();
        };
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| {
                f.get(px) == Some(&"herald") && f.get(sv).is_some_and(|s| s.starts_with("herald-"))
            })
            .map(|f| {
                (
                    f[sv].to_owned(),
                    f[st].split(' ').next().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    /// Waits until HAProxy reports `server` (e.g. "herald-1") in `state`; returns how long.
    fn wait_state(&self, server: &str, state: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if self.states().get(server).is_some_and(|s| s == state) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "HAProxy never reported {server} {state}: {:?}\n{}",
                self.states(),
                std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three herald nodes at fixed loopback ports behind HAProxy.
struct Fleet {
    nodes: Vec<Option<Server>>,
    ports: Vec<(u16, u16)>,
    bus: Vec<Vec<String>>,
    proxy: Haproxy,
}

impl Fleet {
    /// `bus[i]` are node i's bus arguments (e.g. `--redis URL`).
    fn start(bus: Vec<Vec<String>>) -> Self {
        let ports: Vec<(u16, u16)> = bus.iter().map(|_| (free_port(), free_port())).collect();
        let proxy = Haproxy::start(&ports);
        let mut fleet = Self {
            nodes: bus.iter().map(|_| None).collect(),
            ports,
            bus,
            proxy,
        };
        for i in 0..fleet.nodes.len() {
            fleet.start_node(i);
        }
        for i in 0..fleet.nodes.len() {
            fleet
                .proxy
                .wait_state(&name(i), "UP", Duration::from_secs(20));
        }
        fleet
    }

    fn start_node(&mut self, i: usize) {
        let (ws, admin) = self.ports[i];
        let mut args = vec![
            "--shards",
            "1",
            "--trusted-proxies",
            "127.0.0.1",
            "--drain-timeout",
            "5s",
        ];
        args.extend(self.bus[i].iter().map(String::as_str));
        let node = Server::start_at(
            &format!("127.0.0.1:{ws}"),
            &format!("127.0.0.1:{admin}"),
            &args,
            |_| {},
        );
        self.nodes[i] = Some(node);
    }

    fn node(&self, i: usize) -> &Server {
        self.nodes[i].as_ref().expect("node running")
    }

    fn url(&self) -> String {
        format!("ws://{}/v1/realtime?project=p&channels[]=c", self.proxy.ws)
    }

    fn connections(&self, i: usize) -> f64 {
        self.node(i).metric("herald_connections")
    }
}

fn name(i: usize) -> String {
    format!("herald-{}", i + 1)
}

/// What one client saw.
#[derive(Default)]
struct Seen {
    ids: Vec<String>,
    connected_at: Vec<Instant>,
    /// When each connection ended, and its close code if the server sent one.
    lost_at: Vec<(Instant, Option<u16>)>,
    /// When each event stamped with its publish time arrived, and how long it took.
    latencies: Vec<(Instant, f64)>,
    /// Codes of the `error` messages received (4010: "resync", the client may have missed some).
    errors: Vec<u64>,
    ended: bool,
}

/// A client that stays subscribed through every failure until it reads the end marker: on a
/// lost connection it waits a jittered back-off and reconnects with the last id it saw.
async fn subscriber(url: String, first: Arc<AtomicUsize>, deadline: Instant) -> Seen {
    let mut seen = Seen::default();
    let mut backoff = Duration::from_millis(50);
    while Instant::now() < deadline {
        let url = match seen.ids.last() {
            Some(id) => format!("{url}&lastEventId={id}"),
            None => url.clone(),
        };
        let connected = async {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.ok()?;
            let hello = next_json_within(&mut ws, Duration::from_secs(5)).await?;
            (hello["type"] == "connected").then_some(ws)
        };
        let Ok(Some(mut ws)) = tokio::time::timeout(Duration::from_secs(5), connected).await else {
            backoff = (backoff * 2).min(Duration::from_secs(2));
            tokio::time::sleep(jittered(backoff)).await;
            continue;
        };
        if seen.connected_at.is_empty() {
            first.fetch_add(1, Ordering::AcqRel);
        }
        seen.connected_at.push(Instant::now());
        backoff = Duration::from_millis(50);
        let code = read_events(&mut ws, &mut seen, deadline).await;
        if seen.ended {
            return seen;
        }
        seen.lost_at.push((Instant::now(), code));
        drop(ws);
        // Every client of a lost node comes back at once otherwise: spread them out.
        tokio::time::sleep(jittered(backoff)).await;
    }
    seen
}

/// Half of `backoff` plus a random share of the other half ("equal jitter").
fn jittered(backoff: Duration) -> Duration {
    let half = backoff.as_millis() as u64 / 2;
    Duration::from_millis(half + rand::random_range(0..=half))
}

/// Reads events until the end marker or the connection's end; returns its close code.
async fn read_events(ws: &mut Ws, seen: &mut Seen, deadline: Instant) -> Option<u16> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).expect("json");
                if v["type"] == "error" {
                    seen.errors.push(v["data"]["code"].as_u64().unwrap_or(0));
                }
                if v["type"] != "event" {
                    continue;
                }
                if v["data"]["payload"]["end"] == true {
                    seen.ended = true;
                    return None;
                }
                seen.ids
                    .push(v["data"]["id"].as_str().expect("id").to_owned());
                if let Some(sent) = v["data"]["payload"]["t"].as_f64() {
                    seen.latencies.push((Instant::now(), now_ms() - sent));
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| f.code.into()),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) | Err(_) => return None,
        }
    }
}

/// Starts CLIENTS subscribers through HAProxy and waits until every one is connected.
async fn subscribe_all(fleet: &Fleet, deadline: Instant) -> Vec<tokio::task::JoinHandle<Seen>> {
    let first = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(subscriber(fleet.url(), first.clone(), deadline)))
        .collect();
    let start = Instant::now();
    while first.load(Ordering::Acquire) < CLIENTS {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "clients could not connect through HAProxy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..fleet.nodes.len() {
        assert!(
            fleet.connections(i) > 0.0,
            "HAProxy sent no client to {}",
            name(i)
        );
    }
    tasks
}

/// Publishes an event every [`EVERY`] until stopped; `publish(n)` returns the id when the
/// event was acknowledged. Returns the acknowledged ids, in order.
struct Publisher {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Vec<String>, usize)>,
}

impl Publisher {
    fn start(mut publish: impl FnMut(usize) -> Option<String> + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut acked, mut refused) = (Vec::new(), 0);
            let mut n = 0;
            while !stopping.load(Ordering::Acquire) {
                match publish(n) {
                    Some(id) => acked.push(id),
                    None => refused += 1,
                }
                n += 1;
                std::thread::sleep(EVERY);
            }
            (acked, refused)
        });
        Self { stop, thread }
    }

    fn finish(self) -> (Vec<String>, usize) {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("publisher")
    }
}

fn xadd_publisher(redis_url: String) -> impl FnMut(usize) -> Option<String> + Send {
    let mut conn = redis::Client::open(redis_url)
        .unwrap()
        .get_connection()
        .expect("redis");
    move |n| {
        redis::cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("project")
            .arg("p")
            .arg("channels")
            .arg(r#"["c"]"#)
            .arg("payload")
            .arg(json!({"n": n, "t": now_ms()}).to_string())
            .query(&mut conn)
            .ok()
    }
}

fn end_marker_fields() -> [(&'static str, &'static str); 3] {
    [
        ("project", "p"),
        ("channels", r#"["c"]"#),
        ("payload", r#"{"end":true}"#),
    ]
}

/// Collects every client, prints the drill's figures and fails on any lost or duplicated
/// event. `fault` is when the failure began; returns the seen logs for further checks.
async fn judge(
    drill: &str,
    published: &[String],
    refused: usize,
    tasks: Vec<tokio::task::JoinHandle<Seen>>,
    fault: Instant,
) -> Vec<Seen> {
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.expect("client task"));
    }
    let (mut lost, mut duplicated, mut out_of_order, mut unpublished) = (0, 0, 0, 0);
    let mut longest_outage = Duration::ZERO;
    let mut live_again = Duration::ZERO;
    for seen in &all {
        let unique: HashSet<&String> = seen.ids.iter().collect();
        let dup = seen.ids.len() - unique.len();
        let gone = published.iter().filter(|id| !unique.contains(id)).count();
        let extra = unique.len() + gone - published.len();
        let order: Vec<(u64, u64)> = seen.ids.iter().map(|id| stream_position(id)).collect();
        out_of_order += usize::from(order.windows(2).any(|w| w[0] >= w[1]));
        duplicated += dup;
        lost += gone;
        unpublished += extra;
        for (at, _) in &seen.lost_at {
            if let Some(back) = seen.connected_at.iter().find(|c| *c > at) {
                longest_outage = longest_outage.max(*back - *at);
                live_again = live_again.max(back.saturating_duration_since(fault));
            }
        }
    }
    let reconnected = all.iter().filter(|s| !s.lost_at.is_empty()).count();
    let errors: Vec<u64> = all.iter().flat_map(|s| s.errors.iter().copied()).collect();
    let unfinished = all.iter().filter(|s| !s.ended).count();
    println!(
        "drill {drill}: {CLIENTS} clients through HAProxy, {} events acknowledged ({refused} refused), \
         {lost} lost, {duplicated} duplicated, {out_of_order} clients out of order, \
         {unpublished} unacknowledged received; {reconnected} clients reconnected, the longest a \
         client was disconnected {longest_outage:.2?}, the last one back {live_again:.2?} after \
         the fault began",
        published.len()
    );
    assert_eq!(
        unfinished, 0,
        "{unfinished} clients never read the end marker"
    );
    assert_eq!((lost, duplicated, out_of_order), (0, 0, 0), "drill {drill}");
    assert_eq!(
        errors,
        Vec::<u64>::new(),
        "errors sent to clients (4010: told to resync)"
    );
    // Only a publish that was refused may still have reached the stream.
    assert!(
        unpublished <= refused * CLIENTS,
        "events nobody published: {unpublished}"
    );
    all
}

/// A stream id's (milliseconds, sequence): the order the stream and every client must keep.
fn stream_position(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').expect("a stream id");
    (ms.parse().expect("ms"), seq.parse().expect("seq"))
}

fn redis_bus(redis: &RedisServer) -> Vec<String> {
    vec!["--redis".into(), redis.url()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drill_kill_a_node_and_its_clients_resume_on_the_others_without_loss() {
    let _one = ONE_DRILL_AT_A_TIME.lock().await;
    raise_fd_limit();
    let redis = RedisServer::start(&["--appendonly", "yes"]);
    let mut fleet = Fleet::start(vec![redis_bus(&redis); 3]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let tasks = subscribe_all(&fleet, deadline).await;
    let publisher = Publisher::start(xadd_publisher(redis.url()));

    tokio::time::sleep(Duration::from_secs(1)).await;
    let on_victim = fleet.connections(1);
    fleet.nodes[1].as_mut().unwrap().kill9();
    let fault = Instant::now();
    fleet
        .proxy
        .wait_state(&name(1), "DOWN", Duration::from_secs(10));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (published, refused) = publisher.finish();
    redis.xadd(STREAM, &end_marker_fields());

    let seen = judge("kill -9", &published, refused, tasks, fault).await;
    let moved = seen.iter().filter(|s| !s.lost_at.is_empty()).count();
    assert_eq!(
        moved as f64, on_victim,
        "exactly the killed node's clients reconnected"
    );
    // The reconnect storm lands on the surviving nodes: their own clients' live delivery.
    let stayed: Vec<&Seen> = seen.iter().filter(|s| s.lost_at.is_empty()).collect();
    let window = |from: Instant, to: Instant| -> Vec<f64> {
        let mut ms: Vec<f64> = stayed
            .iter()
            .flat_map(|s| s.latencies.iter())
            .filter(|(at, _)| *at >= from && *at < to)
            .map(|(_, ms)| *ms)
            .collect();
        ms.sort_by(f64::total_cmp);
        ms
    };
    let before = window(fault - Duration::from_secs(1), fault);
    let during = window(fault, fault + Duration::from_secs(1));
    let pct = |v: &[f64], p: f64| {
        v.get(((v.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    println!(
        "drill kill -9: live latency on the surviving nodes' {} clients, p50 / p99: {:.1} / {:.1} ms \
         in the second before the kill, {:.1} / {:.1} ms in the second after it (the reconnect storm)",
        stayed.len(),
        pct(&before, 0.5),
        pct(&before, 0.99),
        pct(&during, 0.5),
        pct(&during, 0.99)
    );
    assert!(
        !during.is_empty(),
        "the surviving clients received nothing during the storm"
    );
    // A bound that catches a stall behind the replays, not the noise of a shared machine.
    assert!(
        pct(&during, 0.99) < 1000.0,
        "live delivery stalled during the reconnect storm"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drill_rolling_restart_closes_with_1001_and_loses_nothing() {
    let _one = ONE_DRILL_AT_A_TIME.lock().await;
    raise_fd_limit();
    let redis = RedisServer::start(&["--appendonly", "yes"]);
    let mut fleet = Fleet::start(vec![redis_bus(&redis); 3]);
    let deadline = Instant::now() + Duration::from_secs(90);
    let tasks = subscribe_all(&fleet, deadline).await;
    let publisher = Publisher::start(xadd_publisher(redis.url()));

    let fault = Instant::now();
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let held = fleet.connections(i);
        let stopping = Instant::now();
        let node = fleet.nodes[i].as_mut().unwrap();
        node.sigterm();
        let status = node
            .wait_exit(Duration::from_secs(15))
            .expect("drained within 15 s");
        assert!(status.success(), "{} exited with {status}", name(i));
        let drained = stopping.elapsed();
        fleet.start_node(i);
        fleet
            .proxy
            .wait_state(&name(i), "UP", Duration::from_secs(20));
        println!(
            "drill rolling restart: {} closed {held} connections with 1001 and exited {drained:.2?} \
             after SIGTERM; restarted and UP in HAProxy {:.2?} after SIGTERM",
            name(i),
            stopping.elapsed()
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (published, refused) = publisher.finish();
    redis.xadd(STREAM, &end_marker_fields());

    let seen = judge("rolling restart", &published, refused, tasks, fault).await;
    let closes: Vec<Option<u16>> = seen
        .iter()
        .flat_map(|s| s.lost_at.iter().map(|l| l.1))
        .collect();
    assert!(
        closes.len() >= CLIENTS,
        "every client's node restarted at least once: {}",
        closes.len()
    );
    assert!(
        closes.iter().all(|c| *c == Some(1001)),
        "every connection closed with 1001: {closes:?}"
    );
}

/// A TCP relay in front of Redis that can be cut (every connection dropped, new ones refused)
/// and restored: a node that loses Redis while its clients stay connected.
struct Relay {
    port: u16,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    async fn start(to: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut watch = watch.clone();
                if *watch.borrow() {
                    let _ = inbound.shutdown().await;
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Self { port, cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drill_node_cut_off_from_redis_leaves_the_balancer_and_catches_up() {
    let _one = ONE_DRILL_AT_A_TIME.lock().await;
    raise_fd_limit();
    let redis = RedisServer::start(&["--appendonly", "yes"]);
    let relay = Relay::start(redis.port).await;
    let cut_bus = vec![
        "--redis".into(),
        format!("redis://127.0.0.1:{}", relay.port),
    ];
    let fleet = Fleet::start(vec![cut_bus, redis_bus(&redis), redis_bus(&redis)]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let tasks = subscribe_all(&fleet, deadline).await;
    let publisher = Publisher::start(xadd_publisher(redis.url()));

    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = fleet.connections(0);
    relay.set_cut(true);
    let fault = Instant::now();
    let down = fleet
        .proxy
        .wait_state(&name(0), "DOWN", Duration::from_secs(10));
    assert_eq!(
        fleet.node(0).get("/readyz").0,
        503,
        "readiness is red without Redis"
    );
    let (status, _) = fleet
        .node(0)
        .publish_raw(r#"{"project":"p","channels":["c"],"payload":{}}"#);
    assert_eq!(status, 503, "publishing on a node without Redis says so");
    // New clients go to the other nodes while the cut-off node keeps the ones it has.
    let newcomers: Vec<Ws> =
        futures_util::future::join_all((0..30).map(|_| async { connect(&fleet.url()).await.0 }))
            .await;
    assert_eq!(
        fleet.connections(0),
        held,
        "HAProxy sent new clients to a node without Redis"
    );
    drop(newcomers);
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.set_cut(false);
    let up = fleet
        .proxy
        .wait_state(&name(0), "UP", Duration::from_secs(20));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (published, refused) = publisher.finish();
    redis.xadd(STREAM, &end_marker_fields());
    println!(
        "drill Redis cut: {} marked DOWN {down:.2?} after the cut, UP {up:.2?} after it was restored",
        name(0)
    );

    let seen = judge("node cut off from Redis", &published, refused, tasks, fault).await;
    let dropped = seen.iter().filter(|s| !s.lost_at.is_empty()).count();
    assert_eq!(
        dropped, 0,
        "no client lost its connection while its node was cut off"
    );
}

/// A redis-sentinel process watching the primary under [`MASTER`].
struct Sentinel {
    child: Child,
    port: u16,
    dir: PathBuf,
}

const MASTER: &str = "herald";

impl Sentinel {
    fn start(primary: u16) -> Self {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("herald-sentinel-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("sentinel dir");
        // Sentinel rewrites its file with what it learns; each needs its own.
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\n\
                 sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {MASTER} 1000\n\
                 sentinel failover-timeout {MASTER} 5000\n\
                 sentinel parallel-syncs {MASTER} 2\n",
                dir = dir.display()
            ),
        )
        .expect("sentinel.conf");
        let child = Command::new("redis-sentinel")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-sentinel is not installed: run ./scripts/test, which installs it");
        Self { child, port, dir }
    }

    fn ask(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{}", self.port))?
            .get_connection_with_timeout(Duration::from_secs(1))?;
        redis::cmd("SENTINEL").arg(args).query(&mut conn)
    }

    /// The port the Sentinel names as the primary.
    fn primary_port(&self) -> Option<u16> {
        let addr: Vec<String> =
            redis::from_redis_value(self.ask(&["get-master-addr-by-name", MASTER]).ok()?).ok()?;
        addr.get(1)?.parse().ok()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn replication_up(replica: &RedisServer) -> bool {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query(&mut replica.conn())
        .unwrap_or_default();
    info.contains("master_link_status:up")
}

fn until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// Publishes through the nodes' publish API in turn: an event counts as acknowledged only on
/// 200, which with --publish-replicas 1 means a replica holds it.
fn api_publisher(admins: Vec<SocketAddr>) -> impl FnMut(usize) -> Option<String> + Send {
    move |n| {
        let admin = admins[n % admins.len()];
        let body = json!({"project": "p", "channels": ["c"], "payload": {"n": n}}).to_string();
        let mut resp = ureq::post(&format!("http://{admin}/v1/events"))
            .config()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .header("content-type", "application/json")
            .send(body)
            .ok()?;
        let reply: Value = serde_json::from_str(&resp.body_mut().read_to_string().ok()?).ok()?;
        (resp.status() == 200).then(|| reply["id"].as_str().map(str::to_owned))?
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drill_redis_primary_lost_sentinel_fails_over_and_no_acknowledged_event_is_lost() {
    let _one = ONE_DRILL_AT_A_TIME.lock().await;
    raise_fd_limit();
    let mut primary = RedisServer::start(&["--appendonly", "yes"]);
    let replicas: Vec<RedisServer> = (0..2)
        .map(|_| RedisServer::start(&["--replicaof", "127.0.0.1", &primary.port.to_string()]))
        .collect();
    until("replicas in sync", Duration::from_secs(15), || {
        replicas.iter().all(replication_up)
    });
    let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(primary.port)).collect();
    until(
        "the Sentinels agree on a quorum",
        Duration::from_secs(20),
        || {
            sentinels[0].ask(&["ckquorum", MASTER]).is_ok()
                && sentinels.iter().all(|s| {
                    let known: Vec<redis::Value> = s
                        .ask(&["replicas", MASTER])
                        .ok()
                        .and_then(|v| redis::from_redis_value(v).ok())
                        .unwrap_or_default();
                    known.len() == 2
                })
        },
    );
    let addresses: Vec<String> = sentinels
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    let bus = vec![
        "--redis-sentinel".to_owned(),
        addresses.join(","),
        "--redis-master".to_owned(),
        MASTER.to_owned(),
        "--publish-replicas".to_owned(),
        "1".to_owned(),
    ];
    let fleet = Fleet::start(vec![bus; 3]);
    let deadline = Instant::now() + Duration::from_secs(90);
    let tasks = subscribe_all(&fleet, deadline).await;
    let admins: Vec<SocketAddr> = (0..3).map(|i| fleet.node(i).admin).collect();
    let publisher = Publisher::start(api_publisher(admins.clone()));

    tokio::time::sleep(Duration::from_secs(1)).await;
    let old = primary.port;
    primary.kill();
    let fault = Instant::now();
    let failover = until("a Sentinel failover", Duration::from_secs(30), || {
        sentinels[0].primary_port().is_some_and(|p| p != old)
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (published, refused) = publisher.finish();
    // Any node will do; the answer of the last try says why when none does.
    let body = json!({"project": "p", "channels": ["c"], "payload": {"end": true}}).to_string();
    let start = Instant::now();
    for i in (0..3).cycle() {
        let last = fleet.node(i).publish_raw(&body);
        if last.0 == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the end marker: {last:?}"
        );
    }
    // Every node found the new primary by itself.
    for i in 0..3 {
        let (status, reply) = fleet
            .node(i)
            .publish_raw(r#"{"project":"p","channels":["other"],"payload":{}}"#);
        assert_eq!(
            status,
            200,
            "{} cannot publish after the failover: {reply}",
            name(i)
        );
    }
    let killed_at = unix_ms(fault);
    let later: Vec<u128> = published
        .iter()
        .map(|id| u128::from(stream_position(id).0))
        .filter(|ms| *ms > killed_at)
        .collect();
    let after = later.len();
    let back = later
        .first()
        .map(|ms| Duration::from_millis((ms - killed_at) as u64));
    println!(
        "drill Redis primary lost: Sentinel promoted a replica {failover:.2?} after the kill; the \
         first publish acknowledged again {back:.2?} after it; {after} events acknowledged after \
         the kill, {refused} publishes answered 503 meanwhile"
    );
    assert!(after > 0, "no event was acknowledged after the failover");
    let seen = judge("Redis primary lost", &published, refused, tasks, fault).await;
    let dropped = seen.iter().filter(|s| !s.lost_at.is_empty()).count();
    assert_eq!(
        dropped, 0,
        "clients stay connected through a Redis failover"
    );
}

/// Now, in milliseconds since the Unix epoch (fractional).
fn now_ms() -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    now.as_secs_f64() * 1000.0
}

/// `at` as milliseconds since the Unix epoch (stream ids start with them).
fn unix_ms(at: Instant) -> u128 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    now.saturating_sub(at.elapsed()).as_millis()
}
