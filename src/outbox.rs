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
    /// `body` is an event's, shared by every subscriber's frame: memory counted once, not here.
    shared: bool,
    body: Bytes,
    tail: SmallVec<[u8; 32]>,
}

impl OutFrame {
    pub fn new(opcode: Opcode, body: Bytes, tail: SmallVec<[u8; 32]>) -> Self {
        Self {
            head: ServerHeader::new(opcode, body.len() + tail.len()),
            shared: false,
            body,
            tail,
        }
    }

    /// An event's frame: its encoded body, shared with every other subscriber, and this
    /// connection's tail.
    pub fn event(body: Bytes, tail: SmallVec<[u8; 32]>) -> Self {
        Self {
            shared: true,
            ..Self::new(Opcode::Text, body, tail)
        }
    }

    /// Bytes of a shared body this frame holds a reference to (0 for its own bodies).
    fn shared_len(&self) -> usize {
        if self.shared { self.body.len() } else { 0 }
    }

    /// Bytes sent as they are, outside any WebSocket frame (the HTTP upgrade response).
    pub fn raw(bytes: Bytes) -> Self {
        Self {
            head: ServerHeader::none(),
            shared: false,
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

    /// Memory this frame holds that no other connection's frame shares: the frame itself
    /// and its bytes, without a shared event body (counted once, not per subscriber).
    pub fn own_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.len() - self.shared_len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame's bytes in wire order: header, body, tail (for drivers that hand the kernel
    /// vectors that must outlive the call).
    pub fn parts(&self) -> [&[u8]; 3] {
        [self.head.as_bytes(), &self.body[..], &self.tail[..]]
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

/// How far a vectored write got: whole frames written, bytes into the next one, bytes in all.
struct Progress {
    frames: usize,
    offset: usize,
    bytes: usize,
}

/// Writes `frames` (the first one from `offset`) with as few `writev` calls as the socket
/// allows, stopping when it would block.
fn write_frames<W: Write>(w: &mut W, frames: &[OutFrame], offset: usize) -> io::Result<Progress> {
    let mut p = Progress {
        frames: 0,
        offset,
        bytes: 0,
    };
    while p.frames < frames.len() {
        let mut slices: SmallVec<[IoSlice<'_>; 48]> = SmallVec::new();
        for (i, f) in frames[p.frames..]
            .iter()
            .take(MAX_FRAMES_PER_WRITE)
            .enumerate()
        {
            f.slices(if i == 0 { p.offset } else { 0 }, &mut slices);
        }
        let written = match w.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        p.bytes += written;
        let mut left = written;
        while left > 0 && p.frames < frames.len() {
            let remaining = frames[p.frames].len() - p.offset;
            if left >= remaining {
                left -= remaining;
                p.offset = 0;
                p.frames += 1;
            } else {
                p.offset += left;
                left = 0;
            }
        }
    }
    Ok(p)
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
    /// Bytes of shared bodies `frames` refer to (whole bodies, written or not).
    shared: usize,
}

impl Outbox {
    pub fn is_empty(&self) -> bool {
        self.queue.is_none()
    }

    /// Unwritten wire bytes.
    pub fn queued_bytes(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| q.bytes)
    }

    /// What the queue costs: its wire bytes plus the frame structs holding them (an empty ping
    /// is 2 bytes on the wire but a whole `OutFrame` here), so the outbound bound limits memory.
    pub fn held_bytes(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| {
            std::mem::size_of::<Queue>()
                + q.bytes
                + q.frames.len() * std::mem::size_of::<OutFrame>()
        })
    }

    /// What the queue holds that no other connection shares: [`Self::held_bytes`] without the
    /// bodies of events, which exist once for all their subscribers. For a shard's total.
    pub fn own_bytes(&self) -> usize {
        self.queue
            .as_ref()
            .map_or(0, |q| self.held_bytes().saturating_sub(q.shared))
    }

    /// Writes `frames` (emptying the vector) after anything already queued, as far as the socket
    /// takes them; the rest is queued. Returns `Ok(true)` when nothing is left queued and
    /// `Ok(false)` when the caller must wait for writability.
    pub fn send<W: Write>(
        &mut self,
        w: &mut W,
        frames: &mut Vec<OutFrame>,
        limit: usize,
    ) -> io::Result<Result<bool, Overflow>> {
        let drained = match self.queue.as_mut() {
            // Nothing queued: write straight from the caller's frames, allocating nothing
            // unless the socket would block.
            None => {
                let progress = write_frames(w, frames, 0)?;
                if progress.frames == frames.len() {
                    frames.clear();
                    return Ok(Ok(true));
                }
                let mut q = Box::<Queue>::default();
                q.offset = progress.offset;
                q.frames.extend(frames.drain(progress.frames..));
                frames.clear();
                q.bytes = q.frames.iter().map(OutFrame::len).sum::<usize>() - q.offset;
                q.shared = q.frames.iter().map(OutFrame::shared_len).sum();
                self.queue = Some(q);
                false
            }
            Some(q) => {
                for f in frames.drain(..) {
                    q.bytes += f.len();
                    q.shared += f.shared_len();
                    q.frames.push_back(f);
                }
                self.flush(w)?
            }
        };
        if !drained && self.held_bytes() > limit {
            return Ok(Err(Overflow));
        }
        Ok(Ok(drained))
    }

    /// Queues frames a write did not finish: `frames[0]` is already on the wire up to
    /// `offset`. They go in front of anything queued while that write was in flight (which
    /// has not started: only one write is on the wire at a time).
    pub fn queue_unsent(&mut self, frames: Vec<OutFrame>, offset: usize) {
        if frames.is_empty() {
            return;
        }
        let q = self.queue.get_or_insert_with(Box::default);
        debug_assert!(
            q.frames.is_empty() || q.offset == 0,
            "a queued frame was started behind a write in flight"
        );
        q.offset = offset;
        q.bytes += frames.iter().map(OutFrame::len).sum::<usize>() - offset;
        q.shared += frames.iter().map(OutFrame::shared_len).sum::<usize>();
        for f in frames.into_iter().rev() {
            q.frames.push_front(f);
        }
    }

    /// Writes queued frames until done or the socket would block. `Ok(true)` means empty.
    pub fn flush<W: Write>(&mut self, w: &mut W) -> io::Result<bool> {
        let Some(q) = self.queue.as_mut() else {
            return Ok(true);
        };
        let progress = write_frames(w, q.frames.make_contiguous(), q.offset)?;
        q.shared -= q
            .frames
            .drain(..progress.frames)
            .map(|f| f.shared_len())
            .sum::<usize>();
        q.offset = progress.offset;
        q.bytes -= progress.bytes;
        if q.frames.is_empty() {
            self.queue = None;
            return Ok(true);
        }
        Ok(false)
    }

    /// Keeps only a frame that is partly on the wire (cutting it would corrupt the stream) and
    /// drops everything else, so a close frame can follow as soon as possible.
    pub fn discard_unstarted(&mut self) {
        if let Some(q) = self.queue.as_mut() {
            let keep = usize::from(q.offset > 0);
            q.frames.truncate(keep);
            q.bytes = q.frames.front().map_or(0, |f| f.len() - q.offset);
            q.shared = q.frames.front().map_or(0, OutFrame::shared_len);
            if q.frames.is_empty() {
                self.queue = None;
            }
        }
    }
}

/// A writer for tests that stands in for a socket with a send budget.
#[cfg(test)]
pub(crate) mod testing {
    use std::io::{self, IoSlice, Write};

    /// Accepts `budget` bytes, then would block; counts calls.
    pub(crate) struct Throttled {
        pub out: Vec<u8>,
        pub budget: usize,
        pub calls: usize,
    }

    impl Throttled {
        pub fn new(budget: usize) -> Self {
            Self {
                out: Vec::new(),
                budget,
                calls: 0,
            }
        }
    }

    impl Write for Throttled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.budget - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
                if n == self.budget {
                    break;
                }
            }
            self.budget -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Throttled;
    use super::*;

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
        let mut w = Throttled::new(4);
        let mut ob = Outbox::default();
        let mut frames = frames;
        assert_eq!(ob.send(&mut w, &mut frames, 1 << 20).unwrap(), Ok(false));
        assert!(frames.is_empty());
        while !ob.is_empty() {
            w.budget = 3;
            ob.flush(&mut w).unwrap();
        }
        assert_eq!(w.out, expected);
    }

    #[test]
    fn shared_event_bodies_count_for_the_connection_bound_but_not_as_its_own_memory() {
        let body = Bytes::from(vec![b'x'; 10_000]);
        let mut w = Throttled::new(100);
        let mut ob = Outbox::default();
        let mut frames = vec![
            OutFrame::event(body.clone(), SmallVec::from_slice(b"[\"a\"]}}")),
            OutFrame::event(body.clone(), SmallVec::new()),
            frame(b"own answer", b""),
        ];
        assert!(!ob.send(&mut w, &mut frames, usize::MAX).unwrap().unwrap());
        assert!(ob.held_bytes() > 20_000, "the bound sees the wire bytes");
        let own = ob.own_bytes();
        assert!(
            own < 1_000,
            "{own}: the bodies exist once for every subscriber"
        );
        assert!(
            own > 2 * std::mem::size_of::<OutFrame>(),
            "{own}: the frames themselves count"
        );
        // Once the first event is written, its body no longer counts at all.
        w.budget = 10_050;
        let _ = ob.flush(&mut w).unwrap();
        assert!(ob.own_bytes() <= own);
        ob.discard_unstarted();
        w.budget = usize::MAX;
        assert!(ob.flush(&mut w).unwrap());
        assert_eq!(ob.own_bytes(), 0);
    }

    #[test]
    fn the_bound_counts_frame_structs_not_only_wire_bytes() {
        let mut w = Throttled::new(0);
        let mut ob = Outbox::default();
        let limit = 4096;
        let mut pings = 0;
        loop {
            let mut frames = vec![OutFrame::new(Opcode::Pong, Bytes::new(), SmallVec::new())];
            pings += 1;
            if ob.send(&mut w, &mut frames, limit).unwrap().is_err() {
                break;
            }
            assert!(pings < 1000, "2-byte frames never reached the bound");
        }
        assert!(ob.held_bytes() > limit);
        assert!(pings * std::mem::size_of::<OutFrame>() <= 2 * limit + 4096);
    }

    #[test]
    fn overflow_and_discard_keep_the_stream_valid() {
        let mut w = Throttled::new(3);
        let mut ob = Outbox::default();
        let mut frames = vec![frame(b"0123456789", b""), frame(b"abcdefghij", b"")];
        let r = ob.send(&mut w, &mut frames, 10).unwrap();
        assert_eq!(r, Err(Overflow));
        ob.discard_unstarted();
        assert_eq!(ob.queued_bytes(), 12 - 3);
        w.budget = 100;
        assert!(ob.flush(&mut w).unwrap());
        assert_eq!(&w.out[2..], b"0123456789");
    }
}
