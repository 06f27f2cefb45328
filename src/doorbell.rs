//! The control plane's end of the shards' request channels: a doorbell a shard rings after
//! queuing a request, and the wait for the next request.
//!
//! Owns waking a tokio task from a shard thread without a lock or a runtime on the shard side
//! (the shard only calls [`Doorbell::ring`]), and the thread and runtime such a task runs on,
//! which gives its memory back once its work stops. Must not know what the requests are: the
//! replay thread and the session resolver both take theirs through it.

use std::future::Future;

use tokio::sync::Notify;

use crate::mailbox::{Doorbell, Received, RequestReceiver};
use crate::memory::AfterWork;

/// Wakes the task waiting in [`next_request`]. A ring while nobody waits is kept (one permit),
/// so a request is never left unseen.
#[derive(Debug, Default)]
pub struct Bell(Notify);

impl Doorbell for Bell {
    fn ring(&self) {
        self.0.notify_one();
    }
}

/// Runs `serve` (a loop over [`next_request`]) on a thread named `name` with a runtime of its
/// own, so that its work never waits behind the rest of the control plane.
pub fn serve_on_own_thread(
    name: &str,
    serve: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            runtime.block_on(async {
                tokio::spawn(give_back_when_quiet());
                serve.await;
            });
        })?;
    Ok(())
}

/// Runs for good on a control-plane thread: once a second, gives the memory that thread's work
/// freed back to the system after the work stops ([`AfterWork`]; work is what
/// [`crate::memory::note_work`] marks on that thread).
pub async fn give_back_when_quiet() {
    let mut after_work = AfterWork::default();
    let mut period = tokio::time::interval(std::time::Duration::from_secs(1));
    period.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        period.tick().await;
        if after_work.period(crate::memory::take_work()) {
            crate::memory::give_back();
        }
    }
}

/// The next request, waiting for the bell while none is queued; `None` once every shard has
/// dropped its sender.
pub async fn next_request<T>(requests: &RequestReceiver<T>, bell: &Bell) -> Option<T> {
    loop {
        match requests.try_recv() {
            Received::Request(r) => {
                crate::memory::note_work();
                return Some(r);
            }
            Received::Empty => bell.0.notified().await,
            Received::Closed => return None,
        }
    }
}
