//! Group acknowledgement: deliveries that finish together acknowledge their
//! queue jobs in one queue round trip instead of one each. An ack that is
//! lost (a crash before it is sent) only means the id is received again
//! later, and the claim filters it: the store, not the queue, says what is
//! done.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::queue::{Job, Queue};

/// Most jobs acknowledged in one round trip.
const MAX_GROUP: usize = 512;

#[derive(Clone)]
pub struct Acks {
    tx: mpsc::UnboundedSender<Job>,
}

impl Acks {
    /// Starts the acknowledging loop; it ends (after sending what it holds)
    /// when every clone of the returned `Acks` is dropped.
    pub fn start(queue: Arc<dyn Queue>) -> (Acks, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Acks { tx }, tokio::spawn(run(queue, rx)))
    }

    pub fn ack(&self, job: Job) {
        // The loop only stops once every sender is gone.
        let _ = self.tx.send(job);
    }
}

async fn run(queue: Arc<dyn Queue>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut group = Vec::with_capacity(64);
    while rx.recv_many(&mut group, MAX_GROUP).await > 0 {
        if let Err(e) = queue.ack(&group).await {
            tracing::debug!(error = %e, jobs = group.len(), "ack failed; the ids will be received again and filtered");
        }
        group.clear();
    }
}
