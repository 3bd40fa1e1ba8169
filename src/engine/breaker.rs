//! The circuit-breaker stage: admitting a request against its key's record, and settling the
//! call's outcome on the record it was admitted from.
//!
//! Closed-state successes are tallied on the worker. A success changes no decision while its
//! record is quiet (closed, no failure run, no failure or slow call in a window a rate rule
//! judges: `Breaker::is_quiet`), so a success admitted on a quiet record is counted in a small
//! per-worker table ([`Tallies`], sized in [`BreakerRuntime::new`]) and added to the shared
//! window on the worker's tick, one write per record, or earlier in the same write as anything
//! else the worker records there. Failures, slow calls, probes and every transition go to shared
//! data at once, so a breaker trips at the request it trips at without tallies, up to the bound
//! below. A closed request costs one shared read (its admission) instead of two reads and a write.
//!
//! Order within a worker is kept: tallied successes go into the window ahead of the worker's next
//! outcome for the record, in the same write. Across workers, a success is tallied only while its
//! worker has seen no news about the breaker since admitting it: the worker counts every record
//! it finds not quiet (at an admission, an outcome or a tick), and a success admitted before news
//! goes to shared data at once, so it breaks a failure run it follows. What other workers tallied
//! before they saw the news reaches the window at their next tick.
//!
//! The bound: an outcome is judged on a window that holds every success its own worker finished
//! and every success other workers finished more than one tick (100 ms) ago. Missing are at most
//! the successes other workers finished since their last tick, and only those admitted before
//! the window's first failure (or judged slow call) landed and finished before their worker saw
//! it; with W workers finishing R successes a second each, at most (W - 1) × R × 0.1 s. Missing
//! successes do not break a failure run either. So a trip can come earlier than with every
//! success written at once (a rate over fewer calls, a run they would have broken) or, when the
//! window is short of `min_requests` without them, later; never when the other workers' successes
//! are older than a tick. Once a failure is in the window every admission sees it, so the window
//! stays exact until the failures have left it. A success is tallied only if its admission found
//! traffic in the window, so a record in use looks idle to another key (`is_free_for`) at most
//! for one tick, after a call that outlasted the rest of the window.

use crate::clock::Timestamp;
use crate::config::circuit_breaker::{BreakerKey, BreakerMode};
use crate::config::CircuitBreakerPolicy;
use crate::metrics::{
    metric_name, MetricId, MetricKind, MetricSink, MetricsError, MetricsRegistry,
};
use crate::policy::circuit_breaker::{
    self, Admission, Admitted, BreakerState, Located, Outcome, Pending, Recorded, Records, Report,
    ResponseFacts, Role, Transition,
};
use crate::policy::key::{Form, KeyHasher};
use crate::policy::route::{Route, RouteBreaker, RouteIndex};
use crate::request::{AttributeSource, RequestView};
use crate::state::cas::{ensure, UpdateError};
use crate::state::slots::KeyBuf;
use crate::state::{SharedStore, StoreError};
use core::cell::Cell;
use core::time::Duration;

use super::*;

/// gRPC's UNAVAILABLE, what a gRPC call refused by an open breaker receives.
pub const GRPC_UNAVAILABLE: u32 = 14;

/// Added to every reply of an open (or half-open and busy) breaker, so clients and dashboards can
/// tell a breaker's refusal from the upstream's own 503.
pub const CIRCUIT_HEADER: &str = "x-seawall-circuit";

/// How many records one worker tallies successes for at once, per breaker. A success for a
/// record beyond them is recorded at once, as without tallies.
pub const TALLY_RECORDS: usize = 32;

/// What a breaker needs beyond its policy: its metrics, its ready-made reply headers and this
/// worker's tallies.
#[derive(Debug)]
pub(super) struct BreakerRuntime {
    pub(super) metrics: BreakerMetrics,
    pub(super) open_headers: Vec<(String, String)>,
    pub(super) half_open_headers: Vec<(String, String)>,
    pub(super) tallies: Tallies,
}

/// One record's tallied successes on this worker. A route's own record is told apart by its
/// route; a table's records by their slot and owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TallyEntry {
    route: RouteIndex,
    at: Located,
    pending: Pending,
}

/// This worker's closed-state successes not yet in shared data, per record; a fixed table, so
/// the request path never allocates.
#[derive(Debug)]
pub(super) struct Tallies {
    entries: Vec<Cell<Option<TallyEntry>>>,
    /// Bumped whenever the worker finds one of the breaker's records not quiet: a success admitted
    /// before may have followed a failure, so it is recorded at once.
    news: Cell<u32>,
    /// Set by the retiring tick: a config that no longer ticks keeps nothing back.
    retired: Cell<bool>,
}

impl Tallies {
    fn new(records: usize) -> Self {
        Tallies {
            entries: (0..records.clamp(1, TALLY_RECORDS))
                .map(|_| Cell::new(None))
                .collect(),
            news: Cell::new(0),
            retired: Cell::new(false),
        }
    }

    /// The admission's ticket mark: the current news count on a quiet record that shows traffic;
    /// none on an idle one (its success keeps it held); on any other, none, and that is news.
    fn admitted(&self, quiet: bool, idle: bool) -> Option<u32> {
        if !quiet {
            self.heard();
            return None;
        }
        (!idle).then(|| self.news.get())
    }

    fn heard(&self) {
        self.news.set(self.news.get().wrapping_add(1));
    }

    fn find(&self, route: RouteIndex, at: Located) -> Option<&Cell<Option<TallyEntry>>> {
        self.entries
            .iter()
            .find(|cell| cell.get().is_some_and(|e| e.route == route && e.at == at))
    }

    /// Counts one success here if its record's entry takes it (same closed spell and bucket) or
    /// a free entry is left. `false`: record it in shared data, with the entry's tally if any.
    fn add(&self, route: RouteIndex, at: Located, generation: u32, bucket: u64) -> bool {
        if self.retired.get() {
            return false;
        }
        if let Some(cell) = self.find(route, at) {
            let Some(mut entry) = cell.get() else {
                return false;
            };
            let pending = &mut entry.pending;
            if pending.generation != generation
                || pending.bucket != bucket
                || pending.successes == u32::MAX
            {
                return false;
            }
            pending.successes += 1;
            cell.set(Some(entry));
            return true;
        }
        let Some(free) = self.entries.iter().find(|cell| cell.get().is_none()) else {
            return false;
        };
        free.set(Some(TallyEntry {
            route,
            at,
            pending: Pending {
                generation,
                bucket,
                successes: 1,
            },
        }));
        true
    }
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
            tallied_successes: counter("tallied_successes")?,
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
        // A keyed breaker has a record per slot and its overflow record; a route-keyed one, one
        // per route naming it, which `TALLY_RECORDS` covers in any config seen so far.
        let records = policy
            .table
            .as_ref()
            .map_or(TALLY_RECORDS, |table| table.slots() as usize + 1);
        Ok(BreakerRuntime {
            metrics,
            open_headers: with_state("open"),
            half_open_headers: with_state("half-open"),
            tallies: Tallies::new(records),
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
    /// Successes a worker tallied and then added to the shared window (on its tick, when
    /// retiring, or with its next outcome for the record).
    pub(super) tallied_successes: MetricId,
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
        let Some((policy, runtime, records)) = self.records_of(route) else {
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
        let Some(index) = stream.route else {
            return self.settle(route, ticket, outcome, now, store, metrics);
        };
        let tallies = &runtime.tallies;
        if let (
            Role::Counted { generation },
            Outcome::Completed {
                failed: false,
                slow: false,
            },
            Some(mark),
        ) = (ticket.role, outcome, ticket.quiet)
        {
            let bucket = policy.breaker.bucket_of(now.as_nanos());
            if mark == tallies.news.get() && tallies.add(index, ticket.at, generation, bucket) {
                return;
            }
        }
        if matches!(
            (ticket.role, outcome),
            (Role::Counted { .. }, Outcome::Abandoned)
        ) {
            // Nothing to count, and the worker's tally waits for its tick.
            return;
        }
        // Recorded at once, after this worker's tallied successes for the record (they came first).
        let entry = tallies.find(index, ticket.at);
        let pending = entry.and_then(Cell::get).map(|e| e.pending);
        let report = self.record_on(
            policy,
            runtime,
            records,
            ticket.at,
            Some((ticket.role, outcome)),
            pending,
            now,
            store,
            metrics,
        );
        if let (Some(entry), false) = (entry, matches!(report.recorded, Recorded::Failed(_))) {
            entry.set(None);
        }
    }

    /// Writes to one record through [`circuit_breaker::record`] and counts what it did; a record
    /// found not quiet is news for the worker's tallies.
    #[allow(clippy::too_many_arguments)]
    fn record_on(
        &self,
        policy: &CircuitBreakerPolicy,
        runtime: &BreakerRuntime,
        records: Records<'_>,
        at: Located,
        outcome: Option<(Role, Outcome)>,
        pending: Option<Pending>,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
    ) -> Report {
        let counters = &runtime.metrics;
        let (report, races) = circuit_breaker::record(
            &policy.breaker,
            store,
            records,
            at,
            outcome,
            pending,
            now.as_nanos(),
        );
        if races > 0 {
            metrics.increment(counters.cas_retries, i64::from(races));
        }
        if report.tallied > 0 {
            metrics.increment(counters.tallied_successes, i64::from(report.tallied));
        }
        if !report.quiet {
            runtime.tallies.heard();
        }
        match report.recorded {
            Recorded::Applied(Some(transition)) => count_transition(counters, transition, metrics),
            Recorded::Applied(None) | Recorded::Stale => {}
            Recorded::Failed(error) if outcome.is_some() => count_failure(counters, error, metrics),
            // A tally alone is kept for the next tick; the caller counts what is lost.
            Recorded::Failed(UpdateError::Exhausted { .. }) => {
                metrics.increment(counters.cas_exhausted, 1);
            }
            Recorded::Failed(UpdateError::Store(_)) => {
                metrics.increment(counters.store_errors, 1);
            }
        }
        report
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
        let (admission, at, quiet, idle) = match admitted {
            Admitted::Decided {
                admission,
                at,
                transition,
                quiet,
                idle,
            } => {
                if let Some(transition) = transition {
                    count_transition(counters, transition, metrics);
                }
                if at.owner == circuit_breaker::OVERFLOW_OWNER && policy.table.is_some() {
                    metrics.increment(counters.overflow, 1);
                }
                (admission, at, quiet, idle)
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
        let quiet = runtime
            .tallies
            .admitted(quiet && matches!(admission, Admission::Pass { .. }), idle);
        match admission {
            Admission::Pass { generation } => Ok(Some(BreakerTicket {
                at,
                role: Role::Counted { generation },
                grpc,
                quiet,
            })),
            Admission::Probe { generation } => {
                metrics.increment(counters.probes, 1);
                Ok(Some(BreakerTicket {
                    at,
                    role: Role::Probe { generation },
                    grpc,
                    quiet: None,
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

    /// Applies an outcome to the record the request was admitted from (a stream the pipeline ends
    /// before the upstream: a probe gives back its slot).
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
        if matches!(
            (ticket.role, outcome),
            (Role::Counted { .. }, Outcome::Abandoned)
        ) {
            // An abandoned counted call changes nothing: no need to read the record.
            return;
        }
        self.record_on(
            policy,
            runtime,
            records,
            ticket.at,
            Some((ticket.role, outcome)),
            None,
            now,
            store,
            metrics,
        );
    }
}

impl Engine {
    /// Adds the closed-state successes this worker tallied to the shared windows: one write per
    /// record with a tally. Called on the worker's tick (see [`Engine::on_worker_tick`]), and when
    /// the config is retired, after which this worker tallies nothing more for it.
    ///
    /// A write that fails keeps the tally for the next tick; when retiring, its successes are
    /// lost and counted as `untracked`, like any outcome the breaker could not record.
    pub(super) fn settle_breaker_tallies(
        &self,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
        retiring: bool,
    ) {
        for (policy, runtime) in self
            .config
            .circuit_breakers
            .iter()
            .zip(&self.circuit_breakers)
        {
            let tallies = &runtime.tallies;
            if retiring {
                tallies.retired.set(true);
            }
            for cell in &tallies.entries {
                let Some(entry) = cell.get() else {
                    continue;
                };
                let records = self
                    .config
                    .routes
                    .get(entry.route)
                    .and_then(|route| self.records_of(route));
                let Some((_, _, records)) = records else {
                    cell.set(None);
                    continue;
                };
                let report = self.record_on(
                    policy,
                    runtime,
                    records,
                    entry.at,
                    None,
                    Some(entry.pending),
                    now,
                    store,
                    metrics,
                );
                if matches!(report.recorded, Recorded::Failed(_)) {
                    if !retiring {
                        continue;
                    }
                    let lost = i64::from(entry.pending.successes);
                    metrics.increment(runtime.metrics.untracked, lost);
                }
                cell.set(None);
            }
        }
    }
}
