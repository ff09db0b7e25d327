//! `opt_outs`: the numbers never sent to again (docs/design.md#opt-outs).
//!
//! The list is read in two places that do not live here: intake inserts a message to a
//! listed number as `blocked` (`messages::insert_messages`), and the claim turns a
//! claimed message to a number listed since then into `blocked` before it is sent
//! (`claims::BLOCK_OPTED_OUT`). Between the two, a number listed while its message
//! waits in the queue is caught at the claim; a message already claimed when the
//! number is listed (a batch's few seconds) still goes out.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::Row;

use super::{Store, StoreError};

/// One listed number.
#[derive(Debug, Clone, Serialize)]
pub struct OptOut {
    pub phone_number: String,
    /// The ISO region of the number, from its country code; not stored.
    pub country: Option<String>,
    pub since: DateTime<Utc>,
    /// `api` (or what the operator's request named) or `inbound:<provider>`.
    pub source: String,
}

impl OptOut {
    fn from_row(row: &Row) -> Self {
        let phone_number: String = row.get("phone_number");
        Self {
            country: crate::domain::country_of(&phone_number),
            phone_number,
            since: row.get("since"),
            source: row.get("source"),
        }
    }
}

/// A page of the list, in number order; `next_cursor` is the last number of the page
/// when more follow.
#[derive(Debug, Clone, Serialize)]
pub struct OptOutPage {
    pub opt_outs: Vec<OptOut>,
    pub next_cursor: Option<String>,
}

/// Lists a number; a number already listed keeps its first `since` and `source`. The
/// no-op update returns the stored row either way, and `xmax = 0` tells a fresh insert.
const LIST_NUMBER: &str = "
INSERT INTO opt_outs AS o (phone_number, source) VALUES ($1::text, $2::text)
ON CONFLICT (phone_number) DO UPDATE SET phone_number = o.phone_number
RETURNING phone_number, since, source, xmax = 0 AS created";

const FIND: &str = "SELECT phone_number, since, source FROM opt_outs WHERE phone_number = $1";

const UNLIST: &str = "DELETE FROM opt_outs WHERE phone_number = $1";

const PAGE: &str = "
SELECT phone_number, since, source FROM opt_outs
WHERE $1::text IS NULL OR phone_number > $1::text
ORDER BY phone_number LIMIT $2::int8";

/// Numbers are E.164 (`+` and 7 to 15 digits), as the callers give them: the API's
/// parsed by libphonenumber, a provider's STOP as it came when libphonenumber does not
/// know the number (better listed than lost).
impl Store {
    /// Lists `phone` (no sends to it from now on). Returns the entry and whether this
    /// call made it (false: the number was listed already, and keeps its entry).
    pub async fn opt_out(&self, phone: &str, source: &str) -> Result<(OptOut, bool), StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                &client.prepare_cached(LIST_NUMBER).await?,
                &[&phone, &source],
            )
            .await?;
        Ok((OptOut::from_row(&row), row.get("created")))
    }

    /// The entry of `phone`, if it is listed.
    pub async fn opt_out_of(&self, phone: &str) -> Result<Option<OptOut>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(&client.prepare_cached(FIND).await?, &[&phone])
            .await?;
        Ok(row.as_ref().map(OptOut::from_row))
    }

    /// Takes `phone` off the list (it opted back in); false when it was not listed.
    pub async fn opt_in(&self, phone: &str) -> Result<bool, StoreError> {
        Ok(self.execute_prepared(UNLIST, &[&phone]).await? > 0)
    }

    /// A page of the list after the number `cursor`.
    pub async fn list_opt_outs(
        &self,
        cursor: Option<&str>,
        limit: i64,
    ) -> Result<OptOutPage, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &client.prepare_cached(PAGE).await?,
                &[&cursor, &(limit + 1)],
            )
            .await?;
        let mut opt_outs: Vec<OptOut> = rows.iter().map(OptOut::from_row).collect();
        let next_cursor = if opt_outs.len() as i64 > limit {
            opt_outs.truncate(limit as usize);
            opt_outs.last().map(|o| o.phone_number.clone())
        } else {
            None
        };
        Ok(OptOutPage {
            opt_outs,
            next_cursor,
        })
    }
}
