//! The `Queue` port: carries message ids (never content) in three priority
//! lanes, with delayed delivery for retries and scheduled sends. Adapters:
//! Redis Streams (durable-ish, shared by processes) and in-process (rebuilt
//! from the store at start). The store stays the truth: a lost or duplicated
//! id is repaired by the sweeper and filtered by the claim.

mod memory;
mod redis;

use std::time::Duration;

use async_trait::async_trait;

pub use memory::MemoryQueue;
pub use redis::RedisQueue;

use crate::domain::{Millis, Priority};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: String,
    pub lane: Priority,
    /// Adapter-specific receipt used by `ack`.
    pub token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue unavailable: {0}")]
    Unavailable(String),
}

/// Anti-starvation: one receive in this many serves the lanes in reverse.
pub const STARVATION_BREAK: u64 = 10;

/// Lane order for the `tick`-th receive: high first, except every
/// [`STARVATION_BREAK`]th receive, which serves bulk first.
pub fn lane_order(tick: u64) -> [Priority; 3] {
    if tick % STARVATION_BREAK == STARVATION_BREAK - 1 {
        [Priority::Bulk, Priority::Normal, Priority::High]
    } else {
        [Priority::High, Priority::Normal, Priority::Bulk]
    }
}

#[async_trait]
pub trait Queue: Send + Sync {
    /// Makes ids available now.
    async fn enqueue(&self, items: &[(String, Priority)]) -> Result<(), QueueError>;
    /// Makes an id available at `at` (now or past: immediately).
    async fn schedule(&self, id: &str, lane: Priority, at: Millis) -> Result<(), QueueError>;
    /// Up to `max` jobs, waiting up to `wait` for the first (a zero `wait`
    /// only takes what is ready).
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Job>, QueueError>;
    /// Forgets received jobs (done, or not ours to do); one round trip.
    async fn ack(&self, jobs: &[Job]) -> Result<(), QueueError>;
    /// Ready ids per lane, and delayed ids.
    async fn depth(&self) -> Result<QueueDepth, QueueError>;
    /// When the oldest ready entry that no consumer has received yet was
    /// made ready (`None` when none waits). Lanes are first in, first out,
    /// so every entry made ready before it has been received: a message
    /// still unclaimed from before then was lost, one from after may only
    /// be waiting its turn (the sweeper repairs the first kind only).
    async fn oldest_waiting(&self) -> Result<Option<Millis>, QueueError>;
    async fn ping(&self) -> Result<(), QueueError>;
    /// True when the queue forgets everything on restart (in-process), so
    /// start-up must rebuild it from the store.
    fn is_volatile(&self) -> bool;
    fn name(&self) -> &'static str;
}

#[derive(Debug, Clone, Default)]
pub struct QueueDepth {
    pub ready: Vec<(Priority, u64)>,
    pub delayed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_gets_a_turn() {
        let firsts: Vec<Priority> = (0..STARVATION_BREAK).map(|t| lane_order(t)[0]).collect();
        assert_eq!(firsts.iter().filter(|p| **p == Priority::Bulk).count(), 1);
        assert_eq!(firsts.iter().filter(|p| **p == Priority::High).count(), 9);
    }
}
