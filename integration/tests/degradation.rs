//! Health-aware degradation in real Envoy with several workers: a slow upstream raises the level
//! and low-priority traffic is shed while critical traffic still reaches the upstream (its own
//! record shows which); failing probes serve the fallback on its routes, with no traffic to the
//! upstream there, and recovery steps the level down only after its dwell; a degraded level
//! reroutes through an Envoy `cluster_header` route; and with four workers the health path sees
//! one probe per interval.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use seawall_integration::client::{load, Client, LoadSpec, Request};
use seawall_integration::{Behaviour, Envoy, EnvoyConfig, Match, RouteSpec, Upstream};

const LEVEL: &str = "wasmcustom.seawall.degradation.payments.level";

const DEGRADED: &str = "x-seawall-degraded";

fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy
        .stats()
        .seawall(&format!("seawall.degradation.payments.{name}"))
}

/// Envoy with `workers` workers in front of `upstream`, with a `health` cluster to probe.
fn probed(upstream: &Upstream, health: &Upstream, workers: u32, plugin: &str) -> Envoy {
    Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .cluster("health", health.addr())
            .concurrency(workers)
            .seawall(plugin),
    )
}

/// Polls the level gauge until it shows `level` (bounded), then waits (bounded) until every
/// worker applies it: each worker reads the shared level on its own tick, so `probe` is sent on
/// a connection to each worker until the answer carries `x-seawall-degraded: shown` (`None`:
/// no such header, the normal level). Returns how many probes were answered before their worker
/// showed the level.
fn wait_for_level(
    envoy: &Envoy,
    level: u64,
    shown: Option<&str>,
    probe: &Request,
    within: Duration,
) -> u64 {
    let value = envoy.wait_for_stat(LEVEL, within, |value| value == level);
    assert_eq!(
        value, level,
        "the level did not reach {level} in {within:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut early = 0;
    for (worker, mut client) in envoy.client_per_worker().into_iter().enumerate() {
        loop {
            let response = client.send(probe).unwrap();
            assert!(
                client.is_connected(),
                "Envoy closed the connection to worker {worker}"
            );
            if response.header(DEGRADED) == shown {
                break;
            }
            early += 1;
            assert!(
                Instant::now() < deadline,
                "worker {worker} still answers with {DEGRADED} {:?}, not {shown:?}, 10 s after the level gauge showed {level}",
                response.header(DEGRADED)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    early
}

#[test]
fn a_slow_upstream_degrades_the_level_and_sheds_low_priority_while_critical_traffic_passes() {
    let upstream = Upstream::start();
    let envoy = Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .concurrency(4)
            .seawall(
                r#"{"degradation": {"payments": {
                      "signals": {"window": "2s", "min_requests": 10},
                      "priority": {"header": "x-priority"},
                      "levels": [{"name": "degraded",
                                  "enter": {"p95_latency": "150ms"}, "exit": {"p95_latency": "50ms"},
                                  "min_dwell": "1s", "shed_below": "high"}]}},
                    "routes": [{"name": "api", "degradation": "payments"}]}"#,
            ),
    );
    let addr = envoy.listener_addr();
    let mixed = |i: u64| {
        Request::get("/api").header(
            "x-priority",
            if i.is_multiple_of(2) {
                "low"
            } else {
                "critical"
            },
        )
    };

    // Healthy: both classes reach the upstream. Paced, so the upstream records every request.
    let calm = load(
        addr,
        LoadSpec {
            rate: Some(2000.0),
            ..LoadSpec::new(4, Duration::from_millis(1500), mixed)
        },
    );
    assert_eq!(calm.count(200), calm.sent(), "{:?}", calm.statuses);
    assert_eq!(stat(&envoy, "level"), 0);
    assert!(upstream.received_with_header("x-priority").len() as u64 >= calm.sent());

    // The upstream slows down to 300 ms: the p95 crosses 150 ms and the level rises.
    upstream.set_behaviour(Behaviour::ok().delay(Duration::from_millis(300)));
    let started = Instant::now();
    let slow =
        std::thread::spawn(move || load(addr, LoadSpec::new(8, Duration::from_secs(3), mixed)));
    let critical_probe = Request::get("/api").header("x-priority", "critical");
    wait_for_level(
        &envoy,
        1,
        Some("degraded"),
        &critical_probe,
        Duration::from_secs(10),
    );
    eprintln!(
        "[degradation] level 1 on every worker {:?} after the upstream slowed",
        started.elapsed()
    );
    slow.join().unwrap();

    // While degraded, only critical requests reach the upstream.
    upstream.reset_counters();
    let degraded = load(addr, LoadSpec::new(8, Duration::from_secs(2), mixed));
    let received = upstream.received();
    let low = received
        .iter()
        .filter(|r| r.header("x-priority") == Some(b"low"))
        .count();
    let critical = received
        .iter()
        .filter(|r| r.header("x-priority") == Some(b"critical"))
        .count();
    let shed = stat(&envoy, "shed");
    eprintln!(
        "[degradation] degraded: {} sent, {} shed with 503, upstream saw {critical} critical and {low} low",
        degraded.sent(),
        degraded.count(503)
    );
    assert_eq!(stat(&envoy, "level"), 1);
    assert_eq!(low, 0, "no low-priority request may reach the upstream");
    assert!(critical > 0, "critical requests must still pass");
    assert_eq!(degraded.count(503) + degraded.count(200), degraded.sent());
    assert_eq!(degraded.count(200), critical as u64);
    assert!(shed >= degraded.count(503), "shed {shed}");

    let mut client = Client::connect(addr);
    let refused = client
        .send(&Request::get("/api").header("x-priority", "low"))
        .unwrap();
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("x-seawall-degraded"), Some("degraded"));
    assert!(refused.header_u64("retry-after").is_some_and(|s| s >= 1));
    // No header at all is the default class, `normal`: below `high`, so shed too.
    assert_eq!(client.send(&Request::get("/api")).unwrap().status, 503);
    let passed = client
        .send(&Request::get("/api").header("x-priority", "critical"))
        .unwrap();
    assert_eq!(passed.status, 200);
    assert_eq!(passed.header("x-seawall-degraded"), Some("degraded"));
    // Hostile priority values are the default class: shed, and nothing breaks.
    for hostile in [vec![0xff, 0xfe, b'c'], vec![b'c'; 25 * 1024]] {
        let response = client
            .send(&Request::get("/api").header("x-priority", &hostile))
            .unwrap();
        assert_eq!(response.status, 503);
    }
    assert!(!envoy.log().contains("panic"), "{}", envoy.log());

    // The upstream recovers: once the window holds fast calls only, the level steps down.
    upstream.set_behaviour(Behaviour::ok());
    let healed = Instant::now();
    let feed = std::thread::spawn(move || {
        load(
            addr,
            LoadSpec::new(2, Duration::from_secs(4), |_| {
                Request::get("/api").header("x-priority", "critical")
            }),
        )
    });
    wait_for_level(&envoy, 0, None, &critical_probe, Duration::from_secs(10));
    eprintln!(
        "[degradation] back to normal on every worker {:?} after the upstream healed",
        healed.elapsed()
    );
    feed.join().unwrap();
    assert_eq!(stat(&envoy, "escalated"), 1);
    assert_eq!(stat(&envoy, "deescalated"), 1);
    assert_eq!(
        client
            .send(&Request::get("/api").header("x-priority", "low"))
            .unwrap()
            .status,
        200
    );
}

#[test]
fn failing_probes_serve_the_fallback_and_recovery_waits_for_the_dwell() {
    let upstream = Upstream::start();
    let health = Upstream::start();
    let envoy = probed(
        &upstream,
        &health,
        2,
        r#"{"degradation": {"payments": {
                      "signals": {"probe": {"cluster": "health", "path": "/healthz", "interval": "200ms",
                                            "timeout": "100ms", "unhealthy_after": 2, "healthy_after": 2}},
                      "levels": [{"name": "critical", "enter": {"probe": "unhealthy"}, "min_dwell": "3s",
                                  "fallback": {"body": "{\"items\":[]}", "headers": {"content-type": "application/json"},
                                               "routes": ["catalog"]}}]}},
                    "routes": [{"name": "catalog", "match": {"path": {"prefix": "/catalog"}}, "degradation": "payments"},
                               {"name": "checkout", "degradation": "payments"}]}"#,
    );
    let addr = envoy.listener_addr();
    let mut client = Client::connect(addr);
    assert_eq!(
        client.send(&Request::get("/catalog")).unwrap().text(),
        "ok\n"
    );
    // A request on the checkout route shows each worker's level without touching the catalog.
    let level_probe = Request::get("/level");

    // Throughout, one connection per worker asks for its own catalog path back to back: the
    // upstream's record of their arrivals shows how long the fallback kept each worker's catalog
    // traffic away.
    let watchers = envoy.client_per_worker();
    let workers = watchers.len();
    let watch_path = |worker: usize| format!("/catalog/watch-{worker}");
    let stop = Arc::new(AtomicBool::new(false));
    let watching = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut watchers = watchers;
            let round = |watchers: &mut Vec<Client>| {
                for (worker, watcher) in watchers.iter_mut().enumerate() {
                    let response = watcher.send(&Request::get(&watch_path(worker))).unwrap();
                    assert_eq!(response.status, 200);
                    assert!(
                        watcher.is_connected(),
                        "worker {worker}'s watcher lost its connection"
                    );
                }
            };
            while !stop.load(Ordering::SeqCst) {
                round(&mut watchers);
                std::thread::sleep(Duration::from_millis(10));
            }
            // Once every worker is back to normal: each one's catalog traffic reaches the
            // upstream again.
            round(&mut watchers);
        })
    };

    // The health path fails: after two failed probes the level goes critical.
    health.set_rule(
        Match::PathPrefix("/healthz".into()),
        Behaviour::ok().status(503),
    );
    wait_for_level(
        &envoy,
        1,
        Some("critical"),
        &level_probe,
        Duration::from_secs(10),
    );
    for _ in 0..100 {
        let response = client.send(&Request::get("/catalog/items")).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.text(), "{\"items\":[]}");
        assert_eq!(response.header("content-type"), Some("application/json"));
        assert_eq!(response.header("x-seawall-degraded"), Some("critical"));
    }
    assert_eq!(
        upstream.count_path("/catalog/items"),
        0,
        "the fallback route must not reach the upstream"
    );
    // A route the fallback does not name still goes to the upstream.
    assert_eq!(
        client.send(&Request::get("/checkout")).unwrap().text(),
        "ok\n"
    );
    assert_eq!(upstream.count_path("/checkout"), 1);
    assert!(stat(&envoy, "fallback") >= 100);
    assert!(stat(&envoy, "probe_failures") >= 2);

    // The health path recovers at once; two good probes take 400 ms, but the level must stay
    // for its 3 s dwell.
    health.set_rule(Match::PathPrefix("/healthz".into()), Behaviour::ok());
    wait_for_level(&envoy, 0, None, &level_probe, Duration::from_secs(10));
    stop.store(true, Ordering::SeqCst);
    watching.join().unwrap();
    // The level is entered and left on the lease holder's tick, and each other worker reads it
    // on its own next tick: the worker that entered it kept its catalog traffic away for at
    // least the dwell (less only the last request's trip to the upstream), the others for up to
    // a tick less or more. So the longest silence on the upstream is the dwell.
    let silences: Vec<Duration> = (0..workers)
        .map(|worker| {
            let path = watch_path(worker);
            let arrivals = upstream.arrivals_where(|r| r.path == path);
            arrivals
                .windows(2)
                .map(|pair| pair[1] - pair[0])
                .max()
                .unwrap_or_else(|| panic!("{path} reached the upstream {} times", arrivals.len()))
        })
        .collect();
    let held = silences.iter().copied().max().unwrap();
    eprintln!(
        "[degradation] critical held for {held:?} (dwell 3s) though probes recovered at once: the upstream heard nothing from each worker's catalog watcher for {silences:?}"
    );
    assert!(
        held >= Duration::from_millis(2900),
        "left after {held:?}, before its dwell"
    );
    upstream.reset_counters();
    assert_eq!(
        client.send(&Request::get("/catalog")).unwrap().text(),
        "ok\n"
    );
    assert_eq!(upstream.count_path("/catalog"), 1);
    assert!(stat(&envoy, "probe_successes") >= 2);
}

#[test]
fn with_four_workers_the_health_path_sees_one_probe_per_interval() {
    let upstream = Upstream::start();
    let health = Upstream::start();
    let envoy = probed(
        &upstream,
        &health,
        4,
        r#"{"degradation": {"payments": {
                      "signals": {"probe": {"cluster": "health", "path": "/healthz", "interval": "200ms", "timeout": "100ms"}},
                      "levels": [{"name": "critical", "enter": {"probe": "unhealthy"}}]}},
                    "routes": [{"name": "all", "degradation": "payments"}]}"#,
    );
    // Traffic on every worker, so every worker is busy and ticking.
    let addr = envoy.listener_addr();
    let traffic = std::thread::spawn(move || {
        load(
            addr,
            LoadSpec::new(8, Duration::from_secs(5), |_| Request::get("/")),
        )
    });
    // After a second to settle, a sample of about 3 s: the probes that arrived in it, between the
    // last one before it and the first one after it (waited for), as the health path saw them.
    std::thread::sleep(Duration::from_secs(1));
    let opened = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let closed = Instant::now();
    let deadline = closed + Duration::from_secs(10);
    while health
        .arrivals("/healthz")
        .last()
        .is_none_or(|&last| last <= closed)
    {
        assert!(
            Instant::now() < deadline,
            "no probe reached the health path within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    traffic.join().unwrap();
    // Read one after the other, the two totals may differ by a probe in flight.
    let sent = stat(&envoy, "probes_sent");
    let received = health.count_path("/healthz");
    let arrivals = health.arrivals("/healthz");
    let probes = arrivals
        .iter()
        .filter(|&&at| at > opened && at <= closed)
        .count() as u64;
    let before = *arrivals
        .iter()
        .filter(|&&at| at <= opened)
        .max()
        .expect("probes before the sample");
    let after = *arrivals
        .iter()
        .filter(|&&at| at > closed)
        .min()
        .expect("a probe after the sample");
    // One probe per 200 ms interval: probes + 1 intervals between the two that frame the sample
    // (each probe leaves on the first tick after it is due, so each end may be up to a tick
    // late: ±1). However the ticks fall, a 200 ms schedule never puts more than
    // (window + 200 ms) / 200 ms + 1 probes in a window of the client's clock.
    let framed = (after - before).as_secs_f64();
    let expected = framed / 0.2 - 1.0;
    let window = (closed - opened).as_secs_f64();
    let ceiling = ((window + 0.2) / 0.2).floor() as u64 + 1;
    eprintln!(
        "[degradation] 4 workers, 200 ms interval: the health path saw {probes} probes in the sample, framed by probes {framed:.3} s apart ({expected:.1} expected; ceiling {ceiling} over the client's {window:.3} s)"
    );
    assert!(
        (probes as f64 - expected).abs() <= 1.0,
        "{probes} probes between two {framed:.3} s apart, at one per 200 ms"
    );
    assert!(
        probes <= ceiling,
        "{probes} probes in {window:.3} s at one per 200 ms"
    );
    assert!(
        sent.abs_diff(received) <= 1,
        "{sent} probes sent, {received} reached the health path"
    );
    assert_eq!(stat(&envoy, "level"), 0);
    assert!(stat(&envoy, "leases_taken") >= 1);
}

#[test]
fn a_degraded_level_reroutes_through_an_envoy_cluster_header_route_and_clients_cannot() {
    let primary = Upstream::start();
    let fallback = Upstream::start();
    let health = Upstream::start();
    let envoy = Envoy::start(
        EnvoyConfig::new()
            .cluster("primary", primary.addr())
            .cluster("payments-fallback", fallback.addr())
            .cluster("health", health.addr())
            // The header route comes first: seawall's header makes Envoy pick it again.
            .route(RouteSpec::by_header("rerouted", "/", "x-seawall-cluster"))
            .route(RouteSpec::prefix("default", "/", "primary"))
            .concurrency(2)
            .seawall(
                r#"{"degradation": {"payments": {
                      "signals": {"probe": {"cluster": "health", "interval": "100ms", "timeout": "50ms",
                                            "unhealthy_after": 1, "healthy_after": 1}},
                      "levels": [{"name": "degraded", "enter": {"probe": "unhealthy"}, "min_dwell": "1s",
                                  "reroute": {"cluster": "payments-fallback"}}]}},
                    "routes": [{"name": "all", "degradation": "payments"}]}"#,
            ),
    );
    let addr = envoy.listener_addr();
    let mut client = Client::connect(addr);
    // A client naming a cluster itself gets the primary: its header is removed.
    for _ in 0..20 {
        let response = client
            .send(&Request::get("/pay").header("x-seawall-cluster", "payments-fallback"))
            .unwrap();
        assert_eq!(response.status, 200);
    }
    assert_eq!((primary.total(), fallback.total()), (20, 0));
    assert!(primary
        .received()
        .iter()
        .all(|r| r.header("x-seawall-cluster").is_none()));

    health.set_rule(
        Match::PathPrefix("/healthz".into()),
        Behaviour::ok().status(500),
    );
    wait_for_level(
        &envoy,
        1,
        Some("degraded"),
        &Request::get("/pay"),
        Duration::from_secs(10),
    );
    // The probes above went to either cluster, as their worker's level said.
    primary.reset_counters();
    fallback.reset_counters();
    let rerouted = stat(&envoy, "rerouted");
    for _ in 0..50 {
        let response = client.send(&Request::get("/pay")).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.header("x-seawall-degraded"), Some("degraded"));
    }
    assert_eq!(
        primary.total(),
        0,
        "the degraded level sends nothing to the primary"
    );
    assert_eq!(fallback.total(), 50);
    assert_eq!(
        fallback.received()[0].header("x-seawall-cluster"),
        Some(&b"payments-fallback"[..])
    );
    assert_eq!(stat(&envoy, "rerouted") - rerouted, 50);
}

#[test]
fn admission_control_sheds_load_from_a_failing_upstream_across_workers_and_lets_it_recover() {
    let upstream = Upstream::start();
    let envoy = Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .concurrency(4)
            .seawall(
                r#"{"degradation": {"payments": {
                      "levels": [{"name": "degraded", "enter": {"failure_rate": 99}}],
                      "admission_control": {"k": 2, "window": "2s", "max_reject": 90}}},
                    "routes": [{"name": "api", "degradation": "payments"}]}"#,
            ),
    );
    let addr = envoy.listener_addr();
    // 80% of calls fail: the backend accepts far less than half, so seawall throttles toward
    // its 90% cap, on every worker.
    upstream.set_behaviour(Behaviour::ok().failing(0.8, 503));
    let warm = load(
        addr,
        LoadSpec::new(8, Duration::from_secs(3), |_| Request::get("/api")),
    );
    upstream.reset_counters();
    let throttled_before = stat(&envoy, "throttled");
    let failing = load(
        addr,
        LoadSpec::new(8, Duration::from_secs(2), |_| Request::get("/api")),
    );
    let reached = upstream.total();
    let throttled = stat(&envoy, "throttled") - throttled_before;
    let share = reached as f64 / failing.sent() as f64;
    eprintln!(
        "[degradation] admission control: warm-up {} requests; then {} sent, {throttled} throttled, the upstream saw {reached} ({:.1}%)",
        warm.sent(),
        failing.sent(),
        share * 100.0
    );
    assert_eq!(throttled + reached, failing.sent());
    assert!(
        (0.05..=0.2).contains(&share),
        "the upstream saw {:.1}% of the requests",
        share * 100.0
    );

    // The upstream heals: accepts rise, and within a few windows nothing is throttled.
    upstream.set_behaviour(Behaviour::ok());
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = stat(&envoy, "throttled");
    let mut calm_for = 0;
    while calm_for < 5 && Instant::now() < deadline {
        load(
            addr,
            LoadSpec::new(4, Duration::from_millis(500), |_| Request::get("/api")),
        );
        let now = stat(&envoy, "throttled");
        calm_for = if now == last { calm_for + 1 } else { 0 };
        last = now;
    }
    assert_eq!(calm_for, 5, "still throttling after the upstream healed");
}

#[test]
fn a_probe_to_a_cluster_envoy_does_not_know_counts_as_failed_and_is_not_logged_per_probe() {
    let upstream = Upstream::start();
    let envoy = Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .concurrency(2)
            .seawall(
                r#"{"degradation": {"payments": {
                      "signals": {"probe": {"cluster": "nowhere", "interval": "100ms", "timeout": "50ms",
                                            "unhealthy_after": 2}},
                      "levels": [{"name": "critical", "enter": {"probe": "unhealthy"},
                                  "fallback": {"status": 503, "body": "down\n"}}]}},
                    "routes": [{"name": "all", "degradation": "payments"}]}"#,
            ),
    );
    // Probes that met a worker still at normal went to the upstream; nothing else may.
    let early = wait_for_level(
        &envoy,
        1,
        Some("critical"),
        &Request::get("/"),
        Duration::from_secs(10),
    );
    // Over a dozen unsent probes, so the log shows whether each one was logged.
    let failures = envoy.wait_for_stat(
        "wasmcustom.seawall.degradation.payments.probe_failures",
        Duration::from_secs(10),
        |failures| failures >= 12,
    );
    assert!(
        failures >= 12,
        "{failures} failed probes in 10 s at one per 100 ms"
    );
    let response = Client::connect(envoy.listener_addr())
        .send(&Request::get("/"))
        .unwrap();
    assert_eq!((response.status, response.text().as_str()), (503, "down\n"));
    assert_eq!(upstream.total(), early);
    assert_eq!(stat(&envoy, "probe_successes"), 0);
    // Over a dozen unsent probes, logged once by the lease holder (a lease that changed hands
    // could add one line per worker, never one per probe).
    let warnings = envoy
        .log()
        .matches("probe to cluster \"nowhere\" not sent")
        .count();
    assert!((1..=3).contains(&warnings), "{warnings} warnings");
}

#[test]
fn a_degraded_level_turns_retries_off_and_halves_the_rate_limits() {
    let upstream = Upstream::start();
    let health = Upstream::start();
    let envoy = probed(
        &upstream,
        &health,
        2,
        r#"{"rate_limits": {"api": {"rate": "20/s", "burst": 20}},
            "retries": {"twice": {"max_retries": 2, "budget": {"enabled": false}}},
            "degradation": {"payments": {
              "signals": {"probe": {"cluster": "health", "interval": "100ms", "timeout": "50ms",
                                    "unhealthy_after": 1, "healthy_after": 1}},
              "levels": [{"name": "degraded", "enter": {"probe": "unhealthy"}, "min_dwell": "30s",
                          "retries": false, "rate_limit_factor": 0.5}]}},
            "routes": [{"name": "flaky", "match": {"path": {"prefix": "/flaky"}}, "retry": "twice",
                        "degradation": "payments"},
                       {"name": "api", "rate_limits": ["api"], "degradation": "payments"}]}"#,
    );
    upstream.set_rule(
        Match::PathPrefix("/flaky".into()),
        Behaviour::ok().status(503),
    );
    let mut client = Client::connect(envoy.listener_addr());
    // Normal: the router retries twice.
    assert_eq!(client.send(&Request::get("/flaky")).unwrap().status, 503);
    assert_eq!(upstream.count_path("/flaky"), 3);

    health.set_rule(
        Match::PathPrefix("/healthz".into()),
        Behaviour::ok().status(503),
    );
    // A /flaky request shows each worker's level without touching the api route's bucket.
    wait_for_level(
        &envoy,
        1,
        Some("degraded"),
        &Request::get("/flaky-probe"),
        Duration::from_secs(10),
    );
    upstream.reset_counters();
    let response = client.send(&Request::get("/flaky")).unwrap();
    assert_eq!(response.status, 503);
    assert_eq!(response.header("x-seawall-degraded"), Some("degraded"));
    assert_eq!(
        upstream.count_path("/flaky"),
        1,
        "no retries while degraded"
    );

    // The bucket (20/s, burst 20) is scaled to 10/s, burst 10: a burst of 40 gets about 10, and
    // one more each 100 ms from the first admission to the last, as the upstream saw them arrive
    // (±1: the refill is counted in whole tokens). By the client's clock, never more than the
    // refill over the whole burst allows.
    let started = Instant::now();
    let mut admitted = 0;
    for _ in 0..40 {
        if client.send(&Request::get("/api")).unwrap().status == 200 {
            admitted += 1;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let window = upstream
        .arrival_window("/api")
        .map_or(0.0, |(first, last)| (last - first).as_secs_f64());
    let expected = 10.0 + 10.0 * window;
    let ceiling = 10 + (wall * 10.0).floor() as u64 + 1;
    eprintln!(
        "[degradation] degraded rate limit: {admitted} of 40 admitted over the upstream's {window:.3} s (expected {expected:.1} ± 1: burst 10 + 10/s; ceiling {ceiling} from the client's {wall:.3} s)"
    );
    assert!(admitted >= 10, "{admitted} admitted: the burst is 10");
    assert!(
        (admitted as f64 - expected).abs() <= 1.0,
        "{admitted} admitted, expected {expected:.1} ± 1"
    );
    assert!(
        admitted <= ceiling,
        "{admitted} admitted, more than burst 10 + 10/s over {wall:.3} s"
    );
    assert_eq!(upstream.count_path("/api"), admitted);
}
