//! `cargo xtask demo`: real Envoy with seawall (envoy/demo.yaml) in front of a demo upstream, all
//! on localhost, and a curl line per feature with what it returned. Envoy stays up afterwards for
//! you to try more, unless `--once` (used by the test command) asks it to stop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use seawall_integration::client::{load, send_once, Client, LoadSpec, Request};
use seawall_integration::compose::ComposeProject;
use seawall_integration::remote::RemoteUpstream;
use seawall_integration::{Behaviour, Match, Upstream};

use crate::{build_wasm, image, install_envoy, workspace_root};

const LISTENER: &str = "127.0.0.1:10000";
const ADMIN: &str = "127.0.0.1:9901";
const UPSTREAM: &str = "127.0.0.1:18080";
/// The compose demo's upstream control port, published by envoy/docker-compose.yaml.
const CONTROL: &str = "127.0.0.1:18081";
const COMPOSE_PROJECT: &str = "seawall-demo";

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The demo's upstream: in this process, or the compose demo's container, driven through its
/// control port.
enum DemoUpstream {
    Local(Upstream),
    Remote(RemoteUpstream),
}

impl DemoUpstream {
    fn set_rule(&self, matcher: Match, behaviour: Behaviour) -> Result<(), String> {
        match self {
            DemoUpstream::Local(upstream) => {
                upstream.set_rule(matcher, behaviour);
                Ok(())
            }
            DemoUpstream::Remote(remote) => remote.set_rule(&matcher, &behaviour),
        }
    }

    fn total(&self) -> Result<u64, String> {
        match self {
            DemoUpstream::Local(upstream) => Ok(upstream.total()),
            DemoUpstream::Remote(remote) => remote.total(),
        }
    }
}

/// What runs the demo: Envoy as a process of ours, or the compose project.
enum Stage {
    Native {
        envoy: KillOnDrop,
        log_path: PathBuf,
    },
    Compose(ComposeProject),
}

pub fn run(once: bool, compose: bool) -> Result<(), String> {
    let wasm = build_wasm()?;
    let (upstream, stage) = if compose {
        start_compose(&wasm)?
    } else {
        start_native()?
    };
    let listener: SocketAddr = LISTENER.parse().map_err(|_| "bad listener address")?;
    match &stage {
        Stage::Native { .. } => println!("\nEnvoy 1.40 (--concurrency 2) with seawall on {LISTENER}, admin on {ADMIN}, demo upstream on {UPSTREAM}.\n"),
        Stage::Compose(_) => println!("\nThe compose demo (envoy/docker-compose.yaml): Envoy 1.40 (--concurrency 2) with seawall, published on {LISTENER} and admin {ADMIN}; the demo upstream is a container on the compose network, its control port on {CONTROL}.\n"),
    }
    script(listener, &upstream)?;
    if once {
        return Ok(());
    }
    match stage {
        Stage::Native {
            mut envoy,
            log_path,
        } => {
            println!(
                "\nEnvoy keeps running; try the curl lines above. Envoy's log: {}. Ctrl-C to stop.",
                log_path.display()
            );
            let _ = envoy.0.wait();
        }
        Stage::Compose(project) => {
            println!(
                "\nThe compose project keeps running; try the curl lines above. Stop it with:\n  {}",
                project.down_command_line()
            );
            project.keep_running();
        }
    }
    Ok(())
}

fn start_native() -> Result<(DemoUpstream, Stage), String> {
    let envoy_bin = install_envoy()?;
    let upstream = Upstream::bind(UPSTREAM).map_err(|error| {
        format!("demo upstream on {UPSTREAM}: {error} (is another demo running?)")
    })?;
    upstream.set_behaviour(Behaviour::ok().body("hello from the demo upstream\n"));
    let log_path = workspace_root().join("target/demo-envoy.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|error| format!("{}: {error}", log_path.display()))?;
    let child = Command::new(&envoy_bin)
        .current_dir(workspace_root())
        .args([
            "-c",
            "envoy/demo.yaml",
            "--concurrency",
            "2",
            "--use-dynamic-base-id",
            "--disable-hot-restart",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|error| format!("start {}: {error}", envoy_bin.display()))?;
    let mut envoy = KillOnDrop(child);
    wait_ready(&mut envoy, &log_path)?;
    Ok((
        DemoUpstream::Local(upstream),
        Stage::Native { envoy, log_path },
    ))
}

/// Builds the images, brings envoy/docker-compose.yaml up on the demo's usual ports, and waits
/// until Envoy and the upstream container answer.
fn start_compose(wasm: &Path) -> Result<(DemoUpstream, Stage), String> {
    let images = image::build_all()?;
    let project = ComposeProject::up(
        &workspace_root().join("envoy/docker-compose.yaml"),
        COMPOSE_PROJECT,
        &[
            ("SEAWALL_ENVOY_IMAGE", images.envoy),
            ("SEAWALL_UPSTREAM_IMAGE", images.upstream),
            ("SEAWALL_WASM", wasm.display().to_string()),
        ],
    )?;
    let control: SocketAddr = CONTROL.parse().map_err(|_| "bad control address")?;
    let admin: SocketAddr = ADMIN.parse().map_err(|_| "bad admin address")?;
    let upstream = RemoteUpstream::new(control);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(upstream.answers()
        && send_once(admin, &Request::get("/ready")).is_ok_and(|r| r.status == 200))
    {
        if Instant::now() > deadline {
            return Err(format!(
                "the compose demo was not ready within 60 s; are ports 10000, 9901 and 18081 free?\n{}",
                project.logs()
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok((DemoUpstream::Remote(upstream), Stage::Compose(project)))
}

/// The curl lines, each with what came back.
fn script(listener: SocketAddr, upstream: &DemoUpstream) -> Result<(), String> {
    section("Routes: seawall matches its own routes; debug.route_header names the match");
    show(
        listener,
        "curl -si -X POST localhost:10000/api/checkout",
        &Request::post("/api/checkout"),
        &["x-seawall-route"],
    );
    show(
        listener,
        "curl -si -H 'x-tier: free' localhost:10000/api/items",
        &Request::get("/api/items").header("x-tier", "free"),
        &["x-seawall-route"],
    );
    show(
        listener,
        "curl -si localhost:10000/api/items",
        &Request::get("/api/items"),
        &["x-seawall-route"],
    );

    section("Rate limit per user (1/s, burst 3), shared by both Envoy workers");
    let mut client = Client::connect(listener);
    for n in 1..=4 {
        let request = Request::get("/api/items")
            .header("x-tier", "free")
            .header("x-user-id", "alice");
        print_exchange(&mut client, &format!("curl -si -H 'x-tier: free' -H 'x-user-id: alice' localhost:10000/api/items   # {n} of 4"), &request, &["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "retry-after"]);
    }
    show(listener, "curl -si -H 'x-tier: free' -H 'x-user-id: bob' localhost:10000/api/items   # bob has his own bucket", &Request::get("/api/items").header("x-tier", "free").header("x-user-id", "bob"), &["ratelimit-remaining"]);
    show(listener, "curl -si -H 'content-type: application/grpc' -H 'x-tier: free' -H 'x-user-id: alice' localhost:10000/api/pkg.Svc/Call   # gRPC: RESOURCE_EXHAUSTED", &Request::post("/api/pkg.Svc/Call").header("content-type", "application/grpc").header("x-tier", "free").header("x-user-id", "alice"), &["grpc-status"]);

    section("Shadow mode (1/m): never rejects, counts what it would have rejected");
    for _ in 0..3 {
        show(
            listener,
            "curl -si localhost:10000/trial",
            &Request::get("/trial"),
            &["ratelimit-remaining"],
        );
    }

    section("Circuit breaker on /payments: 3 failures in a row open it for 2 s, then one probe tests the upstream");
    upstream.set_rule(
        Match::PathPrefix("/payments".into()),
        Behaviour::ok().status(503).body("upstream is down\n"),
    )?;
    for n in 1..=3 {
        show(
            listener,
            &format!("curl -si localhost:10000/payments   # upstream failure {n} of 3"),
            &Request::get("/payments"),
            &[],
        );
    }
    show(
        listener,
        "curl -si localhost:10000/payments   # open: refused at once, the upstream never sees it",
        &Request::get("/payments"),
        &["x-seawall-circuit", "retry-after"],
    );
    upstream.set_rule(
        Match::PathPrefix("/payments".into()),
        Behaviour::ok().body("payments is back\n"),
    )?;
    println!("  (the upstream heals; waiting out the 2 s open period)");
    thread::sleep(Duration::from_millis(2100));
    show(
        listener,
        "curl -si localhost:10000/payments   # half-open: this request is the probe; its success closes the breaker",
        &Request::get("/payments"),
        &["x-seawall-circuit"],
    );

    section("Retry budget on /flaky: Envoy's router retries, seawall decides how many (budget: 20% of requests + 10/s)");
    upstream.set_rule(
        Match::PathPrefix("/flaky/down".into()),
        Behaviour::ok().status(503).body("down\n"),
    )?;
    upstream.set_rule(
        Match::PathPrefix("/flaky".into()),
        Behaviour::ok().failing(0.5, 503).body("ok after all\n"),
    )?;
    let mut client = Client::connect(listener);
    for _ in 0..2 {
        print_exchange(
            &mut client,
            "curl -si localhost:10000/flaky   # every other attempt fails; a retry absorbs it",
            &Request::get("/flaky"),
            &["x-envoy-attempt-count"],
        );
    }
    print_exchange(
        &mut client,
        "curl -si -H 'x-envoy-max-retries: 10' localhost:10000/flaky/down   # the client's 10 is overwritten: 1 + 2 attempts",
        &Request::get("/flaky/down").header("x-envoy-max-retries", "10"),
        &["x-envoy-attempt-count"],
    );
    print_exchange(
        &mut client,
        "curl -si -X POST localhost:10000/flaky/down   # not idempotent: never retried",
        &Request::post("/flaky/down"),
        &["x-envoy-attempt-count"],
    );
    print_exchange(
        &mut client,
        "curl -si -X POST -H 'idempotency-key: order-7' localhost:10000/flaky/down   # an idempotency key makes it retryable",
        &Request::post("/flaky/down").header("idempotency-key", "order-7"),
        &["x-envoy-attempt-count"],
    );

    section("Fault injection: a sticky 30% abort per user, a 300 ms delay, and header control behind a secret");
    for user in ["alice", "bob", "carol", "dave"] {
        let statuses: Vec<String> = (0..5)
            .map(|_| {
                send_once(listener, &Request::get("/chaos").header("x-user-id", user))
                    .map(|r| r.status.to_string())
                    .unwrap_or_else(|e| e.to_string())
            })
            .collect();
        println!("$ for i in 1 2 3 4 5; do curl -s -o /dev/null -w '%{{http_code}} ' -H 'x-user-id: {user}' localhost:10000/chaos; done");
        println!(
            "  {}   # the same answer every time: {user} is in or out of the experiment",
            statuses.join(" ")
        );
    }
    let started = Instant::now();
    show(
        listener,
        "curl -si localhost:10000/slow   # held 300 ms ± 20 ms, without blocking an Envoy worker",
        &Request::get("/slow"),
        &[],
    );
    println!("  (took {} ms)", started.elapsed().as_millis());
    show(
        listener,
        "curl -si -H 'x-seawall-fault-abort: 418' -H 'x-chaos-key: wrong' localhost:10000/slow   # no secret: ignored (and stripped)",
        &Request::get("/slow").header("x-seawall-fault-abort", "418").header("x-chaos-key", "wrong"),
        &[],
    );
    show(
        listener,
        "curl -si -H 'x-seawall-fault-abort: 418' -H 'x-chaos-key: demo-chaos-secret-1' localhost:10000/slow   # with the secret: applied",
        &Request::get("/slow").header("x-seawall-fault-abort", "418").header("x-chaos-key", "demo-chaos-secret-1"),
        &["x-seawall-fault"],
    );

    section("Degradation on /shop: shed by priority when the upstream slows, a fallback when its probes fail");
    let admin: SocketAddr = ADMIN.parse().map_err(|_| "bad admin address")?;
    show(
        listener,
        "curl -si -H 'x-priority: low' localhost:10000/shop/catalog   # normal: every class passes",
        &Request::get("/shop/catalog").header("x-priority", "low"),
        &[],
    );
    upstream.set_rule(
        Match::Header("x-seawall-cluster".into(), "demo_fallback".into()),
        Behaviour::ok().body("search answered by the demo_fallback cluster\n"),
    )?;
    upstream.set_rule(
        Match::PathPrefix("/shop".into()),
        Behaviour::ok()
            .delay(Duration::from_millis(300))
            .body("shop (slow today)\n"),
    )?;
    println!("  (the shop slows to 300 ms; critical traffic keeps coming)");
    let traffic = thread::spawn(move || {
        load(
            listener,
            LoadSpec::new(4, Duration::from_millis(1500), |_| {
                Request::get("/shop").header("x-priority", "critical")
            }),
        )
    });
    let level = wait_for_level(admin, 1, Duration::from_secs(5));
    let _ = traffic.join();
    println!("  (p95 over 200 ms: seawall.degradation.shop.level = {level})");
    show(
        listener,
        "curl -si -H 'x-priority: low' localhost:10000/shop/catalog   # degraded: below `normal` is shed",
        &Request::get("/shop/catalog").header("x-priority", "low"),
        &["x-seawall-degraded", "retry-after"],
    );
    show(
        listener,
        "curl -si -H 'x-priority: critical' localhost:10000/shop/catalog   # critical still reaches the shop",
        &Request::get("/shop/catalog").header("x-priority", "critical"),
        &["x-seawall-degraded"],
    );
    show(
        listener,
        "curl -si -H 'x-seawall-cluster: evil' localhost:10000/shop/search   # rerouted; the client's own header is replaced",
        &Request::get("/shop/search").header("x-seawall-cluster", "evil"),
        &["x-seawall-degraded"],
    );
    upstream.set_rule(
        Match::PathPrefix("/healthz/shop".into()),
        Behaviour::ok().status(503),
    )?;
    println!("  (the shop's health path fails; one worker probes it every 500 ms)");
    let level = wait_for_level(admin, 2, Duration::from_secs(5));
    println!("  (two failed probes: level = {level})");
    show(
        listener,
        "curl -si -H 'x-priority: critical' localhost:10000/shop/catalog   # critical: the fallback answers, the shop sees nothing",
        &Request::get("/shop/catalog").header("x-priority", "critical"),
        &["x-seawall-degraded", "content-type"],
    );
    upstream.set_rule(Match::PathPrefix("/healthz/shop".into()), Behaviour::ok())?;
    upstream.set_rule(
        Match::PathPrefix("/shop".into()),
        Behaviour::ok().body("shop is back\n"),
    )?;
    let healed = Instant::now();
    let level = wait_for_level(admin, 0, Duration::from_secs(12));
    println!(
        "  (the shop heals: level {level} after {:.1} s, one step at a time, each level held for its dwell)",
        healed.elapsed().as_secs_f64()
    );
    show(
        listener,
        "curl -si -H 'x-priority: low' localhost:10000/shop/catalog   # normal again",
        &Request::get("/shop/catalog").header("x-priority", "low"),
        &[],
    );

    section("Metrics: Envoy stats, one set for all workers");
    println!("$ curl -s localhost:9901/stats | grep seawall");
    // Each worker hands its metric updates to Envoy on its 100 ms tick.
    thread::sleep(Duration::from_millis(250));
    if let Ok(response) = send_once(admin, &Request::get("/stats?filter=seawall")) {
        for line in response.text().lines().filter(|l| !l.ends_with(": 0")) {
            println!("  {line}");
        }
    }
    println!(
        "\nThe upstream received {} requests; everything else was answered by seawall.",
        upstream.total()?
    );

    Ok(())
}

fn wait_ready(envoy: &mut KillOnDrop, log_path: &std::path::Path) -> Result<(), String> {
    let admin: SocketAddr = ADMIN.parse().map_err(|_| "bad admin address")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = envoy.0.try_wait() {
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("server.cc:467"))
                .rev()
                .take(30)
                .collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "Envoy exited ({status}); are ports 10000 and 9901 free?\n{}",
                tail.join("\n")
            ));
        }
        if send_once(admin, &Request::get("/ready")).is_ok_and(|r| r.status == 200) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "Envoy not ready within 30 s; see {}",
                log_path.display()
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Polls the shop's degradation level (bounded) until it is `level`; returns the last value seen.
fn wait_for_level(admin: SocketAddr, level: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let seen = send_once(
            admin,
            &Request::get("/stats?filter=seawall.degradation.shop.level"),
        )
        .ok()
        .and_then(|response| {
            response
                .text()
                .lines()
                .find_map(|line| line.rsplit(": ").next()?.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
        if seen == level || Instant::now() >= deadline {
            // Every worker reads the level on its own 100 ms tick: give them all one.
            thread::sleep(Duration::from_millis(250));
            return seen;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn section(title: &str) {
    println!("\n## {title}");
}

fn show(listener: SocketAddr, curl: &str, request: &Request, headers: &[&str]) {
    print_exchange(&mut Client::connect(listener), curl, request, headers);
}

fn print_exchange(client: &mut Client, curl: &str, request: &Request, headers: &[&str]) {
    println!("$ {curl}");
    match client.send(request) {
        Ok(response) => {
            let shown: Vec<String> = headers
                .iter()
                .filter_map(|name| {
                    response
                        .header(name)
                        .map(|value| format!("{name}: {value}"))
                })
                .collect();
            let body = response.text();
            println!(
                "  {}  {}  {}",
                response.status,
                shown.join("  "),
                body.trim_end()
            );
        }
        Err(error) => println!("  request failed: {error}"),
    }
}
