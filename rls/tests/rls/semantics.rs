//! Where Tollgate differs from envoyproxy/ratelimit on purpose (one atomic step per
//! request, calendar windows, reservations) and the Tollgate extensions.

use crate::harness::*;
use std::sync::Arc;
use std::time::Duration;

const ATOMIC: &str = r#"
domain: api
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 10}
  - key: route
    rate_limit: {unit: minute, requests_per_unit: 2}
"#;

/// The remaining of a descriptor, asked with a pure check (hits 0 charges nothing).
async fn remaining(
    c: &mut tollgate_rls::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient<tonic::transport::Channel>,
    domain: &str,
    entries: &[(&str, &str)],
) -> u32 {
    let r = ask(c, request(domain, vec![with_hits(desc(entries), 0)])).await;
    r.statuses[0].limit_remaining
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_route_limit_rejects_charges_neither_limit() {
    let redis = Server::start();
    let rls = Rls::start(&redis.url(), ATOMIC, &[]);
    let mut c = rls.client().await;
    let both = || {
        request(
            "api",
            vec![desc(&[("user", "alice")]), desc(&[("route", "/chat")])],
        )
    };
    for _ in 0..2 {
        let r = ask(&mut c, both()).await;
        assert!(ok(&r), "{r:?}");
    }
    assert_eq!(remaining(&mut c, "api", &[("user", "alice")]).await, 8);
    // The route limit (2/min) rejects the third: the user's counter is not charged
    // (envoyproxy/ratelimit would have counted it: 7 left).
    for _ in 0..3 {
        let r = ask(&mut c, both()).await;
        assert!(over(&r));
        assert_eq!(r.statuses[0].code, OK, "the user limit itself was not over");
        assert_eq!(r.statuses[1].code, OVER_LIMIT);
    }
    assert_eq!(remaining(&mut c, "api", &[("user", "alice")]).await, 8);
    assert_eq!(remaining(&mut c, "api", &[("route", "/chat")]).await, 0);
    // The module built from this source takes ALSO: one call decided each request.
    assert!(
        !rls.log().contains("the server has no RL.ACQUIRE ... ALSO"),
        "{}",
        rls.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_streams_never_exceed_any_limit() {
    let redis = Server::start();
    let config = r#"
domain: load
descriptors:
  - key: org
    rate_limit: {unit: hour, requests_per_unit: 100}
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 9}
"#;
    let rls = Rls::start(&redis.url(), config, &[]);
    let admitted = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        u32,
    >::new()));
    let mut tasks = Vec::new();
    for stream in 0..16 {
        let mut c = rls.client().await;
        let admitted = admitted.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let user = format!("u{}", (stream + i) % 12);
                let req = request(
                    "load",
                    vec![
                        desc(&[("org", "acme")]),
                        desc(&[("org", "acme"), ("user", &user)]),
                    ],
                );
                let r = ask(&mut c, req).await;
                if ok(&r) {
                    *admitted.lock().unwrap().entry(user).or_default() += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let admitted = admitted.lock().unwrap().clone();
    let total: u32 = admitted.values().sum();
    assert_eq!(
        total, 100,
        "the org limit admits exactly its capacity: {admitted:?}"
    );
    assert!(
        admitted.values().all(|&n| n <= 9),
        "no user past 9: {admitted:?}"
    );
    // And the org counter holds exactly what was admitted.
    let mut c = rls.client().await;
    assert_eq!(remaining(&mut c, "load", &[("org", "acme")]).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monthly_and_weekly_windows_are_calendar_windows() {
    let redis = Server::start();
    let config = r#"
domain: cal
descriptors:
  - key: month
    rate_limit: {unit: month, requests_per_unit: 5}
  - key: week
    rate_limit: {unit: week, requests_per_unit: 5}
  - key: day
    rate_limit: {unit: day, requests_per_unit: 5}
"#;
    let rls = Rls::start(&redis.url(), config, &[]);
    let mut c = rls.client().await;
    let now = tollgate_rls::window::now_ms();
    for (key, unit) in [
        ("month", tollgate_rls::config::TimeUnit::Month),
        ("week", tollgate_rls::config::TimeUnit::Week),
        ("day", tollgate_rls::config::TimeUnit::Day),
    ] {
        let r = ask(&mut c, request("cal", vec![desc(&[(key, "x")])])).await;
        let reset = r.statuses[0].duration_until_reset.unwrap();
        let expected_ms = tollgate_rls::window::window_end(unit, now) - now;
        let got_ms = reset.seconds as u64 * 1000 + reset.nanos as u64 / 1_000_000;
        assert!(
            got_ms.abs_diff(expected_ms) < 5_000,
            "{key}: reset in {got_ms} ms, the calendar says {expected_ms} ms"
        );
        // envoyproxy/ratelimit's month is 30 days from the epoch: not ours.
        assert_eq!(
            r.statuses[0].current_limit.as_ref().unwrap().unit,
            unit.proto()
        );
    }
}

const AI: &str = r#"
domain: ai
tollgate:
  tenant_key: org
  request_id_key: request_id
  settle_id_key: settle_id
descriptors:
  - key: org
    descriptors:
      - key: tokens
        rate_limit: {unit: day, requests_per_unit: 1000}
        tollgate: {cost_unit: token}
      - key: usage
        rate_limit: {unit: day, requests_per_unit: 1000}
        tollgate: {cost_unit: token, report_usage: true}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_on_the_estimate_then_settle_or_refund() {
    let redis = Server::start();
    let rls = Rls::start(&redis.url(), AI, &[]);
    let mut c = rls.client().await;
    let tokens = |id_key: &str, id: &str| desc(&[("org", "acme"), (id_key, id), ("tokens", "gpt")]);
    // Request path: reserve 600 under request id r1.
    let r = ask(
        &mut c,
        request("ai", vec![with_hits(tokens("request_id", "r1"), 600)]),
    )
    .await;
    assert!(ok(&r));
    assert_eq!(r.statuses[0].limit_remaining, 400);
    // A second request's estimate of 500 does not fit while r1 holds 600.
    let r = ask(
        &mut c,
        request("ai", vec![with_hits(tokens("request_id", "r2"), 500)]),
    )
    .await;
    assert!(over(&r));
    // Response path: r1 used 150 — settle; 450 come back.
    let r = ask(
        &mut c,
        request("ai", vec![with_hits(tokens("settle_id", "r1"), 150)]),
    )
    .await;
    assert!(ok(&r));
    let check = || desc(&[("org", "acme"), ("tokens", "gpt")]);
    let r = ask(&mut c, request("ai", vec![with_hits(check(), 0)])).await;
    assert_eq!(r.statuses[0].limit_remaining, 850);
    // Envoy's is_negative_hits on the response path refunds part of the estimate.
    let r = ask(
        &mut c,
        request("ai", vec![with_hits(tokens("request_id", "r3"), 500)]),
    )
    .await;
    assert!(ok(&r));
    assert_eq!(r.statuses[0].limit_remaining, 350);
    let r = ask(
        &mut c,
        request("ai", vec![negative(tokens("settle_id", "r3"), 300)]),
    )
    .await;
    assert!(ok(&r));
    let r = ask(&mut c, request("ai", vec![with_hits(check(), 0)])).await;
    assert_eq!(
        r.statuses[0].limit_remaining, 650,
        "500 reserved, 300 refunded"
    );
    // A refund with nothing reserved cannot be applied: answered OK and counted.
    let r = ask(&mut c, request("ai", vec![negative(check(), 100)])).await;
    assert!(ok(&r));
    assert_eq!(
        rls.metric("tollgate_rls_refunds_without_reservation_total"),
        1
    );
    let r = ask(&mut c, request("ai", vec![with_hits(check(), 0)])).await;
    assert_eq!(r.statuses[0].limit_remaining, 650);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ai_gateway_usage_reports_are_always_charged_and_checks_then_deny() {
    let redis = Server::start();
    let rls = Rls::start(&redis.url(), AI, &[]);
    let mut c = rls.client().await;
    let usage = || desc(&[("org", "acme"), ("usage", "all")]);
    // Request path (AI Gateway): hits 0, a check.
    let r = ask(&mut c, request("ai", vec![with_hits(usage(), 0)])).await;
    assert!(ok(&r));
    // Response path: the usage, 700, 600, 500, 400 — from the second on the budget is
    // overshot and every report is charged anyway (the requests already happened,
    // even those reported while the subject was already over); it never denies.
    for used in [700, 600, 500, 400] {
        let r = ask(&mut c, request("ai", vec![with_hits(usage(), used)])).await;
        assert!(ok(&r), "a usage report never denies");
    }
    assert_eq!(
        usage_used(
            &redis,
            "rls:{acme}:ai:org_acme.usage_all",
            "rls:ai:org.usage",
            "rate"
        ),
        2200,
        "every reported token is counted"
    );
    // The next request path check sees the budget spent.
    let r = ask(&mut c, request("ai", vec![with_hits(usage(), 0)])).await;
    assert!(over(&r), "{r:?}");
    assert_eq!(r.statuses[0].limit_remaining, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_rules_count_but_never_deny() {
    let redis = Server::start();
    let config = r#"
domain: sh
descriptors:
  - key: k
    rate_limit: {unit: minute, requests_per_unit: 2}
    shadow_mode: true
  - key: enforced
    rate_limit: {unit: minute, requests_per_unit: 100}
"#;
    let rls = Rls::start(&redis.url(), config, &[]);
    let mut c = rls.client().await;
    for _ in 0..5 {
        let r = ask(
            &mut c,
            request("sh", vec![desc(&[("k", "v")]), desc(&[("enforced", "e")])]),
        )
        .await;
        assert!(ok(&r), "{r:?}");
        assert_eq!(r.statuses[0].code, OK);
    }
    assert_eq!(
        rls.metric(r#"ratelimit_service_rate_limit_shadow_mode{domain="sh",key="k"}"#),
        3
    );
    assert_eq!(
        rls.metric(r#"ratelimit_service_rate_limit_total_hits{domain="sh",key="k"}"#),
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_replaces_headers_and_dynamic_metadata() {
    let redis = Server::start();
    let config = r#"
domain: o
descriptors:
  - key: tenant
    rate_limit: {unit: minute, requests_per_unit: 100, name: tenant_default}
  - key: vip
    rate_limit: {unit: minute, requests_per_unit: 3, replaces: [{name: tenant_default}]}
    metadata: {tier: gold}
"#;
    let rls = Rls::start(
        &redis.url(),
        config,
        &[
            "--response-headers",
            "x-ratelimit,ietf",
            "--dynamic-metadata",
        ],
    );
    let mut c = rls.client().await;
    // A per-descriptor `limit` (a per-tenant limit from Envoy) overrides the config.
    let t = || with_limit(desc(&[("tenant", "t1")]), 2, 2);
    assert!(ok(&ask(&mut c, request("o", vec![t()])).await));
    let r = ask(&mut c, request("o", vec![t()])).await;
    assert!(ok(&r));
    assert_eq!(r.statuses[0].limit_remaining, 0);
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        2
    );
    let r = ask(&mut c, request("o", vec![t()])).await;
    assert!(over(&r));
    // The same tenant without the override: the configured 100, same counter.
    let r = ask(&mut c, request("o", vec![desc(&[("tenant", "t1")])])).await;
    assert!(ok(&r));
    assert_eq!(r.statuses[0].limit_remaining, 97);
    // `replaces`: vip replaces tenant_default — only vip's limit applies.
    let both = || {
        request(
            "o",
            vec![desc(&[("tenant", "t2")]), desc(&[("vip", "yes")])],
        )
    };
    let r = ask(&mut c, both()).await;
    assert!(ok(&r));
    assert!(r.statuses[0].current_limit.is_none(), "replaced: {r:?}");
    assert_eq!(r.statuses[1].limit_remaining, 2);
    let headers: Vec<(String, String)> = r
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    assert!(
        headers.contains(&("x-ratelimit-limit".into(), "3".into())),
        "{headers:?}"
    );
    assert!(
        headers.contains(&("x-ratelimit-remaining".into(), "2".into())),
        "{headers:?}"
    );
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "RateLimit-Policy" && v.contains(";q=3;w=60")),
        "{headers:?}"
    );
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "RateLimit" && v.contains(";r=2;t=")),
        "{headers:?}"
    );
    let md = r.dynamic_metadata.as_ref().unwrap();
    assert!(
        md.fields.contains_key("metadata"),
        "passed rules' metadata: {md:?}"
    );
    ask(&mut c, both()).await;
    ask(&mut c, both()).await;
    let r = ask(&mut c, both()).await;
    assert!(over(&r));
    let md = r.dynamic_metadata.as_ref().unwrap();
    let denied = format!("{:?}", md.fields.get("deniedBy"));
    assert!(
        denied.contains("vip_yes"),
        "the limit that denied: {denied}"
    );
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_a_quota_rule_denies_charges_no_other_descriptor() {
    let redis = Server::start();
    let config = r#"
domain: q
descriptors:
  - key: quota
    rate_limit: {unit: hour, requests_per_unit: 1}
    quota_mode: true
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 10}
"#;
    let rls = Rls::start(&redis.url(), config, &[]);
    let mut c = rls.client().await;
    let both = || {
        request(
            "q",
            vec![desc(&[("quota", "monthly")]), desc(&[("user", "alice")])],
        )
    };
    let r = ask(&mut c, both()).await;
    assert!(ok(&r), "{r:?}");
    let used = || usage_used(&redis, "rls:q:user_alice", "rls:q:user", "rate");
    assert_eq!(used(), 1);
    // The quota rule is spent: the request is denied and the user is charged nothing.
    for _ in 0..3 {
        let r = ask(&mut c, both()).await;
        assert!(over(&r), "{r:?}");
        assert_eq!(r.statuses[0].code, OVER_LIMIT);
        assert_eq!(r.statuses[1].code, OK, "the user limit itself was not over");
    }
    assert_eq!(used(), 1, "a denied request charged the user");
    assert_eq!(
        usage_used(&redis, "rls:q:quota_monthly", "rls:q:quota", "rate"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_quota_rules_deny_only_when_all_are_over_and_then_charge_nothing() {
    let redis = Server::start();
    let config = r#"
domain: q
descriptors:
  - key: daily
    rate_limit: {unit: day, requests_per_unit: 1}
    quota_mode: true
  - key: monthly
    rate_limit: {unit: month, requests_per_unit: 3}
    quota_mode: true
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 10}
"#;
    let rls = Rls::start(&redis.url(), config, &[]);
    let mut c = rls.client().await;
    let all = || {
        request(
            "q",
            vec![
                desc(&[("daily", "d")]),
                desc(&[("monthly", "m")]),
                desc(&[("user", "alice")]),
            ],
        )
    };
    let used = |key: &str, plan: &str| usage_used(&redis, key, plan, "rate");
    assert!(ok(&ask(&mut c, all()).await));
    // The daily quota is spent, the monthly one still admits: admitted, the daily
    // descriptor says OVER_LIMIT and is not charged.
    for _ in 0..2 {
        let r = ask(&mut c, all()).await;
        assert!(ok(&r), "{r:?}");
        assert_eq!(r.statuses[0].code, OVER_LIMIT);
        assert_eq!(r.statuses[1].code, OK);
    }
    assert_eq!(used("rls:q:daily_d", "rls:q:daily"), 1);
    assert_eq!(used("rls:q:monthly_m", "rls:q:monthly"), 3);
    assert_eq!(used("rls:q:user_alice", "rls:q:user"), 3);
    // Both spent: denied, and nothing is charged anywhere.
    let r = ask(&mut c, all()).await;
    assert!(over(&r), "{r:?}");
    assert_eq!(r.statuses[2].code, OK);
    assert_eq!(used("rls:q:user_alice", "rls:q:user"), 3);
    assert_eq!(used("rls:q:monthly_m", "rls:q:monthly"), 3);
}

const JOBS: &str = r#"
domain: jobs
tollgate:
  request_id_key: request_id
  settle_id_key: settle_id
descriptors:
  - key: user
    tollgate: {concurrency: 1, concurrency_ttl: 60s}
  - key: route
    rate_limit: {unit: hour, requests_per_unit: 100}
"#;

/// A lease is taken on the request path under the request id and held until the
/// response path settles that id — in one call, and split over several calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lives_from_the_request_path_to_the_response_path() {
    let redis = Server::start();
    for (round, extra) in [&[][..], &["--max-keys-per-call", "1"][..]]
        .into_iter()
        .enumerate()
    {
        let rls = Rls::start(&redis.url(), JOBS, extra);
        let mut c = rls.client().await;
        let user = format!("u{round}");
        let key = format!("rls:jobs:user_{user}");
        let leases = || usage_used(&redis, &key, "rls:jobs:user", "concurrency");
        let call = |id_key: &str, id: &str| {
            request(
                "jobs",
                vec![
                    desc(&[(id_key, id), ("user", user.as_str())]),
                    desc(&[("route", "chat")]),
                ],
            )
        };
        let r = ask(&mut c, call("request_id", "r1")).await;
        assert!(ok(&r), "{extra:?}: {r:?}");
        assert_eq!(
            leases(),
            1,
            "{extra:?}: r1 holds its lease after the answer"
        );
        let r = ask(&mut c, call("request_id", "r2")).await;
        assert!(over(&r), "{extra:?}: the one slot is r1's: {r:?}");
        assert_eq!(r.statuses[0].code, OVER_LIMIT);
        // The response path of r1 frees the slot.
        let r = ask(&mut c, call("settle_id", "r1")).await;
        assert!(ok(&r), "{extra:?}: {r:?}");
        assert_eq!(leases(), 0, "{extra:?}: settling r1 released its lease");
        assert!(ok(&ask(&mut c, call("request_id", "r3")).await));
        assert_eq!(leases(), 1);
        // Without a request id the lease is still held (until its TTL), never
        // released on the spot; that is counted.
        let anonymous = || {
            request(
                "jobs",
                vec![desc(&[("user", "nobody")]), desc(&[("route", "chat")])],
            )
        };
        let nobody = "rls:jobs:user_nobody".to_string();
        assert!(ok(&ask(&mut c, anonymous()).await), "{extra:?}");
        assert_eq!(
            usage_used(&redis, &nobody, "rls:jobs:user", "concurrency"),
            1
        );
        assert!(over(&ask(&mut c, anonymous()).await), "{extra:?}");
        assert_eq!(
            rls.metric("tollgate_rls_leases_without_request_id_total"),
            2,
            "{extra:?}"
        );
        let _ = redis::cmd("DEL")
            .arg(&nobody)
            .query::<i64>(&mut redis.client());
    }
}

/// Each distinct `limit` override is a plan in Redis: past `--max-override-plans`
/// a new one is refused (OVER_LIMIT, nothing charged, logged and counted), while
/// overrides already made keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_overrides_make_a_bounded_number_of_plans() {
    let redis = Server::start();
    let config = r#"
domain: o
descriptors:
  - key: tenant
    rate_limit: {unit: minute, requests_per_unit: 100}
"#;
    let rls = Rls::start(&redis.url(), config, &["--max-override-plans", "2"]);
    let mut c = rls.client().await;
    let tenant = |limit: u32| request("o", vec![with_limit(desc(&[("tenant", "t1")]), limit, 2)]);
    let override_plans = || {
        let plans: Vec<String> = redis::cmd("RL.PLAN.LIST")
            .query(&mut redis.client())
            .unwrap();
        plans.iter().filter(|p| p.starts_with("rls-o:")).count()
    };
    assert!(ok(&ask(&mut c, tenant(50)).await));
    assert!(ok(&ask(&mut c, tenant(60)).await));
    assert_eq!(override_plans(), 2);
    assert_eq!(rls.metric("tollgate_rls_override_plans"), 2);
    // A third distinct override: refused, and the tenant's counter is not charged.
    let r = ask(&mut c, tenant(70)).await;
    assert!(over(&r), "{r:?}");
    assert_eq!(r.statuses[0].code, OVER_LIMIT);
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        70
    );
    assert_eq!(override_plans(), 2, "no plan past the bound");
    assert_eq!(rls.metric("tollgate_rls_override_plans_refused_total"), 1);
    assert!(rls.log().contains("--max-override-plans"), "{}", rls.log());
    assert_eq!(
        usage_used(&redis, "rls:o:tenant_t1", "rls:o:tenant", "rate"),
        2
    );
    // The overrides already made still decide.
    let r = ask(&mut c, tenant(50)).await;
    assert!(ok(&r), "{r:?}");
    assert_eq!(r.statuses[0].limit_remaining, 47);
}

/// The response path names every descriptor again, also those the request path did
/// not reserve (a shadow rule here, whose key sorts first): the reservation is still
/// found and settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_finds_the_reservation_beside_descriptors_it_did_not_reserve() {
    let redis = Server::start();
    let config = r#"
domain: ai
tollgate:
  tenant_key: org
  request_id_key: request_id
  settle_id_key: settle_id
descriptors:
  - key: org
    descriptors:
      - key: audit
        rate_limit: {unit: day, requests_per_unit: 1000}
        shadow_mode: true
      - key: tokens
        rate_limit: {unit: day, requests_per_unit: 1000}
        tollgate: {cost_unit: token}
"#;
    let rls = Rls::start(&redis.url(), config, &[]);
    let mut c = rls.client().await;
    let call = |id_key: &str, hits: u64| {
        request(
            "ai",
            vec![
                desc(&[("org", "acme"), ("audit", "all")]),
                with_hits(
                    desc(&[("org", "acme"), (id_key, "r1"), ("tokens", "gpt")]),
                    hits,
                ),
            ],
        )
    };
    assert!(ok(&ask(&mut c, call("request_id", 600)).await));
    let tokens = || {
        usage_used(
            &redis,
            "rls:{acme}:ai:org_acme.tokens_gpt",
            "rls:ai:org.tokens",
            "rate",
        )
    };
    assert_eq!(tokens(), 600);
    assert!(ok(&ask(&mut c, call("settle_id", 100)).await));
    assert_eq!(tokens(), 100, "the reservation was settled at the actual");
}
