//! Which seawall route a request belongs to.
//!
//! The Wasm filter has no per-route config in Envoy, so seawall matches routes itself: an ordered
//! list, first match wins, on path, method, headers, authority, Envoy's route name and the upstream
//! cluster. Conditions are compiled once into byte comparisons against attributes of the
//! [`AttributePlan`](crate::request::AttributePlan); matching allocates nothing and reads each
//! attribute at most once per request, however many routes test it.

use crate::request::{AttributeId, AttributeSource, RequestView};

/// Position of a route in the table, which is also its identity for the life of a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouteIndex(pub u16);

/// A compiled route: a name, the conditions that must all hold, and the policies it applies.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    pub conditions: Vec<Condition>,
    pub policies: RoutePolicies,
}

impl Route {
    /// Whether every condition holds, testing them in order and stopping at the first that fails.
    pub fn matches<S: AttributeSource>(&self, request: &mut RequestView<'_, S>) -> bool {
        self.conditions.iter().all(|c| c.holds(request))
    }

    /// Every condition that does not hold, for tools that say why a route did not match
    /// (`seawall explain`). Unlike [`Route::matches`] it tests them all and allocates: never on
    /// the request path.
    pub fn unmet<S: AttributeSource>(&self, request: &mut RequestView<'_, S>) -> Vec<&Condition> {
        self.conditions
            .iter()
            .filter(|c| !c.holds(request))
            .collect()
    }
}

/// Indices into the compiled policy sets that a route applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePolicies {
    pub rate_limits: Vec<usize>,
    pub circuit_breaker: Option<RouteBreaker>,
    pub faults: Vec<usize>,
    pub retry: Option<usize>,
    pub degradation: Option<RouteDegradation>,
}

/// The degradation policy a route applies, with the priority class the route gives its requests
/// (`None`: the request's header decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteDegradation {
    pub policy: usize,
    pub priority: Option<u8>,
}

/// The breaker a route applies, with the route's own record when the breaker is keyed by route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteBreaker {
    pub policy: usize,
    pub record: Option<String>,
}

/// One test against one attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// The path without its query string equals this.
    PathExact { path: AttributeId, value: Vec<u8> },
    /// The path without its query string starts with this.
    PathPrefix { path: AttributeId, value: Vec<u8> },
    /// The method is one of these (uppercase tokens).
    MethodIn {
        method: AttributeId,
        methods: Vec<Vec<u8>>,
    },
    /// The host part of `:authority` equals this, ignoring ASCII case. When the configured value
    /// has a port, the port must match too.
    Authority {
        authority: AttributeId,
        host: Vec<u8>,
        with_port: bool,
    },
    /// The attribute is present with exactly this value.
    Equals {
        attribute: AttributeId,
        value: Vec<u8>,
    },
    /// The attribute is present and starts with this value.
    StartsWith {
        attribute: AttributeId,
        value: Vec<u8>,
    },
    /// The attribute is present (any value).
    Present { attribute: AttributeId },
    /// The attribute is absent.
    Absent { attribute: AttributeId },
}

impl Condition {
    pub fn holds<S: AttributeSource>(&self, request: &mut RequestView<'_, S>) -> bool {
        match self {
            Condition::PathExact { path, value } => request
                .get(*path)
                .is_some_and(|p| without_query(p) == value.as_slice()),
            Condition::PathPrefix { path, value } => request
                .get(*path)
                .is_some_and(|p| without_query(p).starts_with(value)),
            Condition::MethodIn { method, methods } => request
                .get(*method)
                .is_some_and(|m| methods.iter().any(|allowed| allowed.as_slice() == m)),
            Condition::Authority {
                authority,
                host,
                with_port,
            } => request.get(*authority).is_some_and(|a| {
                let compared = if *with_port { a } else { host_part(a) };
                compared.eq_ignore_ascii_case(host)
            }),
            Condition::Equals { attribute, value } => {
                request.get(*attribute) == Some(value.as_slice())
            }
            Condition::StartsWith { attribute, value } => request
                .get(*attribute)
                .is_some_and(|v| v.starts_with(value)),
            Condition::Present { attribute } => request.get(*attribute).is_some(),
            Condition::Absent { attribute } => request.get(*attribute).is_none(),
        }
    }
}

/// The path proper: without its query string or fragment.
pub(crate) fn without_query(path: &[u8]) -> &[u8] {
    match path.iter().position(|&b| b == b'?' || b == b'#') {
        Some(end) => &path[..end],
        None => path,
    }
}

/// `example.com:8080` -> `example.com`; `[::1]:8080` -> `[::1]`.
fn host_part(authority: &[u8]) -> &[u8] {
    let port_colon = if authority.first() == Some(&b'[') {
        authority
            .iter()
            .position(|&b| b == b']')
            .and_then(|close| (authority.get(close + 1) == Some(&b':')).then_some(close + 1))
    } else {
        authority.iter().rposition(|&b| b == b':')
    };
    match port_colon {
        Some(colon) => &authority[..colon],
        None => authority,
    }
}

/// The ordered route list of one config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> Self {
        RouteTable { routes }
    }

    /// The first route whose conditions all hold.
    pub fn find<S: AttributeSource>(&self, request: &mut RequestView<'_, S>) -> Option<RouteIndex> {
        self.routes
            .iter()
            .position(|route| route.matches(request))
            .and_then(|position| u16::try_from(position).ok())
            .map(RouteIndex)
    }

    pub fn get(&self, index: RouteIndex) -> Option<&Route> {
        self.routes.get(usize::from(index.0))
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn query_and_fragment_are_not_part_of_the_path() {
        assert_eq!(without_query(b"/a/b?x=1"), b"/a/b");
        assert_eq!(without_query(b"/a#top"), b"/a");
        assert_eq!(without_query(b"/a"), b"/a");
    }

    #[test]
    fn host_part_drops_the_port() {
        assert_eq!(host_part(b"shop.example.com:8080"), b"shop.example.com");
        assert_eq!(host_part(b"shop.example.com"), b"shop.example.com");
        assert_eq!(host_part(b"[::1]:8080"), b"[::1]");
        assert_eq!(host_part(b"[::1]"), b"[::1]");
    }
}
