//! Rate limits in real Envoy with four workers: the limit holds across all of them, per-key
//! buckets are independent, shadow mode never rejects, rejections carry the right headers, and a
//! flood of distinct keys does not grow Envoy's memory.

use std::time::Duration;

use seawall_integration::client::{load, Client, LoadSpec, Request};
use seawall_integration::{Envoy, EnvoyConfig, Upstream};

fn limited(upstream: &Upstream, plugin: &str) -> Envoy {
    Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .concurrency(4)
            .seawall(plugin),
    )
}

#[test]
fn a_global_limit_holds_exactly_across_four_workers() {
    let upstream = Upstream::start();
    let envoy = limited(
        &upstream,
        r#"{"rate_limits": {"global": {"rate": "100/s", "burst": 10}}, "routes": [{"name": "all", "rate_limits": ["global"]}]}"#,
    );
    let report = load(
        envoy.listener_addr(),
        LoadSpec::new(8, Duration::from_secs(5), |_| Request::get("/flood")),
    );
    let accepted = report.count(200);
    let seconds = report.elapsed.as_secs_f64();
    let expected = 100.0 * seconds + 10.0;
    eprintln!(
        "[rate-limit] {} requests in {seconds:.2}s: {accepted} accepted (expected {expected:.0}), {} limited, upstream saw {}",
        report.sent(),
        report.count(429),
        upstream.total()
    );
    assert_eq!(report.errors, 0);
    assert!(
        report.count(429) > 1000,
        "the load must actually flood: {:?}",
        report.statuses
    );
    assert!(
        (accepted as f64 - expected).abs() <= expected * 0.03,
        "{accepted} accepted, expected {expected:.0} ± 3%"
    );
    assert_eq!(
        upstream.total(),
        accepted,
        "the upstream saw exactly the admitted requests"
    );
    let stats = envoy.stats();
    assert_eq!(stats.seawall("seawall.rate_limit.global.allowed"), accepted);
    assert_eq!(
        stats.seawall("seawall.rate_limit.global.limited"),
        report.count(429)
    );
    assert_eq!(stats.seawall("seawall.rate_limit.global.cas_exhausted"), 0);
    let retries = stats.seawall("seawall.rate_limit.global.cas_retries");
    eprintln!(
        "[rate-limit] CAS retries: {retries} over {} decisions",
        report.sent()
    );
}

#[test]
fn two_keys_keep_their_quota_while_a_third_floods() {
    let upstream = Upstream::start();
    let envoy = limited(
        &upstream,
        r#"{"rate_limits": {"per-user": {"rate": "5/s", "burst": 5, "key": [{"header": "x-user"}], "max_keys": 1000}},
            "routes": [{"name": "all", "rate_limits": ["per-user"]}]}"#,
    );
    let addr = envoy.listener_addr();
    let flood = std::thread::spawn(move || {
        load(
            addr,
            LoadSpec::new(4, Duration::from_secs(2), |_| {
                Request::get("/").header("x-user", "mallory")
            }),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    for user in ["alice", "bob"] {
        let mut client = Client::connect(addr);
        for n in 0..5 {
            let response = client
                .send(&Request::get("/").header("x-user", user))
                .unwrap();
            assert_eq!(response.status, 200, "{user} request {n}");
        }
    }
    let flood = flood.join().unwrap();
    assert!(
        flood.count(429) > 100,
        "mallory was limited: {:?}",
        flood.statuses
    );
    // Mallory: burst 5 plus 5/s for about 2 s.
    assert!(
        flood.count(200) <= 5 + 11,
        "mallory got {}",
        flood.count(200)
    );
    let for_user = |name: &str| {
        upstream
            .received()
            .iter()
            .filter(|r| r.header("x-user") == Some(name.as_bytes()))
            .count()
    };
    assert_eq!(for_user("alice"), 5);
    assert_eq!(for_user("bob"), 5);
    assert_eq!(for_user("mallory") as u64, flood.count(200));
}

#[test]
fn shadow_mode_never_rejects_but_counts() {
    let upstream = Upstream::start();
    let envoy = limited(
        &upstream,
        r#"{"rate_limits": {"trial": {"rate": "10/s", "burst": 10, "mode": "shadow"}}, "routes": [{"name": "all", "rate_limits": ["trial"]}]}"#,
    );
    let report = load(
        envoy.listener_addr(),
        LoadSpec {
            total: Some(300),
            ..LoadSpec::new(4, Duration::from_secs(10), |_| Request::get("/"))
        },
    );
    assert_eq!(report.count(200), 300, "{:?}", report.statuses);
    assert_eq!(upstream.total(), 300);
    let stats = envoy.stats();
    let shadow = stats.seawall("seawall.rate_limit.trial.shadow_limited");
    let allowed = stats.seawall("seawall.rate_limit.trial.allowed");
    assert_eq!(shadow + allowed, 300);
    assert!(
        shadow > 200,
        "most of 300 quick requests exceed 10/s: {shadow}"
    );
    assert_eq!(stats.seawall("seawall.rate_limit.trial.limited"), 0);
}

#[test]
fn rejections_carry_retry_after_and_ratelimit_headers() {
    let upstream = Upstream::start();
    let envoy = limited(
        &upstream,
        r#"{"rate_limits": {"slow": {"rate": "1/m", "burst": 2,
                                     "on_limit": {"body": "slow down\n", "headers": {"x-limited-by": "slow"}}}},
            "routes": [{"name": "all", "rate_limits": ["slow"]}]}"#,
    );
    let mut client = Client::connect(envoy.listener_addr());
    let first = client.send(&Request::get("/")).unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.header_u64("ratelimit-limit"), Some(2));
    assert_eq!(first.header_u64("ratelimit-remaining"), Some(1));
    assert_eq!(first.header_u64("ratelimit-reset"), Some(60));
    let second = client.send(&Request::get("/")).unwrap();
    assert_eq!(second.header_u64("ratelimit-remaining"), Some(0));
    let refused = client.send(&Request::get("/")).unwrap();
    assert_eq!(refused.status, 429);
    assert_eq!(refused.text(), "slow down\n");
    assert_eq!(refused.header("x-limited-by"), Some("slow"));
    // The next token is 60 s after the first request, which was under a second ago.
    let retry_after = refused.header_u64("retry-after").unwrap();
    assert!(
        (59..=60).contains(&retry_after),
        "retry-after {retry_after}"
    );
    assert_eq!(refused.header_u64("ratelimit-remaining"), Some(0));
    assert_eq!(refused.header_u64("ratelimit-limit"), Some(2));
    let reset = refused.header_u64("ratelimit-reset").unwrap();
    assert!((119..=120).contains(&reset), "ratelimit-reset {reset}");
    assert_eq!(upstream.total(), 2);

    // gRPC callers get RESOURCE_EXHAUSTED rather than a bare HTTP status.
    let grpc = client
        .send(&Request::post("/pkg.Svc/Call").header("content-type", "application/grpc"))
        .unwrap();
    assert_eq!(grpc.header("grpc-status"), Some("8"), "{:?}", grpc.headers);
    assert_eq!(upstream.total(), 2);
}

#[test]
fn a_flood_of_distinct_keys_does_not_grow_envoy() {
    let upstream = Upstream::start();
    let envoy = limited(
        &upstream,
        r#"{"rate_limits": {"per-user": {"rate": "1000/s", "key": [{"header": "x-user"}], "max_keys": 1000}},
            "routes": [{"name": "all", "rate_limits": ["per-user"]}]}"#,
    );
    let memory = |envoy: &Envoy| -> u64 {
        let (_, body) = envoy.admin_get("/memory").unwrap();
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        json["allocated"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or(0)
    };
    // Warm up connections and buffers, then measure.
    load(
        envoy.listener_addr(),
        LoadSpec {
            total: Some(2000),
            ..LoadSpec::new(8, Duration::from_secs(30), |n| {
                Request::get("/").header("x-user", format!("warm-{n}"))
            })
        },
    );
    let before = memory(&envoy);
    let report = load(
        envoy.listener_addr(),
        LoadSpec {
            total: Some(100_000),
            ..LoadSpec::new(8, Duration::from_secs(120), |n| {
                Request::get("/").header("x-user", format!("user-{n}-{}", n * 7919))
            })
        },
    );
    let after = memory(&envoy);
    let growth = after.saturating_sub(before);
    eprintln!(
        "[rate-limit] 100000 distinct keys in {:.1}s: Envoy allocated {before} -> {after} bytes (+{growth}); statuses {:?}",
        report.elapsed.as_secs_f64(),
        report.statuses
    );
    assert_eq!(report.errors, 0);
    assert_eq!(report.sent(), 100_000);
    // One shared-data entry per key would be 100k entries of ~100 bytes (10 MB); slots cap it.
    assert!(growth < 2 * 1024 * 1024, "Envoy grew by {growth} bytes");
    let response = Client::connect(envoy.listener_addr())
        .send(&Request::get("/").header("x-user", "after"))
        .unwrap();
    assert_eq!(response.status, 200);
    let log = envoy.log();
    assert!(
        log.contains("1001 shared-data keys created") || log.contains("0 shared-data keys created"),
        "{log}"
    );
}
