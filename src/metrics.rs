//! Counters and gauges, named `seawall.<kind>.<name>.<counter>`, defined at configure time and
//! bumped by id on the request path.
//!
//! Envoy shares a metric across every worker's VM when they define the same name, so a counter
//! here is one process-wide Envoy stat, visible at `/stats` and `/stats/prometheus`. Defining
//! needs a name string (allocation, a host call); incrementing only needs the id, so all names
//! are built in `on_configure` and the request path handles plain integers.

use core::cell::RefCell;
use core::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// A defined metric, as the host numbered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MetricId(pub u32);

/// The host refused to define a metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsError {
    pub name: String,
}

impl fmt::Display for MetricsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the host refused to define metric {}", self.name)
    }
}

impl std::error::Error for MetricsError {}

/// Defines metrics; used only at configure time.
pub trait MetricsRegistry {
    fn define(&mut self, kind: MetricKind, name: &str) -> Result<MetricId, MetricsError>;
}

/// Updates metrics by id; used on the request path, so it must not allocate.
pub trait MetricSink {
    fn increment(&self, id: MetricId, delta: i64);
    fn set(&self, id: MetricId, value: u64);
}

/// The one naming scheme: `seawall.<kind>.<name>.<counter>`, e.g. `seawall.route.checkout.requests`.
pub fn metric_name(kind: &str, name: &str, counter: &str) -> String {
    format!("seawall.{kind}.{name}.{counter}")
}

/// An in-memory registry and sink for tests.
#[derive(Debug, Default)]
pub struct FakeMetrics {
    entries: RefCell<Vec<(String, MetricKind, i64)>>,
}

impl FakeMetrics {
    pub fn new() -> Self {
        FakeMetrics::default()
    }

    /// The value of a defined metric, or `None` if it was never defined.
    pub fn value(&self, name: &str) -> Option<i64> {
        self.entries
            .borrow()
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, v)| *v)
    }

    pub fn names(&self) -> Vec<String> {
        self.entries
            .borrow()
            .iter()
            .map(|(n, _, _)| n.clone())
            .collect()
    }
}

impl MetricsRegistry for FakeMetrics {
    /// Like Envoy, defining a name twice returns the same metric.
    fn define(&mut self, kind: MetricKind, name: &str) -> Result<MetricId, MetricsError> {
        let mut entries = self.entries.borrow_mut();
        let position = match entries.iter().position(|(n, _, _)| n == name) {
            Some(position) => position,
            None => {
                entries.push((name.to_owned(), kind, 0));
                entries.len() - 1
            }
        };
        u32::try_from(position)
            .map(MetricId)
            .map_err(|_| MetricsError {
                name: name.to_owned(),
            })
    }
}

impl MetricSink for FakeMetrics {
    fn increment(&self, id: MetricId, delta: i64) {
        if let Some(entry) = self.entries.borrow_mut().get_mut(id.0 as usize) {
            entry.2 = entry.2.saturating_add(delta);
        }
    }

    fn set(&self, id: MetricId, value: u64) {
        if let Some(entry) = self.entries.borrow_mut().get_mut(id.0 as usize) {
            entry.2 = i64::try_from(value).unwrap_or(i64::MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn names_follow_the_scheme() {
        assert_eq!(
            metric_name("route", "checkout", "requests"),
            "seawall.route.checkout.requests"
        );
    }

    #[test]
    fn defining_twice_shares_the_metric() {
        let mut metrics = FakeMetrics::new();
        let a = metrics
            .define(MetricKind::Counter, "seawall.x.y.z")
            .unwrap();
        let b = metrics
            .define(MetricKind::Counter, "seawall.x.y.z")
            .unwrap();
        assert_eq!(a, b);
        metrics.increment(a, 2);
        metrics.increment(b, 3);
        assert_eq!(metrics.value("seawall.x.y.z"), Some(5));
        metrics.set(a, 7);
        assert_eq!(metrics.value("seawall.x.y.z"), Some(7));
        assert_eq!(metrics.value("seawall.missing"), None);
    }
}
