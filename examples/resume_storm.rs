//! Mass-reconnect benchmark (benches/resume.sh), not part of herald.
//!
//! `resume_storm storm --target URL --connections N --expect K`: opens N clients at once, each
//! resuming with the `lastEventId` in the URL, and waits until each has received K replayed
//! events (checked: increasing ids, no duplicates). Prints a JSON summary with the storm's start
//! and end as unix microseconds.
//!
//! `resume_storm probe --probe URL --admin HOST:PORT --seconds S --out FILE`: in its own process,
//! a live client plus a publisher sending an event every 20 ms through the admin API; writes
//! `receive_us latency_us` per event, so the script can compare live latency before and during
//! the storm (replays must not stall live delivery).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Only what the storm checks; serde skips the rest (payload included) without building it.
#[derive(serde::Deserialize)]
struct Incoming {
    #[serde(rename = "type")]
    kind: String,
    data: Option<IncomingData>,
}

#[derive(serde::Deserialize)]
struct IncomingData {
    id: Option<String>,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    match std::env::args().nth(1).as_deref() {
        Some("storm") => storm().await,
        Some("probe") => probe().await,
        _ => anyhow::bail!("usage: resume_storm storm|probe ..."),
    }
}

async fn probe() -> anyhow::Result<()> {
    let probe_url = arg("--probe").ok_or_else(|| anyhow::anyhow!("--probe URL"))?;
    let admin = arg("--admin").ok_or_else(|| anyhow::anyhow!("--admin HOST:PORT"))?;
    let out = arg("--out").ok_or_else(|| anyhow::anyhow!("--out FILE"))?;
    let seconds: u64 = arg("--seconds").unwrap_or_else(|| "30".into()).parse()?;
    let (mut probe, _) = tokio_tungstenite::connect_async(&probe_url).await?;
    probe.next().await; // connected
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let agent = ureq::Agent::new_with_defaults();
            while !stop.load(Ordering::Relaxed) {
                let body = format!(
                    r#"{{"project":"p","channels":["probe"],"payload":{{"sent_us":{}}}}}"#,
                    now_us()
                );
                let _ = agent
                    .post(&format!("http://{admin}/v1/events"))
                    .header("content-type", "application/json")
                    .send(body);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut lines = String::new();
    while Instant::now() < deadline {
        let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_millis(200), probe.next()).await
        else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
        if let Some(sent) = v["data"]["payload"]["sent_us"].as_u64() {
            let now = now_us();
            lines.push_str(&format!("{now} {}\n", now.saturating_sub(sent)));
        }
    }
    stop.store(true, Ordering::Relaxed);
    publisher.await?;
    std::fs::write(out, lines)?;
    Ok(())
}

async fn storm() -> anyhow::Result<()> {
    let target = arg("--target").ok_or_else(|| anyhow::anyhow!("--target URL with lastEventId"))?;
    let n: usize = arg("--connections")
        .unwrap_or_else(|| "1000".into())
        .parse()?;
    let expect: usize = arg("--expect").unwrap_or_else(|| "100".into()).parse()?;
    let inflight: usize = arg("--inflight").unwrap_or_else(|| "2000".into()).parse()?;
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let started_us = now_us();
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(inflight));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = permits.clone().acquire_owned().await?;
        let url = target.clone();
        tasks.push(tokio::spawn(async move {
            // Many source addresses, so repeated runs do not exhaust ephemeral ports.
            let source = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % 59) as u8);
            let ws_addr: std::net::SocketAddr = url
                .trim_start_matches("ws://")
                .split('/')
                .next()
                .and_then(|a| a.parse().ok())
                .ok_or("target must be ws://IP:PORT/...")?;
            let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
            sock.bind((source, 0).into())
                .map_err(|e| format!("bind {source}: {e}"))?;
            let stream = sock
                .connect(ws_addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let (mut ws, _) =
                tokio_tungstenite::client_async_with_config(url, stream, Some(config))
                    .await
                    .map_err(|e| format!("upgrade: {e}"))?;
            drop(permit);
            let mut last = String::new();
            let mut got = 0;
            while got < expect {
                let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
                    .await
                    .map_err(|_| format!("stalled after {got} events"))?
                    .ok_or("closed")?
                    .map_err(|e| e.to_string())?;
                let Message::Text(t) = msg else { continue };
                let m: Incoming = serde_json::from_str(&t).map_err(|e| e.to_string())?;
                match m.kind.as_str() {
                    "event" => {
                        let id = m.data.and_then(|d| d.id).unwrap_or_default();
                        let key = |s: &str| {
                            s.split_once('-').map(|(a, b)| {
                                (a.parse::<u64>().unwrap_or(0), b.parse::<u64>().unwrap_or(0))
                            })
                        };
                        if !last.is_empty() && key(&id) <= key(&last) {
                            return Err(format!("out of order or duplicate: {id} after {last}"));
                        }
                        last = id;
                        got += 1;
                    }
                    "error" => return Err(format!("error: {t}")),
                    _ => {}
                }
            }
            Ok::<(Duration, tokio_tungstenite::WebSocketStream<_>), String>((started.elapsed(), ws))
        }));
    }
    let mut done = Vec::with_capacity(n);
    let mut failures = Vec::new();
    let mut keep = Vec::with_capacity(n);
    for t in tasks {
        match t.await? {
            Ok((d, ws)) => {
                done.push(d.as_micros() as u64);
                keep.push(ws);
            }
            Err(e) => failures.push(e),
        }
    }
    let all_live = started.elapsed();
    drop(keep);
    done.sort_unstable();
    failures.truncate(5);
    println!(
        "{}",
        serde_json::json!({
            "connections": n, "expected_events_each": expect, "completed": done.len(),
            "failures": failures,
            "started_us": started_us, "ended_us": started_us + all_live.as_micros() as u64,
            "all_live_ms": all_live.as_millis(),
            "live_at_ms": {"p50": percentile(&done, 0.5) / 1000, "p99": percentile(&done, 0.99) / 1000, "max": done.last().copied().unwrap_or(0) / 1000},
        })
    );
    Ok(())
}
