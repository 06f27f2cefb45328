//! PHP-style parsing of the realtime URL query, as Appwrite's server reads it.
//!
//! Owns the mapping from `?project=p&channels[]=a&channels%5B%5D=b&channels[0]=c` to a project
//! and an ordered channel list. Pure string work; it must not validate projects or channels.

/// What the realtime handshake reads from the query string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RealtimeQuery {
    pub project: Option<String>,
    /// Channels in the order they appear, duplicates removed.
    pub channels: Vec<String>,
    /// `lastEventId`, for clients resuming after a reconnect.
    pub last_event_id: Option<String>,
}

/// Parses a raw (still percent-encoded) query string.
pub fn parse(query: &str) -> RealtimeQuery {
    let mut out = RealtimeQuery::default();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let (base, bracket) = match key.find('[') {
            Some(i) => (&key[..i], Some(&key[i..])),
            None => (&key[..], None),
        };
        match (base, bracket) {
            _ if value.is_empty() => {}
            ("project", None) => out.project = Some(value.into_owned()),
            ("lastEventId", None) => out.last_event_id = Some(value.into_owned()),
            // `channels[]`, `channels[3]`, and a bare `channels=x` (read as a one-element list
            // rather than failing the way PHP's type error does).
            ("channels", b)
                if b.is_none_or(is_list_index)
                    && !out.channels.iter().any(|c| c == value.as_ref()) =>
            {
                out.channels.push(value.into_owned());
            }
            _ => {}
        }
    }
    out
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
        );
        assert_eq!(q.project.as_deref(), Some("p1"));
        assert_eq!(q.channels, vec!["a", "b", "c", "d"]);
    }

    #[test]
    fn percent_decoding_and_unknown_keys() {
        let q = parse(
            "channels[]=databases.db.collections.c.documents&documents[0][]=%7B%7D&project=&x=1&lastEventId=1-0",
        );
        assert_eq!(q.project, None);
        assert_eq!(q.channels, vec!["databases.db.collections.c.documents"]);
        assert_eq!(q.last_event_id.as_deref(), Some("1-0"));
        assert_eq!(parse("channels[a]=x").channels, Vec::<String>::new());
        assert_eq!(parse("channels=solo").channels, vec!["solo"]);
    }
}
