//! The protobuf of Envoy's rate limit service, by hand: the few fields a lease needs.
//!
//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` takes a `RateLimitRequest` and
//! answers a `RateLimitResponse`. Seawall writes only `domain` (1), `descriptors` (2, each with
//! `entries` (1) of `key` (1) and `value` (2)) and `hits_addend` (3), and reads only
//! `overall_code` (1) and the first status's `limit_remaining` (3) and `duration_until_reset` (4),
//! skipping every other field as protobuf requires. A generated codec (prost) would bring
//! `alloc`-heavy types and a build dependency into the Wasm module for five fields; this runs
//! only on the tick, never on the request path. The rls crate's tests check both directions
//! against the generated types of `envoy-types`.

use core::fmt;
use core::time::Duration;

/// `RateLimitResponse.Code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Unknown,
    Ok,
    OverLimit,
}

/// What seawall reads of a `RateLimitResponse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub code: Code,
    /// The first descriptor's `limit_remaining`, when the service said when its window resets
    /// (`duration_until_reset`): proto3 cannot tell a remaining 0 from an absent one, and
    /// services that fill in the one fill in the other.
    pub remaining: Option<u32>,
    pub reset_in: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    Truncated,
    BadWireType(u8),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("truncated RateLimitResponse"),
            DecodeError::BadWireType(t) => write!(f, "unsupported protobuf wire type {t}"),
        }
    }
}

impl std::error::Error for DecodeError {}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, u64::from(field << 3 | 2));
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Encodes a `RateLimitRequest` with one descriptor of `entries`.
pub fn encode_request<'a>(
    domain: &str,
    entries: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    hits_addend: u32,
) -> Vec<u8> {
    let mut descriptor = Vec::new();
    for (key, value) in entries {
        let mut entry = Vec::with_capacity(key.len() + value.len() + 4);
        put_bytes(&mut entry, 1, key);
        put_bytes(&mut entry, 2, value);
        put_bytes(&mut descriptor, 1, &entry);
    }
    let mut out = Vec::with_capacity(domain.len() + descriptor.len() + 16);
    put_bytes(&mut out, 1, domain.as_bytes());
    put_bytes(&mut out, 2, &descriptor);
    if hits_addend > 0 {
        put_varint(&mut out, 3 << 3);
        put_varint(&mut out, u64::from(hits_addend));
    }
    out
}

/// A protobuf reader over one message's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Skipped,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.bytes.split_first().ok_or(DecodeError::Truncated)?;
            self.bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(DecodeError::Truncated)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.bytes.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    /// The next field's number and value, `None` at the end.
    fn field(&mut self) -> Result<Option<(u64, Value<'a>)>, DecodeError> {
        if self.bytes.is_empty() {
            return Ok(None);
        }
        let tag = self.varint()?;
        let value = match (tag & 7) as u8 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Skipped
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| DecodeError::Truncated)?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Skipped
            }
            other => return Err(DecodeError::BadWireType(other)),
        };
        Ok(Some((tag >> 3, value)))
    }
}

fn code(value: u64) -> Code {
    match value {
        1 => Code::Ok,
        2 => Code::OverLimit,
        _ => Code::Unknown,
    }
}

/// Decodes what seawall needs of a `RateLimitResponse`.
pub fn decode_response(bytes: &[u8]) -> Result<Verdict, DecodeError> {
    let mut reader = Reader { bytes };
    let mut verdict = Verdict {
        code: Code::Unknown,
        remaining: None,
        reset_in: None,
    };
    let mut first_status = true;
    while let Some((field, value)) = reader.field()? {
        match (field, value) {
            (1, Value::Varint(value)) => verdict.code = code(value),
            (2, Value::Bytes(status)) if first_status => {
                first_status = false;
                let (remaining, reset_in) = decode_status(status)?;
                verdict.reset_in = reset_in;
                verdict.remaining = reset_in.map(|_| remaining);
            }
            _ => {}
        }
    }
    Ok(verdict)
}

fn decode_status(bytes: &[u8]) -> Result<(u32, Option<Duration>), DecodeError> {
    let mut reader = Reader { bytes };
    let mut remaining = 0;
    let mut reset_in = None;
    while let Some((field, value)) = reader.field()? {
        match (field, value) {
            (3, Value::Varint(value)) => remaining = u32::try_from(value).unwrap_or(u32::MAX),
            (4, Value::Bytes(duration)) => reset_in = Some(decode_duration(duration)?),
            _ => {}
        }
    }
    Ok((remaining, reset_in))
}

/// A `google.protobuf.Duration`; a negative one reads as zero.
fn decode_duration(bytes: &[u8]) -> Result<Duration, DecodeError> {
    let mut reader = Reader { bytes };
    let (mut seconds, mut nanos) = (0i64, 0i64);
    while let Some((field, value)) = reader.field()? {
        match (field, value) {
            (1, Value::Varint(value)) => seconds = value as i64,
            (2, Value::Varint(value)) => nanos = i64::from(value as i32),
            _ => {}
        }
    }
    let seconds = u64::try_from(seconds).unwrap_or(0);
    let nanos = u32::try_from(nanos.clamp(0, 999_999_999)).unwrap_or(0);
    Ok(Duration::new(seconds, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn a_request_encodes_its_fields_in_order() {
        let bytes = encode_request("d", [(&b"k"[..], &b"v"[..])], 300);
        assert_eq!(
            bytes,
            [0x0a, 1, b'd', 0x12, 8, 0x0a, 6, 0x0a, 1, b'k', 0x12, 1, b'v', 0x18, 0xac, 0x02]
        );
    }

    #[test]
    fn a_response_decodes_and_unknown_fields_are_skipped() {
        // overall_code OVER_LIMIT; a status with code 2, current_limit {..}, remaining 7,
        // duration_until_reset {seconds 1, nanos 500}; then a fixed64 and a fixed32 field.
        let status = [
            0x08, 2, 0x12, 2, 0x08, 5, 0x18, 7, 0x22, 5, 0x08, 1, 0x10, 0xf4, 0x03,
        ];
        let mut bytes = vec![0x08, 2, 0x12, status.len() as u8];
        bytes.extend_from_slice(&status);
        bytes.extend_from_slice(&[0x39, 0, 0, 0, 0, 0, 0, 0, 0, 0x45, 0, 0, 0, 0]);
        let verdict = decode_response(&bytes).unwrap();
        assert_eq!(
            verdict,
            Verdict {
                code: Code::OverLimit,
                remaining: Some(7),
                reset_in: Some(Duration::new(1, 500)),
            }
        );
        assert_eq!(
            decode_response(&[0x08, 1]).unwrap(),
            Verdict {
                code: Code::Ok,
                remaining: None,
                reset_in: None
            }
        );
        assert_eq!(decode_response(&[]).unwrap().code, Code::Unknown);
    }

    #[test]
    fn a_truncated_response_is_an_error() {
        assert_eq!(
            decode_response(&[0x12, 5, 0x08]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(decode_response(&[0x08]), Err(DecodeError::Truncated));
        assert_eq!(decode_response(&[0x0b]), Err(DecodeError::BadWireType(3)));
    }
}
