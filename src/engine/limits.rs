//! The rate-limit stage: a token from each of the route's buckets, all or none, with the bucket
//! picked from the client key's keyed hash.
//!
//! # Leased tokens
//!
//! A single (unkeyed) bucket that holds at least [`rate_limit::LEASE_MIN_AVAILABLE`] tokens is
//! not asked once per request: the worker leases a batch with one CAS (`policy::rate_limit`),
//! admits from it locally, and goes back to shared data when the batch runs out, when it is a tick old, or
//! when degradation's `rate_limit_factor` changes the bucket. Near the limit the bucket holds
//! too few tokens to lease, so every decision is made in shared data as without leases.
//!
//! - **Size.** A lease is sized by this worker's own use: at most what it used in the last tick,
//!   or twice what it has used in this one, so a worker that sees a request a tick never leases
//!   and a busy one leases about a tick's worth at once; and at most 1/16 of the bucket and
//!   [`LEASE_MAX`] tokens (`policy::rate_limit::lease_size`).
//! - **End.** Every tick gives back what is left of the lease (one CAS), even while it is in use:
//!   the next request takes a fresh one sized by the tick's use. So no leased token sits unspent
//!   longer than a tick, and the cost is about one CAS a tick for a busy worker. A lease is also
//!   never used more than a tick after it was taken (a late tick), nor after the clock stepped
//!   back, nor under another scale; the request that finds it so returns it in its own CAS.
//! - **Refunds.** A token from the lease that a later limit's refusal gives back goes back to the
//!   lease, not to shared data.
//! - **Headers.** A locally admitted request reports the bucket as shared data showed it at the
//!   lease, less what the lease has admitted since, refilled to now. `RateLimit-Remaining` can
//!   overstate what shared data holds by what other workers took since the lease (at most a tick
//!   ago), and, when the bucket filled up meanwhile, by what this lease admitted since (at most
//!   its size); `RateLimit-Reset` errs the same way, by those tokens' intervals.
//! - **Keyed buckets never lease.** A lease per client key would need a table of local state per
//!   key (unbounded, or one more slot table to size and evict), and a per-client bucket is small
//!   and rarely ample: its requests go to shared data as before.
//! - **Reloads.** A lease belongs to one [`Engine`]: a new config starts with none, and a retiring
//!   one gives its leases back and never leases again.
//!
//! The bound, across `w` workers: admissions up to any instant never exceed `burst + rate ×
//! elapsed`; in any window they exceed `burst + rate × window` by at most the tokens leased before
//! the window and unspent at its start (at most `w × LEASE_MAX`); and a request can be refused
//! while at most `(w − 1) × LEASE_MAX` tokens sit unspent in other workers' leases, until their
//! holders' next tick (a tick, 100 ms, when ticks are on time). Tested in `tests/rate_limit.rs`.
//!
//! # Global limits
//!
//! A limit with `source.global` takes its tokens from a bucket that the rate limit service fills
//! in leases (`policy::global_limit`): a request does one read and one CAS on it, as on a keyed
//! bucket, and never leases locally. The lease calls are made on the tick
//! ([`Engine::on_global_tick`], every [`GLOBAL_TICK`]) and settled when the host hands back the
//! answer ([`Engine::on_global_answer`]); the request path neither waits on them nor encodes
//! anything. An empty bucket refuses, or, while the RLS fails, applies the limit's
//! `failure_mode` (open, closed, or a local fallback limit in shared data).

use core::cell::Cell;

use crate::clock::Timestamp;
use crate::config::shared::KeyPart;
use crate::config::RateLimitPolicy;
use crate::metrics::{
    metric_name, MetricId, MetricKind, MetricSink, MetricsError, MetricsRegistry,
};
use crate::policy::degradation::TICK;
use crate::policy::global_limit::{
    self, CallOutcome, Claim, GlobalFailure, GlobalLimit, KeyedTake, LeaseRecord, PerClient,
    Settled, Take, Tokens, Values, Wanted, VALUES_CAPACITY,
};
use crate::policy::key::{Form, KeyHasher};
use crate::policy::rate_limit::{
    self, AcquireFailure, Acquired, BucketChoice, Buckets, FailureMode, Gcra, GcraDecision, Mode,
    LEASE_MAX,
};
use crate::policy::rls_wire;
use crate::policy::route::Route;
use crate::request::{AttributeSource, RequestView};
use crate::state::cas::{ensure, UpdateError};
use crate::state::slots::KeyBuf;
use crate::state::{Lookup, SharedStore, StoreError};

use super::*;

/// gRPC's RESOURCE_EXHAUSTED, what a rate-limited gRPC call receives.
pub const GRPC_RESOURCE_EXHAUSTED: u32 = 8;

/// One rate-limit policy on one worker: its counters, `seawall.rate_limit.<name>.<counter>`, and
/// the worker's lease on its bucket.
#[derive(Debug)]
pub(super) struct RateLimitRuntime {
    pub(super) allowed: MetricId,
    pub(super) limited: MetricId,
    pub(super) shadow_limited: MetricId,
    pub(super) exempt: MetricId,
    pub(super) cas_exhausted: MetricId,
    pub(super) cas_retries: MetricId,
    pub(super) store_errors: MetricId,
    pub(super) failure_mode_applied: MetricId,
    pub(super) leases: MetricId,
    pub(super) leased_tokens: MetricId,
    pub(super) lease_tokens_returned: MetricId,
    /// A global limit's: its leases from the RLS (see `policy::global_limit`).
    global: Option<GlobalMetrics>,
    /// Only a single bucket leases (see the module doc on keyed buckets).
    leasing: bool,
    lease: Cell<Option<Lease>>,
    /// Requests this worker brought to the bucket in this tick and in the last one: what sizes
    /// the next lease.
    demand: Cell<u32>,
    last_demand: Cell<u32>,
    /// Tells one lease from the next, so a refund finds the lease its token came from (0: none).
    epochs: Cell<u32>,
    /// Set when the config is retired: it gives its leases back and takes no more.
    retired: Cell<bool>,
}

/// A global limit's counters, `seawall.rate_limit.<name>.<counter>`.
#[derive(Debug)]
struct GlobalMetrics {
    leases_requested: MetricId,
    leases_granted: MetricId,
    leases_denied: MetricId,
    leased_hits: MetricId,
    rls_errors: MetricId,
    rls_latency_ms: MetricId,
    /// Per-client limits: requests whose slot another active client held, and lease asks the
    /// full wanted list dropped.
    slots_busy: MetricId,
    wanted_dropped: MetricId,
}

/// The epoch [`Taken`] notes for a token from a global limit's bucket, and for one from its
/// fallback limit: a global limit never leases locally, so no lease epoch of its runtime is
/// ever either.
const FROM_GLOBAL: u32 = u32::MAX;
const FROM_FALLBACK: u32 = u32::MAX - 1;
/// Admitted by the `open` failure mode: nothing was taken, nothing to give back.
const FROM_NOTHING: u32 = u32::MAX - 2;

/// How long a request refused by an empty global bucket is told to wait: the RLS knows when its
/// window resets, the request path does not ask it.
const GLOBAL_RETRY_AFTER: core::time::Duration = core::time::Duration::from_secs(1);

/// Tokens this worker took from the shared bucket and admits locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    /// Tokens left to admit.
    left: u32,
    /// Tokens admitted from it (net of refunds).
    used: u32,
    /// The arrival time the bucket held before the lease: its tokens are the intervals after it.
    base: u64,
    /// When it was taken (nanoseconds).
    at: u64,
    /// The limit it was taken under: a lease serves only that scale of the bucket.
    gcra: Gcra,
    epoch: u32,
}

impl Lease {
    /// Whether it may admit a request of `gcra` at `now`: within a tick of its taking, and not
    /// from before a clock step back.
    fn serves(&self, gcra: &Gcra, now: u64) -> bool {
        self.left > 0
            && self.gcra == *gcra
            && now >= self.at
            && now - self.at < u64::try_from(TICK.as_nanos()).unwrap_or(u64::MAX)
    }

    /// The arrival time its unspent tokens are worth.
    fn unspent(&self) -> u64 {
        self.gcra.span(self.left)
    }
}

impl RateLimitRuntime {
    /// Defines the policy's counters; the worker starts with no lease (a new config inherits
    /// none).
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
        Ok(RateLimitRuntime {
            allowed: counter("allowed")?,
            limited: counter("limited")?,
            shadow_limited: counter("shadow_limited")?,
            exempt: counter("exempt")?,
            cas_exhausted: counter("cas_exhausted")?,
            cas_retries: counter("cas_retries")?,
            store_errors: counter("store_errors")?,
            failure_mode_applied: counter("failure_mode_applied")?,
            leases: counter("leases")?,
            leased_tokens: counter("leased_tokens")?,
            lease_tokens_returned: counter("lease_tokens_returned")?,
            global: match policy.global {
                Some(_) => Some(GlobalMetrics {
                    leases_requested: counter("leases_requested")?,
                    leases_granted: counter("leases_granted")?,
                    leases_denied: counter("leases_denied")?,
                    leased_hits: counter("leased_hits")?,
                    rls_errors: counter("rls_errors")?,
                    slots_busy: counter("slots_busy")?,
                    wanted_dropped: counter("wanted_dropped")?,
                    rls_latency_ms: registry.define(
                        MetricKind::Histogram,
                        &metric_name("rate_limit", &policy.name, "rls_latency_ms"),
                    )?,
                }),
                None => None,
            },
            // A global limit's tokens are decided in its shared bucket, one CAS each.
            leasing: matches!(policy.buckets, Buckets::Single { .. }) && policy.global.is_none(),
            lease: Cell::new(None),
            demand: Cell::new(0),
            last_demand: Cell::new(0),
            epochs: Cell::new(0),
            retired: Cell::new(false),
        })
    }

    /// Admits one request of `gcra` from the lease, if it serves: the status to report and the
    /// lease's epoch.
    fn admit_locally(&self, gcra: &Gcra, now: u64) -> Option<(RateLimitStatus, u32)> {
        let mut lease = self.lease.get().filter(|l| l.serves(gcra, now))?;
        if self.retired.get() {
            return None;
        }
        // As a worker alone would see the bucket: the lease's base, the tokens it has admitted,
        // and the refill since.
        let before = lease.base.saturating_add(gcra.span(lease.used));
        let GcraDecision::Allow {
            remaining, full_in, ..
        } = gcra.decide(Some(before), now)
        else {
            return None;
        };
        lease.left -= 1;
        lease.used += 1;
        self.lease.set(Some(lease));
        let status = RateLimitStatus {
            limit: gcra.burst(),
            remaining,
            reset: full_in,
            form: Default::default(),
        };
        Some((status, lease.epoch))
    }

    /// How many tokens the next CAS should ask for: at most the last tick's use, or twice this
    /// tick's so far, so a lease covers about a tick of this worker's traffic.
    fn wants(&self) -> u32 {
        if !self.leasing || self.retired.get() {
            return 1;
        }
        let so_far = self.demand.get().saturating_sub(1);
        self.last_demand
            .get()
            .max(so_far.saturating_mul(2))
            .clamp(1, LEASE_MAX)
    }

    /// Starts a lease of `tokens` (this request's included) taken at `now`; returns its epoch.
    fn start_lease(&self, tokens: u32, base: u64, gcra: Gcra, now: u64) -> u32 {
        let epoch = self.epochs.get().wrapping_add(1).max(1);
        self.epochs.set(epoch);
        self.lease.set(Some(Lease {
            left: tokens - 1,
            used: 1,
            base,
            at: now,
            gcra,
            epoch,
        }));
        epoch
    }

    /// Puts back a token admitted from the lease `epoch`; false when that lease has ended (the
    /// token was counted as spent when it went back, so it is refunded to shared data instead).
    fn refund_locally(&self, epoch: u32) -> bool {
        match self.lease.get() {
            Some(mut lease) if lease.epoch == epoch && lease.used > 0 => {
                lease.used -= 1;
                lease.left += 1;
                self.lease.set(Some(lease));
                true
            }
            _ => false,
        }
    }

    /// Takes this request's token: from the lease when it serves, otherwise with one CAS that
    /// also returns an ended lease and may take a new one. Returns the epoch of the lease the
    /// token came from (0: from shared data).
    fn acquire(
        &self,
        gcra: &Gcra,
        store: &impl SharedStore,
        key: &str,
        now: u64,
        metrics: &impl MetricSink,
    ) -> (Acquired, u32) {
        if self.leasing {
            self.demand.set(self.demand.get().saturating_add(1));
            if let Some((status, epoch)) = self.admit_locally(gcra, now) {
                let allowed = Acquired::Allowed {
                    remaining: status.remaining,
                    full_in: status.reset,
                };
                return (allowed, epoch);
            }
        }
        let ended = self.lease.get();
        let returning = ended.map_or(0, |lease| lease.unspent());
        let (acquired, retries) =
            rate_limit::acquire_leasing(gcra, store, key, now, returning, self.wants());
        if retries > 0 {
            metrics.increment(self.cas_retries, i64::from(retries));
        }
        if matches!(acquired, Acquired::Failed(_)) {
            // The ended lease stays out of shared data until a later CAS returns it: stricter,
            // never looser.
            return (acquired, 0);
        }
        if let Some(lease) = ended {
            self.lease.set(None);
            if lease.left > 0 {
                metrics.increment(self.lease_tokens_returned, i64::from(lease.left));
            }
        }
        match acquired {
            Acquired::Leased { tokens, base, .. } => {
                metrics.increment(self.leases, 1);
                metrics.increment(self.leased_tokens, i64::from(tokens));
                (acquired, self.start_lease(tokens, base, *gcra, now))
            }
            _ => (acquired, 0),
        }
    }

    fn count_failure(&self, error: UpdateError, metrics: &impl MetricSink) {
        let counter = match error {
            UpdateError::Exhausted { .. } => self.cas_exhausted,
            UpdateError::Store(_) => self.store_errors,
        };
        metrics.increment(counter, 1);
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
///
/// Public only for the fuzz targets (`fuzz/`), which check this very function rather than a copy.
#[doc(hidden)]
pub fn key_hash<S: AttributeSource>(
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

/// A request's client under a per-client global limit.
pub(super) struct Client {
    /// The keyed hash of its descriptor values (never 0: 0 is a free slot).
    owner: u64,
    slot: u32,
    values: Values,
}

/// The client of this request under `per_client`: its descriptor values read once (the view
/// caches them) and normalised, their keyed hash and slot. `None`: a value is missing or too long
/// ([`global_limit::MAX_VALUE`]) and the limit skips such requests; otherwise such a value is
/// sent as empty, so all such requests share one client.
fn client<S: AttributeSource>(
    policy: &RateLimitPolicy,
    per_client: &PerClient,
    request: &mut RequestView<'_, S>,
    secret: u64,
) -> Option<Client> {
    let mut values = Values::default();
    for part in &policy.key {
        let (id, form) = match *part {
            KeyPart::Raw(id) => (id, Form::Exact),
            KeyPart::ClientIp(id) => (id, Form::Address),
            KeyPart::Path(id) => (id, Form::Path),
            KeyPart::Authority(id) => (id, Form::Authority),
        };
        let value = request.get(id);
        if !(value.is_some() && values.push(value, form)) {
            if per_client.skip_missing {
                return None;
            }
            values.push(None, form);
        }
    }
    let mut hasher = KeyHasher::new(per_client.seed, secret);
    hasher.part(values.runs(), Form::Exact);
    let owner = hasher.finish().max(1);
    values.set_owner(owner);
    Some(Client {
        owner,
        slot: per_client.buckets.slot_of(owner),
        values,
    })
}

impl Engine {
    /// Creates every bucket of every policy.
    pub(super) fn prepare_limits(&self, store: &impl SharedStore) -> Result<usize, StoreError> {
        let mut created = 0;
        for policy in &self.config.rate_limits {
            if let Some(global) = &policy.global {
                created += usize::from(ensure(store, &global.bucket_key, &Tokens::default())?);
                created += usize::from(ensure(store, &global.lease_key, &LeaseRecord::fresh())?);
                if let GlobalFailure::Fallback(gcra) = global.failure {
                    created += usize::from(ensure(store, &global.fallback_key, &gcra.record(0))?);
                }
                if let Some(per_client) = &global.per_client {
                    created +=
                        usize::from(ensure(store, &per_client.wanted_key, &Wanted::default())?);
                    let mut buffer = KeyBuf::default();
                    for slot in 0..per_client.buckets.slots() {
                        let key = per_client.buckets.key(slot, &mut buffer);
                        created += usize::from(ensure(store, key, &Tokens::default())?);
                        let key = per_client.leases.key(slot, &mut buffer);
                        created += usize::from(ensure(store, key, &LeaseRecord::fresh())?);
                        // Created here at its longest, so that the request path that claims the
                        // slot writes to a key that exists (inserts race) and never grows it.
                        let key = per_client.values.key(slot, &mut buffer);
                        let mut probe = [0u8; 8];
                        if let Lookup::Missing = store.get(key, &mut probe)? {
                            let empty = [0u8; VALUES_CAPACITY];
                            let len = Values::record_len(policy.key.len());
                            store.set(key, &empty[..len], None)?;
                            created += 1;
                        }
                        if let GlobalFailure::Fallback(gcra) = global.failure {
                            let key = per_client.fallbacks.key(slot, &mut buffer);
                            created += usize::from(ensure(store, key, &gcra.record(0))?);
                        }
                    }
                }
                continue;
            }
            policy.buckets.all_keys(|key| {
                created += usize::from(ensure(store, key, &policy.gcra.record(0))?);
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
        let mut taken = Taken::default();
        for (position, &policy_index) in route.policies.rate_limits.iter().enumerate() {
            let (Some(policy), Some(runtime)) = (
                self.config.rate_limits.get(policy_index),
                self.rate_limits.get(policy_index),
            ) else {
                continue;
            };
            if let Some(global) = &policy.global {
                match self.take_global(policy, global, runtime, request, now, store, metrics) {
                    Ok(None) => {
                        metrics.increment(runtime.exempt, 1);
                        continue;
                    }
                    Ok(Some(from)) => {
                        metrics.increment(runtime.allowed, 1);
                        taken.note(position, from);
                        continue;
                    }
                    Err(retry_in) => {
                        if policy.mode == Mode::Shadow {
                            metrics.increment(runtime.shadow_limited, 1);
                            continue;
                        }
                        metrics.increment(runtime.limited, 1);
                        self.give_back(route, &taken, request, store, scale_ppm);
                        return Err(self.refusal(policy, request, retry_in, None));
                    }
                }
            }
            let mut buffer = KeyBuf::default();
            let BucketChoice::Key(key) = bucket(policy, request, self.secret.get(), &mut buffer)
            else {
                metrics.increment(runtime.exempt, 1);
                continue;
            };
            let gcra = scale_ppm.map_or(policy.gcra, |ppm| policy.gcra.scaled(ppm));
            let (acquired, epoch) = runtime.acquire(&gcra, store, key, now.as_nanos(), metrics);
            let (retry_in, full_in) = match acquired {
                Acquired::Allowed { remaining, full_in }
                | Acquired::Leased {
                    remaining, full_in, ..
                } => {
                    metrics.increment(runtime.allowed, 1);
                    taken.note(position, epoch);
                    let candidate = RateLimitStatus {
                        limit: gcra.burst(),
                        remaining,
                        reset: full_in,
                        form: policy.response_headers.unwrap_or_default(),
                    };
                    if policy.response_headers.is_some()
                        && status.is_none_or(|s| candidate.remaining < s.remaining)
                    {
                        status = Some(candidate);
                    }
                    continue;
                }
                Acquired::Limited { retry_in, full_in } => (retry_in, full_in),
                Acquired::Failed(failure) => {
                    let counter = match failure {
                        AcquireFailure::CasExhausted => runtime.cas_exhausted,
                        AcquireFailure::Store(_) => runtime.store_errors,
                    };
                    metrics.increment(counter, 1);
                    metrics.increment(runtime.failure_mode_applied, 1);
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
                form: policy.response_headers.unwrap_or_default(),
            };
            if policy.mode == Mode::Shadow {
                metrics.increment(runtime.shadow_limited, 1);
                if policy.response_headers.is_some() {
                    status = Some(limited);
                }
                continue;
            }
            metrics.increment(runtime.limited, 1);
            self.give_back(route, &taken, request, store, scale_ppm);
            let shown = policy.response_headers.is_some().then_some(limited);
            return Err(self.refusal(policy, request, retry_in, shown));
        }
        Ok(status)
    }

    /// The `on_limit` reply of a limit that refused a request: `Retry-After`, and gRPC callers
    /// told RESOURCE_EXHAUSTED.
    fn refusal<'c, S: AttributeSource>(
        &'c self,
        policy: &'c RateLimitPolicy,
        request: &mut RequestView<'_, S>,
        retry_in: core::time::Duration,
        rate_limit: Option<RateLimitStatus>,
    ) -> LocalReply<'c> {
        LocalReply {
            degraded: None,
            status: policy.on_limit.status,
            body: &policy.on_limit.body,
            headers: &policy.on_limit.headers,
            retry_after: Some(retry_in),
            grpc_status: self.is_grpc(request).then_some(GRPC_RESOURCE_EXHAUSTED),
            rate_limit,
        }
    }

    /// Refunds the tokens taken for a refused request: a token admitted from this worker's lease
    /// goes back to the lease, any other to shared data.
    fn give_back<S: AttributeSource>(
        &self,
        route: &Route,
        taken: &Taken,
        request: &mut RequestView<'_, S>,
        store: &impl SharedStore,
        scale_ppm: Option<u32>,
    ) {
        for (position, &policy_index) in route.policies.rate_limits.iter().enumerate() {
            let Some(epoch) = taken.at(position) else {
                continue;
            };
            let (Some(policy), Some(runtime)) = (
                self.config.rate_limits.get(policy_index),
                self.rate_limits.get(policy_index),
            ) else {
                continue;
            };
            if let Some(global) = &policy.global {
                let client = global
                    .per_client
                    .as_ref()
                    .and_then(|per_client| client(policy, per_client, request, self.secret.get()));
                let mut buffer = KeyBuf::default();
                // A refund that fails leaves the limit stricter, never looser.
                let _ = match (epoch, global.failure, (&global.per_client, client)) {
                    (FROM_GLOBAL, _, (None, _)) => global_limit::refund(store, &global.bucket_key),
                    (FROM_GLOBAL, _, (Some(per_client), Some(client))) => {
                        let key = per_client.buckets.key(client.slot, &mut buffer);
                        global_limit::refund_keyed(store, key, client.owner)
                    }
                    (FROM_FALLBACK, GlobalFailure::Fallback(gcra), (None, _)) => {
                        rate_limit::refund(&gcra, store, &global.fallback_key)
                    }
                    (
                        FROM_FALLBACK,
                        GlobalFailure::Fallback(gcra),
                        (Some(per_client), Some(client)),
                    ) => {
                        let key = per_client.fallbacks.key(client.slot, &mut buffer);
                        rate_limit::refund(&gcra, store, key)
                    }
                    _ => Ok(()),
                };
                continue;
            }
            if epoch != 0 && runtime.refund_locally(epoch) {
                continue;
            }
            let mut buffer = KeyBuf::default();
            if let BucketChoice::Key(key) = bucket(policy, request, self.secret.get(), &mut buffer)
            {
                // A refund that fails leaves the limit stricter, never looser.
                let gcra = scale_ppm.map_or(policy.gcra, |ppm| policy.gcra.scaled(ppm));
                let _ = rate_limit::refund(&gcra, store, key);
            }
        }
    }

    /// Tokens this worker holds in leases and has not admitted, over all its limits: what the
    /// error bound is stated in (see the module doc).
    pub fn leased_tokens_held(&self) -> u64 {
        self.rate_limits
            .iter()
            .filter_map(|runtime| runtime.lease.get())
            .map(|lease| u64::from(lease.left))
            .sum()
    }
}

/// The tokens one request took, by position on its route, and for each whether it came from a
/// lease (its epoch) or from shared data (0).
#[derive(Debug, Default)]
struct Taken {
    positions: u32,
    epochs: [u32; 32],
}

impl Taken {
    fn note(&mut self, position: usize, epoch: u32) {
        if let Some(slot) = self.epochs.get_mut(position) {
            *slot = epoch;
            self.positions |= 1 << position;
        }
    }

    fn at(&self, position: usize) -> Option<u32> {
        let epoch = *self.epochs.get(position)?;
        (self.positions & (1 << position) != 0).then_some(epoch)
    }
}

impl Engine {
    /// Gives back what this worker's leases left unspent, one CAS per lease, and starts the next
    /// tick's count of use. Called on the worker's tick (see [`Engine::on_worker_tick`]); when
    /// `retiring`, the config also stops leasing, so a superseded config holds nothing.
    pub(super) fn settle_limit_leases(
        &self,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
        retiring: bool,
    ) {
        for (policy, runtime) in self.config.rate_limits.iter().zip(&self.rate_limits) {
            runtime.last_demand.set(runtime.demand.replace(0));
            if retiring {
                runtime.retired.set(true);
            }
            let Some(lease) = runtime.lease.get() else {
                continue;
            };
            let Buckets::Single { key } = &policy.buckets else {
                runtime.lease.set(None);
                continue;
            };
            if lease.left == 0 {
                runtime.lease.set(None);
                continue;
            }
            // Given back even while in use: no leased token outlives a tick, and the next
            // request leases afresh, sized by this tick's use.
            match rate_limit::give_back_lease(
                &lease.gcra,
                store,
                key,
                now.as_nanos(),
                lease.unspent(),
            ) {
                Ok(retries) => {
                    runtime.lease.set(None);
                    metrics.increment(runtime.lease_tokens_returned, i64::from(lease.left));
                    if retries > 0 {
                        metrics.increment(runtime.cas_retries, i64::from(retries));
                    }
                }
                // Kept, and offered back on the next tick or request: until then the bucket is
                // stricter, never looser.
                Err(error) => runtime.count_failure(error, metrics),
            }
        }
    }
}

impl Engine {
    /// Takes a request's token from a global limit: from its bucket, or, while the RLS fails and
    /// the bucket is empty, as its failure mode says. `Ok`: admitted, and where the token came
    /// from (see [`FROM_GLOBAL`]); `Err`: refused, with when to retry.
    #[allow(clippy::too_many_arguments)]
    fn take_global<S: AttributeSource>(
        &self,
        policy: &RateLimitPolicy,
        global: &GlobalLimit,
        runtime: &RateLimitRuntime,
        request: &mut RequestView<'_, S>,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
    ) -> Result<Option<u32>, core::time::Duration> {
        let mut buffer = KeyBuf::default();
        let (taken, fallback_key) = match &global.per_client {
            None => (
                global_limit::take(store, &global.bucket_key, now.as_nanos()),
                global.fallback_key.as_str(),
            ),
            Some(per_client) => {
                let Some(client) = client(policy, per_client, request, self.secret.get()) else {
                    return Ok(None);
                };
                let key = per_client.buckets.key(client.slot, &mut buffer);
                let credit = global.sizing.min;
                let taken =
                    global_limit::take_keyed(store, key, client.owner, credit, now.as_nanos());
                let take = match taken {
                    Ok((KeyedTake::Allowed { want, new_owner }, retries)) => {
                        if new_owner {
                            let key = per_client.values.key(client.slot, &mut buffer);
                            if let Err(error) = store.set(key, client.values.as_record(), None) {
                                runtime.count_failure(UpdateError::Store(error), metrics);
                            }
                        }
                        self.want_lease(per_client, runtime, &client, want, store, metrics);
                        Ok((Take::Allowed { remaining: 0 }, retries))
                    }
                    Ok((KeyedTake::Empty { failing, want }, retries)) => {
                        self.want_lease(per_client, runtime, &client, want, store, metrics);
                        Ok((Take::Empty { failing }, retries))
                    }
                    Ok((KeyedTake::Busy, retries)) => {
                        if let Some(counters) = &runtime.global {
                            metrics.increment(counters.slots_busy, 1);
                        }
                        // No bucket of its own: as if the RLS failed, so `failure_mode` decides.
                        Ok((Take::Empty { failing: true }, retries))
                    }
                    Err(error) => Err(error),
                };
                (take, per_client.fallbacks.key(client.slot, &mut buffer))
            }
        };
        let failing = match taken {
            Ok((Take::Allowed { .. }, retries)) => {
                if retries > 0 {
                    metrics.increment(runtime.cas_retries, i64::from(retries));
                }
                return Ok(Some(FROM_GLOBAL));
            }
            Ok((Take::Empty { failing }, retries)) => {
                if retries > 0 {
                    metrics.increment(runtime.cas_retries, i64::from(retries));
                }
                failing
            }
            Err(error) => {
                // Shared data failed: the limit's own `failure_mode`, as for a local limit.
                runtime.count_failure(error, metrics);
                metrics.increment(runtime.failure_mode_applied, 1);
                return match policy.failure_mode {
                    FailureMode::Open => Ok(Some(FROM_NOTHING)),
                    FailureMode::Closed => Err(GLOBAL_RETRY_AFTER),
                };
            }
        };
        if !failing {
            return Err(GLOBAL_RETRY_AFTER);
        }
        metrics.increment(runtime.failure_mode_applied, 1);
        match global.failure {
            GlobalFailure::Open => Ok(Some(FROM_NOTHING)),
            GlobalFailure::Closed => Err(GLOBAL_RETRY_AFTER),
            GlobalFailure::Fallback(gcra) => {
                let (acquired, retries) =
                    rate_limit::acquire(&gcra, store, fallback_key, now.as_nanos());
                if retries > 0 {
                    metrics.increment(runtime.cas_retries, i64::from(retries));
                }
                match acquired {
                    Acquired::Allowed { .. } | Acquired::Leased { .. } => Ok(Some(FROM_FALLBACK)),
                    Acquired::Limited { retry_in, .. } => Err(retry_in),
                    Acquired::Failed(failure) => {
                        let counter = match failure {
                            AcquireFailure::CasExhausted => runtime.cas_exhausted,
                            AcquireFailure::Store(_) => runtime.store_errors,
                        };
                        metrics.increment(counter, 1);
                        match policy.failure_mode {
                            FailureMode::Open => Ok(Some(FROM_NOTHING)),
                            FailureMode::Closed => Err(gcra.interval()),
                        }
                    }
                }
            }
        }
    }

    /// Puts a per-client bucket on its limit's wanted list, so a tick asks for its lease.
    fn want_lease(
        &self,
        per_client: &PerClient,
        runtime: &RateLimitRuntime,
        client: &Client,
        want: bool,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
    ) {
        if !want {
            return;
        }
        match global_limit::push_wanted(store, &per_client.wanted_key, client.slot) {
            Ok(true) => {}
            Ok(false) => {
                if let Some(counters) = &runtime.global {
                    metrics.increment(counters.wanted_dropped, 1);
                }
            }
            Err(error) => runtime.count_failure(error, metrics),
        }
    }

    /// Whether any limit is global: the host then ticks often enough to ask for leases in time
    /// ([`GLOBAL_TICK`]).
    pub fn has_global_limits(&self) -> bool {
        self.config.rate_limits.iter().any(|p| p.global.is_some())
    }

    /// On the worker's tick: for each global limit whose bucket is low and whose next lease no
    /// worker is asking for, claims the ask and hands the call to `send` (the host dispatches the
    /// gRPC call and returns whether it went out). A call that could not be sent settles as a
    /// failure at once. Never on the request path: requests only ever spend the bucket.
    pub fn on_global_tick(
        &self,
        worker: u64,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
        send: &mut dyn FnMut(GlobalCall<'_>) -> bool,
    ) {
        for (index, (policy, runtime)) in self
            .config
            .rate_limits
            .iter()
            .zip(&self.rate_limits)
            .enumerate()
        {
            let (Some(global), Some(_)) = (&policy.global, &runtime.global) else {
                continue;
            };
            if runtime.retired.get() {
                continue;
            }
            match &global.per_client {
                None => {
                    let keys = (global.bucket_key.as_str(), global.lease_key.as_str());
                    self.ask_for_lease(index, worker, now, keys, None, store, metrics, send);
                }
                Some(per_client) => {
                    let wanted = match global_limit::take_wanted(store, &per_client.wanted_key) {
                        Ok(wanted) => wanted,
                        Err(error) => {
                            runtime.count_failure(error, metrics);
                            continue;
                        }
                    };
                    let (mut bucket, mut lease) = (KeyBuf::default(), KeyBuf::default());
                    for &slot in wanted.slots() {
                        if slot >= per_client.buckets.slots() {
                            continue;
                        }
                        let keys = (
                            per_client.buckets.key(slot, &mut bucket),
                            per_client.leases.key(slot, &mut lease),
                        );
                        let client = Some((slot, per_client));
                        self.ask_for_lease(index, worker, now, keys, client, store, metrics, send);
                    }
                }
            }
        }
    }

    /// Rate limit `index` if it is global: its config, its runtime and its lease metrics.
    fn global_limit(
        &self,
        index: usize,
    ) -> Option<(&GlobalLimit, &RateLimitRuntime, &GlobalMetrics)> {
        let policy = self.config.rate_limits.get(index)?;
        let runtime = self.rate_limits.get(index)?;
        Some((policy.global.as_ref()?, runtime, runtime.global.as_ref()?))
    }

    /// Claims the next lease of one bucket (`keys`: its bucket and lease keys) if it is due, and
    /// hands the call to `send`; for a per-client bucket, with its client's descriptor values.
    #[allow(clippy::too_many_arguments)]
    fn ask_for_lease(
        &self,
        index: usize,
        worker: u64,
        now: Timestamp,
        (bucket_key, lease_key): (&str, &str),
        per_client: Option<(u32, &PerClient)>,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
        send: &mut dyn FnMut(GlobalCall<'_>) -> bool,
    ) {
        let Some((global, runtime, counters)) = self.global_limit(index) else {
            return;
        };
        let claimed = global_limit::claim(
            store,
            bucket_key,
            lease_key,
            &global.sizing,
            worker,
            now.as_nanos(),
            global.stale_after(),
        );
        let mut claim = match claimed {
            Ok(Some(claim)) => claim,
            Ok(None) => return,
            Err(error) => {
                runtime.count_failure(error, metrics);
                return;
            }
        };
        let mut record = [0u8; VALUES_CAPACITY];
        let mut runs: &[u8] = &[];
        if let Some((slot, per_client)) = per_client {
            claim.slot = slot;
            let mut buffer = KeyBuf::default();
            let key = per_client.values.key(slot, &mut buffer);
            let values = match store.get(key, &mut record) {
                Ok(Lookup::Found { len, .. }) => record.get(..len).and_then(Values::parse),
                Ok(Lookup::Missing) => None,
                Err(error) => {
                    runtime.count_failure(UpdateError::Store(error), metrics);
                    None
                }
            };
            match values {
                Some((owner, values)) if owner == claim.owner => runs = values,
                // The values are not yet this client's (its request is still writing them):
                // the next request asks again.
                _ => {
                    if let Err(error) = global_limit::release(store, lease_key, worker, claim) {
                        runtime.count_failure(error, metrics);
                    }
                    return;
                }
            }
        }
        metrics.increment(counters.leases_requested, 1);
        let call = GlobalCall {
            policy: index,
            claim,
            cluster: &global.cluster,
            timeout: global.timeout,
            message: global.request_message(runs, claim.hits),
        };
        if !send(call) {
            self.on_global_answer(index, worker, claim, None, now, store, metrics);
        }
    }

    /// A lease call came back (`body`: the response message; `None`: it failed, timed out, or
    /// could not be sent): credits the bucket or records the denial or failure, and frees the
    /// claim.
    #[allow(clippy::too_many_arguments)]
    pub fn on_global_answer(
        &self,
        policy: usize,
        worker: u64,
        claim: Claim,
        body: Option<&[u8]>,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
    ) {
        let Some((global, runtime, counters)) = self.global_limit(policy) else {
            return;
        };
        let outcome = match body.map(rls_wire::decode_response) {
            Some(Ok(verdict)) if verdict.code != rls_wire::Code::Unknown => {
                CallOutcome::Answered(verdict)
            }
            _ => CallOutcome::Failed,
        };
        let elapsed = now.as_nanos().saturating_sub(claim.since) / 1_000_000;
        metrics.set(counters.rls_latency_ms, elapsed);
        let (mut bucket, mut lease) = (KeyBuf::default(), KeyBuf::default());
        let (bucket_key, lease_key) = match &global.per_client {
            None => (global.bucket_key.as_str(), global.lease_key.as_str()),
            Some(per_client) => (
                per_client.buckets.key(claim.slot, &mut bucket),
                per_client.leases.key(claim.slot, &mut lease),
            ),
        };
        let settled = global_limit::settle(
            store,
            bucket_key,
            lease_key,
            worker,
            claim,
            outcome,
            now.as_nanos(),
        );
        match settled {
            Ok(Settled::Granted { hits }) => {
                metrics.increment(counters.leases_granted, 1);
                metrics.increment(counters.leased_hits, i64::from(hits));
            }
            Ok(Settled::Denied) => metrics.increment(counters.leases_denied, 1),
            Ok(Settled::Failed) => metrics.increment(counters.rls_errors, 1),
            Err(error) => runtime.count_failure(error, metrics),
        }
    }
}

/// A lease call for the host to send: `ShouldRateLimit` with `message` to `cluster`.
#[derive(Debug)]
pub struct GlobalCall<'a> {
    pub policy: usize,
    pub claim: Claim,
    pub cluster: &'a str,
    pub timeout: core::time::Duration,
    pub message: Vec<u8>,
}

/// The worker tick's period while a config has a global limit: a lease is asked for within this
/// long of the bucket falling below its low-water mark.
pub const GLOBAL_TICK: core::time::Duration = core::time::Duration::from_millis(20);
