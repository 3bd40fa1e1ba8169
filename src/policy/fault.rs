//! Fault injection for chaos experiments: aborts, delays and late response faults, with the
//! safety rails a production experiment needs.
//!
//! Envoy's fault filter is the anchor: percentages, header-controlled faults and a cap on active
//! faults. Seawall adds what its filter lacks: sticky cohorts (a hash of a key such as the user id
//! decides, so one user sees one consistent experiment), a time box after which the experiment
//! injects nothing, and an exact cap: the number of requests with an active fault is one counter in
//! shared data, taken with a bounded CAS when a fault starts and given back when its stream ends,
//! whatever way it ends.
//!
//! Everything here is pure: the draws come from a [`Random`] the caller owns or from a key's hash,
//! the time is an argument, and the counter goes through [`crate::state::cas`].

use core::time::Duration;

use crate::clock;
use crate::state::cas::{self, Record, Step, UpdateError};
use crate::state::fields;
use crate::state::SharedStore;

/// How many lost CAS races taking or giving back an active-fault slot tolerates. Taking fails
/// safe (no fault is injected); giving back that runs out leaves the cap stricter, never looser.
pub const MAX_CAS_ATTEMPTS: u32 = 32;

/// A share in parts per million: 0.0001% steps, like the config's percentages.
pub const PPM: u64 = 1_000_000;

/// A small, fast generator for per-request draws (SplitMix64): one `u64` of state per worker, no
/// allocation, and reproducible from a seed in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Random {
    state: u64,
}

impl Random {
    pub const fn seeded(seed: u64) -> Self {
        Random { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// SplitMix64's finaliser: spreads a key's hash so that its low digits are uniform.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Where a yes-or-no draw comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    /// A fresh draw per request.
    Fresh(u64),
    /// The key's hash: the same key always draws the same number, so its outcome is sticky.
    Sticky(u64),
}

impl Draw {
    /// Whether this draw falls within `ppm` parts per million. `salt` separates the questions
    /// asked of one sticky key (cohort, abort, delay), so they are independent of each other.
    pub fn hits(self, ppm: u32, salt: u64) -> bool {
        let value = match self {
            Draw::Fresh(value) => value,
            Draw::Sticky(hash) => mix(hash ^ salt),
        };
        value % PPM < u64::from(ppm)
    }
}

/// Salts for the independent sticky questions.
pub const SALT_COHORT: u64 = 0x636f_686f_7274;
pub const SALT_ABORT: u64 = 0x0061_626f_7274;
pub const SALT_DELAY: u64 = 0x0064_656c_6179;
pub const SALT_RESPONSE: u64 = 0x7265_7370;

/// How long to hold a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DelayShape {
    /// `fixed`, moved by up to `jitter` either way, uniformly.
    Fixed { fixed: Duration, jitter: Duration },
    /// Uniform between `min` and `max`.
    Uniform { min: Duration, max: Duration },
    /// Exponential with `mean`, capped at `max` (a long tail that cannot hang a request).
    Exponential { mean: Duration, max: Duration },
}

impl DelayShape {
    /// A delay drawn with `unit`, uniform in [0, 1).
    pub fn sample(&self, unit: f64) -> Duration {
        let unit = unit.clamp(0.0, 1.0);
        match *self {
            DelayShape::Fixed { fixed, jitter } => {
                let low = fixed.saturating_sub(jitter);
                let high = fixed.saturating_add(jitter);
                low + (high - low).mul_f64(unit)
            }
            DelayShape::Uniform { min, max } => min + max.saturating_sub(min).mul_f64(unit),
            DelayShape::Exponential { mean, max } => {
                // 1 - unit is in (0, 1], so the logarithm is finite.
                let factor = -(1.0 - unit).ln();
                mean.mul_f64(factor.min(1e6)).min(max)
            }
        }
    }
}

/// A time box in nanoseconds since the epoch, `[start, end)`; either side may be open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeBox {
    pub start: Option<u64>,
    pub end: Option<u64>,
}

impl TimeBox {
    pub fn contains(&self, now: u64) -> bool {
        self.start.is_none_or(|start| now >= start) && self.end.is_none_or(|end| now < end)
    }
}

/// Compares a presented secret with the configured one in time that does not depend on where they
/// differ, so the secret cannot be guessed byte by byte from response times.
pub fn secret_matches(presented: &[u8], secret: &[u8]) -> bool {
    let mut difference = u64::from(presented.len() != secret.len());
    for (index, &expected) in secret.iter().enumerate() {
        let got = presented.get(index).copied().unwrap_or(!expected);
        difference |= u64::from(got ^ expected);
    }
    difference == 0 && !secret.is_empty()
}

/// Parses a small decimal (a status, milliseconds, a percentage with up to 4 decimals) from a
/// header value without allocating. Percentages come back in parts per million.
pub fn parse_decimal(value: &[u8]) -> Option<u64> {
    let value = trim(value);
    if value.is_empty() || value.len() > 12 {
        return None;
    }
    value.iter().try_fold(0u64, |sum, &digit| {
        digit
            .is_ascii_digit()
            .then(|| sum * 10 + u64::from(digit - b'0'))
    })
}

/// A percentage like `25` or `12.5` in parts per million.
pub fn parse_percent(value: &[u8]) -> Option<u32> {
    let value = trim(value);
    let (whole, fraction) = match value.iter().position(|&b| b == b'.') {
        Some(dot) => (&value[..dot], &value[dot + 1..]),
        None => (value, &[][..]),
    };
    if fraction.len() > 4 {
        return None;
    }
    let whole = parse_decimal(whole)?;
    // Four decimals of a percent are exactly parts per million.
    let mut fraction_ppm = 0u64;
    let mut scale = 1_000u64;
    for &digit in fraction {
        if !digit.is_ascii_digit() {
            return None;
        }
        fraction_ppm += u64::from(digit - b'0') * scale;
        scale /= 10;
    }
    let ppm = whole.checked_mul(10_000)?.checked_add(fraction_ppm)?;
    (ppm <= PPM).then(|| u32::try_from(ppm).ok()).flatten()
}

fn trim(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |end| end + 1);
    &value[start..end]
}

/// How long a taken slot counts at least: slots are counted per epoch of this length, and a slot
/// still held when its epoch is two behind is written off. So a slot whose stream never reported
/// its end (a VM torn down, a release that lost every CAS race) comes back within two epochs.
pub const SLOT_EPOCH: Duration = Duration::from_secs(60);

fn epoch_length() -> u64 {
    u64::try_from(SLOT_EPOCH.as_nanos()).unwrap_or(u64::MAX)
}

fn epoch_of(now: u64) -> u32 {
    u32::try_from(now / epoch_length()).unwrap_or(u32::MAX)
}

/// The active faults of one policy, in shared data: the slots taken in the current epoch and in
/// the one before, still held. Older slots no longer count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Active {
    pub epoch: u32,
    pub current: u16,
    pub previous: u16,
}

impl Active {
    /// The record as seen at `now`: moved on by whole epochs, forgetting what is two behind.
    ///
    /// A record from a later epoch that another worker's later reading of the clock explains
    /// stays as it is: a slot taken now counts in its epoch. Moved back to this reading's epoch,
    /// its counts would shift into the wrong epochs when the next reading moves it on again, and
    /// the slots held from the epoch before would be forgotten. A record from further ahead was
    /// written under a clock that has stepped back since: it moves to this epoch with its counts.
    fn at(self, now: u64) -> Active {
        let epoch = epoch_of(now);
        let starts = u64::from(self.epoch).saturating_mul(epoch_length());
        match epoch.checked_sub(self.epoch) {
            None if !clock::stepped_back(starts, now) => self,
            Some(0) | None => Active { epoch, ..self },
            Some(1) => Active {
                epoch,
                current: 0,
                previous: self.current,
            },
            Some(_) => Active {
                epoch,
                ..Active::default()
            },
        }
    }

    pub fn held(&self) -> u32 {
        u32::from(self.current) + u32::from(self.previous)
    }
}

impl Record<8> for Active {
    /// Layout: active faults with slot epochs.
    const LAYOUT: u8 = 0x52;
    fn encode(&self) -> [u8; 8] {
        let mut out = [0u8; 8];
        fields::put(&mut out, 0, self.epoch);
        fields::put(&mut out, 4, self.current);
        fields::put(&mut out, 6, self.previous);
        out
    }

    fn decode(bytes: &[u8; 8]) -> Self {
        Active {
            epoch: fields::get(bytes, 0),
            current: fields::get(bytes, 4),
            previous: fields::get(bytes, 6),
        }
    }
}

/// The most `max_active` can be: what one epoch's count holds.
pub const MAX_ACTIVE: u64 = u16::MAX as u64;

/// Whether an active-fault slot was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Taken in this epoch: the stream gives it back with it.
    Taken {
        epoch: u32,
    },
    /// `max_active` faults are already active: this request gets none.
    Full,
    Failed(UpdateError),
}

/// Takes a slot under `max_active` at `now`: one read and, when a slot is free, one conditional
/// write. Returns the outcome and the CAS races lost.
pub fn take_slot<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    max_active: u64,
    now: u64,
) -> (Slot, u32) {
    let result = cas::update(store, key, MAX_CAS_ATTEMPTS, |active: Option<Active>| {
        let active = active.unwrap_or_default().at(now);
        if u64::from(active.held()) >= max_active.min(MAX_ACTIVE) {
            Step::Keep(Slot::Full)
        } else {
            let taken = Active {
                current: active.current.saturating_add(1),
                ..active
            };
            Step::Write(taken, Slot::Taken { epoch: taken.epoch })
        }
    });
    match result {
        Ok(updated) => (updated.value, updated.attempts - 1),
        Err(error) => {
            let races = match error {
                UpdateError::Exhausted { attempts } => attempts,
                UpdateError::Store(_) => 0,
            };
            (Slot::Failed(error), races)
        }
    }
}

/// Gives back a slot taken in `taken` when the stream that held it ends, at `now`. A slot whose
/// epoch has been written off is not given back twice.
pub fn give_back_slot<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    taken: u32,
    now: u64,
) -> Result<u32, UpdateError> {
    // A slot taken under a later reading than this one counts from its own epoch.
    let now = now.max(u64::from(taken).saturating_mul(epoch_length()));
    cas::update(store, key, MAX_CAS_ATTEMPTS, |active: Option<Active>| {
        let active = active.unwrap_or_default().at(now);
        let released = match active.epoch.saturating_sub(taken) {
            0 if active.current > 0 => Active {
                current: active.current - 1,
                ..active
            },
            1 if active.previous > 0 => Active {
                previous: active.previous - 1,
                ..active
            },
            _ => return Step::Keep(()),
        };
        Step::Write(released, ())
    })
    .map(|updated| updated.attempts - 1)
}

/// Nanoseconds since the epoch of an RFC 3339 time such as `2026-11-22T10:00:00Z` or
/// `2026-11-22T11:00:00.5+01:00`; `None` when it is not one.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    let number = |range: core::ops::Range<usize>| -> Option<i64> {
        let digits = bytes.get(range)?;
        digits.iter().try_fold(0i64, |sum, &digit| {
            digit
                .is_ascii_digit()
                .then(|| sum * 10 + i64::from(digit - b'0'))
        })
    };
    let separators = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if separators
        .iter()
        .any(|&(at, sep)| bytes.get(at) != Some(&sep))
        || !matches!(bytes.get(10), Some(b'T' | b't' | b' '))
    {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut at = 19;
    let mut nanos = 0i64;
    if bytes.get(at) == Some(&b'.') {
        at += 1;
        let mut scale = 100_000_000i64;
        while let Some(&digit) = bytes.get(at).filter(|b| b.is_ascii_digit()) {
            nanos += i64::from(digit - b'0') * scale;
            scale /= 10;
            at += 1;
        }
    }
    let offset_seconds = match bytes.get(at) {
        Some(b'Z' | b'z') if bytes.len() == at + 1 => 0,
        Some(&sign @ (b'+' | b'-'))
            if bytes.len() == at + 6 && bytes.get(at + 3) == Some(&b':') =>
        {
            let minutes = number(at + 1..at + 3)? * 60 + number(at + 4..at + 6)?;
            if sign == b'+' {
                minutes * 60
            } else {
                -minutes * 60
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_seconds;
    u64::try_from(seconds)
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(u64::try_from(nanos).ok()?)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::cas::ensure;
    use crate::state::fake::FakeStore;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn fresh_draws_hit_their_share() {
        let mut random = Random::seeded(7);
        let hits = (0..100_000)
            .filter(|_| Draw::Fresh(random.next_u64()).hits(300_000, 0))
            .count();
        assert!((29_000..=31_000).contains(&hits), "{hits}");
        assert!(!Draw::Fresh(0).hits(0, 0));
        assert!(Draw::Fresh(u64::MAX).hits(1_000_000, 0));
    }

    #[test]
    fn sticky_draws_are_the_same_for_a_key_and_independent_across_salts() {
        let key = Draw::Sticky(12_345);
        let first = key.hits(500_000, SALT_ABORT);
        assert!((0..50).all(|_| key.hits(500_000, SALT_ABORT) == first));
        let both = (0..10_000u64)
            .filter(|&k| {
                Draw::Sticky(k).hits(500_000, SALT_ABORT)
                    && Draw::Sticky(k).hits(500_000, SALT_DELAY)
            })
            .count();
        assert!((2_300..=2_700).contains(&both), "{both}");
    }

    #[test]
    fn delays_follow_their_shape() {
        let ms = Duration::from_millis;
        let fixed = DelayShape::Fixed {
            fixed: ms(200),
            jitter: ms(50),
        };
        assert_eq!(fixed.sample(0.0), ms(150));
        assert_eq!(fixed.sample(0.5), ms(200));
        let uniform = DelayShape::Uniform {
            min: ms(10),
            max: ms(30),
        };
        assert_eq!(uniform.sample(0.25), ms(15));
        let exponential = DelayShape::Exponential {
            mean: ms(100),
            max: ms(400),
        };
        assert_eq!(exponential.sample(0.0), Duration::ZERO);
        assert_eq!(exponential.sample(0.999_999_999), ms(400));
        let median = exponential.sample(0.5).as_secs_f64();
        assert!((median - 0.1 * 2f64.ln()).abs() < 1e-9, "{median}");
    }

    #[test]
    fn the_secret_must_match_exactly() {
        assert!(secret_matches(b"change-me", b"change-me"));
        assert!(!secret_matches(b"change-mE", b"change-me"));
        assert!(!secret_matches(b"change-me-too", b"change-me"));
        assert!(!secret_matches(b"change", b"change-me"));
        assert!(!secret_matches(b"", b""));
    }

    #[test]
    fn header_values_parse_without_allocating() {
        assert_eq!(parse_decimal(b" 503 "), Some(503));
        assert_eq!(parse_decimal(b"5x"), None);
        assert_eq!(parse_decimal(b""), None);
        assert_eq!(parse_decimal(b"9999999999999"), None);
        assert_eq!(parse_percent(b"25"), Some(250_000));
        assert_eq!(parse_percent(b"12.5"), Some(125_000));
        assert_eq!(parse_percent(b"0.0001"), Some(1));
        assert_eq!(parse_percent(b"100"), Some(1_000_000));
        assert_eq!(parse_percent(b"101"), None);
        assert_eq!(parse_percent(b"1.00001"), None);
        assert_eq!(parse_percent(b"-1"), None);
    }

    #[test]
    fn rfc3339_times_parse_to_epoch_nanoseconds() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2026-11-22T10:00:00Z"),
            Some(1_795_341_600 * 1_000_000_000)
        );
        assert_eq!(
            parse_rfc3339("2026-11-22T11:00:00.5+01:00"),
            Some(1_795_341_600 * 1_000_000_000 + 500_000_000)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T12:00:00Z"),
            Some(1_709_208_000 * 1_000_000_000)
        );
        for bad in [
            "2026-11-22",
            "2026-13-01T00:00:00Z",
            "2026-11-22T10:00:00",
            "yesterday",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_time_box_is_half_open() {
        let window = TimeBox {
            start: Some(10),
            end: Some(20),
        };
        assert!(!window.contains(9));
        assert!(window.contains(10));
        assert!(!window.contains(20));
        assert!(TimeBox::default().contains(0));
    }

    #[test]
    fn slots_are_capped_and_given_back() {
        let store = FakeStore::new();
        let now = 1_800_000_000 * 1_000_000_000u64;
        ensure(&store, "active", &Active::default()).unwrap();
        let Slot::Taken { epoch } = take_slot(&store, "active", 2, now).0 else {
            panic!("a slot is free");
        };
        assert!(matches!(
            take_slot(&store, "active", 2, now).0,
            Slot::Taken { .. }
        ));
        assert_eq!(take_slot(&store, "active", 2, now).0, Slot::Full);
        give_back_slot(&store, "active", epoch, now).unwrap();
        assert!(matches!(
            take_slot(&store, "active", 2, now).0,
            Slot::Taken { .. }
        ));
        for _ in 0..5 {
            give_back_slot(&store, "active", epoch, now).unwrap();
        }
        let held = cas::read::<8, Active, _>(&store, "active")
            .unwrap()
            .map(|(a, _)| a.held());
        assert_eq!(held, Some(0), "giving back never goes below zero");
    }

    /// At an epoch's turn, a worker that read the clock just before it takes a slot in a record
    /// another worker has already moved into the new epoch. That is not a clock step back: the
    /// record keeps its epoch and the slot counts in it. Moved back to the older reading's epoch,
    /// the record's next turn shifted the new epoch's slots into "previous" and forgot the ones
    /// held from the epoch before, so more than `max_active` faults were active at once.
    #[test]
    fn a_worker_reading_the_clock_just_before_an_epochs_turn_loses_no_slot() {
        let store = FakeStore::new();
        let epoch = u64::try_from(SLOT_EPOCH.as_nanos()).unwrap();
        let turn = 30_000_000 * epoch;
        let ms = 1_000_000;
        let Slot::Taken { epoch: first } = take_slot(&store, "active", 3, turn - 100 * ms).0 else {
            panic!("a slot is free");
        };
        let Slot::Taken { epoch: second } = take_slot(&store, "active", 3, turn + 50 * ms).0 else {
            panic!("a slot is free");
        };
        // Read the clock 200 ms ago, before the turn; decides now.
        let Slot::Taken { epoch: lagging } = take_slot(&store, "active", 3, turn - 150 * ms).0
        else {
            panic!("a slot is free");
        };
        assert_eq!(lagging, second, "counted in the record's epoch");
        assert_eq!(
            take_slot(&store, "active", 3, turn + 60 * ms).0,
            Slot::Full,
            "three slots are held"
        );
        // Each slot comes back out of the count it was taken in.
        give_back_slot(&store, "active", first, turn + 70 * ms).unwrap();
        give_back_slot(&store, "active", lagging, turn - 100 * ms).unwrap();
        let held = |at| {
            cas::read::<8, Active, _>(&store, "active")
                .unwrap()
                .map(|(active, _)| active.at(at).held())
        };
        assert_eq!(held(turn + 80 * ms), Some(1));
        give_back_slot(&store, "active", second, turn + 90 * ms).unwrap();
        assert_eq!(held(turn + 100 * ms), Some(0));
    }

    /// Issue 14, point 9: a slot whose stream never gave it back (a VM torn down, a release that
    /// lost every CAS race) was lost for good; with `max_active: 1`, every later fault counted as
    /// overflow. Now it is written off two epochs after it was taken.
    #[test]
    fn a_slot_never_given_back_is_written_off_within_two_epochs() {
        let store = FakeStore::new();
        let epoch = u64::try_from(SLOT_EPOCH.as_nanos()).unwrap();
        let now = 1_800_000_000 * 1_000_000_000u64;
        assert!(matches!(
            take_slot(&store, "active", 1, now).0,
            Slot::Taken { .. }
        ));
        assert_eq!(take_slot(&store, "active", 1, now).0, Slot::Full);
        assert_eq!(take_slot(&store, "active", 1, now + epoch).0, Slot::Full);
        let later = now + 2 * epoch;
        let Slot::Taken { epoch: taken } = take_slot(&store, "active", 1, later).0 else {
            panic!("the leaked slot is written off two epochs on");
        };
        // A late give-back of the written-off slot does not free the one taken since.
        give_back_slot(&store, "active", epoch_of(now), later).unwrap();
        assert_eq!(take_slot(&store, "active", 1, later).0, Slot::Full);
        // A slot given back in the next epoch comes out of the count it was taken in.
        give_back_slot(&store, "active", taken, later + epoch).unwrap();
        assert!(matches!(
            take_slot(&store, "active", 1, later + epoch).0,
            Slot::Taken { .. }
        ));
    }
}
