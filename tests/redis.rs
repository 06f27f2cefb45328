//! Redis Streams as the bus: many nodes, one stream, outages and node failures without loss.
//! Every test runs its own redis-server (installed by ./scripts/test).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const STREAM: &str = "herald:events";

fn node(redis: &RedisServer, extra: &[&str]) -> Server {
    let url = redis.url();
    let mut args = vec!["--shards", "2", "--redis", url.as_str()];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    wait_ready(&server, true);
    server
}

fn event_fields(n: usize) -> Vec<(String, String)> {
    vec![
        ("project".into(), "p".into()),
        ("channels".into(), r#"["c"]"#.into()),
        ("payload".into(), json!({"n": n}).to_string()),
    ]
}

fn xadd_event(redis: &RedisServer, n: usize) -> String {
    let f = event_fields(n);
    let refs: Vec<(&str, &str)> = f.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    redis.xadd(STREAM, &refs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_deliver_every_event_exactly_once_in_stream_order() {
    raise_fd_limit();
    let redis = RedisServer::start(&[]);
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    let mut all = clients(&a.url("/v1/realtime?project=p&channels[]=c"), 500).await;
    all.extend(clients(&b.url("/v1/realtime?project=p&channels[]=c"), 500).await);

    let mut published = Vec::new();
    for n in 0..30 {
        let id = match n % 3 {
            // Plain redis-cli, as any backend in any language would publish.
            0 => {
                let out = std::process::Command::new("redis-cli")
                    .args([
                        "-p",
                        &redis.port.to_string(),
                        "XADD",
                        STREAM,
                        "*",
                        "project",
                        "p",
                        "channels",
                        r#"["c"]"#,
                        "payload",
                    ])
                    .arg(json!({"n": n}).to_string())
                    .output()
                    .expect("redis-cli");
                assert!(out.status.success());
                String::from_utf8(out.stdout).unwrap().trim().to_owned()
            }
            1 => a.publish(json!({"project": "p", "channels": ["c"], "payload": {"n": n}})),
            _ => b.publish(json!({"project": "p", "channels": ["c"], "payload": {"n": n}})),
        };
        published.push(id);
    }
    assert_all_receive(all, &published).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_are_skipped_and_counted() {
    let redis = RedisServer::start(&[]);
    let a = node(&redis, &[]);
    let (mut ws, _) = connect(&a.url("/v1/realtime?project=p&channels[]=c")).await;
    redis.xadd(STREAM, &[("payload", "{}")]);
    redis.xadd(STREAM, &[("channels", r#"["c"]"#), ("payload", "not json")]);
    redis.xadd(STREAM, &[("channels", "c"), ("payload", "{}")]);
    let good = xadd_event(&redis, 1);
    let ev = next_json(&mut ws).await;
    assert_eq!(ev["data"]["id"], good.as_str());
    assert_eq!(ev["data"]["payload"], json!({"n": 1}));
    assert_eq!(a.metric("herald_stream_entries_skipped_total"), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_loses_nothing_and_nodes_reconnect_by_themselves() {
    let mut redis = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let a = node(&redis, &[]);
    let (mut ws, _) = connect(&a.url("/v1/realtime?project=p&channels[]=c")).await;
    let mut published: Vec<String> = (0..5).map(|n| xadd_event(&redis, n)).collect();
    expect_events(&mut ws, &published).await;

    redis.kill();
    wait_ready(&a, false);
    // While Redis is away, publishing through herald says so instead of losing the event.
    let (status, reply) = a.publish_raw(r#"{"project":"p","channels":["c"],"payload":{}}"#);
    assert_eq!(status, 503, "{reply}");

    redis.restart();
    // Published before the node has reconnected: read back from where it left off.
    published.extend((5..10).map(|n| xadd_event(&redis, n)));
    wait_ready(&a, true);
    published.extend((10..15).map(|n| xadd_event(&redis, n)));
    published.push(a.publish(json!({"project": "p", "channels": ["c"], "payload": {"n": 15}})));
    expect_events(&mut ws, &published[5..]).await;
    assert!(a.metric("herald_bus_reconnects_total") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_node_clients_resume_on_the_other_node_with_every_event_exactly_once() {
    const CLIENTS: usize = 100;
    const EVENTS: usize = 150;
    let redis = RedisServer::start(&[]);
    let mut a = node(&redis, &[]);
    let b = node(&redis, &[]);
    let url_a = a.url("/v1/realtime?project=p&channels[]=c");
    let url_b = b.url("/v1/realtime?project=p&channels[]=c");

    // Each client reads until it has EVENTS events; when its node dies it reconnects to the
    // other node with the last id it saw.
    let tasks: Vec<_> = clients(&url_a, CLIENTS)
        .await
        .into_iter()
        .map(|ws| {
            let url_b = url_b.clone();
            tokio::spawn(follow(ws, url_b, "0-0".to_owned(), EVENTS))
        })
        .collect();

    let mut published = Vec::new();
    for n in 0..EVENTS {
        if n == EVENTS / 3 {
            a.kill9();
        }
        published.push(xadd_event(&redis, n));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in tasks {
        let (got, reconnects) = t.await.unwrap();
        assert!(reconnects >= 1, "the client never lost its node");
        assert_eq!(got, published, "every event exactly once, in stream order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_redis_and_its_edge_cases() {
    let redis = RedisServer::start(&[]);
    // Memory history of 5 events: older resumes must come from the stream itself.
    let a = node(&redis, &["--history-events", "5", "--stream-maxlen", "10"]);
    let (mut live, _) = connect(&a.url("/v1/realtime?project=p&channels[]=c")).await;
    let ids: Vec<String> = (0..20).map(|n| xadd_event(&redis, n)).collect();
    expect_events(&mut live, &ids).await;

    // Served from Redis (XRANGE), past the memory history.
    let (mut ws, _) = connect(&a.url(&format!(
        "/v1/realtime?project=p&channels[]=c&lastEventId={}",
        ids[12]
    )))
    .await;
    expect_events(&mut ws, &ids[13..]).await;

    // Many entries later the stream is trimmed past early ids: 4010.
    let more: Vec<String> = (20..400)
        .map(|n| a.publish(json!({"project": "p", "channels": ["c"], "payload": {"n": n}})))
        .collect();
    expect_events(&mut live, &more).await;
    let (mut old, _) = connect(&a.url(&format!(
        "/v1/realtime?project=p&channels[]=c&lastEventId={}",
        ids[0]
    )))
    .await;
    let err = next_json(&mut old).await;
    assert_eq!(err["data"]["code"], 4010, "{err}");

    let (mut future, _) =
        connect(&a.url("/v1/realtime?project=p&channels[]=c&lastEventId=99999999999999-0")).await;
    assert_eq!(next_json(&mut future).await["data"]["code"], 4012);
    let (mut bad, _) = connect(&a.url("/v1/realtime?project=p&channels[]=c&lastEventId=abc")).await;
    assert_eq!(next_json(&mut bad).await["data"]["code"], 4011);

    let last = vec![xadd_event(&redis, 1000)];
    for ws in [&mut old, &mut future, &mut bad, &mut live] {
        expect_events(ws, &last).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appwrite_pubsub_messages_are_delivered() {
    let redis = RedisServer::start(&[]);
    let a = node(&redis, &["--appwrite-pubsub"]);
    let (mut ws, _) = connect(&a.url("/v1/realtime?project=6650abc&channels[]=documents")).await;
    let msg = json!({
        "project": "6650abc", "roles": ["any"], "permissionsChanged": false, "userId": null,
        "data": {"events": ["databases.db1.collections.col1.documents.doc1.create"],
                 "channels": ["documents", "databases.db1.collections.col1.documents"],
                 "timestamp": "2026-08-21T12:00:00.123+00:00", "payload": {"$id": "doc1"}}
    });
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg("realtime")
        .arg(msg.to_string())
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(receivers, 1);
    let ev = next_json(&mut ws).await;
    assert_eq!(ev["data"]["payload"], json!({"$id": "doc1"}));
    assert_eq!(ev["data"]["timestamp"], "2026-08-21T12:00:00.123+00:00");
    assert_eq!(
        ev["data"]["events"][0],
        "databases.db1.collections.col1.documents.doc1.create"
    );
    assert_eq!(ev["data"]["subscriptions"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_trimmed_while_the_reader_was_away_are_counted_and_resumes_across_them_get_4010() {
    let mut redis = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let a = node(&redis, &[]);
    let (mut ws, _) = connect(&a.url("/v1/realtime?project=p&channels[]=c")).await;
    let before: Vec<String> = (0..3).map(|n| xadd_event(&redis, n)).collect();
    expect_events(&mut ws, &before).await;
    let last_seen = before.last().cloned().unwrap_or_default();

    redis.kill();
    wait_ready(&a, false);
    // Let the reader's reconnect back-off grow, so the trim below happens while it is away.
    std::thread::sleep(Duration::from_secs(2));
    redis.restart();
    let lost: Vec<String> = (3..8).map(|n| xadd_event(&redis, n)).collect();
    let _: i64 = redis::cmd("XTRIM")
        .arg(STREAM)
        .arg("MAXLEN")
        .arg(2)
        .query(&mut redis.conn())
        .unwrap();
    wait_ready(&a, true);
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.metric("herald_stream_gaps_total") < 1.0 {
        assert!(Instant::now() < deadline, "the gap was not detected");
        std::thread::sleep(Duration::from_millis(50));
    }
    // What was still in the stream arrives; the trimmed ones cannot.
    expect_events(&mut ws, &lost[3..]).await;

    let url = a.url(&format!(
        "/v1/realtime?project=p&channels[]=c&lastEventId={last_seen}"
    ));
    let (mut resumed, _) = connect(&url).await;
    let answer = next_json(&mut resumed).await;
    assert_eq!(answer["type"], "error", "{answer}");
    assert_eq!(answer["data"]["code"], 4010, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_reads_at_most_replay_max_scan_entries_whatever_it_matches() {
    let redis = RedisServer::start(&[]);
    let a = node(
        &redis,
        &["--history-events", "5", "--replay-max-scan", "2000"],
    );
    let (mut live, _) = connect(&a.url("/v1/realtime?project=p&channels[]=c")).await;
    let first = xadd_event(&redis, 0);
    // 3,000 entries on a channel the resuming client does not follow, then one it does.
    let mut conn = redis.conn();
    let mut pipe = redis::pipe();
    for n in 0..3_000 {
        pipe.cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("project")
            .arg("p")
            .arg("channels")
            .arg(r#"["other"]"#)
            .arg("payload")
            .arg(json!({"n": n}).to_string())
            .ignore();
    }
    let () = pipe.query(&mut conn).unwrap();
    let wanted = xadd_event(&redis, 1);
    expect_events(&mut live, &[first.clone(), wanted.clone()]).await;

    // Matching nothing for 3,000 entries is more searching than allowed: 4010, then live.
    let (mut far, _) = connect(&a.url(&format!(
        "/v1/realtime?project=p&channels[]=c&lastEventId={first}"
    )))
    .await;
    let err = next_json(&mut far).await;
    assert_eq!(err["data"]["code"], 4010, "{err}");
    assert!(
        err["data"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--replay-max-scan")),
        "{err}"
    );
    // Within the bound, the same search is served.
    let b = node(
        &redis,
        &["--history-events", "5", "--replay-max-scan", "5000"],
    );
    let (mut near, _) = connect(&b.url(&format!(
        "/v1/realtime?project=p&channels[]=c&lastEventId={first}"
    )))
    .await;
    expect_events(&mut near, std::slice::from_ref(&wanted)).await;
    let last = vec![xadd_event(&redis, 2)];
    for ws in [&mut near, &mut live] {
        expect_events(ws, &last).await;
    }
    // The far client's shard may not have reached `wanted` when it connected: then `wanted`
    // comes live after the 4010, which is right too. Nothing else may.
    loop {
        let ev = next_json(&mut far).await;
        let id = ev["data"]["id"].as_str().unwrap_or_default().to_owned();
        if id == last[0] {
            break;
        }
        assert_eq!(id, wanted, "{ev}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_answer_once_replicas_hold_the_entry_and_503_with_its_id_when_too_few_do() {
    let redis = RedisServer::start(&[]);
    let a = node(
        &redis,
        &[
            "--publish-replicas",
            "1",
            "--publish-replicas-timeout",
            "1s",
        ],
    );
    let (mut ws, _) = connect(&a.url("/v1/realtime?project=p&channels[]=c")).await;

    // No replica: the entry is in the stream, but the publisher is told it is not safe.
    let started = Instant::now();
    let (status, reply) = a.publish_raw(r#"{"project":"p","channels":["c"],"payload":{"n":0}}"#);
    assert_eq!(status, 503, "{reply}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "answered before the timeout"
    );
    assert_eq!(reply["replicas"], 0, "{reply}");
    let unsafe_id = reply["id"].as_str().expect("the entry's id").to_owned();
    expect_events(&mut ws, std::slice::from_ref(&unsafe_id)).await;
    assert_eq!(a.metric("herald_publish_unreplicated_total"), 1.0);

    // With a replica, concurrent publishes are all acknowledged, each once the replica has it.
    let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &redis.port.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // What WAIT counts is the primary's view: the replica online, not merely linked.
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut redis.conn())
            .unwrap_or_default();
        if info.contains("state=online") {
            break;
        }
        assert!(Instant::now() < deadline, "the replica never synced");
        std::thread::sleep(Duration::from_millis(50));
    }
    let admin = a.admin;
    let publishers: Vec<_> = (1..=64)
        .map(|n| {
            std::thread::spawn(move || {
                let body = json!({"project": "p", "channels": ["c"], "payload": {"n": n}});
                let mut resp = ureq::post(&format!("http://{admin}/v1/events"))
                    .config()
                    .http_status_as_error(false)
                    .build()
                    .header("content-type", "application/json")
                    .send(body.to_string())
                    .expect("admin reachable");
                let text = resp.body_mut().read_to_string().expect("body");
                (resp.status().as_u16(), text)
            })
        })
        .collect();
    let mut ids = Vec::new();
    for p in publishers {
        let (status, text) = p.join().unwrap();
        assert_eq!(status, 200, "{text}");
        let reply: Value = serde_json::from_str(&text).unwrap();
        ids.push(reply["id"].as_str().unwrap().to_owned());
    }
    let held: i64 = redis::cmd("XLEN")
        .arg(STREAM)
        .query(&mut replica.conn())
        .unwrap();
    assert_eq!(held, 65, "every acknowledged entry is on the replica");
    ids.sort_by_key(|id| {
        let (ms, seq) = id.split_once('-').unwrap();
        (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
    });
    expect_events(&mut ws, &ids).await;
    assert_eq!(a.metric("herald_publish_unreplicated_total"), 1.0);
}
