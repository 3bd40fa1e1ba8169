//! Config errors that point at the exact place in the operator's JSON.
//!
//! Envoy shows a refused plugin config only as a log line, so that line has to carry everything:
//! the JSON path (`routes[2].match.path`), what was expected, and what was found. Errors from
//! independent parts of the config are collected and reported together, so one round trip fixes
//! them all.

use core::fmt;

/// One problem in the plugin config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where in the JSON, e.g. `rate_limits.per-user.rate`; empty for the document as a whole.
    pub path: String,
    pub problem: Problem,
}

/// What is wrong at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The document is not JSON at all.
    Syntax { message: String },
    /// The value has the wrong shape, type or range; the message says what was expected.
    Invalid { message: String },
    /// A route names a policy that is not defined.
    UnknownPolicy { kind: &'static str, name: String },
    /// A name that must be unique appears twice.
    Duplicate { name: String },
}

impl ConfigError {
    pub fn new(path: impl Into<String>, problem: Problem) -> Self {
        ConfigError {
            path: path.into(),
            problem,
        }
    }

    pub fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::new(
            path,
            Problem::Invalid {
                message: message.into(),
            },
        )
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Syntax { message } => write!(f, "not valid JSON: {message}"),
            Problem::Invalid { message } => f.write_str(message),
            Problem::UnknownPolicy { kind, name } => {
                write!(f, "expected the name of a defined {kind}, got \"{name}\"")
            }
            Problem::Duplicate { name } => write!(f, "\"{name}\" is defined twice"),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.problem)
        } else {
            write!(f, "{}: {}", self.path, self.problem)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in one config, in document order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn iter(&self) -> impl Iterator<Item = &ConfigError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [only] => write!(f, "{only}"),
            // One line, because Envoy's log (and whatever ships it) is line-oriented.
            all => {
                write!(f, "{} problems: ", all.len())?;
                for (position, error) in all.iter().enumerate() {
                    let separator = if position == 0 { "" } else { "; " };
                    write!(f, "{separator}{error}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigErrors {}

/// Joins JSON path segments the way operators read them: `a.b[3].c`.
pub(crate) fn child(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

pub(crate) fn index(parent: &str, position: usize) -> String {
    format!("{parent}[{position}]")
}

/// Deserializes one part of the config and turns a serde failure into a path-named error.
pub(crate) fn deserialize_at<T: serde::de::DeserializeOwned>(
    path: &str,
    value: serde_json::Value,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let inner = error.path().to_string();
        // serde_path_to_error says "." for the root of the value it was given.
        let full = if inner == "." {
            path.to_owned()
        } else if inner.starts_with('[') {
            format!("{path}{inner}")
        } else {
            child(path, &inner)
        };
        ConfigError::invalid(full, tidy_serde_message(&error.into_inner().to_string()))
    })
}

/// serde_json appends " at line 1 column 42" to messages; the line numbers refer to a value we
/// re-serialized, not to the operator's text, so they only mislead.
fn tidy_serde_message(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(cut) => message[..cut].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn one_error_reads_as_path_then_problem() {
        let error = ConfigError::invalid(
            "rate_limits.per-user.rate",
            r#"expected "<n>/s|m|h", got "fast""#,
        );
        assert_eq!(
            error.to_string(),
            r#"rate_limits.per-user.rate: expected "<n>/s|m|h", got "fast""#
        );
    }

    #[test]
    fn several_errors_are_listed_together() {
        let errors = ConfigErrors(vec![
            ConfigError::new(
                "routes[0].rate_limits[0]",
                Problem::UnknownPolicy {
                    kind: "rate limit",
                    name: "nope".into(),
                },
            ),
            ConfigError::new("routes", Problem::Duplicate { name: "a".into() }),
        ]);
        assert_eq!(
            errors.to_string(),
            "2 problems: routes[0].rate_limits[0]: expected the name of a defined rate limit, got \"nope\"; routes: \"a\" is defined twice"
        );
    }

    #[test]
    fn paths_join_keys_and_indices() {
        assert_eq!(child("", "routes"), "routes");
        assert_eq!(index("routes", 2), "routes[2]");
        assert_eq!(child(&index("routes", 2), "match"), "routes[2].match");
    }
}
