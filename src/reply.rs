//! Replies of `RL.ACQUIRE`, `RL.PEEK` and `RL.RELEASE`: maps in RESP3, flat key/value
//! arrays in RESP2 (Redis converts `ReplyWithMap` itself).

use tollgate_core::decide::{Decided, Denial, Outcome};
use tollgate_core::limits::Admission;
use tollgate_core::plan::{Mode, Plan};

use crate::server::Ctx;

/// RESP integers are signed: amounts past `i64::MAX` are shown as `i64::MAX`.
pub fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn denial_name(decided: &Decided) -> Option<&str> {
    match decided.verdict.denied_by? {
        Denial::Endpoint => Some("endpoint"),
        Denial::Limit(i) => decided.plan.limits.get(i).map(|l| &*l.name),
    }
}

/// Extra fields some decisions carry.
#[derive(Default, Clone, Copy)]
pub struct Extras<'a> {
    /// The request id registered (given or generated).
    pub id: Option<&'a [u8]>,
    /// The credits balance after the call (`CREDITS` calls only).
    pub credits: Option<u64>,
    /// A denial by the credits key rather than a limit.
    pub credits_denied: bool,
}

/// The reply of `RL.ACQUIRE` / `RL.PEEK`.
pub fn reply_decision(ctx: &Ctx, decided: &Decided, outcomes: &[Outcome], extras: Extras<'_>) {
    let verdict = &decided.verdict;
    let plan = &decided.plan;
    let shadow = plan.mode == Mode::Shadow;
    let admitted = verdict.admitted && !extras.credits_denied;
    let fields = 5
        + usize::from(extras.id.is_some())
        + usize::from(shadow)
        + usize::from(extras.credits.is_some());
    ctx.reply_map(fields);
    ctx.reply_cstr(c"allowed");
    ctx.reply_integer(i64::from(admitted));
    ctx.reply_cstr(c"retry_after_ms");
    ctx.reply_integer(if extras.credits_denied {
        -1
    } else if admitted {
        0
    } else {
        verdict.admission.retry_after_ms()
    });
    ctx.reply_cstr(c"denied_by");
    if extras.credits_denied {
        ctx.reply_bulk(b"credits");
    } else {
        match denial_name(decided).filter(|_| !verdict.admitted) {
            Some(name) => ctx.reply_bulk(name.as_bytes()),
            None => ctx.reply_null(),
        }
    }
    if shadow {
        // What enforcement would have denied, had the plan not been in shadow mode.
        ctx.reply_cstr(c"shadow_denied_by");
        match denial_name(decided)
            .filter(|_| verdict.admitted && verdict.admission != Admission::Now)
        {
            Some(name) => ctx.reply_bulk(name.as_bytes()),
            None => ctx.reply_null(),
        }
    }
    ctx.reply_cstr(c"plan");
    ctx.reply_bulk(plan.name.as_bytes());
    if let Some(id) = extras.id {
        ctx.reply_cstr(c"id");
        ctx.reply_bulk(id);
    }
    if let Some(balance) = extras.credits {
        ctx.reply_cstr(c"credits");
        ctx.reply_integer(clamp(balance));
    }
    ctx.reply_cstr(c"limits");
    reply_limits(ctx, plan, outcomes);
}

/// The `limits` array: one map per limit.
pub fn reply_limits(ctx: &Ctx, plan: &Plan, outcomes: &[Outcome]) {
    ctx.reply_array(outcomes.len());
    for outcome in outcomes {
        let Some(limit) = plan.limits.get(outcome.limit) else {
            ctx.reply_null();
            continue;
        };
        ctx.reply_map(6);
        ctx.reply_cstr(c"name");
        ctx.reply_bulk(limit.name.as_bytes());
        ctx.reply_cstr(c"unit");
        ctx.reply_bulk(limit.spec.unit.as_bytes());
        ctx.reply_cstr(c"limit");
        ctx.reply_integer(clamp(limit.spec.rule.capacity()));
        ctx.reply_cstr(c"remaining");
        ctx.reply_integer(clamp(outcome.remaining));
        ctx.reply_cstr(c"reset_ms");
        ctx.reply_integer(clamp(outcome.reset_ms));
        ctx.reply_cstr(c"warn");
        ctx.reply_integer(i64::from(outcome.warn));
    }
}

/// The reply of a `WAIT` that ran out: the call's standing with `allowed` 0. When the
/// limits would admit it but waiters ahead kept their turn, `denied_by` is `queue`.
pub fn reply_timed_out(ctx: &Ctx, decided: &Decided, outcomes: &[Outcome], credits: Option<u64>) {
    let verdict = &decided.verdict;
    ctx.reply_map(5 + usize::from(credits.is_some()));
    ctx.reply_cstr(c"allowed");
    ctx.reply_integer(0);
    ctx.reply_cstr(c"retry_after_ms");
    ctx.reply_integer(if verdict.admitted {
        0
    } else {
        verdict.admission.retry_after_ms()
    });
    ctx.reply_cstr(c"denied_by");
    match denial_name(decided).filter(|_| !verdict.admitted) {
        Some(name) => ctx.reply_bulk(name.as_bytes()),
        None => ctx.reply_bulk(b"queue"),
    }
    ctx.reply_cstr(c"plan");
    ctx.reply_bulk(decided.plan.name.as_bytes());
    if let Some(balance) = credits {
        ctx.reply_cstr(c"credits");
        ctx.reply_integer(clamp(balance));
    }
    ctx.reply_cstr(c"limits");
    reply_limits(ctx, &decided.plan, outcomes);
}
