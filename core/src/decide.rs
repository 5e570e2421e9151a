//! Deciding a call, and what it changes — as plain data.
//!
//! [`decide`] never changes anything: it decides a call over one or more
//! `(subject, plan)` pairs (the first key and its `ALSO` pairs) at
//! `max(clock, updated_ms)` of each subject, following each pair's fallback plans,
//! and reports every limit as it would stand after the call (so `RL.PEEK` answers
//! exactly what `RL.ACQUIRE` would). The call is admitted only if every limit of every
//! pair admits it (all-or-nothing). [`commit`] then computes, for an admitted call,
//! the [`Change`] of each subject; [`settle`] and [`touch`] do the same for
//! `RL.RELEASE` and `RL.TOUCH`. The module applies each change to its stored value
//! and ships the same change to replicas, so a primary holds exactly what its replicas
//! hold, and a command that fails does so before anything changed.
//!
//! ```
//! use tollgate_core::decide::{self, Call, Costs, Pair, Settings};
//! use tollgate_core::layout::LayoutInterner;
//! use tollgate_core::plan::Plans;
//! use tollgate_core::subject::Subject;
//!
//! let mut interner = LayoutInterner::new();
//! let mut plans = Plans::new();
//! plans.set("free", &[("rpm", "fixed 2/1m")], &mut interner).unwrap();
//! let plan = plans.get("free").unwrap().clone();
//! let call = Call { costs: Costs { request: 1, units: &[] }, ..Call::default() };
//! let settings = Settings::default();
//! let mut subject: Option<Subject> = None;
//! for expected in [true, true, false] {
//!     let pairs = [Pair { subject: subject.as_ref(), plan: &plan }];
//!     let decision = decide::decide(&plans, &pairs, &call, None, 60_000, &settings);
//!     assert_eq!(decision.admitted(), expected);
//!     if decision.admitted() {
//!         let committed = decide::commit(&decision, &pairs, &call, &[], &settings, &mut interner, &|_| false).unwrap();
//!         for change in committed.changes {
//!             change.apply_to(&mut subject);
//!         }
//!     }
//! }
//! ```

use std::sync::Arc;

use smallvec::SmallVec;

use crate::change::{Change, Limits};
use crate::credits::Credits;
use crate::layout::{Layout, LayoutInterner, Shape};
use crate::limits::bucket::{Bucket, Reserved};
use crate::limits::sliding::Slices;
use crate::limits::{carry_over, fixed, past_warn, Admission};
use crate::plan::{Limit, Mode, Plan, Plans};
use crate::requests::{Charge, Request};
use crate::spec::{Rule, DEFAULT_UNIT};
use crate::subject::{self, normalize_words, Ended, Subject, Words, MAX_SEQ};

/// What one call costs, per unit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Costs<'a> {
    /// The cost in the unit `request` (the positional `units`, default 1).
    pub request: u64,
    /// Costs in other units (`COST unit n ...`).
    pub units: &'a [(&'a str, u64)],
}

impl Costs<'_> {
    /// The cost charged to a limit counting `unit` (zero if the call names none).
    pub fn of(&self, unit: &str) -> u64 {
        if unit == DEFAULT_UNIT {
            return self.request;
        }
        self.units
            .iter()
            .find(|(u, _)| *u == unit)
            .map_or(0, |&(_, n)| n)
    }
}

/// A call as the core sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Call<'a> {
    pub costs: Costs<'a>,
    pub endpoint: Option<&'a str>,
    /// The caller's request id: makes a reservation (and names the lease).
    pub id: Option<&'a [u8]>,
    /// Lease/reservation time-to-live the call asked for.
    pub ttl_ms: Option<u64>,
}

/// Server-wide settings the core needs.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// TTL of leases and reservations when neither the call nor the limit sets one.
    pub default_ttl_ms: u64,
    /// Most in-flight requests one subject may hold.
    pub max_requests: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            default_ttl_ms: crate::spec::DEFAULT_LEASE_TTL_MS,
            max_requests: 10_000,
        }
    }
}

/// One subject of a call: the state its key holds (if any) and the plan asked for it
/// (already resolved from `*`).
#[derive(Debug, Clone, Copy)]
pub struct Pair<'a> {
    pub subject: Option<&'a Subject>,
    pub plan: &'a Arc<Plan>,
}

/// How one limit stands after the call (or now, if the call is not admitted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Index of the limit in the plan.
    pub limit: usize,
    /// Usage counted (concurrency: leases held).
    pub used: u64,
    pub remaining: u64,
    pub reset_ms: u64,
    /// The limit's window: for calendar windows, the current one's length; 0 for
    /// concurrency and caps.
    pub window_ms: u64,
    /// Usage is at or past the limit's warn threshold.
    pub warn: bool,
    /// This call took usage past the warn threshold.
    pub warn_crossed: bool,
}

/// The outcomes of one plan's limits, in plan order.
pub type Outcomes = SmallVec<[Outcome; 8]>;

/// What denied a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// The limit at this index of the plan.
    Limit(usize),
    /// The call named an endpoint the plan does not mention.
    Endpoint,
}

/// The decision on one pair of a call.
#[derive(Debug, Clone)]
pub struct Part {
    /// The plan that decided (differs from the requested one after a fallback).
    pub plan: Arc<Plan>,
    /// How many fallbacks from the requested plan `plan` is (0: the plan asked for).
    pub hops: u8,
    /// The instant this subject was decided at.
    pub now: u64,
    /// Whether and when its limits admit the call.
    pub admission: Admission,
    /// What denied it, or would have under `mode shadow`.
    pub denied_by: Option<Denial>,
    /// Whether this pair lets the call go ahead: admitted, or denied in shadow mode.
    pub admitted: bool,
    pub outcomes: Outcomes,
}

impl Part {
    /// The name of what denied the pair (`endpoint` or a limit name).
    pub fn denial_name(&self) -> Option<&str> {
        match self.denied_by? {
            Denial::Endpoint => Some("endpoint"),
            Denial::Limit(i) => self.plan.limits.get(i).map(|l| &*l.name),
        }
    }

    /// Whether this call took a limit past its warn threshold.
    pub fn warn_crossed(&self) -> bool {
        self.outcomes.iter().any(|o| o.warn_crossed)
    }
}

/// Why a call was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admitted,
    /// A limit (or the endpoint list) of part `part`.
    Limits {
        part: usize,
    },
    /// The limits admitted it but the credits key does not hold the amount.
    Credits,
}

/// The credits side of a call with `CREDITS key n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditsPart {
    pub amount: u64,
    /// The balance now (after the deduction, once committed).
    pub balance: u64,
}

/// The decision on a call.
#[derive(Debug, Clone)]
pub struct Decision {
    /// One per pair, in call order.
    pub parts: SmallVec<[Part; 1]>,
    pub verdict: Verdict,
    /// When every pair would admit the call (`Now` once admitted).
    pub admission: Admission,
    /// The call registers a request (it named an `ID` or a plan holds leases).
    pub takes_request: bool,
    /// The TTL its lease or reservation gets.
    pub ttl_ms: u64,
    pub credits: Option<CreditsPart>,
    /// Answered from the live request the call's `ID` names: a retry, charged nothing.
    pub replayed: bool,
}

impl Decision {
    pub fn admitted(&self) -> bool {
        self.verdict == Verdict::Admitted
    }

    /// `retry_after_ms` as replied: 0 when admitted, -1 when never.
    pub fn retry_after_ms(&self) -> i64 {
        match self.verdict {
            Verdict::Admitted => 0,
            Verdict::Credits => -1,
            Verdict::Limits { .. } => self.admission.retry_after_ms(),
        }
    }

    /// The part whose limit denied the call.
    pub fn denied_part(&self) -> Option<usize> {
        match self.verdict {
            Verdict::Limits { part } => Some(part),
            _ => None,
        }
    }

    /// What denied the call, as replied in `denied_by`: `credits`, `endpoint` or a
    /// limit name.
    pub fn denied_by(&self) -> Option<&str> {
        match self.verdict {
            Verdict::Admitted => None,
            Verdict::Credits => Some("credits"),
            Verdict::Limits { part } => self.parts.get(part).and_then(Part::denial_name),
        }
    }

    /// Whether a shadow-mode plan admitted what it would have denied.
    pub fn shadow_denied(&self) -> bool {
        self.admitted() && self.parts.iter().any(|p| !p.admission.is_now())
    }

    /// Whether a fallback plan decided some pair (compared with the plans asked for).
    pub fn by_fallback(&self, requested: &[&Arc<Plan>]) -> bool {
        self.parts
            .iter()
            .zip(requested)
            .any(|(p, r)| !Arc::ptr_eq(&p.plan, r))
    }
}

/// A limit's state at `now`, read from the subject (or fresh).
enum View<'s> {
    Fixed {
        used: u64,
        capacity: u64,
        window: crate::time::FixedWindow,
    },
    Sliding {
        words: Cow<'s>,
        updated: u64,
        slices: Slices,
        used: u128,
        capacity: u64,
    },
    Bucket {
        debt: u128,
        bucket: Bucket,
    },
    Concurrency {
        live: u64,
        max: u64,
    },
    Cap {
        max: u64,
    },
}

/// Words borrowed from the subject, or converted from another shape of the budget
/// (rare: on the heap).
enum Cow<'s> {
    Borrowed(&'s [u64]),
    Owned(Vec<u64>),
}

impl Cow<'_> {
    fn get(&self) -> &[u64] {
        match self {
            Cow::Borrowed(w) => w,
            Cow::Owned(w) => w,
        }
    }
}

/// A subject as a decision reads it: its state, with its words unpacked once.
struct Held<'s> {
    subject: &'s Subject,
    words: Words,
}

impl<'s> Held<'s> {
    fn new(subject: Option<&'s Subject>) -> Option<Held<'s>> {
        subject.map(|subject| Held {
            subject,
            words: subject.words(),
        })
    }

    fn slot(&self, i: usize) -> &[u64] {
        self.words
            .get(self.subject.layout().range(i))
            .unwrap_or(&[])
    }
}

/// The subject's words for `limit`'s budget, in the limit's shape: borrowed when the
/// subject counts the budget that way, converted (conservatively) when it counts it
/// another way, `None` when it holds no usage of it.
fn budget_words<'h>(limit: &Limit, plan: &Plan, held: &'h Held<'_>, now: u64) -> Option<Cow<'h>> {
    let shape = limit.shape()?;
    let layout = held.subject.layout();
    if let Some(i) = limit.slot.filter(|_| Arc::ptr_eq(layout, &plan.layout)) {
        return Some(Cow::Borrowed(held.slot(i)));
    }
    let i = layout.find_budget(&limit.name, &limit.spec.unit)?;
    let slot = layout.slots().get(i)?;
    if slot.shape == shape {
        return Some(Cow::Borrowed(held.slot(i)));
    }
    let mut words = vec![0; shape.words()];
    let rate = match limit.spec.rule {
        Rule::Bucket { rate, .. } => rate,
        _ => 1,
    };
    carry_over(
        (slot.shape, held.slot(i)),
        held.subject.updated_ms(),
        (shape, rate),
        now,
        &mut words,
    );
    Some(Cow::Owned(words))
}

fn view<'h>(plan: &Plan, limit: &Limit, held: Option<&'h Held<'_>>, now: u64) -> View<'h> {
    let subject = held.map(|h| h.subject);
    let found = held.and_then(|h| Some((h.subject, budget_words(limit, plan, h, now)?)));
    // Converted words are normalized to `now` already.
    let updated = match &found {
        Some((s, Cow::Borrowed(_))) => s.updated_ms(),
        _ => now,
    };
    let words = found.map_or(Cow::Borrowed(&[]), |(_, w)| w);
    match limit.spec.rule {
        Rule::Fixed { capacity, window } => View::Fixed {
            used: fixed::used_at(words.get(), window, updated, now),
            capacity,
            window,
        },
        Rule::Sliding {
            capacity,
            window_ms,
            precision,
        } => {
            let slices = Slices {
                window_ms,
                precision,
            };
            let used = slices.used_at(words.get(), updated, now);
            View::Sliding {
                words,
                updated,
                slices,
                used,
                capacity,
            }
        }
        Rule::Bucket {
            rate,
            window_ms,
            burst,
        } => {
            let bucket = Bucket {
                rate,
                window_ms,
                burst,
            };
            View::Bucket {
                debt: bucket.debt_at(words.get(), now),
                bucket,
            }
        }
        Rule::Concurrency { max, .. } => {
            let counted = words.get().first().copied().unwrap_or(0);
            // Leases that expired but are not yet purged do not count.
            let expired = subject.and_then(Subject::requests).map_or(0, |t| {
                t.expired(now)
                    .filter(|r| r.leases.iter().any(|l| **l == *limit.name))
                    .count()
            });
            View::Concurrency {
                live: counted.saturating_sub(expired as u64),
                max,
            }
        }
        Rule::Cap { max } => View::Cap { max },
    }
}

/// The cost a limit is charged by `call` (a lease for concurrency limits).
fn cost_for(limit: &Limit, call: &Call<'_>) -> u64 {
    match limit.spec.rule {
        Rule::Concurrency { .. } => 1,
        _ => call.costs.of(&limit.spec.unit),
    }
}

/// The soonest a lease of `slot` frees, if any live one does.
fn next_lease_expiry(subject: Option<&Subject>, slot: &str, now: u64) -> Option<u64> {
    let requests = subject?.requests()?;
    requests
        .iter_by_expiry()
        .skip_while(|(at, _)| *at <= now)
        .find(|(_, r)| r.leases.iter().any(|l| &**l == slot))
        .map(|(at, _)| at)
}

fn admission(
    view: &View<'_>,
    cost: u64,
    now: u64,
    limit: &Limit,
    subject: Option<&Subject>,
) -> Admission {
    match view {
        View::Fixed {
            used,
            capacity,
            window,
        } => fixed::admission(*used, cost, *capacity, *window, now),
        View::Sliding {
            words,
            updated,
            slices,
            used,
            capacity,
        } => slices.admission(words.get(), *updated, now, *used, cost, *capacity),
        View::Bucket { debt, bucket } => bucket.admission(*debt, cost),
        View::Concurrency { live, max } => {
            if *max == 0 {
                Admission::Never
            } else if live < max {
                Admission::Now
            } else {
                match next_lease_expiry(subject, &limit.name, now) {
                    Some(at) => Admission::After(at - now),
                    // Only possible while leases are counted but all expired: free now.
                    None => Admission::Now,
                }
            }
        }
        View::Cap { max } => {
            if cost > *max {
                Admission::Never
            } else {
                Admission::Now
            }
        }
    }
}

/// How the limit stands with `pending` charged on top of `view` (0 if the call is not
/// admitted), and whether it was past its warn threshold before.
fn outcome(
    index: usize,
    limit: &Limit,
    view: &View<'_>,
    pending: u64,
    now: u64,
    lease_until: u64,
    subject: Option<&Subject>,
) -> Outcome {
    let warn_pct = limit.spec.warn_pct;
    let (used, remaining, reset_ms, window_ms, before, after) = match view {
        View::Fixed {
            used,
            capacity,
            window,
        } => {
            let after = used.saturating_add(pending);
            let start = window.start(window.index(now));
            (
                after,
                capacity.saturating_sub(after),
                fixed::reset_ms(after, *window, now),
                window.end_of(now).saturating_sub(start),
                past_warn((*used).into(), (*capacity).into(), warn_pct),
                past_warn(after.into(), (*capacity).into(), warn_pct),
            )
        }
        View::Sliding {
            words,
            updated,
            slices,
            used,
            capacity,
        } => {
            let after = used.saturating_add(pending.into());
            (
                crate::limits::to_u64(after),
                crate::limits::to_u64(u128::from(*capacity).saturating_sub(after)),
                slices.reset_ms(words.get(), *updated, now, pending),
                slices.window_ms,
                past_warn(*used, (*capacity).into(), warn_pct),
                past_warn(after, (*capacity).into(), warn_pct),
            )
        }
        View::Bucket { debt, bucket } => {
            let after = debt.saturating_add(u128::from(pending) * u128::from(bucket.window_ms));
            let full = u128::from(bucket.burst) * u128::from(bucket.window_ms);
            (
                crate::limits::to_u64(bucket.used(after)),
                bucket.remaining(after),
                bucket.reset_ms(after),
                bucket.window_ms,
                past_warn(*debt, full, warn_pct),
                past_warn(after, full, warn_pct),
            )
        }
        View::Concurrency { live, max } => {
            let last = subject
                .and_then(|s| s.requests())
                .and_then(|t| t.last_lease_expiry(&limit.name, now));
            let last = if pending > 0 {
                last.max(Some(lease_until))
            } else {
                last
            };
            let in_flight = live.saturating_add(pending);
            (
                in_flight,
                max.saturating_sub(in_flight),
                last.map_or(0, |at| at.saturating_sub(now)),
                0,
                false,
                false,
            )
        }
        View::Cap { max } => (0, *max, 0, 0, false, false),
    };
    Outcome {
        limit: index,
        used,
        remaining,
        reset_ms,
        window_ms,
        warn: after,
        warn_crossed: after && !before && pending > 0,
    }
}

/// The largest lease TTL of `plan`'s concurrency limits that apply to `call`, if any.
fn lease_ttl(plan: &Plan, call: &Call<'_>, settings: &Settings) -> Option<u64> {
    plan.limits
        .iter()
        .filter(|l| l.applies_to(call.endpoint))
        .filter_map(|l| match l.spec.rule {
            Rule::Concurrency { ttl_ms, .. } => Some(ttl_ms.unwrap_or(settings.default_ttl_ms)),
            _ => None,
        })
        .max()
}

/// The TTL of the request a call registers under `plans` (one per pair): the call's
/// `TTL`, else the largest TTL of their concurrency limits, else the default. A pair
/// without leases does not stretch the others'.
fn request_ttl<'p>(
    plans: impl Iterator<Item = &'p Plan>,
    call: &Call<'_>,
    settings: &Settings,
) -> u64 {
    call.ttl_ms.unwrap_or_else(|| {
        plans
            .filter_map(|p| lease_ttl(p, call, settings))
            .max()
            .unwrap_or(settings.default_ttl_ms)
    })
}

/// The limits of `plan` that apply to a call naming `endpoint`, with their indexes.
fn applicable<'p>(
    plan: &'p Plan,
    endpoint: Option<&'p str>,
) -> impl Iterator<Item = (usize, &'p Limit)> + 'p {
    plan.limits
        .iter()
        .enumerate()
        .filter(move |(_, l)| l.applies_to(endpoint))
}

/// Decides `call` on one subject under one plan at `now`, without changing anything.
fn evaluate(
    plan: &Arc<Plan>,
    subject: Option<&Subject>,
    call: &Call<'_>,
    now: u64,
    lease_until: u64,
) -> Part {
    let mut admission_all = Admission::Now;
    let mut denied_by = None;
    if !plan.admits_endpoint(call.endpoint) {
        admission_all = Admission::Never;
        denied_by = Some(Denial::Endpoint);
    }
    // One pass computes each limit's view, admission and standing as if the call is
    // admitted (the common case); a denied call recomputes its standings uncharged.
    let mut outcomes = Outcomes::new();
    let held = Held::new(subject);
    for (index, limit) in applicable(plan, call.endpoint) {
        let cost = cost_for(limit, call);
        let v = view(plan, limit, held.as_ref(), now);
        let this = admission(&v, cost, now, limit, subject);
        if this.is_later_than(admission_all) {
            denied_by = Some(Denial::Limit(index));
        }
        admission_all = admission_all.and(this);
        outcomes.push(outcome(index, limit, &v, cost, now, lease_until, subject));
    }
    Part {
        plan: Arc::clone(plan),
        hops: 0,
        now,
        admission: admission_all,
        denied_by,
        admitted: admission_all.is_now() || plan.mode == Mode::Shadow,
        outcomes,
    }
}

/// How each limit of `plan` (those applying to `endpoint`, or all with `None` and
/// `all`) stands for `subject` at `now`, charging and assuming nothing.
fn standing(
    plan: &Arc<Plan>,
    subject: Option<&Subject>,
    endpoint: Option<&str>,
    all: bool,
    now: u64,
) -> Outcomes {
    let held = Held::new(subject);
    plan.limits
        .iter()
        .enumerate()
        .filter(|(_, l)| all || l.applies_to(endpoint))
        .map(|(index, limit)| {
            let v = view(plan, limit, held.as_ref(), now);
            outcome(index, limit, &v, 0, now, now, subject)
        })
        .collect()
}

/// Longest fallback chain followed (plans refuse cycles; this bounds the walk anyway).
pub const MAX_FALLBACK_DEPTH: usize = 16;

/// Decides one pair: its plan and, while denied, each fallback in turn.
fn decide_pair(
    plans: &Plans,
    pair: &Pair<'_>,
    call: &Call<'_>,
    clock_ms: u64,
    ttl_ms: u64,
) -> Part {
    let now = pair
        .subject
        .map_or(clock_ms.min(crate::time::MAX_INSTANT_MS), |s| {
            s.effective_now(clock_ms)
        });
    let lease_until = now.saturating_add(ttl_ms);
    let part = evaluate(pair.plan, pair.subject, call, now, lease_until);
    if part.admitted {
        return part;
    }
    let mut next = pair.plan.fallback.as_deref();
    // A loop, or a fallback counting a limit name in another unit than a plan before
    // it (only concurrent merges on two primaries can make either), ends the walk: a
    // fallback never opens a second budget of one name.
    let mut tried: SmallVec<[&Plan; 4]> = smallvec::smallvec![&**pair.plan];
    for hops in 1..=MAX_FALLBACK_DEPTH {
        let Some(plan) = next
            .filter(|name| tried.iter().all(|p| &*p.name != *name))
            .and_then(|name| plans.get(name))
            .filter(|plan| tried.iter().all(|p| !counts_in_other_units(p, plan)))
        else {
            break;
        };
        tried.push(plan);
        let fallback = evaluate(plan, pair.subject, call, now, lease_until);
        if fallback.admitted {
            return Part {
                hops: u8::try_from(hops).unwrap_or(u8::MAX),
                ..fallback
            };
        }
        next = plan.fallback.as_deref();
    }
    part
}

/// Whether `a` and `b` count a limit of one name in different units.
fn counts_in_other_units(a: &Plan, b: &Plan) -> bool {
    a.limits.iter().any(|x| {
        b.limits
            .iter()
            .any(|y| x.name == y.name && x.spec.unit != y.spec.unit)
    })
}

/// Decides `call` over `pairs` (the first key, then its `ALSO` pairs) at `clock_ms`,
/// without changing anything. With `credits`, the call also needs the credits key
/// to hold the amount. A call whose `ID` names a live request of the first subject is
/// a retry: it is answered from that request (admitted, as it was) and charges
/// nothing.
pub fn decide(
    plans: &Plans,
    pairs: &[Pair<'_>],
    call: &Call<'_>,
    credits: Option<(Option<&Credits>, u64)>,
    clock_ms: u64,
    settings: &Settings,
) -> Decision {
    if let Some(replay) = replay(plans, pairs, call, credits, clock_ms) {
        return replay;
    }
    let mut parts: SmallVec<[Part; 1]> = SmallVec::new();
    let asked = request_ttl(pairs.iter().map(|p| &**p.plan), call, settings);
    let mut takes_request = call.id.is_some();
    let mut admission_all = Admission::Now;
    let mut denied = None;
    for (i, pair) in pairs.iter().enumerate() {
        let part = decide_pair(plans, pair, call, clock_ms, asked);
        takes_request |= part.plan.has_concurrency();
        if !part.admitted {
            if part.admission.is_later_than(admission_all) || denied.is_none() {
                denied = Some(i);
            }
            admission_all = admission_all.and(part.admission);
        }
        parts.push(part);
    }
    let credits = credits.map(|(c, amount)| CreditsPart {
        amount,
        balance: c.map_or(0, |c| c.balance(c.effective_now(clock_ms))),
    });
    let verdict = match denied {
        Some(part) => Verdict::Limits { part },
        // Credits are money: shadow mode does not waive them.
        None if credits.is_some_and(|c| c.balance < c.amount) => Verdict::Credits,
        None => Verdict::Admitted,
    };
    // The lease TTL of the plans that decided (a fallback may count leases otherwise).
    let ttl_ms = request_ttl(parts.iter().map(|p| &*p.plan), call, settings);
    if verdict != Verdict::Admitted {
        // A denied call reports how every pair stands, uncharged.
        for (part, pair) in parts.iter_mut().zip(pairs) {
            part.outcomes = standing(&part.plan, pair.subject, call.endpoint, false, part.now);
        }
    } else if ttl_ms != asked {
        // Report each lease's reset as the lease it will be.
        for (part, pair) in parts.iter_mut().zip(pairs) {
            let lease_until = part.now.saturating_add(ttl_ms);
            part.outcomes =
                evaluate(&part.plan, pair.subject, call, part.now, lease_until).outcomes;
        }
    }
    Decision {
        parts,
        verdict,
        admission: admission_all,
        takes_request,
        ttl_ms,
        credits,
        replayed: false,
    }
}

/// How many fallbacks from `from` the plan named `to` is (0 if not on its chain).
fn hops_to(plans: &Plans, from: &Plan, to: &str) -> u8 {
    let mut plan = from;
    for hops in 0..=MAX_FALLBACK_DEPTH {
        if &*plan.name == to {
            return u8::try_from(hops).unwrap_or(u8::MAX);
        }
        match plan.fallback.as_deref().and_then(|f| plans.get(f)) {
            Some(next) => plan = next,
            None => break,
        }
    }
    0
}

/// The decision a retried call gets: its live request's, with each limit as it
/// stands now (the original charge counted once).
fn replay(
    plans: &Plans,
    pairs: &[Pair<'_>],
    call: &Call<'_>,
    credits: Option<(Option<&Credits>, u64)>,
    clock_ms: u64,
) -> Option<Decision> {
    let id = call.id?;
    let first = pairs.first()?.subject?;
    let now = first.effective_now(clock_ms);
    first.live_request(id, now)?;
    let parts = pairs
        .iter()
        .map(|pair| {
            let now = pair.subject.map_or(now, |s| s.effective_now(clock_ms));
            let plan = pair
                .subject
                .and_then(|s| s.live_request(id, now))
                .and_then(|r| plans.get(&r.plan))
                .unwrap_or(pair.plan);
            Part {
                hops: hops_to(plans, pair.plan, &plan.name),
                plan: Arc::clone(plan),
                now,
                admission: Admission::Now,
                denied_by: None,
                admitted: true,
                outcomes: standing(plan, pair.subject, call.endpoint, false, now),
            }
        })
        .collect();
    Some(Decision {
        parts,
        verdict: Verdict::Admitted,
        admission: Admission::Now,
        takes_request: true,
        ttl_ms: 0,
        credits: credits.map(|(c, amount)| CreditsPart {
            amount,
            balance: c.map_or(0, |c| c.balance(c.effective_now(clock_ms))),
        }),
        replayed: true,
    })
}

/// A `COST` unit of `call` that no limit of the `requested` plans (nor of their
/// fallbacks) counts: most likely a typo, which would silently charge nothing.
pub fn uncounted_unit<'a, 'p>(
    call: &Call<'a>,
    plans: &'p Plans,
    requested: impl Iterator<Item = &'p Arc<Plan>>,
) -> Option<&'a str> {
    let mut chain: SmallVec<[&Plan; 8]> = SmallVec::new();
    for plan in requested {
        let mut next = Some(&**plan);
        for _ in 0..=MAX_FALLBACK_DEPTH {
            let Some(plan) = next else { break };
            chain.push(plan);
            next = plan
                .fallback
                .as_deref()
                .and_then(|f| plans.get(f))
                .map(|p| &**p);
        }
    }
    call.costs.units.iter().map(|&(unit, _)| unit).find(|unit| {
        !chain
            .iter()
            .any(|p| p.limits.iter().any(|l| &*l.spec.unit == *unit))
    })
}

/// How `subject` stands under `plan` now (`RL.USAGE`, and the limits of an
/// `RL.RELEASE` reply): every limit that applies to `endpoint` (all without one),
/// charging and assuming nothing (concurrency: the leases held).
pub fn usage(
    plan: &Arc<Plan>,
    subject: Option<&Subject>,
    endpoint: Option<&str>,
    clock_ms: u64,
) -> Part {
    let now = subject.map_or(clock_ms, |s| s.effective_now(clock_ms));
    Part {
        plan: Arc::clone(plan),
        hops: 0,
        now,
        admission: Admission::Now,
        denied_by: None,
        admitted: true,
        outcomes: standing(plan, subject, endpoint, endpoint.is_none(), now),
    }
}

/// Why an admitted call could not be charged (nothing changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitError {
    /// Re-laying subject `part` out for its plan would take more than
    /// [`crate::layout::MAX_SLOTS`] counters.
    TooManySlots { part: usize },
    /// Subject `part` already holds `max` requests in flight.
    TooManyRequests { part: usize, max: usize },
    /// The call's `ID` is in flight on subject `part` (not the first).
    IdInFlight { part: usize },
}

/// What committing a call produced.
#[derive(Debug)]
pub struct Committed {
    /// The request id registered (given, or generated if the call named none).
    pub id: Option<Box<[u8]>>,
    /// One change per pair, in call order.
    pub changes: SmallVec<[Change; 1]>,
}

/// The words of `subject` brought to `now`: normalized, with the leases of requests
/// expired at `now` freed — what the subject holds once a change purges them — and
/// whether any request expired.
fn base_words(subject: &Subject, now: u64) -> (Words, bool) {
    let mut words = subject.words();
    normalize_words(subject.layout(), &mut words, subject.updated_ms(), now);
    let mut purged = false;
    if let Some(requests) = subject.requests() {
        for request in requests.expired(now) {
            subject::free_leases(subject.layout(), &mut words, request);
            purged = true;
        }
    }
    (words, purged)
}

/// The next generated request id for a subject whose sequence is `seq`.
fn generated_id(now: u64, seq: u64) -> (u64, Box<[u8]>) {
    let seq = if seq >= MAX_SEQ { 1 } else { seq + 1 };
    (seq, format!("{now}-{seq}").into_bytes().into_boxed_slice())
}

/// Computes the changes an admitted `decision` makes: each pair's subject brought to
/// its instant (expired requests purged), re-laid out if its plan counts differently,
/// every applicable limit charged, and the request registered under the call's id (or
/// a generated one that no subject holds and `taken` does not refuse). `links` names
/// the keys of the pairs after the first (recorded on the first subject's request).
/// Changes nothing; on error no change is made at all.
pub fn commit(
    decision: &Decision,
    pairs: &[Pair<'_>],
    call: &Call<'_>,
    links: &[&[u8]],
    settings: &Settings,
    interner: &mut LayoutInterner,
    taken: &dyn Fn(&[u8]) -> bool,
) -> Result<Committed, CommitError> {
    let mut changes = SmallVec::new();
    if !decision.admitted() || decision.replayed {
        return Ok(Committed { id: None, changes });
    }
    let mut seq = None;
    let id: Option<Box<[u8]>> = if !decision.takes_request {
        None
    } else if let Some(id) = call.id {
        for (part, pair) in pairs.iter().enumerate().skip(1) {
            let now = decision.parts.get(part).map_or(0, |p| p.now);
            if pair
                .subject
                .is_some_and(|s| s.live_request(id, now).is_some())
            {
                return Err(CommitError::IdInFlight { part });
            }
        }
        Some(id.into())
    } else {
        let first_now = decision.parts.first().map_or(0, |p| p.now);
        let mut next = pairs
            .first()
            .and_then(|p| p.subject)
            .and_then(|s| s.extra.as_deref())
            .map_or(0, |e| e.next_seq);
        // A caller may have picked an id of this form: never reuse a held one.
        loop {
            let (n, id) = generated_id(first_now, next);
            next = n;
            let held = pairs.iter().any(|p| {
                p.subject
                    .and_then(Subject::requests)
                    .is_some_and(|t| t.get(&id).is_some())
            });
            if !held && !taken(&id) {
                seq = Some(n);
                break Some(id);
            }
        }
    };
    for (index, (part, pair)) in decision.parts.iter().zip(pairs).enumerate() {
        let links = if index == 0 { links } else { &[] };
        let change = charge(
            part,
            pair.subject,
            call,
            id.as_deref(),
            decision.ttl_ms,
            links,
            settings,
            interner,
        )
        .map_err(|e| match e {
            ChargeError::TooManySlots => CommitError::TooManySlots { part: index },
            ChargeError::TooManyRequests(max) => CommitError::TooManyRequests { part: index, max },
        })?;
        changes.push(change);
    }
    if let (Some(seq), Some(first)) = (seq, changes.first_mut()) {
        first.seq = Some(seq);
    }
    Ok(Committed { id, changes })
}

enum ChargeError {
    TooManySlots,
    TooManyRequests(usize),
}

/// The change charging one admitted pair makes to its subject.
#[allow(clippy::too_many_arguments)]
fn charge(
    part: &Part,
    subject: Option<&Subject>,
    call: &Call<'_>,
    id: Option<&[u8]>,
    ttl_ms: u64,
    links: &[&[u8]],
    settings: &Settings,
    interner: &mut LayoutInterner,
) -> Result<Change, ChargeError> {
    let plan = &part.plan;
    let now = part.now;
    let (base, purged) = match subject {
        Some(s) => base_words(s, now),
        None => (smallvec::smallvec![0; plan.layout.words()], false),
    };
    if id.is_some() {
        if let Some(requests) = subject.and_then(Subject::requests) {
            let live = requests.len() - requests.expired(now).count();
            if live >= settings.max_requests {
                return Err(ChargeError::TooManyRequests(settings.max_requests));
            }
        }
    }
    let (layout, mut words, same_layout) = match subject {
        Some(s) if !s.holds_all_of(plan) => {
            let (layout, words) = s
                .layout_for(plan, &base, now, interner)
                .map_err(|_| ChargeError::TooManySlots)?;
            (layout, words, false)
        }
        Some(s) => (Arc::clone(s.layout()), base.clone(), true),
        None => (Arc::clone(&plan.layout), base.clone(), false),
    };
    let mut leases = Vec::new();
    let mut charges = Vec::new();
    for (_, limit) in applicable(plan, call.endpoint) {
        let Some(slot_index) = slot_in(&layout, plan, limit) else {
            continue;
        };
        let Some(slot) = layout.slots().get(slot_index) else {
            continue;
        };
        let Some(slot_words) = words.get_mut(layout.range(slot_index)) else {
            continue;
        };
        let cost = cost_for(limit, call);
        let (marker, mark) = match limit.spec.rule {
            Rule::Fixed { window, .. } => {
                fixed::charge(slot_words, cost);
                (window.index(now), 0)
            }
            Rule::Sliding {
                window_ms,
                precision,
                ..
            } => {
                let slices = Slices {
                    window_ms,
                    precision,
                };
                slices.charge(slot_words, now, cost);
                (slices.slice_of(now), 0)
            }
            Rule::Bucket {
                rate,
                window_ms,
                burst,
            } => {
                let Reserved {
                    drains_at, mark, ..
                } = Bucket {
                    rate,
                    window_ms,
                    burst,
                }
                .charge_reserved(slot_words, now, cost);
                (drains_at, mark)
            }
            Rule::Concurrency { .. } => {
                fixed::charge(slot_words, 1);
                leases.push(Arc::clone(&slot.name));
                continue;
            }
            Rule::Cap { .. } => continue,
        };
        if id.is_some() {
            charges.push(Charge {
                slot: slot.clone(),
                amount: cost,
                marker,
                mark,
            });
        }
    }
    let touched = same_layout.then(|| touched_slots(&layout, &base, &words));
    let mut change = Change {
        purge_at: purged.then_some(now),
        limits: Some(Limits {
            updated_ms: now,
            layout,
            words,
            touched,
        }),
        ..Change::default()
    };
    if let Some(id) = id {
        let request = Request {
            expires_at: now.saturating_add(ttl_ms),
            plan: Arc::clone(&plan.name),
            leases,
            charges,
            links: links.iter().map(|l| Box::from(*l)).collect(),
        };
        change.put = Some((id.into(), request));
    }
    Ok(change)
}

/// The slot of `limit`'s budget in `layout` (laid out for `plan`).
fn slot_in(layout: &Arc<Layout>, plan: &Plan, limit: &Limit) -> Option<usize> {
    let index = limit.slot?;
    if Arc::ptr_eq(layout, &plan.layout) {
        return Some(index);
    }
    layout.find(plan.layout.slots().get(index)?)
}

/// The slots whose words differ between `base` and `words` (both of `layout`).
fn touched_slots(layout: &Layout, base: &[u64], words: &[u64]) -> SmallVec<[u16; 8]> {
    (0..layout.len())
        .filter(|&i| base.get(layout.range(i)) != words.get(layout.range(i)))
        .filter_map(|i| u16::try_from(i).ok())
        .collect()
}

/// What settling a request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The plan the request was admitted under.
    pub plan: Arc<str>,
    /// The instant it was settled at.
    pub now: u64,
    /// The other keys the same call charged (released with it).
    pub links: Vec<Box<[u8]>>,
}

/// Why a release released nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReleased {
    /// No such request (or it ended too long ago to be remembered).
    Unknown,
    /// It expired (its lease freed itself).
    Expired,
    /// It was released already.
    Released,
}

impl NotReleased {
    pub fn as_str(self) -> &'static str {
        match self {
            NotReleased::Unknown => "unknown",
            NotReleased::Expired => "expired",
            NotReleased::Released => "released",
        }
    }
}

/// Why request `id` is not live on `subject` at `now`.
fn why_not_live(subject: Option<&Subject>, id: &[u8], now: u64) -> NotReleased {
    let Some(subject) = subject else {
        return NotReleased::Unknown;
    };
    if subject
        .requests()
        .and_then(|t| t.get(id))
        .is_some_and(|r| r.expires_at <= now)
    {
        return NotReleased::Expired;
    }
    match subject.ended(id, now) {
        Some(Ended::Released) => NotReleased::Released,
        Some(Ended::Expired) => NotReleased::Expired,
        None => NotReleased::Unknown,
    }
}

/// Ends request `id`: frees its leases and, for each `(unit, amount)` in `actual`,
/// replaces what the reservation charged in that unit by the actual amount —
/// refunding or charging the difference in the window that took the charge, if it is
/// still current and the subject still counts that budget the same way. A refund
/// gives back at most what of the charge is still counted (a bucket charge that has
/// partly drained refunds only the rest). Never refuses an overrun: it may leave a
/// limit past its capacity. Returns the change, or why nothing was released.
pub fn settle(
    subject: Option<&Subject>,
    id: &[u8],
    actual: &[(&str, u64)],
    clock_ms: u64,
) -> Result<(Settled, Change), NotReleased> {
    let now = subject.map_or(clock_ms, |s| s.effective_now(clock_ms));
    let (Some(subject), Some(request)) = (subject, subject.and_then(|s| s.live_request(id, now)))
    else {
        return Err(why_not_live(subject, id, now));
    };
    let (base, purged) = base_words(subject, now);
    let layout = subject.layout();
    let mut words = base.clone();
    subject::free_leases(layout, &mut words, request);
    for charge in &request.charges {
        let Some(&(_, actual_amount)) = actual.iter().find(|(u, _)| *u == &*charge.slot.unit)
        else {
            continue;
        };
        let Some(slot) = layout.find(&charge.slot) else {
            continue;
        };
        let Some(words) = words.get_mut(layout.range(slot)) else {
            continue;
        };
        let (refund, overrun) = if actual_amount >= charge.amount {
            (0, actual_amount - charge.amount)
        } else {
            (charge.amount - actual_amount, 0)
        };
        match charge.slot.shape {
            Shape::Fixed { window } => {
                if window.index(now) == charge.marker {
                    fixed::refund(words, refund);
                    fixed::charge(words, overrun);
                }
            }
            Shape::Sliding {
                window_ms,
                precision,
            } => {
                let slices = Slices {
                    window_ms,
                    precision,
                };
                slices.refund(words, now, charge.marker, refund);
                slices.overrun(words, now, charge.marker, overrun);
            }
            Shape::Bucket { window_ms } => {
                let bucket = Bucket::as_stored(words, window_ms);
                let reserved = Reserved {
                    amount: charge.amount,
                    drains_at: charge.marker,
                    mark: charge.mark,
                };
                bucket.refund_reserved(words, now, reserved, refund);
                bucket.charge(words, now, overrun);
            }
            Shape::Concurrency => {}
        }
    }
    let change = Change {
        purge_at: purged.then_some(now),
        limits: Some(Limits {
            updated_ms: now,
            layout: Arc::clone(layout),
            touched: Some(touched_slots(layout, &base, &words)),
            words,
        }),
        removed: Some(id.into()),
        ..Change::default()
    };
    Ok((
        Settled {
            plan: Arc::clone(&request.plan),
            now,
            links: request.links.clone(),
        },
        change,
    ))
}

/// Extends live request `id` to expire `ttl_ms` from now. Returns the new expiry and
/// the change, or why there is no live request `id`.
pub fn touch(
    subject: Option<&Subject>,
    id: &[u8],
    ttl_ms: u64,
    clock_ms: u64,
) -> Result<(u64, Change), NotReleased> {
    let now = subject.map_or(clock_ms, |s| s.effective_now(clock_ms));
    let (Some(subject), Some(request)) = (subject, subject.and_then(|s| s.live_request(id, now)))
    else {
        return Err(why_not_live(subject, id, now));
    };
    let purged = subject
        .requests()
        .is_some_and(|t| t.expired(now).next().is_some());
    let expires_at = now.saturating_add(ttl_ms);
    let mut request = request.clone();
    request.expires_at = expires_at;
    let change = Change {
        purge_at: purged.then_some(now),
        put: Some((id.into(), request)),
        ..Change::default()
    };
    Ok((expires_at, change))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_wrap_before_the_sequence_limit() {
        assert_eq!(generated_id(5, 0).0, 1);
        assert_eq!(generated_id(5, MAX_SEQ).0, 1);
        assert_eq!(&*generated_id(5, 7).1, b"5-8");
    }
}
