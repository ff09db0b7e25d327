//! The provider client (docs/design.md#sending, #provider-answers): one POST per message, classified into
//! accepted / retry later / rejected.
//!
//! Everything taken from the provider's answer is bounded and cleaned here, before it
//! can reach SQL: the body is read up to [`MAX_BODY`], NUL bytes and other control
//! characters are dropped, a `messageId` longer than [`MAX_PROVIDER_ID`] is not kept,
//! and errors are cut to [`MAX_ERROR_CHARS`]. (`Retry-After` is capped by the retry
//! policy, which knows `RETRY_BACKOFF_MAX`.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde_json::{Value, json};

use crate::config::ProviderConfig;
use crate::metrics::Metrics;
use crate::version::BUILD;

/// What the provider's answer means for the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Any 2xx. The id comes from the body's `messageId`, `message_id` or `id`.
    Accepted { provider_message_id: Option<String> },
    /// 3xx, 408, 425, 429, 5xx, timeouts, connection and TLS errors: try again
    /// later, not before `retry_after` when the provider said so.
    Transient {
        error: String,
        retry_after: Option<Duration>,
    },
    /// 401 or 403: the provider refuses our credentials, not the message. Dispatch
    /// pauses; the message waits without spending an attempt.
    Unauthorized { error: String },
    /// Any other answer: retrying would not help (a bad number stays bad).
    Rejected { error: String },
}

pub struct ProviderClient {
    http: reqwest::Client,
    url: Url,
    auth_header: HeaderName,
    auth_value: HeaderValue,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl ProviderClient {
    pub fn new(config: &ProviderConfig, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        // The overall timeout is applied per exchange in `send`.
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .user_agent(format!("message-dispatcher/{}", BUILD.version))
            // A redirect is an answer to classify, not to follow (a POST must not turn
            // into a GET somewhere else).
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = &config.ca_cert {
            let pem = std::fs::read(path)
                .map_err(|err| anyhow::anyhow!("SMS_API_CA_CERT {}: {err}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|err| {
                anyhow::anyhow!(
                    "SMS_API_CA_CERT {}: not PEM certificates: {err}",
                    path.display()
                )
            })?;
            if certs.is_empty() {
                anyhow::bail!("SMS_API_CA_CERT {}: no certificate found", path.display());
            }
            builder = builder.tls_certs_merge(certs);
        }
        if config.insecure_skip_verify {
            tracing::warn!(
                "SMS_API_INSECURE_SKIP_VERIFY=true: the provider's TLS certificate is not checked; \
                 anyone on the network path can read and answer these requests"
            );
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        let (auth_header, auth_value) = match &config.auth_header {
            Some(name) => (
                HeaderName::from_bytes(name.as_bytes())?,
                HeaderValue::from_str(config.token.expose())?,
            ),
            None => (
                AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {}", config.token.expose()))?,
            ),
        };
        let mut auth_value = auth_value;
        auth_value.set_sensitive(true);
        Ok(Self {
            http: builder.build()?,
            url: Url::parse(&config.url)?,
            auth_header,
            auth_value,
            timeout: config.timeout,
            metrics,
        })
    }

    /// The longest a send can last once started, with `SMS_API_TIMEOUT` = `timeout`:
    /// the timeout plus the grace for an answer already in the socket. The rescue
    /// wait is built on it.
    pub fn longest_exchange(timeout: Duration) -> Duration {
        timeout + TIMEOUT_GRACE
    }

    /// Sends one message under its delivery key (the `Idempotency-Key`, the same on
    /// every attempt). Never fails: every error is an outcome for the row.
    pub async fn send(&self, delivery_key: &str, to: &str, content: &str) -> SendOutcome {
        let started = Instant::now();
        let exchange = async {
            let mut response = self
                .http
                .post(self.url.clone())
                .header(self.auth_header.clone(), self.auth_value.clone())
                .header("Idempotency-Key", delivery_key)
                .json(&json!({ "to": to, "content": content }))
                .send()
                .await?;
            let status = response.status();
            let headers = response.headers().clone();
            // Read at most MAX_BODY: a provider (or whatever answers at its address)
            // cannot make us hold megabytes per message.
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                let room = MAX_BODY - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if body.len() >= MAX_BODY {
                    break;
                }
            }
            Ok::<_, reqwest::Error>((status, headers, body))
        };
        let mut exchange = std::pin::pin!(exchange);
        let result = match tokio::time::timeout(self.timeout, &mut exchange).await {
            Ok(result) => result.map_err(Failure::Http),
            // The timer can win the race against an answer that is already in the
            // socket when this process was frozen (SIGSTOP, a VM stall) past the
            // timeout: give the answer a moment before calling it a timeout, so a
            // paused replica does not misread a delivered message as lost.
            Err(_) => match tokio::time::timeout(TIMEOUT_GRACE, &mut exchange).await {
                Ok(result) => result.map_err(Failure::Http),
                Err(_) => Err(Failure::Timeout),
            },
        };
        let outcome = match result {
            Ok((status, headers, body)) => {
                self.metrics
                    .provider_requests
                    .with_label_values(&[status.as_str()])
                    .inc();
                classify_response(status, &headers, &body)
            }
            Err(failure) => {
                let (kind, detail) = match &failure {
                    Failure::Timeout => ("timeout", format!("no answer within {:?}", self.timeout)),
                    Failure::Http(err) => (error_kind(err), clean_text(&error_chain(err))),
                };
                self.metrics
                    .provider_requests
                    .with_label_values(&[kind])
                    .inc();
                SendOutcome::Transient {
                    error: format!("{kind}: {detail}"),
                    retry_after: None,
                }
            }
        };
        self.metrics
            .provider_request_duration
            .observe(started.elapsed().as_secs_f64());
        outcome
    }
}

/// Why an exchange with the provider produced no answer.
enum Failure {
    Timeout,
    Http(reqwest::Error),
}

/// How long an answer may still arrive after `SMS_API_TIMEOUT` fired (see `send`).
const TIMEOUT_GRACE: Duration = Duration::from_millis(100);

/// The most of an answer's body that is read.
pub const MAX_BODY: usize = 64 * 1024;
/// A longer `messageId` is not kept (it would not fit what receipts are matched on).
pub const MAX_PROVIDER_ID: usize = 255;
/// `last_error` is cut to this many characters.
pub const MAX_ERROR_CHARS: usize = 500;

/// The response classification of docs/design.md#provider-answers, as a pure function.
///
/// 3xx: redirects are not followed (a POST must not turn into a GET elsewhere), so a
/// redirect means the provider did not take the message; it is usually a wrong
/// `SMS_API_URL`, which the operator can fix. It is retried like a 5xx, so no message
/// is failed for good by a configuration mistake, and `MAX_ATTEMPTS` still bounds it.
pub fn classify_response(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> SendOutcome {
    if status.is_success() {
        return SendOutcome::Accepted {
            provider_message_id: message_id(body),
        };
    }
    if status.is_redirection() {
        let location = headers
            .get(reqwest::header::LOCATION)
            .map(|v| clean_text(&String::from_utf8_lossy(v.as_bytes())))
            .unwrap_or_else(|| "(no Location)".into());
        return SendOutcome::Transient {
            error: clean_text(&format!(
                "HTTP {}: redirect to {location} not followed; check SMS_API_URL",
                status.as_u16()
            )),
            retry_after: None,
        };
    }
    let error = format!("HTTP {}: {}", status.as_u16(), body_excerpt(body));
    let transient = matches!(status.as_u16(), 408 | 425 | 429) || status.is_server_error();
    if transient {
        SendOutcome::Transient {
            error,
            retry_after: headers.get(RETRY_AFTER).and_then(parse_retry_after),
        }
    } else if matches!(status.as_u16(), 401 | 403) {
        SendOutcome::Unauthorized { error }
    } else {
        SendOutcome::Rejected { error }
    }
}

/// The provider's id for the message, cleaned; `None` when absent, empty after
/// cleaning, or longer than [`MAX_PROVIDER_ID`] (logged by the caller as missing).
fn message_id(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let raw = ["messageId", "message_id", "id"]
        .iter()
        .find_map(|key| match value.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })?;
    let id: String = raw.chars().filter(|c| !c.is_control()).collect();
    let id = id.trim();
    (!id.is_empty() && id.len() <= MAX_PROVIDER_ID).then(|| id.to_string())
}

/// `Retry-After` as seconds or an HTTP date. Any value parses to some duration;
/// the retry policy caps it (`RetryPolicy::after`).
fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Saturates instead of failing on absurd values such as 99999999999999999999.
        let secs = text.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(text).ok()?;
    let wait = when.signed_duration_since(chrono::Utc::now());
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// The first 200 characters of a body, for `last_error`.
fn body_excerpt(body: &[u8]) -> String {
    let text = clean_text(&String::from_utf8_lossy(body));
    let trimmed = text.trim();
    match trimmed.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &trimmed[..cut]),
        None if trimmed.is_empty() => "(empty body)".into(),
        None => trimmed.to_string(),
    }
}

/// Text from outside made safe to store and log: control characters (NUL above all,
/// which PostgreSQL refuses in text) become spaces, and the length is bounded.
pub fn clean_text(text: &str) -> String {
    let mut clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_ERROR_CHARS)
        .collect();
    if text.chars().nth(MAX_ERROR_CHARS).is_some() {
        clean.pop();
        clean.push('…');
    }
    clean
}

/// A metric label for a request that got no HTTP answer.
fn error_kind(err: &reqwest::Error) -> &'static str {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = source {
        let is_tls = current.is::<rustls::Error>()
            || current
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<rustls::Error>());
        if is_tls {
            return "tls";
        }
        source = current.source();
    }
    if err.is_timeout() {
        "timeout"
    } else if err.is_connect() {
        "connect"
    } else {
        "error"
    }
}

/// The error and its causes on one line (reqwest's own message hides the cause).
fn error_chain(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(status: u16, retry_after: Option<&str>, body: &str) -> SendOutcome {
        let mut headers = HeaderMap::new();
        if let Some(value) = retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        }
        classify_response(
            StatusCode::from_u16(status).unwrap(),
            &headers,
            body.as_bytes(),
        )
    }

    #[test]
    fn every_2xx_is_accepted_with_its_id() {
        let accepted = |id: &str| SendOutcome::Accepted {
            provider_message_id: Some(id.into()),
        };
        assert_eq!(
            classify(202, None, r#"{"message":"Accepted","messageId":"a1"}"#),
            accepted("a1")
        );
        assert_eq!(
            classify(200, None, r#"{"message_id":"b2"}"#),
            accepted("b2")
        );
        assert_eq!(classify(201, None, r#"{"id":42}"#), accepted("42"));
        assert_eq!(
            classify(200, None, "ok"),
            SendOutcome::Accepted {
                provider_message_id: None
            }
        );
    }

    #[test]
    fn transient_answers_are_retried_and_honour_retry_after() {
        for status in [408, 425, 429, 500, 502, 503, 504] {
            assert!(
                matches!(classify(status, None, ""), SendOutcome::Transient { .. }),
                "{status}"
            );
        }
        match classify(429, Some("120"), "slow down") {
            SendOutcome::Transient { retry_after, error } => {
                assert_eq!(retry_after, Some(Duration::from_secs(120)));
                assert!(error.contains("429") && error.contains("slow down"));
            }
            other => panic!("{other:?}"),
        }
        let date = (chrono::Utc::now() + chrono::Duration::seconds(60)).to_rfc2822();
        match classify(503, Some(&date), "") {
            SendOutcome::Transient {
                retry_after: Some(wait),
                ..
            } => assert!(wait > Duration::from_secs(50) && wait <= Duration::from_secs(60)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn provider_values_are_cleaned_and_bounded_before_they_reach_sql() {
        match classify(202, None, "{\"messageId\": \"ab\\u0000c\"}") {
            SendOutcome::Accepted {
                provider_message_id: Some(id),
            } => assert_eq!(id, "abc"),
            other => panic!("{other:?}"),
        }
        let long = format!("{{\"messageId\": \"{}\"}}", "x".repeat(MAX_PROVIDER_ID + 1));
        assert_eq!(
            classify(202, None, &long),
            SendOutcome::Accepted {
                provider_message_id: None
            }
        );
        match classify(500, Some("99999999999999999999"), "bad\0body") {
            SendOutcome::Transient { error, retry_after } => {
                assert!(!error.contains('\0'), "{error:?}");
                assert_eq!(retry_after, Some(Duration::from_secs(u64::MAX)));
            }
            other => panic!("{other:?}"),
        }
        let huge = "e".repeat(10_000);
        match classify(400, None, &huge) {
            SendOutcome::Rejected { error } => assert!(error.chars().count() <= 220),
            other => panic!("{other:?}"),
        }
        assert!(clean_text(&"é".repeat(2 * MAX_ERROR_CHARS)).chars().count() <= MAX_ERROR_CHARS);
    }

    #[test]
    fn a_redirect_is_retried_and_names_its_target() {
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::LOCATION,
            HeaderValue::from_static("https://elsewhere.example/send"),
        );
        match classify_response(StatusCode::FOUND, &headers, b"") {
            SendOutcome::Transient { error, .. } => {
                assert!(
                    error.contains("302") && error.contains("elsewhere.example"),
                    "{error}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_client_errors_are_final() {
        for status in [400, 404, 409, 422] {
            assert!(
                matches!(classify(status, None, "bad"), SendOutcome::Rejected { .. }),
                "{status}"
            );
        }
        for status in [401, 403] {
            assert!(
                matches!(
                    classify(status, None, "bad"),
                    SendOutcome::Unauthorized { .. }
                ),
                "{status}"
            );
        }
    }
}
