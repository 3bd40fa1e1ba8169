//! The retry stage: how many retries the router may make for a request, taken from the shared
//! budget, and settled from the response's attempt count and push-back.
//!
//! Local first (DESIGN.md §7). A request on a budgeted route used to cost two shared writes: one
//! to deposit itself and reserve its grant, one at the response to give the unused part back,
//! which is the common case. Now each worker keeps, per budget:
//!
//! - **Tallied deposits and give-backs**, by window bucket, added to the shared record with the
//!   worker's next write to it, and at the latest on its tick. A deposit not yet shared earns no
//!   retries, so the lag (at most one tick) makes the budget stricter, never looser.
//! - **An allowance** leased from the budget in the same write as a grant, only while the budget
//!   keeps at least [`retry::LEASE_SHARE`] times the lease for everyone else. Leased retries are
//!   counted in the shared bucket of the moment they were leased, so the budget cannot over-grant;
//!   a grant from the allowance is made only in that same bucket (a retry counted in an older
//!   bucket would leave the window early), and its unused part goes back to the allowance with no
//!   shared call. The allowance lives for one lease period: the tick (and a bucket change, a
//!   push-back, a retirement) gives what is left back to the bucket it was leased in.
//!
//! Push-back reaches every worker within one tick: it is written to shared data at once, every
//! write returns the record's push-back, and a worker grants from an allowance only in the lease
//! period of the write that leased it, which the next tick ends. A worker that knows of a
//! push-back denies retries during it without a shared call.
//!
//! A retired config (`on_worker_tick` with `retiring`) gives back its allowance and tallies and
//! then decides every request on shared data, as exactly as before.

use core::cell::Cell;

use crate::clock::{self, Timestamp};
use crate::config::retry::RetryMode;
use crate::metrics::{
    metric_name, MetricId, MetricKind, MetricSink, MetricsError, MetricsRegistry,
};
use crate::policy::retry::{
    self, Budget, Exchange, Exchanged, Grant, ResponseHeaders, Tally, RECORD_LEN as BUDGET_LEN,
    WINDOW_BUCKETS,
};
use crate::request::{AttributeSource, RequestView};
use crate::state::cas::{ensure, UpdateError};
use crate::state::window::Window;
use crate::state::{SharedStore, StoreError};

use super::*;

/// The router's count of attempts, on responses when the virtual host sets
/// `include_attempt_count_in_response`.
pub const ATTEMPT_COUNT_HEADER: &str = "x-envoy-attempt-count";

/// `seawall.retry.<name>.<counter>`.
#[derive(Debug, Clone, Copy)]
pub(super) struct RetryMetrics {
    pub(super) requests: MetricId,
    pub(super) granted: MetricId,
    pub(super) used: MetricId,
    pub(super) refunded: MetricId,
    pub(super) denied_by_budget: MetricId,
    pub(super) shadow_denied: MetricId,
    pub(super) pushed_back: MetricId,
    pub(super) denied_by_breaker: MetricId,
    pub(super) not_idempotent: MetricId,
    pub(super) attempt_count_missing: MetricId,
    pub(super) cas_retries: MetricId,
    pub(super) cas_exhausted: MetricId,
    pub(super) store_errors: MetricId,
    /// Requests decided without a shared-data call; added on the tick, so that counting them
    /// costs no host call per request.
    pub(super) decided_locally: MetricId,
    /// Retries leased to this worker's allowance.
    pub(super) leased: MetricId,
    /// Leased retries given back unused when a lease period ended.
    pub(super) lease_returned: MetricId,
}

/// A retry policy's runtime on one worker: its counters and its budget's worker-local state.
#[derive(Debug)]
pub(super) struct RetryRuntime {
    pub(super) counters: RetryMetrics,
    local: Local,
}

/// What one worker holds of a budget between its writes to the shared record. Worker-local: each
/// worker's VM has its own `Engine`.
#[derive(Debug)]
struct Local {
    /// Requests to deposit and retries to give back, by the bucket they belong to.
    pending: Cell<Window<Tally>>,
    /// Retries counted in the shared bucket `lease_epoch` that this worker holds for its grants.
    allowance: Cell<u32>,
    lease_epoch: Cell<u64>,
    /// The lease period, which every tick ends; never 0, which marks a grant from shared data.
    period: Cell<u32>,
    /// Whether the allowance was leased in this period: only then may it grant.
    leasing: Cell<bool>,
    /// The push-back this worker last read or wrote (nanoseconds).
    pushed_back_until: Cell<u64>,
    /// The config was replaced: nothing is kept locally any more.
    retired: Cell<bool>,
    /// Requests decided locally since the last tick, for `decided_locally`.
    decided: Cell<u32>,
}

impl RetryRuntime {
    /// Defines the policy's counters; the budget's local state starts empty.
    pub(super) fn define(
        policy: &crate::config::retry::RetryPolicy,
        registry: &mut impl MetricsRegistry,
    ) -> Result<Self, MetricsError> {
        let mut counter = |name: &str| {
            registry.define(
                MetricKind::Counter,
                &metric_name("retry", &policy.name, name),
            )
        };
        let counters = RetryMetrics {
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
            decided_locally: counter("decided_locally")?,
            leased: counter("leased")?,
            lease_returned: counter("lease_returned")?,
        };
        Ok(RetryRuntime {
            counters,
            local: Local {
                pending: Cell::new(Window::EMPTY),
                allowance: Cell::new(0),
                lease_epoch: Cell::new(0),
                period: Cell::new(1),
                leasing: Cell::new(false),
                pushed_back_until: Cell::new(0),
                retired: Cell::new(false),
                decided: Cell::new(0),
            },
        })
    }
}

fn max_push_back_nanos() -> u64 {
    u64::try_from(retry::MAX_PUSH_BACK.as_nanos()).unwrap_or(u64::MAX)
}

/// Whether bucket `number` is in the window that ends at bucket `epoch`: only there does a tally
/// count for anything (older buckets have expired; newer ones lie ahead after a clock step back).
fn in_window(number: u64, epoch: u64) -> bool {
    number <= epoch && epoch - number < WINDOW_BUCKETS as u64
}

impl Local {
    fn tally(&self, number: u64, epoch: u64, counts: Tally) {
        if in_window(number, epoch) {
            let mut pending = self.pending.get();
            pending.add(number, &counts);
            self.pending.set(pending);
        }
    }

    /// Ends the allowance's use: what is left goes back, with the next write, to the bucket it
    /// was leased in.
    fn drop_allowance(&self, epoch: u64, counters: &RetryMetrics, metrics: &impl MetricSink) {
        self.leasing.set(false);
        let allowance = self.allowance.replace(0);
        if allowance > 0 {
            metrics.increment(counters.lease_returned, i64::from(allowance));
            let retries = Tally {
                requests: 0,
                retries: allowance,
            };
            self.tally(self.lease_epoch.get(), epoch, retries);
        }
    }

    /// Decides a request without shared data when that cannot change the outcome: during a
    /// push-back this worker knows of, for a request that wants no retries, and for a grant its
    /// allowance covers. `Some((grant, from the allowance))`, the request deposited locally.
    fn decide(&self, wanted: u32, now: u64, epoch: u64) -> Option<(Grant, bool)> {
        if self.retired.get() {
            return None;
        }
        let pushed_back_until = self.pushed_back_until.get();
        let decided = if now < pushed_back_until {
            // A push-back further ahead than the cap and a later reading explain was written
            // under a clock that has stepped back since: the shared write clamps it for everyone.
            if clock::stepped_back(pushed_back_until, now.saturating_add(max_push_back_nanos())) {
                return None;
            }
            (Grant::PushedBack, false)
        } else if wanted == 0 {
            let none = Grant::Granted {
                retries: 0,
                short: false,
            };
            (none, false)
        } else if self.leasing.get()
            && self.lease_epoch.get() == epoch
            && self.allowance.get() >= wanted
        {
            self.allowance.set(self.allowance.get() - wanted);
            let full = Grant::Granted {
                retries: wanted,
                short: false,
            };
            (full, true)
        } else {
            return None;
        };
        let deposit = Tally {
            requests: 1,
            retries: 0,
        };
        self.tally(epoch, epoch, deposit);
        Some(decided)
    }

    /// Notes what a write to the shared record brought back; the tallies it carried landed.
    fn landed(&self, got: &Exchanged) {
        self.pending.set(Window::EMPTY);
        self.pushed_back_until.set(got.pushed_back_until);
    }

    /// A write that asks for nothing back (tallies, a refund, a push-back): the races it lost
    /// and how it failed are counted; what it carried has landed when it succeeds.
    #[allow(clippy::too_many_arguments)]
    fn write_tallies(
        &self,
        budget: &retry::Budget,
        key: &str,
        ask: &Exchange,
        now: Timestamp,
        store: &impl SharedStore,
        counters: &RetryMetrics,
        metrics: &impl MetricSink,
    ) {
        let (got, races) = retry::exchange(budget, store, key, ask, now.as_nanos());
        if races > 0 {
            metrics.increment(counters.cas_retries, i64::from(races));
        }
        match got {
            Ok(got) => self.landed(&got),
            Err(UpdateError::Exhausted { .. }) => metrics.increment(counters.cas_exhausted, 1),
            Err(UpdateError::Store(_)) => metrics.increment(counters.store_errors, 1),
        }
    }
}

impl Engine {
    /// Creates every budget.
    pub(super) fn prepare_budgets(&self, store: &impl SharedStore) -> Result<usize, StoreError> {
        let mut created = 0;
        for policy in self.config.retries.iter().filter(|p| p.budget.is_some()) {
            created += usize::from(ensure::<BUDGET_LEN, _, _>(
                store,
                &policy.key,
                &retry::BudgetState::empty(),
            )?);
        }
        Ok(created)
    }

    /// Decides how many retries the router may make for this request: `max_retries` for a
    /// retryable request (idempotent method or idempotency header) when `allowed`, cut to what
    /// the budget has left. The request is deposited in the budget either way: in shared data, or
    /// in this worker's tally until its next write (see [`Engine::budget_grant`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn retry_grant<S: AttributeSource>(
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
        let runtime = self.retries.get(index)?;
        let counters = &runtime.counters;
        metrics.increment(counters.requests, 1);
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
        let mut lease = 0;
        let reserved = match &policy.budget {
            None => wanted,
            Some(budget) => {
                let (grant, from) = self.budget_grant(
                    policy,
                    budget,
                    runtime,
                    wanted,
                    now.as_nanos(),
                    store,
                    metrics,
                );
                lease = from;
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
                lease,
            });
        } else if max_retries > 0 {
            stream.retry = Some(RetryTicket {
                reserved: 0,
                granted_at: now.as_nanos(),
                lease: 0,
            });
        }
        // With the Envoy route's policy, a grant in full needs no header at all.
        let write_max_retries = !policy.from_route || max_retries < policy.max_retries;
        let set = [
            write_max_retries,
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
        Some(RetryHeaders {
            max_retries,
            write_max_retries,
            retry_on: policy.retry_on.as_deref(),
            grpc_retry_on: policy.grpc_retry_on.as_deref(),
            per_try_timeout_ms: policy.per_try_timeout_ms,
            remove,
        })
    }

    /// Deposits the request and takes its grant: from the worker's own state when that cannot
    /// change the outcome (see [`Local::decide`]), otherwise in one write to the shared record
    /// that also brings the worker's tallies and, while the budget has ample room, leases an
    /// allowance. Returns the grant and the lease period it came from (0: shared data).
    #[allow(clippy::too_many_arguments)]
    fn budget_grant(
        &self,
        policy: &crate::config::retry::RetryPolicy,
        budget: &Budget,
        runtime: &RetryRuntime,
        wanted: u32,
        now: u64,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
    ) -> (Result<Grant, UpdateError>, u32) {
        let (local, counters) = (&runtime.local, &runtime.counters);
        let epoch = budget.epoch(now);
        if let Some((grant, from_allowance)) = local.decide(wanted, now, epoch) {
            local.decided.set(local.decided.get().saturating_add(1));
            let lease = if from_allowance {
                local.period.get()
            } else {
                0
            };
            return (Ok(grant), lease);
        }
        // An allowance of another bucket or period cannot grant now: it goes back with this write.
        if !(local.leasing.get() && local.lease_epoch.get() == epoch) {
            local.drop_allowance(epoch, counters, metrics);
        }
        let lease = if local.retired.get() {
            0
        } else {
            retry::LEASE_REQUESTS.saturating_mul(policy.max_retries)
        };
        let ask = Exchange {
            pending: local.pending.get(),
            deposit: true,
            wanted,
            lease,
            ..Exchange::NOTHING
        };
        let (got, races) = retry::exchange(budget, store, &policy.key, &ask, now);
        if races > 0 {
            metrics.increment(counters.cas_retries, i64::from(races));
        }
        match got {
            Ok(got) => {
                local.landed(&got);
                if got.grant == Grant::PushedBack {
                    local.drop_allowance(epoch, counters, metrics);
                }
                if got.leased > 0 {
                    metrics.increment(counters.leased, i64::from(got.leased));
                    local
                        .allowance
                        .set(local.allowance.get().saturating_add(got.leased));
                    local.lease_epoch.set(epoch);
                    local.leasing.set(true);
                    // Leased in the same write and bucket: its unused part may join the allowance.
                    (Ok(got.grant), local.period.get())
                } else {
                    (Ok(got.grant), 0)
                }
            }
            Err(error) => {
                // The request happened: it is deposited with the worker's next write.
                let deposit = Tally {
                    requests: 1,
                    retries: 0,
                };
                local.tally(epoch, epoch, deposit);
                (Err(error), 0)
            }
        }
    }

    /// Settles a request's retries from its response headers: counts the retries the router
    /// made (`x-envoy-attempt-count`), gives the unused part of the grant back to the budget, and
    /// records the upstream's push-back (`Retry-After` on a 503) for every worker. A grant from
    /// this worker's allowance goes back to it without a shared call.
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
        let (Some(policy), Some(runtime)) =
            (self.config.retries.get(index), self.retries.get(index))
        else {
            return;
        };
        let (local, counters) = (&runtime.local, &runtime.counters);
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
                .and_then(|value| retry::retry_after(&value, retry::MAX_PUSH_BACK))
                .map(|wait| now.saturating_add(wait).as_nanos()),
            _ => None,
        };
        if unused > 0 {
            metrics.increment(counters.refunded, i64::from(unused));
        }
        let epoch = budget.epoch(now.as_nanos());
        let granted = budget.epoch(ticket.granted_at);
        if let Some(until) = pushed_back_until {
            // This worker stops granting at once; the others learn it from the write below.
            local.drop_allowance(epoch, counters, metrics);
            local
                .pushed_back_until
                .set(local.pushed_back_until.get().max(until));
        } else if ticket.lease != 0 && !local.retired.get() {
            // A grant from a lease goes back without a shared call: to the allowance while its
            // lease lasts, else with the worker's next write, to the bucket it was leased in.
            if local.leasing.get()
                && ticket.lease == local.period.get()
                && local.lease_epoch.get() == granted
            {
                local
                    .allowance
                    .set(local.allowance.get().saturating_add(unused));
            } else if unused > 0 {
                let retries = Tally {
                    requests: 0,
                    retries: unused,
                };
                local.tally(granted, epoch, retries);
            }
            return;
        } else if unused == 0 {
            return;
        }
        let ask = Exchange {
            pending: local.pending.get(),
            refund: unused,
            refund_at: ticket.granted_at,
            push_back: pushed_back_until,
            ..Exchange::NOTHING
        };
        // On failure the grant stays spent: the budget errs strict.
        local.write_tallies(budget, &policy.key, &ask, now, store, counters, metrics);
    }
}

impl Engine {
    /// Ends every budget's lease period on this worker: the allowance goes back, and the
    /// deposits and give-backs tallied since the last write are added to the shared record (one
    /// read and one write per budget, none when nothing was tallied). When `retiring`, the config
    /// keeps nothing locally from then on. Called on the worker's tick (see
    /// [`Engine::on_worker_tick`]).
    pub(super) fn settle_retry_tallies(
        &self,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
        retiring: bool,
    ) {
        for (policy, runtime) in self.config.retries.iter().zip(&self.retries) {
            let Some(budget) = &policy.budget else {
                continue;
            };
            let (local, counters) = (&runtime.local, &runtime.counters);
            let decided = local.decided.replace(0);
            if decided > 0 {
                metrics.increment(counters.decided_locally, i64::from(decided));
            }
            let epoch = budget.epoch(now.as_nanos());
            local.drop_allowance(epoch, counters, metrics);
            let next = local.period.get().wrapping_add(1);
            local.period.set(next.max(1));
            if retiring {
                local.retired.set(true);
            }
            let pending = local.pending.get();
            if pending.is_empty_at(epoch) {
                // Anything outside the window counts for nothing.
                local.pending.set(Window::EMPTY);
                continue;
            }
            let ask = Exchange {
                pending,
                ..Exchange::NOTHING
            };
            // On failure the tallies are kept for the next write: deposits late, the budget
            // errs strict.
            local.write_tallies(budget, &policy.key, &ask, now, store, counters, metrics);
        }
    }
}
