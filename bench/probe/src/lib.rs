//! The benchmark's price list, and its lowest floor: a pass-through proxy-wasm HTTP filter that
//! exports the ABI (0.2.1) by hand, with no SDK, and makes `N` host calls of one kind on every
//! request. Its plugin configuration is `"<kind> <N>"`, for example `"header_write_request 8"`.
//!
//! With `"nothing 0"` it is the ABI-only no-op filter: per request it makes no host call, and
//! every callback returns at once, so what it costs over no filter at all is what Envoy's Wasm
//! machinery costs (one VM call per callback Envoy makes). The SDK no-op filter (`bench/noop`)
//! costs that plus the SDK's dispatch and its per-stream context, so the two split a Wasm
//! filter's floor into the host's share and the SDK's. Envoy 1.40 (proxy-wasm-cpp-host) needs only
//! an ABI version marker and an allocator export (`proxy_on_memory_allocate`, as the SDK 0.2.5
//! exports on wasm32-wasip1) to load a module, and calls whichever `proxy_on_*` exports it finds.
//!
//! Counting Envoy's instructions per request under callgrind at `N` = 0, 1 and 8 prices one call
//! of that kind (what the first costs, and each one after), so seawall's request path can be read as a
//! sum: which host calls it makes, what each costs, and what is left for its own code.
//!
//! The calls are the ones seawall's request path makes (`src/host/abi.rs`), on the same inputs:
//! header names of its length, the breaker's `xds.cluster_name` property, a shared-data record
//! of a breaker's size, a counter. Its ABI declarations repeat those of `src/host/abi.rs` on
//! purpose: seawall's wrappers there count calls and take ownership of buffers through the SDK's
//! allocator, and the probe prices the bare call.

#![cfg(target_arch = "wasm32")]

use core::ptr::null_mut;
use std::alloc::{alloc, dealloc, Layout};
use std::cell::Cell;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
}

const OK: u32 = 0;
const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
const MAP_REQUEST_HEADERS: u32 = 0;
const MAP_RESPONSE_HEADERS: u32 = 2;
const METRIC_COUNTER: u32 = 0;
const CONTINUE: u32 = 0;

/// One kind of host call, as `src/host/hostcall_count.rs` names them (writes split by map).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Nothing,
    Time,
    HeaderRead,
    /// A header the request does not carry: the host answers "not found" and hands back no
    /// buffer, so it never calls back into the guest's allocator. Against `HeaderRead`, it
    /// prices that call-back.
    HeaderReadMissing,
    HeaderMapRead,
    HeaderMapReadResponse,
    HeaderWriteRequest,
    HeaderWriteResponse,
    PropertyRead,
    SharedGet,
    SharedSet,
    Metric,
}

impl Kind {
    fn parse(name: &[u8]) -> Option<Kind> {
        Some(match name {
            b"nothing" => Kind::Nothing,
            b"time" => Kind::Time,
            b"header_read" => Kind::HeaderRead,
            b"header_read_missing" => Kind::HeaderReadMissing,
            b"header_map_read" => Kind::HeaderMapRead,
            b"header_map_read_response" => Kind::HeaderMapReadResponse,
            b"header_write_request" => Kind::HeaderWriteRequest,
            b"header_write_response" => Kind::HeaderWriteResponse,
            b"property_read" => Kind::PropertyRead,
            b"shared_get" => Kind::SharedGet,
            b"shared_set" => Kind::SharedSet,
            b"metric" => Kind::Metric,
            _ => return None,
        })
    }

    fn on_response(self) -> bool {
        matches!(
            self,
            Kind::HeaderMapReadResponse | Kind::HeaderWriteResponse
        )
    }
}

/// The VM is single-threaded: one probe per worker.
struct Probe {
    kind: Cell<Kind>,
    calls: Cell<u32>,
    metric: Cell<u32>,
}

// SAFETY: a proxy-wasm VM runs one thread.
unsafe impl Sync for Probe {}

static PROBE: Probe = Probe {
    kind: Cell::new(Kind::Nothing),
    calls: Cell::new(0),
    metric: Cell::new(0),
};

/// Seawall's names are of these lengths (`x-envoy-max-retries`, `ratelimit-remaining`).
const REQUEST_HEADERS: [&[u8]; 8] = [
    b"x-probe-request-0",
    b"x-probe-request-1",
    b"x-probe-request-2",
    b"x-probe-request-3",
    b"x-probe-request-4",
    b"x-probe-request-5",
    b"x-probe-request-6",
    b"x-probe-request-7",
];
const RESPONSE_HEADERS: [&[u8]; 8] = [
    b"ratelimit-probe-0",
    b"ratelimit-probe-1",
    b"ratelimit-probe-2",
    b"ratelimit-probe-3",
    b"ratelimit-probe-4",
    b"ratelimit-probe-5",
    b"ratelimit-probe-6",
    b"ratelimit-probe-7",
];
const SHARED_KEY: &[u8] = b"sw:probe:cb:payments";
const PROPERTY: &[u8] = b"xds\0cluster_name";

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// The host's buffers come from here, with alignment 1 and exactly `size` bytes, as the SDK's do.
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    match Layout::from_size_align(size.max(1), 1) {
        // SAFETY: the layout's size is not zero.
        Ok(layout) => unsafe { alloc(layout) },
        Err(_) => null_mut(),
    }
}

/// Gives back a buffer the host filled through [`proxy_on_memory_allocate`].
fn free(data: *mut u8, size: usize) {
    if data.is_null() {
        return;
    }
    if let Ok(layout) = Layout::from_size_align(size.max(1), 1) {
        // SAFETY: `data` came from `proxy_on_memory_allocate(size)`.
        unsafe { dealloc(data, layout) }
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root_context_id: u32, _vm_configuration_size: u32) -> u32 {
    1
}

/// Reads `"<kind> <N>"`; refuses anything else, so a typo cannot price the wrong call.
#[no_mangle]
pub extern "C" fn proxy_on_configure(_root_context_id: u32, configuration_size: u32) -> u32 {
    let mut data = null_mut();
    let mut size = 0usize;
    let status = unsafe {
        proxy_get_buffer_bytes(
            BUFFER_PLUGIN_CONFIGURATION,
            0,
            configuration_size as usize,
            &mut data,
            &mut size,
        )
    };
    if status != OK || data.is_null() {
        return 0;
    }
    // SAFETY: the host wrote `size` bytes at `data`.
    let text = unsafe { core::slice::from_raw_parts(data, size) }.to_vec();
    free(data, size);
    let mut words = text.split(|b| *b == b' ').filter(|w| !w.is_empty());
    let kind = words.next().and_then(Kind::parse);
    let calls = words
        .next()
        .and_then(|n| core::str::from_utf8(n).ok())
        .and_then(|n| n.trim().parse::<u32>().ok());
    let (Some(kind), Some(calls)) = (kind, calls) else {
        return 0;
    };
    if calls as usize > REQUEST_HEADERS.len() {
        return 0;
    }
    PROBE.kind.set(kind);
    PROBE.calls.set(calls);
    let name = b"probe.calls";
    let mut id = 0;
    if unsafe { proxy_define_metric(METRIC_COUNTER, name.as_ptr(), name.len(), &mut id) } != OK {
        return 0;
    }
    PROBE.metric.set(id);
    let record = [0u8; 48];
    unsafe {
        proxy_set_shared_data(
            SHARED_KEY.as_ptr(),
            SHARED_KEY.len(),
            record.as_ptr(),
            48,
            0,
        )
    };
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(_context_id: u32, _parent_context_id: u32) {}

/// Makes call `index` of the configured kind.
fn call(kind: Kind, index: usize) {
    let mut data = null_mut();
    let mut size = 0usize;
    let value = b"7";
    // SAFETY: every pointer is to a live buffer of the given length, or an out-parameter.
    unsafe {
        match kind {
            Kind::Nothing => {}
            Kind::Time => {
                let mut now = 0u64;
                proxy_get_current_time_nanoseconds(&mut now);
            }
            Kind::HeaderRead => {
                let name = b":path";
                proxy_get_header_map_value(
                    MAP_REQUEST_HEADERS,
                    name.as_ptr(),
                    name.len(),
                    &mut data,
                    &mut size,
                );
            }
            Kind::HeaderReadMissing => {
                let name = b"x-probe-absent";
                proxy_get_header_map_value(
                    MAP_REQUEST_HEADERS,
                    name.as_ptr(),
                    name.len(),
                    &mut data,
                    &mut size,
                );
            }
            Kind::HeaderMapRead => {
                proxy_get_header_map_pairs(MAP_REQUEST_HEADERS, &mut data, &mut size);
            }
            Kind::HeaderMapReadResponse => {
                proxy_get_header_map_pairs(MAP_RESPONSE_HEADERS, &mut data, &mut size);
            }
            Kind::HeaderWriteRequest => {
                let name = REQUEST_HEADERS[index];
                proxy_replace_header_map_value(
                    MAP_REQUEST_HEADERS,
                    name.as_ptr(),
                    name.len(),
                    value.as_ptr(),
                    value.len(),
                );
            }
            Kind::HeaderWriteResponse => {
                let name = RESPONSE_HEADERS[index];
                proxy_add_header_map_value(
                    MAP_RESPONSE_HEADERS,
                    name.as_ptr(),
                    name.len(),
                    value.as_ptr(),
                    value.len(),
                );
            }
            Kind::PropertyRead => {
                proxy_get_property(PROPERTY.as_ptr(), PROPERTY.len(), &mut data, &mut size);
            }
            Kind::SharedGet => {
                let mut cas = 0;
                proxy_get_shared_data(
                    SHARED_KEY.as_ptr(),
                    SHARED_KEY.len(),
                    &mut data,
                    &mut size,
                    &mut cas,
                );
            }
            Kind::SharedSet => {
                let record = [index as u8; 48];
                proxy_set_shared_data(
                    SHARED_KEY.as_ptr(),
                    SHARED_KEY.len(),
                    record.as_ptr(),
                    record.len(),
                    0,
                );
            }
            Kind::Metric => {
                proxy_increment_metric(PROBE.metric.get(), 1);
            }
        }
    }
    free(data, size);
}

fn calls(on_response: bool) {
    let kind = PROBE.kind.get();
    if kind.on_response() != on_response {
        return;
    }
    for index in 0..PROBE.calls.get() as usize {
        call(kind, index);
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(
    _context_id: u32,
    _headers: u32,
    _end_of_stream: u32,
) -> u32 {
    calls(false);
    CONTINUE
}

#[no_mangle]
pub extern "C" fn proxy_on_request_body(
    _context_id: u32,
    _body_size: u32,
    _end_of_stream: u32,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn proxy_on_request_trailers(_context_id: u32, _trailers: u32) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(
    _context_id: u32,
    _headers: u32,
    _end_of_stream: u32,
) -> u32 {
    calls(true);
    CONTINUE
}

#[no_mangle]
pub extern "C" fn proxy_on_response_body(
    _context_id: u32,
    _body_size: u32,
    _end_of_stream: u32,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn proxy_on_response_trailers(_context_id: u32, _trailers: u32) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn proxy_on_log(_context_id: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_done(_context_id: u32) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(_context_id: u32) {}
