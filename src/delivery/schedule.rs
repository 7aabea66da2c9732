//! Retry timing as plain data: a list of delays (the last repeats) with
//! ±10% jitter so retries of a burst do not all land at once.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct RetrySchedule {
    steps: Vec<Duration>,
    jitter: f64,
}

impl RetrySchedule {
    pub fn new(steps: Vec<Duration>) -> Self {
        Self { steps, jitter: 0.1 }
    }

    pub fn without_jitter(steps: Vec<Duration>) -> Self {
        Self { steps, jitter: 0.0 }
    }

    /// Number of scheduled retries before the last delay starts repeating.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Delay before retry number `retry` (1 = after the first failure).
    pub fn delay(&self, retry: usize) -> Duration {
        let base = self
            .steps
            .get(retry.saturating_sub(1))
            .or(self.steps.last())
            .copied()
            .unwrap_or(Duration::from_secs(60));
        if self.jitter <= 0.0 || base.is_zero() {
            return base;
        }
        let factor = rand::thread_rng().gen_range(1.0 - self.jitter..=1.0 + self.jitter);
        base.mul_f64(factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_step_repeats() {
        let s =
            RetrySchedule::without_jitter(vec![Duration::from_secs(5), Duration::from_secs(60)]);
        assert_eq!(s.delay(1), Duration::from_secs(5));
        assert_eq!(s.delay(2), Duration::from_secs(60));
        assert_eq!(s.delay(9), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let s = RetrySchedule::new(vec![Duration::from_secs(100)]);
        for _ in 0..100 {
            let d = s.delay(1).as_secs_f64();
            assert!((90.0..=110.0).contains(&d), "{d}");
        }
    }
}
