//! The `retries` section: raw model and compilation into [`RetryPolicy`].
//!
//! The condition names are Envoy's own (`x-envoy-retry-on` and `x-envoy-retry-grpc-on`), checked
//! here so a typo is a config error rather than a header the router silently ignores. Defaults
//! follow Linkerd's budget: 20% of requests plus 10 retries a second, over 10 seconds.

use serde::Deserialize;

use super::error::{child, index, ConfigError};
use super::shared::{default_true, is_header_name};
use super::units::{Percent, TimeSpan};
use crate::policy::retry::{Budget, WINDOW_BUCKETS};
use crate::request::{Attribute, AttributeId, AttributePlan};

/// Envoy's `x-envoy-retry-on` conditions seawall accepts.
pub(crate) const HTTP_CONDITIONS: [&str; 8] = [
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "envoy-ratelimited",
];

/// Envoy's `x-envoy-retry-grpc-on` conditions.
pub(crate) const GRPC_CONDITIONS: [&str; 5] = [
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// Retry headers a client could send to change the router's retries; seawall sets or removes
/// every one of them on routes with a retry policy.
pub const CLIENT_RETRY_HEADERS: [&str; 7] = [
    "x-envoy-max-retries",
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-hedge-on-per-try-timeout",
];

const MAX_RETRIES_LIMIT: u32 = 10;

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    #[cfg_attr(
        feature = "schema",
        schemars(with = "Option<Vec<super::schema::RetryCondition>>")
    )]
    pub retry_on: Option<Vec<String>>,
    pub per_try_timeout: Option<TimeSpan>,
    #[serde(default)]
    pub retry_policy_from: RawRetryPolicyFrom,
    #[serde(default)]
    pub budget: RawBudget,
    #[serde(default = "default_methods")]
    #[cfg_attr(feature = "schema", schemars(with = "Vec<super::schema::RetryMethod>"))]
    pub methods: Vec<String>,
    #[cfg_attr(
        feature = "schema",
        schemars(with = "Option<super::schema::HeaderName>")
    )]
    pub idempotency_header: Option<String>,
    #[serde(default)]
    pub mode: RawRetryMode,
}

fn default_max_retries() -> u32 {
    2
}

fn default_retry_on() -> Vec<String> {
    ["5xx", "reset", "connect-failure"]
        .map(str::to_owned)
        .to_vec()
}

fn default_methods() -> Vec<String> {
    ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"]
        .map(str::to_owned)
        .to_vec()
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_ratio")]
    pub ratio: Percent,
    #[serde(default = "default_min_per_second")]
    pub min_per_second: u32,
    #[serde(default = "default_window")]
    pub window: TimeSpan,
}

impl Default for RawBudget {
    fn default() -> Self {
        RawBudget {
            enabled: true,
            ratio: default_ratio(),
            min_per_second: default_min_per_second(),
            window: default_window(),
        }
    }
}

fn default_ratio() -> Percent {
    Percent::from_ppm(200_000)
}

fn default_min_per_second() -> u32 {
    10
}

fn default_window() -> TimeSpan {
    TimeSpan::from_duration(core::time::Duration::from_secs(10))
}

/// Who tells Envoy's router what to retry.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawRetryPolicyFrom {
    /// Seawall, with request headers on every request it grants retries to.
    #[default]
    Seawall,
    /// The Envoy route's own `retry_policy`; seawall only lowers `x-envoy-max-retries`.
    EnvoyRoute,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawRetryMode {
    #[default]
    Enforce,
    Shadow,
}

/// How a retry policy acts on its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryMode {
    Enforce,
    /// Grants `max_retries` whatever the budget says, and counts what it would have denied.
    Shadow,
}

/// A compiled retry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub name: String,
    pub max_retries: u32,
    /// `x-envoy-retry-on`, joined, when HTTP conditions were given.
    pub retry_on: Option<String>,
    /// `x-envoy-retry-grpc-on`, joined, when gRPC conditions were given.
    pub grpc_retry_on: Option<String>,
    pub per_try_timeout_ms: Option<u64>,
    /// The Envoy route carries the retry policy (`retry_on`, `num_retries` = `max_retries`, its
    /// per-try timeout): seawall writes `x-envoy-max-retries` only to grant fewer, so a request
    /// granted in full costs no header write (and no route-cache clear).
    pub from_route: bool,
    /// `None` when the budget is off: every retryable request gets `max_retries`.
    pub budget: Option<Budget>,
    /// The budget's record in shared data.
    pub key: String,
    pub methods: Vec<Vec<u8>>,
    pub method: AttributeId,
    pub idempotency_header: Option<AttributeId>,
    /// The client retry headers, read to see which ones to remove.
    pub client_headers: [AttributeId; CLIENT_RETRY_HEADERS.len()],
    pub mode: RetryMode,
}

pub fn compile(
    path: &str,
    plugin: &str,
    name: &str,
    raw: RawRetry,
    attributes: &mut AttributePlan,
) -> Result<RetryPolicy, Vec<ConfigError>> {
    let mut errors = Vec::new();
    if raw.max_retries > MAX_RETRIES_LIMIT {
        errors.push(ConfigError::invalid(
            child(path, "max_retries"),
            format!(
                "expected at most {MAX_RETRIES_LIMIT} retries, got {}",
                raw.max_retries
            ),
        ));
    }
    let from_route = raw.retry_policy_from == RawRetryPolicyFrom::EnvoyRoute;
    if from_route {
        for (field, given) in [
            ("retry_on", raw.retry_on.is_some()),
            ("per_try_timeout", raw.per_try_timeout.is_some()),
        ] {
            if given {
                errors.push(ConfigError::invalid(
                    child(path, field),
                    format!(
                        "expected no \"{field}\" with \"retry_policy_from\": \"envoy_route\": set it in the Envoy route's retry_policy"
                    ),
                ));
            }
        }
    }
    let retry_on = match (&raw.retry_on, from_route) {
        (Some(conditions), _) => conditions.clone(),
        (None, false) => default_retry_on(),
        (None, true) => Vec::new(),
    };
    let (mut http, mut grpc) = (Vec::new(), Vec::new());
    for (position, condition) in retry_on.iter().enumerate() {
        if HTTP_CONDITIONS.contains(&condition.as_str()) {
            http.push(condition.as_str());
        } else if GRPC_CONDITIONS.contains(&condition.as_str()) {
            grpc.push(condition.as_str());
        } else {
            errors.push(ConfigError::invalid(
                index(&child(path, "retry_on"), position),
                format!(
                    "expected one of {} or the gRPC {}, got {condition:?}",
                    HTTP_CONDITIONS.join(", "),
                    GRPC_CONDITIONS.join(", ")
                ),
            ));
        }
    }
    if retry_on.is_empty() && !from_route {
        errors.push(ConfigError::invalid(
            child(path, "retry_on"),
            "expected at least one condition",
        ));
    }
    let per_try_timeout_ms = raw.per_try_timeout.map(|span| {
        let ms = span.as_duration().as_millis();
        if ms == 0 {
            errors.push(ConfigError::invalid(
                child(path, "per_try_timeout"),
                "expected at least 1ms",
            ));
        }
        u64::try_from(ms).unwrap_or(u64::MAX)
    });
    let budget_path = child(path, "budget");
    let window = raw.budget.window.as_duration();
    if window.as_millis() < 100 {
        errors.push(ConfigError::invalid(
            child(&budget_path, "window"),
            format!(
                "expected a window of at least 100ms, got {}",
                raw.budget.window
            ),
        ));
    }
    let floor =
        u64::from(raw.budget.min_per_second).saturating_mul(window.as_millis() as u64) / 1000;
    let mut methods = Vec::with_capacity(raw.methods.len());
    for (position, method) in raw.methods.iter().enumerate() {
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
            errors.push(ConfigError::invalid(
                index(&child(path, "methods"), position),
                format!("expected an uppercase HTTP method like \"GET\", got {method:?}"),
            ));
        }
        methods.push(method.as_bytes().to_vec());
    }
    let mut intern = |at: &str, attribute: Attribute, errors: &mut Vec<ConfigError>| {
        attributes.intern(attribute).map_err(|error| {
            errors.push(ConfigError::invalid(at, error.to_string()));
        })
    };
    let idempotency_header = match &raw.idempotency_header {
        Some(header) if !is_header_name(header) => {
            errors.push(ConfigError::invalid(
                child(path, "idempotency_header"),
                format!("expected an HTTP header name, got {header:?}"),
            ));
            None
        }
        Some(header) => intern(path, Attribute::header(header), &mut errors).ok(),
        None => None,
    };
    let method = intern(path, Attribute::method(), &mut errors);
    let mut client_headers = Vec::with_capacity(CLIENT_RETRY_HEADERS.len());
    for header in CLIENT_RETRY_HEADERS {
        if let Ok(id) = intern(path, Attribute::header(header), &mut errors) {
            client_headers.push(id);
        }
    }
    let (Ok(method), Ok(client_headers), true) = (
        method,
        <[AttributeId; CLIENT_RETRY_HEADERS.len()]>::try_from(client_headers),
        errors.is_empty(),
    ) else {
        return Err(errors);
    };
    Ok(RetryPolicy {
        name: name.to_owned(),
        max_retries: raw.max_retries,
        retry_on: (!http.is_empty()).then(|| http.join(",")),
        grpc_retry_on: (!grpc.is_empty()).then(|| grpc.join(",")),
        per_try_timeout_ms,
        from_route,
        budget: raw.budget.enabled.then(|| Budget {
            ratio_ppm: raw.budget.ratio.ppm(),
            floor: u32::try_from(floor).unwrap_or(u32::MAX),
            bucket_nanos: u64::try_from(window.as_nanos() / WINDOW_BUCKETS as u128)
                .unwrap_or(u64::MAX),
        }),
        key: format!("sw:{plugin}:retry:{name}"),
        methods,
        method,
        idempotency_header,
        client_headers,
        mode: match raw.mode {
            RawRetryMode::Enforce => RetryMode::Enforce,
            RawRetryMode::Shadow => RetryMode::Shadow,
        },
    })
}
