//! Retry budgets: Envoy's router does the retrying; seawall decides how many retries each request
//! may have, from a budget all workers share.
//!
//! A fixed `max_retries` multiplies load by `1 + max_retries` exactly when the upstream can least
//! take it: in a brown-out every request fails and every request retries. A budget (Finagle,
//! Linkerd, tower's `retry::budget`) caps retries at a share of the traffic instead: `ratio` of
//! the requests in a rolling window, plus a floor of `min_per_second` so that a quiet service can
//! still retry. Then a brown-out costs at most `1 + ratio` times the load, plus the floor.
//!
//! The budget is one record in shared data: a window of buckets counting requests and retries.
//! A worker changes it in one conditional write, an [`Exchange`], that brings what the worker
//! tallied locally (requests to deposit and unused retries to give back, each in the bucket it
//! belongs to), deposits and grants for one request, and, while the budget has ample room, leases
//! the worker an allowance of retries. Every retry is counted in the budget, in the bucket of the
//! moment it was granted, before any request can use it, so concurrent requests on all workers can
//! never be granted the same retries; and a deposit that is still only tallied on its worker can
//! only make the budget stricter (it earns nothing yet), never looser. When the response shows how
//! many attempts the router made (`x-envoy-attempt-count`), the unused part of the grant goes
//! back. Upstream push-back (`Retry-After` on a 503) stops all grants until that time, on every
//! worker.
//!
//! The engine (`engine/retries.rs`) owns the worker-local side: the tallies, the allowance, and
//! the rules for when a request may be decided without shared data.

use core::time::Duration;

use crate::clock;
use crate::state::cas::{self, Record, Step, UpdateError};
use crate::state::fields;
use crate::state::window::{Counts, Window};
use crate::state::SharedStore;

/// Response headers, read one at a time from the host.
pub trait ResponseHeaders {
    /// A response header's value: borrowed from headers read once for the whole response, or a
    /// buffer of its own read for this one.
    fn header(&mut self, name: &str) -> Option<std::borrow::Cow<'_, [u8]>>;
}

pub use crate::state::window::BUCKETS as WINDOW_BUCKETS;

/// How many lost CAS races one decision tolerates; then the request gets no retries (the budget
/// fails closed: a missed retry is safer than a retry storm).
pub const MAX_CAS_ATTEMPTS: u32 = 32;

/// The longest push-back honoured: a `Retry-After` beyond it is cut to it.
pub const MAX_PUSH_BACK: Duration = Duration::from_secs(60);

fn nanos(span: Duration) -> u64 {
    u64::try_from(span.as_nanos()).unwrap_or(u64::MAX)
}

/// Requests and retries in one bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub requests: u32,
    pub retries: u32,
}

impl Counts for Tally {
    const LEN: usize = 8;
    const ZERO: Self = Tally {
        requests: 0,
        retries: 0,
    };

    fn merge(&mut self, other: &Self) {
        self.requests = self.requests.saturating_add(other.requests);
        self.retries = self.retries.saturating_add(other.retries);
    }

    fn write(&self, out: &mut [u8]) {
        fields::put(out, 0, self.requests);
        fields::put(out, 4, self.retries);
    }

    fn read(bytes: &[u8]) -> Self {
        Tally {
            requests: fields::get(bytes, 0),
            retries: fields::get(bytes, 4),
        }
    }
}

/// A budget's record: the window and the time until which the upstream asked for no retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetState {
    /// No retries before this time (nanoseconds since the epoch); 0 when none was asked for.
    pub pushed_back_until: u64,
    pub window: Window<Tally>,
}

pub const RECORD_LEN: usize = 8 + Window::<Tally>::LEN;

impl BudgetState {
    pub const fn empty() -> Self {
        BudgetState {
            pushed_back_until: 0,
            window: Window::EMPTY,
        }
    }
}

impl Record<RECORD_LEN> for BudgetState {
    /// Layout: retry budget, stamped buckets.
    const LAYOUT: u8 = 0x22;
    fn encode(&self) -> [u8; RECORD_LEN] {
        let mut out = [0u8; RECORD_LEN];
        fields::put(&mut out, 0, self.pushed_back_until);
        self.window.write(&mut out[8..]);
        out
    }

    fn decode(bytes: &[u8; RECORD_LEN]) -> Self {
        BudgetState {
            pushed_back_until: fields::get(bytes, 0),
            window: Window::read(&bytes[8..]),
        }
    }
}

/// A budget's compiled terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Retries allowed per request, in parts per million (20% is 200,000).
    pub ratio_ppm: u32,
    /// Retries allowed per window whatever the traffic: `min_per_second` times the window.
    pub floor: u32,
    /// Nanoseconds per bucket: the window divided by [`WINDOW_BUCKETS`].
    pub bucket_nanos: u64,
}

impl Budget {
    /// The number of the window bucket that counts `now` (nanoseconds).
    pub fn epoch(&self, now: u64) -> u64 {
        now / self.bucket_nanos.max(1)
    }

    /// Retries still allowed in a window holding `totals`.
    ///
    /// Never more than the window can still count: the counters saturate, so a window whose
    /// retries already add up to `u32::MAX` (only a corrupt or foreign record gets there) would
    /// not count another grant, and granting from it would never lower what remains.
    pub fn remaining(&self, totals: &Tally) -> u32 {
        let earned = u64::from(totals.requests) * u64::from(self.ratio_ppm) / 1_000_000;
        let allowance = earned.saturating_add(u64::from(self.floor));
        let left = allowance.saturating_sub(u64::from(totals.retries));
        let countable = u32::MAX - totals.retries;
        u32::try_from(left).unwrap_or(u32::MAX).min(countable)
    }
}

/// Why a request got fewer retries than it wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// `retries` were taken from the budget (possibly fewer than asked: `short` says so).
    Granted { retries: u32, short: bool },
    /// The upstream asked for no retries until later.
    PushedBack,
}

/// A worker leases an allowance of this many requests' worth of retries (`max_retries` each).
pub const LEASE_REQUESTS: u32 = 8;

/// A lease is taken only while the budget keeps at least this many times the lease for everyone
/// else after it: near empty, every grant is decided on the shared record, as exactly as before.
pub const LEASE_SHARE: u32 = 4;

/// One conditional write of one worker to a budget: what it brings, and what it asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    /// What the worker tallied since its last write, by bucket: `requests` to deposit, and
    /// `retries` leased or granted earlier and not used, to give back. Buckets that have left the
    /// window (or lie ahead of it, after a clock step back) are dropped: they count for nothing.
    pub pending: Window<Tally>,
    /// Deposits this request.
    pub deposit: bool,
    /// Retries this request wants (0 asks for no grant).
    pub wanted: u32,
    /// Retries to lease to the worker's allowance if the budget has ample room (0: no lease).
    pub lease: u32,
    /// Unused retries of one grant, given back to the bucket of `refund_at` (nanoseconds), if that
    /// bucket still counts.
    pub refund: u32,
    pub refund_at: u64,
    /// Push-back the upstream asked for, until then (nanoseconds).
    pub push_back: Option<u64>,
}

impl Exchange {
    /// A write that brings and asks for nothing.
    pub const NOTHING: Exchange = Exchange {
        pending: Window::EMPTY,
        deposit: false,
        wanted: 0,
        lease: 0,
        refund: 0,
        refund_at: 0,
        push_back: None,
    };

    /// Applies the exchange to the record read at `now`: the pure decision of [`exchange`].
    pub fn apply(&self, budget: &Budget, state: &mut BudgetState, now: u64) -> Exchanged {
        let epoch = budget.epoch(now);
        let mut pending = self.pending;
        for number in epoch.saturating_sub(WINDOW_BUCKETS as u64 - 1)..=epoch {
            let Some(tally) = pending.counted(number) else {
                continue;
            };
            if tally.requests > 0 {
                let bucket = state.window.current(number);
                bucket.requests = bucket.requests.saturating_add(tally.requests);
            }
            // A bucket that was reused since the retries were counted in it no longer holds them.
            if let Some(bucket) = state.window.counted(number) {
                bucket.retries -= tally.retries.min(bucket.retries);
            }
        }
        if self.deposit {
            let newest = state.window.current(epoch);
            newest.requests = newest.requests.saturating_add(1);
        }
        if self.refund > 0 {
            if let Some(bucket) = state.window.counted(budget.epoch(self.refund_at)) {
                bucket.retries -= self.refund.min(bucket.retries);
            }
        }
        if let Some(until) = self.push_back {
            state.pushed_back_until = state.pushed_back_until.max(until);
        }
        // Push-back never lasts longer than `MAX_PUSH_BACK` from now: a time further ahead than
        // another worker's later reading explains was written under a clock that has stepped
        // back since, and is written back clamped, so it ends rather than moving with now.
        let latest = now.saturating_add(nanos(MAX_PUSH_BACK));
        if clock::stepped_back(state.pushed_back_until, latest) {
            state.pushed_back_until = latest;
        }
        let pushed_back_until = state.pushed_back_until;
        if now < pushed_back_until {
            return Exchanged {
                grant: Grant::PushedBack,
                leased: 0,
                pushed_back_until,
            };
        }
        let remaining = budget.remaining(&state.window.totals(epoch));
        let retries = self.wanted.min(remaining);
        let left = remaining - retries;
        let leased = if self.lease > 0 && left / LEASE_SHARE >= self.lease {
            self.lease
        } else {
            0
        };
        let newest = state.window.current(epoch);
        newest.retries = newest.retries.saturating_add(retries + leased);
        Exchanged {
            grant: Grant::Granted {
                retries,
                short: retries < self.wanted,
            },
            leased,
            pushed_back_until,
        }
    }
}

/// What an [`Exchange`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchanged {
    /// The request's grant (for a write without one, a grant of 0 or the push-back).
    pub grant: Grant,
    /// Retries leased to the worker's allowance, counted in the budget's bucket of now.
    pub leased: u32,
    /// The push-back in the record (0 or a past time when there is none).
    pub pushed_back_until: u64,
}

/// Makes `exchange` on the budget at `key` in one read and one conditional write (more only when
/// other workers win races). Returns what it got and the races lost; on an error nothing of the
/// exchange landed, and the budget fails closed.
pub fn exchange<S: SharedStore + ?Sized>(
    budget: &Budget,
    store: &S,
    key: &str,
    ask: &Exchange,
    now: u64,
) -> (Result<Exchanged, UpdateError>, u32) {
    let result = cas::update(
        store,
        key,
        MAX_CAS_ATTEMPTS,
        |state: Option<BudgetState>| {
            let mut state = state.unwrap_or(BudgetState::empty());
            let got = ask.apply(budget, &mut state, now);
            Step::Write(state, got)
        },
    );
    match result {
        Ok(updated) => (Ok(updated.value), updated.attempts - 1),
        Err(error) => {
            let races = match error {
                UpdateError::Exhausted { attempts } => attempts,
                UpdateError::Store(_) => 0,
            };
            (Err(error), races)
        }
    }
}

/// Deposits one request and takes up to `wanted` retries for it, the exact path with nothing
/// tallied locally: one read and one conditional write. Returns the grant and the CAS races lost.
pub fn take<S: SharedStore + ?Sized>(
    budget: &Budget,
    store: &S,
    key: &str,
    wanted: u32,
    now: u64,
) -> (Result<Grant, UpdateError>, u32) {
    let ask = Exchange {
        deposit: true,
        wanted,
        ..Exchange::NOTHING
    };
    let (got, races) = exchange(budget, store, key, &ask, now);
    (got.map(|got| got.grant), races)
}

/// Settles a granted request: gives back the `unused` part of the grant it took at `granted_at`
/// (nanoseconds) to the bucket that grant went into, and records the upstream's push-back. A
/// grant whose bucket has left the window has nothing left to give back: its retries no longer
/// count against the budget anyway. One read and one conditional write, or nothing at all.
pub fn settle<S: SharedStore + ?Sized>(
    budget: &Budget,
    store: &S,
    key: &str,
    unused: u32,
    granted_at: u64,
    pushed_back_until: Option<u64>,
    now: u64,
) -> Result<u32, UpdateError> {
    if unused == 0 && pushed_back_until.is_none() {
        return Ok(0);
    }
    let ask = Exchange {
        refund: unused,
        refund_at: granted_at,
        push_back: pushed_back_until,
        ..Exchange::NOTHING
    };
    let (got, races) = exchange(budget, store, key, &ask, now);
    got.map(|_| races)
}

/// The retries a response shows the router made: `x-envoy-attempt-count` minus the first try.
pub fn retries_used(attempt_count: &[u8]) -> Option<u32> {
    let attempts = crate::policy::fault::parse_decimal(attempt_count)?;
    u32::try_from(attempts.saturating_sub(1)).ok()
}

/// `Retry-After` in seconds (the HTTP-date form is not honoured), capped at `cap`.
pub fn retry_after(value: &[u8], cap: Duration) -> Option<Duration> {
    let seconds = crate::policy::fault::parse_decimal(value)?;
    Some(Duration::from_secs(seconds).min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::cas::ensure;
    use crate::state::fake::FakeStore;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const SECOND: u64 = 1_000_000_000;

    fn budget() -> Budget {
        Budget {
            ratio_ppm: 200_000,
            floor: 10,
            bucket_nanos: SECOND,
        }
    }

    /// Fuzzing hardening (the `records` target's "never more retries than the budget holds"):
    /// a record whose retry counts add up past `u32::MAX` (corrupt, or foreign) saturated the
    /// window's total, so granting retries no longer lowered what remained, and every request
    /// was granted retries from the floor, without end.
    #[test]
    fn a_saturated_window_grants_no_more_than_it_holds() {
        let budget = Budget {
            ratio_ppm: 1_000_000,
            floor: 5,
            bucket_nanos: SECOND,
        };
        let now = 100 * SECOND;
        let epoch = budget.epoch(now);
        let mut state = BudgetState::empty();
        for number in epoch - 9..=epoch {
            *state.window.current(number) = Tally {
                requests: u32::MAX,
                retries: u32::MAX / 4,
            };
        }
        let held = budget.remaining(&state.window.totals(epoch));
        let ask = Exchange {
            wanted: 1,
            ..Exchange::NOTHING
        };
        let mut granted = 0u32;
        for _ in 0..100 {
            if let Grant::Granted { retries, .. } = ask.apply(&budget, &mut state, now).grant {
                granted += retries;
            }
        }
        assert!(granted <= held, "{granted} retries granted, {held} held");
    }

    /// Issue 14, point 11: a refund came out of the newest window bucket rather than the grant's.
    /// Grants of 5 at 0 s and 5 at 9 s, and a refund of the first at 9.5 s: at 10 s the budget
    /// granted 10 (the refund had emptied the 9 s bucket, and the 0 s one then expired) where it
    /// should grant 5.
    #[test]
    fn a_refund_goes_back_to_the_bucket_its_grant_came_from() {
        let store = FakeStore::new();
        let t0 = 1_800_000_000 * SECOND;
        let granted = |wanted, now| match take(&budget(), &store, "b", wanted, now).0 {
            Ok(Grant::Granted { retries, .. }) => retries,
            other => panic!("{other:?}"),
        };
        assert_eq!(granted(5, t0), 5);
        assert_eq!(granted(5, t0 + 9 * SECOND), 5);
        settle(
            &budget(),
            &store,
            "b",
            5,
            t0,
            None,
            t0 + 9 * SECOND + SECOND / 2,
        )
        .unwrap();
        // At 10 s the 0 s bucket leaves the window; the 9 s grant still counts.
        assert_eq!(granted(10, t0 + 10 * SECOND), 5);
    }

    #[test]
    fn records_round_trip() {
        let mut state = BudgetState::empty();
        state.pushed_back_until = u64::MAX - 1;
        state.window.add(
            99,
            &Tally {
                requests: 7,
                retries: 3,
            },
        );
        assert_eq!(BudgetState::decode(&state.encode()), state);
    }

    #[test]
    fn the_allowance_is_the_ratio_plus_the_floor() {
        let budget = budget();
        let totals = |requests, retries| Tally { requests, retries };
        assert_eq!(budget.remaining(&totals(0, 0)), 10);
        assert_eq!(budget.remaining(&totals(100, 0)), 30);
        assert_eq!(budget.remaining(&totals(100, 25)), 5);
        assert_eq!(budget.remaining(&totals(100, 40)), 0);
        assert_eq!(
            budget.remaining(&totals(4, 0)),
            10,
            "0.8 earned rounds down"
        );
    }

    #[test]
    fn grants_come_out_of_the_budget_and_unused_ones_go_back() {
        let store = FakeStore::new();
        ensure(&store, "b", &BudgetState::empty()).unwrap();
        let now = 1_000 * SECOND;
        let mut granted = 0;
        for _ in 0..10 {
            if let (Ok(Grant::Granted { retries, .. }), _) = take(&budget(), &store, "b", 3, now) {
                granted += retries;
            }
        }
        // 10 requests earn 2 retries, plus the floor of 10.
        assert_eq!(granted, 12);
        assert_eq!(
            take(&budget(), &store, "b", 3, now).0,
            Ok(Grant::Granted {
                retries: 0,
                short: true
            })
        );
        settle(&budget(), &store, "b", 3, now, None, now).unwrap();
        assert_eq!(
            take(&budget(), &store, "b", 3, now).0,
            Ok(Grant::Granted {
                retries: 3,
                short: false
            })
        );
        // Ten seconds later the window has forgotten it all.
        assert_eq!(
            take(&budget(), &store, "b", 3, now + 10 * SECOND).0,
            Ok(Grant::Granted {
                retries: 3,
                short: false
            })
        );
    }

    #[test]
    fn push_back_stops_grants_until_it_expires() {
        let store = FakeStore::new();
        ensure(&store, "b", &BudgetState::empty()).unwrap();
        let now = 1_000 * SECOND;
        settle(&budget(), &store, "b", 0, now, Some(now + 2 * SECOND), now).unwrap();
        assert_eq!(
            take(&budget(), &store, "b", 2, now).0,
            Ok(Grant::PushedBack)
        );
        assert!(matches!(
            take(&budget(), &store, "b", 2, now + 2 * SECOND).0,
            Ok(Grant::Granted { retries: 2, .. })
        ));
    }

    /// A lease is taken only while the budget keeps [`LEASE_SHARE`] times it for the others;
    /// near empty, the grant alone is taken, as exactly as before.
    #[test]
    fn leases_need_ample_room() {
        let budget = budget();
        let mut state = BudgetState::empty();
        let now = 1_000 * SECOND;
        state.window.add(
            budget.epoch(now),
            &Tally {
                requests: 300,
                retries: 0,
            },
        );
        // 60 earned plus the floor of 10: 70; after a grant of 2, 68 left, enough for 17 × 4.
        let ask = |lease| Exchange {
            deposit: true,
            wanted: 2,
            lease,
            ..Exchange::NOTHING
        };
        let got = ask(16).apply(&budget, &mut state.clone(), now);
        assert_eq!(got.leased, 16);
        let got = ask(18).apply(&budget, &mut state.clone(), now);
        assert_eq!(got.leased, 0, "68 left is less than 4 × 18");
        assert_eq!(
            got.grant,
            Grant::Granted {
                retries: 2,
                short: false
            }
        );
        let got = ask(16).apply(&budget, &mut state, now);
        assert_eq!(state.window.totals(budget.epoch(now)).retries, 18);
        assert_eq!(got.leased, 16);
    }

    /// Tallies land in the bucket they belong to, and those outside the window count for nothing.
    #[test]
    fn pending_tallies_go_to_their_own_buckets() {
        let budget = budget();
        let now = 1_000 * SECOND;
        let epoch = budget.epoch(now);
        let mut state = BudgetState::empty();
        state.window.add(
            epoch - 3,
            &Tally {
                requests: 1,
                retries: 5,
            },
        );
        let mut pending = Window::EMPTY;
        pending.add(
            epoch - 3,
            &Tally {
                requests: 4,
                retries: 7,
            },
        );
        pending.add(
            epoch - 1,
            &Tally {
                requests: 2,
                retries: 0,
            },
        );
        // Expired: the window ending at `epoch` no longer counts it.
        pending.add(
            epoch - 10,
            &Tally {
                requests: 9,
                retries: 0,
            },
        );
        let ask = Exchange {
            pending,
            ..Exchange::NOTHING
        };
        let got = ask.apply(&budget, &mut state, now);
        assert_eq!(got.leased, 0);
        let mut window = state.window;
        assert_eq!(
            window.counted(epoch - 3).copied(),
            Some(Tally {
                requests: 5,
                retries: 0
            }),
            "a give-back never takes a bucket below zero"
        );
        assert_eq!(window.counted(epoch - 1).map(|b| b.requests), Some(2));
        assert_eq!(window.counted(epoch - 10), None);
        assert_eq!(window.totals(epoch).requests, 7);
    }

    #[test]
    fn header_values_parse() {
        assert_eq!(retries_used(b"3"), Some(2));
        assert_eq!(retries_used(b"1"), Some(0));
        assert_eq!(retries_used(b"x"), None);
        assert_eq!(
            retry_after(b"120", Duration::from_secs(60)),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT", Duration::MAX),
            None
        );
    }
}
