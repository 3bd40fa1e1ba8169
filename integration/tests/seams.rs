//! Where policies meet the host and each other, in real Envoy with two workers: what a client can
//! steer, and what a composition does once a policy's state moves on. Each scenario names the
//! defect it pins (issue 14) and asserts on what the upstreams received.

use seawall_integration::client::{Client, Request};
use std::time::{Duration, Instant};

use seawall_integration::{Behaviour, Envoy, EnvoyConfig, LdsOutcome, RouteSpec, Upstream};

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

/// Sends the spoofed requests to an Envoy set up as the README says, `hardened` with
/// `internal_only_headers` or not, and checks what must hold either way: no spoofed request
/// reached the cluster it named, the header reached no upstream, and seawall matched its routes on
/// the route Envoy chose without the header. Only with the hardening can seawall tell that route
/// is `by-cluster`; without it, seawall removes the header itself (and counts it).
fn spoofed_requests_stay_put(hardened: bool) -> Envoy {
    let primary = Upstream::start();
    let internal = Upstream::start();
    let envoy = steerable(&primary, &internal, hardened);
    let routes = spoof(&envoy);
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
    for (path, route) in &routes {
        let expected = match *path {
            "/admin" => Some("admin"),
            "/api/items" => Some("api"),
            "/by-cluster" if hardened => Some("by-cluster"),
            _ => None,
        };
        assert_eq!(route.as_deref(), expected, "{path}");
    }
    let stats = envoy.stats();
    let (removed, by_cluster) = if hardened { (0, 5) } else { (20, 0) };
    assert_eq!(
        stats.seawall("seawall.plugin.seawall.client_reroute_headers_removed"),
        removed
    );
    assert_eq!(
        stats.seawall("seawall.route.by-cluster.requests"),
        by_cluster
    );
    envoy
}

/// Point 1: `GET /admin` with `x-seawall-cluster: internal` went to the cluster the client named,
/// because seawall removed the header only on routes with a degradation policy, and on policy
/// routes only after reading `xds.cluster_name` from the route Envoy chose with it. Without
/// `internal_only_headers`, seawall now removes it first on every request, and does not believe
/// the `xds.*` properties of that route: Envoy's router matches again, seawall's `cluster` route
/// cannot be identified and does not match.
#[test]
fn a_client_cannot_pick_the_cluster_with_the_reroute_header() {
    let envoy = spoofed_requests_stay_put(false);
    // Without the header, the cluster Envoy chose is seawall's to match on.
    let mut client = Client::connect(envoy.listener_addr());
    let response = client.send(&Request::get("/by-cluster")).unwrap();
    assert_eq!(response.header("x-seawall-route"), Some("by-cluster"));
}

/// The same requests with the README's hardening: Envoy removes the header before it matches a
/// route, so seawall sees the route without it and nothing is left for seawall to remove.
#[test]
fn with_internal_only_headers_envoy_removes_the_reroute_header_before_routing() {
    spoofed_requests_stay_put(true);
}

/// Point 2: a level entered on `circuit_breaker: open` whose fallback covers the breaker's route
/// answered every request, so nothing moved the breaker on from its expired open period: after
/// one trip the fallback was served forever (62 of 62 requests over 7 s with a healed upstream).
/// Now the expired open period lets the level step down after its dwell, the next request is the
/// breaker's probe, and the healed upstream closes it.
#[test]
fn a_breaker_driven_fallback_ends_once_the_upstream_heals() {
    let upstream = Upstream::start();
    let envoy = Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .concurrency(2)
            .seawall(
                r#"{
                    "circuit_breakers": {"payments": {"key": "route", "open_when": {"consecutive_failures": 3},
                                                      "open_for": "3s", "half_open_probes": 1}},
                    "degradation": {"payments": {
                        "signals": {"circuit_breaker": "payments"},
                        "levels": [{"name": "open", "enter": {"circuit_breaker": "open"}, "min_dwell": "1s",
                                    "fallback": {"body": "cached\n"}}]}},
                    "routes": [{"name": "api", "circuit_breaker": "payments", "degradation": "payments"}]
                }"#,
            ),
    );
    upstream.set_behaviour(Behaviour::ok().status(503));
    let mut client = Client::connect(envoy.listener_addr());
    for _ in 0..3 {
        assert_eq!(client.send(&Request::get("/api")).unwrap().status, 503);
    }
    let level = "wasmcustom.seawall.degradation.payments.level";
    assert_eq!(
        envoy.wait_for_stat(level, Duration::from_secs(10), |v| v == 1),
        1,
        "the level follows the open breaker"
    );
    // The gauge is the lease holder's; the connection's worker reads the level on its own tick,
    // and until then the breaker answers with its own 503. The fallback must come while the
    // breaker still refuses (3 s open period): any other answer first fails the test.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = client.send(&Request::get("/api")).unwrap();
        if response.text() == "cached\n" {
            break;
        }
        assert_eq!(
            response.header("x-seawall-circuit"),
            Some("open"),
            "the fallback never answered while the breaker was open"
        );
        assert!(
            Instant::now() < deadline,
            "no answer but the breaker's for 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    upstream.set_behaviour(Behaviour::ok());
    let healed_at = upstream.total();
    // Traffic keeps coming; the fallback must end and the upstream see requests again.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut fallbacks = 0;
    while upstream.total() == healed_at {
        assert!(
            Instant::now() < deadline,
            "the fallback never ended: {fallbacks} fallback answers in 20 s with a healed upstream"
        );
        let response = client.send(&Request::get("/api")).unwrap();
        if response.text() == "cached\n" {
            fallbacks += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for n in 0..20 {
        let response = client.send(&Request::get("/api")).unwrap();
        assert_eq!(response.status, 200, "request {n} after the probe");
        assert_eq!(response.text(), "ok\n", "request {n} after the probe");
    }
    eprintln!(
        "[seams] breaker-driven fallback: {fallbacks} fallback answers after healing, then the upstream saw {} requests",
        upstream.total() - healed_at
    );
    assert_eq!(
        upstream.total() - healed_at,
        21,
        "the probe and the 20 after it"
    );
    let closed = "wasmcustom.seawall.circuit_breaker.payments.closed";
    assert_eq!(
        envoy.wait_for_stat(closed, Duration::from_secs(10), |v| v >= 1),
        1
    );
    assert_eq!(
        envoy.wait_for_stat(level, Duration::from_secs(10), |v| v == 0),
        0
    );
}

/// Point 10: the fault-control headers and the secret reached the upstream on 20 of 20 requests
/// to a policy that was off and to one whose time box had ended: they were removed only once a
/// policy applied.
#[test]
fn fault_control_headers_and_the_secret_never_reach_the_upstream() {
    let upstream = Upstream::start();
    let envoy = Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .concurrency(2)
            .seawall(
                r#"{
                    "faults": {
                        "off": {"enabled": false, "abort": {"percent": 100},
                                "header_control": {"secret_header": "x-chaos-key", "secret": "a-long-chaos-secret"}},
                        "expired": {"abort": {"percent": 100},
                                    "active_between": {"start": "2020-01-01T00:00:00Z", "end": "2020-01-02T00:00:00Z"},
                                    "header_control": {"secret_header": "x-chaos-key", "secret": "a-long-chaos-secret"}}
                    },
                    "routes": [
                        {"name": "off", "match": {"path": {"prefix": "/off"}}, "faults": ["off"]},
                        {"name": "expired", "match": {"path": {"prefix": "/expired"}}, "faults": ["expired"]},
                        {"name": "plain", "match": {"path": {"prefix": "/plain"}}}
                    ]
                }"#,
            ),
    );
    let mut client = Client::connect(envoy.listener_addr());
    for path in ["/off", "/expired", "/plain"] {
        for _ in 0..20 {
            let response = client
                .send(
                    &Request::get(path)
                        .header("x-seawall-fault-abort", "503")
                        .header("x-seawall-fault-delay", "50")
                        .header("x-seawall-fault-percent", "100")
                        .header("x-chaos-key", "a-long-chaos-secret"),
                )
                .unwrap();
            assert_eq!(response.status, 200, "{path}: no fault applies");
        }
    }
    assert_eq!(upstream.total(), 60);
    for header in [
        "x-seawall-fault-abort",
        "x-seawall-fault-delay",
        "x-seawall-fault-percent",
        "x-chaos-key",
    ] {
        assert_eq!(
            upstream.received_with_header(header).len(),
            0,
            "{header} reached the upstream"
        );
    }
    let stats = envoy.stats();
    assert_eq!(stats.seawall("seawall.fault.expired.inactive"), 20);
    eprintln!("[seams] 60 requests with fault controls and the secret: the upstream saw none of those headers");
}

/// Point 4: after a push from `10/h` to `1000/s` under the same names, every request was refused
/// for 2 s with `Retry-After: 719`: the exhausted bucket's arrival time, an hour ahead under the
/// old rate, was read as debt under the new one. Now it counts as an empty bucket of the new limit.
#[test]
fn a_reload_to_a_faster_limit_does_not_lock_clients_out() {
    let upstream = Upstream::start();
    let slow = r#"{"rate_limits": {"quota": {"rate": "10/h", "burst": 10}},
                   "routes": [{"name": "all", "rate_limits": ["quota"]}]}"#;
    let fast = r#"{"rate_limits": {"quota": {"rate": "1000/s", "burst": 1000}},
                   "routes": [{"name": "all", "rate_limits": ["quota"]}]}"#;
    let mut envoy = Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .concurrency(2)
            .xds_from_files(true)
            .seawall(slow),
    );
    let mut client = Client::connect(envoy.listener_addr());
    let statuses: Vec<u16> = (0..12)
        .map(|_| client.send(&Request::get("/")).unwrap().status)
        .collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        10,
        "{statuses:?}"
    );
    let refused = client.send(&Request::get("/")).unwrap();
    assert!(refused.header_u64("retry-after").is_some_and(|s| s > 300));
    drop(client);
    assert_eq!(
        envoy.push_listener(&envoy.config().seawall(fast)),
        LdsOutcome::Accepted
    );
    // The first request under the new limit finds the old hour of debt, which now counts as an
    // empty bucket of the new limit: refused for at most one interval (Retry-After rounds up to
    // 1 s), never for the hour.
    let mut client = Client::connect(envoy.listener_addr());
    let first = client.send(&Request::get("/")).unwrap();
    assert!(
        first.status == 200 || first.header_u64("retry-after").is_some_and(|s| s <= 1),
        "{} with Retry-After {:?}",
        first.status,
        first.header("retry-after")
    );
    drop(client);
    // It refills at 1000 tokens a second: 200 ms later, 100 requests are well within it.
    std::thread::sleep(Duration::from_millis(200));
    let before = upstream.total();
    let mut client = Client::connect(envoy.listener_addr());
    let mut longest_retry_after = 0;
    let mut admitted = 0;
    for _ in 0..100 {
        let response = client.send(&Request::get("/")).unwrap();
        if response.status == 200 {
            admitted += 1;
        } else {
            longest_retry_after =
                longest_retry_after.max(response.header_u64("retry-after").unwrap_or(u64::MAX));
        }
    }
    eprintln!(
        "[seams] after the reload: {admitted} of 100 admitted, longest Retry-After {longest_retry_after} s"
    );
    assert_eq!(admitted, 100);
    assert_eq!(upstream.total() - before, 100, "the upstream saw them");
}

/// Point 9: with `max_active: 1`, a slot that never came back made every later fault count as
/// overflow. Streams that die mid-way give theirs back: a client that hangs up during its delay,
/// and an upstream that resets under a response fault.
#[test]
fn fault_slots_come_back_however_the_stream_ends() {
    use std::io::Write;
    let upstream = Upstream::start();
    upstream.set_rule(
        seawall_integration::Match::PathPrefix("/reset".into()),
        Behaviour::ok().resetting(),
    );
    let envoy = Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .concurrency(2)
            .seawall(
                r#"{
                    "faults": {
                        "slow": {"delay": {"fixed": "2s", "percent": 100}, "max_active": 1},
                        "late": {"response": {"status": 418, "percent": 100}, "max_active": 1}
                    },
                    "routes": [
                        {"name": "slow", "match": {"path": {"prefix": "/slow"}}, "faults": ["slow"]},
                        {"name": "reset", "match": {"path": {"prefix": "/reset"}}, "faults": ["late"]}
                    ]
                }"#,
            ),
    );
    let gauge = |name: &str| format!("wasmcustom.seawall.fault.{name}.active");
    // A client hangs up while its request is held by the delay.
    for _ in 0..3 {
        let mut socket = std::net::TcpStream::connect(envoy.listener_addr()).unwrap();
        socket
            .write_all(b"GET /slow HTTP/1.1\r\nhost: seawall\r\n\r\n")
            .unwrap();
        assert_eq!(
            envoy.wait_for_stat(&gauge("slow"), Duration::from_secs(10), |v| v == 1),
            1,
            "the delay holds the slot"
        );
        drop(socket);
        assert_eq!(
            envoy.wait_for_stat(&gauge("slow"), Duration::from_secs(10), |v| v == 0),
            0,
            "the hung-up stream gave its slot back"
        );
    }
    // The upstream resets under a response fault.
    let mut client = Client::connect(envoy.listener_addr());
    for _ in 0..3 {
        let response = client.send(&Request::get("/reset"));
        if response.is_err() {
            client = Client::connect(envoy.listener_addr());
        }
        assert_eq!(
            envoy.wait_for_stat(&gauge("late"), Duration::from_secs(10), |v| v == 0),
            0,
            "the reset stream gave its slot back"
        );
    }
    let stats = envoy.stats();
    eprintln!(
        "[seams] max_active 1: {} delays and {} response faults over streams that died, {} overflows",
        stats.seawall("seawall.fault.slow.delays"),
        stats.seawall("seawall.fault.late.response_faults"),
        stats.seawall("seawall.fault.slow.overflow") + stats.seawall("seawall.fault.late.overflow")
    );
    assert_eq!(stats.seawall("seawall.fault.slow.delays"), 3);
    assert_eq!(stats.seawall("seawall.fault.slow.overflow"), 0);
    assert_eq!(stats.seawall("seawall.fault.late.overflow"), 0);
    assert_eq!(
        upstream.count_path("/slow"),
        0,
        "hung-up requests never went upstream"
    );
    assert_eq!(upstream.count_path("/reset"), 3);
}

/// Point 3: calls admitted before a trip carried no generation. Their late timeouts landed in the
/// window of the close that followed the probe, reopened the breaker as a repeat trip and doubled
/// its open period. Here the upstream hangs on `/hang` past a 4 s route timeout while the breaker
/// trips, half-opens after 1 s and closes; the timeouts that land afterwards are ignored.
#[test]
fn timeouts_of_calls_admitted_before_a_trip_do_not_reopen_the_closed_breaker() {
    let upstream = Upstream::start();
    upstream.set_rule(
        seawall_integration::Match::PathPrefix("/hang".into()),
        Behaviour::ok().delay(Duration::from_secs(30)),
    );
    upstream.set_rule(
        seawall_integration::Match::PathPrefix("/fail".into()),
        Behaviour::ok().status(503),
    );
    let mut route = RouteSpec::prefix("default", "/", "upstream");
    route.route_extra = Some("timeout: 4s".into());
    let envoy = Envoy::start(
        EnvoyConfig::new()
            .concurrency(2)
            .cluster("upstream", upstream.addr())
            .route(route)
            .seawall(
                r#"{"circuit_breakers": {"payments": {"key": "route", "open_when": {"consecutive_failures": 3},
                                                      "open_for": "1s", "half_open_probes": 1}},
                    "routes": [{"name": "api", "circuit_breaker": "payments"}]}"#,
            ),
    );
    let addr = envoy.listener_addr();
    let hung: Vec<_> = (0..5)
        .map(|_| {
            std::thread::spawn(move || {
                Client::connect(addr)
                    .send(&Request::get("/hang"))
                    .map(|r| r.status)
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.count_path("/hang") < 5 {
        assert!(
            Instant::now() < deadline,
            "the hung calls reach the upstream"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut client = Client::connect(addr);
    for _ in 0..3 {
        assert_eq!(client.send(&Request::get("/fail")).unwrap().status, 503);
    }
    let stat = |name: &str| format!("wasmcustom.seawall.circuit_breaker.payments.{name}");
    // Seawall records an outcome when the stream ends, which can be just after the client has
    // its answer.
    let settled = |name: &str, want: u64| {
        envoy.wait_for_stat(&stat(name), Duration::from_secs(10), |v| v >= want)
    };
    assert_eq!(settled("opened", 1), 1);
    // The probe goes through once the open period is over, and closes the breaker.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = client.send(&Request::get("/ok")).unwrap();
        if response.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the breaker never let a probe through"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(settled("closed", 1), 1);
    assert!(
        hung.iter().all(|h| !h.is_finished()),
        "the hung calls are still in flight when the breaker closes"
    );
    for call in hung {
        assert_eq!(
            call.join().unwrap().unwrap(),
            504,
            "the route timeout answers"
        );
    }
    // Their timeouts came after the close and belong to the generation before the trip.
    for n in 0..10 {
        assert_eq!(
            client.send(&Request::get("/ok")).unwrap().status,
            200,
            "request {n}"
        );
    }
    let stats = envoy.stats();
    eprintln!(
        "[seams] hung calls ended after the close: opened {}, reopened {}, closed {}",
        stats.get(&stat("opened")).unwrap_or(0),
        stats.get(&stat("reopened")).unwrap_or(0),
        stats.get(&stat("closed")).unwrap_or(0)
    );
    assert_eq!(stats.get(&stat("opened")), Some(1), "no second trip");
    assert_eq!(upstream.count_path("/ok"), 11);
}

/// Point 8: key parts were hashed as sent, so each spelling of one path or authority got a fresh
/// bucket; and the slot hash was seeded by names alone. Now variants share one bucket (and the
/// hash is keyed by a secret each deployment makes once in shared data).
#[test]
fn spellings_of_one_path_or_authority_share_a_bucket() {
    let upstream = Upstream::start();
    let envoy = Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .concurrency(2)
            .seawall(
                r#"{"rate_limits": {
                        "by-path": {"rate": "1/h", "burst": 2, "key": ["path"], "max_keys": 1000},
                        "by-host": {"rate": "1/h", "burst": 2, "key": ["authority"], "max_keys": 1000}},
                    "routes": [{"name": "hosts", "match": {"headers": [{"name": "x-by", "exact": "host"}]}, "rate_limits": ["by-host"]},
                               {"name": "paths", "rate_limits": ["by-path"]}]}"#,
            ),
    );
    let mut client = Client::connect(envoy.listener_addr());
    let paths = ["/p/items", "/P//items?page=2", "/%70/%49tems", "/p/other"];
    let statuses: Vec<u16> = paths
        .iter()
        .map(|path| client.send(&Request::get(path)).unwrap().status)
        .collect();
    assert_eq!(statuses, [200, 200, 429, 200], "{paths:?}");
    let hosts = [
        "shop.example.com",
        "Shop.Example.COM:10000",
        "SHOP.example.com:443",
        "other.example.com",
    ];
    let statuses: Vec<u16> = hosts
        .iter()
        .map(|host| {
            let request = Request::get("/h").authority(host).header("x-by", "host");
            client.send(&request).unwrap().status
        })
        .collect();
    assert_eq!(statuses, [200, 200, 429, 200], "{hosts:?}");
    assert_eq!(upstream.total(), 6);
}

/// Point 7: after a reload the old root contexts keep ticking until their listener drains, and
/// their lease holder kept the old probe target (and thresholds) in charge. After a push that
/// moves the probe to another path, the old path stops getting probes within about a second.
#[test]
fn after_a_reload_the_old_config_stops_probing() {
    let upstream = Upstream::start();
    let health = Upstream::start();
    let plugin = |path: &str| {
        format!(
            r#"{{"degradation": {{"payments": {{
                "signals": {{"probe": {{"cluster": "health", "path": "{path}", "interval": "100ms", "timeout": "50ms"}}}},
                "levels": [{{"name": "down", "enter": {{"probe": "unhealthy"}}}}]}}}},
               "routes": [{{"name": "api", "degradation": "payments"}}]}}"#
        )
    };
    let mut envoy = Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .cluster("health", health.addr())
            .concurrency(2)
            .xds_from_files(true)
            .seawall(&plugin("/healthz/old")),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while health.count_path("/healthz/old") < 5 {
        assert!(Instant::now() < deadline, "the old config probes");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pushed = envoy.config().seawall(&plugin("/healthz/new"));
    assert_eq!(envoy.push_listener(&pushed), LdsOutcome::Accepted);
    let deadline = Instant::now() + Duration::from_secs(10);
    while health.count_path("/healthz/new") < 5 {
        assert!(Instant::now() < deadline, "the new config probes");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The new config probes, so the handover is done: from here the old path gets nothing.
    let old_then = health.count_path("/healthz/old");
    let new_then = health.count_path("/healthz/new");
    let deadline = Instant::now() + Duration::from_secs(10);
    while health.count_path("/healthz/new") < new_then + 20 {
        assert!(Instant::now() < deadline, "the new config keeps probing");
        std::thread::sleep(Duration::from_millis(50));
    }
    let old_after = health.count_path("/healthz/old") - old_then;
    eprintln!(
        "[seams] after the push: the new path got {} more probes, the old one {old_after}",
        health.count_path("/healthz/new") - new_then
    );
    assert_eq!(
        old_after, 0,
        "the old root contexts tick on, but no longer probe"
    );
}
