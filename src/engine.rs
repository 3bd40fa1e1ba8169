//! The request pipeline: the stages in their fixed order, and how they compose.
//!
//! The host calls these entry points with the request's attributes, the time, the shared store
//! and the metric sink, and carries out the returned decision; it decides nothing. Each stage is
//! one module under `engine/` with the same parts: its runtime (metrics, ready-made headers)
//! built in [`Engine::new`], the keys it creates in `prepare_state` (`lifecycle.rs`), what it
//! decides on the request, what it adds to the response, what it settles when the stream ends,
//! and, for degradation, its tick. `decision.rs` is the plain data handed to the host. This file
//! runs the stages in this order and states their composition rules in one place (`decide`):
//!
//! 1. routing (`routing.rs`): a client's reroute header is removed before anything reads
//!    `xds.*`, then the route is matched;
//! 2. degradation (`degradation.rs`): admission control, fallback and shedding answer at once;
//!    the level's actions (reroute, rate-limit factor, retries off) apply to the stages after it;
//! 3. the circuit breaker (`breaker.rs`), unless the request is rerouted;
//! 4. the rate limits (`limits.rs`), all or none; a refused request gives back its breaker probe
//!    slot;
//! 5. the faults (`fault.rs`): an injected abort is no outcome for the breaker or degradation, and
//!    gets no retries; outcomes are timed from the end of an injected delay;
//! 6. the retry grant (`retries.rs`): none for a probe, a would-be breaker refusal, or a level
//!    without retries.
//!
//! A stage that answers the request ends it, and a refusal during a degradation level says so.
//! Metric names are built once in [`Engine::new`]; the request path bumps ids and allocates
//! nothing.

mod breaker;
mod decision;
mod degradation;
mod fault;
mod lifecycle;
mod limits;
mod retries;
mod routing;

pub use breaker::{CIRCUIT_HEADER, GRPC_UNAVAILABLE};
pub use decision::*;
pub use degradation::{DEGRADED_HEADER, TICK as DEGRADATION_TICK};
pub use fault::FAULT_HEADER;
/// The client-key hash of keyed policies, for the fuzz targets only (see `fuzz/`).
#[doc(hidden)]
pub use limits::key_hash;
pub use limits::{GlobalCall, GLOBAL_TICK, GRPC_RESOURCE_EXHAUSTED};
pub use retries::ATTEMPT_COUNT_HEADER;

use core::cell::Cell;

use breaker::BreakerRuntime;
use degradation::DegradationRuntime;
use fault::FaultRuntime;
use limits::RateLimitRuntime;
use retries::RetryRuntime;
use routing::Routing;

use crate::clock::Timestamp;
use crate::config::PluginConfig;
use crate::metrics::{MetricSink, MetricsError, MetricsRegistry};
use crate::policy::circuit_breaker::{Outcome, ResponseFacts};
use crate::policy::fault::Random;
use crate::request::{AttributeSource, RequestView};
use crate::state::SharedStore;

/// Adds `x-seawall-route: <name>` to responses when `debug.route_header` is on.
pub const ROUTE_HEADER: &str = "x-seawall-route";

/// A compiled config with its metrics defined: what one worker consults on every request.
#[derive(Debug)]
pub struct Engine {
    config: PluginConfig,
    routing: Routing,
    rate_limits: Vec<RateLimitRuntime>,
    circuit_breakers: Vec<BreakerRuntime>,
    faults: Vec<FaultRuntime>,
    retries: Vec<RetryRuntime>,
    degradations: Vec<DegradationRuntime>,
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
        let routing = Routing::define(&config, registry)?;
        let rate_limits = each(&config.rate_limits, registry, RateLimitRuntime::define)?;
        let circuit_breakers = each(&config.circuit_breakers, registry, BreakerRuntime::new)?;
        let faults = each(&config.faults, registry, FaultRuntime::new)?;
        let retries = each(&config.retries, registry, RetryRuntime::define)?;
        let degradations = each(&config.degradations, registry, DegradationRuntime::new)?;
        let secret_key = format!("sw:{}:secret", config.name);
        let generation_key = format!("sw:{}:generation", config.name);
        Ok(Engine {
            config,
            routing,
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

    /// Whether the host must call [`Engine::on_worker_tick`] every [`DEGRADATION_TICK`]: any
    /// config with a route keeps worker-local state (batched metrics, leases, tallies) that the
    /// tick settles.
    pub fn needs_tick(&self) -> bool {
        !self.is_pass_through()
    }

    /// The worker's tick for its local fast paths: each stage settles what it keeps locally
    /// (tallies go to shared data, unused leases go back). Also called when the config is retired
    /// (`retiring`), so nothing leased is kept by a config that no longer decides.
    pub fn on_worker_tick(
        &self,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
        retiring: bool,
    ) {
        self.settle_limit_leases(now, store, metrics, retiring);
        self.settle_breaker_tallies(now, store, metrics, retiring);
        self.settle_retry_tallies(now, store, metrics, retiring);
    }

    /// Whether any request can be affected. A pass-through engine lets the host skip reading
    /// anything at all.
    pub fn is_pass_through(&self) -> bool {
        self.config.routes.is_empty()
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
        let index = self.routing.route(&self.config, request, metrics);
        let mut stream = StreamState::new(index, now);
        let Some((index, route)) = index.and_then(|i| Some((i, self.config.routes.get(i)?))) else {
            return RequestDecision::passed(stream);
        };
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
        // A refusal during a degradation level says so.
        let refused = |stream, reply| {
            let degraded = degrade.level_name;
            RequestDecision::answered(stream, LocalReply { degraded, ..reply })
        };
        if let Some(choice) = breaker {
            let open = &mut stream.breaker_open;
            match self.admit(choice, request, now, store, metrics, open) {
                Ok(ticket) => stream.breaker = ticket,
                Err(reply) => return refused(stream, reply),
            }
        }
        match self.rate_limit(route, request, now, store, metrics, degrade.rate_limit_ppm) {
            Ok(status) => stream.rate_limit = status,
            Err(reply) => {
                // The request never reaches the upstream, so it says nothing about it: a probe
                // slot it took goes back.
                if let Some(ticket) = stream.breaker.take() {
                    self.settle(route, ticket, Outcome::Abandoned, now, store, metrics);
                }
                return refused(stream, reply);
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
                let probe = stream.breaker.is_some_and(|ticket| ticket.is_probe());
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

    /// Whether the stream's outcome must be reported through [`Engine::on_stream_end`]: the host
    /// reads the response facts only then.
    pub fn wants_outcome(&self, stream: &StreamState) -> bool {
        stream.breaker.is_some() || stream.faults.holding != 0 || self.wants_status(stream)
    }

    /// Whether the response's time matters for this stream (its latency, its retries' push-back,
    /// or its outcome): otherwise the host spares the clock read.
    pub fn wants_response_time(&self, stream: &StreamState) -> bool {
        self.wants_outcome(stream) || stream.retry.is_some()
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

/// Defines each policy's runtime (its metrics), in the config's order.
fn each<P, R, M: MetricsRegistry>(
    policies: &[P],
    registry: &mut M,
    define: impl Fn(&P, &mut M) -> Result<R, MetricsError>,
) -> Result<Vec<R>, MetricsError> {
    policies
        .iter()
        .map(|policy| define(policy, registry))
        .collect()
}
