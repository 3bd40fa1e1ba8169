//! `cargo xtask dist`: the release set, in `target/dist/`, each file with its sha256 in
//! `SHA256SUMS` (the `sha256sum -c` format), so an operator can verify what they deploy:
//!
//! - `seawall.wasm` (and `seawall.wasm.sha256`, the digest a Wasm filter's `code.remote.sha256`
//!   pins), the release build;
//! - `seawall`, the CLI for this machine's platform (release build);
//! - `seawall.schema.json`, the plugin config's JSON Schema, checked against what the CLI built
//!   here generates so a stale committed schema is never shipped;
//! - `prometheus/*.yml` (recording and alerting rules and their tests), `prometheus/*.yaml`
//!   (the stats tags Envoy needs for seawall's labels) and `grafana/*.json`;
//! - `oci/`, the Istio OCI image layouts that `cargo xtask oci` writes.
//!
//! The directory is emptied first, so it holds exactly one release.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::{build_wasm, cargo, run, workspace_root};

pub fn run_dist() -> Result<(), String> {
    let root = workspace_root();
    let dist = root.join("target/dist");
    if dist.exists() {
        fs::remove_dir_all(&dist).map_err(|e| format!("{}: {e}", dist.display()))?;
    }
    fs::create_dir_all(&dist).map_err(|e| format!("{}: {e}", dist.display()))?;

    let wasm = build_wasm()?;
    copy(&wasm, &dist.join("seawall.wasm"))?;
    let wasm_sha = sha256_file(&wasm)?;
    write(
        &dist.join("seawall.wasm.sha256"),
        format!("{wasm_sha}  seawall.wasm\n").as_bytes(),
    )?;

    run(
        "build the seawall CLI (release)",
        cargo().args(["build", "--release", "--package", "seawall-cli"]),
    )?;
    let cli = root.join("target/release/seawall");
    copy(&cli, &dist.join("seawall"))?;

    let committed = root.join("envoy/seawall.schema.json");
    let generated = Command::new(&cli)
        .arg("schema")
        .output()
        .map_err(|e| format!("{}: {e}", cli.display()))?;
    let committed_text =
        fs::read(&committed).map_err(|e| format!("{}: {e}", committed.display()))?;
    if !generated.status.success() || !same_json(&generated.stdout, &committed_text) {
        return Err(
            "envoy/seawall.schema.json is stale: cargo run -p seawall-cli -- schema > envoy/seawall.schema.json"
                .to_owned(),
        );
    }
    copy(&committed, &dist.join("seawall.schema.json"))?;

    // The rules and their tests, and the stats tags that make seawall's names labels.
    for (dir, extension) in [
        ("prometheus", "yml"),
        ("prometheus", "yaml"),
        ("grafana", "json"),
    ] {
        for file in files_with(&root.join("envoy").join(dir), extension)? {
            let name = file.file_name().map(PathBuf::from).unwrap_or_default();
            copy(&file, &dist.join(dir).join(name))?;
        }
    }

    crate::oci::run(false)?;
    copy_tree(&root.join("target/oci"), &dist.join("oci"))?;

    let mut all = Vec::new();
    list(&dist, &mut all)?;
    all.sort();
    let mut sums = String::new();
    for file in &all {
        let relative = relative_to(file, &dist);
        sums.push_str(&format!("{}  {relative}\n", sha256_file(file)?));
    }
    write(&dist.join("SHA256SUMS"), sums.as_bytes())?;

    println!("target/dist:");
    for file in all.iter().chain([dist.join("SHA256SUMS")].iter()) {
        let size = fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        println!("  {size:>10}  {}", relative_to(file, &dist));
    }
    println!("verify with: (cd target/dist && sha256sum -c SHA256SUMS)");
    Ok(())
}

fn same_json(a: &[u8], b: &[u8]) -> bool {
    match (
        serde_json::from_slice::<serde_json::Value>(a),
        serde_json::from_slice::<serde_json::Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn relative_to(path: &Path, base: &Path) -> String {
    path.strip_prefix(base)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

fn sha256_file(path: &Path) -> Result<String, String> {
    let bytes = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(bytes)))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    let mut all = Vec::new();
    list(from, &mut all)?;
    for file in all {
        copy(&file, &to.join(relative_to(&file, from)))?;
    }
    Ok(())
}

fn files_with(dir: &Path, extension: &str) -> Result<Vec<PathBuf>, String> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == extension))
        .collect();
    found.sort();
    Ok(found)
}

/// Every file under `dir`, recursively.
fn list(dir: &Path, into: &mut Vec<PathBuf>) -> Result<(), String> {
    for entry in fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.is_dir() {
            list(&path, into)?;
        } else {
            into.push(path);
        }
    }
    Ok(())
}
