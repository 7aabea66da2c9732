//! The `Limiter` port: per-key rate (GCRA with burst), daily and monthly
//! quotas counted per accepted recipient, and a per-recipient hourly cap.
//! Adapters: Redis (atomic Lua, shared by every process) and in-process
//! (per process). Windows are UTC days, months and hours.

mod memory;
mod redis;

use async_trait::async_trait;
use chrono::{Datelike, TimeZone, Timelike, Utc};

pub use memory::MemoryLimiter;
pub use redis::RedisLimiter;

use crate::domain::Millis;

#[derive(Debug, thiserror::Error)]
pub enum LimiterError {
    #[error("limiter unavailable: {0}")]
    Unavailable(String),
}

/// Result of one GCRA check.
#[derive(Debug, Clone, PartialEq)]
pub struct RateDecision {
    pub allowed: bool,
    pub remaining: i64,
    pub retry_after_ms: i64,
    /// Time until the bucket is full again.
    pub reset_ms: i64,
}

#[derive(Debug, Clone)]
pub struct QuotaRequest {
    pub key_id: String,
    /// Recipients this request would add to the daily/monthly counts.
    pub count: i64,
    pub daily: Option<i64>,
    pub monthly: Option<i64>,
    pub per_recipient_hourly: Option<i64>,
    /// Distinct recipient keys (lower-case addresses).
    pub recipients: Vec<String>,
    pub now: Millis,
}

impl QuotaRequest {
    pub fn unlimited(&self) -> bool {
        self.daily.is_none() && self.monthly.is_none() && self.per_recipient_hourly.is_none()
    }
}

/// Which policy refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Rate,
    Daily,
    Monthly,
    PerRecipientHourly,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Rate => "burst",
            Policy::Daily => "daily",
            Policy::Monthly => "monthly",
            Policy::PerRecipientHourly => "per_recipient_hourly",
        }
    }
    fn parse(text: &str) -> Option<Policy> {
        [
            Policy::Rate,
            Policy::Daily,
            Policy::Monthly,
            Policy::PerRecipientHourly,
        ]
        .into_iter()
        .find(|p| p.as_str() == text)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum QuotaDecision {
    Allowed {
        daily_used: i64,
        monthly_used: i64,
        reservation: Reservation,
    },
    Denied {
        policy: Policy,
        retry_after_ms: i64,
        daily_used: i64,
        monthly_used: i64,
    },
}

/// What a successful reservation incremented, so it can be given back.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reservation {
    pub counters: Vec<(String, i64)>,
}

#[async_trait]
pub trait Limiter: Send + Sync {
    async fn rate(
        &self,
        key_id: &str,
        per_second: f64,
        burst: i64,
    ) -> Result<RateDecision, LimiterError>;
    async fn reserve(&self, req: &QuotaRequest) -> Result<QuotaDecision, LimiterError>;
    async fn release(&self, reservation: &Reservation) -> Result<(), LimiterError>;
    /// (daily, monthly) counts used so far.
    async fn used(&self, key_id: &str, now: Millis) -> Result<(i64, i64), LimiterError>;
}

/// Counter names and their windows for one moment.
pub struct Windows {
    pub day: String,
    pub month: String,
    pub hour: String,
    pub ms_to_next_day: i64,
    pub ms_to_next_month: i64,
    pub ms_to_next_hour: i64,
}

impl Windows {
    pub fn at(now: Millis) -> Windows {
        let t = Utc.timestamp_millis_opt(now).single().unwrap_or_default();
        let day_start = t
            .date_naive()
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default()
            .and_utc();
        let next_day = day_start + chrono::Duration::days(1);
        let (y, m) = if t.month() == 12 {
            (t.year() + 1, 1)
        } else {
            (t.year(), t.month() + 1)
        };
        let next_month = Utc
            .with_ymd_and_hms(y, m, 1, 0, 0, 0)
            .single()
            .unwrap_or(next_day);
        let hour_start = day_start + chrono::Duration::hours(i64::from(t.hour()));
        Windows {
            day: t.format("%Y%m%d").to_string(),
            month: t.format("%Y%m").to_string(),
            hour: t.format("%Y%m%d%H").to_string(),
            ms_to_next_day: (next_day - t).num_milliseconds(),
            ms_to_next_month: (next_month - t).num_milliseconds(),
            ms_to_next_hour: (hour_start + chrono::Duration::hours(1) - t).num_milliseconds(),
        }
    }

    pub fn day_start(now: Millis) -> Millis {
        now + Windows::at(now).ms_to_next_day - 86_400_000
    }

    pub fn month_start(now: Millis) -> Millis {
        let t = Utc.timestamp_millis_opt(now).single().unwrap_or_default();
        Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
            .single()
            .map_or(now, |s| s.timestamp_millis())
    }

    pub fn retry_after(&self, policy: Policy) -> i64 {
        match policy {
            Policy::Rate => 1000,
            Policy::Daily => self.ms_to_next_day,
            Policy::Monthly => self.ms_to_next_month,
            Policy::PerRecipientHourly => self.ms_to_next_hour,
        }
    }
}

/// Short stable name for a recipient in counter keys (no address in Redis).
pub fn recipient_tag(email: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(email.as_bytes())[..12])
}

/// GCRA arithmetic shared by both adapters: returns the decision and the
/// new theoretical arrival time (when allowed).
pub fn gcra(tat: f64, now: f64, per_second: f64, burst: i64) -> (RateDecision, Option<f64>) {
    let emission = 1000.0 / per_second.max(0.000_001);
    let limit = emission * burst.max(1) as f64;
    let tat = tat.max(now);
    let new_tat = tat + emission;
    let diff = new_tat - now;
    if diff > limit {
        return (
            RateDecision {
                allowed: false,
                remaining: 0,
                retry_after_ms: (diff - limit).ceil() as i64,
                reset_ms: (tat - now).ceil() as i64,
            },
            None,
        );
    }
    (
        RateDecision {
            allowed: true,
            remaining: ((limit - diff) / emission).floor() as i64,
            retry_after_ms: 0,
            reset_ms: diff.ceil() as i64,
        },
        Some(new_tat),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_allows_burst_then_paces() {
        let mut tat = 0.0;
        let mut allowed = 0;
        for _ in 0..10 {
            let (d, new) = gcra(tat, 1000.0, 2.0, 5);
            if let Some(n) = new {
                tat = n;
                allowed += 1;
            } else {
                assert!(d.retry_after_ms > 0 && d.retry_after_ms <= 500);
            }
        }
        assert_eq!(allowed, 5);
        // Half a second later, one more token.
        assert!(gcra(tat, 1500.0, 2.0, 5).0.allowed);
    }

    #[test]
    fn windows_roll_over() {
        // 2026-12-31T23:30:00Z
        let now = 1_798_759_800_000;
        let w = Windows::at(now);
        assert_eq!(w.day, "20261231");
        assert_eq!(w.ms_to_next_day, 30 * 60 * 1000);
        assert_eq!(w.ms_to_next_month, 30 * 60 * 1000);
        assert_eq!(w.ms_to_next_hour, 30 * 60 * 1000);
        assert_eq!(Windows::day_start(now), now - 23 * 3_600_000 - 30 * 60_000);
    }
}
