//! In-flight requests of one subject: leases (concurrency slots) and reservations
//! (what an `ID`'d acquire charged, so a release can settle it).
//!
//! Each request lives until it is released or its TTL passes. The table is indexed
//! both by id and by expiry, so purging what has expired costs O(log n) per purged
//! request (each is purged once) and no call ever scans the table. Both indexes are
//! ordered, so iteration — and therefore encoding and digests — is canonical.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::codec::{bad, DecodeError, Reader, Writer};
use crate::spec::is_valid_name;
use crate::time::{MAX_INSTANT_MS, MAX_WINDOW_MS};

/// Longest request id, in bytes.
pub const MAX_ID_LEN: usize = 256;
/// Most in-flight requests one subject may hold: the ceiling of
/// `tollgate.max-requests-per-key`, and what decoding accepts.
pub const MAX_REQUESTS: usize = 10_000_000;

/// Most keys one call may name besides its first (`ALSO count ...`): the ceiling of
/// `tollgate.max-also`.
pub const MAX_LINKS: usize = 64;
/// Longest key name a request may link to, in bytes.
pub const MAX_LINK_LEN: usize = 4_096;

/// What one limit was charged by a reservation, and where, so that settling can
/// reach the same window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// The slot charged (the subject's layout may have changed since: settling
    /// reaches it only while the subject counts that budget in the same shape).
    pub slot: crate::layout::Slot,
    pub amount: u64,
    /// Which window took the charge: the fixed window index, the sliding slice, or for
    /// a bucket the instant (rounded down) by which this charge has drained.
    pub marker: u64,
    /// For a bucket, its refund mark after the charge (see [`crate::limits::bucket`]).
    pub mark: u64,
}

/// One in-flight request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub expires_at: u64,
    /// The plan the request was admitted under.
    pub plan: Arc<str>,
    /// Concurrency slots this request holds a lease in.
    pub leases: Vec<Arc<str>>,
    /// What was charged (empty unless the acquire named an `ID`).
    pub charges: Vec<Charge>,
    /// The other keys the same call charged under the same id (`ALSO`), held by the
    /// call's first key only: releasing or touching it there reaches them too.
    pub links: Vec<Box<[u8]>>,
}

/// The requests of one subject.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requests {
    by_id: BTreeMap<Box<[u8]>, Request>,
    by_expiry: BTreeSet<(u64, Box<[u8]>)>,
}

impl Requests {
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn get(&self, id: &[u8]) -> Option<&Request> {
        self.by_id.get(id)
    }

    /// Adds a request; an existing one with the same id is replaced.
    pub fn insert(&mut self, id: &[u8], request: Request) {
        self.remove(id);
        self.by_expiry.insert((request.expires_at, id.into()));
        self.by_id.insert(id.into(), request);
    }

    pub fn remove(&mut self, id: &[u8]) -> Option<Request> {
        let request = self.by_id.remove(id)?;
        self.by_expiry.remove(&(request.expires_at, Box::from(id)));
        Some(request)
    }

    /// Moves a request's expiry; false if there is no such request.
    pub fn set_expiry(&mut self, id: &[u8], expires_at: u64) -> bool {
        let Some(request) = self.by_id.get_mut(id) else {
            return false;
        };
        self.by_expiry.remove(&(request.expires_at, Box::from(id)));
        request.expires_at = expires_at;
        self.by_expiry.insert((expires_at, id.into()));
        true
    }

    /// The first request that has expired at `now` (`expires_at <= now`), removed.
    pub fn pop_expired(&mut self, now: u64) -> Option<(Box<[u8]>, Request)> {
        let (expires_at, _) = self.by_expiry.first()?;
        if *expires_at > now {
            return None;
        }
        let (_, id) = self.by_expiry.pop_first()?;
        let request = self.by_id.remove(&id)?;
        Some((id, request))
    }

    /// Requests that have expired at `now` but are still in the table, soonest first.
    pub fn expired(&self, now: u64) -> impl Iterator<Item = &Request> + '_ {
        self.by_expiry
            .iter()
            .take_while(move |(at, _)| *at <= now)
            .filter_map(|(_, id)| self.by_id.get(id))
    }

    /// The latest expiry of any request.
    pub fn last_expiry(&self) -> Option<u64> {
        self.by_expiry.last().map(|(at, _)| *at)
    }

    /// The latest expiry among live requests holding a lease in `slot`. Scans from
    /// the latest expiry down and stops at the first match; used for `reset_ms` only.
    pub fn last_lease_expiry(&self, slot: &str, now: u64) -> Option<u64> {
        self.by_expiry
            .iter()
            .rev()
            .take_while(|(at, _)| *at > now)
            .find(|(_, id)| {
                self.by_id
                    .get(id)
                    .is_some_and(|r| r.leases.iter().any(|l| &**l == slot))
            })
            .map(|(at, _)| *at)
    }

    /// Requests in expiry order, soonest first.
    pub fn iter_by_expiry(&self) -> impl Iterator<Item = (u64, &Request)> + '_ {
        self.by_expiry
            .iter()
            .filter_map(|(at, id)| self.by_id.get(id).map(|r| (*at, r)))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Request)> {
        self.by_id.iter().map(|(id, r)| (&**id, r))
    }

    pub fn encode(&self, w: &mut Writer) {
        w.varint(self.by_id.len() as u64);
        for (id, request) in &self.by_id {
            encode_request(w, id, request);
        }
    }

    pub fn decode(r: &mut Reader<'_>, version: u8) -> Result<Requests, DecodeError> {
        let n = r.count(MAX_REQUESTS)?;
        let mut requests = Requests::default();
        for _ in 0..n {
            let (id, request) = decode_request(r, version)?;
            if requests.by_id.contains_key(id) {
                return bad("request id appears twice");
            }
            requests.insert(id, request);
        }
        Ok(requests)
    }
}

/// Encodes one request (also used to replicate a single insertion).
pub fn encode_request(w: &mut Writer, id: &[u8], request: &Request) {
    w.bytes(id);
    w.varint(request.expires_at);
    w.str(&request.plan);
    w.varint(request.leases.len() as u64);
    for lease in &request.leases {
        w.str(lease);
    }
    w.varint(request.charges.len() as u64);
    for charge in &request.charges {
        charge.slot.encode(w);
        w.varint(charge.amount);
        w.varint(charge.marker);
        w.varint(charge.mark);
    }
    w.varint(request.links.len() as u64);
    for link in &request.links {
        w.bytes(link);
    }
}

/// The latest instant a request may expire at: a TTL past the latest instant.
pub const MAX_EXPIRY_MS: u64 = MAX_INSTANT_MS + MAX_WINDOW_MS;

/// Reads one request of encoding `version` (1: no bucket marks, no links).
pub fn decode_request<'a>(
    r: &mut Reader<'a>,
    version: u8,
) -> Result<(&'a [u8], Request), DecodeError> {
    let id = r.bytes()?;
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return bad("request id length out of range");
    }
    let expires_at = r.varint()?;
    if expires_at > MAX_EXPIRY_MS {
        return bad("request expiry out of range");
    }
    let plan = r.str()?;
    let name = |r: &mut Reader<'_>| -> Result<Arc<str>, DecodeError> {
        let s = r.str()?;
        if is_valid_name(s) {
            Ok(Arc::from(s))
        } else {
            bad("invalid slot name in request")
        }
    };
    if !is_valid_name(plan) {
        return bad("invalid plan name in request");
    }
    let nleases = r.count(crate::layout::MAX_SLOTS)?;
    let mut leases = Vec::with_capacity(nleases);
    for _ in 0..nleases {
        leases.push(name(r)?);
    }
    let ncharges = r.count(crate::layout::MAX_SLOTS)?;
    let mut charges = Vec::with_capacity(ncharges);
    for _ in 0..ncharges {
        let slot = crate::layout::Slot::decode(r)?;
        charges.push(Charge {
            slot,
            amount: r.varint()?,
            marker: r.varint()?,
            mark: if version == 1 { 0 } else { r.varint()? },
        });
    }
    let mut links = Vec::new();
    if version != 1 {
        for _ in 0..r.count(MAX_LINKS)? {
            let link = r.bytes()?;
            if link.is_empty() || link.len() > MAX_LINK_LEN {
                return bad("linked key length out of range");
            }
            links.push(Box::from(link));
        }
    }
    Ok((
        id,
        Request {
            expires_at,
            plan: Arc::from(plan),
            leases,
            charges,
            links,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(expires_at: u64, lease: Option<&str>) -> Request {
        Request {
            expires_at,
            plan: Arc::from("p"),
            leases: lease.map(Arc::from).into_iter().collect(),
            charges: vec![Charge {
                slot: crate::layout::Slot {
                    name: Arc::from("rpm"),
                    unit: Arc::from("request"),
                    shape: crate::layout::Shape::Fixed {
                        window: crate::time::FixedWindow::new(crate::time::Span::Millis(60_000)),
                    },
                },
                amount: 3,
                marker: 9,
                mark: 1,
            }],
            links: vec![Box::from(&b"{org}:team"[..])],
        }
    }

    #[test]
    fn expired_requests_pop_in_expiry_order() {
        let mut t = Requests::default();
        t.insert(b"b", request(20, Some("jobs")));
        t.insert(b"a", request(10, None));
        t.insert(b"c", request(30, Some("jobs")));
        assert_eq!(t.expired(20).count(), 2);
        assert_eq!(t.pop_expired(5), None);
        assert_eq!(
            t.pop_expired(25).map(|(id, _)| id),
            Some(Box::from(&b"a"[..]))
        );
        assert_eq!(
            t.pop_expired(25).map(|(id, _)| id),
            Some(Box::from(&b"b"[..]))
        );
        assert_eq!(t.pop_expired(25), None);
        assert_eq!(t.len(), 1);
        assert_eq!(t.last_lease_expiry("jobs", 25), Some(30));
        assert_eq!(t.last_lease_expiry("jobs", 30), None);
    }

    #[test]
    fn expiry_moves_with_set_expiry_and_replacing() {
        let mut t = Requests::default();
        t.insert(b"a", request(10, Some("jobs")));
        assert!(t.set_expiry(b"a", 50));
        assert!(!t.set_expiry(b"zz", 50));
        assert_eq!(t.pop_expired(49), None);
        t.insert(b"a", request(5, None));
        assert_eq!(t.len(), 1);
        assert_eq!(t.last_expiry(), Some(5));
        assert!(t.remove(b"a").is_some());
        assert!(t.is_empty());
        assert_eq!(t.last_expiry(), None);
    }

    #[test]
    fn tables_round_trip_and_reject_truncation() {
        let mut t = Requests::default();
        t.insert(b"x-1", request(10, Some("jobs")));
        t.insert(b"x-2", request(11, None));
        let mut w = Writer::new();
        t.encode(&mut w);
        let buf = w.into_inner();
        assert_eq!(Requests::decode(&mut Reader::new(&buf), 2), Ok(t));
        for cut in 0..buf.len() {
            assert!(Requests::decode(&mut Reader::new(&buf[..cut]), 2).is_err());
        }
    }
}
