//! Fault injection through the whole core: config, engine, shared store, with a fake clock and a
//! seeded generator. Other workers are simulated by interleaving their decisions with this
//! worker's, or by real threads.

// A test crate: a failed unwrap is how it reports a failed expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use seawall::clock::Timestamp;
use seawall::config::compile;
use seawall::engine::{StreamState, Verdict};
use seawall::policy::circuit_breaker::ResponseFacts;
use seawall::request::FakeRequest;
use seawall::state::fake::FakeStore;

const MS: u64 = 1_000_000;
const SECOND: u64 = 1_000 * MS;
/// 2026-11-22T10:00:00Z.
const T0: u64 = 1_795_341_600 * SECOND;

mod common;

use common::{get, Worker};

/// What happened to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    Passed,
    Delayed { by_ms: u64 },
    Aborted { status: u16, grpc: Option<u32> },
}

struct Done;

impl ResponseFacts for Done {
    fn status(&mut self) -> Option<u16> {
        Some(200)
    }
    fn flags(&mut self) -> u64 {
        0
    }
    fn grpc_status(&mut self) -> Option<u32> {
        None
    }
}

/// What this file asks of a worker.
trait Chaos {
    fn start(&mut self, request: FakeRequest, now: u64, store: &FakeStore) -> (Fate, StreamState);
    fn end(&mut self, stream: &StreamState, now: u64, store: &FakeStore);
    fn fate(&mut self, request: FakeRequest, now: u64, store: &FakeStore) -> Fate;
    fn metric(&self, name: &str) -> i64;
}

impl Chaos for Worker {
    /// Sends a request and returns its fate and its stream (still open).
    fn start(&mut self, request: FakeRequest, now: u64, store: &FakeStore) -> (Fate, StreamState) {
        let decision = self.send(request, now, store);
        let fate = match &decision.verdict {
            Verdict::Continue => Fate::Passed,
            Verdict::Pause { until } => Fate::Delayed {
                by_ms: (until.as_nanos() - now) / MS,
            },
            Verdict::Reply(reply) => Fate::Aborted {
                status: reply.status,
                grpc: reply.grpc_status,
            },
        };
        (fate, decision.stream)
    }

    fn end(&mut self, stream: &StreamState, now: u64, store: &FakeStore) {
        self.engine.on_stream_end(
            stream,
            &mut Done,
            Timestamp::from_nanos(now),
            store,
            &self.metrics,
        );
    }

    /// A whole request: its fate, with the stream ended at once.
    fn fate(&mut self, request: FakeRequest, now: u64, store: &FakeStore) -> Fate {
        let (fate, stream) = self.start(request, now, store);
        self.end(&stream, now, store);
        fate
    }

    fn metric(&self, name: &str) -> i64 {
        self.counter(&format!("seawall.fault.{name}"))
    }
}

fn config(fault: &str) -> String {
    format!(
        r#"{{"faults": {{"chaos": {fault}}},
            "routes": [{{"name": "chaos", "match": {{"path": {{"prefix": "/chaos"}}}}, "faults": ["chaos"]}},
                       {{"name": "calm"}}]}}"#
    )
}

#[test]
fn an_abort_percentage_aborts_that_share() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        &config(r#"{"abort": {"status": 503, "percent": 30}}"#),
        &store,
    );
    let aborted = (0..2000)
        .filter(|&n| worker.fate(get("/chaos"), T0 + n, &store) != Fate::Passed)
        .count();
    assert!((540..=660).contains(&aborted), "{aborted} of 2000");
    assert_eq!(worker.metric("chaos.aborts"), aborted as i64);
    assert_eq!(worker.metric("chaos.active"), 0, "every slot came back");
    assert_eq!(worker.fate(get("/calm"), T0, &store), Fate::Passed);
}

#[test]
fn percentages_have_a_precision_of_a_millionth() {
    let compiled = compile(config(r#"{"abort": {"percent": 0.0001}}"#).as_bytes()).unwrap();
    assert_eq!(compiled.faults[0].abort.as_ref().unwrap().ppm, 1);
    let store = FakeStore::new();
    let mut worker = Worker::new(&config(r#"{"abort": {"percent": 0.05}}"#), &store);
    let aborted = (0..200_000)
        .filter(|&n| worker.fate(get("/chaos"), T0 + n, &store) != Fate::Passed)
        .count();
    assert!(
        (60..=140).contains(&aborted),
        "{aborted} in 200,000 at 0.05%"
    );
}

#[test]
fn a_sticky_cohort_keeps_each_users_outcome() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        &config(r#"{"abort": {"percent": 30}, "cohort": {"key": [{"header": "x-user-id"}]}}"#),
        &store,
    );
    let mut aborted_users = 0;
    for user in 0..200 {
        let fates: Vec<Fate> = (0..50)
            .map(|n| {
                worker.fate(
                    get("/chaos").header("x-user-id", format!("user-{user}")),
                    T0 + n,
                    &store,
                )
            })
            .collect();
        assert!(
            fates.iter().all(|f| *f == fates[0]),
            "user-{user}: {fates:?}"
        );
        aborted_users += usize::from(fates[0] != Fate::Passed);
    }
    assert!(
        (40..=80).contains(&aborted_users),
        "{aborted_users} of 200 users"
    );
    // Without the key a request is outside the experiment.
    assert!((0..100).all(|n| worker.fate(get("/chaos"), T0 + n, &store) == Fate::Passed));
}

#[test]
fn a_cohort_percentage_picks_the_users_in_the_experiment() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        &config(
            r#"{"abort": {"percent": 100}, "cohort": {"key": [{"header": "x-user-id"}], "percent": 10}}"#,
        ),
        &store,
    );
    let members = (0..1000)
        .filter(|user| {
            worker.fate(
                get("/chaos").header("x-user-id", format!("{user}")),
                T0,
                &store,
            ) != Fate::Passed
        })
        .count();
    assert!((70..=130).contains(&members), "{members} of 1000");
}

#[test]
fn delays_follow_the_configured_shape_and_an_abort_waits_for_the_delay() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        &config(
            r#"{"delay": {"fixed": "200ms", "percent": 100}, "abort": {"status": 502, "percent": 100}}"#,
        ),
        &store,
    );
    let (fate, stream) = worker.start(get("/chaos"), T0, &store);
    assert_eq!(fate, Fate::Delayed { by_ms: 200 });
    assert_eq!(worker.metric("chaos.active"), 1);
    let Verdict::Reply(reply) = worker.engine.on_resume(&stream, &worker.metrics) else {
        panic!("the abort follows the delay");
    };
    assert_eq!(reply.status, 502);
    assert!(reply
        .headers
        .iter()
        .any(|(n, v)| n == "x-seawall-fault" && v == "abort"));
    worker.end(&stream, T0 + 200 * MS, &store);
    assert_eq!(worker.metric("chaos.active"), 0);
    assert_eq!(
        (worker.metric("chaos.delays"), worker.metric("chaos.aborts")),
        (1, 1)
    );

    let mut delays = BTreeMap::new();
    let store = FakeStore::new();
    let mut worker = Worker::new(
        &config(r#"{"delay": {"uniform": {"min": "10ms", "max": "20ms"}, "percent": 100}}"#),
        &store,
    );
    for n in 0..1000 {
        let Fate::Delayed { by_ms } = worker.fate(get("/chaos"), T0 + n, &store) else {
            panic!("every request is delayed");
        };
        *delays.entry(by_ms).or_insert(0) += 1;
    }
    assert_eq!(delays.keys().next(), Some(&10));
    assert_eq!(delays.keys().last(), Some(&19));
    assert!(delays.values().all(|&count| count > 50), "{delays:?}");
}

#[test]
fn max_active_caps_faults_exactly_and_slots_come_back_when_streams_end() {
    let store = FakeStore::new();
    let json = config(r#"{"delay": {"fixed": "1s", "percent": 100}, "max_active": 10}"#);
    let mut worker = Worker::new(&json, &store);
    let mut held = Vec::new();
    for n in 0..25 {
        let (fate, stream) = worker.start(get("/chaos"), T0 + n, &store);
        if fate != Fate::Passed {
            held.push(stream);
        } else {
            worker.end(&stream, T0 + n, &store);
        }
    }
    assert_eq!(held.len(), 10);
    assert_eq!(worker.metric("chaos.overflow"), 15);
    assert_eq!(worker.metric("chaos.active"), 10);
    // A client gives up during its delay: the stream ends, and its slot is free again.
    let gone = held.pop().unwrap();
    worker.end(&gone, T0 + 100 * MS, &store);
    assert_ne!(
        worker.fate(get("/chaos"), T0 + 200 * MS, &store),
        Fate::Passed
    );
    for stream in &held {
        worker.end(stream, T0 + SECOND, &store);
    }
    assert_eq!(worker.metric("chaos.active"), 0);
}

/// Another worker takes a slot between this worker's read and its write, every time: the cap
/// still holds across both.
#[test]
fn interleaved_workers_never_exceed_max_active() {
    let store = FakeStore::new();
    let json = config(r#"{"delay": {"fixed": "1s", "percent": 100}, "max_active": 5}"#);
    let mut worker = Worker::new(&json, &store);
    let mut other = Worker::new(&json, &store);
    let elsewhere = Arc::new(Mutex::new(0));
    let counter = Arc::clone(&elsewhere);
    let mut turns = 0;
    store.interfere(move |store| {
        turns += 1;
        if turns <= 8 && other.start(get("/chaos"), T0, store).0 != Fate::Passed {
            *counter.lock().unwrap() += 1;
        }
    });
    let here = (0..8)
        .filter(|&n| worker.start(get("/chaos"), T0 + n, &store).0 != Fate::Passed)
        .count();
    store.stop_interfering();
    let elsewhere = *elsewhere.lock().unwrap();
    assert_eq!(here + elsewhere, 5, "here {here}, elsewhere {elsewhere}");
    assert!(store.counts().cas_mismatches > 0, "the workers did race");
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
fn threads_never_exceed_max_active() {
    let store = Arc::new(FakeStore::new());
    let json = config(r#"{"abort": {"percent": 100}, "max_active": 7}"#);
    Worker::new(&json, &store);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let store = Arc::clone(&store);
            let json = json.clone();
            std::thread::spawn(move || {
                let mut worker = Worker::new(&json, &store);
                (0..300)
                    .filter(|&n| worker.start(get("/chaos"), T0 + n, &store).0 != Fate::Passed)
                    .count()
            })
        })
        .collect();
    let injected: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(injected, 7, "no stream ended, so no slot came back");
}

#[test]
fn an_experiment_outside_its_time_box_or_switched_off_injects_nothing() {
    let store = FakeStore::new();
    let boxed = config(
        r#"{"abort": {"percent": 100},
            "active_between": {"start": "2026-11-22T10:00:00Z", "end": "2026-11-22T11:00:00Z"}}"#,
    );
    let mut worker = Worker::new(&boxed, &store);
    assert_eq!(worker.fate(get("/chaos"), T0 - 1, &store), Fate::Passed);
    assert_ne!(worker.fate(get("/chaos"), T0, &store), Fate::Passed);
    assert_ne!(
        worker.fate(get("/chaos"), T0 + 3600 * SECOND - 1, &store),
        Fate::Passed
    );
    assert_eq!(
        worker.fate(get("/chaos"), T0 + 3600 * SECOND, &store),
        Fate::Passed
    );
    assert_eq!(worker.metric("chaos.inactive"), 2);

    let mut off = Worker::new(
        &config(
            r#"{"enabled": false, "abort": {"percent": 100}, "delay": {"fixed": "1s", "percent": 100}}"#,
        ),
        &store,
    );
    assert!((0..100).all(|n| off.fate(get("/chaos"), T0 + n, &store) == Fate::Passed));
    assert_eq!(off.metric("chaos.aborts"), 0);
}

#[test]
fn faults_can_target_requests_by_header() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        &config(
            r#"{"abort": {"percent": 100}, "when": {"headers": [{"name": "x-chaos", "exact": "yes"}]}}"#,
        ),
        &store,
    );
    assert_eq!(worker.fate(get("/chaos"), T0, &store), Fate::Passed);
    assert_ne!(
        worker.fate(get("/chaos").header("x-chaos", "yes"), T0, &store),
        Fate::Passed
    );
}

const CONTROLLED: &str = r#"{"header_control": {"secret_header": "x-chaos-key", "secret": "s3cret-key-of-16b", "max_percent": 50}}"#;

#[test]
fn header_control_needs_the_secret_and_is_capped() {
    let store = FakeStore::new();
    let mut worker = Worker::new(&config(CONTROLLED), &store);
    let asking = |secret: &str| {
        get("/chaos")
            .header("x-seawall-fault-abort", "418")
            .header("x-seawall-fault-percent", "100")
            .header("x-chaos-key", secret)
    };
    // Without the right secret: ignored, counted, and the headers are still removed.
    for secret in [
        "",
        "wrong",
        "s3cret-key",
        "s3cret-key-of-16c",
        "s3cret-key-of-16b-longer",
    ] {
        let decision = worker.send(asking(secret), T0, &store);
        assert_eq!(decision.verdict, Verdict::Continue, "secret {secret:?}");
        assert_eq!(
            decision.strip_headers.names().collect::<Vec<_>>(),
            [
                "x-seawall-fault-abort",
                "x-seawall-fault-percent",
                "x-chaos-key"
            ],
            "the controls sent are removed"
        );
    }
    assert_eq!(worker.metric("chaos.header_control_rejected"), 5);
    // With it: applied, but at most max_percent of the time.
    let aborted = (0..2000)
        .filter(|&n| {
            worker.fate(asking("s3cret-key-of-16b"), T0 + n, &store)
                == Fate::Aborted {
                    status: 418,
                    grpc: None,
                }
        })
        .count();
    assert!(
        (900..=1100).contains(&aborted),
        "{aborted} of 2000 at a 50% cap"
    );
    assert_eq!(worker.metric("chaos.header_control_applied"), 2000);
    let delayed = worker.fate(
        get("/chaos")
            .header("x-seawall-fault-delay", "250")
            .header("x-seawall-fault-percent", "0.0001")
            .header("x-chaos-key", "s3cret-key-of-16b"),
        T0,
        &store,
    );
    assert_eq!(delayed, Fate::Passed, "1 ppm almost never fires");
    // A request without any control header reads them, finds none and strips nothing.
    let plain = worker.send(get("/chaos"), T0, &store);
    assert!(plain.strip_headers.is_empty());
}

#[test]
fn grpc_requests_get_a_grpc_status() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        &config(r#"{"abort": {"percent": 100, "grpc_status": "resource-exhausted"}}"#),
        &store,
    );
    assert_eq!(
        worker.fate(
            get("/chaos/pkg.Svc/Call").header("content-type", "application/grpc"),
            T0,
            &store
        ),
        Fate::Aborted {
            status: 503,
            grpc: Some(8)
        }
    );
}

#[test]
fn a_response_fault_replaces_the_upstreams_answer() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        &config(r#"{"response": {"status": 500, "body": "injected\n", "percent": 100}}"#),
        &store,
    );
    let (fate, mut stream) = worker.start(get("/chaos"), T0, &store);
    assert_eq!(fate, Fate::Passed, "the request reaches the upstream");
    let decision =
        worker
            .engine
            .on_response(&mut stream, Timestamp::from_nanos(T0 + MS), &worker.metrics);
    let fault = decision.fault.unwrap();
    assert_eq!(fault.status, 500);
    assert_eq!(fault.body, Some(&b"injected\n"[..]));
    assert_eq!(
        worker.engine.response_fault_body(&stream),
        Some(&b"injected\n"[..])
    );
    assert_eq!(worker.metric("chaos.response_faults"), 1);
}

#[test]
fn an_abort_is_never_replaced_by_a_response_fault() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        &config(
            r#"{"abort": {"status": 503, "percent": 100}, "response": {"status": 500, "percent": 100}}"#,
        ),
        &store,
    );
    let (fate, mut stream) = worker.start(get("/chaos"), T0, &store);
    assert_eq!(
        fate,
        Fate::Aborted {
            status: 503,
            grpc: None
        }
    );
    // Envoy passes seawall's own abort through the response callbacks too.
    let decision =
        worker
            .engine
            .on_response(&mut stream, Timestamp::from_nanos(T0), &worker.metrics);
    assert_eq!(decision.fault, None);
}

#[test]
fn fault_config_errors_name_their_paths() {
    let errors = |json: &str| match compile(json.as_bytes()) {
        Ok(_) => panic!("expected {json} to be refused"),
        Err(errors) => errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
    };
    assert_eq!(
        errors(
            r#"{"faults": {
                "a": {},
                "b": {"delay": {"fixed": "1s", "uniform": {"min": "1s", "max": "2s"}, "percent": 5}},
                "c": {"delay": {"exponential": {"mean": "1s", "max": "2m"}, "percent": 5}, "max_active": 0},
                "d": {"abort": {"percent": 5, "status": 42}, "active_between": {"start": "tomorrow", "end": "2026-01-01T00:00:00Z"}},
                "e": {"header_control": {"secret_header": "x key", "secret": "short"}},
                "f": {"header_control": {"secret_header": "x-key", "secret": "short"}, "cohort": {"key": []}},
                "g": {"abort": {"percent": 101}}
            }}"#
        ),
        [
            r#"faults.a: expected at least one of "abort", "delay", "response" or "header_control""#,
            r#"faults.b.delay: expected exactly one of "fixed" (with an optional "jitter"), "uniform" or "exponential""#,
            "faults.c.delay: expected delays of at most 60s, got up to 120s",
            r#"faults.c.max_active: expected at least 1, got 0 (use "enabled": false to stop the experiment)"#,
            "faults.d.abort.status: expected an HTTP status from 200 to 599, got 42",
            r#"faults.d.active_between.start: expected an RFC 3339 time like "2026-11-22T10:00:00Z", got "tomorrow""#,
            r#"faults.e.header_control.secret_header: expected an HTTP header name, got "x key""#,
            "faults.f.cohort.key: expected at least one key part: the key decides who is in the experiment",
            "faults.f.header_control.secret: expected a secret of at least 16 bytes, got 5 bytes",
            "faults.g.abort.percent: expected a percentage from 0 to 100, got 101",
        ]
    );
}

/// Issue 14, point 10: the controls were removed only inside header control, after the enabled,
/// time-box and `when` checks, and with two policies on a route only the last one's list
/// survived. So a policy that was off, expired or not matching forwarded the secret upstream.
#[test]
fn fault_control_headers_and_secrets_never_go_upstream_whatever_the_policy_state() {
    const CONFIG: &str = r#"{
        "faults": {
            "off": {"enabled": false, "abort": {"percent": 100},
                    "header_control": {"secret_header": "x-off-key", "secret": "off-secret-of-16-bytes"}},
            "expired": {"abort": {"percent": 100},
                        "active_between": {"start": "2020-01-01T00:00:00Z", "end": "2020-01-02T00:00:00Z"},
                        "header_control": {"secret_header": "x-expired-key", "secret": "expired-secret-of-16b"}},
            "picky": {"abort": {"percent": 100}, "when": {"headers": [{"name": "x-chaos", "exact": "yes"}]},
                      "header_control": {"secret_header": "x-picky-key", "secret": "picky-secret-of-16b"}}
        },
        "routes": [
            {"name": "two", "match": {"path": {"prefix": "/two"}}, "faults": ["off", "picky"]},
            {"name": "expired", "match": {"path": {"prefix": "/expired"}}, "faults": ["expired"]},
            {"name": "plain", "match": {"path": {"prefix": "/plain"}}}
        ]
    }"#;
    let store = FakeStore::new();
    let mut worker = Worker::new(CONFIG, &store);
    for path in ["/two", "/expired", "/plain", "/unmatched"] {
        let request = get(path)
            .header("x-seawall-fault-abort", "503")
            .header("x-seawall-fault-delay", "100")
            .header("x-seawall-fault-percent", "100")
            .header("x-off-key", "off-secret-of-16-bytes")
            .header("x-expired-key", "expired-secret-of-16b")
            .header("x-picky-key", "picky-secret-of-16b");
        let decision = worker.send(request, T0, &store);
        assert_eq!(
            decision.verdict,
            Verdict::Continue,
            "{path}: nothing applies"
        );
        let mut stripped: Vec<&str> = decision.strip_headers.names().collect();
        stripped.sort_unstable();
        assert_eq!(
            stripped,
            [
                "x-expired-key",
                "x-off-key",
                "x-picky-key",
                "x-seawall-fault-abort",
                "x-seawall-fault-delay",
                "x-seawall-fault-percent"
            ],
            "{path}"
        );
    }
    let plain = worker.send(get("/two"), T0, &store);
    assert!(plain.strip_headers.is_empty());
}

/// Issue 14, point 12: a malformed or over-100 `x-seawall-fault-percent` meant 100%, capped only
/// by `max_percent`: "5%" and "150" each aborted 200 of 200 requests.
#[test]
fn a_malformed_or_over_100_fault_percent_asks_for_nothing() {
    let store = FakeStore::new();
    let mut worker = Worker::new(&config(CONTROLLED), &store);
    for percent in ["5%", "150", "-1", "1e2", "", "100.00001"] {
        let aborted = (0..200)
            .filter(|&n| {
                let request = get("/chaos")
                    .header("x-seawall-fault-abort", "503")
                    .header("x-seawall-fault-percent", percent)
                    .header("x-chaos-key", "s3cret-key-of-16b");
                worker.fate(request, T0 + n, &store) != Fate::Passed
            })
            .count();
        assert_eq!(aborted, 0, "percent {percent:?}");
    }
    assert_eq!(worker.metric("chaos.header_control_rejected"), 6 * 200);
    assert_eq!(worker.metric("chaos.header_control_applied"), 0);
    // Absent, the percent is 100, capped at max_percent (50).
    let aborted = (0..2000)
        .filter(|&n| {
            let request = get("/chaos")
                .header("x-seawall-fault-abort", "503")
                .header("x-chaos-key", "s3cret-key-of-16b");
            worker.fate(request, T0 + n, &store) != Fate::Passed
        })
        .count();
    assert!(
        (900..=1100).contains(&aborted),
        "{aborted} of 2000 at a 50% cap"
    );
}

/// Issue 14, point 14: when the worker's pause queue was full, a skipped delay also dropped the
/// abort that was to follow it. The README says a skipped delay is skipped, not the fault.
#[test]
fn a_delay_that_cannot_be_queued_still_sends_its_abort() {
    let store = FakeStore::new();
    let mut worker = Worker::new(
        &config(
            r#"{"abort": {"status": 503, "percent": 100}, "delay": {"fixed": "1s", "percent": 100}}"#,
        ),
        &store,
    );
    let decision = worker.send(get("/chaos"), T0, &store);
    assert!(matches!(decision.verdict, Verdict::Pause { .. }));
    let stream = decision.stream;
    let metrics = &worker.metrics;
    match worker.engine.delay_not_queued(&stream, metrics) {
        Verdict::Reply(reply) => assert_eq!(reply.status, 503),
        other => panic!("the abort is sent at once: {other:?}"),
    }
    assert_eq!(worker.metric("chaos.overflow"), 1);
}

/// A header-control secret is at least 16 bytes, and it never shows: config errors name only its
/// length, and the compiled config's `Debug` redacts it.
#[test]
fn a_header_control_secret_is_at_least_16_bytes_and_never_shows() {
    const SHORT: &str = "fifteen-bytes!!";
    const LONG: &str = "sixteen-bytes!!!";
    let config = |secret: &str| {
        format!(
            r#"{{"faults": {{"chaos": {{"header_control": {{"secret_header": "x-key", "secret": "{secret}"}}}}}},
                "routes": [{{"name": "all", "faults": ["chaos"]}}]}}"#
        )
    };
    let refused = compile(config(SHORT).as_bytes()).unwrap_err().to_string();
    assert!(
        refused.contains(
            "faults.chaos.header_control.secret: expected a secret of at least 16 bytes, got 15 bytes"
        ),
        "{refused}"
    );
    assert!(
        !refused.contains(SHORT),
        "the error shows the secret: {refused}"
    );
    let accepted = compile(config(LONG).as_bytes()).unwrap();
    let shown = format!("{accepted:?}");
    assert!(shown.contains("Secret(<16 bytes, redacted>)"), "{shown}");
    assert!(!shown.contains(LONG), "Debug shows the secret");
}
