//! The foundation against real Envoy (`--concurrency 2`): seawall loads in V8, passes traffic
//! through untouched, refuses bad configs at startup and over xDS without dropping a request,
//! matches routes, and survives hostile requests.

use std::time::{Duration, Instant};

use seawall_integration::client::{load, Client, LoadSpec, Request};
use seawall_integration::{Envoy, EnvoyConfig, LdsOutcome, RouteSpec, Upstream};

const ROUTES: &str = r#"{
    "name": "edge",
    "debug": {"route_header": true},
    "routes": [
        {"name": "checkout", "match": {"path": {"prefix": "/api/checkout"}, "methods": ["POST"]}},
        {"name": "free-tier", "match": {"path": {"prefix": "/api"}, "headers": [{"name": "x-tier", "exact": "free"}]}},
        {"name": "by-envoy-route", "match": {"route_name": "envoy-reports"}},
        {"name": "by-cluster", "match": {"cluster": "backup"}},
        {"name": "shop", "match": {"authority": "shop.example.com"}},
        {"name": "everything-else"}
    ]
}"#;

#[test]
fn seawall_loads_in_v8_and_passes_traffic_through_untouched() {
    let upstream = Upstream::start();
    upstream.set_behaviour(
        seawall_integration::Behaviour::ok()
            .body("hello from upstream\n")
            .header("x-from", "upstream"),
    );
    let envoy = Envoy::start(EnvoyConfig::to_upstream(upstream.addr()).seawall("{}"));
    let request = Request::post("/orders?id=7")
        .header("x-custom", "kept")
        .body("payload");
    let response = Client::connect(envoy.listener_addr())
        .send(&request)
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "hello from upstream\n");
    assert_eq!(response.header("x-from"), Some("upstream"));
    assert_eq!(response.header("x-seawall-route"), None);
    assert_eq!(upstream.total(), 1, "the upstream saw exactly one request");
    let received = &upstream.received()[0];
    assert_eq!(
        (received.method.as_str(), received.path.as_str()),
        ("POST", "/orders?id=7")
    );
    assert_eq!(received.header("x-custom"), Some(&b"kept"[..]));
    assert_eq!(received.body_len, 7);
    assert_eq!(
        envoy.stats().get("cluster.upstream.upstream_rq_total"),
        Some(1)
    );

    let (_, info) = envoy.admin_get("/server_info").unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert!(
        info["version"].as_str().unwrap().contains("/1.40.0/"),
        "{}",
        info["version"]
    );
    assert_eq!(info["command_line_options"]["concurrency"], 2);
    // The wasm ran inside V8 (the only runtime configured) on the main thread and on each worker:
    // its configure-time log line appears once per root context.
    let log = envoy.log();
    let loads = log
        .matches("wasm log seawall seawall: seawall[")
        .filter(|_| true)
        .count();
    assert!(loads >= 3, "{loads} loads in:\n{log}");
    assert!(log.contains("plugin config \"seawall\" loaded"));
    eprintln!(
        "envoy {} with --concurrency 2 loaded seawall.wasm in V8 {loads} times",
        info["version"]
    );
}

#[test]
fn the_route_matcher_picks_the_first_matching_route() {
    let upstream = Upstream::start();
    let backup = Upstream::start();
    let config = EnvoyConfig::new()
        .cluster("upstream", upstream.addr())
        .cluster("backup", backup.addr())
        .route(RouteSpec::prefix("envoy-reports", "/reports", "upstream"))
        .route(RouteSpec::prefix("envoy-backup", "/backup", "backup"))
        .route(RouteSpec::prefix("envoy-default", "/", "upstream"))
        .seawall(ROUTES);
    let envoy = Envoy::start(config);
    let mut client = Client::connect(envoy.listener_addr());
    let cases = [
        (Request::post("/api/checkout/cart"), "checkout"),
        (
            Request::get("/api/checkout/cart").header("x-tier", "free"),
            "free-tier",
        ),
        (
            Request::get("/api/items").header("x-tier", "paid"),
            "everything-else",
        ),
        (Request::get("/reports/daily"), "by-envoy-route"),
        (Request::get("/backup/x"), "by-cluster"),
        (Request::get("/").authority("Shop.Example.com:443"), "shop"),
        (Request::get("/"), "everything-else"),
    ];
    for (request, expected) in &cases {
        let response = client.send(request).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(
            response.header("x-seawall-route"),
            Some(*expected),
            "{} {}",
            request.method,
            request.path
        );
    }
    assert_eq!(backup.total(), 1, "only /backup went to the backup cluster");
    assert_eq!(upstream.total(), 6);
    let stats = envoy.stats();
    assert_eq!(stats.seawall("seawall.route.everything-else.requests"), 2);
    assert_eq!(stats.seawall("seawall.route.checkout.requests"), 1);
    assert_eq!(stats.seawall("seawall.route.by-cluster.requests"), 1);
    assert!(envoy
        .prometheus()
        .contains("seawall_route_checkout_requests"));
}

#[test]
fn a_bad_config_at_startup_is_refused_with_its_json_path() {
    let upstream = Upstream::start();
    let bad = r#"{"rate_limits": {"per-user": {"rate": "fast"}}, "routes": [{"name": "a", "rate_limits": ["per-user"]}]}"#;
    let Err((why, log)) = Envoy::try_start(EnvoyConfig::to_upstream(upstream.addr()).seawall(bad))
    else {
        panic!("Envoy must not start with a plugin that refuses its config")
    };
    assert!(
        log.contains(
            r#"plugin config refused: rate_limits.per-user.rate: expected "<n>/s|m|h", got "fast""#
        ),
        "{why}\n{log}"
    );
    assert_eq!(upstream.total(), 0);
}

#[test]
fn a_bad_config_pushed_by_xds_is_rejected_and_the_old_one_keeps_serving() {
    let upstream = Upstream::start();
    let good = EnvoyConfig::to_upstream(upstream.addr())
        .xds_from_files(true)
        .seawall(ROUTES);
    let mut envoy = Envoy::start(good);
    let addr = envoy.listener_addr();
    let background = std::thread::spawn(move || {
        load(
            addr,
            LoadSpec::new(2, Duration::from_secs(3), |_| {
                Request::post("/api/checkout")
            }),
        )
    });
    // The push happens while requests are flowing.
    upstream.wait_for_traffic(0, 20);
    let bad = envoy.config().seawall(r#"{"routes": [{"name": "a", "match": {"path": {"prefix": "no-slash"}}, "retry": "none"}]}"#);
    assert_eq!(envoy.push_listener(&bad), LdsOutcome::Rejected);
    let report = background.join().unwrap();
    assert_eq!(report.errors, 0);
    assert_eq!(
        report.count(200),
        report.sent(),
        "every request during the push succeeded: {:?}",
        report.statuses
    );
    assert!(report.sent() > 50, "the load ran: {}", report.sent());
    assert_eq!(upstream.total(), report.sent());
    let log = envoy.log();
    assert!(
        log.contains(r#"plugin config refused: 2 problems: routes[0].match.path.prefix: expected a path starting with '/', got "no-slash"; routes[0].retry: expected the name of a defined retry, got "none""#),
        "{log}"
    );
    // Still the old config: the route header still names the old route.
    let response = Client::connect(addr)
        .send(&Request::post("/api/checkout"))
        .unwrap();
    assert_eq!(response.header("x-seawall-route"), Some("checkout"));

    // A good push after the bad one takes effect, under load too, without a failed request.
    let seen = upstream.total();
    let background = std::thread::spawn(move || {
        load(
            addr,
            LoadSpec::new(4, Duration::from_secs(3), |_| Request::get("/")),
        )
    });
    upstream.wait_for_traffic(seen, 20);
    let renamed = envoy
        .config()
        .seawall(r#"{"debug": {"route_header": true}, "routes": [{"name": "renamed"}]}"#);
    assert_eq!(envoy.push_listener(&renamed), LdsOutcome::Accepted);
    let report = background.join().unwrap();
    assert_eq!(report.errors, 0, "{:?}", report.statuses);
    assert_eq!(report.count(200), report.sent(), "{:?}", report.statuses);
    assert!(report.sent() > 50, "the load ran: {}", report.sent());
    assert_eq!(
        envoy
            .stats()
            .get("listener_manager.listener_in_place_updated"),
        Some(1),
        "Envoy updated the listener in place"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = Client::connect(addr).send(&Request::get("/")).unwrap();
        if response.header("x-seawall-route") == Some("renamed") {
            break;
        }
        assert!(Instant::now() < deadline, "the new listener never served");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn hostile_requests_never_break_the_filter() {
    let upstream = Upstream::start();
    let config = r#"{
        "debug": {"route_header": true},
        "rate_limits": {"per-user": {"rate": "1000/s", "key": [{"header": "x-user"}], "max_keys": 100}},
        "routes": [{"name": "tier", "match": {"headers": [{"name": "x-tier", "exact": "free"}]}, "rate_limits": ["per-user"]},
                   {"name": "rest", "rate_limits": ["per-user"]}]
    }"#;
    let envoy = Envoy::start(EnvoyConfig::to_upstream(upstream.addr()).seawall(config));
    let mut client = Client::connect(envoy.listener_addr());
    let huge = vec![b'u'; 25 * 1024];
    let too_big = vec![b'u'; 64 * 1024];
    let requests = [
        Request::get("/no-headers-at-all"),
        Request::get("/")
            .header("x-tier", [0xff, 0xfe, 0x80])
            .header("x-user", [0xc3, 0x28]),
        Request::get("/")
            .header("x-user", &huge)
            .header("x-tier", &huge),
        Request::get("/")
            .header("x-envoy-max-retries", "10")
            .header("x-envoy-retry-on", "5xx")
            .header("x-envoy-upstream-rq-per-try-timeout-ms", "1"),
        Request::get("/%ff%00?q=%c3%28").header("x-tier", ""),
    ];
    for request in &requests {
        let response = client.send(request).unwrap();
        assert_eq!(response.status, 200, "{:?}", request.path);
        assert!(response.header("x-seawall-route").is_some());
    }
    // Envoy itself refuses a 64 KiB header (its default limit is 60 KiB) before any filter runs.
    let refused = Client::connect(envoy.listener_addr())
        .send(&Request::get("/").header("x-user", &too_big))
        .unwrap();
    assert_eq!(refused.status, 431);
    let after = Client::connect(envoy.listener_addr())
        .send(&Request::get("/after"))
        .unwrap();
    assert_eq!(after.status, 200, "the filter still serves");
    assert_eq!(upstream.total(), requests.len() as u64 + 1);
    let log = envoy.log();
    assert!(!log.contains("panic"), "{log}");
    assert_eq!(envoy.stats().sum_prefix("wasm.seawall.vm_reload"), 0);
}
