//! A shard's io_uring loop (`--io uring`): the same connections, batch and control-plane
//! traffic as the epoll loop, driven by completions instead of readiness.
//!
//! Owns what only this driver does with the connection contract: turning completions
//! (accepts, receives, writability, sends, the mailbox's doorbell) into its calls, pausing a
//! multishot receive when a connection wants no input and resuming it, and holding
//! connections the kernel accepted while the shard was at its limit until there is room. The
//! ring itself is [`crate::uring`]; protocol decisions stay in `conn`.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Poll};

use super::{AcceptRefusal, Io, Shard, epoll_io};
use crate::uring::{Completion, Op, RecvBuffer, Ring};

/// Bytes a paused connection may receive before its receive's cancellation takes effect (a
/// few buffers in practice); beyond it the connection is dropped.
const STASH_MAX: usize = 256 * 1024;
/// How long a stopping shard waits for the kernel to finish with memory it lent to requests.
const SETTLE_AT_EXIT: Duration = Duration::from_secs(1);
/// Accepts armed at once per shard: what one `io_uring_enter` can complete in a connect storm,
/// and the most descriptors a shard can hold past the connection limit (they wait for room).
const ACCEPTS_ARMED: u32 = 16;

pub struct UringIo {
    /// Made on the shard's thread when it starts (the ring is single-issuer).
    ring: Option<Ring>,
    /// The epoll set the mailbox's waker rings; the ring polls it.
    poll: Poll,
    events: Events,
    listener: Option<std::net::TcpListener>,
    /// Single-shot accepts armed (at most [`ACCEPTS_ARMED`]).
    accepts_armed: u32,
    accepting: bool,
    /// Accepted while the shard was at its connection limit: admitted as room frees up.
    waiting: VecDeque<std::net::TcpStream>,
    /// What paused connections received after they stopped wanting input.
    stash: rustc_hash::FxHashMap<usize, Vec<u8>>,
    completions: Vec<Completion>,
}

impl UringIo {
    pub(super) fn new(poll: Poll, listener: std::net::TcpListener) -> Self {
        Self {
            ring: None,
            poll,
            events: Events::with_capacity(8),
            listener: Some(listener),
            accepts_armed: 0,
            accepting: true,
            waiting: VecDeque::new(),
            stash: Default::default(),
            completions: Vec::new(),
        }
    }

    pub(super) fn arm_recv(&mut self, fd: RawFd, key: u32, serial: u32) -> bool {
        let Some(ring) = self.ring.as_mut() else {
            return false;
        };
        ring.arm_recv(fd, key, serial);
        true
    }

    pub(super) fn arm_writable(&mut self, fd: RawFd, key: u32, serial: u32) {
        if let Some(ring) = self.ring.as_mut() {
            ring.arm_writable(fd, key, serial);
        }
    }

    pub(super) fn send(
        &mut self,
        fd: RawFd,
        key: u32,
        serial: u32,
        fill: impl FnOnce(&mut crate::batch::Staged),
    ) {
        if let Some(ring) = self.ring.as_mut() {
            ring.send(fd, key, serial, fill);
        }
    }

    pub(super) fn sending_bytes(&self) -> usize {
        self.ring.as_ref().map_or(0, Ring::sending_bytes)
    }

    /// Once a second: receive buffers a storm needed and the last second did not go back.
    pub(super) fn trim(&mut self) {
        if let Some(ring) = self.ring.as_mut() {
            ring.trim_buffers();
        }
    }

    /// Memory kept between bursts goes back (see `Shard::give_back_memory`).
    pub(super) fn release(&mut self) {
        if let Some(ring) = self.ring.as_mut() {
            ring.release_spare();
        }
        self.stash.shrink_to_fit();
    }

    pub(super) fn close(&mut self, key: usize, stream: TcpStream) {
        self.stash.remove(&key);
        if let Some(ring) = self.ring.as_mut() {
            ring.close(OwnedFd::from(stream));
        }
    }

    /// Shutdown: no more accepts; the listener closes once its request is cancelled, and
    /// connections still waiting for room are let go.
    pub(super) fn stop_accepting(&mut self) {
        self.accepting = false;
        self.waiting.clear();
        if let (Some(ring), Some(listener)) = (self.ring.as_mut(), self.listener.take()) {
            ring.close(OwnedFd::from(listener));
        }
    }
}

impl Shard {
    fn uring(&mut self) -> Option<&mut UringIo> {
        match &mut self.io {
            Io::Uring(u) => Some(u),
            Io::Epoll { .. } => None,
        }
    }

    pub(super) fn run_uring(&mut self) {
        if !self.start_ring() {
            self.run_epoll();
            return;
        }
        loop {
            let timeout = self.poll_timeout();
            let Some(u) = self.uring() else {
                return;
            };
            let mut done = std::mem::take(&mut u.completions);
            if let Some(ring) = u.ring.as_mut()
                && let Err(e) = ring.submit_and_wait(timeout, &mut done)
            {
                // Like a failed epoll_wait: the shard cannot go on (and /readyz says so).
                tracing::error!(shard = self.id, error = %e, "io_uring failed; shard stops");
                return;
            }
            self.set_clock();
            for c in done.drain(..) {
                self.on_completion(c);
            }
            if let Some(u) = self.uring() {
                u.completions = done;
            }
            for k in std::mem::take(&mut self.unfinished_reads) {
                self.resume_reading(k);
            }
            if self.after_io() {
                self.settle_ring_at_exit();
                return;
            }
        }
    }

    /// Makes the ring on this thread; where that fails, the shard runs on epoll instead.
    fn start_ring(&mut self) -> bool {
        let id = self.id;
        let Some(u) = self.uring() else {
            return false;
        };
        match Ring::new() {
            Ok(mut ring) => {
                ring.arm_waker(u.poll.as_raw_fd());
                u.ring = Some(ring);
                // Blocking, so that the kernel parks an accept rather than failing it.
                if let Some(l) = &u.listener {
                    let _ = l.set_nonblocking(false);
                }
                self.accept_uring();
                true
            }
            Err(e) => {
                tracing::warn!(shard = id, error = %e, "io_uring cannot be set up; this shard runs on epoll");
                let listener = u.listener.take();
                let poll = match Poll::new() {
                    Ok(spare) => std::mem::replace(&mut u.poll, spare),
                    Err(e) => {
                        tracing::error!(shard = id, error = %e, "cannot fall back to epoll; shard stops");
                        return false;
                    }
                };
                let Some(listener) = listener else {
                    return false;
                };
                match epoll_io(poll, listener) {
                    Ok(io) => self.io = io,
                    Err(e) => tracing::error!(shard = id, error = %e, "epoll failed; shard stops"),
                }
                false
            }
        }
    }

    fn on_completion(&mut self, c: Completion) {
        match c.tag.op {
            Op::Accept => self.on_accepted(c),
            Op::Recv => self.on_received(c),
            Op::Writable => self.on_writable(c),
            Op::Send => self.on_sent(c),
            Op::Close => {
                if let Some(ring) = self.uring().and_then(|u| u.ring.as_mut()) {
                    ring.finish_close(&c);
                }
            }
            Op::Waker => self.on_doorbell(c),
        }
    }

    /// The mailbox rang: the commands are drained after the completions; here the epoll set
    /// is emptied so that it can ring again.
    fn on_doorbell(&mut self, c: Completion) {
        let Some(u) = self.uring() else {
            return;
        };
        let _ = u.poll.poll(&mut u.events, Some(Duration::ZERO));
        if !c.more {
            let fd = u.poll.as_raw_fd();
            if let Some(ring) = u.ring.as_mut() {
                ring.arm_waker(fd);
            }
        }
    }

    /// Admits connections that waited for room and arms accepts up to [`ACCEPTS_ARMED`];
    /// called at start, after accepts completed, and when a pause after a refusal is over. At
    /// the connection limit nothing is armed: new connections wait in the kernel's backlog.
    pub(super) fn accept_uring(&mut self) {
        self.accept_more = false;
        if self.accept_paused_until.is_some() || !self.admit_waiting() {
            return;
        }
        let room = self.limit.room();
        if room == 0 {
            self.cancel_accepts();
            self.on_accept_refused(AcceptRefusal::ConnectionLimit);
            return;
        }
        // No more armed than there is room for: what they accept past the limit would hold
        // descriptors the admin listener and the bus need.
        let most = ACCEPTS_ARMED.min(u32::try_from(room).unwrap_or(u32::MAX));
        let Some(u) = self.uring() else {
            return;
        };
        if let (true, Some(ring), Some(listener)) =
            (u.accepting, u.ring.as_mut(), u.listener.as_ref())
        {
            while u.accepts_armed < most {
                ring.arm_accept(listener.as_raw_fd());
                u.accepts_armed += 1;
            }
        }
    }

    /// At the limit: the armed accepts go, so that new connections wait in the backlog.
    fn cancel_accepts(&mut self) {
        if let Some(u) = self.uring()
            && u.accepts_armed > 0
            && let Some(ring) = u.ring.as_mut()
        {
            ring.cancel_accepts();
        }
    }

    fn on_accepted(&mut self, c: Completion) {
        let paused = self.accept_paused_until.is_some();
        let Some(u) = self.uring() else {
            return;
        };
        u.accepts_armed = u.accepts_armed.saturating_sub(1);
        let ended = u.accepting;
        if c.result >= 0 {
            // SAFETY: the kernel has just made this descriptor for us; nothing else owns it.
            let stream = unsafe { std::net::TcpStream::from_raw_fd(c.result) };
            if !u.accepting {
                // Raced the listener's close at shutdown: not served.
                return;
            }
            u.waiting.push_back(stream);
            self.admit_waiting();
        } else {
            match -c.result {
                libc::ECANCELED | libc::EINTR | libc::EAGAIN | libc::ECONNABORTED => {}
                // EMFILE (24): this process's limit; ENFILE (23): the system-wide one.
                23 | 24 => self.on_accept_refused(AcceptRefusal::FdLimit),
                errno => self.on_accept_refused(AcceptRefusal::Other(
                    std::io::Error::from_raw_os_error(errno),
                )),
            }
        }
        // Armed again next iteration, or when a pause is over.
        if ended && !paused && self.accept_paused_until.is_none() {
            self.accept_more = true;
        }
    }

    /// Admits waiting connections while the limit allows; answers false when it does not.
    fn admit_waiting(&mut self) -> bool {
        self.worked_since_tick = true;
        loop {
            let Some(stream) = self.uring().and_then(|u| u.waiting.pop_front()) else {
                return true;
            };
            if !self.limit.try_acquire() {
                if let Some(u) = self.uring() {
                    u.waiting.push_front(stream);
                }
                self.cancel_accepts();
                self.on_accept_refused(AcceptRefusal::ConnectionLimit);
                return false;
            }
            match stream.peer_addr() {
                Ok(peer) => self.adopt(TcpStream::from_std(stream), peer),
                // Gone before it was taken.
                Err(_) => self.limit.release(),
            }
        }
    }

    fn on_received(&mut self, c: Completion) {
        let k = c.tag.key as usize;
        let live = self
            .slab
            .get(k)
            .is_some_and(|s| c.tag.names(s.conn.serial()));
        if !live {
            if let (Some(b), Some(ring)) = (c.buffer, self.uring().and_then(|u| u.ring.as_mut())) {
                ring.recycle(b);
            }
            return;
        }
        if !c.more
            && let Some(slot) = self.slab.get_mut(k)
        {
            slot.set_recv_armed(false);
        }
        // Only a receive with bytes carries a buffer; should any other, it goes back at once
        // (a buffer never given back would keep the ring from ever starting again small).
        if c.result <= 0
            && let (Some(b), Some(ring)) = (c.buffer, self.uring().and_then(|u| u.ring.as_mut()))
        {
            ring.recycle(b);
        }
        match c.result {
            n if n > 0 => {
                let Some(buffer) = c.buffer else {
                    self.remove(k);
                    return;
                };
                if !self.hand_over(k, buffer, n as usize) {
                    return;
                }
            }
            // End of stream, or a receive error.
            n if n == 0 || (n != -libc::ENOBUFS && n != -libc::ECANCELED) => {
                self.remove(k);
                return;
            }
            // Out of buffers, or cancelled for a pause: armed again below when it should be.
            _ => {}
        }
        if let Some(slot) = self.slab.get(k)
            && !slot.recv_armed()
            && !slot.read_paused()
        {
            self.unfinished_reads.push(k);
        }
    }

    /// Hands received bytes to connection `k`, or keeps them when it wants no input now (they
    /// were on their way when its receive was paused). Answers false if `k` was dropped.
    fn hand_over(&mut self, k: usize, buffer: RecvBuffer, len: usize) -> bool {
        let Io::Uring(u) = &mut self.io else {
            return false;
        };
        let (Some(ring), Some(slot)) = (u.ring.as_mut(), self.slab.get_mut(k)) else {
            return false;
        };
        let data = ring.received(buffer, len);
        let mut overflow = false;
        let wants = !slot.read_paused() && slot.conn.wants_input(&self.shared.cfg);
        // Behind what is kept already, in order: it is handed over first (`resume_reading`).
        let behind = u.stash.contains_key(&k);
        if !wants || behind {
            if !wants {
                slot.set_read_paused(true);
            }
            let stash = u.stash.entry(k).or_default();
            overflow = stash.len() + data.len() > STASH_MAX;
            if !overflow {
                stash.extend_from_slice(data);
            }
            if wants {
                self.unfinished_reads.push(k);
            }
        } else {
            let mut cx = self.shared.context(k as u32);
            if let Some(i) = slot.conn.on_read(data, &mut cx) {
                self.m.record(i);
            }
            if let Some(ticket) = self.shared.admitted.take() {
                slot.ip = ticket;
            }
        }
        ring.recycle(buffer);
        if overflow {
            self.remove(k);
            return false;
        }
        self.settle(k) && self.pause_if_full(k)
    }

    /// A connection that wants no input now stops receiving until `settle` finds it wants
    /// some again (the epoll driver's read pause).
    fn pause_if_full(&mut self, k: usize) -> bool {
        let Io::Uring(u) = &mut self.io else {
            return false;
        };
        let Some(slot) = self.slab.get_mut(k) else {
            return false;
        };
        if slot.conn.wants_input(&self.shared.cfg) {
            return true;
        }
        slot.set_read_paused(true);
        if slot.recv_armed()
            && let Some(ring) = u.ring.as_mut()
        {
            ring.cancel_recv(k as u32, slot.conn.serial());
        }
        true
    }

    /// A connection that wants input again: what it received while paused first, then its
    /// receive is armed again.
    fn resume_reading(&mut self, k: usize) {
        let Some(slot) = self.slab.get_mut(k) else {
            return;
        };
        if slot.read_paused() {
            return;
        }
        let stash = self.uring().and_then(|u| u.stash.remove(&k));
        if let Some(mut bytes) = stash {
            let Some(slot) = self.slab.get_mut(k) else {
                return;
            };
            let mut cx = self.shared.context(k as u32);
            if let Some(i) = slot.conn.on_read(&mut bytes, &mut cx) {
                self.m.record(i);
            }
            if let Some(ticket) = self.shared.admitted.take() {
                slot.ip = ticket;
            }
            if !self.settle(k) || !self.pause_if_full(k) {
                return;
            }
        }
        let Io::Uring(u) = &mut self.io else {
            return;
        };
        if let Some(slot) = self.slab.get_mut(k)
            && !slot.read_paused()
            && !slot.recv_armed()
        {
            slot.set_recv_armed(u.arm_recv(slot.stream.as_raw_fd(), k as u32, slot.conn.serial()));
        }
    }

    fn on_writable(&mut self, c: Completion) {
        let k = c.tag.key as usize;
        let Some(slot) = self.slab.get_mut(k) else {
            return;
        };
        if !c.tag.names(slot.conn.serial()) {
            return;
        }
        slot.set_wants_write(false);
        if c.result < 0 && c.result != -libc::ECANCELED {
            self.remove(k);
            return;
        }
        self.settle(k);
    }

    fn on_sent(&mut self, c: Completion) {
        let Some(done) = self
            .uring()
            .and_then(|u| u.ring.as_mut())
            .and_then(|ring| ring.finish_send(&c))
        else {
            return;
        };
        let k = done.key as usize;
        // A connection gone meanwhile: its frames go now that the kernel is done with them.
        let Some(slot) = self.slab.get_mut(k) else {
            return;
        };
        if slot.conn.serial() != done.serial {
            return;
        }
        slot.set_sending(false);
        if done.result < 0 && done.result != -libc::EAGAIN && done.result != -libc::EINTR {
            self.remove(k);
            return;
        }
        slot.conn.queue_unsent(done.unsent, done.offset);
        self.settle(k);
    }

    /// Before the ring goes: let the kernel finish with the frames and sockets it was lent,
    /// for a bounded time.
    fn settle_ring_at_exit(&mut self) {
        let id = self.id;
        let Some(u) = self.uring() else {
            return;
        };
        let Some(ring) = u.ring.as_mut() else {
            return;
        };
        let until = Instant::now() + SETTLE_AT_EXIT;
        let mut done = Vec::new();
        while ring.in_flight() > 0 && Instant::now() < until {
            if ring
                .submit_and_wait(Duration::from_millis(50), &mut done)
                .is_err()
            {
                break;
            }
            for c in done.drain(..) {
                match c.tag.op {
                    Op::Accept if c.result >= 0 => {
                        // SAFETY: a descriptor the kernel just made for us.
                        drop(unsafe { OwnedFd::from_raw_fd(c.result) });
                    }
                    Op::Send => drop(ring.finish_send(&c)),
                    Op::Close => ring.finish_close(&c),
                    Op::Recv => {
                        if let Some(b) = c.buffer {
                            ring.recycle(b);
                        }
                    }
                    _ => {}
                }
            }
        }
        if ring.in_flight() > 0 {
            tracing::warn!(
                shard = id,
                requests = ring.in_flight(),
                "io_uring requests still running at exit; their memory is left to the kernel"
            );
            ring.abandon();
        }
    }
}
