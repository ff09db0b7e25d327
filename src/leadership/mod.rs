//! Who may dispatch (docs/design.md#leadership): Redis elects, PostgreSQL enforces.
//!
//! The elector holds a Redis lease and, on every acquisition, bumps the epoch in the
//! fence row. It publishes the resulting [`Term`] here. A term has two deadlines on
//! the local monotonic clock: the lease's (Redis) and the fence's (PostgreSQL, see
//! [`fence`]). The dispatcher claims only while the lease holds, and starts a send only
//! while both hold ([`Term::send_permit`]); both checks read the local clock, so a
//! leader that was paused past either stops by itself the moment it runs again,
//! whatever its other tasks are doing.

mod backend;
pub mod campaign;
mod elector;
pub mod fence;
mod lease;
pub mod spread;
pub mod takeover;
mod term;
mod view;

pub use backend::{ElectionBackend, LeaseError, LiveElection};
pub use campaign::{Campaign, ReleaseSignal, lane_lock_key};
pub use elector::{Elector, LeaseTiming, run_redis_elector, run_single_replica};
pub use fence::FenceTiming;
pub use lease::RedisLease;
pub use spread::Spread;
pub use term::{Permit, Term};
pub use view::Leadership;
