//! The core's entry points per stream: what to do with a request, and what to add to its response.
//!
//! The host calls these with the request's attributes, the time and the metric sink, and carries
//! out the returned decision. Everything per request is decided here, in plain Rust, so the whole
//! pipeline runs in native tests against fakes; the host only translates. Metric names are built
//! once in [`Engine::new`]; the request path bumps ids and allocates nothing.

use core::time::Duration;

use crate::clock::Timestamp;
use crate::config::PluginConfig;
use crate::metrics::{
    metric_name, MetricId, MetricKind, MetricSink, MetricsError, MetricsRegistry,
};
use crate::policy::route::RouteIndex;
use crate::request::{AttributeSource, RequestView};

/// Adds `x-seawall-route: <name>` to responses when `debug.route_header` is on.
pub const ROUTE_HEADER: &str = "x-seawall-route";

/// A compiled config with its metrics defined: what one worker consults on every request.
#[derive(Debug)]
pub struct Engine {
    config: PluginConfig,
    route_requests: Vec<MetricId>,
    unmatched: MetricId,
}

/// What the stream carries from its request to its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamState {
    pub route: Option<RouteIndex>,
    pub started: Timestamp,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Let it through to the upstream.
    Continue,
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
}

impl LocalReply<'_> {
    /// `Retry-After` in whole seconds, rounded up so a client that waits this long is not early.
    pub fn retry_after_seconds(&self) -> Option<u64> {
        self.retry_after.map(|wait| {
            let whole = wait.as_secs();
            if wait.subsec_nanos() > 0 {
                whole + 1
            } else {
                whole
            }
        })
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
}

/// What to add to a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResponseDecision<'a> {
    /// `x-seawall-route` value, when debug headers are on and a route matched.
    pub route_header: Option<&'a str>,
}

impl Engine {
    pub fn new(
        config: PluginConfig,
        registry: &mut impl MetricsRegistry,
    ) -> Result<Self, MetricsError> {
        let route_requests = config
            .routes
            .routes()
            .iter()
            .map(|route| {
                registry.define(
                    MetricKind::Counter,
                    &metric_name("route", &route.name, "requests"),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let unmatched = registry.define(
            MetricKind::Counter,
            &metric_name("plugin", &config.name, "unmatched_requests"),
        )?;
        Ok(Engine {
            config,
            route_requests,
            unmatched,
        })
    }

    pub fn config(&self) -> &PluginConfig {
        &self.config
    }

    /// Whether any request can be affected. A pass-through engine lets the host skip reading
    /// anything at all.
    pub fn is_pass_through(&self) -> bool {
        self.config.routes.is_empty()
    }

    pub fn on_request<S: AttributeSource>(
        &self,
        request: &mut RequestView<'_, S>,
        now: Timestamp,
        metrics: &impl MetricSink,
    ) -> RequestDecision<'_> {
        let route = self.config.routes.find(request);
        let counter = match route {
            Some(index) => self.route_requests.get(usize::from(index.0)).copied(),
            None => Some(self.unmatched),
        };
        if let Some(counter) = counter {
            metrics.increment(counter, 1);
        }
        RequestDecision {
            stream: StreamState {
                route,
                started: now,
            },
            verdict: Verdict::Continue,
        }
    }

    pub fn on_response(&self, stream: &StreamState) -> ResponseDecision<'_> {
        let route_header = if self.config.debug.route_header {
            stream
                .route
                .and_then(|index| self.config.routes.get(index))
                .map(|route| route.name.as_str())
        } else {
            None
        };
        ResponseDecision { route_header }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let reply = |wait| LocalReply {
            status: 429,
            body: b"",
            headers: &[],
            retry_after: wait,
            grpc_status: None,
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
