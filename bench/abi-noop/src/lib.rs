//! The benchmark's lowest floor: a pass-through proxy-wasm HTTP filter that exports the ABI
//! (0.2.1) by hand, with no SDK. What it costs over no filter at all is what Envoy's Wasm
//! machinery costs per request: one VM call per callback Envoy makes. The SDK no-op filter
//! (`bench/noop`) costs that plus the SDK's dispatch and its per-stream context, so the two
//! together split a Wasm filter's floor into the host's share and the SDK's.
//!
//! It makes no host call at all: every callback returns at once. Envoy 1.40 (proxy-wasm-cpp-host)
//! needs only an ABI version marker and an allocator export (`malloc`, or as here and in the SDK
//! 0.2.5 on wasm32-wasip1, `proxy_on_memory_allocate`) to load a module; it calls whichever `proxy_on_*` exports it finds and treats a missing one as "continue".
//! The ones exported here are those Envoy calls for every HTTP stream, plus the root context's
//! start and configure, which must answer true for the plugin to load.

#![cfg(target_arch = "wasm32")]

use std::alloc::{alloc, Layout};

/// The ABI this module speaks; the host reads it from the export's name.
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Memory for data the host hands the guest (the host's `malloc`; the SDK exports the same name on
/// wasm32-wasip1, where `malloc` itself is libc's). This filter asks for no data (it reads no
/// header, no configuration), so Envoy never calls it, but it refuses a module without it.
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    match Layout::from_size_align(size.max(1), 8) {
        // SAFETY: the layout's size is not zero.
        Ok(layout) => unsafe { alloc(layout) },
        Err(_) => std::ptr::null_mut(),
    }
}

/// The VM's start: nothing to set up.
#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root_context_id: u32, _vm_configuration_size: u32) -> u32 {
    1
}

/// The plugin's configuration: none is read.
#[no_mangle]
pub extern "C" fn proxy_on_configure(_root_context_id: u32, _configuration_size: u32) -> u32 {
    1
}

/// A new context, the root one or a stream's: no state to keep.
#[no_mangle]
pub extern "C" fn proxy_on_context_create(_context_id: u32, _parent_context_id: u32) {}

/// `Action::Continue` (0) from every HTTP callback.
const CONTINUE: u32 = 0;

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(
    _context_id: u32,
    _headers: u32,
    _end_of_stream: u32,
) -> u32 {
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

/// True: the context is done at once, and the host may delete it.
#[no_mangle]
pub extern "C" fn proxy_on_done(_context_id: u32) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(_context_id: u32) {}
