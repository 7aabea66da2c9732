//! The status model of messages and recipients, and delivery priorities.

use serde::Serialize;

/// Status of a recipient, and (aggregated) of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Scheduled,
    Queued,
    Sending,
    Deferred,
    Delivered,
    Bounced,
    Failed,
    Suppressed,
    Canceled,
    Expired,
}

impl Status {
    pub const ALL: [Status; 10] = [
        Status::Scheduled,
        Status::Queued,
        Status::Sending,
        Status::Deferred,
        Status::Delivered,
        Status::Bounced,
        Status::Failed,
        Status::Suppressed,
        Status::Canceled,
        Status::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Scheduled => "scheduled",
            Status::Queued => "queued",
            Status::Sending => "sending",
            Status::Deferred => "deferred",
            Status::Delivered => "delivered",
            Status::Bounced => "bounced",
            Status::Failed => "failed",
            Status::Suppressed => "suppressed",
            Status::Canceled => "canceled",
            Status::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Final statuses never change again.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            Status::Scheduled | Status::Queued | Status::Sending | Status::Deferred
        )
    }

    /// Waiting statuses can still be canceled, collapsed or expired.
    pub fn is_waiting(self) -> bool {
        matches!(self, Status::Scheduled | Status::Queued | Status::Deferred)
    }

    /// The webhook/event type announcing this status, if it is announced.
    pub fn event_type(self) -> Option<&'static str> {
        match self {
            Status::Delivered => Some("message.delivered"),
            Status::Deferred => Some("message.deferred"),
            Status::Bounced => Some("message.bounced"),
            Status::Failed => Some("message.failed"),
            Status::Suppressed => Some("message.suppressed"),
            Status::Canceled => Some("message.canceled"),
            Status::Expired => Some("message.expired"),
            _ => None,
        }
    }

    /// A message's status from its recipients': while any recipient is in
    /// flight the message is too; once all are final, the least successful
    /// final status (a message is `delivered` only if every recipient is).
    pub fn aggregate(statuses: impl IntoIterator<Item = Status>) -> Status {
        const ORDER: [Status; 10] = [
            Status::Sending,
            Status::Queued,
            Status::Deferred,
            Status::Scheduled,
            Status::Bounced,
            Status::Failed,
            Status::Expired,
            Status::Suppressed,
            Status::Canceled,
            Status::Delivered,
        ];
        let present: Vec<Status> = statuses.into_iter().collect();
        ORDER
            .into_iter()
            .find(|s| present.contains(s))
            .unwrap_or(Status::Queued)
    }
}

/// Delivery lane. `high` is always taken first; see docs/delivery.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    Normal,
    Bulk,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Bulk];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Bulk => "bulk",
        }
    }

    pub fn parse(text: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.as_str() == text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_is_honest() {
        use Status::*;
        assert_eq!(Status::aggregate([Delivered, Delivered]), Delivered);
        assert_eq!(Status::aggregate([Delivered, Bounced]), Bounced);
        assert_eq!(Status::aggregate([Delivered, Deferred]), Deferred);
        assert_eq!(Status::aggregate([Sending, Deferred]), Sending);
        assert_eq!(Status::aggregate([Canceled]), Canceled);
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
    }
}
