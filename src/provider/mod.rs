//! The SMS providers: the HTTP client the dispatcher sends with, each provider kind's
//! dialect, and the mock provider used by demos, tests and benchmarks.

mod client;
pub mod dialect;
pub mod mock;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use client::{MAX_ERROR_CHARS, MAX_PROVIDER_ID, ProviderClient, clean_text};

/// One message as a provider is asked to send it.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// The `Idempotency-Key`, the same on every attempt.
    pub delivery_key: &'a str,
    /// E.164.
    pub to: &'a str,
    pub content: &'a str,
    /// The message's sender, else its lane's, else its provider's.
    pub from: Option<&'a str>,
}

/// What the provider's answer means for the message (docs/design.md#provider-answers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// The provider took the message, with its id for it when it gave one.
    Accepted { provider_message_id: Option<String> },
    /// The provider asks us to slow down (429, `Retry-After`, Twilio 20429, Vonage
    /// status 1): the message was not taken and goes again without spending an
    /// attempt; sends to this provider pause for `retry_after` (or a backoff).
    Throttled {
        error: String,
        retry_after: Option<Duration>,
    },
    /// 3xx, 408, 425, 5xx, timeouts, connection and TLS errors: try again later.
    /// `unknown`: the request may have reached the provider (a timeout, a connection
    /// cut after it was written), so the message may only be retried there, under the
    /// same key, never moved to another provider.
    Transient { error: String, unknown: bool },
    /// 401 or 403: the provider refuses our credentials, not the message. Dispatch
    /// pauses; the message waits without spending an attempt.
    Unauthorized { error: String },
    /// Any other answer: retrying would not help (a bad number stays bad).
    Rejected { error: String },
}

/// Where the dispatcher's sends go: the seam a scripted provider plugs into in tests.
/// The dispatcher runs on a single-threaded runtime of its own, so the future need not
/// be `Send`.
#[allow(async_fn_in_trait)]
pub trait Provider: 'static {
    /// Sends one message through the provider named `provider` and classifies the
    /// answer.
    async fn send(&self, provider: &str, message: &Outgoing<'_>) -> SendOutcome;
}

/// The configured providers by name.
#[derive(Default)]
pub struct Providers {
    by_name: HashMap<String, Arc<ProviderClient>>,
}

impl Providers {
    pub fn new(clients: impl IntoIterator<Item = Arc<ProviderClient>>) -> Self {
        Self {
            by_name: clients
                .into_iter()
                .map(|client| (client.name().to_string(), client))
                .collect(),
        }
    }
}

impl Provider for Providers {
    async fn send(&self, provider: &str, message: &Outgoing<'_>) -> SendOutcome {
        match self.by_name.get(provider) {
            Some(client) => client.send(message).await,
            // Only a row written by a replica with another configuration can name one:
            // nothing was sent, and the message may go through a provider we have.
            None => SendOutcome::Transient {
                error: format!("no provider named {provider:?} is configured on this replica"),
                unknown: false,
            },
        }
    }
}
