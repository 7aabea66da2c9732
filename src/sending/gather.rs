//! Concurrent requests gathered into groups, so that each group costs the
//! store one round trip: a bounded channel (when it is full the caller is
//! turned away, to answer 503, rather than piling up in memory) and writer
//! loops that each take whatever is waiting, up to a limit, and hand it to
//! one function. Group commit of accepts and of idempotency reservations.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_util::task::TaskTracker;

/// How many jobs may wait, and how much one group may hold.
pub struct Limits<J> {
    pub backlog: usize,
    pub max_group: usize,
    /// A job's share of `max_group` (an accept counts its messages).
    pub weight: fn(&J) -> usize,
}

/// The sending side; writers end when every clone is dropped and the
/// backlog is drained.
pub struct Gather<J> {
    tx: mpsc::Sender<J>,
}

impl<J> Clone for Gather<J> {
    fn clone(&self) -> Self {
        Gather {
            tx: self.tx.clone(),
        }
    }
}

/// The channel was full (or its writers are gone).
#[derive(Debug)]
pub struct Full;

impl<J: Send + 'static> Gather<J> {
    /// Starts `writers` loops, each handing groups to `handle`.
    pub fn start<F, Fut>(
        limits: Limits<J>,
        writers: usize,
        tracker: &TaskTracker,
        handle: F,
    ) -> Gather<J>
    where
        F: Fn(Vec<J>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(limits.backlog);
        let rx = Arc::new(Mutex::new(rx));
        let (max_group, weight) = (limits.max_group, limits.weight);
        for _ in 0..writers.max(1) {
            let (rx, handle) = (rx.clone(), handle.clone());
            tracker.spawn(async move {
                while let Some(group) = next_group(&rx, max_group, weight).await {
                    handle(group).await;
                }
            });
        }
        Gather { tx }
    }

    pub fn send(&self, job: J) -> Result<(), Full> {
        self.tx.try_send(job).map_err(|_| Full)
    }

    /// Sends the job `make` builds around a reply channel and waits for its
    /// reply; [`Full`] if the channel was full or the job was dropped
    /// unanswered (its writers gone).
    pub async fn ask<R>(&self, make: impl FnOnce(oneshot::Sender<R>) -> J) -> Result<R, Full> {
        let (done, wait) = oneshot::channel();
        self.send(make(done))?;
        wait.await.map_err(|_| Full)
    }
}

/// What is waiting now (at least one job), up to `max` by weight.
async fn next_group<J>(
    rx: &Mutex<mpsc::Receiver<J>>,
    max: usize,
    weight: fn(&J) -> usize,
) -> Option<Vec<J>> {
    let mut rx = rx.lock().await;
    let first = rx.recv().await?;
    let mut held = weight(&first);
    let mut group = vec![first];
    while held < max {
        match rx.try_recv() {
            Ok(job) => {
                held += weight(&job);
                group.push(job);
            }
            Err(_) => break,
        }
    }
    Some(group)
}
