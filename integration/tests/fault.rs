//! Fault injection in real Envoy with several workers: abort shares, sticky cohorts, delays that
//! pause the request without blocking a worker (resumed from the root context's tick), an exact
//! `max_active` across workers, header control behind a secret, the time box, and response faults.

use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use seawall_integration::client::{load, Client, LoadSpec, Request};
use seawall_integration::{Envoy, EnvoyConfig, Upstream};

/// The delay scenario measures latency, so the scenarios of this file run one at a time: each
/// holds this lock while its Envoy runs.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn chaos(upstream: &Upstream, workers: u32, faults: &str, routes: &str) -> Envoy {
    Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .concurrency(workers)
            .seawall(&format!(r#"{{"faults": {faults}, "routes": {routes}}}"#)),
    )
}

const ONE_ROUTE: &str = r#"[{"name": "chaos", "match": {"path": {"prefix": "/chaos"}}, "faults": ["chaos"]}, {"name": "calm"}]"#;

fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy
        .stats()
        .seawall(&format!("seawall.fault.chaos.{name}"))
}

#[test]
fn a_thirty_percent_abort_aborts_thirty_percent_and_a_cohort_is_sticky() {
    let _alone = alone();
    let upstream = Upstream::start();
    let envoy = chaos(
        &upstream,
        4,
        r#"{"chaos": {"abort": {"status": 503, "percent": 30, "body": "chaos\n"}},
            "sticky": {"abort": {"status": 500, "percent": 30}, "cohort": {"key": [{"header": "x-user-id"}]}}}"#,
        r#"[{"name": "chaos", "match": {"path": {"prefix": "/chaos"}}, "faults": ["chaos"]},
            {"name": "sticky", "match": {"path": {"prefix": "/sticky"}}, "faults": ["sticky"]}]"#,
    );
    let addr = envoy.listener_addr();
    let report = load(addr, {
        let mut spec = LoadSpec::new(8, Duration::from_secs(30), |_| Request::get("/chaos"));
        spec.total = Some(2000);
        spec
    });
    let aborted = report.count(503);
    eprintln!(
        "[fault] 30% abort: {aborted} of {} aborted ({:.1}%), upstream saw {}",
        report.sent(),
        100.0 * aborted as f64 / report.sent() as f64,
        upstream.total()
    );
    assert_eq!(report.sent(), 2000);
    assert!((540..=660).contains(&aborted), "{aborted} of 2000");
    assert_eq!(report.count(200) + aborted, 2000, "{:?}", report.statuses);
    assert_eq!(upstream.total(), report.count(200));
    assert_eq!(stat(&envoy, "aborts"), aborted);
    assert_eq!(stat(&envoy, "active"), 0);

    // Sticky: every user's 50 requests share one fate, whichever worker serves them.
    let mut aborted_users = 0;
    for user in 0..40 {
        let statuses: Vec<u16> = (0..50)
            .map(|_| {
                // A fresh connection each time, so the requests spread over the workers.
                Client::connect(addr)
                    .send(&Request::get("/sticky").header("x-user-id", format!("user-{user}")))
                    .unwrap()
                    .status
            })
            .collect();
        assert!(
            statuses.iter().all(|&s| s == statuses[0]),
            "user-{user}: {statuses:?}"
        );
        aborted_users += usize::from(statuses[0] == 500);
    }
    eprintln!(
        "[fault] sticky cohort: {aborted_users} of 40 users always aborted, the others never"
    );
    assert!((4..=20).contains(&aborted_users), "{aborted_users} of 40");
}

#[test]
fn a_delay_holds_requests_without_slowing_other_routes() {
    let _alone = alone();
    let upstream = Upstream::start();
    let envoy = chaos(
        &upstream,
        2,
        r#"{"chaos": {"delay": {"fixed": "200ms", "percent": 100}}}"#,
        ONE_ROUTE,
    );
    let addr = envoy.listener_addr();
    // 200 connections keep 200 delayed requests in flight while 4 others use the calm route.
    let delayed = std::thread::spawn(move || {
        load(
            addr,
            LoadSpec::new(200, Duration::from_secs(3), |_| Request::get("/chaos")),
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    let calm = std::thread::spawn(move || {
        load(
            addr,
            LoadSpec::new(4, Duration::from_secs(2), |_| Request::get("/calm")),
        )
    });
    let mut peak_active = 0;
    while !calm.is_finished() {
        peak_active = peak_active.max(stat(&envoy, "active"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let calm = calm.join().unwrap();
    let delayed = delayed.join().unwrap();
    let p50 = delayed.percentile(50.0);
    eprintln!(
        "[fault] 200 ms delay with {peak_active} delayed in flight: p50 {:?}, p99 {:?} over {} requests; calm route p50 {:?}, p99 {:?} over {}",
        p50,
        delayed.percentile(99.0),
        delayed.sent(),
        calm.percentile(50.0),
        calm.percentile(99.0),
        calm.sent()
    );
    assert_eq!(delayed.errors + calm.errors, 0);
    assert_eq!(delayed.count(200), delayed.sent());
    assert!(
        peak_active >= 150,
        "about 200 delayed at once, saw {peak_active}"
    );
    assert!(
        p50 >= Duration::from_millis(200) && p50 <= Duration::from_millis(215),
        "delayed p50 {p50:?}"
    );
    assert!(
        calm.percentile(50.0) < Duration::from_millis(50),
        "calm p50 {:?}",
        calm.percentile(50.0)
    );
    assert_eq!(stat(&envoy, "delays"), delayed.sent());
    assert_eq!(stat(&envoy, "active"), 0);
}

#[test]
fn max_active_holds_exactly_across_workers_and_a_client_that_leaves_frees_its_slot() {
    let _alone = alone();
    let upstream = Upstream::start();
    let envoy = chaos(
        &upstream,
        4,
        r#"{"chaos": {"delay": {"fixed": "400ms", "percent": 100}, "max_active": 10}}"#,
        ONE_ROUTE,
    );
    let addr = envoy.listener_addr();
    // 40 clients; each request says who it is, so the upstream's arrivals can be matched up.
    let sequence = Arc::new(Mutex::new(0u64));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let clients: Vec<_> = (0..40)
        .map(|_| {
            let (sequence, latencies) = (Arc::clone(&sequence), Arc::clone(&latencies));
            std::thread::spawn(move || {
                let mut client = Client::connect(addr);
                while started.elapsed() < Duration::from_secs(2) {
                    let id = {
                        let mut next = sequence.lock().unwrap();
                        *next += 1;
                        *next
                    };
                    let sent = Instant::now();
                    let response = client
                        .send(&Request::get("/chaos").header("x-request", id.to_string()))
                        .unwrap();
                    assert_eq!(response.status, 200);
                    latencies.lock().unwrap().push((id, sent.elapsed()));
                }
            })
        })
        .collect();
    let mut gauge_peak = 0;
    while started.elapsed() < Duration::from_secs(2) {
        gauge_peak = gauge_peak.max(stat(&envoy, "active"));
        std::thread::sleep(Duration::from_millis(20));
    }
    for client in clients {
        client.join().unwrap();
    }
    // A delayed request reached the upstream when its delay ended: it was held during the
    // 400 ms before its arrival.
    let latencies = latencies.lock().unwrap();
    let delayed: std::collections::HashSet<String> = latencies
        .iter()
        .filter(|(_, latency)| *latency >= Duration::from_millis(400))
        .map(|(id, _)| id.to_string())
        .collect();
    let mut edges: Vec<(Instant, i32)> = Vec::new();
    for received in upstream.received() {
        let id = String::from_utf8_lossy(received.header("x-request").unwrap_or_default());
        if delayed.contains(id.as_ref()) {
            edges.push((received.at - Duration::from_millis(400), 1));
            edges.push((received.at, -1));
        }
    }
    edges.sort();
    let (mut held, mut upstream_peak) = (0, 0);
    for (_, step) in edges {
        held += step;
        upstream_peak = upstream_peak.max(held);
    }
    let overflow = stat(&envoy, "overflow");
    eprintln!(
        "[fault] max_active 10 with 40 clients: {} delayed, {overflow} passed undelayed; at most {upstream_peak} delayed at once (from the upstream's arrivals), gauge peak {gauge_peak}",
        delayed.len()
    );
    assert_eq!(stat(&envoy, "delays"), delayed.len() as u64);
    assert!(upstream_peak <= 10, "{upstream_peak} delayed at once");
    assert!(upstream_peak >= 8, "the cap was reached: {upstream_peak}");
    assert!((1..=10).contains(&gauge_peak), "gauge peak {gauge_peak}");
    assert!(overflow > 0);
    assert_eq!(stat(&envoy, "active"), 0);

    // A client that hangs up mid-delay gives its slot back when Envoy ends the stream.
    let before = stat(&envoy, "delays");
    {
        let mut gone = TcpStream::connect(addr).unwrap();
        gone.write_all(b"GET /chaos HTTP/1.1\r\nhost: seawall.test\r\n\r\n")
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while stat(&envoy, "active") == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(stat(&envoy, "active"), 1);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat(&envoy, "active") != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(stat(&envoy, "active"), 0, "the slot came back");
    assert_eq!(stat(&envoy, "delays"), before + 1);
}

const CONTROLLED: &str = r#"{"chaos": {"header_control": {"secret_header": "x-chaos-key", "secret": "s3cret-key", "max_percent": 50}}}"#;

#[test]
fn header_control_without_the_secret_does_nothing_and_with_it_is_capped() {
    let _alone = alone();
    let upstream = Upstream::start();
    let envoy = chaos(&upstream, 2, CONTROLLED, ONE_ROUTE);
    let mut client = Client::connect(envoy.listener_addr());
    let asking = |secret: &str| {
        Request::get("/chaos")
            .header("x-seawall-fault-abort", "418")
            .header("x-seawall-fault-percent", "100")
            .header("x-chaos-key", secret)
    };
    for _ in 0..50 {
        assert_eq!(client.send(&asking("guess")).unwrap().status, 200);
    }
    assert_eq!(stat(&envoy, "header_control_rejected"), 50);
    assert_eq!(upstream.total(), 50);
    for received in upstream.received() {
        for header in [
            "x-seawall-fault-abort",
            "x-seawall-fault-percent",
            "x-chaos-key",
        ] {
            assert_eq!(
                received.header(header),
                None,
                "{header} reached the upstream"
            );
        }
    }
    let statuses: Vec<u16> = (0..1000)
        .map(|_| client.send(&asking("s3cret-key")).unwrap().status)
        .collect();
    let aborted = statuses.iter().filter(|&&s| s == 418).count();
    eprintln!("[fault] header control with the secret, 100% asked, capped at 50%: {aborted} of 1000 aborted");
    assert!((430..=570).contains(&aborted), "{aborted} of 1000");
    assert_eq!(
        aborted + statuses.iter().filter(|&&s| s == 200).count(),
        1000
    );
    assert_eq!(stat(&envoy, "header_control_applied"), 1000);
    assert_eq!(stat(&envoy, "aborts"), aborted as u64);
}

#[test]
fn an_experiment_past_its_end_injects_nothing_and_response_faults_replace_the_answer() {
    let _alone = alone();
    let upstream = Upstream::start();
    let envoy = chaos(
        &upstream,
        2,
        r#"{"chaos": {"abort": {"percent": 100}, "active_between": {"start": "2020-01-01T00:00:00Z", "end": "2020-01-01T01:00:00Z"}},
            "late": {"response": {"status": 500, "body": "injected late\n", "percent": 100}}}"#,
        r#"[{"name": "chaos", "match": {"path": {"prefix": "/chaos"}}, "faults": ["chaos"]},
            {"name": "late", "match": {"path": {"prefix": "/late"}}, "faults": ["late"]}]"#,
    );
    let mut client = Client::connect(envoy.listener_addr());
    for _ in 0..100 {
        assert_eq!(client.send(&Request::get("/chaos")).unwrap().status, 200);
    }
    assert_eq!(stat(&envoy, "inactive"), 100);
    assert_eq!(stat(&envoy, "aborts"), 0);
    assert_eq!(upstream.total(), 100);

    let late = client.send(&Request::get("/late")).unwrap();
    assert_eq!(late.status, 500);
    assert_eq!(late.text(), "injected late\n");
    assert_eq!(late.header("x-seawall-fault"), Some("response"));
    assert_eq!(upstream.count_path("/late"), 1, "the upstream did answer");
    assert_eq!(
        envoy.stats().seawall("seawall.fault.late.response_faults"),
        1
    );
}
