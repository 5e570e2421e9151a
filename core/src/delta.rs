//! The effects of a write on one subject, as replicated to replicas and the AOF.
//!
//! A primary decides with its own clock, then ships *what changed* — never the command
//! — so replicas and an AOF replay reach exactly the primary's state whatever their
//! clocks say. Each write ships O(limits) bytes: the limit part of the state, the one
//! request it added, changed or removed, and the key's absolute expiry. Dropping
//! expired requests is shipped as "purge up to instant t", which every copy of the
//! same table executes identically.
//!
//! A payload is a version byte followed by ops; [`apply`] decodes every op before
//! changing anything, so a malformed payload is refused whole.

use crate::codec::{bad, DecodeError, Reader, Writer};
use crate::credits::{Block, BlockKey, Credits, Remembered, Touched};
use crate::layout::LayoutInterner;
use crate::requests::{decode_request, encode_request, Request};
use crate::subject::Subject;

/// First byte of a subject payload (and the format's version).
pub const DELTA_VERSION: u8 = 1;
/// First byte of a credits payload.
pub const CREDITS_DELTA: u8 = 2;

const OP_PURGE: u8 = 1;
const OP_LIMITS: u8 = 2;
const OP_PUT: u8 = 3;
const OP_REMOVE: u8 = 4;
const OP_SEQ: u8 = 5;
const OP_ASSIGN: u8 = 6;
const OP_FULL: u8 = 7;
const OP_EXPIRE: u8 = 8;
const OP_KEEP: u8 = 12;

/// What the key's expiry becomes after the ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyExpiry {
    /// Leave the key's expiry as it is.
    Keep,
    /// Expire at this absolute instant (ms since the epoch).
    At(u64),
    /// No expiry.
    Persist,
    /// Delete the key.
    Delete,
}

/// Builds a payload.
#[derive(Debug)]
pub struct DeltaWriter {
    w: Writer,
}

impl DeltaWriter {
    /// Starts a payload, reusing `buf`'s allocation.
    pub fn new(buf: Vec<u8>) -> Self {
        let mut w = Writer::with_buffer(buf);
        w.u8(DELTA_VERSION);
        DeltaWriter { w }
    }

    /// Requests expired at `now` are dropped (leases freed).
    pub fn purge(&mut self, now: u64) -> &mut Self {
        self.w.u8(OP_PURGE);
        self.w.varint(now);
        self
    }

    /// The limit part (instant, layout, words) becomes `subject`'s.
    pub fn limits(&mut self, subject: &Subject) -> &mut Self {
        self.w.u8(OP_LIMITS);
        subject.encode_limits(&mut self.w);
        self
    }

    /// Request `id` is added or replaced.
    pub fn put(&mut self, id: &[u8], request: &Request) -> &mut Self {
        self.w.u8(OP_PUT);
        encode_request(&mut self.w, id, request);
        self
    }

    /// Request `id` is removed.
    pub fn remove(&mut self, id: &[u8]) -> &mut Self {
        self.w.u8(OP_REMOVE);
        self.w.bytes(id);
        self
    }

    /// The id sequence becomes `seq`.
    pub fn seq(&mut self, seq: u64) -> &mut Self {
        self.w.u8(OP_SEQ);
        self.w.varint(seq);
        self
    }

    /// The assigned plan becomes `plan`.
    pub fn assign(&mut self, plan: Option<&str>) -> &mut Self {
        self.w.u8(OP_ASSIGN);
        match plan {
            Some(p) => {
                self.w.u8(1);
                self.w.str(p);
            }
            None => self.w.u8(0),
        }
        self
    }

    /// The key must live until at least `until` (clients wait on it).
    pub fn keep_until(&mut self, until: u64) -> &mut Self {
        self.w.u8(OP_KEEP);
        self.w.varint(until);
        self
    }

    /// The whole state becomes `subject` (AOF rewrite).
    pub fn full(&mut self, subject: &Subject) -> &mut Self {
        self.w.u8(OP_FULL);
        let mut inner = Writer::new();
        subject.encode(&mut inner);
        self.w.bytes(&inner.into_inner());
        self
    }

    pub fn expiry(&mut self, expiry: KeyExpiry) -> &mut Self {
        write_expiry(&mut self.w, expiry);
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.w.into_inner()
    }
}

enum Op<'a> {
    Purge(u64),
    Limits(crate::subject::LimitPart),
    Put(&'a [u8], Request),
    Remove(&'a [u8]),
    Seq(u64),
    Assign(Option<&'a str>),
    Keep(u64),
    Full(Subject),
}

/// A decoded payload, ready to apply.
pub struct Delta<'a> {
    ops: Vec<Op<'a>>,
    /// What to do with the key's expiry afterwards.
    pub expiry: KeyExpiry,
}

impl<'a> Delta<'a> {
    /// Decodes and validates a whole payload.
    pub fn decode(
        payload: &'a [u8],
        interner: &mut LayoutInterner,
        max_requests: usize,
    ) -> Result<Delta<'a>, DecodeError> {
        let mut r = Reader::new(payload);
        if r.u8()? != DELTA_VERSION {
            return bad("unknown payload version");
        }
        let mut ops = Vec::new();
        let mut expiry = KeyExpiry::Keep;
        while !r.is_empty() {
            match r.u8()? {
                OP_PURGE => ops.push(Op::Purge(r.varint()?)),
                OP_LIMITS => {
                    let (updated, layout, words) = Subject::decode_limits(&mut r, interner)?;
                    ops.push(Op::Limits((updated, layout, words)));
                }
                OP_PUT => {
                    let (id, request) = decode_request(&mut r)?;
                    ops.push(Op::Put(id, request));
                }
                OP_REMOVE => ops.push(Op::Remove(r.bytes()?)),
                OP_SEQ => ops.push(Op::Seq(r.varint()?)),
                OP_KEEP => ops.push(Op::Keep(r.varint()?)),
                OP_ASSIGN => {
                    let plan = match r.u8()? {
                        0 => None,
                        1 => {
                            let p = r.str()?;
                            if !crate::spec::is_valid_name(p) {
                                return bad("invalid assigned plan");
                            }
                            Some(p)
                        }
                        t => return bad(format!("bad assign tag {t}")),
                    };
                    ops.push(Op::Assign(plan));
                }
                OP_FULL => ops.push(Op::Full(Subject::decode(
                    r.bytes()?,
                    interner,
                    max_requests,
                )?)),
                OP_EXPIRE => expiry = read_expiry(&mut r)?,
                op => return bad(format!("unknown op {op}")),
            }
        }
        Ok(Delta { ops, expiry })
    }

    /// Applies the ops to an existing subject. Cannot fail: everything was checked
    /// when decoding, and the primary enforced the bounds.
    pub fn apply(self, subject: &mut Subject) {
        for op in self.ops {
            match op {
                Op::Full(s) => *subject = s,
                Op::Limits((updated_ms, layout, words)) => {
                    subject.updated_ms = updated_ms;
                    subject.layout = layout;
                    subject.words = words;
                }
                Op::Purge(now) => {
                    subject.purge_expired(now);
                }
                Op::Put(id, request) => subject.extra_mut().requests.insert(id, request),
                Op::Remove(id) => {
                    if let Some(extra) = subject.extra.as_deref_mut() {
                        extra.requests.remove(id);
                    }
                }
                Op::Seq(seq) => subject.extra_mut().next_seq = seq,
                Op::Keep(until) => subject.extra_mut().keep_until = until,
                Op::Assign(plan) => subject.extra_mut().assigned = plan.map(Into::into),
            }
        }
        subject.tidy();
    }

    /// The subject the ops create on a key that does not exist, if they create one.
    pub fn into_new(self) -> Option<Subject> {
        let creates = self
            .ops
            .iter()
            .any(|op| matches!(op, Op::Limits(..) | Op::Full(_)));
        if !creates || self.expiry == KeyExpiry::Delete {
            return None;
        }
        let mut subject = Subject::new(std::sync::Arc::new(crate::layout::Layout::empty()), 0);
        self.apply(&mut subject);
        Some(subject)
    }
}

/// The kind of key a payload is for.
pub fn payload_kind(payload: &[u8]) -> Option<u8> {
    payload.first().copied()
}

const OP_META: u8 = 9;
const OP_BLOCK: u8 = 10;
const OP_ID: u8 = 11;

/// Builds a credits payload: a purge, the key's counters, the blocks and remembered
/// ids a write touched (their new state, or their removal), and the key's expiry.
pub struct CreditsDeltaWriter {
    w: Writer,
}

impl CreditsDeltaWriter {
    pub fn new(buf: Vec<u8>) -> Self {
        let mut w = Writer::with_buffer(buf);
        w.u8(CREDITS_DELTA);
        CreditsDeltaWriter { w }
    }

    /// The state `credits` reached after a write that touched `touched`.
    pub fn changes(&mut self, credits: &Credits, touched: &Touched) -> &mut Self {
        if let Some(now) = touched.purged_at {
            self.w.u8(OP_PURGE);
            self.w.varint(now);
        }
        self.w.u8(OP_META);
        self.w.varint(credits.updated_ms);
        self.w.varint(credits.next_seq);
        let mut blocks = touched.blocks.clone();
        blocks.sort_unstable();
        blocks.dedup();
        for key in blocks {
            self.w.u8(OP_BLOCK);
            match credits.block(&key) {
                Some(block) => {
                    self.w.u8(1);
                    crate::credits::encode_block(&mut self.w, key, block);
                }
                None => {
                    self.w.u8(0);
                    self.w.varint(key.0);
                    self.w.varint(key.1);
                }
            }
        }
        let mut ids: Vec<&[u8]> = touched.ids.iter().map(|i| &**i).collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            self.w.u8(OP_ID);
            match credits.remembered(id) {
                Some(r) => {
                    self.w.u8(1);
                    crate::credits::encode_id(&mut self.w, id, r);
                }
                None => {
                    self.w.u8(0);
                    self.w.bytes(id);
                }
            }
        }
        self
    }

    pub fn full(&mut self, credits: &Credits) -> &mut Self {
        self.w.u8(OP_FULL);
        let mut inner = Writer::new();
        credits.encode(&mut inner);
        self.w.bytes(&inner.into_inner());
        self
    }

    pub fn expiry(&mut self, expiry: KeyExpiry) -> &mut Self {
        write_expiry(&mut self.w, expiry);
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.w.into_inner()
    }
}

fn write_expiry(w: &mut Writer, expiry: KeyExpiry) {
    w.u8(OP_EXPIRE);
    match expiry {
        KeyExpiry::Keep => w.u8(0),
        KeyExpiry::At(at) => {
            w.u8(1);
            w.varint(at);
        }
        KeyExpiry::Persist => w.u8(2),
        KeyExpiry::Delete => w.u8(3),
    }
}

fn read_expiry(r: &mut Reader<'_>) -> Result<KeyExpiry, DecodeError> {
    Ok(match r.u8()? {
        0 => KeyExpiry::Keep,
        1 => KeyExpiry::At(r.varint()?),
        2 => KeyExpiry::Persist,
        3 => KeyExpiry::Delete,
        t => return bad(format!("bad expiry tag {t}")),
    })
}

enum CreditsOp {
    Purge(u64),
    Meta(u64, u64),
    Block(BlockKey, Option<Block>),
    Id(Box<[u8]>, Option<Remembered>),
    Full(Credits),
}

/// A decoded credits payload.
pub struct CreditsDelta {
    ops: Vec<CreditsOp>,
    pub expiry: KeyExpiry,
}

impl CreditsDelta {
    pub fn decode(payload: &[u8], max: usize) -> Result<CreditsDelta, DecodeError> {
        let mut r = Reader::new(payload);
        if r.u8()? != CREDITS_DELTA {
            return bad("not a credits payload");
        }
        let mut ops = Vec::new();
        let mut expiry = KeyExpiry::Keep;
        while !r.is_empty() {
            match r.u8()? {
                OP_PURGE => ops.push(CreditsOp::Purge(r.varint()?)),
                OP_META => ops.push(CreditsOp::Meta(r.varint()?, r.varint()?)),
                OP_BLOCK => ops.push(match r.u8()? {
                    1 => {
                        let (key, block) = crate::credits::decode_block(&mut r)?;
                        CreditsOp::Block(key, Some(block))
                    }
                    0 => CreditsOp::Block((r.varint()?, r.varint()?), None),
                    t => return bad(format!("bad block tag {t}")),
                }),
                OP_ID => ops.push(match r.u8()? {
                    1 => {
                        let (key, remembered) = crate::credits::decode_id(&mut r)?;
                        CreditsOp::Id(key, Some(remembered))
                    }
                    0 => CreditsOp::Id(r.bytes()?.into(), None),
                    t => return bad(format!("bad id tag {t}")),
                }),
                OP_FULL => ops.push(CreditsOp::Full(Credits::decode(r.bytes()?, max)?)),
                OP_EXPIRE => expiry = read_expiry(&mut r)?,
                op => return bad(format!("unknown credits op {op}")),
            }
        }
        Ok(CreditsDelta { ops, expiry })
    }

    pub fn apply(self, credits: &mut Credits) {
        for op in self.ops {
            match op {
                CreditsOp::Purge(now) => credits.drop_expired(now),
                CreditsOp::Meta(updated_ms, next_seq) => {
                    credits.updated_ms = updated_ms;
                    credits.next_seq = next_seq;
                }
                CreditsOp::Block(key, block) => credits.put_block(key, block),
                CreditsOp::Id(key, remembered) => credits.put_id(&key, remembered),
                CreditsOp::Full(full) => *credits = full,
            }
        }
    }

    /// The credits the ops create on a key that does not exist, if any.
    pub fn into_new(self) -> Option<Credits> {
        if self.expiry == KeyExpiry::Delete {
            return None;
        }
        let mut credits = Credits::new();
        self.apply(&mut credits);
        (credits.block_count() > 0 || credits.id_count() > 0).then_some(credits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Plans;
    use std::sync::Arc;

    #[test]
    fn a_replayed_delta_reproduces_the_state() {
        let mut interner = LayoutInterner::new();
        let mut plans = Plans::new();
        assert!(plans
            .set(
                "p",
                &[("rpm", "fixed 5/1m"), ("jobs", "concurrency 2")],
                &mut interner
            )
            .is_ok());
        let plan = plans.get("p").cloned().unwrap_or_else(|| unreachable!());
        let mut primary = Subject::new(Arc::clone(&plan.layout), 1_000);
        primary.words.copy_from_slice(&[2, 1]);
        let request = Request {
            expires_at: 9_000,
            plan: Arc::from("p"),
            leases: vec![Arc::from("jobs")],
            charges: vec![],
        };
        primary.extra_mut().requests.insert(b"r", request.clone());
        primary.extra_mut().next_seq = 4;
        let mut d = DeltaWriter::new(Vec::new());
        d.purge(1_000)
            .limits(&primary)
            .put(b"r", &request)
            .seq(4)
            .expiry(KeyExpiry::At(60_000));
        let payload = d.finish();
        let delta = Delta::decode(&payload, &mut interner, 10);
        let delta = delta.unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(delta.expiry, KeyExpiry::At(60_000));
        assert_eq!(delta.into_new().as_ref(), Some(&primary));
        for cut in 1..payload.len() {
            // Every truncation either fails or decodes a prefix of whole ops.
            let _ = Delta::decode(&payload[..cut], &mut interner, 10);
        }
        let mut replica = primary.clone();
        let mut d = DeltaWriter::new(Vec::new());
        d.purge(10_000).remove(b"r").expiry(KeyExpiry::Delete);
        let payload = d.finish();
        let delta =
            Delta::decode(&payload, &mut interner, 10).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(delta.expiry, KeyExpiry::Delete);
        delta.apply(&mut replica);
        assert!(replica.extra.is_none());
    }

    #[test]
    fn garbage_is_refused_whole() {
        let mut interner = LayoutInterner::new();
        for bad in [&[][..], &[9], &[1, 99], &[1, 8, 7], &[1, 2, 0xff]] {
            assert!(Delta::decode(bad, &mut interner, 10).is_err(), "{bad:?}");
        }
    }
}
