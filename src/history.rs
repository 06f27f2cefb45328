//! Recent events kept in memory so reconnecting clients can be replayed what they missed.
//!
//! Owns a bounded ring of the latest encoded events (by count and bytes) and the rule for what it
//! can answer: every event after its `floor` is in the ring. It serves mass reconnects without a
//! round trip per client; the Redis bus falls back to the stream for older ids. Must not know
//! about connections or shards.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::event::{EncodedEvent, EventId};

#[derive(Debug)]
pub struct History {
    events: VecDeque<Arc<EncodedEvent>>,
    bytes: usize,
    max_events: usize,
    max_bytes: usize,
    /// Every event with an id above this is in the ring (or was never published).
    floor: EventId,
    newest: EventId,
}

impl History {
    /// An empty history that knows nothing before `start`.
    pub fn new(start: EventId, max_events: usize, max_bytes: usize) -> Self {
        Self {
            events: VecDeque::new(),
            bytes: 0,
            max_events,
            max_bytes,
            floor: start,
            newest: start,
        }
    }

    pub fn floor(&self) -> EventId {
        self.floor
    }

    pub fn newest(&self) -> EventId {
        self.newest
    }

    /// Restarts at `start`, forgetting everything (the source jumped, e.g. a new stream).
    pub fn reset(&mut self, start: EventId) {
        self.events.clear();
        self.bytes = 0;
        self.floor = start;
        self.newest = start;
    }

    /// Appends an event; ids must increase. Evicts the oldest beyond the bounds.
    pub fn push(&mut self, event: Arc<EncodedEvent>) {
        let Some(pos) = event.position else { return };
        self.newest = self.newest.max(pos);
        self.bytes += event.prefix.len();
        self.events.push_back(event);
        while self.events.len() > self.max_events || self.bytes > self.max_bytes {
            let Some(old) = self.events.pop_front() else {
                break;
            };
            self.bytes -= old.prefix.len();
            if let Some(p) = old.position {
                self.floor = p;
            }
        }
    }

    /// The source lost every event up to `through` (a stream trimmed while this node was
    /// away): replays from before it can no longer be answered from here.
    pub fn forget_through(&mut self, through: EventId) {
        if through <= self.floor {
            return;
        }
        while self
            .events
            .front()
            .is_some_and(|e| e.position.is_none_or(|p| p <= through))
        {
            if let Some(old) = self.events.pop_front() {
                self.bytes -= old.prefix.len();
            }
        }
        self.floor = through;
        self.newest = self.newest.max(through);
    }

    /// Events with ids in `(after, upto]`, or `None` when some of them may be missing because
    /// `after` is below the floor.
    pub fn range(&self, after: EventId, upto: EventId) -> Option<Vec<Arc<EncodedEvent>>> {
        if after < self.floor {
            return None;
        }
        let start = self
            .events
            .partition_point(|e| e.position.is_some_and(|p| p <= after));
        Some(
            self.events
                .iter()
                .skip(start)
                .take_while(|e| e.position.is_some_and(|p| p <= upto))
                .cloned()
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EncodedEvent, Event};

    fn ev(ms: u64) -> Arc<EncodedEvent> {
        EncodedEvent::encode(&Event {
            id: format!("{ms}-0"),
            project: "p".into(),
            channels: vec!["c".into()],
            events: vec![],
            roles: vec![],
            timestamp: String::new(),
            payload: serde_json::json!({}),
        })
    }

    fn id(ms: u64) -> EventId {
        EventId::new(ms, 0)
    }

    #[test]
    fn ranges_and_eviction() {
        let mut h = History::new(id(10), 3, usize::MAX);
        for ms in 11..=15 {
            h.push(ev(ms));
        }
        // 11 and 12 were evicted: the floor moved to 12.
        assert_eq!(h.floor(), id(12));
        assert!(h.range(id(11), id(15)).is_none());
        let got: Vec<_> = h
            .range(id(12), id(14))
            .unwrap()
            .iter()
            .map(|e| e.id.to_string())
            .collect();
        assert_eq!(got, vec!["13-0", "14-0"]);
        assert!(h.range(id(15), id(15)).unwrap().is_empty());
        assert_eq!(h.newest(), id(15));
    }

    #[test]
    fn a_gap_makes_older_resumes_unanswerable() {
        let mut h = History::new(id(10), 100, usize::MAX);
        for ms in 11..=13 {
            h.push(ev(ms));
        }
        h.forget_through(id(20));
        assert!(h.range(id(13), id(25)).is_none(), "13 is before the gap");
        assert_eq!(h.floor(), id(20));
        h.push(ev(21));
        let got = h.range(id(20), id(25)).unwrap();
        assert_eq!(got.len(), 1);
    }
}
