//! Global rate limits: a bucket in shared data that all of one Envoy's workers spend from, filled
//! in leases from Envoy's rate limit service (RLS), so many Envoys share one limit.
//!
//! Asking the RLS on every request (Envoy's `ratelimit` filter) puts a network round trip on
//! every request and the RLS's capacity under the whole fleet's traffic. Here a request only
//! takes a token from the bucket (one read and one CAS, as a local limit), and the RLS is asked
//! for `hits_addend = n` hits at a time, from the tick, before the bucket runs out. A granted
//! lease is `n` hits counted against the global limit, whether or not they are all spent, so the
//! fleet never admits more than the RLS granted: the global limit holds exactly, up to what the
//! RLS itself counts.
//!
//! Two records per limit, each in shared data:
//!
//! - [`Tokens`], the bucket: tokens granted and not yet spent, how many were ever spent and when
//!   the last was (the observed rate, recent demand), when a request last found it empty (demand
//!   beyond supply), and whether the RLS is failing (so an empty bucket applies the failure mode
//!   rather than refusing).
//! - [`LeaseRecord`], the lease state machine, [`LeaseState`]: at most one request to the RLS in
//!   flight per limit across the workers, claimed by CAS. A claim that outlives the call's
//!   timeout (its worker's VM went away) may be taken over.
//!
//! Sizing: `observed rate × lookahead`, at least doubled when the bucket ran dry since the last
//! grant (demand we could not see: refused requests are not counted, since counting them would
//! cost a write per refusal), clamped to `[min, max]`, and never more than the RLS said is left
//! in its window. The next lease is asked for when the bucket holds less than half the next
//! lease. Only recent demand asks (a token spent, or a request that found the bucket empty,
//! within [`DEMAND_RECENT`]): an idle Envoy holds none of the global limit, and one whose burst
//! has ended asks for no lease that would sit unused. The first request after a quiet spell is
//! refused while the first lease comes (a tick and an RLS round trip).
//!
//! Tokens stay in the bucket until spent. A lease is counted by the RLS in the window it was
//! granted in, so tokens left at a window's end and spent in the next let that window admit up
//! to what the Envoys held at its start over its limit (under a flood, nearly nothing: leases are
//! spent within a tick). Cumulatively the bound is exact: never more admitted than granted.

use core::time::Duration;

use crate::clock;
use crate::state::cas::{self, Record, Step, UpdateError};
use crate::state::fields;
use crate::state::slots::SlotTable;
use crate::state::SharedStore;

use super::key::{normalise, Form};
use super::rate_limit::{Gcra, MAX_CAS_ATTEMPTS};
use super::rls_wire::{Code, Verdict};

/// How long a failed RLS call keeps the next one from being sent.
pub const FAILURE_BACKOFF: Duration = Duration::from_secs(1);

/// The longest an RLS's "over limit, resets in ..." keeps a bucket from asking again. A longer
/// reset (an hour's or a day's window) is asked about again after this: one call a minute per
/// bucket, where Envoy's own rate limit filter asks on every request. It also bounds what a
/// clock step back can stall: a wait stored further ahead than this (and the reading skew) was
/// written under a clock that has stepped back since, and is over.
pub const LONGEST_WAIT: Duration = Duration::from_secs(60);

/// When a wait of `wait` from `now` ends, at most [`LONGEST_WAIT`] on.
fn wait_until(now: u64, wait: Duration) -> u64 {
    now.saturating_add(nanos(wait.min(LONGEST_WAIT)))
}

/// Whether a wait stored as ending at `until` (0: none) is over at `now`.
fn wait_is_over(until: u64, now: u64) -> bool {
    now >= until || clock::stepped_back(until, now.saturating_add(nanos(LONGEST_WAIT)))
}

/// A compiled `source.global`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalLimit {
    pub domain: String,
    pub cluster: String,
    pub timeout: Duration,
    /// The one descriptor's entries, in order.
    pub descriptor: Vec<Entry>,
    pub failure: GlobalFailure,
    pub sizing: LeaseSizing,
    /// Shared-data keys: the bucket ([`Tokens`]), the lease state ([`LeaseRecord`]) and the
    /// fallback limit's GCRA record.
    pub bucket_key: String,
    pub lease_key: String,
    pub fallback_key: String,
    /// `Some`: a bucket per client, keyed by the descriptor's entries taken from the request.
    pub per_client: Option<PerClient>,
}

/// One descriptor entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// `{"key": k, "value": v}`: the same for every request.
    Fixed { key: String, value: String },
    /// `{"key": k, "from": <key part>}`: the request's value of the next key part, normalised
    /// as the part says (the limit's `key` holds the parts, in order).
    FromRequest { key: String },
}

/// A global limit with a bucket per client: `max_keys` slots, each a bucket ([`Tokens`]), a
/// lease state ([`LeaseRecord`]), the client's descriptor values ([`Values`]) and, with a
/// fallback failure mode, a fallback bucket; and one wanted list ([`Wanted`]) per limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerClient {
    /// Seeds the owner hash (from the plugin and policy names; the deployment secret joins it).
    pub seed: u64,
    /// `on_missing_key: "skip"`: a request lacking a part is not limited; otherwise the part is
    /// sent as an empty value.
    pub skip_missing: bool,
    pub buckets: SlotTable,
    pub leases: SlotTable,
    pub values: SlotTable,
    pub fallbacks: SlotTable,
    pub wanted_key: String,
}

impl GlobalLimit {
    /// The `ShouldRateLimit` request for `hits`, with the request-taken entries from `values`
    /// (the runs of a [`Values`] record; empty for a limit with one bucket).
    pub fn request_message(&self, values: &[u8], hits: u32) -> Vec<u8> {
        let mut runs = Values::runs_of(values);
        let entries = self.descriptor.iter().map(|entry| match entry {
            Entry::Fixed { key, value } => (key.as_bytes(), value.as_bytes()),
            Entry::FromRequest { key } => (key.as_bytes(), runs.next().unwrap_or(&[])),
        });
        super::rls_wire::encode_request(&self.domain, entries, hits)
    }

    /// How long a claim holds before another worker may take it over: the call's timeout, and
    /// two ticks for the answer to be handled.
    pub fn stale_after(&self) -> Duration {
        self.timeout + CLAIM_GRACE
    }
}

/// See [`GlobalLimit::stale_after`].
pub const CLAIM_GRACE: Duration = Duration::from_millis(200);

/// What an empty bucket does while the RLS fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalFailure {
    /// Admit.
    Open,
    /// Refuse.
    Closed,
    /// A local limit for this Envoy alone, in shared data like any other.
    Fallback(Gcra),
}

/// How leases are sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSizing {
    pub min: u32,
    pub max: u32,
    pub lookahead: Duration,
}

impl LeaseSizing {
    /// The next lease: `rate × lookahead` (`rate` in hits per second, measured since the last
    /// grant), at least double the last lease when the bucket ran dry, clamped, and at most
    /// `cap` (what the RLS said its window still has).
    pub fn next(&self, rate_milli: u64, last: u32, ran_dry: bool, cap: Option<u32>) -> u32 {
        let lookahead_ms = u64::try_from(self.lookahead.as_millis()).unwrap_or(u64::MAX);
        let by_rate = rate_milli.saturating_mul(lookahead_ms) / 1_000_000;
        let mut size = u32::try_from(by_rate).unwrap_or(u32::MAX);
        if ran_dry {
            size = size.max(last.saturating_mul(2));
        }
        let size = size.clamp(self.min, self.max);
        match cap {
            Some(cap) if cap > 0 => size.min(cap),
            _ => size,
        }
    }
}

/// The bucket's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tokens {
    pub tokens: u64,
    /// Tokens ever spent from this bucket, and when the last one was (nanoseconds; 0: never).
    pub spent: u64,
    pub spent_at: u64,
    /// When a request last found the bucket empty (0: never), refreshed at most every
    /// [`DRY_REFRESH`]: recent demand that the bucket could not serve.
    pub dry_at: u64,
    pub failing: bool,
    /// A per-client bucket's client: the keyed hash of its descriptor values (0: a limit with one
    /// bucket, or a slot no client holds).
    pub owner: u64,
    /// Hits admitted on credit ([`take_keyed`]) that the next lease must also ask for.
    pub owed: u32,
    /// The last lease's size: a per-client bucket asks for the next one below half of it.
    pub last_grant: u32,
    /// When a request last asked the tick for a lease for this bucket (0: never).
    pub wanted_at: u64,
    /// Until when the RLS said this key is over its limit (0: it did not).
    pub denied_until: u64,
}

/// How often a refused request refreshes [`Tokens::dry_at`]: at most this many extra writes a
/// second under a flood of refusals, whatever its size.
pub const DRY_REFRESH: Duration = Duration::from_millis(50);

/// Demand older than this asks for no lease: a burst that ended leaves no lease behind to sit
/// unused while other Envoys could have had its hits.
pub const DEMAND_RECENT: Duration = Duration::from_millis(200);

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Whether `at` (0: never) is within `window` before `now` (or after it: a clock that stepped
/// back counts the demand as recent, which only asks a lease sooner).
fn recent(at: u64, now: u64, window: Duration) -> bool {
    at != 0 && now.saturating_sub(at) <= nanos(window)
}

impl Record<65> for Tokens {
    /// Layout: global-limit bucket, version 2 (with its owner, credit and lease demand).
    const LAYOUT: u8 = 0x83;
    fn encode(&self) -> [u8; 65] {
        let mut bytes = [0; 65];
        fields::put(&mut bytes, 0, self.tokens);
        fields::put(&mut bytes, 8, self.spent);
        fields::put(&mut bytes, 16, self.spent_at);
        fields::put(&mut bytes, 24, self.dry_at);
        bytes[32] = u8::from(self.failing);
        fields::put(&mut bytes, 33, self.owner);
        fields::put(&mut bytes, 41, self.owed);
        fields::put(&mut bytes, 45, self.last_grant);
        fields::put(&mut bytes, 49, self.wanted_at);
        fields::put(&mut bytes, 57, self.denied_until);
        bytes
    }

    fn decode(bytes: &[u8; 65]) -> Self {
        Tokens {
            tokens: fields::get(bytes, 0),
            spent: fields::get(bytes, 8),
            spent_at: fields::get(bytes, 16),
            dry_at: fields::get(bytes, 24),
            failing: bytes[32] != 0,
            owner: fields::get(bytes, 33),
            owed: fields::get(bytes, 41),
            last_grant: fields::get(bytes, 45),
            wanted_at: fields::get(bytes, 49),
            denied_until: fields::get(bytes, 57),
        }
    }
}

/// Where the lease requests to the RLS stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Nothing in flight; the next lease may be asked for.
    Idle,
    /// Worker `by` asked for `hits` at `since`; no one else asks until it answers, or until the
    /// claim is stale.
    Requested { since: u64, by: u64, hits: u32 },
    /// The RLS said over limit: no more asks until its window resets.
    Denied { until: u64 },
    /// The RLS failed: no more asks until the backoff ends.
    Failing { until: u64 },
}

impl LeaseState {
    /// Whether this is the call `claim` that `worker` made: only that call settles or frees it
    /// (a stale claim taken over is the new claimant's).
    pub fn is_claim(&self, worker: u64, claim: Claim) -> bool {
        matches!(*self, LeaseState::Requested { since, by, .. } if by == worker && since == claim.since)
    }
}

/// The lease record: its state, the last lease's size, what the RLS said is left in its window,
/// and where the rate was last measured from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRecord {
    pub state: LeaseState,
    pub last_size: u32,
    /// `Some(n)`: the RLS's window has `n` hits left (0: none until it resets), until
    /// `window_ends` (0: the RLS did not say).
    pub window_left: Option<u32>,
    pub window_ends: u64,
    /// The most one window was seen to hold (hits granted plus what was left, or what a denial
    /// said was left): no lease asks for more, which the RLS could only refuse.
    pub window_size: u32,
    /// `spent` and the time at the last grant: the rate is measured from there.
    pub spent_mark: u64,
    pub mark_at: u64,
    /// The client these figures are a per-client bucket's for (see [`Tokens::owner`]).
    pub owner: u64,
}

impl LeaseRecord {
    pub fn fresh() -> Self {
        LeaseRecord::fresh_for(0)
    }

    pub fn fresh_for(owner: u64) -> Self {
        LeaseRecord {
            state: LeaseState::Idle,
            last_size: 0,
            window_left: None,
            window_ends: 0,
            window_size: 0,
            spent_mark: 0,
            mark_at: 0,
            owner,
        }
    }
}

impl Record<66> for LeaseRecord {
    /// Layout: global-limit lease state, version 2 (with its owner).
    const LAYOUT: u8 = 0x84;
    fn encode(&self) -> [u8; 66] {
        let mut bytes = [0; 66];
        let (tag, a, b, c) = match self.state {
            LeaseState::Idle => (0u8, 0, 0, 0),
            LeaseState::Requested { since, by, hits } => (1, since, by, hits),
            LeaseState::Denied { until } => (2, until, 0, 0),
            LeaseState::Failing { until } => (3, until, 0, 0),
        };
        bytes[0] = tag;
        fields::put(&mut bytes, 1, a);
        fields::put(&mut bytes, 9, b);
        fields::put(&mut bytes, 17, c);
        fields::put(&mut bytes, 21, self.last_size);
        bytes[25] = u8::from(self.window_left.is_some());
        fields::put(&mut bytes, 26, self.window_left.unwrap_or(0));
        fields::put(&mut bytes, 30, self.spent_mark);
        fields::put(&mut bytes, 38, self.mark_at);
        fields::put(&mut bytes, 46, self.window_ends);
        fields::put(&mut bytes, 54, self.window_size);
        fields::put(&mut bytes, 58, self.owner);
        bytes
    }

    fn decode(bytes: &[u8; 66]) -> Self {
        let half = |at: usize| fields::get(bytes, at);
        let (a, b, c) = (fields::get(bytes, 1), fields::get(bytes, 9), half(17));
        let state = match bytes[0] {
            1 => LeaseState::Requested {
                since: a,
                by: b,
                hits: c,
            },
            2 => LeaseState::Denied { until: a },
            3 => LeaseState::Failing { until: a },
            _ => LeaseState::Idle,
        };
        LeaseRecord {
            state,
            last_size: half(21),
            window_left: (bytes[25] != 0).then(|| half(26)),
            spent_mark: fields::get(bytes, 30),
            mark_at: fields::get(bytes, 38),
            window_ends: fields::get(bytes, 46),
            window_size: half(54),
            owner: fields::get(bytes, 58),
        }
    }
}

/// A request's take from the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Allowed {
        remaining: u64,
    },
    /// No token. `failing`: the RLS failed, so the failure mode decides, not the bucket.
    Empty {
        failing: bool,
    },
}

/// Takes one token at `now`: one read and one CAS; on an empty bucket, a write only to refresh
/// when it was last found empty (at most every [`DRY_REFRESH`]).
pub fn take<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    now: u64,
) -> Result<(Take, u32), UpdateError> {
    let now = now.max(1);
    cas::update(store, key, MAX_CAS_ATTEMPTS, |record: Option<Tokens>| {
        let mut bucket = record.unwrap_or_default();
        if bucket.tokens > 0 {
            bucket.tokens -= 1;
            bucket.spent = bucket.spent.wrapping_add(1);
            bucket.spent_at = now;
            let remaining = bucket.tokens;
            return Step::Write(bucket, Take::Allowed { remaining });
        }
        let empty = Take::Empty {
            failing: bucket.failing,
        };
        if recent(bucket.dry_at, now, DRY_REFRESH) && bucket.dry_at <= now && record.is_some() {
            Step::Keep(empty)
        } else {
            bucket.dry_at = now;
            Step::Write(bucket, empty)
        }
    })
    .map(|updated| (updated.value, updated.attempts - 1))
}

/// A worker's claim to ask the RLS for `hits`, made at `since`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub hits: u32,
    pub since: u64,
    /// The client of a per-client bucket (0: a limit with one bucket), and the hits admitted on
    /// credit that `hits` includes.
    pub owner: u64,
    pub owed: u32,
    /// A per-client bucket's slot.
    pub slot: u32,
}

/// On the tick: claims the right to ask the RLS for the next lease when one is due (the bucket
/// below its low-water mark, nothing in flight or the claim in flight stale, no denial or
/// backoff running). `stale_after` is how long a claim holds: the call's timeout and some.
pub fn claim<S: SharedStore + ?Sized>(
    store: &S,
    bucket_key: &str,
    lease_key: &str,
    sizing: &LeaseSizing,
    worker: u64,
    now: u64,
    stale_after: Duration,
) -> Result<Option<Claim>, UpdateError> {
    let bucket = read_tokens(store, bucket_key)?;
    let stale_after = u64::try_from(stale_after.as_nanos()).unwrap_or(u64::MAX);
    cas::update(
        store,
        lease_key,
        MAX_CAS_ATTEMPTS,
        |record: Option<LeaseRecord>| {
            let mut lease = record.unwrap_or_else(LeaseRecord::fresh);
            // A slot taken over by another client: its figures are the last client's.
            if lease.owner != bucket.owner {
                lease = LeaseRecord::fresh_for(bucket.owner);
            }
            // A claim made "after now", further than a later reading explains, was made under a
            // clock that has stepped back since: it is stale, or no one would ask for the step.
            let due = match lease.state {
                LeaseState::Idle => true,
                LeaseState::Requested { since, .. } => {
                    now.saturating_sub(since) > stale_after || clock::stepped_back(since, now)
                }
                LeaseState::Denied { until } | LeaseState::Failing { until } => {
                    wait_is_over(until, now)
                }
            };
            if !due {
                return Step::Keep(None);
            }
            let elapsed = now.saturating_sub(lease.mark_at).max(1);
            let spent = bucket.spent.wrapping_sub(lease.spent_mark);
            let rate_milli = if lease.mark_at == 0 {
                0
            } else {
                u64::try_from(u128::from(spent) * 1_000_000_000_000 / u128::from(elapsed))
                    .unwrap_or(u64::MAX)
            };
            // No lease without recent demand: a token spent since the last grant, or a request
            // that found the bucket empty. An idle Envoy holds no part of the global limit, and
            // one whose burst has ended asks for no lease that would sit unused.
            let spending = spent != 0 && recent(bucket.spent_at, now, DEMAND_RECENT);
            if !spending && !recent(bucket.dry_at, now, DEMAND_RECENT) {
                return Step::Keep(None);
            }
            // Ran dry since the last grant: demand the last lease did not cover.
            let ran_dry = bucket.dry_at > lease.mark_at;
            // What the RLS's current window still has, while it lasts, and what a window holds.
            let left = lease
                .window_left
                .filter(|_| lease.window_ends == 0 || now < lease.window_ends);
            let cap = match (left, lease.window_size) {
                (Some(left), size) if left > 0 && size > 0 => Some(left.min(size)),
                (Some(left), _) if left > 0 => Some(left),
                (_, size) if size > 0 => Some(size),
                _ => None,
            };
            let next = sizing.next(rate_milli, lease.last_size, ran_dry, cap);
            // Hits admitted on credit are asked for on top, within what the window has.
            let hits = match cap {
                Some(cap) => next.saturating_add(bucket.owed).min(cap.max(next)),
                None => next.saturating_add(bucket.owed),
            };
            // Low water: at most half the next lease left, so a lease of the minimum 2 is asked
            // for with one token still in hand, not only once the bucket is empty: a steady
            // client then has a whole request interval more for the RLS to answer. A failing RLS
            // is retried whatever the bucket holds, so the failure ends as soon as it can.
            let failing = matches!(lease.state, LeaseState::Failing { .. });
            if !failing && bucket.tokens.saturating_mul(2) > u64::from(hits) {
                return Step::Keep(None);
            }
            lease.state = LeaseState::Requested {
                since: now,
                by: worker,
                hits,
            };
            Step::Write(
                lease,
                Some(Claim {
                    hits,
                    since: now,
                    owner: bucket.owner,
                    owed: bucket.owed,
                    slot: 0,
                }),
            )
        },
    )
    .map(|updated| updated.value)
}

/// The bucket as it stands: one read, no write.
fn read_tokens<S: SharedStore + ?Sized>(store: &S, key: &str) -> Result<Tokens, UpdateError> {
    let mut bucket = Tokens::default();
    cas::update(store, key, 1, |record: Option<Tokens>| {
        bucket = record.unwrap_or_default();
        Step::Keep(())
    })?;
    Ok(bucket)
}

/// How an RLS call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    Answered(Verdict),
    /// Timeout, transport error, a non-OK gRPC status, an undecodable body, or a call the host
    /// would not send.
    Failed,
}

/// What a settled call did, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Granted { hits: u32 },
    Denied,
    Failed,
}

/// Settles the call claimed by `claim` at `worker`: credits the bucket with a grant, records a
/// denial or a failure in the lease state, and frees the claim for the next lease. A grant always
/// lands in the bucket (the RLS counted it); the lease state changes only if the claim is still
/// this call's (a stale claim taken over by another worker is that worker's to settle).
pub fn settle<S: SharedStore + ?Sized>(
    store: &S,
    bucket_key: &str,
    lease_key: &str,
    worker: u64,
    claim: Claim,
    outcome: CallOutcome,
    now: u64,
) -> Result<Settled, UpdateError> {
    let settled = match outcome {
        CallOutcome::Answered(Verdict { code: Code::Ok, .. }) => {
            Settled::Granted { hits: claim.hits }
        }
        CallOutcome::Answered(Verdict {
            code: Code::OverLimit,
            ..
        }) => Settled::Denied,
        _ => Settled::Failed,
    };
    let denied_until = match outcome {
        CallOutcome::Answered(verdict) if verdict.code == Code::OverLimit => {
            wait_until(now, verdict.reset_in.unwrap_or(FAILURE_BACKOFF))
        }
        _ => 0,
    };
    let spent = cas::update(
        store,
        bucket_key,
        MAX_CAS_ATTEMPTS,
        |record: Option<Tokens>| {
            let mut bucket = record.unwrap_or_default();
            let spent = bucket.spent;
            if bucket.owner != claim.owner {
                // The slot went to another client while the call was out: the RLS counted the
                // hits against the last one, and they stay unspent (stricter, never looser).
                return Step::Keep(None);
            }
            match settled {
                Settled::Granted { hits } => {
                    let repaid = claim.owed.min(hits).min(bucket.owed);
                    bucket.owed -= repaid;
                    bucket.tokens = bucket.tokens.saturating_add(u64::from(hits - repaid));
                    bucket.last_grant = hits;
                    // The next ask for a lease may come at once, when this one runs low.
                    bucket.wanted_at = 0;
                    bucket.failing = false;
                    bucket.denied_until = 0;
                }
                Settled::Denied => {
                    bucket.failing = false;
                    bucket.denied_until = denied_until;
                }
                Settled::Failed => bucket.failing = true,
            }
            if record == Some(bucket) {
                Step::Keep(Some(spent))
            } else {
                Step::Write(bucket, Some(spent))
            }
        },
    )?
    .value;
    let Some(spent) = spent else {
        release(store, lease_key, worker, claim)?;
        return Ok(settled);
    };
    let verdict = match outcome {
        CallOutcome::Answered(verdict) => Some(verdict),
        CallOutcome::Failed => None,
    };
    cas::update(
        store,
        lease_key,
        MAX_CAS_ATTEMPTS,
        |record: Option<LeaseRecord>| {
            let mut lease = record.unwrap_or_else(LeaseRecord::fresh);
            if !lease.state.is_claim(worker, claim) {
                return Step::Keep(());
            }
            let reset_at = |verdict: &Verdict| {
                let wait = verdict.reset_in.unwrap_or(FAILURE_BACKOFF);
                now.saturating_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX))
            };
            if let Some(verdict) = verdict {
                lease.window_left = verdict.remaining;
                lease.window_ends = verdict.reset_in.map_or(0, |_| reset_at(&verdict));
                let held = match (settled, verdict.remaining) {
                    (Settled::Granted { hits }, Some(left)) => hits.saturating_add(left),
                    (Settled::Denied, Some(left)) => left,
                    _ => 0,
                };
                lease.window_size = lease.window_size.max(held);
            }
            match (settled, verdict) {
                (Settled::Granted { hits }, Some(verdict)) => {
                    lease.last_size = hits;
                    lease.spent_mark = spent;
                    lease.mark_at = now;
                    // The window is spent: nothing more until it resets.
                    lease.state = match verdict.remaining {
                        Some(0) => LeaseState::Denied {
                            until: wait_until(now, verdict.reset_in.unwrap_or(FAILURE_BACKOFF)),
                        },
                        _ => LeaseState::Idle,
                    };
                }
                (Settled::Denied, Some(verdict)) => {
                    lease.state = match verdict.remaining {
                        // The window has some left, less than was asked: ask for that at once.
                        Some(left) if left > 0 && left < claim.hits => LeaseState::Idle,
                        _ => LeaseState::Denied {
                            until: wait_until(now, verdict.reset_in.unwrap_or(FAILURE_BACKOFF)),
                        },
                    };
                }
                _ => {
                    let backoff = u64::try_from(FAILURE_BACKOFF.as_nanos()).unwrap_or(u64::MAX);
                    lease.state = LeaseState::Failing {
                        until: now.saturating_add(backoff),
                    };
                }
            }
            Step::Write(lease, ())
        },
    )?;
    Ok(settled)
}

/// Gives back a token taken by [`take`] for a request that another limit then refused.
pub fn refund<S: SharedStore + ?Sized>(store: &S, key: &str) -> Result<(), UpdateError> {
    cas::update(store, key, MAX_CAS_ATTEMPTS, |record: Option<Tokens>| {
        let mut bucket = record.unwrap_or_default();
        bucket.tokens = bucket.tokens.saturating_add(1);
        bucket.spent = bucket.spent.wrapping_sub(1);
        Step::Write(bucket, ())
    })
    .map(|_| ())
}

/// Frees the claim `claim` without a lease: the call was not made (its slot changed hands).
pub fn release<S: SharedStore + ?Sized>(
    store: &S,
    lease_key: &str,
    worker: u64,
    claim: Claim,
) -> Result<(), UpdateError> {
    cas::update(
        store,
        lease_key,
        MAX_CAS_ATTEMPTS,
        |record: Option<LeaseRecord>| {
            let mut lease = record.unwrap_or_else(LeaseRecord::fresh);
            if lease.state.is_claim(worker, claim) {
                lease.state = LeaseState::Idle;
                Step::Write(lease, ())
            } else {
                Step::Keep(())
            }
        },
    )
    .map(|_| ())
}

/// A slot whose client has been idle this long may go to another client. What its bucket still
/// holds is lost with it: the RLS counted those hits, so losing them is stricter, never looser.
pub const RECLAIM_AFTER: Duration = Duration::from_secs(2);

/// How often one per-client bucket asks the tick for a lease: at most one push to the wanted
/// list per bucket in this long.
pub const WANT_REFRESH: Duration = Duration::from_millis(50);

/// A request's take from a per-client bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyedTake {
    /// Admitted. `new_owner`: the slot was free or idle and is this client's now, so its
    /// descriptor values must be written; `want`: the tick should ask for a lease.
    Allowed { want: bool, new_owner: bool },
    /// No token; as [`Take::Empty`].
    Empty { failing: bool, want: bool },
    /// Another client holds the slot and is active: this request has no bucket.
    Busy,
}

/// Takes one token from the per-client bucket at `key` for the client `owner` at `now`: one read
/// and one CAS.
///
/// A free or idle slot becomes this client's. An empty bucket that the RLS has not said is over
/// its limit admits on credit, up to `credit` hits outstanding (the next lease asks for them
/// too): a client's first request after a quiet spell does not wait for a lease. Beyond that a
/// request that finds the bucket empty, or low, asks the tick for a lease (`want`), at most every
/// [`WANT_REFRESH`].
pub fn take_keyed<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    owner: u64,
    credit: u32,
    now: u64,
) -> Result<(KeyedTake, u32), UpdateError> {
    let now = now.max(1);
    let owner = owner.max(1);
    cas::update(store, key, MAX_CAS_ATTEMPTS, |record: Option<Tokens>| {
        let mut bucket = record.unwrap_or_default();
        let mut new_owner = false;
        if bucket.owner != owner {
            let active = bucket.spent_at.max(bucket.dry_at).max(bucket.wanted_at);
            // Activity "after now", further than a later reading explains, was recorded under a
            // clock that has stepped back since: it keeps no slot busy for the step.
            if bucket.owner != 0
                && active != 0
                && now.saturating_sub(active) <= nanos(RECLAIM_AFTER)
                && !clock::stepped_back(active, now)
            {
                return Step::Keep(KeyedTake::Busy);
            }
            bucket = Tokens {
                owner,
                ..Tokens::default()
            };
            new_owner = true;
        }
        let may_ask = !recent(bucket.wanted_at, now, WANT_REFRESH) || bucket.wanted_at > now;
        // Credit: for a client that is new here or back after a quiet spell (an episode that
        // runs until a lease repays it), never for one that spent its bucket just now.
        let cold = bucket.owed > 0
            || !(recent(bucket.spent_at, now, DEMAND_RECENT)
                || recent(bucket.dry_at, now, DEMAND_RECENT));
        let on_credit = cold
            && bucket.owed < credit
            && wait_is_over(bucket.denied_until, now)
            && !bucket.failing;
        if bucket.tokens > 0 || on_credit {
            if bucket.tokens > 0 {
                bucket.tokens -= 1;
            } else {
                bucket.owed += 1;
            }
            bucket.spent = bucket.spent.wrapping_add(1);
            bucket.spent_at = now;
            let low = bucket.tokens.saturating_mul(2) <= u64::from(bucket.last_grant.max(1));
            let want = may_ask && (low || bucket.owed > 0);
            if want {
                bucket.wanted_at = now;
            }
            return Step::Write(bucket, KeyedTake::Allowed { want, new_owner });
        }
        let empty = KeyedTake::Empty {
            failing: bucket.failing,
            want: may_ask,
        };
        // As for a single bucket: a flood of refusals writes at most every DRY_REFRESH (to mark
        // the demand) and when it asks the tick for a lease.
        let dry_recently = recent(bucket.dry_at, now, DRY_REFRESH) && bucket.dry_at <= now;
        if dry_recently && !may_ask && !new_owner {
            return Step::Keep(empty);
        }
        bucket.dry_at = now;
        if may_ask {
            bucket.wanted_at = now;
        }
        Step::Write(bucket, empty)
    })
    .map(|updated| (updated.value, updated.attempts - 1))
}

/// Gives back a token taken by [`take_keyed`] for a request that another limit then refused:
/// to the tokens, or off the credit it was admitted on.
pub fn refund_keyed<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    owner: u64,
) -> Result<(), UpdateError> {
    let owner = owner.max(1);
    cas::update(store, key, MAX_CAS_ATTEMPTS, |record: Option<Tokens>| {
        let mut bucket = record.unwrap_or_default();
        if bucket.owner != owner {
            return Step::Keep(());
        }
        if bucket.owed > 0 {
            bucket.owed -= 1;
        } else {
            bucket.tokens = bucket.tokens.saturating_add(1);
        }
        bucket.spent = bucket.spent.wrapping_sub(1);
        Step::Write(bucket, ())
    })
    .map(|_| ())
}

/// How many slots the wanted list holds: leases asked for in one tick per limit, at most.
pub const WANTED_CAPACITY: usize = 32;

/// The per-client buckets that asked the tick for a lease, in one record per limit. A push to a
/// full list is dropped; the bucket asks again [`WANT_REFRESH`] later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    pub len: u32,
    pub slots: [u32; WANTED_CAPACITY],
}

impl Default for Wanted {
    fn default() -> Self {
        Wanted {
            len: 0,
            slots: [0; WANTED_CAPACITY],
        }
    }
}

impl Wanted {
    pub fn slots(&self) -> &[u32] {
        let len = usize::try_from(self.len).unwrap_or(0).min(WANTED_CAPACITY);
        &self.slots[..len]
    }
}

impl Record<132> for Wanted {
    /// Layout: global-limit wanted list, version 1.
    const LAYOUT: u8 = 0x85;
    fn encode(&self) -> [u8; 132] {
        let mut bytes = [0; 132];
        fields::put(&mut bytes, 0, self.len);
        for (i, slot) in self.slots.iter().enumerate() {
            fields::put(&mut bytes, 4 + 4 * i, *slot);
        }
        bytes
    }

    fn decode(bytes: &[u8; 132]) -> Self {
        let mut wanted = Wanted {
            len: fields::get::<u32>(bytes, 0).min(WANTED_CAPACITY as u32),
            ..Wanted::default()
        };
        for (i, slot) in wanted.slots.iter_mut().enumerate() {
            *slot = fields::get(bytes, 4 + 4 * i);
        }
        wanted
    }
}

/// Adds `slot` to the wanted list at `key`. `Ok(false)`: the list was full.
pub fn push_wanted<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    slot: u32,
) -> Result<bool, UpdateError> {
    cas::update(store, key, MAX_CAS_ATTEMPTS, |record: Option<Wanted>| {
        let mut wanted = record.unwrap_or_default();
        if wanted.slots().contains(&slot) {
            return Step::Keep(true);
        }
        let len = wanted.slots().len();
        if len == WANTED_CAPACITY {
            return Step::Keep(false);
        }
        wanted.slots[len] = slot;
        wanted.len += 1;
        Step::Write(wanted, true)
    })
    .map(|updated| updated.value)
}

/// Empties the wanted list at `key` and returns what it held.
pub fn take_wanted<S: SharedStore + ?Sized>(store: &S, key: &str) -> Result<Wanted, UpdateError> {
    cas::update(store, key, MAX_CAS_ATTEMPTS, |record: Option<Wanted>| {
        let wanted = record.unwrap_or_default();
        if wanted.len == 0 {
            Step::Keep(wanted)
        } else {
            Step::Write(Wanted::default(), wanted)
        }
    })
    .map(|updated| updated.value)
}

/// The longest descriptor value a per-client bucket sends, after normalising: a longer one
/// counts as missing (it could not be sent whole, and a cut one would land on another client's
/// counter).
pub const MAX_VALUE: usize = 128;
/// Key parts of one per-client limit, at most (as a local limit's `key`).
pub const MAX_VALUES: usize = 4;
/// A slot's descriptor values as written: the owner, then each value's length and bytes.
pub const VALUES_CAPACITY: usize = 8 + MAX_VALUES * (1 + MAX_VALUE);

/// A client's descriptor values, in order, built on the stack: what the tick sends to the RLS
/// for this client's slot, and what its owner hash is computed over.
pub struct Values {
    bytes: [u8; VALUES_CAPACITY],
    len: usize,
}

impl Default for Values {
    fn default() -> Self {
        Values {
            bytes: [0; VALUES_CAPACITY],
            len: 8,
        }
    }
}

impl Values {
    /// Appends one value, normalised as `form` by [`normalise`]; `None` (missing) is sent as
    /// empty. `false`: the value is longer than [`MAX_VALUE`], or there are too many.
    pub fn push(&mut self, value: Option<&[u8]>, form: Form) -> bool {
        if self.len + 1 + MAX_VALUE > VALUES_CAPACITY {
            return false;
        }
        let start = self.len + 1;
        let mut at = start;
        let mut fits = true;
        if let Some(value) = value {
            normalise(value, form, |byte| {
                if at < start + MAX_VALUE {
                    self.bytes[at] = byte;
                    at += 1;
                } else {
                    fits = false;
                }
            });
        }
        if !fits {
            return false;
        }
        self.bytes[self.len] = (at - start) as u8;
        self.len = at;
        true
    }

    /// The longest record of `parts` values.
    pub fn record_len(parts: usize) -> usize {
        (8 + parts.min(MAX_VALUES) * (1 + MAX_VALUE)).min(VALUES_CAPACITY)
    }

    /// Sets the owner hash the record is written under.
    pub fn set_owner(&mut self, owner: u64) {
        fields::put(&mut self.bytes, 0, owner.max(1));
    }

    /// The values after the owner, as length-prefixed runs.
    pub fn runs(&self) -> &[u8] {
        &self.bytes[8..self.len]
    }

    /// The record to write into the slot's values key.
    pub fn as_record(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Reads a record written by [`Values::as_record`]: its owner and its values' runs.
    pub fn parse(record: &[u8]) -> Option<(u64, &[u8])> {
        Some((fields::get(record.get(..8)?, 0), record.get(8..)?))
    }

    /// The values in `runs`, in order.
    pub fn runs_of(mut runs: &[u8]) -> impl Iterator<Item = &[u8]> {
        core::iter::from_fn(move || {
            let (&len, tail) = runs.split_first()?;
            let value = tail.get(..usize::from(len))?;
            runs = &tail[usize::from(len)..];
            Some(value)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::cas::ensure;
    use crate::state::fake::FakeStore;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const MS: u64 = 1_000_000;
    const BUCKET: &str = "sw:p:rl:g:all";
    const LEASE: &str = "sw:p:rl:g:lease";

    fn sizing() -> LeaseSizing {
        LeaseSizing {
            min: 10,
            max: 500,
            lookahead: Duration::from_millis(500),
        }
    }

    fn ok(remaining: Option<u32>) -> CallOutcome {
        CallOutcome::Answered(Verdict {
            code: Code::Ok,
            remaining,
            reset_in: remaining.map(|_| Duration::from_millis(400)),
        })
    }

    fn over(remaining: u32) -> CallOutcome {
        CallOutcome::Answered(Verdict {
            code: Code::OverLimit,
            remaining: Some(remaining),
            reset_in: Some(Duration::from_millis(400)),
        })
    }

    fn store() -> FakeStore {
        let store = FakeStore::new();
        ensure(&store, BUCKET, &Tokens::default()).unwrap();
        ensure(&store, LEASE, &LeaseRecord::fresh()).unwrap();
        // A request found it empty: the demand that asks for the first lease.
        assert_eq!(
            take(&store, BUCKET, 999 * MS).unwrap().0,
            Take::Empty { failing: false }
        );
        store
    }

    #[test]
    fn granted_tokens_stay_until_spent_and_stale_demand_asks_for_nothing() {
        let store = store();
        let c = claim_at(&store, 1, 1_000 * MS).unwrap();
        settle(&store, BUCKET, LEASE, 1, c, ok(Some(90)), 1_001 * MS).unwrap();
        // Long after the window ended, the tokens are still there: counted when granted.
        assert!(matches!(
            take(&store, BUCKET, 9_000 * MS).unwrap().0,
            Take::Allowed { remaining: 9 }
        ));
        // Spent 300 ms ago, and nothing since: not recent, no lease.
        assert_eq!(claim_at(&store, 1, 9_300 * MS), None);
        // A request found it empty long ago: no lease either; a recent one asks.
        let store = FakeStore::new();
        ensure(&store, BUCKET, &Tokens::default()).unwrap();
        ensure(&store, LEASE, &LeaseRecord::fresh()).unwrap();
        let _ = take(&store, BUCKET, 1_000 * MS).unwrap();
        assert_eq!(claim_at(&store, 1, 1_250 * MS), None);
        let _ = take(&store, BUCKET, 1_260 * MS).unwrap();
        assert!(claim_at(&store, 1, 1_300 * MS).is_some());
    }

    #[test]
    fn a_flood_of_refusals_writes_at_most_every_dry_refresh() {
        let store = FakeStore::new();
        ensure(&store, BUCKET, &Tokens::default()).unwrap();
        let before = store.counts().sets;
        for ms in 0..1_000 {
            for _ in 0..10 {
                let _ = take(&store, BUCKET, 1_000 * MS + ms * MS).unwrap();
            }
        }
        let writes = store.counts().sets - before;
        assert!(
            (19..=21).contains(&writes),
            "{writes} writes for 10,000 refusals in 1 s"
        );
    }

    #[test]
    fn a_lease_asks_no_more_than_a_window_holds_and_an_ended_window_caps_nothing() {
        let store = store();
        let c = claim_at(&store, 1, 1_000 * MS).unwrap();
        // 10 granted, 90 left: a window holds 100. It ends 400 ms later.
        settle(&store, BUCKET, LEASE, 1, c, ok(Some(90)), 1_001 * MS).unwrap();
        let record = |store: &FakeStore| {
            let mut read = None;
            cas::update(store, LEASE, 1, |r: Option<LeaseRecord>| {
                read = r;
                Step::Keep(())
            })
            .unwrap();
            read.unwrap()
        };
        let lease = record(&store);
        assert_eq!((lease.window_size, lease.window_left), (100, Some(90)));
        // A lease of 80 that ran dry would double to 160: capped at the window's 100 once the
        // window that had 5 left has ended, at 5 while it lasts.
        for (now, expected) in [(1_300, 5), (1_500, 100)] {
            let store = FakeStore::new();
            ensure(&store, BUCKET, &Tokens::default()).unwrap();
            let mut stale = lease;
            stale.last_size = 80;
            stale.window_left = Some(5);
            ensure(&store, LEASE, &stale).unwrap();
            let _ = take(&store, BUCKET, now * MS).unwrap();
            let claim = claim_at(&store, 1, now * MS).unwrap();
            assert_eq!(claim.hits, expected, "at {now} ms");
        }
    }

    #[test]
    fn an_idle_bucket_asks_for_nothing() {
        let store = FakeStore::new();
        ensure(&store, BUCKET, &Tokens::default()).unwrap();
        ensure(&store, LEASE, &LeaseRecord::fresh()).unwrap();
        assert_eq!(claim_at(&store, 1, 1_000 * MS), None);
        let _ = take(&store, BUCKET, 1_010 * MS).unwrap();
        let c = claim_at(&store, 1, 1_020 * MS).unwrap();
        settle(&store, BUCKET, LEASE, 1, c, ok(None), 1_021 * MS).unwrap();
        // Nothing spent since the grant: asks nothing. Some spent, below low water: asks.
        assert_eq!(claim_at(&store, 1, 1_030 * MS), None);
        for _ in 0..6 {
            let _ = take(&store, BUCKET, 1_035 * MS).unwrap();
        }
        assert!(claim_at(&store, 1, 1_040 * MS).is_some());
        let store_idle = FakeStore::new();
        ensure(
            &store_idle,
            BUCKET,
            &Tokens {
                tokens: 1,
                ..Tokens::default()
            },
        )
        .unwrap();
        ensure(&store_idle, LEASE, &LeaseRecord::fresh()).unwrap();
        assert_eq!(
            claim_at(&store_idle, 1, 2_000 * MS),
            None,
            "one token, never spent"
        );
    }

    #[test]
    fn a_flood_of_refusals_on_a_client_bucket_writes_at_most_every_refresh() {
        const SLOT: &str = "sw:p:rl:u:g:0";
        let store = FakeStore::new();
        ensure(&store, SLOT, &Tokens::default()).unwrap();
        // The client takes the slot and spends its credit of 1; then 10,000 refusals in 1 s.
        let (first, _) = take_keyed(&store, SLOT, 7, 1, 1_000 * MS).unwrap();
        assert!(matches!(
            first,
            KeyedTake::Allowed {
                new_owner: true,
                ..
            }
        ));
        let before = store.counts().sets;
        for ms in 1..=1_000 {
            for _ in 0..10 {
                let (take, _) = take_keyed(&store, SLOT, 7, 1, 1_000 * MS + ms * MS).unwrap();
                assert!(matches!(take, KeyedTake::Empty { failing: false, .. }));
            }
        }
        let writes = store.counts().sets - before;
        assert!(
            (19..=21).contains(&writes),
            "{writes} writes for 10,000 refusals in 1 s"
        );
    }

    fn claim_at(store: &FakeStore, worker: u64, now: u64) -> Option<Claim> {
        claim(
            store,
            BUCKET,
            LEASE,
            &sizing(),
            worker,
            now,
            Duration::from_millis(300),
        )
        .unwrap()
    }

    fn drain(store: &FakeStore) -> u64 {
        let mut n = 0;
        while let Ok((Take::Allowed { .. }, _)) = take(store, BUCKET, 5_000 * MS) {
            n += 1;
        }
        n
    }

    #[test]
    fn sizing_follows_the_rate_doubles_when_dry_and_respects_the_window() {
        let s = sizing();
        // 100/s over 500 ms: 50.
        assert_eq!(s.next(100_000, 0, false, None), 50);
        assert_eq!(s.next(0, 0, false, None), 10);
        assert_eq!(s.next(100_000, 40, true, None), 80);
        assert_eq!(s.next(1_000_000_000, 40, true, None), 500);
        assert_eq!(s.next(100_000, 0, false, Some(7)), 7);
    }

    #[test]
    fn only_one_worker_holds_the_claim_until_it_settles_or_goes_stale() {
        let store = store();
        let first = claim_at(&store, 1, 1_000 * MS).unwrap();
        assert_eq!(first.hits, 10);
        assert_eq!(claim_at(&store, 2, 1_001 * MS), None);
        // Stale after 300 ms: another worker takes over (requests still find it empty).
        let _ = take(&store, BUCKET, 1_390 * MS).unwrap();
        let second = claim_at(&store, 2, 1_400 * MS).unwrap();
        // The first call's late grant still lands in the bucket (the RLS counted it), but the
        // claim is the second worker's now.
        settle(&store, BUCKET, LEASE, 1, first, ok(None), 1_401 * MS).unwrap();
        assert_eq!(claim_at(&store, 3, 1_402 * MS), None);
        settle(&store, BUCKET, LEASE, 2, second, ok(None), 1_403 * MS).unwrap();
        assert_eq!(drain(&store), 20);
    }

    #[test]
    fn no_lease_is_asked_for_while_the_bucket_is_above_low_water() {
        let store = store();
        let c = claim_at(&store, 1, 1_000 * MS).unwrap();
        settle(&store, BUCKET, LEASE, 1, c, ok(None), 1_001 * MS).unwrap();
        assert_eq!(claim_at(&store, 1, 1_002 * MS), None, "10 tokens held");
        for _ in 0..6 {
            assert!(matches!(
                take(&store, BUCKET, 1_050 * MS).unwrap().0,
                Take::Allowed { .. }
            ));
        }
        // 4 left, under half of the next lease: ask.
        assert!(claim_at(&store, 2, 1_100 * MS).is_some());
    }

    #[test]
    fn a_denial_waits_for_the_window_and_a_partial_window_is_asked_for_exactly() {
        let store = store();
        let c = claim_at(&store, 1, 1_000 * MS).unwrap();
        assert_eq!(
            settle(&store, BUCKET, LEASE, 1, c, over(3), 1_001 * MS),
            Ok(Settled::Denied)
        );
        // 3 left in the window: asked for at once, exactly 3.
        let c = claim_at(&store, 1, 1_002 * MS).unwrap();
        assert_eq!(c.hits, 3);
        settle(&store, BUCKET, LEASE, 1, c, ok(Some(0)), 1_003 * MS).unwrap();
        assert_eq!(drain(&store), 3);
        // The window is spent: nothing until it resets 400 ms later.
        let _ = take(&store, BUCKET, 1_300 * MS).unwrap();
        assert_eq!(claim_at(&store, 2, 1_300 * MS), None);
        assert!(claim_at(&store, 2, 1_404 * MS).is_some());
    }

    #[test]
    fn a_failure_marks_the_bucket_failing_until_a_grant() {
        let store = store();
        let c = claim_at(&store, 1, 1_000 * MS).unwrap();
        settle(&store, BUCKET, LEASE, 1, c, CallOutcome::Failed, 1_001 * MS).unwrap();
        assert_eq!(
            take(&store, BUCKET, 1_002 * MS).unwrap().0,
            Take::Empty { failing: true }
        );
        assert_eq!(claim_at(&store, 1, 1_500 * MS), None, "backing off");
        let _ = take(&store, BUCKET, 2_000 * MS).unwrap();
        let c = claim_at(&store, 1, 2_002 * MS).unwrap();
        settle(&store, BUCKET, LEASE, 1, c, ok(None), 2_003 * MS).unwrap();
        assert!(matches!(
            take(&store, BUCKET, 2_004 * MS).unwrap().0,
            Take::Allowed { .. }
        ));
    }

    /// A fake RLS with a fixed window, and workers that race on the fake store: whatever the
    /// interleaving, the bucket never admits more than the RLS granted, and only one lease is
    /// ever in flight.
    #[test]
    fn many_workers_admit_exactly_what_the_fake_rls_granted() {
        struct FakeRls {
            limit: u32,
            used: u32,
            window_end: u64,
            calls: u32,
        }
        impl FakeRls {
            fn call(&mut self, hits: u32, now: u64) -> CallOutcome {
                self.calls += 1;
                if now >= self.window_end {
                    self.used = 0;
                    self.window_end = now + 1_000 * MS;
                }
                let reset = Some(Duration::from_nanos(self.window_end - now));
                let code = if self.used + hits <= self.limit {
                    self.used += hits;
                    Code::Ok
                } else {
                    Code::OverLimit
                };
                CallOutcome::Answered(Verdict {
                    code,
                    remaining: Some(self.limit - self.used),
                    reset_in: reset,
                })
            }
        }
        use std::collections::HashMap;
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let store = store();
        // The time, and the end of the fake RLS's current window, for the racer too; and the
        // admissions in each window, by its end (0: outside any window).
        let clock = Arc::new(AtomicU64::new(0));
        let window = Arc::new(AtomicU64::new(0));
        let per_window: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
        let note = {
            let (window, per_window) = (Arc::clone(&window), Arc::clone(&per_window));
            move |now: u64| {
                let end = window.load(Ordering::Relaxed);
                let key = if now < end { end } else { 0 };
                *per_window.lock().unwrap().entry(key).or_default() += 1;
            }
        };
        // A fifth worker that takes a token between every third read and write of the others.
        let raced = Arc::new(AtomicU64::new(0));
        let (counter, mut writes) = (Arc::clone(&raced), 0u32);
        let (racer_clock, racer_note) = (Arc::clone(&clock), note.clone());
        store.interfere(move |store| {
            writes += 1;
            let now = racer_clock.load(Ordering::Relaxed);
            if writes % 3 == 0 {
                if let Ok((Take::Allowed { .. }, _)) = take(store, BUCKET, now) {
                    counter.fetch_add(1, Ordering::Relaxed);
                    racer_note(now);
                }
            }
        });
        let mut rls = FakeRls {
            limit: 100,
            used: 0,
            window_end: 0,
            calls: 0,
        };
        let mut admitted = 0u64;
        let mut in_flight: Option<(u64, Claim, u64)> = None;
        let start = 10_000 * MS;
        // 4 workers, 10 s, every worker sees 20 requests and a tick each 10 ms; calls take 5 ms.
        let mut now = start;
        while now < start + 10_000 * MS {
            for worker in 1..=4u64 {
                for _ in 0..20 {
                    clock.store(now, Ordering::Relaxed);
                    if let Take::Allowed { .. } = take(&store, BUCKET, now).unwrap().0 {
                        admitted += 1;
                        note(now);
                    }
                }
                if let Some((by, c, due)) = in_flight {
                    if now >= due {
                        let outcome = rls.call(c.hits, now);
                        window.store(rls.window_end, Ordering::Relaxed);
                        settle(&store, BUCKET, LEASE, by, c, outcome, now).unwrap();
                        in_flight = None;
                    }
                }
                if let Some(c) = claim_at(&store, worker, now) {
                    assert!(in_flight.is_none(), "two leases in flight");
                    in_flight = Some((worker, c, now + 5 * MS));
                }
            }
            now += 10 * MS;
        }
        store.stop_interfering();
        // A window can admit what it granted and what was left of earlier leases: under this
        // flood, leases are spent within a tick, so never much over its 100.
        let per_window = per_window.lock().unwrap().clone();
        assert!(per_window.values().all(|&n| n <= 110), "{per_window:?}");
        let raced = raced.load(Ordering::Relaxed);
        assert!(raced > 100, "the racer took only {raced}");
        let admitted = admitted + raced;
        let held = drain(&store);
        // Ten windows, and the last one may have been granted and not yet spent.
        assert!(
            admitted + held <= 1_000,
            "{admitted} + {held} over the 10 windows' 1,000"
        );
        assert!(admitted >= 950, "only {admitted} of 1,000 admitted");
        assert!(rls.calls < 200, "{} RLS calls", rls.calls);
    }
}
