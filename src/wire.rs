//! The proxy-wasm header-map wire form, written into a buffer that is reused from reply to reply.
//!
//! Local replies carry headers whose values change per request (`Retry-After`, rate-limit
//! counters). Serializing them into a per-worker buffer, with numbers formatted on the stack, keeps
//! a rejection as allocation-free as an admission. It is pure byte shuffling, so it lives in the
//! core where native tests reach it; the host only hands the bytes to Envoy.

use crate::engine::{LocalReply, DEGRADED_HEADER};

/// The IETF draft's headers, lowercase as HTTP/2 requires.
pub const RATELIMIT_LIMIT: &str = "ratelimit-limit";
pub const RATELIMIT_REMAINING: &str = "ratelimit-remaining";
pub const RATELIMIT_RESET: &str = "ratelimit-reset";

/// A decimal number formatted on the stack.
#[derive(Debug, Clone, Copy)]
pub struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    pub fn new(mut value: u64) -> Self {
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        Decimal { digits, start }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.digits[self.start..]
    }
}

/// Serializes header maps for `proxy_send_local_response`.
#[derive(Debug, Default)]
pub struct ReplyBuffer {
    bytes: Vec<u8>,
}

impl ReplyBuffer {
    /// The reply's headers in wire form: a count, the pairs' lengths, then each name and value
    /// NUL-terminated. Reuses the buffer's capacity, so steady-state replies do not allocate.
    pub fn serialize(&mut self, reply: &LocalReply<'_>) -> &[u8] {
        let retry_after = reply.retry_after_seconds().map(Decimal::new);
        let rate_limit = reply.rate_limit.map(|status| {
            (
                Decimal::new(u64::from(status.limit)),
                Decimal::new(u64::from(status.remaining)),
                Decimal::new(status.reset_seconds()),
            )
        });
        let mut pairs: [(&[u8], &[u8]); 5] = [(b"", b""); 5];
        let mut extra = 0;
        if let Some(level) = reply.degraded {
            pairs[extra] = (DEGRADED_HEADER.as_bytes(), level.as_bytes());
            extra += 1;
        }
        if let Some(seconds) = &retry_after {
            pairs[extra] = (b"retry-after", seconds.as_bytes());
            extra += 1;
        }
        if let Some((limit, remaining, reset)) = &rate_limit {
            pairs[extra] = (RATELIMIT_LIMIT.as_bytes(), limit.as_bytes());
            pairs[extra + 1] = (RATELIMIT_REMAINING.as_bytes(), remaining.as_bytes());
            pairs[extra + 2] = (RATELIMIT_RESET.as_bytes(), reset.as_bytes());
            extra += 3;
        }
        let configured = reply
            .headers
            .iter()
            .map(|(n, v)| (n.as_bytes(), v.as_bytes()));
        let all = || pairs[..extra].iter().copied().chain(configured.clone());

        self.bytes.clear();
        let count = u32::try_from(all().count()).unwrap_or(u32::MAX);
        self.bytes.extend_from_slice(&count.to_le_bytes());
        for (name, value) in all() {
            let name_len = u32::try_from(name.len()).unwrap_or(u32::MAX);
            let value_len = u32::try_from(value.len()).unwrap_or(u32::MAX);
            self.bytes.extend_from_slice(&name_len.to_le_bytes());
            self.bytes.extend_from_slice(&value_len.to_le_bytes());
        }
        for (name, value) in all() {
            self.bytes.extend_from_slice(name);
            self.bytes.push(0);
            self.bytes.extend_from_slice(value);
            self.bytes.push(0);
        }
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::time::Duration;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn decimals_format_every_width() {
        for value in [0u64, 7, 10, 429, 1_000_000, u64::MAX] {
            assert_eq!(Decimal::new(value).as_bytes(), value.to_string().as_bytes());
        }
    }

    #[test]
    fn headers_serialize_in_the_proxy_wasm_map_form() {
        let headers = vec![("x-a".to_owned(), "1".to_owned())];
        let reply = LocalReply {
            degraded: None,
            status: 429,
            body: b"slow down",
            headers: &headers,
            retry_after: Some(Duration::from_millis(1500)),
            grpc_status: None,
            rate_limit: None,
        };
        let mut buffer = ReplyBuffer::default();
        let bytes = buffer.serialize(&reply).to_vec();
        let mut expected = Vec::new();
        expected.extend_from_slice(&2u32.to_le_bytes());
        for len in [11u32, 1, 3, 1] {
            expected.extend_from_slice(&len.to_le_bytes());
        }
        expected.extend_from_slice(b"retry-after\x002\x00x-a\x001\x00");
        assert_eq!(bytes, expected);
    }

    #[test]
    fn the_level_in_force_is_a_header_of_its_own() {
        let reply = LocalReply {
            degraded: Some("critical"),
            status: 503,
            body: b"",
            headers: &[],
            retry_after: None,
            grpc_status: None,
            rate_limit: None,
        };
        let mut expected = Vec::new();
        expected.extend_from_slice(&1u32.to_le_bytes());
        for len in [18u32, 8] {
            expected.extend_from_slice(&len.to_le_bytes());
        }
        expected.extend_from_slice(b"x-seawall-degraded\x00critical\x00");
        assert_eq!(
            ReplyBuffer::default().serialize(&reply),
            expected.as_slice()
        );
    }

    #[test]
    fn no_headers_is_a_zero_count() {
        let reply = LocalReply {
            degraded: None,
            status: 503,
            body: b"",
            headers: &[],
            retry_after: None,
            grpc_status: None,
            rate_limit: None,
        };
        assert_eq!(
            ReplyBuffer::default().serialize(&reply),
            &0u32.to_le_bytes()
        );
    }
}
