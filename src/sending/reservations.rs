//! Idempotency keys reserved in groups: concurrent keyed sends reserve their
//! keys in one store statement, as accepts commit in groups, instead of one
//! transaction each. Every caller still learns its own answer (reserved,
//! replay, mismatch or in flight) before it renders anything. The channel is
//! bounded: when the store cannot keep up, new keyed sends get a 503.

use std::sync::Arc;

use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use super::gather::{Gather, Limits};
use crate::domain::now_ms;
use crate::store::{IdemBegin, IdemRequest, Store, StoreError};

/// Most keys reserved in one statement.
const MAX_GROUP: usize = 64;
/// Requests waiting for a reservation before new ones are turned away.
const BACKLOG: usize = 4096;

struct Job {
    req: IdemRequest,
    done: oneshot::Sender<Result<IdemBegin, StoreError>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    #[error("too many idempotency keys waiting for the store")]
    Busy,
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone)]
pub struct Reserver {
    jobs: Gather<Job>,
}

impl Reserver {
    /// Starts `writers` reservation loops; they end when every `Reserver`
    /// clone is dropped and the backlog is drained. Keys live `ttl_ms`.
    pub fn start(
        store: Arc<dyn Store>,
        ttl_ms: i64,
        writers: usize,
        tracker: &TaskTracker,
    ) -> Reserver {
        let limits = Limits {
            backlog: BACKLOG,
            max_group: MAX_GROUP,
            weight: |_: &Job| 1,
        };
        let jobs = Gather::start(limits, writers, tracker, move |group| {
            reserve_group(store.clone(), ttl_ms, group)
        });
        Reserver { jobs }
    }

    pub async fn begin(&self, req: IdemRequest) -> Result<IdemBegin, ReserveError> {
        self.jobs
            .ask(|done| Job { req, done })
            .await
            .map_err(|_| ReserveError::Busy)?
            .map_err(ReserveError::Store)
    }
}

async fn reserve_group(store: Arc<dyn Store>, ttl_ms: i64, group: Vec<Job>) {
    let reqs: Vec<IdemRequest> = group.iter().map(|job| job.req.clone()).collect();
    let now = now_ms();
    match store.idem_begin_many(&reqs, now, ttl_ms).await {
        Ok(answers) if answers.len() == group.len() => {
            for (job, answer) in group.into_iter().zip(answers) {
                let _ = job.done.send(Ok(answer));
            }
        }
        _ => {
            // One failure must not decide its neighbours: one by one.
            for job in group {
                let answer = store.idem_begin(&job.req, now, ttl_ms).await;
                let _ = job.done.send(answer);
            }
        }
    }
}
