//! Request attributes of any bytes and any length through the route matcher and the client-key
//! hash, exactly as the engine runs them: `Engine::on_request` over a `RequestView`, and the
//! engine's own `key_hash`.
//!
//! Beyond "never panics", it checks what `request.rs` and `policy/key.rs` promise:
//! - reading the whole header map in one host call and reading headers one by one give the same
//!   route and the same keys (the first value of a repeated header counts either way);
//! - a header-valued key part is hashed as it is: two different values never share a hash (the
//!   hash is SipHash over the bytes and their length; a collision found by a fuzzer is a bug, not
//!   luck);
//! - a path or authority key part is hashed in its canonical form: changing only the case, or
//!   doubling slashes in the path, or adding a port to the authority, gives the same hash;
//! - a malformed header map from the host yields only ranges inside the buffer.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

use seawall::clock::Timestamp;
use seawall::config::shared::KeyPart;
use seawall::config::{compile, PluginConfig};
use seawall::engine::{key_hash, Engine};
use seawall::metrics::FakeMetrics;
use seawall::policy::circuit_breaker::ResponseFacts;
use seawall::policy::rate_limit::Buckets;
use seawall::request::{
    encode_header_map, Attribute, AttributeSource, HeaderPairs, RequestView, Scratch,
};
use seawall::state::fake::FakeStore;

/// Configs that read every kind of attribute: header matches of every form, methods, authority
/// with and without a port, Envoy's route name, and keys from a header, the path, the authority
/// and the client address.
const CONFIGS: [&str; 3] = [
    r#"{"name": "fz1",
        "routes": [
          {"name": "exact", "match": {"path": {"exact": "/a"}, "methods": ["GET", "POST"],
                                      "headers": [{"name": "x-tier", "exact": "free"}]},
           "rate_limits": ["per-user"]},
          {"name": "host", "match": {"authority": "Shop.Example.com", "headers": [{"name": "x-canary", "present": true}]},
           "rate_limits": ["per-path"], "circuit_breaker": "by-header"},
          {"name": "port", "match": {"authority": "[::1]:8080", "headers": [{"name": "x-canary", "present": false}]},
           "rate_limits": ["per-ip"]},
          {"name": "prefix", "match": {"path": {"prefix": "/api"}, "headers": [{"name": "x-user-id", "prefix": "u-"}]},
           "rate_limits": ["per-user", "per-path"], "retry": "budget", "faults": ["chaos"]},
          {"name": "envoy", "match": {"route_name": "r1", "cluster": "c1"}, "rate_limits": ["per-user"]},
          {"name": "rest", "rate_limits": ["per-user"]}
        ],
        "rate_limits": {
          "per-user": {"rate": "5/s", "burst": 3, "key": [{"header": "x-user-id"}], "max_keys": 16},
          "per-path": {"rate": "5/s", "burst": 3, "key": ["path", "authority", {"header": "x-user-id"}],
                       "max_keys": 16, "on_missing_key": "skip"},
          "per-ip": {"rate": "1/s", "burst": 1, "key": ["client_ip", "method", "route_name"], "max_keys": 8}
        },
        "circuit_breakers": {
          "by-header": {"key": {"header": "x-tenant"}, "max_keys": 8,
                        "open_when": {"consecutive_failures": 2}, "open_for": "1s", "half_open_probes": 1}
        },
        "retries": {"budget": {"max_retries": 2, "idempotency_header": "idempotency-key"}},
        "faults": {"chaos": {"abort": {"status": 503, "percent": 50}, "cohort": {"key": [{"header": "x-user-id"}]},
                             "max_active": 4,
                             "header_control": {"secret_header": "x-chaos-key", "secret": "s3cret-fuzz-of-16b", "max_percent": 100}}}
       }"#,
    r#"{"name": "fz2",
        "routes": [{"name": "only", "match": {"headers": [{"name": "x-user-id", "present": true}]},
                    "rate_limits": ["one-header"]}],
        "rate_limits": {"one-header": {"rate": "2/s", "burst": 2, "key": [{"header": "x-user-id"}], "max_keys": 4}}
       }"#,
    r#"{"name": "fz3",
        "routes": [{"name": "shop", "match": {"path": {"prefix": "/shop"}}, "degradation": "shop"},
                   {"name": "other", "priority": "critical", "degradation": "shop"}],
        "degradation": {"shop": {"priority": {"header": "x-priority", "default": "normal"},
                                 "levels": [{"name": "degraded", "enter": {"failure_rate": 20},
                                             "shed_below": "normal",
                                             "reroute": {"cluster": "fallback"}}]}}
       }"#,
];

/// A request source over the fuzzer's attributes: first value of a name wins, as in Envoy; the
/// header map is the honest encoding of the headers, or raw bytes from the fuzzer.
#[derive(Clone)]
struct Source {
    values: Vec<(Attribute, Vec<u8>)>,
    serves_map: bool,
    raw_map: Option<Vec<u8>>,
}

impl AttributeSource for Source {
    fn read(&mut self, attribute: &Attribute) -> Option<Vec<u8>> {
        self.values
            .iter()
            .find(|(a, _)| a == attribute)
            .map(|(_, v)| v.clone())
    }

    fn read_header_map(&mut self) -> Option<Vec<u8>> {
        if let Some(raw) = &self.raw_map {
            return Some(raw.clone());
        }
        if !self.serves_map {
            return None;
        }
        let headers = self.values.iter().filter_map(|(a, v)| match a {
            Attribute::Header(name) => Some((name.as_bytes(), v.as_slice())),
            Attribute::Property(_) => None,
        });
        Some(encode_header_map(headers))
    }

    fn remove_header(&mut self, name: &str) {
        let header = Attribute::header(name);
        self.values.retain(|(a, _)| *a != header);
    }
}

#[derive(Arbitrary, Debug)]
enum Name {
    Path,
    Method,
    Authority,
    UserId,
    Tier,
    Canary,
    Tenant,
    Priority,
    ChaosKey,
    ChaosPercent,
    ContentType,
    Idempotency,
    Other(String),
}

impl Name {
    fn attribute(&self) -> Attribute {
        let name = match self {
            Name::Path => ":path",
            Name::Method => ":method",
            Name::Authority => ":authority",
            Name::UserId => "x-user-id",
            Name::Tier => "x-tier",
            Name::Canary => "x-canary",
            Name::Tenant => "x-tenant",
            Name::Priority => "x-priority",
            Name::ChaosKey => "x-chaos-key",
            Name::ChaosPercent => "x-seawall-fault-percent",
            Name::ContentType => "content-type",
            Name::Idempotency => "idempotency-key",
            Name::Other(name) => name.as_str(),
        };
        Attribute::header(name)
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    config: u8,
    /// Headers in order; a name may repeat.
    headers: Vec<(Name, Vec<u8>)>,
    route_name: Option<Vec<u8>>,
    cluster: Option<Vec<u8>>,
    client: Option<Vec<u8>>,
    /// Raw bytes the host hands back as the header map instead of an honest encoding.
    raw_map: Option<Vec<u8>>,
    /// Another value for `x-user-id`, for the distinctness check.
    other_user: Vec<u8>,
    now_ms: u32,
    /// What the upstream answered, for the stream's end.
    status: Option<u16>,
}

/// The response as the stream's end reports it.
struct Answered(Option<u16>);

impl ResponseFacts for Answered {
    fn status(&mut self) -> Option<u16> {
        self.0
    }
    fn flags(&mut self) -> u64 {
        0
    }
    fn grpc_status(&mut self) -> Option<u32> {
        None
    }
}

struct Compiled {
    engine: Engine,
    metrics: FakeMetrics,
}

thread_local! {
    static ENGINES: Vec<Compiled> = CONFIGS
        .iter()
        .map(|json| {
            let config = compile(json.as_bytes())
                .unwrap_or_else(|errors| panic!("fuzz config does not compile: {errors:?}"));
            let mut metrics = FakeMetrics::new();
            let engine = Engine::new(config, &mut metrics).expect("metrics");
            Compiled { engine, metrics }
        })
        .collect();
}

const SECRET: u64 = 0x5ea_f022;

fn source(input: &Input, user: Option<&[u8]>, serves_map: bool) -> Source {
    let mut values = Vec::new();
    for (name, value) in &input.headers {
        let attribute = name.attribute();
        let value = match (&attribute, user) {
            (Attribute::Header(n), Some(user)) if n == "x-user-id" => user.to_vec(),
            _ => value.clone(),
        };
        values.push((attribute, value));
    }
    for (attribute, value) in [
        (Attribute::route_name(), &input.route_name),
        (Attribute::cluster_name(), &input.cluster),
        (Attribute::client_address(), &input.client),
    ] {
        if let Some(value) = value {
            values.push((attribute, value.clone()));
        }
    }
    Source {
        values,
        serves_map,
        raw_map: None,
    }
}

/// The route and every rate limit's key hash for one request, read through one view.
fn route_and_keys(config: &PluginConfig, mut source: Source) -> (Option<u16>, Vec<Option<u64>>) {
    let mut scratch = Scratch::for_plan(&config.attributes);
    let mut view = RequestView::new(&config.attributes, &mut source, &mut scratch);
    let route = config.routes.find(&mut view).map(|index| index.0);
    let keys = config
        .rate_limits
        .iter()
        .map(|policy| match &policy.buckets {
            Buckets::Keyed { seed, .. } => key_hash(&policy.key, &mut view, *seed, SECRET),
            Buckets::Single { .. } => None,
        })
        .collect();
    (route, keys)
}

fn first_user(input: &Input) -> Option<&[u8]> {
    input
        .headers
        .iter()
        .find(|(name, _)| matches!(name, Name::UserId))
        .map(|(_, value)| value.as_slice())
}

fuzz_target!(|input: Input| {
    ENGINES.with(|engines| {
        let compiled = &engines[usize::from(input.config) % engines.len()];
        let config = compiled.engine.config();

        // The engine as the host drives it, on a fresh store, twice (the second request sees the
        // first one's records).
        let store = FakeStore::new();
        compiled
            .engine
            .prepare_state(&store, SECRET)
            .expect("prepare_state on a fake store");
        let now = 1_700_000_000_000_000_000 + u64::from(input.now_ms) * 1_000_000;
        for serves_map in [true, false] {
            let mut request = source(&input, None, serves_map);
            request.raw_map = input.raw_map.clone();
            let mut scratch = Scratch::for_plan(&config.attributes);
            let mut view = RequestView::new(&config.attributes, &mut request, &mut scratch);
            let decision = compiled.engine.on_request(
                &mut view,
                Timestamp::from_nanos(now),
                &store,
                &compiled.metrics,
            );
            drop(view);
            compiled.engine.on_stream_end(
                &decision.stream,
                &mut Answered(input.status),
                Timestamp::from_nanos(now + 1),
                &store,
                &compiled.metrics,
            );
        }

        // One read of the whole map or one read per header: the same route, the same keys.
        let by_map = route_and_keys(config, source(&input, None, true));
        let one_by_one = route_and_keys(config, source(&input, None, false));
        assert_eq!(by_map, one_by_one, "header map and single reads disagree");

        // A header-valued key tells every two values apart.
        if let Some(user) = first_user(&input) {
            if user != input.other_user.as_slice() {
                let (_, mine) = route_and_keys(config, source(&input, Some(user), false));
                let (_, theirs) =
                    route_and_keys(config, source(&input, Some(&input.other_user), false));
                let user_header = Attribute::header("x-user-id");
                for (policy, (a, b)) in config.rate_limits.iter().zip(mine.iter().zip(&theirs)) {
                    let keyed_by_user = policy.key.iter().any(|part| {
                        matches!(part, KeyPart::Raw(id) if config.attributes.get(*id) == Some(&user_header))
                    });
                    if let (true, Some(a), Some(b)) = (keyed_by_user, a, b) {
                        assert_ne!(
                            a, b,
                            "{}: x-user-id {:?} and {:?} share a key hash",
                            policy.name, user, input.other_user
                        );
                    }
                }
            }
        }

        // Canonical forms: case, doubled slashes and a port do not make a new key.
        let canonical = |input: &Input| {
            let mut variant = source(input, None, false);
            for (attribute, value) in &mut variant.values {
                if *attribute == Attribute::path() {
                    let mut doubled = Vec::new();
                    for &b in value.iter() {
                        doubled.push(b.to_ascii_uppercase());
                        if b == b'/' {
                            doubled.push(b'/');
                        }
                    }
                    *value = doubled;
                } else if *attribute == Attribute::authority() {
                    value.make_ascii_uppercase();
                }
            }
            variant
        };
        let plain = route_and_keys(config, source(&input, None, false)).1;
        let variant = route_and_keys(config, canonical(&input)).1;
        for ((policy, a), b) in config.rate_limits.iter().zip(&plain).zip(&variant) {
            // Only keys made of path, authority and client parts are case-blind; a header part
            // keeps its case, and the variant leaves headers alone.
            assert_eq!(a.is_some(), b.is_some(), "{}: a variant lost a key part", policy.name);
            if policy.name == "per-path" {
                assert_eq!(a, b, "{}: a variant of the path or authority", policy.name);
            }
        }

        // Raw header maps from the host: every range inside the buffer.
        if let Some(raw) = &input.raw_map {
            for (name, range) in HeaderPairs::new(raw) {
                assert!(range.end < raw.len() && range.start <= range.end, "{range:?}");
                let _ = name;
            }
        }
    });
});
