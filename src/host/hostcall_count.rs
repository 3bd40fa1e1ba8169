//! Benchmark builds (`--features hostcall-count`): counts every host call seawall makes, by
//! kind, and reports the counts to Envoy as stats, so host calls per request can be read from a
//! real Envoy after N requests. Host calls are what a request costs (DESIGN.md §3), and unlike
//! CPU time their count is the same on every run.
//!
//! The reporting itself goes around the count, so it does not count itself. Without the feature
//! `count` is empty and inlined away.

#[cfg(feature = "hostcall-count")]
use std::cell::Cell;

#[cfg(feature = "hostcall-count")]
use crate::metrics::{metric_name, MetricId, MetricKind, MetricsRegistry};

/// What a host call does. (Header-map reads are a kind of their own so the one-call read of the
/// request's headers shows apart from single reads.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "hostcall-count"), allow(dead_code))]
pub enum Kind {
    HeaderRead,
    HeaderMapRead,
    HeaderWrite,
    PropertyRead,
    SharedGet,
    SharedSet,
    Metric,
    Time,
    LocalReply,
    Other,
}

#[cfg(feature = "hostcall-count")]
const KINDS: [(Kind, &str); 10] = [
    (Kind::HeaderRead, "header_read"),
    (Kind::HeaderMapRead, "header_map_read"),
    (Kind::HeaderWrite, "header_write"),
    (Kind::PropertyRead, "property_read"),
    (Kind::SharedGet, "shared_get"),
    (Kind::SharedSet, "shared_set"),
    (Kind::Metric, "metric"),
    (Kind::Time, "time"),
    (Kind::LocalReply, "local_reply"),
    (Kind::Other, "other"),
];

#[cfg(feature = "hostcall-count")]
thread_local! {
    static COUNTS: [Cell<u64>; 10] = const { [const { Cell::new(0) }; 10] };
    static REPORTED: [Cell<u64>; 10] = const { [const { Cell::new(0) }; 10] };
}

#[cfg(feature = "hostcall-count")]
fn slot(kind: Kind) -> usize {
    KINDS
        .iter()
        .position(|(k, _)| *k == kind)
        .unwrap_or(KINDS.len() - 1)
}

/// Counts one host call.
#[inline(always)]
pub fn count(kind: Kind) {
    #[cfg(feature = "hostcall-count")]
    COUNTS.with(|counts| {
        let cell = &counts[slot(kind)];
        cell.set(cell.get() + 1);
    });
    #[cfg(not(feature = "hostcall-count"))]
    let _ = kind;
}

/// `seawall.hostcalls.all.<kind>` for each kind, and `seawall.hostcalls.all.streams`.
#[cfg(feature = "hostcall-count")]
#[derive(Debug, Clone, Copy)]
pub struct HostcallStats {
    kinds: [MetricId; 10],
    streams: MetricId,
}

#[cfg(feature = "hostcall-count")]
impl HostcallStats {
    pub fn define(registry: &mut impl MetricsRegistry) -> Option<Self> {
        let mut kinds = [MetricId(0); 10];
        for (id, (_, name)) in kinds.iter_mut().zip(KINDS) {
            *id = registry
                .define(MetricKind::Counter, &metric_name("hostcalls", "all", name))
                .ok()?;
        }
        let streams = registry
            .define(
                MetricKind::Counter,
                &metric_name("hostcalls", "all", "streams"),
            )
            .ok()?;
        Some(HostcallStats { kinds, streams })
    }

    /// Adds this VM's host calls since its last report; called once per finished stream, with
    /// `increment` the uncounted metric call.
    pub fn report(&self, increment: impl Fn(u32, i64)) {
        COUNTS.with(|counts| {
            REPORTED.with(|reported| {
                for ((count, last), id) in counts.iter().zip(reported).zip(self.kinds) {
                    let now = count.get();
                    let delta = now.saturating_sub(last.replace(now));
                    if delta > 0 {
                        increment(id.0, i64::try_from(delta).unwrap_or(i64::MAX));
                    }
                }
            })
        });
        increment(self.streams.0, 1);
    }
}
