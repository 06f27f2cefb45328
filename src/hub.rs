//! The hub: the control plane's handle on every shard.
//!
//! Owns handing one encoded event to all shards (each gets the same `Arc`), permission
//! changes, answers to shards' requests, and shutdown. It
//! must not encode events or know where they come from; buses call it. Broadcasts are
//! serialized, so every shard sees events in the same order even with several sources.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::event::EncodedEvent;
use crate::mailbox::{Answer, AnswerRefused, Command, ShardHandle};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HubError {
    #[error("shards are overloaded: an inbound event queue is full")]
    Overloaded,
}

/// How long the hub remembers that a user's permissions changed: longer than any cached
/// session answer may live, so that none fetched before the change is served after it.
pub const PERMISSION_MEMORY: Duration = Duration::from_secs(2 * 3600);

pub struct Hub {
    shards: Vec<ShardHandle>,
    order: Mutex<()>,
    /// When each (project, user) last had its permissions changed, keyed `project\0user`.
    changes: Mutex<rustc_hash::FxHashMap<String, Instant>>,
    /// How many changes were left after the last pruning of `changes`.
    pruned_at: AtomicUsize,
}

impl Hub {
    pub fn new(shards: Vec<ShardHandle>) -> Self {
        Self {
            shards,
            order: Mutex::new(()),
            changes: Mutex::new(Default::default()),
            pruned_at: AtomicUsize::new(0),
        }
    }

    /// Hands an answer (a replay, an identity) to one shard.
    pub fn send_answer(&self, shard: usize, answer: Answer) -> Result<(), AnswerRefused> {
        match self.shards.get(shard) {
            Some(s) => s.try_send_answer(answer),
            None => Err(AnswerRefused::Gone),
        }
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Hands `event` to every shard, or to none: when any queue is full nothing is sent, so an
    /// event is never delivered on some shards and lost on others.
    pub fn broadcast(&self, event: Arc<EncodedEvent>) -> Result<(), HubError> {
        self.broadcast_many(std::slice::from_ref(&event))
    }

    /// Hands a batch of events to every shard, in order, waking each shard once: all of them
    /// or, when a queue lacks room for the whole batch, none.
    pub fn broadcast_many(&self, events: &[Arc<EncodedEvent>]) -> Result<(), HubError> {
        let _order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        if self.shards.iter().any(|s| s.room() < events.len()) {
            return Err(HubError::Overloaded);
        }
        for s in &self.shards {
            for e in events {
                // Room was checked above and broadcasts are serialized, so this cannot fail
                // unless the shard thread is gone, in which case nobody is left to deliver to.
                let _ = s.try_send_quiet(Command::Event(e.clone()));
            }
            s.wake();
        }
        Ok(())
    }

    /// Tells every shard that `user`'s permissions changed in `project`, in order with the
    /// events around it: all shards or, when a queue is full, none.
    pub fn permissions_changed(&self, project: &str, user: &str) -> Result<(), HubError> {
        let _order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        if self.shards.iter().any(|s| s.room() == 0) {
            return Err(HubError::Overloaded);
        }
        self.record_change(project, user);
        let (project, user): (Arc<str>, Arc<str>) = (project.into(), user.into());
        for s in &self.shards {
            let _ = s.try_send(Command::PermissionsChanged {
                project: project.clone(),
                user: user.clone(),
            });
        }
        Ok(())
    }

    fn record_change(&self, project: &str, user: &str) {
        let now = Instant::now();
        let mut changes = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        // Pruned when it has doubled since the last pruning: amortized O(1) per change.
        if changes.len() >= 10_000 && changes.len() >= 2 * self.pruned_at.load(Ordering::Relaxed) {
            changes.retain(|_, at| now.duration_since(*at) < PERMISSION_MEMORY);
            self.pruned_at.store(changes.len(), Ordering::Relaxed);
        }
        changes.insert(format!("{project}\0{user}"), now);
    }

    /// When `user`'s permissions in `project` last changed, if within [`PERMISSION_MEMORY`].
    pub fn permissions_changed_at(&self, project: &str, user: &str) -> Option<Instant> {
        let changes = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        changes
            .get(&format!("{project}\0{user}"))
            .copied()
            .filter(|at| at.elapsed() < PERMISSION_MEMORY)
    }

    /// Asks every shard to close its connections with 1001 and stop; never blocks.
    pub fn shutdown(&self, drain: Duration) {
        for s in &self.shards {
            s.request_shutdown(drain);
        }
    }

    /// True once [`Hub::shutdown`] was called: the gateway is draining.
    pub fn is_draining(&self) -> bool {
        self.shards.iter().any(|s| s.is_shutting_down())
    }

    /// The first shard whose thread has ended, if any.
    pub fn dead_shard(&self) -> Option<usize> {
        self.shards.iter().position(|s| !s.is_alive())
    }
}
