//! The webhook dispatcher's request slots: at most [`MAX_IN_FLIGHT`]
//! requests in flight per process and [`PER_ENDPOINT`] to any one endpoint
//! (one that hangs until the timeout holds at most half the slots, and the
//! others share the rest). A [`Ticket`] holds one slot for one endpoint's
//! request and gives it back when dropped. A claim waits for a slot; a
//! delivery handed over as it is written takes one at once or not at all
//! ([`Slots::try_take`]). Owns no I/O.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Most webhook requests in flight per process.
pub const MAX_IN_FLIGHT: usize = 128;
/// Most requests in flight to one endpoint.
pub const PER_ENDPOINT: usize = MAX_IN_FLIGHT / 2;

pub struct Slots {
    permits: Arc<Semaphore>,
    in_flight: Arc<InFlight>,
}

/// Requests in flight per endpoint, and a signal when one ends.
#[derive(Default)]
struct InFlight {
    counts: Mutex<HashMap<String, usize>>,
    ended: Notify,
}

impl InFlight {
    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn end(&self, endpoint: &str) {
        let mut counts = self.counts();
        if let Some(n) = counts.get_mut(endpoint) {
            *n -= 1;
            if *n == 0 {
                counts.remove(endpoint);
            }
        }
        drop(counts);
        self.ended.notify_one();
    }
}

/// One request slot, held for one endpoint until dropped.
pub struct Ticket {
    permit: Option<OwnedSemaphorePermit>,
    endpoint: String,
    in_flight: Arc<InFlight>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.in_flight.end(&self.endpoint);
    }
}

impl Default for Slots {
    fn default() -> Self {
        Slots {
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            in_flight: Arc::default(),
        }
    }
}

impl Slots {
    /// A free slot, waited for (`None` once the slots are closed).
    pub async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().acquire_owned().await.ok()
    }

    /// A free slot if there is one now.
    pub fn try_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    #[cfg(test)]
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// Requests in flight per endpoint, now.
    pub fn busy(&self) -> HashMap<String, usize> {
        self.in_flight.counts().clone()
    }

    /// Notified whenever a request ends.
    pub fn ended(&self) -> &Notify {
        &self.in_flight.ended
    }

    /// `permit` as a ticket for a request to `endpoint` (a claim took no
    /// more of an endpoint's deliveries than its room).
    pub fn ticket(&self, permit: OwnedSemaphorePermit, endpoint: &str) -> Ticket {
        *self
            .in_flight
            .counts()
            .entry(endpoint.to_string())
            .or_default() += 1;
        self.issue(permit, endpoint)
    }

    /// A ticket for a request to `endpoint` if a slot is free now and the
    /// endpoint is below its share.
    pub fn try_take(&self, endpoint: &str) -> Option<Ticket> {
        let permit = self.try_permit()?;
        {
            let mut counts = self.in_flight.counts();
            let n = counts.entry(endpoint.to_string()).or_default();
            if *n >= PER_ENDPOINT {
                return None;
            }
            *n += 1;
        }
        Some(self.issue(permit, endpoint))
    }

    fn issue(&self, permit: OwnedSemaphorePermit, endpoint: &str) -> Ticket {
        Ticket {
            permit: Some(permit),
            endpoint: endpoint.to_string(),
            in_flight: self.in_flight.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Slots, MAX_IN_FLIGHT, PER_ENDPOINT};

    #[test]
    fn a_ticket_is_taken_only_within_both_limits_and_given_back_when_dropped() {
        let slots = Slots::default();
        let a: Vec<_> = (0..PER_ENDPOINT)
            .filter_map(|_| slots.try_take("a"))
            .collect();
        assert_eq!(a.len(), PER_ENDPOINT);
        assert!(slots.try_take("a").is_none(), "endpoint a is at its share");
        assert_eq!(slots.available(), MAX_IN_FLIGHT - PER_ENDPOINT);
        let b: Vec<_> = (0..PER_ENDPOINT)
            .filter_map(|_| slots.try_take("b"))
            .collect();
        assert_eq!(b.len(), PER_ENDPOINT);
        assert!(slots.try_take("c").is_none(), "every slot is taken");
        drop(a);
        assert_eq!(slots.available(), PER_ENDPOINT);
        assert_eq!(slots.busy().get("a"), None);
        assert_eq!(slots.busy().get("b"), Some(&PER_ENDPOINT));
        let c = slots.try_take("c").expect("a slot was given back");
        assert_eq!(slots.busy().get("c"), Some(&1));
        drop(c);
        assert_eq!(slots.busy().get("c"), None);
    }

    #[tokio::test]
    async fn a_claimed_ticket_counts_for_its_endpoint_and_signals_its_end() {
        let slots = Slots::default();
        let permit = slots.permit().await.expect("a free slot");
        let ticket = slots.ticket(permit, "a");
        assert_eq!(slots.busy().get("a"), Some(&1));
        drop(ticket);
        slots.ended().notified().await;
        assert_eq!(slots.available(), MAX_IN_FLIGHT);
        assert!(slots.busy().is_empty());
    }
}
