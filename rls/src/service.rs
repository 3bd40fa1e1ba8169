//! The RLS handler: RLS descriptors in, Limitador's verdict out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use limitador::limit::{Context, Limit, Namespace};
use limitador::storage::redis::AsyncRedisStorage;
use limitador::{AsyncRateLimiter, CheckResult, RateLimiter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Limitador's limits file: a list of limits (its own serde form).
pub fn parse_limits(text: &str) -> Result<Vec<Limit>, String> {
    serde_yaml::from_str(text).map_err(|e| e.to_string())
}

/// The two storages: Redis for the scenarios (shared by every RLS instance and surviving an RLS
/// restart, as in production), memory for unit tests.
pub enum Limiter {
    Memory(RateLimiter),
    Redis(AsyncRateLimiter),
}

impl Limiter {
    pub fn memory() -> Self {
        Limiter::Memory(RateLimiter::new(10_000))
    }

    pub async fn redis(url: &str) -> Result<Self, String> {
        let storage = AsyncRedisStorage::new(url)
            .await
            .map_err(|e| format!("redis {url}: {e}"))?;
        Ok(Limiter::Redis(AsyncRateLimiter::new_with_storage(
            Box::new(storage),
        )))
    }

    pub async fn configure(&self, limits: Vec<Limit>) -> Result<(), String> {
        let result = match self {
            Limiter::Memory(limiter) => limiter.configure_with(limits),
            Limiter::Redis(limiter) => limiter.configure_with(limits).await,
        };
        result.map_err(|e| format!("configuring limits: {e}"))
    }

    async fn check(
        &self,
        namespace: &Namespace,
        ctx: &Context<'_>,
        hits: u64,
    ) -> Result<CheckResult, String> {
        let result = match self {
            Limiter::Memory(limiter) => limiter.check_rate_limited_and_update(namespace, ctx, hits),
            Limiter::Redis(limiter) => {
                limiter
                    .check_rate_limited_and_update(namespace, ctx, hits)
                    .await
            }
        };
        result.map_err(|e| e.to_string())
    }
}

/// What the service has served, for the `--stats` endpoint.
#[derive(Debug, Default)]
pub struct Counts {
    pub calls: AtomicU64,
    pub hits_requested: AtomicU64,
    pub hits_granted: AtomicU64,
    pub over_limit: AtomicU64,
    pub errors: AtomicU64,
}

impl Counts {
    pub fn render(&self) -> String {
        format!(
            "calls {}\nhits_requested {}\nhits_granted {}\nover_limit {}\nerrors {}\n",
            self.calls.load(Ordering::Relaxed),
            self.hits_requested.load(Ordering::Relaxed),
            self.hits_granted.load(Ordering::Relaxed),
            self.over_limit.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

pub struct Rls {
    limiter: Limiter,
    counts: Arc<Counts>,
    /// One check-and-update at a time. Limitador's Redis storage checks the counters and then
    /// increments them in a second round trip, so two concurrent calls can both pass the check
    /// and overshoot a window (its documented trade of accuracy for speed). Seawall's
    /// scenarios measure the limit to ±5%, so this one test RLS decides calls one by one,
    /// which makes it exact: its calls are few (one per lease), and each takes well under a
    /// millisecond against a local Redis.
    serial: tokio::sync::Mutex<()>,
}

impl Rls {
    pub fn new(limiter: Limiter) -> Self {
        Rls {
            limiter,
            counts: Arc::default(),
            serial: tokio::sync::Mutex::new(()),
        }
    }

    pub fn counts(&self) -> Arc<Counts> {
        Arc::clone(&self.counts)
    }

    /// The verdict on one request: Limitador's namespace is the RLS domain, and the descriptors
    /// are bound as `descriptors` (a list of maps), as `limitador-server` binds them.
    pub async fn decide(&self, request: RateLimitRequest) -> Result<RateLimitResponse, String> {
        // The API: 0 means 1.
        let hits = u64::from(request.hits_addend.max(1));
        self.counts.calls.fetch_add(1, Ordering::Relaxed);
        self.counts
            .hits_requested
            .fetch_add(hits, Ordering::Relaxed);
        let entries: Vec<HashMap<String, String>> = request
            .descriptors
            .iter()
            .map(|d| {
                d.entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.clone()))
                    .collect()
            })
            .collect();
        let mut ctx = Context::default();
        ctx.list_binding("descriptors".to_owned(), entries);
        let namespace = Namespace::from(request.domain.clone());
        let serial = self.serial.lock().await;
        let checked = self.limiter.check(&namespace, &ctx, hits).await;
        drop(serial);
        let result = match checked {
            Ok(result) => result,
            Err(error) => {
                self.counts.errors.fetch_add(1, Ordering::Relaxed);
                return Err(error);
            }
        };
        let code = if result.limited {
            self.counts.over_limit.fetch_add(1, Ordering::Relaxed);
            Code::OverLimit
        } else {
            self.counts.hits_granted.fetch_add(hits, Ordering::Relaxed);
            Code::Ok
        };
        // The tightest counter: what is left of it, and when its window ends. A caller leasing
        // hits uses `limit_remaining` to ask for no more than the window still has.
        let tightest = result
            .counters
            .iter()
            .min_by_key(|counter| counter.remaining().unwrap_or(counter.max_value()));
        let status = DescriptorStatus {
            code: code as i32,
            limit_remaining: tightest
                .map(|c| c.remaining().unwrap_or(c.max_value()))
                .map_or(0, |r| u32::try_from(r).unwrap_or(u32::MAX)),
            duration_until_reset: tightest.and_then(|c| c.expires_in()).map(|d| PbDuration {
                seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
            }),
            ..Default::default()
        };
        Ok(RateLimitResponse {
            overall_code: code as i32,
            statuses: request.descriptors.iter().map(|_| status.clone()).collect(),
            ..Default::default()
        })
    }
}

#[tonic::async_trait]
impl RateLimitService for Rls {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        self.decide(request.into_inner())
            .await
            .map(tonic::Response::new)
            .map_err(tonic::Status::unavailable)
    }
}

pub async fn serve(listener: TcpListener, rls: Rls) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(rls))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
        .await
}

/// A minimal HTTP/1.0 responder: any request gets the counts.
pub async fn serve_stats(listener: TcpListener, counts: Arc<Counts>) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let counts = Arc::clone(&counts);
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await;
            let body = counts.render();
            let response = format!(
                "HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
        rate_limit_descriptor::Entry, RateLimitDescriptor,
    };

    const LIMITS: &str = r#"
- namespace: edge
  max_value: 100
  seconds: 60
  conditions: ["descriptors[0].generic_key == 'checkout'"]
  variables: []
"#;

    fn request(value: &str, hits: u32) -> RateLimitRequest {
        RateLimitRequest {
            domain: "edge".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "generic_key".into(),
                    value: value.into(),
                }],
                ..Default::default()
            }],
            hits_addend: hits,
        }
    }

    async fn rls() -> Rls {
        let limiter = Limiter::memory();
        limiter
            .configure(parse_limits(LIMITS).unwrap())
            .await
            .unwrap();
        Rls::new(limiter)
    }

    fn status(response: &RateLimitResponse) -> (i32, u32) {
        (response.overall_code, response.statuses[0].limit_remaining)
    }

    #[tokio::test]
    async fn hits_addend_counts_that_many_hits_and_reports_what_is_left() {
        let rls = rls().await;
        let ok = Code::Ok as i32;
        let over = Code::OverLimit as i32;
        assert_eq!(
            status(&rls.decide(request("checkout", 60)).await.unwrap()),
            (ok, 40)
        );
        assert_eq!(
            status(&rls.decide(request("checkout", 30)).await.unwrap()),
            (ok, 10)
        );
        // Over the limit: nothing is counted, and the caller learns how many still fit.
        let refused = rls.decide(request("checkout", 30)).await.unwrap();
        assert_eq!(refused.overall_code, over);
        assert_eq!(refused.statuses[0].limit_remaining, 10);
        let reset = refused.statuses[0].duration_until_reset.unwrap();
        assert!((0..=60).contains(&reset.seconds), "{reset:?}");
        assert_eq!(
            status(&rls.decide(request("checkout", 10)).await.unwrap()),
            (ok, 0)
        );
        assert_eq!(
            rls.decide(request("checkout", 1))
                .await
                .unwrap()
                .overall_code,
            over
        );
        // 0 hits means 1, as in Envoy's API.
        assert_eq!(
            rls.decide(request("checkout", 0))
                .await
                .unwrap()
                .overall_code,
            over
        );
        let counts = rls.counts();
        assert_eq!(counts.calls.load(Ordering::Relaxed), 6);
        assert_eq!(counts.hits_granted.load(Ordering::Relaxed), 100);
        assert_eq!(counts.over_limit.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_descriptor_no_limit_matches_is_allowed() {
        let rls = rls().await;
        let response = rls.decide(request("catalog", 1_000)).await.unwrap();
        assert_eq!(response.overall_code, Code::Ok as i32);
    }

    #[tokio::test]
    async fn it_serves_the_rls_api_over_grpc() {
        use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = rls().await;
        let counts = server.counts();
        tokio::spawn(serve(listener, server));
        let mut client = RateLimitServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let response = client
            .should_rate_limit(request("checkout", 100))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status(&response), (Code::Ok as i32, 0));
        let response = client
            .should_rate_limit(request("checkout", 1))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.overall_code, Code::OverLimit as i32);
        assert!(counts.render().starts_with("calls 2\n"));
    }

    #[test]
    fn a_bad_limits_file_is_refused() {
        assert!(parse_limits(
            "- namespace: edge\n  seconds: 1\n  conditions: [\"((\"]\n  variables: []\n"
        )
        .is_err());
    }
}

/// The same service over Redis, as the scenarios run it: a `redis-server` of its own on a free
/// port (Debian's `redis-server` package; `cargo xtask test` checks it is installed).
#[cfg(test)]
mod redis_tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
        rate_limit_descriptor::Entry, RateLimitDescriptor,
    };

    struct Redis(std::process::Child);

    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    async fn start_redis() -> (Redis, String) {
        let port = free_port();
        // Owned by the guard at once, so it is killed and waited for on every path.
        let redis = Redis(
            std::process::Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server (Debian package redis-server) must be installed"),
        );
        let url = format!("redis://127.0.0.1:{port}");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return (redis, url);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("redis-server did not listen on {port}");
    }

    fn request(hits: u32) -> RateLimitRequest {
        RateLimitRequest {
            domain: "edge".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "generic_key".into(),
                    value: "checkout".into(),
                }],
                ..Default::default()
            }],
            hits_addend: hits,
        }
    }

    #[tokio::test]
    async fn two_services_on_one_redis_share_the_limit() {
        let (_redis, url) = start_redis().await;
        let limits = "- namespace: edge\n  max_value: 100\n  seconds: 60\n  conditions: [\"descriptors[0].generic_key == 'checkout'\"]\n  variables: []\n";
        let mut services = Vec::new();
        for _ in 0..2 {
            let limiter = Limiter::redis(&url).await.unwrap();
            limiter
                .configure(parse_limits(limits).unwrap())
                .await
                .unwrap();
            services.push(Rls::new(limiter));
        }
        let ok = Code::Ok as i32;
        assert_eq!(
            services[0].decide(request(60)).await.unwrap().overall_code,
            ok
        );
        let second = services[1].decide(request(30)).await.unwrap();
        assert_eq!(
            (second.overall_code, second.statuses[0].limit_remaining),
            (ok, 10)
        );
        let refused = services[0].decide(request(11)).await.unwrap();
        assert_eq!(refused.overall_code, Code::OverLimit as i32);
        assert_eq!(
            services[1].decide(request(10)).await.unwrap().overall_code,
            ok
        );
    }
}
