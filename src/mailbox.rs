//! The mailbox: every message that crosses between the control plane and the shards.
//!
//! Owns the message types ([`Command`], [`ReplayRequest`], [`ReplayAnswer`] and the replay
//! query and error they carry), both ends of a shard's queues ([`ShardHandle`] for the control
//! plane, [`ShardInbox`] for the shard), the channel shards ask for replays on
//! ([`ReplaySender`]), and the queue capacities. It depends on nothing in the crate but
//! [`event`](crate::event), so the data plane and the control plane both import it and neither
//! imports the other. It uses no tokio: the shard side is crossbeam channels plus a mio waker,
//! and the control plane is woken through a [`Doorbell`] it supplies itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use mio::Waker;
use thiserror::Error;

use crate::event::{EncodedEvent, EventId};

/// Inbound queue capacity per shard, in events.
pub const QUEUE_CAPACITY: usize = 65_536;
/// Replay answers waiting per shard; the control plane holds the rest back.
pub const ANSWER_CAPACITY: usize = 1024;

/// What the control plane sends a shard.
#[derive(Debug)]
pub enum Command {
    Event(Arc<EncodedEvent>),
    /// Stop accepting, close every connection with 1001, exit once drained or at the deadline.
    Shutdown {
        drain: Duration,
    },
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
    pub channels: Vec<String>,
    pub roles: Vec<Box<str>>,
    pub max_events: usize,
    pub max_bytes: usize,
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
}

/// The history a resuming connection asked for. Answers travel in their own queue, served after
/// live events and a few per loop iteration, so a mass reconnect never delays live delivery.
#[derive(Debug)]
pub struct ReplayAnswer {
    pub key: u32,
    pub serial: u32,
    pub outcome: Result<Vec<Arc<EncodedEvent>>, ReplayError>,
}

/// Why a replay answer could not be queued.
#[derive(Debug)]
pub enum AnswerRefused {
    /// The shard's answer queue is full: try again shortly.
    Full(ReplayAnswer),
    /// The shard has stopped.
    Gone,
}

/// The control plane's end of a shard.
#[derive(Clone)]
pub struct ShardHandle {
    tx: Sender<Command>,
    answers: Sender<ReplayAnswer>,
    waker: Arc<Waker>,
    wake_pending: Arc<AtomicBool>,
}

/// The shard's end of its queues.
pub struct ShardInbox {
    rx: Receiver<Command>,
    answers: Receiver<ReplayAnswer>,
    wake_pending: Arc<AtomicBool>,
}

/// Both ends of one shard's queues; `waker` wakes that shard's event loop.
pub fn shard_mailbox(waker: Waker) -> (ShardHandle, ShardInbox) {
    let (tx, rx) = crossbeam_channel::bounded(QUEUE_CAPACITY);
    let (answers_tx, answers) = crossbeam_channel::bounded(ANSWER_CAPACITY);
    let wake_pending = Arc::new(AtomicBool::new(false));
    let handle = ShardHandle {
        tx,
        answers: answers_tx,
        waker: Arc::new(waker),
        wake_pending: wake_pending.clone(),
    };
    let inbox = ShardInbox {
        rx,
        answers,
        wake_pending,
    };
    (handle, inbox)
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

    /// Queues a replay answer and wakes the shard.
    pub fn try_send_answer(&self, answer: ReplayAnswer) -> Result<(), AnswerRefused> {
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

    /// Wakes the loop, at most once per batch: a wake already pending covers this send.
    pub fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            // A failed wake means the shard is gone; its queue is then drained by nobody.
            let _ = self.waker.wake();
        }
    }
}

impl ShardInbox {
    /// Called before draining: a send after this wakes the shard again.
    pub fn rearm(&self) {
        self.wake_pending.store(false, Ordering::Release);
    }

    pub fn try_command(&self) -> Option<Command> {
        self.rx.try_recv().ok()
    }

    /// Commands still queued.
    pub fn pending_commands(&self) -> usize {
        self.rx.len()
    }

    pub fn try_answer(&self) -> Option<ReplayAnswer> {
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

/// The shards' end of the replay request channel (one per shard, all feeding one receiver).
#[derive(Clone)]
pub struct ReplaySender {
    tx: Sender<ReplayRequest>,
    bell: Arc<dyn Doorbell>,
}

/// The control plane's end of the replay request channel.
pub struct ReplayReceiver {
    rx: Receiver<ReplayRequest>,
}

/// The replay request channel; `bell` is rung after every request.
pub fn replay_channel(bell: Arc<dyn Doorbell>) -> (ReplaySender, ReplayReceiver) {
    let (tx, rx) = crossbeam_channel::unbounded();
    (ReplaySender { tx, bell }, ReplayReceiver { rx })
}

/// The control plane has stopped taking replay requests.
#[derive(Debug, Error)]
#[error("the control plane is gone")]
pub struct ControlPlaneGone;

impl ReplaySender {
    /// Queues a request without blocking.
    pub fn send(&self, request: ReplayRequest) -> Result<(), ControlPlaneGone> {
        self.tx.send(request).map_err(|_| ControlPlaneGone)?;
        self.bell.ring();
        Ok(())
    }
}

/// What [`ReplayReceiver::try_recv`] found.
#[derive(Debug)]
pub enum Received {
    Request(ReplayRequest),
    /// Nothing queued now: wait for the doorbell.
    Empty,
    /// Every shard has dropped its sender.
    Closed,
}

impl ReplayReceiver {
    pub fn try_recv(&self) -> Received {
        match self.rx.try_recv() {
            Ok(r) => Received::Request(r),
            Err(TryRecvError::Empty) => Received::Empty,
            Err(TryRecvError::Disconnected) => Received::Closed,
        }
    }
}
