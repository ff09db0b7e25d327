//! PostgreSQL: the connection pool, migrations, the queue and the control tables.
//!
//! PostgreSQL is the source of truth. Redis only elects; everything that must not be
//! lost or doubled (claims, results, the fence, the desired state) lives here. Each
//! table has one owner module:
//!
//! | module | owns |
//! |---|---|
//! | [`messages`] | `messages` as the API sees it: insert, list, change by hand, stats |
//! | [`claims`] | `messages` as the leader sees it: claim, record results, rescue |
//! | [`fence`] | `dispatcher_leader`, the fence row: every statement that writes or locks it, and the leader sessions (the rescue reads it as a guard) |
//! | [`control`] | `dispatcher_control` (desired state, overrides, pause) and `dispatcher_replicas` |
//! | [`receipts`] | delivery receipts |
//! | [`opt_outs`] | `opt_outs`, the numbers never sent to again |
//! | [`webhooks`] | `webhook_events`, the status webhooks to post |
//! | [`retention`] | `messages` as retention sees it: finished rows removed or blanked |
//! | [`activity`] | `message_sent_seconds`, the activity chart |
//! | [`migrations`] | `sql/`, applied in order |
//!
//! The rows they share are plain types in [`rows`].

#[macro_use]
mod columns;
#[macro_use]
pub mod fence;
pub mod activity;
pub mod claims;
pub mod control;
mod error;
pub mod messages;
pub mod migrations;
pub mod opt_outs;
mod pool;
pub mod receipts;
pub mod retention;
pub mod rows;
pub mod spend;
mod tls;
pub mod webhooks;

pub use error::StoreError;
pub use pool::{DEFAULT_LANE, Store};
pub use rows::*;
