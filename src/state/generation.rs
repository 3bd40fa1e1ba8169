//! Which of several live configs is the newest.
//!
//! A reloaded config gets a new root context on every worker, but the old ones live on until
//! their listener drains (600 s by default) and keep ticking. Anything that outlives a config and
//! that only one config may drive (a lease, the degradation level, the probe schedule) must tell
//! them apart. Each config adopts a generation number when it loads: the current one if the
//! config is the one already current (another worker of the same load), the next one otherwise.
//! A config whose number is no longer current is superseded and leaves such state alone.

use super::cas::{self, Record, Step, UpdateError};
use super::fields;
use super::SharedStore;

/// The current generation in shared data: its number and the fingerprint of its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Generation {
    pub number: u32,
    pub fingerprint: u64,
}

impl Record<12> for Generation {
    /// Layout: config generation.
    const LAYOUT: u8 = 0x61;
    fn encode(&self) -> [u8; 12] {
        let mut out = [0u8; 12];
        fields::put(&mut out, 0, self.number);
        fields::put(&mut out, 4, self.fingerprint);
        out
    }

    fn decode(bytes: &[u8; 12]) -> Self {
        Generation {
            number: fields::get(bytes, 0),
            fingerprint: fields::get(bytes, 4),
        }
    }
}

/// How many times adopting may lose a race: each loss is another worker's adoption landing.
const MAX_CAS_ATTEMPTS: u32 = 32;

/// Adopts a generation for the config with `fingerprint`, as it loads: the current number when
/// that config is already current, else the next number, which makes it current.
pub fn adopt<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    fingerprint: u64,
) -> Result<u32, UpdateError> {
    cas::update(
        store,
        key,
        MAX_CAS_ATTEMPTS,
        |current: Option<Generation>| {
            let current = current.unwrap_or_default();
            if current.number != 0 && current.fingerprint == fingerprint {
                return Step::Keep(current.number);
            }
            let next = Generation {
                number: current.number.wrapping_add(1).max(1),
                fingerprint,
            };
            Step::Write(next, next.number)
        },
    )
    .map(|updated| updated.value)
}

/// Whether generation `number` is still the current one. `None` when the store cannot say.
pub fn is_current<S: SharedStore + ?Sized>(store: &S, key: &str, number: u32) -> Option<bool> {
    match cas::read::<12, Generation, _>(store, key) {
        Ok(Some((current, _))) => Some(current.number == number),
        Ok(None) => Some(false),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fake::FakeStore;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn a_reload_supersedes_every_root_of_the_config_before() {
        let store = FakeStore::new();
        // Two workers load config A, then two load B, then A comes back.
        let a1 = adopt(&store, "g", 0xa).unwrap();
        let a2 = adopt(&store, "g", 0xa).unwrap();
        assert_eq!(a1, a2, "workers of one load share a generation");
        assert_eq!(is_current(&store, "g", a1), Some(true));
        let b = adopt(&store, "g", 0xb).unwrap();
        assert_eq!(adopt(&store, "g", 0xb).unwrap(), b);
        assert_eq!(
            is_current(&store, "g", a1),
            Some(false),
            "A's roots are superseded"
        );
        let a_again = adopt(&store, "g", 0xa).unwrap();
        assert!(a_again > b);
        assert_eq!(
            is_current(&store, "g", a1),
            Some(false),
            "the first A's roots stay superseded"
        );
        assert_eq!(is_current(&store, "g", b), Some(false));
        assert_eq!(is_current(&store, "g", a_again), Some(true));
    }
}
