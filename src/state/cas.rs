//! The one way the core changes shared state: read a fixed-size record, decide, write it back on
//! the version that was read, and retry a bounded number of times when another worker got there
//! first.
//!
//! A policy's decision is a pure function of the record it read, so a lost race is simply decided
//! again on the fresher record. The bound keeps a hot key from spinning a worker; what happens when
//! it runs out (fail open or fail closed) is the caller's named choice, and the attempts are
//! returned so callers can count contention.

use super::{Cas, Lookup, SharedStore, StoreError};
use core::fmt;

/// A policy's state as a fixed-size little-endian record. Fixed size keeps reads into a stack
/// buffer and makes a truncated value detectable by its length.
///
/// Every record is stored behind one layout byte, [`Record::LAYOUT`], which names the record's
/// kind and the version of its layout. Shared data outlives a plugin build (a new Wasm module is
/// loaded into the same Envoy), so a record written by another build, or by another kind under
/// the same key, is recognised and treated as absent rather than misread. A layout change bumps
/// the byte.
pub trait Record<const N: usize>: Sized {
    /// The kind and layout version, unique among records.
    const LAYOUT: u8;
    fn encode(&self) -> [u8; N];
    fn decode(bytes: &[u8; N]) -> Self;
}

/// Bytes of the largest stored record, its layout byte included.
pub const MAX_STORED: usize = 512;

/// The stored form of a record: its layout byte, then its bytes.
struct Stored {
    bytes: [u8; MAX_STORED],
    len: usize,
}

impl Stored {
    fn of<const N: usize, R: Record<N>>(record: &R) -> Self {
        const { assert!(N < MAX_STORED, "record larger than MAX_STORED") };
        let mut bytes = [0u8; MAX_STORED];
        bytes[0] = R::LAYOUT;
        bytes[1..=N].copy_from_slice(&record.encode());
        Stored { bytes, len: N + 1 }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Decodes what a read of `len` bytes left in `buffer`, if it is a record of `R`'s layout.
fn decode_stored<const N: usize, R: Record<N>>(buffer: &[u8; MAX_STORED], len: usize) -> Option<R> {
    if len != N + 1 || buffer[0] != R::LAYOUT {
        return None;
    }
    let bytes: &[u8; N] = buffer[1..=N].try_into().ok()?;
    Some(R::decode(bytes))
}

/// What the decision function wants done with the record it was shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<R, T> {
    /// Write this record (conditionally on the version read) and return `T` if the write lands.
    Write(R, T),
    /// Leave the record as it is and return `T`; no write, so no race to lose.
    Keep(T),
}

/// A decision that landed, and how many reads it took (1 when there was no contention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Updated<T> {
    pub value: T,
    pub attempts: u32,
}

/// Why no decision landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateError {
    /// Every attempt lost its race to another worker.
    Exhausted { attempts: u32 },
    /// The store failed.
    Store(StoreError),
}

impl fmt::Display for UpdateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateError::Exhausted { attempts } => {
                write!(f, "gave up after {attempts} lost compare-and-swap races")
            }
            UpdateError::Store(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for UpdateError {}

/// Reads `key`, lets `decide` choose, and writes on the version read; at most `max_attempts`
/// reads. `decide` sees `None` when the key is missing or holds a value of another size or
/// layout, which it treats as fresh state (the write then replaces it).
pub fn update<const N: usize, R, T, S>(
    store: &S,
    key: &str,
    max_attempts: u32,
    mut decide: impl FnMut(Option<R>) -> Step<R, T>,
) -> Result<Updated<T>, UpdateError>
where
    R: Record<N>,
    S: SharedStore + ?Sized,
{
    for attempt in 1..=max_attempts {
        let mut buffer = [0u8; MAX_STORED];
        let (current, cas) = match store.get(key, &mut buffer).map_err(UpdateError::Store)? {
            Lookup::Found { len, cas } => (decode_stored::<N, R>(&buffer, len), cas),
            Lookup::Missing => (None, None),
        };
        match decide(current) {
            Step::Keep(value) => {
                return Ok(Updated {
                    value,
                    attempts: attempt,
                })
            }
            Step::Write(record, value) => match store.set(key, Stored::of(&record).as_slice(), cas)
            {
                Ok(()) => {
                    return Ok(Updated {
                        value,
                        attempts: attempt,
                    })
                }
                Err(StoreError::CasMismatch) => continue,
                Err(error) => return Err(UpdateError::Store(error)),
            },
        }
    }
    Err(UpdateError::Exhausted {
        attempts: max_attempts,
    })
}

/// Creates `key` with `initial` unless it already holds a record of the right size and layout; returns
/// whether it wrote. Run at configure time, so the request path never inserts (see
/// [`SharedStore`] on why inserts race). A key that survives a config reload keeps its state.
pub fn ensure<const N: usize, R, S>(store: &S, key: &str, initial: &R) -> Result<bool, StoreError>
where
    R: Record<N>,
    S: SharedStore + ?Sized,
{
    let mut buffer = [0u8; MAX_STORED];
    let initial = Stored::of(initial);
    match store.get(key, &mut buffer)? {
        Lookup::Found { len, cas } => match decode_stored::<N, R>(&buffer, len) {
            Some(_) => Ok(false),
            None => store.set(key, initial.as_slice(), cas).map(|()| true),
        },
        Lookup::Missing => store.set(key, initial.as_slice(), None).map(|()| true),
    }
}

/// Reads `key` without changing it.
pub fn read<const N: usize, R, S>(
    store: &S,
    key: &str,
) -> Result<Option<(R, Option<Cas>)>, StoreError>
where
    R: Record<N>,
    S: SharedStore + ?Sized,
{
    let mut buffer = [0u8; MAX_STORED];
    match store.get(key, &mut buffer)? {
        Lookup::Found { len, cas } => Ok(decode_stored::<N, R>(&buffer, len).map(|r| (r, cas))),
        Lookup::Missing => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fake::FakeStore;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Counter(u64);

    impl Record<8> for Counter {
        const LAYOUT: u8 = 0xf1;
        fn encode(&self) -> [u8; 8] {
            self.0.to_le_bytes()
        }
        fn decode(bytes: &[u8; 8]) -> Self {
            Counter(u64::from_le_bytes(*bytes))
        }
    }

    fn bump(store: &FakeStore, max_attempts: u32) -> Result<Updated<u64>, UpdateError> {
        update(
            store,
            "counter",
            max_attempts,
            |current: Option<Counter>| {
                let next = current.map_or(1, |c| c.0 + 1);
                Step::Write(Counter(next), next)
            },
        )
    }

    #[test]
    fn an_uncontended_update_takes_one_read_and_one_write() {
        let store = FakeStore::new();
        ensure(&store, "counter", &Counter(0)).unwrap();
        let before = store.counts();
        assert_eq!(
            bump(&store, 4),
            Ok(Updated {
                value: 1,
                attempts: 1
            })
        );
        let after = store.counts();
        assert_eq!((after.gets - before.gets, after.sets - before.sets), (1, 1));
    }

    #[test]
    fn a_lost_race_is_decided_again_on_the_fresh_record() {
        let store = FakeStore::new();
        ensure(&store, "counter", &Counter(0)).unwrap();
        // Another worker increments between this worker's read and its write, twice.
        let mut remaining = 2;
        store.interfere(move |other| {
            if remaining > 0 {
                remaining -= 1;
                bump(other, 1).unwrap();
            }
        });
        let outcome = bump(&store, 4).unwrap();
        assert_eq!(
            outcome,
            Updated {
                value: 3,
                attempts: 3
            }
        );
        assert_eq!(
            read::<8, Counter, _>(&store, "counter")
                .unwrap()
                .map(|(c, _)| c),
            Some(Counter(3))
        );
        assert_eq!(store.counts().cas_mismatches, 2);
    }

    #[test]
    fn the_loop_is_bounded_and_says_so() {
        let store = FakeStore::new();
        ensure(&store, "counter", &Counter(0)).unwrap();
        store.interfere(|other| {
            bump(other, 1).unwrap();
        });
        assert_eq!(bump(&store, 3), Err(UpdateError::Exhausted { attempts: 3 }));
        assert_eq!(store.counts().cas_mismatches, 3);
    }

    #[test]
    fn keep_writes_nothing() {
        let store = FakeStore::new();
        ensure(&store, "counter", &Counter(5)).unwrap();
        let before = store.counts();
        let outcome = update(&store, "counter", 3, |current: Option<Counter>| {
            Step::Keep(current)
        });
        assert_eq!(outcome.map(|u| u.value), Ok(Some(Counter(5))));
        assert_eq!(store.counts().sets, before.sets);
    }

    #[test]
    fn a_value_of_the_wrong_size_is_fresh_state() {
        let store = FakeStore::new();
        store.set("counter", b"abc", None).unwrap();
        assert_eq!(bump(&store, 2).map(|u| u.value), Ok(1));
        assert!(ensure(&store, "counter", &Counter(9)).is_ok_and(|wrote| !wrote));
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct OtherKind(u64);

    impl Record<8> for OtherKind {
        const LAYOUT: u8 = 0xf2;
        fn encode(&self) -> [u8; 8] {
            self.0.to_le_bytes()
        }
        fn decode(bytes: &[u8; 8]) -> Self {
            OtherKind(u64::from_le_bytes(*bytes))
        }
    }

    /// A record of the same size written by another build or kind (an older layout left in
    /// shared data by the previous Wasm module) is never misread as this one.
    #[test]
    fn a_record_of_another_layout_is_fresh_state_and_is_replaced() {
        let store = FakeStore::new();
        ensure(&store, "counter", &OtherKind(41)).unwrap();
        assert_eq!(read::<8, Counter, _>(&store, "counter"), Ok(None));
        assert_eq!(ensure(&store, "counter", &Counter(7)), Ok(true), "replaced");
        assert_eq!(bump(&store, 2).map(|u| u.value), Ok(8));
        let mut raw = [0u8; 16];
        assert!(matches!(
            store.get("counter", &mut raw),
            Ok(Lookup::Found { len: 9, .. })
        ));
        assert_eq!(raw[0], Counter::LAYOUT, "the layout byte leads");
    }

    #[test]
    fn ensure_keeps_existing_state_across_reloads() {
        let store = FakeStore::new();
        assert_eq!(ensure(&store, "counter", &Counter(0)), Ok(true));
        bump(&store, 1).unwrap();
        assert_eq!(ensure(&store, "counter", &Counter(0)), Ok(false));
        assert_eq!(
            read::<8, Counter, _>(&store, "counter")
                .unwrap()
                .map(|(c, _)| c),
            Some(Counter(1))
        );
    }

    #[test]
    fn store_failures_surface() {
        let store = FakeStore::new();
        ensure(&store, "counter", &Counter(0)).unwrap();
        store.fail_next(1, StoreError::Host(2));
        assert_eq!(
            bump(&store, 3),
            Err(UpdateError::Store(StoreError::Host(2)))
        );
        assert_eq!(bump(&store, 3).map(|u| u.value), Ok(1));
    }
}
