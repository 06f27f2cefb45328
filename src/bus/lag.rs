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
    /// The id of the last entry read (or the stream's last id when reading started).
    at: Option<EventId>,
    /// Entries read (delivered or skipped) since reading started.
    read: u64,
    /// `entries-added` minus `read` at a moment the reader was at the stream's end; unknown
    /// before Redis 7 (no `entries-added`).
    baseline: Option<u64>,
}

/// One sample of the lag.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    /// Entries not read yet; `None` when Redis does not count entries (before Redis 7).
    pub entries: Option<u64>,
    /// The stream's last id minus the reader's, as time (auto-generated ids are milliseconds).
    pub seconds: f64,
}

impl Progress {
    /// Reading starts after `at`, the stream's last entry, when Redis had added `added` entries.
    pub fn start(&mut self, at: EventId, added: Option<u64>) {
        self.at = Some(at);
        self.baseline = added.map(|a| a.saturating_sub(self.read));
    }

    /// The reader read `entries` more, the last of them `at`.
    pub fn advance(&mut self, at: EventId, entries: u64) {
        self.at = Some(at);
        self.read += entries;
    }

    /// The lag, given the stream's `last-generated-id` and `entries-added`; `None` before the
    /// reader has started.
    pub fn sample(&mut self, last: EventId, added: Option<u64>) -> Option<Lag> {
        let at = self.at?;
        if at >= last {
            self.baseline = added.map(|a| a.saturating_sub(self.read));
            return Some(Lag {
                entries: added.map(|_| 0),
                seconds: 0.0,
            });
        }
        let entries = match (added, self.baseline) {
            // At least one: the reader is not at the last id.
            (Some(a), Some(b)) => Some(a.saturating_sub(b + self.read).max(1)),
            _ => None,
        };
        Some(Lag {
            entries,
            seconds: last.ms.saturating_sub(at.ms) as f64 / 1000.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64, seq: u64) -> EventId {
        EventId::new(ms, seq)
    }

    #[test]
    fn counts_what_was_added_and_not_read() {
        let mut p = Progress::default();
        assert_eq!(p.sample(id(5, 0), Some(10)), None, "not started");
        p.start(id(1000, 0), Some(10));
        let lag = p.sample(id(1000, 0), Some(10)).unwrap();
        assert_eq!((lag.entries, lag.seconds), (Some(0), 0.0));
        // Five more added, two read: three behind, 1.5 s of stream time.
        p.advance(id(1200, 0), 2);
        let lag = p.sample(id(2700, 0), Some(15)).unwrap();
        assert_eq!((lag.entries, lag.seconds), (Some(3), 1.5));
        p.advance(id(2700, 0), 3);
        let lag = p.sample(id(2700, 0), Some(15)).unwrap();
        assert_eq!((lag.entries, lag.seconds), (Some(0), 0.0));
    }

    #[test]
    fn a_gap_is_forgotten_once_the_reader_is_at_the_end() {
        let mut p = Progress::default();
        p.start(id(1000, 0), Some(100));
        // 50 entries were trimmed before the reader read them; it read 10 and is at the end.
        p.advance(id(9000, 0), 10);
        let lag = p.sample(id(9000, 0), Some(160)).unwrap();
        assert_eq!(lag.entries, Some(0));
        p.advance(id(9100, 0), 1);
        let lag = p.sample(id(9500, 0), Some(163)).unwrap();
        assert_eq!(lag.entries, Some(2));
    }

    #[test]
    fn without_the_entry_count_only_time_is_known() {
        let mut p = Progress::default();
        p.start(id(1000, 0), None);
        let lag = p.sample(id(4000, 0), None).unwrap();
        assert_eq!((lag.entries, lag.seconds), (None, 3.0));
    }
}
