//! The demo (envoy/demo.yaml) as the harness runs it: its plugin config read from the file, and its
//! Envoy topology (clusters, routes, the reroute header kept internal) rendered around upstreams a
//! scenario controls. Scenarios that check what operators see with the demo config (the CLI's
//! `explain`, the metrics the dashboard reads) share this, so they test the demo as it is.

use std::net::SocketAddr;
use std::path::Path;

use crate::envoy::{EnvoyConfig, RouteSpec};

fn read(relative: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ has a parent");
    std::fs::read_to_string(root.join(relative))
        .unwrap_or_else(|error| panic!("read {relative}: {error}"))
}

/// The JSON under `value: |` in envoy/demo.yaml: the block of lines indented deeper than it.
pub fn plugin_config() -> String {
    let demo = read("envoy/demo.yaml");
    let mut lines = demo.lines();
    let key = lines
        .by_ref()
        .find(|line| line.trim_start() == "value: |")
        .expect("envoy/demo.yaml has the plugin config under `value: |`");
    let indent = |line: &str| line.len() - line.trim_start().len();
    let depth = indent(key);
    let block: Vec<&str> = lines
        .take_while(|line| line.trim().is_empty() || indent(line) > depth)
        .collect();
    let strip = block
        .iter()
        .filter(|line| !line.trim().is_empty())
        .map(|line| indent(line))
        .min()
        .unwrap_or(0);
    let json: String = block
        .iter()
        .map(|line| format!("{}\n", line.get(strip..).unwrap_or("")))
        .collect();
    serde_json::from_str::<serde_json::Value>(&json)
        .unwrap_or_else(|error| panic!("the demo's plugin config is not JSON: {error}"));
    json
}

/// The `stats_config` of envoy/prometheus/stats_tags.yaml, which the demo must carry as is: the
/// rules and the dashboard rely on the labels it makes.
pub fn stats_tags() -> String {
    let fragment = read("envoy/prometheus/stats_tags.yaml");
    let start = fragment
        .find("stats_config:")
        .expect("stats_tags.yaml has stats_config");
    let block = fragment[start..].to_owned();
    assert!(
        read("envoy/demo.yaml").contains(&block),
        "envoy/demo.yaml must carry envoy/prometheus/stats_tags.yaml's stats_config verbatim"
    );
    block
}

/// The demo's Envoy around `upstream` (its `demo_upstream` and `demo_fallback` clusters) and
/// `health` (`demo_health`, where the degradation policy's probes go): the demo's plugin config,
/// its routes, and the reroute header kept from clients.
pub fn envoy_config(upstream: SocketAddr, health: SocketAddr) -> EnvoyConfig {
    EnvoyConfig::new()
        .cluster("demo_upstream", upstream)
        .cluster("demo_health", health)
        .cluster("demo_fallback", upstream)
        .route(RouteSpec::by_header(
            "envoy-rerouted",
            "/",
            "x-seawall-cluster",
        ))
        .route(RouteSpec::prefix("envoy-api", "/api", "demo_upstream"))
        .route(RouteSpec::prefix("envoy-default", "/", "demo_upstream"))
        .route_config_field("internal_only_headers: [x-seawall-cluster]")
        .seawall(&plugin_config())
}
