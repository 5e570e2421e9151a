//! Replies of `RL.ACQUIRE`, `RL.PEEK`, `RL.USAGE` and `RL.RELEASE`: what the core
//! decided, serialised. Maps in RESP3 become flat key/value arrays in RESP2 (Redis
//! converts `ReplyWithMap` itself); `COMPACT` replies are arrays of integers,
//! identical in both. Every map is built as a list of fields first, so its length is
//! the list's, never counted by hand.

use std::ffi::CStr;

use smallvec::SmallVec;
use tollgate_core::decide::{Decision, Outcome, Part};
use tollgate_core::plan::{Mode, Plan};

use crate::server::Ctx;

/// RESP integers are signed: amounts past `i64::MAX` are shown as `i64::MAX`.
pub fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

enum Value<'a> {
    Int(i64),
    Bulk(&'a [u8]),
    Null,
    /// A part's limits, with `used` when true.
    Limits(&'a Part, bool),
    /// The pairs after the first, with their key names.
    Also(&'a [Part], &'a [&'a [u8]]),
}

/// A map reply under construction.
#[derive(Default)]
struct Map<'a> {
    fields: SmallVec<[(&'static CStr, Value<'a>); 12]>,
}

impl<'a> Map<'a> {
    fn push(&mut self, name: &'static CStr, value: Value<'a>) -> &mut Self {
        self.fields.push((name, value));
        self
    }

    fn send(&self, ctx: &Ctx) {
        ctx.reply_map(self.fields.len());
        for (name, value) in &self.fields {
            ctx.reply_cstr(name);
            match value {
                Value::Int(n) => ctx.reply_integer(*n),
                Value::Bulk(b) => ctx.reply_bulk(b),
                Value::Null => ctx.reply_null(),
                Value::Limits(part, used) => limits(ctx, part, *used),
                Value::Also(parts, keys) => {
                    ctx.reply_array(parts.len());
                    for (part, key) in parts.iter().zip(keys.iter()) {
                        let mut pair = Map::default();
                        pair.push(c"key", Value::Bulk(key))
                            .push(c"plan", Value::Bulk(part.plan.name.as_bytes()))
                            .push(c"limits", Value::Limits(part, false));
                        pair.send(ctx);
                    }
                }
            }
        }
    }
}

fn bulk_or_null(v: Option<&[u8]>) -> Value<'_> {
    v.map_or(Value::Null, Value::Bulk)
}

/// What a decision's reply shows beyond the decision itself.
#[derive(Default, Clone, Copy)]
pub struct Shown<'a> {
    /// The request id registered (given or generated).
    pub id: Option<&'a [u8]>,
    /// The key names of the call's pairs, first key first.
    pub keys: &'a [&'a [u8]],
    /// The call named `ALSO`: the reply carries `denied_key` and `also`.
    pub also: bool,
    /// A `WAIT` ran out: the call ends denied (`queue` when the limits would admit
    /// it but waiters ahead kept their turn).
    pub timed_out: bool,
    /// The integer-array reply.
    pub compact: bool,
}

/// The reply of `RL.ACQUIRE` / `RL.PEEK`.
pub fn decision(ctx: &Ctx, d: &Decision, shown: Shown<'_>) {
    let allowed = d.admitted() && !shown.timed_out;
    if shown.compact {
        return compact(ctx, d, allowed);
    }
    let Some(first) = d.parts.first() else {
        ctx.reply_null();
        return;
    };
    let denied_by = match d.denied_by() {
        Some(name) => Some(name.as_bytes()),
        None if shown.timed_out => Some(&b"queue"[..]),
        None => None,
    };
    let mut map = Map::default();
    map.push(c"allowed", Value::Int(i64::from(allowed)))
        .push(c"retry_after_ms", Value::Int(d.retry_after_ms()))
        .push(c"denied_by", bulk_or_null(denied_by));
    if d.parts.iter().any(|p| p.plan.mode == Mode::Shadow) {
        // What enforcement would have denied, had the plan not been in shadow mode.
        let shadow = d
            .parts
            .iter()
            .find(|p| p.admitted && !p.admission.is_now())
            .and_then(|p| p.denial_name())
            .filter(|_| d.admitted());
        map.push(c"shadow_denied_by", bulk_or_null(shadow.map(str::as_bytes)));
    }
    map.push(c"plan", Value::Bulk(first.plan.name.as_bytes()));
    if let Some(id) = shown.id {
        map.push(c"id", Value::Bulk(id));
    }
    if let Some(credits) = d.credits {
        map.push(c"credits", Value::Int(clamp(credits.balance)));
    }
    if shown.also {
        let key = d.denied_part().and_then(|i| shown.keys.get(i).copied());
        map.push(c"denied_key", bulk_or_null(key));
    }
    map.push(c"limits", Value::Limits(first, false));
    if shown.also {
        let parts = d.parts.get(1..).unwrap_or(&[]);
        let keys = shown.keys.get(1..).unwrap_or(&[]);
        map.push(c"also", Value::Also(parts, keys));
    }
    map.send(ctx);
}

/// `[allowed, retry_after_ms, denying limit index or -1, then for every pair (first
/// key, then ALSO pairs): the fallbacks taken (0: the plan asked for), and remaining
/// and reset_ms of each limit of the plan that decided, in RL.PLAN.GET order]`; a
/// limit that does not apply to the call's endpoint shows -1, -1. The denying index
/// counts limits across pairs.
fn compact(ctx: &Ctx, d: &Decision, allowed: bool) {
    let total: usize = d.parts.iter().map(|p| 1 + 2 * p.plan.limits.len()).sum();
    let mut denied_index = -1i64;
    if let Some(i) = d.denied_part() {
        let before: usize = d.parts.iter().take(i).map(|p| p.plan.limits.len()).sum();
        if let Some(tollgate_core::decide::Denial::Limit(limit)) =
            d.parts.get(i).and_then(|p| p.denied_by)
        {
            denied_index = i64::try_from(before + limit).unwrap_or(-1);
        }
    }
    ctx.reply_array(3 + total);
    ctx.reply_integer(i64::from(allowed));
    ctx.reply_integer(d.retry_after_ms());
    ctx.reply_integer(denied_index);
    for part in &d.parts {
        ctx.reply_integer(i64::from(part.hops));
        let mut outcomes = part.outcomes.iter().peekable();
        for index in 0..part.plan.limits.len() {
            match outcomes.next_if(|o| o.limit == index) {
                Some(o) => {
                    ctx.reply_integer(clamp(o.remaining));
                    ctx.reply_integer(clamp(o.reset_ms));
                }
                None => {
                    ctx.reply_integer(-1);
                    ctx.reply_integer(-1);
                }
            }
        }
    }
}

/// The `limits` array: one map per limit.
fn limits(ctx: &Ctx, part: &Part, with_used: bool) {
    ctx.reply_array(part.outcomes.len());
    for outcome in &part.outcomes {
        limit(ctx, &part.plan, outcome, with_used);
    }
}

fn limit(ctx: &Ctx, plan: &Plan, outcome: &Outcome, with_used: bool) {
    let Some(limit) = plan.limits.get(outcome.limit) else {
        ctx.reply_null();
        return;
    };
    let mut map = Map::default();
    map.push(c"name", Value::Bulk(limit.name.as_bytes()))
        .push(c"kind", Value::Bulk(limit.spec.rule.kind_name().as_bytes()))
        .push(c"unit", Value::Bulk(limit.spec.unit.as_bytes()))
        .push(c"limit", Value::Int(clamp(limit.spec.rule.capacity())))
        .push(c"window_ms", Value::Int(clamp(outcome.window_ms)));
    if with_used {
        map.push(c"used", Value::Int(clamp(outcome.used)));
    }
    map.push(c"remaining", Value::Int(clamp(outcome.remaining)))
        .push(c"reset_ms", Value::Int(clamp(outcome.reset_ms)))
        .push(c"warn", Value::Int(i64::from(outcome.warn)));
    map.send(ctx);
}

/// The reply of `RL.USAGE`: the plan and how each of its limits stands.
pub fn usage(ctx: &Ctx, part: &Part) {
    let mut map = Map::default();
    map.push(c"plan", Value::Bulk(part.plan.name.as_bytes()))
        .push(c"limits", Value::Limits(part, true));
    map.send(ctx);
}

/// One released key: its plan and its limits after settlement.
pub struct Released<'a> {
    pub key: &'a [u8],
    pub part: Option<Part>,
}

/// The reply of `RL.RELEASE` that released request on its first key (`part`: its plan
/// and limits after settlement) and on the keys the same call charged (`also`).
pub fn released(ctx: &Ctx, part: &Part, also: &[Released<'_>]) {
    let also_parts: SmallVec<[Part; 4]> = also.iter().filter_map(|r| r.part.clone()).collect();
    let also_keys: SmallVec<[&[u8]; 4]> = also
        .iter()
        .filter(|r| r.part.is_some())
        .map(|r| r.key)
        .collect();
    let mut map = Map::default();
    map.push(c"released", Value::Int(1))
        .push(c"plan", Value::Bulk(part.plan.name.as_bytes()))
        .push(c"limits", Value::Limits(part, false));
    if !also.is_empty() {
        map.push(c"also", Value::Also(&also_parts, &also_keys));
    }
    map.send(ctx);
}

/// The reply of `RL.RELEASE` that released nothing, and why.
pub fn not_released(ctx: &Ctx, reason: &str) {
    let mut map = Map::default();
    map.push(c"released", Value::Int(0))
        .push(c"reason", Value::Bulk(reason.as_bytes()));
    map.send(ctx);
}

/// The reply of `RL.RELEASE` when the plan the request was admitted under is gone:
/// released, with no limits to show.
pub fn released_without_plan(ctx: &Ctx, plan: &str) {
    let mut map = Map::default();
    map.push(c"released", Value::Int(1))
        .push(c"plan", Value::Bulk(plan.as_bytes()))
        .push(c"limits", Value::Also(&[], &[]));
    map.send(ctx);
}
