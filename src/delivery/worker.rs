//! The delivery worker pool: receive ids, claim each message with a lease,
//! send one envelope per due recipient through the relay chain, record the
//! outcome in one transaction, then acknowledge. Never holds a transaction
//! across SMTP. On shutdown it stops taking work and finishes what it holds.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::acks::Acks;
use super::recorder::Recorder;
use super::{decide, Policy};
use crate::domain::{now_ms, Attempt, Status};
use crate::keys::KeyMode;
use crate::metrics::Metrics;
use crate::queue::{Job, Queue};
use crate::relay::RelayChain;
use crate::store::{Claim, DeliveryReport, RecipientResult, Store};
use crate::webhooks::Dispatcher;

/// How long a receive waits for more free slots when only a few are free.
const GATHER_WAIT: Duration = Duration::from_millis(3);

/// How long a small batch lingers for more jobs before it is claimed. At
/// a steady few hundred sends per second each receive finds one or two
/// ids, and a claim, an SMTP hand-off and an outcome transaction per one
/// or two messages cost the store and the CPU several times what a batch
/// of ten costs; a few milliseconds of delivery latency buys that back.
const LINGER: Duration = Duration::from_millis(5);

/// The batch a receive waits for (at most [`GATHER_WAIT`]): an eighth of the
/// pool, at most 16, never more than the pool.
fn gather_target(concurrency: usize) -> usize {
    (concurrency / 8).clamp(1, 16)
}

/// Where a delivery's outcome goes once the relay has answered.
#[derive(Clone)]
struct Outcomes {
    recorder: Recorder,
    acks: Acks,
    /// Deliveries whose outcome is being recorded after they gave their
    /// slot back: at most as many as there are slots.
    recording: Arc<Semaphore>,
}

pub struct Worker {
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn Queue>,
    pub relays: RelayChain,
    /// True when `relays` is the capture relay (no SMTP configured).
    pub relays_capture: bool,
    pub policy: Policy,
    pub lease: Duration,
    pub concurrency: usize,
    pub owner: String,
    pub metrics: Arc<Metrics>,
    /// This process's webhook dispatcher: the deliveries of the events
    /// that recorded outcomes make are handed to it.
    pub webhooks: Arc<Dispatcher>,
}

impl Worker {
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let (acks, acking) = Acks::start(self.queue.clone());
        let outcomes = Outcomes {
            recorder: Recorder::start(self.store.clone(), 2, self.webhooks.clone()),
            acks,
            recording: Arc::new(Semaphore::new(self.concurrency)),
        };
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let tasks = TaskTracker::new();
        loop {
            let mut held = tokio::select! {
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.cancelled() => break,
            };
            self.gather_slots(&permits, &mut held).await;
            let jobs = tokio::select! {
                r = self.queue.receive(held.num_permits(), Duration::from_secs(1)) => r,
                _ = shutdown.cancelled() => break,
            };
            let jobs = match jobs {
                Ok(jobs) => jobs,
                Err(e) => {
                    tracing::warn!(error = %e, "queue receive failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    continue;
                }
            };
            if jobs.is_empty() {
                continue;
            }
            let jobs = tokio::select! {
                j = self.linger(jobs, held.num_permits()) => j,
                _ = shutdown.cancelled() => break,
            };
            // Give back the slots this batch does not need.
            if held.num_permits() > jobs.len() {
                drop(held.split(held.num_permits() - jobs.len()));
            }
            // The claim runs beside the loop, which goes on receiving.
            let worker = self.clone();
            let outcomes = outcomes.clone();
            let spawner = tasks.clone();
            tasks.spawn(async move {
                worker.dispatch(jobs, held, &outcomes, &spawner).await;
            });
        }
        tasks.close();
        tracing::info!(
            in_flight = tasks.len(),
            "worker stopping; finishing deliveries in flight"
        );
        tasks.wait().await;
        drop(outcomes);
        let _ = acking.await;
    }

    /// Adds every free slot to `held`, so one receive and one claim serve
    /// as many messages as can be delivered now. When the pool is nearly
    /// full (a backlog is draining and slots free up one at a time), waits
    /// up to [`GATHER_WAIT`] for a few more: claiming one message per
    /// round trip costs the store far more than a few milliseconds.
    async fn gather_slots(&self, permits: &Arc<Semaphore>, held: &mut OwnedSemaphorePermit) {
        let take_free = |held: &mut OwnedSemaphorePermit| {
            let free = permits.available_permits();
            if free > 0 {
                if let Ok(more) = permits.clone().try_acquire_many_owned(free as u32) {
                    held.merge(more);
                }
            }
        };
        take_free(held);
        let want = gather_target(self.concurrency);
        if held.num_permits() >= want {
            return;
        }
        let missing = (want - held.num_permits()) as u32;
        if let Ok(Ok(more)) =
            tokio::time::timeout(GATHER_WAIT, permits.clone().acquire_many_owned(missing)).await
        {
            held.merge(more);
        }
        take_free(held);
    }

    /// Tops up a batch smaller than [`gather_target`] with what arrives
    /// within [`LINGER`] (never more than `slots`).
    async fn linger(&self, mut jobs: Vec<Job>, slots: usize) -> Vec<Job> {
        let want = gather_target(self.concurrency).min(slots);
        if jobs.len() >= want {
            return jobs;
        }
        tokio::time::sleep(LINGER).await;
        match self.queue.receive(slots - jobs.len(), Duration::ZERO).await {
            Ok(more) => jobs.extend(more),
            Err(e) => tracing::debug!(error = %e, "queue receive failed while lingering"),
        }
        jobs
    }

    /// Claims a received batch and starts one delivery per claimed message,
    /// each holding one of the batch's slots.
    async fn dispatch(
        self: Arc<Self>,
        jobs: Vec<Job>,
        mut held: OwnedSemaphorePermit,
        outcomes: &Outcomes,
        tasks: &TaskTracker,
    ) {
        let Some(claims) = self.claim(&jobs, &outcomes.acks).await else {
            return;
        };
        for (job, claim) in claims {
            let Some(permit) = held.split(1) else { break };
            let worker = self.clone();
            let outcomes = outcomes.clone();
            let span =
                tracing::info_span!("delivery", message_id = %job.id, lane = job.lane.as_str());
            tasks.spawn(
                async move {
                    worker.process(job, claim, &outcomes, permit).await;
                }
                .instrument(span),
            );
        }
    }

    /// Claims a batch in one transaction; acknowledges jobs that are not due,
    /// final, or taken (duplicates). `None` if the store is unavailable.
    async fn claim(&self, jobs: &[Job], acks: &Acks) -> Option<Vec<(Job, Claim)>> {
        let now = now_ms();
        let lease_until = now + self.lease.as_millis() as i64;
        let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
        let claims = match self
            .store
            .claim_many(&ids, &self.owner, now, lease_until)
            .await
        {
            Ok(claims) => claims,
            Err(e) => {
                tracing::warn!(error = %e, "claim failed; the sweeper will retry");
                return None;
            }
        };
        let mut by_id: std::collections::HashMap<String, Claim> = claims
            .into_iter()
            .map(|c| (c.message.id.clone(), c))
            .collect();
        let mut out = Vec::with_capacity(by_id.len());
        for job in jobs {
            match by_id.remove(&job.id) {
                Some(claim) => out.push((job.clone(), claim)),
                None => acks.ack(job.clone()),
            }
        }
        Some(out)
    }

    async fn process(
        &self,
        job: Job,
        claim: Claim,
        outcomes: &Outcomes,
        slot: OwnedSemaphorePermit,
    ) {
        let report = self
            .holding_lease(&claim.message.id, self.deliver(&claim))
            .await;
        // The slot goes back once the relay has answered, so the next
        // delivery overlaps this one's outcome transaction (a group commit
        // that lingers for company); the lease, the task tracker and the
        // unacknowledged job still cover the message until it is recorded.
        let recording = outcomes.recording.clone().acquire_owned().await;
        drop(slot);
        let (recorder, acks) = (&outcomes.recorder, &outcomes.acks);
        let result = recorder.record(report).await;
        drop(recording);
        match result {
            Ok(result) => {
                if let (false, Some(next)) = (result.status.is_final(), result.next_attempt_at) {
                    if let Err(e) = self.queue.schedule(&job.id, result.priority, next).await {
                        tracing::warn!(error = %e, "could not schedule retry; the sweeper will");
                    }
                }
                acks.ack(job);
            }
            Err(e) => {
                tracing::error!(error = %e, "could not record delivery; lease will expire and it will be retried")
            }
        }
    }

    /// Runs `work` (a delivery) while extending the message's lease every
    /// half lease. A delivery may wait for a relay connection behind others
    /// claimed ahead of it, or on a slow relay, for longer than one lease;
    /// without this the sweeper would hand the message to a second
    /// delivery and it would be sent twice.
    async fn holding_lease<T>(&self, id: &str, work: impl std::future::Future<Output = T>) -> T {
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = tokio::time::sleep(self.lease / 2) => {
                    let until = now_ms() + self.lease.as_millis() as i64;
                    match self.store.extend_lease(id, &self.owner, until).await {
                        Ok(true) => {}
                        Ok(false) => tracing::warn!("lease lost during delivery; the message may be sent twice"),
                        Err(e) => tracing::warn!(error = %e, "could not extend the lease"),
                    }
                }
            }
        }
    }

    async fn deliver(&self, claim: &Claim) -> DeliveryReport {
        let message = &claim.message;
        let captured = message.mode == KeyMode::Test || self.relays_capture;
        let chain = if message.mode == KeyMode::Test {
            RelayChain::capture()
        } else {
            self.relays.clone()
        };
        let mut results = Vec::with_capacity(claim.recipients.len());
        for r in &claim.recipients {
            let now = now_ms();
            let ended = |status: Status, reason: &str| RecipientResult {
                idx: r.idx,
                email: r.email.clone(),
                status,
                attempts: Vec::new(),
                prior_attempts: r.attempts,
                next_attempt_at: None,
                suppress: false,
                reason: Some(reason.to_string()),
            };
            if message.expires_at.is_some_and(|e| now >= e) {
                results.push(ended(Status::Expired, "expired"));
                continue;
            }
            if claim.suppressed.contains(&r.email.to_lowercase()) {
                results.push(ended(
                    Status::Suppressed,
                    "address is on the suppression list",
                ));
                continue;
            }
            let attempts: Vec<Attempt> = chain
                .deliver(
                    &claim.mail_from,
                    &r.email,
                    claim.mime.as_bytes(),
                    message.priority,
                )
                .await;
            let Some(last) = attempts.last() else {
                continue;
            };
            let now = now_ms();
            let d = decide(
                last,
                r.attempts,
                message.created_at,
                message.expires_at,
                now,
                &self.policy,
            );
            if d.status == Status::Delivered {
                let since = message.send_at.unwrap_or(message.created_at);
                self.metrics
                    .time_to_relay((now - since).max(0) as f64 / 1000.0);
            }
            tracing::info!(
                recipient_idx = r.idx,
                status = d.status.as_str(),
                relay = %last.relay,
                smtp_code = last.smtp_code,
                "delivery attempt"
            );
            results.push(RecipientResult {
                idx: r.idx,
                email: r.email.clone(),
                status: d.status,
                attempts,
                prior_attempts: r.attempts,
                next_attempt_at: d.next_attempt_at,
                suppress: d.suppress,
                reason: d.reason,
            });
        }
        for r in &results {
            self.metrics.delivery(r.status.as_str());
        }
        DeliveryReport {
            message_id: message.id.clone(),
            key_id: message.key_id.clone(),
            priority: message.priority,
            tags: message.tags.clone(),
            metadata: message.metadata.clone(),
            now: now_ms(),
            redact: !captured,
            results,
        }
    }
}
