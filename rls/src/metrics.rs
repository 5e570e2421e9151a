//! Prometheus metrics and the small HTTP server that serves them (`/metrics`, and
//! `/healthcheck` like envoyproxy/ratelimit's HTTP port).
//!
//! What must always hold: cardinality is bounded — labels are the domain and the
//! configured rule key (no runtime values) unless a rule asks for `detailed_metric`
//! or `value_to_metric`, and even then at most `max_detailed_series` distinct keys
//! are created; past that, hits roll up under the rule's configured key.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric of the service.
pub struct Metrics {
    pub registry: Registry,
    pub total_hits: IntCounterVec,
    pub over_limit: IntCounterVec,
    pub near_limit: IntCounterVec,
    pub within_limit: IntCounterVec,
    pub shadow_mode: IntCounterVec,
    pub errors: IntCounterVec,
    pub failure_mode: IntCounterVec,
    pub global_shadow_mode: IntCounter,
    pub config_load_success: IntCounter,
    pub config_load_error: IntCounter,
    pub refunds_unmatched: IntCounter,
    pub leases_without_request_id: IntCounter,
    pub override_plans: IntGauge,
    pub override_plans_refused: IntCounter,
    pub response_time: Histogram,
    detailed: Mutex<HashSet<(String, String)>>,
    max_detailed_series: usize,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable_metric(name, &e));
    let _ = registry.register(Box::new(c.clone()));
    c
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| unreachable_metric(name, &e));
    let _ = registry.register(Box::new(c.clone()));
    c
}

#[allow(clippy::panic)]
fn unreachable_metric<T>(name: &str, e: &prometheus::Error) -> T {
    // Metric names and labels are constants of this file: an error is a bug here.
    panic!("metric {name}: {e}")
}

impl Metrics {
    pub fn new(max_detailed_series: usize) -> Arc<Metrics> {
        let r = Registry::new();
        let l = &["domain", "key"];
        let response_time = Histogram::with_opts(
            HistogramOpts::new(
                "ratelimit_service_response_time_seconds",
                "ShouldRateLimit latency, seconds",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
        )
        .unwrap_or_else(|e| unreachable_metric("response_time", &e));
        let _ = r.register(Box::new(response_time.clone()));
        Arc::new(Metrics {
            total_hits: counter_vec(
                &r,
                "ratelimit_service_rate_limit_total_hits",
                "hits per rule",
                l,
            ),
            over_limit: counter_vec(
                &r,
                "ratelimit_service_rate_limit_over_limit",
                "hits over the limit per rule",
                l,
            ),
            near_limit: counter_vec(
                &r,
                "ratelimit_service_rate_limit_near_limit",
                "hits past 80% of the limit per rule",
                l,
            ),
            within_limit: counter_vec(
                &r,
                "ratelimit_service_rate_limit_within_limit",
                "hits within the limit per rule",
                l,
            ),
            shadow_mode: counter_vec(
                &r,
                "ratelimit_service_rate_limit_shadow_mode",
                "hits a shadow-mode rule let through over its limit",
                l,
            ),
            errors: counter_vec(
                &r,
                "ratelimit_service_should_rate_limit_error",
                "failed ShouldRateLimit calls by cause",
                &["err_type"],
            ),
            failure_mode: counter_vec(
                &r,
                "tollgate_rls_failure_mode_total",
                "answers given by the failure mode while Redis failed",
                &["answer"],
            ),
            global_shadow_mode: counter(
                &r,
                "ratelimit_service_global_shadow_mode",
                "OVER_LIMIT answers turned OK by --shadow-mode",
            ),
            config_load_success: counter(
                &r,
                "ratelimit_service_config_load_success",
                "config loads that succeeded",
            ),
            config_load_error: counter(
                &r,
                "ratelimit_service_config_load_error",
                "config loads refused (the last good config stays)",
            ),
            refunds_unmatched: counter(
                &r,
                "tollgate_rls_refunds_without_reservation_total",
                "is_negative_hits descriptors with no reservation to refund",
            ),
            leases_without_request_id: counter(
                &r,
                "tollgate_rls_leases_without_request_id_total",
                "request-path calls that took a lease without a request id (held until its TTL)",
            ),
            override_plans: {
                let name = "tollgate_rls_override_plans";
                let g = IntGauge::new(
                    name,
                    "plans made for descriptor limit overrides (at most --max-override-plans)",
                )
                .unwrap_or_else(|e| unreachable_metric(name, &e));
                let _ = r.register(Box::new(g.clone()));
                g
            },
            override_plans_refused: counter(
                &r,
                "tollgate_rls_override_plans_refused_total",
                "requests denied because their limit override would pass --max-override-plans",
            ),
            response_time,
            registry: r,
            detailed: Mutex::new(HashSet::new()),
            max_detailed_series,
        })
    }

    /// The metric key to use: `detailed` when it is the rule's own key or a detailed
    /// series may still be created, else the rule's configured key.
    pub fn key<'a>(
        &self,
        domain: &str,
        detailed: &'a str,
        rolled_up: &'a str,
        is_detailed: bool,
    ) -> &'a str {
        if !is_detailed || detailed == rolled_up {
            return rolled_up;
        }
        let Ok(mut seen) = self.detailed.lock() else {
            return rolled_up;
        };
        let id = (domain.to_string(), detailed.to_string());
        if seen.contains(&id) {
            return detailed;
        }
        if seen.len() >= self.max_detailed_series {
            return rolled_up;
        }
        seen.insert(id);
        detailed
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// Serves `/metrics` and `/healthcheck` until `shutdown` fires. `healthy` says
/// whether the service is serving (a config is loaded and it is not draining).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    healthy: Arc<dyn Fn() -> bool + Send + Sync>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = shutdown.changed() => return Ok(()),
        };
        let metrics = metrics.clone();
        let healthy = healthy.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                let healthy = healthy.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/metrics" => (200, metrics.render()),
                        "/healthcheck" if healthy() => (200, b"OK".to_vec()),
                        "/healthcheck" => (500, b"not serving".to_vec()),
                        _ => (404, b"not found".to_vec()),
                    };
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = hyper::StatusCode::from_u16(status)
                        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}
