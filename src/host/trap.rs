//! Test-only (`--features trap-on-header`, never shipped): a request carrying
//! `x-seawall-test-trap: 1` makes the VM trap, the one way to fail a VM on demand in real Envoy.
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
