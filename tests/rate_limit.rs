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
use seawall::policy::rate_limit::{acquire, Acquired, Gcra, GcraDecision, LEASE_MAX};
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
    /// The host's tick for this worker (every 100 ms), or its last one when the config retires.
    fn tick(&self, now: u64, store: &FakeStore, retiring: bool);
}

impl Limited for Worker {
    fn allowed(&mut self, request: FakeRequest, now: u64, store: &FakeStore) -> bool {
        matches!(self.send(request, now, store).verdict, Verdict::Continue)
    }

    fn metric(&self, name: &str) -> i64 {
        self.counter(name)
    }

    fn tick(&self, now: u64, store: &FakeStore, retiring: bool) {
        self.engine
            .on_worker_tick(Timestamp::from_nanos(now), store, &self.metrics, retiring);
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

/// Each worker reads Envoy's clock when a request arrives and decides on shared data a moment
/// later, so a worker descheduled in between decides with a reading older than the one behind the
/// record it finds. That record is not a clock step back: deciding on it with the older reading
/// must neither mint tokens nor refuse for longer than the skew. The fresh worker admits at `t`,
/// the lagging one decides with `t − 5 ms`, 2 s of requests every millisecond.
#[test]
fn a_worker_deciding_with_an_older_clock_reading_mints_no_tokens() {
    let store = FakeStore::new();
    let mut fresh = Worker::new(GLOBAL, &store);
    let mut lagging = Worker::new(GLOBAL, &store);
    let lag = 5 * MS;
    let mut admitted = 0u64;
    let mut last = T0;
    for step in 0..2000u64 {
        last = T0 + lag + step * MS;
        admitted += u64::from(fresh.allowed(get("/"), last, &store));
        admitted += u64::from(lagging.allowed(get("/"), last - lag, &store));
    }
    // Burst 10 plus 100/s over the 1.999 s between the first reading and the last.
    let bound = 10 + (last - T0) / (SECOND / 100);
    assert!(admitted <= bound, "{admitted} admitted, bound {bound}");
    // The lag only makes the lagging worker see the bucket as it was 5 ms ago: with a
    // request every millisecond, every token is still taken, by one worker or the other.
    assert!(admitted >= bound - 1, "{admitted} admitted, bound {bound}");
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

// Leases: a worker takes a batch of an ample single bucket's tokens with one CAS and admits from
// it locally (see `engine/limits.rs` for the rules and the bound these tests prove).

const MS: u64 = 1_000_000;

/// A bucket that never refills within a test (1/h) and holds 1000: arithmetic stays exact.
const AMPLE: &str = r#"{
    "rate_limits": {"ample": {"rate": "1/h", "burst": 1000}},
    "routes": [{"name": "all", "rate_limits": ["ample"]}]
}"#;
const AMPLE_KEY: &str = "sw:seawall:rl:ample:all";
const HOUR_INTERVAL: u64 = 3_600 * SECOND;

/// The bucket's arrival time as stored (after its layout byte).
fn stored_tat(store: &FakeStore, key: &str) -> u64 {
    let raw = store.raw(key).unwrap();
    assert_eq!(raw[0], 0x42, "a GCRA record");
    u64::from_le_bytes(raw[1..9].try_into().unwrap())
}

fn held(workers: &[Worker]) -> u64 {
    workers.iter().map(|w| w.engine.leased_tokens_held()).sum()
}

#[test]
fn an_ample_bucket_is_leased_and_most_requests_touch_no_shared_data() {
    let store = FakeStore::new();
    let json = r#"{"rate_limits": {"big": {"rate": "10000/s", "burst": 10000}},
                   "routes": [{"name": "all", "rate_limits": ["big"]}]}"#;
    let mut workers: Vec<Worker> = (0..2).map(|_| Worker::new(json, &store)).collect();
    let (mut requests, mut free, mut ops) = (0u64, 0u64, 0u64);
    // Two workers, 4 requests a millisecond each (8,000/s, under the 10,000/s limit), for 2 s,
    // each ticking every 100 ms as the host does.
    for ms in 0..2_000u64 {
        let now = T0 + ms * MS;
        for (n, worker) in workers.iter_mut().enumerate() {
            if ms % 100 == 50 * n as u64 {
                worker.tick(now, &store, false);
            }
            for _ in 0..4 {
                let before = store.counts();
                assert!(worker.allowed(get("/"), now, &store), "under the limit");
                let after = store.counts();
                let spent = (after.gets - before.gets) + (after.sets - before.sets);
                requests += 1;
                ops += spent;
                free += u64::from(spent == 0);
            }
        }
    }
    let allowed: i64 = workers
        .iter()
        .map(|w| w.metric("seawall.rate_limit.big.allowed"))
        .sum();
    assert_eq!(allowed, 16_000, "every admission is counted");
    let leases: i64 = workers
        .iter()
        .map(|w| w.metric("seawall.rate_limit.big.leases"))
        .sum();
    eprintln!(
        "{requests} requests: {free} touched no shared data, {ops} shared calls in all ({:.4} a request), {leases} leases",
        ops as f64 / requests as f64
    );
    assert!(
        free * 100 >= requests * 97,
        "{free} of {requests} requests without a shared-data call"
    );
    assert!(
        ops * 100 <= requests * 5,
        "{ops} shared calls for {requests} requests"
    );
}

#[test]
fn unused_leased_tokens_go_back_on_the_tick_exactly() {
    let store = FakeStore::new();
    let mut worker = Worker::new(AMPLE, &store);
    // The lease grows with this tick's use: 1 from shared data, then leases of 2, 6 and 18.
    for _ in 0..10 {
        assert!(worker.allowed(get("/"), T0, &store));
    }
    assert_eq!(worker.metric("seawall.rate_limit.ample.leases"), 3);
    assert_eq!(
        worker.metric("seawall.rate_limit.ample.leased_tokens"),
        2 + 6 + 18
    );
    assert_eq!(worker.engine.leased_tokens_held(), 17);
    assert_eq!(stored_tat(&store, AMPLE_KEY), T0 + 27 * HOUR_INTERVAL);
    let before = store.counts();
    worker.tick(T0 + 100 * MS, &store, false);
    let after = store.counts();
    assert_eq!((after.gets - before.gets, after.sets - before.sets), (1, 1));
    assert_eq!(worker.engine.leased_tokens_held(), 0);
    assert_eq!(
        worker.metric("seawall.rate_limit.ample.lease_tokens_returned"),
        17
    );
    // Shared data holds exactly the 10 admitted.
    assert_eq!(stored_tat(&store, AMPLE_KEY), T0 + 10 * HOUR_INTERVAL);
    // A tick with nothing leased costs nothing.
    let before = store.counts();
    worker.tick(T0 + 200 * MS, &store, false);
    assert_eq!(store.counts(), before);
    // The next lease is sized by the last tick's use (10 requests)... and the tick before was
    // empty, so the one after that starts small again.
    assert!(worker.allowed(get("/"), T0 + 250 * MS, &store));
    assert_eq!(
        worker.engine.leased_tokens_held(),
        0,
        "the last tick saw none"
    );
    // Everything admitted and nothing more: 990 left for anyone.
    let mut other = Worker::new(AMPLE, &store);
    let rest = (0..2_000)
        .filter(|_| other.allowed(get("/"), T0 + 300 * MS, &store))
        .count();
    assert_eq!(rest, 1000 - 11);
}

#[test]
fn a_lease_is_sized_by_the_last_ticks_use_and_a_slow_worker_never_leases() {
    let store = FakeStore::new();
    let mut busy = Worker::new(AMPLE, &store);
    for _ in 0..40 {
        assert!(busy.allowed(get("/"), T0, &store));
    }
    busy.tick(T0 + 100 * MS, &store, false);
    let leases = busy.metric("seawall.rate_limit.ample.leases");
    // The next tick's first request leases the last tick's 40 at once (1/16 of 960 is 60).
    assert!(busy.allowed(get("/"), T0 + 150 * MS, &store));
    assert_eq!(busy.metric("seawall.rate_limit.ample.leases"), leases + 1);
    assert_eq!(busy.engine.leased_tokens_held(), 39);
    busy.tick(T0 + 200 * MS, &store, false);

    // One request a tick: never a lease, one read and one write each, as without leases.
    let mut slow = Worker::new(AMPLE, &store);
    for tick in 0..20u64 {
        let now = T0 + tick * 100 * MS;
        let before = store.counts();
        assert!(slow.allowed(get("/"), now + MS, &store));
        let after = store.counts();
        assert_eq!((after.gets - before.gets, after.sets - before.sets), (1, 1));
        slow.tick(now + 100 * MS, &store, false);
    }
    assert_eq!(slow.metric("seawall.rate_limit.ample.leases"), 0);
}

#[test]
fn a_retired_config_gives_its_lease_back_and_a_new_one_inherits_none() {
    let store = FakeStore::new();
    let mut old = Worker::new(AMPLE, &store);
    for _ in 0..10 {
        assert!(old.allowed(get("/"), T0, &store));
    }
    assert_eq!(old.engine.leased_tokens_held(), 17);
    // The reloaded config starts with no lease: its first request asks shared data, which
    // shows the old lease as taken.
    let mut new = Worker::new(AMPLE, &store);
    assert_eq!(new.engine.leased_tokens_held(), 0);
    let before = store.counts();
    let status = new.send(get("/"), T0, &store).stream.rate_limit.unwrap();
    assert_eq!(store.counts().gets - before.gets, 1);
    assert_eq!(status.remaining, 1000 - 27 - 1);
    // Retiring gives the 17 back at once.
    old.tick(T0 + MS, &store, true);
    assert_eq!(old.engine.leased_tokens_held(), 0);
    assert_eq!(
        old.metric("seawall.rate_limit.ample.lease_tokens_returned"),
        17
    );
    assert_eq!(stored_tat(&store, AMPLE_KEY), T0 + 11 * HOUR_INTERVAL);
    // Draining requests on the retired config are still limited, in shared data, never leased.
    let leases = old.metric("seawall.rate_limit.ample.leases");
    for _ in 0..50 {
        let before = store.counts();
        assert!(old.allowed(get("/"), T0 + 2 * MS, &store));
        let after = store.counts();
        assert_eq!((after.gets - before.gets, after.sets - before.sets), (1, 1));
    }
    assert_eq!(old.metric("seawall.rate_limit.ample.leases"), leases);
    assert_eq!(old.engine.leased_tokens_held(), 0);
    assert_eq!(stored_tat(&store, AMPLE_KEY), T0 + 61 * HOUR_INTERVAL);
}

#[test]
fn a_lease_a_tick_old_or_from_before_a_clock_step_goes_back_with_the_next_request() {
    let store = FakeStore::new();
    let mut worker = Worker::new(AMPLE, &store);
    for _ in 0..10 {
        assert!(worker.allowed(get("/"), T0, &store));
    }
    assert_eq!(worker.engine.leased_tokens_held(), 17);
    // No tick came (a late one): a tick after the lease, the next request returns it in its
    // own CAS and decides in shared data.
    let before = store.counts();
    assert!(worker.allowed(get("/"), T0 + 100 * MS, &store));
    let after = store.counts();
    assert_eq!((after.gets - before.gets, after.sets - before.sets), (1, 1));
    assert_eq!(
        worker.metric("seawall.rate_limit.ample.lease_tokens_returned"),
        17
    );
    let held = worker.engine.leased_tokens_held();
    assert_eq!(
        stored_tat(&store, AMPLE_KEY),
        T0 + (11 + held) * HOUR_INTERVAL,
        "11 admitted, {held} in the new lease"
    );
    // The clock steps back: the lease taken "later" does not serve.
    let returned = worker.metric("seawall.rate_limit.ample.lease_tokens_returned");
    assert!(worker.allowed(get("/"), T0 + 50 * MS, &store));
    assert_eq!(
        worker.metric("seawall.rate_limit.ample.lease_tokens_returned"),
        returned + held as i64
    );
}

#[test]
fn a_token_refunded_by_a_later_limit_goes_back_to_the_lease() {
    let store = FakeStore::new();
    let json = r#"{
        "rate_limits": {
            "global": {"rate": "1/h", "burst": 1000},
            "per-user": {"rate": "1/h", "burst": 1, "key": [{"header": "x-user"}]}
        },
        "routes": [{"name": "all", "rate_limits": ["global", "per-user"]}]
    }"#;
    let mut worker = Worker::new(json, &store);
    let user = |n: u32| get("/").header("x-user", n.to_string());
    for n in 0..10 {
        assert!(worker.allowed(user(n), T0, &store));
    }
    let held = worker.engine.leased_tokens_held();
    assert_eq!(held, 17);
    // Refused by per-user: the global token came from the lease and goes back to it. Shared
    // data sees only per-user's read.
    for _ in 0..5 {
        let before = store.counts();
        assert!(!worker.allowed(user(3), T0, &store));
        let after = store.counts();
        assert_eq!((after.gets - before.gets, after.sets - before.sets), (1, 0));
        assert_eq!(worker.engine.leased_tokens_held(), held);
    }
    worker.tick(T0 + 100 * MS, &store, false);
    assert_eq!(
        stored_tat(&store, "sw:seawall:rl:global:all"),
        T0 + 10 * HOUR_INTERVAL,
        "the refused requests cost global nothing"
    );
    assert_eq!(worker.metric("seawall.rate_limit.global.allowed"), 15);
    assert_eq!(worker.metric("seawall.rate_limit.per-user.limited"), 5);
}

#[test]
fn a_leased_shadow_limit_counts_exactly_what_enforcement_would() {
    let store = FakeStore::new();
    let json = r#"{"rate_limits": {"trial": {"rate": "1/h", "burst": 1000, "mode": "shadow"}},
                   "routes": [{"name": "all", "rate_limits": ["trial"]}]}"#;
    let mut worker = Worker::new(json, &store);
    let mut last = None;
    for _ in 0..1_500 {
        let decision = worker.send(get("/"), T0, &store);
        assert_eq!(decision.verdict, Verdict::Continue);
        last = decision.stream.rate_limit;
    }
    assert!(worker.metric("seawall.rate_limit.trial.leases") > 0);
    assert_eq!(worker.metric("seawall.rate_limit.trial.allowed"), 1000);
    assert_eq!(
        worker.metric("seawall.rate_limit.trial.shadow_limited"),
        500
    );
    assert_eq!(last.map(|s| s.remaining), Some(0));
}

#[test]
fn a_failed_store_leaves_an_ended_lease_out_until_a_later_call_returns_it() {
    let json = r#"{"rate_limits": {"a": {"rate": "1/h", "burst": 1000, "failure_mode": "open"}},
                   "routes": [{"name": "all", "rate_limits": ["a"]}]}"#;
    let store = FakeStore::new();
    let mut worker = Worker::new(json, &store);
    for _ in 0..10 {
        assert!(worker.allowed(get("/"), T0, &store));
    }
    assert_eq!(worker.engine.leased_tokens_held(), 17);
    // The lease is a tick old; the CAS that would return it fails: failure mode open admits,
    // and the tokens stay out (stricter, never looser).
    store.fail_next(1, StoreError::Host(10));
    assert!(worker.allowed(get("/"), T0 + 100 * MS, &store));
    assert_eq!(worker.metric("seawall.rate_limit.a.store_errors"), 1);
    assert_eq!(
        worker.metric("seawall.rate_limit.a.failure_mode_applied"),
        1
    );
    assert_eq!(worker.engine.leased_tokens_held(), 17);
    assert_eq!(
        stored_tat(&store, "sw:seawall:rl:a:all"),
        T0 + 27 * HOUR_INTERVAL
    );
    // A failing tick keeps it too; the next tick returns it.
    store.fail_next(1, StoreError::Host(10));
    worker.tick(T0 + 150 * MS, &store, false);
    assert_eq!(worker.engine.leased_tokens_held(), 17);
    worker.tick(T0 + 250 * MS, &store, false);
    assert_eq!(worker.engine.leased_tokens_held(), 0);
    assert_eq!(
        worker.metric("seawall.rate_limit.a.lease_tokens_returned"),
        17
    );
    assert_eq!(
        stored_tat(&store, "sw:seawall:rl:a:all"),
        T0 + 10 * HOUR_INTERVAL
    );
}

/// Degradation's `rate_limit_factor` scales the bucket; a lease taken under one scale is returned,
/// not spent, under another, and returns exactly the arrival time it took.
#[test]
fn a_lease_taken_before_a_scale_change_goes_back_and_the_new_scale_decides() {
    let json = r#"{
        "rate_limits": {"api": {"rate": "1/h", "burst": 1000}},
        "degradation": {"payments": {
            "signals": {"probe": {"cluster": "health", "interval": "100ms", "timeout": "50ms", "unhealthy_after": 1}},
            "levels": [{"name": "degraded", "enter": {"probe": "unhealthy"}, "rate_limit_factor": 0.5}]}},
        "routes": [{"name": "api", "rate_limits": ["api"], "degradation": "payments"}]
    }"#;
    let store = FakeStore::new();
    let mut worker = Worker::new(json, &store);
    for _ in 0..10 {
        let status = worker.send(get("/"), T0, &store).stream.rate_limit.unwrap();
        assert_eq!(status.limit, 1000);
    }
    assert_eq!(worker.engine.leased_tokens_held(), 17);
    // A failed probe raises the level: the bucket is now 1 per 2 h, burst 500.
    for at in [T0, T0 + 100 * MS] {
        worker.engine.on_degradation_tick(
            1,
            Timestamp::from_nanos(at),
            &store,
            &worker.metrics,
            &mut |_, _| false,
        );
    }
    assert_eq!(worker.engine.degradation_level(0), Some(1));
    let now = T0 + 10 * MS;
    let status = worker
        .send(get("/"), now, &store)
        .stream
        .rate_limit
        .unwrap();
    assert_eq!(status.limit, 500, "decided under the new scale");
    assert_eq!(
        worker.metric("seawall.rate_limit.api.lease_tokens_returned"),
        17
    );
    // 10 tokens at 1 h, and this request at 2 h, plus whatever the new scale leased.
    let held = worker.engine.leased_tokens_held();
    assert_eq!(
        stored_tat(&store, "sw:seawall:rl:api:all"),
        T0 + 10 * HOUR_INTERVAL + (1 + held) * 2 * HOUR_INTERVAL
    );
    // The bucket showed 990 tokens of an hour, 495 of two hours: this request leaves 494.
    assert_eq!(status.remaining, 494);
}

/// One step of a randomized multi-worker schedule.
#[derive(Debug, Clone)]
struct Step {
    worker: usize,
    advance_us: u64,
    /// 0: the worker's tick; otherwise that many requests at once.
    requests: u32,
}

fn schedule(workers: usize, len: usize) -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        (0..workers, 0u64..15_000, 0u32..40).prop_map(|(worker, advance_us, requests)| Step {
            worker,
            advance_us,
            requests,
        }),
        1..len,
    )
}

/// Rates whose interval is a whole number of nanoseconds, so the bound is exact arithmetic.
const RATES: [u64; 8] = [100, 250, 500, 1_000, 2_000, 4_000, 5_000, 10_000];

fn limit_json(rate: u64, burst: u32) -> String {
    format!(
        r#"{{"rate_limits": {{"g": {{"rate": "{rate}/s", "burst": {burst}}}}},
            "routes": [{{"name": "all", "rate_limits": ["g"]}}]}}"#
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Several workers with leases interleave on one store, with a foreign worker racing some of
    /// their writes (CAS losses). Against the reference count of every admission:
    /// (a) up to any instant, admissions never exceed burst + rate × elapsed;
    /// (b) in any window [s, e], they exceed burst + rate × (e − s) by at most the tokens the
    /// workers held unspent in leases at s, which are at most workers × LEASE_MAX.
    #[test]
    fn leased_admissions_stay_within_the_stated_bound(
        rate_index in 0usize..RATES.len(),
        burst in 1u32..3_000,
        workers in 2usize..5,
        steps in schedule(4, 400),
        race_every in 2u64..7,
    ) {
        let rate = RATES[rate_index];
        let interval = SECOND / rate;
        let json = limit_json(rate, burst);
        let gcra = Gcra::new(Duration::from_nanos(interval), burst);
        let store = std::sync::Arc::new(FakeStore::new());
        let mut pool: Vec<Worker> = (0..workers).map(|_| Worker::new(&json, &store)).collect();
        let now = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(T0));
        let foreign = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        {
            let (now, foreign) = (now.clone(), foreign.clone());
            let mut writes = 0u64;
            store.interfere(move |store| {
                writes += 1;
                if writes.is_multiple_of(race_every) {
                    let at = now.load(std::sync::atomic::Ordering::SeqCst);
                    if let (Acquired::Allowed { .. }, _) = acquire(&gcra, store, "sw:seawall:rl:g:all", at) {
                        foreign.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            });
        }
        // Per step: its time, the tokens held unspent before it, and what it admitted.
        let mut times = Vec::new();
        let mut held_before = Vec::new();
        let mut admitted = Vec::new();
        let mut at = T0;
        for step in &steps {
            at += step.advance_us * 1_000;
            now.store(at, std::sync::atomic::Ordering::SeqCst);
            times.push(at);
            held_before.push(held(&pool));
            let before = foreign.load(std::sync::atomic::Ordering::SeqCst);
            let worker = &mut pool[step.worker % workers];
            let mut count = 0u64;
            if step.requests == 0 {
                worker.tick(at, &store, false);
            }
            for _ in 0..step.requests {
                count += u64::from(worker.allowed(get("/"), at, &store));
            }
            count += foreign.load(std::sync::atomic::Ordering::SeqCst) - before;
            admitted.push(count);
            prop_assert!(held(&pool) <= workers as u64 * u64::from(LEASE_MAX));
        }
        store.stop_interfering();
        let counted: i64 = pool.iter().map(|w| w.metric("seawall.rate_limit.g.allowed")).sum();
        prop_assert_eq!(
            counted as u64 + foreign.load(std::sync::atomic::Ordering::SeqCst),
            admitted.iter().sum::<u64>(),
            "every admission is counted"
        );
        let mut prefix = vec![0u64];
        for count in &admitted {
            prefix.push(prefix.last().unwrap() + count);
        }
        for s in 0..steps.len() {
            for e in s..steps.len() {
                let window = prefix[e + 1] - prefix[s];
                let bound = u64::from(burst) + (times[e] - times[s]) / interval;
                // (a): the bucket starts full and nothing is leased before the first step.
                if s == 0 {
                    prop_assert!(window <= bound, "{} admitted up to step {}, bound {}", window, e, bound);
                }
                // (b)
                prop_assert!(
                    window <= bound + held_before[s],
                    "{} admitted in steps {}..={}, bound {} + {} held",
                    window, s, e, bound, held_before[s]
                );
            }
        }
    }

    /// Workers decide with readings of the clock up to 200 ms older than the latest one behind
    /// the record (a worker descheduled between reading the clock and deciding), in real-time
    /// order of their CAS, leasing or not. Up to any step, admissions never exceed
    /// burst + rate × (latest reading − first reading): a reading's lag never mints a token.
    #[test]
    fn lagging_clock_readings_never_over_admit(
        rate_index in 0usize..RATES.len(),
        burst in 1u32..3_000,
        workers in 2usize..5,
        steps in schedule(4, 300),
        lags_ms in proptest::collection::vec(0u64..200, 300),
    ) {
        let rate = RATES[rate_index];
        let interval = SECOND / rate;
        let json = limit_json(rate, burst);
        let store = FakeStore::new();
        let mut pool: Vec<Worker> = (0..workers).map(|_| Worker::new(&json, &store)).collect();
        let first = T0 + 200 * MS;
        let mut latest = first;
        let mut admitted = 0u64;
        for (index, step) in steps.iter().enumerate() {
            latest += step.advance_us * 1_000;
            let reading = latest - lags_ms[index % lags_ms.len()] * MS;
            let worker = &mut pool[step.worker % workers];
            if step.requests == 0 {
                worker.tick(reading, &store, false);
            }
            for _ in 0..step.requests {
                admitted += u64::from(worker.allowed(get("/"), reading, &store));
            }
            // The first reading may itself lag `first` by up to 200 ms.
            let bound = u64::from(burst) + (latest - (first - 200 * MS)) / interval;
            prop_assert!(admitted <= bound, "{} admitted by step {}, bound {}", admitted, index, bound);
        }
    }

    /// (c) A bucket with a burst under 32 never leases: with several workers taking turns, every
    /// decision and every `RateLimit-Remaining` is what one shared GCRA gives, request by request,
    /// each request costs one read, and the `leases` counter stays 0.
    #[test]
    fn small_buckets_never_lease_and_decide_every_request_as_before(
        rate_index in 0usize..RATES.len(),
        burst in 1u32..32,
        workers in 1usize..5,
        steps in schedule(4, 300),
    ) {
        let rate = RATES[rate_index];
        let interval = SECOND / rate;
        let json = limit_json(rate, burst);
        let gcra = Gcra::new(Duration::from_nanos(interval), burst);
        let store = FakeStore::new();
        let mut pool: Vec<Worker> = (0..workers).map(|_| Worker::new(&json, &store)).collect();
        let mut tat = None;
        let mut at = T0;
        for step in &steps {
            at += step.advance_us * 1_000;
            let worker = &mut pool[step.worker % workers];
            if step.requests == 0 {
                let before = store.counts();
                worker.tick(at, &store, false);
                prop_assert_eq!(store.counts(), before, "a tick with no lease costs nothing");
            }
            for _ in 0..step.requests {
                let expected = gcra.decide(tat, at);
                let before = store.counts();
                let decision = worker.send(get("/"), at, &store);
                prop_assert_eq!(store.counts().gets - before.gets, 1);
                match expected {
                    GcraDecision::Allow { new_tat, remaining, full_in } => {
                        tat = Some(new_tat);
                        prop_assert_eq!(&decision.verdict, &Verdict::Continue);
                        let status = decision.stream.rate_limit.unwrap();
                        prop_assert_eq!((status.remaining, status.reset), (remaining, full_in));
                    }
                    GcraDecision::Deny { retry_in, .. } => {
                        let Verdict::Reply(reply) = &decision.verdict else {
                            return Err(TestCaseError::fail("refused by the reference, admitted"));
                        };
                        prop_assert_eq!(reply.retry_after, Some(retry_in));
                    }
                }
            }
        }
        for worker in &pool {
            prop_assert_eq!(worker.metric("seawall.rate_limit.g.leases"), 0);
            prop_assert_eq!(worker.engine.leased_tokens_held(), 0);
        }
    }
}

/// The window bound is tight, and so is its other side: a lease taken before a window and spent
/// in it adds to a full bucket's burst, and while it sits unspent another worker is refused.
#[test]
fn a_lease_spent_after_the_bucket_refilled_reaches_the_window_bound_and_no_more() {
    let store = FakeStore::new();
    // 10,000/s: one token every 100 µs.
    let json = limit_json(10_000, 1_000);
    let mut pool = [Worker::new(&json, &store), Worker::new(&json, &store)];
    for _ in 0..40 {
        assert!(pool[0].allowed(get("/"), T0, &store));
    }
    pool[0].tick(T0 + MS, &store, false);
    // Sized by the last tick's 40: one request leases 40 (1/16 of 1000 would allow 62).
    let t1 = T0 + 10 * MS;
    assert!(pool[0].allowed(get("/"), t1, &store));
    assert_eq!(held(&pool), 39);
    // 4 ms later shared data has refilled the 40 and is full; the lease is still fresh. At that
    // instant the other worker gets the whole burst, and is then refused while 39 tokens sit in
    // the first worker's lease.
    let s = t1 + 4 * MS;
    let other = (0..1_001)
        .filter(|_| pool[1].allowed(get("/"), s, &store))
        .count() as u64;
    assert_eq!(other, 1_000);
    assert_eq!(held(&pool), 39);
    let spent = (0..39)
        .filter(|_| pool[0].allowed(get("/"), s, &store))
        .count() as u64;
    assert_eq!(spent, 39);
    // In the window [s, s]: burst + rate × 0 + the 39 held at s, exactly the bound.
    assert_eq!(other + spent, 1_000 + 39);
    assert!(!pool[0].allowed(get("/"), s, &store));
    assert!(!pool[1].allowed(get("/"), s, &store));
}
