//! The request pipeline: the stages in their fixed order, and how they compose.
//!
//! The host calls these entry points with the request's attributes, the time, the shared store
//! and the metric sink, and carries out the returned decision; it decides nothing. One module per
//! stage under `engine/` holds that policy's runtime and its part of each callback. This file
//! runs them, in this order, and states their composition rules in one place (`decide`):
//!
//! 1. a client's reroute header is removed, before anything reads `xds.*`;
//! 2. the route is matched;
//! 3. degradation: admission control, fallback and shedding answer at once; the level's actions
//!    (reroute, rate-limit factor, retries off) apply to the stages after it;
//! 4. the circuit breaker, unless the request is rerouted;
//! 5. the rate limits, all or none (a refused request gives back its breaker probe slot);
//! 6. the faults (an injected abort is no outcome for the breaker or degradation, and gets no
//!    retries; outcomes are timed from the end of an injected delay);
//! 7. the retry grant (none for a probe, a would-be breaker refusal, or a level without retries).
//!
//! A stage that answers the request ends it. Metric names are built once in [`Engine::new`]; the
//! request path bumps ids and allocates nothing.

mod breaker;
mod decision;
mod degradation;
mod fault;
mod limits;
mod retries;

pub use decision::*;
pub use degradation::{DEGRADED_HEADER, TICK as DEGRADATION_TICK};

use core::cell::Cell;

use breaker::BreakerRuntime;
use fault::FaultRuntime;
use limits::RateLimitMetrics;
use retries::RetryMetrics;

use crate::clock::Timestamp;
use crate::config::PluginConfig;
use crate::metrics::{
    metric_name, MetricId, MetricKind, MetricSink, MetricsError, MetricsRegistry,
};
use crate::policy::circuit_breaker::{Outcome, ResponseFacts, Role};
use crate::policy::fault::Random;
use crate::policy::key::Secret;
use crate::request::{AttributeId, AttributeSource, RequestView};
use crate::state::cas::{self, ensure, UpdateError};
use crate::state::slots::hash_parts;
use crate::state::{generation, SharedStore, StoreError};

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
        let rate_limits = config
            .rate_limits
            .iter()
            .map(|policy| RateLimitMetrics::define(policy, registry))
            .collect::<Result<Vec<_>, _>>()?;
        let circuit_breakers = config
            .circuit_breakers
            .iter()
            .map(|policy| BreakerRuntime::new(policy, registry))
            .collect::<Result<Vec<_>, _>>()?;
        let faults = config
            .faults
            .iter()
            .map(|policy| FaultRuntime::new(policy, registry))
            .collect::<Result<Vec<_>, _>>()?;
        let retries = config
            .retries
            .iter()
            .map(|policy| RetryMetrics::define(policy, registry))
            .collect::<Result<Vec<_>, _>>()?;
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
    /// `SharedStore` on why inserts race); existing keys keep their state across reloads. Adopts
    /// the deployment's secret for client-key hashes (the one in shared data, or `fresh_secret`,
    /// random from the host, if this is the first config to load) and this config's generation.
    /// Returns how many keys it created.
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
        created += self.prepare_limits(store)?;
        created += self.prepare_breakers(store)?;
        created += self.prepare_budgets(store)?;
        created += self.prepare_fault_slots(store)?;
        created += self.prepare_degradation_state(store)?;
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

    fn is_grpc<S: AttributeSource>(&self, request: &mut RequestView<'_, S>) -> bool {
        self.config
            .content_type
            .and_then(|id| request.get(id))
            .is_some_and(is_grpc)
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
        self.breaker_outcome(route, stream, facts, now, store, metrics);
    }

    /// Called with the response headers: notes when they came and says what to change.
    pub fn on_response(
        &self,
        stream: &mut StreamState,
        now: Timestamp,
        metrics: &impl MetricSink,
    ) -> ResponseDecision<'_> {
        stream.responded = Some(now);
        let fault = self.response_fault(stream, metrics);
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

fn is_grpc(content_type: &[u8]) -> bool {
    content_type.len() >= 16 && content_type[..16].eq_ignore_ascii_case(b"application/grpc")
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn grpc_is_recognised_by_content_type_prefix() {
        assert!(is_grpc(b"application/grpc"));
        assert!(is_grpc(b"application/grpc+proto"));
        assert!(is_grpc(b"Application/GRPC"));
        assert!(!is_grpc(b"application/json"));
        assert!(!is_grpc(b"application/grp"));
    }
}
