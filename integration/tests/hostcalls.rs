//! Host calls per request in real Envoy, counted by the plugin's `hostcall-count` build: what a
//! request costs is its host calls (DESIGN.md §3), and unlike CPU time their count is the same on
//! every run, so it can be pinned here. Each config runs on 2 workers against an upstream that
//! must see every request; the counts are read from Envoy's stats once the workers' ticks have
//! flushed them, so the tick's own calls (metric flushes, tallies, leases) are in the totals,
//! spread over the requests as they are in production.

use std::collections::BTreeMap;

use seawall_integration::envoy::hostcall_counting_wasm;
use seawall_integration::{Client, Envoy, EnvoyConfig, Request, Stats, Upstream};

const KINDS: [&str; 10] = [
    "header_read",
    "header_map_read",
    "header_write",
    "property_read",
    "shared_get",
    "shared_set",
    "metric",
    "time",
    "local_reply",
    "other",
];

/// The bench's config with every policy on one route, none of them triggering.
const ALL_FIVE: &str = r#"{
  "name": "bench",
  "rate_limits": {"global": {"rate": "100000000/s", "burst": 100000000}},
  "circuit_breakers": {"upstream": {"open_when": {"consecutive_failures": 1000000, "failure_rate": 99, "min_requests": 1000000}}},
  "retries": {"budgeted": {"max_retries": 2, "retry_on": ["5xx", "reset", "connect-failure"]}},
  "faults": {"never": {"abort": {"percent": 0}, "delay": {"fixed": "100ms", "percent": 0}}},
  "degradation": {"health": {"priority": {"header": "x-priority"},
                             "levels": [{"name": "degraded", "enter": {"failure_rate": 90, "p95_latency": "5s"},
                                         "shed_below": "normal"}]}},
  "routes": [{"name": "bench", "match": {"path": {"prefix": "/bench"}}, "rate_limits": ["global"],
              "circuit_breaker": "upstream", "retry": "budgeted", "faults": ["never"],
              "degradation": "health"}]
}"#;

const ROUTE_ONLY: &str =
    r#"{"name": "bench", "routes": [{"name": "bench", "match": {"path": {"prefix": "/bench"}}}]}"#;

const ONE_LIMIT: &str = r#"{"name": "bench",
  "rate_limits": {"global": {"rate": "100000000/s", "burst": 100000000}},
  "routes": [{"name": "bench", "match": {"path": {"prefix": "/bench"}}, "rate_limits": ["global"]}]}"#;

const WARM_UP: u64 = 200;
const REQUESTS: u64 = 2000;

fn counted(stats: &Stats) -> (BTreeMap<&'static str, u64>, u64) {
    let kinds = KINDS
        .iter()
        .map(|kind| {
            (
                *kind,
                stats.seawall(&format!("seawall.hostcalls.all.{kind}")),
            )
        })
        .collect();
    (kinds, stats.seawall("seawall.hostcalls.all.streams"))
}

/// Host calls per request by kind, over `REQUESTS` requests after a warm-up.
fn per_request(plugin_config: &str) -> BTreeMap<&'static str, f64> {
    let upstream = Upstream::start();
    let envoy = Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .wasm(hostcall_counting_wasm())
            .seawall(plugin_config),
    );
    let mut client = Client::connect(envoy.listener_addr());
    let mut send = |count: u64| {
        for _ in 0..count {
            let response = client
                .send(&Request::get("/bench/item"))
                .expect("a response");
            assert_eq!(response.status, 200, "{}", response.text());
        }
    };
    send(WARM_UP);
    let (before, streams_before) = counted(&envoy.stats());
    send(REQUESTS);
    let (after, streams_after) = counted(&envoy.stats());
    assert_eq!(
        upstream.total(),
        WARM_UP + REQUESTS,
        "every request reached the upstream"
    );
    assert_eq!(
        streams_after - streams_before,
        REQUESTS,
        "every stream was counted"
    );
    KINDS
        .iter()
        .map(|kind| {
            let calls = after[kind] - before[kind];
            (*kind, calls as f64 / REQUESTS as f64)
        })
        .collect()
}

fn total(counts: &BTreeMap<&'static str, f64>) -> f64 {
    counts.values().sum()
}

fn show(name: &str, counts: &BTreeMap<&'static str, f64>) {
    let kinds: Vec<String> = counts
        .iter()
        .filter(|(_, per)| **per > 0.0)
        .map(|(kind, per)| format!("{kind} {per:.3}"))
        .collect();
    println!(
        "[hostcalls] {name}: {:.3} per request ({})",
        total(counts),
        kinds.join(", ")
    );
}

#[test]
fn host_calls_per_request_stay_a_handful_with_every_policy_on_the_route() {
    let route_only = per_request(ROUTE_ONLY);
    show("a route, no policy", &route_only);
    let one_limit = per_request(ONE_LIMIT);
    show("one global rate limit", &one_limit);
    let all_five = per_request(ALL_FIVE);
    show("all five policies, none triggering", &all_five);

    // A route alone: the time of the request and of its response, nothing else per request.
    assert!(total(&route_only) <= 2.05, "{route_only:?}");
    // A rate limit with ample tokens admits from a leased batch: shared data far less than once
    // per request, and no metric call on the request path.
    assert!(
        one_limit["shared_get"] + one_limit["shared_set"] < 0.1,
        "{one_limit:?}"
    );
    assert!(one_limit["metric"] < 0.1, "{one_limit:?}");
    // Every policy: one read of the header map, metrics batched on the tick.
    assert!(all_five["header_read"] <= 2.0, "{all_five:?}");
    assert!(all_five["header_map_read"] <= 1.0, "{all_five:?}");
    assert!(all_five["metric"] < 0.1, "{all_five:?}");
}
