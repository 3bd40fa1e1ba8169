//! `seawall explain` against real Envoy: the demo config (envoy/demo.yaml) runs in Envoy 1.40 with
//! the demo's routes and clusters, and each request is sent to Envoy and explained by the CLI. The
//! route explain names must be the `x-seawall-route` Envoy answers with, and its decision (on
//! fresh state: every request here uses state no earlier request touched) must be the status the
//! client gets and whether the upstream saw the request.
//!
//! The CLI binary comes from `SEAWALL_CLI` (`cargo xtask test` builds it and sets it), or from
//! `target/debug/seawall` after `cargo build -p seawall-cli`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use seawall_integration::client::{Client, Request};
use seawall_integration::{demo, Envoy, EnvoyConfig, RouteSpec, Upstream};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn cli() -> PathBuf {
    let path = std::env::var("SEAWALL_CLI")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join("target/debug/seawall"));
    assert!(
        path.is_file(),
        "the seawall CLI is not at {}: build it with `cargo build -p seawall-cli` or set SEAWALL_CLI (cargo xtask test does both)",
        path.display()
    );
    path
}

/// One request as Envoy gets it and as explain is told about it.
struct Case {
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
}

fn case(
    method: &'static str,
    path: &'static str,
    headers: &[(&'static str, &'static str)],
) -> Case {
    Case {
        method,
        path,
        headers: headers.to_vec(),
    }
}

impl Case {
    /// The Envoy route the demo's route table gives it (`xds.route_name`): the reroute header is
    /// internal-only, so a client's own never selects `envoy-rerouted`.
    fn envoy_route(&self) -> &'static str {
        if self.path.starts_with("/api") {
            "envoy-api"
        } else {
            "envoy-default"
        }
    }

    fn explain(&self, config: &str) -> Value {
        let mut command = Command::new(cli());
        command
            .current_dir(workspace())
            .args(["explain", config, "--format", "json"])
            .args(["--method", self.method, "--path", self.path]);
        // The client sends `host: seawall.test` unless the case says otherwise.
        if !self.headers.iter().any(|(name, _)| *name == "host") {
            command.args(["--authority", "seawall.test"]);
        }
        command.args([
            "--route-name",
            self.envoy_route(),
            "--cluster",
            "demo_upstream",
        ]);
        for (name, value) in &self.headers {
            command.args(["-H", &format!("{name}: {value}")]);
        }
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "explain {} {}: {}",
            self.method,
            self.path,
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    fn request(&self) -> Request {
        let mut request = Request::get(self.path).method(self.method);
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        request
    }
}

#[test]
fn explain_matches_what_envoy_does_with_the_demo_config() {
    let upstream = Upstream::start();
    // The degradation policy's probes go to a server of their own, so the upstream counts only
    // the requests sent here.
    let health = Upstream::start();
    let config = demo::envoy_config(upstream.addr(), health.addr());
    let envoy = Envoy::start(config);
    let secret = ("x-chaos-key", "demo-chaos-secret-1");
    let cases = [
        case("POST", "/api/checkout", &[("x-user-id", "101")]),
        case(
            "GET",
            "/api/items",
            &[("x-tier", "free"), ("x-user-id", "102")],
        ),
        case("GET", "/api/items", &[]),
        case("DELETE", "/api/checkout/cart", &[("x-user-id", "103")]),
        case("GET", "/trial/start", &[]),
        case("GET", "/payments/charge", &[]),
        case("GET", "/flaky/thing", &[]),
        case("GET", "/slow/page", &[]),
        case(
            "GET",
            "/slow/abort",
            &[secret, ("x-seawall-fault-abort", "503")],
        ),
        case(
            "GET",
            "/slow/wrong-key",
            &[
                ("x-chaos-key", "wrong-secret-12345"),
                ("x-seawall-fault-abort", "503"),
            ],
        ),
        case("GET", "/shop/catalog/1", &[("x-priority", "low")]),
        case("GET", "/shop/search", &[("x-seawall-cluster", "elsewhere")]),
        case("GET", "/somewhere/else", &[]),
    ];
    let (upstream_seen, replies) = compare(&envoy, &upstream, "envoy/demo.yaml", &cases);
    assert_eq!(
        replies, 1,
        "one request was aborted by its header-controlled fault"
    );
    assert_eq!(upstream_seen, cases.len() - 1);

    // A client's own reroute header never reaches the upstream (explain lists it as removed).
    let search = upstream
        .received()
        .into_iter()
        .find(|r| r.path == "/shop/search")
        .unwrap();
    assert_eq!(search.header("x-seawall-cluster"), None);
}

/// Sends each case to Envoy and has explain decide it; checks they agree. Returns how many went
/// to the upstream and how many seawall answered.
fn compare(
    envoy: &Envoy,
    upstream: &Upstream,
    config_file: &str,
    cases: &[Case],
) -> (usize, usize) {
    let mut client = Client::connect(envoy.listener_addr());
    let mut upstream_seen = 0;
    let mut replies = 0;
    for case in cases {
        let explained = case.explain(config_file);
        let before = upstream.total();
        let response = client.send(&case.request()).unwrap();
        let reached = upstream.total() > before;
        let label = format!("{} {} {:?}", case.method, case.path, case.headers);

        let route = explained["route"].as_str();
        assert!(route.is_some(), "{label}: the demo routes every request");
        if reached {
            assert_eq!(response.header("x-seawall-route"), route, "{label}");
        }
        if let Some(header) = response.header("x-seawall-route") {
            assert_eq!(Some(header), route, "{label}");
        }

        let decision = &explained["decision"];
        assert_eq!(decision["by_chance"], false, "{label}: {decision}");
        let verdict = decision["verdict"].as_str().unwrap();
        let local = decision["status"].as_u64();
        match (verdict, local) {
            ("reply", Some(status)) | ("delayed", Some(status)) => {
                assert_eq!(u64::from(response.status), status, "{label}: {decision}");
                assert!(
                    !reached,
                    "{label}: answered by seawall, yet the upstream saw it"
                );
                replies += 1;
            }
            ("upstream", None) | ("delayed", None) => {
                let expected = decision["response_status"].as_u64().unwrap_or(200);
                assert_eq!(u64::from(response.status), expected, "{label}: {decision}");
                assert!(reached, "{label}: explain says the upstream gets it");
                upstream_seen += 1;
            }
            other => panic!("{label}: unexpected decision {other:?}"),
        }
        if verdict == "delayed" {
            // A lower bound only: the delay drawn is within its jitter, and the client's clock
            // can only add to it.
            let delay = decision["delay_ms"].as_u64().unwrap();
            assert!(
                response.elapsed >= Duration::from_millis(delay.saturating_sub(40)),
                "{label}: explain delays {delay}ms, Envoy answered in {:?}",
                response.elapsed
            );
        }
        eprintln!(
            "{label}: route {:?}, explain {verdict} {local:?}, Envoy {} (upstream {})",
            route.unwrap_or(""),
            response.status,
            if reached { "saw it" } else { "did not" }
        );
    }
    (upstream_seen, replies)
}

/// Decisions that refuse on fresh state, and routes matched on authority and headers: a
/// forced-open breaker, an abort for every request, a fault only for a header, and a route
/// chosen by authority.
#[test]
fn explain_matches_envoy_on_refusals_and_header_conditions() {
    let config = r#"{
      "name": "refusals",
      "debug": {"route_header": true},
      "circuit_breakers": {"tripped": {"mode": "forced_open", "open_when": {"consecutive_failures": 5},
                                       "on_open": {"status": 503, "body": "resting\n"}}},
      "faults": {"teapot": {"abort": {"status": 418, "percent": 100}},
                 "canary": {"abort": {"status": 500, "percent": 100},
                            "when": {"headers": [{"name": "x-canary", "present": true}]}}},
      "routes": [
        {"name": "tripped", "match": {"path": {"prefix": "/tripped"}}, "circuit_breaker": "tripped"},
        {"name": "teapot", "match": {"path": {"exact": "/tea"}, "methods": ["PUT"]}, "faults": ["teapot"]},
        {"name": "shop", "match": {"authority": "shop.example.com"}, "faults": ["canary"]},
        {"name": "rest"}
      ]
    }"#;
    let file =
        std::env::temp_dir().join(format!("seawall-cli-explain-{}.json", std::process::id()));
    std::fs::write(&file, config).unwrap();
    let upstream = Upstream::start();
    let envoy = Envoy::start(
        EnvoyConfig::new()
            .cluster("demo_upstream", upstream.addr())
            .route(RouteSpec::prefix("envoy-default", "/", "demo_upstream"))
            .seawall(config),
    );
    let cases = [
        case("GET", "/tripped/x", &[]),
        case("PUT", "/tea", &[]),
        case("GET", "/tea", &[]),
        case("PUT", "/tea?cup=1", &[]),
        case(
            "GET",
            "/",
            &[("host", "Shop.Example.com:8080"), ("x-canary", "1")],
        ),
        case("GET", "/", &[("host", "shop.example.com")]),
        case("GET", "/", &[("x-canary", "1")]),
    ];
    let (upstream_seen, replies) = compare(&envoy, &upstream, &file.to_string_lossy(), &cases);
    let _ = std::fs::remove_file(&file);
    assert_eq!((upstream_seen, replies), (3, 4));
}
