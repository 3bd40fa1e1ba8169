//! The config contract end to end: JSON in, compiled config or path-named errors out.

// A test crate: a failed unwrap is how it reports a failed expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

use seawall::config::{compile, ConfigErrors};
use seawall::request::{Attribute, FakeRequest, RequestView, Scratch};

fn errors(json: &str) -> Vec<String> {
    match compile(json.as_bytes()) {
        Ok(_) => panic!("expected {json} to be refused"),
        Err(ConfigErrors(errors)) => errors.iter().map(ToString::to_string).collect(),
    }
}

/// The name of the route `request` matches under `json`.
fn matched(json: &str, request: FakeRequest) -> Option<String> {
    let config = compile(json.as_bytes()).unwrap();
    let mut source = request;
    let mut scratch = Scratch::for_plan(&config.attributes);
    let mut view = RequestView::new(&config.attributes, &mut source, &mut scratch);
    let index = config.routes.find(&mut view)?;
    Some(config.routes.get(index).unwrap().name.clone())
}

#[test]
fn empty_config_is_a_pass_through() {
    for empty in ["", "  \n", "{}"] {
        let config = compile(empty.as_bytes()).unwrap();
        assert!(config.routes.is_empty());
        assert!(config.attributes.is_empty());
        assert_eq!(config.name, "seawall");
    }
}

#[test]
fn syntax_errors_say_where() {
    let found = errors(r#"{"routes": [}"#);
    assert_eq!(found.len(), 1);
    assert!(
        found[0].starts_with("not valid JSON: expected value at line 1 column 13"),
        "{found:?}"
    );
    assert_eq!(errors("[1]"), ["expected a JSON object, got an array"]);
}

#[test]
fn unknown_fields_are_errors_everywhere() {
    assert_eq!(
        errors(r#"{"rutes": []}"#),
        ["rutes: unknown field, expected one of name, routes, rate_limits, circuit_breakers, retries, faults, degradation, debug"]
    );
    let found = errors(r#"{"routes": [{"name": "a", "matchh": {}}]}"#);
    assert_eq!(found.len(), 1);
    assert!(
        found[0].starts_with("routes[0].matchh: unknown field `matchh`, expected one of"),
        "{found:?}"
    );
    let found = errors(r#"{"routes": [{"name": "a", "match": {"path": {"prefx": "/"}}}]}"#);
    assert!(
        found[0].starts_with("routes[0].match.path.prefx: unknown field `prefx`"),
        "{found:?}"
    );
    let found = errors(
        r#"{"routes": [{"name": "a", "match": {"headers": [{"name": "x", "exact": "1", "regex": "."}]}}]}"#,
    );
    assert!(
        found[0].starts_with("routes[0].match.headers[0].regex: unknown field `regex`"),
        "{found:?}"
    );
    assert!(errors(r#"{"debug": {"route_headers": true}}"#)[0]
        .starts_with("debug.route_headers: unknown field `route_headers`"));
}

#[test]
fn wrong_types_name_the_path() {
    assert_eq!(
        errors(r#"{"routes": {}}"#),
        ["routes: expected an array of routes, got an object"]
    );
    let found = errors(r#"{"routes": [{"name": "a", "match": {"methods": "GET"}}]}"#);
    assert!(
        found[0].starts_with(
            "routes[0].match.methods: invalid type: string \"GET\", expected a sequence"
        ),
        "{found:?}"
    );
    assert_eq!(
        errors(r#"{"name": 7}"#),
        ["name: expected a string, got a number"]
    );
}

#[test]
fn several_independent_errors_are_reported_together() {
    let found = errors(
        r#"{
        "name": "bad name",
        "routes": [
            {"name": "ok", "match": {"path": {"prefix": "no-slash"}}},
            {"name": "ok", "match": {"methods": ["get"]}},
            {"name": "x", "rate_limits": ["missing"], "circuit_breaker": "gone"}
        ]
    }"#,
    );
    assert_eq!(
        found,
        [
            r#"name: expected a name of 1 to 64 letters, digits, '-' or '_', got "bad name""#,
            r#"routes[0].match.path.prefix: expected a path starting with '/', got "no-slash""#,
            r#"routes[1].name: "ok" is defined twice"#,
            r#"routes[1].match.methods[0]: expected an uppercase HTTP method like "GET", got "get""#,
            r#"routes[2].rate_limits[0]: expected the name of a defined rate limit, got "missing""#,
            r#"routes[2].circuit_breaker: expected the name of a defined circuit breaker, got "gone""#,
        ]
    );
    let message = compile(br#"{"routes": [{"name": "a.b"}, {"name": "c", "faults": ["f"]}]}"#)
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        r#"2 problems: routes[0].name: expected a name of 1 to 64 letters, digits, '-' or '_', got "a.b"; routes[1].faults[0]: expected the name of a defined fault, got "f""#
    );
}

#[test]
fn a_bad_degradation_policy_names_each_problem_by_its_path() {
    let found = errors(
        r#"{"circuit_breakers": {"cb": {"open_when": {"consecutive_failures": 3}}},
            "degradation": {"payments": {
              "signals": {"circuit_breaker": "nope", "window": "50ms",
                          "probe": {"cluster": "", "path": "healthz", "interval": "1s", "timeout": "2s", "healthy_after": 0}},
              "priority": {"header": "x priority", "default": "vip", "classes": ["low", "low"]},
              "levels": [
                {"name": "degraded", "enter": {}, "shed_below": "gold", "rate_limit_factor": 1.5,
                 "reroute": {"cluster": "", "header": "x-cluster"}},
                {"name": "critical", "enter": {"failure_rate": 20, "probe": "down"}, "exit": {"failure_rate": 30},
                 "fallback": {"status": 99, "routes": ["other"]}}]}},
            "routes": [{"name": "a", "degradation": "payments"},
                       {"name": "other"}, {"name": "c", "priority": "low"}]}"#,
    );
    assert_eq!(
        found,
        [
            "degradation.payments.signals.window: expected a window of at least 1000ms (one 100ms tick for each of its 10 buckets), got 50ms",
            "degradation.payments.signals.probe.cluster: expected the name of an Envoy cluster",
            r#"degradation.payments.signals.probe.path: expected a path starting with '/', got "healthz""#,
            "degradation.payments.signals.probe.timeout: expected a timeout of at least 1ms and at most the interval (1s), got 2s",
            "degradation.payments.signals.probe.healthy_after: expected a count from 1 to 100, got 0",
            r#"degradation.payments.priority.classes[1]: expected a unique class name of letters, digits, '-' or '_', got "low""#,
            r#"degradation.payments.priority.header: expected an HTTP header name, got "x priority""#,
            r#"degradation.payments.priority.default: expected one of the priority classes low, low, got "vip""#,
            "degradation.payments.levels[0].enter: expected at least one of failure_rate, p95_latency, probe or circuit_breaker",
            r#"degradation.payments.levels[0].shed_below: expected one of the priority classes low, low, got "gold""#,
            r#"degradation.payments.levels[0].reroute.cluster: expected an Envoy cluster name, got """#,
            "degradation.payments.levels[0].rate_limit_factor: expected a factor above 0 and at most 1, got 1.5",
            r#"degradation.payments.levels[1].enter.probe: expected "unhealthy", got "down""#,
            "degradation.payments.levels[1].exit.failure_rate: expected at most the enter threshold (20%), got 30%",
            "degradation.payments.levels[1].fallback.status: expected an HTTP status from 200 to 599, got 99",
            r#"routes[2].priority: expected a "degradation" policy on the route: priorities are its classes"#,
        ]
    );
    // Names that only the routes can check: a fallback's routes and the watched breaker.
    let found = errors(
        r#"{"degradation": {"payments": {
              "signals": {"circuit_breaker": "nope"},
              "levels": [{"name": "open", "enter": {"circuit_breaker": "open"},
                          "fallback": {"routes": ["other"]}}]}},
            "routes": [{"name": "a", "degradation": "payments", "priority": "urgent"},
                       {"name": "other"}]}"#,
    );
    assert_eq!(
        found,
        [
            r#"degradation.payments.signals.circuit_breaker: expected the name of a defined circuit breaker, got "nope""#,
            r#"routes[0].priority: expected one of the priority classes low, normal, high, critical, got "urgent""#,
            r#"degradation.payments.levels[0].fallback.routes[0]: expected the name of a route with "degradation": "payments", got "other""#,
        ]
    );
    assert_eq!(
        errors(r#"{"faults": []}"#),
        ["faults: expected an object of named fault policies, got an array"]
    );
}

#[test]
fn match_fields_need_exactly_one_form() {
    assert_eq!(
        errors(r#"{"routes": [{"name": "a", "match": {"path": {"exact": "/a", "prefix": "/"}}}]}"#),
        [r#"routes[0].match.path: expected exactly one of "exact" or "prefix""#]
    );
    assert_eq!(
        errors(r#"{"routes": [{"name": "a", "match": {"headers": [{"name": "x"}]}}]}"#),
        [r#"routes[0].match.headers[0]: expected exactly one of "exact", "prefix" or "present""#]
    );
    assert_eq!(
        errors(
            r#"{"routes": [{"name": "a", "match": {"headers": [{"name": "bad header", "present": true}]}}]}"#
        ),
        [r#"routes[0].match.headers[0].name: expected an HTTP header name, got "bad header""#]
    );
    assert_eq!(
        errors(r#"{"routes": [{"name": "a", "match": {"methods": []}}]}"#),
        [
            r#"routes[0].match.methods: expected at least one method (leave "methods" out to match any)"#
        ]
    );
}

const ROUTES: &str = r#"{
    "routes": [
        {"name": "checkout", "match": {"path": {"prefix": "/api/checkout"}, "methods": ["POST"],
                                       "headers": [{"name": "X-Tier", "exact": "free"}, {"name": "x-canary", "present": true}]}},
        {"name": "exact-health", "match": {"path": {"exact": "/healthz"}}},
        {"name": "shop", "match": {"authority": "shop.example.com"}},
        {"name": "admin-port", "match": {"authority": "admin.example.com:8443"}},
        {"name": "by-envoy-route", "match": {"route_name": "envoy-route-7"}},
        {"name": "by-cluster", "match": {"cluster": "payments"}},
        {"name": "no-debug", "match": {"path": {"prefix": "/api"}, "headers": [{"name": "x-debug", "present": false}, {"name": "x-ver", "prefix": "v2"}]}},
        {"name": "catch-all"}
    ]
}"#;

#[test]
fn first_matching_route_wins() {
    let checkout = FakeRequest::http("POST", "/api/checkout/cart?x=1")
        .header("x-tier", "free")
        .header("x-canary", "");
    assert_eq!(
        matched(ROUTES, checkout.clone()).as_deref(),
        Some("checkout")
    );
    // Any one condition failing falls through to later routes.
    let get = FakeRequest::http("GET", "/api/checkout")
        .header("x-tier", "free")
        .header("x-canary", "1");
    assert_eq!(matched(ROUTES, get).as_deref(), Some("catch-all"));
    let paid = FakeRequest::http("POST", "/api/checkout")
        .header("x-tier", "paid")
        .header("x-canary", "1");
    assert_eq!(matched(ROUTES, paid).as_deref(), Some("catch-all"));
    let no_canary = FakeRequest::http("POST", "/api/checkout").header("x-tier", "free");
    assert_eq!(matched(ROUTES, no_canary).as_deref(), Some("catch-all"));
}

#[test]
fn paths_match_exactly_or_by_prefix_without_the_query() {
    assert_eq!(
        matched(ROUTES, FakeRequest::http("GET", "/healthz?full=1")).as_deref(),
        Some("exact-health")
    );
    assert_eq!(
        matched(ROUTES, FakeRequest::http("GET", "/healthz/deep")).as_deref(),
        Some("catch-all")
    );
    assert_eq!(
        matched(ROUTES, FakeRequest::http("GET", "/HEALTHZ")).as_deref(),
        Some("catch-all")
    );
}

#[test]
fn authority_ignores_case_and_port_unless_a_port_is_configured() {
    let shop =
        |authority: &str| FakeRequest::http("GET", "/").with(Attribute::authority(), authority);
    assert_eq!(
        matched(ROUTES, shop("Shop.Example.com:8080")).as_deref(),
        Some("shop")
    );
    assert_eq!(
        matched(ROUTES, shop("shop.example.com")).as_deref(),
        Some("shop")
    );
    assert_eq!(
        matched(ROUTES, shop("admin.example.com:8443")).as_deref(),
        Some("admin-port")
    );
    assert_eq!(
        matched(ROUTES, shop("admin.example.com:9000")).as_deref(),
        Some("catch-all")
    );
    assert_eq!(
        matched(ROUTES, shop("evilshop.example.com")).as_deref(),
        Some("catch-all")
    );
}

#[test]
fn envoy_route_name_and_cluster_come_from_properties() {
    let by_route = FakeRequest::http("GET", "/").with(Attribute::route_name(), "envoy-route-7");
    assert_eq!(matched(ROUTES, by_route).as_deref(), Some("by-envoy-route"));
    let by_cluster = FakeRequest::http("GET", "/").with(Attribute::cluster_name(), "payments");
    assert_eq!(matched(ROUTES, by_cluster).as_deref(), Some("by-cluster"));
}

#[test]
fn header_absence_and_prefix() {
    let v2 = FakeRequest::http("GET", "/api/x").header("x-ver", "v2.1");
    assert_eq!(matched(ROUTES, v2.clone()).as_deref(), Some("no-debug"));
    assert_eq!(
        matched(ROUTES, v2.header("x-debug", "1")).as_deref(),
        Some("catch-all")
    );
}

#[test]
fn no_route_means_no_match() {
    let json = r#"{"routes": [{"name": "only", "match": {"path": {"prefix": "/only"}}}]}"#;
    assert_eq!(matched(json, FakeRequest::http("GET", "/other")), None);
    assert_eq!(
        matched(json, FakeRequest::new()),
        None,
        "a request without :path matches no path route"
    );
}

#[test]
fn hostile_attribute_values_are_just_bytes() {
    let json = r#"{"routes": [{"name": "tier", "match": {"headers": [{"name": "x-tier", "exact": "free"}]}}, {"name": "rest"}]}"#;
    let huge = vec![b'a'; 64 * 1024];
    let not_utf8 = vec![0xff, 0xfe, b'f', 0x80];
    assert_eq!(
        matched(json, FakeRequest::http("GET", "/").header("x-tier", &huge)).as_deref(),
        Some("rest")
    );
    assert_eq!(
        matched(
            json,
            FakeRequest::http("GET", "/").header("x-tier", &not_utf8)
        )
        .as_deref(),
        Some("rest")
    );
    let path = [b'/', 0xc3, 0x28];
    assert_eq!(
        matched(json, FakeRequest::new().with(Attribute::path(), path)).as_deref(),
        Some("rest")
    );
}

#[test]
fn each_attribute_is_read_once_however_many_routes_test_it() {
    let config = compile(ROUTES.as_bytes()).unwrap();
    let mut source = FakeRequest::http("GET", "/nothing");
    let mut scratch = Scratch::for_plan(&config.attributes);
    let mut view = RequestView::new(&config.attributes, &mut source, &mut scratch);
    assert!(config.routes.find(&mut view).is_some());
    drop(view);
    // Reads are lazy: a failed path test skips the rest of that route, so the method and the
    // custom headers of the routes in between are never read for this request.
    assert_eq!(
        source.reads,
        [
            Attribute::path(),
            Attribute::authority(),
            Attribute::route_name(),
            Attribute::cluster_name()
        ]
    );
}

#[test]
fn circuit_breaker_errors_name_their_paths() {
    let found = errors(
        r#"{"circuit_breakers": {
            "a": {"open_when": {}},
            "b": {"open_when": {"failure_rate": 0, "slow_call_rate": 50, "min_requests": 0, "window": "5ms"},
                  "open_for": "10s", "max_open_for": "5s", "half_open_probes": 0},
            "c": {"key": "path", "open_when": {"consecutive_failures": 3}},
            "d": {"key": "route", "max_keys": 10, "open_when": {"consecutive_failures": 0},
                  "on_open": {"status": 99, "headers": {"bad header": "x"}}},
            "e": {"open_when": {"consecutive_failures": 1},
                  "failure": {"statuses": ["6xx", 503], "grpc_statuses": ["unavailable", "ok", 17]}},
            "f": {"open_when": {"consecutive_failures": 1}, "mode": "sometimes"}
        }}"#,
    );
    assert_eq!(
        found,
        [
            r#"circuit_breakers.a.open_when: expected at least one of "consecutive_failures", "failure_rate" or "slow_call_rate""#,
            "circuit_breakers.b.open_when.failure_rate: expected a percentage above 0 (0 would open on the first request), got 0",
            r#"circuit_breakers.b.open_when.slow_call_rate: expected "failure.slow_call" too: it says which calls are slow"#,
            "circuit_breakers.b.open_when.min_requests: expected at least 1, got 0",
            "circuit_breakers.b.open_when.window: expected a window of at least 10ms, got 5ms",
            r#"circuit_breakers.b.max_open_for: expected at least "open_for" (10s), got 5s"#,
            "circuit_breakers.b.half_open_probes: expected from 1 to 1000 probes, got 0",
            r#"circuit_breakers.c.key: expected "cluster", "route" or {"header": "<name>"}, got "path""#,
            "circuit_breakers.d.open_when.consecutive_failures: expected at least 1, got 0",
            r#"circuit_breakers.d.max_keys: expected no "max_keys" with "key": "route": each route has its own record"#,
            "circuit_breakers.d.on_open.status: expected an HTTP status from 200 to 599, got 99",
            r#"circuit_breakers.d.on_open.headers.bad header: expected an HTTP header name, got "bad header""#,
            // serde stops at a struct's first error, in key order.
            r#"circuit_breakers.e.failure.grpc_statuses[2]: expected a gRPC status code from 0 to 16 or a name like "unavailable", got 17"#,
            "circuit_breakers.f.mode: unknown variant `sometimes`, expected one of `enforce`, `shadow`, `forced_open`, `disabled`",
        ]
    );
    let found = errors(
        r#"{"circuit_breakers": {"e": {"open_when": {"consecutive_failures": 1},
            "failure": {"grpc_statuses": ["unavailable", "ok"]}}}}"#,
    );
    assert_eq!(
        found,
        ["circuit_breakers.e.failure.grpc_statuses[1]: expected a failing gRPC status, got OK (0)"]
    );
    let found = errors(
        r#"{"circuit_breakers": {"e": {"open_when": {"consecutive_failures": 1},
            "failure": {"grpc_statuses": [17]}}}}"#,
    );
    assert_eq!(
        found,
        [
            r#"circuit_breakers.e.failure.grpc_statuses[0]: expected a gRPC status code from 0 to 16 or a name like "unavailable", got 17"#
        ]
    );
}

#[test]
fn circuit_breaker_defaults_are_what_operators_expect() {
    use seawall::config::circuit_breaker::{BreakerKey, BreakerMode};
    use std::time::Duration;
    let config = compile(
        br#"{"circuit_breakers": {"payments": {"open_when": {"failure_rate": 50}}},
             "routes": [{"name": "pay", "circuit_breaker": "payments"}]}"#,
    )
    .unwrap();
    let policy = &config.circuit_breakers[0];
    assert!(matches!(policy.key, BreakerKey::Cluster(_)));
    assert_eq!(policy.table.as_ref().map(|t| t.slots()), Some(100));
    assert_eq!(policy.mode, BreakerMode::Enforce);
    assert_eq!(policy.breaker.open_for, Duration::from_secs(5));
    assert_eq!(policy.breaker.max_open_for, Duration::from_secs(60));
    assert_eq!(policy.breaker.half_open_probes, 1);
    assert_eq!(policy.breaker.rules.min_requests, 20);
    assert_eq!(policy.breaker.rules.failure_rate_ppm, Some(500_000));
    assert_eq!(policy.breaker.rules.bucket_nanos, 1_000_000_000);
    assert!(policy.classifier.statuses.contains(500) && policy.classifier.statuses.contains(599));
    assert!(!policy.classifier.statuses.contains(429));
    assert_eq!(
        policy.classifier.grpc_codes,
        (1 << 4) | (1 << 13) | (1 << 14) | (1 << 15)
    );
    assert_eq!(policy.on_open.status, 503);
    let route = &config.routes.routes()[0];
    assert_eq!(
        route.policies.circuit_breaker.as_ref().map(|b| b.policy),
        Some(0)
    );
    assert!(config
        .attributes
        .iter()
        .any(|a| *a == Attribute::cluster_name()));

    let config = compile(
        br#"{"circuit_breakers": {"per-route": {"key": "route", "open_when": {"consecutive_failures": 3},
             "failure": {"statuses": [429, "5xx"], "grpc_statuses": ["UNAVAILABLE", "resource_exhausted"]}}},
             "routes": [{"name": "one", "circuit_breaker": "per-route"}, {"name": "two", "circuit_breaker": "per-route"}]}"#,
    )
    .unwrap();
    let records: Vec<_> = config
        .routes
        .routes()
        .iter()
        .map(|r| r.policies.circuit_breaker.clone().unwrap().record.unwrap())
        .collect();
    assert_eq!(
        records,
        [
            "sw:seawall:cb:per-route:route:one",
            "sw:seawall:cb:per-route:route:two"
        ]
    );
    let classifier = config.circuit_breakers[0].classifier;
    assert!(classifier.statuses.contains(429) && classifier.statuses.contains(503));
    assert_eq!(classifier.grpc_codes, (1 << 14) | (1 << 8));
}

/// The README's config example is the one operators copy: it must compile as written.
#[test]
fn the_readme_example_compiles() {
    let readme = include_str!("../README.md");
    let start = readme
        .find("```json\n")
        .expect("a json block in the README")
        + 8;
    let end = start + readme[start..].find("```").unwrap();
    let config = compile(&readme.as_bytes()[start..end]).unwrap();
    assert_eq!(config.name, "edge");
    assert_eq!(config.circuit_breakers.len(), 1);
    assert_eq!(config.rate_limits.len(), 2);
    assert_eq!(config.retries.len(), 1);
    assert_eq!(config.faults.len(), 1);
    assert_eq!(config.degradations.len(), 1);
}

/// Every `"section": {...}` JSON block of the README's policy reference (retries, faults,
/// degradation) compiles, given the routes and breaker it names.
#[test]
fn the_readme_policy_examples_compile() {
    let readme = include_str!("../README.md");
    let mut checked = 0;
    for block in readme.split("```json\n").skip(2) {
        let Some(end) = block.find("```") else {
            continue;
        };
        let section = block[..end].trim();
        if !section.starts_with('"') {
            continue;
        }
        let document = format!(
            r#"{{"circuit_breakers": {{"payments": {{"open_when": {{"consecutive_failures": 5}}}}}},
                "routes": [{{"name": "catalog", "degradation": "payments"}},
                           {{"name": "search", "degradation": "payments"}}],
                {section}}}"#
        );
        let document = if section.starts_with("\"degradation\"") {
            document
        } else {
            document.replace(r#", "degradation": "payments""#, "")
        };
        compile(document.as_bytes()).unwrap_or_else(|errors| panic!("{section}\n{errors}"));
        checked += 1;
    }
    assert_eq!(checked, 5, "policy examples found");
}

/// Issue 14, point 13: a 64-byte plugin name with a 64-byte policy name was refused, and the
/// message named neither field. The longest names the config allows now always fit the keys.
#[test]
fn the_longest_names_fit_every_shared_data_key() {
    let plugin = "p".repeat(64);
    let policy = "q".repeat(64);
    let json = format!(
        r#"{{"name": "{plugin}",
            "rate_limits": {{"{policy}": {{"rate": "1/s", "burst": 1, "key": [{{"header": "x-user"}}], "max_keys": 100000}}}},
            "circuit_breakers": {{"{policy}": {{"key": {{"header": "x-user"}}, "max_keys": 100000,
                                                "open_when": {{"consecutive_failures": 5}}}}}},
            "routes": [{{"name": "{policy}", "rate_limits": ["{policy}"], "circuit_breaker": "{policy}"}}]}}"#
    );
    let compiled = compile(json.as_bytes()).unwrap_or_else(|errors| panic!("{errors}"));
    let mut metrics = seawall::metrics::FakeMetrics::new();
    let engine = seawall::engine::Engine::new(compiled, &mut metrics).unwrap();
    let store = seawall::state::fake::FakeStore::new();
    assert!(engine.prepare_state(&store, 0x5ea_5ec2e7).unwrap() > 100_000);
}

/// Issue 14, point 13: windows shorter than the tick can fill, probe intervals under the tick,
/// `max_reject: 100` and `max_keys` beyond what Envoy can hold cheaply were accepted.
#[test]
fn settings_that_cannot_work_are_refused_with_their_paths() {
    let found = errors(
        r#"{"degradation": {"d": {
              "signals": {"window": "500ms", "probe": {"cluster": "health", "interval": "50ms", "timeout": "10ms"}},
              "levels": [{"name": "down", "enter": {"probe": "unhealthy"}}],
              "admission_control": {"window": "100ms"}}},
            "rate_limits": {"r": {"rate": "1/s", "burst": 1, "key": [{"header": "x-user"}], "max_keys": 100001}}}"#,
    );
    assert_eq!(
        found,
        [
            "rate_limits.r.max_keys: expected a number of keys from 1 to 100000, got 100001",
            "degradation.d.signals.window: expected a window of at least 1000ms (one 100ms tick for each of its 10 buckets), got 500ms",
            "degradation.d.signals.probe.interval: expected an interval of at least 100ms (probes go out on the tick), got 50ms",
            "degradation.d.admission_control.window: expected a window of at least 1000ms (one 100ms tick for each of its 10 buckets), got 100ms",
        ]
    );
    let found = errors(
        r#"{"degradation": {"d": {"levels": [{"name": "down", "enter": {"failure_rate": 50}}],
                                  "admission_control": {"max_reject": 100}}}}"#,
    );
    assert_eq!(
        found,
        ["degradation.d.admission_control.max_reject: expected a percentage below 100 (at 100 nothing reaches the upstream, so nothing shows it has recovered), got 100"]
    );
}

#[test]
fn rate_limit_headers_come_in_three_or_in_one_or_not_at_all() {
    use seawall::config::rate_limit::RateLimitHeaderForm;
    let form = |fields: &str| {
        let json = format!(
            r#"{{"rate_limits": {{"r": {{"rate": "1/s"{fields}}}}}, "routes": [{{"name": "a", "rate_limits": ["r"]}}]}}"#
        );
        compile(json.as_bytes()).unwrap().rate_limits[0].response_headers
    };
    assert_eq!(form(""), Some(RateLimitHeaderForm::Separate));
    assert_eq!(
        form(r#", "response_header_form": "combined""#),
        Some(RateLimitHeaderForm::Combined)
    );
    assert_eq!(form(r#", "response_headers": false"#), None);
    let found =
        errors(r#"{"rate_limits": {"r": {"rate": "1/s", "response_header_form": "draft-8"}}}"#);
    assert!(
        found[0].starts_with("rate_limits.r.response_header_form: unknown variant `draft-8`"),
        "{found:?}"
    );
}
