// ioredis 6 and node-redis (6, and 5 as `redis5`) against one server and a 3+3
// cluster, set up as docs/clients.md shows: a stream of 100 calls of every
// application command on ten subjects costs exactly 100 commands on the servers — no
// MOVED, no topology refresh, nothing else — and each reply is right. Plain
// ioredis `call` on a cluster is counted too: the MOVED the docs' way avoids.

import { test } from "node:test";
import assert from "node:assert/strict";
import Redis from "ioredis";
import { createClient, createCluster } from "redis";
import { createClient as createClient5, createCluster as createCluster5 } from "redis5";
import {
  CLUSTER, STANDALONE, Traffic, asMap, callStream, commands, errors, expectedCommands,
  runSnippets, setPlans, setupCalls, sorted,
} from "./helpers.mjs";

await setPlans();

/** Runs setup, then counts the call stream sent with `send(args)`. */
async function countStream(ports, tag, send) {
  const traffic = new Traffic(ports);
  try {
    for (const args of setupCalls(tag)) await send(args);
    const calls = callStream(tag);
    await traffic.reset();
    const replies = [];
    for (const [args] of calls) replies.push(await send(args));
    const seen = await traffic.read();
    calls.forEach(([args, check], i) => {
      assert.ok(check(replies[i]), `${args.join(" ")}: ${JSON.stringify(replies[i])}`);
    });
    return seen;
  } finally {
    traffic.close();
  }
}

function assertOneCommandPerCall(seen) {
  assert.deepEqual(sorted(commands(seen)), sorted(expectedCommands()), JSON.stringify(seen));
  assert.deepEqual(errors(seen), {});
}

const ioredisCluster = await runSnippets(["js-ioredis-cluster", "js-ioredis-cluster-calls"],
  ["TollgateCommand", "tollgate", "cluster", "reply", "plans"]);

test("the ioredis cluster snippet grants, acquires with credits, settles and lists plans", () => {
  assert.equal(asMap(ioredisCluster.reply).allowed, 1);
  assert.equal(asMap(ioredisCluster.reply).credits, 995);
  assert.ok(ioredisCluster.plans.includes("pro"));
  ioredisCluster.cluster.disconnect();
});

for (const protocol of [2, 3]) {
  test(`ioredis Cluster (RESP${protocol}) with TollgateCommand: one command per call, no MOVED`, async () => {
    const { tollgate } = ioredisCluster;
    const cluster = new Redis.Cluster([{ host: "127.0.0.1", port: CLUSTER[0] }],
      { redisOptions: { protocol } });
    try {
      const seen = await countStream(CLUSTER, `ioredis-cluster-${protocol}`,
        (args) => tollgate(cluster, ...args));
      assertOneCommandPerCall(seen);
      // Maps come as flat arrays in RESP3 too (replyMapping "legacy", the default).
      assert.ok(Array.isArray(await tollgate(cluster, "RL.PEEK", "user:1", "clients")));
    } finally {
      cluster.disconnect();
    }
  });

  test(`ioredis standalone (RESP${protocol}) call: one command per call`, async () => {
    const redis = new Redis({ port: STANDALONE, protocol });
    try {
      const seen = await countStream([STANDALONE], `ioredis-standalone-${protocol}`,
        (args) => redis.call(...args));
      assertOneCommandPerCall(seen);
    } finally {
      redis.disconnect();
    }
  });
}

test("ioredis Cluster plain call sends RL.PEEK to a random node: MOVED (why the docs subclass Command)", async (t) => {
  const cluster = new Redis.Cluster([{ host: "127.0.0.1", port: CLUSTER[0] }]);
  const traffic = new Traffic(CLUSTER);
  try {
    for (let n = 0; n < 40; n++) await cluster.call("RL.PEEK", `warm:${n}`, "clients");
    await traffic.reset();
    for (let i = 0; i < 60; i++) await cluster.call("RL.PEEK", `moved:${i}`, "clients");
    const seen = await traffic.read();
    t.diagnostic(`60 calls: ${seen["rl.peek"]} commands, ${seen.errorstat_MOVED} MOVED, ` +
      `${seen["cluster|slots"] ?? 0} CLUSTER SLOTS`);
    // Each call answered by the right node in the end, after MOVED from a wrong one
    // about two times in three.
    assert.ok(seen.errorstat_MOVED >= 10, JSON.stringify(seen));
    assert.equal(seen["rl.peek"], 60 + seen.errorstat_MOVED);
  } finally {
    cluster.disconnect();
    traffic.close();
  }
});

const nodeRedis = await runSnippets(["js-node-redis-cluster", "js-node-redis-cluster-calls"],
  ["tollgate", "cluster", "reply", "plans"]);

test("the node-redis cluster snippet grants, acquires with credits, settles and lists plans", async () => {
  assert.ok(!Array.isArray(nodeRedis.reply)); // node-redis 6 speaks RESP3 by default: an object
  assert.equal(asMap(nodeRedis.reply).allowed, 1);
  assert.equal(asMap(nodeRedis.reply).credits, 995);
  assert.ok(nodeRedis.plans.includes("pro"));
  await nodeRedis.cluster.close();
});

test("node-redis 5 speaks RESP2 by default: maps come as flat arrays", async () => {
  const client = await createClient5({ url: `redis://127.0.0.1:${STANDALONE}` }).connect();
  try {
    assert.ok(Array.isArray(await client.sendCommand(["RL.PEEK", "user:1", "clients"])));
  } finally {
    await client.close();
  }
});

for (const [version, makeCluster, makeClient] of [
  ["6", createCluster, createClient],
  ["5", createCluster5, createClient5],
]) {
  for (const RESP of [2, 3]) {
    test(`node-redis ${version} cluster (RESP${RESP}) sendCommand(firstKey, ...): one command per call, no MOVED`, async () => {
      const { tollgate } = nodeRedis;
      const cluster = await makeCluster({
        rootNodes: [{ url: `redis://127.0.0.1:${CLUSTER[0]}` }], RESP,
      }).connect();
      try {
        const seen = await countStream(CLUSTER, `node-redis${version}-cluster-${RESP}`,
          (args) => tollgate(cluster, ...args));
        assertOneCommandPerCall(seen);
      } finally {
        await cluster.close();
      }
    });

    test(`node-redis ${version} standalone (RESP${RESP}) sendCommand: one command per call`, async () => {
      const client = await makeClient({ url: `redis://127.0.0.1:${STANDALONE}`, RESP }).connect();
      try {
        const seen = await countStream([STANDALONE], `node-redis${version}-standalone-${RESP}`,
          (args) => client.sendCommand(args));
        assertOneCommandPerCall(seen);
      } finally {
        await client.close();
      }
    });
  }
}

test("a credits key in another slot is refused with CROSSSLOT, once, and charges nothing", async () => {
  const { tollgate } = ioredisCluster;
  const io = new Redis.Cluster([{ host: "127.0.0.1", port: CLUSTER[0] }]);
  const nr = await createCluster({ rootNodes: [{ url: `redis://127.0.0.1:${CLUSTER[0]}` }] }).connect();
  const traffic = new Traffic(CLUSTER);
  try {
    await tollgate(io, "RL.PEEK", "{a}:user", "clients");
    await nr.sendCommand("{a}:user", true, ["RL.PEEK", "{a}:user", "clients"]);
    await traffic.reset();
    await assert.rejects(tollgate(io, "RL.ACQUIRE", "{a}:user", "clients", "CREDITS", "{b}:credits", "1"),
      /^ReplyError: CROSSSLOT Keys in request don't hash to the same slot/);
    await assert.rejects(
      nr.sendCommand("{a}:user", false, ["RL.ACQUIRE", "{a}:user", "clients", "CREDITS", "{b}:credits", "1"]),
      /CROSSSLOT Keys in request don't hash to the same slot/);
    const seen = await traffic.read();
    assert.deepEqual(seen, { "rl.acquire": 2, errorstat_CROSSSLOT: 2 });
    const usage = asMap(await tollgate(io, "RL.USAGE", "{a}:user", "clients"));
    assert.deepEqual(usage.limits.map((l) => asMap(l).used), [0, 0, 0]);
  } finally {
    io.disconnect();
    await nr.close();
    traffic.close();
  }
});
