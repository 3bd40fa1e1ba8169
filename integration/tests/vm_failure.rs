//! What Envoy 1.40 does when seawall's VM fails, for each Wasm `PluginConfig` failure setting:
//! none, `failure_policy: FAIL_CLOSED`, `FAIL_OPEN`, `FAIL_RELOAD` (default and configured
//! backoff), and the deprecated `fail_open: true`. The README's recommended setting rests on these
//! observations, so each is asserted exactly and a change in Envoy's behaviour fails a scenario.
//!
//! seawall has no panic on its request path, so the VM is failed on purpose: the plugin's
//! `trap-on-header` test build traps (a Wasm `unreachable`) on a request carrying
//! `x-seawall-test-trap: 1`, before seawall decides anything. Every scenario runs Envoy with two
//! workers and one connection pinned to each (`w0` traps, `w1` is the other worker), with a
//! rate limit (burst 5, 1/min: no token comes back during a scenario) and a circuit breaker. Before
//! the trap, `w0` spends 2 tokens and opens the breaker; after it, the scenario reads what each
//! worker answers, what the upstream saw, whether seawall's shared state (the bucket and the open
//! breaker, in proxy shared data outside the VM) still holds, Envoy's `wasm.*` stats, and Envoy's
//! log for when a VM came back.

use std::time::Duration;

use seawall_integration::envoy::{trapping_wasm, WasmFailure};
use seawall_integration::{
    Behaviour, Client, Envoy, EnvoyConfig, Match, Request, Response, Stats, Upstream,
};

/// A bucket of 5 that refills one token a minute, so every scenario can count tokens exactly,
/// and a breaker that opens after 2 consecutive failures and stays open past the scenario.
const PLUGIN: &str = r#"{"name": "vmfail",
  "rate_limits": {"global": {"rate": "1/m", "burst": 5}},
  "circuit_breakers": {"backend": {"open_when": {"consecutive_failures": 2}, "open_for": "60s"}},
  "routes": [
    {"name": "limited", "match": {"path": {"prefix": "/limited"}}, "rate_limits": ["global"]},
    {"name": "guarded", "match": {"path": {"prefix": "/guarded"}}, "circuit_breaker": "backend"}]}"#;

const TRAP_HEADER: &str = "x-seawall-test-trap";
/// What Envoy logs (wasm_vm.cc) when the guest traps in the request-headers callback.
const TRAP_LOG: &str =
    "Function: proxy_on_request_headers failed: Uncaught RuntimeError: unreachable";
/// What seawall logs when a VM's root context has compiled the config: once per VM.
const LOADED_LOG: &str = "plugin config \"vmfail\" loaded";
/// Envoy's Wasm stats for the plugin named `seawall` (the filter's `config.name`).
const RELOAD_SUCCESS: &str = "wasm.seawall.vm_reload_success";
const RELOAD_FAILURE: &str = "wasm.seawall.vm_reload_failure";
const RELOAD_BACKOFF: &str = "wasm.seawall.vm_reload_backoff";
/// VMs V8 created so far (the main thread's, each worker's, and every reload's).
const VMS_CREATED: &str = "wasm.envoy.wasm.runtime.v8.created";

struct Scene {
    upstream: Upstream,
    envoy: Envoy,
    /// The trapping worker's connection.
    w0: Client,
    /// The other worker's connection.
    w1: Client,
}

/// Envoy with two workers and the trapping build; the upstream fails `/guarded` with 503.
fn start(failure: Option<WasmFailure>) -> Scene {
    let upstream = Upstream::start();
    upstream.set_rule(
        Match::PathPrefix("/guarded".into()),
        Behaviour::ok().status(503),
    );
    let mut config = EnvoyConfig::to_upstream(upstream.addr())
        .concurrency(2)
        .wasm(trapping_wasm())
        .seawall(PLUGIN);
    if let Some(failure) = failure {
        config = config.wasm_failure(failure);
    }
    let envoy = Envoy::start(config);
    let mut workers = envoy.client_per_worker().into_iter();
    let (w0, w1) = (workers.next().unwrap(), workers.next().unwrap());
    Scene {
        upstream,
        envoy,
        w0,
        w1,
    }
}

/// Sends on the worker's own connection; a closed connection would send the next request to
/// whichever worker the kernel picks, so it fails the scenario instead.
fn send(client: &mut Client, request: &Request) -> Response {
    let response = client.send(request).expect("a response");
    assert!(
        client.is_connected(),
        "Envoy closed the connection after {} {}: the worker could no longer be told",
        response.status,
        response.text()
    );
    response
}

fn limited() -> Request {
    Request::get("/limited")
}

fn guarded() -> Request {
    Request::get("/guarded")
}

/// The answer Envoy gives for a failed VM (`sendLocalReply(503, "wasm_fail_stream")`): a bare 503
/// with an empty body, nothing from seawall, nothing from the upstream.
fn assert_vm_failure(response: &Response, what: &str) {
    assert_eq!(response.status, 503, "{what}: {}", response.text());
    assert_eq!(response.text(), "", "{what}");
    assert_eq!(response.header("content-length"), Some("0"), "{what}");
    for header in ["ratelimit-limit", "x-seawall-circuit", "x-upstream-path"] {
        assert_eq!(response.header(header), None, "{what}: {header}");
    }
}

/// A request seawall admitted from the shared bucket, which then held `remaining` tokens.
fn assert_admitted(response: &Response, remaining: u64, what: &str) {
    assert_eq!(response.status, 200, "{what}: {}", response.text());
    assert_eq!(response.header_u64("ratelimit-limit"), Some(5), "{what}");
    assert_eq!(
        response.header_u64("ratelimit-remaining"),
        Some(remaining),
        "{what}"
    );
}

fn assert_limited(response: &Response, what: &str) {
    assert_eq!(response.status, 429, "{what}: {}", response.text());
    assert_eq!(
        response.header_u64("ratelimit-remaining"),
        Some(0),
        "{what}"
    );
}

fn assert_breaker_open(response: &Response, what: &str) {
    assert_eq!(response.status, 503, "{what}: {}", response.text());
    assert_eq!(response.header("x-seawall-circuit"), Some("open"), "{what}");
    assert_eq!(response.header("x-upstream-path"), None, "{what}");
}

/// A request that went to the upstream with no seawall filter in its way.
fn assert_bypassed(response: &Response, path: &str, status: u16, what: &str) {
    assert_eq!(response.status, status, "{what}: {}", response.text());
    assert_eq!(response.header("x-upstream-path"), Some(path), "{what}");
    for header in [
        "ratelimit-limit",
        "ratelimit-remaining",
        "x-seawall-circuit",
    ] {
        assert_eq!(response.header(header), None, "{what}: {header}");
    }
}

/// Before the trap, on `w0`: 2 of the 5 tokens spent, and the breaker opened by two upstream
/// failures (a third request is refused by it). Returns Envoy's VM count then.
fn spend_and_open(scene: &mut Scene) -> u64 {
    assert_admitted(&send(&mut scene.w0, &limited()), 4, "w0 before the trap");
    assert_admitted(&send(&mut scene.w0, &limited()), 3, "w0 before the trap");
    for _ in 0..2 {
        let response = send(&mut scene.w0, &guarded());
        assert_eq!(response.status, 503);
        assert_eq!(response.header("x-upstream-path"), Some("/guarded"));
    }
    assert_breaker_open(&send(&mut scene.w0, &guarded()), "w0 before the trap");
    assert_eq!(scene.upstream.count_path("/limited"), 2);
    assert_eq!(scene.upstream.count_path("/guarded"), 2);
    // seawall batches metric updates until the worker's next tick, and a VM that traps loses what
    // it has not flushed: so the trap waits until both workers have ticked (`stats()` waits for
    // that), and every count below is exact.
    let stats = scene.envoy.stats();
    assert_eq!(stats.seawall("seawall.rate_limit.global.allowed"), 2);
    assert_eq!(stats.seawall("seawall.circuit_breaker.backend.opened"), 1);
    assert_eq!(stats.seawall("seawall.circuit_breaker.backend.rejected"), 1);
    stat(&stats, VMS_CREATED)
}

fn trap(scene: &mut Scene) -> Response {
    send(&mut scene.w0, &limited().header(TRAP_HEADER, "1"))
}

fn stat(stats: &Stats, name: &str) -> u64 {
    stats
        .get(name)
        .unwrap_or_else(|| panic!("Envoy has no stat {name}"))
}

/// The trap is in Envoy's log exactly `times` times.
fn assert_traps_logged(envoy: &Envoy, times: usize) {
    let log = envoy.log();
    assert_eq!(
        log.matches(TRAP_LOG).count(),
        times,
        "trap lines in the log"
    );
}

/// After the trap: on `w1` seawall goes on from the shared bucket (3 left: 2, 1, 0, then 429) and
/// the breaker it shares is still open. Returns nothing: every answer is asserted.
fn other_worker_still_enforces(scene: &mut Scene) {
    for remaining in [2, 1, 0] {
        assert_admitted(
            &send(&mut scene.w1, &limited()),
            remaining,
            "w1 after the trap",
        );
    }
    assert_limited(&send(&mut scene.w1, &limited()), "w1 after the trap");
    assert_breaker_open(&send(&mut scene.w1, &guarded()), "w1 after the trap");
}

/// FAIL_CLOSED, and no setting at all (Envoy's default is FAIL_CLOSED): the trapping request and
/// every later request on that worker get a bare 503 and never reach the upstream; the worker never
/// gets a VM back; the other worker enforces the same bucket and breaker as before.
fn fails_closed(failure: Option<WasmFailure>) {
    let mut scene = start(failure);
    let vms = spend_and_open(&mut scene);

    assert_vm_failure(&trap(&mut scene), "the trapping request");
    for _ in 0..3 {
        assert_vm_failure(&send(&mut scene.w0, &limited()), "w0 after the trap");
    }
    assert_vm_failure(&send(&mut scene.w0, &guarded()), "w0 after the trap");
    other_worker_still_enforces(&mut scene);

    // Only w1's three admissions reached the upstream after the trap.
    assert_eq!(scene.upstream.count_path("/limited"), 5);
    assert_eq!(scene.upstream.count_path("/guarded"), 2);
    let stats = scene.envoy.stats();
    assert_eq!(stats.seawall("seawall.rate_limit.global.allowed"), 5);
    assert_eq!(stats.seawall("seawall.rate_limit.global.limited"), 1);
    assert_eq!(stats.seawall("seawall.circuit_breaker.backend.rejected"), 2);
    // Requests on the failed worker never reach seawall: only the 2 before and w1's 4 count.
    assert_eq!(stats.seawall("seawall.route.limited.requests"), 6);
    assert_eq!(stat(&stats, VMS_CREATED), vms, "no VM was created");
    for name in [RELOAD_SUCCESS, RELOAD_FAILURE, RELOAD_BACKOFF] {
        assert_eq!(stat(&stats, name), 0, "{name}");
    }
    // Still failed after the other worker ticked twice (`stats()` waits for that): no reload path.
    assert_vm_failure(&send(&mut scene.w0, &limited()), "w0 at the end");
    assert_traps_logged(&scene.envoy, 1);
}

#[test]
fn with_no_failure_setting_a_trapped_worker_answers_503_for_good() {
    fails_closed(None);
}

#[test]
fn fail_closed_a_trapped_worker_answers_503_for_good_and_the_other_still_enforces() {
    fails_closed(Some(WasmFailure::FailClosed));
}

/// FAIL_OPEN and the deprecated `fail_open: true`: after the trap the failed worker sends every
/// request to the upstream with no seawall at all (past the spent limit, through the open
/// breaker), while the other worker still enforces. They differ only in the trapping request:
/// Envoy fails it with a 503 under FAIL_OPEN (its `PluginBase::fail_open_` follows only the legacy
/// field), and lets it through under `fail_open: true`.
fn fails_open(failure: WasmFailure, trapping_request_passes: bool) {
    let mut scene = start(Some(failure));
    let vms = spend_and_open(&mut scene);

    let trapped = trap(&mut scene);
    if trapping_request_passes {
        assert_bypassed(&trapped, "/limited", 200, "the trapping request");
    } else {
        assert_vm_failure(&trapped, "the trapping request");
    }
    for _ in 0..3 {
        assert_bypassed(
            &send(&mut scene.w0, &limited()),
            "/limited",
            200,
            "w0 after the trap",
        );
    }
    // The breaker is open in shared data, and the failing upstream gets the request anyway.
    assert_bypassed(
        &send(&mut scene.w0, &guarded()),
        "/guarded",
        503,
        "w0 after the trap",
    );
    other_worker_still_enforces(&mut scene);

    let passed = u64::from(trapping_request_passes);
    // 5 admitted by seawall, and 3 (or 4) more past the limit.
    assert_eq!(scene.upstream.count_path("/limited"), 8 + passed);
    assert_eq!(scene.upstream.count_path("/guarded"), 3);
    let stats = scene.envoy.stats();
    assert_eq!(stats.seawall("seawall.rate_limit.global.allowed"), 5);
    assert_eq!(stats.seawall("seawall.route.limited.requests"), 6);
    assert_eq!(stats.seawall("seawall.circuit_breaker.backend.rejected"), 2);
    assert_eq!(stat(&stats, VMS_CREATED), vms, "no VM was created");
    for name in [RELOAD_SUCCESS, RELOAD_FAILURE, RELOAD_BACKOFF] {
        assert_eq!(stat(&stats, name), 0, "{name}");
    }
    assert_bypassed(
        &send(&mut scene.w0, &limited()),
        "/limited",
        200,
        "w0 at the end",
    );
    assert_traps_logged(&scene.envoy, 1);
    let deprecated = "Using deprecated option 'envoy.extensions.wasm.v3.PluginConfig.fail_open'";
    assert_eq!(
        scene.envoy.log().contains(deprecated),
        failure == WasmFailure::LegacyFailOpen
    );
}

#[test]
fn fail_open_a_trapped_worker_lets_everything_through_without_seawall_but_fails_the_trapping_request(
) {
    fails_open(WasmFailure::FailOpen, false);
}

#[test]
fn deprecated_fail_open_lets_even_the_trapping_request_through() {
    fails_open(WasmFailure::LegacyFailOpen, true);
}

/// When a line of Envoy's log was written, in ms (its `[YYYY-MM-DD HH:MM:SS.mmm]` prefix, local
/// time), and the thread that wrote it.
fn log_time_and_thread(line: &str) -> Option<(i64, String)> {
    let stamp = line.strip_prefix('[')?.get(..23)?;
    let thread = line.get(26..)?.split(']').next()?.to_owned();
    let field = |range: std::ops::Range<usize>| stamp.get(range)?.parse::<i64>().ok();
    let (year, month, day) = (field(0..4)?, field(5..7)?, field(8..10)?);
    let (hour, minute, second, milli) = (
        field(11..13)?,
        field(14..16)?,
        field(17..19)?,
        field(20..23)?,
    );
    // Days from the civil date (Howard Hinnant's algorithm): only differences are used.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some((
        ((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + milli,
        thread,
    ))
}

/// The times (ms, Envoy's clock) at which `thread` logged `needle`.
fn logged_at(log: &str, thread: &str, needle: &str) -> Vec<i64> {
    log.lines()
        .filter(|line| line.contains(needle))
        .filter_map(log_time_and_thread)
        .filter(|(_, t)| t == thread)
        .map(|(at, _)| at)
        .collect()
}

/// Sends on `w0` until seawall answers again (bounded): the VM-failure 503s meanwhile are Envoy's
/// reload backoff. Returns the answer and how many requests were refused first.
fn until_reloaded(scene: &mut Scene, request: &Request) -> (Response, u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut refused = 0;
    loop {
        let response = send(&mut scene.w0, request);
        if response.status != 503 || response.header("x-upstream-path").is_some() {
            return (response, refused);
        }
        assert_vm_failure(&response, "w0 while the VM is down");
        refused += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "no VM came back within 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// FAIL_RELOAD: the trapping request gets a bare 503; the worker's next request after the reload
/// backoff gets a new VM, and that VM finds the bucket and the open breaker where the old one left
/// them (proxy shared data lives in Envoy, keyed by vm_id, and the other VMs keep it alive). A
/// second trap soon after shows the backoff: Envoy reloads lazily, on a request that comes at least
/// a random [base, 1.5 × base) after the worker's last load, and fails requests before that.
fn reloads(backoff_base: Option<Duration>) {
    let base_ms = backoff_base.map_or(1000, |base| base.as_millis() as i64);
    let mut scene = start(Some(WasmFailure::FailReload { backoff_base }));
    let vms = spend_and_open(&mut scene);

    assert_vm_failure(&trap(&mut scene), "the trapping request");
    let (first, refused_first) = until_reloaded(&mut scene, &limited());
    assert_admitted(&first, 2, "w0's first request on the reloaded VM");
    // The reloaded VM's tick hands its update to Envoy within 100 ms; a trap before that would
    // lose it, so the count is awaited (well inside the backoff).
    let allowed = scene.envoy.wait_for_stat(
        "wasmcustom.seawall.rate_limit.global.allowed",
        Duration::from_secs(5),
        |allowed| allowed >= 3,
    );
    assert_eq!(allowed, 3, "the reloaded VM's metrics reach Envoy");
    // Right after a reload the backoff has not run out: the next trap's worker stays down until it
    // has, and fails every request meanwhile.
    assert_vm_failure(&trap(&mut scene), "the second trapping request");
    assert_vm_failure(
        &send(&mut scene.w0, &limited()),
        "w0 just after the second trap",
    );
    let (second, refused_second) = until_reloaded(&mut scene, &limited());
    assert_admitted(&second, 1, "w0's first request on the second reloaded VM");

    // Both reloaded VMs decide from the same shared bucket and breaker as the other worker.
    assert_admitted(&send(&mut scene.w1, &limited()), 0, "w1 after the reloads");
    assert_limited(&send(&mut scene.w0, &limited()), "w0 after the reloads");
    assert_limited(&send(&mut scene.w1, &limited()), "w1 after the reloads");
    assert_breaker_open(&send(&mut scene.w0, &guarded()), "w0 after the reloads");
    assert_breaker_open(&send(&mut scene.w1, &guarded()), "w1 after the reloads");
    assert_eq!(scene.upstream.count_path("/limited"), 5);
    assert_eq!(scene.upstream.count_path("/guarded"), 2);

    let stats = scene.envoy.stats();
    assert_eq!(stat(&stats, RELOAD_SUCCESS), 2);
    assert_eq!(stat(&stats, RELOAD_FAILURE), 0);
    // Each refused request was one backoff check (the one right after the second trap included).
    assert!(refused_second >= 1);
    assert_eq!(
        stat(&stats, RELOAD_BACKOFF),
        refused_first + 1 + refused_second
    );
    assert_eq!(stat(&stats, VMS_CREATED), vms + 2, "one new VM per reload");
    // The reloaded VMs' metric updates reach Envoy (their own ticks flush them).
    assert_eq!(stats.seawall("seawall.rate_limit.global.allowed"), 5);
    assert_eq!(stats.seawall("seawall.rate_limit.global.limited"), 2);
    assert_eq!(stats.seawall("seawall.circuit_breaker.backend.rejected"), 3);

    // Envoy's log: the worker that trapped loaded the config three times (start, two reloads),
    // each reload after a trap, and the second one at least the backoff base after the first.
    let log = scene.envoy.log();
    assert_traps_logged(&scene.envoy, 2);
    let (_, thread) = log
        .lines()
        .find(|line| line.contains(TRAP_LOG))
        .and_then(log_time_and_thread)
        .expect("the trap's line names its thread");
    let traps = logged_at(&log, &thread, TRAP_LOG);
    let loads = logged_at(&log, &thread, LOADED_LOG);
    assert_eq!(traps.len(), 2, "both traps on one worker");
    assert_eq!(loads.len(), 3, "the worker's loads: {loads:?}");
    assert!(
        loads[1] >= traps[0] && loads[2] >= traps[1],
        "{loads:?} {traps:?}"
    );
    let gap = loads[2] - loads[1];
    println!(
        "[vm_failure] FAIL_RELOAD, backoff base {base_ms} ms: first reload {} ms after the first trap ({refused_first} requests refused), second {gap} ms after the first reload ({refused_second} refused)",
        loads[1] - traps[0]
    );
    // Backoff runs from the worker's last load, its start included.
    assert!(
        loads[1] - loads[0] >= base_ms,
        "first reload {} ms after the worker's start",
        loads[1] - loads[0]
    );
    assert!(gap >= base_ms, "reloaded {gap} ms after the last load");
    // The backoff draws at most 1.5 × base; the rest is this scenario's 50 ms polling and a
    // loaded machine.
    assert!(
        gap < base_ms * 3 / 2 + 500,
        "reloaded {gap} ms after the last load"
    );
}

#[test]
fn fail_reload_brings_the_vm_back_after_the_backoff_and_it_finds_the_bucket_and_breaker_as_they_were(
) {
    reloads(None);
}

#[test]
fn fail_reload_honours_the_reload_backoff_base_interval() {
    reloads(Some(Duration::from_secs(2)));
}
