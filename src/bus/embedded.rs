//! The embedded bus: events published on this node go straight to this node's shards.
//!
//! Owns event-id assignment, the order of events in single-node mode, and the in-memory history
//! that lets a reconnecting client catch up (as far back as `--history-events` reaches; nothing
//! survives a restart: the Redis bus provides that). Must not touch connections.

use std::sync::{Arc, Mutex};

use super::{BoxFuture, Bus, BusError, NewEvent, Outlet, select_replay};
use crate::event::{EncodedEvent, EventId, EventIdGenerator, timestamp_now};
use crate::history::History;
use crate::hub::Hub;
use crate::mailbox::{ReplayError, ReplayQuery};
use crate::metrics::Metrics;

pub struct EmbeddedBus {
    outlet: Outlet,
    /// Held while an id is assigned, the event recorded and handed to the shards, so ids,
    /// history and delivery order agree on every shard.
    state: Mutex<State>,
    start: EventId,
}

struct State {
    ids: EventIdGenerator,
    history: History,
}

impl EmbeddedBus {
    pub fn new(
        hub: Arc<Hub>,
        metrics: Metrics,
        history_events: usize,
        history_bytes: usize,
    ) -> Self {
        let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
        // Just below the first id this process can assign.
        let start = EventId::new(now.saturating_sub(1), u64::MAX);
        Self {
            outlet: Outlet::new(hub, metrics),
            state: Mutex::new(State {
                ids: EventIdGenerator::default(),
                history: History::new(start, history_events, history_bytes),
            }),
            start,
        }
    }

    fn publish_now(&self, ev: NewEvent) -> Result<String, BusError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let id = state.ids.next_id().to_string();
        if let Some(change) = &ev.permissions_changed {
            self.outlet
                .permissions_changed(change)
                .map_err(|_| BusError::Overloaded)?;
        }
        if !ev.is_event() {
            return Ok(id);
        }
        let encoded = EncodedEvent::encode(&ev.into_event(id.clone(), timestamp_now()));
        self.outlet
            .deliver(&mut state.history, &[encoded])
            .map_err(|_| BusError::Overloaded)?;
        Ok(id)
    }

    fn replay_now(&self, q: &ReplayQuery) -> Result<Vec<Arc<EncodedEvent>>, ReplayError> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let history = &state.history;
        if q.after.shard != 0 {
            return Err(ReplayError::Truncated(format!(
                "lastEventId {} names stream shard {}; this node has one event history",
                q.after, q.after.shard
            )));
        }
        if q.after > history.newest() {
            return Err(ReplayError::Ahead(q.after));
        }
        let upto = q.upto.unwrap_or(self.start);
        let Some(events) = history.range(q.after, upto) else {
            return Err(ReplayError::Truncated(format!(
                "lastEventId {} is older than the history this node keeps (from {})",
                q.after,
                history.floor()
            )));
        };
        drop(state);
        let mut selected = Vec::new();
        select_replay(events, q, &mut selected, &mut 0)?;
        Ok(selected)
    }
}

impl Bus for EmbeddedBus {
    fn name(&self) -> &'static str {
        "embedded"
    }

    fn publish(&self, event: NewEvent) -> BoxFuture<'_, Result<String, BusError>> {
        Box::pin(std::future::ready(self.publish_now(event)))
    }

    fn replay(
        &self,
        query: ReplayQuery,
    ) -> BoxFuture<'_, Result<Vec<Arc<EncodedEvent>>, ReplayError>> {
        Box::pin(std::future::ready(self.replay_now(&query)))
    }
}
