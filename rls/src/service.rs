//! `ShouldRateLimit`: from Envoy's descriptors to Tollgate calls and back.
//!
//! Each descriptor that matches a rule becomes a subject key and the rule's plan; all
//! of a request's enforced descriptors are decided in one `RL.ACQUIRE ... ALSO` (one
//! atomic step: over the limit anywhere, nothing charged anywhere). Where one call
//! cannot hold them (keys in different cluster slots, more keys than a call takes, a
//! server without `ALSO`), each part is acquired under a request id and, if any part
//! is denied, the parts that were admitted are refunded: a limit is never
//! over-admitted, and may only be under-admitted for the instant between a charge and
//! its refund.
//!
//! What must always hold: a Redis failure is answered by the configured failure mode,
//! never by a half decision; statuses come back one per request descriptor, in order.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use futures_util::future::join_all;
use prost_types::{value::Kind, ListValue, Struct, Value as PValue};
use redis::{Cmd, Value};
use tonic::{Request, Response, Status};

use crate::backend::{slot, Redis};
use crate::config::{
    Algorithm, Config, DomainOptions, Rate, Rule, TimeUnit, CONCURRENCY_LIMIT_NAME, RATE_LIMIT_NAME,
};
use crate::metrics::Metrics;
use crate::proto::envoy::config::core::v3::HeaderValue;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit, Code, DescriptorStatus, RateLimit,
};
use crate::proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use crate::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use crate::reply::{self, Decision, KeyState};
use crate::window;

/// What to answer when Redis cannot be reached or does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailureMode {
    /// Answer OK (fail open).
    Allow,
    /// Answer OVER_LIMIT (fail closed).
    Deny,
    /// Answer a gRPC UNAVAILABLE error: Envoy's `failure_mode_deny` decides.
    Error,
}

/// Service settings from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    pub failure_mode: FailureMode,
    pub shadow_mode: bool,
    pub legacy_headers: bool,
    pub ietf_headers: bool,
    pub dynamic_metadata: bool,
    pub max_keys_per_call: usize,
    pub reservation_ttl_ms: u64,
    pub near_limit_ratio: f64,
    pub max_override_plans: usize,
}

/// The rate limit service.
pub struct Service {
    config: RwLock<Arc<Config>>,
    redis: Redis,
    metrics: Arc<Metrics>,
    settings: Settings,
    also_supported: AtomicBool,
    override_plans: Mutex<OverridePlans>,
    resyncing: Arc<AtomicBool>,
}

/// The plans made for Envoy's per-descriptor `limit` overrides (one per rule path,
/// limit and unit). Every one stays in Redis, so their number is bounded.
#[derive(Default)]
struct OverridePlans {
    /// Every override plan this process made (never shrinks: the plans stay).
    made: HashSet<String>,
    /// Those applied to Redis since the last (re)sync of the config's plans.
    synced: HashSet<String>,
    /// Requests refused at the bound (logs are throttled by it).
    refused: u64,
}

/// One request descriptor, prepared.
struct Item {
    rule: Option<Arc<Rule>>,
    key: String,
    metric_key: String,
    hits: u64,
    negative: bool,
    unlimited: bool,
}

/// One subject key of a call.
#[derive(Clone)]
struct Pair {
    key: String,
    rule: Arc<Rule>,
    cost: u64,
    items: Vec<usize>,
}

/// What a group of pairs got.
struct Outcome {
    allowed: bool,
    /// Per pair (same order as the group): its limits, and whether it was over.
    states: Vec<(KeyState, bool)>,
    shadow_over: bool,
}

#[derive(Debug)]
enum CallError {
    Redis(redis::RedisError),
    NoAlso,
    UnknownPlan,
    Reply(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Redis(e) => write!(f, "{e}"),
            CallError::NoAlso => write!(f, "the server does not know RL.ACQUIRE ... ALSO"),
            CallError::UnknownPlan => write!(f, "a plan is missing on the server"),
            CallError::Reply(text) => write!(f, "{text}"),
        }
    }
}

impl From<redis::RedisError> for CallError {
    fn from(e: redis::RedisError) -> Self {
        let text = e.to_string();
        if text.contains("unexpected argument 'ALSO'")
            || text.contains("unexpected argument 'also'")
        {
            CallError::NoAlso
        } else if text.contains("unknown plan") {
            CallError::UnknownPlan
        } else {
            CallError::Redis(e)
        }
    }
}

fn clamp_u32(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// Whether deciding `group` charges anything (and so runs under an id): a
/// reservation was asked for, or some pair has a cost.
fn charges(group: &[Pair], reserve: Option<(&str, u64)>) -> bool {
    reserve.is_some() || group.iter().any(|p| p.cost > 0)
}

fn random_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("rls-{:016x}", h.finish())
}

/// The subject key of a descriptor: `rls:{tag}:domain:k1_v1.k2_v2` when the request
/// names its tenant (every key of the tenant shares the slot of `{tag}`), else
/// `rls:domain:k1_v1.k2_v2`.
pub fn subject_key(domain: &str, tag: Option<&str>, entries: &[(String, String)]) -> String {
    let mut key = String::from("rls:");
    if let Some(tag) = tag {
        key.push('{');
        key.push_str(if tag.is_empty() { "~" } else { tag });
        key.push_str("}:");
    }
    key.push_str(domain);
    key.push(':');
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            key.push('.');
        }
        key.push_str(k);
        key.push('_');
        key.push_str(v);
    }
    key
}

fn status_ok() -> DescriptorStatus {
    DescriptorStatus {
        code: Code::Ok as i32,
        ..DescriptorStatus::default()
    }
}

fn current_limit(rule: &Rule) -> Option<RateLimit> {
    match (&rule.rate, &rule.concurrency) {
        (Some(rate), _) => Some(RateLimit {
            name: rule.name.clone(),
            requests_per_unit: rate.requests_per_unit,
            unit: rate.unit.proto(),
        }),
        (None, Some(c)) => Some(RateLimit {
            name: rule.name.clone(),
            requests_per_unit: u32::try_from(c.max).unwrap_or(u32::MAX),
            unit: rate_limit::Unit::Unknown as i32,
        }),
        (None, None) => None,
    }
}

/// The limit of a key's state that reports for the rule.
fn main_limit<'a>(rule: &Rule, state: &'a KeyState) -> Option<&'a reply::LimitState> {
    if rule.rate.is_some() {
        state.limit(RATE_LIMIT_NAME)
    } else {
        state.limit(CONCURRENCY_LIMIT_NAME)
    }
}

fn duration_until_reset(rule: &Rule, state: Option<&reply::LimitState>) -> prost_types::Duration {
    let reset_ms = state.map(|l| l.reset_ms).unwrap_or(0).max(0);
    let ms = match &rule.rate {
        Some(Rate {
            unit,
            algorithm: Algorithm::Fixed,
            ..
        }) if reset_ms == 0 => {
            let now = window::now_ms();
            window::window_end(*unit, now).saturating_sub(now) as i64
        }
        _ => reset_ms,
    };
    prost_types::Duration {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn sval(s: &str) -> PValue {
    PValue {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn yaml_to_value(v: &serde_norway::Value) -> PValue {
    use serde_norway::Value as Y;
    let kind = match v {
        Y::Null => Kind::NullValue(0),
        Y::Bool(b) => Kind::BoolValue(*b),
        Y::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Y::String(s) => Kind::StringValue(s.clone()),
        Y::Sequence(items) => Kind::ListValue(ListValue {
            values: items.iter().map(yaml_to_value).collect(),
        }),
        Y::Mapping(m) => Kind::StructValue(Struct {
            fields: m
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        Y::String(s) => s.clone(),
                        other => serde_norway::to_string(other)
                            .unwrap_or_default()
                            .trim()
                            .to_string(),
                    };
                    (key, yaml_to_value(v))
                })
                .collect(),
        }),
        Y::Tagged(t) => return yaml_to_value(&t.value),
    };
    PValue { kind: Some(kind) }
}

fn merge_struct(dest: &mut Struct, src: &Struct) {
    for (k, v) in &src.fields {
        match (dest.fields.get_mut(k), &v.kind) {
            (
                Some(PValue {
                    kind: Some(Kind::StructValue(d)),
                }),
                Some(Kind::StructValue(s)),
            ) => merge_struct(d, s),
            (Some(_), _) => {}
            (None, _) => {
                dest.fields.insert(k.clone(), v.clone());
            }
        }
    }
}

/// A structured-field string for IETF headers: the rule's name, else its key.
fn sf_name(rule: &Rule) -> String {
    let raw = if rule.name.is_empty() {
        &rule.path
    } else {
        &rule.name
    };
    raw.chars()
        .filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\')
        .collect()
}

impl Service {
    pub fn new(config: Config, redis: Redis, metrics: Arc<Metrics>, settings: Settings) -> Service {
        Service {
            config: RwLock::new(Arc::new(config)),
            redis,
            metrics,
            settings,
            also_supported: AtomicBool::new(true),
            override_plans: Mutex::new(OverridePlans::default()),
            resyncing: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Swaps in a new config (its plans must already be applied).
    pub fn set_config(&self, config: Config) {
        let config = Arc::new(config);
        match self.config.write() {
            Ok(mut c) => *c = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// Applies every plan of `config` to Redis.
    pub async fn sync_plans(&self, config: &Config) -> Result<usize, String> {
        // Override plans are made on demand; forget them so they are re-made.
        if let Ok(mut overrides) = self.override_plans.lock() {
            overrides.synced.clear();
        }
        self.redis.sync_plans(&config.plans()).await
    }

    /// Re-applies the current config's plans in the background (a server restarted
    /// without persistence, or a new node, lacks them), once at a time.
    fn resync_plans(self: &Service) {
        if self.resyncing.swap(true, Ordering::SeqCst) {
            return;
        }
        let redis = self.redis.clone();
        let plans = self.config().plans();
        if let Ok(mut overrides) = self.override_plans.lock() {
            overrides.synced.clear();
        }
        let flag = self.resyncing.clone();
        tokio::spawn(async move {
            match redis.sync_plans(&plans).await {
                Ok(n) => tracing::info!(plans = n, "plans re-applied"),
                Err(e) => tracing::warn!(error = %e, "re-applying plans failed"),
            }
            flag.store(false, Ordering::SeqCst);
        });
    }

    /// The rule for a descriptor's `limit` override: the matched rule with the
    /// override's rate (same unit, so the counter carries over), or a rule of its own.
    fn override_rule(
        &self,
        domain: &str,
        matched: Option<&Arc<Rule>>,
        entries: &[(String, String)],
        requests_per_unit: u32,
        unit: TimeUnit,
    ) -> Arc<Rule> {
        let path: String = entries
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(".");
        let base = match matched {
            Some(rule) => (**rule).clone(),
            None => {
                let identity = format!("{domain}:{path}");
                Rule {
                    domain: domain.to_string(),
                    path: path.clone(),
                    name: String::new(),
                    replaces: Vec::new(),
                    rate: None,
                    unlimited: false,
                    concurrency: None,
                    shadow_mode: false,
                    quota_mode: false,
                    detailed_metric: false,
                    value_to_metric: false,
                    report_usage: false,
                    cost_unit: "request".into(),
                    plan: String::new(),
                    unit_id: format!(
                        "request.{:06x}",
                        crate::config::fnv1a(identity.as_bytes()) & 0xff_ffff
                    ),
                    metadata: None,
                }
            }
        };
        let algorithm = base
            .rate
            .as_ref()
            .map(|r| r.algorithm)
            .unwrap_or(Algorithm::Fixed);
        let identity = format!("{domain}:{}:{requests_per_unit}/{}", base.path, unit.name());
        Arc::new(Rule {
            rate: Some(Rate {
                requests_per_unit,
                unit,
                algorithm,
            }),
            // As envoyproxy/ratelimit: an override from Envoy is never in shadow mode.
            shadow_mode: false,
            quota_mode: false,
            replaces: Vec::new(),
            name: String::new(),
            plan: crate::config::plan_name("rls-o:", &identity),
            ..base
        })
    }

    async fn ensure_override_plan(&self, rule: &Rule) -> Result<(), CallError> {
        let known = self
            .override_plans
            .lock()
            .map(|s| s.synced.contains(&rule.plan))
            .unwrap_or(false);
        if known {
            return Ok(());
        }
        let plans = rule.plans().collect();
        self.redis
            .sync_plans(&plans)
            .await
            .map_err(CallError::Reply)?;
        if let Ok(mut s) = self.override_plans.lock() {
            s.synced.insert(rule.plan.clone());
        }
        Ok(())
    }

    /// Whether the override plan of `rule` may be used: already made, or one more
    /// fits under `--max-override-plans`. A refusal is counted and logged (the 1st,
    /// 2nd, 4th, 8th... one, so a flood does not flood the log).
    fn admit_override_plan(&self, rule: &Rule) -> bool {
        let Ok(mut plans) = self.override_plans.lock() else {
            return false;
        };
        if plans.made.contains(&rule.plan) {
            return true;
        }
        if plans.made.len() < self.settings.max_override_plans {
            plans.made.insert(rule.plan.clone());
            self.metrics
                .override_plans
                .set(i64::try_from(plans.made.len()).unwrap_or(i64::MAX));
            return true;
        }
        plans.refused += 1;
        self.metrics.override_plans_refused.inc();
        if plans.refused.is_power_of_two() {
            tracing::warn!(
                domain = %rule.domain,
                rule = %rule.path,
                plan = %rule.plan,
                made = plans.made.len(),
                refused = plans.refused,
                "a descriptor limit override would pass --max-override-plans: the request is denied (OVER_LIMIT, nothing charged)"
            );
        }
        false
    }

    fn acquire_cmd(&self, group: &[Pair], id: Option<(&str, u64)>, peek: bool) -> Cmd {
        let mut cmd = redis::cmd(if peek { "RL.PEEK" } else { "RL.ACQUIRE" });
        let mut units: Vec<(&str, u64)> = Vec::new();
        for p in group {
            if p.rule.rate.is_some() && !units.iter().any(|(u, _)| *u == p.rule.unit_id) {
                units.push((&p.rule.unit_id, p.cost));
            }
        }
        let Some(first) = group.first() else {
            return cmd;
        };
        cmd.arg(&first.key).arg(&first.rule.plan);
        if !units.is_empty() {
            cmd.arg("COST");
            for (u, c) in &units {
                cmd.arg(*u).arg(*c);
            }
        }
        if let (Some((id, ttl)), false) = (id, peek) {
            cmd.arg("ID").arg(id).arg("TTL").arg(ttl);
        }
        if group.len() > 1 {
            cmd.arg("ALSO").arg(group.len() - 1);
            for p in group.iter().skip(1) {
                cmd.arg(&p.key).arg(&p.rule.plan);
            }
        }
        cmd
    }

    /// One call deciding a whole group atomically.
    async fn call_group(
        &self,
        group: &[Pair],
        id: Option<(&str, u64)>,
    ) -> Result<Outcome, CallError> {
        let peek = !charges(group, id);
        self.query_outcome(group, &self.acquire_cmd(group, id, peek))
            .await
    }

    /// What one pair would get, charging nothing (`RL.PEEK`).
    async fn peek_one(&self, pair: &Pair) -> Result<Outcome, CallError> {
        let g = std::slice::from_ref(pair);
        self.query_outcome(g, &self.acquire_cmd(g, None, true))
            .await
    }

    /// Runs an `RL.ACQUIRE`/`RL.PEEK` of `group` and reads what each pair got.
    async fn query_outcome(&self, group: &[Pair], cmd: &Cmd) -> Result<Outcome, CallError> {
        let v = self.redis.query(cmd).await?;
        let d = Decision::parse(&v)
            .ok_or_else(|| CallError::Reply(format!("unexpected reply {v:?}")))?;
        Ok(self.outcome(group, &d))
    }

    /// Each pair peeked on its own: its limits and whether it is over.
    async fn peek_each(&self, pairs: Vec<Pair>) -> Result<Vec<(Pair, KeyState, bool)>, CallError> {
        let results = join_all(pairs.iter().map(|p| self.peek_one(p))).await;
        let mut out = Vec::with_capacity(pairs.len());
        for (p, r) in pairs.into_iter().zip(results) {
            if let Some((state, over)) = r?.states.into_iter().next() {
                out.push((p, state, over));
            }
        }
        Ok(out)
    }

    fn outcome(&self, group: &[Pair], d: &Decision) -> Outcome {
        let states = group
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let state = d
                    .keys
                    .iter()
                    .find(|k| k.key.as_deref() == Some(p.key.as_str()))
                    .or_else(|| d.keys.get(i))
                    .cloned()
                    .unwrap_or_default();
                let over = !d.allowed
                    && (group.len() == 1
                        || d.denied_key.as_deref() == Some(p.key.as_str())
                        || main_limit(&p.rule, &state).is_some_and(|l| {
                            l.remaining < i64::try_from(p.cost).unwrap_or(i64::MAX)
                        }));
                (state, over)
            })
            .collect();
        Outcome {
            allowed: d.allowed,
            states,
            shadow_over: d.shadow_denied_by.is_some(),
        }
    }

    /// The `RL.RELEASE` calls that settle the reservation `id` of a group at `costs`
    /// (unit → actual; units not named stay as charged): one on the first key when
    /// the group was one `ALSO` call, else one per key.
    fn release_cmds(&self, g: &[Pair], id: &str, costs: &[(String, u64)]) -> Vec<Cmd> {
        let release = |key: &str, units: &mut dyn Iterator<Item = &(String, u64)>| {
            let mut cmd = redis::cmd("RL.RELEASE");
            cmd.arg(key).arg(id);
            let units: Vec<&(String, u64)> = units.collect();
            if !units.is_empty() {
                cmd.arg("COST");
                for (u, c) in units {
                    cmd.arg(u).arg(*c);
                }
            }
            cmd
        };
        if g.len() == 1 || self.also_supported.load(Ordering::Relaxed) {
            g.first()
                .map(|first| release(&first.key, &mut costs.iter()))
                .into_iter()
                .collect()
        } else {
            g.iter()
                .map(|p| {
                    release(
                        &p.key,
                        &mut costs.iter().filter(|(u, _)| *u == p.rule.unit_id),
                    )
                })
                .collect()
        }
    }

    /// Whether the server takes `ALSO` (an `RL.PEEK` of two of the group's keys).
    async fn probe_also(&self, group: &[Pair]) -> bool {
        let (Some(a), Some(b)) = (group.first(), group.get(1)) else {
            return true;
        };
        let mut cmd = redis::cmd("RL.PEEK");
        cmd.arg(&a.key)
            .arg(&a.rule.plan)
            .arg("ALSO")
            .arg(1)
            .arg(&b.key)
            .arg(&b.rule.plan);
        match self.redis.query(&cmd).await {
            Ok(_) => true,
            Err(e) => !e.to_string().to_ascii_uppercase().contains("ALSO"),
        }
    }

    /// Decides groups that cannot be one call: each part under a request id; if any
    /// part is denied, the admitted parts are refunded.
    async fn call_split(
        &self,
        groups: &[Vec<Pair>],
        reserve: Option<(&str, u64)>,
    ) -> Result<Vec<Outcome>, CallError> {
        let generated = random_id();
        let id = reserve.unwrap_or((generated.as_str(), 10_000));
        let results = join_all(
            groups
                .iter()
                .map(|g| self.call_unit(g, charges(g, reserve).then_some(id))),
        )
        .await;
        let mut outcomes = Vec::new();
        for r in results {
            outcomes.push(r?);
        }
        let all = outcomes.iter().all(|o| o.allowed);
        let releases: Vec<Cmd> = groups
            .iter()
            .zip(&outcomes)
            .filter(|(g, o)| o.allowed && charges(g, reserve))
            .filter(|_| !all || reserve.is_none())
            .flat_map(|(g, _)| {
                // Refund what a part charged (settle it at zero), or, when all were
                // admitted, just free the bookkeeping of the generated id.
                let costs: Vec<(String, u64)> = if all {
                    Vec::new()
                } else {
                    g.iter()
                        .filter(|p| p.rule.rate.is_some())
                        .map(|p| (p.rule.unit_id.clone(), 0))
                        .collect()
                };
                self.release_cmds(g, id.0, &costs)
            })
            .collect();
        if !all {
            // Refunds are awaited: once the caller hears "denied", nothing is charged.
            for cmd in &releases {
                if let Err(e) = self.redis.query(cmd).await {
                    tracing::warn!(error = %e, "refunding a denied call's admitted part failed");
                }
            }
        } else if !releases.is_empty() {
            // Admitted: only the bookkeeping of the parts' ids is left to free.
            let redis = self.redis.clone();
            tokio::spawn(async move {
                for cmd in releases {
                    if let Err(e) = redis.query(&cmd).await {
                        tracing::warn!(error = %e, "releasing a split call's part failed (it expires by itself)");
                    }
                }
            });
        }
        if !all {
            for o in &mut outcomes {
                o.allowed = false;
            }
        }
        Ok(outcomes)
    }

    /// Splits pairs into calls: by cluster slot (when keys do not share one), at most
    /// `max_keys_per_call` keys and one pair per unit in each.
    fn groups(&self, mut pairs: Vec<Pair>) -> Vec<Vec<Pair>> {
        pairs.sort_by(|a, b| a.key.cmp(&b.key));
        let cluster = self.redis.is_cluster();
        let mut groups: Vec<(u16, Vec<Pair>)> = Vec::new();
        for p in pairs {
            let s = if cluster { slot(p.key.as_bytes()) } else { 0 };
            let fits = |g: &(u16, Vec<Pair>)| {
                g.0 == s
                    && g.1.len() < self.settings.max_keys_per_call.max(1)
                    && !g.1.iter().any(|q| q.rule.unit_id == p.rule.unit_id)
            };
            match groups.iter_mut().find(|g| fits(g)) {
                Some(g) => g.1.push(p),
                None => groups.push((s, vec![p])),
            }
        }
        groups.into_iter().map(|(_, g)| g).collect()
    }

    /// Decides one group of same-slot pairs in one atomic step: one call (with
    /// `ALSO` for several keys), or, on a server without `ALSO`, one script that peeks
    /// every key and acquires them all only if every one admits.
    async fn call_unit(&self, g: &[Pair], id: Option<(&str, u64)>) -> Result<Outcome, CallError> {
        if g.len() > 1 && !self.also_supported.load(Ordering::Relaxed) {
            return self.call_script(g, id).await;
        }
        let mut result = self.call_group(g, id).await;
        if let Err(CallError::Redis(e)) = &result {
            // A server without ALSO may read it as a COST unit and fail on what
            // follows; ask it plainly whether it knows ALSO.
            if g.len() > 1
                && e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
                && !self.probe_also(g).await
            {
                result = Err(CallError::NoAlso);
            }
        }
        match result {
            Err(CallError::NoAlso) => {
                tracing::warn!("the server has no RL.ACQUIRE ... ALSO: deciding several keys with a script (peek all, then acquire all)");
                self.also_supported.store(false, Ordering::Relaxed);
                self.call_script(g, id).await
            }
            other => other,
        }
    }

    /// The no-`ALSO` path of [`Service::call_unit`]: atomic, as scripts are.
    async fn call_script(&self, g: &[Pair], id: Option<(&str, u64)>) -> Result<Outcome, CallError> {
        const SCRIPT: &str = r"
local n = tonumber(ARGV[1])
local id, ttl, peek_only = ARGV[3 * n + 2], ARGV[3 * n + 3], ARGV[3 * n + 4] == '1'
local function args(i, name)
  local a = {name, KEYS[i], ARGV[3 * i - 1]}
  if ARGV[3 * i] ~= '' then
    a[#a + 1] = 'COST'; a[#a + 1] = ARGV[3 * i]; a[#a + 1] = ARGV[3 * i + 1]
  end
  return a
end
local function allowed(r)
  for j = 1, #r, 2 do if r[j] == 'allowed' then return r[j + 1] == 1 end end
  return false
end
local peeks, all = {}, true
for i = 1, n do
  peeks[i] = redis.call(unpack(args(i, 'RL.PEEK')))
  if not allowed(peeks[i]) then all = false end
end
if peek_only or not all then return {all and 1 or 0, peeks} end
local out = {}
for i = 1, n do
  local a = args(i, 'RL.ACQUIRE')
  if id ~= '' then a[#a + 1] = 'ID'; a[#a + 1] = id; a[#a + 1] = 'TTL'; a[#a + 1] = ttl end
  out[i] = redis.call(unpack(a))
end
return {1, out}";
        let peek_only = !charges(g, id);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SCRIPT).arg(g.len());
        for p in g {
            cmd.arg(&p.key);
        }
        cmd.arg(g.len());
        for p in g {
            cmd.arg(&p.rule.plan);
            if p.rule.rate.is_some() {
                cmd.arg(&p.rule.unit_id).arg(p.cost);
            } else {
                cmd.arg("").arg(0);
            }
        }
        let (id_text, ttl) = id.unwrap_or(("", 0));
        cmd.arg(id_text)
            .arg(ttl)
            .arg(if peek_only { "1" } else { "0" });
        let v = self.redis.query(&cmd).await?;
        let bad = || CallError::Reply(format!("unexpected script reply {v:?}"));
        let Value::Array(parts) = &v else {
            return Err(bad());
        };
        let (Some(Value::Int(allowed)), Some(Value::Array(replies))) =
            (parts.first(), parts.get(1))
        else {
            return Err(bad());
        };
        let allowed = *allowed == 1;
        let mut states = Vec::new();
        for r in replies.iter().take(g.len()) {
            let d = Decision::parse(r).ok_or_else(bad)?;
            let state = d.keys.into_iter().next().unwrap_or_default();
            states.push((state, !allowed && !d.allowed));
        }
        Ok(Outcome {
            allowed,
            states,
            shadow_over: false,
        })
    }

    async fn decide_main(
        &self,
        pairs: Vec<Pair>,
        reserve: Option<(&str, u64)>,
    ) -> Result<(bool, Vec<(Pair, KeyState, bool)>), CallError> {
        if pairs.is_empty() {
            return Ok((true, Vec::new()));
        }
        let groups = self.groups(pairs);
        let outcomes = match groups.as_slice() {
            [g] => vec![self.call_unit(g, reserve).await?],
            _ => self.call_split(&groups, reserve).await?,
        };
        let allowed = outcomes.iter().all(|o| o.allowed);
        let mut out = Vec::new();
        for (g, o) in groups.into_iter().zip(outcomes) {
            for (p, (s, over)) in g.into_iter().zip(o.states) {
                out.push((p, s, over));
            }
        }
        Ok((allowed, out))
    }

    /// Charges usage reported after the fact, never denying: one `RL.ACQUIRE` under
    /// the rule's usage plan (its rate in shadow mode, the same counter), which charges
    /// even a subject already over its limit.
    async fn report_usage(&self, pair: &Pair) -> Result<(), CallError> {
        let Some(usage_plan) = pair.rule.usage_plan() else {
            return Ok(());
        };
        let mut cmd = redis::cmd("RL.ACQUIRE");
        cmd.arg(&pair.key)
            .arg(usage_plan)
            .arg("COST")
            .arg(&pair.rule.unit_id)
            .arg(pair.cost);
        let v = self.redis.query(&cmd).await?;
        match Decision::parse(&v) {
            Some(d) if d.allowed => Ok(()),
            _ => Err(CallError::Reply(format!(
                "a usage report was not charged: {v:?}"
            ))),
        }
    }

    fn estimate_key(first_key: &str, id: &str) -> String {
        format!("{first_key}:est:{id}")
    }

    /// Settles (or refunds part of) the reservation `id` made by the request path.
    async fn settle(&self, pairs: Vec<Pair>, items: &[Item], id: &str) -> Result<(), CallError> {
        // A pair named by an `is_negative_hits` descriptor refunds part of its estimate.
        let is_refund = |p: &Pair| {
            p.items
                .iter()
                .any(|&i| items.get(i).is_some_and(|it| it.negative))
        };
        for group in self.groups(pairs) {
            let Some(first) = group.first() else {
                continue;
            };
            let negative = group.iter().any(is_refund);
            let estimates: HashMap<String, u64> = if negative {
                let v = self
                    .redis
                    .query(redis::cmd("GET").arg(Self::estimate_key(&first.key, id)))
                    .await?;
                reply::text(&v)
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|kv| {
                        let (k, v) = kv.split_once('=')?;
                        Some((k.to_string(), v.parse().ok()?))
                    })
                    .collect()
            } else {
                HashMap::new()
            };
            let mut costs = Vec::new();
            for p in &group {
                if p.rule.rate.is_none() {
                    continue;
                }
                let actual = if is_refund(p) {
                    match estimates.get(&p.rule.unit_id) {
                        Some(e) => e.saturating_sub(p.cost),
                        None => {
                            self.metrics.refunds_unmatched.inc();
                            continue;
                        }
                    }
                } else {
                    p.cost
                };
                costs.push((p.rule.unit_id.clone(), actual));
            }
            let mut released = false;
            if group.len() > 1 && self.also_supported.load(Ordering::Relaxed) {
                // The request is registered on the first key of its call, which need
                // not be the first here: the response path also names descriptors the
                // request path did not reserve (shadow rules, quota rules over their
                // limit, usage reports). Keys sort alike on both paths, so the first
                // key that knows the id is the call's first key.
                for p in &group {
                    let cmds = self.release_cmds(std::slice::from_ref(p), id, &costs);
                    for cmd in &cmds {
                        released |= reply::released(&self.redis.query(cmd).await?);
                    }
                    if released {
                        break;
                    }
                }
            } else {
                for cmd in self.release_cmds(&group, id, &costs) {
                    released |= reply::released(&self.redis.query(&cmd).await?);
                }
            }
            if !released {
                tracing::debug!(id, key = %first.key, "settlement found no live reservation");
            }
        }
        Ok(())
    }

    fn failure(&self, e: &CallError, n: usize) -> Result<RateLimitResponse, Status> {
        tracing::warn!(error = %e, "Redis failed; answering by the failure mode");
        if matches!(e, CallError::UnknownPlan) {
            self.resync_plans();
        }
        self.metrics
            .errors
            .with_label_values(&["redis_error"])
            .inc();
        let code = match self.settings.failure_mode {
            FailureMode::Allow => Code::Ok,
            FailureMode::Deny => Code::OverLimit,
            FailureMode::Error => {
                self.metrics
                    .failure_mode
                    .with_label_values(&["error"])
                    .inc();
                return Err(Status::unavailable(format!(
                    "rate limit backend failed: {e}"
                )));
            }
        };
        let label = if code == Code::Ok { "allow" } else { "deny" };
        self.metrics.failure_mode.with_label_values(&[label]).inc();
        Ok(RateLimitResponse {
            overall_code: code as i32,
            statuses: (0..n)
                .map(|_| DescriptorStatus {
                    code: code as i32,
                    ..DescriptorStatus::default()
                })
                .collect(),
            ..RateLimitResponse::default()
        })
    }

    /// The answer to a request whose `limit` override cannot be made (past
    /// `--max-override-plans`): OVER_LIMIT on those descriptors, nothing charged.
    fn refused_override_response(&self, items: &[Item], refused: &[usize]) -> RateLimitResponse {
        let statuses = items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                if refused.contains(&i) {
                    DescriptorStatus {
                        code: Code::OverLimit as i32,
                        current_limit: it.rule.as_deref().and_then(current_limit),
                        ..DescriptorStatus::default()
                    }
                } else {
                    status_ok()
                }
            })
            .collect();
        let overall = if self.settings.shadow_mode {
            self.metrics.global_shadow_mode.inc();
            Code::Ok
        } else {
            Code::OverLimit
        };
        RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            ..RateLimitResponse::default()
        }
    }

    /// The decision for one request.
    pub async fn decide(&self, req: RateLimitRequest) -> Result<RateLimitResponse, Status> {
        if req.domain.is_empty() {
            self.metrics
                .errors
                .with_label_values(&["service_error"])
                .inc();
            return Err(Status::unknown("rate limit domain must not be empty"));
        }
        if req.descriptors.is_empty() {
            self.metrics
                .errors
                .with_label_values(&["service_error"])
                .inc();
            return Err(Status::unknown(
                "rate limit descriptor list must not be empty",
            ));
        }
        let config = self.config();
        let no_options = DomainOptions::default();
        let options = config
            .domain(&req.domain)
            .map_or(&no_options, |d| &d.options);
        let mut reserve_id: Option<String> = None;
        let mut settle_id: Option<String> = None;
        let mut items: Vec<Item> = Vec::with_capacity(req.descriptors.len());
        let mut refused_overrides: Vec<usize> = Vec::new();
        for d in &req.descriptors {
            let mut entries: Vec<(String, String)> = Vec::with_capacity(d.entries.len());
            let mut tag: Option<&str> = None;
            for e in &d.entries {
                if options.request_id_key.as_deref() == Some(e.key.as_str()) {
                    reserve_id.get_or_insert_with(|| e.value.clone());
                    continue;
                }
                if options.settle_id_key.as_deref() == Some(e.key.as_str()) {
                    settle_id.get_or_insert_with(|| e.value.clone());
                    continue;
                }
                if options.tenant_key.as_deref() == Some(e.key.as_str()) {
                    tag = Some(e.value.as_str());
                }
                entries.push((e.key.clone(), e.value.clone()));
            }
            let hits = match &d.hits_addend {
                Some(h) => *h,
                None => u64::from(req.hits_addend.max(1)),
            };
            let refs: Vec<(&str, &str)> = entries
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let found = config.lookup(&req.domain, &refs);
            let override_limit = d
                .limit
                .as_ref()
                .and_then(|l| TimeUnit::from_proto(l.unit).map(|u| (l.requests_per_unit, u)));
            let (rule, key_values, metric_key) = match (override_limit, found) {
                (Some((n, unit)), found) => {
                    let matched = found.as_ref().map(|m| &m.rule);
                    let rule = self.override_rule(&req.domain, matched, &entries, n, unit);
                    if !self.admit_override_plan(&rule) {
                        refused_overrides.push(items.len());
                    }
                    let kv = match found {
                        Some(m) => m.key_values,
                        None => entries.iter().map(|(_, v)| v.clone()).collect(),
                    };
                    let mk = entries
                        .iter()
                        .map(|(k, v)| format!("{k}_{v}"))
                        .collect::<Vec<_>>()
                        .join(".");
                    (Some(rule), kv, mk)
                }
                (None, Some(m)) => (Some(m.rule), m.key_values, m.metric_key),
                (None, None) => (None, Vec::new(), String::new()),
            };
            let key = match &rule {
                Some(_) => {
                    let named: Vec<(String, String)> = entries
                        .iter()
                        .zip(&key_values)
                        .map(|((k, _), v)| (k.clone(), v.clone()))
                        .collect();
                    subject_key(&req.domain, tag, &named)
                }
                None => String::new(),
            };
            let unlimited = rule.as_ref().is_some_and(|r| !r.limits());
            items.push(Item {
                rule,
                key,
                metric_key,
                hits,
                negative: d.is_negative_hits,
                unlimited,
            });
        }
        if !refused_overrides.is_empty() {
            return Ok(self.refused_override_response(&items, &refused_overrides));
        }
        // `replaces`: a matched rule named by another matched rule's `replaces` drops out.
        let replaced: HashSet<String> = items
            .iter()
            .filter_map(|i| i.rule.as_ref())
            .flat_map(|r| r.replaces.iter().cloned())
            .collect();
        if !replaced.is_empty() {
            for it in &mut items {
                if it
                    .rule
                    .as_ref()
                    .is_some_and(|r| !r.name.is_empty() && replaced.contains(r.name.as_str()))
                {
                    it.rule = None;
                }
            }
        }
        // Override plans are made on first use.
        for it in &items {
            if let Some(rule) = &it.rule {
                if rule.plan.starts_with("rls-o:") {
                    if let Err(e) = self.ensure_override_plan(rule).await {
                        return self.failure(&e, items.len());
                    }
                }
            }
        }

        let mut statuses: Vec<DescriptorStatus> = items
            .iter()
            .map(|it| {
                if it.unlimited {
                    DescriptorStatus {
                        code: Code::Ok as i32,
                        limit_remaining: u32::MAX,
                        ..DescriptorStatus::default()
                    }
                } else {
                    status_ok()
                }
            })
            .collect();

        // Sort the limiting descriptors into what each needs.
        let mut main: Vec<Pair> = Vec::new();
        let mut shadow: Vec<Pair> = Vec::new();
        let mut quota: Vec<Pair> = Vec::new();
        let mut reports: Vec<Pair> = Vec::new();
        let mut settle: Vec<Pair> = Vec::new();
        let push = |list: &mut Vec<Pair>, i: usize, it: &Item, rule: &Arc<Rule>| {
            if let Some(p) = list.iter_mut().find(|p| p.key == it.key) {
                p.cost = p.cost.saturating_add(it.hits);
                p.items.push(i);
            } else {
                list.push(Pair {
                    key: it.key.clone(),
                    rule: rule.clone(),
                    cost: it.hits,
                    items: vec![i],
                });
            }
        };
        for (i, it) in items.iter().enumerate() {
            let Some(rule) = &it.rule else { continue };
            if it.unlimited {
                continue;
            }
            if settle_id.is_some() {
                push(&mut settle, i, it, rule);
            } else if it.negative {
                // A refund needs the reservation it refunds (a settle id).
                self.metrics.refunds_unmatched.inc();
            } else if rule.report_usage && it.hits > 0 {
                push(&mut reports, i, it, rule);
            } else if rule.shadow_mode {
                push(&mut shadow, i, it, rule);
            } else if rule.quota_mode {
                push(&mut quota, i, it, rule);
            } else {
                push(&mut main, i, it, rule);
            }
        }

        if let Some(id) = &settle_id {
            if let Err(e) = self.settle(settle, &items, id).await {
                return self.failure(&e, items.len());
            }
            return Ok(RateLimitResponse {
                overall_code: Code::Ok as i32,
                statuses,
                ..RateLimitResponse::default()
            });
        }

        // Quota rules deny only when every one of them is over. That is settled before
        // anything is charged, and the quota rules that admit are charged in the same
        // atomic step as the enforced ones: a denied request charges nothing anywhere.
        let mut quota_decided: Vec<(Pair, KeyState, bool)> = Vec::new();
        let mut denied_by_quota = false;
        if quota.len() == 1 {
            // One quota rule: "all of them over" is "it is over", an ordinary pair.
            main.append(&mut quota);
        } else if !quota.is_empty() {
            let peeked = match self.peek_each(quota).await {
                Ok(p) => p,
                Err(e) => return self.failure(&e, items.len()),
            };
            let (admitting, over): (Vec<_>, Vec<_>) =
                peeked.into_iter().partition(|(_, _, over)| !over);
            denied_by_quota = admitting.is_empty();
            // A quota rule that goes over between this peek and the charge denies the
            // request (under-admission in a race, never over-admission).
            main.extend(admitting.into_iter().map(|(p, _, _)| p));
            quota_decided = over;
        }

        let reservation_ttl = options
            .reservation_ttl
            .as_deref()
            .and_then(parse_duration_ms)
            .unwrap_or(self.settings.reservation_ttl_ms);
        // Leases (concurrency rules) are taken on the request path under the request
        // id and freed when the response path settles it, or when the request's TTL
        // passes. The module keeps one TTL per request: a request taking leases lives
        // at most the shortest `concurrency_ttl` of its rules.
        let takes_leases = main.iter().any(|p| p.rule.concurrency.is_some());
        let request_ttl = main
            .iter()
            .filter_map(|p| p.rule.concurrency.as_ref()?.ttl.as_deref())
            .filter_map(parse_duration_ms)
            .min()
            .map_or(reservation_ttl, |lease_ttl| lease_ttl.min(reservation_ttl));
        let generated_id;
        let request_id = match reserve_id.as_deref() {
            Some(id) => Some(id),
            None if takes_leases && !denied_by_quota => {
                // Envoy sent no request id: nothing can release this lease but its TTL.
                self.metrics.leases_without_request_id.inc();
                tracing::debug!(domain = %req.domain, "a lease taken without a request id is held until its TTL");
                generated_id = random_id();
                Some(generated_id.as_str())
            }
            None => None,
        };
        let reserve = request_id
            .filter(|_| !denied_by_quota)
            .map(|id| (id, request_ttl));
        // Estimates are kept only for ids the response path can name.
        let estimate_for = reserve.filter(|_| reserve_id.is_some());

        // Usage reports never deny; they run beside the decision.
        let report_futs = join_all(reports.iter().map(|p| self.report_usage(p)));
        let estimate_groups = if estimate_for.is_some() {
            self.groups(main.clone())
        } else {
            Vec::new()
        };
        let estimate_write = async {
            let Some((id, ttl)) = estimate_for else {
                return Ok(());
            };
            let groups = estimate_groups;
            for g in groups {
                let Some(first) = g.first() else { continue };
                let text: Vec<String> = g
                    .iter()
                    .filter(|p| p.rule.rate.is_some())
                    .map(|p| format!("{}={}", p.rule.unit_id, p.cost))
                    .collect();
                let mut cmd = redis::cmd("SET");
                cmd.arg(Self::estimate_key(&first.key, id))
                    .arg(text.join(" "))
                    .arg("PX")
                    .arg(ttl);
                self.redis.query(&cmd).await?;
            }
            Ok::<(), redis::RedisError>(())
        };
        let main_decision = async {
            if denied_by_quota {
                // Denied already: the enforced rules are only looked at, for statuses.
                self.peek_each(main).await.map(|decided| (false, decided))
            } else {
                self.decide_main(main, reserve).await
            }
        };
        let (main_result, report_results, estimate_result) =
            tokio::join!(main_decision, report_futs, estimate_write);
        let (allowed, decided) = match main_result {
            Ok(r) => r,
            Err(e) => return self.failure(&e, items.len()),
        };
        if let Err(e) = estimate_result {
            tracing::warn!(error = %e, "writing a reservation's estimate failed (refunds of it will be ignored)");
        }
        for (p, r) in reports.iter().zip(report_results) {
            match r {
                Ok(_) => {}
                Err(e) => return self.failure(&e, items.len()),
            }
            for &i in &p.items {
                if let (Some(st), Some(it)) = (statuses.get_mut(i), items.get(i)) {
                    st.current_limit = it.rule.as_deref().and_then(current_limit);
                }
            }
        }

        // Shadow rules never deny: charged only once the request is admitted.
        let shadow_results = join_all(shadow.iter().map(|p| async move {
            if allowed && p.cost > 0 {
                self.call_group(std::slice::from_ref(p), None).await
            } else {
                self.peek_one(p).await
            }
        }))
        .await;
        let mut side_decided = Vec::new();
        for (p, r) in shadow.into_iter().zip(shadow_results) {
            let o = match r {
                Ok(o) => o,
                Err(e) => return self.failure(&e, items.len()),
            };
            let shadow_over = o.shadow_over;
            let Some((state, over)) = o.states.into_iter().next() else {
                continue;
            };
            side_decided.push((p, state, over, shadow_over));
        }

        // Statuses and metrics.
        let mut denied_by: Option<(Arc<Rule>, String)> = None;
        let mut closest: Option<(u32, usize)> = None;
        let mut passed_metadata = Struct::default();
        let decided_all = decided
            .into_iter()
            .chain(quota_decided)
            .map(|(p, s, over)| (p, s, over, false))
            .chain(side_decided);
        for (p, state, over, shadow_over) in decided_all {
            let rule = &p.rule;
            let limit_state = main_limit(rule, &state).cloned();
            let remaining = limit_state
                .as_ref()
                .map(|l| clamp_u32(l.remaining))
                .unwrap_or(0);
            let shadowed = rule.shadow_mode && (over || shadow_over);
            let code = if over && !rule.shadow_mode {
                Code::OverLimit
            } else {
                Code::Ok
            };
            for &i in &p.items {
                let Some(it) = items.get(i) else { continue };
                if let Some(st) = statuses.get_mut(i) {
                    *st = DescriptorStatus {
                        code: code as i32,
                        current_limit: current_limit(rule),
                        limit_remaining: remaining,
                        duration_until_reset: Some(duration_until_reset(
                            rule,
                            limit_state.as_ref(),
                        )),
                        quota: None,
                    };
                }
                let rolled = rule.path.as_str();
                let detailed = rule.detailed_metric || rule.value_to_metric;
                let key = self
                    .metrics
                    .key(&rule.domain, &it.metric_key, rolled, detailed)
                    .to_string();
                let labels = [rule.domain.as_str(), key.as_str()];
                self.metrics
                    .total_hits
                    .with_label_values(&labels)
                    .inc_by(it.hits);
                if code == Code::OverLimit || shadowed {
                    self.metrics
                        .over_limit
                        .with_label_values(&labels)
                        .inc_by(it.hits);
                } else if allowed || rule.shadow_mode || rule.quota_mode {
                    let cap = limit_state.as_ref().map(|l| l.limit).unwrap_or(0);
                    let used = cap.saturating_sub(i64::from(remaining));
                    if cap > 0 && (used as f64) > self.settings.near_limit_ratio * cap as f64 {
                        self.metrics
                            .near_limit
                            .with_label_values(&labels)
                            .inc_by(it.hits);
                    }
                    self.metrics
                        .within_limit
                        .with_label_values(&labels)
                        .inc_by(it.hits);
                }
                if shadowed {
                    self.metrics
                        .shadow_mode
                        .with_label_values(&labels)
                        .inc_by(it.hits);
                }
            }
            if code == Code::OverLimit && denied_by.is_none() {
                denied_by = Some((rule.clone(), p.key.clone()));
            }
            if code == Code::Ok {
                if let Some(serde_norway::Value::Mapping(_)) = &rule.metadata {
                    if let Some(Kind::StructValue(s)) = rule
                        .metadata
                        .as_ref()
                        .map(yaml_to_value)
                        .and_then(|v| v.kind)
                    {
                        merge_struct(&mut passed_metadata, &s);
                    }
                }
            }
            if let Some(&first) = p.items.first() {
                let r = if code == Code::OverLimit {
                    0
                } else {
                    remaining
                };
                if closest.is_none_or(|(min, _)| r < min) {
                    closest = Some((r, first));
                }
            }
        }

        let mut overall = if allowed { Code::Ok } else { Code::OverLimit };
        let mut headers = Vec::new();
        if self.settings.legacy_headers || self.settings.ietf_headers {
            headers = self.headers(&statuses, &items, closest.map(|(_, i)| i));
        }
        let dynamic_metadata = self
            .settings
            .dynamic_metadata
            .then(|| self.dynamic_metadata(&req, denied_by.as_ref(), passed_metadata));
        if overall == Code::OverLimit && self.settings.shadow_mode {
            self.metrics.global_shadow_mode.inc();
            overall = Code::Ok;
        }
        Ok(RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            response_headers_to_add: headers,
            dynamic_metadata,
            ..RateLimitResponse::default()
        })
    }

    fn headers(
        &self,
        statuses: &[DescriptorStatus],
        items: &[Item],
        closest: Option<usize>,
    ) -> Vec<HeaderValue> {
        let mut out = Vec::new();
        let header = |key: &str, value: String| HeaderValue {
            key: key.to_string(),
            value,
            ..HeaderValue::default()
        };
        let secs = |st: &DescriptorStatus| {
            st.duration_until_reset
                .as_ref()
                .map(|d| d.seconds + i64::from(d.nanos > 0))
                .unwrap_or(0)
        };
        if let Some(st) = closest.and_then(|i| statuses.get(i)) {
            if let Some(limit) = &st.current_limit {
                if self.settings.legacy_headers {
                    out.push(header(
                        "x-ratelimit-limit",
                        limit.requests_per_unit.to_string(),
                    ));
                    out.push(header(
                        "x-ratelimit-remaining",
                        st.limit_remaining.to_string(),
                    ));
                    out.push(header("x-ratelimit-reset", secs(st).to_string()));
                }
            }
        }
        if self.settings.ietf_headers {
            let mut policies = Vec::new();
            for (st, it) in statuses.iter().zip(items) {
                let (Some(limit), Some(rule)) = (&st.current_limit, &it.rule) else {
                    continue;
                };
                let w = rule.rate.as_ref().map(|r| r.unit.nominal_secs());
                let mut p = format!("\"{}\";q={}", sf_name(rule), limit.requests_per_unit);
                if let Some(w) = w {
                    p.push_str(&format!(";w={w}"));
                }
                if !policies.contains(&p) {
                    policies.push(p);
                }
            }
            if !policies.is_empty() {
                out.push(header("RateLimit-Policy", policies.join(", ")));
            }
            if let Some(i) = closest {
                if let (Some(st), Some(Some(rule))) =
                    (statuses.get(i), items.get(i).map(|it| it.rule.as_ref()))
                {
                    out.push(header(
                        "RateLimit",
                        format!(
                            "\"{}\";r={};t={}",
                            sf_name(rule),
                            st.limit_remaining,
                            secs(st)
                        ),
                    ));
                }
            }
        }
        out
    }

    fn dynamic_metadata(
        &self,
        req: &RateLimitRequest,
        denied: Option<&(Arc<Rule>, String)>,
        passed: Struct,
    ) -> Struct {
        let mut fields = std::collections::BTreeMap::new();
        fields.insert("domain".to_string(), sval(&req.domain));
        let descriptors = req
            .descriptors
            .iter()
            .map(|d| {
                let mut f = std::collections::BTreeMap::new();
                f.insert(
                    "entries".to_string(),
                    PValue {
                        kind: Some(Kind::ListValue(ListValue {
                            values: d
                                .entries
                                .iter()
                                .map(|e| sval(&format!("{}={}", e.key, e.value)))
                                .collect(),
                        })),
                    },
                );
                if let Some(h) = &d.hits_addend {
                    f.insert(
                        "hitsAddend".to_string(),
                        PValue {
                            kind: Some(Kind::NumberValue(*h as f64)),
                        },
                    );
                }
                PValue {
                    kind: Some(Kind::StructValue(Struct { fields: f })),
                }
            })
            .collect();
        fields.insert(
            "descriptors".to_string(),
            PValue {
                kind: Some(Kind::ListValue(ListValue {
                    values: descriptors,
                })),
            },
        );
        if req.hits_addend != 0 {
            fields.insert(
                "hitsAddend".to_string(),
                PValue {
                    kind: Some(Kind::NumberValue(f64::from(req.hits_addend))),
                },
            );
        }
        if let Some((rule, key)) = denied {
            let mut f = std::collections::BTreeMap::new();
            f.insert("key".to_string(), sval(&rule.path));
            f.insert("name".to_string(), sval(&rule.name));
            f.insert("plan".to_string(), sval(&rule.plan));
            f.insert("subject".to_string(), sval(key));
            fields.insert(
                "deniedBy".to_string(),
                PValue {
                    kind: Some(Kind::StructValue(Struct { fields: f })),
                },
            );
        }
        if !passed.fields.is_empty() {
            fields.insert(
                "metadata".to_string(),
                PValue {
                    kind: Some(Kind::StructValue(passed)),
                },
            );
        }
        Struct { fields }
    }
}

/// A Tollgate duration (`500ms`, `60s`, `5m`, `1h`, `1d`, `1w`) in milliseconds.
pub fn parse_duration_ms(text: &str) -> Option<u64> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let n: u64 = digits.parse().ok()?;
    let per = match text.get(digits.len()..)? {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 604_800_000,
        _ => return None,
    };
    n.checked_mul(per)
}

/// The gRPC face of [`Service`].
#[derive(Clone)]
pub struct Grpc(pub Arc<Service>);

#[tonic::async_trait]
impl RateLimitService for Grpc {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let start = Instant::now();
        let req = request.into_inner();
        tracing::debug!(domain = %req.domain, descriptors = req.descriptors.len(), "ShouldRateLimit");
        let result = self.0.decide(req).await;
        self.0
            .metrics
            .response_time
            .observe(start.elapsed().as_secs_f64());
        result.map(Response::new)
    }
}
