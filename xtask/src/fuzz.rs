//! `cargo xtask fuzz`: builds the libFuzzer targets of `fuzz/` and runs each for a bounded time
//! on a copy of its committed seed corpus, failing on any crash, timeout or out-of-memory.
//!
//! # Why libfuzzer-sys with stable `-C` flags, and not `cargo fuzz`
//!
//! The toolchain is pinned to stable and no nightly can be installed. `cargo fuzz` defaults to
//! `-Zsanitizer=address`, a nightly-only flag, so it needs `--sanitizer none`, and even then it
//! is one more tool to install and keep in step with the pinned rustc. What it does for the build
//! is pass a handful of flags that are all stable: `-Cpasses=sancov-module` and the
//! `-Cllvm-args=-sanitizer-coverage-*` options give libFuzzer its coverage counters and
//! comparison hooks, `--cfg fuzzing` is what `libfuzzer-sys` expects, and `--target <host>` keeps
//! those flags away from build scripts (which would not link without libFuzzer). `libfuzzer-sys`
//! compiles libFuzzer itself from its bundled C++ sources with the system C++ compiler. So the
//! build is plain `cargo build` with these flags: nothing to install, no `RUSTC_BOOTSTRAP`.
//!
//! What stable cannot give is AddressSanitizer. The targets are safe Rust (the crate has no
//! `unsafe`), so what the fuzzer hunts is panics (overflow checks and debug assertions are on)
//! and the targets' own assertions, which need no sanitizer.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::{cargo, setup, workspace_root};

/// The fuzz targets, in the order they run.
pub const TARGETS: [&str; 4] = ["config_bytes", "config_json", "request", "records"];

/// How long each target runs when `--seconds` is not given.
const DEFAULT_SECONDS: u64 = 60;

/// libFuzzer's coverage instrumentation, from stable `-C` flags only (see the module doc).
const RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing \
    -Cdebug-assertions \
    -Coverflow-checks";

/// `cargo xtask fuzz [--seconds N] [TARGET...]`.
pub fn run(args: &[String]) -> Result<(), String> {
    let (seconds, targets) = parse(args)?;
    setup::ensure_program(
        "c++",
        &["--version"],
        "g++",
        "to compile libFuzzer (libfuzzer-sys builds it from source)",
    )?;
    let binaries = build()?;
    let mut reports = Vec::new();
    for target in &targets {
        reports.push(run_target(&binaries, target, seconds)?);
    }
    println!();
    println!(
        "{:<14} {:>12} {:>9} {:>7} {:>7} {:>8}  result",
        "target", "executions", "exec/s", "cov", "ft", "corpus"
    );
    for report in &reports {
        println!(
            "{:<14} {:>12} {:>9} {:>7} {:>7} {:>8}  {}",
            report.target,
            report.executions.as_deref().unwrap_or("?"),
            report.exec_per_sec.as_deref().unwrap_or("?"),
            report.cov.as_deref().unwrap_or("?"),
            report.ft.as_deref().unwrap_or("?"),
            report.corpus.as_deref().unwrap_or("?"),
            if report.failure.is_none() {
                "ok"
            } else {
                "FAILED"
            }
        );
    }
    let failures: Vec<&Report> = reports.iter().filter(|r| r.failure.is_some()).collect();
    if failures.is_empty() {
        return Ok(());
    }
    for report in &failures {
        if let Some(failure) = &report.failure {
            eprintln!("\n{}: {failure}", report.target);
        }
    }
    Err(format!(
        "{} of {} fuzz targets failed",
        failures.len(),
        reports.len()
    ))
}

fn parse(args: &[String]) -> Result<(u64, Vec<String>), String> {
    let mut seconds = DEFAULT_SECONDS;
    let mut targets = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--seconds" {
            let value = args.next().ok_or("--seconds needs a number")?;
            seconds =
                value.parse().ok().filter(|&s| s > 0).ok_or_else(|| {
                    format!("--seconds: expected a positive number, got {value:?}")
                })?;
        } else if TARGETS.contains(&arg.as_str()) {
            targets.push(arg.clone());
        } else {
            return Err(format!(
                "unknown fuzz target or option {arg:?}; targets: {}",
                TARGETS.join(", ")
            ));
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| (*t).to_owned()).collect();
    }
    Ok((seconds, targets))
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

fn target_dir() -> PathBuf {
    workspace_root().join("target/fuzz")
}

/// Builds every target; returns the directory of the binaries.
fn build() -> Result<PathBuf, String> {
    let host = host_triple()?;
    crate::run(
        "build the fuzz targets (libFuzzer, coverage instrumentation)",
        cargo()
            .current_dir(fuzz_dir())
            .env("RUSTFLAGS", RUSTFLAGS)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .args(["build", "--release", "--locked", "--bins", "--target"])
            .arg(&host)
            .arg("--target-dir")
            .arg(target_dir()),
    )?;
    Ok(target_dir().join(host).join("release"))
}

fn host_triple() -> Result<String, String> {
    let output = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned()))
        .arg("-vV")
        .current_dir(workspace_root())
        .output()
        .map_err(|error| format!("could not run rustc: {error}"))?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .map(|host| host.trim().to_owned())
        .ok_or_else(|| "rustc -vV names no host".to_owned())
}

struct Report {
    target: String,
    executions: Option<String>,
    exec_per_sec: Option<String>,
    cov: Option<String>,
    ft: Option<String>,
    corpus: Option<String>,
    failure: Option<String>,
}

/// Runs one target for `seconds` on a fresh copy of its committed corpus, so that a run never
/// grows what is committed.
fn run_target(binaries: &Path, target: &str, seconds: u64) -> Result<Report, String> {
    let binary = binaries.join(target);
    let work = target_dir().join("run").join(target);
    let corpus = work.join("corpus");
    // Outside the run directory, which each run starts afresh: a crashing input outlives the run
    // that found it, until it has become a regression test.
    let artifacts = target_dir().join("artifacts").join(target);
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&artifacts).map_err(|error| format!("{}: {error}", artifacts.display()))?;
    let before = files(&artifacts);
    copy_dir(&fuzz_dir().join("corpus").join(target), &corpus)?;
    let log = work.join("fuzz.log");
    let log_file = fs::File::create(&log).map_err(|error| format!("{}: {error}", log.display()))?;
    println!("==> fuzz {target} for {seconds}s (log: {})", log.display());
    let started = Instant::now();
    let status = Command::new(&binary)
        .arg(format!("-max_total_time={seconds}"))
        // One input taking 10 s is a hang; 2 GB of memory is a leak or a blow-up.
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&corpus)
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::null())
        .stderr(log_file)
        .current_dir(&work)
        .status()
        .map_err(|error| format!("{}: could not start: {error}", binary.display()))?;
    let text = fs::read_to_string(&log).unwrap_or_default();
    let mut report = stats(target, &text);
    let found: Vec<PathBuf> = files(&artifacts)
        .into_iter()
        .filter(|path| !before.contains(path))
        .collect();
    if !status.success() || !found.is_empty() {
        let mut failure = format!("libFuzzer exited with {status}; log: {}", log.display());
        for input in &found {
            failure.push_str(&format!(
                "\n  input: {}\n  reproduce: {} {}",
                input.display(),
                binary.display(),
                input.display()
            ));
        }
        if let Some(panic) = text.lines().find(|line| line.contains("panicked at")) {
            failure.push_str(&format!("\n  {panic}"));
            if let Some(message) = text
                .lines()
                .skip_while(|l| !l.contains("panicked at"))
                .nth(1)
            {
                failure.push_str(&format!("\n  {message}"));
            }
        }
        report.failure = Some(failure);
    }
    println!(
        "<== fuzz {target}: {} executions ({} exec/s), cov {} ft {}, corpus {} in {:.1}s",
        report.executions.as_deref().unwrap_or("?"),
        report.exec_per_sec.as_deref().unwrap_or("?"),
        report.cov.as_deref().unwrap_or("?"),
        report.ft.as_deref().unwrap_or("?"),
        report.corpus.as_deref().unwrap_or("?"),
        started.elapsed().as_secs_f64()
    );
    Ok(report)
}

/// libFuzzer's final figures: `stat::` lines, and `cov:`, `ft:` and `corp:` from its last
/// status line.
fn stats(target: &str, log: &str) -> Report {
    let stat = |name: &str| {
        log.lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.trim().to_owned())
    };
    let last_status = log.lines().rev().find(|line| line.contains(" cov: "));
    let field = |name: &str| {
        last_status.and_then(|line| {
            let mut words = line.split_whitespace();
            words.find(|word| *word == name)?;
            words.next().map(str::to_owned)
        })
    };
    Report {
        target: target.to_owned(),
        executions: stat("stat::number_of_executed_units:"),
        exec_per_sec: stat("stat::average_exec_per_sec:"),
        cov: field("cov:"),
        ft: field("ft:"),
        corpus: field("corp:"),
        failure: None,
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default()
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), String> {
    fs::create_dir_all(to).map_err(|error| format!("{}: {error}", to.display()))?;
    let entries = fs::read_dir(from).map_err(|error| format!("{}: {error}", from.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_file() {
            fs::copy(&path, to.join(entry.file_name()))
                .map_err(|error| format!("{}: {error}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_stats_are_read_from_the_log() {
        let log = "#2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 27Mb\n\
                   #4096\tpulse  cov: 404 ft: 690 corp: 34/5133b lim: 43 exec/s: 2048 rss: 30Mb\n\
                   Done 4096 runs in 2 second(s)\n\
                   stat::number_of_executed_units: 4096\n\
                   stat::average_exec_per_sec:     2048\n";
        let report = stats("records", log);
        assert_eq!(report.executions.as_deref(), Some("4096"));
        assert_eq!(report.exec_per_sec.as_deref(), Some("2048"));
        assert_eq!(report.cov.as_deref(), Some("404"));
        assert_eq!(report.ft.as_deref(), Some("690"));
        assert_eq!(report.corpus.as_deref(), Some("34/5133b"));
    }

    #[test]
    fn arguments_name_targets_and_seconds() {
        let args = |list: &[&str]| list.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            parse(&args(&[])).unwrap(),
            (60, TARGETS.map(String::from).to_vec())
        );
        assert_eq!(
            parse(&args(&["--seconds", "5", "records"])).unwrap(),
            (5, vec!["records".to_owned()])
        );
        assert!(parse(&args(&["nope"])).is_err());
        assert!(parse(&args(&["--seconds", "0"])).is_err());
    }
}
