//! Circuit breakers that open on failure rate, slow-call rate or consecutive failures, fail fast
//! while open, and probe their way back through half-open, with one state for all workers.
//!
//! A breaker's whole state is one fixed-size record in shared data ([`BreakerState`]): which key
//! owns it, the circuit ([`Circuit`], an enum that carries each state's data), how many times in a
//! row it tripped (for the back-off of the open period) and a generation number that changes on
//! every transition, so a probe's outcome is only ever applied to the half-open episode that
//! admitted it. Closed circuits keep a rolling window of [`WINDOW_BUCKETS`] buckets, each counting
//! requests, failures and slow calls, so rates are computed without a timer or per-window keys.
//!
//! The request path reads the record once: closed passes, open rejects with the time left, and
//! only the request that turns open into half-open, or takes a probe slot, writes. Outcomes are
//! recorded when the stream ends, with one read and one conditional write. Everything here is a
//! pure function of the record, the time and the outcome; the bounded CAS loop of
//! [`crate::state::cas`] applies it.
//!
//! A closed record that nothing can trip soon is *quiet* ([`Breaker::is_quiet`]): no failure run,
//! and no failure (or slow call) in the window that a rate rule judges. A success admitted on a
//! quiet record changes no decision by itself, so its worker may tally it ([`Pending`]) and add
//! it later, in one write with others ([`Breaker::settle`]), instead of writing at once. Tallied
//! successes are added to the window only: they never break a failure run, because their worker
//! cannot tell whether they came before or after another worker's failures; a success that is
//! known to come after a failure (its admission saw one) is recorded at once and breaks the run.
//! Added in a batch, they are judged as if each had landed on its own (see
//! [`Breaker::settle`]), so batching never hides a rate trip that one of them would have caused.

use core::time::Duration;

use crate::clock;
use crate::state::cas::{self, Record, Step, UpdateError};
use crate::state::fields;
use crate::state::slots::{KeyBuf, SlotTable};
use crate::state::window::{self, Counts};
use crate::state::SharedStore;

pub use crate::state::window::BUCKETS as WINDOW_BUCKETS;

/// How many slots a hashed key may try before it gives up: a key whose slot another key holds
/// moves on to the next one, so two clusters never share a breaker unless the table is full.
pub const PROBE_LIMIT: u32 = 4;

/// The fingerprint of the table's overflow record, one past its last slot: the keys whose
/// `PROBE_LIMIT` slots are all held by other active keys share it, so a full table (or a client
/// that fills it on purpose) never leaves a key without a breaker. Key fingerprints are at least 2.
pub const OVERFLOW_OWNER: u64 = 1;

/// How many lost CAS races one decision tolerates; then the breaker fails open (admits, untracked).
pub const MAX_CAS_ATTEMPTS: u32 = 32;

/// What a rejected request is told to wait while the breaker is half-open and its probes are out.
pub const HALF_OPEN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Requests, failures and slow calls in one bucket of the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub requests: u32,
    pub failures: u32,
    pub slow: u32,
}

impl Counts for Tally {
    const LEN: usize = 12;
    const ZERO: Self = Tally {
        requests: 0,
        failures: 0,
        slow: 0,
    };

    fn merge(&mut self, other: &Self) {
        self.requests = self.requests.saturating_add(other.requests);
        self.failures = self.failures.saturating_add(other.failures);
        self.slow = self.slow.saturating_add(other.slow);
    }

    fn write(&self, out: &mut [u8]) {
        fields::put(out, 0, self.requests);
        fields::put(out, 4, self.failures);
        fields::put(out, 8, self.slow);
    }

    fn read(bytes: &[u8]) -> Self {
        Tally {
            requests: fields::get(bytes, 0),
            failures: fields::get(bytes, 4),
            slow: fields::get(bytes, 8),
        }
    }
}

/// The rolling window of a closed circuit.
pub type Window = window::Window<Tally>;

/// The three states, each with what it needs.
// Unboxed on purpose: a record is decoded onto the stack per decision, and a box would put a
// heap allocation on the request path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    /// Requests flow and their outcomes are counted.
    Closed {
        /// When it last closed (or was created): trips long after a close start the back-off over.
        since: u64,
        consecutive_failures: u32,
        window: Window,
    },
    /// Requests are refused until `until`.
    Open { until: u64 },
    /// Up to `half_open_probes` requests at once test the upstream.
    HalfOpen {
        /// When the last probe was admitted (the episode's start, at first): probes count as
        /// lost only once none has been admitted for the probe deadline.
        since: u64,
        in_flight: u16,
        successes: u16,
    },
}

/// One breaker's record in shared data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerState {
    /// Fingerprint of the key that holds this record; 0 when none does yet.
    pub owner: u64,
    /// Changes on every transition, so stale probe outcomes are recognised.
    pub generation: u32,
    /// Trips in a row without a lasting close; the open period doubles with each.
    pub trips: u8,
    pub circuit: Circuit,
}

impl BreakerState {
    pub const fn fresh() -> Self {
        BreakerState {
            owner: 0,
            generation: 0,
            trips: 0,
            circuit: Circuit::Closed {
                since: 0,
                consecutive_failures: 0,
                window: Window::EMPTY,
            },
        }
    }
}

/// The record's size in shared data.
pub const RECORD_LEN: usize = 32 + Window::LEN;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

impl Record<RECORD_LEN> for BreakerState {
    /// Layout: breaker, stamped buckets.
    const LAYOUT: u8 = 0x12;
    fn encode(&self) -> [u8; RECORD_LEN] {
        let mut out = [0u8; RECORD_LEN];
        out[1] = self.trips;
        fields::put(&mut out, 12, self.generation);
        fields::put(&mut out, 16, self.owner);
        match self.circuit {
            Circuit::Closed {
                since,
                consecutive_failures,
                window,
            } => {
                out[0] = CLOSED;
                fields::put(&mut out, 8, consecutive_failures);
                fields::put(&mut out, 24, since);
                window.write(&mut out[32..]);
            }
            Circuit::Open { until } => {
                out[0] = OPEN;
                fields::put(&mut out, 24, until);
            }
            Circuit::HalfOpen {
                since,
                in_flight,
                successes,
            } => {
                out[0] = HALF_OPEN;
                fields::put(&mut out, 2, in_flight);
                fields::put(&mut out, 4, successes);
                fields::put(&mut out, 24, since);
            }
        }
        out
    }

    /// An unknown state tag reads as a fresh closed circuit: a foreign value never wedges a breaker.
    fn decode(bytes: &[u8; RECORD_LEN]) -> Self {
        let circuit = match bytes[0] {
            OPEN => Circuit::Open {
                until: fields::get(bytes, 24),
            },
            HALF_OPEN => Circuit::HalfOpen {
                since: fields::get(bytes, 24),
                in_flight: fields::get(bytes, 2),
                successes: fields::get(bytes, 4),
            },
            _ => Circuit::Closed {
                since: fields::get(bytes, 24),
                consecutive_failures: fields::get(bytes, 8),
                window: Window::read(&bytes[32..]),
            },
        };
        BreakerState {
            owner: fields::get(bytes, 16),
            generation: fields::get(bytes, 12),
            trips: bytes[1],
            circuit,
        }
    }
}

/// When a closed breaker opens. At least one rule is set (the config checks it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TripRules {
    pub consecutive_failures: Option<u32>,
    /// Failure share of the window, in parts per million.
    pub failure_rate_ppm: Option<u32>,
    /// Slow-call share of the window, in parts per million.
    pub slow_call_rate_ppm: Option<u32>,
    /// The rates are judged only once the window holds this many requests.
    pub min_requests: u32,
    /// Nanoseconds per bucket: the window divided by [`WINDOW_BUCKETS`].
    pub bucket_nanos: u64,
}

/// A breaker's compiled thresholds and timings: the pure state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breaker {
    pub rules: TripRules,
    pub open_for: Duration,
    pub max_open_for: Duration,
    pub half_open_probes: u16,
}

/// What the request path decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: the request goes through and its outcome is counted, while the record is still
    /// at `generation`.
    Pass { generation: u32 },
    /// Half-open: the request is one of the probes of episode `generation`.
    Probe { generation: u32 },
    /// Open, or half-open with every probe slot taken.
    Reject {
        retry_after: Duration,
        half_open: bool,
    },
}

/// A change of state, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Closed to open: a rule tripped.
    Opened,
    /// Open to half-open: the open period ended and a request became the first probe.
    HalfOpened,
    /// Half-open to open: a probe failed.
    Reopened,
    /// Half-open to closed: every probe succeeded.
    Closed,
    /// Half-open to half-open: probes went missing (their workers never reported) and probing
    /// started over.
    ProbesRestarted,
}

/// How a finished call went, as the breaker counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered (or failed to): `failed` by the policy's classification, `slow` when
    /// the answer took longer than `slow_call`.
    Completed { failed: bool, slow: bool },
    /// The stream ended with nothing that says anything about the upstream, e.g. the client left.
    Abandoned,
}

/// A request's part in the breaker, carried from its admission to its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Admitted while closed at `generation`: its outcome counts only while the record is still
    /// there, so a call admitted before a trip cannot land in the window of a later close.
    Counted {
        generation: u32,
    },
    Probe {
        generation: u32,
    },
}

/// What the state machine wants done with the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub state: BreakerState,
    pub transition: Option<Transition>,
}

/// Successes one worker counted on its own for one record: all admitted on a quiet record at
/// `generation`, all finished in window bucket `bucket`, none written to shared data yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub generation: u32,
    pub bucket: u64,
    pub successes: u32,
}

/// What settling did to a record, beyond the change itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub change: Option<Change>,
    /// Tallied successes added to the window (0 when the record moved on and they were dropped).
    pub tallied: u32,
}

impl Breaker {
    fn epoch(&self, now: u64) -> u64 {
        now / self.rules.bucket_nanos.max(1)
    }

    /// The window bucket an outcome at `now` counts in.
    pub fn bucket_of(&self, now: u64) -> u64 {
        self.epoch(now)
    }

    /// Whether a success admitted on `state` may be tallied by its worker: closed, no failure run
    /// to break, and nothing in the window for a missing success to change the judgement of: no
    /// failure when a failure rate is a rule, no slow call when a slow-call rate is.
    ///
    /// The window check keeps the rates exact once an episode of failures has begun: every
    /// worker's next admission sees the failure and records its successes at once. Only the
    /// successes tallied before that are late, by at most one tick.
    pub fn is_quiet(&self, state: &BreakerState, now: u64) -> bool {
        let Circuit::Closed {
            consecutive_failures: 0,
            window,
            ..
        } = state.circuit
        else {
            return false;
        };
        let totals = window.totals(self.epoch(now));
        let rules = &self.rules;
        let judged_failures = rules.failure_rate_ppm.is_some() && totals.failures > 0;
        let judged_slow = rules.slow_call_rate_ppm.is_some() && totals.slow > 0;
        !(judged_failures || judged_slow)
    }

    /// Whether a closed record's window counts nothing now, which makes it free for another key
    /// (see `is_free_for`). A success on such a record is recorded at once rather than tallied, so
    /// a key with traffic never looks idle for longer than one tick after a call that outlasted
    /// the window.
    pub fn is_idle(&self, state: &BreakerState, now: u64) -> bool {
        match state.circuit {
            Circuit::Closed { window, .. } => window.is_empty_at(self.epoch(now)),
            Circuit::Open { .. } | Circuit::HalfOpen { .. } => false,
        }
    }

    /// Applies what one worker has to say about a record in one write: first its tallied
    /// successes (`pending`, which came before anything else it reports), then a call's outcome.
    ///
    /// Tallied successes count only in the closed spell they were admitted in (`generation`) and
    /// while their bucket is in the window; otherwise they are dropped, as their outcomes would
    /// have been stale or expired. They are judged as if each had been recorded alone: failures
    /// stay as they are while the requests grow one by one, so the failure and slow-call shares
    /// are highest at the first success that meets `min_requests`, and the rates trip on the batch
    /// exactly when they would have tripped on one of its successes. A trip makes `outcome` stale,
    /// as it would have been after a trip by another call.
    pub fn settle(
        &self,
        state: &BreakerState,
        outcome: Option<(Role, Outcome)>,
        pending: Option<Pending>,
        now: u64,
    ) -> Settled {
        let mut current = *state;
        let mut change = None;
        let mut tallied = 0;
        if let Some(added) = pending.and_then(|pending| self.add_pending(state, pending, now)) {
            tallied = added.1;
            current = added.0.state;
            let tripped = added.0.transition.is_some();
            change = Some(added.0);
            if tripped {
                return Settled { change, tallied };
            }
        }
        if let Some((role, outcome)) = outcome {
            if let Some(recorded) = self.record(&current, role, outcome, now) {
                change = Some(recorded);
            }
        }
        Settled { change, tallied }
    }

    fn add_pending(
        &self,
        state: &BreakerState,
        pending: Pending,
        now: u64,
    ) -> Option<(Change, u32)> {
        let Circuit::Closed {
            since,
            consecutive_failures,
            mut window,
        } = state.circuit
        else {
            return None;
        };
        let epoch = self.epoch(now);
        if pending.generation != state.generation
            || pending.successes == 0
            || epoch.saturating_sub(pending.bucket) >= WINDOW_BUCKETS as u64
        {
            return None;
        }
        let before = window.totals(epoch);
        window.add(
            pending.bucket,
            &Tally {
                requests: pending.successes,
                failures: 0,
                slow: 0,
            },
        );
        // A bucket ahead of `now` (the clock stepped back since) is out of the totals, as the
        // successes would have been had they been recorded one by one.
        if pending.bucket <= epoch {
            let last = before.requests.saturating_add(pending.successes);
            let judged = Tally {
                requests: before
                    .requests
                    .saturating_add(1)
                    .max(self.rules.min_requests)
                    .min(last),
                ..before
            };
            if self.trips_on_rates(&judged) {
                return Some((self.open(state, now, Transition::Opened), pending.successes));
            }
        }
        let next = BreakerState {
            circuit: Circuit::Closed {
                since,
                consecutive_failures,
                window,
            },
            ..*state
        };
        Some((
            Change {
                state: next,
                transition: None,
            },
            pending.successes,
        ))
    }

    /// Decides for a request at `now`. Returns the admission and, when the record must change, the
    /// new record.
    pub fn admit(&self, state: &BreakerState, now: u64) -> (Admission, Option<Change>) {
        if let Some(clamped) = self.clamped(state, now) {
            // The record was written under another clock (stepped back since) or another config
            // (a shorter open period now): decide on what this one allows, and keep that.
            let (admission, change) = self.admit(&clamped, now);
            let change = change.or(Some(Change {
                state: clamped,
                transition: None,
            }));
            return (admission, change);
        }
        match state.circuit {
            Circuit::Closed { .. } => (
                Admission::Pass {
                    generation: state.generation,
                },
                None,
            ),
            Circuit::Open { until } if now < until => (
                Admission::Reject {
                    retry_after: Duration::from_nanos(until - now),
                    half_open: false,
                },
                None,
            ),
            Circuit::Open { .. } => self.start_probing(state, now, Transition::HalfOpened),
            Circuit::HalfOpen {
                since,
                in_flight,
                successes,
            } => {
                if in_flight < self.half_open_probes {
                    let generation = state.generation;
                    // The slot is taken now: were `since` left at the episode's start, an
                    // episode older than the deadline would restart as soon as its slots filled,
                    // and admit a second set of probes at the same instant.
                    let next = BreakerState {
                        circuit: Circuit::HalfOpen {
                            since: now,
                            in_flight: in_flight + 1,
                            successes,
                        },
                        ..*state
                    };
                    (
                        Admission::Probe { generation },
                        Some(Change {
                            state: next,
                            transition: None,
                        }),
                    )
                } else if now.saturating_sub(since) > nanos(self.probe_deadline()) {
                    self.start_probing(state, now, Transition::ProbesRestarted)
                } else {
                    (
                        Admission::Reject {
                            retry_after: HALF_OPEN_RETRY_AFTER,
                            half_open: true,
                        },
                        None,
                    )
                }
            }
        }
    }

    /// The record with its times brought within what this config and clock allow: an open period
    /// no longer than this config gives the record's trips, counted from now at the latest, and
    /// no half-open episode or closed spell that starts after now. A time that another worker's
    /// later reading of the clock explains is within ([`clock::stepped_back`]): moving it back
    /// would shorten the open period by the skew. `None`: already within.
    fn clamped(&self, state: &BreakerState, now: u64) -> Option<BreakerState> {
        let circuit = match state.circuit {
            Circuit::Open { until } => {
                let latest = now.saturating_add(nanos(self.open_period(state.trips)));
                clock::stepped_back(until, latest).then_some(Circuit::Open { until: latest })?
            }
            Circuit::HalfOpen {
                since,
                in_flight,
                successes,
            } if clock::stepped_back(since, now) => Circuit::HalfOpen {
                since: now,
                in_flight,
                successes,
            },
            Circuit::Closed {
                since,
                consecutive_failures,
                window,
            } if clock::stepped_back(since, now) => Circuit::Closed {
                since: now,
                consecutive_failures,
                window,
            },
            _ => return None,
        };
        Some(BreakerState { circuit, ..*state })
    }

    /// How long a half-open episode may wait for its probes before it assumes they are lost (a
    /// worker that went away never reports): the longest open period.
    pub fn probe_deadline(&self) -> Duration {
        self.max_open_for
    }

    fn start_probing(
        &self,
        state: &BreakerState,
        now: u64,
        transition: Transition,
    ) -> (Admission, Option<Change>) {
        let generation = state.generation.wrapping_add(1);
        let next = BreakerState {
            generation,
            circuit: Circuit::HalfOpen {
                since: now,
                in_flight: 1,
                successes: 0,
            },
            ..*state
        };
        (
            Admission::Probe { generation },
            Some(Change {
                state: next,
                transition: Some(transition),
            }),
        )
    }

    /// Applies a finished call's outcome. `None`: the record stays as it is (a late outcome from
    /// before a transition, or an abandoned counted call).
    pub fn record(
        &self,
        state: &BreakerState,
        role: Role,
        outcome: Outcome,
        now: u64,
    ) -> Option<Change> {
        match (role, state.circuit) {
            (
                Role::Counted { generation },
                Circuit::Closed {
                    since,
                    consecutive_failures,
                    mut window,
                },
            ) if generation == state.generation => {
                let Outcome::Completed { failed, slow } = outcome else {
                    return None;
                };
                let epoch = self.epoch(now);
                window.add(
                    epoch,
                    &Tally {
                        requests: 1,
                        failures: u32::from(failed),
                        slow: u32::from(slow),
                    },
                );
                let consecutive_failures = if failed {
                    consecutive_failures.saturating_add(1)
                } else {
                    0
                };
                if self.trips(consecutive_failures, &window.totals(epoch)) {
                    return Some(self.open(state, now, Transition::Opened));
                }
                Some(Change {
                    state: BreakerState {
                        circuit: Circuit::Closed {
                            since,
                            consecutive_failures,
                            window,
                        },
                        ..*state
                    },
                    transition: None,
                })
            }
            (
                Role::Probe { generation },
                Circuit::HalfOpen {
                    since,
                    in_flight,
                    successes,
                },
            ) if generation == state.generation => {
                // The probe's slot is free again, whatever it reports.
                let still_probing = |successes| {
                    Some(Change {
                        state: BreakerState {
                            circuit: Circuit::HalfOpen {
                                since,
                                in_flight: in_flight.saturating_sub(1),
                                successes,
                            },
                            ..*state
                        },
                        transition: None,
                    })
                };
                let Outcome::Completed { failed, slow } = outcome else {
                    return still_probing(successes);
                };
                // A slow probe fails only when slowness can trip the breaker.
                if failed || (slow && self.rules.slow_call_rate_ppm.is_some()) {
                    return Some(self.open(state, now, Transition::Reopened));
                }
                let successes = successes.saturating_add(1);
                if successes < self.half_open_probes {
                    return still_probing(successes);
                }
                Some(Change {
                    state: BreakerState {
                        generation: state.generation.wrapping_add(1),
                        circuit: Circuit::Closed {
                            since: now,
                            consecutive_failures: 0,
                            window: Window::EMPTY,
                        },
                        ..*state
                    },
                    transition: Some(Transition::Closed),
                })
            }
            _ => None,
        }
    }

    fn trips(&self, consecutive_failures: u32, totals: &Tally) -> bool {
        self.rules
            .consecutive_failures
            .is_some_and(|limit| consecutive_failures >= limit)
            || self.trips_on_rates(totals)
    }

    fn trips_on_rates(&self, totals: &Tally) -> bool {
        let rules = &self.rules;
        if totals.requests < rules.min_requests.max(1) {
            return false;
        }
        let at_least = |count: u32, ppm: Option<u32>| {
            ppm.is_some_and(|ppm| {
                u64::from(count) * 1_000_000 >= u64::from(ppm) * u64::from(totals.requests)
            })
        };
        at_least(totals.failures, rules.failure_rate_ppm)
            || at_least(totals.slow, rules.slow_call_rate_ppm)
    }

    /// Opens the circuit. A trip soon after the last close (within the longest open period), or a
    /// failed probe, counts as a repeat and doubles the open period, up to `max_open_for`.
    fn open(&self, state: &BreakerState, now: u64, transition: Transition) -> Change {
        let repeat = match state.circuit {
            Circuit::Closed { since, .. } => {
                state.trips > 0 && now.saturating_sub(since) <= nanos(self.max_open_for)
            }
            Circuit::Open { .. } | Circuit::HalfOpen { .. } => true,
        };
        let trips = if repeat {
            state.trips.saturating_add(1)
        } else {
            1
        };
        Change {
            state: BreakerState {
                generation: state.generation.wrapping_add(1),
                trips,
                circuit: Circuit::Open {
                    until: now.saturating_add(nanos(self.open_period(trips))),
                },
                ..*state
            },
            transition: Some(transition),
        }
    }

    /// `open_for` doubled for each trip after the first, capped by `max_open_for`.
    pub fn open_period(&self, trips: u8) -> Duration {
        let doublings = u32::from(trips.saturating_sub(1)).min(32);
        let scaled = nanos(self.open_for).saturating_mul(1u64 << doublings);
        Duration::from_nanos(scaled).min(self.max_open_for.max(self.open_for))
    }
}

fn nanos(span: Duration) -> u64 {
    u64::try_from(span.as_nanos()).unwrap_or(u64::MAX)
}

/// Whether a key may take this record: nobody holds it, or its holder left it closed and has had
/// no traffic for a whole window, so the record remembers nothing worth keeping.
///
/// A record left open or half-open by a key that went away is free too, once nothing can still
/// be waiting on it: an open period over by more than `max_open_for` with no request to probe
/// it, or a half-open episode twice its probe deadline old.
fn is_free_for(breaker: &Breaker, state: &BreakerState, owner: u64, now: u64) -> bool {
    if state.owner == 0 {
        return true;
    }
    if state.owner == owner {
        return false;
    }
    let idle = nanos(breaker.max_open_for.max(breaker.open_for));
    match state.circuit {
        Circuit::Closed { .. } => breaker.is_idle(state, now),
        Circuit::Open { until } => now.saturating_sub(until) > idle,
        Circuit::HalfOpen { since, .. } => now.saturating_sub(since) > idle.saturating_mul(2),
    }
}

/// Where a breaker's records are.
#[derive(Debug, Clone, Copy)]
pub enum Records<'a> {
    /// One record, named ahead (per route).
    One(&'a str),
    /// A table of records; the key's fingerprint picks the first slot to try.
    Table(&'a SlotTable),
}

/// Where one key's record was found, for recording the outcome later without a search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    /// The slot in the table (0 for a single record).
    pub slot: u32,
    pub owner: u64,
}

/// The request path's answer, with the record it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    Decided {
        admission: Admission,
        at: Located,
        transition: Option<Transition>,
        /// The record was quiet ([`Breaker::is_quiet`]) as read.
        quiet: bool,
        /// The record's window, as read, counted nothing: it looks free to other keys (see
        /// [`Breaker::is_idle`]), so a success recorded at once keeps it held.
        idle: bool,
    },
    /// Every slot the key may use is held by other keys: the request passes untracked.
    NoRecord,
    /// The CAS loop ran out or shared data failed: the breaker fails open, untracked.
    Failed(UpdateError),
}

/// A slot's name in a table, or the single record's name.
fn record_key<'b>(records: Records<'b>, slot: u32, buffer: &'b mut KeyBuf) -> &'b str {
    match records {
        Records::One(key) => key,
        Records::Table(table) => table.key(slot, buffer),
    }
}

/// Admits a request of the key with fingerprint `owner` (never 0): reads its record once, and
/// writes only to claim a free record, to start probing or to take a probe slot. Returns the
/// decision and the CAS races lost.
pub fn admit<S: SharedStore + ?Sized>(
    breaker: &Breaker,
    store: &S,
    records: Records<'_>,
    owner: u64,
    now: u64,
) -> (Admitted, u32) {
    let (first, tries) = match records {
        Records::One(_) => (0, 1),
        // The key's slots, then the overflow record.
        Records::Table(table) => (table.slot_of(owner), PROBE_LIMIT.min(table.slots()) + 1),
    };
    let slots = match records {
        Records::One(_) => 1,
        Records::Table(table) => table.slots(),
    };
    let mut races = 0;
    for attempt in 0..tries {
        let (slot, owner) = match records {
            Records::Table(_) if attempt + 1 == tries => (slots, OVERFLOW_OWNER),
            _ => ((first + attempt) % slots.max(1), owner),
        };
        let mut buffer = KeyBuf::default();
        let key = record_key(records, slot, &mut buffer);
        let outcome = cas::update(
            store,
            key,
            MAX_CAS_ATTEMPTS,
            |state: Option<BreakerState>| {
                let state = state.unwrap_or(BreakerState::fresh());
                if state.owner != owner {
                    if !is_free_for(breaker, &state, owner, now) {
                        // A holder's times beyond what this config and clock allow (a corrupt
                        // record, or one written under a clock that has stepped back since) are
                        // brought within and written back: the record then comes free in time,
                        // where one "open" until the far future never would.
                        return match breaker.clamped(&state, now) {
                            Some(clamped) => Step::Write(clamped, None),
                            None => Step::Keep(None),
                        };
                    }
                    let claimed = BreakerState {
                        owner,
                        generation: state.generation.wrapping_add(1),
                        trips: 0,
                        circuit: Circuit::Closed {
                            since: now,
                            consecutive_failures: 0,
                            window: Window::EMPTY,
                        },
                    };
                    let generation = claimed.generation;
                    return Step::Write(
                        claimed,
                        Some((Admission::Pass { generation }, None, (true, true))),
                    );
                }
                let seen = (breaker.is_quiet(&state, now), breaker.is_idle(&state, now));
                match breaker.admit(&state, now) {
                    (admission, None) => Step::Keep(Some((admission, None, seen))),
                    (admission, Some(change)) => {
                        Step::Write(change.state, Some((admission, change.transition, seen)))
                    }
                }
            },
        );
        match outcome {
            Ok(updated) => {
                races += updated.attempts - 1;
                if let Some((admission, transition, (quiet, idle))) = updated.value {
                    return (
                        Admitted::Decided {
                            admission,
                            at: Located { slot, owner },
                            transition,
                            quiet,
                            idle,
                        },
                        races,
                    );
                }
            }
            Err(error) => {
                if let UpdateError::Exhausted { attempts } = error {
                    races += attempts;
                }
                return (Admitted::Failed(error), races);
            }
        }
    }
    (Admitted::NoRecord, races)
}

/// What recording an outcome did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Applied(Option<Transition>),
    /// The record moved on (another transition, or another key took it): nothing to apply.
    Stale,
    Failed(UpdateError),
}

/// What [`record`] did: the outcome, the tallied successes it added, and whether the record is
/// quiet afterwards (false when it was not found or moved on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub recorded: Recorded,
    pub tallied: u32,
    pub quiet: bool,
}

/// Records on the record a call was admitted from, in one read and one conditional write: a
/// worker's tallied successes for it (`pending`) and then a finished call's `outcome`, either
/// of which may be absent. Returns what happened and the CAS races lost.
pub fn record<S: SharedStore + ?Sized>(
    breaker: &Breaker,
    store: &S,
    records: Records<'_>,
    at: Located,
    outcome: Option<(Role, Outcome)>,
    pending: Option<Pending>,
    now: u64,
) -> (Report, u32) {
    let mut buffer = KeyBuf::default();
    let key = record_key(records, at.slot, &mut buffer);
    let result = cas::update(
        store,
        key,
        MAX_CAS_ATTEMPTS,
        |state: Option<BreakerState>| {
            let Some(state) = state.filter(|s| s.owner == at.owner) else {
                return Step::Keep((Recorded::Stale, 0, false));
            };
            let settled = breaker.settle(&state, outcome, pending, now);
            match settled.change {
                Some(change) => Step::Write(
                    change.state,
                    (
                        Recorded::Applied(change.transition),
                        settled.tallied,
                        breaker.is_quiet(&change.state, now),
                    ),
                ),
                None => Step::Keep((Recorded::Stale, 0, breaker.is_quiet(&state, now))),
            }
        },
    );
    match result {
        Ok(updated) => {
            let (recorded, tallied, quiet) = updated.value;
            (
                Report {
                    recorded,
                    tallied,
                    quiet,
                },
                updated.attempts - 1,
            )
        }
        Err(error) => {
            let races = match error {
                UpdateError::Exhausted { attempts } => attempts,
                UpdateError::Store(_) => 0,
            };
            (
                Report {
                    recorded: Recorded::Failed(error),
                    tallied: 0,
                    quiet: false,
                },
                races,
            )
        }
    }
}

/// Envoy's response flags (the `response.flags` property) that say the upstream failed a call.
pub mod flags {
    pub const NO_HEALTHY_UPSTREAM: u64 = 1 << 1;
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 1 << 2;
    pub const UPSTREAM_REMOTE_RESET: u64 = 1 << 4;
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 1 << 5;
    pub const UPSTREAM_CONNECTION_TERMINATION: u64 = 1 << 6;
    pub const UPSTREAM_MAX_STREAM_DURATION_REACHED: u64 = 1 << 19;
    pub const UPSTREAM_PROTOCOL_ERROR: u64 = 1 << 23;
    pub const DNS_RESOLUTION_FAILED: u64 = 1 << 26;

    pub const RESETS: u64 =
        UPSTREAM_REMOTE_RESET | UPSTREAM_CONNECTION_TERMINATION | UPSTREAM_PROTOCOL_ERROR;
    pub const TIMEOUTS: u64 = UPSTREAM_REQUEST_TIMEOUT | UPSTREAM_MAX_STREAM_DURATION_REACHED;
    pub const CONNECT_FAILURES: u64 =
        UPSTREAM_CONNECTION_FAILURE | NO_HEALTHY_UPSTREAM | DNS_RESOLUTION_FAILED;
}

/// A set of HTTP statuses from 100 to 611 as a bit set: membership without allocation or search.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusSet {
    bits: [u64; 8],
}

impl StatusSet {
    pub fn insert(&mut self, status: u16) {
        if let Some(offset) = status.checked_sub(100).filter(|&o| o < 512) {
            self.bits[usize::from(offset / 64)] |= 1 << (offset % 64);
        }
    }

    pub fn insert_class(&mut self, class: u16) {
        for status in class * 100..class * 100 + 100 {
            self.insert(status);
        }
    }

    pub fn contains(&self, status: u16) -> bool {
        status
            .checked_sub(100)
            .filter(|&o| o < 512)
            .is_some_and(|o| self.bits[usize::from(o / 64)] & (1 << (o % 64)) != 0)
    }
}

/// What Envoy knows about a finished stream, read lazily: each read is a host call.
pub trait ResponseFacts {
    /// The HTTP status sent downstream; `None` when no response was sent.
    fn status(&mut self) -> Option<u16>;
    /// Envoy's response flags.
    fn flags(&mut self) -> u64;
    /// The gRPC status, from the `grpc-status` header or trailer.
    fn grpc_status(&mut self) -> Option<u32>;
}

/// Which finished calls count as failures and which as slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classifier {
    pub statuses: StatusSet,
    /// Response flags that make a call a failure, whatever its status.
    pub flags: u64,
    /// gRPC status codes (bit n for code n) that make a call a failure.
    pub grpc_codes: u32,
    pub slow_call: Option<Duration>,
}

impl Classifier {
    /// Classifies a finished call; `elapsed` is the time from the request to the response headers
    /// (`None` when none came). The gRPC status is only looked at for gRPC requests.
    pub fn outcome(
        &self,
        facts: &mut impl ResponseFacts,
        elapsed: Option<Duration>,
        grpc_request: bool,
    ) -> Outcome {
        let Some(status) = facts.status().filter(|&s| s != 0) else {
            return if facts.flags() & self.flags != 0 {
                Outcome::Completed {
                    failed: true,
                    slow: false,
                }
            } else {
                Outcome::Abandoned
            };
        };
        // Each fact is a host call, so the cheapest test goes first and the rest only if needed.
        // A gRPC status is only looked for on HTTP 200, the status every gRPC response carries
        // (Envoy infers one from any other status, which the status rules already judge).
        let failed = self.statuses.contains(status)
            || facts.flags() & self.flags != 0
            || (status == 200
                && grpc_request
                && self.grpc_codes != 0
                && facts
                    .grpc_status()
                    .is_some_and(|code| code < 32 && self.grpc_codes & (1 << code) != 0));
        let slow = self
            .slow_call
            .zip(elapsed)
            .is_some_and(|(limit, elapsed)| elapsed >= limit);
        Outcome::Completed { failed, slow }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const MS: u64 = 1_000_000;
    const SECOND: u64 = 1_000 * MS;

    fn breaker() -> Breaker {
        Breaker {
            rules: TripRules {
                consecutive_failures: Some(3),
                failure_rate_ppm: Some(500_000),
                slow_call_rate_ppm: None,
                min_requests: 10,
                bucket_nanos: SECOND,
            },
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(60),
            half_open_probes: 2,
        }
    }

    #[test]
    fn records_round_trip_through_their_bytes() {
        let mut window = Window::EMPTY;
        window.add(
            77,
            &Tally {
                requests: 9,
                failures: 4,
                slow: 1,
            },
        );
        let states = [
            BreakerState::fresh(),
            BreakerState {
                owner: u64::MAX - 3,
                generation: 41,
                trips: 3,
                circuit: Circuit::Closed {
                    since: 12 * SECOND,
                    consecutive_failures: 2,
                    window,
                },
            },
            BreakerState {
                owner: 5,
                generation: 1,
                trips: 1,
                circuit: Circuit::Open { until: u64::MAX },
            },
            BreakerState {
                owner: 5,
                generation: 2,
                trips: 1,
                circuit: Circuit::HalfOpen {
                    since: 3,
                    in_flight: 2,
                    successes: 1,
                },
            },
        ];
        for state in states {
            assert_eq!(BreakerState::decode(&state.encode()), state);
        }
    }

    /// Tallied successes added in one batch trip the rates exactly when recording them one by
    /// one would have, and leave the same window, whatever the window held before.
    #[cfg(not(target_family = "wasm"))]
    mod batches {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn a_batch_trips_exactly_when_one_of_its_successes_would_have(
                requests in 0u32..40,
                failure_share in 0u32..=100,
                slow_share in 0u32..=100,
                successes in 1u32..40,
                min_requests in 1u32..40,
                rate in 1u32..=100,
                slow_rule in any::<bool>(),
            ) {
                let failures = requests * failure_share / 100;
                let slow = requests * slow_share / 100;
                let mut breaker = breaker();
                breaker.rules = TripRules {
                    consecutive_failures: None,
                    failure_rate_ppm: Some(rate * 10_000),
                    slow_call_rate_ppm: slow_rule.then_some(rate * 10_000),
                    min_requests,
                    bucket_nanos: SECOND,
                };
                let now = 100 * SECOND + 5;
                let mut window = Window::EMPTY;
                window.add(95, &Tally { requests, failures, slow });
                let state = BreakerState {
                    owner: 1,
                    generation: 7,
                    trips: 0,
                    circuit: Circuit::Closed { since: 0, consecutive_failures: 0, window },
                };
                let role = Role::Counted { generation: 7 };
                let success = Outcome::Completed { failed: false, slow: false };
                let mut one_by_one = state;
                let mut tripped = false;
                for _ in 0..successes {
                    let Some(change) = breaker.record(&one_by_one, role, success, now) else {
                        break;
                    };
                    one_by_one = change.state;
                    if change.transition.is_some() {
                        tripped = true;
                        break;
                    }
                }
                let pending = Pending { generation: 7, bucket: 100, successes };
                let batch = breaker.settle(&state, None, Some(pending), now);
                let change = batch.change.unwrap();
                prop_assert_eq!(change.transition.is_some(), tripped);
                prop_assert_eq!(batch.tallied, successes);
                if !tripped {
                    prop_assert_eq!(change.state, one_by_one);
                }
            }
        }
    }

    #[test]
    fn tallies_of_another_spell_or_an_expired_bucket_are_dropped() {
        let breaker = breaker();
        let state = BreakerState {
            owner: 1,
            generation: 3,
            trips: 0,
            circuit: Circuit::Closed {
                since: 0,
                consecutive_failures: 2,
                window: Window::EMPTY,
            },
        };
        let now = 50 * SECOND;
        let pending = |generation, bucket| Pending {
            generation,
            bucket,
            successes: 4,
        };
        let dropped = Settled {
            change: None,
            tallied: 0,
        };
        assert_eq!(
            breaker.settle(&state, None, Some(pending(2, 50)), now),
            dropped
        );
        assert_eq!(
            breaker.settle(&state, None, Some(pending(3, 40)), now),
            dropped
        );
        let kept = breaker.settle(&state, None, Some(pending(3, 41)), now);
        assert_eq!(kept.tallied, 4);
        let Some(Change {
            state:
                BreakerState {
                    circuit:
                        Circuit::Closed {
                            consecutive_failures,
                            window,
                            ..
                        },
                    ..
                },
            transition: None,
        }) = kept.change
        else {
            panic!("closed, with the tally: {kept:?}");
        };
        assert_eq!(window.totals(50).requests, 4);
        assert_eq!(
            consecutive_failures, 2,
            "tallied successes never break a run"
        );
        // Open: the spell is over.
        let open = BreakerState {
            circuit: Circuit::Open { until: now },
            ..state
        };
        assert_eq!(
            breaker.settle(&open, None, Some(pending(3, 50)), now),
            dropped
        );
    }

    /// Found by the `records` fuzz target: a half-open episode older than the probe deadline,
    /// with free slots, admitted probes into them and then, its slots full and its start still
    /// old, restarted at once and admitted a second set: twice `half_open_probes` at one instant.
    #[test]
    fn a_stale_half_open_episode_admits_no_more_probes_than_allowed() {
        let breaker = breaker();
        let now = 1_000 * SECOND;
        let mut state = BreakerState {
            circuit: Circuit::HalfOpen {
                since: 0,
                in_flight: 0,
                successes: 0,
            },
            ..BreakerState::fresh()
        };
        let mut probes = 0;
        for _ in 0..10 {
            let (admission, change) = breaker.admit(&state, now);
            if matches!(admission, Admission::Probe { .. }) {
                probes += 1;
            }
            if let Some(change) = change {
                state = change.state;
            }
        }
        assert_eq!(probes, breaker.half_open_probes);
        // Probes that never report still count as lost a deadline after the last one went out.
        let later = now + nanos(breaker.probe_deadline()) + 1;
        assert!(matches!(
            breaker.admit(&state, later).0,
            Admission::Probe { .. }
        ));
    }

    #[test]
    fn open_periods_double_up_to_the_cap() {
        let breaker = breaker();
        let periods: Vec<u64> = (1..=6)
            .map(|trips| breaker.open_period(trips).as_secs())
            .collect();
        assert_eq!(periods, [5, 10, 20, 40, 60, 60]);
        assert_eq!(breaker.open_period(255).as_secs(), 60);
    }
}
