//! Quiet hours: a daily window, in the recipient's local time, in which a lane sends no
//! message that is not transactional (docs/design.md#quiet-hours).
//!
//! The recipient's local time comes from the number's country: the time zones the IANA
//! time zone database lists for it (`src/tz/zone1970.tab`, public domain, copied
//! from tzdata), each read with `chrono-tz`. A country with several zones is quiet
//! while any of them is, so no recipient anywhere in it gets a message inside the
//! window. A number whose country is unknown, or a country the table does not list, is
//! never held.

use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

use chrono::{DateTime, Duration, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

/// The IANA table of zones per country.
const ZONE_TABLE: &str = include_str!("tz/zone1970.tab");

/// A daily window `start-end` in local time; `end` before `start` wraps midnight
/// (`21:00-08:00`). Quiet from `start` (inclusive) to `end` (exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    start: NaiveTime,
    end: NaiveTime,
}

impl fmt::Display for QuietHours {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{}",
            self.start.format("%H:%M"),
            self.end.format("%H:%M")
        )
    }
}

impl QuietHours {
    /// `HH:MM-HH:MM`, 24-hour clock; the two ends must differ.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a window like \"21:00-08:00\" (HH:MM-HH:MM)");
        let (start, end) = text.trim().split_once('-').ok_or_else(bad)?;
        let time = |t: &str| NaiveTime::parse_from_str(t.trim(), "%H:%M").map_err(|_| bad());
        let (start, end) = (time(start)?, time(end)?);
        if start == end {
            return Err(format!(
                "{text:?} starts and ends at the same time: a window must not be empty or a whole day"
            ));
        }
        Ok(Self { start, end })
    }

    fn contains(&self, local: NaiveTime) -> bool {
        if self.start < self.end {
            self.start <= local && local < self.end
        } else {
            local >= self.start || local < self.end
        }
    }

    fn quiet_in(&self, zone: Tz, at: DateTime<Utc>) -> bool {
        self.contains(zone.from_utc_datetime(&at.naive_utc()).time())
    }

    /// When a message to a number of `country` may go out, if not now: `None` when no
    /// zone of the country is inside the window at `now`, else the first minute after
    /// `now` at which none is.
    pub fn reopens_at(&self, country: Option<&str>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let zones = zones_of(country?)?;
        let quiet = |at: DateTime<Utc>| zones.iter().any(|zone| self.quiet_in(*zone, at));
        if !quiet(now) {
            return None;
        }
        // Every zone is open again within a day of when the last one closed; step by
        // the minute, the window's own resolution, over two days at most (2,880 steps,
        // only for a held message).
        // The next whole minute after `now`.
        let mut at = DateTime::from_timestamp((now.timestamp().div_euclid(60) + 1) * 60, 0)?;
        for _ in 0..2 * 24 * 60 {
            if !quiet(at) {
                return Some(at);
            }
            at += Duration::minutes(1);
        }
        // Quiet all day in some zone (a window so long that the zones' windows cover
        // the clock): look again in an hour rather than never.
        Some(now + Duration::hours(1))
    }
}

/// The time zones of a country (ISO code, upper case), from the IANA table.
pub fn zones_of(country: &str) -> Option<&'static [Tz]> {
    static TABLE: OnceLock<HashMap<String, Vec<Tz>>> = OnceLock::new();
    TABLE
        .get_or_init(|| {
            let mut table: HashMap<String, Vec<Tz>> = HashMap::new();
            for line in ZONE_TABLE.lines().filter(|l| !l.starts_with('#')) {
                let mut columns = line.split('\t');
                let (Some(countries), Some(_), Some(zone)) =
                    (columns.next(), columns.next(), columns.next())
                else {
                    continue;
                };
                let Ok(zone) = zone.parse::<Tz>() else {
                    continue;
                };
                for country in countries.split(',') {
                    table.entry(country.to_string()).or_default().push(zone);
                }
            }
            table
        })
        .get(country)
        .map(Vec::as_slice)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    #[test]
    fn a_window_is_parsed_and_wraps_midnight() {
        let night = QuietHours::parse("21:00-08:00").unwrap();
        assert_eq!(night.to_string(), "21:00-08:00");
        let at = |t: &str| NaiveTime::parse_from_str(t, "%H:%M").unwrap();
        assert!(night.contains(at("21:00")) && night.contains(at("23:59")));
        assert!(night.contains(at("00:00")) && night.contains(at("07:59")));
        assert!(!night.contains(at("08:00")) && !night.contains(at("20:59")));
        let lunch = QuietHours::parse(" 12:00 - 13:30 ").unwrap();
        assert!(lunch.contains(at("12:00")) && !lunch.contains(at("13:30")));
        for bad in [
            "",
            "21:00",
            "21-08",
            "25:00-08:00",
            "08:00-08:00",
            "9pm-8am",
        ] {
            assert!(QuietHours::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_zone_of_the_table_is_known_to_chrono_tz() {
        let listed = ZONE_TABLE
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .count();
        let countries = ["TR", "US", "RU", "AU", "DE", "BR", "IN", "GB", "CY"];
        for country in countries {
            assert!(zones_of(country).is_some(), "{country}");
        }
        let unknown: Vec<&str> = ZONE_TABLE
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.split('\t').nth(2))
            .filter(|zone| zone.parse::<Tz>().is_err())
            .collect();
        assert!(unknown.is_empty(), "of {listed}: {unknown:?}");
        assert!(zones_of("XX").is_none());
    }

    #[test]
    fn a_country_is_quiet_while_any_of_its_zones_is() {
        let night = QuietHours::parse("21:00-08:00").unwrap();
        // 18:30 UTC: 21:30 in Istanbul (UTC+3): quiet until 05:00 UTC (08:00 there).
        let now = utc("2026-12-07T18:30:00Z");
        assert_eq!(
            night.reopens_at(Some("TR"), now),
            Some(utc("2026-12-07T05:00:00Z") + Duration::days(1))
        );
        // 14:00 UTC in December: 09:00 in New York, 04:00 in Honolulu: the US is quiet
        // until 08:00 in Hawaii (18:00 UTC), its last zone to open.
        let morning = utc("2026-12-07T14:00:00Z");
        assert_eq!(
            night.reopens_at(Some("US"), morning),
            Some(utc("2026-12-07T18:00:00Z"))
        );
        // 19:00 UTC: 14:00 in New York, 09:00 in Honolulu, 11:00 in Anchorage: open.
        assert_eq!(
            night.reopens_at(Some("US"), utc("2026-12-07T19:00:00Z")),
            None
        );
        // Germany at 12:00 UTC (13:00 there): open; no country: never held.
        assert_eq!(
            night.reopens_at(Some("DE"), utc("2026-12-07T12:00:00Z")),
            None
        );
        assert_eq!(night.reopens_at(None, now), None);
        assert_eq!(night.reopens_at(Some("XX"), now), None);
    }

    #[test]
    fn the_reopening_is_a_whole_minute_after_now() {
        let night = QuietHours::parse("21:00-08:00").unwrap();
        let now = utc("2026-12-07T04:59:30.5Z");
        assert_eq!(
            night.reopens_at(Some("TR"), now),
            Some(utc("2026-12-07T05:00:00Z"))
        );
    }
}
