//! Human durations as the original Go service wrote them: `500ms`, `15s`, `2m`, `1h30m`.
//!
//! Parsing follows Go's `time.ParseDuration` (a sequence of decimal numbers, each with a
//! unit) so existing deployment files keep working; `0` alone is accepted as zero.

use std::time::Duration;

/// Parses a Go-style duration: one or more `<number><unit>` parts, where a number is
/// digits with an optional decimal fraction (`1.5s`). Nothing else is accepted (no
/// spaces, signs or bare numbers other than `0`), so the API's documented pattern and
/// this parser agree exactly. The error says what was expected (durations are never
/// secret, so it may echo the input).
pub fn parse(text: &str) -> Result<Duration, String> {
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total_nanos: f64 = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("missing unit in {text:?} (use ms, s, m or h)"))?;
        let number = &rest[..number_len];
        let well_formed = match number.split_once('.') {
            None => !number.is_empty(),
            Some((whole, fraction)) => {
                !whole.is_empty()
                    && !fraction.is_empty()
                    && fraction.bytes().all(|b| b.is_ascii_digit())
            }
        };
        if !well_formed {
            return Err(format!("expected a number like 15 or 1.5 in {text:?}"));
        }
        let value: f64 = number
            .parse()
            .map_err(|_| format!("bad number in {text:?}"))?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            other => {
                return Err(format!(
                    "unknown unit {other:?} in {text:?} (use ms, s, m or h)"
                ));
            }
        };
        rest = &rest[unit_len..];
        total_nanos += value * nanos_per_unit;
    }
    if !total_nanos.is_finite() || total_nanos >= u64::MAX as f64 {
        return Err(format!("duration {text:?} is too large"));
    }
    Ok(Duration::from_nanos(total_nanos.round() as u64))
}

/// Formats a duration the way operators write it (`2m`, `15s`, `500ms`, `1m30s`).
pub fn format(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis == 0 {
        return "0s".into();
    }
    if millis % 1000 != 0 {
        return format!("{millis}ms");
    }
    let secs = millis / 1000;
    let (hours, minutes, seconds) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    if seconds > 0 {
        out.push_str(&format!("{seconds}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_operators_write() {
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse("0s").unwrap(), Duration::ZERO);
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
        assert_eq!(parse("24h").unwrap(), Duration::from_secs(86400));
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        for bad in [
            "abc",
            "",
            "15",
            "5 minutes",
            "ms",
            "1x",
            "-1s",
            "1..2s",
            ".5s",
            "1.s",
            " 2m",
            "2m ",
            "1e3s",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn formats_round_trip() {
        for text in ["2m", "15s", "500ms", "1m30s", "0s", "24h"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
    }
}
