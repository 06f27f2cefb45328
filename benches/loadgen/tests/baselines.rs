//! The benchmark baselines (`kernel_fanout`, `naive_server`) still speak the protocol subset the
//! benchmarks drive: startup line, `connected`, one published event with its payload, id and
//! subscription, and a clean stop on SIGTERM.

// herald's own harness (tests/common/harness.rs): it names no binary, so both packages' tests
// start servers and clients through the same code.
#[path = "../../../tests/common/harness.rs"]
mod common;

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use common::{Server, connect, expect_close, next_json, send};

/// Starts a baseline on ephemeral loopback ports, one shard.
fn start_baseline(name: &str) -> Server {
    // Cargo builds a package's binaries before its integration tests.
    let path = match name {
        "kernel_fanout" => env!("CARGO_BIN_EXE_kernel_fanout"),
        "naive_server" => env!("CARGO_BIN_EXE_naive_server"),
        other => panic!("no baseline named {other}"),
    };
    let mut cmd = Command::new(path);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--shards",
        "1",
    ]);
    Server::spawn(cmd)
}

fn is_event_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(ms, seq)| {
        !ms.is_empty()
            && !seq.is_empty()
            && ms.bytes().all(|b| b.is_ascii_digit())
            && seq.bytes().all(|b| b.is_ascii_digit())
    })
}

/// Connect, publish one event, check it arrives intact, stop with SIGTERM.
async fn round_trip(name: &str) {
    let mut server = start_baseline(name);
    assert!(
        server.startup_line.starts_with(&format!(
            "{name} listening on ws://{}/v1/realtime (",
            server.ws
        )),
        "{:?}",
        server.startup_line
    );
    assert!(
        server
            .startup_line
            .trim_end()
            .ends_with(&format!("; admin on http://{}", server.admin)),
        "{:?}",
        server.startup_line
    );
    let health = ureq::get(&format!("http://{}/healthz", server.admin))
        .call()
        .expect("healthz")
        .status();
    assert_eq!(health, 200);

    let url = format!("ws://{}/v1/realtime?project=p&channels[]=files", server.ws);
    let (mut ws, connected) = connect(&url).await;
    assert_eq!(
        connected["data"]["channels"],
        json!(["files"]),
        "{connected}"
    );
    assert_eq!(connected["data"]["user"], Value::Null, "{connected}");
    let sub = connected["data"]["subscriptions"][0]
        .as_str()
        .expect("subscription id")
        .to_owned();
    assert!(
        sub.len() == 20 && sub.bytes().all(|b| b.is_ascii_hexdigit()),
        "{sub:?}"
    );

    let payload = json!({"$id": "f1", "name": "report.pdf", "size": 1234});
    let (status, reply) = server.publish_raw(
        &json!({"project": "p", "channels": ["files"], "events": ["buckets.b.files.f1.create"],
                "payload": payload})
        .to_string(),
    );
    assert_eq!(status, 200, "{reply}");
    let id = reply["id"].as_str().expect("id").to_owned();
    assert!(is_event_id(&id), "{id:?}");

    let event = tokio::time::timeout(Duration::from_secs(3), next_json(&mut ws))
        .await
        .expect("event within 3 s");
    assert_eq!(event["type"], "event", "{event}");
    let data = &event["data"];
    assert_eq!(data["payload"], payload, "{event}");
    assert_eq!(data["id"], id.as_str(), "{event}");
    assert_eq!(data["channels"], json!(["files"]), "{event}");
    assert_eq!(
        data["events"],
        json!(["buckets.b.files.f1.create"]),
        "{event}"
    );
    assert_eq!(data["subscriptions"], json!([sub]), "{event}");
    assert!(
        data["timestamp"].as_str().is_some_and(|t| t.len() == 29),
        "{event}"
    );

    // A second event gets a later id.
    let (status, reply) =
        server.publish_raw(r#"{"project":"p","channels":["files"],"payload":{}}"#);
    assert_eq!(status, 200, "{reply}");
    let second = reply["id"].as_str().expect("id").to_owned();
    assert_ne!(second, id);
    let event = next_json(&mut ws).await;
    assert_eq!(event["data"]["id"], second.as_str(), "{event}");

    let (status, reply) = server.publish_raw(r#"{"project":"p","channels":[],"payload":{}}"#);
    assert_eq!(status, 400);
    assert!(reply.is_object(), "a JSON error reply: {reply}");

    if name == "naive_server" {
        send(&mut ws, r#"{"type":"ping"}"#).await;
        assert_eq!(next_json(&mut ws).await, json!({"type": "pong"}));
    }

    // SIGTERM: close 1001, then a clean exit.
    let term = std::thread::spawn({
        let pid = server.pid();
        move || {
            Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .expect("kill")
        }
    });
    assert_eq!(expect_close(&mut ws, Duration::from_secs(3)).await, 1001);
    drop(ws);
    assert!(term.join().expect("kill thread").success());
    let status = server
        .wait_exit(Duration::from_secs(3))
        .expect("exit within 3 s");
    assert!(status.success(), "{name} exited with {status}");
}

#[tokio::test]
async fn naive_server_round_trip() {
    round_trip("naive_server").await;
}

#[tokio::test]
async fn kernel_fanout_round_trip() {
    round_trip("kernel_fanout").await;
}
