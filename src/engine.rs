//! The core's entry points per stream: what to do with a request, and what to add to its response.
//!
//! The host calls these with the request's attributes, the time, the shared store and the metric
//! sink, and carries out the returned decision. Everything per request is decided here, in plain
//! Rust, so the whole pipeline runs in native tests against fakes; the host only translates.
//! Metric names are built once in [`Engine::new`]; the request path bumps ids and allocates
//! nothing.

mod degradation;

pub use degradation::{DEGRADED_HEADER, TICK as DEGRADATION_TICK};

use core::cell::Cell;
use core::time::Duration;

use crate::clock::Timestamp;
use crate::config::circuit_breaker::{BreakerKey, BreakerMode};
use crate::config::fault::FaultPolicy;
use crate::config::rate_limit::KeyPart;
use crate::config::retry::RetryMode;
use crate::config::{CircuitBreakerPolicy, PluginConfig, RateLimitPolicy};
use crate::metrics::{
    metric_name, MetricId, MetricKind, MetricSink, MetricsError, MetricsRegistry,
};
use crate::policy::circuit_breaker::{
    self, Admission, Admitted, BreakerState, Located, Outcome, Recorded, Records, ResponseFacts,
    Role, Transition,
};
use crate::policy::fault::{
    self as chaos, parse_decimal, parse_percent, secret_matches, Active, Draw, Random, Slot,
    SALT_ABORT, SALT_COHORT, SALT_DELAY, SALT_RESPONSE,
};
use crate::policy::key::{Form, KeyHasher, Secret};
use crate::policy::rate_limit::{
    self, AcquireFailure, Acquired, BucketChoice, Buckets, FailureMode, Mode, Tat,
};
use crate::policy::retry::{self, Grant, ResponseHeaders, RECORD_LEN as BUDGET_LEN};
use crate::policy::route::{Route, RouteBreaker, RouteIndex};
use crate::request::{Attribute, AttributeId, AttributePlan, AttributeSource, RequestView};
use crate::state::cas::{self, ensure, UpdateError};
use crate::state::generation;
use crate::state::slots::{hash_parts, KeyBuf};
use crate::state::{SharedStore, StoreError};

/// Adds `x-seawall-route: <name>` to responses when `debug.route_header` is on.
pub const ROUTE_HEADER: &str = "x-seawall-route";

/// gRPC's RESOURCE_EXHAUSTED, what a rate-limited gRPC call receives.
pub const GRPC_RESOURCE_EXHAUSTED: u32 = 8;

/// gRPC's UNAVAILABLE, what a gRPC call refused by an open breaker receives.
pub const GRPC_UNAVAILABLE: u32 = 14;

/// Added to every reply of an open (or half-open and busy) breaker, so clients and dashboards can
/// tell a breaker's refusal from the upstream's own 503.
pub const CIRCUIT_HEADER: &str = "x-seawall-circuit";

/// The router's count of attempts, on responses when the virtual host sets
/// `include_attempt_count_in_response`.
pub const ATTEMPT_COUNT_HEADER: &str = "x-envoy-attempt-count";

/// The longest upstream push-back (`Retry-After`) seawall honours.
const MAX_PUSH_BACK: Duration = Duration::from_secs(60);

/// Added to every injected abort, so an experiment's errors are never mistaken for real ones.
pub const FAULT_HEADER: &str = "x-seawall-fault";

/// A compiled config with its metrics defined: what one worker consults on every request.
#[derive(Debug)]
pub struct Engine {
    config: PluginConfig,
    route_requests: Vec<MetricId>,
    unmatched: MetricId,
    /// The reroute headers of every degradation policy: a client's own is removed.
    steering_headers: Vec<AttributeId>,
    steering_stripped: MetricId,
    rate_limits: Vec<RateLimitMetrics>,
    circuit_breakers: Vec<BreakerRuntime>,
    faults: Vec<FaultRuntime>,
    retries: Vec<RetryMetrics>,
    degradations: Vec<degradation::DegradationRuntime>,
    /// This worker's draws for fault percentages; seeded by the host.
    random: Cell<Random>,
    /// The deployment's secret for client-key hashes (see `policy::key`), adopted by
    /// `prepare_state`, and its shared-data key.
    secret: Cell<u64>,
    secret_key: String,
    /// This config's generation (see `state::generation`), adopted by `prepare_state` when a
    /// policy keeps state that only the newest config may drive, and its shared-data key.
    generation: Cell<u32>,
    generation_key: String,
}

/// A fault policy's metrics and ready-made abort headers.
#[derive(Debug)]
struct FaultRuntime {
    metrics: FaultMetrics,
    abort_headers: Vec<(String, String)>,
}

/// `seawall.retry.<name>.<counter>`.
#[derive(Debug, Clone, Copy)]
struct RetryMetrics {
    requests: MetricId,
    granted: MetricId,
    used: MetricId,
    refunded: MetricId,
    denied_by_budget: MetricId,
    shadow_denied: MetricId,
    pushed_back: MetricId,
    denied_by_breaker: MetricId,
    not_idempotent: MetricId,
    attempt_count_missing: MetricId,
    cas_retries: MetricId,
    cas_exhausted: MetricId,
    store_errors: MetricId,
}

/// `seawall.fault.<name>.<counter>`; `active` is a gauge.
#[derive(Debug, Clone, Copy)]
struct FaultMetrics {
    aborts: MetricId,
    delays: MetricId,
    response_faults: MetricId,
    active: MetricId,
    overflow: MetricId,
    inactive: MetricId,
    header_control_applied: MetricId,
    header_control_rejected: MetricId,
    cas_retries: MetricId,
    cas_exhausted: MetricId,
    store_errors: MetricId,
}

/// What a breaker needs beyond its policy: its metrics and its ready-made reply headers.
#[derive(Debug)]
struct BreakerRuntime {
    metrics: BreakerMetrics,
    open_headers: Vec<(String, String)>,
    half_open_headers: Vec<(String, String)>,
}

/// `seawall.circuit_breaker.<name>.<counter>`; `open` and `half_open` are gauges counting keys.
#[derive(Debug, Clone, Copy)]
struct BreakerMetrics {
    successes: MetricId,
    failures: MetricId,
    slow_calls: MetricId,
    rejected: MetricId,
    shadow_rejected: MetricId,
    probes: MetricId,
    opened: MetricId,
    half_opened: MetricId,
    reopened: MetricId,
    closed: MetricId,
    probes_restarted: MetricId,
    untracked: MetricId,
    /// Admissions from the table's overflow record (every slot the key may use was held).
    overflow: MetricId,
    cas_retries: MetricId,
    cas_exhausted: MetricId,
    store_errors: MetricId,
    open: MetricId,
    half_open: MetricId,
}

/// The counters of one rate-limit policy, `seawall.rate_limit.<name>.<counter>`.
#[derive(Debug, Clone, Copy)]
struct RateLimitMetrics {
    allowed: MetricId,
    limited: MetricId,
    shadow_limited: MetricId,
    exempt: MetricId,
    cas_exhausted: MetricId,
    cas_retries: MetricId,
    store_errors: MetricId,
    failure_mode_applied: MetricId,
}

/// What the stream carries from its request to its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamState {
    pub route: Option<RouteIndex>,
    pub started: Timestamp,
    /// The most restrictive rate limit that applied, for the response's `RateLimit-*` headers.
    pub rate_limit: Option<RateLimitStatus>,
    /// The breaker that awaits this request's outcome.
    pub breaker: Option<BreakerTicket>,
    /// When the response headers came, to tell slow calls.
    pub responded: Option<Timestamp>,
    /// The response's status, when the host read it from the response headers.
    pub response_status: Option<u16>,
    pub faults: FaultState,
    /// The route's breaker would have refused the request (shadow mode): no retries for it.
    pub breaker_open: bool,
    /// The retries this request was granted, to settle when the response shows what was used.
    pub retry: Option<RetryTicket>,
    /// The degradation level the request met, and whether its outcome is the dependency's.
    pub degradation: Option<DegradationTicket>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DegradationTicket {
    pub level: u8,
    /// It went to the dependency (not shed, answered locally or rerouted): its outcome counts.
    pub reported: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryTicket {
    /// Taken from the budget, so the unused part can go back.
    pub reserved: u32,
    /// When: the unused part goes back to the window bucket it was taken from.
    pub granted_at: u64,
}

/// The retry headers to set on a request, overwriting whatever the client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryHeaders<'a> {
    /// `x-envoy-max-retries`.
    pub max_retries: u32,
    /// `x-envoy-retry-on`.
    pub retry_on: Option<&'a str>,
    /// `x-envoy-retry-grpc-on`.
    pub grpc_retry_on: Option<&'a str>,
    /// `x-envoy-upstream-rq-per-try-timeout-ms`.
    pub per_try_timeout_ms: Option<u64>,
    /// Client-sent headers of [`crate::config::retry::CLIENT_RETRY_HEADERS`] (bit n for entry n) that seawall does not
    /// set: the host removes them.
    pub remove: u8,
}

/// The faults injected into one stream, by position in its route's `faults`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultState {
    /// Positions holding an active-fault slot (and the `active` gauge) until the stream ends.
    pub holding: u8,
    /// The epoch its `max_active` slots were taken in (all at one instant).
    pub slot_epoch: u32,
    /// An abort to send when the delay is over (or at once without one): position and status.
    pub abort: Option<(u8, u16)>,
    /// The position whose response fault replaces the upstream's answer.
    pub response: Option<u8>,
    /// Whether the request is gRPC, for the abort's `grpc-status`.
    pub grpc: bool,
}

/// A request's place in its route's breaker: which record, and whether it is a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerTicket {
    pub at: Located,
    pub role: Role,
    /// A gRPC request, whose outcome includes its `grpc-status`.
    pub grpc: bool,
}

/// A bucket as the IETF `RateLimit-*` headers describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitStatus {
    /// `RateLimit-Limit`: the bucket's capacity (its burst).
    pub limit: u32,
    /// `RateLimit-Remaining`: requests that would be admitted right now.
    pub remaining: u32,
    /// `RateLimit-Reset`: until the bucket is full again.
    pub reset: Duration,
}

impl RateLimitStatus {
    pub fn reset_seconds(&self) -> u64 {
        ceil_seconds(self.reset)
    }
}

/// Whole seconds, rounded up so a client that waits this long is not early.
fn ceil_seconds(span: Duration) -> u64 {
    span.as_secs() + u64::from(span.subsec_nanos() > 0)
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Let it through to the upstream.
    Continue,
    /// Hold it until `until`, then ask [`Engine::on_resume`].
    Pause { until: Timestamp },
    /// Answer it locally; the upstream never sees it.
    Reply(LocalReply<'a>),
}

/// A response seawall sends instead of the upstream's. A rejection carries its reason as data,
/// e.g. how long the client should wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply<'a> {
    pub status: u16,
    pub body: &'a [u8],
    pub headers: &'a [(String, String)],
    /// Sent as `Retry-After`, in whole seconds rounded up.
    pub retry_after: Option<Duration>,
    /// For gRPC requests: sent as `grpc-status` instead of relying on the HTTP status.
    pub grpc_status: Option<u32>,
    /// Sent as `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`.
    pub rate_limit: Option<RateLimitStatus>,
    /// Sent as `x-seawall-degraded`: the degradation level in force when a later stage (the
    /// breaker, a rate limit) answers.
    pub degraded: Option<&'a str>,
}

impl LocalReply<'_> {
    pub fn retry_after_seconds(&self) -> Option<u64> {
        self.retry_after.map(ceil_seconds)
    }
}

/// Sends local replies; implemented by the host's HTTP context and by test recorders.
pub trait LocalReplies {
    fn send_local_reply(&mut self, reply: &LocalReply<'_>);
}

/// The decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestDecision<'a> {
    pub stream: StreamState,
    pub verdict: Verdict<'a>,
    /// Request headers to remove before the request goes on: the fault-control headers the
    /// client sent.
    pub strip_headers: HeaderSet<'a>,
    /// Retry headers to set, on routes with a retry policy.
    pub retry: Option<RetryHeaders<'a>>,
    /// A header to set that picks the Envoy route's cluster (degradation's reroute). A client's
    /// own is removed before anything else reads the request.
    pub reroute: Option<Reroute<'a>>,
}

impl<'a> RequestDecision<'a> {
    /// Goes on untouched.
    fn passed(stream: StreamState) -> Self {
        RequestDecision {
            stream,
            verdict: Verdict::Continue,
            strip_headers: HeaderSet::default(),
            retry: None,
            reroute: None,
        }
    }

    /// Answered locally: nothing else applies.
    fn answered(stream: StreamState, reply: LocalReply<'a>) -> Self {
        RequestDecision {
            verdict: Verdict::Reply(reply),
            ..RequestDecision::passed(stream)
        }
    }
}

/// Some of the config's fault-control headers, by position: a request's set is one word, so a
/// decision carries no list of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeaderSet<'a> {
    plan: Option<&'a AttributePlan>,
    headers: &'a [AttributeId],
    present: u64,
}

impl<'a> HeaderSet<'a> {
    pub fn is_empty(&self) -> bool {
        self.present == 0
    }

    /// The header names, lowercase.
    pub fn names(self) -> impl Iterator<Item = &'a str> {
        let present = self.present;
        self.headers
            .iter()
            .enumerate()
            .filter(move |(bit, _)| present & (1u64 << bit) != 0)
            .filter_map(move |(_, &id)| match self.plan?.get(id)? {
                Attribute::Header(name) => Some(name.as_str()),
                Attribute::Property(_) => None,
            })
    }
}

/// Sends the request to another Envoy cluster through a `cluster_header` route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reroute<'a> {
    pub header: &'a str,
    pub cluster: &'a str,
}

/// What to add to a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResponseDecision<'a> {
    /// `x-seawall-route` value, when debug headers are on and a route matched.
    pub route_header: Option<&'a str>,
    pub rate_limit: Option<RateLimitStatus>,
    /// A response fault: the status (and body) that replace the upstream's.
    pub fault: Option<FaultedResponse<'a>>,
    /// `x-seawall-degraded` value: the level the request met, when above normal.
    pub degraded: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultedResponse<'a> {
    pub status: u16,
    pub body: Option<&'a [u8]>,
}

impl Engine {
    pub fn new(
        config: PluginConfig,
        registry: &mut impl MetricsRegistry,
    ) -> Result<Self, MetricsError> {
        let route_requests = config
            .routes
            .routes()
            .iter()
            .map(|route| {
                registry.define(
                    MetricKind::Counter,
                    &metric_name("route", &route.name, "requests"),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let unmatched = registry.define(
            MetricKind::Counter,
            &metric_name("plugin", &config.name, "unmatched_requests"),
        )?;
        let steering_stripped = registry.define(
            MetricKind::Counter,
            &metric_name("plugin", &config.name, "client_reroute_headers_removed"),
        )?;
        let mut steering_headers: Vec<AttributeId> = Vec::new();
        for (_, id) in config.degradations.iter().flat_map(|d| &d.reroute_headers) {
            if !steering_headers.contains(id) {
                steering_headers.push(*id);
            }
        }
        let mut rate_limits = Vec::with_capacity(config.rate_limits.len());
        for policy in &config.rate_limits {
            let mut counter = |name: &str| {
                registry.define(
                    MetricKind::Counter,
                    &metric_name("rate_limit", &policy.name, name),
                )
            };
            rate_limits.push(RateLimitMetrics {
                allowed: counter("allowed")?,
                limited: counter("limited")?,
                shadow_limited: counter("shadow_limited")?,
                exempt: counter("exempt")?,
                cas_exhausted: counter("cas_exhausted")?,
                cas_retries: counter("cas_retries")?,
                store_errors: counter("store_errors")?,
                failure_mode_applied: counter("failure_mode_applied")?,
            });
        }
        let mut circuit_breakers = Vec::with_capacity(config.circuit_breakers.len());
        for policy in &config.circuit_breakers {
            let mut define = |kind: MetricKind, name: &str| {
                registry.define(kind, &metric_name("circuit_breaker", &policy.name, name))
            };
            let mut counter = |name: &str| define(MetricKind::Counter, name);
            let metrics = BreakerMetrics {
                successes: counter("successes")?,
                failures: counter("failures")?,
                slow_calls: counter("slow_calls")?,
                rejected: counter("rejected")?,
                shadow_rejected: counter("shadow_rejected")?,
                probes: counter("probes")?,
                opened: counter("opened")?,
                half_opened: counter("half_opened")?,
                reopened: counter("reopened")?,
                closed: counter("closed")?,
                probes_restarted: counter("probes_restarted")?,
                untracked: counter("untracked")?,
                overflow: counter("overflow")?,
                cas_retries: counter("cas_retries")?,
                cas_exhausted: counter("cas_exhausted")?,
                store_errors: counter("store_errors")?,
                open: define(MetricKind::Gauge, "open")?,
                half_open: define(MetricKind::Gauge, "half_open")?,
            };
            let with_state = |state: &str| {
                let mut headers = policy.on_open.headers.clone();
                headers.push((CIRCUIT_HEADER.to_owned(), state.to_owned()));
                headers
            };
            circuit_breakers.push(BreakerRuntime {
                metrics,
                open_headers: with_state("open"),
                half_open_headers: with_state("half-open"),
            });
        }
        let mut faults = Vec::with_capacity(config.faults.len());
        for policy in &config.faults {
            let mut define = |kind: MetricKind, name: &str| {
                registry.define(kind, &metric_name("fault", &policy.name, name))
            };
            let mut counter = |name: &str| define(MetricKind::Counter, name);
            let metrics = FaultMetrics {
                aborts: counter("aborts")?,
                delays: counter("delays")?,
                response_faults: counter("response_faults")?,
                overflow: counter("overflow")?,
                inactive: counter("inactive")?,
                header_control_applied: counter("header_control_applied")?,
                header_control_rejected: counter("header_control_rejected")?,
                cas_retries: counter("cas_retries")?,
                cas_exhausted: counter("cas_exhausted")?,
                store_errors: counter("store_errors")?,
                active: define(MetricKind::Gauge, "active")?,
            };
            let mut abort_headers = policy
                .abort
                .as_ref()
                .map(|abort| abort.reply.headers.clone())
                .unwrap_or_default();
            abort_headers.push((FAULT_HEADER.to_owned(), "abort".to_owned()));
            faults.push(FaultRuntime {
                metrics,
                abort_headers,
            });
        }
        let mut retries = Vec::with_capacity(config.retries.len());
        for policy in &config.retries {
            let mut counter = |name: &str| {
                registry.define(
                    MetricKind::Counter,
                    &metric_name("retry", &policy.name, name),
                )
            };
            retries.push(RetryMetrics {
                requests: counter("requests")?,
                granted: counter("granted")?,
                used: counter("used")?,
                refunded: counter("refunded")?,
                denied_by_budget: counter("denied_by_budget")?,
                shadow_denied: counter("shadow_denied")?,
                pushed_back: counter("pushed_back")?,
                denied_by_breaker: counter("denied_by_breaker")?,
                not_idempotent: counter("not_idempotent")?,
                attempt_count_missing: counter("attempt_count_missing")?,
                cas_retries: counter("cas_retries")?,
                cas_exhausted: counter("cas_exhausted")?,
                store_errors: counter("store_errors")?,
            });
        }
        let degradations = config
            .degradations
            .iter()
            .map(|policy| degradation::DegradationRuntime::new(policy, registry))
            .collect::<Result<Vec<_>, _>>()?;
        let secret_key = format!("sw:{}:secret", config.name);
        let generation_key = format!("sw:{}:generation", config.name);
        Ok(Engine {
            config,
            route_requests,
            unmatched,
            steering_headers,
            steering_stripped,
            rate_limits,
            circuit_breakers,
            faults,
            retries,
            degradations,
            random: Cell::new(Random::seeded(0x5ea_0a11)),
            secret: Cell::new(0),
            secret_key,
            generation: Cell::new(0),
            generation_key,
        })
    }

    pub fn config(&self) -> &PluginConfig {
        &self.config
    }

    /// Seeds this worker's draws for fault percentages (the host uses the time and its context).
    pub fn seed_random(&self, seed: u64) {
        self.random.set(Random::seeded(seed));
    }

    fn next_random(&self) -> u64 {
        let mut random = self.random.get();
        let value = random.next_u64();
        self.random.set(random);
        value
    }

    /// Whether any route can delay a request: the host then ticks to resume paused streams.
    pub fn can_delay(&self) -> bool {
        self.config
            .faults
            .iter()
            .any(|f| f.delay.is_some() || f.header_control.is_some())
    }

    /// Whether any request can be affected. A pass-through engine lets the host skip reading
    /// anything at all.
    pub fn is_pass_through(&self) -> bool {
        self.config.routes.is_empty()
    }

    /// Creates every shared-data key the policies can touch, before any request does (see
    /// `SharedStore` on why inserts race). Existing keys keep their state across reloads. Returns
    /// how many keys were written.
    /// Creates every shared-data key this config can touch, and adopts the deployment's secret
    /// for client-key hashes: the one in shared data, or `fresh_secret` (random, from the host)
    /// if this is the first config to load. Returns how many keys it created.
    pub fn prepare_state(
        &self,
        store: &impl SharedStore,
        fresh_secret: u64,
    ) -> Result<usize, StoreError> {
        let mut created = usize::from(ensure(store, &self.secret_key, &Secret(fresh_secret))?);
        let secret = cas::read::<8, Secret, _>(store, &self.secret_key)?
            .map_or(fresh_secret, |(secret, _)| secret.0);
        self.secret.set(secret);
        if !self.config.degradations.is_empty() {
            // The whole compiled config, so any change to it is a new generation.
            let fingerprint = hash_parts(0, &[format!("{:?}", self.config).as_bytes()]);
            let number =
                generation::adopt(store, &self.generation_key, fingerprint).map_err(|error| {
                    match error {
                        UpdateError::Store(error) => error,
                        UpdateError::Exhausted { .. } => StoreError::CasMismatch,
                    }
                })?;
            self.generation.set(number);
        }
        for policy in &self.config.rate_limits {
            policy.buckets.all_keys(|key| {
                created += usize::from(ensure(store, key, &Tat(0))?);
                Ok(())
            })?;
        }
        let fresh = BreakerState::fresh();
        for policy in &self.config.circuit_breakers {
            if let Some(table) = &policy.table {
                let mut buffer = KeyBuf::default();
                // Its slots and, one past them, its overflow record.
                for slot in 0..=table.slots() {
                    created += usize::from(ensure(store, table.key(slot, &mut buffer), &fresh)?);
                }
            }
        }
        for policy in self.config.retries.iter().filter(|p| p.budget.is_some()) {
            created += usize::from(ensure::<BUDGET_LEN, _, _>(
                store,
                &policy.key,
                &retry::BudgetState::empty(),
            )?);
        }
        for policy in &self.config.faults {
            if policy.max_active.is_some() {
                created += usize::from(ensure(store, &policy.active_key, &Active::default())?);
            }
        }
        created += self.prepare_degradation_state(store)?;
        for route in self.config.routes.routes() {
            if let Some(RouteBreaker {
                record: Some(key), ..
            }) = &route.policies.circuit_breaker
            {
                created += usize::from(ensure(store, key, &fresh)?);
            }
        }
        Ok(created)
    }

    pub fn on_request<S: AttributeSource>(
        &self,
        request: &mut RequestView<'_, S>,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
    ) -> RequestDecision<'_> {
        let mut decision = self.decide(request, now, store, metrics);
        if matches!(decision.verdict, Verdict::Continue | Verdict::Pause { .. }) {
            decision.strip_headers = self.fault_controls_sent(request);
        }
        decision
    }

    /// The fault-control headers the client sent, whatever the route and whether any fault
    /// policy applies: the secret and the controls never reach an upstream.
    fn fault_controls_sent<S: AttributeSource>(
        &self,
        request: &mut RequestView<'_, S>,
    ) -> HeaderSet<'_> {
        let headers = &self.config.fault_control_headers;
        let mut present = 0u64;
        for (bit, &id) in headers.iter().enumerate().take(64) {
            if request.get(id).is_some() {
                present |= 1 << bit;
            }
        }
        HeaderSet {
            plan: Some(&self.config.attributes),
            headers,
            present,
        }
    }

    fn decide<S: AttributeSource>(
        &self,
        request: &mut RequestView<'_, S>,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
    ) -> RequestDecision<'_> {
        // A header that steers Envoy's routing never comes from a client, whatever the route:
        // it goes before anything reads `xds.*` or matches a route.
        for &id in &self.steering_headers {
            if request.get(id).is_some() {
                request.remove_header(id);
                metrics.increment(self.steering_stripped, 1);
            }
        }
        let index = self.config.routes.find(request);
        let mut stream = StreamState {
            route: index,
            started: now,
            rate_limit: None,
            breaker: None,
            responded: None,
            response_status: None,
            faults: FaultState::default(),
            breaker_open: false,
            retry: None,
            degradation: None,
        };
        let Some((index, route)) = index.and_then(|i| Some((i, self.config.routes.get(i)?))) else {
            metrics.increment(self.unmatched, 1);
            return RequestDecision::passed(stream);
        };
        if let Some(&counter) = self.route_requests.get(usize::from(index.0)) {
            metrics.increment(counter, 1);
        }
        let degrade = match route.policies.degradation {
            None => degradation::Actions::default(),
            Some(choice) => match self.degrade(index, choice, request, now, metrics) {
                Ok(actions) => actions,
                Err(reply) => return RequestDecision::answered(stream, reply),
            },
        };
        // A rerouted request goes to another cluster: the primary's breaker neither refuses it
        // nor counts it, and it takes none of the primary's probe slots.
        let breaker = match degrade.reroute {
            Some(_) => None,
            None => route.policies.circuit_breaker.as_ref(),
        };
        if let Some(choice) = breaker {
            match self.admit(
                choice,
                request,
                now,
                store,
                metrics,
                &mut stream.breaker_open,
            ) {
                Ok(ticket) => stream.breaker = ticket,
                Err(reply) => {
                    let reply = LocalReply {
                        degraded: degrade.level_name,
                        ..reply
                    };
                    return RequestDecision::answered(stream, reply);
                }
            }
        }
        match self.rate_limit(route, request, now, store, metrics, degrade.rate_limit_ppm) {
            Ok(status) => stream.rate_limit = status,
            Err(reply) => {
                let reply = LocalReply {
                    degraded: degrade.level_name,
                    ..reply
                };
                // The request never reaches the upstream, so it says nothing about it: a probe
                // slot it took goes back.
                if let Some(ticket) = stream.breaker.take() {
                    self.settle(route, ticket, Outcome::Abandoned, now, store, metrics);
                }
                return RequestDecision::answered(stream, reply);
            }
        }
        let verdict = if route.policies.faults.is_empty() {
            Verdict::Continue
        } else {
            self.inject(route, request, now, store, metrics, &mut stream)
        };
        // An injected abort is seawall's answer, not the upstream's (at once or after its delay):
        // no outcome for the breaker or degradation, and no retries.
        let reaches_upstream = stream.faults.abort.is_none()
            && matches!(verdict, Verdict::Continue | Verdict::Pause { .. });
        if !reaches_upstream {
            if let Some(ticket) = stream.breaker.take() {
                self.settle(route, ticket, Outcome::Abandoned, now, store, metrics);
            }
        }
        // An injected delay is not the upstream's slowness: outcomes are timed from its end.
        if let Verdict::Pause { until } = verdict {
            stream.started = until;
        }
        let retry = match route.policies.retry {
            Some(index) if reaches_upstream => {
                // A probe, a would-be refusal of the breaker, or a degradation level that turns
                // retries off gets no retries.
                let probe = matches!(
                    stream.breaker,
                    Some(BreakerTicket {
                        role: Role::Probe { .. },
                        ..
                    })
                );
                let allowed = !probe && !stream.breaker_open && degrade.retries;
                self.retry_grant(index, request, now, store, metrics, &mut stream, allowed)
            }
            _ => None,
        };
        if let Some(choice) = route.policies.degradation {
            self.degradation_admitted(choice, &degrade, reaches_upstream, &mut stream);
        }
        RequestDecision {
            stream,
            verdict,
            strip_headers: HeaderSet::default(),
            retry,
            reroute: degrade.reroute,
        }
    }

    /// Decides how many retries the router may make for this request: `max_retries` for a
    /// retryable request (idempotent method or idempotency header) when `allowed`, cut to what
    /// the budget has left. The request is deposited in the budget either way.
    #[allow(clippy::too_many_arguments)]
    fn retry_grant<S: AttributeSource>(
        &self,
        index: usize,
        request: &mut RequestView<'_, S>,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
        stream: &mut StreamState,
        allowed: bool,
    ) -> Option<RetryHeaders<'_>> {
        let policy = self.config.retries.get(index)?;
        let counters = self.retries.get(index)?;
        metrics.increment(counters.requests, 1);
        let set = [
            true,
            policy.retry_on.is_some(),
            policy.grpc_retry_on.is_some(),
            policy.per_try_timeout_ms.is_some(),
            false,
            false,
            false,
        ];
        let mut remove = 0u8;
        for (bit, (&id, set)) in policy.client_headers.iter().zip(set).enumerate() {
            if !set && request.get(id).is_some() {
                remove |= 1 << bit;
            }
        }
        let method = request.get(policy.method).unwrap_or_default();
        let retryable = policy.methods.iter().any(|m| m.as_slice() == method)
            || policy
                .idempotency_header
                .is_some_and(|id| request.get(id).is_some());
        if !retryable {
            metrics.increment(counters.not_idempotent, 1);
        } else if !allowed {
            metrics.increment(counters.denied_by_breaker, 1);
        }
        let wanted = if retryable && allowed {
            policy.max_retries
        } else {
            0
        };
        let reserved = match &policy.budget {
            None => wanted,
            Some(budget) => {
                let (grant, races) =
                    retry::take(budget, store, &policy.key, wanted, now.as_nanos());
                if races > 0 {
                    metrics.increment(counters.cas_retries, i64::from(races));
                }
                match grant {
                    Ok(Grant::Granted { retries, short }) => {
                        if short {
                            let counter = match policy.mode {
                                RetryMode::Enforce => counters.denied_by_budget,
                                RetryMode::Shadow => counters.shadow_denied,
                            };
                            metrics.increment(counter, 1);
                        }
                        retries
                    }
                    Ok(Grant::PushedBack) => {
                        if wanted > 0 {
                            metrics.increment(counters.pushed_back, 1);
                        }
                        0
                    }
                    // Failing closed: no retries rather than unbudgeted ones.
                    Err(UpdateError::Exhausted { .. }) => {
                        metrics.increment(counters.cas_exhausted, 1);
                        0
                    }
                    Err(UpdateError::Store(_)) => {
                        metrics.increment(counters.store_errors, 1);
                        0
                    }
                }
            }
        };
        let max_retries = match policy.mode {
            RetryMode::Enforce => reserved,
            RetryMode::Shadow => wanted,
        };
        if max_retries > 0 {
            metrics.increment(counters.granted, i64::from(max_retries));
        }
        if policy.budget.is_some() && reserved > 0 {
            stream.retry = Some(RetryTicket {
                reserved,
                granted_at: now.as_nanos(),
            });
        } else if max_retries > 0 {
            stream.retry = Some(RetryTicket {
                reserved: 0,
                granted_at: now.as_nanos(),
            });
        }
        Some(RetryHeaders {
            max_retries,
            retry_on: policy.retry_on.as_deref(),
            grpc_retry_on: policy.grpc_retry_on.as_deref(),
            per_try_timeout_ms: policy.per_try_timeout_ms,
            remove,
        })
    }

    /// Settles a request's retries from its response headers: counts the retries the router
    /// made (`x-envoy-attempt-count`), gives the unused part of the grant back to the budget, and
    /// records the upstream's push-back (`Retry-After` on a 429 or 503) for every worker.
    pub fn settle_retries(
        &self,
        stream: &StreamState,
        response: &mut impl ResponseHeaders,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
    ) {
        let Some(ticket) = stream.retry else {
            return;
        };
        let Some(index) = stream
            .route
            .and_then(|route| self.config.routes.get(route))
            .and_then(|route| route.policies.retry)
        else {
            return;
        };
        let (Some(policy), Some(counters)) =
            (self.config.retries.get(index), self.retries.get(index))
        else {
            return;
        };
        let used = response
            .header(ATTEMPT_COUNT_HEADER)
            .and_then(|value| retry::retries_used(&value));
        let unused = match used {
            Some(used) => {
                if used > 0 {
                    metrics.increment(counters.used, i64::from(used));
                }
                ticket.reserved.saturating_sub(used)
            }
            // Without the count (include_attempt_count_in_response is off) nothing goes back.
            None => {
                metrics.increment(counters.attempt_count_missing, 1);
                0
            }
        };
        let Some(budget) = &policy.budget else {
            return;
        };
        // The status the host already read for the breaker or degradation, if it did.
        let status = match stream.response_status {
            Some(status) => Some(u64::from(status)),
            None => response
                .header(":status")
                .and_then(|value| crate::policy::fault::parse_decimal(&value)),
        };
        // A 503 speaks for the service; a 429 speaks for one client (RFC 6585), so it must not
        // stop every client's retries.
        let pushed_back_until = match status {
            Some(503) => response
                .header("retry-after")
                .and_then(|value| retry::retry_after(&value, MAX_PUSH_BACK))
                .map(|wait| now.saturating_add(wait).as_nanos()),
            _ => None,
        };
        if unused > 0 {
            metrics.increment(counters.refunded, i64::from(unused));
        }
        match retry::settle(
            budget,
            store,
            &policy.key,
            unused,
            ticket.granted_at,
            pushed_back_until,
        ) {
            Ok(races) if races > 0 => metrics.increment(counters.cas_retries, i64::from(races)),
            Ok(_) => {}
            // The grant stays spent: the budget errs strict.
            Err(UpdateError::Exhausted { .. }) => metrics.increment(counters.cas_exhausted, 1),
            Err(UpdateError::Store(_)) => metrics.increment(counters.store_errors, 1),
        }
    }

    /// Decides the route's faults for one request: which inject, each taking an active slot
    /// first when capped. The first delay and the first abort (in route order) apply; an abort
    /// with a delay is sent when the delay is over, as Envoy's fault filter does.
    #[allow(clippy::too_many_arguments)]
    fn inject<'e, S: AttributeSource>(
        &'e self,
        route: &'e Route,
        request: &mut RequestView<'_, S>,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
        stream: &mut StreamState,
    ) -> Verdict<'e> {
        let mut delay: Option<Duration> = None;
        for (position, &index) in route.policies.faults.iter().enumerate() {
            let (Some(policy), Some(runtime), Ok(position)) = (
                self.config.faults.get(index),
                self.faults.get(index),
                u8::try_from(position),
            ) else {
                continue;
            };
            let counters = &runtime.metrics;
            if !policy.enabled {
                continue;
            }
            if !policy.window.contains(now.as_nanos()) {
                metrics.increment(counters.inactive, 1);
                continue;
            }
            if !policy.when.iter().all(|condition| condition.holds(request)) {
                continue;
            }
            let asked = self.header_control(policy, counters, request, metrics);
            let draw = match &policy.cohort {
                None => None,
                Some(cohort) => {
                    // No secret: a cohort is the same on every Envoy and across restarts, and
                    // choosing one's own membership gains a client nothing.
                    let hash = key_hash(&cohort.key, request, cohort.seed, 0);
                    // Without its key a request is outside the cohort.
                    let Some(hash) = hash else { continue };
                    if !Draw::Sticky(hash).hits(cohort.ppm, SALT_COHORT) {
                        continue;
                    }
                    Some(Draw::Sticky(hash))
                }
            };
            let hits = |ppm: u32, salt: u64| {
                draw.unwrap_or_else(|| Draw::Fresh(self.next_random()))
                    .hits(ppm, salt)
            };
            let abort_status = match (asked.abort, &policy.abort) {
                (Some((status, ppm)), _) => hits(ppm, SALT_ABORT).then_some(status),
                (None, Some(abort)) => hits(abort.ppm, SALT_ABORT).then_some(abort.reply.status),
                (None, None) => None,
            };
            let delay_for = match (asked.delay, &policy.delay) {
                (Some((span, ppm)), _) => hits(ppm, SALT_DELAY).then_some(span),
                (None, Some(configured)) => hits(configured.ppm, SALT_DELAY).then(|| {
                    let mut random = Random::seeded(self.next_random());
                    configured.shape.sample(random.next_f64())
                }),
                (None, None) => None,
            };
            let respond = policy
                .response
                .as_ref()
                .is_some_and(|response| hits(response.ppm, SALT_RESPONSE));
            if abort_status.is_none() && delay_for.is_none() && !respond {
                continue;
            }
            if let Some(max_active) = policy.max_active {
                let (slot, races) =
                    chaos::take_slot(store, &policy.active_key, max_active, now.as_nanos());
                if races > 0 {
                    metrics.increment(counters.cas_retries, i64::from(races));
                }
                match slot {
                    Slot::Taken { epoch } => stream.faults.slot_epoch = epoch,
                    Slot::Full => {
                        metrics.increment(counters.overflow, 1);
                        continue;
                    }
                    // Failing safe: no slot, no fault.
                    Slot::Failed(error) => {
                        metrics.increment(
                            match error {
                                UpdateError::Exhausted { .. } => counters.cas_exhausted,
                                UpdateError::Store(_) => counters.store_errors,
                            },
                            1,
                        );
                        continue;
                    }
                }
            }
            stream.faults.holding |= 1 << position;
            metrics.increment(counters.active, 1);
            if let (Some(span), None) = (delay_for, delay) {
                delay = Some(span);
                metrics.increment(counters.delays, 1);
            }
            if let (Some(status), None) = (abort_status, stream.faults.abort) {
                stream.faults.abort = Some((position, status));
            }
            if respond && stream.faults.response.is_none() {
                stream.faults.response = Some(position);
            }
        }
        if stream.faults.abort.is_some() {
            stream.faults.grpc = self.is_grpc(request);
            // The abort answers instead of the upstream: there is no upstream answer to replace.
            stream.faults.response = None;
        }
        match delay {
            Some(span) => Verdict::Pause {
                until: now.saturating_add(span),
            },
            None => self.abort_now(route, stream, metrics),
        }
    }

    /// Reads the fault-control headers of a policy that allows them. They are honoured only with
    /// the secret, capped by `max_percent`; without it, or with a percent that is not one, they
    /// are counted and ignored. Either way they are removed (`fault_controls_sent`), so they
    /// never reach the upstream.
    fn header_control<S: AttributeSource>(
        &self,
        policy: &FaultPolicy,
        counters: &FaultMetrics,
        request: &mut RequestView<'_, S>,
        metrics: &impl MetricSink,
    ) -> AskedFaults {
        let Some(control) = &policy.header_control else {
            return AskedFaults::default();
        };
        let mut present = false;
        for id in [
            control.abort,
            control.delay,
            control.percent,
            control.secret_header,
        ] {
            present |= request.get(id).is_some();
        }
        if !present {
            return AskedFaults::default();
        }
        let asks = [control.abort, control.delay, control.percent]
            .into_iter()
            .any(|id| request.peek(id).is_some());
        if !asks {
            return AskedFaults::default();
        }
        let presented = request.peek(control.secret_header).unwrap_or_default();
        if !secret_matches(presented, &control.secret) {
            metrics.increment(counters.header_control_rejected, 1);
            return AskedFaults::default();
        }
        // Absent, the percent is 100; present, it must be one (0 to 100): "5%" or "150" asks
        // for nothing rather than for every request.
        let ppm = match request.peek(control.percent).map(parse_percent) {
            None => 1_000_000,
            Some(Some(ppm)) => ppm,
            Some(None) => {
                metrics.increment(counters.header_control_rejected, 1);
                return AskedFaults::default();
            }
        }
        .min(control.max_ppm);
        metrics.increment(counters.header_control_applied, 1);
        AskedFaults {
            abort: request
                .peek(control.abort)
                .and_then(parse_decimal)
                .and_then(|status| u16::try_from(status).ok())
                .filter(|status| (200..=599).contains(status))
                .map(|status| (status, ppm)),
            delay: request
                .peek(control.delay)
                .and_then(parse_decimal)
                .filter(|&ms| ms <= 60_000)
                .map(|ms| (Duration::from_millis(ms), ppm)),
        }
    }

    /// The stream's abort, if it has one, as a reply; otherwise it goes on.
    fn abort_now<'e>(
        &'e self,
        route: &'e Route,
        stream: &StreamState,
        metrics: &impl MetricSink,
    ) -> Verdict<'e> {
        let Some((position, status)) = stream.faults.abort else {
            return Verdict::Continue;
        };
        let Some(index) = route.policies.faults.get(usize::from(position)) else {
            return Verdict::Continue;
        };
        let (Some(policy), Some(runtime)) =
            (self.config.faults.get(*index), self.faults.get(*index))
        else {
            return Verdict::Continue;
        };
        metrics.increment(runtime.metrics.aborts, 1);
        let (body, grpc_status) = match &policy.abort {
            Some(abort) => (abort.reply.body.as_slice(), abort.grpc_status),
            None => (&[][..], GRPC_UNAVAILABLE),
        };
        Verdict::Reply(LocalReply {
            status,
            body,
            headers: &runtime.abort_headers,
            retry_after: None,
            grpc_status: stream.faults.grpc.then_some(grpc_status),
            rate_limit: None,
            degraded: None,
        })
    }

    /// The host could not queue a delayed request (its queue is full): the delay is skipped and
    /// counted as an overflow, and the request goes on at once, or gets its abort at once if the
    /// delay carried one.
    pub fn delay_not_queued(&self, stream: &StreamState, metrics: &impl MetricSink) -> Verdict<'_> {
        let Some(route) = stream.route.and_then(|index| self.config.routes.get(index)) else {
            return Verdict::Continue;
        };
        let position = stream.faults.holding.trailing_zeros() as usize;
        let first = route.policies.faults.get(position);
        if let Some(runtime) = first.and_then(|&index| self.faults.get(index)) {
            metrics.increment(runtime.metrics.overflow, 1);
        }
        self.abort_now(route, stream, metrics)
    }

    pub fn response_fault_body(&self, stream: &StreamState) -> Option<&[u8]> {
        let position = stream.faults.response?;
        let route = self.config.routes.get(stream.route?)?;
        let index = *route.policies.faults.get(usize::from(position))?;
        self.config
            .faults
            .get(index)?
            .response
            .as_ref()?
            .body
            .as_deref()
    }

    /// A paused stream's delay is over: it goes on, or gets the abort that followed the delay.
    pub fn on_resume(&self, stream: &StreamState, metrics: &impl MetricSink) -> Verdict<'_> {
        match stream.route.and_then(|index| self.config.routes.get(index)) {
            Some(route) => self.abort_now(route, stream, metrics),
            None => Verdict::Continue,
        }
    }

    /// Asks the route's breaker whether the request may go on. `Ok(None)`: it goes on untracked
    /// (a disabled breaker, a shadow rejection, or a failure that fails open).
    fn admit<S: AttributeSource>(
        &self,
        choice: &RouteBreaker,
        request: &mut RequestView<'_, S>,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
        would_reject: &mut bool,
    ) -> Result<Option<BreakerTicket>, LocalReply<'_>> {
        let (Some(policy), Some(runtime)) = (
            self.config.circuit_breakers.get(choice.policy),
            self.circuit_breakers.get(choice.policy),
        ) else {
            return Ok(None);
        };
        let counters = &runtime.metrics;
        match policy.mode {
            BreakerMode::Disabled => return Ok(None),
            BreakerMode::ForcedOpen => {
                metrics.increment(counters.rejected, 1);
                return Err(self.circuit_open_reply(
                    policy,
                    runtime,
                    policy.breaker.open_for,
                    false,
                    request,
                ));
            }
            BreakerMode::Enforce | BreakerMode::Shadow => {}
        }
        let Some((records, owner)) = self.records(policy, choice, request) else {
            return Ok(None);
        };
        let (admitted, races) =
            circuit_breaker::admit(&policy.breaker, store, records, owner, now.as_nanos());
        if races > 0 {
            metrics.increment(counters.cas_retries, i64::from(races));
        }
        let (admission, at) = match admitted {
            Admitted::Decided {
                admission,
                at,
                transition,
            } => {
                if let Some(transition) = transition {
                    count_transition(counters, transition, metrics);
                }
                if at.owner == circuit_breaker::OVERFLOW_OWNER && policy.table.is_some() {
                    metrics.increment(counters.overflow, 1);
                }
                (admission, at)
            }
            Admitted::NoRecord => {
                metrics.increment(counters.untracked, 1);
                return Ok(None);
            }
            Admitted::Failed(error) => {
                count_failure(counters, error, metrics);
                return Ok(None);
            }
        };
        // Reading content-type now is one header read; asking Envoy for the gRPC status of every
        // response would be a property read each (the dearest kind of host call).
        let grpc = matches!(admission, Admission::Pass { .. } | Admission::Probe { .. })
            && policy.classifier.grpc_codes != 0
            && self.is_grpc(request);
        match admission {
            Admission::Pass { generation } => Ok(Some(BreakerTicket {
                at,
                role: Role::Counted { generation },
                grpc,
            })),
            Admission::Probe { generation } => {
                metrics.increment(counters.probes, 1);
                Ok(Some(BreakerTicket {
                    at,
                    role: Role::Probe { generation },
                    grpc,
                }))
            }
            Admission::Reject { .. } if policy.mode == BreakerMode::Shadow => {
                metrics.increment(counters.shadow_rejected, 1);
                *would_reject = true;
                Ok(None)
            }
            Admission::Reject {
                retry_after,
                half_open,
            } => {
                metrics.increment(counters.rejected, 1);
                Err(self.circuit_open_reply(policy, runtime, retry_after, half_open, request))
            }
        }
    }

    /// The reply of a breaker that refuses a request: the one place where a future fallback (the
    /// degradation policy) can answer instead.
    fn circuit_open_reply<'e, S: AttributeSource>(
        &'e self,
        policy: &'e CircuitBreakerPolicy,
        runtime: &'e BreakerRuntime,
        retry_after: Duration,
        half_open: bool,
        request: &mut RequestView<'_, S>,
    ) -> LocalReply<'e> {
        LocalReply {
            degraded: None,
            status: policy.on_open.status,
            body: &policy.on_open.body,
            headers: if half_open {
                &runtime.half_open_headers
            } else {
                &runtime.open_headers
            },
            retry_after: Some(retry_after),
            grpc_status: self.is_grpc(request).then_some(GRPC_UNAVAILABLE),
            rate_limit: None,
        }
    }

    fn is_grpc<S: AttributeSource>(&self, request: &mut RequestView<'_, S>) -> bool {
        self.config
            .content_type
            .and_then(|id| request.get(id))
            .is_some_and(is_grpc)
    }

    /// Where the request's breaker record is, and the fingerprint of its key. `None` when the
    /// route's record is missing (cannot happen with a compiled config).
    fn records<'e, S: AttributeSource>(
        &'e self,
        policy: &'e CircuitBreakerPolicy,
        choice: &'e RouteBreaker,
        request: &mut RequestView<'_, S>,
    ) -> Option<(Records<'e>, u64)> {
        match (&policy.key, &policy.table, &choice.record) {
            (BreakerKey::Route, _, Some(key)) => Some((Records::One(key), 1)),
            (BreakerKey::Cluster(id) | BreakerKey::Header(id), Some(table), _) => {
                // A missing value is a key of its own (the empty value).
                let value = request.get(*id).unwrap_or_default();
                let mut hasher = KeyHasher::new(policy.seed, self.secret.get());
                hasher.part(value, Form::Exact);
                // 1 is the overflow record's.
                let fingerprint = hasher.finish().max(2);
                Some((Records::Table(table), fingerprint))
            }
            _ => None,
        }
    }

    /// The records of a stream's breaker, found again from its route without reading the request.
    fn records_of<'e>(
        &'e self,
        route: &'e Route,
    ) -> Option<(&'e CircuitBreakerPolicy, &'e BreakerRuntime, Records<'e>)> {
        let choice = route.policies.circuit_breaker.as_ref()?;
        let policy = self.config.circuit_breakers.get(choice.policy)?;
        let runtime = self.circuit_breakers.get(choice.policy)?;
        let records = match (&policy.table, &choice.record) {
            (Some(table), _) => Records::Table(table),
            (None, Some(key)) => Records::One(key),
            (None, None) => return None,
        };
        Some((policy, runtime, records))
    }

    /// Whether the stream's outcome must be reported through [`Engine::on_stream_end`]: the host
    /// reads the response facts only then.
    pub fn wants_outcome(&self, stream: &StreamState) -> bool {
        stream.breaker.is_some() || stream.faults.holding != 0 || self.wants_status(stream)
    }

    /// Whether the host should read the response's `:status` for this stream.
    pub fn wants_status(&self, stream: &StreamState) -> bool {
        stream.breaker.is_some() || stream.degradation.is_some_and(|ticket| ticket.reported)
    }

    /// Records how the stream ended with its breaker: called once, when the stream is done (also
    /// when it died without a response, so a probe always gives back its slot).
    pub fn on_stream_end(
        &self,
        stream: &StreamState,
        facts: &mut impl ResponseFacts,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
    ) {
        let Some(route) = stream.route.and_then(|index| self.config.routes.get(index)) else {
            return;
        };
        self.release_faults(route, &stream.faults, now, store, metrics);
        self.note_outcome(route, stream, facts);
        let Some(ticket) = stream.breaker else {
            return;
        };
        let Some((policy, runtime, _)) = self.records_of(route) else {
            return;
        };
        let elapsed = stream
            .responded
            .map(|responded| responded.saturating_since(stream.started));
        let outcome = policy.classifier.outcome(facts, elapsed, ticket.grpc);
        if let Outcome::Completed { failed, slow } = outcome {
            let counters = &runtime.metrics;
            metrics.increment(
                if failed {
                    counters.failures
                } else {
                    counters.successes
                },
                1,
            );
            if slow {
                metrics.increment(counters.slow_calls, 1);
            }
        }
        self.settle(route, ticket, outcome, now, store, metrics);
    }

    /// Gives back the active-fault slots (and gauge) a finished stream held.
    fn release_faults(
        &self,
        route: &Route,
        faults: &FaultState,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
    ) {
        for (position, &index) in route.policies.faults.iter().enumerate().take(8) {
            if faults.holding & (1 << position) == 0 {
                continue;
            }
            let (Some(policy), Some(runtime)) =
                (self.config.faults.get(index), self.faults.get(index))
            else {
                continue;
            };
            let counters = &runtime.metrics;
            metrics.increment(counters.active, -1);
            if policy.max_active.is_some() {
                match chaos::give_back_slot(
                    store,
                    &policy.active_key,
                    faults.slot_epoch,
                    now.as_nanos(),
                ) {
                    Ok(races) if races > 0 => {
                        metrics.increment(counters.cas_retries, i64::from(races))
                    }
                    Ok(_) => {}
                    // The cap stays stricter until the slot's epoch is written off (at most
                    // two `SLOT_EPOCH`s after it was taken).
                    Err(UpdateError::Exhausted { .. }) => {
                        metrics.increment(counters.cas_exhausted, 1)
                    }
                    Err(UpdateError::Store(_)) => metrics.increment(counters.store_errors, 1),
                }
            }
        }
    }

    /// Applies an outcome to the record the request was admitted from.
    fn settle(
        &self,
        route: &Route,
        ticket: BreakerTicket,
        outcome: Outcome,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
    ) {
        let Some((policy, runtime, records)) = self.records_of(route) else {
            return;
        };
        let counters = &runtime.metrics;
        let (recorded, races) = circuit_breaker::record(
            &policy.breaker,
            store,
            records,
            ticket.at,
            ticket.role,
            outcome,
            now.as_nanos(),
        );
        if races > 0 {
            metrics.increment(counters.cas_retries, i64::from(races));
        }
        match recorded {
            Recorded::Applied(Some(transition)) => count_transition(counters, transition, metrics),
            Recorded::Applied(None) | Recorded::Stale => {}
            Recorded::Failed(error) => count_failure(counters, error, metrics),
        }
    }

    /// Takes a token from every limit on the route, all or nothing: when one limit refuses, the
    /// tokens already taken for this request are given back, so a refused request costs the other
    /// limits nothing. Returns the most restrictive limit's status, or the refusal.
    fn rate_limit<S: AttributeSource>(
        &self,
        route: &Route,
        request: &mut RequestView<'_, S>,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
        scale_ppm: Option<u32>,
    ) -> Result<Option<RateLimitStatus>, LocalReply<'_>> {
        let mut status: Option<RateLimitStatus> = None;
        let mut taken = 0u32;
        for (position, &policy_index) in route.policies.rate_limits.iter().enumerate() {
            let (Some(policy), Some(counters)) = (
                self.config.rate_limits.get(policy_index),
                self.rate_limits.get(policy_index),
            ) else {
                continue;
            };
            let mut buffer = KeyBuf::default();
            let BucketChoice::Key(key) = bucket(policy, request, self.secret.get(), &mut buffer)
            else {
                metrics.increment(counters.exempt, 1);
                continue;
            };
            let gcra = scale_ppm.map_or(policy.gcra, |ppm| policy.gcra.scaled(ppm));
            let (acquired, retries) = rate_limit::acquire(&gcra, store, key, now.as_nanos());
            if retries > 0 {
                metrics.increment(counters.cas_retries, i64::from(retries));
            }
            let (retry_in, full_in) = match acquired {
                Acquired::Allowed { remaining, full_in } => {
                    metrics.increment(counters.allowed, 1);
                    taken |= 1 << position;
                    let candidate = RateLimitStatus {
                        limit: gcra.burst(),
                        remaining,
                        reset: full_in,
                    };
                    if policy.response_headers
                        && status.is_none_or(|s| candidate.remaining < s.remaining)
                    {
                        status = Some(candidate);
                    }
                    continue;
                }
                Acquired::Limited { retry_in, full_in } => (retry_in, full_in),
                Acquired::Failed(failure) => {
                    let counter = match failure {
                        AcquireFailure::CasExhausted => counters.cas_exhausted,
                        AcquireFailure::Store(_) => counters.store_errors,
                    };
                    metrics.increment(counter, 1);
                    metrics.increment(counters.failure_mode_applied, 1);
                    match policy.failure_mode {
                        FailureMode::Open => continue,
                        FailureMode::Closed => (gcra.interval(), gcra.interval()),
                    }
                }
            };
            let limited = RateLimitStatus {
                limit: gcra.burst(),
                remaining: 0,
                reset: full_in,
            };
            if policy.mode == Mode::Shadow {
                metrics.increment(counters.shadow_limited, 1);
                if policy.response_headers {
                    status = Some(limited);
                }
                continue;
            }
            metrics.increment(counters.limited, 1);
            self.give_back(route, taken, request, store, scale_ppm);
            let grpc = self.is_grpc(request);
            return Err(LocalReply {
                degraded: None,
                status: policy.on_limit.status,
                body: &policy.on_limit.body,
                headers: &policy.on_limit.headers,
                retry_after: Some(retry_in),
                grpc_status: grpc.then_some(GRPC_RESOURCE_EXHAUSTED),
                rate_limit: policy.response_headers.then_some(limited),
            });
        }
        Ok(status)
    }

    /// Refunds the tokens taken (bit set `taken`, by position on the route) for a refused request.
    fn give_back<S: AttributeSource>(
        &self,
        route: &Route,
        taken: u32,
        request: &mut RequestView<'_, S>,
        store: &impl SharedStore,
        scale_ppm: Option<u32>,
    ) {
        for (position, &policy_index) in route.policies.rate_limits.iter().enumerate() {
            if taken & (1 << position) == 0 {
                continue;
            }
            let Some(policy) = self.config.rate_limits.get(policy_index) else {
                continue;
            };
            let mut buffer = KeyBuf::default();
            if let BucketChoice::Key(key) = bucket(policy, request, self.secret.get(), &mut buffer)
            {
                // A refund that fails leaves the limit stricter, never looser.
                let gcra = scale_ppm.map_or(policy.gcra, |ppm| policy.gcra.scaled(ppm));
                let _ = rate_limit::refund(&gcra, store, key);
            }
        }
    }

    /// Called with the response headers: notes when they came and says what to change.
    pub fn on_response(
        &self,
        stream: &mut StreamState,
        now: Timestamp,
        metrics: &impl MetricSink,
    ) -> ResponseDecision<'_> {
        stream.responded = Some(now);
        let fault = stream.faults.response.and_then(|position| {
            let route = self.config.routes.get(stream.route?)?;
            let index = *route.policies.faults.get(usize::from(position))?;
            let response = self.config.faults.get(index)?.response.as_ref()?;
            metrics.increment(self.faults.get(index)?.metrics.response_faults, 1);
            Some(FaultedResponse {
                status: response.status,
                body: response.body.as_deref(),
            })
        });
        let route_header = if self.config.debug.route_header {
            stream
                .route
                .and_then(|index| self.config.routes.get(index))
                .map(|route| route.name.as_str())
        } else {
            None
        };
        ResponseDecision {
            route_header,
            rate_limit: stream.rate_limit,
            fault,
            degraded: self.degraded_header(stream),
        }
    }
}

/// Faults a request asked for by header (with the right secret): value and share in ppm.
#[derive(Debug, Clone, Copy, Default)]
struct AskedFaults {
    abort: Option<(u16, u32)>,
    delay: Option<(Duration, u32)>,
}

/// Counts a transition once: only the worker whose write landed reports it, so the `open` and
/// `half_open` gauges add up to the number of keys in each state.
fn count_transition(counters: &BreakerMetrics, transition: Transition, metrics: &impl MetricSink) {
    let (counter, open, half_open) = match transition {
        Transition::Opened => (counters.opened, 1, 0),
        Transition::HalfOpened => (counters.half_opened, -1, 1),
        Transition::Reopened => (counters.reopened, 1, -1),
        Transition::Closed => (counters.closed, 0, -1),
        Transition::ProbesRestarted => (counters.probes_restarted, 0, 0),
    };
    metrics.increment(counter, 1);
    if open != 0 {
        metrics.increment(counters.open, open);
    }
    if half_open != 0 {
        metrics.increment(counters.half_open, half_open);
    }
}

/// A breaker that cannot read or write its record fails open: the request goes on untracked.
fn count_failure(counters: &BreakerMetrics, error: UpdateError, metrics: &impl MetricSink) {
    let counter = match error {
        UpdateError::Exhausted { .. } => counters.cas_exhausted,
        UpdateError::Store(_) => counters.store_errors,
    };
    metrics.increment(counter, 1);
    metrics.increment(counters.untracked, 1);
}

fn is_grpc(content_type: &[u8]) -> bool {
    content_type.len() >= 16 && content_type[..16].eq_ignore_ascii_case(b"application/grpc")
}

/// The bucket this request uses under `policy`.
fn bucket<'k, S: AttributeSource>(
    policy: &'k RateLimitPolicy,
    request: &mut RequestView<'_, S>,
    secret: u64,
    buffer: &'k mut KeyBuf,
) -> BucketChoice<'k> {
    let hash = match &policy.buckets {
        Buckets::Keyed { seed, .. } => key_hash(&policy.key, request, *seed, secret),
        Buckets::Single { .. } => None,
    };
    policy.buckets.choose(hash, buffer)
}

/// The keyed hash of a client key, each part read once (the view caches it) and hashed in its
/// canonical form: no allocation. `None` when a part is missing.
fn key_hash<S: AttributeSource>(
    key: &[KeyPart],
    request: &mut RequestView<'_, S>,
    seed: u64,
    secret: u64,
) -> Option<u64> {
    let mut hasher = KeyHasher::new(seed, secret);
    for part in key {
        let (id, form) = match *part {
            KeyPart::Raw(id) => (id, Form::Exact),
            KeyPart::ClientIp(id) => (id, Form::Address),
            KeyPart::Path(id) => (id, Form::Path),
            KeyPart::Authority(id) => (id, Form::Authority),
        };
        hasher.part(request.get(id)?, form);
    }
    Some(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let reply = |wait| LocalReply {
            degraded: None,
            status: 429,
            body: b"",
            headers: &[],
            retry_after: wait,
            grpc_status: None,
            rate_limit: None,
        };
        assert_eq!(
            reply(Some(Duration::from_millis(1200))).retry_after_seconds(),
            Some(2)
        );
        assert_eq!(
            reply(Some(Duration::from_secs(3))).retry_after_seconds(),
            Some(3)
        );
        assert_eq!(
            reply(Some(Duration::from_nanos(1))).retry_after_seconds(),
            Some(1)
        );
        assert_eq!(reply(None).retry_after_seconds(), None);
    }

    #[test]
    fn grpc_is_recognised_by_content_type_prefix() {
        assert!(is_grpc(b"application/grpc"));
        assert!(is_grpc(b"application/grpc+proto"));
        assert!(is_grpc(b"Application/GRPC"));
        assert!(!is_grpc(b"application/json"));
        assert!(!is_grpc(b"application/grp"));
    }
}
