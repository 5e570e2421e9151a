//! What a write does to one subject ([`Change`]), and its replicated form (the delta
//! `RL.APPLY` carries).
//!
//! A primary decides with its own clock, computes a [`Change`] (see
//! [`crate::decide`]), applies it to its own copy and ships it — never the command — so
//! replicas and an AOF replay reach exactly the primary's state whatever their clocks
//! say. A delta is O(limits charged) bytes: expired requests are dropped as "purge up
//! to instant t" and the limit part as "advance to t, then these slots' words", both of
//! which every copy of the subject executes identically; the full layout travels only
//! when it changes (else a fingerprint checks it).
//!
//! Format: a version byte, then ops. Version [`DELTA_VERSION`] is written; version 1
//! (the first release) is still read, so old AOF files replay. [`Delta::decode`]
//! validates a whole payload against the subject it will apply to before anything
//! changes, so a malformed payload is refused whole.

use std::sync::Arc;

use smallvec::SmallVec;

use crate::codec::{bad, DecodeError, Reader, Writer};
use crate::delta::{read_expiry, write_expiry, KeyExpiry};
use crate::layout::{Layout, LayoutInterner};
use crate::requests::{decode_request, encode_request, Request, MAX_EXPIRY_MS, MAX_ID_LEN};
use crate::subject::{Ended, Expiry, Subject, Words, MAX_SEQ};
use crate::time::MAX_INSTANT_MS;

/// First byte of a subject delta of the current format.
pub const DELTA_VERSION: u8 = 3;
/// First byte of a subject delta of the first release.
pub const DELTA_VERSION_1: u8 = 1;

const OP_PURGE: u8 = 1;
const OP_LIMITS_V1: u8 = 2;
const OP_PUT: u8 = 3;
const OP_REMOVE: u8 = 4;
const OP_SEQ: u8 = 5;
const OP_ASSIGN: u8 = 6;
const OP_FULL: u8 = 7;
const OP_EXPIRE: u8 = 8;
const OP_KEEP: u8 = 12;
const OP_LAYOUT: u8 = 13;
const OP_ADVANCE: u8 = 14;

/// The limit part of a subject after a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub updated_ms: u64,
    pub layout: Arc<Layout>,
    pub words: Words,
    /// The slots whose words differ from the old ones brought to `updated_ms`
    /// (normalized, expired leases freed) — a replica derives the others itself.
    /// `None` when the layout is new: everything ships.
    pub touched: Option<SmallVec<[u16; 8]>>,
}

/// What one write does to a subject.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// Requests expired at this instant are dropped first (their leases freed).
    pub purge_at: Option<u64>,
    /// The limit part becomes this.
    pub limits: Option<Limits>,
    /// This request is added or replaced.
    pub put: Option<(Box<[u8]>, Request)>,
    /// This request was released (removed; its leases are freed in `limits`).
    pub removed: Option<Box<[u8]>>,
    /// The id sequence becomes this.
    pub seq: Option<u64>,
    /// The assigned plan becomes this.
    pub assign: Option<Option<Box<str>>>,
    /// The key must live until at least this instant (clients wait on it).
    pub keep_until: Option<u64>,
}

impl Change {
    /// Applies the change to `subject`. Cannot fail: the change was computed from
    /// this subject (or validated against it, for a decoded delta).
    pub fn apply(self, subject: &mut Subject) {
        self.apply_for_expiry(subject);
    }

    /// Applies the change to `subject` and says when its key may now expire (computed
    /// from the words the change brings, without unpacking them again).
    pub fn apply_for_expiry(self, subject: &mut Subject) -> Expiry {
        if let Some(t) = self.purge_at {
            subject.purge_expired(t);
        }
        let words = self.limits.map(|limits| {
            subject.set_limits(limits.updated_ms, limits.layout, &limits.words);
            limits.words
        });
        if let Some(id) = self.removed {
            let subject_now = subject.updated_ms();
            if let Some(extra) = subject.extra.as_deref_mut() {
                extra.requests.remove(&id);
                extra.record_end(&id, Ended::Released, subject_now);
            }
        }
        if let Some((id, request)) = self.put {
            subject.extra_mut().requests.insert(&id, request);
        }
        if let Some(seq) = self.seq {
            subject.extra_mut().next_seq = seq;
        }
        if let Some(plan) = self.assign {
            subject.extra_mut().assigned = plan;
        }
        if let Some(until) = self.keep_until {
            subject.extra_mut().keep_until = until;
        }
        subject.tidy();
        match words {
            Some(words) => subject.expiry_with(&words),
            None => subject.expiry(),
        }
    }

    /// Applies the change to the subject in `slot`, creating it empty if there is none
    /// (as the module and a replica do: the change brings its own instant and layout).
    pub fn apply_to(self, slot: &mut Option<Subject>) {
        let subject = slot.get_or_insert_with(|| Subject::new(Arc::new(Layout::empty()), 0));
        self.apply(subject);
    }

    /// Writes the change as a delta, followed by what the key's expiry becomes.
    pub fn encode(&self, w: &mut Writer, expiry: KeyExpiry) {
        self.encode_ops(w);
        write_expiry(w, expiry);
    }

    /// Writes the change as a delta without its final expiry op (the caller appends
    /// it with [`write_expiry`] once it has applied the change and knows it).
    pub fn encode_ops(&self, w: &mut Writer) {
        w.u8(DELTA_VERSION);
        if let Some(t) = self.purge_at {
            w.u8(OP_PURGE);
            w.varint(t);
        }
        if let Some(limits) = &self.limits {
            match &limits.touched {
                Some(touched) => {
                    w.u8(OP_ADVANCE);
                    w.varint(limits.updated_ms);
                    w.varint(limits.layout.fingerprint());
                    w.varint(touched.len() as u64);
                    for &i in touched {
                        w.varint(u64::from(i));
                        for &word in limits
                            .words
                            .get(limits.layout.range(usize::from(i)))
                            .unwrap_or(&[])
                        {
                            w.varint(word);
                        }
                    }
                }
                None => {
                    w.u8(OP_LAYOUT);
                    w.varint(limits.updated_ms);
                    limits.layout.encode(w);
                    for &word in limits.words.iter() {
                        w.varint(word);
                    }
                }
            }
        }
        if let Some(id) = &self.removed {
            w.u8(OP_REMOVE);
            w.bytes(id);
        }
        if let Some((id, request)) = &self.put {
            w.u8(OP_PUT);
            encode_request(w, id, request);
        }
        if let Some(seq) = self.seq {
            w.u8(OP_SEQ);
            w.varint(seq);
        }
        if let Some(plan) = &self.assign {
            w.u8(OP_ASSIGN);
            match plan {
                Some(p) => {
                    w.u8(1);
                    w.str(p);
                }
                None => w.u8(0),
            }
        }
        if let Some(until) = self.keep_until {
            w.u8(OP_KEEP);
            w.varint(until);
        }
    }
}

/// The delta that recreates `subject` whole (an AOF rewrite), the key's expiry left
/// to Redis (which appends its own `PEXPIREAT`).
pub fn encode_full(subject: &Subject, w: &mut Writer) {
    w.u8(DELTA_VERSION);
    w.u8(OP_FULL);
    let mut inner = Writer::new();
    subject.encode(&mut inner);
    w.bytes(&inner.into_inner());
    write_expiry(w, KeyExpiry::Keep);
}

/// The new words of some slots.
type SlotWords = SmallVec<[(usize, SmallVec<[u64; 16]>); 8]>;

enum Op<'a> {
    Purge(u64),
    Layout(Box<(u64, Arc<Layout>, Words)>),
    Advance(Box<(u64, SlotWords)>),
    Put(&'a [u8], Request),
    Remove(&'a [u8]),
    Seq(u64),
    Assign(Option<&'a str>),
    Keep(u64),
    Full(Box<Subject>),
}

/// A decoded delta, validated against the subject it applies to.
pub struct Delta<'a> {
    ops: Vec<Op<'a>>,
    /// What to do with the key's expiry afterwards.
    pub expiry: KeyExpiry,
}

/// The layout the ops leave the subject with, while decoding (for `OP_ADVANCE`).
struct Tracked {
    layout: Option<Arc<Layout>>,
    updated_ms: u64,
}

impl<'a> Delta<'a> {
    /// Decodes and validates a whole payload (of either version) for the subject
    /// `current` holds (`None`: the key is empty).
    pub fn decode(
        payload: &'a [u8],
        interner: &mut LayoutInterner,
        current: Option<&Subject>,
    ) -> Result<Delta<'a>, DecodeError> {
        let mut r = Reader::new(payload);
        let version = match r.u8()? {
            DELTA_VERSION => 2,
            DELTA_VERSION_1 => 1,
            v => return bad(format!("unknown payload version {v}")),
        };
        let mut tracked = Tracked {
            layout: current.map(|s| Arc::clone(s.layout())),
            updated_ms: current.map_or(0, Subject::updated_ms),
        };
        let mut ops = Vec::new();
        let mut expiry = KeyExpiry::Keep;
        while !r.is_empty() {
            let op = match r.u8()? {
                OP_PURGE => match r.varint()? {
                    t @ 0..=MAX_INSTANT_MS => Op::Purge(t),
                    _ => return bad("purge instant out of range"),
                },
                OP_LIMITS_V1 if version == 1 => {
                    Op::Layout(Box::new(Subject::decode_limits(&mut r, interner, 1)?))
                }
                OP_LAYOUT if version == 2 => {
                    Op::Layout(Box::new(Subject::decode_limits(&mut r, interner, 2)?))
                }
                OP_ADVANCE if version == 2 => decode_advance(&mut r, &tracked)?,
                OP_PUT => {
                    let (id, request) = decode_request(&mut r, version)?;
                    Op::Put(id, request)
                }
                OP_REMOVE => {
                    let id = r.bytes()?;
                    if id.is_empty() || id.len() > MAX_ID_LEN {
                        return bad("request id length out of range");
                    }
                    Op::Remove(id)
                }
                OP_SEQ => match r.varint()? {
                    seq @ 0..=MAX_SEQ => Op::Seq(seq),
                    _ => return bad("sequence out of range"),
                },
                OP_KEEP => match r.varint()? {
                    t @ 0..=MAX_EXPIRY_MS => Op::Keep(t),
                    _ => return bad("keep-alive instant out of range"),
                },
                OP_ASSIGN => match r.u8()? {
                    0 => Op::Assign(None),
                    1 => {
                        let p = r.str()?;
                        if !crate::spec::is_valid_name(p) {
                            return bad("invalid assigned plan");
                        }
                        Op::Assign(Some(p))
                    }
                    t => return bad(format!("bad assign tag {t}")),
                },
                OP_FULL => Op::Full(Box::new(Subject::decode(
                    r.bytes()?,
                    interner,
                    if version == 1 {
                        1
                    } else {
                        crate::subject::ENCODING_VERSION
                    },
                )?)),
                OP_EXPIRE => {
                    expiry = read_expiry(&mut r)?;
                    continue;
                }
                op => return bad(format!("unknown op {op}")),
            };
            match &op {
                Op::Layout(limits) => {
                    tracked.layout = Some(Arc::clone(&limits.1));
                    tracked.updated_ms = limits.0;
                }
                Op::Advance(advance) => tracked.updated_ms = advance.0,
                Op::Full(s) => {
                    tracked.layout = Some(Arc::clone(s.layout()));
                    tracked.updated_ms = s.updated_ms();
                }
                _ => {}
            }
            ops.push(op);
        }
        Ok(Delta { ops, expiry })
    }

    /// Applies the ops to the subject it was decoded for.
    pub fn apply(self, subject: &mut Subject) {
        for op in self.ops {
            match op {
                Op::Full(s) => *subject = *s,
                Op::Layout(limits) => {
                    let (updated_ms, layout, words) = *limits;
                    subject.set_limits(updated_ms, layout, &words);
                }
                Op::Advance(advance) => {
                    let (updated_ms, slots) = *advance;
                    subject.normalize(updated_ms);
                    let layout = Arc::clone(subject.layout());
                    subject.update_words(|all| {
                        for (i, words) in slots {
                            if let Some(slot) = all.get_mut(layout.range(i)) {
                                slot.copy_from_slice(&words);
                            }
                        }
                    });
                }
                Op::Purge(now) => {
                    subject.purge_expired(now);
                }
                Op::Put(id, request) => subject.extra_mut().requests.insert(id, request),
                Op::Remove(id) => {
                    let now = subject.updated_ms();
                    if let Some(extra) = subject.extra.as_deref_mut() {
                        extra.requests.remove(id);
                        extra.record_end(id, Ended::Released, now);
                    }
                }
                Op::Seq(seq) => subject.extra_mut().next_seq = seq,
                Op::Keep(until) => subject.extra_mut().keep_until = until,
                Op::Assign(plan) => subject.extra_mut().assigned = plan.map(Into::into),
            }
        }
        subject.tidy();
    }

    /// The subject the ops create on an empty key, if they create one.
    pub fn into_new(self, interner: &mut LayoutInterner) -> Option<Subject> {
        let creates = self.ops.iter().any(|op| {
            matches!(
                op,
                Op::Layout(..) | Op::Full(_) | Op::Assign(Some(_)) | Op::Keep(_) | Op::Put(..)
            )
        });
        if !creates || self.expiry == KeyExpiry::Delete {
            return None;
        }
        let mut subject = Subject::new(interner.intern(Layout::empty()), 0);
        self.apply(&mut subject);
        Some(subject)
    }
}

/// `OP_ADVANCE`: the subject moves to an instant and the listed slots take new words.
/// Checked against the layout the subject has at that point of the delta.
fn decode_advance<'a>(r: &mut Reader<'_>, tracked: &Tracked) -> Result<Op<'a>, DecodeError> {
    let updated = r.varint()?;
    let fingerprint = r.varint()?;
    let Some(layout) = tracked.layout.as_deref() else {
        return bad("a delta advances a subject the key does not hold");
    };
    if layout.fingerprint() != fingerprint {
        return bad("the delta was made for another layout of this subject");
    }
    if updated > MAX_INSTANT_MS || updated < tracked.updated_ms {
        return bad("instant out of range");
    }
    let n = r.count(layout.len())?;
    let mut slots = SmallVec::new();
    let mut last = None;
    for _ in 0..n {
        let i = r.count(layout.len().saturating_sub(1))?;
        if last.is_some_and(|l| l >= i) {
            return bad("slots out of order");
        }
        last = Some(i);
        let mut words = SmallVec::new();
        for _ in layout.range(i) {
            words.push(r.varint()?);
        }
        slots.push((i, words));
    }
    Ok(Op::Advance(Box::new((updated, slots))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{self, Call, Costs, Pair, Settings};
    use crate::plan::Plans;

    fn plans() -> (Plans, LayoutInterner) {
        let mut interner = LayoutInterner::new();
        let mut plans = Plans::new();
        assert!(plans
            .set(
                "p",
                &[
                    ("rpm", "sliding 5/1m"),
                    ("tpm", "bucket 100 token/1m"),
                    ("jobs", "concurrency 2 ttl 10s")
                ],
                &mut interner
            )
            .is_ok());
        (plans, interner)
    }

    /// Runs a call on `primary`, ships its delta to `replica`, and checks both agree.
    fn step(
        plans: &Plans,
        interner: &mut LayoutInterner,
        primary: &mut Option<Subject>,
        replica: &mut Option<Subject>,
        now: u64,
        id: Option<&[u8]>,
    ) {
        let plan = plans.get("p").cloned().unwrap_or_else(|| unreachable!());
        let call = Call {
            costs: Costs {
                request: 1,
                units: &[("token", 10)],
            },
            id,
            ..Call::default()
        };
        let settings = Settings::default();
        let pairs = [Pair {
            subject: primary.as_ref(),
            plan: &plan,
        }];
        let decision = decide::decide(plans, &pairs, &call, None, now, &settings);
        if !decision.admitted() {
            return;
        }
        let committed = decide::commit(&decision, &pairs, &call, &[], &settings, interner, &|_| {
            false
        })
        .unwrap_or_else(|e| unreachable!("{e:?}"));
        for change in committed.changes {
            let mut w = Writer::new();
            change.encode(&mut w, KeyExpiry::Keep);
            let payload = w.into_inner();
            change.apply_to(primary);
            let delta = Delta::decode(&payload, interner, replica.as_ref())
                .unwrap_or_else(|e| unreachable!("{e}"));
            match replica.as_mut() {
                Some(r) => delta.apply(r),
                None => *replica = delta.into_new(interner),
            }
        }
        assert_eq!(primary, replica);
    }

    #[test]
    fn replicas_replaying_deltas_match_the_primary() {
        let (plans, mut interner) = plans();
        let (mut primary, mut replica) = (None, None);
        let t = 1_000_000;
        let steps: [(u64, Option<&[u8]>); 4] = [
            (t, Some(b"a".as_slice())),
            (t + 5, None),
            (t + 20_000, None),
            (t + 70_000, Some(b"b".as_slice())),
        ];
        for (at, id) in steps {
            step(&plans, &mut interner, &mut primary, &mut replica, at, id);
        }
        let subject = primary.as_ref().unwrap_or_else(|| unreachable!());
        let (_, change) = decide::settle(Some(subject), b"b", &[("token", 3)], t + 71_000)
            .unwrap_or_else(|e| unreachable!("{e:?}"));
        let mut w = Writer::new();
        change.encode(&mut w, KeyExpiry::Keep);
        let payload = w.into_inner();
        change.apply_to(&mut primary);
        let delta = Delta::decode(&payload, &mut interner, replica.as_ref())
            .unwrap_or_else(|e| unreachable!("{e}"));
        if let Some(r) = replica.as_mut() {
            delta.apply(r);
        }
        assert_eq!(primary, replica);
    }

    #[test]
    fn an_advance_for_another_layout_is_refused() {
        let (plans, mut interner) = plans();
        let (mut primary, mut replica) = (None, None);
        step(
            &plans,
            &mut interner,
            &mut primary,
            &mut replica,
            1_000,
            None,
        );
        let mut w = Writer::new();
        w.u8(DELTA_VERSION);
        w.u8(OP_ADVANCE);
        w.varint(2_000);
        w.varint(12345);
        w.varint(0);
        let payload = w.into_inner();
        assert!(Delta::decode(&payload, &mut interner, replica.as_ref()).is_err());
        assert!(Delta::decode(&payload, &mut interner, None).is_err());
    }

    #[test]
    fn garbage_is_refused_whole() {
        let mut interner = LayoutInterner::new();
        for bad in [
            &[][..],
            &[9],
            &[3, 99],
            &[3, 8, 7],
            &[3, 13, 0xff],
            &[1, 14, 0],
        ] {
            assert!(Delta::decode(bad, &mut interner, None).is_err(), "{bad:?}");
        }
    }

    /// A hostile `RL.APPLY`: real deltas, made by a primary, with one value altered
    /// out of range (an instant near 2^64, a sequence at `u64::MAX`), are refused at
    /// decode; the unaltered ones decode.
    #[test]
    fn a_real_delta_altered_to_carry_an_out_of_range_instant_or_sequence_is_refused() {
        use crate::credits::{CreditSettings, Credits, Touched};
        use crate::delta::{CreditsDelta, CreditsDeltaWriter};

        // A subject delta: the second call on a subject advances it (OP_ADVANCE) and,
        // the plan holding leases, moves the id sequence (OP_SEQ).
        let (plans, mut interner) = plans();
        let plan = plans.get("p").cloned().unwrap();
        let settings = Settings::default();
        let call = Call {
            costs: Costs {
                request: 1,
                units: &[("token", 10)],
            },
            ..Call::default()
        };
        let mut subject: Option<Subject> = None;
        let mut replica = None;
        let mut second = None;
        for now in [1_000_000, 1_000_500] {
            let pairs = [Pair {
                subject: subject.as_ref(),
                plan: &plan,
            }];
            let decision = decide::decide(&plans, &pairs, &call, None, now, &settings);
            assert!(decision.admitted());
            let committed = decide::commit(
                &decision,
                &pairs,
                &call,
                &[],
                &settings,
                &mut interner,
                &|_| false,
            )
            .unwrap();
            let [change] = <[Change; 1]>::try_from(committed.changes.into_vec()).unwrap();
            replica.clone_from(&subject);
            second = Some(change.clone());
            change.apply_to(&mut subject);
        }
        let real = second.unwrap();
        assert!(real.limits.as_ref().is_some_and(|l| l.touched.is_some()));
        assert!(real.seq.is_some());
        let decodes = |change: &Change, interner: &mut LayoutInterner| {
            let mut w = Writer::new();
            change.encode(&mut w, KeyExpiry::Keep);
            Delta::decode(&w.into_inner(), interner, replica.as_ref()).is_ok()
        };
        assert!(decodes(&real, &mut interner), "the real delta decodes");
        for instant in [u64::MAX - 1, 1 << 63, MAX_INSTANT_MS + 1] {
            let mut late = real.clone();
            if let Some(limits) = late.limits.as_mut() {
                limits.updated_ms = instant;
            }
            assert!(!decodes(&late, &mut interner), "advance to {instant}");
        }
        let mut wrapped = real.clone();
        wrapped.seq = Some(u64::MAX);
        assert!(!decodes(&wrapped, &mut interner), "sequence u64::MAX");

        // A credits delta: a grant and a deduction, then its instant or sequence
        // altered.
        let cs = CreditSettings {
            window_ms: 1_000,
            max_ids: 100,
            max_blocks: 1_000,
        };
        let mut credits = Credits::new();
        let mut touched = Touched::default();
        assert_eq!(
            credits.grant(10, None, None, 1_000, &cs, &mut touched),
            Ok(10)
        );
        assert_eq!(
            credits.deduct(3, false, Some(b"r"), 1_001, &cs, &mut touched),
            Ok((3, 7))
        );
        let payload = |c: &Credits| {
            let mut w = CreditsDeltaWriter::new(Vec::new());
            w.changes(c, &touched).expiry(KeyExpiry::Keep);
            w.finish()
        };
        let delta = CreditsDelta::decode(&payload(&credits));
        assert!(delta.is_ok(), "the real credits delta decodes");
        assert_eq!(
            delta.ok().and_then(CreditsDelta::into_new),
            Some(credits.clone())
        );
        for instant in [u64::MAX - 1, 1 << 63, MAX_INSTANT_MS + 1] {
            let mut late = credits.clone();
            late.updated_ms = instant;
            assert!(
                CreditsDelta::decode(&payload(&late)).is_err(),
                "credits at {instant}"
            );
        }
        let mut wrapped = credits.clone();
        wrapped.next_seq = u64::MAX;
        assert!(
            CreditsDelta::decode(&payload(&wrapped)).is_err(),
            "credits sequence u64::MAX"
        );
    }
}
