//! `tollgate`: the admin CLI. Applies a plans file to a server or to every primary of
//! a cluster (then checks every node agrees), shows plans and a subject's usage, and
//! manages credits.
//!
//! Exit codes: 0 success; 1 bad usage; 2 invalid plans file; 3 server or connection
//! error; 4 nodes disagree after applying.

// A command-line tool: printing is its output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod apply;
mod nodes;
mod plansfile;

use std::process::ExitCode;
use std::time::Duration;

use redis::Value;

/// `println!` that ends the program quietly when stdout is closed (`tollgate ... | head`)
/// instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        print_line(format_args!($($arg)*))
    };
}

fn print_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{line}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("tollgate: cannot write the output: {e}");
        std::process::exit(1);
    }
}

const USAGE: &str = "\
tollgate — administer Tollgate rate limits and credits

Usage:
  tollgate [--url URL] [--cluster] plans apply FILE [--dry-run] [--prune]
  tollgate [--url URL] [--cluster] plans show
  tollgate plans check FILE
  tollgate [--url URL] [--cluster] usage KEY PLAN [--endpoint NAME]
  tollgate [--url URL] [--cluster] credits grant KEY AMOUNT [--ttl MS | --expire-at UNIX_MS] [--id ID]
  tollgate [--url URL] [--cluster] credits balance KEY
  tollgate [--url URL] [--cluster] credits blocks KEY

Options:
  --url URL     server to talk to (default: $TOLLGATE_URL, else redis://127.0.0.1:6479,
                where `make run` starts one)
  --cluster     the server is a cluster node: plans act on every primary and check
                every node; usage and credits go to the node serving KEY (MOVED)
  -h, --help    help (also after a subcommand: tollgate plans --help)

Exit codes: 0 ok, 1 usage, 2 invalid plans file, 3 server error, 4 nodes disagree.";

const HELP_PLANS: &str = "\
tollgate [--url URL] [--cluster] plans apply FILE [--dry-run] [--prune]
tollgate [--url URL] [--cluster] plans show
tollgate plans check FILE

apply  brings the server's plans (with --cluster: every primary's) to the file's,
       then checks that every node agrees
show   prints the server's plans as a plans file
check  validates a plans file without connecting anywhere

tollgate plans apply --help (show, check) says more.";

const HELP_APPLY: &str = "\
tollgate plans apply FILE [--dry-run] [--prune]

Validates the whole plans file first (nothing is applied if any plan is invalid),
then on the server — or, with --cluster, on the first primary — sets the plans the
file defines, removes fields the file no longer has, and sets the default plan.
Prints each change. Plans the server holds and the file does not define are kept
and listed (--prune deletes them). In a cluster the changes reach every node by
themselves; a primary that does not hold them within 3 s gets them applied
directly. Then waits until every node, replicas included, reports the plan-set
digest of the result (INFO tollgate: tollgate_plans_digest).

  --dry-run   print the changes without making them
  --prune     also delete plans the file does not define

File format (JSON):
  { \"default\": \"free\",
    \"plans\": { \"free\": { \"rpm\": \"sliding 10/1m\", \"jobs\": \"concurrency 4 ttl 60s\" } } }";

const HELP_SHOW: &str = "\
tollgate plans show

Prints the server's plans as a plans file (JSON). With --cluster, checks that every
node reports the same plan-set digest and exits 4 if not.";

const HELP_CHECK: &str = "\
tollgate plans check FILE

Validates a plans file without connecting anywhere; prints its plan-set digest.";

const HELP_USAGE: &str = "\
tollgate usage KEY PLAN [--endpoint NAME]

Shows how the subject at KEY stands under PLAN, one row per limit: limit, unit,
capacity, used, remaining, and the time until it resets. PLAN * is the key's assigned plan, else the
default plan; the plan it resolved to is printed. With --cluster, asks the node
serving KEY.";

const HELP_CREDITS: &str = "\
tollgate credits grant KEY AMOUNT [--ttl MS | --expire-at UNIX_MS] [--id ID]
tollgate credits balance KEY
tollgate credits blocks KEY

grant adds a block of credits (idempotent with --id); balance prints the live
balance; blocks lists the live blocks in the order they are consumed. With
--cluster, each goes to the node serving KEY.";

/// Why the CLI stopped, with its exit code.
enum Failure {
    Usage(String),
    File(String),
    Server(String),
    Disagree(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 1,
            Failure::File(_) => 2,
            Failure::Server(_) => 3,
            Failure::Disagree(_) => 4,
        }
    }
}

/// Parsed global options and the remaining words.
struct Options {
    url: String,
    cluster: bool,
    help: bool,
    words: Vec<String>,
    flags: Vec<(String, Option<String>)>,
}

/// Where `make run` starts a server.
const DEFAULT_URL: &str = "redis://127.0.0.1:6479";

/// Flags that take a value.
const VALUED: [&str; 5] = ["--url", "--endpoint", "--ttl", "--expire-at", "--id"];

fn parse_options(args: Vec<String>) -> Result<Options, Failure> {
    let mut options = Options {
        url: std::env::var("TOLLGATE_URL").unwrap_or_else(|_| DEFAULT_URL.into()),
        cluster: false,
        help: false,
        words: Vec::new(),
        flags: Vec::new(),
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => options.help = true,
            "--cluster" => options.cluster = true,
            "--dry-run" | "--prune" => options.flags.push((arg, None)),
            flag if VALUED.contains(&flag) => {
                let value = args
                    .next()
                    .ok_or_else(|| Failure::Usage(format!("{flag} needs a value")))?;
                if flag == "--url" {
                    options.url = value;
                } else {
                    options.flags.push((arg, Some(value)));
                }
            }
            flag if flag.starts_with("--") => {
                return Err(Failure::Usage(format!("unknown option {flag}")))
            }
            _ => options.words.push(arg),
        }
    }
    Ok(options)
}

impl Options {
    fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|(f, _)| f == name)
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .find(|(f, _)| f == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn allow_flags(&self, allowed: &[&str]) -> Result<(), Failure> {
        match self
            .flags
            .iter()
            .find(|(f, _)| !allowed.contains(&f.as_str()))
        {
            Some((f, _)) => Err(Failure::Usage(format!("{f} does not apply here"))),
            None => Ok(()),
        }
    }

    /// The server, or every node of the cluster (primaries first).
    fn targets(&self) -> Result<Vec<nodes::Node>, Failure> {
        if self.cluster {
            nodes::cluster(&self.url).map_err(Failure::Server)
        } else {
            nodes::single(&self.url)
                .map(|n| vec![n])
                .map_err(Failure::Usage)
        }
    }

    /// A connection for commands on `KEY`: with `--cluster`, it follows `MOVED` to
    /// the node serving the key.
    fn connect(&self) -> Result<nodes::KeyConnection, Failure> {
        let node = nodes::single(&self.url).map_err(Failure::Usage)?;
        nodes::KeyConnection::open(node, self.cluster).map_err(Failure::Server)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse_options(args).and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            match &failure {
                Failure::Usage(m) => eprintln!("tollgate: {m}\n\n{USAGE}"),
                Failure::File(m) => eprintln!("tollgate: invalid plans file: {m}"),
                Failure::Server(m) => eprintln!("tollgate: {m}"),
                Failure::Disagree(m) => eprintln!("tollgate: nodes disagree: {m}"),
            }
            ExitCode::from(failure.code())
        }
    }
}

fn run(options: Options) -> Result<(), Failure> {
    let words: Vec<&str> = options.words.iter().map(String::as_str).collect();
    let help = |text: &str| {
        out!("{text}");
        Ok(())
    };
    match words.as_slice() {
        [] if options.help => help(USAGE),
        ["plans", "apply", ..] if options.help => help(HELP_APPLY),
        ["plans", "show", ..] if options.help => help(HELP_SHOW),
        ["plans", "check", ..] if options.help => help(HELP_CHECK),
        ["plans", ..] if options.help => help(HELP_PLANS),
        ["usage", ..] if options.help => help(HELP_USAGE),
        ["credits", ..] if options.help => help(HELP_CREDITS),
        _ if options.help => help(USAGE),
        ["plans", "apply", file] => {
            options.allow_flags(&["--dry-run", "--prune"])?;
            plans_apply(&options, file)
        }
        ["plans", "show"] => {
            options.allow_flags(&[])?;
            plans_show(&options)
        }
        ["plans", "check", file] => {
            options.allow_flags(&[])?;
            let set = read_plans(file)?;
            let digest = set.digest().map_err(|e| Failure::File(e.to_string()))?;
            out!(
                "{file}: {} plans, valid; plan-set digest {digest:016x}",
                set.plans.len()
            );
            Ok(())
        }
        ["usage", key, plan] => {
            options.allow_flags(&["--endpoint"])?;
            usage(&options, key, plan)
        }
        ["credits", "grant", key, amount] => {
            options.allow_flags(&["--ttl", "--expire-at", "--id"])?;
            credits_grant(&options, key, amount)
        }
        ["credits", "balance", key] => {
            options.allow_flags(&[])?;
            let mut con = options.connect()?;
            let balance: i64 = query(&mut con, redis::cmd("RL.CREDITS.BALANCE").arg(*key))?;
            out!("{balance}");
            Ok(())
        }
        ["credits", "blocks", key] => {
            options.allow_flags(&[])?;
            credits_blocks(&options, key)
        }
        _ => Err(Failure::Usage(format!(
            "unknown command: {}",
            words.join(" ")
        ))),
    }
}

fn query<T: redis::FromRedisValue>(
    con: &mut nodes::KeyConnection,
    cmd: &mut redis::Cmd,
) -> Result<T, Failure> {
    con.query(cmd).map_err(Failure::Server)
}

fn read_plans(file: &str) -> Result<plansfile::PlanSet, Failure> {
    let text = std::fs::read_to_string(file).map_err(|e| Failure::File(format!("{file}: {e}")))?;
    plansfile::parse(&text).map_err(|e| Failure::File(format!("{file}: {e}")))
}

/// How long `plans apply` gives a primary to receive the changes made on the first one
/// (plan changes reach every node of a cluster by themselves, within milliseconds)
/// before applying them there too.
const PROPAGATION: Duration = Duration::from_secs(3);

fn plans_apply(options: &Options, file: &str) -> Result<(), Failure> {
    let wanted = read_plans(file)?;
    wanted.digest().map_err(|e| Failure::File(e.to_string()))?;
    let targets = options.targets()?;
    let dry_run = options.flag("--dry-run");
    let prune = options.flag("--prune");
    // What every node must hold afterwards: the file's plans, plus (without --prune)
    // the plans the servers hold that the file does not define, and their default if
    // the file names none.
    let mut expected = wanted.clone();
    let mut total = 0;
    // What the first primary holds once changed: the others receive it by themselves.
    let mut applied: Option<u64> = None;
    for node in targets.iter().filter(|n| n.primary) {
        if let Some(first) = applied {
            if apply::verify(std::slice::from_ref(node), first, PROPAGATION).is_empty() {
                out!("{}: up to date (propagated)", node.name);
                continue;
            }
        }
        let mut con = node.connect().map_err(Failure::Server)?;
        let current =
            apply::fetch(&mut con).map_err(|e| Failure::Server(format!("{}: {e}", node.name)))?;
        let changes = apply::plan_changes(&current, &wanted, prune);
        if changes.is_empty() {
            out!("{}: up to date", node.name);
        }
        for change in &changes {
            out!("{}: {change}", node.name);
        }
        if !prune {
            let kept = apply::kept_plans(&current, &wanted);
            if !kept.is_empty() {
                out!(
                    "{}: keeps {} plan(s) the file does not define: {} (--prune deletes them)",
                    node.name,
                    kept.len(),
                    kept.join(", ")
                );
            }
            for name in kept {
                if let Some(fields) = current.plans.get(&name) {
                    expected.plans.insert(name, fields.clone());
                }
            }
            if expected.default.is_none() {
                expected.default.clone_from(&current.default);
            }
        }
        total += changes.len();
        if !dry_run {
            apply::apply_changes(&mut con, &changes)
                .map_err(|e| Failure::Server(format!("{}: {e}", node.name)))?;
            applied = Some(apply::plans_digest(&mut con).map_err(Failure::Server)?);
        }
    }
    if dry_run {
        out!("dry run: {total} changes not made");
        return Ok(());
    }
    let digest = expected.digest().map_err(|e| {
        Failure::Server(format!(
            "cannot compute the plan-set digest of the file's plans with the server's: {e}"
        ))
    })?;
    let disagree = apply::verify(&targets, digest, Duration::from_secs(15));
    if !disagree.is_empty() {
        return Err(Failure::Disagree(disagree.join("; ")));
    }
    out!(
        "{total} changes; {} nodes report plan-set digest {digest:016x}",
        targets.len()
    );
    Ok(())
}

fn plans_show(options: &Options) -> Result<(), Failure> {
    let targets = options.targets()?;
    let first = targets
        .first()
        .ok_or_else(|| Failure::Server("no node to read from".into()))?;
    let mut con = first.connect().map_err(Failure::Server)?;
    let set = apply::fetch(&mut con).map_err(Failure::Server)?;
    out!("{}", set.to_json());
    if options.cluster {
        let digest = set
            .digest()
            .map_err(|e| Failure::Server(format!("the server holds an invalid plan set: {e}")))?;
        let disagree = apply::verify(&targets, digest, Duration::from_secs(0));
        if !disagree.is_empty() {
            return Err(Failure::Disagree(disagree.join("; ")));
        }
    }
    Ok(())
}

fn usage(options: &Options, key: &str, plan: &str) -> Result<(), Failure> {
    let mut con = options.connect()?;
    let standing = standing(&mut con, key, plan, options.value("--endpoint"))?;
    let via = standing.via.map(|v| format!(" ({v})")).unwrap_or_default();
    out!("{key} under plan {}{via}:", standing.plan);
    out!(
        "{:<16} {:<12} {:>14} {:>14} {:>14} {:>12}",
        "limit",
        "unit",
        "capacity",
        "used",
        "remaining",
        "resets in"
    );
    for row in &standing.limits {
        let warn = if row.warn { " (warn)" } else { "" };
        out!(
            "{:<16} {:<12} {:>14} {:>14} {:>14} {:>12}{warn}",
            row.name,
            row.unit,
            row.capacity,
            row.used,
            row.remaining,
            human_ms(row.reset_ms)
        );
    }
    Ok(())
}

/// How a subject stands under a plan: what `usage` prints.
struct Standing {
    /// The plan the figures are for (`*` resolved).
    plan: String,
    /// How `*` was resolved, if it was.
    via: Option<&'static str>,
    limits: Vec<LimitStanding>,
}

struct LimitStanding {
    name: String,
    unit: String,
    capacity: i64,
    used: i64,
    remaining: i64,
    /// Until it is back to full with no further use; 0 when nothing is used.
    reset_ms: i64,
    warn: bool,
}

/// The subject's standing under `plan` (a name or `*`), read with `RL.USAGE`, which
/// reports it as it is (leases held, usage counted), charging and assuming nothing.
fn standing(
    con: &mut nodes::KeyConnection,
    key: &str,
    plan: &str,
    endpoint: Option<&str>,
) -> Result<Standing, Failure> {
    let (plan, via) = resolve_plan(con, key, plan)?;
    let mut cmd = redis::cmd("RL.USAGE");
    cmd.arg(key).arg(&plan);
    if let Some(endpoint) = endpoint {
        cmd.arg("ENDPOINT").arg(endpoint);
    }
    let reply: Value = query(con, &mut cmd)?;
    let fields = pairs(&reply);
    let limits = match fields.iter().find(|(k, _)| k == "limits") {
        Some((_, Value::Array(items))) => items.clone(),
        _ => Vec::new(),
    };
    let limits = limits
        .iter()
        .map(|limit| {
            let l = pairs(limit);
            let get = |name: &str| {
                l.iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| nodes::text(v))
                    .unwrap_or_default()
            };
            let int = |name: &str| get(name).parse::<i64>().unwrap_or(0);
            LimitStanding {
                name: get("name"),
                capacity: int("limit"),
                used: int("used"),
                remaining: int("remaining"),
                reset_ms: int("reset_ms"),
                warn: int("warn") == 1,
                unit: get("unit"),
            }
        })
        .collect();
    Ok(Standing { plan, via, limits })
}

/// `*` is the key's assigned plan, else the default plan (as the module resolves it);
/// any other name is itself.
fn resolve_plan(
    con: &mut nodes::KeyConnection,
    key: &str,
    plan: &str,
) -> Result<(String, Option<&'static str>), Failure> {
    if plan != "*" {
        return Ok((plan.to_string(), None));
    }
    let assigned: Option<String> = query(con, redis::cmd("RL.ASSIGN").arg(key))?;
    if let Some(assigned) = assigned {
        return Ok((assigned, Some("assigned to the key")));
    }
    let info = nodes::tollgate_info(con.connection())
        .map_err(|e| Failure::Server(format!("{}: {e}", con.node())))?;
    match info.get("plans_default").filter(|d| !d.is_empty()) {
        Some(default) => Ok((default.clone(), Some("the default plan"))),
        None => Err(Failure::Server(format!(
            "{key} has no assigned plan and there is no default plan, so '*' names none"
        ))),
    }
}

/// A reply map (RESP2 flat array or RESP3 map) as pairs.
fn pairs(v: &Value) -> Vec<(String, Value)> {
    match v {
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|kv| Some((nodes::text(kv.first()?), kv.get(1)?.clone())))
            .collect(),
        Value::Map(items) => items
            .iter()
            .map(|(k, v)| (nodes::text(k), v.clone()))
            .collect(),
        _ => Vec::new(),
    }
}

fn human_ms(ms: i64) -> String {
    match ms {
        ms if ms <= 0 => "-".into(),
        ms if ms < 1_000 => format!("{ms}ms"),
        ms if ms < 60_000 => format!("{:.1}s", ms as f64 / 1e3),
        ms if ms < 3_600_000 => format!("{:.1}m", ms as f64 / 6e4),
        ms if ms < 86_400_000 => format!("{:.1}h", ms as f64 / 3.6e6),
        ms => format!("{:.1}d", ms as f64 / 8.64e7),
    }
}

fn credits_grant(options: &Options, key: &str, amount: &str) -> Result<(), Failure> {
    let mut cmd = redis::cmd("RL.CREDITS.GRANT");
    cmd.arg(key).arg(amount);
    match (options.value("--ttl"), options.value("--expire-at")) {
        (Some(_), Some(_)) => {
            return Err(Failure::Usage("give --ttl or --expire-at, not both".into()))
        }
        (Some(ttl), None) => {
            cmd.arg("TTL").arg(ttl);
        }
        (None, Some(at)) => {
            cmd.arg("EXPIREAT").arg(at);
        }
        (None, None) => {}
    }
    if let Some(id) = options.value("--id") {
        cmd.arg("ID").arg(id);
    }
    let mut con = options.connect()?;
    let balance: i64 = query(&mut con, &mut cmd)?;
    out!("balance {balance}");
    Ok(())
}

fn credits_blocks(options: &Options, key: &str) -> Result<(), Failure> {
    let mut con = options.connect()?;
    let reply: Value = query(&mut con, redis::cmd("RL.CREDITS.BLOCKS").arg(key))?;
    let Value::Array(blocks) = reply else {
        return Err(Failure::Server(
            "unexpected reply to RL.CREDITS.BLOCKS".into(),
        ));
    };
    out!(
        "{:<40} {:>14} {:>14} {:>16}",
        "block",
        "left",
        "granted",
        "expires in"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    for block in &blocks {
        let b = pairs(block);
        let get = |name: &str| {
            b.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| nodes::text(v))
                .unwrap_or_default()
        };
        let at = get("expires_at").parse::<i64>().unwrap_or(-1);
        let expires = if at < 0 {
            "never".to_string()
        } else {
            human_ms(at - now)
        };
        out!(
            "{:<40} {:>14} {:>14} {:>16}",
            get("id"),
            get("left"),
            get("granted"),
            expires
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_url_is_where_make_run_starts_a_server() {
        let makefile = include_str!("../../Makefile");
        let port = makefile
            .lines()
            .find_map(|l| l.strip_prefix("PORT ?= "))
            .unwrap();
        assert_eq!(
            super::DEFAULT_URL,
            format!("redis://127.0.0.1:{}", port.trim())
        );
    }
}
