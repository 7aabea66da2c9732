//! Redis adapter of the `Limiter` port: each check is one Lua script, so
//! limits are exact across any number of API processes.

use std::time::Duration;

use async_trait::async_trait;
use chrono_tz::Tz;

use super::*;
use crate::redis_conn::RedisConn;

const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local emission = tonumber(ARGV[1])
local limit = emission * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + emission
local diff = new_tat - now
if diff > limit then
  return {0, 0, math.ceil(diff - limit), math.ceil(tat - now)}
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(diff) + 1000)
return {1, math.floor((limit - diff) / emission), 0, math.ceil(diff)}
"#;

const QUOTA: &str = r#"
local count = tonumber(ARGV[1])
local dl = tonumber(ARGV[2])
local ml = tonumber(ARGV[3])
local rl = tonumber(ARGV[4])
local d = tonumber(redis.call('GET', KEYS[1]) or '0')
local m = tonumber(redis.call('GET', KEYS[2]) or '0')
if dl >= 0 and d + count > dl then return {0, 'daily', d, m} end
if ml >= 0 and m + count > ml then return {0, 'monthly', d, m} end
if rl >= 0 then
  for i = 3, #KEYS do
    if tonumber(redis.call('GET', KEYS[i]) or '0') + 1 > rl then
      return {0, 'per_recipient_hourly', d, m}
    end
  end
end
redis.call('INCRBY', KEYS[1], count)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('INCRBY', KEYS[2], count)
redis.call('PEXPIRE', KEYS[2], ARGV[6])
for i = 3, #KEYS do
  redis.call('INCR', KEYS[i])
  redis.call('PEXPIRE', KEYS[i], ARGV[7])
end
return {1, 'ok', d + count, m + count}
"#;

pub struct RedisLimiter {
    conn: RedisConn,
    prefix: String,
    gcra: ::redis::Script,
    quota: ::redis::Script,
}

fn unavailable(e: ::redis::RedisError) -> LimiterError {
    LimiterError::Unavailable(e.to_string())
}

impl RedisLimiter {
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisLimiter, LimiterError> {
        Ok(RedisLimiter {
            conn: RedisConn::new(url, Duration::from_secs(3)).map_err(unavailable)?,
            prefix: prefix.to_string(),
            gcra: ::redis::Script::new(GCRA),
            quota: ::redis::Script::new(QUOTA),
        })
    }

    fn keys(&self, key_id: &str, tz: Tz, now: Millis) -> (Windows, String, String) {
        let w = Windows::at(now, tz);
        let day = format!("{}:quota:{key_id}:d:{}", self.prefix, w.day);
        let month = format!("{}:quota:{key_id}:m:{}", self.prefix, w.month);
        (w, day, month)
    }
}

#[async_trait]
impl Limiter for RedisLimiter {
    async fn rate(
        &self,
        key_id: &str,
        per_second: f64,
        burst: i64,
    ) -> Result<RateDecision, LimiterError> {
        let emission = 1000.0 / per_second.max(0.000_001);
        let mut invocation = self.gcra.key(format!("{}:rate:{key_id}", self.prefix));
        invocation.arg(emission).arg(burst.max(1));
        let (allowed, remaining, retry, reset): (i64, i64, i64, i64) = self
            .conn
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await
            .map_err(unavailable)?;
        Ok(RateDecision {
            allowed: allowed == 1,
            remaining,
            retry_after_ms: retry,
            reset_ms: reset,
        })
    }

    async fn reserve(&self, req: &QuotaRequest) -> Result<QuotaDecision, LimiterError> {
        let (w, day, month) = self.keys(&req.key_id, req.tz, req.now);
        let mut invocation = self.quota.key(&day);
        invocation.key(&month);
        let mut counters = vec![(day, req.count), (month, req.count)];
        if req.per_recipient_hourly.is_some() {
            for r in &req.recipients {
                let k = format!(
                    "{}:rcpt:{}:{}:{}",
                    self.prefix,
                    req.key_id,
                    w.hour,
                    recipient_tag(r)
                );
                invocation.key(&k);
                counters.push((k, 1));
            }
        }
        invocation
            .arg(req.count)
            .arg(req.daily.unwrap_or(-1))
            .arg(req.monthly.unwrap_or(-1))
            .arg(req.per_recipient_hourly.unwrap_or(-1))
            .arg(w.ms_to_next_day + 3_600_000)
            .arg(w.ms_to_next_month + 3_600_000)
            .arg(w.ms_to_next_hour + 60_000);
        let (ok, policy, d, m): (i64, String, i64, i64) = self
            .conn
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await
            .map_err(unavailable)?;
        if ok == 1 {
            return Ok(QuotaDecision::Allowed {
                daily_used: d,
                monthly_used: m,
                reservation: Reservation { counters },
            });
        }
        let policy = Policy::parse(&policy).unwrap_or(Policy::Daily);
        Ok(QuotaDecision::Denied {
            policy,
            retry_after_ms: w.retry_after(policy),
            daily_used: d,
            monthly_used: m,
        })
    }

    async fn release(&self, reservation: &Reservation) -> Result<(), LimiterError> {
        let mut pipe = ::redis::pipe();
        for (key, by) in &reservation.counters {
            pipe.cmd("DECRBY").arg(key).arg(*by).ignore();
        }
        self.conn
            .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
            .map_err(unavailable)
    }

    async fn used(&self, key_id: &str, tz: Tz, now: Millis) -> Result<(i64, i64), LimiterError> {
        let (_, day, month) = self.keys(key_id, tz, now);
        let mut pipe = ::redis::pipe();
        pipe.cmd("GET").arg(day).cmd("GET").arg(month);
        let (d, m): (Option<i64>, Option<i64>) = self
            .conn
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await
            .map_err(unavailable)?;
        Ok((d.unwrap_or(0), m.unwrap_or(0)))
    }
}
