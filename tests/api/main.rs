//! Integration tests: real PostgreSQL, Redis and HTTP providers; the real binary as
//! replica processes. See `support/` for the harness.

mod api;
mod config;
mod dispatch;
mod faults;
mod metrics;
mod migrations;
mod support;
mod tls;
