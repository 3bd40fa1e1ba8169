//! Structure-aware configs: JSON shaped like seawall's config (routes and every policy section,
//! with the fields the compiler knows), filled with plausible and implausible values, stray
//! fields and wrong types, so the fuzzer spends its time in `compile`'s checks rather than in
//! the JSON parser.
//!
//! Asserts: `compile` returns a config or errors and never panics; an error names a path that
//! exists in the document or the document itself; a config that compiles compiles again to an
//! equal config, and builds an `Engine` (its metric names) without panicking.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

use seawall::config::compile;
use seawall::engine::Engine;
use seawall::metrics::FakeMetrics;

const NAMES: &[&str] = &[
    "a", "per-user", "global", "payments", "x_1", "", "bad name", "é",
];
const DURATIONS: &[&str] = &[
    "0s",
    "1ms",
    "250ms",
    "2s",
    "10s",
    "1m",
    "1h",
    "24h",
    "-1s",
    "1.5s",
    "9999999999h",
    "s",
    "10",
];
const RATES: &[&str] = &[
    "10/s",
    "1/m",
    "5/h",
    "0/s",
    "1000000000/s",
    "-1/s",
    "1/d",
    "/s",
    "x",
];
const HEADERS: &[&str] = &[
    "x-user-id",
    "x-tier",
    "X-Canary",
    ":path",
    "content-type",
    "x-envoy-original-path",
    "bad header",
    "",
];
const STATUSES: &[&str] = &["5xx", "4xx", "503", "429", "600", "xx"];

struct Gen<'a, 'b> {
    u: &'a mut Unstructured<'b>,
}

impl Gen<'_, '_> {
    fn bool(&mut self) -> Result<bool> {
        self.u.arbitrary()
    }

    fn pick<'s>(&mut self, from: &[&'s str]) -> Result<&'s str> {
        Ok(*self.u.choose(from)?)
    }

    fn name(&mut self) -> Result<String> {
        Ok(if self.u.ratio(1, 8)? {
            self.u.arbitrary::<String>()?
        } else {
            self.pick(NAMES)?.to_owned()
        })
    }

    fn number(&mut self) -> Result<Value> {
        Ok(match self.u.int_in_range(0..=9)? {
            0 => json!(0),
            1 => json!(1),
            2 => json!(-1),
            3 => json!(100),
            4 => json!(101),
            5 => json!(u32::MAX),
            6 => json!(u64::MAX),
            7 => json!(0.5),
            8 => json!(1e300),
            _ => json!(self.u.arbitrary::<u32>()? % 100_000),
        })
    }

    /// Any JSON at all, for a field that is given the wrong type.
    fn anything(&mut self, depth: u32) -> Result<Value> {
        Ok(match self.u.int_in_range(0..=6)? {
            0 => Value::Null,
            1 => Value::Bool(self.bool()?),
            2 => self.number()?,
            3 => Value::String(self.u.arbitrary()?),
            4 if depth < 3 => {
                let n = self.u.int_in_range(0..=3)?;
                Value::Array(
                    (0..n)
                        .map(|_| self.anything(depth + 1))
                        .collect::<Result<_>>()?,
                )
            }
            5 if depth < 3 => {
                let mut map = Map::new();
                for _ in 0..self.u.int_in_range(0..=3)? {
                    map.insert(self.name()?, self.anything(depth + 1)?);
                }
                Value::Object(map)
            }
            _ => Value::String(self.pick(DURATIONS)?.to_owned()),
        })
    }

    /// An object with some of `fields`, each made by its generator; now and then a field of the
    /// wrong type, or one the compiler does not know.
    fn object(&mut self, fields: &[(&str, Field)]) -> Result<Value> {
        let mut map = Map::new();
        for (name, field) in fields {
            if self.u.ratio(1, 2)? {
                continue;
            }
            let value = if self.u.ratio(1, 16)? {
                self.anything(0)?
            } else {
                self.field(*field)?
            };
            map.insert((*name).to_owned(), value);
        }
        if self.u.ratio(1, 32)? {
            map.insert(self.name()?, self.anything(0)?);
        }
        Ok(Value::Object(map))
    }

    fn named<F>(&mut self, mut each: F) -> Result<Value>
    where
        F: FnMut(&mut Self) -> Result<Value>,
    {
        let mut map = Map::new();
        for _ in 0..self.u.int_in_range(0..=3)? {
            let name = self.name()?;
            map.insert(name, each(self)?);
        }
        Ok(Value::Object(map))
    }

    fn list(&mut self, field: Field, most: u32) -> Result<Value> {
        let n = self.u.int_in_range(0..=most)?;
        Ok(Value::Array(
            (0..n).map(|_| self.field(field)).collect::<Result<_>>()?,
        ))
    }

    fn field(&mut self, field: Field) -> Result<Value> {
        use Field::*;
        Ok(match field {
            Name => Value::String(self.name()?),
            Names => self.list(Name, 3)?,
            Number => self.number()?,
            Bool => Value::Bool(self.bool()?),
            Duration => Value::String(self.pick(DURATIONS)?.to_owned()),
            Rate => Value::String(self.pick(RATES)?.to_owned()),
            Header => Value::String(self.pick(HEADERS)?.to_owned()),
            Text => Value::String(self.u.arbitrary()?),
            Choice(options) => Value::String(self.pick(options)?.to_owned()),
            Statuses => {
                let n = self.u.int_in_range(0..=3)?;
                let mut items = Vec::new();
                for _ in 0..n {
                    items.push(if self.bool()? {
                        Value::String(self.pick(STATUSES)?.to_owned())
                    } else {
                        self.number()?
                    });
                }
                Value::Array(items)
            }
            Key => {
                let n = self.u.int_in_range(0..=3)?;
                let mut parts = Vec::new();
                for _ in 0..n {
                    parts.push(if self.bool()? {
                        json!({ "header": self.pick(HEADERS)? })
                    } else {
                        Value::String(
                            self.pick(&[
                                "client_ip",
                                "path",
                                "method",
                                "authority",
                                "route_name",
                                "x",
                            ])?
                            .to_owned(),
                        )
                    });
                }
                Value::Array(parts)
            }
            BreakerKey => match self.u.int_in_range(0..=2)? {
                0 => json!("cluster"),
                1 => json!("route"),
                _ => json!({ "header": self.pick(HEADERS)? }),
            },
            HeaderMap => {
                let mut map = Map::new();
                for _ in 0..self.u.int_in_range(0..=2)? {
                    map.insert(
                        self.pick(HEADERS)?.to_owned(),
                        Value::String(self.u.arbitrary()?),
                    );
                }
                Value::Object(map)
            }
            Object(fields) => self.object(fields)?,
            List(fields) => {
                let n = self.u.int_in_range(0..=3)?;
                Value::Array((0..n).map(|_| self.object(fields)).collect::<Result<_>>()?)
            }
        })
    }
}

#[derive(Clone, Copy)]
enum Field {
    Name,
    Names,
    Number,
    Bool,
    Duration,
    Rate,
    Header,
    Text,
    Choice(&'static [&'static str]),
    Statuses,
    Key,
    BreakerKey,
    HeaderMap,
    Object(&'static [(&'static str, Field)]),
    List(&'static [(&'static str, Field)]),
}

use Field::*;

const REPLY: &[(&str, Field)] = &[
    ("status", Number),
    ("body", Text),
    ("headers", HeaderMap),
    ("grpc_status", Number),
];
const MATCH: &[(&str, Field)] = &[
    ("path", Object(&[("exact", Text), ("prefix", Text)])),
    ("methods", Names),
    (
        "headers",
        List(&[
            ("name", Header),
            ("exact", Text),
            ("prefix", Text),
            ("present", Bool),
        ]),
    ),
    ("authority", Text),
    ("route_name", Name),
    ("cluster", Name),
];
const ROUTE: &[(&str, Field)] = &[
    ("name", Name),
    ("match", Object(MATCH)),
    ("rate_limits", Names),
    ("circuit_breaker", Name),
    ("retry", Name),
    ("faults", Names),
    ("degradation", Name),
    (
        "priority",
        Choice(&["critical", "normal", "sheddable", "x"]),
    ),
];
const RATE_LIMIT: &[(&str, Field)] = &[
    ("rate", Rate),
    ("burst", Number),
    ("key", Key),
    ("max_keys", Number),
    ("on_missing_key", Choice(&["skip", "shared", "x"])),
    ("mode", Choice(&["enforce", "shadow", "x"])),
    ("failure_mode", Choice(&["open", "closed", "x"])),
    ("response_headers", Bool),
    (
        "response_header_form",
        Choice(&["separate", "combined", "x"]),
    ),
    ("on_limit", Object(REPLY)),
];
const BREAKER: &[(&str, Field)] = &[
    ("key", BreakerKey),
    ("max_keys", Number),
    (
        "failure",
        Object(&[
            ("statuses", Statuses),
            ("resets", Bool),
            ("timeouts", Bool),
            ("connect_failures", Bool),
            ("grpc_statuses", Statuses),
            ("slow_call", Duration),
        ]),
    ),
    (
        "open_when",
        Object(&[
            ("consecutive_failures", Number),
            ("failure_rate", Number),
            ("slow_call_rate", Number),
            ("min_requests", Number),
            ("window", Duration),
        ]),
    ),
    ("open_for", Duration),
    ("max_open_for", Duration),
    ("half_open_probes", Number),
    ("mode", Choice(&["enforce", "shadow", "x"])),
    ("on_open", Object(REPLY)),
];
const RETRY: &[(&str, Field)] = &[
    ("max_retries", Number),
    ("retry_on", Statuses),
    ("per_try_timeout", Duration),
    (
        "budget",
        Object(&[
            ("ratio", Number),
            ("min_per_second", Number),
            ("window", Duration),
        ]),
    ),
    ("methods", Names),
    ("idempotency_header", Header),
];
const FAULT: &[(&str, Field)] = &[
    ("enabled", Bool),
    (
        "abort",
        Object(&[
            ("status", Number),
            ("percent", Number),
            ("grpc_status", Number),
            ("body", Text),
        ]),
    ),
    (
        "delay",
        Object(&[
            ("percent", Number),
            ("fixed", Duration),
            ("jitter", Duration),
            ("uniform", Object(&[("min", Duration), ("max", Duration)])),
            (
                "exponential",
                Object(&[("mean", Duration), ("max", Duration)]),
            ),
        ]),
    ),
    (
        "response",
        Object(&[
            ("percent", Number),
            ("status", Number),
            ("body", Text),
            ("headers", HeaderMap),
        ]),
    ),
    ("cohort", Object(&[("key", Key), ("percent", Number)])),
    ("max_active", Number),
    ("active_between", Object(&[("start", Text), ("end", Text)])),
    (
        "header_control",
        Object(&[
            ("secret_header", Header),
            ("secret", Text),
            ("max_percent", Number),
        ]),
    ),
];
const CONDITIONS: &[(&str, Field)] = &[
    ("failure_rate", Number),
    ("p95_latency", Duration),
    ("p99_latency", Duration),
    ("probe", Choice(&["unhealthy", "healthy", "x"])),
    ("circuit_breaker", Choice(&["open", "x"])),
];
const DEGRADATION: &[(&str, Field)] = &[
    (
        "signals",
        Object(&[
            ("circuit_breaker", Name),
            ("window", Duration),
            ("min_requests", Number),
            ("failure_statuses", Statuses),
            (
                "probe",
                Object(&[
                    ("cluster", Name),
                    ("path", Text),
                    ("authority", Text),
                    ("interval", Duration),
                    ("timeout", Duration),
                    ("unhealthy_after", Number),
                    ("healthy_after", Number),
                ]),
            ),
        ]),
    ),
    (
        "priority",
        Object(&[("header", Header), ("default", Name), ("classes", Names)]),
    ),
    (
        "levels",
        List(&[
            ("name", Name),
            ("enter", Object(CONDITIONS)),
            ("exit", Object(CONDITIONS)),
            ("min_dwell", Duration),
            (
                "shed_below",
                Choice(&["critical", "normal", "sheddable", "x"]),
            ),
            (
                "fallback",
                Object(&[
                    ("status", Number),
                    ("body", Text),
                    ("headers", HeaderMap),
                    ("routes", Names),
                ]),
            ),
            (
                "reroute",
                Object(&[("cluster", Name), ("header", Header), ("routes", Names)]),
            ),
            ("rate_limit_factor", Number),
            ("retries", Bool),
        ]),
    ),
    (
        "admission_control",
        Object(&[("k", Number), ("window", Duration), ("max_reject", Number)]),
    ),
    ("on_shed", Object(REPLY)),
    ("response_header", Bool),
];

fn config(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut gen = Gen { u };
    let mut top = Map::new();
    if gen.bool()? {
        top.insert("name".into(), gen.field(Name)?);
    }
    if gen.bool()? {
        top.insert("routes".into(), gen.field(List(ROUTE))?);
    }
    for (section, fields) in [
        ("rate_limits", RATE_LIMIT),
        ("circuit_breakers", BREAKER),
        ("retries", RETRY),
        ("faults", FAULT),
        ("degradation", DEGRADATION),
    ] {
        if gen.bool()? {
            let value = gen.named(|gen| gen.object(fields))?;
            top.insert(section.into(), value);
        }
    }
    if gen.u.ratio(1, 4)? {
        top.insert("debug".into(), json!({ "route_header": gen.bool()? }));
    }
    if gen.u.ratio(1, 32)? {
        let name = gen.name()?;
        let value = gen.anything(0)?;
        top.insert(name, value);
    }
    Ok(Value::Object(top))
}

/// Whether `path` (dot-separated, as errors name it) leads somewhere in `document`, for the
/// parts that can be followed: an error's path names where the problem is.
fn first_segment_exists(document: &Value, path: &str) -> bool {
    let Value::Object(top) = document else {
        return path.is_empty();
    };
    // A field name may itself hold a dot, so any top-level key that the path starts with counts.
    path.is_empty()
        || top.keys().any(|key| {
            path.strip_prefix(key.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(document) = config(&mut u) else {
        return;
    };
    let bytes = serde_json::to_vec(&document).expect("a Value serializes");
    match compile(&bytes) {
        Ok(compiled) => {
            let again = compile(&bytes).expect("compiled once, so compiles again");
            assert_eq!(compiled, again, "compiling twice gave different configs");
            let _ = Engine::new(compiled, &mut FakeMetrics::new());
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error result with no errors");
            for error in errors.iter() {
                assert!(
                    first_segment_exists(&document, &error.path),
                    "error path {:?} is not in the document: {error}",
                    error.path
                );
                let _ = error.to_string();
            }
        }
    }
});
