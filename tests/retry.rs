//! Retry budgets through the whole core: config, engine, shared store, with a fake clock. The
//! router is simulated: it makes as many retries as it was granted when the upstream fails, and
//! reports them in `x-envoy-attempt-count`.

// A test crate: a failed unwrap is how it reports a failed expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

mod common;

use std::sync::{Arc, Mutex};

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
    fn header(&mut self, name: &str) -> Option<Vec<u8>> {
        match name {
            ":status" => Some(self.status.to_string().into_bytes()),
            "x-envoy-attempt-count" => self.attempts.map(|a| a.to_string().into_bytes()),
            "retry-after" => self.retry_after.map(|s| s.to_string().into_bytes()),
            _ => None,
        }
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
