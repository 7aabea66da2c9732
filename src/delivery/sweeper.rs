//! The sweeper makes "the database is the truth" hold: it expires what is
//! overdue and re-enqueues every message that is due but was not claimed
//! within the grace period (its enqueue was lost, Redis was flushed, or a
//! worker died holding it). At start-up it also rebuilds a volatile queue.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::domain::{now_ms, Millis};
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
        let before = unclaimed_before(now, self.grace, self.queue.oldest_waiting().await?);
        let lost = self.store.sweep(now, before, 2000).await?;
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

/// How much earlier than the queue's oldest waiting entry a message must
/// have been enqueued to count as lost: covers the time between a commit and
/// its enqueue, and a Redis clock a little ahead of ours.
const QUEUE_SLACK_MS: Millis = 1_000;

/// The latest enqueue (and due) time of a message the queue can be judged
/// to have lost: unclaimed for `grace`, and, while a backlog waits, older
/// than everything still waiting in it (those were received, so one still
/// unclaimed was lost; a younger one may only be waiting its turn, and
/// enqueueing it again would only add a duplicate for the claim to drop).
pub fn unclaimed_before(now: Millis, grace: Duration, oldest_waiting: Option<Millis>) -> Millis {
    let by_grace = now - grace.as_millis() as Millis;
    match oldest_waiting {
        Some(oldest) => by_grace.min(oldest - QUEUE_SLACK_MS),
        None => by_grace,
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

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(30);

    #[test]
    fn without_a_backlog_the_grace_decides() {
        assert_eq!(unclaimed_before(100_000, GRACE, None), 70_000);
        // A short backlog (its oldest entry within the grace): same.
        assert_eq!(unclaimed_before(100_000, GRACE, Some(95_000)), 70_000);
    }

    #[test]
    fn a_backlog_longer_than_the_grace_is_not_enqueued_again() {
        // The oldest entry still waiting was made ready 50 s ago: only what
        // was enqueued before it (less the slack) can have been lost.
        assert_eq!(unclaimed_before(100_000, GRACE, Some(50_000)), 49_000);
    }
}
