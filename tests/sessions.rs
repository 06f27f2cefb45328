//! Appwrite sessions over real sockets: resolved by the application (`--auth-url`) or by
//! Appwrite's REST API (`--appwrite-endpoint`), at the handshake and in `authentication`,
//! cached, and resolved again when a user's permissions change, on every node.
//!
//! No Appwrite server runs here. [`Appwrite`] is a stand-in that answers `GET /v1/account`,
//! `GET /v1/teams` and `GET /v1/teams/{teamId}/memberships` as Appwrite's REST API documents
//! them (Account, Team list and Membership list objects, 401 for an unknown session, the
//! project from `X-Appwrite-Project`, the session from `X-Appwrite-Session`, JSON `queries[]`).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::{RedisServer, Server, Ws, next_json, next_json_within, send};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const ANN: &str = "eyJpZCI6ImFubiIsInNlY3JldCI6ImFubi1zZWNyZXQifQ==";
const BOB: &str = "eyJpZCI6ImJvYiIsInNlY3JldCI6ImJvYi1zZWNyZXQifQ==";
const SLOW: &str = "c2xvdw==";
const FAILING: &str = "ZmFpbGluZw==";

/// One team membership of a user in the stand-in.
#[derive(Clone)]
struct Member {
    team: String,
    membership: String,
    roles: Vec<String>,
    confirm: bool,
}

#[derive(Default)]
struct Directory {
    /// session value -> (user id, verified, labels)
    sessions: HashMap<String, (String, bool, Vec<String>)>,
    memberships: HashMap<String, Vec<Member>>,
    /// GET /v1/account calls, per user.
    account_calls: HashMap<String, usize>,
    /// Answer 500 to everything (Appwrite down).
    failing: bool,
}

/// A stand-in for Appwrite's REST API (see the module header).
#[derive(Clone)]
struct Appwrite {
    dir: Arc<Mutex<Directory>>,
    url: String,
}

fn appwrite_error(status: StatusCode, message: &str, kind: &str) -> Response {
    let body =
        json!({"message": message, "code": status.as_u16(), "type": kind, "version": "1.6.0"});
    (status, Json(body)).into_response()
}

/// The user of the request's session, or Appwrite's 401 (or a delay or a 500 for the
/// sessions that stand for a slow and a failing server).
async fn session_user(dir: &Mutex<Directory>, headers: &HeaderMap) -> Result<String, Response> {
    if headers
        .get("x-appwrite-project")
        .and_then(|v| v.to_str().ok())
        != Some("p")
    {
        return Err(appwrite_error(
            StatusCode::NOT_FOUND,
            "Project with the requested ID could not be found.",
            "project_not_found",
        ));
    }
    let session = headers
        .get("x-appwrite-session")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match session {
        SLOW => tokio::time::sleep(Duration::from_secs(3)).await,
        _ if dir.lock().unwrap().failing => {
            return Err(appwrite_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Server Error",
                "general_unknown",
            ));
        }
        FAILING => {
            return Err(appwrite_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Server Error",
                "general_unknown",
            ));
        }
        _ => {}
    }
    let dir = dir.lock().unwrap();
    dir.sessions
        .get(session)
        .map(|(id, _, _)| id.clone())
        .ok_or_else(|| {
            appwrite_error(
                StatusCode::UNAUTHORIZED,
                "User (role: guests) missing scopes ([\"account\"])",
                "general_unauthorized_scope",
            )
        })
}

async fn account(State(app): State<Appwrite>, headers: HeaderMap) -> Response {
    let user = match session_user(&app.dir, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let mut dir = app.dir.lock().unwrap();
    *dir.account_calls.entry(user.clone()).or_default() += 1;
    let (_, verified, labels) = dir
        .sessions
        .values()
        .find(|(id, _, _)| *id == user)
        .cloned()
        .unwrap();
    Json(json!({
        "$id": user, "$createdAt": "2026-11-01T10:00:00.000+00:00",
        "$updatedAt": "2026-11-01T10:00:00.000+00:00", "name": format!("{user} example"),
        "registration": "2026-11-01T10:00:00.000+00:00", "status": true, "labels": labels,
        "passwordUpdate": "", "email": format!("{user}@example.com"), "phone": "",
        "emailVerification": verified, "phoneVerification": false, "mfa": false, "prefs": {},
        "targets": [], "accessedAt": "2026-12-01T10:00:00.000+00:00"
    }))
    .into_response()
}

async fn teams(State(app): State<Appwrite>, headers: HeaderMap) -> Response {
    let user = match session_user(&app.dir, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let dir = app.dir.lock().unwrap();
    let teams: Vec<Value> = dir
        .memberships
        .get(&user)
        .into_iter()
        .flatten()
        .map(|m| json!({"$id": m.team, "name": m.team, "total": 1, "prefs": {}}))
        .collect();
    Json(json!({"total": teams.len(), "teams": teams})).into_response()
}

async fn memberships(
    State(app): State<Appwrite>,
    Path(team): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = session_user(&app.dir, &headers).await {
        return r;
    }
    // `queries[]=` JSON queries, as the SDKs send them; only `equal` on userId is needed here.
    let wanted: Option<String> = query
        .iter()
        .filter(|(k, _)| k == "queries[]")
        .filter_map(|(_, v)| serde_json::from_str::<Value>(v).ok())
        .find(|q| q["method"] == "equal" && q["attribute"] == "userId")
        .and_then(|q| q["values"][0].as_str().map(str::to_owned));
    let dir = app.dir.lock().unwrap();
    let list: Vec<Value> = dir
        .memberships
        .iter()
        .filter(|(user, _)| wanted.as_ref().is_none_or(|w| w == *user))
        .flat_map(|(user, ms)| ms.iter().map(move |m| (user, m)))
        .filter(|(_, m)| m.team == team)
        .map(|(user, m)| {
            json!({
                "$id": m.membership, "userId": user, "userName": user, "userEmail": "",
                "teamId": m.team, "teamName": m.team, "invited": "", "joined": "",
                "confirm": m.confirm, "mfa": false, "roles": m.roles
            })
        })
        .collect();
    Json(json!({"total": list.len(), "memberships": list})).into_response()
}

impl Appwrite {
    async fn start() -> Self {
        let mut dir = Directory::default();
        dir.sessions
            .insert(ANN.into(), ("ann".into(), true, vec!["vip".into()]));
        dir.sessions
            .insert(BOB.into(), ("bob".into(), false, vec![]));
        dir.sessions
            .insert(SLOW.into(), ("sam".into(), false, vec![]));
        dir.memberships.insert(
            "ann".into(),
            vec![
                Member {
                    team: "t1".into(),
                    membership: "m1".into(),
                    roles: vec!["owner".into()],
                    confirm: true,
                },
                Member {
                    team: "t2".into(),
                    membership: "m2".into(),
                    roles: vec![],
                    confirm: false,
                },
            ],
        );
        let dir = Arc::new(Mutex::new(dir));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let app = Appwrite { dir, url };
        let router = Router::new()
            .route("/v1/account", get(account))
            .route("/v1/teams", get(teams))
            .route("/v1/teams/{team}/memberships", get(memberships))
            .with_state(app.clone());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        app
    }

    fn remove_from_team(&self, user: &str, team: &str) {
        let mut dir = self.dir.lock().unwrap();
        dir.memberships
            .get_mut(user)
            .unwrap()
            .retain(|m| m.team != team);
    }

    fn account_calls(&self, user: &str) -> usize {
        let dir = self.dir.lock().unwrap();
        dir.account_calls.get(user).copied().unwrap_or(0)
    }

    fn revoke(&self, session: &str) {
        self.dir.lock().unwrap().sessions.remove(session);
    }
}

/// The application's own resolver (`--auth-url`): a user for ANN, 401 otherwise. Records the
/// bodies it was sent.
async fn auth_url() -> (String, Arc<Mutex<Vec<Value>>>) {
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let record = seen.clone();
    let router = Router::new().route(
        "/resolve",
        post(move |Json(body): Json<Value>| {
            let record = record.clone();
            async move {
                record.lock().unwrap().push(body.clone());
                if body["session"] == ANN && body["project"] == "p" {
                    let user = json!({"$id": "ann", "name": "Ann"});
                    Json(json!({"userId": "ann", "roles": ["team:x"], "user": user}))
                        .into_response()
                } else {
                    StatusCode::UNAUTHORIZED.into_response()
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/resolve", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, seen)
}

async fn connect_with(url: &str, headers: &[(&'static str, &str)]) -> (Ws, Value) {
    let mut req = url.into_client_request().unwrap();
    for (name, value) in headers {
        req.headers_mut().insert(*name, value.parse().unwrap());
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("connect");
    let connected = next_json(&mut ws).await;
    assert_eq!(connected["type"], "connected", "{connected}");
    (ws, connected)
}

fn publish(server: &Server, channels: &[&str], roles: &[&str]) -> String {
    server.publish(json!({"project": "p", "channels": channels, "roles": roles, "payload": {}}))
}

/// Publishes one event per role set on channel `c`, then a public marker; returns which of
/// them each client received (by index into `role_sets`) and the subscription ids they came
/// with.
async fn received(
    server: &Server,
    clients: &mut [&mut Ws],
    role_sets: &[&[&str]],
) -> Vec<Vec<(usize, Value)>> {
    let ids: Vec<String> = role_sets
        .iter()
        .map(|roles| publish(server, &["c"], roles))
        .collect();
    let marker = publish(server, &["c"], &["any"]);
    let mut out = Vec::new();
    for ws in clients.iter_mut() {
        let mut got = Vec::new();
        loop {
            let v = next_json(ws).await;
            assert_eq!(v["type"], "event", "{v}");
            let id = v["data"]["id"].as_str().unwrap();
            if id == marker {
                break;
            }
            let i = ids.iter().position(|x| x == id).expect("a published event");
            got.push((i, v["data"]["subscriptions"].clone()));
        }
        out.push(got);
    }
    out
}

fn indices(got: &[(usize, Value)]) -> Vec<usize> {
    got.iter().map(|(i, _)| *i).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cookie_resolved_by_appwrite_gives_appwrites_roles() {
    let appwrite = Appwrite::start().await;
    let server = Server::start(&["--appwrite-endpoint", &appwrite.url]);
    let url = server.url("/v1/realtime?project=p&channels[]=c");
    let cookie = format!("a_session_p={ANN}; other=1");
    let (mut ann, hello) = connect_with(&url, &[("cookie", &cookie)]).await;
    // The Account object Appwrite returned, as Appwrite's realtime sends it.
    assert_eq!(hello["data"]["user"]["$id"], "ann", "{hello}");
    assert_eq!(hello["data"]["user"]["email"], "ann@example.com");
    let (mut guest, hello) = connect_with(&url, &[]).await;
    assert_eq!(hello["data"]["user"], Value::Null);
    let roles: &[&[&str]] = &[
        &["team:t1"],
        &["team:t1/owner"],
        &["member:m1"],
        &["label:vip"],
        &["user:ann/verified"],
        &["users/verified"],
        &["team:t2"],
        &["users/unverified"],
        &["guests"],
        &["user:bob"],
    ];
    let got = received(&server, &mut [&mut ann, &mut guest], roles).await;
    // t2's membership is not confirmed: no role from it.
    assert_eq!(indices(&got[0]), vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(indices(&got[1]), vec![8]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_header_and_fallback_cookies_carry_a_session_too() {
    let appwrite = Appwrite::start().await;
    let server = Server::start(&["--appwrite-endpoint", &appwrite.url]);
    let url = server.url("/v1/realtime?project=p&channels[]=c");
    let (_a, hello) = connect_with(&url, &[("x-appwrite-session", ANN)]).await;
    assert_eq!(hello["data"]["user"]["$id"], "ann");
    // As browsers send Appwrite's cookie: URL-encoded, and before the header.
    let encoded = format!("a_session_p={}", ANN.replace('=', "%3D"));
    let (_e, hello) =
        connect_with(&url, &[("cookie", &encoded), ("x-appwrite-session", BOB)]).await;
    assert_eq!(hello["data"]["user"]["$id"], "ann");
    let fallback = json!({"a_session_p": BOB}).to_string();
    let (_b, hello) = connect_with(&url, &[("x-fallback-cookies", &fallback)]).await;
    assert_eq!(hello["data"]["user"]["$id"], "bob");
    // A cookie of another project is not this project's session.
    let other = format!("a_session_q={ANN}");
    let (_c, hello) = connect_with(&url, &[("cookie", &other)]).await;
    assert_eq!(hello["data"]["user"], Value::Null);
    // A session nobody knows: a guest, as Appwrite makes it.
    let (_d, hello) = connect_with(&url, &[("cookie", "a_session_p=bm9ib2R5")]).await;
    assert_eq!(hello["data"]["user"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_with_a_session_rekeys_the_subscriptions_keeping_their_ids() {
    let appwrite = Appwrite::start().await;
    let server = Server::start(&["--appwrite-endpoint", &appwrite.url]);
    let (mut ws, hello) = connect_with(&server.url("/v1/realtime?project=p"), &[]).await;
    assert_eq!(hello["data"]["user"], Value::Null);
    // Back to back, as SDK 25+ sends them: the subscribe is answered at once (as a guest),
    // the authentication once Appwrite has answered.
    send(
        &mut ws,
        r#"{"type":"subscribe","data":[{"subscriptionId":"s1","channels":["c","account"]}]}"#,
    )
    .await;
    send(
        &mut ws,
        &json!({"type": "authentication", "data": {"session": ANN}}).to_string(),
    )
    .await;
    let sub = next_json(&mut ws).await;
    assert_eq!(sub["data"]["to"], "subscribe", "{sub}");
    let auth = next_json(&mut ws).await;
    assert_eq!(auth["type"], "response", "{auth}");
    assert_eq!(auth["data"]["to"], "authentication");
    assert_eq!(auth["data"]["success"], true);
    assert_eq!(auth["data"]["user"]["email"], "ann@example.com");
    let got = received(&server, &mut [&mut ws], &[&["team:t1"], &["guests"]]).await;
    assert_eq!(got[0], vec![(0, json!(["s1"]))]);
    // `account` now listens to ann's account channel too, under the same id.
    let id = publish(&server, &["account.ann"], &["user:ann"]);
    let v = next_json(&mut ws).await;
    assert_eq!(
        (v["data"]["id"].as_str(), &v["data"]["subscriptions"]),
        (Some(id.as_str()), &json!(["s1"]))
    );

    // A session Appwrite refuses: 1003, and the connection stays ann.
    send(
        &mut ws,
        r#"{"type":"authentication","data":{"session":"bm9ib2R5"}}"#,
    )
    .await;
    let refused = next_json(&mut ws).await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["data"]["code"], 1003);
    assert_eq!(refused["data"]["message"], "Session is not valid.");
    let got = received(&server, &mut [&mut ws], &[&["team:t1"]]).await;
    assert_eq!(indices(&got[0]), vec![0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_failing_resolver_keeps_clients_guests_and_blocks_nobody() {
    let appwrite = Appwrite::start().await;
    let server = Server::start(&[
        "--appwrite-endpoint",
        &appwrite.url,
        "--auth-timeout",
        "1s",
        "--shards",
        "1",
    ]);
    let url = server.url("/v1/realtime?project=p&channels[]=c");
    let started = Instant::now();
    let slow_url = url.clone();
    let slow = tokio::spawn(async move {
        let cookie = format!("a_session_p={SLOW}");
        let (ws, hello) = connect_with(&slow_url, &[("cookie", &cookie)]).await;
        (ws, hello, started.elapsed())
    });
    // Meanwhile, on the same shard, others connect and get events at once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut guest, _) = connect_with(&url, &[]).await;
    let t = Instant::now();
    let id = publish(&server, &["c"], &["any"]);
    let v = next_json(&mut guest).await;
    assert_eq!(v["data"]["id"], id);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    let (_slow, hello, waited) = slow.await.unwrap();
    assert_eq!(hello["data"]["user"], Value::Null, "{hello}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(2900),
        "the upgrade waited {waited:?} for a 1 s timeout"
    );

    // A failing Appwrite: guests at the handshake, and a retryable error to `authentication`.
    let cookie = format!("a_session_p={FAILING}");
    let (mut ws, hello) = connect_with(&url, &[("cookie", &cookie)]).await;
    assert_eq!(hello["data"]["user"], Value::Null);
    send(
        &mut ws,
        &json!({"type": "authentication", "data": {"session": FAILING}}).to_string(),
    )
    .await;
    let e = next_json(&mut ws).await;
    assert_eq!(e["data"]["code"], 1013, "{e}");
    assert!(
        e["data"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Session could not be verified now"),
        "{e}"
    );
    send(&mut ws, r#"{"type":"ping"}"#).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
    assert!(server.metric_with("herald_session_resolutions_total", "unavailable") >= 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_resolved_once_per_cache_lifetime() {
    let appwrite = Appwrite::start().await;
    let server = Server::start(&["--appwrite-endpoint", &appwrite.url]);
    let url = server.url("/v1/realtime?project=p&channels[]=c");
    let cookie = format!("a_session_p={ANN}");
    // Five at once: one call to Appwrite between them.
    let clients = futures_util::future::join_all((0..5).map(|_| {
        let (url, cookie) = (url.clone(), cookie.clone());
        async move { connect_with(&url, &[("cookie", &cookie)]).await }
    }))
    .await;
    for (_, hello) in &clients {
        assert_eq!(hello["data"]["user"]["$id"], "ann");
    }
    assert_eq!(appwrite.account_calls("ann"), 1);

    let server = Server::start(&[
        "--appwrite-endpoint",
        &appwrite.url,
        "--auth-cache-ttl",
        "1ms",
    ]);
    let url = server.url("/v1/realtime?project=p&channels[]=c");
    for _ in 0..2 {
        let (_ws, hello) = connect_with(&url, &[("cookie", &cookie)]).await;
        assert_eq!(hello["data"]["user"]["$id"], "ann");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(appwrite.account_calls("ann"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_applications_resolver_gets_project_and_session_and_names_the_user() {
    let (url, seen) = auth_url().await;
    let server = Server::start(&["--auth-url", &url]);
    let ws_url = server.url("/v1/realtime?project=p&channels[]=c");
    let cookie = format!("a_session_p={ANN}");
    let (mut ann, hello) = connect_with(&ws_url, &[("cookie", &cookie)]).await;
    assert_eq!(hello["data"]["user"], json!({"$id": "ann", "name": "Ann"}));
    assert_eq!(
        seen.lock().unwrap()[0],
        json!({"project": "p", "session": ANN})
    );
    let (mut other, hello) = connect_with(&ws_url, &[("cookie", "a_session_p=eA==")]).await;
    assert_eq!(hello["data"]["user"], Value::Null);
    let roles: &[&[&str]] = &[&["team:x"], &["user:ann"], &["guests"]];
    let got = received(&server, &mut [&mut ann, &mut other], roles).await;
    assert_eq!(indices(&got[0]), vec![0, 1]);
    assert_eq!(indices(&got[1]), vec![2]);
}

/// Publishes `roles` events (and a marker) until every client receives exactly the events
/// `wanted` (indices into `roles`): a permission change takes effect once the sessions are
/// resolved again. Returns each client's subscription ids of the last round.
async fn until_received(
    server: &Server,
    clients: &mut [&mut Ws],
    roles: &[&[&str]],
    wanted: &[usize],
) -> Vec<Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = received(server, clients, roles).await;
        if got.iter().all(|g| indices(g) == wanted) {
            return got
                .iter()
                .map(|g| g.iter().map(|(_, ids)| ids.clone()).collect())
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "the change never took effect: still {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads whatever is queued for `ws` until it has been quiet for 200 ms.
async fn drain(ws: &mut Ws) {
    while next_json_within(ws, Duration::from_millis(200))
        .await
        .is_some()
    {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permission_change_reaches_every_node_and_user_events_reach_only_that_user() {
    let redis = RedisServer::start(&[]);
    let appwrite = Appwrite::start().await;
    let url = redis.url();
    let args = [
        "--redis",
        url.as_str(),
        "--appwrite-endpoint",
        appwrite.url.as_str(),
        "--appwrite-pubsub",
    ];
    let nodes = [Server::start(&args), Server::start(&args)];
    for n in &nodes {
        let deadline = Instant::now() + Duration::from_secs(15);
        while n.get("/readyz").0 != 200 {
            assert!(Instant::now() < deadline, "node never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let ann_cookie = format!("a_session_p={ANN}");
    let bob_cookie = format!("a_session_p={BOB}");
    let mut anns = Vec::new();
    let mut ids = Vec::new();
    let mut bobs = Vec::new();
    for n in &nodes {
        let url = n.url("/v1/realtime?project=p&channels[]=c");
        let (ws, hello) = connect_with(&url, &[("cookie", &ann_cookie)]).await;
        anns.push(ws);
        ids.push(hello["data"]["subscriptions"].clone());
        let (ws, _) = connect_with(&url, &[("cookie", &bob_cookie)]).await;
        bobs.push(ws);
    }
    let [a0, a1] = &mut anns[..] else {
        unreachable!()
    };
    let [b0, b1] = &mut bobs[..] else {
        unreachable!()
    };
    let roles: &[&[&str]] = &[&["user:ann"], &["team:t1"], &["user:bob"]];
    let got = received(&nodes[0], &mut [a0, a1, b0, b1], roles).await;
    assert_eq!(
        got.iter().map(|g| indices(g)).collect::<Vec<_>>(),
        vec![vec![0, 1], vec![0, 1], vec![2], vec![2]],
        "user:ann reaches exactly ann's connections on both nodes"
    );

    // Ann leaves team t1; the application says so through one node's publish API.
    appwrite.remove_from_team("ann", "t1");
    let (status, body) = nodes[0].publish_raw(
        &json!({"project": "p", "userId": "ann", "permissionsChanged": true, "channels": []})
            .to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let now = until_received(
        &nodes[1],
        &mut [a0, a1],
        &[&["team:t1"], &["user:ann"]],
        &[1],
    )
    .await;
    // Re-keyed, not re-subscribed: the same subscription ids.
    assert_eq!(now, vec![vec![ids[0].clone()], vec![ids[1].clone()]]);

    // Back in the team, told through a plain stream entry this time.
    appwrite.dir.lock().unwrap().memberships.insert(
        "ann".into(),
        vec![Member {
            team: "t1".into(),
            membership: "m9".into(),
            roles: vec![],
            confirm: true,
        }],
    );
    redis.xadd(
        "herald:events",
        &[
            ("project", "p"),
            ("permissionsChanged", "true"),
            ("userId", "ann"),
        ],
    );
    until_received(&nodes[0], &mut [a0, a1], &[&["team:t1"]], &[0]).await;

    // Out again, told by Appwrite itself: its pub/sub message for the membership's deletion.
    appwrite.remove_from_team("ann", "t1");
    let message = json!({
        "project": "p", "roles": ["team:t1"], "permissionsChanged": true, "userId": "ann",
        "data": {"events": ["teams.t1.memberships.m9.delete"], "channels": ["memberships"],
                 "timestamp": "2026-12-01T12:00:00.000+00:00", "payload": {"$id": "m9"}}
    });
    let listeners: i64 = redis::cmd("PUBLISH")
        .arg("realtime")
        .arg(message.to_string())
        .query(&mut redis.conn())
        .expect("PUBLISH");
    assert_eq!(listeners, 2, "both nodes listen to Appwrite's pub/sub");
    until_received(
        &nodes[1],
        &mut [a0, a1],
        &[&["team:t1"], &["user:ann"]],
        &[1],
    )
    .await;
    // Bob's connections were left as they were, and his session was not asked about again.
    assert_eq!(appwrite.account_calls("bob"), 2);
    drain(b0).await;
    drain(b1).await;
    let got = received(&nodes[1], &mut [b0, b1], &[&["team:t1"], &["user:bob"]]).await;
    assert_eq!(indices(&got[0]), vec![1]);
    assert_eq!(indices(&got[1]), vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_permission_change_a_revoked_session_is_a_guest_and_a_failing_appwrite_closes_1013()
{
    let appwrite = Appwrite::start().await;
    let server = Server::start(&["--appwrite-endpoint", &appwrite.url]);
    let url = server.url("/v1/realtime?project=p&channels[]=c");
    let (mut ann, _) = connect_with(&url, &[("cookie", &format!("a_session_p={ANN}"))]).await;
    let (mut bob, _) = connect_with(&url, &[("cookie", &format!("a_session_p={BOB}"))]).await;
    let change = |user: &str| {
        let body = json!({"project": "p", "userId": user, "permissionsChanged": true});
        let (status, reply) = server.publish_raw(&body.to_string());
        assert_eq!(status, 200, "{reply}");
    };
    // Ann signed out everywhere: her session no longer resolves, so she is a guest now.
    appwrite.revoke(ANN);
    change("ann");
    until_received(
        &server,
        &mut [&mut ann],
        &[&["user:ann"], &["guests"]],
        &[1],
    )
    .await;
    drain(&mut bob).await;
    // Appwrite cannot answer: bob's connection is closed (1013), never kept with old roles.
    appwrite.dir.lock().unwrap().failing = true;
    change("bob");
    let e = next_json(&mut bob).await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["data"]["code"], 1013);
    assert_eq!(
        e["data"]["message"],
        "Session could not be verified now; try again later."
    );
    assert_eq!(
        common::expect_close(&mut bob, Duration::from_secs(5)).await,
        1013
    );
}
