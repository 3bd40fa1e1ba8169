//! The `rate_limits` section: raw model and compilation into [`RateLimitPolicy`].
//!
//! Validation that belongs to one policy lives here; the cross-references (routes naming
//! policies) stay with the compiler in `config/mod.rs`.

use core::time::Duration;

use serde::Deserialize;

use super::error::{child, ConfigError};
use super::reply::{RawReply, Reply};
use super::shared::{compile_key, KeyPart, RawKeyPart};
use super::units::{Rate, TimeSpan};
use crate::policy::global_limit::{Entry, GlobalFailure, GlobalLimit, LeaseSizing, PerClient};
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
    /// Required for a local limit; a global limit's rate is the RLS's.
    pub rate: Option<Rate>,
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
    /// `None`: on for a local limit, off (and not available) for a global one.
    pub response_headers: Option<bool>,
    #[serde(default)]
    pub response_header_form: RateLimitHeaderForm,
    #[serde(default)]
    pub on_limit: RawReply<429>,
    #[serde(default)]
    pub source: RawSource,
}

/// Where a limit's tokens come from.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RawSource {
    /// A GCRA bucket that refills at `rate`, shared by this Envoy's workers.
    #[default]
    Local,
    /// Leases from Envoy's rate limit service, shared by every Envoy that asks it.
    Global(RawGlobal),
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGlobal {
    /// The RLS `domain` (Limitador's namespace).
    pub domain: String,
    /// The Envoy cluster of the RLS (HTTP/2, as any gRPC cluster).
    pub cluster: String,
    /// One call's deadline.
    pub timeout: Option<TimeSpan>,
    /// The descriptor's entries, in order; default `[{"key": "generic_key", "value": <policy>}]`.
    pub descriptor: Option<Vec<RawEntry>>,
    #[serde(default)]
    pub failure_mode: RawGlobalFailure,
    #[serde(default)]
    pub lease: RawLease,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEntry {
    pub key: String,
    /// The same value on every request; or
    pub value: Option<String>,
    /// the request's value of this key part: a bucket per client.
    pub from: Option<RawKeyPart>,
}

/// What an empty bucket does while the RLS fails.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RawGlobalFailure {
    #[default]
    Open,
    Closed,
    Fallback(RawFallback),
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFallback {
    pub rate: Rate,
    pub burst: Option<u32>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLease {
    pub min_hits: Option<u32>,
    pub max_hits: Option<u32>,
    pub lookahead: Option<TimeSpan>,
}

const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
const MAX_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_MIN_HITS: u32 = 1;
const DEFAULT_MAX_HITS: u32 = 1_000;
/// A lease is no bigger than this: what one Envoy can hold unspent.
const MAX_HITS_LIMIT: u32 = 1_000_000;
const DEFAULT_LOOKAHEAD: Duration = Duration::from_millis(500);
const MAX_DESCRIPTOR_ENTRIES: usize = 8;

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
    /// `Some`: the tokens come from the RLS in leases (`source.global`); `rate`, `gcra` and
    /// `buckets` are then never read (the stages branch on this first).
    pub global: Option<GlobalLimit>,
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
    let prefix = format!("sw:{plugin}:rl:{name}:");
    let mut key = Vec::new();
    let global = match &raw.source {
        RawSource::Local => None,
        RawSource::Global(global) => compile_global(
            &child(path, "source.global"),
            (plugin, name),
            &prefix,
            global,
            &raw,
            (attributes, &mut key),
            &mut errors,
        ),
    };
    let rate = match (raw.rate, &raw.source) {
        (Some(rate), _) => rate,
        (None, RawSource::Local) => {
            errors.push(ConfigError::invalid(
                child(path, "rate"),
                "expected a rate, \"<n>/s|m|h\" (or a \"source\" of \"global\")",
            ));
            return Err(errors);
        }
        // Never read for a global limit: its admissions come from the RLS's leases.
        (None, RawSource::Global(_)) => Rate::ONE_PER_SECOND,
    };
    let burst = raw
        .burst
        .unwrap_or_else(|| u32::try_from(rate.count()).unwrap_or(u32::MAX));
    if burst == 0 {
        errors.push(ConfigError::invalid(
            child(path, "burst"),
            "expected a burst of at least 1, got 0",
        ));
    }
    if global.is_none() {
        key = compile_key(&child(path, "key"), &raw.key, attributes, &mut errors);
    }
    if raw.max_keys.is_some() && raw.key.is_empty() && key.is_empty() {
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

    let buckets = if key.is_empty() || global.is_some() {
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
        rate,
        gcra: Gcra::new(rate.interval(), burst),
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
        response_headers: match raw.response_headers {
            Some(false) => None,
            Some(true) => Some(raw.response_header_form),
            None => global.is_none().then_some(raw.response_header_form),
        },
        on_limit,
        global,
    })
}

/// Compiles `source.global`, and refuses the local-limit fields that would mean nothing with it.
fn compile_global(
    path: &str,
    (plugin, name): (&str, &str),
    prefix: &str,
    raw: &RawGlobal,
    limit: &RawRateLimit,
    (attributes, key): (&mut AttributePlan, &mut Vec<KeyPart>),
    errors: &mut Vec<ConfigError>,
) -> Option<GlobalLimit> {
    let before = errors.len();
    let policy = path.trim_end_matches(".source.global");
    let not_with_global = |field: &str, why: &str| {
        ConfigError::invalid(
            child(policy, field),
            format!("not available with a global source: {why}"),
        )
    };
    if limit.rate.is_some() {
        errors.push(not_with_global(
            "rate",
            "the RLS's limit is the rate; set it in the RLS config",
        ));
    }
    if limit.burst.is_some() {
        errors.push(not_with_global(
            "burst",
            "the RLS's limit is the burst; set it in the RLS config",
        ));
    }
    if !limit.key.is_empty() {
        errors.push(not_with_global(
            "key",
            "a global limit's buckets are keyed by its descriptor's \"from\" entries",
        ));
    }
    if limit.response_headers == Some(true) {
        errors.push(not_with_global(
            "response_headers",
            "the limit and what is left of it are the RLS's, not this Envoy's",
        ));
    }
    if raw.domain.is_empty() {
        errors.push(ConfigError::invalid(
            child(path, "domain"),
            "expected a domain, got \"\"",
        ));
    }
    if raw.cluster.is_empty() {
        errors.push(ConfigError::invalid(
            child(path, "cluster"),
            "expected the RLS's Envoy cluster, got \"\"",
        ));
    }
    let timeout = raw.timeout.map_or(DEFAULT_TIMEOUT, TimeSpan::as_duration);
    if timeout.is_zero() || timeout > MAX_TIMEOUT {
        errors.push(ConfigError::invalid(
            child(path, "timeout"),
            format!(
                "expected a timeout from 1ms to {}s, got {timeout:?}",
                MAX_TIMEOUT.as_secs()
            ),
        ));
    }
    let descriptor_path = child(path, "descriptor");
    let default_entry = [RawEntry {
        key: "generic_key".to_owned(),
        value: Some(name.to_owned()),
        from: None,
    }];
    let entries = raw.descriptor.as_deref().unwrap_or(&default_entry);
    if entries.is_empty() || entries.len() > MAX_DESCRIPTOR_ENTRIES {
        errors.push(ConfigError::invalid(
            &descriptor_path,
            format!(
                "expected 1 to {MAX_DESCRIPTOR_ENTRIES} entries, got {}",
                entries.len()
            ),
        ));
    }
    let mut descriptor = Vec::with_capacity(entries.len());
    let mut parts = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let at = format!("{descriptor_path}[{i}]");
        if entry.key.is_empty() {
            errors.push(ConfigError::invalid(
                child(&at, "key"),
                "expected a non-empty key",
            ));
        }
        match (&entry.value, &entry.from) {
            (Some(value), None) if !value.is_empty() => descriptor.push(Entry::Fixed {
                key: entry.key.clone(),
                value: value.clone(),
            }),
            (Some(_), None) => errors.push(ConfigError::invalid(
                child(&at, "value"),
                "expected a non-empty value",
            )),
            (None, Some(part)) => {
                parts.push(part.clone());
                descriptor.push(Entry::FromRequest {
                    key: entry.key.clone(),
                });
            }
            _ => errors.push(ConfigError::invalid(
                &at,
                "expected exactly one of \"value\" (the same for every request) and \"from\" (a key part: a bucket per client)",
            )),
        }
    }
    *key = compile_key(&descriptor_path, &parts, attributes, errors);
    if parts.is_empty() && limit.max_keys.is_some() {
        errors.push(ConfigError::invalid(
            child(policy, "max_keys"),
            "expected a descriptor entry with \"from\" too: without one the limit has a single bucket",
        ));
    }
    let lease_path = child(path, "lease");
    let min = raw.lease.min_hits.unwrap_or(DEFAULT_MIN_HITS);
    let max = raw.lease.max_hits.unwrap_or(DEFAULT_MAX_HITS.max(min));
    if !(1..=MAX_HITS_LIMIT).contains(&min) {
        errors.push(ConfigError::invalid(
            child(&lease_path, "min_hits"),
            format!("expected 1 to {MAX_HITS_LIMIT}, got {min}"),
        ));
    }
    if !(min..=MAX_HITS_LIMIT).contains(&max) {
        errors.push(ConfigError::invalid(
            child(&lease_path, "max_hits"),
            format!("expected min_hits ({min}) to {MAX_HITS_LIMIT}, got {max}"),
        ));
    }
    let lookahead = raw
        .lease
        .lookahead
        .map_or(DEFAULT_LOOKAHEAD, TimeSpan::as_duration);
    if lookahead < Duration::from_millis(10) || lookahead > Duration::from_secs(60) {
        errors.push(ConfigError::invalid(
            child(&lease_path, "lookahead"),
            format!("expected 10ms to 60s, got {lookahead:?}"),
        ));
    }
    let failure = match &raw.failure_mode {
        RawGlobalFailure::Open => GlobalFailure::Open,
        RawGlobalFailure::Closed => GlobalFailure::Closed,
        RawGlobalFailure::Fallback(fallback) => {
            let burst = fallback
                .burst
                .unwrap_or_else(|| u32::try_from(fallback.rate.count()).unwrap_or(u32::MAX));
            if burst == 0 {
                errors.push(ConfigError::invalid(
                    child(&child(path, "failure_mode.fallback"), "burst"),
                    "expected a burst of at least 1, got 0",
                ));
            }
            GlobalFailure::Fallback(Gcra::new(fallback.rate.interval(), burst))
        }
    };
    if errors.len() > before {
        return None;
    }
    let max_keys = limit.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
    let per_client = if parts.is_empty() {
        None
    } else {
        let mut table = |infix: &str| {
            SlotTable::new(
                format!("{prefix}{infix}:"),
                max_keys.clamp(1, MAX_KEYS_LIMIT),
            )
            .map_err(|error| errors.push(ConfigError::invalid(policy, error.to_string())))
            .ok()
        };
        Some(PerClient {
            // Stable across workers and reloads, so a client keeps its bucket.
            seed: hash_parts(1, &[plugin.as_bytes(), name.as_bytes()]),
            skip_missing: matches!(limit.on_missing_key, RawMissingKey::Skip),
            buckets: table("g")?,
            leases: table("gl")?,
            values: table("gv")?,
            fallbacks: table("gf")?,
            wanted_key: format!("{prefix}wanted"),
        })
    };
    Some(GlobalLimit {
        domain: raw.domain.clone(),
        cluster: raw.cluster.clone(),
        timeout,
        descriptor,
        failure,
        sizing: LeaseSizing {
            min,
            max,
            lookahead,
        },
        bucket_key: format!("{prefix}global"),
        lease_key: format!("{prefix}lease"),
        fallback_key: format!("{prefix}fallback"),
        per_client,
    })
}
