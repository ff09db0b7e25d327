//! Money: what a send costs and what a lane may spend in a UTC day
//! (docs/design.md#spend-caps).
//!
//! Amounts are whole millionths of the operator's currency ("micros"): a price of
//! 0.0079 is 7,900 micros. Integers add up exactly in Rust and in PostgreSQL, where
//! floating-point sums of many small prices would drift from the provider's invoice.

use std::collections::BTreeMap;
use std::fmt;

/// Millionths of the currency unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Micros(pub i64);

/// The largest amount accepted (a trillion units): far above any real price or cap,
/// far below where micros overflow.
const MAX_UNITS: f64 = 1e12;

impl Micros {
    /// An amount given as a decimal number of currency units (`0.0079`, `50`): refused
    /// when negative, not finite, too large, or finer than a millionth.
    pub fn from_units(units: f64) -> Result<Self, String> {
        if !units.is_finite() || units < 0.0 {
            return Err(format!(
                "{units} is not an amount: give a number of 0 or more"
            ));
        }
        if units > MAX_UNITS {
            return Err(format!("{units} is too large (at most {MAX_UNITS})"));
        }
        let micros = (units * 1e6).round();
        // A decimal with at most six places lands within rounding noise of a whole
        // number of micros; anything finer would be silently rounded.
        if (units * 1e6 - micros).abs() > 1e-3 {
            return Err(format!(
                "{units} has more than six decimal places; amounts are kept to a millionth"
            ));
        }
        Ok(Self(micros as i64))
    }

    /// In currency units, for JSON and metrics (a display value; sums stay in micros).
    pub fn units(self) -> f64 {
        self.0 as f64 / 1e6
    }
}

impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let (whole, fraction) = (
            self.0.unsigned_abs() / 1_000_000,
            self.0.unsigned_abs() % 1_000_000,
        );
        let fraction = format!("{fraction:06}");
        let fraction = fraction.trim_end_matches('0');
        let fraction = if fraction.len() < 2 {
            format!("{fraction:0<2}")
        } else {
            fraction.to_string()
        };
        write!(f, "{sign}{whole}.{fraction}")
    }
}

/// A provider's price per SMS segment: per country (ISO 3166 alpha-2, upper case), with
/// a default for the countries not listed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Prices {
    pub default: Option<Micros>,
    pub by_country: BTreeMap<String, Micros>,
}

impl Prices {
    /// The price of one segment to a number of `country`; `None` when neither the
    /// country nor a default is priced.
    pub fn per_segment(&self, country: Option<&str>) -> Option<Micros> {
        country
            .and_then(|c| self.by_country.get(c).copied())
            .or(self.default)
    }

    /// What a message of `segments` to `phone_number` costs.
    pub fn message(&self, phone_number: &str, segments: u32) -> Option<Micros> {
        let country = crate::domain::country_of(phone_number);
        self.per_segment(country.as_deref())
            .map(|price| Micros(price.0.saturating_mul(i64::from(segments))))
    }

    /// The highest price of one segment anywhere.
    pub fn highest(&self) -> Option<Micros> {
        self.by_country.values().copied().chain(self.default).max()
    }

    /// Whether every number a lane limited to `countries` (empty: any) may send to has
    /// a price.
    pub fn covers(&self, countries: &[String]) -> bool {
        self.default.is_some()
            || (!countries.is_empty() && countries.iter().all(|c| self.by_country.contains_key(c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_whole_micros() {
        assert_eq!(Micros::from_units(0.0079), Ok(Micros(7_900)));
        assert_eq!(Micros::from_units(50.0), Ok(Micros(50_000_000)));
        assert_eq!(Micros::from_units(0.000001), Ok(Micros(1)));
        assert_eq!(Micros::from_units(0.0), Ok(Micros(0)));
        assert!(
            Micros::from_units(0.0000001)
                .unwrap_err()
                .contains("six decimal")
        );
        assert!(Micros::from_units(-1.0).is_err());
        assert!(Micros::from_units(f64::NAN).is_err());
        assert!(Micros::from_units(1e13).is_err());
        assert_eq!(Micros(7_900).to_string(), "0.0079");
        assert_eq!(Micros(50_000_000).to_string(), "50.00");
        assert_eq!(Micros(1_500_000).to_string(), "1.50");
        assert_eq!(Micros(-1).to_string(), "-0.000001");
    }

    #[test]
    fn a_country_price_beats_the_default() {
        let prices = Prices {
            default: Some(Micros(10_000)),
            by_country: [("GB".to_string(), Micros(35_000))].into(),
        };
        assert_eq!(prices.message("+447400123456", 2), Some(Micros(70_000)));
        assert_eq!(prices.message("+14155550123", 1), Some(Micros(10_000)));
        assert_eq!(prices.highest(), Some(Micros(35_000)));
        assert!(prices.covers(&[]));
        let listed_only = Prices {
            default: None,
            ..prices
        };
        assert_eq!(listed_only.message("+14155550123", 1), None);
        assert!(!listed_only.covers(&[]));
        assert!(listed_only.covers(&["GB".to_string()]));
        assert!(!listed_only.covers(&["GB".to_string(), "US".to_string()]));
    }
}
