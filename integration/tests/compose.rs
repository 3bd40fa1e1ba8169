//! The compose demo (envoy/docker-compose.yaml): Envoy's image and the demo upstream's, each in
//! its own container on a compose network. The scenario brings the project up on free ports, runs
//! a few of the README's curl lines against it, checks what the upstream container received and
//! what Envoy's stats say, and takes it down. Envoy's config there is envoy/compose/envoy.yaml,
//! which must stay envoy/demo.yaml with the compose network's addresses: the first test checks
//! that, and `SEAWALL_BLESS=1` rewrites it.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use seawall_integration::client::send_once;
use seawall_integration::compose::ComposeProject;
use seawall_integration::envoy::{runtime, seawall_wasm, Runtime};
use seawall_integration::remote::RemoteUpstream;
use seawall_integration::{Behaviour, Match, Request};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ has a parent")
        .to_path_buf()
}

/// envoy/demo.yaml with what a compose network changes: Envoy listens on every interface of its
/// container (the published ports reach it there), finds the upstream by its service name, and
/// reads the wasm where the compose file mounts it. Each replacement must hit exactly as often as
/// the demo config has that address, so a change to the demo config's shape fails here.
fn compose_envoy_config(demo: &str) -> String {
    let body = demo
        .find("static_resources:")
        .map(|start| &demo[start..])
        .expect("envoy/demo.yaml has static_resources");
    let replacements = [
        (
            "address: 127.0.0.1, port_value: 10000",
            "address: 0.0.0.0, port_value: 10000",
            1,
        ),
        (
            "address: 127.0.0.1, port_value: 9901",
            "address: 0.0.0.0, port_value: 9901",
            1,
        ),
        (
            "address: 127.0.0.1, port_value: 18080",
            "address: upstream, port_value: 18080",
            3,
        ),
        // A name, not an address: Envoy resolves it through the network's DNS.
        ("type: STATIC", "type: STRICT_DNS", 3),
        (
            "filename: target/wasm32-wasip1/release/seawall.wasm",
            "filename: /etc/envoy/seawall.wasm",
            1,
        ),
    ];
    let mut config = body.to_owned();
    for (from, to, times) in replacements {
        assert_eq!(
            config.matches(from).count(),
            times,
            "envoy/demo.yaml should have {from:?} {times} time(s)"
        );
        config = config.replace(from, to);
    }
    format!(
        "# The compose demo's Envoy config (envoy/docker-compose.yaml mounts it): envoy/demo.yaml with\n\
         # the compose network's addresses. Generated; edit envoy/demo.yaml and rerun\n\
         # `SEAWALL_BLESS=1 cargo test -p seawall-integration --test compose`.\n{config}"
    )
}

#[test]
fn the_compose_envoy_config_is_the_demo_config_with_compose_addresses() {
    let demo = std::fs::read_to_string(root().join("envoy/demo.yaml")).expect("read demo.yaml");
    let expected = compose_envoy_config(&demo);
    let path = root().join("envoy/compose/envoy.yaml");
    if std::env::var_os("SEAWALL_BLESS").is_some() {
        std::fs::write(&path, &expected).expect("write envoy/compose/envoy.yaml");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == expected,
        "{} is stale: rerun with SEAWALL_BLESS=1",
        path.display()
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

fn wait_until(what: &str, within: Duration, project: &ComposeProject, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what} within {within:?}\n--- compose logs ---\n{}",
            project.logs()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn stat(admin: SocketAddr, name: &str) -> u64 {
    let stats = send_once(admin, &Request::get(&format!("/stats?filter=^{name}$")))
        .expect("read /stats")
        .text();
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}: ")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn the_compose_demo_answers_the_readme_curl_lines() {
    let Runtime::Docker { image } = runtime() else {
        // The harness says why in its first line (no engine, or no image): the compose demo
        // needs one. CI runs with SEAWALL_ENVOY_RUNTIME=docker, where this cannot happen.
        eprintln!("compose demo not run: Envoy runs natively here");
        return;
    };
    let upstream_image =
        std::env::var("SEAWALL_UPSTREAM_IMAGE").unwrap_or_else(|_| "seawall-upstream:0.1.0".into());
    let (listen, admin, control) = (free_port(), free_port(), free_port());
    let wasm = std::fs::canonicalize(seawall_wasm()).expect("the wasm's path");
    let project = ComposeProject::up(
        &root().join("envoy/docker-compose.yaml"),
        &format!("seawall-compose-test-{}", std::process::id()),
        &[
            ("SEAWALL_ENVOY_IMAGE", image.clone()),
            ("SEAWALL_UPSTREAM_IMAGE", upstream_image),
            ("SEAWALL_WASM", wasm.display().to_string()),
            ("SEAWALL_DEMO_LISTENER", format!("127.0.0.1:{listen}")),
            ("SEAWALL_DEMO_ADMIN", format!("127.0.0.1:{admin}")),
            ("SEAWALL_DEMO_CONTROL", format!("127.0.0.1:{control}")),
        ],
    )
    .unwrap_or_else(|error| panic!("{error}"));
    let listener = SocketAddr::from(([127, 0, 0, 1], listen));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let upstream = RemoteUpstream::new(SocketAddr::from(([127, 0, 0, 1], control)));
    wait_until(
        "the upstream's control port answers",
        Duration::from_secs(30),
        &project,
        || upstream.answers(),
    );
    wait_until("Envoy is ready", Duration::from_secs(60), &project, || {
        send_once(admin, &Request::get("/ready")).is_ok_and(|r| r.status == 200)
    });
    eprintln!("[compose] envoy ({image}) and the upstream are up on the project's network");

    // curl -si -X POST localhost:10000/api/checkout
    let checkout = send_once(listener, &Request::post("/api/checkout")).expect("checkout");
    assert_eq!(checkout.status, 200, "{}", checkout.text());
    assert_eq!(checkout.header("x-seawall-route"), Some("checkout"));
    assert_eq!(checkout.text(), "hello from the demo upstream\n");

    // curl -si -H 'x-tier: free' -H 'x-user-id: alice' localhost:10000/api/items   (4 times)
    let statuses: Vec<u16> = (0..4)
        .map(|_| {
            send_once(
                listener,
                &Request::get("/api/items")
                    .header("x-tier", "free")
                    .header("x-user-id", "alice"),
            )
            .expect("items")
            .status
        })
        .collect();
    assert_eq!(statuses, [200, 200, 200, 429], "burst 3, then limited");
    assert_eq!(upstream.count_path("/api/items").unwrap(), 3);

    // The breaker on /payments: the upstream container fails, three failures open it.
    upstream
        .set_rule(
            &Match::PathPrefix("/payments".into()),
            &Behaviour::ok().status(503).body("upstream is down\n"),
        )
        .unwrap();
    let payments: Vec<(u16, String)> = (0..4)
        .map(|_| {
            let response = send_once(listener, &Request::get("/payments")).expect("payments");
            (response.status, response.text())
        })
        .collect();
    assert_eq!(
        payments
            .iter()
            .map(|(status, _)| *status)
            .collect::<Vec<_>>(),
        [503, 503, 503, 503]
    );
    assert_eq!(payments[3].1, "payments is resting, retry later\n");
    assert_eq!(
        upstream.count_path("/payments").unwrap(),
        3,
        "the open breaker kept the fourth request from the upstream"
    );

    // curl -si -H 'x-seawall-fault-abort: 418' -H 'x-chaos-key: demo-chaos-secret-1' localhost:10000/slow
    let injected = send_once(
        listener,
        &Request::get("/slow")
            .header("x-seawall-fault-abort", "418")
            .header("x-chaos-key", "demo-chaos-secret-1"),
    )
    .expect("slow");
    assert_eq!(injected.status, 418);
    assert_eq!(upstream.count_path("/slow").unwrap(), 0);

    // Envoy's stats, as the README's `curl -s localhost:9901/stats | grep seawall` shows them.
    // Each worker hands its counters to Envoy on its 100 ms tick: poll (bounded), then check.
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat(admin, "wasmcustom.seawall.rate_limit.per-user.limited") < 1
        || stat(admin, "wasmcustom.seawall.rate_limit.per-user.allowed") < 4
    {
        if Instant::now() > deadline {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        stat(admin, "wasmcustom.seawall.rate_limit.per-user.limited"),
        1
    );
    // The checkout request passed `per-user` too (the checkout route lists it), then alice's 3.
    assert_eq!(
        stat(admin, "wasmcustom.seawall.rate_limit.per-user.allowed"),
        4
    );
    drop(project);
}
