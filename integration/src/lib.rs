//! The real-Envoy harness: everything a scenario needs to prove a seawall feature against the
//! real Envoy binary rather than a mock host.
//!
//! - [`upstream`]: an in-process HTTP/1.1 server whose behaviour the scenario sets (status,
//!   delay, failure ratio, by path or header) and which records what it received;
//! - [`client`]: a raw HTTP/1.1 client with full control over the bytes (hostile headers) and a
//!   bounded multi-connection load generator;
//! - [`demo`]: the demo's plugin config and Envoy topology, for scenarios about the demo;
//! - [`compose`]: brings a docker-compose project (the compose demo) up and down;
//! - [`remote`]: the upstream's control port, when it runs as its own program (`seawall-upstream`,
//!   the compose demo's upstream container);
//! - [`envoy`]: renders an Envoy config with seawall and free ports, runs Envoy with
//!   `--concurrency N`, reads its stats and log, pushes file-based xDS updates, and kills it when
//!   the scenario ends, panics included.
//!
//! Dependencies are kept to std and serde_json so the harness builds in seconds.

pub mod client;
pub mod compose;
pub mod demo;
pub mod envoy;
pub mod remote;
pub mod upstream;

pub use client::{Client, LoadReport, LoadSpec, Request, Response};
pub use envoy::{
    AccessLogEntry, Arrival, EcdsDocument, EcdsOutcome, EcdsSpec, EcdsStats, Envoy, EnvoyConfig,
    LdsOutcome, RouteSpec, Stats,
};
pub use upstream::{Behaviour, Gate, Match, Upstream};
