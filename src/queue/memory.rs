//! In-process queue for the embedded default: three lanes, a delayed heap,
//! de-duplication of ids that are already waiting. Forgets everything on
//! restart; the app rebuilds it from the store.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{lane_order, Job, Queue, QueueDepth, QueueError};
use crate::domain::{now_ms, Millis, Priority};

#[derive(Default)]
struct Inner {
    /// Ready ids with the time each was made ready, oldest first.
    lanes: [VecDeque<(String, Millis)>; 3],
    ready: HashSet<String>,
    delayed: BinaryHeap<Reverse<(Millis, String, u8)>>,
    tick: u64,
}

fn lane_index(p: Priority) -> usize {
    match p {
        Priority::High => 0,
        Priority::Normal => 1,
        Priority::Bulk => 2,
    }
}

impl Inner {
    fn push(&mut self, id: &str, lane: Priority, now: Millis) {
        if self.ready.insert(id.to_string()) {
            self.lanes[lane_index(lane)].push_back((id.to_string(), now));
        }
    }

    fn promote(&mut self, now: Millis) {
        while let Some(Reverse((at, _, _))) = self.delayed.peek() {
            if *at > now {
                break;
            }
            if let Some(Reverse((_, id, lane))) = self.delayed.pop() {
                self.push(&id, Priority::ALL[lane as usize], now);
            }
        }
    }

    fn take(&mut self, max: usize) -> Vec<Job> {
        let order = lane_order(self.tick);
        self.tick += 1;
        let mut jobs = Vec::new();
        for lane in order {
            while jobs.len() < max {
                let Some((id, _)) = self.lanes[lane_index(lane)].pop_front() else {
                    break;
                };
                self.ready.remove(&id);
                jobs.push(Job {
                    id,
                    lane,
                    token: String::new(),
                });
            }
        }
        jobs
    }
}

#[derive(Default)]
pub struct MemoryQueue {
    inner: Mutex<Inner>,
    notify: Notify,
}

impl MemoryQueue {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn enqueue(&self, items: &[(String, Priority)]) -> Result<(), QueueError> {
        {
            let now = now_ms();
            let mut inner = self.lock();
            for (id, lane) in items {
                inner.push(id, *lane, now);
            }
        }
        self.notify.notify_waiters();
        Ok(())
    }

    async fn schedule(&self, id: &str, lane: Priority, at: Millis) -> Result<(), QueueError> {
        if at <= now_ms() {
            return self.enqueue(&[(id.to_string(), lane)]).await;
        }
        self.lock()
            .delayed
            .push(Reverse((at, id.to_string(), lane_index(lane) as u8)));
        self.notify.notify_waiters();
        Ok(())
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Job>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.notify.notified();
            let next_due = {
                let mut inner = self.lock();
                inner.promote(now_ms());
                let jobs = inner.take(max);
                if !jobs.is_empty() {
                    return Ok(jobs);
                }
                inner.delayed.peek().map(|Reverse((at, _, _))| *at)
            };
            let mut until = deadline;
            if let Some(at) = next_due {
                let in_ms = (at - now_ms()).max(1) as u64;
                until = until.min(tokio::time::Instant::now() + Duration::from_millis(in_ms));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn ack(&self, _jobs: &[Job]) -> Result<(), QueueError> {
        Ok(())
    }

    async fn depth(&self) -> Result<QueueDepth, QueueError> {
        let inner = self.lock();
        Ok(QueueDepth {
            ready: Priority::ALL
                .iter()
                .map(|p| (*p, inner.lanes[lane_index(*p)].len() as u64))
                .collect(),
            delayed: inner.delayed.len() as u64,
        })
    }

    async fn oldest_waiting(&self) -> Result<Option<Millis>, QueueError> {
        let inner = self.lock();
        Ok(inner
            .lanes
            .iter()
            .filter_map(|lane| lane.front().map(|(_, at)| *at))
            .min())
    }

    async fn ping(&self) -> Result<(), QueueError> {
        Ok(())
    }

    fn is_volatile(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "in-process"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn high_first_and_deduplicated() {
        let q = MemoryQueue::new();
        q.enqueue(&[("b1".into(), Priority::Bulk), ("b1".into(), Priority::Bulk)])
            .await
            .unwrap();
        q.enqueue(&[("h1".into(), Priority::High)]).await.unwrap();
        let jobs = q.receive(10, Duration::from_millis(10)).await.unwrap();
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["h1", "b1"]);
    }

    #[tokio::test]
    async fn oldest_waiting_is_the_first_entry_not_received() {
        let q = MemoryQueue::new();
        assert_eq!(q.oldest_waiting().await.unwrap(), None);
        let before = now_ms();
        q.enqueue(&[("a".into(), Priority::Bulk)]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let second = now_ms();
        q.enqueue(&[("b".into(), Priority::High)]).await.unwrap();
        let oldest = q.oldest_waiting().await.unwrap().unwrap();
        assert!(oldest >= before && oldest < second, "{oldest}");
        // Taking the high lane's entry leaves the bulk one the oldest.
        assert_eq!(q.receive(1, Duration::ZERO).await.unwrap()[0].id, "b");
        assert_eq!(q.oldest_waiting().await.unwrap(), Some(oldest));
        assert_eq!(q.receive(1, Duration::ZERO).await.unwrap()[0].id, "a");
        assert_eq!(q.oldest_waiting().await.unwrap(), None);
    }

    #[tokio::test]
    async fn delayed_jobs_wait_their_turn() {
        let q = MemoryQueue::new();
        q.schedule("later", Priority::Normal, now_ms() + 150)
            .await
            .unwrap();
        assert!(q
            .receive(1, Duration::from_millis(20))
            .await
            .unwrap()
            .is_empty());
        let jobs = q.receive(1, Duration::from_secs(2)).await.unwrap();
        assert_eq!(jobs[0].id, "later");
    }
}
