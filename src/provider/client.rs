//! The provider client (docs/design.md#sending, #provider-answers): one POST per message
//! in the provider's own dialect (see `dialect`), classified into accepted / throttled /
//! retry later / rejected.
//!
//! Everything taken from the provider's answer is bounded and cleaned here, before it
//! can reach SQL: the body is read up to [`MAX_BODY`], NUL bytes and other control
//! characters are dropped, a message id longer than [`MAX_PROVIDER_ID`] is not kept,
//! and errors are cut to [`MAX_ERROR_CHARS`]. (`Retry-After` is capped by the
//! throttle, which knows `RETRY_BACKOFF_MAX`.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};

use super::dialect::{self, Body};
use super::{Outgoing, SendOutcome};
use crate::config::{ProviderKind, ProviderSpec};
use crate::metrics::Metrics;
use crate::version::BUILD;

pub struct ProviderClient {
    spec: ProviderSpec,
    /// Where the provider should post this message's receipt, if anywhere.
    callback: Option<String>,
    http: reqwest::Client,
    /// The header carrying the credentials; `None` for Vonage, whose secret is in the
    /// body.
    auth: Option<(HeaderName, HeaderValue)>,
    metrics: Arc<Metrics>,
}

impl ProviderClient {
    /// `receipts_token`: what `/api/providers/{name}/receipts` wants from callbacks that
    /// cannot sign (`DLR_TOKEN`, else `API_TOKEN`).
    pub fn new(
        spec: &ProviderSpec,
        receipts_token: Option<&str>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let config = &spec.settings;
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
                provider = %spec.name,
                "SMS_API_INSECURE_SKIP_VERIFY=true (insecure_skip_verify in DISPATCH_CONFIG): \
                 the provider's TLS certificate is not checked; anyone on the network path \
                 can read and answer these requests"
            );
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        let token = config.token.expose();
        let auth = match (spec.kind, &config.auth_header) {
            (ProviderKind::HttpJson, Some(name)) => Some((
                HeaderName::from_bytes(name.as_bytes())?,
                HeaderValue::from_str(token)?,
            )),
            (ProviderKind::HttpJson, None) => Some((
                AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {token}"))?,
            )),
            (ProviderKind::Twilio, _) => {
                use base64::Engine;
                let user = spec.account_sid.as_deref().unwrap_or_default();
                let basic =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"));
                Some((
                    AUTHORIZATION,
                    HeaderValue::from_str(&format!("Basic {basic}"))?,
                ))
            }
            (ProviderKind::Infobip, _) => Some((
                AUTHORIZATION,
                HeaderValue::from_str(&format!("App {token}"))?,
            )),
            (ProviderKind::Vonage, _) => None,
        };
        let auth = auth.map(|(name, mut value)| {
            value.set_sensitive(true);
            (name, value)
        });
        Url::parse(&config.url)?;
        Ok(Self {
            spec: spec.clone(),
            callback: dialect::receipts_url(spec, receipts_token),
            http: builder.build()?,
            auth,
            metrics,
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The longest a send can last once started, with `SMS_API_TIMEOUT` = `timeout`:
    /// the timeout plus the grace for an answer already in the socket. The rescue
    /// wait is built on it.
    pub fn longest_exchange(timeout: Duration) -> Duration {
        timeout + TIMEOUT_GRACE
    }

    /// Sends one message under its delivery key (the `Idempotency-Key`, the same on
    /// every attempt). Never fails: every error is an outcome for the row.
    pub async fn send(&self, message: &Outgoing<'_>) -> SendOutcome {
        let started = Instant::now();
        let timeout = self.spec.settings.timeout;
        let request = dialect::request(
            &self.spec,
            message,
            self.spec.settings.token.expose(),
            self.callback.as_deref(),
        );
        let mut builder = self
            .http
            .post(request.url)
            .header("Idempotency-Key", message.delivery_key);
        if let Some((name, value)) = &self.auth {
            builder = builder.header(name.clone(), value.clone());
        }
        builder = match &request.body {
            Body::Json(value) => builder.json(value),
            Body::Form(fields) => builder.form(fields),
        };
        // Whether the request may have reached the provider: true from the moment the
        // connection is up (reqwest reports a failure to connect as such).
        let exchange = async {
            let mut response = builder.send().await.map_err(Failure::Http)?;
            let status = response.status();
            let headers = response.headers().clone();
            // Read at most MAX_BODY: a provider (or whatever answers at its address)
            // cannot make us hold megabytes per message.
            let mut body = Vec::new();
            loop {
                match response.chunk().await {
                    Ok(Some(chunk)) => {
                        let room = MAX_BODY - body.len();
                        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                        if body.len() >= MAX_BODY {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(err) => return Err(Failure::Body(status, err)),
                }
            }
            Ok::<_, Failure>((status, headers, body))
        };
        let mut exchange = std::pin::pin!(exchange);
        let result = match tokio::time::timeout(timeout, &mut exchange).await {
            Ok(result) => result,
            // The timer can win the race against an answer that is already in the
            // socket when this process was frozen (SIGSTOP, a VM stall) past the
            // timeout: give the answer a moment before calling it a timeout, so a
            // paused replica does not misread a delivered message as lost.
            Err(_) => match tokio::time::timeout(TIMEOUT_GRACE, &mut exchange).await {
                Ok(result) => result,
                Err(_) => Err(Failure::Timeout),
            },
        };
        let provider = self.spec.name.as_str();
        let outcome = match result {
            Ok((status, headers, body)) => {
                self.count(status.as_str());
                dialect::classify(self.spec.kind, status, &headers, &body)
            }
            Err(failure) => {
                let (kind, detail, unknown) = match &failure {
                    Failure::Timeout => ("timeout", format!("no answer within {timeout:?}"), true),
                    // Refused or unreachable before a byte of the request was written:
                    // certainly not taken, so the message may go elsewhere.
                    Failure::Http(err) => (
                        error_kind(err),
                        clean_text(&error_chain(err)),
                        !err.is_connect(),
                    ),
                    Failure::Body(status, err) => (
                        "body",
                        clean_text(&format!(
                            "HTTP {}, then {}",
                            status.as_u16(),
                            error_chain(err)
                        )),
                        true,
                    ),
                };
                self.count(kind);
                SendOutcome::Transient {
                    error: format!("{provider}: {kind}: {detail}"),
                    unknown,
                }
            }
        };
        self.metrics
            .provider_request_duration
            .observe(started.elapsed().as_secs_f64());
        outcome
    }

    fn count(&self, code: &str) {
        self.metrics
            .provider_requests
            .with_label_values(&[code, &self.spec.name])
            .inc();
    }
}

/// Why an exchange with the provider produced no answer.
enum Failure {
    Timeout,
    Http(reqwest::Error),
    /// The status came, the body broke off.
    Body(StatusCode, reqwest::Error),
}

/// How long an answer may still arrive after `SMS_API_TIMEOUT` fired (see `send`).
const TIMEOUT_GRACE: Duration = Duration::from_millis(100);

/// The most of an answer's body that is read.
pub const MAX_BODY: usize = 64 * 1024;
/// A longer `messageId` is not kept (it would not fit what receipts are matched on).
pub const MAX_PROVIDER_ID: usize = 255;
/// `last_error` is cut to this many characters.
pub const MAX_ERROR_CHARS: usize = 500;

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
