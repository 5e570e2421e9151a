//! `tollgate-rls`: Envoy's rate limit service API (`envoy.service.ratelimit.v3`)
//! backed by the Tollgate module. The binary (`src/main.rs`) wires these together;
//! the modules are public so the tests and the benchmark can use the generated
//! client and the config loader.

pub mod backend;
pub mod config;
pub mod metrics;
pub mod proto;
pub mod reply;
pub mod service;
pub mod window;
