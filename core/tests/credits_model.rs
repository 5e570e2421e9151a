//! Property tests of credits: conservation of the balance, and replicas that replay
//! each write's delta staying identical to the primary.

mod common;

use proptest::prelude::*;
use tollgate_core::codec::Writer;
use tollgate_core::credits::{CreditSettings, Credits, Touched};
use tollgate_core::delta::{CreditsDelta, CreditsDeltaWriter, KeyExpiry};

const SETTINGS: CreditSettings = CreditSettings {
    window_ms: 2_000,
    max_ids: 4,
    max_blocks: 64,
};

#[derive(Debug, Clone)]
enum Op {
    Grant {
        amount: u64,
        ttl: Option<u64>,
        id: Option<u8>,
    },
    Deduct {
        amount: u64,
        partial: bool,
        id: Option<u8>,
    },
    Refund(u8),
    Revoke(u8),
    Advance(u64),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let id = proptest::option::of(0u8..6);
    proptest::collection::vec(
        prop_oneof![
            3 => (amount(1..100), proptest::option::of(1u64..3_000), id.clone())
                .prop_map(|(amount, ttl, id)| Op::Grant { amount, ttl, id }),
            4 => (amount(0..150), any::<bool>(), id).prop_map(|(amount, partial, id)| Op::Deduct { amount, partial, id }),
            1 => (0u8..6).prop_map(Op::Refund),
            1 => (0u8..6).prop_map(Op::Revoke),
            2 => (0u64..1_500).prop_map(Op::Advance),
        ],
        1..120,
    )
}

/// Small amounts mostly, and amounts near `u64::MAX` (where balances overflow).
fn amount(small: std::ops::Range<u64>) -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => small,
        1 => (0u64..4).prop_map(|d| u64::MAX - d),
        1 => (0u64..4).prop_map(|d| u64::MAX / 2 - d),
    ]
}

fn name(prefix: &str, id: u8) -> Vec<u8> {
    format!("{prefix}{id}").into_bytes()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The balance is always the sum of live blocks; grants minus deductions plus
    /// refunds minus revocations minus what expired unused reconcile to it exactly;
    /// and a replica replaying every write's delta is identical to the primary.
    #[test]
    fn balance_reconciles_and_replicas_follow(ops in ops()) {
        let mut primary = Credits::new();
        let mut replica = Credits::new();
        let mut now = 1_000_000u64;
        let mut expected: i128 = 0;
        for op in ops {
            let mut touched = Touched::default();
            match op {
                Op::Grant { amount, ttl, id } => {
                    let before = primary.balance(now);
                    let id = id.map(|i| name("block-", i));
                    match primary.grant(amount, ttl.map(|t| now + t), id.as_deref(), now, &SETTINGS, &mut touched) {
                        Ok(balance) => {
                            // A repeat of a remembered id changes nothing.
                            let took_effect = primary.balance(now) != before;
                            if took_effect {
                                expected += i128::from(amount);
                            }
                            let _ = balance;
                        }
                        Err(_) => prop_assert_eq!(primary.balance(now), before),
                    }
                }
                Op::Deduct { amount, partial, id } => {
                    let before = primary.balance(now);
                    let id = id.map(|i| name("req-", i));
                    let Ok((deducted, balance)) = primary.deduct(amount, partial, id.as_deref(), now, &SETTINGS, &mut touched) else {
                        // A refunded id is refused and changes nothing.
                        prop_assert_eq!(primary.balance(now), before);
                        continue;
                    };
                    // Changed by exactly the deduction, or not at all (a remembered id
                    // returns its first result, whatever the amount asked now).
                    let drop = i128::from(before) - i128::from(primary.balance(now));
                    prop_assert!(drop == i128::from(deducted) || drop == 0);
                    if drop > 0 {
                        prop_assert!(deducted <= amount);
                        prop_assert!(partial || deducted == amount);
                    }
                    expected -= drop;
                    let _ = balance;
                }
                Op::Refund(i) => {
                    let before = primary.balance(now);
                    let (refunded, balance) = primary.refund(&name("req-", i), now, &mut touched);
                    prop_assert_eq!(balance, before + refunded);
                    expected += i128::from(refunded);
                }
                Op::Revoke(i) => {
                    let removed = primary.revoke(&name("block-", i), now, &mut touched);
                    expected -= i128::from(removed);
                }
                Op::Advance(dt) => {
                    let before = primary.balance(now);
                    now += dt;
                    // What expired unused leaves the balance.
                    expected -= i128::from(before - primary.balance(now));
                }
            }
            // Whatever the commands made encodes, decodes back to itself, and so
            // saves and loads (RDB, DUMP/RESTORE, AOF rewrite).
            let mut w = Writer::new();
            primary.encode(&mut w);
            let bytes = w.into_inner();
            let decoded = Credits::decode(&bytes);
            prop_assert_eq!(decoded.as_ref(), Ok(&primary));
            let balance = primary.balance(now);
            let live: u64 = primary.live_blocks(now).map(|(_, left, granted, _)| {
                assert!(left <= granted);
                left
            }).sum();
            prop_assert_eq!(balance, live);
            prop_assert_eq!(i128::from(balance), expected);
            // Replay the write on the replica, as RL.APPLY would.
            if touched != Touched::default() {
                let mut w = CreditsDeltaWriter::new(Vec::new());
                w.changes(&primary, &touched).expiry(KeyExpiry::Keep);
                let payload = w.finish();
                let delta = CreditsDelta::decode(&payload).unwrap();
                delta.apply(&mut replica);
                prop_assert_eq!(&replica, &primary);
            }
        }
    }
}
