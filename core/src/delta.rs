//! The replicated form of credits writes, and what every replicated payload shares:
//! its kind byte and the key's expiry. (Subject deltas are in [`crate::change`].)
//!
//! A primary decides with its own clock, then ships *what changed* — never the command
//! — so replicas and an AOF replay reach exactly the primary's state whatever their
//! clocks say. A credits payload names the blocks and remembered ids a write touched
//! (their new state, or their removal), so it is O(blocks touched) bytes.

use crate::codec::{bad, DecodeError, Reader, Writer};
use crate::credits::{Block, BlockKey, Credits, Remembered, Touched};
use crate::time::MAX_INSTANT_MS;

/// First byte of a credits payload.
pub const CREDITS_DELTA: u8 = 2;

const OP_PURGE: u8 = 1;
const OP_FULL: u8 = 7;
const OP_EXPIRE: u8 = 8;

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

/// Appends the op saying what the key's expiry becomes (every payload ends with one).
pub fn write_expiry(w: &mut Writer, expiry: KeyExpiry) {
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

pub(crate) fn read_expiry(r: &mut Reader<'_>) -> Result<KeyExpiry, DecodeError> {
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
    /// Decodes and validates a whole credits payload (every value in the ranges
    /// [`Credits::decode`] accepts); applying it then keeps every invariant.
    pub fn decode(payload: &[u8]) -> Result<CreditsDelta, DecodeError> {
        let mut r = Reader::new(payload);
        if r.u8()? != CREDITS_DELTA {
            return bad("not a credits payload");
        }
        let mut ops = Vec::new();
        let mut expiry = KeyExpiry::Keep;
        while !r.is_empty() {
            match r.u8()? {
                OP_PURGE => match r.varint()? {
                    now @ 0..=MAX_INSTANT_MS => ops.push(CreditsOp::Purge(now)),
                    _ => return bad("purge instant out of range"),
                },
                OP_META => {
                    let (updated_ms, next_seq) = (r.varint()?, r.varint()?);
                    if updated_ms > MAX_INSTANT_MS || next_seq > crate::credits::MAX_SEQ {
                        return bad("instant or sequence out of range");
                    }
                    ops.push(CreditsOp::Meta(updated_ms, next_seq));
                }
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
                OP_FULL => ops.push(CreditsOp::Full(Credits::decode(r.bytes()?)?)),
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
