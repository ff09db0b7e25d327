//! What the lanes spent this UTC day (docs/design.md#spend-caps), from `lane_spend`:
//! a few rows per day, whatever the size of the queue.

use serde::Serialize;

use super::{Store, StoreError};
use crate::spend::Micros;

/// One lane's sends through one provider this UTC day.
#[derive(Debug, Clone, Serialize)]
pub struct SpendToday {
    pub lane: String,
    pub provider: String,
    #[serde(skip)]
    pub micros: Micros,
    /// In the prices' currency.
    pub amount: f64,
    pub messages: i64,
}

impl Store {
    /// Every lane's spend this UTC day (on the database's clock), per provider.
    pub async fn spend_today(&self) -> Result<Vec<SpendToday>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT lane, provider, amount_micros, messages FROM lane_spend
                 WHERE day = (now() AT TIME ZONE 'UTC')::date AND messages <> 0
                 ORDER BY lane, provider",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| SpendToday {
                lane: row.get(0),
                provider: row.get(1),
                micros: Micros(row.get(2)),
                amount: Micros(row.get(2)).units(),
                messages: row.get(3),
            })
            .collect())
    }
}

/// The sum of `lane`'s spend in `today`.
pub fn lane_total(today: &[SpendToday], lane: &str) -> Micros {
    Micros(
        today
            .iter()
            .filter(|s| s.lane == lane)
            .map(|s| s.micros.0)
            .sum(),
    )
}
