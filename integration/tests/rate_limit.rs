//! Rate limits in real Envoy with four workers: the limit holds across all of them, per-key
//! buckets are independent, shadow mode never rejects, rejections carry the right headers, and a
//! flood of distinct keys does not grow Envoy's memory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use seawall_integration::client::{load, Client, LoadReport, LoadSpec, Request};
use seawall_integration::envoy::trapping_wasm;
use seawall_integration::{Arrival, Envoy, EnvoyConfig, Upstream};

fn limited(upstream: &Upstream, plugin: &str) -> Envoy {
    Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .concurrency(4)
            .seawall(plugin),
    )
}

/// Seconds between the first and the last of `window` (the upstream's arrivals).
fn span(window: Option<(Instant, Instant)>) -> f64 {
    window.map_or(0.0, |(first, last)| (last - first).as_secs_f64())
}

/// What one token bucket (`burst`, refilled at `per_second`, full at the first request) admits
/// of `arrivals` taken in the order Envoy received them, and for how long it sat full with
/// nothing arriving (refill it could not keep).
fn reference_bucket(arrivals: &[Arrival], burst: f64, per_second: f64) -> (u64, Duration) {
    let mut tokens = burst;
    let mut admitted = 0;
    let mut idle_full = 0.0;
    let mut last = arrivals.first().map_or(0, |arrival| arrival.start_us);
    for arrival in arrivals {
        let elapsed = (arrival.start_us - last) as f64 / 1e6;
        let refilled = tokens + elapsed * per_second;
        if refilled > burst {
            idle_full += (refilled - burst) / per_second;
        }
        tokens = refilled.min(burst);
        last = arrival.start_us;
        if tokens >= 1.0 {
            tokens -= 1.0;
            admitted += 1;
        }
    }
    (admitted, Duration::from_secs_f64(idle_full))
}

/// Whole seconds, rounded up, as seawall writes `retry-after` and `ratelimit-reset`.
fn ceil_seconds(span: Duration) -> u64 {
    span.as_secs() + u64::from(span.subsec_nanos() > 0)
}

/// The bucket the exactness tests flood: 100/s, burst 10, on every route.
const HUNDRED_A_SECOND: &str = r#"{"rate_limits": {"global": {"rate": "100/s", "burst": 10}}, "routes": [{"name": "all", "rate_limits": ["global"]}]}"#;

/// Envoy with four workers, [`HUNDRED_A_SECOND`] and its arrival log, running `wasm` (`None`:
/// the release build).
fn hundred_a_second(upstream: &Upstream, wasm: Option<PathBuf>) -> Envoy {
    let config = EnvoyConfig::to_upstream(upstream.addr())
        .concurrency(4)
        .arrival_log(true)
        .seawall(HUNDRED_A_SECOND);
    Envoy::start(match wasm {
        Some(wasm) => config.wasm(wasm),
        None => config,
    })
}

/// How a flood of [`HUNDRED_A_SECOND`] went, judged both ways.
///
/// Over-admission is judged on the upstream's window, which saw each admitted request arrive:
/// the bucket starts full and then refills at 100/s, so from the first admission to the last it
/// admits at most the burst plus 100 per second in between, however the load ran.
///
/// Under-admission is judged on what Envoy received: a starved machine can leave the bucket full
/// with nothing arriving, and refill it cannot keep is no token lost. One reference bucket fed
/// the requests in the order and at the times Envoy received them admits what a correct limiter
/// would.
struct Exactness {
    accepted: u64,
    /// The upstream's window, in seconds.
    window: f64,
    /// Burst plus refill over the window.
    most: f64,
    reference: u64,
    /// How long the reference bucket sat full with nothing arriving.
    idle_full: Duration,
}

impl Exactness {
    fn of(envoy: &Envoy, upstream: &Upstream, report: &LoadReport) -> Self {
        let accepted = report.count(200);
        let window = span(upstream.arrival_window("/flood"));
        let arrivals = envoy.arrivals(report.sent() as usize, Duration::from_secs(30));
        assert_eq!(
            arrivals.len() as u64,
            report.sent(),
            "Envoy logged every request"
        );
        assert_eq!(
            arrivals
                .iter()
                .filter(|arrival| arrival.status == 200)
                .count() as u64,
            accepted
        );
        let (reference, idle_full) = reference_bucket(&arrivals, 10.0, 100.0);
        Exactness {
            accepted,
            window,
            most: 10.0 + 100.0 * window,
            reference,
            idle_full,
        }
    }

    fn assert_exact(&self) {
        let Exactness {
            accepted,
            window,
            most,
            reference,
            ..
        } = *self;
        assert!(
            accepted as f64 <= most * 1.03,
            "{accepted} accepted, more than {most:.0} + 3% (burst 10 + 100/s over the upstream's {window:.3} s)"
        );
        assert!(
            (accepted as f64 - reference as f64).abs() <= reference as f64 * 0.03,
            "{accepted} accepted, a reference bucket fed Envoy's arrivals admits {reference} (± 3%)"
        );
    }
}

#[test]
fn a_global_limit_holds_exactly_across_four_workers() {
    let upstream = Upstream::start();
    let envoy = hundred_a_second(&upstream, None);
    let report = load(
        envoy.listener_addr(),
        LoadSpec::new(8, Duration::from_secs(5), |_| Request::get("/flood")),
    );
    let judged = Exactness::of(&envoy, &upstream, &report);
    let Exactness {
        accepted,
        window,
        most,
        reference,
        idle_full,
    } = judged;
    // The client's wall time also counts thread and connection setup and the tail of the last
    // requests, so it gives a second ceiling: never more than the burst plus the refill over the
    // whole flood.
    let wall = report.elapsed.as_secs_f64();
    let ceiling = (10.0 + 100.0 * wall).floor() as u64 + 1;
    eprintln!(
        "[rate-limit] {} requests; upstream window {window:.3} s: {accepted} accepted (at most {most:.0} + 3%, ceiling {ceiling} from the client's {wall:.3} s; a reference bucket fed Envoy's arrivals admits {reference}, and sat full with nothing arriving for {idle_full:?}), {} limited, upstream saw {}",
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
    judged.assert_exact();
    assert!(
        accepted <= ceiling,
        "{accepted} accepted, more than burst 10 + 100/s over the whole {wall:.3} s flood ({ceiling})"
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

/// A worker descheduled between reading the clock and deciding finds the bucket as workers with
/// later readings left it. The test build holds a worker 20 ms there on request
/// (`x-seawall-test-stall-ms`), on every fifth of 5,000 requests flooding on ten connections: every
/// stalled request decides with a reading 20 ms older than the record's. Deciding on the record
/// as it is, the limit still admits exactly what one bucket would; clamping it to the older
/// reading and writing it back minted up to two tokens a stalled request.
#[test]
fn a_worker_deciding_with_an_older_clock_reading_mints_no_tokens() {
    let upstream = Upstream::start();
    let envoy = hundred_a_second(&upstream, Some(trapping_wasm()));
    let report = load(
        envoy.listener_addr(),
        // A fixed number of requests rather than a fixed time: stalls hold workers, so how many
        // fit in a few seconds depends on the machine, and the count of stalled decisions
        // must not.
        LoadSpec {
            total: Some(5_000),
            ..LoadSpec::new(10, Duration::from_secs(60), |n| {
                if n % 5 == 0 {
                    Request::get("/flood").header("x-seawall-test-stall-ms", "20")
                } else {
                    Request::get("/flood")
                }
            })
        },
    );
    let judged = Exactness::of(&envoy, &upstream, &report);
    let Exactness {
        accepted,
        window,
        most,
        reference,
        idle_full,
    } = judged;
    let stalled = upstream
        .received()
        .iter()
        .filter(|request| request.header("x-seawall-test-stall-ms").is_some())
        .count();
    let stats = envoy.stats();
    let limited = stats.seawall("seawall.rate_limit.global.limited");
    // Every fifth request of the sequence asked for the stall.
    let asked_to_stall = report.sent().div_ceil(5);
    eprintln!(
        "[rate-limit] stalled readings: {} requests, {asked_to_stall} of them stalled, {accepted} accepted ({stalled} of those stalled; at most {most:.0} + 3% over the upstream's {window:.3} s; a reference bucket fed Envoy's arrivals admits {reference}, full and idle for {idle_full:?}), {limited} limited",
        report.sent(),
    );
    assert_eq!(report.errors, 0);
    assert!(limited > 1000, "the load must flood: {limited} limited");
    assert_eq!(
        report.sent(),
        5_000,
        "the whole flood was sent: {:?}",
        report.statuses
    );
    assert_eq!(asked_to_stall, 1_000);
    judged.assert_exact();
    assert_eq!(upstream.total(), accepted);
    assert_eq!(stats.seawall("seawall.rate_limit.global.allowed"), accepted);
}

/// Issue 15: a bucket with ample tokens is leased to the workers in batches, and the limit still
/// holds exactly: a flood drains the burst through leases, then the refill is decided in shared
/// data token by token, and the upstream sees burst + rate over its window.
#[test]
fn a_leased_bucket_still_admits_exactly_burst_plus_rate_across_four_workers() {
    let upstream = Upstream::start();
    let envoy = limited(
        &upstream,
        r#"{"rate_limits": {"global": {"rate": "400/s", "burst": 2000}}, "routes": [{"name": "all", "rate_limits": ["global"]}]}"#,
    );
    let report = load(
        envoy.listener_addr(),
        LoadSpec::new(8, Duration::from_secs(4), |_| Request::get("/flood")),
    );
    let accepted = report.count(200);
    let window = span(upstream.arrival_window("/flood"));
    let expected = 2000.0 + 400.0 * window;
    let wall = report.elapsed.as_secs_f64();
    let ceiling = (2000.0 + 400.0 * wall).floor() as u64 + 1;
    let stats = envoy.stats();
    let leases = stats.seawall("seawall.rate_limit.global.leases");
    let leased = stats.seawall("seawall.rate_limit.global.leased_tokens");
    let returned = stats.seawall("seawall.rate_limit.global.lease_tokens_returned");
    eprintln!(
        "[rate-limit] leased bucket: {} requests; upstream window {window:.3} s: {accepted} accepted (expected {expected:.0} ± 3%, ceiling {ceiling}); {leases} leases of {leased} tokens, {returned} returned",
        report.sent()
    );
    assert_eq!(report.errors, 0);
    assert!(
        report.count(429) > 1000,
        "the load must flood: {:?}",
        report.statuses
    );
    assert!(leases > 0, "an ample bucket was leased");
    assert!(
        (accepted as f64 - expected).abs() <= expected * 0.03,
        "{accepted} accepted, expected {expected:.0} ± 3% (burst 2000 + 400/s over the upstream's {window:.3} s)"
    );
    assert!(
        accepted <= ceiling,
        "{accepted} accepted, ceiling {ceiling}"
    );
    assert_eq!(upstream.total(), accepted);
    assert_eq!(stats.seawall("seawall.rate_limit.global.allowed"), accepted);
}

/// `"response_header_form": "combined"` writes the bucket's state as one `RateLimit` header, on
/// admitted responses and on the 429 alike, and none of the three separate ones.
#[test]
fn the_combined_form_is_one_ratelimit_header_on_admissions_and_refusals() {
    let upstream = Upstream::start();
    let envoy = limited(
        &upstream,
        r#"{"rate_limits": {"global": {"rate": "1/m", "burst": 2, "response_header_form": "combined"}},
            "routes": [{"name": "all", "rate_limits": ["global"]}]}"#,
    );
    let mut client = Client::connect(envoy.listener_addr());
    let first = client.send(&Request::get("/x")).unwrap();
    let second = client.send(&Request::get("/x")).unwrap();
    let refused = client.send(&Request::get("/x")).unwrap();
    assert_eq!(
        (first.status, second.status, refused.status),
        (200, 200, 429)
    );
    assert_eq!(
        first.header("ratelimit"),
        Some("limit=2, remaining=1, reset=60")
    );
    assert_eq!(
        second.header("ratelimit"),
        Some("limit=2, remaining=0, reset=120")
    );
    let value = refused.header("ratelimit").unwrap();
    assert!(value.starts_with("limit=2, remaining=0, reset="), "{value}");
    for response in [&first, &second, &refused] {
        for separate in ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
            assert_eq!(response.header(separate), None, "{separate}");
        }
    }
    assert_eq!(upstream.total(), 2);
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
    // Alice and Bob come once Mallory is being limited.
    let limited = envoy.wait_for_stat(
        "wasmcustom.seawall.rate_limit.per-user.limited",
        Duration::from_secs(10),
        |limited| limited > 0,
    );
    assert!(limited > 0, "mallory's flood was never limited within 10 s");
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
    // Mallory: burst 5 plus 5/s between her first and her last admission, as the upstream saw
    // them arrive (±1: the refill is counted in whole tokens); and never more than burst 5 plus
    // 5/s over the whole flood by the client's clock.
    let mallory = flood.count(200);
    let window = span(upstream.arrival_window_where(|r| r.header("x-user") == Some(b"mallory")));
    let expected = 5.0 + 5.0 * window;
    let wall = flood.elapsed.as_secs_f64();
    let ceiling = (5.0 + 5.0 * wall).floor() as u64 + 1;
    eprintln!(
        "[rate-limit] mallory: {mallory} admitted over the upstream's {window:.3} s (expected {expected:.1} ± 1, ceiling {ceiling} from the client's {wall:.3} s)"
    );
    assert!(
        (mallory as f64 - expected).abs() <= 1.0,
        "mallory got {mallory}, expected {expected:.1} ± 1 (burst 5 + 5/s over {window:.3} s)"
    );
    assert!(
        mallory <= ceiling,
        "mallory got {mallory}, more than burst 5 + 5/s over the whole {wall:.3} s flood"
    );
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
    // Every request reached the upstream, so its record spans the whole load: the bucket allowed
    // its burst of 10 plus 10/s over that span, and would have refused all the others. It counts
    // whole tokens (up to one short of E, the refill in progress when the load ended) and the
    // span is the upstream's (a few ms off Envoy's decisions at either end), hence E - 2 ≤ it.
    let window = span(upstream.arrival_window("/"));
    let expected = 10.0 + 10.0 * window;
    let wall = report.elapsed.as_secs_f64();
    let ceiling = (10.0 + 10.0 * wall).floor() as u64 + 1;
    eprintln!(
        "[rate-limit] shadow: {allowed} allowed and {shadow} shadow-limited over the upstream's {window:.3} s (expected {expected:.1} allowed, ceiling {ceiling} from the client's {wall:.3} s)"
    );
    assert!(
        allowed as f64 <= expected + 1.0 && allowed as f64 >= expected - 2.0,
        "{allowed} allowed, expected {expected:.1} (burst 10 + 10/s over {window:.3} s): the other {shadow} exceed 10/s"
    );
    assert!(
        allowed <= ceiling,
        "{allowed} allowed, more than burst 10 + 10/s over the whole {wall:.3} s"
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
    let started = Instant::now();
    let first = client.send(&Request::get("/")).unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.header_u64("ratelimit-limit"), Some(2));
    assert_eq!(first.header_u64("ratelimit-remaining"), Some(1));
    assert_eq!(first.header_u64("ratelimit-reset"), Some(60));
    let second = client.send(&Request::get("/")).unwrap();
    assert_eq!(second.header_u64("ratelimit-remaining"), Some(0));
    let refused = client.send(&Request::get("/")).unwrap();
    let client_span = started.elapsed();
    assert_eq!(refused.status, 429);
    assert_eq!(refused.text(), "slow down\n");
    assert_eq!(refused.header("x-limited-by"), Some("slow"));
    // The next token is 60 s after the first request, and the bucket is full 120 s after it; the
    // refusal says how long is left from the moment it was decided, in whole seconds rounded up.
    // That moment came after the upstream saw the second request, and the first request was
    // decided before the upstream saw it; and it all happened within the client's span.
    let arrivals = upstream.arrivals("/");
    assert_eq!(arrivals.len(), 2);
    let upstream_span = arrivals[1] - arrivals[0];
    let within = |full: u64| {
        let full = Duration::from_secs(full);
        ceil_seconds(full.saturating_sub(client_span))..=ceil_seconds(full - upstream_span)
    };
    let retry_after = refused.header_u64("retry-after").unwrap();
    assert!(
        within(60).contains(&retry_after),
        "retry-after {retry_after}, expected {:?}: 60 s after the first request, {upstream_span:?} to {client_span:?} ago",
        within(60)
    );
    assert_eq!(refused.header_u64("ratelimit-remaining"), Some(0));
    assert_eq!(refused.header_u64("ratelimit-limit"), Some(2));
    let reset = refused.header_u64("ratelimit-reset").unwrap();
    assert!(
        within(120).contains(&reset),
        "ratelimit-reset {reset}, expected {:?}",
        within(120)
    );
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
    // The first worker to load creates every key: 1000 slots, the bucket for requests without
    // the header, and the deployment's secret; the others find them.
    assert!(log.contains("1002 shared-data keys created"), "{log}");
}
