//! The `seawall` binary as an operator runs it: every config shipped in envoy/ and every README
//! example passes `check` and validates against the committed schema; a broken config shows all
//! its errors at once; each warning fires on the trap it names; explain picks the engine's route.

// Test helpers outside #[test] functions report failures by panicking too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn seawall(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_seawall"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

fn seawall_stdin(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_seawall"))
        .args(args)
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn schema() -> Value {
    let path = root().join("envoy/seawall.schema.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn validate(schema: &Value, config: &Value) -> Vec<String> {
    let validator = jsonschema::validator_for(schema).unwrap();
    validator
        .iter_errors(config)
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect()
}

/// The Envoy and Istio files in envoy/: every YAML there except those that are not Envoy's or
/// Istio's (Prometheus rules, Grafana, docker-compose).
fn envoy_configs() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root().join("envoy")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let relative = path
                .strip_prefix(root())
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if path.is_dir() {
                if !["envoy/prometheus", "envoy/grafana"].contains(&relative.as_str()) {
                    dirs.push(path);
                }
            } else if relative.ends_with(".yaml")
                && ![
                    // Not Envoy configs: compose, and the rate limit services' own limits.
                    "envoy/docker-compose.yaml",
                    "envoy/global/limits.yaml",
                    "envoy/global/ratelimit-config.yaml",
                ]
                .contains(&relative.as_str())
            {
                found.push(path);
            }
        }
    }
    found.sort();
    assert!(found.len() >= 5, "{found:?}");
    found
}

#[test]
fn the_committed_schema_is_what_the_types_generate() {
    let output = seawall(&["schema"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let generated: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        generated,
        schema(),
        "envoy/seawall.schema.json is stale: regenerate it with\n  cargo run -p seawall-cli -- schema > envoy/seawall.schema.json"
    );
    assert_eq!(generated["additionalProperties"], Value::Bool(false));
}

#[test]
fn every_config_in_envoy_passes_check_and_validates_against_the_schema() {
    let schema = schema();
    let mut plugin_configs = 0;
    for path in envoy_configs() {
        let shown = path.to_string_lossy().into_owned();
        let output = seawall(&["check", &shown]);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{shown}:\n{}{}",
            text(&output.stdout),
            text(&output.stderr)
        );
        let input = seawall_cli::input::find(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for found in input.configs {
            let config: Value = if found.json.trim().is_empty() {
                Value::Object(Default::default())
            } else {
                serde_json::from_str(&found.json).unwrap()
            };
            let errors = validate(&schema, &config);
            assert!(errors.is_empty(), "{shown} {}: {errors:#?}", found.location);
            plugin_configs += 1;
        }
    }
    // demo.yaml, compose/envoy.yaml, ecds/seawall.yaml, istio/wasmplugin.yaml.
    assert!(plugin_configs >= 4, "{plugin_configs}");
}

/// The README's examples: its ```json blocks (whole configs, and section fragments such as
/// `"retries": {...}`), and the plugin configs in its ```yaml blocks.
fn readme_blocks(language: &str) -> Vec<(usize, String)> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (number, line) in readme.lines().enumerate() {
        let fence = line.trim_start();
        match &mut current {
            None if fence == format!("```{language}") => {
                current = Some((number + 1, String::new()))
            }
            Some(_) if fence == "```" => blocks.extend(current.take()),
            Some((_, body)) => {
                body.push_str(line);
                body.push('\n');
            }
            None => {}
        }
    }
    blocks
}

#[test]
fn every_readme_example_passes_check_and_validates_against_the_schema() {
    let schema = schema();
    let blocks = readme_blocks("json");
    assert!(blocks.len() >= 4, "{} json blocks", blocks.len());
    let (mut whole, mut fragments) = (0, 0);
    for (line, block) in blocks {
        let trimmed = block.trim_start();
        if trimmed.starts_with('{') {
            // A whole plugin config: the schema and the filter's own check both accept it.
            let config: Value = serde_json::from_str(&block).unwrap();
            let errors = validate(&schema, &config);
            assert!(errors.is_empty(), "README.md:{line}: {errors:#?}");
            let output = seawall_stdin(&["check", "-"], &block);
            assert_eq!(
                output.status.code(),
                Some(0),
                "README.md:{line}:\n{}",
                text(&output.stderr)
            );
            whole += 1;
        } else {
            // A fragment: one top-level section (`"faults": {...}`), whole in itself. As a
            // config of its own it may name routes or policies defined elsewhere in the README;
            // those references are the only errors it may have.
            assert!(
                trimmed.starts_with('"'),
                "README.md:{line}: neither a config nor a section"
            );
            let config: Value = serde_json::from_str(&format!("{{{block}}}")).unwrap();
            let errors = validate(&schema, &config);
            assert!(errors.is_empty(), "README.md:{line}: {errors:#?}");
            match seawall::config::compile(config.to_string().as_bytes()) {
                Ok(_) => {}
                Err(errors) => {
                    for error in errors.iter() {
                        let message = error.problem.to_string();
                        assert!(
                            message.starts_with("expected the name of a defined")
                                || message.starts_with("expected the name of a route with"),
                            "README.md:{line}: {error}"
                        );
                    }
                    eprintln!(
                        "README.md:{line}: a fragment whose references are defined elsewhere: {errors}"
                    );
                }
            }
            fragments += 1;
        }
    }
    assert!(
        whole >= 1 && fragments >= 3,
        "{whole} whole, {fragments} fragments"
    );

    // YAML blocks: the Envoy and Istio snippets that carry a plugin config. The one in "Loading it
    // into Envoy" holds a placeholder (`{"routes": [...], ...}`), not a config: it is skipped,
    // and it must be the only one skipped.
    let mut skipped = Vec::new();
    let mut checked = 0;
    for (line, block) in readme_blocks("yaml") {
        let Ok(input) = seawall_cli::input::find(&block) else {
            continue;
        };
        for found in input.configs {
            if found.json.contains("[...]") {
                skipped.push(line);
                continue;
            }
            let config: Value = serde_json::from_str(&found.json).unwrap();
            assert!(validate(&schema, &config).is_empty(), "README.md:{line}");
            checked += 1;
        }
    }
    assert_eq!(
        skipped.len(),
        1,
        "placeholders at README.md lines {skipped:?}"
    );
    eprintln!(
        "README yaml: {checked} plugin configs checked, placeholder skipped at line {skipped:?}"
    );
}

const BROKEN: &str = r#"{
  "name": "edge",
  "routes": [
    {"name": "checkout", "match": {"path": {"prefix": "api"}}, "retry": "none"},
    {"name": "bad name!", "rate_limits": ["per-user"]}
  ],
  "rate_limits": {"per-user": {"rate": "fast", "burst": 0}},
  "typo": true
}"#;

#[test]
fn a_broken_config_shows_all_its_errors_with_paths_and_exits_1() {
    let output = seawall_stdin(&["check", "--color", "never", "-"], BROKEN);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    for expected in [
        "typo: unknown field, expected one of",
        "rate_limits.per-user.rate: expected \"<n>/s|m|h\", got \"fast\"",
        "routes[0].match.path.prefix: expected a path starting with '/', got \"api\"",
        "routes[0].retry: expected the name of a defined retry, got \"none\"",
        "routes[1].name: expected a name of 1 to 64 letters",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert_eq!(stderr.matches("error: <stdin>: ").count(), 5, "{stderr}");
    // The same line the filter logs when it refuses the config.
    let compiled = seawall::config::compile(BROKEN.as_bytes()).unwrap_err();
    assert!(
        stderr.contains(&format!("plugin config refused: {compiled}")),
        "{stderr}"
    );
    assert!(text(&output.stdout).contains("refused (5 problems)"));
}

#[test]
fn json_output_lists_errors_and_warnings_for_machines() {
    let output = seawall_stdin(&["check", "--format", "json", "-"], BROKEN);
    assert_eq!(output.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["valid"], false);
    let paths: Vec<&str> = report["configs"][0]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "typo",
            "rate_limits.per-user.rate",
            "routes[0].match.path.prefix",
            "routes[0].retry",
            "routes[1].name"
        ]
    );
    assert!(output.stderr.is_empty(), "{}", text(&output.stderr));

    let output = seawall(&["check", "--format", "json", "envoy/demo.yaml"]);
    assert_eq!(output.status.code(), Some(0));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let config = &report["configs"][0];
    assert_eq!(
        (config["valid"].clone(), config["name"].clone()),
        (Value::Bool(true), Value::from("demo"))
    );
    assert_eq!(config["routes"], 12);
    assert!(config["location"]
        .as_str()
        .unwrap()
        .ends_with("config.configuration.value"));
}

#[test]
fn stdin_plain_json_and_exit_codes() {
    let output = seawall_stdin(&["check", "-"], r#"{"routes": [{"name": "all"}]}"#);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("ok plugin config \"seawall\": 1 routes"));
    // An empty config is the filter's pass-through config.
    assert_eq!(seawall_stdin(&["check", "-"], "").status.code(), Some(0));
    // Not JSON at all: the filter's own syntax error, exit 1.
    let output = seawall_stdin(&["check", "-"], "{\"routes\": [");
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("not valid JSON"));
    // No such file, and a YAML file with no plugin config: the tool could not do its job, exit 2.
    let output = seawall(&["check", "no/such/file.json"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("cannot read no/such/file.json"));
    let output = seawall_stdin(&["check", "-"], "static_resources: {clusters: []}\n");
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("no seawall plugin config found"));
    // Bad arguments.
    assert_eq!(seawall(&["check"]).status.code(), Some(2));
}

#[test]
fn an_istio_manifest_and_a_multi_document_lds_file_are_searched() {
    let yaml = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: unrelated}
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: seawall}
spec:
  pluginConfig:
    routes:
      - name: a
        match: {path: {prefix: nope}}
---
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  filter_chains:
  - filters:
    - typed_config:
        http_filters:
        - typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
            config:
              root_id: seawall
              configuration:
                "@type": type.googleapis.com/google.protobuf.StringValue
                value: '{"routes": [{"name": "b", "retry": "r"}]}'
"#;
    let output = seawall_stdin(&["check", "--color", "never", "-"], yaml);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("document 2: spec.pluginConfig: routes[0].match.path.prefix: expected a path starting with '/'"),
        "{stderr}"
    );
    assert!(
        stderr.contains("document 3: resources[0].filter_chains[0].filters[0].typed_config.http_filters[0].typed_config.config.configuration.value: routes[0].retry: expected the name of a defined retry"),
        "{stderr}"
    );
}

/// Checks `config` and returns its warnings as `path: message` lines.
fn warnings(config: &str) -> Vec<String> {
    let output = seawall_stdin(&["check", "--format", "json", "-"], config);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stdout));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    report["configs"][0]["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            format!(
                "{}: {}",
                w["path"].as_str().unwrap(),
                w["message"].as_str().unwrap()
            )
        })
        .collect()
}

fn has(all: &[String], path: &str, words: &str) {
    assert!(
        all.iter()
            .any(|w| w.starts_with(&format!("{path}: ")) && w.contains(words)),
        "no warning at {path} saying {words:?} in {all:#?}"
    );
}

#[test]
fn a_route_after_a_catch_all_or_a_broader_route_is_unreachable() {
    let all = warnings(
        r#"{"routes": [
            {"name": "api", "match": {"path": {"prefix": "/api"}}},
            {"name": "checkout", "match": {"path": {"prefix": "/api/checkout"}, "methods": ["POST"]}},
            {"name": "post-only", "match": {"methods": ["POST"]}},
            {"name": "everything"},
            {"name": "after"}
        ]}"#,
    );
    has(
        &all,
        "routes[1]",
        "routes[0] (\"api\") matches every request it would",
    );
    has(
        &all,
        "routes[4]",
        "routes[3] (\"everything\") is a catch-all",
    );
    assert_eq!(all.len(), 2, "{all:#?}");
    // The other way round is fine: the specific route first.
    let fine = warnings(
        r#"{"routes": [
            {"name": "checkout", "match": {"path": {"prefix": "/api/checkout"}}},
            {"name": "api", "match": {"path": {"prefix": "/api"}}},
            {"name": "free", "match": {"headers": [{"name": "x-tier", "exact": "free"}]}},
            {"name": "everything"}
        ]}"#,
    );
    assert!(fine.is_empty(), "{fine:#?}");
}

#[test]
fn min_requests_the_rate_limit_never_lets_through_is_flagged() {
    let all = warnings(
        r#"{"routes": [{"name": "pay", "circuit_breaker": "cb", "rate_limits": ["tiny"]}],
            "rate_limits": {"tiny": {"rate": "1/s", "burst": 2}},
            "circuit_breakers": {"cb": {"open_when": {"failure_rate": 50, "min_requests": 20, "window": "10s"}}}}"#,
    );
    has(
        &all,
        "circuit_breakers.cb.open_when.min_requests",
        "at most 12 through (tiny (1/s, burst 2))",
    );
    // A window that sees enough: no warning.
    let fine = warnings(
        r#"{"routes": [{"name": "pay", "circuit_breaker": "cb", "rate_limits": ["tiny"]}],
            "rate_limits": {"tiny": {"rate": "2/s", "burst": 2}},
            "circuit_breakers": {"cb": {"open_when": {"failure_rate": 50, "min_requests": 20, "window": "10s"}}}}"#,
    );
    assert!(fine.is_empty(), "{fine:#?}");
}

#[test]
fn a_fault_with_no_end_time_or_an_ended_one_is_flagged() {
    let all = warnings(
        r#"{"routes": [{"name": "r", "faults": ["forever", "over", "boxed", "off"]}],
            "faults": {
              "forever": {"abort": {"percent": 1}},
              "over": {"abort": {"percent": 1}, "active_between": {"end": "2020-01-01T00:00:00Z"}},
              "boxed": {"abort": {"percent": 1}, "active_between": {"end": "2099-01-01T00:00:00Z"}},
              "off": {"enabled": false, "abort": {"percent": 1}}}}"#,
    );
    has(&all, "faults.forever", "no end time");
    has(&all, "faults.over.active_between.end", "has passed");
    assert_eq!(all.len(), 2, "{all:#?}");
}

#[test]
fn a_short_header_control_secret_is_an_error() {
    let output = seawall_stdin(
        &["check", "-"],
        r#"{"faults": {"f": {"header_control": {"secret_header": "x-k", "secret": "short"}}}}"#,
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains(
        "faults.f.header_control.secret: expected a secret of at least 16 bytes, got 5 bytes"
    ));
}

#[test]
fn max_keys_with_large_shared_data_says_how_large() {
    let all = warnings(
        r#"{"routes": [{"name": "r", "rate_limits": ["per-user"]}],
            "rate_limits": {"per-user": {"rate": "10/s", "key": [{"header": "x-user"}], "max_keys": 100000}}}"#,
    );
    has(
        &all,
        "rate_limits.per-user.max_keys",
        "100001 shared-data keys (",
    );
    has(&all, "rate_limits.per-user.max_keys", "MiB of Envoy heap");
    let fine = warnings(
        r#"{"routes": [{"name": "r", "rate_limits": ["per-user"]}],
            "rate_limits": {"per-user": {"rate": "10/s", "key": [{"header": "x-user"}], "max_keys": 1000}}}"#,
    );
    assert!(fine.is_empty(), "{fine:#?}");
}

#[test]
fn a_level_with_no_exit_condition_is_flagged() {
    let all = warnings(
        r#"{"routes": [{"name": "r", "degradation": "d"}],
            "degradation": {"d": {"levels": [
              {"name": "hot", "enter": {"failure_rate": 20}, "shed_below": "normal"},
              {"name": "same", "enter": {"p95_latency": "1s"}, "exit": {"p95_latency": "1s"}},
              {"name": "fine", "enter": {"failure_rate": 50}, "exit": {"failure_rate": 25}}]}}}"#,
    );
    has(&all, "degradation.d.levels[0]", "has no \"exit\"");
    has(
        &all,
        "degradation.d.levels[1].exit.p95_latency",
        "exits at its enter threshold",
    );
    assert_eq!(all.len(), 2, "{all:#?}");
}

#[test]
fn unused_policies_unbudgeted_retries_and_client_reroute_headers_are_flagged() {
    let all = warnings(
        r#"{"routes": [{"name": "r", "retry": "storm"}],
            "retries": {"storm": {"max_retries": 3, "budget": {"enabled": false}}},
            "rate_limits": {"orphan": {"rate": "1/s"}}}"#,
    );
    has(&all, "rate_limits.orphan", "no route applies it");
    has(&all, "retries.storm.budget.enabled", "up to 4x its traffic");

    let envoy = r#"
static_resources:
  listeners:
  - filter_chains:
    - filters:
      - typed_config:
          route_config: {name: r, virtual_hosts: []}
          http_filters:
          - typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: |
                    {"routes": [{"name": "s", "degradation": "d"}],
                     "degradation": {"d": {"levels": [{"name": "x", "enter": {"failure_rate": 20}, "exit": {"failure_rate": 10},
                                                        "reroute": {"cluster": "backup"}}]}}}
"#;
    let output = seawall_stdin(&["check", "--format", "json", "-"], envoy);
    assert_eq!(output.status.code(), Some(0));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let messages = report["configs"][0]["warnings"].to_string();
    assert!(
        messages
            .contains("x-seawall-cluster is not in the Envoy route config's internal_only_headers"),
        "{messages}"
    );
    // --strict fails on warnings.
    assert_eq!(
        seawall_stdin(&["check", "--strict", "-"], envoy)
            .status
            .code(),
        Some(1)
    );
}

#[test]
fn explain_names_the_route_why_earlier_ones_failed_and_each_decision() {
    let output = seawall(&[
        "explain",
        "envoy/demo.yaml",
        "--format",
        "json",
        "--method",
        "GET",
        "--path",
        "/api/items",
        "-H",
        "x-tier: free",
        "-H",
        "x-user-id: 7",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let explained: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(explained["route"], "free-tier");
    assert_eq!(explained["routes"][0]["name"], "checkout");
    assert_eq!(
        explained["routes"][0]["unmet"],
        serde_json::json!([
            "path starts with \"/api/checkout\" (got \"/api/items\")",
            "method is one of POST (got \"GET\")"
        ])
    );
    assert_eq!(explained["routes"][1]["matched"], true);
    assert_eq!(explained["routes"].as_array().unwrap().len(), 2);
    let policy = &explained["policies"][0];
    assert_eq!(
        (policy["kind"].as_str(), policy["name"].as_str()),
        (Some("rate_limit"), Some("per-user"))
    );
    assert_eq!(policy["key"][0], "header x-user-id = \"7\"");
    assert_eq!(policy["decision"]["rate_limit"], serde_json::json!([3, 2]));
    assert!(policy["decision"]["shared_keys"][0]
        .as_str()
        .unwrap()
        .starts_with("sw:demo:rl:per-user:"));
    assert_eq!(explained["decision"]["verdict"], "upstream");

    // The human form says the same.
    let output = seawall(&[
        "explain",
        "envoy/demo.yaml",
        "--color",
        "never",
        "-X",
        "POST",
        "--path",
        "/api/checkout",
    ]);
    let stdout = text(&output.stdout);
    assert!(stdout.contains("[0] checkout  matches"), "{stdout}");
    assert!(
        stdout.contains("rate_limit checkout-global: to the upstream"),
        "{stdout}"
    );

    // A forced-open breaker replies at once.
    let output = seawall_stdin(
        &["explain", "--format", "json", "--path", "/pay", "-"],
        r#"{"routes": [{"name": "pay", "circuit_breaker": "cb"}],
            "circuit_breakers": {"cb": {"mode": "forced_open", "open_when": {"consecutive_failures": 5}}}}"#,
    );
    let explained: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(explained["decision"]["verdict"], "reply");
    assert_eq!(explained["decision"]["status"], 503);
}

/// The hand-written schemas of the value types accept what their parsers accept, and refuse what
/// they refuse: each value is tried in a config both ways.
#[test]
fn the_schema_and_the_parser_agree_on_values() {
    let schema = schema();
    let cases: [(&str, &[&str]); 4] = [
        (
            r#"{"rate_limits": {"r": {"rate": "10/s", "on_limit": {"status": 429}}}, "circuit_breakers": {"c": {"open_when": {"consecutive_failures": 1}, "open_for": VALUE}}}"#,
            &[
                r#""250ms""#,
                r#""1.5s""#,
                r#""10s""#,
                r#""1m""#,
                r#""2h""#,
                r#""10""#,
                r#""1.s""#,
                r#"".5s""#,
                r#""10 s""#,
                r#""1e3ms""#,
                r#""-1s""#,
                "5",
            ],
        ),
        (
            r#"{"rate_limits": {"r": {"rate": VALUE}}}"#,
            &[
                r#""100/s""#,
                r#""600/m""#,
                r#""5/h""#,
                r#""0/s""#,
                r#""1.5/s""#,
                r#""10/d""#,
                r#""/s""#,
                r#""007/s""#,
                "10",
            ],
        ),
        (
            r#"{"faults": {"f": {"abort": {"percent": VALUE}}}}"#,
            &["0", "100", "0.0001", "100.5", "-1", r#""5""#],
        ),
        (
            r#"{"faults": {"f": {"abort": {"percent": 1}, "active_between": {"end": VALUE}}}}"#,
            &[
                r#""2026-11-22T10:00:00Z""#,
                r#""2026-11-22T11:00:00.5+01:00""#,
                r#""2026-11-22 10:00:00z""#,
                r#""2026-11-22""#,
                r#""2026-11-22T10:00:00""#,
                r#""1969-12-31T23:59:59Z""#,
                r#""2999-01-01T00:00:00Z""#,
            ],
        ),
    ];
    for (template, values) in cases {
        for value in values {
            let text = template.replace("VALUE", value);
            let config: Value = serde_json::from_str(&text).unwrap();
            let by_schema = validate(&schema, &config).is_empty();
            let by_parser = seawall::config::compile(text.as_bytes()).is_ok();
            assert_eq!(by_schema, by_parser, "{value} in {template}");
        }
    }
}

/// Splits a command line the way a shell would for the simple quoting the docs use.
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                any = false;
            }
            c => word.push(c),
        }
    }
    if any || !word.is_empty() {
        words.push(word);
    }
    words
}

/// The `seawall explain` outputs pasted in the README are what the tool prints today.
#[test]
fn the_explain_output_in_the_docs_is_current() {
    let mut checked = 0;
    for doc in ["README.md"] {
        let text = std::fs::read_to_string(root().join(doc)).expect("read the README");
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            let Some(command) = line.strip_prefix("$ seawall explain ") else {
                continue;
            };
            let pasted: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
            let mut args = vec![
                "explain".to_owned(),
                "--color".to_owned(),
                "never".to_owned(),
            ];
            args.extend(shell_words(command));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let output = seawall(&args);
            assert_eq!(
                text_of(&output).trim_end(),
                pasted.join("\n").trim_end(),
                "{doc}: the output of `seawall explain {command}` changed: paste the new one"
            );
            checked += 1;
        }
    }
    assert!(checked >= 1, "no pasted explain output found in the docs");
}

fn text_of(output: &Output) -> String {
    assert!(output.status.success(), "{}", text(&output.stderr));
    text(&output.stdout)
}
