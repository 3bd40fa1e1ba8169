//! Test-only (`--features trap-on-header`, never shipped): a request carrying
//! `x-seawall-test-trap: 1` makes the VM trap, the one way to fail a VM on demand in real Envoy;
//! one carrying `x-seawall-test-stall-ms: N` holds its worker for N ms between reading the clock
//! and deciding, as a worker descheduled there would be, the one way to make a worker decide on
//! shared data with an older reading than another's in real Envoy (integration/tests/rate_limit.rs).
//!
//! seawall itself has no panic on the request path (the crate denies `unwrap`, `expect` and
//! `panic`), so without this there would be no way to show what Envoy's Wasm `failure_policy`
//! does to traffic and to shared data when a VM fails (integration/tests/vm_failure.rs). Without
//! the feature `on_request` is empty and inlined away, and costs no host call.

/// The header that triggers the trap, and the value it must have.
#[cfg(feature = "trap-on-header")]
const TRAP_HEADER: &str = "x-seawall-test-trap";
#[cfg(feature = "trap-on-header")]
const TRAP_VALUE: &[u8] = b"1";

/// The header that asks for a stall after the clock is read, and its longest honoured value.
#[cfg(feature = "trap-on-header")]
const STALL_HEADER: &str = "x-seawall-test-stall-ms";
#[cfg(feature = "trap-on-header")]
const LONGEST_STALL_MS: u64 = 1_000;

/// Holds the worker until `read_at` (the clock reading its decision will use) plus what the
/// current request asks for, spinning on the clock: nothing else runs on this worker meanwhile,
/// while the other workers go on deciding with later readings.
#[inline(always)]
pub fn stall_after_reading_the_clock(read_at: u64) {
    #[cfg(feature = "trap-on-header")]
    if let Some(ms) = super::abi::request_header(STALL_HEADER)
        .and_then(|value| core::str::from_utf8(&value).ok()?.parse::<u64>().ok())
    {
        let until = read_at.saturating_add(ms.min(LONGEST_STALL_MS) * 1_000_000);
        while super::abi::now_nanos() < until {}
    }
    #[cfg(not(feature = "trap-on-header"))]
    let _ = read_at;
}

/// Traps if the current request asks for it: before seawall decides anything, so the trapping
/// request takes no token and settles no outcome, and the scenarios can count exactly.
#[inline(always)]
pub fn on_request() {
    #[cfg(feature = "trap-on-header")]
    if super::abi::request_header(TRAP_HEADER).as_deref() == Some(TRAP_VALUE) {
        // A Wasm `unreachable` instruction, not a Rust panic: no panic hook runs and nothing is
        // unwound, exactly as V8 sees a VM fault. Envoy marks the VM failed (RuntimeError).
        core::arch::wasm32::unreachable();
    }
}
