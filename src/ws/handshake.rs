//! The HTTP/1.1 upgrade request that opens a WebSocket, and the responses to it.
//!
//! Owns parsing of the request head (bounded in size), the RFC 6455 checks on it, and the bytes
//! of every response herald gives before a connection is a WebSocket (101, 4xx). It must not
//! decide routing or know the realtime protocol; the caller looks at the path and query.

use thiserror::Error;

const MAX_HEADERS: usize = 48;

/// Why a request head could not be parsed at all.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    #[error("request head exceeds {0} bytes")]
    TooLarge(usize),
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
}

impl HandshakeError {
    pub fn status(&self) -> u16 {
        match self {
            Self::TooLarge(_) => 431,
            Self::Malformed(_) => 400,
        }
    }
}

/// The parts of an upgrade request herald looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub upgrade_websocket: bool,
    pub connection_upgrade: bool,
    pub version: Option<String>,
    pub key: Option<String>,
    /// `x-appwrite-project`, which wins over the `project` query parameter.
    pub project: Option<String>,
    /// `Origin`, which browsers always send.
    pub origin: Option<String>,
    /// Every `X-Forwarded-For` value, joined by commas in order (read only from a trusted
    /// proxy).
    pub forwarded_for: Option<String>,
    /// `x-appwrite-jwt`.
    pub jwt: Option<String>,
    /// An Appwrite session came with the request: an `a_session_*` cookie, `x-appwrite-session`
    /// or `x-fallback-cookies`.
    pub session: bool,
    /// `Cookie`, `x-appwrite-session` and `x-fallback-cookies` as sent, for a resolver to read
    /// the session of the request's project from.
    pub cookie: Option<String>,
    pub appwrite_session: Option<String>,
    pub fallback_cookies: Option<String>,
}

/// The headers [`parse_request`] reads; every other one (`Host`, `User-Agent`, ...) is skipped
/// before its value is looked at.
const WANTED: [&str; 11] = [
    "upgrade",
    "connection",
    "sec-websocket-version",
    "sec-websocket-key",
    "x-appwrite-project",
    "origin",
    "x-appwrite-jwt",
    "cookie",
    "x-appwrite-session",
    "x-fallback-cookies",
    "x-forwarded-for",
];

/// Parses a request head from the start of `buf`. `Ok(None)` means it is incomplete; bytes
/// after the head (if any) belong to the WebSocket stream and are reported by the length.
pub fn parse_request(
    buf: &[u8],
    max_len: usize,
) -> Result<Option<(Request, usize)>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= max_len {
                return Err(HandshakeError::TooLarge(max_len));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HandshakeError::Malformed(format!(
                "more than {MAX_HEADERS} headers"
            )));
        }
        Err(e) => return Err(HandshakeError::Malformed(e.to_string())),
    };
    if len > max_len {
        return Err(HandshakeError::TooLarge(max_len));
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut out = Request {
        method: req.method.unwrap_or("").to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        ..Request::default()
    };
    for h in req.headers.iter() {
        let name = h.name;
        if !WANTED.iter().any(|w| name.eq_ignore_ascii_case(w)) {
            continue;
        }
        let value = match std::str::from_utf8(h.value) {
            Ok(v) => std::borrow::Cow::Borrowed(v),
            Err(_) => String::from_utf8_lossy(h.value),
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("upgrade") {
            out.upgrade_websocket = value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("websocket"));
        } else if name.eq_ignore_ascii_case("connection") {
            out.connection_upgrade = value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            out.version = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            out.key = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("x-appwrite-project") && !value.is_empty() {
            out.project = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("origin") {
            out.origin = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("x-appwrite-jwt") && !value.is_empty() {
            out.jwt = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("cookie") {
            out.session |= value
                .split(';')
                .any(|c| c.trim_start().starts_with("a_session_"));
            match &mut out.cookie {
                Some(all) => {
                    all.push_str("; ");
                    all.push_str(value);
                }
                None => out.cookie = Some(value.to_owned()),
            }
        } else if name.eq_ignore_ascii_case("x-appwrite-session") && !value.is_empty() {
            out.session = true;
            out.appwrite_session = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("x-fallback-cookies") && !value.is_empty() {
            out.session = true;
            out.fallback_cookies = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            match &mut out.forwarded_for {
                Some(list) => {
                    list.push(',');
                    list.push_str(value);
                }
                None => out.forwarded_for = Some(value.to_owned()),
            }
        }
    }
    Ok(Some((out, len)))
}

/// An HTTP answer that refuses the upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub message: &'static str,
}

impl Request {
    /// Applies RFC 6455 section 4.2.1 and returns the key to answer with.
    pub fn websocket_key(&self) -> Result<&str, Rejection> {
        if self.method != "GET" {
            return Err(Rejection {
                status: 405,
                message: "WebSocket upgrades must use GET",
            });
        }
        if !self.upgrade_websocket || !self.connection_upgrade {
            return Err(Rejection {
                status: 426,
                message: "This endpoint speaks WebSocket only: send an Upgrade: websocket request",
            });
        }
        if self.version.as_deref() != Some("13") {
            return Err(Rejection {
                status: 426,
                message: "Unsupported Sec-WebSocket-Version: only 13 is supported",
            });
        }
        match self.key.as_deref() {
            // A valid key is 16 random bytes in base64: always 24 characters ending in "==".
            Some(k) if k.len() == 24 && k.ends_with("==") => Ok(k),
            _ => Err(Rejection {
                status: 400,
                message: "Missing or invalid Sec-WebSocket-Key",
            }),
        }
    }
}

/// The 101 response that completes the upgrade.
pub fn accept_response(key: &str) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// A complete HTTP error response with a JSON body; the connection is closed after it.
pub fn error_response(status: u16, message: &str) -> Vec<u8> {
    let reason = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let body = serde_json::json!({ "code": status, "message": message }).to_string();
    let extra = match status {
        426 => "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
        429 => "Retry-After: 1\r\n",
        _ => "",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] = b"GET /v1/realtime?project=p&channels%5B%5D=files HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Appwrite-Project: hp\r\n\r\nextra";

    #[test]
    fn parses_upgrade_and_reports_head_length() {
        let (req, len) = parse_request(UPGRADE, 4096).unwrap().unwrap();
        assert_eq!(&UPGRADE[len..], b"extra");
        assert_eq!(req.path, "/v1/realtime");
        assert_eq!(req.query, "project=p&channels%5B%5D=files");
        assert_eq!(req.project.as_deref(), Some("hp"));
        assert_eq!(req.websocket_key(), Ok("dGhlIHNhbXBsZSBub25jZQ=="));
        let resp = String::from_utf8(accept_response("dGhlIHNhbXBsZSBub25jZQ==")).unwrap();
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }

    #[test]
    fn partial_and_oversized_heads() {
        assert_eq!(parse_request(&UPGRADE[..30], 4096), Ok(None));
        assert_eq!(
            parse_request(&UPGRADE[..30], 20),
            Err(HandshakeError::TooLarge(20))
        );
        assert!(matches!(
            parse_request(b"\x00\x01garbage\r\n\r\n", 4096),
            Err(HandshakeError::Malformed(_))
        ));
    }

    #[test]
    fn plain_get_needs_upgrade() {
        let (req, _) = parse_request(b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\n\r\n", 4096)
            .unwrap()
            .unwrap();
        assert_eq!(req.websocket_key().unwrap_err().status, 426);
        let resp = String::from_utf8(error_response(426, "x")).unwrap();
        assert!(resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
    }
}
