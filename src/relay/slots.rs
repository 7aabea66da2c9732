//! The connection slots of one relay's pool, handed out by priority. More
//! deliveries may be under way than a relay has connections (workers claim
//! ahead so that a connection never waits for the store); when they queue
//! for a connection, a `high` message (a code, a reset) is served before
//! every `normal` one, and `normal` before `bulk`, each in arrival order. A
//! bulk backlog therefore never stands between a code and the relay.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::domain::Priority;

/// Free slots and the deliveries waiting for one, a queue per priority.
struct State {
    free: usize,
    waiting: [VecDeque<oneshot::Sender<Slot>>; 3],
}

fn rank(priority: Priority) -> usize {
    match priority {
        Priority::High => 0,
        Priority::Normal => 1,
        Priority::Bulk => 2,
    }
}

#[derive(Clone)]
pub struct Slots {
    state: Arc<Mutex<State>>,
}

/// One connection slot; dropping it hands it to the first waiter of the
/// highest priority, or frees it.
pub struct Slot {
    /// `None` once the slot has been passed on (see [`Slot::drop`]).
    home: Option<Arc<Mutex<State>>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Slots {
    pub fn new(size: usize) -> Slots {
        Slots {
            state: Arc::new(Mutex::new(State {
                free: size.max(1),
                waiting: Default::default(),
            })),
        }
    }

    /// A slot: at once if one is free, else when every waiter ahead of
    /// `priority` has had one. Cancel-safe: a slot sent to a waiter that
    /// has gone is passed on.
    pub async fn acquire(&self, priority: Priority) -> Slot {
        let wait = {
            let mut state = lock(&self.state);
            if state.free > 0 {
                state.free -= 1;
                return self.slot();
            }
            let (tx, rx) = oneshot::channel();
            state.waiting[rank(priority)].push_back(tx);
            rx
        };
        match wait.await {
            Ok(slot) => slot,
            // Unreachable: a waiter's sender is only dropped after sending.
            Err(_) => self.slot(),
        }
    }

    fn slot(&self) -> Slot {
        Slot {
            home: Some(self.state.clone()),
        }
    }

    #[cfg(test)]
    fn free(&self) -> usize {
        lock(&self.state).free
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(home) = self.home.take() else {
            return;
        };
        let mut state = lock(&home);
        loop {
            let Some(next) = state.waiting.iter_mut().find_map(VecDeque::pop_front) else {
                state.free += 1;
                return;
            };
            let slot = Slot {
                home: Some(home.clone()),
            };
            match next.send(slot) {
                Ok(()) => return,
                // That waiter is gone: disarm the slot (its drop would take
                // the lock we hold) and try the next one.
                Err(mut unsent) => unsent.home = None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waiters_are_served_by_priority_then_arrival() {
        let slots = Slots::new(1);
        let held = slots.acquire(Priority::Bulk).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, priority) in [
            ("bulk1", Priority::Bulk),
            ("normal", Priority::Normal),
            ("bulk2", Priority::Bulk),
            ("high", Priority::High),
        ] {
            let slots = slots.clone();
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let slot = slots.acquire(priority).await;
                order.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(slot);
            }));
            // Arrival order is the order of the queue.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["high", "normal", "bulk1", "bulk2"]);
        assert_eq!(slots.free(), 1, "every slot came back");
    }

    #[tokio::test]
    async fn a_slot_sent_to_a_waiter_that_left_is_passed_on() {
        let slots = Slots::new(1);
        let held = slots.acquire(Priority::Normal).await;
        let gone = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire(Priority::High).await })
        };
        let stays = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire(Priority::Bulk).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        gone.abort();
        let _ = gone.await;
        drop(held);
        let slot = tokio::time::timeout(Duration::from_secs(1), stays)
            .await
            .expect("the bulk waiter got the slot the high one left")
            .unwrap();
        assert_eq!(slots.free(), 0);
        drop(slot);
        assert_eq!(slots.free(), 1);
    }
}
