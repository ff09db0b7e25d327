//! The leader's fence session: one PostgreSQL connection of its own, outside the pool,
//! on which the leader keeps confirming that its epoch is still the newest and that
//! the cluster is still running. See `leadership::fence` for why sends depend on it.

use tokio_postgres::{Client, Statement};

use super::{Store, StoreError};
use crate::domain::Epoch;

/// What one confirmation read from the fence row and the desired state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceReading {
    pub epoch: Epoch,
    pub running: bool,
}

/// A plain read: it never waits for the row lock a claim holds, and its snapshot is
/// taken after the query was sent, so an epoch bump committed before the query was
/// sent is always seen.
const CONFIRM: &str = "
SELECT l.epoch, coalesce(c.running, false)
FROM dispatcher_leader l CROSS JOIN dispatcher_control c
WHERE l.id = 1 AND c.id = 1";

pub struct FenceSession {
    client: Client,
    confirm: Statement,
}

impl FenceSession {
    pub async fn open(store: &Store) -> Result<Self, StoreError> {
        let client = store.dedicated_connection().await?;
        let confirm = client.prepare(CONFIRM).await?;
        Ok(Self { client, confirm })
    }

    pub async fn read(&self) -> Result<FenceReading, StoreError> {
        let row = self.client.query_one(&self.confirm, &[]).await?;
        Ok(FenceReading {
            epoch: Epoch(row.get(0)),
            running: row.get(1),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}
