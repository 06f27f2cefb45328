//! Incremental WebSocket message decoder: turns bytes from the socket into whole messages.
//!
//! Owns reassembly of frames split across reads, fragmented messages, UTF-8 validation of text and
//! the inbound size limit. It holds memory only while a frame or a fragmented message is actually
//! incomplete, and then in proportion to the bytes received (never to a declared length), so an
//! idle connection's decoder is one null pointer. It must not know about
//! sockets or the realtime protocol: callers hand it bytes and get borrowed messages back.

use std::ops::ControlFlow;

use super::frame::{
    CloseReason, FrameHeader, Opcode, ProtocolError, apply_mask, parse_close_payload,
};

/// A complete message, borrowed from the decoder's input or its reassembly buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    Close(CloseReason<'a>),
}

/// Per-connection decoding state. `Default` is the idle state and owns no heap memory.
#[derive(Debug, Default)]
pub struct Decoder {
    partial: Option<Box<Partial>>,
}

#[derive(Debug, Default)]
struct Partial {
    /// Bytes of a frame whose end has not arrived yet (and anything after it).
    pending: Vec<u8>,
    /// A fragmented message being assembled.
    message: Option<Fragmented>,
}

#[derive(Debug)]
struct Fragmented {
    text: bool,
    data: Vec<u8>,
    utf8_checked: usize,
}

impl Fragmented {
    /// Validates the newly appended bytes, so invalid text fails at the fragment that broke it.
    fn check_utf8(&mut self, fin: bool) -> Result<(), ProtocolError> {
        if !self.text {
            return Ok(());
        }
        match std::str::from_utf8(&self.data[self.utf8_checked..]) {
            Ok(_) => {
                self.utf8_checked = self.data.len();
                Ok(())
            }
            // An incomplete sequence at the very end may still be completed by the next fragment.
            Err(e) if e.error_len().is_none() && !fin => {
                self.utf8_checked += e.valid_up_to();
                Ok(())
            }
            Err(_) => Err(ProtocolError::InvalidUtf8),
        }
    }
}

impl Decoder {
    /// True when the decoder holds no buffered bytes (the state of an idle connection).
    pub fn is_idle(&self) -> bool {
        self.partial.is_none()
    }

    /// Heap bytes currently held for incomplete frames and messages. With message limit `max`
    /// and reads of at most `read` bytes this stays within `2 * max + 14 + read`: a fragmented
    /// message (at most `max`), the frame still arriving (at most a 14-byte header and `max`),
    /// and the rest of the read that brought it.
    pub fn held_bytes(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| {
            p.pending.capacity() + p.message.as_ref().map_or(0, |m| m.data.capacity())
        })
    }

    /// Feeds freshly read bytes. `input` is unmasked in place (it is the caller's scratch
    /// buffer). `on_message` is called for every complete message in order; returning
    /// `Break` stops decoding (used after a close frame) and drops the remaining input.
    ///
    /// On error, every message before the offending frame has already been delivered and the
    /// decoder must not be fed again.
    pub fn feed<F>(
        &mut self,
        input: &mut [u8],
        max_message: usize,
        mut on_message: F,
    ) -> Result<(), ProtocolError>
    where
        F: FnMut(Message<'_>) -> ControlFlow<()>,
    {
        let mut partial = self.partial.take();
        let mut message = partial.as_mut().and_then(|p| p.message.take());
        let mut pending = partial.map(|p| p.pending).unwrap_or_default();

        let leftover: Vec<u8> = if pending.is_empty() {
            let (consumed, stopped) = process(input, &mut message, max_message, &mut on_message)?;
            if stopped {
                return Ok(());
            }
            input[consumed..].to_vec()
        } else {
            append(&mut pending, input, max_message);
            let (consumed, stopped) =
                process(&mut pending, &mut message, max_message, &mut on_message)?;
            if stopped {
                return Ok(());
            }
            pending.drain(..consumed);
            // Between frames (a fragmented message in progress) keep no frame buffer at all.
            if pending.is_empty() {
                Vec::new()
            } else {
                pending
            }
        };

        if !leftover.is_empty() || message.is_some() {
            // Nothing is reserved for the rest of a frame: what a client declares costs
            // nothing until it sends it.
            self.partial = Some(Box::new(Partial {
                pending: leftover,
                message,
            }));
        }
        Ok(())
    }
}

/// Appends `input` to the incomplete frame in `pending`, growing geometrically (a large frame in
/// many reads is not copied again and again) but never past that frame's declared end: the
/// memory held follows the bytes received, at most twice them.
fn append(pending: &mut Vec<u8>, input: &[u8], max_message: usize) {
    let need = pending.len() + input.len();
    if need > pending.capacity() {
        let frame_end = FrameHeader::parse(pending, max_message)
            .ok()
            .flatten()
            .map(|h| h.header_len + h.payload_len as usize);
        let doubled = pending.capacity().saturating_mul(2).max(need);
        let target = match frame_end {
            Some(end) if end >= need => doubled.min(end),
            _ => need,
        };
        pending.reserve_exact(target - pending.len());
    }
    pending.extend_from_slice(input);
}

/// Decodes every complete frame at the start of `buf`. Returns the bytes consumed and whether the
/// callback asked to stop.
fn process<F>(
    buf: &mut [u8],
    message: &mut Option<Fragmented>,
    max_message: usize,
    on_message: &mut F,
) -> Result<(usize, bool), ProtocolError>
where
    F: FnMut(Message<'_>) -> ControlFlow<()>,
{
    let mut pos = 0;
    while let Some(h) = FrameHeader::parse(&buf[pos..], max_message)? {
        check_sequence(&h, message.as_ref(), max_message)?;
        let total = h.header_len + h.payload_len as usize;
        if buf.len() - pos < total {
            break;
        }
        let payload = &mut buf[pos + h.header_len..pos + total];
        if let Some(mask) = h.mask {
            apply_mask(payload, mask, 0);
        }
        pos += total;
        let flow = match h.opcode {
            Opcode::Ping => on_message(Message::Ping(payload)),
            Opcode::Pong => on_message(Message::Pong(payload)),
            Opcode::Close => on_message(Message::Close(parse_close_payload(payload)?)),
            Opcode::Text | Opcode::Binary => {
                let text = h.opcode == Opcode::Text;
                if h.fin {
                    deliver(text, payload, on_message)?
                } else {
                    let mut f = Fragmented {
                        text,
                        data: payload.to_vec(),
                        utf8_checked: 0,
                    };
                    f.check_utf8(false)?;
                    *message = Some(f);
                    ControlFlow::Continue(())
                }
            }
            Opcode::Continuation => {
                let Some(f) = message.as_mut() else {
                    return Err(ProtocolError::UnexpectedContinuation);
                };
                // Grow geometrically (many small fragments stay linear) but never past the limit.
                let len = f.data.len() + payload.len();
                if len > f.data.capacity() {
                    let cap = (2 * f.data.capacity()).clamp(len, max_message.max(len));
                    f.data.reserve_exact(cap - f.data.len());
                }
                f.data.extend_from_slice(payload);
                f.check_utf8(h.fin)?;
                if h.fin {
                    match message.take() {
                        Some(f) => deliver(f.text, &f.data, on_message)?,
                        None => ControlFlow::Continue(()),
                    }
                } else {
                    ControlFlow::Continue(())
                }
            }
        };
        if flow.is_break() {
            return Ok((pos, true));
        }
    }
    Ok((pos, false))
}

/// Checks a data frame against the message in progress as soon as its header is known, so a
/// frame that must be refused is never buffered first.
fn check_sequence(
    h: &FrameHeader,
    message: Option<&Fragmented>,
    max_message: usize,
) -> Result<(), ProtocolError> {
    match (h.opcode, message) {
        (Opcode::Text | Opcode::Binary, Some(_)) => Err(ProtocolError::ExpectedContinuation),
        (Opcode::Continuation, None) => Err(ProtocolError::UnexpectedContinuation),
        (Opcode::Continuation, Some(f)) => {
            let len = f.data.len() as u64 + h.payload_len;
            if len > max_message as u64 {
                Err(ProtocolError::TooBig {
                    len,
                    limit: max_message,
                })
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

fn deliver<F>(text: bool, data: &[u8], on_message: &mut F) -> Result<ControlFlow<()>, ProtocolError>
where
    F: FnMut(Message<'_>) -> ControlFlow<()>,
{
    Ok(if text {
        let s = std::str::from_utf8(data).map_err(|_| ProtocolError::InvalidUtf8)?;
        on_message(Message::Text(s))
    } else {
        on_message(Message::Binary(data))
    })
}

/// Owned copy of a [`Message`], for tests and tools that collect messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedMessage {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
}

impl From<Message<'_>> for OwnedMessage {
    fn from(m: Message<'_>) -> Self {
        match m {
            Message::Text(s) => Self::Text(s.to_owned()),
            Message::Binary(b) => Self::Binary(b.to_vec()),
            Message::Ping(b) => Self::Ping(b.to_vec()),
            Message::Pong(b) => Self::Pong(b.to_vec()),
            Message::Close(c) => Self::Close(c.code, c.reason.to_owned()),
        }
    }
}

/// Encodes a masked client frame, as a browser would send it. Used by tests and the load
/// generator; the server itself never masks.
pub fn encode_client_frame(fin: bool, opcode_bits: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | (opcode_bits & 0x0F));
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(
        dec: &mut Decoder,
        bytes: &[u8],
        max: usize,
    ) -> (Vec<OwnedMessage>, Result<(), ProtocolError>) {
        let mut out = Vec::new();
        let mut buf = bytes.to_vec();
        let r = dec.feed(&mut buf, max, |m| {
            out.push(m.into());
            ControlFlow::Continue(())
        });
        (out, r)
    }

    #[test]
    fn split_frame_is_reassembled_and_then_freed() {
        let f = encode_client_frame(true, 1, b"hello world", [1, 2, 3, 4]);
        let mut dec = Decoder::default();
        let (m, r) = decode_all(&mut dec, &f[..7], 100);
        assert!(m.is_empty() && r.is_ok());
        assert!(!dec.is_idle());
        let (m, r) = decode_all(&mut dec, &f[7..], 100);
        assert!(r.is_ok());
        assert_eq!(m, vec![OwnedMessage::Text("hello world".into())]);
        assert!(dec.is_idle());
    }

    #[test]
    fn a_declared_length_costs_nothing_until_the_bytes_arrive() {
        let payload = vec![b'x'; 64_000];
        let f = encode_client_frame(true, 1, &payload, [1, 2, 3, 4]);
        let mut dec = Decoder::default();
        assert!(decode_all(&mut dec, &f[..20], 64_000).1.is_ok());
        assert!(
            dec.held_bytes() < 64,
            "{} bytes for 20 received",
            dec.held_bytes()
        );
        let mut sent = 20;
        for step in [1, 100, 1000, 10_000] {
            assert!(
                decode_all(&mut dec, &f[sent..sent + step], 64_000)
                    .1
                    .is_ok()
            );
            sent += step;
            assert!(
                dec.held_bytes() <= 2 * sent,
                "{} held for {sent}",
                dec.held_bytes()
            );
        }
        let (m, r) = decode_all(&mut dec, &f[sent..], 64_000);
        assert!(r.is_ok());
        assert_eq!(m.len(), 1);
        assert!(dec.is_idle());
    }

    #[test]
    fn fragments_with_interleaved_ping() {
        let mut bytes = encode_client_frame(false, 1, b"hel", [9, 9, 9, 9]);
        bytes.extend(encode_client_frame(true, 9, b"p", [1, 1, 1, 1]));
        bytes.extend(encode_client_frame(true, 0, b"lo", [5, 6, 7, 8]));
        let (m, r) = decode_all(&mut Decoder::default(), &bytes, 100);
        assert!(r.is_ok());
        assert_eq!(
            m,
            vec![
                OwnedMessage::Ping(b"p".to_vec()),
                OwnedMessage::Text("hello".into())
            ]
        );
    }

    #[test]
    fn utf8_split_across_fragments_is_valid() {
        let s = "é".as_bytes();
        let mut bytes = encode_client_frame(false, 1, &s[..1], [1, 2, 3, 4]);
        bytes.extend(encode_client_frame(true, 0, &s[1..], [1, 2, 3, 4]));
        let (m, r) = decode_all(&mut Decoder::default(), &bytes, 100);
        assert!(r.is_ok());
        assert_eq!(m, vec![OwnedMessage::Text("é".into())]);
    }

    #[test]
    fn invalid_utf8_fails_fast_in_first_fragment() {
        let bytes = encode_client_frame(false, 1, &[0xff, b'a'], [1, 2, 3, 4]);
        let (_, r) = decode_all(&mut Decoder::default(), &bytes, 100);
        assert_eq!(r, Err(ProtocolError::InvalidUtf8));
    }

    #[test]
    fn fragmented_message_over_limit() {
        let mut bytes = encode_client_frame(false, 2, &[0; 60], [1, 2, 3, 4]);
        bytes.extend(encode_client_frame(true, 0, &[0; 60], [1, 2, 3, 4]));
        let (_, r) = decode_all(&mut Decoder::default(), &bytes, 100);
        assert_eq!(r.unwrap_err().close_code(), 1009);
    }

    #[test]
    fn oversized_continuation_is_refused_at_its_header() {
        let mut bytes = encode_client_frame(false, 2, &[0; 60], [1, 2, 3, 4]);
        let next = encode_client_frame(true, 0, &[0; 60], [1, 2, 3, 4]);
        bytes.extend_from_slice(&next[..6]); // the header only: no payload has arrived
        let mut dec = Decoder::default();
        let (_, r) = decode_all(&mut dec, &bytes, 100);
        assert_eq!(
            r,
            Err(ProtocolError::TooBig {
                len: 120,
                limit: 100
            })
        );
    }

    #[test]
    fn continuation_rules() {
        let bytes = encode_client_frame(true, 0, b"x", [1, 2, 3, 4]);
        let (_, r) = decode_all(&mut Decoder::default(), &bytes, 100);
        assert_eq!(r, Err(ProtocolError::UnexpectedContinuation));
        let mut bytes = encode_client_frame(false, 1, b"x", [1, 2, 3, 4]);
        bytes.extend(encode_client_frame(true, 1, b"y", [1, 2, 3, 4]));
        let (_, r) = decode_all(&mut Decoder::default(), &bytes, 100);
        assert_eq!(r, Err(ProtocolError::ExpectedContinuation));
    }

    #[test]
    fn close_stops_decoding() {
        let mut bytes = encode_client_frame(true, 8, &[0x03, 0xE8], [1, 2, 3, 4]);
        bytes.extend(encode_client_frame(true, 1, b"after", [1, 2, 3, 4]));
        let mut dec = Decoder::default();
        let mut seen = Vec::new();
        let mut buf = bytes.clone();
        dec.feed(&mut buf, 100, |m| {
            let stop = matches!(m, Message::Close(_));
            seen.push(OwnedMessage::from(m));
            if stop {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert_eq!(seen, vec![OwnedMessage::Close(Some(1000), String::new())]);
    }
}
