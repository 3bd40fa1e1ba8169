//! Rate limits through the whole core: config, engine, shared store. A fake clock and a fake store
//! stand in for Envoy; other workers are simulated by interleaving their decisions between this
//! worker's read and write, or by real threads.

// A test crate: a failed unwrap is how it reports a failed expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

use std::time::Duration;

use proptest::prelude::*;
use seawall::clock::Timestamp;
use seawall::config::compile;
use seawall::engine::{Engine, Verdict, GRPC_RESOURCE_EXHAUSTED};
use seawall::metrics::FakeMetrics;
use seawall::policy::rate_limit::{acquire, Acquired, Gcra, GcraDecision};
use seawall::request::{Attribute, FakeRequest, RequestView, Scratch};
use seawall::state::fake::FakeStore;
use seawall::state::{SharedStore, StoreError};

const SECOND: u64 = 1_000_000_000;
const T0: u64 = 1_800_000_000 * SECOND;

mod common;

use common::{get, Worker};

/// What this file asks of a worker.
trait Limited {
    fn allowed(&mut self, request: FakeRequest, now: u64, store: &FakeStore) -> bool;
    fn metric(&self, name: &str) -> i64;
}

impl Limited for Worker {
    fn allowed(&mut self, request: FakeRequest, now: u64, store: &FakeStore) -> bool {
        matches!(self.send(request, now, store).verdict, Verdict::Continue)
    }

    fn metric(&self, name: &str) -> i64 {
        self.counter(name)
    }
}

const GLOBAL: &str = r#"{
    "rate_limits": {"global": {"rate": "100/s", "burst": 10}},
    "routes": [{"name": "all", "rate_limits": ["global"]}]
}"#;

#[test]
fn burst_then_rate() {
    let store = FakeStore::new();
    let mut worker = Worker::new(GLOBAL, &store);
    let admitted = (0..50)
        .filter(|_| worker.allowed(get("/"), T0, &store))
        .count();
    assert_eq!(admitted, 10, "only the burst passes at one instant");
    // Then one every 10 ms: over 5 s, 500 more.
    let mut later = 0;
    for ms in 1..=5000u64 {
        for _ in 0..3 {
            later += usize::from(worker.allowed(get("/"), T0 + ms * 1_000_000, &store));
        }
    }
    assert_eq!(later, 500);
    assert_eq!(worker.metric("seawall.rate_limit.global.allowed"), 510);
    assert_eq!(
        worker.metric("seawall.rate_limit.global.limited"),
        50 + 15_000 - 510
    );
}

#[test]
fn a_rejection_carries_retry_after_and_ratelimit_headers() {
    let store = FakeStore::new();
    let json = r#"{
        "rate_limits": {"slow": {"rate": "1/m", "burst": 2, "on_limit": {"status": 429, "body": "slow down\n", "headers": {"X-Why": "quota"}}}},
        "routes": [{"name": "all", "rate_limits": ["slow"]}]
    }"#;
    let mut worker = Worker::new(json, &store);
    let first = worker.send(get("/"), T0, &store);
    let status = first.stream.rate_limit.unwrap();
    assert_eq!(
        (status.limit, status.remaining, status.reset_seconds()),
        (2, 1, 60)
    );
    let second = worker
        .send(get("/"), T0 + 15 * SECOND, &store)
        .stream
        .rate_limit
        .unwrap();
    assert_eq!((second.remaining, second.reset_seconds()), (0, 105));
    let Verdict::Reply(reply) = worker.send(get("/"), T0 + 15 * SECOND, &store).verdict else {
        panic!("the third request within a minute is refused")
    };
    assert_eq!(reply.status, 429);
    assert_eq!(reply.body, b"slow down\n");
    assert_eq!(reply.headers, [("x-why".to_owned(), "quota".to_owned())]);
    // The next token arrives 60 s after the first request: 45 s from now.
    assert_eq!(reply.retry_after_seconds(), Some(45));
    let limited = reply.rate_limit.unwrap();
    assert_eq!(
        (limited.limit, limited.remaining, limited.reset_seconds()),
        (2, 0, 105)
    );
    assert_eq!(reply.grpc_status, None);
}

#[test]
fn grpc_requests_get_resource_exhausted() {
    let store = FakeStore::new();
    let json = r#"{"rate_limits": {"one": {"rate": "1/h"}}, "routes": [{"name": "all", "rate_limits": ["one"]}]}"#;
    let mut worker = Worker::new(json, &store);
    let grpc = || {
        FakeRequest::http("POST", "/pkg.Service/Call")
            .header("content-type", "application/grpc+proto")
    };
    assert!(worker.allowed(grpc(), T0, &store));
    let Verdict::Reply(reply) = worker.send(grpc(), T0, &store).verdict else {
        panic!("the second call in an hour is refused")
    };
    assert_eq!(reply.grpc_status, Some(GRPC_RESOURCE_EXHAUSTED));
}

#[test]
fn each_key_has_its_own_bucket() {
    let store = FakeStore::new();
    let json = r#"{
        "rate_limits": {"per-user": {"rate": "5/s", "burst": 5, "key": [{"header": "x-user"}], "max_keys": 1000}},
        "routes": [{"name": "all", "rate_limits": ["per-user"]}]
    }"#;
    let mut worker = Worker::new(json, &store);
    let user = |name: &str| get("/").header("x-user", name);
    let flood = (0..1000)
        .filter(|_| worker.allowed(user("mallory"), T0, &store))
        .count();
    assert_eq!(flood, 5);
    for name in ["alice", "bob"] {
        let admitted = (0..5)
            .filter(|_| worker.allowed(user(name), T0, &store))
            .count();
        assert_eq!(admitted, 5, "{name} gets a full quota while mallory floods");
    }
}

#[test]
fn missing_key_parts_share_one_bucket_or_skip_the_limit() {
    let store = FakeStore::new();
    let json = |missing: &str| {
        format!(
            r#"{{"rate_limits": {{"per-user": {{"rate": "2/s", "key": [{{"header": "x-user"}}], "on_missing_key": "{missing}"}}}},
                "routes": [{{"name": "all", "rate_limits": ["per-user"]}}]}}"#
        )
    };
    let mut shared = Worker::new(&json("shared"), &store);
    assert_eq!(
        (0..10)
            .filter(|_| shared.allowed(get("/"), T0, &store))
            .count(),
        2
    );
    let other_store = FakeStore::new();
    let mut skip = Worker::new(&json("skip"), &other_store);
    assert_eq!(
        (0..10)
            .filter(|_| skip.allowed(get("/"), T0, &other_store))
            .count(),
        10
    );
    assert_eq!(skip.metric("seawall.rate_limit.per-user.exempt"), 10);
}

#[test]
fn composite_keys_use_client_ip_without_port_and_path_without_query() {
    let store = FakeStore::new();
    let json = r#"{
        "rate_limits": {"ip-path": {"rate": "1/s", "key": ["client_ip", "path"]}},
        "routes": [{"name": "all", "rate_limits": ["ip-path"]}]
    }"#;
    let mut worker = Worker::new(json, &store);
    let from = |address: &str, path: &str| get(path).with(Attribute::client_address(), address);
    assert!(worker.allowed(from("10.0.0.1:1111", "/a?x=1"), T0, &store));
    assert!(
        !worker.allowed(from("10.0.0.1:2222", "/a?y=2"), T0, &store),
        "same IP and path, other port and query"
    );
    assert!(worker.allowed(from("10.0.0.1:1111", "/b"), T0, &store));
    assert!(worker.allowed(from("10.0.0.2:1111", "/a"), T0, &store));
}

#[test]
fn distinct_keys_never_grow_shared_data_beyond_max_keys() {
    let store = FakeStore::new();
    let json = r#"{
        "rate_limits": {"per-user": {"rate": "10/s", "key": [{"header": "x-user"}], "max_keys": 500}},
        "routes": [{"name": "all", "rate_limits": ["per-user"]}]
    }"#;
    let mut worker = Worker::new(json, &store);
    let prepared = store.key_count();
    assert_eq!(
        prepared, 502,
        "500 slots, the bucket for requests without the header, and the deployment's secret"
    );
    for n in 0..100_000u32 {
        let mut value = n.to_le_bytes().to_vec();
        if n % 100 == 0 {
            value = vec![0xff; 64 * 1024]; // huge and not UTF-8
            value[..4].copy_from_slice(&n.to_le_bytes());
        }
        worker.allowed(
            get("/").header("x-user", &value),
            T0 + u64::from(n) * 1000,
            &store,
        );
    }
    assert_eq!(store.key_count(), prepared);
}

#[test]
fn shadow_mode_counts_but_never_rejects() {
    let store = FakeStore::new();
    let json = r#"{
        "rate_limits": {"trial": {"rate": "10/s", "burst": 10, "mode": "shadow"}},
        "routes": [{"name": "all", "rate_limits": ["trial"]}]
    }"#;
    let mut worker = Worker::new(json, &store);
    let mut last = None;
    for _ in 0..100 {
        let decision = worker.send(get("/"), T0, &store);
        assert_eq!(decision.verdict, Verdict::Continue);
        last = decision.stream.rate_limit;
    }
    assert_eq!(worker.metric("seawall.rate_limit.trial.allowed"), 10);
    assert_eq!(worker.metric("seawall.rate_limit.trial.shadow_limited"), 90);
    assert_eq!(worker.metric("seawall.rate_limit.trial.limited"), 0);
    assert_eq!(
        last.map(|s| s.remaining),
        Some(0),
        "headers report what enforcement would do"
    );
}

#[test]
fn a_request_refused_by_one_limit_costs_the_others_nothing() {
    let store = FakeStore::new();
    let json = r#"{
        "rate_limits": {
            "global": {"rate": "100/s", "burst": 100},
            "per-user": {"rate": "2/s", "burst": 2, "key": [{"header": "x-user"}]}
        },
        "routes": [{"name": "all", "rate_limits": ["global", "per-user"]}]
    }"#;
    let mut worker = Worker::new(json, &store);
    let user = |name: &str| get("/").header("x-user", name);
    // Mallory: 2 admitted, 48 refused by per-user after global had granted a token.
    let mallory = (0..50)
        .filter(|_| worker.allowed(user("mallory"), T0, &store))
        .count();
    assert_eq!(mallory, 2);
    // Had the refused requests kept their global tokens, only 50 would be left.
    let others = (0..200)
        .filter(|n| worker.allowed(user(&format!("user-{n}")), T0, &store))
        .count();
    assert_eq!(others, 98);
    assert_eq!(
        worker.metric("seawall.rate_limit.global.allowed"),
        2 + 48 + 98
    );
    assert_eq!(worker.metric("seawall.rate_limit.per-user.limited"), 48);
}

#[test]
fn the_common_path_costs_one_read_and_one_write_per_limit() {
    let store = FakeStore::new();
    let json = r#"{
        "rate_limits": {"a": {"rate": "1000/s"}, "b": {"rate": "1000/s", "key": [{"header": "x-user"}]}},
        "routes": [{"name": "all", "rate_limits": ["a", "b"]}]
    }"#;
    let mut worker = Worker::new(json, &store);
    for n in 0..100u64 {
        let before = store.counts();
        assert!(worker.allowed(get("/").header("x-user", "u"), T0 + n * SECOND, &store));
        let after = store.counts();
        assert_eq!((after.gets - before.gets, after.sets - before.sets), (2, 2));
    }
    // A refusal reads and does not write.
    let refuse_json = r#"{"rate_limits": {"a": {"rate": "1/h"}}, "routes": [{"name": "all", "rate_limits": ["a"]}]}"#;
    let refuse_store = FakeStore::new();
    let mut refusing = Worker::new(refuse_json, &refuse_store);
    assert!(refusing.allowed(get("/"), T0, &refuse_store));
    let before = refuse_store.counts();
    assert!(!refusing.allowed(get("/"), T0, &refuse_store));
    let after = refuse_store.counts();
    assert_eq!((after.gets - before.gets, after.sets - before.sets), (1, 0));
}

#[test]
fn routes_without_limits_touch_no_shared_data() {
    let store = FakeStore::new();
    let json = r#"{"rate_limits": {"a": {"rate": "1/s"}},
        "routes": [{"name": "limited", "match": {"path": {"prefix": "/limited"}}, "rate_limits": ["a"]}, {"name": "free"}]}"#;
    let mut worker = Worker::new(json, &store);
    let before = store.counts();
    for _ in 0..10 {
        assert!(worker.allowed(get("/free"), T0, &store));
    }
    assert_eq!(store.counts(), before);
}

#[test]
fn failure_modes_decide_when_the_store_fails() {
    let json = |mode: &str| {
        format!(
            r#"{{"rate_limits": {{"a": {{"rate": "10/s", "failure_mode": "{mode}"}}}}, "routes": [{{"name": "all", "rate_limits": ["a"]}}]}}"#
        )
    };
    let store = FakeStore::new();
    let mut open = Worker::new(&json("open"), &store);
    store.fail_next(1, StoreError::Host(10));
    assert!(open.allowed(get("/"), T0, &store));
    assert_eq!(open.metric("seawall.rate_limit.a.store_errors"), 1);
    assert_eq!(open.metric("seawall.rate_limit.a.failure_mode_applied"), 1);

    let store = FakeStore::new();
    let mut closed = Worker::new(&json("closed"), &store);
    store.fail_next(1, StoreError::Host(10));
    let Verdict::Reply(reply) = closed.send(get("/"), T0, &store).verdict else {
        panic!("fail closed refuses")
    };
    assert_eq!(reply.status, 429);
    assert_eq!(reply.retry_after_seconds(), Some(1));
}

#[test]
fn an_exhausted_cas_loop_is_counted_and_bounded() {
    let store = FakeStore::new();
    let json = r#"{"rate_limits": {"a": {"rate": "1000/s", "failure_mode": "closed"}}, "routes": [{"name": "all", "rate_limits": ["a"]}]}"#;
    let mut worker = Worker::new(json, &store);
    // Another worker always writes between this worker's read and write.
    store.interfere(|other| {
        other
            .set("sw:seawall:rl:a:all", &0u64.to_le_bytes(), None)
            .unwrap();
    });
    assert!(!worker.allowed(get("/"), T0, &store));
    store.stop_interfering();
    assert_eq!(worker.metric("seawall.rate_limit.a.cas_exhausted"), 1);
    assert_eq!(worker.metric("seawall.rate_limit.a.cas_retries"), 32);
    assert_eq!(store.counts().cas_mismatches, 32);
}

/// Four workers share one store; between each worker's read and write another worker decides.
/// However the decisions interleave, no more than burst + elapsed/interval requests pass.
#[test]
fn interleaved_workers_never_over_admit() {
    let store = std::sync::Arc::new(FakeStore::new());
    let mut workers: Vec<Worker> = (0..4).map(|_| Worker::new(GLOBAL, &store)).collect();
    let mut interferer = Worker::new(GLOBAL, &store);
    let interfering = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let now = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(T0));
    {
        let interfering = interfering.clone();
        let now = now.clone();
        // The interfering worker's engine is moved into the hook; it decides on the same store.
        let engine = std::mem::replace(
            &mut interferer.engine,
            Engine::new(compile(b"").unwrap(), &mut FakeMetrics::new()).unwrap(),
        );
        let mut scratch = Scratch::for_plan(&engine.config().attributes);
        let metrics = FakeMetrics::new();
        store.interfere(move |store| {
            let mut request = get("/");
            let mut view =
                RequestView::new(&engine.config().attributes, &mut request, &mut scratch);
            let at = now.load(std::sync::atomic::Ordering::SeqCst);
            if engine
                .on_request(&mut view, Timestamp::from_nanos(at), store, &metrics)
                .verdict
                == Verdict::Continue
            {
                interfering.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
    }
    let mut admitted = 0u64;
    for step in 0..2000u64 {
        let at = T0 + step * 1_000_000; // 1 ms per step, 2 s in all
        now.store(at, std::sync::atomic::Ordering::SeqCst);
        let worker = &mut workers[(step % 4) as usize];
        admitted += u64::from(worker.allowed(get("/"), at, &store));
    }
    store.stop_interfering();
    let total = admitted + interfering.load(std::sync::atomic::Ordering::SeqCst);
    // Burst 10 plus 100/s over the 1.999 s between the first and last step.
    assert_eq!(total, 10 + 199);
}

#[cfg(not(target_family = "wasm"))]
#[test]
fn real_threads_admit_exactly_the_burst() {
    let store = std::sync::Arc::new(FakeStore::new());
    let json = r#"{"rate_limits": {"g": {"rate": "1/h", "burst": 1000}}, "routes": [{"name": "all", "rate_limits": ["g"]}]}"#;
    Worker::new(json, &store);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut worker = Worker::new(json, &store);
                (0..2000)
                    .filter(|_| worker.allowed(get("/"), T0, &store))
                    .count()
            })
        })
        .collect();
    let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(admitted, 1000);
}

/// A continuous token bucket in integer nanoseconds of credit: the reference the GCRA must match.
struct Reference {
    credit: u64,
    capacity: u64,
    interval: u64,
    last: u64,
}

impl Reference {
    fn allow(&mut self, now: u64) -> bool {
        self.credit = (self.credit + now.saturating_sub(self.last)).min(self.capacity);
        self.last = self.last.max(now);
        if self.credit >= self.interval {
            self.credit -= self.interval;
            true
        } else {
            false
        }
    }
}

proptest! {
    #[test]
    fn gcra_matches_a_token_bucket(
        interval_ms in 1u64..2000,
        burst in 1u32..50,
        steps in proptest::collection::vec((0u64..3000, 1usize..5), 1..200),
    ) {
        let interval = interval_ms * 1_000_000;
        let gcra = Gcra::new(Duration::from_nanos(interval), burst);
        let capacity = interval * u64::from(burst);
        let mut reference = Reference { credit: capacity, capacity, interval, last: T0 };
        let mut tat = None;
        let mut now = T0;
        for (advance_ms, requests) in steps {
            now += advance_ms * 1_000_000;
            for _ in 0..requests {
                let expected = reference.allow(now);
                let actual = match gcra.decide(tat, now) {
                    GcraDecision::Allow { new_tat, remaining, .. } => {
                        tat = Some(new_tat);
                        prop_assert_eq!(u64::from(remaining), reference.credit / interval);
                        true
                    }
                    GcraDecision::Deny { retry_in, .. } => {
                        prop_assert_eq!(retry_in.as_nanos() as u64, interval - reference.credit);
                        false
                    }
                };
                prop_assert_eq!(actual, expected);
            }
        }
    }

    #[test]
    fn acquire_on_the_store_matches_the_pure_decision(
        burst in 1u32..20,
        steps in proptest::collection::vec(0u64..200, 1..100),
    ) {
        let gcra = Gcra::new(Duration::from_millis(50), burst);
        let store = FakeStore::new();
        let mut tat = None;
        let mut now = T0;
        for advance_ms in steps {
            now += advance_ms * 1_000_000;
            let pure = gcra.decide(tat, now);
            if let GcraDecision::Allow { new_tat, .. } = pure {
                tat = Some(new_tat);
            }
            let (acquired, retries) = acquire(&gcra, &store, "k", now);
            prop_assert_eq!(retries, 0);
            prop_assert_eq!(matches!(acquired, Acquired::Allowed { .. }), matches!(pure, GcraDecision::Allow { .. }));
        }
    }
}

/// The `Retry-After` a refused request gets, in seconds; `None` when it is admitted.
fn retry_after(worker: &mut Worker, now: u64, store: &FakeStore) -> Option<u64> {
    match worker.send(get("/"), now, store).verdict {
        Verdict::Reply(reply) => Some(reply.retry_after_seconds().unwrap_or(0)),
        _ => None,
    }
}

/// Issue 14, point 4: reloading `10/h burst 10` as `1000/s burst 1000` under the same names kept
/// the exhausted bucket's arrival time an hour ahead, so every request was refused with
/// `Retry-After` ≈ 3599 s. The stored time now counts for no more than the new limit allows: an
/// empty bucket, refilling at the new rate.
#[test]
fn a_reload_to_a_faster_limit_never_locks_clients_out() {
    let store = FakeStore::new();
    let slow = r#"{"rate_limits": {"quota": {"rate": "10/h", "burst": 10}},
                   "routes": [{"name": "all", "rate_limits": ["quota"]}]}"#;
    let fast = r#"{"rate_limits": {"quota": {"rate": "1000/s", "burst": 1000}},
                   "routes": [{"name": "all", "rate_limits": ["quota"]}]}"#;
    let mut before = Worker::new(slow, &store);
    for _ in 0..10 {
        assert_eq!(retry_after(&mut before, T0, &store), None);
    }
    assert!(retry_after(&mut before, T0, &store).unwrap() > 300);
    let mut after = Worker::new(fast, &store);
    // The old hour of debt counts as an empty bucket of the new limit: refused for at most
    // one interval of the new rate (1 ms), then refilling at 1000/s.
    let at = T0 + SECOND / 100;
    let refused = retry_after(&mut after, at, &store);
    assert!(refused.is_some_and(|seconds| seconds <= 1), "{refused:?}");
    assert_eq!(retry_after(&mut after, at + SECOND / 1000, &store), None);
    // Two seconds later the new bucket is full again: 1000 at once.
    let full = (0..1001)
        .filter(|_| retry_after(&mut after, at + 2 * SECOND, &store).is_none())
        .count();
    assert_eq!(full, 1000);
}

/// Issue 14, point 4: if the real-time clock stepped back, every bucket refused for the length of
/// the step. Now a bucket written under the later clock counts as empty, and refills at its rate.
#[test]
fn a_clock_step_back_never_refuses_for_the_step() {
    let store = FakeStore::new();
    let mut worker = Worker::new(GLOBAL, &store);
    let later = T0 + 3_600 * SECOND;
    for _ in 0..10 {
        assert_eq!(retry_after(&mut worker, later, &store), None);
    }
    assert!(retry_after(&mut worker, later, &store).is_some());
    // The clock steps back an hour: the bucket is empty, not an hour in debt. 100/s refills one
    // token every 10 ms.
    assert!(retry_after(&mut worker, T0, &store).unwrap() <= 1);
    assert_eq!(retry_after(&mut worker, T0 + SECOND / 100, &store), None);
    let admitted = (0..20)
        .filter(|_| retry_after(&mut worker, T0 + SECOND, &store).is_none())
        .count();
    assert_eq!(admitted, 10, "a second later the burst is back");
}
