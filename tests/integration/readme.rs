//! The README's tour works as written: every `127.0.0.1:6479>` line is run, in order,
//! against a fresh server with the example plans, fails exactly where the README
//! shows an error, and leaves nothing held at the end.

use crate::harness::*;

/// Splits a redis-cli command line: whitespace-separated, `"..."` quotes one argument.
fn split(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut has = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                has = true;
            }
            c if c.is_whitespace() && !quoted => {
                if has {
                    args.push(std::mem::take(&mut current));
                    has = false;
                }
            }
            c => {
                current.push(c);
                has = true;
            }
        }
    }
    if has {
        args.push(current);
    }
    args
}

#[test]
fn every_command_of_the_readme_tour_works_as_written() {
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let server = Server::start();
    let plans = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/plans.json");
    let (code, out, err) = cli(&[
        "--url",
        &format!("redis://127.0.0.1:{}", server.port),
        "plans",
        "apply",
        plans.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let mut con = server.client_resp3();
    let lines: Vec<&str> = readme.lines().collect();
    let mut ran = 0;
    for (i, line) in lines.iter().enumerate() {
        let Some(command) = line.strip_prefix("127.0.0.1:6479> ") else {
            continue;
        };
        let expects_error = lines
            .get(i + 1)
            .is_some_and(|next| next.starts_with("(error)"));
        let args = split(command);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        match try_run(&mut con, &refs) {
            Ok(reply) => assert!(
                !expects_error,
                "README line {}: {command} should fail, got {reply:?}",
                i + 1
            ),
            Err(e) => {
                assert!(
                    expects_error,
                    "README line {}: {command} failed: {e}",
                    i + 1
                );
                let shown = lines[i + 1].trim_start_matches("(error) ");
                assert_eq!(e, shown, "README line {}", i + 1);
            }
        }
        ran += 1;
    }
    assert!(ran >= 15, "only {ran} tour commands found");
    // The tour ends clean: no lease or reservation left held (a newcomer's keys would
    // otherwise keep slots and tokens until their TTLs run out).
    let info = string(&mut server.client(), &["INFO", "tollgate"]);
    assert!(
        info.lines()
            .any(|l| l.trim() == "tollgate_requests_in_flight:0"),
        "the tour leaves requests in flight:\n{info}"
    );
}
