//! Which Redis stream holds a project's events when the stream is split over S shards
//! (`--stream-shards`), and what each shard's key is. Pure arithmetic: knows no connection,
//! no Redis client and no event beyond its project name.
//!
//! The rule, so that any backend can publish with a plain `XADD` to the right key:
//! - a project's shard is `slot(project) * S / 16384`, where `slot` is the Redis Cluster hash
//!   slot of the project name (CRC16-XMODEM mod 16384, the whole name, no hash tags);
//! - shard k's key is `<stream>:{t}`, where `t` is the smallest number (in decimal) whose slot
//!   falls in shard k's range of slots: each shard's key then lives in its own part of the
//!   slot space, so a cluster whose masters split the slots evenly holds one shard per master;
//! - with one shard (the default) the key is `<stream>` itself, unchanged.
//!
//! All of one project's events are in one stream, so their order is kept.

/// Hash slots in a Redis Cluster.
const SLOTS: u16 = 16384;

/// The Redis Cluster hash slot of `bytes` taken whole.
pub fn slot(bytes: &[u8]) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(bytes) % SLOTS
}

/// The stream shards of one gateway: their count and keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamShards {
    keys: Vec<String>,
}

impl StreamShards {
    /// `count` shards of `stream` (at least one).
    pub fn new(stream: &str, count: u16) -> Self {
        let count = count.max(1);
        if count == 1 {
            return Self {
                keys: vec![stream.to_owned()],
            };
        }
        let keys = (0..count)
            .map(|k| {
                let tag = (0u32..)
                    .find(|n| shard_of_slot(slot(n.to_string().as_bytes()), count) == k)
                    .unwrap_or(u32::from(k));
                format!("{stream}:{{{tag}}}")
            })
            .collect();
        Self { keys }
    }

    pub fn count(&self) -> u16 {
        self.keys.len() as u16
    }

    /// The shard that holds `project`'s events.
    pub fn shard_of(&self, project: &str) -> u16 {
        shard_of_slot(slot(project.as_bytes()), self.count())
    }

    /// Shard `shard`'s stream key (`None` past the last shard).
    pub fn key(&self, shard: u16) -> Option<&str> {
        self.keys.get(usize::from(shard)).map(String::as_str)
    }

    /// Every key, in shard order.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }
}

fn shard_of_slot(slot: u16, count: u16) -> u16 {
    (u32::from(slot) * u32::from(count) / u32::from(SLOTS)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shard_keeps_the_stream_name() {
        let one = StreamShards::new("herald:events", 1);
        assert_eq!(one.keys(), ["herald:events"]);
        assert_eq!(one.shard_of("anything"), 0);
    }

    #[test]
    fn each_key_hashes_into_its_own_shard_of_the_slot_space() {
        // Redis documents slot("123456789") = 0x31C3 (12739) for CRC16-XMODEM.
        assert_eq!(slot(b"123456789"), 12739);
        for count in [2, 3, 5, 16] {
            let shards = StreamShards::new("herald:events", count);
            for (k, key) in shards.keys().iter().enumerate() {
                let tag = &key[key.find('{').unwrap() + 1..key.len() - 1];
                assert_eq!(
                    shard_of_slot(slot(tag.as_bytes()), count),
                    k as u16,
                    "{key}"
                );
            }
        }
        assert_eq!(
            StreamShards::new("s", 3).keys(),
            ["s:{3}", "s:{1}", "s:{0}"],
            "the documented keys for three shards"
        );
    }

    #[test]
    fn projects_spread_over_the_shards() {
        let shards = StreamShards::new("s", 3);
        let mut counts = [0; 3];
        for n in 0..3000 {
            counts[usize::from(shards.shard_of(&format!("project{n}")))] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }
}
