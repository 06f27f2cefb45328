//! The io_uring mechanics of a shard's second I/O driver (`--io uring`).
//!
//! Owns one shard's ring, its provided-buffer ring for receives, the sends in flight (whose
//! frames must outlive the kernel's use of them) and the sockets waiting for their requests to
//! be cancelled before they are closed. It submits and reaps; it makes no decision about
//! connections: the shard's uring loop (`shard::uring`) turns completions into calls on the
//! same `Connection` state machine the epoll driver drives. Knows no protocol.
//!
//! Choices, with the reasons measured or documented in `benches/RESULTS.md`:
//! - receive is multishot: one request per connection, so an idle connection has one armed
//!   receive and owns no buffer (the kernel picks one from the shared ring only when data
//!   arrives);
//! - the receive buffers are consumed incrementally where the kernel can (6.12): a pong
//!   takes a few bytes of a shared buffer, not a whole one, so the bursts of small receives a
//!   busy process finds at each wake-up no longer make the ring grow (and stay resident);
//! - accepts are single-shot, a few armed at once: a multishot accept takes the whole backlog
//!   in one go, thousands of descriptors past the connection limit, where these wait in the
//!   kernel's backlog as on epoll;
//! - sockets stay blocking: the kernel then parks an operation that cannot proceed and
//!   retries it when the socket is ready, instead of completing it with `EAGAIN`; the few
//!   direct writes the driver still makes pass `MSG_DONTWAIT` ([`DontWait`]);
//! - a fan-out's sends are queued as one `SENDMSG` per connection, holding the batch's events
//!   through one shared reference ([`Staged`]), and submitted 128 at a time: the
//!   kernel reads each record while it is still in the cache, and the completions of a submit
//!   made then are reaped at once, so the fan-out goes round a few records of sends done;
//! - a wait asks the kernel again, without waiting, while it may have stopped at its limit
//!   of 20 deferred receives per call (6.13).

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};
use slab::Slab;

use crate::batch::Staged;
use crate::outbox::OutFrame;

/// Submission queue entries; the completion queue has four times as many. A fan-out submits
/// its sends every [`SUBMIT_EVERY`], other requests go in when the queue is full.
const ENTRIES: u32 = 1024;
/// Receive buffers shared by a shard's connections, and their size. Only buffers that have
/// been used are resident.
const BUFFERS: u16 = 256;
/// Buffers offered to the kernel at once while receives are few. The kernel takes them in
/// turn, so this many stay resident however quiet the shard is; the offer doubles (up to
/// [`BUFFERS`]) whenever a receive finds none left, and goes back to this once it is quiet.
const OFFERED_QUIET: u16 = 16;
const BUFFER_BYTES: usize = 4096;
const BUFFER_GROUP: u16 = 0;
/// Buffer-ring registration flag (kernel 6.12): the kernel takes only the bytes a receive
/// needs from a buffer and goes on filling the same buffer with the next receives, so small
/// messages (pongs, subscribe frames) share a buffer instead of using one each.
const IOU_PBUF_RING_INC: u16 = 2;
/// Deferred work the kernel runs in one wait on its own (`IO_LOCAL_TW_DEFAULT_MAX`, 6.13).
const TASK_WORK_PER_WAIT: usize = 20;
/// Completions asked for in each further call that drains deferred work, and at most how
/// many such calls one iteration makes (so that sends and timers still get their turn).
const DRAIN_BATCH: usize = 1024;
const DRAIN_ROUNDS: usize = 8;
/// Sends queued before they are submitted (and what completed is reaped): the kernel reads
/// their headers and vectors while they are still in the cache, and a fan-out goes round
/// the same few records instead of a submission queue's worth.
const SUBMIT_EVERY: usize = 128;
/// Send records kept for reuse: one fan-out's worth for a shard of a 19,000-connection node.
const SPARE_SENDS: usize = 16 * 1024;

/// What a completion is for, in the top byte of its user data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Accept,
    Recv,
    Writable,
    Send,
    Close,
    Waker,
}

impl Op {
    fn code(self) -> u64 {
        match self {
            Op::Accept => 1,
            Op::Recv => 2,
            Op::Writable => 3,
            Op::Send => 4,
            Op::Close => 5,
            Op::Waker => 6,
        }
    }

    fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            1 => Op::Accept,
            2 => Op::Recv,
            3 => Op::Writable,
            4 => Op::Send,
            5 => Op::Close,
            6 => Op::Waker,
            _ => return None,
        })
    }
}

/// A request's user data: the operation, and for a connection's requests its slab key and
/// the low 24 bits of its serial (a later connection in the same slot is told apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub op: Op,
    pub key: u32,
    pub serial: u32,
}

const SERIAL_MASK: u32 = 0x00FF_FFFF;

impl Tag {
    pub fn new(op: Op, key: u32, serial: u32) -> Self {
        Self {
            op,
            key,
            serial: serial & SERIAL_MASK,
        }
    }

    /// Whether this tag names the connection with this serial.
    pub fn names(&self, serial: u32) -> bool {
        self.serial == serial & SERIAL_MASK
    }

    fn encode(self) -> u64 {
        self.op.code() << 56 | u64::from(self.serial) << 32 | u64::from(self.key)
    }

    fn decode(data: u64) -> Option<Self> {
        Some(Self {
            op: Op::from_code(data >> 56)?,
            serial: (data >> 32) as u32 & SERIAL_MASK,
            key: data as u32,
        })
    }
}

/// One completion, copied out of the queue so the driver can submit while handling it.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub tag: Tag,
    pub result: i32,
    /// More completions will follow for the same (multishot) request.
    pub more: bool,
    /// The receive buffer the data is in.
    pub buffer: Option<RecvBuffer>,
}

/// Where a receive's bytes are: a part of one of the shared buffers. With incremental
/// consumption the kernel fills one buffer with several receives in turn, so a buffer goes
/// back only with the receive that used it up (`more` false).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvBuffer {
    pub id: u16,
    /// Where in the buffer this receive's bytes start.
    offset: u16,
    /// The kernel goes on filling this buffer: it is not the driver's to give back.
    more: bool,
}

/// A connection's frames while the kernel sends them: the frames, and the vectors and
/// message header that point into them, kept still (boxed) until the completion.
struct InFlight {
    key: u32,
    serial: u32,
    /// What this send holds of its own, counted in [`Ring::sending_bytes`].
    bytes: usize,
    /// The bytes it offers the kernel.
    len: usize,
    frames: Staged,
    iovecs: Vec<libc::iovec>,
    header: libc::msghdr,
}

// SAFETY: the pointers in an in-flight send point into the record's own heap memory, which
// moves with it, and into event bodies the record holds a reference to; only the thread
// owning the ring touches either.
unsafe impl Send for InFlight {}

/// A send, from its submission until the driver has read its completion.
enum Sending {
    /// The kernel may still read through the record.
    Flying(Box<InFlight>),
    /// Completed and reaped; its record is back among the spares, its result waits for the
    /// driver (a fan-out reaps as it submits, long before the driver gets to the results).
    Done(SendDone),
}

/// What a send's completion hands back: the frames not sent, and how much of the first was.
#[derive(Default)]
pub struct SendDone {
    pub key: u32,
    pub serial: u32,
    pub result: i32,
    pub unsent: Vec<OutFrame>,
    pub offset: usize,
}

/// The shared receive buffers: the kernel fills the buffer at the head of the ring with
/// receives in turn (incremental consumption; one buffer per receive on kernels before 6.12)
/// and moves on once it is full; the driver gives a buffer back once the receive that
/// finished it has been read.
///
/// Only `offered` of them are in the ring at a time, and the ones given back last go in
/// first: with all of them offered the kernel would cycle through every buffer, and a shard
/// serving a few pings a second would keep all 1 MiB resident (57 B per connection of an
/// 18,000-connection process, measured by `benches/million.sh`).
struct BufferRing {
    entries: *mut BufRingEntry,
    /// The buffers, one allocation; raw because the kernel writes into parts of it while
    /// the driver reads others.
    data: *mut u8,
    tail: u16,
    /// Buffers neither in the ring nor with the driver, the last given back on top.
    spare: Vec<u16>,
    /// Buffers in the ring or with the driver (not yet given back).
    out: u16,
    /// Finished buffers with the driver: reaped in the completion that finished them, not
    /// yet given back (a buffer the kernel is still filling is not counted).
    held: u16,
    /// How many buffers the ring is kept filled with.
    offered: u16,
    /// The offer grew since the last [`Ring::trim_buffers`].
    grown: bool,
    /// The offer has grown since the ring last started small.
    wide: bool,
    /// Left to the kernel at exit (see [`Ring::abandon`]).
    abandoned: bool,
    /// Registered for incremental consumption ([`IOU_PBUF_RING_INC`]); false on kernels
    /// before 6.12, where each receive takes a whole buffer.
    incremental: bool,
    /// Per buffer, the bytes receives have taken from it since it was last offered: where
    /// the kernel writes the next receive into it (incremental consumption only).
    used: Vec<u16>,
}

// SAFETY: the entries are this ring's own allocation, used only by the thread that owns it.
unsafe impl Send for BufferRing {}

impl BufferRing {
    fn data_layout() -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(usize::from(BUFFERS) * BUFFER_BYTES, 4096)
            .expect("a valid layout")
    }

    fn layout() -> std::alloc::Layout {
        let bytes = usize::from(BUFFERS) * std::mem::size_of::<BufRingEntry>();
        // The kernel wants the ring page-aligned.
        std::alloc::Layout::from_size_align(bytes, 4096).expect("a valid layout")
    }

    /// `incremental`: ask for incremental consumption (false only in tests: the kernel's
    /// refusal is what turns it off in service).
    fn new(ring: &IoUring, incremental: bool) -> io::Result<Self> {
        // SAFETY: a non-zero size; zeroed entries are valid (the kernel reads only those
        // below the tail).
        let entries = unsafe { std::alloc::alloc_zeroed(Self::layout()) }.cast::<BufRingEntry>();
        if entries.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        // SAFETY: a non-zero size. Zeroed: pages stay untouched (not resident) until used.
        let data = unsafe { std::alloc::alloc_zeroed(Self::data_layout()) };
        if data.is_null() {
            // SAFETY: allocated just above with this layout.
            unsafe { std::alloc::dealloc(entries.cast(), Self::layout()) };
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let mut this = Self {
            entries,
            data,
            tail: 0,
            spare: Vec::new(),
            out: 0,
            held: 0,
            offered: OFFERED_QUIET,
            grown: false,
            wide: false,
            abandoned: false,
            incremental,
            used: vec![0; usize::from(BUFFERS)],
        };
        this.register(ring)?;
        Ok(this)
    }

    /// Registers the ring with the kernel, empty, and offers [`OFFERED_QUIET`] buffers.
    fn register(&mut self, ring: &IoUring) -> io::Result<()> {
        // SAFETY: the entries stay allocated until `drop`, after the ring (which owns the
        // registration) is gone: `Ring` drops its `IoUring` first. The kernel reads the tail
        // only when a receive picks a buffer, inside a later `io_uring_enter`, after the
        // `publish` below.
        let register = |flags| unsafe {
            ring.submitter().register_buf_ring_with_flags(
                self.entries as u64,
                BUFFERS,
                BUFFER_GROUP,
                flags,
            )
        };
        if self.incremental {
            match register(IOU_PBUF_RING_INC) {
                Ok(()) => {}
                // A kernel before 6.12 knows no such flag: one buffer per receive.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.incremental = false;
                    register(0)?;
                }
                Err(e) => return Err(e),
            }
        } else {
            register(0)?;
        }
        self.used.fill(0);
        self.tail = 0;
        self.out = 0;
        self.offered = OFFERED_QUIET;
        self.wide = false;
        self.spare = (0..BUFFERS).rev().collect();
        self.refill();
        self.publish();
        Ok(())
    }

    /// Takes back every buffer the kernel holds and starts again with [`OFFERED_QUIET`] of
    /// them, their pages dropped. The kernel consumes the ring in order, so after a storm
    /// that grew the offer it would otherwise go through every buffer still offered (one
    /// receive each before incremental consumption, a buffer's worth of receives each with
    /// it), keeping all their pages resident however quiet the shard is (1 MiB per shard, in
    /// whole-buffer mode: on one process of 18,000 connections, when its first idle pings
    /// went out; `benches/RESULTS.md`).
    ///
    /// Only sound when no receive can pick a buffer meanwhile (`DEFER_TASKRUN`, between two
    /// submits) and no completion carrying one is still to be reaped: the caller
    /// ([`Ring::restart_buffers`]) makes sure of both. Receives armed on the group find the
    /// new ring at their next data, as they would find the old one. `Err` only when the
    /// ring is gone and could not be registered again: no receive could complete.
    fn reset(&mut self, ring: &IoUring) -> io::Result<()> {
        if ring.submitter().unregister_buf_ring(BUFFER_GROUP).is_err() {
            // Still registered as it was: left to drain.
            self.drop_spare_pages();
            return Ok(());
        }
        self.advise_free(0, BUFFERS);
        self.register(ring)
    }

    /// Tops the ring up to `offered` from the spare buffers, most recently used first.
    fn refill(&mut self) {
        while self.out < self.offered {
            let Some(id) = self.spare.pop() else {
                return;
            };
            self.push(id);
            self.out += 1;
        }
    }

    /// A completion names buffer `id` with `len` bytes (`more`: the kernel keeps filling
    /// it): where they are. The kernel consumes an incremental buffer in order, so the bytes
    /// of this receive start where the last one's ended.
    fn take(&mut self, id: u16, len: i32, more: bool) -> RecvBuffer {
        let id = id % BUFFERS;
        let slot = &mut self.used[usize::from(id)];
        let offset = if self.incremental { *slot } else { 0 };
        // No bytes taken: an incremental buffer stays the kernel's, where it was (some
        // kernels report it without BUF_MORE then); giving it back would offer it twice.
        let more = more || (self.incremental && len <= 0);
        if self.incremental && more {
            let len = u16::try_from(len.max(0)).unwrap_or(u16::MAX);
            *slot = slot.saturating_add(len).min(BUFFER_BYTES as u16);
        } else {
            *slot = 0;
            self.held += 1;
        }
        RecvBuffer {
            id,
            offset,
            more: self.incremental && more,
        }
    }

    /// Buffer `id` is back from the driver.
    fn give_back(&mut self, id: u16) {
        self.out = self.out.saturating_sub(1);
        self.held = self.held.saturating_sub(1);
        self.spare.push(id % BUFFERS);
        self.refill();
    }

    /// A receive found the ring empty: offer twice as many.
    fn grow(&mut self) {
        self.grown = true;
        self.wide = true;
        self.offered = self.offered.saturating_mul(2).min(BUFFERS);
        self.refill();
    }

    fn push(&mut self, id: u16) {
        let slot = usize::from(self.tail & (BUFFERS - 1));
        // SAFETY: `id` < BUFFERS, so the buffer is inside the allocation.
        let addr = unsafe { self.data.add(usize::from(id) * BUFFER_BYTES) };
        // SAFETY: `slot` < BUFFERS, inside the allocation.
        let entry = unsafe { &mut *self.entries.add(slot) };
        entry.set_addr(addr as u64);
        entry.set_len(BUFFER_BYTES as u32);
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the buffers pushed so far visible to the kernel.
    fn publish(&mut self) {
        // SAFETY: the tail field lives in the first entry of the ring; the store is a release
        // so the kernel sees the entries before the tail that covers them.
        unsafe {
            let tail = BufRingEntry::tail(self.entries).cast_mut();
            std::sync::atomic::AtomicU16::from_ptr(tail)
                .store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }

    /// Once quiet, where the ring cannot be [reset](Self::reset): the offer goes back to
    /// [`OFFERED_QUIET`] as the kernel uses up what it holds, and the pages of the buffers no
    /// one holds are dropped (they read as zeroes when next used).
    fn drop_spare_pages(&mut self) {
        self.offered = OFFERED_QUIET;
        for i in 0..self.spare.len() {
            let id = self.spare[i];
            self.advise_free(id, 1);
        }
    }

    fn advise_free(&mut self, first: u16, count: u16) {
        let len = usize::from(count) * BUFFER_BYTES;
        // SAFETY: the range lies in this ring's own page-aligned allocation (`first + count`
        // <= BUFFERS); MADV_DONTNEED on private anonymous memory only makes its contents read
        // as zeroes next time.
        unsafe {
            let start = self.data.add(usize::from(first) * BUFFER_BYTES);
            libc::madvise(start.cast(), len, libc::MADV_DONTNEED);
        }
    }

    /// The `len` bytes a receive put in `b`: until it is recycled, nothing else writes
    /// there (the kernel writes only past them, into the rest of an incremental buffer).
    fn buffer(&mut self, b: RecvBuffer, len: usize) -> &mut [u8] {
        let offset = usize::from(b.offset).min(BUFFER_BYTES);
        let start = usize::from(b.id % BUFFERS) * BUFFER_BYTES + offset;
        // SAFETY: inside the allocation (the length is capped at the buffer's end); the
        // kernel is done with these bytes until the buffer is offered again.
        unsafe {
            std::slice::from_raw_parts_mut(self.data.add(start), len.min(BUFFER_BYTES - offset))
        }
    }
}

impl Drop for BufferRing {
    fn drop(&mut self) {
        if self.abandoned {
            return;
        }
        // SAFETY: allocated in `new` with these layouts.
        unsafe {
            std::alloc::dealloc(self.entries.cast(), Self::layout());
            std::alloc::dealloc(self.data, Self::data_layout());
        }
    }
}

/// One shard's ring. Made on the shard's own thread (the ring is single-issuer).
pub struct Ring {
    ring: IoUring,
    buffers: BufferRing,
    sends: Slab<Sending>,
    backlog: std::collections::VecDeque<squeue::Entry>,
    /// Send records done with, for the next sends. Boxed: a record must not move while the
    /// kernel reads through it, and it goes back into `sends` as it is.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<InFlight>>,
    closing: Slab<OwnedFd>,
    /// Whether buffers were given back since the last submit.
    buffers_dirty: bool,
    /// What the sends in flight hold of their own (frames, vectors, records): memory the
    /// connections' queues no longer count, until each send completes.
    sending_bytes: usize,
    /// The kernel runs this ring's work only inside its own `io_uring_enter`
    /// (`DEFER_TASKRUN`): between two calls nothing writes into the receive buffers.
    deferred: bool,
    /// Why the ring can no longer serve (reported by the next submit).
    failed: Option<io::Error>,
    /// Completions reaped while submitting mid-iteration (a fan-out's sends, a full submission
    /// queue), for the
    /// next [`Self::submit_and_wait`]: reaping as the sends go in lets a fan-out reuse the
    /// records of sends done, and keeps the completion queue from overflowing.
    early: Vec<Completion>,
    /// Entries copied out of the completion queue, to be turned into completions.
    cqes: Vec<cqueue::Entry>,
}

impl Ring {
    pub fn new() -> io::Result<Self> {
        Self::with_buffers(true)
    }

    fn with_buffers(incremental: bool) -> io::Result<Self> {
        let deferred = IoUring::builder()
            .setup_cqsize(ENTRIES * 4)
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_defer_taskrun()
            .build(ENTRIES);
        let (ring, deferred) = match deferred {
            Ok(ring) => (ring, true),
            Err(_) => (
                IoUring::builder()
                    .setup_cqsize(ENTRIES * 4)
                    .build(ENTRIES)?,
                false,
            ),
        };
        if !ring.params().is_feature_nodrop() || !ring.params().is_feature_submit_stable() {
            return Err(io::Error::other(
                "this kernel's io_uring lacks NODROP or SUBMIT_STABLE",
            ));
        }
        let buffers = BufferRing::new(&ring, incremental)?;
        Ok(Self {
            ring,
            buffers,
            sends: Slab::new(),
            backlog: Default::default(),
            spare: Vec::new(),
            closing: Slab::new(),
            buffers_dirty: false,
            sending_bytes: 0,
            deferred,
            failed: None,
            early: Vec::new(),
            cqes: Vec::new(),
        })
    }

    /// Queues `entry`; when the submission queue is full and the kernel takes nothing right
    /// now, it waits in `backlog` for the next [`Self::submit_and_wait`]: a request is never
    /// dropped (a lost send, cancel or receive would leave a connection stuck).
    fn push(&mut self, entry: squeue::Entry) {
        if self.backlog.is_empty() && self.try_push(&entry) {
            return;
        }
        if self.backlog.is_empty() && self.submit_mid_iteration() && self.try_push(&entry) {
            return;
        }
        self.backlog.push_back(entry);
    }

    fn try_push(&mut self, entry: &squeue::Entry) -> bool {
        // SAFETY: every pointer an entry carries (message headers, vectors, frames) is owned
        // by this ring's `sends` until the entry's completion.
        unsafe { self.ring.submission().push(entry) }.is_ok()
    }

    /// Moves waiting entries into the submission queue, submitting as it fills.
    fn flush_backlog(&mut self) {
        while let Some(entry) = self.backlog.pop_front() {
            if self.try_push(&entry) {
                continue;
            }
            if !self.submit_mid_iteration() || !self.try_push(&entry) {
                self.backlog.push_front(entry);
                return;
            }
        }
    }

    /// Submits what is queued without waiting, and reaps what completed into `early`: the
    /// sends that completed at once (most of a fan-out's), not deferred work such as
    /// receives, which the kernel runs only when asked for completions.
    fn submit_mid_iteration(&mut self) -> bool {
        // Receives armed now find the buffers given back so far in this iteration.
        if self.buffers_dirty {
            self.buffers.publish();
            self.buffers_dirty = false;
        }
        let submitted = self.ring.submit().is_ok();
        let mut early = std::mem::take(&mut self.early);
        self.reap(&mut early);
        self.early = early;
        submitted
    }

    /// Entries wait for room in the submission queue, or completions wait to be handed over:
    /// the loop must not sleep.
    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty() || !self.early.is_empty()
    }

    /// One accept on `listener`.
    pub fn arm_accept(&mut self, listener: RawFd) {
        let e = opcode::Accept::new(Fd(listener), std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_CLOEXEC)
            .build();
        self.push(e.user_data(Tag::new(Op::Accept, 0, 0).encode()));
    }

    /// Cancels every armed accept (each completes with `ECANCELED`).
    pub fn cancel_accepts(&mut self) {
        let tag = Tag::new(Op::Accept, 0, 0).encode();
        let e = opcode::AsyncCancel2::new(CancelBuilder::user_data(tag).all()).build();
        self.push(e.user_data(Tag::new(Op::Close, u32::MAX, 0).encode()));
    }

    /// Receives on `fd` into the shared buffers until cancelled, the peer closes, or the
    /// buffers run out (the completion without `more` says which).
    pub fn arm_recv(&mut self, fd: RawFd, key: u32, serial: u32) {
        let e = opcode::RecvMulti::new(Fd(fd), BUFFER_GROUP).build();
        self.push(e.user_data(Tag::new(Op::Recv, key, serial).encode()));
    }

    pub fn cancel_recv(&mut self, key: u32, serial: u32) {
        let tag = Tag::new(Op::Recv, key, serial).encode();
        let e = opcode::AsyncCancel2::new(CancelBuilder::user_data(tag)).build();
        self.push(e.user_data(Tag::new(Op::Close, u32::MAX, 0).encode()));
    }

    /// One completion once `fd` can take more output.
    pub fn arm_writable(&mut self, fd: RawFd, key: u32, serial: u32) {
        let e = opcode::PollAdd::new(Fd(fd), libc::POLLOUT as u32).build();
        self.push(e.user_data(Tag::new(Op::Writable, key, serial).encode()));
    }

    /// A multishot poll on the epoll descriptor the shard's mailbox waker rings.
    pub fn arm_waker(&mut self, fd: RawFd) {
        let e = opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build();
        self.push(e.user_data(Tag::new(Op::Waker, 0, 0).encode()));
    }

    /// Queues the frames `fill` stages for connection `key` as one send; its completion
    /// comes back through [`Self::finish_send`] with what was not sent. The records are
    /// reused from send to send (a fan-out makes one per subscriber).
    pub fn send(&mut self, fd: RawFd, key: u32, serial: u32, fill: impl FnOnce(&mut Staged)) {
        let mut flight = self.spare.pop().unwrap_or_else(|| {
            Box::new(InFlight {
                key,
                serial,
                bytes: 0,
                len: 0,
                frames: Staged::default(),
                iovecs: Vec::new(),
                // SAFETY: msghdr is plain data; all zeroes is an empty header.
                header: unsafe { std::mem::zeroed() },
            })
        });
        flight.key = key;
        flight.serial = serial;
        fill(&mut flight.frames);
        let InFlight {
            frames,
            iovecs,
            len,
            ..
        } = &mut *flight;
        iovecs.clear();
        *len = 0;
        frames.parts(|part| {
            if !part.is_empty() {
                *len += part.len();
                iovecs.push(libc::iovec {
                    iov_base: part.as_ptr().cast_mut().cast(),
                    iov_len: part.len(),
                });
            }
        });
        flight.header.msg_iov = flight.iovecs.as_mut_ptr();
        flight.header.msg_iovlen = flight.iovecs.len();
        flight.bytes = std::mem::size_of::<InFlight>()
            + flight.iovecs.capacity() * std::mem::size_of::<libc::iovec>()
            + flight.frames.own_bytes();
        self.sending_bytes += flight.bytes;
        let header: *const libc::msghdr = &flight.header;
        let index = self.sends.insert(Sending::Flying(flight)) as u32;
        // MSG_WAITALL: the kernel goes on until all is sent (or the socket fails), so a
        // completion is short only on an error.
        let flags = (libc::MSG_NOSIGNAL | libc::MSG_WAITALL) as u32;
        let e = opcode::SendMsg::new(Fd(fd), header).flags(flags).build();
        self.push(e.user_data(Tag::new(Op::Send, index, 0).encode()));
        if self.backlog.is_empty() && self.ring.submission().len() >= SUBMIT_EVERY {
            self.submit_mid_iteration();
        }
    }

    /// The send of a completion: its connection and what of its frames was not sent.
    pub fn finish_send(&mut self, c: &Completion) -> Option<SendDone> {
        match self.sends.try_remove(c.tag.key as usize)? {
            Sending::Done(done) => Some(done),
            // Not reaped through `reap` (cannot happen): finished here the same way.
            Sending::Flying(flight) => Some(self.retire(flight, c.result)),
        }
    }

    /// A reaped send's completion: its record goes back among the spares at once, and its
    /// result waits in its place for the driver.
    fn send_completed(&mut self, index: u32, result: i32) {
        let index = index as usize;
        let Some(slot) = self.sends.get_mut(index) else {
            return;
        };
        if !matches!(slot, Sending::Flying(_)) {
            return;
        }
        let empty = Sending::Done(SendDone::default());
        if let Sending::Flying(flight) = std::mem::replace(slot, empty) {
            let done = self.retire(flight, result);
            self.sends[index] = Sending::Done(done);
        }
    }

    /// What a finished send hands back; its record is kept for reuse.
    fn retire(&mut self, mut flight: Box<InFlight>, result: i32) -> SendDone {
        self.sending_bytes = self.sending_bytes.saturating_sub(flight.bytes);
        let sent = usize::try_from(result).unwrap_or(0);
        let (unsent, offset) = if sent >= flight.len {
            flight.frames.clear();
            (Vec::new(), 0)
        } else {
            flight.frames.unsent(sent)
        };
        let done = SendDone {
            key: flight.key,
            serial: flight.serial,
            result,
            unsent,
            offset,
        };
        if self.spare.len() < SPARE_SENDS {
            self.spare.push(flight);
        }
        done
    }

    /// Lets go of the reusable send records and the receive buffers' pages (once the shard
    /// is quiet). Called between two submits.
    pub fn release_spare(&mut self) {
        self.spare = Vec::new();
        if self.early.is_empty() {
            self.early = Vec::new();
        }
        self.cqes = Vec::new();
        self.sends.shrink_to_fit();
        self.restart_buffers();
    }

    /// Called once a second, between two submits: a buffer ring that grew for a storm of
    /// receives and has not had to grow for a whole second starts again small. Receives
    /// alone (a burst of pongs to the idle pings, say) never make the shard busy enough for
    /// [`Self::release_spare`], and the kernel would keep walking every buffer the storm
    /// offered.
    pub fn trim_buffers(&mut self) {
        let grown = std::mem::take(&mut self.buffers.grown);
        if self.buffers.wide && !grown {
            self.restart_buffers();
        }
    }

    /// Where the kernel fills buffers inside this thread's `io_uring_enter` alone
    /// (`DEFER_TASKRUN`), the driver holds none and no completion is waiting to be reaped,
    /// the buffer ring starts again small ([`BufferRing::reset`]); elsewhere only the spare
    /// buffers' pages go. A completion can be waiting between two submits: a fan-out's sends
    /// and a full submission queue are submitted mid-iteration (see `send` and `push`), and
    /// receives armed then may complete at once, their bytes in a buffer the driver has not
    /// seen yet.
    fn restart_buffers(&mut self) {
        let settled = self.deferred
            && self.buffers.held == 0
            && self.early.is_empty()
            && !self.ring.submission().cq_overflow()
            && self.ring.completion().is_empty();
        if !settled {
            self.buffers.drop_spare_pages();
            // Without DEFER_TASKRUN no later second could do more.
            self.buffers.wide &= self.deferred;
            return;
        }
        if let Err(e) = self.buffers.reset(&self.ring) {
            self.failed = Some(e);
        }
    }

    /// Closes `socket` once the kernel has let go of its requests: they hold the socket open,
    /// so a plain close would neither stop them nor end the connection.
    pub fn close(&mut self, socket: OwnedFd) {
        let fd = socket.as_raw_fd();
        let index = self.closing.insert(socket) as u32;
        let e = opcode::AsyncCancel2::new(CancelBuilder::fd(Fd(fd)).all()).build();
        self.push(e.user_data(Tag::new(Op::Close, index, 0).encode()));
    }

    /// A cancellation completed: the socket it was for (if any) is closed now.
    pub fn finish_close(&mut self, c: &Completion) {
        if c.tag.key != u32::MAX {
            self.closing.try_remove(c.tag.key as usize);
        }
    }

    /// The data of a receive completion, to be given back with [`Self::recycle`].
    pub fn received(&mut self, buffer: RecvBuffer, len: usize) -> &mut [u8] {
        self.buffers.buffer(buffer, len)
    }

    /// The driver is done with a receive's bytes. Its buffer goes back to the ring unless
    /// the kernel is still filling it.
    pub fn recycle(&mut self, buffer: RecvBuffer) {
        if buffer.more {
            return;
        }
        self.buffers.give_back(buffer.id);
        self.buffers_dirty = true;
    }

    /// Submits what is queued and waits up to `timeout` for a completion; then moves the
    /// completions into `out`.
    /// An error other than a timeout, a signal or a full completion queue means the ring is
    /// unusable.
    pub fn submit_and_wait(
        &mut self,
        timeout: Duration,
        out: &mut Vec<Completion>,
    ) -> io::Result<()> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if self.buffers_dirty {
            self.buffers.publish();
            self.buffers_dirty = false;
        }
        self.flush_backlog();
        // Completions reaped mid-iteration are waiting already: no sleep before they are
        // handed over (a fan-out's connections stay "sending" until then).
        let timeout = if self.backlog.is_empty() && self.early.is_empty() {
            timeout
        } else {
            Duration::ZERO
        };
        let waited = self.enter(1, timeout);
        out.append(&mut self.early);
        let before = out.len();
        self.reap(out);
        // A wait runs at most 20 items of the work the kernel deferred to this thread (kernel
        // 6.13 and later), one per socket that became readable: a busy shard would take in
        // 20 receives per iteration (handshakes, pongs) and fall behind. More is asked for,
        // without waiting, while the last call may have stopped at its limit.
        let mut limit = TASK_WORK_PER_WAIT;
        let mut rounds = 0;
        while self.deferred
            && waited.is_ok()
            && out.len() - before >= limit
            && rounds < DRAIN_ROUNDS
        {
            let start = out.len();
            if self.enter(DRAIN_BATCH, Duration::ZERO).is_err() {
                break;
            }
            self.reap(out);
            limit = DRAIN_BATCH;
            rounds += 1;
            if out.len() - start < limit {
                break;
            }
        }
        waited
    }

    /// One `io_uring_enter`: submits what is queued and waits up to `timeout` for `want`
    /// completions. A timeout, a signal or a full completion queue is not an error.
    fn enter(&mut self, want: usize, timeout: Duration) -> io::Result<()> {
        let ts = Timespec::from(timeout);
        let args = SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(want, &args) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Moves what the completion queue holds into `out`: receive buffers are located, the
    /// offer grows where a receive found none, and finished sends give back their records.
    fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion());
        for cqe in cqes.drain(..) {
            let Some(tag) = Tag::decode(cqe.user_data()) else {
                continue;
            };
            match tag.op {
                Op::Recv if cqe.result() == -libc::ENOBUFS => {
                    self.buffers.grow();
                    self.buffers_dirty = true;
                }
                Op::Send => self.send_completed(tag.key, cqe.result()),
                _ => {}
            }
            let buffer = cqueue::buffer_select(cqe.flags()).map(|id| {
                self.buffers
                    .take(id, cqe.result(), cqueue::buffer_more(cqe.flags()))
            });
            out.push(Completion {
                tag,
                result: cqe.result(),
                more: cqueue::more(cqe.flags()),
                buffer,
            });
        }
        self.cqes = cqes;
    }

    /// What the sends in flight hold, in bytes.
    pub fn sending_bytes(&self) -> usize {
        self.sending_bytes
    }

    /// Requests still running that point into memory this ring owns, and sends whose
    /// completion the driver has not read yet.
    pub fn in_flight(&self) -> usize {
        self.sends.len() + self.closing.len()
    }

    /// At exit with requests still running: their frames, sockets and receive buffers are
    /// never freed, since the kernel may still touch them while it tears the ring down.
    pub fn abandon(&mut self) {
        std::mem::forget(std::mem::take(&mut self.sends));
        std::mem::forget(std::mem::take(&mut self.closing));
        self.buffers.abandoned = true;
    }
}

/// Whether io_uring can run here, as the shards will use it: a ring with a provided-buffer
/// ring, and a kernel with multishot receive (6.0). `Err` says why not, in words.
pub fn probe() -> Result<(), String> {
    let release = kernel_release();
    let (major, minor) = parse_release(&release);
    if (major, minor) < (6, 0) {
        return Err(format!(
            "kernel {release} is older than 6.0 (multishot receive)"
        ));
    }
    Ring::new().map(drop).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) => "io_uring_setup is not available (ENOSYS: a seccomp profile or \
                               a kernel without io_uring)"
            .to_owned(),
        Some(libc::EPERM) => "io_uring is disabled (EPERM: kernel.io_uring_disabled or a \
                              seccomp profile)"
            .to_owned(),
        _ => format!("io_uring setup failed: {e}"),
    })
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn parse_release(release: &str) -> (u32, u32) {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor)
}

/// Writes straight to a (blocking) socket without waiting: the driver's direct writes, for
/// output that is not a fan-out (upgrade answers, replies, what a send left over).
pub struct DontWait(pub RawFd);

impl Write for DontWait {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: msghdr is plain data; IoSlice is ABI-compatible with iovec, and the slices
        // outlive the call.
        let n = unsafe {
            let mut header: libc::msghdr = std::mem::zeroed();
            header.msg_iov = bufs.as_ptr().cast_mut().cast();
            header.msg_iovlen = bufs.len();
            libc::sendmsg(self.0, &header, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer that takes nothing: output for a connection whose send is in flight waits in its
/// queue, behind it.
pub struct Behind;

impl Write for Behind {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads from a (blocking) socket without waiting.
pub fn read_now(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_tell_connections_apart() {
        let t = Tag::new(Op::Recv, 123_456, 0x1234_5678);
        let back = Tag::decode(t.encode()).unwrap();
        assert_eq!(back, t);
        assert!(back.names(0x1234_5678));
        assert!(!back.names(0x1234_5679));
        assert_eq!(Tag::decode(0), None);
    }

    use std::collections::HashSet;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    /// A batch with one event carrying `payload`, staged for connection 0; the batch's
    /// bodies, and the frame's bytes on the wire.
    fn one_event(payload: &str) -> (crate::batch::Batch, crate::batch::Bodies, Vec<u8>) {
        use crate::event::{EncodedEvent, Event, write_tail};
        let mut batch = crate::batch::Batch::default();
        let e = batch.push_event(EncodedEvent::encode(&Event {
            id: "1".into(),
            project: "p".into(),
            channels: vec!["c".into()],
            events: vec!["e".into()],
            roles: vec![],
            timestamp: "t".into(),
            payload: serde_json::json!({ "x": payload }),
        }));
        batch.stage(0, e, |buf, _| write_tail(buf, std::iter::once("s")));
        let bodies = batch.bodies();
        let mut staged = Staged::default();
        batch.stage_send(0, &bodies, &mut staged);
        let mut wire = Vec::new();
        staged.parts(|p| wire.extend_from_slice(p));
        (batch, bodies, wire)
    }

    /// `n` socket pairs, a receive armed on our end of each (keyed by its index).
    fn armed(ring: &mut Ring, n: usize) -> Vec<(UnixStream, UnixStream)> {
        let pairs: Vec<_> = (0..n).map(|_| UnixStream::pair().unwrap()).collect();
        for (i, (ours, _)) in pairs.iter().enumerate() {
            ring.arm_recv(ours.as_raw_fd(), i as u32, 0);
        }
        pairs
    }

    /// Submits and reaps until `done` says enough, for at most 5 s.
    fn reap(ring: &mut Ring, mut done: impl FnMut(&mut Ring, Completion) -> bool) {
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            let mut out = Vec::new();
            ring.submit_and_wait(Duration::from_millis(20), &mut out)
                .expect("the ring works");
            for c in out {
                if done(ring, c) {
                    return;
                }
            }
        }
        panic!("the completions did not come within 5 s");
    }

    /// Reads one receive completion: its bytes, given back; its receive armed again if it
    /// ended. Answers the bytes.
    fn take(ring: &mut Ring, c: &Completion, fd: RawFd) -> Vec<u8> {
        let mut got = Vec::new();
        if let Some(b) = c.buffer {
            got = ring.received(b, c.result as usize).to_vec();
            ring.recycle(b);
        }
        if !c.more {
            ring.arm_recv(fd, c.tag.key, 0);
        }
        got
    }

    /// Sends "ping" on each pair in turn, 200 times, each received before the next: answers
    /// the receive buffers used.
    fn ping_in_turn(ring: &mut Ring, pairs: &[(UnixStream, UnixStream)]) -> HashSet<u16> {
        let mut used = HashSet::new();
        for round in 0..200 {
            (&pairs[round % pairs.len()].1).write_all(b"ping").unwrap();
            let mut got = Vec::new();
            reap(ring, |ring, c| {
                used.extend(c.buffer.map(|b| b.id));
                got.extend(take(ring, &c, pairs[c.tag.key as usize].0.as_raw_fd()));
                got == b"ping"
            });
        }
        used
    }

    #[test]
    fn a_quiet_shard_keeps_few_receive_buffers_and_a_storm_gets_more() {
        let mut ring = Ring::new().expect("io_uring on the test machine (kernel 6.18)");
        let pairs = armed(&mut ring, 64);
        // One message at a time: the same few buffers go round.
        assert_few_buffers_go_round(&mut ring, &pairs);
        storm(&mut ring, &pairs);
        // A second with no storm, receives only: the kernel is left with the quiet offer, so
        // a trickle of messages goes round as few buffers as before, through the receives
        // armed before it. Not in the second the offer grew.
        ring.trim_buffers();
        assert!(ring.buffers.offered > OFFERED_QUIET, "kept while it grew");
        ring.trim_buffers();
        assert_eq!(ring.buffers.offered, OFFERED_QUIET);
        assert_few_buffers_go_round(&mut ring, &pairs);
        // The same once the shard is quiet after other work.
        storm(&mut ring, &pairs);
        ring.release_spare();
        assert_few_buffers_go_round(&mut ring, &pairs);
    }

    #[test]
    fn a_receive_completed_but_not_yet_reaped_keeps_its_bytes_across_a_trim() {
        let mut ring = Ring::new().expect("io_uring on the test machine (kernel 6.18)");
        let pairs = armed(&mut ring, 64);
        storm(&mut ring, &pairs);
        ring.trim_buffers();
        // A receive armed on bytes already there completes inside a plain submit (as when a
        // full submission queue is submitted mid-iteration): its completion waits unreaped.
        let (ours, peer) = UnixStream::pair().unwrap();
        (&peer).write_all(b"kept intact").unwrap();
        ring.arm_recv(ours.as_raw_fd(), 99, 0);
        ring.ring.submit().unwrap();
        ring.trim_buffers();
        let mut got = Vec::new();
        reap(&mut ring, |ring, c| {
            if c.tag.key == 99 {
                got.extend(take(ring, &c, ours.as_raw_fd()));
            }
            got.len() >= 11
        });
        assert_eq!(got, b"kept intact");
        // Reaped and given back: the next second starts small.
        ring.trim_buffers();
        assert!(!ring.buffers.wide, "started again small");
        assert_few_buffers_go_round(&mut ring, &pairs);
    }

    #[test]
    fn small_receives_share_a_buffer() {
        let mut ring = Ring::new().expect("io_uring on the test machine (kernel 6.18)");
        assert!(
            ring.buffers.incremental,
            "kernel 6.12 or later consumes buffers in parts"
        );
        let pairs = armed(&mut ring, 64);
        // A pong from every connection at once, as after a round of idle pings: 256 bytes,
        // one buffer's worth, where whole-buffer receives would want 64 buffers.
        let pong = |i: usize| format!("p{i:03}").into_bytes();
        for _ in 0..3 {
            for (i, (_, peer)) in pairs.iter().enumerate() {
                (&*peer).write_all(&pong(i)).unwrap();
            }
            let mut used = HashSet::new();
            let mut got = vec![Vec::new(); pairs.len()];
            reap(&mut ring, |ring, c| {
                used.extend(c.buffer.map(|b| b.id));
                let k = c.tag.key as usize;
                got[k].extend(take(ring, &c, pairs[k].0.as_raw_fd()));
                got.iter().all(|g| g.len() >= 4)
            });
            for (i, g) in got.iter().enumerate() {
                assert_eq!(*g, pong(i), "connection {i} read another's bytes");
            }
            assert!(used.len() <= 2, "{} buffers for 256 bytes", used.len());
            assert_eq!(ring.buffers.offered, OFFERED_QUIET, "none ran out");
        }
    }

    #[test]
    fn receives_packed_into_shared_buffers_keep_every_stream_intact_and_in_order() {
        let ring = Ring::new().expect("io_uring on the test machine (kernel 6.18)");
        assert!(ring.buffers.incremental);
        every_stream_arrives_intact_and_in_order(ring);
    }

    #[test]
    fn receives_into_whole_buffers_keep_every_stream_intact_and_in_order() {
        // As on a kernel before 6.12, which refuses incremental consumption.
        let ring = Ring::with_buffers(false).expect("io_uring on the test machine");
        assert!(!ring.buffers.incremental);
        every_stream_arrives_intact_and_in_order(ring);
    }

    fn every_stream_arrives_intact_and_in_order(mut ring: Ring) {
        let pairs = armed(&mut ring, 64);
        let mut sent = vec![Vec::new(); pairs.len()];
        let mut got = vec![Vec::new(); pairs.len()];
        // Lengths that make receives end anywhere in a buffer and straddle buffer ends.
        for round in 0..40usize {
            for (i, (_, peer)) in pairs.iter().enumerate() {
                let len = (round * 37 + i * 13) % 700 + 1;
                let start = sent[i].len();
                let msg: Vec<u8> = (start..start + len).map(|n| (n * 7 + i) as u8).collect();
                (&*peer).write_all(&msg).unwrap();
                sent[i].extend(msg);
            }
            reap(&mut ring, |ring, c| {
                let k = c.tag.key as usize;
                got[k].extend(take(ring, &c, pairs[k].0.as_raw_fd()));
                got.iter().zip(&sent).all(|(g, s)| g.len() == s.len())
            });
        }
        for (i, (g, s)) in got.iter().zip(&sent).enumerate() {
            assert!(
                g == s,
                "connection {i}: its bytes differ from what was sent"
            );
        }
    }

    /// 8,000 bytes on every pair at once: more than the buffers offered hold arrive together
    /// (the kernel takes a connection's bytes in receives of up to a buffer each, one after
    /// the other); every byte still arrives, once. The offer grows.
    fn storm(ring: &mut Ring, pairs: &[(UnixStream, UnixStream)]) {
        const EACH: usize = 8000;
        for (_, peer) in pairs {
            (&*peer).write_all(&[7u8; EACH]).unwrap();
        }
        let mut got = vec![0usize; pairs.len()];
        reap(ring, |ring, c| {
            let bytes = take(ring, &c, pairs[c.tag.key as usize].0.as_raw_fd());
            assert!(bytes.iter().all(|&b| b == 7));
            got[c.tag.key as usize] += bytes.len();
            got.iter().all(|&n| n == EACH)
        });
        assert!(ring.buffers.offered > OFFERED_QUIET);
    }

    fn assert_few_buffers_go_round(ring: &mut Ring, pairs: &[(UnixStream, UnixStream)]) {
        let used = ping_in_turn(ring, pairs);
        assert!(
            used.len() <= usize::from(OFFERED_QUIET),
            "{} buffers went round",
            used.len()
        );
        assert_eq!(
            ring.buffers.offered, OFFERED_QUIET,
            "no receive ran out of buffers"
        );
    }

    #[test]
    fn a_send_in_flight_counts_what_it_holds_until_it_completes() {
        let mut ring = Ring::new().expect("io_uring on the test machine (kernel 6.18)");
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let (batch, bodies, wire) = one_event(&"x".repeat(4 << 20));
        let len = wire.len();
        ring.send(ours.as_raw_fd(), 7, 1, |staged| {
            batch.stage_send(0, &bodies, staged)
        });
        // The send holds the event, not the batch.
        drop((batch, bodies));
        let mut out = Vec::new();
        ring.submit_and_wait(Duration::from_millis(50), &mut out)
            .unwrap();
        assert!(
            out.is_empty(),
            "the peer reads nothing: the send cannot finish"
        );
        // Its own: the record, its vectors, the frame's header and tail (the event's body is
        // shared by every subscriber's send, counted once by the shard's queue).
        let own = ring.sending_bytes();
        assert!((64..4096).contains(&own), "{own}");
        let reader = std::thread::spawn(move || {
            let mut all = vec![0u8; len];
            peer.read_exact(&mut all).map(|()| all)
        });
        reap(&mut ring, |ring, c| {
            let done = ring.finish_send(&c).expect("the send's completion");
            assert_eq!((done.key, done.result), (7, len as i32));
            assert!(done.unsent.is_empty());
            true
        });
        assert_eq!(reader.join().unwrap().unwrap(), wire);
        assert_eq!(ring.sending_bytes(), 0);
    }

    #[test]
    fn a_fan_out_larger_than_the_submission_queue_reuses_the_records_of_sends_done() {
        let mut ring = Ring::new().expect("io_uring on the test machine (kernel 6.18)");
        let n = 3 * ENTRIES as usize;
        let pairs: Vec<_> = (0..n).map(|_| UnixStream::pair().unwrap()).collect();
        let events: Vec<_> = (0..n).map(|i| one_event(&format!("event {i:5}"))).collect();
        for (i, (ours, _)) in pairs.iter().enumerate() {
            let (batch, bodies, _) = &events[i];
            ring.send(ours.as_raw_fd(), i as u32, 1, |staged| {
                batch.stage_send(0, bodies, staged)
            });
        }
        // Submitted every few sends, and reaped then: the sends went on in the records of
        // sends already done, a few dozen of them for the whole fan-out.
        let flying = ring
            .sends
            .iter()
            .filter(|(_, s)| matches!(s, Sending::Flying(_)));
        let made = ring.spare.len() + flying.count();
        assert!(
            !ring.spare.is_empty() && made <= 256,
            "{made} send records for {n} sends"
        );
        let mut done = vec![false; n];
        reap(&mut ring, |ring, c| {
            let sent = ring.finish_send(&c).expect("a send's completion");
            let wire = &events[sent.key as usize].2;
            assert_eq!((sent.result, sent.unsent.len()), (wire.len() as i32, 0));
            done[sent.key as usize] = true;
            done.iter().all(|&d| d)
        });
        assert_eq!(ring.in_flight(), 0);
        assert_eq!(ring.sending_bytes(), 0);
        for (i, (_, peer)) in pairs.iter().enumerate() {
            let mut got = vec![0u8; events[i].2.len()];
            (&*peer).read_exact(&mut got).unwrap();
            assert_eq!(got, events[i].2);
        }
    }

    #[test]
    fn one_wait_hands_over_every_receive_that_is_ready() {
        let mut ring = Ring::new().expect("io_uring on the test machine (kernel 6.18)");
        let pairs = armed(&mut ring, 300);
        let mut out = Vec::new();
        ring.submit_and_wait(Duration::ZERO, &mut out).unwrap();
        // Every receive waits for data now; then a pong arrives on each connection at once.
        for (_, peer) in &pairs {
            (&*peer).write_all(b"pong").unwrap();
        }
        out.clear();
        ring.submit_and_wait(Duration::from_millis(100), &mut out)
            .unwrap();
        // The kernel runs at most 20 receives' wake-ups per wait on its own (6.13 and later);
        // a busy shard would fall behind its receives.
        let received = out.iter().filter(|c| c.result == 4).count();
        assert_eq!(received, pairs.len());
    }

    #[test]
    fn completions_reaped_mid_iteration_are_handed_over_without_a_wait() {
        let mut ring = Ring::new().expect("io_uring on the test machine (kernel 6.18)");
        let pairs: Vec<_> = (0..ENTRIES).map(|_| UnixStream::pair().unwrap()).collect();
        let (batch, bodies, _) = one_event("event");
        for (i, (ours, _)) in pairs.iter().enumerate() {
            ring.send(ours.as_raw_fd(), i as u32, 1, |staged| {
                batch.stage_send(0, &bodies, staged)
            });
        }
        // The sends went in as they were queued, and completed at once; then receives on quiet
        // sockets fill the queue, and the one beyond it submits them. What completed is
        // reaped each time; the receives are left, and will not complete.
        let quiet: Vec<_> = (0..=ENTRIES).map(|_| UnixStream::pair().unwrap()).collect();
        for (i, (ours, _)) in quiet.iter().enumerate() {
            ring.arm_recv(ours.as_raw_fd(), i as u32, 0);
        }
        assert!(ring.backlog.is_empty(), "the full queue was submitted");
        let mut out = Vec::new();
        let start = Instant::now();
        ring.submit_and_wait(Duration::from_secs(2), &mut out)
            .unwrap();
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
        let sent = out.iter().filter(|c| c.tag.op == Op::Send).count();
        assert_eq!(sent, ENTRIES as usize);
    }

    #[test]
    fn kernel_releases_parse() {
        assert_eq!(parse_release("6.18.0-herald"), (6, 18));
        assert_eq!(parse_release("5.15.0-91-generic"), (5, 15));
        assert_eq!(parse_release(""), (0, 0));
    }
}
