//! `cargo xtask oci`: seawall.wasm as OCI images that an Istio `WasmPlugin` (`url: oci://…`) can
//! pull, written as OCI image layouts under `target/oci/` so that `skopeo copy` publishes them to
//! any registry with no Docker daemon and no registry login at build time.
//!
//! Istio's agent fetches the module itself, and its fetcher (`pkg/wasm/imagefetcher.go`) reads
//! only two shapes, so both are written:
//! - `seawall-wasm`, the Wasm artifact (the "oci" variant of the solo.io Wasm image spec): the
//!   module as a raw `application/vnd.module.wasm.content.layer.v1+wasm` layer. Istio insists on
//!   exactly two layers there, so the spec's runtime-config layer goes with it.
//! - `seawall-compat`, an ordinary image whose one tar.gz layer holds `plugin.wasm`, for registries
//!   that refuse custom media types; Docker can load it too.
//!
//! The bytes depend on seawall.wasm and the version alone (no dates, fixed tar metadata, gzip
//! without a timestamp). A rebuild of the same module then gives the same manifest digest, which
//! is what a WasmPlugin's `sha256` pins for an `oci://` url (Istio's `pkg/wasm/cache.go` compares
//! it with the manifest digest, not with the module's own sha256).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::read::GzDecoder;
use flate2::{Compression, GzBuilder};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::{build_wasm, cargo, workspace_root};

const OCI_LAYOUT_VERSION: &str = "1.0.0";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_IMAGE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LAYER_TAR_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const WASM_CONFIG: &str = "application/vnd.wasm.config.v1+json";
const WASM_RUNTIME_CONFIG_LAYER: &str = "application/vnd.module.wasm.config.v1+json";
const WASM_CONTENT_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";

const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";
const ANNOTATION_VERSION: &str = "org.opencontainers.image.version";
/// What `skopeo`'s `oci:<layout>:<tag>` looks a tag up by in index.json.
const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The solo.io compat spec asks for it on an OCI-layer compat image; Istio itself ignores it.
const ANNOTATION_WASM_VARIANT: &str = "module.wasm.image/variant";

/// The one file name Istio looks for in a compat layer (`extractWasmPluginBinary`).
const PLUGIN_FILE: &str = "plugin.wasm";
const RUNTIME_CONFIG_FILE: &str = "runtime-config.json";
const WASM_MAGIC: &[u8] = b"\0asm";
/// Istio reads at most this much of a module and cuts the rest (`ISTIO_WASM_MAX_BINARY_SIZE_BYTES`,
/// default in `pilot/pkg/features/pilot.go`).
const ISTIO_MAX_WASM_BYTES: usize = 256 * 1024 * 1024;

/// The registry the printed publish lines name; operators put their own.
const EXAMPLE_REGISTRY: &str = "registry.example.com";
/// The image name `--check` loads into Docker and removes again.
const DOCKER_TEST_IMAGE: &str = "seawall-compat-test";

/// The two shapes Istio accepts (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageForm {
    WasmArtifact,
    Compat,
}

impl ImageForm {
    pub const ALL: [ImageForm; 2] = [ImageForm::WasmArtifact, ImageForm::Compat];

    pub fn layout_name(self) -> &'static str {
        match self {
            ImageForm::WasmArtifact => "seawall-wasm",
            ImageForm::Compat => "seawall-compat",
        }
    }

    fn description(self) -> &'static str {
        match self {
            ImageForm::WasmArtifact => "Wasm artifact",
            ImageForm::Compat => "compat: one tar.gz layer holding plugin.wasm",
        }
    }

    /// Where an operator would push it: both forms can live in one repository only under
    /// different tags.
    fn example_destination(self, tag: &str) -> String {
        match self {
            ImageForm::WasmArtifact => format!("{EXAMPLE_REGISTRY}/seawall:{tag}"),
            ImageForm::Compat => format!("{EXAMPLE_REGISTRY}/seawall:{tag}-compat"),
        }
    }
}

/// One content-addressed blob and how a descriptor names it.
struct Blob {
    media_type: &'static str,
    bytes: Vec<u8>,
    annotations: Vec<(&'static str, String)>,
}

impl Blob {
    fn new(media_type: &'static str, bytes: Vec<u8>) -> Blob {
        Blob {
            media_type,
            bytes,
            annotations: Vec::new(),
        }
    }

    fn titled(mut self, title: &str) -> Blob {
        self.annotations.push((ANNOTATION_TITLE, title.to_owned()));
        self
    }

    fn digest(&self) -> String {
        sha256_digest(&self.bytes)
    }

    fn descriptor(&self) -> Value {
        let mut descriptor = json!({
            "mediaType": self.media_type,
            "digest": self.digest(),
            "size": self.bytes.len(),
        });
        if !self.annotations.is_empty() {
            descriptor["annotations"] = annotations(&self.annotations);
        }
        descriptor
    }
}

fn annotations(pairs: &[(&'static str, String)]) -> Value {
    let map: Map<String, Value> = pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), Value::from(value.as_str())))
        .collect();
    Value::Object(map)
}

/// What was written, for the report and the checks.
#[derive(Debug, Clone)]
pub struct WrittenImage {
    pub form: ImageForm,
    pub layout: PathBuf,
    pub tag: String,
    pub manifest_digest: String,
    /// The layer that carries the module: the raw wasm, or the tar.gz holding plugin.wasm.
    pub wasm_layer_digest: String,
    pub wasm_sha256: String,
}

pub fn run(check: bool) -> Result<(), String> {
    let wasm_path = build_wasm()?;
    let wasm = fs::read(&wasm_path).map_err(|error| format!("{}: {error}", wasm_path.display()))?;
    let tag = seawall_version()?;
    let root = workspace_root();
    let mut written = Vec::new();
    for form in ImageForm::ALL {
        let layout = root.join("target/oci").join(form.layout_name());
        let image = write_image(form, &wasm, &layout, &tag)?;
        print_image(&image);
        written.push(image);
    }
    if check {
        for image in &written {
            let (variant, module) = istio_extract_wasm(&image.layout, &image.tag)?;
            if module != wasm {
                return Err(format!(
                    "{}: Istio's reading ({variant:?}) gives {} bytes that are not seawall.wasm",
                    image.layout.display(),
                    module.len()
                ));
            }
            println!(
                "    {}: Istio's fetcher logic takes it as {variant:?}",
                relative(&image.layout)
            );
            check_with_real_tools(image)?;
        }
        println!("oci: both layouts pass the Istio and skopeo/Docker checks");
    }
    Ok(())
}

fn print_image(image: &WrittenImage) {
    let layout = relative(&image.layout);
    println!("{layout} ({}), tag {}", image.form.description(), image.tag);
    println!("    manifest      {}", image.manifest_digest);
    println!("    wasm layer    {}", image.wasm_layer_digest);
    println!("    seawall.wasm  sha256:{}", image.wasm_sha256);
    println!(
        "    publish       skopeo copy oci:{layout}:{} docker://{}",
        image.tag,
        image.form.example_destination(&image.tag)
    );
    println!(
        "    WasmPlugin    url: oci://{}  sha256: {}",
        image.form.example_destination(&image.tag),
        image.manifest_digest.trim_start_matches("sha256:")
    );
}

fn relative(path: &Path) -> String {
    path.strip_prefix(workspace_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The seawall package's version, as Cargo resolves it (the root manifest may inherit fields
/// from the workspace, so it is not read by hand).
fn seawall_version() -> Result<String, String> {
    let output = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .map_err(|error| format!("cargo metadata: could not start: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let metadata: Value = serde_json::from_slice(&output.stdout)
        .map_err(|error| format!("cargo metadata: unreadable output: {error}"))?;
    metadata["packages"]
        .as_array()
        .and_then(|packages| packages.iter().find(|package| package["name"] == "seawall"))
        .and_then(|package| package["version"].as_str())
        .map(str::to_owned)
        .ok_or_else(|| "cargo metadata lists no seawall package with a version".to_owned())
}

/// Writes one form of the image as an OCI image layout at `layout`, replacing what was there.
pub fn write_image(
    form: ImageForm,
    wasm: &[u8],
    layout: &Path,
    tag: &str,
) -> Result<WrittenImage, String> {
    let (config, layers, wasm_layer, manifest_annotations) = match form {
        ImageForm::WasmArtifact => {
            let runtime_config = Blob::new(WASM_RUNTIME_CONFIG_LAYER, runtime_config(wasm)?)
                .titled(RUNTIME_CONFIG_FILE);
            let module = Blob::new(WASM_CONTENT_LAYER, wasm.to_vec()).titled(PLUGIN_FILE);
            // Istio reads neither the config nor the runtime-config layer; the config stays
            // the empty object rather than a copy of the layer.
            let config = Blob::new(WASM_CONFIG, b"{}".to_vec());
            (config, vec![runtime_config, module], 1, Vec::new())
        }
        ImageForm::Compat => {
            let tar = plugin_tar(wasm)?;
            let diff_id = sha256_digest(&tar);
            let layer = Blob::new(OCI_LAYER_TAR_GZIP, gzip(&tar)?);
            let config = Blob::new(OCI_IMAGE_CONFIG, compat_image_config(&diff_id)?);
            let annotations = vec![(ANNOTATION_WASM_VARIANT, "compat".to_owned())];
            (config, vec![layer], 0, annotations)
        }
    };
    let mut manifest_annotations = manifest_annotations;
    manifest_annotations.push((ANNOTATION_TITLE, "seawall".to_owned()));
    manifest_annotations.push((ANNOTATION_VERSION, tag.to_owned()));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        "annotations": annotations(&manifest_annotations),
    });
    let manifest = Blob::new(OCI_MANIFEST, to_json(&manifest)?);
    let mut index_entry = manifest.descriptor();
    index_entry["annotations"] = json!({ ANNOTATION_REF_NAME: tag });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [index_entry],
    });

    if layout.exists() {
        // Blobs of an older module would otherwise stay behind, unreferenced.
        fs::remove_dir_all(layout).map_err(|error| format!("{}: {error}", layout.display()))?;
    }
    let blob_dir = layout.join("blobs/sha256");
    fs::create_dir_all(&blob_dir).map_err(|error| format!("{}: {error}", blob_dir.display()))?;
    for blob in layers.iter().chain([&config, &manifest]) {
        write_file(&blob_dir.join(hex_of(&blob.digest())), &blob.bytes)?;
    }
    write_file(
        &layout.join("oci-layout"),
        &to_json(&json!({ "imageLayoutVersion": OCI_LAYOUT_VERSION }))?,
    )?;
    write_file(&layout.join("index.json"), &to_json(&index)?)?;

    Ok(WrittenImage {
        form,
        layout: layout.to_path_buf(),
        tag: tag.to_owned(),
        manifest_digest: manifest.digest(),
        wasm_layer_digest: layers[wasm_layer].digest(),
        wasm_sha256: sha256_hex(wasm),
    })
}

/// The solo.io spec's runtime config for an Envoy filter: the proxy-wasm ABI the module exports.
fn runtime_config(wasm: &[u8]) -> Result<Vec<u8>, String> {
    let abi_versions: Vec<String> = proxy_abi_version(wasm).into_iter().collect();
    to_json(&json!({ "type": "envoy_proxy", "abiVersions": abi_versions }))
}

/// The `proxy_abi_version_*` export the SDK adds, found by name in the module's bytes.
fn proxy_abi_version(wasm: &[u8]) -> Option<String> {
    const PREFIX: &[u8] = b"proxy_abi_version_";
    let start = wasm
        .windows(PREFIX.len())
        .position(|window| window == PREFIX)?;
    let name: Vec<u8> = wasm[start..]
        .iter()
        .copied()
        .take_while(|byte| byte.is_ascii_alphanumeric() || *byte == b'_')
        .collect();
    String::from_utf8(name).ok()
}

/// A Docker-loadable image config: `docker load` refuses an OS other than its own, and the
/// architecture is what `FROM scratch` gives on amd64; nothing ever executes this image.
fn compat_image_config(diff_id: &str) -> Result<Vec<u8>, String> {
    to_json(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
    }))
}

/// A tar with the single entry `plugin.wasm`, with fixed metadata so the bytes depend on the
/// module alone.
fn plugin_tar(wasm: &[u8]) -> Result<Vec<u8>, String> {
    let mut header = tar::Header::new_ustar();
    header
        .set_path(PLUGIN_FILE)
        .map_err(|error| format!("tar header for {PLUGIN_FILE}: {error}"))?;
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(wasm.len() as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append(&header, wasm)
        .map_err(|error| format!("tar of {PLUGIN_FILE}: {error}"))?;
    builder
        .into_inner()
        .map_err(|error| format!("tar of {PLUGIN_FILE}: {error}"))
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Write;
    // mtime 0 means "no timestamp" in the gzip header; the rest of the header is fixed.
    let mut encoder = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    encoder
        .write_all(bytes)
        .map_err(|error| format!("gzip of the compat layer: {error}"))?;
    encoder
        .finish()
        .map_err(|error| format!("gzip of the compat layer: {error}"))
}

fn to_json(value: &Value) -> Result<Vec<u8>, String> {
    serde_json::to_vec(value).map_err(|error| format!("JSON encoding: {error}"))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    fs::write(path, bytes).map_err(|error| format!("{}: {error}", path.display()))
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

fn hex_of(digest: &str) -> &str {
    digest.trim_start_matches("sha256:")
}

/// Which of Istio's readers took an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IstioVariant {
    /// `extractDockerImage`: a Docker schema 2 manifest, last layer a Docker tar.gz.
    DockerCompat,
    /// `extractOCIStandardImage`: last layer an OCI tar+gzip holding plugin.wasm.
    OciCompat,
    /// `extractOCIArtifactImage`: exactly two layers, one of them the raw Wasm layer.
    OciArtifact,
}

/// Istio's acceptance of a pulled image, redone on an OCI layout, as read in istio/istio
/// `pkg/wasm/imagefetcher.go` (`ImageFetcher.PrepareFetch` and the `binaryFetcher` it returns:
/// `extractDockerImage`, `extractOCIStandardImage`, `extractWasmPluginBinary`,
/// `extractOCIArtifactImage`) and `pkg/wasm/cache.go` (`LocalFileCache.getOrFetch`, which then
/// requires `isValidWasmBinary`). go-containerregistry, which Istio pulls with, verifies each
/// blob against its digest; so does this.
pub fn istio_extract_wasm(layout: &Path, tag: &str) -> Result<(IstioVariant, Vec<u8>), String> {
    let index_path = layout.join("index.json");
    let index = read_json(&index_path)?;
    let descriptor = index["manifests"]
        .as_array()
        .and_then(|manifests| {
            manifests
                .iter()
                .find(|entry| entry["annotations"][ANNOTATION_REF_NAME] == tag)
        })
        .ok_or_else(|| format!("{}: no manifest tagged {tag}", index_path.display()))?;
    let manifest_bytes = read_blob(layout, descriptor)?;
    let manifest: Value = serde_json::from_slice(&manifest_bytes)
        .map_err(|error| format!("{}: manifest: {error}", layout.display()))?;
    let layers = manifest["layers"]
        .as_array()
        .ok_or_else(|| format!("{}: manifest has no layers list", layout.display()))?;

    let (variant, module) = if manifest["mediaType"] == DOCKER_MANIFEST {
        let module = istio_compat_layer(layout, layers, DOCKER_LAYER_TAR_GZIP)?;
        (IstioVariant::DockerCompat, module)
    } else {
        match istio_compat_layer(layout, layers, OCI_LAYER_TAR_GZIP) {
            Ok(module) => (IstioVariant::OciCompat, module),
            Err(compat_error) => match istio_artifact_layer(layout, layers) {
                Ok(module) => (IstioVariant::OciArtifact, module),
                Err(artifact_error) => {
                    return Err(format!(
                        "{}: Istio would reject it: as compat: {compat_error}; as oci: {artifact_error}",
                        layout.display()
                    ))
                }
            },
        }
    };
    if module.len() > ISTIO_MAX_WASM_BYTES {
        return Err(format!(
            "{}: the module has {} bytes; Istio reads only the first {ISTIO_MAX_WASM_BYTES} unless \
             ISTIO_WASM_MAX_BINARY_SIZE_BYTES is raised",
            layout.display(),
            module.len()
        ));
    }
    if module.len() < 8 || !module.starts_with(WASM_MAGIC) {
        return Err(format!(
            "{}: the extracted module is not a Wasm binary (Istio's isValidWasmBinary)",
            layout.display()
        ));
    }
    Ok((variant, module))
}

/// `extractDockerImage` / `extractOCIStandardImage`: the last layer, of the one accepted media
/// type, gunzipped; then `extractWasmPluginBinary`: the first entry whose base name is plugin.wasm.
fn istio_compat_layer(
    layout: &Path,
    layers: &[Value],
    media_type: &str,
) -> Result<Vec<u8>, String> {
    let last = layers
        .last()
        .ok_or("number of layers must be greater than zero")?;
    if last["mediaType"] != media_type {
        return Err(format!(
            "invalid media type {} (expect {media_type})",
            last["mediaType"]
        ));
    }
    let layer = read_blob(layout, last)?;
    let mut archive = tar::Archive::new(GzDecoder::new(layer.as_slice()));
    let entries = archive
        .entries()
        .map_err(|error| format!("failed to parse layer as tar.gz: {error}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|error| format!("layer tar: {error}"))?;
        let path = entry
            .path()
            .map_err(|error| format!("layer tar entry name: {error}"))?
            .into_owned();
        if path.file_name().is_some_and(|name| name == PLUGIN_FILE) {
            let mut module = Vec::new();
            entry
                .read_to_end(&mut module)
                .map_err(|error| format!("failed to read {PLUGIN_FILE}: {error}"))?;
            return Ok(module);
        }
    }
    Err(format!("{PLUGIN_FILE} not found in the archive"))
}

/// `extractOCIArtifactImage`: exactly two layers; the first raw Wasm layer, read as is.
fn istio_artifact_layer(layout: &Path, layers: &[Value]) -> Result<Vec<u8>, String> {
    if layers.len() != 2 {
        return Err(format!(
            "number of layers must be 2 but got {}",
            layers.len()
        ));
    }
    let layer = layers
        .iter()
        .find(|layer| layer["mediaType"] == WASM_CONTENT_LAYER)
        .ok_or_else(|| format!("could not find the layer of type {WASM_CONTENT_LAYER}"))?;
    read_blob(layout, layer)
}

fn read_json(path: &Path) -> Result<Value, String> {
    let bytes = fs::read(path).map_err(|error| format!("{}: {error}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|error| format!("{}: {error}", path.display()))
}

/// A blob a descriptor names, checked against the descriptor's digest and size.
fn read_blob(layout: &Path, descriptor: &Value) -> Result<Vec<u8>, String> {
    let digest = descriptor["digest"]
        .as_str()
        .ok_or_else(|| format!("{}: a descriptor without a digest", layout.display()))?;
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("{}: digest {digest} is not sha256", layout.display()))?;
    let path = layout.join("blobs/sha256").join(hex);
    let bytes = fs::read(&path).map_err(|error| format!("{}: {error}", path.display()))?;
    if sha256_hex(&bytes) != hex {
        return Err(format!(
            "{}: content does not match its digest",
            path.display()
        ));
    }
    if descriptor["size"].as_u64() != Some(bytes.len() as u64) {
        return Err(format!(
            "{}: {} bytes, but the descriptor says {}",
            path.display(),
            bytes.len(),
            descriptor["size"]
        ));
    }
    Ok(bytes)
}

/// The layout as real tools see it: skopeo reads back the same manifest and layer bytes, and the
/// compat form loads into the Docker engine as a one-layer image (removed again afterwards).
pub fn check_with_real_tools(image: &WrittenImage) -> Result<(), String> {
    require_tool("skopeo", &["--version"], "skopeo")?;
    let reference = format!("oci:{}:{}", image.layout.display(), image.tag);

    let raw_manifest = run_tool(Command::new("skopeo").args(["inspect", "--raw", &reference]))?;
    if sha256_digest(&raw_manifest) != image.manifest_digest {
        return Err(format!(
            "skopeo inspect --raw {reference}: the manifest it reads has digest {}, not {}",
            sha256_digest(&raw_manifest),
            image.manifest_digest
        ));
    }

    let copy_dir = scratch_dir(image.form.layout_name())?;
    let copied = check_skopeo_dir_copy(image, &reference, &copy_dir);
    let cleanup =
        fs::remove_dir_all(&copy_dir).map_err(|error| format!("{}: {error}", copy_dir.display()));
    copied?;
    cleanup?;
    println!("    {reference}: skopeo inspect --raw and copy to dir: give the same bytes");

    if image.form == ImageForm::Compat {
        check_docker_load(image, &reference)?;
    }
    Ok(())
}

fn check_skopeo_dir_copy(
    image: &WrittenImage,
    reference: &str,
    copy_dir: &Path,
) -> Result<(), String> {
    run_tool(
        Command::new("skopeo")
            .args(["copy", "--quiet", reference])
            .arg(format!("dir:{}", copy_dir.display())),
    )?;
    let ours = image
        .layout
        .join("blobs/sha256")
        .join(hex_of(&image.wasm_layer_digest));
    let theirs = copy_dir.join(hex_of(&image.wasm_layer_digest));
    let ours = fs::read(&ours).map_err(|error| format!("{}: {error}", ours.display()))?;
    let theirs = fs::read(&theirs).map_err(|error| {
        format!(
            "skopeo copy {reference} dir:{}: the wasm layer is missing: {}: {error}",
            copy_dir.display(),
            theirs.display()
        )
    })?;
    if ours != theirs {
        return Err(format!(
            "skopeo copy {reference} dir:{}: the wasm layer came back different",
            copy_dir.display()
        ));
    }
    let manifest_path = copy_dir.join("manifest.json");
    let manifest = fs::read(&manifest_path)
        .map_err(|error| format!("{}: {error}", manifest_path.display()))?;
    if sha256_digest(&manifest) != image.manifest_digest {
        return Err(format!(
            "{}: skopeo rewrote the manifest (digest {}, not {})",
            manifest_path.display(),
            sha256_digest(&manifest),
            image.manifest_digest
        ));
    }
    Ok(())
}

fn check_docker_load(image: &WrittenImage, reference: &str) -> Result<(), String> {
    require_tool("docker", &["version"], "docker.io")?;
    let docker_name = format!("{DOCKER_TEST_IMAGE}:{}", image.tag);
    run_tool(Command::new("skopeo").args([
        "copy",
        "--quiet",
        reference,
        &format!("docker-daemon:{docker_name}"),
    ]))?;
    let inspected = run_tool(Command::new("docker").args([
        "image",
        "inspect",
        "--format",
        "{{len .RootFS.Layers}}",
        &docker_name,
    ]));
    let removed = run_tool(Command::new("docker").args(["image", "rm", &docker_name]));
    let layers = inspected?;
    removed?;
    let layers = String::from_utf8_lossy(&layers).trim().to_owned();
    if layers != "1" {
        return Err(format!(
            "docker image inspect {docker_name}: {layers} layers, expected 1"
        ));
    }
    println!("    {reference}: loads into Docker as {docker_name} with one layer (removed again)");
    Ok(())
}

fn require_tool(program: &str, args: &[&str], package: &str) -> Result<(), String> {
    let answers = Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|output| output.status.success());
    if answers {
        Ok(())
    } else {
        Err(format!(
            "{program} is needed to check the OCI images: install it (Debian: apt-get install {package}){}",
            if program == "docker" {
                ", and have a Docker engine answering"
            } else {
                ""
            }
        ))
    }
}

/// Runs a tool to completion and returns its stdout, or says what failed with its stderr.
fn run_tool(command: &mut Command) -> Result<Vec<u8>, String> {
    let shown = format!("{command:?}").replace('"', "");
    let output = command
        .output()
        .map_err(|error| format!("{shown}: could not start: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "{shown} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(output.stdout)
}

/// A fresh directory under the system's temp dir, unique to this process and call.
fn scratch_dir(label: &str) -> Result<PathBuf, String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "seawall-oci-{label}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(|error| format!("{}: {error}", dir.display()))?;
    }
    // skopeo's dir: transport creates the directory itself when its parent exists.
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const TAG: &str = "0.1.0";

    /// A module header, an ABI export name where the SDK would put it, and some body bytes.
    fn fake_wasm(body: &[u8]) -> Vec<u8> {
        let mut wasm = b"\0asm\x01\0\0\0".to_vec();
        wasm.extend_from_slice(b"\x07\x19\x01\x17proxy_abi_version_0_2_1\0\0");
        wasm.extend_from_slice(body);
        wasm
    }

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(label: &str) -> Scratch {
            let dir = scratch_dir(label).unwrap();
            fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn written(form: ImageForm, wasm: &[u8], scratch: &Scratch) -> WrittenImage {
        write_image(form, wasm, &scratch.0.join(form.layout_name()), TAG).unwrap()
    }

    fn json_file(path: &Path) -> Value {
        read_json(path).unwrap()
    }

    fn manifest_of(layout: &Path) -> Value {
        let index = json_file(&layout.join("index.json"));
        serde_json::from_slice(&read_blob(layout, &index["manifests"][0]).unwrap()).unwrap()
    }

    /// Every file under `dir`, by path relative to it.
    fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut found = BTreeMap::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(current) = pending.pop() {
            for entry in fs::read_dir(&current).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    pending.push(path);
                } else {
                    let bytes = fs::read(&path).unwrap();
                    found.insert(path.strip_prefix(dir).unwrap().to_path_buf(), bytes);
                }
            }
        }
        found
    }

    fn blob_path(layout: &Path, digest: &str) -> PathBuf {
        layout.join("blobs/sha256").join(hex_of(digest))
    }

    #[test]
    fn a_layout_is_oci_layout_index_and_exactly_the_referenced_blobs() {
        let scratch = Scratch::new("structure");
        let wasm = fake_wasm(b"structure");
        for form in ImageForm::ALL {
            let image = written(form, &wasm, &scratch);
            let layout = &image.layout;
            assert_eq!(
                json_file(&layout.join("oci-layout")),
                json!({"imageLayoutVersion": "1.0.0"})
            );
            let index = json_file(&layout.join("index.json"));
            assert_eq!(index["schemaVersion"], 2);
            assert_eq!(index["mediaType"], OCI_INDEX);
            let manifests = index["manifests"].as_array().unwrap();
            assert_eq!(manifests.len(), 1, "{form:?}: one image per layout");
            assert_eq!(manifests[0]["mediaType"], OCI_MANIFEST);
            assert_eq!(manifests[0]["digest"], image.manifest_digest.as_str());
            assert_eq!(manifests[0]["annotations"][ANNOTATION_REF_NAME], TAG);

            let manifest = manifest_of(layout);
            let mut referenced: Vec<String> = vec![image.manifest_digest.clone()];
            referenced.push(manifest["config"]["digest"].as_str().unwrap().to_owned());
            for layer in manifest["layers"].as_array().unwrap() {
                referenced.push(layer["digest"].as_str().unwrap().to_owned());
            }
            referenced.sort();
            let mut on_disk: Vec<String> = fs::read_dir(layout.join("blobs/sha256"))
                .unwrap()
                .map(|entry| format!("sha256:{}", entry.unwrap().file_name().to_string_lossy()))
                .collect();
            on_disk.sort();
            assert_eq!(on_disk, referenced, "{form:?}: blobs on disk");
            let mut top: Vec<String> = fs::read_dir(layout)
                .unwrap()
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            top.sort();
            assert_eq!(top, ["blobs", "index.json", "oci-layout"]);
        }
    }

    #[test]
    fn every_descriptor_matches_its_blob_digest_and_size() {
        let scratch = Scratch::new("digests");
        let wasm = fake_wasm(b"digests");
        for form in ImageForm::ALL {
            let image = written(form, &wasm, &scratch);
            let layout = &image.layout;
            let index = json_file(&layout.join("index.json"));
            let manifest = manifest_of(layout);
            let mut descriptors = vec![index["manifests"][0].clone(), manifest["config"].clone()];
            descriptors.extend(manifest["layers"].as_array().unwrap().iter().cloned());
            for descriptor in descriptors {
                let digest = descriptor["digest"].as_str().unwrap();
                let bytes = fs::read(blob_path(layout, digest)).unwrap();
                assert_eq!(sha256_digest(&bytes), digest, "{form:?}");
                assert_eq!(descriptor["size"].as_u64(), Some(bytes.len() as u64));
            }
            assert_eq!(image.wasm_sha256, sha256_hex(&wasm));
        }
    }

    #[test]
    fn the_wasm_artifact_carries_the_module_raw_in_its_one_wasm_layer() {
        let scratch = Scratch::new("artifact");
        let wasm = fake_wasm(b"artifact");
        let image = written(ImageForm::WasmArtifact, &wasm, &scratch);
        let manifest = manifest_of(&image.layout);
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(manifest["mediaType"], OCI_MANIFEST);
        assert_eq!(manifest["config"]["mediaType"], WASM_CONFIG);
        let layers = manifest["layers"].as_array().unwrap();
        // Istio's extractOCIArtifactImage takes two layers and no other count.
        assert_eq!(layers.len(), 2);
        let wasm_layers: Vec<&Value> = layers
            .iter()
            .filter(|layer| layer["mediaType"] == WASM_CONTENT_LAYER)
            .collect();
        assert_eq!(wasm_layers.len(), 1);
        let wasm_layer = wasm_layers[0];
        assert_eq!(wasm_layer["annotations"][ANNOTATION_TITLE], PLUGIN_FILE);
        assert_eq!(wasm_layer["digest"], image.wasm_layer_digest.as_str());
        assert_eq!(image.wasm_layer_digest, sha256_digest(&wasm));
        assert_eq!(
            fs::read(blob_path(&image.layout, &image.wasm_layer_digest)).unwrap(),
            wasm
        );

        let runtime_layer = layers
            .iter()
            .find(|layer| layer["mediaType"] == WASM_RUNTIME_CONFIG_LAYER)
            .unwrap();
        assert_eq!(
            runtime_layer["annotations"][ANNOTATION_TITLE],
            RUNTIME_CONFIG_FILE
        );
        let runtime_config: Value = serde_json::from_slice(
            &fs::read(blob_path(
                &image.layout,
                runtime_layer["digest"].as_str().unwrap(),
            ))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            runtime_config,
            json!({"type": "envoy_proxy", "abiVersions": ["proxy_abi_version_0_2_1"]})
        );
    }

    #[test]
    fn the_compat_image_has_one_gzipped_tar_layer_holding_only_plugin_wasm() {
        let scratch = Scratch::new("compat");
        let wasm = fake_wasm(b"compat");
        let image = written(ImageForm::Compat, &wasm, &scratch);
        let manifest = manifest_of(&image.layout);
        assert_eq!(manifest["mediaType"], OCI_MANIFEST);
        assert_eq!(manifest["config"]["mediaType"], OCI_IMAGE_CONFIG);
        assert_eq!(manifest["annotations"][ANNOTATION_WASM_VARIANT], "compat");
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0]["mediaType"], OCI_LAYER_TAR_GZIP);
        assert_eq!(layers[0]["digest"], image.wasm_layer_digest.as_str());

        let gzipped = fs::read(blob_path(&image.layout, &image.wasm_layer_digest)).unwrap();
        assert_eq!(&gzipped[..2], b"\x1f\x8b", "a gzip stream");
        assert_eq!(
            &gzipped[4..8],
            b"\0\0\0\0",
            "gzip header without a timestamp"
        );
        let mut tar_bytes = Vec::new();
        GzDecoder::new(gzipped.as_slice())
            .read_to_end(&mut tar_bytes)
            .unwrap();
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        let mut entries = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let header = entry.header().clone();
            let mut content = Vec::new();
            entry.read_to_end(&mut content).unwrap();
            entries.push((entry.path().unwrap().into_owned(), header, content));
        }
        assert_eq!(entries.len(), 1, "exactly one entry");
        let (path, header, content) = &entries[0];
        assert_eq!(path, Path::new(PLUGIN_FILE));
        assert_eq!(content, &wasm);
        assert_eq!(header.entry_type(), tar::EntryType::Regular);
        assert_eq!(header.mode().unwrap(), 0o644);
        assert_eq!(header.mtime().unwrap(), 0);
        assert_eq!((header.uid().unwrap(), header.gid().unwrap()), (0, 0));

        let config: Value = serde_json::from_slice(
            &fs::read(blob_path(
                &image.layout,
                manifest["config"]["digest"].as_str().unwrap(),
            ))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(config["os"], "linux");
        assert_eq!(config["rootfs"]["type"], "layers");
        assert_eq!(
            config["rootfs"]["diff_ids"],
            json!([sha256_digest(&tar_bytes)])
        );
        assert!(
            config.get("created").is_none(),
            "no build date in the config"
        );
    }

    #[test]
    fn the_same_module_gives_byte_identical_layouts() {
        let first = Scratch::new("determinism-a");
        let second = Scratch::new("determinism-b");
        let wasm = fake_wasm(b"determinism");
        for form in ImageForm::ALL {
            let a = written(form, &wasm, &first);
            let b = written(form, &wasm, &second);
            assert_eq!(a.manifest_digest, b.manifest_digest, "{form:?}");
            let (files_a, files_b) = (files(&a.layout), files(&b.layout));
            assert!(files_a.len() >= 5, "{form:?}: {:?}", files_a.keys());
            assert_eq!(files_a, files_b, "{form:?}: the two layouts differ");

            let other = written(form, &fake_wasm(b"another module"), &second);
            assert_ne!(other.manifest_digest, a.manifest_digest, "{form:?}");
        }
    }

    #[test]
    fn rewriting_a_layout_leaves_no_stale_blobs() {
        let scratch = Scratch::new("rewrite");
        for form in ImageForm::ALL {
            let before = written(form, &fake_wasm(b"old"), &scratch);
            let after = written(form, &fake_wasm(b"new"), &scratch);
            assert!(!blob_path(&after.layout, &before.manifest_digest).exists());
            assert!(!blob_path(&after.layout, &before.wasm_layer_digest).exists());
            assert!(blob_path(&after.layout, &after.manifest_digest).exists());
        }
    }

    #[test]
    fn istio_takes_each_form_by_the_reader_meant_for_it() {
        let scratch = Scratch::new("istio");
        let wasm = fake_wasm(b"istio");
        let artifact = written(ImageForm::WasmArtifact, &wasm, &scratch);
        assert_eq!(
            istio_extract_wasm(&artifact.layout, TAG).unwrap(),
            (IstioVariant::OciArtifact, wasm.clone())
        );
        let compat = written(ImageForm::Compat, &wasm, &scratch);
        assert_eq!(
            istio_extract_wasm(&compat.layout, TAG).unwrap(),
            (IstioVariant::OciCompat, wasm.clone())
        );
        let unknown_tag = istio_extract_wasm(&compat.layout, "9.9.9").unwrap_err();
        assert!(
            unknown_tag.contains("no manifest tagged 9.9.9"),
            "{unknown_tag}"
        );
    }

    /// Rewrites the layout's manifest (and the index entry naming it) with `edit`.
    fn edit_manifest(layout: &Path, edit: impl FnOnce(&mut Value)) {
        let index_path = layout.join("index.json");
        let mut index = json_file(&index_path);
        let mut manifest = manifest_of(layout);
        edit(&mut manifest);
        let bytes = serde_json::to_vec(&manifest).unwrap();
        fs::write(blob_path(layout, &sha256_digest(&bytes)), &bytes).unwrap();
        index["manifests"][0]["digest"] = Value::from(sha256_digest(&bytes));
        index["manifests"][0]["size"] = Value::from(bytes.len());
        fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    }

    #[test]
    fn the_istio_check_rejects_what_istio_rejects() {
        let scratch = Scratch::new("istio-rejects");
        let wasm = fake_wasm(b"rejects");

        // A Wasm artifact with its one wasm layer alone: Istio's count check refuses it.
        let artifact = written(ImageForm::WasmArtifact, &wasm, &scratch);
        edit_manifest(&artifact.layout, |manifest| {
            let layers = manifest["layers"].as_array_mut().unwrap();
            layers.retain(|layer| layer["mediaType"] == WASM_CONTENT_LAYER);
        });
        let error = istio_extract_wasm(&artifact.layout, TAG).unwrap_err();
        assert!(
            error.contains("number of layers must be 2 but got 1"),
            "{error}"
        );

        // A Docker manifest wants the Docker layer media type on its last layer.
        let compat = written(ImageForm::Compat, &wasm, &scratch);
        edit_manifest(&compat.layout, |manifest| {
            manifest["mediaType"] = Value::from(DOCKER_MANIFEST);
        });
        let error = istio_extract_wasm(&compat.layout, TAG).unwrap_err();
        assert!(error.contains("invalid media type"), "{error}");
        edit_manifest(&compat.layout, |manifest| {
            manifest["layers"][0]["mediaType"] = Value::from(DOCKER_LAYER_TAR_GZIP);
        });
        assert_eq!(
            istio_extract_wasm(&compat.layout, TAG).unwrap(),
            (IstioVariant::DockerCompat, wasm.clone())
        );

        // Bytes that are not a Wasm module fail Istio's magic-number check.
        let not_wasm = written(ImageForm::WasmArtifact, b"#!/bin/sh\necho hi\n", &scratch);
        let error = istio_extract_wasm(&not_wasm.layout, TAG).unwrap_err();
        assert!(error.contains("not a Wasm binary"), "{error}");

        // A blob that does not match its digest is refused, as go-containerregistry would.
        let tampered = written(ImageForm::Compat, &wasm, &scratch);
        fs::write(
            blob_path(&tampered.layout, &tampered.wasm_layer_digest),
            b"x",
        )
        .unwrap();
        let error = istio_extract_wasm(&tampered.layout, TAG).unwrap_err();
        assert!(error.contains("does not match its digest"), "{error}");
    }

    #[test]
    fn a_compat_tar_without_plugin_wasm_is_refused() {
        let scratch = Scratch::new("no-plugin");
        let mut header = tar::Header::new_ustar();
        header.set_path("filter.wasm").unwrap();
        header.set_size(8);
        header.set_cksum();
        let mut builder = tar::Builder::new(Vec::new());
        builder.append(&header, &b"\0asm\x01\0\0\0"[..]).unwrap();
        let layer = Blob::new(
            OCI_LAYER_TAR_GZIP,
            gzip(&builder.into_inner().unwrap()).unwrap(),
        );
        let layout = scratch.0.join("no-plugin");
        let layer_digest = layer.digest();
        let compat = written(ImageForm::Compat, &fake_wasm(b"x"), &scratch);
        fs::rename(&compat.layout, &layout).unwrap();
        fs::write(blob_path(&layout, &layer_digest), &layer.bytes).unwrap();
        edit_manifest(&layout, |manifest| {
            manifest["layers"][0] = layer.descriptor();
        });
        let error = istio_extract_wasm(&layout, TAG).unwrap_err();
        assert!(
            error.contains("plugin.wasm not found in the archive"),
            "{error}"
        );
    }

    /// skopeo and Docker on both forms. Skipped where they are missing, unless
    /// `SEAWALL_REQUIRE_TOOLS=1`, which CI sets so that a missing tool fails the run.
    #[test]
    fn skopeo_and_docker_read_both_forms() {
        let required = std::env::var("SEAWALL_REQUIRE_TOOLS").is_ok_and(|value| value == "1");
        let missing: Vec<String> = [
            require_tool("skopeo", &["--version"], "skopeo"),
            require_tool("docker", &["version"], "docker.io"),
        ]
        .into_iter()
        .filter_map(Result::err)
        .collect();
        if !missing.is_empty() {
            assert!(!required, "SEAWALL_REQUIRE_TOOLS=1: {}", missing.join("; "));
            eprintln!("skipped (set SEAWALL_REQUIRE_TOOLS=1 to fail instead): {missing:?}");
            return;
        }
        let scratch = Scratch::new("real-tools");
        let wasm = fake_wasm(b"real tools");
        for form in ImageForm::ALL {
            let image = written(form, &wasm, &scratch);
            check_with_real_tools(&image).unwrap();
        }
    }
}
