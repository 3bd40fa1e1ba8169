//! Nanoseconds per core decision, natively, through the whole engine (route match, policy,
//! shared-data record on the Envoy-faithful fake store): `cargo bench -p seawall-bench-micro`.
//! `cargo xtask bench` runs it and puts the figures in the report.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use seawall::clock::Timestamp;
use seawall::config::compile;
use seawall::engine::Engine;
use seawall::metrics::FakeMetrics;
use seawall::policy::circuit_breaker::ResponseFacts;
use seawall::policy::retry::ResponseHeaders;
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

struct Ok200;

impl ResponseFacts for Ok200 {
    fn status(&mut self) -> Option<u16> {
        Some(200)
    }
    fn flags(&mut self) -> u64 {
        0
    }
    fn grpc_status(&mut self) -> Option<u32> {
        None
    }
}

impl ResponseHeaders for Ok200 {
    fn header(&mut self, name: &str) -> Option<std::borrow::Cow<'_, [u8]>> {
        (name == "x-envoy-attempt-count").then_some(std::borrow::Cow::Borrowed(&b"1"[..]))
    }
}

const CONFIG: &str = r#"{
    "rate_limits": {
        "global": {"rate": "1000000000/s", "burst": 1000000000},
        "per-user": {"rate": "1000000000/s", "burst": 1000000000, "key": [{"header": "x-user"}], "max_keys": 1000},
        "tight": {"rate": "1/h", "burst": 1}
    },
    "circuit_breakers": {
        "closed": {"key": "route", "open_when": {"failure_rate": 50, "min_requests": 20}},
        "open": {"key": "route", "mode": "forced_open", "open_when": {"consecutive_failures": 1}}
    },
    "retries": {"budget": {"max_retries": 2}},
    "faults": {"never": {"abort": {"percent": 0}, "delay": {"fixed": "1s", "percent": 0}}},
    "degradation": {"calm": {"priority": {"header": "x-priority"},
                             "levels": [{"name": "degraded", "enter": {"failure_rate": 90, "p95_latency": "5s"},
                                         "shed_below": "normal"}]}},
    "routes": [
        {"name": "checkout", "match": {"path": {"prefix": "/api/checkout"}, "methods": ["POST"],
                                       "headers": [{"name": "x-tier", "exact": "free"}]}},
        {"name": "health", "match": {"path": {"exact": "/healthz"}}},
        {"name": "global", "match": {"path": {"prefix": "/global"}}, "rate_limits": ["global"]},
        {"name": "keyed", "match": {"path": {"prefix": "/keyed"}}, "rate_limits": ["per-user"]},
        {"name": "limited", "match": {"path": {"prefix": "/limited"}}, "rate_limits": ["tight"]},
        {"name": "breaker", "match": {"path": {"prefix": "/breaker"}}, "circuit_breaker": "closed"},
        {"name": "open", "match": {"path": {"prefix": "/open"}}, "circuit_breaker": "open"},
        {"name": "retry", "match": {"path": {"prefix": "/retry"}}, "retry": "budget"},
        {"name": "fault", "match": {"path": {"prefix": "/fault"}}, "faults": ["never"]},
        {"name": "degradation", "match": {"path": {"prefix": "/degradation"}}, "degradation": "calm"},
        {"name": "everything", "match": {"path": {"prefix": "/all"}}, "rate_limits": ["global"],
         "circuit_breaker": "closed", "retry": "budget", "faults": ["never"], "degradation": "calm"},
        {"name": "catch-all"}
    ]
}"#;

fn decisions(c: &mut Criterion) {
    let mut metrics = FakeMetrics::new();
    let engine = Engine::new(compile(CONFIG.as_bytes()).unwrap(), &mut metrics).unwrap();
    let store = FakeStore::new();
    engine.prepare_state(&store, 0x5ea_5ec2e7).unwrap();
    let mut scratch = Scratch::for_plan(&engine.config().attributes);
    let mut now = 1_800_000_000_000_000_000u64;
    let cases = [
        ("route match, falls to the catch-all", "/other"),
        ("rate limit admit, global", "/global"),
        ("rate limit admit, keyed", "/keyed"),
        ("rate limit refuse", "/limited"),
        ("breaker admit, closed", "/breaker"),
        ("breaker refuse, forced open", "/open"),
        ("retry grant, budgeted", "/retry"),
        ("fault decide, not injecting", "/fault"),
        ("degradation, normal level", "/degradation"),
        ("all five policies, admitted", "/all"),
    ];
    for (name, path) in cases {
        c.bench_function(name, |b| {
            b.iter(|| {
                now += 1_000;
                let mut source = Preset(vec![
                    (Attribute::path(), path.as_bytes().to_vec()),
                    (Attribute::method(), b"GET".to_vec()),
                    (Attribute::header("x-user"), b"alice".to_vec()),
                ]);
                let mut view =
                    RequestView::new(&engine.config().attributes, &mut source, &mut scratch);
                let decision =
                    engine.on_request(&mut view, Timestamp::from_nanos(now), &store, &metrics);
                let mut stream = decision.stream;
                drop(view);
                engine.settle_retries(
                    &stream,
                    &mut Ok200,
                    Timestamp::from_nanos(now),
                    &store,
                    &metrics,
                );
                engine.on_response(&mut stream, Timestamp::from_nanos(now), &metrics);
                engine.on_stream_end(
                    &stream,
                    &mut Ok200,
                    Timestamp::from_nanos(now),
                    &store,
                    &metrics,
                );
                black_box(stream);
            })
        });
    }
}

criterion_group!(benches, decisions);
criterion_main!(benches);
