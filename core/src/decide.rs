//! Deciding a call against a plan, and charging it.
//!
//! [`evaluate`] never changes anything: it decides at `max(clock, updated_ms)` and
//! reports every limit as it would stand after the call (so `RL.PEEK` answers exactly
//! what `RL.ACQUIRE` would). [`commit`] then charges an admitted call. A call is
//! admitted only if every limit that applies admits it (all-or-nothing).

use std::sync::Arc;

use crate::layout::LayoutInterner;
use crate::limits::bucket::Bucket;
use crate::limits::sliding::Slices;
use crate::limits::{fixed, past_warn, Admission};
use crate::plan::{Limit, Mode, Plan};
use crate::requests::{Charge, Request};
use crate::spec::{Rule, DEFAULT_UNIT};
use crate::subject::Subject;
use crate::time::FixedWindow;

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
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            default_ttl_ms: crate::spec::DEFAULT_LEASE_TTL_MS,
        }
    }
}

/// How one limit stands after the call (or now, if the call is not admitted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Index of the limit in the plan.
    pub limit: usize,
    pub remaining: u64,
    pub reset_ms: u64,
    /// Usage is at or past the limit's warn threshold.
    pub warn: bool,
    /// This call took usage past the warn threshold.
    pub warn_crossed: bool,
}

/// What denied a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// The limit at this index of the plan.
    Limit(usize),
    /// The call named an endpoint the plan does not mention.
    Endpoint,
}

/// The decision on one call under one plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The instant the call was decided at.
    pub now: u64,
    /// Whether and when the limits admit the call.
    pub admission: Admission,
    /// What denied it (`None` when every limit admits it).
    pub denied_by: Option<Denial>,
    /// Whether the call goes ahead: admitted, or denied under `mode shadow`.
    pub admitted: bool,
    /// The call registers a request (it named an `ID` or the plan holds leases).
    pub takes_request: bool,
    /// The TTL its lease or reservation gets.
    pub ttl_ms: u64,
}

/// A limit's state at `now`, read from the subject (or fresh).
enum View<'s> {
    Fixed {
        used: u64,
        capacity: u64,
        window: FixedWindow,
    },
    Sliding {
        words: &'s [u64],
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

/// The index of `limit`'s slot in `subject`, if it holds that counter (same name,
/// unit and shape); `None` means the counter starts fresh.
fn slot_of(plan: &Plan, limit: &Limit, subject: &Subject) -> Option<usize> {
    let index = limit.slot?;
    if Arc::ptr_eq(&subject.layout, &plan.layout) {
        return Some(index);
    }
    subject.layout.find(plan.layout.slots().get(index)?)
}

/// `replacing` is the live request the call's `ID` would replace (its lease frees).
fn view<'s>(
    plan: &Plan,
    limit: &Limit,
    subject: Option<&'s Subject>,
    now: u64,
    replacing: Option<&Request>,
) -> View<'s> {
    let slot = subject.and_then(|s| slot_of(plan, limit, s).map(|i| (s, i)));
    let (words, updated) = slot.map_or((&[][..], now), |(s, i)| (s.slot_words(i), s.updated_ms));
    match limit.spec.rule {
        Rule::Fixed { capacity, window } => View::Fixed {
            used: fixed::used_at(words, window, updated, now),
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
            View::Sliding {
                words,
                updated,
                slices,
                used: slices.used_at(words, updated, now),
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
                debt: bucket.debt_at(words, now),
                bucket,
            }
        }
        Rule::Concurrency { max, .. } => {
            let counted = words.first().copied().unwrap_or(0);
            // Leases that expired but are not yet purged do not count.
            let expired = slot.map_or(0, |(s, _)| {
                s.requests().map_or(0, |t| {
                    t.expired(now)
                        .filter(|r| r.leases.iter().any(|l| **l == *limit.name))
                        .count()
                })
            });
            let replaced =
                replacing.is_some_and(|r| r.leases.iter().any(|l| **l == *limit.name)) as u64;
            View::Concurrency {
                live: counted.saturating_sub(expired as u64 + replaced),
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
    match *view {
        View::Fixed {
            used,
            capacity,
            window,
        } => fixed::admission(used, cost, capacity, window, now),
        View::Sliding {
            words,
            updated,
            slices,
            used,
            capacity,
        } => slices.admission(words, updated, now, used, cost, capacity),
        View::Bucket { debt, bucket } => bucket.admission(debt, cost),
        View::Concurrency { live, max } => {
            if max == 0 {
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
            if cost > max {
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
    let (remaining, reset_ms, before, after) = match *view {
        View::Fixed {
            used,
            capacity,
            window,
        } => {
            let after = used.saturating_add(pending);
            (
                capacity.saturating_sub(after),
                fixed::reset_ms(after, window, now),
                past_warn(used.into(), capacity.into(), warn_pct),
                past_warn(after.into(), capacity.into(), warn_pct),
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
                crate::limits::to_u64(u128::from(capacity).saturating_sub(after)),
                slices.reset_ms(words, updated, now, pending),
                past_warn(used, capacity.into(), warn_pct),
                past_warn(after, capacity.into(), warn_pct),
            )
        }
        View::Bucket { debt, bucket } => {
            let after = debt.saturating_add(u128::from(pending) * u128::from(bucket.window_ms));
            let full = u128::from(bucket.burst) * u128::from(bucket.window_ms);
            (
                bucket.remaining(after),
                bucket.reset_ms(after),
                past_warn(debt, full, warn_pct),
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
                max.saturating_sub(in_flight),
                last.map_or(0, |at| at.saturating_sub(now)),
                false,
                false,
            )
        }
        View::Cap { max } => (max, 0, false, false),
    };
    Outcome {
        limit: index,
        remaining,
        reset_ms,
        warn: after,
        warn_crossed: after && !before && pending > 0,
    }
}

/// The TTL of the request a call would register under `plan`.
fn request_ttl(plan: &Plan, call: &Call<'_>, settings: &Settings) -> u64 {
    call.ttl_ms.unwrap_or_else(|| {
        plan.limits
            .iter()
            .filter(|l| l.applies_to(call.endpoint))
            .filter_map(|l| match l.spec.rule {
                Rule::Concurrency { ttl_ms, .. } => Some(ttl_ms.unwrap_or(settings.default_ttl_ms)),
                _ => None,
            })
            .max()
            .unwrap_or(settings.default_ttl_ms)
    })
}

/// Decides `call` under `plan` at `clock_ms` without changing anything, and writes
/// how each applicable limit would stand into `out`.
pub fn evaluate(
    plan: &Plan,
    subject: Option<&Subject>,
    call: &Call<'_>,
    clock_ms: u64,
    settings: &Settings,
    out: &mut Vec<Outcome>,
) -> Verdict {
    let now = subject.map_or(clock_ms, |s| s.effective_now(clock_ms));
    let mut result = Admission::Now;
    let mut denied_by = None;
    if !plan.admits_endpoint(call.endpoint) {
        result = Admission::Never;
        denied_by = Some(Denial::Endpoint);
    }
    let applicable = || {
        plan.limits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.applies_to(call.endpoint))
    };
    let ttl_ms = request_ttl(plan, call, settings);
    let lease_until = now.saturating_add(ttl_ms);
    let mut takes_request = call.id.is_some();
    let replacing = call
        .id
        .and_then(|id| subject?.requests()?.get(id))
        .filter(|r| r.expires_at > now);
    // One pass computes each limit's view, admission and standing as if the call is
    // admitted (the common case); a denied call recomputes its standings uncharged.
    out.clear();
    for (index, limit) in applicable() {
        let cost = cost_for(limit, call);
        let v = view(plan, limit, subject, now, replacing);
        let this = admission(&v, cost, now, limit, subject);
        let worse = match (this, result) {
            (Admission::Now, _) | (_, Admission::Never) => false,
            (Admission::Never, _) | (_, Admission::Now) => true,
            (Admission::After(a), Admission::After(b)) => a > b,
        };
        if worse {
            denied_by = Some(Denial::Limit(index));
        }
        result = result.and(this);
        takes_request |= matches!(limit.spec.rule, Rule::Concurrency { .. });
        out.push(outcome(index, limit, &v, cost, now, lease_until, subject));
    }
    let admitted = result.is_now() || plan.mode == Mode::Shadow;
    if !admitted {
        standing(plan, subject, call, now, out);
    }
    Verdict {
        now,
        admission: result,
        denied_by,
        admitted,
        takes_request,
        ttl_ms,
    }
}

/// How each limit of `plan` that applies to `call` stands now, charging nothing (the
/// limits part of a denied call's reply).
pub fn standing(
    plan: &Plan,
    subject: Option<&Subject>,
    call: &Call<'_>,
    clock_ms: u64,
    out: &mut Vec<Outcome>,
) {
    let now = subject.map_or(clock_ms, |s| s.effective_now(clock_ms));
    out.clear();
    for (index, limit) in plan
        .limits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.applies_to(call.endpoint))
    {
        let v = view(plan, limit, subject, now, None);
        out.push(outcome(index, limit, &v, 0, now, now, subject));
    }
}

/// How every limit of `plan` stands for `subject` at `clock_ms`, charging nothing
/// (the limits part of an `RL.RELEASE` reply).
pub fn report(plan: &Plan, subject: Option<&Subject>, clock_ms: u64, out: &mut Vec<Outcome>) {
    let now = subject.map_or(clock_ms, |s| s.effective_now(clock_ms));
    out.clear();
    for (index, limit) in plan.limits.iter().enumerate() {
        let v = view(plan, limit, subject, now, None);
        out.push(outcome(index, limit, &v, 0, now, now, subject));
    }
}

/// Why an admitted call could not be charged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitError {
    /// Re-laying the subject out for the plan would take more than
    /// [`crate::layout::MAX_SLOTS`] counters (too many differently-shaped limits
    /// with usage in flight on one subject).
    TooManySlots,
}

/// Charges an admitted call: brings the subject to `verdict.now`, re-lays it out for
/// `plan` if needed, charges every applicable limit and registers the request.
/// Returns the request id when one was registered (generated if the call named none).
/// A request that reuses a live id replaces it: the old one's leases are freed first.
/// On error nothing is changed.
pub fn commit(
    plan: &Plan,
    subject: &mut Subject,
    call: &Call<'_>,
    verdict: &Verdict,
    interner: &mut LayoutInterner,
) -> Result<Option<Box<[u8]>>, CommitError> {
    let now = verdict.now;
    if subject.holds_all_of(plan) {
        subject.purge_expired(now);
        subject.normalize(now);
    } else {
        // Rare (the plan changed): work on a copy so that a refusal changes nothing.
        let mut relaid = subject.clone();
        relaid.purge_expired(now);
        relaid.normalize(now);
        if !relaid.relayout_for(plan, interner) {
            return Err(CommitError::TooManySlots);
        }
        *subject = relaid;
    }
    if let Some(old) = call
        .id
        .filter(|_| verdict.takes_request)
        .and_then(|id| subject.extra.as_deref_mut()?.requests.remove(id))
    {
        subject.free_leases(&old);
    }
    let mut leases = Vec::new();
    let mut charges = Vec::new();
    // Held apart from the subject so that slots can be read while words are written.
    let layout = Arc::clone(&subject.layout);
    for limit in plan.limits.iter().filter(|l| l.applies_to(call.endpoint)) {
        let Some(slot) = slot_of(plan, limit, subject) else {
            continue;
        };
        let cost = cost_for(limit, call);
        let slot_meta = layout.slots().get(slot);
        let words = subject.slot_words_mut(slot);
        let marker = match limit.spec.rule {
            Rule::Fixed { window, .. } => {
                fixed::charge(words, cost);
                window.index(now)
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
                slices.charge(words, now, cost);
                slices.slice_of(now)
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
                bucket.charge(words, now, cost);
                now.saturating_add(bucket.reset_ms(bucket.debt_at(words, now)))
            }
            Rule::Concurrency { .. } => {
                fixed::charge(words, 1);
                leases.extend(slot_meta.map(|s| Arc::clone(&s.name)));
                continue;
            }
            Rule::Cap { .. } => continue,
        };
        if let Some(slot) = slot_meta.filter(|_| verdict.takes_request) {
            charges.push(Charge {
                slot: slot.clone(),
                amount: cost,
                marker,
            });
        }
    }
    if !verdict.takes_request {
        return Ok(None);
    }
    let extra = subject.extra_mut();
    let id: Box<[u8]> = match call.id {
        Some(id) => id.into(),
        None => loop {
            // A caller may have picked an id of this form: never reuse a live one.
            extra.next_seq = extra.next_seq.wrapping_add(1);
            let id = format!("{now}-{}", extra.next_seq).into_bytes();
            if extra.requests.get(&id).is_none() {
                break id.into_boxed_slice();
            }
        },
    };
    let request = Request {
        expires_at: now.saturating_add(verdict.ttl_ms),
        plan: Arc::clone(&plan.name),
        leases,
        charges,
    };
    extra.requests.insert(&id, request);
    Ok(Some(id))
}

/// Longest fallback chain followed (plans refuse cycles; this bounds the walk anyway).
pub const MAX_FALLBACK_DEPTH: usize = 16;

/// The plan that decided a call, and how.
#[derive(Debug, Clone)]
pub struct Decided {
    pub plan: Arc<Plan>,
    pub verdict: Verdict,
}

/// Decides `call` under `requested` and, while it is denied, under each fallback plan
/// in turn (same subject, same instant). Returns the first plan that admits the call,
/// or the requested plan's denial; `out` holds that plan's outcomes.
pub fn decide(
    plans: &crate::plan::Plans,
    requested: &Arc<Plan>,
    subject: Option<&Subject>,
    call: &Call<'_>,
    clock_ms: u64,
    settings: &Settings,
    out: &mut Vec<Outcome>,
) -> Decided {
    let verdict = evaluate(requested, subject, call, clock_ms, settings, out);
    let mut decided = Decided {
        plan: Arc::clone(requested),
        verdict,
    };
    if verdict.admitted {
        return decided;
    }
    let mut scratch = Vec::new();
    let mut next = requested.fallback.as_deref();
    for _ in 0..MAX_FALLBACK_DEPTH {
        let Some(plan) = next.and_then(|name| plans.get(name)) else {
            break;
        };
        let verdict = evaluate(plan, subject, call, clock_ms, settings, &mut scratch);
        if verdict.admitted {
            std::mem::swap(out, &mut scratch);
            decided = Decided {
                plan: Arc::clone(plan),
                verdict,
            };
            break;
        }
        next = plan.fallback.as_deref();
    }
    decided
}

/// What settling a request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The plan the request was admitted under.
    pub plan: Arc<str>,
    /// The instant it was settled at.
    pub now: u64,
}

/// Ends request `id`: frees its leases and, for each `(unit, amount)` in `actual`, replaces what
/// the reservation charged in that unit by the actual amount — refunding or charging
/// the difference in the window that took the charge, if it is still current (a
/// bucket charge is current until it would have drained). Never refuses: an overrun
/// may leave a limit past its capacity. `None` if there is no live request `id`.
pub fn release(
    subject: &mut Subject,
    id: &[u8],
    actual: &[(&str, u64)],
    clock_ms: u64,
) -> Option<Settled> {
    let now = subject.effective_now(clock_ms);
    if !is_live(subject, id, now) {
        return None;
    }
    subject.purge_expired(now);
    let request = subject.extra.as_deref_mut()?.requests.remove(id)?;
    subject.free_leases(&request);
    subject.normalize(now);
    for charge in &request.charges {
        let Some(slot) = subject.layout.find(&charge.slot) else {
            continue;
        };
        let Some(&(_, actual_amount)) = actual.iter().find(|(u, _)| *u == &*charge.slot.unit)
        else {
            continue;
        };
        let (refund, overrun) = if actual_amount >= charge.amount {
            (0, actual_amount - charge.amount)
        } else {
            (charge.amount - actual_amount, 0)
        };
        let words = subject.slot_words_mut(slot);
        match charge.slot.shape {
            crate::layout::Shape::Fixed { window } => {
                if window.index(now) == charge.marker {
                    fixed::refund(words, refund);
                    fixed::charge(words, overrun);
                }
            }
            crate::layout::Shape::Sliding {
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
            crate::layout::Shape::Bucket { window_ms } => {
                if now < charge.marker {
                    let bucket = Bucket::as_stored(words, window_ms);
                    bucket.refund(words, now, refund);
                    bucket.charge(words, now, overrun);
                }
            }
            crate::layout::Shape::Concurrency => {}
        }
    }
    subject.tidy();
    Some(Settled {
        plan: request.plan,
        now,
    })
}

/// Whether `id` names a request that has not expired at `now`.
fn is_live(subject: &Subject, id: &[u8], now: u64) -> bool {
    subject
        .requests()
        .and_then(|t| t.get(id))
        .is_some_and(|r| r.expires_at > now)
}

/// Extends live request `id` to expire `ttl_ms` from now, returning the new expiry.
/// `None` (and nothing changed) if there is no live request `id`.
pub fn touch(subject: &mut Subject, id: &[u8], ttl_ms: u64, clock_ms: u64) -> Option<u64> {
    let now = subject.effective_now(clock_ms);
    if !is_live(subject, id, now) {
        return None;
    }
    subject.purge_expired(now);
    subject.normalize(now);
    let expires_at = now.saturating_add(ttl_ms);
    let extra = subject.extra.as_deref_mut()?;
    extra
        .requests
        .set_expiry(id, expires_at)
        .then_some(expires_at)
}
