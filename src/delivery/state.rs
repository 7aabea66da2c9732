//! The delivery state machine: what an attempt's outcome means for a
//! recipient. Delivered → `delivered`; Permanent → `bounced` (hard bounces
//! suppressed); Transient → `deferred` with the next retry time, `failed`
//! once the give-up age is reached, never scheduled past `expires_at`.

use std::time::Duration;

use super::RetrySchedule;
use crate::domain::{Attempt, Millis, Outcome, Status};

pub struct Policy {
    pub schedule: RetrySchedule,
    pub give_up_after: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub status: Status,
    pub next_attempt_at: Option<Millis>,
    pub suppress: bool,
    pub reason: Option<String>,
}

/// `failures_before` counts earlier attempts of this recipient.
pub fn decide(
    last: &Attempt,
    failures_before: i64,
    created_at: Millis,
    expires_at: Option<Millis>,
    now: Millis,
    policy: &Policy,
) -> Decision {
    match last.outcome {
        Outcome::Delivered => Decision {
            status: Status::Delivered,
            next_attempt_at: None,
            suppress: false,
            reason: None,
        },
        Outcome::Permanent => Decision {
            status: Status::Bounced,
            next_attempt_at: None,
            suppress: last.is_hard_bounce(),
            reason: None,
        },
        Outcome::Transient => {
            let give_up_at = created_at + policy.give_up_after.as_millis() as i64;
            let delay = policy.schedule.delay(failures_before as usize + 1);
            let next = (now + delay.as_millis() as i64).min(give_up_at);
            if now >= give_up_at {
                return Decision {
                    status: Status::Failed,
                    next_attempt_at: None,
                    suppress: false,
                    reason: Some("gave up: the relay kept deferring".into()),
                };
            }
            Decision {
                status: Status::Deferred,
                next_attempt_at: Some(expires_at.map_or(next, |e| next.min(e))),
                suppress: false,
                reason: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(outcome: Outcome, enhanced: Option<&str>) -> Attempt {
        Attempt {
            relay: "r".into(),
            outcome,
            smtp_code: Some(450),
            enhanced_code: enhanced.map(str::to_string),
            response: String::new(),
            duration_ms: 1,
        }
    }

    fn policy() -> Policy {
        Policy {
            schedule: RetrySchedule::without_jitter(vec![Duration::from_secs(10)]),
            give_up_after: Duration::from_secs(100),
        }
    }

    #[test]
    fn transient_defers_then_fails() {
        let d = decide(
            &attempt(Outcome::Transient, None),
            0,
            0,
            None,
            1_000,
            &policy(),
        );
        assert_eq!(d.status, Status::Deferred);
        assert_eq!(d.next_attempt_at, Some(11_000));
        let d = decide(
            &attempt(Outcome::Transient, None),
            5,
            0,
            None,
            100_000,
            &policy(),
        );
        assert_eq!(d.status, Status::Failed);
    }

    #[test]
    fn retries_never_pass_expiry() {
        let d = decide(
            &attempt(Outcome::Transient, None),
            0,
            0,
            Some(5_000),
            1_000,
            &policy(),
        );
        assert_eq!(d.next_attempt_at, Some(5_000));
    }

    #[test]
    fn hard_bounce_suppresses() {
        let mut a = attempt(Outcome::Permanent, Some("5.1.1"));
        a.smtp_code = Some(550);
        let d = decide(&a, 0, 0, None, 0, &policy());
        assert_eq!(d.status, Status::Bounced);
        assert!(d.suppress);
    }
}
