//! One recipient's messages in a lane go out one at a time, in claim order
//! (docs/design.md#order). With `send_concurrency` above 1 two sends to the same number
//! would race to the provider, and "your code is 1234" could arrive after "that code
//! has expired". A send waits for the previous send to the same number in this lane
//! (of this batch or the one before) to be answered; sends to other numbers go on
//! beside it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// How many idle recipients the map keeps before it drops them.
const PRUNE_ABOVE: usize = 4096;

#[derive(Default)]
pub struct RecipientOrder {
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl RecipientOrder {
    /// Waits until the sends to `recipient` asked for earlier are answered; the send
    /// goes while the returned guard lives. Turns are given in the order asked (the
    /// lock is fair), which is the claim order.
    pub async fn turn(&self, recipient: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
            if turns.len() > PRUNE_ABOVE {
                // Only the map holds an idle recipient's lock.
                turns.retain(|_, lock| Arc::strong_count(lock) > 1);
            }
            turns.entry(recipient.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn sends_to_one_recipient_take_turns_in_the_order_asked() {
        let order = Arc::new(RecipientOrder::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, recipient) in ["+1", "+1", "+2", "+1"].into_iter().enumerate() {
            let (order, log) = (order.clone(), log.clone());
            tasks.push(tokio::spawn(async move {
                let _turn = order.turn(recipient).await;
                log.lock().unwrap().push(format!("start {i}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                log.lock().unwrap().push(format!("end {i}"));
            }));
            tokio::task::yield_now().await;
        }
        for task in tasks {
            task.await.unwrap();
        }
        let log = log.lock().unwrap().clone();
        let at = |event: &str| log.iter().position(|e| e == event).unwrap();
        assert!(at("end 0") < at("start 1"), "{log:?}");
        assert!(at("end 1") < at("start 3"), "{log:?}");
        assert!(
            at("start 2") < at("end 0"),
            "another number goes beside: {log:?}"
        );
    }
}
