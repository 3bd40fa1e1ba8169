//! Runs the real Envoy binary with seawall: renders a config with free ports, starts Envoy with
//! `--concurrency N`, waits until it is ready, reads `/stats`, keeps its log, pushes file-based
//! LDS updates, and stops it when the scenario ends (also when the scenario panics, in which case
//! Envoy's log is printed and its directory kept).
//!
//! Envoy runs in a container when a Docker engine answers and has the image, natively otherwise,
//! so a laptop without Docker still runs every scenario (see [`Runtime`]). In a container it
//! shares the host's network, and sees only its work directory and the wasm, mounted at the same
//! paths, so the rendered config is the same in both modes.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use crate::client::{send_once, Client, Request};

mod ecds;
pub use ecds::{EcdsDocument, EcdsOutcome, EcdsSpec, EcdsStats};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ has a parent")
        .to_path_buf()
}

/// The Envoy binary: `ENVOY_BIN`, or the one inside `target/envoy-venv`.
pub fn envoy_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("ENVOY_BIN") {
        return PathBuf::from(bin);
    }
    let lib = workspace_root().join("target/envoy-venv/lib");
    if let Ok(entries) = fs::read_dir(&lib) {
        for entry in entries.flatten() {
            let candidate = entry.path().join("site-packages/envoy/_bin/envoy");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!("Envoy not found: run `cargo xtask envoy` or set ENVOY_BIN");
}

/// The image the containerised runs use unless `SEAWALL_ENVOY_IMAGE` names another:
/// `cargo xtask image` builds `seawall-envoy:1.40.0` FROM scratch for machines with no registry.
pub const DEFAULT_ENVOY_IMAGE: &str = "envoyproxy/envoy:v1.40.0";

/// Where the scenarios' Envoy runs. `SEAWALL_ENVOY_RUNTIME` chooses: `docker` (a container of
/// `SEAWALL_ENVOY_IMAGE`; fails when no engine answers), `native` (the binary from
/// [`envoy_binary`]), or unset: in a container when a Docker engine answers and holds the image,
/// natively otherwise. The choice is made once per test binary and printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runtime {
    Native(PathBuf),
    Docker { image: String },
}

pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        let image =
            std::env::var("SEAWALL_ENVOY_IMAGE").unwrap_or_else(|_| DEFAULT_ENVOY_IMAGE.into());
        let requested = std::env::var("SEAWALL_ENVOY_RUNTIME").unwrap_or_default();
        let (runtime, why) = match requested.as_str() {
            "docker" => {
                assert!(
                    docker_ok(&["info"]),
                    "SEAWALL_ENVOY_RUNTIME=docker, but no Docker engine answers `docker info`"
                );
                assert!(
                    docker_ok(&["image", "inspect", &image]),
                    "SEAWALL_ENVOY_RUNTIME=docker, but the engine has no image {image}: build it with `cargo xtask image` (and set SEAWALL_ENVOY_IMAGE=seawall-envoy:1.40.0) or pull it"
                );
                (Runtime::Docker { image }, "SEAWALL_ENVOY_RUNTIME=docker")
            }
            "native" => (Runtime::Native(envoy_binary()), "SEAWALL_ENVOY_RUNTIME=native"),
            "" if docker_ok(&["image", "inspect", &image]) => (
                Runtime::Docker { image },
                "a Docker engine answers and has the image",
            ),
            "" => (
                Runtime::Native(envoy_binary()),
                "no Docker engine, or it lacks the image",
            ),
            other => panic!("SEAWALL_ENVOY_RUNTIME={other:?}: expected docker or native"),
        };
        match &runtime {
            Runtime::Docker { image } => {
                eprintln!("[harness] Envoy runs in Docker, image {image} ({why})")
            }
            Runtime::Native(binary) => {
                eprintln!("[harness] Envoy runs natively, {} ({why})", binary.display())
            }
        }
        runtime
    })
}

fn docker_ok(args: &[&str]) -> bool {
    Command::new("docker")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The plugin: `SEAWALL_WASM`, or the release build.
pub fn seawall_wasm() -> PathBuf {
    let path = std::env::var("SEAWALL_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target/wasm32-wasip1/release/seawall.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo xtask build`",
        path.display()
    );
    path
}

/// The `hostcall-count` build of the plugin, which exports its host calls by kind as stats
/// (`seawall.hostcalls.all.<kind>`): `SEAWALL_HOSTCALL_WASM`, or where `cargo xtask test` builds it.
pub fn hostcall_counting_wasm() -> PathBuf {
    let path = std::env::var("SEAWALL_HOSTCALL_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            workspace_root().join("target/hostcall-build/wasm32-wasip1/release/seawall.wasm")
        });
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build --release --target wasm32-wasip1 -p seawall --features hostcall-count --target-dir target/hostcall-build`",
        path.display()
    );
    path
}

/// The `trap-on-header` build of the plugin (tests only), whose VM traps on a request carrying
/// `x-seawall-test-trap: 1`: `SEAWALL_TRAP_WASM`, or where `cargo xtask test` builds it.
pub fn trapping_wasm() -> PathBuf {
    let path = std::env::var("SEAWALL_TRAP_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            workspace_root().join("target/trap-build/wasm32-wasip1/release/seawall.wasm")
        });
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build --release --target wasm32-wasip1 -p seawall --features trap-on-header --target-dir target/trap-build`",
        path.display()
    );
    path
}

/// What the Wasm filter's `PluginConfig` says Envoy does when the VM fails
/// (`envoy.extensions.wasm.v3.PluginConfig`); no setting at all is `None` in
/// [`EnvoyConfig::wasm_failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmFailure {
    /// `failure_policy: FAIL_CLOSED`.
    FailClosed,
    /// `failure_policy: FAIL_OPEN`.
    FailOpen,
    /// `failure_policy: FAIL_RELOAD`, with `reload_config.backoff.base_interval` when given.
    FailReload { backoff_base: Option<Duration> },
    /// The deprecated `fail_open: true`.
    LegacyFailOpen,
}

impl WasmFailure {
    /// The PluginConfig fields, one YAML line each.
    fn yaml_lines(self) -> Vec<String> {
        match self {
            WasmFailure::FailClosed => vec!["failure_policy: FAIL_CLOSED".into()],
            WasmFailure::FailOpen => vec!["failure_policy: FAIL_OPEN".into()],
            WasmFailure::FailReload { backoff_base } => {
                let mut lines = vec!["failure_policy: FAIL_RELOAD".to_owned()];
                if let Some(base) = backoff_base {
                    lines.push(format!(
                        "reload_config: {{backoff: {{base_interval: {}s}}}}",
                        base.as_secs_f64()
                    ));
                }
                lines
            }
            WasmFailure::LegacyFailOpen => vec!["fail_open: true".into()],
        }
    }
}

/// One Envoy route.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub name: String,
    pub prefix: String,
    pub cluster: String,
    /// Extra YAML under `route:` (retry_policy, timeout), indented by the renderer.
    pub route_extra: Option<String>,
    /// Matches only requests carrying this header, and sends them to the cluster it names
    /// (`cluster_header`) instead of `cluster`.
    pub cluster_header: Option<String>,
}

impl RouteSpec {
    pub fn prefix(name: &str, prefix: &str, cluster: &str) -> Self {
        RouteSpec {
            name: name.into(),
            prefix: prefix.into(),
            cluster: cluster.into(),
            route_extra: None,
            cluster_header: None,
        }
    }

    /// A route for requests carrying `header`, to the cluster the header names.
    pub fn by_header(name: &str, prefix: &str, header: &str) -> Self {
        RouteSpec {
            cluster_header: Some(header.into()),
            ..RouteSpec::prefix(name, prefix, "")
        }
    }
}

/// What to run: listeners, routes, clusters, filters.
#[derive(Debug, Clone)]
pub struct EnvoyConfig {
    pub concurrency: u32,
    pub plugin_config: Option<String>,
    pub clusters: Vec<(String, SocketAddr)>,
    /// Clusters (of `clusters`) spoken to over HTTP/2: gRPC services such as a rate limit
    /// service.
    pub http2_clusters: Vec<String>,
    pub routes: Vec<RouteSpec>,
    pub include_attempt_count: bool,
    pub extra_http_filters: Vec<String>,
    pub xds_from_files: bool,
    pub log_level: String,
    /// Extra fields of the route configuration, as YAML lines (e.g. `internal_only_headers`).
    pub route_config_extra: Vec<String>,
    /// Writes Envoy's access log (see [`Envoy::access_log`]).
    pub access_log: bool,
    /// Writes a compact log of each request's start and status (see [`Envoy::arrivals`]).
    pub arrival_log: bool,
    /// Another build of the plugin than [`seawall_wasm`] (e.g. [`hostcall_counting_wasm`]).
    pub wasm: Option<PathBuf>,
    /// Delivers the seawall filter through ECDS instead of inline (see [`EcdsSpec`]).
    pub ecds: Option<EcdsSpec>,
    /// Top-level bootstrap YAML appended as is (e.g. a `stats_config` block).
    pub bootstrap_extra: Vec<String>,
    /// The inline filter's failure setting (`None`: Envoy's default).
    pub wasm_failure: Option<WasmFailure>,
    /// Pinned after the first start, so LDS updates keep the same listener address.
    listener_port: u16,
}

impl Default for EnvoyConfig {
    fn default() -> Self {
        EnvoyConfig {
            concurrency: 2,
            plugin_config: None,
            clusters: Vec::new(),
            http2_clusters: Vec::new(),
            routes: Vec::new(),
            include_attempt_count: true,
            extra_http_filters: Vec::new(),
            xds_from_files: false,
            log_level: "info".into(),
            route_config_extra: Vec::new(),
            access_log: false,
            arrival_log: false,
            wasm: None,
            ecds: None,
            bootstrap_extra: Vec::new(),
            wasm_failure: None,
            listener_port: 0,
        }
    }
}

impl EnvoyConfig {
    pub fn new() -> Self {
        EnvoyConfig::default()
    }

    pub fn concurrency(mut self, workers: u32) -> Self {
        self.concurrency = workers;
        self
    }

    /// Adds the seawall filter with this plugin config (JSON text).
    pub fn seawall(mut self, plugin_config: &str) -> Self {
        self.plugin_config = Some(plugin_config.to_owned());
        self
    }

    pub fn cluster(mut self, name: &str, addr: SocketAddr) -> Self {
        self.clusters.push((name.into(), addr));
        self
    }

    /// A gRPC cluster (HTTP/2 to the upstream), e.g. a rate limit service for global limits.
    pub fn grpc_cluster(mut self, name: &str, addr: SocketAddr) -> Self {
        self.clusters.push((name.into(), addr));
        self.http2_clusters.push(name.into());
        self
    }

    pub fn route(mut self, route: RouteSpec) -> Self {
        self.routes.push(route);
        self
    }

    /// Everything to one upstream: one cluster `upstream`, one route `default` for `/`.
    pub fn to_upstream(addr: SocketAddr) -> Self {
        EnvoyConfig::new()
            .cluster("upstream", addr)
            .route(RouteSpec::prefix("default", "/", "upstream"))
    }

    pub fn http_filter_yaml(mut self, yaml: &str) -> Self {
        self.extra_http_filters.push(yaml.to_owned());
        self
    }

    /// Adds a field to the route configuration: one YAML line such as
    /// `internal_only_headers: [x-seawall-cluster]`.
    pub fn route_config_field(mut self, yaml: &str) -> Self {
        self.route_config_extra.push(yaml.to_owned());
        self
    }

    pub fn xds_from_files(mut self, on: bool) -> Self {
        self.xds_from_files = on;
        self
    }

    /// Has Envoy log every request with its own timings (read with [`Envoy::access_log`]).
    /// Runs another build of the plugin (see [`EnvoyConfig::wasm`]).
    pub fn wasm(mut self, path: PathBuf) -> Self {
        self.wasm = Some(path);
        self
    }

    /// Has Envoy log when each request started, by its own clock, and how it was answered (read
    /// with [`Envoy::arrivals`]): a line of text per request, cheap enough for a flood.
    pub fn arrival_log(mut self, on: bool) -> Self {
        self.arrival_log = on;
        self
    }

    pub fn access_log(mut self, on: bool) -> Self {
        self.access_log = on;
        self
    }

    /// Delivers the seawall filter as Istio does: the HTTP filter is only a `config_discovery`
    /// slot, and its config comes from an extension config file Envoy watches (see [`EcdsSpec`]).
    pub fn ecds(mut self, spec: EcdsSpec) -> Self {
        self.ecds = Some(spec);
        self
    }

    /// Appends top-level bootstrap YAML, such as envoy/prometheus/stats_tags.yaml's
    /// `stats_config`, which changes how `/stats/prometheus` names seawall's stats.
    pub fn bootstrap_yaml(mut self, yaml: &str) -> Self {
        self.bootstrap_extra.push(yaml.to_owned());
        self
    }

    /// What Envoy does when the VM fails, in the inline filter's `PluginConfig` (see
    /// [`WasmFailure`]).
    pub fn wasm_failure(mut self, failure: WasmFailure) -> Self {
        self.wasm_failure = Some(failure);
        self
    }

    fn render_listener(&self, dir: &Path, wasm: &Path) -> String {
        let mut routes = String::new();
        for route in &self.routes {
            let prefix = serde_json::to_string(&route.prefix).unwrap();
            routes.push_str(&match &route.cluster_header {
                None => format!(
                    "              - name: {}\n                match: {{prefix: {prefix}}}\n                route:\n                  cluster: {}\n",
                    route.name, route.cluster
                ),
                Some(header) => format!(
                    "              - name: {}\n                match: {{prefix: {prefix}, headers: [{{name: {header}, present_match: true}}]}}\n                route:\n                  cluster_header: {header}\n",
                    route.name
                ),
            });
            if let Some(extra) = &route.route_extra {
                for line in extra.lines() {
                    routes.push_str(&format!("                  {line}\n"));
                }
            }
        }
        let mut filters = String::new();
        for filter in &self.extra_http_filters {
            for line in filter.lines() {
                filters.push_str(&format!("          {line}\n"));
            }
        }
        if let Some(ecds) = &self.ecds {
            filters.push_str(&ecds.render_filter(dir, wasm));
        } else if let Some(plugin) = &self.plugin_config {
            filters.push_str(&format!(
                r#"          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: seawall
                root_id: seawall
{failure}                vm_config:
                  vm_id: seawall
                  runtime: envoy.wasm.runtime.v8
                  code: {{local: {{filename: {wasm}}}}}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {plugin}
"#,
                wasm = serde_json::to_string(&wasm.display().to_string()).unwrap(),
                plugin = serde_json::to_string(plugin).unwrap(),
                failure = self
                    .wasm_failure
                    .map(WasmFailure::yaml_lines)
                    .unwrap_or_default()
                    .iter()
                    .map(|line| format!("                {line}\n"))
                    .collect::<String>(),
            ));
        }
        let route_config_extra: String = self
            .route_config_extra
            .iter()
            .map(|line| format!("          {line}\n"))
            .collect();
        // A file access log at `file` in the listener's `access_log` list, with `format` (YAML
        // lines under `log_format`).
        let file_log = |file: &str, format: &str| {
            let path = serde_json::to_string(&dir.join(file).display().to_string()).unwrap();
            format!(
                r#"        - name: envoy.access_loggers.file
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
            path: {path}
            log_format:
{format}"#
            )
        };
        let mut access_logs = Vec::new();
        if self.arrival_log {
            access_logs.push(file_log(
                ARRIVAL_LOG,
                r#"              text_format_source:
                inline_string: "%START_TIME(%s.%6f)% %RESPONSE_CODE%\n"
"#,
            ));
        }
        if self.access_log {
            // Durations in microseconds between Envoy's own stream timestamps: from the first
            // byte of the request to the last byte sent upstream, and to the last byte of the
            // response sent downstream.
            access_logs.push(file_log(
                ACCESS_LOG,
                r#"              json_format:
                path: "%REQ(:PATH)%"
                status: "%RESPONSE_CODE%"
                request: "%REQ(X-REQUEST)%"
                forwarded_us: "%COMMON_DURATION(DS_RX_BEG:US_TX_END:us)%"
                duration_us: "%COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)%"
"#,
            ));
        }
        let access_log = if access_logs.is_empty() {
            String::new()
        } else {
            format!("        access_log:\n{}", access_logs.concat())
        };
        format!(
            r#"  name: main
  address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: ingress
{access_log}        route_config:
          name: local
{route_config_extra}          virtual_hosts:
          - name: all
            domains: ["*"]
            include_attempt_count_in_response: {attempts}
            routes:
{routes}        http_filters:
{filters}          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
            port = self.listener_port,
            attempts = self.include_attempt_count,
        )
    }

    /// The clusters as a YAML list: bare for `static_resources`, typed for a CDS file.
    fn render_clusters(&self, typed: bool) -> String {
        let head = if typed {
            "- \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name:"
        } else {
            "- name:"
        };
        let mut clusters = String::new();
        for (name, addr) in &self.clusters {
            clusters.push_str(&format!(
                // Envoy's own cluster limits would cap concurrent retries at 3 (and requests at
                // 1024) before seawall's budget could show what it does: they are lifted here.
                "{head} {name}\n  type: STATIC\n  connect_timeout: 1s\n  circuit_breakers: {{thresholds: [{{max_retries: 1000000, max_requests: 1000000, max_pending_requests: 1000000, max_connections: 1000000}}]}}\n  load_assignment:\n    cluster_name: {name}\n    endpoints:\n    - lb_endpoints:\n      - endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}\n",
                ip = addr.ip(),
                port = addr.port()
            ));
            if self.http2_clusters.contains(name) {
                clusters.push_str("  typed_extension_protocol_options:\n    envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n      \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n      explicit_http_config: {http2_protocol_options: {}}\n");
            }
        }
        clusters
    }

    fn render_bootstrap(&self, dir: &Path, wasm: &Path) -> String {
        let mut bootstrap = self.render_resources(dir, wasm);
        for extra in &self.bootstrap_extra {
            bootstrap.push_str(extra);
            if !extra.ends_with('\n') {
                bootstrap.push('\n');
            }
        }
        bootstrap
    }

    fn render_resources(&self, dir: &Path, wasm: &Path) -> String {
        let admin = "admin: {address: {socket_address: {address: 127.0.0.1, port_value: 0}}}\n";
        let node = "node: {id: seawall-test, cluster: seawall-test}\n";
        if self.xds_from_files {
            format!(
                "{node}{admin}dynamic_resources:\n  lds_config:\n    path_config_source:\n      path: {lds}\n      watched_directory: {{path: {dir}}}\n  cds_config:\n    path_config_source:\n      path: {cds}\n      watched_directory: {{path: {dir}}}\n",
                lds = dir.join("lds.yaml").display(),
                cds = dir.join("cds.yaml").display(),
                dir = dir.display()
            )
        } else {
            let listener =
                self.render_listener(dir, wasm)
                    .replacen("  name: main", "- name: main", 1);
            format!(
                "{node}{admin}static_resources:\n  listeners:\n{}  clusters:\n{}",
                indent(&listener, 2),
                indent(&self.render_clusters(false), 2)
            )
        }
    }

    fn lds_document(&self, dir: &Path, wasm: &Path) -> String {
        format!(
            "resources:\n- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n{}",
            self.render_listener(dir, wasm)
        )
    }
}

fn indent(text: &str, spaces: usize) -> String {
    let pad = " ".repeat(spaces);
    text.lines().map(|line| format!("{pad}{line}\n")).collect()
}

/// Counts every seawall worker tick that handed batched metric updates to Envoy.
const TICKS: &str = "wasmcustom.seawall.workers.all.ticks";

/// Envoy's counters and gauges by name.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub values: BTreeMap<String, u64>,
}

impl Stats {
    pub fn get(&self, name: &str) -> Option<u64> {
        self.values.get(name).copied()
    }

    /// A seawall metric, as Envoy names custom wasm metrics (`wasmcustom.` + our name).
    pub fn seawall(&self, name: &str) -> u64 {
        self.get(&format!("wasmcustom.{name}")).unwrap_or(0)
    }

    pub fn sum_prefix(&self, prefix: &str) -> u64 {
        self.values
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    }
}

/// The access log's file in Envoy's work directory.
const ACCESS_LOG: &str = "access.log";
const ARRIVAL_LOG: &str = "arrivals.log";

/// One request as Envoy's arrival log recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// When Envoy received the request's first byte, by its real-time clock (microseconds since
    /// the Unix epoch): the clock seawall reads too.
    pub start_us: u64,
    pub status: u16,
}

impl Arrival {
    fn parse(line: &str) -> Option<Arrival> {
        let (start, status) = line.split_once(' ')?;
        let (seconds, micros) = start.split_once('.')?;
        Some(Arrival {
            start_us: seconds.parse::<u64>().ok()? * 1_000_000 + micros.parse::<u64>().ok()?,
            status: status.trim().parse().ok()?,
        })
    }
}

/// One request as Envoy's access log has it, timed by Envoy itself.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogEntry {
    pub path: String,
    pub status: u16,
    /// The request's `x-request` header, if it had one.
    pub request: Option<String>,
    /// From the first byte of the request to the last byte sent upstream (`None`: nothing was
    /// sent upstream): how long Envoy held the request before passing it on.
    pub forwarded: Option<Duration>,
    /// From the first byte of the request to the last byte of the response sent downstream.
    pub duration: Option<Duration>,
}

impl AccessLogEntry {
    fn parse(line: &str) -> Option<AccessLogEntry> {
        let json: serde_json::Value = serde_json::from_str(line).ok()?;
        let micros = |name: &str| json[name].as_u64().map(Duration::from_micros);
        Some(AccessLogEntry {
            path: json["path"].as_str()?.to_owned(),
            status: u16::try_from(json["status"].as_u64()?).ok()?,
            request: json["request"].as_str().map(str::to_owned),
            forwarded: micros("forwarded_us"),
            duration: micros("duration_us"),
        })
    }
}

/// Whether Envoy took a pushed listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LdsOutcome {
    Accepted,
    Rejected,
}

static INSTANCE: AtomicU32 = AtomicU32::new(0);

/// A running Envoy; killed on drop.
pub struct Envoy {
    child: Child,
    /// The container's name, when Envoy runs in Docker.
    container: Option<String>,
    dir: PathBuf,
    admin: SocketAddr,
    listener: SocketAddr,
    config: EnvoyConfig,
    wasm: PathBuf,
}

impl Envoy {
    /// Starts Envoy and waits until it is ready; panics with Envoy's log if it does not get there.
    pub fn start(config: EnvoyConfig) -> Envoy {
        Envoy::try_start(config)
            .unwrap_or_else(|(message, log)| panic!("{message}\n--- envoy log ---\n{log}"))
    }

    /// Starts Envoy; `Err((why, log))` if it exits or never becomes ready.
    pub fn try_start(mut config: EnvoyConfig) -> Result<Envoy, (String, String)> {
        let instance = INSTANCE.fetch_add(1, Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("seawall-envoy-{}-{instance}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create Envoy's work directory");
        let wasm = if config.plugin_config.is_some() || config.ecds.is_some() {
            // Absolute, as a container's mount needs it.
            let wasm = config.wasm.clone().unwrap_or_else(seawall_wasm);
            fs::canonicalize(&wasm).unwrap_or(wasm)
        } else {
            PathBuf::new()
        };
        if config.xds_from_files {
            write_atomically(
                &dir,
                "cds.yaml",
                &format!("resources:\n{}", config.render_clusters(true)),
            );
            write_atomically(&dir, "lds.yaml", &config.lds_document(&dir, &wasm));
        }
        if let Some(ecds) = &config.ecds {
            ecds.write_initial(&dir, &wasm);
        }
        fs::write(
            dir.join("bootstrap.yaml"),
            config.render_bootstrap(&dir, &wasm),
        )
        .expect("write bootstrap");
        let log = fs::File::create(dir.join("envoy.log")).expect("create envoy.log");
        let args = [
            "-c".to_owned(),
            dir.join("bootstrap.yaml").display().to_string(),
            "--concurrency".to_owned(),
            config.concurrency.to_string(),
            "--log-level".to_owned(),
            config.log_level.clone(),
            "--admin-address-path".to_owned(),
            dir.join("admin.txt").display().to_string(),
            "--use-dynamic-base-id".to_owned(),
            "--disable-hot-restart".to_owned(),
            // The access log reaches its file within 100 ms rather than Envoy's default 10 s.
            "--file-flush-interval-msec".to_owned(),
            "100".to_owned(),
        ];
        let container = format!("seawall-envoy-{}-{instance}", std::process::id());
        let mut command = match runtime() {
            Runtime::Docker { image } => {
                let owner = fs::metadata(&dir).expect("read Envoy's work directory");
                let mut docker = Command::new("docker");
                docker
                    .args(["run", "--rm", "--name", &container, "--network", "host"])
                    // Files Envoy writes stay the test's own.
                    .arg("--user")
                    .arg(format!("{}:{}", owner.uid(), owner.gid()))
                    .arg("-v")
                    .arg(format!("{0}:{0}", dir.display()));
                if !wasm.as_os_str().is_empty() {
                    docker.arg("-v").arg(format!("{0}:{0}:ro", wasm.display()));
                }
                docker.arg(image).arg("envoy");
                docker
            }
            Runtime::Native(binary) => Command::new(binary),
        };
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .map_err(|error| (format!("could not start Envoy: {error}"), String::new()))?;
        let mut envoy = Envoy {
            child,
            container: matches!(runtime(), Runtime::Docker { .. }).then_some(container),
            dir,
            admin: "127.0.0.1:0".parse().unwrap(),
            listener: "127.0.0.1:0".parse().unwrap(),
            config: EnvoyConfig::default(),
            wasm,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let fail = |envoy: &mut Envoy, why: &str| {
            let log = envoy.log();
            envoy.remove_container();
            let _ = envoy.child.kill();
            let _ = envoy.child.wait();
            Err((why.to_owned(), log))
        };
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                return fail(
                    &mut envoy,
                    &format!("Envoy exited during startup ({status})"),
                );
            }
            if Instant::now() > deadline {
                return fail(&mut envoy, "Envoy was not ready within 30 s");
            }
            if let Some(admin) = fs::read_to_string(envoy.dir.join("admin.txt"))
                .ok()
                .and_then(|a| a.trim().parse().ok())
            {
                envoy.admin = admin;
                let ready = envoy
                    .admin_get("/ready")
                    .is_ok_and(|(status, body)| status == 200 && body.trim() == "LIVE");
                if ready {
                    if let Some(port) = envoy.listener_port() {
                        envoy.listener = SocketAddr::from(([127, 0, 0, 1], port));
                        break;
                    }
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        config.listener_port = envoy.listener.port();
        // One line per start, so a test log shows what ran: version, workers, ports.
        let version = envoy
            .admin_get("/server_info")
            .ok()
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .and_then(|info| info["version"].as_str().map(str::to_owned))
            .unwrap_or_default();
        eprintln!(
            "[harness] envoy {version} ready ({}): --concurrency {}, listener {}, admin {}, seawall {}",
            match &envoy.container {
                Some(name) => format!("container {name}"),
                None => "native".to_owned(),
            },
            config.concurrency,
            envoy.listener,
            envoy.admin,
            if config.plugin_config.is_some() {
                envoy.wasm.display().to_string()
            } else {
                "off".to_owned()
            }
        );
        envoy.config = config;
        Ok(envoy)
    }

    /// Removes Envoy's container, if it runs in one: killing the `docker run` client alone would
    /// leave the container running.
    fn remove_container(&self) {
        if let Some(name) = &self.container {
            let _ = Command::new("docker")
                .args(["rm", "--force", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    fn listener_port(&self) -> Option<u16> {
        let (status, body) = self.admin_get("/listeners?format=json").ok()?;
        if status != 200 {
            return None;
        }
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let listener = json["listener_statuses"]
            .as_array()?
            .iter()
            .find(|l| l["name"] == "main")?;
        let port = listener["local_address"]["socket_address"]["port_value"].as_u64()?;
        u16::try_from(port).ok().filter(|&p| p != 0)
    }

    pub fn listener_addr(&self) -> SocketAddr {
        self.listener
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    pub fn admin_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let response = send_once(self.admin, &Request::get(path))?;
        Ok((response.status, response.text()))
    }

    pub fn admin_post(&self, path: &str) -> std::io::Result<(u16, String)> {
        let response = send_once(self.admin, &Request::post(path))?;
        Ok((response.status, response.text()))
    }

    /// Envoy's stats once seawall's have settled. Each worker hands its batched metric updates
    /// to Envoy on its 100 ms tick, and counts the tick in `seawall.workers.all.ticks`; so this
    /// waits (bounded) until the workers have ticked at least twice each since the call and 1.5
    /// tick periods have passed, and every update made before the call is in the stats.
    pub fn stats(&self) -> Stats {
        let first = self.current_stats();
        let Some(start) = first.get(TICKS) else {
            return first;
        };
        let wanted = start + 2 * u64::from(self.config.concurrency);
        let begun = Instant::now();
        let deadline = begun + Duration::from_secs(5);
        loop {
            thread::sleep(Duration::from_millis(25));
            let stats = self.current_stats();
            let ticked = stats.get(TICKS).unwrap_or(0) >= wanted;
            if (ticked && begun.elapsed() >= Duration::from_millis(150))
                || Instant::now() > deadline
            {
                return stats;
            }
        }
    }

    /// Envoy's stats as they are now: seawall's may lag by up to one tick.
    pub fn current_stats(&self) -> Stats {
        let (_, body) = self.admin_get("/stats?format=json").expect("read /stats");
        let json: serde_json::Value = serde_json::from_str(&body).expect("/stats is JSON");
        let mut values = BTreeMap::new();
        for stat in json["stats"].as_array().into_iter().flatten() {
            if let (Some(name), Some(value)) = (stat["name"].as_str(), stat["value"].as_u64()) {
                values.insert(name.to_owned(), value);
            }
        }
        Stats { values }
    }

    pub fn prometheus(&self) -> String {
        self.admin_get("/stats/prometheus")
            .expect("read /stats/prometheus")
            .1
    }

    /// Waits (bounded) until `name` satisfies `done`, and returns its last value.
    pub fn wait_for_stat(&self, name: &str, timeout: Duration, done: impl Fn(u64) -> bool) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.current_stats().get(name).unwrap_or(0);
            if done(value) || Instant::now() > deadline {
                return value;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Envoy's access log so far (the config must have [`EnvoyConfig::access_log`] on). Envoy
    /// flushes it every 100 ms: see [`Envoy::wait_for_access_log`].
    pub fn access_log(&self) -> Vec<AccessLogEntry> {
        assert!(
            self.config.access_log,
            "access_log needs EnvoyConfig::access_log(true)"
        );
        self.log_entries(ACCESS_LOG, AccessLogEntry::parse)
    }

    /// The whole lines of the log file `file` under Envoy's directory, parsed: the last line may
    /// still be being written.
    fn log_entries<T>(&self, file: &str, parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
        let text = fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|line| parse(line).unwrap_or_else(|| panic!("unreadable {file} line {line:?}")))
            .collect()
    }

    /// Reads with `read` until it holds at least `count` entries (Envoy flushes its logs every
    /// 100 ms), for at most `timeout`.
    fn wait_for_entries<T>(
        &self,
        what: &str,
        count: usize,
        timeout: Duration,
        read: impl Fn() -> Vec<T>,
    ) -> Vec<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let entries = read();
            if entries.len() >= count {
                return entries;
            }
            assert!(
                Instant::now() < deadline,
                "the {what} had {} of {count} entries after {timeout:?}",
                entries.len()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (bounded) until Envoy's arrival log (the config must have
    /// [`EnvoyConfig::arrival_log`] on) holds at least `count` requests, and returns them in the
    /// order they started.
    pub fn arrivals(&self, count: usize, timeout: Duration) -> Vec<Arrival> {
        assert!(
            self.config.arrival_log,
            "arrivals need EnvoyConfig::arrival_log(true)"
        );
        let mut arrivals = self.wait_for_entries("arrival log", count, timeout, || {
            self.log_entries(ARRIVAL_LOG, Arrival::parse)
        });
        arrivals.sort_by_key(|arrival| arrival.start_us);
        arrivals
    }

    /// Waits (bounded) until the access log holds at least `count` entries, and returns them.
    pub fn wait_for_access_log(&self, count: usize, timeout: Duration) -> Vec<AccessLogEntry> {
        self.wait_for_entries("access log", count, timeout, || self.access_log())
    }

    /// Connections accepted by each worker so far, from Envoy's per-worker listener stats
    /// (`listener.<address>.worker_<n>.downstream_cx_total`; the address is the configured one,
    /// so port 0 for `main`; the admin listener has no workers).
    fn accepted_per_worker(&self) -> Vec<u64> {
        let stats = self.current_stats();
        let mut accepted = vec![0; self.config.concurrency as usize];
        for (name, value) in &stats.values {
            let worker = name
                .strip_prefix("listener.")
                .filter(|rest| !rest.starts_with("admin."))
                .and_then(|rest| rest.strip_suffix(".downstream_cx_total"))
                .and_then(|rest| rest.rsplit_once(".worker_"))
                .and_then(|(_, worker)| worker.parse::<usize>().ok());
            if let Some(count) = worker.and_then(|worker| accepted.get_mut(worker)) {
                *count += value;
            }
        }
        accepted
    }

    /// One open connection to each of Envoy's workers, by worker number. The kernel spreads new
    /// connections over the workers, so this opens connections one at a time and keeps each that
    /// Envoy's per-worker stats show landed on a worker that has none yet (a connection whose
    /// worker cannot be told, because another one was accepted meanwhile, is dropped).
    pub fn client_per_worker(&self) -> Vec<Client> {
        let workers = self.config.concurrency as usize;
        let mut found: Vec<Option<Client>> = (0..workers).map(|_| None).collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut before = self.accepted_per_worker();
        while found.iter().any(Option::is_none) {
            assert!(
                Instant::now() < deadline,
                "no connection landed on workers {:?} within 20 s",
                (0..workers)
                    .filter(|&w| found[w].is_none())
                    .collect::<Vec<_>>()
            );
            let client = Client::open_now(self.listener).expect("connect to Envoy");
            // The worker counts the connection when its event loop accepts it.
            let accepted_by = Instant::now() + Duration::from_secs(5);
            let after = loop {
                let after = self.accepted_per_worker();
                if after.iter().sum::<u64>() > before.iter().sum::<u64>()
                    || Instant::now() > accepted_by
                {
                    break after;
                }
                thread::sleep(Duration::from_millis(5));
            };
            let risen: Vec<usize> = (0..workers).filter(|&w| after[w] != before[w]).collect();
            if let [worker] = risen[..] {
                if after[worker] == before[worker] + 1 && found[worker].is_none() {
                    found[worker] = Some(client);
                }
            }
            before = after;
        }
        found.into_iter().flatten().collect()
    }

    /// The config this Envoy runs, with its listener port pinned: change it and push it.
    pub fn config(&self) -> EnvoyConfig {
        self.config.clone()
    }

    /// Pushes a new listener through file-based LDS and waits (bounded) for Envoy's verdict.
    pub fn push_listener(&mut self, config: &EnvoyConfig) -> LdsOutcome {
        assert!(
            self.config.xds_from_files,
            "push_listener needs EnvoyConfig::xds_from_files(true)"
        );
        // Keep the address exactly as first rendered (`port_value: 0`): Envoy then updates the
        // listener in place and keeps its socket. Pinning the port it picked would change the
        // address, so Envoy would replace the listener and reset connections under load.
        let mut config = config.clone();
        config.listener_port = 0;
        let before = self.current_stats();
        let success = before
            .get("listener_manager.lds.update_success")
            .unwrap_or(0);
        let rejected = before
            .get("listener_manager.lds.update_rejected")
            .unwrap_or(0);
        write_atomically(
            &self.dir,
            "lds.yaml",
            &config.lds_document(&self.dir, &self.wasm),
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let stats = self.current_stats();
            if stats
                .get("listener_manager.lds.update_success")
                .unwrap_or(0)
                > success
            {
                config.listener_port = self.listener.port();
                self.config = config;
                return LdsOutcome::Accepted;
            }
            if stats
                .get("listener_manager.lds.update_rejected")
                .unwrap_or(0)
                > rejected
            {
                return LdsOutcome::Rejected;
            }
            assert!(
                Instant::now() < deadline,
                "Envoy neither accepted nor rejected the LDS push within 15 s"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Envoy's file watcher reacts to moves, so write beside and rename into place.
fn write_atomically(dir: &Path, name: &str, contents: &str) {
    let temporary = dir.join(format!(".{name}.tmp"));
    fs::write(&temporary, contents).expect("write xDS file");
    fs::rename(&temporary, dir.join(name)).expect("move xDS file into place");
}

impl Drop for Envoy {
    fn drop(&mut self) {
        match &self.container {
            // `docker stop` sends Envoy SIGTERM, and kills it if it has not exited within 5 s.
            Some(name) => {
                let _ = Command::new("docker")
                    .args(["stop", "--time", "5", name])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            None => {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(self.child.id().to_string())
                    .status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.remove_container();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            let log = self.log();
            // The extension inventory Envoy prints at startup is long and never the clue.
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("server.cc:467"))
                .rev()
                .take(200)
                .collect();
            eprintln!(
                "--- last lines of Envoy's log ({}) ---",
                self.dir.join("envoy.log").display()
            );
            for line in tail.into_iter().rev() {
                eprintln!("envoy| {line}");
            }
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
