//! Retry budgets in real Envoy with several workers: the router retries as seawall tells it, the
//! budget caps retries at a share of the traffic across all workers (the upstream's own counter
//! proves it), transient failures are still absorbed, and no client can retry beyond the budget.

use std::time::Duration;

use seawall_integration::client::{load, Client, LoadSpec, Request};
use seawall_integration::{Behaviour, Envoy, EnvoyConfig, Match, RouteSpec, Upstream};

const PLUGIN: &str = r#"{
    "retries": {
        "budgeted": {"max_retries": 2, "retry_on": ["5xx"], "budget": {"ratio": 20, "min_per_second": 1, "window": "10s"},
                     "idempotency_header": "idempotency-key"},
        "unbudgeted": {"max_retries": 2, "retry_on": ["5xx"], "budget": {"enabled": false}},
        "single": {"max_retries": 1, "retry_on": ["5xx"], "budget": {"ratio": 100, "min_per_second": 100}},
        "defaults": {"max_retries": 2},
        "roomy": {"max_retries": 2, "budget": {"ratio": 30}}
    },
    "routes": [
        {"name": "budgeted", "match": {"path": {"prefix": "/budgeted"}}, "retry": "budgeted"},
        {"name": "unbudgeted", "match": {"path": {"prefix": "/unbudgeted"}}, "retry": "unbudgeted"},
        {"name": "single", "match": {"path": {"prefix": "/single"}}, "retry": "single"},
        {"name": "defaults", "match": {"path": {"prefix": "/defaults"}}, "retry": "defaults"},
        {"name": "roomy", "match": {"path": {"prefix": "/roomy"}}, "retry": "roomy"}
    ]
}"#;

fn retrying(upstream: &Upstream) -> Envoy {
    Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .concurrency(2)
            .seawall(PLUGIN),
    )
}

fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy.stats().seawall(&format!("seawall.retry.{name}"))
}

#[test]
fn a_failing_upstream_sees_ratio_plus_floor_retries_with_the_budget_and_max_retries_without() {
    let upstream = Upstream::start();
    upstream.set_behaviour(Behaviour::ok().status(503));
    let envoy = retrying(&upstream);
    let addr = envoy.listener_addr();
    let mut per_request = Vec::new();
    for path in ["/budgeted", "/unbudgeted"] {
        let report = load(
            addr,
            LoadSpec::new(8, Duration::from_secs(3), move |_| Request::get(path)),
        );
        let sent = report.sent();
        let attempts = upstream.count_path(path);
        assert_eq!(report.errors, 0);
        assert_eq!(report.count(503), sent, "{:?}", report.statuses);
        let ratio = attempts as f64 / sent as f64;
        eprintln!("[retry] {path}: {sent} requests, the upstream saw {attempts} attempts: {ratio:.3} per request");
        per_request.push((sent, attempts));
    }
    let (sent, attempts) = per_request[0];
    // The bound: every request once, 20% of them again, and the floor of 1/s over the 10 s window.
    let bound = sent + sent / 5 + 10;
    eprintln!(
        "[retry] budget bound 1 + 0.20 + 10/{sent} = {:.3} per request",
        bound as f64 / sent as f64
    );
    assert!(attempts <= bound, "{attempts} attempts, bound {bound}");
    assert!(
        attempts + 20 >= bound,
        "the budget was used: {attempts} of {bound}"
    );
    assert_eq!(stat(&envoy, "budgeted.used"), attempts - sent);
    assert!(stat(&envoy, "budgeted.denied_by_budget") > 0);
    assert_eq!(stat(&envoy, "budgeted.attempt_count_missing"), 0);
    let (sent, attempts) = per_request[1];
    assert_eq!(attempts, 3 * sent, "without a budget: 1 + max_retries");
}

/// At 20% failures a request needs 0.2 + 0.04 + ... = 0.25 retries on average, more than the
/// default 20% budget allows: a budget sized above the demand (30%) absorbs the failures, and
/// the default one is reported beside it.
#[test]
fn transient_failures_are_absorbed_within_the_budget() {
    let upstream = Upstream::start();
    upstream.set_behaviour(Behaviour::ok().failing(0.2, 503));
    let envoy = retrying(&upstream);
    let mut success = Vec::new();
    for policy in ["roomy", "defaults"] {
        let path = format!("/{policy}");
        let report = load(
            envoy.listener_addr(),
            LoadSpec::new(8, Duration::from_secs(3), move |_| Request::get(&path)),
        );
        let share = report.count(200) as f64 / report.sent() as f64;
        eprintln!(
            "[retry] 20% transient 503s, policy {policy}: {} of {} succeeded ({:.2}%), {} retries used, {} denied by the budget",
            report.count(200),
            report.sent(),
            100.0 * share,
            stat(&envoy, &format!("{policy}.used")),
            stat(&envoy, &format!("{policy}.denied_by_budget"))
        );
        assert_eq!(report.errors, 0);
        assert!(report.sent() > 200, "the load ran: {}", report.sent());
        success.push(share);
    }
    assert!(
        success[0] >= 0.98,
        "{:.4} success with a 30% budget",
        success[0]
    );
}

#[test]
fn clients_cannot_buy_retries_and_posts_need_an_idempotency_key() {
    let upstream = Upstream::start();
    upstream.set_behaviour(Behaviour::ok().status(503));
    upstream.set_rule(
        Match::PathPrefix("/budgeted".into()),
        Behaviour::ok().status(503),
    );
    let envoy = retrying(&upstream);
    let mut client = Client::connect(envoy.listener_addr());
    for _ in 0..20 {
        let response = client
            .send(
                &Request::get("/single")
                    .header("x-envoy-max-retries", "10")
                    .header("x-envoy-retry-on", "5xx,reset,retriable-4xx"),
            )
            .unwrap();
        assert_eq!(response.status, 503);
        assert_eq!(response.header("x-envoy-attempt-count"), Some("2"));
    }
    assert_eq!(
        upstream.count_path("/single"),
        40,
        "1 + max_retries (1), not 1 + 10"
    );

    for _ in 0..10 {
        assert_eq!(
            client.send(&Request::post("/budgeted")).unwrap().status,
            503
        );
    }
    assert_eq!(
        upstream.count_path("/budgeted"),
        10,
        "a POST is never retried"
    );
    assert_eq!(stat(&envoy, "budgeted.not_idempotent"), 10);
    let keyed = client
        .send(&Request::post("/budgeted").header("idempotency-key", "order-1"))
        .unwrap();
    assert_eq!(keyed.header("x-envoy-attempt-count"), Some("3"));
    assert_eq!(
        upstream.count_path("/budgeted"),
        13,
        "with a key it is retried"
    );
}

#[test]
fn without_the_attempt_count_nothing_breaks_and_it_is_counted() {
    let upstream = Upstream::start();
    let mut config = EnvoyConfig::to_upstream(upstream.addr())
        .concurrency(2)
        .seawall(PLUGIN);
    config.include_attempt_count = false;
    let envoy = Envoy::start(config);
    let mut client = Client::connect(envoy.listener_addr());
    for _ in 0..5 {
        assert_eq!(client.send(&Request::get("/budgeted")).unwrap().status, 200);
    }
    assert_eq!(stat(&envoy, "budgeted.attempt_count_missing"), 5);
    assert_eq!(stat(&envoy, "budgeted.granted"), 10);
}

/// With `"retry_policy_from": "envoy_route"` the Envoy route carries the retry policy and seawall
/// writes `x-envoy-max-retries` only to cut a grant: the budget still caps what a failing
/// upstream sees across both workers, a request the policy must not retry (a POST) is tried
/// once, and a healthy request costs no header write (the `hostcalls` scenario counts it).
#[test]
fn with_the_envoy_routes_retry_policy_the_budget_still_caps_the_attempts() {
    let upstream = Upstream::start();
    upstream.set_behaviour(Behaviour::ok().status(503));
    let mut routed = RouteSpec::prefix("routed", "/routed", "upstream");
    routed.route_extra = Some("retry_policy: {retry_on: 5xx, num_retries: 2}".to_owned());
    let envoy = Envoy::start(
        EnvoyConfig::new()
            .concurrency(2)
            .cluster("upstream", upstream.addr())
            .route(routed)
            .route(RouteSpec::prefix("default", "/", "upstream"))
            .seawall(
                r#"{"retries": {"routed": {"max_retries": 2, "retry_policy_from": "envoy_route",
                                           "budget": {"ratio": 20, "min_per_second": 1, "window": "10s"}}},
                    "routes": [{"name": "routed", "match": {"path": {"prefix": "/routed"}}, "retry": "routed"}]}"#,
            ),
    );
    let addr = envoy.listener_addr();
    let report = load(
        addr,
        LoadSpec::new(8, Duration::from_secs(3), |_| Request::get("/routed/item")),
    );
    let sent = report.sent();
    let attempts = upstream.count_path("/routed/item");
    assert_eq!(report.errors, 0);
    assert_eq!(report.count(503), sent, "{:?}", report.statuses);
    let bound = sent + sent / 5 + 10;
    eprintln!("[retry] envoy_route: {sent} requests, {attempts} attempts, bound {bound}");
    assert!(attempts <= bound, "{attempts} attempts, bound {bound}");
    assert!(
        attempts > sent,
        "the route's policy retried: {attempts} of {sent}"
    );
    assert_eq!(stat(&envoy, "routed.used"), attempts - sent);

    // A POST is not idempotent: seawall writes x-envoy-max-retries: 0 over the route's 2.
    let before = upstream.count_path("/routed/order");
    let mut client = Client::connect(addr);
    for _ in 0..10 {
        let response = client.send(&Request::post("/routed/order")).unwrap();
        assert_eq!(response.status, 503);
    }
    assert_eq!(upstream.count_path("/routed/order") - before, 10);
    assert_eq!(stat(&envoy, "routed.not_idempotent"), 10);
}
