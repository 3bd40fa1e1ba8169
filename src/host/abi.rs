//! Safe wrappers over the proxy-wasm ABI calls seawall makes, returning statuses instead of
//! panicking.
//!
//! The SDK's own wrappers (`proxy_wasm::hostcalls`) `panic!` on any status they did not expect,
//! and a panic aborts the whole VM: one odd host answer on one request would take down the
//! worker's filter. They also take `Vec` arguments (property paths, header lists) that would
//! allocate on every request. So the calls on seawall's paths are declared here, with the inputs
//! prebuilt at configure time, and every status is handled. The SDK still provides the context
//! dispatch and the guest allocator (`proxy_on_memory_allocate`) that the host uses for the
//! buffers it returns.

#![allow(clashing_extern_declarations)]

use core::ptr::null_mut;

use super::hostcall_count::{count, Kind};

/// proxy-wasm status codes seawall distinguishes.
pub const OK: u32 = 0;
pub const NOT_FOUND: u32 = 1;
pub const CAS_MISMATCH: u32 = 8;

const MAP_HTTP_REQUEST_HEADERS: u32 = 0;
const MAP_HTTP_RESPONSE_HEADERS: u32 = 2;
const MAP_HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
const BUFFER_HTTP_RESPONSE_BODY: u32 = 1;
const STREAM_HTTP_REQUEST: u32 = 0;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
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
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
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
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        buffer_type: u32,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        additional_headers_map_data: *const u8,
        additional_headers_size: usize,
        grpc_status: i32,
    ) -> u32;
}

/// Takes ownership of a buffer the host filled through the guest allocator.
///
/// # Safety
/// `data` must be null or a buffer of `size` bytes from `proxy_on_memory_allocate`, which
/// allocates with `Vec`'s layout (alignment 1, capacity == size).
unsafe fn take_host_buffer(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

/// proxy-wasm's number for Envoy's `critical` level.
const LOG_CRITICAL: u32 = 5;

/// Logs at `critical`, which the `log` facade has no level for: only the panic hook uses it; every
/// other message goes through `log`, which the SDK forwards to Envoy.
pub fn log_critical(message: &str) {
    // Nothing useful to do if logging itself fails.
    let _ = unsafe { proxy_log(LOG_CRITICAL, message.as_ptr(), message.len()) };
}

/// Nanoseconds since the Unix epoch; 0 if the host will not say.
pub fn now_nanos() -> u64 {
    count(Kind::Time);
    let mut nanos = 0u64;
    match unsafe { proxy_get_current_time_nanoseconds(&mut nanos) } {
        OK => nanos,
        _ => 0,
    }
}

fn get_header(map_type: u32, name: &str) -> Option<Vec<u8>> {
    count(Kind::HeaderRead);
    let mut data = null_mut();
    let mut size = 0usize;
    let status = unsafe {
        proxy_get_header_map_value(map_type, name.as_ptr(), name.len(), &mut data, &mut size)
    };
    match status {
        OK => Some(unsafe { take_host_buffer(data, size) }),
        _ => None,
    }
}

/// Every request header in one call, in the map wire form (`request::HeaderPairs` reads it).
pub fn request_header_map() -> Option<Vec<u8>> {
    header_map(MAP_HTTP_REQUEST_HEADERS)
}

fn header_map(map_type: u32) -> Option<Vec<u8>> {
    count(Kind::HeaderMapRead);
    let mut data = null_mut();
    let mut size = 0usize;
    let status = unsafe { proxy_get_header_map_pairs(map_type, &mut data, &mut size) };
    match status {
        OK => Some(unsafe { take_host_buffer(data, size) }),
        _ => None,
    }
}

/// Every response header in one call, in the map wire form.
pub fn response_header_map() -> Option<Vec<u8>> {
    header_map(MAP_HTTP_RESPONSE_HEADERS)
}

/// A request header's raw bytes, UTF-8 or not.
pub fn request_header(name: &str) -> Option<Vec<u8>> {
    get_header(MAP_HTTP_REQUEST_HEADERS, name)
}

pub fn add_response_header(name: &str, value: &[u8]) -> bool {
    count(Kind::HeaderWrite);
    let status = unsafe {
        proxy_add_header_map_value(
            MAP_HTTP_RESPONSE_HEADERS,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    };
    status == OK
}

/// Sets a request header, replacing any value the client sent.
pub fn replace_request_header(name: &str, value: &[u8]) -> bool {
    count(Kind::HeaderWrite);
    let status = unsafe {
        proxy_replace_header_map_value(
            MAP_HTTP_REQUEST_HEADERS,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    };
    status == OK
}

/// A response header's raw bytes.
pub fn response_header(name: &str) -> Option<Vec<u8>> {
    get_header(MAP_HTTP_RESPONSE_HEADERS, name)
}

/// A header of the response to a call this context dispatched (a probe).
pub fn http_call_response_header(name: &str) -> Option<Vec<u8>> {
    get_header(MAP_HTTP_CALL_RESPONSE_HEADERS, name)
}

pub fn remove_request_header(name: &str) -> bool {
    count(Kind::HeaderWrite);
    unsafe {
        proxy_remove_header_map_value(MAP_HTTP_REQUEST_HEADERS, name.as_ptr(), name.len()) == OK
    }
}

pub fn remove_response_header(name: &str) -> bool {
    count(Kind::HeaderWrite);
    unsafe {
        proxy_remove_header_map_value(MAP_HTTP_RESPONSE_HEADERS, name.as_ptr(), name.len()) == OK
    }
}

pub fn replace_response_header(name: &str, value: &[u8]) -> bool {
    count(Kind::HeaderWrite);
    let status = unsafe {
        proxy_replace_header_map_value(
            MAP_HTTP_RESPONSE_HEADERS,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    };
    status == OK
}

/// Replaces the `size` bytes of the response body chunk Envoy is showing with `data`.
pub fn replace_response_body(size: usize, data: &[u8]) -> bool {
    count(Kind::Other);
    let status = unsafe {
        proxy_set_buffer_bytes(
            BUFFER_HTTP_RESPONSE_BODY,
            0,
            size,
            data.as_ptr(),
            data.len(),
        )
    };
    status == OK
}

/// Ticks this root context every `period_ms` milliseconds (0 stops them).
pub fn set_tick_period(period_ms: u32) -> bool {
    count(Kind::Other);
    unsafe { proxy_set_tick_period_milliseconds(period_ms) == OK }
}

/// Makes `context_id` the stream later calls act on; false when that stream is gone.
pub fn set_effective_context(context_id: u32) -> bool {
    count(Kind::Other);
    unsafe { proxy_set_effective_context(context_id) == OK }
}

/// Resumes the effective stream's paused request.
pub fn resume_request() -> bool {
    count(Kind::Other);
    unsafe { proxy_continue_stream(STREAM_HTTP_REQUEST) == OK }
}

/// A property by its NUL-joined path; `None` when absent or unreadable.
pub fn property(path: &[u8]) -> Option<Vec<u8>> {
    count(Kind::PropertyRead);
    let mut data = null_mut();
    let mut size = 0usize;
    let status = unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) };
    match status {
        OK if !data.is_null() => Some(unsafe { take_host_buffer(data, size) }),
        _ => None,
    }
}

/// An integer property (Envoy serializes them as 8 little-endian bytes).
pub fn property_int(path: &[u8]) -> Option<i64> {
    let bytes = property(path)?;
    let array: [u8; 8] = bytes.as_slice().try_into().ok()?;
    Some(i64::from_le_bytes(array))
}

pub enum SharedRead {
    Missing,
    Found { len: usize, cas: u32 },
    Failed(u32),
}

/// Copies a shared-data value into `out` (what fits) and frees the host's copy.
pub fn get_shared(key: &str, out: &mut [u8]) -> SharedRead {
    count(Kind::SharedGet);
    let mut data = null_mut();
    let mut size = 0usize;
    let mut cas = 0u32;
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    match status {
        OK => {
            let value = unsafe { take_host_buffer(data, size) };
            let copied = value.len().min(out.len());
            out[..copied].copy_from_slice(&value[..copied]);
            SharedRead::Found { len: size, cas }
        }
        NOT_FOUND => SharedRead::Missing,
        other => SharedRead::Failed(other),
    }
}

/// Writes a shared-data value; `cas` 0 writes unconditionally. Returns the host status.
pub fn set_shared(key: &str, value: &[u8], cas: u32) -> u32 {
    count(Kind::SharedSet);
    unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) }
}

pub fn define_metric(kind: u32, name: &str) -> Result<u32, u32> {
    let mut id = 0u32;
    match unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) } {
        OK => Ok(id),
        status => Err(status),
    }
}

/// A metric increment that is not counted as a host call: for reporting the counts themselves.
#[cfg(feature = "hostcall-count")]
pub fn increment_metric_uncounted(id: u32, delta: i64) {
    let _ = unsafe { proxy_increment_metric(id, delta) };
}

pub fn increment_metric(id: u32, delta: i64) {
    count(Kind::Metric);
    let _ = unsafe { proxy_increment_metric(id, delta) };
}

pub fn record_metric(id: u32, value: u64) {
    count(Kind::Metric);
    let _ = unsafe { proxy_record_metric(id, value) };
}

/// Sends a local response. `headers` is already in the proxy-wasm map wire form.
pub fn send_local_response(
    status: u32,
    headers: &[u8],
    body: &[u8],
    grpc_status: Option<u32>,
) -> u32 {
    count(Kind::LocalReply);
    let grpc = grpc_status
        .and_then(|s| i32::try_from(s).ok())
        .unwrap_or(-1);
    unsafe {
        proxy_send_local_response(
            status,
            core::ptr::null(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            grpc,
        )
    }
}
