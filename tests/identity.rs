//! Users over real sockets: JWTs at the handshake and in `authentication`, the roles they give,
//! and the `account` channel bound to the user.

mod common;

use std::time::Duration;

use common::{Server, Ws, connect, connect_with_header, expect_close, next_json, send};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

const SECRET: &str = "appwrite-openssl-key";

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// A token as Appwrite's `account.createJWT()` mints it (HS256, `userId`, `sessionId`, `exp`).
fn appwrite_jwt(user: &str) -> String {
    hs256(json!({"userId": user, "sessionId": "s1", "exp": now() + 900}))
}

fn hs256(claims: Value) -> String {
    let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
}

fn server() -> Server {
    Server::start(&["--jwt-secret", SECRET])
}

/// Publishes on `channels` readable by `roles`; returns the event id.
fn publish(server: &Server, channels: &[&str], roles: &[&str]) -> String {
    server.publish(json!({"project": "p", "channels": channels, "roles": roles, "payload": {}}))
}

/// The next event's id and `subscriptions`, or None if nothing comes within 300 ms.
async fn next_event(ws: &mut Ws) -> Option<(String, Value)> {
    let v = common::next_json_within(ws, Duration::from_millis(300)).await?;
    assert_eq!(v["type"], "event", "{v}");
    Some((
        v["data"]["id"].as_str().unwrap().to_owned(),
        v["data"]["subscriptions"].clone(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_in_the_url_or_header_makes_the_connection_its_user() {
    let server = server();
    let (mut ann, hello) = connect(&server.url(&format!(
        "/v1/realtime?project=p&channels[]=c&jwt={}",
        appwrite_jwt("ann")
    )))
    .await;
    assert_eq!(hello["data"]["user"]["$id"], "ann", "{hello}");
    let (mut bob, hello) = connect_with_header(
        &server.url("/v1/realtime?project=p&channels[]=c"),
        "x-appwrite-jwt",
        &appwrite_jwt("bob"),
    )
    .await;
    assert_eq!(hello["data"]["user"]["$id"], "bob", "{hello}");
    let (mut guest, hello) = connect(&server.url("/v1/realtime?project=p&channels[]=c")).await;
    assert_eq!(hello["data"]["user"], Value::Null);

    // Private to ann; to every signed-in user; to guests only; to anyone.
    let for_ann = publish(&server, &["c"], &["user:ann"]);
    let for_users = publish(&server, &["c"], &["users"]);
    let for_guests = publish(&server, &["c"], &["guests"]);
    let for_all = publish(&server, &["c"], &["any"]);
    let ids = |got: Vec<(String, Value)>| got.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
    let mut got = Vec::new();
    while let Some(e) = next_event(&mut ann).await {
        got.push(e);
    }
    assert_eq!(
        ids(got),
        [for_ann.clone(), for_users.clone(), for_all.clone()]
    );
    let mut got = Vec::new();
    while let Some(e) = next_event(&mut bob).await {
        got.push(e);
    }
    assert_eq!(ids(got), [for_users.clone(), for_all.clone()]);
    let mut got = Vec::new();
    while let Some(e) = next_event(&mut guest).await {
        got.push(e);
    }
    assert_eq!(ids(got), [for_guests, for_all]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roles_claim_adds_teams_and_labels() {
    let server = server();
    let token = hs256(json!({"sub": "ann", "exp": now() + 60, "roles": ["team:t1", "label:vip"]}));
    let (mut ann, _) =
        connect(&server.url(&format!("/v1/realtime?project=p&channels[]=c&jwt={token}"))).await;
    let team = publish(&server, &["c"], &["team:t1"]);
    let other = publish(&server, &["c"], &["team:t2"]);
    let label = publish(&server, &["c"], &["label:vip"]);
    assert_eq!(next_event(&mut ann).await.unwrap().0, team);
    assert_eq!(next_event(&mut ann).await.unwrap().0, label, "not {other}");
    assert!(next_event(&mut ann).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_at_the_handshake_get_401_and_a_close() {
    let server = server();
    let forged = {
        let key = EncodingKey::from_secret(b"not-the-secret").unwrap();
        let claims = json!({"userId": "ann", "exp": now() + 60});
        encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
    };
    let expired = hs256(json!({"userId": "ann", "exp": now() - 3600}));
    for (token, words) in [
        (forged, "signature"),
        (expired, "expired"),
        ("garbage".to_owned(), "malformed"),
    ] {
        let (mut ws, err) = connect_with_header(
            &server.url("/v1/realtime?project=p&channels[]=c"),
            "x-appwrite-jwt",
            &token,
        )
        .await;
        assert_eq!(err["type"], "error", "{err}");
        assert_eq!(err["data"]["code"], 401, "{err}");
        let message = err["data"]["message"].as_str().unwrap();
        assert!(message.starts_with("Failed to verify JWT."), "{message}");
        assert!(message.contains(words), "{words}: {message}");
        assert_eq!(expect_close(&mut ws, Duration::from_secs(5)).await, 1008);
    }
    // A JWT and a session cookie together: 403, as Appwrite answers.
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(server.url(
            &format!("/v1/realtime?project=p&jwt={}", appwrite_jwt("ann")),
        ))
        .unwrap();
    req.headers_mut()
        .insert("cookie", "a_session_p=abc".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let err = next_json(&mut ws).await;
    assert_eq!(err["data"]["code"], 403, "{err}");
    assert_eq!(expect_close(&mut ws, Duration::from_secs(5)).await, 1008);
    // Without a configured key a token cannot be taken: the client is told, not made a guest.
    let unconfigured = Server::start(&[]);
    let (mut ws, err) = connect_with_header(
        &unconfigured.url("/v1/realtime?project=p"),
        "x-appwrite-jwt",
        &appwrite_jwt("ann"),
    )
    .await;
    assert_eq!(err["data"]["code"], 401, "{err}");
    assert!(
        err["data"]["message"]
            .as_str()
            .unwrap()
            .contains("--jwt-secret")
    );
    assert_eq!(expect_close(&mut ws, Duration::from_secs(5)).await, 1008);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_with_a_jwt_keeps_the_subscriptions_and_binds_the_account_channel() {
    let server = server();
    let (mut ws, hello) = connect(&server.url("/v1/realtime?project=p")).await;
    assert_eq!(hello["data"]["user"], Value::Null);
    send(
        &mut ws,
        r#"{"type":"subscribe","data":[{"subscriptionId":"mine","channels":["account","c"]}]}"#,
    )
    .await;
    let reply = next_json(&mut ws).await;
    assert_eq!(
        reply["data"]["subscriptions"][0]["channels"],
        json!(["account", "c"])
    );
    // As a guest the private event does not come, on a channel it does listen to.
    publish(&server, &["c"], &["user:ann"]);
    assert!(next_event(&mut ws).await.is_none());

    // A refused token (or one for another project) changes nothing.
    send(
        &mut ws,
        r#"{"type":"authentication","data":{"jwt":"nope"}}"#,
    )
    .await;
    let err = next_json(&mut ws).await;
    assert_eq!(err["data"]["code"], 1003, "{err}");
    let elsewhere = hs256(json!({"userId": "ann", "projectId": "q", "exp": now() + 60}));
    let auth = json!({"type": "authentication", "data": {"jwt": elsewhere}});
    send(&mut ws, &auth.to_string()).await;
    let err = next_json(&mut ws).await;
    assert!(
        err["data"]["message"]
            .as_str()
            .unwrap()
            .contains("another project"),
        "{err}"
    );
    publish(&server, &["c"], &["user:ann"]);
    assert!(next_event(&mut ws).await.is_none());

    let auth = json!({"type": "authentication", "data": {"jwt": appwrite_jwt("ann")}});
    send(&mut ws, &auth.to_string()).await;
    let reply = next_json(&mut ws).await;
    assert_eq!(
        reply,
        json!({"type": "response", "data": {"to": "authentication", "success": true, "user": {"$id": "ann"}}})
    );
    let private = publish(&server, &["account.ann"], &["user:ann"]);
    let (id, subs) = next_event(&mut ws).await.expect("the user's event");
    assert_eq!((id, subs), (private, json!(["mine"])));
    let public = publish(&server, &["c"], &["any"]);
    assert_eq!(next_event(&mut ws).await.unwrap().0, public);

    // Subscribing as ann: `account.<action>` is bound to ann, another user's account dropped.
    send(
        &mut ws,
        r#"{"type":"subscribe","data":[{"subscriptionId":"more","channels":["account.update","account.bob","d"]}]}"#,
    )
    .await;
    let reply = next_json(&mut ws).await;
    assert_eq!(
        reply["data"]["subscriptions"][0]["channels"],
        json!(["account.ann.update", "d"])
    );

    // Signing in as someone else rebinds what was bound to ann.
    let auth = json!({"type": "authentication", "data": {"jwt": appwrite_jwt("bob")}});
    send(&mut ws, &auth.to_string()).await;
    assert_eq!(next_json(&mut ws).await["data"]["user"]["$id"], "bob");
    publish(&server, &["account.ann.update"], &["user:ann"]);
    let for_bob = publish(&server, &["account.bob.update"], &["user:bob"]);
    let (id, subs) = next_event(&mut ws).await.expect("bob's event");
    assert_eq!((id, subs), (for_bob, json!(["more"])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_channels_of_a_user_include_its_account() {
    let server = server();
    let (_, hello) = connect(&server.url(&format!(
        "/v1/realtime?project=p&channels[]=account&channels[]=documents&channels[]=account.123&jwt={}",
        appwrite_jwt("ann")
    )))
    .await;
    assert_eq!(
        hello["data"]["channels"],
        json!(["account", "account.ann", "documents"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_signed_by_the_application_verify_with_its_public_key() {
    let dir = std::env::temp_dir().join(format!("herald-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let private = dir.join("private.pem");
    let public = dir.join("public.pem");
    let ok = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&private)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
        && std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .status()
            .unwrap()
            .success();
    assert!(ok, "openssl could not make a key pair");
    let server = Server::start(&["--jwt-public-key", public.to_str().unwrap()]);
    let key = EncodingKey::from_rsa_pem(&std::fs::read(&private).unwrap()).unwrap();
    let claims = json!({"sub": "ann", "exp": now() + 60});
    let token = encode(&Header::new(Algorithm::RS256), &claims, &key).unwrap();
    let (mut ws, hello) =
        connect(&server.url(&format!("/v1/realtime?project=p&channels[]=c&jwt={token}"))).await;
    assert_eq!(hello["data"]["user"]["$id"], "ann");
    let id = publish(&server, &["c"], &["user:ann"]);
    assert_eq!(next_event(&mut ws).await.unwrap().0, id);
    // An HS256 token is not accepted when only a public key is configured.
    let (_, err) = connect_with_header(
        &server.url("/v1/realtime?project=p"),
        "x-appwrite-jwt",
        &appwrite_jwt("ann"),
    )
    .await;
    assert_eq!(err["data"]["code"], 401, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
