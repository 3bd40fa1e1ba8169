//! How results are shown: for people (results on stdout, diagnostics on stderr, colour only on a
//! terminal) or as one JSON document on stdout for machines.

use std::io::IsTerminal;

use clap::ValueEnum;
use serde::Serialize;
use serde_json::json;

use crate::check::Checked;
use crate::explain::{Decision, Explanation};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Human,
    Json,
}

/// ANSI colour, decided once per stream.
pub struct Style {
    stdout: bool,
    stderr: bool,
}

impl Style {
    /// `forced`: `--color always|never`; otherwise colour where the stream is a terminal and
    /// `NO_COLOR` is not set (no-color.org).
    pub fn new(forced: Option<bool>) -> Self {
        let allowed = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        let pick = |terminal: bool| forced.unwrap_or(allowed && terminal);
        Style {
            stdout: pick(std::io::stdout().is_terminal()),
            stderr: pick(std::io::stderr().is_terminal()),
        }
    }

    fn paint(on: bool, code: &str, text: &str) -> String {
        if on {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn out(&self, code: &str, text: &str) -> String {
        Style::paint(self.stdout, code, text)
    }

    fn err(&self, code: &str, text: &str) -> String {
        Style::paint(self.stderr, code, text)
    }
}

const RED: &str = "1;31";
const GREEN: &str = "32";
const YELLOW: &str = "1;33";
const BOLD: &str = "1";
const DIM: &str = "2";

pub fn print_json(value: &impl Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => crate::out!("{text}"),
        Err(error) => eprintln!("seawall: {error}"),
    }
}

fn where_of(file: &str, checked: &Checked) -> String {
    if checked.found.location.is_empty() {
        file.to_owned()
    } else {
        format!("{file}: {}", checked.found.location)
    }
}

pub fn check_human(file: &str, all: &[Checked], notes: &[String], style: &Style) {
    for note in notes {
        crate::out!("{file}: {note}");
    }
    for checked in all {
        let at = where_of(file, checked);
        match &checked.result {
            Ok(summary) => {
                for warning in &checked.warnings {
                    let path = if warning.path.is_empty() {
                        String::new()
                    } else {
                        format!("{}: ", warning.path)
                    };
                    eprintln!(
                        "{} {at}: {path}{}",
                        style.err(YELLOW, "warning:"),
                        warning.message
                    );
                }
                let warned = match checked.warnings.len() {
                    0 => String::new(),
                    1 => ", 1 warning".to_owned(),
                    n => format!(", {n} warnings"),
                };
                crate::out!(
                    "{at}: {} plugin config \"{}\": {} routes, {} policies, {} shared-data keys{warned}",
                    style.out(GREEN, "ok"),
                    summary.name,
                    summary.routes,
                    summary.policies,
                    summary.shared_keys
                );
            }
            Err(errors) => {
                for error in errors {
                    eprintln!("{} {at}: {error}", style.err(RED, "error:"));
                }
                eprintln!(
                    "{}",
                    style.err(
                        DIM,
                        &format!(
                            "  the filter would log: plugin config refused: {}",
                            seawall::config::ConfigErrors(errors.clone())
                        )
                    )
                );
                crate::out!(
                    "{at}: {} ({} problem{})",
                    style.out(RED, "refused"),
                    errors.len(),
                    if errors.len() == 1 { "" } else { "s" }
                );
            }
        }
    }
}

pub fn check_json(file: &str, all: &[Checked], notes: &[String]) {
    let configs: Vec<serde_json::Value> = all
        .iter()
        .map(|checked| {
            let warnings: Vec<serde_json::Value> = checked
                .warnings
                .iter()
                .map(|w| json!({"path": w.path, "message": w.message}))
                .collect();
            let mut entry = json!({
                "location": checked.found.location,
                "plugin": checked.found.plugin,
                "valid": checked.result.is_ok(),
                "warnings": warnings,
            });
            match &checked.result {
                Ok(summary) => {
                    entry["name"] = json!(summary.name);
                    entry["routes"] = json!(summary.routes);
                    entry["policies"] = json!(summary.policies);
                    entry["shared_keys"] = json!(summary.shared_keys);
                    entry["errors"] = json!([]);
                }
                Err(errors) => {
                    entry["errors"] = errors
                        .iter()
                        .map(|e| json!({"path": e.path, "message": e.problem.to_string()}))
                        .collect();
                    entry["log_line"] = json!(format!(
                        "plugin config refused: {}",
                        seawall::config::ConfigErrors(errors.clone())
                    ));
                }
            }
            entry
        })
        .collect();
    print_json(&json!({
        "file": file,
        "valid": all.iter().all(|c| c.result.is_ok()),
        "configs": configs,
        "notes": notes,
    }));
}

fn decision_text(decision: &Decision, style: &Style) -> String {
    let mut parts = vec![match decision.verdict {
        "reply" => style.out(
            RED,
            &format!(
                "local reply {}",
                decision.status.map_or_else(String::new, |s| s.to_string())
            ),
        ),
        "delayed" => style.out(
            YELLOW,
            &format!(
                "delayed {}ms, then {}",
                decision.delay_ms.unwrap_or(0),
                decision.status.map_or_else(
                    || "to the upstream".to_owned(),
                    |s| format!("local reply {s}")
                )
            ),
        ),
        _ => style.out(GREEN, "to the upstream"),
    }];
    if let Some(status) = decision.response_status {
        parts.push(format!("the upstream's response replaced by {status}"));
    }
    if let Some(seconds) = decision.retry_after_s {
        parts.push(format!("Retry-After {seconds}s"));
    }
    if let Some((limit, remaining)) = decision.rate_limit {
        parts.push(format!("RateLimit {remaining} of {limit} left"));
    }
    if let Some(retries) = decision.retries {
        parts.push(format!("{retries} retries granted"));
    }
    if let Some(reroute) = &decision.reroute {
        parts.push(format!("rerouted to {reroute}"));
    }
    if !decision.strip_headers.is_empty() {
        parts.push(format!("removes {}", decision.strip_headers.join(", ")));
    }
    parts.join("; ")
}

pub fn explain_human(explanation: &Explanation, style: &Style) {
    let request = &explanation.request;
    let mut line = format!("{} {}", request.method, request.path);
    for (name, value) in &request.headers {
        line.push_str(&format!("  {name}: {value}"));
    }
    for (label, value) in [
        ("authority", &request.authority),
        ("route_name", &request.route_name),
        ("cluster", &request.cluster),
        ("client_ip", &request.client_ip),
    ] {
        if let Some(value) = value {
            line.push_str(&format!("  [{label} {value}]"));
        }
    }
    crate::out!(
        "{} {line}  (plugin \"{}\")",
        style.out(BOLD, "request:"),
        explanation.plugin
    );
    if !explanation.removed_headers.is_empty() {
        crate::out!(
            "  removed before matching (seawall sets them itself): {}",
            explanation.removed_headers.join(", ")
        );
    }
    crate::out!();
    crate::out!("{}", style.out(BOLD, "routes (first match wins):"));
    let width = explanation
        .routes
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(0);
    let index_width = explanation.routes.len().saturating_sub(1).to_string().len() + 2;
    for route in &explanation.routes {
        let name = format!("{:width$}", route.name);
        let index = format!("{:<index_width$}", format!("[{}]", route.index));
        if route.matched {
            crate::out!(
                "  {index} {}  {}",
                style.out(BOLD, &name),
                style.out(GREEN, "matches")
            );
        } else {
            crate::out!("  {index} {name}  no: {}", route.unmet.join("; "));
        }
    }
    let unknown_property = explanation
        .routes
        .iter()
        .flat_map(|r| &r.unmet)
        .any(|why| why.contains("(xds.") && why.ends_with("(got none)"));
    if unknown_property {
        crate::out!(
            "  {}",
            style.out(
                DIM,
                "(Envoy's route name and cluster are known only to Envoy: give them with --route-name and --cluster)"
            )
        );
    }
    let Some(route) = &explanation.route else {
        crate::out!("  no route matches: seawall lets the request through untouched");
        return;
    };
    crate::out!();
    if explanation.policies.is_empty() {
        crate::out!("route \"{route}\" applies no policy");
    } else {
        crate::out!(
            "{}",
            style.out(
                BOLD,
                &format!(
                    "policies of route \"{route}\", in pipeline order, each alone on fresh state:"
                )
            )
        );
        for policy in &explanation.policies {
            crate::out!(
                "  {} {}: {}",
                policy.kind,
                style.out(BOLD, &policy.name),
                decision_text(&policy.decision, style)
            );
            for key in &policy.key {
                crate::out!("      key: {key}");
            }
            for key in &policy.decision.shared_keys {
                crate::out!("      shared data written: {key}");
            }
            for note in &policy.notes {
                crate::out!("      {}", style.out(DIM, note));
            }
        }
    }
    crate::out!();
    let chance = if explanation.decision.by_chance {
        " (one draw of chance)"
    } else {
        ""
    };
    crate::out!(
        "{} {}{chance}",
        style.out(BOLD, "decision (whole pipeline, fresh state):"),
        decision_text(&explanation.decision, style)
    );
}
