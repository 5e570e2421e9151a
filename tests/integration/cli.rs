//! The `tollgate` admin CLI against a live server.

use crate::harness::*;

const FILE: &str = r#"{
  "default": "free",
  "plans": {
    "free": { "rpm": "sliding 10/1m", "tpd": "fixed 1000 token/1d", "jobs": "concurrency 2 ttl 60s" },
    "pro": { "rpm": "sliding 60/1m", "tpd": "fixed 100000 token/1d", "fallback": "free" }
  }
}"#;

fn write(server: &Server, name: &str, text: &str) -> String {
    let path = server.dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn url(server: &Server) -> String {
    format!("redis://127.0.0.1:{}", server.port)
}

#[test]
fn apply_show_and_change_plans() {
    let server = Server::start();
    let file = write(&server, "plans.json", FILE);
    let (code, out, err) = cli(&["--url", &url(&server), "plans", "apply", &file]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("+ new plan free"), "{out}");
    assert!(out.contains("~ default plan: free"), "{out}");
    assert!(out.contains("1 nodes report plan-set digest"), "{out}");
    let mut con = server.client();
    assert_eq!(string(&mut con, &["RL.PLAN.DEFAULT"]), "free");
    assert_eq!(
        text(&map_of(&run(&mut con, &["RL.PLAN.GET", "pro"]))["fallback"]),
        "free"
    );
    // Applying again changes nothing.
    let (code, out, _) = cli(&["--url", &url(&server), "plans", "apply", &file]);
    assert_eq!(code, 0);
    assert!(out.contains("up to date"), "{out}");
    // A changed file: a changed limit, a removed limit, a plan pruned.
    let changed = FILE
        .replace("\"rpm\": \"sliding 60/1m\", ", "")
        .replace("sliding 10/1m", "sliding 20/1m");
    let changed = changed.replace(
        ",\n    \"pro\": { \"tpd\": \"fixed 100000 token/1d\", \"fallback\": \"free\" }",
        "",
    );
    let file2 = write(&server, "plans2.json", &changed);
    let (code, out, err) = cli(&[
        "--url",
        &url(&server),
        "plans",
        "apply",
        &file2,
        "--prune",
        "--dry-run",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("dry run"), "{out}");
    assert_eq!(
        text(&map_of(&run(&mut con, &["RL.PLAN.GET", "free"]))["rpm"]),
        "sliding 10/1m",
        "a dry run changes nothing"
    );
    let (code, out, _) = cli(&["--url", &url(&server), "plans", "apply", &file2, "--prune"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("~ set free: rpm=\"sliding 20/1m\""), "{out}");
    assert!(out.contains("- drop plan pro"), "{out}");
    assert_eq!(
        run(&mut con, &["RL.PLAN.LIST"]),
        redis::Value::Array(vec![redis::Value::BulkString(b"free".to_vec())])
    );
    let (code, out, _) = cli(&["--url", &url(&server), "plans", "show"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"rpm\": \"sliding 20/1m\""), "{out}");
}

#[test]
fn apply_without_prune_keeps_and_lists_plans_the_file_lacks() {
    let server = Server::start();
    let mut con = server.client();
    int(&mut con, &["RL.PLAN.SET", "legacy", "rpm", "sliding 5/1m"]);
    int(&mut con, &["RL.PLAN.SET", "trial", "rpd", "fixed 10/1d"]);
    let file = write(&server, "plans.json", FILE);
    let (code, out, err) = cli(&["--url", &url(&server), "plans", "apply", &file]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(
            "keeps 2 plan(s) the file does not define: legacy, trial (--prune deletes them)"
        ),
        "{out}"
    );
    assert!(out.contains("1 nodes report plan-set digest"), "{out}");
    assert_eq!(
        text(&map_of(&run(&mut con, &["RL.PLAN.GET", "legacy"]))["rpm"]),
        "sliding 5/1m",
        "kept"
    );
    // Again, up to date: still exit 0, still the note.
    let (code, out, _) = cli(&["--url", &url(&server), "plans", "apply", &file]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("up to date") && out.contains("--prune deletes them"));
    // --prune removes them and the note goes.
    let (code, out, _) = cli(&["--url", &url(&server), "plans", "apply", &file, "--prune"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("- drop plan legacy") && out.contains("- drop plan trial"));
    assert!(!out.contains("keeps"), "{out}");
    // A file without a default keeps the server's default.
    let no_default = FILE.replace("\"default\": \"free\",", "");
    let file = write(&server, "no-default.json", &no_default);
    let (code, out, err) = cli(&["--url", &url(&server), "plans", "apply", &file]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(string(&mut con, &["RL.PLAN.DEFAULT"]), "free");
}

#[test]
fn an_invalid_file_names_the_position_and_applies_nothing() {
    let server = Server::start();
    let bad = FILE.replace("fixed 100000 token/1d", "fixed lots token/1d");
    let file = write(&server, "bad.json", &bad);
    let (code, _, err) = cli(&["--url", &url(&server), "plans", "apply", &file]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("line 5 column"), "{err}");
    assert!(err.contains("plan 'pro' field 'tpd'"), "{err}");
    assert_eq!(
        run(&mut server.client(), &["RL.PLAN.LIST"]),
        redis::Value::Array(vec![]),
        "nothing applied"
    );
    let syntax = write(&server, "syntax.json", "{ \"plans\": { \"a\": ");
    let (code, _, err) = cli(&["plans", "check", &syntax]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid JSON"), "{err}");
    let (code, out, _) = cli(&["plans", "check", &write(&server, "ok.json", FILE)]);
    assert_eq!(code, 0);
    assert!(out.contains("2 plans, valid"), "{out}");
}

#[test]
fn usage_and_credits_commands() {
    let server = Server::start();
    let file = write(&server, "plans.json", FILE);
    assert_eq!(cli(&["--url", &url(&server), "plans", "apply", &file]).0, 0);
    let mut con = server.client();
    assert!(decision(
        &mut con,
        &["RL.ACQUIRE", "user:1", "free", "3", "COST", "token", "250"]
    )
    .allowed());
    let (code, out, _) = cli(&["--url", &url(&server), "usage", "user:1", "free"]);
    assert_eq!(code, 0);
    let row = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert!(out.starts_with("user:1 under plan free:\n"), "{out}");
    assert_eq!(row("rpm")[2..5], ["10", "3", "7"], "{out}");
    assert_eq!(row("tpd")[2..5], ["1000", "250", "750"], "{out}");
    assert_eq!(row("jobs")[2..5], ["2", "1", "1"], "{out}");
    // `*`: the plan it resolves to is named, and its figures shown.
    let (code, out, err) = cli(&["--url", &url(&server), "usage", "user:1", "*"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("user:1 under plan free (the default plan):\n"),
        "{out}"
    );
    assert!(out.contains("\ntpd "), "{out}");
    assert_eq!(string(&mut con, &["RL.ASSIGN", "user:2", "pro"]), "OK");
    let (code, out, err) = cli(&["--url", &url(&server), "usage", "user:2", "*"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("user:2 under plan pro (assigned to the key):\n"),
        "{out}"
    );
    assert!(!out.contains("jobs"), "pro's limits, not free's: {out}");
    // Neither an assignment nor a default plan: `*` names none.
    let bare = Server::start();
    let (code, _, err) = cli(&["--url", &url(&bare), "usage", "user:2", "*"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("user:2 has no assigned plan and there is no default plan"),
        "{err}"
    );
    let (code, out, _) = cli(&[
        "--url",
        &url(&server),
        "credits",
        "grant",
        "acct",
        "500",
        "--ttl",
        "60000",
        "--id",
        "pay-1",
    ]);
    assert_eq!((code, out.trim()), (0, "balance 500"));
    let (code, out, _) = cli(&[
        "--url",
        &url(&server),
        "credits",
        "grant",
        "acct",
        "500",
        "--id",
        "pay-1",
    ]);
    assert_eq!((code, out.trim()), (0, "balance 500"), "idempotent");
    let (code, out, _) = cli(&["--url", &url(&server), "credits", "balance", "acct"]);
    assert_eq!((code, out.trim()), (0, "500"));
    let (code, out, _) = cli(&["--url", &url(&server), "credits", "blocks", "acct"]);
    assert_eq!(code, 0);
    assert!(out.contains("pay-1") && out.contains("500"), "{out}");
}

#[test]
fn every_subcommand_has_its_own_help() {
    for words in [
        &["plans"][..],
        &["plans", "apply"],
        &["plans", "show"],
        &["plans", "check"],
        &["usage"],
        &["credits"],
        &["credits", "grant"],
        &["credits", "balance"],
        &["credits", "blocks"],
    ] {
        for flag in ["--help", "-h"] {
            let mut args = words.to_vec();
            args.push(flag);
            let (code, out, err) = cli(&args);
            assert_eq!(code, 0, "{args:?}: {err}");
            let command = words.join(" ");
            assert!(
                out.contains(&format!("tollgate {command}"))
                    || out.contains(&format!("[--cluster] {command}")),
                "{args:?} printed another help:\n{out}"
            );
            assert!(
                !out.contains("Exit codes"),
                "{args:?} printed the top-level help:\n{out}"
            );
        }
    }
}

#[test]
fn exit_codes_a_script_can_rely_on() {
    let server = Server::start();
    let (code, _, err) = cli(&["plans", "frobnicate"]);
    assert_eq!(code, 1, "{err}");
    let (code, _, _) = cli(&["--bogus"]);
    assert_eq!(code, 1);
    let (code, out, _) = cli(&["plans", "apply", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--prune"));
    let (code, out, _) = cli(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("Exit codes"));
    assert!(
        out.contains("redis://127.0.0.1:6479"),
        "the default URL is make run's: {out}"
    );
    let (code, _, err) = cli(&[
        "--url",
        &format!("redis://127.0.0.1:{}", free_port()),
        "credits",
        "balance",
        "x",
    ]);
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = cli(&["--url", &url(&server), "credits", "grant", "acct", "-5"]);
    assert_eq!(code, 3);
    assert!(
        err.contains("amount must be a non-negative integer"),
        "{err}"
    );
}

#[test]
fn usage_and_credits_follow_moved_with_cluster() {
    let cluster = Cluster::start(3);
    let seed = &cluster.nodes[0];
    let seed_url = cluster.seed_url();
    let file = write(seed, "plans.json", FILE);
    let (code, out, err) = cli(&["--cluster", "--url", &seed_url, "plans", "apply", &file]);
    assert_eq!(code, 0, "{out}{err}");
    // Keys the seed does not serve: every command about them is redirected.
    let elsewhere = |prefix: &str| {
        (0..)
            .map(|i| format!("{prefix}:{i}"))
            .find(|k| cluster.primary_for(k).port != seed.port)
            .unwrap()
    };
    let key = elsewhere("user");
    let mut owner = cluster.primary_for(&key).client();
    assert!(decision(
        &mut owner,
        &["RL.ACQUIRE", &key, "free", "3", "COST", "token", "250"]
    )
    .allowed());

    // Without --cluster, MOVED is an error that says what to do.
    let (code, _, err) = cli(&["--url", &seed_url, "usage", &key, "free"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("MOVED") && err.contains("add --cluster"),
        "{err}"
    );

    let (code, out, err) = cli(&["--cluster", "--url", &seed_url, "usage", &key, "free"]);
    assert_eq!(code, 0, "{err}");
    let rpm: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("rpm"))
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(rpm.get(2..5), Some(&["10", "3", "7"][..]), "{out}");
    // `*` resolves on the node serving the key (its default plan).
    let (code, out, err) = cli(&["--cluster", "--url", &seed_url, "usage", &key, "*"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("{key} under plan free (the default plan):\n")),
        "{out}"
    );

    let acct = elsewhere("acct");
    let credits = |args: &[&str]| {
        let mut all = vec!["--cluster", "--url", &seed_url, "credits"];
        all.extend_from_slice(args);
        cli(&all)
    };
    let (code, out, err) = credits(&["grant", &acct, "500", "--id", "pay-1"]);
    assert_eq!((code, out.trim()), (0, "balance 500"), "{err}");
    let (code, out, err) = credits(&["balance", &acct]);
    assert_eq!((code, out.trim()), (0, "500"), "{err}");
    let (code, out, err) = credits(&["blocks", &acct]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("pay-1"), "{out}");
    assert_eq!(
        int(
            &mut cluster.primary_for(&acct).client(),
            &["RL.CREDITS.BALANCE", &acct]
        ),
        500,
        "granted on the node serving the key"
    );
}

#[test]
fn a_closed_pipe_ends_the_cli_quietly() {
    // `tollgate --help | head -1`: the reader is gone before the CLI writes.
    let mut child = std::process::Command::new(cli_path())
        .arg("--help")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the tollgate CLI");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait for the CLI");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
