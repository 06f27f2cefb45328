//! What operators look at: the dashboard's page and stats, the Grafana dashboard's metrics, the
//! Redis readers' lag, and `herald doctor` on this machine. (The page itself is driven in a real
//! browser by tests/dashboard/dashboard.mjs.)

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const TOKEN: &str = "operator-test-admin-token";

fn get_with(
    server: &Server,
    path: &str,
    token: Option<&str>,
) -> (u16, String, Vec<(String, String)>) {
    let mut req = ureq::get(&format!("http://{}{}", server.admin, path))
        .config()
        .http_status_as_error(false)
        .build();
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let mut resp = req.call().expect("admin reachable");
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let status = resp.status().as_u16();
    (
        status,
        resp.body_mut().read_to_string().expect("body"),
        headers,
    )
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

/// The sum of a family's series in a `/v1/stats` answer.
fn stat(stats: &Value, name: &str) -> f64 {
    stats["metrics"][name]["series"]
        .as_array()
        .map_or(0.0, |s| s.iter().filter_map(|x| x["value"].as_f64()).sum())
}

#[tokio::test]
async fn the_dashboard_is_served_self_contained_and_its_stats_need_the_token() {
    let server = Server::start(&["--shards", "2", "--admin-token", TOKEN]);
    let (status, page, headers) = get_with(&server, "/", None);
    assert_eq!(status, 200);
    assert!(header(&headers, "content-type").starts_with("text/html"));
    let policy = header(&headers, "content-security-policy");
    assert!(
        policy.contains("default-src 'none'") && policy.contains("script-src 'self'"),
        "{policy}"
    );
    // Nothing from elsewhere: no CDN, no external font or script.
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "{page}"
    );
    for asset in ["/dashboard.js", "/dashboard.css"] {
        assert!(page.contains(asset), "the page does not load {asset}");
        let (status, body, headers) = get_with(&server, asset, None);
        assert_eq!(status, 200, "{asset}");
        assert!(!body.is_empty());
        assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
        assert!(!body.contains("https://"), "{asset} reaches out");
    }

    let (status, body, _) = get_with(&server, "/v1/stats", None);
    assert_eq!(status, 401, "{body}");
    let (status, _, _) = get_with(&server, "/v1/stats", Some("wrong-token-of-some-length"));
    assert_eq!(status, 401);

    let _clients = clients(&server.url("/v1/realtime?project=p&channels[]=c"), 7).await;
    let (status, body, headers) = get_with(&server, "/v1/stats", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "cache-control"), "no-store");
    let stats: Value = serde_json::from_str(&body).expect("stats are JSON");
    assert_eq!(stat(&stats, "herald_connections"), 7.0, "{body}");
    assert_eq!(
        stats["metrics"]["herald_connections"]["series"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert_eq!(stats["bus"], json!({"name": "embedded", "ready": true}));
    assert_eq!(stats["draining"], false);
    assert!(stat(&stats, "herald_resident_memory_bytes") > 1e6, "{body}");
    // The same counters as /metrics.
    let (_, text, _) = get_with(&server, "/metrics", Some(TOKEN));
    assert!(
        text.contains("herald_connections_accepted_total{shard="),
        "{text}"
    );
    assert_eq!(stat(&stats, "herald_connections_accepted_total"), 7.0);
}

/// Every name a query of docker/grafana/herald.json uses.
fn dashboard_metrics() -> BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docker/grafana/herald.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("herald.json"))
            .expect("herald.json is JSON");
    let mut exprs = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    assert!(
        exprs.len() >= 10,
        "only {} queries in herald.json",
        exprs.len()
    );
    let mut names = BTreeSet::new();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(at) = rest.find("herald_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_grafana_dashboard_queries_exists() {
    let redis = RedisServer::start(&[]);
    let url = redis.url();
    let server = Server::start(&["--shards", "2", "--redis", &url]);
    wait_ready(&server, true);
    // What some series need before they exist: a delivery, a refused handshake, a protocol error.
    let (mut ws, _) = connect(&server.url("/v1/realtime?project=p&channels[]=c")).await;
    server.publish(json!({"project": "p", "channels": ["c"], "payload": {"n": 1}}));
    assert_eq!(next_json(&mut ws).await["data"]["payload"]["n"], 1);
    let mut refused = RawClient::tcp(server.ws);
    refused.send_upgrade("/no/such/path");
    let _ = refused.read_http_head();
    let mut bad = RawClient::upgrade(server.ws, "/v1/realtime?project=p&channels[]=c");
    bad.send_frame(true, 0x3, b"reserved opcode");
    assert!(bad.read_close_code().is_some());

    let wanted = dashboard_metrics();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = server.get("/metrics");
        let exposed: BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split([' ', '{']).next())
            .collect();
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|n| !exposed.contains(n.as_str()))
            .collect();
        if missing.is_empty() {
            break;
        }
        // The lag series appear with the first sample, a second after the reader starts.
        assert!(
            Instant::now() < deadline,
            "herald.json queries metrics /metrics does not have: {missing:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test]
async fn the_readers_lag_is_zero_once_they_have_read_everything() {
    let redis = RedisServer::start(&[]);
    let url = redis.url();
    let server = Server::start(&["--shards", "2", "--redis", &url]);
    wait_ready(&server, true);
    for n in 0..300 {
        redis.xadd(
            "herald:events",
            &[
                ("project", "p"),
                ("channels", r#"["c"]"#),
                ("payload", &format!("{{\"n\":{n}}}")),
            ],
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let read = server.metric("herald_events_published_total");
        let entries = server.metric_with("herald_bus_lag_entries", r#"stream="herald:events""#);
        let seconds = server.metric_with("herald_bus_lag_seconds", r#"stream="herald:events""#);
        let (_, text) = server.get("/metrics");
        let sampled = text.contains(r#"herald_bus_lag_entries{stream="herald:events"}"#);
        if read == 300.0 && sampled && entries == 0.0 && seconds == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "read {read} of 300, lag {entries} entries / {seconds} s, sampled {sampled}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(server.metric("herald_bus_ready"), 1.0);
}

#[tokio::test]
async fn entries_deleted_before_a_reader_starts_are_no_lag() {
    let redis = RedisServer::start(&[]);
    let fields = [
        ("project", "p"),
        ("channels", r#"["c"]"#),
        ("payload", "{}"),
    ];
    redis.xadd("herald:events", &fields);
    let newest = redis.xadd("herald:events", &fields);
    let _: i64 = redis::cmd("XDEL")
        .arg("herald:events")
        .arg(&newest)
        .query(&mut redis.conn())
        .unwrap();
    let url = redis.url();
    let server = Server::start(&["--shards", "1", "--redis", &url]);
    wait_ready(&server, true);
    let sampled = r#"herald_bus_lag_seconds{stream="herald:events"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.get("/metrics").1.contains(sampled) {
        assert!(Instant::now() < deadline, "no lag sample");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(server.metric("herald_bus_lag_entries"), 0.0);
    assert_eq!(server.metric("herald_bus_lag_seconds"), 0.0);
}

/// The status of a request to the admin listener naming `host`.
fn status_for_host(server: &Server, path: &str, host: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(server.admin).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn without_a_token_only_requests_to_a_loopback_host_are_answered() {
    // A page on evil.example whose name now resolves to 127.0.0.1 (DNS rebinding) would be
    // same-origin with the admin API; its requests still say Host: evil.example.
    let open = Server::start(&["--shards", "1"]);
    let port = open.admin.port();
    assert_eq!(
        status_for_host(&open, "/v1/stats", &format!("evil.example:{port}")),
        421
    );
    assert_eq!(
        status_for_host(&open, "/", &format!("evil.example:{port}")),
        421
    );
    assert_eq!(
        status_for_host(&open, "/healthz", "node-1:9506"),
        200,
        "health checks stay open"
    );
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "[::1]".to_owned(),
    ] {
        assert_eq!(status_for_host(&open, "/v1/stats", &host), 200, "{host}");
    }
    // With a token, the token is the guard, whatever name the node is reached by.
    let guarded = Server::start(&["--shards", "1", "--admin-token", TOKEN]);
    assert_eq!(status_for_host(&guarded, "/", "herald-1:9506"), 200);
    assert_eq!(status_for_host(&guarded, "/v1/stats", "herald-1:9506"), 401);
}

fn doctor(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("doctor")
        .args(args)
        .output()
        .expect("run herald doctor");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn doctor_on_this_machine_passes_a_small_load_and_refuses_an_impossible_one() {
    let (code, text) = doctor(&["--connections", "100"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("verdict: 100 connections fit"), "{text}");
    let lines = text
        .lines()
        .filter(|l| l.starts_with("  ok") || l.starts_with("  warn") || l.starts_with("  FAIL"))
        .count();
    assert_eq!(lines, 12, "one line per check: {text}");
    assert!(text.contains("open files per process"), "{text}");

    // A billion connections need terabytes: no test machine has them.
    let (code, text) = doctor(&["--connections", "1000000000"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("FAIL  memory:"), "{text}");
    assert!(text.contains("do not fit"), "{text}");
    assert!(text.contains("fix: "), "{text}");

    // herald's own cap, from the same settings `serve` reads.
    let (code, text) = doctor(&["--connections", "100", "--max-connections", "50"]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("FAIL  --max-connections 50 per process, 100 needed"),
        "{text}"
    );

    let (code, text) = doctor(&["--connections", "100", "--processes", "0"]);
    assert_eq!(code, 2, "{text}");
}

#[test]
fn doctor_names_the_processes_a_capped_open_file_limit_needs() {
    // The limit is this process's to lower (never to raise again): run doctor under a lower hard
    // limit, as a container with a cap would.
    let out = std::process::Command::new("bash")
        .args([
            "-c",
            &format!(
                "ulimit -Sn 2000 && ulimit -Hn 2000 && exec {} doctor --connections 10000",
                env!("CARGO_BIN_EXE_herald")
            ),
        ])
        .output()
        .expect("bash");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("hard 2,000: one herald process holds 1,936 connections"),
        "{text}"
    );
    // Raising a hard limit needs CAP_SYS_RESOURCE; as root here it works, elsewhere it does not.
    assert!(
        text.contains("at least 6 herald processes") || text.contains("LimitNOFILE=10064"),
        "{text}"
    );
}
