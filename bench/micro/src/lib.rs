//! Criterion microbenchmarks of seawall's core decisions live in `benches/decisions.rs`; this
//! crate keeps criterion out of the seawall crate's own dependencies (and its wasm32 tests).
