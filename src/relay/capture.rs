//! The capture relay: accepts everything, sends nothing. The MIME is already
//! in the store, readable through `GET /v1/messages/{id}/raw`.

use async_trait::async_trait;

use super::Relay;
use crate::domain::{Attempt, Outcome, Priority};

pub struct CaptureRelay;

pub const CAPTURE: &str = "capture";

#[async_trait]
impl Relay for CaptureRelay {
    fn name(&self) -> &str {
        CAPTURE
    }

    async fn send(&self, _from: &str, _to: &str, _mime: &[u8], _priority: Priority) -> Attempt {
        Attempt {
            relay: CAPTURE.to_string(),
            outcome: Outcome::Delivered,
            smtp_code: None,
            enhanced_code: None,
            response: "captured: stored by Mailroom, not sent".to_string(),
            duration_ms: 0,
        }
    }
}
