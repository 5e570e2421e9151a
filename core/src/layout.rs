//! Which counters a subject holds and where each lives in its state words.
//!
//! A subject's state is a flat `[u64]`; its [`Layout`] names the counter (the *slot*)
//! at each offset. A slot is one *budget*: a limit name and the unit it counts. Its
//! [`Shape`] (algorithm and window) says how the words are read; when a plan counts a
//! budget another way, the subject converts the usage into the new shape (see
//! [`crate::limits::carry_over`]) — switching plans, falling back or changing
//! `RL.THROTTLE` parameters never opens a second budget. Layouts are interned
//! ([`LayoutInterner`]) so that a million subjects on one plan share one layout, and
//! the common call checks layout identity with a pointer compare.

use std::collections::HashSet;
use std::sync::Arc;

use crate::codec::{bad, DecodeError, Reader, Writer};
use crate::spec::{is_valid_name, LEASE_UNIT, MAX_PRECISION};
use crate::time::{FixedWindow, Span, MAX_WINDOW_MONTHS, MAX_WINDOW_MS};

/// Most slots one subject may hold (limits of every plan that charged it recently).
pub const MAX_SLOTS: usize = 256;

/// The algorithm, unit and window of a counter: what must match for usage to carry over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// One word: usage in the window holding the subject's `updated_ms`.
    Fixed { window: FixedWindow },
    /// `precision + 1` words: a ring of slice totals.
    Sliding { window_ms: u64, precision: u32 },
    /// Four words: see [`crate::limits::bucket`].
    Bucket { window_ms: u64 },
    /// One word: leases in flight (the lease table holds which).
    Concurrency,
}

impl Shape {
    pub fn words(&self) -> usize {
        match *self {
            Shape::Fixed { .. } | Shape::Concurrency => 1,
            Shape::Sliding { precision, .. } => precision as usize + 1,
            Shape::Bucket { .. } => crate::limits::bucket::WORDS,
        }
    }

    pub fn encode(&self, w: &mut Writer) {
        match *self {
            Shape::Fixed { window } => match window.span() {
                Span::Millis(ms) => {
                    w.u8(1);
                    w.varint(ms);
                }
                Span::Months(n) => {
                    w.u8(2);
                    w.varint(u64::from(n));
                }
            },
            Shape::Sliding {
                window_ms,
                precision,
            } => {
                w.u8(3);
                w.varint(window_ms);
                w.varint(u64::from(precision));
            }
            Shape::Bucket { window_ms } => {
                w.u8(4);
                w.varint(window_ms);
            }
            Shape::Concurrency => w.u8(5),
        }
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Shape, DecodeError> {
        let window_ms = |r: &mut Reader<'_>| match r.varint()? {
            ms @ 1..=MAX_WINDOW_MS => Ok(ms),
            ms => bad(format!("window of {ms}ms out of range")),
        };
        Ok(match r.u8()? {
            1 => Shape::Fixed {
                window: FixedWindow::new(Span::Millis(window_ms(r)?)),
            },
            2 => match r.varint()? {
                n @ 1..=120 if n <= u64::from(MAX_WINDOW_MONTHS) => Shape::Fixed {
                    window: FixedWindow::new(Span::Months(n as u32)),
                },
                n => return bad(format!("window of {n} months out of range")),
            },
            3 => {
                let window_ms = window_ms(r)?;
                match r.varint()? {
                    p @ 1..=600 if p <= u64::from(MAX_PRECISION) && p <= window_ms => {
                        Shape::Sliding {
                            window_ms,
                            precision: p as u32,
                        }
                    }
                    p => return bad(format!("precision {p} out of range")),
                }
            }
            4 => Shape::Bucket {
                window_ms: window_ms(r)?,
            },
            5 => Shape::Concurrency,
            tag => return bad(format!("unknown shape tag {tag}")),
        })
    }
}

/// One counter of a subject: a limit name, the unit it counts and its shape. Name and
/// unit identify the budget (a layout holds at most one slot per name and unit); the
/// shape says how its words are read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Slot {
    /// Shared with reservations that charged this slot (cloning is a refcount bump).
    pub name: Arc<str>,
    pub unit: Arc<str>,
    pub shape: Shape,
}

impl Slot {
    pub fn encode(&self, w: &mut Writer) {
        w.str(&self.name);
        w.str(&self.unit);
        self.shape.encode(w);
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Slot, DecodeError> {
        let name = r.str()?;
        let unit = r.str()?;
        if !is_valid_name(name) || !is_valid_name(unit) {
            return bad("invalid slot name or unit");
        }
        let shape = Shape::decode(r)?;
        if shape == Shape::Concurrency && unit != LEASE_UNIT {
            return bad("a concurrency slot counts leases");
        }
        Ok(Slot {
            name: Arc::from(name),
            unit: Arc::from(unit),
            shape,
        })
    }
}

impl Slot {
    /// Whether `self` is the budget `name` counted in `unit`.
    pub fn is_budget(&self, name: &str, unit: &str) -> bool {
        &*self.name == name && &*self.unit == unit
    }
}

/// The slots of a subject, in order, with the word offset of each.
#[derive(Debug)]
pub struct Layout {
    slots: Box<[Slot]>,
    offsets: Box<[usize]>,
    words: usize,
    /// The layout's encoding, made once: a replicated write that changes the layout
    /// ships it.
    encoded: Box<[u8]>,
    /// A hash of the encoding: a write that keeps the layout ships this instead.
    fingerprint: u64,
}

// Equality and hashing are by slots; offsets and encoding derive from them.
impl PartialEq for Layout {
    fn eq(&self, other: &Self) -> bool {
        self.slots == other.slots
    }
}

impl Eq for Layout {}

impl std::hash::Hash for Layout {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.slots.hash(state);
    }
}

impl Layout {
    pub fn new(slots: Vec<Slot>) -> Layout {
        let mut offsets = Vec::with_capacity(slots.len());
        let mut words = 0;
        for slot in &slots {
            offsets.push(words);
            words += slot.shape.words();
        }
        let mut w = Writer::new();
        w.varint(slots.len() as u64);
        for slot in &slots {
            slot.encode(&mut w);
        }
        let encoded = w.into_inner().into_boxed_slice();
        Layout {
            slots: slots.into_boxed_slice(),
            offsets: offsets.into_boxed_slice(),
            words,
            fingerprint: fnv1a(&encoded),
            encoded,
        }
    }

    /// A hash of the layout (equal layouts, equal fingerprints).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    pub fn empty() -> Layout {
        Layout::new(Vec::new())
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Total state words of a subject with this layout.
    pub fn words(&self) -> usize {
        self.words
    }

    /// The word range of slot `i`.
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        match (self.offsets.get(i), self.slots.get(i)) {
            (Some(&start), Some(slot)) => start..start + slot.shape.words(),
            _ => 0..0,
        }
    }

    /// The index of the slot identical to `slot` (name, unit and shape), if any.
    pub fn find(&self, slot: &Slot) -> Option<usize> {
        self.slots.iter().position(|s| s == slot)
    }

    /// The index of the slot of budget `name` in `unit`, whatever its shape.
    pub fn find_budget(&self, name: &str, unit: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.is_budget(name, unit))
    }

    /// The index of the concurrency slot named `name`: where a lease of that name is
    /// counted (a layout holds at most one).
    pub fn lease_slot(&self, name: &str) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.shape == Shape::Concurrency && &*s.name == name)
    }

    pub fn encode(&self, w: &mut Writer) {
        w.buf.extend_from_slice(&self.encoded);
    }

    /// Reads a layout. Encoding version 1 allowed one budget in several shapes (the
    /// subject's decoder merges them); later versions refuse it.
    pub fn decode(r: &mut Reader<'_>, version: u8) -> Result<Layout, DecodeError> {
        let n = r.count(MAX_SLOTS)?;
        let mut slots: Vec<Slot> = Vec::with_capacity(n);
        for _ in 0..n {
            let slot = Slot::decode(r)?;
            let twice = if version == 1 {
                slots.contains(&slot)
            } else {
                slots.iter().any(|s| s.is_budget(&slot.name, &slot.unit))
            };
            if twice {
                return bad(format!("slot '{}' appears twice", slot.name));
            }
            slots.push(slot);
        }
        Ok(Layout::new(slots))
    }
}

/// FNV-1a, 64 bits.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Shares equal layouts. Entries only the interner still holds are dropped as the
/// table grows, so it stays proportional to the layouts in use.
#[derive(Debug, Default)]
pub struct LayoutInterner {
    table: HashSet<Arc<Layout>>,
    prune_at: usize,
}

impl LayoutInterner {
    pub fn new() -> Self {
        LayoutInterner {
            table: HashSet::new(),
            prune_at: 64,
        }
    }

    pub fn intern(&mut self, layout: Layout) -> Arc<Layout> {
        if let Some(shared) = self.table.get(&layout) {
            return Arc::clone(shared);
        }
        if self.table.len() >= self.prune_at {
            self.table.retain(|l| Arc::strong_count(l) > 1);
            self.prune_at = (self.table.len() * 2).max(64);
        }
        let shared = Arc::new(layout);
        self.table.insert(Arc::clone(&shared));
        shared
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(name: &str, shape: Shape) -> Slot {
        let unit = if shape == Shape::Concurrency {
            LEASE_UNIT
        } else {
            "request"
        };
        Slot {
            name: Arc::from(name),
            unit: Arc::from(unit),
            shape,
        }
    }

    #[test]
    fn offsets_follow_shape_sizes() {
        let layout = Layout::new(vec![
            slot(
                "a",
                Shape::Fixed {
                    window: FixedWindow::new(Span::Millis(1000)),
                },
            ),
            slot(
                "b",
                Shape::Sliding {
                    window_ms: 60_000,
                    precision: 10,
                },
            ),
            slot("c", Shape::Bucket { window_ms: 1000 }),
        ]);
        assert_eq!(layout.range(0), 0..1);
        assert_eq!(layout.range(1), 1..12);
        assert_eq!(layout.range(2), 12..17);
        assert_eq!(layout.words(), 17);
        assert_eq!(layout.range(3), 0..0);
        assert_eq!(
            layout.find(&slot("c", Shape::Bucket { window_ms: 1000 })),
            Some(2)
        );
        assert_eq!(
            layout.find(&slot("c", Shape::Bucket { window_ms: 2000 })),
            None
        );
        assert_eq!(layout.lease_slot("c"), None);
    }

    #[test]
    fn interning_shares_equal_layouts() {
        let mut interner = LayoutInterner::new();
        let make = || Layout::new(vec![slot("a", Shape::Concurrency)]);
        let first = interner.intern(make());
        let second = interner.intern(make());
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(interner.len(), 1);
    }

    #[test]
    fn interner_drops_layouts_nobody_holds() {
        let mut interner = LayoutInterner::new();
        for i in 0..1000 {
            let _ = interner.intern(Layout::new(vec![slot(
                &format!("l{i}"),
                Shape::Concurrency,
            )]));
        }
        assert!(interner.len() <= 128, "held {} layouts", interner.len());
    }

    #[test]
    fn layouts_round_trip_and_reject_garbage() {
        let layout = Layout::new(vec![
            slot(
                "m",
                Shape::Fixed {
                    window: FixedWindow::new(Span::Months(1)),
                },
            ),
            slot(
                "w",
                Shape::Fixed {
                    window: FixedWindow::new(Span::Millis(604_800_000)),
                },
            ),
            slot(
                "s",
                Shape::Sliding {
                    window_ms: 60_000,
                    precision: 6,
                },
            ),
            slot("b", Shape::Bucket { window_ms: 1000 }),
            slot("c", Shape::Concurrency),
        ]);
        let mut w = Writer::new();
        layout.encode(&mut w);
        let buf = w.into_inner();
        assert_eq!(Layout::decode(&mut Reader::new(&buf), 2), Ok(layout));
        for cut in 0..buf.len() {
            assert!(Layout::decode(&mut Reader::new(&buf[..cut]), 2).is_err());
        }
    }

    #[test]
    fn one_budget_has_one_slot_but_one_name_may_count_two_units() {
        let round_trip = |slots: Vec<Slot>, version| {
            let mut w = Writer::new();
            Layout::new(slots).encode(&mut w);
            Layout::decode(&mut Reader::new(&w.into_inner()), version)
        };
        let fixed = slot(
            "rpm",
            Shape::Fixed {
                window: FixedWindow::new(Span::Millis(60_000)),
            },
        );
        let sliding = slot(
            "rpm",
            Shape::Sliding {
                window_ms: 60_000,
                precision: 6,
            },
        );
        assert!(round_trip(vec![fixed.clone(), sliding.clone()], 2).is_err());
        // Version 1 stored such pairs; its decoder merges them.
        assert!(round_trip(vec![fixed.clone(), sliding.clone()], 1).is_ok());
        let tokens = Slot {
            unit: Arc::from("token"),
            ..fixed.clone()
        };
        let layout = round_trip(vec![fixed.clone(), tokens], 2);
        assert_eq!(layout.map(|l| l.find_budget("rpm", "token")), Ok(Some(1)));
        assert!(round_trip(vec![fixed.clone(), fixed], 1).is_err());
        let lease = slot("c", Shape::Concurrency);
        let other_unit = Slot {
            unit: Arc::from("job"),
            ..lease
        };
        assert!(round_trip(vec![other_unit], 2).is_err());
    }
}
