//! Status webhooks (docs/design.md#status-webhooks): every replica posts the events the
//! triggers wrote, signed per the Standard Webhooks specification, and retries each
//! with backoff until `STATUS_WEBHOOK_RETRY_FOR` after its creation (or its replay);
//! then it is a dead letter, listed at `GET /api/webhooks/failed` and replayable.
//!
//! The request: `POST` the stored body (`{"type", "timestamp", "data"}`) with
//! `webhook-id` (the event's, the same on every attempt), `webhook-timestamp` (this
//! attempt's, Unix seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 over
//! "id.timestamp.body" with the secret's bytes>`. Any 2xx delivers it.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use tokio_util::sync::CancellationToken;

use crate::config::WebhookConfig;
use crate::metrics::Metrics;
use crate::retry::RetryPolicy;
use crate::store::Store;
use crate::store::webhooks::WebhookEvent;

/// Events one worker takes at once, and posts concurrently.
const TAKE: i64 = 16;
/// How long taken events stay with this worker: longer than a post can take.
const LEASE: Duration = Duration::from_secs(60);
/// One post's limit.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// The wait when nothing was due.
const IDLE: Duration = Duration::from_millis(250);
/// Delivered events are forgotten this long after, checked this often.
const KEEP_DELIVERED: Duration = Duration::from_secs(24 * 3600);
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The signature header's value for one attempt.
pub fn sign(key: &[u8], webhook_id: &str, timestamp: i64, body: &str) -> String {
    use aws_lc_rs::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let signed = format!("{webhook_id}.{timestamp}.{body}");
    let tag = hmac::sign(&key, signed.as_bytes());
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    )
}

/// The delay before an event's next attempt: 5 s doubling to an hour, with jitter
/// (shorter when the retry window itself is short, so a test sees several attempts).
fn backoff(config: &WebhookConfig) -> RetryPolicy {
    let base = Duration::from_secs(5).min(config.retry_for / 16);
    RetryPolicy {
        base: base.max(Duration::from_millis(50)),
        max: Duration::from_secs(3600)
            .min(config.retry_for / 2)
            .max(base),
    }
}

/// Posts due events until `shutdown`; returns at once when this replica has no secret
/// (it cannot sign, so it leaves the events to a replica that can).
pub async fn run(
    store: Store,
    config: WebhookConfig,
    metrics: Arc<Metrics>,
    ready: impl Fn() -> bool,
    shutdown: CancellationToken,
) {
    let Some(key) = config.key() else {
        return;
    };
    let client = match reqwest::Client::builder()
        .timeout(POST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(client) => client,
        Err(err) => {
            tracing::error!(error = %err, "cannot build the webhook client; status webhooks are not posted by this replica");
            return;
        }
    };
    let backoff = backoff(&config);
    let mut pruned_at = tokio::time::Instant::now();
    loop {
        if !ready() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        }
        if pruned_at.elapsed() > PRUNE_EVERY {
            pruned_at = tokio::time::Instant::now();
            prune(&store).await;
        }
        let events = match store
            .take_due_webhooks(TAKE, LEASE, config.url.is_some())
            .await
        {
            Ok(events) => events,
            Err(err) => {
                tracing::debug!(error = %err, "cannot take webhook events; will retry");
                Vec::new()
            }
        };
        if events.is_empty() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(IDLE) => continue,
            }
        }
        let posts = events
            .iter()
            .map(|event| deliver(&client, &store, &config, &key, &backoff, &metrics, event));
        futures::future::join_all(posts).await;
    }
}

/// Forgets every event delivered more than [`KEEP_DELIVERED`] ago, and the dead letters
/// of messages retention removed, 1,000 per statement.
async fn prune(store: &Store) {
    loop {
        match store.prune_delivered_webhooks(KEEP_DELIVERED).await {
            Ok(n) if n >= 1000 => continue,
            Ok(_) => break,
            Err(err) => {
                tracing::debug!(error = %err, "cannot prune delivered webhook events");
                return;
            }
        }
    }
    loop {
        match store.prune_orphaned_dead_letters().await {
            Ok(n) if n >= 1000 => continue,
            Ok(_) => return,
            Err(err) => {
                tracing::debug!(error = %err, "cannot prune dead letters of removed messages");
                return;
            }
        }
    }
}

/// Posts one event and records what came of it.
async fn deliver(
    client: &reqwest::Client,
    store: &Store,
    config: &WebhookConfig,
    key: &[u8],
    backoff: &RetryPolicy,
    metrics: &Metrics,
    event: &WebhookEvent,
) {
    let outcome = match event.url.as_deref().or(config.url.as_deref()) {
        None => Err("no endpoint: the message names none and STATUS_WEBHOOK_URL is unset".into()),
        Some(url) => post(client, key, url, event).await,
    };
    let recorded = match &outcome {
        Ok(()) => store
            .webhook_delivered(event.id)
            .await
            .map(|()| "delivered"),
        Err(error) => {
            let retry_in = backoff.delay(event.attempts.max(1) as u32);
            store
                .webhook_attempt_failed(event.id, retry_in, error, config.retry_for)
                .await
                .map(|dead| if dead { "failed" } else { "retry" })
        }
    };
    match recorded {
        Ok(outcome_label) => {
            metrics
                .webhook_deliveries
                .with_label_values(&[outcome_label])
                .inc();
            match (outcome_label, &outcome) {
                ("failed", Err(error)) => tracing::warn!(
                    webhook_id = %event.webhook_id, message_id = event.message_id,
                    event = %event.event_type, attempts = event.attempts, %error,
                    "status webhook given up: listed at GET /api/webhooks/failed"
                ),
                ("retry", Err(error)) => tracing::debug!(
                    webhook_id = %event.webhook_id, attempts = event.attempts, %error,
                    "status webhook not accepted; will retry"
                ),
                _ => {}
            }
        }
        // The lease ends and the event is due again: posted twice at worst, with
        // the same webhook-id.
        Err(err) => {
            tracing::warn!(error = %err, webhook_id = %event.webhook_id, "cannot record a webhook attempt")
        }
    }
}

async fn post(
    client: &reqwest::Client,
    key: &[u8],
    url: &str,
    event: &WebhookEvent,
) -> Result<(), String> {
    let timestamp = chrono::Utc::now().timestamp();
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", &event.webhook_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header(
            "webhook-signature",
            sign(key, &event.webhook_id, timestamp, &event.body),
        )
        .body(event.body.clone())
        .send()
        .await
        .map_err(|err| format!("{url}: {err}"))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{url}: HTTP {}", status.as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification: its secret, id, timestamp and
    /// body give this signature.
    #[test]
    fn the_signature_matches_the_specifications_example() {
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        assert_eq!(
            sign(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                r#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
