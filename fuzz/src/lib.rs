//! What each fuzz target checks, one function per target taking the fuzzer's raw bytes.
//!
//! The targets in `fuzz_targets/` only call these, and the root test `tests/fuzz_regressions.rs`
//! includes this file to replay the seeds and every saved crash through the very same checks.
//! Each function documents how it reads its input; every check is an invariant herald
//! documents, so a failed assertion is a herald bug (or a wrong document), never noise.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::Arc;

use herald::bus::redis::{parse_appwrite, parse_entry};
use herald::event::{EncodedEvent, Event, EventId, is_valid_id, is_valid_name, write_tail};
use herald::protocol::{Session, SessionLimits, is_valid_subscription_id};
use herald::ws::decoder::{Decoder, OwnedMessage};
use herald::ws::frame::{ProtocolError, close_code};
use herald::ws::handshake::{HandshakeError, accept_response, parse_request};
use redis::streams::StreamId;

/// The longest client frame header: 2 bytes, an 8-byte length and a 4-byte mask.
const MAX_HEADER: usize = 14;

#[derive(Debug, PartialEq)]
struct Outcome {
    messages: Vec<OwnedMessage>,
    error: Option<ProtocolError>,
}

fn message_len(m: &OwnedMessage) -> usize {
    match m {
        OwnedMessage::Text(s) => s.len(),
        OwnedMessage::Binary(b) | OwnedMessage::Ping(b) | OwnedMessage::Pong(b) => b.len(),
        OwnedMessage::Close(code, reason) => reason.len() + if code.is_some() { 2 } else { 0 },
    }
}

/// Feeds `stream` in reads of the given lengths (the rest in one read), the way a connection
/// does: decoding stops at a close frame and nothing is fed after an error. Checks the memory
/// bound after every read.
fn decode(stream: &[u8], reads: &[usize], max: usize) -> Outcome {
    let mut dec = Decoder::default();
    let mut messages = Vec::new();
    let mut closed = false;
    let mut longest = 0;
    let mut start = 0;
    let mut lens = reads.iter().copied();
    while start < stream.len() && !closed {
        let len = lens.next().unwrap_or(stream.len() - start);
        let end = (start + len.max(1)).min(stream.len());
        let mut read = stream[start..end].to_vec();
        longest = longest.max(read.len());
        start = end;
        let result = dec.feed(&mut read, max, |m| {
            assert!(!closed, "a message was delivered after the close frame");
            let m = OwnedMessage::from(m);
            closed = matches!(m, OwnedMessage::Close(..));
            messages.push(m);
            if closed {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        let held = dec.held_bytes();
        let bound = 2 * max + MAX_HEADER + longest;
        assert!(
            held <= bound,
            "held {held} bytes with limit {max} and reads of at most {longest} (bound {bound})"
        );
        if let Err(e) = result {
            assert!(!closed, "an error after the callback asked to stop: {e}");
            return Outcome {
                messages,
                error: Some(e),
            };
        }
    }
    Outcome {
        messages,
        error: None,
    }
}

/// `Decoder::feed` on arbitrary client bytes, cut into reads where the input says.
///
/// Input: 2 bytes of message limit (little endian, modulo 4,100), 1 byte `n` (modulo 16), `n`
/// read lengths of one byte each (a first length of 0 means one byte per read), then the
/// stream. Checks, after every read, the documented memory bound `held_bytes() <= 2 * max + 14 +
/// longest read`; that no delivered message exceeds the limit (control frames: 125 bytes) and
/// no close code is invalid on the wire; that nothing is decoded after a close or an error; and
/// that the cut points change nothing: the split stream yields the same messages and error as
/// the whole stream in one read.
pub fn decoder(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let max = usize::from(u16::from_le_bytes([data[0], data[1]])) % 4_100;
    let n = usize::from(data[2] % 16);
    let Some(lens) = data.get(3..3 + n) else {
        return;
    };
    let stream = &data[3 + n..];
    let reads: Vec<usize> = if lens.first() == Some(&0) {
        vec![1; stream.len()]
    } else {
        lens.iter().map(|&l| usize::from(l)).collect()
    };

    let split = decode(stream, &reads, max);
    for m in &split.messages {
        assert!(
            message_len(m) <= max,
            "a message over the limit {max}: {m:?}"
        );
        match m {
            OwnedMessage::Ping(b) | OwnedMessage::Pong(b) => assert!(b.len() <= 125),
            OwnedMessage::Close(None, reason) => {
                assert!(reason.is_empty(), "a close reason without a code")
            }
            OwnedMessage::Close(Some(c), reason) => {
                assert!(close_code::is_valid_on_wire(*c), "close code {c} delivered");
                assert!(reason.len() <= 123);
            }
            OwnedMessage::Text(_) | OwnedMessage::Binary(_) => {}
        }
    }
    let whole = decode(stream, &[stream.len()], max);
    assert_eq!(split, whole, "the cut points changed what was decoded");
}

/// `parse_request` and `Request::websocket_key` on arbitrary bytes.
///
/// Input: 2 bytes of head limit (little endian, modulo 8,192), then what a client sent. Checks
/// that a parsed head is no longer than the input or the limit, that an incomplete head never
/// waits past the limit, that the bytes after the head change nothing, and that a key is
/// accepted only from a GET with both upgrade headers and version 13, and is the request's own
/// key of 24 characters ending in `==`.
pub fn handshake(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let max_len = usize::from(u16::from_le_bytes([data[0], data[1]])) % 8_192;
    let buf = &data[2..];
    match parse_request(buf, max_len) {
        Ok(Some((req, len))) => {
            assert!(
                len <= buf.len(),
                "head of {len} bytes in {} bytes",
                buf.len()
            );
            assert!(
                len <= max_len,
                "head of {len} bytes over the limit {max_len}"
            );
            assert_eq!(
                parse_request(&buf[..len], max_len),
                Ok(Some((req.clone(), len))),
                "the bytes after the head changed the request"
            );
            assert!(!req.path.contains('?'));
            if let Ok(key) = req.websocket_key() {
                assert_eq!(req.method, "GET");
                assert!(req.upgrade_websocket && req.connection_upgrade);
                assert_eq!(req.version.as_deref(), Some("13"));
                assert_eq!(Some(key), req.key.as_deref());
                assert!(key.len() == 24 && key.ends_with("=="));
                assert!(accept_response(key).starts_with(b"HTTP/1.1 101 "));
            }
        }
        Ok(None) => assert!(buf.len() < max_len, "waits for more past the limit"),
        Err(HandshakeError::TooLarge(limit)) => assert_eq!(limit, max_len),
        Err(HandshakeError::Malformed(_)) => {}
    }
}

/// `herald::query::parse` on arbitrary query strings.
///
/// Input: 1 byte of channel limit (modulo 32), then the query (lossily made UTF-8). Checks that
/// at most the limit of channels is kept, none twice and none empty; that a limit keeps a
/// prefix of what an unlimited parse keeps and flags exactly when something was left out; and
/// that a project or lastEventId, when present, is not empty.
pub fn query(data: &[u8]) {
    let Some((&limit, rest)) = data.split_first() else {
        return;
    };
    let max_channels = usize::from(limit % 32);
    let query = String::from_utf8_lossy(rest);
    let q = herald::query::parse(&query, max_channels);
    assert!(q.channels.len() <= max_channels);
    let distinct: HashSet<&str> = q.channels.iter().map(String::as_str).collect();
    assert_eq!(distinct.len(), q.channels.len(), "duplicate channels");
    assert!(q.channels.iter().all(|c| !c.is_empty()), "an empty channel");
    assert!(q.project.as_ref().is_none_or(|p| !p.is_empty()));
    assert!(q.last_event_id.as_ref().is_none_or(|l| !l.is_empty()));
    if q.too_many_channels {
        assert_eq!(q.channels.len(), max_channels);
    }

    let all = herald::query::parse(&query, usize::MAX);
    assert!(!all.too_many_channels);
    assert_eq!(q.channels[..], all.channels[..q.channels.len()]);
    assert_eq!(q.too_many_channels, all.channels.len() > max_channels);
    assert_eq!(q.project, all.project);
    assert_eq!(q.last_event_id, all.last_event_id);
}

fn guest() -> Session {
    Session::new(
        "p".into(),
        Arc::new(herald::identity::Identity::guest()),
        &[],
        &mut herald::registry::Registry::default(),
    )
}

/// Any id will do: the sessions fuzzed here have no URL subscription.
const URL_ID: fn() -> herald::protocol::UrlId = || herald::protocol::UrlId::new(1, 1);

fn handle(session: &mut Session, text: &str, limits: &SessionLimits) {
    let mut registry = herald::registry::Registry::default();
    let before = session.channels();
    // A configured verifier, so that `authentication` messages reach JWT parsing.
    let jwt =
        herald::identity::JwtVerifier::new(Some("fuzz-secret"), None).expect("a non-empty secret");
    let reply = session.handle_text(
        text,
        limits,
        herald::protocol::Verifiers {
            jwt: &jwt,
            sessions: true,
        },
        &mut registry,
        &URL_ID(),
    );
    if let Some(frame) = &reply.frame {
        let v: serde_json::Value = serde_json::from_str(frame)
            .unwrap_or_else(|e| panic!("reply {frame:?} is not JSON: {e}"));
        assert!(v.get("type").is_some_and(|t| t.is_string()), "{frame}");
    }
    if let Some(secret) = &reply.resolve_session {
        assert!(!secret.is_empty() && secret.len() <= herald::identity::MAX_SESSION_BYTES);
        assert!(reply.authentication && reply.frame.is_none());
    }
    let url_id = URL_ID();
    let subscriptions: Vec<_> = session.subscriptions(&url_id).collect();
    assert!(subscriptions.len() <= limits.max_subscriptions);
    let mut ids = HashSet::new();
    for s in &subscriptions {
        assert!(is_valid_subscription_id(s.id), "subscription id {:?}", s.id);
        assert!(ids.insert(s.id), "two subscriptions with id {:?}", s.id);
        assert!(s.channels.len() <= limits.max_channels);
        let mut seen = HashSet::new();
        for c in s.channels.iter() {
            assert!(is_valid_name(c), "channel {c:?}");
            assert!(c.len() <= limits.max_channel_len);
            assert!(
                seen.insert(c.clone()),
                "channel {c:?} twice in one subscription"
            );
        }
    }
    if !reply.subscriptions_changed {
        assert_eq!(before, session.channels(), "channels changed unannounced");
        assert!(reply.resume_after.is_none());
    }
}

/// `Session::handle_text` on a guest session, fed a sequence of client messages.
///
/// Input: messages separated by newlines (lossily made UTF-8: the decoder hands sessions valid
/// text only), at most 64. Each goes to two sessions, one with `SessionLimits::default()` and
/// one with tight limits that are reached often. Checks after every message that every reply
/// frame is a JSON object with a `type`; that a session never holds more subscriptions than its
/// limit, nor a subscription more channels than the limit, nor an invalid, overlong or repeated
/// channel, nor two subscriptions with one id or an invalid id; that the channel set changes
/// only when the reply says so (the caller re-indexes only then); and that a resume is asked
/// for only by a subscribe that changed the subscriptions.
pub fn client_message(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let default = SessionLimits::default();
    let tight = SessionLimits {
        max_subscriptions: 2,
        max_channels: 3,
        max_total_channels: 5,
        max_query_weight: 10,
        max_channel_len: 8,
    };
    let (mut a, mut b) = (guest(), guest());
    for message in text.split('\n').take(64) {
        handle(&mut a, message, &default);
        handle(&mut b, message, &tight);
    }
}

const DEFAULT_PROJECT: &str = "console";

fn check_event(ev: &Event) {
    assert!(is_valid_id(&ev.project), "project {:?}", ev.project);
    assert!(!ev.channels.is_empty(), "an event without channels");
    assert!(!ev.roles.is_empty(), "an event without roles");
    for names in [&ev.channels, &ev.events, &ev.roles] {
        for n in names {
            assert!(is_valid_name(n), "name {n:?}");
        }
    }
    assert!(ev.payload.is_object(), "payload {}", ev.payload);
    let encoded = EncodedEvent::encode(ev);
    let mut frame = encoded.prefix.to_vec();
    write_tail(&mut frame, ["a1", "b2"].into_iter());
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(&frame) {
        panic!(
            "event frame {} is not JSON: {e}",
            String::from_utf8_lossy(&frame)
        );
    }
}

fn field_value(raw: &[u8]) -> redis::Value {
    match raw.split_first() {
        Some((1, rest)) => redis::Value::Int(String::from_utf8_lossy(rest).parse().unwrap_or(0)),
        Some((2, _)) => redis::Value::Nil,
        Some((3, rest)) => redis::Value::SimpleString(String::from_utf8_lossy(rest).into_owned()),
        _ => redis::Value::BulkString(raw.to_vec()),
    }
}

/// The two parsers of events from Redis: stream entries (`parse_entry`) and Appwrite's pub/sub
/// messages (`parse_appwrite`, default project `console`).
///
/// Input: the whole input is one pub/sub message. Read as lines it is also one stream entry:
/// the first line is the entry id, each further line (at most 16) a field `name=value` whose
/// value is a bulk string or, when it starts with byte 1, 2 or 3, an integer, a nil or a simple
/// string. Checks that every accepted event has a valid project id, at least one channel and
/// one role, only valid channel, event and role names, and an object payload; that an entry's
/// event keeps the entry id, a valid stream id; and that the encoded event, closed with a
/// subscription list, is valid JSON.
pub fn redis_entry(data: &[u8]) {
    if let Ok(parsed) = parse_appwrite(data, DEFAULT_PROJECT) {
        check_parsed(&parsed);
    }

    let mut lines = data.split(|&b| b == b'\n');
    let id = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let mut map = HashMap::new();
    for line in lines.take(16) {
        let (name, value) = match line.iter().position(|&b| b == b'=') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &[][..]),
        };
        map.insert(
            String::from_utf8_lossy(name).into_owned(),
            field_value(value),
        );
    }
    let entry = StreamId {
        id,
        map,
        milliseconds_elapsed_from_delivery: None,
        delivered_count: None,
    };
    if let Ok(parsed) = parse_entry(&entry, DEFAULT_PROJECT) {
        check_parsed(&parsed);
        if let Some(ev) = &parsed.event {
            assert_eq!(ev.id, entry.id);
            assert!(ev.id.parse::<EventId>().is_ok(), "entry id {:?}", ev.id);
        }
    }
}

/// An accepted message carries an event, a permission change of a valid user, or both.
fn check_parsed(parsed: &herald::bus::redis::Parsed) {
    assert!(parsed.event.is_some() || parsed.permissions_changed.is_some());
    if let Some(ev) = &parsed.event {
        check_event(ev);
    }
    if let Some(change) = &parsed.permissions_changed {
        assert!(herald::names::is_valid_id(&change.user), "{change:?}");
        assert!(herald::names::is_valid_id(&change.project), "{change:?}");
    }
}
