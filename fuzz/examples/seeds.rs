//! Writes the `records` target's seed corpus: each record kind encoded by seawall's own encoder
//! (behind its layout byte, as `state::cas` stores it), fresh and in edge states, plus a
//! truncated and a foreign copy of each. Run from `fuzz/`: `cargo run --example seeds`; the files
//! are committed under `corpus/records/`.

use std::fs;
use std::path::Path;

use seawall::policy::circuit_breaker::{BreakerState, Circuit};
use seawall::policy::degradation::{self, AdmissionWindow, Admissions, Health, Lease, ProbeHealth};
use seawall::policy::fault::Active;
use seawall::policy::global_limit::{Tokens, Values, Wanted};
use seawall::policy::key::Form;
use seawall::policy::key::Secret;
use seawall::policy::rate_limit::{Tat, Terms};
use seawall::policy::retry::{self, BudgetState};
use seawall::state::cas::Record;
use seawall::state::generation::Generation;

const NOW_SECS: u32 = 1_000;
const NOW: u64 = 1_700_000_000_000_000_000 + NOW_SECS as u64 * 1_000_000_000;

fn stored<const N: usize, R: Record<N>>(record: &R) -> Vec<u8> {
    let mut out = vec![R::LAYOUT];
    out.extend_from_slice(&record.encode());
    out
}

/// The target's header: kind, flag, c, a, b, now (see `fuzz_targets/records.rs`).
fn input(kind: u8, flag: bool, c: u16, a: u32, b: u32, value: &[u8]) -> Vec<u8> {
    let mut out = vec![kind, u8::from(flag)];
    out.extend_from_slice(&c.to_le_bytes());
    out.extend_from_slice(&a.to_le_bytes());
    out.extend_from_slice(&b.to_le_bytes());
    out.extend_from_slice(&NOW_SECS.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn main() -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/records");
    fs::create_dir_all(&dir)?;
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, kind: u8, value: Vec<u8>| {
        seeds.push((name.to_owned(), input(kind, false, 3, 1_000, 10, &value)));
        seeds.push((
            format!("{name}-flag"),
            input(kind, true, 40, 64, 2_000, &value),
        ));
        // Truncated by one byte, and the same bytes under another kind's layout byte.
        seeds.push((
            format!("{name}-truncated"),
            input(kind, false, 3, 1_000, 10, &value[..value.len() - 1]),
        ));
        let mut foreign = value.clone();
        foreign[0] ^= 0x80;
        seeds.push((
            format!("{name}-foreign"),
            input(kind, false, 3, 1_000, 10, &foreign),
        ));
    };

    // The seeds' own terms: 1 ms a token, a burst of 10; a record in other terms is converted.
    let terms = Terms {
        interval: 1_000_000,
        tolerance: 10_000_000,
    };
    let tat = |at: u64| Tat { at, terms };
    add("tat-fresh", 0, stored(&tat(0)));
    add("tat-ahead", 0, stored(&tat(NOW + 3_600_000_000_000)));
    add("tat-max", 0, stored(&tat(u64::MAX)));
    add(
        "tat-other-terms",
        0,
        stored(&Tat {
            at: NOW + 1_000_000_000,
            terms: Terms {
                interval: 0,
                tolerance: u64::MAX,
            },
        }),
    );
    add("secret", 1, stored(&Secret(0x5ea_5ec2e7)));
    add(
        "generation",
        2,
        stored(&Generation {
            number: 7,
            fingerprint: 0xfeed,
        }),
    );
    add(
        "generation-max",
        2,
        stored(&Generation {
            number: u32::MAX,
            fingerprint: 1,
        }),
    );
    add("breaker-fresh", 3, stored(&BreakerState::fresh()));
    let open = BreakerState {
        circuit: Circuit::Open { until: u64::MAX },
        owner: 1,
        trips: 255,
        ..BreakerState::fresh()
    };
    add("breaker-open-forever", 3, stored(&open));
    let half = BreakerState {
        circuit: Circuit::HalfOpen {
            since: NOW + 1,
            in_flight: u16::MAX,
            successes: 3,
        },
        owner: 1,
        generation: u32::MAX,
        ..BreakerState::fresh()
    };
    add("breaker-half-open", 3, stored(&half));
    add("budget-empty", 4, stored(&BudgetState::empty()));
    let mut busy = BudgetState::empty();
    let epoch = NOW / 1_000_000;
    for number in epoch - 9..=epoch {
        *busy.window.current(number) = retry::Tally {
            requests: u32::MAX,
            retries: u32::MAX / 4,
        };
    }
    busy.pushed_back_until = u64::MAX;
    add("budget-saturated", 4, stored(&busy));

    add(
        "active",
        5,
        stored(&Active {
            epoch: 28_333_350,
            current: u16::MAX,
            previous: 1,
        }),
    );
    let health = Health {
        level: 255,
        since: NOW,
        lease: Lease {
            holder: 9,
            until: u64::MAX,
        },
        probe: ProbeHealth::Unhealthy {
            successes_in_a_row: u16::MAX,
        },
        unknown_streak: i16::MIN,
        next_probe_at: 0,
    };
    add("health", 6, stored(&health));
    add("outcome-window", 7, stored(&degradation::Window::EMPTY));
    let mut admissions = AdmissionWindow::EMPTY;
    admissions.add(
        NOW / 1_001,
        &Admissions {
            requests: u32::MAX,
            accepts: 0,
        },
    );
    add("admissions", 8, stored(&admissions));

    // Global limits: a client's bucket holding tokens and owing credit, a wanted list, and a
    // slot's descriptor values as a request writes them.
    let bucket = Tokens {
        tokens: 7,
        spent: 3,
        spent_at: NOW - 1_000_000,
        owner: 1_000,
        owed: 1,
        last_grant: 8,
        ..Tokens::default()
    };
    add("global-bucket", 9, stored(&bucket));
    let mut wanted = Wanted::default();
    wanted.slots[..3].copy_from_slice(&[1, 2, 3]);
    wanted.len = 3;
    add("wanted", 10, stored(&wanted));
    let mut values = Values::default();
    values.push(Some(b"alice"), Form::Exact);
    values.push(Some(b"/API//items?x=1"), Form::Path);
    values.set_owner(1_000);
    add("values", 11, values.as_record().to_vec());

    // A budget at 100% with a floor of 5 and 1 ns buckets (c = 0), its window saturated at now:
    // what granted retries without end before `Budget::remaining` capped grants at what the
    // window can still count.
    let mut saturated = BudgetState::empty();
    for number in NOW - 9..=NOW {
        *saturated.window.current(number) = retry::Tally {
            requests: u32::MAX,
            retries: u32::MAX / 4,
        };
    }
    seeds.push((
        "budget-saturated-full-ratio".to_owned(),
        input(4, false, 0, 1_000_000, 5, &stored(&saturated)),
    ));

    for (name, bytes) in seeds {
        fs::write(dir.join(name), bytes)?;
    }
    Ok(())
}
