//! Delivers the seawall filter the way Istio does: through ECDS (extension config discovery).
//!
//! istio-agent turns a WasmPlugin into an ECDS update of the HTTP filter, with the module fetched
//! to a local file. Here the listener carries only a `config_discovery` slot named `seawall`, and
//! the `TypedExtensionConfig` comes from a file in Envoy's work directory that Envoy watches
//! (`path_config_source` + `watched_directory`), so a scenario can push, break and replace it
//! while traffic flows and read Envoy's verdict from its ECDS stats. The file lives in its own
//! directory so that pushing it does not make Envoy re-read the LDS and CDS files, and the other
//! way round: a scenario can tell which push Envoy reacted to.

use std::fs;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use super::{write_atomically, Envoy};

/// The name of the filter slot and of the extension config resource (Istio uses
/// `<namespace>.<WasmPlugin name>`).
pub const FILTER_NAME: &str = "seawall";
/// The directory, inside Envoy's work directory, that holds the extension config file.
const ECDS_DIR: &str = "ecds";
const ECDS_FILE: &str = "seawall.yaml";
/// Where the examples in `envoy/` expect the module (relative to the repository root, as in
/// `envoy/demo.yaml`); [`EcdsDocument::Text`] replaces it with the module under test.
pub const EXAMPLE_WASM_PATH: &str = "target/wasm32-wasip1/release/seawall.wasm";

const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";

/// One extension config file, as istio-agent would hand it to Envoy.
#[derive(Debug, Clone)]
pub enum EcdsDocument {
    /// Seawall with this plugin config (JSON text), the module from a local file.
    Plugin(String),
    /// The same with the Wasm `failure_policy` Istio's pilot derives from a WasmPlugin's
    /// `failStrategy` (pilot/pkg/model/extensions.go, `buildWasmConfig`: FAIL_OPEN ->
    /// `FAIL_OPEN`, FAIL_CLOSE -> `FAIL_CLOSED`, FAIL_RELOAD -> `FAIL_RELOAD`).
    PluginWithFailurePolicy {
        plugin: String,
        failure_policy: &'static str,
    },
    /// What istio-agent sends instead of the Wasm filter when it cannot fetch the module
    /// (pkg/wasm/convert.go, `createHTTPDefaultFilter`): an RBAC filter with no rules, which
    /// allows everything (FAIL_OPEN), or with empty rules, which denies everything (FAIL_CLOSE).
    IstioFallback { fail_open: bool },
    /// A document that names no resource: the extension config is missing. (A file that does
    /// not exist at all is a config error: Envoy refuses a `path_config_source` whose path does
    /// not exist, at startup and in an LDS update.)
    Missing,
    /// A whole extension config file verbatim (e.g. the example in `envoy/ecds/`), with
    /// [`EXAMPLE_WASM_PATH`] pointed at the module under test.
    Text(String),
}

impl EcdsDocument {
    /// The file's text. JSON is YAML, and serde_json gets the quoting right.
    fn render(&self, wasm: &Path) -> String {
        let typed_config = match self {
            EcdsDocument::Plugin(plugin) => wasm_filter(plugin, wasm),
            EcdsDocument::PluginWithFailurePolicy {
                plugin,
                failure_policy,
            } => {
                let mut filter = wasm_filter(plugin, wasm);
                filter["config"]["failure_policy"] = (*failure_policy).into();
                filter
            }
            EcdsDocument::IstioFallback { fail_open } => istio_fallback(*fail_open),
            EcdsDocument::Missing => return "{\"resources\": []}\n".to_owned(),
            EcdsDocument::Text(text) => {
                return text.replace(EXAMPLE_WASM_PATH, &wasm.display().to_string())
            }
        };
        let document = serde_json::json!({
            "version_info": version_of(&typed_config),
            "resources": [{
                "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                "name": FILTER_NAME,
                "typed_config": typed_config,
            }],
        });
        format!("{document:#}\n")
    }
}

/// The Wasm filter config istio-agent hands Envoy once it has the module on local disk.
fn wasm_filter(plugin: &str, wasm: &Path) -> serde_json::Value {
    serde_json::json!({
        "@type": WASM_TYPE,
        "config": {
            "name": FILTER_NAME,
            "root_id": FILTER_NAME,
            "vm_config": {
                "vm_id": FILTER_NAME,
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": wasm.display().to_string()}},
            },
            "configuration": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": plugin,
            },
        },
    })
}

/// istio-agent's stand-in filters, with its stat prefixes (`wasm-default-allow`, `-deny`).
fn istio_fallback(fail_open: bool) -> serde_json::Value {
    if fail_open {
        serde_json::json!({"@type": RBAC_TYPE, "rules_stat_prefix": "wasm-default-allow"})
    } else {
        serde_json::json!({"@type": RBAC_TYPE, "rules": {}, "rules_stat_prefix": "wasm-default-deny"})
    }
}

/// A version that names the content, so config_dump and `version_text` show which push is
/// recorded.
fn version_of(typed_config: &serde_json::Value) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    typed_config.to_string().hash(&mut hasher);
    format!("v-{:016x}", hasher.finish())
}

/// The `config_discovery` slot and what Envoy starts with.
#[derive(Debug, Clone)]
pub struct EcdsSpec {
    /// The extension config file Envoy finds at start.
    pub initial: EcdsDocument,
    /// `default_config`: what the slot runs while no extension config has been accepted.
    pub default_config: Option<EcdsDocument>,
    /// `apply_default_config_without_warming`: the listener takes traffic with the default
    /// before the first ECDS response, rather than warming until it arrives.
    pub apply_default_config_without_warming: bool,
}

impl EcdsSpec {
    /// Seawall with this plugin config, delivered through ECDS.
    pub fn plugin(plugin_config: &str) -> Self {
        EcdsSpec::starting_with(EcdsDocument::Plugin(plugin_config.to_owned()))
    }

    pub fn starting_with(initial: EcdsDocument) -> Self {
        EcdsSpec {
            initial,
            default_config: None,
            apply_default_config_without_warming: false,
        }
    }

    /// A default config: only [`EcdsDocument::IstioFallback`] and [`EcdsDocument::Plugin`] have
    /// one filter config to give.
    pub fn default_config(mut self, default: EcdsDocument, without_warming: bool) -> Self {
        self.default_config = Some(default);
        self.apply_default_config_without_warming = without_warming;
        self
    }

    /// The HTTP filter entry, indented for the listener's `http_filters`.
    pub(super) fn render_filter(&self, dir: &Path, wasm: &Path) -> String {
        let ecds_dir = dir.join(ECDS_DIR);
        let mut discovery = serde_json::json!({
            "config_source": {
                "path_config_source": {
                    "path": ecds_dir.join(ECDS_FILE).display().to_string(),
                    "watched_directory": {"path": ecds_dir.display().to_string()},
                },
                "resource_api_version": "V3",
            },
            // As Istio's pilot sets them (extensionfilter.go, `toEnvoyHTTPTrafficExtension`):
            // the Wasm filter, or the RBAC filter istio-agent substitutes for it.
            "type_urls": [WASM_TYPE, RBAC_TYPE],
            "apply_default_config_without_warming": self.apply_default_config_without_warming,
        });
        if let Some(default) = &self.default_config {
            let typed_config = match default {
                EcdsDocument::IstioFallback { fail_open } => istio_fallback(*fail_open),
                EcdsDocument::Plugin(plugin) => wasm_filter(plugin, wasm),
                other => panic!("{other:?} is no filter config to default to"),
            };
            discovery["default_config"] = typed_config;
        }
        let filter = serde_json::json!({"name": FILTER_NAME, "config_discovery": discovery});
        format!("          - {filter}\n")
    }

    pub(super) fn write_initial(&self, dir: &Path, wasm: &Path) {
        let ecds_dir = dir.join(ECDS_DIR);
        fs::create_dir_all(&ecds_dir).expect("create the ECDS directory");
        write_atomically(&ecds_dir, ECDS_FILE, &self.initial.render(wasm));
    }
}

/// What Envoy made of an extension config push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcdsOutcome {
    /// Accepted and in effect on every worker (`config_reload` rose, `update_rejected` did not).
    Applied,
    /// Refused (`update_rejected` rose); the workers keep the filter they had.
    Rejected,
    /// Accepted as the config Envoy already holds (`update_success` rose, nothing reloaded).
    Unchanged,
}

/// Envoy's ECDS stats for the seawall slot
/// (`extension_config_discovery.http_filter.seawall.<name>`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EcdsStats {
    pub update_attempt: u64,
    pub update_success: u64,
    pub update_rejected: u64,
    pub update_failure: u64,
    pub config_reload: u64,
    pub config_fail: u64,
    pub config_conflict: u64,
}

fn stat_name(name: &str) -> String {
    format!("extension_config_discovery.http_filter.{FILTER_NAME}.{name}")
}

impl Envoy {
    /// Envoy's ECDS stats for the seawall slot.
    pub fn ecds_stats(&self) -> EcdsStats {
        let stats = self.current_stats();
        let get = |name: &str| stats.get(&stat_name(name)).unwrap_or(0);
        EcdsStats {
            update_attempt: get("update_attempt"),
            update_success: get("update_success"),
            update_rejected: get("update_rejected"),
            update_failure: get("update_failure"),
            config_reload: get("config_reload"),
            config_fail: get("config_fail"),
            config_conflict: get("config_conflict"),
        }
    }

    /// The version of the last update the ECDS subscription accepted (`version_text`).
    pub fn ecds_version_text(&self) -> String {
        let name = stat_name("version_text");
        let (_, body) = self
            .admin_get(&format!("/stats?format=json&filter=^{name}$"))
            .expect("read /stats");
        let json: serde_json::Value = serde_json::from_str(&body).expect("/stats is JSON");
        json["stats"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|stat| stat["name"] == name.as_str())
            .and_then(|stat| stat["value"].as_str())
            .unwrap_or_default()
            .to_owned()
    }

    /// What `/config_dump` records for the seawall slot: `(version_info, typed_config)`.
    pub fn ecds_config_dump(&self) -> Option<(String, serde_json::Value)> {
        let (_, body) = self
            .admin_get("/config_dump?resource=ecds_filters")
            .expect("read /config_dump");
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json["configs"]
            .as_array()?
            .iter()
            .find(|config| config["ecds_filter"]["name"] == FILTER_NAME)
            .map(|config| {
                (
                    config["version_info"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    config["ecds_filter"]["typed_config"].clone(),
                )
            })
    }

    /// The plugin config (JSON text) config_dump records for the seawall slot, if it is Wasm.
    pub fn ecds_dumped_plugin_config(&self) -> Option<String> {
        let (_, typed_config) = self.ecds_config_dump()?;
        typed_config["config"]["configuration"]["value"]
            .as_str()
            .map(str::to_owned)
    }

    /// Pushes seawall with this plugin config through ECDS and waits (bounded) for the verdict.
    pub fn push_extension_config(&mut self, plugin_config: &str) -> EcdsOutcome {
        self.push_extension_document(&EcdsDocument::Plugin(plugin_config.to_owned()))
    }

    /// Replaces the extension config with one that names no resource, as a broken control
    /// plane might, and waits for the verdict (Envoy 1.40 rejects it: "Unexpected number of
    /// resources").
    pub fn break_extension_config(&mut self) -> EcdsOutcome {
        self.push_extension_document(&EcdsDocument::Missing)
    }

    /// Pushes any extension config file and waits (bounded) for Envoy's verdict, read from the
    /// ECDS stats: a rejection is counted at once, an accepted change once every worker has it.
    pub fn push_extension_document(&mut self, document: &EcdsDocument) -> EcdsOutcome {
        assert!(
            self.config.ecds.is_some(),
            "push_extension_document needs EnvoyConfig::ecds"
        );
        let before = self.ecds_stats();
        write_atomically(
            &self.dir.join(ECDS_DIR),
            ECDS_FILE,
            &document.render(&self.wasm),
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        let answered = loop {
            let now = self.ecds_stats();
            if now.update_rejected > before.update_rejected {
                return EcdsOutcome::Rejected;
            }
            if now.update_success > before.update_success {
                break Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "Envoy neither accepted nor rejected the ECDS push within 15 s: {now:?}"
            );
            thread::sleep(Duration::from_millis(25));
        };
        // `config_reload` follows once every worker runs the new filter; an update whose
        // content Envoy already holds is skipped without one.
        loop {
            if self.ecds_stats().config_reload > before.config_reload {
                return EcdsOutcome::Applied;
            }
            if answered.elapsed() > Duration::from_secs(2) {
                return EcdsOutcome::Unchanged;
            }
            thread::sleep(Duration::from_millis(25));
        }
    }
}
