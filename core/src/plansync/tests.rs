use super::*;
use crate::layout::LayoutInterner;
use crate::registry::{bucket_of, Author, Stamp};
use proptest::prelude::*;

fn change(name: &str, counter: u64, spec: &str) -> Change {
    Change::Plan {
        name: name.into(),
        stamp: Stamp {
            counter,
            origin: "0123456789012345678901234567890123456789".into(),
        },
        fields: Some(vec![("x".into(), spec.into())]),
    }
}

#[test]
fn every_message_round_trips() {
    let mut plans = Plans::new();
    let mut interner = LayoutInterner::new();
    assert!(plans.set("p", &[("x", "cap 1")], &mut interner).is_ok());
    let messages = [
        Message::Changes(vec![change("p", 3, "cap 2"), change("q", 4, "cap 1")]),
        Message::Changes(Vec::new()),
        Message::Summary(Box::new(plans.summary())),
        Message::Request(Want {
            default: true,
            buckets: u64::MAX,
        }),
        Message::Request(Want::default()),
    ];
    for message in messages {
        let bytes = message.encode();
        assert_eq!(Message::decode(&bytes).as_ref(), Ok(&message));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Message::decode(&longer).is_err(), "trailing junk");
    }
}

#[test]
fn messages_of_another_protocol_or_kind_are_refused() {
    let mut bytes = Message::Request(Want::all()).encode();
    bytes[0] = PROTOCOL + 1;
    assert!(Message::decode(&bytes).is_err_and(|e| e.0.contains("protocol")));
    assert!(Message::decode(&[PROTOCOL, 99]).is_err());
    assert!(Message::decode(&[PROTOCOL, KIND_REQUEST, 2, 0]).is_err());
    assert!(Message::decode(&[]).is_err());
}

#[test]
fn a_summary_is_small() {
    let mut plans = Plans::new();
    let mut interner = LayoutInterner::new();
    for i in 0..1_000 {
        assert!(plans
            .set_by(
                Author {
                    origin: "0123456789012345678901234567890123456789",
                    now_ms: 1_800_000_000_000,
                },
                &format!("plan-{i}"),
                &[("x", "cap 1")],
                &mut interner
            )
            .is_ok());
    }
    let bytes = Message::Summary(Box::new(plans.summary())).encode();
    assert!(bytes.len() <= 2 + 10 * (BUCKETS + 2), "{}", bytes.len());
}

#[test]
fn pack_keeps_messages_under_the_limit_and_changes_in_order() {
    let spec = format!("cap 1 {}", "x".repeat(900));
    let changes: Vec<Change> = (0..300)
        .map(|i| change(&format!("p{i}"), i, &spec))
        .collect();
    let messages = pack(&changes);
    assert!(messages.len() > 1);
    let mut back = Vec::new();
    for m in &messages {
        assert!(m.len() <= MAX_MESSAGE_BYTES);
        match Message::decode(m) {
            Ok(Message::Changes(c)) => back.extend(c),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(back, changes);
    // One change larger than a message travels alone.
    let huge = change("big", 1, &"y".repeat(MAX_MESSAGE_BYTES));
    let messages = pack([&changes[0], &huge, &changes[1]]);
    assert_eq!(messages.len(), 3);
    assert!(pack(&[]).is_empty());
}

#[test]
fn respond_sends_whole_buckets_within_the_budget() {
    let mut plans = Plans::new();
    let mut interner = LayoutInterner::new();
    // ~1 KiB plans, 4,000 of them: about 4 MiB over 64 buckets.
    let endpoints: Vec<String> = (0..45).map(|i| format!("endpoint-number-{i:03}")).collect();
    let spec = format!("fixed 1/1s for {}", endpoints.join(","));
    for i in 0..4_000 {
        assert!(plans
            .set(&format!("plan-{i}"), &[("rpm", &spec)], &mut interner)
            .is_ok());
    }
    let messages = respond(&plans, &Want::all());
    let mut got = Plans::new();
    let mut total = 0;
    for m in &messages {
        total += m.len();
        if let Ok(Message::Changes(changes)) = Message::decode(m) {
            for c in &changes {
                got.merge(c, 0, &mut interner);
            }
        }
    }
    // The budget, plus at most the bucket that crossed it (~64 KiB here).
    assert!((RESPONSE_BUDGET_BYTES..=RESPONSE_BUDGET_BYTES + 200 * 1024).contains(&total));
    // Every bucket answered is complete: the requester's hash of it matches.
    let theirs = plans.summary();
    let mine = got.summary();
    let complete = (0..BUCKETS)
        .filter(|&b| mine.buckets[b] == theirs.buckets[b])
        .count();
    assert!(complete > 0);
    // Asking again for what still differs, repeatedly, completes the transfer.
    for _ in 0..BUCKETS {
        let Some(want) = got.wanted(&plans.summary()) else {
            break;
        };
        for m in respond(&plans, &want) {
            if let Ok(Message::Changes(changes)) = Message::decode(&m) {
                for c in &changes {
                    got.merge(c, 0, &mut interner);
                }
            }
        }
    }
    assert_eq!(got.sync_digest(), plans.sync_digest());
    assert_eq!(got.names().len(), 4_000);
    assert!(bucket_of("plan-1") < BUCKETS);
}

proptest! {
    #[test]
    fn any_bytes_decode_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Message::decode(&bytes);
        let mut with_header = vec![PROTOCOL, KIND_CHANGES];
        with_header.extend_from_slice(&bytes);
        let _ = Message::decode(&with_header);
    }
}
