//! What a test replica is configured with: one typed value that renders to the
//! environment variables of a replica process, or to the crate's [`Config`] for a test
//! that builds the parts in process.
//!
//! [`ReplicaSettings::fast`] holds the timings every test starts from; a test names
//! only the settings that matter to it (`ReplicaSettings::fast().batch_size(5)`). A
//! setting left unset is not rendered, so the replica takes the application's default.
//! Variables with no typed setter, and text the parser must refuse, go through
//! [`ReplicaSettings::env`].

use std::path::PathBuf;
use std::time::Duration;

use message_dispatcher::config::{Config, DbSslMode};

use super::TestEnv;

/// `n` milliseconds.
pub const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `n` seconds.
pub const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The harness reads the replicas' logs as JSON (the port a replica bound, the lines a
/// test looks for). The dispatcher logs at debug level, so the log tail a failing test
/// prints (see `Replica`'s `Drop`) says what the replica was doing.
const LOG_FORMAT: &str = "json";
const LOG_LEVEL: &str = "info,message_dispatcher=debug";

/// Where a replica finds Redis.
#[derive(Debug, Clone)]
pub enum RedisTarget {
    /// `REDIS_URL`.
    Url(String),
    /// `REDIS_SENTINELS` (`host:port,host:port`) and `REDIS_SENTINEL_SERVICE`.
    Sentinels { addresses: String, service: String },
}

#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    /// The connections; unset, a replica started by a [`TestEnv`] uses that test's
    /// own servers (see [`ReplicaSettings::connected_to`]).
    database_url: Option<String>,
    redis: Option<RedisTarget>,
    provider_url: Option<String>,
    db_ssl_mode: Option<DbSslMode>,

    batch_size: u32,
    processing_interval: Duration,
    send_concurrency: Option<usize>,
    max_attempts: Option<u32>,
    retry_backoff_base: Duration,
    retry_backoff_max: Duration,
    auto_start: Option<bool>,
    shutdown_timeout: Duration,

    lock_enabled: Option<bool>,
    lock_key: Option<String>,
    lock_ttl: Duration,
    lock_retry_interval: Duration,
    leader_eligible: Option<bool>,

    provider_timeout: Duration,
    provider_token: Option<String>,
    provider_token_file: Option<PathBuf>,
    provider_auth_header: Option<String>,
    provider_ca_cert: Option<PathBuf>,
    provider_insecure_skip_verify: Option<bool>,

    api_token: Option<String>,
    api_token_file: Option<PathBuf>,
    dlr_token: Option<String>,
    message_max_length: Option<usize>,
    message_max_segments: Option<u32>,
    default_region: Option<String>,

    /// Raw variables, rendered last: each replaces a typed setting of the same name.
    raw: Vec<(String, String)>,
}

impl ReplicaSettings {
    /// Timings short enough for tests: a batch of 2 every 200 ms, a 2 s lease renewed
    /// every 250 ms, provider answers within 2 s, retries after 1–2 s, 5 s to shut down.
    pub fn fast() -> Self {
        Self {
            database_url: None,
            redis: None,
            provider_url: None,
            db_ssl_mode: None,
            batch_size: 2,
            processing_interval: ms(200),
            send_concurrency: None,
            max_attempts: None,
            retry_backoff_base: secs(1),
            retry_backoff_max: secs(2),
            auto_start: None,
            shutdown_timeout: secs(5),
            lock_enabled: None,
            lock_key: None,
            lock_ttl: secs(2),
            lock_retry_interval: ms(250),
            leader_eligible: None,
            provider_timeout: secs(2),
            provider_token: None,
            provider_token_file: None,
            provider_auth_header: None,
            provider_ca_cert: None,
            provider_insecure_skip_verify: None,
            api_token: None,
            api_token_file: None,
            dlr_token: None,
            message_max_length: None,
            message_max_segments: None,
            default_region: None,
            raw: Vec::new(),
        }
    }

    /// These settings with every connection they leave unset pointed at `env`'s
    /// PostgreSQL, Redis and provider.
    pub fn connected_to(mut self, env: &TestEnv) -> Self {
        self.database_url.get_or_insert_with(|| env.pg.url());
        self.redis
            .get_or_insert_with(|| RedisTarget::Url(env.redis.url()));
        self.provider_url
            .get_or_insert_with(|| env.provider_url.clone());
        self
    }

    /// `DATABASE_URL`.
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.database_url = Some(url.into());
        self
    }

    /// `REDIS_URL`.
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.redis = Some(RedisTarget::Url(url.into()));
        self
    }

    /// `REDIS_SENTINELS` and `REDIS_SENTINEL_SERVICE`, instead of `REDIS_URL`.
    pub fn redis_sentinels(
        mut self,
        addresses: impl Into<String>,
        service: impl Into<String>,
    ) -> Self {
        self.redis = Some(RedisTarget::Sentinels {
            addresses: addresses.into(),
            service: service.into(),
        });
        self
    }

    /// `SMS_API_URL`.
    pub fn provider_url(mut self, url: impl Into<String>) -> Self {
        self.provider_url = Some(url.into());
        self
    }

    /// `DB_SSLMODE`.
    pub fn db_ssl_mode(mut self, mode: DbSslMode) -> Self {
        self.db_ssl_mode = Some(mode);
        self
    }

    /// `BATCH_SIZE`.
    pub fn batch_size(mut self, size: u32) -> Self {
        self.batch_size = size;
        self
    }

    /// `PROCESSING_INTERVAL`.
    pub fn processing_interval(mut self, interval: Duration) -> Self {
        self.processing_interval = interval;
        self
    }

    /// `SEND_CONCURRENCY`.
    pub fn send_concurrency(mut self, sends: usize) -> Self {
        self.send_concurrency = Some(sends);
        self
    }

    /// `MAX_ATTEMPTS`.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// `RETRY_BACKOFF_BASE` and `RETRY_BACKOFF_MAX`, which the application checks as a
    /// pair.
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.retry_backoff_base = base;
        self.retry_backoff_max = max;
        self
    }

    /// `AUTO_START`.
    pub fn auto_start(mut self, start: bool) -> Self {
        self.auto_start = Some(start);
        self
    }

    /// `SHUTDOWN_TIMEOUT`.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// `DISTRIBUTED_LOCK_ENABLED`.
    pub fn lock_enabled(mut self, enabled: bool) -> Self {
        self.lock_enabled = Some(enabled);
        self
    }

    /// `DISTRIBUTED_LOCK_KEY`.
    pub fn lock_key(mut self, key: impl Into<String>) -> Self {
        self.lock_key = Some(key.into());
        self
    }

    /// `DISTRIBUTED_LOCK_TTL`.
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        self.lock_ttl = ttl;
        self
    }

    /// `LOCK_RETRY_INTERVAL`.
    pub fn lock_retry_interval(mut self, interval: Duration) -> Self {
        self.lock_retry_interval = interval;
        self
    }

    /// `LEADER_ELIGIBLE`.
    pub fn leader_eligible(mut self, eligible: bool) -> Self {
        self.leader_eligible = Some(eligible);
        self
    }

    /// `SMS_API_TIMEOUT`.
    pub fn provider_timeout(mut self, timeout: Duration) -> Self {
        self.provider_timeout = timeout;
        self
    }

    /// `SMS_API_TOKEN`.
    pub fn provider_token(mut self, token: impl Into<String>) -> Self {
        self.provider_token = Some(token.into());
        self
    }

    /// `SMS_API_TOKEN_FILE`.
    pub fn provider_token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.provider_token_file = Some(path.into());
        self
    }

    /// `SMS_API_AUTH_HEADER`.
    pub fn provider_auth_header(mut self, name: impl Into<String>) -> Self {
        self.provider_auth_header = Some(name.into());
        self
    }

    /// `SMS_API_CA_CERT`.
    pub fn provider_ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.provider_ca_cert = Some(path.into());
        self
    }

    /// `SMS_API_INSECURE_SKIP_VERIFY`.
    pub fn provider_insecure_skip_verify(mut self, skip: bool) -> Self {
        self.provider_insecure_skip_verify = Some(skip);
        self
    }

    /// `API_TOKEN`.
    pub fn api_token(mut self, token: impl Into<String>) -> Self {
        self.api_token = Some(token.into());
        self
    }

    /// `API_TOKEN_FILE`.
    pub fn api_token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.api_token_file = Some(path.into());
        self
    }

    /// `DLR_TOKEN`.
    pub fn dlr_token(mut self, token: impl Into<String>) -> Self {
        self.dlr_token = Some(token.into());
        self
    }

    /// `MESSAGE_MAX_LENGTH`.
    pub fn message_max_length(mut self, length: usize) -> Self {
        self.message_max_length = Some(length);
        self
    }

    /// `MESSAGE_MAX_SEGMENTS`.
    pub fn message_max_segments(mut self, segments: u32) -> Self {
        self.message_max_segments = Some(segments);
        self
    }

    /// `DEFAULT_REGION`.
    pub fn default_region(mut self, region: impl Into<String>) -> Self {
        self.default_region = Some(region.into());
        self
    }

    /// Sets `variable` to `value` exactly as written: for variables with no setter
    /// (test hooks) and for text the application must refuse.
    pub fn env(mut self, variable: &str, value: &str) -> Self {
        self.raw.retain(|(name, _)| name != variable);
        self.raw.push((variable.to_string(), value.to_string()));
        self
    }

    /// The environment variables of a replica process with these settings.
    pub fn to_env(&self) -> Vec<(String, String)> {
        let (redis_url, sentinels, sentinel_service) = match &self.redis {
            None => (None, None, None),
            Some(RedisTarget::Url(url)) => (Some(url.clone()), None, None),
            Some(RedisTarget::Sentinels { addresses, service }) => {
                (None, Some(addresses.clone()), Some(service.clone()))
            }
        };
        let typed: [(&str, Option<String>); 33] = [
            ("DATABASE_URL", self.database_url.clone()),
            (
                "DB_SSLMODE",
                self.db_ssl_mode.map(ssl_mode).map(String::from),
            ),
            ("REDIS_URL", redis_url),
            ("REDIS_SENTINELS", sentinels),
            ("REDIS_SENTINEL_SERVICE", sentinel_service),
            ("SMS_API_URL", self.provider_url.clone()),
            ("LOG_FORMAT", Some(LOG_FORMAT.into())),
            ("LOG_LEVEL", Some(LOG_LEVEL.into())),
            ("BATCH_SIZE", Some(self.batch_size.to_string())),
            (
                "PROCESSING_INTERVAL",
                Some(duration(self.processing_interval)),
            ),
            ("SEND_CONCURRENCY", text(self.send_concurrency)),
            ("MAX_ATTEMPTS", text(self.max_attempts)),
            (
                "RETRY_BACKOFF_BASE",
                Some(duration(self.retry_backoff_base)),
            ),
            ("RETRY_BACKOFF_MAX", Some(duration(self.retry_backoff_max))),
            ("AUTO_START", text(self.auto_start)),
            ("SHUTDOWN_TIMEOUT", Some(duration(self.shutdown_timeout))),
            ("DISTRIBUTED_LOCK_ENABLED", text(self.lock_enabled)),
            ("DISTRIBUTED_LOCK_KEY", self.lock_key.clone()),
            ("DISTRIBUTED_LOCK_TTL", Some(duration(self.lock_ttl))),
            (
                "LOCK_RETRY_INTERVAL",
                Some(duration(self.lock_retry_interval)),
            ),
            ("LEADER_ELIGIBLE", text(self.leader_eligible)),
            ("SMS_API_TIMEOUT", Some(duration(self.provider_timeout))),
            ("SMS_API_TOKEN", self.provider_token.clone()),
            ("SMS_API_TOKEN_FILE", path(&self.provider_token_file)),
            ("SMS_API_AUTH_HEADER", self.provider_auth_header.clone()),
            ("SMS_API_CA_CERT", path(&self.provider_ca_cert)),
            (
                "SMS_API_INSECURE_SKIP_VERIFY",
                text(self.provider_insecure_skip_verify),
            ),
            ("API_TOKEN", self.api_token.clone()),
            ("API_TOKEN_FILE", path(&self.api_token_file)),
            ("DLR_TOKEN", self.dlr_token.clone()),
            ("MESSAGE_MAX_LENGTH", text(self.message_max_length)),
            ("MESSAGE_MAX_SEGMENTS", text(self.message_max_segments)),
            ("DEFAULT_REGION", self.default_region.clone()),
        ];
        let mut vars: Vec<(String, String)> = typed
            .into_iter()
            .filter_map(|(name, value)| Some((name.to_string(), value?)))
            .collect();
        for (name, value) in &self.raw {
            vars.retain(|(typed, _)| typed != name);
            vars.push((name.clone(), value.clone()));
        }
        vars
    }

    /// The [`Config`] a replica with these settings runs with, read by the
    /// application's own parser from [`ReplicaSettings::to_env`].
    pub fn to_config(&self) -> Config {
        Config::from_vars(self.to_env()).unwrap_or_else(|err| panic!("{err}"))
    }
}

/// A duration in the form the application parses (`500ms`, `2s`), exact to the
/// nanosecond.
pub fn duration(value: Duration) -> String {
    let nanos = value.subsec_nanos();
    if nanos == 0 {
        format!("{}s", value.as_secs())
    } else if nanos % 1_000_000 == 0 {
        format!("{}ms", value.as_millis())
    } else {
        format!("{}ns", value.as_nanos())
    }
}

fn text<T: ToString>(value: Option<T>) -> Option<String> {
    value.map(|value| value.to_string())
}

fn path(value: &Option<PathBuf>) -> Option<String> {
    value.as_ref().map(|path| path.display().to_string())
}

fn ssl_mode(mode: DbSslMode) -> &'static str {
    match mode {
        DbSslMode::Disable => "disable",
        DbSslMode::Prefer => "prefer",
        DbSslMode::Require => "require",
        DbSslMode::VerifyFull => "verify-full",
    }
}

#[cfg(test)]
mod tests {
    use message_dispatcher::config::LogFormat;

    use super::*;

    #[test]
    fn durations_render_as_the_application_parses_them() {
        for value in [
            Duration::ZERO,
            ms(100),
            ms(1500),
            secs(2),
            secs(300),
            secs(3600),
            Duration::from_micros(1500),
            Duration::from_nanos(1),
        ] {
            let text = duration(value);
            assert_eq!(
                message_dispatcher::duration::parse(&text),
                Ok(value),
                "{text}"
            );
        }
        assert_eq!(duration(ms(250)), "250ms");
        assert_eq!(duration(secs(15)), "15s");
    }

    #[test]
    fn the_fast_defaults_reach_the_config() {
        let config = ReplicaSettings::fast().to_config();
        assert_eq!(config.dispatch.batch_size, 2);
        assert_eq!(config.dispatch.interval, ms(200));
        assert_eq!(config.dispatch.retry.base, secs(1));
        assert_eq!(config.dispatch.retry.max, secs(2));
        assert_eq!(config.dispatch.shutdown_timeout, secs(5));
        assert_eq!(config.lock.ttl, secs(2));
        assert_eq!(config.lock.retry_interval, ms(250));
        assert_eq!(config.provider.timeout, secs(2));
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.log_level, LOG_LEVEL);
        // Unset settings are not rendered: the application's defaults hold.
        assert!(config.dispatch.auto_start && config.leader_eligible && config.lock.enabled);
        assert_eq!(config.dispatch.send_concurrency, 1);
        assert!(config.database.url.is_none() && config.redis.url.is_none());
    }

    #[test]
    fn each_setter_reaches_its_config_field() {
        let config = ReplicaSettings::fast()
            .database_url("postgres://postgres@127.0.0.1:5999/dispatcher")
            .redis_sentinels("127.0.0.1:26379,127.0.0.1:26380", "mymaster")
            .provider_url("https://localhost:4443/send")
            .db_ssl_mode(DbSslMode::VerifyFull)
            .batch_size(5)
            .processing_interval(Duration::ZERO)
            .send_concurrency(usize::MAX)
            .max_attempts(3)
            .retry_backoff(ms(100), secs(300))
            .auto_start(false)
            .shutdown_timeout(ms(1500))
            .lock_enabled(false)
            .lock_key("second-install:lock")
            .lock_ttl(secs(15))
            .lock_retry_interval(secs(1))
            .leader_eligible(false)
            .provider_timeout(ms(1200))
            .provider_token("tok-123")
            .provider_auth_header("x-ins-auth-key")
            .provider_insecure_skip_verify(true)
            .api_token("api-secret")
            .dlr_token("dlr-secret")
            .message_max_length(1000)
            .message_max_segments(3)
            .default_region("TR")
            .to_config();
        assert_eq!(
            config.database.url.as_ref().map(|url| url.expose()),
            Some("postgres://postgres@127.0.0.1:5999/dispatcher")
        );
        assert!(config.redis.url.is_none());
        let sentinel = config.redis.sentinel.as_ref().expect("sentinels");
        assert_eq!(sentinel.hosts.len(), 2);
        assert_eq!(sentinel.service, "mymaster");
        assert_eq!(config.provider.url, "https://localhost:4443/send");
        assert_eq!(config.database.ssl_mode, DbSslMode::VerifyFull);
        assert_eq!(config.dispatch.batch_size, 5);
        assert_eq!(config.dispatch.interval, Duration::ZERO);
        assert_eq!(config.dispatch.send_concurrency, usize::MAX);
        assert_eq!(config.dispatch.max_attempts, 3);
        assert_eq!(config.dispatch.retry.base, ms(100));
        assert_eq!(config.dispatch.retry.max, secs(300));
        assert!(!config.dispatch.auto_start);
        assert_eq!(config.dispatch.shutdown_timeout, ms(1500));
        assert!(!config.lock.enabled);
        assert_eq!(config.lock.key, "second-install:lock");
        assert_eq!(config.lock.ttl, secs(15));
        assert_eq!(config.lock.retry_interval, secs(1));
        assert!(!config.leader_eligible);
        assert_eq!(config.provider.timeout, ms(1200));
        assert_eq!(config.provider.token.expose(), "tok-123");
        assert_eq!(
            config.provider.auth_header.as_deref(),
            Some("x-ins-auth-key")
        );
        assert!(config.provider.insecure_skip_verify);
        assert_eq!(
            config.api_token.as_ref().map(|t| t.expose()),
            Some("api-secret")
        );
        assert_eq!(
            config.dlr_token.as_ref().map(|t| t.expose()),
            Some("dlr-secret")
        );
        assert_eq!(config.message_max_length, 1000);
        assert_eq!(config.message_max_segments, 3);
        assert!(config.default_region.is_some());
    }

    #[test]
    fn a_raw_variable_replaces_the_typed_one() {
        let vars = ReplicaSettings::fast()
            .processing_interval(ms(100))
            .env("PROCESSING_INTERVAL", "abc")
            .env("MESSAGE_DISPATCHER_TEST_PANIC_IN_BATCH", "1")
            .to_env();
        let values = |name: &str| -> Vec<&str> {
            vars.iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(values("PROCESSING_INTERVAL"), ["abc"]);
        assert_eq!(values("MESSAGE_DISPATCHER_TEST_PANIC_IN_BATCH"), ["1"]);
        let err = Config::from_vars(vars.clone()).unwrap_err();
        assert_eq!(err.variable, "PROCESSING_INTERVAL");
    }
}
