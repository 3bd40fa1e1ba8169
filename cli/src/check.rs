//! `seawall check`: the filter's own verdict on a config, then the traps a valid config can hold.
//!
//! The verdict is exactly the filter's, because it runs the filter's own steps natively: compile
//! the JSON, define the engine's metrics, create its shared-data keys (on a fake store). The
//! warnings are for configs that load but probably do not do what their author meant; each names
//! its JSON path and says in one line why. They read the raw JSON (what the operator wrote) and
//! the compiled config (what the filter will do), never a third interpretation of the text.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Map, Value};

use seawall::config::{compile, ConfigError, PluginConfig};
use seawall::engine::Engine;
use seawall::metrics::FakeMetrics;
use seawall::policy::rate_limit::Buckets;
use seawall::state::fake::FakeStore;

use crate::input::Found;

/// Measured on Envoy 1.40 with 2 workers (see `config/rate_limit.rs`): 100,000 shared-data keys
/// grew Envoy's heap by about 8 MB, and 1,000,000 by 92 MB.
const HEAP_BYTES_PER_KEY: u64 = 85;
/// Above this many shared-data keys in one config, say what they cost.
const LARGE_KEY_COUNT: usize = 50_000;

/// A valid config that is probably not what was meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub path: String,
    pub message: String,
}

/// What checking one plugin config found.
pub struct Checked {
    pub found: Found,
    pub result: Result<Summary, Vec<ConfigError>>,
    pub warnings: Vec<Warning>,
}

/// A loaded config, in numbers.
pub struct Summary {
    pub name: String,
    pub routes: usize,
    pub policies: usize,
    pub shared_keys: usize,
}

/// A secret for the fake store: the real one is random per deployment, and nothing checked here
/// depends on it.
pub const CHECK_SECRET: u64 = 0x5ea_c4ec;

/// The filter's `on_configure`, natively: compile, define metrics, create the shared-data keys.
pub fn load(json: &str) -> Result<(Engine, FakeStore), Vec<ConfigError>> {
    let config = compile(json.as_bytes()).map_err(|errors| errors.0)?;
    let mut metrics = FakeMetrics::new();
    let engine = Engine::new(config, &mut metrics)
        .map_err(|error| vec![ConfigError::invalid("", error.to_string())])?;
    let store = FakeStore::new();
    engine
        .prepare_state(&store, CHECK_SECRET)
        .map_err(|error| vec![ConfigError::invalid("", format!("shared data: {error}"))])?;
    Ok((engine, store))
}

pub fn check(found: Found) -> Checked {
    let (result, warnings) = match load(&found.json) {
        Err(errors) => (Err(errors), Vec::new()),
        Ok((engine, store)) => {
            let config = engine.config();
            let raw: Map<String, Value> = match serde_json::from_str(&found.json) {
                Ok(Value::Object(raw)) => raw,
                _ => Map::new(),
            };
            let warnings = lint(&raw, config, &store, found.internal_only_headers.as_deref());
            let summary = Summary {
                name: config.name.clone(),
                routes: config.routes.len(),
                policies: config.rate_limits.len()
                    + config.circuit_breakers.len()
                    + config.retries.len()
                    + config.faults.len()
                    + config.degradations.len(),
                shared_keys: store.key_count(),
            };
            (Ok(summary), warnings)
        }
    };
    Checked {
        found,
        result,
        warnings,
    }
}

/// Every warning for a config that compiled.
pub fn lint(
    raw: &Map<String, Value>,
    config: &PluginConfig,
    store: &FakeStore,
    internal_only_headers: Option<&[String]>,
) -> Vec<Warning> {
    let mut warnings = Vec::new();
    let routes = raw_routes(raw);
    shadowed_routes(&routes, &mut warnings);
    unused_policies(raw, &routes, &mut warnings);
    min_requests_unreachable(raw, config, &routes, &mut warnings);
    faults_without_end(raw, &mut warnings);
    large_shared_data(config, store, &mut warnings);
    levels_without_exit(raw, &mut warnings);
    retries_without_budget(raw, &mut warnings);
    if let Some(internal) = internal_only_headers {
        reroute_headers_not_internal(config, internal, &mut warnings);
    }
    warnings
}

fn warn(warnings: &mut Vec<Warning>, path: impl Into<String>, message: impl Into<String>) {
    warnings.push(Warning {
        path: path.into(),
        message: message.into(),
    });
}

fn raw_routes(raw: &Map<String, Value>) -> Vec<&Map<String, Value>> {
    raw.get("routes")
        .and_then(Value::as_array)
        .map(|routes| routes.iter().filter_map(Value::as_object).collect())
        .unwrap_or_default()
}

fn route_name(route: &Map<String, Value>) -> &str {
    route.get("name").and_then(Value::as_str).unwrap_or("?")
}

fn sections<'a>(raw: &'a Map<String, Value>, section: &str) -> Vec<(&'a str, &'a Value)> {
    raw.get(section)
        .and_then(Value::as_object)
        .map(|all| all.iter().map(|(k, v)| (k.as_str(), v)).collect())
        .unwrap_or_default()
}

/// A route that an earlier route always takes first: whatever matches it matches the earlier
/// one, and the first match wins. A catch-all (no `match`) before the end is the common case.
fn shadowed_routes(routes: &[&Map<String, Value>], warnings: &mut Vec<Warning>) {
    for (later, route) in routes.iter().enumerate() {
        let Some(earlier) =
            (0..later).find(|&e| implies(route_match(route), route_match(routes[e])))
        else {
            continue;
        };
        let why = if route_match(routes[earlier]).is_empty() {
            "is a catch-all (no conditions)"
        } else {
            "matches every request it would"
        };
        warn(
            warnings,
            format!("routes[{later}]"),
            format!(
                "route \"{}\" never matches: routes[{earlier}] (\"{}\") {why}, and the first match wins",
                route_name(route),
                route_name(routes[earlier])
            ),
        );
    }
}

fn route_match(route: &Map<String, Value>) -> Map<String, Value> {
    route
        .get("match")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

/// Whether every request satisfying `specific` also satisfies `general` (conservatively: false
/// when unsure).
fn implies(specific: Map<String, Value>, general: Map<String, Value>) -> bool {
    let text = |m: &Map<String, Value>, a: &str, b: &str| {
        m.get(a)
            .and_then(|v| v.get(b))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    // Path.
    if general.contains_key("path") {
        let (g_exact, g_prefix) = (
            text(&general, "path", "exact"),
            text(&general, "path", "prefix"),
        );
        let (s_exact, s_prefix) = (
            text(&specific, "path", "exact"),
            text(&specific, "path", "prefix"),
        );
        let holds = match (g_exact, g_prefix) {
            (Some(g), None) => s_exact.as_deref() == Some(g.as_str()),
            (None, Some(g)) => s_exact
                .or(s_prefix)
                .is_some_and(|s| s.starts_with(g.as_str())),
            _ => false,
        };
        if !holds {
            return false;
        }
    }
    // Methods: the specific set within the general one.
    if let Some(general_methods) = general.get("methods").and_then(Value::as_array) {
        let Some(specific_methods) = specific.get("methods").and_then(Value::as_array) else {
            return false;
        };
        if !specific_methods.iter().all(|m| general_methods.contains(m)) {
            return false;
        }
    }
    // Equal-valued single conditions.
    for field in ["authority", "route_name", "cluster"] {
        if let Some(value) = general.get(field) {
            let same = match (value.as_str(), specific.get(field).and_then(Value::as_str)) {
                (Some(g), Some(s)) => g.eq_ignore_ascii_case(s),
                _ => false,
            };
            if !same {
                return false;
            }
        }
    }
    // Each general header condition implied by one of the specific route's.
    let headers = |m: &Map<String, Value>| -> Vec<Map<String, Value>> {
        m.get("headers")
            .and_then(Value::as_array)
            .map(|all| all.iter().filter_map(Value::as_object).cloned().collect())
            .unwrap_or_default()
    };
    let specific_headers = headers(&specific);
    headers(&general).iter().all(|g| {
        let name = g
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase);
        specific_headers.iter().any(|s| {
            let same_name = s
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_ascii_lowercase)
                == name;
            let (s_exact, s_prefix, s_present) = (
                s.get("exact").and_then(Value::as_str),
                s.get("prefix").and_then(Value::as_str),
                s.get("present").and_then(Value::as_bool),
            );
            same_name
                && if let Some(g) = g.get("exact").and_then(Value::as_str) {
                    s_exact == Some(g)
                } else if let Some(g) = g.get("prefix").and_then(Value::as_str) {
                    s_exact.or(s_prefix).is_some_and(|s| s.starts_with(g))
                } else if let Some(g) = g.get("present").and_then(Value::as_bool) {
                    if g {
                        s_exact.is_some() || s_prefix.is_some() || s_present == Some(true)
                    } else {
                        s_present == Some(false)
                    }
                } else {
                    false
                }
        })
    })
}

/// A policy that no route applies does nothing (a breaker a degradation policy watches is used).
fn unused_policies(
    raw: &Map<String, Value>,
    routes: &[&Map<String, Value>],
    warnings: &mut Vec<Warning>,
) {
    let mut used: BTreeSet<(String, String)> = BTreeSet::new();
    for route in routes {
        for (field, section) in [
            ("rate_limits", "rate_limits"),
            ("circuit_breaker", "circuit_breakers"),
            ("retry", "retries"),
            ("faults", "faults"),
            ("degradation", "degradation"),
        ] {
            match route.get(field) {
                Some(Value::String(name)) => {
                    used.insert((section.to_owned(), name.clone()));
                }
                Some(Value::Array(names)) => {
                    for name in names.iter().filter_map(Value::as_str) {
                        used.insert((section.to_owned(), name.to_owned()));
                    }
                }
                _ => {}
            }
        }
    }
    for (_, policy) in sections(raw, "degradation") {
        if let Some(breaker) = policy
            .pointer("/signals/circuit_breaker")
            .and_then(Value::as_str)
        {
            used.insert(("circuit_breakers".to_owned(), breaker.to_owned()));
        }
    }
    for section in [
        "rate_limits",
        "circuit_breakers",
        "retries",
        "faults",
        "degradation",
    ] {
        for (name, _) in sections(raw, section) {
            if !used.contains(&(section.to_owned(), name.to_owned())) {
                warn(
                    warnings,
                    format!("{section}.{name}"),
                    "defined but no route applies it, so it does nothing",
                );
            }
        }
    }
}

/// `min_requests` that the routes' own rate limits never let into one window: the rate rules
/// (failure_rate, slow_call_rate, p95_latency) are then never judged.
fn min_requests_unreachable(
    raw: &Map<String, Value>,
    config: &PluginConfig,
    routes: &[&Map<String, Value>],
    warnings: &mut Vec<Warning>,
) {
    // The most requests the unkeyed limits of `users` let through in `window`, or None when one
    // of them has no unkeyed limit (then nothing bounds the traffic).
    let bound = |users: &[&Map<String, Value>], window: Duration| -> Option<(u64, String)> {
        if users.is_empty() {
            return None;
        }
        let mut limits: BTreeSet<usize> = BTreeSet::new();
        for route in users {
            let tightest = route
                .get("rate_limits")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .filter_map(|name| config.rate_limits.iter().position(|p| p.name == name))
                .filter(|&p| matches!(config.rate_limits[p].buckets, Buckets::Single { .. }))
                .min_by_key(|&p| capacity(config, p, window))?;
            limits.insert(tightest);
        }
        let total = limits.iter().map(|&p| capacity(config, p, window)).sum();
        let named = limits
            .iter()
            .map(|&p| {
                let policy = &config.rate_limits[p];
                format!(
                    "{} ({}, burst {})",
                    policy.name,
                    policy.rate,
                    policy.gcra.burst()
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        Some((total, named))
    };
    let users_of = |field: &str, name: &str| -> Vec<&Map<String, Value>> {
        routes
            .iter()
            .copied()
            .filter(|r| r.get(field).and_then(Value::as_str) == Some(name))
            .collect()
    };
    for policy in &config.circuit_breakers {
        let rules = policy.breaker.rules;
        if rules.failure_rate_ppm.is_none() && rules.slow_call_rate_ppm.is_none() {
            continue;
        }
        let window = Duration::from_nanos(
            rules
                .bucket_nanos
                .saturating_mul(seawall::policy::circuit_breaker::WINDOW_BUCKETS as u64),
        );
        let users = users_of("circuit_breaker", &policy.name);
        if let Some((most, limits)) = bound(&users, window) {
            if u64::from(rules.min_requests) > most {
                warn(
                    warnings,
                    format!("circuit_breakers.{}.open_when.min_requests", policy.name),
                    format!(
                        "{} requests per {} window can never be reached: its routes' rate limits let at most {most} through ({limits}), so failure_rate and slow_call_rate never open the breaker",
                        rules.min_requests,
                        seawall::config::units::TimeSpan::from_duration(window)
                    ),
                );
            }
        }
    }
    for (name, policy) in sections(raw, "degradation") {
        let signals = policy.get("signals");
        let min_requests = signals
            .and_then(|s| s.get("min_requests"))
            .and_then(Value::as_u64)
            .unwrap_or(20);
        let window = signals
            .and_then(|s| s.get("window"))
            .and_then(Value::as_str)
            .and_then(|w| seawall::config::units::TimeSpan::parse(w).ok())
            .map_or(Duration::from_secs(10), |w| w.as_duration());
        let rated = policy
            .get("levels")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|level| {
                let enter = level.get("enter");
                enter.and_then(|e| e.get("failure_rate")).is_some()
                    || enter.and_then(|e| e.get("p95_latency")).is_some()
            });
        if !rated {
            continue;
        }
        let users = users_of("degradation", name);
        if let Some((most, limits)) = bound(&users, window) {
            if min_requests > most {
                warn(
                    warnings,
                    format!("degradation.{name}.signals.min_requests"),
                    format!(
                        "{min_requests} requests per {} window can never be reached: its routes' rate limits let at most {most} through ({limits}), so failure_rate and p95_latency never enter a level",
                        seawall::config::units::TimeSpan::from_duration(window)
                    ),
                );
            }
        }
    }
}

/// Requests a single-bucket limit lets through in `window`: its burst, plus what refills.
fn capacity(config: &PluginConfig, policy: usize, window: Duration) -> u64 {
    let policy = &config.rate_limits[policy];
    let refilled = (policy.rate.per_second() * window.as_secs_f64()).floor() as u64;
    u64::from(policy.gcra.burst()) + refilled
}

/// A fault that injects with no end time runs until someone edits the config; an end in the past
/// means it injects nothing.
fn faults_without_end(raw: &Map<String, Value>, warnings: &mut Vec<Warning>) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    for (name, fault) in sections(raw, "faults") {
        if fault.get("enabled") == Some(&Value::Bool(false)) {
            continue;
        }
        let injects = ["abort", "delay", "response"]
            .iter()
            .any(|k| fault.get(*k).is_some());
        if !injects {
            continue;
        }
        let end = fault.pointer("/active_between/end").and_then(Value::as_str);
        match end.and_then(seawall::policy::fault::parse_rfc3339) {
            None => warn(
                warnings,
                format!("faults.{name}"),
                "injects faults with no end time: add \"active_between\": {\"end\": ...} so a forgotten experiment stops by itself",
            ),
            Some(end) if end <= now => warn(
                warnings,
                format!("faults.{name}.active_between.end"),
                format!("{} has passed: the fault injects nothing", end_text(end)),
            ),
            Some(_) => {}
        }
    }
}

fn end_text(nanos: u64) -> String {
    format!("the end time ({}s after the epoch)", nanos / 1_000_000_000)
}

/// Every slot of a keyed policy is a shared-data key that lives as long as Envoy and that every
/// worker creates at configure time.
fn large_shared_data(config: &PluginConfig, store: &FakeStore, warnings: &mut Vec<Warning>) {
    let snapshot = store.snapshot();
    let cost = |prefix: &str| -> (usize, u64) {
        let keys: Vec<&(String, Vec<u8>)> = snapshot
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .collect();
        let bytes = keys
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum::<u64>();
        (keys.len(), bytes)
    };
    let mut policies: Vec<(String, String)> = Vec::new();
    for policy in &config.rate_limits {
        policies.push((
            format!("rate_limits.{}.max_keys", policy.name),
            format!("sw:{}:rl:{}:", config.name, policy.name),
        ));
    }
    for policy in &config.circuit_breakers {
        if policy.table.is_some() {
            policies.push((
                format!("circuit_breakers.{}.max_keys", policy.name),
                format!("sw:{}:cb:{}:", config.name, policy.name),
            ));
        }
    }
    for (path, prefix) in policies {
        let (keys, bytes) = cost(&prefix);
        if keys >= LARGE_KEY_COUNT {
            warn(warnings, path, describe_cost(keys, bytes));
        }
    }
    let total = snapshot.len();
    if total >= 2 * LARGE_KEY_COUNT {
        let bytes = snapshot
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum();
        warn(
            warnings,
            "",
            format!("the whole config: {}", describe_cost(total, bytes)),
        );
    }
}

fn describe_cost(keys: usize, bytes: u64) -> String {
    let heap = keys as u64 * HEAP_BYTES_PER_KEY + bytes;
    format!(
        "{keys} shared-data keys ({} of keys and values, about {} of Envoy heap with its map overhead) that live as long as Envoy and that every worker creates at configure time (100,000 keys took about 2 s to start on 2 workers)",
        human_bytes(bytes),
        human_bytes(heap)
    )
}

fn human_bytes(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    } else if bytes >= 1 << 10 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

/// A level entered on a rate or latency threshold with no lower exit threshold leaves as soon as
/// the signal dips below the enter threshold, and can flap every `min_dwell`.
fn levels_without_exit(raw: &Map<String, Value>, warnings: &mut Vec<Warning>) {
    for (name, policy) in sections(raw, "degradation") {
        let levels = policy.get("levels").and_then(Value::as_array);
        for (position, level) in levels.into_iter().flatten().enumerate() {
            let enter = level.get("enter");
            let exit = level.get("exit");
            let path = format!("degradation.{name}.levels[{position}]");
            let level_name = level.get("name").and_then(Value::as_str).unwrap_or("?");
            let thresholds: Vec<&str> = ["failure_rate", "p95_latency"]
                .into_iter()
                .filter(|k| enter.and_then(|e| e.get(*k)).is_some())
                .collect();
            if thresholds.is_empty() {
                continue;
            }
            match exit {
                None => warn(
                    warnings,
                    path,
                    format!(
                        "level \"{level_name}\" has no \"exit\": it leaves as soon as {} drops below the enter threshold, with no hysteresis, and can flap every min_dwell",
                        thresholds.join(" and ")
                    ),
                ),
                Some(exit) => {
                    for threshold in thresholds {
                        let same = match exit.get(threshold) {
                            None => true,
                            Some(value) => enter.and_then(|e| e.get(threshold)) == Some(value),
                        };
                        if same {
                            warn(
                                warnings,
                                format!("{path}.exit.{threshold}"),
                                format!(
                                    "level \"{level_name}\" exits at its enter threshold for {threshold}: no hysteresis, so it can flap every min_dwell"
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Without a budget every retryable request gets `max_retries`: the retry storm a budget exists
/// to prevent.
fn retries_without_budget(raw: &Map<String, Value>, warnings: &mut Vec<Warning>) {
    for (name, policy) in sections(raw, "retries") {
        if policy.pointer("/budget/enabled") == Some(&Value::Bool(false)) {
            let retries = policy
                .get("max_retries")
                .and_then(Value::as_u64)
                .unwrap_or(2);
            if retries > 0 {
                warn(
                    warnings,
                    format!("retries.{name}.budget.enabled"),
                    format!(
                        "no budget: an upstream in trouble gets up to {}x its traffic in retries",
                        retries + 1
                    ),
                );
            }
        }
    }
}

/// A reroute header a client could send itself picks the Envoy route's cluster for it.
fn reroute_headers_not_internal(
    config: &PluginConfig,
    internal: &[String],
    warnings: &mut Vec<Warning>,
) {
    for policy in &config.degradations {
        for (header, _) in &policy.reroute_headers {
            if !internal.iter().any(|h| h == header) {
                warn(
                    warnings,
                    format!("degradation.{}.levels", policy.name),
                    format!(
                        "the reroute header {header} is not in the Envoy route config's internal_only_headers: a client could send it and pick the cluster before seawall removes it"
                    ),
                );
            }
        }
    }
}
