//! A new plugin config every second for a minute while traffic flows, by LDS (the config inside
//! the listener) and by ECDS (Istio's way: the filter's own extension config). Operators push
//! configs under load all day; each push must cost nothing:
//! - no request fails: every answer is the upstream's or a policy's deliberate refusal;
//! - a policy the push leaves unchanged keeps its state: a spent rate limit hands out no fresh
//!   burst, an open breaker stays open and keeps the upstream out;
//! - a policy the push changes keeps its state within the new limit (the README's rule: a
//!   bucket's state never counts for more than the current limit allows), so alternating its rate
//!   never refills it either.
//!
//! What reached the upstream is the measure; the only time that enters a bound is the span
//! between the first and the last arrival the upstream saw.

use std::thread;
use std::time::{Duration, Instant};

use seawall_integration::client::{load, Client, LoadReport, LoadSpec, Request};
use seawall_integration::{
    Behaviour, EcdsOutcome, EcdsSpec, Envoy, EnvoyConfig, LdsOutcome, Match, Upstream,
};

const PUSHES: u32 = 60;
const PUSH_EVERY: Duration = Duration::from_secs(1);
/// The unchanged limit: a burst of 50, then 10 an hour (nothing more within the run).
const KEPT_BURST: u64 = 50;
/// The changed limit alternates between these rates (per minute), both with a burst of 20.
const CHANGED_BURST: u64 = 20;
const CHANGED_RATES: [u64; 2] = [5, 6];
/// The breaker opens after 3 failures in a row and stays open for 10 minutes.
const BREAKER_TRIPS_AFTER: u64 = 3;

/// Push `n` of the plugin config: the `kept` limit and the breaker are the same in every push;
/// the `changed` limit's rate alternates, and a route named after the push makes each config
/// differ from the last even where the rate repeats.
fn plugin_config(n: u32) -> String {
    let rate = CHANGED_RATES[n as usize % 2];
    format!(
        r#"{{"name": "reloads",
            "rate_limits": {{"kept": {{"rate": "10/h", "burst": {KEPT_BURST}}},
                             "changed": {{"rate": "{rate}/m", "burst": {CHANGED_BURST}}}}},
            "circuit_breakers": {{"payments": {{"open_when": {{"consecutive_failures": {BREAKER_TRIPS_AFTER}}}, "open_for": "10m"}}}},
            "routes": [{{"name": "push-{n}", "match": {{"path": {{"exact": "/push-{n}"}}}}}},
                       {{"name": "kept", "match": {{"path": {{"prefix": "/kept"}}}}, "rate_limits": ["kept"]}},
                       {{"name": "changed", "match": {{"path": {{"prefix": "/changed"}}}}, "rate_limits": ["changed"]}},
                       {{"name": "payments", "match": {{"path": {{"prefix": "/payments"}}}}, "circuit_breaker": "payments"}},
                       {{"name": "open"}}]}}"#
    )
}

/// Opens the breaker: the upstream fails /payments until it has tripped.
fn open_the_breaker(envoy: &Envoy, upstream: &Upstream) {
    upstream.set_rule(
        Match::PathPrefix("/payments".into()),
        Behaviour::ok().status(503),
    );
    let mut client = Client::connect(envoy.listener_addr());
    for _ in 0..BREAKER_TRIPS_AFTER {
        assert_eq!(client.send(&Request::get("/payments")).unwrap().status, 503);
    }
    let refused = client.send(&Request::get("/payments")).unwrap();
    assert_eq!(refused.status, 503);
    assert_eq!(
        upstream.count_path("/payments"),
        BREAKER_TRIPS_AFTER,
        "the breaker is open: the fourth request stayed out of the upstream"
    );
}

/// Traffic for the whole run: 3 connections through the policies' routes in turn, and 1 on the
/// route without a policy, whose every request must reach the upstream.
fn traffic(envoy: &Envoy, duration: Duration) -> thread::JoinHandle<(LoadReport, LoadReport)> {
    let addr = envoy.listener_addr();
    thread::spawn(move || {
        // Paced, so the run stays a test of pushes rather than of the machine: 100 requests a
        // second without a policy, 150 through the policies.
        let open = thread::spawn(move || {
            let mut spec = LoadSpec::new(1, duration, |_| Request::get("/open"));
            spec.rate = Some(100.0);
            load(addr, spec)
        });
        let mut spec = LoadSpec::new(3, duration, |n| match n % 3 {
            0 => Request::get("/kept"),
            1 => Request::get("/changed"),
            _ => Request::get("/payments"),
        });
        spec.rate = Some(150.0);
        let policies = load(addr, spec);
        (policies, open.join().unwrap())
    })
}

/// What the pushes must leave true, from what the upstream received and what the clients got.
fn assert_nothing_lost(
    upstream: &Upstream,
    (policies, open): &(LoadReport, LoadReport),
    accepted: u32,
) {
    eprintln!(
        "[reload] {accepted} pushes accepted; policies' routes: {} requests {:?}, {} errors; open route: {} requests {:?}, {} errors",
        policies.sent(),
        policies.statuses,
        policies.errors,
        open.sent(),
        open.statuses,
        open.errors,
    );
    assert_eq!(accepted, PUSHES, "every push was accepted");
    assert_eq!(policies.errors + open.errors, 0, "no request failed");
    // Only the upstream's answers and the policies' own refusals: 429 from a limit, 503 from
    // the open breaker (the upstream's 503s are over before the traffic starts).
    let unexpected: Vec<_> = policies
        .statuses
        .keys()
        .filter(|status| ![200, 429, 503].contains(*status))
        .collect();
    assert!(unexpected.is_empty(), "{:?}", policies.statuses);
    assert!(
        policies.sent() > 300,
        "the traffic ran: {}",
        policies.sent()
    );
    assert_eq!(open.count(200), open.sent(), "{:?}", open.statuses);
    assert_eq!(
        upstream.count_path("/open"),
        open.sent(),
        "every request without a policy reached the upstream"
    );

    // The unchanged limit: its burst, and nothing after it, whatever the pushes did.
    assert_eq!(upstream.count_path("/kept"), KEPT_BURST);
    // The changed limit: its burst plus what the faster of its rates refills over the span the
    // upstream saw (rounded up), never a burst per push.
    let (first, last) = upstream
        .arrival_window("/changed")
        .expect("/changed reached the upstream");
    let span = last.duration_since(first).as_secs_f64();
    let ideal = CHANGED_BURST + (CHANGED_RATES[1] as f64 * span / 60.0).ceil() as u64;
    let changed = upstream.count_path("/changed");
    eprintln!("[reload] /changed: {changed} admitted over {span:.1} s, at most {ideal}");
    assert!(changed >= CHANGED_BURST, "{changed}");
    assert!(changed <= ideal, "{changed} admitted, at most {ideal}");
    // The open breaker kept the upstream out throughout.
    assert_eq!(upstream.count_path("/payments"), BREAKER_TRIPS_AFTER);
}

#[test]
fn a_push_every_second_by_lds_loses_no_request_and_no_state() {
    let upstream = Upstream::start();
    let mut envoy = Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .concurrency(2)
            .xds_from_files(true)
            .seawall(&plugin_config(0)),
    );
    open_the_breaker(&envoy, &upstream);
    let run = PUSH_EVERY * (PUSHES + 1);
    let background = traffic(&envoy, run);
    let started = Instant::now();
    let mut accepted = 0;
    for n in 1..=PUSHES {
        let config = envoy.config().seawall(&plugin_config(n));
        if envoy.push_listener(&config) == LdsOutcome::Accepted {
            accepted += 1;
        }
        if let Some(wait) = (started + PUSH_EVERY * n).checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    let report = background.join().unwrap();
    let stats = envoy.stats();
    assert!(
        stats
            .get("listener_manager.lds.update_success")
            .unwrap_or(0)
            >= u64::from(PUSHES),
        "Envoy counted the pushes"
    );
    assert_nothing_lost(&upstream, &report, accepted);
    // The last push is the one serving.
    let newest = Client::connect(envoy.listener_addr())
        .send(&Request::get(&format!("/push-{PUSHES}")))
        .unwrap();
    assert_eq!(newest.status, 200);
    assert_eq!(upstream.count_path(&format!("/push-{PUSHES}")), 1);
}

#[test]
fn a_push_every_second_by_ecds_loses_no_request_and_no_state() {
    let upstream = Upstream::start();
    let mut envoy = Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .concurrency(2)
            .ecds(EcdsSpec::plugin(&plugin_config(0))),
    );
    open_the_breaker(&envoy, &upstream);
    let run = PUSH_EVERY * (PUSHES + 1);
    let background = traffic(&envoy, run);
    let started = Instant::now();
    let mut accepted = 0;
    for n in 1..=PUSHES {
        if envoy.push_extension_config(&plugin_config(n)) == EcdsOutcome::Applied {
            accepted += 1;
        }
        if let Some(wait) = (started + PUSH_EVERY * n).checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    let report = background.join().unwrap();
    assert_eq!(envoy.ecds_stats().update_rejected, 0);
    assert_nothing_lost(&upstream, &report, accepted);
}
