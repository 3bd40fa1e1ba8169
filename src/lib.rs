//! Seawall: resilience policies for Envoy as one proxy-wasm HTTP filter.
//!
//! The crate splits in two. Everything except `host` is the *core*: pure Rust that never imports
//! proxy-wasm, takes the time and the shared store as arguments, and returns its decisions as data,
//! so it is tested natively and on wasm32 with a fake clock and a fake multi-worker store. `host` is
//! the thin glue that reads request attributes, talks to Envoy's shared data, metrics and logs, and
//! carries out the core's decisions. It is compiled only into the wasm32 plugin build.

pub mod clock;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod policy;
pub mod request;
pub mod state;
pub mod wire;

#[cfg(all(target_arch = "wasm32", feature = "plugin"))]
mod host;
