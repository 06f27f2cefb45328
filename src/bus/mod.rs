//! Buses: where events come from. The embedded bus is in-process; others (Redis Streams) plug in
//! behind the same trait.
//!
//! Owns the publish request format and the one validation every source's events pass (the API,
//! stream entries, Appwrite's pub/sub), the [`Bus`] trait, and the [`Outlet`] every bus hands
//! its events to. A bus assigns ids and encodes each event once; it must never touch
//! connections or shards directly.

pub mod embedded;
pub mod lag;
pub mod redis;
pub mod streams;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::event::{EncodedEvent, Event, ID_RULE, NAME_RULE, is_valid_id, is_valid_name};
use crate::history::History;
use crate::hub::{Hub, HubError};
use crate::mailbox::{ReplayError, ReplayQuery};
use crate::metrics::Metrics;

use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BusError {
    #[error("{0}")]
    Invalid(String),
    #[error("the gateway is overloaded; retry shortly")]
    Overloaded,
    #[error("the event bus is unavailable: {0}")]
    Unavailable(String),
    /// Written to the primary, but fewer replicas than asked confirmed it in time: a failover
    /// now could lose it, and publishing it again could deliver it twice.
    #[error(
        "event {id} was written to the Redis primary but only {acked} of {wanted} replicas \
         confirmed it within {waited:?}; it may be lost if the primary fails now"
    )]
    Unreplicated {
        id: String,
        acked: u64,
        wanted: u32,
        waited: std::time::Duration,
    },
}

/// `POST /v1/events` body, and what `herald publish` sends.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    #[serde(default)]
    pub project: Option<String>,
    #[serde(default)]
    pub channels: Vec<String>,
    #[serde(default)]
    pub events: Vec<String>,
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    #[serde(default)]
    pub payload: Value,
    /// With `userId`: that user's memberships changed (Appwrite's `permissionsChanged`), so
    /// every node resolves the sessions of its connections again. `channels` may then be
    /// empty: a permission change alone, with no event.
    #[serde(
        default,
        rename = "permissionsChanged",
        skip_serializing_if = "is_false"
    )]
    pub permissions_changed: bool,
    #[serde(default, rename = "userId", skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `user`'s roles in `project` changed: connections of that user resolve their session again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionChange {
    pub project: String,
    pub user: String,
}

/// A validated publish request with the project resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub project: String,
    pub channels: Vec<String>,
    pub events: Vec<String>,
    pub roles: Vec<String>,
    pub payload: Value,
    pub permissions_changed: Option<PermissionChange>,
}

/// Most channels, roles or event names one event may carry (each subscriber's match walks them).
pub const MAX_EVENT_NAMES: usize = 100;

fn over_limits(field: &str, names: &[String]) -> Option<String> {
    if names.len() > MAX_EVENT_NAMES {
        return Some(format!("{field} must list at most {MAX_EVENT_NAMES} names"));
    }
    names
        .iter()
        .any(|n| !is_valid_name(n))
        .then(|| format!("{field} must be names of {NAME_RULE}"))
}

impl PublishRequest {
    /// Checks an event from any source and resolves its project and default roles; the one
    /// place that says what a valid event is, so every source refuses with the same words.
    pub fn validate(self, default_project: &str) -> Result<NewEvent, BusError> {
        let invalid = |m: &str| Err(BusError::Invalid(m.to_owned()));
        if self.channels.is_empty() && !self.permissions_changed {
            return invalid("channels must list at least one channel");
        }
        if self.permissions_changed && !self.user_id.as_deref().is_some_and(is_valid_id) {
            return Err(BusError::Invalid(format!(
                "permissionsChanged needs the userId whose permissions changed: {ID_RULE}"
            )));
        }
        if self.channels.iter().any(|c| c.is_empty()) {
            return invalid("channels must not contain empty names");
        }
        if let Some(m) = over_limits("channels", &self.channels) {
            return Err(BusError::Invalid(m));
        }
        if let Some(m) = self.roles.as_deref().and_then(|r| over_limits("roles", r)) {
            return Err(BusError::Invalid(m));
        }
        if let Some(m) = over_limits("events", &self.events) {
            return Err(BusError::Invalid(m));
        }
        let payload = match self.payload {
            // A permission change alone carries no event, so it needs no payload.
            Value::Null if self.channels.is_empty() => Value::Object(Default::default()),
            p if p.is_object() => p,
            _ => return invalid("payload must be a JSON object"),
        };
        let roles = match self.roles {
            None => vec![crate::event::ANY_ROLE.to_owned()],
            Some(r) if r.is_empty() => return invalid("roles, when given, must not be empty"),
            Some(r) if r.iter().any(|r| r.is_empty()) => {
                return invalid("roles must not contain empty names");
            }
            Some(r) => r,
        };
        let project = match self.project {
            Some(p) if !p.is_empty() => p,
            _ => default_project.to_owned(),
        };
        if !is_valid_id(&project) {
            return Err(BusError::Invalid(format!(
                "project must be a project id: {ID_RULE}"
            )));
        }
        let permissions_changed = match (self.permissions_changed, self.user_id) {
            (true, Some(user)) => Some(PermissionChange {
                project: project.clone(),
                user,
            }),
            _ => None,
        };
        Ok(NewEvent {
            project,
            channels: self.channels,
            events: self.events,
            roles,
            payload,
            permissions_changed,
        })
    }
}

impl NewEvent {
    /// Whether there is an event to deliver (a permission change alone has no channels).
    pub fn is_event(&self) -> bool {
        !self.channels.is_empty()
    }

    /// The event with the id and timestamp its bus assigned.
    pub fn into_event(self, id: String, timestamp: String) -> Event {
        Event {
            id,
            project: self.project,
            channels: self.channels,
            events: self.events,
            roles: self.roles,
            timestamp,
            payload: self.payload,
        }
    }
}

/// Where every bus hands its encoded events: all shards (through the hub), the node's history
/// and the published-events metric, together, so an event is never delivered without being
/// replayable or the other way round.
pub struct Outlet {
    hub: Arc<Hub>,
    metrics: Metrics,
}

impl Outlet {
    pub fn new(hub: Arc<Hub>, metrics: Metrics) -> Self {
        Self { hub, metrics }
    }

    /// Tells every shard (and, through the hub, the session resolver) that a user's
    /// permissions changed; fails, doing nothing, when a shard queue is full.
    pub fn permissions_changed(&self, change: &PermissionChange) -> Result<(), HubError> {
        tracing::debug!(project = %change.project, user = %change.user, "permissions changed");
        self.hub.permissions_changed(&change.project, &change.user)
    }

    /// Hands `events` to every shard and records them in `history`, or, when a shard queue is
    /// full, does neither.
    pub fn deliver(
        &self,
        history: &mut History,
        events: &[Arc<EncodedEvent>],
    ) -> Result<(), HubError> {
        self.hub.broadcast_many(events)?;
        for e in events {
            history.push(e.clone());
        }
        self.metrics.events_published.inc_by(events.len() as u64);
        crate::memory::note_work();
        Ok(())
    }
}

/// Keeps the events `query` asks for, in order, enforcing its limits.
pub fn select_replay(
    events: impl IntoIterator<Item = Arc<EncodedEvent>>,
    query: &ReplayQuery,
    selected: &mut Vec<Arc<EncodedEvent>>,
    bytes: &mut usize,
) -> Result<(), ReplayError> {
    for e in events {
        if !query.wants(&e) {
            continue;
        }
        *bytes += e.frame_bytes();
        if selected.len() >= query.max_events || *bytes > query.max_bytes {
            return Err(ReplayError::Truncated(format!(
                "more than {} events or {} bytes were missed",
                query.max_events, query.max_bytes
            )));
        }
        selected.push(e);
    }
    Ok(())
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An event source and sink that the gateway fans out from.
pub trait Bus: Send + Sync + 'static {
    /// Short name for logs and the startup line ("embedded", "redis").
    fn name(&self) -> &'static str;

    /// Publishes an event and returns its id once every node will deliver it.
    fn publish(&self, event: NewEvent) -> BoxFuture<'_, Result<String, BusError>>;

    /// Events a reconnecting client missed (see [`ReplayQuery`]).
    fn replay(
        &self,
        query: ReplayQuery,
    ) -> BoxFuture<'_, Result<Vec<Arc<EncodedEvent>>, ReplayError>>;

    /// Whether the bus can currently deliver (for /readyz).
    fn ready(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> Result<NewEvent, String> {
        serde_json::from_str::<PublishRequest>(json)
            .map_err(|e| e.to_string())?
            .validate("console")
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_validation() {
        let e = req(r#"{"channels":["files"],"payload":{"a":1}}"#).unwrap();
        assert_eq!(e.project, "console");
        assert_eq!(e.roles, vec!["any"]);
        assert!(
            req(r#"{"channels":[],"payload":{}}"#)
                .unwrap_err()
                .contains("at least one")
        );
        assert!(
            req(r#"{"channels":["a"],"payload":3}"#)
                .unwrap_err()
                .contains("payload")
        );
        assert!(
            req(r#"{"channels":["a"],"payload":{},"rolez":[]}"#)
                .unwrap_err()
                .contains("unknown field")
        );
        assert!(req(r#"{"payload":{}}"#).unwrap_err().contains("channels"));
    }
}
