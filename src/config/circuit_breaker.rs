//! The `circuit_breakers` section: raw model and compilation into [`CircuitBreakerPolicy`].
//!
//! Defaults follow what operators know from resilience4j and Envoy: 5xx, resets, timeouts and
//! connect failures are failures; a breaker is keyed by the upstream cluster; it opens for 5 s,
//! doubling on repeated trips up to 60 s, and closes after one good probe.

use serde::Deserialize;

use super::error::{child, index, ConfigError};
use super::reply::{RawReply, Reply};
use super::shared::{default_true, is_header_name, status_set, RawGrpcCode, RawStatus};
use super::units::{Percent, TimeSpan};
use crate::policy::circuit_breaker::{flags, Breaker, Classifier, TripRules, WINDOW_BUCKETS};
use crate::request::{Attribute, AttributeId, AttributePlan};
use crate::state::slots::{hash_parts, SlotTable};

const DEFAULT_MAX_KEYS: u32 = 100;
const MAX_KEYS_LIMIT: u32 = 100_000;
const MAX_PROBES: u16 = 1_000;
/// The shortest window: its buckets must be at least a millisecond.
const MIN_WINDOW_MS: u128 = 10;

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCircuitBreaker {
    #[serde(default)]
    pub key: RawBreakerKey,
    pub max_keys: Option<u32>,
    #[serde(default)]
    pub failure: RawFailure,
    pub open_when: RawOpenWhen,
    #[serde(default = "default_open_for")]
    pub open_for: TimeSpan,
    pub max_open_for: Option<TimeSpan>,
    #[serde(default = "default_probes")]
    pub half_open_probes: u16,
    #[serde(default)]
    pub mode: RawBreakerMode,
    #[serde(default)]
    pub on_open: RawReply<503>,
}

fn default_open_for() -> TimeSpan {
    TimeSpan::from_duration(core::time::Duration::from_secs(5))
}

fn default_probes() -> u16 {
    1
}

/// `"cluster"`, `"route"` or `{"header": "<name>"}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RawBreakerKey {
    #[default]
    Cluster,
    Route,
    Header(String),
}

const KEY_EXPECTED: &str = r#"expected "cluster", "route" or {"header": "<name>"}"#;

impl<'de> Deserialize<'de> for RawBreakerKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        match &value {
            serde_json::Value::String(name) if name == "cluster" => Some(RawBreakerKey::Cluster),
            serde_json::Value::String(name) if name == "route" => Some(RawBreakerKey::Route),
            serde_json::Value::Object(fields) if fields.len() == 1 => match fields.get("header") {
                Some(serde_json::Value::String(header)) => {
                    Some(RawBreakerKey::Header(header.clone()))
                }
                _ => None,
            },
            _ => None,
        }
        .ok_or_else(|| D::Error::custom(format!("{KEY_EXPECTED}, got {value}")))
    }
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFailure {
    #[serde(default = "default_statuses")]
    pub statuses: Vec<RawStatus>,
    #[serde(default = "default_true")]
    pub resets: bool,
    #[serde(default = "default_true")]
    pub timeouts: bool,
    #[serde(default = "default_true")]
    pub connect_failures: bool,
    #[serde(default = "default_grpc")]
    pub grpc_statuses: Vec<RawGrpcCode>,
    pub slow_call: Option<TimeSpan>,
}

impl Default for RawFailure {
    fn default() -> Self {
        RawFailure {
            statuses: default_statuses(),
            resets: true,
            timeouts: true,
            connect_failures: true,
            grpc_statuses: default_grpc(),
            slow_call: None,
        }
    }
}

fn default_statuses() -> Vec<RawStatus> {
    vec![RawStatus::Class(5)]
}

fn default_grpc() -> Vec<RawGrpcCode> {
    // DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS: the server's failures, not the caller's.
    [4, 13, 14, 15].into_iter().map(RawGrpcCode).collect()
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOpenWhen {
    pub consecutive_failures: Option<u32>,
    pub failure_rate: Option<Percent>,
    pub slow_call_rate: Option<Percent>,
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    #[serde(default = "default_window")]
    pub window: TimeSpan,
}

fn default_min_requests() -> u32 {
    20
}

fn default_window() -> TimeSpan {
    TimeSpan::from_duration(core::time::Duration::from_secs(10))
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawBreakerMode {
    #[default]
    Enforce,
    Shadow,
    ForcedOpen,
    Disabled,
}

/// What a breaker keeps separate state for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakerKey {
    /// The upstream cluster Envoy routed the request to; records in a slot table.
    Cluster(AttributeId),
    /// A request header's value; records in a slot table. A missing header is a key of its own.
    Header(AttributeId),
    /// The seawall route: each route naming the breaker has its own record.
    Route,
}

/// How a breaker acts on its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerMode {
    Enforce,
    /// Runs the state machine and counts would-be rejections, but rejects nothing.
    Shadow,
    /// Rejects every request without looking at any state: an operator's manual trip.
    ForcedOpen,
    /// Does nothing at all.
    Disabled,
}

/// A compiled circuit-breaker policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitBreakerPolicy {
    pub name: String,
    pub breaker: Breaker,
    pub classifier: Classifier,
    pub key: BreakerKey,
    /// The table of records for keyed breakers (cluster or header).
    pub table: Option<SlotTable>,
    /// Seeds key fingerprints, so they are stable across workers and reloads.
    pub seed: u64,
    /// Prefix of the per-route records' keys.
    pub route_prefix: String,
    pub mode: BreakerMode,
    pub on_open: Reply,
}

impl CircuitBreakerPolicy {
    /// The shared-data key of this breaker's record for `route`, when keyed by route.
    pub fn route_record(&self, route: &str) -> Option<String> {
        (self.key == BreakerKey::Route).then(|| format!("{}{route}", self.route_prefix))
    }
}

pub fn compile(
    path: &str,
    plugin: &str,
    name: &str,
    raw: RawCircuitBreaker,
    attributes: &mut AttributePlan,
) -> Result<CircuitBreakerPolicy, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let open_when_path = child(path, "open_when");
    let rules = &raw.open_when;
    if rules.consecutive_failures.is_none()
        && rules.failure_rate.is_none()
        && rules.slow_call_rate.is_none()
    {
        errors.push(ConfigError::invalid(
            &open_when_path,
            "expected at least one of \"consecutive_failures\", \"failure_rate\" or \"slow_call_rate\"",
        ));
    }
    if rules.consecutive_failures == Some(0) {
        errors.push(ConfigError::invalid(
            child(&open_when_path, "consecutive_failures"),
            "expected at least 1, got 0",
        ));
    }
    for (field, rate) in [
        ("failure_rate", rules.failure_rate),
        ("slow_call_rate", rules.slow_call_rate),
    ] {
        if rate == Some(Percent::ZERO) {
            errors.push(ConfigError::invalid(
                child(&open_when_path, field),
                "expected a percentage above 0 (0 would open on the first request), got 0",
            ));
        }
    }
    if rules.slow_call_rate.is_some() && raw.failure.slow_call.is_none() {
        errors.push(ConfigError::invalid(
            child(&open_when_path, "slow_call_rate"),
            "expected \"failure.slow_call\" too: it says which calls are slow",
        ));
    }
    if rules.min_requests == 0 {
        errors.push(ConfigError::invalid(
            child(&open_when_path, "min_requests"),
            "expected at least 1, got 0",
        ));
    }
    let window = rules.window.as_duration();
    if window.as_millis() < MIN_WINDOW_MS {
        errors.push(ConfigError::invalid(
            child(&open_when_path, "window"),
            format!(
                "expected a window of at least {MIN_WINDOW_MS}ms, got {}",
                rules.window
            ),
        ));
    }
    let open_for = raw.open_for.as_duration();
    if open_for.is_zero() {
        errors.push(ConfigError::invalid(
            child(path, "open_for"),
            "expected a duration above 0, got 0s",
        ));
    }
    let max_open_for = raw
        .max_open_for
        .map(TimeSpan::as_duration)
        .unwrap_or_else(|| open_for.max(core::time::Duration::from_secs(60)));
    if max_open_for < open_for {
        errors.push(ConfigError::invalid(
            child(path, "max_open_for"),
            format!(
                "expected at least \"open_for\" ({}), got {}",
                raw.open_for,
                TimeSpan::from_duration(max_open_for)
            ),
        ));
    }
    if !(1..=MAX_PROBES).contains(&raw.half_open_probes) {
        errors.push(ConfigError::invalid(
            child(path, "half_open_probes"),
            format!(
                "expected from 1 to {MAX_PROBES} probes, got {}",
                raw.half_open_probes
            ),
        ));
    }
    if let Some(slow) = raw.failure.slow_call {
        if slow.as_duration().is_zero() {
            errors.push(ConfigError::invalid(
                child(&child(path, "failure"), "slow_call"),
                "expected a duration above 0, got 0s",
            ));
        }
    }

    let key = match &raw.key {
        RawBreakerKey::Cluster => attributes
            .intern(Attribute::cluster_name())
            .map(BreakerKey::Cluster)
            .map_err(|e| ConfigError::invalid(child(path, "key"), e.to_string())),
        RawBreakerKey::Route => Ok(BreakerKey::Route),
        RawBreakerKey::Header(header) if !is_header_name(header) => Err(ConfigError::invalid(
            child(&child(path, "key"), "header"),
            format!("expected an HTTP header name, got {header:?}"),
        )),
        RawBreakerKey::Header(header) => attributes
            .intern(Attribute::header(header))
            .map(BreakerKey::Header)
            .map_err(|e| ConfigError::invalid(child(path, "key"), e.to_string())),
    };
    let key = match key {
        Ok(key) => Some(key),
        Err(error) => {
            errors.push(error);
            None
        }
    };
    if raw.max_keys.is_some() && raw.key == RawBreakerKey::Route {
        errors.push(ConfigError::invalid(
            child(path, "max_keys"),
            "expected no \"max_keys\" with \"key\": \"route\": each route has its own record",
        ));
    }
    let max_keys = raw.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
    if !(1..=MAX_KEYS_LIMIT).contains(&max_keys) {
        errors.push(ConfigError::invalid(
            child(path, "max_keys"),
            format!("expected a number of keys from 1 to {MAX_KEYS_LIMIT}, got {max_keys}"),
        ));
    }
    let on_open = raw.on_open.compile(&child(path, "on_open"), &mut errors);
    let statuses = status_set(&raw.failure.statuses);
    let mut failure_flags = 0;
    for (on, mask) in [
        (raw.failure.resets, flags::RESETS),
        (raw.failure.timeouts, flags::TIMEOUTS),
        (raw.failure.connect_failures, flags::CONNECT_FAILURES),
    ] {
        if on {
            failure_flags |= mask;
        }
    }
    let grpc_codes = raw
        .failure
        .grpc_statuses
        .iter()
        .fold(0u32, |codes, code| codes | (1 << code.0));
    if let Some(position) = raw.failure.grpc_statuses.iter().position(|c| c.0 == 0) {
        errors.push(ConfigError::invalid(
            index(&child(&child(path, "failure"), "grpc_statuses"), position),
            "expected a failing gRPC status, got OK (0)",
        ));
    }

    let (Some(key), true) = (key, errors.is_empty()) else {
        return Err(errors);
    };
    let prefix = format!("sw:{plugin}:cb:{name}:");
    let table = match key {
        BreakerKey::Route => None,
        BreakerKey::Cluster(_) | BreakerKey::Header(_) => Some(
            SlotTable::new(prefix.clone(), max_keys)
                .map_err(|error| vec![ConfigError::invalid(path, error.to_string())])?,
        ),
    };
    let bucket_nanos =
        u64::try_from(window.as_nanos() / WINDOW_BUCKETS as u128).unwrap_or(u64::MAX);
    Ok(CircuitBreakerPolicy {
        name: name.to_owned(),
        breaker: Breaker {
            rules: TripRules {
                consecutive_failures: rules.consecutive_failures,
                failure_rate_ppm: rules.failure_rate.map(Percent::ppm),
                slow_call_rate_ppm: rules.slow_call_rate.map(Percent::ppm),
                min_requests: rules.min_requests,
                bucket_nanos,
            },
            open_for,
            max_open_for,
            half_open_probes: raw.half_open_probes,
        },
        classifier: Classifier {
            statuses,
            flags: failure_flags,
            grpc_codes,
            slow_call: raw.failure.slow_call.map(TimeSpan::as_duration),
        },
        key,
        table,
        seed: hash_parts(0, &[b"cb", plugin.as_bytes(), name.as_bytes()]),
        route_prefix: format!("{prefix}route:"),
        mode: match raw.mode {
            RawBreakerMode::Enforce => BreakerMode::Enforce,
            RawBreakerMode::Shadow => BreakerMode::Shadow,
            RawBreakerMode::ForcedOpen => BreakerMode::ForcedOpen,
            RawBreakerMode::Disabled => BreakerMode::Disabled,
        },
        on_open,
    })
}
