//! The hub: the control plane's handle on every shard.
//!
//! Owns handing one encoded event to all shards (each gets the same `Arc`), and shutdown. It
//! must not encode events or know where they come from; buses call it. Broadcasts are
//! serialized, so every shard sees events in the same order even with several sources.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;

use crate::event::EncodedEvent;
use crate::shard::{Command, ShardHandle};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HubError {
    #[error("shards are overloaded: an inbound event queue is full")]
    Overloaded,
}

pub struct Hub {
    shards: Vec<ShardHandle>,
    order: Mutex<()>,
}

impl Hub {
    pub fn new(shards: Vec<ShardHandle>) -> Self {
        Self {
            shards,
            order: Mutex::new(()),
        }
    }

    /// Sends a command to one shard; gives it back when that shard's queue is full.
    pub fn send_to(&self, shard: usize, cmd: Command) -> Result<(), Command> {
        match self.shards.get(shard) {
            Some(s) => s.try_send(cmd),
            None => Err(cmd),
        }
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Hands `event` to every shard, or to none: when any queue is full nothing is sent, so an
    /// event is never delivered on some shards and lost on others.
    pub fn broadcast(&self, event: Arc<EncodedEvent>) -> Result<(), HubError> {
        let _order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        if self.shards.iter().any(|s| s.room() == 0) {
            return Err(HubError::Overloaded);
        }
        for s in &self.shards {
            // Room was checked above and the caller is the only producer, so this cannot fail
            // unless the shard thread is gone, in which case there is nobody to deliver to.
            let _ = s.try_send(Command::Event(event.clone()));
        }
        Ok(())
    }

    /// Asks every shard to close its connections with 1001 and stop.
    pub fn shutdown(&self, drain: Duration) {
        for s in &self.shards {
            let mut cmd = Command::Shutdown { drain };
            // A full queue still drains within the timeout; keep trying briefly.
            for _ in 0..100 {
                match s.try_send(cmd) {
                    Ok(()) => break,
                    Err(c) => {
                        cmd = c;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }
    }
}
