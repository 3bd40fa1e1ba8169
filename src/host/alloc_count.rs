//! Benchmark builds only (`--features alloc-count`): counts every guest allocation and reports
//! the count to Envoy as stats, so allocations per request can be read from a real Envoy after N
//! requests. This includes the SDK's own per-stream allocations and the host's buffers, which the
//! native allocation tests cannot see.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::metrics::{metric_name, MetricId, MetricKind, MetricSink, MetricsRegistry};

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

struct Counting;

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

thread_local! {
    static REPORTED: Cell<u64> = const { Cell::new(0) };
}

/// `seawall.guest.allocations` and `seawall.guest.streams`.
#[derive(Debug, Clone, Copy)]
pub struct AllocationStats {
    allocations: MetricId,
    streams: MetricId,
}

impl AllocationStats {
    pub fn define(registry: &mut impl MetricsRegistry) -> Option<Self> {
        Some(AllocationStats {
            allocations: registry
                .define(
                    MetricKind::Counter,
                    &metric_name("guest", "all", "allocations"),
                )
                .ok()?,
            streams: registry
                .define(MetricKind::Counter, &metric_name("guest", "all", "streams"))
                .ok()?,
        })
    }

    /// Adds this VM's allocations since its last report; called once per finished stream.
    pub fn report(&self, sink: &impl MetricSink) {
        let now = ALLOCATIONS.load(Ordering::Relaxed);
        let delta = REPORTED.with(|reported| now.saturating_sub(reported.replace(now)));
        sink.increment(self.allocations, i64::try_from(delta).unwrap_or(i64::MAX));
        sink.increment(self.streams, 1);
    }
}
