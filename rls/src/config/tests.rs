//! The lookups and errors envoyproxy/ratelimit's own config tests check
//! (`test/config/config_test.go`), on its own fixture files, plus Tollgate's
//! extensions.

use super::*;

fn fixture(name: &str) -> (String, String) {
    let path = format!(
        "{}/tests/fixtures/ratelimit/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (name.to_string(), text)
}

fn load(names: &[&str]) -> Config {
    let sources: Vec<_> = names.iter().map(|n| fixture(n)).collect();
    from_sources(&sources, false).unwrap_or_else(|e| panic!("{e}"))
}

fn load_err(name: &str) -> String {
    match from_sources(&[fixture(name)], false) {
        Ok(_) => panic!("{name}: expected an error"),
        Err(e) => e.to_string(),
    }
}

fn yaml(text: &str) -> Result<Config, ConfigError> {
    from_sources(&[("t.yaml".to_string(), text.to_string())], false)
}

/// (requests_per_unit, unit, metric key) of what the entries match.
fn limit(c: &Config, domain: &str, entries: &[(&str, &str)]) -> Option<(u32, TimeUnit, String)> {
    c.lookup(domain, entries).map(|m| {
        let rate = m.rule.rate.clone().expect("a rate");
        (
            rate.requests_per_unit,
            rate.unit,
            format!("{domain}.{}", m.metric_key),
        )
    })
}

#[test]
fn basic_config_lookups_match_envoy_ratelimit() {
    let c = load(&["basic_config.yaml"]);
    let d = "test-domain";
    assert!(c.lookup("foo_domain", &[("key1", "x")]).is_none());
    assert!(c.lookup(d, &[]).is_none());
    assert!(c.lookup(d, &[("key1", "something")]).is_none());
    assert!(c.lookup(d, &[("key1", "value1")]).is_none());
    assert!(c
        .lookup(d, &[("key2", "value2"), ("subkey", "subvalue")])
        .is_none());
    assert!(c
        .lookup(d, &[("key5", "value5"), ("subkey5", "subvalue")])
        .is_none());
    assert_eq!(
        limit(&c, d, &[("key1", "value1"), ("subkey1", "something")]),
        Some((
            5,
            TimeUnit::Second,
            "test-domain.key1_value1.subkey1".into()
        ))
    );
    assert_eq!(
        limit(&c, d, &[("key1", "value1"), ("subkey1", "subvalue1")]),
        Some((
            10,
            TimeUnit::Second,
            "test-domain.key1_value1.subkey1_subvalue1".into()
        ))
    );
    assert_eq!(
        limit(&c, d, &[("key2", "something")]),
        Some((20, TimeUnit::Minute, "test-domain.key2".into()))
    );
    assert_eq!(
        limit(&c, d, &[("key2", "value2")]),
        Some((30, TimeUnit::Minute, "test-domain.key2_value2".into()))
    );
    // A value listed without a limit whitelists it.
    assert!(c.lookup(d, &[("key2", "value3")]).is_none());
    assert_eq!(
        limit(&c, d, &[("key3", "foo")]),
        Some((1, TimeUnit::Hour, "test-domain.key3".into()))
    );
    let key4 = c.lookup(d, &[("key4", "foo")]).expect("key4");
    assert_eq!(key4.rule.name, "key4_rate_limit");
    assert_eq!(
        limit(&c, d, &[("key5", "value5")]),
        Some((15, TimeUnit::Day, "test-domain.key5_value5".into()))
    );
    assert_eq!(
        limit(&c, d, &[("key5", "value5"), ("subkey5", "subvalue5")]),
        Some((
            25,
            TimeUnit::Day,
            "test-domain.key5_value5.subkey5_subvalue5".into()
        ))
    );
    let key6 = c.lookup(d, &[("key6", "foo")]).expect("key6");
    assert!(key6.rule.unlimited && !key6.rule.limits());
    // detailed_metric: the metric key carries the runtime value.
    assert_eq!(
        limit(&c, d, &[("key7", "unspecified_value")]),
        Some((
            70,
            TimeUnit::Minute,
            "test-domain.key7_unspecified_value".into()
        ))
    );
}

#[test]
fn bad_files_are_refused_with_the_file_and_the_reason() {
    assert!(load_err("empty_domain.yaml").contains("config file cannot have empty domain"));
    assert!(load_err("empty_key.yaml").contains("descriptors[0]: descriptor has empty key"));
    assert!(load_err("duplicate_key.yaml")
        .contains("duplicate descriptor composite key 'test-domain.key1_value1'"));
    assert!(load_err("bad_limit_unit.yaml").contains("invalid rate limit unit 'foo'"));
    assert!(load_err("bad_limit_unit.yaml").starts_with("bad_limit_unit.yaml: "));
    assert!(load_err("replaces_self.yaml")
        .contains("replaces should not contain name of same descriptor"));
    assert!(load_err("replaces_empty.yaml").contains("should not have an empty replaces entry"));
    assert!(load_err("unlimited_with_unit.yaml")
        .contains("should not specify rate limit unit when unlimited"));
    let misspelled = load_err("misspelled_key.yaml");
    assert!(
        misspelled.contains("unknown field `ratelimit`"),
        "{misspelled}"
    );
    assert!(misspelled.contains("line 5"), "{misspelled}");
    assert!(load_err("misspelled_key2.yaml").contains("unknown field `requestsperunit`"));
    assert!(!load_err("bad_yaml.yaml").is_empty());
    assert!(!load_err("non_map_list.yaml").is_empty());
    assert!(!load_err("non_string_key.yaml").is_empty());
    let dup = from_sources(
        &[
            fixture("duplicate_domain.yaml"),
            fixture("basic_config.yaml"),
        ],
        false,
    );
    assert!(dup
        .err()
        .is_some_and(|e| e.message == "duplicate domain 'test-domain' in config file"));
}

#[test]
fn domains_merge_when_asked() {
    let sources = [
        fixture("merge_domain_key1.yaml"),
        fixture("merge_domain_key2.yaml"),
    ];
    assert!(from_sources(&sources, false).is_err());
    let c = from_sources(&sources, true).expect("merged");
    assert!(c.lookup("test-domain", &[("key1", "value1")]).is_some());
    assert!(c.lookup("test-domain", &[("key2", "value2")]).is_some());
}

#[test]
fn shadow_mode_is_per_rule() {
    let c = load(&["shadowmode_config.yaml"]);
    let d = "test-domain";
    let shadow = |e: &[(&str, &str)]| c.lookup(d, e).expect("a rule").rule.shadow_mode;
    assert!(!shadow(&[("key1", "value1"), ("subkey1", "x")]));
    assert!(shadow(&[("key1", "value1"), ("subkey1", "subvalue1")]));
    assert!(shadow(&[("key2", "x")]));
    assert!(!shadow(&[("key2", "value2")]));
}

#[test]
fn wildcards_match_like_envoy_ratelimit() {
    let c = load(&["wildcard.yaml"]);
    let d = "test-domain";
    let key = |e: &[(&str, &str)]| c.lookup(d, e).map(|m| format!("{d}.{}", m.metric_key));
    assert_eq!(
        key(&[("noVal", "foo1")]).as_deref(),
        Some("test-domain.noVal")
    );
    assert_eq!(
        key(&[("wild", "foo1")]).as_deref(),
        Some("test-domain.wild_foo*")
    );
    assert_eq!(
        key(&[("wild", "foo2")]).as_deref(),
        Some("test-domain.wild_foo*")
    );
    assert_eq!(
        key(&[("nestedWild", "val1"), ("wild", "goo2")]).as_deref(),
        Some("test-domain.nestedWild_val1.wild_goo*")
    );
    assert_eq!(key(&[("wild", "bar")]), None);
    assert_eq!(key(&[("noWild", "foo1")]), None);
    assert_eq!(
        key(&[("midWild", "barab")]).as_deref(),
        Some("test-domain.midWild_bar*b")
    );
    assert_eq!(
        key(&[("midWild", "bar123b")]).as_deref(),
        Some("test-domain.midWild_bar*b")
    );
    assert!(key(&[("midWild", "barb")]).is_some());
    assert_eq!(key(&[("midWild", "bara")]), None);
    assert_eq!(key(&[("midWild", "xbarb")]), None);
    assert!(key(&[("multiWild", "foo123bar456baz")]).is_some());
    assert!(key(&[("multiWild", "foobarbaz")]).is_some());
    assert_eq!(key(&[("multiWild", "foo123baz")]), None);
    assert_eq!(key(&[("multiWild", "bar456baz")]), None);
    // Without share_threshold every value has its own counter.
    let m = c.lookup(d, &[("wild", "foo1")]).expect("wild");
    assert_eq!(m.key_values, vec!["foo1".to_string()]);
}

#[test]
fn share_threshold_shares_one_counter_per_pattern() {
    let c = load(&["share_threshold.yaml"]);
    let d = "test-domain";
    let a = c.lookup(d, &[("files", "files/a.pdf")]).expect("a");
    let b = c.lookup(d, &[("files", "files/b.csv")]).expect("b");
    assert_eq!(a.key_values, vec!["files/*".to_string()]);
    assert_eq!(a.key_values, b.key_values);
    let n = c
        .lookup(d, &[("nested", "parent"), ("files", "nested/x")])
        .expect("nested");
    assert_eq!(n.rule.rate.as_ref().map(|r| r.requests_per_unit), Some(200));
    assert_eq!(
        n.key_values,
        vec!["parent".to_string(), "nested/*".to_string()]
    );
    assert!(
        yaml("domain: d\ndescriptors:\n  - key: k\n    value: v\n    share_threshold: true\n")
            .is_err_and(|e| e
                .message
                .contains("share_threshold can only be used with wildcard"))
    );
}

#[test]
fn metadata_and_replaces_are_kept() {
    let c = load(&["metadata.yaml"]);
    let m = c
        .lookup("test-domain", &[("key1", "value1"), ("subkey1", "x")])
        .expect("rule");
    assert!(m.rule.metadata.is_some());
    let c = yaml(
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 1, name: a}\n  - key: b\n    rate_limit: {unit: second, requests_per_unit: 1, replaces: [{name: a}]}\n",
    )
    .expect("config");
    let b = c.lookup("d", &[("b", "x")]).expect("b");
    assert_eq!(b.rule.replaces, vec!["a".to_string()]);
}

#[test]
fn every_rule_gets_a_valid_plan_with_calendar_windows() {
    let c = load(&["basic_config.yaml", "integration_another.yaml"]);
    let plans = c.plans();
    assert!(!plans.is_empty());
    for (name, fields) in &plans {
        assert!(name.len() <= 64 && name.chars().all(plan_char), "{name}");
        assert!(!fields.is_empty());
    }
    let key5 = c
        .lookup("test-domain", &[("key5", "value5")])
        .expect("key5");
    assert_eq!(key5.rule.plan, "rls:test-domain:key5_value5");
    assert_eq!(
        key5.rule.plan_fields(),
        vec![(
            "rate".to_string(),
            format!("fixed 15 {}/1d", key5.rule.unit_id)
        )]
    );
    // Unlimited rules need no plan.
    assert!(!plans.keys().any(|p| p.contains("key6")));
}

#[test]
fn long_or_odd_names_become_hashed_plan_names() {
    let long = "x".repeat(100);
    let a = plan_name("rls:", &format!("d:{long}a"));
    let b = plan_name("rls:", &format!("d:{long}b"));
    assert_ne!(a, b);
    assert!(a.len() == 64 && a.chars().all(plan_char), "{a}");
    let odd = plan_name("rls:", "d:path_with space{}");
    assert!(odd.chars().all(plan_char), "{odd}");
    assert_ne!(odd, plan_name("rls:", "d:path_with_space__"));
}

#[test]
fn tollgate_extensions_compile_to_specs() {
    let c = yaml(
        r#"
domain: ai
tollgate:
  tenant_key: org
  request_id_key: request_id
  settle_id_key: settle_id
  reservation_ttl: 10m
descriptors:
  - key: org
    descriptors:
      - key: user
        rate_limit: {unit: minute, requests_per_unit: 60}
        tollgate: {algorithm: sliding, precision: 20}
      - key: model
        rate_limit: {unit: month, requests_per_unit: 1000000}
        tollgate: {cost_unit: token, report_usage: true}
      - key: burst
        rate_limit: {unit: second, requests_per_unit: 10}
        tollgate: {algorithm: bucket, burst: 50}
      - key: jobs
        tollgate: {concurrency: 4, concurrency_ttl: 60s}
"#,
    )
    .expect("config");
    let d = c.domain("ai").expect("domain");
    assert_eq!(d.options.tenant_key.as_deref(), Some("org"));
    assert!(d.options.is_control("settle_id"));
    let spec = |k: &str| {
        let m = c.lookup("ai", &[("org", "acme"), (k, "x")]).expect(k);
        let f = m.rule.plan_fields();
        (f[0].1.clone(), m.rule.unit_id.clone(), m.rule.clone())
    };
    let (s, u, _) = spec("user");
    assert_eq!(s, format!("sliding 60 {u}/1m precision 20"));
    assert!(u.starts_with("request."));
    let (s, u, r) = spec("model");
    assert_eq!(s, format!("fixed 1000000 {u}/1mo"));
    assert!(u.starts_with("token.") && r.report_usage);
    // Usage reports charge the same limit (name and unit) under a shadow-mode twin.
    let usage_plan = r.usage_plan().expect("a usage plan");
    assert_eq!(
        c.plans().get(&usage_plan),
        Some(&vec![
            ("rate".to_string(), format!("fixed 1000000 {u}/1mo")),
            ("mode".to_string(), "shadow".to_string()),
        ])
    );
    assert!(spec("user").2.usage_plan().is_none());
    let (s, u, _) = spec("burst");
    assert_eq!(s, format!("bucket 10 {u}/1s burst 50"));
    let (s, _, r) = spec("jobs");
    assert_eq!(s, "concurrency 4 ttl 60s");
    assert!(r.rate.is_none() && r.limits());
}

#[test]
fn bad_extensions_name_the_position() {
    let e = yaml("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 1}\n    tollgate: {algorithm: leaky}\n")
        .expect_err("an error");
    assert!(e.message.contains("invalid algorithm 'leaky'"), "{e}");
    assert!(e.message.contains("line 5"), "{e}");
    let e = yaml("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 1}\n    tollgate: {burst: 3}\n")
        .expect_err("an error");
    assert!(
        e.message
            .contains("descriptors[0]: tollgate.burst needs algorithm bucket"),
        "{e}"
    );
    let e = yaml("domain: d\ndescriptors:\n  - key: a\n    tollgate: {report_usage: true}\n")
        .expect_err("an error");
    assert!(
        e.message
            .contains("descriptors[0]: tollgate.report_usage needs a rate_limit"),
        "{e}"
    );
    let e = yaml("domain: d\ndescriptors:\n  - key: org\n    descriptors:\n      - key: a\n      - key: jobs\n        tollgate: {concurrency: 2}\n")
        .expect_err("an error");
    assert!(e.to_string().starts_with("t.yaml: descriptors[0].descriptors[1]: tollgate.concurrency needs tollgate.request_id_key and tollgate.settle_id_key"), "{e}");
    let e = yaml("domain: d\ntollgate: {request_id_key: rid}\ndescriptors:\n  - key: jobs\n    tollgate: {concurrency: 2}\n")
        .expect_err("an error");
    assert!(
        e.message
            .contains("descriptors[0]: tollgate.concurrency needs"),
        "{e}"
    );
    let e = yaml("domain: d\ntollgate: {color: red}\n").expect_err("an error");
    assert!(e.message.contains("unknown field `color`"), "{e}");
}
