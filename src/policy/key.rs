//! Client keys as slot hashes: one value, one bucket, and no way to aim at another client's.
//!
//! A rate limit or a breaker keyed by a client's header, path or authority hashes that value into
//! a fixed table of slots. Two things matter there. The hash is keyed by a secret made once per
//! deployment (in shared data, so every worker and every reload reads the same one): the policy
//! names are not secret, so a hash seeded by them alone lets a client compute offline which value
//! lands in a victim's slot. And parts that have a canonical form are hashed in that form, so a
//! client cannot get a fresh bucket by writing the same value another way (`/API//x` for
//! `/api/x`, `%61pi` for `api`, `Shop.Example.com:443` for `shop.example.com`).
//!
//! Hashing streams the normalised bytes through a small stack buffer: nothing is allocated.

#[allow(deprecated)]
use core::hash::{Hasher, SipHasher};

use super::route::without_query;
use crate::state::cas::Record;

/// The deployment's secret in shared data: made by the first worker that loads a config, read by
/// every other and by every reload, gone with Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Secret(pub u64);

impl Record<8> for Secret {
    /// Layout: deployment secret.
    const LAYOUT: u8 = 0x71;
    fn encode(&self) -> [u8; 8] {
        self.0.to_le_bytes()
    }

    fn decode(bytes: &[u8; 8]) -> Self {
        Secret(u64::from_le_bytes(*bytes))
    }
}

/// How a key part is read before it is hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// As it is (header values: `Alice` and `alice` are different users).
    Exact,
    /// A path: without its query, ASCII-lowercased, runs of `/` as one, and `%XX` of an
    /// unreserved character (letters, digits, `-`, `.`, `_`, `~`) decoded.
    Path,
    /// An authority: ASCII-lowercased, without its port.
    Authority,
    /// A client address: without its port (`10.0.0.1:5678`, `[::1]:5678`).
    Address,
}

/// A keyed hash over key parts, each ended by its normalised length so that no two splits of the
/// same bytes collide.
pub struct KeyHasher {
    #[allow(deprecated)]
    sip: SipHasher,
}

impl KeyHasher {
    /// `seed` tells policies apart (it comes from their names); `secret` is the deployment's.
    pub fn new(seed: u64, secret: u64) -> Self {
        #[allow(deprecated)]
        let sip = SipHasher::new_with_keys(seed, secret);
        KeyHasher { sip }
    }

    pub fn part(&mut self, value: &[u8], form: Form) {
        let length = match form {
            Form::Exact => {
                self.sip.write(value);
                value.len()
            }
            Form::Address => {
                let address = strip_address_port(value);
                self.sip.write(address);
                address.len()
            }
            Form::Authority | Form::Path => {
                let mut out = Chunk::default();
                normalise(value, form, |byte| out.push(byte, &mut self.sip));
                out.finish(&mut self.sip)
            }
        };
        self.sip.write_u64(length as u64);
    }

    pub fn finish(&self) -> u64 {
        self.sip.finish()
    }
}

/// Streams `value` in its canonical `form`, a byte at a time: what the hash sees, and what a
/// global limit's descriptor sends to the rate limit service.
pub fn normalise(value: &[u8], form: Form, mut emit: impl FnMut(u8)) {
    match form {
        Form::Exact => value.iter().for_each(|&byte| emit(byte)),
        Form::Address => strip_address_port(value)
            .iter()
            .for_each(|&byte| emit(byte)),
        Form::Authority => strip_authority_port(value)
            .iter()
            .for_each(|&byte| emit(byte.to_ascii_lowercase())),
        Form::Path => {
            let path = without_query(value);
            let (mut at, mut last) = (0, 0u8);
            while at < path.len() {
                let (byte, width) = match (path[at], decode_unreserved(&path[at..])) {
                    (b'%', Some(decoded)) => (decoded, 3),
                    (byte, _) => (byte, 1),
                };
                at += width;
                let byte = byte.to_ascii_lowercase();
                if !(byte == b'/' && last == b'/') {
                    emit(byte);
                }
                last = byte;
            }
        }
    }
}

/// Bytes on their way into the hasher, written in runs rather than one call per byte.
#[derive(Default)]
struct Chunk {
    bytes: [u8; 32],
    len: usize,
    total: usize,
}

impl Chunk {
    #[allow(deprecated)]
    fn push(&mut self, byte: u8, sip: &mut SipHasher) {
        if self.len == self.bytes.len() {
            sip.write(&self.bytes);
            self.len = 0;
        }
        self.bytes[self.len] = byte;
        self.len += 1;
        self.total += 1;
    }

    /// Writes what is left and returns how many bytes went in.
    #[allow(deprecated)]
    fn finish(self, sip: &mut SipHasher) -> usize {
        sip.write(&self.bytes[..self.len]);
        self.total
    }
}

/// The byte a `%XX` at the start of `text` stands for, if it is an unreserved character; any
/// other escape stays as written (decoding `%2F` would change the path's meaning).
fn decode_unreserved(text: &[u8]) -> Option<u8> {
    let hex = |digit: u8| char::from(digit).to_digit(16);
    let (high, low) = (hex(*text.get(1)?)?, hex(*text.get(2)?)?);
    let byte = u8::try_from(high * 16 + low).ok()?;
    (byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')).then_some(byte)
}

/// `Shop.example.com:443` -> `Shop.example.com`; `[::1]:8080` -> `[::1]`.
fn strip_authority_port(authority: &[u8]) -> &[u8] {
    if authority.first() == Some(&b'[') {
        return match authority.iter().position(|&b| b == b']') {
            Some(close) => &authority[..=close],
            None => authority,
        };
    }
    match authority.iter().position(|&b| b == b':') {
        Some(colon) => &authority[..colon],
        None => authority,
    }
}

/// `10.0.0.1:5678` -> `10.0.0.1`; `[::1]:5678` -> `::1`; a bare IPv6 address stays as it is.
pub fn strip_address_port(address: &[u8]) -> &[u8] {
    if address.first() == Some(&b'[') {
        let close = address
            .iter()
            .position(|&b| b == b']')
            .unwrap_or(address.len());
        return &address[1..close];
    }
    match address.iter().filter(|&&b| b == b':').count() {
        1 => address.split(|&b| b == b':').next().unwrap_or(address),
        _ => address,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn hash(parts: &[(&[u8], Form)], secret: u64) -> u64 {
        let mut hasher = KeyHasher::new(7, secret);
        for (value, form) in parts {
            hasher.part(value, *form);
        }
        hasher.finish()
    }

    /// Issue 14, point 8: variants of one authority or path each got a fresh bucket.
    #[test]
    fn variants_of_one_value_hash_alike() {
        let path = |p: &[u8]| hash(&[(p, Form::Path)], 1);
        assert_eq!(path(b"/api/items"), path(b"/API//items?x=1"));
        assert_eq!(path(b"/api/items"), path(b"/%61pi/%49tems"));
        assert_eq!(path(b"/api/items"), path(b"///api///items"));
        assert_ne!(
            path(b"/api/items"),
            path(b"/api%2Fitems"),
            "an escaped / stays"
        );
        assert_ne!(path(b"/api/items"), path(b"/api/item"));
        let authority = |a: &[u8]| hash(&[(a, Form::Authority)], 1);
        assert_eq!(
            authority(b"shop.example.com"),
            authority(b"Shop.Example.COM:443")
        );
        assert_eq!(authority(b"[::1]"), authority(b"[::1]:8080"));
        assert_ne!(
            authority(b"shop.example.com"),
            authority(b"shop.example.org")
        );
        let address = |a: &[u8]| hash(&[(a, Form::Address)], 1);
        assert_eq!(address(b"10.0.0.1"), address(b"10.0.0.1:5678"));
        assert_eq!(address(b"::1"), address(b"[::1]:5678"));
        let exact = |v: &[u8]| hash(&[(v, Form::Exact)], 1);
        assert_ne!(
            exact(b"Alice"),
            exact(b"alice"),
            "header values keep their case"
        );
    }

    /// Issue 14, point 8: the slot hash was seeded only by the plugin and policy names, which are
    /// not secret, so a colliding value could be found offline.
    #[test]
    fn the_deployment_secret_changes_every_hash() {
        let parts: &[(&[u8], Form)] = &[(b"alice", Form::Exact), (b"/x", Form::Path)];
        assert_ne!(hash(parts, 1), hash(parts, 2));
        assert_eq!(hash(parts, 1), hash(parts, 1));
    }

    #[test]
    fn parts_do_not_run_into_each_other() {
        let split = |a: &[u8], b: &[u8]| hash(&[(a, Form::Exact), (b, Form::Exact)], 1);
        assert_ne!(split(b"ab", b"c"), split(b"a", b"bc"));
        let long = [b'/'; 300];
        assert_eq!(
            hash(&[(&long, Form::Path)], 1),
            hash(&[(b"/", Form::Path)], 1)
        );
    }
}
