//! Criterion benches of the core decision: what one `RL.ACQUIRE` costs before Redis.

#![allow(clippy::panic)] // a bench: a broken setup should stop it loudly

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate_core::decide::{commit, evaluate, Call, Costs, Settings};
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
    let mut out = Vec::new();
    for name in ["one", "three"] {
        let plan = Arc::clone(plans.get(name).unwrap_or_else(|| unreachable!()));
        let mut subject = Subject::new(Arc::clone(&plan.layout), T0);
        let mut now = T0;
        c.bench_function(
            &format!("acquire {name}-limit plan (evaluate + commit)"),
            |b| {
                b.iter(|| {
                    now += 1;
                    let verdict = evaluate(&plan, Some(&subject), &call, now, &settings, &mut out);
                    if verdict.admitted {
                        let _ =
                            black_box(commit(&plan, &mut subject, &call, &verdict, &mut interner));
                    }
                    black_box(verdict)
                })
            },
        );
        c.bench_function(&format!("peek {name}-limit plan (evaluate)"), |b| {
            b.iter(|| {
                black_box(evaluate(
                    &plan,
                    Some(&subject),
                    &call,
                    now,
                    &settings,
                    &mut out,
                ))
            })
        });
    }
    let plan = Arc::clone(plans.get("four").unwrap_or_else(|| unreachable!()));
    let mut subject = Subject::new(Arc::clone(&plan.layout), T0);
    let mut now = T0;
    c.bench_function("acquire + release 4-limit plan with a lease", |b| {
        b.iter(|| {
            now += 1;
            let verdict = evaluate(&plan, Some(&subject), &call, now, &settings, &mut out);
            let id = commit(&plan, &mut subject, &call, &verdict, &mut interner);
            if let Ok(Some(id)) = id {
                black_box(tollgate_core::decide::release(
                    &mut subject,
                    &id,
                    &tokens,
                    now,
                ));
            }
        })
    });
}

criterion_group!(benches, acquire);
criterion_main!(benches);
