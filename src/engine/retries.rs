//! The retry stage: how many retries the router may make for a request, reserved from the
//! shared budget, and settled from the response's attempt count and push-back.

use crate::clock::Timestamp;
use crate::config::retry::RetryMode;
use crate::metrics::{
    metric_name, MetricId, MetricKind, MetricSink, MetricsError, MetricsRegistry,
};
use crate::policy::retry::{self, Grant, ResponseHeaders, RECORD_LEN as BUDGET_LEN};
use crate::request::{AttributeSource, RequestView};
use crate::state::cas::{ensure, UpdateError};
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
}

impl RetryMetrics {
    /// Defines the policy's counters.
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
        Ok(RetryMetrics {
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
        })
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
    /// the budget has left. The request is deposited in the budget either way.
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
                .and_then(|value| retry::retry_after(&value, retry::MAX_PUSH_BACK))
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
}

impl Engine {
    /// Adds the deposits this worker tallied to the shared budgets, and gives back unused allowance. Called on the worker's tick (see [`Engine::on_worker_tick`]).
    pub(super) fn settle_retry_tallies(
        &self,
        _now: Timestamp,
        _store: &impl SharedStore,
        _metrics: &impl MetricSink,
        _retiring: bool,
    ) {
    }
}
