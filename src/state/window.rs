//! The one rolling window that every policy counts in: the breaker's outcomes, the retry budget's
//! requests and retries, and degradation's health and admission tallies.
//!
//! A window is [`BUCKETS`] buckets, each stamped with the number of the bucket span it counts
//! (time divided by the span, which the caller owns). The bucket of number `n` sits at
//! `n % BUCKETS`; a bucket whose stamp is not `n` is stale and is emptied before it is reused, so
//! nothing expires on a timer and the window never needs a key per period. The window covers the
//! `BUCKETS` numbers ending at the one asked about.
//!
//! Clock steps follow from the stamps. A step forward expires every bucket it skips. A step back
//! leaves the buckets written under the later clock out of every total (they are in the future)
//! until their slot is reused, so a step back can forget at most one window of counts and never
//! counts a bucket twice or keeps one forever.

use super::fields;

/// Buckets in every window: rates are exact to a tenth of the window.
pub const BUCKETS: usize = 10;

/// What one bucket counts: a few saturating counters with a fixed little-endian layout.
pub trait Counts: Copy + PartialEq {
    /// Bytes of one encoded bucket's counts.
    const LEN: usize;
    /// A bucket that counted nothing.
    const ZERO: Self;
    /// Adds `other` into `self`, saturating.
    fn merge(&mut self, other: &Self);
    /// Writes exactly `LEN` bytes into `out`.
    fn write(&self, out: &mut [u8]);
    /// Reads what [`Counts::write`] wrote.
    fn read(bytes: &[u8]) -> Self;
}

/// [`BUCKETS`] stamped buckets of `C`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window<C> {
    buckets: [(u64, C); BUCKETS],
}

impl<C: Counts> Default for Window<C> {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl<C: Counts> Window<C> {
    /// A window that counted nothing.
    pub const EMPTY: Self = Window {
        buckets: [(0, C::ZERO); BUCKETS],
    };

    /// Bytes of the encoded window: each bucket's stamp and counts.
    pub const LEN: usize = BUCKETS * (8 + C::LEN);

    /// The bucket that counts `number`, emptied first if it held another number.
    pub fn current(&mut self, number: u64) -> &mut C {
        let (stamp, counts) = &mut self.buckets[slot(number)];
        if *stamp != number {
            *stamp = number;
            *counts = C::ZERO;
        }
        counts
    }

    /// Adds `counts` to the bucket of `number`.
    pub fn add(&mut self, number: u64, counts: &C) {
        self.current(number).merge(counts);
    }

    /// The bucket that counted `number`, if it still does (it has not been reused since).
    pub fn counted(&mut self, number: u64) -> Option<&mut C> {
        let (stamp, counts) = &mut self.buckets[slot(number)];
        (*stamp == number).then_some(counts)
    }

    /// The sum of the buckets of the window that ends at `number`.
    pub fn totals(&self, number: u64) -> C {
        let mut totals = C::ZERO;
        for (_, counts) in self.live(number) {
            totals.merge(counts);
        }
        totals
    }

    /// Whether the window that ends at `number` remembers nothing.
    pub fn is_empty_at(&self, number: u64) -> bool {
        self.live(number).all(|(_, counts)| *counts == C::ZERO)
    }

    /// The buckets of the window that ends at `number`. Only a bucket in the slot its number maps
    /// to counts: a window this code wrote never has another, and a corrupt or foreign record
    /// that repeats a number in a second slot would otherwise count it twice.
    fn live(&self, number: u64) -> impl Iterator<Item = &(u64, C)> {
        let oldest = number.saturating_sub(BUCKETS as u64 - 1);
        self.buckets
            .iter()
            .enumerate()
            .filter(move |(index, (stamp, _))| {
                (oldest..=number).contains(stamp) && slot(*stamp) == *index
            })
            .map(|(_, bucket)| bucket)
    }

    /// Writes exactly [`Window::LEN`] bytes into `out`.
    pub fn write(&self, out: &mut [u8]) {
        for (chunk, (stamp, counts)) in out.chunks_exact_mut(8 + C::LEN).zip(&self.buckets) {
            fields::put(chunk, 0, *stamp);
            counts.write(&mut chunk[8..]);
        }
    }

    /// Reads what [`Window::write`] wrote.
    pub fn read(bytes: &[u8]) -> Self {
        let mut window = Self::EMPTY;
        for (chunk, (stamp, counts)) in bytes.chunks_exact(8 + C::LEN).zip(&mut window.buckets) {
            *stamp = fields::get(chunk, 0);
            *counts = C::read(&chunk[8..]);
        }
        window
    }
}

fn slot(number: u64) -> usize {
    (number % BUCKETS as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    struct Hits(u32);

    impl Counts for Hits {
        const LEN: usize = 4;
        const ZERO: Self = Hits(0);
        fn merge(&mut self, other: &Self) {
            self.0 = self.0.saturating_add(other.0);
        }
        fn write(&self, out: &mut [u8]) {
            fields::put(out, 0, self.0);
        }
        fn read(bytes: &[u8]) -> Self {
            Hits(fields::get(bytes, 0))
        }
    }

    #[test]
    fn the_window_forgets_buckets_older_than_itself() {
        let mut window = Window::<Hits>::default();
        window.add(100, &Hits(5));
        window.add(105, &Hits(1));
        assert_eq!(window.totals(105), Hits(6));
        assert_eq!(window.totals(109), Hits(6));
        assert_eq!(window.totals(110), Hits(1), "bucket 100 fell out");
        window.add(110, &Hits(2));
        assert_eq!(window.totals(110), Hits(3), "bucket 100's slot was reused");
        assert!(window.is_empty_at(120));
        assert!(!window.is_empty_at(119));
    }

    #[test]
    fn a_clock_that_steps_back_leaves_out_the_future_and_counts_nothing_twice() {
        let mut window = Window::<Hits>::default();
        window.add(1_000, &Hits(7));
        // The clock steps back by an hour's worth of buckets: the later count is in the future.
        assert_eq!(window.totals(640), Hits(0));
        window.add(640, &Hits(1));
        assert_eq!(window.totals(640), Hits(1));
        // Reaching 1000 again, the slot of 1000 holds 640's count now, long expired.
        assert_eq!(window.totals(1_000), Hits(0));
    }

    /// Found by the `records` fuzz target: a corrupt retry-budget record held one bucket number in
    /// two slots, the window counted it twice, and the first grant's write, which reset the
    /// misplaced slot, suddenly freed that count: 318 retries granted from a read of 3.
    #[test]
    fn a_number_in_a_slot_it_does_not_map_to_is_not_counted() {
        let mut window = Window::<Hits>::default();
        window.add(17, &Hits(5));
        // Slot 4 claims number 17, which maps to slot 7: only a corrupt record looks like this.
        window.buckets[4] = (17, Hits(1_000));
        assert_eq!(window.totals(17), Hits(5));
        assert_eq!(window.totals(19), Hits(5));
        assert!(!window.is_empty_at(17));
    }

    #[test]
    fn a_bucket_is_found_again_only_while_it_counts_its_number() {
        let mut window = Window::<Hits>::default();
        window.add(3, &Hits(4));
        assert_eq!(window.counted(3).map(|hits| *hits), Some(Hits(4)));
        window.add(13, &Hits(1));
        assert_eq!(window.counted(3), None, "reused for 13");
    }

    #[test]
    fn windows_survive_encoding() {
        let mut window = Window::<Hits>::default();
        window.add(41, &Hits(9));
        window.add(42, &Hits(u32::MAX));
        window.add(42, &Hits(1));
        let mut bytes = [0u8; Window::<Hits>::LEN];
        window.write(&mut bytes);
        assert_eq!(Window::<Hits>::read(&bytes), window);
        assert_eq!(window.totals(42), Hits(u32::MAX), "saturates");
    }
}
