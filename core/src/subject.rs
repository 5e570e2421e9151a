//! The accounting state of one subject (the value of one subject key).
//!
//! - `layout` names the counters and `words` holds them (see [`crate::layout`]);
//! - `updated_ms` is the latest instant the state was brought to — the clock's
//!   high-water mark for this subject: calls are decided at
//!   `max(server clock, updated_ms)`, so a clock stepping back never admits more;
//! - `extra` holds what most subjects never need: in-flight requests (leases and
//!   reservations), the assigned plan and the id sequence. It is boxed so that a
//!   plain subject stays small.
//!
//! Always: `words.len() == layout.words()`, every slot is normalized to `updated_ms`,
//! and each concurrency slot's word counts the requests holding a lease in it.

use std::sync::Arc;

use crate::codec::{bad, DecodeError, Reader, Writer};
use crate::layout::{Layout, LayoutInterner, Shape};
use crate::limits::bucket::Bucket;
use crate::limits::{fixed, sliding::Slices};
use crate::plan::Plan;
use crate::requests::{Request, Requests};
use crate::spec::is_valid_name;

/// Version of [`Subject::encode`]'s format (the module's data-type encoding version).
pub const ENCODING_VERSION: u8 = 1;

/// Words kept inside the subject's own allocation: enough for the usual plans (a
/// sliding window of 10 slices, a fixed window and a bucket take 16), so a call
/// touches one allocation, not two. Larger layouts spill to the heap.
pub const INLINE_WORDS: usize = 16;

/// A subject's state words.
pub type Words = smallvec::SmallVec<[u64; INLINE_WORDS]>;

/// The limit part of a subject: `updated_ms`, layout and words.
pub type LimitPart = (u64, Arc<Layout>, Words);

/// Rarely used parts of a subject.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extra {
    /// The plan `*` resolves to for this subject; keeps the key from expiring.
    pub assigned: Option<Box<str>>,
    pub requests: Requests,
    /// Sequence for generated request ids.
    pub next_seq: u64,
    /// The key must not expire before this instant: clients are waiting on it.
    pub keep_until: u64,
}

impl Extra {
    fn is_empty(&self) -> bool {
        self.assigned.is_none() && self.requests.is_empty() && self.keep_until == 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub layout: Arc<Layout>,
    pub updated_ms: u64,
    pub words: Words,
    pub extra: Option<Box<Extra>>,
}

/// When a subject's key may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Everything is idle now: the key can be deleted.
    Idle,
    /// Idle from this instant on (at the latest).
    At(u64),
    /// Never by itself (an assigned plan keeps it).
    Never,
}

impl Subject {
    /// A subject with every counter of `layout` at zero, as of `now`.
    pub fn new(layout: Arc<Layout>, now: u64) -> Subject {
        let words = smallvec::smallvec![0; layout.words()];
        Subject {
            layout,
            updated_ms: now,
            words,
            extra: None,
        }
    }

    pub fn slot_words(&self, slot: usize) -> &[u64] {
        self.words.get(self.layout.range(slot)).unwrap_or(&[])
    }

    pub fn slot_words_mut(&mut self, slot: usize) -> &mut [u64] {
        let range = self.layout.range(slot);
        self.words.get_mut(range).unwrap_or(&mut [])
    }

    pub fn requests(&self) -> Option<&Requests> {
        self.extra.as_deref().map(|e| &e.requests)
    }

    pub fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Default::default)
    }

    pub fn assigned(&self) -> Option<&str> {
        self.extra.as_deref().and_then(|e| e.assigned.as_deref())
    }

    /// Drops `extra` when it holds nothing.
    pub fn tidy(&mut self) {
        if self.extra.as_deref().is_some_and(Extra::is_empty) {
            self.extra = None;
        }
    }

    /// The instant calls are decided at: never before what this subject has seen.
    pub fn effective_now(&self, clock_ms: u64) -> u64 {
        clock_ms.max(self.updated_ms)
    }

    /// Brings every slot from `updated_ms` to `now` (`now >= updated_ms`).
    pub fn normalize(&mut self, now: u64) {
        let updated = self.updated_ms;
        let layout = Arc::clone(&self.layout);
        for (i, slot) in layout.slots().iter().enumerate() {
            let words = self.slot_words_mut(i);
            match slot.shape {
                Shape::Fixed { window } => fixed::normalize(words, window, updated, now),
                Shape::Sliding {
                    window_ms,
                    precision,
                } => Slices {
                    window_ms,
                    precision,
                }
                .normalize(words, updated, now),
                Shape::Bucket { .. } | Shape::Concurrency => {}
            }
        }
        self.updated_ms = now;
    }

    /// Removes requests expired at `now`, freeing their leases.
    pub fn purge_expired(&mut self, now: u64) -> usize {
        let mut purged = 0;
        while let Some((_, request)) = self
            .extra
            .as_deref_mut()
            .and_then(|e| e.requests.pop_expired(now))
        {
            self.free_leases(&request);
            purged += 1;
        }
        purged
    }

    /// Takes one off each concurrency count the request held a lease in.
    pub fn free_leases(&mut self, request: &Request) {
        for lease in &request.leases {
            if let Some(i) = self.layout.lease_slot(lease) {
                if let Some(count) = self.slot_words_mut(i).first_mut() {
                    *count = count.saturating_sub(1);
                }
            }
        }
    }

    /// Whether every slot of `plan` is present here with the same unit and shape.
    pub fn holds_all_of(&self, plan: &Plan) -> bool {
        Arc::ptr_eq(&self.layout, &plan.layout)
            || plan
                .layout
                .slots()
                .iter()
                .all(|want| self.layout.find(want).is_some())
    }

    /// Re-lays the subject out for `plan` (normalized to `updated_ms` first): the
    /// plan's slots first — carrying usage over from identical slots (name, unit and
    /// shape), fresh otherwise — then every other slot that still holds usage, so
    /// switching between plans that count one name differently loses nothing, and
    /// every lease keeps its concurrency slot. Returns false, changing nothing, if
    /// that would take more than [`crate::layout::MAX_SLOTS`] slots.
    #[must_use]
    pub fn relayout_for(&mut self, plan: &Plan, interner: &mut LayoutInterner) -> bool {
        let old = Arc::clone(&self.layout);
        let mut slots: Vec<_> = plan.layout.slots().to_vec();
        for (i, slot) in old.slots().iter().enumerate() {
            if self.slot_busy(i, slot.shape) && !slots.contains(slot) {
                slots.push(slot.clone());
            }
        }
        if slots.len() > crate::layout::MAX_SLOTS {
            return false;
        }
        let layout = interner.intern(Layout::new(slots));
        let mut words: Words = smallvec::smallvec![0; layout.words()];
        for (i, slot) in layout.slots().iter().enumerate() {
            if let (Some(j), Some(dst)) = (old.find(slot), words.get_mut(layout.range(i))) {
                dst.copy_from_slice(self.slot_words(j));
            }
        }
        self.layout = layout;
        self.words = words;
        true
    }

    /// The instant slot `i` (of `shape`) holds no usage from; `None` if it holds none.
    /// Leases are not counted here: their requests' expiry is.
    fn slot_idle_at(&self, i: usize, shape: Shape) -> Option<u64> {
        let words = self.slot_words(i);
        match shape {
            Shape::Fixed { window } => fixed::idle_at(words, window, self.updated_ms),
            Shape::Sliding {
                window_ms,
                precision,
            } => Slices {
                window_ms,
                precision,
            }
            .idle_at(words, self.updated_ms),
            Shape::Bucket { .. } => Bucket::idle_at(words),
            Shape::Concurrency => None,
        }
    }

    /// Whether slot `i` still holds usage at `updated_ms` (a refilled bucket keeps
    /// non-zero words but holds none).
    fn slot_busy(&self, i: usize, shape: Shape) -> bool {
        match shape {
            Shape::Concurrency => self.slot_words(i).first().is_some_and(|&n| n > 0),
            _ => self
                .slot_idle_at(i, shape)
                .is_some_and(|at| at > self.updated_ms),
        }
    }

    /// When the key may expire: the latest instant any slot or request is busy until.
    pub fn expiry(&self) -> Expiry {
        if self.assigned().is_some() {
            return Expiry::Never;
        }
        let keep = self
            .extra
            .as_deref()
            .map(|e| e.keep_until)
            .filter(|&k| k > 0);
        let mut latest: Option<u64> = self.requests().and_then(Requests::last_expiry).max(keep);
        for (i, slot) in self.layout.slots().iter().enumerate() {
            latest = latest.max(self.slot_idle_at(i, slot.shape));
        }
        latest.map_or(Expiry::Idle, Expiry::At)
    }

    /// Writes the limit part (instant, layout, words): what a call that charges
    /// limits replicates.
    pub fn encode_limits(&self, w: &mut Writer) {
        w.varint(self.updated_ms);
        self.layout.encode(w);
        for &word in self.words.iter() {
            w.varint(word);
        }
    }

    /// Reads a limit part written by [`Subject::encode_limits`].
    pub fn decode_limits(
        r: &mut Reader<'_>,
        interner: &mut LayoutInterner,
    ) -> Result<LimitPart, DecodeError> {
        let updated_ms = r.varint()?;
        let layout = Layout::decode(r)?;
        let mut words = Words::with_capacity(layout.words());
        for _ in 0..layout.words() {
            words.push(r.varint()?);
        }
        Ok((updated_ms, interner.intern(layout), words))
    }

    /// Writes the whole subject (RDB, DUMP, AOF rewrite, digests). Canonical: equal
    /// subjects encode to equal bytes.
    pub fn encode(&self, w: &mut Writer) {
        self.encode_limits(w);
        match self.extra.as_deref() {
            None => w.u8(0),
            Some(extra) => {
                w.u8(1);
                match &extra.assigned {
                    Some(plan) => {
                        w.u8(1);
                        w.str(plan);
                    }
                    None => w.u8(0),
                }
                w.varint(extra.next_seq);
                w.varint(extra.keep_until);
                extra.requests.encode(w);
            }
        }
    }

    /// Reads a subject written by [`Subject::encode`], checking every invariant.
    pub fn decode(
        input: &[u8],
        interner: &mut LayoutInterner,
        max_requests: usize,
    ) -> Result<Subject, DecodeError> {
        let mut r = Reader::new(input);
        let (updated_ms, layout, words) = Subject::decode_limits(&mut r, interner)?;
        let extra = match r.u8()? {
            0 => None,
            1 => {
                let assigned = match r.u8()? {
                    0 => None,
                    1 => {
                        let plan = r.str()?;
                        if !is_valid_name(plan) {
                            return bad("invalid assigned plan name");
                        }
                        Some(plan.into())
                    }
                    t => return bad(format!("bad assignment tag {t}")),
                };
                let next_seq = r.varint()?;
                let keep_until = r.varint()?;
                let requests = Requests::decode(&mut r, max_requests)?;
                Some(Box::new(Extra {
                    assigned,
                    requests,
                    next_seq,
                    keep_until,
                }))
            }
            t => return bad(format!("bad extra tag {t}")),
        };
        r.finish()?;
        let mut subject = Subject {
            layout,
            updated_ms,
            words,
            extra,
        };
        subject.repair();
        Ok(subject)
    }

    /// Restores the lease invariant on a loaded subject: a lease names a concurrency
    /// slot of the layout, and each concurrency slot counts the requests leasing it.
    /// A well-formed subject never needs it; loading an inconsistent one (a damaged
    /// or hand-made payload) must not fail the whole RDB load. O(requests): called
    /// on load only. Returns whether anything changed.
    pub fn repair(&mut self) -> bool {
        let layout = Arc::clone(&self.layout);
        let mut changed = false;
        let mut counts = vec![0u64; layout.len()];
        if let Some(extra) = self.extra.as_deref_mut() {
            let mut fixed = Vec::new();
            for (id, request) in extra.requests.iter() {
                let held: Vec<Arc<str>> = request
                    .leases
                    .iter()
                    .filter(|l| layout.lease_slot(l).is_some())
                    .cloned()
                    .collect();
                for lease in &held {
                    if let Some(count) = layout.lease_slot(lease).and_then(|i| counts.get_mut(i)) {
                        *count += 1;
                    }
                }
                if held.len() != request.leases.len() {
                    fixed.push((Box::<[u8]>::from(id), held));
                }
            }
            for (id, held) in fixed {
                if let Some(mut request) = extra.requests.remove(&id) {
                    request.leases = held;
                    extra.requests.insert(&id, request);
                    changed = true;
                }
            }
        }
        for (i, slot) in layout.slots().iter().enumerate() {
            if slot.shape != Shape::Concurrency {
                continue;
            }
            let want = counts.get(i).copied().unwrap_or(0);
            if let Some(count) = self.slot_words_mut(i).first_mut() {
                if *count != want {
                    *count = want;
                    changed = true;
                }
            }
        }
        changed
    }

    /// Approximate heap bytes held (for `MEMORY USAGE`).
    pub fn mem_usage(&self) -> usize {
        let mut bytes = std::mem::size_of::<Subject>();
        if self.words.spilled() {
            bytes += self.words.capacity() * 8;
        }
        if let Some(extra) = self.extra.as_deref() {
            bytes += std::mem::size_of::<Extra>() + extra.assigned.as_deref().map_or(0, str::len);
            for (id, request) in extra.requests.iter() {
                // Two index entries and the id twice, the request and its vectors.
                bytes += 2 * (id.len() + 48)
                    + std::mem::size_of::<Request>()
                    + request.leases.len() * 16
                    + request.charges.len() * std::mem::size_of::<crate::requests::Charge>();
            }
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Plans;
    use crate::requests::Charge;

    fn plan(fields: &[(&str, &str)], interner: &mut LayoutInterner) -> Arc<Plan> {
        let mut plans = Plans::new();
        assert!(plans.set("p", fields, interner).is_ok());
        plans.get("p").cloned().unwrap_or_else(|| unreachable!())
    }

    #[test]
    fn relayout_carries_matching_slots_and_keeps_busy_foreign_ones() {
        let mut interner = LayoutInterner::new();
        let a = plan(
            &[("rpm", "fixed 10/1m"), ("daily", "fixed 100/1d")],
            &mut interner,
        );
        let mut s = Subject::new(Arc::clone(&a.layout), 1_000);
        s.words.copy_from_slice(&[3, 7]);
        // A plan sharing `daily`, changing `rpm`'s window and adding `tpm`.
        let b = plan(
            &[
                ("rpm", "fixed 10/1s"),
                ("daily", "fixed 500/1d"),
                ("tpm", "bucket 5 token/1s"),
            ],
            &mut interner,
        );
        assert!(s.relayout_for(&b, &mut interner));
        let names: Vec<&str> = s.layout.slots().iter().map(|s| &*s.name).collect();
        // b's slots first; a's busy 1-minute `rpm` is kept beside b's 1-second one.
        assert_eq!(names, ["rpm", "daily", "tpm", "rpm"]);
        assert_eq!(&s.words[..2], &[0, 7]);
        assert_eq!(s.words.last(), Some(&3));
        assert!(s.holds_all_of(&b));
        // Back to plan a: its `rpm` finds its usage again; b's idle `rpm` goes and
        // b's busy bucket stays.
        s.slot_words_mut(2).copy_from_slice(&[1_000, 5, 0, 1]);
        assert!(s.relayout_for(&a, &mut interner));
        let names: Vec<&str> = s.layout.slots().iter().map(|s| &*s.name).collect();
        assert_eq!(names, ["rpm", "daily", "tpm"]);
        assert_eq!(&s.words[..2], &[3, 7]);
        assert!(s.holds_all_of(&a));
        assert!(!s.holds_all_of(&b));
    }

    #[test]
    fn relayout_keeps_every_lease_counted() {
        let mut interner = LayoutInterner::new();
        let a = plan(&[("jobs", "concurrency 2")], &mut interner);
        let b = plan(&[("jobs", "fixed 5/1m")], &mut interner);
        let mut s = Subject::new(Arc::clone(&a.layout), 0);
        s.words[0] = 1;
        s.extra_mut().requests.insert(
            b"r",
            Request {
                expires_at: 10,
                plan: Arc::from("p"),
                leases: vec![Arc::from("jobs")],
                charges: vec![],
            },
        );
        // A plan with a `jobs` limit of another kind keeps the lease's slot...
        assert!(s.relayout_for(&b, &mut interner));
        assert_eq!(s.layout.len(), 2);
        assert_eq!(
            s.layout.lease_slot("jobs").map(|i| s.slot_words(i)),
            Some(&[1][..])
        );
        // ...and the lease frees where it was counted.
        assert_eq!(s.purge_expired(10), 1);
        assert_eq!(
            s.layout.lease_slot("jobs").map(|i| s.slot_words(i)),
            Some(&[0][..])
        );
        assert!(!s.repair());
    }

    #[test]
    fn relayout_past_the_slot_cap_is_refused_and_changes_nothing() {
        let mut interner = LayoutInterner::new();
        let mut s = Subject::new(Arc::new(Layout::empty()), 0);
        for i in 0..crate::layout::MAX_SLOTS {
            let p = plan(&[(&*format!("l{i}"), "fixed 5/1m")], &mut interner);
            assert!(s.relayout_for(&p, &mut interner));
            if let Some(w) = s.layout.find(&p.layout.slots()[0]) {
                s.slot_words_mut(w)[0] = 1;
            }
        }
        assert_eq!(s.layout.len(), crate::layout::MAX_SLOTS);
        let before = s.clone();
        let p = plan(&[("one_more", "fixed 5/1m")], &mut interner);
        assert!(!s.relayout_for(&p, &mut interner));
        assert_eq!(s, before);
    }

    #[test]
    fn expiry_is_the_latest_idle_instant() {
        let mut interner = LayoutInterner::new();
        let p = plan(
            &[("rpm", "fixed 10/1m"), ("tpm", "bucket 1 token/1s")],
            &mut interner,
        );
        let mut s = Subject::new(Arc::clone(&p.layout), 30_000);
        assert_eq!(s.expiry(), Expiry::Idle);
        s.words[0] = 1;
        assert_eq!(s.expiry(), Expiry::At(60_000));
        s.slot_words_mut(1).copy_from_slice(&[30_000, 90_000, 0, 1]); // 90 units of 1/s
        assert_eq!(s.expiry(), Expiry::At(120_000));
        s.extra_mut().assigned = Some("p".into());
        assert_eq!(s.expiry(), Expiry::Never);
    }

    #[test]
    fn subjects_round_trip_and_reject_every_truncation() {
        let mut interner = LayoutInterner::new();
        let p = plan(
            &[
                ("rpm", "sliding 10/1m precision 4"),
                ("jobs", "concurrency 2"),
            ],
            &mut interner,
        );
        let mut s = Subject::new(Arc::clone(&p.layout), 123);
        s.words[0] = 4;
        s.slot_words_mut(1)[0] = 1;
        let extra = s.extra_mut();
        extra.next_seq = 9;
        extra.assigned = Some("p".into());
        extra.requests.insert(
            b"r1",
            Request {
                expires_at: 500,
                plan: Arc::from("p"),
                leases: vec![Arc::from("jobs")],
                charges: vec![Charge {
                    slot: p.layout.slots()[0].clone(),
                    amount: 1,
                    marker: 3,
                }],
            },
        );
        let mut w = Writer::new();
        s.encode(&mut w);
        let buf = w.into_inner();
        assert_eq!(Subject::decode(&buf, &mut interner, 100).as_ref(), Ok(&s));
        for cut in 0..buf.len() {
            assert!(Subject::decode(&buf[..cut], &mut interner, 100).is_err());
        }
        // A lease count that disagrees with the requests, or a lease in a slot that
        // is not a concurrency limit, is repaired rather than failing the load.
        let mut damaged = s.clone();
        damaged.slot_words_mut(1)[0] = 2;
        damaged.extra_mut().requests.insert(
            b"r2",
            Request {
                expires_at: 600,
                plan: Arc::from("p"),
                leases: vec![Arc::from("rpm"), Arc::from("gone")],
                charges: vec![],
            },
        );
        let mut w = Writer::new();
        damaged.encode(&mut w);
        let loaded = Subject::decode(&w.into_inner(), &mut interner, 100);
        assert_eq!(loaded.as_ref().map(|l| l.slot_words(1)), Ok(&[1][..]));
        let leases = loaded.ok().and_then(|l| {
            l.requests()
                .and_then(|t| t.get(b"r2"))
                .map(|r| r.leases.len())
        });
        assert_eq!(leases, Some(0));
    }

    #[test]
    fn a_subject_fits_one_160_byte_allocation() {
        // One jemalloc size class holds the header and 16 inline words; growing the
        // struct costs every subject in memory.
        assert_eq!(std::mem::size_of::<Subject>(), 160);
    }

    #[test]
    fn purging_frees_leases() {
        let mut interner = LayoutInterner::new();
        let p = plan(&[("jobs", "concurrency 2")], &mut interner);
        let mut s = Subject::new(Arc::clone(&p.layout), 0);
        s.words[0] = 1;
        s.extra_mut().requests.insert(
            b"a",
            Request {
                expires_at: 10,
                plan: Arc::from("p"),
                leases: vec![Arc::from("jobs")],
                charges: vec![],
            },
        );
        assert_eq!(s.purge_expired(9), 0);
        assert_eq!(s.purge_expired(10), 1);
        assert_eq!(s.words[0], 0);
        s.tidy();
        assert!(s.extra.is_none());
    }
}
