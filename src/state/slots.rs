//! Shared-data keys for per-client state, from a fixed table of slots.
//!
//! Shared data has no delete and no TTL, so a key made from a client's header value would let
//! clients grow Envoy's memory without bound. Instead a client key is hashed into one of
//! `max_keys` slots fixed by config, and the shared-data key names the slot, not the client:
//! `<prefix><slot>`. The number of keys is bounded whatever clients send. The key string is
//! written into a stack buffer, so building it allocates nothing.

use core::fmt;

/// The longest prefix a slot table accepts; with ten digits of slot number it fits [`KeyBuf`].
pub const MAX_PREFIX: usize = KeyBuf::CAPACITY - 10;

/// A table of `slots` shared-data keys sharing one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotTable {
    prefix: String,
    slots: u32,
}

/// The prefix is too long for [`KeyBuf`], or the table has no slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadSlotTable;

impl fmt::Display for BadSlotTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "expected at least one slot and a key prefix of at most {MAX_PREFIX} bytes"
        )
    }
}

impl SlotTable {
    pub fn new(prefix: impl Into<String>, slots: u32) -> Result<Self, BadSlotTable> {
        let prefix = prefix.into();
        if slots == 0 || prefix.len() > MAX_PREFIX {
            return Err(BadSlotTable);
        }
        Ok(SlotTable { prefix, slots })
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Maps a hash onto a slot without the bias of `%` (Lemire's multiply-shift).
    pub fn slot_of(&self, hash: u64) -> u32 {
        ((u128::from(hash) * u128::from(self.slots)) >> 64) as u32
    }

    /// Writes the key of `slot` into `buffer` and returns it.
    pub fn key<'b>(&self, slot: u32, buffer: &'b mut KeyBuf) -> &'b str {
        buffer.clear();
        buffer.push(self.prefix.as_bytes());
        buffer.push_decimal(slot);
        buffer.as_str()
    }
}

/// A shared-data key built on the stack.
pub struct KeyBuf {
    bytes: [u8; KeyBuf::CAPACITY],
    len: usize,
}

impl Default for KeyBuf {
    fn default() -> Self {
        KeyBuf {
            bytes: [0; KeyBuf::CAPACITY],
            len: 0,
        }
    }
}

impl KeyBuf {
    /// Enough for every key seawall builds from two names of at most 64 bytes (the plugin's and
    /// a policy's), its fixed parts and a ten-digit slot: `sw:<plugin>:rl:<policy>:<slot>`.
    pub const CAPACITY: usize = 160;

    fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends what fits; [`SlotTable::new`] guarantees that everything does.
    fn push(&mut self, bytes: &[u8]) {
        let room = KeyBuf::CAPACITY - self.len;
        let taken = bytes.len().min(room);
        self.bytes[self.len..self.len + taken].copy_from_slice(&bytes[..taken]);
        self.len += taken;
    }

    fn push_decimal(&mut self, value: u32) {
        self.push(crate::wire::Decimal::new(u64::from(value)).as_bytes());
    }

    fn as_str(&self) -> &str {
        // Only ASCII digits and a validated UTF-8 prefix are ever pushed.
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }
}

/// FNV-1a over the key parts with a separator byte between them, seeded per config. Not
/// cryptographic: a client that finds collisions only shares a bucket with itself.
pub fn hash_parts(seed: u64, parts: &[&[u8]]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = 0xcbf2_9ce4_8422_2325 ^ seed;
    for part in parts {
        for &byte in *part {
            hash = (hash ^ u64::from(byte)).wrapping_mul(PRIME);
        }
        hash = (hash ^ 0xff).wrapping_mul(PRIME);
    }
    // A final avalanche so the high bits that `slot_of` uses depend on every byte.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn keys_name_the_slot() {
        let table = SlotTable::new("sw:rl:per-user:", 10_000).unwrap();
        let mut buffer = KeyBuf::default();
        assert_eq!(table.key(0, &mut buffer), "sw:rl:per-user:0");
        assert_eq!(table.key(9_999, &mut buffer), "sw:rl:per-user:9999");
        assert_eq!(
            table.key(u32::MAX, &mut buffer),
            "sw:rl:per-user:4294967295"
        );
    }

    #[test]
    fn tables_refuse_what_does_not_fit() {
        assert_eq!(SlotTable::new("x", 0), Err(BadSlotTable));
        assert_eq!(
            SlotTable::new("x".repeat(MAX_PREFIX + 1), 1),
            Err(BadSlotTable)
        );
        assert!(SlotTable::new("x".repeat(MAX_PREFIX), u32::MAX).is_ok());
    }

    #[test]
    fn part_boundaries_matter() {
        assert_ne!(hash_parts(0, &[b"ab", b"c"]), hash_parts(0, &[b"a", b"bc"]));
        assert_ne!(hash_parts(1, &[b"ab"]), hash_parts(2, &[b"ab"]));
    }

    #[test]
    fn slots_spread_evenly() {
        let table = SlotTable::new("k", 16).unwrap();
        let mut counts = [0u32; 16];
        for i in 0..16_000u32 {
            counts[table.slot_of(hash_parts(7, &[&i.to_le_bytes()])) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    proptest! {
        #[test]
        fn every_hash_lands_in_the_table(hash in any::<u64>(), slots in 1u32..1_000_000) {
            let table = SlotTable::new("k", slots).unwrap();
            prop_assert!(table.slot_of(hash) < slots);
        }

        #[test]
        fn any_bytes_hash_without_panicking(parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..4)) {
            let views: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            let _ = hash_parts(3, &views);
        }
    }
}
