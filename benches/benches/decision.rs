//! Criterion benches of the core decision: what one `RL.ACQUIRE` costs before Redis.

#![allow(clippy::panic)] // a bench: a broken setup should stop it loudly

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate_core::decide::{commit, decide, settle, Call, Costs, Pair, Settings};
use tollgate_core::layout::LayoutInterner;
use tollgate_core::plan::Plans;
use tollgate_core::subject::Subject;

const T0: u64 = 1_763_769_600_000;

fn plans(interner: &mut LayoutInterner) -> Plans {
    let mut plans = Plans::new();
    let one = [("rpm", "sliding 1000000/1m")];
    let three = [
        ("rpm", "sliding 1000000/1m"),
        ("rpd", "fixed 100000000/1d"),
        ("tpm", "bucket 100000000 token/1m"),
    ];
    let four = [
        ("rpm", "sliding 1000000/1m"),
        ("rpd", "fixed 100000000/1d"),
        ("tpm", "bucket 100000000 token/1m"),
        ("jobs", "concurrency 1000000 ttl 60s"),
    ];
    for (name, fields) in [
        ("one", &one[..]),
        ("three", &three[..]),
        ("four", &four[..]),
    ] {
        if let Err(e) = plans.set(name, fields, interner) {
            panic!("{e}");
        }
    }
    plans
}

/// One acquire on `subject` at `now`: decide, and if admitted commit and apply.
fn acquire_once(
    plans: &Plans,
    plan: &Arc<tollgate_core::plan::Plan>,
    subject: &mut Option<Subject>,
    call: &Call<'_>,
    now: u64,
    settings: &Settings,
    interner: &mut LayoutInterner,
) -> Option<Box<[u8]>> {
    let pairs = [Pair {
        subject: subject.as_ref(),
        plan,
    }];
    let decision = decide(plans, &pairs, call, None, now, settings);
    if !decision.admitted() {
        return None;
    }
    let committed = commit(&decision, &pairs, call, &[], settings, interner, &|_| false).ok()?;
    for change in committed.changes {
        change.apply_to(subject);
    }
    committed.id
}

fn acquire(c: &mut Criterion) {
    let mut interner = LayoutInterner::new();
    let plans = plans(&mut interner);
    let settings = Settings::default();
    let tokens = [("token", 100u64)];
    let call = Call {
        costs: Costs {
            request: 1,
            units: &tokens,
        },
        ..Call::default()
    };
    for name in ["one", "three"] {
        let plan = Arc::clone(plans.get(name).unwrap_or_else(|| unreachable!()));
        let mut subject = Some(Subject::new(Arc::clone(&plan.layout), T0));
        let mut now = T0;
        c.bench_function(
            &format!("acquire {name}-limit plan (decide + commit + apply)"),
            |b| {
                b.iter(|| {
                    now += 1;
                    black_box(acquire_once(
                        &plans,
                        &plan,
                        &mut subject,
                        &call,
                        now,
                        &settings,
                        &mut interner,
                    ))
                })
            },
        );
        c.bench_function(&format!("peek {name}-limit plan (decide)"), |b| {
            b.iter(|| {
                let pairs = [Pair {
                    subject: subject.as_ref(),
                    plan: &plan,
                }];
                black_box(decide(&plans, &pairs, &call, None, now, &settings))
            })
        });
    }
    let plan = Arc::clone(plans.get("four").unwrap_or_else(|| unreachable!()));
    let mut subject = Some(Subject::new(Arc::clone(&plan.layout), T0));
    let mut now = T0;
    c.bench_function("acquire + release 4-limit plan with a lease", |b| {
        b.iter(|| {
            now += 1;
            let id = acquire_once(
                &plans,
                &plan,
                &mut subject,
                &call,
                now,
                &settings,
                &mut interner,
            );
            if let Some(id) = id {
                if let Ok((settled, change)) = settle(subject.as_ref(), &id, &tokens, now) {
                    change.apply_to(&mut subject);
                    black_box(settled);
                }
            }
        })
    });
}

criterion_group!(benches, acquire);
criterion_main!(benches);
