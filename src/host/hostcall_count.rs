//! Benchmark builds (`--features hostcall-count`): counts every host call seawall makes, by
//! kind, and reports the counts to Envoy as stats, so host calls per request can be read from a
//! real Envoy after N requests. Host calls are what a request costs (DESIGN.md §3), and unlike
//! CPU time their count is the same on every run.
//!
//! Calls made on the root context's tick (metric flushes, lease returns, tallies, probes) are
//! counted again apart, under `seawall.hostcalls.tick.<kind>`: the tick's cost is per tick, not
//! per request, so what a request costs is the `all` count less the `tick` count, over streams.
//!
//! The reporting itself goes around the count, so it does not count itself. Without the feature
//! `count` is empty and inlined away.

#[cfg(feature = "hostcall-count")]
use std::cell::Cell;

#[cfg(feature = "hostcall-count")]
use crate::metrics::{metric_name, MetricId, MetricKind, MetricsRegistry, HOSTCALL_KINDS};

/// What a host call does, in the order of [`HOSTCALL_KINDS`], which names them. (Header-map
/// reads are a kind of their own so the one-call read of the request's headers shows apart from
/// single reads.)
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
thread_local! {
    static COUNTS: [Cell<u64>; 10] = const { [const { Cell::new(0) }; 10] };
    static REPORTED: [Cell<u64>; 10] = const { [const { Cell::new(0) }; 10] };
    static TICK_COUNTS: [Cell<u64>; 10] = const { [const { Cell::new(0) }; 10] };
    static TICK_REPORTED: [Cell<u64>; 10] = const { [const { Cell::new(0) }; 10] };
    static IN_TICK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `work` as the tick's: its host calls are also counted under `tick`.
#[inline(always)]
pub fn on_tick<R>(work: impl FnOnce() -> R) -> R {
    #[cfg(feature = "hostcall-count")]
    {
        let outer = IN_TICK.with(|flag| flag.replace(true));
        let result = work();
        IN_TICK.with(|flag| flag.set(outer));
        result
    }
    #[cfg(not(feature = "hostcall-count"))]
    work()
}

/// Counts one host call.
#[inline(always)]
pub fn count(kind: Kind) {
    #[cfg(feature = "hostcall-count")]
    {
        let bump = |counts: &[Cell<u64>; 10]| {
            let cell = &counts[kind as usize];
            cell.set(cell.get() + 1);
        };
        COUNTS.with(bump);
        if IN_TICK.with(Cell::get) {
            TICK_COUNTS.with(bump);
        }
    }
    #[cfg(not(feature = "hostcall-count"))]
    let _ = kind;
}

/// `seawall.hostcalls.all.<kind>` and `seawall.hostcalls.tick.<kind>` for each kind, and
/// `seawall.hostcalls.all.streams`.
#[cfg(feature = "hostcall-count")]
#[derive(Debug, Clone, Copy)]
pub struct HostcallStats {
    kinds: [MetricId; 10],
    tick_kinds: [MetricId; 10],
    streams: MetricId,
}

#[cfg(feature = "hostcall-count")]
impl HostcallStats {
    pub fn define(registry: &mut impl MetricsRegistry) -> Option<Self> {
        let mut kinds = [MetricId(0); 10];
        let mut tick_kinds = [MetricId(0); 10];
        for ((id, tick_id), name) in kinds.iter_mut().zip(&mut tick_kinds).zip(HOSTCALL_KINDS) {
            *id = registry
                .define(MetricKind::Counter, &metric_name("hostcalls", "all", name))
                .ok()?;
            *tick_id = registry
                .define(MetricKind::Counter, &metric_name("hostcalls", "tick", name))
                .ok()?;
        }
        let streams = registry
            .define(
                MetricKind::Counter,
                &metric_name("hostcalls", "all", "streams"),
            )
            .ok()?;
        Some(HostcallStats {
            kinds,
            tick_kinds,
            streams,
        })
    }

    /// Adds this VM's host calls since its last report; called once per finished stream, with
    /// `increment` the uncounted metric call.
    pub fn report(&self, increment: impl Fn(u32, i64)) {
        let report = |counts: &[Cell<u64>; 10], reported: &[Cell<u64>; 10], ids: [MetricId; 10]| {
            for ((count, last), id) in counts.iter().zip(reported).zip(ids) {
                let now = count.get();
                let delta = now.saturating_sub(last.replace(now));
                if delta > 0 {
                    increment(id.0, i64::try_from(delta).unwrap_or(i64::MAX));
                }
            }
        };
        COUNTS.with(|counts| REPORTED.with(|reported| report(counts, reported, self.kinds)));
        TICK_COUNTS.with(|counts| {
            TICK_REPORTED.with(|reported| report(counts, reported, self.tick_kinds))
        });
        increment(self.streams.0, 1);
    }
}
