//! The admin HTTP listener on the control plane: publish API, health, readiness, metrics.
//!
//! Owns HTTP routes and their JSON errors. Publishing goes through the [`Bus`]; this module
//! must not reach into shards. Bind it to a private address: it has no authentication.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::bus::{Bus, BusError, PublishRequest};
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct AdminState {
    pub bus: Arc<dyn Bus>,
    pub metrics: Metrics,
    pub default_project: String,
    pub max_publish_bytes: usize,
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
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such admin endpoint") })
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
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

async fn publish(State(st): State<AdminState>, headers: HeaderMap, body: Body) -> Response {
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
        Err(e @ (BusError::Overloaded | BusError::Unavailable(_))) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            r
        }
    }
}

async fn readyz(State(st): State<AdminState>) -> Response {
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

async fn metrics(State(st): State<AdminState>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}
