//! message-dispatcher: drains a PostgreSQL queue of SMS messages into a provider's
//! HTTP API at a controlled rate, from exactly one leader among many replicas.
//!
//! Layout follows the architecture: [`config`] reads the environment, [`store`] owns
//! PostgreSQL (queue, fence, control), [`leadership`] elects with a Redis lease and
//! fences with the epoch, [`dispatch`] claims, sends and records, [`provider`] talks to
//! the SMS API (and mocks it), [`http`] serves the API from the shared [`state`],
//! [`dependencies`] probes PostgreSQL and Redis, [`app`] wires one replica.

// The OpenAPI document is one large `serde_json::json!` literal (src/http/openapi.rs).
#![recursion_limit = "256"]

pub mod app;
pub mod cache;
pub mod cli;
pub mod config;
pub mod dependencies;
pub mod dispatch;
pub mod domain;
pub mod duration;
pub mod encoding;
pub mod http;
pub mod leadership;
pub mod metrics;
pub mod provider;
pub mod quiet_hours;
pub mod redis;
pub mod retention;
pub mod retry;
pub mod spend;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod version;
pub mod webhooks;

/// Installs the process-wide rustls crypto provider (aws-lc-rs) so no TLS user has to
/// guess. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
