//! Plans: named sets of limits, shaped and edited like Redis hashes. The registry that
//! holds them all, and keeps nodes of a cluster in agreement, is [`crate::registry`].
//!
//! A plan keeps its fields exactly as set (for `RL.PLAN.GET`) next to the compiled
//! limits. Two field names are reserved: `fallback <plan>` and `mode enforce|shadow`.
//! Every change is validated as a whole before anything is replaced, so a refused
//! change leaves the registry as it was.

use std::fmt;
use std::sync::Arc;

use crate::layout::{Layout, LayoutInterner, Shape, Slot};
use crate::spec::{is_valid_name, parse_limit_spec, LimitSpec, Rule};

/// Why a call's plan argument names no plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveError<'a> {
    /// `*` with no assigned plan and no default plan.
    NothingForStar,
    Unknown(&'a str),
    /// `*` resolved to a plan that does not exist: the subject's assigned plan
    /// (`assigned`) or the default plan, deleted since (on a cluster, possibly on
    /// another primary at the same moment the default was set).
    Dangling {
        name: &'a str,
        assigned: bool,
    },
}

impl fmt::Display for ResolveError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::NothingForStar => {
                f.write_str("plan '*': the subject has no assigned plan and no default plan is set")
            }
            ResolveError::Unknown(name) => write!(f, "unknown plan '{name}'"),
            ResolveError::Dangling {
                name,
                assigned: true,
            } => write!(
                f,
                "plan '*': the subject's assigned plan '{name}' does not exist; \
                 create it, or RL.ASSIGN the subject another plan"
            ),
            ResolveError::Dangling {
                name,
                assigned: false,
            } => write!(
                f,
                "plan '*': the default plan '{name}' does not exist; create it or set \
                 another default with RL.PLAN.DEFAULT"
            ),
        }
    }
}

/// Words a unit may not be called: `RL.ACQUIRE`'s keywords (`COST credits 3` would
/// read as the `CREDITS` option, so such a unit could never be charged) and `lease`
/// (what concurrency limits count).
pub const RESERVED_UNITS: [&str; 10] = [
    "cost", "endpoint", "id", "ttl", "wait", "priority", "credits", "compact", "also", "lease",
];

/// Refuses a plan whose limits count a reserved unit (checked when a command sets a
/// plan; plans loaded or merged from elsewhere are taken as they are).
pub fn check_units(plan: &Plan) -> Result<(), PlanError> {
    for limit in &plan.limits {
        let unit = &*limit.spec.unit;
        let reserved = RESERVED_UNITS.iter().any(|r| unit.eq_ignore_ascii_case(r));
        if reserved && !matches!(limit.spec.rule, Rule::Concurrency { .. }) {
            return Err(PlanError {
                plan: plan.name.to_string(),
                field: Some(limit.name.to_string()),
                message: format!(
                    "unit '{unit}' is a reserved word (RL.ACQUIRE keywords and 'lease'); \
                     name the unit otherwise"
                ),
            });
        }
    }
    Ok(())
}

/// The registry of all plans (see [`crate::registry`]).
pub use crate::registry::Plans;

/// Most limits one plan may hold.
pub const MAX_LIMITS: usize = 32;
/// Longest limit spec, in bytes.
pub const MAX_SPEC_LEN: usize = 1024;
/// Most plans one server may hold.
pub const MAX_PLANS: usize = 100_000;

/// Why a plan change was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError {
    pub plan: String,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(
                f,
                "plan '{}' field '{}': {}",
                self.plan, field, self.message
            ),
            None => write!(f, "plan '{}': {}", self.plan, self.message),
        }
    }
}

/// Whether a plan enforces its decisions or only reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    /// Decide and report, count and notify denials, but admit.
    Shadow,
}

/// One compiled limit of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub name: Box<str>,
    pub spec: LimitSpec,
    /// Index of the limit's slot in the plan's layout (`None` for caps, which keep no state).
    pub slot: Option<usize>,
}

impl Limit {
    /// Whether the limit applies to a call naming `endpoint`.
    pub fn applies_to(&self, endpoint: Option<&str>) -> bool {
        match (&self.spec.endpoints, endpoint) {
            (None, _) => true,
            (Some(list), Some(e)) => list.iter().any(|l| &**l == e),
            (Some(_), None) => false,
        }
    }

    pub fn shape(&self) -> Option<Shape> {
        match self.spec.rule {
            Rule::Fixed { window, .. } => Some(Shape::Fixed { window }),
            Rule::Sliding {
                window_ms,
                precision,
                ..
            } => Some(Shape::Sliding {
                window_ms,
                precision,
            }),
            Rule::Bucket { window_ms, .. } => Some(Shape::Bucket { window_ms }),
            Rule::Concurrency { .. } => Some(Shape::Concurrency),
            Rule::Cap { .. } => None,
        }
    }
}

/// A validated plan.
#[derive(Debug)]
pub struct Plan {
    /// Shared with reservations made under this plan.
    pub name: Arc<str>,
    /// Fields as set, in the order they were first set.
    fields: Vec<(Box<str>, Box<str>)>,
    pub limits: Vec<Limit>,
    pub fallback: Option<Box<str>>,
    pub mode: Mode,
    /// Every endpoint the plan's limits name, sorted; `None` if no limit is scoped
    /// (then the plan admits calls to any endpoint).
    pub endpoints: Option<Box<[Box<str>]>>,
    /// The slots of the plan's stateful limits, in limit order.
    pub layout: Arc<Layout>,
}

fn is_reserved(field: &str, word: &str) -> bool {
    field.eq_ignore_ascii_case(word)
}

/// Field names are compared exactly, except the reserved words, which ignore case
/// (so `MODE` replaces `mode`).
pub(crate) fn same_field(a: &str, b: &str) -> bool {
    a == b
        || ["fallback", "mode"]
            .iter()
            .any(|w| is_reserved(a, w) && is_reserved(b, w))
}

impl Plan {
    /// Compiles `fields` into a plan, or says which field is wrong.
    pub fn compile(
        name: &str,
        fields: Vec<(Box<str>, Box<str>)>,
        interner: &mut LayoutInterner,
    ) -> Result<Plan, PlanError> {
        let error = |field: Option<&str>, message: String| PlanError {
            plan: name.to_string(),
            field: field.map(str::to_string),
            message,
        };
        if !is_valid_name(name) || name == "*" {
            return Err(error(
                None,
                "is not a valid plan name (1-64 of A-Z a-z 0-9 _ - . : / @ #)".into(),
            ));
        }
        let mut limits = Vec::new();
        let mut slots = Vec::new();
        let mut fallback = None;
        let mut mode = Mode::Enforce;
        for (field, value) in &fields {
            if is_reserved(field, "fallback") {
                if !is_valid_name(value) || &**value == "*" {
                    return Err(error(
                        Some(field),
                        format!("'{value}' is not a valid plan name"),
                    ));
                }
                if **value == *name {
                    return Err(error(
                        Some(field),
                        "a plan cannot fall back to itself".into(),
                    ));
                }
                fallback = Some(value.clone());
            } else if is_reserved(field, "mode") {
                mode = match value.to_ascii_lowercase().as_str() {
                    "enforce" => Mode::Enforce,
                    "shadow" => Mode::Shadow,
                    _ => {
                        return Err(error(
                            Some(field),
                            format!("mode '{value}' must be enforce or shadow"),
                        ))
                    }
                };
            } else {
                if !is_valid_name(field) {
                    return Err(error(
                        Some(field),
                        "is not a valid limit name (1-64 of A-Z a-z 0-9 _ - . : / @ #)".into(),
                    ));
                }
                if value.len() > MAX_SPEC_LEN {
                    return Err(error(
                        Some(field),
                        format!("spec longer than {MAX_SPEC_LEN} bytes"),
                    ));
                }
                let spec = parse_limit_spec(value).map_err(|m| error(Some(field), m))?;
                let mut limit = Limit {
                    name: field.clone(),
                    spec,
                    slot: None,
                };
                if let Some(shape) = limit.shape() {
                    limit.slot = Some(slots.len());
                    slots.push(Slot {
                        name: Arc::from(&**field),
                        unit: Arc::from(&*limit.spec.unit),
                        shape,
                    });
                }
                limits.push(limit);
            }
        }
        if limits.len() > MAX_LIMITS {
            return Err(error(
                None,
                format!("has {} limits, more than {MAX_LIMITS}", limits.len()),
            ));
        }
        let mut endpoints: Vec<Box<str>> = limits
            .iter()
            .filter_map(|l| l.spec.endpoints.as_deref())
            .flatten()
            .cloned()
            .collect();
        endpoints.sort_unstable();
        endpoints.dedup();
        let scoped = limits.iter().any(|l| l.spec.endpoints.is_some());
        Ok(Plan {
            name: name.into(),
            fields,
            limits,
            fallback,
            mode,
            endpoints: scoped.then(|| endpoints.into_boxed_slice()),
            layout: interner.intern(Layout::new(slots)),
        })
    }

    pub fn fields(&self) -> &[(Box<str>, Box<str>)] {
        &self.fields
    }

    /// Whether a call naming `endpoint` may use this plan at all.
    pub fn admits_endpoint(&self, endpoint: Option<&str>) -> bool {
        match (&self.endpoints, endpoint) {
            (Some(list), Some(e)) => list.binary_search_by(|l| (**l).cmp(e)).is_ok(),
            _ => true,
        }
    }

    /// Whether calls on this plan take a lease (it has a concurrency limit).
    pub fn has_concurrency(&self) -> bool {
        self.limits
            .iter()
            .any(|l| matches!(l.spec.rule, Rule::Concurrency { .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Reader, Writer};

    fn set(plans: &mut Plans, name: &str, pairs: &[(&str, &str)]) -> Result<usize, PlanError> {
        plans.set(name, pairs, &mut LayoutInterner::new())
    }

    #[test]
    fn compiles_the_spec_example() {
        let mut plans = Plans::new();
        let added = set(
            &mut plans,
            "free",
            &[
                ("rpm", "sliding 10/1m"),
                ("rpd", "fixed 200/1d"),
                ("tpm", "bucket 2000 token/1m burst 4000"),
                ("jobs", "concurrency 4 ttl 60s"),
                ("big", "cap 2000 token"),
                ("spend", "fixed 1000000 usd_micros/1mo warn 80%"),
            ],
        );
        assert_eq!(added, Ok(6));
        let free = plans.get("free").cloned();
        let free = free.as_deref();
        assert_eq!(free.map(|p| p.limits.len()), Some(6));
        // Five stateful limits get slots; the cap does not.
        assert_eq!(free.map(|p| p.layout.len()), Some(5));
        assert_eq!(
            free.and_then(|p| p.limits.get(4)).map(|l| l.slot),
            Some(None)
        );
        assert_eq!(free.map(|p| p.mode), Some(Mode::Enforce));
    }

    #[test]
    fn set_counts_new_fields_and_replaces_old_ones() {
        let mut plans = Plans::new();
        assert_eq!(
            set(&mut plans, "p", &[("a", "fixed 1/1s"), ("b", "fixed 2/1s")]),
            Ok(2)
        );
        assert_eq!(
            set(&mut plans, "p", &[("a", "fixed 5/1s"), ("c", "cap 3")]),
            Ok(1)
        );
        let fields: Vec<String> = plans
            .get("p")
            .map(|p| p.fields().iter().map(|(f, v)| format!("{f}={v}")).collect())
            .unwrap_or_default();
        assert_eq!(fields, ["a=fixed 5/1s", "b=fixed 2/1s", "c=cap 3"]);
        assert_eq!(plans.version(), 2);
    }

    #[test]
    fn a_bad_field_names_plan_and_field_and_changes_nothing() {
        let mut plans = Plans::new();
        assert_eq!(set(&mut plans, "p", &[("a", "fixed 1/1s")]), Ok(1));
        let err = set(&mut plans, "p", &[("b", "fixed 2/1s"), ("c", "fixed x/1s")]);
        assert_eq!(
            err.map_err(|e| e.to_string()),
            Err("plan 'p' field 'c': amount 'x' is not a non-negative integer".to_string())
        );
        assert_eq!(plans.get("p").map(|p| p.fields().len()), Some(1));
        assert_eq!(plans.version(), 1);
        for (field, value, reason) in [
            ("mode", "loud", "enforce or shadow"),
            ("fallback", "p", "itself"),
            ("fallback", "*", "not a valid plan name"),
            ("bad name", "fixed 1/1s", "not a valid limit name"),
        ] {
            let err = set(&mut plans, "p", &[(field, value)]).map_err(|e| e.to_string());
            assert!(
                err.as_ref().is_err_and(|e| e.contains(reason)),
                "{field}: {err:?}"
            );
        }
        assert!(set(&mut plans, "*", &[("a", "cap 1")]).is_err());
    }

    #[test]
    fn too_many_limits_are_refused() {
        let mut plans = Plans::new();
        let names: Vec<String> = (0..=MAX_LIMITS).map(|i| format!("l{i}")).collect();
        let pairs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "cap 1")).collect();
        assert!(set(&mut plans, "p", &pairs).is_err());
        assert!(plans.is_empty());
    }

    #[test]
    fn reserved_fields_set_mode_and_fallback() {
        let mut plans = Plans::new();
        assert_eq!(
            set(&mut plans, "p", &[("MODE", "Shadow"), ("fallback", "q")]),
            Ok(2)
        );
        assert_eq!(set(&mut plans, "p", &[("mode", "enforce")]), Ok(0));
        let p = plans.get("p").cloned();
        assert_eq!(p.as_ref().map(|p| p.mode), Some(Mode::Enforce));
        assert_eq!(p.as_ref().and_then(|p| p.fallback.as_deref()), Some("q"));
        assert_eq!(p.map(|p| p.limits.len()), Some(0));
    }

    #[test]
    fn fallback_cycles_are_refused_when_closed_later() {
        let mut plans = Plans::new();
        assert!(set(&mut plans, "a", &[("fallback", "b")]).is_ok());
        assert!(set(&mut plans, "b", &[("fallback", "c")]).is_ok());
        let err = set(&mut plans, "c", &[("fallback", "a")]).map_err(|e| e.to_string());
        assert_eq!(
            err,
            Err(
                "plan 'c' field 'fallback': fallback chain would loop: c -> a -> b -> c"
                    .to_string()
            )
        );
        assert!(plans.get("c").is_none());
        // Deleting the closing edge's plan and re-adding it without the loop is fine.
        assert!(set(&mut plans, "c", &[("rpm", "fixed 1/1s")]).is_ok());
        assert!(set(&mut plans, "c", &[("fallback", "b")]).is_err());
    }

    #[test]
    fn delete_removes_fields_then_the_plan() {
        let mut plans = Plans::new();
        let mut interner = LayoutInterner::new();
        assert!(plans
            .set("p", &[("a", "cap 1"), ("b", "cap 2")], &mut interner)
            .is_ok());
        assert_eq!(plans.delete("p", &["a", "zz"], &mut interner), Ok(1));
        assert_eq!(plans.delete("p", &["zz"], &mut interner), Ok(0));
        assert_eq!(plans.delete("p", &["b"], &mut interner), Ok(1));
        assert!(plans.get("p").is_none());
        assert_eq!(plans.delete("p", &[], &mut interner), Ok(0));
        assert!(plans.set("q", &[("a", "cap 1")], &mut interner).is_ok());
        assert_eq!(plans.delete("q", &[], &mut interner), Ok(1));
    }

    #[test]
    fn endpoints_form_an_access_list() {
        let mut plans = Plans::new();
        assert!(set(
            &mut plans,
            "p",
            &[("a", "fixed 1/1s for chat,images"), ("b", "cap 5")]
        )
        .is_ok());
        let p = plans.get("p").cloned();
        let p = p.as_deref();
        assert_eq!(p.map(|p| p.admits_endpoint(Some("chat"))), Some(true));
        assert_eq!(p.map(|p| p.admits_endpoint(Some("video"))), Some(false));
        assert_eq!(p.map(|p| p.admits_endpoint(None)), Some(true));
        let a = p.and_then(|p| p.limits.first());
        assert_eq!(
            a.map(|l| (l.applies_to(Some("chat")), l.applies_to(None))),
            Some((true, false))
        );
    }

    #[test]
    fn plans_round_trip_through_their_encoding() {
        let mut plans = Plans::new();
        let mut interner = LayoutInterner::new();
        assert!(plans
            .set(
                "free",
                &[("rpm", "sliding 10/1m"), ("fallback", "x")],
                &mut interner
            )
            .is_ok());
        assert!(plans
            .set("pro", &[("tpm", "bucket 5 token/1s")], &mut interner)
            .is_ok());
        assert!(plans.set_default(Some("free")).is_ok());
        let mut w = Writer::new();
        plans.encode(&mut w);
        let buf = w.into_inner();
        let back = Plans::decode(&mut Reader::new(&buf), &mut interner);
        let back = back.ok();
        assert_eq!(back.as_ref().map(|p| p.names()), Some(vec!["free", "pro"]));
        assert_eq!(back.as_ref().and_then(|p| p.default_plan()), Some("free"));
        assert_eq!(back.as_ref().map(|p| p.version()), Some(plans.version()));
        assert_eq!(back.as_ref().map(|p| p.digest()), Some(plans.digest()));
        for cut in 0..buf.len() {
            assert!(Plans::decode(&mut Reader::new(&buf[..cut]), &mut interner).is_err());
        }
    }

    #[test]
    fn digest_ignores_field_order() {
        let mut interner = LayoutInterner::new();
        let mut a = Plans::new();
        let mut b = Plans::new();
        assert!(a
            .set("p", &[("x", "cap 1"), ("y", "cap 2")], &mut interner)
            .is_ok());
        assert!(b
            .set("p", &[("y", "cap 2"), ("x", "cap 1")], &mut interner)
            .is_ok());
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn digest_covers_content_not_history() {
        let mut interner = LayoutInterner::new();
        let mut a = Plans::new();
        let mut b = Plans::new();
        assert!(a.set("p", &[("x", "cap 1")], &mut interner).is_ok());
        assert!(b.set("p", &[("x", "cap 2")], &mut interner).is_ok());
        assert_ne!(a.digest(), b.digest());
        assert!(b.set("p", &[("x", "cap 1")], &mut interner).is_ok());
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.version(), b.version());
    }
}
