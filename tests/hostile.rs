//! What a hostile or careless peer gets from herald, over real sockets: each test names the
//! attack, asserts the answer the attacker sees, and that nobody else's events are affected.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Server, connect, next_json, next_json_within};
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
            "at most 256 bytes",
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
