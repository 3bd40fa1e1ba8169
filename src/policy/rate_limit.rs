//! Token-bucket rate limits that hold exactly across all of Envoy's workers.
//!
//! A bucket's whole state is one number, its theoretical arrival time (GCRA, as in governor and
//! Envoy's `AtomicTokenBucketImpl`): the instant at which the bucket would be full again. Admitting
//! a request pushes it one emission interval later; the request is refused when that would put it
//! more than `burst` intervals ahead of now. No refill timer, no per-window keys: one 8-byte
//! record per bucket in shared data, updated by the bounded CAS loop, so every worker sees every
//! other worker's admissions.
//!
//! Buckets are either one per policy or one per client key. Client keys hash into a fixed table of
//! `max_keys` slots ([`SlotTable`]); two clients in one slot share a bucket, which can only make
//! the limit stricter for them, never looser. All keys are created at configure time, so the
//! request path never inserts and shared data never grows with traffic.
//!
//! # Leases
//!
//! A single (unkeyed) bucket that holds plenty of tokens can be leased: one CAS moves its arrival
//! time `n` intervals on, and the worker admits the next `n` requests from the lease without
//! touching shared data. Admission stays exact in the cumulative sense, because every token a
//! worker admits locally was taken from the shared bucket first: admissions up to any instant
//! never exceed `burst + rate × elapsed`. What a lease changes is *when* a token is counted: it is
//! taken from the bucket when leased, and spent up to one tick later. So over a window, admissions
//! can exceed `burst + rate × window` by the tokens leased before the window and spent inside it,
//! and a request can be refused while tokens sit unspent in other workers' leases. Both are
//! bounded by the lease size and by the lease's life (one tick), and both vanish for buckets too
//! small to lease ([`LEASE_MIN_AVAILABLE`]): those decide every request in shared data exactly as
//! if leases did not exist. The worker-side rules (sizing by recent use, return on the tick) live
//! in `engine/limits.rs`; this module holds the one CAS that takes and returns leased tokens.

use core::time::Duration;

use crate::clock;
use crate::state::cas::{self, Record, Step, UpdateError};
use crate::state::fields;
use crate::state::slots::{KeyBuf, SlotTable};
use crate::state::{SharedStore, StoreError};

/// How many times one decision may lose a CAS race before the failure mode decides. A lost race
/// means another worker's decision landed, so the system as a whole always makes progress.
pub const MAX_CAS_ATTEMPTS: u32 = 32;

/// A bucket is leased from only while it holds at least this many tokens. Below it, every decision
/// is made in shared data exactly as without leases: buckets with a burst under 32 (the
/// real-Envoy exactness tests use bursts of 5, 10 and 20) never lease at all, and a big bucket
/// near its limit goes back to deciding every request where all workers see it.
pub const LEASE_MIN_AVAILABLE: u64 = 32;

/// A lease takes at most this fraction (1/16) of what the bucket holds, so the first workers to
/// lease leave most of the bucket to the others: with `w` workers leasing at once, at least
/// `(15/16)^w` of it stays shared (over 52% with 10 workers).
pub const LEASE_FRACTION: u64 = 16;

/// And at most this many tokens, whatever the bucket holds: the cap on what one worker can hold
/// unspent, which is what the error bound is stated in. 1024 tokens is about one tick's worth
/// for a worker at 10,000 requests a second, so a busy worker still goes to shared data about
/// once a tick.
pub const LEASE_MAX: u32 = 1024;

/// How many tokens one CAS takes for a worker that `wants` this many, from a bucket holding
/// `available`: 1 (no lease: decide this request alone) unless the bucket is ample.
pub fn lease_size(available: u64, wants: u32) -> u32 {
    if available < LEASE_MIN_AVAILABLE {
        return 1;
    }
    let cap =
        u32::try_from((available / LEASE_FRACTION).min(u64::from(LEASE_MAX))).unwrap_or(LEASE_MAX);
    wants.min(cap).max(1)
}

/// The generic cell rate algorithm for one rate and burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Nanoseconds per token.
    interval: u64,
    /// How far ahead of now the theoretical arrival time may run: `burst` intervals.
    tolerance: u64,
    burst: u32,
    /// The configured limit this one is a scale of (itself when unscaled): the terms its bucket's
    /// arrival time is stored in.
    base: Terms,
}

/// The limit an arrival time is measured in: its interval and tolerance, in nanoseconds. A bucket's
/// record carries the terms it was written in, so a reader under other terms (a reload changed the
/// rate or the burst, or an old and a new config serve at once while the old one drains) converts
/// the bucket rather than misreading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    pub interval: u64,
    pub tolerance: u64,
}

/// A GCRA verdict on one request, with what clients are told about the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcraDecision {
    Allow {
        new_tat: u64,
        /// Requests that could still be admitted right now.
        remaining: u32,
        /// Until the bucket is full again.
        full_in: Duration,
    },
    Deny {
        /// Until one request would be admitted.
        retry_in: Duration,
        full_in: Duration,
    },
}

impl Gcra {
    pub fn new(interval: Duration, burst: u32) -> Self {
        let interval = u64::try_from(interval.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let burst = burst.max(1);
        let tolerance = interval.saturating_mul(u64::from(burst));
        Gcra {
            interval,
            tolerance,
            burst,
            base: Terms {
                interval,
                tolerance,
            },
        }
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The same bucket at `ppm` parts per million of its rate and burst (degradation's
    /// `rate_limit_factor`). The tolerance in time stays the same, so the scaled and the unscaled
    /// limit read one arrival time consistently: each admission just costs more of it.
    pub fn scaled(&self, ppm: u32) -> Gcra {
        let ppm = u64::from(ppm.clamp(1, 1_000_000));
        let interval = self.interval.saturating_mul(1_000_000) / ppm;
        let interval = interval.max(1);
        Gcra {
            interval,
            // At least one admission must fit, or a burst of 1 would refuse everything.
            tolerance: self.tolerance.max(interval),
            burst: u32::try_from(u64::from(self.burst) * ppm / 1_000_000)
                .unwrap_or(u32::MAX)
                .max(1),
            base: self.base,
        }
    }

    /// The record that stores arrival time `at` in this limit's terms.
    pub fn record(&self, at: u64) -> Tat {
        Tat {
            at,
            terms: self.base,
        }
    }

    /// The arrival time a stored bucket holds, in this limit's terms (`None`: no record, a fresh
    /// bucket). A record written in other terms keeps the tokens it held at `now`, rounded down
    /// and at most this limit's burst: a reload never refills a bucket, and alternating between
    /// two limits never does either. Its debt does not carry over, only its tokens: an empty
    /// bucket of a slower limit is an empty bucket of this one.
    pub fn arrival(&self, record: Option<Tat>, now: u64) -> Option<u64> {
        let record = record?;
        if record.terms == self.base {
            return Some(record.at);
        }
        let old = record.terms;
        let ahead = record.at.clamp(now, now.saturating_add(old.tolerance)) - now;
        let held = u128::from(old.tolerance.saturating_sub(ahead));
        let converted = held * u128::from(self.base.interval) / u128::from(old.interval.max(1));
        let held = u64::try_from(converted)
            .unwrap_or(u64::MAX)
            .min(self.base.tolerance);
        Some(now.saturating_add(self.base.tolerance - held))
    }

    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval)
    }

    /// Decides for a request arriving at `now` (nanoseconds) on a bucket whose theoretical arrival
    /// time is `tat` (`None`: a fresh, full bucket).
    pub fn decide(&self, tat: Option<u64>, now: u64) -> GcraDecision {
        let tat = self.clamp(tat, now);
        let new_tat = tat.saturating_add(self.interval);
        let ahead = new_tat - now;
        if ahead <= self.tolerance {
            let remaining = (self.tolerance - ahead) / self.interval;
            GcraDecision::Allow {
                new_tat,
                remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                full_in: Duration::from_nanos(ahead),
            }
        } else {
            GcraDecision::Deny {
                retry_in: Duration::from_nanos(ahead - self.tolerance),
                full_in: Duration::from_nanos(tat - now),
            }
        }
    }

    /// The arrival time as this limit reads it at `now`: never before now (a bucket is full at
    /// most). A time more than the tolerance ahead was written by a worker whose reading of the
    /// clock is later than `now`, and is kept: clamping it would move the bucket back by the
    /// skew and mint tokens. Only a time so far ahead that no reading explains it
    /// ([`clock::stepped_back`]) was written under a clock that has stepped back since, and
    /// counts as an empty bucket, never as hours of debt. (A reload to a slower limit is
    /// converted by [`Gcra::arrival`] before it gets here.)
    pub fn clamp(&self, tat: Option<u64>, now: u64) -> u64 {
        let tat = tat.unwrap_or(0).max(now);
        let latest = now.saturating_add(self.tolerance);
        if clock::stepped_back(tat, latest) {
            latest
        } else {
            tat
        }
    }

    /// Tokens the bucket holds at `now`, as this limit reads the arrival time `tat`.
    pub fn available(&self, tat: Option<u64>, now: u64) -> u64 {
        now.saturating_add(self.tolerance)
            .saturating_sub(self.clamp(tat, now))
            / self.interval
    }

    /// The arrival time that `tokens` tokens of this limit are worth.
    pub fn span(&self, tokens: u32) -> u64 {
        self.interval.saturating_mul(u64::from(tokens))
    }

    /// Gives back one token taken at any time: the arrival time moves one interval earlier. A
    /// bucket that has meanwhile refilled past full stays full.
    pub fn refund(&self, tat: u64) -> u64 {
        tat.saturating_sub(self.interval)
    }
}

/// A bucket's record in shared data: the theoretical arrival time in nanoseconds since the epoch,
/// and the terms (interval and tolerance) it is measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tat {
    pub at: u64,
    pub terms: Terms,
}

impl Record<24> for Tat {
    /// Layout: GCRA theoretical arrival time with its terms (0x41 had the time alone).
    const LAYOUT: u8 = 0x42;
    fn encode(&self) -> [u8; 24] {
        let mut bytes = [0; 24];
        fields::put(&mut bytes, 0, self.at);
        fields::put(&mut bytes, 8, self.terms.interval);
        fields::put(&mut bytes, 16, self.terms.tolerance);
        bytes
    }

    fn decode(bytes: &[u8; 24]) -> Self {
        Tat {
            at: fields::get(bytes, 0),
            terms: Terms {
                interval: fields::get(bytes, 8),
                tolerance: fields::get(bytes, 16),
            },
        }
    }
}

/// Whether a limit rejects or only reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    /// Counts would-be rejections and adds headers, but lets every request through.
    Shadow,
}

/// What to do when the decision cannot be made: the CAS loop ran out, or shared data failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Admit the request: availability over strictness.
    Open,
    /// Refuse the request: strictness over availability.
    Closed,
}

/// Where a policy keeps its buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Buckets {
    /// One bucket for every request.
    Single { key: String },
    /// One bucket per client key, hashed into `slots`.
    Keyed {
        slots: SlotTable,
        seed: u64,
        missing: MissingKey,
    },
}

/// What a keyed limit does with a request that lacks a key part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MissingKey {
    /// The limit does not apply to it.
    Skip,
    /// All such requests share one bucket (the default: dropping a header cannot dodge a limit).
    Shared { key: String },
}

/// The bucket a request lands in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketChoice<'k> {
    Key(&'k str),
    /// The limit does not apply to this request.
    Exempt,
}

impl Buckets {
    /// Picks the bucket for a request whose client key hashes to `hash` (`None`: a part is
    /// missing; see `policy::key` for the hash).
    pub fn choose<'k>(&'k self, hash: Option<u64>, buffer: &'k mut KeyBuf) -> BucketChoice<'k> {
        match (self, hash) {
            (Buckets::Single { key }, _) => BucketChoice::Key(key),
            (Buckets::Keyed { slots, .. }, Some(hash)) => {
                BucketChoice::Key(slots.key(slots.slot_of(hash), buffer))
            }
            (Buckets::Keyed { missing, .. }, None) => match missing {
                MissingKey::Skip => BucketChoice::Exempt,
                MissingKey::Shared { key } => BucketChoice::Key(key),
            },
        }
    }

    /// Every key this policy can ever touch, for creating them at configure time.
    pub fn all_keys(
        &self,
        mut each: impl FnMut(&str) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        match self {
            Buckets::Single { key } => each(key),
            Buckets::Keyed { slots, missing, .. } => {
                let mut buffer = KeyBuf::default();
                for slot in 0..slots.slots() {
                    each(slots.key(slot, &mut buffer))?;
                }
                match missing {
                    MissingKey::Shared { key } => each(key),
                    MissingKey::Skip => Ok(()),
                }
            }
        }
    }
}

/// The outcome of taking a token from one bucket in shared data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    Allowed {
        remaining: u32,
        full_in: Duration,
    },
    /// This request's token and `tokens - 1` more, for the worker to admit locally. `base` is the
    /// arrival time the bucket held (as this limit reads it) before the lease: the lease's tokens
    /// are the `tokens` intervals after it.
    Leased {
        tokens: u32,
        base: u64,
        remaining: u32,
        full_in: Duration,
    },
    Limited {
        retry_in: Duration,
        full_in: Duration,
    },
    /// No decision could be made; the failure mode applies.
    Failed(AcquireFailure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireFailure {
    CasExhausted,
    Store(StoreError),
}

/// Takes one token from the bucket at `key`: one read and one conditional write when uncontended.
/// Also returns how many CAS races were lost on the way.
pub fn acquire<S: SharedStore + ?Sized>(
    gcra: &Gcra,
    store: &S,
    key: &str,
    now: u64,
) -> (Acquired, u32) {
    acquire_leasing(gcra, store, key, now, 0, 1)
}

/// [`acquire`], for a worker that may lease: in the same CAS it first gives back `returning`
/// nanoseconds of arrival time (what an ended lease left unspent, see [`give_back_lease`]), then
/// takes one token, or a lease of up to `wants` tokens when the bucket is ample
/// ([`lease_size`]). With `returning` 0 and a bucket too small to lease, this is exactly
/// [`acquire`]: the same decision on the same record, one read and at most one write.
///
/// The return lands exactly when the CAS does (a stored bucket is always written then), so on any
/// result but [`Acquired::Failed`] the caller's old lease is settled.
pub fn acquire_leasing<S: SharedStore + ?Sized>(
    gcra: &Gcra,
    store: &S,
    key: &str,
    now: u64,
    returning: u64,
    wants: u32,
) -> (Acquired, u32) {
    let outcome = cas::update(store, key, MAX_CAS_ATTEMPTS, |record: Option<Tat>| {
        let read = gcra.arrival(record, now);
        // What an ended lease left unspent goes back only into a bucket still in the terms it was
        // taken in: after a reload it is dropped, which is stricter, never looser.
        let in_our_terms = record.is_some_and(|record| record.terms == gcra.base);
        let stored = match read {
            Some(tat) if returning > 0 && in_our_terms => Some(returned(tat, returning, now)),
            other => other,
        };
        // A record in other terms is written back in ours, whatever the decision.
        let written_as_read = |at: u64| Some(at) == read && in_our_terms;
        let tokens = lease_size(gcra.available(stored, now), wants);
        if tokens > 1 {
            // `tokens` is at most what the bucket holds, so the new time stays within the
            // tolerance: the lease takes only what a run of single admissions could.
            let base = gcra.clamp(stored, now);
            let new_tat = base.saturating_add(gcra.span(tokens));
            let (remaining, full_in) = match gcra.decide(stored, now) {
                GcraDecision::Allow {
                    remaining, full_in, ..
                } => (remaining, full_in),
                // Unreachable with two tokens or more available; reported as an empty bucket.
                GcraDecision::Deny { full_in, .. } => (0, full_in),
            };
            let leased = Acquired::Leased {
                tokens,
                base,
                remaining,
                full_in,
            };
            return Step::Write(gcra.record(new_tat), leased);
        }
        match gcra.decide(stored, now) {
            GcraDecision::Allow {
                new_tat,
                remaining,
                full_in,
            } => Step::Write(
                gcra.record(new_tat),
                Acquired::Allowed { remaining, full_in },
            ),
            GcraDecision::Deny { retry_in, full_in } => {
                let limited = Acquired::Limited { retry_in, full_in };
                // A time clamped on reading (the clock stepped back) is written back, so the
                // bucket refills from there rather than from a point that moves with now; so are
                // a returned lease and a record converted from other terms. A time that another
                // worker's later reading explains is left as it is.
                match gcra.clamp(stored, now) {
                    clamped if !written_as_read(clamped) => {
                        Step::Write(gcra.record(clamped), limited)
                    }
                    _ => Step::Keep(limited),
                }
            }
        }
    });
    match outcome {
        Ok(updated) => (updated.value, updated.attempts - 1),
        Err(UpdateError::Exhausted { attempts }) => {
            (Acquired::Failed(AcquireFailure::CasExhausted), attempts)
        }
        // The attempts before a store failure are not reported; the failure itself is counted.
        Err(UpdateError::Store(error)) => (Acquired::Failed(AcquireFailure::Store(error)), 0),
    }
}

/// The arrival time after `span` nanoseconds of leased, unspent tokens go back: never below `now`,
/// a full bucket, so a lease that outlived a refill cannot overfill the bucket.
fn returned(tat: u64, span: u64, now: u64) -> u64 {
    tat.saturating_sub(span).max(now)
}

/// Gives back `span` nanoseconds of arrival time, what a lease left unspent (its unspent tokens
/// times the interval of the limit it was taken under, so a lease taken under another scale
/// returns exactly what it took). Returns the CAS races lost. A bucket that is already full, or
/// that is no longer stored, has nothing to take back.
///
/// Only into a bucket still in the terms of `gcra`, the limit the lease was taken under: a bucket
/// a reload has since converted keeps what it holds (stricter, never looser).
pub fn give_back_lease<S: SharedStore + ?Sized>(
    gcra: &Gcra,
    store: &S,
    key: &str,
    now: u64,
    span: u64,
) -> Result<u32, UpdateError> {
    cas::update(
        store,
        key,
        MAX_CAS_ATTEMPTS,
        |record: Option<Tat>| match record {
            Some(Tat { at, terms }) if span > 0 && at > now && terms == gcra.base => {
                Step::Write(gcra.record(returned(at, span, now)), ())
            }
            _ => Step::Keep(()),
        },
    )
    .map(|updated| updated.attempts - 1)
}

/// Gives back a token taken by [`acquire`] for a request that another limit then refused.
pub fn refund<S: SharedStore + ?Sized>(
    gcra: &Gcra,
    store: &S,
    key: &str,
) -> Result<(), UpdateError> {
    // A bucket a reload converted meanwhile keeps its token: stricter, never looser.
    cas::update(
        store,
        key,
        MAX_CAS_ATTEMPTS,
        |record: Option<Tat>| match record {
            Some(Tat { at, terms }) if terms == gcra.base => {
                Step::Write(gcra.record(gcra.refund(at)), ())
            }
            _ => Step::Keep(()),
        },
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const MS: u64 = 1_000_000;
    const SECOND: u64 = 1_000_000_000;

    fn allowed(decision: GcraDecision) -> Option<u64> {
        match decision {
            GcraDecision::Allow { new_tat, .. } => Some(new_tat),
            GcraDecision::Deny { .. } => None,
        }
    }

    #[test]
    fn a_fresh_bucket_admits_its_burst_at_once_then_one_per_interval() {
        let gcra = Gcra::new(Duration::from_millis(10), 10);
        let now = 1_000 * SECOND;
        let mut tat = None;
        for n in 0..10 {
            let decision = gcra.decide(tat, now);
            let GcraDecision::Allow {
                new_tat, remaining, ..
            } = decision
            else {
                unreachable!("request {n} of the burst was refused")
            };
            assert_eq!(remaining, 9 - n);
            tat = Some(new_tat);
        }
        let GcraDecision::Deny { retry_in, full_in } = gcra.decide(tat, now) else {
            unreachable!("the burst is spent")
        };
        assert_eq!(retry_in, Duration::from_millis(10));
        assert_eq!(full_in, Duration::from_millis(100));
        assert!(allowed(gcra.decide(tat, now + 10 * MS - 1)).is_none());
        assert!(allowed(gcra.decide(tat, now + 10 * MS)).is_some());
    }

    #[test]
    fn a_refund_restores_exactly_one_token() {
        let gcra = Gcra::new(Duration::from_secs(1), 2);
        let now = 50 * SECOND;
        let one = allowed(gcra.decide(None, now)).unwrap();
        let two = allowed(gcra.decide(Some(one), now)).unwrap();
        assert!(allowed(gcra.decide(Some(two), now)).is_none());
        let refunded = gcra.refund(two);
        assert_eq!(refunded, one);
        assert!(allowed(gcra.decide(Some(refunded), now)).is_some());
    }

    #[test]
    fn a_clock_that_steps_back_does_not_mint_tokens() {
        let gcra = Gcra::new(Duration::from_secs(1), 1);
        let tat = allowed(gcra.decide(None, 100 * SECOND)).unwrap();
        assert!(allowed(gcra.decide(Some(tat), 99 * SECOND)).is_none());
    }

    #[test]
    fn extreme_rates_saturate_instead_of_overflowing() {
        let gcra = Gcra::new(Duration::from_secs(3600), u32::MAX);
        assert!(allowed(gcra.decide(Some(u64::MAX - 1), u64::MAX - 1)).is_some());
        let gcra = Gcra::new(Duration::ZERO, 1);
        assert!(allowed(gcra.decide(None, 0)).is_some());
    }

    #[test]
    fn keyed_buckets_hash_into_their_table() {
        let buckets = Buckets::Keyed {
            slots: SlotTable::new("sw:p:rl:u:", 4).unwrap(),
            seed: 1,
            missing: MissingKey::Skip,
        };
        let mut buffer = KeyBuf::default();
        let BucketChoice::Key(key) = buckets.choose(Some(0xa11ce), &mut buffer) else {
            unreachable!("a keyed request has a bucket")
        };
        assert!(key.starts_with("sw:p:rl:u:"));
        assert_eq!(buckets.choose(None, &mut buffer), BucketChoice::Exempt);
        let mut all = Vec::new();
        buckets
            .all_keys(|key| {
                all.push(key.to_owned());
                Ok(())
            })
            .unwrap();
        assert_eq!(
            all,
            ["sw:p:rl:u:0", "sw:p:rl:u:1", "sw:p:rl:u:2", "sw:p:rl:u:3"]
        );
    }

    /// Admits through `acquire` on a fake store until refused; returns how many got in.
    fn drain(gcra: &Gcra, store: &crate::state::fake::FakeStore, now: u64) -> u64 {
        let mut admitted = 0;
        while matches!(
            acquire(gcra, store, "sw:p:rl:b", now).0,
            Acquired::Allowed { .. }
        ) {
            admitted += 1;
            assert!(admitted <= 1_000, "never refused");
        }
        admitted
    }

    #[test]
    fn a_reload_that_changes_the_limit_keeps_the_tokens_the_bucket_holds() {
        let store = crate::state::fake::FakeStore::new();
        let five_a_minute = Gcra::new(Duration::from_secs(12), 20);
        let now = 1_000 * SECOND;
        for _ in 0..13 {
            assert!(matches!(
                acquire(&five_a_minute, &store, "sw:p:rl:b", now).0,
                Acquired::Allowed { .. }
            ));
        }
        // 7 tokens left: a faster limit with a bigger burst sees 7, a smaller burst caps them.
        let six_a_minute = Gcra::new(Duration::from_secs(10), 40);
        assert_eq!(
            six_a_minute.available(six_a_minute.arrival(store_record(&store), now), now),
            7
        );
        let burst_of_five = Gcra::new(Duration::from_secs(10), 5);
        assert_eq!(
            burst_of_five.available(burst_of_five.arrival(store_record(&store), now), now),
            5
        );
        assert_eq!(drain(&six_a_minute, &store, now), 7);
    }

    fn store_record(store: &crate::state::fake::FakeStore) -> Option<Tat> {
        let mut record = None;
        let _ = cas::update(store, "sw:p:rl:b", 1, |read: Option<Tat>| {
            record = read;
            Step::Keep(())
        });
        record
    }

    #[test]
    fn alternating_between_two_limits_never_refills_a_bucket() {
        let store = crate::state::fake::FakeStore::new();
        let limits = [
            Gcra::new(Duration::from_secs(12), 20),
            Gcra::new(Duration::from_secs(10), 20),
        ];
        let start = 1_000 * SECOND;
        assert_eq!(drain(&limits[0], &store, start), 20);
        // A reload every second for a minute, each one read by a request: nothing comes back but
        // what the faster rate refills over the minute (6), and the bucket is read in each
        // limit's terms in turn.
        let mut admitted = 0;
        for second in 1..=60 {
            admitted += drain(
                &limits[second as usize % 2],
                &store,
                start + second * SECOND,
            );
        }
        assert!(admitted <= 6, "{admitted} admitted after the burst");
        assert!(admitted >= 4, "the slower rate still refills: {admitted}");
    }

    #[test]
    fn a_scaled_limit_reads_the_bucket_in_its_configured_terms() {
        let store = crate::state::fake::FakeStore::new();
        let configured = Gcra::new(Duration::from_secs(1), 10);
        let halved = configured.scaled(500_000);
        let now = 1_000 * SECOND;
        assert_eq!(drain(&halved, &store, now), 5);
        // No conversion between a limit and its scale: the configured one sees the same time.
        assert_eq!(
            store_record(&store).unwrap().terms,
            configured.record(0).terms
        );
        assert_eq!(drain(&configured, &store, now), 0);
    }

    #[test]
    fn a_lease_returned_after_a_reload_is_dropped_not_added() {
        let store = crate::state::fake::FakeStore::new();
        let before = Gcra::new(Duration::from_millis(10), 100);
        let after = Gcra::new(Duration::from_millis(20), 100);
        let now = 1_000 * SECOND;
        let (leased, _) = acquire_leasing(&before, &store, "sw:p:rl:b", now, 0, 6);
        let Acquired::Leased { tokens, .. } = leased else {
            unreachable!("an ample bucket leases: {leased:?}")
        };
        // The reload converts the bucket; the old lease's unspent tokens then stay out of it.
        assert_eq!(drain(&after, &store, now), 100 - u64::from(tokens));
        give_back_lease(&before, &store, "sw:p:rl:b", now, before.span(tokens)).unwrap();
        assert_eq!(drain(&after, &store, now), 0);
    }
}
