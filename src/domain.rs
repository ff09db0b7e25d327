//! Domain types that cannot hold bad values: input is validated once, at the edge.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;

/// Why a value was refused; the HTTP layer turns it into a 422 naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ValidationError {
    pub field: &'static str,
    pub problem: String,
}

/// A phone number in E.164 (`+` and the country code, at most 15 digits), checked
/// against libphonenumber's numbering plans: a real country code and a number that
/// can exist there. Digits only, with an optional leading `+`. National formats
/// (`05551234567`) are read only with a default region (`DEFAULT_REGION`); what is
/// kept is always the E.164 form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PhoneNumber(String);

/// An ISO 3166 region for national-format numbers (`DEFAULT_REGION`, e.g. `TR`).
pub type Region = phonenumber::country::Id;

impl PhoneNumber {
    pub fn parse(input: &str, region: Option<Region>) -> Result<Self, ValidationError> {
        let problem = |p: String| ValidationError {
            field: "phone_number",
            problem: p,
        };
        let text = input.trim();
        if text.is_empty() {
            return Err(problem("must not be empty".into()));
        }
        let international = text.starts_with('+');
        let digits = text.strip_prefix('+').unwrap_or(text);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(problem(format!(
                "{text:?} must be digits with an optional leading + (no spaces or punctuation)"
            )));
        }
        if !international && region.is_none() {
            return Err(problem(format!(
                "{text:?} is not in E.164 format: write it with + and the country code, \
                 like +905551234567 (national formats need DEFAULT_REGION)"
            )));
        }
        if digits.len() > 17 {
            return Err(problem(format!(
                "{text:?} has {} digits; E.164 allows 15",
                digits.len()
            )));
        }
        let parsed = phonenumber::parse(if international { None } else { region }, text)
            .map_err(|err| problem(format!("{text:?} is not a phone number ({err})")))?;
        if !phonenumber::is_valid(&parsed) {
            return Err(problem(format!(
                "{text:?} is not a valid number in the numbering plan of its country code"
            )));
        }
        let e164 = parsed.format().mode(phonenumber::Mode::E164).to_string();
        if e164.len() > 16 {
            return Err(problem(format!("{text:?} is longer than E.164 allows")));
        }
        Ok(Self(e164))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The ISO region of a stored phone number (`TR` for `+905551234567`); `None` for a
/// row from before E.164 numbers whose number cannot be read without a region.
pub fn country_of(phone_number: &str) -> Option<String> {
    if !phone_number.starts_with('+') {
        return None;
    }
    let parsed = phonenumber::parse(None, phone_number).ok()?;
    let id = parsed.country().id()?;
    Some(id.as_ref().to_string())
}

/// A region from its ISO code (`DEFAULT_REGION`), case-insensitive.
pub fn parse_region(code: &str) -> Option<Region> {
    code.trim().to_ascii_uppercase().parse().ok()
}

/// Who a message says it is from: an E.164 number (`+` and 4 to 15 digits) or an
/// alphanumeric sender of 1 to 11 letters, digits and inner spaces (a brand name or a
/// short code: what the GSM originator field carries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sender(String);

impl Sender {
    pub fn parse(input: &str) -> Result<Self, ValidationError> {
        let problem = |p: String| ValidationError {
            field: "from",
            problem: p,
        };
        if let Some(digits) = input.strip_prefix('+') {
            if (4..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
                return Ok(Self(input.to_string()));
            }
            return Err(problem(format!(
                "{input:?} is not an E.164 number (+ and 4 to 15 digits)"
            )));
        }
        let alphanumeric = (1..=11).contains(&input.len())
            && input
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b' ')
            && input.trim() == input;
        if !alphanumeric {
            return Err(problem(format!(
                "{input:?} must be an E.164 number like +15005550006 or 1 to 11 letters, \
                 digits and inner spaces"
            )));
        }
        Ok(Self(input.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Message text: not blank, at most `MESSAGE_MAX_LENGTH` characters (not bytes) and at
/// most `MESSAGE_MAX_SEGMENTS` SMS segments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MessageContent(String);

impl MessageContent {
    pub fn parse(
        input: &str,
        max_chars: usize,
        max_segments: u32,
    ) -> Result<Self, ValidationError> {
        let problem = |p: String| ValidationError {
            field: "content",
            problem: p,
        };
        if input.chars().all(char::is_whitespace) {
            return Err(problem("must not be empty".into()));
        }
        if input.contains('\0') {
            return Err(problem("must not contain NUL characters".into()));
        }
        let chars = input.chars().count();
        if chars > max_chars {
            return Err(problem(format!(
                "is {chars} characters long, the maximum is {max_chars}"
            )));
        }
        let segmentation = crate::encoding::segment(input);
        if segmentation.segments > max_segments {
            return Err(problem(format!(
                "takes {} SMS segments ({:?}), the maximum is {max_segments}",
                segmentation.segments, segmentation.encoding
            )));
        }
        Ok(Self(input.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An RFC 3339 time with an offset (`2026-12-01T09:30:00Z`, `…T12:30:00.5+03:00`),
/// kept to whole microseconds as PostgreSQL keeps it. Exactly the strings the OpenAPI
/// document's pattern admits: `T`/`t`, seconds 00–59, at most 9 fraction digits,
/// `Z`/`z` or an offset up to ±23:59, and a real calendar date.
pub fn parse_time(field: &'static str, text: &str) -> Result<DateTime<Utc>, ValidationError> {
    let refuse = || ValidationError {
        field,
        problem: format!(
            "must be an RFC 3339 time with an offset, like 2026-12-01T09:30:00Z (got {text:?})"
        ),
    };
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(range)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
    };
    let at = |i: usize, allowed: &[u8]| b.get(i).is_some_and(|c| allowed.contains(c));
    let fixed = digits(0..4).is_some()
        && at(4, b"-")
        && digits(5..7).is_some()
        && at(7, b"-")
        && digits(8..10).is_some()
        && at(10, b"Tt")
        && digits(11..13).is_some_and(|h| h <= 23)
        && at(13, b":")
        && digits(14..16).is_some_and(|m| m <= 59)
        && at(16, b":")
        && digits(17..19).is_some_and(|s| s <= 59);
    if !fixed {
        return Err(refuse());
    }
    let mut rest = &text[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let n = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if !(1..=9).contains(&n) {
            return Err(refuse());
        }
        rest = &fraction[n..];
    }
    let offset_ok = match rest.as_bytes() {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => {
            [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit())
                && (h1 - b'0') * 10 + (h2 - b'0') <= 23
                && (m1 - b'0') * 10 + (m2 - b'0') <= 59
        }
        _ => false,
    };
    if !offset_ok {
        return Err(refuse());
    }
    // The shape is right; chrono checks the calendar (30 February, leap years).
    let normalised = text.to_ascii_uppercase();
    DateTime::parse_from_rfc3339(&normalised)
        .ok()
        .and_then(|t| DateTime::from_timestamp_micros(t.timestamp_micros()))
        .ok_or_else(refuse)
}

/// A leadership term number from the fence row. Every claim and every result is
/// stamped with it, and PostgreSQL refuses work from any epoch but the newest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Epoch(pub i64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The random value stored in the Redis lock key; only its holder may extend or
/// release the lock. Fresh for every acquisition.
#[derive(Clone, PartialEq, Eq)]
pub struct LeaseToken(String);

impl LeaseToken {
    pub fn generate() -> Self {
        Self(format!("{:032x}", rand::random::<u128>()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Short prefix only: enough to correlate logs, not enough to forge a release.
        write!(f, "LeaseToken({}…)", &self.0[..8])
    }
}

/// Message lifecycle, as stored in `messages.status`. `sent`, `failed`, `expired`,
/// `cancelled` and `blocked` (the recipient opted out) are terminal (a `failed` message
/// can be retried by hand).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    Pending,
    Sending,
    Sent,
    Failed,
    Expired,
    Cancelled,
    Blocked,
}

impl MessageStatus {
    pub const ALL: [MessageStatus; 7] = [
        Self::Pending,
        Self::Sending,
        Self::Sent,
        Self::Failed,
        Self::Expired,
        Self::Cancelled,
        Self::Blocked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sending => "sending",
            Self::Sent => "sent",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
            Self::Blocked => "blocked",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// What a message is for (docs/design.md#quiet-hours): `transactional` (a login code,
/// an order update) goes out in a lane's quiet hours; `marketing`, and a message that
/// names no category, waits for the window to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    Transactional,
    Marketing,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transactional => "transactional",
            Self::Marketing => "marketing",
        }
    }

    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        match text {
            "transactional" => Ok(Self::Transactional),
            "marketing" => Ok(Self::Marketing),
            other => Err(ValidationError {
                field: "category",
                problem: format!("must be transactional or marketing (got {other:?})"),
            }),
        }
    }
}

/// What a recipient's reply asks for (docs/design.md#opt-outs): the reply is one of the
/// industry's keywords, alone, in any case, with surrounding spaces and trailing
/// punctuation ignored. "Stop by at five" is a message, not an opt-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Consent {
    /// STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT.
    OptOut,
    /// START, UNSTOP.
    OptIn,
}

impl Consent {
    pub const OPT_OUT_WORDS: [&'static str; 6] =
        ["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"];
    pub const OPT_IN_WORDS: [&'static str; 2] = ["START", "UNSTOP"];

    /// The consent a reply's text asks for; `None` for any other text.
    pub fn of_reply(text: &str) -> Option<Self> {
        let word = text
            .trim()
            .trim_end_matches(|c: char| c.is_ascii_punctuation() || c.is_whitespace())
            .to_ascii_uppercase();
        if Self::OPT_OUT_WORDS.contains(&word.as_str()) {
            Some(Self::OptOut)
        } else if Self::OPT_IN_WORDS.contains(&word.as_str()) {
            Some(Self::OptIn)
        } else {
            None
        }
    }
}

/// What the provider's delivery receipt said (`messages.delivery_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    Delivered,
    Undelivered,
    Failed,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 3] = [Self::Delivered, Self::Undelivered, Self::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Undelivered => "undelivered",
            Self::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// SMPP `priority_flag`: 0 (default) to 3 (most urgent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize)]
pub struct Priority(i16);

impl Priority {
    pub const MAX: i16 = 3;
    /// Every priority, lowest first.
    pub const ALL: [i16; 4] = [0, 1, 2, 3];

    pub fn parse(value: i64) -> Result<Self, ValidationError> {
        if (0..=i64::from(Self::MAX)).contains(&value) {
            Ok(Self(value as i16))
        } else {
            Err(ValidationError {
                field: "priority",
                problem: format!("must be an integer from 0 to {} (got {value})", Self::MAX),
            })
        }
    }

    pub fn get(self) -> i16 {
        self.0
    }
}

/// A client's idempotency key: 1–255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub const MAX_LEN: usize = 255;

    pub fn parse(input: &str) -> Result<Self, ValidationError> {
        let ok = (1..=Self::MAX_LEN).contains(&input.len())
            && input.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(Self(input.to_string()))
        } else {
            Err(ValidationError {
                field: "idempotency_key",
                problem: format!(
                    "must be 1 to {} visible ASCII characters (no spaces)",
                    Self::MAX_LEN
                ),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_keyword_alone_changes_consent() {
        for reply in [
            "STOP",
            "stop",
            " Stop. ",
            "StopAll",
            "unsubscribe!",
            "CANCEL",
            "end",
            "QUIT\n",
        ] {
            assert_eq!(Consent::of_reply(reply), Some(Consent::OptOut), "{reply:?}");
        }
        for reply in ["START", "unstop", "Start!"] {
            assert_eq!(Consent::of_reply(reply), Some(Consent::OptIn), "{reply:?}");
        }
        for reply in [
            "",
            "Stop by at five",
            "please stop",
            "STOPP",
            "ST0P",
            "yes",
            "stop stop",
        ] {
            assert_eq!(Consent::of_reply(reply), None, "{reply:?}");
        }
    }

    #[test]
    fn a_sender_is_e164_or_up_to_eleven_alphanumerics() {
        for good in [
            "+15005550006",
            "+6834002",
            "ACME",
            "Acme Bank",
            "12345",
            "A1234567890",
        ] {
            assert_eq!(Sender::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "+",
            "+12",
            "+1500555000600001",
            "ACME-BANK",
            "ABCDEFGHIJKL",
            " ACME",
            "Çiçek",
            "+1 500",
        ] {
            let err = Sender::parse(bad).unwrap_err();
            assert_eq!(err.field, "from", "{bad:?}");
        }
    }

    #[test]
    fn phone_numbers_are_e164_with_a_real_country_code() {
        let e164 = |text: &str, region| PhoneNumber::parse(text, region).map(|p| p.0);
        assert_eq!(e164("+905551111111", None).unwrap(), "+905551111111");
        assert_eq!(e164("+14155552671", None).unwrap(), "+14155552671");
        assert_eq!(e164("+6834002", None).unwrap(), "+6834002");
        let tr = parse_region("tr");
        assert_eq!(e164("05551111111", tr).unwrap(), "+905551111111");
        assert_eq!(e164("5551111111", tr).unwrap(), "+905551111111");
        assert_eq!(e164("+14155552671", tr).unwrap(), "+14155552671");
        for bad in [
            "+90 555 111 11 11",
            "+1 (415) 555-2671",
            "0000000000",
            "5551111111",
            "05551111111",
            "+0000000000",
            "+9990000000",
            "+1234567890123456789",
            "9999999999999999999",
            "+90555111",
            "abcdefghijk",
            "",
            "+",
        ] {
            assert!(PhoneNumber::parse(bad, None).is_err(), "{bad:?}");
        }
        for bad in ["0000000000", "123", "+9999999999999999999"] {
            assert!(PhoneNumber::parse(bad, tr).is_err(), "{bad:?} with TR");
        }
        assert_eq!(country_of("+905551111111").as_deref(), Some("TR"));
        assert_eq!(country_of("+14155552671").as_deref(), Some("US"));
        assert_eq!(country_of("5551111111"), None);
        assert!(parse_region("XX").is_none());
    }

    #[test]
    fn content_counts_characters() {
        assert!(MessageContent::parse(&"é".repeat(160), 160, 10).is_ok());
        assert!(MessageContent::parse(&"a".repeat(161), 160, 10).is_err());
        assert!(MessageContent::parse("   ", 160, 10).is_err());
        assert!(MessageContent::parse("", 160, 10).is_err());
        assert!(MessageContent::parse("a\0b", 160, 10).is_err());
        assert!(MessageContent::parse("\u{3000}\n", 160, 10).is_err());
        // 135 UCS-2 characters take 3 segments: within 160 characters, over 2 segments.
        assert!(MessageContent::parse(&"ş".repeat(135), 160, 2).is_err());
        assert!(MessageContent::parse(&"ş".repeat(134), 160, 2).is_ok());
    }

    #[test]
    fn rfc3339_times() {
        let ok = |t: &str| parse_time("t", t).unwrap_or_else(|e| panic!("{t}: {e}"));
        assert_eq!(
            ok("2026-12-01T09:30:00Z").to_rfc3339(),
            "2026-12-01T09:30:00+00:00"
        );
        assert_eq!(
            ok("2026-12-01t12:30:00.5+03:00"),
            ok("2026-12-01T09:30:00.500Z")
        );
        assert_eq!(
            ok("2026-12-01T09:30:00.123456789z").timestamp_subsec_micros(),
            123456
        );
        ok("2024-02-29T00:00:00Z");
        ok("2000-02-29T00:00:00Z");
        ok("0000-01-01T00:00:00+23:59");
        ok("9999-12-31T23:59:59-23:59");
        ok("0000-02-29T00:00:00Z");
        for bad in [
            "",
            "tomorrow",
            "2026-12-01",
            "2026-12-01T09:30:00",
            "2026-12-01 09:30:00Z",
            "2026-13-01T09:30:00Z",
            "2026-02-29T09:30:00Z",
            "1900-02-29T09:30:00Z",
            "2026-04-31T09:30:00Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T09:60:00Z",
            "2026-12-01T09:30:60Z",
            "2026-12-01T09:30:00.Z",
            "2026-12-01T09:30:00.1234567890Z",
            "2026-12-01T09:30:00+24:00",
            "2026-12-01T09:30:00+0300",
            "2026-12-01T09:30:00Zjunk",
            "+2026-12-01T09:30:00Z",
            "2026-12-01T09:30:00ż",
        ] {
            assert!(parse_time("t", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn priorities_and_keys() {
        assert_eq!(Priority::parse(3).unwrap().get(), 3);
        assert!(Priority::parse(4).is_err());
        assert!(Priority::parse(-1).is_err());
        assert!(IdempotencyKey::parse("order-42:sms").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        for bad in ["", "has space", "tab\t", "é", &"k".repeat(256)] {
            assert!(IdempotencyKey::parse(bad).is_err(), "{bad:?}");
        }
    }
}
