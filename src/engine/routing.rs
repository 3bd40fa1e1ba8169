//! The first stage: which of seawall's routes a request is on. Before anything reads `xds.*` or
//! matches a route, a header that steers Envoy's routing is removed from the request: seawall sets
//! the degradation policies' reroute headers itself, and a client's own copy never counts,
//! whatever the route.

use crate::config::PluginConfig;
use crate::metrics::{
    metric_name, MetricId, MetricKind, MetricSink, MetricsError, MetricsRegistry,
};
use crate::policy::route::RouteIndex;
use crate::request::{AttributeId, AttributeSource, RequestView};

#[derive(Debug)]
pub(super) struct Routing {
    /// The reroute headers of every degradation policy, each once.
    steering_headers: Vec<AttributeId>,
    steering_removed: MetricId,
    route_requests: Vec<MetricId>,
    unmatched: MetricId,
}

fn counter(
    registry: &mut impl MetricsRegistry,
    scope: &str,
    name: &str,
    what: &str,
) -> Result<MetricId, MetricsError> {
    registry.define(MetricKind::Counter, &metric_name(scope, name, what))
}

impl Routing {
    pub(super) fn define(
        config: &PluginConfig,
        registry: &mut impl MetricsRegistry,
    ) -> Result<Self, MetricsError> {
        let route_requests = config
            .routes
            .routes()
            .iter()
            .map(|route| counter(registry, "route", &route.name, "requests"))
            .collect::<Result<Vec<_>, _>>()?;
        let mut steering_headers: Vec<AttributeId> = Vec::new();
        for (_, id) in config.degradations.iter().flat_map(|d| &d.reroute_headers) {
            if !steering_headers.contains(id) {
                steering_headers.push(*id);
            }
        }
        let plugin = &config.name;
        Ok(Routing {
            steering_headers,
            steering_removed: counter(
                registry,
                "plugin",
                plugin,
                "client_reroute_headers_removed",
            )?,
            route_requests,
            unmatched: counter(registry, "plugin", plugin, "unmatched_requests")?,
        })
    }

    /// Removes a client's steering headers, then matches the request to a route and counts it.
    pub(super) fn route<S: AttributeSource>(
        &self,
        config: &PluginConfig,
        request: &mut RequestView<'_, S>,
        metrics: &impl MetricSink,
    ) -> Option<RouteIndex> {
        for &id in &self.steering_headers {
            if request.get(id).is_some() {
                request.remove_header(id);
                metrics.increment(self.steering_removed, 1);
            }
        }
        let index = config.routes.find(request);
        let counter = match index {
            Some(index) => self.route_requests.get(usize::from(index.0)).copied(),
            None => Some(self.unmatched),
        };
        if let Some(counter) = counter {
            metrics.increment(counter, 1);
        }
        index
    }
}

impl super::Engine {
    /// Whether the request is gRPC, by its `content-type`.
    pub(super) fn is_grpc<S: AttributeSource>(&self, request: &mut RequestView<'_, S>) -> bool {
        self.config
            .content_type
            .and_then(|id| request.get(id))
            .is_some_and(is_grpc)
    }
}

fn is_grpc(content_type: &[u8]) -> bool {
    content_type.len() >= 16 && content_type[..16].eq_ignore_ascii_case(b"application/grpc")
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn grpc_is_recognised_by_content_type_prefix() {
        assert!(is_grpc(b"application/grpc"));
        assert!(is_grpc(b"application/grpc+proto"));
        assert!(is_grpc(b"Application/GRPC"));
        assert!(!is_grpc(b"application/json"));
        assert!(!is_grpc(b"application/grp"));
    }
}
