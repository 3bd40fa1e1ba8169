//! The `rate_limits` section: raw model and compilation into [`RateLimitPolicy`].
//!
//! Validation that belongs to one policy lives here; the cross-references (routes naming
//! policies) stay with the compiler in `config/mod.rs`.

use serde::Deserialize;

use super::error::{child, ConfigError};
use super::reply::{RawReply, Reply};
use super::shared::{compile_key, default_true, KeyPart, RawKeyPart};
use super::units::Rate;
use crate::policy::rate_limit::{Buckets, FailureMode, Gcra, MissingKey, Mode};
use crate::request::AttributePlan;
use crate::state::slots::{hash_parts, SlotTable};

/// At most this many limits on one route: the refund bookkeeping is a fixed-size bit set.
pub const MAX_LIMITS_PER_ROUTE: usize = 8;
/// Every slot is a shared-data key that each worker's `on_configure` creates or checks, one host
/// call each, and that lives as long as Envoy. Measured on Envoy 1.40 with 2 workers (2 cores,
/// one start each): Envoy's heap grew by about 8 MB with 100,000 keys and 92 MB with 1,000,000,
/// and it was ready 1.9 s and 12.3 s after starting. So a policy may have at most 100,000.
const MAX_KEYS_LIMIT: u32 = 100_000;
const DEFAULT_MAX_KEYS: u32 = 10_000;

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub rate: Rate,
    pub burst: Option<u32>,
    #[serde(default)]
    pub key: Vec<RawKeyPart>,
    pub max_keys: Option<u32>,
    #[serde(default)]
    pub on_missing_key: RawMissingKey,
    #[serde(default)]
    pub mode: RawMode,
    #[serde(default)]
    pub failure_mode: RawFailureMode,
    #[serde(default = "default_true")]
    pub response_headers: bool,
    #[serde(default)]
    pub response_header_form: RateLimitHeaderForm,
    #[serde(default)]
    pub on_limit: RawReply<429>,
}

/// How a bucket's state is written on responses.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitHeaderForm {
    /// `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`: three header writes.
    #[default]
    Separate,
    /// One `RateLimit: limit=…, remaining=…, reset=…` (the IETF draft's later form): one write.
    Combined,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawMissingKey {
    #[default]
    Shared,
    Skip,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawMode {
    #[default]
    Enforce,
    Shadow,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawFailureMode {
    #[default]
    Open,
    Closed,
}

/// A compiled rate-limit policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitPolicy {
    pub name: String,
    pub rate: Rate,
    pub gcra: Gcra,
    pub key: Vec<KeyPart>,
    pub buckets: Buckets,
    pub mode: Mode,
    pub failure_mode: FailureMode,
    /// `None`: no `RateLimit` headers.
    pub response_headers: Option<RateLimitHeaderForm>,
    pub on_limit: Reply,
}

/// Compiles one policy; `prefix` is the shared-data key prefix for this plugin.
pub fn compile(
    path: &str,
    plugin: &str,
    name: &str,
    raw: RawRateLimit,
    attributes: &mut AttributePlan,
) -> Result<RateLimitPolicy, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let burst = raw
        .burst
        .unwrap_or_else(|| u32::try_from(raw.rate.count()).unwrap_or(u32::MAX));
    if burst == 0 {
        errors.push(ConfigError::invalid(
            child(path, "burst"),
            "expected a burst of at least 1, got 0",
        ));
    }
    let key = compile_key(&child(path, "key"), &raw.key, attributes, &mut errors);
    if raw.max_keys.is_some() && raw.key.is_empty() {
        errors.push(ConfigError::invalid(
            child(path, "max_keys"),
            "expected \"key\" too: without a key the limit has a single bucket",
        ));
    }
    let max_keys = raw.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
    if !(1..=MAX_KEYS_LIMIT).contains(&max_keys) {
        errors.push(ConfigError::invalid(
            child(path, "max_keys"),
            format!("expected a number of keys from 1 to {MAX_KEYS_LIMIT}, got {max_keys}"),
        ));
    }
    let on_limit = raw.on_limit.compile(&child(path, "on_limit"), &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }

    let prefix = format!("sw:{plugin}:rl:{name}:");
    let buckets = if key.is_empty() {
        Buckets::Single {
            key: format!("{prefix}all"),
        }
    } else {
        let slots = SlotTable::new(prefix.clone(), max_keys)
            .map_err(|error| vec![ConfigError::invalid(path, error.to_string())])?;
        Buckets::Keyed {
            slots,
            // Stable across workers and reloads, so a client keeps its bucket.
            seed: hash_parts(0, &[plugin.as_bytes(), name.as_bytes()]),
            missing: match raw.on_missing_key {
                RawMissingKey::Skip => MissingKey::Skip,
                RawMissingKey::Shared => MissingKey::Shared {
                    key: format!("{prefix}missing"),
                },
            },
        }
    };
    Ok(RateLimitPolicy {
        name: name.to_owned(),
        rate: raw.rate,
        gcra: Gcra::new(raw.rate.interval(), burst),
        key,
        buckets,
        mode: match raw.mode {
            RawMode::Enforce => Mode::Enforce,
            RawMode::Shadow => Mode::Shadow,
        },
        failure_mode: match raw.failure_mode {
            RawFailureMode::Open => FailureMode::Open,
            RawFailureMode::Closed => FailureMode::Closed,
        },
        response_headers: raw.response_headers.then_some(raw.response_header_form),
        on_limit,
    })
}
