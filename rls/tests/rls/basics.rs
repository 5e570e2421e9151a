//! The behaviours envoyproxy/ratelimit's own tests check, on its fixtures and with
//! its expected responses: lookups, counters per value, remaining, errors, metrics;
//! and hits as costs.

use crate::harness::*;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/ratelimit/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_ratelimit_basic_fixture_answers_as_theirs() {
    // envoyproxy/ratelimit's integration config `basic`: one_per_minute and key1 50/s.
    let redis = Server::start();
    let rls = Rls::start(&redis.url(), &fixture("integration_basic.yaml"), &[]);
    let mut c = rls.client().await;

    // No descriptor matches: OK with no limit (envoyproxy/ratelimit's `TestBasicConfig`).
    let r = ask(&mut c, request("basic", vec![desc(&[("nosuch", "x")])])).await;
    assert!(ok(&r));
    assert_eq!(r.statuses.len(), 1);
    assert!(r.statuses[0].current_limit.is_none());

    // An unknown domain: OK as well.
    let r = ask(&mut c, request("nosuch", vec![desc(&[("key1", "x")])])).await;
    assert!(ok(&r));

    // one_per_minute: the first is OK with 0 left, the second OVER_LIMIT.
    let d = || desc(&[("one_per_minute", "user1")]);
    let r = ask(&mut c, request("basic", vec![d()])).await;
    assert!(ok(&r), "{r:?}");
    let s = &r.statuses[0];
    assert_eq!(s.code, OK);
    assert_eq!(s.limit_remaining, 0);
    let limit = s.current_limit.as_ref().expect("current_limit");
    assert_eq!((limit.requests_per_unit, limit.unit), (1, 2)); // 1 per MINUTE
    let reset = s
        .duration_until_reset
        .as_ref()
        .expect("duration_until_reset");
    assert!(reset.seconds <= 60, "{reset:?}");
    let r = ask(&mut c, request("basic", vec![d()])).await;
    assert!(over(&r));
    assert_eq!(r.statuses[0].code, OVER_LIMIT);
    assert_eq!(r.statuses[0].limit_remaining, 0);
    // Another value of the same key has its own counter.
    let r = ask(
        &mut c,
        request("basic", vec![desc(&[("one_per_minute", "user2")])]),
    )
    .await;
    assert!(ok(&r));

    // key1: 50 per second, remaining counts down.
    let r = ask(&mut c, request("basic", vec![desc(&[("key1", "a")])])).await;
    assert_eq!(r.statuses[0].limit_remaining, 49);

    // Empty domain or descriptors: an error, as theirs.
    assert!(c
        .should_rate_limit(request("", vec![desc(&[("key1", "a")])]))
        .await
        .is_err());
    assert!(c.should_rate_limit(request("basic", vec![])).await.is_err());

    // Metrics: per domain and rule key, never per value.
    assert_eq!(
        rls.metric(
            r#"ratelimit_service_rate_limit_over_limit{domain="basic",key="one_per_minute"}"#
        ),
        1
    );
    assert_eq!(
        rls.metric(
            r#"ratelimit_service_rate_limit_total_hits{domain="basic",key="one_per_minute"}"#
        ),
        3
    );
    let (_, body) = rls.http("/metrics").unwrap();
    assert!(!body.contains("user1"), "no per-value labels");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_addend_is_the_cost_and_an_explicit_zero_only_checks() {
    let redis = Server::start();
    let config = r#"
domain: tokens
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 1000}
    tollgate: {cost_unit: token}
"#;
    let rls = Rls::start(&redis.url(), config, &[]);
    let mut c = rls.client().await;
    let user = || desc(&[("user", "u1")]);
    for left in [700, 400, 100] {
        let r = ask(&mut c, request("tokens", vec![with_hits(user(), 300)])).await;
        assert!(ok(&r));
        assert_eq!(r.statuses[0].limit_remaining, left);
    }
    // 300 more does not fit: denied, nothing charged.
    let r = ask(&mut c, request("tokens", vec![with_hits(user(), 300)])).await;
    assert!(over(&r));
    // A pure check (descriptor-level 0) charges nothing and sees 100 left.
    let r = ask(&mut c, request("tokens", vec![with_hits(user(), 0)])).await;
    assert!(ok(&r));
    assert_eq!(r.statuses[0].limit_remaining, 100);
    // Request-level hits_addend applies when the descriptor has none.
    let mut req = request("tokens", vec![user()]);
    req.hits_addend = 100;
    let r = ask(&mut c, req).await;
    assert!(ok(&r));
    assert_eq!(r.statuses[0].limit_remaining, 0);
    let r = ask(&mut c, request("tokens", vec![with_hits(user(), 0)])).await;
    assert!(
        ok(&r),
        "a check at exactly the limit still passes (as envoyproxy/ratelimit)"
    );
    let r = ask(&mut c, request("tokens", vec![with_hits(user(), 1)])).await;
    assert!(over(&r));
}
