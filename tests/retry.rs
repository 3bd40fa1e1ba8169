//! Retry budgets through the whole core: config, engine, shared store, with a fake clock. The
//! router is simulated: it makes as many retries as it was granted when the upstream fails, and
//! reports them in `x-envoy-attempt-count`.

// A test crate: a failed unwrap is how it reports a failed expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use common::{get, Worker};
use seawall::clock::Timestamp;
use seawall::config::compile;
use seawall::engine::{RetryHeaders, StreamState};
use seawall::policy::retry::ResponseHeaders;
use seawall::request::FakeRequest;
use seawall::state::fake::FakeStore;

const MS: u64 = 1_000_000;
const SECOND: u64 = 1_000 * MS;
const T0: u64 = 1_800_000_000 * SECOND;

/// The response headers the router passes back.
struct Answer {
    status: u16,
    attempts: Option<u32>,
    retry_after: Option<u64>,
}

impl ResponseHeaders for Answer {
    fn header(&mut self, name: &str) -> Option<std::borrow::Cow<'_, [u8]>> {
        let value = match name {
            ":status" => Some(self.status.to_string().into_bytes()),
            "x-envoy-attempt-count" => self.attempts.map(|a| a.to_string().into_bytes()),
            "retry-after" => self.retry_after.map(|s| s.to_string().into_bytes()),
            _ => None,
        };
        value.map(std::borrow::Cow::Owned)
    }
}

/// What this file asks of a worker.
trait Retries {
    fn grant(
        &mut self,
        request: FakeRequest,
        now: u64,
        store: &FakeStore,
    ) -> (RetryHeaders<'static>, StreamState);
    /// A request to an upstream that fails every attempt: the router uses every granted retry.
    fn failing_call(&mut self, request: FakeRequest, now: u64, store: &FakeStore) -> u32;
    fn settle(&mut self, stream: &StreamState, answer: Answer, now: u64, store: &FakeStore);
    fn metric(&self, name: &str) -> i64;
    /// The host's worker tick, or the last one of a replaced config (`retiring`).
    fn tick(&self, now: u64, store: &FakeStore, retiring: bool);
    /// A request to a healthy upstream: one attempt, the grant unused.
    fn healthy_call(&mut self, now: u64, store: &FakeStore) -> u32;
}

impl Retries for Worker {
    fn grant(
        &mut self,
        request: FakeRequest,
        now: u64,
        store: &FakeStore,
    ) -> (RetryHeaders<'static>, StreamState) {
        let decision = self.send(request, now, store);
        let headers = decision.retry.expect("the route has a retry policy");
        // Keep only what the tests look at, so the worker is free again.
        let owned = RetryHeaders {
            max_retries: headers.max_retries,
            write_max_retries: headers.write_max_retries,
            retry_on: None,
            grpc_retry_on: None,
            per_try_timeout_ms: headers.per_try_timeout_ms,
            remove: headers.remove,
        };
        (owned, decision.stream)
    }

    fn failing_call(&mut self, request: FakeRequest, now: u64, store: &FakeStore) -> u32 {
        let (headers, stream) = self.grant(request, now, store);
        let attempts = 1 + headers.max_retries;
        self.settle(
            &stream,
            Answer {
                status: 503,
                attempts: Some(attempts),
                retry_after: None,
            },
            now,
            store,
        );
        attempts
    }

    fn settle(&mut self, stream: &StreamState, mut answer: Answer, now: u64, store: &FakeStore) {
        self.engine.settle_retries(
            stream,
            &mut answer,
            Timestamp::from_nanos(now),
            store,
            &self.metrics,
        );
    }

    fn metric(&self, name: &str) -> i64 {
        self.counter(&format!("seawall.retry.{name}"))
    }

    fn tick(&self, now: u64, store: &FakeStore, retiring: bool) {
        self.engine
            .on_worker_tick(Timestamp::from_nanos(now), store, &self.metrics, retiring);
    }

    fn healthy_call(&mut self, now: u64, store: &FakeStore) -> u32 {
        let (headers, stream) = self.grant(get("/"), now, store);
        self.settle(
            &stream,
            Answer {
                status: 200,
                attempts: Some(1),
                retry_after: None,
            },
            now,
            store,
        );
        headers.max_retries
    }
}

fn config(retry: &str) -> String {
    format!(r#"{{"retries": {{"api": {retry}}}, "routes": [{{"name": "api", "retry": "api"}}]}}"#)
}

const BUDGETED: &str = r#"{"max_retries": 2, "retry_on": ["5xx", "reset"], "per_try_timeout": "250ms",
                           "budget": {"ratio": 20, "min_per_second": 1, "window": "10s"},
                           "idempotency_header": "idempotency-key"}"#;

#[test]
fn a_failing_upstream_gets_ratio_plus_floor_retries_not_max_retries() {
    let store = FakeStore::new();
    let mut worker = Worker::new(&config(BUDGETED), &store);
    // 1000 requests over 5 s (within one window), every attempt failing.
    let attempts: u32 = (0..1000)
        .map(|n| worker.failing_call(get("/"), T0 + n * 5 * MS, &store))
        .sum();
    // Allowance: 20% of 1000 requests, plus 1/s over the 10 s window.
    assert_eq!(attempts, 1000 + 200 + 10);
    assert_eq!(worker.metric("api.granted"), 210);
    assert_eq!(worker.metric("api.used"), 210);
    assert!(worker.metric("api.denied_by_budget") > 0);

    let store = FakeStore::new();
    let mut unbudgeted = Worker::new(
        &config(r#"{"max_retries": 2, "budget": {"enabled": false}}"#),
        &store,
    );
    let attempts: u32 = (0..1000)
        .map(|n| unbudgeted.failing_call(get("/"), T0 + n * 5 * MS, &store))
        .sum();
    assert_eq!(attempts, 3000, "without a budget, 1 + max_retries each");
}

#[test]
fn unused_retries_go_back_to_the_budget() {
    let store = FakeStore::new();
    let mut worker = Worker::new(&config(BUDGETED), &store);
    // Healthy traffic: each request reserves 2 and uses none, so the budget never runs dry.
    for n in 0..500 {
        let (headers, stream) = worker.grant(get("/"), T0 + n * MS, &store);
        assert_eq!(headers.max_retries, 2, "request {n}");
        worker.settle(
            &stream,
            Answer {
                status: 200,
                attempts: Some(1),
                retry_after: None,
            },
            T0 + n * MS,
            &store,
        );
    }
    assert_eq!(worker.metric("api.refunded"), 1000);
    assert_eq!(worker.metric("api.denied_by_budget"), 0);
}

#[test]
fn only_idempotent_requests_are_retried() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        &config(r#"{"budget": {"enabled": false}, "idempotency_header": "idempotency-key"}"#),
        &store,
    );
    let post = |key: Option<&str>| {
        let request = FakeRequest::http("POST", "/orders");
        match key {
            Some(key) => request.header("idempotency-key", key),
            None => request,
        }
    };
    assert_eq!(worker.grant(post(None), T0, &store).0.max_retries, 0);
    assert_eq!(worker.grant(post(Some("k-1")), T0, &store).0.max_retries, 2);
    for method in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"] {
        let request = FakeRequest::http(method, "/");
        assert_eq!(
            worker.grant(request, T0, &store).0.max_retries,
            2,
            "{method}"
        );
    }
    assert_eq!(worker.metric("api.not_idempotent"), 1);
}

#[test]
fn client_retry_headers_are_overwritten_or_removed() {
    let store = FakeStore::new();
    let mut worker = Worker::new(&config(BUDGETED), &store);
    let spoofed = get("/")
        .header("x-envoy-max-retries", "10")
        .header("x-envoy-retry-on", "5xx,retriable-4xx")
        .header("x-envoy-retry-grpc-on", "cancelled")
        .header("x-envoy-upstream-rq-per-try-timeout-ms", "1")
        .header("x-envoy-retriable-status-codes", "500")
        .header("x-envoy-hedge-on-per-try-timeout", "true");
    let (headers, _) = worker.grant(spoofed, T0, &store);
    assert_eq!(headers.max_retries, 2, "the client's 10 is ignored");
    assert_eq!(headers.per_try_timeout_ms, Some(250));
    // Set by seawall: max-retries, retry-on, per-try timeout. Removed: the rest the client sent.
    let removed: Vec<&str> = seawall::config::retry::CLIENT_RETRY_HEADERS
        .iter()
        .enumerate()
        .filter(|(bit, _)| headers.remove & (1 << bit) != 0)
        .map(|(_, name)| *name)
        .collect();
    assert_eq!(
        removed,
        [
            "x-envoy-retry-grpc-on",
            "x-envoy-retriable-status-codes",
            "x-envoy-hedge-on-per-try-timeout"
        ]
    );
    let (clean, _) = worker.grant(get("/"), T0, &store);
    assert_eq!(clean.remove, 0, "nothing to remove, no header call wasted");
}

#[test]
fn upstream_push_back_stops_retries_on_every_worker_until_it_expires() {
    let store = FakeStore::new();
    let mut worker = Worker::new(&config(BUDGETED), &store);
    let mut other = Worker::new(&config(BUDGETED), &store);
    let (_, stream) = worker.grant(get("/"), T0, &store);
    worker.settle(
        &stream,
        Answer {
            status: 503,
            attempts: Some(3),
            retry_after: Some(5),
        },
        T0,
        &store,
    );
    assert_eq!(other.grant(get("/"), T0 + SECOND, &store).0.max_retries, 0);
    assert_eq!(other.metric("api.pushed_back"), 1);
    assert_eq!(
        other.grant(get("/"), T0 + 5 * SECOND, &store).0.max_retries,
        2
    );
}

/// Issue 14, point 14: push-back was global per retry policy, so one client that provoked a 429
/// with `Retry-After` stopped retries for everyone for up to 60 s.
#[test]
fn a_429_with_retry_after_does_not_stop_other_clients_retries() {
    let store = FakeStore::new();
    let mut worker = Worker::new(&config(BUDGETED), &store);
    let mut other = Worker::new(&config(BUDGETED), &store);
    let (_, stream) = worker.grant(get("/"), T0, &store);
    worker.settle(
        &stream,
        Answer {
            status: 429,
            attempts: Some(1),
            retry_after: Some(60),
        },
        T0,
        &store,
    );
    assert_eq!(other.grant(get("/"), T0 + SECOND, &store).0.max_retries, 2);
    assert_eq!(other.metric("api.pushed_back"), 0);
}

#[test]
fn a_missing_attempt_count_is_counted_and_refunds_nothing() {
    let store = FakeStore::new();
    let mut worker = Worker::new(&config(BUDGETED), &store);
    let (_, stream) = worker.grant(get("/"), T0, &store);
    worker.settle(
        &stream,
        Answer {
            status: 200,
            attempts: None,
            retry_after: None,
        },
        T0,
        &store,
    );
    assert_eq!(worker.metric("api.attempt_count_missing"), 1);
    assert_eq!(worker.metric("api.refunded"), 0);
}

#[test]
fn shadow_mode_grants_max_retries_and_counts_what_it_would_deny() {
    let store = FakeStore::new();
    let shadow = BUDGETED.replace("\"max_retries\"", "\"mode\": \"shadow\", \"max_retries\"");
    let mut worker = Worker::new(&config(&shadow), &store);
    let attempts: u32 = (0..100)
        .map(|n| worker.failing_call(get("/"), T0 + n * MS, &store))
        .sum();
    assert_eq!(attempts, 300);
    assert!(worker.metric("api.shadow_denied") > 0);
    assert_eq!(worker.metric("api.denied_by_budget"), 0);
}

#[test]
fn probes_and_shadow_open_breakers_get_no_retries() {
    let store = FakeStore::new();
    let json = r#"{"retries": {"api": {"max_retries": 2}},
        "circuit_breakers": {"b": {"key": "route", "open_when": {"consecutive_failures": 1}, "open_for": "1s"},
                             "s": {"key": "route", "mode": "shadow", "open_when": {"consecutive_failures": 1}, "open_for": "1s"}},
        "routes": [{"name": "probed", "match": {"path": {"prefix": "/p"}}, "circuit_breaker": "b", "retry": "api"},
                   {"name": "shadowed", "circuit_breaker": "s", "retry": "api"}]}"#;
    let mut worker = Worker::new(json, &store);
    struct Failed;
    impl seawall::policy::circuit_breaker::ResponseFacts for Failed {
        fn status(&mut self) -> Option<u16> {
            Some(503)
        }
        fn flags(&mut self) -> u64 {
            0
        }
        fn grpc_status(&mut self) -> Option<u32> {
            None
        }
    }
    for path in ["/p", "/s"] {
        let (headers, stream) = worker.grant(get(path), T0, &store);
        assert_eq!(headers.max_retries, 2, "{path} closed");
        worker.engine.on_stream_end(
            &stream,
            &mut Failed,
            Timestamp::from_nanos(T0),
            &store,
            &worker.metrics,
        );
    }
    // The shadow breaker is open: its request goes through, without retries.
    assert_eq!(worker.grant(get("/s"), T0 + 1, &store).0.max_retries, 0);
    // The enforcing one's probe, a second later, goes through without retries too.
    assert_eq!(
        worker.grant(get("/p"), T0 + SECOND, &store).0.max_retries,
        0
    );
    assert_eq!(worker.metric("api.denied_by_breaker"), 2);
}

/// Another worker takes from the budget between this worker's read and its write, every time:
/// together they still get exactly the allowance.
#[test]
fn interleaved_workers_share_one_budget_exactly() {
    let store = FakeStore::new();
    let json = config(
        r#"{"max_retries": 3, "budget": {"ratio": 10, "min_per_second": 1, "window": "10s"}}"#,
    );
    let mut worker = Worker::new(&json, &store);
    let mut other = Worker::new(&json, &store);
    let elsewhere = Arc::new(Mutex::new(0u32));
    let counter = Arc::clone(&elsewhere);
    let mut turns = 0;
    store.interfere(move |store| {
        turns += 1;
        if turns % 2 == 0 {
            let (headers, _) = other.grant(get("/"), T0, store);
            *counter.lock().unwrap() += headers.max_retries;
        }
    });
    let here: u32 = (0..100)
        .map(|n| worker.grant(get("/"), T0 + n, &store).0.max_retries)
        .sum();
    store.stop_interfering();
    let elsewhere = *elsewhere.lock().unwrap();
    let requests = worker.metric("api.requests") as u32 + elsewhere_requests(&store);
    // The floor (10) plus 10% of every request deposited by both workers, rounded down.
    assert_eq!(
        here + elsewhere,
        10 + requests / 10,
        "here {here}, elsewhere {elsewhere}, {requests} requests"
    );
    assert!(store.counts().cas_mismatches > 0, "the workers did race");
}

/// The requests the interfering worker deposited, read back from the budget record.
fn elsewhere_requests(store: &FakeStore) -> u32 {
    use seawall::policy::retry::BudgetState;
    let state: Option<(BudgetState, _)> =
        seawall::state::cas::read(store, "sw:seawall:retry:api").unwrap();
    // Every request came at T0 (plus a few nanoseconds), in the 10 s window's 1 s bucket of T0.
    state.unwrap().0.window.totals(T0 / SECOND).requests - 100
}

#[test]
fn retry_config_errors_name_their_paths() {
    let errors = |json: &str| match compile(json.as_bytes()) {
        Ok(_) => panic!("expected {json} to be refused"),
        Err(errors) => errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
    };
    assert_eq!(
        errors(
            r#"{"retries": {
                "a": {"max_retries": 11, "retry_on": ["5xx", "sometimes"], "methods": ["get"]},
                "b": {"retry_on": [], "per_try_timeout": "0s", "idempotency_header": "bad header",
                      "budget": {"window": "10ms"}},
                "c": {"budget": {"ratio": 120}}
            }}"#
        ),
        [
            "retries.a.max_retries: expected at most 10 retries, got 11",
            r#"retries.a.retry_on[1]: expected one of 5xx, gateway-error, reset, reset-before-request, connect-failure, retriable-4xx, refused-stream, envoy-ratelimited or the gRPC cancelled, deadline-exceeded, internal, resource-exhausted, unavailable, got "sometimes""#,
            r#"retries.a.methods[0]: expected an uppercase HTTP method like "GET", got "get""#,
            "retries.b.retry_on: expected at least one condition",
            "retries.b.per_try_timeout: expected at least 1ms",
            "retries.b.budget.window: expected a window of at least 100ms, got 10ms",
            r#"retries.b.idempotency_header: expected an HTTP header name, got "bad header""#,
            "retries.c.budget.ratio: expected a percentage from 0 to 100, got 120",
        ]
    );
    let grpc = compile(config(r#"{"retry_on": ["unavailable", "deadline-exceeded"]}"#).as_bytes())
        .unwrap();
    let policy = &grpc.retries[0];
    assert_eq!(policy.retry_on, None);
    assert_eq!(
        policy.grpc_retry_on.as_deref(),
        Some("unavailable,deadline-exceeded")
    );
}

/// Issue 15: a request-header write makes Envoy match the route again. With the route's own
/// retry policy, a request granted every retry needs no write at all; only a cut grant writes
/// `x-envoy-max-retries`, and a client's own retry headers are removed either way.
#[test]
fn with_the_envoy_routes_policy_only_a_cut_grant_writes_a_header() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        &config(
            r#"{"max_retries": 2, "retry_policy_from": "envoy_route",
                "budget": {"ratio": 0, "min_per_second": 1, "window": "1s"}}"#,
        ),
        &store,
    );
    let policy = &worker.engine.config().retries[0];
    assert!(policy.from_route);
    assert_eq!(
        (policy.retry_on.as_deref(), policy.per_try_timeout_ms),
        (None, None)
    );

    // A ratio of 0 and a floor of 1 retry a second: the first request gets 1 retry of its 2.
    let (first, _) = worker.grant(get("/"), T0, &store);
    assert_eq!((first.max_retries, first.write_max_retries), (1, true));
    assert_eq!(first.remove, 0);

    // A roomier budget grants in full: nothing to write.
    let store = FakeStore::new();
    let mut worker = Worker::new(
        &config(r#"{"max_retries": 2, "retry_policy_from": "envoy_route"}"#),
        &store,
    );
    let (full, _) = worker.grant(get("/"), T0, &store);
    assert_eq!((full.max_retries, full.write_max_retries), (2, false));
    assert_eq!(
        (full.retry_on, full.per_try_timeout_ms, full.remove),
        (None, None, 0)
    );

    // A client's own retry headers go, all of them: none is written in their place.
    let spoofed = get("/")
        .header("x-envoy-max-retries", "10")
        .header("x-envoy-retry-on", "5xx")
        .header("x-envoy-upstream-rq-per-try-timeout-ms", "1");
    let (cleaned, _) = worker.grant(spoofed, T0, &store);
    assert!(!cleaned.write_max_retries);
    assert_eq!(cleaned.remove, 0b1011);

    // A request the route must not retry (not idempotent) is cut to 0, in writing, and a
    // client's x-envoy-max-retries is overwritten rather than removed.
    let post = FakeRequest::http("POST", "/orders").header("x-envoy-max-retries", "10");
    let (cut, _) = worker.grant(post, T0, &store);
    assert_eq!(
        (cut.max_retries, cut.write_max_retries, cut.remove),
        (0, true, 0)
    );
}

#[test]
fn the_envoy_routes_policy_takes_no_conditions_of_seawalls() {
    let errors = match compile(
        config(
            r#"{"retry_policy_from": "envoy_route", "retry_on": ["5xx"], "per_try_timeout": "1s"}"#,
        )
        .as_bytes(),
    ) {
        Ok(_) => panic!("expected the config to be refused"),
        Err(errors) => errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
    };
    assert_eq!(
        errors,
        [
            r#"retries.api.retry_on: expected no "retry_on" with "retry_policy_from": "envoy_route": set it in the Envoy route's retry_policy"#,
            r#"retries.api.per_try_timeout: expected no "per_try_timeout" with "retry_policy_from": "envoy_route": set it in the Envoy route's retry_policy"#,
        ]
    );
}

/// Issue 14, point 4: a push-back stored under a later clock stopped every grant for the length
/// of the step; it now lasts at most `MAX_PUSH_BACK` (60 s) from now.
#[test]
fn a_clock_step_back_never_stretches_a_push_back() {
    let store = FakeStore::new();
    let mut worker = Worker::new(&config(BUDGETED), &store);
    let later = T0 + 3_600 * SECOND;
    let (_, stream) = worker.grant(get("/"), later, &store);
    worker.settle(
        &stream,
        Answer {
            status: 503,
            attempts: Some(1),
            retry_after: Some(30),
        },
        later,
        &store,
    );
    assert_eq!(
        worker.grant(get("/"), later + SECOND, &store).0.max_retries,
        0
    );
    // An hour back: at most a minute of push-back is left, not an hour.
    assert_eq!(worker.grant(get("/"), T0, &store).0.max_retries, 0);
    assert_eq!(
        worker
            .grant(get("/"), T0 + 61 * SECOND, &store)
            .0
            .max_retries,
        2
    );
}

/// A worker that read the clock a moment before another stored a push-back decides on it with
/// its older reading: it is pushed back, and the push-back keeps its end. Clamped to the older
/// reading and written back, it ended early by the skew for everyone.
#[test]
fn a_worker_with_an_older_clock_reading_keeps_a_push_back_whole() {
    let store = FakeStore::new();
    let mut answered = Worker::new(&config(BUDGETED), &store);
    let mut lagging = Worker::new(&config(BUDGETED), &store);
    let (_, stream) = answered.grant(get("/"), T0, &store);
    answered.settle(
        &stream,
        Answer {
            status: 503,
            attempts: Some(1),
            retry_after: Some(60),
        },
        T0,
        &store,
    );
    assert_eq!(
        lagging.grant(get("/"), T0 - 5 * MS, &store).0.max_retries,
        0
    );
    let mut fresh = Worker::new(&config(BUDGETED), &store);
    assert_eq!(
        fresh
            .grant(get("/"), T0 + 60 * SECOND - 2 * MS, &store)
            .0
            .max_retries,
        0,
        "pushed back until the minute is up"
    );
    assert_eq!(
        fresh
            .grant(get("/"), T0 + 60 * SECOND, &store)
            .0
            .max_retries,
        2
    );
}

// Worker-local fast path: deposits tallied per worker, grants from a leased allowance.

/// The default budget (20% plus 10/s over 10 s, a floor of 100), so that leases are taken.
const AMPLE: &str =
    r#"{"max_retries": 2, "budget": {"ratio": 20, "min_per_second": 10, "window": "10s"}}"#;
const TICK: u64 = 100 * MS;
const KEY: &str = "sw:seawall:retry:api";

/// The budget's record as shared data holds it now.
fn record(store: &FakeStore) -> seawall::policy::retry::BudgetState {
    seawall::state::cas::read(store, KEY).unwrap().unwrap().0
}

/// The requests and retries the shared window counts at `now`.
fn shared_totals(store: &FakeStore, now: u64) -> (u32, u32) {
    let totals = record(store).window.totals(now / SECOND);
    (totals.requests, totals.retries)
}

fn shared_calls(store: &FakeStore) -> u64 {
    let counts = store.counts();
    counts.gets + counts.sets
}

/// Before: every request cost 1 get + 1 set to deposit and reserve, and 1 get + 1 set to give
/// back its unused grant. Now, with the budget ample, a worker's requests cost nothing shared
/// except one lease and one tick write per 100 ms tick: three workers at 1000 requests a second
/// each, healthy upstream, make 3 s of traffic.
#[test]
fn the_common_path_costs_no_shared_call_for_most_requests() {
    let store = FakeStore::new();
    let mut workers: Vec<Worker> = (0..3)
        .map(|_| Worker::new(&config(AMPLE), &store))
        .collect();
    let before = shared_calls(&store);
    let mut requests = 0u64;
    for step in 0..3_000u64 {
        let now = T0 + step * MS;
        if step % 100 == 0 {
            for worker in &workers {
                worker.tick(now, &store, false);
            }
        }
        for worker in &mut workers {
            assert_eq!(worker.healthy_call(now, &store), 2, "step {step}");
            requests += 1;
        }
    }
    let calls = shared_calls(&store) - before;
    assert_eq!(
        workers
            .iter()
            .map(|w| w.metric("api.requests"))
            .sum::<i64>(),
        9_000
    );
    assert_eq!(
        workers
            .iter()
            .map(|w| w.metric("api.refunded"))
            .sum::<i64>(),
        18_000
    );
    assert_eq!(
        workers
            .iter()
            .map(|w| w.metric("api.denied_by_budget"))
            .sum::<i64>(),
        0
    );
    // Per worker and tick: a lease write and a tick write (a get and a set each), and one more
    // lease when a one-second bucket begins.
    assert!(
        calls <= 3 * 30 * 4 + 3 * 3 * 2 + 16,
        "{calls} shared calls for {requests} requests"
    );
    // Every deposit reached the shared window on the ticks (the last tick's are still local).
    let last = T0 + 3_000 * MS;
    for worker in &workers {
        worker.tick(last, &store, false);
    }
    // Counted on the tick too, so that counting costs no host call per request.
    let local: i64 = workers
        .iter()
        .map(|w| w.metric("api.decided_locally"))
        .sum();
    assert!(
        local as u64 >= requests * 95 / 100,
        "{local} of {requests} decided locally"
    );
    assert_eq!(
        shared_totals(&store, last),
        (9_000, 0),
        "all deposited, nothing held"
    );
}

/// The deposits a worker tallies reach shared data on its tick, and until then they only make the
/// budget stricter: the other worker sees fewer requests, so fewer retries.
#[test]
fn deposits_reach_the_shared_budget_on_the_tick_and_meanwhile_only_make_it_stricter() {
    let store = FakeStore::new();
    let mut worker = Worker::new(&config(AMPLE), &store);
    let mut other = Worker::new(&config(AMPLE), &store);
    // 500 requests, none granted anything to spend: wanted 0 (not idempotent) is decided locally.
    let before = shared_calls(&store);
    for n in 0..500 {
        let (headers, _) = worker.grant(FakeRequest::http("POST", "/"), T0 + n * MS, &store);
        assert_eq!(headers.max_retries, 0);
    }
    assert_eq!(shared_calls(&store) - before, 0, "tallied, not shared");
    assert_eq!(shared_totals(&store, T0 + SECOND / 2), (0, 0));
    // Meanwhile the budget counts only the other worker's own requests: the floor of 100 plus
    // 20% of its 100, not of 600.
    let granted: u32 = (0..100)
        .map(|n| other.failing_call(get("/"), T0 + SECOND / 2 + n, &store) - 1)
        .sum();
    assert_eq!(granted, 100 + 20);
    worker.tick(T0 + SECOND / 2 + TICK, &store, false);
    other.tick(T0 + SECOND / 2 + TICK, &store, false);
    assert_eq!(shared_totals(&store, T0 + SECOND), (600, 120));
    // Now the deposits earn: 20% of 600 plus the floor is 220, of which 120 were used.
    let granted: u32 = (0..100)
        .map(|n| other.failing_call(get("/"), T0 + SECOND + n, &store) - 1)
        .sum();
    assert_eq!(granted, 100 + 20, "and the 100 new requests' own 20%");
}

/// A lease is counted in the shared budget at once, grants from it and their unused parts cost
/// nothing shared, and what is left goes back to its bucket on the tick.
#[test]
fn an_allowance_is_counted_at_once_and_goes_back_on_the_tick() {
    let store = FakeStore::new();
    let mut worker = Worker::new(&config(AMPLE), &store);
    let (_, in_flight) = worker.grant(get("/"), T0, &store);
    // The first grant (2) and a lease of 8 requests' worth (16), in one write.
    assert_eq!(worker.metric("api.leased"), 16);
    assert_eq!(shared_totals(&store, T0), (1, 18));
    let before = shared_calls(&store);
    for n in 1..=50 {
        assert_eq!(worker.healthy_call(T0 + n * MS, &store), 2);
    }
    assert_eq!(shared_calls(&store) - before, 0);
    assert_eq!(shared_totals(&store, T0), (1, 18), "nothing shared yet");
    worker.tick(T0 + TICK, &store, false);
    // The allowance went back; the request still in flight holds its 2.
    assert_eq!(shared_totals(&store, T0 + TICK), (51, 2));
    assert_eq!(worker.metric("api.lease_returned"), 16);
    // Its grant came with the lease, so it goes back to the worker, and to shared data on the
    // next tick, to the bucket it was taken from.
    worker.settle(
        &in_flight,
        Answer {
            status: 200,
            attempts: Some(1),
            retry_after: None,
        },
        T0 + TICK,
        &store,
    );
    assert_eq!(shared_totals(&store, T0 + TICK), (51, 2));
    worker.tick(T0 + 2 * TICK, &store, false);
    assert_eq!(shared_totals(&store, T0 + 2 * TICK), (51, 0));
    assert_eq!(worker.metric("api.refunded"), 2 * 51);
}

/// An allowance serves only the bucket it was leased in: a retry counted in an older bucket would
/// leave the window early. A new bucket takes a new lease and gives the old one back.
#[test]
fn a_new_bucket_gives_the_allowance_back_and_leases_anew() {
    let store = FakeStore::new();
    let mut worker = Worker::new(&config(AMPLE), &store);
    worker.healthy_call(T0 + SECOND - 2 * MS, &store);
    let calls = shared_calls(&store);
    worker.healthy_call(T0 + SECOND - MS, &store);
    assert_eq!(shared_calls(&store), calls, "from the allowance");
    worker.healthy_call(T0 + SECOND, &store);
    assert_eq!(
        shared_calls(&store),
        calls + 2,
        "one write: give back and lease"
    );
    let state = record(&store);
    let mut window = state.window;
    assert_eq!(window.counted(T0 / SECOND).map(|b| b.retries), Some(0));
    // The new bucket holds the new lease and the grant taken with it (back in the allowance).
    assert_eq!(
        window.counted(T0 / SECOND + 1).map(|b| b.retries),
        Some(16 + 2)
    );
}

/// A replaced config gives back its allowance and tallies on its last tick, and from then on
/// decides on shared data; a grant it made before goes back to shared data when it settles.
#[test]
fn a_superseded_config_gives_its_allowance_back_when_it_retires() {
    let store = FakeStore::new();
    let mut old = Worker::new(&config(AMPLE), &store);
    let (_, in_flight) = old.grant(get("/"), T0, &store);
    for n in 1..10 {
        old.healthy_call(T0 + n * MS, &store);
    }
    let mut new = Worker::new(&config(AMPLE), &store);
    old.tick(T0 + 10 * MS, &store, true);
    assert_eq!(
        shared_totals(&store, T0),
        (10, 2),
        "only the grant in flight is held"
    );
    assert_eq!(old.metric("api.lease_returned"), 16);
    old.settle(
        &in_flight,
        Answer {
            status: 200,
            attempts: Some(1),
            retry_after: None,
        },
        T0 + 20 * MS,
        &store,
    );
    assert_eq!(shared_totals(&store, T0), (10, 0), "given back at once");
    // A request the old config still sees is decided and settled on shared data.
    let before = shared_calls(&store);
    assert_eq!(old.healthy_call(T0 + 30 * MS, &store), 2);
    assert_eq!(shared_calls(&store) - before, 4);
    assert_eq!(old.metric("api.leased"), 16, "no new lease");
    assert_eq!(new.healthy_call(T0 + 40 * MS, &store), 2);
    assert_eq!(shared_totals(&store, T0), (12, 18), "the new config leases");
}

/// Push-back goes to shared data at once. A worker granting from its allowance learns of it at
/// its next shared read, which its next tick forces: within one tick. The worker that saw the 503
/// stops at once.
#[test]
fn push_back_reaches_a_worker_with_an_allowance_within_one_tick() {
    let store = FakeStore::new();
    let mut leasing = Worker::new(&config(AMPLE), &store);
    let mut seeing = Worker::new(&config(AMPLE), &store);
    assert_eq!(leasing.healthy_call(T0, &store), 2);
    let (_, stream) = seeing.grant(get("/"), T0 + MS, &store);
    seeing.settle(
        &stream,
        Answer {
            status: 503,
            attempts: Some(3),
            retry_after: Some(5),
        },
        T0 + MS,
        &store,
    );
    assert_eq!(seeing.grant(get("/"), T0 + 2 * MS, &store).0.max_retries, 0);
    // Until its tick the leasing worker may still grant from its allowance: the stated delay.
    assert_eq!(leasing.healthy_call(T0 + 50 * MS, &store), 2);
    leasing.tick(T0 + TICK, &store, false);
    assert_eq!(
        leasing.grant(get("/"), T0 + TICK + 1, &store).0.max_retries,
        0
    );
    assert_eq!(leasing.metric("api.pushed_back"), 1);
    // Knowing of it, the worker denies without shared calls until it ends.
    let before = shared_calls(&store);
    for n in 2..40 {
        assert_eq!(
            leasing.grant(get("/"), T0 + n * TICK, &store).0.max_retries,
            0
        );
    }
    assert_eq!(shared_calls(&store), before);
    assert_eq!(leasing.metric("api.pushed_back"), 39);
    assert_eq!(leasing.healthy_call(T0 + MS + 5 * SECOND, &store), 2);
}

/// Several workers in a brown-out, every attempt failing, ticking every 100 ms: the budget still
/// holds retries to 20% of the requests plus the floor, as the exact path did.
#[test]
fn workers_with_allowances_in_a_brown_out_stay_within_ratio_and_floor() {
    let store = FakeStore::new();
    let mut workers: Vec<Worker> = (0..4)
        .map(|_| Worker::new(&config(AMPLE), &store))
        .collect();
    let mut attempts = 0;
    // 2000 requests over 5 s, all in one 10 s window.
    for n in 0..2_000u64 {
        let now = T0 + n * 5 * MS / 2;
        if n % 40 == 0 {
            for worker in &workers {
                worker.tick(now, &store, false);
            }
        }
        attempts += workers[(n % 4) as usize].failing_call(get("/"), now, &store);
    }
    // The bound: 20% of 2000, plus the floor of 100.
    assert!(attempts <= 2_000 + 400 + 100, "{attempts} attempts");
    // Stricter only by the deposits of one tick (40 requests, 8 retries) and what the last
    // requests could not use.
    assert!(attempts >= 2_000 + 400 + 100 - 8 - 2, "{attempts} attempts");
    let used: i64 = workers.iter().map(|w| w.metric("api.used")).sum();
    assert_eq!(u32::try_from(used).unwrap(), attempts - 2_000);
    let end = T0 + 5 * SECOND;
    for worker in &workers {
        worker.tick(end, &store, false);
    }
    // Nothing held anywhere: the window counts every request and exactly the retries used.
    assert_eq!(shared_totals(&store, end), (2_000, attempts - 2_000));
}

/// Requests and the retries granted them, by the window bucket they arrived in.
type Ledger = BTreeMap<u64, (u64, u64)>;

fn note(ledger: &Mutex<Ledger>, bucket: u64, retries: u32) {
    let mut ledger = ledger.lock().unwrap();
    let entry = ledger.entry(bucket).or_default();
    entry.0 += 1;
    entry.1 += u64::from(retries);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The bound, on random schedules of four workers plus one that runs between other workers'
    /// reads and writes, every attempt failing (every grant used), each worker ticking every
    /// 100 ms with jitter and sometimes more often: for every window of buckets that ends in a
    /// bucket with a grant, the retries granted to requests of that window are at most
    /// `ratio × its requests + floor`, rounded down as the budget rounds. After a last tick
    /// everywhere, the shared window counts every request and exactly the retries used: nothing
    /// leased is lost or kept.
    #[test]
    fn under_total_failure_every_window_stays_within_ratio_and_floor(
        ratio in 0u32..=60,
        min_per_second in 0u32..120,
        window_s in 1u64..=10,
        max_retries in 1u32..=4,
        steps in proptest::collection::vec((0usize..4, 0u64..40, 0u8..12), 1..400),
    ) {
        let json = config(&format!(
            r#"{{"max_retries": {max_retries},
                 "budget": {{"ratio": {ratio}, "min_per_second": {min_per_second}, "window": "{window_s}s"}}}}"#
        ));
        let store = FakeStore::new();
        let mut workers: Vec<Worker> = (0..4).map(|_| Worker::new(&json, &store)).collect();
        let budget = workers[0].engine.config().retries[0].budget.unwrap();
        let bucket = budget.bucket_nanos;
        let ledger = Arc::new(Mutex::new(Ledger::new()));
        let clock = Arc::new(AtomicU64::new(T0));
        let extra = Arc::new(Mutex::new(Worker::new(&json, &store)));
        {
            let (ledger, clock, extra) = (ledger.clone(), clock.clone(), extra.clone());
            let mut turns = 0u64;
            let mut next_tick = T0;
            store.interfere(move |store| {
                turns += 1;
                if !turns.is_multiple_of(3) {
                    return;
                }
                let now = clock.load(Ordering::SeqCst);
                let mut extra = extra.lock().unwrap();
                if now >= next_tick {
                    extra.tick(now, store, false);
                    next_tick = now + TICK;
                }
                let retries = extra.failing_call(get("/"), now, store) - 1;
                note(&ledger, now / bucket, retries);
            });
        }
        let mut next_tick = [T0; 4];
        let mut now = T0;
        for (index, advance_ms, action) in steps {
            now += advance_ms * MS;
            clock.store(now, Ordering::SeqCst);
            for (worker, next) in workers.iter().zip(&mut next_tick) {
                if now >= *next {
                    worker.tick(now, &store, false);
                    // Envoy's ticks jitter: up to 10 ms late.
                    *next = now + TICK + (now / MS) % 10 * MS;
                }
            }
            let worker = &mut workers[index];
            let retries = match action {
                0 => {
                    worker.tick(now, &store, false);
                    continue;
                }
                // Not retryable: wants nothing, still deposits.
                1 => worker.failing_call(FakeRequest::http("POST", "/"), now, &store) - 1,
                _ => worker.failing_call(get("/"), now, &store) - 1,
            };
            note(&ledger, now / bucket, retries);
        }
        store.stop_interfering();
        for worker in &workers {
            worker.tick(now, &store, false);
        }
        extra.lock().unwrap().tick(now, &store, false);

        let ledger = ledger.lock().unwrap();
        let span = |end: u64| {
            ledger
                .range(end.saturating_sub(9)..=end)
                .fold((0, 0), |(r, g), (_, (requests, granted))| (r + requests, g + granted))
        };
        for (&end, &(_, granted)) in ledger.iter() {
            if granted == 0 {
                continue;
            }
            let (requests, retries) = span(end);
            let allowed = requests * u64::from(budget.ratio_ppm) / 1_000_000 + u64::from(budget.floor);
            prop_assert!(
                retries <= allowed,
                "window ending at bucket {}: {} retries for {} requests, {} allowed",
                end, retries, requests, allowed
            );
        }
        let (requests, retries) = span(now / bucket);
        let shared = record(&store).window.totals(now / bucket);
        prop_assert_eq!(
            (u64::from(shared.requests), u64::from(shared.retries)),
            (requests, retries)
        );
        let used: i64 = workers.iter().map(|w| w.metric("api.used")).sum::<i64>()
            + extra.lock().unwrap().metric("api.used");
        let granted: u64 = ledger.values().map(|(_, granted)| granted).sum();
        prop_assert_eq!(u64::try_from(used).unwrap(), granted);
    }
}
