//! `naive_server`: a benchmark baseline, the realtime server a typical user writes with tokio.
//!
//! Owns one thing: being an honest "naive" point of comparison for herald (issue 4). It is never
//! shipped; it speaks just the subset of the Appwrite Realtime protocol the benchmarks use, with
//! herald's CLI shape and startup line so the same load generator and scripts drive both:
//!
//! - tokio multi-thread runtime (`--shards N` worker threads), one task per connection;
//! - tokio-tungstenite `accept_hdr_async` with the default WebSocket config;
//! - one `tokio::sync::broadcast` channel for the whole server carrying every published event;
//!   each connection task filters by its URL's project and channels and encodes the event JSON
//!   itself, with its own subscription id (per-subscriber serialization, through herald's own
//!   encoder so the bytes match herald's; `connected` likewise comes from herald's `Session`);
//! - `{"type":"ping"}` answered with `{"type":"pong"}`; WebSocket pings by tungstenite;
//! - an axum admin listener: `POST /v1/events` (reply `{"id":"<ms>-<seq>"}`), `GET /healthz`.
//!
//! A receiver that falls more than `--broadcast-capacity` events behind loses the oldest ones
//! (tokio's `Lagged`): that is what this design does. Losses are counted and printed on stderr
//! at exit, so a benchmark can report them. SIGTERM/SIGINT: stop accepting, send close 1001 to
//! every client, wait up to `--drain-timeout` for them to go, exit 0.
//!
//! Run: `cargo build --release -p herald-loadgen && target/release/naive_server --listen
//! 127.0.0.1:0 --admin 127.0.0.1:0`. A leading `serve` argument is accepted and ignored, so
//! scripts written for `herald serve` work unchanged.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use herald::event::{ANY_ROLE, EncodedEvent, Event, EventIdGenerator, timestamp_now, write_tail};
use herald::protocol::Session;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Descriptors kept for listeners and the runtime, as herald reports its capacity.
const RESERVED_FDS: u64 = 64;

#[derive(Parser)]
#[command(
    name = "naive_server",
    about = "Benchmark baseline: a typical tokio + tokio-tungstenite realtime server"
)]
struct Cli {
    /// Address of the WebSocket listener.
    #[arg(long, default_value = "0.0.0.0:9505")]
    listen: SocketAddr,
    /// Address of the admin HTTP listener (publish API, health).
    #[arg(long, default_value = "127.0.0.1:9506")]
    admin: SocketAddr,
    /// tokio worker threads. Default: one per CPU core.
    #[arg(long)]
    shards: Option<usize>,
    /// Events the broadcast channel holds; a receiver further behind loses the oldest.
    #[arg(long, default_value_t = 1024)]
    broadcast_capacity: usize,
    /// Project used when a client or publisher names none.
    #[arg(long, default_value = "console")]
    default_project: String,
    /// On SIGTERM/SIGINT, how long to wait for clients to finish the close handshake.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    project: Option<String>,
    channels: Vec<String>,
    #[serde(default)]
    events: Vec<String>,
    roles: Option<Vec<String>>,
    payload: Value,
}

struct Shared {
    events: broadcast::Sender<Arc<Event>>,
    /// Held while an event is sent, so ids and delivery order agree.
    ids: Mutex<EventIdGenerator>,
    default_project: String,
    shutdown: watch::Receiver<bool>,
    open: AtomicUsize,
    lagged_events: AtomicU64,
    lag_incidents: AtomicU64,
}

fn main() -> anyhow::Result<()> {
    // `naive_server serve --listen ...` works like `herald serve --listen ...`.
    let args = std::env::args_os()
        .enumerate()
        .filter(|(i, a)| !(*i == 1 && a == "serve"))
        .map(|(_, a)| a);
    let cli = Cli::parse_from(args);
    let threads = cli
        .shards
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let soft = rlimit::Resource::NOFILE
        .get()
        .and_then(|(_, hard)| rlimit::increase_nofile_limit(hard))
        .unwrap_or(1024);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    runtime.block_on(serve(cli, threads, soft.saturating_sub(RESERVED_FDS)))
}

async fn serve(cli: Cli, threads: usize, capacity: u64) -> anyhow::Result<()> {
    let listener = TcpListener::bind(cli.listen).await?;
    let admin = TcpListener::bind(cli.admin).await?;
    let (events, _) = broadcast::channel(cli.broadcast_capacity.max(1));
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        events,
        ids: Mutex::new(EventIdGenerator::default()),
        default_project: cli.default_project.clone(),
        shutdown: stop_rx,
        open: AtomicUsize::new(0),
        lagged_events: AtomicU64::new(0),
        lag_incidents: AtomicU64::new(0),
    });
    // Before the startup line: a SIGTERM right after it must still stop the server cleanly.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    println!(
        "naive_server listening on ws://{}/v1/realtime ({} shards, capacity {} connections, bus: broadcast {}); admin on http://{}",
        listener.local_addr()?,
        threads,
        capacity,
        cli.broadcast_capacity.max(1),
        admin.local_addr()?
    );

    let router = Router::new()
        .route("/v1/events", post(publish))
        .route(
            "/healthz",
            get(|| async { json_reply(StatusCode::OK, json!({"status": "ok"})) }),
        )
        .fallback(|| async {
            json_reply(
                StatusCode::NOT_FOUND,
                json!({"code": 404, "message": "no such admin endpoint"}),
            )
        })
        .with_state(shared.clone());
    let mut admin_stop = shared.shutdown.clone();
    let admin_task = tokio::spawn(async move {
        axum::serve(admin, router)
            .with_graceful_shutdown(async move {
                let _ = admin_stop.changed().await;
            })
            .await
    });

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    tokio::spawn(async move { connection(stream, shared).await });
                }
                // Out of file descriptors, most likely: wait for some to close.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let deadline = Instant::now() + cli.drain_timeout;
    while shared.open.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), admin_task).await;
    eprintln!(
        "naive_server: stopped; {} connections still open at exit; lagged receivers lost {} events ({} lag incidents)",
        shared.open.load(Ordering::Relaxed),
        shared.lagged_events.load(Ordering::Relaxed),
        shared.lag_incidents.load(Ordering::Relaxed),
    );
    Ok(())
}

fn json_reply(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn publish(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let bad = |message: String| {
        json_reply(
            StatusCode::BAD_REQUEST,
            json!({"code": 400, "message": message}),
        )
    };
    let body: PublishBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return bad(format!("invalid body: {e}")),
    };
    if body.channels.is_empty() {
        return bad("channels must not be empty".into());
    }
    if !body.payload.is_object() {
        return bad("payload must be a JSON object".into());
    }
    let mut ids = shared.ids.lock().unwrap_or_else(|e| e.into_inner());
    let id = ids.next_id().to_string();
    let event = Event {
        id: id.clone(),
        project: body
            .project
            .unwrap_or_else(|| shared.default_project.clone()),
        channels: body.channels,
        events: body.events,
        roles: body.roles.unwrap_or_else(|| vec![ANY_ROLE.into()]),
        timestamp: timestamp_now(),
        payload: body.payload,
    };
    // No subscriber at all is not an error.
    let _ = shared.events.send(Arc::new(event));
    drop(ids);
    json_reply(StatusCode::OK, json!({"id": id}))
}

/// Project and channels from the upgrade request, as Appwrite reads them.
fn subscription_of(req: &Request, default_project: &str) -> (String, Vec<String>) {
    let mut project = None;
    let mut channels = Vec::new();
    if let Some(query) = req.uri().query() {
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            if key == "project" {
                project = Some(value.into_owned());
            } else if (key == "channels" || (key.starts_with("channels[") && key.ends_with(']')))
                && !channels.iter().any(|c| c == &value)
            {
                channels.push(value.into_owned());
            }
        }
    }
    if let Some(h) = req
        .headers()
        .get("x-appwrite-project")
        .and_then(|v| v.to_str().ok())
    {
        project = Some(h.to_owned());
    }
    (
        project.unwrap_or_else(|| default_project.to_owned()),
        channels,
    )
}

/// Counts a task as an open connection for as long as it lives.
struct OpenGuard<'a>(&'a AtomicUsize);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(stream: TcpStream, shared: Arc<Shared>) {
    shared.open.fetch_add(1, Ordering::Relaxed);
    let _guard = OpenGuard(&shared.open);
    let _ = stream.set_nodelay(true);
    let mut wanted = None;
    // tungstenite's callback signature, as its documentation shows it.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: WsResponse| -> Result<WsResponse, ErrorResponse> {
        if !req.uri().path().starts_with("/v1/realtime") {
            let mut not_found = ErrorResponse::new(Some("not found".into()));
            *not_found.status_mut() = StatusCode::NOT_FOUND;
            return Err(not_found);
        }
        wanted = Some(subscription_of(req, &shared.default_project));
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let Some((project, channels)) = wanted else {
        return;
    };
    // Subscribe before `connected`, so an event published after it is never missed.
    let mut events = shared.events.subscribe();
    let mut shutdown = shared.shutdown.clone();
    // herald's own session and `connected` message for a guest on the URL's channels.
    let session = Session::new(
        Arc::from(project.as_str()),
        Arc::new(herald::identity::Identity::guest()),
        &channels,
        &mut herald::registry::Registry::default(),
    );
    let url_id = herald::protocol::UrlId::new(rand::random(), 0);
    let subscription = session
        .subscriptions(&url_id)
        .next()
        .map_or_else(String::new, |s| s.id.to_string());
    let connected = session.connected_message(None, None, &url_id);
    if ws.send(Message::text(connected)).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            _ = shutdown.changed() => {
                let _ = ws
                    .send(Message::Close(Some(CloseFrame {
                        code: CloseCode::Away,
                        reason: "server shutting down".into(),
                    })))
                    .await;
                // Wait for the client's close (or the drain deadline, when the process exits).
                while let Some(Ok(_)) = ws.next().await {}
                return;
            }
            received = events.recv() => match received {
                Ok(event) => {
                    let wanted = event.project == project
                        && event.roles.iter().any(|r| r == "any" || r == "guests")
                        && event.channels.iter().any(|c| channels.contains(c));
                    if !wanted {
                        continue;
                    }
                    // Encoded again for every subscriber (only `subscriptions` differs): what
                    // makes this server naive. The encoder is herald's, so the bytes are too.
                    let encoded = EncodedEvent::encode(&event);
                    let mut message = encoded.prefix.to_vec();
                    write_tail(&mut message, std::iter::once(subscription.as_str()));
                    let Ok(message) = String::from_utf8(message) else {
                        continue;
                    };
                    if ws.send(Message::text(message)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(lost)) => {
                    shared.lagged_events.fetch_add(lost, Ordering::Relaxed);
                    shared.lag_incidents.fetch_add(1, Ordering::Relaxed);
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    let reply = match serde_json::from_str::<Value>(&text) {
                        Ok(v) if v["type"] == "ping" => r#"{"type":"pong"}"#,
                        Ok(_) => r#"{"type":"error","data":{"code":1003,"message":"Message type is not valid."}}"#,
                        Err(_) => r#"{"type":"error","data":{"code":1003,"message":"Message format is not valid."}}"#,
                    };
                    if ws.send(Message::text(reply)).await.is_err() {
                        return;
                    }
                }
                // tungstenite answers pings and close frames itself.
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
        }
    }
}
