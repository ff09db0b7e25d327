//! The `DISPATCH_CONFIG` file: the lanes messages are paced in, the providers each lane
//! sends through and the routes that pick a message's lane (docs/design.md#lanes).
//!
//! Without the file the plan is one `default` lane sending through one `default`
//! provider, both built from the variables (`SMS_API_*`, `BATCH_SIZE`,
//! `PROCESSING_INTERVAL`, `SEND_CONCURRENCY`), so a deployment that never heard of lanes
//! runs as before. With it, the whole file is checked at start-up and a mistake is
//! reported as `DISPATCH_CONFIG` with the file, the line and the key, like every other
//! configuration error: one line, then exit.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::quiet_hours::QuietHours;
use crate::spend::{Micros, Prices};

use super::secrets::read_secret_file;
use super::values::{is_header_name, is_http_url};
use super::{
    ConfigError, DispatchConfig, MAX_BATCH_SIZE, ProviderConfig, SECRET_VARIABLES, Secret,
};
use crate::domain::Sender;
use crate::duration;

/// The lane every message that no route matches goes to, so every plan has one.
pub const DEFAULT_LANE: &str = "default";

/// Most lanes one plan may hold: each lane is a pacer, its own Redis keys and its own
/// metric label values.
pub const MAX_LANES: usize = 64;

/// Most requests one lane may have in flight to its provider at once.
pub const MAX_SEND_CONCURRENCY: usize = 1000;

/// The variable every error of this module is reported under.
const VARIABLE: &str = "DISPATCH_CONFIG";

/// The provider built from the `SMS_API_*` variables when there is no file.
const ENV_PROVIDER: &str = "default";

/// A file provider's timeout when it sets none: the `SMS_API_TIMEOUT` default.
const DEFAULT_PROVIDER_TIMEOUT: Duration = Duration::from_secs(6);

/// Where messages go and how fast (docs/design.md#lanes): the providers, the lanes that
/// send through them and the routes that pick a message's lane.
#[derive(Debug, Clone)]
pub struct DispatchPlan {
    pub providers: Vec<ProviderSpec>,
    pub lanes: Vec<LaneSpec>,
    /// In file order: the first route that matches a message wins.
    pub routes: Vec<RouteSpec>,
    /// The file it came from; `None`: built from the environment.
    pub source: Option<PathBuf>,
}

/// A provider a lane sends through, known by its name.
#[derive(Debug, Clone)]
pub struct ProviderSpec {
    pub name: String,
    pub kind: ProviderKind,
    /// Holds the token as a [`Secret`], so a plan can be logged with `{:?}`. `url` is
    /// the send URL of an `http-json` provider and the API's base URL of the others.
    pub settings: ProviderConfig,
    /// Twilio's account SID (the user of its Basic auth, part of its URL).
    pub account_sid: Option<String>,
    /// Twilio: send through this Messaging Service instead of a `From` number.
    pub messaging_service_sid: Option<String>,
    /// Vonage's `api_key` (the token is its `api_secret`).
    pub api_key: Option<String>,
    /// The sender of messages that name none and whose lane sets none.
    pub from: Option<Sender>,
    /// Where the provider reaches this deployment (`https://sms.example.com`): Twilio's
    /// `StatusCallback` is built on it and its signatures are checked against it.
    pub public_url: Option<String>,
    pub breaker: BreakerSettings,
    /// What one segment costs, per country or by default (docs/design.md#spend-caps);
    /// `None`: sends through this provider cost nothing that is counted.
    pub prices: Option<Prices>,
}

/// When a provider's circuit breaker opens and how long it stays open
/// (docs/design.md#failover).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// Retryable failures in a row that open it.
    pub failures: u32,
    /// The share of failures among the last [`BREAKER_WINDOW`] sends above which it opens.
    pub ratio: f64,
    /// How long it stays open before one probe send decides.
    pub cooldown: Duration,
}

/// The sends the breaker's failure share is measured over.
pub const BREAKER_WINDOW: usize = 20;

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failures: 5,
            ratio: 0.5,
            cooldown: Duration::from_secs(30),
        }
    }
}

/// The protocol a provider speaks (docs/design.md#provider-kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// `POST {"to", "content", "from"}` with a bearer token: the dispatcher's own.
    HttpJson,
    Twilio,
    Vonage,
    Infobip,
}

impl ProviderKind {
    /// The name the file uses (`kind = "http-json"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HttpJson => "http-json",
            Self::Twilio => "twilio",
            Self::Vonage => "vonage",
            Self::Infobip => "infobip",
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "http-json" => Ok(Self::HttpJson),
            "twilio" => Ok(Self::Twilio),
            "vonage" => Ok(Self::Vonage),
            "infobip" => Ok(Self::Infobip),
            other => Err(format!(
                "kind {other:?} is not one of http-json, twilio, vonage, infobip"
            )),
        }
    }

    /// The provider's public API, used when a file names no `base_url`.
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            Self::HttpJson => None,
            Self::Twilio => Some("https://api.twilio.com"),
            Self::Vonage => Some("https://rest.nexmo.com"),
            Self::Infobip => Some("https://api.infobip.com"),
        }
    }
}

/// One lane: a pace of its own, so traffic routed elsewhere does not wait behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneSpec {
    /// Goes into Redis keys and metric labels, hence the narrow alphabet.
    pub name: String,
    /// How many [`Unit`]s are sent per `interval`.
    pub batch_size: u32,
    /// Zero sends batches back to back.
    pub interval: Duration,
    pub unit: Unit,
    /// Provider names in the order they are tried (docs/design.md#failover).
    pub providers: Vec<String>,
    /// The sender of messages that name none; else the provider's.
    pub from: Option<Sender>,
    /// Requests in flight to the provider at once.
    pub send_concurrency: usize,
    /// The countries (ISO codes) the lane may send to; intake refuses a number of any
    /// other with a 422. Empty: any.
    pub countries: Vec<String>,
    /// The daily window in the recipient's local time in which the lane sends only
    /// transactional messages (docs/design.md#quiet-hours); `QUIET_HOURS` when the
    /// lane sets none, `"off"` for none.
    pub quiet_hours: Option<QuietHours>,
    /// The most the lane may spend in a UTC day; reaching it pauses the lane until
    /// UTC midnight or a higher cap (docs/design.md#spend-caps).
    pub daily_spend_cap: Option<Micros>,
}

/// What a lane's `batch_size` counts: whole messages, or the SMS segments a provider
/// bills and throttles by (a long or non-GSM message takes several).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Messages,
    Segments,
}

impl Unit {
    /// The name the file uses (`unit = "segments"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Messages => "messages",
            Self::Segments => "segments",
        }
    }

    fn parse(text: &str) -> Result<Self, String> {
        match text {
            "messages" => Ok(Self::Messages),
            "segments" => Ok(Self::Segments),
            other => Err(format!("{other:?} is not messages or segments")),
        }
    }
}

/// Sends messages to a lane by destination: the country of the number or the start of
/// its E.164 form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub lane: String,
    /// ISO 3166 alpha-2 codes, upper case (`TR`).
    pub countries: Vec<String>,
    /// `+` and digits (`+9055`), matched against the start of the E.164 number.
    pub prefixes: Vec<String>,
}

impl RouteSpec {
    fn matches(&self, country: Option<&str>, e164: &str) -> bool {
        let by_country = country.is_some_and(|country| {
            self.countries
                .iter()
                .any(|own| own.eq_ignore_ascii_case(country))
        });
        by_country || self.prefixes.iter().any(|prefix| e164.starts_with(prefix))
    }
}

impl DispatchPlan {
    /// The lane a message goes to: the first route whose countries contain `country` or
    /// one of whose prefixes starts `e164`; none matching, [`DEFAULT_LANE`].
    pub fn route(&self, country: Option<&str>, e164: &str) -> &str {
        self.routes
            .iter()
            .find(|route| route.matches(country, e164))
            .map_or(DEFAULT_LANE, |route| route.lane.as_str())
    }

    pub fn lane(&self, name: &str) -> Option<&LaneSpec> {
        self.lanes.iter().find(|lane| lane.name == name)
    }

    pub fn provider(&self, name: &str) -> Option<&ProviderSpec> {
        self.providers.iter().find(|provider| provider.name == name)
    }

    /// The plan without a file: one `default` lane paced by `BATCH_SIZE` per
    /// `PROCESSING_INTERVAL`, sending through the `SMS_API_*` provider, no routes.
    pub(super) fn from_env(provider: &ProviderConfig, dispatch: &DispatchConfig) -> Self {
        Self {
            providers: vec![ProviderSpec {
                name: ENV_PROVIDER.into(),
                kind: ProviderKind::HttpJson,
                settings: provider.clone(),
                account_sid: None,
                messaging_service_sid: None,
                api_key: None,
                from: None,
                public_url: None,
                breaker: BreakerSettings::default(),
                prices: None,
            }],
            lanes: vec![LaneSpec {
                name: DEFAULT_LANE.into(),
                batch_size: dispatch.batch_size,
                interval: dispatch.interval,
                unit: Unit::Messages,
                providers: vec![ENV_PROVIDER.into()],
                from: None,
                send_concurrency: dispatch.send_concurrency,
                countries: Vec::new(),
                quiet_hours: dispatch.quiet_hours,
                daily_spend_cap: None,
            }],
            routes: Vec::new(),
            source: None,
        }
    }

    /// Reads and checks the file at `path`. `vars` is the environment with the secret
    /// files already read: the providers' `token_env` variables are looked up there.
    /// `default_quiet`: `QUIET_HOURS`, for the lanes that set no `quiet_hours`.
    pub(super) fn read(
        path: &Path,
        vars: &HashMap<String, String>,
        default_quiet: Option<QuietHours>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            ConfigError::new(
                VARIABLE,
                format!("{}: cannot read it: {err}", path.display()),
            )
        })?;
        let source = Source { path, text: &text };
        let file: PlanFile = toml::from_str(&text).map_err(|err| source.toml_error(&err))?;
        let providers = providers(&source, file.provider, vars)?;
        let lanes = lanes(&source, file.lane, &providers, default_quiet)?;
        let routes = routes(&source, file.route, &lanes)?;
        Ok(Self {
            providers,
            lanes,
            routes,
            source: Some(path.to_path_buf()),
        })
    }
}

/// The file as written. Every value keeps its byte span so an error can name its line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    #[serde(default)]
    provider: Vec<Spanned<ProviderTable>>,
    #[serde(default)]
    lane: Vec<Spanned<LaneTable>>,
    #[serde(default)]
    route: Vec<Spanned<RouteTable>>,
}

/// `[[provider]]`. The token itself is never in the file, only the variable holding it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderTable {
    name: Spanned<String>,
    kind: Spanned<String>,
    url: Option<Spanned<String>>,
    base_url: Option<Spanned<String>>,
    token_env: Spanned<String>,
    account_sid: Option<Spanned<String>>,
    messaging_service_sid: Option<Spanned<String>>,
    api_key: Option<Spanned<String>>,
    from: Option<Spanned<String>>,
    public_url: Option<Spanned<String>>,
    breaker_failures: Option<Spanned<i64>>,
    breaker_ratio: Option<Spanned<f64>>,
    breaker_cooldown: Option<Spanned<String>>,
    auth_header: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    ca_cert: Option<Spanned<String>>,
    #[serde(default)]
    insecure_skip_verify: bool,
    /// A number, or a table of countries and `default`.
    price_per_segment: Option<Spanned<toml::Value>>,
}

/// `[[lane]]`. Numbers are read signed so that `0` and `-1` get our message, not serde's.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LaneTable {
    name: Spanned<String>,
    batch_size: Spanned<i64>,
    interval: Spanned<String>,
    unit: Option<Spanned<String>>,
    providers: Spanned<Vec<Spanned<String>>>,
    from: Option<Spanned<String>>,
    send_concurrency: Option<Spanned<i64>>,
    #[serde(default)]
    countries: Vec<Spanned<String>>,
    quiet_hours: Option<Spanned<String>>,
    daily_spend_cap: Option<Spanned<f64>>,
}

/// `[[route]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteTable {
    lane: Spanned<String>,
    #[serde(default)]
    countries: Vec<Spanned<String>>,
    #[serde(default)]
    prefixes: Vec<Spanned<String>>,
}

/// The file's path and text: turns a byte span into the `path: line N:` an operator
/// needs to find the mistake.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn error_at(&self, span: Range<usize>, problem: impl fmt::Display) -> ConfigError {
        ConfigError::new(
            VARIABLE,
            format!(
                "{}: line {}: {problem}",
                self.path.display(),
                self.line_of(span.start)
            ),
        )
    }

    /// A problem of the file as a whole, such as a lane it lacks.
    fn error(&self, problem: impl fmt::Display) -> ConfigError {
        ConfigError::new(VARIABLE, format!("{}: {problem}", self.path.display()))
    }

    /// Syntax, type, unknown and missing field errors found by `toml` and serde. Their
    /// message names the type but not the key of a bad value, so the key is read from
    /// the line the value is on.
    fn toml_error(&self, err: &toml::de::Error) -> ConfigError {
        let message = err.message().trim();
        match err.span() {
            None => self.error(message),
            Some(span) => match self.key_before(span.start) {
                Some(key) => self.error_at(span, format!("{key}: {message}")),
                None => self.error_at(span, message),
            },
        }
    }

    /// 1-based, as editors count.
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&byte| byte == b'\n')
            .count()
            + 1
    }

    /// The key a value at `offset` is assigned to: `batch_size` in `batch_size = "x"`.
    fn key_before(&self, offset: usize) -> Option<&str> {
        let before = self.text.get(..offset)?;
        let line = &before[before.rfind('\n').map_or(0, |newline| newline + 1)..];
        let (key, _) = line.split_once('=')?;
        let key = key.trim();
        let bare = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
        (!key.is_empty() && key.chars().all(bare)).then_some(key)
    }
}

/// One `[[provider]]`, `[[lane]]` or `[[route]]` being checked: its errors start with
/// its label (`lane "tr"`, `route 2`).
struct Entry<'a> {
    source: &'a Source<'a>,
    label: String,
}

impl Entry<'_> {
    fn new<'a>(source: &'a Source<'a>, label: String) -> Entry<'a> {
        Entry { source, label }
    }

    /// `line N: lane "tr": batch_size: must be at least 1`.
    fn error(&self, span: Range<usize>, key: &str, problem: impl fmt::Display) -> ConfigError {
        self.statement(span, format!("{key}: {problem}"))
    }

    /// A problem whose text already says which key it is about.
    fn statement(&self, span: Range<usize>, problem: impl fmt::Display) -> ConfigError {
        self.source
            .error_at(span, format!("{}: {problem}", self.label))
    }
}

/// Lane and provider names go into Redis keys and metric labels:
/// `^[a-z0-9][a-z0-9_-]{0,31}$`.
fn is_plain_name(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    first_ok
        && name.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'))
}

fn plain_name(entry: &Entry, name: Spanned<String>) -> Result<String, ConfigError> {
    if !is_plain_name(name.get_ref()) {
        return Err(entry.error(
            name.span(),
            "name",
            "must match ^[a-z0-9][a-z0-9_-]{0,31}$ (names go into Redis keys and metric labels)",
        ));
    }
    Ok(name.into_inner())
}

/// Refuses a second entry with a name already seen.
fn first_of_its_name(
    entry: &Entry,
    seen: &mut HashSet<String>,
    name: &str,
    span: Range<usize>,
) -> Result<(), ConfigError> {
    if !seen.insert(name.to_string()) {
        return Err(entry.error(span, "name", format!("{name:?} is defined twice")));
    }
    Ok(())
}

fn providers(
    source: &Source,
    tables: Vec<Spanned<ProviderTable>>,
    vars: &HashMap<String, String>,
) -> Result<Vec<ProviderSpec>, ConfigError> {
    let mut seen = HashSet::new();
    let mut specs = Vec::with_capacity(tables.len());
    for table in tables {
        let span = table.span();
        let table = table.into_inner();
        let entry = Entry::new(source, format!("provider {:?}", table.name.get_ref()));
        let name_span = table.name.span();
        let spec = provider(&entry, span, table, vars)?;
        first_of_its_name(&entry, &mut seen, &spec.name, name_span)?;
        specs.push(spec);
    }
    Ok(specs)
}

fn provider(
    entry: &Entry,
    span: Range<usize>,
    table: ProviderTable,
    vars: &HashMap<String, String>,
) -> Result<ProviderSpec, ConfigError> {
    let name = plain_name(entry, table.name)?;
    let kind = ProviderKind::parse(table.kind.get_ref())
        .map_err(|problem| entry.statement(table.kind.span(), problem))?;
    let table_span_of_sid = table.account_sid.as_ref().map(Spanned::span);
    let url = provider_url(entry, span.clone(), kind, table.url, table.base_url)?;
    let account_sid = kind_key(
        entry,
        kind,
        ProviderKind::Twilio,
        "account_sid",
        table.account_sid,
    )?;
    if let (Some(sid), Some(span)) = (&account_sid, table_span_of_sid) {
        if !sid.bytes().all(|b| b.is_ascii_alphanumeric()) {
            let problem = format!("{sid:?} must be letters and digits (AC…), as Twilio writes it");
            return Err(entry.error(span, "account_sid", problem));
        }
    }
    let messaging_service_sid = kind_key(
        entry,
        kind,
        ProviderKind::Twilio,
        "messaging_service_sid",
        table.messaging_service_sid,
    )?;
    let api_key = kind_key(entry, kind, ProviderKind::Vonage, "api_key", table.api_key)?;
    if kind == ProviderKind::Twilio && account_sid.is_none() {
        return Err(entry.error(
            span.clone(),
            "account_sid",
            "is required for kind \"twilio\"",
        ));
    }
    if kind == ProviderKind::Vonage && api_key.is_none() {
        return Err(entry.error(span.clone(), "api_key", "is required for kind \"vonage\""));
    }
    let from = sender(entry, table.from)?;
    let public_url = match table.public_url {
        None => None,
        Some(text) if is_http_url(text.get_ref()) => {
            Some(text.get_ref().trim_end_matches('/').to_string())
        }
        Some(text) => {
            let problem = format!("{:?} is not an http(s) URL", text.get_ref());
            return Err(entry.error(text.span(), "public_url", problem));
        }
    };
    let breaker = breaker(
        entry,
        &table.breaker_failures,
        &table.breaker_ratio,
        &table.breaker_cooldown,
    )?;
    let token = token_from_env(table.token_env.get_ref(), vars)
        .map_err(|problem| entry.error(table.token_env.span(), "token_env", problem))?;
    if let Some(header) = &table.auth_header {
        if !is_header_name(header.get_ref()) {
            let problem = format!("{:?} is not a header name", header.get_ref());
            return Err(entry.error(header.span(), "auth_header", problem));
        }
    }
    let timeout = match &table.timeout {
        None => DEFAULT_PROVIDER_TIMEOUT,
        Some(text) => match duration::parse(text.get_ref()) {
            Ok(timeout) if !timeout.is_zero() => timeout,
            Ok(_) => return Err(entry.error(text.span(), "timeout", "must be greater than 0")),
            Err(problem) => return Err(entry.error(text.span(), "timeout", problem)),
        },
    };
    let ca_cert = table
        .ca_cert
        .map(|path| (PathBuf::from(path.get_ref()), path.span()));
    if let Some((path, span)) = &ca_cert {
        if !path.is_file() {
            let problem = format!("{} is not a readable file", path.display());
            return Err(entry.error(span.clone(), "ca_cert", problem));
        }
    }
    let prices = table
        .price_per_segment
        .map(|value| prices(entry, value))
        .transpose()?;
    Ok(ProviderSpec {
        prices,
        name,
        kind,
        account_sid,
        messaging_service_sid,
        api_key,
        from,
        public_url,
        breaker,
        settings: ProviderConfig {
            url,
            token,
            auth_header: table.auth_header.map(Spanned::into_inner),
            timeout,
            ca_cert: ca_cert.map(|(path, _)| path),
            insecure_skip_verify: table.insecure_skip_verify,
        },
    })
}

/// `url` for an `http-json` provider (required: there is no default), `base_url` for
/// the others (their public API when absent); each refused on the other kind.
fn provider_url(
    entry: &Entry,
    span: Range<usize>,
    kind: ProviderKind,
    url: Option<Spanned<String>>,
    base_url: Option<Spanned<String>>,
) -> Result<String, ConfigError> {
    let (key, given, wrong) = match kind {
        ProviderKind::HttpJson => ("url", url, base_url.map(|b| (b, "base_url"))),
        _ => ("base_url", base_url, url.map(|u| (u, "url"))),
    };
    if let Some((value, wrong_key)) = wrong {
        let problem = format!("is not used by kind {:?}; use {key}", kind.as_str());
        return Err(entry.error(value.span(), wrong_key, problem));
    }
    match (given, kind.default_base_url()) {
        (Some(value), _) if is_http_url(value.get_ref()) => {
            Ok(value.into_inner().trim_end_matches('/').to_string())
        }
        (Some(value), _) => {
            let problem = format!("{:?} is not an http(s) URL", value.get_ref());
            Err(entry.error(value.span(), key, problem))
        }
        (None, Some(default)) => Ok(default.to_string()),
        (None, None) => Err(entry.error(
            span,
            key,
            format!("is required for kind {:?}", kind.as_str()),
        )),
    }
}

/// A key only one kind uses (`account_sid` for twilio): refused on the others, so a
/// table copied from another provider does not silently keep a key that does nothing.
fn kind_key(
    entry: &Entry,
    kind: ProviderKind,
    owner: ProviderKind,
    key: &str,
    value: Option<Spanned<String>>,
) -> Result<Option<String>, ConfigError> {
    match value {
        None => Ok(None),
        Some(value) if kind != owner => {
            let problem = format!("is used only by kind {:?}", owner.as_str());
            Err(entry.error(value.span(), key, problem))
        }
        Some(value) if value.get_ref().trim().is_empty() || value.get_ref().len() > 64 => {
            Err(entry.error(value.span(), key, "must be 1 to 64 characters"))
        }
        Some(value) => Ok(Some(value.into_inner())),
    }
}

fn sender(entry: &Entry, from: Option<Spanned<String>>) -> Result<Option<Sender>, ConfigError> {
    from.map(|text| {
        Sender::parse(text.get_ref()).map_err(|err| entry.error(text.span(), "from", err.problem))
    })
    .transpose()
}

fn breaker(
    entry: &Entry,
    failures: &Option<Spanned<i64>>,
    ratio: &Option<Spanned<f64>>,
    cooldown: &Option<Spanned<String>>,
) -> Result<BreakerSettings, ConfigError> {
    let mut settings = BreakerSettings::default();
    if let Some(value) = failures {
        settings.failures = u32::try_from(*value.get_ref())
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                entry.error(
                    value.span(),
                    "breaker_failures",
                    "must be between 1 and 1000",
                )
            })?;
    }
    if let Some(value) = ratio {
        let ratio = *value.get_ref();
        if !(ratio > 0.0 && ratio <= 1.0) {
            return Err(entry.error(
                value.span(),
                "breaker_ratio",
                "must be above 0 and at most 1",
            ));
        }
        settings.ratio = ratio;
    }
    if let Some(text) = cooldown {
        settings.cooldown = match duration::parse(text.get_ref()) {
            Ok(cooldown) if cooldown >= Duration::from_millis(100) => cooldown,
            Ok(_) => {
                return Err(entry.error(text.span(), "breaker_cooldown", "must be at least 100ms"));
            }
            Err(problem) => return Err(entry.error(text.span(), "breaker_cooldown", problem)),
        };
    }
    Ok(settings)
}

/// The token a provider names with `token_env`: that variable, or the file its `_FILE`
/// variant points at. The `_FILE` variants of [`SECRET_VARIABLES`] were read before the
/// file was, so only those of other variables are read here, under the same rules.
fn token_from_env(variable: &str, vars: &HashMap<String, String>) -> Result<Secret, String> {
    let file_variable = format!("{variable}_FILE");
    let read_already = SECRET_VARIABLES.iter().any(|(name, _)| *name == variable);
    let file = vars.get(&file_variable).filter(|_| !read_already);
    match (vars.get(variable), file) {
        (Some(_), Some(_)) => Err(format!("set {variable} or {file_variable}, not both")),
        (Some(token), None) => Ok(Secret::new(token.clone())),
        (None, Some(path)) => read_secret_file(path)
            .map(Secret::new)
            .map_err(|problem| format!("{file_variable}: {problem}")),
        (None, None) => Err(format!(
            "the variable {variable} is not set (nor {file_variable})"
        )),
    }
}

fn lanes(
    source: &Source,
    tables: Vec<Spanned<LaneTable>>,
    providers: &[ProviderSpec],
    default_quiet: Option<QuietHours>,
) -> Result<Vec<LaneSpec>, ConfigError> {
    let Some(first_span) = tables.first().map(Spanned::span) else {
        return Err(source.error(
            "lane: at least one [[lane]] is needed, named \"default\" \
             (messages that no route matches go there)",
        ));
    };
    let mut seen = HashSet::new();
    let mut specs = Vec::with_capacity(tables.len());
    for (index, table) in tables.into_iter().enumerate() {
        let table = table.into_inner();
        let entry = Entry::new(source, format!("lane {:?}", table.name.get_ref()));
        if index == MAX_LANES {
            let problem = format!("a plan holds at most {MAX_LANES} lanes");
            return Err(entry.statement(table.name.span(), problem));
        }
        let name_span = table.name.span();
        let spec = lane(&entry, table, providers, default_quiet)?;
        first_of_its_name(&entry, &mut seen, &spec.name, name_span)?;
        specs.push(spec);
    }
    if !seen.contains(DEFAULT_LANE) {
        return Err(source.error_at(
            first_span,
            "lane: no lane is named \"default\"; messages that no route matches go there",
        ));
    }
    Ok(specs)
}

fn lane(
    entry: &Entry,
    table: LaneTable,
    providers: &[ProviderSpec],
    default_quiet: Option<QuietHours>,
) -> Result<LaneSpec, ConfigError> {
    let name = plain_name(entry, table.name)?;
    let batch_size = lane_batch_size(entry, &table.batch_size)?;
    let interval = lane_interval(entry, &table.interval)?;
    let unit = match &table.unit {
        None => Unit::Messages,
        Some(text) => Unit::parse(text.get_ref())
            .map_err(|problem| entry.error(text.span(), "unit", problem))?,
    };
    let send_concurrency = match &table.send_concurrency {
        None => 1,
        Some(value) => usize::try_from(*value.get_ref())
            .ok()
            .filter(|n| (1..=MAX_SEND_CONCURRENCY).contains(n))
            .ok_or_else(|| {
                let problem = format!("must be between 1 and {MAX_SEND_CONCURRENCY}");
                entry.error(value.span(), "send_concurrency", problem)
            })?,
    };
    let from = sender(entry, table.from)?;
    let providers_span = table.providers.span();
    let names = lane_providers(entry, table.providers, providers)?;
    if from.is_none() {
        needs_no_sender(entry, providers_span.clone(), &names, providers)?;
    }
    let countries = countries(entry, table.countries)?;
    let daily_spend_cap = match &table.daily_spend_cap {
        None => None,
        Some(cap) => {
            let amount = Micros::from_units(*cap.get_ref())
                .map_err(|problem| entry.error(cap.span(), "daily_spend_cap", problem))?;
            priced_everywhere(entry, providers_span, &names, providers, &countries)?;
            Some(amount)
        }
    };
    Ok(LaneSpec {
        name,
        batch_size,
        interval,
        unit,
        from,
        providers: names,
        send_concurrency,
        countries,
        daily_spend_cap,
        quiet_hours: match &table.quiet_hours {
            None => default_quiet,
            Some(text) if text.get_ref().trim() == "off" => None,
            Some(text) => Some(
                QuietHours::parse(text.get_ref())
                    .map_err(|problem| entry.error(text.span(), "quiet_hours", problem))?,
            ),
        },
    })
}

/// A lane without a sender of its own may only name providers that can send without
/// one: Vonage needs a `from`, Twilio a `from` or a `messaging_service_sid`. Without, a
/// message that names no sender would be refused for good by the provider.
fn needs_no_sender(
    entry: &Entry,
    span: Range<usize>,
    names: &[String],
    providers: &[ProviderSpec],
) -> Result<(), ConfigError> {
    for provider in providers.iter().filter(|p| names.contains(&p.name)) {
        let missing = match provider.kind {
            ProviderKind::Vonage => provider.from.is_none(),
            ProviderKind::Twilio => {
                provider.from.is_none() && provider.messaging_service_sid.is_none()
            }
            ProviderKind::HttpJson | ProviderKind::Infobip => false,
        };
        if missing {
            let problem = format!(
                "provider {:?} ({}) needs a sender: set from on the lane or the provider{}",
                provider.name,
                provider.kind.as_str(),
                if provider.kind == ProviderKind::Twilio {
                    ", or the provider's messaging_service_sid"
                } else {
                    ""
                }
            );
            return Err(entry.error(span, "providers", problem));
        }
    }
    Ok(())
}

/// 1 to [`MAX_BATCH_SIZE`]: a batch is claimed in one transaction and held in memory.
fn lane_batch_size(entry: &Entry, size: &Spanned<i64>) -> Result<u32, ConfigError> {
    let value = *size.get_ref();
    if value < 1 {
        return Err(entry.error(size.span(), "batch_size", "must be at least 1"));
    }
    u32::try_from(value)
        .ok()
        .filter(|value| *value <= MAX_BATCH_SIZE)
        .ok_or_else(|| {
            let problem = format!("{value} is above the maximum of {MAX_BATCH_SIZE}");
            entry.error(size.span(), "batch_size", problem)
        })
}

/// `0` sends back to back; anything else shorter than a millisecond is surely a typo.
fn lane_interval(entry: &Entry, text: &Spanned<String>) -> Result<Duration, ConfigError> {
    let interval = duration::parse(text.get_ref()).map_err(|problem| {
        let problem = format!("{problem}; expected a duration like 500ms, 15s or 2m");
        entry.error(text.span(), "interval", problem)
    })?;
    if !interval.is_zero() && interval < Duration::from_millis(1) {
        let problem = "must be 0 (back to back) or at least 1ms";
        return Err(entry.error(text.span(), "interval", problem));
    }
    Ok(interval)
}

fn lane_providers(
    entry: &Entry,
    names: Spanned<Vec<Spanned<String>>>,
    providers: &[ProviderSpec],
) -> Result<Vec<String>, ConfigError> {
    if names.get_ref().is_empty() {
        let problem = "must name at least one [[provider]]";
        return Err(entry.error(names.span(), "providers", problem));
    }
    names
        .into_inner()
        .into_iter()
        .map(|name| {
            if !providers.iter().any(|p| p.name == *name.get_ref()) {
                let problem = format!("no [[provider]] is named {:?}", name.get_ref());
                return Err(entry.error(name.span(), "providers", problem));
            }
            Ok(name.into_inner())
        })
        .collect()
}

fn routes(
    source: &Source,
    tables: Vec<Spanned<RouteTable>>,
    lanes: &[LaneSpec],
) -> Result<Vec<RouteSpec>, ConfigError> {
    tables
        .into_iter()
        .enumerate()
        .map(|(index, table)| {
            let entry = Entry::new(source, format!("route {}", index + 1));
            route(&entry, table, lanes)
        })
        .collect()
}

fn route(
    entry: &Entry,
    table: Spanned<RouteTable>,
    lanes: &[LaneSpec],
) -> Result<RouteSpec, ConfigError> {
    let span = table.span();
    let table = table.into_inner();
    if !lanes.iter().any(|lane| lane.name == *table.lane.get_ref()) {
        let problem = format!("no [[lane]] is named {:?}", table.lane.get_ref());
        return Err(entry.error(table.lane.span(), "lane", problem));
    }
    if table.countries.is_empty() && table.prefixes.is_empty() {
        let problem = "needs countries, prefixes or both (a route without either matches nothing)";
        return Err(entry.statement(span, problem));
    }
    let countries = countries(entry, table.countries)?;
    let prefixes = table
        .prefixes
        .into_iter()
        .map(|prefix| {
            if !is_dialling_prefix(prefix.get_ref()) {
                let problem = format!(
                    "{:?} must be + and 1 to 15 digits, like +9055",
                    prefix.get_ref()
                );
                return Err(entry.error(prefix.span(), "prefixes", problem));
            }
            Ok(prefix.into_inner())
        })
        .collect::<Result<_, _>>()?;
    Ok(RouteSpec {
        lane: table.lane.into_inner(),
        countries,
        prefixes,
    })
}

/// `price_per_segment = 0.0079`, or `{ default = 0.0079, GB = 0.035 }`.
fn prices(entry: &Entry, value: Spanned<toml::Value>) -> Result<Prices, ConfigError> {
    const KEY: &str = "price_per_segment";
    let span = value.span();
    let amount = |value: &toml::Value, what: &str| -> Result<Micros, ConfigError> {
        let units = match value {
            toml::Value::Float(f) => *f,
            toml::Value::Integer(i) => *i as f64,
            other => {
                let problem = format!("{what}: {other} is not a number");
                return Err(entry.error(span.clone(), KEY, problem));
            }
        };
        Micros::from_units(units)
            .map_err(|problem| entry.error(span.clone(), KEY, format!("{what}: {problem}")))
    };
    match value.into_inner() {
        toml::Value::Table(table) => {
            let mut prices = Prices::default();
            for (key, value) in &table {
                if key == "default" {
                    prices.default = Some(amount(value, "default")?);
                } else {
                    let Some(code) = country_code(key) else {
                        let problem = format!(
                            "{key:?} is neither \"default\" nor an ISO 3166 alpha-2 code such as GB"
                        );
                        return Err(entry.error(span, KEY, problem));
                    };
                    let price = amount(value, key)?;
                    if prices.by_country.insert(code.clone(), price).is_some() {
                        let problem = format!("{code} is priced twice");
                        return Err(entry.error(span, KEY, problem));
                    }
                }
            }
            Ok(prices)
        }
        value => Ok(Prices {
            default: Some(amount(&value, "the price")?),
            by_country: Default::default(),
        }),
    }
}

/// A lane with a spend cap must know what each send costs: every provider it names
/// needs a price for every country the lane may send to (a `default`, or each of the
/// lane's `countries`). Without, a send to an unpriced country would cost nothing and
/// the cap would not hold.
fn priced_everywhere(
    entry: &Entry,
    span: Range<usize>,
    names: &[String],
    providers: &[ProviderSpec],
    countries: &[String],
) -> Result<(), ConfigError> {
    for provider in providers.iter().filter(|p| names.contains(&p.name)) {
        if !provider
            .prices
            .as_ref()
            .is_some_and(|p| p.covers(countries))
        {
            let problem = format!(
                "daily_spend_cap needs a price for every country the lane sends to: give provider {:?} \
                 a price_per_segment with a default (or one for each of the lane's countries)",
                provider.name
            );
            return Err(entry.error(span, "providers", problem));
        }
    }
    Ok(())
}

/// A `countries` list: each an ISO 3166 alpha-2 code, kept upper-case.
fn countries(entry: &Entry, codes: Vec<Spanned<String>>) -> Result<Vec<String>, ConfigError> {
    codes
        .into_iter()
        .map(|code| {
            country_code(code.get_ref()).ok_or_else(|| {
                let problem = format!(
                    "{:?} is not an ISO 3166 alpha-2 code such as TR or US",
                    code.get_ref()
                );
                entry.error(code.span(), "countries", problem)
            })
        })
        .collect()
}

/// The upper-case form of a two-letter region libphonenumber knows (`tr` → `TR`), the
/// form `crate::domain::country_of` gives for a number.
fn country_code(code: &str) -> Option<String> {
    if code.len() != 2 || !code.chars().all(|c| c.is_ascii_alphabetic()) {
        return None;
    }
    crate::domain::parse_region(code).map(|region| region.as_ref().to_string())
}

/// `+` and 1 to 15 digits: the start of an E.164 number.
fn is_dialling_prefix(prefix: &str) -> bool {
    prefix.strip_prefix('+').is_some_and(|digits| {
        (1..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::config::Config;

    /// Lines 1-5 of most files below: one provider named `main`.
    const PROVIDER: &str = r#"[[provider]]
name = "main"
kind = "http-json"
url = "https://sms.example/send"
token_env = "SMS_API_TOKEN"
"#;

    /// Lines 6-10 when after [`PROVIDER`]: the `default` lane.
    const DEFAULT: &str = r#"[[lane]]
name = "default"
batch_size = 2
interval = "2m"
providers = ["main"]
"#;

    const FULL: &str = r#"
[[provider]]
name = "main"
kind = "http-json"
url = "https://sms.example/send"
token_env = "SMS_API_TOKEN"

[[provider]]
name = "backup"
kind = "http-json"
url = "http://backup.example:8080/v1/sms"
token_env = "BACKUP_TOKEN"
auth_header = "x-ins-auth-key"
timeout = "2500ms"
insecure_skip_verify = true

[[lane]]
name = "default"
batch_size = 2
interval = "2m"
unit = "messages"
providers = ["main", "backup"]

[[lane]]
name = "otp"
batch_size = 10
interval = "0"
providers = ["backup"]
send_concurrency = 32

[[lane]]
name = "tr"
batch_size = 20
interval = "10s"
unit = "segments"
providers = ["main"]
countries = ["tr", "cy"]

[[route]]
lane = "otp"
prefixes = ["+1555"]

[[route]]
lane = "tr"
countries = ["tr", "CY"]
prefixes = ["+9055"]
"#;

    /// A `DISPATCH_CONFIG` file in the temporary directory, removed when dropped.
    struct PlanFile(PathBuf);

    impl PlanFile {
        fn new(text: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "dispatch-plan-{}-{}.toml",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, text).unwrap();
            Self(path)
        }

        fn path(&self) -> String {
            self.0.display().to_string()
        }
    }

    impl Drop for PlanFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    /// The plan `text` gives with `SMS_API_TOKEN` and `BACKUP_TOKEN` set.
    fn plan(text: &str) -> Result<DispatchPlan, ConfigError> {
        let file = PlanFile::new(text);
        config(&[
            ("DISPATCH_CONFIG", &file.path()),
            ("SMS_API_TOKEN", "main-token"),
            ("BACKUP_TOKEN", "backup-token"),
        ])
        .map(|config| config.plan)
    }

    /// Asserts `text` is refused at `line` with a problem containing `says`.
    #[track_caller]
    fn refused_at(text: &str, line: usize, says: &str) {
        let file = PlanFile::new(text);
        let err = config(&[
            ("DISPATCH_CONFIG", &file.path()),
            ("SMS_API_TOKEN", "main-token"),
        ])
        .unwrap_err();
        assert_eq!(err.variable, "DISPATCH_CONFIG");
        let at = format!("{}: line {line}: ", file.path());
        assert!(
            err.problem.starts_with(&at) && err.problem.contains(says),
            "expected {at}...{says}..., got {}",
            err.problem
        );
    }

    #[test]
    fn a_full_file_parses() {
        let plan = plan(FULL).unwrap();
        assert!(plan.source.is_some());

        let main = plan.provider("main").unwrap();
        assert_eq!(main.kind, ProviderKind::HttpJson);
        assert_eq!(main.settings.url, "https://sms.example/send");
        assert_eq!(main.settings.token.expose(), "main-token");
        assert_eq!(main.settings.auth_header, None);
        assert_eq!(main.settings.timeout, Duration::from_secs(6));
        let backup = plan.provider("backup").unwrap();
        assert_eq!(backup.settings.token.expose(), "backup-token");
        assert_eq!(
            backup.settings.auth_header.as_deref(),
            Some("x-ins-auth-key")
        );
        assert_eq!(backup.settings.timeout, Duration::from_millis(2500));
        assert!(backup.settings.insecure_skip_verify);

        let names: Vec<_> = plan.lanes.iter().map(|lane| lane.name.as_str()).collect();
        assert_eq!(names, ["default", "otp", "tr"]);
        assert_eq!(
            plan.lane("default").unwrap(),
            &LaneSpec {
                name: "default".into(),
                batch_size: 2,
                interval: Duration::from_secs(120),
                unit: Unit::Messages,
                providers: vec!["main".into(), "backup".into()],
                from: None,
                send_concurrency: 1,
                countries: Vec::new(),
                quiet_hours: None,
                daily_spend_cap: None,
            }
        );
        let otp = plan.lane("otp").unwrap();
        assert_eq!((otp.interval, otp.send_concurrency), (Duration::ZERO, 32));
        assert_eq!(plan.lane("tr").unwrap().unit, Unit::Segments);
        assert_eq!(plan.lane("tr").unwrap().countries, ["TR", "CY"]);
        assert!(plan.lane("nope").is_none());

        assert_eq!(plan.routes[1].countries, ["TR", "CY"]);
        assert_eq!(plan.routes[1].prefixes, ["+9055"]);
        assert!(!format!("{plan:?}").contains("token\""));
        assert!(!format!("{plan:?}").contains("main-token"));
    }

    #[test]
    fn without_a_file_one_default_lane_mirrors_the_environment() {
        let config = config(&[
            ("BATCH_SIZE", "7"),
            ("PROCESSING_INTERVAL", "3s"),
            ("SEND_CONCURRENCY", "4"),
            ("SMS_API_URL", "https://sms.example/send"),
            ("SMS_API_TOKEN", "hunter2"),
        ])
        .unwrap();
        let plan = &config.plan;
        assert_eq!(plan.source, None);
        assert!(plan.routes.is_empty());
        assert_eq!(
            plan.lanes,
            [LaneSpec {
                name: "default".into(),
                batch_size: 7,
                interval: Duration::from_secs(3),
                unit: Unit::Messages,
                providers: vec!["default".into()],
                from: None,
                send_concurrency: 4,
                countries: Vec::new(),
                quiet_hours: None,
                daily_spend_cap: None,
            }]
        );
        assert_eq!(plan.providers.len(), 1);
        let provider = plan.provider("default").unwrap();
        assert_eq!(provider.kind, ProviderKind::HttpJson);
        assert_eq!(provider.settings.url, config.provider.url);
        assert_eq!(provider.settings.token, config.provider.token);
        assert_eq!(plan.route(Some("TR"), "+905551234567"), "default");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn the_deploy_example_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/dispatch.example.toml");
        let plan = config(&[("DISPATCH_CONFIG", path), ("SMS_API_TOKEN", "t")])
            .unwrap()
            .plan;
        let names: Vec<_> = plan.lanes.iter().map(|lane| lane.name.as_str()).collect();
        assert_eq!(names, ["default", "otp", "tr"]);
        assert_eq!(plan.providers.len(), 2);
        let otp = plan.lane("otp").unwrap();
        assert_eq!(
            (otp.batch_size, otp.interval, otp.send_concurrency),
            (10, Duration::from_secs(1), 8)
        );
        let tr = plan.lane("tr").unwrap();
        assert_eq!(
            (tr.unit, tr.batch_size, tr.interval),
            (Unit::Segments, 20, Duration::from_secs(10))
        );
        assert_eq!(plan.route(Some("TR"), "+905551234567"), "tr");
        assert_eq!(tr.daily_spend_cap, Some(Micros(20_000_000)));
        let prices = plan.provider("main").unwrap().prices.as_ref().unwrap();
        assert_eq!(prices.per_segment(Some("TR")), Some(Micros(12_000)));
    }

    #[test]
    fn unknown_fields_are_refused_with_their_line() {
        let text =
            format!("{PROVIDER}[[lane]]\nname = \"default\"\nbatchsize = 2\ninterval = \"2m\"\n");
        refused_at(&text, 8, "unknown field `batchsize`, expected one of");
        refused_at(&format!("{PROVIDER}{DEFAULT}[[lanes]]\n"), 11, "lanes");
    }

    #[test]
    fn bad_values_name_the_line_and_the_key() {
        let lane = |body: &str| format!("{PROVIDER}[[lane]]\nname = \"default\"\n{body}");
        refused_at(
            &lane("batch_size = 0\ninterval = \"2m\"\nproviders = [\"main\"]\n"),
            8,
            "lane \"default\": batch_size: must be at least 1",
        );
        refused_at(
            &lane("batch_size = 10001\ninterval = \"2m\"\nproviders = [\"main\"]\n"),
            8,
            "batch_size: 10001 is above the maximum of 10000",
        );
        refused_at(
            &lane("batch_size = \"two\"\ninterval = \"2m\"\nproviders = [\"main\"]\n"),
            8,
            "batch_size: invalid type",
        );
        refused_at(
            &lane("batch_size = 1\ninterval = \"2 minutes\"\nproviders = [\"main\"]\n"),
            9,
            "lane \"default\": interval: ",
        );
        refused_at(
            &lane("batch_size = 1\ninterval = \"500us\"\nproviders = [\"main\"]\n"),
            9,
            "interval: must be 0 (back to back) or at least 1ms",
        );
        refused_at(
            &lane("batch_size = 1\ninterval = \"1s\"\nunit = \"bytes\"\nproviders = [\"main\"]\n"),
            10,
            "unit: \"bytes\" is not messages or segments",
        );
        refused_at(
            &lane(
                "batch_size = 1\ninterval = \"1s\"\nproviders = [\"main\"]\nsend_concurrency = 1001\n",
            ),
            11,
            "send_concurrency: must be between 1 and 1000",
        );
        refused_at(
            &lane("batch_size = 1\ninterval = \"1s\"\nproviders = [\"main\", \"nope\"]\n"),
            10,
            "lane \"default\": providers: no [[provider]] is named \"nope\"",
        );
        refused_at(
            &lane("batch_size = 1\ninterval = \"1s\"\nproviders = []\n"),
            10,
            "providers: must name at least one",
        );
    }

    #[test]
    fn lanes_need_a_default_and_distinct_plain_names() {
        let lane = |name: &str| {
            format!(
                "[[lane]]\nname = \"{name}\"\nbatch_size = 1\ninterval = \"1s\"\nproviders = [\"main\"]\n"
            )
        };
        refused_at(
            &format!("{PROVIDER}{}{}", lane("otp"), lane("tr")),
            6,
            "no lane is named \"default\"; messages that no route matches go there",
        );
        refused_at(
            &format!("{PROVIDER}{DEFAULT}{}{}", lane("tr"), lane("tr")),
            17,
            "lane \"tr\": name: \"tr\" is defined twice",
        );
        refused_at(
            &format!("{PROVIDER}{DEFAULT}{}", lane("Turkey")),
            12,
            "lane \"Turkey\": name: must match ^[a-z0-9][a-z0-9_-]{0,31}$",
        );
        let too_many: String = (0..MAX_LANES).map(|n| lane(&format!("l{n}"))).collect();
        refused_at(
            &format!("{PROVIDER}{DEFAULT}{too_many}"),
            6 + 5 * MAX_LANES + 1,
            "at most 64 lanes",
        );

        let err = plan(PROVIDER).unwrap_err();
        assert!(err.problem.contains("at least one [[lane]]"), "{err}");
    }

    #[test]
    fn routes_must_name_a_lane_and_real_destinations() {
        let route = |body: &str| format!("{PROVIDER}{DEFAULT}[[route]]\n{body}");
        refused_at(
            &route("lane = \"tr\"\ncountries = [\"TR\"]\n"),
            12,
            "route 1: lane: no [[lane]] is named \"tr\"",
        );
        refused_at(
            &route("lane = \"default\"\ncountries = [\"TR\", \"XX\"]\n"),
            13,
            "route 1: countries: \"XX\" is not an ISO 3166 alpha-2 code",
        );
        refused_at(
            &route("lane = \"default\"\nprefixes = [\"9055\"]\n"),
            13,
            "route 1: prefixes: \"9055\" must be + and 1 to 15 digits",
        );
        refused_at(
            &route("lane = \"default\"\n"),
            11,
            "route 1: needs countries, prefixes or both",
        );
    }

    #[test]
    fn prices_and_spend_caps_are_read_and_checked() {
        let file = |price: &str, lane: &str| {
            format!(
                "[[provider]]\nname = \"main\"\nkind = \"http-json\"\nurl = \"https://x\"\n\
                 token_env = \"SMS_API_TOKEN\"\n{price}\n\
                 [[lane]]\nname = \"default\"\nbatch_size = 5\ninterval = \"1s\"\n\
                 providers = [\"main\"]\n{lane}"
            )
        };
        let priced = plan(&file(
            "price_per_segment = { default = 0.0079, gb = 0.035, DE = 1 }",
            "daily_spend_cap = 50",
        ))
        .unwrap();
        let prices = priced.providers[0].prices.as_ref().unwrap();
        assert_eq!(prices.default, Some(Micros(7_900)));
        assert_eq!(prices.by_country["GB"], Micros(35_000));
        assert_eq!(prices.by_country["DE"], Micros(1_000_000));
        assert_eq!(priced.lanes[0].daily_spend_cap, Some(Micros(50_000_000)));
        let flat = plan(&file("price_per_segment = 0.01", "")).unwrap();
        assert_eq!(
            flat.providers[0].prices.as_ref().unwrap().default,
            Some(Micros(10_000))
        );
        assert_eq!(flat.lanes[0].daily_spend_cap, None);
        // Listed countries only: enough for a lane limited to them.
        plan(&file(
            "price_per_segment = { GB = 0.035 }",
            "countries = [\"GB\"]\ndaily_spend_cap = 5",
        ))
        .unwrap();

        refused_at(
            &file("price_per_segment = { XX = 0.01 }", ""),
            6,
            "price_per_segment: \"XX\" is neither \"default\" nor an ISO 3166 alpha-2 code",
        );
        refused_at(
            &file("price_per_segment = -0.01", ""),
            6,
            "price_per_segment: the price: -0.01 is not an amount",
        );
        refused_at(
            &file("price_per_segment = { default = \"cheap\" }", ""),
            6,
            "price_per_segment: default: \"cheap\" is not a number",
        );
        refused_at(
            &file("price_per_segment = 0.0000001", ""),
            6,
            "more than six decimal places",
        );
        refused_at(
            &file("price_per_segment = { gb = 0.01, GB = 0.05 }", ""),
            6,
            "price_per_segment: GB is priced twice",
        );
        refused_at(
            &file("", "daily_spend_cap = -5"),
            12,
            "daily_spend_cap: -5 is not an amount",
        );
        refused_at(
            &file("", "daily_spend_cap = 5"),
            11,
            "providers: daily_spend_cap needs a price for every country the lane sends to: \
             give provider \"main\" a price_per_segment with a default",
        );
        refused_at(
            &file("price_per_segment = { GB = 0.035 }", "daily_spend_cap = 5"),
            11,
            "give provider \"main\" a price_per_segment with a default",
        );
    }

    #[test]
    fn providers_are_checked() {
        let provider = |body: &str| format!("[[provider]]\nname = \"main\"\n{body}{DEFAULT}");
        refused_at(
            &provider(
                "kind = \"sms-o-matic\"\nurl = \"https://x\"\ntoken_env = \"SMS_API_TOKEN\"\n",
            ),
            3,
            "provider \"main\": kind \"sms-o-matic\" is not one of http-json, twilio, vonage, infobip",
        );
        refused_at(
            &provider("kind = \"twilio\"\nurl = \"https://x\"\ntoken_env = \"SMS_API_TOKEN\"\n"),
            4,
            "provider \"main\": url: is not used by kind \"twilio\"; use base_url",
        );
        refused_at(
            &provider("kind = \"twilio\"\ntoken_env = \"SMS_API_TOKEN\"\n"),
            1,
            "account_sid: is required for kind \"twilio\"",
        );
        refused_at(
            &provider("kind = \"vonage\"\ntoken_env = \"SMS_API_TOKEN\"\naccount_sid = \"AC1\"\n"),
            5,
            "account_sid: is used only by kind \"twilio\"",
        );
        refused_at(
            &provider(
                "kind = \"infobip\"\ntoken_env = \"SMS_API_TOKEN\"\nfrom = \"far too long a name\"\n",
            ),
            5,
            "from: \"far too long a name\" must be an E.164 number",
        );
        refused_at(
            &format!(
                "[[provider]]\nname = \"main\"\nkind = \"vonage\"\ntoken_env = \"SMS_API_TOKEN\"\n\
                 api_key = \"k\"\n{DEFAULT}"
            ),
            10,
            "lane \"default\": providers: provider \"main\" (vonage) needs a sender",
        );
        refused_at(
            &provider(
                "kind = \"twilio\"\ntoken_env = \"SMS_API_TOKEN\"\naccount_sid = \"AC1/../x\"\n",
            ),
            5,
            "account_sid: \"AC1/../x\" must be letters and digits",
        );
        refused_at(
            &provider("kind = \"infobip\"\ntoken_env = \"SMS_API_TOKEN\"\nbreaker_ratio = 1.5\n"),
            5,
            "breaker_ratio: must be above 0 and at most 1",
        );
        refused_at(
            &provider(
                "kind = \"infobip\"\ntoken_env = \"SMS_API_TOKEN\"\nbreaker_cooldown = \"5ms\"\n",
            ),
            5,
            "breaker_cooldown: must be at least 100ms",
        );
        refused_at(
            &provider("kind = \"http-json\"\nurl = \"ftp://x\"\ntoken_env = \"SMS_API_TOKEN\"\n"),
            4,
            "provider \"main\": url: \"ftp://x\" is not an http(s) URL",
        );
        refused_at(
            &provider("kind = \"http-json\"\ntoken_env = \"SMS_API_TOKEN\"\n"),
            1,
            "url: is required",
        );
        refused_at(
            &provider("kind = \"http-json\"\nurl = \"https://x\"\ntoken_env = \"MISSING_TOKEN\"\n"),
            5,
            "provider \"main\": token_env: the variable MISSING_TOKEN is not set",
        );
        refused_at(
            &provider(
                "kind = \"http-json\"\nurl = \"https://x\"\ntoken_env = \"SMS_API_TOKEN\"\ntimeout = \"0s\"\n",
            ),
            6,
            "timeout: must be greater than 0",
        );
        refused_at(
            &format!("{PROVIDER}{PROVIDER}{DEFAULT}"),
            7,
            "provider \"main\": name: \"main\" is defined twice",
        );
    }

    #[test]
    fn each_provider_kind_reads_its_own_keys_with_defaults() {
        let text = r#"[[provider]]
name = "tw"
kind = "twilio"
token_env = "SMS_API_TOKEN"
account_sid = "AC123"
messaging_service_sid = "MG456"
public_url = "https://sms.example.com/"
breaker_failures = 3
breaker_ratio = 0.25
breaker_cooldown = "10s"

[[provider]]
name = "vo"
kind = "vonage"
base_url = "http://127.0.0.1:4010/"
token_env = "SMS_API_TOKEN"
api_key = "abcd1234"
from = "ACME"

[[provider]]
name = "ib"
kind = "infobip"
token_env = "SMS_API_TOKEN"

[[lane]]
name = "default"
batch_size = 2
interval = "1s"
providers = ["tw", "vo", "ib"]
from = "+15005550006"
"#;
        let plan = plan(text).unwrap();
        let tw = plan.provider("tw").unwrap();
        assert_eq!(tw.kind, ProviderKind::Twilio);
        assert_eq!(tw.settings.url, "https://api.twilio.com");
        assert_eq!(tw.account_sid.as_deref(), Some("AC123"));
        assert_eq!(tw.messaging_service_sid.as_deref(), Some("MG456"));
        assert_eq!(tw.public_url.as_deref(), Some("https://sms.example.com"));
        assert_eq!(
            tw.breaker,
            BreakerSettings {
                failures: 3,
                ratio: 0.25,
                cooldown: Duration::from_secs(10)
            }
        );
        let vo = plan.provider("vo").unwrap();
        assert_eq!(vo.settings.url, "http://127.0.0.1:4010");
        assert_eq!(vo.api_key.as_deref(), Some("abcd1234"));
        assert_eq!(vo.from.as_ref().map(Sender::as_str), Some("ACME"));
        assert_eq!(vo.breaker, BreakerSettings::default());
        let ib = plan.provider("ib").unwrap();
        assert_eq!(ib.settings.url, "https://api.infobip.com");
        let lane = plan.lane("default").unwrap();
        assert_eq!(lane.from.as_ref().map(Sender::as_str), Some("+15005550006"));
    }

    #[test]
    fn a_token_may_come_from_the_file_its_file_variable_names() {
        let secret = PlanFile::new("from-a-file\n");
        let text = format!(
            "{}{DEFAULT}",
            PROVIDER.replace("SMS_API_TOKEN", "OTP_TOKEN")
        );
        let file = PlanFile::new(&text);
        let config = config(&[
            ("DISPATCH_CONFIG", &file.path()),
            ("OTP_TOKEN_FILE", &secret.path()),
        ])
        .unwrap();
        let main = config.plan.provider("main").unwrap();
        assert_eq!(main.settings.token.expose(), "from-a-file");
        assert!(!format!("{config:?}").contains("from-a-file"));
    }

    #[test]
    fn an_unreadable_file_names_the_path_and_the_os_error() {
        let err = config(&[("DISPATCH_CONFIG", "/nonexistent/dispatch.toml")]).unwrap_err();
        assert_eq!(err.variable, "DISPATCH_CONFIG");
        assert!(
            err.problem
                .starts_with("/nonexistent/dispatch.toml: cannot read it: ")
                && err.problem.contains("os error 2"),
            "{err}"
        );
    }

    #[test]
    fn routing_takes_the_first_match_by_country_or_prefix() {
        let plan = plan(FULL).unwrap();
        // Route 1 matches by prefix before route 2 is asked.
        assert_eq!(plan.route(Some("US"), "+15551234567"), "otp");
        assert_eq!(plan.route(Some("TR"), "+905321234567"), "tr");
        assert_eq!(plan.route(Some("tr"), "+905321234567"), "tr");
        assert_eq!(plan.route(Some("CY"), "+35712345678"), "tr");
        // No country known: the prefix still routes.
        assert_eq!(plan.route(None, "+905551234567"), "tr");
        assert_eq!(plan.route(None, "+905321234567"), "default");
        assert_eq!(plan.route(Some("DE"), "+4915112345678"), "default");
    }
}
