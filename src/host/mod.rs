//! The proxy-wasm glue: Envoy's callbacks in, the core's decisions out.
//!
//! Kept thin on purpose. A root context per worker compiles the plugin config in `on_configure`
//! (refusing a bad one, so Envoy keeps the previous config) and owns that worker's [`Engine`] and
//! scratch buffers. An HTTP context per stream reads attributes through [`HostRequest`], asks the
//! engine, and carries out the answer. Nothing here decides anything.

mod abi;
#[cfg(feature = "alloc-count")]
mod alloc_count;
mod hostcall_count;
mod trap;

use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel as SdkLogLevel};

use crate::clock::Timestamp;
use crate::config;
use crate::config::rate_limit::RateLimitHeaderForm::Combined;
use crate::config::retry::CLIENT_RETRY_HEADERS;
use crate::engine::{
    Engine, GlobalCall, LocalReplies, LocalReply, Reroute, RetryHeaders, StreamState, Verdict,
    DEGRADATION_TICK, DEGRADED_HEADER, FAULT_HEADER, GLOBAL_TICK, ROUTE_HEADER,
};
use crate::metrics::{
    MetricBatch, MetricId, MetricKind, MetricSink, MetricsError, MetricsRegistry,
};
use crate::policy::circuit_breaker::ResponseFacts;
use crate::policy::global_limit::Claim;
use crate::policy::retry::ResponseHeaders;
use crate::request::{Attribute, AttributeSource, HeaderPairs, RequestView, Scratch};
use crate::state::{Cas, Lookup, SharedStore, StoreError};
use crate::wire::{
    CombinedRateLimit, Decimal, ReplyBuffer, RATELIMIT, RATELIMIT_LIMIT, RATELIMIT_REMAINING,
    RATELIMIT_RESET,
};

proxy_wasm::main! {{
    // Installs the SDK's `log` backend, which forwards every record to Envoy's log.
    proxy_wasm::set_log_level(SdkLogLevel::Info);
    // Replaces the SDK's hook, which would itself panic if the host refused the line.
    std::panic::set_hook(Box::new(|info| {
        abi::log_critical(&format!("seawall: panic: {info}"));
    }));
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root::new(context_id))
    });
}}

/// A random 64-bit value for the deployment's secret (used only if no worker made one yet).
/// std's `RandomState` draws its keys from WASI's `random_get`, which Envoy serves from its own
/// random source; the time and context id are mixed in so that a host that answered with zeros
/// would still not give every deployment the same secret.
fn fresh_secret(context_id: u32) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(abi::now_nanos());
    hasher.write_u32(context_id);
    hasher.finish()
}

/// The tick that resumes delayed requests, on only while some are waiting: the granularity of
/// injected delays.
const TICK_MS: u32 = 1;

/// Requests one worker holds paused at once; beyond this a delay is skipped (and counted), so a
/// flood of delayed requests cannot grow the worker's memory.
const MAX_PAUSED: usize = 4096;

/// One compiled config on one worker: the engine and the batch its metric updates wait in until
/// the worker's tick hands them to Envoy.
struct Loaded {
    engine: Engine,
    metrics: MetricBatch<HostMetrics>,
}

impl core::ops::Deref for Loaded {
    type Target = Engine;

    fn deref(&self) -> &Engine {
        &self.engine
    }
}

impl Loaded {
    /// The tick's work for a config that still decides (or, `retiring`, one that no longer
    /// does): local state settled, then every metric update handed to Envoy.
    fn tick(&self, now: Timestamp, retiring: bool) {
        self.engine
            .on_worker_tick(now, &HostStore, &self.metrics, retiring);
        self.metrics.flush();
    }
}

/// What one worker's streams share: the live engine and buffers reused from request to request.
struct Worker {
    engine: Option<Rc<Loaded>>,
    /// The config this root ran before a reconfigure, while its streams may still be finishing:
    /// its metrics are still flushed on the tick.
    retired: Option<Rc<Loaded>>,
    /// `seawall.workers.all.ticks`: ticks that flushed a config's metrics, so a reader of the
    /// stats can tell every worker has flushed since a moment (see the integration harness).
    ticks: Option<MetricId>,
    scratch: Scratch,
    reply: ReplyBuffer,
    /// Delayed requests, resumed from the root context's tick. Reserved to `MAX_PAUSED` at
    /// configure time, so queueing never allocates.
    paused: Vec<Paused>,
    /// The root context's tick period in ms (0: off): 1 while requests are paused, the
    /// degradation tick when a policy needs it, otherwise off.
    tick_ms: u32,
    #[cfg(feature = "alloc-count")]
    allocations: Option<alloc_count::AllocationStats>,
    #[cfg(feature = "hostcall-count")]
    hostcalls: Option<hostcall_count::HostcallStats>,
}

/// A delayed request: its stream, when to resume it, and the engine that decided it.
struct Paused {
    context_id: u32,
    until: Timestamp,
    state: StreamState,
    engine: Rc<Loaded>,
}

struct Root {
    context_id: u32,
    worker: Rc<RefCell<Worker>>,
    /// For aborts sent from the tick, apart from the worker's buffer (a reply can re-enter the
    /// stream's callbacks while the tick runs).
    tick_reply: ReplyBuffer,
    /// This worker's id in degradation leases. Ids only need to differ in the common case: two
    /// workers sharing one would both evaluate, and the shared record's CAS still lets exactly one
    /// of them send each probe.
    worker_id: u64,
    /// When the degradation tick is next due.
    next_degradation_tick: Timestamp,
    /// Probes in flight: token, policy, and the engine that sent them.
    probes: Vec<(u32, usize, Rc<Loaded>)>,
    /// When a probe that could not be sent was last logged: at most once a minute, however
    /// short the interval.
    probe_warned_at: Option<Timestamp>,
    /// Global limits' lease calls in flight: token, policy, claim, and the engine that sent them.
    lease_calls: Vec<(u32, usize, Claim, Rc<Loaded>)>,
    /// When a lease call that could not be sent was last logged (at most once a minute).
    lease_warned_at: Option<Timestamp>,
}

/// Envoy's rate limit service, as every RLS (envoyproxy/ratelimit, Limitador) serves it.
const RLS_SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
const RLS_METHOD: &str = "ShouldRateLimit";
/// gRPC's OK.
const GRPC_OK: u32 = 0;

/// The tick period when nothing is paused: a global limit's tick when one needs leases, so a
/// lease is asked for soon after its bucket runs low.
fn idle_tick_ms(engine: Option<&Loaded>) -> u32 {
    match engine {
        Some(engine) if engine.has_global_limits() => GLOBAL_TICK.as_millis() as u32,
        Some(engine) if engine.needs_tick() => DEGRADATION_TICK.as_millis() as u32,
        _ => 0,
    }
}

/// Sets the tick period if it changes.
fn set_tick(worker: &mut Worker, period_ms: u32) {
    if worker.tick_ms != period_ms && abi::set_tick_period(period_ms) {
        worker.tick_ms = period_ms;
    }
}

impl Root {
    fn new(context_id: u32) -> Self {
        Root {
            context_id,
            worker: Rc::new(RefCell::new(Worker {
                engine: None,
                retired: None,
                ticks: None,
                scratch: Scratch::default(),
                reply: ReplyBuffer::default(),
                paused: Vec::new(),
                tick_ms: 0,
                #[cfg(feature = "alloc-count")]
                allocations: None,
                #[cfg(feature = "hostcall-count")]
                hostcalls: None,
            })),
            tick_reply: ReplyBuffer::default(),
            worker_id: 0,
            next_degradation_tick: Timestamp::from_nanos(0),
            probes: Vec::new(),
            probe_warned_at: None,
            lease_calls: Vec::new(),
            lease_warned_at: None,
        }
    }
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        self.retire();
        true
    }

    /// A probe came back (or timed out: no headers).
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        _body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(position) = self
            .probes
            .iter()
            .position(|(token, ..)| *token == token_id)
        else {
            return;
        };
        let (_, policy, engine) = self.probes.swap_remove(position);
        let status = abi::http_call_response_header(":status")
            .and_then(|value| crate::policy::fault::parse_decimal(&value))
            .and_then(|status| u16::try_from(status).ok());
        engine.on_probe_result(policy, status, &HostStore, &engine.metrics);
    }

    /// A global limit's lease call came back: a gRPC status other than OK (a timeout, an
    /// unreachable RLS) settles it as a failure.
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let Some(position) = self
            .lease_calls
            .iter()
            .position(|(token, ..)| *token == token_id)
        else {
            return;
        };
        let (_, policy, claim, engine) = self.lease_calls.swap_remove(position);
        let body = if status_code == GRPC_OK {
            self.get_grpc_call_response_body(0, response_size)
                .or_else(|| Some(Vec::new()))
        } else {
            None
        };
        let now = Timestamp::from_nanos(abi::now_nanos());
        engine.on_global_answer(
            policy,
            self.worker_id,
            claim,
            body.as_deref(),
            now,
            &HostStore,
            &engine.metrics,
        );
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let compiled = match config::compile(&bytes) {
            Ok(compiled) => compiled,
            Err(errors) => {
                log::error!(
                    "seawall[{}]: plugin config refused: {errors}",
                    self.context_id
                );
                return false;
            }
        };
        let mut metrics = MetricBatch::new(HostMetrics);
        let engine = match Engine::new(compiled, &mut metrics.registry(&mut HostMetrics)) {
            Ok(engine) => engine,
            Err(error) => {
                log::error!(
                    "seawall[{}]: plugin config refused: {error}",
                    self.context_id
                );
                return false;
            }
        };
        let created = match engine.prepare_state(&HostStore, fresh_secret(self.context_id)) {
            Ok(created) => created,
            Err(error) => {
                log::error!(
                    "seawall[{}]: plugin config refused: shared data: {error}",
                    self.context_id
                );
                return false;
            }
        };
        let summary = format!(
            "plugin config \"{}\" loaded: {} routes, {} rate limits, {} circuit breakers, {} retry policies, {} faults, {} degradation policies, {} request attributes, {} shared-data keys created",
            engine.config().name,
            engine.config().routes.len(),
            engine.config().rate_limits.len(),
            engine.config().circuit_breakers.len(),
            engine.config().retries.len(),
            engine.config().faults.len(),
            engine.config().degradations.len(),
            engine.config().attributes.len(),
            created
        );
        let seed = abi::now_nanos() ^ u64::from(self.context_id).rotate_left(32);
        engine.seed_random(seed);
        self.worker_id = crate::state::slots::hash_parts(seed, &[b"worker"]).max(1);
        let mut worker = self.worker.borrow_mut();
        worker.scratch = Scratch::for_plan(&engine.config().attributes);
        if engine.can_delay() {
            let spare = MAX_PAUSED.saturating_sub(worker.paused.len());
            worker.paused.reserve_exact(spare);
        }
        let previous = worker.engine.replace(Rc::new(Loaded { engine, metrics }));
        if let Some(previous) = previous {
            previous.tick(Timestamp::from_nanos(abi::now_nanos()), true);
            worker.retired = Some(previous);
        }
        worker.ticks = HostMetrics
            .define(MetricKind::Counter, "seawall.workers.all.ticks")
            .ok();
        if worker.paused.is_empty() {
            let period = idle_tick_ms(worker.engine.as_deref());
            set_tick(&mut worker, period);
        }
        #[cfg(feature = "alloc-count")]
        {
            worker.allocations = alloc_count::AllocationStats::define(&mut HostMetrics);
        }
        #[cfg(feature = "hostcall-count")]
        {
            worker.hostcalls = hostcall_count::HostcallStats::define(&mut HostMetrics);
        }
        log::info!("seawall[{}]: {summary}", self.context_id);
        true
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let engine = self.worker.borrow().engine.clone();
        Some(Box::new(Stream {
            context_id,
            worker: Rc::clone(&self.worker),
            engine,
            state: None,
            paused: false,
            replace_body: false,
            response_complete: false,
        }))
    }

    /// The tick's host calls are counted apart in counting builds (`hostcall_count::on_tick`).
    fn on_tick(&mut self) {
        hostcall_count::on_tick(|| self.tick());
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Root {
    /// Resumes the delayed requests that are due, then does the worker's periodic work. Due
    /// requests are taken out of the queue first, so that resuming (which can run other callbacks
    /// of the stream) never finds the queue borrowed.
    fn tick(&mut self) {
        let now = Timestamp::from_nanos(abi::now_nanos());
        loop {
            let due = {
                let Ok(mut worker) = self.worker.try_borrow_mut() else {
                    return;
                };
                match worker.paused.iter().position(|p| p.until <= now) {
                    Some(position) => worker.paused.swap_remove(position),
                    None => {
                        if worker.paused.is_empty() {
                            let period = idle_tick_ms(worker.engine.as_deref());
                            set_tick(&mut worker, period);
                        }
                        break;
                    }
                }
            };
            if !abi::set_effective_context(due.context_id) {
                // The stream ended while it waited; its slot was given back in on_log.
                continue;
            }
            match due.engine.on_resume(&due.state, &due.engine.metrics) {
                Verdict::Reply(reply) => self.tick_reply.send_local_reply(&reply),
                Verdict::Continue | Verdict::Pause { .. } => {
                    abi::resume_request();
                }
            }
        }
        self.lease_tick(now);
        // Half a tick early counts as due: ticks jitter, and a tick that comes a hair early must
        // not push the work to the next one.
        if now.saturating_add(DEGRADATION_TICK / 2) >= self.next_degradation_tick {
            self.worker_tick(now);
        }
    }

    /// The worker's tick: settles the config's worker-local state, shares the degradation
    /// tally, reads the level back, sends the probes the lease holder owes, and hands the batched
    /// metric updates to Envoy.
    fn worker_tick(&mut self, now: Timestamp) {
        let Some(engine) = self.worker.try_borrow().ok().and_then(|w| w.engine.clone()) else {
            return;
        };
        if !engine.needs_tick() {
            return;
        }
        self.next_degradation_tick = now.saturating_add(DEGRADATION_TICK);
        // Resuming paused streams moved the effective context; probes belong to the root.
        abi::set_effective_context(self.context_id);
        let mut sent: Vec<(u32, usize)> = Vec::new();
        let mut warned_at = self.probe_warned_at;
        engine.on_degradation_tick(
            self.worker_id,
            now,
            &HostStore,
            &engine.metrics,
            &mut |policy, probe| {
                let headers = vec![
                    (":method", "GET"),
                    (":path", probe.path.as_str()),
                    (":authority", probe.authority.as_str()),
                    ("user-agent", "seawall-probe"),
                ];
                match self.dispatch_http_call(
                    &probe.cluster,
                    headers,
                    None,
                    Vec::new(),
                    core::time::Duration::from_millis(u64::from(probe.timeout_ms)),
                ) {
                    Ok(token) => {
                        sent.push((token, policy));
                        true
                    }
                    Err(status) => {
                        if warn_again(&mut warned_at, now) {
                            log::warn!(
                                "seawall[{}]: probe to cluster {:?} not sent ({status:?}); counted as a failed probe (logged at most once a minute)",
                                self.context_id,
                                probe.cluster
                            );
                        }
                        false
                    }
                }
            },
        );
        self.probe_warned_at = warned_at;
        for (token, policy) in sent {
            self.probes.push((token, policy, Rc::clone(&engine)));
        }
        engine.tick(now, false);
        let Ok(mut worker) = self.worker.try_borrow_mut() else {
            return;
        };
        if let Some(retired) = worker.retired.take() {
            retired.metrics.flush();
            // Kept while a stream or a probe of the old config may still report to it.
            if Rc::strong_count(&retired) > 1 {
                worker.retired = Some(retired);
            }
        }
        if let Some(ticks) = worker.ticks {
            abi::increment_metric(ticks.0, 1);
        }
    }

    /// Asks the RLS for the leases this worker claimed: one gRPC call each, from the root
    /// context, never from a request.
    fn lease_tick(&mut self, now: Timestamp) {
        let Some(engine) = self.worker.try_borrow().ok().and_then(|w| w.engine.clone()) else {
            return;
        };
        if !engine.has_global_limits() {
            return;
        }
        abi::set_effective_context(self.context_id);
        let mut sent: Vec<(u32, usize, Claim)> = Vec::new();
        let mut warned_at = self.lease_warned_at;
        engine.on_global_tick(
            self.worker_id,
            now,
            &HostStore,
            &engine.metrics,
            &mut |call: GlobalCall<'_>| {
                match self.dispatch_grpc_call(
                    call.cluster,
                    RLS_SERVICE,
                    RLS_METHOD,
                    Vec::new(),
                    Some(&call.message),
                    call.timeout,
                ) {
                    Ok(token) => {
                        sent.push((token, call.policy, call.claim));
                        true
                    }
                    Err(status) => {
                        if warn_again(&mut warned_at, now) {
                            log::warn!(
                                "seawall[{}]: rate limit service call to cluster {:?} not sent ({status:?}); counted as an RLS error (logged at most once a minute)",
                                self.context_id,
                                call.cluster
                            );
                        }
                        false
                    }
                }
            },
        );
        self.lease_warned_at = warned_at;
        for (token, policy, claim) in sent {
            self.lease_calls
                .push((token, policy, claim, Rc::clone(&engine)));
        }
    }

    /// The root is going away (its listener drained, or the VM stops): nothing leased or tallied
    /// stays with it, and its last metric updates reach Envoy.
    fn retire(&mut self) {
        let Ok(worker) = self.worker.try_borrow() else {
            return;
        };
        let now = Timestamp::from_nanos(abi::now_nanos());
        if let Some(engine) = &worker.engine {
            engine.tick(now, true);
        }
        if let Some(retired) = &worker.retired {
            retired.metrics.flush();
        }
    }
}

/// One HTTP stream. It keeps the engine it started with, so a config swap mid-stream does not
/// mix two configs' decisions.
struct Stream {
    context_id: u32,
    worker: Rc<RefCell<Worker>>,
    engine: Option<Rc<Loaded>>,
    state: Option<StreamState>,
    /// Waiting in the worker's queue for its delay to end.
    paused: bool,
    /// A response fault replaces the upstream's body.
    replace_body: bool,
    /// The response reached its end (`end_of_stream` on its headers or body).
    response_complete: bool,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        trap::on_request();
        let Some(engine) = self.engine.clone() else {
            return Action::Continue;
        };
        if engine.is_pass_through() {
            return Action::Continue;
        }
        let now = Timestamp::from_nanos(abi::now_nanos());
        trap::stall_after_reading_the_clock(now.as_nanos());
        let Ok(mut worker) = self.worker.try_borrow_mut() else {
            log::warn!(
                "seawall[{}]: worker state busy; request passed through",
                self.context_id
            );
            return Action::Continue;
        };
        let worker = &mut *worker;
        let mut source = HostRequest;
        let mut view = RequestView::new(
            &engine.config().attributes,
            &mut source,
            &mut worker.scratch,
        );
        let decision = engine.on_request(&mut view, now, &HostStore, &engine.metrics);
        drop(view);
        self.state = Some(decision.stream);
        for header in decision.strip_headers.names() {
            abi::remove_request_header(header);
        }
        if let Some(retry) = decision.retry {
            set_retry_headers(&retry);
        }
        // Envoy clears the route cache when a filter changes request headers, so the router
        // picks its route (and a `cluster_header` cluster) again with this header.
        if let Some(Reroute { header, cluster }) = decision.reroute {
            abi::replace_request_header(header, cluster.as_bytes());
        }
        match decision.verdict {
            Verdict::Continue => Action::Continue,
            Verdict::Reply(reply) => {
                worker.reply.send_local_reply(&reply);
                Action::Pause
            }
            Verdict::Pause { until } if worker.paused.len() < MAX_PAUSED => {
                worker.paused.push(Paused {
                    context_id: self.context_id,
                    until,
                    state: decision.stream,
                    engine: Rc::clone(&engine),
                });
                self.paused = true;
                set_tick(worker, TICK_MS);
                Action::Pause
            }
            Verdict::Pause { .. } => {
                // The delay is skipped: the request goes on (or gets its abort) now, so its
                // outcome is timed from now.
                if let Some(state) = self.state.as_mut() {
                    state.started = now;
                }
                match engine.delay_not_queued(&decision.stream, &engine.metrics) {
                    Verdict::Reply(reply) => {
                        worker.reply.send_local_reply(&reply);
                        Action::Pause
                    }
                    Verdict::Continue | Verdict::Pause { .. } => Action::Continue,
                }
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.response_complete |= end_of_stream;
        if let (Some(engine), Some(state)) = (&self.engine, &mut self.state) {
            let now = if engine.wants_response_time(state) {
                Timestamp::from_nanos(abi::now_nanos())
            } else {
                state.started
            };
            // The status and the retries' headers in one read of the map when both are wanted.
            let mut response = HostResponse {
                headers: (engine.wants_status(state) && state.retry.is_some())
                    .then(abi::response_header_map)
                    .flatten(),
                ..HostResponse::default()
            };
            if engine.wants_status(state) {
                // A header read now spares a property read (`response.code`) later.
                state.response_status = response
                    .header(":status")
                    .and_then(|value| crate::policy::fault::parse_decimal(&value))
                    .and_then(|status| u16::try_from(status).ok());
            }
            if state.retry.is_some() {
                engine.settle_retries(state, &mut response, now, &HostStore, &engine.metrics);
            }
            let decision = engine.on_response(state, now, &engine.metrics);
            if let Some(fault) = decision.fault {
                abi::replace_response_header(
                    ":status",
                    Decimal::new(u64::from(fault.status)).as_bytes(),
                );
                abi::add_response_header(FAULT_HEADER, b"response");
                // A body can only be replaced when one follows the headers.
                if fault.body.is_some() && !end_of_stream {
                    abi::remove_response_header("content-length");
                    self.replace_body = true;
                }
            }
            if let Some(route) = decision.route_header {
                abi::add_response_header(ROUTE_HEADER, route.as_bytes());
            }
            if let Some(level) = decision.degraded {
                abi::add_response_header(DEGRADED_HEADER, level.as_bytes());
            }
            if let Some(status) = decision.rate_limit.filter(|s| s.form == Combined) {
                let value = CombinedRateLimit::new(
                    u64::from(status.limit),
                    u64::from(status.remaining),
                    status.reset_seconds(),
                );
                abi::add_response_header(RATELIMIT, value.as_bytes());
            } else if let Some(status) = decision.rate_limit {
                abi::add_response_header(
                    RATELIMIT_LIMIT,
                    Decimal::new(u64::from(status.limit)).as_bytes(),
                );
                abi::add_response_header(
                    RATELIMIT_REMAINING,
                    Decimal::new(u64::from(status.remaining)).as_bytes(),
                );
                abi::add_response_header(
                    RATELIMIT_RESET,
                    Decimal::new(status.reset_seconds()).as_bytes(),
                );
            }
        }
        Action::Continue
    }

    /// Drops the upstream's body chunk by chunk and puts the fault's body in its place at the end.
    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.response_complete |= end_of_stream;
        if !self.replace_body {
            return Action::Continue;
        }
        let body = match (&self.engine, &self.state) {
            (Some(engine), Some(state)) if end_of_stream => {
                engine.response_fault_body(state).unwrap_or_default()
            }
            _ => &[],
        };
        abi::replace_response_body(body_size, body);
        Action::Continue
    }

    /// The stream is done, answered or not: the one place every admitted request reports its
    /// outcome, so a probe whose client went away still gives back its slot, and a delayed
    /// request whose client left gives back its active-fault slot.
    fn on_log(&mut self) {
        #[cfg(feature = "alloc-count")]
        if let Some(stats) = self.worker.try_borrow().ok().and_then(|w| w.allocations) {
            stats.report(&HostMetrics);
        }
        self.finish();
        // Last, so the stream's own outcome calls count for it.
        #[cfg(feature = "hostcall-count")]
        if let Some(stats) = self.worker.try_borrow().ok().and_then(|w| w.hostcalls) {
            stats.report(abi::increment_metric_uncounted);
        }
    }
}

impl Stream {
    /// Takes the stream out of the pause queue and settles its outcome.
    fn finish(&mut self) {
        if self.paused {
            if let Ok(mut worker) = self.worker.try_borrow_mut() {
                let context_id = self.context_id;
                worker.paused.retain(|p| p.context_id != context_id);
            }
        }
        let (Some(engine), Some(state)) = (&self.engine, &self.state) else {
            return;
        };
        if engine.wants_outcome(state) {
            // The response's headers were timed already; a stream that got none is timed now.
            let now = state
                .responded
                .unwrap_or_else(|| Timestamp::from_nanos(abi::now_nanos()));
            let mut response = HostResponse {
                status: state.response_status,
                complete: self.response_complete,
                headers: None,
            };
            engine.on_stream_end(state, &mut response, now, &HostStore, &engine.metrics);
        }
    }
}

/// Overwrites every retry header a client could have sent with the engine's grant, so no client
/// can retry beyond the budget.
fn set_retry_headers(retry: &RetryHeaders<'_>) {
    let [max_retries, retry_on, grpc_retry_on, per_try_timeout, ..] = CLIENT_RETRY_HEADERS;
    if retry.write_max_retries {
        abi::replace_request_header(
            max_retries,
            Decimal::new(u64::from(retry.max_retries)).as_bytes(),
        );
    }
    if let Some(conditions) = retry.retry_on {
        abi::replace_request_header(retry_on, conditions.as_bytes());
    }
    if let Some(conditions) = retry.grpc_retry_on {
        abi::replace_request_header(grpc_retry_on, conditions.as_bytes());
    }
    if let Some(ms) = retry.per_try_timeout_ms {
        abi::replace_request_header(per_try_timeout, Decimal::new(ms).as_bytes());
    }
    for (bit, header) in CLIENT_RETRY_HEADERS.iter().enumerate() {
        if retry.remove & (1 << bit) != 0 {
            abi::remove_request_header(header);
        }
    }
}

/// Envoy's record of how the stream ended, and its response headers. `status` is the status
/// read from the response headers; without it no response was sent.
#[derive(Default)]
struct HostResponse {
    status: Option<u16>,
    /// The response ran to its end.
    complete: bool,
    /// The response's headers, when they were read at once (the map wire form).
    headers: Option<Vec<u8>>,
}

impl ResponseHeaders for HostResponse {
    fn header(&mut self, name: &str) -> Option<Cow<'_, [u8]>> {
        match &self.headers {
            Some(map) => HeaderPairs::new(map)
                .find(|(found, _)| *found == name.as_bytes())
                .and_then(|(_, value)| map.get(value))
                .map(Cow::Borrowed),
            None => abi::response_header(name).map(Cow::Owned),
        }
    }
}

const RESPONSE_FLAGS: &[u8] = b"response\0flags";
const RESPONSE_GRPC_STATUS: &[u8] = b"response\0grpc_status";

impl ResponseFacts for HostResponse {
    fn status(&mut self) -> Option<u16> {
        self.status
    }

    /// An upstream failure (reset, timeout, refused connection) either makes Envoy answer with
    /// its own 5xx or cuts the response short. So a response below 500 that ran to its end has no
    /// failure flag, and the property read (the dearest host call) is spared for it.
    fn flags(&mut self) -> u64 {
        if self.complete && self.status.is_some_and(|status| status < 500) {
            return 0;
        }
        abi::property_int(RESPONSE_FLAGS).map_or(0, |flags| flags as u64)
    }

    fn grpc_status(&mut self) -> Option<u32> {
        abi::property_int(RESPONSE_GRPC_STATUS).and_then(|code| u32::try_from(code).ok())
    }
}

/// Reads request attributes of the stream Envoy is currently calling back for.
struct HostRequest;

impl AttributeSource for HostRequest {
    fn read(&mut self, attribute: &Attribute) -> Option<Vec<u8>> {
        match attribute {
            Attribute::Header(name) => abi::request_header(name),
            Attribute::Property(path) => abi::property(path.as_bytes()),
        }
    }

    fn read_header_map(&mut self) -> Option<Vec<u8>> {
        abi::request_header_map()
    }

    fn remove_header(&mut self, name: &str) {
        abi::remove_request_header(name);
    }
}

/// Envoy's stats through proxy-wasm metrics.
struct HostMetrics;

impl MetricsRegistry for HostMetrics {
    fn define(&mut self, kind: MetricKind, name: &str) -> Result<MetricId, MetricsError> {
        let kind = match kind {
            MetricKind::Counter => 0,
            MetricKind::Gauge => 1,
            MetricKind::Histogram => 2,
        };
        abi::define_metric(kind, name)
            .map(MetricId)
            .map_err(|_| MetricsError {
                name: name.to_owned(),
            })
    }
}

impl MetricSink for HostMetrics {
    fn increment(&self, id: MetricId, delta: i64) {
        abi::increment_metric(id.0, delta);
    }

    fn set(&self, id: MetricId, value: u64) {
        abi::record_metric(id.0, value);
    }
}

/// Proxy shared data.
struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str, out: &mut [u8]) -> Result<Lookup, StoreError> {
        match abi::get_shared(key, out) {
            abi::SharedRead::Missing => Ok(Lookup::Missing),
            abi::SharedRead::Found { len, cas } => Ok(Lookup::Found {
                len,
                cas: (cas != 0).then_some(Cas(cas)),
            }),
            abi::SharedRead::Failed(status) => Err(StoreError::Host(status)),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<Cas>) -> Result<(), StoreError> {
        match abi::set_shared(key, value, cas.map_or(0, |c| c.0)) {
            abi::OK => Ok(()),
            abi::CAS_MISMATCH => Err(StoreError::CasMismatch),
            status => Err(StoreError::Host(status)),
        }
    }
}

impl LocalReplies for ReplyBuffer {
    fn send_local_reply(&mut self, reply: &LocalReply<'_>) {
        let headers = self.serialize(reply);
        abi::send_local_response(
            u32::from(reply.status),
            headers,
            reply.body,
            reply.grpc_status,
        );
    }
}

/// Whether a warning last logged at `warned_at` may be logged again at `now`: at most once a
/// minute, so a cluster that stays missing does not flood Envoy's log from every tick.
fn warn_again(warned_at: &mut Option<Timestamp>, now: Timestamp) -> bool {
    let quiet =
        warned_at.is_some_and(|at| now.saturating_since(at) < core::time::Duration::from_secs(60));
    if !quiet {
        *warned_at = Some(now);
    }
    !quiet
}
