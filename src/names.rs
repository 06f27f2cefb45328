//! The rules for ids and names every input is checked against before anything is allocated.
//!
//! Owns what a valid project or subscription id and a valid channel, role or event name is, and
//! the words clients see for each. Pure; it must not know events, sessions or connections.

/// Longest channel, role or event name, anywhere (URL, subscribe, publish, stream entry).
pub const MAX_NAME_BYTES: usize = 256;
/// Longest id (project, subscription): Appwrite's custom-id rule.
pub const MAX_ID_BYTES: usize = 36;

/// What a valid project or subscription id is, in the words clients see.
pub const ID_RULE: &str = "at most 36 characters of a-z, A-Z, 0-9, period, hyphen and underscore, not starting with a special character";
/// What a valid channel, role or event name is, in the words clients see.
pub const NAME_RULE: &str = "1 to 256 visible ASCII characters (no spaces or control characters)";

/// Appwrite's custom-id rule (project and subscription ids).
pub fn is_valid_id(id: &str) -> bool {
    id.len() <= MAX_ID_BYTES
        && id.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A channel, role or event name: short and printable, so that it is cheap to index and can
/// never smuggle a separator or a control character into a log or an index key.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_BYTES && name.bytes().all(|b| b.is_ascii_graphic())
}
