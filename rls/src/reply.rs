//! Decoding the module's replies: `RL.ACQUIRE` / `RL.PEEK` maps (RESP3 maps or RESP2
//! flat `field value` arrays), with the `also` pairs of a multi-key call, and
//! `RL.RELEASE` maps.
//!
//! What must always hold: decoding never panics on any reply; a field that is
//! missing or of another type decodes as absent.

use redis::Value;

/// A map reply as `(field, value)` pairs, in order.
pub fn map_entries(v: &Value) -> Vec<(String, &Value)> {
    match v {
        Value::Map(pairs) => pairs
            .iter()
            .filter_map(|(k, v)| text(k).map(|k| (k, v)))
            .collect(),
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|kv| match kv {
                [k, v] => text(k).map(|k| (k, v)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

pub fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

/// One limit of a decision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitState {
    pub name: String,
    pub kind: Option<String>,
    pub limit: i64,
    pub remaining: i64,
    pub reset_ms: i64,
    pub window_ms: Option<i64>,
}

impl LimitState {
    fn from(v: &Value) -> LimitState {
        let mut s = LimitState::default();
        for (k, v) in map_entries(v) {
            match k.as_str() {
                "name" => s.name = text(v).unwrap_or_default(),
                "kind" => s.kind = text(v),
                "limit" => s.limit = int(v).unwrap_or(0),
                "remaining" => s.remaining = int(v).unwrap_or(0),
                "reset_ms" => s.reset_ms = int(v).unwrap_or(0),
                "window_ms" => s.window_ms = int(v),
                _ => {}
            }
        }
        s
    }
}

/// The limits of one key of a decision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyState {
    pub key: Option<String>,
    pub limits: Vec<LimitState>,
}

impl KeyState {
    pub fn limit(&self, name: &str) -> Option<&LimitState> {
        self.limits.iter().find(|l| l.name == name)
    }
}

/// An `RL.ACQUIRE` / `RL.PEEK` reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub retry_after_ms: i64,
    pub denied_by: Option<String>,
    pub denied_key: Option<String>,
    pub shadow_denied_by: Option<String>,
    /// The first key's limits, then one entry per `ALSO` pair, in call order.
    pub keys: Vec<KeyState>,
}

impl Decision {
    pub fn parse(v: &Value) -> Option<Decision> {
        let entries = map_entries(v);
        if entries.is_empty() {
            return None;
        }
        let mut d = Decision::default();
        let mut first = KeyState::default();
        let mut also = Vec::new();
        let mut seen_allowed = false;
        for (k, v) in entries {
            match k.as_str() {
                "allowed" => {
                    seen_allowed = true;
                    d.allowed = int(v) == Some(1);
                }
                "retry_after_ms" => d.retry_after_ms = int(v).unwrap_or(0),
                "denied_by" => d.denied_by = text(v),
                "denied_key" => d.denied_key = text(v),
                "shadow_denied_by" => d.shadow_denied_by = text(v),
                "limits" => {
                    if let Value::Array(items) = v {
                        first.limits = items.iter().map(LimitState::from).collect();
                    }
                }
                "also" => {
                    if let Value::Array(items) = v {
                        for item in items {
                            let mut ks = KeyState::default();
                            for (k, v) in map_entries(item) {
                                match k.as_str() {
                                    "key" => ks.key = text(v),
                                    "limits" => {
                                        if let Value::Array(ls) = v {
                                            ks.limits = ls.iter().map(LimitState::from).collect();
                                        }
                                    }
                                    _ => {}
                                }
                            }
                            also.push(ks);
                        }
                    }
                }
                _ => {}
            }
        }
        if !seen_allowed {
            return None;
        }
        d.keys.push(first);
        d.keys.extend(also);
        Some(d)
    }
}

/// Whether an `RL.RELEASE` reply says the id was live.
pub fn released(v: &Value) -> bool {
    map_entries(v)
        .iter()
        .any(|(k, v)| k == "released" && int(v) == Some(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn decodes_a_resp2_decision_with_also() {
        let limit = |name: &str, rem: i64| {
            Value::Array(vec![
                bulk("name"),
                bulk(name),
                bulk("limit"),
                Value::Int(10),
                bulk("remaining"),
                Value::Int(rem),
                bulk("reset_ms"),
                Value::Int(500),
            ])
        };
        let v = Value::Array(vec![
            bulk("allowed"),
            Value::Int(0),
            bulk("retry_after_ms"),
            Value::Int(1200),
            bulk("denied_by"),
            bulk("rate"),
            bulk("denied_key"),
            bulk("k2"),
            bulk("limits"),
            Value::Array(vec![limit("rate", 3)]),
            bulk("also"),
            Value::Array(vec![Value::Array(vec![
                bulk("key"),
                bulk("k2"),
                bulk("limits"),
                Value::Array(vec![limit("rate", 0)]),
            ])]),
        ]);
        let d = Decision::parse(&v).expect("decision");
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ms, 1200);
        assert_eq!(d.denied_key.as_deref(), Some("k2"));
        assert_eq!(d.keys.len(), 2);
        assert_eq!(d.keys[0].limit("rate").map(|l| l.remaining), Some(3));
        assert_eq!(d.keys[1].key.as_deref(), Some("k2"));
        assert_eq!(d.keys[1].limit("rate").map(|l| l.remaining), Some(0));
    }

    #[test]
    fn garbage_decodes_as_nothing() {
        assert!(Decision::parse(&Value::Nil).is_none());
        assert!(Decision::parse(&Value::Int(3)).is_none());
        assert!(Decision::parse(&Value::Array(vec![bulk("x")])).is_none());
        assert!(!released(&Value::Nil));
    }
}
