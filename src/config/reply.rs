//! The local reply a policy sends instead of the upstream's (`on_limit`, `on_open`): one raw form
//! and one check for every policy, differing only in the default status.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::error::{child, ConfigError};
use super::shared::is_header_name;

/// `{"status": 503, "body": "...", "headers": {...}}`; `STATUS` is the policy's default status.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReply<const STATUS: u16> {
    #[serde(default = "default_status::<STATUS>")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_status<const STATUS: u16>() -> u16 {
    STATUS
}

impl<const STATUS: u16> Default for RawReply<STATUS> {
    fn default() -> Self {
        RawReply {
            status: STATUS,
            body: String::new(),
            headers: BTreeMap::new(),
        }
    }
}

/// A compiled local reply; header names are lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl<const STATUS: u16> RawReply<STATUS> {
    /// Checks the status range and header names, reporting problems under `path`.
    pub fn compile(&self, path: &str, errors: &mut Vec<ConfigError>) -> Reply {
        if !(200..=599).contains(&self.status) {
            errors.push(ConfigError::invalid(
                child(path, "status"),
                format!(
                    "expected an HTTP status from 200 to 599, got {}",
                    self.status
                ),
            ));
        }
        for header in self.headers.keys() {
            if !is_header_name(header) {
                errors.push(ConfigError::invalid(
                    child(&child(path, "headers"), header),
                    format!("expected an HTTP header name, got {header:?}"),
                ));
            }
        }
        Reply {
            status: self.status,
            body: self.body.clone().into_bytes(),
            headers: self
                .headers
                .iter()
                .map(|(name, value)| (name.to_ascii_lowercase(), value.clone()))
                .collect(),
        }
    }
}
