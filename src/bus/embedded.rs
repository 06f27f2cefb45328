//! The embedded bus: events published on this node go straight to this node's shards.
//!
//! Owns event-id assignment and the order of events in single-node mode. No setup, no
//! persistence: an event published while a client is disconnected is not replayed to it (the
//! Redis bus provides that). Must not touch connections.

use std::sync::{Arc, Mutex};

use super::{BoxFuture, Bus, BusError, NewEvent};
use crate::event::{EncodedEvent, Event, EventIdGenerator, timestamp_now};
use crate::hub::Hub;
use crate::metrics::Metrics;

pub struct EmbeddedBus {
    hub: Arc<Hub>,
    /// Held while an id is assigned and the event is handed to the shards, so ids and delivery
    /// order agree on every shard.
    ids: Mutex<EventIdGenerator>,
    metrics: Metrics,
}

impl EmbeddedBus {
    pub fn new(hub: Arc<Hub>, metrics: Metrics) -> Self {
        Self {
            hub,
            ids: Mutex::new(EventIdGenerator::default()),
            metrics,
        }
    }

    fn publish_now(&self, ev: NewEvent) -> Result<String, BusError> {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        let id = ids.next_id();
        let encoded = EncodedEvent::encode(&Event {
            id: id.clone(),
            project: ev.project,
            channels: ev.channels,
            events: ev.events,
            roles: ev.roles,
            timestamp: timestamp_now(),
            payload: ev.payload,
        });
        self.hub
            .broadcast(encoded)
            .map_err(|_| BusError::Overloaded)?;
        self.metrics.events_published.inc();
        Ok(id)
    }
}

impl Bus for EmbeddedBus {
    fn name(&self) -> &'static str {
        "embedded"
    }

    fn publish(&self, event: NewEvent) -> BoxFuture<'_, Result<String, BusError>> {
        Box::pin(std::future::ready(self.publish_now(event)))
    }
}
