//! The plan-sync protocol: the messages nodes of a cluster send each other so that a
//! plan change made on any primary reaches every node, and nodes that were down or
//! joined later catch up. The module carries them over the cluster bus; the replication
//! stream and the AOF carry the same [`Message::Changes`] payload in `RL.PLAN.MERGE`.
//!
//! The exchange, all of it idempotent (see [`crate::registry`] for why merging in any
//! order converges):
//! - a primary that makes a change broadcasts it at once as [`Message::Changes`];
//! - every second each primary broadcasts its [`Message::Summary`]; a primary whose own
//!   summary differs asks that peer for the differing buckets ([`Message::Request`],
//!   at most one request a second), and the peer answers with their entries
//!   ([`respond`]): whole buckets, at most [`RESPONSE_BUDGET_BYTES`] per answer in
//!   messages of at most [`MAX_MESSAGE_BYTES`] (one entry larger than that travels
//!   alone). What did not fit is asked for again after the next summary.
//!
//! Every message starts with [`PROTOCOL`] and a kind byte; a node ignores a message of
//! another protocol version (and logs it), so a later version can change the format.

use crate::codec::{bad, DecodeError, Reader, Writer};
use crate::registry::{Change, Plans, Summary, Want, BUCKETS};

/// The protocol version every message starts with.
pub const PROTOCOL: u8 = 1;
/// Largest message [`pack`] and [`respond`] build (unless one entry alone is larger).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Most bytes one answer to a request carries (at least one whole bucket).
pub const RESPONSE_BUDGET_BYTES: usize = 1024 * 1024;

const KIND_CHANGES: u8 = 1;
const KIND_SUMMARY: u8 = 2;
const KIND_REQUEST: u8 = 3;

/// One message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Changes to merge (a local change as it is made, or entries a peer asked for).
    Changes(Vec<Change>),
    /// A node's catch-up summary (broadcast every second by primaries).
    Summary(Box<Summary>),
    /// Which entries a node wants from the peer it sends this to.
    Request(Want),
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(PROTOCOL);
        match self {
            Message::Changes(changes) => {
                w.u8(KIND_CHANGES);
                for change in changes {
                    change.encode(&mut w);
                }
            }
            Message::Summary(summary) => {
                w.u8(KIND_SUMMARY);
                w.varint(summary.clock);
                w.varint(summary.default);
                for b in &summary.buckets {
                    w.varint(*b);
                }
            }
            Message::Request(want) => {
                w.u8(KIND_REQUEST);
                w.u8(u8::from(want.default));
                w.varint(want.buckets);
            }
        }
        w.into_inner()
    }

    /// Decodes a message, refusing anything malformed, truncated or followed by junk.
    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        let mut r = Reader::new(bytes);
        let protocol = r.u8()?;
        if protocol != PROTOCOL {
            return bad(format!(
                "plan-sync protocol {protocol} (this build speaks {PROTOCOL})"
            ));
        }
        let message = match r.u8()? {
            KIND_CHANGES => {
                let mut changes = Vec::new();
                while !r.is_empty() {
                    changes.push(Change::decode(&mut r)?);
                }
                Message::Changes(changes)
            }
            KIND_SUMMARY => {
                let clock = r.varint()?;
                let default = r.varint()?;
                let mut buckets = [0; BUCKETS];
                for b in &mut buckets {
                    *b = r.varint()?;
                }
                Message::Summary(Box::new(Summary {
                    clock,
                    default,
                    buckets,
                }))
            }
            KIND_REQUEST => {
                let default = match r.u8()? {
                    0 => false,
                    1 => true,
                    t => return bad(format!("bad request flag {t}")),
                };
                Message::Request(Want {
                    default,
                    buckets: r.varint()?,
                })
            }
            k => return bad(format!("unknown plan-sync message kind {k}")),
        };
        r.finish()?;
        Ok(message)
    }
}

/// Packs changes into [`Message::Changes`] payloads of at most [`MAX_MESSAGE_BYTES`]
/// (a single change larger than that gets a message of its own), in order.
pub fn pack<'a>(changes: impl IntoIterator<Item = &'a Change>) -> Vec<Vec<u8>> {
    let header = Message::Changes(Vec::new()).encode();
    let mut out = Vec::new();
    let mut current = header.clone();
    for change in changes {
        let mut w = Writer::new();
        change.encode(&mut w);
        if current.len() > header.len() && current.len() + w.buf.len() > MAX_MESSAGE_BYTES {
            out.push(std::mem::replace(&mut current, header.clone()));
        }
        current.extend_from_slice(&w.buf);
    }
    if current.len() > header.len() {
        out.push(current);
    }
    out
}

/// The answer to a peer's request: the wanted entries of `plans`, whole buckets in
/// order until [`RESPONSE_BUDGET_BYTES`] is reached (at least one bucket), packed
/// into messages. Empty when there is nothing to send.
pub fn respond(plans: &Plans, want: &Want) -> Vec<Vec<u8>> {
    let changes = plans.changes(want);
    let mut chosen: Vec<&Change> = Vec::new();
    let mut bytes = 0;
    let mut last_bucket = None;
    for (bucket, change) in &changes {
        if bytes >= RESPONSE_BUDGET_BYTES && bucket.is_some() && *bucket != last_bucket {
            break;
        }
        let mut w = Writer::new();
        change.encode(&mut w);
        bytes += w.buf.len();
        last_bucket = *bucket;
        chosen.push(change);
    }
    pack(chosen)
}

#[cfg(test)]
mod tests;
