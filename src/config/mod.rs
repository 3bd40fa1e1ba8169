//! From the operator's JSON to a validated, compiled config, or to a list of errors that each name
//! their JSON path.
//!
//! Two steps, as in Kuadrant's wasm-shim: serde reads each part into the raw model of [`raw`]
//! (shape only, unknown fields refused), then `compile` checks meaning (ranges, names,
//! references between routes and policies) and builds the runtime form: route conditions as byte
//! comparisons over an [`AttributePlan`]. This runs only in `on_configure`, so it may allocate
//! freely; nothing here is on the request path.

pub mod circuit_breaker;
pub mod degradation;
pub mod error;
pub mod fault;
pub mod rate_limit;
pub mod raw;
pub mod reply;
pub mod retry;
#[cfg(feature = "schema")]
pub mod schema;
pub mod shared;
pub mod units;

use serde_json::{Map, Value};

use crate::policy::route::{
    Condition, Route, RouteBreaker, RouteDegradation, RoutePolicies, RouteTable,
};
use crate::request::{Attribute, AttributeId, AttributePlan};
pub use circuit_breaker::CircuitBreakerPolicy;
pub use degradation::DegradationPolicy;
use degradation::RouteSet;
use error::{child, deserialize_at, index};
pub use error::{ConfigError, ConfigErrors, Problem};
pub use fault::FaultPolicy;
pub use rate_limit::RateLimitPolicy;
use raw::{RawDebug, RawHeaderMatch, RawMatch, RawRoute};
pub use retry::RetryPolicy;

/// The compiled plugin config.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// Names this plugin instance in metrics and logs.
    pub name: String,
    pub routes: RouteTable,
    pub rate_limits: Vec<RateLimitPolicy>,
    pub circuit_breakers: Vec<CircuitBreakerPolicy>,
    pub faults: Vec<FaultPolicy>,
    pub retries: Vec<RetryPolicy>,
    pub degradations: Vec<DegradationPolicy>,
    /// Every request attribute the routes and policies read, each once.
    pub attributes: AttributePlan,
    /// `content-type`, read only when a rejection must tell gRPC from plain HTTP.
    pub content_type: Option<AttributeId>,
    /// The fault-control headers (and secret headers) of every fault policy, each once: removed
    /// from every request that goes upstream, whatever its route and whether a policy applies.
    pub fault_control_headers: Vec<AttributeId>,
    pub debug: DebugOptions,
}

/// How many distinct fault-control headers (three fixed ones and each policy's secret header) a
/// config may use: a request's set of them fits one 64-bit mask.
pub const MAX_FAULT_CONTROL_HEADERS: usize = 64;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DebugOptions {
    pub route_header: bool,
}

impl Default for PluginConfig {
    /// The pass-through config: no routes, so no request is touched.
    fn default() -> Self {
        PluginConfig {
            name: DEFAULT_NAME.to_owned(),
            routes: RouteTable::default(),
            rate_limits: Vec::new(),
            circuit_breakers: Vec::new(),
            faults: Vec::new(),
            retries: Vec::new(),
            degradations: Vec::new(),
            attributes: AttributePlan::default(),
            content_type: None,
            fault_control_headers: Vec::new(),
            debug: DebugOptions::default(),
        }
    }
}

const DEFAULT_NAME: &str = "seawall";

/// At most this many fault policies on one route: which ones hold an active slot is a byte.
pub const MAX_FAULTS_PER_ROUTE: usize = 8;

/// The five policy kinds of the config contract, with the section that defines them and the field
/// a route uses to apply them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    RateLimit,
    CircuitBreaker,
    Retry,
    Fault,
    Degradation,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 5] = [
        PolicyKind::RateLimit,
        PolicyKind::CircuitBreaker,
        PolicyKind::Retry,
        PolicyKind::Fault,
        PolicyKind::Degradation,
    ];

    /// The top-level section that defines policies of this kind.
    pub fn section(self) -> &'static str {
        match self {
            PolicyKind::RateLimit => "rate_limits",
            PolicyKind::CircuitBreaker => "circuit_breakers",
            PolicyKind::Retry => "retries",
            PolicyKind::Fault => "faults",
            PolicyKind::Degradation => "degradation",
        }
    }

    /// What the operator calls one policy of this kind, for messages.
    pub fn noun(self) -> &'static str {
        match self {
            PolicyKind::RateLimit => "rate limit",
            PolicyKind::CircuitBreaker => "circuit breaker",
            PolicyKind::Retry => "retry",
            PolicyKind::Fault => "fault",
            PolicyKind::Degradation => "degradation",
        }
    }
}

const TOP_LEVEL_FIELDS: &str =
    "name, routes, rate_limits, circuit_breakers, retries, faults, degradation, debug";

/// Compiles a plugin config. Empty input (or only whitespace) is the pass-through config.
pub fn compile(bytes: &[u8]) -> Result<PluginConfig, ConfigErrors> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(PluginConfig::default());
    }
    let document: Value = serde_json::from_slice(bytes).map_err(|error| {
        ConfigErrors(vec![ConfigError::new(
            "",
            Problem::Syntax {
                message: error.to_string(),
            },
        )])
    })?;
    let Value::Object(fields) = document else {
        return Err(ConfigErrors(vec![ConfigError::invalid(
            "",
            format!("expected a JSON object, got {}", kind_of(&document)),
        )]));
    };
    Compiler::default().run(fields)
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Names appear in stat names (`seawall.<kind>.<name>.<counter>`) and shared-data keys, so they
/// are kept to characters that cannot split or escape either.
fn check_name(path: &str, name: &str) -> Result<(), ConfigError> {
    let well_formed = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if well_formed {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            path,
            format!("expected a name of 1 to 64 letters, digits, '-' or '_', got {name:?}"),
        ))
    }
}

#[derive(Default)]
struct Compiler {
    errors: Vec<ConfigError>,
    attributes: AttributePlan,
    /// Names defined in each policy section, in `PolicyKind::ALL` order.
    defined: [Vec<String>; 5],
    rate_limits: Vec<RateLimitPolicy>,
    circuit_breakers: Vec<CircuitBreakerPolicy>,
    faults: Vec<FaultPolicy>,
    retries: Vec<RetryPolicy>,
    degradations: Vec<DegradationPolicy>,
    /// The plugin's name, which scopes its shared-data keys.
    plugin: String,
}

impl Compiler {
    fn run(mut self, mut fields: Map<String, Value>) -> Result<PluginConfig, ConfigErrors> {
        let known = [
            "name",
            "routes",
            "rate_limits",
            "circuit_breakers",
            "retries",
            "faults",
            "degradation",
            "debug",
        ];
        for key in fields.keys() {
            if !known.contains(&key.as_str()) {
                self.errors.push(ConfigError::invalid(
                    key.clone(),
                    format!("unknown field, expected one of {TOP_LEVEL_FIELDS}"),
                ));
            }
        }

        let name = match fields.remove("name") {
            None => DEFAULT_NAME.to_owned(),
            Some(Value::String(name)) => {
                self.note(check_name("name", &name));
                name
            }
            Some(other) => {
                self.errors.push(ConfigError::invalid(
                    "name",
                    format!("expected a string, got {}", kind_of(&other)),
                ));
                DEFAULT_NAME.to_owned()
            }
        };

        self.plugin.clone_from(&name);
        let debug = match fields.remove("debug") {
            None => DebugOptions::default(),
            Some(value) => match deserialize_at::<RawDebug>("debug", value) {
                Ok(raw) => DebugOptions {
                    route_header: raw.route_header,
                },
                Err(error) => {
                    self.errors.push(error);
                    DebugOptions::default()
                }
            },
        };

        for (slot, kind) in PolicyKind::ALL.into_iter().enumerate() {
            if let Some(section) = fields.remove(kind.section()) {
                self.defined[slot] = self.policy_section(kind, section);
            }
        }

        let routes = match fields.remove("routes") {
            None => Vec::new(),
            Some(Value::Array(routes)) => self.routes(routes),
            Some(other) => {
                self.errors.push(ConfigError::invalid(
                    "routes",
                    format!("expected an array of routes, got {}", kind_of(&other)),
                ));
                Vec::new()
            }
        };

        self.resolve_degradation_routes(&routes);
        let rejects = !self.rate_limits.is_empty()
            || !self.circuit_breakers.is_empty()
            || !self.degradations.is_empty()
            || self
                .faults
                .iter()
                .any(|f| f.abort.is_some() || f.header_control.is_some());
        let content_type = if !rejects {
            None
        } else {
            self.attribute("", Attribute::header("content-type"))
        };
        let mut fault_control_headers: Vec<AttributeId> = Vec::new();
        for control in self.faults.iter().filter_map(|f| f.header_control.as_ref()) {
            for id in control.headers() {
                if !fault_control_headers.contains(&id) {
                    fault_control_headers.push(id);
                }
            }
        }
        if fault_control_headers.len() > MAX_FAULT_CONTROL_HEADERS {
            self.errors.push(ConfigError::invalid(
                "faults",
                format!(
                    "expected at most {} distinct header_control.secret_header names, got {}",
                    MAX_FAULT_CONTROL_HEADERS - 3,
                    fault_control_headers.len() - 3
                ),
            ));
        }
        if !self.errors.is_empty() {
            return Err(ConfigErrors(self.errors));
        }
        Ok(PluginConfig {
            name,
            routes: RouteTable::new(routes),
            rate_limits: self.rate_limits,
            circuit_breakers: self.circuit_breakers,
            faults: self.faults,
            retries: self.retries,
            degradations: self.degradations,
            attributes: self.attributes,
            content_type,
            fault_control_headers,
            debug,
        })
    }

    fn note(&mut self, result: Result<(), ConfigError>) {
        if let Err(error) = result {
            self.errors.push(error);
        }
    }

    /// Checks the names in one policy section and compiles each policy; returns the names defined.
    fn policy_section(&mut self, kind: PolicyKind, section: Value) -> Vec<String> {
        let path = kind.section();
        let Value::Object(policies) = section else {
            self.errors.push(ConfigError::invalid(
                path,
                format!(
                    "expected an object of named {} policies, got {}",
                    kind.noun(),
                    kind_of(&section)
                ),
            ));
            return Vec::new();
        };
        let mut names = Vec::with_capacity(policies.len());
        for (name, body) in policies {
            let policy_path = child(path, &name);
            if let Err(error) = check_name(&policy_path, &name) {
                self.errors.push(error);
            } else if kind == PolicyKind::RateLimit {
                self.rate_limit(&policy_path, &name, body);
            } else if kind == PolicyKind::CircuitBreaker {
                self.circuit_breaker(&policy_path, &name, body);
            } else if kind == PolicyKind::Fault {
                self.fault(&policy_path, &name, body);
            } else if kind == PolicyKind::Retry {
                self.retry(&policy_path, &name, body);
            } else {
                self.degradation(&policy_path, &name, body);
            }
            names.push(name);
        }
        names
    }

    fn rate_limit(&mut self, path: &str, name: &str, body: Value) {
        let compiled = deserialize_at(path, body)
            .map_err(|error| vec![error])
            .and_then(|raw| {
                rate_limit::compile(path, &self.plugin, name, raw, &mut self.attributes)
            });
        match compiled {
            Ok(policy) => self.rate_limits.push(policy),
            Err(errors) => self.errors.extend(errors),
        }
    }

    fn circuit_breaker(&mut self, path: &str, name: &str, body: Value) {
        let compiled = deserialize_at(path, body)
            .map_err(|error| vec![error])
            .and_then(|raw| {
                circuit_breaker::compile(path, &self.plugin, name, raw, &mut self.attributes)
            });
        match compiled {
            Ok(policy) => self.circuit_breakers.push(policy),
            Err(errors) => self.errors.extend(errors),
        }
    }

    fn retry(&mut self, path: &str, name: &str, body: Value) {
        let compiled = deserialize_at(path, body)
            .map_err(|error| vec![error])
            .and_then(|raw| retry::compile(path, &self.plugin, name, raw, &mut self.attributes));
        match compiled {
            Ok(policy) => self.retries.push(policy),
            Err(errors) => self.errors.extend(errors),
        }
    }

    fn degradation(&mut self, path: &str, name: &str, body: Value) {
        let compiled = deserialize_at(path, body)
            .map_err(|error| vec![error])
            .and_then(|raw| {
                degradation::compile(path, &self.plugin, name, raw, &mut self.attributes)
            });
        match compiled {
            Ok(policy) => {
                if let Some(breaker) = &policy.breaker {
                    if !self.circuit_breakers.iter().any(|b| &b.name == breaker) {
                        self.errors.push(ConfigError::new(
                            child(&child(path, "signals"), "circuit_breaker"),
                            Problem::UnknownPolicy {
                                kind: PolicyKind::CircuitBreaker.noun(),
                                name: breaker.clone(),
                            },
                        ));
                    }
                }
                self.degradations.push(policy);
            }
            Err(errors) => self.errors.extend(errors),
        }
    }

    /// Turns the route names of fallbacks and reroutes into route indices (each must be a route
    /// that applies the policy), and gives each route under admission control its record.
    fn resolve_degradation_routes(&mut self, routes: &[Route]) {
        let plugin = self.plugin.clone();
        for (policy_index, policy) in self.degradations.iter_mut().enumerate() {
            let path = child(PolicyKind::Degradation.section(), &policy.name);
            let users: Vec<(u16, &str)> = routes
                .iter()
                .enumerate()
                .filter(|(_, route)| {
                    route
                        .policies
                        .degradation
                        .is_some_and(|d| d.policy == policy_index)
                })
                .filter_map(|(at, route)| Some((u16::try_from(at).ok()?, route.name.as_str())))
                .collect();
            for (position, level) in policy.levels.iter_mut().enumerate() {
                let level_path = index(&child(&path, "levels"), position);
                let sets = [
                    ("fallback", level.fallback.as_mut().map(|f| &mut f.routes)),
                    ("reroute", level.reroute.as_mut().map(|r| &mut r.routes)),
                ];
                for (field, set) in sets {
                    let Some(set) = set else { continue };
                    let RouteSet::Named(names) = set else {
                        continue;
                    };
                    let mut found = Vec::with_capacity(names.len());
                    for (at, name) in names.iter().enumerate() {
                        match users.iter().find(|(_, user)| user == name) {
                            Some(&(route, _)) => found.push(route),
                            None => self.errors.push(ConfigError::invalid(
                                index(&child(&child(&level_path, field), "routes"), at),
                                format!(
                                    "expected the name of a route with \"degradation\": \"{}\", got {name:?}",
                                    policy.name
                                ),
                            )),
                        }
                    }
                    *set = RouteSet::Only(found);
                }
            }
            if let Some(admission) = &mut policy.admission {
                admission.routes = users
                    .iter()
                    .map(|&(route, name)| {
                        (
                            route,
                            format!("sw:{plugin}:deg:{}:admit:{name}", policy.name),
                        )
                    })
                    .collect();
            }
        }
    }

    fn fault(&mut self, path: &str, name: &str, body: Value) {
        let raw: fault::RawFault = match deserialize_at(path, body) {
            Ok(raw) => raw,
            Err(error) => {
                self.errors.push(error);
                return;
            }
        };
        let compiled = fault::compile(path, &self.plugin, name, &raw, &mut self.attributes);
        let when_path = child(&child(path, "when"), "headers");
        let when: Vec<Condition> = raw
            .when
            .headers
            .iter()
            .enumerate()
            .filter_map(|(position, header)| {
                self.header_condition(&index(&when_path, position), header)
            })
            .collect();
        match compiled {
            Ok(mut policy) => {
                policy.when = when;
                self.faults.push(policy);
            }
            Err(errors) => self.errors.extend(errors),
        }
    }

    fn routes(&mut self, raw_routes: Vec<Value>) -> Vec<Route> {
        let mut routes: Vec<Route> = Vec::with_capacity(raw_routes.len());
        for (position, value) in raw_routes.into_iter().enumerate() {
            let path = index("routes", position);
            let raw: RawRoute = match deserialize_at(&path, value) {
                Ok(raw) => raw,
                Err(error) => {
                    self.errors.push(error);
                    continue;
                }
            };
            self.note(check_name(&child(&path, "name"), &raw.name));
            if routes.iter().any(|r| r.name == raw.name) {
                self.errors.push(ConfigError::new(
                    child(&path, "name"),
                    Problem::Duplicate {
                        name: raw.name.clone(),
                    },
                ));
            }
            let conditions = self.conditions(&child(&path, "match"), &raw.matcher);
            let policies = self.route_policies(&path, &raw);
            routes.push(Route {
                name: raw.name,
                conditions,
                policies,
            });
        }
        routes
    }

    fn route_policies(&mut self, path: &str, raw: &RawRoute) -> RoutePolicies {
        let mut policies = RoutePolicies::default();
        let single = |name: &Option<String>| name.iter().cloned().collect::<Vec<_>>();
        let references: [(PolicyKind, &str, Vec<String>, bool); 5] = [
            (
                PolicyKind::RateLimit,
                "rate_limits",
                raw.rate_limits.clone(),
                true,
            ),
            (
                PolicyKind::CircuitBreaker,
                "circuit_breaker",
                single(&raw.circuit_breaker),
                false,
            ),
            (PolicyKind::Retry, "retry", single(&raw.retry), false),
            (PolicyKind::Fault, "faults", raw.faults.clone(), true),
            (
                PolicyKind::Degradation,
                "degradation",
                single(&raw.degradation),
                false,
            ),
        ];
        for (slot, (kind, field, names, is_list)) in references.into_iter().enumerate() {
            for (position, name) in names.into_iter().enumerate() {
                let reference_path = if is_list {
                    index(&child(path, field), position)
                } else {
                    child(path, field)
                };
                match self.defined[slot]
                    .iter()
                    .position(|defined| *defined == name)
                {
                    Some(_) if kind == PolicyKind::RateLimit => {
                        // Index among the policies that compiled; a broken one already has its error.
                        let compiled = self.rate_limits.iter().position(|p| p.name == name);
                        if policies.rate_limits.iter().any(|&p| Some(p) == compiled) {
                            self.errors.push(ConfigError::new(
                                reference_path,
                                Problem::Duplicate { name },
                            ));
                        } else if let Some(found) = compiled {
                            policies.rate_limits.push(found);
                        }
                    }
                    Some(_) if kind == PolicyKind::Retry => {
                        policies.retry = self.retries.iter().position(|p| p.name == name);
                    }
                    Some(_) if kind == PolicyKind::Fault => {
                        let compiled = self.faults.iter().position(|p| p.name == name);
                        if policies.faults.iter().any(|&p| Some(p) == compiled) {
                            self.errors.push(ConfigError::new(
                                reference_path,
                                Problem::Duplicate { name },
                            ));
                        } else if let Some(found) = compiled {
                            policies.faults.push(found);
                        }
                    }
                    Some(_) if kind == PolicyKind::CircuitBreaker => {
                        if let Some(policy) =
                            self.circuit_breakers.iter().position(|p| p.name == name)
                        {
                            let record = self.circuit_breakers[policy].route_record(&raw.name);
                            policies.circuit_breaker = Some(RouteBreaker { policy, record });
                        }
                    }
                    Some(_) if kind == PolicyKind::Degradation => {
                        if let Some(policy) = self.degradations.iter().position(|p| p.name == name)
                        {
                            let priority = self.route_priority(path, raw, policy);
                            policies.degradation = Some(RouteDegradation { policy, priority });
                        }
                    }
                    Some(_) => {}
                    None => self.errors.push(ConfigError::new(
                        reference_path,
                        Problem::UnknownPolicy {
                            kind: kind.noun(),
                            name,
                        },
                    )),
                }
            }
        }
        if raw.priority.is_some() && raw.degradation.is_none() {
            self.errors.push(ConfigError::invalid(
                child(path, "priority"),
                "expected a \"degradation\" policy on the route: priorities are its classes",
            ));
        }
        if raw.faults.len() > MAX_FAULTS_PER_ROUTE {
            self.errors.push(ConfigError::invalid(
                child(path, "faults"),
                format!(
                    "expected at most {MAX_FAULTS_PER_ROUTE} faults on one route, got {}",
                    raw.faults.len()
                ),
            ));
        }
        if raw.rate_limits.len() > rate_limit::MAX_LIMITS_PER_ROUTE {
            self.errors.push(ConfigError::invalid(
                child(path, "rate_limits"),
                format!(
                    "expected at most {} rate limits on one route, got {}",
                    rate_limit::MAX_LIMITS_PER_ROUTE,
                    raw.rate_limits.len()
                ),
            ));
        }
        policies
    }

    /// The priority class a route gives all its requests, checked against its policy's classes.
    fn route_priority(&mut self, path: &str, raw: &RawRoute, policy: usize) -> Option<u8> {
        let class = raw.priority.as_ref()?;
        let priority = &self.degradations.get(policy)?.priority;
        let found = priority.class(class);
        if found.is_none() {
            self.errors.push(ConfigError::invalid(
                child(path, "priority"),
                format!(
                    "expected one of the priority classes {}, got {class:?}",
                    priority.classes.join(", ")
                ),
            ));
        }
        found
    }

    fn attribute(&mut self, path: &str, attribute: Attribute) -> Option<AttributeId> {
        match self.attributes.intern(attribute) {
            Ok(id) => Some(id),
            Err(error) => {
                self.errors
                    .push(ConfigError::invalid(path, error.to_string()));
                None
            }
        }
    }

    fn conditions(&mut self, path: &str, raw: &RawMatch) -> Vec<Condition> {
        let mut conditions = Vec::new();
        // Cheap, selective pseudo-header tests first: most requests are rejected by path or method
        // before any custom header or property is read.
        if let Some(path_match) = &raw.path {
            let at = child(path, "path");
            let (exact, prefix) = (&path_match.exact, &path_match.prefix);
            match (exact, prefix) {
                (Some(value), None) | (None, Some(value)) if !value.starts_with('/') => {
                    self.errors.push(ConfigError::invalid(
                        child(&at, if exact.is_some() { "exact" } else { "prefix" }),
                        format!("expected a path starting with '/', got {value:?}"),
                    ));
                }
                (Some(value), None) => {
                    if let Some(id) = self.attribute(&at, Attribute::path()) {
                        conditions.push(Condition::PathExact {
                            path: id,
                            value: value.as_bytes().to_vec(),
                        });
                    }
                }
                (None, Some(value)) => {
                    if let Some(id) = self.attribute(&at, Attribute::path()) {
                        conditions.push(Condition::PathPrefix {
                            path: id,
                            value: value.as_bytes().to_vec(),
                        });
                    }
                }
                _ => self.errors.push(ConfigError::invalid(
                    at,
                    "expected exactly one of \"exact\" or \"prefix\"",
                )),
            }
        }

        if let Some(methods) = &raw.methods {
            let at = child(path, "methods");
            if methods.is_empty() {
                self.errors.push(ConfigError::invalid(
                    &at,
                    "expected at least one method (leave \"methods\" out to match any)",
                ));
            }
            let mut allowed = Vec::with_capacity(methods.len());
            for (position, method) in methods.iter().enumerate() {
                let is_token = !method.is_empty()
                    && method.bytes().all(|b| b.is_ascii_uppercase() || b == b'-');
                if is_token {
                    allowed.push(method.as_bytes().to_vec());
                } else {
                    self.errors.push(ConfigError::invalid(
                        index(&at, position),
                        format!("expected an uppercase HTTP method like \"GET\", got {method:?}"),
                    ));
                }
            }
            if let Some(id) = self.attribute(&at, Attribute::method()) {
                conditions.push(Condition::MethodIn {
                    method: id,
                    methods: allowed,
                });
            }
        }

        if let Some(authority) = &raw.authority {
            let at = child(path, "authority");
            if authority.is_empty()
                || authority
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b == b'/')
            {
                self.errors.push(ConfigError::invalid(
                    &at,
                    format!("expected a host name, optionally with a port, got {authority:?}"),
                ));
            } else if let Some(id) = self.attribute(&at, Attribute::authority()) {
                let with_port = authority.contains("]:")
                    || (!authority.starts_with('[') && authority.contains(':'));
                conditions.push(Condition::Authority {
                    authority: id,
                    host: authority.as_bytes().to_vec(),
                    with_port,
                });
            }
        }

        for (position, header) in raw.headers.iter().enumerate() {
            let at = index(&child(path, "headers"), position);
            if let Some(condition) = self.header_condition(&at, header) {
                conditions.push(condition);
            }
        }

        let properties = [
            ("route_name", &raw.route_name, Attribute::route_name()),
            ("cluster", &raw.cluster, Attribute::cluster_name()),
        ];
        for (field, value, attribute) in properties {
            if let Some(value) = value {
                let at = child(path, field);
                if value.is_empty() {
                    self.errors
                        .push(ConfigError::invalid(&at, "expected a non-empty name"));
                } else if let Some(id) = self.attribute(&at, attribute) {
                    conditions.push(Condition::Equals {
                        attribute: id,
                        value: value.as_bytes().to_vec(),
                    });
                }
            }
        }
        conditions
    }

    fn header_condition(&mut self, at: &str, header: &RawHeaderMatch) -> Option<Condition> {
        let valid_name = !header.name.is_empty()
            && header
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !valid_name {
            self.errors.push(ConfigError::invalid(
                child(at, "name"),
                format!("expected an HTTP header name, got {:?}", header.name),
            ));
            return None;
        }
        let attribute = self.attribute(at, Attribute::header(&header.name))?;
        match (&header.exact, &header.prefix, header.present) {
            (Some(value), None, None) => Some(Condition::Equals {
                attribute,
                value: value.as_bytes().to_vec(),
            }),
            (None, Some(value), None) => Some(Condition::StartsWith {
                attribute,
                value: value.as_bytes().to_vec(),
            }),
            (None, None, Some(true)) => Some(Condition::Present { attribute }),
            (None, None, Some(false)) => Some(Condition::Absent { attribute }),
            _ => {
                self.errors.push(ConfigError::invalid(
                    at,
                    "expected exactly one of \"exact\", \"prefix\" or \"present\"",
                ));
                None
            }
        }
    }
}
