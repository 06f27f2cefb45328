//! Events and their one-time encoding for fan-out.
//!
//! Owns what an event is (project, channels, roles, payload, id, timestamp) and turns it into
//! the shared bytes every subscriber receives. The only per-connection part of an event frame is
//! the `subscriptions` list at its end, so the encoded form is a shared prefix plus a tiny tail
//! built at delivery time. Must not know about sockets, shards or buses.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;

use crate::identity::Identity;

const EVENT_PREFIX: &[u8] = br#"{"type":"event","data":"#;
const SUBSCRIPTIONS_KEY: &[u8] = br#","subscriptions":"#;

/// The role that lets an event reach every connection.
pub const ANY_ROLE: &str = "any";

pub use crate::names::{
    ID_RULE, MAX_ID_BYTES, MAX_NAME_BYTES, NAME_RULE, is_valid_id, is_valid_name,
};

/// An event as publishers describe it, before encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: String,
    pub project: String,
    pub channels: Vec<String>,
    pub events: Vec<String>,
    pub roles: Vec<String>,
    /// `YYYY-MM-DDTHH:MM:SS.mmm+00:00`, as Appwrite formats it.
    pub timestamp: String,
    pub payload: serde_json::Value,
}

/// The current time in Appwrite's event timestamp format.
pub fn timestamp_now() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.3f+00:00")
        .to_string()
}

/// An event encoded once and shared (by `Arc`) with every shard.
#[derive(Debug)]
pub struct EncodedEvent {
    pub id: Box<str>,
    /// The id as a position in the event history; `None` for events that cannot be replayed
    /// (those taken from Appwrite's pub/sub, which has no history).
    pub position: Option<EventId>,
    pub project: Box<str>,
    pub channels: Box<[Box<str>]>,
    pub roles: Box<[Box<str>]>,
    /// True when `roles` contains `any`: the event reaches every connection of the project.
    pub any_role: bool,
    /// `{"type":"event","data":{...,"subscriptions":` — everything before the per-connection list.
    pub prefix: Bytes,
    /// The payload as JSON, parsed from `prefix` the first time a subscription query needs it
    /// (once for the whole process, whichever shard asks first).
    payload: OnceLock<serde_json::Value>,
    /// When herald took the event in, for the fan-out latency.
    pub received: Instant,
}

impl EncodedEvent {
    pub fn encode(event: &Event) -> Arc<Self> {
        #[derive(Serialize)]
        struct Data<'a> {
            events: &'a [String],
            channels: &'a [String],
            timestamp: &'a str,
            payload: &'a serde_json::Value,
            id: &'a str,
        }
        let data = Data {
            events: &event.events,
            channels: &event.channels,
            timestamp: &event.timestamp,
            payload: &event.payload,
            id: &event.id,
        };
        // Serializing plain strings and a `Value` cannot fail.
        let mut json = serde_json::to_vec(&data).unwrap_or_default();
        // Reopen the object so the per-connection `subscriptions` field can follow.
        json.pop();
        let mut prefix = Vec::with_capacity(json.len() + 40);
        prefix.extend_from_slice(EVENT_PREFIX);
        prefix.extend_from_slice(&json);
        prefix.extend_from_slice(SUBSCRIPTIONS_KEY);
        let roles: Box<[Box<str>]> = if event.roles.is_empty() {
            Box::new([ANY_ROLE.into()])
        } else {
            event.roles.iter().map(|r| r.as_str().into()).collect()
        };
        Arc::new(Self {
            id: event.id.as_str().into(),
            position: event.id.parse().ok(),
            project: event.project.as_str().into(),
            channels: event.channels.iter().map(|c| c.as_str().into()).collect(),
            any_role: roles.iter().any(|r| &**r == ANY_ROLE),
            roles,
            prefix: Bytes::from(prefix),
            payload: OnceLock::new(),
            received: Instant::now(),
        })
    }

    /// The event's payload, for subscription queries.
    pub fn payload(&self) -> &serde_json::Value {
        self.payload.get_or_init(|| {
            let data = self
                .prefix
                .strip_prefix(EVENT_PREFIX)
                .and_then(|rest| rest.strip_suffix(SUBSCRIPTIONS_KEY))
                .map(|data| [data, b"}"].concat());
            data.and_then(|d| serde_json::from_slice::<serde_json::Value>(&d).ok())
                .and_then(|mut v| v.get_mut("payload").map(serde_json::Value::take))
                .unwrap_or(serde_json::Value::Null)
        })
    }

    /// Whether `other` goes to exactly the same connections with the same `subscriptions`
    /// lists: same project, channels and roles.
    pub fn same_route(&self, other: &EncodedEvent) -> bool {
        self.project == other.project
            && self.channels == other.channels
            && self.roles == other.roles
    }

    /// Bytes this event adds to a connection's outbound stream (without its small tail).
    pub fn frame_bytes(&self) -> usize {
        self.prefix.len() + 64
    }

    /// Whether a connection of `who` may receive this event: one of the event's roles is
    /// `any` or one of `who`'s.
    pub fn allows(&self, who: &Identity) -> bool {
        self.any_role || self.roles.iter().any(|r| who.has_role(r))
    }
}

/// Appends the per-connection tail `["id1","id2"]}}` to `out`. Subscription ids are restricted
/// to `[A-Za-z0-9._-]`, so they never need JSON escaping.
pub fn write_tail<'a>(out: &mut impl Extend<u8>, ids: impl Iterator<Item = &'a str>) {
    out.extend([b'[']);
    for (i, id) in ids.enumerate() {
        if i > 0 {
            out.extend([b',']);
        }
        out.extend([b'"']);
        out.extend(id.bytes());
        out.extend([b'"']);
    }
    out.extend(*b"]}}");
}

/// A position in the event history: a Redis stream id `<ms>-<seq>` in stream shard `shard`
/// (`--stream-shards`), written `<ms>-<seq>` in shard 0 and `<shard>:<ms>-<seq>` beyond.
/// Ordered by shard, then numerically; only positions in one shard are comparable in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub shard: u16,
    pub ms: u64,
    pub seq: u64,
}

impl EventId {
    pub const ZERO: EventId = EventId::new(0, 0);

    /// A position in shard 0 (the only one of a single stream or the embedded bus).
    pub const fn new(ms: u64, seq: u64) -> Self {
        Self { shard: 0, ms, seq }
    }

    /// The same stream id in `shard`.
    pub const fn in_shard(self, shard: u16) -> Self {
        Self { shard, ..self }
    }

    /// The id right after this one, for exclusive range starts (the largest id has none: it
    /// stays itself rather than wrapping to the smallest).
    pub fn next(self) -> EventId {
        match (self.seq.checked_add(1), self.ms.checked_add(1)) {
            (Some(seq), _) => EventId { seq, ..self },
            (None, Some(ms)) => EventId { ms, seq: 0, ..self },
            (None, None) => self,
        }
    }

    /// The Redis stream id alone (`<ms>-<seq>`), as XRANGE and XREAD take it.
    pub fn stream_id(self) -> String {
        format!("{}-{}", self.ms, self.seq)
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.shard > 0 {
            write!(f, "{}:", self.shard)?;
        }
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "an event id looks like 1700000000000-0 (milliseconds, a dash, a sequence number), with \
     its stream shard in front when it is not the first (2:1700000000000-0)"
)]
pub struct InvalidEventId;

impl std::str::FromStr for EventId {
    type Err = InvalidEventId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits =
            |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
        let (shard, id) = match s.split_once(':') {
            Some((shard, id)) if digits(shard) && shard.len() <= 5 => {
                (shard.parse().map_err(|_| InvalidEventId)?, id)
            }
            Some(_) => return Err(InvalidEventId),
            None => (0, s),
        };
        let (ms, seq) = id.split_once('-').ok_or(InvalidEventId)?;
        if !digits(ms) || !digits(seq) {
            return Err(InvalidEventId);
        }
        Ok(EventId {
            shard,
            ms: ms.parse().map_err(|_| InvalidEventId)?,
            seq: seq.parse().map_err(|_| InvalidEventId)?,
        })
    }
}

/// Milliseconds since the Unix epoch, the unit of stream ids (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Appwrite's timestamp format for an instant given in unix milliseconds.
pub fn timestamp_from_ms(ms: u64) -> String {
    let dt = chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .unwrap_or_default();
    dt.format("%Y-%m-%dT%H:%M:%S%.3f+00:00").to_string()
}

/// Assigns event ids shaped like Redis stream ids (`<unix ms>-<seq>`), strictly increasing even
/// when the clock stalls or steps back.
#[derive(Debug, Default)]
pub struct EventIdGenerator {
    last_ms: u64,
    seq: u64,
}

impl EventIdGenerator {
    pub fn next_id(&mut self) -> EventId {
        let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
        if now > self.last_ms {
            self.last_ms = now;
            self.seq = 0;
        } else {
            self.seq += 1;
        }
        EventId::new(self.last_ms, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_plus_tail_is_the_documented_json() {
        let ev = Event {
            id: "1-0".into(),
            project: "p".into(),
            channels: vec!["files".into()],
            events: vec!["buckets.b.files.f.create".into()],
            roles: vec![],
            timestamp: "2026-08-21T12:00:00.123+00:00".into(),
            payload: serde_json::json!({"a": "\"quoted\""}),
        };
        let enc = EncodedEvent::encode(&ev);
        let mut frame = enc.prefix.to_vec();
        write_tail(&mut frame, ["s1", "s2"].into_iter());
        let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
        assert_eq!(v["type"], "event");
        assert_eq!(v["data"]["subscriptions"], serde_json::json!(["s1", "s2"]));
        assert_eq!(v["data"]["payload"]["a"], "\"quoted\"");
        assert_eq!(v["data"]["id"], "1-0");
        assert_eq!(v["data"]["timestamp"], "2026-08-21T12:00:00.123+00:00");
        assert!(enc.any_role);
    }

    #[test]
    fn roles_gate_delivery() {
        let mut ev = Event {
            id: "1-0".into(),
            project: "p".into(),
            channels: vec!["c".into()],
            events: vec![],
            roles: vec!["user:x".into()],
            timestamp: timestamp_now(),
            payload: serde_json::json!({}),
        };
        let guest = Identity::guest();
        let user = Identity::user("x", None, vec![]);
        let enc = EncodedEvent::encode(&ev);
        assert!(!enc.allows(&guest));
        assert!(enc.allows(&user));
        ev.roles = vec!["any".into()];
        assert!(EncodedEvent::encode(&ev).allows(&guest));
    }

    #[test]
    fn ids_increase() {
        let mut g = EventIdGenerator::default();
        let a = g.next_id();
        let b = g.next_id();
        assert!(b > a);
        assert_eq!(a.to_string().parse::<EventId>(), Ok(a));
    }

    #[test]
    fn the_id_after_the_largest_one_does_not_wrap() {
        let max = EventId::new(u64::MAX, u64::MAX);
        assert!(max.next() >= max);
    }

    #[test]
    fn event_ids_parse_strictly() {
        assert_eq!("5-2".parse::<EventId>(), Ok(EventId::new(5, 2)));
        assert_eq!(
            "3:5-2".parse::<EventId>(),
            Ok(EventId::new(5, 2).in_shard(3))
        );
        assert_eq!(EventId::new(5, 2).in_shard(3).to_string(), "3:5-2");
        assert_eq!(EventId::new(5, 2).in_shard(3).stream_id(), "5-2");
        for bad in [":5-2", "x:5-2", "123456:5-2", "1:2:5-2", "1:5"] {
            assert!(bad.parse::<EventId>().is_err(), "{bad}");
        }
        for bad in [
            "",
            "5",
            "5-",
            "-2",
            "a-1",
            "1-2-3",
            "+1-2",
            "99999999999999999999999-0",
        ] {
            assert!(bad.parse::<EventId>().is_err(), "{bad}");
        }
        assert!("10-0".parse::<EventId>().unwrap() > "9-99".parse().unwrap());
        assert_eq!(
            timestamp_from_ms(1_795_393_049_647),
            "2026-11-23T00:17:29.647+00:00"
        );
    }
}
