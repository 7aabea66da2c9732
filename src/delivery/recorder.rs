//! Group commit for delivery outcomes: reports from concurrent deliveries
//! are recorded in one store transaction, and each delivery learns its own
//! result. If a group fails, its reports are recorded one by one so one bad
//! report cannot fail its neighbours. Each recorded group wakes this
//! process's webhook dispatcher, so that the webhooks its events are due
//! for go out now rather than at the dispatcher's next poll.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, Mutex, Notify};

use crate::store::{DeliveryReport, RecordResult, Store, StoreError, StoreResult};

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
    /// dropped); `webhooks_due` is notified after each recorded group.
    pub fn start(store: Arc<dyn Store>, writers: usize, webhooks_due: Arc<Notify>) -> Recorder {
        let (tx, rx) = mpsc::channel(4096);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..writers.max(1) {
            tokio::spawn(writer(store.clone(), rx.clone(), webhooks_due.clone()));
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

async fn writer(
    store: Arc<dyn Store>,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    webhooks_due: Arc<Notify>,
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
        match store.record_many(&reports).await {
            Ok(results) => {
                webhooks_due.notify_one();
                for (done, result) in waiting.into_iter().zip(results) {
                    let _ = done.send(Ok(result));
                }
            }
            Err(_) if reports.len() > 1 => {
                for (report, done) in reports.iter().zip(waiting) {
                    let result = store
                        .record_many(std::slice::from_ref(report))
                        .await
                        .and_then(|mut r| {
                            r.pop()
                                .ok_or_else(|| StoreError::Corrupt("no result".into()))
                        });
                    let _ = done.send(result);
                }
                webhooks_due.notify_one();
            }
            Err(e) => {
                if let Some(done) = waiting.into_iter().next() {
                    let _ = done.send(Err(e));
                }
            }
        }
    }
}
