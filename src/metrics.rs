//! Prometheus metrics, kept in one registry owned by the app (no globals):
//! HTTP requests and latency by route, delivery outcomes, time from accept
//! to the relay's answer, webhook outcomes. Gauges (queue depth, oldest due
//! message, webhook backlog) are read live at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const RELAY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
];

#[derive(Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, value: f64) {
        for (i, b) in self.bounds.iter().enumerate() {
            if value <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    deliveries: BTreeMap<String, u64>,
    time_to_relay: Option<Histogram>,
    webhooks: BTreeMap<String, u64>,
}

/// Live values read at scrape time.
#[derive(Debug, Default)]
pub struct Gauges {
    pub queue_ready: Vec<(String, u64)>,
    pub queue_delayed: u64,
    pub store: StoreGauges,
}

/// The gauges read from the store. Counting a large backlog costs the store
/// ~10 ms, so they are reused for [`STORE_GAUGES_TTL`]: a scraper (or
/// several, or a load generator polling for its drain) cannot turn
/// `/metrics` into store load.
#[derive(Debug, Default, Clone)]
pub struct StoreGauges {
    pub messages_waiting: i64,
    pub oldest_due_seconds: f64,
    pub webhook_backlog: i64,
}

pub const STORE_GAUGES_TTL: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let mut inner = self.lock();
        *inner
            .requests
            .entry((method.to_string(), route.to_string(), status))
            .or_default() += 1;
        inner
            .latency
            .entry(format!("{method} {route}"))
            .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
            .observe(seconds);
    }

    pub fn delivery(&self, status: &str) {
        *self
            .lock()
            .deliveries
            .entry(status.to_string())
            .or_default() += 1;
    }

    pub fn time_to_relay(&self, seconds: f64) {
        self.lock()
            .time_to_relay
            .get_or_insert_with(|| Histogram::new(RELAY_BUCKETS))
            .observe(seconds);
    }

    pub fn webhook(&self, outcome: &str) {
        *self.lock().webhooks.entry(outcome.to_string()).or_default() += 1;
    }

    pub fn render(&self, gauges: &Gauges) -> String {
        let inner = self.lock();
        let mut out = String::new();
        out.push_str("# HELP mailroom_http_requests_total HTTP requests by route and status.\n# TYPE mailroom_http_requests_total counter\n");
        for ((method, route, status), n) in &inner.requests {
            let _ = writeln!(
                out,
                "mailroom_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP mailroom_http_request_duration_seconds HTTP latency by route.\n# TYPE mailroom_http_request_duration_seconds histogram\n");
        for (key, h) in &inner.latency {
            let (method, route) = key.split_once(' ').unwrap_or(("", key));
            h.render(
                &mut out,
                "mailroom_http_request_duration_seconds",
                &format!("method=\"{method}\",route=\"{route}\""),
            );
        }
        out.push_str("# HELP mailroom_deliveries_total Recipient outcomes by status.\n# TYPE mailroom_deliveries_total counter\n");
        for (status, n) in &inner.deliveries {
            let _ = writeln!(out, "mailroom_deliveries_total{{status=\"{status}\"}} {n}");
        }
        out.push_str("# HELP mailroom_time_to_relay_seconds Time from accept (or send_at) to the relay's answer.\n# TYPE mailroom_time_to_relay_seconds histogram\n");
        inner
            .time_to_relay
            .clone()
            .unwrap_or_else(|| Histogram::new(RELAY_BUCKETS))
            .render(&mut out, "mailroom_time_to_relay_seconds", "");
        out.push_str("# HELP mailroom_webhook_attempts_total Webhook delivery attempts by outcome.\n# TYPE mailroom_webhook_attempts_total counter\n");
        for (outcome, n) in &inner.webhooks {
            let _ = writeln!(
                out,
                "mailroom_webhook_attempts_total{{outcome=\"{outcome}\"}} {n}"
            );
        }
        out.push_str("# HELP mailroom_queue_depth Ids ready in the queue by lane.\n# TYPE mailroom_queue_depth gauge\n");
        for (lane, n) in &gauges.queue_ready {
            let _ = writeln!(out, "mailroom_queue_depth{{lane=\"{lane}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP mailroom_queue_delayed Ids waiting for a retry or send_at.\n# TYPE mailroom_queue_delayed gauge\nmailroom_queue_delayed {}", gauges.queue_delayed);
        let _ = writeln!(out, "# HELP mailroom_messages_waiting Messages not yet final.\n# TYPE mailroom_messages_waiting gauge\nmailroom_messages_waiting {}", gauges.store.messages_waiting);
        let _ = writeln!(out, "# HELP mailroom_oldest_due_seconds Age of the oldest message due and not yet final.\n# TYPE mailroom_oldest_due_seconds gauge\nmailroom_oldest_due_seconds {}", gauges.store.oldest_due_seconds);
        let _ = writeln!(out, "# HELP mailroom_webhook_backlog Webhook deliveries pending.\n# TYPE mailroom_webhook_backlog gauge\nmailroom_webhook_backlog {}", gauges.store.webhook_backlog);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.request("POST", "/v1/send", 202, 0.004);
        m.delivery("delivered");
        m.time_to_relay(0.2);
        let text = m.render(&Gauges::default());
        assert!(text.contains(
            "mailroom_http_requests_total{method=\"POST\",route=\"/v1/send\",status=\"202\"} 1"
        ));
        assert!(text.contains("mailroom_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/send\",le=\"0.005\"} 1"));
        assert!(text.contains("mailroom_deliveries_total{status=\"delivered\"} 1"));
        assert!(text.contains("mailroom_time_to_relay_seconds_count 1"));
    }
}
