//! The `Limiter` port: per-key rate (GCRA with burst), daily and monthly
//! quotas counted per accepted recipient, and a per-recipient hourly cap.
//! Adapters: Redis (atomic Lua, shared by every process) and in-process
//! (per process). Windows are UTC days, months and hours.

mod memory;
mod redis;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, Days, Months, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

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
    /// The key's time zone: windows are its local days, months and hours.
    pub tz: Tz,
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
    async fn used(&self, key_id: &str, tz: Tz, now: Millis) -> Result<(i64, i64), LimiterError>;
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

/// The UTC instant of a local wall-clock time (the first one if it occurs
/// twice; the next hour's if a DST gap skips it).
fn local_start(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    tz.from_local_datetime(&local)
        .earliest()
        .or_else(|| {
            tz.from_local_datetime(&(local + chrono::Duration::hours(1)))
                .earliest()
        })
        .map_or_else(|| local.and_utc(), |t| t.with_timezone(&Utc))
}

impl Windows {
    /// The windows containing `now`, in the key's time zone `tz`.
    pub fn at(now: Millis, tz: Tz) -> Windows {
        let utc = Utc.timestamp_millis_opt(now).single().unwrap_or_default();
        let t = utc.with_timezone(&tz);
        let date = t.date_naive();
        let midnight = |d: NaiveDate| d.and_hms_opt(0, 0, 0).unwrap_or_default();
        let next_day = local_start(tz, midnight(date + Days::new(1)));
        let first_of_next_month = date
            .with_day(1)
            .and_then(|d| d.checked_add_months(Months::new(1)))
            .unwrap_or(date + Days::new(1));
        let next_month = local_start(tz, midnight(first_of_next_month));
        let hour_start = local_start(tz, date.and_hms_opt(t.hour(), 0, 0).unwrap_or_default());
        Windows {
            day: t.format("%Y%m%d").to_string(),
            month: t.format("%Y%m").to_string(),
            hour: t.format("%Y%m%d%H").to_string(),
            ms_to_next_day: (next_day - utc).num_milliseconds(),
            ms_to_next_month: (next_month - utc).num_milliseconds(),
            ms_to_next_hour: (hour_start + chrono::Duration::hours(1) - utc)
                .num_milliseconds()
                .max(1),
        }
    }

    /// Start of the local day containing `now`.
    pub fn day_start(now: Millis, tz: Tz) -> Millis {
        let t = Utc
            .timestamp_millis_opt(now)
            .single()
            .unwrap_or_default()
            .with_timezone(&tz);
        let midnight = t.date_naive().and_hms_opt(0, 0, 0).unwrap_or_default();
        local_start(tz, midnight).timestamp_millis()
    }

    /// Start of the local month containing `now`.
    pub fn month_start(now: Millis, tz: Tz) -> Millis {
        let t = Utc
            .timestamp_millis_opt(now)
            .single()
            .unwrap_or_default()
            .with_timezone(&tz);
        let first = t.date_naive().with_day(1).unwrap_or(t.date_naive());
        local_start(tz, first.and_hms_opt(0, 0, 0).unwrap_or_default()).timestamp_millis()
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
        let w = Windows::at(now, chrono_tz::UTC);
        assert_eq!(w.day, "20261231");
        assert_eq!(w.ms_to_next_day, 30 * 60 * 1000);
        assert_eq!(w.ms_to_next_month, 30 * 60 * 1000);
        assert_eq!(w.ms_to_next_hour, 30 * 60 * 1000);
        assert_eq!(
            Windows::day_start(now, chrono_tz::UTC),
            now - 23 * 3_600_000 - 30 * 60_000
        );
    }

    #[test]
    fn windows_follow_the_key_time_zone() {
        // 2026-12-31T23:30:00Z is 2027-01-01 07:30 in Shanghai (UTC+8).
        let now = 1_798_759_800_000;
        let w = Windows::at(now, chrono_tz::Asia::Shanghai);
        assert_eq!((w.day.as_str(), w.month.as_str()), ("20270101", "202701"));
        assert_eq!(w.ms_to_next_day, (16 * 60 + 30) * 60_000);
        assert_eq!(w.ms_to_next_hour, 30 * 60_000);
        assert_eq!(
            Windows::month_start(now, chrono_tz::Asia::Shanghai),
            now - (7 * 60 + 30) * 60_000
        );
        // India is UTC+5:30: the local hour turns at :30 UTC.
        let w = Windows::at(now, chrono_tz::Asia::Kolkata);
        assert_eq!(w.ms_to_next_hour, 60 * 60_000);
        // New York on the day DST ends (2026-11-01, 25 hours long):
        // 2026-11-01T12:00:00Z is 07:00 EST; the next local midnight is
        // 2026-11-02T05:00:00Z.
        let noon = 1_793_534_400_000;
        let w = Windows::at(noon, chrono_tz::America::New_York);
        assert_eq!(w.day, "20261101");
        assert_eq!(w.ms_to_next_day, 17 * 3_600_000);
        assert_eq!(
            Windows::day_start(noon, chrono_tz::America::New_York),
            noon - 8 * 3_600_000
        );
    }
}
