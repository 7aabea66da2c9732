//! Group commit for delivery outcomes: reports from concurrent deliveries
//! are recorded in one store transaction, and each delivery learns its own
//! result. If a group fails, its reports are recorded one by one so one bad
//! report cannot fail its neighbours. The webhook deliveries a group's
//! events make are handed to this process's dispatcher as they are written
//! (those it has a free request slot for are written leased to it and
//! posted once the group commits); for any it could not take, the
//! dispatcher is woken to claim them now rather than at its next poll.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::store::{DeliveryReport, Handing, RecordResult, Store, StoreError, StoreResult};
use crate::webhooks::{Dispatcher, Ticket};

const MAX_GROUP: usize = 128;
/// How long a group stays open for more outcomes after its first: the
/// deliveries of one claimed batch end within a few milliseconds of each
/// other, and one outcome transaction (about ten statements) for all of
/// them costs the store a fraction of one per delivery.
const LINGER: Duration = Duration::from_millis(2);

struct Job {
    report: DeliveryReport,
    done: oneshot::Sender<StoreResult<RecordResult>>,
}

#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Job>,
}

impl Recorder {
    /// Starts `writers` recording loops (they end when every clone is
    /// dropped), handing webhook deliveries to `webhooks`.
    pub fn start(store: Arc<dyn Store>, writers: usize, webhooks: Arc<Dispatcher>) -> Recorder {
        let (tx, rx) = mpsc::channel(4096);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..writers.max(1) {
            tokio::spawn(writer(store.clone(), rx.clone(), webhooks.clone()));
        }
        Recorder { tx }
    }

    pub async fn record(&self, report: DeliveryReport) -> StoreResult<RecordResult> {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Job { report, done }).await.is_err() {
            return Err(StoreError::Corrupt("recorder stopped".into()));
        }
        wait.await
            .unwrap_or_else(|_| Err(StoreError::Corrupt("recorder stopped".into())))
    }
}

/// Records `reports` in one transaction, handing their webhook deliveries
/// to `webhooks` (see the module's doc).
async fn record_handing(
    store: &dyn Store,
    reports: &[DeliveryReport],
    webhooks: &Arc<Dispatcher>,
) -> StoreResult<Vec<RecordResult>> {
    let mut tickets: Vec<Ticket> = Vec::new();
    let mut take = |endpoint: &str| match webhooks.try_take(endpoint) {
        Some(ticket) => {
            tickets.push(ticket);
            true
        }
        None => false,
    };
    let mut handing = Handing::new(webhooks.lease_until(), &mut take);
    let recorded = store.record_many(reports, Some(&mut handing)).await;
    let Handing { jobs, left, .. } = handing;
    if recorded.is_ok() {
        if left > 0 {
            webhooks.wake();
        }
        webhooks.hand_over(jobs, tickets);
    }
    // Not recorded: the tickets go back as they are dropped.
    recorded
}

async fn writer(
    store: Arc<dyn Store>,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    webhooks: Arc<Dispatcher>,
) {
    loop {
        let group = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else { return };
            let mut group = vec![first];
            let deadline = tokio::time::Instant::now() + LINGER;
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => group.push(job),
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) => {
                        match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(Some(job)) => group.push(job),
                            _ => break,
                        }
                    }
                }
            }
            group
        };
        // Move the reports out of their jobs rather than copying them.
        let (reports, waiting): (Vec<DeliveryReport>, Vec<_>) =
            group.into_iter().map(|j| (j.report, j.done)).unzip();
        match record_handing(store.as_ref(), &reports, &webhooks).await {
            Ok(results) => {
                for (done, result) in waiting.into_iter().zip(results) {
                    let _ = done.send(Ok(result));
                }
            }
            Err(_) if reports.len() > 1 => {
                for (report, done) in reports.iter().zip(waiting) {
                    let result =
                        record_handing(store.as_ref(), std::slice::from_ref(report), &webhooks)
                            .await
                            .and_then(|mut r| {
                                r.pop()
                                    .ok_or_else(|| StoreError::Corrupt("no result".into()))
                            });
                    let _ = done.send(result);
                }
            }
            Err(e) => {
                if let Some(done) = waiting.into_iter().next() {
                    let _ = done.send(Err(e));
                }
            }
        }
    }
}
