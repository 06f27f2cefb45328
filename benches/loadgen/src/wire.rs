//! The client side of the wire: the upgrade response, server frame headers and the few control
//! messages (`connected`, `response`, `error`) the connection state machine must tell apart.
//!
//! Owns parsing bytes a server sent and the masking key of frames sent to it. Pure: no sockets,
//! no clocks, no connection state. Events are not parsed here (the engine scans them for their
//! `"hb"` field without parsing JSON).

use serde_json::Value;

/// Largest upgrade response head accepted.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Largest server frame buffered; bigger ones end the connection as a protocol error.
const MAX_FRAME: usize = 16 << 20;
/// Characters of an HTTP refusal body (or a message) quoted in a failure reason.
pub(crate) const MAX_BODY_QUOTE: usize = 300;

pub(crate) const OP_CONTINUATION: u8 = 0x0;
pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

/// The server's answer to the upgrade request, as far as it has arrived.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Response {
    Incomplete,
    /// 101 with the right accept key; the head is this many bytes long.
    Upgraded(usize),
    /// Anything else, with a reason naming the HTTP status and quoting the body.
    Refused(String),
}

fn header<'a>(headers: &'a [httparse::Header<'_>], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

fn refusal(code: u16, reason: &str, body: &[u8]) -> String {
    let body = String::from_utf8_lossy(body);
    let body = body.trim();
    let quoted: String = body.chars().take(MAX_BODY_QUOTE).collect();
    let cut = if quoted.len() < body.len() { "..." } else { "" };
    format!("HTTP {code} {reason}: {quoted}{cut}")
}

pub(crate) fn parse_response(buf: &[u8], accept: &str) -> Response {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
            return Response::Refused(format!("response head over {MAX_RESPONSE_HEAD} bytes"));
        }
        Ok(httparse::Status::Partial) => return Response::Incomplete,
        Err(e) => return Response::Refused(format!("invalid HTTP response: {e}")),
    };
    let code = resp.code.unwrap_or(0);
    if code == 101 {
        return match header(resp.headers, "sec-websocket-accept") {
            Some(v) if v == accept.as_bytes() => Response::Upgraded(head_len),
            _ => Response::Refused("HTTP 101 without the expected Sec-WebSocket-Accept".into()),
        };
    }
    let length = header(resp.headers, "content-length")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(len) if buf.len() >= head_len + len => Response::Refused(refusal(
            code,
            resp.reason.unwrap_or(""),
            &buf[head_len..head_len + len],
        )),
        // The body is still coming (or ends at EOF without a length).
        _ => Response::Incomplete,
    }
}

/// Why a connection closed during the upgrade: the refusal it got, if a head arrived.
pub(crate) fn refusal_at_eof(buf: &[u8]) -> String {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            refusal(resp.code.unwrap_or(0), resp.reason.unwrap_or(""), &buf[n..])
        }
        _ if buf.is_empty() => "connection closed before any response".into(),
        _ => "connection closed in the middle of the response head".into(),
    }
}

/// The header of an unmasked server-to-client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerFrame {
    pub fin: bool,
    pub opcode: u8,
    pub header_len: usize,
    pub payload_len: usize,
}

/// Parses a server frame header from the start of `buf`; `Ok(None)` until it is complete.
pub(crate) fn parse_server_frame(buf: &[u8]) -> Result<Option<ServerFrame>, String> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err("server frame with reserved bits set".into());
    }
    if b1 & 0x80 != 0 {
        return Err("masked server frame".into());
    }
    let (len, header_len) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                (u64::from_be_bytes(a), 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let payload_len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or_else(|| {
            format!("server frame of {len} bytes (herald-bench buffers at most {MAX_FRAME})")
        })?;
    Ok(Some(ServerFrame {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0F,
        header_len,
        payload_len,
    }))
}

/// What a server text message is, as far as the client state machine cares.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Message {
    Connected,
    /// `response` to a subscribe message.
    Subscribed,
    Error(String),
    Other(Option<String>),
}

/// Classifies a control message (not called for events, which are scanned without parsing).
pub(crate) fn classify(payload: &[u8]) -> Result<Message, String> {
    let v: Value = serde_json::from_slice(payload).map_err(|_| {
        let text = String::from_utf8_lossy(payload);
        format!(
            "message is not JSON: {}",
            text.chars().take(MAX_BODY_QUOTE).collect::<String>()
        )
    })?;
    Ok(match v.get("type").and_then(Value::as_str) {
        Some("connected") => Message::Connected,
        Some("response") if v["data"]["to"] == "subscribe" && v["data"]["success"] == true => {
            Message::Subscribed
        }
        Some("error") => Message::Error(v["data"].to_string()),
        other => Message::Other(other.map(str::to_owned)),
    })
}

/// Checks the first message is `connected`; otherwise says what came instead.
pub(crate) fn first_message(payload: &[u8]) -> Result<(), String> {
    match classify(payload).map_err(|e| format!("first {e}"))? {
        Message::Connected => Ok(()),
        Message::Error(data) => Err(format!("error instead of connected: {data}")),
        Message::Subscribed => Err("first message is a response, not \"connected\"".into()),
        Message::Other(t) => Err(format!("first message has type {t:?}, not \"connected\"")),
    }
}

/// A fresh masking key for a client frame.
pub(crate) fn mask() -> [u8; 4] {
    rand::random::<u32>().to_ne_bytes()
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_responses() {
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: abc\r\n\r\n\x81\x00";
        assert_eq!(parse_response(ok, "abc"), Response::Upgraded(ok.len() - 2));
        assert!(matches!(parse_response(ok, "xyz"), Response::Refused(_)));
        assert_eq!(parse_response(&ok[..20], "abc"), Response::Incomplete);
        let refused = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\n{\"x\":404}";
        assert_eq!(
            parse_response(refused, "abc"),
            Response::Refused("HTTP 404 Not Found: {\"x\":404}".into())
        );
        assert_eq!(
            parse_response(&refused[..refused.len() - 1], "abc"),
            Response::Incomplete
        );
        assert_eq!(
            refusal_at_eof(b"HTTP/1.1 503 Busy\r\n\r\ntry later"),
            "HTTP 503 Busy: try later"
        );
    }

    #[test]
    fn server_frames() {
        assert_eq!(parse_server_frame(&[0x89]), Ok(None));
        let f = parse_server_frame(&[0x89, 0x00]).unwrap().unwrap();
        assert_eq!(
            (f.opcode, f.fin, f.header_len, f.payload_len),
            (OP_PING, true, 2, 0)
        );
        let f = parse_server_frame(&[0x81, 126, 1, 0]).unwrap().unwrap();
        assert_eq!((f.header_len, f.payload_len), (4, 256));
        assert_eq!(parse_server_frame(&[0x81, 127, 0, 0]), Ok(None));
        assert!(parse_server_frame(&[0x81, 0x85]).is_err(), "masked");
        assert!(parse_server_frame(&[0xC1, 0x00]).is_err(), "reserved bits");
    }

    #[test]
    fn first_message_must_be_connected() {
        assert!(first_message(br#"{"type":"connected","data":{}}"#).is_ok());
        let e = first_message(br#"{"type":"error","data":{"code":1008}}"#).unwrap_err();
        assert!(e.contains("1008"));
        assert!(first_message(b"nope").is_err());
        assert_eq!(
            classify(br#"{"type":"response","data":{"to":"subscribe","success":true}}"#),
            Ok(Message::Subscribed)
        );
    }
}
