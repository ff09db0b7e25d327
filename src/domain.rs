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

/// A phone number as the provider accepts it: 10–20 characters, digits with an
/// optional leading `+` (the same rule as the `messages` CHECK constraint).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    pub fn parse(input: &str) -> Result<Self, ValidationError> {
        let problem = |p: &str| ValidationError {
            field: "phone_number",
            problem: p.to_string(),
        };
        let digits = input.strip_prefix('+').unwrap_or(input);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(problem("must be digits with an optional leading +"));
        }
        if !(10..=20).contains(&input.len()) {
            return Err(problem("must be 10 to 20 characters long"));
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

/// Message lifecycle, as stored in `messages.status`. `sent`, `failed`, `expired` and
/// `cancelled` are terminal (a `failed` message can be retried by hand).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    Pending,
    Sending,
    Sent,
    Failed,
    Expired,
    Cancelled,
}

impl MessageStatus {
    pub const ALL: [MessageStatus; 6] = [
        Self::Pending,
        Self::Sending,
        Self::Sent,
        Self::Failed,
        Self::Expired,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sending => "sending",
            Self::Sent => "sent",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
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
    fn phone_numbers() {
        assert!(PhoneNumber::parse("+905551111111").is_ok());
        assert!(PhoneNumber::parse("5551111111").is_ok());
        assert!(PhoneNumber::parse("12345678901234567890").is_ok());
        for bad in [
            "555111111",
            "+55511111",
            "123456789012345678901",
            "+90 555 111",
            "abcdefghijk",
            "",
            "+",
        ] {
            assert!(PhoneNumber::parse(bad).is_err(), "{bad:?}");
        }
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
