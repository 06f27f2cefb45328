//! The mailbox: every message that crosses between the control plane and the shards.
//!
//! Owns the message types ([`Command`]; [`ReplayRequest`] and [`IdentityRequest`], and the
//! [`Answer`]s to them), both ends of a shard's queues ([`ShardHandle`] for the control plane,
//! [`ShardInbox`] for the shard), the channels shards ask for replays and identities on
//! ([`ReplaySender`], [`ResolveSender`]), and the queue capacities. It depends on nothing in the crate but
//! [`event`](crate::event), [`identity`](crate::identity) and [`filter`](crate::filter) (what
//! its messages carry), so the data plane and the control plane both import it and neither
//! imports the other. It uses no tokio: the shard side is crossbeam channels plus a mio waker,
//! and the control plane is woken through a [`Doorbell`] it supplies itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use mio::Waker;
use thiserror::Error;

use crate::event::{EncodedEvent, EventId};
use crate::filter::Filter;
use crate::identity::{Identity, Resolved, SessionSecret};

/// Inbound queue capacity per shard, in events.
pub const QUEUE_CAPACITY: usize = 65_536;
/// Answers (replays, identities) waiting per shard; the control plane holds the rest back.
pub const ANSWER_CAPACITY: usize = 1024;
/// Session resolutions waiting for the resolver, all shards together. Beyond it a client is
/// told to retry (and an upgrade goes on as a guest).
pub const RESOLVE_QUEUE_CAPACITY: usize = 4096;
/// Replay requests waiting for the replay thread, all shards together. Beyond it a resuming
/// client is told to retry (4010) and gets live events meanwhile.
pub const REPLAY_QUEUE_CAPACITY: usize = 4096;

/// What the control plane queues for a shard. Shutdown is not queued: it is a flag
/// ([`ShardHandle::request_shutdown`]), so a full queue can never delay it.
#[derive(Debug)]
pub enum Command {
    Event(Arc<EncodedEvent>),
    /// `user`'s permissions changed in `project`: resolve the sessions of its connections
    /// again (the resolver no longer serves answers cached before the change).
    PermissionsChanged {
        project: Arc<str>,
        user: Arc<str>,
    },
}

/// State both ends of a shard see without a queue.
#[derive(Debug, Default)]
struct Signals {
    wake_pending: AtomicBool,
    /// Drain time in milliseconds plus one once shutdown is requested; 0 before.
    shutdown: AtomicU64,
    /// Cleared when the shard's inbox is dropped: the shard thread ended, normally or not.
    alive: AtomicBool,
}

/// What a reconnecting connection asks to be replayed: events after `after`, up to `upto` (the
/// last event its shard has already processed; later ones reach it live), filtered like live
/// delivery and bounded.
#[derive(Debug, Clone)]
pub struct ReplayQuery {
    pub after: EventId,
    /// `None`: the shard has processed no event yet, so replay up to where the bus started.
    pub upto: Option<EventId>,
    pub project: String,
    /// The connection's subscriptions: an event is replayed when one of them takes it (a
    /// channel in common and its queries, if any, matching), so the limits count only what
    /// the client gets.
    pub subscriptions: Vec<ReplaySubscription>,
    pub identity: Arc<Identity>,
    pub max_events: usize,
    pub max_bytes: usize,
}

/// One subscription of a resuming connection, as its replay judges events.
#[derive(Debug, Clone)]
pub struct ReplaySubscription {
    pub channels: Vec<String>,
    pub filter: Option<Filter>,
}

impl ReplayQuery {
    /// Whether `event` reaches the connection: its project, its roles, one subscription.
    pub fn wants(&self, event: &EncodedEvent) -> bool {
        *event.project == *self.project
            && event.allows(&self.identity)
            && self.subscriptions.iter().any(|s| {
                s.channels
                    .iter()
                    .any(|c| event.channels.iter().any(|e| **e == **c))
                    && s.filter.as_ref().is_none_or(|f| f.matches(event.payload()))
            })
    }
}

/// Why a replay cannot be served; the client gets the message and then live events.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ReplayError {
    #[error("history truncated: {0}; resync, then live events follow")]
    Truncated(String),
    #[error("lastEventId {0} is newer than the newest event; live events follow")]
    Ahead(EventId),
    #[error("history unavailable: {0}; resync, then live events follow")]
    Unavailable(String),
}

impl ReplayError {
    /// The `error` code clients see (documented in the README).
    pub fn code(&self) -> u16 {
        match self {
            Self::Truncated(_) | Self::Unavailable(_) => 4010,
            Self::Ahead(_) => 4012,
        }
    }
}

/// A shard's request to replay history to one of its connections.
#[derive(Debug)]
pub struct ReplayRequest {
    pub shard: usize,
    pub key: u32,
    pub serial: u32,
    pub query: ReplayQuery,
    /// Set once the connection is gone: the fetch is skipped.
    pub cancellation: Cancellation,
}

/// Shared between a waiting resume and its request: the connection side cancels, the control
/// plane checks before it fetches.
#[derive(Debug, Clone, Default)]
pub struct Cancellation(Arc<AtomicBool>);

impl Cancellation {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The history a resuming connection asked for. Answers travel in their own queue, served after
/// live events and a few per loop iteration, so a mass reconnect never delays live delivery.
#[derive(Debug)]
pub struct ReplayAnswer {
    pub key: u32,
    pub serial: u32,
    pub outcome: Result<Vec<Arc<EncodedEvent>>, ReplayError>,
}

/// Why a connection needs its session resolved, which decides what its answer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvePurpose {
    /// The upgrade waits for it: `connected` then carries the user.
    Handshake,
    /// An `authentication` message, numbered by the connection so that only the answer to its
    /// latest one counts.
    Authentication(u8),
    /// A permission change: the subscriptions are re-keyed, the client is told nothing.
    /// Numbered like `Authentication`, so that an older answer never overrides a newer one.
    Refresh(u8),
}

/// A shard's request to resolve an Appwrite session for one of its connections.
#[derive(Debug)]
pub struct IdentityRequest {
    pub shard: usize,
    pub key: u32,
    pub serial: u32,
    pub purpose: ResolvePurpose,
    pub project: Arc<str>,
    pub session: SessionSecret,
}

/// Why a session did not resolve. The text is what the client gets.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ResolveError {
    /// The application said no (401 or 403): the session is not valid.
    #[error("Session is not valid.")]
    Denied,
    /// The resolver could not answer now (timeout, unreachable, a malformed answer, busy).
    /// What went wrong is logged, not told to the client.
    #[error("Session could not be verified now; try again later.")]
    Unavailable(String),
}

/// The identity a session resolved to, for the connection that asked.
#[derive(Debug)]
pub struct IdentityAnswer {
    pub key: u32,
    pub serial: u32,
    pub purpose: ResolvePurpose,
    pub project: Arc<str>,
    pub session: SessionSecret,
    /// When the answer was fetched (a cached one: when it was first fetched); a permission
    /// change of its user after this makes it stale.
    pub fetched: std::time::Instant,
    pub outcome: Result<Arc<Resolved>, ResolveError>,
}

/// What the control plane answers a shard's request with. Answers travel in their own queue,
/// served after live events and a few per loop iteration.
#[derive(Debug)]
pub enum Answer {
    Replay(ReplayAnswer),
    Identity(IdentityAnswer),
}

/// Why an answer could not be queued.
#[derive(Debug)]
pub enum AnswerRefused {
    /// The shard's answer queue is full: try again shortly.
    Full(Answer),
    /// The shard has stopped.
    Gone,
}

/// The control plane's end of a shard.
#[derive(Clone)]
pub struct ShardHandle {
    tx: Capped<Command>,
    answers: Capped<Answer>,
    waker: Arc<Waker>,
    signals: Arc<Signals>,
}

/// The shard's end of its queues. Dropping it (the shard thread ending, by return or panic)
/// marks the shard dead for [`ShardHandle::is_alive`].
pub struct ShardInbox {
    rx: Receiver<Command>,
    answers: Receiver<Answer>,
    signals: Arc<Signals>,
}

/// The sending end of a queue bounded by count whose memory follows what it holds.
/// crossbeam's `bounded(n)` allocates and initialises all n slots when it is made: the 65,536
/// event slots of every shard were megabytes of each process's memory, idle or not. Senders that
/// race past the check together may overshoot the capacity by one message each.
struct Capped<T> {
    tx: Sender<T>,
    capacity: usize,
}

impl<T> Clone for Capped<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            capacity: self.capacity,
        }
    }
}

impl<T> Capped<T> {
    fn channel(capacity: usize) -> (Self, Receiver<T>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (Self { tx, capacity }, rx)
    }

    fn try_send(&self, msg: T) -> Result<(), TrySendError<T>> {
        if self.tx.len() >= self.capacity {
            return Err(TrySendError::Full(msg));
        }
        self.tx.try_send(msg)
    }

    fn len(&self) -> usize {
        self.tx.len()
    }
}

/// Both ends of one shard's queues; `waker` wakes that shard's event loop.
pub fn shard_mailbox(waker: Waker) -> (ShardHandle, ShardInbox) {
    let (tx, rx) = Capped::channel(QUEUE_CAPACITY);
    let (answers_tx, answers) = Capped::channel(ANSWER_CAPACITY);
    let signals = Arc::new(Signals::default());
    signals.alive.store(true, Ordering::Release);
    let handle = ShardHandle {
        tx,
        answers: answers_tx,
        waker: Arc::new(waker),
        signals: signals.clone(),
    };
    let inbox = ShardInbox {
        rx,
        answers,
        signals,
    };
    (handle, inbox)
}

impl Drop for ShardInbox {
    fn drop(&mut self) {
        self.signals.alive.store(false, Ordering::Release);
    }
}

impl ShardHandle {
    /// Queues a command without blocking and wakes the shard; gives it back when the queue is
    /// full.
    pub fn try_send(&self, cmd: Command) -> Result<(), Command> {
        self.try_send_quiet(cmd)?;
        self.wake();
        Ok(())
    }

    /// Queues a command without waking the shard: for batches, followed by one [`Self::wake`].
    pub fn try_send_quiet(&self, cmd: Command) -> Result<(), Command> {
        self.tx
            .try_send(cmd)
            .map_err(|(TrySendError::Full(c) | TrySendError::Disconnected(c))| c)
    }

    /// Queues an answer and wakes the shard.
    pub fn try_send_answer(&self, answer: Answer) -> Result<(), AnswerRefused> {
        match self.answers.try_send(answer) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(TrySendError::Full(a)) => Err(AnswerRefused::Full(a)),
            Err(TrySendError::Disconnected(_)) => Err(AnswerRefused::Gone),
        }
    }

    /// Free slots in the inbound queue.
    pub fn room(&self) -> usize {
        QUEUE_CAPACITY.saturating_sub(self.tx.len())
    }

    /// Asks the shard to stop accepting, close every connection with 1001 and exit once they
    /// are gone or `drain` has passed. Never blocks, whatever its queues hold.
    pub fn request_shutdown(&self, drain: Duration) {
        let millis = u64::try_from(drain.as_millis()).unwrap_or(u64::MAX - 1);
        // Only the first request counts.
        let _ = self.signals.shutdown.compare_exchange(
            0,
            millis.saturating_add(1),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        // A pending wake may already have been consumed by a drain that did not see the flag.
        let _ = self.waker.wake();
    }

    /// True once a shutdown was requested (the shard is draining or gone).
    pub fn is_shutting_down(&self) -> bool {
        self.signals.shutdown.load(Ordering::Acquire) != 0
    }

    /// False once the shard thread has ended.
    pub fn is_alive(&self) -> bool {
        self.signals.alive.load(Ordering::Acquire)
    }

    /// Wakes the loop, at most once per batch: a wake already pending covers this send.
    pub fn wake(&self) {
        if !self.signals.wake_pending.swap(true, Ordering::AcqRel) {
            // A failed wake means the shard is gone; its queue is then drained by nobody.
            let _ = self.waker.wake();
        }
    }
}

impl ShardInbox {
    /// Called before draining: a send after this wakes the shard again.
    pub fn rearm(&self) {
        self.signals.wake_pending.store(false, Ordering::Release);
    }

    /// The drain time, once shutdown has been requested.
    pub fn shutdown_requested(&self) -> Option<Duration> {
        match self.signals.shutdown.load(Ordering::Acquire) {
            0 => None,
            n => Some(Duration::from_millis(n - 1)),
        }
    }

    pub fn try_command(&self) -> Option<Command> {
        self.rx.try_recv().ok()
    }

    /// Commands still queued.
    pub fn pending_commands(&self) -> usize {
        self.rx.len()
    }

    pub fn try_answer(&self) -> Option<Answer> {
        self.answers.try_recv().ok()
    }

    pub fn has_answers(&self) -> bool {
        !self.answers.is_empty()
    }
}

/// How the control plane wants to be told that replay requests are waiting.
pub trait Doorbell: Send + Sync {
    fn ring(&self);
}

/// The shards' end of a request channel (one per shard, all feeding one receiver).
pub struct RequestSender<T> {
    tx: Capped<T>,
    bell: Arc<dyn Doorbell>,
}

impl<T> Clone for RequestSender<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            bell: self.bell.clone(),
        }
    }
}

/// The control plane's end of a request channel.
pub struct RequestReceiver<T> {
    rx: Receiver<T>,
}

/// Where shards ask for replays, and where the replay thread takes them.
pub type ReplaySender = RequestSender<ReplayRequest>;
pub type ReplayReceiver = RequestReceiver<ReplayRequest>;
/// Where shards ask for sessions to be resolved, and where the resolver takes them.
pub type ResolveSender = RequestSender<IdentityRequest>;
pub type ResolveReceiver = RequestReceiver<IdentityRequest>;

/// A request channel holding at most `capacity` requests; `bell` is rung after every request.
pub fn request_channel<T>(
    bell: Arc<dyn Doorbell>,
    capacity: usize,
) -> (RequestSender<T>, RequestReceiver<T>) {
    let (tx, rx) = Capped::channel(capacity);
    (RequestSender { tx, bell }, RequestReceiver { rx })
}

/// The replay request channel (see [`request_channel`]).
pub fn replay_channel(bell: Arc<dyn Doorbell>, capacity: usize) -> (ReplaySender, ReplayReceiver) {
    request_channel(bell, capacity)
}

/// Why a request was not queued.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Refused {
    #[error("too many requests are waiting")]
    Busy,
    #[error("the control plane is gone")]
    Gone,
}

impl<T> std::fmt::Debug for RequestSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestSender")
            .field("queued", &self.tx.len())
            .finish()
    }
}

impl<T> RequestSender<T> {
    /// Queues a request without blocking; gives it back when it was not queued.
    pub fn send(&self, request: T) -> Result<(), (Refused, T)> {
        self.tx.try_send(request).map_err(|e| match e {
            TrySendError::Full(r) => (Refused::Busy, r),
            TrySendError::Disconnected(r) => (Refused::Gone, r),
        })?;
        self.bell.ring();
        Ok(())
    }
}

/// What [`RequestReceiver::try_recv`] found.
#[derive(Debug)]
pub enum Received<T> {
    Request(T),
    /// Nothing queued now: wait for the doorbell.
    Empty,
    /// Every shard has dropped its sender.
    Closed,
}

impl<T> RequestReceiver<T> {
    pub fn try_recv(&self) -> Received<T> {
        match self.rx.try_recv() {
            Ok(r) => Received::Request(r),
            Err(TryRecvError::Empty) => Received::Empty,
            Err(TryRecvError::Disconnected) => Received::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox() -> (ShardHandle, ShardInbox, mio::Poll) {
        let poll = mio::Poll::new().unwrap();
        let waker = Waker::new(poll.registry(), mio::Token(0)).unwrap();
        let (handle, inbox) = shard_mailbox(waker);
        (handle, inbox, poll)
    }

    #[test]
    fn shutdown_is_a_flag_that_a_full_queue_cannot_hold_back() {
        let (handle, inbox, _poll) = mailbox();
        let event = crate::event::EncodedEvent::encode(&crate::event::Event {
            id: "1-0".into(),
            project: "p".into(),
            channels: vec!["c".into()],
            events: vec![],
            roles: vec![],
            timestamp: "t".into(),
            payload: serde_json::json!({}),
        });
        while handle.try_send_quiet(Command::Event(event.clone())).is_ok() {}
        assert_eq!(handle.room(), 0);
        assert_eq!(inbox.shutdown_requested(), None);
        handle.request_shutdown(Duration::from_secs(3));
        handle.request_shutdown(Duration::from_secs(9));
        assert_eq!(inbox.shutdown_requested(), Some(Duration::from_secs(3)));
    }

    #[test]
    fn a_shard_whose_inbox_is_gone_is_not_alive() {
        let (handle, inbox, _poll) = mailbox();
        assert!(handle.is_alive());
        drop(inbox);
        assert!(!handle.is_alive());
    }
}
