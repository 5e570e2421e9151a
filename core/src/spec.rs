//! The limit spec grammar of SPEC.md, parsed into validated rules.
//!
//! ```text
//! fixed <n> [<unit>]/<window> [warn <pct>%]
//! sliding <n> [<unit>]/<window> [precision <k>] [warn <pct>%]
//! bucket <rate> [<unit>]/<window> [burst <n>] [warn <pct>%]
//! concurrency <n> [ttl <duration>]
//! cap <n> [<unit>]
//! ```
//! Any of them may end with `for <endpoint>[,<endpoint>...]`. Keywords are
//! case-insensitive; names (units, endpoints) are taken as written.

use crate::time::{parse_span, FixedWindow, Span, MS_PER_SECOND};

/// The unit a limit counts when none is named.
pub const DEFAULT_UNIT: &str = "request";
/// The unit of concurrency limits: they count leases.
pub const LEASE_UNIT: &str = "lease";
/// Slices per sliding window when `precision` is not given.
pub const DEFAULT_PRECISION: u32 = 10;
/// Most slices a sliding window may have (its memory is one word per slice).
pub const MAX_PRECISION: u32 = 600;
/// Longest names of limits, units and endpoints, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Most endpoints one limit may be scoped to.
pub const MAX_ENDPOINTS_PER_LIMIT: usize = 64;

/// The rule a limit enforces. Every amount is a count of the limit's unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// At most `capacity` per aligned window.
    Fixed { capacity: u64, window: FixedWindow },
    /// At most `capacity` in any trailing `window_ms`, kept as `precision` slices.
    Sliding {
        capacity: u64,
        window_ms: u64,
        precision: u32,
    },
    /// GCRA token bucket: refills `rate` per `window_ms`, holds at most `burst`.
    Bucket {
        rate: u64,
        window_ms: u64,
        burst: u64,
    },
    /// At most `max` leases in flight; a lease lives `ttl_ms` unless the call says
    /// otherwise (`None`: the module's default lease TTL).
    Concurrency { max: u64, ttl_ms: Option<u64> },
    /// No single call may ask for more than `max`.
    Cap { max: u64 },
}

impl Rule {
    pub fn kind_name(&self) -> &'static str {
        match self {
            Rule::Fixed { .. } => "fixed",
            Rule::Sliding { .. } => "sliding",
            Rule::Bucket { .. } => "bucket",
            Rule::Concurrency { .. } => "concurrency",
            Rule::Cap { .. } => "cap",
        }
    }

    /// The figure reported as `limit`: capacity, burst, concurrent leases or cap.
    pub fn capacity(&self) -> u64 {
        match *self {
            Rule::Fixed { capacity, .. } | Rule::Sliding { capacity, .. } => capacity,
            Rule::Bucket { burst, .. } => burst,
            Rule::Concurrency { max, .. } | Rule::Cap { max } => max,
        }
    }
}

/// One parsed limit spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSpec {
    pub rule: Rule,
    /// What the limit counts (`request` unless named; `lease` for concurrency).
    pub unit: Box<str>,
    /// Usage percentage at which the limit reports `warn`.
    pub warn_pct: Option<u8>,
    /// Endpoints the limit applies to; `None` applies it to every call.
    pub endpoints: Option<Box<[Box<str>]>>,
}

/// Whether `name` may name a limit, unit, plan or endpoint: 1 to 64 bytes of
/// letters, digits and `_ - . : / @ #`, so names never need quoting.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:/@#".contains(&b))
}

fn parse_amount(what: &str, text: &str) -> Result<u64, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{what} '{text}' is not a non-negative integer"));
    }
    text.parse()
        .map_err(|_| format!("{what} '{text}' is larger than 18446744073709551615"))
}

/// Parses `<n>/<window>` or `<n>` followed by `<unit>/<window>`, consuming one or two tokens.
fn parse_rate<'a>(
    tokens: &mut std::iter::Peekable<impl Iterator<Item = &'a str>>,
) -> Result<(u64, Box<str>, Span), String> {
    let first = tokens.next().ok_or("expected '<n> [<unit>]/<window>'")?;
    let (amount, rest) = match first.split_once('/') {
        Some((n, window)) => (n, (None, window)),
        None => {
            let per = tokens
                .next()
                .ok_or_else(|| format!("expected '<unit>/<window>' after '{first}'"))?;
            let (unit, window) = per
                .split_once('/')
                .ok_or_else(|| format!("expected '<unit>/<window>', got '{per}'"))?;
            (first, (Some(unit), window))
        }
    };
    let n = parse_amount("amount", amount)?;
    let unit = match rest.0 {
        None => DEFAULT_UNIT,
        Some(unit) if is_valid_name(unit) => unit,
        Some(unit) => return Err(format!("unit '{unit}' is not a valid name")),
    };
    let span = parse_span(rest.1)?;
    Ok((n, unit.into(), span))
}

fn parse_warn(text: &str) -> Result<u8, String> {
    let pct = text
        .strip_suffix('%')
        .ok_or_else(|| format!("warn '{text}' must be a percentage like 80%"))?;
    let pct = parse_amount("warn", pct)?;
    u8::try_from(pct)
        .ok()
        .filter(|p| (1..=100).contains(p))
        .ok_or_else(|| format!("warn '{text}' must be between 1% and 100%"))
}

fn parse_endpoints(text: &str) -> Result<Box<[Box<str>]>, String> {
    let mut endpoints: Vec<Box<str>> = Vec::new();
    for endpoint in text.split(',') {
        if !is_valid_name(endpoint) {
            return Err(format!("endpoint '{endpoint}' is not a valid name"));
        }
        if !endpoints.iter().any(|e| &**e == endpoint) {
            endpoints.push(endpoint.into());
        }
    }
    if endpoints.len() > MAX_ENDPOINTS_PER_LIMIT {
        return Err(format!("more than {MAX_ENDPOINTS_PER_LIMIT} endpoints"));
    }
    Ok(endpoints.into_boxed_slice())
}

fn window_ms(kind: &str, span: Span) -> Result<u64, String> {
    match span {
        Span::Millis(ms) => Ok(ms),
        Span::Months(_) => Err(format!(
            "'mo' windows are calendar months and only fixed windows have them, not {kind}"
        )),
    }
}

/// Parses one limit spec, e.g. `sliding 10/1m`, `bucket 2000 token/1m burst 4000`.
pub fn parse_limit_spec(text: &str) -> Result<LimitSpec, String> {
    let mut tokens = text.split_ascii_whitespace().peekable();
    let kind = tokens
        .next()
        .ok_or("empty spec (expected fixed, sliding, bucket, concurrency or cap)")?
        .to_ascii_lowercase();
    let mut warn_pct = None;
    let mut endpoints = None;
    let mut unit: Box<str> = DEFAULT_UNIT.into();
    let rule = match kind.as_str() {
        "fixed" | "sliding" | "bucket" => {
            let (n, rate_unit, span) = parse_rate(&mut tokens)?;
            unit = rate_unit;
            let mut precision = None;
            let mut burst = None;
            while let Some(keyword) = tokens.peek().map(|t| t.to_ascii_lowercase()) {
                match (keyword.as_str(), kind.as_str()) {
                    ("precision", "sliding") if precision.is_none() => {
                        tokens.next();
                        let k = tokens.next().ok_or("precision needs a number")?;
                        precision = Some(parse_amount("precision", k)?);
                    }
                    ("burst", "bucket") if burst.is_none() => {
                        tokens.next();
                        let b = tokens.next().ok_or("burst needs a number")?;
                        burst = Some(parse_amount("burst", b)?);
                    }
                    ("warn", _) if warn_pct.is_none() => {
                        tokens.next();
                        warn_pct =
                            Some(parse_warn(tokens.next().ok_or("warn needs a percentage")?)?);
                    }
                    _ => break,
                }
            }
            match kind.as_str() {
                "fixed" => Rule::Fixed {
                    capacity: n,
                    window: FixedWindow::new(span),
                },
                "sliding" => {
                    let window_ms = window_ms("sliding", span)?;
                    let precision = precision.unwrap_or(u64::from(DEFAULT_PRECISION));
                    if precision == 0 || precision > u64::from(MAX_PRECISION) {
                        return Err(format!("precision must be between 1 and {MAX_PRECISION}"));
                    }
                    if precision > window_ms {
                        return Err(format!(
                            "precision {precision} would make slices shorter than 1ms"
                        ));
                    }
                    Rule::Sliding {
                        capacity: n,
                        window_ms,
                        precision: precision as u32,
                    }
                }
                _ => {
                    let window_ms = window_ms("bucket", span)?;
                    if n == 0 {
                        return Err("bucket rate must be at least 1".into());
                    }
                    let burst = burst.unwrap_or(n);
                    if burst == 0 {
                        return Err("burst must be at least 1".into());
                    }
                    Rule::Bucket {
                        rate: n,
                        window_ms,
                        burst,
                    }
                }
            }
        }
        "concurrency" => {
            let max = parse_amount(
                "concurrency",
                tokens.next().ok_or("concurrency needs a number")?,
            )?;
            let mut ttl_ms = None;
            if tokens.peek().is_some_and(|t| t.eq_ignore_ascii_case("ttl")) {
                tokens.next();
                let span = parse_span(tokens.next().ok_or("ttl needs a duration")?)?;
                ttl_ms = Some(window_ms("concurrency ttl", span)?);
            }
            unit = LEASE_UNIT.into();
            Rule::Concurrency { max, ttl_ms }
        }
        "cap" => {
            let max = parse_amount("cap", tokens.next().ok_or("cap needs a number")?)?;
            if let Some(u) = tokens.next_if(|t| !t.eq_ignore_ascii_case("for")) {
                if !is_valid_name(u) {
                    return Err(format!("unit '{u}' is not a valid name"));
                }
                unit = u.into();
            }
            Rule::Cap { max }
        }
        other => {
            return Err(format!(
                "unknown limit kind '{other}' (expected fixed, sliding, bucket, concurrency or cap)"
            ))
        }
    };
    if tokens.peek().is_some_and(|t| t.eq_ignore_ascii_case("for")) {
        tokens.next();
        endpoints = Some(parse_endpoints(
            tokens.next().ok_or("for needs an endpoint list")?,
        )?);
    }
    if let Some(extra) = tokens.next() {
        return Err(format!("unexpected '{extra}'"));
    }
    Ok(LimitSpec {
        rule,
        unit,
        warn_pct,
        endpoints,
    })
}

/// A default lease TTL for concurrency limits that name none (module config).
pub const DEFAULT_LEASE_TTL_MS: u64 = 60 * MS_PER_SECOND;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{MS_PER_DAY, MS_PER_MINUTE};

    fn rule(text: &str) -> Rule {
        match parse_limit_spec(text) {
            Ok(spec) => spec.rule,
            Err(e) => unreachable!("{text}: {e}"),
        }
    }

    #[test]
    fn parses_the_spec_examples() {
        assert_eq!(
            rule("sliding 10/1m"),
            Rule::Sliding {
                capacity: 10,
                window_ms: MS_PER_MINUTE,
                precision: DEFAULT_PRECISION
            }
        );
        assert_eq!(
            rule("fixed 200/1d"),
            Rule::Fixed {
                capacity: 200,
                window: FixedWindow::new(Span::Millis(MS_PER_DAY))
            }
        );
        let tpm = parse_limit_spec("bucket 2000 token/1m burst 4000").ok();
        assert_eq!(tpm.as_ref().map(|s| &*s.unit), Some("token"));
        assert_eq!(
            tpm.map(|s| s.rule),
            Some(Rule::Bucket {
                rate: 2000,
                window_ms: MS_PER_MINUTE,
                burst: 4000
            })
        );
        assert_eq!(
            rule("concurrency 4 ttl 60s"),
            Rule::Concurrency {
                max: 4,
                ttl_ms: Some(60_000)
            }
        );
        let cap = parse_limit_spec("cap 2000 token").ok();
        assert_eq!(
            cap.map(|s| (s.rule, s.unit)),
            Some((Rule::Cap { max: 2000 }, "token".into()))
        );
        let spend = parse_limit_spec("fixed 1000000 usd_micros/1mo warn 80%").ok();
        assert_eq!(spend.as_ref().map(|s| s.warn_pct), Some(Some(80)));
        assert_eq!(
            spend.map(|s| s.rule),
            Some(Rule::Fixed {
                capacity: 1_000_000,
                window: FixedWindow::Months(1)
            })
        );
    }

    #[test]
    fn keywords_are_case_insensitive() {
        assert_eq!(
            rule("SLIDING 5/1M PRECISION 4"),
            rule("sliding 5/1m precision 4")
        );
        assert_eq!(
            rule("Bucket 1/1s Burst 3"),
            Rule::Bucket {
                rate: 1,
                window_ms: 1000,
                burst: 3
            }
        );
    }

    #[test]
    fn bucket_burst_defaults_to_the_rate() {
        assert_eq!(
            rule("bucket 7/1s"),
            Rule::Bucket {
                rate: 7,
                window_ms: 1000,
                burst: 7
            }
        );
    }

    #[test]
    fn endpoint_scoping_is_parsed_and_deduplicated() {
        let spec = parse_limit_spec("fixed 5/1m for chat,images,chat").ok();
        let endpoints = spec.and_then(|s| s.endpoints).map(|e| e.into_vec());
        assert_eq!(endpoints, Some(vec!["chat".into(), "images".into()]));
        let cap = parse_limit_spec("cap 10 for chat").ok();
        assert_eq!(
            cap.map(|s| (s.unit, s.endpoints.is_some())),
            Some(("request".into(), true))
        );
    }

    #[test]
    fn refuses_malformed_specs_with_a_reason() {
        for (bad, reason) in [
            ("", "empty spec"),
            ("leaky 1/1s", "unknown limit kind"),
            ("fixed", "expected"),
            ("fixed 10", "expected '<unit>/<window>'"),
            ("fixed ten/1m", "not a non-negative integer"),
            ("fixed -1/1m", "not a non-negative integer"),
            ("fixed 18446744073709551616/1m", "larger than"),
            ("fixed 10/1x", "unknown unit"),
            ("fixed 10/0s", "greater than zero"),
            ("sliding 10/1mo", "calendar months"),
            ("bucket 10/1mo", "calendar months"),
            ("bucket 0/1s", "at least 1"),
            ("bucket 1/1s burst 0", "at least 1"),
            ("sliding 10/1m precision 0", "between 1 and"),
            ("sliding 10/1m precision 601", "between 1 and"),
            ("sliding 10/5ms precision 6", "shorter than 1ms"),
            ("fixed 10/1m warn 80", "percentage"),
            ("fixed 10/1m warn 0%", "between 1% and 100%"),
            ("fixed 10/1m warn 101%", "between 1% and 100%"),
            ("fixed 10/1m burst 5", "unexpected 'burst'"),
            ("fixed 10/1m warn 50% warn 60%", "unexpected 'warn'"),
            ("concurrency 4 ttl 1mo", "calendar months"),
            ("concurrency 4 warn 5%", "unexpected 'warn'"),
            ("cap 5 tok en", "unexpected 'en'"),
            ("fixed 10 to ken/1m", "expected '<unit>/<window>'"),
            ("fixed 10/1m for", "endpoint list"),
            ("fixed 10/1m for a,,b", "not a valid name"),
            ("fixed 10 tok\u{e9}n/1m", "not a valid name"),
        ] {
            match parse_limit_spec(bad) {
                Ok(spec) => unreachable!("'{bad}' parsed as {spec:?}"),
                Err(e) => assert!(
                    e.contains(reason),
                    "'{bad}': '{e}' should mention '{reason}'"
                ),
            }
        }
    }

    #[test]
    fn names_are_a_safe_charset() {
        assert!(is_valid_name("free:gpt-4o"));
        assert!(is_valid_name("api/v1/chat"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("a b"));
        assert!(!is_valid_name("a,b"));
        assert!(!is_valid_name(&"x".repeat(65)));
    }
}
