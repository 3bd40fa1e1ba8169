//! Finding seawall's plugin configs in what an operator hands the tool.
//!
//! Operators keep the plugin config in four kinds of file, and the tool takes them all as they
//! are, so the file checked is the file deployed: plain plugin JSON; an Envoy bootstrap, LDS or
//! ECDS file (YAML or JSON, several documents allowed), where the config is the `StringValue` of a
//! Wasm filter's `config.configuration`; and an Istio `WasmPlugin`, where it is `spec.pluginConfig`.
//! Each config found keeps where it was found (document and YAML path), so a message can point
//! the operator at it. The plugin config's own text is handed on byte for byte: it is what
//! Envoy hands the filter, so a syntax error reads as the filter would report it.

use std::fmt;
use std::io::Read;

use serde_json::Value;

/// The Wasm filter's typed config.
const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const STRING_VALUE: &str = "type.googleapis.com/google.protobuf.StringValue";

/// One plugin config found in the input.
#[derive(Debug, Clone)]
pub struct Found {
    /// Where it was: `document 1: static_resources.listeners[0]...configuration.value`; empty for
    /// a plain plugin config.
    pub location: String,
    /// The plugin's `name` (Envoy) or `metadata.name` (Istio), when given.
    pub plugin: Option<String>,
    /// The plugin config, as the filter receives it.
    pub json: String,
    /// The Envoy route config's `internal_only_headers` next to the filter, when it is inline.
    pub internal_only_headers: Option<Vec<String>>,
}

/// The input, read and searched.
#[derive(Debug, Default)]
pub struct Input {
    pub configs: Vec<Found>,
    /// Things worth saying that are not about a config: e.g. a filter configured through ECDS.
    pub notes: Vec<String>,
}

/// Why the input could not be searched at all (exit code 2, not a config error).
#[derive(Debug)]
pub enum InputError {
    Read {
        source: String,
        error: std::io::Error,
    },
    Yaml {
        message: String,
    },
    /// A Wasm filter whose configuration seawall cannot read.
    Unsupported {
        location: String,
        message: String,
    },
    NothingFound,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InputError::Read { source, error } => write!(f, "cannot read {source}: {error}"),
            InputError::Yaml { message } => {
                write!(f, "neither JSON nor YAML: {message}")
            }
            InputError::Unsupported { location, message } => write!(f, "{location}: {message}"),
            InputError::NothingFound => f.write_str(
                "no seawall plugin config found: expected plugin JSON, an Envoy config with an envoy.extensions.filters.http.wasm.v3.Wasm filter, or an Istio WasmPlugin",
            ),
        }
    }
}

/// Reads `path`, or standard input for `-`.
pub fn read(path: &str) -> Result<String, InputError> {
    let mut text = String::new();
    let result = if path == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(path).map(|read| text = read)
    };
    result.map_err(|error| InputError::Read {
        source: if path == "-" {
            "standard input".to_owned()
        } else {
            path.to_owned()
        },
        error,
    })?;
    Ok(text)
}

/// Finds every plugin config in `text`.
pub fn find(text: &str) -> Result<Input, InputError> {
    // An empty file is the empty plugin config, which the filter takes as pass-through.
    if text.trim().is_empty() {
        return Ok(plain(text));
    }
    let documents: Vec<Value> = match serde_json::from_str::<Value>(text) {
        Ok(document) => vec![document],
        Err(json_error) => match yaml_documents(text) {
            Ok(documents) => documents,
            // Not YAML either: if it looks like JSON, it is a broken plugin config, and the
            // compiler says what the filter would.
            Err(_) if text.trim_start().starts_with('{') => return Ok(plain(text)),
            Err(yaml_error) => {
                return Err(InputError::Yaml {
                    message: format!("as JSON: {json_error}; as YAML: {yaml_error}"),
                })
            }
        },
    };
    let several = documents.len() > 1;
    let mut input = Input::default();
    let mut ecds_slots = 0usize;
    for (position, document) in documents.iter().enumerate() {
        let prefix = if several {
            format!("document {}: ", position + 1)
        } else {
            String::new()
        };
        if document.get("kind").and_then(Value::as_str) == Some("WasmPlugin") {
            input.configs.push(istio(&prefix, document)?);
            continue;
        }
        let mut walker = Walker {
            prefix: &prefix,
            found: Vec::new(),
            ecds_slots: 0,
        };
        walker.walk(document, String::new(), None)?;
        ecds_slots += walker.ecds_slots;
        input.configs.extend(walker.found);
    }
    if input.configs.is_empty() {
        let only = documents.first().filter(|_| !several);
        if let Some(Value::Object(fields)) = only {
            if !looks_like_envoy(fields) && text.trim_start().starts_with('{') {
                return Ok(plain(text));
            }
        }
        if ecds_slots > 0 {
            input.notes.push(format!(
                "{ecds_slots} Wasm filter slot(s) take their config through ECDS (config_discovery): check the extension config file that fills them"
            ));
            return Ok(input);
        }
        return Err(InputError::NothingFound);
    }
    // Several Wasm filters: when some are recognisably seawall, the others are someone else's.
    if input.configs.len() > 1
        && input
            .configs
            .iter()
            .any(|c| is_seawall(c.plugin.as_deref()))
    {
        input.configs.retain(|c| is_seawall(c.plugin.as_deref()));
    }
    Ok(input)
}

fn plain(text: &str) -> Input {
    Input {
        configs: vec![Found {
            location: String::new(),
            plugin: None,
            json: text.to_owned(),
            internal_only_headers: None,
        }],
        notes: Vec::new(),
    }
}

fn is_seawall(name: Option<&str>) -> bool {
    name.is_some_and(|name| name.contains("seawall"))
}

/// Keys that only an Envoy or Istio document has at its top level.
fn looks_like_envoy(fields: &serde_json::Map<String, Value>) -> bool {
    [
        "static_resources",
        "dynamic_resources",
        "resources",
        "version_info",
        "apiVersion",
        "kind",
        "admin",
    ]
    .iter()
    .any(|key| fields.contains_key(*key))
}

fn yaml_documents(text: &str) -> Result<Vec<Value>, String> {
    use serde::Deserialize;
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(document).map_err(|e| e.to_string())?;
        if value.is_null() {
            continue;
        }
        documents.push(serde_json::to_value(value).map_err(|e| e.to_string())?);
    }
    if documents.is_empty() {
        return Err("no documents".to_owned());
    }
    Ok(documents)
}

fn istio(prefix: &str, document: &Value) -> Result<Found, InputError> {
    let spec = document.get("spec");
    let plugin = document
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let json = match spec.and_then(|s| s.get("pluginConfig")) {
        None => String::new(),
        Some(config @ Value::Object(_)) => config.to_string(),
        Some(other) => {
            return Err(InputError::Unsupported {
                location: format!("{prefix}spec.pluginConfig"),
                message: format!("expected an object, got {other}"),
            })
        }
    };
    Ok(Found {
        location: format!("{prefix}spec.pluginConfig"),
        plugin,
        json,
        internal_only_headers: None,
    })
}

struct Walker<'a> {
    prefix: &'a str,
    found: Vec<Found>,
    ecds_slots: usize,
}

impl Walker<'_> {
    /// Visits every object; `internal` is the nearest HTTP connection manager's inline
    /// `internal_only_headers`, if any.
    fn walk(
        &mut self,
        value: &Value,
        path: String,
        internal: Option<&Vec<String>>,
    ) -> Result<(), InputError> {
        match value {
            Value::Object(fields) => {
                if fields.get("@type").and_then(Value::as_str) == Some(WASM_TYPE) {
                    return self.wasm(fields, &path, internal);
                }
                if let Some(types) = fields
                    .get("config_discovery")
                    .and_then(|d| d.get("type_urls"))
                    .and_then(Value::as_array)
                {
                    if types.iter().any(|t| t.as_str() == Some(WASM_TYPE)) {
                        self.ecds_slots += 1;
                    }
                }
                let headers: Option<Vec<String>> = fields
                    .get("http_filters")
                    .and(fields.get("route_config"))
                    .map(|route_config| {
                        route_config
                            .get("internal_only_headers")
                            .and_then(Value::as_array)
                            .map(|all| {
                                all.iter()
                                    .filter_map(Value::as_str)
                                    .map(str::to_ascii_lowercase)
                                    .collect()
                            })
                            .unwrap_or_default()
                    });
                let internal = headers.as_ref().or(internal);
                for (key, child) in fields {
                    let at = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    self.walk(child, at, internal)?;
                }
                Ok(())
            }
            Value::Array(items) => {
                for (position, child) in items.iter().enumerate() {
                    self.walk(child, format!("{path}[{position}]"), internal)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn wasm(
        &mut self,
        fields: &serde_json::Map<String, Value>,
        path: &str,
        internal: Option<&Vec<String>>,
    ) -> Result<(), InputError> {
        let config = fields.get("config");
        let plugin = config
            .and_then(|c| c.get("root_id").or_else(|| c.get("name")))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let at = format!("{}{path}.config.configuration", self.prefix);
        let json = match config.and_then(|c| c.get("configuration")) {
            // No configuration: the filter gets an empty one, the pass-through config.
            None => String::new(),
            Some(configuration) => {
                let kind = configuration.get("@type").and_then(Value::as_str);
                match (kind, configuration.get("value")) {
                    (Some(STRING_VALUE), Some(Value::String(text))) => text.clone(),
                    (Some(STRING_VALUE), None) => String::new(),
                    _ => {
                        return Err(InputError::Unsupported {
                            location: at,
                            message: format!(
                                "expected \"@type\": {STRING_VALUE} with a string \"value\" (the plugin config's JSON)"
                            ),
                        })
                    }
                }
            }
        };
        self.found.push(Found {
            location: format!("{at}.value"),
            plugin,
            json,
            internal_only_headers: internal.cloned(),
        });
        Ok(())
    }
}
