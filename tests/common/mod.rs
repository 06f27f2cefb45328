//! Test harness: starts real herald processes on loopback and talks to them as clients do.
//! Everything but starting herald itself lives in [`harness`], which the load generator's
//! tests share.
#![allow(dead_code)]

mod harness;

use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

pub use harness::*;

impl Server {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with(extra, |_| {})
    }

    pub fn start_with(extra: &[&str], tweak: impl FnOnce(&mut Command)) -> Self {
        Self::start_at("127.0.0.1:0", "127.0.0.1:0", extra, tweak)
    }

    /// Starts herald on the given addresses: a node that restarts where a proxy expects it.
    pub fn start_at(
        listen: &str,
        admin: &str,
        extra: &[&str],
        tweak: impl FnOnce(&mut Command),
    ) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.args(["serve", "--listen", listen, "--admin", admin])
            .args(extra)
            .env("HERALD_LOG", "warn");
        tweak(&mut cmd);
        let server = Self::spawn(cmd);
        // The suite runs again with HERALD_IO=uring: a silent fallback would test epoll twice.
        if std::env::var("HERALD_IO").is_ok_and(|io| io == "uring") && !extra.contains(&"--io") {
            assert!(
                server.startup_line.contains(" on io_uring"),
                "HERALD_IO=uring, but: {}",
                server.startup_line
            );
        }
        server
    }
}

// Helpers of the Redis and Redis Cluster tests: many clients, and what each must read.

/// Connects `n` small-buffered clients to `url`.
pub async fn clients(url: &str, n: usize) -> Vec<Ws> {
    let config =
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.div_ceil(100) {
        let batch = (0..100.min(n - out.len())).map(|_| {
            let url = url.to_owned();
            async move {
                let (mut ws, _) =
                    tokio_tungstenite::connect_async_with_config(url, Some(config), false)
                        .await
                        .expect("connect");
                assert_eq!(next_json(&mut ws).await["type"], "connected");
                ws
            }
        });
        out.extend(futures_util::future::join_all(batch).await);
    }
    out
}

/// Every client must read exactly `expected` (event ids, in order) and nothing more.
pub async fn assert_all_receive(clients: Vec<Ws>, expected: &[String]) {
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            let expected = expected.to_vec();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while got.len() < expected.len() {
                    match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
                        Ok(Some(Ok(Message::Text(t)))) => {
                            let v: Value = serde_json::from_str(&t).unwrap();
                            assert_eq!(v["type"], "event", "{v}");
                            got.push(v["data"]["id"].as_str().unwrap().to_owned());
                        }
                        Ok(Some(Ok(_))) => {}
                        other => panic!(
                            "stopped after {} of {} events: {other:?}",
                            got.len(),
                            expected.len()
                        ),
                    }
                }
                assert_eq!(got, expected);
                let extra = tokio::time::timeout(Duration::from_millis(300), ws.next()).await;
                assert!(extra.is_err(), "unexpected extra message: {extra:?}");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// The next events `ws` reads are exactly `ids`, in order.
pub async fn expect_events(ws: &mut Ws, ids: &[String]) {
    for id in ids {
        let ev = next_json(ws).await;
        assert_eq!(ev["data"]["id"], id.as_str(), "{ev}");
    }
}

/// Reads `count` events from `ws`; whenever the connection ends, reconnects to `other` with
/// `lastEventId` set to the last id seen (`from` before any). Returns the ids and how many
/// times it reconnected.
pub async fn follow(ws: Ws, other: String, from: String, count: usize) -> (Vec<String>, usize) {
    let mut ws = Some(ws);
    let mut got: Vec<String> = Vec::new();
    let mut reconnects = 0;
    while got.len() < count {
        let conn = match ws.as_mut() {
            Some(c) => c,
            None => {
                reconnects += 1;
                assert!(reconnects < 20, "could not reconnect");
                let url = format!("{other}&lastEventId={}", got.last().unwrap_or(&from));
                match tokio_tungstenite::connect_async(url).await {
                    Ok((mut c, _)) => {
                        assert_eq!(next_json(&mut c).await["type"], "connected");
                        ws.insert(c)
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(30), conn.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v["type"], "event", "{v}");
                got.push(v["data"]["id"].as_str().unwrap().to_owned());
            }
            Ok(Some(Ok(_))) => {}
            Ok(_) => ws = None,
            Err(_) => panic!("no event for 30 s after {}", got.len()),
        }
    }
    (got, reconnects)
}

/// Waits (up to 30 s) until the node's `/readyz` says `ready` or not.
pub fn wait_ready(server: &Server, ready: bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while (server.get("/readyz").0 == 200) != ready {
        assert!(
            std::time::Instant::now() < deadline,
            "node never became {}",
            if ready { "ready" } else { "not ready" }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
