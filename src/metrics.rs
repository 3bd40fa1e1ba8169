//! Counters and gauges, named `seawall.<kind>.<name>.<counter>`, defined at configure time and
//! bumped by id on the request path.
//!
//! Envoy shares a metric across every worker's VM when they define the same name, so a counter
//! here is one process-wide Envoy stat, visible at `/stats` and `/stats/prometheus`. Defining
//! needs a name string (allocation, a host call); incrementing only needs the id, so all names
//! are built in `on_configure` and the request path handles plain integers.
//!
//! Each update is still a host call, and most requests bump several counters. So in the plugin a
//! worker's counter updates go to a [`MetricBatch`] (plain memory, sized at configure time) and
//! reach Envoy on the worker's tick: one call per counter that changed, not one per update.
//! Gauges are not batched: a gauge is one value for all workers, and workers flush at different
//! moments, so batched deltas would add up to a value no moment had (an `active` count above its
//! cap). They change only when something happens (a fault held, a breaker opening), never on the
//! common path.

use core::cell::RefCell;
use core::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    /// Each [`MetricSink::set`] records one sample (Envoy's histogram).
    Histogram,
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

/// The kinds of host call a `hostcall-count` build counts, as its stats name them
/// (`seawall.hostcalls.all.<kind>`, `seawall.hostcalls.tick.<kind>`), in its order: the plugin,
/// the benchmark and the real-Envoy `hostcalls` scenario read this one list.
pub const HOSTCALL_KINDS: [&str; 10] = [
    "header_read",
    "header_map_read",
    "header_write",
    "property_read",
    "shared_get",
    "shared_set",
    "metric",
    "time",
    "local_reply",
    "other",
];

/// The one naming scheme: `seawall.<kind>.<name>.<counter>`, e.g. `seawall.route.checkout.requests`.
pub fn metric_name(kind: &str, name: &str, counter: &str) -> String {
    format!("seawall.{kind}.{name}.{counter}")
}

/// One worker's counter updates since its last flush, for one compiled config. The config's
/// metrics are defined through [`MetricBatch::registry`], which hands out the batch's own ids;
/// a counter update by those ids only touches memory, and [`MetricBatch::flush`] passes the
/// totals on to the host under the host's ids. Gauge updates go to the host at once.
#[derive(Debug)]
pub struct MetricBatch<H: MetricSink> {
    host: H,
    entries: Vec<Pending>,
}

#[derive(Debug)]
struct Pending {
    host: MetricId,
    kind: MetricKind,
    delta: core::cell::Cell<i64>,
}

/// Defines metrics with the host and numbers them for a [`MetricBatch`].
pub struct BatchRegistry<'a, R: MetricsRegistry, H: MetricSink> {
    host: &'a mut R,
    batch: &'a mut MetricBatch<H>,
}

impl<H: MetricSink> MetricBatch<H> {
    /// An empty batch that hands its updates to `host`.
    pub fn new(host: H) -> Self {
        MetricBatch {
            host,
            entries: Vec::new(),
        }
    }

    pub fn host(&self) -> &H {
        &self.host
    }

    pub fn registry<'a, R: MetricsRegistry>(
        &'a mut self,
        host: &'a mut R,
    ) -> BatchRegistry<'a, R, H> {
        BatchRegistry { host, batch: self }
    }

    /// Hands every counter change since the last flush to the host, under the host's ids, and
    /// starts afresh. Returns how many host updates it made.
    pub fn flush(&self) -> usize {
        let mut updates = 0;
        for entry in &self.entries {
            let delta = entry.delta.replace(0);
            if delta != 0 {
                self.host.increment(entry.host, delta);
                updates += 1;
            }
        }
        updates
    }

    /// Whether an update waits for the next flush.
    pub fn is_pending(&self) -> bool {
        self.entries.iter().any(|entry| entry.delta.get() != 0)
    }
}

impl<R: MetricsRegistry, H: MetricSink> MetricsRegistry for BatchRegistry<'_, R, H> {
    /// A name defined twice is one metric, as with the host.
    fn define(&mut self, kind: MetricKind, name: &str) -> Result<MetricId, MetricsError> {
        let host = self.host.define(kind, name)?;
        let entries = &mut self.batch.entries;
        let position = match entries.iter().position(|entry| entry.host == host) {
            Some(position) => position,
            None => {
                entries.push(Pending {
                    host,
                    kind,
                    delta: core::cell::Cell::new(0),
                });
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

impl<H: MetricSink> MetricSink for MetricBatch<H> {
    fn increment(&self, id: MetricId, delta: i64) {
        match self.entries.get(id.0 as usize) {
            Some(entry) if entry.kind == MetricKind::Counter => {
                entry.delta.set(entry.delta.get().saturating_add(delta));
            }
            Some(entry) => self.host.increment(entry.host, delta),
            None => {}
        }
    }

    fn set(&self, id: MetricId, value: u64) {
        if let Some(entry) = self.entries.get(id.0 as usize) {
            self.host.set(entry.host, value);
        }
    }
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

    /// A sink that counts the calls it gets, as the host would.
    #[derive(Default)]
    struct CountingHost {
        metrics: FakeMetrics,
        calls: core::cell::Cell<usize>,
    }

    impl MetricSink for CountingHost {
        fn increment(&self, id: MetricId, delta: i64) {
            self.calls.set(self.calls.get() + 1);
            self.metrics.increment(id, delta);
        }

        fn set(&self, id: MetricId, value: u64) {
            self.calls.set(self.calls.get() + 1);
            self.metrics.set(id, value);
        }
    }

    /// A batch over a counting host that knows `defs` by the ids the batch's registry got for
    /// them, as Envoy's one stat table does; and the batch's own ids, in order.
    fn batch_of(defs: &[(MetricKind, &str)]) -> (MetricBatch<CountingHost>, Vec<MetricId>) {
        let mut host = CountingHost::default();
        for (kind, name) in defs {
            host.metrics.define(*kind, name).unwrap();
        }
        let mut batch = MetricBatch::new(host);
        let mut names = FakeMetrics::new();
        let ids = {
            let mut registry = batch.registry(&mut names);
            defs.iter()
                .map(|(kind, name)| registry.define(*kind, name).unwrap())
                .collect()
        };
        (batch, ids)
    }

    #[test]
    fn counters_reach_the_host_as_one_update_per_changed_counter_on_flush() {
        let (batch, ids) = batch_of(&[
            (MetricKind::Counter, "seawall.route.r.requests"),
            (MetricKind::Counter, "seawall.rate_limit.g.allowed"),
            (MetricKind::Counter, "seawall.rate_limit.g.limited"),
        ]);
        let (requests, allowed) = (ids[0], ids[1]);
        for _ in 0..1000 {
            batch.increment(requests, 1);
            batch.increment(allowed, 1);
        }
        assert!(batch.is_pending());
        assert_eq!(batch.host().calls.get(), 0);
        assert_eq!(batch.flush(), 2);
        assert_eq!(batch.host().calls.get(), 2);
        let host = &batch.host().metrics;
        assert_eq!(host.value("seawall.route.r.requests"), Some(1000));
        assert_eq!(host.value("seawall.rate_limit.g.allowed"), Some(1000));
        assert_eq!(host.value("seawall.rate_limit.g.limited"), Some(0));
        // Nothing changed since: a flush costs nothing.
        assert!(!batch.is_pending());
        assert_eq!(batch.flush(), 0);
        batch.increment(requests, 1);
        batch.flush();
        assert_eq!(
            batch.host().metrics.value("seawall.route.r.requests"),
            Some(1001)
        );
    }

    /// Workers flush at different moments, so batched gauge deltas would add up to a value no
    /// moment had: gauges reach the host at once.
    #[test]
    fn gauges_reach_the_host_at_once() {
        let (batch, ids) = batch_of(&[
            (MetricKind::Gauge, "seawall.fault.f.active"),
            (MetricKind::Gauge, "seawall.degradation.d.level"),
        ]);
        let (active, level) = (ids[0], ids[1]);
        batch.increment(active, 1);
        batch.increment(active, 1);
        batch.set(level, 2);
        assert_eq!(batch.host().calls.get(), 3);
        assert_eq!(
            batch.host().metrics.value("seawall.fault.f.active"),
            Some(2)
        );
        assert_eq!(
            batch.host().metrics.value("seawall.degradation.d.level"),
            Some(2)
        );
        batch.increment(active, -1);
        assert_eq!(
            batch.host().metrics.value("seawall.fault.f.active"),
            Some(1)
        );
        assert!(!batch.is_pending());
        assert_eq!(batch.flush(), 0);
    }

    #[test]
    fn a_name_defined_twice_is_one_batched_metric() {
        let (batch, ids) = batch_of(&[
            (MetricKind::Counter, "seawall.x.y.z"),
            (MetricKind::Counter, "seawall.x.y.z"),
        ]);
        assert_eq!(ids[0], ids[1]);
        batch.increment(ids[0], 2);
        batch.increment(ids[1], 3);
        batch.flush();
        assert_eq!(batch.host().metrics.value("seawall.x.y.z"), Some(5));
    }
}
