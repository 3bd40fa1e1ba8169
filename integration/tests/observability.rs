//! What operators watch seawall with must name what Envoy really exports. The Prometheus rules
//! (envoy/prometheus/seawall.rules.yml), the Grafana dashboard (envoy/grafana/seawall.json) and
//! the README's metrics table are written by hand against names Envoy derives from seawall's own
//! (`wasmcustom.` prefix at `/stats`, dropped at `/stats/prometheus`, dots to underscores, names
//! to labels through envoy/prometheus/stats_tags.yaml). A typo or a renamed counter would leave a
//! panel empty or an alert silent with no error anywhere, so these tests run the real Envoy with
//! the demo's plugin config, drive traffic that makes every policy act, scrape it, and check
//! each name; and they run `promtool` on the rules and their unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use seawall_integration::client::send_once;
use seawall_integration::{demo, Behaviour, Envoy, Match, Request, Upstream};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ has a parent")
        .to_path_buf()
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative))
        .unwrap_or_else(|error| panic!("read {relative}: {error}"))
}

/// The demo's Envoy, as the harness renders it: the demo's plugin config, routes and clusters
/// (all three clusters on `upstream`), and its stats tags.
fn demo_envoy(upstream: &Upstream) -> Envoy {
    let addr = upstream.addr();
    Envoy::start(
        demo::envoy_config(addr, addr)
            .concurrency(2)
            .bootstrap_yaml(&demo::stats_tags()),
    )
}

// ---------------------------------------------------------------------------------------------
// Reading PromQL, the rules file and a Prometheus scrape.

/// PromQL functions and aggregations the rules and the dashboard may call, and Grafana's
/// `label_values`. An identifier before `(` that is not here is an error rather than a silent
/// skip, so a misspelt function cannot hide a metric name.
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "avg",
    "avg_over_time",
    "bottomk",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "count",
    "count_over_time",
    "count_values",
    "delta",
    "deriv",
    "floor",
    "group",
    "histogram_quantile",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "label_values",
    "last_over_time",
    "max",
    "max_over_time",
    "min",
    "min_over_time",
    "predict_linear",
    "quantile",
    "quantile_over_time",
    "rate",
    "resets",
    "round",
    "scalar",
    "sort",
    "sort_desc",
    "stddev",
    "stdvar",
    "sum",
    "sum_over_time",
    "time",
    "timestamp",
    "topk",
    "vector",
];

/// Aggregations, which may take their grouping before their argument (`sum by (x) (...)`).
const AGGREGATIONS: &[&str] = &[
    "avg",
    "bottomk",
    "count",
    "count_values",
    "group",
    "max",
    "min",
    "quantile",
    "stddev",
    "stdvar",
    "sum",
    "topk",
];

/// Keywords followed by a list of label names, which are not metrics.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

const OPERATORS: &[&str] = &["and", "or", "unless", "bool", "offset", "atan2"];

/// The metric names a PromQL expression (or a Grafana `label_values(...)` query) reads: every
/// identifier that is not a function, keyword, label name, string, duration or Grafana variable.
fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // The closer of a bracket whose contents are skipped: label matchers, ranges, strings.
    let skip_to = |i: usize, close: char| -> Result<usize, String> {
        chars[i + 1..]
            .iter()
            .position(|&c| c == close)
            .map(|at| i + 1 + at + 1)
            .ok_or_else(|| format!("unclosed {:?} in {expr:?}", chars[i]))
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_to(i, c)?,
            '{' => i = skip_to(i, '}')?,
            '[' => i = skip_to(i, ']')?,
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    i = skip_to(i, '}')?;
                } else {
                    while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let before_paren = chars.get(next) == Some(&'(');
                if GROUPING.contains(&word.as_str()) {
                    if before_paren {
                        i = skip_to(next, ')')?;
                    }
                } else if OPERATORS.contains(&word.as_str())
                    || AGGREGATIONS.contains(&word.as_str())
                {
                } else if before_paren {
                    if !FUNCTIONS.contains(&word.as_str()) {
                        return Err(format!("unknown function {word:?} in {expr:?}"));
                    }
                    if word == "label_values" {
                        // label_values(metric, label): only the first argument is a metric.
                        let close = skip_to(next, ')')?;
                        let args: String = chars[next + 1..close - 1].iter().collect();
                        let metric = args.split(',').next().unwrap_or("").trim();
                        names.extend(metric_names(metric)?);
                        i = close;
                    }
                } else {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    Ok(names)
}

/// One rule of a Prometheus rules file.
#[derive(Debug)]
struct Rule {
    /// The `record` or `alert` name.
    name: String,
    record: bool,
    expr: String,
}

/// The rules of a rules file: `- record:`/`- alert:` starts one; `expr:` is inline or a block
/// scalar. Only what seawall.rules.yml uses is read; a count check catches a shape it misses.
fn parse_rules(text: &str) -> Vec<Rule> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |line: &str| line.len() - line.trim_start().len();
    let mut rules: Vec<Rule> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let trimmed = lines[i].trim_start();
        if let Some(name) = trimmed.strip_prefix("- record:") {
            rules.push(Rule {
                name: name.trim().to_owned(),
                record: true,
                expr: String::new(),
            });
        } else if let Some(name) = trimmed.strip_prefix("- alert:") {
            rules.push(Rule {
                name: name.trim().to_owned(),
                record: false,
                expr: String::new(),
            });
        } else if let Some(expr) = trimmed.strip_prefix("expr:") {
            let rule = rules.last_mut().expect("an expr belongs to a rule");
            let expr = expr.trim();
            if expr == "|" || expr == ">" || expr == "|-" || expr == ">-" {
                let depth = indent(lines[i]);
                while i + 1 < lines.len()
                    && (lines[i + 1].trim().is_empty() || indent(lines[i + 1]) > depth)
                {
                    i += 1;
                    rule.expr.push_str(lines[i].trim());
                    rule.expr.push(' ');
                }
            } else {
                rule.expr = expr.to_owned();
            }
        }
        i += 1;
    }
    let exprs = lines
        .iter()
        .filter(|line| line.trim_start().starts_with("expr:"))
        .count();
    assert_eq!(exprs, rules.len(), "every rule has exactly one expr");
    assert!(
        rules.iter().all(|rule| !rule.expr.trim().is_empty()),
        "an expr was not read: {rules:?}"
    );
    rules
}

/// The exported metrics `names` read, with recording rules replaced by what they read in turn.
fn resolve(names: &BTreeSet<String>, rules: &[Rule]) -> Result<BTreeSet<String>, String> {
    let mut exported = BTreeSet::new();
    let mut pending: Vec<String> = names.iter().cloned().collect();
    let mut seen = BTreeSet::new();
    while let Some(name) = pending.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let defining: Vec<&Rule> = rules
            .iter()
            .filter(|rule| rule.record && rule.name == name)
            .collect();
        if defining.is_empty() {
            exported.insert(name);
        }
        for rule in defining {
            pending.extend(metric_names(&rule.expr)?);
        }
    }
    Ok(exported)
}

/// A `/stats/prometheus` scrape: each family's `# TYPE`, and each sample's labels.
#[derive(Debug, Default)]
struct Scrape {
    kinds: BTreeMap<String, String>,
    samples: Vec<(String, BTreeMap<String, String>)>,
}

fn parse_scrape(text: &str) -> Scrape {
    let mut scrape = Scrape::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                scrape.kinds.insert(name.to_owned(), kind.to_owned());
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = line[..name_end].to_owned();
        let mut labels = BTreeMap::new();
        if line[name_end..].starts_with('{') {
            let close = line.rfind('}').expect("a sample's labels close");
            for pair in line[name_end + 1..close].split("\",") {
                if let Some((key, value)) = pair.split_once("=\"") {
                    labels.insert(
                        key.trim_start_matches(',').to_owned(),
                        value.trim_end_matches('"').to_owned(),
                    );
                }
            }
        }
        scrape.samples.push((name, labels));
    }
    scrape
}

/// Every metric the dashboard's queries and variables read, recording rules resolved.
fn dashboard_metrics(dashboard: &serde_json::Value, rules: &[Rule]) -> BTreeSet<String> {
    fn walk(value: &serde_json::Value, queries: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr" | "definition", serde_json::Value::String(query)) => {
                            queries.push(query.clone())
                        }
                        _ => walk(value, queries),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, queries)),
            _ => {}
        }
    }
    let mut queries = Vec::new();
    walk(dashboard, &mut queries);
    assert!(queries.len() > 20, "the dashboard's queries were not found");
    let mut names = BTreeSet::new();
    for query in &queries {
        let found = metric_names(query).unwrap_or_else(|error| panic!("{error}"));
        assert!(!found.is_empty(), "no metric in dashboard query {query:?}");
        names.extend(found);
    }
    resolve(&names, rules).unwrap_or_else(|error| panic!("{error}"))
}

/// Every metric the rules read, recording rules resolved.
fn rules_metrics(rules: &[Rule]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for rule in rules {
        names.extend(metric_names(&rule.expr).unwrap_or_else(|error| panic!("{error}")));
    }
    resolve(&names, rules).unwrap_or_else(|error| panic!("{error}"))
}

/// The names in `wanted` that the scrape has no sample of.
fn missing_from(wanted: &BTreeSet<String>, scrape: &Scrape) -> Vec<String> {
    let exported: BTreeSet<&str> = scrape.samples.iter().map(|(n, _)| n.as_str()).collect();
    wanted
        .iter()
        .filter(|name| !exported.contains(name.as_str()))
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The checks' own tests: each shows its check can fail.

#[test]
fn the_extractor_finds_metrics_and_nothing_else() {
    let expr = r#"sum by (seawall_policy) (rate(seawall_rate_limit_allowed{seawall_policy=~"$rate_limit", job!="x"}[$__rate_interval]))
        / on (job) group_left (seawall_route) seawall:route_requests:rate5m offset 5m > bool 0.2 or vector(0)"#;
    assert_eq!(
        metric_names(expr).unwrap(),
        BTreeSet::from([
            "seawall_rate_limit_allowed".to_owned(),
            "seawall:route_requests:rate5m".to_owned()
        ])
    );
    assert_eq!(
        metric_names("label_values(seawall_route_requests, seawall_route)").unwrap(),
        BTreeSet::from(["seawall_route_requests".to_owned()])
    );
    let misspelt = metric_names("rat(seawall_rate_limit_allowed[5m])");
    assert!(
        misspelt.is_err(),
        "an unknown function must be refused: {misspelt:?}"
    );
}

#[test]
fn a_query_naming_a_metric_envoy_does_not_export_is_reported() {
    let scrape = parse_scrape(
        "# TYPE seawall_rate_limit_allowed counter\nseawall_rate_limit_allowed{seawall_policy=\"a\"} 3\n",
    );
    let rules = parse_rules(
        "groups:\n- name: g\n  rules:\n  - record: seawall:allowed:rate5m\n    expr: |\n      sum(rate(seawall_rate_limit_alowed[5m]))\n  - alert: A\n    expr: seawall:allowed:rate5m > 0\n",
    );
    let dashboard = serde_json::json!({"panels": [{"targets": [
        {"expr": "rate(seawall_rate_limit_allowed[5m])"}, {"expr": "seawall:allowed:rate5m"}]}]});
    let mut queries = BTreeSet::new();
    for target in dashboard["panels"][0]["targets"].as_array().unwrap() {
        queries.extend(metric_names(target["expr"].as_str().unwrap()).unwrap());
    }
    let wanted = resolve(&queries, &rules).unwrap();
    // The recording rule's typo reaches through to the dashboard panel that uses it.
    assert_eq!(
        missing_from(&wanted, &scrape),
        vec!["seawall_rate_limit_alowed".to_owned()]
    );
    assert_eq!(
        missing_from(&rules_metrics(&rules), &scrape),
        vec!["seawall_rate_limit_alowed".to_owned()]
    );
    assert!(missing_from(
        &BTreeSet::from(["seawall_rate_limit_allowed".to_owned()]),
        &scrape
    )
    .is_empty());
}

// ---------------------------------------------------------------------------------------------
// promtool.

/// `promtool`, or `None` (having said so) where it is missing and tools are not required.
fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if found {
        return Some("promtool");
    }
    assert!(
        std::env::var("SEAWALL_REQUIRE_TOOLS").as_deref() != Ok("1"),
        "SEAWALL_REQUIRE_TOOLS=1, but promtool is missing (Debian: apt-get install prometheus)"
    );
    eprintln!(
        "[observability] promtool is missing (Debian: prometheus): the rules were NOT checked"
    );
    None
}

fn run_promtool(promtool: &str, args: &[&str]) {
    let output = Command::new(promtool)
        .args(args)
        .current_dir(root())
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("[observability] promtool {}:\n{text}", args.join(" "));
    assert!(
        output.status.success(),
        "promtool {} failed:\n{text}",
        args.join(" ")
    );
}

#[test]
fn promtool_checks_the_rules_runs_their_unit_tests_and_parses_the_dashboard_queries() {
    let Some(promtool) = promtool() else {
        return;
    };
    run_promtool(
        promtool,
        &["check", "rules", "envoy/prometheus/seawall.rules.yml"],
    );
    run_promtool(
        promtool,
        &["test", "rules", "envoy/prometheus/seawall.rules.test.yml"],
    );
    // Every dashboard query, with Grafana's variables filled in, as a recording rule: promtool
    // parses it as Prometheus would.
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("envoy/grafana/seawall.json")).expect("the dashboard is JSON");
    let mut rules = String::from("groups:\n- name: dashboard\n  rules:\n");
    let mut count = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a target has an expr");
            let mut filled = expr.replace("$__rate_interval", "5m");
            for variable in [
                "route",
                "rate_limit",
                "circuit_breaker",
                "retry",
                "fault",
                "degradation",
            ] {
                filled = filled.replace(&format!("${variable}"), ".*");
            }
            assert!(!filled.contains('$'), "an unknown variable in {expr:?}");
            rules.push_str(&format!(
                "  - record: dashboard_query_{count}\n    expr: {}\n",
                serde_json::to_string(&filled).unwrap()
            ));
            count += 1;
        }
    }
    let dir = std::env::temp_dir().join(format!("seawall-observability-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("dashboard-queries.rules.yml");
    std::fs::write(&file, rules).unwrap();
    run_promtool(promtool, &["check", "rules", file.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Real Envoy.

/// Sends `request` and returns the status (0 if the connection failed).
fn status(envoy: &Envoy, request: &Request) -> u16 {
    send_once(envoy.listener_addr(), request).map_or(0, |response| response.status)
}

/// Polls a seawall stat (by its own name) until `done`, within `timeout`.
fn wait_for(envoy: &Envoy, name: &str, timeout: Duration, done: impl Fn(u64) -> bool) -> u64 {
    envoy.wait_for_stat(&format!("wasmcustom.{name}"), timeout, done)
}

#[test]
fn every_metric_the_dashboard_and_the_rules_read_is_exported_by_envoy_under_demo_traffic() {
    let upstream = Upstream::start();
    upstream.set_behaviour(Behaviour::ok());
    // The shop's health path fails from the start: its probes raise the degradation level.
    upstream.set_rule(
        Match::PathPrefix("/healthz/shop".into()),
        Behaviour::ok().status(503),
    );
    upstream.set_rule(
        Match::PathPrefix("/payments".into()),
        Behaviour::ok().status(503),
    );
    upstream.set_rule(
        Match::PathPrefix("/flaky".into()),
        Behaviour::ok().failing(0.5, 503),
    );
    let envoy = demo_envoy(&upstream);

    // Rate limits: alice's bucket holds 3 and refills 1/s; the shadow `trial` 1/min.
    let alice = || {
        Request::get("/api/items")
            .header("x-tier", "free")
            .header("x-user-id", "alice")
    };
    let limited = (0..6).filter(|_| status(&envoy, &alice()) == 429).count();
    for _ in 0..3 {
        status(&envoy, &Request::get("/trial"));
    }
    status(
        &envoy,
        &Request::post("/api/checkout").header("x-user-id", "bob"),
    );
    // Circuit breaker: 3 failures in a row open it, then it refuses.
    for _ in 0..3 {
        status(&envoy, &Request::get("/payments"));
    }
    let refused = status(&envoy, &Request::get("/payments"));
    // Retries: every other attempt fails.
    for _ in 0..10 {
        status(&envoy, &Request::get("/flaky"));
    }
    // Faults: a 30% cohort abort, a delay, header control with and without the secret.
    let aborted = (0..40)
        .filter(|n| {
            status(
                &envoy,
                &Request::get("/chaos").header("x-user-id", format!("user-{n}")),
            ) == 503
        })
        .count();
    status(&envoy, &Request::get("/slow"));
    status(
        &envoy,
        &Request::get("/slow")
            .header("x-seawall-fault-abort", "418")
            .header("x-chaos-key", "wrong"),
    );
    status(
        &envoy,
        &Request::get("/slow")
            .header("x-seawall-fault-abort", "418")
            .header("x-chaos-key", "demo-chaos-secret-1"),
    );
    // Degradation: the failing probes raise the shop to `critical` a step at a time; low
    // priority is shed from the first level; at the second the catalog answers every priority
    // with its fallback, and the rest of the shop sheds all but critical.
    let level = wait_for(
        &envoy,
        "seawall.degradation.shop.level",
        Duration::from_secs(20),
        |level| level >= 2,
    );
    assert_eq!(level, 2, "the failing probes raise the shop to critical");
    let shed = status(
        &envoy,
        &Request::get("/shop/cart").header("x-priority", "low"),
    );
    let fallback = status(
        &envoy,
        &Request::get("/shop/catalog").header("x-priority", "critical"),
    );
    eprintln!(
        "[observability] {limited} of alice's 6 limited; /payments refused with {refused}; {aborted} of 40 chaos users aborted; shed {shed}, fallback {fallback}"
    );

    let stats = envoy.stats();
    // (`client_reroute_headers_removed` stays 0: the demo lists the reroute header in
    // `internal_only_headers`, so Envoy strips a client's copy before seawall sees it.)
    // Each policy acted, so the scrape below shows the series moving, not only defined.
    for (name, what) in [
        (
            "seawall.rate_limit.per-user.limited",
            "a rate limit refused",
        ),
        (
            "seawall.rate_limit.trial.shadow_limited",
            "a shadow limit counted",
        ),
        (
            "seawall.circuit_breaker.payments.opened",
            "the breaker opened",
        ),
        (
            "seawall.circuit_breaker.payments.rejected",
            "the breaker refused",
        ),
        (
            "seawall.circuit_breaker.payments.open",
            "the breaker is open",
        ),
        ("seawall.retry.api-retries.granted", "retries were granted"),
        ("seawall.retry.api-retries.used", "retries were used"),
        ("seawall.fault.chaos.aborts", "faults aborted"),
        ("seawall.fault.slow.delays", "a delay was injected"),
        (
            "seawall.fault.slow.header_control_applied",
            "header control applied",
        ),
        (
            "seawall.fault.slow.header_control_rejected",
            "header control refused",
        ),
        ("seawall.degradation.shop.escalated", "the level rose"),
        ("seawall.degradation.shop.shed", "a request was shed"),
        ("seawall.degradation.shop.fallback", "a fallback answered"),
        (
            "seawall.route.checkout.requests",
            "the checkout route was used",
        ),
        ("seawall.workers.all.ticks", "workers flushed"),
    ] {
        assert!(stats.seawall(name) > 0, "{what}: {name} is 0");
    }

    let scrape = parse_scrape(&envoy.prometheus());
    let rules = parse_rules(&read("envoy/prometheus/seawall.rules.yml"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("envoy/grafana/seawall.json")).expect("the dashboard is JSON");
    let from_rules = rules_metrics(&rules);
    let from_dashboard = dashboard_metrics(&dashboard, &rules);
    eprintln!(
        "[observability] the rules read {} exported metrics, the dashboard {}",
        from_rules.len(),
        from_dashboard.len()
    );
    assert_eq!(
        missing_from(&from_rules, &scrape),
        Vec::<String>::new(),
        "the rules name metrics Envoy does not export"
    );
    assert_eq!(
        missing_from(&from_dashboard, &scrape),
        Vec::<String>::new(),
        "the dashboard names metrics Envoy does not export"
    );
    // The queries select and group by these labels: every sample of a metric they read has its.
    for name in from_rules.union(&from_dashboard) {
        let label = if name.starts_with("seawall_route_") {
            Some("seawall_route")
        } else if name.starts_with("seawall_plugin_") {
            Some("seawall_plugin")
        } else if name.starts_with("seawall_workers_") {
            None
        } else {
            Some("seawall_policy")
        };
        for (_, labels) in scrape.samples.iter().filter(|(n, _)| n == name) {
            if let Some(label) = label {
                assert!(
                    labels.contains_key(label),
                    "{name} has no {label} label: {labels:?}"
                );
            }
        }
    }
}

/// One row of the README's metrics table.
#[derive(Debug)]
struct Row {
    stats: String,
    prometheus: String,
    kind: String,
}

/// The first table under "### Metrics" in README.md.
fn readme_metrics_table() -> Vec<Row> {
    let readme = read("README.md");
    let start = readme
        .find("\n### Metrics\n")
        .expect("README.md has a ### Metrics section");
    let section = &readme[start + 1..];
    let end = ["\n## ", "\n### "]
        .iter()
        .filter_map(|heading| section[4..].find(heading))
        .min()
        .map_or(section.len(), |end| end + 4);
    let section = &section[..end];
    let strip = |cell: &str| cell.trim().trim_matches('`').to_owned();
    let rows: Vec<Row> = section
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .skip(2)
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split('|').collect();
            assert!(cells.len() >= 4, "a metrics row has 4 columns: {line}");
            Row {
                stats: strip(cells[0]),
                prometheus: strip(cells[1]),
                kind: strip(cells[2]),
            }
        })
        .collect();
    assert!(!rows.is_empty(), "no table under ### Metrics");
    rows
}

/// `wasmcustom.seawall.<kind>.<name>.<counter>` with the name as the table writes it.
fn table_pattern(stat: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = stat
        .strip_prefix("wasmcustom.seawall.")?
        .splitn(3, '.')
        .collect();
    let [kind, name, counter] = parts[..] else {
        return None;
    };
    let placeholder = match kind {
        "route" => "<route>",
        "plugin" => "<plugin>",
        "workers" => return Some((stat.to_owned(), String::new())),
        _ => "<policy>",
    };
    Some((
        format!("wasmcustom.seawall.{kind}.{placeholder}.{counter}"),
        name.to_owned(),
    ))
}

#[test]
fn the_readme_metrics_table_lists_exactly_what_envoy_exports_for_the_demo() {
    let upstream = Upstream::start();
    let envoy = demo_envoy(&upstream);
    // Every metric is defined when the config loads; wait for both workers to have loaded it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stats = envoy.current_stats();
    while stats
        .get("wasmcustom.seawall.workers.all.ticks")
        .unwrap_or(0)
        < 2
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
        stats = envoy.current_stats();
    }
    let scrape = parse_scrape(&envoy.prometheus());
    let exported: BTreeMap<String, String> = stats
        .values
        .keys()
        .filter(|name| name.starts_with("wasmcustom.seawall."))
        .map(|name| {
            table_pattern(name).unwrap_or_else(|| panic!("{name} is not seawall.<kind>.<name>.<x>"))
        })
        .collect::<BTreeMap<_, _>>();
    let rows = readme_metrics_table();
    let listed: BTreeSet<&str> = rows.iter().map(|row| row.stats.as_str()).collect();
    let exported_patterns: BTreeSet<&str> = exported.keys().map(String::as_str).collect();
    let missing: Vec<_> = exported_patterns.difference(&listed).collect();
    let extra: Vec<_> = listed.difference(&exported_patterns).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "README's metrics table: missing {missing:?}, listed but not exported {extra:?}"
    );
    assert_eq!(listed.len(), rows.len(), "a stat is listed twice");
    // Each row's Prometheus name and kind, checked on one of the demo's real stats.
    let placeholders = ["<policy>", "<route>", "<plugin>"];
    for row in &rows {
        let name = &exported[&row.stats];
        let mut sample = row.prometheus.clone();
        for placeholder in placeholders {
            sample = sample.replace(placeholder, name);
        }
        let (family, labels) = match sample.split_once('{') {
            Some((family, labels)) => (family.to_owned(), labels.trim_end_matches('}')),
            None => (sample.clone(), ""),
        };
        let labels: BTreeMap<String, String> = labels
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
            .collect();
        assert!(
            scrape
                .samples
                .iter()
                .any(|(n, l)| *n == family && *l == labels),
            "{}: README says {}, but the scrape has no {family} with {labels:?}",
            row.stats,
            row.prometheus
        );
        assert_eq!(
            Some(&row.kind),
            scrape.kinds.get(&family),
            "{}: the README's kind against Envoy's # TYPE",
            row.stats
        );
    }
}
