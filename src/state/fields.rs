//! A record's fields at fixed offsets, little-endian: the one reader and writer every record's
//! encoding uses, so that each field's width follows from its type and is written once, rather
//! than an offset range and a byte conversion that can disagree.
//!
//! Records are fixed-size and their offsets constant, so a field never falls outside its record;
//! if one did, reading gives zero and writing does nothing, rather than a trap in Envoy's worker.

/// An integer stored in a record.
pub trait Field: Copy {
    const WIDTH: usize;
    fn write(self, out: &mut [u8]);
    fn read(bytes: &[u8]) -> Self;
}

macro_rules! little_endian_field {
    ($($integer:ty),*) => {$(
        impl Field for $integer {
            const WIDTH: usize = core::mem::size_of::<$integer>();
            fn write(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
            fn read(bytes: &[u8]) -> Self {
                let mut raw = [0u8; core::mem::size_of::<$integer>()];
                raw.copy_from_slice(bytes);
                <$integer>::from_le_bytes(raw)
            }
        }
    )*};
}

little_endian_field!(u8, u16, i16, u32, u64);

/// Writes `value` at byte `at` of `out`.
pub fn put<F: Field>(out: &mut [u8], at: usize, value: F) {
    if let Some(field) = at
        .checked_add(F::WIDTH)
        .and_then(|end| out.get_mut(at..end))
    {
        value.write(field);
    }
}

/// The field at byte `at` of `bytes`.
pub fn get<F: Field>(bytes: &[u8], at: usize) -> F {
    at.checked_add(F::WIDTH)
        .and_then(|end| bytes.get(at..end))
        .map_or_else(|| F::read(&[0u8; 8][..F::WIDTH]), F::read)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn fields_round_trip_little_endian_at_their_offsets() {
        let mut out = [0u8; 16];
        put(&mut out, 0, 0x0102_0304_0506_0708u64);
        put(&mut out, 8, 0x0a0b_0c0du32);
        put(&mut out, 12, -2i16);
        put(&mut out, 14, 0xbeefu16);
        assert_eq!(out[..8], [8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(out[8..12], [0x0d, 0x0c, 0x0b, 0x0a]);
        assert_eq!(get::<u64>(&out, 0), 0x0102_0304_0506_0708);
        assert_eq!(get::<u32>(&out, 8), 0x0a0b_0c0d);
        assert_eq!(get::<i16>(&out, 12), -2);
        assert_eq!(get::<u16>(&out, 14), 0xbeef);
    }

    #[test]
    fn a_field_past_the_end_reads_zero_and_writes_nothing() {
        let mut out = [7u8; 4];
        put(&mut out, 2, u64::MAX);
        put(&mut out, usize::MAX, 1u16);
        assert_eq!(out, [7; 4]);
        assert_eq!(get::<u64>(&out, 0), 0);
        assert_eq!(get::<u32>(&out, usize::MAX - 1), 0);
        assert_eq!(get::<u32>(&out, 0), 0x0707_0707);
    }
}
