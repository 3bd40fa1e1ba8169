//! Circuit breakers through the whole core: config, engine, shared store, with a fake clock.
//! Other workers are simulated by interleaving their decisions between this worker's read and its
//! write, or by real threads.

// A test crate: a failed unwrap is how it reports a failed expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use seawall::clock::Timestamp;
use seawall::engine::{StreamState, Verdict, GRPC_UNAVAILABLE};
use seawall::policy::circuit_breaker::{
    flags, BreakerState, Circuit, Classifier, Outcome, ResponseFacts, StatusSet, RECORD_LEN,
};
use seawall::request::FakeRequest;
use seawall::state::cas::read;
use seawall::state::fake::FakeStore;

const MS: u64 = 1_000_000;
const SECOND: u64 = 1_000 * MS;
const T0: u64 = 1_800_000_000 * SECOND;

/// How a stream ended, as Envoy would report it.
#[derive(Debug, Clone, Copy)]
struct Ended {
    status: Option<u16>,
    flags: u64,
    grpc: Option<u32>,
}

impl Ended {
    fn status(status: u16) -> Self {
        Ended {
            status: Some(status),
            flags: 0,
            grpc: None,
        }
    }

    /// The client went away before any response.
    fn abandoned() -> Self {
        Ended {
            status: None,
            flags: 0,
            grpc: None,
        }
    }
}

impl ResponseFacts for Ended {
    fn status(&mut self) -> Option<u16> {
        self.status
    }
    fn flags(&mut self) -> u64 {
        self.flags
    }
    fn grpc_status(&mut self) -> Option<u32> {
        self.grpc
    }
}

mod common;

use common::{get, Worker};

/// What the client saw.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Upstream,
    Refused {
        status: u16,
        retry_after: Option<u64>,
        circuit: String,
    },
}

/// What this file asks of a worker.
trait Calls {
    fn start(
        &mut self,
        request: FakeRequest,
        now: u64,
        store: &FakeStore,
    ) -> Result<StreamState, Seen>;
    fn end(&mut self, stream: StreamState, took: u64, ended: Ended, now: u64, store: &FakeStore);
    fn call(&mut self, request: FakeRequest, now: u64, store: &FakeStore, status: u16) -> Seen;
    fn metric(&self, name: &str) -> i64;
}

impl Calls for Worker {
    /// Sends a request; when it is let through, returns its stream for a later [`Worker::end`].
    fn start(
        &mut self,
        request: FakeRequest,
        now: u64,
        store: &FakeStore,
    ) -> Result<StreamState, Seen> {
        let decision = self.send(request, now, store);
        match decision.verdict {
            Verdict::Continue => Ok(decision.stream),
            Verdict::Pause { .. } => panic!("no route here injects delays"),
            Verdict::Reply(reply) => Err(Seen::Refused {
                status: reply.status,
                retry_after: reply.retry_after_seconds(),
                circuit: reply
                    .headers
                    .iter()
                    .find(|(name, _)| name == "x-seawall-circuit")
                    .map(|(_, value)| value.clone())
                    .unwrap_or_default(),
            }),
        }
    }

    /// The upstream answers after `took`, and the stream ends.
    fn end(
        &mut self,
        mut stream: StreamState,
        took: u64,
        mut ended: Ended,
        now: u64,
        store: &FakeStore,
    ) {
        if ended.status.is_some() {
            self.engine.on_response(
                &mut stream,
                Timestamp::from_nanos(now + took),
                &self.metrics,
            );
        }
        self.engine.on_stream_end(
            &stream,
            &mut ended,
            Timestamp::from_nanos(now + took),
            store,
            &self.metrics,
        );
    }

    /// A whole call that the upstream answers at once with `status`.
    fn call(&mut self, request: FakeRequest, now: u64, store: &FakeStore, status: u16) -> Seen {
        match self.start(request, now, store) {
            Ok(stream) => {
                self.end(stream, 0, Ended::status(status), now, store);
                Seen::Upstream
            }
            Err(seen) => seen,
        }
    }

    fn metric(&self, name: &str) -> i64 {
        self.counter(&format!("seawall.circuit_breaker.{name}"))
    }
}

fn refused(retry_after: u64, circuit: &str) -> Seen {
    Seen::Refused {
        status: 503,
        retry_after: Some(retry_after),
        circuit: circuit.to_owned(),
    }
}

const CONSECUTIVE: &str = r#"{
    "circuit_breakers": {"upstream": {"key": "route", "open_when": {"consecutive_failures": 3},
                                      "open_for": "5s", "max_open_for": "40s", "half_open_probes": 2}},
    "routes": [{"name": "all", "circuit_breaker": "upstream"}]
}"#;

/// Trips the breaker of `worker` at `now` with three failures: it is open until `now` + 5 s.
fn trip(worker: &mut Worker, store: &FakeStore, now: u64) {
    for _ in 0..3 {
        assert_eq!(worker.call(get("/"), now, store, 503), Seen::Upstream);
    }
}

#[test]
fn consecutive_failures_open_the_breaker_and_it_fails_fast_with_the_time_left() {
    let store = FakeStore::new();
    let mut worker = Worker::new(CONSECUTIVE, &store);
    for n in 0..2 {
        worker.call(get("/"), T0 + n, &store, 503);
    }
    // A success in between starts the count over.
    assert_eq!(worker.call(get("/"), T0 + 2, &store, 200), Seen::Upstream);
    for n in 3..5 {
        worker.call(get("/"), T0 + n, &store, 500);
    }
    assert_eq!(worker.metric("upstream.opened"), 0);
    worker.call(get("/"), T0 + 5, &store, 502);
    assert_eq!(worker.metric("upstream.opened"), 1);
    assert_eq!(worker.metric("upstream.open"), 1);
    assert_eq!(worker.metric("upstream.failures"), 5);
    assert_eq!(worker.metric("upstream.successes"), 1);

    let before = store.counts();
    assert_eq!(
        worker.call(get("/"), T0 + 2 * SECOND + 5, &store, 200),
        refused(3, "open"),
        "5 s open, 2 s gone: retry after 3 s"
    );
    let after = store.counts();
    assert_eq!(
        (after.gets - before.gets, after.sets - before.sets),
        (1, 0),
        "a refusal reads once and writes nothing"
    );
    assert_eq!(worker.metric("upstream.rejected"), 1);
}

#[test]
fn half_open_admits_exactly_the_probes_and_their_successes_close_it() {
    let store = FakeStore::new();
    let mut worker = Worker::new(CONSECUTIVE, &store);
    trip(&mut worker, &store, T0);
    let later = T0 + 5 * SECOND;
    let first = worker.start(get("/"), later, &store).unwrap();
    assert_eq!(worker.metric("upstream.half_opened"), 1);
    assert_eq!(
        (
            worker.metric("upstream.open"),
            worker.metric("upstream.half_open")
        ),
        (0, 1)
    );
    let second = worker.start(get("/"), later + 1, &store).unwrap();
    assert_eq!(
        worker.start(get("/"), later + 2, &store).unwrap_err(),
        refused(1, "half-open")
    );
    assert_eq!(worker.metric("upstream.probes"), 2);
    worker.end(first, 10 * MS, Ended::status(200), later, &store);
    assert_eq!(worker.metric("upstream.closed"), 0, "one success of two");
    // The finished probe's slot is free again, but the breaker still needs its second success.
    let third = worker.start(get("/"), later + 20 * MS, &store).unwrap();
    assert_eq!(worker.metric("upstream.probes"), 3);
    worker.end(second, 30 * MS, Ended::status(204), later, &store);
    assert_eq!(worker.metric("upstream.closed"), 1);
    assert_eq!(
        (
            worker.metric("upstream.open"),
            worker.metric("upstream.half_open")
        ),
        (0, 0)
    );
    // The third probe reports after the close: its episode is over, so it changes nothing.
    worker.end(third, 40 * MS, Ended::status(500), later, &store);
    assert_eq!(worker.metric("upstream.opened"), 1);
    assert_eq!(
        worker.call(get("/"), later + SECOND, &store, 200),
        Seen::Upstream
    );
}

#[test]
fn failed_probes_reopen_for_longer_each_time_up_to_the_cap() {
    let store = FakeStore::new();
    let mut worker = Worker::new(CONSECUTIVE, &store);
    trip(&mut worker, &store, T0);
    let mut now = T0;
    let mut periods = Vec::new();
    for _ in 0..5 {
        let Err(Seen::Refused { retry_after, .. }) = worker.start(get("/"), now + 1, &store) else {
            panic!("the breaker is open");
        };
        let open_for = retry_after.unwrap();
        periods.push(open_for);
        now += open_for * SECOND;
        let probe = worker.start(get("/"), now, &store).unwrap();
        worker.end(probe, 0, Ended::status(503), now, &store);
    }
    assert_eq!(periods, [5, 10, 20, 40, 40]);
    assert_eq!(worker.metric("upstream.reopened"), 5);

    // Two good probes close it; a trip soon after the close counts as a repeat ...
    let Err(Seen::Refused { retry_after, .. }) = worker.start(get("/"), now + 1, &store) else {
        panic!("the breaker is open");
    };
    now += retry_after.unwrap() * SECOND;
    for n in 0..2 {
        let probe = worker.start(get("/"), now + n, &store).unwrap();
        worker.end(probe, 0, Ended::status(200), now + n, &store);
    }
    assert_eq!(worker.metric("upstream.closed"), 1);
    trip(&mut worker, &store, now + 10 * SECOND);
    assert_eq!(
        worker
            .start(get("/"), now + 10 * SECOND + 3, &store)
            .unwrap_err(),
        refused(40, "open")
    );
    // ... while a trip long after a lasting close starts the back-off over.
    now += 10 * SECOND + 40 * SECOND;
    for n in 0..2 {
        let probe = worker.start(get("/"), now + n, &store).unwrap();
        worker.end(probe, 0, Ended::status(200), now + n, &store);
    }
    now += 41 * SECOND;
    trip(&mut worker, &store, now);
    assert_eq!(
        worker.start(get("/"), now + 3, &store).unwrap_err(),
        refused(5, "open")
    );
}

const RATES: &str = r#"{
    "circuit_breakers": {"upstream": {"key": "route",
        "failure": {"slow_call": "100ms"},
        "open_when": {"failure_rate": 50, "slow_call_rate": 50, "min_requests": 10, "window": "10s"}}},
    "routes": [{"name": "all", "circuit_breaker": "upstream"}]
}"#;

#[test]
fn failure_rate_waits_for_min_requests_and_forgets_what_left_the_window() {
    let store = FakeStore::new();
    let mut worker = Worker::new(RATES, &store);
    for n in 0..9 {
        worker.call(get("/"), T0 + n, &store, 503);
    }
    assert_eq!(
        worker.metric("upstream.opened"),
        0,
        "9 failures, fewer than min_requests"
    );
    // Eleven seconds on, those nine have left the window.
    let later = T0 + 11 * SECOND;
    for n in 0..5 {
        worker.call(get("/"), later + n, &store, 200);
    }
    for n in 0..4 {
        worker.call(get("/"), later + 10 + n, &store, 500);
    }
    assert_eq!(worker.metric("upstream.opened"), 0, "4 of 9 in the window");
    worker.call(get("/"), later + 20, &store, 500);
    assert_eq!(worker.metric("upstream.opened"), 1, "5 of 10 is 50%");
}

#[test]
fn slow_calls_trip_the_slow_call_rule_and_a_slow_probe_reopens() {
    let store = FakeStore::new();
    let mut worker = Worker::new(RATES, &store);
    for n in 0..10 {
        let stream = worker.start(get("/"), T0 + n, &store).unwrap();
        let took = if n % 2 == 0 { 250 * MS } else { 5 * MS };
        worker.end(stream, took, Ended::status(200), T0 + n, &store);
    }
    assert_eq!(worker.metric("upstream.slow_calls"), 5);
    assert_eq!(worker.metric("upstream.failures"), 0);
    assert_eq!(worker.metric("upstream.opened"), 1);
    let probe = worker.start(get("/"), T0 + 6 * SECOND, &store).unwrap();
    worker.end(probe, 150 * MS, Ended::status(200), T0 + 6 * SECOND, &store);
    assert_eq!(worker.metric("upstream.reopened"), 1);
    assert_eq!(
        worker
            .start(get("/"), T0 + 6 * SECOND + 150 * MS, &store)
            .unwrap_err(),
        refused(10, "open"),
        "a repeated trip doubles the open period"
    );
}

const ONE_PROBE: &str = r#"{
    "rate_limits": {"tiny": {"rate": "1/h", "burst": 1, "key": [{"header": "x-user"}], "on_missing_key": "skip"}},
    "circuit_breakers": {"upstream": {"key": "route", "open_when": {"consecutive_failures": 1},
                                      "open_for": "1s", "max_open_for": "1s"}},
    "routes": [{"name": "all", "circuit_breaker": "upstream", "rate_limits": ["tiny"]}]
}"#;

#[test]
fn a_probe_that_never_reaches_the_upstream_gives_back_its_slot() {
    let store = FakeStore::new();
    let mut worker = Worker::new(ONE_PROBE, &store);
    worker.call(get("/"), T0, &store, 503);
    let now = T0 + SECOND;
    // The client leaves before any response.
    let probe = worker.start(get("/"), now, &store).unwrap();
    worker.end(probe, MS, Ended::abandoned(), now, &store);
    assert_eq!(worker.metric("upstream.reopened"), 0);
    // The rate limit refuses the next probe after the breaker admitted it.
    worker.call(get("/").header("x-user", "u"), now + 2 * MS, &store, 200);
    let refused_by_limit = worker.start(get("/").header("x-user", "u"), now + 3 * MS, &store);
    assert!(
        matches!(refused_by_limit, Err(Seen::Refused { status: 429, .. })),
        "{refused_by_limit:?}"
    );
    // The slot came back both times: this request is a probe, and its success closes the breaker.
    assert_eq!(
        worker.call(get("/"), now + 4 * MS, &store, 200),
        Seen::Upstream
    );
    assert_eq!(worker.metric("upstream.closed"), 1);
    assert_eq!(worker.metric("upstream.half_open"), 0);
}

#[test]
fn probes_that_never_report_are_replaced_after_the_longest_open_period() {
    let store = FakeStore::new();
    let mut worker = Worker::new(ONE_PROBE, &store);
    worker.call(get("/"), T0, &store, 503);
    let lost = worker.start(get("/"), T0 + SECOND, &store).unwrap();
    assert_eq!(
        worker.start(get("/"), T0 + 2 * SECOND, &store).unwrap_err(),
        refused(1, "half-open")
    );
    let probe = worker.start(get("/"), T0 + 2 * SECOND + 1, &store).unwrap();
    assert_eq!(worker.metric("upstream.probes_restarted"), 1);
    // The lost probe turns up after all: its episode is over, so it is ignored.
    worker.end(lost, 0, Ended::status(503), T0 + 2 * SECOND + 2, &store);
    assert_eq!(worker.metric("upstream.reopened"), 0);
    worker.end(probe, 0, Ended::status(200), T0 + 2 * SECOND + 3, &store);
    assert_eq!(worker.metric("upstream.closed"), 1);
}

const BY_TENANT: &str = r#"{
    "circuit_breakers": {"tenant": {"key": {"header": "x-tenant"}, "max_keys": 2,
                                    "open_when": {"consecutive_failures": 1}, "open_for": "30s"}},
    "routes": [{"name": "all", "circuit_breaker": "tenant"}]
}"#;

fn tenant(name: &str) -> FakeRequest {
    get("/").header("x-tenant", name)
}

#[test]
fn keys_never_share_a_record_and_idle_records_are_reused() {
    let store = FakeStore::new();
    let mut worker = Worker::new(BY_TENANT, &store);
    assert_eq!(
        store.keys_with_prefix("sw:seawall:cb:tenant:"),
        3,
        "two slots and the overflow record"
    );
    assert_eq!(worker.call(tenant("a"), T0, &store, 200), Seen::Upstream);
    assert_eq!(
        worker.call(tenant("b"), T0 + 1, &store, 200),
        Seen::Upstream
    );
    // Both slots are held: a third key shares the overflow record, which its failure opens.
    assert_eq!(
        worker.call(tenant("c"), T0 + 2, &store, 503),
        Seen::Upstream
    );
    assert_eq!(
        worker.start(tenant("c"), T0 + 3, &store).unwrap_err(),
        refused(30, "open")
    );
    assert_eq!(worker.metric("tenant.overflow"), 2);
    assert_eq!(worker.metric("tenant.untracked"), 0);
    assert_eq!(worker.metric("tenant.opened"), 1);
    // One tenant's failure opens its breaker only.
    worker.call(tenant("a"), T0 + 10, &store, 503);
    assert_eq!(
        worker.start(tenant("a"), T0 + 11, &store).unwrap_err(),
        refused(30, "open")
    );
    assert_eq!(
        worker.call(tenant("b"), T0 + 12, &store, 200),
        Seen::Upstream
    );
    // After a whole window without traffic, b's closed record is free for c; a's open one is not.
    let later = T0 + 11 * SECOND;
    worker.call(tenant("c"), later, &store, 503);
    assert_eq!(worker.metric("tenant.opened"), 3);
    assert!(worker.start(tenant("c"), later + 1, &store).is_err());
    assert!(worker.start(tenant("a"), later + 2, &store).is_err());
    assert_eq!(
        store.keys_with_prefix("sw:seawall:cb:tenant:"),
        3,
        "no key was created"
    );
}

/// Issue 14, point 6: open and half-open records were never freed, so a key that went idle while
/// open held its slot for good; and a key whose neighbouring slots were all held got no breaker
/// at all (3 of 60 keys in a 100-slot table), which a client could arrange on purpose.
#[test]
fn any_number_of_keys_over_time_each_get_a_breaker() {
    let store = FakeStore::new();
    let mut worker = Worker::new(BY_TENANT, &store);
    // Two tenants trip and go away while open.
    for name in ["a", "b"] {
        worker.call(tenant(name), T0, &store, 503);
    }
    assert_eq!(worker.metric("tenant.opened"), 2);
    // Newcomers share the overflow record meanwhile: still a breaker, never untracked.
    assert_eq!(
        worker.call(tenant("c"), T0 + SECOND, &store, 200),
        Seen::Upstream
    );
    assert_eq!(worker.metric("tenant.overflow"), 1);
    // Once the open periods are over by more than max_open_for (60 s) with nobody probing,
    // the records are free again, and newcomers get records of their own.
    let later = T0 + 30 * SECOND + 61 * SECOND;
    for (n, name) in ["d", "e"].into_iter().enumerate() {
        assert_eq!(
            worker.call(tenant(name), later + n as u64, &store, 200),
            Seen::Upstream
        );
    }
    assert_eq!(
        worker.metric("tenant.overflow"),
        1,
        "d and e have slots of their own"
    );
    // e's failure opens e's breaker, not d's.
    worker.call(tenant("e"), later + 10, &store, 503);
    assert!(worker.start(tenant("e"), later + 11, &store).is_err());
    assert_eq!(
        worker.call(tenant("d"), later + 12, &store, 200),
        Seen::Upstream
    );
    assert_eq!(worker.metric("tenant.untracked"), 0);
}

#[test]
fn the_common_path_reads_once_and_records_with_one_write() {
    let store = FakeStore::new();
    let mut worker = Worker::new(CONSECUTIVE, &store);
    worker.call(get("/"), T0, &store, 200);
    let before = store.counts();
    let stream = worker.start(get("/"), T0 + 1, &store).unwrap();
    let admitted = store.counts();
    assert_eq!(
        (admitted.gets - before.gets, admitted.sets - before.sets),
        (1, 0),
        "admission while closed"
    );
    worker.end(stream, MS, Ended::status(200), T0 + 1, &store);
    let recorded = store.counts();
    // A success on a quiet record is tallied on the worker until its tick (see
    // `closed_successes_cost_one_read_and_are_written_once_a_tick`); a failure is recorded at
    // once, with one read and one write.
    assert_eq!(
        (recorded.gets - admitted.gets, recorded.sets - admitted.sets),
        (0, 0),
        "recording a success"
    );
    let stream = worker.start(get("/"), T0 + 2, &store).unwrap();
    let admitted = store.counts();
    worker.end(stream, MS, Ended::status(503), T0 + 2, &store);
    let recorded = store.counts();
    assert_eq!(
        (recorded.gets - admitted.gets, recorded.sets - admitted.sets),
        (1, 1),
        "recording the outcome"
    );
}

#[test]
fn shadow_mode_runs_the_state_machine_but_refuses_nothing() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        &CONSECUTIVE.replace("\"open_for\"", "\"mode\": \"shadow\", \"open_for\""),
        &store,
    );
    trip(&mut worker, &store, T0);
    assert_eq!(worker.metric("upstream.opened"), 1);
    for n in 0..4 {
        assert_eq!(
            worker.call(get("/"), T0 + SECOND + n, &store, 200),
            Seen::Upstream
        );
    }
    assert_eq!(worker.metric("upstream.shadow_rejected"), 4);
    assert_eq!(worker.metric("upstream.rejected"), 0);
    // It still probes and closes, exactly as it would in enforce mode.
    for n in 0..2 {
        worker.call(get("/"), T0 + 6 * SECOND + n, &store, 200);
    }
    assert_eq!(worker.metric("upstream.closed"), 1);
}

#[test]
fn forced_open_and_disabled_touch_no_state() {
    for (mode, expected) in [
        ("forced_open", refused(5, "open")),
        ("disabled", Seen::Upstream),
    ] {
        let store = FakeStore::new();
        let json = CONSECUTIVE.replace(
            "\"open_for\"",
            &format!("\"mode\": \"{mode}\", \"open_for\""),
        );
        let mut worker = Worker::new(&json, &store);
        let before = store.counts();
        for n in 0..5 {
            assert_eq!(
                worker.call(get("/"), T0 + n, &store, 503),
                expected,
                "{mode}"
            );
        }
        assert_eq!(store.counts().gets, before.gets, "{mode} reads nothing");
        assert_eq!(worker.metric("upstream.opened"), 0, "{mode}");
    }
}

#[test]
fn grpc_callers_are_told_unavailable() {
    let store = FakeStore::new();
    let mut worker = Worker::new(CONSECUTIVE, &store);
    trip(&mut worker, &store, T0);
    let decision = worker.send(
        get("/svc/Method").header("content-type", "application/grpc"),
        T0 + SECOND,
        &store,
    );
    let Verdict::Reply(reply) = decision.verdict else {
        panic!("the breaker is open");
    };
    assert_eq!(reply.grpc_status, Some(GRPC_UNAVAILABLE));
}

#[test]
fn outcomes_are_classified_from_status_flags_and_grpc_status() {
    let mut statuses = StatusSet::default();
    statuses.insert_class(5);
    statuses.insert(429);
    let classifier = Classifier {
        statuses,
        flags: flags::RESETS | flags::TIMEOUTS,
        grpc_codes: 1 << 14,
        slow_call: Some(Duration::from_millis(100)),
    };
    let outcome = |status, flags, grpc, elapsed_ms: Option<u64>| {
        let mut ended = Ended {
            status,
            flags,
            grpc,
        };
        classifier.outcome(&mut ended, elapsed_ms.map(Duration::from_millis), true)
    };
    let done = |failed, slow| Outcome::Completed { failed, slow };
    assert_eq!(outcome(Some(200), 0, Some(0), Some(5)), done(false, false));
    assert_eq!(outcome(Some(503), 0, None, Some(5)), done(true, false));
    assert_eq!(outcome(Some(429), 0, None, Some(500)), done(true, true));
    assert_eq!(outcome(Some(404), 0, None, Some(100)), done(false, true));
    // A reset after the headers went out: the status says 200, the flags say otherwise.
    assert_eq!(
        outcome(Some(200), flags::UPSTREAM_REMOTE_RESET, None, Some(5)),
        done(true, false)
    );
    assert_eq!(outcome(Some(200), 0, Some(14), Some(5)), done(true, false));
    // A plain HTTP request never asks for a gRPC status.
    let mut plain = Ended {
        status: Some(200),
        flags: 0,
        grpc: Some(14),
    };
    assert_eq!(
        classifier.outcome(&mut plain, None, false),
        done(false, false)
    );
    assert_eq!(outcome(Some(200), 0, Some(5), Some(5)), done(false, false));
    // No response: a timeout is the upstream's failure, a client leaving is nobody's.
    assert_eq!(
        outcome(None, flags::UPSTREAM_REQUEST_TIMEOUT, None, None),
        done(true, false)
    );
    assert_eq!(outcome(None, 1 << 14, None, None), Outcome::Abandoned);
    assert_eq!(outcome(Some(0), 0, None, None), Outcome::Abandoned);
}

/// Half-open probes must be exact across workers: another worker takes a probe slot between
/// this worker's read and its write, every time, and still no more than `half_open_probes`
/// requests are admitted.
#[test]
fn interleaved_workers_admit_exactly_the_probe_count() {
    let store = FakeStore::new();
    let mut worker = Worker::new(CONSECUTIVE, &store);
    trip(&mut worker, &store, T0);
    let now = T0 + 5 * SECOND;
    let admitted_elsewhere = Arc::new(Mutex::new(0u32));
    let mut other = Worker::new(CONSECUTIVE, &store);
    let counter = Arc::clone(&admitted_elsewhere);
    let mut turns = 0;
    store.interfere(move |store| {
        turns += 1;
        if turns <= 6 && other.start(get("/"), now, store).is_ok() {
            *counter.lock().unwrap() += 1;
        }
    });
    let mut admitted_here = 0;
    for n in 0..6 {
        if worker.start(get("/"), now + n, &store).is_ok() {
            admitted_here += 1;
        }
    }
    store.stop_interfering();
    let elsewhere = *admitted_elsewhere.lock().unwrap();
    assert_eq!(
        admitted_here + elsewhere,
        2,
        "here {admitted_here}, elsewhere {elsewhere}"
    );
    assert!(store.counts().cas_mismatches > 0, "the workers did race");
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
fn threads_hammering_a_half_open_breaker_admit_exactly_the_probe_count() {
    let store = Arc::new(FakeStore::new());
    let mut worker = Worker::new(CONSECUTIVE, &store);
    trip(&mut worker, &store, T0);
    let now = T0 + 5 * SECOND;
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let mut worker = Worker::new(CONSECUTIVE, &store);
                (0..500)
                    .filter(|&n| worker.start(get("/"), now + n, &store).is_ok())
                    .count()
            })
        })
        .collect();
    let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(admitted, 2);
}

fn breaker_config(open_for: &str) -> String {
    format!(
        r#"{{"circuit_breakers": {{"payments": {{"key": "route", "open_when": {{"consecutive_failures": 3}},
                                               "open_for": "{open_for}", "max_open_for": "{open_for}"}}}},
            "routes": [{{"name": "api", "circuit_breaker": "payments"}}]}}"#
    )
}

/// Issue 14, point 4: an open period is counted from a stored time, so a reload to a shorter
/// `open_for` kept the old one, and a clock that stepped back stretched it by the step. The
/// record now counts for no more than this config gives its trips, from now at the latest.
#[test]
fn an_open_period_is_never_longer_than_the_current_config_and_clock_allow() {
    // A reload: open for an hour, reloaded as open for a second.
    let store = FakeStore::new();
    let mut slow = Worker::new(&breaker_config("1h"), &store);
    for _ in 0..3 {
        assert_eq!(slow.call(get("/"), T0, &store, 503), Seen::Upstream);
    }
    let Err(Seen::Refused { retry_after, .. }) = slow.start(get("/"), T0, &store) else {
        panic!("open");
    };
    assert_eq!(retry_after, Some(3600));
    let mut fast = Worker::new(&breaker_config("1s"), &store);
    let Err(Seen::Refused { retry_after, .. }) = fast.start(get("/"), T0 + MS, &store) else {
        panic!("still open right after the reload");
    };
    assert_eq!(
        retry_after,
        Some(1),
        "the new open period, not the old hour"
    );
    assert_eq!(
        fast.call(get("/"), T0 + MS + 1_000 * MS, &store, 200),
        Seen::Upstream,
        "a second later the probe goes through"
    );
    assert_eq!(
        fast.call(get("/"), T0 + 1_100 * MS, &store, 200),
        Seen::Upstream
    );

    // A clock step: opened under a clock an hour ahead, read after it stepped back.
    let store = FakeStore::new();
    let mut worker = Worker::new(&breaker_config("2s"), &store);
    let later = T0 + 3_600 * 1_000 * MS;
    for _ in 0..3 {
        assert_eq!(worker.call(get("/"), later, &store, 503), Seen::Upstream);
    }
    let Err(Seen::Refused { retry_after, .. }) = worker.start(get("/"), T0, &store) else {
        panic!("open");
    };
    assert!(retry_after.is_some_and(|s| s <= 2), "{retry_after:?}");
    assert_eq!(
        worker.call(get("/"), T0 + 2_000 * MS, &store, 200),
        Seen::Upstream,
        "the open period ends two seconds after the step, not an hour"
    );
}

/// A worker that read the clock just before another tripped the breaker decides on the open
/// record with its older reading. That is not a clock step back: it is refused, and the open
/// period stays as the trip wrote it. Clamped to the older reading and written back, the open
/// period lost the skew and the next worker probed early.
#[test]
fn a_worker_deciding_with_an_older_clock_reading_keeps_the_open_period() {
    let store = FakeStore::new();
    let mut tripping = Worker::new(&breaker_config("2s"), &store);
    let mut lagging = Worker::new(&breaker_config("2s"), &store);
    for _ in 0..3 {
        assert_eq!(tripping.call(get("/"), T0, &store, 503), Seen::Upstream);
    }
    let records = || {
        store
            .snapshot()
            .into_iter()
            .filter(|(key, _)| key.starts_with("sw:seawall:cb:payments:"))
            .collect::<Vec<_>>()
    };
    let before = records();
    assert!(!before.is_empty());
    let Err(Seen::Refused { .. }) = lagging.start(get("/"), T0 - 5 * MS, &store) else {
        panic!("open");
    };
    assert_eq!(records(), before, "the record is unchanged");
    let mut fresh = Worker::new(&breaker_config("2s"), &store);
    let Err(Seen::Refused { .. }) = fresh.start(get("/"), T0 + 1_998 * MS, &store) else {
        panic!("still open 2 ms before the open period ends");
    };
    assert_eq!(
        fresh.call(get("/"), T0 + 2_000 * MS, &store, 200),
        Seen::Upstream,
        "the probe goes through when the open period ends"
    );
}

/// Issue 14, point 3: ordinary calls carried no breaker generation. With a hung upstream, a 15 s
/// route timeout and `open_for: 5s`, the breaker half-opened, its probe succeeded and it closed at
/// about 6 s; then the timeouts of calls admitted before the trip landed in the new window,
/// reopened it as a repeat trip, and doubled the open period.
#[test]
fn calls_admitted_before_a_trip_do_not_count_after_the_close() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        r#"{"circuit_breakers": {"payments": {"key": "route", "open_when": {"consecutive_failures": 3},
                                              "open_for": "5s", "half_open_probes": 1}},
            "routes": [{"name": "api", "circuit_breaker": "payments"}]}"#,
        &store,
    );
    // Ten calls go out to an upstream that hangs.
    let hung: Vec<StreamState> = (0..10)
        .map(|n| worker.start(get("/"), T0 + n, &store).unwrap())
        .collect();
    // Three fast failures trip the breaker.
    for n in 0..3 {
        assert_eq!(
            worker.call(get("/"), T0 + MS + n, &store, 503),
            Seen::Upstream
        );
    }
    assert!(worker.start(get("/"), T0 + 2 * MS, &store).is_err(), "open");
    // Five seconds on, the probe succeeds and the breaker closes.
    assert_eq!(
        worker.call(get("/"), T0 + 5_100 * MS, &store, 200),
        Seen::Upstream
    );
    assert_eq!(worker.metric("payments.closed"), 1);
    // The hung calls time out at 15 s: they were admitted before the trip.
    for stream in hung {
        worker.end(
            stream,
            15 * SECOND,
            Ended::status(504),
            T0 + 15 * SECOND,
            &store,
        );
    }
    assert_eq!(
        worker.call(get("/"), T0 + 15 * SECOND + MS, &store, 200),
        Seen::Upstream,
        "the breaker stays closed"
    );
    assert_eq!(worker.metric("payments.opened"), 1);
    assert_eq!(worker.metric("payments.reopened"), 0);
}

// Closed-state successes tallied per worker (engine/breaker.rs): the common closed path reads
// once, successes reach the shared window on the tick, and trips keep the stated bound.

/// The worker's tick, as the host runs it every 100 ms.
const TICK: u64 = 100 * MS;

fn tick(worker: &Worker, store: &FakeStore, now: u64) {
    worker
        .engine
        .on_worker_tick(Timestamp::from_nanos(now), store, &worker.metrics, false);
}

fn retire(worker: &Worker, store: &FakeStore, now: u64) {
    worker
        .engine
        .on_worker_tick(Timestamp::from_nanos(now), store, &worker.metrics, true);
}

/// The shared record of route `route`'s breaker as every worker sees it.
fn shared_record(worker: &Worker, store: &FakeStore, route: &str) -> BreakerState {
    let key = worker.engine.config().circuit_breakers[0]
        .route_record(route)
        .unwrap();
    read::<RECORD_LEN, BreakerState, _>(store, &key)
        .unwrap()
        .unwrap()
        .0
}

/// The shared window's totals at `now` (requests, failures) and the failure run.
fn shared_totals(worker: &Worker, store: &FakeStore, now: u64) -> (u32, u32, u32) {
    let policy = &worker.engine.config().circuit_breakers[0];
    match shared_record(worker, store, "all").circuit {
        Circuit::Closed {
            window,
            consecutive_failures,
            ..
        } => {
            let totals = window.totals(policy.breaker.bucket_of(now));
            (totals.requests, totals.failures, consecutive_failures)
        }
        circuit => panic!("not closed: {circuit:?}"),
    }
}

fn workers(json: &str, store: &FakeStore, count: usize) -> Vec<Worker> {
    (0..count).map(|_| Worker::new(json, store)).collect()
}

const RATE_ONLY: &str = r#"{
    "circuit_breakers": {"upstream": {"key": "route",
        "open_when": {"failure_rate": 50, "min_requests": 20, "window": "10s"}}},
    "routes": [{"name": "all", "circuit_breaker": "upstream"}]
}"#;

/// (a) Once a record shows traffic and nothing that could trip it, a closed request costs its
/// admission's one read, nothing more; each worker then writes once a tick per record.
#[test]
fn closed_successes_cost_one_read_and_are_written_once_a_tick() {
    let store = FakeStore::new();
    let mut all = workers(RATE_ONLY, &store, 4);
    // The first success on an idle record is written at once, so the record shows traffic.
    assert_eq!(all[0].call(get("/"), T0, &store, 200), Seen::Upstream);
    let before = store.counts();
    for n in 0..50 {
        for worker in &mut all {
            assert_eq!(
                worker.call(get("/"), T0 + 1 + n, &store, 200),
                Seen::Upstream
            );
        }
    }
    let after = store.counts();
    assert_eq!(
        (after.gets - before.gets, after.sets - before.sets),
        (200, 0),
        "200 requests: one read each, no write"
    );
    assert_eq!(shared_totals(&all[0], &store, T0 + 60), (1, 0, 0));
    let after = store.counts();
    for worker in &all {
        tick(worker, &store, T0 + TICK);
    }
    let ticked = store.counts();
    assert_eq!(
        (ticked.gets - after.gets, ticked.sets - after.sets),
        (4, 4),
        "one read and one write per worker and record"
    );
    assert_eq!(shared_totals(&all[0], &store, T0 + TICK), (201, 0, 0));
    for worker in &all {
        assert_eq!(worker.metric("upstream.tallied_successes"), 50);
        assert!(
            worker.metric("upstream.successes") >= 50,
            "every outcome counts"
        );
    }
    // A tick with nothing tallied touches nothing.
    let ticked = store.counts();
    for worker in &all {
        tick(worker, &store, T0 + 2 * TICK);
    }
    assert_eq!(store.counts(), ticked);
}

/// Runs the scenario of (b) and (d): three workers succeed `flushed` times each, tick, succeed
/// `pending` times each without a tick, then a fourth worker fails until the breaker opens.
/// With `tick_every_call`, every worker ticks after each call, so every success is in shared data
/// before the next outcome is judged: the breaker as it was before tallies. Returns the failure
/// that opened it (1-based).
fn failures_to_trip(flushed: u64, pending: u64, tick_every_call: bool) -> u64 {
    let store = FakeStore::new();
    let mut all = workers(RATE_ONLY, &store, 4);
    let mut now = T0;
    let call = |worker: &mut Worker, now: u64, status: u16| {
        assert_eq!(worker.call(get("/"), now, &store, status), Seen::Upstream);
        if tick_every_call {
            tick(worker, &store, now);
        }
    };
    for _ in 0..flushed {
        for worker in &mut all[1..] {
            call(worker, now, 200);
        }
        now += MS;
    }
    now += TICK;
    for worker in &all[1..] {
        tick(worker, &store, now);
    }
    for _ in 0..pending {
        for worker in &mut all[1..] {
            call(worker, now, 200);
        }
        now += MS;
    }
    for failure in 1..=100 {
        let (first, _) = all.split_at_mut(1);
        call(&mut first[0], now, 503);
        now += MS;
        if first[0].metric("upstream.opened") == 1 {
            return failure;
        }
    }
    panic!("never opened");
}

/// The failure at which RATE_ONLY (50 %, at least 20 calls) opens after `successes` successes.
fn rate_trip(successes: u64) -> u64 {
    (1..)
        .find(|&k| k + successes >= 20 && 2 * k >= k + successes)
        .unwrap()
}

/// (b) Successes older than a tick are all in the window: a run of failures on one worker trips
/// at exactly the failure it tripped at before tallies.
#[test]
fn failures_trip_at_the_same_request_when_the_other_workers_succeeded_more_than_a_tick_ago() {
    for flushed in [0, 3, 7, 10, 25] {
        let today = failures_to_trip(flushed, 0, true);
        assert_eq!(today, rate_trip(3 * flushed), "{flushed} each");
        assert_eq!(failures_to_trip(flushed, 0, false), today, "{flushed} each");
    }
}

/// (d) The bound: the window a failure is judged on lacks exactly the successes the other workers
/// tallied since their last tick (here 3 workers × `pending`), no more. Without them the rate is
/// judged over fewer calls, so a trip can come earlier, or later when `min_requests` is not met
/// without them; their ticks put them back.
#[test]
fn a_rate_trip_misses_at_most_the_other_workers_successes_of_the_last_tick() {
    for (flushed, pending) in [(10, 10), (3, 6), (0, 6), (5, 1)] {
        let today = failures_to_trip(flushed, pending, true);
        assert_eq!(today, rate_trip(3 * (flushed + pending)));
        let tallied = failures_to_trip(flushed, pending, false);
        // With nothing flushed, the first success was written at once: the record was idle.
        let written = 3 * flushed + u64::from(flushed == 0);
        assert_eq!(
            tallied,
            rate_trip(written),
            "{flushed} flushed and {pending} pending each: judged without the other {}",
            3 * (flushed + pending) - written
        );
    }
    // Both directions occur: 30 missing of 60 trips at 30 instead of 60 ...
    assert_eq!(
        (
            failures_to_trip(10, 10, true),
            failures_to_trip(10, 10, false)
        ),
        (60, 30)
    );
    // ... and 17 missing of 18 trips at 19 (min_requests) instead of 18.
    assert_eq!(
        (failures_to_trip(0, 6, true), failures_to_trip(0, 6, false)),
        (18, 19)
    );

    // What the failing worker itself succeeded in is never missing: it goes in with its failure.
    let store = FakeStore::new();
    let mut worker = Worker::new(RATE_ONLY, &store);
    for n in 0..10 {
        worker.call(get("/"), T0 + n, &store, 200);
    }
    for n in 0..9 {
        worker.call(get("/"), T0 + 20 + n, &store, 503);
    }
    assert_eq!(worker.metric("upstream.opened"), 0, "9 of 19");
    assert_eq!(shared_totals(&worker, &store, T0 + 30), (19, 9, 9));
    worker.call(get("/"), T0 + 30, &store, 503);
    assert_eq!(worker.metric("upstream.opened"), 1, "10 of 20");
}

const RUN_OF_THREE: &str = r#"{
    "circuit_breakers": {"upstream": {"key": "route", "open_when": {"consecutive_failures": 3}}},
    "routes": [{"name": "all", "circuit_breaker": "upstream"}]
}"#;

/// (c) A success admitted once the record shows a failure run is recorded at once and breaks the
/// run, whichever worker it is on; so is a success admitted before, once its worker has seen the
/// run.
#[test]
fn a_success_on_another_worker_breaks_a_failure_run() {
    let store = FakeStore::new();
    let mut all = workers(RUN_OF_THREE, &store, 2);
    let (a, b) = all.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    b.call(get("/"), T0, &store, 200);
    // Admitted on a quiet record, still in flight when the run starts.
    let in_flight = b.start(get("/"), T0 + 1, &store).unwrap();
    a.call(get("/"), T0 + 2, &store, 503);
    a.call(get("/"), T0 + 3, &store, 503);
    assert_eq!(shared_totals(a, &store, T0 + 3).2, 2);
    // B's next request sees the run: its success goes to shared data and breaks it.
    let before = store.counts();
    assert_eq!(b.call(get("/"), T0 + 4, &store, 200), Seen::Upstream);
    let after = store.counts();
    assert_eq!((after.gets - before.gets, after.sets - before.sets), (2, 1));
    assert_eq!(shared_totals(a, &store, T0 + 4).2, 0, "the run is broken");
    a.call(get("/"), T0 + 5, &store, 503);
    a.call(get("/"), T0 + 6, &store, 503);
    // The call B admitted before the run ends now: B has seen the run since, so this success
    // comes after it and is recorded at once too.
    b.end(in_flight, 0, Ended::status(200), T0 + 7, &store);
    assert_eq!(shared_totals(a, &store, T0 + 7).2, 0);
    a.call(get("/"), T0 + 8, &store, 503);
    a.call(get("/"), T0 + 9, &store, 503);
    assert_eq!(a.metric("upstream.opened"), 0);
    a.call(get("/"), T0 + 10, &store, 503);
    assert_eq!(a.metric("upstream.opened"), 1, "three in a row");
}

/// (c, the bound's other half) A success admitted and finished on a quiet record before its worker
/// saw any failure is tallied: it counts in the window at the tick but does not break a run that
/// may have started before it, so a run can trip sooner than if it had been written at once.
#[test]
fn a_tallied_success_counts_in_the_window_but_never_breaks_a_run() {
    let store = FakeStore::new();
    let mut all = workers(RUN_OF_THREE, &store, 2);
    let (a, b) = all.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    b.call(get("/"), T0, &store, 200);
    let in_flight = b.start(get("/"), T0 + 1, &store).unwrap();
    a.call(get("/"), T0 + 2, &store, 503);
    b.end(in_flight, 0, Ended::status(200), T0 + 3, &store);
    a.call(get("/"), T0 + 4, &store, 503);
    tick(b, &store, T0 + TICK);
    assert_eq!(shared_totals(a, &store, T0 + TICK), (4, 2, 2));
    assert_eq!(b.metric("upstream.tallied_successes"), 1);
    a.call(get("/"), T0 + TICK + 1, &store, 503);
    assert_eq!(a.metric("upstream.opened"), 1);
}

/// (e) Tallies go to shared data on the tick and when the config retires, and the window then
/// holds what it held before tallies, bucket by bucket.
#[test]
fn tallies_are_written_on_the_tick_and_on_retiring_and_the_window_is_as_before() {
    let window_after = |tick_every_call: bool| {
        let store = FakeStore::new();
        let mut all = workers(RATE_ONLY, &store, 3);
        let mut now = T0;
        // Fifteen seconds of traffic, ticks every 100 ms, two failures at 2 s: the window is
        // quiet before them and again once they have left it, 10 s later.
        for step in 0..1_500u64 {
            for (n, worker) in all.iter_mut().enumerate() {
                let status = if n == 1 && (step == 200 || step == 205) {
                    503
                } else {
                    200
                };
                worker.call(get("/"), now + n as u64, &store, status);
                if tick_every_call {
                    tick(worker, &store, now + n as u64);
                }
            }
            now += 10 * MS;
            if now.is_multiple_of(TICK) {
                for worker in &all {
                    tick(worker, &store, now);
                }
            }
        }
        for worker in &all {
            tick(worker, &store, now);
        }
        let tallied: i64 = all
            .iter()
            .map(|w| w.metric("upstream.tallied_successes"))
            .sum();
        (shared_record(&all[0], &store, "all"), tallied)
    };
    // Ticking after every call writes each success before the next outcome: the record as it
    // was before tallies.
    let (today, _) = window_after(true);
    let (tallied, count) = window_after(false);
    assert!(count > 1_000, "{count} of 4,500 tallied");
    assert_eq!(tallied, today, "the same record, window and all");

    // Retiring writes what is tallied, and the retired config tallies nothing more.
    let store = FakeStore::new();
    let mut worker = Worker::new(RATE_ONLY, &store);
    for n in 0..5 {
        worker.call(get("/"), T0 + n, &store, 200);
    }
    assert_eq!(shared_totals(&worker, &store, T0 + 5).0, 1);
    retire(&worker, &store, T0 + 10);
    assert_eq!(shared_totals(&worker, &store, T0 + 10).0, 5);
    assert_eq!(worker.metric("upstream.tallied_successes"), 4);
    let before = store.counts();
    worker.call(get("/"), T0 + 11, &store, 200);
    let after = store.counts();
    assert_eq!((after.gets - before.gets, after.sets - before.sets), (2, 1));
    assert_eq!(shared_totals(&worker, &store, T0 + 11).0, 6);
}

/// Tallies keep today's rules on generations and slow calls: successes tallied before a trip do
/// not land in the window after the close, and a slow success is recorded at once.
#[test]
fn tallied_successes_from_before_a_trip_are_dropped_and_slow_calls_go_at_once() {
    let store = FakeStore::new();
    let mut all = workers(RATES, &store, 2);
    let (a, b) = all.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    b.call(get("/"), T0, &store, 200);
    for n in 1..4 {
        b.call(get("/"), T0 + n, &store, 200);
    }
    for n in 0..10 {
        a.call(get("/"), T0 + 10 + n, &store, 503);
    }
    assert_eq!(a.metric("upstream.opened"), 1);
    tick(b, &store, T0 + TICK);
    assert_eq!(
        b.metric("upstream.tallied_successes"),
        0,
        "the spell they counted in is over"
    );
    assert!(matches!(
        shared_record(a, &store, "all").circuit,
        Circuit::Open { .. }
    ));

    // A slow success (slow_call_rate is a rule) is written at once, with what was tallied.
    let store = FakeStore::new();
    let mut worker = Worker::new(RATES, &store);
    for n in 0..3 {
        worker.call(get("/"), T0 + n, &store, 200);
    }
    let stream = worker.start(get("/"), T0 + 3, &store).unwrap();
    worker.end(stream, 150 * MS, Ended::status(200), T0 + 3, &store);
    let policy = &worker.engine.config().circuit_breakers[0];
    let Circuit::Closed { window, .. } = shared_record(&worker, &store, "all").circuit else {
        panic!("closed");
    };
    let totals = window.totals(policy.breaker.bucket_of(T0 + 3));
    assert_eq!((totals.requests, totals.slow), (4, 1));
}

/// Keyed breakers tally per record; a worker tallies for at most TALLY_RECORDS records at once
/// and records the successes of any other key at once, as before.
#[test]
fn keyed_breakers_tally_per_record_and_fall_back_when_the_table_is_full() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        r#"{"circuit_breakers": {"tenant": {"key": {"header": "x-tenant"}, "max_keys": 100,
                                            "open_when": {"consecutive_failures": 1}}},
            "routes": [{"name": "all", "circuit_breaker": "tenant"}]}"#,
        &store,
    );
    let names: Vec<String> = (0..40).map(|n| format!("t{n}")).collect();
    // Each tenant's first success claims its record, at once: one write at admission, one read
    // and one write for the outcome.
    let start = store.counts();
    for (n, name) in names.iter().enumerate() {
        worker.call(tenant(name), T0 + n as u64, &store, 200);
    }
    assert_eq!(
        worker.metric("tenant.overflow"),
        0,
        "every tenant has its own record"
    );
    let before = store.counts();
    assert_eq!(before.sets - start.sets, 80);
    // A key whose slot another key holds reads the next slot too: the admissions' reads.
    let admissions = before.gets - start.gets - 40;
    for (n, name) in names.iter().enumerate() {
        worker.call(tenant(name), T0 + 100 + n as u64, &store, 200);
    }
    let after = store.counts();
    assert_eq!(
        (after.gets - before.gets, after.sets - before.sets),
        (admissions + 8, 8),
        "32 tallied, 8 recorded at once"
    );
    tick(&worker, &store, T0 + TICK);
    assert_eq!(worker.metric("tenant.tallied_successes"), 32);
    // One tenant's failure opens its breaker only, tallies or not.
    worker.call(tenant("t3"), T0 + TICK + 1, &store, 503);
    assert!(worker.start(tenant("t3"), T0 + TICK + 2, &store).is_err());
    assert_eq!(
        worker.call(tenant("t4"), T0 + TICK + 3, &store, 200),
        Seen::Upstream
    );
}

/// A tick whose write fails keeps the tally for the next tick; a retiring one that fails loses
/// it, counted as untracked like any outcome the breaker could not record.
#[test]
fn a_failed_tick_keeps_the_tally_and_a_failed_retirement_counts_it_untracked() {
    use seawall::state::StoreError;
    let store = FakeStore::new();
    let mut worker = Worker::new(RATE_ONLY, &store);
    for n in 0..4 {
        worker.call(get("/"), T0 + n, &store, 200);
    }
    store.fail_next(1, StoreError::Host(2));
    tick(&worker, &store, T0 + TICK);
    assert_eq!(worker.metric("upstream.store_errors"), 1);
    assert_eq!(worker.metric("upstream.untracked"), 0);
    assert_eq!(shared_totals(&worker, &store, T0 + TICK).0, 1);
    tick(&worker, &store, T0 + 2 * TICK);
    assert_eq!(shared_totals(&worker, &store, T0 + 2 * TICK).0, 4);
    for n in 0..5 {
        worker.call(get("/"), T0 + 2 * TICK + n, &store, 200);
    }
    store.fail_next(1, StoreError::Host(2));
    retire(&worker, &store, T0 + 3 * TICK);
    assert_eq!(worker.metric("upstream.untracked"), 5);
    assert_eq!(worker.metric("upstream.tallied_successes"), 3);
}

/// Hardening: a breaker record of any bytes under the right layout (a corrupt write, a foreign
/// build's fields, times far in the future) never stops the breaker for good. Under healthy
/// traffic, one call every 100 ms, every call reaches the upstream once the longest open period
/// and the probe deadline (2 s each here) have passed, and the breaker is closed again.
#[cfg(not(target_family = "wasm"))]
mod corrupt_records {
    use super::*;
    use proptest::prelude::*;
    use seawall::policy::circuit_breaker::{BreakerState, Circuit, RECORD_LEN};
    use seawall::state::SharedStore;

    const KEY: &str = "sw:seawall:cb:payments:route:api";

    /// What the property first found: the route's record held by a foreign owner, open until
    /// 16 days on. It was never free for the route (its open period never ended), so every
    /// request passed untracked and the breaker was off for good. The holder's times are now
    /// brought within the config and clock and written back, and the record comes free.
    #[test]
    fn a_foreign_record_open_until_the_far_future_comes_free() {
        let store = FakeStore::new();
        let mut worker = Worker::new(&breaker_config("2s"), &store);
        assert_eq!(worker.call(get("/"), T0, &store, 200), Seen::Upstream);
        let foreign = BreakerState {
            owner: 1 << 56,
            generation: 0,
            trips: 0,
            circuit: Circuit::Open {
                until: T0 + 16 * 24 * 3_600 * SECOND,
            },
        };
        let mut corrupt = vec![store.raw(KEY).unwrap()[0]];
        corrupt.extend_from_slice(&seawall::state::cas::Record::encode(&foreign));
        store.set(KEY, &corrupt, None).unwrap();
        let mut at = T0;
        while at < T0 + 5 * SECOND {
            at += 100 * MS;
            worker.call(get("/"), at, &store, 200);
        }
        // Tracked again: three failures trip it.
        for _ in 0..3 {
            assert_eq!(worker.call(get("/"), at, &store, 503), Seen::Upstream);
        }
        assert!(matches!(
            worker.start(get("/"), at + MS, &store),
            Err(Seen::Refused { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn any_record_bytes_recover_under_healthy_traffic(
            bytes in proptest::collection::vec(any::<u8>(), RECORD_LEN),
            tail_zeroed in any::<bool>(),
        ) {
            let store = FakeStore::new();
            let mut worker = Worker::new(&breaker_config("2s"), &store);
            prop_assert_eq!(worker.call(get("/"), T0, &store, 200), Seen::Upstream);
            let stored = store.raw(KEY).unwrap();
            prop_assert_eq!(stored.len(), RECORD_LEN + 1);
            let mut corrupt = vec![stored[0]];
            corrupt.extend_from_slice(&bytes);
            if tail_zeroed {
                // Plausible small fields with corrupt times: only the first 32 bytes are random.
                corrupt[33..].fill(0);
            }
            store.set(KEY, &corrupt, None).unwrap();
            let mut passed = Vec::new();
            let mut at = T0 + 100 * MS;
            while at <= T0 + 6 * SECOND {
                passed.push((at, worker.call(get("/"), at, &store, 200) == Seen::Upstream));
                at += 100 * MS;
            }
            let late_refusals: Vec<u64> = passed
                .iter()
                .filter(|(at, through)| *at > T0 + 4_500 * MS && !through)
                .map(|(at, _)| (at - T0) / MS)
                .collect();
            prop_assert!(late_refusals.is_empty(), "refused at {:?} ms", late_refusals);
            let (state, _) = seawall::state::cas::read::<RECORD_LEN, BreakerState, _>(&store, KEY)
                .unwrap()
                .unwrap();
            prop_assert!(matches!(state.circuit, Circuit::Closed { .. }), "{:?}", state.circuit);
        }
    }
}
