//! Config building blocks that several policies use: header names, client keys, HTTP status
//! sets and gRPC codes. Each policy's module imports them from here, never from a sibling policy.

use serde::Deserialize;

use super::error::{child, index, ConfigError};
use crate::policy::circuit_breaker::StatusSet;
use crate::request::{Attribute, AttributeId, AttributePlan};

/// Serde's default for the switches that are on unless turned off.
pub fn default_true() -> bool {
    true
}

/// At most this many parts in one key, so a request's parts fit a fixed array.
pub const MAX_KEY_PARTS: usize = 4;

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

/// Whether `name` can be an HTTP header name as seawall accepts one.
pub fn is_header_name(name: &str) -> bool {
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

/// `"5xx"` (a class) or `503` (one status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawStatus {
    Class(u16),
    Code(u16),
}

/// The statuses and classes written, as one set.
pub fn status_set(written: &[RawStatus]) -> StatusSet {
    let mut set = StatusSet::default();
    for status in written {
        match *status {
            RawStatus::Class(class) => set.insert_class(class),
            RawStatus::Code(code) => set.insert(code),
        }
    }
    set
}

impl<'de> Deserialize<'de> for RawStatus {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        let parsed = match &value {
            serde_json::Value::String(class) => match class.as_str() {
                "1xx" => Some(RawStatus::Class(1)),
                "2xx" => Some(RawStatus::Class(2)),
                "3xx" => Some(RawStatus::Class(3)),
                "4xx" => Some(RawStatus::Class(4)),
                "5xx" => Some(RawStatus::Class(5)),
                _ => None,
            },
            serde_json::Value::Number(code) => code
                .as_u64()
                .filter(|c| (100..=599).contains(c))
                .and_then(|c| u16::try_from(c).ok())
                .map(RawStatus::Code),
            _ => None,
        };
        parsed.ok_or_else(|| {
            D::Error::custom(format!(
                r#"expected a status class like "5xx" or a status from 100 to 599, got {value}"#
            ))
        })
    }
}

/// A gRPC status code, by number (0 to 16) or name (`"unavailable"`, `"DEADLINE_EXCEEDED"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawGrpcCode(pub u32);

pub(crate) const GRPC_NAMES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

/// Looks up a gRPC code name in any of the spellings operators use.
pub fn grpc_code(name: &str) -> Option<u32> {
    let normal = name.to_ascii_lowercase().replace('_', "-");
    GRPC_NAMES
        .iter()
        .position(|known| *known == normal)
        .and_then(|code| u32::try_from(code).ok())
}

impl<'de> Deserialize<'de> for RawGrpcCode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        let code = match &value {
            serde_json::Value::String(name) => grpc_code(name),
            serde_json::Value::Number(code) => code
                .as_u64()
                .filter(|&c| c <= 16)
                .and_then(|c| u32::try_from(c).ok()),
            _ => None,
        };
        code.map(RawGrpcCode).ok_or_else(|| {
            D::Error::custom(format!(
                r#"expected a gRPC status code from 0 to 16 or a name like "unavailable", got {value}"#
            ))
        })
    }
}
