//! Seawall delivered the way Istio delivers a WasmPlugin: as an ECDS (extension config discovery)
//! update of the HTTP filter, the module on local disk, against real Envoy (`--concurrency 2`)
//! and without Kubernetes: a watched file stands in for istio-agent's ADS stream.
//!
//! What these pin down about Envoy 1.40, because operators act on it:
//! - a config seawall refuses is rejected and the last good one keeps serving, but Envoy still
//!   records the refused one as the subscription's latest: config_dump shows it, `config_reload`
//!   counts it, and the next listener update that carries the slot is rejected because Envoy
//!   builds the new filter chain from the refused config;
//! - what requests get while the extension config is missing or is istio-agent's FAIL_OPEN /
//!   FAIL_CLOSE stand-in.

use std::time::{Duration, Instant};

use seawall_integration::client::{load, Client, LoadSpec, Request};
use seawall_integration::{
    EcdsDocument, EcdsOutcome, EcdsSpec, EcdsStats, Envoy, EnvoyConfig, LdsOutcome, Upstream,
};

/// A route with a tight limit and a route without policies; both name themselves in a header.
fn limited(name: &str, burst: u32) -> String {
    format!(
        r#"{{"name": "{name}", "debug": {{"route_header": true}},
            "rate_limits": {{"tight-{name}": {{"rate": "1/m", "burst": {burst}}}}},
            "routes": [{{"name": "{name}-limited", "match": {{"path": {{"prefix": "/limited"}}}}, "rate_limits": ["tight-{name}"]}},
                       {{"name": "{name}-open"}}]}}"#
    )
}

/// Refused by seawall's on_configure: the rate is not a rate.
const REFUSED: &str = r#"{"name": "refused", "rate_limits": {"tight": {"rate": "fast", "burst": 1}},
    "routes": [{"name": "refused-limited", "match": {"path": {"prefix": "/limited"}}, "rate_limits": ["tight"]}]}"#;

/// Sends `count` requests to `path`, one connection each, and returns the statuses and the
/// route header of the last response.
fn statuses(envoy: &Envoy, path: &str, count: usize) -> (Vec<u16>, Option<String>) {
    let mut statuses = Vec::new();
    let mut route = None;
    for _ in 0..count {
        let response = Client::connect(envoy.listener_addr())
            .send(&Request::get(path))
            .expect("Envoy answers");
        statuses.push(response.status);
        route = response.header("x-seawall-route").map(str::to_owned);
    }
    (statuses, route)
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|&&s| s == status).count()
}

/// The RBAC filter's counters, for a failure message.
fn rbac_stats(envoy: &Envoy) -> String {
    let stats = envoy.current_stats();
    let rbac: Vec<_> = stats
        .values
        .iter()
        .filter(|(name, _)| name.contains(".rbac."))
        .collect();
    format!("{rbac:?}")
}

#[test]
fn the_example_extension_config_applies_and_a_good_push_replaces_it() {
    let upstream = Upstream::start();
    let example = include_str!("../../envoy/ecds/seawall.yaml");
    let mut envoy = Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .ecds(EcdsSpec::starting_with(EcdsDocument::Text(example.into()))),
    );
    // The example's limit: a burst of 5 for everyone.
    let (first, route) = statuses(&envoy, "/", 8);
    assert_eq!(
        (count(&first, 200), count(&first, 429)),
        (5, 3),
        "{first:?}"
    );
    assert_eq!(route.as_deref(), Some("all"));
    assert_eq!(
        upstream.total(),
        5,
        "the upstream saw only the admitted requests"
    );
    let stats = envoy.ecds_stats();
    assert_eq!(
        (
            stats.update_success,
            stats.update_rejected,
            stats.config_reload,
            stats.config_fail
        ),
        (1, 0, 1, 0),
        "{stats:?}"
    );
    assert_eq!(envoy.ecds_version_text(), "example-1");

    // A new config over ECDS is in effect on every worker once Envoy counts the reload.
    assert_eq!(
        envoy.push_extension_config(&limited("second", 2)),
        EcdsOutcome::Applied
    );
    let (second, route) = statuses(&envoy, "/limited", 4);
    assert_eq!(second, [200, 200, 429, 429]);
    assert_eq!(route.as_deref(), Some("second-limited"));
    assert_eq!(upstream.total(), 7);
    let stats = envoy.ecds_stats();
    assert_eq!(
        (stats.update_success, stats.config_reload),
        (2, 2),
        "{stats:?}"
    );
}

#[test]
fn a_refused_push_under_load_fails_no_request_and_the_last_good_policy_keeps_enforcing() {
    let upstream = Upstream::start();
    let good = limited("good", 3);
    let mut envoy =
        Envoy::start(EnvoyConfig::to_upstream(upstream.addr()).ecds(EcdsSpec::plugin(&good)));
    let good_version = envoy.ecds_version_text();
    let addr = envoy.listener_addr();
    let background = std::thread::spawn(move || {
        load(
            addr,
            LoadSpec::new(2, Duration::from_secs(3), |_| Request::get("/open")),
        )
    });
    upstream.wait_for_traffic(0, 20);
    assert_eq!(envoy.push_extension_config(REFUSED), EcdsOutcome::Rejected);
    let report = background.join().unwrap();
    assert_eq!(report.errors, 0, "{:?}", report.statuses);
    assert_eq!(report.count(200), report.sent(), "{:?}", report.statuses);
    assert!(report.sent() > 50, "the load ran: {}", report.sent());
    assert_eq!(upstream.total(), report.sent());

    // The good policy still enforces its own limit (3), not the refused one.
    let (limited_statuses, route) = statuses(&envoy, "/limited", 5);
    assert_eq!(limited_statuses, [200, 200, 200, 429, 429]);
    assert_eq!(route.as_deref(), Some("good-limited"));
    assert_eq!(upstream.total(), report.sent() + 3);

    // What Envoy 1.40 records: the rejection, but also a reload, and the refused config as the
    // subscription's latest in config_dump, while `version_text` keeps the good version.
    let stats = envoy.ecds_stats();
    assert_eq!(
        stats,
        EcdsStats {
            update_attempt: 2,
            update_success: 1,
            update_rejected: 1,
            update_failure: 0,
            config_reload: 2,
            config_fail: 1,
            config_conflict: 0,
        }
    );
    assert_eq!(envoy.ecds_version_text(), good_version);
    assert_eq!(envoy.ecds_dumped_plugin_config().as_deref(), Some(REFUSED));
    let (dumped_version, _) = envoy.ecds_config_dump().unwrap();
    assert_ne!(dumped_version, good_version);
    let log = envoy.log();
    assert!(
        log.contains(
            r#"plugin config refused: rate_limits.tight.rate: expected "<n>/s|m|h", got "fast""#
        ),
        "{log}"
    );
    assert!(
        log.contains("[critical][wasm]") && log.contains("Plugin seawall failed to load"),
        "{log}"
    );

    // Pushing the refused config again is not even rejected: Envoy matches it against the
    // refused one it recorded, counts a success and moves `version_text` to it, while the
    // workers still run the good config.
    assert_eq!(envoy.push_extension_config(REFUSED), EcdsOutcome::Unchanged);
    let stats = envoy.ecds_stats();
    assert_eq!(
        (
            stats.update_success,
            stats.update_rejected,
            stats.config_reload
        ),
        (2, 1, 2),
        "{stats:?}"
    );
    assert_eq!(envoy.ecds_version_text(), dumped_version);
    let (after, route) = statuses(&envoy, "/limited", 1);
    assert_eq!(after, [429], "the good limit is still spent");
    assert_eq!(route.as_deref(), Some("good-limited"));
}

#[test]
fn a_fail_open_failure_policy_does_not_let_a_refused_config_through() {
    // Istio's FAIL_OPEN becomes the Wasm filter's `failure_policy: FAIL_OPEN`. That policy is
    // about a VM that fails while serving; a plugin config refused in on_configure is still a
    // rejected ECDS update, and the last good config keeps serving.
    let upstream = Upstream::start();
    let fail_open = |plugin: &str| EcdsDocument::PluginWithFailurePolicy {
        plugin: plugin.to_owned(),
        failure_policy: "FAIL_OPEN",
    };
    let mut envoy = Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .ecds(EcdsSpec::starting_with(fail_open(&limited("good", 2)))),
    );
    assert_eq!(
        envoy.push_extension_document(&fail_open(REFUSED)),
        EcdsOutcome::Rejected
    );
    let (statuses, route) = statuses(&envoy, "/limited", 3);
    assert_eq!(statuses, [200, 200, 429], "the good limit of 2");
    assert_eq!(route.as_deref(), Some("good-limited"));
    assert_eq!(upstream.total(), 2);
    let stats = envoy.ecds_stats();
    assert_eq!(
        (stats.update_rejected, stats.config_fail),
        (1, 1),
        "{stats:?}"
    );
}

#[test]
fn after_a_refused_push_a_listener_update_is_rejected_until_a_good_push() {
    let upstream = Upstream::start();
    let mut envoy = Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .xds_from_files(true)
            .ecds(EcdsSpec::plugin(&limited("good", 3))),
    );
    assert_eq!(envoy.push_extension_config(REFUSED), EcdsOutcome::Rejected);
    // A listener change that does not touch the filter: the virtual host stops adding
    // `x-envoy-attempt-count`. Envoy builds the new filter chain's ECDS slot from the config
    // the subscription recorded last, which is the refused one, so the listener is rejected.
    let mut unrelated = envoy.config();
    unrelated.include_attempt_count = false;
    let rejected_before = envoy
        .current_stats()
        .get("listener_manager.lds.update_rejected")
        .unwrap_or(0);
    let addr = envoy.listener_addr();
    let background = std::thread::spawn(move || {
        load(
            addr,
            LoadSpec::new(2, Duration::from_secs(2), |_| Request::get("/open")),
        )
    });
    upstream.wait_for_traffic(0, 20);
    assert_eq!(envoy.push_listener(&unrelated), LdsOutcome::Rejected);
    let report = background.join().unwrap();
    assert_eq!(report.errors, 0, "{:?}", report.statuses);
    assert_eq!(report.count(200), report.sent(), "{:?}", report.statuses);
    assert_eq!(upstream.total(), report.sent());
    assert_eq!(
        envoy
            .current_stats()
            .get("listener_manager.lds.update_rejected"),
        Some(rejected_before + 1)
    );
    let log = envoy.log();
    assert!(
        log.contains("lds: listener 'main' config rejected: Unable to create Wasm plugin seawall"),
        "{log}"
    );
    // The old listener serves on with the last good filter: its limit, its attempt header.
    let response = Client::connect(addr)
        .send(&Request::get("/limited"))
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-seawall-route"), Some("good-limited"));
    assert!(response.header("x-envoy-attempt-count").is_some());
    let (rest, _) = statuses(&envoy, "/limited", 3);
    assert_eq!(rest, [200, 200, 429], "the good limit of 3");

    // A good ECDS push replaces the recorded config, and the same listener update goes through
    // and runs the new filter.
    assert_eq!(
        envoy.push_extension_config(&limited("fixed", 1)),
        EcdsOutcome::Applied
    );
    assert_eq!(envoy.push_listener(&unrelated), LdsOutcome::Accepted);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = Client::connect(addr).send(&Request::get("/open")).unwrap();
        if response.header("x-envoy-attempt-count").is_none() {
            assert_eq!(response.header("x-seawall-route"), Some("fixed-open"));
            break;
        }
        assert!(Instant::now() < deadline, "the new listener never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (fixed, _) = statuses(&envoy, "/limited", 2);
    assert_eq!(fixed, [200, 429], "the new limit of 1");
}

#[test]
fn istio_fail_close_stand_in_denies_every_request_until_the_module_arrives() {
    let upstream = Upstream::start();
    // istio-agent could not fetch the module and failStrategy is FAIL_CLOSE: it sends a
    // deny-all RBAC filter under the plugin's name.
    let mut envoy = Envoy::start(EnvoyConfig::to_upstream(upstream.addr()).ecds(
        EcdsSpec::starting_with(EcdsDocument::IstioFallback { fail_open: false }),
    ));
    let (denied, route) = statuses(&envoy, "/", 4);
    assert_eq!(denied, [403; 4]);
    let response = Client::connect(envoy.listener_addr())
        .send(&Request::get("/"))
        .unwrap();
    assert_eq!(
        (response.status, response.text().as_str()),
        (403, "RBAC: access denied")
    );
    assert_eq!(route, None);
    assert_eq!(upstream.total(), 0, "nothing reached the upstream");
    // The stand-in's own counter, under istio-agent's stat prefix.
    let stats = envoy.current_stats();
    assert_eq!(
        stats.get("http.ingress.rbac.wasm-default-deny.denied"),
        Some(5),
        "{}",
        rbac_stats(&envoy)
    );

    // The module arrives: seawall replaces the stand-in.
    assert_eq!(
        envoy.push_extension_config(&limited("arrived", 2)),
        EcdsOutcome::Applied
    );
    let (served, route) = statuses(&envoy, "/limited", 3);
    assert_eq!(served, [200, 200, 429]);
    assert_eq!(route.as_deref(), Some("arrived-limited"));
    assert_eq!(upstream.total(), 2);

    // A broken extension config afterwards (no resource) is rejected; seawall keeps serving.
    assert_eq!(envoy.break_extension_config(), EcdsOutcome::Rejected);
    let (still, route) = statuses(&envoy, "/open", 2);
    assert_eq!(still, [200, 200]);
    assert_eq!(route.as_deref(), Some("arrived-open"));
    assert_eq!(upstream.total(), 4);
}

#[test]
fn istio_fail_open_stand_in_passes_every_request_without_seawall() {
    let upstream = Upstream::start();
    // istio-agent could not fetch the module and failStrategy is FAIL_OPEN: it sends an
    // allow-all RBAC filter under the plugin's name.
    let envoy = Envoy::start(EnvoyConfig::to_upstream(upstream.addr()).ecds(
        EcdsSpec::starting_with(EcdsDocument::IstioFallback { fail_open: true }),
    ));
    let (passed, route) = statuses(&envoy, "/limited", 5);
    assert_eq!(passed, [200; 5], "no limit: seawall is not there");
    assert_eq!(route, None);
    assert_eq!(upstream.total(), 5);
    // An RBAC filter without rules does not even evaluate, so it counts nothing: only the
    // upstream and the missing seawall header show that the stand-in is there.
    let stats = envoy.current_stats();
    assert_eq!(
        stats.get("http.ingress.rbac.wasm-default-allow.allowed"),
        Some(0),
        "{}",
        rbac_stats(&envoy)
    );
    assert_eq!(stats.get("wasmcustom.seawall.workers.all.ticks"), None);
}

#[test]
fn a_missing_extension_config_fails_requests_with_500_unless_a_default_is_set() {
    let upstream = Upstream::start();
    // No extension config and no default: the listener starts (the file subscription answers
    // at once, with a rejection) and every request gets a 500 from the empty slot.
    let missing = Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .ecds(EcdsSpec::starting_with(EcdsDocument::Missing)),
    );
    let (failed, _) = statuses(&missing, "/", 2);
    assert_eq!(failed, [500; 2]);
    let response = Client::connect(missing.listener_addr())
        .send(&Request::get("/"))
        .unwrap();
    assert_eq!((response.status, response.text().as_str()), (500, ""));
    assert_eq!(upstream.total(), 0);
    let stats = missing.ecds_stats();
    assert_eq!(
        (
            stats.update_rejected,
            stats.config_fail,
            stats.config_reload
        ),
        (1, 1, 0),
        "{stats:?}"
    );
    drop(missing);

    // With a deny-all default applied without warming, the same gap is a 403, and a good push
    // then replaces the default.
    let mut defaulted = Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr()).ecds(
            EcdsSpec::starting_with(EcdsDocument::Missing)
                .default_config(EcdsDocument::IstioFallback { fail_open: false }, true),
        ),
    );
    let (denied, _) = statuses(&defaulted, "/", 3);
    assert_eq!(denied, [403; 3]);
    assert_eq!(upstream.total(), 0);
    assert_eq!(
        defaulted.push_extension_config(&limited("late", 5)),
        EcdsOutcome::Applied
    );
    let (served, route) = statuses(&defaulted, "/open", 2);
    assert_eq!(served, [200, 200]);
    assert_eq!(route.as_deref(), Some("late-open"));
    assert_eq!(upstream.total(), 2);
}
