//! PHP-style parsing of the realtime URL query, as Appwrite's server reads it.
//!
//! Owns the mapping from `?project=p&channels[]=a&channels%5B%5D=b&channels[0]=c` to a project
//! and an ordered channel list, in time linear in the query's length. Pure string work; it must
//! not validate projects or channels beyond counting them.

use crate::distinct::Distinct;

/// What the realtime handshake reads from the query string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RealtimeQuery {
    pub project: Option<String>,
    /// Channels in the order they appear, duplicates removed, at most the limit given to
    /// [`parse`].
    pub channels: Vec<String>,
    /// More distinct channels than the limit were given (the rest were not kept).
    pub too_many_channels: bool,
    /// `lastEventId`, for clients resuming after a reconnect.
    pub last_event_id: Option<String>,
    /// `jwt`, what SDK 27+ sends after `client.setJWT()`.
    pub jwt: Option<String>,
    /// Gen B query slots, `<channel with . as _>[<slot>][]=<query>`: (key, slot, query), in
    /// order, at most [`MAX_SLOT_QUERIES`].
    pub slot_queries: Vec<(String, u32, String)>,
    /// More slot queries than that were given.
    pub too_many_slot_queries: bool,
}

/// Most Gen B slot queries one URL may carry.
pub const MAX_SLOT_QUERIES: usize = 1000;

/// Parses a raw (still percent-encoded) query string, keeping at most `max_channels` channels.
pub fn parse(query: &str, max_channels: usize) -> RealtimeQuery {
    let mut out = RealtimeQuery::default();
    let mut channels = Distinct::default();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let (base, bracket) = match key.find('[') {
            Some(i) => (&key[..i], Some(&key[i..])),
            None => (&key[..], None),
        };
        match (base, bracket) {
            _ if value.is_empty() => {}
            ("project", None) => out.project = Some(value.into_owned()),
            ("lastEventId", None) => out.last_event_id = Some(value.into_owned()),
            ("jwt", None) => out.jwt = Some(value.into_owned()),
            (key, Some(b)) if key != "channels" && key != "project" => {
                let Some(slot) = slot_of(b) else { continue };
                if out.slot_queries.len() == MAX_SLOT_QUERIES {
                    out.too_many_slot_queries = true;
                    continue;
                }
                out.slot_queries
                    .push((key.to_owned(), slot, value.into_owned()));
            }
            // `channels[]`, `channels[3]`, and a bare `channels=x` (read as a one-element list
            // rather than failing the way PHP's type error does).
            ("channels", b)
                if b.is_none_or(is_list_index) && !channels.contains(value.as_ref()) =>
            {
                if channels.len() == max_channels {
                    out.too_many_channels = true;
                    continue;
                }
                channels.push(value.into_owned());
            }
            _ => {}
        }
    }
    out.channels = channels.into_vec();
    out
}

/// The slot of a Gen B query key's brackets, `[<digits>][]` (or `[<digits>][<digits>]`).
fn slot_of(brackets: &str) -> Option<u32> {
    let rest = brackets.strip_prefix('[')?;
    let (slot, rest) = rest.split_once(']')?;
    if !is_list_index(rest) || slot.is_empty() || !slot.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    slot.parse().ok()
}

/// `[]` or `[<digits>]`: the forms PHP turns into list elements.
fn is_list_index(bracket: &str) -> bool {
    bracket
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .is_some_and(|inner| inner.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_channel_spellings() {
        let q = parse(
            "project=p1&channels[]=a&channels%5B%5D=b&channels[0]=c&channels%5B7%5D=d&channels[]=a",
            100,
        );
        assert_eq!(q.project.as_deref(), Some("p1"));
        assert_eq!(q.channels, vec!["a", "b", "c", "d"]);
        assert!(!q.too_many_channels);
    }

    #[test]
    fn percent_decoding_and_unknown_keys() {
        let q = parse(
            "channels[]=databases.db.collections.c.documents&documents[0][]=%7B%7D&project=&x=1&lastEventId=1-0",
            100,
        );
        assert_eq!(q.project, None);
        assert_eq!(q.channels, vec!["databases.db.collections.c.documents"]);
        assert_eq!(q.last_event_id.as_deref(), Some("1-0"));
        assert_eq!(parse("channels[a]=x", 100).channels, Vec::<String>::new());
        assert_eq!(
            parse(
                "channels[]=a.b&a_b[1][]=q1&a_b[1][0]=q2&a_b[x][]=no&a_b[]=no",
                100
            )
            .slot_queries,
            vec![
                ("a_b".to_owned(), 1, "q1".to_owned()),
                ("a_b".to_owned(), 1, "q2".to_owned())
            ]
        );
        assert_eq!(parse("channels=solo", 100).channels, vec!["solo"]);
    }

    #[test]
    fn channels_beyond_the_limit_are_counted_not_kept() {
        let q = parse("channels[]=a&channels[]=a&channels[]=b&channels[]=c", 2);
        assert_eq!(q.channels, vec!["a", "b"]);
        assert!(q.too_many_channels);
        let q = parse("channels[]=a&channels[]=b&channels[]=a", 2);
        assert!(!q.too_many_channels, "a repeat is not one more");
    }
}
