//! Where policies meet the host and each other, in real Envoy with two workers: what a client can
//! steer, and what a composition does once a policy's state moves on. Each scenario names the
//! defect it pins (issue 14) and asserts on what the upstreams received.

use seawall_integration::client::{Client, Request};
use seawall_integration::{Envoy, EnvoyConfig, RouteSpec, Upstream};

const STEERED: &str = r#"{
    "debug": {"route_header": true},
    "circuit_breakers": {"payments": {"open_when": {"consecutive_failures": 5}}},
    "degradation": {"payments": {
        "levels": [{"name": "critical", "enter": {"failure_rate": 90},
                    "reroute": {"cluster": "internal", "routes": ["api"]}}]}},
    "routes": [
        {"name": "by-cluster", "match": {"cluster": "primary", "path": {"prefix": "/by-cluster"}},
         "circuit_breaker": "payments"},
        {"name": "api", "match": {"path": {"prefix": "/api"}}, "degradation": "payments"},
        {"name": "admin", "match": {"path": {"prefix": "/admin"}}}
    ]
}"#;

/// Envoy as the README sets it up for reroutes: a `cluster_header` route first, matching every
/// path, then the default route; `hardened` adds `internal_only_headers` for the header.
fn steerable(primary: &Upstream, internal: &Upstream, hardened: bool) -> Envoy {
    let mut config = EnvoyConfig::new()
        .concurrency(2)
        .cluster("primary", primary.addr())
        .cluster("internal", internal.addr())
        .route(RouteSpec::by_header("rerouted", "/", "x-seawall-cluster"))
        .route(RouteSpec::prefix("default", "/", "primary"))
        .seawall(STEERED);
    if hardened {
        config = config.route_config_field("internal_only_headers: [x-seawall-cluster]");
    }
    Envoy::start(config)
}

/// Sends five requests to each path with a spoofed `x-seawall-cluster: internal`; returns the
/// `x-seawall-route` each got.
fn spoof(envoy: &Envoy) -> Vec<(&'static str, Option<String>)> {
    let mut client = Client::connect(envoy.listener_addr());
    let mut routes = Vec::new();
    for path in ["/admin", "/api/items", "/by-cluster", "/elsewhere"] {
        for _ in 0..5 {
            let response = client
                .send(&Request::get(path).header("x-seawall-cluster", "internal"))
                .unwrap();
            assert_eq!(response.status, 200, "{path}");
            routes.push((path, response.header("x-seawall-route").map(str::to_owned)));
        }
    }
    routes
}

fn assert_nothing_reached_the_named_cluster(primary: &Upstream, internal: &Upstream) {
    eprintln!(
        "[seams] 20 spoofed requests: primary saw {}, internal saw {}",
        primary.total(),
        internal.total()
    );
    assert_eq!(
        internal.total(),
        0,
        "no spoofed request reached the cluster it named"
    );
    assert_eq!(primary.total(), 20);
    assert!(
        primary.received_with_header("x-seawall-cluster").is_empty(),
        "the header never reaches the upstream"
    );
}

/// Point 1: `GET /admin` with `x-seawall-cluster: internal` went to the cluster the client named,
/// because seawall removed the header only on routes with a degradation policy, and on policy
/// routes only after reading `xds.cluster_name` from the route Envoy chose with it. Without
/// `internal_only_headers`, seawall now removes it first on every request, and does not believe
/// the `xds.*` properties of that route: Envoy's router matches again, seawall's `cluster` route
/// cannot be identified and does not match.
#[test]
fn a_client_cannot_pick_the_cluster_with_the_reroute_header() {
    let primary = Upstream::start();
    let internal = Upstream::start();
    let envoy = steerable(&primary, &internal, false);
    let routes = spoof(&envoy);
    assert_nothing_reached_the_named_cluster(&primary, &internal);
    for (path, route) in &routes {
        let expected = match *path {
            "/admin" => Some("admin"),
            "/api/items" => Some("api"),
            _ => None,
        };
        assert_eq!(route.as_deref(), expected, "{path}");
    }
    let stats = envoy.stats();
    assert_eq!(
        stats.seawall("seawall.plugin.seawall.client_reroute_headers_removed"),
        20
    );
    assert_eq!(stats.seawall("seawall.route.by-cluster.requests"), 0);
    // Without the header, the cluster Envoy chose is seawall's to match on.
    let mut client = Client::connect(envoy.listener_addr());
    let response = client.send(&Request::get("/by-cluster")).unwrap();
    assert_eq!(response.header("x-seawall-route"), Some("by-cluster"));
}

/// The same requests with the README's hardening: Envoy removes the header before it matches a
/// route, so seawall sees the route without it and nothing is left for seawall to remove.
#[test]
fn with_internal_only_headers_envoy_removes_the_reroute_header_before_routing() {
    let primary = Upstream::start();
    let internal = Upstream::start();
    let envoy = steerable(&primary, &internal, true);
    let routes = spoof(&envoy);
    assert_nothing_reached_the_named_cluster(&primary, &internal);
    for (path, route) in &routes {
        let expected = match *path {
            "/admin" => Some("admin"),
            "/api/items" => Some("api"),
            "/by-cluster" => Some("by-cluster"),
            _ => None,
        };
        assert_eq!(route.as_deref(), expected, "{path}");
    }
    let stats = envoy.stats();
    assert_eq!(
        stats.seawall("seawall.plugin.seawall.client_reroute_headers_removed"),
        0
    );
    assert_eq!(stats.seawall("seawall.route.by-cluster.requests"), 5);
}
