//! How far a Redis stream reader is behind its stream: the figures behind
//! `herald_bus_lag_entries` and `herald_bus_lag_seconds`.
//!
//! Owns the arithmetic only. The reader reports what it has read ([`Progress::advance`]), a
//! sampler reports what the stream holds ([`Progress::sample`], from `XINFO STREAM`); this module
//! talks to no one.
//!
//! A plain `XREAD` reader has no server-side cursor, so Redis cannot count its lag the way it
//! does for consumer groups. Redis does count every entry ever added (`entries-added`, Redis 7):
//! the lag is that count minus the count when the reader started minus the entries read since.
//! Entries trimmed before the reader got to them never reach it, so after such a gap the count
//! runs high; every sample that finds the reader at the stream's last entry sets it right again.

use crate::event::EventId;

/// What one stream's reader has read.
#[derive(Debug, Default)]
pub struct Progress {
    /// Where the reader is: the id of the last entry read (at start, the stream's last id).
    at: Option<EventId>,
    /// Entries read (delivered or skipped) since reading started.
    read: u64,
    /// `entries-added` minus `read` at a moment the reader was at the stream's end; unknown
    /// before Redis 7 (no `entries-added`).
    baseline: Option<u64>,
}

/// One sample of the stream, from `XINFO STREAM` (and the first entry after the reader).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// `last-generated-id`: no later entry can have a smaller id.
    pub last: EventId,
    /// `entries-added` (Redis 7 and later).
    pub added: Option<u64>,
    /// Milliseconds of the oldest entry the reader has not read, if it was looked up.
    pub oldest_unread_ms: Option<u64>,
    /// The time of the sample, in milliseconds since the epoch.
    pub now_ms: u64,
}

/// One sample of the lag.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    /// Entries not read yet; `None` when Redis does not count entries (before Redis 7).
    pub entries: Option<u64>,
    /// How long the oldest unread entry has been waiting (auto-generated ids are the
    /// milliseconds they were added at); 0 when the reader has read everything.
    pub seconds: f64,
}

impl Progress {
    /// Reading starts after `at`, the stream's last id, when Redis had added `added` entries.
    pub fn start(&mut self, at: EventId, added: Option<u64>) {
        self.at = Some(at);
        self.baseline = added.map(|a| a.saturating_sub(self.read));
    }

    /// The reader read `entries` more, the last of them `at`.
    pub fn advance(&mut self, at: EventId, entries: u64) {
        self.at = Some(at);
        self.read += entries;
    }

    /// Where the reader is; `None` before it started.
    pub fn at(&self) -> Option<EventId> {
        self.at
    }

    /// The lag as of `s`; `None` before the reader has started.
    pub fn sample(&mut self, s: &Snapshot) -> Option<Lag> {
        let at = self.at?;
        if at >= s.last {
            // Only a reader exactly at the snapshot's end reads with it: one that moved on
            // since has read entries the snapshot's count does not hold yet.
            if at == s.last {
                self.baseline = s.added.map(|a| a.saturating_sub(self.read));
            }
            return Some(Lag {
                entries: s.added.map(|_| 0),
                seconds: 0.0,
            });
        }
        let entries = match (s.added, self.baseline) {
            // At least one: the reader is not at the last id.
            (Some(a), Some(b)) => Some(a.saturating_sub(b + self.read).max(1)),
            _ => None,
        };
        let seconds = s
            .oldest_unread_ms
            .map_or(0.0, |ms| s.now_ms.saturating_sub(ms) as f64 / 1000.0);
        Some(Lag { entries, seconds })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64, seq: u64) -> EventId {
        EventId::new(ms, seq)
    }

    fn snap(last: EventId, added: Option<u64>, oldest_unread_ms: Option<u64>) -> Snapshot {
        Snapshot {
            last,
            added,
            oldest_unread_ms,
            now_ms: 10_000,
        }
    }

    #[test]
    fn counts_what_was_added_and_not_read() {
        let mut p = Progress::default();
        assert_eq!(
            p.sample(&snap(id(5, 0), Some(10), None)),
            None,
            "not started"
        );
        p.start(id(1000, 0), Some(10));
        let lag = p.sample(&snap(id(1000, 0), Some(10), None)).unwrap();
        assert_eq!((lag.entries, lag.seconds), (Some(0), 0.0));
        // Five more added, two read: three behind, the oldest unread added 1.5 s ago.
        p.advance(id(1200, 0), 2);
        let lag = p.sample(&snap(id(2700, 0), Some(15), Some(8_500))).unwrap();
        assert_eq!((lag.entries, lag.seconds), (Some(3), 1.5));
        p.advance(id(2700, 0), 3);
        let lag = p.sample(&snap(id(2700, 0), Some(15), None)).unwrap();
        assert_eq!((lag.entries, lag.seconds), (Some(0), 0.0));
    }

    #[test]
    fn a_gap_is_forgotten_once_the_reader_is_at_the_end() {
        let mut p = Progress::default();
        p.start(id(1000, 0), Some(100));
        // 50 entries were trimmed before the reader read them; it read 10 and is at the end.
        p.advance(id(9000, 0), 10);
        let lag = p.sample(&snap(id(9000, 0), Some(160), None)).unwrap();
        assert_eq!(lag.entries, Some(0));
        p.advance(id(9100, 0), 1);
        let lag = p
            .sample(&snap(id(9500, 0), Some(163), Some(9_900)))
            .unwrap();
        assert_eq!(lag.entries, Some(2));
    }

    #[test]
    fn a_reader_ahead_of_the_snapshot_keeps_its_baseline() {
        let mut p = Progress::default();
        p.start(id(1000, 0), Some(10));
        // The snapshot said 12 entries up to 3000; the reader has read 5 since, up to 4000.
        p.advance(id(4000, 0), 5);
        let lag = p.sample(&snap(id(3000, 0), Some(12), None)).unwrap();
        assert_eq!(lag.entries, Some(0));
        // Two more behind it: the baseline still counts right.
        let lag = p.sample(&snap(id(5000, 0), Some(17), Some(9_000))).unwrap();
        assert_eq!((lag.entries, lag.seconds), (Some(2), 1.0));
    }

    #[test]
    fn without_the_entry_count_only_time_is_known() {
        let mut p = Progress::default();
        p.start(id(1000, 0), None);
        let lag = p.sample(&snap(id(4000, 0), None, Some(7_000))).unwrap();
        assert_eq!((lag.entries, lag.seconds), (None, 3.0));
    }
}
