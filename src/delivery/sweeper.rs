//! The sweeper makes "the database is the truth" hold: it expires what is
//! overdue and re-enqueues every message that is due but was not claimed
//! within the grace period (its enqueue was lost, Redis was flushed, or a
//! worker died holding it). At start-up it also rebuilds a volatile queue.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::domain::now_ms;
use crate::queue::Queue;
use crate::store::Store;

pub struct Sweeper {
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn Queue>,
    pub interval: Duration,
    pub grace: Duration,
}

impl Sweeper {
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = shutdown.cancelled() => break,
            }
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "sweep failed");
            }
        }
    }

    pub async fn pass(&self) -> anyhow::Result<()> {
        let now = now_ms();
        let expired = self.store.expire_overdue(now, 500).await?;
        if expired > 0 {
            tracing::info!(expired, "expired overdue recipients");
        }
        let lost = self
            .store
            .sweep(now, self.grace.as_millis() as i64, 2000)
            .await?;
        if !lost.is_empty() {
            tracing::info!(
                count = lost.len(),
                "re-enqueueing due messages the queue lost"
            );
            let items: Vec<_> = lost.into_iter().map(|(id, lane, _)| (id, lane)).collect();
            self.queue.enqueue(&items).await?;
        }
        Ok(())
    }
}

/// Refills a volatile (in-process) queue from the store after a restart:
/// releases the dead process's leases and schedules every message that is
/// not final at its due time.
pub async fn rebuild_queue(store: &dyn Store, queue: &dyn Queue) -> anyhow::Result<usize> {
    let released = store.release_leases().await?;
    if released > 0 {
        tracing::info!(released, "released leases left by the previous run");
    }
    let mut after = String::new();
    let mut total = 0;
    loop {
        let page = store.pending(now_ms(), 1000, &after).await?;
        let Some(last) = page.last() else { break };
        after = last.0.clone();
        total += page.len();
        for (id, lane, due) in page {
            queue.schedule(&id, lane, due).await?;
        }
    }
    Ok(total)
}
