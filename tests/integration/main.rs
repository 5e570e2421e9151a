//! Integration tests against real servers (see `harness`). Run by `make test`, once
//! against `redis-server` and, where installed, once against `valkey-server`.

mod harness;

mod acquire;
mod persistence;
mod plans;
mod replication;
mod robustness;
mod throttle;
