//! The `degradation` section: raw model and compilation into [`DegradationPolicy`].
//!
//! Defaults are an SRE's: a 10 s window with at least 20 requests before rates and latency say
//! anything, the p95 for latency, 10 s of dwell before a level steps down, probes every 5 s that
//! flip after 3 failures or 2 successes, and the priority classes `low < normal < high <
//! critical`, `normal` when a request says nothing. Exit conditions default to the enter
//! thresholds; written ones must be at or below them, so the gap between the two is the
//! hysteresis. Route names in `fallback.routes` and `reroute.routes` are checked once routes are
//! compiled ([`super::compile`]).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::error::{child, index, ConfigError};
use super::reply::{RawReply, Reply};
use super::shared::{default_true, is_header_name, status_set, RawStatus};
use super::units::{Percent, TimeSpan};
use crate::policy::circuit_breaker::StatusSet;
use crate::policy::degradation::{
    Conditions, Evidence, LevelRules, ProbeThresholds, MAX_LATENCY_THRESHOLDS, MIN_WINDOW, TICK,
    WINDOW_BUCKETS,
};
use crate::request::{Attribute, AttributeId, AttributePlan};

/// Levels one policy can have; the level is a byte, and an operator needs a handful.
pub const MAX_LEVELS: usize = 8;
/// Priority classes one policy can have.
const MAX_CLASSES: usize = 16;
/// The header the reroute action sets unless told otherwise.
pub const DEFAULT_REROUTE_HEADER: &str = "x-seawall-cluster";

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDegradation {
    #[serde(default)]
    pub signals: RawSignals,
    #[serde(default)]
    pub priority: RawPriority,
    #[serde(default)]
    pub levels: Vec<RawLevel>,
    pub admission_control: Option<RawAdmission>,
    #[serde(default)]
    pub on_shed: RawReply<503>,
    #[serde(default = "default_true")]
    pub response_header: bool,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSignals {
    #[cfg_attr(feature = "schema", schemars(with = "Option<super::schema::Name>"))]
    pub circuit_breaker: Option<String>,
    #[serde(default = "default_window")]
    pub window: TimeSpan,
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    /// Responses with these statuses count as failures (default 5xx).
    #[serde(default = "default_failure_statuses")]
    pub failure_statuses: Vec<RawStatus>,
    pub probe: Option<RawProbe>,
}

impl Default for RawSignals {
    fn default() -> Self {
        RawSignals {
            circuit_breaker: None,
            window: default_window(),
            min_requests: default_min_requests(),
            failure_statuses: default_failure_statuses(),
            probe: None,
        }
    }
}

fn default_window() -> TimeSpan {
    TimeSpan::from_duration(core::time::Duration::from_secs(10))
}

fn default_min_requests() -> u32 {
    20
}

fn default_failure_statuses() -> Vec<RawStatus> {
    vec![RawStatus::Class(5)]
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProbe {
    pub cluster: String,
    #[serde(default = "default_probe_path")]
    pub path: String,
    /// `:authority` of the probe; the cluster's name by default.
    pub authority: Option<String>,
    #[serde(default = "default_interval")]
    pub interval: TimeSpan,
    #[serde(default = "default_timeout")]
    pub timeout: TimeSpan,
    #[serde(default = "default_healthy_after")]
    pub healthy_after: u16,
    #[serde(default = "default_unhealthy_after")]
    pub unhealthy_after: u16,
    #[serde(default = "default_expect")]
    pub expect_statuses: Vec<RawStatus>,
}

fn default_probe_path() -> String {
    "/healthz".to_owned()
}

fn default_interval() -> TimeSpan {
    TimeSpan::from_duration(core::time::Duration::from_secs(5))
}

fn default_timeout() -> TimeSpan {
    TimeSpan::from_duration(core::time::Duration::from_secs(1))
}

fn default_healthy_after() -> u16 {
    2
}

fn default_unhealthy_after() -> u16 {
    3
}

fn default_expect() -> Vec<RawStatus> {
    vec![RawStatus::Class(2)]
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPriority {
    #[cfg_attr(
        feature = "schema",
        schemars(with = "Option<super::schema::HeaderName>")
    )]
    pub header: Option<String>,
    #[serde(default = "default_class")]
    pub default: String,
    #[serde(default = "default_classes")]
    pub classes: Vec<String>,
}

impl Default for RawPriority {
    fn default() -> Self {
        RawPriority {
            header: None,
            default: default_class(),
            classes: default_classes(),
        }
    }
}

fn default_class() -> String {
    "normal".to_owned()
}

fn default_classes() -> Vec<String> {
    ["low", "normal", "high", "critical"]
        .map(str::to_owned)
        .to_vec()
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLevel {
    pub name: String,
    pub enter: RawConditions,
    pub exit: Option<RawConditions>,
    #[serde(default = "default_dwell")]
    pub min_dwell: TimeSpan,
    pub shed_below: Option<String>,
    pub fallback: Option<RawFallback>,
    pub reroute: Option<RawReroute>,
    pub rate_limit_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub retries: bool,
}

fn default_dwell() -> TimeSpan {
    TimeSpan::from_duration(core::time::Duration::from_secs(10))
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConditions {
    pub failure_rate: Option<Percent>,
    pub p95_latency: Option<TimeSpan>,
    /// `"unhealthy"` in `enter`, `"healthy"` in `exit`.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "Option<super::schema::ProbeWord>")
    )]
    pub probe: Option<String>,
    /// `"open"` in `enter`, `"closed"` in `exit`.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "Option<super::schema::BreakerWord>")
    )]
    pub circuit_breaker: Option<String>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFallback {
    #[serde(default = "default_fallback_status")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub routes: Option<Vec<String>>,
}

fn default_fallback_status() -> u16 {
    200
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReroute {
    pub cluster: String,
    #[serde(default = "default_reroute_header")]
    #[cfg_attr(feature = "schema", schemars(with = "super::schema::HeaderName"))]
    pub header: String,
    pub routes: Option<Vec<String>>,
}

fn default_reroute_header() -> String {
    DEFAULT_REROUTE_HEADER.to_owned()
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmission {
    #[serde(default = "default_k")]
    pub k: f64,
    #[serde(default = "default_admission_window")]
    pub window: TimeSpan,
    #[serde(default = "default_max_reject")]
    pub max_reject: Percent,
}

fn default_k() -> f64 {
    2.0
}

fn default_admission_window() -> TimeSpan {
    TimeSpan::from_duration(core::time::Duration::from_secs(30))
}

fn default_max_reject() -> Percent {
    Percent::from_ppm(900_000)
}

/// A compiled degradation policy.
#[derive(Debug, Clone, PartialEq)]
pub struct DegradationPolicy {
    pub name: String,
    /// The shared [`Health`](crate::policy::degradation::Health) record.
    pub health_key: String,
    /// The shared [`Window`](crate::policy::degradation::Window) of outcomes.
    pub window_key: String,
    pub bucket_nanos: u64,
    pub evidence: Evidence,
    pub failure_statuses: StatusSet,
    /// The distinct p95 thresholds the levels test, in nanoseconds.
    pub latency_nanos: Vec<u64>,
    /// The breaker whose state is a signal (its name; its index once routes are compiled).
    pub breaker: Option<String>,
    pub probe: Option<Probe>,
    pub priority: Priority,
    pub levels: Vec<Level>,
    pub rules: Vec<LevelRules>,
    pub admission: Option<Admission>,
    pub on_shed: Reply,
    pub response_header: bool,
    /// The reroute headers any level sets, each with the attribute that sees a client's own.
    pub reroute_headers: Vec<(String, AttributeId)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub interval_nanos: u64,
    pub timeout_ms: u32,
    pub thresholds: ProbeThresholds,
    pub expect: StatusSet,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priority {
    pub header: Option<AttributeId>,
    /// Lowest first.
    pub classes: Vec<String>,
    pub default: u8,
}

impl Priority {
    pub fn class(&self, name: &str) -> Option<u8> {
        self.classes
            .iter()
            .position(|class| class == name)
            .and_then(|position| u8::try_from(position).ok())
    }

    /// The class a header value names (ASCII case ignored), or the default.
    pub fn of_value(&self, value: Option<&[u8]>) -> u8 {
        value
            .and_then(|value| {
                self.classes
                    .iter()
                    .position(|class| class.as_bytes().eq_ignore_ascii_case(value))
            })
            .and_then(|position| u8::try_from(position).ok())
            .unwrap_or(self.default)
    }
}

/// Which routes of the policy an action applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteSet {
    All,
    Only(Vec<u16>),
    /// Names not yet resolved (between compiling the policy and compiling the routes).
    Named(Vec<String>),
}

impl RouteSet {
    pub fn contains(&self, route: u16) -> bool {
        match self {
            RouteSet::All => true,
            RouteSet::Only(routes) => routes.contains(&route),
            RouteSet::Named(_) => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Level {
    pub name: String,
    /// Requests of a class below this one are shed.
    pub shed_below: Option<u8>,
    pub fallback: Option<Fallback>,
    pub reroute: Option<Reroute>,
    /// The route's rate limits are scaled to this share (ppm).
    pub rate_limit_ppm: Option<u32>,
    pub retries: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    pub reply: Reply,
    pub routes: RouteSet,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reroute {
    pub header: String,
    pub cluster: String,
    pub routes: RouteSet,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// K × 1000.
    pub k_milli: u32,
    pub bucket_nanos: u64,
    pub max_ppm: u32,
    /// Per route using the policy: its index and its shared record.
    pub routes: Vec<(u16, String)>,
}

pub fn compile(
    path: &str,
    plugin: &str,
    name: &str,
    raw: RawDegradation,
    attributes: &mut AttributePlan,
) -> Result<DegradationPolicy, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let signals_path = child(path, "signals");
    let window = raw.signals.window.as_duration();
    if window < MIN_WINDOW {
        errors.push(ConfigError::invalid(
            child(&signals_path, "window"),
            format!(
                "expected a window of at least {}ms (one {}ms tick for each of its {WINDOW_BUCKETS} buckets), got {}",
                MIN_WINDOW.as_millis(),
                TICK.as_millis(),
                raw.signals.window
            ),
        ));
    }
    let failure_statuses = status_set(&raw.signals.failure_statuses);
    let probe = raw
        .signals
        .probe
        .as_ref()
        .map(|probe| compile_probe(&child(&signals_path, "probe"), probe, &mut errors));

    let priority = compile_priority(
        &child(path, "priority"),
        &raw.priority,
        attributes,
        &mut errors,
    );

    let levels_path = child(path, "levels");
    if raw.levels.is_empty() {
        errors.push(ConfigError::invalid(
            &levels_path,
            "expected at least one level",
        ));
    }
    if raw.levels.len() > MAX_LEVELS {
        errors.push(ConfigError::invalid(
            &levels_path,
            format!(
                "expected at most {MAX_LEVELS} levels, got {}",
                raw.levels.len()
            ),
        ));
    }
    let mut latency_nanos: Vec<u64> = Vec::new();
    let mut levels = Vec::with_capacity(raw.levels.len());
    let mut rules = Vec::with_capacity(raw.levels.len());
    let mut reroute_headers: Vec<(String, AttributeId)> = Vec::new();
    let mut uses_probe = false;
    let mut uses_breaker = false;
    for (position, level) in raw.levels.iter().enumerate() {
        let at = index(&levels_path, position);
        if levels.iter().any(|l: &Level| l.name == level.name) || level.name.is_empty() {
            errors.push(ConfigError::invalid(
                child(&at, "name"),
                format!(
                    "expected a unique, non-empty level name, got {:?}",
                    level.name
                ),
            ));
        }
        let enter_path = child(&at, "enter");
        let mut latency = |span: TimeSpan, errors: &mut Vec<ConfigError>, at: &str| {
            let nanos = u64::try_from(span.as_duration().as_nanos()).unwrap_or(u64::MAX);
            match latency_nanos.iter().position(|&n| n == nanos) {
                Some(found) => Some(found),
                None if latency_nanos.len() < MAX_LATENCY_THRESHOLDS => {
                    latency_nanos.push(nanos);
                    Some(latency_nanos.len() - 1)
                }
                None => {
                    errors.push(ConfigError::invalid(
                        at,
                        format!(
                            "expected at most {MAX_LATENCY_THRESHOLDS} distinct p95_latency values in one policy"
                        ),
                    ));
                    None
                }
            }
        };
        let enter = compile_conditions(&enter_path, &level.enter, true, &mut latency, &mut errors);
        if enter == Conditions::default() {
            errors.push(ConfigError::invalid(
                &enter_path,
                "expected at least one of failure_rate, p95_latency, probe or circuit_breaker",
            ));
        }
        let exit = match &level.exit {
            None => enter,
            Some(written) => {
                let exit_path = child(&at, "exit");
                let mut exit =
                    compile_conditions(&exit_path, written, false, &mut latency, &mut errors);
                check_hysteresis(&exit_path, &level.enter, written, &mut errors);
                // A signal the exit leaves out keeps the enter threshold.
                exit.failure_rate_ppm = exit.failure_rate_ppm.or(enter.failure_rate_ppm);
                exit.latency = exit.latency.or(enter.latency);
                exit.probe_unhealthy |= enter.probe_unhealthy;
                exit.breaker_open |= enter.breaker_open;
                exit
            }
        };
        uses_probe |= enter.probe_unhealthy || exit.probe_unhealthy;
        uses_breaker |= enter.breaker_open || exit.breaker_open;
        rules.push(LevelRules {
            enter,
            exit,
            min_dwell_nanos: u64::try_from(level.min_dwell.as_duration().as_nanos())
                .unwrap_or(u64::MAX),
        });
        let shed_below = level.shed_below.as_ref().and_then(|class| {
            let found = priority.class(class);
            if found.is_none() {
                errors.push(ConfigError::invalid(
                    child(&at, "shed_below"),
                    format!(
                        "expected one of the priority classes {}, got {class:?}",
                        priority.classes.join(", ")
                    ),
                ));
            }
            found
        });
        let fallback = level.fallback.as_ref().map(|fallback| {
            let reply = RawReply::<200> {
                status: fallback.status,
                body: fallback.body.clone(),
                headers: fallback.headers.clone(),
            }
            .compile(&child(&at, "fallback"), &mut errors);
            Fallback {
                reply,
                routes: route_set(&fallback.routes),
            }
        });
        let reroute = level.reroute.as_ref().and_then(|reroute| {
            let reroute_path = child(&at, "reroute");
            if !is_header_name(&reroute.header) {
                errors.push(ConfigError::invalid(
                    child(&reroute_path, "header"),
                    format!("expected an HTTP header name, got {:?}", reroute.header),
                ));
                return None;
            }
            if reroute.cluster.is_empty() || reroute.cluster.bytes().any(|b| b.is_ascii_control()) {
                errors.push(ConfigError::invalid(
                    child(&reroute_path, "cluster"),
                    format!("expected an Envoy cluster name, got {:?}", reroute.cluster),
                ));
                return None;
            }
            let header = reroute.header.to_ascii_lowercase();
            if !reroute_headers.iter().any(|(known, _)| *known == header) {
                match attributes.intern(Attribute::header(&header)) {
                    Ok(id) => reroute_headers.push((header.clone(), id)),
                    Err(error) => {
                        errors.push(ConfigError::invalid(&reroute_path, error.to_string()))
                    }
                }
            }
            Some(Reroute {
                header,
                cluster: reroute.cluster.clone(),
                routes: route_set(&reroute.routes),
            })
        });
        let rate_limit_ppm = level.rate_limit_factor.and_then(|factor| {
            if factor > 0.0 && factor <= 1.0 {
                Some(((factor * 1e6).round() as u32).max(1))
            } else {
                errors.push(ConfigError::invalid(
                    child(&at, "rate_limit_factor"),
                    format!("expected a factor above 0 and at most 1, got {factor}"),
                ));
                None
            }
        });
        levels.push(Level {
            name: level.name.clone(),
            shed_below,
            fallback,
            reroute,
            rate_limit_ppm,
            retries: level.retries,
        });
    }
    if uses_probe && probe.is_none() {
        errors.push(ConfigError::invalid(
            child(&signals_path, "probe"),
            "expected a probe: a level's conditions test it",
        ));
    }
    if uses_breaker && raw.signals.circuit_breaker.is_none() {
        errors.push(ConfigError::invalid(
            child(&signals_path, "circuit_breaker"),
            "expected the name of a circuit breaker: a level's conditions test it",
        ));
    }
    let admission = raw.admission_control.as_ref().and_then(|admission| {
        let at = child(path, "admission_control");
        if !(1.0..=10.0).contains(&admission.k) {
            errors.push(ConfigError::invalid(
                child(&at, "k"),
                format!("expected K from 1 to 10, got {}", admission.k),
            ));
            return None;
        }
        if admission.window.as_duration() < MIN_WINDOW {
            errors.push(ConfigError::invalid(
                child(&at, "window"),
                format!(
                    "expected a window of at least {}ms (one {}ms tick for each of its {WINDOW_BUCKETS} buckets), got {}",
                    MIN_WINDOW.as_millis(),
                    TICK.as_millis(),
                    admission.window
                ),
            ));
            return None;
        }
        if admission.max_reject.ppm() >= 1_000_000 {
            errors.push(ConfigError::invalid(
                child(&at, "max_reject"),
                format!(
                    "expected a percentage below 100 (at 100 nothing reaches the upstream, so nothing shows it has recovered), got {}",
                    f64::from(admission.max_reject.ppm()) / 10_000.0
                ),
            ));
            return None;
        }
        Some(Admission {
            k_milli: (admission.k * 1000.0).round() as u32,
            bucket_nanos: bucket_nanos(admission.window),
            max_ppm: admission.max_reject.ppm(),
            routes: Vec::new(),
        })
    });
    let on_shed = raw.on_shed.compile(&child(path, "on_shed"), &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(DegradationPolicy {
        name: name.to_owned(),
        health_key: format!("sw:{plugin}:deg:{name}:health"),
        window_key: format!("sw:{plugin}:deg:{name}:window"),
        bucket_nanos: bucket_nanos(raw.signals.window),
        evidence: Evidence {
            min_requests: raw.signals.min_requests,
            percentile_ppm: 950_000,
        },
        failure_statuses,
        latency_nanos,
        breaker: raw.signals.circuit_breaker.clone(),
        probe,
        priority,
        levels,
        rules,
        admission,
        on_shed,
        response_header: raw.response_header,
        reroute_headers,
    })
}

fn bucket_nanos(window: TimeSpan) -> u64 {
    u64::try_from(window.as_duration().as_nanos() / WINDOW_BUCKETS as u128)
        .unwrap_or(u64::MAX)
        .max(1)
}

fn route_set(names: &Option<Vec<String>>) -> RouteSet {
    match names {
        None => RouteSet::All,
        Some(names) => RouteSet::Named(names.clone()),
    }
}

fn compile_probe(path: &str, raw: &RawProbe, errors: &mut Vec<ConfigError>) -> Probe {
    if raw.cluster.is_empty() {
        errors.push(ConfigError::invalid(
            child(path, "cluster"),
            "expected the name of an Envoy cluster",
        ));
    }
    if !raw.path.starts_with('/') {
        errors.push(ConfigError::invalid(
            child(path, "path"),
            format!("expected a path starting with '/', got {:?}", raw.path),
        ));
    }
    let interval = raw.interval.as_duration();
    if interval < TICK {
        errors.push(ConfigError::invalid(
            child(path, "interval"),
            format!(
                "expected an interval of at least {}ms (probes go out on the tick), got {}",
                TICK.as_millis(),
                raw.interval
            ),
        ));
    }
    let timeout_ms = raw.timeout.as_duration().as_millis();
    if timeout_ms == 0 || raw.timeout.as_duration() > interval {
        errors.push(ConfigError::invalid(
            child(path, "timeout"),
            format!(
                "expected a timeout of at least 1ms and at most the interval ({}), got {}",
                raw.interval, raw.timeout
            ),
        ));
    }
    for (field, value) in [
        ("healthy_after", raw.healthy_after),
        ("unhealthy_after", raw.unhealthy_after),
    ] {
        if !(1..=100).contains(&value) {
            errors.push(ConfigError::invalid(
                child(path, field),
                format!("expected a count from 1 to 100, got {value}"),
            ));
        }
    }
    let expect = status_set(&raw.expect_statuses);
    Probe {
        cluster: raw.cluster.clone(),
        path: raw.path.clone(),
        authority: raw.authority.clone().unwrap_or_else(|| raw.cluster.clone()),
        interval_nanos: u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX),
        timeout_ms: u32::try_from(timeout_ms).unwrap_or(u32::MAX),
        thresholds: ProbeThresholds {
            healthy_after: raw.healthy_after,
            unhealthy_after: raw.unhealthy_after,
        },
        expect,
    }
}

fn compile_priority(
    path: &str,
    raw: &RawPriority,
    attributes: &mut AttributePlan,
    errors: &mut Vec<ConfigError>,
) -> Priority {
    let classes_path = child(path, "classes");
    if raw.classes.is_empty() || raw.classes.len() > MAX_CLASSES {
        errors.push(ConfigError::invalid(
            &classes_path,
            format!("expected 1 to {MAX_CLASSES} priority classes, lowest first"),
        ));
    }
    for (position, class) in raw.classes.iter().enumerate() {
        let well_formed = !class.is_empty()
            && class
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !well_formed || raw.classes[..position].contains(class) {
            errors.push(ConfigError::invalid(
                index(&classes_path, position),
                format!(
                    "expected a unique class name of letters, digits, '-' or '_', got {class:?}"
                ),
            ));
        }
    }
    let header = match &raw.header {
        Some(header) if !is_header_name(header) => {
            errors.push(ConfigError::invalid(
                child(path, "header"),
                format!("expected an HTTP header name, got {header:?}"),
            ));
            None
        }
        Some(header) => match attributes.intern(Attribute::header(header)) {
            Ok(id) => Some(id),
            Err(error) => {
                errors.push(ConfigError::invalid(path, error.to_string()));
                None
            }
        },
        None => None,
    };
    let mut priority = Priority {
        header,
        classes: raw.classes.clone(),
        default: 0,
    };
    match priority.class(&raw.default) {
        Some(default) => priority.default = default,
        None => errors.push(ConfigError::invalid(
            child(path, "default"),
            format!(
                "expected one of the priority classes {}, got {:?}",
                raw.classes.join(", "),
                raw.default
            ),
        )),
    }
    priority
}

fn compile_conditions(
    path: &str,
    raw: &RawConditions,
    entering: bool,
    latency: &mut impl FnMut(TimeSpan, &mut Vec<ConfigError>, &str) -> Option<usize>,
    errors: &mut Vec<ConfigError>,
) -> Conditions {
    let (probe_word, breaker_word) = if entering {
        ("unhealthy", "open")
    } else {
        ("healthy", "closed")
    };
    let mut word = |field: &str, value: &Option<String>, expected: &str| match value {
        None => false,
        Some(value) if value == expected => true,
        Some(value) => {
            errors.push(ConfigError::invalid(
                child(path, field),
                format!("expected \"{expected}\", got {value:?}"),
            ));
            false
        }
    };
    let probe_unhealthy = word("probe", &raw.probe, probe_word);
    let breaker_open = word("circuit_breaker", &raw.circuit_breaker, breaker_word);
    Conditions {
        failure_rate_ppm: raw.failure_rate.map(Percent::ppm),
        latency: raw
            .p95_latency
            .and_then(|span| latency(span, errors, &child(path, "p95_latency"))),
        probe_unhealthy,
        breaker_open,
    }
}

/// Exit thresholds above the enter ones would leave the level while it should be entered again.
fn check_hysteresis(
    path: &str,
    enter: &RawConditions,
    exit: &RawConditions,
    errors: &mut Vec<ConfigError>,
) {
    if let (Some(enter), Some(exit)) = (enter.failure_rate, exit.failure_rate) {
        if exit > enter {
            errors.push(ConfigError::invalid(
                child(path, "failure_rate"),
                format!("expected at most the enter threshold ({enter}), got {exit}"),
            ));
        }
    }
    if let (Some(enter), Some(exit)) = (enter.p95_latency, exit.p95_latency) {
        if exit > enter {
            errors.push(ConfigError::invalid(
                child(path, "p95_latency"),
                format!("expected at most the enter threshold ({enter}), got {exit}"),
            ));
        }
    }
}
