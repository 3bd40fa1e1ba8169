//! The worker every core test drives: one compiled engine with its metrics and scratch, as one
//! Envoy worker holds them, sharing a fake store with the other workers of a test.

use seawall::clock::Timestamp;
use seawall::config::compile;
use seawall::engine::{Engine, RequestDecision};
use seawall::metrics::FakeMetrics;
use seawall::request::{FakeRequest, RequestView, Scratch};
use seawall::state::fake::FakeStore;

/// The deployment secret every test worker adopts (a real one is random, from the host).
pub const TEST_SECRET: u64 = 0x5ea_5ec2e7;

pub struct Worker {
    pub engine: Engine,
    pub metrics: FakeMetrics,
    pub scratch: Scratch,
}

impl Worker {
    /// Compiles `json` and creates its shared-data keys, as `on_configure` does.
    pub fn new(json: &str, store: &FakeStore) -> Worker {
        let mut metrics = FakeMetrics::new();
        let engine = Engine::new(compile(json.as_bytes()).unwrap(), &mut metrics).unwrap();
        engine.prepare_state(store, TEST_SECRET).unwrap();
        let scratch = Scratch::for_plan(&engine.config().attributes);
        Worker {
            engine,
            metrics,
            scratch,
        }
    }

    /// Runs `on_request` for one request at `now` (nanoseconds).
    pub fn send(
        &mut self,
        mut request: FakeRequest,
        now: u64,
        store: &FakeStore,
    ) -> RequestDecision<'_> {
        self.send_to(&mut request, now, store)
    }

    /// `send`, keeping the request to look at what was read and removed.
    pub fn send_to(
        &mut self,
        request: &mut FakeRequest,
        now: u64,
        store: &FakeStore,
    ) -> RequestDecision<'_> {
        let mut view =
            RequestView::new(&self.engine.config().attributes, request, &mut self.scratch);
        self.engine
            .on_request(&mut view, Timestamp::from_nanos(now), store, &self.metrics)
    }

    /// A metric by its full name; a name that was never defined fails the test.
    pub fn counter(&self, name: &str) -> i64 {
        self.metrics
            .value(name)
            .unwrap_or_else(|| panic!("metric {name} is not defined"))
    }
}

pub fn get(path: &str) -> FakeRequest {
    FakeRequest::http("GET", path)
}
