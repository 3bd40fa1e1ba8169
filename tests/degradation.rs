//! Health-aware degradation through the core with a fake clock: level transitions (including
//! flapping inputs), probe verdicts, the lease and the probe schedule across interleaved workers,
//! and each level action on requests.

// A test crate: a failed unwrap is how it reports a failed expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

use seawall::clock::Timestamp;
use seawall::engine::{Reroute, Verdict, DEGRADED_HEADER};
use seawall::policy::circuit_breaker::ResponseFacts;
use seawall::policy::degradation::{
    claim, next_level, throttle_ppm, Conditions, Evidence, Lease, LevelRules, ProbeHealth,
    ProbeThresholds, Signals, Tally,
};
use seawall::request::FakeRequest;
use seawall::state::fake::FakeStore;

mod common;

use common::{get, Worker};

const MS: u64 = 1_000_000;
const SECOND: u64 = 1_000 * MS;
const T0: u64 = 1_800_000_000 * SECOND;

const EVIDENCE: Evidence = Evidence {
    min_requests: 20,
    percentile_ppm: 950_000,
};

/// Two levels: degraded on a 20% failure rate (leaving at 10%), critical on an unhealthy probe.
fn two_levels() -> [LevelRules; 2] {
    let degraded = Conditions {
        failure_rate_ppm: Some(200_000),
        ..Conditions::default()
    };
    let critical = Conditions {
        probe_unhealthy: true,
        ..Conditions::default()
    };
    [
        LevelRules {
            enter: degraded,
            exit: Conditions {
                failure_rate_ppm: Some(100_000),
                ..degraded
            },
            min_dwell_nanos: 10 * SECOND,
        },
        LevelRules {
            enter: critical,
            exit: critical,
            min_dwell_nanos: 10 * SECOND,
        },
    ]
}

fn window(requests: u32, failures: u32) -> Signals {
    Signals {
        window: Tally {
            requests,
            failures,
            slower: [0; 4],
        },
        ..Signals::default()
    }
}

const UNHEALTHY: ProbeHealth = ProbeHealth::Unhealthy {
    successes_in_a_row: 0,
};

#[test]
fn levels_rise_at_once_and_step_down_one_at_a_time_after_their_dwell() {
    let levels = two_levels();
    let next = |current, since, now, signals: &Signals| {
        next_level(current, since, now, &levels, &EVIDENCE, signals)
    };
    // 25% failures: degraded at once.
    assert_eq!(next(0, T0, T0, &window(100, 25)), Some(1));
    // An unhealthy probe goes straight to critical, skipping degraded.
    let sick = Signals {
        probe: UNHEALTHY,
        ..window(100, 0)
    };
    assert_eq!(next(0, T0, T0, &sick), Some(2));
    // Recovered at once, but critical holds for its 10 s dwell...
    assert_eq!(next(2, T0, T0 + 9 * SECOND, &window(100, 0)), None);
    // ...then steps down one level only...
    assert_eq!(next(2, T0, T0 + 10 * SECOND, &window(100, 0)), Some(1));
    // ...and degraded dwells again before normal.
    let stepped = T0 + 10 * SECOND;
    assert_eq!(
        next(1, stepped, stepped + 5 * SECOND, &window(100, 0)),
        None
    );
    assert_eq!(
        next(1, stepped, stepped + 10 * SECOND, &window(100, 0)),
        Some(0)
    );
    // Between the exit (10%) and enter (20%) thresholds the level holds, however long.
    assert_eq!(next(1, T0, T0 + 3600 * SECOND, &window(100, 15)), None);
    // Escalation ignores the dwell: degraded a moment ago, critical now.
    assert_eq!(next(1, T0, T0 + 1, &sick), Some(2));
}

#[test]
fn flapping_signals_do_not_make_the_level_flap() {
    let levels = two_levels();
    // The failure rate flips between 25% and 15% every 100 ms for ten minutes: between the
    // thresholds, so one transition in all.
    let (mut level, mut since, mut transitions) = (0u8, T0, 0);
    for step in 0..6_000u64 {
        let now = T0 + step * 100 * MS;
        let failures = if step % 2 == 0 { 25 } else { 15 };
        if let Some(to) = next_level(
            level,
            since,
            now,
            &levels,
            &EVIDENCE,
            &window(100, failures),
        ) {
            (level, since, transitions) = (to, now, transitions + 1);
        }
    }
    assert_eq!((level, transitions), (1, 1));

    // Now it flips between 25% and 5% (clear of both thresholds): each exit must wait the 10 s
    // dwell, so at most one round trip per 10 s.
    let (mut level, mut since, mut transitions) = (0u8, T0, 0);
    let mut dwells = Vec::new();
    for step in 0..6_000u64 {
        let now = T0 + step * 100 * MS;
        let failures = if step % 2 == 0 { 25 } else { 5 };
        if let Some(to) = next_level(
            level,
            since,
            now,
            &levels,
            &EVIDENCE,
            &window(100, failures),
        ) {
            if to < level {
                dwells.push(now - since);
            }
            (level, since, transitions) = (to, now, transitions + 1);
        }
    }
    assert!(transitions <= 2 * 60 + 1, "{transitions} transitions");
    assert!(dwells.iter().all(|&d| d >= 10 * SECOND), "{dwells:?}");
}

#[test]
fn too_few_requests_say_nothing_about_rates_or_latency() {
    let levels = two_levels();
    // 19 requests, all failed: below min_requests, no evidence.
    assert_eq!(
        next_level(0, T0, T0, &levels, &EVIDENCE, &window(19, 19)),
        None
    );
    // While degraded, a window with no traffic (everything shed) meets the exit condition.
    assert_eq!(
        next_level(1, T0, T0 + 10 * SECOND, &levels, &EVIDENCE, &window(0, 0)),
        Some(0)
    );
    // p95 above 800 ms means more than 5% of calls slower than 800 ms: 6 of 100 is, 5 is not.
    let latency = [LevelRules {
        enter: Conditions {
            latency: Some(0),
            ..Conditions::default()
        },
        exit: Conditions {
            latency: Some(0),
            ..Conditions::default()
        },
        min_dwell_nanos: 0,
    }];
    let slow = |slower| Signals {
        window: Tally {
            requests: 100,
            failures: 0,
            slower: [slower, 0, 0, 0],
        },
        ..Signals::default()
    };
    assert_eq!(
        next_level(0, T0, T0, &latency, &EVIDENCE, &slow(6)),
        Some(1)
    );
    assert_eq!(next_level(0, T0, T0, &latency, &EVIDENCE, &slow(5)), None);
}

#[test]
fn probe_verdicts_flip_only_after_their_streaks() {
    let thresholds = ProbeThresholds {
        healthy_after: 2,
        unhealthy_after: 3,
    };
    let mut health = seawall::policy::degradation::Health::default();
    let mut verdicts = Vec::new();
    for result in [
        true, true, false, false, true, false, false, false, true, true,
    ] {
        health = health.with_probe_result(result, thresholds);
        verdicts.push(match health.probe {
            ProbeHealth::Unknown => 'u',
            ProbeHealth::Healthy { .. } => 'h',
            ProbeHealth::Unhealthy { .. } => 'x',
        });
    }
    // Healthy after two successes; two failures and a success do not flip it; three failures in
    // a row do; two successes bring it back.
    assert_eq!(verdicts.iter().collect::<String>(), "uhhhhhhxxh");
}

#[test]
fn a_lease_is_renewed_by_its_holder_and_taken_over_only_when_it_lapses() {
    let held = Lease {
        holder: 7,
        until: T0 + SECOND,
    };
    assert_eq!(claim(held, 9, T0, SECOND), None);
    assert_eq!(
        claim(held, 7, T0, SECOND),
        Some(Lease {
            holder: 7,
            until: T0 + SECOND
        })
    );
    assert_eq!(
        claim(held, 9, T0 + SECOND, SECOND),
        Some(Lease {
            holder: 9,
            until: T0 + 2 * SECOND
        })
    );
}

#[test]
fn admission_control_follows_the_sre_formula() {
    // K = 2: no refusals while accepts are at least half the requests.
    assert_eq!(throttle_ppm(100, 50, 2_000, 1_000_000), 0);
    // No accepts at all: nearly everything, capped.
    assert_eq!(throttle_ppm(100, 0, 2_000, 900_000), 900_000);
    // 100 requests, 20 accepts: (100 - 40) / 101.
    assert_eq!(throttle_ppm(100, 20, 2_000, 1_000_000), 594_059);
}

/// How a stream ended.
struct Answered(Option<u16>);

impl ResponseFacts for Answered {
    fn status(&mut self) -> Option<u16> {
        self.0
    }
    fn flags(&mut self) -> u64 {
        0
    }
    fn grpc_status(&mut self) -> Option<u32> {
        None
    }
}

/// What this file asks of a worker.
trait Degrading {
    /// Sends a request and, if it went on, answers it with `status` after `took` nanoseconds.
    fn call(
        &mut self,
        request: FakeRequest,
        now: u64,
        status: u16,
        took: u64,
        store: &FakeStore,
    ) -> Outcome;
    /// The root context's tick; returns the probes it sent.
    fn tick(&self, me: u64, now: u64, store: &FakeStore, probes_fail: bool) -> usize;
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Upstream,
    Replied {
        status: u16,
        degraded: Option<String>,
        retry_after: Option<u64>,
        body: Vec<u8>,
    },
}

impl Degrading for Worker {
    fn call(
        &mut self,
        request: FakeRequest,
        now: u64,
        status: u16,
        took: u64,
        store: &FakeStore,
    ) -> Outcome {
        let decision = self.send(request, now, store);
        let mut stream = decision.stream;
        match decision.verdict {
            Verdict::Reply(reply) => Outcome::Replied {
                status: reply.status,
                // Degradation's own replies carry it among their headers; a later stage's
                // reply gets it from the level in force.
                degraded: reply.degraded.map(str::to_owned).or_else(|| {
                    reply
                        .headers
                        .iter()
                        .find(|(name, _)| name == DEGRADED_HEADER)
                        .map(|(_, value)| value.clone())
                }),
                retry_after: reply.retry_after_seconds(),
                body: reply.body.to_vec(),
            },
            Verdict::Continue | Verdict::Pause { .. } => {
                let metrics = &self.metrics;
                self.engine
                    .on_response(&mut stream, Timestamp::from_nanos(now + took), metrics);
                self.engine.on_stream_end(
                    &stream,
                    &mut Answered(Some(status)),
                    Timestamp::from_nanos(now + took),
                    store,
                    metrics,
                );
                Outcome::Upstream
            }
        }
    }

    fn tick(&self, me: u64, now: u64, store: &FakeStore, probes_fail: bool) -> usize {
        let mut sent = Vec::new();
        self.engine.on_degradation_tick(
            me,
            Timestamp::from_nanos(now),
            store,
            &self.metrics,
            &mut |policy, _| {
                sent.push(policy);
                true
            },
        );
        // The health path answers before the next tick.
        let status = if probes_fail { 503 } else { 200 };
        for &policy in &sent {
            self.engine
                .on_probe_result(policy, Some(status), store, &self.metrics);
        }
        sent.len()
    }
}

const PROBED: &str = r#"{
    "degradation": {"payments": {
        "signals": {"probe": {"cluster": "health", "interval": "200ms", "timeout": "100ms",
                              "unhealthy_after": 1, "healthy_after": 1}},
        "levels": [{"name": "critical", "enter": {"probe": "unhealthy"}, "min_dwell": "1s"}]}},
    "routes": [{"name": "all", "degradation": "payments"}]
}"#;

#[test]
fn one_worker_holds_the_lease_and_probes_go_out_once_per_interval_across_workers() {
    let store = FakeStore::new();
    let workers: Vec<Worker> = (0..4).map(|_| Worker::new(PROBED, &store)).collect();
    // Each worker ticks every 100 ms, at its own offset within the tick.
    let mut sent = [0usize; 4];
    for tick in 0..100u64 {
        for (id, worker) in workers.iter().enumerate() {
            let now = T0 + tick * 100 * MS + id as u64 * 7 * MS;
            sent[id] += worker.tick(id as u64 + 1, now, &store, false);
        }
    }
    // 10 s at one probe per 200 ms, all from the worker that took the lease first.
    assert_eq!(sent, [50, 0, 0, 0]);
    assert_eq!(
        workers[0].counter("seawall.degradation.payments.leases_taken"),
        1
    );

    // The holder stops ticking (its VM is gone): another takes over once the lease lapses, and
    // the probe rate holds.
    let mut sent = [0usize; 4];
    for tick in 100..200u64 {
        for (id, worker) in workers.iter().enumerate().skip(1) {
            let now = T0 + tick * 100 * MS + id as u64 * 7 * MS;
            sent[id] += worker.tick(id as u64 + 1, now, &store, false);
        }
    }
    let total: usize = sent.iter().sum();
    assert_eq!(sent.iter().filter(|&&n| n > 0).count(), 1, "{sent:?}");
    // The lapse (1 s) costs the probes that fell due in it, at most six.
    assert!((44..=50).contains(&total), "{total} probes in 10 s");
}

#[test]
fn probe_failures_raise_the_level_for_every_worker_and_recovery_waits_for_the_dwell() {
    let store = FakeStore::new();
    let one = Worker::new(PROBED, &store);
    let mut two = Worker::new(PROBED, &store);
    one.tick(1, T0, &store, true);
    // The follower reads the level on its own tick.
    assert_eq!(one.engine.degradation_level(0), Some(0));
    one.tick(1, T0 + 100 * MS, &store, true);
    assert_eq!(one.engine.degradation_level(0), Some(1));
    assert_eq!(two.engine.degradation_level(0), Some(0));
    two.tick(2, T0 + 150 * MS, &store, true);
    assert_eq!(two.engine.degradation_level(0), Some(1));
    assert_eq!(one.counter("seawall.degradation.payments.level"), 1);
    assert_eq!(one.counter("seawall.degradation.payments.escalated"), 1);

    // Requests carry the level in their responses.
    assert_eq!(
        two.call(get("/"), T0 + 200 * MS, 200, MS, &store),
        Outcome::Upstream
    );
    // Probes pass again from 300 ms; the level holds until 1 s after it was entered.
    let mut left_at = None;
    for tick in 3..30u64 {
        let now = T0 + tick * 100 * MS;
        one.tick(1, now, &store, false);
        if left_at.is_none() && one.engine.degradation_level(0) == Some(0) {
            left_at = Some(now);
        }
    }
    assert_eq!(left_at, Some(T0 + 1_100 * MS));
    assert_eq!(one.counter("seawall.degradation.payments.deescalated"), 1);
}

const SHEDDING: &str = r#"{
    "rate_limits": {"global": {"rate": "10/s", "burst": 10}},
    "retries": {"idempotent": {"max_retries": 2, "budget": {"enabled": false}}},
    "degradation": {"payments": {
        "signals": {"window": "10s", "min_requests": 10},
        "priority": {"header": "x-priority"},
        "levels": [{"name": "degraded", "enter": {"p95_latency": "800ms"}, "exit": {"p95_latency": "400ms"},
                    "min_dwell": "30s", "shed_below": "high", "rate_limit_factor": 0.5, "retries": false,
                    "reroute": {"cluster": "payments-fallback", "routes": ["search"]},
                    "fallback": {"body": "{\"items\":[]}", "routes": ["catalog"]}}]}},
    "routes": [
        {"name": "catalog", "match": {"path": {"prefix": "/catalog"}}, "degradation": "payments"},
        {"name": "search", "match": {"path": {"prefix": "/search"}}, "degradation": "payments", "priority": "critical"},
        {"name": "health", "match": {"path": {"prefix": "/health"}}, "degradation": "payments", "priority": "critical",
         "rate_limits": ["global"], "retry": "idempotent"},
        {"name": "api", "degradation": "payments"}
    ]
}"#;

fn with_priority(path: &str, priority: &str) -> FakeRequest {
    get(path).header("x-priority", priority)
}

#[test]
fn a_slow_dependency_degrades_the_level_and_each_action_applies_to_its_routes() {
    let store = FakeStore::new();
    let mut worker = Worker::new(SHEDDING, &store);
    let mut other = Worker::new(SHEDDING, &store);

    // Normal: everything passes; a client's own reroute header is removed.
    assert_eq!(
        worker.call(with_priority("/api", "low"), T0, 200, MS, &store),
        Outcome::Upstream
    );
    let mut spoofed = get("/search").header("x-seawall-cluster", "admin");
    let decision = worker.send_to(&mut spoofed, T0, &store);
    assert_eq!(decision.reroute, None);
    assert_eq!(spoofed.removed, [("x-seawall-cluster".to_owned(), 1)]);

    // Calls take 900 ms on two workers: 10 of 12 slower than 800 ms.
    for (n, took) in [900, 900, 900, 900, 900, 10, 900, 900, 900, 900, 900, 10]
        .into_iter()
        .enumerate()
    {
        let worker = if n % 2 == 0 { &mut worker } else { &mut other };
        worker.call(
            with_priority("/api", "critical"),
            T0 + SECOND,
            200,
            took * MS,
            &store,
        );
    }
    // The lease holder evaluates on its tick, with the other workers' tallies of their last tick.
    worker.tick(1, T0 + 2 * SECOND, &store, false);
    other.tick(2, T0 + 2 * SECOND + MS, &store, false);
    assert_eq!(worker.engine.degradation_level(0), Some(0));
    worker.tick(1, T0 + 2 * SECOND + 100 * MS, &store, false);
    assert_eq!(worker.engine.degradation_level(0), Some(1));
    let now = T0 + 3 * SECOND;

    // Shedding: below `high` is refused with the time left of the dwell; the header decides,
    // and no header is the default `normal`.
    let shed = worker.call(with_priority("/api", "low"), now, 200, MS, &store);
    assert_eq!(
        shed,
        Outcome::Replied {
            status: 503,
            degraded: Some("degraded".into()),
            retry_after: Some(30),
            body: Vec::new(),
        }
    );
    assert!(matches!(
        worker.call(get("/api"), now, 200, MS, &store),
        Outcome::Replied { status: 503, .. }
    ));
    assert_eq!(
        worker.call(with_priority("/api", "CRITICAL"), now, 200, MS, &store),
        Outcome::Upstream
    );
    assert_eq!(worker.counter("seawall.degradation.payments.shed"), 2);

    // The fallback answers on its route, whatever the priority.
    let fallback = worker.call(with_priority("/catalog", "critical"), now, 200, MS, &store);
    assert_eq!(
        fallback,
        Outcome::Replied {
            status: 200,
            degraded: Some("degraded".into()),
            retry_after: None,
            body: b"{\"items\":[]}".to_vec(),
        }
    );

    // A route's own priority beats the client's header, and the reroute replaces the client's
    // header with the fallback cluster.
    let decision = worker.send(
        with_priority("/search", "low").header("x-seawall-cluster", "admin"),
        now,
        &store,
    );
    assert_eq!(decision.verdict, Verdict::Continue);
    assert_eq!(
        decision.reroute,
        Some(Reroute {
            header: "x-seawall-cluster",
            cluster: "payments-fallback"
        })
    );
    assert_eq!(worker.counter("seawall.degradation.payments.rerouted"), 1);

    // Retries off, and the rate limit at half: 5 of 20 at once instead of 10.
    let mut admitted = 0;
    for _ in 0..20 {
        let decision = worker.send(get("/health"), now, &store);
        if decision.verdict == Verdict::Continue {
            admitted += 1;
            assert_eq!(decision.retry.unwrap().max_retries, 0);
            let mut response = decision.stream;
            assert_eq!(
                worker
                    .engine
                    .on_response(&mut response, Timestamp::from_nanos(now), &worker.metrics)
                    .degraded,
                Some("degraded")
            );
        }
    }
    assert_eq!(admitted, 5);
}

#[test]
fn admission_control_refuses_as_accepts_fall_across_workers() {
    const THROTTLING: &str = r#"{
        "degradation": {"payments": {
            "levels": [{"name": "degraded", "enter": {"failure_rate": 50}}],
            "signals": {"min_requests": 1000000},
            "admission_control": {"k": 2, "window": "10s"}}},
        "routes": [{"name": "api", "degradation": "payments"}]
    }"#;
    let store = FakeStore::new();
    let mut workers: Vec<Worker> = (0..2).map(|_| Worker::new(THROTTLING, &store)).collect();
    // 200 calls over two workers, 80% failing: accepts 40 of 200.
    for n in 0..200u64 {
        let status = if n % 5 == 0 { 200 } else { 503 };
        let worker = &mut workers[(n % 2) as usize];
        assert_eq!(
            worker.call(get("/api"), T0, status, MS, &store),
            Outcome::Upstream
        );
    }
    for (id, worker) in workers.iter().enumerate() {
        worker.tick(id as u64 + 1, T0 + SECOND, &store, false);
    }
    // Both workers see the shared totals: (200 - 2 * 40) / 201 = 59.7% refused.
    let mut refused = 0;
    for n in 0..4_000u64 {
        let worker = &mut workers[(n % 2) as usize];
        let decision = worker.send(get("/api"), T0 + 2 * SECOND, &store);
        if let Verdict::Reply(reply) = &decision.verdict {
            assert_eq!(reply.status, 503);
            assert!(reply
                .headers
                .iter()
                .any(|(name, value)| name == DEGRADED_HEADER && value == "throttled"));
            refused += 1;
        }
    }
    assert!(
        (2_250..=2_530).contains(&refused),
        "{refused} of 4000 refused"
    );
    let throttled: i64 = workers
        .iter()
        .map(|w| w.counter("seawall.degradation.payments.throttled"))
        .sum();
    assert_eq!(throttled, refused);
}

#[test]
fn an_open_breaker_raises_a_level_whose_fallback_answers_instead_of_the_breakers_503() {
    const COMPOSED: &str = r#"{
        "circuit_breakers": {"payments": {"key": "route", "open_when": {"consecutive_failures": 3},
                                          "open_for": "30s"}},
        "degradation": {"payments": {
            "signals": {"circuit_breaker": "payments"},
            "levels": [{"name": "open", "enter": {"circuit_breaker": "open"}, "min_dwell": "1s",
                        "fallback": {"body": "cached\n"}}]}},
        "routes": [{"name": "api", "circuit_breaker": "payments", "degradation": "payments"}]
    }"#;
    let store = FakeStore::new();
    let mut worker = Worker::new(COMPOSED, &store);
    for _ in 0..3 {
        assert_eq!(
            worker.call(get("/api"), T0, 503, MS, &store),
            Outcome::Upstream
        );
    }
    // The breaker refuses at once; the level follows on the next tick.
    assert!(matches!(
        worker.call(get("/api"), T0 + MS, 200, MS, &store),
        Outcome::Replied { status: 503, .. }
    ));
    worker.tick(1, T0 + 100 * MS, &store, false);
    assert_eq!(worker.engine.degradation_level(0), Some(1));
    assert_eq!(
        worker.call(get("/api"), T0 + 200 * MS, 200, MS, &store),
        Outcome::Replied {
            status: 200,
            degraded: Some("open".into()),
            retry_after: None,
            body: b"cached\n".to_vec(),
        }
    );
    assert_eq!(
        worker.counter("seawall.circuit_breaker.payments.rejected"),
        1
    );
}

/// Issue 14, point 2: a level entered on `circuit_breaker: open` whose fallback covers the
/// breaker's route answered every request, so no request ever moved the breaker on from its
/// expired open period, and the fallback was served forever with a healthy upstream.
#[test]
fn a_breaker_driven_fallback_ends_once_the_open_period_runs_out_and_the_probe_closes_it() {
    const COMPOSED: &str = r#"{
        "circuit_breakers": {"payments": {"key": "route", "open_when": {"consecutive_failures": 3},
                                          "open_for": "2s", "half_open_probes": 1}},
        "degradation": {"payments": {
            "signals": {"circuit_breaker": "payments"},
            "levels": [{"name": "open", "enter": {"circuit_breaker": "open"}, "min_dwell": "1s",
                        "fallback": {"body": "cached\n"}}]}},
        "routes": [{"name": "api", "circuit_breaker": "payments", "degradation": "payments"}]
    }"#;
    let store = FakeStore::new();
    let mut worker = Worker::new(COMPOSED, &store);
    for _ in 0..3 {
        worker.call(get("/api"), T0, 503, MS, &store);
    }
    worker.tick(1, T0 + 100 * MS, &store, false);
    assert_eq!(worker.engine.degradation_level(0), Some(1));
    // While the open period lasts, the level holds and its fallback answers.
    let mut at = T0 + 200 * MS;
    while at < T0 + 2_000 * MS {
        worker.tick(1, at, &store, false);
        assert_eq!(worker.engine.degradation_level(0), Some(1), "at {at}");
        assert!(matches!(
            worker.call(get("/api"), at, 200, MS, &store),
            Outcome::Replied { status: 200, .. }
        ));
        at += 100 * MS;
    }
    // The open period has run out: the breaker may probe, so the level steps down and the next
    // request reaches the breaker as its probe. The upstream is healthy and the breaker closes.
    let stepped_down = (0..20).find_map(|n| {
        let now = T0 + 2_000 * MS + n * 100 * MS;
        worker.tick(1, now, &store, false);
        (worker.engine.degradation_level(0) == Some(0)).then_some(now)
    });
    let stepped_down = stepped_down.expect("the level steps down once the open period runs out");
    assert!(
        stepped_down <= T0 + 2_100 * MS,
        "stepped down at {stepped_down}"
    );
    assert_eq!(
        worker.call(get("/api"), stepped_down + MS, 200, MS, &store),
        Outcome::Upstream
    );
    for n in 0..10 {
        assert_eq!(
            worker.call(get("/api"), stepped_down + (2 + n) * MS, 200, MS, &store),
            Outcome::Upstream,
            "request {n} after the probe closed the breaker"
        );
    }
    worker.tick(1, stepped_down + 100 * MS, &store, false);
    assert_eq!(worker.engine.degradation_level(0), Some(0));
    assert_eq!(worker.counter("seawall.circuit_breaker.payments.closed"), 1);
}

#[test]
fn a_reloaded_config_starts_from_the_level_in_force_capped_to_its_levels() {
    const TWO: &str = r#"{
        "degradation": {"payments": {
            "signals": {"probe": {"cluster": "health", "interval": "200ms", "timeout": "100ms",
                                  "unhealthy_after": 1, "healthy_after": 1}},
            "levels": [{"name": "degraded", "enter": {"failure_rate": 50}},
                       {"name": "critical", "enter": {"probe": "unhealthy"}, "min_dwell": "1s"}]}},
        "routes": [{"name": "all", "degradation": "payments"}]
    }"#;
    let store = FakeStore::new();
    let before = Worker::new(TWO, &store);
    before.tick(1, T0, &store, true);
    before.tick(1, T0 + 100 * MS, &store, true);
    assert_eq!(before.engine.degradation_level(0), Some(2));

    // The same policy reloaded: in force from the first request, before any tick.
    let reloaded = Worker::new(TWO, &store);
    assert_eq!(reloaded.engine.degradation_level(0), Some(2));

    // Reloaded with only one level: capped to it, and it steps down once its exit holds.
    let one_level = TWO.replace(
        r#",
                       {"name": "critical", "enter": {"probe": "unhealthy"}, "min_dwell": "1s"}"#,
        "",
    );
    let mut smaller = Worker::new(&one_level, &store);
    assert_eq!(smaller.engine.degradation_level(0), Some(1));
    let shed = smaller.call(get("/"), T0 + 200 * MS, 200, MS, &store);
    assert_eq!(shed, Outcome::Upstream);
    smaller.tick(1, T0 + 20 * SECOND, &store, false);
    assert_eq!(smaller.engine.degradation_level(0), Some(0));
}

#[test]
fn a_store_failure_is_no_evidence_of_recovery() {
    const RATE: &str = r#"{
        "degradation": {"payments": {
            "signals": {"window": "1s", "min_requests": 5},
            "levels": [{"name": "degraded", "enter": {"failure_rate": 50}, "min_dwell": "1s"}]}},
        "routes": [{"name": "all", "degradation": "payments"}]
    }"#;
    let store = FakeStore::new();
    let mut worker = Worker::new(RATE, &store);
    for _ in 0..10 {
        worker.call(get("/"), T0, 503, MS, &store);
    }
    worker.tick(1, T0 + 100 * MS, &store, false);
    assert_eq!(worker.engine.degradation_level(0), Some(1));
    // Ten seconds on, the window is empty and the dwell long over: a recovery, if the window
    // can be read. When it cannot, the level holds.
    store.fail_next(1, seawall::state::StoreError::Host(1));
    worker.tick(1, T0 + 10 * SECOND, &store, false);
    assert_eq!(worker.engine.degradation_level(0), Some(1));
    assert_eq!(
        worker.counter("seawall.degradation.payments.store_errors"),
        1
    );
    worker.tick(1, T0 + 10 * SECOND + 100 * MS, &store, false);
    assert_eq!(worker.engine.degradation_level(0), Some(0));
}

/// Issue 14, point 1: a client's `x-seawall-cluster` was removed only on routes with a
/// degradation policy, and after the breaker key (`xds.cluster_name`) had been read, so a client
/// picked the cluster of `/admin` and the breaker record of a policy route. Now it goes first, on
/// every request, before any route matcher or policy reads anything else.
#[test]
fn a_clients_reroute_header_is_removed_on_every_route_before_anything_reads_xds() {
    const CONFIG: &str = r#"{
        "circuit_breakers": {"payments": {"open_when": {"consecutive_failures": 3}}},
        "degradation": {"payments": {
            "levels": [{"name": "critical", "enter": {"failure_rate": 50},
                        "reroute": {"cluster": "fallback", "routes": ["api"]}}]}},
        "routes": [
            {"name": "by-cluster", "match": {"cluster": "payments"}, "circuit_breaker": "payments"},
            {"name": "api", "match": {"path": {"prefix": "/api"}}, "degradation": "payments"},
            {"name": "admin", "match": {"path": {"prefix": "/admin"}}}
        ]
    }"#;
    let store = FakeStore::new();
    let mut worker = Worker::new(CONFIG, &store);
    // Envoy chose its route with the client's header, so `xds.cluster_name` names the cluster
    // the client picked until the router matches again: seawall must not believe it.
    let cluster = seawall::request::Attribute::cluster_name();
    for (path, route) in [
        ("/admin", Some(2)),
        ("/api/items", Some(1)),
        ("/elsewhere", None),
    ] {
        let mut spoofed = get(path)
            .header("x-seawall-cluster", "payments")
            .with(cluster.clone(), "payments");
        let decision = worker.send_to(&mut spoofed, T0, &store);
        assert_eq!(decision.reroute, None, "{path}");
        assert_eq!(decision.stream.route.map(|r| r.0), route, "{path}");
        assert_eq!(
            spoofed.removed,
            [("x-seawall-cluster".to_owned(), 1)],
            "{path}: removed first, after reading only the header itself"
        );
        assert!(
            !spoofed.reads.contains(&cluster),
            "{path}: xds.cluster_name not read"
        );
    }
    // Without the client's header, the cluster Envoy chose is seawall's to match on.
    let mut honest = get("/elsewhere").with(cluster.clone(), "payments");
    let decision = worker.send_to(&mut honest, T0, &store);
    assert_eq!(decision.stream.route.map(|r| r.0), Some(0));
    assert_eq!(
        worker.counter("seawall.plugin.seawall.client_reroute_headers_removed"),
        3
    );
    // Without the header nothing is removed.
    let mut plain = get("/admin");
    worker.send_to(&mut plain, T0, &store);
    assert!(plain.removed.is_empty());
}

/// Issue 14, point 14: during a degraded level, the breaker's and the rate limit's replies lacked
/// `x-seawall-degraded`, which the README says every reply of a degraded route carries.
#[test]
fn breaker_and_rate_limit_replies_name_the_level_in_force() {
    const CONFIG: &str = r#"{
        "rate_limits": {"tight": {"rate": "1/h", "burst": 2}},
        "circuit_breakers": {"payments": {"key": "route", "open_when": {"consecutive_failures": 2}}},
        "degradation": {"payments": {
            "signals": {"min_requests": 2},
            "levels": [{"name": "degraded", "enter": {"failure_rate": 50}}]}},
        "routes": [
            {"name": "limited", "match": {"path": {"prefix": "/limited"}}, "rate_limits": ["tight"], "degradation": "payments"},
            {"name": "guarded", "match": {"path": {"prefix": "/guarded"}}, "circuit_breaker": "payments", "degradation": "payments"}
        ]
    }"#;
    let store = FakeStore::new();
    let mut worker = Worker::new(CONFIG, &store);
    for path in ["/limited", "/limited", "/guarded", "/guarded"] {
        assert_eq!(
            worker.call(get(path), T0, 503, MS, &store),
            Outcome::Upstream
        );
    }
    worker.tick(1, T0 + 100 * MS, &store, false);
    assert_eq!(worker.engine.degradation_level(0), Some(1));
    for (path, status) in [("/limited", 429), ("/guarded", 503)] {
        match worker.call(get(path), T0 + 200 * MS, 200, MS, &store) {
            Outcome::Replied {
                status: got,
                degraded,
                ..
            } => {
                assert_eq!(got, status, "{path}");
                assert_eq!(degraded.as_deref(), Some("degraded"), "{path}");
            }
            Outcome::Upstream => panic!("{path}: refused by its own policy"),
        }
    }
}

/// Issue 14, point 5: rerouted requests went through the primary's breaker. In half-open a
/// rerouted request took the probe slot, succeeded on the fallback cluster and closed the
/// primary's breaker; while closed, fallback successes diluted the primary's failure rate; and an
/// open breaker's 503 won over the reroute.
#[test]
fn a_rerouted_request_is_none_of_the_primary_breakers_business() {
    const CONFIG: &str = r#"{
        "circuit_breakers": {"payments": {"key": "route", "open_when": {"consecutive_failures": 2},
                                          "open_for": "1s", "half_open_probes": 1}},
        "degradation": {"payments": {
            "signals": {"circuit_breaker": "payments"},
            "levels": [{"name": "open", "enter": {"circuit_breaker": "open"}, "min_dwell": "10s",
                        "reroute": {"cluster": "payments-fallback"}}]}},
        "routes": [{"name": "api", "circuit_breaker": "payments", "degradation": "payments"}]
    }"#;
    let store = FakeStore::new();
    let mut worker = Worker::new(CONFIG, &store);
    for _ in 0..2 {
        assert_eq!(
            worker.call(get("/api"), T0, 503, MS, &store),
            Outcome::Upstream
        );
    }
    worker.tick(1, T0 + 100 * MS, &store, false);
    assert_eq!(worker.engine.degradation_level(0), Some(1));
    // Open: the request is rerouted, not refused with the breaker's 503.
    let decision = worker.send(get("/api"), T0 + 200 * MS, &store);
    assert!(decision.reroute.is_some());
    assert_eq!(decision.verdict, Verdict::Continue);
    assert_eq!(decision.stream.breaker, None, "no breaker ticket");
    // Past the open period, rerouted requests succeed on the fallback: they take no probe slot
    // and do not close the primary's breaker.
    for n in 0..20 {
        assert_eq!(
            worker.call(get("/api"), T0 + 2 * 1_000 * MS + n, 200, MS, &store),
            Outcome::Upstream
        );
    }
    assert_eq!(worker.counter("seawall.circuit_breaker.payments.closed"), 0);
    assert_eq!(worker.counter("seawall.circuit_breaker.payments.probes"), 0);
    assert_eq!(
        worker.counter("seawall.circuit_breaker.payments.rejected"),
        0
    );
    assert_eq!(worker.counter("seawall.degradation.payments.rerouted"), 21);
}

/// Issue 14, point 7: after a reload the old root context lives until its listener drains and
/// keeps ticking, and a lease holder could renew forever: the old thresholds and probe target
/// kept driving the shared level. Now a superseded config follows the level but never leads it.
#[test]
fn after_a_reload_only_the_newest_config_leads_the_level_and_sends_probes() {
    let config = |cluster: &str| {
        format!(
            r#"{{"degradation": {{"payments": {{
                "signals": {{"probe": {{"cluster": "{cluster}", "interval": "200ms", "timeout": "100ms",
                                         "unhealthy_after": 1, "healthy_after": 1}}}},
                "levels": [{{"name": "down", "enter": {{"probe": "unhealthy"}}}}]}}}},
               "routes": [{{"name": "api", "degradation": "payments"}}]}}"#
        )
    };
    let store = FakeStore::new();
    let old = Worker::new(&config("old-health"), &store);
    // The old config leads for a second: it holds the lease and sends the probes.
    let mut at = T0;
    let mut old_probes = 0;
    while at < T0 + 1_000 * MS {
        old_probes += old.tick(1, at, &store, false);
        at += 100 * MS;
    }
    assert!(old_probes >= 4, "{old_probes}");
    // The reload: the new config's probes fail; the old root keeps ticking.
    let new = Worker::new(&config("new-health"), &store);
    let (mut old_after, mut new_after) = (0, 0);
    while at < T0 + 5_000 * MS {
        old_after += old.tick(1, at, &store, false);
        new_after += new.tick(2, at, &store, true);
        at += 100 * MS;
    }
    assert_eq!(old_after, 0, "the superseded config sends no probe");
    assert!(new_after >= 15, "the newest config probes: {new_after}");
    assert_eq!(
        new.engine.degradation_level(0),
        Some(1),
        "its failing probes lead"
    );
    assert_eq!(
        old.engine.degradation_level(0),
        Some(1),
        "the old root follows"
    );
}

/// A probe every 200 ms; one failed probe takes the level down, one healthy one brings it back.
const PROBED_FAST_DOWN: &str = r#"{"degradation": {"payments": {
    "signals": {"probe": {"cluster": "health", "interval": "200ms", "timeout": "100ms",
                          "unhealthy_after": 1, "healthy_after": 1}},
    "levels": [{"name": "down", "enter": {"probe": "unhealthy"}, "min_dwell": "1s"}]}},
    "routes": [{"name": "api", "degradation": "payments"}]}"#;

/// Issue 14, point 4: stored times never count for more than the clock allows. After the clock
/// steps back an hour, a lease, a probe schedule and a level's start written under the later
/// clock would have stopped the probes, kept a dead holder in charge, and held the level for the
/// length of the step.
#[test]
fn a_clock_step_back_stops_no_probe_and_holds_no_level() {
    let store = FakeStore::new();
    let holder = Worker::new(PROBED_FAST_DOWN, &store);
    let later = T0 + 3_600 * SECOND;
    // Under the later clock, worker 1 holds the lease and the probes fail: the level is down.
    holder.tick(1, later, &store, true);
    holder.tick(1, later + 200 * MS, &store, true);
    assert_eq!(holder.engine.degradation_level(0), Some(1));
    // The clock steps back an hour and worker 1 is gone: worker 2 takes over at once, probes on
    // schedule, and the level steps down after its dwell, not after an hour.
    let other = Worker::new(PROBED_FAST_DOWN, &store);
    let mut probes = 0;
    let mut at = T0;
    while at < T0 + 2 * SECOND {
        probes += other.tick(2, at, &store, false);
        at += 100 * MS;
    }
    assert!(probes >= 9, "{probes} probes in 2 s at one per 200 ms");
    assert_eq!(other.engine.degradation_level(0), Some(0));
}

/// The worker holding the probe lease renews it with each tick; another worker's tick that read
/// the clock a few milliseconds earlier finds a lease running further ahead than one renewal
/// from its reading. That is a live holder, not a clock step back: the lease stays, and only the
/// holder probes.
#[test]
fn a_tick_with_an_older_clock_reading_does_not_take_a_live_lease() {
    let store = FakeStore::new();
    let holder = Worker::new(PROBED_FAST_DOWN, &store);
    let lagging = Worker::new(PROBED_FAST_DOWN, &store);
    let (mut by_holder, mut by_lagging) = (0, 0);
    let mut at = T0;
    while at < T0 + 2 * SECOND {
        by_holder += holder.tick(1, at, &store, false);
        by_lagging += lagging.tick(2, at - 5 * MS, &store, false);
        at += 100 * MS;
    }
    assert_eq!(by_lagging, 0, "the lagging worker never took the lease");
    assert!(
        by_holder >= 9,
        "{by_holder} probes in 2 s at one per 200 ms"
    );
}
