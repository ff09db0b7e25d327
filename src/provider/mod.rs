//! The SMS provider: the HTTP client the dispatcher sends with, and the mock provider
//! used by demos, tests and benchmarks.

mod client;
pub mod mock;

pub use client::{ProviderClient, SendOutcome, classify_response};

/// Where the dispatcher's sends go: the seam a second provider, or a test's scripted
/// one, plugs into. The dispatcher runs on a single-threaded runtime of its own, so
/// the future need not be `Send`.
#[allow(async_fn_in_trait)]
pub trait Provider: 'static {
    /// Sends one message under its delivery key (`Idempotency-Key`) and classifies
    /// the answer.
    async fn send(&self, delivery_key: &str, to: &str, content: &str) -> SendOutcome;
}

impl Provider for ProviderClient {
    async fn send(&self, delivery_key: &str, to: &str, content: &str) -> SendOutcome {
        ProviderClient::send(self, delivery_key, to, content).await
    }
}
