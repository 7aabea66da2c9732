//! Group commit: concurrent accepts are gathered into one store transaction
//! (one fsync for many messages), and every caller still gets its 202 only
//! after its own message is committed. The channel is bounded: when the
//! store cannot keep up, new sends get a 503 with Retry-After instead of
//! piling up in memory. After a group commits, its ids go to the queue in
//! one call (a lost enqueue is repaired by the sweeper).

use std::sync::Arc;

use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use super::gather::{Gather, Limits};
use crate::domain::now_ms;
use crate::queue::Queue;
use crate::store::{NewMessage, Store, StoreError};

/// Most messages committed in one transaction.
const MAX_GROUP: usize = 256;
/// Requests waiting for a commit before new ones are turned away.
const BACKLOG: usize = 4096;

struct Job {
    messages: Vec<NewMessage>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("too many accepts waiting for the store")]
    Busy,
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone)]
pub struct Committer {
    jobs: Gather<Job>,
}

impl Committer {
    /// Starts `writers` commit loops; they end when every `Committer` clone
    /// is dropped and the backlog is drained.
    pub fn start(
        store: Arc<dyn Store>,
        queue: Arc<dyn Queue>,
        writers: usize,
        tracker: &TaskTracker,
    ) -> Committer {
        let limits = Limits {
            backlog: BACKLOG,
            max_group: MAX_GROUP,
            weight: |job: &Job| job.messages.len(),
        };
        let jobs = Gather::start(limits, writers, tracker, move |group| {
            commit_group(store.clone(), queue.clone(), group)
        });
        Committer { jobs }
    }

    pub async fn commit(&self, messages: Vec<NewMessage>) -> Result<(), CommitError> {
        self.jobs
            .ask(|done| Job { messages, done })
            .await
            .map_err(|_| CommitError::Busy)?
            .map_err(CommitError::Store)
    }
}

async fn commit_group(store: Arc<dyn Store>, queue: Arc<dyn Queue>, group: Vec<Job>) {
    // Move the messages out of their jobs (MIME bodies are not copied),
    // remembering which range belongs to which caller.
    let mut all: Vec<NewMessage> = Vec::new();
    let mut callers = Vec::with_capacity(group.len());
    for job in group {
        let start = all.len();
        all.extend(job.messages);
        callers.push((start..all.len(), job.done));
    }
    match store.accept(&all, now_ms()).await {
        Ok(()) => {
            for (_, done) in callers {
                let _ = done.send(Ok(()));
            }
            enqueue(queue.as_ref(), &all).await;
        }
        Err(e @ StoreError::Unavailable(_)) if callers.len() == 1 => {
            let _ = callers
                .into_iter()
                .next()
                .map(|(_, done)| done.send(Err(e)));
        }
        Err(e) => {
            // One bad request must not fail its neighbours: commit alone.
            tracing::debug!(error = %e, size = callers.len(), "group commit failed; committing one by one");
            for (range, done) in callers {
                let mine = &all[range];
                let result = store.accept(mine, now_ms()).await;
                let accepted = result.is_ok();
                let _ = done.send(result);
                if accepted {
                    enqueue(queue.as_ref(), mine).await;
                }
            }
        }
    }
}

/// Hands committed messages to the queue: due ones in one call, scheduled
/// ones at their time. Failures are left to the sweeper.
async fn enqueue(queue: &dyn Queue, messages: &[NewMessage]) {
    let now: Vec<_> = messages
        .iter()
        .filter(|m| m.send_at.is_none())
        .map(|m| (m.id.clone(), m.priority))
        .collect();
    if let Err(e) = queue.enqueue(&now).await {
        tracing::warn!(error = %e, count = now.len(), "enqueue failed after commit; the sweeper will repair it");
    }
    for m in messages {
        if let Some(at) = m.send_at {
            if let Err(e) = queue.schedule(&m.id, m.priority, at).await {
                tracing::warn!(error = %e, "schedule failed after commit; the sweeper will repair it");
            }
        }
    }
}
