//! The plan registry: every plan of a node and its default plan, kept so that nodes
//! which exchange their changes in any order, any number of times, end up holding the
//! same plans (a state-based CRDT).
//!
//! Each plan name, and the default-plan setting, is a last-writer-wins register. A
//! value carries a [`Stamp`]: a hybrid logical clock reading (a Lamport counter that
//! also never falls behind the wall clock in milliseconds) and the node that made the
//! change. A change replaces a register only if its **version** — the stamp, then a
//! hash of the value — is greater, so any two different values are ordered the same
//! way on every node. Deleting a plan leaves a **tombstone** carrying the deletion's
//! stamp, so an older change that arrives late cannot bring the plan back.
//!
//! What must always hold:
//! - merging is commutative, associative and idempotent: any set of changes, applied
//!   in any order and any number of times, gives the same registry ([`Plans::merge`]);
//! - a register never goes back to an older version: a late or repeated change is
//!   [`Merged::Stale`] and changes nothing;
//! - a local change ([`Plans::set_by`], [`Plans::delete_by`], [`Plans::set_default_by`])
//!   is validated like a Redis command (the whole change or nothing), is stamped newer
//!   than everything this registry has seen, and leaves the registry exactly as merging
//!   the [`Change`] it returns would;
//! - merging never fails. A plan this build cannot compile (sent by a newer build, say)
//!   is kept, synced and saved, but not used ([`Plans::unusable`]). A fallback loop that
//!   two concurrent changes close between them (each node accepted its own edge) is
//!   kept as merged: a call walks at most `decide::MAX_FALLBACK_DEPTH` plans, and
//!   [`Plans::fallback_loops`] counts the plans on such loops so operators can see and
//!   break them (a local change that would extend or close a loop is still refused).
//!
//! Tombstones are kept for [`TOMBSTONE_RETENTION_MS`] (7 days) after the deletion and
//! at most [`MAX_TOMBSTONES`] of them (the oldest go first); [`Plans::prune`] drops the
//! rest, and a tombstone older than that is not taken from a peer. A node that missed a
//! deletion and comes back after the retention may bring the deleted plan back: apply
//! the plans file again (`tollgate plans apply --prune`) after such an outage.
//!
//! For the catch-up exchange, entries are spread over [`BUCKETS`] buckets by a hash of
//! their name; a [`Summary`] holds one order-independent sum of entry hashes per bucket,
//! so two nodes compare ~600 bytes and then send each other only differing buckets.
//!
//! ```
//! use tollgate_core::layout::LayoutInterner;
//! use tollgate_core::registry::{Author, Merged, Plans};
//!
//! let mut interner = LayoutInterner::new();
//! let (mut a, mut b) = (Plans::new(), Plans::new());
//! let at = |origin, now_ms| Author { origin, now_ms };
//! let (_, older) = a.set_by(at("node-a", 1_000), "free", &[("rpm", "sliding 10/1m")], &mut interner)?;
//! let (_, newer) = b.set_by(at("node-b", 2_000), "free", &[("rpm", "sliding 20/1m")], &mut interner)?;
//! // Each node merges the other's change: the later one wins on both.
//! assert_eq!(a.merge(&newer, 2_000, &mut interner), Merged::Applied);
//! assert_eq!(b.merge(&older, 2_000, &mut interner), Merged::Stale);
//! assert_eq!(a.sync_digest(), b.sync_digest());
//! // A repeated or late message changes nothing.
//! assert_eq!(a.merge(&older, 2_000, &mut interner), Merged::Stale);
//! assert_eq!(a.get("free").map(|p| p.fields().len()), Some(1));
//! # Ok::<(), tollgate_core::plan::PlanError>(())
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use crate::codec::{bad, DecodeError, Reader, Writer};
use crate::layout::LayoutInterner;
use crate::plan::{same_field, Plan, PlanError, MAX_LIMITS, MAX_PLANS};
use crate::spec::is_valid_name;
use crate::time::MS_PER_DAY;

/// Buckets of the catch-up summary (a request names them in a 64-bit mask).
pub const BUCKETS: usize = 64;
/// How long a tombstone is kept after its deletion, by its stamp's clock.
pub const TOMBSTONE_RETENTION_MS: u64 = 7 * MS_PER_DAY;
/// Most tombstones kept; past that the oldest are pruned first.
pub const MAX_TOMBSTONES: usize = MAX_PLANS;
/// Most entries a saved registry may hold when decoded. Merges may take a cluster past
/// [`MAX_PLANS`] (each node refuses new plans only past its own count), so this bound is
/// a sanity check, far above anything the commands let an operator build.
pub const MAX_ENTRIES: usize = 1 << 24;
/// Longest origin (a cluster node id has 40 characters; standalone nodes use "").
pub const MAX_ORIGIN_LEN: usize = 64;
/// Most fields one plan change may carry when decoded.
pub const MAX_FIELDS: usize = 4 * MAX_LIMITS;

/// The fields of a plan, in the order they were first set.
pub type Fields = Vec<(Box<str>, Box<str>)>;

/// When and where a change was made. Ordered by counter, then origin.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp {
    /// The registry clock at the change: greater than every counter the node had seen,
    /// and at least the node's wall clock in milliseconds.
    pub counter: u64,
    /// The node that made the change (its cluster node id; "" on a standalone server and
    /// for plans loaded from an encoding that had no stamps).
    pub origin: Box<str>,
}

/// Who makes a local change, and the wall clock where they make it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Author<'a> {
    pub origin: &'a str,
    pub now_ms: u64,
}

impl Author<'static> {
    /// A plain counter with no origin and no wall clock: what [`Plans::set`] uses.
    pub const LOCAL: Author<'static> = Author {
        origin: "",
        now_ms: 0,
    };
}

/// One register's new value, as nodes send it to each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A plan's fields, or its deletion (`None`).
    Plan {
        name: Box<str>,
        stamp: Stamp,
        fields: Option<Fields>,
    },
    /// The default plan, or no default (`None`).
    Default {
        stamp: Stamp,
        plan: Option<Box<str>>,
    },
}

const TAG_PLAN: u8 = 1;
const TAG_PLAN_DELETED: u8 = 2;
const TAG_DEFAULT: u8 = 3;
const TAG_DEFAULT_CLEARED: u8 = 4;

fn write_stamp(w: &mut Writer, stamp: &Stamp) {
    w.varint(stamp.counter);
    w.str(&stamp.origin);
}

fn read_stamp(r: &mut Reader<'_>) -> Result<Stamp, DecodeError> {
    let counter = r.varint()?;
    let origin = r.str()?;
    if origin.len() > MAX_ORIGIN_LEN {
        return bad(format!("origin longer than {MAX_ORIGIN_LEN} bytes"));
    }
    Ok(Stamp {
        counter,
        origin: origin.into(),
    })
}

fn write_fields(w: &mut Writer, fields: &[(Box<str>, Box<str>)]) {
    w.varint(fields.len() as u64);
    for (f, v) in fields {
        w.str(f);
        w.str(v);
    }
}

/// Writes a plan change (shared by [`Change::encode`] and the registry's own encoding,
/// which writes from its entries without cloning them).
fn write_plan(w: &mut Writer, name: &str, stamp: &Stamp, fields: Option<&[(Box<str>, Box<str>)]>) {
    w.u8(if fields.is_some() {
        TAG_PLAN
    } else {
        TAG_PLAN_DELETED
    });
    w.str(name);
    write_stamp(w, stamp);
    if let Some(fields) = fields {
        write_fields(w, fields);
    }
}

fn write_default(w: &mut Writer, stamp: &Stamp, plan: Option<&str>) {
    w.u8(if plan.is_some() {
        TAG_DEFAULT
    } else {
        TAG_DEFAULT_CLEARED
    });
    write_stamp(w, stamp);
    if let Some(plan) = plan {
        w.str(plan);
    }
}

/// FNV-1a, 64 bits: the content digest's hash (kept as it was: the CLI computes the
/// same digest from a plans file).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A hash that is the same on every node and every build (FNV-1a with a final
/// avalanche, so that sums of hashes and bucket indexes are well spread).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h = fnv1a(bytes);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The catch-up bucket of a plan name.
pub fn bucket_of(name: &str) -> usize {
    (stable_hash(name.as_bytes()) % BUCKETS as u64) as usize
}

/// The hash of a register's value alone (what breaks a tie between equal stamps).
fn value_hash_plan(fields: Option<&[(Box<str>, Box<str>)]>) -> u64 {
    let mut w = Writer::new();
    match fields {
        Some(fields) => {
            w.u8(TAG_PLAN);
            write_fields(&mut w, fields);
        }
        None => w.u8(TAG_PLAN_DELETED),
    }
    stable_hash(&w.buf)
}

fn value_hash_default(plan: Option<&str>) -> u64 {
    let mut w = Writer::new();
    match plan {
        Some(plan) => {
            w.u8(TAG_DEFAULT);
            w.str(plan);
        }
        None => w.u8(TAG_DEFAULT_CLEARED),
    }
    stable_hash(&w.buf)
}

impl Change {
    pub fn stamp(&self) -> &Stamp {
        match self {
            Change::Plan { stamp, .. } | Change::Default { stamp, .. } => stamp,
        }
    }

    pub fn encode(&self, w: &mut Writer) {
        match self {
            Change::Plan {
                name,
                stamp,
                fields,
            } => write_plan(w, name, stamp, fields.as_deref()),
            Change::Default { stamp, plan } => write_default(w, stamp, plan.as_deref()),
        }
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Change, DecodeError> {
        let tag = r.u8()?;
        match tag {
            TAG_PLAN | TAG_PLAN_DELETED => {
                let name: Box<str> = r.str()?.into();
                let stamp = read_stamp(r)?;
                let fields = if tag == TAG_PLAN {
                    let n = r.count(MAX_FIELDS)?;
                    let mut fields = Vec::with_capacity(n);
                    for _ in 0..n {
                        fields.push((Box::<str>::from(r.str()?), Box::<str>::from(r.str()?)));
                    }
                    Some(fields)
                } else {
                    None
                };
                Ok(Change::Plan {
                    name,
                    stamp,
                    fields,
                })
            }
            TAG_DEFAULT | TAG_DEFAULT_CLEARED => {
                let stamp = read_stamp(r)?;
                let plan = if tag == TAG_DEFAULT {
                    Some(r.str()?.into())
                } else {
                    None
                };
                Ok(Change::Default { stamp, plan })
            }
            t => bad(format!("bad plan change tag {t}")),
        }
    }

    /// The change's version: what decides which of two values of a register wins.
    pub fn version(&self) -> Version {
        match self {
            Change::Plan { stamp, fields, .. } => Version {
                stamp: stamp.clone(),
                value_hash: value_hash_plan(fields.as_deref()),
            },
            Change::Default { stamp, plan } => Version {
                stamp: stamp.clone(),
                value_hash: value_hash_default(plan.as_deref()),
            },
        }
    }

    /// The register a change is for: a plan name, or `None` for the default plan.
    pub fn target(&self) -> Option<&str> {
        match self {
            Change::Plan { name, .. } => Some(name),
            Change::Default { .. } => None,
        }
    }

    /// The hash an entry holding this change adds to its bucket's sum.
    fn entry_hash(&self) -> u64 {
        let mut w = Writer::new();
        self.encode(&mut w);
        stable_hash(&w.buf)
    }
}

/// A register's version: its stamp, then its value's hash. Greater wins.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub stamp: Stamp,
    pub value_hash: u64,
}

/// What merging one change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merged {
    /// The change was newer and is now the register's value.
    Applied,
    /// The change was newer and is stored, but this build cannot use the plan (it is
    /// not listed and calls naming it answer `unknown plan`).
    Unusable(PlanError),
    /// The register already holds this version or a newer one: nothing changed.
    Stale,
}

#[derive(Debug, Clone)]
enum State {
    Live(Arc<Plan>),
    Unusable(Fields, PlanError),
    Deleted,
}

#[derive(Debug, Clone)]
struct Entry {
    version: Version,
    /// What this entry adds to its bucket's sum.
    hash: u64,
    state: State,
}

impl Entry {
    fn fields(&self) -> Option<&[(Box<str>, Box<str>)]> {
        match &self.state {
            State::Live(plan) => Some(plan.fields()),
            State::Unusable(fields, _) => Some(fields),
            State::Deleted => None,
        }
    }
}

#[derive(Debug, Clone)]
struct DefaultEntry {
    version: Version,
    hash: u64,
    plan: Option<Box<str>>,
}

/// A node's catch-up summary: its clock and one hash per bucket (plus the default).
/// Two registries hold the same entries exactly when their summaries' hashes are equal
/// (up to 64-bit hash collisions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub clock: u64,
    /// The default register's entry hash (0 if it was never set).
    pub default: u64,
    pub buckets: [u64; BUCKETS],
}

impl Summary {
    /// One hash of the whole registry state (stamps and tombstones included; the clock
    /// not): equal on two nodes that hold the same entries.
    pub fn digest(&self) -> u64 {
        let mut w = Writer::new();
        w.varint(self.default);
        for b in &self.buckets {
            w.varint(*b);
        }
        stable_hash(&w.buf)
    }
}

/// What a node asks a peer for: the default register and a set of buckets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Want {
    pub default: bool,
    /// Bit `i` asks for bucket `i`.
    pub buckets: u64,
}

impl Want {
    pub fn is_empty(&self) -> bool {
        !self.default && self.buckets == 0
    }

    pub fn has_bucket(&self, bucket: usize) -> bool {
        bucket < BUCKETS && self.buckets & (1 << bucket) != 0
    }

    /// Everything (what a node that knows nothing would ask for).
    pub fn all() -> Want {
        Want {
            default: true,
            buckets: u64::MAX,
        }
    }
}

/// All plans of a node, plus the default plan, as a convergent replicated registry.
#[derive(Debug, Clone)]
pub struct Plans {
    /// Live, unusable and deleted plans by name.
    entries: HashMap<Box<str>, Entry>,
    usable: usize,
    tombstones: usize,
    /// No greater than the oldest tombstone's counter (`u64::MAX` when there are none).
    oldest_tombstone: u64,
    default: Option<DefaultEntry>,
    /// The largest stamp counter seen or made; never goes down.
    clock: u64,
    /// Per bucket, the wrapping sum of its entries' hashes.
    buckets: [u64; BUCKETS],
}

impl Default for Plans {
    fn default() -> Self {
        Plans {
            entries: HashMap::new(),
            usable: 0,
            tombstones: 0,
            oldest_tombstone: u64::MAX,
            default: None,
            clock: 0,
            buckets: [0; BUCKETS],
        }
    }
}

fn plan_error(plan: &str, message: impl Into<String>) -> PlanError {
    PlanError {
        plan: plan.into(),
        field: None,
        message: message.into(),
    }
}

/// Whether a tombstone stamped `counter` is past its retention at `now_ms`.
fn expired(counter: u64, now_ms: u64) -> bool {
    counter.saturating_add(TOMBSTONE_RETENTION_MS) < now_ms
}

impl Plans {
    pub fn new() -> Self {
        Self::default()
    }

    /// A usable plan by name.
    pub fn get(&self, name: &str) -> Option<&Arc<Plan>> {
        match self.entries.get(name).map(|e| &e.state) {
            Some(State::Live(plan)) => Some(plan),
            _ => None,
        }
    }

    /// Whether `name` was deleted (its tombstone is still remembered).
    pub fn is_deleted(&self, name: &str) -> bool {
        matches!(
            self.entries.get(name).map(|e| &e.state),
            Some(State::Deleted)
        )
    }

    /// How many usable plans there are.
    pub fn len(&self) -> usize {
        self.usable
    }

    pub fn is_empty(&self) -> bool {
        self.usable == 0
    }

    /// The registry clock: the newest stamp counter seen or made. It never goes down;
    /// converged nodes report the same.
    pub fn version(&self) -> u64 {
        self.clock
    }

    /// The stamp counter of the newest change held (plans, tombstones and the default):
    /// on a node that stamps with its wall clock, when the last change was made, in ms
    /// since the epoch. Equal on nodes that hold the same registry (unlike
    /// [`Plans::version`], which also counts what was seen and since replaced or pruned).
    pub fn newest(&self) -> u64 {
        self.entries
            .values()
            .map(|e| e.version.stamp.counter)
            .chain(self.default.iter().map(|d| d.version.stamp.counter))
            .max()
            .unwrap_or(0)
    }

    pub fn default_plan(&self) -> Option<&str> {
        self.default.as_ref().and_then(|d| d.plan.as_deref())
    }

    /// Names of all usable plans, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Live(_)))
            .map(|(k, _)| &**k)
            .collect();
        names.sort_unstable();
        names
    }

    /// How many deleted plans are remembered.
    pub fn tombstones(&self) -> usize {
        self.tombstones
    }

    /// Plans held but not usable by this build, with why, sorted by name.
    pub fn unusable(&self) -> Vec<(&str, &PlanError)> {
        let mut list: Vec<(&str, &PlanError)> = self
            .entries
            .iter()
            .filter_map(|(name, e)| match &e.state {
                State::Unusable(_, error) => Some((&**name, error)),
                _ => None,
            })
            .collect();
        list.sort_unstable_by_key(|(name, _)| *name);
        list
    }

    /// The version of a plan's register (a live plan or a tombstone).
    pub fn plan_version(&self, name: &str) -> Option<&Version> {
        self.entries.get(name).map(|e| &e.version)
    }

    /// The version of the default-plan register.
    pub fn default_version(&self) -> Option<&Version> {
        self.default.as_ref().map(|d| &d.version)
    }

    /// Sets fields like `HSET`: returns how many fields are new.
    pub fn set(
        &mut self,
        name: &str,
        pairs: &[(&str, &str)],
        interner: &mut LayoutInterner,
    ) -> Result<usize, PlanError> {
        self.set_by(Author::LOCAL, name, pairs, interner)
            .map(|(added, _)| added)
    }

    /// Sets fields like `HSET`, made by `author`: returns how many fields are new and the
    /// change to send to other nodes.
    pub fn set_by(
        &mut self,
        author: Author<'_>,
        name: &str,
        pairs: &[(&str, &str)],
        interner: &mut LayoutInterner,
    ) -> Result<(usize, Change), PlanError> {
        let existing = self.entries.get(name).and_then(Entry::fields);
        let exists = existing.is_some();
        let mut fields: Fields = existing.map(<[_]>::to_vec).unwrap_or_default();
        let mut added = 0;
        for &(field, value) in pairs {
            match fields.iter_mut().find(|(f, _)| same_field(f, field)) {
                Some((f, v)) => {
                    *f = field.into();
                    *v = value.into();
                }
                None => {
                    fields.push((field.into(), value.into()));
                    added += 1;
                }
            }
        }
        if !exists && self.entries.len() - self.tombstones >= MAX_PLANS {
            return Err(plan_error(
                name,
                format!("cannot add a plan: the server already holds {MAX_PLANS}"),
            ));
        }
        let plan = Plan::compile(name, fields, interner)?;
        crate::plan::check_units(&plan)?;
        self.check_no_cycle(&plan)?;
        self.check_fallback_units(&plan)?;
        let stamp = self.next_stamp(author, name)?;
        let change = Change::Plan {
            name: name.into(),
            stamp,
            fields: Some(plan.fields().to_vec()),
        };
        self.install(&change, State::Live(Arc::new(plan)));
        Ok((added, change))
    }

    /// Deletes a whole plan (no fields given) or some of its fields, like `DEL`/`HDEL`.
    /// A plan left without fields is deleted. Returns how many plans or fields went.
    pub fn delete(
        &mut self,
        name: &str,
        fields: &[&str],
        interner: &mut LayoutInterner,
    ) -> Result<usize, PlanError> {
        self.delete_by(Author::LOCAL, name, fields, interner)
            .map(|(removed, _)| removed)
    }

    /// [`Plans::delete`] made by `author`; also returns the change to send (none if
    /// nothing was removed).
    pub fn delete_by(
        &mut self,
        author: Author<'_>,
        name: &str,
        fields: &[&str],
        interner: &mut LayoutInterner,
    ) -> Result<(usize, Option<Change>), PlanError> {
        let Some(current) = self.entries.get(name).and_then(Entry::fields) else {
            return Ok((0, None));
        };
        let kept: Fields = current
            .iter()
            .filter(|(f, _)| !fields.iter().any(|g| same_field(f, g)))
            .cloned()
            .collect();
        let removed = if fields.is_empty() {
            1
        } else {
            current.len() - kept.len()
        };
        if removed == 0 {
            return Ok((0, None));
        }
        if fields.is_empty() || kept.is_empty() {
            if self.default_plan() == Some(name) {
                // `*` would resolve to nothing: the default must move first.
                return Err(plan_error(
                    name,
                    "is the default plan: set another default (RL.PLAN.DEFAULT) first",
                ));
            }
            let stamp = self.next_stamp(author, name)?;
            let change = Change::Plan {
                name: name.into(),
                stamp,
                fields: None,
            };
            self.install(&change, State::Deleted);
            return Ok((removed, Some(change)));
        }
        let plan = Plan::compile(name, kept, interner)?;
        self.check_no_cycle(&plan)?;
        let stamp = self.next_stamp(author, name)?;
        let change = Change::Plan {
            name: name.into(),
            stamp,
            fields: Some(plan.fields().to_vec()),
        };
        self.install(&change, State::Live(Arc::new(plan)));
        Ok((removed, Some(change)))
    }

    /// Sets (or clears) the default plan. The plan need not exist yet; `*` resolves
    /// to nothing while it does not.
    pub fn set_default(&mut self, name: Option<&str>) -> Result<(), PlanError> {
        self.set_default_by(Author::LOCAL, name).map(|_| ())
    }

    /// [`Plans::set_default`] made by `author`; returns the change to send.
    pub fn set_default_by(
        &mut self,
        author: Author<'_>,
        name: Option<&str>,
    ) -> Result<Change, PlanError> {
        if let Some(name) = name {
            if !is_valid_name(name) || name == "*" {
                return Err(plan_error(name, "is not a valid plan name"));
            }
        }
        let stamp = self.next_stamp(author, name.unwrap_or("*"))?;
        let change = Change::Default {
            stamp,
            plan: name.map(Into::into),
        };
        self.install_default(&change);
        Ok(change)
    }

    /// The stamp of a new local change: newer than everything seen, and not behind the
    /// author's wall clock. Commits nothing (the clock moves when the change is installed).
    fn next_stamp(&self, author: Author<'_>, plan: &str) -> Result<Stamp, PlanError> {
        let counter = self
            .clock
            .checked_add(1)
            .ok_or_else(|| plan_error(plan, "the plan clock is exhausted"))?
            .max(author.now_ms);
        Ok(Stamp {
            counter,
            origin: author.origin.into(),
        })
    }

    /// Merges a change made elsewhere (or replayed): it replaces its register only if its
    /// version is greater. Never fails. `now_ms` only decides whether a deletion is past
    /// the tombstone retention (then it still removes an older plan, but leaves no
    /// tombstone); pass 0 to keep every tombstone.
    pub fn merge(&mut self, change: &Change, now_ms: u64, interner: &mut LayoutInterner) -> Merged {
        self.clock = self.clock.max(change.stamp().counter);
        let version = change.version();
        match change {
            Change::Default { .. } => {
                if self.default.as_ref().is_some_and(|d| version <= d.version) {
                    return Merged::Stale;
                }
                self.install_default(change);
                Merged::Applied
            }
            Change::Plan {
                name,
                stamp,
                fields,
            } => {
                if self
                    .entries
                    .get(&**name)
                    .is_some_and(|e| version <= e.version)
                {
                    return Merged::Stale;
                }
                match fields {
                    None if expired(stamp.counter, now_ms) => match self.remove(name) {
                        true => Merged::Applied,
                        false => Merged::Stale,
                    },
                    None => {
                        self.install(change, State::Deleted);
                        Merged::Applied
                    }
                    Some(fields) => match Plan::compile(name, fields.clone(), interner) {
                        Ok(plan) => {
                            self.install(change, State::Live(Arc::new(plan)));
                            Merged::Applied
                        }
                        Err(error) => {
                            self.install(change, State::Unusable(fields.clone(), error.clone()));
                            Merged::Unusable(error)
                        }
                    },
                }
            }
        }
    }

    fn install_default(&mut self, change: &Change) {
        if let Change::Default { stamp, plan } = change {
            self.clock = self.clock.max(stamp.counter);
            self.default = Some(DefaultEntry {
                version: change.version(),
                hash: change.entry_hash(),
                plan: plan.clone(),
            });
        }
    }

    /// Stores a plan change's entry (the caller checked it is newer), keeping the counts
    /// and bucket sums.
    fn install(&mut self, change: &Change, state: State) {
        let Change::Plan { name, stamp, .. } = change else {
            return;
        };
        self.clock = self.clock.max(stamp.counter);
        self.remove(name);
        let entry = Entry {
            version: change.version(),
            hash: change.entry_hash(),
            state,
        };
        match entry.state {
            State::Live(_) => self.usable += 1,
            State::Deleted => {
                self.tombstones += 1;
                self.oldest_tombstone = self.oldest_tombstone.min(stamp.counter);
            }
            State::Unusable(..) => {}
        }
        if let Some(sum) = self.buckets.get_mut(bucket_of(name)) {
            *sum = sum.wrapping_add(entry.hash);
        }
        self.entries.insert(name.clone(), entry);
    }

    /// Forgets a plan's entry entirely. Returns whether there was one.
    fn remove(&mut self, name: &str) -> bool {
        let Some(old) = self.entries.remove(name) else {
            return false;
        };
        match old.state {
            State::Live(_) => self.usable -= 1,
            State::Deleted => self.tombstones -= 1,
            State::Unusable(..) => {}
        }
        if let Some(sum) = self.buckets.get_mut(bucket_of(name)) {
            *sum = sum.wrapping_sub(old.hash);
        }
        true
    }

    /// Drops tombstones past their retention at `now_ms`, then the oldest past
    /// [`MAX_TOMBSTONES`]. Returns how many went. Cheap when there is nothing to drop.
    pub fn prune(&mut self, now_ms: u64) -> usize {
        if self.tombstones == 0
            || (self.tombstones <= MAX_TOMBSTONES && !expired(self.oldest_tombstone, now_ms))
        {
            return 0;
        }
        let mut dead: Vec<(u64, Box<str>)> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Deleted))
            .map(|(name, e)| (e.version.stamp.counter, name.clone()))
            .collect();
        dead.sort_unstable();
        let over = dead.len().saturating_sub(MAX_TOMBSTONES);
        let mut pruned = 0;
        for (i, (counter, name)) in dead.iter().enumerate() {
            if i < over || expired(*counter, now_ms) {
                self.remove(name);
                pruned += 1;
            } else {
                break;
            }
        }
        self.oldest_tombstone = dead.get(pruned).map_or(u64::MAX, |(counter, _)| *counter);
        pruned
    }

    /// The plan a call names: `*` is the subject's `assigned` plan, else the default.
    pub fn resolve<'a>(
        &'a self,
        name: &'a str,
        assigned: Option<&'a str>,
    ) -> Result<&'a Arc<Plan>, crate::plan::ResolveError<'a>> {
        use crate::plan::ResolveError;
        if name != "*" {
            return self.get(name).ok_or(ResolveError::Unknown(name));
        }
        let (resolved, by_assignment) = match (assigned, self.default_plan()) {
            (Some(plan), _) => (plan, true),
            (None, Some(plan)) => (plan, false),
            (None, None) => return Err(ResolveError::NothingForStar),
        };
        self.get(resolved).ok_or(ResolveError::Dangling {
            name: resolved,
            assigned: by_assignment,
        })
    }

    /// The plans a chain starting at `start` visits, with `candidate` in place of the
    /// registered plan of its name.
    fn chain<'a>(&'a self, start: &'a Plan, candidate: &'a Plan) -> Vec<&'a Plan> {
        let mut chain = vec![start];
        let mut next = start.fallback.as_deref();
        while let Some(name) = next {
            if chain.len() > crate::decide::MAX_FALLBACK_DEPTH {
                break;
            }
            let plan = if name == &*candidate.name {
                Some(candidate)
            } else {
                self.get(name).map(|p| &**p)
            };
            let Some(plan) = plan else { break };
            if chain.iter().any(|p| p.name == plan.name) {
                break;
            }
            chain.push(plan);
            next = plan.fallback.as_deref();
        }
        chain
    }

    /// Why a fallback chain through plan `name` counts one limit name in two units, if
    /// it does (only concurrent changes on two primaries can make one: calls stop
    /// following fallbacks where it happens).
    pub fn fallback_unit_conflict(&self, name: &str) -> Option<PlanError> {
        let plan = self.get(name)?;
        self.check_fallback_units(plan).err()
    }

    /// Refuses `candidate` if a fallback chain through it (with it in place) would
    /// count one limit name in two units: a fallback must never open a second budget
    /// of the same name, nor charge it in another unit. O(plans with a fallback).
    fn check_fallback_units(&self, candidate: &Plan) -> Result<(), PlanError> {
        // Only plans with a fallback start chains (sorted: the same error every time).
        let mut others: Vec<&Plan> = self
            .entries
            .values()
            .filter_map(|e| match &e.state {
                State::Live(p) if p.fallback.is_some() && p.name != candidate.name => Some(&**p),
                _ => None,
            })
            .collect();
        others.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let starts = std::iter::once(candidate).chain(others);
        for start in starts {
            let chain = self.chain(start, candidate);
            if !chain.iter().any(|p| p.name == candidate.name) {
                continue;
            }
            for (i, a) in chain.iter().enumerate() {
                for b in chain.iter().skip(i + 1) {
                    for limit in &a.limits {
                        if let Some(other) = b
                            .limits
                            .iter()
                            .find(|l| l.name == limit.name && l.spec.unit != limit.spec.unit)
                        {
                            return Err(PlanError {
                                plan: candidate.name.to_string(),
                                field: Some("fallback".into()),
                                message: format!(
                                    "limit '{}' counts {} in plan '{}' but {} in its fallback '{}': \
                                     one limit name is one budget; rename one of them",
                                    limit.name, limit.spec.unit, a.name, other.spec.unit, b.name
                                ),
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Refuses `candidate` if following fallbacks from it (with it in place) loops.
    fn check_no_cycle(&self, candidate: &Plan) -> Result<(), PlanError> {
        let mut seen: Vec<&str> = vec![&candidate.name];
        let mut next = candidate.fallback.as_deref();
        while let Some(name) = next {
            if seen.contains(&name) {
                seen.push(name);
                return Err(PlanError {
                    plan: candidate.name.to_string(),
                    field: Some("fallback".into()),
                    message: format!("fallback chain would loop: {}", seen.join(" -> ")),
                });
            }
            seen.push(name);
            next = if name == &*candidate.name {
                candidate.fallback.as_deref()
            } else {
                self.get(name).and_then(|p| p.fallback.as_deref())
            };
        }
        Ok(())
    }

    /// The loop that following fallbacks from `name` runs into, if any: the plans on it,
    /// starting from the first one met again.
    pub fn fallback_loop(&self, name: &str) -> Option<Vec<&str>> {
        let mut seen: Vec<&str> = Vec::new();
        let mut next = self.get(name).map(|p| &*p.name);
        while let Some(current) = next {
            if let Some(at) = seen.iter().position(|s| *s == current) {
                return Some(seen.split_off(at));
            }
            seen.push(current);
            next = self.get(current).and_then(|p| p.fallback.as_deref());
        }
        None
    }

    /// How many plans lie on a fallback loop (which only merges of concurrent changes
    /// can make). O(plans).
    pub fn fallback_loops(&self) -> usize {
        // Each plan has at most one fallback: walk each chain once, colouring plans by
        // the walk that reached them; a walk that meets its own colour found a loop.
        let mut colour: HashMap<&str, usize> = HashMap::new();
        let mut on_loops = 0;
        for (walk, start) in self.names().into_iter().enumerate() {
            let mut path: Vec<&str> = Vec::new();
            let mut next = Some(start);
            while let Some(current) = next {
                match colour.get(current) {
                    Some(&c) if c == walk => {
                        let at = path.iter().position(|p| *p == current).unwrap_or(0);
                        on_loops += path.len() - at;
                        break;
                    }
                    Some(_) => break,
                    None => {}
                }
                colour.insert(current, walk);
                path.push(current);
                next = self
                    .get(current)
                    .and_then(|p| p.fallback.as_deref())
                    .filter(|f| self.get(f).is_some());
            }
        }
        on_loops
    }

    /// The catch-up summary of this registry.
    pub fn summary(&self) -> Summary {
        Summary {
            clock: self.clock,
            default: self.default.as_ref().map_or(0, |d| d.hash),
            buckets: self.buckets,
        }
    }

    /// One hash of the registry's state, versions and tombstones included (see
    /// [`Summary::digest`]); [`Plans::digest`] covers the content only.
    pub fn sync_digest(&self) -> u64 {
        self.summary().digest()
    }

    /// What to ask a peer for, given its summary: the default register and the buckets
    /// whose hashes differ (`None` when the registries agree).
    pub fn wanted(&self, theirs: &Summary) -> Option<Want> {
        let ours = self.summary();
        let mut want = Want {
            default: ours.default != theirs.default,
            buckets: 0,
        };
        for (i, (a, b)) in ours.buckets.iter().zip(&theirs.buckets).enumerate() {
            if a != b {
                want.buckets |= 1 << i;
            }
        }
        (!want.is_empty()).then_some(want)
    }

    /// The changes that rebuild the entries `want` names: the default first, then each
    /// wanted bucket's entries, by bucket and name.
    pub fn changes(&self, want: &Want) -> Vec<(Option<usize>, Change)> {
        let mut out = Vec::new();
        if want.default {
            if let Some(d) = &self.default {
                out.push((
                    None,
                    Change::Default {
                        stamp: d.version.stamp.clone(),
                        plan: d.plan.clone(),
                    },
                ));
            }
        }
        let mut plans: Vec<(usize, &str, &Entry)> = self
            .entries
            .iter()
            .map(|(name, e)| (bucket_of(name), &**name, e))
            .filter(|(bucket, _, _)| want.has_bucket(*bucket))
            .collect();
        plans.sort_unstable_by_key(|(bucket, name, _)| (*bucket, *name));
        for (bucket, name, e) in plans {
            out.push((
                Some(bucket),
                Change::Plan {
                    name: name.into(),
                    stamp: e.version.stamp.clone(),
                    fields: e.fields().map(<[_]>::to_vec),
                },
            ));
        }
        out
    }

    /// Encodes the registry (RDB aux data, encoding 2): the clock, then every entry as a
    /// change — the default first, then plans and tombstones by name.
    pub fn encode(&self, w: &mut Writer) {
        w.varint(self.clock);
        let mut names: Vec<&Box<str>> = self.entries.keys().collect();
        names.sort_unstable();
        w.varint((names.len() + usize::from(self.default.is_some())) as u64);
        if let Some(d) = &self.default {
            write_default(w, &d.version.stamp, d.plan.as_deref());
        }
        for name in names {
            if let Some(e) = self.entries.get(name) {
                write_plan(w, name, &e.version.stamp, e.fields());
            }
        }
    }

    /// Decodes a registry written by [`Plans::encode`]. Plans this build cannot compile
    /// are kept as unusable (see [`Plans::unusable`]) rather than failing the load.
    pub fn decode(r: &mut Reader<'_>, interner: &mut LayoutInterner) -> Result<Plans, DecodeError> {
        let clock = r.varint()?;
        let n = r.count(MAX_ENTRIES)?;
        let mut plans = Plans::new();
        for _ in 0..n {
            let change = Change::decode(r)?;
            plans.merge(&change, 0, interner);
        }
        plans.clock = plans.clock.max(clock);
        Ok(plans)
    }

    /// Decodes the encoding-1 registry (no stamps, no tombstones): every plan and the
    /// default get the zero stamp, older than any change made since, and the old change
    /// count becomes the clock.
    pub fn decode_v1(
        r: &mut Reader<'_>,
        interner: &mut LayoutInterner,
    ) -> Result<Plans, DecodeError> {
        let version = r.varint()?;
        let default = match r.u8()? {
            0 => None,
            1 => Some(r.str()?),
            t => return bad(format!("bad default-plan tag {t}")),
        };
        let n = r.count(MAX_PLANS)?;
        let mut plans = Plans::new();
        if let Some(plan) = default {
            plans.merge(
                &Change::Default {
                    stamp: Stamp::default(),
                    plan: Some(plan.into()),
                },
                0,
                interner,
            );
        }
        for _ in 0..n {
            let name = r.str()?;
            let nfields = r.count(MAX_FIELDS)?;
            let mut fields = Vec::with_capacity(nfields);
            for _ in 0..nfields {
                fields.push((Box::<str>::from(r.str()?), Box::<str>::from(r.str()?)));
            }
            plans.merge(
                &Change::Plan {
                    name: name.into(),
                    stamp: Stamp::default(),
                    fields: Some(fields),
                },
                0,
                interner,
            );
        }
        plans.clock = plans.clock.max(version);
        Ok(plans)
    }

    /// A digest of the plan set's content — usable plans, their fields (in name order)
    /// and the default, not versions or tombstones: equal on two nodes exactly when they
    /// hold the same plans, whatever order the fields were set in. FNV-1a. The CLI
    /// computes the same from a plans file.
    pub fn digest(&self) -> u64 {
        let mut w = Writer::new();
        w.str(self.default_plan().unwrap_or(""));
        for name in self.names() {
            if let Some(plan) = self.get(name) {
                w.str(name);
                let mut fields: Vec<&(Box<str>, Box<str>)> = plan.fields().iter().collect();
                fields.sort();
                w.varint(fields.len() as u64);
                for (f, v) in fields {
                    w.str(f);
                    w.str(v);
                }
            }
        }
        fnv1a(&w.buf)
    }
}

#[cfg(test)]
mod tests;
