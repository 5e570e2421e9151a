//! Operations seen from outside: the Prometheus series a scrape of `/metrics` shows
//! (near/within limit, the latency histogram, bounded cardinality and the
//! `--max-detailed-series` cap), JSON logs, and the Redis connection pool.

use crate::harness::*;
use std::sync::Arc;

const METRICS: &str = r#"
domain: m
descriptors:
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 10}
  - key: api_key
    rate_limit: {unit: hour, requests_per_unit: 100}
    detailed_metric: true
"#;

fn series(name: &str, key: &str) -> String {
    format!(r#"ratelimit_service_rate_limit_{name}{{domain="m",key="{key}"}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_near_and_within_limit_time_every_call_and_cap_detailed_series() {
    let redis = Server::start();
    let rls = Rls::start(
        &redis.url(),
        METRICS,
        &["--max-detailed-series", "3", "--near-limit-ratio", "0.8"],
    );
    let mut c = rls.client().await;
    let mut calls = 0u64;

    // user: 10 per hour. Calls 1-10 are within the limit; 9 and 10 leave more than
    // 80% used (near limit); 11 and 12 are over.
    for i in 1..=12 {
        let r = ask(&mut c, request("m", vec![desc(&[("user", "alice")])])).await;
        calls += 1;
        assert_eq!(ok(&r), i <= 10, "call {i}: {r:?}");
    }
    assert_eq!(rls.metric(&series("total_hits", "user")), 12);
    assert_eq!(rls.metric(&series("within_limit", "user")), 10);
    assert_eq!(rls.metric(&series("near_limit", "user")), 2);
    assert_eq!(rls.metric(&series("over_limit", "user")), 2);
    // A cost counts as that many hits: 9 at once on a fresh counter ends past 8
    // (80% of 10), so all 9 are within and near the limit.
    let r = ask(
        &mut c,
        request("m", vec![with_hits(desc(&[("user", "bob")]), 9)]),
    )
    .await;
    calls += 1;
    assert!(ok(&r));
    assert_eq!(rls.metric(&series("within_limit", "user")), 19);
    assert_eq!(rls.metric(&series("near_limit", "user")), 11);

    // detailed_metric: one series per value, at most --max-detailed-series (3) of
    // them; further values roll up under the rule's configured key.
    for v in 0..5 {
        let r = ask(
            &mut c,
            request("m", vec![desc(&[("api_key", &format!("k{v}"))])]),
        )
        .await;
        calls += 1;
        assert!(ok(&r));
    }
    // A value that already has its series keeps it past the cap.
    ask(&mut c, request("m", vec![desc(&[("api_key", "k0")])])).await;
    calls += 1;
    assert_eq!(rls.metric(&series("total_hits", "api_key_k0")), 2);
    assert_eq!(rls.metric(&series("total_hits", "api_key_k1")), 1);
    assert_eq!(rls.metric(&series("total_hits", "api_key_k2")), 1);
    assert_eq!(rls.metric(&series("within_limit", "api_key_k1")), 1);
    assert_eq!(rls.metric(&series("total_hits", "api_key")), 2, "k3, k4");

    let (code, body) = rls.http("/metrics").expect("scrape /metrics");
    assert_eq!(code, 200);
    assert!(!body.contains("api_key_k3") && !body.contains("api_key_k4"));
    assert!(
        !body.contains("alice") && !body.contains("bob"),
        "no per-value labels without detailed_metric:\n{body}"
    );
    let rule_keys: std::collections::BTreeSet<&str> = body
        .lines()
        .filter(|l| l.starts_with("ratelimit_service_rate_limit_"))
        .filter_map(|l| l.split("key=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(
        rule_keys.into_iter().collect::<Vec<_>>(),
        ["api_key", "api_key_k0", "api_key_k1", "api_key_k2", "user"],
        "bounded cardinality:\n{body}"
    );

    // The latency histogram observed every ShouldRateLimit call, in its buckets.
    assert_eq!(
        rls.metric("ratelimit_service_response_time_seconds_count"),
        calls
    );
    assert_eq!(
        rls.metric(r#"ratelimit_service_response_time_seconds_bucket{le="+Inf"}"#),
        calls
    );
    let sum: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("ratelimit_service_response_time_seconds_sum "))
        .and_then(|v| v.trim().parse().ok())
        .expect("a _sum line");
    assert!(sum > 0.0, "{sum}");
    assert!(body.contains(r#"ratelimit_service_response_time_seconds_bucket{le="0.001"}"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_json_object_per_line() {
    let redis = Server::start();
    let rls = Rls::start(&redis.url(), METRICS, &["--log-format", "json"]);
    let mut c = rls.client().await;
    assert!(ok(
        &ask(&mut c, request("m", vec![desc(&[("user", "u")])])).await
    ));
    let log = rls.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "{log}");
    let mut serving = None;
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{log}"));
        for field in ["timestamp", "level", "target", "fields"] {
            assert!(v.get(field).is_some(), "no {field}: {line}");
        }
        if v["fields"]["message"] == "plans applied; serving" {
            serving = Some(v);
        }
    }
    let v = serving.unwrap_or_else(|| panic!("no 'plans applied; serving' line:\n{log}"));
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["target"], "tollgate_rls");
    assert_eq!(v["fields"]["plans"], 2, "structured fields stay typed: {v}");
    assert!(v["fields"]["files"]
        .as_str()
        .is_some_and(|f| f.contains("config.yaml")));
    assert!(v["timestamp"].as_str().is_some_and(|t| t.contains('T')));
}

/// Connections of other clients than the asking one, per `CLIENT LIST`.
fn other_connections(server: &Server) -> usize {
    let mut con = server.client();
    let me: i64 = redis::cmd("CLIENT").arg("ID").query(&mut con).unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("normal")
        .query(&mut con)
        .unwrap();
    list.lines()
        .filter(|l| !l.starts_with(&format!("id={me} ")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_the_configured_connection_pool() {
    let redis = Server::start();
    let rls = Rls::start(&redis.url(), METRICS, &["--redis-pool-size", "3"]);
    let admitted = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut tasks = Vec::new();
    for t in 0..16 {
        let mut c = rls.client().await;
        let admitted = admitted.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let user = format!("u{}", (t * 20 + i) % 40);
                let r = ask(&mut c, request("m", vec![desc(&[("user", &user)])])).await;
                if ok(&r) {
                    admitted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // 320 requests over 40 users of 10 each (8 per user): all admitted.
    assert_eq!(admitted.load(std::sync::atomic::Ordering::SeqCst), 320);
    // The pool's 3 multiplexed connections carried them all (round robin reaches
    // each): no connection per request or per gRPC stream.
    let mut seen = 0;
    for _ in 0..100 {
        seen = other_connections(&redis);
        if seen == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        seen, 3,
        "connections of tollgate-rls with --redis-pool-size 3"
    );
}
