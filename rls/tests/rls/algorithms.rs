//! The Tollgate algorithm extensions decided through gRPC: a token bucket with a
//! burst, and a sliding window (against a fixed one at the same rate).

use crate::harness::*;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

type Client = tollgate_rls::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient<tonic::transport::Channel>;

async fn hit(c: &mut Client, domain: &str, key: &str, value: &str) -> bool {
    ok(&ask(c, request(domain, vec![desc(&[(key, value)])])).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_admits_its_burst_then_refills_at_its_rate() {
    let redis = Server::start();
    // 30 per minute = one token every 2 s, holding at most 4.
    let config = r#"
domain: b
descriptors:
  - key: burst
    rate_limit: {unit: minute, requests_per_unit: 30}
    tollgate: {algorithm: bucket, burst: 4}
"#;
    let rls = Rls::start(&redis.url(), config, &[]);
    let mut c = rls.client().await;
    // A full bucket: the burst (4, not the 30 a fixed minute would take) at once.
    let mut results = Vec::new();
    for _ in 0..6 {
        let r = ask(&mut c, request("b", vec![desc(&[("burst", "x")])])).await;
        results.push((ok(&r), r.statuses[0].limit_remaining));
    }
    assert_eq!(
        results,
        [
            (true, 3),
            (true, 2),
            (true, 1),
            (true, 0),
            (false, 0),
            (false, 0)
        ]
    );
    let r = ask(
        &mut c,
        request("b", vec![with_hits(desc(&[("burst", "x")]), 0)]),
    )
    .await;
    let reset = r.statuses[0].duration_until_reset.unwrap();
    assert!(
        (6..=8).contains(&reset.seconds),
        "time to full: 4 tokens at 2 s each, one partly refilled: {reset:?}"
    );
    // One token every 2 s: after 2.2 s exactly one more.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert!(hit(&mut c, "b", "burst", "x").await, "refilled one token");
    assert!(!hit(&mut c, "b", "burst", "x").await, "only one");
    // Another value has its own full bucket.
    for _ in 0..4 {
        assert!(hit(&mut c, "b", "burst", "y").await);
    }
    assert!(!hit(&mut c, "b", "burst", "y").await);
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

async fn sleep_until_ms(t: u128) {
    let now = now_ms();
    if t > now {
        tokio::time::sleep(Duration::from_millis((t - now) as u64)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sliding_window_denies_across_the_fixed_window_boundary() {
    let redis = Server::start();
    let config = r#"
domain: s
descriptors:
  - key: sliding
    rate_limit: {unit: second, requests_per_unit: 3}
    tollgate: {algorithm: sliding, precision: 10}
  - key: fixed
    rate_limit: {unit: second, requests_per_unit: 3}
"#;
    let rls = Rls::start(&redis.url(), config, &[]);
    let mut c = rls.client().await;
    // On a busy machine a round may be too slow to say anything: try a few.
    for attempt in 0..5 {
        let v = format!("v{attempt}");
        // Start 300 ms into a second: the 3 calls of each rule land in one
        // fixed window, and the next window starts ~700 ms later.
        let second = now_ms() / 1000 + 1;
        sleep_until_ms(second * 1000 + 300).await;
        let mut first = Vec::new();
        for _ in 0..4 {
            first.push(hit(&mut c, "s", "sliding", &v).await);
            first.push(hit(&mut c, "s", "fixed", &v).await);
        }
        let last_charged = now_ms();
        if last_charged >= second * 1000 + 900 {
            continue; // too slow: the next window is not clearly apart
        }
        assert_eq!(
            first,
            [true, true, true, true, true, true, false, false],
            "3 per second each, the 4th denied"
        );
        // 100 ms into the next second: the fixed window has reset, but the last
        // second still holds the sliding rule's 3.
        sleep_until_ms((second + 1) * 1000 + 100).await;
        let fixed = hit(&mut c, "s", "fixed", &v).await;
        let sliding = hit(&mut c, "s", "sliding", &v).await;
        if now_ms() >= (second + 1) * 1000 + 250 {
            continue; // too slow: the sliding window may have moved past the calls
        }
        assert!(fixed, "a fixed window resets at the second");
        assert!(!sliding, "a sliding window still counts the last second");
        // A full window (plus the one slice it may be conservative by) after the
        // calls, the sliding rule admits again.
        sleep_until_ms(last_charged + 1000 + 150).await;
        let mut admitted = 0;
        for _ in 0..4 {
            if hit(&mut c, "s", "sliding", &v).await {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 3, "a whole window's worth again");
        return;
    }
    panic!("every round was too slow to compare the windows");
}
