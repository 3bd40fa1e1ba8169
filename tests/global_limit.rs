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
use seawall::request::FakeRequest;
use seawall::state::fake::FakeStore;
use std::collections::HashMap;

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

/// Envoy's RLS with one fixed-window limit per descriptor, as Limitador counts a limit with
/// variables: an ask over what is left is refused and not counted.
struct FakeRls {
    limit: u32,
    window: u64,
    /// Per descriptor (its encoded bytes): hits used in its window, and when the window ends.
    counters: HashMap<Vec<u8>, (u32, u64)>,
    calls: u64,
    windows: u64,
    granted: u64,
    granted_to: HashMap<Vec<u8>, u64>,
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
            counters: HashMap::new(),
            calls: 0,
            windows: 0,
            granted: 0,
            granted_to: HashMap::new(),
            up: true,
        }
    }

    /// Hits granted to the descriptor whose entries are `entries`.
    fn granted_to(&self, entries: &[(&str, &str)]) -> u64 {
        let mut descriptor = Vec::new();
        for (key, value) in entries {
            descriptor.extend_from_slice(&[0x0a, (key.len() + value.len() + 4) as u8, 0x0a]);
            descriptor.push(key.len() as u8);
            descriptor.extend_from_slice(key.as_bytes());
            descriptor.push(0x12);
            descriptor.push(value.len() as u8);
            descriptor.extend_from_slice(value.as_bytes());
        }
        self.granted_to.get(&descriptor).copied().unwrap_or(0)
    }

    /// The encoded `RateLimitResponse`, or `None` when the service is down.
    fn answer(&mut self, message: &[u8], now: u64) -> Option<Vec<u8>> {
        if !self.up {
            return None;
        }
        self.calls += 1;
        // domain (1) and descriptors (2), each under 128 bytes here, then hits_addend (3).
        assert_eq!(message[0], 0x0a);
        let at = 2 + usize::from(message[1]);
        assert_eq!(message[at], 0x12);
        let end = at + 2 + usize::from(message[at + 1]);
        let descriptor = message[at + 2..end].to_vec();
        let at = end;
        assert_eq!(message[at], 0x18);
        let mut hits = 0u64;
        for (i, byte) in message[at + 1..].iter().enumerate() {
            hits |= u64::from(byte & 0x7f) << (7 * i);
        }
        let hits = u32::try_from(hits).unwrap();
        let (used, window_end) = self.counters.entry(descriptor.clone()).or_insert((0, 0));
        if now >= *window_end {
            *used = 0;
            *window_end = now + self.window;
            self.windows += 1;
        }
        let ok = *used + hits <= self.limit;
        if ok {
            *used += hits;
            self.granted += u64::from(hits);
            *self.granted_to.entry(descriptor).or_default() += u64::from(hits);
        }
        let (used, reset) = (*used, *window_end - now);
        let mut duration = vec![0x08];
        varint(&mut duration, reset / 1_000_000_000);
        duration.push(0x10);
        varint(&mut duration, reset % 1_000_000_000);
        let code = if ok { 1 } else { 2 };
        let mut status = vec![0x08, code, 0x18];
        varint(&mut status, u64::from(self.limit - used));
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
    /// How long after the tick sent a call its answer comes.
    rls_latency: u64,
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
            rls_latency: 5 * MS,
        }
    }

    fn request(&mut self, worker: usize, now: u64) -> bool {
        self.request_with(worker, get("/"), now)
    }

    fn request_with(&mut self, worker: usize, request: FakeRequest, now: u64) -> bool {
        self.requests += 1;
        let admitted = matches!(
            self.workers[worker].send(request, now, &self.store).verdict,
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
                    .push((worker, policy, claim, message, now + self.rls_latency));
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

/// The Envoy's clock steps back an hour; the RLS's does not. The lease record's "denied until
/// the window resets" and the bucket's "no credit until then", written under the later clock,
/// stopped every ask and every admission for the length of the step. A denial now waits at most
/// `LONGEST_WAIT` (60 s), and one stored further ahead than that is over.
#[test]
fn a_clock_step_back_stalls_no_global_limit() {
    let json = config(r#""closed""#);
    let mut envoy = Envoy::new(&json, 2);
    let later = T0 + 3_600_000 * MS;
    // Under the later clock the RLS's window of 100 is spent: it says over limit.
    let mut rls = FakeRls::new(100);
    flood(std::slice::from_mut(&mut envoy), &mut rls, later, 1, 10);
    assert!(
        rls.calls > 0 && envoy.admitted <= 100,
        "{} admitted",
        envoy.admitted
    );
    // An hour back. The RLS's windows go on by its own clock: a fresh window every second.
    let mut rls = FakeRls::new(100);
    let before = envoy.admitted;
    flood(std::slice::from_mut(&mut envoy), &mut rls, T0, 3, 10);
    let after_step = envoy.admitted - before;
    assert!(
        after_step >= 200,
        "{after_step} admitted in the 3 s after the step, with 100 a second granted"
    );
}

/// An RLS that says "over limit, resets in an hour" is asked again after `LONGEST_WAIT` (60 s),
/// once, and not before: still refused, the bucket waits another minute.
#[test]
fn a_long_reset_is_asked_about_again_after_a_minute() {
    let json = config(r#""closed""#);
    let mut envoy = Envoy::new(&json, 2);
    let mut rls = FakeRls::new(100);
    rls.window = 3_600_000 * MS;
    flood(std::slice::from_mut(&mut envoy), &mut rls, T0, 2, 2);
    let denied_at = rls.calls;
    assert_eq!(envoy.admitted, 100, "the hour's window of 100, no more");
    flood(
        std::slice::from_mut(&mut envoy),
        &mut rls,
        T0 + 2_000 * MS,
        58,
        1,
    );
    assert_eq!(rls.calls, denied_at, "no ask within the minute");
    flood(
        std::slice::from_mut(&mut envoy),
        &mut rls,
        T0 + 60_000 * MS,
        4,
        1,
    );
    assert_eq!(rls.calls, denied_at + 1, "one ask a minute on");
    assert_eq!(envoy.admitted, 100, "and it is refused");
}

/// A client's activity recorded under a clock that has since stepped back an hour keeps its
/// slot from no other client for the step.
#[test]
fn a_slot_active_under_a_later_clock_comes_free_after_a_step_back() {
    let json = per_client_config(r#""max_keys": 1,"#, r#""closed""#);
    let mut envoy = Envoy::new(&json, 1);
    let mut rls = FakeRls::new(1_000);
    let later = T0 + 3_600_000 * MS;
    for n in 0..10 {
        envoy.request_with(0, as_user("dave", "/x"), later + n * 20 * MS);
        envoy.tick(later + n * 20 * MS, &mut rls);
    }
    // An hour back, and dave is gone: erin's requests are admitted 2 s later, as after any
    // client's 2 s of quiet, not an hour later.
    let mut rls = FakeRls::new(1_000);
    let mut now = T0 + 2_100 * MS;
    assert!(envoy.request_with(0, as_user("erin", "/x"), now));
    for _ in 0..10 {
        envoy.tick(now, &mut rls);
        now += 20 * MS;
        assert!(envoy.request_with(0, as_user("erin", "/x"), now));
    }
}

fn per_client_config(extra: &str, failure_mode: &str) -> String {
    format!(
        r#"{{
        "rate_limits": {{"per-user": {{{extra} "source": {{"global": {{
            "domain": "edge", "cluster": "rls", "timeout": "100ms",
            "descriptor": [{{"key": "generic_key", "value": "api"}},
                           {{"key": "user", "from": {{"header": "x-user"}}}},
                           {{"key": "path", "from": "path"}}],
            "failure_mode": {failure_mode},
            "lease": {{"min_hits": 2, "max_hits": 200, "lookahead": "250ms"}}}}}}}}}},
        "routes": [{{"name": "all", "rate_limits": ["per-user"]}}]
    }}"#
    )
}

fn as_user(user: &str, path: &str) -> FakeRequest {
    get(path).header("x-user", user)
}

/// Issue 19: descriptors with entries from seawall's key parts. Two Envoys share each client's
/// global limit and keep clients apart: a flooding client gets its own limit, and a quiet one
/// all its requests; the RLS sees each client's values, normalised as the key parts say.
#[test]
fn per_client_descriptors_give_each_client_its_own_global_limit() {
    let json = per_client_config("", r#""closed""#);
    let mut envoys: Vec<Envoy> = (0..2).map(|_| Envoy::new(&json, 2)).collect();
    let mut rls = FakeRls::new(50);
    let (mut alice, mut bob, mut bob_sent) = (0u64, 0u64, 0u64);
    let mut now = T0;
    // 10 s: alice sends 10 requests per worker per 20 ms (2,000/s against 50/s); bob one per
    // Envoy every 100 ms (20/s, under his 50/s), on another spelling of the same path.
    while now < T0 + 10_000 * MS {
        for envoy in envoys.iter_mut() {
            for worker in 0..2 {
                for _ in 0..10 {
                    alice += u64::from(envoy.request_with(worker, as_user("alice", "/api"), now));
                }
            }
            if ((now - T0) / MS).is_multiple_of(100) {
                bob_sent += 1;
                bob += u64::from(envoy.request_with(1, as_user("bob", "/API//"), now));
            }
            envoy.tick(now, &mut rls);
        }
        now += 20 * MS;
    }
    let alice_granted =
        rls.granted_to(&[("generic_key", "api"), ("user", "alice"), ("path", "/api")]);
    let bob_granted = rls.granted_to(&[("generic_key", "api"), ("user", "bob"), ("path", "/api/")]);
    eprintln!(
        "alice {alice} admitted, {alice_granted} granted; bob {bob} of {bob_sent}, {bob_granted} granted; {} calls",
        rls.calls
    );
    // Alice: ten windows of 50, and no more than the RLS granted her (the credit a cold bucket
    // admits on is asked for with its next lease, so it is among the granted hits).
    assert!(
        alice <= alice_granted && alice_granted <= 500,
        "alice {alice} of {alice_granted}"
    );
    assert!(alice >= 450, "alice only {alice} of her 500");
    // Bob: every request, whatever alice does, each counted at the RLS under his own values.
    assert_eq!(bob, bob_sent, "bob refused while under his limit");
    assert!(
        bob_granted >= bob,
        "bob {bob} admitted, {bob_granted} granted"
    );
    assert!(rls.calls < 400, "{} RLS calls", rls.calls);
}

/// A client's first request does not wait for a lease: it is admitted on credit (up to
/// `min_hits`), and the next lease asks for it too. Once the RLS says the client is over its
/// limit, nothing more is admitted on credit until its window ends.
#[test]
fn a_cold_client_is_admitted_on_credit_that_the_next_lease_pays() {
    let json = per_client_config("", r#""closed""#);
    let mut envoy = Envoy::new(&json, 2);
    let mut rls = FakeRls::new(5);
    rls.window = 60_000 * MS;
    // Two requests before any tick: both on credit (min_hits 2); the third waits for a lease.
    assert!(envoy.request_with(0, as_user("carol", "/x"), T0));
    assert!(envoy.request_with(1, as_user("carol", "/x"), T0));
    assert!(!envoy.request_with(0, as_user("carol", "/x"), T0));
    envoy.tick(T0 + 20 * MS, &mut rls);
    // The lease asked for the next lease and the 2 owed: the RLS counted all of them.
    let granted = rls.granted_to(&[("generic_key", "api"), ("user", "carol"), ("path", "/x")]);
    assert!(granted >= 3, "{granted} granted");
    let mut admitted = 2;
    let mut at = T0 + 40 * MS;
    for _ in 0..50 {
        admitted += u64::from(envoy.request_with(0, as_user("carol", "/x"), at));
        envoy.tick(at, &mut rls);
        at += 20 * MS;
    }
    // 5 in the window: what was granted, credit included, and nothing beyond.
    assert_eq!(admitted, 5, "{admitted} admitted in a window of 5");
    assert_eq!(
        rls.granted_to(&[("generic_key", "api"), ("user", "carol"), ("path", "/x")]),
        5
    );
}

/// A steady client well under its limit, 5 a second, is never refused while the RLS answers
/// within two of its intervals. Its leases are the minimum, 2 hits; the lease was asked for only
/// once the bucket was empty, which left the RLS one interval (200 ms), and with an RLS 250 ms
/// away every other request was refused. It is now asked for with one token in hand.
#[test]
fn a_steady_client_under_its_limit_is_not_refused_while_its_lease_is_on_the_way() {
    let json = per_client_config("", r#""closed""#);
    let mut envoy = Envoy::new(&json, 1);
    envoy.rls_latency = 250 * MS;
    let mut rls = FakeRls::new(1_000);
    let mut now = T0;
    let mut refused = Vec::new();
    for n in 0..4_000 / 20 {
        if n % 10 == 0 && !envoy.request_with(0, as_user("bob", "/x"), now) {
            refused.push((now - T0) / MS);
        }
        envoy.tick(now, &mut rls);
        now += 20 * MS;
    }
    assert_eq!(envoy.requests, 20);
    assert!(refused.is_empty(), "bob refused at {refused:?} ms");
    let granted = rls.granted_to(&[("generic_key", "api"), ("user", "bob"), ("path", "/x")]);
    assert!(
        granted >= envoy.admitted,
        "{} admitted, {granted} granted",
        envoy.admitted
    );
}

/// A slot held by an active client is not taken by another (its tokens and its RLS counter are
/// that client's): the newcomer gets the failure mode, counted as `slots_busy`. Once the holder
/// has been idle for 2 s the slot is the newcomer's.
#[test]
fn a_busy_slot_is_never_shared_between_clients() {
    let json = per_client_config(r#""max_keys": 1,"#, r#""closed""#);
    let mut envoy = Envoy::new(&json, 1);
    let mut rls = FakeRls::new(1_000);
    let mut now = T0;
    for _ in 0..10 {
        envoy.request_with(0, as_user("dave", "/x"), now);
        envoy.tick(now, &mut rls);
        now += 20 * MS;
    }
    assert!(envoy.request_with(0, as_user("dave", "/x"), now));
    assert!(
        !envoy.request_with(0, as_user("erin", "/x"), now),
        "erin took dave's slot"
    );
    assert_eq!(envoy.counter("seawall.rate_limit.per-user.slots_busy"), 1);
    // Dave idle for over 2 s: erin's now, on credit at once, and her own leases after.
    now += 2_100 * MS;
    assert!(envoy.request_with(0, as_user("erin", "/x"), now));
    for _ in 0..10 {
        envoy.tick(now, &mut rls);
        now += 20 * MS;
        assert!(envoy.request_with(0, as_user("erin", "/x"), now));
    }
    let erin = rls.granted_to(&[("generic_key", "api"), ("user", "erin"), ("path", "/x")]);
    assert!(
        erin >= 11,
        "erin's requests were charged elsewhere: {erin} granted to her"
    );
    // Dave's leftover tokens were not spent by erin: dave's counter holds only dave's asks.
    assert!(
        !envoy.request_with(0, as_user("dave", "/x"), now),
        "dave took erin's slot"
    );
}

/// `on_missing_key`: `skip` lets a request without the header through, unlimited and counted as
/// `exempt`; the default sends the value as empty, so all such requests share one client.
#[test]
fn a_missing_or_overlong_value_is_skipped_or_shared_as_empty() {
    let skip = per_client_config(r#""on_missing_key": "skip","#, r#""closed""#);
    let mut envoy = Envoy::new(&skip, 1);
    for i in 0..100 {
        assert!(envoy.request_with(0, get("/x"), T0 + i));
    }
    let long = "a".repeat(200);
    assert!(envoy.request_with(0, as_user(&long, "/x"), T0));
    assert_eq!(envoy.counter("seawall.rate_limit.per-user.exempt"), 101);

    let shared = per_client_config("", r#""closed""#);
    let mut envoy = Envoy::new(&shared, 1);
    let mut rls = FakeRls::new(3);
    rls.window = 60_000 * MS;
    let mut admitted = 0;
    let mut now = T0;
    for i in 0..60 {
        // Without the header, and with an over-long one: the same client, "user" empty.
        let request = if i % 2 == 0 {
            get("/x")
        } else {
            as_user(&long, "/x")
        };
        admitted += u64::from(envoy.request_with(0, request, now));
        envoy.tick(now, &mut rls);
        now += 20 * MS;
    }
    assert_eq!(admitted, 3);
    assert_eq!(
        rls.granted_to(&[("generic_key", "api"), ("user", ""), ("path", "/x")]),
        3
    );
}

#[test]
fn per_client_descriptor_errors_name_their_path() {
    for (descriptor, path, expected) in [
        (
            r#"[{"key": "user", "value": "a", "from": "client_ip"}]"#,
            "descriptor[0]",
            "exactly one of",
        ),
        (r#"[{"key": "user"}]"#, "descriptor[0]", "exactly one of"),
        (
            r#"[{"key": "user", "from": {"header": "bad header"}}]"#,
            "descriptor[0].header",
            "header name",
        ),
        (
            r#"[{"key": "", "from": "client_ip"}]"#,
            "descriptor[0].key",
            "non-empty",
        ),
    ] {
        let json = format!(
            r#"{{"rate_limits": {{"g": {{"source": {{"global": {{"domain": "d", "cluster": "rls", "descriptor": {descriptor}}}}}}}}}}}"#
        );
        let errors = compile(json.as_bytes()).unwrap_err().to_string();
        assert!(
            errors.contains(&format!("rate_limits.g.source.global.{path}"))
                && errors.contains(expected),
            "{descriptor}: {errors}"
        );
    }
    let json = r#"{"rate_limits": {"g": {"key": ["client_ip"], "max_keys": 5,
        "source": {"global": {"domain": "d", "cluster": "rls"}}}}}"#;
    let errors = compile(json.as_bytes()).unwrap_err().to_string();
    assert!(
        errors.contains("rate_limits.g.key") && errors.contains("\"from\""),
        "{errors}"
    );
    assert!(errors.contains("rate_limits.g.max_keys"), "{errors}");
}
