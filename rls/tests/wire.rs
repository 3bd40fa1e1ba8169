//! seawall's hand-written codec for the RLS messages (`policy::rls_wire`), checked against the
//! prost types that `envoy-types` generates from Envoy's protos: what seawall sends decodes as
//! the request it means, and what an RLS sends decodes as the verdict it means.

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use prost::Message;
use seawall::policy::rls_wire::{self, Verdict};
use std::time::Duration;

#[test]
fn a_lease_request_decodes_as_the_generated_type() {
    let entries = vec![
        ("generic_key".to_owned(), "checkout".to_owned()),
        ("tier".to_owned(), "ü".repeat(100)),
    ];
    for hits in [0, 1, 127, 128, 300, u32::MAX] {
        let bytes = rls_wire::encode_request(
            "edge",
            entries.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())),
            hits,
        );
        let request = RateLimitRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(request.domain, "edge");
        assert_eq!(request.hits_addend, hits);
        assert_eq!(request.descriptors.len(), 1);
        let decoded: Vec<(String, String)> = request.descriptors[0]
            .entries
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect();
        assert_eq!(decoded, entries);
        // And byte for byte what prost writes.
        assert_eq!(request.encode_to_vec(), bytes);
    }
}

#[test]
fn a_generated_response_decodes_as_the_verdict_it_means() {
    let status = |code: Code, remaining, reset: Option<(i64, i32)>| DescriptorStatus {
        code: code as i32,
        current_limit: Some(RateLimit {
            name: "global".into(),
            requests_per_unit: 100,
            unit: Unit::Second as i32,
        }),
        limit_remaining: remaining,
        duration_until_reset: reset.map(|(seconds, nanos)| PbDuration { seconds, nanos }),
        ..Default::default()
    };
    let cases = [
        (
            RateLimitResponse {
                overall_code: Code::Ok as i32,
                statuses: vec![status(Code::Ok, 40, Some((0, 250_000_000)))],
                response_headers_to_add: vec![HeaderValue {
                    key: "x-ratelimit".into(),
                    value: "1".into(),
                    ..Default::default()
                }],
                raw_body: vec![1, 2, 3],
                ..Default::default()
            },
            Verdict {
                code: rls_wire::Code::Ok,
                remaining: Some(40),
                reset_in: Some(Duration::from_millis(250)),
            },
        ),
        (
            RateLimitResponse {
                overall_code: Code::OverLimit as i32,
                statuses: vec![
                    status(Code::OverLimit, 0, Some((3, 0))),
                    status(Code::Ok, 99, Some((1, 0))),
                ],
                ..Default::default()
            },
            Verdict {
                code: rls_wire::Code::OverLimit,
                remaining: Some(0),
                reset_in: Some(Duration::from_secs(3)),
            },
        ),
        (
            RateLimitResponse {
                overall_code: Code::Ok as i32,
                ..Default::default()
            },
            Verdict {
                code: rls_wire::Code::Ok,
                remaining: None,
                reset_in: None,
            },
        ),
        (
            RateLimitResponse::default(),
            Verdict {
                code: rls_wire::Code::Unknown,
                remaining: None,
                reset_in: None,
            },
        ),
    ];
    for (response, expected) in cases {
        let bytes = response.encode_to_vec();
        assert_eq!(
            rls_wire::decode_response(&bytes),
            Ok(expected),
            "{response:?}"
        );
    }
}
