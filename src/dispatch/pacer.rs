//! The send pacer: no send starts less than `PROCESSING_INTERVAL` after the send
//! `BATCH_SIZE` places before it, in this replica or, across a handover, in the one
//! that led before. In a lane that counts segments, a send of `k` segments takes `k`
//! places at once (docs/design.md#rate-limit).
//!
//! Batches are claimed an interval apart (start to start, on PostgreSQL's clock), and
//! their sends normally go out within milliseconds, so the pacer rarely waits. It
//! matters when a batch's sends are held up (a slow provider, a batch claimed while
//! the one before it is still sending, which it then waits for): without it, the late
//! tail of one batch and the head of the next would reach the provider back to back,
//! more than BATCH_SIZE within one interval.
//!
//! The pacer records only real starts: a send asks [`Pacer::try_start`] at the moment
//! it would start, and either starts then (recorded) or learns when to ask again.
//! When a batch closes, the leader writes its newest starts into the fence row; a new
//! leader [seeds](Pacer::seed) its pacer from them, so the rule holds across handovers.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::MAX_BATCH_SIZE;
use crate::domain::Epoch;

#[derive(Default)]
pub struct Pacer {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The term whose history this is; a new term reseeds from the fence row.
    epoch: Option<Epoch>,
    /// Start times, oldest first, one per unit (at most `MAX_BATCH_SIZE`).
    starts: VecDeque<Instant>,
}

impl Pacer {
    /// At the first claim of a term, replaces the history with the cluster's, read
    /// from the fence row: starts `ages_us` microseconds before `read_at` (the local
    /// time the claim's answer arrived, so the estimates are at or after the real
    /// starts). Later calls in the same term change nothing.
    pub fn seed(&self, epoch: Epoch, read_at: Instant, ages_us: &[i64]) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.epoch == Some(epoch) {
            return;
        }
        let mut starts: Vec<Instant> = ages_us
            .iter()
            .map(|&age| {
                let magnitude = Duration::from_micros(age.unsigned_abs());
                if age >= 0 {
                    read_at.checked_sub(magnitude).unwrap_or(read_at)
                } else {
                    read_at + magnitude
                }
            })
            .collect();
        starts.sort();
        state.epoch = Some(epoch);
        state.starts = starts.into();
    }

    /// Starts a send of `units` now if the window allows, recording the start;
    /// otherwise returns when to ask again: once, within the last interval, at most
    /// `batch_size` units including these have started. An interval of zero means no
    /// limit. A send of more units than `batch_size` never fits (the claim fails such
    /// messages before they get here); it is refused for an interval at a time.
    pub fn try_start(
        &self,
        units: u32,
        batch_size: u32,
        interval: Duration,
    ) -> Result<(), Instant> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (window, units) = (batch_size as usize, units.max(1) as usize);
        if !interval.is_zero() && window > 0 {
            if units > window {
                return Err(now + interval);
            }
            // The start that must have aged out of the window: the one `window -
            // units` places before the newest.
            let len = state.starts.len();
            if len + units > window {
                let free_at = state.starts[len + units - window - 1] + interval;
                if free_at > now {
                    return Err(free_at);
                }
            }
        }
        for _ in 0..units {
            state.starts.push_back(now);
        }
        while state.starts.len() > MAX_BATCH_SIZE as usize {
            state.starts.pop_front();
        }
        Ok(())
    }

    /// How long ago (microseconds) the newest `count` sends started, oldest first,
    /// for the fence row.
    pub fn recent_ages_us(&self, count: usize) -> Vec<i64> {
        let now = Instant::now();
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let skip = state.starts.len().saturating_sub(count);
        state
            .starts
            .iter()
            .skip(skip)
            .map(|start| i64::try_from(now.duration_since(*start).as_micros()).unwrap_or(i64::MAX))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_send_after_a_full_window_waits_for_the_interval() {
        let pacer = Pacer::default();
        let interval = Duration::from_secs(10);
        let before = Instant::now();
        assert!(pacer.try_start(1, 2, interval).is_ok());
        assert!(pacer.try_start(1, 2, interval).is_ok());
        let free_at = pacer.try_start(1, 2, interval).unwrap_err();
        assert!(
            free_at >= before + interval,
            "the third waits for the first to age out"
        );
        assert!(
            pacer.try_start(1, 2, Duration::ZERO).is_ok(),
            "interval 0: no limit"
        );
    }

    #[test]
    fn a_send_of_several_segments_takes_as_many_places() {
        let pacer = Pacer::default();
        let interval = Duration::from_secs(10);
        let before = Instant::now();
        assert!(pacer.try_start(3, 5, interval).is_ok(), "3 of 5");
        assert!(pacer.try_start(2, 5, interval).is_ok(), "5 of 5");
        let free_at = pacer.try_start(1, 5, interval).unwrap_err();
        assert!(
            free_at >= before + interval,
            "full until the first ages out"
        );
        assert!(pacer.try_start(6, 5, interval).is_err(), "never fits");
    }

    #[test]
    fn a_new_term_inherits_the_cluster_history_and_keeps_its_own_afterwards() {
        let pacer = Pacer::default();
        let interval = Duration::from_secs(4);
        let now = Instant::now();
        // The previous leader's last two sends started 3 s and 1 s ago.
        pacer.seed(Epoch(7), now, &[3_000_000, 1_000_000]);
        let free_at = pacer.try_start(1, 2, interval).unwrap_err();
        assert!(
            free_at >= now + Duration::from_millis(999),
            "waits for the older one"
        );
        assert!(free_at <= now + Duration::from_millis(1_100));
        // Same term: our own history is not replaced.
        pacer.seed(Epoch(7), now, &[]);
        assert!(pacer.try_start(1, 2, interval).is_err());
        // A new term with an empty record starts at once.
        pacer.seed(Epoch(8), now, &[]);
        assert!(pacer.try_start(1, 2, interval).is_ok());
        let ages = pacer.recent_ages_us(2);
        assert_eq!(ages.len(), 1);
        assert!(ages[0] >= 0);
    }
}
