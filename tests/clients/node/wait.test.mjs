// WAIT holds the connection it is sent on. With a client's shared connection, an
// unrelated call sent during `WAIT 2000` answers only when the WAIT does; with the
// per-client ways of docs/clients.md it answers at once, and the waiter is admitted
// when the lease it waits for is released.

import { test } from "node:test";
import assert from "node:assert/strict";
import Redis from "ioredis";
import { createClient } from "redis";
import { CLUSTER, STANDALONE, asMap, runSnippets, setPlans } from "./helpers.mjs";

await setPlans();

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Holds the gate's one lease on `key`, starts `waiting()` (which must wait for it),
 * then times `unrelated()`; releases the lease and returns [unrelated ms, waiter's
 * reply]. */
async function unrelatedDuringWait({ call, key, waiting, unrelated }) {
  assert.equal(asMap(await call("RL.ACQUIRE", key, "gate", "ID", "holder")).allowed, 1);
  const waiter = waiting();
  await sleep(150); // the WAIT is on the server
  const started = performance.now();
  await unrelated();
  const ms = performance.now() - started;
  await call("RL.RELEASE", key, "holder");
  const reply = asMap(await waiter);
  if (reply.allowed === 1) await call("RL.RELEASE", key, reply.id);
  return [ms, reply];
}

test("ioredis: an unrelated call on the shared connection waits for the WAIT", async () => {
  const redis = new Redis({ port: STANDALONE });
  try {
    const [ms, reply] = await unrelatedDuringWait({
      call: (...a) => redis.call(...a),
      key: "wait:io-shared",
      waiting: () => redis.call("RL.ACQUIRE", "wait:io-shared", "gate", "WAIT", "2000"),
      unrelated: () => redis.call("RL.PEEK", "wait:other", "clients"),
    });
    assert.ok(ms >= 1500, `answered after ${ms} ms`);
    assert.equal(reply.allowed, 0); // timed out: the release queued behind it too
  } finally {
    redis.disconnect();
  }
});

const io = await runSnippets(["js-ioredis-cluster", "js-ioredis-wait"],
  ["tollgate", "cluster", "acquireWaiting", "idle"]);
io.cluster.disconnect();

for (const topology of ["standalone", "cluster"]) {
  test(`ioredis ${topology}: WAIT on a duplicate (docs) leaves the client's connection free`, async () => {
    const client = topology === "standalone"
      ? new Redis({ port: STANDALONE })
      : new Redis.Cluster([{ host: "127.0.0.1", port: CLUSTER[0] }]);
    const key = `{wait}:io-${topology}`;
    try {
      const [ms, reply] = await unrelatedDuringWait({
        call: (...a) => io.tollgate(client, ...a),
        key,
        waiting: () => io.acquireWaiting(client, key, "gate", 2000),
        // Same slot, so the same node as the waiter's.
        unrelated: () => io.tollgate(client, "RL.PEEK", "{wait}:other", "clients"),
      });
      assert.ok(ms < 1000, `answered after ${ms} ms`);
      assert.equal(reply.allowed, 1);
    } finally {
      client.disconnect();
      for (const own of io.idle.splice(0)) own.disconnect();
    }
  });
}

test("node-redis: an unrelated call on a client's connection waits for the WAIT", async () => {
  const client = await createClient({ url: `redis://127.0.0.1:${STANDALONE}` }).connect();
  try {
    const [ms, reply] = await unrelatedDuringWait({
      call: (...a) => client.sendCommand(a),
      key: "wait:nr-shared",
      waiting: () => client.sendCommand(["RL.ACQUIRE", "wait:nr-shared", "gate", "WAIT", "2000"]),
      unrelated: () => client.sendCommand(["RL.PEEK", "wait:other", "clients"]),
    });
    assert.ok(ms >= 1500, `answered after ${ms} ms`);
    assert.equal(reply.allowed, 0);
  } finally {
    await client.close();
  }
});

const nr = await runSnippets(["js-node-redis-cluster", "js-node-redis-wait"],
  ["tollgate", "cluster", "pool", "waited", "acquireWaiting", "idle"]);

test("node-redis: a client pool (docs) lends WAIT a connection of its own", async () => {
  assert.equal(asMap(nr.waited).allowed, 1);
  await nr.pool.sendCommand(["RL.RELEASE", "user:46", asMap(nr.waited).id]);
  const [ms, reply] = await unrelatedDuringWait({
    call: (...a) => nr.pool.sendCommand(a),
    key: "wait:nr-pool",
    waiting: () => nr.pool.sendCommand(["RL.ACQUIRE", "wait:nr-pool", "gate", "WAIT", "2000"]),
    unrelated: () => nr.pool.sendCommand(["RL.PEEK", "wait:other", "clients"]),
  });
  assert.ok(ms < 1000, `answered after ${ms} ms`);
  assert.equal(reply.allowed, 1);
  await nr.pool.close();
});

test("node-redis cluster: WAIT on a duplicate (docs) leaves the cluster's connections free", async () => {
  const key = "{wait}:nr-cluster";
  try {
    const [ms, reply] = await unrelatedDuringWait({
      call: (...a) => nr.tollgate(nr.cluster, ...a),
      key,
      waiting: () => nr.acquireWaiting(nr.cluster, key, "gate", 2000),
      unrelated: () => nr.tollgate(nr.cluster, "RL.PEEK", "{wait}:other", "clients"),
    });
    assert.ok(ms < 1000, `answered after ${ms} ms`);
    assert.equal(reply.allowed, 1);
  } finally {
    await nr.cluster.close();
    for (const own of nr.idle.splice(0)) await own.close();
  }
});
