//! Outbound frames and the bounded per-connection queue, written with vectored I/O.
//!
//! Owns the shape of a frame on its way out (a small header, a shared body, a small
//! per-connection tail) and the queue that exists only while a socket would block. It must not
//! decide what to send or when to close; it reports when the bound is exceeded and the caller
//! treats the peer as a slow consumer.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use bytes::Bytes;
use smallvec::SmallVec;

use crate::ws::frame::{Opcode, ServerHeader};

/// Frames per `writev`. Each frame is up to three slices; Linux allows 1024 per call.
const MAX_FRAMES_PER_WRITE: usize = 64;

/// One server frame: header, shared body (the same bytes for every subscriber), and a small
/// per-connection tail (an event's `subscriptions` list).
#[derive(Debug, Clone)]
pub struct OutFrame {
    head: ServerHeader,
    body: Bytes,
    tail: SmallVec<[u8; 32]>,
}

impl OutFrame {
    pub fn new(opcode: Opcode, body: Bytes, tail: SmallVec<[u8; 32]>) -> Self {
        Self {
            head: ServerHeader::new(opcode, body.len() + tail.len()),
            body,
            tail,
        }
    }

    /// Bytes sent as they are, outside any WebSocket frame (the HTTP upgrade response).
    pub fn raw(bytes: Bytes) -> Self {
        Self {
            head: ServerHeader::none(),
            body: bytes,
            tail: SmallVec::new(),
        }
    }

    pub fn text(s: String) -> Self {
        Self::new(Opcode::Text, Bytes::from(s), SmallVec::new())
    }

    pub fn len(&self) -> usize {
        self.head.as_bytes().len() + self.body.len() + self.tail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pushes this frame's slices, skipping the first `skip` bytes.
    fn slices<'a>(&'a self, mut skip: usize, out: &mut SmallVec<[IoSlice<'a>; 48]>) {
        for part in [self.head.as_bytes(), &self.body[..], &self.tail[..]] {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            out.push(IoSlice::new(&part[skip..]));
            skip = 0;
        }
    }
}

/// The bound was exceeded: the peer is not reading fast enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

/// A connection's pending output. Empty (no allocation) unless the socket would block.
#[derive(Debug, Default)]
pub struct Outbox {
    queue: Option<Box<Queue>>,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<OutFrame>,
    /// Bytes of the front frame already written.
    offset: usize,
    /// Unwritten bytes in `frames`.
    bytes: usize,
}

impl Outbox {
    pub fn is_empty(&self) -> bool {
        self.queue.is_none()
    }

    pub fn queued_bytes(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| q.bytes)
    }

    /// Queues `frames` and writes as much as the socket takes. Returns `Ok(true)` when
    /// everything was written, `Ok(false)` when some stays queued (wait for writability).
    pub fn send<W: Write>(
        &mut self,
        w: &mut W,
        frames: impl IntoIterator<Item = OutFrame>,
        limit: usize,
    ) -> io::Result<Result<bool, Overflow>> {
        let q = self.queue.get_or_insert_with(Box::default);
        for f in frames {
            q.bytes += f.len();
            q.frames.push_back(f);
        }
        let drained = self.flush(w)?;
        if !drained && self.queued_bytes() > limit {
            return Ok(Err(Overflow));
        }
        Ok(Ok(drained))
    }

    /// Writes queued frames until done or the socket would block. `Ok(true)` means empty.
    pub fn flush<W: Write>(&mut self, w: &mut W) -> io::Result<bool> {
        let Some(q) = self.queue.as_mut() else {
            return Ok(true);
        };
        while !q.frames.is_empty() {
            let mut slices: SmallVec<[IoSlice<'_>; 48]> = SmallVec::new();
            for (i, f) in q.frames.iter().take(MAX_FRAMES_PER_WRITE).enumerate() {
                f.slices(if i == 0 { q.offset } else { 0 }, &mut slices);
            }
            let written = match w.write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            drop(slices);
            q.bytes -= written;
            let mut left = written;
            while left > 0 {
                let Some(front) = q.frames.front() else { break };
                let remaining = front.len() - q.offset;
                if left >= remaining {
                    left -= remaining;
                    q.offset = 0;
                    q.frames.pop_front();
                } else {
                    q.offset += left;
                    left = 0;
                }
            }
        }
        self.queue = None;
        Ok(true)
    }

    /// Keeps only a frame that is partly on the wire (cutting it would corrupt the stream) and
    /// drops everything else, so a close frame can follow as soon as possible.
    pub fn discard_unstarted(&mut self) {
        if let Some(q) = self.queue.as_mut() {
            let keep = usize::from(q.offset > 0);
            q.frames.truncate(keep);
            q.bytes = q.frames.front().map_or(0, |f| f.len() - q.offset);
            if q.frames.is_empty() {
                self.queue = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that accepts `budget` bytes, then would block.
    struct Throttled {
        out: Vec<u8>,
        budget: usize,
    }

    impl Write for Throttled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.budget);
            self.out.extend_from_slice(&buf[..n]);
            self.budget -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn frame(body: &'static [u8], tail: &[u8]) -> OutFrame {
        OutFrame::new(
            Opcode::Text,
            Bytes::from_static(body),
            SmallVec::from_slice(tail),
        )
    }

    #[test]
    fn partial_writes_resume_exactly() {
        let frames = vec![
            frame(b"hello", b"[1]"),
            frame(b"world", b""),
            frame(b"!", b"xy"),
        ];
        let expected: Vec<u8> = frames
            .iter()
            .flat_map(|f| {
                let mut v = f.head.as_bytes().to_vec();
                v.extend_from_slice(&f.body);
                v.extend_from_slice(&f.tail);
                v
            })
            .collect();
        let mut w = Throttled {
            out: Vec::new(),
            budget: 4,
        };
        let mut ob = Outbox::default();
        assert_eq!(ob.send(&mut w, frames, 1 << 20).unwrap(), Ok(false));
        while !ob.is_empty() {
            w.budget = 3;
            ob.flush(&mut w).unwrap();
        }
        assert_eq!(w.out, expected);
    }

    #[test]
    fn overflow_and_discard_keep_the_stream_valid() {
        let mut w = Throttled {
            out: Vec::new(),
            budget: 3,
        };
        let mut ob = Outbox::default();
        let r = ob
            .send(
                &mut w,
                vec![frame(b"0123456789", b""), frame(b"abcdefghij", b"")],
                10,
            )
            .unwrap();
        assert_eq!(r, Err(Overflow));
        ob.discard_unstarted();
        assert_eq!(ob.queued_bytes(), 12 - 3);
        w.budget = 100;
        assert!(ob.flush(&mut w).unwrap());
        assert_eq!(&w.out[2..], b"0123456789");
    }
}
