//! The webhook dispatcher: claims due deliveries from the store (with a
//! lease, so several processes can share the work and a crash loses
//! nothing) or takes them as this process's outcome transactions write
//! them (leased to it already: [`Dispatcher::try_take`] and
//! [`Dispatcher::hand_over`]), signs and POSTs each event, and records
//! every attempt. 2xx is success; redirects are not followed (a failure);
//! 410 disables the endpoint; 429/503 honour Retry-After; anything else
//! retries on the schedule until it is exhausted. The `webhook-id` is the
//! event id, the same on every retry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::signing::signature_header;
use super::slots::{Slots, Ticket, MAX_IN_FLIGHT, PER_ENDPOINT};
use super::ssrf::{check_static, SafeResolver};
use crate::delivery::RetrySchedule;
use crate::domain::{now_ms, Millis};
use crate::metrics::Metrics;
use crate::store::{Store, WebhookJob, WebhookResult};

const POLL: Duration = Duration::from_millis(200);
/// The least time from one claim to the next when recorded events wake
/// the dispatcher: under load each recorded group would otherwise be a
/// claim of its own (docs/performance.md, 2026-12-05: +27% claims, +7% of
/// Postgres's CPU per message); a webhook waits at most this long for it.
/// A capped endpoint's ended request ends the wait, as it ends a poll.
const WAKE_GAP: Duration = Duration::from_millis(25);
/// Most deliveries claimed at once.
const BATCH: usize = 64;
/// How long a group of attempts to record stays open after its first:
/// deliveries handed over as outcomes are recorded end a few at a time,
/// and each group is one transaction of three statements.
const RECORD_LINGER: Duration = Duration::from_millis(2);
const MAX_BODY: usize = 4096;
const MAX_RETRY_AFTER: i64 = 24 * 3_600_000;

pub struct Dispatcher {
    store: Arc<dyn Store>,
    client: reqwest::Client,
    schedule: RetrySchedule,
    allow_private: bool,
    disable_after: Duration,
    /// How long a claimed delivery belongs to this process: twice the
    /// request timeout (a crash delays its pending deliveries this much).
    lease: Duration,
    metrics: Arc<Metrics>,
    /// Notified when this process has written events (recorded delivery
    /// outcomes) that it did not take at once: an idle dispatcher claims
    /// then instead of at its next poll. Events written elsewhere are found
    /// by the poll.
    due: Notify,
    slots: Slots,
    /// Posting requests: every one is tracked, so that shutdown waits for
    /// them.
    tasks: TaskTracker,
    /// Where posted requests report, while the dispatcher runs (`None`
    /// before and after: nothing is handed over then).
    results: Mutex<Option<mpsc::Sender<WebhookResult>>>,
}

/// The ids of the enabled endpoints, read again when a second old: an
/// endpoint created or enabled elsewhere gets its first deliveries within a
/// second, and a claim costs no read of the endpoints.
#[derive(Default)]
struct Endpoints {
    read_at: Option<Instant>,
    ids: Vec<String>,
}

impl Endpoints {
    const TTL: Duration = Duration::from_secs(1);

    async fn current(&mut self, store: &dyn Store) -> &[String] {
        if self.read_at.is_none_or(|at| at.elapsed() >= Self::TTL) {
            match store.enabled_webhooks().await {
                Ok(ids) => {
                    self.ids = ids;
                    self.read_at = Some(Instant::now());
                }
                Err(e) => tracing::warn!(error = %e, "could not read the webhook endpoints"),
            }
        }
        &self.ids
    }
}

/// What each endpoint may take in the next claim: its share less its
/// requests in flight, those with the fewest in flight first (so an
/// endpoint that is being served slowly comes last).
fn rooms(endpoints: &[String], busy: &HashMap<String, usize>) -> Vec<(String, usize)> {
    let mut open: Vec<(usize, &String)> = endpoints
        .iter()
        .map(|id| (busy.get(id).copied().unwrap_or(0), id))
        .filter(|(in_flight, _)| *in_flight < PER_ENDPOINT)
        .collect();
    open.sort_unstable();
    open.into_iter()
        .map(|(in_flight, id)| (id.clone(), PER_ENDPOINT - in_flight))
        .collect()
}

struct Response {
    status: Option<u16>,
    retry_after_ms: Option<i64>,
    error: Option<String>,
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        schedule: RetrySchedule,
        timeout: Duration,
        allow_private: bool,
        disable_after: Duration,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Dispatcher> {
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(SafeResolver { allow_private }))
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            // A claim posts up to a batch at once: keep a connection for
            // each request an endpoint may have in flight, or each burst
            // opens new ones.
            .pool_max_idle_per_host(PER_ENDPOINT)
            .build()?;
        Ok(Dispatcher {
            store,
            client,
            schedule,
            allow_private,
            disable_after,
            lease: timeout * 2,
            metrics,
            due: Notify::new(),
            slots: Slots::default(),
            tasks: TaskTracker::new(),
            results: Mutex::new(None),
        })
    }

    /// Events were written that wait for a claim: an idle dispatcher
    /// claims now rather than at its next poll.
    pub fn wake(&self) {
        self.due.notify_one();
    }

    /// Until when a delivery handed over now belongs to this process.
    pub fn lease_until(&self) -> Millis {
        now_ms() + self.lease.as_millis() as i64
    }

    /// A request slot for a delivery to `endpoint` being written now, if
    /// one is free at once (and the dispatcher is running).
    pub fn try_take(&self, endpoint: &str) -> Option<Ticket> {
        if self.reporting().is_none() {
            return None;
        }
        self.slots.try_take(endpoint)
    }

    /// Posts the deliveries handed over with their tickets (in the order
    /// taken). Once the dispatcher has stopped they are dropped: leased,
    /// they are claimed again when their lease runs out.
    pub fn hand_over(self: &Arc<Self>, jobs: Vec<WebhookJob>, tickets: Vec<Ticket>) {
        let reporting = self.reporting();
        let Some(results) = reporting.as_ref() else {
            return;
        };
        for (job, ticket) in jobs.into_iter().zip(tickets) {
            self.spawn_post(job, ticket, results.clone());
        }
    }

    fn reporting(&self) -> MutexGuard<'_, Option<mpsc::Sender<WebhookResult>>> {
        self.results
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Posts one delivery in its own task, holding `ticket` until its
    /// result is handed to the recorder.
    fn spawn_post(
        self: &Arc<Self>,
        job: WebhookJob,
        ticket: Ticket,
        results: mpsc::Sender<WebhookResult>,
    ) {
        let me = self.clone();
        self.tasks.spawn(async move {
            let result = me.deliver(job).await;
            // Waits while the recorder is behind, holding the slot:
            // posting goes no faster than recording.
            let _ = results.send(result).await;
            drop(ticket);
        });
    }

    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut endpoints = Endpoints::default();
        let (results, outcomes) = mpsc::channel(MAX_IN_FLIGHT);
        let recorder = tokio::spawn(record(self.store.clone(), outcomes));
        *self.reporting() = Some(results.clone());
        loop {
            // Claim only what can be posted now: a claimed delivery waiting
            // for a slot would only age its lease.
            let first = tokio::select! {
                permit = self.slots.permit() => match permit {
                    Some(permit) => permit,
                    None => break,
                },
                _ = shutdown.cancelled() => break,
            };
            // Every slot a claim may fill is taken before it claims:
            // deliveries handed over meanwhile take slots too.
            let mut permits = vec![first];
            while permits.len() < BATCH {
                match self.slots.try_permit() {
                    Some(permit) => permits.push(permit),
                    None => break,
                }
            }
            let want = permits.len();
            let busy = self.slots.busy();
            let rooms = rooms(endpoints.current(&*self.store).await, &busy);
            let last_claim = Instant::now();
            let now = now_ms();
            let lease_until = now + self.lease.as_millis() as i64;
            let jobs = match self
                .store
                .claim_webhook_jobs(now, lease_until, &rooms, want)
                .await
            {
                Ok(jobs) => jobs,
                Err(e) => {
                    tracing::warn!(error = %e, "could not claim webhook deliveries");
                    Vec::new()
                }
            };
            let idle = jobs.is_empty();
            // A claim returns no more jobs than it was asked for; the
            // permits left over go back.
            for (job, permit) in jobs.into_iter().zip(permits) {
                let ticket = self.slots.ticket(permit, &job.webhook.id);
                self.spawn_post(job, ticket, results.clone());
            }
            if idle {
                // An endpoint at its share may have due work: look again
                // when one of its requests ends, not a whole poll later.
                let capped = busy.values().any(|&n| n >= PER_ENDPOINT);
                let ended = capped.then_some(self.slots.ended());
                if rest(&self.due, ended, last_claim, &shutdown).await == Woken::Shutdown {
                    break;
                }
            } else if shutdown.is_cancelled() {
                break;
            }
        }
        // Nothing is handed over from here on; what was is tracked.
        self.reporting().take();
        self.tasks.close();
        self.tasks.wait().await;
        drop(results);
        let _ = recorder.await;
    }

    /// Posts one delivery; what happened, to be recorded.
    async fn deliver(&self, job: WebhookJob) -> WebhookResult {
        let started = Instant::now();
        let response = self.post(&job).await;
        let latency_ms = started.elapsed().as_millis() as i64;
        let now = now_ms();
        let success = response.status.is_some_and(|s| (200..300).contains(&s));
        let attempt = job.attempts + 1;
        let mut disable_reason = None;
        let next_attempt_at = if success {
            None
        } else if response.status == Some(410) {
            disable_reason = Some("endpoint answered 410 Gone".to_string());
            None
        } else if (attempt as usize) <= self.schedule.len() {
            let scheduled = self.schedule.delay(attempt as usize).as_millis() as i64;
            let wanted = response
                .retry_after_ms
                .map_or(scheduled, |r| r.clamp(0, MAX_RETRY_AFTER));
            Some(now + wanted)
        } else {
            None
        };
        if !success
            && job
                .webhook
                .failing_since
                .is_some_and(|since| now - since > self.disable_after.as_millis() as i64)
        {
            disable_reason = Some(format!(
                "failing continuously for more than {}",
                humantime::format_duration(self.disable_after)
            ));
        }
        self.metrics.webhook(match (success, next_attempt_at) {
            (true, _) => "succeeded",
            (false, Some(_)) => "retrying",
            (false, None) => "exhausted",
        });
        tracing::info!(
            webhook_id = %job.webhook.id,
            event_id = %job.event_id,
            status = response.status,
            attempt,
            success,
            "webhook attempt"
        );
        WebhookResult {
            delivery_id: job.delivery_id.clone(),
            webhook_id: job.webhook.id.clone(),
            now,
            status_code: response.status,
            latency_ms,
            error: response.error,
            success,
            next_attempt_at,
            disable_reason,
        }
    }

    async fn post(&self, job: &WebhookJob) -> Response {
        let failed = |error: String| Response {
            status: None,
            retry_after_ms: None,
            error: Some(error),
        };
        if let Err(e) = check_static(&job.webhook.url, self.allow_private) {
            return failed(format!("URL refused: {e}"));
        }
        let timestamp = now_ms() / 1000;
        let mut secrets = vec![job.webhook.secret.as_str()];
        if let (Some(old), Some(until)) = (
            &job.webhook.previous_secret,
            job.webhook.previous_secret_until,
        ) {
            if until > now_ms() {
                secrets.push(old.as_str());
            }
        }
        let signature = match signature_header(&secrets, &job.event_id, timestamp, &job.payload) {
            Ok(s) => s,
            Err(e) => return failed(e.to_string()),
        };
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(USER_AGENT, HeaderValue::from_static("Mailroom-Webhooks/1"));
        for (name, value) in [
            ("webhook-id", job.event_id.clone()),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", signature),
        ] {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(name, v);
            }
        }
        let sent = self
            .client
            .post(&job.webhook.url)
            .headers(headers)
            .body(job.payload.clone())
            .send()
            .await;
        let mut response = match sent {
            Ok(r) => r,
            Err(e) => return failed(error_chain(&e)),
        };
        let status = response.status().as_u16();
        let retry_after_ms = if status == 429 || status == 503 {
            response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<i64>().ok())
                .map(|s| s * 1000)
        } else {
            None
        };
        // Read (and discard) at most MAX_BODY bytes of the answer.
        let mut read = 0usize;
        let mut excerpt = Vec::new();
        while read < MAX_BODY {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    read += chunk.len();
                    excerpt.extend_from_slice(
                        &chunk[..chunk.len().min(MAX_BODY - excerpt.len().min(MAX_BODY))],
                    );
                }
                _ => break,
            }
        }
        let error = if (200..300).contains(&status) {
            None
        } else if (300..400).contains(&status) {
            Some(format!("HTTP {status}: redirects are not followed"))
        } else {
            let text = String::from_utf8_lossy(&excerpt[..excerpt.len().min(256)]).into_owned();
            Some(format!("HTTP {status}: {text}"))
        };
        Response {
            status: Some(status),
            retry_after_ms,
            error,
        }
    }
}

/// What ended an idle dispatcher's wait.
#[derive(Debug, PartialEq)]
enum Woken {
    Poll,
    /// This process recorded events.
    Due,
    /// A request of an endpoint at its share ended.
    Ended,
    Shutdown,
}

/// Waits, with nothing to claim, for the next poll, for events recorded by
/// this process, for a request of a capped endpoint to end (`ended`), or
/// for shutdown.
async fn wait_idle(due: &Notify, ended: Option<&Notify>, shutdown: &CancellationToken) -> Woken {
    tokio::select! {
        _ = tokio::time::sleep(POLL) => Woken::Poll,
        _ = due.notified() => Woken::Due,
        _ = request_ended(ended) => Woken::Ended,
        _ = shutdown.cancelled() => Woken::Shutdown,
    }
}

/// Resolves when a request of the capped endpoint ends; never without one.
async fn request_ended(ended: Option<&Notify>) {
    match ended {
        Some(ended) => ended.notified().await,
        None => std::future::pending().await,
    }
}

/// An idle dispatcher's rest: [`wait_idle`], and after a wake by recorded
/// events what is left of [`WAKE_GAP`] since the last claim — cut short,
/// as a poll is, when a request of a capped endpoint (`ended`) ends.
async fn rest(
    due: &Notify,
    ended: Option<&Notify>,
    last_claim: Instant,
    shutdown: &CancellationToken,
) -> Woken {
    let woken = wait_idle(due, ended, shutdown).await;
    if woken != Woken::Due {
        return woken;
    }
    let at = tokio::time::Instant::from_std(last_claim + WAKE_GAP);
    tokio::select! {
        _ = tokio::time::sleep_until(at) => Woken::Due,
        _ = request_ended(ended) => Woken::Ended,
        _ = shutdown.cancelled() => Woken::Shutdown,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Records what the deliveries report, those that finished together in one
/// transaction (up to [`BATCH`]); ends when every sender is gone and the
/// channel is drained. A group that cannot be recorded is left to the
/// leases: its deliveries are posted again, with the same `webhook-id`.
async fn record(store: Arc<dyn Store>, mut outcomes: mpsc::Receiver<WebhookResult>) {
    while let Some(first) = outcomes.recv().await {
        let mut group = vec![first];
        let deadline = tokio::time::Instant::now() + RECORD_LINGER;
        while group.len() < BATCH {
            match tokio::time::timeout_at(deadline, outcomes.recv()).await {
                Ok(Some(result)) => group.push(result),
                _ => break,
            }
        }
        if let Err(e) = store.record_webhook_attempts(&group).await {
            tracing::error!(error = %e, count = group.len(), "could not record webhook attempts; they will be retried after the lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{rest, rooms, wait_idle, Woken, PER_ENDPOINT, WAKE_GAP};
    use std::collections::HashMap;
    use std::time::Instant;
    use tokio::sync::Notify;
    use tokio_util::sync::CancellationToken;

    /// Outcomes recorded by this process end an idle wait at once, even
    /// when they were recorded just before the dispatcher began waiting.
    #[tokio::test]
    async fn recorded_events_wake_an_idle_dispatcher() {
        let (due, shutdown) = (Notify::new(), CancellationToken::new());
        due.notify_one();
        assert_eq!(wait_idle(&due, None, &shutdown).await, Woken::Due);
        let ended = Notify::new();
        ended.notify_one();
        assert_eq!(wait_idle(&due, Some(&ended), &shutdown).await, Woken::Ended);
        assert_eq!(wait_idle(&due, None, &shutdown).await, Woken::Poll);
        shutdown.cancel();
        assert_eq!(wait_idle(&due, None, &shutdown).await, Woken::Shutdown);
    }

    /// Woken by recorded events, a dispatcher that claimed a moment ago
    /// waits out the gap, unless a capped endpoint's request ends first;
    /// one that claimed longer ago claims at once.
    #[tokio::test]
    async fn a_wake_keeps_the_gap_but_an_ended_request_cuts_it_short() {
        let (due, ended, shutdown) = (Notify::new(), Notify::new(), CancellationToken::new());
        due.notify_one();
        let long_ago = Instant::now() - WAKE_GAP * 2;
        assert_eq!(rest(&due, None, long_ago, &shutdown).await, Woken::Due);
        due.notify_one();
        let (woken, ()) =
            tokio::join!(rest(&due, Some(&ended), Instant::now(), &shutdown), async {
                tokio::task::yield_now().await;
                ended.notify_one();
            });
        assert_eq!(woken, Woken::Ended);
        due.notify_one();
        let started = Instant::now();
        assert_eq!(rest(&due, None, started, &shutdown).await, Woken::Due);
        assert!(started.elapsed() >= WAKE_GAP);
    }

    #[test]
    fn endpoints_at_their_share_wait_and_the_least_served_go_first() {
        let endpoints = ["a", "b", "c"].map(String::from);
        let busy = HashMap::from([("a".to_string(), PER_ENDPOINT), ("b".to_string(), 10)]);
        assert_eq!(
            rooms(&endpoints, &busy),
            vec![
                ("c".to_string(), PER_ENDPOINT),
                ("b".to_string(), PER_ENDPOINT - 10)
            ]
        );
    }
}
