//! A subject in memory, driven through the core's public API on a manual clock.

#![allow(dead_code)]
#![allow(clippy::panic, clippy::indexing_slicing)] // test support: a panic is a failed test

use std::sync::Arc;

use tollgate_core::decide::{self, Call, Costs, Decided, Outcome, Settings};
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
    pub out: Vec<Outcome>,
}

/// One acquire or peek, as the reply would show it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub decided: Decided,
    pub outcomes: Vec<Outcome>,
    pub id: Option<String>,
}

impl Reply {
    pub fn allowed(&self) -> bool {
        self.decided.verdict.admitted
    }
    pub fn retry_after_ms(&self) -> i64 {
        if self.allowed() {
            0
        } else {
            self.decided.verdict.admission.retry_after_ms()
        }
    }
    /// `remaining` of the limit named `name`.
    pub fn remaining(&self, name: &str) -> u64 {
        self.outcome(name).remaining
    }
    pub fn outcome(&self, name: &str) -> Outcome {
        let plan = &self.decided.plan;
        self.outcomes
            .iter()
            .copied()
            .find(|o| plan.limits.get(o.limit).is_some_and(|l| &*l.name == name))
            .unwrap_or_else(|| unreachable!("no outcome for {name}"))
    }
    pub fn denied_by(&self) -> Option<String> {
        match self.decided.verdict.denied_by {
            Some(decide::Denial::Limit(i)) => {
                self.decided.plan.limits.get(i).map(|l| l.name.to_string())
            }
            Some(decide::Denial::Endpoint) => Some("endpoint".into()),
            None => None,
        }
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
            out: Vec::new(),
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
        let decided = decide::decide(
            &self.plans,
            &requested,
            self.subject.as_ref(),
            &call,
            now,
            &self.settings,
            &mut self.out,
        );
        let mut id = None;
        if commit && decided.verdict.admitted {
            let subject = self.subject.get_or_insert_with(|| {
                Subject::new(Arc::clone(&decided.plan.layout), decided.verdict.now)
            });
            id = decide::commit(
                &decided.plan,
                subject,
                &call,
                &decided.verdict,
                &mut self.interner,
            )
            .unwrap_or_else(|e| panic!("commit refused: {e:?}"))
            .map(|id| String::from_utf8_lossy(&id).into_owned());
        }
        Reply {
            decided,
            outcomes: self.out.clone(),
            id,
        }
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
        let subject = self.subject.as_mut()?;
        decide::release(subject, id.as_bytes(), actual, now).map(|s| s.plan.to_string())
    }

    pub fn advance(&self, ms: u64) {
        self.clock.advance(ms);
    }

    pub fn set_clock(&self, ms: u64) {
        self.clock.set(ms);
    }
}
