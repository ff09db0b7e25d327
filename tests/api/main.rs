//! Integration tests: real PostgreSQL, Redis and HTTP providers; the real binary as
//! replica processes. See `support/` for the harness.

mod api;
mod cluster;
mod compliance;
mod config;
mod console;
mod delivery_key;
mod dispatch;
mod enqueue;
mod failover;
mod faults;
mod fencing;
mod ha;
mod intake;
mod lanes;
mod lease;
mod lifecycle;
mod metrics;
mod migrations;
mod poolers;
mod provider_answers;
mod providers;
mod rescue;
mod retention;
mod spend;
mod support;
mod tls;
mod webhooks;
