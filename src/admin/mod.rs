//! The admin HTTP listener on the control plane: publish API, health, readiness, metrics, and
//! the live dashboard (`GET /`, fed by `GET /v1/stats`).
//!
//! Owns HTTP routes, their JSON errors and their guards: publishing needs
//! `Content-Type: application/json` (so a web page cannot publish with a CORS "simple
//! request"), and with a token configured, publishing, metrics and stats need it as a bearer
//! token; without one, only requests addressed to a loopback host are answered (see
//! [`loopback_host_only`]). Publishing goes through the [`Bus`]; this module must not reach
//! into shards.

mod dashboard;
mod stats;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::bus::{Bus, BusError, PublishRequest};
use crate::config::Secret;
use crate::hub::Hub;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct AdminState {
    pub bus: Arc<dyn Bus>,
    pub metrics: Metrics,
    pub default_project: String,
    pub max_publish_bytes: usize,
    /// Required as `Authorization: Bearer` on publishing, metrics and stats when set.
    pub token: Option<Arc<Secret>>,
    /// For readiness: every shard must be running.
    pub hub: Arc<Hub>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/v1/events", post(publish))
        .route(
            "/healthz",
            get(|| async { json_response(StatusCode::OK, json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/stats", get(stats))
        .route("/", get(dashboard::page))
        .route("/dashboard.js", get(dashboard::script))
        .route("/dashboard.css", get(dashboard::style))
        // Browsers ask for it with every page; an empty answer keeps their consoles clean.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such admin endpoint") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            loopback_host_only,
        ))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Without a token the admin API is on loopback only (the gateway refuses anything else), and
/// answers only requests addressed to a loopback host: a web page whose own host name was
/// pointed at 127.0.0.1 (DNS rebinding) is same-origin with the admin API, so the browser
/// would let it read the stats and publish, but its requests name its own host. Health checks
/// stay open to any Host; a request without one (HTTP/1.0) comes from no browser.
async fn loopback_host_only(
    State(st): State<AdminState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let health = matches!(req.uri().path(), "/healthz" | "/readyz");
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or(""));
    if st.token.is_some() || health || host.is_none_or(is_loopback_host) {
        return next.run(req).await;
    }
    error(
        StatusCode::MISDIRECTED_REQUEST,
        "without an admin token the admin API answers only requests to a loopback host \
         (127.0.0.1, [::1] or localhost)",
    )
}

/// Whether a Host header names this machine's loopback (with or without a port).
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    json_response(status, json!({"code": status.as_u16(), "message": message}))
}

/// Whether `headers` carry the configured token (always true without one).
fn authorized(st: &AdminState, headers: &HeaderMap) -> bool {
    let Some(token) = &st.token else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    constant_time_eq(given.as_bytes(), token.expose().as_bytes())
}

/// Compares without returning early, so the time taken does not tell how much of a guess was
/// right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

fn unauthorized() -> Response {
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "this admin API needs Authorization: Bearer <admin token>",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

/// Whether the request declares a JSON body (`application/json`, parameters allowed).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

async fn publish(State(st): State<AdminState>, headers: HeaderMap, body: Body) -> Response {
    if !authorized(&st, &headers) {
        return unauthorized();
    }
    if !is_json(&headers) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the event as Content-Type: application/json",
        );
    }
    let too_big = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body exceeds {} bytes", st.max_publish_bytes),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > st.max_publish_bytes) {
        return too_big();
    }
    let Ok(bytes) = axum::body::to_bytes(body, st.max_publish_bytes).await else {
        return too_big();
    };
    let req: PublishRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid event: {e}")),
    };
    let event = match req.validate(&st.default_project) {
        Ok(e) => e,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid event: {e}")),
    };
    match st.bus.publish(event).await {
        Ok(id) => json_response(StatusCode::OK, json!({"id": id})),
        Err(BusError::Invalid(m)) => error(StatusCode::BAD_REQUEST, &m),
        Err(ref e @ BusError::Unreplicated { ref id, acked, .. }) => {
            // The id lets the publisher tell a retry from a new event.
            let body = json!({"code": 503, "message": e.to_string(), "id": id, "replicas": acked});
            json_response(StatusCode::SERVICE_UNAVAILABLE, body)
        }
        Err(e @ (BusError::Overloaded | BusError::Unavailable(_))) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            r
        }
    }
}

async fn readyz(State(st): State<AdminState>) -> Response {
    if let Some(shard) = st.hub.dead_shard() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("shard {shard} has stopped"),
        );
    }
    if st.hub.is_draining() {
        // Load balancers stop sending new clients while the connections close with 1001.
        return error(StatusCode::SERVICE_UNAVAILABLE, "draining for shutdown");
    }
    if st.bus.ready() {
        json_response(
            StatusCode::OK,
            json!({"status": "ready", "bus": st.bus.name()}),
        )
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the event bus is not connected",
        )
    }
}

async fn metrics(State(st): State<AdminState>, headers: HeaderMap) -> Response {
    if !authorized(&st, &headers) {
        return unauthorized();
    }
    st.metrics.bus_ready.set(i64::from(st.bus.ready()));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

/// The counters of `/metrics` as JSON, with what the page needs besides.
async fn stats(State(st): State<AdminState>, headers: HeaderMap) -> Response {
    if !authorized(&st, &headers) {
        return unauthorized();
    }
    st.metrics.bus_ready.set(i64::from(st.bus.ready()));
    let body = json!({
        "time_ms": crate::event::now_ms(),
        "default_project": st.default_project,
        "draining": st.hub.is_draining(),
        "bus": {"name": st.bus.name(), "ready": st.bus.ready()},
        "metrics": stats::families_json(&st.metrics.gather()),
    });
    let mut r = json_response(StatusCode::OK, body);
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::{constant_time_eq, is_loopback_host};

    #[test]
    fn loopback_hosts_are_told_from_others() {
        for host in [
            "127.0.0.1:9506",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]:9506",
            "[::1]",
            "localhost:9506",
            "LOCALHOST",
            "a.localhost:1",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example:9506",
            "evil.example",
            "10.0.0.1:9506",
            "[2001:db8::1]:9506",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdeX", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcde", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef0", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"", b"0123456789abcdef"));
    }
}
