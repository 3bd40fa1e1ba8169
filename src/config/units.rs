//! The value types an operator writes in the plugin config: durations (`"250ms"`), rates
//! (`"100/s"`) and percentages (`0` to `100`).
//!
//! Each is a newtype with its own parser, so a bad value is caught where it is read, with an error
//! that says what was expected and what was found, and the rest of the code never re-checks a
//! number's unit or range.

use core::fmt;
use core::time::Duration;

use serde::de::{Deserialize, Deserializer, Error as _};
use serde_json::Value;

/// A length of time written as a decimal number and a unit: `"250ms"`, `"1.5s"`, `"10s"`, `"1m"`, `"2h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeSpan(Duration);

/// A count per unit of time: `"100/s"`, `"600/m"`, `"5000/h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    count: u64,
    per: Duration,
}

/// A share from 0 to 100, kept in parts per million so that 0.0001% is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Percent {
    ppm: u32,
}

/// Why a unit value did not parse. `Display` gives the expectation and the offending value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitError {
    Duration { got: String },
    Rate { got: String },
    Percent { got: String },
}

const DURATION_EXPECTED: &str = r#"a duration like "250ms", "10s", "1m" or "1h""#;
const RATE_EXPECTED: &str = r#""<n>/s|m|h""#;
const PERCENT_EXPECTED: &str = "a percentage from 0 to 100";

impl fmt::Display for UnitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (expected, got) = match self {
            UnitError::Duration { got } => (DURATION_EXPECTED, got),
            UnitError::Rate { got } => (RATE_EXPECTED, got),
            UnitError::Percent { got } => (PERCENT_EXPECTED, got),
        };
        write!(f, "expected {expected}, got {got}")
    }
}

impl std::error::Error for UnitError {}

/// Renders a JSON value the way the operator wrote it, clipped so one huge value cannot flood a log.
fn describe(value: &Value) -> String {
    const LIMIT: usize = 77;
    match value {
        Value::String(text) if text.len() > LIMIT => format!("\"{}...\"", clip(text, LIMIT)),
        Value::String(_) => value.to_string(),
        other => {
            let text = other.to_string();
            if text.len() > LIMIT {
                format!("{}...", clip(&text, LIMIT))
            } else {
                text
            }
        }
    }
}

fn clip(text: &str, limit: usize) -> &str {
    let mut cut = limit.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

/// Splits `"12.5ms"` into the number and the unit.
fn split_number(text: &str) -> Option<(&str, &str)> {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(end);
    let well_formed = !number.is_empty()
        && !number.starts_with('.')
        && !number.ends_with('.')
        && number.matches('.').count() <= 1;
    well_formed.then_some((number, unit))
}

impl TimeSpan {
    pub const fn from_duration(duration: Duration) -> Self {
        TimeSpan(duration)
    }

    pub const fn as_duration(self) -> Duration {
        self.0
    }

    pub fn parse(text: &str) -> Result<Self, UnitError> {
        let error = || UnitError::Duration {
            got: describe(&Value::String(text.to_owned())),
        };
        let (number, unit) = split_number(text).ok_or_else(error)?;
        let nanos_per_unit: f64 = match unit {
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(error()),
        };
        let value: f64 = number.parse().map_err(|_| error())?;
        let nanos = (value * nanos_per_unit).round();
        // Beyond about 292 years a u64 of nanoseconds overflows; no policy wants that.
        if !nanos.is_finite() || nanos >= u64::MAX as f64 {
            return Err(error());
        }
        Ok(TimeSpan(Duration::from_nanos(nanos as u64)))
    }
}

impl fmt::Display for TimeSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0.as_millis();
        if !self.0.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ns", self.0.as_nanos())
        } else if !millis.is_multiple_of(1000) {
            write!(f, "{millis}ms")
        } else {
            write!(f, "{}s", self.0.as_secs())
        }
    }
}

impl Rate {
    pub fn parse(text: &str) -> Result<Self, UnitError> {
        let error = || UnitError::Rate {
            got: describe(&Value::String(text.to_owned())),
        };
        let (count, unit) = text.split_once('/').ok_or_else(error)?;
        let per = match unit {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(error()),
        };
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(error());
        }
        let count: u64 = count.parse().map_err(|_| error())?;
        if count == 0 {
            return Err(error());
        }
        Ok(Rate { count, per })
    }

    /// One a second: a placeholder where a rate is never read (a global limit's).
    pub const ONE_PER_SECOND: Rate = Rate {
        count: 1,
        per: Duration::from_secs(1),
    };

    pub const fn count(self) -> u64 {
        self.count
    }

    pub const fn per(self) -> Duration {
        self.per
    }

    /// The time one unit of the rate takes: the emission interval of a token bucket or GCRA.
    pub fn interval(self) -> Duration {
        let nanos = self.per.as_nanos() / u128::from(self.count);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    pub fn per_second(self) -> f64 {
        self.count as f64 / self.per.as_secs_f64()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl Percent {
    pub const ZERO: Percent = Percent { ppm: 0 };
    pub const HUNDRED: Percent = Percent { ppm: 1_000_000 };

    pub fn from_value(value: &Value) -> Result<Self, UnitError> {
        let error = || UnitError::Percent {
            got: describe(value),
        };
        let number = value.as_f64().ok_or_else(error)?;
        if !(0.0..=100.0).contains(&number) {
            return Err(error());
        }
        Ok(Percent {
            ppm: (number * 10_000.0).round() as u32,
        })
    }

    /// From parts per million, capped at 100%.
    pub const fn from_ppm(ppm: u32) -> Self {
        Percent {
            ppm: if ppm > 1_000_000 { 1_000_000 } else { ppm },
        }
    }

    /// Parts per million: 100% is 1 000 000.
    pub const fn ppm(self) -> u32 {
        self.ppm
    }

    pub fn as_fraction(self) -> f64 {
        f64::from(self.ppm) / 1e6
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", f64::from(self.ppm) / 10_000.0)
    }
}

/// Reads a JSON string and hands it to `parse`; anything that is not a string gets the same
/// "expected ..., got ..." message as a malformed string.
fn from_json_string<'de, D, T>(
    deserializer: D,
    parse: fn(&str) -> Result<T, UnitError>,
    wrong_type: fn(String) -> UnitError,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    match Value::deserialize(deserializer)? {
        Value::String(text) => parse(&text).map_err(D::Error::custom),
        other => Err(D::Error::custom(wrong_type(describe(&other)))),
    }
}

impl<'de> Deserialize<'de> for TimeSpan {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_json_string(deserializer, TimeSpan::parse, |got| UnitError::Duration {
            got,
        })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_json_string(deserializer, Rate::parse, |got| UnitError::Rate { got })
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Percent::from_value(&value).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn durations_parse_in_every_unit() {
        let cases = [
            ("250ms", Duration::from_millis(250)),
            ("10s", Duration::from_secs(10)),
            ("1.5s", Duration::from_millis(1500)),
            ("1m", Duration::from_secs(60)),
            ("2h", Duration::from_secs(7200)),
            ("0s", Duration::ZERO),
        ];
        for (text, expected) in cases {
            assert_eq!(
                TimeSpan::parse(text).map(TimeSpan::as_duration),
                Ok(expected),
                "{text}"
            );
        }
    }

    #[test]
    fn bad_durations_say_what_was_expected_and_what_came() {
        for text in [
            "fast", "10", "s", "1.s", ".5s", "1..5s", "-1s", "10 s", "10sec", "", "1e3ms",
        ] {
            let error = TimeSpan::parse(text).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!(r#"expected a duration like "250ms", "10s", "1m" or "1h", got "{text}""#)
            );
        }
        assert!(
            TimeSpan::parse("99999999999999h").is_err(),
            "overflow is an error, not a wrap"
        );
    }

    #[test]
    fn rates_parse_and_give_their_interval() {
        let rate = Rate::parse("100/s").unwrap();
        assert_eq!((rate.count(), rate.per()), (100, Duration::from_secs(1)));
        assert_eq!(rate.interval(), Duration::from_millis(10));
        assert_eq!(
            Rate::parse("600/m").unwrap().interval(),
            Duration::from_millis(100)
        );
        assert_eq!(Rate::parse("1/h").unwrap().per_second(), 1.0 / 3600.0);
        assert_eq!(Rate::parse("3/s").unwrap().to_string(), "3/s");
    }

    #[test]
    fn bad_rates_name_the_format() {
        for text in ["fast", "/s", "0/s", "10/d", "10", "-1/s", "1.5/s", "10/ s"] {
            assert_eq!(
                Rate::parse(text).unwrap_err().to_string(),
                format!(r#"expected "<n>/s|m|h", got "{text}""#)
            );
        }
    }

    #[test]
    fn percentages_keep_a_millionth_of_precision() {
        let tiny = Percent::from_value(&serde_json::json!(0.0001)).unwrap();
        assert_eq!(tiny.ppm(), 1);
        assert_eq!(
            Percent::from_value(&serde_json::json!(100)).unwrap(),
            Percent::HUNDRED
        );
        assert_eq!(
            Percent::from_value(&serde_json::json!(0)).unwrap(),
            Percent::ZERO
        );
        for bad in [
            serde_json::json!(100.5),
            serde_json::json!(-1),
            serde_json::json!("5"),
        ] {
            let message = Percent::from_value(&bad).unwrap_err().to_string();
            assert_eq!(
                message,
                format!("expected a percentage from 0 to 100, got {bad}")
            );
        }
    }

    #[test]
    fn wrong_json_types_get_the_same_message() {
        let error = serde_json::from_value::<TimeSpan>(serde_json::json!(5)).unwrap_err();
        assert_eq!(
            error.to_string(),
            r#"expected a duration like "250ms", "10s", "1m" or "1h", got 5"#
        );
        let error = serde_json::from_value::<Rate>(serde_json::json!({"n": 1})).unwrap_err();
        assert_eq!(error.to_string(), r#"expected "<n>/s|m|h", got {"n":1}"#);
    }

    #[test]
    fn huge_values_are_clipped_in_messages() {
        let long = "x".repeat(10_000);
        let message = TimeSpan::parse(&long).unwrap_err().to_string();
        assert!(message.len() < 200, "{}", message.len());
        assert!(message.ends_with("...\""), "{message}");
    }

    proptest! {
        #[test]
        fn millisecond_durations_round_trip(ms in 0u64..10_000_000) {
            let span = TimeSpan::parse(&format!("{ms}ms")).unwrap();
            prop_assert_eq!(span.as_duration(), Duration::from_millis(ms));
            prop_assert_eq!(TimeSpan::parse(&span.to_string()).unwrap(), span);
        }

        #[test]
        fn any_string_parses_or_errors_without_panicking(text in ".{0,40}") {
            let _ = TimeSpan::parse(&text);
            let _ = Rate::parse(&text);
        }
    }
}
