//! The plans file: JSON, validated as a whole before anything is applied.
//!
//! ```json
//! {
//!   "default": "free",
//!   "plans": {
//!     "free": { "rpm": "sliding 10/1m", "tpm": "bucket 40000 token/1m", "fallback": "..." },
//!     "pro":  { "rpm": "sliding 60/1m" }
//!   }
//! }
//! ```
//! Every field is a limit spec (or the reserved `fallback` / `mode`), exactly as
//! `RL.PLAN.SET` takes it. Errors name the file position of the offending value.

use std::collections::BTreeMap;

use tollgate_core::layout::LayoutInterner;
use tollgate_core::plan::Plans;

/// A validated plans file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanSet {
    pub default: Option<String>,
    /// Plan name → fields, each `(field, spec)` in file order.
    pub plans: BTreeMap<String, Vec<(String, String)>>,
}

/// A plans file error, with its position when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "line {} column {}: {}",
                self.line, self.column, self.message
            )
        } else {
            f.write_str(&self.message)
        }
    }
}

/// The 1-based line and column of byte offset `at` in `text`.
fn position(text: &str, at: usize) -> (usize, usize) {
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

/// Where the JSON key `"key"` (followed by a colon) first appears at or after `from`.
fn find_key(text: &str, key: &str, from: usize) -> Option<usize> {
    let needle = format!("\"{key}\"");
    let mut start = from;
    while let Some(found) = text.get(start..).and_then(|t| t.find(&needle)) {
        let at = start + found;
        let after = text.get(at + needle.len()..).unwrap_or("");
        if after.trim_start().starts_with(':') {
            return Some(at);
        }
        start = at + needle.len();
    }
    None
}

/// The position of `plans.<plan>[.<field>]` in the file, best effort.
fn locate(text: &str, plan: Option<&str>, field: Option<&str>) -> (usize, usize) {
    let mut at = find_key(text, "plans", 0).unwrap_or(0);
    if let Some(plan) = plan {
        at = find_key(text, plan, at).unwrap_or(at);
        if let Some(field) = field {
            at = find_key(text, field, at).unwrap_or(at);
        }
    }
    position(text, at)
}

fn error_at(text: &str, plan: Option<&str>, field: Option<&str>, message: String) -> FileError {
    let (line, column) = locate(text, plan, field);
    FileError {
        line,
        column,
        message,
    }
}

/// Parses and validates a plans file: JSON shape, every spec, fallback cycles.
pub fn parse(text: &str) -> Result<PlanSet, FileError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| FileError {
        line: e.line(),
        column: e.column(),
        message: format!("invalid JSON: {e}"),
    })?;
    let top = value.as_object().ok_or_else(|| FileError {
        line: 1,
        column: 1,
        message: "the file must be a JSON object".into(),
    })?;
    for key in top.keys() {
        if key != "plans" && key != "default" {
            let (line, column) = position(text, find_key(text, key, 0).unwrap_or(0));
            return Err(FileError {
                line,
                column,
                message: format!("unknown key '{key}' (expected plans, default)"),
            });
        }
    }
    let default = match top.get("default") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(_) => {
            let (line, column) = position(text, find_key(text, "default", 0).unwrap_or(0));
            return Err(FileError {
                line,
                column,
                message: "default must be a plan name".into(),
            });
        }
    };
    let plans_obj = top
        .get("plans")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| {
            error_at(
                text,
                None,
                None,
                "'plans' must be an object of plans".into(),
            )
        })?;
    let mut plans = BTreeMap::new();
    for (name, fields) in plans_obj {
        let fields = fields.as_object().ok_or_else(|| {
            error_at(
                text,
                Some(name),
                None,
                format!("plan '{name}' must be an object of fields"),
            )
        })?;
        if fields.is_empty() {
            return Err(error_at(
                text,
                Some(name),
                None,
                format!("plan '{name}' has no fields"),
            ));
        }
        let mut pairs = Vec::with_capacity(fields.len());
        for (field, spec) in fields {
            let spec = spec.as_str().ok_or_else(|| {
                error_at(
                    text,
                    Some(name),
                    Some(field),
                    format!("plan '{name}' field '{field}' must be a string"),
                )
            })?;
            pairs.push((field.clone(), spec.to_string()));
        }
        plans.insert(name.clone(), pairs);
    }
    let set = PlanSet { default, plans };
    validate(&set).map_err(|(plan, field, message)| {
        error_at(text, plan.as_deref(), field.as_deref(), message)
    })?;
    Ok(set)
}

/// Checks a plan set as the server would: every spec, then fallbacks (no cycles,
/// no fallback to a plan the file lacks), then the default.
fn validate(set: &PlanSet) -> Result<(), (Option<String>, Option<String>, String)> {
    let plans = set
        .build()
        .map_err(|e| (Some(e.plan.clone()), e.field.clone(), e.to_string()))?;
    for (name, fields) in &set.plans {
        for (field, value) in fields {
            if field.eq_ignore_ascii_case("fallback") && plans.get(value).is_none() {
                return Err((
                    Some(name.clone()),
                    Some(field.clone()),
                    format!(
                        "plan '{name}' falls back to '{value}', which the file does not define"
                    ),
                ));
            }
        }
    }
    if let Some(default) = &set.default {
        if plans.get(default).is_none() {
            return Err((
                None,
                None,
                format!("the default plan '{default}' is not defined in the file"),
            ));
        }
    }
    Ok(())
}

impl PlanSet {
    /// The plans as the server holds them (fallbacks set last, as `apply` does).
    pub fn build(&self) -> Result<Plans, tollgate_core::plan::PlanError> {
        let mut interner = LayoutInterner::new();
        let mut plans = Plans::new();
        for (name, fields) in &self.plans {
            let pairs: Vec<(&str, &str)> = fields
                .iter()
                .filter(|(f, _)| !f.eq_ignore_ascii_case("fallback"))
                .map(|(f, v)| (f.as_str(), v.as_str()))
                .collect();
            if !pairs.is_empty() {
                plans.set(name, &pairs, &mut interner)?;
            }
        }
        for (name, fields) in &self.plans {
            for (f, v) in fields
                .iter()
                .filter(|(f, _)| f.eq_ignore_ascii_case("fallback"))
            {
                plans.set(name, &[(f.as_str(), v.as_str())], &mut interner)?;
            }
        }
        if let Some(default) = &self.default {
            plans.set_default(Some(default))?;
        }
        Ok(plans)
    }

    /// The plan-set digest every node must report once the file is applied.
    pub fn digest(&self) -> Result<u64, tollgate_core::plan::PlanError> {
        Ok(self.build()?.digest())
    }

    /// The file form of a plan set (for `plans show`).
    pub fn to_json(&self) -> String {
        let mut plans = serde_json::Map::new();
        for (name, fields) in &self.plans {
            let obj: serde_json::Map<String, serde_json::Value> = fields
                .iter()
                .map(|(f, v)| (f.clone(), serde_json::Value::String(v.clone())))
                .collect();
            plans.insert(name.clone(), serde_json::Value::Object(obj));
        }
        let mut top = serde_json::Map::new();
        if let Some(d) = &self.default {
            top.insert("default".into(), serde_json::Value::String(d.clone()));
        }
        top.insert("plans".into(), serde_json::Value::Object(plans));
        serde_json::to_string_pretty(&serde_json::Value::Object(top)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
  "default": "free",
  "plans": {
    "free": { "rpm": "sliding 10/1m", "fallback": "mini" },
    "mini": { "rpm": "sliding 2/1m" }
  }
}"#;

    #[test]
    fn parses_a_good_file() {
        let set = parse(GOOD).unwrap();
        assert_eq!(set.default.as_deref(), Some("free"));
        // Fields keep the file's order (the order limits are reported in).
        assert_eq!(
            set.plans["free"],
            [
                ("rpm".to_string(), "sliding 10/1m".to_string()),
                ("fallback".into(), "mini".into())
            ]
        );
        assert!(set.digest().is_ok());
    }

    #[test]
    fn errors_point_at_the_bad_value() {
        let bad = GOOD.replace("sliding 2/1m", "sliding two/1m");
        let e = parse(&bad).unwrap_err();
        assert_eq!((e.line, e.column), (5, 15));
        assert!(e.message.contains("plan 'mini' field 'rpm'"), "{e}");
        let e = parse("{ \"plans\": { \"a\": { \"x\": 5 } } }").unwrap_err();
        assert!(e.message.contains("must be a string"), "{e}");
        let e = parse("{ \"plans\": {").unwrap_err();
        assert!(e.message.starts_with("invalid JSON"), "{e}");
        let e = parse("{ \"plans\": {}, \"extra\": 1 }").unwrap_err();
        assert!(e.message.contains("unknown key 'extra'"), "{e}");
    }

    #[test]
    fn refuses_cycles_missing_fallbacks_and_defaults() {
        let cycle = r#"{"plans": {"a": {"fallback": "b"}, "b": {"fallback": "a"}}}"#;
        assert!(parse(cycle).unwrap_err().message.contains("loop"));
        let missing = r#"{"plans": {"a": {"rpm": "cap 1", "fallback": "zz"}}}"#;
        assert!(parse(missing)
            .unwrap_err()
            .message
            .contains("does not define"));
        let default = r#"{"default": "zz", "plans": {"a": {"rpm": "cap 1"}}}"#;
        assert!(parse(default)
            .unwrap_err()
            .message
            .contains("default plan 'zz'"));
        let empty = r#"{"plans": {"a": {}}}"#;
        assert!(parse(empty).unwrap_err().message.contains("no fields"));
    }

    #[test]
    fn the_json_form_round_trips() {
        let set = parse(GOOD).unwrap();
        assert_eq!(parse(&set.to_json()).unwrap(), set);
    }
}
