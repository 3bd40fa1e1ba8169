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

/// Envoy with these faults, and its access log on: delays are timed by Envoy itself.
fn chaos(upstream: &Upstream, workers: u32, faults: &str, routes: &str) -> Envoy {
    Envoy::start(
        EnvoyConfig::to_upstream(upstream.addr())
            .concurrency(workers)
            .access_log(true)
            .seawall(&format!(r#"{{"faults": {faults}, "routes": {routes}}}"#)),
    )
}

const ONE_ROUTE: &str = r#"[{"name": "chaos", "match": {"path": {"prefix": "/chaos"}}, "faults": ["chaos"]}, {"name": "calm"}]"#;

fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy
        .stats()
        .seawall(&format!("seawall.fault.chaos.{name}"))
}

/// Waits (bounded) until no fault is active: a stream gives its slot back when Envoy ends it,
/// just after its client had the answer.
fn wait_until_no_fault_is_active(envoy: &Envoy) {
    let active = envoy.wait_for_stat(
        "wasmcustom.seawall.fault.chaos.active",
        Duration::from_secs(10),
        |active| active == 0,
    );
    assert_eq!(
        active, 0,
        "faults still active 10 s after the streams ended"
    );
}

/// The `p`th percentile of `spans` (sorted here), as `LoadReport::percentile` computes it.
fn percentile(spans: &mut [Duration], p: f64) -> Duration {
    spans.sort();
    if spans.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (spans.len() - 1) as f64).round() as usize;
    spans[rank.min(spans.len() - 1)]
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
    wait_until_no_fault_is_active(&envoy);

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
    // The calm route is used once the delayed requests are all out.
    let active = envoy.wait_for_stat(
        "wasmcustom.seawall.fault.chaos.active",
        Duration::from_secs(10),
        |active| active >= 150,
    );
    assert!(
        active >= 150,
        "only {active} delayed requests in flight after 10 s"
    );
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
    // Timed by Envoy: how long it held each delayed request before sending it upstream, and how
    // long each calm request took from its first byte in to its last byte out. The client's own
    // latencies (printed beside) also count its 200 threads' scheduling.
    let log = envoy.wait_for_access_log(
        (delayed.sent() + calm.sent()) as usize,
        Duration::from_secs(20),
    );
    let mut held: Vec<Duration> = log
        .iter()
        .filter(|entry| entry.path.starts_with("/chaos"))
        .map(|entry| entry.forwarded.expect("a delayed request went upstream"))
        .collect();
    let mut calm_took: Vec<Duration> = log
        .iter()
        .filter(|entry| entry.path.starts_with("/calm"))
        .map(|entry| entry.duration.expect("a calm request was answered"))
        .collect();
    assert_eq!(held.len() as u64, delayed.sent());
    assert_eq!(calm_took.len() as u64, calm.sent());
    let p50 = percentile(&mut held, 50.0);
    let calm_p50 = percentile(&mut calm_took, 50.0);
    eprintln!(
        "[fault] 200 ms delay with {peak_active} delayed in flight: Envoy held them p50 {p50:?}, p99 {:?} over {} requests; calm route p50 {calm_p50:?}, p99 {:?} over {} (client latencies: delayed p50 {:?}, calm p50 {:?})",
        percentile(&mut held, 99.0),
        delayed.sent(),
        percentile(&mut calm_took, 99.0),
        calm.sent(),
        delayed.percentile(50.0),
        calm.percentile(50.0),
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
        calm_p50 < Duration::from_millis(50),
        "calm p50 {calm_p50:?}"
    );
    assert_eq!(stat(&envoy, "delays"), delayed.sent());
    wait_until_no_fault_is_active(&envoy);
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
    // 40 clients; each request says who it is, so Envoy's access log and the upstream's arrivals
    // can be matched up.
    let sequence = Arc::new(Mutex::new(0u64));
    let started = Instant::now();
    let clients: Vec<_> = (0..40)
        .map(|_| {
            let sequence = Arc::clone(&sequence);
            std::thread::spawn(move || {
                let mut client = Client::connect(addr);
                let mut sent = 0u64;
                while started.elapsed() < Duration::from_secs(2) {
                    let id = {
                        let mut next = sequence.lock().unwrap();
                        *next += 1;
                        *next
                    };
                    let response = client
                        .send(&Request::get("/chaos").header("x-request", id.to_string()))
                        .unwrap();
                    assert_eq!(response.status, 200);
                    sent += 1;
                    // Paced, so the upstream records every request: at most 40 clients × 200/s
                    // × 2 s = 16,000, under its 20,000. Still far more clients than slots.
                    std::thread::sleep(Duration::from_millis(5));
                }
                sent
            })
        })
        .collect();
    let mut gauge_peak = 0;
    while started.elapsed() < Duration::from_secs(2) {
        gauge_peak = gauge_peak.max(stat(&envoy, "active"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent: u64 = clients.into_iter().map(|c| c.join().unwrap()).sum();
    // Which requests were delayed, as Envoy timed them: held 400 ms before going upstream (the
    // others passed at once). A delayed request reached the upstream when its delay ended: it
    // was held during the 400 ms before its arrival.
    let log = envoy.wait_for_access_log(sent as usize, Duration::from_secs(20));
    let delayed: std::collections::HashSet<String> = log
        .iter()
        .filter(|entry| {
            entry
                .forwarded
                .is_some_and(|held| held >= Duration::from_millis(400))
        })
        .filter_map(|entry| entry.request.clone())
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
        "[fault] max_active 10 with 40 clients: {sent} requests, {} delayed, {overflow} passed undelayed; at most {upstream_peak} delayed at once (from the upstream's arrivals), gauge peak {gauge_peak}",
        delayed.len()
    );
    assert_eq!(upstream.total(), sent);
    assert_eq!(stat(&envoy, "delays"), delayed.len() as u64);
    assert!(upstream_peak <= 10, "{upstream_peak} delayed at once");
    assert!(upstream_peak >= 8, "the cap was reached: {upstream_peak}");
    assert!((1..=10).contains(&gauge_peak), "gauge peak {gauge_peak}");
    assert!(overflow > 0);
    wait_until_no_fault_is_active(&envoy);

    // A client that hangs up mid-delay gives its slot back when Envoy ends the stream. It leaves
    // once Envoy counted the delay; that it left before the delay ended shows in the access log
    // (nothing went upstream). A client that could not leave within the 400 ms tries again.
    let deadline = Instant::now() + Duration::from_secs(30);
    for attempt in 1.. {
        assert!(
            Instant::now() < deadline,
            "no client managed to hang up mid-delay within 30 s ({attempt} tries)"
        );
        let id = format!("gone-{attempt}");
        let before = stat(&envoy, "delays");
        let logged = envoy.access_log().len();
        let active_then = {
            let mut gone = TcpStream::connect(addr).unwrap();
            gone.write_all(
                format!("GET /chaos HTTP/1.1\r\nhost: seawall.test\r\nx-request: {id}\r\n\r\n")
                    .as_bytes(),
            )
            .unwrap();
            let delays = envoy.wait_for_stat(
                "wasmcustom.seawall.fault.chaos.delays",
                Duration::from_secs(10),
                |delays| delays > before,
            );
            assert_eq!(delays, before + 1, "the request was delayed");
            stat(&envoy, "active")
        };
        let active = envoy.wait_for_stat(
            "wasmcustom.seawall.fault.chaos.active",
            Duration::from_secs(10),
            |active| active == 0,
        );
        assert_eq!(active, 0, "the slot came back");
        let log = envoy.wait_for_access_log(logged + 1, Duration::from_secs(10));
        let entry = log
            .iter()
            .find(|entry| entry.request.as_deref() == Some(id.as_str()))
            .unwrap_or_else(|| panic!("{id} is not in the access log"));
        if entry.forwarded.is_none() {
            assert_eq!(active_then, 1, "the delayed request held its slot");
            assert!(
                upstream
                    .received()
                    .iter()
                    .all(|r| r.header("x-request") != Some(id.as_bytes())),
                "{id} reached the upstream"
            );
            break;
        }
    }
}

const SECRET: &str = "s3cret-key-of-16b";
const CONTROLLED: &str = r#"{"chaos": {"header_control": {"secret_header": "x-chaos-key", "secret": "s3cret-key-of-16b", "max_percent": 50}}}"#;

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
    let responses: Vec<_> = (0..1000)
        .map(|_| client.send(&asking(SECRET)).unwrap())
        .collect();
    let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
    let aborted = statuses.iter().filter(|&&s| s == 418).count();
    eprintln!("[fault] header control with the secret, 100% asked, capped at 50%: {aborted} of 1000 aborted");
    assert!((430..=570).contains(&aborted), "{aborted} of 1000");
    assert_eq!(
        aborted + statuses.iter().filter(|&&s| s == 200).count(),
        1000
    );
    assert_eq!(stat(&envoy, "header_control_applied"), 1000);
    assert_eq!(stat(&envoy, "aborts"), aborted as u64);

    // The secret never shows: not in a reply, not upstream, not in a stat, not in Envoy's log.
    for response in &responses {
        assert!(!response.text().contains(SECRET));
        assert!(response
            .headers
            .iter()
            .all(|(_, value)| !String::from_utf8_lossy(value).contains(SECRET)));
    }
    assert!(upstream
        .received()
        .iter()
        .all(|received| received.header("x-chaos-key").is_none()));
    assert!(!envoy.prometheus().contains(SECRET));
    assert!(!envoy.admin_get("/stats").unwrap().1.contains(SECRET));
    assert!(
        !envoy.log().contains(SECRET),
        "the secret is in Envoy's log"
    );
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
