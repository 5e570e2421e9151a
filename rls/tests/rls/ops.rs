//! Operations: reloads without dropping requests, refused configs, Redis restarts
//! under each failure mode, health, graceful shutdown, `--help`.

use crate::harness::*;
use std::time::Duration;

const V1: &str = r#"
domain: live
descriptors:
  - key: k
    rate_limit: {unit: hour, requests_per_unit: 1000}
"#;

const V2: &str = r#"
domain: live
descriptors:
  - key: k
    rate_limit: {unit: hour, requests_per_unit: 5000}
  - key: added
    rate_limit: {unit: hour, requests_per_unit: 1}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_reloads_without_dropping_requests_and_refuses_bad_files() {
    let redis = Server::start();
    let rls = Rls::start(&redis.url(), V1, &[]);
    let dir = rls.config_dir.clone();
    // Requests run all along the reloads: none may fail.
    let mut c = rls.client().await;
    let load = tokio::spawn(async move {
        let mut n = 0u32;
        let deadline = std::time::Instant::now() + Duration::from_secs(4);
        while std::time::Instant::now() < deadline {
            let r = c
                .should_rate_limit(request("live", vec![desc(&[("k", "x")])]))
                .await
                .expect("no request fails during a reload");
            assert!(ok(&r.into_inner()));
            n += 1;
        }
        n
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(dir.join("config.yaml"), V2).unwrap();
    let mut c = rls.client().await;
    let mut applied = false;
    for _ in 0..100 {
        let r = ask(
            &mut c,
            request("live", vec![with_hits(desc(&[("k", "x")]), 0)]),
        )
        .await;
        if r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit
            == 5000
        {
            applied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(applied, "the new limit applies after the file changes");
    // A bad file is refused; the last good config stays.
    std::fs::write(dir.join("broken.yaml"), "domain: other\ndescriptors:\n  - key: a\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n").unwrap();
    let mut logged = false;
    for _ in 0..100 {
        if rls.log().contains("broken.yaml")
            && rls.metric("ratelimit_service_config_load_error") >= 1
        {
            logged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(logged, "the refusal names the file: {}", rls.log());
    assert!(rls.log().contains("invalid rate limit unit 'fortnight'"));
    assert!(
        rls.log().contains("line 4"),
        "and the position: {}",
        rls.log()
    );
    let r = ask(&mut c, request("live", vec![desc(&[("added", "y")])])).await;
    assert!(ok(&r));
    let r = ask(&mut c, request("live", vec![desc(&[("added", "y")])])).await;
    assert!(over(&r), "the last good config (V2) still decides");
    let served = load.await.unwrap();
    assert!(served > 10, "requests kept flowing: {served}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_answered_by_the_failure_mode_and_recovered_from() {
    let mut redis = Server::start();
    let fast = ["--redis-timeout-ms", "300"];
    let allow = Rls::start(
        &redis.url(),
        V1,
        &[&fast[..], &["--failure-mode", "allow"]].concat(),
    );
    let deny = Rls::start(
        &redis.url(),
        V1,
        &[&fast[..], &["--failure-mode", "deny"]].concat(),
    );
    let error = Rls::start(
        &redis.url(),
        V1,
        &[&fast[..], &["--failure-mode", "error"]].concat(),
    );
    let (mut a, mut d, mut e) = (
        allow.client().await,
        deny.client().await,
        error.client().await,
    );
    let req = || request("live", vec![desc(&[("k", "x")])]);
    assert!(ok(&ask(&mut a, req()).await));
    assert!(ok(&ask(&mut d, req()).await));
    assert!(ok(&ask(&mut e, req()).await));

    redis.kill();
    assert!(ok(&ask(&mut a, req()).await), "fail open");
    let r = ask(&mut d, req()).await;
    assert!(over(&r), "fail closed");
    let status = e
        .should_rate_limit(req())
        .await
        .expect_err("an error for Envoy to decide");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(allow.metric(r#"tollgate_rls_failure_mode_total{answer="allow"}"#) >= 1);

    // A restarted server without persistence has lost the plans too: the services
    // re-apply them and decide again.
    redis.restart();
    for (name, c) in [("allow", &mut a), ("deny", &mut d)] {
        let mut back = false;
        for _ in 0..100 {
            let r = ask(c, req()).await;
            if ok(&r) && r.statuses[0].current_limit.is_some() {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(back, "{name}: decisions resume after Redis restarts");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_graceful_shutdown() {
    let redis = Server::start();
    let mut rls = Rls::start(&redis.url(), V1, &[]);
    let channel =
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", rls.grpc_port))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let status = |name: &str| tonic_health::pb::HealthCheckRequest {
        service: name.to_string(),
    };
    let r = health
        .check(status("envoy.service.ratelimit.v3.RateLimitService"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, serving);
    assert_eq!(rls.http("/healthcheck").map(|(c, _)| c), Some(200));
    let exit = rls.terminate().expect("exits on SIGTERM");
    assert!(exit.success(), "a clean exit: {exit:?}");
    assert!(rls.log().contains("drained"), "{}", rls.log());
}

#[test]
fn help_documents_every_flag() {
    let out = std::process::Command::new(rls_binary())
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config-dir",
        "--merge-domains",
        "--include-dot-files",
        "--check",
        "--grpc-addr",
        "--http-addr",
        "--redis-url",
        "--cluster",
        "--redis-pool-size",
        "--redis-timeout-ms",
        "--failure-mode",
        "--shadow-mode",
        "--response-headers",
        "--dynamic-metadata",
        "--max-keys-per-call",
        "--reservation-ttl-ms",
        "--near-limit-ratio",
        "--max-detailed-series",
        "--log-format",
        "--log-level",
        "--drain-timeout-ms",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    // --check validates a directory without Redis.
    let dir = temp_dir("check");
    std::fs::write(dir.join("a.yaml"), V1).unwrap();
    let out = std::process::Command::new(rls_binary())
        .arg("--config-dir")
        .arg(&dir)
        .arg("--check")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("RL.PLAN.SET rls:live:k rate \"fixed 1000 request."));
    std::fs::write(dir.join("b.yaml"), "domain: live\n").unwrap();
    let out = std::process::Command::new(rls_binary())
        .arg("--config-dir")
        .arg(&dir)
        .arg("--check")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("b.yaml: duplicate domain 'live'"));
    let _ = std::fs::remove_dir_all(dir);
}
