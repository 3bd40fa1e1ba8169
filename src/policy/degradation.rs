//! Health-aware degradation: what one dependency's health is, which degradation level that calls
//! for, and who in the fleet of workers decides it.
//!
//! A breaker answers "may this request go?" on every request; degradation answers "how much of the
//! service should we still offer?" a few times a second, the way an SRE steps a service down by
//! hand. So the request path never touches shared data for it: each worker keeps its own tally of
//! outcomes and its own copy of the level. On the root context's tick each worker adds its tally to
//! a shared window ([`Window`], one CAS) and reads the shared [`Health`] record back. One worker
//! at a time holds a lease in that record; the holder evaluates the level over the window
//! ([`next_level`]) and schedules active probes, so the checked service sees one probe per
//! interval however many workers Envoy runs.
//!
//! Levels are ordered (0 is normal). A level is entered as soon as any of its enter conditions
//! holds, and left one step at a time, only when all of its exit conditions hold and it has been
//! in force for its minimum dwell time: hysteresis by thresholds and by time, so a noisy signal
//! cannot make it flap.

use crate::clock;
use crate::state::cas::Record;
use crate::state::fields;
use crate::state::window::{self, Counts};

pub use crate::state::window::BUCKETS as WINDOW_BUCKETS;

/// How often each worker shares its tally and reads the level back. A window bucket shorter than
/// this, or a probe interval, would see nothing between two ticks.
pub const TICK: core::time::Duration = core::time::Duration::from_millis(100);

/// The shortest window the tick can fill: one tick per bucket.
pub const MIN_WINDOW: core::time::Duration =
    core::time::Duration::from_millis(100 * WINDOW_BUCKETS as u64);

/// Latency thresholds one policy can test (each keeps a counter of calls slower than it).
pub const MAX_LATENCY_THRESHOLDS: usize = 4;

/// Outcomes one worker saw since it last added them to the shared window, or a window's totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub requests: u32,
    pub failures: u32,
    /// Calls slower than each of the policy's latency thresholds.
    pub slower: [u32; MAX_LATENCY_THRESHOLDS],
}

impl Tally {
    pub fn is_empty(&self) -> bool {
        self.requests == 0
    }

    /// Notes one finished call.
    pub fn note(&mut self, failed: bool, elapsed_nanos: u64, thresholds: &[u64]) {
        self.requests = self.requests.saturating_add(1);
        self.failures = self.failures.saturating_add(u32::from(failed));
        for (slower, &threshold) in self.slower.iter_mut().zip(thresholds) {
            *slower = slower.saturating_add(u32::from(elapsed_nanos > threshold));
        }
    }
}

impl Counts for Tally {
    const LEN: usize = 4 * (2 + MAX_LATENCY_THRESHOLDS);
    const ZERO: Self = Tally {
        requests: 0,
        failures: 0,
        slower: [0; MAX_LATENCY_THRESHOLDS],
    };

    fn merge(&mut self, other: &Self) {
        self.requests = self.requests.saturating_add(other.requests);
        self.failures = self.failures.saturating_add(other.failures);
        for (mine, theirs) in self.slower.iter_mut().zip(other.slower) {
            *mine = mine.saturating_add(theirs);
        }
    }

    fn write(&self, out: &mut [u8]) {
        let counters = [self.requests, self.failures];
        for (at, value) in counters.iter().chain(&self.slower).enumerate() {
            fields::put(out, 4 * at, *value);
        }
    }

    fn read(bytes: &[u8]) -> Self {
        let mut tally = Tally {
            requests: fields::get(bytes, 0),
            failures: fields::get(bytes, 4),
            ..Tally::ZERO
        };
        for (at, slower) in tally.slower.iter_mut().enumerate() {
            *slower = fields::get(bytes, 8 + 4 * at);
        }
        tally
    }
}

/// The bucket number of `now` in a window of `bucket_nanos` buckets.
pub fn bucket(now: u64, bucket_nanos: u64) -> u64 {
    now / bucket_nanos.max(1)
}

/// The shared rolling window of outcomes, one record.
pub type Window = window::Window<Tally>;

pub const WINDOW_LEN: usize = Window::LEN;

impl Record<WINDOW_LEN> for Window {
    /// Layout: outcome window, stamped buckets.
    const LAYOUT: u8 = 0x32;
    fn encode(&self) -> [u8; WINDOW_LEN] {
        let mut out = [0u8; WINDOW_LEN];
        self.write(&mut out);
        out
    }

    fn decode(bytes: &[u8; WINDOW_LEN]) -> Self {
        Window::read(bytes)
    }
}

/// What the active probes say, with the streak that moves it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProbeHealth {
    /// No verdict yet (no probe configured, or too few results): counts as not unhealthy.
    #[default]
    Unknown,
    Healthy {
        failures_in_a_row: u16,
    },
    Unhealthy {
        successes_in_a_row: u16,
    },
}

/// How many probe results in a row flip the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeThresholds {
    pub healthy_after: u16,
    pub unhealthy_after: u16,
}

impl ProbeHealth {
    pub fn is_unhealthy(self) -> bool {
        matches!(self, ProbeHealth::Unhealthy { .. })
    }

    /// The verdict after one more probe result. From `Unknown`, the first threshold reached
    /// decides; a streak is broken by one result of the other kind.
    pub fn after(self, healthy: bool, thresholds: ProbeThresholds, unknown_streak: u16) -> Self {
        match (self, healthy) {
            (ProbeHealth::Healthy { .. }, true) => ProbeHealth::Healthy {
                failures_in_a_row: 0,
            },
            (ProbeHealth::Healthy { failures_in_a_row }, false) => {
                let failures = failures_in_a_row.saturating_add(1);
                if failures >= thresholds.unhealthy_after {
                    ProbeHealth::Unhealthy {
                        successes_in_a_row: 0,
                    }
                } else {
                    ProbeHealth::Healthy {
                        failures_in_a_row: failures,
                    }
                }
            }
            (ProbeHealth::Unhealthy { .. }, false) => ProbeHealth::Unhealthy {
                successes_in_a_row: 0,
            },
            (ProbeHealth::Unhealthy { successes_in_a_row }, true) => {
                let successes = successes_in_a_row.saturating_add(1);
                if successes >= thresholds.healthy_after {
                    ProbeHealth::Healthy {
                        failures_in_a_row: 0,
                    }
                } else {
                    ProbeHealth::Unhealthy {
                        successes_in_a_row: successes,
                    }
                }
            }
            (ProbeHealth::Unknown, _) => {
                let streak = unknown_streak.saturating_add(1);
                match healthy {
                    true if streak >= thresholds.healthy_after => ProbeHealth::Healthy {
                        failures_in_a_row: 0,
                    },
                    false if streak >= thresholds.unhealthy_after => ProbeHealth::Unhealthy {
                        successes_in_a_row: 0,
                    },
                    _ => ProbeHealth::Unknown,
                }
            }
        }
    }
}

/// A dependency's shared record: its level, the lease, and the probes' verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    /// 0 is normal; level `n` is the policy's `levels[n - 1]`.
    pub level: u8,
    /// When the current level was entered (nanoseconds since the epoch).
    pub since: u64,
    /// The worker that evaluates the level and sends probes, and until when.
    pub lease: Lease,
    pub probe: ProbeHealth,
    /// While the verdict is `Unknown`: the results in a row of the same kind, signed by kind
    /// (positive: successes).
    pub unknown_streak: i16,
    /// When the next probe is due.
    pub next_probe_at: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lease {
    /// A worker id, never 0 (0: nobody).
    pub holder: u64,
    pub until: u64,
}

pub const HEALTH_LEN: usize = 48;

impl Record<HEALTH_LEN> for Health {
    /// Layout: health and lease.
    const LAYOUT: u8 = 0x31;
    fn encode(&self) -> [u8; HEALTH_LEN] {
        let mut out = [0u8; HEALTH_LEN];
        let (kind, streak) = match self.probe {
            ProbeHealth::Unknown => (0u8, 0u16),
            ProbeHealth::Healthy { failures_in_a_row } => (1, failures_in_a_row),
            ProbeHealth::Unhealthy { successes_in_a_row } => (2, successes_in_a_row),
        };
        out[0] = self.level;
        out[1] = kind;
        fields::put(&mut out, 2, streak);
        fields::put(&mut out, 4, self.unknown_streak);
        fields::put(&mut out, 8, self.since);
        fields::put(&mut out, 16, self.lease.holder);
        fields::put(&mut out, 24, self.lease.until);
        fields::put(&mut out, 32, self.next_probe_at);
        out
    }

    fn decode(bytes: &[u8; HEALTH_LEN]) -> Self {
        let streak: u16 = fields::get(bytes, 2);
        Health {
            level: bytes[0],
            probe: match bytes[1] {
                1 => ProbeHealth::Healthy {
                    failures_in_a_row: streak,
                },
                2 => ProbeHealth::Unhealthy {
                    successes_in_a_row: streak,
                },
                _ => ProbeHealth::Unknown,
            },
            unknown_streak: fields::get(bytes, 4),
            since: fields::get(bytes, 8),
            lease: Lease {
                holder: fields::get(bytes, 16),
                until: fields::get(bytes, 24),
            },
            next_probe_at: fields::get(bytes, 32),
        }
    }
}

impl Health {
    /// Applies one probe result.
    pub fn with_probe_result(mut self, healthy: bool, thresholds: ProbeThresholds) -> Self {
        let same_kind = (self.unknown_streak > 0) == healthy && self.unknown_streak != 0;
        let streak = if same_kind {
            self.unknown_streak.unsigned_abs()
        } else {
            0
        };
        self.probe = self.probe.after(healthy, thresholds, streak);
        self.unknown_streak = match self.probe {
            ProbeHealth::Unknown => {
                let next = i16::try_from(streak.saturating_add(1)).unwrap_or(i16::MAX);
                if healthy {
                    next
                } else {
                    -next
                }
            }
            _ => 0,
        };
        self
    }
}

/// The signals a level's conditions test.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Signals {
    pub window: Tally,
    pub probe: ProbeHealth,
    /// The named breaker has a key open or half-open.
    pub breaker_open: bool,
}

/// Thresholds a level tests; every field is optional. As enter conditions, any one that is
/// exceeded is enough; as exit conditions, all must be met.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Conditions {
    /// Failures per million requests.
    pub failure_rate_ppm: Option<u32>,
    /// Which of the policy's latency thresholds the percentile is compared with.
    pub latency: Option<usize>,
    pub probe_unhealthy: bool,
    pub breaker_open: bool,
}

/// One level's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelRules {
    pub enter: Conditions,
    pub exit: Conditions,
    pub min_dwell_nanos: u64,
}

/// What the window-based conditions need besides the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evidence {
    /// Fewer requests than this in the window say nothing about rates or latency.
    pub min_requests: u32,
    /// The latency percentile, in ppm (950 000 for p95).
    pub percentile_ppm: u32,
}

impl Evidence {
    fn enough(&self, window: &Tally) -> bool {
        window.requests >= self.min_requests.max(1)
    }

    fn failure_rate_above(&self, window: &Tally, ppm: u32) -> bool {
        self.enough(window)
            && u64::from(window.failures) * 1_000_000 > u64::from(ppm) * u64::from(window.requests)
    }

    /// The percentile is above threshold `at` when more than (100 - percentile)% of the calls
    /// were slower than it: exact, with no histogram.
    fn percentile_above(&self, window: &Tally, at: usize) -> bool {
        let slower = window.slower.get(at).copied().unwrap_or(0);
        let allowed = u64::from(1_000_000 - self.percentile_ppm.min(1_000_000));
        self.enough(window) && u64::from(slower) * 1_000_000 > allowed * u64::from(window.requests)
    }

    /// Whether any of `conditions` is exceeded.
    pub fn any_exceeded(&self, conditions: &Conditions, signals: &Signals) -> bool {
        conditions
            .failure_rate_ppm
            .is_some_and(|ppm| self.failure_rate_above(&signals.window, ppm))
            || conditions
                .latency
                .is_some_and(|at| self.percentile_above(&signals.window, at))
            || (conditions.probe_unhealthy && signals.probe.is_unhealthy())
            || (conditions.breaker_open && signals.breaker_open)
    }

    /// Whether every one of `conditions` is met (not exceeded). Too few requests in the window
    /// meets the window-based ones: while a level sheds or serves a fallback the upstream may see
    /// no traffic, and the probes and the breaker must then decide alone.
    pub fn all_met(&self, conditions: &Conditions, signals: &Signals) -> bool {
        !self.any_exceeded(conditions, signals)
    }
}

/// The level change the signals call for, if any. Escalation is immediate and may skip levels (to
/// the most severe level whose enter conditions hold); de-escalation is one step at a time, after
/// the current level's dwell, when all its exit conditions are met.
pub fn next_level(
    current: u8,
    since: u64,
    now: u64,
    levels: &[LevelRules],
    evidence: &Evidence,
    signals: &Signals,
) -> Option<u8> {
    let entered = levels
        .iter()
        .rposition(|level| evidence.any_exceeded(&level.enter, signals))
        .map_or(0, |position| position + 1);
    if entered > usize::from(current) {
        return u8::try_from(entered).ok();
    }
    let rules = levels.get(usize::from(current).checked_sub(1)?)?;
    let dwelt = now.saturating_sub(since) >= rules.min_dwell_nanos;
    (dwelt && evidence.all_met(&rules.exit, signals)).then(|| current - 1)
}

/// The lease a worker holds after asking for it at `now`: its own lease renewed, or a lapsed one
/// taken over. `None`: another worker holds it.
pub fn claim(lease: Lease, me: u64, now: u64, ttl_nanos: u64) -> Option<Lease> {
    // A lease that runs further ahead than one renewal and a later reading explain was written
    // under a clock that has stepped back since: it counts as lapsed, or its dead holder would
    // keep it for the step. One only a little ahead is a live holder's, renewed with a later
    // reading of the clock than ours.
    let lapsed =
        lease.until <= now || clock::stepped_back(lease.until, now.saturating_add(ttl_nanos));
    (lease.holder == me || lapsed).then(|| Lease {
        holder: me,
        until: now.saturating_add(ttl_nanos),
    })
}

/// The SRE book's client-side throttling: the chance, in ppm, of refusing a request locally when
/// the backend accepted `accepts` of the last `requests`, with `k_milli` = K × 1000. Refusals rise
/// smoothly as the accept rate falls below 1/K, and the backend keeps seeing enough traffic to
/// show its recovery.
pub fn throttle_ppm(requests: u32, accepts: u32, k_milli: u32, max_ppm: u32) -> u32 {
    let requests = u64::from(requests);
    let allowed = u64::from(accepts) * u64::from(k_milli) / 1000;
    let excess = requests.saturating_sub(allowed);
    let ppm = excess * 1_000_000 / (requests + 1);
    u32::try_from(ppm).unwrap_or(u32::MAX).min(max_ppm)
}

/// Requests and accepts of one route in one bucket of the admission window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admissions {
    pub requests: u32,
    pub accepts: u32,
}

impl Counts for Admissions {
    const LEN: usize = 8;
    const ZERO: Self = Admissions {
        requests: 0,
        accepts: 0,
    };

    fn merge(&mut self, other: &Self) {
        self.requests = self.requests.saturating_add(other.requests);
        self.accepts = self.accepts.saturating_add(other.accepts);
    }

    fn write(&self, out: &mut [u8]) {
        fields::put(out, 0, self.requests);
        fields::put(out, 4, self.accepts);
    }

    fn read(bytes: &[u8]) -> Self {
        Admissions {
            requests: fields::get(bytes, 0),
            accepts: fields::get(bytes, 4),
        }
    }
}

/// One route's admission window, one record.
pub type AdmissionWindow = window::Window<Admissions>;

pub const ADMISSION_LEN: usize = AdmissionWindow::LEN;

impl Record<ADMISSION_LEN> for AdmissionWindow {
    /// Layout: admission window, stamped buckets.
    const LAYOUT: u8 = 0x33;
    fn encode(&self) -> [u8; ADMISSION_LEN] {
        let mut out = [0u8; ADMISSION_LEN];
        self.write(&mut out);
        out
    }

    fn decode(bytes: &[u8; ADMISSION_LEN]) -> Self {
        AdmissionWindow::read(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn records_survive_encoding() {
        let health = Health {
            level: 2,
            since: 123_456_789,
            lease: Lease {
                holder: 7,
                until: 999,
            },
            probe: ProbeHealth::Unhealthy {
                successes_in_a_row: 1,
            },
            unknown_streak: -3,
            next_probe_at: 42,
        };
        assert_eq!(Health::decode(&health.encode()), health);
        let mut window = Window::default();
        let mut tally = Tally::default();
        tally.note(true, 900, &[500, 1000]);
        window.add(bucket(5_000, 1_000), &tally);
        assert_eq!(Window::decode(&window.encode()), window);
        let mut admission = AdmissionWindow::default();
        admission.add(
            bucket(5_000, 1_000),
            &Admissions {
                requests: 10,
                accepts: 4,
            },
        );
        assert_eq!(AdmissionWindow::decode(&admission.encode()), admission);
    }
}
