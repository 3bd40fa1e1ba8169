//! What the engine hands the host: a request's decision, the state its stream carries to the
//! response, and the replies and header changes to carry out. Plain data, so the host glue only
//! executes it.

use crate::clock::Timestamp;
use crate::policy::circuit_breaker::{Located, Role};
use crate::policy::route::RouteIndex;
use crate::request::{Attribute, AttributeId, AttributePlan};
use core::time::Duration;

/// What the stream carries from its request to its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamState {
    pub route: Option<RouteIndex>,
    pub started: Timestamp,
    /// The most restrictive rate limit that applied, for the response's `RateLimit-*` headers.
    pub rate_limit: Option<RateLimitStatus>,
    /// The breaker that awaits this request's outcome.
    pub breaker: Option<BreakerTicket>,
    /// When the response headers came, to tell slow calls.
    pub responded: Option<Timestamp>,
    /// The response's status, when the host read it from the response headers.
    pub response_status: Option<u16>,
    pub faults: FaultState,
    /// The route's breaker would have refused the request (shadow mode): no retries for it.
    pub breaker_open: bool,
    /// The retries this request was granted, to settle when the response shows what was used.
    pub retry: Option<RetryTicket>,
    /// The degradation level the request met, and whether its outcome is the dependency's.
    pub degradation: Option<DegradationTicket>,
}

impl StreamState {
    /// A stream on `route` (if any) whose request came at `now`, before any stage has acted.
    pub fn new(route: Option<RouteIndex>, now: Timestamp) -> Self {
        StreamState {
            route,
            started: now,
            rate_limit: None,
            breaker: None,
            responded: None,
            response_status: None,
            faults: FaultState::default(),
            breaker_open: false,
            retry: None,
            degradation: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DegradationTicket {
    pub level: u8,
    /// It went to the dependency (not shed, answered locally or rerouted): its outcome counts.
    pub reported: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryTicket {
    /// Taken from the budget, so the unused part can go back.
    pub reserved: u32,
    /// When: the unused part goes back to the window bucket it was taken from.
    pub granted_at: u64,
    /// The worker's lease period the grant came from, so its unused part can go back to the
    /// worker's allowance; 0 when it came straight from shared data.
    pub lease: u32,
}

/// The retry headers to set on a request, overwriting whatever the client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryHeaders<'a> {
    /// The retries granted: `x-envoy-max-retries`, written when `write_max_retries`.
    pub max_retries: u32,
    /// False when the Envoy route's own retry policy already allows exactly `max_retries`.
    pub write_max_retries: bool,
    /// `x-envoy-retry-on`.
    pub retry_on: Option<&'a str>,
    /// `x-envoy-retry-grpc-on`.
    pub grpc_retry_on: Option<&'a str>,
    /// `x-envoy-upstream-rq-per-try-timeout-ms`.
    pub per_try_timeout_ms: Option<u64>,
    /// Client-sent headers of [`crate::config::retry::CLIENT_RETRY_HEADERS`] (bit n for entry n) that seawall does not
    /// set: the host removes them.
    pub remove: u8,
}

/// The faults injected into one stream, by position in its route's `faults`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultState {
    /// Positions holding an active-fault slot (and the `active` gauge) until the stream ends.
    pub holding: u8,
    /// The epoch its `max_active` slots were taken in (all at one instant).
    pub slot_epoch: u32,
    /// An abort to send when the delay is over (or at once without one): position and status.
    pub abort: Option<(u8, u16)>,
    /// The position whose response fault replaces the upstream's answer.
    pub response: Option<u8>,
    /// Whether the request is gRPC, for the abort's `grpc-status`.
    pub grpc: bool,
}

/// A request's place in its route's breaker: which record, and whether it is a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerTicket {
    pub at: Located,
    pub role: Role,
    /// A gRPC request, whose outcome includes its `grpc-status`.
    pub grpc: bool,
    /// Admitted on a quiet record, when the worker's count of news about its breaker was this:
    /// its success may be tallied on the worker if no news came since (see `engine/breaker.rs`).
    pub quiet: Option<u32>,
}

impl BreakerTicket {
    pub fn is_probe(&self) -> bool {
        matches!(self.role, Role::Probe { .. })
    }
}

/// A bucket as the IETF `RateLimit-*` headers describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitStatus {
    /// `RateLimit-Limit`: the bucket's capacity (its burst).
    pub limit: u32,
    /// `RateLimit-Remaining`: requests that would be admitted right now.
    pub remaining: u32,
    /// `RateLimit-Reset`: until the bucket is full again.
    pub reset: Duration,
    /// Three headers, or one.
    pub form: crate::config::rate_limit::RateLimitHeaderForm,
}

impl RateLimitStatus {
    pub fn reset_seconds(&self) -> u64 {
        ceil_seconds(self.reset)
    }
}

/// Whole seconds, rounded up so a client that waits this long is not early.
fn ceil_seconds(span: Duration) -> u64 {
    span.as_secs() + u64::from(span.subsec_nanos() > 0)
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Let it through to the upstream.
    Continue,
    /// Hold it until `until`, then ask [`Engine::on_resume`].
    Pause { until: Timestamp },
    /// Answer it locally; the upstream never sees it.
    Reply(LocalReply<'a>),
}

/// A response seawall sends instead of the upstream's. A rejection carries its reason as data,
/// e.g. how long the client should wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply<'a> {
    pub status: u16,
    pub body: &'a [u8],
    pub headers: &'a [(String, String)],
    /// Sent as `Retry-After`, in whole seconds rounded up.
    pub retry_after: Option<Duration>,
    /// For gRPC requests: sent as `grpc-status` instead of relying on the HTTP status.
    pub grpc_status: Option<u32>,
    /// Sent as `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`.
    pub rate_limit: Option<RateLimitStatus>,
    /// Sent as `x-seawall-degraded`: the degradation level in force when a later stage (the
    /// breaker, a rate limit) answers.
    pub degraded: Option<&'a str>,
}

impl LocalReply<'_> {
    pub fn retry_after_seconds(&self) -> Option<u64> {
        self.retry_after.map(ceil_seconds)
    }
}

/// Sends local replies; implemented by the host's HTTP context and by test recorders.
pub trait LocalReplies {
    fn send_local_reply(&mut self, reply: &LocalReply<'_>);
}

/// The decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestDecision<'a> {
    pub stream: StreamState,
    pub verdict: Verdict<'a>,
    /// Request headers to remove before the request goes on: the fault-control headers the
    /// client sent.
    pub strip_headers: HeaderSet<'a>,
    /// Retry headers to set, on routes with a retry policy.
    pub retry: Option<RetryHeaders<'a>>,
    /// A header to set that picks the Envoy route's cluster (degradation's reroute). A client's
    /// own is removed before anything else reads the request.
    pub reroute: Option<Reroute<'a>>,
}

impl<'a> RequestDecision<'a> {
    /// Goes on untouched.
    pub(super) fn passed(stream: StreamState) -> Self {
        RequestDecision {
            stream,
            verdict: Verdict::Continue,
            strip_headers: HeaderSet::default(),
            retry: None,
            reroute: None,
        }
    }

    /// Answered locally: nothing else applies.
    pub(super) fn answered(stream: StreamState, reply: LocalReply<'a>) -> Self {
        RequestDecision {
            verdict: Verdict::Reply(reply),
            ..RequestDecision::passed(stream)
        }
    }
}

/// Some of the config's fault-control headers, by position: a request's set is one word, so a
/// decision carries no list of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeaderSet<'a> {
    pub(super) plan: Option<&'a AttributePlan>,
    pub(super) headers: &'a [AttributeId],
    pub(super) present: u64,
}

impl<'a> HeaderSet<'a> {
    pub fn is_empty(&self) -> bool {
        self.present == 0
    }

    /// The header names, lowercase.
    pub fn names(self) -> impl Iterator<Item = &'a str> {
        let present = self.present;
        self.headers
            .iter()
            .enumerate()
            .filter(move |(bit, _)| present & (1u64 << bit) != 0)
            .filter_map(move |(_, &id)| match self.plan?.get(id)? {
                Attribute::Header(name) => Some(name.as_str()),
                Attribute::Property(_) => None,
            })
    }
}

/// Sends the request to another Envoy cluster through a `cluster_header` route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reroute<'a> {
    pub header: &'a str,
    pub cluster: &'a str,
}

/// What to add to a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResponseDecision<'a> {
    /// `x-seawall-route` value, when debug headers are on and a route matched.
    pub route_header: Option<&'a str>,
    pub rate_limit: Option<RateLimitStatus>,
    /// A response fault: the status (and body) that replace the upstream's.
    pub fault: Option<FaultedResponse<'a>>,
    /// `x-seawall-degraded` value: the level the request met, when above normal.
    pub degraded: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultedResponse<'a> {
    pub status: u16,
    pub body: Option<&'a [u8]>,
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let reply = |wait| LocalReply {
            degraded: None,
            status: 429,
            body: b"",
            headers: &[],
            retry_after: wait,
            grpc_status: None,
            rate_limit: None,
        };
        assert_eq!(
            reply(Some(Duration::from_millis(1200))).retry_after_seconds(),
            Some(2)
        );
        assert_eq!(
            reply(Some(Duration::from_secs(3))).retry_after_seconds(),
            Some(3)
        );
        assert_eq!(
            reply(Some(Duration::from_nanos(1))).retry_after_seconds(),
            Some(1)
        );
        assert_eq!(reply(None).retry_after_seconds(), None);
    }
}
