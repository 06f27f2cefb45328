//! A shard's fan-out batch: the events taken from its queue in one drain, and for every
//! subscriber the frames it is owed, staged without copying bodies or touching reference counts.
//!
//! Owns the staging (per connection, in publish order, with no sort) and the vectored write of one
//! connection's frames. Consecutive events that a connection receives with the same
//! `subscriptions` tail share one staged entry (a run), so a burst on one channel costs one entry
//! per subscriber, not one per frame. At write time the small per-connection pieces (a frame's
//! tail and the next frame's header) are packed together, so `k` frames take `2k + 1` iovecs and
//! every event body is the shared encoded prefix, referenced in place. Frames a socket does not
//! take are handed back as [`OutFrame`]s for the connection's outbox. For a driver whose sends
//! outlive the batch (io_uring), [`Staged`] packs a connection's frames the same way and holds
//! the batch's events through one shared reference per send.
//!
//! Must not decide who receives what: [`Batch::offer`] asks the connection (`conn.rs`) and
//! stages what it answers. Must not touch sockets other than the writer it is handed, nor the
//! event loop.

use std::io::{self, IoSlice, Write};
use std::sync::Arc;

use smallvec::SmallVec;

use crate::event::EncodedEvent;
use crate::outbox::OutFrame;
use crate::ws::frame::{Opcode, ServerHeader};

const NONE: u32 = u32::MAX;
/// Frames per `writev`: two iovecs each plus one, under Linux's limit of 1024.
const FRAMES_PER_WRITE: usize = 500;
/// Staging memory kept between batches; a spike above it is given back once batches are small.
const KEEP_ENTRIES: usize = 16 * 1024;
const KEEP_TAIL_BYTES: usize = 256 * 1024;

/// Frames for one connection: batch events `first..=last`, all with the same tail.
#[derive(Debug, Clone, Copy)]
struct Run {
    first: u32,
    last: u32,
    tail_start: u32,
    tail_len: u32,
    /// The connection's next run, or `NONE`.
    next: u32,
}

#[derive(Debug, Clone, Copy)]
struct List {
    first: u32,
    last: u32,
}

const EMPTY: List = List {
    first: NONE,
    last: NONE,
};

/// What a connection does with a live event offered to it (`Connection::offer` in `conn.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it; its `subscriptions` tail has been appended to the caller's buffer.
    Deliver,
    /// Send it with the same tail as the previous event (only when the offer said it continues).
    Extend,
    /// Held by the connection until its replay finishes.
    Hold,
    /// Not sent: the client already has it (or lost it to an overflow it will be told about).
    Skip,
    /// Not for this connection, nor any other event with the same project, channels and roles.
    NotSubscribed,
}

/// The outcome of writing one connection's frames.
#[derive(Debug)]
pub enum Written {
    /// Every frame went to the socket.
    All,
    /// The socket stopped taking bytes: `rest` is what is left, the first frame from `offset`.
    Blocked { rest: Vec<OutFrame>, offset: usize },
}

/// One frame to write: a batch event and its tail in `tails` (in a [`Staged`] send: its
/// event in the send's bodies, its tail in `glue`).
#[derive(Debug, Clone, Copy)]
struct Frame {
    event: u32,
    tail_start: u32,
    tail_len: u32,
}

/// A batch's events, held by the sends of its fan-out that outlive it (io_uring): one
/// reference per send instead of one per frame.
#[derive(Debug, Clone)]
pub struct Bodies {
    events: Arc<[Arc<EncodedEvent>]>,
    /// The events' encoded bytes.
    bytes: usize,
}

/// A send shares its batch's events only while they are at most this many bytes, or four
/// times its own frames' bodies: otherwise it holds just its own events, so that a client
/// that stops reading keeps little of other channels' events alive until its send completes.
const SHARE_BYTES: usize = 64 * 1024;

/// One connection's frames of a batch, packed for a send that the kernel performs after the
/// batch is gone. The bodies are the batch's (shared through [`Bodies`], never copied); the
/// small pieces, each frame's header and tail, sit in `glue` in wire order, so that `k` frames
/// are `2k + 1` pieces, as in [`Batch::write`].
#[derive(Debug, Default)]
pub struct Staged {
    bodies: Option<Arc<[Arc<EncodedEvent>]>>,
    /// Per frame: its event in `bodies`, and where its tail starts in `glue` (its header ends
    /// there).
    frames: Vec<Frame>,
    glue: Vec<u8>,
}

impl Staged {
    /// The frames' bytes in wire order, as pieces that stay put while `self` is not changed.
    pub fn parts(&self, mut each: impl FnMut(&[u8])) {
        let Some(bodies) = self.bodies.as_deref() else {
            return;
        };
        let mut from = 0;
        for f in &self.frames {
            let head_end = f.tail_start as usize;
            each(&self.glue[from..head_end]);
            each(&bodies[f.event as usize].prefix);
            from = head_end;
        }
        each(&self.glue[from..]);
    }

    /// Memory this holds of its own (bodies are the batch's, counted once there).
    pub fn own_bytes(&self) -> usize {
        self.glue.capacity() + self.frames.capacity() * std::mem::size_of::<Frame>()
    }

    /// What was not sent of the first `sent` bytes, as frames for the connection's outbox:
    /// the frames from the first one not wholly sent, and how much of it was. Empties `self`.
    pub fn unsent(&mut self, sent: usize) -> (Vec<OutFrame>, usize) {
        let Some(bodies) = self.bodies.take() else {
            return (Vec::new(), 0);
        };
        let mut left = sent;
        let mut rest = Vec::new();
        for f in &self.frames {
            let body = &bodies[f.event as usize].prefix;
            let tail = &self.glue[f.tail_start as usize..(f.tail_start + f.tail_len) as usize];
            let len = ServerHeader::new(Opcode::Text, body.len() + tail.len())
                .as_bytes()
                .len()
                + body.len()
                + tail.len();
            if rest.is_empty() && left >= len {
                left -= len;
                continue;
            }
            rest.push(OutFrame::event(body.clone(), SmallVec::from_slice(tail)));
        }
        let offset = if rest.is_empty() { 0 } else { left };
        self.clear();
        (rest, offset)
    }

    /// Lets go of the batch's events; keeps the capacity for the next send.
    pub fn clear(&mut self) {
        self.bodies = None;
        self.frames.clear();
        self.glue.clear();
    }
}

#[derive(Debug, Default)]
pub struct Batch {
    events: Vec<Arc<EncodedEvent>>,
    runs: Vec<Run>,
    /// Per slab key: that connection's runs. Grown on demand; `EMPTY` when untouched.
    lists: Vec<List>,
    /// Keys with at least one run, in first-staged order.
    touched: Vec<u32>,
    /// Every run's tail (`["id",...]}}`), back to back.
    tails: Vec<u8>,
    /// Write scratch: the frames of the connection being written and its packed small pieces.
    frames: Vec<Frame>,
    glue: Vec<u8>,
    cuts: Vec<u32>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Adds an event; returns its index in the batch.
    pub fn push_event(&mut self, event: Arc<EncodedEvent>) -> u32 {
        self.events.push(event);
        (self.events.len() - 1) as u32
    }

    pub fn event(&self, index: u32) -> &Arc<EncodedEvent> {
        &self.events[index as usize]
    }

    /// The end of the group of events from `start` that share its route (project, channels,
    /// roles): they reach the same connections with the same tails.
    pub fn route_end(&self, start: u32) -> u32 {
        let first = &self.events[start as usize];
        let same = self.events[start as usize + 1..]
            .iter()
            .take_while(|e| first.same_route(e))
            .count();
        start + 1 + same as u32
    }

    /// Frames staged so far (each event of a run counts).
    #[cfg(test)]
    fn frame_count(&self) -> usize {
        self.runs
            .iter()
            .map(|r| (r.last - r.first + 1) as usize)
            .sum()
    }

    /// Whether `key`'s frame for event `index` can reuse the tail of its frame for the event just
    /// before: true when it got that event. The caller knows whether both have the same route.
    pub fn extends(&self, key: u32, index: u32) -> bool {
        let Some(list) = self.lists.get(key as usize) else {
            return false;
        };
        list.last != NONE && index > 0 && self.runs[list.last as usize].last == index - 1
    }

    /// Stages event `index` for `key` with the tail of its previous frame (see [`Self::extends`]).
    pub fn extend(&mut self, key: u32, index: u32) {
        let last = self.lists[key as usize].last as usize;
        self.runs[last].last = index;
    }

    /// Offers event `index` to connection `key` through `decide` and stages what it answers.
    /// `decide` gets the event, whether the connection got the previous event of the route group
    /// that starts at `group_start` (see [`Self::extends`]), and the buffer for a new tail.
    pub fn offer(
        &mut self,
        key: u32,
        index: u32,
        group_start: u32,
        decide: impl FnOnce(&Arc<EncodedEvent>, bool, &mut Vec<u8>) -> Verdict,
    ) -> Verdict {
        let continues = index > group_start && self.extends(key, index);
        let tail_start = self.tails.len();
        let verdict = decide(&self.events[index as usize], continues, &mut self.tails);
        match verdict {
            Verdict::Deliver => self.push_run(key, index, tail_start),
            Verdict::Extend if continues => self.extend(key, index),
            _ => self.tails.truncate(tail_start),
        }
        verdict
    }

    /// Stages event `index` for `key` with a new tail, written by `tail`.
    pub fn stage(&mut self, key: u32, index: u32, tail: impl FnOnce(&mut Vec<u8>, &EncodedEvent)) {
        let tail_start = self.tails.len();
        tail(&mut self.tails, &self.events[index as usize]);
        self.push_run(key, index, tail_start);
    }

    /// Stages event `index` for `key` with the tail at `tails[tail_start..]`.
    fn push_run(&mut self, key: u32, index: u32, tail_start: usize) {
        let run = self.runs.len() as u32;
        self.runs.push(Run {
            first: index,
            last: index,
            tail_start: tail_start as u32,
            tail_len: (self.tails.len() - tail_start) as u32,
            next: NONE,
        });
        let k = key as usize;
        if k >= self.lists.len() {
            self.lists.resize(k + 1, EMPTY);
        }
        let list = &mut self.lists[k];
        if list.last == NONE {
            list.first = run;
            self.touched.push(key);
        } else {
            self.runs[list.last as usize].next = run;
        }
        list.last = run;
    }

    /// Keys with frames staged, in first-staged order. Take it, and hand it back with
    /// [`Self::clear`].
    pub fn take_touched(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.touched)
    }

    /// The batch's events, for the sends of this fan-out that outlive it ([`Self::stage_send`]).
    pub fn bodies(&self) -> Bodies {
        Bodies {
            events: Arc::from(&self.events[..]),
            bytes: self.events.iter().map(|e| e.prefix.len()).sum(),
        }
    }

    /// Packs `key`'s frames into `into` (emptied first) for a send that outlives the batch;
    /// `bodies` is this batch's, from [`Self::bodies`].
    pub fn stage_send(&self, key: u32, bodies: &Bodies, into: &mut Staged) {
        into.clear();
        let Some(list) = self.lists.get(key as usize) else {
            return;
        };
        let mut own = 0;
        let mut r = list.first;
        while r != NONE {
            let run = self.runs[r as usize];
            let tail =
                &self.tails[run.tail_start as usize..(run.tail_start + run.tail_len) as usize];
            for event in run.first..=run.last {
                let body = self.events[event as usize].prefix.len();
                own += body;
                let head = ServerHeader::new(Opcode::Text, body + tail.len());
                into.glue.extend_from_slice(head.as_bytes());
                into.frames.push(Frame {
                    event,
                    tail_start: into.glue.len() as u32,
                    tail_len: run.tail_len,
                });
                into.glue.extend_from_slice(tail);
            }
            r = run.next;
        }
        if bodies.bytes <= SHARE_BYTES.max(own.saturating_mul(4)) {
            into.bodies = Some(Arc::clone(&bodies.events));
            return;
        }
        let mine = into
            .frames
            .iter()
            .map(|f| Arc::clone(&self.events[f.event as usize]))
            .collect();
        for (i, f) in into.frames.iter_mut().enumerate() {
            f.event = i as u32;
        }
        into.bodies = Some(mine);
    }

    /// `key`'s frames as owned frames, for a connection whose outbox already holds data.
    pub fn frames_of(&self, key: u32, out: &mut Vec<OutFrame>) {
        let Some(list) = self.lists.get(key as usize) else {
            return;
        };
        let mut r = list.first;
        while r != NONE {
            let run = self.runs[r as usize];
            for e in run.first..=run.last {
                out.push(self.owned(Frame {
                    event: e,
                    tail_start: run.tail_start,
                    tail_len: run.tail_len,
                }));
            }
            r = run.next;
        }
    }

    fn owned(&self, f: Frame) -> OutFrame {
        let tail = &self.tails[f.tail_start as usize..(f.tail_start + f.tail_len) as usize];
        OutFrame::event(
            self.events[f.event as usize].prefix.clone(),
            SmallVec::from_slice(tail),
        )
    }

    /// Writes `key`'s frames to `w` (whose outbound queue must be empty) with as few `writev`
    /// calls as the socket allows.
    pub fn write<W: Write>(&mut self, key: u32, w: &mut W) -> io::Result<Written> {
        self.frames.clear();
        if let Some(list) = self.lists.get(key as usize) {
            let mut r = list.first;
            while r != NONE {
                let run = self.runs[r as usize];
                self.frames
                    .extend((run.first..=run.last).map(|event| Frame {
                        event,
                        tail_start: run.tail_start,
                        tail_len: run.tail_len,
                    }));
                r = run.next;
            }
        }
        let mut done = 0;
        while done < self.frames.len() {
            let end = (done + FRAMES_PER_WRITE).min(self.frames.len());
            let (written, total) = self.write_chunk(done, end, w)?;
            if written == total {
                done = end;
                continue;
            }
            // A short write means the send buffer is full: the rest waits for writability.
            let mut left = written;
            let mut i = done;
            loop {
                let len = self.frame_len(self.frames[i]);
                if left < len {
                    break;
                }
                left -= len;
                i += 1;
            }
            let rest = self.frames[i..].iter().map(|&f| self.owned(f)).collect();
            return Ok(Written::Blocked { rest, offset: left });
        }
        Ok(Written::All)
    }

    fn frame_len(&self, f: Frame) -> usize {
        let payload = self.events[f.event as usize].prefix.len() + f.tail_len as usize;
        ServerHeader::new(Opcode::Text, payload).as_bytes().len() + payload
    }

    /// One `writev` of frames `start..end`; returns bytes written (0 if it would block) and the
    /// bytes offered.
    fn write_chunk<W: Write>(
        &mut self,
        start: usize,
        end: usize,
        w: &mut W,
    ) -> io::Result<(usize, usize)> {
        // glue = head0 | tail0 head1 | tail1 head2 | ... | tail(n-1); cuts mark the pieces.
        self.glue.clear();
        self.cuts.clear();
        self.cuts.push(0);
        let mut bodies = 0;
        for (i, f) in self.frames[start..end].iter().enumerate() {
            if i > 0 {
                let prev = self.frames[start + i - 1];
                self.glue.extend_from_slice(
                    &self.tails
                        [prev.tail_start as usize..(prev.tail_start + prev.tail_len) as usize],
                );
            }
            let body = &self.events[f.event as usize].prefix;
            bodies += body.len();
            let head = ServerHeader::new(Opcode::Text, body.len() + f.tail_len as usize);
            self.glue.extend_from_slice(head.as_bytes());
            self.cuts.push(self.glue.len() as u32);
        }
        let last = self.frames[end - 1];
        self.glue.extend_from_slice(
            &self.tails[last.tail_start as usize..(last.tail_start + last.tail_len) as usize],
        );
        self.cuts.push(self.glue.len() as u32);
        let total = self.glue.len() + bodies;

        let mut slices: SmallVec<[IoSlice<'_>; 64]> = SmallVec::new();
        for (i, f) in self.frames[start..end].iter().enumerate() {
            slices.push(IoSlice::new(
                &self.glue[self.cuts[i] as usize..self.cuts[i + 1] as usize],
            ));
            slices.push(IoSlice::new(&self.events[f.event as usize].prefix));
        }
        let n = end - start;
        slices.push(IoSlice::new(
            &self.glue[self.cuts[n] as usize..self.cuts[n + 1] as usize],
        ));
        loop {
            match w.write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => return Ok((written, total)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((0, total)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Lets go of all staging memory (between bursts, once the shard is quiet); does nothing
    /// to a batch that holds events.
    pub fn release(&mut self) {
        if self.events.is_empty() && self.touched.is_empty() {
            *self = Self::default();
        }
    }

    /// Empties the batch for the next drain, keeping (bounded) capacity. `touched` is the vector
    /// from [`Self::take_touched`].
    pub fn clear(&mut self, mut touched: Vec<u32>) {
        for &k in &touched {
            if let Some(l) = self.lists.get_mut(k as usize) {
                *l = EMPTY;
            }
        }
        touched.clear();
        self.touched = touched;
        let (runs, tails) = (self.runs.len(), self.tails.len());
        self.events.clear();
        self.runs.clear();
        self.tails.clear();
        // A burst's staging is released once batches are small again, so a spike does not
        // stay resident.
        if self.runs.capacity() > KEEP_ENTRIES && runs <= KEEP_ENTRIES / 4 {
            self.runs.shrink_to(KEEP_ENTRIES);
        }
        if self.tails.capacity() > KEEP_TAIL_BYTES && tails <= KEEP_TAIL_BYTES / 4 {
            self.tails.shrink_to(KEEP_TAIL_BYTES);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, write_tail};
    use crate::outbox::testing::Throttled;

    fn event(id: &str, payload: &str) -> Arc<EncodedEvent> {
        EncodedEvent::encode(&Event {
            id: id.into(),
            project: "p".into(),
            channels: vec!["c".into()],
            events: vec!["e".into()],
            roles: vec![],
            timestamp: "t".into(),
            payload: serde_json::json!({ "x": payload }),
        })
    }

    fn expected(frames: &[OutFrame]) -> Vec<u8> {
        let mut w = Throttled::new(usize::MAX);
        let mut ob = crate::outbox::Outbox::default();
        let mut frames = frames.to_vec();
        ob.send(&mut w, &mut frames, usize::MAX).unwrap().unwrap();
        w.out
    }

    fn tail(id: &str) -> impl FnOnce(&mut Vec<u8>, &EncodedEvent) + '_ {
        move |buf, _| write_tail(buf, std::iter::once(id))
    }

    /// A batch of `events` for connection `key`, all in one run.
    fn one_run(key: u32, events: impl IntoIterator<Item = Arc<EncodedEvent>>) -> Batch {
        let mut b = Batch::default();
        for ev in events {
            let e = b.push_event(ev);
            if e == 0 {
                b.stage(key, e, tail("abc"));
            } else {
                b.extend(key, e);
            }
        }
        b
    }

    #[test]
    fn runs_keep_publish_order_per_connection() {
        let mut b = Batch::default();
        let e0 = b.push_event(event("0", "a"));
        let e1 = b.push_event(event("1", &"b".repeat(200)));
        let e2 = b.push_event(event("2", "c"));
        // Connection 7 gets 0, 1, 2 (one run); connection 3 gets 0 and 2 with different tails.
        b.stage(7, e0, tail("s7"));
        b.stage(3, e0, tail("s3"));
        assert!(b.extends(7, e1));
        // Connection 3 got event 0, so it could extend, but event 1 is not for it.
        assert!(b.extends(3, e1));
        b.extend(7, e1);
        assert!(b.extends(7, e2));
        b.extend(7, e2);
        assert!(!b.extends(3, e2));
        b.stage(3, e2, tail("t3"));
        assert_eq!(b.frame_count(), 5);
        assert_eq!(
            b.route_end(0),
            3,
            "one project, channel and role set: one group"
        );
        let touched = b.take_touched();
        assert_eq!(touched, vec![7, 3]);

        for (key, want) in [
            (7u32, vec![(0, "s7"), (1, "s7"), (2, "s7")]),
            (3, vec![(0, "s3"), (2, "t3")]),
        ] {
            let frames: Vec<OutFrame> = want
                .iter()
                .map(|&(e, id)| {
                    let mut t = SmallVec::new();
                    write_tail(&mut t, std::iter::once(id));
                    OutFrame::new(Opcode::Text, b.event(e).prefix.clone(), t)
                })
                .collect();
            let mut w = Throttled::new(usize::MAX);
            assert!(matches!(b.write(key, &mut w).unwrap(), Written::All));
            assert_eq!(w.calls, 1, "one writev per connection");
            assert_eq!(w.out, expected(&frames));
            let mut owned = Vec::new();
            b.frames_of(key, &mut owned);
            assert_eq!(expected(&owned), w.out);
        }
        b.clear(touched);
        assert!(b.is_empty());
        assert!(!b.extends(7, 1));
    }

    #[test]
    fn blocked_writes_hand_back_the_exact_rest() {
        for budget in [0, 1, 3, 40, 250, 320, 1000] {
            let mut b = one_run(
                0,
                (0..4).map(|i| event(&i.to_string(), &"z".repeat(50 * i))),
            );
            let mut all = Vec::new();
            b.frames_of(0, &mut all);
            let whole = expected(&all);
            let mut w = Throttled::new(budget);
            match b.write(0, &mut w).unwrap() {
                Written::All => assert!(budget >= whole.len()),
                Written::Blocked { rest, offset } => {
                    let mut ob = crate::outbox::Outbox::default();
                    ob.queue_unsent(rest, offset);
                    w.budget = usize::MAX;
                    assert!(ob.flush(&mut w).unwrap());
                }
            }
            assert_eq!(w.out, whole, "budget {budget}");
        }
    }

    #[test]
    fn a_staged_send_is_the_same_bytes_and_hands_back_the_exact_rest() {
        for sent in [0, 1, 3, 40, 250, 320, 1000] {
            let b = one_run(
                0,
                (0..4).map(|i| event(&i.to_string(), &"z".repeat(50 * i))),
            );
            let mut all = Vec::new();
            b.frames_of(0, &mut all);
            let whole = expected(&all);
            let mut staged = Staged::default();
            b.stage_send(0, &b.bodies(), &mut staged);
            // The send outlives its batch.
            drop(b);
            let (mut wire, mut pieces) = (Vec::new(), 0);
            staged.parts(|p| {
                wire.extend_from_slice(p);
                pieces += 1;
            });
            assert_eq!(wire, whole);
            assert_eq!(
                pieces,
                2 * 4 + 1,
                "a frame's tail and the next header go together"
            );
            let sent = sent.min(whole.len());
            let (rest, offset) = staged.unsent(sent);
            let mut ob = crate::outbox::Outbox::default();
            ob.queue_unsent(rest, offset);
            let mut w = Throttled::new(usize::MAX);
            assert!(ob.flush(&mut w).unwrap());
            assert_eq!([&whole[..sent], &w.out[..]].concat(), whole, "sent {sent}");
        }
    }

    #[test]
    fn a_send_that_uses_little_of_its_batch_holds_only_its_own_events() {
        let mut b = Batch::default();
        let small = b.push_event(event("0", "a"));
        let big = event("1", &"b".repeat(200 * 1024));
        let e1 = b.push_event(Arc::clone(&big));
        b.stage(0, small, tail("s0"));
        b.stage(1, e1, tail("s1"));
        b.stage(2, small, tail("s2"));
        b.extend(2, e1);
        let mut wires = Vec::new();
        let mut staged: Vec<Staged> = (0..3).map(|_| Staged::default()).collect();
        let bodies = b.bodies();
        for (key, s) in staged.iter_mut().enumerate() {
            let mut owned = Vec::new();
            b.frames_of(key as u32, &mut owned);
            wires.push(expected(&owned));
            b.stage_send(key as u32, &bodies, s);
        }
        drop((b, bodies));
        for (key, s) in staged.iter().enumerate() {
            let mut wire = Vec::new();
            s.parts(|p| wire.extend_from_slice(p));
            assert_eq!(wire, wires[key], "connection {key}");
        }
        // Connections 1 and 2 got the big event, and their sends hold it; connection 0 got
        // the small one only, and once the others are done its send keeps the big one no more.
        assert!(Arc::strong_count(&big) > 1);
        staged[1].clear();
        staged[2].clear();
        assert_eq!(Arc::strong_count(&big), 1);
        // Its rest, after a short send, still names its own event.
        let (rest, offset) = staged[0].unsent(3);
        let mut ob = crate::outbox::Outbox::default();
        ob.queue_unsent(rest, offset);
        let mut w = Throttled::new(usize::MAX);
        assert!(ob.flush(&mut w).unwrap());
        assert_eq!(w.out, wires[0][3..]);
    }

    #[test]
    fn long_batches_take_several_writes() {
        let mut b = one_run(
            1,
            (0..FRAMES_PER_WRITE + 20).map(|i| event(&i.to_string(), "p")),
        );
        let mut all = Vec::new();
        b.frames_of(1, &mut all);
        let mut w = Throttled::new(usize::MAX);
        assert!(matches!(b.write(1, &mut w).unwrap(), Written::All));
        assert_eq!(w.calls, 2);
        assert_eq!(w.out, expected(&all));
    }
}
