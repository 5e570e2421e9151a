//! The accounting state of one subject (the value of one subject key).
//!
//! - `layout` names the counters and `words` holds them (see [`crate::layout`]),
//!   packed as varints in the subject's own allocation ([`Packed`]): most counters
//!   are small, so a 3-limit subject fits 64 bytes where plain words took 160;
//! - `updated_ms` is the latest instant the state was brought to — the clock's
//!   high-water mark for this subject: calls are decided at
//!   `max(server clock, updated_ms)`, so a clock stepping back never admits more;
//! - `extra` holds what most subjects never need: in-flight requests (leases and
//!   reservations), the assigned plan, the id sequence and the last requests that
//!   ended. It is boxed so that a plain subject stays small.
//!
//! Always: `words.len() == layout.words()`, every slot is normalized to `updated_ms`,
//! each concurrency slot's word counts the requests holding a lease in it, and every
//! instant and sequence is in the range [`Subject::decode`] accepts — so whatever a
//! command made saves and loads again.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::codec::{bad, DecodeError, Reader, Writer};
use crate::layout::{Layout, LayoutInterner, Shape};
use crate::limits::bucket::{self, Bucket};
use crate::limits::{add_units, carry_over, fixed, sliding::Slices, used_units};
use crate::plan::Plan;
use crate::requests::{Request, Requests, MAX_EXPIRY_MS, MAX_ID_LEN};
use crate::spec::is_valid_name;
use crate::time::MAX_INSTANT_MS;

/// Version of [`Subject::encode`]'s format (the module's data-type encoding version).
/// Version 1 (the first release) is still read: its buckets had four words, its
/// requests no bucket marks or links, and a budget could have two shapes.
pub const ENCODING_VERSION: u8 = 2;

/// Words a subject's state is unpacked into for a call (on the stack for the usual
/// plans: a sliding window of 10 slices, a fixed window and a bucket take 17).
pub const INLINE_WORDS: usize = 24;

/// Packed bytes kept inside the subject's own allocation: enough for the usual plans,
/// so a subject is one 64-byte allocation; larger states spill to the heap.
pub const PACKED_INLINE: usize = 32;

/// Highest id sequence number; generated ids wrap around before it.
pub const MAX_SEQ: u64 = 1 << 62;

/// How many ended requests a subject remembers (so a repeated release can say why
/// it released nothing).
pub const ENDED_KEPT: usize = 8;
/// How long an ended request is remembered (and keeps its key alive): long enough
/// for a client to retry a release whose reply it lost.
pub const ENDED_REMEMBERED_MS: u64 = 60_000;

/// A subject's state words.
pub type Words = smallvec::SmallVec<[u64; INLINE_WORDS]>;

/// How a request ended, for a release that finds it gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Released,
    Expired,
}

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
    /// The last requests that ended, newest last, each with the instant it is
    /// forgotten.
    pub ended: VecDeque<(Box<[u8]>, Ended, u64)>,
}

impl Extra {
    fn is_empty(&self) -> bool {
        self.assigned.is_none()
            && self.requests.is_empty()
            && self.keep_until == 0
            && self.ended.is_empty()
    }

    /// Remembers that request `id` ended at `now` (forgetting what was due by then).
    pub fn record_end(&mut self, id: &[u8], how: Ended, now: u64) {
        self.ended.retain(|(_, _, until)| *until > now);
        if self.ended.len() >= ENDED_KEPT {
            self.ended.pop_front();
        }
        self.ended
            .push_back((Box::from(id), how, now.saturating_add(ENDED_REMEMBERED_MS)));
    }
}

/// A subject's words, packed: one LEB128 varint per word, slot by slot, except a
/// bucket's last-update instant, kept as its (zigzag) distance back from
/// `updated_ms` — usually one byte. Canonical: equal words pack to equal bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packed(smallvec::SmallVec<[u8; PACKED_INLINE]>);

impl Packed {
    fn pack(layout: &Layout, updated_ms: u64, words: &[u64]) -> Packed {
        let mut bytes = smallvec::SmallVec::new();
        let mut offset = 0;
        for slot in layout.slots() {
            let n = slot.shape.words();
            for (j, &word) in words
                .get(offset..offset + n)
                .unwrap_or(&[])
                .iter()
                .enumerate()
            {
                let word = match (slot.shape, j) {
                    (Shape::Bucket { .. }, 0) => zigzag(i128::from(updated_ms) - i128::from(word)),
                    _ => word,
                };
                push_varint(&mut bytes, word);
            }
            offset += n;
        }
        Packed(bytes)
    }

    fn unpack(&self, layout: &Layout, updated_ms: u64) -> Words {
        let mut words = Words::new();
        let mut bytes = self.0.iter();
        for slot in layout.slots() {
            for j in 0..slot.shape.words() {
                // Packed by `pack` for this layout: a short read is impossible.
                let word = next_varint(&mut bytes);
                words.push(match (slot.shape, j) {
                    (Shape::Bucket { .. }, 0) => unzigzag(updated_ms, word),
                    _ => word,
                });
            }
        }
        words
    }

    /// Heap bytes held beyond the subject's allocation.
    fn heap_bytes(&self) -> usize {
        if self.0.spilled() {
            self.0.capacity()
        } else {
            0
        }
    }
}

/// Appends `v` as a LEB128 varint.
fn push_varint(bytes: &mut smallvec::SmallVec<[u8; PACKED_INLINE]>, mut v: u64) {
    while v >= 0x80 {
        bytes.push((v as u8) | 0x80);
        v >>= 7;
    }
    bytes.push(v as u8);
}

/// Reads one LEB128 varint (0 at the end of the bytes).
fn next_varint(bytes: &mut std::slice::Iter<'_, u8>) -> u64 {
    let mut value = 0u64;
    let mut shift = 0u32;
    for &byte in bytes.by_ref() {
        value |= u64::from(byte & 0x7f).checked_shl(shift).unwrap_or(0);
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    value
}

/// A distance as an unsigned varint: 0, -1, 1, -2, ... → 0, 1, 2, 3, ...
fn zigzag(d: i128) -> u64 {
    let d = d.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    ((d << 1) ^ (d >> 63)) as u64
}

/// The instant `updated_ms - d` for a zigzagged distance `d`.
fn unzigzag(updated_ms: u64, z: u64) -> u64 {
    let d = ((z >> 1) as i64) ^ -((z & 1) as i64);
    u64::try_from(i128::from(updated_ms) - i128::from(d)).unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    layout: Arc<Layout>,
    updated_ms: u64,
    packed: Packed,
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

/// Re-laying a subject out would take more than [`crate::layout::MAX_SLOTS`] slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManySlots;

/// Brings words of `layout` from `updated` to `now` (`now >= updated`).
pub fn normalize_words(layout: &Layout, words: &mut [u64], updated: u64, now: u64) {
    for (i, slot) in layout.slots().iter().enumerate() {
        let Some(words) = words.get_mut(layout.range(i)) else {
            continue;
        };
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
}

impl Subject {
    /// A subject with every counter of `layout` at zero, as of `now`.
    pub fn new(layout: Arc<Layout>, now: u64) -> Subject {
        let updated_ms = now.min(MAX_INSTANT_MS);
        let words: Words = smallvec::smallvec![0; layout.words()];
        Subject {
            packed: Packed::pack(&layout, updated_ms, &words),
            layout,
            updated_ms,
            extra: None,
        }
    }

    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// The latest instant the state was brought to.
    pub fn updated_ms(&self) -> u64 {
        self.updated_ms
    }

    /// The state words (unpacked: a copy).
    pub fn words(&self) -> Words {
        self.packed.unpack(&self.layout, self.updated_ms)
    }

    /// The words of slot `slot` (a copy).
    pub fn slot_words(&self, slot: usize) -> Words {
        self.words()
            .get(self.layout.range(slot))
            .map(Words::from_slice)
            .unwrap_or_default()
    }

    /// Replaces the limit part: the instant, the layout and its words.
    pub fn set_limits(&mut self, updated_ms: u64, layout: Arc<Layout>, words: &[u64]) {
        self.packed = Packed::pack(&layout, updated_ms, words);
        self.layout = layout;
        self.updated_ms = updated_ms;
    }

    /// Changes the words in place (`f` gets them unpacked).
    pub fn update_words(&mut self, f: impl FnOnce(&mut [u64])) {
        let mut words = self.words();
        f(&mut words);
        self.packed = Packed::pack(&self.layout, self.updated_ms, &words);
    }

    pub fn requests(&self) -> Option<&Requests> {
        self.extra.as_deref().map(|e| &e.requests)
    }

    /// The live request `id` at `now`, if any.
    pub fn live_request(&self, id: &[u8], now: u64) -> Option<&Request> {
        self.requests()?.get(id).filter(|r| r.expires_at > now)
    }

    pub fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Default::default)
    }

    pub fn assigned(&self) -> Option<&str> {
        self.extra.as_deref().and_then(|e| e.assigned.as_deref())
    }

    /// How request `id` ended, if this subject still remembers it at `now`.
    pub fn ended(&self, id: &[u8], now: u64) -> Option<Ended> {
        self.extra
            .as_deref()?
            .ended
            .iter()
            .rev()
            .find(|(e, _, until)| &**e == id && *until > now)
            .map(|(_, how, _)| *how)
    }

    /// Drops `extra` when it holds nothing.
    pub fn tidy(&mut self) {
        if self.extra.as_deref().is_some_and(Extra::is_empty) {
            self.extra = None;
        }
    }

    /// The instant calls are decided at: never before what this subject has seen,
    /// never past [`MAX_INSTANT_MS`].
    pub fn effective_now(&self, clock_ms: u64) -> u64 {
        clock_ms.min(MAX_INSTANT_MS).max(self.updated_ms)
    }

    /// Brings every slot from `updated_ms` to `now` (`now >= updated_ms`).
    pub fn normalize(&mut self, now: u64) {
        let mut words = self.words();
        normalize_words(&self.layout, &mut words, self.updated_ms, now);
        let layout = Arc::clone(&self.layout);
        self.set_limits(now, layout, &words);
    }

    /// Removes requests expired at `now`, freeing their leases.
    pub fn purge_expired(&mut self, now: u64) -> usize {
        let mut purged = 0;
        while let Some((id, request)) = self
            .extra
            .as_deref_mut()
            .and_then(|e| e.requests.pop_expired(now))
        {
            self.free_leases(&request);
            self.extra_mut().record_end(&id, Ended::Expired, now);
            purged += 1;
        }
        purged
    }

    /// Takes one off each concurrency count the request held a lease in.
    pub fn free_leases(&mut self, request: &Request) {
        if request.leases.is_empty() {
            return;
        }
        let layout = Arc::clone(&self.layout);
        self.update_words(|words| free_leases(&layout, words, request));
    }

    /// Whether every slot of `plan` is present here in the same shape.
    pub fn holds_all_of(&self, plan: &Plan) -> bool {
        Arc::ptr_eq(&self.layout, &plan.layout)
            || plan
                .layout
                .slots()
                .iter()
                .all(|want| self.layout.find(want).is_some())
    }

    /// The layout and words the subject would have laid out for `plan` at `now`
    /// (its words normalized to `now`): the plan's slots first — carrying each
    /// budget's usage over, converted if the plan counts it in another shape — then
    /// every other slot that still holds usage, so switching plans loses nothing and
    /// every lease keeps its concurrency slot. Changes nothing.
    pub fn layout_for(
        &self,
        plan: &Plan,
        words: &[u64],
        now: u64,
        interner: &mut LayoutInterner,
    ) -> Result<(Arc<Layout>, Words), TooManySlots> {
        let old = &self.layout;
        let busy = |i: usize, shape: Shape| {
            let w = words.get(old.range(i)).unwrap_or(&[]);
            slot_busy(shape, w, now)
        };
        let mut slots: Vec<_> = plan.layout.slots().to_vec();
        for (i, slot) in old.slots().iter().enumerate() {
            let counted = slots.iter().any(|s| s.is_budget(&slot.name, &slot.unit));
            if !counted && busy(i, slot.shape) {
                slots.push(slot.clone());
            }
        }
        if slots.len() > crate::layout::MAX_SLOTS {
            return Err(TooManySlots);
        }
        let layout = interner.intern(Layout::new(slots));
        let mut new_words: Words = smallvec::smallvec![0; layout.words()];
        for (i, slot) in layout.slots().iter().enumerate() {
            let Some(j) = old.find_budget(&slot.name, &slot.unit) else {
                continue;
            };
            let (Some(from), Some(to)) =
                (words.get(old.range(j)), new_words.get_mut(layout.range(i)))
            else {
                continue;
            };
            let from_shape = old.slots().get(j).map(|s| s.shape);
            if from_shape == Some(slot.shape) {
                to.copy_from_slice(from);
            } else if let Some(from_shape) = from_shape {
                let rate = plan_rate(plan, &slot.name, &slot.unit);
                carry_over((from_shape, from), now, (slot.shape, rate), now, to);
            }
        }
        Ok((layout, new_words))
    }

    /// When the key may expire: the latest instant any slot or request is busy until.
    pub fn expiry(&self) -> Expiry {
        self.expiry_with(&self.words())
    }

    /// [`Subject::expiry`], given the subject's words (already unpacked).
    pub fn expiry_with(&self, words: &[u64]) -> Expiry {
        if self.assigned().is_some() {
            return Expiry::Never;
        }
        let keep = self
            .extra
            .as_deref()
            .map(|e| e.keep_until)
            .filter(|&k| k > 0);
        let ended = self
            .extra
            .as_deref()
            .and_then(|e| e.ended.iter().map(|(_, _, until)| *until).max());
        let mut latest: Option<u64> = self
            .requests()
            .and_then(Requests::last_expiry)
            .max(keep)
            .max(ended);
        for (i, slot) in self.layout.slots().iter().enumerate() {
            let w = words.get(self.layout.range(i)).unwrap_or(&[]);
            latest = latest.max(slot_idle_at(slot.shape, w, self.updated_ms));
        }
        latest.map_or(Expiry::Idle, Expiry::At)
    }

    /// Writes the whole subject (RDB, DUMP, AOF rewrite, digests). Canonical: equal
    /// subjects encode to equal bytes.
    pub fn encode(&self, w: &mut Writer) {
        w.varint(self.updated_ms);
        self.layout.encode(w);
        for &word in self.words().iter() {
            w.varint(word);
        }
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
                w.varint(extra.ended.len() as u64);
                for (id, how, until) in &extra.ended {
                    w.bytes(id);
                    w.u8(match how {
                        Ended::Released => 1,
                        Ended::Expired => 2,
                    });
                    w.varint(*until);
                }
            }
        }
    }

    /// Reads the limit part (instant, layout, words) of encoding `version`.
    pub fn decode_limits(
        r: &mut Reader<'_>,
        interner: &mut LayoutInterner,
        version: u8,
    ) -> Result<(u64, Arc<Layout>, Words), DecodeError> {
        let updated_ms = r.varint()?;
        if updated_ms > MAX_INSTANT_MS {
            return bad("instant out of range");
        }
        let layout = Layout::decode(r, version)?;
        let mut words = Words::with_capacity(layout.words());
        for slot in layout.slots() {
            let stored = match (version, slot.shape) {
                (1, Shape::Bucket { .. }) => bucket::WORDS - 1,
                _ => slot.shape.words(),
            };
            for _ in 0..stored {
                words.push(r.varint()?);
            }
            // Version 1 buckets had no refund mark: they start at mark 0.
            words.resize(words.len() + slot.shape.words() - stored, 0);
        }
        if version == 1 {
            return Ok(merge_v1_budgets(layout, words, updated_ms, interner));
        }
        Ok((updated_ms, interner.intern(layout), words))
    }

    /// Reads a subject of encoding `version` written by [`Subject::encode`], refusing
    /// anything a command could not have made.
    pub fn decode(
        input: &[u8],
        interner: &mut LayoutInterner,
        version: u8,
    ) -> Result<Subject, DecodeError> {
        if version == 0 || version > ENCODING_VERSION {
            return bad(format!("unknown subject encoding version {version}"));
        }
        let mut r = Reader::new(input);
        let (updated_ms, layout, words) = Subject::decode_limits(&mut r, interner, version)?;
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
                if next_seq > MAX_SEQ || keep_until > MAX_EXPIRY_MS {
                    return bad("sequence or keep-alive instant out of range");
                }
                let requests = Requests::decode(&mut r, version)?;
                let mut ended = VecDeque::new();
                if version > 1 {
                    for _ in 0..r.count(ENDED_KEPT)? {
                        let id = r.bytes()?;
                        if id.is_empty() || id.len() > MAX_ID_LEN {
                            return bad("ended request id length out of range");
                        }
                        let how = match r.u8()? {
                            1 => Ended::Released,
                            2 => Ended::Expired,
                            t => return bad(format!("bad ended tag {t}")),
                        };
                        let until = r.varint()?;
                        if until > MAX_EXPIRY_MS {
                            return bad("ended request instant out of range");
                        }
                        ended.push_back((Box::from(id), how, until));
                    }
                }
                Some(Box::new(Extra {
                    assigned,
                    requests,
                    next_seq,
                    keep_until,
                    ended,
                }))
            }
            t => return bad(format!("bad extra tag {t}")),
        };
        r.finish()?;
        let mut subject = Subject {
            packed: Packed::pack(&layout, updated_ms, &words),
            layout,
            updated_ms,
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
        let mut words = self.words();
        for (i, slot) in layout.slots().iter().enumerate() {
            if slot.shape != Shape::Concurrency {
                continue;
            }
            let want = counts.get(i).copied().unwrap_or(0);
            if let Some(count) = words.get_mut(layout.range(i)).and_then(|w| w.first_mut()) {
                if *count != want {
                    *count = want;
                    changed = true;
                }
            }
        }
        if changed {
            self.set_limits(self.updated_ms, layout, &words);
        }
        changed
    }

    /// Heap bytes held (for `MEMORY USAGE`): the packed state, and with requests in
    /// flight each index entry with its share of its B-tree's nodes, the id twice and
    /// the request's vectors, as the allocator rounds them.
    pub fn mem_usage(&self) -> usize {
        use crate::mem::{allocation, btree_entry};
        let mut bytes = size_of::<Subject>() + self.packed.heap_bytes();
        if let Some(extra) = self.extra.as_deref() {
            bytes += allocation(size_of::<Extra>())
                + extra.assigned.as_deref().map_or(0, |a| allocation(a.len()));
            let per_request =
                btree_entry::<Box<[u8]>, Request>() + btree_entry::<(u64, Box<[u8]>), ()>();
            for (id, request) in extra.requests.iter() {
                bytes += per_request
                    + 2 * allocation(id.len())
                    + allocation(request.leases.capacity() * size_of::<Arc<str>>())
                    + allocation(request.charges.capacity() * size_of::<crate::requests::Charge>())
                    + allocation(request.links.capacity() * size_of::<Box<[u8]>>())
                    + request
                        .links
                        .iter()
                        .map(|l| allocation(l.len()))
                        .sum::<usize>();
            }
            bytes += extra.ended.capacity() * size_of::<(Box<[u8]>, Ended, u64)>()
                + extra
                    .ended
                    .iter()
                    .map(|(id, _, _)| allocation(id.len()))
                    .sum::<usize>();
        }
        bytes
    }
}

/// Takes one off each concurrency count of `words` (of `layout`) the request held a
/// lease in.
pub fn free_leases(layout: &Layout, words: &mut [u64], request: &Request) {
    for lease in &request.leases {
        if let Some(count) = layout
            .lease_slot(lease)
            .and_then(|i| words.get_mut(layout.range(i)))
            .and_then(|w| w.first_mut())
        {
            *count = count.saturating_sub(1);
        }
    }
}

/// The rate the plan's limit of budget `name`/`unit` drains at (1 if it is no bucket).
fn plan_rate(plan: &Plan, name: &str, unit: &str) -> u64 {
    plan.limits
        .iter()
        .find(|l| &*l.name == name && &*l.spec.unit == unit)
        .and_then(|l| match l.spec.rule {
            crate::spec::Rule::Bucket { rate, .. } => Some(rate),
            _ => None,
        })
        .unwrap_or(1)
}

/// The instant a slot of `shape` (words normalized to `updated`) holds no usage from;
/// `None` if it holds none. Leases are not counted here: their requests' expiry is.
fn slot_idle_at(shape: Shape, words: &[u64], updated: u64) -> Option<u64> {
    match shape {
        Shape::Fixed { window } => fixed::idle_at(words, window, updated),
        Shape::Sliding {
            window_ms,
            precision,
        } => Slices {
            window_ms,
            precision,
        }
        .idle_at(words, updated),
        Shape::Bucket { .. } => Bucket::idle_at(words),
        Shape::Concurrency => None,
    }
}

/// Whether a slot still holds usage at `now` (a refilled bucket keeps non-zero words
/// but holds none).
fn slot_busy(shape: Shape, words: &[u64], now: u64) -> bool {
    match shape {
        Shape::Concurrency => words.first().is_some_and(|&n| n > 0),
        _ => slot_idle_at(shape, words, now).is_some_and(|at| at > now),
    }
}

/// Version 1 let one budget live in several shapes (parallel counters): the first
/// keeps its shape and takes the others' usage, converted conservatively.
fn merge_v1_budgets(
    layout: Layout,
    words: Words,
    updated: u64,
    interner: &mut LayoutInterner,
) -> (u64, Arc<Layout>, Words) {
    let slots = layout.slots();
    let mut kept: Vec<usize> = Vec::new();
    for (i, slot) in slots.iter().enumerate() {
        let first = kept.iter().any(|&k| {
            slots
                .get(k)
                .is_some_and(|s| s.is_budget(&slot.name, &slot.unit))
        });
        if !first {
            kept.push(i);
        }
    }
    if kept.len() == slots.len() {
        return (updated, interner.intern(layout), words);
    }
    let merged = Layout::new(kept.iter().filter_map(|&i| slots.get(i).cloned()).collect());
    let mut merged_words: Words = smallvec::smallvec![0; merged.words()];
    for (n, &i) in kept.iter().enumerate() {
        if let (Some(src), Some(dst)) = (
            words.get(layout.range(i)),
            merged_words.get_mut(merged.range(n)),
        ) {
            dst.copy_from_slice(src);
        }
    }
    for (i, slot) in slots.iter().enumerate() {
        if kept.contains(&i) {
            continue;
        }
        let Some(n) = merged.find_budget(&slot.name, &slot.unit) else {
            continue;
        };
        let from = words.get(layout.range(i)).unwrap_or(&[]);
        let units = used_units(slot.shape, from, updated, updated);
        if let (Some(to), Some(to_slot)) =
            (merged_words.get_mut(merged.range(n)), merged.slots().get(n))
        {
            let rate = bucket::stored_rate(to);
            add_units(to_slot.shape, rate, to, updated, units);
        }
    }
    (updated, interner.intern(merged), merged_words)
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

    fn relayout(s: &mut Subject, p: &Plan, interner: &mut LayoutInterner) {
        let (layout, words) = s
            .layout_for(p, &s.words(), s.updated_ms(), interner)
            .unwrap_or_else(|_| unreachable!());
        s.set_limits(s.updated_ms(), layout, &words);
    }

    /// Runs `f` on the words of slot `i`.
    fn with_slot(s: &mut Subject, i: usize, f: impl FnOnce(&mut [u64])) {
        let range = s.layout().range(i);
        s.update_words(|w| f(&mut w[range]));
    }

    #[test]
    fn relayout_carries_each_budget_and_keeps_busy_foreign_ones() {
        let mut interner = LayoutInterner::new();
        let a = plan(
            &[("rpm", "fixed 10/1m"), ("daily", "fixed 100/1d")],
            &mut interner,
        );
        let mut s = Subject::new(Arc::clone(&a.layout), 1_000);
        s.update_words(|w| w.copy_from_slice(&[3, 7]));
        // A plan sharing `daily`, changing `rpm`'s window and adding `tpm`.
        let b = plan(
            &[
                ("rpm", "fixed 10/1s"),
                ("daily", "fixed 500/1d"),
                ("tpm", "bucket 5 token/1s"),
            ],
            &mut interner,
        );
        relayout(&mut s, &b, &mut interner);
        let names: Vec<&str> = s.layout().slots().iter().map(|s| &*s.name).collect();
        // One budget, one slot: `rpm`'s 3 carry into the 1-second window.
        assert_eq!(names, ["rpm", "daily", "tpm"]);
        assert_eq!(&s.words()[..2], &[3, 7]);
        assert!(s.holds_all_of(&b));
        // A foreign busy budget (another unit) stays beside the plan's.
        let c = plan(&[("rpm", "fixed 10 token/1s")], &mut interner);
        with_slot(&mut s, 2, |w| w.copy_from_slice(&[1_000, 5_000, 0, 5, 0]));
        relayout(&mut s, &c, &mut interner);
        let names: Vec<(&str, &str)> = s
            .layout
            .slots()
            .iter()
            .map(|s| (&*s.name, &*s.unit))
            .collect();
        assert_eq!(
            names,
            [
                ("rpm", "token"),
                ("rpm", "request"),
                ("daily", "request"),
                ("tpm", "token")
            ]
        );
        assert!(s.holds_all_of(&c));
        assert!(!s.holds_all_of(&a));
    }

    #[test]
    fn a_changed_shape_carries_usage_conservatively() {
        let mut interner = LayoutInterner::new();
        let sliding = plan(&[("rpm", "sliding 10/1m precision 6")], &mut interner);
        let t0 = 6_000_000;
        let mut s = Subject::new(Arc::clone(&sliding.layout), t0);
        with_slot(&mut s, 0, |w| {
            Slices {
                window_ms: 60_000,
                precision: 6,
            }
            .charge(w, t0, 4)
        });
        s.normalize(t0 + 25_000);
        let bucket = plan(&[("rpm", "bucket 10/1m")], &mut interner);
        relayout(&mut s, &bucket, &mut interner);
        // The 4 used become 4 units of debt charged now: 6 left, full in 24 s.
        let b = Bucket {
            rate: 10,
            window_ms: 60_000,
            burst: 10,
        };
        let debt = b.debt_at(&s.slot_words(0), t0 + 25_000);
        assert_eq!(b.remaining(debt), 6);
        assert_eq!(b.reset_ms(debt), 24_000);
    }

    #[test]
    fn relayout_keeps_every_lease_counted() {
        let mut interner = LayoutInterner::new();
        let a = plan(&[("jobs", "concurrency 2")], &mut interner);
        let b = plan(&[("jobs", "fixed 5/1m")], &mut interner);
        let mut s = Subject::new(Arc::clone(&a.layout), 0);
        s.update_words(|w| w[0] = 1);
        s.extra_mut().requests.insert(
            b"r",
            Request {
                expires_at: 10_000,
                plan: Arc::from("p"),
                leases: vec![Arc::from("jobs")],
                charges: vec![],
                links: vec![],
            },
        );
        relayout(&mut s, &b, &mut interner);
        // `jobs` in requests and `jobs` in leases are two budgets: both kept.
        assert_eq!(s.layout().len(), 2);
        assert_eq!(s.layout().lease_slot("jobs"), Some(1));
        assert_eq!(&s.slot_words(1)[..], &[1]);
    }

    #[test]
    fn too_many_slots_are_refused_and_change_nothing() {
        let mut interner = LayoutInterner::new();
        let mut s = Subject::new(interner.intern(Layout::empty()), 0);
        for i in 0..crate::layout::MAX_SLOTS {
            let name = format!("c{i}");
            let p = plan(&[(&name, "concurrency 5")], &mut interner);
            relayout(&mut s, &p, &mut interner);
            let slot = s
                .layout()
                .lease_slot(&name)
                .unwrap_or_else(|| unreachable!());
            with_slot(&mut s, slot, |w| w[0] = 1);
        }
        let p = plan(&[("one-more", "concurrency 5")], &mut interner);
        let before = s.clone();
        assert_eq!(
            s.layout_for(&p, &s.words(), 0, &mut interner).map(|_| ()),
            Err(TooManySlots)
        );
        assert_eq!(s, before);
    }

    fn sample(interner: &mut LayoutInterner) -> Subject {
        let p = plan(
            &[
                ("rpm", "sliding 10/1m precision 6"),
                ("day", "fixed 100/1d"),
                ("tpm", "bucket 5 token/1s"),
                ("jobs", "concurrency 2"),
            ],
            interner,
        );
        let mut s = Subject::new(Arc::clone(&p.layout), 60_000);
        s.update_words(|w| w[0] = 2);
        with_slot(&mut s, 3, |w| w[0] = 1);
        let extra = s.extra_mut();
        extra.assigned = Some("gold".into());
        extra.next_seq = 9;
        extra.requests.insert(
            b"r1",
            Request {
                expires_at: 70_000,
                plan: Arc::from("p"),
                leases: vec![Arc::from("jobs")],
                charges: vec![Charge {
                    slot: p.layout.slots()[1].clone(),
                    amount: 3,
                    marker: 0,
                    mark: 0,
                }],
                links: vec![Box::from(&b"{o}:team"[..])],
            },
        );
        extra.record_end(b"r0", Ended::Released, 60_000);
        s
    }

    #[test]
    fn subjects_round_trip_and_reject_truncation_and_trailing_bytes() {
        let mut interner = LayoutInterner::new();
        let s = sample(&mut interner);
        let mut w = Writer::new();
        s.encode(&mut w);
        let buf = w.into_inner();
        let back = Subject::decode(&buf, &mut interner, ENCODING_VERSION);
        assert_eq!(back.as_ref(), Ok(&s));
        for cut in 0..buf.len() {
            assert!(Subject::decode(&buf[..cut], &mut interner, ENCODING_VERSION).is_err());
        }
        let mut longer = buf.clone();
        longer.push(0);
        assert!(Subject::decode(&longer, &mut interner, ENCODING_VERSION).is_err());
        assert!(Subject::decode(&buf, &mut interner, 3).is_err());
    }

    #[test]
    fn out_of_range_instants_and_sequences_are_refused() {
        let mut interner = LayoutInterner::new();
        let encode = |s: &Subject| {
            let mut w = Writer::new();
            s.encode(&mut w);
            w.into_inner()
        };
        let mut late = sample(&mut interner);
        let (layout, words) = (Arc::clone(late.layout()), late.words());
        late.set_limits(u64::MAX - 5, layout, &words);
        assert!(Subject::decode(&encode(&late), &mut interner, ENCODING_VERSION).is_err());
        let mut seq = sample(&mut interner);
        seq.extra_mut().next_seq = u64::MAX;
        assert!(Subject::decode(&encode(&seq), &mut interner, ENCODING_VERSION).is_err());
        let mut far = sample(&mut interner);
        far.extra_mut().requests.set_expiry(b"r1", u64::MAX);
        assert!(Subject::decode(&encode(&far), &mut interner, ENCODING_VERSION).is_err());
    }

    #[test]
    fn loading_repairs_inconsistent_lease_counts() {
        let mut interner = LayoutInterner::new();
        let p = plan(
            &[("rpm", "fixed 5/1m"), ("jobs", "concurrency 3")],
            &mut interner,
        );
        let mut damaged = Subject::new(Arc::clone(&p.layout), 0);
        damaged.update_words(|w| w.copy_from_slice(&[1, 3]));
        damaged.extra_mut().requests.insert(
            b"r1",
            Request {
                expires_at: 500,
                plan: Arc::from("p"),
                leases: vec![Arc::from("jobs")],
                charges: vec![],
                links: vec![],
            },
        );
        damaged.extra_mut().requests.insert(
            b"r2",
            Request {
                expires_at: 600,
                plan: Arc::from("p"),
                leases: vec![Arc::from("rpm"), Arc::from("gone")],
                charges: vec![],
                links: vec![],
            },
        );
        let mut w = Writer::new();
        damaged.encode(&mut w);
        let loaded = Subject::decode(&w.into_inner(), &mut interner, ENCODING_VERSION);
        assert_eq!(loaded.as_ref().map(|l| l.slot_words(1)[0]), Ok(1));
        let leases = loaded.ok().and_then(|l| {
            l.requests()
                .and_then(|t| t.get(b"r2"))
                .map(|r| r.leases.len())
        });
        assert_eq!(leases, Some(0));
    }

    #[test]
    fn a_subject_fits_one_64_byte_allocation() {
        // One jemalloc size class holds the header and the packed words of the usual
        // plans; growing the struct costs every subject in memory.
        assert_eq!(std::mem::size_of::<Subject>(), 64);
    }

    #[test]
    fn a_three_limit_subject_packs_inline_and_round_trips() {
        let mut interner = LayoutInterner::new();
        let p = plan(
            &[
                ("rpm", "sliding 100000000/1m"),
                ("rpd", "fixed 1000000000/1d"),
                ("tpm", "bucket 1000000000 token/1m"),
            ],
            &mut interner,
        );
        let now = 1_763_769_600_123;
        let mut s = Subject::new(Arc::clone(&p.layout), now);
        with_slot(&mut s, 0, |w| w[3] = 1);
        with_slot(&mut s, 1, |w| w[0] = 1);
        with_slot(&mut s, 2, |w| {
            Bucket {
                rate: 1_000_000_000,
                window_ms: 60_000,
                burst: 1_000_000_000,
            }
            .charge(w, now, 100)
        });
        assert!(
            s.packed.heap_bytes() == 0,
            "{} bytes packed",
            s.packed.0.len()
        );
        let words = s.words();
        assert_eq!(
            words.get(12),
            Some(&now),
            "the bucket's instant survives packing"
        );
        s.normalize(now + 5);
        assert_eq!(s.words().get(12), Some(&now));
    }

    #[test]
    fn purging_frees_leases_and_remembers_the_expiry() {
        let mut interner = LayoutInterner::new();
        let p = plan(&[("jobs", "concurrency 2")], &mut interner);
        let mut s = Subject::new(Arc::clone(&p.layout), 0);
        s.update_words(|w| w[0] = 1);
        s.extra_mut().requests.insert(
            b"a",
            Request {
                expires_at: 10,
                plan: Arc::from("p"),
                leases: vec![Arc::from("jobs")],
                charges: vec![],
                links: vec![],
            },
        );
        assert_eq!(s.purge_expired(9), 0);
        assert_eq!(s.purge_expired(10), 1);
        assert_eq!(s.words()[0], 0);
        assert_eq!(s.ended(b"a", 10), Some(Ended::Expired));
        assert_eq!(s.expiry(), Expiry::At(10 + ENDED_REMEMBERED_MS));
        assert_eq!(
            s.ended(b"a", 10 + ENDED_REMEMBERED_MS),
            None,
            "forgotten in time"
        );
        for i in 0..ENDED_KEPT {
            s.extra_mut()
                .record_end(format!("x{i}").as_bytes(), Ended::Released, 11);
        }
        assert_eq!(
            s.ended(b"a", 11),
            None,
            "only the last {ENDED_KEPT} are kept"
        );
    }
}
