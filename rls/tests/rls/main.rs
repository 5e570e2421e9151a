//! `tollgate-rls` end to end (see `harness`): a gRPC client generated from the same
//! Envoy protos drives the binary against real redis-server processes with the
//! module built from this source, standalone and as a 3+3 cluster.

// Test code: a failed expectation is a failed test.
#![allow(
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used
)]

mod harness;

mod algorithms;
mod basics;
mod cluster;
mod observability;
mod ops;
mod semantics;
