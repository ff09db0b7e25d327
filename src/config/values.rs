//! Parsing one variable's value, each error naming the variable.

use std::str::FromStr;
use std::time::Duration;

use super::{ConfigError, DbSslMode, Secret, SentinelConfig};
use crate::duration;

/// `API_ALLOWED_ORIGINS`: `scheme://host[:port]` entries, comma-separated.
pub(super) fn allowed_origins(value: Option<String>) -> Result<Vec<String>, ConfigError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(|origin| match reqwest::Url::parse(origin) {
            Ok(url)
                if matches!(url.scheme(), "http" | "https")
                    && url.host().is_some()
                    && url.path() == "/" =>
            {
                Ok(url.origin().ascii_serialization())
            }
            _ => Err(ConfigError::new(
                "API_ALLOWED_ORIGINS",
                format!("{origin:?} is not an origin such as https://ops.example.com"),
            )),
        })
        .collect()
}

/// An `http` or `https` URL with a host: the only kind of address a provider is sent to.
pub(super) fn is_http_url(text: &str) -> bool {
    reqwest::Url::parse(text)
        .is_ok_and(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some())
}

/// A name reqwest accepts as a request header (`SMS_API_AUTH_HEADER`, `auth_header`).
pub(super) fn is_header_name(text: &str) -> bool {
    reqwest::header::HeaderName::from_str(text).is_ok()
}

/// Hostname plus a short random suffix, so two processes on one host never collide.
pub(super) fn default_replica_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "replica".into());
    format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

pub(super) fn number<T: FromStr>(
    variable: &'static str,
    value: Option<String>,
    default: T,
) -> Result<T, ConfigError> {
    match value {
        None => Ok(default),
        Some(text) => text
            .trim()
            .parse()
            .map_err(|_| ConfigError::new(variable, format!("{text:?} is not a valid number"))),
    }
}

pub(super) fn positive<T: FromStr + PartialEq + Default>(
    variable: &'static str,
    value: Option<String>,
    default: T,
) -> Result<T, ConfigError> {
    let parsed = number(variable, value, default)?;
    if parsed == T::default() {
        return Err(ConfigError::new(variable, "must be at least 1"));
    }
    Ok(parsed)
}

pub(super) fn boolean(
    variable: &'static str,
    value: Option<String>,
    default: bool,
) -> Result<bool, ConfigError> {
    match value
        .as_deref()
        .map(str::trim)
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None => Ok(default),
        Some("true" | "1" | "yes" | "on") => Ok(true),
        Some("false" | "0" | "no" | "off") => Ok(false),
        Some(other) => Err(ConfigError::new(
            variable,
            format!("{other:?} is not true or false"),
        )),
    }
}

pub(super) fn duration_var(
    variable: &'static str,
    value: Option<String>,
    default: &str,
) -> Result<Duration, ConfigError> {
    let text = value.unwrap_or_else(|| default.to_string());
    duration::parse(text.trim()).map_err(|problem| {
        ConfigError::new(
            variable,
            format!("{problem}; expected a duration like 500ms, 15s or 2m"),
        )
    })
}

pub(super) fn nonzero_duration(
    variable: &'static str,
    value: Option<String>,
    default: &str,
) -> Result<Duration, ConfigError> {
    let parsed = duration_var(variable, value, default)?;
    if parsed.is_zero() {
        return Err(ConfigError::new(variable, "must be greater than 0"));
    }
    Ok(parsed)
}

/// A retention period (`MESSAGE_RETENTION`, `CONTENT_RETENTION`): whole days (`30d`)
/// or a duration (`12h`, `90m`); `0` keeps forever (`None`).
pub(super) fn retention_var(
    variable: &'static str,
    value: Option<String>,
    default: &str,
) -> Result<Option<Duration>, ConfigError> {
    let text = value.unwrap_or_else(|| default.to_string());
    let text = text.trim();
    let parsed = match text.strip_suffix('d') {
        Some(days) if !days.is_empty() && days.bytes().all(|b| b.is_ascii_digit()) => days
            .parse::<u64>()
            .ok()
            .and_then(|days| days.checked_mul(86_400))
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{text:?} is too long")),
        _ => duration::parse(text),
    };
    match parsed {
        Ok(period) if period.is_zero() => Ok(None),
        Ok(period) => Ok(Some(period)),
        Err(problem) => Err(ConfigError::new(
            variable,
            format!("{problem}; expected days like 30d, a duration like 12h, or 0 to keep forever"),
        )),
    }
}

/// `host:port,host:port` and the service name; both or neither.
pub(super) fn sentinel_config(
    sentinels: Option<String>,
    service: Option<String>,
    password: Option<String>,
) -> Result<Option<SentinelConfig>, ConfigError> {
    let Some(list) = sentinels else {
        if service.is_some() {
            return Err(ConfigError::new(
                "REDIS_SENTINEL_SERVICE",
                "is set but REDIS_SENTINELS is not",
            ));
        }
        return Ok(None);
    };
    let mut hosts = Vec::new();
    for entry in list.split(',').map(str::trim) {
        let parsed = entry
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty() && !host.contains(char::is_whitespace))
            .and_then(|(host, port)| Some((host.to_string(), port.parse::<u16>().ok()?)))
            .filter(|(_, port)| *port > 0);
        match parsed {
            Some(host) => hosts.push(host),
            None => {
                return Err(ConfigError::new(
                    "REDIS_SENTINELS",
                    format!("{entry:?} is not host:port (expected host:port,host:port,...)"),
                ));
            }
        }
    }
    let service = service.map(|s| s.trim().to_string()).unwrap_or_default();
    if service.is_empty() {
        return Err(ConfigError::new(
            "REDIS_SENTINEL_SERVICE",
            "is required with REDIS_SENTINELS (the master name the sentinels monitor)",
        ));
    }
    Ok(Some(SentinelConfig {
        hosts,
        service,
        password: password.map(Secret::new),
    }))
}

pub(super) fn db_ssl_mode(value: Option<String>) -> Result<DbSslMode, ConfigError> {
    match value.as_deref().map(str::trim) {
        None | Some("disable") => Ok(DbSslMode::Disable),
        Some("prefer") => Ok(DbSslMode::Prefer),
        Some("require") => Ok(DbSslMode::Require),
        Some("verify-full") => Ok(DbSslMode::VerifyFull),
        Some(other) => Err(ConfigError::new(
            "DB_SSLMODE",
            format!("{other:?} is not one of disable, prefer, require, verify-full"),
        )),
    }
}
