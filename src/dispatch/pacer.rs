//! The send pacer: no send starts less than `PROCESSING_INTERVAL` after the send
//! `BATCH_SIZE` places before it.
//!
//! Batches are claimed an interval apart (start to start, on PostgreSQL's clock), and
//! their sends normally go out within milliseconds, so the pacer rarely waits. It
//! matters when a batch's sends are held up (results waiting for PostgreSQL, a slow
//! provider): without it, the late tail of one batch and the head of the next would
//! reach the provider back to back, more than BATCH_SIZE within one interval.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::MAX_BATCH_SIZE;

#[derive(Default)]
pub struct Pacer {
    /// Start times handed out, oldest first (at most `MAX_BATCH_SIZE`).
    starts: Mutex<VecDeque<Instant>>,
}

impl Pacer {
    /// Reserves a start time for one send and returns it (now, or later when the
    /// window is full). An interval of zero means no limit.
    pub fn reserve(&self, batch_size: u32, interval: Duration) -> Instant {
        let now = Instant::now();
        if interval.is_zero() {
            return now;
        }
        let mut starts = self.starts.lock().unwrap_or_else(|p| p.into_inner());
        let mut start = starts.back().map_or(now, |last| now.max(*last));
        let window = batch_size as usize;
        if window > 0 && starts.len() >= window {
            start = start.max(starts[starts.len() - window] + interval);
        }
        starts.push_back(start);
        while starts.len() > MAX_BATCH_SIZE as usize {
            starts.pop_front();
        }
        start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_send_after_a_full_window_waits_for_the_interval() {
        let pacer = Pacer::default();
        let interval = Duration::from_secs(10);
        let first = pacer.reserve(2, interval);
        let second = pacer.reserve(2, interval);
        assert!(second - first < Duration::from_millis(50));
        let third = pacer.reserve(2, interval);
        assert!(
            third >= first + interval,
            "the third send waits for the first to age out"
        );
        let fourth = pacer.reserve(2, interval);
        assert!(fourth >= second + interval);
        assert!(
            pacer.reserve(2, Duration::ZERO) <= Instant::now(),
            "interval 0: no limit"
        );
    }
}
