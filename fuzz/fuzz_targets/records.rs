//! Every record seawall keeps in shared data, read back from bytes that another build, another
//! policy, a truncated write or plain corruption left under its key.
//!
//! Shared data outlives a plugin build and holds whatever was last written, so each decoder must
//! take any bytes without panicking, and each policy's decision on what it decoded must stay
//! within what its config allows: never more tokens than the burst, never more half-open probes
//! than configured, never a longer lock-out than the longest open period, never more active faults
//! than `max_active`, never more retries than the budget holds, never a lease that outlives its
//! term. Records go through the store and the real CAS read (`state::cas`), which is where the
//! layout byte and the length are checked.
#![no_main]

use core::time::Duration;

use libfuzzer_sys::fuzz_target;
use seawall::clock::READING_SKEW;

use seawall::policy::circuit_breaker::{
    self as breaker, Admission, Breaker, BreakerState, Records, TripRules,
};
use seawall::policy::degradation::{
    self as degradation, claim, throttle_ppm, AdmissionWindow, Health, Lease, ProbeThresholds,
};
use seawall::policy::fault::{self, Active};
use seawall::policy::global_limit::{self, KeyedTake, Tokens, Values, Wanted, WANTED_CAPACITY};
use seawall::policy::key::Secret;
use seawall::policy::rate_limit::{self, Acquired, Gcra, Tat};
use seawall::policy::retry::{self, BudgetState, Exchange, Grant};
use seawall::state::cas::{self, Record};
use seawall::state::fake::FakeStore;
use seawall::state::generation::{self, Generation};
use seawall::state::SharedStore;

const KEY: &str = "sw:fuzz:record";

#[derive(Debug, Clone, Copy)]
enum Kind {
    Tat,
    Secret,
    Generation,
    Breaker,
    Budget,
    Active,
    Health,
    OutcomeWindow,
    Admissions,
    GlobalBucket,
    Wanted,
    Values,
}

const KINDS: [Kind; 12] = [
    Kind::Tat,
    Kind::Secret,
    Kind::Generation,
    Kind::Breaker,
    Kind::Budget,
    Kind::Active,
    Kind::Health,
    Kind::OutcomeWindow,
    Kind::Admissions,
    Kind::GlobalBucket,
    Kind::Wanted,
    Kind::Values,
];

/// Bytes before the stored value: which record and the policy's knobs. A plain layout rather
/// than `arbitrary`'s, so that seeds are a header and a record as the real encoder wrote it
/// (`examples/seeds.rs`).
const HEADER: usize = 20;

/// The fuzzer's input: `kind, flag, c (u16), a, b, now_secs, now_nanos (u32)`, little-endian,
/// then the value stored under the record's key, verbatim (its layout byte first, when it has
/// one: a foreign or missing layout byte is part of what is fuzzed).
#[derive(Debug)]
struct Input<'a> {
    kind: Kind,
    flag: bool,
    c: u16,
    a: u32,
    b: u32,
    now_secs: u32,
    now_nanos: u32,
    stored: &'a [u8],
}

impl<'a> Input<'a> {
    fn parse(data: &'a [u8]) -> Option<Self> {
        let (header, stored) = data.split_at_checked(HEADER)?;
        let u32_at = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        Some(Input {
            kind: KINDS[usize::from(header[0]) % KINDS.len()],
            flag: header[1] & 1 == 1,
            c: u16::from_le_bytes([header[2], header[3]]),
            a: u32_at(4),
            b: u32_at(8),
            now_secs: u32_at(12),
            now_nanos: u32_at(16),
            stored,
        })
    }

    fn now(&self) -> u64 {
        1_700_000_000_000_000_000
            + u64::from(self.now_secs) * 1_000_000_000
            + u64::from(self.now_nanos % 1_000_000_000)
    }
}

/// Stores the bytes, reads them back through the CAS layer and checks what it may accept:
/// only a value of exactly the record's length and layout byte is decoded, and decoding it
/// again after re-encoding gives the same record.
fn stored_record<const N: usize, R>(input: &Input) -> (FakeStore, Option<R>)
where
    R: Record<N> + PartialEq + core::fmt::Debug,
{
    let store = FakeStore::new();
    let stored = input.stored;
    store.set(KEY, stored, None).expect("fake store set");
    let read = cas::read::<N, R, _>(&store, KEY).expect("fake store get");
    let acceptable = stored.len() == N + 1 && stored[0] == R::LAYOUT;
    assert_eq!(
        read.is_some(),
        acceptable,
        "a value of {} bytes with layout {:?} (want {} bytes, layout {:#x})",
        stored.len(),
        stored.first(),
        N + 1,
        R::LAYOUT
    );
    let record = read.map(|(record, _)| record);
    if let Some(record) = &record {
        assert_eq!(
            &R::decode(&record.encode()),
            record,
            "decode(encode(r)) != r"
        );
    }
    (store, record)
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let now = input.now();
    match input.kind {
        Kind::Tat => {
            let (store, tat) = stored_record::<24, Tat>(&input);
            // A rate and burst as the compiler makes them: 1 ns to 1 h per token, burst >= 1.
            let interval = Duration::from_nanos(1 + u64::from(input.a) * 1_000);
            let burst = 1 + input.b % 2048;
            let gcra = Gcra::new(interval, burst);
            // A record in any terms (another config's, or garbage) reads as at most this burst.
            assert!(gcra.available(gcra.arrival(tat, now), now) <= u64::from(burst));
            // Every request at one instant: at most `burst` tokens, however the record read.
            let wants = u32::from(input.c);
            let mut tokens = 0u64;
            for _ in 0..=burst {
                let (acquired, _) = if input.flag {
                    rate_limit::acquire_leasing(&gcra, &store, KEY, now, 0, wants)
                } else {
                    rate_limit::acquire(&gcra, &store, KEY, now)
                };
                match acquired {
                    Acquired::Allowed { remaining, .. } => {
                        tokens += 1;
                        assert!(remaining < burst, "remaining {remaining} of burst {burst}");
                    }
                    Acquired::Leased {
                        tokens: leased,
                        remaining,
                        ..
                    } => {
                        tokens += u64::from(leased);
                        assert!(remaining < burst, "remaining {remaining} of burst {burst}");
                    }
                    Acquired::Limited { .. } => break,
                    Acquired::Failed(failure) => panic!("fake store failed: {failure:?}"),
                }
            }
            assert!(
                tokens <= u64::from(burst),
                "{tokens} tokens at one instant from a bucket of burst {burst} (record {tat:?})"
            );
        }
        Kind::GlobalBucket => {
            let (store, bucket) = stored_record::<65, Tokens>(&input);
            // The record's own client (an existing owner), or another one (a takeover or busy).
            let owner = match (input.flag, bucket) {
                (true, Some(bucket)) => bucket.owner.max(1),
                _ => u64::from(input.a).max(1),
            };
            let credit = u32::from(input.c % 64);
            let held = bucket.filter(|b| b.owner == owner).map_or(0, |b| b.tokens);
            // Every request at one instant: at most what the record held for this client and
            // the credit, however the record read; a busy slot admits nothing.
            let mut admitted = 0u64;
            for _ in 0..held.min(4_096) + u64::from(credit) + 2 {
                match global_limit::take_keyed(&store, KEY, owner, credit, now) {
                    Ok((KeyedTake::Allowed { .. }, _)) => admitted += 1,
                    Ok(_) => break,
                    Err(error) => panic!("fake store failed: {error:?}"),
                }
            }
            if held < 4_096 {
                assert!(
                    admitted <= held + u64::from(credit),
                    "{admitted} admitted from {held} tokens and {credit} credit ({bucket:?})"
                );
            }
        }
        Kind::Wanted => {
            let (store, _) = stored_record::<132, Wanted>(&input);
            let slot = input.a;
            let pushed = global_limit::push_wanted(&store, KEY, slot).expect("push");
            let wanted = global_limit::take_wanted(&store, KEY).expect("take");
            assert!(wanted.slots().len() <= WANTED_CAPACITY);
            if pushed {
                assert!(
                    wanted.slots().contains(&slot),
                    "pushed {slot}, not in {wanted:?}"
                );
            }
            assert!(global_limit::take_wanted(&store, KEY)
                .expect("take")
                .slots()
                .is_empty());
        }
        Kind::Values => {
            // A values record as the tick reads it: whatever bytes, no panic, no read past them.
            if let Some((_, runs)) = Values::parse(input.stored) {
                let total: usize = Values::runs_of(runs).map(|v| v.len() + 1).sum();
                assert!(total <= runs.len());
            }
        }
        Kind::Secret => {
            let _ = stored_record::<8, Secret>(&input);
        }
        Kind::Generation => {
            let (store, _) = stored_record::<12, Generation>(&input);
            let fingerprint = u64::from(input.a) << 32 | u64::from(input.b);
            let number = generation::adopt(&store, KEY, fingerprint).expect("adopt");
            assert_ne!(number, 0, "0 is nobody's generation");
            assert_eq!(generation::is_current(&store, KEY, number), Some(true));
            assert_eq!(generation::adopt(&store, KEY, fingerprint), Ok(number));
        }
        Kind::Breaker => {
            let (store, state) = stored_record::<{ breaker::RECORD_LEN }, BreakerState>(&input);
            let open_for = Duration::from_millis(1 + u64::from(input.a % 600_000));
            let max_open_for = open_for.max(Duration::from_millis(u64::from(input.b % 3_600_000)));
            let probes = 1 + input.c % 100;
            let policy = Breaker {
                rules: TripRules {
                    consecutive_failures: Some(1 + input.a % 50),
                    failure_rate_ppm: input.flag.then_some(500_000),
                    slow_call_rate_ppm: None,
                    min_requests: input.b % 100,
                    bucket_nanos: 1_000_000_000,
                },
                open_for,
                max_open_for,
                half_open_probes: probes,
            };
            // The pure state machine on the decoded record, as its own key: every request at one
            // instant, each decided on the record the one before left.
            if let Some(mut state) = state {
                let mut probed = 0u32;
                for _ in 0..=u32::from(probes) + 1 {
                    let (admission, change) = policy.admit(&state, now);
                    match admission {
                        Admission::Probe { .. } => probed += 1,
                        // An open period runs at most `max_open_for` from the latest reading of
                        // the clock that another worker may have written it with.
                        Admission::Reject { retry_after, .. } => assert!(
                            retry_after <= max_open_for.max(Duration::from_secs(1)) + READING_SKEW,
                            "locked out for {retry_after:?}, longer than max_open_for {max_open_for:?}"
                        ),
                        Admission::Pass { .. } => {}
                    }
                    if let Some(change) = change {
                        state = change.state;
                    }
                }
                assert!(
                    probed <= u32::from(probes),
                    "{probed} probes at once, {probes} allowed"
                );
            }
            // And through the store, as a route's single record.
            let owner = 1 + u64::from(input.a);
            let _ = breaker::admit(&policy, &store, Records::One(KEY), owner, now);
        }
        Kind::Budget => {
            let (_, state) = stored_record::<{ retry::RECORD_LEN }, BudgetState>(&input);
            let Some(mut state) = state else { return };
            let budget = retry::Budget {
                ratio_ppm: input.a % 1_000_001,
                floor: input.b % 100_000,
                bucket_nanos: 1 + u64::from(input.c) * 1_000_000,
            };
            let epoch = budget.epoch(now);
            let before = budget.remaining(&state.window.totals(epoch));
            let mut granted = 0u64;
            for _ in 0..64 {
                let ask = Exchange {
                    wanted: 1 + input.b % 5,
                    lease: if input.flag { input.a % 64 } else { 0 },
                    ..Exchange::NOTHING
                };
                let got = ask.apply(&budget, &mut state, now);
                // The longest honoured, plus what a later reading of the clock can explain.
                assert!(
                    got.pushed_back_until <= now + 60_000_000_000 + READING_SKEW.as_nanos() as u64,
                    "push-back beyond the longest honoured"
                );
                match got.grant {
                    Grant::Granted { retries, .. } => {
                        let this = u64::from(retries) + u64::from(got.leased);
                        if this == 0 {
                            break;
                        }
                        granted += this;
                    }
                    Grant::PushedBack => break,
                }
            }
            assert!(
                granted <= u64::from(before),
                "{granted} retries granted from a budget that held {before}"
            );
        }
        Kind::Active => {
            let (store, _) = stored_record::<8, Active>(&input);
            let max_active = 1 + u64::from(input.c % 64);
            let mut taken = 0u64;
            for _ in 0..=max_active {
                match fault::take_slot(&store, KEY, max_active, now).0 {
                    fault::Slot::Taken { .. } => taken += 1,
                    fault::Slot::Full => break,
                    fault::Slot::Failed(error) => panic!("fake store failed: {error:?}"),
                }
            }
            assert!(
                taken <= max_active,
                "{taken} faults active, {max_active} allowed"
            );
        }
        Kind::Health => {
            let (_, health) = stored_record::<{ degradation::HEALTH_LEN }, Health>(&input);
            let Some(health) = health else { return };
            let thresholds = ProbeThresholds {
                healthy_after: 1 + input.c % 10,
                unhealthy_after: 1 + (input.c >> 8) % 10,
            };
            let _ = health.with_probe_result(input.flag, thresholds);
            // Another worker's lease, however it reads, lapses within one term of when it is
            // first seen, plus what a later reading of the clock can explain: free now, or free
            // that much later. A claimed lease runs one term.
            let ttl = 1 + u64::from(input.a);
            let me = 2 + u64::from(input.b);
            let (at, lease) = match claim(health.lease, me, now, ttl) {
                Some(lease) => (now, Some(lease)),
                None => {
                    let later = now
                        .saturating_add(ttl)
                        .saturating_add(READING_SKEW.as_nanos() as u64);
                    (later, claim(health.lease, me, later, ttl))
                }
            };
            assert_eq!(
                lease,
                Some(Lease {
                    holder: me,
                    until: at.saturating_add(ttl)
                }),
                "the lease {:?} is still held a term after {now}",
                health.lease
            );
        }
        Kind::OutcomeWindow => {
            let (_, window) =
                stored_record::<{ degradation::WINDOW_LEN }, degradation::Window>(&input);
            if let Some(window) = window {
                let _ = window.totals(degradation::bucket(now, 1 + u64::from(input.a)));
            }
        }
        Kind::Admissions => {
            let (_, window) =
                stored_record::<{ degradation::ADMISSION_LEN }, AdmissionWindow>(&input);
            if let Some(window) = window {
                let totals = window.totals(degradation::bucket(now, 1 + u64::from(input.a)));
                let max_ppm = input.b % 1_000_001;
                let ppm = throttle_ppm(
                    totals.requests,
                    totals.accepts,
                    1000 + input.a % 9000,
                    max_ppm,
                );
                assert!(ppm <= max_ppm);
            }
        }
    }
});
