//! The dispatcher (docs/design.md#dispatch): while this replica leads, claim a batch when
//! the cluster's schedule says so, send it, record every result.
//!
//! | module | holds |
//! |---|---|
//! | [`dispatcher`] | the loop: claims, the rescue, the running batches |
//! | `batch` | one batch: sends through the start gate, results, the close |
//! | `handoff` | how a batch hands over to the next (shared slots, signals) |
//! | [`recorder`] | group commit of accepted sends |
//! | [`pacer`] | the rate: no more than a batch's worth of starts per interval |
//! | [`routing`] | which provider: breakers, throttles, the effective rate |
//! | `recipients` | one recipient's sends one at a time, in claim order |
//! | `backend` | the seam to PostgreSQL and Redis ([`Backend`]) |

pub mod activity;
mod backend;
mod batch;
pub mod dispatcher;
mod handoff;
pub mod pacer;
mod recipients;
pub mod recorder;
pub mod routing;
#[cfg(test)]
mod tests;

pub use backend::{Backend, Live, ResultStore};
pub use dispatcher::{DispatchSettings, Dispatcher, PauseState};
pub use pacer::Pacer;
pub use recipients::RecipientOrder;
pub use recorder::Recorder;
pub use routing::{RouteSettings, Routing};
