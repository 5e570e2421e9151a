//! Property test of replication: a replica that applies the delta of every change the
//! primary makes — acquires with and without ids, plan switches that re-lay the
//! subject out, settlements, touches, assignments, a clock that steps back — holds
//! exactly the primary's state after every step, and every state the primary reaches
//! saves and loads back to itself.

#![allow(clippy::indexing_slicing, clippy::unwrap_used)] // test code

use std::sync::Arc;

use proptest::prelude::*;
use tollgate_core::change::{Change, Delta};
use tollgate_core::codec::Writer;
use tollgate_core::decide::{self, Call, Costs, Pair, Settings};
use tollgate_core::delta::{write_expiry, KeyExpiry};
use tollgate_core::layout::LayoutInterner;
use tollgate_core::plan::Plans;
use tollgate_core::subject::{Expiry, Subject, ENCODING_VERSION};

const START: u64 = 1_763_769_600_000;
const PLANS: [&str; 3] = ["a", "b", "c"];

#[derive(Debug, Clone)]
enum Op {
    Acquire {
        plan: usize,
        tokens: u64,
        id: Option<u8>,
    },
    Release {
        id: u8,
        tokens: u64,
    },
    Touch {
        id: u8,
        ttl: u64,
    },
    Assign(Option<usize>),
    Advance(u64),
    StepBack(u64),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let id = proptest::option::of(0u8..6);
    proptest::collection::vec(
        prop_oneof![
            5 => (0usize..3, 0u64..400, id).prop_map(|(plan, tokens, id)| Op::Acquire { plan, tokens, id }),
            2 => (0u8..6, 0u64..400).prop_map(|(id, tokens)| Op::Release { id, tokens }),
            1 => (0u8..6, 1u64..5_000).prop_map(|(id, ttl)| Op::Touch { id, ttl }),
            1 => proptest::option::of(0usize..3).prop_map(Op::Assign),
            3 => (0u64..3_000).prop_map(Op::Advance),
            1 => (0u64..2_000).prop_map(Op::StepBack),
        ],
        1..80,
    )
}

fn plans(interner: &mut LayoutInterner) -> Plans {
    let mut plans = Plans::new();
    // One budget (`rpm`, `tpm`) counted three ways, plus leases.
    let fields: [&[(&str, &str)]; 3] = [
        &[
            ("rpm", "sliding 20/10s precision 5"),
            ("tpm", "bucket 1000 token/10s"),
            ("jobs", "concurrency 3 ttl 4s"),
        ],
        &[("rpm", "fixed 20/10s"), ("tpm", "fixed 1500 token/10s")],
        &[
            ("rpm", "bucket 20/10s"),
            ("tpm", "sliding 1000 token/20s precision 4"),
            ("jobs", "concurrency 2 ttl 2s"),
            ("fallback", "b"),
        ],
    ];
    for (name, fields) in PLANS.iter().zip(fields) {
        plans.set(name, fields, interner).unwrap();
    }
    plans
}

/// Applies `change` to the primary and its delta to the replica, as the module does:
/// the key's expiry travels with the delta, and an idle subject's key is deleted.
fn ship(
    change: Change,
    primary: &mut Option<Subject>,
    replica: &mut Option<Subject>,
    interner: &mut LayoutInterner,
) -> Result<(), TestCaseError> {
    let mut w = Writer::new();
    change.encode_ops(&mut w);
    change.apply_to(primary);
    let expiry = match primary.as_ref().map(Subject::expiry) {
        Some(Expiry::Idle) | None => KeyExpiry::Delete,
        Some(Expiry::At(at)) => KeyExpiry::At(at),
        Some(Expiry::Never) => KeyExpiry::Persist,
    };
    if expiry == KeyExpiry::Delete {
        *primary = None;
    }
    write_expiry(&mut w, expiry);
    let payload = w.into_inner();
    let delta = Delta::decode(&payload, interner, replica.as_ref())
        .map_err(|e| TestCaseError::fail(format!("replica refused the delta: {e}")))?;
    let delete = delta.expiry == KeyExpiry::Delete;
    match replica.as_mut() {
        Some(r) => delta.apply(r),
        None => *replica = delta.into_new(interner),
    }
    if delete {
        *replica = None;
    }
    prop_assert_eq!(&*primary, &*replica);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_replica_applying_every_delta_holds_the_primary_state(ops in ops()) {
        let mut interner = LayoutInterner::new();
        let plans = plans(&mut interner);
        let settings = Settings::default();
        let (mut primary, mut replica): (Option<Subject>, Option<Subject>) = (None, None);
        let mut clock = START;
        for op in ops {
            match op {
                Op::Acquire { plan, tokens, id } => {
                    let plan = Arc::clone(plans.get(PLANS[plan]).unwrap());
                    let units = [("token", tokens)];
                    let id = id.map(|i| format!("r{i}"));
                    let call = Call {
                        costs: Costs { request: 1, units: &units },
                        id: id.as_deref().map(str::as_bytes),
                        ..Call::default()
                    };
                    let pairs = [Pair { subject: primary.as_ref(), plan: &plan }];
                    let decision = decide::decide(&plans, &pairs, &call, None, clock, &settings);
                    let Ok(committed) = decide::commit(&decision, &pairs, &call, &[], &settings, &mut interner, &|_| false) else {
                        continue;
                    };
                    for change in committed.changes {
                        ship(change, &mut primary, &mut replica, &mut interner)?;
                    }
                }
                Op::Release { id, tokens } => {
                    let id = format!("r{id}");
                    if let Ok((_, change)) = decide::settle(primary.as_ref(), id.as_bytes(), &[("token", tokens)], clock) {
                        ship(change, &mut primary, &mut replica, &mut interner)?;
                    }
                }
                Op::Touch { id, ttl } => {
                    let id = format!("r{id}");
                    if let Ok((_, change)) = decide::touch(primary.as_ref(), id.as_bytes(), ttl, clock) {
                        ship(change, &mut primary, &mut replica, &mut interner)?;
                    }
                }
                Op::Assign(plan) => {
                    let change = Change {
                        assign: Some(plan.map(|p| PLANS[p].into())),
                        ..Change::default()
                    };
                    ship(change, &mut primary, &mut replica, &mut interner)?;
                }
                Op::Advance(dt) => clock += dt,
                Op::StepBack(dt) => clock -= dt.min(clock - START),
            }
            if let Some(subject) = primary.as_ref() {
                let mut w = Writer::new();
                subject.encode(&mut w);
                let loaded = Subject::decode(&w.into_inner(), &mut interner, ENCODING_VERSION);
                prop_assert_eq!(loaded.as_ref(), Ok(subject));
            }
        }
    }
}
