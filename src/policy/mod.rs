//! The policies' pure logic: no proxy-wasm, no clock of its own, no global state. Each takes the
//! time and the shared store as arguments and returns a decision as data.

pub mod circuit_breaker;
pub mod degradation;
pub mod fault;
pub mod global_limit;
pub mod key;
pub mod rate_limit;
pub mod retry;
pub mod rls_wire;
pub mod route;
