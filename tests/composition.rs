//! Every pair of policies on one route, through the whole core: what the README's composition
//! table says each pair does. Pairs whose rule is pinned elsewhere name that test in the README.

// A test crate: a failed unwrap is how it reports a failed expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

use seawall::clock::Timestamp;
use seawall::engine::Verdict;
use seawall::policy::circuit_breaker::ResponseFacts;
use seawall::request::FakeRequest;
use seawall::state::fake::FakeStore;

mod common;

use common::{get, Worker};

const MS: u64 = 1_000_000;
const SECOND: u64 = 1_000 * MS;
const T0: u64 = 1_800_000_000 * SECOND;

/// What happened to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// It reached the upstream, with this many retries granted.
    Upstream {
        retries: u32,
    },
    Replied {
        status: u16,
    },
}

const UP: Seen = Seen::Upstream { retries: 0 };

struct Status(u16);

impl ResponseFacts for Status {
    fn status(&mut self) -> Option<u16> {
        Some(self.0)
    }
    fn flags(&mut self) -> u64 {
        0
    }
    fn grpc_status(&mut self) -> Option<u32> {
        None
    }
}

/// Sends a request at `now`; one that goes on is answered `status` by the upstream after `took`
/// (after its injected delay, if it has one).
fn call(
    worker: &mut Worker,
    request: FakeRequest,
    now: u64,
    status: u16,
    took: u64,
    store: &FakeStore,
) -> Seen {
    let decision = worker.send(request, now, store);
    let retries = decision.retry.map_or(0, |r| r.max_retries);
    let mut stream = decision.stream;
    let sent_at = match decision.verdict {
        Verdict::Reply(reply) => {
            return Seen::Replied {
                status: reply.status,
            }
        }
        Verdict::Continue => now,
        Verdict::Pause { until } => {
            if let Verdict::Reply(reply) = worker.engine.on_resume(&stream, &worker.metrics) {
                let status = reply.status;
                let end = Timestamp::from_nanos(until.as_nanos());
                worker.engine.on_stream_end(
                    &stream,
                    &mut Status(status),
                    end,
                    store,
                    &worker.metrics,
                );
                return Seen::Replied { status };
            }
            until.as_nanos()
        }
    };
    let end = Timestamp::from_nanos(sent_at + took);
    worker.engine.on_response(&mut stream, end, &worker.metrics);
    worker
        .engine
        .on_stream_end(&stream, &mut Status(status), end, store, &worker.metrics);
    Seen::Upstream { retries }
}

fn chaos(request: FakeRequest) -> FakeRequest {
    request.header("x-chaos", "yes")
}

/// Rate limit × breaker: the breaker is asked first, so an open breaker's refusals cost no tokens.
#[test]
fn an_open_breaker_refuses_before_the_rate_limit_spends_a_token() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        r#"{"rate_limits": {"quota": {"rate": "1/h", "burst": 2}},
            "circuit_breakers": {"b": {"key": "route", "open_when": {"consecutive_failures": 1},
                                       "open_for": "10s", "half_open_probes": 1}},
            "routes": [{"name": "api", "rate_limits": ["quota"], "circuit_breaker": "b"}]}"#,
        &store,
    );
    assert_eq!(call(&mut worker, get("/"), T0, 503, MS, &store), UP);
    for n in 1..=5 {
        let seen = call(&mut worker, get("/"), T0 + n * MS, 200, MS, &store);
        assert_eq!(seen, Seen::Replied { status: 503 }, "open: request {n}");
    }
    // The probe takes the second token, and closes the breaker; then the bucket is empty.
    assert_eq!(
        call(&mut worker, get("/"), T0 + 11 * SECOND, 200, MS, &store),
        UP
    );
    let seen = call(&mut worker, get("/"), T0 + 12 * SECOND, 200, MS, &store);
    assert_eq!(seen, Seen::Replied { status: 429 });
    assert_eq!(worker.counter("seawall.rate_limit.quota.allowed"), 2);
}

/// Rate limit × retry: a limited request never reaches the budget, and an admitted one's retries
/// are the router's, not new requests: they take no tokens.
#[test]
fn a_limited_request_deposits_nothing_in_the_retry_budget() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        r#"{"rate_limits": {"quota": {"rate": "1/h", "burst": 2}},
            "retries": {"r": {"max_retries": 2, "budget": {"ratio": 20, "min_per_second": 10, "window": "10s"}}},
            "routes": [{"name": "api", "rate_limits": ["quota"], "retry": "r"}]}"#,
        &store,
    );
    let seen: Vec<Seen> = (0..4)
        .map(|n| call(&mut worker, get("/"), T0 + n, 200, MS, &store))
        .collect();
    let granted = Seen::Upstream { retries: 2 };
    assert_eq!(
        seen,
        [
            granted.clone(),
            granted,
            Seen::Replied { status: 429 },
            Seen::Replied { status: 429 }
        ]
    );
    assert_eq!(worker.counter("seawall.retry.r.requests"), 2);
}

/// Rate limit × fault: the limit first; a limited request gets no fault, and an injected abort
/// was admitted by the limit, so it spent its token.
#[test]
fn a_limited_request_gets_no_fault_and_an_abort_spends_its_token() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        r#"{"rate_limits": {"quota": {"rate": "1/h", "burst": 2}},
            "faults": {"f": {"abort": {"status": 418, "percent": 100}}},
            "routes": [{"name": "api", "rate_limits": ["quota"], "faults": ["f"]}]}"#,
        &store,
    );
    let statuses: Vec<Seen> = (0..4)
        .map(|n| call(&mut worker, get("/"), T0 + n, 200, MS, &store))
        .collect();
    let aborted = Seen::Replied { status: 418 };
    let limited = Seen::Replied { status: 429 };
    assert_eq!(
        statuses,
        [aborted.clone(), aborted, limited.clone(), limited]
    );
    assert_eq!(worker.counter("seawall.fault.f.aborts"), 2);
}

/// Rate limit × degradation: the level first, so its fallback answers cost no tokens; and its
/// `rate_limit_factor` scales the bucket (in real Envoy:
/// `a_degraded_level_turns_retries_off_and_halves_the_rate_limits` in integration/tests).
#[test]
fn fallback_answers_cost_no_tokens() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        r#"{"rate_limits": {"quota": {"rate": "1/h", "burst": 2}},
            "degradation": {"d": {
                "signals": {"probe": {"cluster": "health", "interval": "100ms", "timeout": "50ms",
                                      "unhealthy_after": 1, "healthy_after": 1}},
                "levels": [{"name": "down", "enter": {"probe": "unhealthy"}, "min_dwell": "1s",
                            "fallback": {"body": "cached\n"}}]}},
            "routes": [{"name": "api", "rate_limits": ["quota"], "degradation": "d"}]}"#,
        &store,
    );
    tick(&worker, T0, &store, true);
    tick(&worker, T0 + 100 * MS, &store, true);
    assert_eq!(worker.engine.degradation_level(0), Some(1));
    for n in 0..5 {
        let seen = call(&mut worker, get("/"), T0 + 200 * MS + n, 200, MS, &store);
        assert_eq!(seen, Seen::Replied { status: 200 }, "the fallback answers");
    }
    let mut at = T0 + 300 * MS;
    while worker.engine.degradation_level(0) != Some(0) {
        assert!(at < T0 + 5 * SECOND, "the level steps down");
        tick(&worker, at, &store, false);
        at += 100 * MS;
    }
    let seen: Vec<Seen> = (0..3)
        .map(|n| call(&mut worker, get("/"), at + n, 200, MS, &store))
        .collect();
    assert_eq!(
        seen,
        [UP, UP, Seen::Replied { status: 429 }],
        "the burst is whole"
    );
}

/// Breaker × retry: a half-open probe gets no retries (a retried probe would be several calls
/// against a sick upstream); a call while closed gets them.
#[test]
fn a_half_open_probe_gets_no_retries() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        r#"{"circuit_breakers": {"b": {"key": "route", "open_when": {"consecutive_failures": 1},
                                       "open_for": "1s", "half_open_probes": 1}},
            "retries": {"r": {"max_retries": 2}},
            "routes": [{"name": "api", "circuit_breaker": "b", "retry": "r"}]}"#,
        &store,
    );
    assert_eq!(
        call(&mut worker, get("/"), T0, 503, MS, &store),
        Seen::Upstream { retries: 2 }
    );
    assert_eq!(
        call(&mut worker, get("/"), T0 + 2 * SECOND, 200, MS, &store),
        UP,
        "the probe"
    );
    assert_eq!(
        call(&mut worker, get("/"), T0 + 3 * SECOND, 200, MS, &store),
        Seen::Upstream { retries: 2 },
        "closed again"
    );
}

/// Breaker × fault: an injected abort is seawall's answer, not the upstream's, so the breaker
/// does not count it; and an injected delay is not the upstream's slowness.
#[test]
fn injected_aborts_and_delays_are_no_breaker_outcomes() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        r#"{"circuit_breakers": {"b": {"key": "route",
                                       "failure": {"slow_call": "100ms"},
                                       "open_when": {"consecutive_failures": 2, "slow_call_rate": 50,
                                                     "min_requests": 2}}},
            "faults": {"abort": {"abort": {"status": 503, "percent": 100},
                                 "when": {"headers": [{"name": "x-chaos", "exact": "yes"}]}},
                       "slow": {"delay": {"fixed": "500ms", "percent": 100},
                                "when": {"headers": [{"name": "x-slow", "exact": "yes"}]}}},
            "routes": [{"name": "api", "circuit_breaker": "b", "faults": ["abort", "slow"]}]}"#,
        &store,
    );
    for n in 0..10 {
        let seen = call(&mut worker, chaos(get("/")), T0 + n, 200, MS, &store);
        assert_eq!(seen, Seen::Replied { status: 503 });
    }
    for n in 0..10 {
        let request = get("/").header("x-slow", "yes");
        assert_eq!(
            call(&mut worker, request, T0 + SECOND + n, 200, 10 * MS, &store),
            UP
        );
    }
    assert_eq!(worker.counter("seawall.circuit_breaker.b.opened"), 0);
    assert_eq!(worker.counter("seawall.circuit_breaker.b.failures"), 0);
    assert_eq!(worker.counter("seawall.circuit_breaker.b.slow_calls"), 0);
    assert_eq!(worker.counter("seawall.circuit_breaker.b.successes"), 10);
}

/// Retry × fault: an injected abort (at once or after its delay) gets no retries and deposits
/// nothing in the budget; a delayed request that goes on gets them.
#[test]
fn an_injected_abort_gets_no_retries() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        r#"{"faults": {"abort": {"abort": {"status": 503, "percent": 100}, "delay": {"fixed": "100ms", "percent": 100},
                                 "when": {"headers": [{"name": "x-chaos", "exact": "yes"}]}},
                       "slow": {"delay": {"fixed": "100ms", "percent": 100},
                                "when": {"headers": [{"name": "x-slow", "exact": "yes"}]}}},
            "retries": {"r": {"max_retries": 2, "budget": {"ratio": 20, "min_per_second": 10, "window": "10s"}}},
            "routes": [{"name": "api", "faults": ["abort", "slow"], "retry": "r"}]}"#,
        &store,
    );
    let seen = call(&mut worker, chaos(get("/")), T0, 200, MS, &store);
    assert_eq!(seen, Seen::Replied { status: 503 });
    assert_eq!(worker.counter("seawall.retry.r.requests"), 0);
    let seen = call(
        &mut worker,
        get("/").header("x-slow", "yes"),
        T0,
        200,
        MS,
        &store,
    );
    assert_eq!(seen, Seen::Upstream { retries: 2 });
}

/// Retry × degradation: a level with `"retries": false` grants none; its fallback answers
/// deposit nothing in the budget.
#[test]
fn a_level_without_retries_grants_none() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        r#"{"retries": {"r": {"max_retries": 2}},
            "degradation": {"d": {
                "signals": {"probe": {"cluster": "health", "interval": "100ms", "timeout": "50ms",
                                      "unhealthy_after": 1, "healthy_after": 1}},
                "levels": [{"name": "down", "enter": {"probe": "unhealthy"}, "retries": false}]}},
            "routes": [{"name": "api", "retry": "r", "degradation": "d"}]}"#,
        &store,
    );
    assert_eq!(
        call(&mut worker, get("/"), T0, 200, MS, &store),
        Seen::Upstream { retries: 2 }
    );
    tick(&worker, T0, &store, true);
    tick(&worker, T0 + 100 * MS, &store, true);
    assert_eq!(worker.engine.degradation_level(0), Some(1));
    assert_eq!(
        call(&mut worker, get("/"), T0 + 200 * MS, 200, MS, &store),
        UP
    );
}

/// Fault × degradation: the level first, so a shed or fallback request gets no fault; and an
/// injected abort is no outcome of the dependency, so chaos alone never raises a level.
#[test]
fn injected_aborts_never_raise_a_level_and_fallbacks_get_no_fault() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        r#"{"faults": {"f": {"abort": {"status": 503, "percent": 100}, "max_active": 1000}},
            "degradation": {"d": {
                "signals": {"window": "1s", "min_requests": 2,
                            "probe": {"cluster": "health", "interval": "100ms", "timeout": "50ms",
                                      "unhealthy_after": 1, "healthy_after": 1}},
                "levels": [{"name": "failing", "enter": {"failure_rate": 50}},
                           {"name": "down", "enter": {"probe": "unhealthy"}, "fallback": {"body": "cached\n"}}]}},
            "routes": [{"name": "api", "faults": ["f"], "degradation": "d"}]}"#,
        &store,
    );
    for n in 0..20 {
        let seen = call(&mut worker, get("/"), T0 + n, 200, MS, &store);
        assert_eq!(seen, Seen::Replied { status: 503 });
    }
    tick(&worker, T0 + 100 * MS, &store, false);
    tick(&worker, T0 + 200 * MS, &store, false);
    assert_eq!(
        worker.engine.degradation_level(0),
        Some(0),
        "aborts are not failures"
    );
    tick(&worker, T0 + 300 * MS, &store, true);
    tick(&worker, T0 + 400 * MS, &store, true);
    assert_eq!(worker.engine.degradation_level(0), Some(2));
    let before = worker.counter("seawall.fault.f.aborts");
    let seen = call(&mut worker, get("/"), T0 + 500 * MS, 200, MS, &store);
    assert_eq!(
        seen,
        Seen::Replied { status: 200 },
        "the fallback, not the abort"
    );
    assert_eq!(worker.counter("seawall.fault.f.aborts"), before);
}

/// The root context's tick; the probes it sends are answered before the next one.
fn tick(worker: &Worker, now: u64, store: &FakeStore, probes_fail: bool) {
    let mut sent = Vec::new();
    worker.engine.on_degradation_tick(
        1,
        Timestamp::from_nanos(now),
        store,
        &worker.metrics,
        &mut |policy, _| {
            sent.push(policy);
            true
        },
    );
    let status = if probes_fail { 503 } else { 200 };
    for policy in sent {
        worker
            .engine
            .on_probe_result(policy, Some(status), store, &worker.metrics);
    }
}
