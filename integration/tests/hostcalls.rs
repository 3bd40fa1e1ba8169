//! Host calls per request in real Envoy, counted by the plugin's `hostcall-count` build: what a
//! request costs is its host calls (DESIGN.md §3), and unlike CPU time their count is the same on
//! every run, so it can be pinned here. Each config runs on 2 workers against an upstream that
//! must see every request; the counts are read from Envoy's stats once the workers' ticks have
//! flushed them. The tick's own calls (metric flushes, lease returns, tallies) are counted apart
//! (`seawall.hostcalls.tick.*`): they cost per tick, whatever the traffic, and are shown per tick.

use std::collections::BTreeMap;

use seawall::metrics::HOSTCALL_KINDS as KINDS;
use seawall_integration::envoy::hostcall_counting_wasm;
use seawall_integration::{Client, Envoy, EnvoyConfig, Request, Stats, Upstream};

/// The bench's configs (`cargo xtask bench` runs the same files): every policy on one route,
/// none of them triggering; the same with the retries' conditions in the Envoy route's own retry
/// policy (no request header for a request granted every retry); and the same again with one
/// `RateLimit` header instead of three.
const ALL_FIVE: &str = include_str!("../../bench/configs/all-five.json");
const ALL_FIVE_ROUTE_RETRIES: &str =
    include_str!("../../bench/configs/all-five-route-retries.json");
const ALL_FIVE_LEAN: &str = include_str!("../../bench/configs/all-five-lean.json");

const ROUTE_ONLY: &str =
    r#"{"name": "bench", "routes": [{"name": "bench", "match": {"path": {"prefix": "/bench"}}}]}"#;

const ONE_LIMIT: &str = r#"{"name": "bench",
  "rate_limits": {"global": {"rate": "100000000/s", "burst": 100000000}},
  "routes": [{"name": "bench", "match": {"path": {"prefix": "/bench"}}, "rate_limits": ["global"]}]}"#;

const WARM_UP: u64 = 200;
const REQUESTS: u64 = 2000;

/// Calls by kind on the request path (all calls less the tick's), the tick's, the streams and
/// the ticks so far.
struct Counted {
    requests: BTreeMap<&'static str, u64>,
    ticks: BTreeMap<&'static str, u64>,
    streams: u64,
    tick_count: u64,
}

fn counted(stats: &Stats) -> Counted {
    let of = |scope: &str, kind: &str| stats.seawall(&format!("seawall.hostcalls.{scope}.{kind}"));
    Counted {
        requests: KINDS
            .iter()
            .map(|kind| (*kind, of("all", kind) - of("tick", kind)))
            .collect(),
        ticks: KINDS.iter().map(|kind| (*kind, of("tick", kind))).collect(),
        streams: of("all", "streams"),
        tick_count: stats.seawall("seawall.workers.all.ticks"),
    }
}

/// Host calls per request by kind, over `REQUESTS` requests after a warm-up; the tick's calls
/// per tick are printed.
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
    let before = counted(&envoy.stats());
    send(REQUESTS);
    let after = counted(&envoy.stats());
    assert_eq!(
        upstream.total(),
        WARM_UP + REQUESTS,
        "every request reached the upstream"
    );
    assert_eq!(
        after.streams - before.streams,
        REQUESTS,
        "every stream was counted"
    );
    let ticks = after.tick_count - before.tick_count;
    let tick_calls: u64 = KINDS
        .iter()
        .map(|kind| after.ticks[kind] - before.ticks[kind])
        .sum();
    println!(
        "[hostcalls]   the tick: {:.2} calls per tick over {ticks} ticks",
        tick_calls as f64 / ticks.max(1) as f64
    );
    KINDS
        .iter()
        .map(|kind| {
            let calls = after.requests[kind] - before.requests[kind];
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
    let all_five_routed = per_request(ALL_FIVE_ROUTE_RETRIES);
    show(
        "all five, retries from the Envoy route's policy",
        &all_five_routed,
    );
    let all_five_lean = per_request(ALL_FIVE_LEAN);
    show(
        "all five, the route's retry policy and one RateLimit header",
        &all_five_lean,
    );

    // What a request costs is exact but for the batches leased on the request path (tokens,
    // retry allowance), about one call in a hundred requests.
    let leases = 0.05;
    let exactly = |counts: &BTreeMap<&'static str, f64>, expected: &[(&str, f64)]| {
        for (kind, calls) in expected {
            assert!(
                (counts[kind] - calls).abs() < 1e-9,
                "{kind}: {} per request, expected {calls}: {counts:?}",
                counts[kind]
            );
        }
    };
    // A route alone: its one header (`:path`) and the request's time.
    exactly(&route_only, &[("header_read", 1.0), ("time", 1.0)]);
    assert_eq!(total(&route_only), 2.0, "{route_only:?}");
    // A rate limit with ample tokens admits from a leased batch, and its counters are batched:
    // the headers in one read, the three RateLimit-* response headers and the time.
    exactly(
        &one_limit,
        &[
            ("header_map_read", 1.0),
            ("header_write", 3.0),
            ("time", 1.0),
            ("metric", 0.0),
        ],
    );
    assert!(
        one_limit["shared_get"] + one_limit["shared_set"] < leases,
        "{one_limit:?}"
    );
    // Every policy: one read of the request's headers and one of the response's, the breaker's
    // one shared read (its successes are tallied), no metric call, the request's and the
    // response's time, the cluster for the breaker's key, the RateLimit-* headers and two retry
    // headers.
    let common = [
        ("header_map_read", 2.0),
        ("header_read", 0.0),
        ("property_read", 1.0),
        ("time", 2.0),
        ("metric", 0.0),
        ("local_reply", 0.0),
    ];
    for counts in [&all_five, &all_five_routed, &all_five_lean] {
        exactly(counts, &common);
        assert!(counts["shared_get"] <= 1.0 + leases, "{counts:?}");
        assert!(counts["shared_set"] < leases, "{counts:?}");
    }
    // One call per header written: two retry headers and three RateLimit-* headers. (Writing a
    // whole map back in one `proxy_set_header_map_pairs` call instead would make it 2 calls, and
    // cost 12% more instructions per request: see the README's Benchmark section.)
    exactly(&all_five, &[("header_write", 5.0)]);
    // With the route's retry policy, a request granted every retry writes no request header;
    // with one RateLimit header instead of three, one response header is written.
    exactly(&all_five_routed, &[("header_write", 3.0)]);
    exactly(&all_five_lean, &[("header_write", 1.0)]);
    // A lease is two calls, a shared get and a shared set, each bounded by `leases` above.
    assert!(
        total(&all_five_lean) <= 7.0 + 2.0 * leases,
        "{all_five_lean:?}"
    );
}

/// What seawall writes into the headers changes nothing else: with every policy on the route
/// (the retry headers on the request, the three RateLimit-* headers on the response), the
/// upstream receives every client header, repeated and empty ones included, in order, and not
/// the client's own `x-envoy-max-retries` (the budget's grant replaces it: an upstream that
/// always fails sees the budget's two retries, not the client's nine); and the client receives
/// every upstream header, repeated `set-cookie` included, with the RateLimit-* headers. (Written
/// for a build that wrote whole maps back in one call; kept as the guard of any such change.)
#[test]
fn seawalls_header_writes_lose_and_reorder_nothing_else() {
    let upstream = Upstream::start();
    upstream.set_behaviour(
        seawall_integration::Behaviour::ok()
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .header("x-empty-response", "")
            .header("x-upstream", "kept"),
    );
    let envoy = Envoy::start(EnvoyConfig::to_upstream(upstream.addr()).seawall(ALL_FIVE));
    let mut client = Client::connect(envoy.listener_addr());
    let request = Request::get("/bench/item?q=1")
        .header("x-dup", "first")
        .header("x-client", "kept")
        .header("x-dup", "second")
        .header("x-empty", "")
        .header("x-envoy-max-retries", "9")
        .header("cookie", "c=3");
    let response = client.send(&request).expect("a response");
    assert_eq!(response.status, 200, "{}", response.text());

    let received = upstream.received();
    let seen = received.last().expect("the upstream saw the request");
    assert_eq!(seen.path, "/bench/item?q=1");
    let values = |name: &str| -> Vec<&[u8]> {
        seen.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    };
    assert_eq!(
        values("x-dup"),
        [&b"first"[..], b"second"],
        "{:?}",
        seen.headers
    );
    assert_eq!(values("x-client"), [&b"kept"[..]]);
    assert_eq!(values("x-empty"), [&b""[..]]);
    assert_eq!(values("cookie"), [&b"c=3"[..]]);
    // The router consumes its retry headers: the upstream never sees them.
    assert!(
        values("x-envoy-max-retries").is_empty(),
        "{:?}",
        seen.headers
    );
    let order: Vec<&str> = seen
        .headers
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| ["x-dup", "x-client", "x-empty", "cookie"].contains(n))
        .collect();
    assert_eq!(order, ["x-dup", "x-client", "x-dup", "x-empty", "cookie"]);

    let response_values = |name: &str| -> Vec<&[u8]> {
        response
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    };
    assert_eq!(response_values("set-cookie"), [&b"a=1"[..], b"b=2"]);
    assert_eq!(response_values("x-empty-response"), [&b""[..]]);
    assert_eq!(response_values("x-upstream"), [&b"kept"[..]]);
    assert_eq!(response.text(), "ok\n");
    assert_eq!(response.header("ratelimit-limit"), Some("100000000"));
    assert!(response.header("ratelimit-remaining").is_some());
    assert!(response.header("ratelimit-reset").is_some());
    assert!(response.header("x-envoy-upstream-service-time").is_some());

    // And the retry headers in the replaced map are seawall's, not the client's 9: an upstream
    // that always fails sees the request and the budget's two retries.
    upstream.set_rule(
        seawall_integration::Match::Header("x-fail".into(), "1".into()),
        seawall_integration::Behaviour::ok().status(503),
    );
    let failing = Request::get("/bench/item")
        .header("x-fail", "1")
        .header("x-envoy-max-retries", "9");
    let response = client.send(&failing).expect("a response");
    assert_eq!(response.status, 503);
    assert_eq!(response.header("x-envoy-attempt-count"), Some("3"));
    assert_eq!(upstream.received_with_header("x-fail").len(), 3);
}
