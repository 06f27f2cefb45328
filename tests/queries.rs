//! Subscription queries over real sockets: each subscription gets only the events whose payload
//! its queries match, and refused queries say why, as Appwrite's realtime does.

mod common;

use std::time::Duration;

use common::{Server, Ws, connect, next_json, send};
use serde_json::{Value, json};

fn query(method: &str, attribute: &str, values: Value) -> String {
    json!({"method": method, "attribute": attribute, "values": values}).to_string()
}

async fn subscribe(ws: &mut Ws, rows: Value) -> Value {
    send(ws, &json!({"type": "subscribe", "data": rows}).to_string()).await;
    next_json(ws).await
}

/// Every event that arrives within 300 ms of the last one: (payload `n`, `subscriptions`).
async fn events(ws: &mut Ws) -> Vec<(i64, Value)> {
    let mut out = Vec::new();
    while let Some(v) = common::next_json_within(ws, Duration::from_millis(300)).await {
        assert_eq!(v["type"], "event", "{v}");
        out.push((
            v["data"]["payload"]["n"].as_i64().unwrap(),
            v["data"]["subscriptions"].clone(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_subscription_gets_the_events_its_queries_match() {
    let server = Server::start(&[]);
    let (mut ws, _) = connect(&server.url("/v1/realtime?project=p")).await;
    let (mut plain, _) = connect(&server.url("/v1/realtime?project=p&channels[]=docs")).await;
    let reply = subscribe(
        &mut ws,
        json!([
            {"subscriptionId": "open", "channels": ["docs"],
             "queries": [query("equal", "status", json!(["open"]))]},
            {"subscriptionId": "big", "channels": ["docs"],
             "queries": [query("greaterThan", "size", json!([9007199254740992u64])),
                         query("isNotNull", "owner.name", json!([]))]},
            {"subscriptionId": "either", "channels": ["docs"],
             "queries": [json!({"method": "or", "values": [
                 query("equal", "status", json!(["closed"])),
                 query("lessThan", "size", json!([0]))]}).to_string()]},
            {"subscriptionId": "all", "channels": ["docs"],
             "queries": [json!({"method": "select", "values": ["*"]}).to_string()]},
        ]),
    )
    .await;
    assert_eq!(reply["data"]["success"], true, "{reply}");
    // Appwrite's canonical form: method, attribute, values.
    assert_eq!(
        reply["data"]["subscriptions"][0]["queries"],
        json!([r#"{"method":"equal","attribute":"status","values":["open"]}"#])
    );
    let payloads = [
        json!({"n": 1, "status": "open", "size": 1}),
        json!({"n": 2, "status": "closed", "size": 9007199254740993u64, "owner": {"name": "ann"}}),
        json!({"n": 3, "status": "open", "size": 9007199254740993u64}),
        json!({"n": 4, "status": 5, "size": -1}),
        json!({"n": 5}),
    ];
    for p in &payloads {
        server.publish(json!({"project": "p", "channels": ["docs"], "payload": p}));
    }
    assert_eq!(
        events(&mut ws).await,
        [
            (1, json!(["open", "all"])),
            (2, json!(["big", "either", "all"])),
            (3, json!(["open", "all"])),
            (4, json!(["either", "all"])),
            (5, json!(["all"])),
        ]
    );
    // A connection without queries gets everything, as before.
    assert_eq!(events(&mut plain).await.len(), payloads.len());

    // Without its select-all subscription, a non-matching event does not come at all.
    send(
        &mut ws,
        r#"{"type":"unsubscribe","data":[{"subscriptionId":"all"}]}"#,
    )
    .await;
    assert_eq!(next_json(&mut ws).await["data"]["to"], "unsubscribe");
    server.publish(json!({"project": "p", "channels": ["docs"], "payload": {"n": 6}}));
    server.publish(
        json!({"project": "p", "channels": ["docs"], "payload": {"n": 7, "status": "open"}}),
    );
    assert_eq!(events(&mut ws).await, [(7, json!(["open"]))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_or_malformed_queries_are_refused_and_nothing_is_applied() {
    let server = Server::start(&[]);
    let (mut ws, _) = connect(&server.url("/v1/realtime?project=p")).await;
    for (q, words) in [
        (
            query("contains", "tags", json!(["a"])),
            "Query method 'contains' is not supported in Realtime queries. Allowed query methods are: equal, notEqual",
        ),
        ("not json".to_owned(), "Invalid query: "),
        (
            json!({"method": "select", "values": ["title"]}).to_string(),
            "select",
        ),
        (query("equal", &"a".repeat(300), json!([1])), "256 bytes"),
    ] {
        let reply = subscribe(
            &mut ws,
            json!([{"subscriptionId": "s", "channels": ["docs"], "queries": [q]}]),
        )
        .await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["data"]["code"], 1003);
        let message = reply["data"]["message"].as_str().unwrap();
        assert!(message.starts_with("Invalid query: "), "{message}");
        assert!(message.contains(words), "{words}: {message}");
    }
    // Nothing was subscribed: an event on the channel does not come.
    server.publish(json!({"project": "p", "channels": ["docs"], "payload": {"n": 1}}));
    assert!(events(&mut ws).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_may_carry_at_most_1000_queries_and_values() {
    let server = Server::start(&[]);
    let (mut ws, _) = connect(&server.url("/v1/realtime?project=p")).await;
    let hundred: Vec<u32> = (0..100).collect();
    // Each subscription weighs 101 (one query, 100 values): nine fit, the tenth does not.
    for n in 0..10 {
        let reply = subscribe(
            &mut ws,
            json!([{"subscriptionId": format!("s{n}"), "channels": ["docs"],
                    "queries": [query("equal", "n", json!(hundred))]}]),
        )
        .await;
        if n < 9 {
            assert_eq!(reply["data"]["success"], true, "{n}: {reply}");
        } else {
            assert_eq!(reply["data"]["code"], 1003, "{reply}");
            let message = reply["data"]["message"].as_str().unwrap();
            assert!(
                message.contains("at most 1000 queries and values"),
                "{message}"
            );
        }
    }
    server.publish(json!({"project": "p", "channels": ["docs"], "payload": {"n": 5}}));
    let got = events(&mut ws).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.as_array().unwrap().len(), 9, "{:?}", got[0].1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gen_b_url_slots_are_subscriptions_with_their_queries() {
    let server = Server::start(&[]);
    let enc = |q: String| form_urlencoded::byte_serialize(q.as_bytes()).collect::<String>();
    let open = enc(query("equal", "status", json!(["open"])));
    let all = enc(json!({"method": "select", "values": ["*"]}).to_string());
    let (mut ws, hello) = connect(&server.url(&format!(
        "/v1/realtime?project=p&channels[]=docs.a&channels[]=files&docs_a[0][]={open}&files[1][]={all}"
    )))
    .await;
    let ids = hello["data"]["subscriptions"].clone();
    assert_eq!(ids.as_array().map(Vec::len), Some(2), "{hello}");
    let publish = |channel: &str, p: Value| {
        server.publish(json!({"project": "p", "channels": [channel], "payload": p}));
    };
    publish("docs.a", json!({"n": 1, "status": "open"}));
    publish("docs.a", json!({"n": 2, "status": "closed"}));
    publish("files", json!({"n": 3}));
    assert_eq!(
        events(&mut ws).await,
        [(1, json!([ids[0]])), (3, json!([ids[1]]))]
    );
    // Slots that are not 0, 1, ...: `subscriptions` maps slot to id.
    let (_, hello) = connect(&server.url(&format!(
        "/v1/realtime?project=p&channels[]=files&files[3][]={all}"
    )))
    .await;
    assert!(hello["data"]["subscriptions"]["3"].is_string(), "{hello}");
    // A query Appwrite does not run in realtime: 1008 with its words, then the close.
    let bad = enc(query("contains", "tags", json!(["a"])));
    let (mut ws, err) = common::connect_with_header(
        &server.url(&format!(
            "/v1/realtime?project=p&channels[]=files&files[0][]={bad}"
        )),
        "x-test",
        "1",
    )
    .await;
    assert_eq!(err["data"]["code"], 1008, "{err}");
    assert!(
        err["data"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Query method 'contains'")
    );
    assert_eq!(
        common::expect_close(&mut ws, Duration::from_secs(5)).await,
        1008
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_replays_only_what_the_queries_match_and_its_limits_count_only_that() {
    let server = Server::start(&["--replay-max-events", "2"]);
    let publish = |n: i64, status: &str| {
        server.publish(json!({"project": "p", "channels": ["docs"],
                              "payload": {"n": n, "status": status}}))
    };
    let before = publish(0, "open");
    // Five the subscription's query does not take, two it does: within a limit of 2.
    for n in 1..=5 {
        publish(n, "closed");
    }
    publish(6, "open");
    publish(7, "open");
    let (mut ws, _) = connect(&server.url("/v1/realtime?project=p")).await;
    send(
        &mut ws,
        &json!({"type": "subscribe", "lastEventId": before, "data": [
            {"subscriptionId": "open", "channels": ["docs"],
             "queries": [query("equal", "status", json!(["open"]))]}
        ]})
        .to_string(),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["data"]["to"], "subscribe");
    assert_eq!(
        events(&mut ws).await,
        vec![(6, json!(["open"])), (7, json!(["open"]))],
        "no 4010: the five unmatched events are not counted"
    );
}
