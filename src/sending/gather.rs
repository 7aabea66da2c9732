//! Concurrent requests gathered into groups, so that each group costs the
//! store one round trip: a bounded channel (when it is full the caller is
//! turned away, to answer 503, rather than piling up in memory) and writer
//! loops that each take whatever is waiting, up to a limit, and hand it to
//! one function. Group commit of accepts and of idempotency reservations.
//!
//! A writer that finds the channel empty before its group is full yields
//! to the runtime a few times first ([`LINGER_YIELDS`]): requests being
//! prepared on the same threads get to join the group instead of starting
//! the next one. Under load that makes groups larger (fewer transactions
//! per message); when nothing else is runnable a yield returns at once, so
//! a lone request does not wait for a timer.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_util::task::TaskTracker;

/// How many times a writer yields to the runtime for more jobs before it
/// hands over a group that is not full (docs/performance.md, 2026-12-05:
/// the every-feature closed loop +11% accepts/s, accepting alone −17% of
/// Postgres's CPU per message; at 1,000/s no added latency, cold starts
/// alike).
const LINGER_YIELDS: usize = 4;

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

    fn send(&self, job: J) -> Result<(), Full> {
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
    let mut yields = 0;
    while held < max {
        match rx.try_recv() {
            Ok(job) => {
                held += weight(&job);
                group.push(job);
            }
            Err(TryRecvError::Empty) if yields < LINGER_YIELDS => {
                yields += 1;
                tokio::task::yield_now().await;
            }
            Err(_) => break,
        }
    }
    Some(group)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job sent by a task that becomes runnable while a writer holds a
    /// one-job group joins that group.
    #[tokio::test]
    async fn a_writer_lingers_for_jobs_about_to_arrive() {
        let groups = Arc::new(std::sync::Mutex::new(Vec::new()));
        let tracker = TaskTracker::new();
        let seen = groups.clone();
        let limits = Limits {
            backlog: 8,
            max_group: 8,
            weight: |_: &u32| 1,
        };
        let gather = Gather::start(limits, 1, &tracker, move |group: Vec<u32>| {
            let seen = seen.clone();
            async move { seen.lock().unwrap().push(group) }
        });
        gather.send(1).unwrap();
        let late = gather.clone();
        tokio::spawn(async move { late.send(2).unwrap() });
        drop(gather);
        tracker.close();
        tracker.wait().await;
        assert_eq!(*groups.lock().unwrap(), vec![vec![1, 2]]);
    }
}
