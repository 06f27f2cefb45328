//! Resuming after a reconnect with `lastEventId` (embedded bus: in-memory history).

mod common;

use common::*;
use serde_json::json;

fn publish_n(server: &Server, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| server.publish(json!({"project": "p", "channels": ["c"], "payload": {"n": i}})))
        .collect()
}

async fn expect_ids(ws: &mut Ws, ids: &[String]) {
    for id in ids {
        let ev = next_json(ws).await;
        assert_eq!(ev["type"], "event", "{ev}");
        assert_eq!(ev["data"]["id"], id.as_str(), "{ev}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_resume_replays_missed_events_then_live_without_gap_or_duplicate() {
    let server = Server::start(&["--shards", "2"]);
    let (mut first, _) = connect(&server.url("/v1/realtime?project=p&channels[]=c")).await;
    let ids = publish_n(&server, 5);
    expect_ids(&mut first, &ids).await;
    // Events on another channel or project are not replayed.
    server.publish(json!({"project": "p", "channels": ["other"], "payload": {}}));
    server.publish(json!({"project": "q", "channels": ["c"], "payload": {}}));

    let (mut resumed, _) = connect(&server.url(&format!(
        "/v1/realtime?project=p&channels[]=c&lastEventId={}",
        ids[1]
    )))
    .await;
    expect_ids(&mut resumed, &ids[2..]).await;
    let live = publish_n(&server, 3);
    expect_ids(&mut resumed, &live).await;

    // Up to date: nothing is replayed.
    let (mut current, _) = connect(&server.url(&format!(
        "/v1/realtime?project=p&channels[]=c&lastEventId={}",
        live[2]
    )))
    .await;
    let next = publish_n(&server, 1);
    expect_ids(&mut current, &next).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gen_c_subscribe_carries_last_event_id() {
    let server = Server::start(&["--shards", "1"]);
    let ids = publish_n(&server, 4);
    let (mut ws, _) = connect(&server.url("/v1/realtime?project=p")).await;
    send(
        &mut ws,
        &json!({"type": "subscribe", "lastEventId": ids[0], "data": [{"subscriptionId": "s1", "channels": ["c"]}]}).to_string(),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["data"]["to"], "subscribe");
    for id in &ids[1..] {
        let ev = next_json(&mut ws).await;
        assert_eq!(ev["data"]["id"], id.as_str());
        assert_eq!(ev["data"]["subscriptions"], json!(["s1"]));
    }
    let live = publish_n(&server, 1);
    expect_ids(&mut ws, &live).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_edge_cases_get_documented_errors_then_live_events() {
    let server = Server::start(&["--shards", "1", "--history-events", "3"]);
    let ids = publish_n(&server, 6);

    // Malformed id: 4011, then live events.
    let (mut bad, _) =
        connect(&server.url("/v1/realtime?project=p&channels[]=c&lastEventId=yesterday")).await;
    let err = next_json(&mut bad).await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["data"]["code"], 4011);
    assert!(
        err["data"]["message"]
            .as_str()
            .unwrap()
            .contains("yesterday"),
        "{err}"
    );

    // Older than the history kept: 4010 (resync), then live events.
    let (mut old, _) = connect(&server.url(&format!(
        "/v1/realtime?project=p&channels[]=c&lastEventId={}",
        ids[0]
    )))
    .await;
    let err = next_json(&mut old).await;
    assert_eq!(err["data"]["code"], 4010, "{err}");
    assert!(
        err["data"]["message"]
            .as_str()
            .unwrap()
            .contains("history truncated"),
        "{err}"
    );

    // In the future: 4012, then live events (nothing is skipped).
    let (mut ahead, _) =
        connect(&server.url("/v1/realtime?project=p&channels[]=c&lastEventId=99999999999999-0"))
            .await;
    let err = next_json(&mut ahead).await;
    assert_eq!(err["data"]["code"], 4012, "{err}");

    // Within the history: replayed.
    let (mut ok, _) = connect(&server.url(&format!(
        "/v1/realtime?project=p&channels[]=c&lastEventId={}",
        ids[3]
    )))
    .await;
    expect_ids(&mut ok, &ids[4..]).await;

    let live = publish_n(&server, 2);
    for ws in [&mut bad, &mut old, &mut ahead, &mut ok] {
        expect_ids(ws, &live).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_bounded() {
    let server = Server::start(&["--shards", "1", "--replay-max-events", "3"]);
    let ids = publish_n(&server, 6);
    let (mut ws, _) = connect(&server.url(&format!(
        "/v1/realtime?project=p&channels[]=c&lastEventId={}",
        ids[0]
    )))
    .await;
    let err = next_json(&mut ws).await;
    assert_eq!(err["data"]["code"], 4010, "{err}");
    assert!(
        err["data"]["message"]
            .as_str()
            .unwrap()
            .contains("more than 3 events"),
        "{err}"
    );
    let live = publish_n(&server, 1);
    expect_ids(&mut ws, &live).await;
}
