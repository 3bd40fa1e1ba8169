//! Proof of DESIGN.md §4 rule 2: the core's request path allocates nothing of its own.
//!
//! A counting global allocator wraps the system one. The fake request source allocates exactly
//! one buffer per attribute it returns (as Envoy's host copies do in the plugin), so any
//! allocation beyond that count is seawall's own.

// A test crate: a failed unwrap is how it reports a failed expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use seawall::clock::Timestamp;
use seawall::config::compile;
use seawall::engine::{Engine, LocalReply, Verdict};
use seawall::metrics::FakeMetrics;
use seawall::policy::circuit_breaker::ResponseFacts;
use seawall::request::{Attribute, AttributeSource, RequestView, Scratch};
use seawall::state::fake::FakeStore;
use seawall::wire::ReplyBuffer;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|count| count.set(count.get() + 1));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|count| count.set(count.get() + 1));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// One worker's engine for `json`, its metrics and scratch, and the store it prepared its state
/// in, as `on_configure` leaves them.
struct Prepared {
    engine: Engine,
    metrics: FakeMetrics,
    scratch: Scratch,
    store: FakeStore,
}

fn prepared(json: &str) -> Prepared {
    let mut metrics = FakeMetrics::new();
    let engine = Engine::new(compile(json.as_bytes()).unwrap(), &mut metrics).unwrap();
    let scratch = Scratch::for_plan(&engine.config().attributes);
    let store = FakeStore::new();
    engine.prepare_state(&store, 0x5ea_5ec2e7).unwrap();
    Prepared {
        engine,
        metrics,
        scratch,
        store,
    }
}

/// One request through the engine, as the host's request callback runs it.
fn decide<'e>(
    engine: &'e Engine,
    source: &mut impl AttributeSource,
    scratch: &mut Scratch,
    now: Timestamp,
    store: &FakeStore,
    metrics: &FakeMetrics,
) -> seawall::engine::RequestDecision<'e> {
    let mut view = RequestView::new(&engine.config().attributes, source, scratch);
    engine.on_request(&mut view, now, store, metrics)
}

/// Returns preset values, counting the buffers it hands out like the host does.
struct Host {
    values: Vec<(Attribute, Vec<u8>)>,
    handed_out: u64,
}

impl AttributeSource for Host {
    fn read(&mut self, attribute: &Attribute) -> Option<Vec<u8>> {
        let value = self.values.iter().find(|(a, _)| a == attribute)?;
        self.handed_out += 1;
        Some(value.1.clone())
    }

    /// The host removes in place: no buffer crosses, so nothing is counted.
    fn remove_header(&mut self, name: &str) {
        self.values
            .retain(|(attribute, _)| !matches!(attribute, Attribute::Header(h) if h == name));
    }
}

const CONFIG: &str = r#"{
    "debug": {"route_header": true},
    "rate_limits": {
        "global": {"rate": "1000/s", "burst": 1000},
        "per-user": {"rate": "1/h", "burst": 1, "key": [{"header": "x-user"}, "client_ip"], "max_keys": 64,
                     "on_limit": {"body": "slow down\n", "headers": {"x-why": "quota"}}}
    },
    "routes": [
        {"name": "checkout", "match": {"path": {"prefix": "/api/checkout"}, "methods": ["POST"],
                                       "headers": [{"name": "x-tier", "exact": "free"}]}},
        {"name": "limited", "match": {"path": {"prefix": "/limited"}}, "rate_limits": ["global", "per-user"]},
        {"name": "by-cluster", "match": {"cluster": "payments", "authority": "shop.example.com"}},
        {"name": "catch-all"}
    ]
}"#;

#[test]
fn matching_and_deciding_allocate_only_the_host_buffers() {
    let Prepared {
        engine,
        metrics,
        mut scratch,
        store,
    } = prepared(CONFIG);
    let limited = |user: &[u8]| {
        vec![
            (Attribute::path(), b"/limited/x".to_vec()),
            (Attribute::header("x-user"), user.to_vec()),
            (Attribute::client_address(), b"10.1.2.3:4567".to_vec()),
        ]
    };
    let requests = [
        (
            vec![
                (Attribute::path(), b"/api/checkout".to_vec()),
                (Attribute::method(), b"POST".to_vec()),
                (Attribute::header("x-tier"), b"free".to_vec()),
            ],
            true,
        ),
        (
            vec![
                (Attribute::path(), b"/other".to_vec()),
                (Attribute::method(), b"GET".to_vec()),
                (Attribute::authority(), b"shop.example.com".to_vec()),
                (Attribute::cluster_name(), b"payments".to_vec()),
            ],
            true,
        ),
        (
            vec![(Attribute::header("x-tier"), vec![0xff; 64 * 1024])],
            true,
        ),
        (vec![], true),
        // Admitted by both limits, then refused by per-user (with a refund of global), then a
        // request without the key header lands in the shared bucket.
        (limited(b"alice"), true),
        (limited(b"alice"), false),
        (vec![(Attribute::path(), b"/limited".to_vec())], true),
    ];
    for (round, (values, admitted)) in requests.into_iter().enumerate() {
        let mut host = Host {
            values,
            handed_out: 0,
        };
        let before = allocations();
        let decision = decide(
            &engine,
            &mut host,
            &mut scratch,
            Timestamp::from_nanos(1_800_000_000_000_000_000),
            &store,
            &metrics,
        );
        let mut stream = decision.stream;
        let response = engine.on_response(
            &mut stream,
            Timestamp::from_nanos(1_800_000_000_000_000_000),
            &metrics,
        );
        let spent = allocations() - before;
        assert_eq!(
            spent, host.handed_out,
            "request {round}: {spent} allocations, {} from the host",
            host.handed_out
        );
        assert_eq!(
            matches!(decision.verdict, Verdict::Continue),
            admitted,
            "request {round}"
        );
        assert!(response.route_header.is_some());
    }
    assert_eq!(
        metrics.value("seawall.rate_limit.per-user.limited"),
        Some(1)
    );
}

/// A finished stream's facts. Like the host, each read hands out one 8-byte buffer.
struct Finished {
    status: Option<u16>,
    flags: u64,
    reads: u64,
}

impl Finished {
    fn host_read(&mut self) {
        self.reads += 1;
        std::hint::black_box(vec![0u8; 8]);
    }
}

impl ResponseFacts for Finished {
    fn status(&mut self) -> Option<u16> {
        self.host_read();
        self.status
    }
    fn flags(&mut self) -> u64 {
        self.host_read();
        self.flags
    }
    fn grpc_status(&mut self) -> Option<u32> {
        self.host_read();
        Some(0)
    }
}

const BREAKER_CONFIG: &str = r#"{
    "circuit_breakers": {
        "by-cluster": {"open_when": {"consecutive_failures": 2}, "open_for": "1s", "max_keys": 16},
        "by-route": {"key": "route", "failure": {"slow_call": "100ms"},
                     "open_when": {"failure_rate": 50, "slow_call_rate": 50, "min_requests": 2},
                     "on_open": {"body": "try later\n", "headers": {"x-why": "breaker"}}}
    },
    "routes": [
        {"name": "clustered", "match": {"path": {"prefix": "/c"}}, "circuit_breaker": "by-cluster"},
        {"name": "routed", "circuit_breaker": "by-route"}
    ]
}"#;

#[test]
fn breaker_admissions_rejections_probes_and_outcomes_allocate_only_the_host_buffers() {
    const SECOND: u64 = 1_000_000_000;
    let Prepared {
        engine,
        metrics,
        mut scratch,
        store,
    } = prepared(BREAKER_CONFIG);
    let start = 1_800_000_000 * SECOND;
    // (path, time offset, response status, admitted): two failures open the clustered breaker,
    // the next request is refused, a second later a probe goes through and closes it; the routed
    // breaker sees a slow call and a failure and opens on its rates.
    let steps: [(&[u8], u64, u16, bool); 8] = [
        (b"/c/1", 0, 503, true),
        (b"/c/2", 1, 500, true),
        (b"/c/3", 2, 200, false),
        (b"/c/4", SECOND + 2, 200, true),
        (b"/c/5", SECOND + 3, 200, true),
        (b"/r/1", 0, 200, true),
        (b"/r/2", 1, 502, true),
        (b"/r/3", 2, 200, false),
    ];
    for (round, (path, offset, status, admitted)) in steps.into_iter().enumerate() {
        let mut host = Host {
            values: vec![
                (Attribute::path(), path.to_vec()),
                (Attribute::cluster_name(), b"payments".to_vec()),
            ],
            handed_out: 0,
        };
        let now = Timestamp::from_nanos(start + offset);
        let mut facts = Finished {
            status: Some(status),
            flags: 0,
            reads: 0,
        };
        let before = allocations();
        let decision = decide(&engine, &mut host, &mut scratch, now, &store, &metrics);
        let mut stream = decision.stream;
        if matches!(decision.verdict, Verdict::Continue) {
            // The routed call that must be slow answers 200 ms late.
            let answered = if round == 5 { 200_000_000 } else { 1 };
            engine.on_response(
                &mut stream,
                Timestamp::from_nanos(now.as_nanos() + answered),
                &metrics,
            );
            engine.on_stream_end(&stream, &mut facts, now, &store, &metrics);
        }
        let spent = allocations() - before;
        assert_eq!(
            spent,
            host.handed_out + facts.reads,
            "step {round}: {spent} allocations, {} host buffers",
            host.handed_out + facts.reads
        );
        assert_eq!(
            matches!(decision.verdict, Verdict::Continue),
            admitted,
            "step {round}"
        );
    }
    assert_eq!(
        metrics.value("seawall.circuit_breaker.by-cluster.opened"),
        Some(1)
    );
    assert_eq!(
        metrics.value("seawall.circuit_breaker.by-cluster.closed"),
        Some(1)
    );
    assert_eq!(
        metrics.value("seawall.circuit_breaker.by-route.opened"),
        Some(1)
    );
    assert_eq!(
        metrics.value("seawall.circuit_breaker.by-route.rejected"),
        Some(1)
    );
}

/// The worker's tallies of closed-state successes: counting one, writing a tally with the next
/// outcome (a new bucket, a failure) and writing them on the tick or when retiring take no
/// allocation; the table of tallies is sized when the engine is built.
#[test]
fn tallied_successes_and_their_writes_allocate_only_the_host_buffers() {
    const SECOND: u64 = 1_000_000_000;
    let Prepared {
        engine,
        metrics,
        mut scratch,
        store,
    } = prepared(BREAKER_CONFIG);
    let start = 1_800_000_000 * SECOND;
    // (path, time offset, status): successes on both breakers (the first on each idle record is
    // written at once, the rest tallied), a success in the next bucket, the tick, a failure.
    let steps: [(&[u8], u64, u16); 9] = [
        (b"/c/1", 0, 200),
        (b"/c/2", 1, 200),
        (b"/c/3", 2, 200),
        (b"/r/1", 3, 200),
        (b"/r/2", 4, 200),
        (b"/r/3", 5, 200),
        (b"/r/4", SECOND, 200),
        (b"/c/4", SECOND + 2, 200),
        (b"/c/5", SECOND + 3, 503),
    ];
    for (round, (path, offset, status)) in steps.into_iter().enumerate() {
        let now = Timestamp::from_nanos(start + offset);
        if round == 7 {
            let before = allocations();
            engine.on_worker_tick(now, &store, &metrics, false);
            assert_eq!(allocations() - before, 0, "the tick");
        }
        let mut host = Host {
            values: vec![
                (Attribute::path(), path.to_vec()),
                (Attribute::cluster_name(), b"payments".to_vec()),
            ],
            handed_out: 0,
        };
        let mut facts = Finished {
            status: Some(status),
            flags: 0,
            reads: 0,
        };
        let before = allocations();
        let decision = decide(&engine, &mut host, &mut scratch, now, &store, &metrics);
        let mut stream = decision.stream;
        assert!(
            matches!(decision.verdict, Verdict::Continue),
            "step {round}"
        );
        engine.on_response(&mut stream, now, &metrics);
        engine.on_stream_end(&stream, &mut facts, now, &store, &metrics);
        let spent = allocations() - before;
        assert_eq!(
            spent,
            host.handed_out + facts.reads,
            "step {round}: {spent} allocations, {} host buffers",
            host.handed_out + facts.reads
        );
    }
    let before = allocations();
    engine.on_worker_tick(
        Timestamp::from_nanos(start + 3 * SECOND),
        &store,
        &metrics,
        true,
    );
    assert_eq!(allocations() - before, 0, "retiring");
    let tallied =
        |name: &str| metrics.value(&format!("seawall.circuit_breaker.{name}.tallied_successes"));
    // by-cluster: 2 on the tick, 1 with the failure; by-route: 2 with /r/4, a success of the next
    // bucket (/r/1 found the record idle); nothing was left for retiring.
    assert_eq!(
        (tallied("by-cluster"), tallied("by-route")),
        (Some(3), Some(2))
    );
}

#[test]
fn local_replies_reuse_their_buffer() {
    let headers = vec![("x-seawall".to_owned(), "rate-limited".to_owned())];
    let reply = LocalReply {
        degraded: None,
        status: 429,
        body: b"slow down\n",
        headers: &headers,
        retry_after: Some(std::time::Duration::from_millis(1200)),
        grpc_status: None,
        rate_limit: None,
    };
    let mut buffer = ReplyBuffer::default();
    let fresh = allocations();
    let first = buffer.serialize(&reply).len();
    assert!(
        allocations() > fresh,
        "the counter must see the first, growing serialization"
    );
    let before = allocations();
    for _ in 0..100 {
        assert_eq!(buffer.serialize(&reply).len(), first);
    }
    assert_eq!(allocations() - before, 0);
}

const FAULT_CONFIG: &str = r#"{
    "faults": {
        "chaos": {"abort": {"percent": 50, "body": "chaos\n"}, "delay": {"exponential": {"mean": "10ms", "max": "50ms"}, "percent": 50},
                  "response": {"status": 500, "body": "late\n", "percent": 50},
                  "cohort": {"key": [{"header": "x-user"}]}, "max_active": 1000,
                  "header_control": {"secret_header": "x-key", "secret": "0123456789abcdef", "max_percent": 100}}
    },
    "routes": [{"name": "chaos", "faults": ["chaos"]}]
}"#;

#[test]
fn fault_injection_allocates_only_the_host_buffers() {
    let Prepared {
        engine,
        metrics,
        mut scratch,
        store,
    } = prepared(FAULT_CONFIG);
    let now = Timestamp::from_nanos(1_800_000_000_000_000_000);
    let mut verdicts = std::collections::BTreeSet::new();
    for user in 0..64u8 {
        let mut values = vec![(Attribute::header("x-user"), vec![b'u', user])];
        if user % 4 == 0 {
            values.push((Attribute::header("x-seawall-fault-abort"), b"418".to_vec()));
            values.push((Attribute::header("x-key"), b"0123456789abcdef".to_vec()));
        }
        let mut host = Host {
            values,
            handed_out: 0,
        };
        let before = allocations();
        let decision = decide(&engine, &mut host, &mut scratch, now, &store, &metrics);
        let mut stream = decision.stream;
        let taken = match decision.verdict {
            Verdict::Continue => "continue",
            Verdict::Pause { .. } => "pause",
            Verdict::Reply(_) => "reply",
        };
        if matches!(decision.verdict, Verdict::Pause { .. }) {
            let _ = engine.on_resume(&stream, &metrics);
        }
        let response = engine.on_response(&mut stream, now, &metrics);
        let _ = engine.response_fault_body(&stream);
        let mut facts = Finished {
            status: Some(200),
            flags: 0,
            reads: 0,
        };
        engine.on_stream_end(&stream, &mut facts, now, &store, &metrics);
        let spent = allocations() - before;
        assert_eq!(
            spent,
            host.handed_out + facts.reads,
            "user {user}: {spent} allocations, {} host buffers",
            host.handed_out + facts.reads
        );
        let _ = response;
        verdicts.insert(taken);
    }
    assert_eq!(
        verdicts.into_iter().collect::<Vec<_>>(),
        ["continue", "pause", "reply"],
        "every path was taken"
    );
    assert!(
        metrics
            .value("seawall.fault.chaos.response_faults")
            .unwrap()
            > 0
    );
    assert!(
        metrics
            .value("seawall.fault.chaos.header_control_applied")
            .unwrap()
            > 0
    );
}

/// Response headers as the host hands them out: one buffer per header found.
struct Answer {
    status: &'static [u8],
    attempts: &'static [u8],
    retry_after: Option<&'static [u8]>,
    reads: u64,
}

impl Answer {
    /// A 503 after two attempts, pushing back for a second.
    fn failed() -> Self {
        Answer {
            status: b"503",
            attempts: b"2",
            retry_after: Some(b"1"),
            reads: 0,
        }
    }

    /// A healthy response: one attempt, nothing retried, no push-back.
    fn healthy() -> Self {
        Answer {
            status: b"200",
            attempts: b"1",
            retry_after: None,
            reads: 0,
        }
    }
}

impl seawall::policy::retry::ResponseHeaders for Answer {
    fn header(&mut self, name: &str) -> Option<std::borrow::Cow<'_, [u8]>> {
        let value: &[u8] = match name {
            ":status" => self.status,
            "x-envoy-attempt-count" => self.attempts,
            "retry-after" => self.retry_after?,
            _ => return None,
        };
        self.reads += 1;
        Some(std::borrow::Cow::Owned(value.to_vec()))
    }
}

#[test]
fn retry_grants_and_settlements_allocate_only_the_host_buffers() {
    let json = r#"{"retries": {"api": {"max_retries": 2, "idempotency_header": "idempotency-key"}},
                   "routes": [{"name": "api", "retry": "api"}]}"#;
    let Prepared {
        engine,
        metrics,
        mut scratch,
        store,
    } = prepared(json);
    let now = Timestamp::from_nanos(1_800_000_000_000_000_000);
    for round in 0..50u64 {
        let mut host = Host {
            values: vec![
                (Attribute::method(), b"GET".to_vec()),
                (Attribute::header("x-envoy-max-retries"), b"10".to_vec()),
                (
                    Attribute::header("x-envoy-retry-grpc-on"),
                    b"cancelled".to_vec(),
                ),
            ],
            handed_out: 0,
        };
        let mut headers = Answer::failed();
        let before = allocations();
        let decision = decide(&engine, &mut host, &mut scratch, now, &store, &metrics);
        let granted = decision.retry.map(|r| r.max_retries);
        engine.settle_retries(&decision.stream, &mut headers, now, &store, &metrics);
        let spent = allocations() - before;
        assert_eq!(
            spent,
            host.handed_out + headers.reads,
            "round {round}: {spent} allocations, {} host buffers",
            host.handed_out + headers.reads
        );
        assert!(granted.is_some());
    }
    assert!(metrics.value("seawall.retry.api.used").unwrap() > 0);
    assert!(metrics.value("seawall.retry.api.pushed_back").unwrap() > 0);
}

/// The worker-local path: grants from a leased allowance, unused grants back to it, deposits
/// tallied, and the tick that settles them; none of it allocates.
#[test]
fn retry_grants_from_the_allowance_and_the_tick_allocate_only_the_host_buffers() {
    let json = r#"{"retries": {"api": {"max_retries": 2}},
                   "routes": [{"name": "api", "retry": "api"}]}"#;
    let Prepared {
        engine,
        metrics,
        mut scratch,
        store,
    } = prepared(json);
    let start = 1_800_000_000_000_000_000u64;
    for round in 0..300u64 {
        let now = Timestamp::from_nanos(start + round * 10_000_000);
        let before = allocations();
        if round % 10 == 0 {
            engine.on_worker_tick(now, &store, &metrics, round == 290);
            assert_eq!(allocations() - before, 0, "tick at round {round}");
        }
        let method: &[u8] = if round % 7 == 0 { b"POST" } else { b"GET" };
        let mut host = Host {
            values: vec![(Attribute::method(), method.to_vec())],
            handed_out: 0,
        };
        let mut headers = Answer::healthy();
        let before = allocations();
        let decision = decide(&engine, &mut host, &mut scratch, now, &store, &metrics);
        let granted = decision.retry.map(|r| r.max_retries);
        if decision.stream.retry.is_some() {
            engine.settle_retries(&decision.stream, &mut headers, now, &store, &metrics);
        }
        let spent = allocations() - before;
        assert_eq!(
            spent,
            host.handed_out + headers.reads,
            "round {round}: {spent} allocations, {} host buffers",
            host.handed_out + headers.reads
        );
        assert_eq!(granted, Some(if round % 7 == 0 { 0 } else { 2 }));
    }
    assert!(metrics.value("seawall.retry.api.decided_locally").unwrap() > 250);
    assert!(metrics.value("seawall.retry.api.lease_returned").unwrap() > 0);
    assert_eq!(metrics.value("seawall.retry.api.refunded"), Some(2 * 257));
}

const DEGRADATION_CONFIG: &str = r#"{
    "rate_limits": {"global": {"rate": "1000/s", "burst": 1000}},
    "degradation": {"payments": {
        "signals": {"min_requests": 1,
                    "probe": {"cluster": "health", "interval": "200ms", "timeout": "100ms", "unhealthy_after": 1}},
        "priority": {"header": "x-priority"},
        "admission_control": {"k": 2},
        "levels": [{"name": "degraded", "enter": {"probe": "unhealthy", "p95_latency": "800ms"},
                    "shed_below": "high", "rate_limit_factor": 0.5, "retries": false,
                    "reroute": {"cluster": "fallback", "routes": ["search"]},
                    "fallback": {"body": "[]", "routes": ["catalog"]}}]}},
    "routes": [
        {"name": "catalog", "match": {"path": {"prefix": "/catalog"}}, "degradation": "payments"},
        {"name": "search", "match": {"path": {"prefix": "/search"}}, "degradation": "payments"},
        {"name": "api", "degradation": "payments", "rate_limits": ["global"]}
    ]
}"#;

#[test]
fn degradation_decisions_and_outcomes_allocate_only_the_host_buffers() {
    const SECOND: u64 = 1_000_000_000;
    let mut metrics = FakeMetrics::new();
    let engine = Engine::new(
        compile(DEGRADATION_CONFIG.as_bytes()).unwrap(),
        &mut metrics,
    )
    .unwrap();
    let mut scratch = Scratch::for_plan(&engine.config().attributes);
    let store = FakeStore::new();
    engine.prepare_state(&store, 0x5ea_5ec2e7).unwrap();
    let start = 1_800_000_000 * SECOND;
    // (path, priority, level to be in, goes upstream): normal first, then degraded by a failed
    // probe: shed, fallback, reroute and a critical call that passes.
    let steps: [(&[u8], &[u8], u8, bool); 6] = [
        (b"/api", b"low", 0, true),
        (b"/catalog", b"low", 0, true),
        (b"/api", b"low", 1, false),
        (b"/catalog", b"critical", 1, false),
        (b"/search/q", b"critical", 1, true),
        (b"/api", b"critical", 1, true),
    ];
    for (round, (path, priority, level, upstream)) in steps.into_iter().enumerate() {
        if level == 1 && engine.degradation_level(0) == Some(0) {
            // Off the request path: the tick may allocate (probes are host calls with headers).
            engine.on_degradation_tick(
                1,
                Timestamp::from_nanos(start),
                &store,
                &metrics,
                &mut |_, _| false,
            );
            engine.on_degradation_tick(
                1,
                Timestamp::from_nanos(start + SECOND / 10),
                &store,
                &metrics,
                &mut |_, _| false,
            );
            assert_eq!(engine.degradation_level(0), Some(1));
        }
        let mut host = Host {
            values: vec![
                (Attribute::path(), path.to_vec()),
                (Attribute::header("x-priority"), priority.to_vec()),
            ],
            handed_out: 0,
        };
        let now = Timestamp::from_nanos(start + SECOND);
        let mut facts = Finished {
            status: Some(200),
            flags: 0,
            reads: 0,
        };
        let before = allocations();
        let decision = decide(&engine, &mut host, &mut scratch, now, &store, &metrics);
        let mut stream = decision.stream;
        if matches!(decision.verdict, Verdict::Continue) {
            engine.on_response(&mut stream, now, &metrics);
            engine.on_stream_end(&stream, &mut facts, now, &store, &metrics);
        }
        let spent = allocations() - before;
        assert_eq!(
            spent,
            host.handed_out + facts.reads,
            "step {round}: {spent} allocations, {} host buffers",
            host.handed_out + facts.reads
        );
        assert_eq!(
            matches!(decision.verdict, Verdict::Continue),
            upstream,
            "step {round}"
        );
    }
    for counter in ["shed", "fallback", "rerouted"] {
        assert_eq!(
            metrics.value(&format!("seawall.degradation.payments.{counter}")),
            Some(1),
            "{counter}"
        );
    }
}

const LEASE_CONFIG: &str = r#"{
    "rate_limits": {
        "global": {"rate": "100000/s", "burst": 100000},
        "per-user": {"rate": "1/h", "burst": 1, "key": [{"header": "x-user"}], "max_keys": 64,
                     "on_missing_key": "skip"}
    },
    "routes": [{"name": "limited", "rate_limits": ["global", "per-user"]}]
}"#;

/// Leases: taking one, admitting from it, a refund to it when per-user refuses, and a lease that
/// ended (a tick old) returned in the request's own CAS, all without an allocation of seawall's.
#[test]
fn leased_admissions_refunds_and_returns_allocate_only_the_host_buffers() {
    const MS: u64 = 1_000_000;
    let Prepared {
        engine,
        metrics,
        mut scratch,
        store,
    } = prepared(LEASE_CONFIG);
    let start = 1_800_000_000_000_000_000;
    let mut local = 0;
    for round in 0..400u64 {
        // Ticks (off the request path) every 100 requests; one gap of more than a tick without.
        let now = start + round * MS / 2 + if round >= 300 { 250 * MS } else { 0 };
        if round % 100 == 99 && round < 250 {
            engine.on_worker_tick(Timestamp::from_nanos(now), &store, &metrics, false);
        }
        // Every fifth request is one user's, whom per-user refuses after the first; the others
        // are exempt from it.
        let values = if round % 5 == 0 {
            vec![(Attribute::header("x-user"), b"mallory".to_vec())]
        } else {
            vec![]
        };
        let mut host = Host {
            values,
            handed_out: 0,
        };
        let calls = store.counts();
        let before = allocations();
        let decision = decide(
            &engine,
            &mut host,
            &mut scratch,
            Timestamp::from_nanos(now),
            &store,
            &metrics,
        );
        let spent = allocations() - before;
        assert_eq!(
            spent, host.handed_out,
            "request {round}: {spent} allocations, {} from the host",
            host.handed_out
        );
        assert_eq!(
            matches!(decision.verdict, Verdict::Continue),
            round == 0 || round % 5 != 0,
            "request {round}"
        );
        // No shared call for global: it was decided from the lease (per-user reads mallory's).
        let after = store.counts();
        let own = u64::from(round % 5 == 0);
        local += u64::from(after.gets - calls.gets == own);
    }
    assert!(metrics.value("seawall.rate_limit.global.leases").unwrap() > 0);
    assert!(
        metrics
            .value("seawall.rate_limit.global.lease_tokens_returned")
            .unwrap()
            > 0
    );
    assert!(local > 300, "{local} of 400 decided global from the lease");
}

/// Envoy's way: every request header in one buffer (the header map), properties one by one.
struct MapHost {
    /// The request's headers in the map wire form, as the host keeps them.
    map: Vec<u8>,
    properties: Vec<(Attribute, Vec<u8>)>,
    handed_out: u64,
    map_reads: u64,
}

impl AttributeSource for MapHost {
    fn read(&mut self, attribute: &Attribute) -> Option<Vec<u8>> {
        assert!(
            matches!(attribute, Attribute::Property(_)),
            "a header was read on its own: {attribute:?}"
        );
        let value = self.properties.iter().find(|(a, _)| a == attribute)?;
        self.handed_out += 1;
        Some(value.1.clone())
    }

    /// One buffer handed out, a copy of the whole map.
    fn read_header_map(&mut self) -> Option<Vec<u8>> {
        self.map_reads += 1;
        self.handed_out += 1;
        Some(self.map.clone())
    }

    fn remove_header(&mut self, _name: &str) {}
}

#[test]
fn every_header_from_one_read_of_the_map_allocates_only_that_buffer() {
    let Prepared {
        engine,
        metrics,
        mut scratch,
        store,
    } = prepared(CONFIG);
    let requests = [
        // Falls through checkout (method, x-tier) and limited (path) to by-cluster.
        vec![
            (Attribute::path(), b"/other".to_vec()),
            (Attribute::method(), b"GET".to_vec()),
            (Attribute::header("x-tier"), b"gold".to_vec()),
            (Attribute::authority(), b"shop.example.com".to_vec()),
        ],
        // Both limits, keyed by a header and a property.
        vec![
            (Attribute::path(), b"/limited/x".to_vec()),
            (Attribute::header("x-user"), b"carol".to_vec()),
            (Attribute::header("x-tier"), vec![0xff; 64 * 1024]),
        ],
    ];
    for (round, headers) in requests.into_iter().enumerate() {
        let pairs = headers
            .iter()
            .filter_map(|(attribute, value)| match attribute {
                Attribute::Header(name) => Some((name.as_bytes(), value.as_slice())),
                Attribute::Property(_) => None,
            });
        let mut host = MapHost {
            map: seawall::request::encode_header_map(pairs),
            properties: vec![
                (Attribute::cluster_name(), b"payments".to_vec()),
                (Attribute::client_address(), b"10.1.2.3:4567".to_vec()),
            ],
            handed_out: 0,
            map_reads: 0,
        };
        let before = allocations();
        let decision = decide(
            &engine,
            &mut host,
            &mut scratch,
            Timestamp::from_nanos(1_800_000_000_000_000_000),
            &store,
            &metrics,
        );
        let spent = allocations() - before;
        assert_eq!(
            spent, host.handed_out,
            "request {round}: {spent} allocations, {} from the host",
            host.handed_out
        );
        assert_eq!(host.map_reads, 1, "request {round}");
        assert!(
            matches!(decision.verdict, Verdict::Continue),
            "request {round}"
        );
    }
}

const GLOBAL_CONFIG: &str = r#"{
    "rate_limits": {
        "global": {"source": {"global": {"domain": "edge", "cluster": "rls",
                   "failure_mode": {"fallback": {"rate": "10/s", "burst": 2}},
                   "lease": {"min_hits": 3}}}},
        "local": {"rate": "1/h", "burst": 1}
    },
    "routes": [
        {"name": "both", "match": {"path": {"prefix": "/both"}}, "rate_limits": ["global", "local"]},
        {"name": "global", "rate_limits": ["global"]}
    ]
}"#;

/// A global limit's request path: a token from the bucket, the refund when a later limit
/// refuses, refusal when the bucket is empty, and the fallback limit while the RLS fails. The
/// lease calls are the tick's (they encode a message), made outside the count.
#[test]
fn global_limits_allocate_only_the_host_buffers() {
    let Prepared {
        engine,
        metrics,
        mut scratch,
        store,
    } = prepared(GLOBAL_CONFIG);
    let now = Timestamp::from_nanos(1_800_000_000_000_000_000);
    // The first request finds the bucket empty: the demand that asks for the first lease.
    let mut first = Host {
        values: vec![(Attribute::path(), b"/global".to_vec())],
        handed_out: 0,
    };
    let refused = decide(&engine, &mut first, &mut scratch, now, &store, &metrics);
    assert!(!matches!(refused.verdict, Verdict::Continue));
    let mut sent = Vec::new();
    engine.on_global_tick(1, now, &store, &metrics, &mut |call| {
        sent.push((call.policy, call.claim));
        true
    });
    let (policy, claim) = sent.pop().expect("the empty bucket asks for a lease");
    assert_eq!(claim.hits, 3);
    // OK, without window information: the lease's 3 hits go into the bucket.
    engine.on_global_answer(policy, 1, claim, Some(&[0x08, 1]), now, &store, &metrics);
    let mut request = |path: &[u8], now| {
        let mut host = Host {
            values: vec![(Attribute::path(), path.to_vec())],
            handed_out: 0,
        };
        let before = allocations();
        let decision = decide(&engine, &mut host, &mut scratch, now, &store, &metrics);
        let admitted = matches!(decision.verdict, Verdict::Continue);
        assert_eq!(allocations() - before, host.handed_out, "{path:?}");
        admitted
    };
    // Both limits admit; then the local one refuses and the global token goes back, each time.
    assert!(request(b"/both", now));
    for _ in 0..5 {
        assert!(!request(b"/both", now));
    }
    // The 2 tokens left (the refunds landed), then an empty bucket refuses.
    assert!(request(b"/global", now));
    assert!(request(b"/global", now));
    assert!(!request(b"/global", now));
    // The RLS fails (a call that cannot be sent): the fallback's burst of 2, then refusals.
    let later = Timestamp::from_nanos(now.as_nanos() + 1_000_000_000);
    assert!(
        !request(b"/global", later),
        "still empty: the demand that asks"
    );
    engine.on_global_tick(1, later, &store, &metrics, &mut |_| false);
    let admitted: Vec<bool> = (0..3).map(|_| request(b"/global", later)).collect();
    assert_eq!(admitted, [true, true, false]);
}

const PER_CLIENT_CONFIG: &str = r#"{
    "rate_limits": {
        "per-user": {"max_keys": 64, "source": {"global": {"domain": "edge", "cluster": "rls",
                     "descriptor": [{"key": "user", "from": {"header": "x-user"}},
                                    {"key": "path", "from": "path"}],
                     "lease": {"min_hits": 2}}}}
    },
    "routes": [{"name": "all", "rate_limits": ["per-user"]}]
}"#;

/// A per-client global limit's request path: a new client takes a slot and writes its
/// descriptor values, is admitted on credit, asks the tick for a lease (the wanted list), spends
/// the lease and is refused once it is empty; a second client lands in its own slot. The values
/// are normalised into a stack buffer: nothing but the host's buffers is allocated.
#[test]
fn per_client_global_limits_allocate_only_the_host_buffers() {
    let Prepared {
        engine,
        metrics,
        mut scratch,
        store,
    } = prepared(PER_CLIENT_CONFIG);
    let now = Timestamp::from_nanos(1_800_000_000_000_000_000);
    let mut request = |user: &[u8], now| {
        let mut host = Host {
            values: vec![
                (Attribute::path(), b"/API//items?x=1".to_vec()),
                (Attribute::header("x-user"), user.to_vec()),
            ],
            handed_out: 0,
        };
        let before = allocations();
        let decision = decide(&engine, &mut host, &mut scratch, now, &store, &metrics);
        let admitted = matches!(decision.verdict, Verdict::Continue);
        assert_eq!(allocations() - before, host.handed_out, "{user:?}");
        admitted
    };
    // Credit: 2 at once, then the wait for a lease.
    assert!(request(b"alice", now));
    assert!(request(b"alice", now));
    assert!(!request(b"alice", now));
    assert!(request(b"bob", now));
    let mut sent = Vec::new();
    engine.on_global_tick(1, now, &store, &metrics, &mut |call| {
        sent.push((call.policy, call.claim, call.message));
        true
    });
    assert_eq!(sent.len(), 2, "a lease for alice and one for bob");
    let (policy, claim, message) = sent.remove(0);
    // The values as the RLS sees them: the user as sent, the path in its canonical form.
    let text = String::from_utf8_lossy(&message);
    assert!(
        text.contains("alice") && text.contains("/api/items") && !text.contains('?'),
        "{text:?}"
    );
    assert_eq!(claim.hits, 4, "the next lease (2) and the 2 owed");
    engine.on_global_answer(policy, 1, claim, Some(&[0x08, 1]), now, &store, &metrics);
    assert!(request(b"alice", now));
    assert!(request(b"alice", now));
    assert!(!request(b"alice", now));
}
