//! Nanoseconds per core decision, natively or compiled to wasm32 (run under Node by the target
//! runner): `cargo bench -p seawall --bench core [--target wasm32-wasip1 --no-default-features]`.
//! A plain timing loop, not criterion, so the same file runs on both targets with no extra crates.

// A test crate: a failed unwrap is how it reports a failed expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::time::Instant;

use seawall::clock::Timestamp;
use seawall::config::compile;
use seawall::engine::Engine;
use seawall::metrics::FakeMetrics;
use seawall::request::{Attribute, AttributeSource, RequestView, Scratch};
use seawall::state::fake::FakeStore;

/// Hands out one fresh buffer per read, as Envoy's host does through the guest allocator.
struct Preset(Vec<(Attribute, Vec<u8>)>);

impl AttributeSource for Preset {
    fn read(&mut self, attribute: &Attribute) -> Option<Vec<u8>> {
        self.0
            .iter()
            .find(|(a, _)| a == attribute)
            .map(|(_, v)| v.clone())
    }

    fn remove_header(&mut self, name: &str) {
        self.0
            .retain(|(a, _)| !matches!(a, Attribute::Header(h) if h == name));
    }
}

const CONFIG: &str = r#"{
    "routes": [
        {"name": "checkout", "match": {"path": {"prefix": "/api/checkout"}, "methods": ["POST"],
                                       "headers": [{"name": "x-tier", "exact": "free"}]}},
        {"name": "health", "match": {"path": {"exact": "/healthz"}}},
        {"name": "shop", "match": {"authority": "shop.example.com"}},
        {"name": "payments", "match": {"cluster": "payments"}},
        {"name": "v2", "match": {"path": {"prefix": "/api"}, "headers": [{"name": "x-ver", "prefix": "v2"}]}},
        {"name": "catch-all"}
    ]
}"#;

fn time(name: &str, iterations: u32, mut body: impl FnMut()) {
    for _ in 0..iterations / 10 {
        body();
    }
    let started = Instant::now();
    for _ in 0..iterations {
        body();
    }
    let nanos = started.elapsed().as_nanos() as f64 / f64::from(iterations);
    println!("{name:<40} {nanos:>9.1} ns/op");
}

fn main() {
    let mut metrics = FakeMetrics::new();
    let engine = Engine::new(compile(CONFIG.as_bytes()).unwrap(), &mut metrics).unwrap();
    let mut scratch = Scratch::for_plan(&engine.config().attributes);
    let values = vec![
        (Attribute::path(), b"/api/other?page=2".to_vec()),
        (Attribute::method(), b"GET".to_vec()),
        (Attribute::authority(), b"api.example.com".to_vec()),
        (Attribute::header("x-ver"), b"v1".to_vec()),
    ];
    let mut source = Preset(values);
    let store = FakeStore::new();
    time("route match, 6 routes, falls to catch-all", 200_000, || {
        let mut view = RequestView::new(&engine.config().attributes, &mut source, &mut scratch);
        black_box(engine.on_request(&mut view, Timestamp::from_nanos(1), &store, &metrics));
    });
    time("config compile (configure time)", 2_000, || {
        black_box(compile(black_box(CONFIG.as_bytes())).ok());
    });
}
