//! `tollgate plans apply`: brings each primary's plans to the file's, then checks that
//! every node — replicas included — reports the file's plan-set digest.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use redis::Value;

use crate::nodes::{text, tollgate_info, Node};
use crate::plansfile::PlanSet;

/// What one node holds now.
pub fn fetch(con: &mut redis::Connection) -> Result<PlanSet, String> {
    let names: Vec<String> = redis::cmd("RL.PLAN.LIST")
        .query(con)
        .map_err(|e| format!("RL.PLAN.LIST: {e}"))?;
    let mut plans = BTreeMap::new();
    for name in names {
        let reply: Value = redis::cmd("RL.PLAN.GET")
            .arg(&name)
            .query(con)
            .map_err(|e| format!("RL.PLAN.GET: {e}"))?;
        let pairs: Vec<(String, String)> = match reply {
            Value::Array(items) => items
                .chunks(2)
                .filter_map(|kv| Some((text(kv.first()?), text(kv.get(1)?))))
                .collect(),
            Value::Map(items) => items.iter().map(|(k, v)| (text(k), text(v))).collect(),
            _ => Vec::new(),
        };
        plans.insert(name, pairs);
    }
    // From INFO rather than RL.PLAN.DEFAULT, which is a write command (it also sets).
    let info = tollgate_info(con)?;
    let default = info.get("plans_default").filter(|d| !d.is_empty()).cloned();
    Ok(PlanSet { default, plans })
}

/// One change to make on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Set these fields of a plan (creating it if new).
    Set {
        plan: String,
        fields: Vec<(String, String)>,
        new: bool,
    },
    /// Remove these fields of a plan.
    Remove {
        plan: String,
        fields: Vec<String>,
    },
    /// Remove a whole plan (`--prune`).
    Drop {
        plan: String,
    },
    Default {
        plan: String,
    },
}

fn is_fallback(field: &str) -> bool {
    field.eq_ignore_ascii_case("fallback")
}

/// The changes that turn `current` into `wanted`, in an order that never closes a
/// fallback loop on the way: stale fallbacks go first, new ones last.
pub fn plan_changes(current: &PlanSet, wanted: &PlanSet, prune: bool) -> Vec<Change> {
    let mut early = Vec::new();
    let mut sets = Vec::new();
    let mut removes = Vec::new();
    let mut late = Vec::new();
    for (name, fields) in &wanted.plans {
        let have: BTreeMap<&str, &str> = current
            .plans
            .get(name)
            .map(|f| f.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect())
            .unwrap_or_default();
        let want: BTreeMap<&str, &str> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let new = !current.plans.contains_key(name);
        // In file order: the order fields are first set is the order limits report in.
        let changed: Vec<(String, String)> = fields
            .iter()
            .filter(|(k, v)| have.get(k.as_str()) != Some(&v.as_str()))
            .cloned()
            .collect();
        let (fallback, others): (Vec<_>, Vec<_>) =
            changed.into_iter().partition(|(k, _)| is_fallback(k));
        let stale: Vec<String> = have
            .keys()
            .filter(|k| !want.contains_key(*k))
            .map(|k| k.to_string())
            .collect();
        let (stale_fallback, stale_others): (Vec<_>, Vec<_>) =
            stale.into_iter().partition(|k| is_fallback(k));
        if !fallback.is_empty() && have.keys().any(|k| is_fallback(k)) {
            early.push(Change::Remove {
                plan: name.clone(),
                fields: vec!["fallback".into()],
            });
        }
        if !stale_fallback.is_empty() {
            early.push(Change::Remove {
                plan: name.clone(),
                fields: stale_fallback,
            });
        }
        if !others.is_empty() {
            sets.push(Change::Set {
                plan: name.clone(),
                fields: others,
                new,
            });
        }
        if !stale_others.is_empty() {
            removes.push(Change::Remove {
                plan: name.clone(),
                fields: stale_others,
            });
        }
        if !fallback.is_empty() {
            late.push(Change::Set {
                plan: name.clone(),
                fields: fallback,
                new: new && want.len() == 1,
            });
        }
    }
    if let Some(default) = &wanted.default {
        if current.default.as_ref() != Some(default) {
            late.push(Change::Default {
                plan: default.clone(),
            });
        }
    }
    if prune {
        for plan in kept_plans(current, wanted) {
            late.push(Change::Drop { plan });
        }
    }
    early
        .into_iter()
        .chain(sets)
        .chain(removes)
        .chain(late)
        .collect()
}

/// The plans `current` holds that `wanted` does not define (what `--prune` deletes).
pub fn kept_plans(current: &PlanSet, wanted: &PlanSet) -> Vec<String> {
    current
        .plans
        .keys()
        .filter(|n| !wanted.plans.contains_key(*n))
        .cloned()
        .collect()
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Set { plan, fields, new } => {
                let list: Vec<String> =
                    fields.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                write!(
                    f,
                    "{} {plan}: {}",
                    if *new { "+ new plan" } else { "~ set" },
                    list.join(" ")
                )
            }
            Change::Remove { plan, fields } => write!(f, "- remove {plan}: {}", fields.join(" ")),
            Change::Drop { plan } => write!(f, "- drop plan {plan}"),
            Change::Default { plan } => write!(f, "~ default plan: {plan}"),
        }
    }
}

/// Applies `changes` on one node, in order.
pub fn apply_changes(con: &mut redis::Connection, changes: &[Change]) -> Result<(), String> {
    for change in changes {
        let cmd = match change {
            Change::Set { plan, fields, .. } => {
                let mut c = redis::cmd("RL.PLAN.SET");
                c.arg(plan);
                for (k, v) in fields {
                    c.arg(k).arg(v);
                }
                c
            }
            Change::Remove { plan, fields } => {
                let mut c = redis::cmd("RL.PLAN.DEL");
                c.arg(plan).arg(fields);
                c
            }
            Change::Drop { plan } => {
                let mut c = redis::cmd("RL.PLAN.DEL");
                c.arg(plan);
                c
            }
            Change::Default { plan } => {
                let mut c = redis::cmd("RL.PLAN.DEFAULT");
                c.arg(plan);
                c
            }
        };
        cmd.query::<Value>(con)
            .map_err(|e| format!("{change}: {e}"))?;
    }
    Ok(())
}

/// The plan-set digest a node reports (`INFO tollgate`: `plans_digest`).
pub fn plans_digest(con: &mut redis::Connection) -> Result<u64, String> {
    let info = tollgate_info(con)?;
    let hex = info.get("plans_digest").map(String::as_str).unwrap_or("");
    u64::from_str_radix(hex, 16).map_err(|_| format!("INFO tollgate has no plans_digest ({hex:?})"))
}

/// Waits until every node reports `digest` (replicas follow their primaries).
/// Returns the nodes that still disagree after `timeout`.
pub fn verify(nodes: &[Node], digest: u64, timeout: Duration) -> Vec<String> {
    let want = format!("{digest:016x}");
    let deadline = Instant::now() + timeout;
    loop {
        let mut disagree = Vec::new();
        for node in nodes {
            let got = node
                .connect()
                .and_then(|mut con| tollgate_info(&mut con))
                .map(|info| info.get("plans_digest").cloned().unwrap_or_default())
                .unwrap_or_else(|e| format!("unreachable ({e})"));
            if got != want {
                disagree.push(format!("{} has digest {got}, want {want}", node.name));
            }
        }
        if disagree.is_empty() || Instant::now() >= deadline {
            return disagree;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(plans: &[(&str, &[(&str, &str)])], default: Option<&str>) -> PlanSet {
        PlanSet {
            default: default.map(str::to_string),
            plans: plans
                .iter()
                .map(|(n, f)| {
                    (
                        n.to_string(),
                        f.iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn changes_are_minimal_and_ordered_to_avoid_loops() {
        let current = set(
            &[
                (
                    "a",
                    &[("rpm", "cap 1"), ("old", "cap 2"), ("fallback", "b")],
                ),
                ("b", &[("rpm", "cap 1")]),
            ],
            None,
        );
        let wanted = set(
            &[
                ("a", &[("rpm", "cap 1")]),
                ("b", &[("rpm", "cap 5"), ("fallback", "a")]),
            ],
            Some("a"),
        );
        let changes = plan_changes(&current, &wanted, false);
        assert_eq!(
            changes,
            [
                Change::Remove {
                    plan: "a".into(),
                    fields: vec!["fallback".into()]
                },
                Change::Set {
                    plan: "b".into(),
                    fields: vec![("rpm".into(), "cap 5".into())],
                    new: false
                },
                Change::Remove {
                    plan: "a".into(),
                    fields: vec!["old".into()]
                },
                Change::Set {
                    plan: "b".into(),
                    fields: vec![("fallback".into(), "a".into())],
                    new: false
                },
                Change::Default { plan: "a".into() },
            ]
        );
        assert!(plan_changes(&wanted, &wanted, true).is_empty());
        let only_b = set(&[("b", &[("rpm", "cap 1")])], None);
        let pruned = plan_changes(&current, &only_b, true);
        assert_eq!(pruned, [Change::Drop { plan: "a".into() }]);
        assert_eq!(kept_plans(&current, &only_b), ["a"]);
        assert!(
            plan_changes(&current, &only_b, false).is_empty(),
            "without prune, extra plans are kept"
        );
    }
}
