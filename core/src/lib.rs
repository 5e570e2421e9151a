//! Tollgate's pure core: plan specs, windows, token buckets, leases and credits, with
//! an injected clock and integer arithmetic only. Nothing here knows about Redis; the
//! module crate turns commands into calls of these functions and stores the results.
//!
//! Vocabulary (used the same way in every file and in the docs):
//! - **subject**: whoever is metered; its state is one [`subject::Subject`].
//! - **plan**: a named set of **limits** ([`plan::Plan`]); a limit has a **rule**
//!   ([`spec::Rule`]) and counts one **unit**.
//! - **slot**: the counter a limit keeps on a subject, identified by limit name, unit
//!   and shape; limits of the same name share a slot ([`layout`]).
//! - **capacity**, **used**, **remaining**, **retry after**, **reset**: see [`limits`].
//! - **window**: a fixed, aligned period ([`time::FixedWindow`]) or the trailing
//!   period of a sliding limit, cut into **slices** ([`limits::sliding`]).
//! - **debt**: how far a token bucket is below full ([`limits::bucket`]).
//! - **lease**, **reservation**, **request**: see [`requests`].
//! - **stamp**, **version**, **tombstone**: how plan changes are ordered and deletions
//!   remembered so that every node converges, see [`registry`] and [`plansync`].

pub mod change;
pub mod codec;
pub mod credits;
pub mod decide;
pub mod delta;
pub mod keyslot;
pub mod layout;
pub mod limits;
pub mod mem;
pub mod plan;
pub mod plansync;
pub mod queue;
pub mod registry;
pub mod requests;
pub mod spec;
pub mod subject;
pub mod throttle;
pub mod time;
