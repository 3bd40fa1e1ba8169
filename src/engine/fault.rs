//! The fault stage: which faults a request gets (aborts, delays, late response faults), the
//! `max_active` slots they hold, and the fault-control headers a client may send.

use crate::clock::Timestamp;
use crate::config::FaultPolicy;
use crate::metrics::{
    metric_name, MetricId, MetricKind, MetricSink, MetricsError, MetricsRegistry,
};
use crate::policy::fault::{
    self, parse_decimal, parse_percent, Active, Draw, Random, Slot, SALT_ABORT, SALT_COHORT,
    SALT_DELAY, SALT_RESPONSE,
};
use crate::policy::route::Route;
use crate::request::{AttributeSource, RequestView};
use crate::state::cas::{ensure, UpdateError};
use crate::state::{SharedStore, StoreError};
use core::time::Duration;

use super::limits::key_hash;
use super::*;

/// Added to every injected abort, so an experiment's errors are never mistaken for real ones.
pub const FAULT_HEADER: &str = "x-seawall-fault";

/// A fault policy's metrics and ready-made abort headers.
#[derive(Debug)]
pub(super) struct FaultRuntime {
    pub(super) metrics: FaultMetrics,
    pub(super) abort_headers: Vec<(String, String)>,
}

impl FaultRuntime {
    /// Defines the policy's metrics and builds its abort headers.
    pub(super) fn new(
        policy: &FaultPolicy,
        registry: &mut impl MetricsRegistry,
    ) -> Result<Self, MetricsError> {
        let mut define = |kind: MetricKind, name: &str| {
            registry.define(kind, &metric_name("fault", &policy.name, name))
        };
        let mut counter = |name: &str| define(MetricKind::Counter, name);
        let metrics = FaultMetrics {
            aborts: counter("aborts")?,
            delays: counter("delays")?,
            response_faults: counter("response_faults")?,
            overflow: counter("overflow")?,
            inactive: counter("inactive")?,
            header_control_applied: counter("header_control_applied")?,
            header_control_rejected: counter("header_control_rejected")?,
            cas_retries: counter("cas_retries")?,
            cas_exhausted: counter("cas_exhausted")?,
            store_errors: counter("store_errors")?,
            active: define(MetricKind::Gauge, "active")?,
        };
        let mut abort_headers = policy
            .abort
            .as_ref()
            .map(|abort| abort.reply.headers.clone())
            .unwrap_or_default();
        abort_headers.push((FAULT_HEADER.to_owned(), "abort".to_owned()));
        Ok(FaultRuntime {
            metrics,
            abort_headers,
        })
    }
}

/// `seawall.fault.<name>.<counter>`; `active` is a gauge.
#[derive(Debug, Clone, Copy)]
pub(super) struct FaultMetrics {
    pub(super) aborts: MetricId,
    pub(super) delays: MetricId,
    pub(super) response_faults: MetricId,
    pub(super) active: MetricId,
    pub(super) overflow: MetricId,
    pub(super) inactive: MetricId,
    pub(super) header_control_applied: MetricId,
    pub(super) header_control_rejected: MetricId,
    pub(super) cas_retries: MetricId,
    pub(super) cas_exhausted: MetricId,
    pub(super) store_errors: MetricId,
}

/// Faults a request asked for by header (with the right secret): value and share in ppm.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct AskedFaults {
    pub(super) abort: Option<(u16, u32)>,
    pub(super) delay: Option<(Duration, u32)>,
}

impl Engine {
    /// Whether any route can delay a request: the host then ticks to resume paused streams.
    pub fn can_delay(&self) -> bool {
        self.config
            .faults
            .iter()
            .any(|f| f.delay.is_some() || f.header_control.is_some())
    }

    /// Seeds this worker's draws for fault percentages (the host uses the time and its context).
    pub fn seed_random(&self, seed: u64) {
        self.random.set(Random::seeded(seed));
    }

    pub(super) fn next_random(&self) -> u64 {
        let mut random = self.random.get();
        let value = random.next_u64();
        self.random.set(random);
        value
    }

    /// Creates the `max_active` record of every policy that has one.
    pub(super) fn prepare_fault_slots(
        &self,
        store: &impl SharedStore,
    ) -> Result<usize, StoreError> {
        let mut created = 0;
        for policy in self.config.faults.iter().filter(|p| p.max_active.is_some()) {
            created += usize::from(ensure(store, &policy.active_key, &Active::default())?);
        }
        Ok(created)
    }

    /// The response fault the stream drew, if any: it replaces the upstream's status (and body).
    pub(super) fn response_fault(
        &self,
        stream: &StreamState,
        metrics: &impl MetricSink,
    ) -> Option<FaultedResponse<'_>> {
        let position = stream.faults.response?;
        let route = self.config.routes.get(stream.route?)?;
        let index = *route.policies.faults.get(usize::from(position))?;
        let response = self.config.faults.get(index)?.response.as_ref()?;
        metrics.increment(self.faults.get(index)?.metrics.response_faults, 1);
        Some(FaultedResponse {
            status: response.status,
            body: response.body.as_deref(),
        })
    }

    /// The fault-control headers the client sent, whatever the route and whether any fault
    /// policy applies: the secret and the controls never reach an upstream.
    pub(super) fn fault_controls_sent<S: AttributeSource>(
        &self,
        request: &mut RequestView<'_, S>,
    ) -> HeaderSet<'_> {
        let headers = &self.config.fault_control_headers;
        let mut present = 0u64;
        for (bit, &id) in headers.iter().enumerate().take(64) {
            if request.get(id).is_some() {
                present |= 1 << bit;
            }
        }
        HeaderSet {
            plan: Some(&self.config.attributes),
            headers,
            present,
        }
    }

    /// Decides the route's faults for one request: which inject, each taking an active slot
    /// first when capped. The first delay and the first abort (in route order) apply; an abort
    /// with a delay is sent when the delay is over, as Envoy's fault filter does.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn inject<'e, S: AttributeSource>(
        &'e self,
        route: &'e Route,
        request: &mut RequestView<'_, S>,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
        stream: &mut StreamState,
    ) -> Verdict<'e> {
        let mut delay: Option<Duration> = None;
        for (position, &index) in route.policies.faults.iter().enumerate() {
            let (Some(policy), Some(runtime), Ok(position)) = (
                self.config.faults.get(index),
                self.faults.get(index),
                u8::try_from(position),
            ) else {
                continue;
            };
            let counters = &runtime.metrics;
            if !policy.enabled {
                continue;
            }
            if !policy.window.contains(now.as_nanos()) {
                metrics.increment(counters.inactive, 1);
                continue;
            }
            if !policy.when.iter().all(|condition| condition.holds(request)) {
                continue;
            }
            let asked = self.header_control(policy, counters, request, metrics);
            let draw = match &policy.cohort {
                None => None,
                Some(cohort) => {
                    // No secret: a cohort is the same on every Envoy and across restarts, and
                    // choosing one's own membership gains a client nothing.
                    let hash = key_hash(&cohort.key, request, cohort.seed, 0);
                    // Without its key a request is outside the cohort.
                    let Some(hash) = hash else { continue };
                    if !Draw::Sticky(hash).hits(cohort.ppm, SALT_COHORT) {
                        continue;
                    }
                    Some(Draw::Sticky(hash))
                }
            };
            let hits = |ppm: u32, salt: u64| {
                draw.unwrap_or_else(|| Draw::Fresh(self.next_random()))
                    .hits(ppm, salt)
            };
            let abort_status = match (asked.abort, &policy.abort) {
                (Some((status, ppm)), _) => hits(ppm, SALT_ABORT).then_some(status),
                (None, Some(abort)) => hits(abort.ppm, SALT_ABORT).then_some(abort.reply.status),
                (None, None) => None,
            };
            let delay_for = match (asked.delay, &policy.delay) {
                (Some((span, ppm)), _) => hits(ppm, SALT_DELAY).then_some(span),
                (None, Some(configured)) => hits(configured.ppm, SALT_DELAY).then(|| {
                    let mut random = Random::seeded(self.next_random());
                    configured.shape.sample(random.next_f64())
                }),
                (None, None) => None,
            };
            let respond = policy
                .response
                .as_ref()
                .is_some_and(|response| hits(response.ppm, SALT_RESPONSE));
            if abort_status.is_none() && delay_for.is_none() && !respond {
                continue;
            }
            if let Some(max_active) = policy.max_active {
                let (slot, races) =
                    fault::take_slot(store, &policy.active_key, max_active, now.as_nanos());
                if races > 0 {
                    metrics.increment(counters.cas_retries, i64::from(races));
                }
                match slot {
                    Slot::Taken { epoch } => stream.faults.slot_epoch = epoch,
                    Slot::Full => {
                        metrics.increment(counters.overflow, 1);
                        continue;
                    }
                    // Failing safe: no slot, no fault.
                    Slot::Failed(error) => {
                        metrics.increment(
                            match error {
                                UpdateError::Exhausted { .. } => counters.cas_exhausted,
                                UpdateError::Store(_) => counters.store_errors,
                            },
                            1,
                        );
                        continue;
                    }
                }
            }
            stream.faults.holding |= 1 << position;
            metrics.increment(counters.active, 1);
            if let (Some(span), None) = (delay_for, delay) {
                delay = Some(span);
                metrics.increment(counters.delays, 1);
            }
            if let (Some(status), None) = (abort_status, stream.faults.abort) {
                stream.faults.abort = Some((position, status));
            }
            if respond && stream.faults.response.is_none() {
                stream.faults.response = Some(position);
            }
        }
        if stream.faults.abort.is_some() {
            stream.faults.grpc = self.is_grpc(request);
            // The abort answers instead of the upstream: there is no upstream answer to replace.
            stream.faults.response = None;
        }
        match delay {
            Some(span) => Verdict::Pause {
                until: now.saturating_add(span),
            },
            None => self.abort_now(route, stream, metrics),
        }
    }

    /// Reads the fault-control headers of a policy that allows them. They are honoured only with
    /// the secret, capped by `max_percent`; without it, or with a percent that is not one, they
    /// are counted and ignored. Either way they are removed (`fault_controls_sent`), so they
    /// never reach the upstream.
    pub(super) fn header_control<S: AttributeSource>(
        &self,
        policy: &FaultPolicy,
        counters: &FaultMetrics,
        request: &mut RequestView<'_, S>,
        metrics: &impl MetricSink,
    ) -> AskedFaults {
        let Some(control) = &policy.header_control else {
            return AskedFaults::default();
        };
        let mut present = false;
        for id in [
            control.abort,
            control.delay,
            control.percent,
            control.secret_header,
        ] {
            present |= request.get(id).is_some();
        }
        if !present {
            return AskedFaults::default();
        }
        let asks = [control.abort, control.delay, control.percent]
            .into_iter()
            .any(|id| request.peek(id).is_some());
        if !asks {
            return AskedFaults::default();
        }
        let presented = request.peek(control.secret_header).unwrap_or_default();
        if !control.secret.matches(presented) {
            metrics.increment(counters.header_control_rejected, 1);
            return AskedFaults::default();
        }
        // Absent, the percent is 100; present, it must be one (0 to 100): "5%" or "150" asks
        // for nothing rather than for every request.
        let ppm = match request.peek(control.percent).map(parse_percent) {
            None => 1_000_000,
            Some(Some(ppm)) => ppm,
            Some(None) => {
                metrics.increment(counters.header_control_rejected, 1);
                return AskedFaults::default();
            }
        }
        .min(control.max_ppm);
        metrics.increment(counters.header_control_applied, 1);
        AskedFaults {
            abort: request
                .peek(control.abort)
                .and_then(parse_decimal)
                .and_then(|status| u16::try_from(status).ok())
                .filter(|status| (200..=599).contains(status))
                .map(|status| (status, ppm)),
            delay: request
                .peek(control.delay)
                .and_then(parse_decimal)
                .filter(|&ms| ms <= 60_000)
                .map(|ms| (Duration::from_millis(ms), ppm)),
        }
    }

    /// The stream's abort, if it has one, as a reply; otherwise it goes on.
    pub(super) fn abort_now<'e>(
        &'e self,
        route: &'e Route,
        stream: &StreamState,
        metrics: &impl MetricSink,
    ) -> Verdict<'e> {
        let Some((position, status)) = stream.faults.abort else {
            return Verdict::Continue;
        };
        let Some(index) = route.policies.faults.get(usize::from(position)) else {
            return Verdict::Continue;
        };
        let (Some(policy), Some(runtime)) =
            (self.config.faults.get(*index), self.faults.get(*index))
        else {
            return Verdict::Continue;
        };
        metrics.increment(runtime.metrics.aborts, 1);
        let (body, grpc_status) = match &policy.abort {
            Some(abort) => (abort.reply.body.as_slice(), abort.grpc_status),
            None => (&[][..], GRPC_UNAVAILABLE),
        };
        Verdict::Reply(LocalReply {
            status,
            body,
            headers: &runtime.abort_headers,
            retry_after: None,
            grpc_status: stream.faults.grpc.then_some(grpc_status),
            rate_limit: None,
            degraded: None,
        })
    }

    /// The host could not queue a delayed request (its queue is full): the delay is skipped and
    /// counted as an overflow, and the request goes on at once, or gets its abort at once if the
    /// delay carried one.
    pub fn delay_not_queued(&self, stream: &StreamState, metrics: &impl MetricSink) -> Verdict<'_> {
        let Some(route) = stream.route.and_then(|index| self.config.routes.get(index)) else {
            return Verdict::Continue;
        };
        let position = stream.faults.holding.trailing_zeros() as usize;
        let first = route.policies.faults.get(position);
        if let Some(runtime) = first.and_then(|&index| self.faults.get(index)) {
            metrics.increment(runtime.metrics.overflow, 1);
        }
        self.abort_now(route, stream, metrics)
    }

    pub fn response_fault_body(&self, stream: &StreamState) -> Option<&[u8]> {
        let position = stream.faults.response?;
        let route = self.config.routes.get(stream.route?)?;
        let index = *route.policies.faults.get(usize::from(position))?;
        self.config
            .faults
            .get(index)?
            .response
            .as_ref()?
            .body
            .as_deref()
    }

    /// A paused stream's delay is over: it goes on, or gets the abort that followed the delay.
    pub fn on_resume(&self, stream: &StreamState, metrics: &impl MetricSink) -> Verdict<'_> {
        match stream.route.and_then(|index| self.config.routes.get(index)) {
            Some(route) => self.abort_now(route, stream, metrics),
            None => Verdict::Continue,
        }
    }

    /// Gives back the active-fault slots (and gauge) a finished stream held.
    pub(super) fn release_faults(
        &self,
        route: &Route,
        faults: &FaultState,
        now: Timestamp,
        store: &impl SharedStore,
        metrics: &impl MetricSink,
    ) {
        for (position, &index) in route.policies.faults.iter().enumerate().take(8) {
            if faults.holding & (1 << position) == 0 {
                continue;
            }
            let (Some(policy), Some(runtime)) =
                (self.config.faults.get(index), self.faults.get(index))
            else {
                continue;
            };
            let counters = &runtime.metrics;
            metrics.increment(counters.active, -1);
            if policy.max_active.is_some() {
                match fault::give_back_slot(
                    store,
                    &policy.active_key,
                    faults.slot_epoch,
                    now.as_nanos(),
                ) {
                    Ok(races) if races > 0 => {
                        metrics.increment(counters.cas_retries, i64::from(races))
                    }
                    Ok(_) => {}
                    // The cap stays stricter until the slot's epoch is written off (at most
                    // two `SLOT_EPOCH`s after it was taken).
                    Err(UpdateError::Exhausted { .. }) => {
                        metrics.increment(counters.cas_exhausted, 1)
                    }
                    Err(UpdateError::Store(_)) => metrics.increment(counters.store_errors, 1),
                }
            }
        }
    }
}
