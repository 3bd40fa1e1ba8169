//! Circuit breakers in real Envoy with four workers: the breaker opens at its threshold and then
//! shields the upstream (its own counter proves it), fails fast, lets exactly `half_open_probes`
//! probes through at once across all workers, closes when they succeed, trips on slow calls with
//! a growing open period, counts resets from Envoy's response flags, and frees the slot of a probe
//! whose client went away.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use seawall_integration::client::{load, Client, LoadSpec, Request, Response};
use seawall_integration::{Behaviour, Envoy, EnvoyConfig, Gate, RouteSpec, Upstream};

fn guarded(upstream: &Upstream, plugin: &str) -> Envoy {
    Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .concurrency(4)
            .seawall(plugin),
    )
}

const CB: &str = "seawall.circuit_breaker.payments";

/// Waits (bounded) until the breaker's `counter` reaches `at_least`.
fn wait_for(envoy: &Envoy, counter: &str, at_least: u64) -> u64 {
    envoy.wait_for_stat(
        &format!("wasmcustom.{CB}.{counter}"),
        Duration::from_secs(10),
        |value| value >= at_least,
    )
}

fn refused_as_open(response: &Response) -> bool {
    response.status == 503 && response.header("x-seawall-circuit") == Some("open")
}

/// Sends `request` once the open period is over, and returns the first answer that is not an
/// open breaker's refusal. Each refusal says in `retry-after` how long the period still runs
/// (Envoy's clock, rounded up), so that is how long to wait before asking again; bounded.
fn after_the_open_period(client: &mut Client, request: &Request) -> Response {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = client.send(request).unwrap();
        if !refused_as_open(&response) {
            return response;
        }
        assert!(
            Instant::now() < deadline,
            "the breaker was still open after 20 s"
        );
        let wait = response.header_u64("retry-after").unwrap();
        std::thread::sleep(Duration::from_secs(wait));
    }
}

#[test]
fn an_open_breaker_shields_the_upstream_then_exactly_the_probes_go_through_and_close_it() {
    let upstream = Upstream::start();
    let envoy = guarded(
        &upstream,
        r#"{"circuit_breakers": {"payments": {
              "open_when": {"consecutive_failures": 5, "failure_rate": 50, "min_requests": 20, "window": "10s"},
              "open_for": "3s", "max_open_for": "30s", "half_open_probes": 3}},
            "routes": [{"name": "pay", "circuit_breaker": "payments"}]}"#,
    );
    let addr = envoy.listener_addr();
    let mut client = Client::connect(addr);
    for _ in 0..20 {
        assert_eq!(client.send(&Request::get("/pay")).unwrap().status, 200);
    }

    // The upstream goes down: 8 connections flood for 1 s, a third of the open period.
    upstream.set_behaviour(Behaviour::ok().status(503));
    upstream.reset_counters();
    let flood = load(
        addr,
        LoadSpec::new(8, Duration::from_secs(1), |_| Request::get("/pay")),
    );
    let reached = upstream.total();
    let stats = envoy.stats();
    let rejected = stats.seawall(&format!("{CB}.rejected"));
    eprintln!(
        "[breaker] flood of {} requests while the upstream fails: upstream saw {reached}, {rejected} rejected fast; latency p50 {:?} p99 {:?}",
        flood.sent(),
        flood.percentile(50.0),
        flood.percentile(99.0)
    );
    assert_eq!(flood.errors, 0);
    assert_eq!(flood.count(503), flood.sent(), "{:?}", flood.statuses);
    assert!(
        flood.sent() > 200,
        "the flood must be a flood: {}",
        flood.sent()
    );
    assert_eq!(stats.seawall(&format!("{CB}.opened")), 1);
    // Five failures open it; at most the other connections' requests in flight at that moment
    // also reach the upstream. After that, nothing does until the open period ends.
    assert!(
        (5..=5 + 8).contains(&reached),
        "the upstream saw {reached} requests"
    );
    assert_eq!(rejected + reached, flood.sent());
    assert_eq!(stats.seawall(&format!("{CB}.open")), 1);
    let mut fresh = Client::connect(addr);
    let refused = fresh.send(&Request::get("/pay")).unwrap();
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("x-seawall-circuit"), Some("open"));
    let retry_after = refused.header_u64("retry-after").unwrap();
    assert!((1..=3).contains(&retry_after), "retry-after {retry_after}");
    assert_eq!(
        upstream.total(),
        reached,
        "a refusal never reaches the upstream"
    );

    // The upstream heals but holds its answers until the scenario lets them go, so the probes
    // are all out at once. 8 connections flood from now on: refused while the breaker is open,
    // then only three requests may reach the upstream, however long the flood goes on while they
    // are out (here 600 ms after the third arrived).
    let gate = Gate::new();
    upstream.set_behaviour(Behaviour::ok().held(&gate));
    upstream.reset_counters();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::new(AtomicUsize::new(0));
    let flooders: Vec<_> = (0..8)
        .map(|_| {
            let (stop, stopped) = (Arc::clone(&stop), Arc::clone(&stopped));
            std::thread::spawn(move || {
                let mut client = Client::connect(addr);
                let mut statuses = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    statuses.push(client.send(&Request::get("/pay")).unwrap().status);
                }
                stopped.fetch_add(1, Ordering::SeqCst);
                statuses
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while upstream.total() < 3 {
        assert!(
            Instant::now() < deadline,
            "the probes did not reach the upstream within 20 s ({} did)",
            upstream.total()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(600));
    stop.store(true, Ordering::SeqCst);
    // The five connections without a probe stop; the three probes wait for the gate.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stopped.load(Ordering::SeqCst) < 5 {
        assert!(
            Instant::now() < deadline,
            "the flood did not stop within 10 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (total, peak) = (upstream.total(), upstream.peak_in_flight());
    gate.open();
    let statuses: Vec<u16> = flooders
        .into_iter()
        .flat_map(|flooder| flooder.join().unwrap())
        .collect();
    let stats = envoy.stats();
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    eprintln!(
        "[breaker] half-open flood: {} requests, upstream saw {total} (peak {peak} in flight), {ok} answered 200",
        statuses.len(),
    );
    assert_eq!(total, 3, "exactly half_open_probes requests");
    assert_eq!(peak, 3);
    assert_eq!(ok, 3);
    assert_eq!(upstream.total(), 3);
    assert_eq!(stats.seawall(&format!("{CB}.probes")), 3);
    assert_eq!(stats.seawall(&format!("{CB}.half_opened")), 1);
    assert_eq!(
        wait_for(&envoy, "closed", 1),
        1,
        "three good probes close it"
    );
    let stats = envoy.stats();
    assert_eq!(stats.seawall(&format!("{CB}.open")), 0);
    assert_eq!(stats.seawall(&format!("{CB}.half_open")), 0);
    assert_eq!(stats.seawall(&format!("{CB}.reopened")), 0);

    // Closed again: a healthy flood records every outcome on the one shared record.
    upstream.set_behaviour(Behaviour::ok());
    upstream.reset_counters();
    let before = envoy.stats().seawall(&format!("{CB}.cas_retries"));
    let healthy = load(
        addr,
        LoadSpec::new(8, Duration::from_secs(2), |_| Request::get("/pay")),
    );
    let stats = envoy.stats();
    let retries = stats.seawall(&format!("{CB}.cas_retries")) - before;
    eprintln!(
        "[breaker] healthy flood: {} requests, all to the upstream; {retries} CAS retries ({:.4} per request)",
        healthy.sent(),
        retries as f64 / healthy.sent() as f64
    );
    assert_eq!(healthy.count(200), healthy.sent(), "{:?}", healthy.statuses);
    assert_eq!(upstream.total(), healthy.sent());
    assert_eq!(stats.seawall(&format!("{CB}.cas_exhausted")), 0);
    assert_eq!(stats.seawall(&format!("{CB}.untracked")), 0);
    assert_eq!(stats.seawall(&format!("{CB}.opened")), 1);
}

#[test]
fn a_slow_upstream_trips_the_slow_call_rule_and_each_failed_probe_doubles_the_open_period() {
    let upstream = Upstream::start();
    upstream.set_behaviour(Behaviour::ok().delay(Duration::from_millis(250)));
    let envoy = guarded(
        &upstream,
        r#"{"circuit_breakers": {"payments": {"key": "route",
              "failure": {"slow_call": "100ms"},
              "open_when": {"slow_call_rate": 50, "min_requests": 4, "window": "10s"},
              "open_for": "1s", "max_open_for": "8s"}},
            "routes": [{"name": "pay", "circuit_breaker": "payments"}]}"#,
    );
    let addr = envoy.listener_addr();
    let slow = load(addr, {
        let mut spec = LoadSpec::new(4, Duration::from_secs(5), |_| Request::get("/pay"));
        spec.total = Some(8);
        spec
    });
    assert_eq!(slow.count(200), upstream.total(), "{:?}", slow.statuses);

    // The first four slow calls opened it for 1 s, at most 250 ms ago (the calls still in flight
    // then): the first refusal comes at once, before anything else. Each probe is slow again, so
    // the breaker reopens, for twice as long each time.
    let mut client = Client::connect(addr);
    let mut periods = Vec::new();
    for _ in 0..4 {
        let before = upstream.total();
        let refused = client.send(&Request::get("/pay")).unwrap();
        assert_eq!(refused.status, 503);
        assert_eq!(refused.header("x-seawall-circuit"), Some("open"));
        assert_eq!(
            upstream.total(),
            before,
            "nothing reaches the upstream while open"
        );
        periods.push(refused.header_u64("retry-after").unwrap());
        let probe = after_the_open_period(&mut client, &Request::get("/pay"));
        assert_eq!(probe.status, 200, "the probe reaches the upstream");
        assert_eq!(upstream.total(), before + 1);
    }
    eprintln!("[breaker] open periods after repeated slow probes: {periods:?} s");
    assert_eq!(periods, [1, 2, 4, 8]);
    assert_eq!(wait_for(&envoy, "reopened", 4), 4);
    let stats = envoy.stats();
    assert_eq!(stats.seawall(&format!("{CB}.opened")), 1);
    assert!(stats.seawall(&format!("{CB}.slow_calls")) >= 4);
    assert_eq!(stats.seawall(&format!("{CB}.failures")), 0);
}

/// Sends a request on a raw connection once the open period is over (each refusal before that
/// says how long to wait), and hangs up as soon as that request, the probe, reached the
/// upstream.
fn send_a_probe_and_hang_up(addr: SocketAddr, upstream: &Upstream) {
    let deadline = Instant::now() + Duration::from_secs(20);
    'attempt: loop {
        let before = upstream.total();
        let mut probe = TcpStream::connect(addr).unwrap();
        probe
            .write_all(b"GET /pay HTTP/1.1\r\nhost: seawall.test\r\n\r\n")
            .unwrap();
        probe
            .set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let mut answer = Vec::new();
        loop {
            if upstream.total() > before {
                assert_eq!(upstream.total(), before + 1);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no probe reached the upstream within 20 s"
            );
            let mut chunk = [0u8; 1024];
            match probe.read(&mut chunk) {
                Ok(0) => panic!("Envoy closed the probe's connection without an answer"),
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
                Err(_) => {}
            }
            let text = String::from_utf8_lossy(&answer).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let head = &text[..end];
                // Refused: the breaker is still open for `retry-after` seconds.
                assert!(head.contains("x-seawall-circuit: open"), "{head}");
                let wait: u64 = head
                    .lines()
                    .find_map(|line| line.strip_prefix("retry-after: "))
                    .and_then(|value| value.trim().parse().ok())
                    .unwrap_or_else(|| panic!("a refusal without retry-after: {head}"));
                std::thread::sleep(Duration::from_secs(wait));
                continue 'attempt;
            }
        }
    }
}

#[test]
fn resets_count_from_envoys_flags_and_a_probe_whose_client_leaves_frees_its_slot() {
    let upstream = Upstream::start();
    upstream.set_behaviour(Behaviour::ok().resetting());
    // Statuses count nothing here, so only the response flags can open the breaker.
    let envoy = guarded(
        &upstream,
        r#"{"circuit_breakers": {"payments": {"key": "route",
              "failure": {"statuses": [], "resets": true},
              "open_when": {"consecutive_failures": 3}, "open_for": "1s", "max_open_for": "1s"}},
            "routes": [{"name": "pay", "circuit_breaker": "payments"}]}"#,
    );
    let addr = envoy.listener_addr();
    let mut client = Client::connect(addr);
    for _ in 0..3 {
        let reset = client.send(&Request::get("/pay")).unwrap();
        assert_eq!(reset.status, 503, "Envoy answers a reset upstream with 503");
    }
    assert_eq!(wait_for(&envoy, "opened", 1), 1);
    assert_eq!(envoy.stats().seawall(&format!("{CB}.failures")), 3);
    let refused = client.send(&Request::get("/pay")).unwrap();
    assert_eq!(refused.header("x-seawall-circuit"), Some("open"));

    // The probe's client hangs up while the upstream is still thinking.
    upstream.set_behaviour(Behaviour::ok().delay(Duration::from_secs(3)));
    send_a_probe_and_hang_up(addr, &upstream);
    assert_eq!(wait_for(&envoy, "probes", 1), 1);
    // Its slot comes back when Envoy ends the stream, so the next request is a probe, not a 503.
    upstream.set_behaviour(Behaviour::ok());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = 0;
    while Instant::now() < deadline {
        last = client.send(&Request::get("/pay")).unwrap().status;
        if last == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(last, 200, "the abandoned probe's slot was given back");
    let stats = envoy.stats();
    assert_eq!(stats.seawall(&format!("{CB}.probes")), 2);
    assert_eq!(stats.seawall(&format!("{CB}.reopened")), 0);
    assert_eq!(wait_for(&envoy, "closed", 1), 1);
}

#[test]
fn each_upstream_cluster_has_its_own_breaker() {
    let payments = Upstream::start();
    let catalog = Upstream::start();
    let envoy = Envoy::start(
        EnvoyConfig::new()
            .cluster("payments", payments.addr())
            .cluster("catalog", catalog.addr())
            .route(RouteSpec::prefix("to-payments", "/pay", "payments"))
            .route(RouteSpec::prefix("to-catalog", "/", "catalog"))
            .concurrency(2)
            .seawall(
                r#"{"circuit_breakers": {"payments": {"open_when": {"consecutive_failures": 3}, "open_for": "30s"}},
                    "routes": [{"name": "all", "circuit_breaker": "payments"}]}"#,
            ),
    );
    payments.set_behaviour(Behaviour::ok().status(503));
    let mut client = Client::connect(envoy.listener_addr());
    for _ in 0..3 {
        assert_eq!(client.send(&Request::get("/pay")).unwrap().status, 503);
    }
    assert_eq!(wait_for(&envoy, "opened", 1), 1);
    let refused = client.send(&Request::get("/pay")).unwrap();
    assert_eq!(refused.header("x-seawall-circuit"), Some("open"));
    assert_eq!(payments.total(), 3);
    // The same breaker policy keeps a separate, closed record for the other cluster.
    for _ in 0..5 {
        assert_eq!(client.send(&Request::get("/items")).unwrap().status, 200);
    }
    assert_eq!(catalog.total(), 5);
    let stats = envoy.stats();
    assert_eq!(stats.seawall(&format!("{CB}.open")), 1);
    assert_eq!(stats.seawall(&format!("{CB}.successes")), 5);
}

/// Issue 15: closed-state successes are tallied on each worker and reach the shared window on
/// the worker's tick. Once the ticks have passed, a failure is judged on every worker's
/// successes: with 30 successes on each of the four workers and a 50% failure rate, the breaker
/// opens at exactly the 120th failure, as it did when every success was written at once.
#[test]
fn successes_tallied_on_every_worker_count_in_full_once_a_tick_has_passed() {
    let upstream = Upstream::start();
    let envoy = guarded(
        &upstream,
        r#"{"circuit_breakers": {"payments": {"open_when": {"failure_rate": 50, "min_requests": 20, "window": "30s"},
                                              "open_for": "30s"}},
            "routes": [{"name": "pay", "circuit_breaker": "payments"}]}"#,
    );
    let mut clients = envoy.client_per_worker();
    for client in clients.iter_mut() {
        for _ in 0..30 {
            assert_eq!(client.send(&Request::get("/pay/ok")).unwrap().status, 200);
        }
    }
    // Counted at stream end; `stats()` then waits for every worker's next ticks, which write the
    // tallies before they flush the metrics.
    wait_for(&envoy, "successes", 120);
    let stats = envoy.stats();
    let tallied = stats.seawall(&format!("{CB}.tallied_successes"));
    eprintln!(
        "[breaker] 120 successes on 4 workers, {tallied} of them tallied and written on a tick"
    );
    assert!(tallied > 0, "successes on a quiet breaker were tallied");

    upstream.set_behaviour(Behaviour::ok().status(503));
    let client = &mut clients[0];
    let mut failures = 0;
    loop {
        let response = client.send(&Request::get("/pay/fail")).unwrap();
        if refused_as_open(&response) {
            break;
        }
        assert_eq!(response.status, 503);
        failures += 1;
        assert!(failures <= 200, "the breaker never opened");
    }
    assert_eq!(
        upstream.count_path("/pay/fail"),
        failures,
        "the upstream served exactly the failures seawall let through"
    );
    assert_eq!(
        failures, 120,
        "50% of 120 successes and n failures first holds at n = 120"
    );
}
