//! The `rate_limits` section: raw model and compilation into [`RateLimitPolicy`].
//!
//! Validation that belongs to one policy lives here; the cross-references (routes naming
//! policies) stay with the compiler in `config/mod.rs`.

use serde::Deserialize;

use super::error::{child, index, ConfigError};
use super::reply::{RawReply, Reply};
use super::units::Rate;
use crate::policy::rate_limit::{Buckets, FailureMode, Gcra, MissingKey, Mode};
use crate::request::{Attribute, AttributeId, AttributePlan};
use crate::state::slots::{hash_parts, SlotTable};

/// At most this many parts in one key, so a request's parts fit a fixed array.
pub const MAX_KEY_PARTS: usize = 4;
/// At most this many limits on one route: the refund bookkeeping is a fixed-size bit set.
pub const MAX_LIMITS_PER_ROUTE: usize = 8;
/// Every slot is a shared-data key that each worker's `on_configure` creates or checks, one host
/// call each, and that lives as long as Envoy. Measured on Envoy 1.40 with 2 workers (2 cores,
/// one start each): Envoy's heap grew by about 8 MB with 100,000 keys and 92 MB with 1,000,000,
/// and it was ready 1.9 s and 12.3 s after starting. So a policy may have at most 100,000.
const MAX_KEYS_LIMIT: u32 = 100_000;
const DEFAULT_MAX_KEYS: u32 = 10_000;

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
    pub on_limit: RawReply<429>,
}

fn default_true() -> bool {
    true
}

/// `{"header": "x-user-id"}`, or one of the named request attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawKeyPart {
    Header { header: String },
    Named(NamedPart),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamedPart {
    ClientIp,
    Path,
    Method,
    Authority,
    RouteName,
}

const KEY_PART_EXPECTED: &str = r#"expected {"header": "<name>"} or one of "client_ip", "path", "method", "authority", "route_name""#;

impl<'de> Deserialize<'de> for RawKeyPart {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        let named = |name: &str| match name {
            "client_ip" => Some(NamedPart::ClientIp),
            "path" => Some(NamedPart::Path),
            "method" => Some(NamedPart::Method),
            "authority" => Some(NamedPart::Authority),
            "route_name" => Some(NamedPart::RouteName),
            _ => None,
        };
        match &value {
            serde_json::Value::String(name) => named(name).map(RawKeyPart::Named),
            serde_json::Value::Object(fields) if fields.len() == 1 => match fields.get("header") {
                Some(serde_json::Value::String(header)) => Some(RawKeyPart::Header {
                    header: header.clone(),
                }),
                _ => None,
            },
            _ => None,
        }
        .ok_or_else(|| D::Error::custom(format!("{KEY_PART_EXPECTED}, got {value}")))
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawMissingKey {
    #[default]
    Shared,
    Skip,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawMode {
    #[default]
    Enforce,
    Shadow,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawFailureMode {
    #[default]
    Open,
    Closed,
}

/// One part of a client key, and how to read it from its attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPart {
    /// The attribute's bytes as they are.
    Raw(AttributeId),
    /// `source.address` without its port.
    ClientIp(AttributeId),
    /// `:path` without its query string, in its canonical form.
    Path(AttributeId),
    /// `:authority`, lowercased and without its port.
    Authority(AttributeId),
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
    pub response_headers: bool,
    pub on_limit: Reply,
}

pub(crate) fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Compiles a client key (at most [`MAX_KEY_PARTS`] parts) into the attributes it reads; problems
/// go to `errors` under `path` (the `key` field).
pub fn compile_key(
    path: &str,
    parts: &[RawKeyPart],
    attributes: &mut AttributePlan,
    errors: &mut Vec<ConfigError>,
) -> Vec<KeyPart> {
    if parts.len() > MAX_KEY_PARTS {
        errors.push(ConfigError::invalid(
            path,
            format!(
                "expected at most {MAX_KEY_PARTS} key parts, got {}",
                parts.len()
            ),
        ));
    }
    let mut key = Vec::with_capacity(parts.len());
    for (position, part) in parts.iter().enumerate() {
        let at = index(path, position);
        let compiled = match part {
            RawKeyPart::Header { header } if !is_header_name(header) => {
                errors.push(ConfigError::invalid(
                    child(&at, "header"),
                    format!("expected an HTTP header name, got {header:?}"),
                ));
                continue;
            }
            RawKeyPart::Header { header } => attributes
                .intern(Attribute::header(header))
                .map(KeyPart::Raw),
            RawKeyPart::Named(NamedPart::ClientIp) => attributes
                .intern(Attribute::client_address())
                .map(KeyPart::ClientIp),
            RawKeyPart::Named(NamedPart::Path) => {
                attributes.intern(Attribute::path()).map(KeyPart::Path)
            }
            RawKeyPart::Named(NamedPart::Method) => {
                attributes.intern(Attribute::method()).map(KeyPart::Raw)
            }
            RawKeyPart::Named(NamedPart::Authority) => attributes
                .intern(Attribute::authority())
                .map(KeyPart::Authority),
            RawKeyPart::Named(NamedPart::RouteName) => {
                attributes.intern(Attribute::route_name()).map(KeyPart::Raw)
            }
        };
        match compiled {
            Ok(part) => key.push(part),
            Err(error) => errors.push(ConfigError::invalid(at, error.to_string())),
        }
    }
    key
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
        response_headers: raw.response_headers,
        on_limit,
    })
}
