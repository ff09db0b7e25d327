//! The one retry policy of the program: exponential backoff with jitter.
//!
//! Two users: a message whose send failed transiently waits [`RetryPolicy::delay`]
//! before its next attempt, and start-up connections to PostgreSQL and Redis retry with
//! [`connect_backoff`] (backon) until the dependency answers.

use std::time::Duration;

use backon::ExponentialBuilder;

/// The shortest pause a throttle's `Retry-After` can ask for (`Retry-After: 0` must not
/// make a throttled lane hot-loop).
pub const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Per-message retry delays: `base * 2^(attempt-1)`, capped at `max`, with "equal
/// jitter" (half fixed, half random) so retries of one burst spread out but never come
/// back sooner than half the nominal delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    /// Delay before attempt `attempts + 1`, given that `attempts` (≥ 1) were made.
    pub fn delay(&self, attempts: u32) -> Duration {
        let exponent = attempts.saturating_sub(1).min(32);
        let nominal = self
            .base
            .checked_mul(1u32 << exponent.min(31))
            .unwrap_or(self.max)
            .min(self.max);
        let half = nominal / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// Backoff for (re)connecting to a dependency at start-up: 200 ms doubling to 5 s,
/// with jitter, forever (the caller stops it on shutdown).
pub fn connect_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_doubles_and_is_capped() {
        let policy = RetryPolicy {
            base: Duration::from_secs(30),
            max: Duration::from_secs(1800),
        };
        for _ in 0..100 {
            let first = policy.delay(1);
            assert!(first >= Duration::from_secs(15) && first <= Duration::from_secs(30));
            let third = policy.delay(3);
            assert!(third >= Duration::from_secs(60) && third <= Duration::from_secs(120));
            let huge = policy.delay(1000);
            assert!(huge >= Duration::from_secs(900) && huge <= Duration::from_secs(1800));
        }
    }
}
