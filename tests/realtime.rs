//! The Appwrite Realtime protocol as clients see it, against a real herald on loopback.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Publishes a marker on `channel` and asserts it is the next message `ws` sees: proof that
/// nothing published before it reached this client.
async fn assert_nothing_before_marker(server: &Server, ws: &mut Ws, project: &str, channel: &str) {
    let id = server
        .publish(json!({"project": project, "channels": [channel], "payload": {"marker": true}}));
    let msg = next_json(ws).await;
    assert_eq!(msg["type"], "event", "{msg}");
    assert_eq!(
        msg["data"]["id"],
        id.as_str(),
        "an earlier event leaked: {msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_channels_get_connected_and_matching_events_only() {
    let server = Server::start(&["--shards", "2"]);
    let (mut a, connected) =
        connect(&server.url("/v1/realtime?project=p1&channels[]=files&channels%5B%5D=documents"))
            .await;
    assert_eq!(connected["data"]["channels"], json!(["files", "documents"]));
    assert_eq!(connected["data"]["user"], Value::Null);
    let subs = connected["data"]["subscriptions"].as_array().unwrap();
    assert_eq!(subs.len(), 1);
    let sub = subs[0].as_str().unwrap().to_owned();
    assert_eq!(sub.len(), 20);

    let (mut other_project, _) =
        connect(&server.url("/v1/realtime?project=p2&channels[0]=files")).await;
    let (mut other_channel, _) =
        connect(&server.url("/v1/realtime/realtime?project=p1&channels[]=teams")).await;

    let id = server.publish(json!({
        "project": "p1", "channels": ["files"], "events": ["buckets.b.files.f.create"],
        "payload": {"$id": "f", "name": "a.png"}
    }));
    let ev = next_json(&mut a).await;
    assert_eq!(ev["type"], "event");
    assert_eq!(ev["data"]["subscriptions"], json!([sub]));
    assert_eq!(ev["data"]["id"], id.as_str());
    assert_eq!(ev["data"]["channels"], json!(["files"]));
    assert_eq!(ev["data"]["events"], json!(["buckets.b.files.f.create"]));
    assert_eq!(ev["data"]["payload"], json!({"$id": "f", "name": "a.png"}));
    let ts = ev["data"]["timestamp"].as_str().unwrap();
    assert_eq!(ts.len(), "2026-08-21T12:00:00.123+00:00".len(), "{ts}");
    assert!(ts.ends_with("+00:00") && ts.as_bytes()[19] == b'.', "{ts}");

    assert_nothing_before_marker(&server, &mut other_project, "p2", "files").await;
    assert_nothing_before_marker(&server, &mut other_channel, "p1", "teams").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn project_header_wins_and_missing_project_means_default() {
    let server = Server::start(&["--shards", "1", "--default-project", "console"]);
    let (mut h, _) = connect_with_header(
        &server.url("/v1/realtime?project=fromquery&channels[]=c"),
        "x-appwrite-project",
        "fromheader",
    )
    .await;
    let (mut d, _) = connect(&server.url("/v1/realtime?channels[]=c")).await;
    let id = server.publish(json!({"project": "fromheader", "channels": ["c"], "payload": {}}));
    assert_eq!(next_json(&mut h).await["data"]["id"], id.as_str());
    let id = server.publish(json!({"channels": ["c"], "payload": {}}));
    assert_eq!(next_json(&mut d).await["data"]["id"], id.as_str());
    assert_nothing_before_marker(&server, &mut h, "fromheader", "c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gen_c_subscribe_unsubscribe_and_replace() {
    let server = Server::start(&["--shards", "2"]);
    let (mut ws, connected) = connect(&server.url("/v1/realtime?project=p")).await;
    assert_eq!(connected["data"]["channels"], json!([]));
    assert_eq!(connected["data"]["subscriptions"], json!([]));

    send(&mut ws, r#"{"type":"subscribe","data":[{"subscriptionId":"sub-a","channels":["files"],"queries":[]},{"subscriptionId":"sub-b","channels":["files","documents"]}]}"#).await;
    let r = next_json(&mut ws).await;
    assert_eq!(r["type"], "response");
    assert_eq!(r["data"]["to"], "subscribe");
    assert_eq!(r["data"]["success"], true);
    assert_eq!(
        r["data"]["subscriptions"][1]["channels"],
        json!(["files", "documents"])
    );

    server.publish(json!({"project": "p", "channels": ["files"], "payload": {"n": 1}}));
    assert_eq!(
        next_json(&mut ws).await["data"]["subscriptions"],
        json!(["sub-a", "sub-b"])
    );
    server.publish(json!({"project": "p", "channels": ["documents"], "payload": {"n": 2}}));
    assert_eq!(
        next_json(&mut ws).await["data"]["subscriptions"],
        json!(["sub-b"])
    );

    send(
        &mut ws,
        r#"{"type":"unsubscribe","data":[{"subscriptionId":"sub-a"},{"subscriptionId":"nope"}]}"#,
    )
    .await;
    let r = next_json(&mut ws).await;
    assert_eq!(
        r["data"]["subscriptions"],
        json!([{"subscriptionId":"sub-a","removed":true},{"subscriptionId":"nope","removed":false}])
    );
    server.publish(json!({"project": "p", "channels": ["files"], "payload": {"n": 3}}));
    assert_eq!(
        next_json(&mut ws).await["data"]["subscriptions"],
        json!(["sub-b"])
    );

    // Same id, new channel list: replaced, not merged.
    send(
        &mut ws,
        r#"{"type":"subscribe","data":[{"subscriptionId":"sub-b","channels":["teams"]}]}"#,
    )
    .await;
    assert_eq!(next_json(&mut ws).await["data"]["to"], "subscribe");
    server.publish(json!({"project": "p", "channels": ["files"], "payload": {"n": 4}}));
    assert_nothing_before_marker(&server, &mut ws, "p", "teams").await;

    // A missing id is minted by the server.
    send(
        &mut ws,
        r#"{"type":"subscribe","data":[{"channels":["x"]}]}"#,
    )
    .await;
    let r = next_json(&mut ws).await;
    assert_eq!(
        r["data"]["subscriptions"][0]["subscriptionId"]
            .as_str()
            .unwrap()
            .len(),
        20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_gate_events() {
    let server = Server::start(&["--shards", "1"]);
    let (mut guest, _) = connect(&server.url("/v1/realtime?project=p&channels[]=c")).await;
    server.publish(json!({"project": "p", "channels": ["c"], "roles": ["user:x"], "payload": {}}));
    server.publish(json!({"project": "p", "channels": ["c"], "roles": ["users"], "payload": {}}));
    let id =
        server.publish(json!({"project": "p", "channels": ["c"], "roles": ["any"], "payload": {}}));
    assert_eq!(next_json(&mut guest).await["data"]["id"], id.as_str());
    let id = server
        .publish(json!({"project": "p", "channels": ["c"], "roles": ["guests"], "payload": {}}));
    assert_eq!(next_json(&mut guest).await["data"]["id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_messages_get_documented_answers() {
    let server = Server::start(&["--shards", "1"]);
    let (mut ws, _) = connect(&server.url("/v1/realtime?project=p&channels[]=c")).await;
    send(&mut ws, r#"{"type":"ping"}"#).await;
    assert_eq!(next_json(&mut ws).await, json!({"type":"pong"}));
    for (input, code, message) in [
        ("not json", 1003, "Message format is not valid."),
        ("{}", 1003, "Message format is not valid."),
        (
            r#"{"type":"dance","data":{}}"#,
            1003,
            "Message type is not valid.",
        ),
    ] {
        send(&mut ws, input).await;
        let r = next_json(&mut ws).await;
        assert_eq!(
            r,
            json!({"type":"error","data":{"code":code,"message":message}}),
            "{input}"
        );
    }
    send(
        &mut ws,
        r#"{"type":"subscribe","data":[{"subscriptionId":"bad id!","channels":["c"]}]}"#,
    )
    .await;
    let r = next_json(&mut ws).await;
    assert_eq!(r["data"]["code"], 1003);
    assert!(
        r["data"]["message"]
            .as_str()
            .unwrap()
            .contains("subscriptionId"),
        "{r}"
    );

    ws.send_binary(b"{}").await;
    let r = next_json(&mut ws).await;
    assert_eq!(r["data"]["code"], 1003, "{r}");

    // Authentication cannot succeed yet, but must not cost the connection its subscriptions.
    send(
        &mut ws,
        r#"{"type":"authentication","data":{"session":"eyJpZCI6IngifQ=="}}"#,
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "error");
    let id = server.publish(json!({"project": "p", "channels": ["c"], "payload": {}}));
    assert_eq!(next_json(&mut ws).await["data"]["id"], id.as_str());
}

trait SendBinary {
    async fn send_binary(&mut self, b: &[u8]);
}

impl SendBinary for Ws {
    async fn send_binary(&mut self, b: &[u8]) {
        use futures_util::SinkExt;
        self.send(tokio_tungstenite::tungstenite::Message::Binary(
            b.to_vec().into(),
        ))
        .await
        .expect("send");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_rate_limit_answers_1013_and_keeps_the_connection() {
    let server = Server::start(&[
        "--shards",
        "1",
        "--message-rate",
        "3",
        "--message-rate-window",
        "60s",
    ]);
    let (mut ws, _) = connect(&server.url("/v1/realtime?project=p&channels[]=c")).await;
    for _ in 0..3 {
        send(&mut ws, r#"{"type":"ping"}"#).await;
        assert_eq!(next_json(&mut ws).await["type"], "pong");
    }
    send(&mut ws, r#"{"type":"ping"}"#).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type":"error","data":{"code":1013,"message":"Too many messages."}})
    );
    let id = server.publish(json!({"project": "p", "channels": ["c"], "payload": {}}));
    assert_eq!(next_json(&mut ws).await["data"]["id"], id.as_str());
    // Shards publish their counters once a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while server.metric("herald_rate_limited_messages_total") != 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "rate-limited message not counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_api_validates_input() {
    let server = Server::start(&["--shards", "1", "--max-publish-bytes", "1000"]);
    let (s, r) = server.publish_raw("{nope");
    assert_eq!(s, 400);
    assert!(
        r["message"].as_str().unwrap().contains("invalid event"),
        "{r}"
    );
    let (s, r) = server.publish_raw(r#"{"channels":[],"payload":{}}"#);
    assert_eq!(s, 400);
    assert!(r["message"].as_str().unwrap().contains("channels"), "{r}");
    let (s, _) = server.publish_raw(r#"{"channels":["a"],"payload":"text"}"#);
    assert_eq!(s, 400);
    let big = format!(
        r#"{{"channels":["a"],"payload":{{"x":"{}"}}}}"#,
        "a".repeat(2000)
    );
    let (s, r) = server.publish_raw(&big);
    assert_eq!(s, 413, "{r}");
    let (s, _) = server.get("/healthz");
    assert_eq!(s, 200);
    let (s, _) = server.get("/readyz");
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_command_reaches_subscribers() {
    let server = Server::start(&["--shards", "1"]);
    let (mut ws, _) = connect(&server.url("/v1/realtime?project=p&channels[]=files")).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "publish",
            "--admin",
            &server.admin.to_string(),
            "--project",
            "p",
            "--channel",
            "files",
            "--payload",
            r#"{"a":1}"#,
        ])
        .output()
        .expect("run herald publish");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout).expect("json reply");
    let ev = next_json(&mut ws).await;
    assert_eq!(ev["data"]["id"], reply["id"]);
    assert_eq!(ev["data"]["payload"], json!({"a": 1}));

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "publish",
            "--admin",
            &server.admin.to_string(),
            "--channel",
            "files",
            "--payload",
            "[1]",
        ])
        .output()
        .expect("run herald publish");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("payload must be a JSON object"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_peers_are_pinged_and_dead_ones_closed() {
    // Without TCP keepalive: the client's TCP would answer for it (the next test).
    let server = Server::start(&[
        "--shards",
        "1",
        "--ping-interval",
        "1s",
        "--idle-timeout",
        "3s",
        "--tcp-keepalive",
        "false",
    ]);
    // tungstenite answers pings while it is being read: it must survive.
    let (mut alive, _) = connect(&server.url("/v1/realtime?project=p&channels[]=c")).await;
    let mut dead = RawClient::upgrade(server.ws, "/v1/realtime?project=p&channels[]=c");
    assert_eq!(dead.read_json()["type"], "connected");
    let reader = tokio::spawn(async move {
        // Reading for 6 s lets tungstenite answer every ping.
        let got = next_json_within(&mut alive, Duration::from_secs(6)).await;
        (alive, got)
    });
    let (op, _) = tokio::task::spawn_blocking(move || {
        let first = dead.read_frame().expect("a ping");
        assert_eq!(first.0, 9, "expected a ping first");
        let code = dead.read_close_code();
        (first.0, code)
    })
    .await
    .map(|(op, code)| {
        assert_eq!(code, Some(1001));
        (op, ())
    })
    .unwrap();
    assert_eq!(op, 9);
    let (mut alive, got) = reader.await.unwrap();
    assert!(got.is_none());
    let id = server.publish(json!({"project": "p", "channels": ["c"], "payload": {}}));
    assert_eq!(next_json(&mut alive).await["data"]["id"], id.as_str());
}

/// With --tcp-keepalive the kernel probes a silent connection, and a client whose TCP answers
/// is heard: it gets no WebSocket ping and outlives the idle timeout, still subscribed.
#[test]
fn silent_peers_whose_tcp_answers_keepalive_are_neither_pinged_nor_closed() {
    let server = Server::start(&[
        "--ping-interval",
        "3s",
        "--idle-timeout",
        "6s",
        "--tcp-keepalive",
        "true",
    ]);
    let mut silent = RawClient::upgrade(server.ws, "/v1/realtime?project=p&channels[]=c");
    assert_eq!(silent.read_json()["type"], "connected");
    silent
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Sends nothing and answers nothing for 10 s: past the idle timeout and three pings.
    assert_eq!(silent.read_frame(), None, "no ping, no close");
    assert!(server.metric_with("herald_idle_pings_total", "saved") >= 2.0);
    assert_eq!(
        server.metric_with("herald_idle_pings_total", "\"sent\""),
        0.0
    );
    let id = server.publish(json!({"project": "p", "channels": ["c"], "payload": {}}));
    assert_eq!(silent.read_json()["data"]["id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_sets_defaults_and_flags_win() {
    let dir = std::env::temp_dir().join(format!("herald-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("herald.toml");
    std::fs::write(
        &path,
        "default_project = \"fromfile\"\nmessage_rate = 1\nidle_timeout = \"90s\"\n",
    )
    .unwrap();
    let server = Server::start(&["--config", path.to_str().unwrap(), "--message-rate", "2"]);
    let (mut ws, _) = connect(&server.url("/v1/realtime?channels[]=c")).await;
    let id = server.publish(json!({"project": "fromfile", "channels": ["c"], "payload": {}}));
    assert_eq!(next_json(&mut ws).await["data"]["id"], id.as_str());
    // The flag (2) wins over the file (1): the second ping is still answered.
    for _ in 0..2 {
        send(&mut ws, r#"{"type":"ping"}"#).await;
        assert_eq!(next_json(&mut ws).await["type"], "pong");
    }

    std::fs::write(&path, "max_mesage_bytes = 5\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown setting `max_mesage_bytes`") && err.contains("max_message_bytes"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
