//! Secrets: a wrapper that never prints, the `_FILE` variants, and the demo defaults
//! the start-up warns about.

use std::collections::HashMap;
use std::fmt;

use super::ConfigError;

/// A value that must never be printed: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The only way to read the value, so every use is easy to find.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The variables that may hold secrets, each with its `_FILE` variant: the path of a
/// file holding the value (Kubernetes and Docker secrets).
pub const SECRET_VARIABLES: [(&str, &str); 9] = [
    ("DATABASE_URL", "DATABASE_URL_FILE"),
    ("DB_PASSWORD", "DB_PASSWORD_FILE"),
    ("REDIS_URL", "REDIS_URL_FILE"),
    ("REDIS_PASSWORD", "REDIS_PASSWORD_FILE"),
    ("REDIS_SENTINEL_PASSWORD", "REDIS_SENTINEL_PASSWORD_FILE"),
    ("SMS_API_TOKEN", "SMS_API_TOKEN_FILE"),
    ("API_TOKEN", "API_TOKEN_FILE"),
    ("DLR_TOKEN", "DLR_TOKEN_FILE"),
    ("STATUS_WEBHOOK_SECRET", "STATUS_WEBHOOK_SECRET_FILE"),
];

/// Replaces every `_FILE` variant of [`SECRET_VARIABLES`] with its variable holding
/// the file's content (see [`read_secret_file`]).
pub(super) fn read_secret_files(vars: &mut HashMap<String, String>) -> Result<(), ConfigError> {
    for (name, variable) in SECRET_VARIABLES {
        let Some(path) = vars.remove(variable) else {
            continue;
        };
        if vars.contains_key(name) {
            return Err(ConfigError::new(
                variable,
                format!("set {name} or {variable}, not both"),
            ));
        }
        let value =
            read_secret_file(&path).map_err(|problem| ConfigError::new(variable, problem))?;
        vars.insert(name.to_string(), value);
    }
    Ok(())
}

/// The secret held in the file at `path`, one trailing newline dropped (as `echo` and
/// editors leave one). The error names the path, never the content.
pub(super) fn read_secret_file(path: &str) -> Result<String, String> {
    let content = std::fs::read_to_string(path.trim())
        .map_err(|err| format!("cannot read {path:?}: {err}"))?;
    let value = content
        .strip_suffix("\r\n")
        .or_else(|| content.strip_suffix('\n'))
        .unwrap_or(&content);
    if value.trim().is_empty() {
        return Err(format!("{path:?} is empty"));
    }
    Ok(value.to_string())
}

/// The demo defaults [`Config::demo_defaults`] warns about.
pub const DEMO_DB_PASSWORD: &str = "password";
pub const DEMO_SMS_TOKEN: &str = "mock-token";
