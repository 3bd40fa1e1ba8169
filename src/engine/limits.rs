//! The rate-limit stage: a token from each of the route's buckets, all or none, with the bucket
//! picked from the client key's keyed hash.

use crate::clock::Timestamp;
use crate::config::shared::KeyPart;
use crate::config::RateLimitPolicy;
use crate::metrics::{
    metric_name, MetricId, MetricKind, MetricSink, MetricsError, MetricsRegistry,
};
use crate::policy::key::{Form, KeyHasher};
use crate::policy::rate_limit::{
    self, AcquireFailure, Acquired, BucketChoice, Buckets, FailureMode, Mode, Tat,
};
use crate::policy::route::Route;
use crate::request::{AttributeSource, RequestView};
use crate::state::cas::ensure;
use crate::state::slots::KeyBuf;
use crate::state::{SharedStore, StoreError};

use super::*;

/// gRPC's RESOURCE_EXHAUSTED, what a rate-limited gRPC call receives.
pub const GRPC_RESOURCE_EXHAUSTED: u32 = 8;

/// The counters of one rate-limit policy, `seawall.rate_limit.<name>.<counter>`.
#[derive(Debug, Clone, Copy)]
pub(super) struct RateLimitMetrics {
    pub(super) allowed: MetricId,
    pub(super) limited: MetricId,
    pub(super) shadow_limited: MetricId,
    pub(super) exempt: MetricId,
    pub(super) cas_exhausted: MetricId,
    pub(super) cas_retries: MetricId,
    pub(super) store_errors: MetricId,
    pub(super) failure_mode_applied: MetricId,
}

impl RateLimitMetrics {
    /// Defines the policy's counters.
    pub(super) fn define(
        policy: &RateLimitPolicy,
        registry: &mut impl MetricsRegistry,
    ) -> Result<Self, MetricsError> {
        let mut counter = |name: &str| {
            registry.define(
                MetricKind::Counter,
                &metric_name("rate_limit", &policy.name, name),
            )
        };
        Ok(RateLimitMetrics {
            allowed: counter("allowed")?,
            limited: counter("limited")?,
            shadow_limited: counter("shadow_limited")?,
            exempt: counter("exempt")?,
            cas_exhausted: counter("cas_exhausted")?,
            cas_retries: counter("cas_retries")?,
            store_errors: counter("store_errors")?,
            failure_mode_applied: counter("failure_mode_applied")?,
        })
    }
}

/// The bucket this request uses under `policy`.
pub(super) fn bucket<'k, S: AttributeSource>(
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
pub(super) fn key_hash<S: AttributeSource>(
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

impl Engine {
    /// Creates every bucket of every policy.
    pub(super) fn prepare_limits(&self, store: &impl SharedStore) -> Result<usize, StoreError> {
        let mut created = 0;
        for policy in &self.config.rate_limits {
            policy.buckets.all_keys(|key| {
                created += usize::from(ensure(store, key, &Tat(0))?);
                Ok(())
            })?;
        }
        Ok(created)
    }

    /// Takes a token from every limit on the route, all or nothing: when one limit refuses, the
    /// tokens already taken for this request are given back, so a refused request costs the other
    /// limits nothing. Returns the most restrictive limit's status, or the refusal.
    pub(super) fn rate_limit<S: AttributeSource>(
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
    pub(super) fn give_back<S: AttributeSource>(
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
}

impl Engine {
    /// Gives back the tokens this worker leased and did not use. Called on the worker's tick (see [`Engine::on_worker_tick`]).
    pub(super) fn settle_limit_leases(
        &self,
        _now: Timestamp,
        _store: &impl SharedStore,
        _metrics: &impl MetricSink,
        _retiring: bool,
    ) {
    }
}
