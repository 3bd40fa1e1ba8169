//! The `faults` section: raw model and compilation into [`FaultPolicy`].
//!
//! A chaos experiment must be safe to leave in a config: every fault has its own percentage, the
//! whole policy has a kill switch (`enabled`) and an optional time box, and header control is off
//! unless a secret is configured. The `when` header conditions are compiled by the config's
//! compiler, which owns the route matcher; everything else is checked here.

use serde::Deserialize;

use super::error::{child, ConfigError};
use super::raw::RawHeaderMatch;
use super::reply::{RawReply, Reply};
use super::shared::{compile_key, default_true, is_header_name, KeyPart, RawGrpcCode, RawKeyPart};
use super::units::{Percent, TimeSpan};
use crate::policy::fault::{parse_rfc3339, DelayShape, TimeBox};
use crate::policy::route::Condition;
use crate::request::{Attribute, AttributeId, AttributePlan};
use crate::state::slots::hash_parts;

/// The request headers of header-controlled faults.
pub const ABORT_HEADER: &str = "x-seawall-fault-abort";
pub const DELAY_HEADER: &str = "x-seawall-fault-delay";
pub const PERCENT_HEADER: &str = "x-seawall-fault-percent";

/// The longest delay a config or a header may ask for.
const MAX_DELAY: core::time::Duration = core::time::Duration::from_secs(60);

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFault {
    #[serde(default = "default_true")]
    pub enabled: bool,
    pub abort: Option<RawAbort>,
    pub delay: Option<RawDelay>,
    pub response: Option<RawResponseFault>,
    #[serde(default)]
    pub when: RawWhen,
    pub cohort: Option<RawCohort>,
    pub max_active: Option<u64>,
    pub active_between: Option<RawTimeBox>,
    pub header_control: Option<RawHeaderControl>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAbort {
    pub percent: Percent,
    #[serde(default = "default_abort_status")]
    pub status: u16,
    pub grpc_status: Option<RawGrpcCode>,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

fn default_abort_status() -> u16 {
    503
}

/// Exactly one of `fixed` (with an optional `jitter`), `uniform` and `exponential`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDelay {
    pub percent: Percent,
    pub fixed: Option<TimeSpan>,
    pub jitter: Option<TimeSpan>,
    pub uniform: Option<RawUniform>,
    pub exponential: Option<RawExponential>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUniform {
    pub min: TimeSpan,
    pub max: TimeSpan,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExponential {
    pub mean: TimeSpan,
    pub max: TimeSpan,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResponseFault {
    pub percent: Percent,
    pub status: u16,
    pub body: Option<String>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWhen {
    #[serde(default)]
    pub headers: Vec<RawHeaderMatch>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCohort {
    pub key: Vec<RawKeyPart>,
    #[serde(default = "hundred")]
    pub percent: Percent,
}

fn hundred() -> Percent {
    Percent::HUNDRED
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeBox {
    #[cfg_attr(feature = "schema", schemars(with = "Option<super::schema::Rfc3339>"))]
    pub start: Option<String>,
    #[cfg_attr(feature = "schema", schemars(with = "Option<super::schema::Rfc3339>"))]
    pub end: Option<String>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderControl {
    #[cfg_attr(feature = "schema", schemars(with = "super::schema::HeaderName"))]
    pub secret_header: String,
    pub secret: Secret,
    #[serde(default = "hundred")]
    pub max_percent: Percent,
}

/// An abort: the reply, and the gRPC status gRPC callers get instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    pub ppm: u32,
    pub reply: Reply,
    pub grpc_status: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Delay {
    pub ppm: u32,
    pub shape: DelayShape,
}

/// Replaces the upstream's status (and body) after it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseFault {
    pub ppm: u32,
    pub status: u16,
    pub body: Option<Vec<u8>>,
}

/// Sticky membership: the key's hash decides, not a fresh draw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cohort {
    pub key: Vec<KeyPart>,
    pub ppm: u32,
    pub seed: u64,
}

/// The shortest header-control secret accepted: 16 bytes (128 bits of a random secret) is the
/// least that cannot be guessed by trying, one request at a time, against a live proxy.
pub const MIN_SECRET_BYTES: usize = 16;

/// A header-control secret. It never shows: `Debug` prints only its length, config errors name
/// only its length, and it is compared in constant time.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub struct Secret(Vec<u8>);

impl From<String> for Secret {
    fn from(secret: String) -> Self {
        Secret(secret.into_bytes())
    }
}

impl Secret {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `presented` is the secret, in time that does not depend on where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        crate::policy::fault::secret_matches(presented, &self.0)
    }
}

impl core::fmt::Debug for Secret {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Secret(<{} bytes, redacted>)", self.0.len())
    }
}

/// Faults a request may ask for by header, with the secret that unlocks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderControl {
    pub secret_header: AttributeId,
    pub secret: Secret,
    pub max_ppm: u32,
    pub abort: AttributeId,
    pub delay: AttributeId,
    pub percent: AttributeId,
}

impl HeaderControl {
    /// Every header a client controls faults with; none of them may reach an upstream.
    pub fn headers(&self) -> [AttributeId; 4] {
        [self.abort, self.delay, self.percent, self.secret_header]
    }
}

/// A compiled fault policy.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultPolicy {
    pub name: String,
    pub enabled: bool,
    pub abort: Option<Abort>,
    pub delay: Option<Delay>,
    pub response: Option<ResponseFault>,
    /// Header conditions that must all hold (compiled by the config compiler).
    pub when: Vec<Condition>,
    pub cohort: Option<Cohort>,
    pub max_active: Option<u64>,
    /// The shared-data counter of active faults, when `max_active` is set.
    pub active_key: String,
    pub window: TimeBox,
    pub header_control: Option<HeaderControl>,
    /// Seeds sticky draws, stable across workers and reloads.
    pub seed: u64,
}

/// Compiles one policy, except its `when` conditions (left empty for the caller).
pub fn compile(
    path: &str,
    plugin: &str,
    name: &str,
    raw: &RawFault,
    attributes: &mut AttributePlan,
) -> Result<FaultPolicy, Vec<ConfigError>> {
    let mut errors = Vec::new();
    if raw.abort.is_none()
        && raw.delay.is_none()
        && raw.response.is_none()
        && raw.header_control.is_none()
    {
        errors.push(ConfigError::invalid(
            path,
            "expected at least one of \"abort\", \"delay\", \"response\" or \"header_control\"",
        ));
    }
    let abort = raw.abort.as_ref().map(|abort| {
        let at = child(path, "abort");
        let reply = RawReply::<503> {
            status: abort.status,
            body: abort.body.clone(),
            headers: abort.headers.clone(),
        }
        .compile(&at, &mut errors);
        let grpc_status = abort.grpc_status.map_or(14, |code| code.0);
        if grpc_status == 0 {
            errors.push(ConfigError::invalid(
                child(&at, "grpc_status"),
                "expected a failing gRPC status, got OK (0)",
            ));
        }
        Abort {
            ppm: abort.percent.ppm(),
            reply,
            grpc_status,
        }
    });
    let delay = raw.delay.as_ref().and_then(|delay| {
        let at = child(path, "delay");
        let shape = delay_shape(&at, delay, &mut errors)?;
        Some(Delay {
            ppm: delay.percent.ppm(),
            shape,
        })
    });
    let response = raw.response.as_ref().map(|response| {
        if !(200..=599).contains(&response.status) {
            errors.push(ConfigError::invalid(
                child(&child(path, "response"), "status"),
                format!(
                    "expected an HTTP status from 200 to 599, got {}",
                    response.status
                ),
            ));
        }
        ResponseFault {
            ppm: response.percent.ppm(),
            status: response.status,
            body: response.body.clone().map(String::into_bytes),
        }
    });
    let cohort = raw.cohort.as_ref().map(|cohort| {
        let at = child(path, "cohort");
        if cohort.key.is_empty() {
            errors.push(ConfigError::invalid(
                child(&at, "key"),
                "expected at least one key part: the key decides who is in the experiment",
            ));
        }
        Cohort {
            key: compile_key(&child(&at, "key"), &cohort.key, attributes, &mut errors),
            ppm: cohort.percent.ppm(),
            seed: hash_parts(0, &[b"fault", plugin.as_bytes(), name.as_bytes()]),
        }
    });
    if raw.max_active == Some(0) {
        errors.push(ConfigError::invalid(
            child(path, "max_active"),
            "expected at least 1, got 0 (use \"enabled\": false to stop the experiment)",
        ));
    }
    if let Some(max_active) = raw
        .max_active
        .filter(|&n| n > crate::policy::fault::MAX_ACTIVE)
    {
        errors.push(ConfigError::invalid(
            child(path, "max_active"),
            format!(
                "expected at most {}, got {max_active}",
                crate::policy::fault::MAX_ACTIVE
            ),
        ));
    }
    let window = match &raw.active_between {
        None => TimeBox::default(),
        Some(between) => {
            let at = child(path, "active_between");
            let mut time = |field: &str, text: &Option<String>| {
                text.as_ref().and_then(|text| {
                    let parsed = parse_rfc3339(text);
                    if parsed.is_none() {
                        errors.push(ConfigError::invalid(
                            child(&at, field),
                            format!(
                                "expected an RFC 3339 time like \"2026-11-22T10:00:00Z\", got {text:?}"
                            ),
                        ));
                    }
                    parsed
                })
            };
            let window = TimeBox {
                start: time("start", &between.start),
                end: time("end", &between.end),
            };
            if let (Some(start), Some(end)) = (window.start, window.end) {
                if end <= start {
                    errors.push(ConfigError::invalid(
                        child(&at, "end"),
                        "expected an end after the start",
                    ));
                }
            }
            window
        }
    };
    let header_control = raw.header_control.as_ref().and_then(|control| {
        let at = child(path, "header_control");
        if !is_header_name(&control.secret_header) {
            errors.push(ConfigError::invalid(
                child(&at, "secret_header"),
                format!(
                    "expected an HTTP header name, got {:?}",
                    control.secret_header
                ),
            ));
            return None;
        }
        if control.secret.len() < MIN_SECRET_BYTES {
            errors.push(ConfigError::invalid(
                child(&at, "secret"),
                format!(
                    "expected a secret of at least {MIN_SECRET_BYTES} bytes, got {} bytes",
                    control.secret.len()
                ),
            ));
        }
        let mut intern = |name: &str| match attributes.intern(Attribute::header(name)) {
            Ok(id) => Some(id),
            Err(error) => {
                errors.push(ConfigError::invalid(&at, error.to_string()));
                None
            }
        };
        Some(HeaderControl {
            secret_header: intern(&control.secret_header)?,
            abort: intern(ABORT_HEADER)?,
            delay: intern(DELAY_HEADER)?,
            percent: intern(PERCENT_HEADER)?,
            secret: control.secret.clone(),
            max_ppm: control.max_percent.ppm(),
        })
    });
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(FaultPolicy {
        name: name.to_owned(),
        enabled: raw.enabled,
        abort,
        delay,
        response,
        when: Vec::new(),
        cohort,
        max_active: raw.max_active,
        active_key: format!("sw:{plugin}:fault:{name}:active"),
        window,
        header_control,
        seed: hash_parts(0, &[b"fault", plugin.as_bytes(), name.as_bytes()]),
    })
}

fn delay_shape(at: &str, raw: &RawDelay, errors: &mut Vec<ConfigError>) -> Option<DelayShape> {
    let too_long = |span: core::time::Duration| span > MAX_DELAY;
    let shape = match (&raw.fixed, &raw.uniform, &raw.exponential) {
        (Some(fixed), None, None) => DelayShape::Fixed {
            fixed: fixed.as_duration(),
            jitter: raw.jitter.map(TimeSpan::as_duration).unwrap_or_default(),
        },
        (None, Some(uniform), None) if raw.jitter.is_none() => {
            if uniform.max < uniform.min {
                errors.push(ConfigError::invalid(
                    child(&child(at, "uniform"), "max"),
                    format!(
                        "expected at least \"min\" ({}), got {}",
                        uniform.min, uniform.max
                    ),
                ));
            }
            DelayShape::Uniform {
                min: uniform.min.as_duration(),
                max: uniform.max.as_duration(),
            }
        }
        (None, None, Some(exponential)) if raw.jitter.is_none() => DelayShape::Exponential {
            mean: exponential.mean.as_duration(),
            max: exponential.max.as_duration(),
        },
        _ => {
            errors.push(ConfigError::invalid(
                at,
                "expected exactly one of \"fixed\" (with an optional \"jitter\"), \"uniform\" or \"exponential\"",
            ));
            return None;
        }
    };
    let longest = match shape {
        DelayShape::Fixed { fixed, jitter } => fixed + jitter,
        DelayShape::Uniform { max, .. } | DelayShape::Exponential { max, .. } => max,
    };
    if too_long(longest) {
        errors.push(ConfigError::invalid(
            at,
            format!(
                "expected delays of at most 60s, got up to {}",
                TimeSpan::from_duration(longest)
            ),
        ));
    }
    Some(shape)
}
