//! An in-memory [`SharedStore`] with Envoy's shared-data semantics, for tests of every policy.
//!
//! Two ways to make workers race. [`FakeStore::interfere`] runs another worker's code between this
//! worker's read and its write, deterministically, on any target (wasm32 included). And the store
//! is `Sync`, so native tests can also hammer it from real threads. It counts reads, writes and lost
//! races, so tests can hold each policy to its budget of shared-data calls.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{Cas, Lookup, SharedStore, StoreError};

type Interference = Box<dyn FnMut(&FakeStore) + Send>;

/// How many calls the store has served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounts {
    pub gets: u64,
    pub sets: u64,
    pub cas_mismatches: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, (Vec<u8>, u32)>,
    /// Envoy's counter starts at 1 and skips 0 on wrap; 0 means "no version".
    next_cas: u32,
    counts: StoreCounts,
    failures: Vec<StoreError>,
}

/// Proxy shared data in memory.
#[derive(Default)]
pub struct FakeStore {
    inner: Mutex<Inner>,
    interference: Mutex<Option<Interference>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock has already failed; keep the data usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FakeStore {
    pub fn new() -> Self {
        FakeStore::default()
    }

    /// Runs `other` just before every write, as if another worker ran its code between this
    /// worker's read and its write. Inside `other` the interference is switched off, so its own
    /// writes are not interfered with.
    pub fn interfere(&self, other: impl FnMut(&FakeStore) + Send + 'static) {
        *lock(&self.interference) = Some(Box::new(other));
    }

    pub fn stop_interfering(&self) {
        *lock(&self.interference) = None;
    }

    /// The next `count` calls fail with `error`.
    pub fn fail_next(&self, count: usize, error: StoreError) {
        lock(&self.inner)
            .failures
            .extend(std::iter::repeat_n(error, count));
    }

    pub fn counts(&self) -> StoreCounts {
        lock(&self.inner).counts
    }

    /// How many keys exist: shared data has no delete, so this only grows.
    pub fn key_count(&self) -> usize {
        lock(&self.inner).map.len()
    }

    pub fn keys_with_prefix(&self, prefix: &str) -> usize {
        lock(&self.inner)
            .map
            .keys()
            .filter(|k| k.starts_with(prefix))
            .count()
    }

    pub fn raw(&self, key: &str) -> Option<Vec<u8>> {
        lock(&self.inner).map.get(key).map(|(v, _)| v.clone())
    }

    /// Every key with its value, sorted by key: what a tool shows of the state a request touched.
    pub fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
        let mut all: Vec<(String, Vec<u8>)> = lock(&self.inner)
            .map
            .iter()
            .map(|(key, (value, _))| (key.clone(), value.clone()))
            .collect();
        all.sort();
        all
    }

    fn take_failure(inner: &mut Inner) -> Option<StoreError> {
        (!inner.failures.is_empty()).then(|| inner.failures.remove(0))
    }

    fn run_interference(&self) {
        let taken = lock(&self.interference).take();
        if let Some(mut other) = taken {
            other(self);
            let mut slot = lock(&self.interference);
            // Keep a replacement installed from inside `other`; otherwise restore it.
            if slot.is_none() {
                *slot = Some(other);
            }
        }
    }
}

impl SharedStore for FakeStore {
    fn get(&self, key: &str, out: &mut [u8]) -> Result<Lookup, StoreError> {
        let mut inner = lock(&self.inner);
        inner.counts.gets += 1;
        if let Some(error) = FakeStore::take_failure(&mut inner) {
            return Err(error);
        }
        match inner.map.get(key) {
            None => Ok(Lookup::Missing),
            Some((value, cas)) => {
                let copied = value.len().min(out.len());
                out[..copied].copy_from_slice(&value[..copied]);
                Ok(Lookup::Found {
                    len: value.len(),
                    cas: Some(Cas(*cas)),
                })
            }
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<Cas>) -> Result<(), StoreError> {
        self.run_interference();
        let mut inner = lock(&self.inner);
        inner.counts.sets += 1;
        if let Some(error) = FakeStore::take_failure(&mut inner) {
            return Err(error);
        }
        let version = inner.next_cas.max(1);
        let inner = &mut *inner;
        match inner.map.get_mut(key) {
            Some((stored, stored_cas)) => {
                if let Some(Cas(expected)) = cas {
                    if expected != 0 && expected != *stored_cas {
                        inner.counts.cas_mismatches += 1;
                        return Err(StoreError::CasMismatch);
                    }
                }
                stored.clear();
                stored.extend_from_slice(value);
                *stored_cas = version;
            }
            // As in Envoy, an absent key is inserted whatever version the writer presents.
            None => {
                inner.map.insert(key.to_owned(), (value.to_vec(), version));
            }
        }
        inner.next_cas = version.wrapping_add(1).max(1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn versions_guard_writes() {
        let store = FakeStore::new();
        let mut out = [0u8; 4];
        assert_eq!(store.get("k", &mut out), Ok(Lookup::Missing));
        store.set("k", b"one", None).unwrap();
        let Ok(Lookup::Found {
            len: 3,
            cas: Some(first),
        }) = store.get("k", &mut out)
        else {
            unreachable!("the key was just written")
        };
        assert_eq!(&out[..3], b"one");
        store.set("k", b"two", Some(first)).unwrap();
        assert_eq!(
            store.set("k", b"old", Some(first)),
            Err(StoreError::CasMismatch)
        );
        assert_eq!(store.raw("k").as_deref(), Some(&b"two"[..]));
    }

    #[test]
    fn an_absent_key_is_inserted_whatever_the_version() {
        let store = FakeStore::new();
        store.set("k", b"x", Some(Cas(12345))).unwrap();
        assert_eq!(store.raw("k").as_deref(), Some(&b"x"[..]));
    }

    #[test]
    fn reads_copy_only_what_fits() {
        let store = FakeStore::new();
        store.set("k", b"abcdef", None).unwrap();
        let mut out = [0u8; 2];
        assert!(matches!(
            store.get("k", &mut out),
            Ok(Lookup::Found { len: 6, .. })
        ));
        assert_eq!(&out, b"ab");
    }

    #[cfg(not(target_family = "wasm"))]
    #[test]
    fn real_threads_never_lose_an_increment() {
        use crate::state::cas::{ensure, read, update, Record, Step};
        struct Count(u64);
        impl Record<8> for Count {
            /// Layout: test counter.
            const LAYOUT: u8 = 0xf3;
            fn encode(&self) -> [u8; 8] {
                self.0.to_le_bytes()
            }
            fn decode(bytes: &[u8; 8]) -> Self {
                Count(u64::from_le_bytes(*bytes))
            }
        }
        let store = std::sync::Arc::new(FakeStore::new());
        ensure(&*store, "n", &Count(0)).unwrap();
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        update(&*store, "n", 1000, |c: Option<Count>| {
                            Step::Write(Count(c.map_or(1, |c| c.0 + 1)), ())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        let total = read::<8, Count, _>(&*store, "n")
            .unwrap()
            .map(|(count, _)| count.0);
        assert_eq!(total, Some(4000));
    }
}
