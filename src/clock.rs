//! Time as the core sees it: a wall-clock timestamp in nanoseconds, read once per host callback
//! and passed down.
//!
//! Shared state is read and written by every Envoy worker, so all of them must agree on the time
//! base; Envoy's proxy-wasm clock is the process's realtime clock, which they share. Keeping time a
//! plain number lets tests drive it with [`FakeClock`].

use core::cell::Cell;
use core::time::Duration;

/// Nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp(0);

    pub const fn from_nanos(nanos: u64) -> Self {
        Timestamp(nanos)
    }

    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Saturates instead of wrapping: a clock far in the future stays far in the future.
    pub fn saturating_add(self, span: Duration) -> Timestamp {
        let nanos = u64::try_from(span.as_nanos()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(nanos))
    }

    /// How long after `earlier` this is; zero if `earlier` is not earlier (clocks can step back).
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// How far a time another worker wrote may lie beyond what this worker's reading of the clock
/// allows before it counts as written under a clock that has since stepped back.
///
/// A worker reads the clock when a callback starts and writes shared data a moment later; one that
/// is descheduled in between (milliseconds on a busy host, more under starvation) finds records
/// written with later readings than its own. Taking those for a step back and clamping them to its
/// own reading would move them back by the skew: a rate limit would mint tokens, a lease would
/// change hands. A real step back of less than this is honoured late, by at most this long.
pub const READING_SKEW: Duration = Duration::from_secs(1);

/// Whether `written`, a time that at this worker's reading should lie no later than `latest`, was
/// written under a clock that has since stepped back: beyond `latest` by more than
/// [`READING_SKEW`], which no worker's later reading explains.
pub fn stepped_back(written: u64, latest: u64) -> bool {
    const SKEW_NANOS: u64 = READING_SKEW.as_nanos() as u64;
    written > latest.saturating_add(SKEW_NANOS)
}

/// Anything that can tell the time. The host reads Envoy's clock; tests use [`FakeClock`].
pub trait Clock {
    fn now(&self) -> Timestamp;
}

/// A clock that only moves when told to.
#[derive(Debug, Default)]
pub struct FakeClock {
    now: Cell<u64>,
}

impl FakeClock {
    pub fn at(now: Timestamp) -> Self {
        FakeClock {
            now: Cell::new(now.as_nanos()),
        }
    }

    pub fn advance(&self, span: Duration) {
        self.now
            .set(Timestamp(self.now.get()).saturating_add(span).as_nanos());
    }

    pub fn set(&self, now: Timestamp) {
        self.now.set(now.as_nanos());
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.now.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn fake_clock_moves_only_when_told() {
        let clock = FakeClock::at(Timestamp::from_nanos(1_000));
        assert_eq!(clock.now(), Timestamp::from_nanos(1_000));
        clock.advance(Duration::from_millis(2));
        assert_eq!(clock.now(), Timestamp::from_nanos(2_001_000));
    }

    #[test]
    fn only_a_time_beyond_the_reading_skew_counts_as_a_step_back() {
        let latest = 10_000_000_000;
        let skew = READING_SKEW.as_nanos() as u64;
        assert!(!stepped_back(latest, latest));
        assert!(!stepped_back(latest + skew, latest));
        assert!(stepped_back(latest + skew + 1, latest));
        assert!(!stepped_back(u64::MAX, u64::MAX - 1));
    }

    #[test]
    fn timestamps_saturate_instead_of_wrapping() {
        let late = Timestamp::from_nanos(u64::MAX - 1);
        assert_eq!(
            late.saturating_add(Duration::from_secs(1)).as_nanos(),
            u64::MAX
        );
        let early = Timestamp::from_nanos(5);
        assert_eq!(early.saturating_since(late), Duration::ZERO);
        assert_eq!(
            late.saturating_since(early),
            Duration::from_nanos(u64::MAX - 6)
        );
    }
}
