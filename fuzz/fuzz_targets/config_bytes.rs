//! Arbitrary bytes into the config compiler, as Envoy hands `on_configure` whatever the operator
//! (or a broken control plane) sent.
//!
//! Asserts: `compile` returns a config or errors and never panics; a config that compiles
//! compiles again to an equal config (nothing in compilation depends on anything but the bytes),
//! and builds an `Engine` (its metric names) without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

use seawall::config::compile;
use seawall::engine::Engine;
use seawall::metrics::FakeMetrics;

fuzz_target!(|data: &[u8]| {
    match compile(data) {
        Ok(config) => {
            let again = compile(data).expect("compiled once, so compiles again");
            assert_eq!(config, again, "compiling twice gave different configs");
            let _ = Engine::new(config, &mut FakeMetrics::new());
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error result with no errors");
            for error in errors.iter() {
                let _ = error.to_string();
            }
        }
    }
});
