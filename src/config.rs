//! Configuration from the environment (README.md#configuration).
//!
//! Every variable is read as text with envy, then parsed here one by one so that a bad
//! value is reported in a single line naming the variable. Nothing else in the program
//! reads the environment. Secrets are wrapped in [`Secret`] so they never reach logs or
//! `Debug` output.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::duration;
use crate::retry::RetryPolicy;

mod lanes;
mod secrets;
mod values;

pub use lanes::{
    BREAKER_WINDOW, BreakerSettings, DEFAULT_LANE, DispatchPlan, LaneSpec, MAX_LANES,
    MAX_SEND_CONCURRENCY, ProviderKind, ProviderSpec, RouteSpec, Unit,
};
use secrets::read_secret_files;
pub use secrets::{DEMO_DB_PASSWORD, DEMO_SMS_TOKEN, SECRET_VARIABLES, Secret};
use values::*;

/// One bad variable: the process prints this on one line and exits with status 2.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {variable}: {problem}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

impl ConfigError {
    fn new(variable: &'static str, problem: impl Into<String>) -> Self {
        Self {
            variable,
            problem: problem.into(),
        }
    }
}

/// How to talk TLS to PostgreSQL. `require` encrypts without checking the certificate
/// (as libpq does); `verify-full` checks the chain against the system roots and the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbSslMode {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub url: Option<Secret>,
    pub host: String,
    pub port: u16,
    pub name: String,
    pub user: String,
    pub password: Secret,
    pub ssl_mode: DbSslMode,
    pub pool_size: usize,
    /// PostgreSQL ends a session that sits idle inside a transaction this long
    /// (`DISTRIBUTED_LOCK_TTL`): a replica frozen in the middle of a claim must not
    /// hold the fence row, and with it every failover, hostage.
    pub idle_in_transaction_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: Option<Secret>,
    pub host: String,
    pub port: u16,
    pub password: Secret,
    pub db: u8,
    /// Redis behind Sentinel: the sentinels are asked where the primary is.
    pub sentinel: Option<SentinelConfig>,
}

/// `REDIS_SENTINELS`, `REDIS_SENTINEL_SERVICE`, `REDIS_SENTINEL_PASSWORD`.
#[derive(Debug, Clone)]
pub struct SentinelConfig {
    pub hosts: Vec<(String, u16)>,
    /// The master name the sentinels monitor.
    pub service: String,
    /// The sentinels' own password (`requirepass` of the sentinels), if any.
    pub password: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub url: String,
    pub token: Secret,
    /// `None` sends `Authorization: Bearer <token>`; `Some(name)` sends `<name>: <token>`.
    pub auth_header: Option<String>,
    pub timeout: Duration,
    pub ca_cert: Option<PathBuf>,
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Clone)]
pub struct DispatchConfig {
    pub batch_size: u32,
    pub interval: Duration,
    pub send_concurrency: usize,
    pub max_attempts: u32,
    pub retry: RetryPolicy,
    pub auto_start: bool,
    pub shutdown_timeout: Duration,
    /// `QUIET_HOURS`: the window of every lane that sets none of its own
    /// (docs/design.md#quiet-hours).
    pub quiet_hours: Option<crate::quiet_hours::QuietHours>,
}

/// `STATUS_WEBHOOK_URL`, `STATUS_WEBHOOK_SECRET` and `STATUS_WEBHOOK_RETRY_FOR`.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Where every message's status changes are posted; a message's own
    /// `status_callback_url` wins. `None`: only messages that name one.
    pub url: Option<String>,
    /// The Standard Webhooks secret, `whsec_` and base64; required with `url` and for
    /// messages that name an endpoint.
    pub secret: Option<Secret>,
    /// How long an event is retried before it becomes a dead letter.
    pub retry_for: Duration,
}

impl WebhookConfig {
    /// The signing key: the secret's bytes after `whsec_`.
    pub fn key(&self) -> Option<Vec<u8>> {
        let secret = self.secret.as_ref()?;
        webhook_key(secret.expose()).ok()
    }
}

/// The bytes of a `whsec_<base64>` secret.
fn webhook_key(secret: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let encoded = secret
        .strip_prefix("whsec_")
        .ok_or("must start with whsec_ (a Standard Webhooks secret: whsec_ and base64)")?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| "must be whsec_ followed by base64".to_string())?;
    if key.len() < 24 {
        return Err(format!(
            "holds {} bytes; use at least 24 (e.g. whsec_$(head -c 32 /dev/urandom | base64))",
            key.len()
        ));
    }
    Ok(key)
}

/// `MESSAGE_RETENTION` and `CONTENT_RETENTION`; `None` keeps forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionConfig {
    /// Finished messages whose last activity is older than this are removed.
    pub messages: Option<Duration>,
    /// Finished messages whose last activity is older than this lose their text.
    pub content: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct LockConfig {
    pub enabled: bool,
    pub key: String,
    pub ttl: Duration,
    pub retry_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub server_port: u16,
    pub log_level: String,
    pub log_format: LogFormat,
    pub provider: ProviderConfig,
    pub dispatch: DispatchConfig,
    pub message_max_length: usize,
    /// Most SMS segments one message may take (`MESSAGE_MAX_SEGMENTS`).
    pub message_max_segments: u32,
    pub lock: LockConfig,
    pub cache_ttl: Duration,
    pub auto_migrate: bool,
    pub api_token: Option<Secret>,
    /// Bearer token for `POST /api/delivery-receipts`; unset = the `API_TOKEN` rule.
    pub dlr_token: Option<Secret>,
    pub replica_id: String,
    /// false: serve the API, never campaign for leadership.
    pub leader_eligible: bool,
    /// The region national-format phone numbers are read in (`DEFAULT_REGION`);
    /// `None`: only E.164 (`+` and the country code) is accepted.
    pub default_region: Option<crate::domain::Region>,
    /// Origins besides the replica's own whose browsers may call mutating API routes
    /// (`API_ALLOWED_ORIGINS`, comma-separated, e.g. `https://ops.example.com`).
    pub allowed_origins: Vec<String>,
    /// How long finished messages and their text are kept (docs/design.md#retention).
    pub retention: RetentionConfig,
    /// Status webhooks (docs/design.md#status-webhooks).
    pub webhooks: WebhookConfig,
    /// The lanes, their providers and the routes between them (`DISPATCH_CONFIG`);
    /// without the file, one `default` lane and provider built from the variables above.
    pub plan: DispatchPlan,
}

/// The raw environment, every variable as optional text (envy lower-cases the names).
#[derive(Debug, Default, Deserialize)]
struct RawEnv {
    database_url: Option<String>,
    db_host: Option<String>,
    db_port: Option<String>,
    db_name: Option<String>,
    db_user: Option<String>,
    db_password: Option<String>,
    db_sslmode: Option<String>,
    db_pool_size: Option<String>,
    redis_url: Option<String>,
    redis_host: Option<String>,
    redis_port: Option<String>,
    redis_password: Option<String>,
    redis_db: Option<String>,
    redis_sentinels: Option<String>,
    redis_sentinel_service: Option<String>,
    redis_sentinel_password: Option<String>,
    server_port: Option<String>,
    log_level: Option<String>,
    log_format: Option<String>,
    sms_api_url: Option<String>,
    sms_api_token: Option<String>,
    sms_api_auth_header: Option<String>,
    sms_api_timeout: Option<String>,
    sms_api_ca_cert: Option<String>,
    sms_api_insecure_skip_verify: Option<String>,
    batch_size: Option<String>,
    processing_interval: Option<String>,
    send_concurrency: Option<String>,
    message_max_length: Option<String>,
    message_max_segments: Option<String>,
    quiet_hours: Option<String>,
    max_attempts: Option<String>,
    retry_backoff_base: Option<String>,
    retry_backoff_max: Option<String>,
    auto_start: Option<String>,
    distributed_lock_enabled: Option<String>,
    distributed_lock_key: Option<String>,
    distributed_lock_ttl: Option<String>,
    lock_retry_interval: Option<String>,
    redis_cache_ttl: Option<String>,
    shutdown_timeout: Option<String>,
    auto_migrate: Option<String>,
    api_token: Option<String>,
    dlr_token: Option<String>,
    replica_id: Option<String>,
    leader_eligible: Option<String>,
    default_region: Option<String>,
    api_allowed_origins: Option<String>,
    dispatch_config: Option<String>,
    message_retention: Option<String>,
    content_retention: Option<String>,
    status_webhook_url: Option<String>,
    status_webhook_secret: Option<String>,
    status_webhook_retry_for: Option<String>,
}

/// Upper bound on `BATCH_SIZE`: a batch is claimed in one transaction and held in memory.
pub const MAX_BATCH_SIZE: u32 = 10_000;

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads configuration from explicit variables (the environment in production,
    /// a map in tests). Empty values count as unset, as in the Go service.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut vars: HashMap<String, String> = vars
            .into_iter()
            .filter(|(_, value)| !value.trim().is_empty())
            .collect();
        read_secret_files(&mut vars)?;
        let raw: RawEnv = envy::from_iter(vars.clone())
            .map_err(|err| ConfigError::new("environment", err.to_string()))?;
        Self::from_raw(raw, &vars)
    }

    /// `vars` is the whole environment (secret files read): a `DISPATCH_CONFIG` file
    /// names its providers' token variables, which `RawEnv` cannot know in advance.
    fn from_raw(raw: RawEnv, vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let lock = LockConfig {
            enabled: boolean(
                "DISTRIBUTED_LOCK_ENABLED",
                raw.distributed_lock_enabled,
                true,
            )?,
            key: raw
                .distributed_lock_key
                .unwrap_or_else(|| "message-dispatcher:lock".into()),
            ttl: nonzero_duration("DISTRIBUTED_LOCK_TTL", raw.distributed_lock_ttl, "15s")?,
            retry_interval: nonzero_duration("LOCK_RETRY_INTERVAL", raw.lock_retry_interval, "2s")?,
        };
        if lock.ttl <= lock.retry_interval * 3 {
            return Err(ConfigError::new(
                "DISTRIBUTED_LOCK_TTL",
                format!(
                    "{} must be greater than 3 x LOCK_RETRY_INTERVAL ({})",
                    duration::format(lock.ttl),
                    duration::format(lock.retry_interval)
                ),
            ));
        }

        let database = DatabaseConfig {
            url: raw.database_url.map(Secret::new),
            host: raw.db_host.unwrap_or_else(|| "localhost".into()),
            port: number("DB_PORT", raw.db_port, 5432)?,
            name: raw.db_name.unwrap_or_else(|| "messages_db".into()),
            user: raw.db_user.unwrap_or_else(|| "postgres".into()),
            password: Secret::new(raw.db_password.unwrap_or_else(|| DEMO_DB_PASSWORD.into())),
            ssl_mode: db_ssl_mode(raw.db_sslmode)?,
            pool_size: positive("DB_POOL_SIZE", raw.db_pool_size, 8)?,
            idle_in_transaction_timeout: lock.ttl,
        };
        if let Some(url) = &database.url {
            tokio_postgres::Config::from_str(url.expose()).map_err(|err| {
                ConfigError::new("DATABASE_URL", format!("not a PostgreSQL URL ({err})"))
            })?;
        }

        let redis = RedisConfig {
            url: raw.redis_url.map(Secret::new),
            host: raw.redis_host.unwrap_or_else(|| "localhost".into()),
            port: number("REDIS_PORT", raw.redis_port, 6379)?,
            password: Secret::new(raw.redis_password.unwrap_or_default()),
            db: number("REDIS_DB", raw.redis_db, 0)?,
            sentinel: sentinel_config(
                raw.redis_sentinels,
                raw.redis_sentinel_service,
                raw.redis_sentinel_password,
            )?,
        };
        if redis.sentinel.is_some() && redis.url.is_some() {
            return Err(ConfigError::new(
                "REDIS_SENTINELS",
                "set either REDIS_SENTINELS (with REDIS_SENTINEL_SERVICE) or REDIS_URL, not both",
            ));
        }
        if let Some(url) = &redis.url {
            fred::types::config::Config::from_url(url.expose()).map_err(|err| {
                ConfigError::new("REDIS_URL", format!("not a Redis URL ({})", err.details()))
            })?;
        }

        let log_level = raw.log_level.unwrap_or_else(|| "info".into());
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|err| ConfigError::new("LOG_LEVEL", format!("{log_level:?}: {err}")))?;
        let log_format = match raw
            .log_format
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("json") => LogFormat::Json,
            Some("text") => LogFormat::Text,
            Some(other) => {
                return Err(ConfigError::new(
                    "LOG_FORMAT",
                    format!("{other:?} is not json or text"),
                ));
            }
        };

        let provider_url = raw
            .sms_api_url
            .unwrap_or_else(|| "http://localhost:3001/send".into());
        if !is_http_url(&provider_url) {
            return Err(ConfigError::new(
                "SMS_API_URL",
                format!("{provider_url:?} is not an http(s) URL"),
            ));
        }
        let auth_header = raw.sms_api_auth_header;
        if let Some(name) = auth_header.as_ref().filter(|name| !is_header_name(name)) {
            return Err(ConfigError::new(
                "SMS_API_AUTH_HEADER",
                format!("{name:?} is not a header name"),
            ));
        }
        let provider = ProviderConfig {
            url: provider_url,
            token: Secret::new(raw.sms_api_token.unwrap_or_else(|| DEMO_SMS_TOKEN.into())),
            auth_header,
            timeout: nonzero_duration("SMS_API_TIMEOUT", raw.sms_api_timeout, "6s")?,
            ca_cert: raw.sms_api_ca_cert.map(PathBuf::from),
            insecure_skip_verify: boolean(
                "SMS_API_INSECURE_SKIP_VERIFY",
                raw.sms_api_insecure_skip_verify,
                false,
            )?,
        };
        if let Some(path) = &provider.ca_cert {
            if !path.is_file() {
                return Err(ConfigError::new(
                    "SMS_API_CA_CERT",
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }

        let batch_size: u32 = positive("BATCH_SIZE", raw.batch_size, 2)?;
        if batch_size > MAX_BATCH_SIZE {
            return Err(ConfigError::new(
                "BATCH_SIZE",
                format!("{batch_size} is above the maximum of {MAX_BATCH_SIZE}"),
            ));
        }
        let retry = RetryPolicy {
            base: nonzero_duration("RETRY_BACKOFF_BASE", raw.retry_backoff_base, "30s")?,
            max: nonzero_duration("RETRY_BACKOFF_MAX", raw.retry_backoff_max, "30m")?,
        };
        if retry.max < retry.base {
            return Err(ConfigError::new(
                "RETRY_BACKOFF_MAX",
                "must not be smaller than RETRY_BACKOFF_BASE",
            ));
        }
        let dispatch = DispatchConfig {
            batch_size,
            interval: duration_var("PROCESSING_INTERVAL", raw.processing_interval, "2m")?,
            send_concurrency: positive("SEND_CONCURRENCY", raw.send_concurrency, 1)?,
            max_attempts: number("MAX_ATTEMPTS", raw.max_attempts, 0)?,
            retry,
            auto_start: boolean("AUTO_START", raw.auto_start, true)?,
            shutdown_timeout: duration_var("SHUTDOWN_TIMEOUT", raw.shutdown_timeout, "30s")?,
            quiet_hours: raw
                .quiet_hours
                .filter(|text| !text.trim().is_empty())
                .map(|text| {
                    crate::quiet_hours::QuietHours::parse(&text)
                        .map_err(|problem| ConfigError::new("QUIET_HOURS", problem))
                })
                .transpose()?,
        };

        let plan = match raw.dispatch_config {
            None => DispatchPlan::from_env(&provider, &dispatch),
            Some(path) => DispatchPlan::read(Path::new(path.trim()), vars, dispatch.quiet_hours)?,
        };

        let replica_id = match raw.replica_id {
            Some(id) => id,
            None => default_replica_id(),
        };

        Ok(Self {
            database,
            redis,
            server_port: number("SERVER_PORT", raw.server_port, 8080)?,
            log_level,
            log_format,
            provider,
            dispatch,
            message_max_length: positive("MESSAGE_MAX_LENGTH", raw.message_max_length, 160)?,
            message_max_segments: positive("MESSAGE_MAX_SEGMENTS", raw.message_max_segments, 10)?,
            lock,
            cache_ttl: nonzero_duration("REDIS_CACHE_TTL", raw.redis_cache_ttl, "24h")?,
            auto_migrate: boolean("AUTO_MIGRATE", raw.auto_migrate, true)?,
            api_token: raw.api_token.map(Secret::new),
            dlr_token: raw.dlr_token.filter(|t| !t.is_empty()).map(Secret::new),
            replica_id,
            leader_eligible: boolean("LEADER_ELIGIBLE", raw.leader_eligible, true)?,
            default_region: raw
                .default_region
                .map(|code| {
                    crate::domain::parse_region(&code).ok_or_else(|| {
                        ConfigError::new(
                            "DEFAULT_REGION",
                            format!("{code:?} is not an ISO 3166 region code such as TR or US"),
                        )
                    })
                })
                .transpose()?,
            allowed_origins: allowed_origins(raw.api_allowed_origins)?,
            retention: RetentionConfig {
                messages: retention_var("MESSAGE_RETENTION", raw.message_retention, "30d")?,
                content: retention_var("CONTENT_RETENTION", raw.content_retention, "0")?,
            },
            webhooks: webhook_config(
                raw.status_webhook_url,
                raw.status_webhook_secret,
                raw.status_webhook_retry_for,
            )?,
            plan,
        })
    }
}

/// The status webhooks' variables, checked together.
fn webhook_config(
    url: Option<String>,
    secret: Option<String>,
    retry_for: Option<String>,
) -> Result<WebhookConfig, ConfigError> {
    let url = url
        .filter(|u| !u.trim().is_empty())
        .map(|u| u.trim().to_string());
    if let Some(url) = &url {
        if !values::is_http_url(url) {
            return Err(ConfigError::new(
                "STATUS_WEBHOOK_URL",
                "must be an http or https URL with a host",
            ));
        }
    }
    let secret = secret.filter(|s| !s.trim().is_empty());
    match &secret {
        Some(secret) => {
            webhook_key(secret.trim())
                .map_err(|problem| ConfigError::new("STATUS_WEBHOOK_SECRET", problem))?;
        }
        None if url.is_some() => {
            return Err(ConfigError::new(
                "STATUS_WEBHOOK_SECRET",
                "is required with STATUS_WEBHOOK_URL: the events are signed (whsec_ and base64)",
            ));
        }
        None => {}
    }
    Ok(WebhookConfig {
        url,
        secret: secret.map(|s| Secret::new(s.trim())),
        retry_for: nonzero_duration("STATUS_WEBHOOK_RETRY_FOR", retry_for, "24h")?,
    })
}

impl Config {
    /// The demo defaults still in force, each a sentence for the start-up log: fine on
    /// a laptop, a hole in production.
    pub fn demo_defaults(&self) -> Vec<String> {
        let mut found = Vec::new();
        if self.api_token.is_none() {
            found.push(
                "API_TOKEN is not set: anyone who can reach this port can create messages, \
                 cancel them and stop dispatch"
                    .to_string(),
            );
        }
        let database_password = match &self.database.url {
            Some(url) => tokio_postgres::Config::from_str(url.expose())
                .ok()
                .and_then(|c| c.get_password().map(<[u8]>::to_vec)),
            None => Some(self.database.password.expose().as_bytes().to_vec()),
        };
        if database_password.as_deref() == Some(DEMO_DB_PASSWORD.as_bytes()) {
            found.push(format!(
                "the PostgreSQL password is the demo default {DEMO_DB_PASSWORD:?} (DB_PASSWORD)"
            ));
        }
        if self.provider.token.expose() == DEMO_SMS_TOKEN {
            found.push(format!(
                "SMS_API_TOKEN is the demo default {DEMO_SMS_TOKEN:?}: a real provider refuses it"
            ));
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_match_the_spec() {
        let cfg = config(&[]).unwrap();
        assert_eq!(cfg.dispatch.batch_size, 2);
        assert_eq!(cfg.dispatch.interval, Duration::from_secs(120));
        assert_eq!(cfg.lock.ttl, Duration::from_secs(15));
        assert_eq!(cfg.lock.retry_interval, Duration::from_secs(2));
        assert_eq!(cfg.provider.timeout, Duration::from_secs(6));
        assert_eq!(cfg.server_port, 8080);
        assert_eq!(cfg.database.pool_size, 8);
        assert_eq!(cfg.message_max_length, 160);
        assert_eq!(cfg.cache_ttl, Duration::from_secs(86_400));
        assert!(cfg.lock.enabled && cfg.dispatch.auto_start && cfg.auto_migrate);
        assert_eq!(
            cfg.retention,
            RetentionConfig {
                messages: Some(Duration::from_secs(30 * 86_400)),
                content: None
            }
        );
    }

    #[test]
    fn retention_takes_days_durations_or_zero() {
        let cfg = config(&[("MESSAGE_RETENTION", "0"), ("CONTENT_RETENTION", "7d")]).unwrap();
        assert_eq!(cfg.retention.messages, None);
        assert_eq!(cfg.retention.content, Some(Duration::from_secs(7 * 86_400)));
        let cfg = config(&[("MESSAGE_RETENTION", "36h")]).unwrap();
        assert_eq!(cfg.retention.messages, Some(Duration::from_secs(36 * 3600)));
        for bad in ["30", "d", "-1d", "1.5d", "30 days", "99999999999999999d"] {
            let err = config(&[("MESSAGE_RETENTION", bad)]).unwrap_err();
            assert_eq!(err.variable, "MESSAGE_RETENTION", "{bad}");
        }
    }

    #[test]
    fn each_error_names_its_variable() {
        let cases = [
            ("PROCESSING_INTERVAL", "abc"),
            ("BATCH_SIZE", "0"),
            ("BATCH_SIZE", "many"),
            ("DB_PORT", "70000"),
            ("LOG_FORMAT", "xml"),
            ("DB_SSLMODE", "maybe"),
            ("SMS_API_URL", "ftp://x"),
            ("AUTO_START", "perhaps"),
            ("SEND_CONCURRENCY", "0"),
            ("LEADER_ELIGIBLE", "sometimes"),
            ("REDIS_SENTINELS", "no-port"),
            ("REDIS_SENTINEL_SERVICE", "mymaster"),
        ];
        for (variable, value) in cases {
            let err = config(&[(variable, value)]).unwrap_err();
            assert_eq!(err.variable, variable, "{err}");
        }
    }

    #[test]
    fn sentinels_need_a_service_and_host_port_pairs() {
        let ok = config(&[
            ("REDIS_SENTINELS", "s1:26379, 10.0.0.2:26380"),
            ("REDIS_SENTINEL_SERVICE", "mymaster"),
            ("REDIS_SENTINEL_PASSWORD", "hunter2"),
        ])
        .unwrap();
        let sentinel = ok.redis.sentinel.as_ref().unwrap();
        assert_eq!(
            sentinel.hosts,
            vec![("s1".to_string(), 26379), ("10.0.0.2".to_string(), 26380)]
        );
        assert!(!format!("{ok:?}").contains("hunter2"));
        for (vars, variable) in [
            (
                vec![("REDIS_SENTINELS", "s1:26379")],
                "REDIS_SENTINEL_SERVICE",
            ),
            (
                vec![("REDIS_SENTINELS", "s1:0"), ("REDIS_SENTINEL_SERVICE", "m")],
                "REDIS_SENTINELS",
            ),
            (
                vec![
                    ("REDIS_SENTINELS", "s1:26379,"),
                    ("REDIS_SENTINEL_SERVICE", "m"),
                ],
                "REDIS_SENTINELS",
            ),
            (
                vec![("REDIS_SENTINEL_SERVICE", "m")],
                "REDIS_SENTINEL_SERVICE",
            ),
            (
                vec![
                    ("REDIS_SENTINELS", "s1:26379"),
                    ("REDIS_SENTINEL_SERVICE", "m"),
                    ("REDIS_URL", "redis://x"),
                ],
                "REDIS_SENTINELS",
            ),
        ] {
            assert_eq!(config(&vars).unwrap_err().variable, variable, "{vars:?}");
        }
    }

    #[test]
    fn lock_ttl_must_exceed_three_retry_intervals() {
        let err = config(&[
            ("DISTRIBUTED_LOCK_TTL", "6s"),
            ("LOCK_RETRY_INTERVAL", "2s"),
        ])
        .unwrap_err();
        assert_eq!(err.variable, "DISTRIBUTED_LOCK_TTL");
        assert!(
            config(&[
                ("DISTRIBUTED_LOCK_TTL", "7s"),
                ("LOCK_RETRY_INTERVAL", "2s")
            ])
            .is_ok()
        );
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let cfg = config(&[
            ("DB_PASSWORD", "hunter2"),
            ("DATABASE_URL", "postgres://u:hunter2@h/db"),
            ("SMS_API_TOKEN", "hunter2"),
            ("API_TOKEN", "hunter2"),
            ("REDIS_PASSWORD", "hunter2"),
        ])
        .unwrap();
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }
}
