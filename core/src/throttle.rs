//! `RL.THROTTLE`: redis-cell's `CL.THROTTLE` arguments and reply, mapped onto a
//! one-limit bucket plan.
//!
//! `CL.THROTTLE key max_burst count period [quantity]` admits `count` per `period`
//! seconds with bursts of `max_burst + 1`; it replies `[limited, limit, remaining,
//! retry_after_s, reset_after_s]`. Every parameter set is one plan whose single limit
//! is named `throttle`: one key is one budget whichever parameters charge it (a
//! change converts the usage, see [`crate::limits::carry_over`]).

use std::collections::HashMap;
use std::sync::Arc;

use crate::decide::Decision;
use crate::layout::LayoutInterner;
use crate::limits::Admission;
use crate::plan::Plan;
use crate::time::MAX_WINDOW_MS;

/// The limit name every throttle plan uses.
pub const LIMIT: &str = "throttle";
/// The plan name every throttle plan uses.
pub const PLAN: &str = "rl.throttle";
/// Most parameter sets kept compiled; past it the cache starts over (a client cycling
/// through parameters costs a compile per call, nothing more).
pub const MAX_CACHED: usize = 1_024;

/// Validated `CL.THROTTLE` parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Throttle {
    /// `max_burst + 1`: what a full bucket holds.
    pub burst: u64,
    pub count: u64,
    pub window_ms: u64,
}

impl Throttle {
    /// Checks redis-cell's arguments.
    pub fn new(max_burst: u64, count: u64, period_s: u64) -> Result<Throttle, String> {
        if count == 0 {
            return Err("count must be at least 1".into());
        }
        let burst = max_burst
            .checked_add(1)
            .ok_or("max_burst is larger than 18446744073709551614")?;
        let window_ms = period_s
            .checked_mul(1_000)
            .filter(|&ms| (1..=MAX_WINDOW_MS).contains(&ms))
            .ok_or_else(|| {
                format!(
                    "period must be between 1 and {} seconds",
                    MAX_WINDOW_MS / 1_000
                )
            })?;
        Ok(Throttle {
            burst,
            count,
            window_ms,
        })
    }

    /// The plan's one field: `throttle` → `bucket <count>/<period> burst <burst>`.
    fn spec(&self) -> String {
        format!(
            "bucket {}/{}ms burst {}",
            self.count, self.window_ms, self.burst
        )
    }

    /// redis-cell's reply to a decision under this throttle's plan:
    /// `[limited, limit, remaining, retry_after_s, reset_after_s]` (seconds rounded
    /// up; retry_after -1 when admitted or never).
    pub fn reply(&self, decision: &Decision) -> [i64; 5] {
        let outcome = decision.parts.first().and_then(|p| p.outcomes.first());
        let (remaining, reset_ms) = outcome.map_or((0, 0), |o| (o.remaining, o.reset_ms));
        let secs = |ms: u64| clamp(ms.div_ceil(1_000));
        let admitted = decision.admitted();
        [
            i64::from(!admitted),
            clamp(self.burst),
            clamp(remaining),
            match decision.admission {
                _ if admitted => -1,
                Admission::After(ms) => secs(ms),
                Admission::Now | Admission::Never => -1,
            },
            secs(reset_ms),
        ]
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The compiled plan of each parameter set in use.
#[derive(Debug, Default)]
pub struct ThrottlePlans {
    plans: HashMap<Throttle, Arc<Plan>>,
}

impl ThrottlePlans {
    /// The plan of `throttle`, compiled once.
    pub fn plan(
        &mut self,
        throttle: Throttle,
        interner: &mut LayoutInterner,
    ) -> Result<Arc<Plan>, String> {
        if let Some(plan) = self.plans.get(&throttle) {
            return Ok(Arc::clone(plan));
        }
        let fields = vec![(Box::<str>::from(LIMIT), throttle.spec().into_boxed_str())];
        let plan = Arc::new(Plan::compile(PLAN, fields, interner).map_err(|e| e.to_string())?);
        if self.plans.len() >= MAX_CACHED {
            self.plans.clear();
        }
        self.plans.insert(throttle, Arc::clone(&plan));
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_checked_like_redis_cell_would_wish() {
        assert!(Throttle::new(15, 30, 60).is_ok());
        assert!(Throttle::new(15, 0, 60).is_err());
        assert!(Throttle::new(u64::MAX, 1, 60).is_err());
        assert!(Throttle::new(0, 1, 0).is_err());
        assert!(Throttle::new(0, 1, u64::MAX).is_err());
    }

    #[test]
    fn one_plan_per_parameter_set() {
        let mut interner = LayoutInterner::new();
        let mut cache = ThrottlePlans::default();
        let t = Throttle::new(15, 30, 60).unwrap_or_else(|e| unreachable!("{e}"));
        let a = cache.plan(t, &mut interner);
        let b = cache.plan(t, &mut interner);
        assert!(matches!((a, b), (Ok(a), Ok(b)) if Arc::ptr_eq(&a, &b)));
    }
}
