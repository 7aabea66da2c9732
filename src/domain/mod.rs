//! Domain types shared by every layer: addresses, statuses, priorities,
//! delivery outcomes. Parsed at the edge, trusted everywhere after.

mod address;
pub mod mime_patch;
mod outcome;
mod status;

pub use address::{AddressError, EmailAddress, Mailbox};
pub use outcome::{Attempt, Outcome};
pub use status::{Priority, Status};

/// Milliseconds since the Unix epoch: the one time type the store keeps.
pub type Millis = i64;

pub fn now_ms() -> Millis {
    chrono::Utc::now().timestamp_millis()
}

pub fn format_ms(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A new time-ordered identifier (UUIDv7), so ids sort by creation.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
