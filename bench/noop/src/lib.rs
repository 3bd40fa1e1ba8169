//! The benchmark's floor: a proxy-wasm HTTP filter that lets every request through untouched.
//! Whatever any Wasm filter costs (the VM call per callback, the SDK's per-stream context), this
//! costs too, so seawall's overhead is measured against it. With `alloc-count` it reports its
//! guest allocations like seawall does, to separate the SDK's share from seawall's.

#![cfg(target_arch = "wasm32")]

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};

#[cfg(feature = "alloc-count")]
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicU64, Ordering};

    pub static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

    struct Counting;

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
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    #[cfg(feature = "alloc-count")]
    metrics: Option<(u32, u32)>,
}

impl Context for Root {}

impl RootContext for Root {
    #[cfg(feature = "alloc-count")]
    fn on_configure(&mut self, _size: usize) -> bool {
        use proxy_wasm::types::MetricType;
        let allocations =
            proxy_wasm::hostcalls::define_metric(MetricType::Counter, "noop.guest.allocations");
        let streams =
            proxy_wasm::hostcalls::define_metric(MetricType::Counter, "noop.guest.streams");
        if let (Ok(a), Ok(s)) = (allocations, streams) {
            self.metrics = Some((a, s));
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        #[cfg(feature = "alloc-count")]
        {
            Some(Box::new(Stream {
                metrics: self.metrics,
            }))
        }
        #[cfg(not(feature = "alloc-count"))]
        {
            Some(Box::new(Stream {}))
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    #[cfg(feature = "alloc-count")]
    metrics: Option<(u32, u32)>,
}

impl Context for Stream {}

impl HttpContext for Stream {
    #[cfg(feature = "alloc-count")]
    fn on_log(&mut self) {
        use std::sync::atomic::Ordering;
        thread_local! {
            static REPORTED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
        }
        if let Some((allocations, streams)) = self.metrics {
            let now = counting::ALLOCATIONS.load(Ordering::Relaxed);
            let delta = REPORTED.with(|reported| now - reported.replace(now));
            let _ = proxy_wasm::hostcalls::increment_metric(allocations, delta as i64);
            let _ = proxy_wasm::hostcalls::increment_metric(streams, 1);
        }
    }
}
