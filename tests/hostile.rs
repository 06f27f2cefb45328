//! What a hostile or careless peer gets from herald, over real sockets: each test names the
//! attack, asserts the answer the attacker sees, and that nobody else's events are affected.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Server, Ws, connect, connect_with_header, expect_close, next_json, next_json_within, send,
};
use serde_json::{Value, json};

const TOKEN: &str = "s3cret-admin-token-for-tests";

/// One admin request with the given headers; returns the status, the headers' values for
/// `WWW-Authenticate`, and the body.
fn admin(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Option<String>, String) {
    let url = format!("http://{}{}", server.admin, path);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = if method == "POST" {
        let mut req = agent.post(&url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send(body)
    } else {
        let mut req = agent.get(&url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.call()
    }
    .expect("admin reachable");
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (resp.status().as_u16(), challenge, text)
}

fn event(n: u32) -> String {
    json!({"project": "p", "channels": ["c"], "payload": {"n": n}}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_cannot_publish_with_a_simple_text_plain_post() {
    let server = Server::start(&[]);
    let (mut ws, _) = connect(&server.url("/v1/realtime?project=p&channels[]=c")).await;
    // What a cross-site form or fetch without a preflight sends.
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let (status, _, body) = admin(
            &server,
            "POST",
            "/v1/events",
            &[("content-type", content_type)],
            &event(0),
        );
        assert_eq!(status, 415, "{content_type}: {body}");
        assert!(body.contains("application/json"), "{body}");
    }
    let (status, _, _) = admin(&server, "POST", "/v1/events", &[], &event(0));
    assert_eq!(status, 415, "no content type at all");
    assert_eq!(
        next_json_within(&mut ws, Duration::from_millis(300)).await,
        None,
        "nothing was published"
    );
    let (status, _, _) = admin(
        &server,
        "POST",
        "/v1/events",
        &[("content-type", "Application/JSON; charset=utf-8")],
        &event(1),
    );
    assert_eq!(status, 200);
    assert_eq!(next_json(&mut ws).await["data"]["payload"]["n"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_admin_token_publishing_and_metrics_need_it_and_health_stays_open() {
    let server = Server::start(&["--admin-token", TOKEN]);
    let (mut ws, _) = connect(&server.url("/v1/realtime?project=p&channels[]=c")).await;
    let json_type = ("content-type", "application/json");
    let wrong = format!("Bearer {TOKEN}x");
    for auth in [None, Some(wrong.as_str()), Some(TOKEN)] {
        let mut headers = vec![json_type];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        let (status, challenge, body) = admin(&server, "POST", "/v1/events", &headers, &event(0));
        assert_eq!(status, 401, "{auth:?}: {body}");
        assert_eq!(challenge.as_deref(), Some("Bearer"));
    }
    let (status, _, _) = admin(&server, "GET", "/metrics", &[], "");
    assert_eq!(status, 401);
    for open in ["/healthz", "/readyz"] {
        assert_eq!(admin(&server, "GET", open, &[], "").0, 200, "{open}");
    }
    assert_eq!(
        next_json_within(&mut ws, Duration::from_millis(300)).await,
        None,
        "nothing was published without the token"
    );

    let bearer = format!("Bearer {TOKEN}");
    let auth = ("authorization", bearer.as_str());
    let (status, _, body) = admin(&server, "POST", "/v1/events", &[json_type, auth], &event(7));
    assert_eq!(status, 200, "{body}");
    assert_eq!(next_json(&mut ws).await["data"]["payload"]["n"], 7);
    let (status, _, metrics) = admin(&server, "GET", "/metrics", &[auth], "");
    assert_eq!(status, 200);
    assert!(metrics.contains("herald_events_published_total"));

    // `herald publish` takes the token from the same variable the server reads.
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["publish", "--admin", &server.admin.to_string()])
        .args([
            "--project",
            "p",
            "--channel",
            "c",
            "--payload",
            r#"{"n":8}"#,
        ])
        .env("HERALD_ADMIN_TOKEN", TOKEN)
        .output()
        .expect("run herald publish");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(next_json(&mut ws).await["data"]["payload"]["n"], 8);
}

#[test]
fn an_admin_listener_on_a_public_address_needs_a_token() {
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["serve", "--listen", "127.0.0.1:0", "--admin", "0.0.0.0:0"])
            .args(extra)
            .env("HERALD_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn herald")
    };
    let out = run(&[]).wait_with_output().expect("herald exits");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--admin-token"), "{err}");

    let short = run(&["--admin-token", "short"])
        .wait_with_output()
        .expect("herald exits");
    assert!(!short.status.success());
    assert!(String::from_utf8_lossy(&short.stderr).contains("at least 16 characters"));

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--admin", "0.0.0.0:0"])
        .args(["--admin-token", TOKEN])
        .env("HERALD_LOG", "warn");
    let mut server = Server::spawn(cmd);
    assert_eq!(
        admin(&server, "GET", "/healthz", &[], "").0,
        200,
        "starts with a token"
    );
    server.sigterm();
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_with_too_many_or_too_long_names_are_refused() {
    let server = Server::start(&[]);
    let many: Vec<String> = (0..101).map(|i| format!("c{i}")).collect();
    let long = "x".repeat(257);
    for (body, words) in [
        (
            json!({"channels": many, "payload": {}}),
            "at most 100 names",
        ),
        (
            json!({"channels": [long], "payload": {}}),
            "1 to 256 visible",
        ),
        (
            json!({"channels": ["a b"], "payload": {}}),
            "1 to 256 visible",
        ),
        (
            json!({"project": "x".repeat(37), "channels": ["c"], "payload": {}}),
            "at most 36 characters",
        ),
        (
            json!({"channels": ["c"], "roles": many, "payload": {}}),
            "roles must list at most 100",
        ),
    ] {
        let (status, reply) = server.publish_raw(&body.to_string());
        assert_eq!(status, 400);
        let message = reply["message"].as_str().unwrap_or_default().to_owned();
        assert!(message.contains(words), "{message}");
    }
    let ok: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
    let (status, reply): (u16, Value) =
        server.publish_raw(&json!({"channels": ok, "payload": {}}).to_string());
    assert_eq!(status, 200, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_or_malformed_project_is_refused_before_anything_is_indexed() {
    let server = Server::start(&["--shards", "1"]);
    let url = server.url("/v1/realtime?channels[]=c");
    for project in ["x".repeat(60_000), "has space".into(), "-leading".into()] {
        let (mut ws, error) = connect_with_header(&url, "x-appwrite-project", &project).await;
        assert_eq!(error["type"], "error", "{project:.20}");
        assert_eq!(error["data"]["code"], 1008);
        let message = error["data"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("at most 36 characters"), "{message}");
        assert_eq!(expect_close(&mut ws, Duration::from_secs(5)).await, 1008);
    }
    assert_eq!(
        server.metric_with("herald_handshake_rejected_total", "invalid_project"),
        3.0
    );
    // The same rule for the query, and a good project still works.
    let (_, error) = connect_with_header(&server.url("/v1/realtime?project=a%20b"), "x", "y").await;
    assert_eq!(error["data"]["code"], 1008);
    let (_, connected) = connect(&server.url("/v1/realtime?project=p.1-x_y&channels[]=c")).await;
    assert_eq!(connected["data"]["channels"], json!(["c"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_url_channels_or_bad_names_are_refused_with_1008() {
    let server = Server::start(&[]);
    // As many as fit in a URL the client library accepts (its limit is 64 KiB).
    let many: String = (0..3000).map(|i| format!("&channels[]=c{i}")).collect();
    for query in [many.as_str(), "&channels[]=tab%09here", "&channels[]=a%20b"] {
        let url = server.url(&format!("/v1/realtime?project=p{query}"));
        let (mut ws, error) = connect_with_header(&url, "x", "y").await;
        assert_eq!(error["data"]["code"], 1008, "{error}");
        let message = error["data"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("Too many or invalid channels"),
            "{message}"
        );
        assert_eq!(expect_close(&mut ws, Duration::from_secs(5)).await, 1008);
    }
    // 100 distinct channels (the default limit), some repeated, are fine.
    let hundred: String = (0..100)
        .chain(0..10)
        .map(|i| format!("&channels[]=c{i}"))
        .collect();
    let (_, connected) = connect(&server.url(&format!("/v1/realtime?project=p{hundred}"))).await;
    assert_eq!(
        connected["data"]["channels"].as_array().map(Vec::len),
        Some(100)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_last_event_id_is_not_echoed_back() {
    let server = Server::start(&[]);
    let junk = "9".repeat(10_000);
    let url = server.url(&format!(
        "/v1/realtime?project=p&channels[]=c&lastEventId={junk}"
    ));
    let (mut ws, _) = connect(&url).await;
    let error = next_json(&mut ws).await;
    assert_eq!(error["data"]["code"], 4011);
    let message = error["data"]["message"].as_str().unwrap_or_default();
    assert!(message.len() < 200, "{} bytes", message.len());
    // The connection stays, live.
    let id = server.publish(json!({"project": "p", "channels": ["c"], "payload": {}}));
    assert_eq!(next_json(&mut ws).await["data"]["id"], id);
}

/// `rows` subscriptions of `per_row` distinct channels each, ids `s{first}`...
fn subscribe_message(first: usize, rows: usize, per_row: usize) -> String {
    let rows: Vec<Value> = (first..first + rows)
        .map(|s| {
            let channels: Vec<String> = (0..per_row).map(|c| format!("{s}.{c}")).collect();
            json!({"subscriptionId": format!("s{s}"), "channels": channels})
        })
        .collect();
    json!({"type": "subscribe", "data": rows}).to_string()
}

/// Sends a ping and returns how long the pong took.
async fn ping_time(ws: &mut Ws) -> Duration {
    let start = Instant::now();
    send(ws, r#"{"type":"ping"}"#).await;
    assert_eq!(next_json(ws).await["type"], "pong");
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_subscription_set_costs_the_shard_milliseconds_not_seconds() {
    // One shard: the attacker and the victim share its thread. The limits are raised ten times
    // over the defaults (1,000 channels per connection), to show that even then a subscribe
    // costs milliseconds.
    let server = Server::start(&[
        "--shards",
        "1",
        "--message-rate",
        "0",
        "--message-bytes-rate",
        "0",
        "--max-channels-per-connection",
        "10000",
    ]);
    let (mut victim, _) = connect(&server.url("/v1/realtime?project=p&channels[]=v")).await;
    let (mut attacker, _) = connect(&server.url("/v1/realtime?project=p")).await;
    // 100 subscriptions of 100 distinct channels: the most the default limits allow.
    for first in (0..100).step_by(10) {
        send(&mut attacker, &subscribe_message(first, 10, 100)).await;
        assert_eq!(next_json(&mut attacker).await["type"], "response");
    }
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        // A no-op upsert of ten of them: every channel set is recomputed and re-indexed.
        let start = Instant::now();
        send(&mut attacker, &subscribe_message(0, 10, 100)).await;
        let victim_wait = ping_time(&mut victim).await;
        assert_eq!(next_json(&mut attacker).await["type"], "response");
        slowest = slowest.max(start.elapsed()).max(victim_wait);
    }
    assert!(
        slowest < Duration::from_millis(250),
        "a subscribe over 10,000 channels held the shard for {slowest:?}"
    );
    let id = server.publish(json!({"project": "p", "channels": ["v", "99.99"], "payload": {}}));
    assert_eq!(next_json(&mut victim).await["data"]["id"], id);
    let event = next_json(&mut attacker).await;
    assert_eq!(event["data"]["subscriptions"], json!(["s99"]));
}

#[test]
fn a_second_signal_exits_at_once_even_while_clients_hold_the_drain() {
    let mut server = Server::start(&["--drain-timeout", "60s"]);
    // A client that upgrades and then never reads nor answers the close handshake.
    let _stuck = common::RawClient::upgrade(server.ws, "/v1/realtime?project=p&channels[]=c");
    std::thread::sleep(Duration::from_millis(200));
    server.sigterm();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        server.wait_exit(Duration::from_millis(10)).is_none(),
        "the first signal drains"
    );
    let start = Instant::now();
    server.sigterm();
    let status = server
        .wait_exit(Duration::from_secs(3))
        .expect("a second signal ends the process at once");
    assert!(!status.success(), "{status:?}");
    assert!(start.elapsed() < Duration::from_secs(3));
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_that_declare_much_and_send_little_hold_little_and_are_closed_with_1008() {
    const ATTACKERS: usize = 400;
    let server = Server::start(&["--message-timeout", "1s"]);
    let (mut victim, _) = connect(&server.url("/v1/realtime?project=p&channels[]=c")).await;
    let before = rss_bytes(server.pid());
    let frame = herald::ws::decoder::encode_client_frame(true, 1, &[b'x'; 64_000], [1, 2, 3, 4]);
    let mut attackers: Vec<common::RawClient> = (0..ATTACKERS)
        .map(|_| {
            let mut c =
                common::RawClient::upgrade(server.ws, "/v1/realtime?project=p&channels[]=c");
            assert_eq!(c.read_json()["type"], "connected");
            c.write(&frame[..20]);
            c
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let growth = rss_bytes(server.pid()).saturating_sub(before);
    assert!(
        growth < (ATTACKERS * 16 * 1024) as u64,
        "{} bytes per attacker",
        growth / ATTACKERS as u64
    );
    // Meanwhile the victim gets its events.
    let id = server.publish(json!({"project": "p", "channels": ["c"], "payload": {}}));
    assert_eq!(next_json(&mut victim).await["data"]["id"], id);
    // Each attacker is closed with 1008 once the message timeout passed, its event before it.
    let codes = tokio::task::spawn_blocking(move || {
        attackers
            .iter_mut()
            .map(|a| {
                a.stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                a.read_close_code()
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(codes.iter().all(|c| *c == Some(1008)), "{codes:?}");
}

#[test]
fn only_allowed_browser_origins_may_connect() {
    let server = Server::start(&[
        "--allowed-origins",
        "https://app.example.com,https://*.example.org",
    ]);
    let upgrade = |origin: Option<&str>| {
        let mut c = common::RawClient::tcp(server.ws);
        let origin = origin
            .map(|o| format!("Origin: {o}\r\n"))
            .unwrap_or_default();
        c.write(
            format!(
                "GET /v1/realtime?project=p&channels[]=c HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\n{origin}\r\n"
            )
            .as_bytes(),
        );
        c.read_http_head()
    };
    for allowed in [
        Some("https://app.example.com"),
        Some("https://eu.app.example.org"),
        None,
    ] {
        let head = upgrade(allowed);
        assert!(head.starts_with("HTTP/1.1 101"), "{allowed:?}: {head}");
    }
    for refused in [
        "https://evil.example",
        "http://app.example.com",
        "https://example.org",
        "null",
    ] {
        let head = upgrade(Some(refused));
        assert!(head.starts_with("HTTP/1.1 403"), "{refused}: {head}");
    }
    assert_eq!(
        server.metric_with("herald_handshake_rejected_total", "origin"),
        4.0
    );

    let bad = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--allowed-origins", "example.com"])
        .output()
        .expect("run herald");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected scheme://host"));
}

#[test]
fn one_address_gets_429_beyond_its_connections_or_handshake_rate_and_others_do_not() {
    let server = Server::start(&["--max-connections-per-ip", "5", "--handshakes-per-ip", "0"]);
    let path = "/v1/realtime?project=p&channels[]=c";
    let held: Vec<common::RawClient> = (0..5)
        .map(|_| common::RawClient::upgrade(server.ws, path))
        .collect();
    let mut sixth = common::RawClient::tcp(server.ws);
    sixth.send_upgrade(path);
    let head = sixth.read_http_head();
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    // Another source address is not affected.
    let mut from_other = common::RawClient::tcp_from(server.ws, "127.0.0.2");
    from_other.send_upgrade(path);
    assert!(from_other.read_http_head().starts_with("HTTP/1.1 101"));
    // Closing one frees its place.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = common::RawClient::tcp(server.ws);
        again.send_upgrade(path);
        if again.read_http_head().starts_with("HTTP/1.1 101") {
            break;
        }
        assert!(Instant::now() < deadline, "places were not freed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.metric_with("herald_handshake_rejected_total", "ip_connections") >= 1.0);

    let rated = Server::start(&["--handshakes-per-ip", "1"]);
    // A burst of ten seconds' worth, then 429.
    let mut codes = Vec::new();
    for _ in 0..12 {
        let mut c = common::RawClient::tcp(rated.ws);
        c.send_upgrade(path);
        codes.push(c.read_http_head()[9..12].to_owned());
    }
    assert_eq!(
        codes.iter().filter(|c| *c == "101").count(),
        10,
        "{codes:?}"
    );
    assert_eq!(codes.last().map(String::as_str), Some("429"));
}

#[test]
fn behind_a_trusted_proxy_each_forwarded_client_address_has_its_own_limit() {
    // The test connects from 127.0.0.1, standing in for a proxy that appends the address it saw
    // (HAProxy `option forwardfor`, nginx `$proxy_add_x_forwarded_for`).
    let server = Server::start(&[
        "--trusted-proxies",
        "127.0.0.1/32",
        "--max-connections-per-ip",
        "2",
        "--handshakes-per-ip",
        "0",
    ]);
    let through_proxy = |forwarded: &str| {
        let mut c = common::RawClient::tcp(server.ws);
        c.write(
            format!(
                "GET /v1/realtime?project=p&channels[]=c HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\n{forwarded}\r\n"
            )
            .as_bytes(),
        );
        let head = c.read_http_head();
        (head[9..12].to_owned(), c)
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        let (status, c) = through_proxy("X-Forwarded-For: 203.0.113.7\r\n");
        assert_eq!(status, "101");
        held.push(c);
    }
    // The third from that client is refused, whatever it writes further left.
    let (status, _) = through_proxy("X-Forwarded-For: 198.51.100.1, 203.0.113.7\r\n");
    assert_eq!(status, "429");
    let (status, _) =
        through_proxy("X-Forwarded-For: 198.51.100.1\r\nX-Forwarded-For: 203.0.113.7\r\n");
    assert_eq!(status, "429");
    // Other clients of the same proxy are not affected, nor is the proxy's own traffic.
    for forwarded in [
        "X-Forwarded-For: 203.0.113.8\r\n",
        "X-Forwarded-For: 2001:db8::1\r\n",
        "",
    ] {
        let (status, c) = through_proxy(forwarded);
        assert_eq!(status, "101", "{forwarded}");
        held.push(c);
    }
    assert_eq!(
        server.metric_with("herald_handshake_rejected_total", "ip_connections"),
        2.0
    );
    // A client's places come back when its connections close.
    held.drain(..2);
    let deadline = Instant::now() + Duration::from_secs(5);
    while through_proxy("X-Forwarded-For: 203.0.113.7\r\n").0 != "101" {
        assert!(Instant::now() < deadline, "places were not freed");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Without --trusted-proxies the header is the client's own words and changes nothing.
    let direct = Server::start(&["--max-connections-per-ip", "1", "--handshakes-per-ip", "0"]);
    let mut first = common::RawClient::tcp(direct.ws);
    first.send_upgrade("/v1/realtime?project=p&channels[]=c");
    assert!(first.read_http_head().starts_with("HTTP/1.1 101"));
    let mut second = common::RawClient::tcp(direct.ws);
    second.write(
        b"GET /v1/realtime?project=p HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n",
    );
    assert!(second.read_http_head().starts_with("HTTP/1.1 429"));
}

/// A valid realtime `ping` message padded to about `len` bytes, as one masked frame.
fn padded_ping_frame(len: usize) -> Vec<u8> {
    let text = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(len));
    herald::ws::decoder::encode_client_frame(true, 1, text.as_bytes(), [1, 2, 3, 4])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_buffered_cap_the_largest_unfinished_messages_are_closed_with_1009() {
    const BIG: usize = 100;
    const SMALL: usize = 10;
    const CAP: usize = 4_000_000;
    let server = Server::start(&[
        "--shards",
        "1",
        "--max-buffered-bytes",
        &CAP.to_string(),
        "--message-timeout",
        "60s",
    ]);
    let (mut victim, _) = connect(&server.url("/v1/realtime?project=p&channels[]=c")).await;
    let frame = padded_ping_frame(63_000);
    let open = |sent: usize| {
        let mut c = common::RawClient::upgrade(server.ws, "/v1/realtime?project=p&channels[]=c");
        assert_eq!(c.read_json()["type"], "connected");
        c.write(&frame[..sent]);
        c
    };
    // Small holders first: they must outlive every big one.
    let mut small: Vec<_> = (0..SMALL).map(|_| open(1_000)).collect();
    // 100 x 60 KB of unfinished messages: 6 MB against a 4 MB cap.
    let mut big: Vec<_> = (0..BIG).map(|_| open(60_000)).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (small, codes) = tokio::task::spawn_blocking(move || {
        let codes: Vec<Option<u16>> = big
            .iter_mut()
            .map(|c| {
                c.stream
                    .set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                c.read_close_code()
            })
            .collect();
        // The small ones finish their message and get their answer.
        for c in &mut small {
            c.write(&frame[1_000..]);
            assert_eq!(c.read_json()["type"], "pong");
        }
        (small, codes)
    })
    .await
    .unwrap();
    let closed = codes.iter().filter(|c| **c == Some(1009)).count();
    // Shed as they came, each time down to three quarters of the cap: at least the
    // (6 - 4) MB / 60 KB beyond the cap, never everyone.
    assert!((30..BIG).contains(&closed), "{closed} closed: {codes:?}");
    assert!(
        codes.iter().all(|c| c.is_none() || *c == Some(1009)),
        "{codes:?}"
    );
    assert_eq!(
        server.metric_with("herald_memory_shed_total", "1009"),
        closed as f64
    );
    let id = server.publish(json!({"project": "p", "channels": ["c"], "payload": {}}));
    assert_eq!(next_json(&mut victim).await["data"]["id"], id);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(server.metric("herald_buffered_bytes") <= CAP as f64);
    drop(small);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_buffered_cap_clients_that_do_not_read_are_closed_with_1013() {
    // Only the shard's cap (1 MB) applies: the per-connection bound is 64 MiB, the message
    // rates are off, and the kernel keeps little for each socket (4 KiB send buffers).
    let server = Server::start(&[
        "--shards",
        "1",
        "--max-buffered-bytes",
        "1000000",
        "--max-outbound-bytes",
        "67108864",
        "--send-buffer-bytes",
        "4096",
        "--message-rate",
        "0",
        "--message-bytes-rate",
        "0",
    ]);
    let (mut victim, _) = connect(&server.url("/v1/realtime?project=p&channels[]=c")).await;
    // Each stalled client asks for answers it never reads: 10 subscribe responses of ~25 KB
    // (its own memory; event bodies, shared by all subscribers, are not counted).
    let channels: Vec<String> = (0..100)
        .map(|n| format!("{n:0>3}{}", "x".repeat(240)))
        .collect();
    let ask = json!({"type": "subscribe", "data": [{"subscriptionId": "s", "channels": channels}]})
        .to_string();
    let stalled: Vec<common::RawClient> = (0..5)
        .map(|_| {
            let mut c = common::RawClient::tcp_with_recv_buffer(server.ws, 4096);
            c.send_upgrade("/v1/realtime?project=p&channels[]=c");
            assert!(c.read_http_head().starts_with("HTTP/1.1 101"));
            for _ in 0..10 {
                c.send_frame(true, 1, ask.as_bytes());
            }
            c
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.metric_with("herald_memory_shed_total", "1013") < 1.0 {
        assert!(Instant::now() < deadline, "nobody was shed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The victim, which reads, is not among them and gets its events.
    let id = server.publish(json!({"project": "p", "channels": ["c"], "payload": {}}));
    let got = next_json(&mut victim).await;
    assert_eq!(got["data"]["id"], id, "{got}");
    // All of them read at once: a shed client's close frame waits behind what its full socket
    // holds, and goes only if the client reads before the close deadline (5 s), while each of
    // the others takes a read timeout to find that nothing closes it.
    let readers: Vec<_> = stalled
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                c.stream
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                c.read_close_code()
            })
        })
        .collect();
    let codes: Vec<Option<u16>> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let told = codes.iter().filter(|&&c| c == Some(1013)).count();
    let shed = server.metric_with("herald_memory_shed_total", "1013");
    assert!(told >= 1 && told as f64 == shed, "{codes:?}, {shed} shed");
}

#[test]
fn a_flood_of_refused_connections_does_not_take_the_slots_of_others() {
    common::raise_fd_limit();
    // Room for 400 connections; the flooding address may hold 5 of them.
    let server = Server::start(&[
        "--shards",
        "1",
        "--max-connections",
        "400",
        "--max-connections-per-ip",
        "5",
        "--handshakes-per-ip",
        "0",
    ]);
    let path = "/v1/realtime?project=p&channels[]=c";
    // 1,000 connections that ask and then neither read their 429 nor hang up.
    let flood: Vec<std::net::TcpStream> = (0..1000)
        .map(|_| {
            let mut c = common::RawClient::tcp(server.ws);
            c.send_upgrade(path);
            c.stream
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    // Once most of the room could be taken by refusals (they linger to be read)...
    while server.metric_with("herald_handshake_rejected_total", "ip_connections") < 400.0 {
        assert!(Instant::now() < deadline, "the flood was not refused");
        std::thread::sleep(Duration::from_millis(20));
    }
    // ...someone else connects at once, while the flood still holds its sockets.
    let mut other = common::RawClient::tcp_from(server.ws, "127.0.0.2");
    let start = Instant::now();
    other.send_upgrade(path);
    let head = other
        .poll_http_head(Duration::from_secs(5))
        .unwrap_or_default();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    assert!(server.metric("herald_connections") <= 5.0 + 256.0 + 1.0);
    drop(flood);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_before_the_kernel_holds_megabytes_for_it() {
    // Default settings: SO_SNDBUF 128 KiB (256 KiB in the kernel), 1 MiB outbound queue. With
    // the kernel's autotuning instead (--send-buffer-bytes 0) the 2 MB below would sit in the
    // kernel and nobody would be closed.
    let server = Server::start(&["--shards", "1"]);
    let (mut victim, _) = connect(&server.url("/v1/realtime?project=p&channels[]=c")).await;
    // A reader that stopped, with a small receive buffer of its own.
    let mut stalled = common::RawClient::tcp_with_recv_buffer(server.ws, 4096);
    stalled.send_upgrade("/v1/realtime?project=p&channels[]=c");
    assert!(stalled.read_http_head().starts_with("HTTP/1.1 101"));
    let reader = tokio::spawn(async move {
        for _ in 0..100 {
            assert_eq!(next_json(&mut victim).await["type"], "event");
        }
    });
    // 100 events of 20 KB: 2 MB for each subscriber.
    let pad = "z".repeat(20_000);
    for n in 0..100 {
        server.publish(json!({"project": "p", "channels": ["c"], "payload": {"n": n, "pad": pad}}));
    }
    reader.await.unwrap();
    assert_eq!(server.metric("herald_slow_consumers_total"), 1.0);
    let code = tokio::task::spawn_blocking(move || stalled.read_close_code())
        .await
        .unwrap();
    assert_eq!(code, Some(1013));
}
