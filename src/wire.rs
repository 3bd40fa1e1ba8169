//! The proxy-wasm header-map wire form: read in place from the host's buffer ([`HeaderPairs`]),
//! and written into a buffer that is reused from reply to reply.
//!
//! Local replies carry headers whose values change per request (`Retry-After`, rate-limit
//! counters). Serializing them into a per-worker buffer, with numbers formatted on the stack, keeps
//! a rejection as allocation-free as an admission. It is pure byte shuffling, so it lives in the
//! core where native tests reach it; the host only hands the bytes to Envoy.

use crate::config::rate_limit::RateLimitHeaderForm;
use crate::engine::{LocalReply, DEGRADED_HEADER};

/// The IETF draft's headers, lowercase as HTTP/2 requires.
pub const RATELIMIT_LIMIT: &str = "ratelimit-limit";
pub const RATELIMIT_REMAINING: &str = "ratelimit-remaining";
pub const RATELIMIT_RESET: &str = "ratelimit-reset";
/// The combined form: `RateLimit: limit=10, remaining=3, reset=2`.
pub const RATELIMIT: &str = "ratelimit";

/// The combined `RateLimit` value, formatted on the stack.
#[derive(Debug, Clone, Copy)]
pub struct CombinedRateLimit {
    bytes: [u8; 96],
    len: usize,
}

impl CombinedRateLimit {
    pub fn new(limit: u64, remaining: u64, reset: u64) -> Self {
        let mut out = CombinedRateLimit {
            bytes: [0; 96],
            len: 0,
        };
        for (name, value) in [
            (&b"limit="[..], limit),
            (b", remaining=", remaining),
            (b", reset=", reset),
        ] {
            out.push(name);
            out.push(Decimal::new(value).as_bytes());
        }
        out
    }

    fn push(&mut self, part: &[u8]) {
        // 6 + 12 + 8 bytes of names and three numbers of at most 20 digits fit in 96.
        if let Some(room) = self.bytes.get_mut(self.len..self.len + part.len()) {
            room.copy_from_slice(part);
            self.len += part.len();
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

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
                status.form,
                Decimal::new(u64::from(status.limit)),
                Decimal::new(u64::from(status.remaining)),
                Decimal::new(status.reset_seconds()),
            )
        });
        let combined = reply.rate_limit.map(|status| {
            CombinedRateLimit::new(
                u64::from(status.limit),
                u64::from(status.remaining),
                status.reset_seconds(),
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
        match (&rate_limit, &combined) {
            (Some((RateLimitHeaderForm::Combined, ..)), Some(combined)) => {
                pairs[extra] = (RATELIMIT.as_bytes(), combined.as_bytes());
                extra += 1;
            }
            (Some((RateLimitHeaderForm::Separate, limit, remaining, reset)), _) => {
                pairs[extra] = (RATELIMIT_LIMIT.as_bytes(), limit.as_bytes());
                pairs[extra + 1] = (RATELIMIT_REMAINING.as_bytes(), remaining.as_bytes());
                pairs[extra + 2] = (RATELIMIT_RESET.as_bytes(), reset.as_bytes());
                extra += 3;
            }
            _ => {}
        }
        let configured = reply
            .headers
            .iter()
            .map(|(n, v)| (n.as_bytes(), v.as_bytes()));
        let all = pairs[..extra].iter().copied().chain(configured);

        self.bytes.clear();
        write_header_map(&mut self.bytes, all);
        &self.bytes
    }
}

/// The pairs of a header map in proxy-wasm's wire form: a little-endian `u32` count, then a
/// `u32` name length and a `u32` value length per pair, then each name and value followed by a
/// NUL. Yields each pair's name and the value's byte range in the buffer; stops at the first
/// length that runs past the end, so a malformed buffer yields what it holds and no more.
pub struct HeaderPairs<'b> {
    buffer: &'b [u8],
    remaining: usize,
    /// Where the next pair's two lengths are.
    lengths_at: usize,
    /// Where the next pair's name starts.
    data_at: usize,
}

impl<'b> HeaderPairs<'b> {
    pub fn new(buffer: &'b [u8]) -> Self {
        let count = read_u32(buffer, 0).map_or(0, |n| n as usize);
        // A count the buffer cannot hold is malformed: nothing is read from it.
        let lengths_end = count
            .checked_mul(8)
            .and_then(|n| n.checked_add(4))
            .filter(|&end| end <= buffer.len());
        match lengths_end {
            Some(data_at) => HeaderPairs {
                buffer,
                remaining: count,
                lengths_at: 4,
                data_at,
            },
            None => HeaderPairs {
                buffer,
                remaining: 0,
                lengths_at: 0,
                data_at: 0,
            },
        }
    }
}

fn read_u32(buffer: &[u8], at: usize) -> Option<u32> {
    let bytes = buffer.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

impl<'b> Iterator for HeaderPairs<'b> {
    type Item = (&'b [u8], core::ops::Range<usize>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let name_len = read_u32(self.buffer, self.lengths_at)? as usize;
        let value_len = read_u32(self.buffer, self.lengths_at + 4)? as usize;
        self.lengths_at += 8;
        let name_end = self.data_at.checked_add(name_len)?;
        let value_start = name_end.checked_add(1)?;
        let value_end = value_start.checked_add(value_len)?;
        if value_end >= self.buffer.len() {
            self.remaining = 0;
            return None;
        }
        let name = self.buffer.get(self.data_at..name_end)?;
        self.data_at = value_end + 1;
        Some((name, value_start..value_end))
    }
}

/// Encodes `pairs` in the header map wire form into a new buffer: for tests and fakes.
pub fn encode_header_map<'p>(pairs: impl Iterator<Item = (&'p [u8], &'p [u8])> + Clone) -> Vec<u8> {
    let mut out = Vec::new();
    write_header_map(&mut out, pairs);
    out
}

/// Writes `pairs` in the header map wire form at the end of `out`: a count, the pairs' lengths,
/// then each name and value NUL-terminated.
pub fn write_header_map<'p>(
    out: &mut Vec<u8>,
    pairs: impl Iterator<Item = (&'p [u8], &'p [u8])> + Clone,
) {
    let count = u32::try_from(pairs.clone().count()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_le_bytes());
    for (name, value) in pairs.clone() {
        let name_len = u32::try_from(name.len()).unwrap_or(u32::MAX);
        let value_len = u32::try_from(value.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&name_len.to_le_bytes());
        out.extend_from_slice(&value_len.to_le_bytes());
    }
    for (name, value) in pairs {
        out.extend_from_slice(name);
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::time::Duration;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn the_combined_form_is_one_header_with_every_number() {
        assert_eq!(
            CombinedRateLimit::new(10, 3, 2).as_bytes(),
            b"limit=10, remaining=3, reset=2"
        );
        let widest = CombinedRateLimit::new(u64::MAX, u64::MAX, u64::MAX);
        let expected = format!("limit={0}, remaining={0}, reset={0}", u64::MAX);
        assert_eq!(widest.as_bytes(), expected.as_bytes());
        let status = |form| crate::engine::RateLimitStatus {
            limit: 10,
            remaining: 0,
            reset: Duration::from_millis(1500),
            form,
        };
        let reply = |form| LocalReply {
            degraded: None,
            status: 429,
            body: b"",
            headers: &[],
            retry_after: Some(Duration::from_millis(100)),
            grpc_status: None,
            rate_limit: Some(status(form)),
        };
        let mut buffer = ReplyBuffer::default();
        let combined = buffer
            .serialize(&reply(RateLimitHeaderForm::Combined))
            .to_vec();
        let pairs: Vec<(&[u8], &[u8])> = HeaderPairs::new(&combined)
            .map(|(name, range)| (name, &combined[range]))
            .collect();
        assert_eq!(
            pairs,
            [
                (&b"retry-after"[..], &b"1"[..]),
                (b"ratelimit", b"limit=10, remaining=0, reset=2")
            ]
        );
        let separate = buffer
            .serialize(&reply(RateLimitHeaderForm::Separate))
            .to_vec();
        let names: Vec<&[u8]> = HeaderPairs::new(&separate).map(|(name, _)| name).collect();
        assert_eq!(
            names,
            [
                &b"retry-after"[..],
                b"ratelimit-limit",
                b"ratelimit-remaining",
                b"ratelimit-reset"
            ]
        );
    }

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
