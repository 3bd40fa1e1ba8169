//! `seawall explain`: what the filter would do with one request, on fresh state.
//!
//! Nothing here re-implements a decision. The route is the engine's own match
//! ([`Route::matches`]/[`Route::unmet`] from the core), and every decision comes from the core's
//! [`Engine::on_request`] on a fresh in-memory store, as the filter would take it right after it
//! loaded the config: once for the whole pipeline (what the client would see), and once for
//! each policy of the route alone (what that policy decides by itself, before the composition
//! rules of `engine.rs` let an earlier refusal hide it). The shared-data keys a decision wrote
//! are read back from the store, so the keys shown are the ones the engine computed.

use serde::Serialize;

use seawall::clock::Timestamp;
use seawall::config::circuit_breaker::BreakerKey;
use seawall::config::shared::KeyPart;
use seawall::config::PluginConfig;
use seawall::engine::{Engine, RequestDecision, Verdict};
use seawall::metrics::FakeMetrics;
use seawall::policy::fault::DelayShape;
use seawall::policy::route::{
    Condition, Route, RouteBreaker, RouteDegradation, RoutePolicies, RouteTable,
};
use seawall::request::{Attribute, AttributeId, AttributePlan, FakeRequest, RequestView, Scratch};
use seawall::state::fake::FakeStore;

use crate::check::CHECK_SECRET;

/// The request to explain, as the operator describes it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestSpec {
    pub method: String,
    pub path: String,
    /// Lowercase names.
    #[serde(serialize_with = "header_objects")]
    pub headers: Vec<(String, String)>,
    pub authority: Option<String>,
    /// Envoy's route name (`xds.route_name`).
    pub route_name: Option<String>,
    /// The upstream cluster (`xds.cluster_name`).
    pub cluster: Option<String>,
    /// The client's address (`source.address`).
    pub client_ip: Option<String>,
    /// Nanoseconds since the epoch.
    #[serde(skip)]
    pub at: u64,
}

/// Headers as `{"name": ..., "value": ...}` objects, which read better than pairs.
fn header_objects<S: serde::Serializer>(
    headers: &[(String, String)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = serializer.serialize_seq(Some(headers.len()))?;
    for (name, value) in headers {
        seq.serialize_element(&serde_json::json!({"name": name, "value": value}))?;
    }
    seq.end()
}

impl RequestSpec {
    fn attributes(&self) -> Vec<(Attribute, String)> {
        let mut all = vec![
            (Attribute::method(), self.method.clone()),
            (Attribute::path(), self.path.clone()),
        ];
        for (name, value) in &self.headers {
            all.push((Attribute::header(name), value.clone()));
        }
        let optional = [
            (Attribute::authority(), &self.authority),
            (Attribute::route_name(), &self.route_name),
            (Attribute::cluster_name(), &self.cluster),
            (Attribute::client_address(), &self.client_ip),
        ];
        for (attribute, value) in optional {
            if let Some(value) = value {
                all.push((attribute, value.clone()));
            }
        }
        all
    }

    fn fake_request(&self, without: &[String]) -> FakeRequest {
        let mut request = FakeRequest::new();
        for (attribute, value) in self.attributes() {
            let removed = matches!(&attribute, Attribute::Header(name) if without.contains(name));
            if !removed {
                request = request.with(attribute, value);
            }
        }
        request
    }

    fn value_of(&self, attribute: &Attribute, without: &[String]) -> Option<String> {
        if matches!(attribute, Attribute::Header(name) if without.contains(name)) {
            return None;
        }
        self.attributes()
            .into_iter()
            .find(|(a, _)| a == attribute)
            .map(|(_, v)| v)
    }
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub plugin: String,
    pub request: RequestSpec,
    /// Client headers the engine removes before it matches (degradation's reroute headers).
    pub removed_headers: Vec<String>,
    /// Each route tested, in order, up to the one that matched.
    pub routes: Vec<RouteCheck>,
    /// The route that matched, if any.
    pub route: Option<String>,
    /// The route's policies in pipeline order, each decided alone on fresh state.
    pub policies: Vec<PolicyDecision>,
    /// The whole pipeline on fresh state: what the client would see.
    pub decision: Decision,
}

#[derive(Debug, Serialize)]
pub struct RouteCheck {
    pub index: usize,
    pub name: String,
    pub matched: bool,
    /// Why it did not match: each condition that fails, with what the request had.
    pub unmet: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct PolicyDecision {
    /// `rate_limit`, `circuit_breaker`, `fault`, `retry` or `degradation`.
    pub kind: &'static str,
    pub name: String,
    /// The client key parts the policy reads, with the request's values.
    pub key: Vec<String>,
    pub decision: Decision,
    /// What a single run on fresh state cannot show (chance, time boxes, conditions).
    pub notes: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Decision {
    /// `upstream` (goes on), `delayed` (goes on after `delay_ms`) or `reply` (answered locally).
    pub verdict: &'static str,
    /// The local reply's status (for `delayed`: the abort sent when the delay is over).
    pub status: Option<u16>,
    /// A response fault's status, which replaces the upstream's.
    pub response_status: Option<u16>,
    pub delay_ms: Option<u64>,
    pub retry_after_s: Option<u64>,
    /// Retries granted (`x-envoy-max-retries`).
    pub retries: Option<u32>,
    /// `RateLimit-Limit` / `RateLimit-Remaining` after this request.
    pub rate_limit: Option<(u32, u32)>,
    /// Cluster a degradation level sends the request to.
    pub reroute: Option<String>,
    /// Request headers removed before the request goes on.
    pub strip_headers: Vec<String>,
    /// Shared-data keys this decision wrote.
    pub shared_keys: Vec<String>,
    /// Whether a fault's chance decides: another run may differ.
    pub by_chance: bool,
}

/// Why explaining failed (a config that does not load is reported by `check`'s path instead).
pub fn explain(engine: &Engine, spec: &RequestSpec) -> Result<Explanation, String> {
    let config = engine.config();
    let plan = &config.attributes;
    let removed_headers: Vec<String> = config
        .degradations
        .iter()
        .flat_map(|d| d.reroute_headers.iter().map(|(name, _)| name.clone()))
        .filter(|name| spec.headers.iter().any(|(h, _)| h == name))
        .collect();

    let mut request = spec.fake_request(&removed_headers);
    let mut scratch = Scratch::for_plan(plan);
    let mut routes = Vec::new();
    let mut matched = None;
    {
        let mut view = RequestView::new(plan, &mut request, &mut scratch);
        for (index, route) in config.routes.routes().iter().enumerate() {
            let unmet: Vec<String> = route
                .unmet(&mut view)
                .into_iter()
                .map(|condition| describe_condition(condition, plan, spec, &removed_headers))
                .collect();
            let hit = unmet.is_empty();
            routes.push(RouteCheck {
                index,
                name: route.name.clone(),
                matched: hit,
                unmet,
            });
            if hit {
                matched = Some(index);
                break;
            }
        }
    }

    let (decision, engine_route) = run(config.clone(), spec)?;
    if engine_route != matched {
        return Err(format!(
            "internal inconsistency: the engine matched route {engine_route:?}, the explanation {matched:?}"
        ));
    }
    let policies = match matched.and_then(|i| config.routes.routes().get(i)) {
        None => Vec::new(),
        Some(route) => each_policy(config, route, spec, &removed_headers)?,
    };
    let mut decision = decision;
    decision.by_chance = policies.iter().any(|p| p.decision.by_chance);
    Ok(Explanation {
        plugin: config.name.clone(),
        request: spec.clone(),
        removed_headers,
        route: matched
            .and_then(|i| config.routes.routes().get(i))
            .map(|r| r.name.clone()),
        routes,
        policies,
        decision,
    })
}

/// Runs the engine on `config` and fresh state: its decision, and the route it matched.
fn run(config: PluginConfig, spec: &RequestSpec) -> Result<(Decision, Option<usize>), String> {
    let mut metrics = FakeMetrics::new();
    let engine = Engine::new(config, &mut metrics).map_err(|e| e.to_string())?;
    let store = FakeStore::new();
    engine
        .prepare_state(&store, CHECK_SECRET)
        .map_err(|e| format!("shared data: {e}"))?;
    let before = store.snapshot();
    let mut request = spec.fake_request(&[]);
    let mut scratch = Scratch::for_plan(&engine.config().attributes);
    let mut view = RequestView::new(&engine.config().attributes, &mut request, &mut scratch);
    let now = Timestamp::from_nanos(spec.at);
    let decided = engine.on_request(&mut view, now, &store, &metrics);
    let mut decision = describe_decision(&decided, now);
    // Faults carried on the stream: an abort sent when the delay is over, or a response fault.
    let faults = &decided.stream.faults;
    if let (Some((_, status)), "delayed") = (faults.abort, decision.verdict) {
        decision.status = Some(status);
    }
    let route = decided
        .stream
        .route
        .and_then(|index| engine.config().routes.get(index));
    if let (Some(position), Some(route)) = (faults.response, route) {
        decision.response_status = route
            .policies
            .faults
            .get(usize::from(position))
            .and_then(|&fault| engine.config().faults.get(fault))
            .and_then(|fault| fault.response.as_ref())
            .map(|response| response.status);
    }
    let route = decided.stream.route.map(|r| usize::from(r.0));
    drop(view);
    let after = store.snapshot();
    decision.shared_keys = after
        .iter()
        .filter(|entry| !before.contains(entry))
        .map(|(key, _)| key.clone())
        .collect();
    Ok((decision, route))
}

fn describe_decision(decided: &RequestDecision<'_>, now: Timestamp) -> Decision {
    let mut decision = Decision {
        verdict: "upstream",
        ..Decision::default()
    };
    match &decided.verdict {
        Verdict::Continue => {}
        Verdict::Pause { until } => {
            decision.verdict = "delayed";
            decision.delay_ms = Some(until.saturating_since(now).as_millis() as u64);
        }
        Verdict::Reply(reply) => {
            decision.verdict = "reply";
            decision.status = Some(reply.status);
            decision.retry_after_s = reply.retry_after_seconds();
            decision.rate_limit = reply.rate_limit.map(|r| (r.limit, r.remaining));
        }
    }
    if decision.rate_limit.is_none() {
        decision.rate_limit = decided.stream.rate_limit.map(|r| (r.limit, r.remaining));
    }
    decision.retries = decided.retry.map(|r| r.max_retries);
    decision.reroute = decided
        .reroute
        .map(|r| format!("{} (via {})", r.cluster, r.header));
    decision.strip_headers = decided.strip_headers.names().map(str::to_owned).collect();
    decision
}

/// Each policy of `route` alone, in pipeline order.
fn each_policy(
    config: &PluginConfig,
    route: &Route,
    spec: &RequestSpec,
    removed: &[String],
) -> Result<Vec<PolicyDecision>, String> {
    let plan = &config.attributes;
    let policies = &route.policies;
    let mut out = Vec::new();
    // The config with the explained route cut down to `set`; the other routes keep theirs (the
    // request does not match them).
    let alone = |set: RoutePolicies| -> Result<Decision, String> {
        let mut cut = config.clone();
        let routes: Vec<Route> = config
            .routes
            .routes()
            .iter()
            .map(|r| {
                let mut r = r.clone();
                if r.name == route.name {
                    r.policies = set.clone();
                }
                r
            })
            .collect();
        cut.routes = RouteTable::new(routes);
        run(cut, spec).map(|(decision, _)| decision)
    };

    if let Some(RouteDegradation { policy, priority }) = policies.degradation {
        if let Some(degradation) = config.degradations.get(policy) {
            let decision = alone(RoutePolicies {
                degradation: policies.degradation,
                ..RoutePolicies::default()
            })?;
            let class = match priority {
                Some(class) => degradation
                    .priority
                    .classes
                    .get(usize::from(class))
                    .cloned(),
                None => {
                    let value = degradation
                        .priority
                        .header
                        .and_then(|id| plan.get(id))
                        .and_then(|a| spec.value_of(a, removed));
                    let class = degradation
                        .priority
                        .of_value(value.as_deref().map(str::as_bytes));
                    degradation
                        .priority
                        .classes
                        .get(usize::from(class))
                        .cloned()
                }
            };
            let mut notes = vec![format!(
                "fresh state is the normal level; priority class of this request: {}",
                class.unwrap_or_default()
            )];
            for level in &degradation.levels {
                let shed = level
                    .shed_below
                    .and_then(|c| degradation.priority.classes.get(usize::from(c)));
                if let Some(shed) = shed {
                    notes.push(format!(
                        "at level \"{}\" classes below {shed} are shed",
                        level.name
                    ));
                }
            }
            out.push(PolicyDecision {
                kind: "degradation",
                name: degradation.name.clone(),
                key: Vec::new(),
                decision,
                notes,
            });
        }
    }
    if let Some(RouteBreaker { policy, .. }) = &policies.circuit_breaker {
        if let Some(breaker) = config.circuit_breakers.get(*policy) {
            let decision = alone(RoutePolicies {
                circuit_breaker: policies.circuit_breaker.clone(),
                ..RoutePolicies::default()
            })?;
            let key = match &breaker.key {
                BreakerKey::Cluster(id) => vec![describe_part(*id, plan, spec, removed)],
                BreakerKey::Header(id) => vec![describe_part(*id, plan, spec, removed)],
                BreakerKey::Route => vec![format!("route \"{}\"", route.name)],
            };
            out.push(PolicyDecision {
                kind: "circuit_breaker",
                name: breaker.name.clone(),
                key,
                decision,
                notes: vec![
                    "fresh state is closed: the request is admitted and its outcome counted"
                        .to_owned(),
                ],
            });
        }
    }
    for &limit in &policies.rate_limits {
        if let Some(policy) = config.rate_limits.get(limit) {
            let decision = alone(RoutePolicies {
                rate_limits: vec![limit],
                ..RoutePolicies::default()
            })?;
            let key = policy
                .key
                .iter()
                .map(|part| describe_key_part(part, plan, spec, removed))
                .collect();
            out.push(PolicyDecision {
                kind: "rate_limit",
                name: policy.name.clone(),
                key,
                decision,
                notes: {
                    let mut notes = vec![format!(
                        "{}, burst {}: a fresh bucket admits {} requests at once",
                        policy.rate,
                        policy.gcra.burst(),
                        policy.gcra.burst()
                    )];
                    if !policy.key.is_empty() {
                        notes.push(
                            "the key's slot number depends on the deployment's secret: Envoy's differs"
                                .to_owned(),
                        );
                    }
                    notes
                },
            });
        }
    }
    for &fault in &policies.faults {
        if let Some(policy) = config.faults.get(fault) {
            let mut decision = alone(RoutePolicies {
                faults: vec![fault],
                ..RoutePolicies::default()
            })?;
            let mut notes = Vec::new();
            let mut chance = false;
            if !policy.enabled {
                notes.push("disabled (\"enabled\": false)".to_owned());
            }
            if !policy.window.contains(spec.at) {
                notes.push("outside its active_between time box at this time".to_owned());
            }
            let percent = |ppm: u32| f64::from(ppm) / 10_000.0;
            if let Some(abort) = &policy.abort {
                chance |= abort.ppm > 0 && abort.ppm < 1_000_000;
                notes.push(format!(
                    "aborts {}% of requests with {}",
                    percent(abort.ppm),
                    abort.reply.status
                ));
            }
            if let Some(delay) = &policy.delay {
                chance |= delay.ppm > 0 && delay.ppm < 1_000_000;
                notes.push(format!(
                    "delays {}% of requests by {}",
                    percent(delay.ppm),
                    delay_text(&delay.shape)
                ));
            }
            if let Some(response) = &policy.response {
                chance |= response.ppm > 0 && response.ppm < 1_000_000;
                notes.push(format!(
                    "replaces {}% of responses with {}",
                    percent(response.ppm),
                    response.status
                ));
            }
            let key = policy
                .cohort
                .as_ref()
                .map(|cohort| {
                    chance |= cohort.ppm < 1_000_000;
                    notes.push(format!("cohort: {}% of keys, sticky", percent(cohort.ppm)));
                    cohort
                        .key
                        .iter()
                        .map(|part| describe_key_part(part, plan, spec, removed))
                        .collect()
                })
                .unwrap_or_default();
            if !policy.when.is_empty() {
                notes.push(format!(
                    "only when {} condition(s) on headers hold",
                    policy.when.len()
                ));
            }
            if policy.header_control.is_some() {
                notes.push(
                    "a request with the secret header may ask for faults by header".to_owned(),
                );
            }
            if chance {
                notes.push(
                    "chance decides: this run drew once, another request may differ".to_owned(),
                );
            }
            decision.by_chance = chance;
            out.push(PolicyDecision {
                kind: "fault",
                name: policy.name.clone(),
                key,
                decision,
                notes,
            });
        }
    }
    if let Some(retry) = policies.retry {
        if let Some(policy) = config.retries.get(retry) {
            let decision = alone(RoutePolicies {
                retry: Some(retry),
                ..RoutePolicies::default()
            })?;
            let methods: Vec<String> = policy
                .methods
                .iter()
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .collect();
            out.push(PolicyDecision {
                kind: "retry",
                name: policy.name.clone(),
                key: Vec::new(),
                decision,
                notes: vec![format!(
                    "up to {} retries for {}{}; a fresh budget has its floor to give",
                    policy.max_retries,
                    methods.join(" "),
                    if policy.idempotency_header.is_some() {
                        " or requests with the idempotency header"
                    } else {
                        ""
                    }
                )],
            });
        }
    }
    Ok(out)
}

fn delay_text(shape: &DelayShape) -> String {
    let span =
        |d: std::time::Duration| seawall::config::units::TimeSpan::from_duration(d).to_string();
    match *shape {
        DelayShape::Fixed { fixed, jitter } if jitter.is_zero() => span(fixed),
        DelayShape::Fixed { fixed, jitter } => format!("{} ± {}", span(fixed), span(jitter)),
        DelayShape::Uniform { min, max } => format!("{} to {}, uniformly", span(min), span(max)),
        DelayShape::Exponential { mean, max } => {
            format!(
                "{} on average (exponential), at most {}",
                span(mean),
                span(max)
            )
        }
    }
}

fn attribute_name(attribute: &Attribute) -> String {
    match attribute {
        Attribute::Header(name) if name.starts_with(':') => name[1..].to_owned(),
        Attribute::Header(name) => format!("header {name}"),
        Attribute::Property(path) => {
            let dotted = String::from_utf8_lossy(path.as_bytes()).replace('\0', ".");
            match dotted.as_str() {
                "xds.route_name" => "Envoy route name (xds.route_name)".to_owned(),
                "xds.cluster_name" => "upstream cluster (xds.cluster_name)".to_owned(),
                "source.address" => "client address".to_owned(),
                other => other.to_owned(),
            }
        }
    }
}

fn shown(value: Option<String>) -> String {
    match value {
        Some(value) => format!("{value:?}"),
        None => "none".to_owned(),
    }
}

fn describe_part(
    id: AttributeId,
    plan: &AttributePlan,
    spec: &RequestSpec,
    removed: &[String],
) -> String {
    match plan.get(id) {
        Some(attribute) => format!(
            "{} = {}",
            attribute_name(attribute),
            shown(spec.value_of(attribute, removed))
        ),
        None => "?".to_owned(),
    }
}

fn describe_key_part(
    part: &KeyPart,
    plan: &AttributePlan,
    spec: &RequestSpec,
    removed: &[String],
) -> String {
    match *part {
        KeyPart::Raw(id) => describe_part(id, plan, spec, removed),
        KeyPart::ClientIp(id) => {
            format!("{} (without port)", describe_part(id, plan, spec, removed))
        }
        KeyPart::Path(id) => format!("{} (normalised)", describe_part(id, plan, spec, removed)),
        KeyPart::Authority(id) => format!(
            "{} (lowercased, without port)",
            describe_part(id, plan, spec, removed)
        ),
    }
}

fn describe_condition(
    condition: &Condition,
    plan: &AttributePlan,
    spec: &RequestSpec,
    removed: &[String],
) -> String {
    let got = |id: AttributeId| {
        plan.get(id)
            .map(|a| (attribute_name(a), shown(spec.value_of(a, removed))))
            .unwrap_or_else(|| ("?".to_owned(), "?".to_owned()))
    };
    let text = |bytes: &[u8]| format!("{:?}", String::from_utf8_lossy(bytes));
    match condition {
        Condition::PathExact { path, value } => {
            let (name, seen) = got(*path);
            format!("{name} is exactly {} (got {seen})", text(value))
        }
        Condition::PathPrefix { path, value } => {
            let (name, seen) = got(*path);
            format!("{name} starts with {} (got {seen})", text(value))
        }
        Condition::MethodIn { method, methods } => {
            let (name, seen) = got(*method);
            let all: Vec<String> = methods
                .iter()
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .collect();
            format!("{name} is one of {} (got {seen})", all.join(", "))
        }
        Condition::Authority {
            authority, host, ..
        } => {
            let (name, seen) = got(*authority);
            format!("{name} is {} (got {seen})", text(host))
        }
        Condition::Equals { attribute, value } => {
            let (name, seen) = got(*attribute);
            format!("{name} is {} (got {seen})", text(value))
        }
        Condition::StartsWith { attribute, value } => {
            let (name, seen) = got(*attribute);
            format!("{name} starts with {} (got {seen})", text(value))
        }
        Condition::Present { attribute } => {
            let (name, _) = got(*attribute);
            format!("{name} is present (it is not)")
        }
        Condition::Absent { attribute } => {
            let (name, seen) = got(*attribute);
            format!("{name} is absent (got {seen})")
        }
    }
}
