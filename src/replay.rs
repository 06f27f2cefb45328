//! Serving resumes: shards ask, the bus answers, the shard delivers.
//!
//! Owns the control-plane side of a resume: it takes replay requests from shards (never blocking
//! them), fetches the history from the bus with bounded concurrency on its own thread and
//! runtime (so a resume storm never slows publishing or the stream reader), skips requests whose
//! connection is gone, and hands the answer back to the right shard. It must not touch
//! connections; the shard matches the answer to its connection by key and serial.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::bus::Bus;
use crate::doorbell::{Bell, next_request};
use crate::hub::Hub;
use crate::mailbox::{
    Answer, AnswerRefused, ReplayAnswer, ReplayError, ReplayReceiver, ReplayRequest,
};
use crate::metrics::Metrics;

/// History fetches in flight at once: enough to serve a mass reconnect quickly without
/// flooding Redis.
const CONCURRENCY: usize = 64;
/// Pause before offering an answer again to a shard whose answer queue is full.
const RETRY: Duration = Duration::from_millis(2);

/// Wakes [`serve`] when a shard queued a replay request.
pub type ReplayBell = Bell;

/// Runs until every shard has dropped its sender.
pub async fn serve(
    requests: ReplayReceiver,
    bell: Arc<ReplayBell>,
    bus: Arc<dyn Bus>,
    hub: Arc<Hub>,
    metrics: Metrics,
) {
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    while let Some(req) = next_request(&requests, &bell).await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        if req.cancellation.is_cancelled() {
            metrics.replays.with_label_values(&["cancelled"]).inc();
            continue;
        }
        let (bus, hub, metrics) = (bus.clone(), hub.clone(), metrics.clone());
        tokio::spawn(async move {
            answer(req, &*bus, &hub, &metrics).await;
            drop(permit);
        });
    }
}

/// Runs [`serve`] on a thread of its own with its own runtime.
pub fn spawn(
    requests: ReplayReceiver,
    bell: Arc<ReplayBell>,
    bus: Arc<dyn Bus>,
    hub: Arc<Hub>,
    metrics: Metrics,
) -> std::io::Result<()> {
    crate::doorbell::serve_on_own_thread("herald-replay", serve(requests, bell, bus, hub, metrics))
}

async fn answer(req: ReplayRequest, bus: &dyn Bus, hub: &Hub, metrics: &Metrics) {
    if req.cancellation.is_cancelled() {
        metrics.replays.with_label_values(&["cancelled"]).inc();
        return;
    }
    let outcome = bus.replay(req.query).await;
    let label = match &outcome {
        Ok(_) => "ok",
        Err(ReplayError::Truncated(_)) => "truncated",
        Err(ReplayError::Ahead(_)) => "ahead",
        Err(ReplayError::Unavailable(_)) => "unavailable",
    };
    metrics.replays.with_label_values(&[label]).inc();
    let mut answer = Answer::Replay(ReplayAnswer {
        key: req.key,
        serial: req.serial,
        outcome,
    });
    // A full answer queue is the shard pacing replays behind live traffic: wait, never drop
    // (the connection would wait forever for its history).
    loop {
        match hub.send_answer(req.shard, answer) {
            Ok(()) | Err(AnswerRefused::Gone) => break,
            Err(AnswerRefused::Full(back)) => {
                answer = back;
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}
