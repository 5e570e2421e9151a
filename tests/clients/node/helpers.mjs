// Shared helpers of the ioredis / node-redis tests. tests/clients/run.py (make
// test-clients) starts the servers and names them in the environment; run alone,
// these tests fail at once, saying so.

import { execFileSync } from "node:child_process";
import { readFileSync, writeFileSync, unlinkSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import Redis from "ioredis";

const HERE = dirname(fileURLToPath(import.meta.url));
export const ROOT = join(HERE, "..", "..", "..");

function env(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run tests/clients/run.py (make test-clients)`);
  return value;
}

export const STANDALONE = Number(env("TOLLGATE_STANDALONE_PORT"));
export const CLUSTER = env("TOLLGATE_CLUSTER_PORTS").split(",").map(Number);
export const SERVER = env("TOLLGATE_SERVER_VERSION"); // "redis 7.0.15", "valkey 9.1.2"

/** Valkey 9 and Redis 7.4+ let modules add ACL categories (@ratelimit); 7.0 does not. */
export function serverHasModuleAclCategories() {
  const [name, version] = SERVER.split(" ");
  const [major, minor] = version.split(".").map(Number);
  return name === "valkey" || major > 7 || (major === 7 && minor >= 4);
}

/** The code block after `<!-- test: name -->` in docs/`file`, with the ports the
 * docs use (make run's 6479, make cluster's 7100) replaced by the test servers'. */
export function snippet(name, file = "clients.md") {
  const text = readFileSync(join(ROOT, "docs", file), "utf8");
  const marker = `<!-- test: ${name} -->\n`;
  const at = text.indexOf(marker);
  if (at < 0) throw new Error(`docs/${file} has no snippet '${name}'`);
  const block = text.slice(at + marker.length).match(/^```\w*\n([\s\S]*?)```/);
  if (!block) throw new Error(`snippet '${name}' is not followed by a code block`);
  return block[1]
    .replace(/\b6479\b/g, String(STANDALONE))
    .replace(/\b7100\b/g, String(CLUSTER[0]));
}

/** Runs an ACL recipe of docs/operating.md (a redis-cli command line) as written,
 * with bash, against each port (ACL rules are per node). */
export function applyAclRecipe(name, ports) {
  const recipe = snippet(name, "operating.md");
  if (!recipe.startsWith(`redis-cli -p ${STANDALONE} `)) throw new Error(recipe);
  for (const port of ports) {
    const out = execFileSync("bash", ["-c", recipe.replace(`-p ${STANDALONE} `, `-p ${port} `)],
      { encoding: "utf8" });
    if (out.trim() !== "OK") throw new Error(`${name} on ${port}: ${out}`);
  }
}

let loaded = 0;

/** Runs JavaScript snippets of the docs as one module (in this directory, so their
 * imports resolve to node_modules) and returns the names it exports: `exports`
 * are top-level names of the snippets. */
export async function runSnippets(names, exports, { prefix = "", file } = {}) {
  const code = prefix + names.map((n) => snippet(n, file)).join("\n") +
    `\nexport { ${exports.join(", ")} };\n`;
  const path = join(HERE, `.snippet-${process.pid}-${loaded++}.mjs`);
  writeFileSync(path, code);
  try {
    return await import(path);
  } finally {
    unlinkSync(path);
  }
}

/** A reply map: an object (RESP3 in node-redis) or a flat [k, v, ...] array. */
export function asMap(reply) {
  if (Array.isArray(reply)) {
    const out = {};
    for (let i = 0; i < reply.length; i += 2) out[reply[i]] = reply[i + 1];
    return out;
  }
  if (reply instanceof Map) return Object.fromEntries(reply);
  return reply;
}

// Commands a primary runs that no client of the test sent.
const NOT_CLIENT_TRAFFIC = new Set(["info", "config|resetstat", "replconf", "rl.apply",
  "rl.plan.merge", "role"]);
// What a replica runs for a client (its replication stream is not counted).
const REPLICA_CLIENT_TRAFFIC = ["rl.", "command", "cluster", "readonly", "readwrite",
  "hello", "client"];

/** What the servers received, from INFO commandstats and errorstats of every node:
 * reset(), run calls, then read() counts every command (rejected ones included) and
 * every error reply, summed over the nodes. */
export class Traffic {
  constructor(ports) {
    this.nodes = ports.map((port) => new Redis({ port, lazyConnect: true }));
  }

  async reset() {
    this.replicas = new Set();
    for (const [i, node] of this.nodes.entries()) {
      const role = await node.call("ROLE");
      if (role[0] !== "master") this.replicas.add(i);
      await node.call("CONFIG", "RESETSTAT");
    }
  }

  async read() {
    const seen = {};
    for (const [i, node] of this.nodes.entries()) {
      for (const line of (await node.info("commandstats")).split("\r\n")) {
        const m = line.match(/^cmdstat_([^:]+):calls=(\d+).*rejected_calls=(\d+)/);
        if (!m || NOT_CLIENT_TRAFFIC.has(m[1])) continue;
        if (this.replicas.has(i) && !REPLICA_CLIENT_TRAFFIC.some((p) => m[1].startsWith(p))) {
          continue;
        }
        seen[m[1]] = (seen[m[1]] ?? 0) + Number(m[2]) + Number(m[3]);
      }
      for (const line of (await node.info("errorstats")).split("\r\n")) {
        const m = line.match(/^(errorstat_[^:]+):count=(\d+)/);
        if (m) seen[m[1]] = (seen[m[1]] ?? 0) + Number(m[2]);
      }
    }
    return seen;
  }

  close() {
    for (const node of this.nodes) node.disconnect();
  }
}

export function commands(seen) {
  return Object.fromEntries(Object.entries(seen).filter(([k]) => !k.startsWith("errorstat_")));
}

export function errors(seen) {
  return Object.fromEntries(Object.entries(seen).filter(([k]) => k.startsWith("errorstat_")));
}

/** The plan every call stream uses: large enough never to deny. */
export const TEST_PLAN = ["rpm", "fixed 1000000/1m", "tpm", "fixed 100000000 token/1m",
  "jobs", "concurrency 10000 ttl 60s"];

/** One lease at a time: a second call waits (WAIT tests). */
export const GATE_PLAN = ["jobs", "concurrency 1 ttl 60s"];

/** TEST_PLAN ("clients"), GATE_PLAN ("gate") and examples/plans.json on the standalone server and on one
 * cluster primary; waits until the cluster has spread them to every node. */
export async function setPlans() {
  const example = JSON.parse(readFileSync(join(ROOT, "examples", "plans.json"), "utf8")).plans;
  const plans = { ...example, clients: Object.fromEntries(pairs(TEST_PLAN)),
    gate: Object.fromEntries(pairs(GATE_PLAN)) };
  const traffic = new Traffic(CLUSTER);
  await traffic.reset();
  const primary = traffic.nodes.find((_, i) => !traffic.replicas.has(i));
  const standalone = new Redis({ port: STANDALONE });
  for (const node of [standalone, primary]) {
    for (const [name, fields] of Object.entries(plans)) {
      await node.call("RL.PLAN.SET", name, ...Object.entries(fields).flat());
    }
  }
  const deadline = Date.now() + 5000;
  for (;;) {
    const got = [];
    for (const node of traffic.nodes) got.push(asMap(await node.call("RL.PLAN.GET", "gate")));
    if (got.every((g) => JSON.stringify(g) === JSON.stringify(plans.gate))) break;
    if (Date.now() > deadline) throw new Error(`plans did not reach every node: ${JSON.stringify(got)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  standalone.disconnect();
  traffic.close();
}

function pairs(flat) {
  const out = [];
  for (let i = 0; i < flat.length; i += 2) out.push([flat[i], flat[i + 1]]);
  return out;
}

export const SUBJECTS = 10;

/** [args, check] for ten calls on each of SUBJECTS subjects: every command an
 * application sends, the credits ones included (the same stream as the redis-py
 * tests). */
export function callStream(tag) {
  const calls = [];
  const limitsUsed = (r) => asMap(r).limits.map((l) => asMap(l).used);
  for (let i = 0; i < SUBJECTS; i++) {
    const [user, credits, thr] = ["user", "credits", "thr"].map((w) => `{${tag}:${i}}:${w}`);
    calls.push(
      [["RL.ACQUIRE", user, "clients", "COST", "token", "100", "ID", "r", "CREDITS", credits, "2"],
        (r) => asMap(r).allowed === 1 && asMap(r).credits === 98],
      [["RL.PEEK", user, "clients"], (r) => asMap(r).allowed === 1],
      [["RL.USAGE", user, "clients"], (r) => JSON.stringify(limitsUsed(r)) === "[2,100,1]"],
      [["RL.TOUCH", user, "r", "30000"], (r) => r === 1],
      [["RL.RELEASE", user, "r", "COST", "token", "60"], (r) => asMap(r).released === 1],
      [["RL.THROTTLE", thr, "10", "100", "60"], (r) => JSON.stringify(r.slice(0, 3)) === "[0,11,10]"],
      [["RL.CREDITS.DEDUCT", credits, "3", "ID", "d"], (r) => JSON.stringify(r) === "[3,95]"],
      [["RL.CREDITS.REFUND", credits, "d"], (r) => JSON.stringify(r) === "[3,98]"],
      [["RL.CREDITS.BALANCE", credits], (r) => r === 98],
      [["RL.CREDITS.BLOCKS", credits], (r) => r.length === 1 && asMap(r[0]).left === 98],
    );
  }
  return calls;
}

/** Before counting: credits granted, each subject created by a call settled at once
 * (see the redis-py tests), and 40 keyed calls that open a connection to every
 * primary (a first connection's handshake would count). */
export function setupCalls(tag) {
  const out = [];
  for (let i = 0; i < SUBJECTS; i++) {
    const [user, credits] = [`{${tag}:${i}}:user`, `{${tag}:${i}}:credits`];
    out.push(["RL.CREDITS.GRANT", credits, "100"], ["RL.ACQUIRE", user, "clients", "ID", "setup"],
      ["RL.RELEASE", user, "setup"]);
  }
  for (let n = 0; n < 40; n++) out.push(["RL.PEEK", `warm:${n}`, "clients"]);
  return out;
}

export function expectedCommands() {
  const out = {};
  for (const [args] of callStream("x")) {
    const name = args[0].toLowerCase();
    out[name] = (out[name] ?? 0) + 1;
  }
  return out;
}

/** Sorted by key, for comparing counts. */
export function sorted(counts) {
  return Object.fromEntries(Object.entries(counts).sort(([a], [b]) => a.localeCompare(b)));
}
