//! Integration tests against real servers (see `harness`). Run by `make test`, once
//! against `redis-server` and, where installed, once against `valkey-server`.

// Test code: a failed expectation is a failed test.
#![allow(
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used
)]

mod harness;

mod acquire;
mod budget;
mod cli;
mod clients;
mod cluster;
mod credits;
mod fuzz;
mod hierarchy;
mod hierarchy_edges;
mod leases;
mod operating;
mod persistence;
mod plans;
mod plansync;
mod readme;
mod replication;
mod robustness;
mod safety;
mod throttle;
mod waits;
