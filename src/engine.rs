//! The core's entry points per stream: what to do with a request, and what to add to its response.
//!
//! The host calls these with the request's attributes, the time, the shared store and the metric
//! sink, and carries out the returned decision. Everything per request is decided here, in plain
//! Rust, so the whole pipeline runs in native tests against fakes; the host only translates.
//! Metric names are built once in [`Engine::new`]; the request path bumps ids and allocates
//! nothing.

use core::time::Duration;

use crate::clock::Timestamp;
use crate::config::circuit_breaker::{BreakerKey, BreakerMode};
use crate::config::rate_limit::{KeyPart, MAX_KEY_PARTS};
use crate::config::{CircuitBreakerPolicy, PluginConfig, RateLimitPolicy};
use crate::metrics::{
    metric_name, MetricId, MetricKind, MetricSink, MetricsError, MetricsRegistry,
};
use crate::policy::circuit_breaker::{
    self, Admission, Admitted, BreakerState, Located, Outcome, Recorded, Records, ResponseFacts,
    Role, Transition,
};
use crate::policy::rate_limit::{
    self, AcquireFailure, Acquired, BucketChoice, FailureMode, Mode, Tat,
};
use crate::policy::route::{without_query, Route, RouteBreaker, RouteIndex};
use crate::request::{AttributeSource, RequestView};
use crate::state::cas::ensure;
use crate::state::cas::UpdateError;
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

/// A compiled config with its metrics defined: what one worker consults on every request.
#[derive(Debug)]
pub struct Engine {
    config: PluginConfig,
    route_requests: Vec<MetricId>,
    unmatched: MetricId,
    rate_limits: Vec<RateLimitMetrics>,
    circuit_breakers: Vec<BreakerRuntime>,
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
}

/// A request's place in its route's breaker: which record, and whether it is a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerTicket {
    pub at: Located,
    pub role: Role,
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
}

/// What to add to a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResponseDecision<'a> {
    /// `x-seawall-route` value, when debug headers are on and a route matched.
    pub route_header: Option<&'a str>,
    pub rate_limit: Option<RateLimitStatus>,
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
        Ok(Engine {
            config,
            route_requests,
            unmatched,
            rate_limits,
            circuit_breakers,
        })
    }

    pub fn config(&self) -> &PluginConfig {
        &self.config
    }

    /// Whether any request can be affected. A pass-through engine lets the host skip reading
    /// anything at all.
    pub fn is_pass_through(&self) -> bool {
        self.config.routes.is_empty()
    }

    /// Creates every shared-data key the policies can touch, before any request does (see
    /// `SharedStore` on why inserts race). Existing keys keep their state across reloads. Returns
    /// how many keys were written.
    pub fn prepare_state(&self, store: &impl SharedStore) -> Result<usize, StoreError> {
        let mut created = 0;
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
                for slot in 0..table.slots() {
                    created += usize::from(ensure(store, table.key(slot, &mut buffer), &fresh)?);
                }
            }
        }
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
        let index = self.config.routes.find(request);
        let mut stream = StreamState {
            route: index,
            started: now,
            rate_limit: None,
            breaker: None,
            responded: None,
        };
        let Some((index, route)) = index.and_then(|i| Some((i, self.config.routes.get(i)?))) else {
            metrics.increment(self.unmatched, 1);
            return RequestDecision {
                stream,
                verdict: Verdict::Continue,
            };
        };
        if let Some(&counter) = self.route_requests.get(usize::from(index.0)) {
            metrics.increment(counter, 1);
        }
        if let Some(choice) = &route.policies.circuit_breaker {
            match self.admit(choice, request, now, store, metrics) {
                Ok(ticket) => stream.breaker = ticket,
                Err(reply) => {
                    return RequestDecision {
                        stream,
                        verdict: Verdict::Reply(reply),
                    }
                }
            }
        }
        let verdict = match self.rate_limit(route, request, now, store, metrics) {
            Ok(status) => {
                stream.rate_limit = status;
                Verdict::Continue
            }
            Err(reply) => {
                // The request never reaches the upstream, so it says nothing about it: a probe
                // slot it took goes back.
                if let Some(ticket) = stream.breaker.take() {
                    self.settle(route, ticket, Outcome::Abandoned, now, store, metrics);
                }
                Verdict::Reply(reply)
            }
        };
        RequestDecision { stream, verdict }
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
        match admission {
            Admission::Pass => Ok(Some(BreakerTicket {
                at,
                role: Role::Counted,
            })),
            Admission::Probe { generation } => {
                metrics.increment(counters.probes, 1);
                Ok(Some(BreakerTicket {
                    at,
                    role: Role::Probe { generation },
                }))
            }
            Admission::Reject { .. } if policy.mode == BreakerMode::Shadow => {
                metrics.increment(counters.shadow_rejected, 1);
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
                let fingerprint = hash_parts(policy.seed, &[value]);
                Some((Records::Table(table), fingerprint.max(1)))
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
        stream.breaker.is_some()
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
        let (Some(ticket), Some(route)) = (
            stream.breaker,
            stream.route.and_then(|index| self.config.routes.get(index)),
        ) else {
            return;
        };
        let Some((policy, runtime, _)) = self.records_of(route) else {
            return;
        };
        let elapsed = stream
            .responded
            .map(|responded| responded.saturating_since(stream.started));
        let outcome = policy.classifier.outcome(facts, elapsed);
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
            let BucketChoice::Key(key) = bucket(policy, request, &mut buffer) else {
                metrics.increment(counters.exempt, 1);
                continue;
            };
            let (acquired, retries) = rate_limit::acquire(&policy.gcra, store, key, now.as_nanos());
            if retries > 0 {
                metrics.increment(counters.cas_retries, i64::from(retries));
            }
            let (retry_in, full_in) = match acquired {
                Acquired::Allowed { remaining, full_in } => {
                    metrics.increment(counters.allowed, 1);
                    taken |= 1 << position;
                    let candidate = RateLimitStatus {
                        limit: policy.gcra.burst(),
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
                        FailureMode::Closed => (policy.gcra.interval(), policy.gcra.interval()),
                    }
                }
            };
            let limited = RateLimitStatus {
                limit: policy.gcra.burst(),
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
            self.give_back(route, taken, request, store);
            let grpc = self.is_grpc(request);
            return Err(LocalReply {
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
    ) {
        for (position, &policy_index) in route.policies.rate_limits.iter().enumerate() {
            if taken & (1 << position) == 0 {
                continue;
            }
            let Some(policy) = self.config.rate_limits.get(policy_index) else {
                continue;
            };
            let mut buffer = KeyBuf::default();
            if let BucketChoice::Key(key) = bucket(policy, request, &mut buffer) {
                // A refund that fails leaves the limit stricter, never looser.
                let _ = rate_limit::refund(&policy.gcra, store, key);
            }
        }
    }

    /// Called with the response headers: notes when they came and says what to add to them.
    pub fn on_response(&self, stream: &mut StreamState, now: Timestamp) -> ResponseDecision<'_> {
        stream.responded = Some(now);
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
        }
    }
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

/// The bucket this request uses under `policy`. Reads each key part once (the view caches it),
/// then hashes the parts together from a fixed array: no allocation.
fn bucket<'k, S: AttributeSource>(
    policy: &'k RateLimitPolicy,
    request: &mut RequestView<'_, S>,
    buffer: &'k mut KeyBuf,
) -> BucketChoice<'k> {
    let mut complete = true;
    for part in &policy.key {
        let (KeyPart::Raw(id) | KeyPart::ClientIp(id) | KeyPart::Path(id)) = *part;
        complete &= request.get(id).is_some();
    }
    if !complete {
        return policy.buckets.choose(None, buffer);
    }
    let mut parts: [&[u8]; MAX_KEY_PARTS] = [&[]; MAX_KEY_PARTS];
    for (slot, part) in parts.iter_mut().zip(&policy.key) {
        *slot = match *part {
            KeyPart::Raw(id) => request.peek(id).unwrap_or_default(),
            KeyPart::ClientIp(id) => request.peek(id).map(strip_port).unwrap_or_default(),
            KeyPart::Path(id) => request.peek(id).map(without_query).unwrap_or_default(),
        };
    }
    let used = policy.key.len().min(MAX_KEY_PARTS);
    policy.buckets.choose(Some(&parts[..used]), buffer)
}

/// `10.0.0.1:5678` -> `10.0.0.1`; `[::1]:5678` -> `::1`; a bare IPv6 address stays as it is.
fn strip_port(address: &[u8]) -> &[u8] {
    if address.first() == Some(&b'[') {
        let close = address
            .iter()
            .position(|&b| b == b']')
            .unwrap_or(address.len());
        return &address[1..close];
    }
    let colons = address.iter().filter(|&&b| b == b':').count();
    match address.iter().rposition(|&b| b == b':') {
        Some(colon) if colons == 1 => &address[..colon],
        _ => address,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let reply = |wait| LocalReply {
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
    fn client_addresses_lose_their_port() {
        assert_eq!(strip_port(b"10.0.0.1:5678"), b"10.0.0.1");
        assert_eq!(strip_port(b"[2001:db8::1]:443"), b"2001:db8::1");
        assert_eq!(strip_port(b"2001:db8::1"), b"2001:db8::1");
        assert_eq!(strip_port(b"10.0.0.1"), b"10.0.0.1");
        assert_eq!(strip_port(b"[broken"), b"broken");
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
