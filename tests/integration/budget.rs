//! The "monthly dollar budget with an 80% warning" pattern (reference Option 6), done
//! with the product: a calendar-month fixed limit in micro-dollars, charged on the
//! estimate and settled on the actual cost.

use crate::harness::*;
use redis::Value;

#[test]
fn a_monthly_dollar_budget_warns_at_80_percent_and_stops_at_100() {
    let server = Server::start();
    let mut con = server.client();
    // $20 a month for the pro tier, in micro-dollars.
    int(
        &mut con,
        &[
            "RL.PLAN.SET",
            "pro",
            "spend",
            "fixed 20000000 usd_micros/1mo warn 80%",
            "rpm",
            "sliding 600/1m",
        ],
    );
    let mut spent = 0i64;
    let mut warned_at = None;
    for i in 0..100 {
        let id = format!("chat-{i}");
        // Admit on the worst case (max_tokens at the model's price)...
        let d = decision(
            &mut con,
            &[
                "RL.ACQUIRE",
                "user:7",
                "pro",
                "1",
                "COST",
                "usd_micros",
                "400000",
                "ID",
                &id,
            ],
        );
        if !d.allowed() {
            assert_eq!(d.str("denied_by").as_deref(), Some("spend"));
            // Denied until the first of next month, UTC.
            let retry = d.retry_after_ms();
            assert!(retry > 0 && retry <= 31 * 86_400_000, "{retry}");
            break;
        }
        // ...then settle on what the call really cost.
        let actual = 250_000 + (i % 7) * 10_000;
        let released = map_of(&run(
            &mut con,
            &[
                "RL.RELEASE",
                "user:7",
                &id,
                "COST",
                "usd_micros",
                &actual.to_string(),
            ],
        ));
        assert_eq!(released["released"], Value::Int(1));
        spent += actual;
        let after = decision(&mut con, &["RL.PEEK", "user:7", "pro", "0"]);
        assert_eq!(after.remaining("spend"), 20_000_000 - spent);
        if after.limit("spend", "warn") == 1 && warned_at.is_none() {
            warned_at = Some(spent);
        }
    }
    let warned_at = warned_at.expect("the warning was raised");
    assert!(
        (16_000_000..16_400_000).contains(&warned_at),
        "warned at {warned_at}"
    );
    assert!(spent <= 20_000_000 && spent > 19_000_000, "spent {spent}");
}
