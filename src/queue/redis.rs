//! Redis adapter of the `Queue` port: one stream per lane read through a
//! consumer group (`XREADGROUP`), acknowledged and deleted after the store
//! recorded the outcome, entries of dead consumers taken over with
//! `XAUTOCLAIM`, and a delayed ZSET moved into the streams by a Lua script.
//! If Redis loses everything, the sweeper re-enqueues from the store and the
//! groups are re-created on the next read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::redis::streams::{StreamAutoClaimReply, StreamReadReply};
use async_trait::async_trait;

use super::{lane_order, Job, Queue, QueueDepth, QueueError};
use crate::domain::{now_ms, Millis, Priority};
use crate::redis_conn::RedisConn;

const GROUP: &str = "workers";
/// Entries idle this long in a dead consumer's pending list are taken over.
const CLAIM_IDLE: Duration = Duration::from_secs(120);
const AUTOCLAIM_EVERY: Duration = Duration::from_secs(15);

/// One round trip for a non-blocking receive: moves due delayed entries
/// (`lane|id` members of KEYS[1]) into their lane streams, then reads up to
/// ARGV[6] new entries from the lane streams KEYS[2..] in that order.
/// Returns flat `stream key, entry id, message id` triples. A missing group
/// comes back as Redis's own NOGROUP error.
const TAKE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  local sep = string.find(member, '|', 1, true)
  local lane = string.sub(member, 1, sep - 1)
  local id = string.sub(member, sep + 1)
  redis.call('XADD', ARGV[3] .. ':q:' .. lane, '*', 'id', id)
end
local want = tonumber(ARGV[6])
local out = {}
for i = 2, #KEYS do
  if want <= 0 then break end
  local ok, reply = pcall(redis.call, 'XREADGROUP', 'GROUP', ARGV[4], ARGV[5],
    'COUNT', want, 'STREAMS', KEYS[i], '>')
  if not ok then return redis.error_reply(reply.err or tostring(reply)) end
  if reply then
    for _, entry in ipairs(reply[1][2]) do
      local fields = entry[2]
      local id = ''
      for j = 1, #fields, 2 do
        if fields[j] == 'id' then id = fields[j + 1] end
      end
      table.insert(out, KEYS[i])
      table.insert(out, entry[1])
      table.insert(out, id)
      want = want - 1
    end
  end
end
return out
"#;

/// The oldest entry of the lane streams KEYS[1..] that group ARGV[1] has
/// not delivered to any consumer: the millisecond part of the first entry
/// id after the group's `last-delivered-id`, least over the lanes; nil when
/// no lane has one (or the streams and groups are gone).
const OLDEST: &str = r#"
local oldest = nil
for i = 1, #KEYS do
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[i])
  if ok then
    for _, g in ipairs(groups) do
      local name, last = nil, nil
      for j = 1, #g, 2 do
        if g[j] == 'name' then name = g[j + 1] end
        if g[j] == 'last-delivered-id' then last = g[j + 1] end
      end
      if name == ARGV[1] and last then
        local first = redis.call('XRANGE', KEYS[i], '(' .. last, '+', 'COUNT', 1)[1]
        if first then
          local ms = tonumber(string.match(first[1], '^(%d+)'))
          if oldest == nil or ms < oldest then oldest = ms end
        end
      end
    end
  end
end
return oldest
"#;

pub struct RedisQueue {
    conn: RedisConn,
    /// Blocking reads get their own connection (they hold it while waiting).
    blocking: RedisConn,
    prefix: String,
    consumer: String,
    tick: AtomicU64,
    last_autoclaim: Mutex<Instant>,
    take: ::redis::Script,
    oldest: ::redis::Script,
}

fn unavailable(e: ::redis::RedisError) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

impl RedisQueue {
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisQueue, QueueError> {
        let queue = RedisQueue {
            conn: RedisConn::new(url, Duration::from_secs(5)).map_err(unavailable)?,
            blocking: RedisConn::new(url, Duration::from_secs(5)).map_err(unavailable)?,
            prefix: prefix.to_string(),
            consumer: format!("c-{}", uuid::Uuid::new_v4().simple()),
            tick: AtomicU64::new(0),
            last_autoclaim: Mutex::new(Instant::now()),
            take: ::redis::Script::new(TAKE),
            oldest: ::redis::Script::new(OLDEST),
        };
        queue.ensure_groups().await?;
        Ok(queue)
    }

    fn stream(&self, lane: Priority) -> String {
        format!("{}:q:{}", self.prefix, lane.as_str())
    }

    fn delayed(&self) -> String {
        format!("{}:delayed", self.prefix)
    }

    async fn ensure_groups(&self) -> Result<(), QueueError> {
        for lane in Priority::ALL {
            let mut cmd = ::redis::cmd("XGROUP");
            cmd.arg("CREATE")
                .arg(self.stream(lane))
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM");
            let created: Result<(), ::redis::RedisError> = self
                .conn
                .run(|mut c| async move { cmd.query_async(&mut c).await })
                .await;
            match created {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(unavailable(e)),
            }
        }
        Ok(())
    }

    /// Promotes due delayed entries and reads up to `max` ready ones, lanes
    /// in [`lane_order`], in one round trip ([`TAKE`]).
    async fn take(&self, max: usize) -> Result<Vec<Job>, QueueError> {
        let order = lane_order(self.tick.fetch_add(1, Ordering::Relaxed));
        let mut invocation = self.take.key(self.delayed());
        for lane in order {
            invocation.key(self.stream(lane));
        }
        invocation
            .arg(now_ms())
            .arg(1000)
            .arg(&self.prefix)
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(max);
        let reply: Result<Vec<String>, _> = self
            .conn
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await;
        let Some(flat) = self.unless_lost(reply).await? else {
            return Ok(Vec::new());
        };
        Ok(flat
            .chunks_exact(3)
            .filter_map(|t| {
                let id = Some(t[2].clone()).filter(|id| !id.is_empty());
                self.job(&t[0], t[1].clone(), id)
            })
            .collect())
    }

    /// Waits up to `block` for new entries on any lane.
    async fn read_blocking(&self, count: usize, block: Duration) -> Result<Vec<Job>, QueueError> {
        let mut cmd = ::redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS");
        for lane in Priority::ALL {
            cmd.arg(self.stream(lane));
        }
        for _ in Priority::ALL {
            cmd.arg(">");
        }
        let reply: Result<Option<StreamReadReply>, _> = self
            .blocking
            .run(|mut c| async move { cmd.query_async(&mut c).await })
            .await;
        let Some(Some(reply)) = self.unless_lost(reply).await? else {
            return Ok(Vec::new());
        };
        let mut jobs = Vec::new();
        for key in reply.keys {
            for entry in key.ids {
                jobs.extend(self.job(&key.key, entry.id.clone(), entry.get("id")));
            }
        }
        Ok(jobs)
    }

    /// A read's reply, or `None` when Redis lost our streams (restart,
    /// FLUSHALL): the groups are re-created and the sweeper refills them
    /// from the store.
    async fn unless_lost<T>(
        &self,
        reply: Result<T, ::redis::RedisError>,
    ) -> Result<Option<T>, QueueError> {
        match reply {
            Ok(reply) => Ok(Some(reply)),
            Err(e) if e.code() == Some("NOGROUP") => {
                self.ensure_groups().await?;
                Ok(None)
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The job for stream entry `token` of stream `key` (`None`, logged, if
    /// the entry carries no message id).
    fn job(&self, key: &str, token: String, id: Option<String>) -> Option<Job> {
        let Some(id) = id else {
            tracing::warn!(entry = %token, "queue entry without id");
            return None;
        };
        let lane = Priority::ALL
            .into_iter()
            .find(|p| self.stream(*p) == key)
            .unwrap_or(Priority::Normal);
        Some(Job { id, lane, token })
    }

    async fn autoclaim(&self, max: usize) -> Result<Vec<Job>, QueueError> {
        {
            let mut last = self
                .last_autoclaim
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.elapsed() < AUTOCLAIM_EVERY {
                return Ok(Vec::new());
            }
            *last = Instant::now();
        }
        let mut jobs = Vec::new();
        for lane in Priority::ALL {
            let mut cmd = ::redis::cmd("XAUTOCLAIM");
            cmd.arg(self.stream(lane))
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(CLAIM_IDLE.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(max);
            let reply: Result<StreamAutoClaimReply, ::redis::RedisError> = self
                .conn
                .run(|mut c| async move { cmd.query_async(&mut c).await })
                .await;
            match reply {
                Ok(reply) => {
                    for entry in reply.claimed {
                        if let Some(id) = entry.get::<String>("id") {
                            jobs.push(Job {
                                id,
                                lane,
                                token: entry.id,
                            });
                        }
                    }
                }
                Err(e) if e.code() == Some("NOGROUP") => {}
                Err(e) => return Err(unavailable(e)),
            }
        }
        if !jobs.is_empty() {
            tracing::info!(
                count = jobs.len(),
                "took over queue entries of a dead consumer"
            );
        }
        Ok(jobs)
    }
}

#[async_trait]
impl Queue for RedisQueue {
    async fn enqueue(&self, items: &[(String, Priority)]) -> Result<(), QueueError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut pipe = ::redis::pipe();
        for (id, lane) in items {
            pipe.cmd("XADD")
                .arg(self.stream(*lane))
                .arg("*")
                .arg("id")
                .arg(id)
                .ignore();
        }
        self.conn
            .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
            .map_err(unavailable)
    }

    async fn schedule(&self, id: &str, lane: Priority, at: Millis) -> Result<(), QueueError> {
        if at <= now_ms() {
            return self.enqueue(&[(id.to_string(), lane)]).await;
        }
        let mut cmd = ::redis::cmd("ZADD");
        cmd.arg(self.delayed())
            .arg(at)
            .arg(format!("{}|{}", lane.as_str(), id));
        self.conn
            .run(|mut c| async move { cmd.query_async::<()>(&mut c).await })
            .await
            .map_err(unavailable)
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Job>, QueueError> {
        let mut jobs = self.autoclaim(max).await?;
        if jobs.len() < max {
            jobs.extend(self.take(max - jobs.len()).await?);
        }
        if !jobs.is_empty() || wait.is_zero() {
            return Ok(jobs);
        }
        // Nothing ready: block on all lanes, but not past the next delayed
        // entry (checked again on the next call).
        let wait = wait.min(Duration::from_millis(500));
        self.read_blocking(max, wait).await
    }

    async fn ack(&self, jobs: &[Job]) -> Result<(), QueueError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut pipe = ::redis::pipe();
        for lane in Priority::ALL {
            let tokens: Vec<&str> = jobs
                .iter()
                .filter(|j| j.lane == lane)
                .map(|j| j.token.as_str())
                .collect();
            if tokens.is_empty() {
                continue;
            }
            let stream = self.stream(lane);
            pipe.cmd("XACK")
                .arg(&stream)
                .arg(GROUP)
                .arg(&tokens)
                .ignore()
                .cmd("XDEL")
                .arg(&stream)
                .arg(&tokens)
                .ignore();
        }
        self.conn
            .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
            .map_err(unavailable)
    }

    async fn depth(&self) -> Result<QueueDepth, QueueError> {
        let mut pipe = ::redis::pipe();
        for lane in Priority::ALL {
            pipe.cmd("XLEN").arg(self.stream(lane));
        }
        pipe.cmd("ZCARD").arg(self.delayed());
        let counts: Vec<u64> = self
            .conn
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await
            .map_err(unavailable)?;
        Ok(QueueDepth {
            ready: Priority::ALL
                .iter()
                .zip(counts.iter())
                .map(|(p, n)| (*p, *n))
                .collect(),
            delayed: counts.get(3).copied().unwrap_or(0),
        })
    }

    /// From the stream entry ids, which Redis stamps with its own clock at
    /// `XADD` (the sweeper allows for skew and commit-to-enqueue time).
    async fn oldest_waiting(&self) -> Result<Option<Millis>, QueueError> {
        let mut invocation = self.oldest.prepare_invoke();
        for lane in Priority::ALL {
            invocation.key(self.stream(lane));
        }
        invocation.arg(GROUP);
        self.conn
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await
            .map_err(unavailable)
    }

    async fn ping(&self) -> Result<(), QueueError> {
        self.conn
            .run(|mut c| async move { ::redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    fn is_volatile(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}
