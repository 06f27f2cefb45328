//! Property tests of the pure WebSocket code: the incremental message decoder and the upgrade
//! request parser. No sockets; each case is a byte stream, cut into reads at arbitrary points.
//!
//! 256 cases per property by default (proptest's default); `PROPTEST_CASES=10000 cargo test
//! --release --test ws_props` digs deeper.

use std::ops::ControlFlow;

use herald::ws::decoder::{Decoder, Message, OwnedMessage, encode_client_frame};
use herald::ws::frame::ProtocolError;
use herald::ws::handshake::{HandshakeError, parse_request};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

/// The longest client frame header: 2 bytes, an 8-byte length and a 4-byte mask.
const MAX_HEADER: usize = 14;

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// What one run of the decoder over a stream produced.
#[derive(Debug, PartialEq)]
struct Outcome {
    messages: Vec<OwnedMessage>,
    error: Option<ProtocolError>,
    /// The most `held_bytes()` reported after any read.
    max_held: usize,
    /// Whether the decoder was idle (held nothing) after the last read.
    idle: bool,
}

/// Feeds `stream` to a fresh decoder in reads that end at `cuts`, the way a connection does:
/// decoding stops at a close frame, and nothing is fed after an error.
fn decode(stream: &[u8], cuts: &[usize], limit: usize) -> Outcome {
    let mut ends: Vec<usize> = cuts.iter().map(|&c| c.min(stream.len())).collect();
    ends.push(stream.len());
    ends.sort_unstable();
    let mut dec = Decoder::default();
    let mut messages = Vec::new();
    let mut max_held = 0;
    let mut closed = false;
    let mut start = 0;
    for end in ends {
        if closed {
            break;
        }
        let mut read = stream[start..end].to_vec();
        start = end;
        let result = dec.feed(&mut read, limit, |m| {
            closed = matches!(m, Message::Close(_));
            messages.push(OwnedMessage::from(m));
            if closed {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        max_held = max_held.max(dec.held_bytes());
        if let Err(e) = result {
            return Outcome {
                messages,
                error: Some(e),
                max_held,
                idle: dec.is_idle(),
            };
        }
    }
    Outcome {
        messages,
        error: None,
        max_held,
        idle: dec.is_idle(),
    }
}

/// The longest read in a stream cut at `cuts`.
fn longest_read(len: usize, cuts: &[usize]) -> usize {
    let mut ends: Vec<usize> = cuts.iter().map(|&c| c.min(len)).collect();
    ends.push(len);
    ends.sort_unstable();
    let mut start = 0;
    let mut longest = 0;
    for end in ends {
        longest = longest.max(end - start);
        start = end;
    }
    longest
}

/// What a decoder may hold at most with message limit `limit` and reads of at most `read`
/// bytes: a fragmented message being assembled (at most the limit), plus the frame that is
/// still arriving (at most a header and the limit), plus the rest of the read that completed
/// it. Anything more would let a client grow a connection's memory past its limit.
fn held_bound(limit: usize, read: usize) -> usize {
    2 * limit + MAX_HEADER + read
}

/// A small xorshift generator, so each frame of a case gets its own mask from one seed.
struct Masks(u32);

impl Masks {
    fn next(&mut self) -> [u8; 4] {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0.to_be_bytes()
    }
}

/// A ping or pong with its payload.
#[derive(Debug, Clone)]
struct Control {
    ping: bool,
    payload: Vec<u8>,
}

impl Control {
    fn frame(&self, masks: &mut Masks) -> Vec<u8> {
        let op = if self.ping { PING } else { PONG };
        encode_client_frame(true, op, &self.payload, masks.next())
    }

    fn message(&self) -> OwnedMessage {
        if self.ping {
            OwnedMessage::Ping(self.payload.clone())
        } else {
            OwnedMessage::Pong(self.payload.clone())
        }
    }
}

/// One step of a valid stream: a message, perhaps fragmented with controls between its
/// fragments, or a lone control frame.
#[derive(Debug, Clone)]
enum Step {
    Message {
        text: bool,
        payload: Vec<u8>,
        /// Where the payload is cut into fragments (any byte, even inside a UTF-8 sequence).
        cuts: Vec<Index>,
        /// Controls sent after the fragment they name.
        controls: Vec<(Index, Control)>,
    },
    Control(Control),
}

fn control() -> impl Strategy<Value = Control> {
    (any::<bool>(), vec(any::<u8>(), 0..=125)).prop_map(|(ping, payload)| Control { ping, payload })
}

fn payload(text: bool) -> BoxedStrategy<Vec<u8>> {
    if text {
        prop_oneof![
            8 => vec(any::<char>(), 0..200).prop_map(|c| String::from_iter(c).into_bytes()),
            // Long enough for the 16-bit length form, built cheaply from one character.
            1 => (any::<char>(), 100usize..3000).prop_map(|(c, n)| c.to_string().repeat(n).into_bytes()),
        ]
        .boxed()
    } else {
        prop_oneof![
            8 => vec(any::<u8>(), 0..300),
            // Past 65535 bytes: the 64-bit length form.
            1 => (65_536usize..70_000, any::<u8>())
                .prop_map(|(n, b)| (0..n).map(|i| b.wrapping_add(i as u8)).collect()),
        ]
        .boxed()
    }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => any::<bool>().prop_flat_map(|text| {
            (payload(text), vec(any::<Index>(), 0..4), vec((any::<Index>(), control()), 0..3))
                .prop_map(move |(payload, cuts, controls)| Step::Message {
                    text,
                    payload,
                    cuts,
                    controls,
                })
        }),
        1 => control().prop_map(Step::Control),
    ]
}

/// How a stream ends: no close frame, an empty one, or a code a peer may send and a reason.
fn close() -> impl Strategy<Value = Option<Option<(u16, String)>>> {
    let code = prop_oneof![
        Just(1000u16),
        Just(1001),
        Just(1002),
        Just(1003),
        1007u16..=1014,
        3000u16..=4999,
    ];
    prop_oneof![
        Just(None),
        Just(Some(None)),
        (code, "[a-zé ]{0,40}").prop_map(|c| Some(Some(c))),
    ]
}

/// Encodes `steps` (and the close, if any) and returns the bytes and the messages a decoder
/// must deliver for them, in order.
fn build(
    steps: &[Step],
    close: &Option<Option<(u16, String)>>,
    seed: u32,
) -> (Vec<u8>, Vec<OwnedMessage>) {
    let mut masks = Masks(seed | 1);
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    for step in steps {
        match step {
            Step::Control(c) => {
                bytes.extend(c.frame(&mut masks));
                expected.push(c.message());
            }
            Step::Message {
                text,
                payload,
                cuts,
                controls,
            } => {
                let mut at: Vec<usize> = cuts.iter().map(|i| i.index(payload.len() + 1)).collect();
                at.sort_unstable();
                at.push(payload.len());
                let mut start = 0;
                for (n, &end) in at.iter().enumerate() {
                    let last = n + 1 == at.len();
                    let op = match (n, *text) {
                        (0, true) => TEXT,
                        (0, false) => BINARY,
                        _ => CONTINUATION,
                    };
                    bytes.extend(encode_client_frame(
                        last,
                        op,
                        &payload[start..end],
                        masks.next(),
                    ));
                    start = end;
                    if last {
                        break;
                    }
                    for (_, c) in controls.iter().filter(|(i, _)| i.index(at.len()) == n) {
                        bytes.extend(c.frame(&mut masks));
                        expected.push(c.message());
                    }
                }
                expected.push(if *text {
                    OwnedMessage::Text(String::from_utf8(payload.clone()).unwrap())
                } else {
                    OwnedMessage::Binary(payload.clone())
                });
            }
        }
    }
    match close {
        None => {}
        Some(None) => {
            bytes.extend(encode_client_frame(true, CLOSE, b"", masks.next()));
            expected.push(OwnedMessage::Close(None, String::new()));
        }
        Some(Some((code, reason))) => {
            let mut p = code.to_be_bytes().to_vec();
            p.extend_from_slice(reason.as_bytes());
            bytes.extend(encode_client_frame(true, CLOSE, &p, masks.next()));
            expected.push(OwnedMessage::Close(Some(*code), reason.clone()));
        }
    }
    (bytes, expected)
}

/// A violation of RFC 6455 and the close code it calls for.
#[derive(Debug, Clone, Copy)]
enum Violation {
    ReservedBits,
    UnknownOpcode,
    Unmasked,
    FragmentedControl,
    ControlTooLong,
    LengthHighBit,
    ContinuationWithoutMessage,
    DataFrameInsideMessage,
    InvalidUtf8Text,
    InvalidUtf8AcrossFragments,
    CloseOneByte,
    CloseInvalidCode,
    CloseInvalidUtf8Reason,
    FrameTooBig,
    FragmentsTooBig,
}

impl Violation {
    fn code(self) -> u16 {
        match self {
            Self::InvalidUtf8Text
            | Self::InvalidUtf8AcrossFragments
            | Self::CloseInvalidUtf8Reason => 1007,
            Self::FrameTooBig | Self::FragmentsTooBig => 1009,
            _ => 1002,
        }
    }

    /// Frames that commit this violation, for a decoder with message limit `limit`.
    fn frames(self, limit: usize, detail: u8, masks: &mut Masks) -> Vec<u8> {
        let mut m = || masks.next();
        let mut out = Vec::new();
        match self {
            Self::ReservedBits => {
                out = encode_client_frame(true, TEXT, b"x", m());
                out[0] |= 0x10 << (detail % 3);
            }
            Self::UnknownOpcode => {
                let op = [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF][usize::from(detail) % 10];
                out = encode_client_frame(true, op, b"x", m());
            }
            Self::Unmasked => {
                out = encode_client_frame(true, TEXT, b"hi", m());
                out[1] &= 0x7F;
                out.drain(2..6);
            }
            Self::FragmentedControl => {
                let op = [CLOSE, PING, PONG][usize::from(detail) % 3];
                out = encode_client_frame(false, op, b"", m());
            }
            Self::ControlTooLong => {
                let op = [CLOSE, PING, PONG][usize::from(detail) % 3];
                out = encode_client_frame(true, op, &[b'a'; 126], m());
            }
            Self::LengthHighBit => {
                out.extend_from_slice(&[0x82, 0x80 | 127]);
                out.extend_from_slice(&(u64::MAX - u64::from(detail)).to_be_bytes());
                out.extend_from_slice(&m());
            }
            Self::ContinuationWithoutMessage => {
                out = encode_client_frame(detail.is_multiple_of(2), CONTINUATION, b"x", m());
            }
            Self::DataFrameInsideMessage => {
                out = encode_client_frame(false, TEXT, b"a", m());
                out.extend(encode_client_frame(
                    detail.is_multiple_of(2),
                    BINARY,
                    b"b",
                    m(),
                ));
            }
            Self::InvalidUtf8Text => {
                let bad: &[u8] = [&b"\xff"[..], b"\xc0\xaf", b"\xed\xa0\x80", b"a\xe2\x82"]
                    [usize::from(detail) % 4];
                out = encode_client_frame(true, TEXT, bad, m());
            }
            Self::InvalidUtf8AcrossFragments => {
                // Valid alone, but the sequence started in the first fragment never ends.
                out = encode_client_frame(false, TEXT, "ok\u{e9}".as_bytes(), m());
                out.extend(encode_client_frame(false, CONTINUATION, b"\xe2\x82", m()));
                out.extend(encode_client_frame(true, CONTINUATION, b"z", m()));
            }
            Self::CloseOneByte => out = encode_client_frame(true, CLOSE, &[0x03], m()),
            Self::CloseInvalidCode => {
                let code = [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535]
                    [usize::from(detail) % 10];
                out = encode_client_frame(true, CLOSE, &code.to_be_bytes(), m());
            }
            Self::CloseInvalidUtf8Reason => {
                out = encode_client_frame(true, CLOSE, b"\x03\xe8bye\xff", m());
            }
            Self::FrameTooBig => {
                out = encode_client_frame(true, BINARY, &vec![7; limit + 1], m());
            }
            Self::FragmentsTooBig => {
                let half = limit / 2 + 1;
                out = encode_client_frame(false, BINARY, &vec![7; half], m());
                out.extend(encode_client_frame(true, CONTINUATION, &vec![7; half], m()));
            }
        }
        out
    }
}

fn violation() -> impl Strategy<Value = Violation> {
    use Violation::*;
    proptest::sample::select(vec![
        ReservedBits,
        UnknownOpcode,
        Unmasked,
        FragmentedControl,
        ControlTooLong,
        LengthHighBit,
        ContinuationWithoutMessage,
        DataFrameInsideMessage,
        InvalidUtf8Text,
        InvalidUtf8AcrossFragments,
        CloseOneByte,
        CloseInvalidCode,
        CloseInvalidUtf8Reason,
        FrameTooBig,
        FragmentsTooBig,
    ])
}

/// Bytes that look like client frames often enough to get past the first header checks: frames
/// with random flags, opcode, mask bit and payload, then some bytes flipped; or plain noise.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let frame = (
        any::<u8>(),
        vec(any::<u8>(), 0..200),
        any::<[u8; 4]>(),
        any::<bool>(),
    )
        .prop_map(|(first, payload, mask, masked)| {
            let mut f = encode_client_frame(first & 0x80 != 0, first & 0x0F, &payload, mask);
            f[0] |= first & 0x70 & if first.is_multiple_of(5) { 0xFF } else { 0 };
            if !masked {
                f[1] &= 0x7F;
            }
            f
        });
    prop_oneof![
        1 => vec(any::<u8>(), 0..2048),
        3 => (vec(frame, 0..8), vec((any::<Index>(), any::<u8>()), 0..4)).prop_map(|(frames, flips)| {
            let mut bytes = frames.concat();
            if !bytes.is_empty() {
                for (i, x) in flips {
                    let at = i.index(bytes.len());
                    bytes[at] ^= x;
                }
            }
            bytes
        }),
    ]
}

proptest! {
    /// (a) Valid streams decode to the messages they carry, however they are cut into reads.
    #[test]
    fn valid_streams_decode_the_same_however_they_are_split(
        steps in vec(step(), 0..8),
        close in close(),
        seed in any::<u32>(),
        slack in prop_oneof![Just(0usize), 0usize..100],
        cuts in vec(any::<Index>(), 0..24),
    ) {
        let (bytes, expected) = build(&steps, &close, seed);
        // As tight as the stream allows: messages of exactly the limit must pass.
        let limit = expected.iter().map(message_len).max().unwrap_or(0) + slack;
        let whole = decode(&bytes, &[], limit);
        prop_assert_eq!(&whole.messages, &expected);
        prop_assert_eq!(&whole.error, &None);
        prop_assert!(whole.idle, "decoder holds bytes after a complete stream");

        let cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        let split = decode(&bytes, &cuts, limit);
        prop_assert_eq!(&split.messages, &expected);
        prop_assert_eq!(&split.error, &None);
        prop_assert!(split.idle, "decoder holds bytes after a complete stream");
        prop_assert!(
            split.max_held <= held_bound(limit, longest_read(bytes.len(), &cuts)),
            "held {} with limit {} and reads of at most {}",
            split.max_held, limit, longest_read(bytes.len(), &cuts)
        );

        // One byte per read: the hardest split of all.
        let bytewise: Vec<usize> = (1..bytes.len()).collect();
        let slow = decode(&bytes, &bytewise, limit);
        prop_assert_eq!(&slow.messages, &expected);
        prop_assert!(slow.idle);
    }

    /// (b) A stream that breaks one rule is refused with the close code RFC 6455 gives for that
    /// rule, after delivering every message before it, however it is cut into reads.
    #[test]
    fn each_violation_gets_its_close_code(
        steps in vec(step(), 0..4),
        bad in violation(),
        detail in any::<u8>(),
        // Room for the few bytes the violating frames carry, so none is simply too big.
        limit in 16usize..600,
        seed in any::<u32>(),
        cuts in vec(any::<Index>(), 0..16),
    ) {
        let (mut bytes, expected) = build(&steps, &None, seed);
        let limit = limit.max(expected.iter().map(message_len).max().unwrap_or(0));
        bytes.extend(bad.frames(limit, detail, &mut Masks(seed ^ 0x9E37_79B9 | 1)));
        let cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        for out in [decode(&bytes, &[], limit), decode(&bytes, &cuts, limit)] {
            let code = out.error.as_ref().map(ProtocolError::close_code);
            prop_assert_eq!(code, Some(bad.code()), "{:?} gave {:?}", bad, out.error);
            prop_assert_eq!(&out.messages, &expected);
        }
    }

    /// (b) Arbitrary bytes never panic the decoder, never make it hold more than its limit
    /// allows, end in a close code RFC 6455 defines for decoding errors, and give the same
    /// result however they are cut into reads.
    #[test]
    fn hostile_bytes_are_bounded_and_refused_with_a_proper_code(
        bytes in hostile_bytes(),
        limit in 0usize..600,
        cuts in vec(any::<Index>(), 0..32),
    ) {
        let cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        let whole = decode(&bytes, &[], limit);
        let split = decode(&bytes, &cuts, limit);
        for out in [&whole, &split] {
            if let Some(e) = &out.error {
                let code = e.close_code();
                let expected = match e {
                    ProtocolError::TooBig { .. } => 1009,
                    ProtocolError::InvalidUtf8 => 1007,
                    _ => 1002,
                };
                prop_assert_eq!(code, expected, "{:?}", e);
            }
            for m in &out.messages {
                prop_assert!(message_len(m) <= limit, "delivered a message over the limit");
            }
        }
        prop_assert!(whole.max_held <= held_bound(limit, bytes.len()));
        prop_assert!(split.max_held <= held_bound(limit, longest_read(bytes.len(), &cuts)),
            "held {} with limit {} and reads of at most {}",
            split.max_held, limit, longest_read(bytes.len(), &cuts));
        prop_assert_eq!(&whole.messages, &split.messages);
        prop_assert_eq!(&whole.error, &split.error);
    }

    /// (c) The upgrade parser never panics, never reports a head longer than the input or the
    /// limit, and never waits for more once the limit is reached.
    #[test]
    fn request_parser_survives_arbitrary_bytes(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..600),
            (vec(any::<Index>(), 0..6), vec(any::<u8>(), 0..6)).prop_map(|(at, with)| {
                let mut b = UPGRADE.to_vec();
                for (i, x) in at.iter().zip(with) {
                    let i = i.index(b.len());
                    b[i] = x;
                }
                b
            }),
        ],
        max in 1usize..700,
    ) {
        match parse_request(&bytes, max) {
            Ok(Some((_, len))) => prop_assert!(len <= bytes.len() && len <= max),
            Ok(None) => prop_assert!(bytes.len() < max, "waits for more past the limit"),
            Err(HandshakeError::TooLarge(n)) => prop_assert_eq!(n, max),
            Err(HandshakeError::Malformed(_)) => {}
        }
    }

    /// (c) A valid upgrade request is parsed when its head fits the limit and refused with
    /// TooLarge (431) when it does not, whether it arrives whole or cut short.
    #[test]
    fn request_heads_over_the_limit_are_refused(
        pad in 0usize..3000,
        max in 64usize..3000,
        extra in vec(any::<u8>(), 0..32),
        cut in any::<Index>(),
    ) {
        let head = format!(
            "GET /v1/realtime?project=p HTTP/1.1\r\nHost: h\r\nX-Pad: {}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: \
             dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            "p".repeat(pad)
        );
        let mut bytes = head.clone().into_bytes();
        bytes.extend_from_slice(&extra);
        let result = parse_request(&bytes, max);
        if head.len() <= max {
            let (req, len) = result.unwrap().unwrap();
            prop_assert_eq!(len, head.len());
            prop_assert_eq!(req.path.as_str(), "/v1/realtime");
            prop_assert_eq!(req.websocket_key(), Ok("dGhlIHNhbXBsZSBub25jZQ=="));
        } else {
            prop_assert_eq!(result, Err(HandshakeError::TooLarge(max)));
        }
        // A head still arriving: keep waiting below the limit, refuse at it.
        let short = cut.index(head.len());
        let partial = parse_request(&bytes[..short], max);
        if short < max {
            prop_assert_eq!(partial, Ok(None));
        } else {
            prop_assert_eq!(partial, Err(HandshakeError::TooLarge(max)));
        }
    }
}

const UPGRADE: &[u8] = b"GET /v1/realtime?project=p&channels[]=files HTTP/1.1\r\nHost: x\r\n\
Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

fn message_len(m: &OwnedMessage) -> usize {
    match m {
        OwnedMessage::Text(s) => s.len(),
        OwnedMessage::Binary(b) | OwnedMessage::Ping(b) | OwnedMessage::Pong(b) => b.len(),
        OwnedMessage::Close(code, reason) => reason.len() + if code.is_some() { 2 } else { 0 },
    }
}
