use super::*;
use crate::codec::{Reader, Writer};

fn by(origin: &str, now_ms: u64) -> Author<'_> {
    Author { origin, now_ms }
}

fn fields(pairs: &[(&str, &str)]) -> Fields {
    pairs
        .iter()
        .map(|(f, v)| (Box::<str>::from(*f), Box::<str>::from(*v)))
        .collect()
}

fn plan_change(name: &str, counter: u64, origin: &str, pairs: Option<&[(&str, &str)]>) -> Change {
    Change::Plan {
        name: name.into(),
        stamp: Stamp {
            counter,
            origin: origin.into(),
        },
        fields: pairs.map(fields),
    }
}

fn field_list(plans: &Plans, name: &str) -> Option<Vec<String>> {
    plans
        .get(name)
        .map(|p| p.fields().iter().map(|(f, v)| format!("{f}={v}")).collect())
}

fn merge(plans: &mut Plans, change: &Change) -> Merged {
    plans.merge(change, 0, &mut LayoutInterner::new())
}

#[test]
fn local_changes_return_the_change_that_reproduces_them() {
    let mut interner = LayoutInterner::new();
    let mut a = Plans::new();
    let mut b = Plans::new();
    let (added, set) = a
        .set_by(
            by("n1", 1_000),
            "p",
            &[("x", "cap 1"), ("y", "cap 2")],
            &mut interner,
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
    assert_eq!(added, 2);
    assert_eq!(
        set.stamp().counter,
        1_000,
        "the wall clock leads the counter"
    );
    assert_eq!(merge(&mut b, &set), Merged::Applied);
    let (removed, del) = a
        .delete_by(by("n1", 5), "p", &["x"], &mut interner)
        .unwrap_or_else(|e| unreachable!("{e}"));
    assert_eq!(removed, 1);
    let del = del.unwrap_or_else(|| unreachable!());
    assert_eq!(del.stamp().counter, 1_001, "the counter never goes back");
    assert_eq!(merge(&mut b, &del), Merged::Applied);
    let default = a
        .set_default_by(by("n1", 0), Some("p"))
        .unwrap_or_else(|e| unreachable!("{e}"));
    assert_eq!(merge(&mut b, &default), Merged::Applied);
    assert_eq!(a.sync_digest(), b.sync_digest());
    assert_eq!(a.digest(), b.digest());
    assert_eq!(field_list(&b, "p"), Some(vec!["y=cap 2".to_string()]));
    assert_eq!(b.default_plan(), Some("p"));
    assert_eq!(a.version(), 1_002);
    assert_eq!(b.version(), 1_002);
    assert_eq!(b.newest(), 1_002);
    // The default plan cannot be deleted: clear the default first.
    assert!(a.delete_by(by("n1", 0), "p", &[], &mut interner).is_err());
    assert!(a.set_default_by(by("n1", 0), None).is_ok());
    // Pruning the newest change (a deletion) lowers `newest`, never the clock.
    assert!(a.delete_by(by("n1", 0), "p", &[], &mut interner).is_ok());
    assert_eq!(a.newest(), 1_004);
    a.prune(1_004 + TOMBSTONE_RETENTION_MS + 1);
    assert_eq!(a.newest(), 1_003);
    assert_eq!(a.version(), 1_004);
}

#[test]
fn a_newer_change_wins_and_an_older_or_repeated_one_changes_nothing() {
    let mut plans = Plans::new();
    let old = plan_change("p", 5, "a", Some(&[("x", "cap 1")]));
    let new = plan_change("p", 6, "a", Some(&[("x", "cap 2")]));
    assert_eq!(merge(&mut plans, &new), Merged::Applied);
    let before = plans.sync_digest();
    assert_eq!(merge(&mut plans, &old), Merged::Stale);
    assert_eq!(merge(&mut plans, &new), Merged::Stale);
    assert_eq!(plans.sync_digest(), before);
    assert_eq!(field_list(&plans, "p"), Some(vec!["x=cap 2".to_string()]));
    assert_eq!(plans.version(), 6);
}

#[test]
fn equal_counters_are_ordered_by_origin_then_by_value() {
    let low = plan_change("p", 7, "a", Some(&[("x", "cap 1")]));
    let high = plan_change("p", 7, "b", Some(&[("x", "cap 2")]));
    for order in [[&low, &high], [&high, &low]] {
        let mut plans = Plans::new();
        for c in order {
            merge(&mut plans, c);
        }
        assert_eq!(field_list(&plans, "p"), Some(vec!["x=cap 2".to_string()]));
    }
    // Same stamp, different values (a node that lost its clock): still one winner.
    let one = plan_change("p", 7, "a", Some(&[("x", "cap 1")]));
    let two = plan_change("p", 7, "a", Some(&[("x", "cap 9")]));
    let mut ab = Plans::new();
    let mut ba = Plans::new();
    merge(&mut ab, &one);
    merge(&mut ab, &two);
    merge(&mut ba, &two);
    merge(&mut ba, &one);
    assert_eq!(ab.sync_digest(), ba.sync_digest());
    assert_eq!(field_list(&ab, "p"), field_list(&ba, "p"));
}

#[test]
fn a_deletion_is_not_undone_by_an_older_change_arriving_late() {
    let mut plans = Plans::new();
    let set = plan_change("p", 1, "a", Some(&[("x", "cap 1")]));
    let del = plan_change("p", 2, "b", None);
    assert_eq!(merge(&mut plans, &del), Merged::Applied);
    assert_eq!(plans.tombstones(), 1);
    assert_eq!(merge(&mut plans, &set), Merged::Stale);
    assert!(plans.get("p").is_none());
    assert!(plans.names().is_empty());
    // A newer set brings it back and replaces the tombstone.
    let again = plan_change("p", 3, "a", Some(&[("x", "cap 3")]));
    assert_eq!(merge(&mut plans, &again), Merged::Applied);
    assert_eq!(plans.tombstones(), 0);
    assert_eq!(plans.len(), 1);
}

#[test]
fn the_default_plan_is_a_register_of_its_own() {
    let mut plans = Plans::new();
    let free = Change::Default {
        stamp: Stamp {
            counter: 4,
            origin: "a".into(),
        },
        plan: Some("free".into()),
    };
    let cleared = Change::Default {
        stamp: Stamp {
            counter: 3,
            origin: "z".into(),
        },
        plan: None,
    };
    assert_eq!(merge(&mut plans, &free), Merged::Applied);
    assert_eq!(merge(&mut plans, &cleared), Merged::Stale);
    assert_eq!(plans.default_plan(), Some("free"));
    assert!(plans.set_default(None).is_ok());
    assert_eq!(plans.default_plan(), None);
    assert!(plans
        .default_version()
        .is_some_and(|v| v.stamp.counter == 5));
    assert!(plans.set_default(Some("*")).is_err());
}

#[test]
fn a_merge_keeps_a_plan_this_build_cannot_use_without_failing() {
    let mut plans = Plans::new();
    let future = plan_change("p", 9, "a", Some(&[("x", "teleport 5/1s")]));
    let merged = merge(&mut plans, &future);
    assert!(matches!(merged, Merged::Unusable(ref e) if e.to_string().contains("'x'")));
    assert!(plans.get("p").is_none());
    assert!(plans.names().is_empty());
    assert_eq!(plans.len(), 0);
    assert_eq!(plans.unusable().len(), 1);
    // It is part of the synced state and survives encoding.
    let mut w = Writer::new();
    plans.encode(&mut w);
    let back = Plans::decode(&mut Reader::new(&w.buf), &mut LayoutInterner::new());
    assert_eq!(
        back.as_ref().map(Plans::sync_digest).ok(),
        Some(plans.sync_digest())
    );
    assert_eq!(back.map(|b| b.unusable().len()).ok(), Some(1));
    // A local delete removes it; a newer valid change would replace it.
    let mut interner = LayoutInterner::new();
    assert_eq!(plans.delete("p", &[], &mut interner), Ok(1));
    assert!(plans.unusable().is_empty());
}

#[test]
fn concurrent_fallbacks_that_close_a_loop_are_kept_and_counted() {
    let mut interner = LayoutInterner::new();
    let mut a = Plans::new();
    let mut b = Plans::new();
    let mut changes = Vec::new();
    for (name, spec) in [("p", "cap 1"), ("q", "cap 2"), ("r", "cap 3")] {
        let (_, c) = a
            .set_by(by("a", 0), name, &[("x", spec)], &mut interner)
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(merge(&mut b, &c), Merged::Applied);
    }
    // Each node adds one edge; each is fine alone.
    let (_, pq) = a
        .set_by(by("a", 0), "p", &[("fallback", "q")], &mut interner)
        .unwrap_or_else(|e| unreachable!("{e}"));
    let (_, qp) = b
        .set_by(by("b", 0), "q", &[("fallback", "p")], &mut interner)
        .unwrap_or_else(|e| unreachable!("{e}"));
    changes.push(pq.clone());
    changes.push(qp.clone());
    assert_eq!(a.fallback_loops(), 0);
    assert_eq!(merge(&mut a, &qp), Merged::Applied);
    assert_eq!(merge(&mut b, &pq), Merged::Applied);
    assert_eq!(a.sync_digest(), b.sync_digest());
    assert_eq!(a.fallback_loops(), 2);
    assert_eq!(a.fallback_loop("p"), Some(vec!["p", "q"]));
    // A plan leading into the loop is not on it.
    assert!(a.set("r", &[("fallback", "p")], &mut interner).is_err());
    // A local change that extends the loop is refused; breaking it is fine.
    let err = a
        .set("p", &[("fallback", "q")], &mut interner)
        .map_err(|e| e.to_string());
    assert!(err.is_err_and(|e| e.contains("loop")));
    assert_eq!(a.delete("q", &["fallback"], &mut interner), Ok(1));
    assert_eq!(a.fallback_loops(), 0);
    assert!(a.set("r", &[("fallback", "p")], &mut interner).is_ok());
    assert_eq!(a.fallback_loop("r"), None);
}

#[test]
fn tombstones_are_kept_for_the_retention_then_pruned() {
    let day = MS_PER_DAY;
    let t0 = 100 * day;
    let mut plans = Plans::new();
    let mut interner = LayoutInterner::new();
    assert!(plans
        .set_by(by("a", t0), "p", &[("x", "cap 1")], &mut interner)
        .is_ok());
    assert!(plans
        .delete_by(by("a", t0), "p", &[], &mut interner)
        .is_ok());
    assert_eq!(plans.tombstones(), 1);
    assert_eq!(plans.prune(t0 + TOMBSTONE_RETENTION_MS), 0);
    assert_eq!(plans.tombstones(), 1);
    assert_eq!(plans.prune(t0 + TOMBSTONE_RETENTION_MS + 2), 1);
    assert_eq!(plans.tombstones(), 0);
    assert_eq!(plans.sync_digest(), Plans::new().sync_digest());
    // A peer's expired tombstone is not taken, but still removes an older plan.
    let old_del = plan_change("q", t0, "b", None);
    let now = t0 + TOMBSTONE_RETENTION_MS + 2;
    assert_eq!(plans.merge(&old_del, now, &mut interner), Merged::Stale);
    assert_eq!(plans.tombstones(), 0);
    let older_set = plan_change("q", t0 - 1, "b", Some(&[("x", "cap 1")]));
    assert_eq!(plans.merge(&older_set, now, &mut interner), Merged::Applied);
    assert_eq!(plans.merge(&old_del, now, &mut interner), Merged::Applied);
    assert!(plans.get("q").is_none());
    assert_eq!(plans.tombstones(), 0);
}

#[test]
fn tombstones_past_the_cap_go_oldest_first() {
    let mut plans = Plans::new();
    let mut interner = LayoutInterner::new();
    for i in 0..(MAX_TOMBSTONES as u64 + 3) {
        let c = plan_change(&format!("p{i}"), i + 1, "a", None);
        assert_eq!(plans.merge(&c, 0, &mut interner), Merged::Applied);
    }
    assert_eq!(plans.prune(1), 3);
    assert_eq!(plans.tombstones(), MAX_TOMBSTONES);
    for i in 0..3 {
        assert!(plans.plan_version(&format!("p{i}")).is_none());
    }
    assert!(plans.plan_version("p3").is_some());
    assert_eq!(plans.prune(1), 0);
}

#[test]
fn the_clock_refuses_to_wrap() {
    let mut plans = Plans::new();
    let far = plan_change("p", u64::MAX, "a", Some(&[("x", "cap 1")]));
    assert_eq!(merge(&mut plans, &far), Merged::Applied);
    let err = plans.set("q", &[("x", "cap 1")], &mut LayoutInterner::new());
    assert!(err.is_err_and(|e| e.message.contains("clock")));
    assert!(plans.get("q").is_none());
}

#[test]
fn summaries_name_the_buckets_that_differ() {
    let mut interner = LayoutInterner::new();
    let mut a = Plans::new();
    let b = Plans::new();
    assert_eq!(a.wanted(&b.summary()), None);
    assert!(a.set("p", &[("x", "cap 1")], &mut interner).is_ok());
    let want = b.wanted(&a.summary()).unwrap_or_default();
    assert_eq!(want.buckets, 1 << bucket_of("p"));
    assert!(!want.default);
    let changes = a.changes(&want);
    assert_eq!(changes.len(), 1);
    assert!(a.set_default(Some("p")).is_ok());
    let want = b.wanted(&a.summary()).unwrap_or_default();
    assert!(want.default);
    assert_eq!(a.changes(&Want::all()).len(), 2);
    assert_eq!(a.changes(&Want::default()).len(), 0);
}

#[test]
fn the_registry_round_trips_with_versions_and_tombstones() {
    let mut interner = LayoutInterner::new();
    let mut plans = Plans::new();
    assert!(plans
        .set_by(
            by("n1", 10),
            "free",
            &[("rpm", "sliding 10/1m"), ("fallback", "x")],
            &mut interner
        )
        .is_ok());
    assert!(plans
        .set_by(
            by("n2", 20),
            "pro",
            &[("tpm", "bucket 5 token/1s")],
            &mut interner
        )
        .is_ok());
    assert!(plans
        .set_by(by("n2", 30), "gone", &[("a", "cap 1")], &mut interner)
        .is_ok());
    assert!(plans
        .delete_by(by("n2", 40), "gone", &[], &mut interner)
        .is_ok());
    assert!(plans.set_default_by(by("n1", 50), Some("free")).is_ok());
    let mut w = Writer::new();
    plans.encode(&mut w);
    let buf = w.into_inner();
    let back = Plans::decode(&mut Reader::new(&buf), &mut interner)
        .unwrap_or_else(|e| unreachable!("{e}"));
    assert_eq!(back.names(), vec!["free", "pro"]);
    assert_eq!(back.default_plan(), Some("free"));
    assert_eq!(back.version(), plans.version());
    assert_eq!(back.tombstones(), 1);
    assert_eq!(back.sync_digest(), plans.sync_digest());
    assert_eq!(back.digest(), plans.digest());
    assert_eq!(back.plan_version("pro"), plans.plan_version("pro"));
    let mut again = Writer::new();
    back.encode(&mut again);
    assert_eq!(again.buf, buf, "the encoding is canonical");
    for cut in 0..buf.len() {
        assert!(Plans::decode(&mut Reader::new(&buf[..cut]), &mut interner).is_err());
    }
}

/// The encoding-1 writer, as the module wrote plans before stamps existed.
fn encode_v1(version: u64, default: Option<&str>, plans: &[(&str, &[(&str, &str)])]) -> Vec<u8> {
    let mut w = Writer::new();
    w.varint(version);
    match default {
        Some(d) => {
            w.u8(1);
            w.str(d);
        }
        None => w.u8(0),
    }
    w.varint(plans.len() as u64);
    for (name, fields) in plans {
        w.str(name);
        w.varint(fields.len() as u64);
        for (f, v) in *fields {
            w.str(f);
            w.str(v);
        }
    }
    w.into_inner()
}

#[test]
fn encoding_1_loads_with_the_oldest_stamp() {
    let buf = encode_v1(
        6,
        Some("free"),
        &[
            ("free", &[("rpm", "sliding 10/1m")]),
            ("odd", &[("x", "teleport 1/1s")]),
        ],
    );
    let mut interner = LayoutInterner::new();
    let mut plans = Plans::decode_v1(&mut Reader::new(&buf), &mut interner)
        .unwrap_or_else(|e| unreachable!("{e}"));
    assert_eq!(plans.names(), vec!["free"]);
    assert_eq!(plans.unusable().len(), 1, "loaded, not refused");
    assert_eq!(plans.default_plan(), Some("free"));
    assert_eq!(plans.version(), 6);
    assert_eq!(plans.plan_version("free").map(|v| v.stamp.counter), Some(0));
    // Any change made since wins over what was loaded.
    let newer = plan_change("free", 1, "", Some(&[("rpm", "sliding 20/1m")]));
    assert_eq!(plans.merge(&newer, 0, &mut interner), Merged::Applied);
    for cut in 0..buf.len() {
        assert!(Plans::decode_v1(&mut Reader::new(&buf[..cut]), &mut interner).is_err());
    }
    assert!(Plans::decode_v1(&mut Reader::new(&[0, 7]), &mut interner).is_err());
}

#[test]
fn the_content_digest_is_the_one_encoding_1_reported() {
    // The plans of tests/fixtures/plans-v1.rdb, whose server reported this digest.
    let mut interner = LayoutInterner::new();
    let mut plans = Plans::new();
    let free: &[(&str, &str)] = &[
        ("rpm", "sliding 10/1m"),
        ("rpd", "fixed 200/1d"),
        ("tpm", "bucket 2000 token/1m burst 4000"),
        ("jobs", "concurrency 4 ttl 60s"),
        ("big", "cap 2000 token"),
        ("spend", "fixed 1000000 usd_micros/1mo warn 80%"),
    ];
    assert!(plans.set("free", free, &mut interner).is_ok());
    assert!(plans
        .set(
            "pro",
            &[
                ("rpm", "sliding 60/1m"),
                ("tpm", "bucket 100000 token/1m"),
                ("fallback", "free")
            ],
            &mut interner
        )
        .is_ok());
    assert!(plans
        .set(
            "beta",
            &[("MODE", "shadow"), ("chat", "fixed 5/1s for chat,images")],
            &mut interner
        )
        .is_ok());
    assert!(plans.set("gone", &[("a", "cap 1")], &mut interner).is_ok());
    assert_eq!(plans.delete("gone", &[], &mut interner), Ok(1));
    assert!(plans.set_default(Some("free")).is_ok());
    assert_eq!(format!("{:016x}", plans.digest()), "36d816f7b0d0d1bd");
}

#[test]
fn a_change_decodes_to_itself_and_refuses_garbage() {
    let changes = [
        plan_change("p", 1, "n", Some(&[("x", "cap 1")])),
        plan_change("p", u64::MAX, "", None),
        Change::Default {
            stamp: Stamp::default(),
            plan: Some("p".into()),
        },
        Change::Default {
            stamp: Stamp::default(),
            plan: None,
        },
    ];
    for change in &changes {
        let mut w = Writer::new();
        change.encode(&mut w);
        let mut r = Reader::new(&w.buf);
        assert_eq!(Change::decode(&mut r).as_ref(), Ok(change));
        assert!(r.is_empty());
    }
    assert!(Change::decode(&mut Reader::new(&[9])).is_err());
    let mut w = Writer::new();
    w.u8(TAG_PLAN_DELETED);
    w.str("p");
    w.varint(1);
    w.str(&"x".repeat(MAX_ORIGIN_LEN + 1));
    assert!(Change::decode(&mut Reader::new(&w.buf)).is_err());
}

#[test]
fn max_plans_still_bounds_local_creation() {
    let mut plans = Plans::new();
    let mut interner = LayoutInterner::new();
    for i in 0..MAX_PLANS {
        let c = plan_change(&format!("p{i}"), 1, "a", Some(&[("x", "cap 1")]));
        plans.merge(&c, 0, &mut interner);
    }
    assert!(plans
        .set("one-more", &[("x", "cap 1")], &mut interner)
        .is_err());
    assert!(plans.set("p7", &[("x", "cap 2")], &mut interner).is_ok());
    // Merges are never refused, even past the cap.
    let c = plan_change("remote", 1, "b", Some(&[("x", "cap 1")]));
    assert_eq!(plans.merge(&c, 0, &mut interner), Merged::Applied);
    assert_eq!(plans.len(), MAX_PLANS + 1);
}

#[test]
fn a_default_deleted_by_a_concurrent_change_resolves_to_a_clear_error() {
    use crate::plan::ResolveError;
    let mut interner = LayoutInterner::new();
    let mut a = Plans::new();
    let (_, created) = a
        .set_by(by("a", 0), "cp", &[("x", "cap 1")], &mut interner)
        .unwrap_or_else(|e| unreachable!("{e}"));
    let mut b = Plans::new();
    assert_eq!(merge(&mut b, &created), Merged::Applied);
    // b deletes `cp` while a makes it the default: each is fine alone.
    let (_, deleted) = b
        .delete_by(by("b", 0), "cp", &[], &mut interner)
        .unwrap_or_else(|e| unreachable!("{e}"));
    let deleted = deleted.unwrap_or_else(|| unreachable!());
    let made_default = a
        .set_default_by(by("a", 0), Some("cp"))
        .unwrap_or_else(|e| unreachable!("{e}"));
    assert_eq!(merge(&mut a, &deleted), Merged::Applied);
    assert_eq!(merge(&mut b, &made_default), Merged::Applied);
    assert_eq!(a.sync_digest(), b.sync_digest());
    assert!(a.is_deleted("cp"));
    assert_eq!(
        a.resolve("*", None).err(),
        Some(ResolveError::Dangling {
            name: "cp",
            assigned: false
        })
    );
    assert_eq!(
        a.resolve("*", Some("cp")).err(),
        Some(ResolveError::Dangling {
            name: "cp",
            assigned: true
        })
    );
    assert_eq!(
        a.resolve("cp", None).err(),
        Some(ResolveError::Unknown("cp"))
    );
}
