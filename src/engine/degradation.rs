//! The engine's side of health-aware degradation: the actions of the current level on each
//! request, this worker's tally of outcomes, and the tick that shares the tally, holds the lease,
//! evaluates the level and sends probes.
//!
//! The request path reads only this worker's copies (the level, the refusal chance of admission
//! control) and bumps local counters: no shared data, no host call beyond the priority header. All
//! sharing happens on the root context's tick, every [`TICK`], so a level change reaches every
//! worker within one tick of its evaluation.

use core::cell::Cell;
use core::time::Duration;

use super::{Engine, LocalReply, Reroute, StreamState, GRPC_UNAVAILABLE};
use crate::clock::{self, Timestamp};
use crate::config::degradation::{DegradationPolicy, Probe};
use crate::metrics::{
    metric_name, MetricId, MetricKind, MetricSink, MetricsError, MetricsRegistry,
};
use crate::policy::circuit_breaker::{BreakerState, Circuit, ResponseFacts, RECORD_LEN};
use crate::policy::degradation::{
    bucket, claim, next_level, throttle_ppm, AdmissionWindow, Admissions, Health, Signals, Tally,
    Window, ADMISSION_LEN, HEALTH_LEN, WINDOW_LEN,
};
use crate::policy::rate_limit::MAX_CAS_ATTEMPTS;
use crate::policy::route::{Route, RouteBreaker, RouteDegradation, RouteIndex};
use crate::request::{AttributeSource, RequestView};
use crate::state::cas::{self, ensure, Step, UpdateError};
use crate::state::generation;
use crate::state::slots::KeyBuf;
use crate::state::window::Counts;
use crate::state::{SharedStore, StoreError};

pub use crate::policy::degradation::TICK;

/// How long a lease lasts without renewal: ten ticks, so a busy worker keeps it and a dead one
/// hands it on within a second.
const LEASE_TTL: Duration = Duration::from_secs(1);

/// Added to every response of a degraded level (and to its local replies).
pub const DEGRADED_HEADER: &str = "x-seawall-degraded";

/// What admission control says on its refusals.
const THROTTLED: &str = "throttled";

/// One degradation policy on one worker.
#[derive(Debug)]
pub(super) struct DegradationRuntime {
    metrics: DegradationMetrics,
    /// This worker's copy of the shared level and when it was entered.
    level: Cell<u8>,
    since: Cell<u64>,
    /// Outcomes since the last tick.
    tally: Cell<Tally>,
    /// Per route under admission control (same order as the policy's): unshared requests and
    /// accepts, and the refusal chance in ppm from the last tick.
    admission: Vec<AdmissionRuntime>,
    /// Per level: the shed reply's and the fallback's headers, each with `x-seawall-degraded`.
    shed_headers: Vec<Vec<(String, String)>>,
    fallback_headers: Vec<Vec<(String, String)>>,
    throttle_headers: Vec<(String, String)>,
}

#[derive(Debug, Default)]
struct AdmissionRuntime {
    pending: Cell<Admissions>,
    refuse_ppm: Cell<u32>,
}

/// `seawall.degradation.<name>.<counter>`; `level` is a gauge.
#[derive(Debug, Clone, Copy)]
struct DegradationMetrics {
    level: MetricId,
    escalated: MetricId,
    deescalated: MetricId,
    shed: MetricId,
    fallback: MetricId,
    rerouted: MetricId,
    throttled: MetricId,
    probes_sent: MetricId,
    probe_successes: MetricId,
    probe_failures: MetricId,
    leases_taken: MetricId,
    cas_retries: MetricId,
    cas_exhausted: MetricId,
    store_errors: MetricId,
}

impl DegradationRuntime {
    pub(super) fn new(
        policy: &DegradationPolicy,
        registry: &mut impl MetricsRegistry,
    ) -> Result<Self, MetricsError> {
        let mut define = |kind: MetricKind, name: &str| {
            registry.define(kind, &metric_name("degradation", &policy.name, name))
        };
        let mut counter = |name: &str| define(MetricKind::Counter, name);
        let metrics = DegradationMetrics {
            escalated: counter("escalated")?,
            deescalated: counter("deescalated")?,
            shed: counter("shed")?,
            fallback: counter("fallback")?,
            rerouted: counter("rerouted")?,
            throttled: counter("throttled")?,
            probes_sent: counter("probes_sent")?,
            probe_successes: counter("probe_successes")?,
            probe_failures: counter("probe_failures")?,
            leases_taken: counter("leases_taken")?,
            cas_retries: counter("cas_retries")?,
            cas_exhausted: counter("cas_exhausted")?,
            store_errors: counter("store_errors")?,
            level: define(MetricKind::Gauge, "level")?,
        };
        let with_level = |headers: &[(String, String)], value: &str| {
            let mut headers = headers.to_vec();
            headers.push((DEGRADED_HEADER.to_owned(), value.to_owned()));
            headers
        };
        Ok(DegradationRuntime {
            metrics,
            level: Cell::new(0),
            since: Cell::new(0),
            tally: Cell::new(Tally::default()),
            admission: policy
                .admission
                .iter()
                .flat_map(|admission| &admission.routes)
                .map(|_| AdmissionRuntime::default())
                .collect(),
            shed_headers: policy
                .levels
                .iter()
                .map(|level| with_level(&policy.on_shed.headers, &level.name))
                .collect(),
            fallback_headers: policy
                .levels
                .iter()
                .map(|level| match &level.fallback {
                    Some(fallback) => with_level(&fallback.reply.headers, &level.name),
                    None => Vec::new(),
                })
                .collect(),
            throttle_headers: with_level(&policy.on_shed.headers, THROTTLED),
        })
    }
}

/// What the current level does to a request that goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Actions<'e> {
    pub level: u8,
    /// The level's name, for `x-seawall-degraded` on the replies of the stages after this one.
    pub level_name: Option<&'e str>,
    pub rate_limit_ppm: Option<u32>,
    pub retries: bool,
    pub reroute: Option<Reroute<'e>>,
}

impl Default for Actions<'_> {
    fn default() -> Self {
        Actions {
            level: 0,
            level_name: None,
            rate_limit_ppm: None,
            retries: true,
            reroute: None,
        }
    }
}

impl Engine {
    fn degradation(&self, policy: usize) -> Option<(&DegradationPolicy, &DegradationRuntime)> {
        Some((
            self.config.degradations.get(policy)?,
            self.degradations.get(policy)?,
        ))
    }

    /// Creates each policy's shared records.
    pub(super) fn prepare_degradation_state(
        &self,
        store: &impl SharedStore,
    ) -> Result<usize, StoreError> {
        let mut created = 0;
        for (policy, runtime) in self.config.degradations.iter().zip(&self.degradations) {
            created += usize::from(ensure::<HEALTH_LEN, _, _>(
                store,
                &policy.health_key,
                &Health::default(),
            )?);
            // A reloaded config starts from the level in force, not from normal.
            if let Some((health, _)) =
                cas::read::<HEALTH_LEN, Health, _>(store, &policy.health_key)?
            {
                let level = usize::from(health.level).min(policy.levels.len());
                runtime.level.set(u8::try_from(level).unwrap_or(0));
                runtime.since.set(health.since);
            }
            created += usize::from(ensure::<WINDOW_LEN, _, _>(
                store,
                &policy.window_key,
                &Window::default(),
            )?);
            for (_, key) in policy.admission.iter().flat_map(|a| &a.routes) {
                created += usize::from(ensure::<ADMISSION_LEN, _, _>(
                    store,
                    key,
                    &AdmissionWindow::default(),
                )?);
            }
        }
        Ok(created)
    }

    fn watched_breaker(&self, policy: &DegradationPolicy) -> Option<usize> {
        let name = policy.breaker.as_ref()?;
        self.config
            .circuit_breakers
            .iter()
            .position(|breaker| &breaker.name == name)
    }

    /// Applies the current level to a request: admission control's refusal, the level's fallback
    /// or its shedding answer locally; otherwise the actions for the rest of the pipeline.
    pub(super) fn degrade<S: AttributeSource>(
        &self,
        route: RouteIndex,
        choice: RouteDegradation,
        request: &mut RequestView<'_, S>,
        now: Timestamp,
        metrics: &impl MetricSink,
    ) -> Result<Actions<'_>, LocalReply<'_>> {
        let Some((policy, runtime)) = self.degradation(choice.policy) else {
            return Ok(Actions::default());
        };
        let counters = &runtime.metrics;
        if let Some(admission) = self.admission_of(policy, runtime, route) {
            let refuse_ppm = admission.refuse_ppm.get();
            if refuse_ppm > 0 && self.next_random() % 1_000_000 < u64::from(refuse_ppm) {
                let mut pending = admission.pending.get();
                pending.merge(&Admissions {
                    requests: 1,
                    accepts: 0,
                });
                admission.pending.set(pending);
                metrics.increment(counters.throttled, 1);
                return Err(LocalReply {
                    degraded: None,
                    status: policy.on_shed.status,
                    body: &policy.on_shed.body,
                    headers: &runtime.throttle_headers,
                    retry_after: Some(Duration::from_secs(1)),
                    grpc_status: self.is_grpc(request).then_some(GRPC_UNAVAILABLE),
                    rate_limit: None,
                });
            }
        }
        let level = runtime.level.get();
        let Some(current) = usize::from(level)
            .checked_sub(1)
            .and_then(|at| policy.levels.get(at))
        else {
            return Ok(Actions::default());
        };
        let position = usize::from(level - 1);
        if let Some(fallback) = current
            .fallback
            .as_ref()
            .filter(|f| f.routes.contains(route.0))
        {
            metrics.increment(counters.fallback, 1);
            return Err(LocalReply {
                degraded: None,
                status: fallback.reply.status,
                body: &fallback.reply.body,
                headers: at_level(&runtime.fallback_headers, position),
                retry_after: None,
                grpc_status: None,
                rate_limit: None,
            });
        }
        if let Some(floor) = current.shed_below {
            let class = match (choice.priority, policy.priority.header) {
                (Some(class), _) => class,
                (None, Some(header)) => policy.priority.of_value(request.get(header)),
                (None, None) => policy.priority.default,
            };
            if class < floor {
                metrics.increment(counters.shed, 1);
                let dwell = policy.rules.get(position).map_or(0, |r| r.min_dwell_nanos);
                let left = runtime
                    .since
                    .get()
                    .saturating_add(dwell)
                    .saturating_sub(now.as_nanos());
                return Err(LocalReply {
                    degraded: None,
                    status: policy.on_shed.status,
                    body: &policy.on_shed.body,
                    headers: at_level(&runtime.shed_headers, position),
                    retry_after: Some(Duration::from_nanos(left).max(Duration::from_secs(1))),
                    grpc_status: self.is_grpc(request).then_some(GRPC_UNAVAILABLE),
                    rate_limit: None,
                });
            }
        }
        let reroute = match current
            .reroute
            .as_ref()
            .filter(|r| r.routes.contains(route.0))
        {
            Some(reroute) => {
                metrics.increment(counters.rerouted, 1);
                Some(Reroute {
                    header: &reroute.header,
                    cluster: &reroute.cluster,
                })
            }
            None => None,
        };
        Ok(Actions {
            level,
            level_name: Some(&current.name),
            rate_limit_ppm: current.rate_limit_ppm,
            retries: current.retries,
            reroute,
        })
    }

    fn admission_of<'e>(
        &self,
        policy: &DegradationPolicy,
        runtime: &'e DegradationRuntime,
        route: RouteIndex,
    ) -> Option<&'e AdmissionRuntime> {
        let position = policy
            .admission
            .as_ref()?
            .routes
            .iter()
            .position(|(index, _)| *index == route.0)?;
        runtime.admission.get(position)
    }

    /// Notes on the stream the level it met, and whether its outcome is the dependency's: only a
    /// request that goes to the dependency itself (not answered locally, not rerouted) says
    /// anything about its health.
    pub(super) fn degradation_admitted(
        &self,
        choice: RouteDegradation,
        actions: &Actions<'_>,
        upstream: bool,
        stream: &mut StreamState,
    ) {
        if self.degradation(choice.policy).is_none() {
            return;
        }
        let rerouted = actions.reroute.is_some();
        stream.degradation = Some(super::DegradationTicket {
            level: actions.level,
            reported: upstream && !rerouted,
        });
    }

    /// Adds a finished stream to this worker's tally (and its route's admission counts). A stream
    /// that ended without a response (the client went away) says nothing.
    pub(super) fn note_outcome(
        &self,
        route: &Route,
        stream: &StreamState,
        facts: &mut impl ResponseFacts,
    ) {
        let (Some(ticket), Some(choice), Some(index)) =
            (stream.degradation, route.policies.degradation, stream.route)
        else {
            return;
        };
        if !ticket.reported {
            return;
        }
        let Some((policy, runtime)) = self.degradation(choice.policy) else {
            return;
        };
        let Some(status) = facts.status() else {
            return;
        };
        let failed = policy.failure_statuses.contains(status);
        let elapsed = stream.responded.map_or(0, |responded| {
            responded.saturating_since(stream.started).as_nanos()
        });
        let elapsed = u64::try_from(elapsed).unwrap_or(u64::MAX);
        let mut tally = runtime.tally.get();
        tally.note(failed, elapsed, &policy.latency_nanos);
        runtime.tally.set(tally);
        if let Some(admission) = self.admission_of(policy, runtime, index) {
            let mut pending = admission.pending.get();
            pending.merge(&Admissions {
                requests: 1,
                accepts: u32::from(!failed),
            });
            admission.pending.set(pending);
        }
    }

    /// `x-seawall-degraded` for a response: the level's name, when above normal.
    pub(super) fn degraded_header(&self, stream: &StreamState) -> Option<&str> {
        let ticket = stream.degradation?;
        let route = self.config.routes.get(stream.route?)?;
        let (policy, _) = self.degradation(route.policies.degradation?.policy)?;
        if !policy.response_header {
            return None;
        }
        let level = policy
            .levels
            .get(usize::from(ticket.level).checked_sub(1)?)?;
        Some(&level.name)
    }

    /// Whether a degradation policy needs the tick's shared work (tally, level, probes).
    pub(super) fn degradation_ticks(&self) -> bool {
        !self.config.degradations.is_empty()
    }

    /// The degradation level this worker currently applies for policy `policy` (0: normal).
    pub fn degradation_level(&self, policy: usize) -> Option<u8> {
        Some(self.degradations.get(policy)?.level.get())
    }

    /// The worker's share of degradation, on the root context's tick: adds its tally to the
    /// shared window, updates admission control, and reads the level back. The lease holder also
    /// evaluates the level and, when a probe is due, asks `dispatch` to send it (`false`: it could
    /// not be sent, which counts as a failed probe). `me` is this worker's id (never 0).
    pub fn on_degradation_tick(
        &self,
        me: u64,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
        dispatch: &mut impl FnMut(usize, &Probe) -> bool,
    ) {
        if !self.degradation_ticks() {
            return;
        }
        let now_nanos = now.as_nanos();
        for (index, (policy, runtime)) in self
            .config
            .degradations
            .iter()
            .zip(&self.degradations)
            .enumerate()
        {
            let counters = &runtime.metrics;
            let window = self.share_tally(policy, runtime, now_nanos, store, metrics);
            self.share_admission(policy, runtime, now_nanos, store, metrics);
            let ttl = u64::try_from(LEASE_TTL.as_nanos()).unwrap_or(u64::MAX);
            // A superseded config (an old root ticking until its listener drains) follows the
            // level but never leads it: the newest config's thresholds and probes decide.
            let newest =
                match generation::is_current(store, &self.generation_key, self.generation.get()) {
                    Some(current) => current,
                    None => {
                        metrics.increment(counters.store_errors, 1);
                        false
                    }
                };
            // Only the lease holder evaluates, so only a worker that holds or can take the lease
            // scans the breaker's records (up to its `max_keys` reads).
            let may_lead = newest
                && matches!(
                    cas::read::<HEALTH_LEN, Health, _>(store, &policy.health_key),
                    Ok(Some((health, _))) if claim(health.lease, me, now_nanos, ttl).is_some()
                );
            let breaker_open = match self.watched_breaker(policy) {
                Some(breaker) if may_lead => Some(self.breaker_is_open(breaker, now_nanos, store)),
                Some(_) => None,
                None => Some(false),
            };
            let outcome = cas::update(store, &policy.health_key, MAX_CAS_ATTEMPTS, |health| {
                let mut health: Health = health.unwrap_or_default();
                // A reload may have removed levels: the record's level is capped to what exists.
                health.level = health
                    .level
                    .min(u8::try_from(policy.levels.len()).unwrap_or(0));
                let Some(lease) = claim(health.lease, me, now_nanos, ttl).filter(|_| newest) else {
                    return Step::Keep(TickOutcome::follower(health));
                };
                let mut next = health;
                next.lease = lease;
                // A level entered "after now", further than a later reading explains, was entered
                // under a clock that has stepped back since: its dwell counts from now, and that
                // is written back.
                if clock::stepped_back(health.since, now_nanos) {
                    next.since = now_nanos;
                }
                // Without the window (the store failed) or the breaker's state (the lease came
                // unexpectedly), the signals are unknown: the level stays, and no evidence is
                // mistaken for a recovery.
                let change = match (window, breaker_open) {
                    (Some(window), Some(breaker_open)) => next_level(
                        health.level,
                        next.since,
                        now_nanos,
                        &policy.rules,
                        &policy.evidence,
                        &Signals {
                            window,
                            probe: health.probe,
                            breaker_open,
                        },
                    ),
                    _ => None,
                };
                if let Some(level) = change {
                    next.level = level;
                    next.since = now_nanos;
                }
                let probe_due = policy.probe.as_ref().is_some_and(|probe| {
                    // A schedule more than an interval ahead, further than a later reading
                    // explains, was written under a clock that has stepped back since: the probe
                    // is due now, or the checks would stop for the step.
                    let due = now_nanos >= health.next_probe_at
                        || clock::stepped_back(
                            health.next_probe_at,
                            now_nanos.saturating_add(probe.interval_nanos),
                        );
                    if due {
                        // Fixed rate: the next probe is one interval after this one was due, so
                        // the tick's granularity does not stretch every interval.
                        let on_schedule = health.next_probe_at.saturating_add(probe.interval_nanos);
                        next.next_probe_at = if on_schedule > now_nanos {
                            on_schedule
                        } else {
                            now_nanos.saturating_add(probe.interval_nanos)
                        };
                    }
                    due
                });
                Step::Write(
                    next,
                    TickOutcome {
                        health: next,
                        leader: true,
                        took_lease: health.lease.holder != me,
                        change: change.map(|to| (health.level, to)),
                        probe_due,
                    },
                )
            });
            let outcome = match outcome {
                Ok(updated) => {
                    if updated.attempts > 1 {
                        metrics.increment(counters.cas_retries, i64::from(updated.attempts - 1));
                    }
                    updated.value
                }
                Err(error) => {
                    count_failure(counters, error, metrics);
                    continue;
                }
            };
            runtime.level.set(outcome.health.level);
            runtime.since.set(outcome.health.since);
            if !outcome.leader {
                continue;
            }
            if outcome.took_lease {
                metrics.increment(counters.leases_taken, 1);
            }
            if let Some((from, to)) = outcome.change {
                let counter = if to > from {
                    counters.escalated
                } else {
                    counters.deescalated
                };
                metrics.increment(counter, 1);
            }
            if outcome.took_lease || outcome.change.is_some() {
                metrics.set(counters.level, u64::from(outcome.health.level));
            }
            if let (true, Some(probe)) = (outcome.probe_due, &policy.probe) {
                metrics.increment(counters.probes_sent, 1);
                if !dispatch(index, probe) {
                    self.on_probe_result(index, None, store, metrics);
                }
            }
        }
    }

    /// Adds this worker's tally to the shared window and returns the window's totals (`None`
    /// when the store failed: window-based conditions then see no evidence).
    fn share_tally(
        &self,
        policy: &DegradationPolicy,
        runtime: &DegradationRuntime,
        now: u64,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
    ) -> Option<Tally> {
        let counters = &runtime.metrics;
        let tally = runtime.tally.take();
        let outcome = cas::update(store, &policy.window_key, MAX_CAS_ATTEMPTS, |window| {
            let mut window: Window = window.unwrap_or_default();
            let number = bucket(now, policy.bucket_nanos);
            if tally.is_empty() {
                return Step::Keep(window.totals(number));
            }
            window.add(number, &tally);
            Step::Write(window, window.totals(number))
        });
        match outcome {
            Ok(updated) => {
                if updated.attempts > 1 {
                    metrics.increment(counters.cas_retries, i64::from(updated.attempts - 1));
                }
                Some(updated.value)
            }
            Err(error) => {
                // Kept for the next tick rather than lost.
                let mut kept = runtime.tally.get();
                kept.merge(&tally);
                runtime.tally.set(kept);
                count_failure(counters, error, metrics);
                None
            }
        }
    }

    /// Adds this worker's admission counts per route and computes each route's refusal chance
    /// from the shared totals.
    fn share_admission(
        &self,
        policy: &DegradationPolicy,
        runtime: &DegradationRuntime,
        now: u64,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
    ) {
        let Some(admission) = &policy.admission else {
            return;
        };
        for ((_, key), local) in admission.routes.iter().zip(&runtime.admission) {
            let pending = local.pending.take();
            let outcome = cas::update(store, key, MAX_CAS_ATTEMPTS, |window| {
                let mut window: AdmissionWindow = window.unwrap_or_default();
                let number = bucket(now, admission.bucket_nanos);
                if pending.requests == 0 {
                    return Step::Keep(window.totals(number));
                }
                window.add(number, &pending);
                Step::Write(window, window.totals(number))
            });
            match outcome {
                Ok(updated) => {
                    let totals = updated.value;
                    local.refuse_ppm.set(throttle_ppm(
                        totals.requests,
                        totals.accepts,
                        admission.k_milli,
                        admission.max_ppm,
                    ));
                }
                Err(error) => {
                    let mut kept = local.pending.get();
                    kept.merge(&pending);
                    local.pending.set(kept);
                    count_failure(&runtime.metrics, error, metrics);
                }
            }
        }
    }

    /// Whether any key of breaker `breaker` is open, refusing requests at `now`. Read on the tick
    /// by a worker that may lead, never on the request path.
    ///
    /// An open period that has run out, and a half-open breaker, count as "may probe", not open:
    /// only a request moves a breaker on from there, so a level that answered every request with
    /// its fallback while the breaker waited for one would never end.
    fn breaker_is_open(&self, breaker: usize, now: u64, store: &impl SharedStore) -> bool {
        let Some(policy) = self.config.circuit_breakers.get(breaker) else {
            return false;
        };
        let open = |key: &str| {
            matches!(
                cas::read::<RECORD_LEN, BreakerState, _>(store, key),
                Ok(Some((
                    BreakerState {
                        circuit: Circuit::Open { until },
                        ..
                    },
                    _
                ))) if until > now
            )
        };
        match &policy.table {
            Some(table) => {
                let mut buffer = KeyBuf::default();
                (0..=table.slots()).any(|slot| open(table.key(slot, &mut buffer)))
            }
            None => self.config.routes.routes().iter().any(|route| {
                matches!(
                    &route.policies.circuit_breaker,
                    Some(RouteBreaker { policy, record: Some(key) }) if *policy == breaker && open(key)
                )
            }),
        }
    }

    /// Applies one probe result (`status` is `None` when the probe got no response: a timeout,
    /// a reset, or a cluster Envoy does not know).
    pub fn on_probe_result(
        &self,
        policy: usize,
        status: Option<u16>,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
    ) {
        let Some((config, runtime)) = self.degradation(policy) else {
            return;
        };
        let Some(probe) = &config.probe else {
            return;
        };
        let counters = &runtime.metrics;
        let healthy = status.is_some_and(|status| probe.expect.contains(status));
        metrics.increment(
            if healthy {
                counters.probe_successes
            } else {
                counters.probe_failures
            },
            1,
        );
        let outcome = cas::update(store, &config.health_key, MAX_CAS_ATTEMPTS, |health| {
            let health: Health = health.unwrap_or_default();
            Step::Write(health.with_probe_result(healthy, probe.thresholds), ())
        });
        match outcome {
            Ok(updated) if updated.attempts > 1 => {
                metrics.increment(counters.cas_retries, i64::from(updated.attempts - 1))
            }
            Ok(_) => {}
            Err(error) => count_failure(counters, error, metrics),
        }
    }
}

/// What one worker's tick did with a policy's shared record.
#[derive(Debug, Clone, Copy)]
struct TickOutcome {
    health: Health,
    leader: bool,
    took_lease: bool,
    change: Option<(u8, u8)>,
    probe_due: bool,
}

impl TickOutcome {
    fn follower(health: Health) -> Self {
        TickOutcome {
            health,
            leader: false,
            took_lease: false,
            change: None,
            probe_due: false,
        }
    }
}

/// A level's ready-made reply headers (none for a level past the list).
fn at_level(headers: &[Vec<(String, String)>], position: usize) -> &[(String, String)] {
    headers.get(position).map_or(&[], Vec::as_slice)
}

fn count_failure(counters: &DegradationMetrics, error: UpdateError, metrics: &impl MetricSink) {
    metrics.increment(
        match error {
            UpdateError::Exhausted { .. } => counters.cas_exhausted,
            UpdateError::Store(_) => counters.store_errors,
        },
        1,
    );
}
