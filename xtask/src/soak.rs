//! `cargo xtask soak [--minutes N]`: real Envoy with four workers and all five policies under
//! mixed traffic for a long while (10 minutes by default, CI runs 1), because what a short test
//! cannot show is what accumulates: memory that creeps, a gauge that never comes back to 0, a
//! log line that only appears after the thousandth flap.
//!
//! The traffic: a flood of distinct client keys (up to 100,000) and a few hot ones through a
//! keyed and a global rate limit with a retry budget, a breaker whose upstream flaps, faults
//! (aborts and delays, `max_active`), and a degradation policy whose upstream slows down in
//! spells while its health path is probed. Every few seconds the soak samples Envoy's `/memory`
//! and seawall's gauges. At the end the upstream heals and the traffic stops; then:
//!
//! - the fault `active` gauge and the breakers' `open` and `half_open` gauges must be back at 0;
//! - Envoy's log must hold no error or critical line;
//! - memory must be flat: the slope of `allocated` over the run (after a warm-up), fitted by least
//!   squares, must be within its noise (under three standard errors) or project to less than
//!   max(2 MiB, 2%) of growth over the run.
//!
//! The report (`target/soak/report.md`, with `target/soak/memory.svg`) gives the samples, the
//! slope and the gauges, and a second slope over the last half alone: growth that is warm-up
//! slows down there, a leak does not.
//!
//! `--baseline` runs the same Envoy, config and traffic with the SDK's no-op Wasm filter in
//! seawall's place (`target/soak/baseline/`), so a slope can be told apart from Envoy's own
//! under this traffic: what seawall adds is the difference between the two.

use std::fmt::Write as _;
use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use seawall_integration::client::{load, LoadReport, LoadSpec, Request};
use seawall_integration::{Behaviour, Envoy, EnvoyConfig, Match, RouteSpec, Stats, Upstream};

use crate::{build_wasm, workspace_root};

/// The soak's plugin config: every policy, on its own route.
const PLUGIN: &str = r#"{
  "name": "soak",
  "rate_limits": {
    "per-user": {"rate": "5/s", "burst": 10, "key": [{"header": "x-user-id"}], "max_keys": 100000},
    "global": {"rate": "5000/s", "burst": 5000}
  },
  "circuit_breakers": {
    "payments": {"failure": {"statuses": ["5xx"]}, "open_when": {"consecutive_failures": 5},
                 "open_for": "1s", "max_open_for": "4s", "half_open_probes": 1}
  },
  "retries": {
    "api": {"max_retries": 2, "retry_on": ["5xx"], "budget": {"ratio": 20, "min_per_second": 10, "window": "10s"}}
  },
  "faults": {
    "chaos": {"abort": {"status": 503, "percent": 10}, "delay": {"fixed": "50ms", "percent": 20}, "max_active": 100}
  },
  "degradation": {
    "shop": {"signals": {"window": "2s", "min_requests": 5,
                         "probe": {"cluster": "soak_health", "path": "/healthz/shop", "interval": "500ms",
                                   "timeout": "250ms", "unhealthy_after": 2, "healthy_after": 2}},
             "priority": {"header": "x-priority", "default": "normal"},
             "levels": [{"name": "degraded", "enter": {"p95_latency": "100ms"}, "exit": {"p95_latency": "50ms"},
                         "min_dwell": "2s", "shed_below": "normal"}]}
  },
  "routes": [
    {"name": "api", "match": {"path": {"prefix": "/api"}}, "rate_limits": ["global", "per-user"], "retry": "api"},
    {"name": "payments", "match": {"path": {"prefix": "/payments"}}, "circuit_breaker": "payments"},
    {"name": "chaos", "match": {"path": {"prefix": "/chaos"}}, "faults": ["chaos"]},
    {"name": "shop", "match": {"path": {"prefix": "/shop"}}, "degradation": "shop"},
    {"name": "rest"}
  ]
}"#;

const WORKERS: u32 = 4;
const DISTINCT_KEYS: u64 = 100_000;

/// Which filter the soak loads into Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Seawall,
    /// The SDK's no-op Wasm filter (`bench/noop`) with the same plugin config, as a baseline.
    Noop,
}

impl Filter {
    fn describe(self) -> &'static str {
        match self {
            Filter::Seawall => "all five policies",
            Filter::Noop => "baseline: the SDK's no-op Wasm filter in seawall's place",
        }
    }
}

/// One sample of Envoy's state.
#[derive(Debug, Clone, Copy)]
struct Sample {
    seconds: f64,
    allocated: u64,
    heap: u64,
    fault_active: u64,
    breaker_open: u64,
    breaker_half_open: u64,
    level: u64,
    /// How many counters and gauges Envoy has: one created per request would show here.
    stats: usize,
    /// How many buckets Envoy's histograms hold in all. A histogram keeps a bucket for every
    /// distinct value range it has seen, so one whose values keep reaching new ranges (the
    /// lifetime of an upstream connection, say) grows Envoy's memory a little, for a long while.
    histogram_buckets: usize,
}

/// A least-squares line through the samples: bytes per second, with its standard error.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Slope {
    per_second: f64,
    standard_error: f64,
    mean: f64,
}

fn fit(points: &[(f64, f64)]) -> Option<Slope> {
    let n = points.len() as f64;
    if points.len() < 3 {
        return None;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if sxx == 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let slope = sxy / sxx;
    let residuals: f64 = points
        .iter()
        .map(|p| (p.1 - (mean_y + slope * (p.0 - mean_x))).powi(2))
        .sum();
    Some(Slope {
        per_second: slope,
        standard_error: (residuals / (n - 2.0) / sxx).sqrt(),
        mean: mean_y,
    })
}

/// Memory against time and a second series at once (least squares on both): the slope per second
/// that is left once the second series is accounted for, with its standard error, and the bytes
/// per unit of the second.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Explained {
    per_second: f64,
    standard_error: f64,
    per_unit: f64,
}

fn fit_with(points: &[(f64, f64, f64)]) -> Option<Explained> {
    let n = points.len() as f64;
    if points.len() < 4 {
        return None;
    }
    let mean = |f: fn(&(f64, f64, f64)) -> f64| points.iter().map(f).sum::<f64>() / n;
    let (mt, mu, my) = (mean(|p| p.0), mean(|p| p.1), mean(|p| p.2));
    let sum = |f: &dyn Fn(&(f64, f64, f64)) -> f64| points.iter().map(f).sum::<f64>();
    let stt = sum(&|p| (p.0 - mt).powi(2));
    let suu = sum(&|p| (p.1 - mu).powi(2));
    let stu = sum(&|p| (p.0 - mt) * (p.1 - mu));
    let sty = sum(&|p| (p.0 - mt) * (p.2 - my));
    let suy = sum(&|p| (p.1 - mu) * (p.2 - my));
    let determinant = stt * suu - stu * stu;
    if determinant.abs() < f64::EPSILON * stt * suu.max(1.0) {
        return None;
    }
    let per_second = (suu * sty - stu * suy) / determinant;
    let per_unit = (stt * suy - stu * sty) / determinant;
    let residuals = sum(&|p| (p.2 - my - per_second * (p.0 - mt) - per_unit * (p.1 - mu)).powi(2));
    Some(Explained {
        per_second,
        standard_error: (residuals / (n - 3.0) * suu / determinant).sqrt(),
        per_unit,
    })
}

/// Whether the memory slope is flat: within its noise, or too small to matter over the run.
fn flat(slope: &Slope, span_seconds: f64) -> bool {
    let growth = slope.per_second * span_seconds;
    let material = (2.0 * 1024.0 * 1024.0_f64).max(0.02 * slope.mean);
    slope.per_second <= 3.0 * slope.standard_error || growth < material
}

fn sample(envoy: &Envoy, started: Instant) -> Result<Sample, String> {
    let (_, body) = envoy
        .admin_get("/memory")
        .map_err(|error| format!("/memory: {error}"))?;
    let memory: serde_json::Value =
        serde_json::from_str(&body).map_err(|error| format!("/memory: {error}"))?;
    let number = |name: &str| {
        memory[name]
            .as_str()
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    let stats = envoy.current_stats();
    let histogram_buckets = envoy
        .admin_get("/stats?format=json&type=Histograms&histogram_buckets=detailed")
        .ok()
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
        .map_or(0, |json| count_buckets(&json));
    Ok(Sample {
        seconds: started.elapsed().as_secs_f64(),
        allocated: number("allocated"),
        heap: number("heap_size"),
        fault_active: gauge(&stats, "fault.chaos.active"),
        breaker_open: gauge(&stats, "circuit_breaker.payments.open"),
        breaker_half_open: gauge(&stats, "circuit_breaker.payments.half_open"),
        level: gauge(&stats, "degradation.shop.level"),
        stats: stats.values.len(),
        histogram_buckets,
    })
}

/// The buckets of every histogram in `/stats?format=json&histogram_buckets=detailed`, summed
/// over their cumulative (`totals`) series.
fn count_buckets(json: &serde_json::Value) -> usize {
    json["stats"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|stat| stat["histograms"]["details"].as_array())
        .flatten()
        .filter_map(|histogram| histogram["totals"].as_array())
        .map(Vec::len)
        .sum()
}

fn gauge(stats: &Stats, name: &str) -> u64 {
    stats.seawall(&format!("seawall.{name}"))
}

/// Paced load on one kind of request, for `duration`.
fn paced(
    envoy: &Envoy,
    duration: Duration,
    rate: f64,
    request: impl Fn(u64) -> Request + Send + Sync + 'static,
) -> thread::JoinHandle<LoadReport> {
    let addr = envoy.listener_addr();
    thread::spawn(move || {
        let mut spec = LoadSpec::new(2, duration, request);
        spec.rate = Some(rate);
        load(addr, spec)
    })
}

pub fn run(minutes: f64, filter: Filter) -> Result<(), String> {
    if let Err(errors) = seawall::config::compile(PLUGIN.as_bytes()) {
        return Err(format!("the soak's plugin config is refused: {errors}"));
    }
    let wasm = match filter {
        Filter::Seawall => build_wasm()?,
        Filter::Noop => crate::build_wasm_package(
            "seawall-bench-noop",
            None,
            &workspace_root().join("target/bench-build"),
        )?,
    };
    std::env::set_var("SEAWALL_WASM", &wasm);
    let duration = Duration::from_secs_f64(minutes * 60.0);
    let every = if minutes < 5.0 {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(5)
    };
    let upstream = Arc::new(Upstream::start());
    upstream.set_rule(
        Match::PathPrefix("/api".into()),
        Behaviour::ok().failing(0.05, 503),
    );
    let envoy = Envoy::start(
        EnvoyConfig::new()
            .concurrency(WORKERS)
            .cluster("soak_upstream", upstream.addr())
            .cluster("soak_health", upstream.addr())
            .route(RouteSpec::prefix("all", "/", "soak_upstream"))
            .seawall(PLUGIN)
            .wasm(wasm),
    );
    println!(
        "==> soak: {minutes} min, Envoy --concurrency {WORKERS}, {}, sampling every {}s",
        filter.describe(),
        every.as_secs()
    );

    // The weather: the payments upstream flaps every 3 s, the shop slows down for 5 s in every
    // 20, and its health path fails for 4 s in every 30.
    let stopping = Arc::new(AtomicBool::new(false));
    let weather = {
        let upstream = upstream.clone();
        let stopping = stopping.clone();
        thread::spawn(move || {
            let started = Instant::now();
            while !stopping.load(Ordering::SeqCst) {
                let second = started.elapsed().as_secs();
                let payments = if (second / 3).is_multiple_of(2) {
                    Behaviour::ok().status(503)
                } else {
                    Behaviour::ok()
                };
                upstream.set_rule(Match::PathPrefix("/payments".into()), payments);
                let shop = if second % 20 < 5 {
                    Behaviour::ok().delay(Duration::from_millis(150))
                } else {
                    Behaviour::ok()
                };
                upstream.set_rule(Match::PathPrefix("/shop".into()), shop);
                let health = if second % 30 < 4 {
                    Behaviour::ok().status(503)
                } else {
                    Behaviour::ok()
                };
                upstream.set_rule(Match::PathPrefix("/healthz".into()), health);
                thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let flood_rate = (DISTINCT_KEYS as f64 / duration.as_secs_f64()).clamp(100.0, 300.0);
    let traffic = [
        paced(&envoy, duration, flood_rate, |n| {
            Request::get("/api/items").header("x-user-id", format!("flood-{}", n % DISTINCT_KEYS))
        }),
        paced(&envoy, duration, 100.0, |n| {
            Request::get("/api/items").header("x-user-id", format!("hot-{}", n % 5))
        }),
        paced(&envoy, duration, 60.0, |_| Request::get("/payments")),
        paced(&envoy, duration, 100.0, |n| {
            Request::get("/chaos").header("x-user-id", format!("chaos-{}", n % 1000))
        }),
        paced(&envoy, duration, 60.0, |n| {
            let priority = ["low", "normal", "critical"][n as usize % 3];
            Request::get("/shop/catalog").header("x-priority", priority)
        }),
    ];
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < duration {
        thread::sleep(every);
        let sample = sample(&envoy, started)?;
        println!(
            "    {:>6.0}s  allocated {:>6.2} MiB  heap {:>6.1} MiB  stats {}  histogram buckets {}  fault active {:>3}  breaker open {} half-open {}  level {}",
            sample.seconds,
            mib(sample.allocated),
            mib(sample.heap),
            sample.stats,
            sample.histogram_buckets,
            sample.fault_active,
            sample.breaker_open,
            sample.breaker_half_open,
            sample.level
        );
        samples.push(sample);
    }
    let mut sent = 0;
    let mut statuses = std::collections::BTreeMap::new();
    let mut errors = 0;
    for handle in traffic {
        let report = handle
            .join()
            .map_err(|_| "a traffic thread panicked".to_owned())?;
        sent += report.sent();
        errors += report.errors;
        for (status, count) in report.statuses {
            *statuses.entry(status).or_insert(0) += count;
        }
    }
    stopping.store(true, Ordering::SeqCst);
    let _ = weather.join();

    // The upstream heals; requests to /payments let the breaker probe and close.
    upstream.set_rule(Match::PathPrefix("/payments".into()), Behaviour::ok());
    upstream.set_rule(Match::PathPrefix("/shop".into()), Behaviour::ok());
    upstream.set_rule(Match::PathPrefix("/healthz".into()), Behaviour::ok());
    let healing = Instant::now();
    let end = loop {
        let _ = seawall_integration::client::send_once(
            envoy.listener_addr(),
            &Request::get("/payments"),
        );
        let end = sample(&envoy, started)?;
        let settled = end.fault_active == 0 && end.breaker_open == 0 && end.breaker_half_open == 0;
        if settled || healing.elapsed() > Duration::from_secs(15) {
            break end;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let log = envoy.log();
    let error_lines: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("[error]") || line.contains("[critical]"))
        .collect();

    let warm_up = duration.as_secs_f64() / 5.0;
    let points: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.seconds >= warm_up)
        .map(|s| (s.seconds, s.allocated as f64))
        .collect();
    let span = points.last().map_or(0.0, |p| p.0) - points.first().map_or(0.0, |p| p.0);
    let slope = fit(&points);
    let half = duration.as_secs_f64() / 2.0;
    let late: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.0 >= half).collect();
    let late_slope = fit(&late);
    let with_buckets: Vec<(f64, f64, f64)> = samples
        .iter()
        .filter(|s| s.seconds >= warm_up)
        .map(|s| (s.seconds, s.histogram_buckets as f64, s.allocated as f64))
        .collect();
    let explained = fit_with(&with_buckets);
    let flat_memory = slope.as_ref().is_some_and(|slope| flat(slope, span));
    let stats = envoy.stats();

    let report = report(
        minutes,
        filter,
        &samples,
        slope.as_ref(),
        late_slope.as_ref(),
        explained.as_ref(),
        span,
        &end,
        &error_lines,
        sent,
        errors,
        &statuses,
        &stats,
    );
    let dir = match filter {
        Filter::Seawall => workspace_root().join("target/soak"),
        Filter::Noop => workspace_root().join("target/soak/baseline"),
    };
    fs::create_dir_all(&dir).map_err(|error| format!("{}: {error}", dir.display()))?;
    fs::write(dir.join("report.md"), &report).map_err(|error| error.to_string())?;
    fs::write(
        dir.join("memory.svg"),
        svg(&samples, slope.as_ref(), warm_up),
    )
    .map_err(|error| error.to_string())?;
    println!("{report}");
    println!("    report: {}", dir.join("report.md").display());

    let mut failures = Vec::new();
    if end.fault_active != 0 {
        failures.push(format!(
            "fault active gauge is {} at the end",
            end.fault_active
        ));
    }
    if end.breaker_open != 0 || end.breaker_half_open != 0 {
        failures.push(format!(
            "breaker gauges at the end: open {}, half-open {}",
            end.breaker_open, end.breaker_half_open
        ));
    }
    if !error_lines.is_empty() {
        failures.push(format!("{} error lines in Envoy's log", error_lines.len()));
    }
    if !flat_memory {
        failures.push("memory grew beyond its noise".into());
    }
    if errors > 0 {
        failures.push(format!("{errors} requests failed to get an answer"));
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("soak failed: {}", failures.join("; ")))
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[allow(clippy::too_many_arguments)]
fn report(
    minutes: f64,
    filter: Filter,
    samples: &[Sample],
    slope: Option<&Slope>,
    late_slope: Option<&Slope>,
    explained: Option<&Explained>,
    span: f64,
    end: &Sample,
    error_lines: &[&str],
    sent: u64,
    errors: u64,
    statuses: &std::collections::BTreeMap<u16, u64>,
    stats: &Stats,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Soak: {minutes} min, Envoy --concurrency {WORKERS}, {}\n",
        filter.describe()
    );
    let _ = writeln!(
        out,
        "- requests: {sent} sent, {errors} without an answer; statuses {statuses:?}"
    );
    let _ = writeln!(
        out,
        "- seawall: {} per-user limited, {} breaker trips (opened {}, reopened {}), {} fault aborts, {} delays, {} degradation escalations, {} shed, {} retries granted",
        stats.seawall("seawall.rate_limit.per-user.limited"),
        stats.seawall("seawall.circuit_breaker.payments.opened")
            + stats.seawall("seawall.circuit_breaker.payments.reopened"),
        stats.seawall("seawall.circuit_breaker.payments.opened"),
        stats.seawall("seawall.circuit_breaker.payments.reopened"),
        stats.seawall("seawall.fault.chaos.aborts"),
        stats.seawall("seawall.fault.chaos.delays"),
        stats.seawall("seawall.degradation.shop.escalated"),
        stats.seawall("seawall.degradation.shop.shed"),
        stats.seawall("seawall.retry.api.granted"),
    );
    match slope {
        Some(slope) => {
            let _ = writeln!(
                out,
                "- memory (`/memory` allocated, after the first fifth): mean {:.1} MiB, slope {:+.1} KiB/min ± {:.1} (standard error), {:+.2} MiB projected over the {:.0} s measured: {}",
                slope.mean / 1024.0 / 1024.0,
                slope.per_second * 60.0 / 1024.0,
                slope.standard_error * 60.0 / 1024.0,
                slope.per_second * span / 1024.0 / 1024.0,
                span,
                if flat(slope, span) { "flat" } else { "GROWING" }
            );
        }
        None => {
            let _ = writeln!(out, "- memory: too few samples to fit a slope");
        }
    }
    if let Some(late) = late_slope {
        let _ = writeln!(
            out,
            "- memory over the last half alone: slope {:+.1} KiB/min ± {:.1}",
            late.per_second * 60.0 / 1024.0,
            late.standard_error * 60.0 / 1024.0,
        );
    }
    if let (Some(explained), Some(first), Some(last)) = (
        explained,
        samples.iter().find(|s| s.seconds >= minutes * 12.0),
        samples.last(),
    ) {
        let _ = writeln!(
            out,
            "- Envoy's histogram buckets: {} after the first fifth, {} at the end; fitted on time and buckets at once, memory is {:+.0} bytes a bucket and {:+.1} KiB/min ± {:.1} besides",
            first.histogram_buckets,
            last.histogram_buckets,
            explained.per_unit,
            explained.per_second * 60.0 / 1024.0,
            explained.standard_error * 60.0 / 1024.0,
        );
    }
    let _ = writeln!(
        out,
        "- at the end (upstream healed): fault active {}, breaker open {}, half-open {}, degradation level {}",
        end.fault_active, end.breaker_open, end.breaker_half_open, end.level
    );
    let _ = writeln!(
        out,
        "- error or critical lines in Envoy's log: {}",
        error_lines.len()
    );
    for line in error_lines.iter().take(5) {
        let _ = writeln!(out, "    {line}");
    }
    let _ = writeln!(
        out,
        "\n| s | allocated MiB | heap MiB | stats | histogram buckets | fault active | breaker open | half-open | level |\n|---|---|---|---|---|---|---|---|---|"
    );
    for sample in samples {
        let _ = writeln!(
            out,
            "| {:.0} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} |",
            sample.seconds,
            mib(sample.allocated),
            mib(sample.heap),
            sample.stats,
            sample.histogram_buckets,
            sample.fault_active,
            sample.breaker_open,
            sample.breaker_half_open,
            sample.level
        );
    }
    out
}

/// `allocated` over time, with the fitted line over the measured part.
fn svg(samples: &[Sample], slope: Option<&Slope>, warm_up: f64) -> String {
    let (width, height, pad) = (720.0, 320.0, 50.0);
    let max_x = samples.last().map_or(1.0, |s| s.seconds).max(1.0);
    let max_y = samples
        .iter()
        .map(|s| mib(s.allocated))
        .fold(1.0_f64, f64::max)
        * 1.2;
    let x = |seconds: f64| pad + seconds / max_x * (width - 2.0 * pad);
    let y = |mebibytes: f64| height - pad - mebibytes / max_y * (height - 2.0 * pad);
    let points: Vec<String> = samples
        .iter()
        .map(|s| format!("{:.1},{:.1}", x(s.seconds), y(mib(s.allocated))))
        .collect();
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{pad}" y="20">Envoy /memory allocated (MiB) over the soak (s)</text>
<line x1="{pad}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{bottom}" stroke="black"/>
<text x="{pad}" y="{label}">0</text><text x="{right}" y="{label}" text-anchor="end">{max_x:.0} s</text>
<text x="5" y="{top}">{max_y:.0} MiB</text>
<polyline fill="none" stroke="steelblue" stroke-width="2" points="{points}"/>
"#,
        bottom = height - pad,
        right = width - pad,
        label = height - pad + 16.0,
        top = pad + 4.0,
        points = points.join(" "),
    );
    if let Some(slope) = slope {
        let mean_x = (warm_up + max_x) / 2.0;
        let at =
            |seconds: f64| (slope.mean + slope.per_second * (seconds - mean_x)) / 1024.0 / 1024.0;
        let _ = writeln!(
            out,
            r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="darkorange" stroke-dasharray="4"/>"#,
            x(warm_up),
            y(at(warm_up)),
            x(max_x),
            y(at(max_x))
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flat_series_is_flat_and_a_creeping_one_is_not() {
        let flat_points: Vec<(f64, f64)> = (0..60)
            .map(|i| (i as f64, 50e6 + if i % 2 == 0 { 1e5 } else { -1e5 }))
            .collect();
        let slope = fit(&flat_points).unwrap();
        assert!(flat(&slope, 60.0), "{slope:?}");
        // 1 MB a second for a minute: 60 MB on 80 MB, far beyond noise and 2%.
        let creeping: Vec<(f64, f64)> = (0..60)
            .map(|i| {
                (
                    i as f64,
                    50e6 + 1e6 * i as f64 + if i % 2 == 0 { 1e5 } else { -1e5 },
                )
            })
            .collect();
        let slope = fit(&creeping).unwrap();
        assert!((slope.per_second - 1e6).abs() < 1e4, "{slope:?}");
        assert!(!flat(&slope, 60.0));
    }

    #[test]
    fn memory_that_follows_a_second_series_is_told_apart_from_a_trend() {
        // 200 bytes a bucket, buckets growing like a logarithm, plus noise: no trend of its own.
        let points: Vec<(f64, f64, f64)> = (1..200)
            .map(|i| {
                let t = i as f64 * 5.0;
                let buckets = 300.0 + 40.0 * t.ln();
                let noise = if i % 2 == 0 { 3e3 } else { -3e3 };
                (t, buckets, 35e6 + 200.0 * buckets + noise)
            })
            .collect();
        let explained = fit_with(&points).unwrap();
        assert!((explained.per_unit - 200.0).abs() < 5.0, "{explained:?}");
        assert!(
            explained.per_second.abs() < 3.0 * explained.standard_error,
            "{explained:?}"
        );
        // The same with a real trend of 100 bytes a second on top: it stays.
        let trending: Vec<(f64, f64, f64)> = points
            .iter()
            .map(|&(t, b, m)| (t, b, m + 100.0 * t))
            .collect();
        let explained = fit_with(&trending).unwrap();
        assert!((explained.per_second - 100.0).abs() < 5.0, "{explained:?}");
    }

    #[test]
    fn histogram_buckets_are_counted_over_every_histogram() {
        let json: serde_json::Value = serde_json::from_str(
            r#"{"stats":[{"histograms":{"supported_percentiles":[50],"details":[
                {"name":"a","totals":[{"lower_bound":0,"width":1,"count":3},{"lower_bound":1,"width":1,"count":1}],"intervals":[]},
                {"name":"b","totals":[{"lower_bound":5,"width":1,"count":2}],"intervals":[{"lower_bound":5,"width":1,"count":2}]}]}}]}"#,
        )
        .unwrap();
        assert_eq!(count_buckets(&json), 3);
    }

    #[test]
    fn the_soak_config_compiles() {
        assert!(seawall::config::compile(PLUGIN.as_bytes()).is_ok());
    }
}
