//! In-process limiter for the embedded default. Same arithmetic as Redis;
//! limits hold within this one process (the embedded mode has one).

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use chrono_tz::Tz;

use super::*;

#[derive(Default)]
struct Counters {
    tat: HashMap<String, f64>,
    counts: HashMap<String, (i64, Millis)>,
}

impl Counters {
    fn get(&self, key: &str, now: Millis) -> i64 {
        self.counts
            .get(key)
            .filter(|(_, expires)| *expires > now)
            .map_or(0, |(n, _)| *n)
    }

    fn add(&mut self, key: &str, by: i64, now: Millis, ttl: i64) {
        let current = self.get(key, now);
        self.counts
            .insert(key.to_string(), (current + by, now + ttl));
    }

    fn prune(&mut self, now: Millis) {
        if self.counts.len() > 100_000 {
            self.counts.retain(|_, (_, expires)| *expires > now);
        }
    }
}

#[derive(Default)]
pub struct MemoryLimiter {
    inner: Mutex<Counters>,
}

impl MemoryLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Limiter for MemoryLimiter {
    async fn rate(
        &self,
        key_id: &str,
        per_second: f64,
        burst: i64,
    ) -> Result<RateDecision, LimiterError> {
        let now = crate::domain::now_ms() as f64;
        let mut inner = self.lock();
        let tat = inner.tat.get(key_id).copied().unwrap_or(0.0);
        let (decision, new_tat) = gcra(tat, now, per_second, burst);
        if let Some(t) = new_tat {
            inner.tat.insert(key_id.to_string(), t);
        }
        Ok(decision)
    }

    async fn reserve(&self, req: &QuotaRequest) -> Result<QuotaDecision, LimiterError> {
        let w = Windows::at(req.now, req.tz);
        let day = format!("{}:d:{}", req.key_id, w.day);
        let month = format!("{}:m:{}", req.key_id, w.month);
        let rcpt: Vec<String> = req
            .recipients
            .iter()
            .map(|r| format!("{}:r:{}:{}", req.key_id, w.hour, recipient_tag(r)))
            .collect();
        let mut c = self.lock();
        c.prune(req.now);
        let (d, m) = (c.get(&day, req.now), c.get(&month, req.now));
        let denied = |policy: Policy| QuotaDecision::Denied {
            policy,
            retry_after_ms: w.retry_after(policy),
            daily_used: d,
            monthly_used: m,
        };
        if req.daily.is_some_and(|l| d + req.count > l) {
            return Ok(denied(Policy::Daily));
        }
        if req.monthly.is_some_and(|l| m + req.count > l) {
            return Ok(denied(Policy::Monthly));
        }
        if let Some(limit) = req.per_recipient_hourly {
            if rcpt.iter().any(|k| c.get(k, req.now) + 1 > limit) {
                return Ok(denied(Policy::PerRecipientHourly));
            }
        }
        let mut counters = vec![(day.clone(), req.count), (month.clone(), req.count)];
        c.add(&day, req.count, req.now, w.ms_to_next_day + 3_600_000);
        c.add(&month, req.count, req.now, w.ms_to_next_month + 3_600_000);
        if req.per_recipient_hourly.is_some() {
            for k in rcpt {
                c.add(&k, 1, req.now, w.ms_to_next_hour + 60_000);
                counters.push((k, 1));
            }
        }
        Ok(QuotaDecision::Allowed {
            daily_used: d + req.count,
            monthly_used: m + req.count,
            reservation: Reservation { counters },
        })
    }

    async fn release(&self, reservation: &Reservation) -> Result<(), LimiterError> {
        let now = crate::domain::now_ms();
        let mut c = self.lock();
        for (key, by) in &reservation.counters {
            if let Some((n, _)) = c.counts.get_mut(key) {
                *n -= by;
            }
        }
        c.prune(now);
        Ok(())
    }

    async fn used(&self, key_id: &str, tz: Tz, now: Millis) -> Result<(i64, i64), LimiterError> {
        let w = Windows::at(now, tz);
        let c = self.lock();
        Ok((
            c.get(&format!("{key_id}:d:{}", w.day), now),
            c.get(&format!("{key_id}:m:{}", w.month), now),
        ))
    }
}
