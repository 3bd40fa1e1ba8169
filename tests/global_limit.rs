//! Global limits through the whole core: config, engine, shared store, and a fake RLS with fixed
//! windows (as Limitador and envoyproxy/ratelimit count). Several Envoys are several fake stores,
//! each with several workers; calls are answered a few milliseconds after the tick sent them.

// A test crate: a failed unwrap is how it reports a failed expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

use seawall::clock::Timestamp;
use seawall::config::compile;
use seawall::engine::{GlobalCall, Verdict};
use seawall::policy::global_limit::Claim;
use seawall::state::fake::FakeStore;

mod common;

use common::{get, Worker};

const MS: u64 = 1_000_000;
const T0: u64 = 1_800_000_000_000 * MS;

fn config(failure_mode: &str) -> String {
    format!(
        r#"{{
        "rate_limits": {{"global": {{"source": {{"global": {{
            "domain": "edge", "cluster": "rls", "timeout": "100ms",
            "failure_mode": {failure_mode},
            "lease": {{"min_hits": 5, "max_hits": 200, "lookahead": "250ms"}}}}}}}}}},
        "routes": [{{"name": "all", "rate_limits": ["global"]}}]
    }}"#
    )
}

/// Envoy's RLS with one fixed-window limit, as Limitador counts: an ask over what is left is
/// refused and not counted.
struct FakeRls {
    limit: u32,
    window: u64,
    used: u32,
    window_end: u64,
    calls: u64,
    windows: u64,
    granted: u64,
    up: bool,
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

impl FakeRls {
    fn new(limit: u32) -> Self {
        FakeRls {
            limit,
            window: 1_000 * MS,
            used: 0,
            window_end: 0,
            calls: 0,
            windows: 0,
            granted: 0,
            up: true,
        }
    }

    /// The encoded `RateLimitResponse`, or `None` when the service is down.
    fn answer(&mut self, message: &[u8], now: u64) -> Option<Vec<u8>> {
        if !self.up {
            return None;
        }
        self.calls += 1;
        // domain (1) and descriptors (2), each under 128 bytes here, then hits_addend (3).
        let mut at = 0;
        for tag in [0x0a, 0x12] {
            assert_eq!(message[at], tag);
            at += 2 + usize::from(message[at + 1]);
        }
        assert_eq!(message[at], 0x18);
        let mut hits = 0u64;
        for (i, byte) in message[at + 1..].iter().enumerate() {
            hits |= u64::from(byte & 0x7f) << (7 * i);
        }
        let hits = u32::try_from(hits).unwrap();
        if now >= self.window_end {
            self.used = 0;
            self.window_end = now + self.window;
            self.windows += 1;
        }
        let ok = self.used + hits <= self.limit;
        if ok {
            self.used += hits;
            self.granted += u64::from(hits);
        }
        let reset = self.window_end - now;
        let mut duration = vec![0x08];
        varint(&mut duration, reset / 1_000_000_000);
        duration.push(0x10);
        varint(&mut duration, reset % 1_000_000_000);
        let code = if ok { 1 } else { 2 };
        let mut status = vec![0x08, code, 0x18];
        varint(&mut status, u64::from(self.limit - self.used));
        status.push(0x22);
        varint(&mut status, duration.len() as u64);
        status.extend_from_slice(&duration);
        let mut response = vec![0x08, code, 0x12];
        varint(&mut response, status.len() as u64);
        response.extend_from_slice(&status);
        Some(response)
    }
}

/// One Envoy: its shared data and its workers.
struct Envoy {
    store: FakeStore,
    workers: Vec<Worker>,
    /// Calls sent and not answered: worker, policy, claim, message, when the answer comes.
    in_flight: Vec<(usize, usize, Claim, Vec<u8>, u64)>,
    admitted: u64,
    requests: u64,
}

impl Envoy {
    fn new(json: &str, workers: usize) -> Self {
        let store = FakeStore::new();
        let workers = (0..workers).map(|_| Worker::new(json, &store)).collect();
        Envoy {
            store,
            workers,
            in_flight: Vec::new(),
            admitted: 0,
            requests: 0,
        }
    }

    fn request(&mut self, worker: usize, now: u64) -> bool {
        self.requests += 1;
        let admitted = matches!(
            self.workers[worker]
                .send(get("/"), now, &self.store)
                .verdict,
            Verdict::Continue
        );
        self.admitted += u64::from(admitted);
        admitted
    }

    /// Every worker's tick at `now`, then the answers that are due.
    fn tick(&mut self, now: u64, rls: &mut FakeRls) {
        for (index, worker) in self.workers.iter().enumerate() {
            let mut sent = Vec::new();
            worker.engine.on_global_tick(
                index as u64 + 1,
                Timestamp::from_nanos(now),
                &self.store,
                &worker.metrics,
                &mut |call: GlobalCall<'_>| {
                    assert_eq!(call.cluster, "rls");
                    sent.push((index, call.policy, call.claim, call.message));
                    true
                },
            );
            for (worker, policy, claim, message) in sent {
                self.in_flight
                    .push((worker, policy, claim, message, now + 5 * MS));
            }
        }
        let (due, waiting): (Vec<_>, Vec<_>) = self
            .in_flight
            .drain(..)
            .partition(|(.., at)| *at <= now + 20 * MS);
        self.in_flight = waiting;
        for (index, policy, claim, message, at) in due {
            let answer = rls.answer(&message, at);
            let worker = &self.workers[index];
            worker.engine.on_global_answer(
                policy,
                index as u64 + 1,
                claim,
                answer.as_deref(),
                Timestamp::from_nanos(at),
                &self.store,
                &worker.metrics,
            );
        }
    }

    fn counter(&self, name: &str) -> i64 {
        self.workers.iter().map(|w| w.counter(name)).sum()
    }
}

/// Floods `envoys` for `seconds`: every 20 ms each worker sees `per_tick` requests, then ticks.
fn flood(envoys: &mut [Envoy], rls: &mut FakeRls, from: u64, seconds: u64, per_tick: usize) {
    let mut now = from;
    while now < from + seconds * 1_000 * MS {
        for envoy in envoys.iter_mut() {
            for worker in 0..envoy.workers.len() {
                for _ in 0..per_tick {
                    envoy.request(worker, now);
                }
            }
            envoy.tick(now, rls);
        }
        now += 20 * MS;
    }
}

#[test]
fn three_envoys_share_one_global_limit_and_rarely_ask_the_rls() {
    let json = config(r#""closed""#);
    let mut envoys: Vec<Envoy> = (0..3).map(|_| Envoy::new(&json, 2)).collect();
    let mut rls = FakeRls::new(100);
    // 3 Envoys × 2 workers × 10 requests per 20 ms: 3,000 requests a second against 100/s.
    flood(&mut envoys, &mut rls, T0, 10, 10);
    let admitted: u64 = envoys.iter().map(|e| e.admitted).sum();
    let requests: u64 = envoys.iter().map(|e| e.requests).sum();
    // Ten windows of 100; the RLS granted at most that, and nearly all of it was spent.
    eprintln!(
        "{admitted} admitted of {requests}; the RLS granted {} in {} windows, {} calls",
        rls.granted, rls.windows, rls.calls
    );
    assert!(
        admitted <= 1_000,
        "{admitted} admitted, over the RLS's 1,000"
    );
    assert!(admitted >= 950, "only {admitted} of 1,000 admitted");
    let ratio = rls.calls as f64 / requests as f64;
    assert!(
        ratio < 0.01,
        "{} RLS calls for {requests} requests",
        rls.calls
    );
    let granted: i64 = envoys
        .iter()
        .map(|e| e.counter("seawall.rate_limit.global.leased_hits"))
        .sum();
    assert!(
        granted as u64 >= admitted && granted <= 1_000,
        "{granted} hits granted"
    );
}

#[test]
fn one_envoy_restarting_does_not_reset_the_global_limit() {
    let json = config(r#""closed""#);
    let mut envoys: Vec<Envoy> = (0..3).map(|_| Envoy::new(&json, 2)).collect();
    let mut rls = FakeRls::new(100);
    rls.window = 10_000 * MS;
    flood(&mut envoys, &mut rls, T0, 2, 10);
    // A restarted Envoy has empty shared data; the RLS still counts the window.
    let before: u64 = envoys.iter().map(|e| e.admitted).sum();
    let gone = envoys[0].admitted;
    envoys[0] = Envoy::new(&json, 2);
    flood(&mut envoys, &mut rls, T0 + 2_000 * MS, 2, 10);
    let after = gone + envoys.iter().map(|e| e.admitted).sum::<u64>();
    // It asked, with empty shared data, and the RLS said the window is spent.
    assert!(envoys[0].counter("seawall.rate_limit.global.leases_denied") >= 1);
    assert_eq!(envoys[0].admitted, 0);
    assert!(before >= 95, "{before}");
    assert!(
        after <= 100,
        "{after} admitted in one 100-hit window across a restart"
    );
}

#[test]
fn while_the_rls_is_down_the_failure_mode_applies_once_the_bucket_is_spent() {
    for (mode, expected) in [
        (r#""open""#, (1_000, 1_000)),
        (r#""closed""#, (0, 0)),
        // 20/s for this Envoy (its burst of 5 was spent in the seconds before).
        (r#"{"fallback": {"rate": "20/s", "burst": 5}}"#, (19, 21)),
    ] {
        let json = config(mode);
        let mut envoy = Envoy::new(&json, 2);
        let mut rls = FakeRls::new(100);
        flood(std::slice::from_mut(&mut envoy), &mut rls, T0, 1, 10);
        rls.up = false;
        // Let the granted tokens run out and a call fail.
        flood(
            std::slice::from_mut(&mut envoy),
            &mut rls,
            T0 + 1_000 * MS,
            2,
            10,
        );
        let before = envoy.admitted;
        flood(
            std::slice::from_mut(&mut envoy),
            &mut rls,
            T0 + 3_000 * MS,
            1,
            10,
        );
        let during = envoy.admitted - before;
        assert!(
            (expected.0..=expected.1).contains(&during),
            "{mode}: {during} admitted in 1 s of 1,000 requests with the RLS down"
        );
        assert!(envoy.counter("seawall.rate_limit.global.rls_errors") >= 1);
        // The RLS comes back: leases resume and the failure mode no longer applies.
        rls.up = true;
        flood(
            std::slice::from_mut(&mut envoy),
            &mut rls,
            T0 + 4_000 * MS,
            2,
            10,
        );
        let before = envoy.admitted;
        flood(
            std::slice::from_mut(&mut envoy),
            &mut rls,
            T0 + 6_000 * MS,
            1,
            10,
        );
        let back = envoy.admitted - before;
        assert!(
            (90..=100).contains(&back),
            "{mode}: {back} admitted once it was back"
        );
    }
}

#[test]
fn a_call_that_cannot_be_sent_counts_as_an_rls_failure() {
    let json = config(r#""closed""#);
    let store = FakeStore::new();
    let mut worker = Worker::new(&json, &store);
    // A request finds the bucket empty: the demand that asks for a lease.
    let refused = worker.send(get("/"), T0, &store);
    assert!(!matches!(refused.verdict, Verdict::Continue));
    let mut calls = 0;
    worker.engine.on_global_tick(
        1,
        Timestamp::from_nanos(T0),
        &store,
        &worker.metrics,
        &mut |_| {
            calls += 1;
            false
        },
    );
    assert_eq!(calls, 1);
    assert_eq!(worker.counter("seawall.rate_limit.global.rls_errors"), 1);
    // Backing off: no new call on the next tick.
    worker.engine.on_global_tick(
        1,
        Timestamp::from_nanos(T0 + 20 * MS),
        &store,
        &worker.metrics,
        &mut |_| {
            calls += 1;
            true
        },
    );
    assert_eq!(calls, 1);
}

#[test]
fn global_config_errors_name_their_path() {
    let cases = [
        (
            r#"{"rate_limits": {"g": {"rate": "10/s", "source": {"global": {"domain": "d", "cluster": "rls"}}}}}"#,
            "rate_limits.g.rate: not available with a global source",
        ),
        (
            r#"{"rate_limits": {"g": {"key": ["client_ip"], "source": {"global": {"domain": "d", "cluster": "rls"}}}}}"#,
            "rate_limits.g.key: not available with a global source",
        ),
        (
            r#"{"rate_limits": {"g": {"source": {"global": {"domain": "d", "cluster": "rls", "timeout": "10s"}}}}}"#,
            "rate_limits.g.source.global.timeout: expected a timeout from 1ms to 5s",
        ),
        (
            r#"{"rate_limits": {"g": {"source": {"global": {"domain": "d", "cluster": "rls", "lease": {"min_hits": 10, "max_hits": 5}}}}}}"#,
            "rate_limits.g.source.global.lease.max_hits: expected min_hits (10) to",
        ),
        (
            r#"{"rate_limits": {"g": {"source": {"global": {"domain": "d", "cluster": "rls", "failure_mode": {"fallback": {"rate": "fast"}}}}}}}"#,
            "rate_limits.g.source.global.failure_mode.fallback.rate",
        ),
        (
            r#"{"rate_limits": {"g": {"source": {"global": {"domain": "d", "clustr": "rls"}}}}}"#,
            "rate_limits.g.source.global",
        ),
        (
            r#"{"rate_limits": {"g": {"burst": 3}}}"#,
            "rate_limits.g.rate: expected a rate",
        ),
    ];
    for (json, expected) in cases {
        let error = compile(json.as_bytes()).unwrap_err().to_string();
        assert!(error.contains(expected), "{json}\n{error}");
    }
    let ok = r#"{"rate_limits": {"g": {"source": {"global": {"domain": "d", "cluster": "rls",
        "descriptor": [{"key": "generic_key", "value": "checkout"}, {"key": "tier", "value": "free"}],
        "failure_mode": {"fallback": {"rate": "50/s", "burst": 10}}}}}}}"#;
    compile(ok.as_bytes()).unwrap();
    compile(br#"{"rate_limits": {"g": {"rate": "1/s", "source": "local"}}}"#).unwrap();
}
