//! RFC 6455 frame headers: parsing what clients send and encoding what the server sends.
//!
//! Owns the bit layout of a frame header, masking, and the close-frame payload format. It must
//! stay pure: no sockets, no buffers kept between calls, no knowledge of the realtime protocol.
//! Message assembly (fragments, UTF-8) lives in `decoder.rs`.

use thiserror::Error;

/// Frame opcodes that RFC 6455 defines; anything else is a protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Result<Self, ProtocolError> {
        Ok(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            other => return Err(ProtocolError::UnknownOpcode(other)),
        })
    }

    fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// Close codes herald sends or checks (RFC 6455 section 7.4.1).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;

    /// Whether a peer may put `code` on the wire. 1004-1006 and 1015 are reserved for local use,
    /// 1016-2999 for future standards, and anything outside 1000-4999 is invalid.
    pub fn is_valid_on_wire(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// Everything a client can get wrong at the framing level, each mapped to the close code that
/// RFC 6455 prescribes for it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("client frame is not masked")]
    Unmasked,
    #[error("control frame is fragmented")]
    FragmentedControl,
    #[error("control frame payload exceeds 125 bytes")]
    ControlTooLong,
    #[error("payload length has its most significant bit set")]
    BadLength,
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    TooBig { len: u64, limit: usize },
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("close frame with a one-byte payload")]
    CloseTooShort,
    #[error("close frame with invalid code {0}")]
    InvalidCloseCode(u16),
}

impl ProtocolError {
    /// The close code to send back for this error.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::TooBig { .. } => close_code::TOO_BIG,
            Self::InvalidUtf8 => close_code::INVALID_PAYLOAD,
            _ => close_code::PROTOCOL_ERROR,
        }
    }
}

/// A parsed frame header. `payload_len` is what the header claims; the payload may not have
/// arrived yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: Opcode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    pub header_len: usize,
}

impl FrameHeader {
    /// Parses a client-to-server header from the start of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` does not yet hold the whole header. Limits are checked as
    /// soon as the length is known, so an oversized frame is refused before its payload is read.
    pub fn parse(buf: &[u8], max_payload: usize) -> Result<Option<Self>, ProtocolError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        if b0 & 0x70 != 0 {
            return Err(ProtocolError::ReservedBits);
        }
        let fin = b0 & 0x80 != 0;
        let opcode = Opcode::from_bits(b0 & 0x0F)?;
        let masked = b1 & 0x80 != 0;
        let len7 = b1 & 0x7F;
        if opcode.is_control() {
            if !fin {
                return Err(ProtocolError::FragmentedControl);
            }
            if len7 > 125 {
                return Err(ProtocolError::ControlTooLong);
            }
        }
        let (payload_len, mut pos) = match len7 {
            126 => match buf.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
                None => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(b) => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    let len = u64::from_be_bytes(a);
                    if len & (1 << 63) != 0 {
                        return Err(ProtocolError::BadLength);
                    }
                    (len, 10)
                }
                None => return Ok(None),
            },
            n => (u64::from(n), 2),
        };
        if !masked {
            return Err(ProtocolError::Unmasked);
        }
        if payload_len > max_payload as u64 {
            return Err(ProtocolError::TooBig {
                len: payload_len,
                limit: max_payload,
            });
        }
        let mask = match buf.get(pos..pos + 4) {
            Some(m) => [m[0], m[1], m[2], m[3]],
            None => return Ok(None),
        };
        pos += 4;
        Ok(Some(Self {
            fin,
            opcode,
            mask: Some(mask),
            payload_len,
            header_len: pos,
        }))
    }
}

/// XORs `data` with the 4-byte `mask`, starting at mask position `offset`.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut m = [0u8; 4];
    for (i, b) in m.iter_mut().enumerate() {
        *b = mask[(offset + i) % 4];
    }
    let word = u32::from_ne_bytes(m);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i];
    }
}

/// An encoded server-to-client frame header (never masked): at most 10 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerHeader {
    bytes: [u8; 10],
    len: u8,
}

impl ServerHeader {
    pub fn new(opcode: Opcode, payload_len: usize) -> Self {
        let mut bytes = [0u8; 10];
        bytes[0] = 0x80 | opcode.bits();
        let len = if payload_len < 126 {
            bytes[1] = payload_len as u8;
            2
        } else if payload_len <= usize::from(u16::MAX) {
            bytes[1] = 126;
            bytes[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
            4
        } else {
            bytes[1] = 127;
            bytes[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
            10
        };
        Self { bytes, len }
    }

    /// No header at all, for raw bytes such as the HTTP upgrade response.
    pub fn none() -> Self {
        Self {
            bytes: [0; 10],
            len: 0,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// A close frame's payload as received, after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason<'a> {
    pub code: Option<u16>,
    pub reason: &'a str,
}

/// Validates a received close payload: empty, or a valid code followed by UTF-8 text.
pub fn parse_close_payload(payload: &[u8]) -> Result<CloseReason<'_>, ProtocolError> {
    match payload.len() {
        0 => Ok(CloseReason {
            code: None,
            reason: "",
        }),
        1 => Err(ProtocolError::CloseTooShort),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code::is_valid_on_wire(code) {
                return Err(ProtocolError::InvalidCloseCode(code));
            }
            let reason =
                std::str::from_utf8(&payload[2..]).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(CloseReason {
                code: Some(code),
                reason,
            })
        }
    }
}

/// Builds a close payload: the code and a reason cut to fit a control frame (125 bytes).
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = Vec::with_capacity(2 + cut);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&reason.as_bytes()[..cut]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut out = vec![first];
        if payload.len() < 126 {
            out.push(0x80 | payload.len() as u8);
        } else {
            out.push(0x80 | 126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        let mut p = payload.to_vec();
        apply_mask(&mut p, mask, 0);
        out.extend_from_slice(&p);
        out
    }

    #[test]
    fn parses_masked_text_header() {
        let f = masked(0x81, b"hello");
        let h = FrameHeader::parse(&f, 1000).unwrap().unwrap();
        assert!(h.fin);
        assert_eq!(h.opcode, Opcode::Text);
        assert_eq!(h.payload_len, 5);
        assert_eq!(h.header_len, 6);
    }

    #[test]
    fn incomplete_header_needs_more() {
        let f = masked(0x81, &[0u8; 300]);
        for cut in 0..8 {
            assert_eq!(FrameHeader::parse(&f[..cut], 1000), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn refuses_unmasked_and_oversized() {
        assert_eq!(
            FrameHeader::parse(&[0x81, 0x05, b'h'], 1000),
            Err(ProtocolError::Unmasked)
        );
        let f = masked(0x82, &[0u8; 300]);
        assert_eq!(
            FrameHeader::parse(&f, 100).unwrap_err().close_code(),
            close_code::TOO_BIG
        );
    }

    #[test]
    fn mask_roundtrip_at_any_offset() {
        let original: Vec<u8> = (0..37).collect();
        let mut data = original.clone();
        apply_mask(&mut data[..5], [9, 8, 7, 6], 0);
        apply_mask(&mut data[5..], [9, 8, 7, 6], 5);
        apply_mask(&mut data, [9, 8, 7, 6], 0);
        assert_eq!(data, original);
    }

    #[test]
    fn server_header_lengths() {
        assert_eq!(ServerHeader::new(Opcode::Text, 5).as_bytes(), &[0x81, 5]);
        assert_eq!(
            ServerHeader::new(Opcode::Text, 300).as_bytes(),
            &[0x81, 126, 1, 44]
        );
        assert_eq!(
            ServerHeader::new(Opcode::Binary, 70_000).as_bytes().len(),
            10
        );
    }

    #[test]
    fn close_payload_validation() {
        assert!(parse_close_payload(&[0x03]).is_err());
        assert_eq!(
            parse_close_payload(&[0x03, 0xE8]).unwrap().code,
            Some(close_code::NORMAL)
        );
        assert!(parse_close_payload(&[0x03, 0xED]).is_err()); // 1005 is local-only
        assert_eq!(
            parse_close_payload(&[0x03, 0xE8, 0xFF]),
            Err(ProtocolError::InvalidUtf8)
        );
        let long = "é".repeat(100);
        let p = close_payload(1000, &long);
        assert!(p.len() <= 125);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
    }
}
