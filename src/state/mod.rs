//! State that all of Envoy's workers share: fixed-size binary records in proxy shared data,
//! updated by a bounded compare-and-swap loop.
//!
//! Envoy runs one Wasm VM per worker; proxy shared data is the only state they share: one
//! process-wide map behind one mutex, with optimistic CAS, no delete and no TTL. The core reaches
//! it through the small [`SharedStore`] trait, which the host implements on shared data and
//! [`fake::FakeStore`] implements in memory with the same semantics, including an injectable
//! interleaving of other workers, so every policy is tested against concurrent writers.

pub mod cas;
pub mod fake;
pub mod fields;
pub mod generation;
pub mod slots;
pub mod window;

use core::fmt;

/// The version token a read returns and a conditional write must present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cas(pub u32);

/// What a read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The key has never been written.
    Missing,
    /// The key holds `len` bytes (copied into the caller's buffer up to its size) at version `cas`.
    Found { len: usize, cas: Option<Cas> },
}

/// Why a shared-data call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Another worker wrote the key since it was read.
    CasMismatch,
    /// The host answered with an unexpected status.
    Host(u32),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::CasMismatch => f.write_str("the value changed since it was read"),
            StoreError::Host(status) => write!(f, "shared data call failed with status {status}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// Proxy shared data as the core needs it: read with a version, write conditionally on it.
///
/// Envoy's semantics, which the fake copies: a write with `cas: None` is unconditional; a write
/// with a version fails with [`StoreError::CasMismatch`] if the key changed since; a write to a
/// key that does not exist yet always succeeds, whatever version it presents. That last rule makes
/// the first insert of a key racy, which is why policies create their keys at configure time
/// ([`cas::ensure`]) and the request path only ever updates existing keys.
pub trait SharedStore {
    /// Copies the value of `key` into `out` (as much as fits) and returns its length and version.
    fn get(&self, key: &str, out: &mut [u8]) -> Result<Lookup, StoreError>;

    /// Writes `value`, conditionally on `cas` when given.
    fn set(&self, key: &str, value: &[u8], cas: Option<Cas>) -> Result<(), StoreError>;
}

impl<S: SharedStore + ?Sized> SharedStore for &S {
    fn get(&self, key: &str, out: &mut [u8]) -> Result<Lookup, StoreError> {
        (**self).get(key, out)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<Cas>) -> Result<(), StoreError> {
        (**self).set(key, value, cas)
    }
}
