//! The SMS provider: the HTTP client the dispatcher sends with, and the mock provider
//! used by demos, tests and benchmarks.

mod client;
pub mod mock;

pub use client::{ProviderClient, SendOutcome, classify_response};
