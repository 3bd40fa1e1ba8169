//! The plugin config exactly as the operator writes it, before any validation beyond JSON shape.
//!
//! Every struct denies unknown fields, so a typo is an error rather than a silently ignored knob.
//! These types are deserialized one part at a time (each route, each named policy), so errors in
//! independent parts are all reported; [`super::compile`] turns them into the validated form.

use serde::Deserialize;

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[cfg_attr(feature = "schema", schemars(with = "super::schema::Name"))]
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: RawMatch,
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Vec<super::schema::Name>"))]
    pub rate_limits: Vec<String>,
    #[cfg_attr(feature = "schema", schemars(with = "Option<super::schema::Name>"))]
    pub circuit_breaker: Option<String>,
    #[cfg_attr(feature = "schema", schemars(with = "Option<super::schema::Name>"))]
    pub retry: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(with = "Vec<super::schema::Name>"))]
    pub faults: Vec<String>,
    #[cfg_attr(feature = "schema", schemars(with = "Option<super::schema::Name>"))]
    pub degradation: Option<String>,
    /// The priority class of every request on this route (its degradation policy's classes).
    pub priority: Option<String>,
}

/// All present conditions must hold; an empty match matches every request.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub path: Option<RawPathMatch>,
    #[cfg_attr(
        feature = "schema",
        schemars(with = "Option<Vec<super::schema::RouteMethod>>")
    )]
    pub methods: Option<Vec<String>>,
    #[serde(default)]
    pub headers: Vec<RawHeaderMatch>,
    pub authority: Option<String>,
    pub route_name: Option<String>,
    pub cluster: Option<String>,
}

/// Exactly one of `exact` and `prefix`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPathMatch {
    #[cfg_attr(feature = "schema", schemars(with = "Option<super::schema::UrlPath>"))]
    pub exact: Option<String>,
    #[cfg_attr(feature = "schema", schemars(with = "Option<super::schema::UrlPath>"))]
    pub prefix: Option<String>,
}

/// A header name and exactly one of `exact`, `prefix` and `present`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderMatch {
    #[cfg_attr(feature = "schema", schemars(with = "super::schema::MatchHeaderName"))]
    pub name: String,
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub present: Option<bool>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDebug {
    /// Adds `x-seawall-route: <route name>` to responses, so operators can see which route matched.
    #[serde(default)]
    pub route_header: bool,
}
