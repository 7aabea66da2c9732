//! Delivery: workers that claim queued messages, hand them to relays one
//! envelope per recipient, and record what happened; the state machine that
//! turns outcomes into statuses; the retry schedule; and the sweeper that
//! repairs whatever the queue lost.

mod acks;
mod recorder;
mod schedule;
mod state;
mod sweeper;
mod worker;

pub use schedule::RetrySchedule;
pub use state::{decide, Decision, Policy};
pub use sweeper::{rebuild_queue, Sweeper};
pub use worker::Worker;
