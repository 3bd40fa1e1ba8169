//! The circuit-breaker stage: admitting a request against its key's record, and settling the
//! call's outcome on the record it was admitted from.

use crate::clock::Timestamp;
use crate::config::circuit_breaker::{BreakerKey, BreakerMode};
use crate::config::CircuitBreakerPolicy;
use crate::metrics::{
    metric_name, MetricId, MetricKind, MetricSink, MetricsError, MetricsRegistry,
};
use crate::policy::circuit_breaker::{
    self, Admission, Admitted, BreakerState, Outcome, Recorded, Records, ResponseFacts, Role,
    Transition,
};
use crate::policy::key::{Form, KeyHasher};
use crate::policy::route::{Route, RouteBreaker};
use crate::request::{AttributeSource, RequestView};
use crate::state::cas::{ensure, UpdateError};
use crate::state::slots::KeyBuf;
use crate::state::{SharedStore, StoreError};
use core::time::Duration;

use super::*;

/// gRPC's UNAVAILABLE, what a gRPC call refused by an open breaker receives.
pub const GRPC_UNAVAILABLE: u32 = 14;

/// Added to every reply of an open (or half-open and busy) breaker, so clients and dashboards can
/// tell a breaker's refusal from the upstream's own 503.
pub const CIRCUIT_HEADER: &str = "x-seawall-circuit";

/// What a breaker needs beyond its policy: its metrics and its ready-made reply headers.
#[derive(Debug)]
pub(super) struct BreakerRuntime {
    pub(super) metrics: BreakerMetrics,
    pub(super) open_headers: Vec<(String, String)>,
    pub(super) half_open_headers: Vec<(String, String)>,
}

impl BreakerRuntime {
    /// Defines the policy's metrics and builds its reply headers.
    pub(super) fn new(
        policy: &CircuitBreakerPolicy,
        registry: &mut impl MetricsRegistry,
    ) -> Result<Self, MetricsError> {
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
        Ok(BreakerRuntime {
            metrics,
            open_headers: with_state("open"),
            half_open_headers: with_state("half-open"),
        })
    }
}

/// `seawall.circuit_breaker.<name>.<counter>`; `open` and `half_open` are gauges counting keys.
#[derive(Debug, Clone, Copy)]
pub(super) struct BreakerMetrics {
    pub(super) successes: MetricId,
    pub(super) failures: MetricId,
    pub(super) slow_calls: MetricId,
    pub(super) rejected: MetricId,
    pub(super) shadow_rejected: MetricId,
    pub(super) probes: MetricId,
    pub(super) opened: MetricId,
    pub(super) half_opened: MetricId,
    pub(super) reopened: MetricId,
    pub(super) closed: MetricId,
    pub(super) probes_restarted: MetricId,
    pub(super) untracked: MetricId,
    /// Admissions from the table's overflow record (every slot the key may use was held).
    pub(super) overflow: MetricId,
    pub(super) cas_retries: MetricId,
    pub(super) cas_exhausted: MetricId,
    pub(super) store_errors: MetricId,
    pub(super) open: MetricId,
    pub(super) half_open: MetricId,
}

/// Counts a transition once: only the worker whose write landed reports it, so the `open` and
/// `half_open` gauges add up to the number of keys in each state.
pub(super) fn count_transition(
    counters: &BreakerMetrics,
    transition: Transition,
    metrics: &impl MetricSink,
) {
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
pub(super) fn count_failure(
    counters: &BreakerMetrics,
    error: UpdateError,
    metrics: &impl MetricSink,
) {
    let counter = match error {
        UpdateError::Exhausted { .. } => counters.cas_exhausted,
        UpdateError::Store(_) => counters.store_errors,
    };
    metrics.increment(counter, 1);
    metrics.increment(counters.untracked, 1);
}

impl Engine {
    /// Creates every record: each keyed table's slots and, one past them, its overflow record,
    /// and each route's own record.
    pub(super) fn prepare_breakers(&self, store: &impl SharedStore) -> Result<usize, StoreError> {
        let mut created = 0;
        let fresh = BreakerState::fresh();
        for table in self
            .config
            .circuit_breakers
            .iter()
            .filter_map(|p| p.table.as_ref())
        {
            let mut buffer = KeyBuf::default();
            for slot in 0..=table.slots() {
                created += usize::from(ensure(store, table.key(slot, &mut buffer), &fresh)?);
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

    /// Settles the call's outcome with the breaker it was admitted by, when the stream is done.
    pub(super) fn breaker_outcome(
        &self,
        route: &Route,
        stream: &StreamState,
        facts: &mut impl ResponseFacts,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
    ) {
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

    /// Asks the route's breaker whether the request may go on. `Ok(None)`: it goes on untracked
    /// (a disabled breaker, a shadow rejection, or a failure that fails open).
    pub(super) fn admit<S: AttributeSource>(
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
    pub(super) fn circuit_open_reply<'e, S: AttributeSource>(
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

    /// Where the request's breaker record is, and the fingerprint of its key. `None` when the
    /// route's record is missing (cannot happen with a compiled config).
    pub(super) fn records<'e, S: AttributeSource>(
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
    pub(super) fn records_of<'e>(
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

    /// Applies an outcome to the record the request was admitted from.
    pub(super) fn settle(
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
}

impl Engine {
    /// Adds the closed-state successes this worker tallied to the shared windows. Called on the worker's tick (see [`Engine::on_worker_tick`]).
    pub(super) fn settle_breaker_tallies(
        &self,
        _now: Timestamp,
        _store: &impl SharedStore,
        _metrics: &impl MetricSink,
        _retiring: bool,
    ) {
    }
}
