//! A subject in memory, driven through the core's public API on a manual clock.

#![allow(dead_code)]
#![allow(clippy::panic, clippy::indexing_slicing)] // test support: a panic is a failed test

use std::sync::Arc;

use tollgate_core::decide::{self, Call, Costs, Decision, Outcome, Pair, Settings};
use tollgate_core::layout::LayoutInterner;
use tollgate_core::plan::{Plan, Plans};
use tollgate_core::subject::Subject;
use tollgate_core::time::{Clock, ManualClock};

pub struct Harness {
    pub plans: Plans,
    pub interner: LayoutInterner,
    pub subject: Option<Subject>,
    pub clock: ManualClock,
    pub settings: Settings,
}

/// One acquire or peek, as the reply would show it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub decision: Decision,
    pub id: Option<String>,
}

impl Reply {
    pub fn allowed(&self) -> bool {
        self.decision.admitted()
    }
    pub fn retry_after_ms(&self) -> i64 {
        self.decision.retry_after_ms()
    }
    /// The plan that decided (after a fallback).
    pub fn plan(&self) -> &Plan {
        &self.decision.parts[0].plan
    }
    /// `remaining` of the limit named `name`.
    pub fn remaining(&self, name: &str) -> u64 {
        self.outcome(name).remaining
    }
    pub fn outcome(&self, name: &str) -> Outcome {
        let part = &self.decision.parts[0];
        part.outcomes
            .iter()
            .copied()
            .find(|o| {
                part.plan
                    .limits
                    .get(o.limit)
                    .is_some_and(|l| &*l.name == name)
            })
            .unwrap_or_else(|| unreachable!("no outcome for {name}"))
    }
    pub fn denied_by(&self) -> Option<String> {
        self.decision.denied_by().map(str::to_string)
    }
}

impl Harness {
    pub fn new(now: u64) -> Self {
        Harness {
            plans: Plans::new(),
            interner: LayoutInterner::new(),
            subject: None,
            clock: ManualClock::new(now),
            settings: Settings::default(),
        }
    }

    pub fn plan(&mut self, name: &str, fields: &[(&str, &str)]) -> Arc<Plan> {
        match self.plans.set(name, fields, &mut self.interner) {
            Ok(_) => self
                .plans
                .get(name)
                .cloned()
                .unwrap_or_else(|| unreachable!()),
            Err(e) => unreachable!("{e}"),
        }
    }

    pub fn call(&mut self, plan: &str, call: Call<'_>, commit: bool) -> Reply {
        let requested = self
            .plans
            .get(plan)
            .cloned()
            .unwrap_or_else(|| unreachable!("no plan {plan}"));
        let now = self.clock.now_ms();
        let pairs = [Pair {
            subject: self.subject.as_ref(),
            plan: &requested,
        }];
        let decision = decide::decide(&self.plans, &pairs, &call, None, now, &self.settings);
        let mut id = None;
        if commit && decision.admitted() {
            let committed = decide::commit(
                &decision,
                &pairs,
                &call,
                &[],
                &self.settings,
                &mut self.interner,
                &|_| false,
            )
            .unwrap_or_else(|e| panic!("commit refused: {e:?}"));
            id = committed
                .id
                .as_deref()
                .map(|id| String::from_utf8_lossy(id).into_owned());
            for change in committed.changes {
                change.apply_to(&mut self.subject);
            }
        }
        Reply { decision, id }
    }

    pub fn acquire(&mut self, plan: &str, units: u64) -> Reply {
        self.call(
            plan,
            Call {
                costs: Costs {
                    request: units,
                    units: &[],
                },
                ..Call::default()
            },
            true,
        )
    }

    pub fn acquire_costs(&mut self, plan: &str, units: u64, costs: &[(&str, u64)]) -> Reply {
        self.call(
            plan,
            Call {
                costs: Costs {
                    request: units,
                    units: costs,
                },
                ..Call::default()
            },
            true,
        )
    }

    pub fn peek(&mut self, plan: &str, units: u64) -> Reply {
        self.call(
            plan,
            Call {
                costs: Costs {
                    request: units,
                    units: &[],
                },
                ..Call::default()
            },
            false,
        )
    }

    pub fn release(&mut self, id: &str, actual: &[(&str, u64)]) -> Option<String> {
        let now = self.clock.now_ms();
        let (settled, change) =
            decide::settle(self.subject.as_ref(), id.as_bytes(), actual, now).ok()?;
        change.apply_to(&mut self.subject);
        Some(settled.plan.to_string())
    }

    /// `RL.TOUCH`: whether the live request `id` now expires `ttl_ms` from now.
    pub fn touch(&mut self, id: &str, ttl_ms: u64) -> bool {
        let now = self.clock.now_ms();
        match decide::touch(self.subject.as_ref(), id.as_bytes(), ttl_ms, now) {
            Ok((_, change)) => {
                change.apply_to(&mut self.subject);
                true
            }
            Err(_) => false,
        }
    }

    pub fn advance(&self, ms: u64) {
        self.clock.advance(ms);
    }

    pub fn set_clock(&self, ms: u64) {
        self.clock.set(ms);
    }
}
