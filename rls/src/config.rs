//! The rate limit configuration: envoyproxy/ratelimit's YAML format (one domain per
//! file, nested descriptors, `rate_limit` rules) plus Tollgate's namespaced `tollgate:`
//! extensions, compiled into a lookup tree and the Tollgate plans it needs.
//!
//! What must always hold: a [`Config`] is valid as a whole or not built at all (a bad
//! file is refused naming the file and the position, and the caller keeps the last
//! good config); every rule has exactly one plan whose name is a valid plan name; the
//! lookup follows envoyproxy/ratelimit's `GetLimit` (key_value, then wildcard, then
//! key; a rule applies only at the request descriptor's last entry).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Deserializer};

/// An error in one config file, naming the file and where in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The time unit of a rule, as in `RateLimitResponse.RateLimit.Unit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeUnit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl TimeUnit {
    fn parse(text: &str) -> Option<TimeUnit> {
        Some(match text.to_ascii_lowercase().as_str() {
            "second" => TimeUnit::Second,
            "minute" => TimeUnit::Minute,
            "hour" => TimeUnit::Hour,
            "day" => TimeUnit::Day,
            "week" => TimeUnit::Week,
            "month" => TimeUnit::Month,
            "year" => TimeUnit::Year,
            _ => return None,
        })
    }

    /// The window in Tollgate's spec grammar: calendar-aligned in UTC for days
    /// (midnight), weeks (Monday), months (the 1st) and years (January 1st).
    pub fn window(self) -> &'static str {
        match self {
            TimeUnit::Second => "1s",
            TimeUnit::Minute => "1m",
            TimeUnit::Hour => "1h",
            TimeUnit::Day => "1d",
            TimeUnit::Week => "1w",
            TimeUnit::Month => "1mo",
            TimeUnit::Year => "12mo",
        }
    }

    /// The wire value of `RateLimitResponse.RateLimit.Unit`.
    pub fn proto(self) -> i32 {
        match self {
            TimeUnit::Second => 1,
            TimeUnit::Minute => 2,
            TimeUnit::Hour => 3,
            TimeUnit::Day => 4,
            TimeUnit::Month => 5,
            TimeUnit::Year => 6,
            TimeUnit::Week => 7,
        }
    }

    /// From the wire value of `envoy.type.v3.RateLimitUnit` (the per-descriptor
    /// `limit` override), which numbers the units the same way.
    pub fn from_proto(value: i32) -> Option<TimeUnit> {
        Some(match value {
            1 => TimeUnit::Second,
            2 => TimeUnit::Minute,
            3 => TimeUnit::Hour,
            4 => TimeUnit::Day,
            5 => TimeUnit::Month,
            6 => TimeUnit::Year,
            7 => TimeUnit::Week,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            TimeUnit::Second => "second",
            TimeUnit::Minute => "minute",
            TimeUnit::Hour => "hour",
            TimeUnit::Day => "day",
            TimeUnit::Week => "week",
            TimeUnit::Month => "month",
            TimeUnit::Year => "year",
        }
    }

    /// The nominal length in seconds (months 30 days, years 365), for the `w` of
    /// `RateLimit-Policy` headers; decisions use calendar windows.
    pub fn nominal_secs(self) -> u64 {
        match self {
            TimeUnit::Second => 1,
            TimeUnit::Minute => 60,
            TimeUnit::Hour => 3600,
            TimeUnit::Day => 86_400,
            TimeUnit::Week => 604_800,
            TimeUnit::Month => 2_592_000,
            TimeUnit::Year => 31_536_000,
        }
    }
}

/// How a rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// A fixed window aligned to the unit (envoyproxy/ratelimit's only algorithm).
    Fixed,
    /// A sliding window: never more than `requests_per_unit` in any trailing unit.
    Sliding { precision: Option<u32> },
    /// A token bucket refilling `requests_per_unit` per unit, holding `burst`.
    Bucket { burst: Option<u64> },
}

/// The rate part of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rate {
    pub requests_per_unit: u32,
    pub unit: TimeUnit,
    pub algorithm: Algorithm,
}

/// One configured limit: a descriptor with a `rate_limit` (or a Tollgate concurrency
/// limit), compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub domain: String,
    /// The config path, e.g. `key1_value1.subkey1` (the metric key, as
    /// envoyproxy/ratelimit's stats key without the domain).
    pub path: String,
    /// `rate_limit.name`, reported in `current_limit.name`.
    pub name: String,
    pub replaces: Vec<String>,
    /// `None` with `unlimited: true` and no concurrency limit.
    pub rate: Option<Rate>,
    pub unlimited: bool,
    pub concurrency: Option<Concurrency>,
    pub shadow_mode: bool,
    pub quota_mode: bool,
    pub detailed_metric: bool,
    pub value_to_metric: bool,
    /// Positive hits are usage reported after the fact: always charged, never denied.
    pub report_usage: bool,
    /// What the hits count: `request` unless `tollgate.cost_unit` says otherwise.
    pub cost_unit: String,
    /// The Tollgate plan (one per rule) and the unit its limits count in.
    pub plan: String,
    pub unit_id: String,
    pub metadata: Option<serde_norway::Value>,
}

/// A concurrency limit (Tollgate extension): in-flight requests, each a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Concurrency {
    pub max: u64,
    pub ttl: Option<String>,
}

impl Rule {
    /// The plan's fields: limit name → Tollgate spec.
    pub fn plan_fields(&self) -> Vec<(String, String)> {
        let mut fields = Vec::new();
        if let Some(rate) = &self.rate {
            let n = rate.requests_per_unit;
            let unit = &self.unit_id;
            let w = rate.unit.window();
            let spec = match rate.algorithm {
                Algorithm::Fixed => format!("fixed {n} {unit}/{w}"),
                Algorithm::Sliding { precision: None } => format!("sliding {n} {unit}/{w}"),
                Algorithm::Sliding { precision: Some(k) } => {
                    format!("sliding {n} {unit}/{w} precision {k}")
                }
                Algorithm::Bucket { burst: None } => format!("bucket {n} {unit}/{w}"),
                Algorithm::Bucket { burst: Some(b) } => format!("bucket {n} {unit}/{w} burst {b}"),
            };
            fields.push((RATE_LIMIT_NAME.to_string(), spec));
        }
        if let Some(c) = &self.concurrency {
            let spec = match &c.ttl {
                Some(ttl) => format!("concurrency {} ttl {ttl}", c.max),
                None => format!("concurrency {}", c.max),
            };
            fields.push((CONCURRENCY_LIMIT_NAME.to_string(), spec));
        }
        if self.shadow_mode {
            fields.push(("mode".to_string(), "shadow".to_string()));
        }
        fields
    }

    /// The plan usage reports (`report_usage`) are charged under: the rule's rate in
    /// `mode shadow`. One limit name and unit is one budget on a subject, so it
    /// charges the rule's own counter, and being in shadow mode it never denies —
    /// what was used is counted even once the subject is over its limit.
    pub fn usage_plan(&self) -> Option<String> {
        (self.report_usage && self.rate.is_some()).then(|| plan_name("rls-u:", &self.plan))
    }

    /// The fields of [`Rule::usage_plan`]: the rate only (a report takes no lease).
    pub fn usage_plan_fields(&self) -> Vec<(String, String)> {
        let mut fields: Vec<(String, String)> = self
            .plan_fields()
            .into_iter()
            .filter(|(name, _)| name == RATE_LIMIT_NAME)
            .collect();
        fields.push(("mode".to_string(), "shadow".to_string()));
        fields
    }

    /// The plans the rule needs, name → fields: its own and, for usage reports, its
    /// [`Rule::usage_plan`].
    pub fn plans(&self) -> impl Iterator<Item = (String, Vec<(String, String)>)> + '_ {
        std::iter::once((self.plan.clone(), self.plan_fields()))
            .chain(self.usage_plan().map(|u| (u, self.usage_plan_fields())))
    }

    /// Whether the rule limits anything (not `unlimited`).
    pub fn limits(&self) -> bool {
        self.rate.is_some() || self.concurrency.is_some()
    }
}

/// The limit name of a rule's rate in its plan.
pub const RATE_LIMIT_NAME: &str = "rate";
/// The limit name of a rule's concurrency limit in its plan.
pub const CONCURRENCY_LIMIT_NAME: &str = "concurrency";

/// Domain-wide Tollgate options (the top-level `tollgate:` block).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainOptions {
    /// The descriptor entry whose value is the hash tag of every key of a request.
    pub tenant_key: Option<String>,
    /// The entry carrying a request id on the request path (reserve).
    pub request_id_key: Option<String>,
    /// The entry carrying the same id on the response path (settle or refund).
    pub settle_id_key: Option<String>,
    /// How long a reservation waits for its settlement (Tollgate duration).
    pub reservation_ttl: Option<String>,
}

impl DomainOptions {
    /// Whether an entry key is a control entry (stripped before matching).
    pub fn is_control(&self, key: &str) -> bool {
        self.request_id_key.as_deref() == Some(key) || self.settle_id_key.as_deref() == Some(key)
    }
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<String, Node>,
    /// Wildcard children: (config key `key_pattern`, pattern split on `*`).
    wildcards: Vec<(String, Vec<String>)>,
    rule: Option<Arc<Rule>>,
    share_threshold: bool,
    value_to_metric: bool,
}

/// One domain: its lookup tree and options.
#[derive(Debug)]
pub struct Domain {
    pub name: String,
    pub options: DomainOptions,
    root: Node,
}

/// A rule matched by one request descriptor.
#[derive(Debug, Clone)]
pub struct Match {
    pub rule: Arc<Rule>,
    /// Per entry, the value that names the counter: the request's value, or the
    /// wildcard pattern for `share_threshold` entries.
    pub key_values: Vec<String>,
    /// The metric key (bounded unless `detailed_metric`/`value_to_metric`).
    pub metric_key: String,
}

/// The whole configuration: every domain of every file.
#[derive(Debug, Default)]
pub struct Config {
    pub domains: HashMap<String, Domain>,
    /// The files it was loaded from, for logs.
    pub files: Vec<String>,
}

fn wildcard_match(parts: &[String], value: &str) -> bool {
    let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
        return false;
    };
    if parts.len() == 1 {
        return first == value;
    }
    if !value.starts_with(first.as_str()) || !value.ends_with(last.as_str()) {
        return false;
    }
    let fixed: usize = parts.iter().map(|p| p.len()).sum();
    if value.len() < fixed {
        return false;
    }
    let Some(mut rest) = value.get(first.len()..value.len() - last.len()) else {
        return false;
    };
    for part in parts.get(1..parts.len() - 1).unwrap_or_default() {
        match rest.find(part.as_str()) {
            Some(at) => rest = rest.get(at + part.len()..).unwrap_or_default(),
            None => return false,
        }
    }
    true
}

impl Config {
    /// The rule for one descriptor (control entries already removed), following
    /// envoyproxy/ratelimit's lookup exactly.
    pub fn lookup(&self, domain: &str, entries: &[(&str, &str)]) -> Option<Match> {
        let domain = self.domains.get(domain)?;
        let mut node = &domain.root;
        let mut found: Option<Arc<Rule>> = None;
        let mut key_values = Vec::with_capacity(entries.len());
        let mut metric = String::new();
        let mut detailed = String::new();
        for (i, (key, value)) in entries.iter().enumerate() {
            let full = format!("{key}_{value}");
            let mut next = node.children.get(&full);
            let mut wildcard: Option<&str> = None;
            if next.is_none() {
                for (pattern, parts) in &node.wildcards {
                    if wildcard_match(parts, &full) {
                        next = node.children.get(pattern);
                        wildcard = Some(pattern.as_str());
                        break;
                    }
                }
            }
            let by_value = next.is_some();
            if next.is_none() {
                next = node.children.get(*key);
            }
            if !detailed.is_empty() {
                detailed.push('.');
                metric.push('.');
            }
            detailed.push_str(&full);
            let child = next?;
            // The counter: the value, or the shared wildcard pattern.
            match wildcard {
                Some(pattern) if child.share_threshold => {
                    key_values.push(pattern.get(key.len() + 1..).unwrap_or(pattern).to_string());
                }
                _ => key_values.push((*value).to_string()),
            }
            // The metric key: as configured, with runtime values only on request.
            match (wildcard, by_value) {
                (Some(pattern), _) => {
                    if child.value_to_metric && !child.share_threshold {
                        metric.push_str(&full);
                    } else {
                        metric.push_str(pattern);
                    }
                }
                (None, true) => metric.push_str(&full),
                (None, false) => {
                    if child.value_to_metric {
                        metric.push_str(&full);
                    } else {
                        metric.push_str(key);
                    }
                }
            }
            if i + 1 == entries.len() {
                found = child.rule.clone();
            }
            if child.children.is_empty() {
                if i + 1 < entries.len() {
                    return None;
                }
                break;
            }
            node = child;
        }
        let rule = found?;
        let metric_key = if rule.detailed_metric {
            detailed
        } else {
            metric
        };
        Some(Match {
            rule,
            key_values,
            metric_key,
        })
    }

    /// Every rule of every domain, in a stable order.
    pub fn rules(&self) -> Vec<Arc<Rule>> {
        fn walk(node: &Node, out: &mut Vec<Arc<Rule>>) {
            if let Some(rule) = &node.rule {
                out.push(rule.clone());
            }
            let mut keys: Vec<&String> = node.children.keys().collect();
            keys.sort();
            for k in keys {
                if let Some(child) = node.children.get(k) {
                    walk(child, out);
                }
            }
        }
        let mut names: Vec<&String> = self.domains.keys().collect();
        names.sort();
        let mut out = Vec::new();
        for name in names {
            if let Some(d) = self.domains.get(name) {
                walk(&d.root, &mut out);
            }
        }
        out
    }

    /// The plans the config needs: plan name → fields.
    pub fn plans(&self) -> BTreeMap<String, Vec<(String, String)>> {
        self.rules()
            .iter()
            .filter(|r| r.limits())
            .flat_map(|r| r.plans())
            .collect()
    }

    pub fn domain(&self, name: &str) -> Option<&Domain> {
        self.domains.get(name)
    }
}

// ---------------------------------------------------------------------------
// YAML model

fn de_time_unit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TimeUnit>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    match text {
        None => Ok(None),
        Some(t) => TimeUnit::parse(&t).map(Some).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid rate limit unit '{t}' (expected second, minute, hour, day, week, month or year)"
            ))
        }),
    }
}

fn valid_duration(text: &str) -> bool {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &text[digits.len()..];
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.parse::<u64>().is_ok_and(|n| n > 0)
        && matches!(suffix, "ms" | "s" | "m" | "h" | "d" | "w")
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    match text {
        Some(t) if !valid_duration(&t) => Err(serde::de::Error::custom(format!(
            "invalid duration '{t}' (expected digits and ms, s, m, h, d or w, e.g. 60s)"
        ))),
        other => Ok(other),
    }
}

fn valid_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 48
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-:/@".contains(&b))
}

fn de_cost_unit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    match text {
        Some(t) if !valid_name(&t) => Err(serde::de::Error::custom(format!(
            "invalid cost_unit '{t}' (1-48 letters, digits or _ - : / @)"
        ))),
        other => Ok(other),
    }
}

fn de_algorithm<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    match text.as_deref() {
        None | Some("fixed") | Some("sliding") | Some("bucket") => Ok(text),
        Some(t) => Err(serde::de::Error::custom(format!(
            "invalid algorithm '{t}' (expected fixed, sliding or bucket)"
        ))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlRoot {
    domain: Option<String>,
    #[serde(default)]
    descriptors: Option<Vec<YamlDescriptor>>,
    #[serde(default)]
    tollgate: Option<YamlDomainExt>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlDomainExt {
    tenant_key: Option<String>,
    request_id_key: Option<String>,
    settle_id_key: Option<String>,
    #[serde(default, deserialize_with = "de_duration")]
    reservation_ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlDescriptor {
    key: Option<String>,
    value: Option<String>,
    rate_limit: Option<YamlRateLimit>,
    #[serde(default)]
    descriptors: Option<Vec<YamlDescriptor>>,
    #[serde(default)]
    shadow_mode: bool,
    #[serde(default)]
    quota_mode: bool,
    #[serde(default)]
    detailed_metric: bool,
    #[serde(default)]
    value_to_metric: bool,
    #[serde(default)]
    share_threshold: bool,
    metadata: Option<serde_norway::Value>,
    tollgate: Option<YamlRuleExt>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlRateLimit {
    requests_per_unit: Option<u32>,
    #[serde(default, deserialize_with = "de_time_unit")]
    unit: Option<TimeUnit>,
    #[serde(default)]
    unlimited: bool,
    name: Option<String>,
    replaces: Option<Vec<YamlReplaces>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlReplaces {
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlRuleExt {
    #[serde(default, deserialize_with = "de_algorithm")]
    algorithm: Option<String>,
    burst: Option<u64>,
    precision: Option<u32>,
    #[serde(default, deserialize_with = "de_cost_unit")]
    cost_unit: Option<String>,
    concurrency: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    concurrency_ttl: Option<String>,
    #[serde(default)]
    report_usage: bool,
}

// ---------------------------------------------------------------------------
// Names

/// 64-bit FNV-1a: stable across builds and platforms (plan and unit names are
/// persisted in Redis, so their hash must never change).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn plan_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_-.:/@#".contains(c)
}

/// A plan name (1-64 of `A-Z a-z 0-9 _ - . : / @ #`) for `identity`: readable when
/// it fits, else a readable prefix and a hash of the whole.
pub fn plan_name(prefix: &str, identity: &str) -> String {
    let readable = format!("{prefix}{identity}");
    if readable.len() <= 64 && readable.chars().all(plan_char) {
        return readable;
    }
    let hash = format!("#{:016x}", fnv1a(identity.as_bytes()));
    let mut head: String = readable
        .chars()
        .map(|c| if plan_char(c) { c } else { '_' })
        .collect();
    let room = 64 - hash.len();
    if head.len() > room {
        let mut cut = room;
        while !head.is_char_boundary(cut) {
            cut -= 1;
        }
        head.truncate(cut);
    }
    head + &hash
}

// ---------------------------------------------------------------------------
// Loading

/// One file's contents, parsed but not yet merged.
struct FileConfig {
    file: String,
    domain: String,
    options: DomainOptions,
    descriptors: Vec<YamlDescriptor>,
}

fn parse_file(file: &str, text: &str) -> Result<FileConfig, ConfigError> {
    let err = |message: String| ConfigError {
        file: file.to_string(),
        message,
    };
    let root: YamlRoot = serde_norway::from_str(text).map_err(|e| {
        let message = e.to_string();
        err(match e.location() {
            Some(loc) if !message.contains("line ") => {
                format!("line {} column {}: {message}", loc.line(), loc.column())
            }
            _ => message,
        })
    })?;
    let domain = root.domain.unwrap_or_default();
    if domain.is_empty() {
        return Err(err("config file cannot have empty domain".into()));
    }
    let options = match root.tollgate {
        None => DomainOptions::default(),
        Some(ext) => DomainOptions {
            tenant_key: ext.tenant_key.filter(|k| !k.is_empty()),
            request_id_key: ext.request_id_key.filter(|k| !k.is_empty()),
            settle_id_key: ext.settle_id_key.filter(|k| !k.is_empty()),
            reservation_ttl: ext.reservation_ttl,
        },
    };
    if options.request_id_key.is_some() && options.request_id_key == options.settle_id_key {
        return Err(err(
            "tollgate.request_id_key and tollgate.settle_id_key must differ".into(),
        ));
    }
    Ok(FileConfig {
        file: file.to_string(),
        domain,
        options,
        descriptors: root.descriptors.unwrap_or_default(),
    })
}

fn load_descriptors(
    file: &str,
    domain: &str,
    options: &DomainOptions,
    parent_path: &str,
    where_: &str,
    node: &mut Node,
    descriptors: Vec<YamlDescriptor>,
) -> Result<(), ConfigError> {
    for (i, d) in descriptors.into_iter().enumerate() {
        let here = format!("{where_}descriptors[{i}]");
        let err = |message: String| ConfigError {
            file: file.to_string(),
            message: format!("{here}: {message}"),
        };
        let key = d.key.clone().unwrap_or_default();
        if key.is_empty() {
            return Err(err("descriptor has empty key".into()));
        }
        if options.is_control(&key) {
            return Err(err(format!(
                "descriptor key '{key}' is a tollgate control entry (request_id_key/settle_id_key)"
            )));
        }
        let value = d.value.clone().unwrap_or_default();
        let final_key = if value.is_empty() {
            key.clone()
        } else {
            format!("{key}_{value}")
        };
        let path = if parent_path.is_empty() {
            final_key.clone()
        } else {
            format!("{parent_path}.{final_key}")
        };
        if node.children.contains_key(&final_key) {
            return Err(err(format!(
                "duplicate descriptor composite key '{domain}.{path}'"
            )));
        }
        if d.share_threshold && !final_key.contains('*') {
            return Err(err(format!(
                "share_threshold can only be used with wildcard values (containing '*'), but found key '{final_key}'"
            )));
        }
        let rule = compile_rule(file, domain, &path, &here, &d)?;
        // A lease must be released by the request it belongs to: the request path
        // takes it under the request id, the response path frees it by the settle id.
        if rule.as_ref().is_some_and(|r| r.concurrency.is_some())
            && (options.request_id_key.is_none() || options.settle_id_key.is_none())
        {
            return Err(err(
                "tollgate.concurrency needs tollgate.request_id_key and tollgate.settle_id_key in the domain's tollgate block (the lease is taken under the request id and released by the settle id)"
                    .into(),
            ));
        }
        if final_key.contains('*') {
            node.wildcards.push((
                final_key.clone(),
                final_key.split('*').map(str::to_string).collect(),
            ));
        }
        let mut child = Node {
            rule: rule.map(Arc::new),
            share_threshold: d.share_threshold,
            value_to_metric: d.value_to_metric,
            ..Node::default()
        };
        if let Some(nested) = d.descriptors {
            load_descriptors(
                file,
                domain,
                options,
                &path,
                &format!("{here}."),
                &mut child,
                nested,
            )?;
        }
        node.children.insert(final_key, child);
    }
    Ok(())
}

fn compile_rule(
    file: &str,
    domain: &str,
    path: &str,
    here: &str,
    d: &YamlDescriptor,
) -> Result<Option<Rule>, ConfigError> {
    let err = |message: String| ConfigError {
        file: file.to_string(),
        message: format!("{here}: {message}"),
    };
    let ext = d.tollgate.as_ref();
    let concurrency = match ext.and_then(|e| e.concurrency) {
        Some(0) => return Err(err("tollgate.concurrency must be at least 1".into())),
        Some(max) => Some(Concurrency {
            max,
            ttl: ext.and_then(|e| e.concurrency_ttl.clone()),
        }),
        None => {
            if ext.is_some_and(|e| e.concurrency_ttl.is_some()) {
                return Err(err(
                    "tollgate.concurrency_ttl needs tollgate.concurrency".into()
                ));
            }
            None
        }
    };
    let Some(rl) = &d.rate_limit else {
        if ext.is_some_and(|e| e.report_usage) {
            return Err(err(
                "tollgate.report_usage needs a rate_limit (usage is charged to its rate)".into(),
            ));
        }
        if concurrency.is_none() {
            if let Some(e) = ext {
                if e.algorithm.is_some() || e.burst.is_some() || e.precision.is_some() {
                    return Err(err(
                        "tollgate algorithm options need a rate_limit block".into()
                    ));
                }
            }
            return Ok(None);
        }
        return Ok(Some(rule(domain, path, d, None, false, concurrency, "")));
    };
    let name = rl.name.clone().unwrap_or_default();
    let mut replaces = Vec::new();
    for r in rl.replaces.iter().flatten() {
        let n = r.name.clone().unwrap_or_default();
        if n.is_empty() {
            return Err(err("should not have an empty replaces entry".into()));
        }
        if n == name {
            return Err(err(
                "replaces should not contain name of same descriptor".into()
            ));
        }
        replaces.push(n);
    }
    let rate = if rl.unlimited {
        if rl.unit.is_some() {
            return Err(err(
                "should not specify rate limit unit when unlimited".into()
            ));
        }
        None
    } else {
        let Some(unit) = rl.unit else {
            return Err(err(
                "invalid rate limit unit '' (rate_limit.unit is required)".into(),
            ));
        };
        let requests_per_unit = rl.requests_per_unit.unwrap_or(0);
        let algorithm = match ext.and_then(|e| e.algorithm.as_deref()) {
            None | Some("fixed") => {
                if ext.is_some_and(|e| e.burst.is_some() || e.precision.is_some()) {
                    return Err(err(
                        "tollgate.burst needs algorithm bucket, tollgate.precision algorithm sliding"
                            .into(),
                    ));
                }
                Algorithm::Fixed
            }
            Some("sliding") => {
                if ext.is_some_and(|e| e.burst.is_some()) {
                    return Err(err("tollgate.burst needs algorithm bucket".into()));
                }
                let precision = ext.and_then(|e| e.precision);
                if precision.is_some_and(|k| !(1..=600).contains(&k)) {
                    return Err(err("tollgate.precision must be 1 to 600".into()));
                }
                Algorithm::Sliding { precision }
            }
            Some(_) => {
                if ext.is_some_and(|e| e.precision.is_some()) {
                    return Err(err("tollgate.precision needs algorithm sliding".into()));
                }
                if requests_per_unit == 0 {
                    return Err(err(
                        "requests_per_unit must be at least 1 for algorithm bucket".into(),
                    ));
                }
                Algorithm::Bucket {
                    burst: ext.and_then(|e| e.burst),
                }
            }
        };
        Some(Rate {
            requests_per_unit,
            unit,
            algorithm,
        })
    };
    let mut compiled = rule(domain, path, d, rate, rl.unlimited, concurrency, &name);
    compiled.replaces = replaces;
    Ok(Some(compiled))
}

fn rule(
    domain: &str,
    path: &str,
    d: &YamlDescriptor,
    rate: Option<Rate>,
    unlimited: bool,
    concurrency: Option<Concurrency>,
    name: &str,
) -> Rule {
    let ext = d.tollgate.as_ref();
    let cost_unit = ext
        .and_then(|e| e.cost_unit.clone())
        .unwrap_or_else(|| "request".to_string());
    let identity = format!("{domain}:{path}");
    // The unit is per rule key path (without runtime values) so that one request's
    // descriptors can be charged different costs in one call; it is stable across
    // reloads while the rule's path stays.
    let unit_id = format!("{cost_unit}.{:06x}", fnv1a(identity.as_bytes()) & 0xff_ffff);
    Rule {
        domain: domain.to_string(),
        path: path.to_string(),
        name: name.to_string(),
        replaces: Vec::new(),
        rate,
        unlimited,
        concurrency,
        shadow_mode: d.shadow_mode,
        quota_mode: d.quota_mode,
        detailed_metric: d.detailed_metric,
        value_to_metric: d.value_to_metric,
        report_usage: ext.is_some_and(|e| e.report_usage),
        cost_unit,
        plan: plan_name("rls:", &identity),
        unit_id,
        metadata: d.metadata.clone(),
    }
}

/// Builds a config from `(file name, contents)` pairs. With `merge_domains`, files
/// naming the same domain are merged (envoyproxy/ratelimit's `MERGE_DOMAIN_CONFIG`).
pub fn from_sources(
    sources: &[(String, String)],
    merge_domains: bool,
) -> Result<Config, ConfigError> {
    let mut config = Config::default();
    for (file, text) in sources {
        let parsed = parse_file(file, text)?;
        let FileConfig {
            file,
            domain,
            options,
            descriptors,
        } = parsed;
        if let Some(existing) = config.domains.get_mut(&domain) {
            if !merge_domains {
                return Err(ConfigError {
                    file,
                    message: format!("duplicate domain '{domain}' in config file"),
                });
            }
            if options != DomainOptions::default() && options != existing.options {
                return Err(ConfigError {
                    file,
                    message: format!(
                        "domain '{domain}' is merged from several files whose tollgate blocks differ"
                    ),
                });
            }
            let mut root = std::mem::take(&mut existing.root);
            let opts = existing.options.clone();
            load_descriptors(&file, &domain, &opts, "", "", &mut root, descriptors)?;
            if let Some(existing) = config.domains.get_mut(&domain) {
                existing.root = root;
            }
        } else {
            let mut root = Node::default();
            load_descriptors(&file, &domain, &options, "", "", &mut root, descriptors)?;
            config.domains.insert(
                domain.clone(),
                Domain {
                    name: domain,
                    options,
                    root,
                },
            );
        }
        config.files.push(file);
    }
    // Plan names must be unique (a hash collision between two rules would merge them).
    let mut seen: HashMap<String, String> = HashMap::new();
    for rule in config.rules() {
        let id = format!("{}.{}", rule.domain, rule.path);
        if let Some(other) = seen.insert(rule.plan.clone(), id.clone()) {
            return Err(ConfigError {
                file: "config".into(),
                message: format!(
                    "rules '{other}' and '{id}' map to one plan name '{}'; rename one",
                    rule.plan
                ),
            });
        }
    }
    Ok(config)
}

/// The `*.yaml` / `*.yml` files of `dir` (not recursive, dot files skipped unless
/// asked), sorted by name.
pub fn config_files(dir: &Path, include_dot_files: bool) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') && !include_dot_files {
            continue;
        }
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if yaml && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Loads every config file of `dir`.
pub fn load_dir(
    dir: &Path,
    merge_domains: bool,
    include_dot_files: bool,
) -> Result<Config, ConfigError> {
    let files = config_files(dir, include_dot_files).map_err(|e| ConfigError {
        file: dir.display().to_string(),
        message: format!("cannot read the config directory: {e}"),
    })?;
    let mut sources = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            message: format!("cannot read: {e}"),
        })?;
        sources.push((path.display().to_string(), text));
    }
    from_sources(&sources, merge_domains)
}

#[cfg(test)]
mod tests;
