//! Prepaid credits: a balance made of blocks, each with an amount and an optional
//! expiry, consumed earliest-expiry first (blocks without expiry last).
//!
//! - A block is live while `now < expires_at`; expired blocks count for nothing and
//!   are dropped. They sort first, so dropping them pops a prefix of the table.
//! - `GRANT ... ID` and `DEDUCT ... ID` are idempotent: the first result is remembered
//!   (until `forget_at`, the idempotency window) and a repeat returns it unchanged.
//! - A remembered deduction records which blocks it came from, so `REFUND` can return
//!   it — once, to the blocks still live.
//! - `total` is always the sum of `left` over the table (expired-but-not-yet-dropped
//!   blocks included), so a balance costs O(expired blocks), usually nothing.
//!
//! Every write records what it touched in a [`Touched`], which the module turns into a
//! replicated delta of O(blocks touched) bytes.

use std::collections::{BTreeMap, BTreeSet};

use crate::codec::{bad, DecodeError, Reader, Writer};
use crate::time::MAX_INSTANT_MS;

/// Longest block or request id, in bytes.
pub const MAX_CREDIT_ID_LEN: usize = 256;
/// Most blocks one key may hold: the ceiling of `tollgate.max-blocks-per-key`, and
/// what decoding accepts, so every key a command could make loads again.
pub const MAX_BLOCKS: usize = 10_000_000;
/// Most remembered ids one key may hold: the ceiling of `tollgate.max-ids-per-key`.
pub const MAX_IDS: usize = 10_000_000;
/// Highest block sequence number: grants stop (with an error) long before it wraps.
pub const MAX_SEQ: u64 = 1 << 62;

/// Where a block sorts: its expiry (`u64::MAX` for none), then grant order.
pub type BlockKey = (u64, u64);

const NEVER: u64 = u64::MAX;

/// One grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub id: Box<[u8]>,
    pub granted: u64,
    pub left: u64,
    /// Remembered deductions that took from this block (and may refund to it).
    pub refs: u32,
}

/// A remembered result, for idempotency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    Grant {
        balance: u64,
    },
    Deduct {
        deducted: u64,
        balance: u64,
        parts: Vec<(BlockKey, u64)>,
        refunded: bool,
    },
}

/// A remembered id: its result, and when it is forgotten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    pub forget_at: u64,
    pub recorded: Recorded,
}

/// Why a credits call was refused (nothing changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreditsError {
    ZeroGrant,
    AlreadyExpired,
    /// The expiry is past [`MAX_INSTANT_MS`].
    ExpiryOutOfRange,
    Overflow,
    TooManyBlocks(usize),
    /// The key has granted [`MAX_SEQ`] blocks.
    SequenceExhausted,
    /// A deduction id whose deduction was refunded: a new deduction needs a new id.
    Refunded,
}

impl std::fmt::Display for CreditsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CreditsError::ZeroGrant => write!(f, "amount must be at least 1"),
            CreditsError::AlreadyExpired => write!(f, "the block would already be expired"),
            CreditsError::Overflow => write!(f, "the balance would exceed 18446744073709551615"),
            CreditsError::ExpiryOutOfRange => {
                write!(
                    f,
                    "the expiry must be at most {MAX_INSTANT_MS} (ms since the epoch)"
                )
            }
            CreditsError::TooManyBlocks(max) => write!(
                f,
                "the key already holds {max} blocks (tollgate.max-blocks-per-key)"
            ),
            CreditsError::SequenceExhausted => {
                write!(f, "the key has used up its block sequence; use a new key")
            }
            CreditsError::Refunded => write!(
                f,
                "that deduction id was refunded; a new deduction needs a new id"
            ),
        }
    }
}

/// Limits and windows a write needs.
#[derive(Debug, Clone, Copy)]
pub struct CreditSettings {
    /// How long ids are remembered.
    pub window_ms: u64,
    /// Most remembered ids (the oldest are forgotten first).
    pub max_ids: usize,
    /// Most blocks one key may hold.
    pub max_blocks: usize,
}

/// What a write touched: the blocks and ids whose state must be replicated.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Touched {
    /// Expired blocks and ids were dropped as of this instant.
    pub purged_at: Option<u64>,
    pub blocks: Vec<BlockKey>,
    pub ids: Vec<Box<[u8]>>,
}

/// The credits of one key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credits {
    /// The clock's high-water mark for this key.
    pub updated_ms: u64,
    pub next_seq: u64,
    total: u64,
    blocks: BTreeMap<BlockKey, Block>,
    /// The blocks still holding credits, in consumption order: deductions and the
    /// key's expiry skip emptied blocks (kept only for refunds) without a scan.
    funded: BTreeSet<BlockKey>,
    block_ids: BTreeMap<Box<[u8]>, BlockKey>,
    ids: BTreeMap<Box<[u8]>, Remembered>,
    ids_by_time: BTreeSet<(u64, Box<[u8]>)>,
}

/// Remembered ids of grants and deductions live in one table; a tag byte keeps the
/// two namespaces apart.
fn id_key(kind: u8, id: &[u8]) -> Box<[u8]> {
    let mut key = Vec::with_capacity(id.len() + 1);
    key.push(kind);
    key.extend_from_slice(id);
    key.into_boxed_slice()
}

const GRANT_ID: u8 = b'g';
const DEDUCT_ID: u8 = b'd';

impl Credits {
    pub fn new() -> Self {
        Self::default()
    }

    /// The instant a write is decided at: never before what this key has seen, never
    /// past [`MAX_INSTANT_MS`].
    pub fn effective_now(&self, clock_ms: u64) -> u64 {
        clock_ms.min(MAX_INSTANT_MS).max(self.updated_ms)
    }

    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    pub fn id_count(&self) -> usize {
        self.ids.len()
    }

    pub fn block(&self, key: &BlockKey) -> Option<&Block> {
        self.blocks.get(key)
    }

    pub fn remembered(&self, key: &[u8]) -> Option<&Remembered> {
        self.ids.get(key)
    }

    /// The live balance at `now` (read-only).
    pub fn balance(&self, now: u64) -> u64 {
        let expired: u64 = self
            .blocks
            .range(..(now.saturating_add(1), 0))
            .map(|(_, b)| b.left)
            .sum();
        self.total.saturating_sub(expired)
    }

    /// Live blocks still holding credits, in consumption order:
    /// `(id, left, granted, expires_at)`. (Emptied blocks kept only so a remembered
    /// deduction can be refunded to them are not listed.)
    pub fn live_blocks(
        &self,
        now: u64,
    ) -> impl Iterator<Item = (&[u8], u64, u64, Option<u64>)> + '_ {
        self.blocks
            .range((now.saturating_add(1), 0)..)
            .filter(|(_, b)| b.left > 0)
            .map(|(&(at, _), b)| (&*b.id, b.left, b.granted, (at != NEVER).then_some(at)))
    }

    /// Drops expired blocks and forgotten ids as of `now`, and moves the clock.
    fn purge(&mut self, now: u64, touched: &mut Touched) {
        self.updated_ms = now;
        touched.purged_at = Some(now);
        self.drop_expired(now);
    }

    /// What [`Touched::purged_at`] replays on a replica.
    pub fn drop_expired(&mut self, now: u64) {
        while let Some((&key, _)) = self.blocks.first_key_value() {
            if key.0 > now {
                break;
            }
            self.remove_block(key);
        }
        while let Some((at, _)) = self.ids_by_time.first() {
            if *at > now {
                break;
            }
            if let Some((_, id)) = self.ids_by_time.pop_first() {
                self.forget(&id);
            }
        }
    }

    fn remove_block(&mut self, key: BlockKey) -> Option<Block> {
        let block = self.blocks.remove(&key)?;
        self.funded.remove(&key);
        self.total = self.total.saturating_sub(block.left);
        self.block_ids.remove(&block.id);
        Some(block)
    }

    /// Forgets a remembered id, releasing the blocks its deduction referenced.
    fn forget(&mut self, id: &[u8]) -> Option<Remembered> {
        let remembered = self.ids.remove(id)?;
        self.ids_by_time
            .remove(&(remembered.forget_at, Box::from(id)));
        if let Recorded::Deduct { parts, .. } = &remembered.recorded {
            for (key, _) in parts {
                self.unref_block(*key);
            }
        }
        Some(remembered)
    }

    fn unref_block(&mut self, key: BlockKey) {
        if let Some(block) = self.blocks.get_mut(&key) {
            block.refs = block.refs.saturating_sub(1);
            if block.refs == 0 && block.left == 0 {
                self.remove_block(key);
            }
        }
    }

    fn remember(
        &mut self,
        id: Box<[u8]>,
        remembered: Remembered,
        settings: &CreditSettings,
        touched: &mut Touched,
    ) {
        if settings.max_ids == 0 || settings.window_ms == 0 {
            if let Recorded::Deduct { parts, .. } = &remembered.recorded {
                for (key, _) in parts {
                    self.unref_block(*key);
                    touched.blocks.push(*key);
                }
            }
            return;
        }
        while self.ids.len() >= settings.max_ids {
            let Some((_, oldest)) = self.ids_by_time.first().cloned() else {
                break;
            };
            if let Some(Remembered {
                recorded: Recorded::Deduct { parts, .. },
                ..
            }) = self.forget(&oldest)
            {
                touched.blocks.extend(parts.iter().map(|(k, _)| *k));
            }
            touched.ids.push(oldest);
        }
        self.ids_by_time.insert((remembered.forget_at, id.clone()));
        self.ids.insert(id.clone(), remembered);
        touched.ids.push(id);
    }

    /// Adds a block of `amount`, live until `expires_at` (or forever). With an `id`, a
    /// repeat returns the first result and changes nothing. Returns the balance.
    pub fn grant(
        &mut self,
        amount: u64,
        expires_at: Option<u64>,
        id: Option<&[u8]>,
        clock_ms: u64,
        settings: &CreditSettings,
        touched: &mut Touched,
    ) -> Result<u64, CreditsError> {
        let now = self.effective_now(clock_ms);
        if let Some(id) = id {
            if let Some(Remembered {
                recorded: Recorded::Grant { balance },
                forget_at,
            }) = self.ids.get(&id_key(GRANT_ID, id))
            {
                if *forget_at > now {
                    return Ok(*balance);
                }
            }
            // A block still holding this id was granted already (its record may have
            // been forgotten): no second grant.
            if self.block_ids.get(id).is_some_and(|key| key.0 > now) {
                return Ok(self.balance(now));
            }
        }
        if amount == 0 {
            return Err(CreditsError::ZeroGrant);
        }
        if expires_at.is_some_and(|at| at <= now) {
            return Err(CreditsError::AlreadyExpired);
        }
        if expires_at.is_some_and(|at| at > MAX_INSTANT_MS) {
            return Err(CreditsError::ExpiryOutOfRange);
        }
        if self.next_seq >= MAX_SEQ {
            return Err(CreditsError::SequenceExhausted);
        }
        if self.balance(now).checked_add(amount).is_none() {
            return Err(CreditsError::Overflow);
        }
        let live_blocks =
            self.blocks.len() - self.blocks.range(..(now.saturating_add(1), 0)).count();
        if live_blocks >= settings.max_blocks {
            return Err(CreditsError::TooManyBlocks(settings.max_blocks));
        }
        self.purge(now, touched);
        self.next_seq += 1;
        let key = (expires_at.unwrap_or(NEVER), self.next_seq);
        let block_id: Box<[u8]> = match id {
            Some(id) => id.into(),
            None => format!("{now}-{}", self.next_seq)
                .into_bytes()
                .into_boxed_slice(),
        };
        // A stale block with the same id (expired, or generated the same) gives way.
        if let Some(old) = self.block_ids.get(&block_id).copied() {
            self.remove_block(old);
            touched.blocks.push(old);
        }
        self.blocks.insert(
            key,
            Block {
                id: block_id.clone(),
                granted: amount,
                left: amount,
                refs: 0,
            },
        );
        self.block_ids.insert(block_id, key);
        self.funded.insert(key);
        self.total += amount;
        touched.blocks.push(key);
        let balance = self.total;
        if let Some(id) = id {
            let forget_at = now.saturating_add(settings.window_ms);
            self.remember(
                id_key(GRANT_ID, id),
                Remembered {
                    forget_at,
                    recorded: Recorded::Grant { balance },
                },
                settings,
                touched,
            );
        }
        Ok(balance)
    }

    /// Takes `amount` from the blocks, earliest expiry first. Without `partial`, all or
    /// nothing. With an `id`, a repeat returns the first result and changes nothing —
    /// unless that deduction was refunded: then it is refused ([`CreditsError::Refunded`]),
    /// since answering the first result would report a charge that no longer stands.
    /// Returns `(deducted, balance)`.
    pub fn deduct(
        &mut self,
        amount: u64,
        partial: bool,
        id: Option<&[u8]>,
        clock_ms: u64,
        settings: &CreditSettings,
        touched: &mut Touched,
    ) -> Result<(u64, u64), CreditsError> {
        let now = self.effective_now(clock_ms);
        if let Some(id) = id {
            if let Some(Remembered {
                recorded:
                    Recorded::Deduct {
                        deducted,
                        balance,
                        refunded,
                        ..
                    },
                forget_at,
            }) = self.ids.get(&id_key(DEDUCT_ID, id))
            {
                if *forget_at > now {
                    if *refunded {
                        return Err(CreditsError::Refunded);
                    }
                    return Ok((*deducted, *balance));
                }
            }
        }
        self.purge(now, touched);
        let want = if partial {
            amount.min(self.total)
        } else if self.total >= amount {
            amount
        } else {
            0
        };
        let mut parts = Vec::new();
        let mut left_to_take = want;
        let mut drained = Vec::new();
        for &key in &self.funded {
            if left_to_take == 0 {
                break;
            }
            let Some(block) = self.blocks.get_mut(&key) else {
                continue;
            };
            let take = block.left.min(left_to_take);
            block.left -= take;
            left_to_take -= take;
            touched.blocks.push(key);
            if id.is_some() {
                block.refs = block.refs.saturating_add(1);
                parts.push((key, take));
            }
            if block.left == 0 {
                drained.push((key, block.refs == 0));
            }
        }
        for (key, unreferenced) in drained {
            self.funded.remove(&key);
            if unreferenced {
                self.remove_block(key);
            }
        }
        self.total -= want - left_to_take;
        let balance = self.total;
        if let Some(id) = id {
            let forget_at = now.saturating_add(settings.window_ms);
            let recorded = Recorded::Deduct {
                deducted: want,
                balance,
                parts,
                refunded: false,
            };
            self.remember(
                id_key(DEDUCT_ID, id),
                Remembered {
                    forget_at,
                    recorded,
                },
                settings,
                touched,
            );
        }
        Ok((want, balance))
    }

    /// Whether a deduction with `id` is still remembered (a repeat would charge
    /// nothing and return the first result).
    pub fn remembers_deduction(&self, id: &[u8], clock_ms: u64) -> bool {
        let now = self.effective_now(clock_ms);
        self.ids
            .get(&id_key(DEDUCT_ID, id))
            .is_some_and(|r| r.forget_at > now)
    }

    /// Whether deducting `amount` now would succeed in full.
    pub fn covers(&self, amount: u64, clock_ms: u64) -> bool {
        self.balance(self.effective_now(clock_ms)) >= amount
    }

    /// Returns deduction `id` to the blocks it came from that are still live, once.
    /// Returns `(refunded, balance)`.
    pub fn refund(&mut self, id: &[u8], clock_ms: u64, touched: &mut Touched) -> (u64, u64) {
        let now = self.effective_now(clock_ms);
        let key = id_key(DEDUCT_ID, id);
        let refundable = matches!(
            self.ids.get(&key),
            Some(Remembered { recorded: Recorded::Deduct { refunded: false, .. }, forget_at }) if *forget_at > now
        );
        if !refundable {
            return (0, self.balance(now));
        }
        self.purge(now, touched);
        let parts = match self.ids.get_mut(&key) {
            Some(Remembered {
                recorded:
                    Recorded::Deduct {
                        parts, refunded, ..
                    },
                ..
            }) => {
                *refunded = true;
                std::mem::take(parts)
            }
            _ => Vec::new(),
        };
        let mut refunded = 0u64;
        for (block_key, amount) in parts {
            if let Some(block) = self.blocks.get_mut(&block_key) {
                // What went back to other blocks since may leave no room under the
                // largest balance a key holds: refund only what fits, so the key always
                // loads again.
                let room = u64::MAX.saturating_sub(self.total).saturating_sub(refunded);
                let back = amount.min(block.granted - block.left).min(room);
                block.left += back;
                if block.left > 0 {
                    self.funded.insert(block_key);
                }
                refunded += back;
                touched.blocks.push(block_key);
                // Drops the block if it stays empty and no other deduction refers to it.
                self.unref_block(block_key);
            }
        }
        self.total = self.total.saturating_add(refunded);
        touched.ids.push(key);
        (refunded, self.total)
    }

    /// Removes block `id`; returns what it still held (0 if unknown or expired).
    pub fn revoke(&mut self, id: &[u8], clock_ms: u64, touched: &mut Touched) -> u64 {
        let now = self.effective_now(clock_ms);
        let Some(key) = self.block_ids.get(id).copied().filter(|k| k.0 > now) else {
            return 0;
        };
        self.purge(now, touched);
        touched.blocks.push(key);
        self.remove_block(key).map_or(0, |b| b.left)
    }

    /// When the key may go: never while a live block without expiry holds credits;
    /// else when the last block expires and the last id is forgotten.
    pub fn expiry(&self) -> crate::subject::Expiry {
        use crate::subject::Expiry;
        // Blocks are ordered by expiry, never-expiring last: both lookups are O(log n).
        if self.funded.range((NEVER, 0)..).next().is_some() {
            return Expiry::Never;
        }
        let last_block = self
            .blocks
            .range(..(NEVER, 0))
            .next_back()
            .map(|(&(at, _), _)| at);
        let last_id = self.ids_by_time.last().map(|(at, _)| *at);
        match last_block.max(last_id) {
            Some(at) => Expiry::At(at),
            None => Expiry::Idle,
        }
    }

    // --- Replication: what a delta ships, and how a replica applies it. ---

    /// Upserts (or, with `None`, removes) block `key`, keeping `total` and the id index.
    /// Keeps every invariant whatever it is given (a primary never sends such a block,
    /// but a replica must hold a state it can save and load): a block of the same id at
    /// another key gives way, and a block that would push the balance past `u64::MAX`
    /// is held to what fits.
    pub fn put_block(&mut self, key: BlockKey, block: Option<Block>) {
        self.remove_block(key);
        if let Some(mut block) = block.filter(|_| self.blocks.len() < MAX_BLOCKS) {
            if let Some(other) = self.block_ids.get(&block.id).copied() {
                self.remove_block(other);
            }
            block.left = block.left.min(u64::MAX - self.total);
            self.total += block.left;
            self.next_seq = self.next_seq.max(key.1);
            self.block_ids.insert(block.id.clone(), key);
            if block.left > 0 {
                self.funded.insert(key);
            }
            self.blocks.insert(key, block);
        }
    }

    /// Upserts (or removes) remembered id `key`.
    pub fn put_id(&mut self, key: &[u8], remembered: Option<Remembered>) {
        if let Some(old) = self.ids.remove(key) {
            self.ids_by_time.remove(&(old.forget_at, Box::from(key)));
        }
        if let Some(r) = remembered.filter(|_| self.ids.len() < MAX_IDS) {
            self.ids_by_time.insert((r.forget_at, Box::from(key)));
            self.ids.insert(Box::from(key), r);
        }
    }

    pub fn encode(&self, w: &mut Writer) {
        w.varint(self.updated_ms);
        w.varint(self.next_seq);
        w.varint(self.blocks.len() as u64);
        for (key, block) in &self.blocks {
            encode_block(w, *key, block);
        }
        w.varint(self.ids.len() as u64);
        for (key, r) in &self.ids {
            encode_id(w, key, r);
        }
    }

    /// Reads credits written by [`Credits::encode`], refusing anything the commands
    /// could not have made (so a value accepted here always saves and loads again):
    /// instants past [`MAX_INSTANT_MS`], sequences past [`MAX_SEQ`], more than
    /// [`MAX_BLOCKS`] blocks or [`MAX_IDS`] ids, a block id twice, a balance past
    /// `u64::MAX`. Block reference counts are derived from the remembered deductions,
    /// never trusted.
    pub fn decode(input: &[u8]) -> Result<Credits, DecodeError> {
        let mut r = Reader::new(input);
        let updated_ms = r.varint()?;
        let next_seq = r.varint()?;
        if updated_ms > MAX_INSTANT_MS || next_seq > MAX_SEQ {
            return bad("instant or sequence out of range");
        }
        let mut credits = Credits {
            updated_ms,
            next_seq,
            ..Credits::default()
        };
        for _ in 0..r.count(MAX_BLOCKS)? {
            let (key, mut block) = decode_block(&mut r)?;
            if key.1 > next_seq || (key.0 > MAX_INSTANT_MS && key.0 != NEVER) {
                return bad("block key out of range");
            }
            if credits.blocks.contains_key(&key) || credits.block_ids.contains_key(&block.id) {
                return bad("block appears twice");
            }
            if credits.total.checked_add(block.left).is_none() {
                return bad("balance overflows");
            }
            block.refs = 0;
            credits.put_block(key, Some(block));
        }
        for _ in 0..r.count(MAX_IDS)? {
            let (key, remembered) = decode_id(&mut r)?;
            if credits.ids.contains_key(&key) {
                return bad("id appears twice");
            }
            if let Recorded::Deduct { parts, .. } = &remembered.recorded {
                // A deduction took from blocks granted before it: never a later one.
                if parts.iter().any(|((_, seq), _)| *seq > next_seq) {
                    return bad("a deduction refers to a block not granted yet");
                }
                for (part, _) in parts {
                    if let Some(block) = credits.blocks.get_mut(part) {
                        block.refs = block.refs.saturating_add(1);
                    }
                }
            }
            credits.put_id(&key, Some(remembered));
        }
        r.finish()?;
        // An emptied block is kept only while a deduction may refund to it.
        let orphans: Vec<BlockKey> = credits
            .blocks
            .iter()
            .filter(|(_, b)| b.left == 0 && b.refs == 0)
            .map(|(k, _)| *k)
            .collect();
        for key in orphans {
            credits.remove_block(key);
        }
        Ok(credits)
    }

    /// Heap bytes held (for `MEMORY USAGE`): every index entry with its share of its
    /// B-tree's nodes, and every id allocation (a block's id is held twice, a
    /// remembered id twice), as the allocator rounds them.
    pub fn mem_usage(&self) -> usize {
        use crate::mem::{allocation, btree_entry};
        let per_block = btree_entry::<BlockKey, Block>() + btree_entry::<Box<[u8]>, BlockKey>();
        let blocks: usize = self
            .blocks
            .values()
            .map(|b| per_block + 2 * allocation(b.id.len()))
            .sum();
        let funded = self.funded.len() * btree_entry::<BlockKey, ()>();
        let per_id = btree_entry::<Box<[u8]>, Remembered>() + btree_entry::<(u64, Box<[u8]>), ()>();
        let ids: usize = self
            .ids
            .iter()
            .map(|(key, remembered)| {
                per_id
                    + 2 * allocation(key.len())
                    + match &remembered.recorded {
                        Recorded::Deduct { parts, .. } => {
                            allocation(parts.capacity() * size_of::<(BlockKey, u64)>())
                        }
                        Recorded::Grant { .. } => 0,
                    }
            })
            .sum();
        size_of::<Credits>() + blocks + funded + ids
    }
}

pub fn encode_block(w: &mut Writer, key: BlockKey, block: &Block) {
    w.varint(key.0);
    w.varint(key.1);
    w.bytes(&block.id);
    w.varint(block.granted);
    w.varint(block.left);
    w.varint(u64::from(block.refs));
}

pub fn decode_block(r: &mut Reader<'_>) -> Result<(BlockKey, Block), DecodeError> {
    let key = (r.varint()?, r.varint()?);
    if (key.0 > MAX_INSTANT_MS && key.0 != NEVER) || key.1 == 0 || key.1 > MAX_SEQ {
        return bad("block key out of range");
    }
    let id = r.bytes()?;
    if id.is_empty() || id.len() > MAX_CREDIT_ID_LEN {
        return bad("block id length out of range");
    }
    let granted = r.varint()?;
    let left = r.varint()?;
    if granted == 0 || left > granted {
        return bad("block amounts out of range");
    }
    let refs = u32::try_from(r.varint()?).or_else(|_| bad("block refs out of range"))?;
    Ok((
        key,
        Block {
            id: id.into(),
            granted,
            left,
            refs,
        },
    ))
}

pub fn encode_id(w: &mut Writer, key: &[u8], r: &Remembered) {
    w.bytes(key);
    w.varint(r.forget_at);
    match &r.recorded {
        Recorded::Grant { balance } => {
            w.u8(1);
            w.varint(*balance);
        }
        Recorded::Deduct {
            deducted,
            balance,
            parts,
            refunded,
        } => {
            w.u8(2);
            w.varint(*deducted);
            w.varint(*balance);
            w.u8(u8::from(*refunded));
            w.varint(parts.len() as u64);
            for ((at, seq), amount) in parts {
                w.varint(*at);
                w.varint(*seq);
                w.varint(*amount);
            }
        }
    }
}

pub fn decode_id(r: &mut Reader<'_>) -> Result<(Box<[u8]>, Remembered), DecodeError> {
    let key = r.bytes()?;
    if key.len() < 2 || key.len() > MAX_CREDIT_ID_LEN + 1 {
        return bad("id length out of range");
    }
    let forget_at = r.varint()?;
    if forget_at > MAX_INSTANT_MS.saturating_add(crate::time::MAX_WINDOW_MS) {
        return bad("id forget instant out of range");
    }
    let recorded = match (r.u8()?, key.first()) {
        (1, Some(&GRANT_ID)) => Recorded::Grant {
            balance: r.varint()?,
        },
        (2, Some(&DEDUCT_ID)) => {
            let deducted = r.varint()?;
            let balance = r.varint()?;
            let refunded = r.u8()? != 0;
            let n = r.count(MAX_BLOCKS)?;
            let mut parts = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                parts.push(((r.varint()?, r.varint()?), r.varint()?));
            }
            Recorded::Deduct {
                deducted,
                balance,
                parts,
                refunded,
            }
        }
        (t, _) => return bad(format!("bad id record tag {t}")),
    };
    Ok((
        key.into(),
        Remembered {
            forget_at,
            recorded,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: CreditSettings = CreditSettings {
        window_ms: 1_000,
        max_ids: 100,
        max_blocks: 1_000,
    };

    fn grant(
        c: &mut Credits,
        amount: u64,
        expires_at: Option<u64>,
        id: Option<&str>,
        now: u64,
    ) -> Result<u64, CreditsError> {
        c.grant(
            amount,
            expires_at,
            id.map(str::as_bytes),
            now,
            &S,
            &mut Touched::default(),
        )
    }

    fn deduct(
        c: &mut Credits,
        amount: u64,
        partial: bool,
        id: Option<&str>,
        now: u64,
    ) -> (u64, u64) {
        c.deduct(
            amount,
            partial,
            id.map(str::as_bytes),
            now,
            &S,
            &mut Touched::default(),
        )
        .unwrap_or((0, 0))
    }

    #[test]
    fn blocks_are_consumed_earliest_expiry_first_and_never_expiring_last() {
        let mut c = Credits::new();
        assert_eq!(grant(&mut c, 10, None, Some("forever"), 0), Ok(10));
        assert_eq!(grant(&mut c, 5, Some(500), Some("late"), 0), Ok(15));
        assert_eq!(grant(&mut c, 3, Some(100), Some("soon"), 0), Ok(18));
        assert_eq!(deduct(&mut c, 4, false, None, 10), (4, 14));
        let left: Vec<(String, u64)> = c
            .live_blocks(10)
            .map(|(id, left, ..)| (String::from_utf8_lossy(id).into(), left))
            .collect();
        assert_eq!(left, [("late".to_string(), 4), ("forever".to_string(), 10)]);
    }

    #[test]
    fn deductions_are_all_or_nothing_unless_partial() {
        let mut c = Credits::new();
        assert_eq!(grant(&mut c, 10, None, None, 0), Ok(10));
        assert_eq!(deduct(&mut c, 11, false, None, 0), (0, 10));
        assert_eq!(deduct(&mut c, 11, true, None, 0), (10, 0));
        assert_eq!(deduct(&mut c, 1, true, None, 0), (0, 0));
    }

    #[test]
    fn a_block_expires_at_its_exact_millisecond() {
        let mut c = Credits::new();
        assert_eq!(grant(&mut c, 7, Some(1_000), None, 0), Ok(7));
        assert_eq!(c.balance(999), 7);
        assert_eq!(c.balance(1_000), 0);
        assert_eq!(deduct(&mut c, 1, false, None, 1_000), (0, 0));
        assert_eq!(c.block_count(), 0, "the expired block was dropped");
        assert_eq!(
            grant(&mut c, 1, Some(1_000), None, 1_000),
            Err(CreditsError::AlreadyExpired)
        );
    }

    #[test]
    fn repeated_ids_return_the_first_result_until_the_window_ends() {
        let mut c = Credits::new();
        assert_eq!(grant(&mut c, 10, None, Some("pay-1"), 0), Ok(10));
        assert_eq!(grant(&mut c, 10, None, Some("pay-1"), 5), Ok(10));
        assert_eq!(c.balance(5), 10, "a retried grant changes nothing");
        assert_eq!(deduct(&mut c, 3, false, Some("req-1"), 10), (3, 7));
        assert_eq!(deduct(&mut c, 3, false, Some("req-1"), 20), (3, 7));
        assert_eq!(c.balance(20), 7, "a retried deduction changes nothing");
        assert!(c.remembers_deduction(b"req-1", 20));
        assert!(!c.remembers_deduction(b"pay-1", 20), "grant ids are apart");
        assert!(!c.remembers_deduction(b"req-1", 1_010));
        // Past the window the deduction id is forgotten: it charges again.
        assert_eq!(deduct(&mut c, 3, false, Some("req-1"), 1_010), (3, 4));
        // The grant's block still holds its id, so the grant does not repeat.
        assert_eq!(grant(&mut c, 10, None, Some("pay-1"), 2_000), Ok(4));
    }

    #[test]
    fn refunds_return_to_live_blocks_once() {
        let mut c = Credits::new();
        assert_eq!(grant(&mut c, 5, Some(100), Some("a"), 0), Ok(5));
        assert_eq!(grant(&mut c, 5, None, Some("b"), 0), Ok(10));
        assert_eq!(deduct(&mut c, 8, false, Some("r"), 10), (8, 2));
        assert_eq!(
            c.block_count(),
            2,
            "a referenced empty block is kept for refunds"
        );
        // Block a expires before the refund: its 5 are lost, b's 3 come back.
        assert_eq!(c.refund(b"r", 150, &mut Touched::default()), (3, 5));
        assert_eq!(c.refund(b"r", 160, &mut Touched::default()), (0, 5));
        assert_eq!(c.refund(b"unknown", 160, &mut Touched::default()), (0, 5));
    }

    fn round_trips(c: &Credits) -> bool {
        let mut w = Writer::new();
        c.encode(&mut w);
        Credits::decode(&w.into_inner()).as_ref() == Ok(c)
    }

    #[test]
    fn a_refund_never_pushes_the_balance_past_what_loads() {
        // Issue 9's reproduction: the refund used to saturate where decode checks.
        let big = u64::MAX - 1;
        let mut c = Credits::new();
        assert_eq!(grant(&mut c, big, None, Some("A"), 0), Ok(big));
        assert_eq!(deduct(&mut c, big, false, Some("d1"), 0), (big, 0));
        assert_eq!(grant(&mut c, big, None, Some("B"), 0), Ok(big));
        assert_eq!(c.refund(b"d1", 0, &mut Touched::default()), (1, u64::MAX));
        assert!(round_trips(&c));
        assert_eq!(c.refund(b"d1", 0, &mut Touched::default()), (0, u64::MAX));
    }

    #[test]
    fn a_refunded_deduction_id_is_refused_not_answered_stale() {
        let mut c = Credits::new();
        assert_eq!(grant(&mut c, 10, None, None, 0), Ok(10));
        assert_eq!(deduct(&mut c, 4, false, Some("r"), 0), (4, 6));
        assert_eq!(c.refund(b"r", 1, &mut Touched::default()), (4, 10));
        assert_eq!(
            c.deduct(4, false, Some(b"r"), 2, &S, &mut Touched::default()),
            Err(CreditsError::Refunded)
        );
        assert_eq!(c.balance(2), 10);
    }

    #[test]
    fn replicated_blocks_keep_ids_unique_and_the_balance_bounded() {
        let mut c = Credits::new();
        let block = |left| Block {
            id: Box::from(&b"x"[..]),
            granted: u64::MAX,
            left,
            refs: 0,
        };
        c.put_block((NEVER, 1), Some(block(u64::MAX - 5)));
        // Another block with the same id replaces it instead of doubling it.
        c.put_block((NEVER, 2), Some(block(7)));
        assert_eq!(c.block_count(), 1);
        assert_eq!(c.balance(0), 7);
        let other = Block {
            id: Box::from(&b"y"[..]),
            ..block(u64::MAX)
        };
        c.put_block((NEVER, 3), Some(other));
        assert_eq!(c.balance(0), u64::MAX);
        assert!(round_trips(&c));
    }

    #[test]
    fn out_of_range_values_are_refused_at_decode() {
        let mut good = Credits::new();
        assert!(grant(&mut good, 5, Some(100), Some("a"), 0).is_ok());
        let encode = |c: &Credits| {
            let mut w = Writer::new();
            c.encode(&mut w);
            w.into_inner()
        };
        let mut late = good.clone();
        late.updated_ms = u64::MAX - 1;
        assert!(Credits::decode(&encode(&late)).is_err());
        let mut exhausted = good.clone();
        exhausted.next_seq = u64::MAX;
        assert!(Credits::decode(&encode(&exhausted)).is_err());
        assert!(Credits::decode(&encode(&good)).is_ok());
        assert_eq!(
            grant(&mut good, 1, Some(MAX_INSTANT_MS + 1), None, 0),
            Err(CreditsError::ExpiryOutOfRange)
        );
    }

    #[test]
    fn a_deduction_from_a_block_not_granted_yet_is_refused_at_decode() {
        // Accepting it would let a later GRANT take that seq and gain a reference
        // only a reload counts: the value would change across DEBUG RELOAD.
        let mut c = Credits::new();
        assert_eq!(grant(&mut c, 5, None, Some("a"), 0), Ok(5));
        assert_eq!(deduct(&mut c, 2, false, Some("d"), 0), (2, 3));
        let encode = |c: &Credits| {
            let mut w = Writer::new();
            c.encode(&mut w);
            w.into_inner()
        };
        assert!(Credits::decode(&encode(&c)).is_ok());
        let mut rewound = c.clone();
        rewound.next_seq = 0;
        rewound.blocks.clear();
        rewound.block_ids.clear();
        rewound.total = 0;
        assert!(Credits::decode(&encode(&rewound)).is_err());
    }

    #[test]
    fn revoke_removes_what_a_block_still_holds() {
        let mut c = Credits::new();
        assert_eq!(grant(&mut c, 5, None, Some("a"), 0), Ok(5));
        assert_eq!(deduct(&mut c, 2, false, None, 0), (2, 3));
        assert_eq!(c.revoke(b"a", 0, &mut Touched::default()), 3);
        assert_eq!(c.revoke(b"a", 0, &mut Touched::default()), 0);
        assert_eq!(c.balance(0), 0);
    }

    #[test]
    fn bad_grants_change_nothing() {
        let mut c = Credits::new();
        assert_eq!(
            grant(&mut c, 0, None, None, 0),
            Err(CreditsError::ZeroGrant)
        );
        assert_eq!(grant(&mut c, u64::MAX, None, None, 0), Ok(u64::MAX));
        assert_eq!(grant(&mut c, 1, None, None, 0), Err(CreditsError::Overflow));
        assert_eq!(c.balance(0), u64::MAX);
        let small = CreditSettings { max_blocks: 1, ..S };
        let mut c = Credits::new();
        assert!(c
            .grant(1, None, None, 0, &small, &mut Touched::default())
            .is_ok());
        assert_eq!(
            c.grant(1, None, None, 0, &small, &mut Touched::default()),
            Err(CreditsError::TooManyBlocks(1))
        );
    }

    #[test]
    fn the_id_table_is_bounded() {
        let few = CreditSettings { max_ids: 3, ..S };
        let mut c = Credits::new();
        assert!(c
            .grant(100, None, None, 0, &few, &mut Touched::default())
            .is_ok());
        for i in 0..10u64 {
            let _ = c.deduct(
                1,
                false,
                Some(format!("r{i}").as_bytes()),
                i,
                &few,
                &mut Touched::default(),
            );
        }
        assert_eq!(c.id_count(), 3);
        assert_eq!(c.balance(10), 90);
    }

    #[test]
    fn credits_round_trip_and_reject_truncation() {
        let mut c = Credits::new();
        assert!(grant(&mut c, 5, Some(100), Some("a"), 0).is_ok());
        assert!(grant(&mut c, 5, None, None, 0).is_ok());
        deduct(&mut c, 6, false, Some("r"), 1);
        let mut w = Writer::new();
        c.encode(&mut w);
        let buf = w.into_inner();
        assert_eq!(Credits::decode(&buf).as_ref(), Ok(&c));
        for cut in 0..buf.len() {
            assert!(Credits::decode(&buf[..cut]).is_err());
        }
    }

    #[test]
    fn key_expiry_follows_blocks_and_remembered_ids() {
        use crate::subject::Expiry;
        let mut c = Credits::new();
        assert_eq!(c.expiry(), Expiry::Idle);
        assert!(grant(&mut c, 5, Some(100), None, 0).is_ok());
        assert_eq!(c.expiry(), Expiry::At(100));
        deduct(&mut c, 1, false, Some("r"), 10);
        assert_eq!(c.expiry(), Expiry::At(1_010));
        assert!(grant(&mut c, 5, None, None, 20).is_ok());
        assert_eq!(c.expiry(), Expiry::Never);
        // The never-expiring block emptied (kept for a refund) no longer pins the
        // key: the latest expiring block does.
        assert_eq!(deduct(&mut c, 9, false, Some("all"), 30), (9, 0));
        assert_eq!(c.expiry(), Expiry::At(1_030));
        assert!(grant(&mut c, 7, Some(3_000), None, 40).is_ok());
        assert_eq!(c.live_blocks(40).count(), 1);
        assert_eq!(c.expiry(), Expiry::At(3_000));
        // A refund into the emptied never-expiring block pins the key again.
        assert_eq!(c.refund(b"all", 50, &mut Touched::default()), (9, 16));
        assert_eq!(c.expiry(), Expiry::Never);
    }

    #[test]
    fn a_deduction_spanning_more_than_a_million_blocks_encodes_and_decodes() {
        // max-blocks-per-key allows up to MAX_BLOCKS: one deduction may take from more
        // than a million blocks, and its record must load and replicate again. Built
        // directly (granting a million blocks one by one is slow in tests): the key
        // after such a deduction whose blocks have since expired (dropped) while the
        // deduction id is still remembered.
        const N: u64 = 1_000_001;
        let mut c = Credits::new();
        c.updated_ms = 1_000;
        c.next_seq = N;
        let key = id_key(DEDUCT_ID, b"all");
        let remembered = Remembered {
            forget_at: 2_000,
            recorded: Recorded::Deduct {
                deducted: N,
                balance: 0,
                parts: (1..=N).map(|seq| ((500, seq), 1)).collect(),
                refunded: false,
            },
        };
        c.put_id(&key, Some(remembered.clone()));
        // The record alone.
        let mut w = Writer::new();
        encode_id(&mut w, &key, &remembered);
        let buf = w.into_inner();
        let mut r = Reader::new(&buf);
        assert_eq!(decode_id(&mut r), Ok((key.clone(), remembered)));
        assert_eq!(r.finish(), Ok(()));
        // The whole key (RDB save and load).
        let mut w = Writer::new();
        c.encode(&mut w);
        assert_eq!(Credits::decode(&w.into_inner()).as_ref(), Ok(&c));
        // The replicated write that remembered it (RL.APPLY).
        let touched = Touched {
            ids: vec![key],
            ..Touched::default()
        };
        let mut w = crate::delta::CreditsDeltaWriter::new(Vec::new());
        w.changes(&c, &touched);
        let delta = crate::delta::CreditsDelta::decode(&w.finish()).unwrap();
        assert_eq!(delta.into_new().as_ref(), Some(&c));
    }

    /// docs/operating.md, "Clocks", for credits: a call at `clock` is decided at
    /// `max(clock, the key's latest instant)`.
    #[test]
    fn clock_steps_expire_blocks_as_the_operating_guide_documents() {
        // What a call at `clock` sees (as RL.CREDITS.BALANCE computes it).
        let seen = |c: &Credits, clock: u64| c.balance(c.effective_now(clock));
        let live = |c: &Credits, clock: u64| -> Vec<(String, u64)> {
            c.live_blocks(c.effective_now(clock))
                .map(|(id, left, ..)| (String::from_utf8_lossy(id).into(), left))
                .collect()
        };
        // At 1_000 the key holds A (expires at 10_000), B (30_000) and C (never).
        let mut c = Credits::new();
        assert_eq!(grant(&mut c, 5, Some(10_000), Some("A"), 1_000), Ok(5));
        assert_eq!(grant(&mut c, 7, Some(30_000), Some("B"), 1_000), Ok(12));
        assert_eq!(grant(&mut c, 1, None, Some("C"), 1_000), Ok(13));

        // Forward by d = 28_999: A falls due within d and expires at once; B, which a
        // correct clock keeps 29_000 ms more (longer than d), is kept.
        let mut ahead = c.clone();
        assert_eq!(
            deduct(&mut ahead, 1, false, Some("r1"), 1_000 + 28_999),
            (1, 7)
        );
        assert_eq!(live(&ahead, 29_999), [("B".into(), 6), ("C".into(), 1)]);
        // Forward by exactly B's 29_000: B goes when the clock reads its expiry.
        let mut further = c.clone();
        assert_eq!(seen(&further, 29_999), 8, "B is live at 29_999");
        assert_eq!(deduct(&mut further, 1, false, None, 30_000), (1, 0));
        assert_eq!(live(&further, 30_000), []);

        // The clock comes back to the correct reading: the key touched while ahead
        // keeps 29_999 and waits for it. A does not come back; B holds (and is spent
        // first) until the clock reads 30_000.
        assert_eq!(seen(&ahead, 1_001), 7);
        assert_eq!(deduct(&mut ahead, 1, false, Some("r2"), 1_002), (1, 6));
        assert_eq!(live(&ahead, 1_002), [("B".into(), 5), ("C".into(), 1)]);
        // Time stands still at 29_999: a block expiring before it would already be
        // expired, and TTLs count from it.
        assert_eq!(
            grant(&mut ahead, 1, Some(20_000), None, 1_003),
            Err(CreditsError::AlreadyExpired)
        );
        assert_eq!(seen(&ahead, 29_998), 6);
        assert_eq!(seen(&ahead, 29_999), 6);
        assert_eq!(
            seen(&ahead, 30_000),
            1,
            "B goes when the clock reads 30_000"
        );
        assert_eq!(deduct(&mut ahead, 2, false, None, 30_000), (0, 1));

        // Back by d, for a key touched before the step: X (expired at 52_000) went at
        // 55_000 and does not come back; Y (60_000) does not expire until the clock
        // catches up.
        let mut k = Credits::new();
        assert_eq!(grant(&mut k, 4, Some(52_000), Some("X"), 50_000), Ok(4));
        assert_eq!(grant(&mut k, 3, Some(60_000), Some("Y"), 50_000), Ok(7));
        assert_eq!(deduct(&mut k, 1, false, None, 55_000), (1, 2));
        assert_eq!(seen(&k, 40_000), 2, "never more than at 55_000");
        assert_eq!(deduct(&mut k, 3, false, None, 40_000), (0, 2));
        assert_eq!(deduct(&mut k, 1, false, None, 40_000), (1, 1));
        assert_eq!(
            grant(&mut k, 1, Some(54_000), None, 40_000),
            Err(CreditsError::AlreadyExpired)
        );
        assert_eq!(seen(&k, 59_999), 1);
        assert_eq!(seen(&k, 60_000), 0);
        // A key first touched after the step runs on the clock as it is.
        let mut fresh = Credits::new();
        assert_eq!(grant(&mut fresh, 2, Some(45_000), None, 40_000), Ok(2));
        assert_eq!(deduct(&mut fresh, 1, false, None, 41_000), (1, 1));
        assert_eq!(seen(&fresh, 44_999), 1);
        assert_eq!(seen(&fresh, 45_000), 0);
    }

    #[test]
    fn emptied_blocks_kept_for_refunds_are_skipped_and_refilled() {
        let mut c = Credits::new();
        for _ in 0..5 {
            assert!(grant(&mut c, 1, None, None, 0).is_ok());
        }
        for i in 0..5 {
            assert_eq!(
                deduct(&mut c, 1, false, Some(&format!("r{i}")), 1),
                (1, 4 - i)
            );
        }
        assert_eq!(
            c.block_count(),
            5,
            "each emptied block is kept for its refund"
        );
        assert_eq!(deduct(&mut c, 1, true, None, 1), (0, 0));
        assert_eq!(c.refund(b"r2", 2, &mut Touched::default()), (1, 1));
        assert_eq!(deduct(&mut c, 1, false, None, 3), (1, 0));
        assert_eq!(c.refund(b"r3", 4, &mut Touched::default()), (1, 1));
        let left: Vec<u64> = c.live_blocks(4).map(|(_, left, ..)| left).collect();
        assert_eq!(left, [1]);
    }
}
