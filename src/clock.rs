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
